//! Leak response: AWS's reports of a leaked key, read from an SQS queue (--aws-events-queue-url),
//! become emergency rotations. TOUCHES AWS (SQS ReceiveMessage/DeleteMessage) and THE CLUSTER
//! (lists IamKeyRotations, patches the emergency annotation, Events). Parsing is `leak_event`.
//!
//! One long poll at a time (20 s), whatever the number of resources: idle, rekey makes three
//! ReceiveMessage calls a minute. Only the leader polls (it runs beside the controller).
//!
//! At least once, and idempotent: a report's emergency request is its annotation value
//! (`<source>:<event id>`), patched onto every resource that holds the key, and the message is
//! deleted only after that patch is committed. A crash in between redelivers the message after
//! the queue's visibility timeout; the same value patched again is not a new request, so the key
//! is rotated once. A report rekey cannot act on (malformed, not a leak, a key no resource holds)
//! is counted, logged and deleted; one whose patch keeps failing is retried by the queue until
//! its MAX_RECEIVES-th delivery, then counted as abandoned and deleted.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use kube::ResourceExt as _;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use tracing::{error, info, warn};

use crate::api::{IamKeyRotation, ROTATE_EMERGENCY_ANNOTATION};
use crate::context::Context;
use crate::iam::Iam;
use crate::leak_event::{Leak, Parsed, Subject, parse};

/// SQS's longest wait: one call per 20 s when the queue is empty.
const WAIT_SECONDS: i32 = 20;
/// Deliveries of a report whose emergency request could not be committed before it is dropped.
const MAX_RECEIVES: u32 = 10;
/// Annotation naming the report behind the last emergency request rekey made from the queue.
pub const LEAK_ANNOTATION: &str = "rekey.dev/leak-report";

#[derive(Debug, thiserror::Error)]
pub enum LeakError {
    #[error("SQS {operation} failed: {code}")]
    Sqs { operation: &'static str, code: String },
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("IAM: {0}")]
    Iam(#[from] crate::error::Error),
}

impl LeakError {
    /// Bounded: a log field and a metric label.
    pub fn category(&self) -> &'static str {
        match self {
            LeakError::Sqs { .. } => "SqsError",
            LeakError::Kube(kube::Error::Api(s)) if s.code == 403 => "KubeForbidden",
            LeakError::Kube(_) => "KubeError",
            LeakError::Iam(e) => e.category(),
        }
    }
}

fn sqs_error<E: aws_sdk_sqs::error::ProvideErrorMetadata>(operation: &'static str, e: &E) -> LeakError {
    LeakError::Sqs { operation, code: e.code().unwrap_or("Unreachable").to_owned() }
}

/// Runs `controller` and, with a queue, the leak response beside it; ends when the controller does.
pub async fn alongside<I: Iam + 'static>(
    ctx: Arc<Context<I>>,
    queue_url: Option<String>,
    controller: impl Future<Output = ()>,
) {
    let Some(url) = queue_url else { return controller.await };
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await;
    let queue = Queue { sqs: aws_sdk_sqs::Client::new(&sdk), url };
    tokio::select! {
        () = controller => {}
        () = queue.poll(ctx) => {}
    }
}

struct Queue {
    sqs: aws_sdk_sqs::Client,
    url: String,
}

