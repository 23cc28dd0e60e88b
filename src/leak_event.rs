//! AWS's reports that an access key leaked, as EventBridge delivers them to an SQS queue. PURE.
//!
//! Three sources, each a documented event shape:
//! - AWS Health, `AWS_RISK_CREDENTIALS_EXPOSED` (AWS found the key in public, e.g. on GitHub):
//!   `detail.affectedEntities[].entityValue` is the access key id;
//! - GuardDuty findings on an IAM user's key: `detail.resource.accessKeyDetails.accessKeyId`;
//! - CloudTrail's `AttachUserPolicy` of an `AWSCompromisedKeyQuarantine*` managed policy (AWS
//!   quarantines a user whose key it found exposed): it names the user, not the key.
//!
//! Each report carries an id that stays the same when AWS sends it again (Health's event ARN,
//! GuardDuty's finding id, CloudTrail's eventID): the emergency request is derived from it, so a
//! report delivered twice asks for one rotation.

use serde_json::Value;

/// Where a report came from: the `source` label of `rekey_leak_events_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "lowercase")]
pub enum Source {
    Health,
    GuardDuty,
    CloudTrail,
    /// Not one of the three, or not an event at all.
    Unknown,
}

/// Every source, for metrics exported from 0.
pub const SOURCES: [Source; 4] = [Source::Health, Source::GuardDuty, Source::CloudTrail, Source::Unknown];

