//! The AWS events queue of the leak response: an SQS queue in moto, the operator's shipped policy
//! (with its SQS statement) applied to its identity, and AWS's three leak reports as EventBridge
//! delivers them.

use std::time::Duration;

use anyhow::Context as _;
use aws_sdk_sqs::types::QueueAttributeName;
use rekey_testenv::env::{TestEnv, eventually, unique};
use serde_json::{Value, json};

use super::WAIT;

/// A queue of its own for one test, as the administrator sees it.
pub struct EventsQueue {
    pub sqs: aws_sdk_sqs::Client,
    pub url: String,
}

impl EventsQueue {
    /// A queue whose messages come back 2 s after a receiver died holding them, and the operator
    /// allowed to read it (the testenv may have been bootstrapped with an older policy).
    pub async fn new(env: &TestEnv, prefix: &str) -> anyhow::Result<Self> {
        grant_shipped_policy(env).await?;
        let sqs = aws_sdk_sqs::Client::new(&env.admin_sdk);
        let out = sqs
            .create_queue()
            .queue_name(unique(prefix))
            .attributes(QueueAttributeName::VisibilityTimeout, "2")
            .send()
            .await?;
        Ok(Self { sqs, url: out.queue_url().context("no queue URL")?.to_owned() })
    }

    pub async fn send(&self, event: &Value) -> anyhow::Result<()> {
        self.sqs.send_message().queue_url(&self.url).message_body(event.to_string()).send().await?;
        Ok(())
    }

    pub async fn send_raw(&self, body: &str) -> anyhow::Result<()> {
        self.sqs.send_message().queue_url(&self.url).message_body(body).send().await?;
        Ok(())
    }

    /// Messages waiting or being handled.
    pub async fn in_queue(&self) -> anyhow::Result<u64> {
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await?;
        let attrs = out.attributes().cloned().unwrap_or_default();
        Ok(attrs.values().filter_map(|v| v.parse::<u64>().ok()).sum())
    }

    /// Waits until every message was deleted.
    pub async fn drained(&self) -> anyhow::Result<()> {
        eventually("the events queue is empty", WAIT, || async {
            let n = self.in_queue().await?;
            Ok(if n == 0 { Ok(()) } else { Err(format!("{n} messages")) })
        })
        .await
    }
}

/// deploy/iam-policy.json as moto evaluates it (as scripts/testenv-iam-bootstrap.py applies it:
/// Resource "*", no Condition, no conditioned Deny), put on the operator's identity again.
pub async fn grant_shipped_policy(env: &TestEnv) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/iam-policy.json"))?;
    let policy: Value = serde_json::from_str(&text)?;
    let statements: Vec<Value> = policy["Statement"]
        .as_array()
        .context("Statement")?
        .iter()
        .filter(|s| !(s["Effect"] == "Deny" && s.get("Condition").is_some()))
        .map(|s| {
            let mut s = s.clone();
            if let Some(m) = s.as_object_mut() {
                m.remove("Condition");
                m.insert("Resource".into(), "*".into());
            }
            s
        })
        .collect();
    let doc = json!({"Version": policy["Version"], "Statement": statements});
    let user = std::env::var("REKEY_TEST_OPERATOR_USER").unwrap_or_else(|_| "rekey-operator".into());
    env.iam
        .put_user_policy()
        .user_name(user)
        .policy_name("rekey-operator")
        .policy_document(doc.to_string())
        .send()
        .await?;
    Ok(())
}

/// AWS Health's AWS_RISK_CREDENTIALS_EXPOSED, as EventBridge delivers it.
pub fn health_event(key: &str, id: &str) -> Value {
    json!({
        "version": "0", "id": unique("health"), "detail-type": "AWS Health Event", "source": "aws.health",
        "account": "123456789012", "time": "2026-11-30T06:27:57Z", "region": "us-east-1", "resources": [],
        "detail": {
            "eventArn": format!("arn:aws:health:global::event/RISK/AWS_RISK_CREDENTIALS_EXPOSED/AWS_RISK_CREDENTIALS_EXPOSED_{id}"),
            "service": "RISK", "eventTypeCode": "AWS_RISK_CREDENTIALS_EXPOSED", "eventTypeCategory": "issue",
            "startTime": "Mon, 30 Nov 2026 06:27:57 GMT",
            "eventDescription": [{"language": "en_US", "latestDescription": "The access key was found on a public site."}],
            "affectedEntities": [{"entityValue": key}]
        }
    })
}

/// A GuardDuty finding on an IAM user's access key.
pub fn guardduty_event(key: &str, user: &str, id: &str) -> Value {
    json!({
        "version": "0", "id": unique("gd"), "detail-type": "GuardDuty Finding", "source": "aws.guardduty",
        "account": "123456789012", "time": "2026-11-30T06:27:57Z", "region": "us-east-1", "resources": [],
        "detail": {
            "schemaVersion": "2.0", "accountId": "123456789012", "region": "us-east-1", "partition": "aws",
            "id": id, "type": "UnauthorizedAccess:IAMUser/MaliciousIPCaller.Custom",
            "resource": {"resourceType": "AccessKey", "accessKeyDetails": {
                "accessKeyId": key, "principalId": "AIDAEXAMPLE", "userName": user, "userType": "IAMUser"}},
            "severity": 5, "title": "An API was invoked from an IP address on a custom threat list."
        }
    })
}

/// CloudTrail's AttachUserPolicy of the quarantine policy AWS attaches to a user whose key leaked.
pub fn quarantine_event(user: &str, account: &str, id: &str) -> Value {
    json!({
        "version": "0", "id": unique("ct"), "detail-type": "AWS API Call via CloudTrail", "source": "aws.iam",
        "account": account, "time": "2026-11-30T06:27:57Z", "region": "us-east-1", "resources": [],
        "detail": {
            "eventVersion": "1.08", "eventSource": "iam.amazonaws.com", "eventName": "AttachUserPolicy",
            "eventID": id, "awsRegion": "us-east-1", "eventType": "AwsApiCall",
            "userIdentity": {"type": "AWSService", "invokedBy": "iam.amazonaws.com"},
            "requestParameters": {"userName": user, "policyArn": "arn:aws:iam::aws:policy/AWSCompromisedKeyQuarantineV3"},
            "responseElements": null
        }
    })
}

/// How long a test waits for a leaked key to go.
pub const LEAK_WAIT: Duration = Duration::from_secs(120);

/// Waits until resource `name` has done two rotations, the second replacing the leaked new key of
/// the first: both `old` and `leaked` are gone from IAM, the active key is Active, and `request`
/// (the report's emergency request) is the one acted on.
pub async fn leaked_new_key_rotated_away(
    f: &super::Fixture,
    name: &str,
    old: &str,
    leaked: &str,
    request: &str,
) -> anyhow::Result<()> {
    use rekey::api::Phase;
    let o = super::wait_ikr(&f.ikrs, name, "two rotations", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 2 && s.phase == Phase::Idle)
    })
    .await?;
    let keys = f.env.keys(&f.user).await?;
    anyhow::ensure!(!keys.contains_key(old) && !keys.contains_key(leaked), "both keys are gone: {keys:?}");
    let now = super::active_key(&o).context("active key")?;
    anyhow::ensure!(keys.get(&now).map(String::as_str) == Some("Active"), "{now} is Active: {keys:?}");
    let acted_on = o.status.and_then(|s| s.last_emergency_request);
    anyhow::ensure!(acted_on.as_deref() == Some(request), "acted on {acted_on:?}, not {request}");
    Ok(())
}