impl Queue {
    /// Polls forever; a failed poll waits 5 s, doubling to 5 min, so a refused queue is not hammered.
    async fn poll<I: Iam>(&self, ctx: Arc<Context<I>>) {
        info!("polling the AWS events queue for leaked keys");
        let mut backoff = Duration::from_secs(5);
        loop {
            match self.receive(&ctx).await {
                Ok(messages) => {
                    backoff = Duration::from_secs(5);
                    for m in messages {
                        self.handle(&ctx, &m).await;
                    }
                }
                Err(e) => {
                    error!(category = e.category(), error = %e, "cannot read the AWS events queue");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(300));
                }
            }
        }
    }

    async fn receive<I: Iam>(&self, ctx: &Context<I>) -> Result<Vec<Message>, LeakError> {
        let out = self
            .sqs
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(10)
            .wait_time_seconds(WAIT_SECONDS)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await;
        let out = out.map_err(|e| sqs_error("ReceiveMessage", &e));
        ctx.metrics.aws_call("ReceiveMessage", outcome(&out));
        Ok(out?.messages.unwrap_or_default())
    }

    async fn delete<I: Iam>(&self, ctx: &Context<I>, m: &Message) {
        let Some(handle) = m.receipt_handle() else { return };
        let out = self.sqs.delete_message().queue_url(&self.url).receipt_handle(handle).send().await;
        let out = out.map_err(|e| sqs_error("DeleteMessage", &e));
        ctx.metrics.aws_call("DeleteMessage", outcome(&out));
        if let Err(e) = out {
            // Delivered again after the visibility timeout, and then found already committed.
            warn!(category = e.category(), error = %e, "could not delete a queue message");
        }
    }

    /// One message: act on it, then delete it, unless its request is not committed yet.
    async fn handle<I: Iam>(&self, ctx: &Context<I>, m: &Message) {
        let message_id = m.message_id().unwrap_or_default();
        let leak = match parse(m.body().unwrap_or_default()) {
            Parsed::Leak(l) => l,
            Parsed::NotALeak(source) => {
                ctx.metrics.leak_event(source, false);
                info!(message_id, source = <&str>::from(source), "queue message reports no leaked key: deleted");
                return self.delete(ctx, m).await;
            }
            Parsed::Malformed => {
                ctx.metrics.leak_event(crate::leak_event::Source::Unknown, false);
                warn!(message_id, "queue message is not an AWS leak report rekey reads: deleted");
                return self.delete(ctx, m).await;
            }
        };
        let source: &str = leak.source.into();
        match request_emergencies(ctx, &leak).await {
            Ok(resources) => {
                ctx.metrics.leak_event(leak.source, !resources.is_empty());
                if resources.is_empty() {
                    warn!(source, event = %leak.event_id, subjects = ?leak.subjects, "leaked key reported, but no IamKeyRotation holds it: nothing to rotate");
                } else {
                    info!(source, event = %leak.event_id, ?resources, "leaked key reported: emergency rotation requested");
                }
                crate::failpoint!("leak-before-delete");
                self.delete(ctx, m).await;
            }
            Err(e) => {
                let deliveries = receive_count(m);
                if deliveries < MAX_RECEIVES {
                    warn!(source, event = %leak.event_id, deliveries, category = e.category(), error = %e, "could not request the emergency rotation: the queue delivers the report again");
                } else {
                    ctx.metrics.leak_events_abandoned.inc();
                    error!(source, event = %leak.event_id, deliveries, category = e.category(), error = %e, "could not request the emergency rotation after the last delivery: report dropped, rotate by hand");
                    self.delete(ctx, m).await;
                }
            }
        }
    }
}

/// `ok` or the AWS error code, as `rekey_aws_calls_total` labels the IAM calls.
fn outcome<T>(r: &Result<T, LeakError>) -> &str {
    match r {
        Ok(_) => "ok",
        Err(LeakError::Sqs { code, .. }) => code,
        Err(_) => "error",
    }
}

fn receive_count(m: &Message) -> u32 {
    m.attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .and_then(|c| c.parse().ok())
        .unwrap_or(1)
}

/// Commits the report's emergency request on every resource that holds its key (or rotates its
/// user): `namespace/name` of each. Already-committed resources (a redelivery) are not patched
/// again and get no second Event.
async fn request_emergencies<I: Iam>(ctx: &Context<I>, leak: &Leak) -> Result<Vec<String>, LeakError> {
    let home = home_account(ctx, leak).await?;
    let mut done = Vec::new();
    for obj in resources(ctx).await? {
        let Some(key) = held(&obj, leak, home.as_deref()) else { continue };
        // The key in the request lets a rotation in flight tell whether the leaked key is the one
        // it retires or the new one it just handed over (act::retire::escalate).
        let value = format!("{}:{key}", leak.request());
        let ns = obj.namespace().unwrap_or_default();
        done.push(format!("{ns}/{}", obj.name_any()));
        if obj.annotations().get(ROTATE_EMERGENCY_ANNOTATION) == Some(&value) {
            continue;
        }
        let report = format!("{} report {} on key {key}", <&str>::from(leak.source), leak.event_id);
        let patch = json!({"metadata": {"annotations": {ROTATE_EMERGENCY_ANNOTATION: value, LEAK_ANNOTATION: report}}});
        let api: Api<IamKeyRotation> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch(&obj.name_any(), &PatchParams::default().validation_strict(), &Patch::Merge(&patch)).await?;
        let note = format!("AWS reported key {key} leaked ({report}): EMERGENCY rotation requested ({value})");
        ctx.events.publish(&obj, true, "LeakReported", note, "RequestEmergency");
    }
    Ok(done)
}

/// Every IamKeyRotation rekey watches, read afresh (a report is rare; the cache holds no keys).
async fn resources<I: Iam>(ctx: &Context<I>) -> Result<Vec<IamKeyRotation>, LeakError> {
    if ctx.config.namespaces.is_empty() {
        return Ok(Api::<IamKeyRotation>::all(ctx.client.clone()).list(&ListParams::default()).await?.items);
    }
    let mut all = Vec::new();
    for ns in &ctx.config.namespaces {
        all.extend(Api::<IamKeyRotation>::namespaced(ctx.client.clone(), ns).list(&ListParams::default()).await?.items);
    }
    Ok(all)
}