/// What a report says leaked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// An access key id.
    Key(String),
    /// An IAM user (its active key is the one to replace).
    User(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leak {
    pub source: Source,
    /// The report's stable id, cut to the characters an annotation value keeps readable.
    pub event_id: String,
    pub subjects: Vec<Subject>,
    /// The AWS account the event came from: a user name means that account's user.
    pub account: Option<String>,
}

impl Leak {
    /// The rekey.dev/rotate-emergency value that asks for this report's rotation: the same report
    /// always gives the same value, so a redelivery is not a new request.
    pub fn request(&self) -> String {
        format!("{}:{}", <&str>::from(self.source), self.event_id)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    Leak(Leak),
    /// A well-formed event that reports no leak (another Health event type, another policy
    /// attached, a GuardDuty finding on something else than an access key).
    NotALeak(Source),
    Malformed,
}

/// The managed policies AWS attaches to a user whose key it found exposed (V2, V3, and the first).
const QUARANTINE: &str = ":iam::aws:policy/AWSCompromisedKeyQuarantine";

/// Parses an SQS message body: the EventBridge event itself, or wrapped in an SNS notification
/// (a queue subscribed to a topic the rule targets).
pub fn parse(body: &str) -> Parsed {
    let Ok(v) = serde_json::from_str::<Value>(body) else { return Parsed::Malformed };
    if v["Type"] == "Notification"
        && let Some(inner) = v["Message"].as_str()
    {
        return parse(inner);
    }
    let detail = &v["detail"];
    if !detail.is_object() {
        return Parsed::Malformed;
    }
    let (source, id, subjects) = match v["source"].as_str() {
        Some("aws.health") => (Source::Health, health_id(detail), health(detail)),
        Some("aws.guardduty") => (Source::GuardDuty, detail["id"].as_str().map(str::to_owned), guardduty(detail)),
        Some("aws.iam") => (Source::CloudTrail, detail["eventID"].as_str().map(str::to_owned), quarantine(detail)),
        _ => return Parsed::Malformed,
    };
    let Some(event_id) = id.or_else(|| v["id"].as_str().map(str::to_owned)).map(|i| sanitize(&i)) else {
        return Parsed::Malformed;
    };
    match subjects {
        None => Parsed::NotALeak(source),
        Some(s) if s.is_empty() || event_id.is_empty() => Parsed::Malformed,
        Some(subjects) => {
            let account = v["account"].as_str().map(str::to_owned);
            Parsed::Leak(Leak { source, event_id, subjects, account })
        }
    }
}

/// The last part of the event ARN (`arn:aws:health:global::event/RISK/AWS_RISK_..._ABC`).
fn health_id(detail: &Value) -> Option<String> {
    detail["eventArn"].as_str().map(|a| a.rsplit('/').next().unwrap_or(a).to_owned())
}

fn health(detail: &Value) -> Option<Vec<Subject>> {
    if detail["eventTypeCode"] != "AWS_RISK_CREDENTIALS_EXPOSED" {
        return None;
    }
    let entities = detail["affectedEntities"].as_array().map(Vec::as_slice).unwrap_or_default();
    Some(entities.iter().filter_map(|e| e["entityValue"].as_str()).filter(|k| is_key_id(k)).map(key).collect())
}

fn guardduty(detail: &Value) -> Option<Vec<Subject>> {
    let id = detail["resource"]["accessKeyDetails"]["accessKeyId"].as_str()?;
    // Findings on an instance's or a role's temporary credentials (ASIA…) are not rekey's keys.
    (is_key_id(id) && id.starts_with("AKIA")).then(|| vec![key(id)])
}

fn quarantine(detail: &Value) -> Option<Vec<Subject>> {
    let params = &detail["requestParameters"];
    let policy = params["policyArn"].as_str().unwrap_or_default();
    if detail["eventName"] != "AttachUserPolicy" || !policy.contains(QUARANTINE) {
        return None;
    }
    let user = params["userName"].as_str().filter(|u| is_user_name(u));
    Some(user.map(|u| Subject::User(u.to_owned())).into_iter().collect())
}

fn key(id: &str) -> Subject {
    Subject::Key(id.to_owned())
}

/// IAM's access key ids: 16 to 128 upper-case letters and digits.
fn is_key_id(s: &str) -> bool {
    (16..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// IAM's user names: `[\w+=,.@-]{1,64}`.
fn is_user_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b))
}

/// Letters, digits, `.`, `_` and `-`, at most 100: the id goes into an annotation and a condition.
fn sanitize(id: &str) -> String {
    id.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')).take(100).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "AKIAIOSFODNN7EXAMPLE";

    fn health_event(key: &str) -> Value {
        json!({
            "version": "0", "id": "7bf73129-1428-4cd3-a780-95db273d1602", "detail-type": "AWS Health Event",
            "source": "aws.health", "account": "123456789012", "time": "2026-11-30T06:27:57Z",
            "region": "us-east-1", "resources": [],
            "detail": {
                "eventArn": "arn:aws:health:global::event/RISK/AWS_RISK_CREDENTIALS_EXPOSED/AWS_RISK_CREDENTIALS_EXPOSED_ABC123",
                "service": "RISK", "eventTypeCode": "AWS_RISK_CREDENTIALS_EXPOSED", "eventTypeCategory": "issue",
                "startTime": "Mon, 30 Nov 2026 06:27:57 GMT",
                "eventDescription": [{"language": "en_US", "latestDescription": "Your key was found on a public site"}],
                "affectedEntities": [{"entityValue": key}]
            }
        })
    }

    fn guardduty_event(key: &str) -> Value {
        json!({
            "version": "0", "id": "c8c4daa7-a20c-2f03-0070-b7393dd542ad", "detail-type": "GuardDuty Finding",
            "source": "aws.guardduty", "account": "123456789012", "region": "us-east-1", "resources": [],
            "detail": {
                "schemaVersion": "2.0", "accountId": "123456789012", "region": "us-east-1",
                "id": "16afba5c5c43e07c9e3e5e2e544e95df", "type": "UnauthorizedAccess:IAMUser/MaliciousIPCaller.Custom",
                "resource": {"resourceType": "AccessKey",
                    "accessKeyDetails": {"accessKeyId": key, "principalId": "AIDA0000", "userName": "billing", "userType": "IAMUser"}},
                "severity": 5, "title": "API GetCallerIdentity was invoked from an IP on a custom threat list."
            }
        })
    }

    fn quarantine_event(policy: &str) -> Value {
        json!({
            "version": "0", "id": "4c8a7a6b-0000-4f4a-9d2b-5b8f0d1e2f3a", "detail-type": "AWS API Call via CloudTrail",
            "source": "aws.iam", "account": "123456789012", "region": "us-east-1", "resources": [],
            "detail": {
                "eventVersion": "1.08", "eventSource": "iam.amazonaws.com", "eventName": "AttachUserPolicy",
                "eventID": "a1b2c3d4-5678-90ab-cdef-EXAMPLE11111", "awsRegion": "us-east-1",
                "userIdentity": {"type": "AWSService", "invokedBy": "iam.amazonaws.com"},
                "requestParameters": {"userName": "billing", "policyArn": policy},
                "responseElements": null
            }
        })
    }

    fn leak(source: Source, id: &str, subjects: Vec<Subject>) -> Parsed {
        Parsed::Leak(Leak { source, event_id: id.into(), subjects, account: Some("123456789012".into()) })
    }

    #[test]
    fn a_health_credentials_exposed_event_names_the_key() {
        let p = parse(&health_event(KEY).to_string());
        assert_eq!(p, leak(Source::Health, "AWS_RISK_CREDENTIALS_EXPOSED_ABC123", vec![key(KEY)]));
        let Parsed::Leak(l) = p else { unreachable!() };
        assert_eq!(l.request(), "health:AWS_RISK_CREDENTIALS_EXPOSED_ABC123");
        let mut other = health_event(KEY);
        other["detail"]["eventTypeCode"] = "AWS_EC2_INSTANCE_STORE_DRIVE_PERFORMANCE_DEGRADED".into();
        assert_eq!(parse(&other.to_string()), Parsed::NotALeak(Source::Health));
    }

    #[test]
    fn a_guardduty_finding_names_the_key_by_its_finding_id() {
        let p = parse(&guardduty_event(KEY).to_string());
        assert_eq!(p, leak(Source::GuardDuty, "16afba5c5c43e07c9e3e5e2e544e95df", vec![key(KEY)]));
        // Temporary credentials (an instance role's) are not rekey's.
        assert_eq!(parse(&guardduty_event("ASIAIOSFODNN7EXAMPLE").to_string()), Parsed::NotALeak(Source::GuardDuty));
        let mut s3 = guardduty_event(KEY);
        s3["detail"]["resource"] = json!({"resourceType": "S3Bucket"});
        assert_eq!(parse(&s3.to_string()), Parsed::NotALeak(Source::GuardDuty));
    }

    #[test]
    fn a_quarantine_policy_attached_names_the_user() {
        for v in ["", "V2", "V3"] {
            let e = quarantine_event(&format!("arn:aws:iam::aws:policy/AWSCompromisedKeyQuarantine{v}"));
            let want =
                leak(Source::CloudTrail, "a1b2c3d4-5678-90ab-cdef-EXAMPLE11111", vec![Subject::User("billing".into())]);
            assert_eq!(parse(&e.to_string()), want);
        }
        let other = quarantine_event("arn:aws:iam::aws:policy/ReadOnlyAccess");
        assert_eq!(parse(&other.to_string()), Parsed::NotALeak(Source::CloudTrail));
    }

    #[test]
    fn an_event_through_sns_is_unwrapped() {
        let sns = json!({"Type": "Notification", "MessageId": "m", "Message": health_event(KEY).to_string()});
        assert!(matches!(parse(&sns.to_string()), Parsed::Leak(l) if l.source == Source::Health));
    }

    #[test]
    fn malformed_bodies_are_told_apart_from_reports() {
        let mut no_key = health_event("not a key");
        let mut odd_id = guardduty_event(KEY);
        odd_id["detail"]["id"] = "\"; rm -rf /".into();
        no_key["detail"]["affectedEntities"] = json!([{"entityValue": "lower-case-not-a-key"}]);
        let mut bad_user = quarantine_event("arn:aws:iam::aws:policy/AWSCompromisedKeyQuarantineV2");
        bad_user["detail"]["requestParameters"]["userName"] = "a b/c".into();
        for body in [
            "".to_owned(),
            "not json".into(),
            "[]".into(),
            json!({"source": "aws.health"}).to_string(),
            json!({"source": "custom.app", "detail": {}}).to_string(),
            no_key.to_string(),
            bad_user.to_string(),
        ] {
            assert_eq!(parse(&body), Parsed::Malformed, "{body}");
        }
        let Parsed::Leak(l) = parse(&odd_id.to_string()) else { panic!("a finding with an odd id is still a report") };
        assert_eq!(l.event_id, "rm-rf");
    }
}