/// The operator's own account, asked only for a report that names a user (user names are per account).
async fn home_account<I: Iam>(ctx: &Context<I>, leak: &Leak) -> Result<Option<String>, LeakError> {
    if !leak.subjects.iter().any(|s| matches!(s, Subject::User(_))) {
        return Ok(None);
    }
    let arn = ctx.iam.whoami().await?;
    Ok(Some(crate::budget::account_of(&arn).to_owned()))
}

/// The leaked key this resource holds, if the report is about it: its active key, the key its
/// rotation in flight is retiring (still live until deactivated), or the new key it is writing
/// into the Secrets (it becomes the active key, so it is rotated once this rotation ends); for a
/// user, its active key.
pub fn held(obj: &IamKeyRotation, leak: &Leak, home: Option<&str>) -> Option<String> {
    let st = obj.status.as_ref()?;
    let active = st.active_key.as_ref().map(|k| k.access_key_id.as_str());
    let retiring = st.retiring_key.as_ref().map(|k| k.access_key_id.as_str());
    let new = st.new_key.as_ref().map(|k| k.access_key_id.as_str());
    leak.subjects.iter().find_map(|s| match s {
        Subject::Key(id) if [active, retiring, new].contains(&Some(id.as_str())) => Some(id.clone()),
        Subject::User(user) if same_user(obj, user) && same_account(obj, leak, home) => active.map(str::to_owned),
        _ => None,
    })
}

/// IAM user names are unique regardless of case.
fn same_user(obj: &IamKeyRotation, user: &str) -> bool {
    let tracked = obj.status.as_ref().and_then(|s| s.user_name.as_deref()).unwrap_or(&obj.spec.user_name);
    tracked.eq_ignore_ascii_case(user)
}

fn same_account(obj: &IamKeyRotation, leak: &Leak, home: Option<&str>) -> bool {
    let role = obj.spec.aws.as_ref().and_then(|a| a.role_arn.as_deref());
    let account = role.map(crate::budget::account_of).or(home);
    // A report that cannot be placed in an account matches nobody: user names repeat across accounts.
    match (&leak.account, account) {
        (Some(reported), Some(ours)) => reported == ours,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leak_event::Source;

    fn obj(user: &str, active: &str, retiring: Option<&str>, role: Option<&str>) -> IamKeyRotation {
        let mut status = json!({"activeKey": {"accessKeyId": active}, "userName": user});
        if let Some(r) = retiring {
            status["retiringKey"] = json!({"accessKeyId": r, "state": "Active"});
            status["newKey"] = json!({"accessKeyId": "AKIAPENDING"});
        }
        let mut spec = json!({"userName": user, "secrets": [{"name": "s"}]});
        if let Some(r) = role {
            spec["aws"] = json!({"roleArn": r});
        }
        serde_json::from_value(json!({
            "apiVersion": "rekey.dev/v1alpha1", "kind": "IamKeyRotation",
            "metadata": {"name": "a", "namespace": "ns"}, "spec": spec, "status": status,
        }))
        .unwrap()
    }

    fn leak(subject: Subject) -> Leak {
        Leak { source: Source::GuardDuty, event_id: "e1".into(), subjects: vec![subject], account: Some("111".into()) }
    }

    #[test]
    fn a_report_matches_the_active_or_retiring_key_or_the_users_active_key() {
        let key = |k: &str| leak(Subject::Key(k.into()));
        let o = obj("billing", "AKIAACTIVE", Some("AKIARETIRING"), None);
        assert_eq!(held(&o, &key("AKIAACTIVE"), None).as_deref(), Some("AKIAACTIVE"));
        assert_eq!(held(&o, &key("AKIARETIRING"), None).as_deref(), Some("AKIARETIRING"));
        assert_eq!(held(&o, &key("AKIAPENDING"), None).as_deref(), Some("AKIAPENDING"), "not in every Secret yet");
        assert_eq!(held(&o, &key("AKIAOTHER"), None), None);
        let user = |u: &str| leak(Subject::User(u.into()));
        assert_eq!(held(&o, &user("Billing"), Some("111")).as_deref(), Some("AKIAACTIVE"));
        assert_eq!(held(&o, &user("billing"), Some("222")), None, "the same name in another account");
        let other = obj("billing", "AKIAX", None, Some("arn:aws:iam::222:role/rekey/r"));
        assert_eq!(held(&other, &user("billing"), Some("111")), None);
        assert_eq!(
            held(&other, &Leak { account: Some("222".into()), ..user("billing") }, Some("111")).as_deref(),
            Some("AKIAX")
        );
    }
}
