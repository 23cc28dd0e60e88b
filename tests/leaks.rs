//! Leak response: AWS's reports of a leaked key (AWS Health, GuardDuty, the quarantine policy
//! attached), sent to a real SQS queue in the documented EventBridge shapes, start an emergency
//! rotation of the resource holding the key; what rekey cannot act on changes nothing and leaves
//! the queue. (The crash between commit and delete: tests/crash.rs.)

mod support;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rekey::api::{IamKeyRotation, Phase};
use rekey_testenv::env::{eventually, http_get, unique};
use serde_json::json;
use support::*;

/// A resource that adopted a key of `user` (its own Secret `name`), with a day-long soak that an
/// emergency skips: the key id.
async fn adopted(f: &Fixture, name: &str, user: &str) -> anyhow::Result<String> {
    let key = f.env.create_key(user).await?;
    f.secrets.create(&PostParams::default(), &key_secret(name, &key)?).await?;
    f.create(name, json!({"userName": user, "secrets": [{"name": name}], "retirement": {"deleteAfter": "24h"}}))
        .await?;
    Ok(key.access_key_id)
}

/// Waits until `key` of `user` is Inactive or gone in IAM.
async fn key_off(f: &Fixture, user: &str, key: &str) -> anyhow::Result<()> {
    eventually(&format!("{key} off"), LEAK_WAIT, || async {
        let keys = f.env.keys(user).await?;
        Ok(if keys.get(key).map(String::as_str) == Some("Active") { Err(format!("{keys:?}")) } else { Ok(()) })
    })
    .await
}

async fn rotated_once(api: &Api<IamKeyRotation>, name: &str) -> anyhow::Result<IamKeyRotation> {
    wait_ikr(api, name, "one rotation done", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await
}

/// The notes of the LeakReported Events on `name`, once there is one.
async fn leak_events(f: &Fixture, name: &str) -> anyhow::Result<Vec<String>> {
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(f.env.kube.clone(), &f.ns);
    eventually(&format!("a LeakReported Event on {name}"), WAIT, || async {
        let items = events.list(&Default::default()).await?.items;
        let notes: Vec<String> = items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("LeakReported"))
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .filter_map(|e| e.note.clone())
            .collect();
        Ok(if notes.is_empty() { Err("none yet".to_owned()) } else { Ok(notes) })
    })
    .await
}

#[tokio::test]
async fn each_aws_leak_report_starts_an_emergency_rotation_and_the_rest_change_nothing() -> anyhow::Result<()> {
    let f = Fixture::new("leak").await?;
    let queue = EventsQueue::new(&f.env, "leak").await?;
    let mut users = vec![f.user.clone()];
    for _ in 0..3 {
        users.push(consenting_user(&f.env, "leak", &f.ns).await?);
    }
    let names = ["health", "guardduty", "quarantine", "bystander"];
    let mut keys = Vec::new();
    for (name, user) in names.iter().zip(&users) {
        keys.push(adopted(&f, name, user).await?);
    }
    let op = Operator::start(&f.ns, &[("REKEY_AWS_EVENTS_QUEUE_URL", &queue.url)]).await?;
    for (name, key) in names.iter().zip(&keys) {
        wait_ikr(&f.ikrs, name, "adopted", |o| active_key(o).as_deref() == Some(key)).await?;
    }

    // What rekey cannot act on: not JSON, a key no resource holds, another Health event.
    queue.send_raw("{\"source\": \"aws.health\", truncated").await?;
    queue.send(&guardduty_event("AKIAUNKNOWN000000000", "nobody", &unique("finding"))).await?;
    let mut other = health_event(&keys[3], &unique("other"));
    other["detail"]["eventTypeCode"] = "AWS_EC2_OPERATIONAL_ISSUE".into();
    queue.send(&other).await?;
    queue.drained().await?;
    for (name, key) in names.iter().zip(&keys) {
        let o = f.ikrs.get(name).await?;
        let rotations = o.status.as_ref().map(|s| s.rotations);
        assert_eq!((active_key(&o).as_deref(), rotations), (Some(key.as_str()), Some(0)), "{name} untouched");
    }

    let ids = [unique("h"), unique("gd"), unique("ct")];
    let started = Instant::now();
    queue.send(&health_event(&keys[0], &ids[0])).await?;
    queue.send(&guardduty_event(&keys[1], &users[1], &ids[1])).await?;
    queue.send(&quarantine_event(&users[2].to_uppercase(), &f.env.account_id, &ids[2])).await?;
    let mut off = Vec::new();
    for (user, key) in users.iter().zip(&keys).take(3) {
        key_off(&f, user, key).await?;
        off.push(started.elapsed());
    }
    println!("leaked key off (Inactive or deleted) after being queued: {off:?}");

    let wants = [
        ("health", format!("health:AWS_RISK_CREDENTIALS_EXPOSED_{}:{}", ids[0], keys[0])),
        ("guardduty", format!("guardduty:{}:{}", ids[1], keys[1])),
        ("cloudtrail", format!("cloudtrail:{}:{}", ids[2], keys[2])),
    ];
    for (i, (source, request)) in wants.iter().enumerate() {
        let o = rotated_once(&f.ikrs, names[i]).await?;
        let st = o.status.clone().context("status")?;
        assert_eq!(st.last_emergency_request.as_deref(), Some(request.as_str()), "{}", names[i]);
        let active = active_key(&o).context("active key")?;
        assert_eq!(
            f.env.keys(&users[i]).await?.into_keys().collect::<Vec<_>>(),
            vec![active],
            "the leaked key is deleted"
        );
        let notes = leak_events(&f, names[i]).await?;
        assert!(notes.iter().any(|n| n.contains(request.as_str()) && n.contains(&keys[i])), "{source}: {notes:?}");
    }
    let bystander = f.ikrs.get("bystander").await?;
    assert_eq!(active_key(&bystander).as_deref(), Some(keys[3].as_str()), "a key nobody reported stays");
    queue.drained().await?;

    let metrics = http_get(&op.http, "/metrics").await?;
    for (source, matched, n) in [
        ("health", "true", 1),
        ("guardduty", "true", 1),
        ("cloudtrail", "true", 1),
        ("guardduty", "false", 1),
        ("health", "false", 1),
        ("unknown", "false", 1),
    ] {
        let line = format!("rekey_leak_events_total{{source=\"{source}\",matched=\"{matched}\"}} {n}");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    Ok(())
}

#[tokio::test]
async fn a_report_during_a_rotation_escalates_it() -> anyhow::Result<()> {
    let f = Fixture::new("leak-mid").await?;
    let queue = EventsQueue::new(&f.env, "leak-mid").await?;
    let old = adopted(&f, "app", &f.user).await?;
    let _op = Operator::start(&f.ns, &[("REKEY_AWS_EVENTS_QUEUE_URL", &queue.url)]).await?;
    wait_ikr(&f.ikrs, "app", "adopted", |o| active_key(o).as_deref() == Some(old.as_str())).await?;
    // A routine rotation soaks the old key for a day: it is the retiring key when the report comes.
    f.rotate("app", "routine").await?;
    wait_ikr(&f.ikrs, "app", "soaking", |o| phase(o) == Phase::Soaking).await?;
    let id = unique("gd");
    queue.send(&guardduty_event(&old, &f.user, &id)).await?;
    key_off(&f, &f.user, &old).await?;
    let o = rotated_once(&f.ikrs, "app").await?;
    assert_eq!(o.status.and_then(|s| s.last_emergency_request), Some(format!("guardduty:{id}:{old}")));
    assert!(!f.env.keys(&f.user).await?.contains_key(&old), "the leaked retiring key is deleted without its soak");
    queue.drained().await?;
    Ok(())
}

/// The report names the key a rotation in flight just handed over: the old key goes at once, and
/// the leaked new key is rotated away right after (before, it stayed Active until its next due time).
#[tokio::test]
async fn a_report_on_the_new_key_of_a_rotation_in_flight_rotates_it_too() -> anyhow::Result<()> {
    let f = Fixture::new("leak-new").await?;
    let queue = EventsQueue::new(&f.env, "leak-new").await?;
    let old = adopted(&f, "app", &f.user).await?;
    let _op = Operator::start(&f.ns, &[("REKEY_AWS_EVENTS_QUEUE_URL", &queue.url)]).await?;
    wait_ikr(&f.ikrs, "app", "adopted", |o| active_key(o).as_deref() == Some(old.as_str())).await?;
    f.rotate("app", "routine").await?;
    let o = wait_ikr(&f.ikrs, "app", "soaking", |o| phase(o) == Phase::Soaking).await?;
    let leaked = active_key(&o).context("new key")?;
    let id = unique("gd");
    queue.send(&guardduty_event(&leaked, &f.user, &id)).await?;
    key_off(&f, &f.user, &leaked).await?;
    leaked_new_key_rotated_away(&f, "app", &old, &leaked, &format!("guardduty:{id}:{leaked}")).await?;
    queue.drained().await?;
    Ok(())
}

#[tokio::test]
async fn the_rotating_condition_names_the_report_while_the_emergency_waits() -> anyhow::Result<()> {
    let f = Fixture::new("leak-cond").await?;
    let queue = EventsQueue::new(&f.env, "leak-cond").await?;
    let key = adopted(&f, "creds", &f.user).await?;
    // A consumer that never rolls out: the emergency waits for it, in view.
    Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(f.env.kube.clone(), &f.ns)
        .create(&PostParams::default(), &never_healthy("web")?)
        .await?;
    let _op = Operator::start(&f.ns, &[("REKEY_AWS_EVENTS_QUEUE_URL", &queue.url)]).await?;
    wait_ikr(&f.ikrs, "creds", "adopted", |o| active_key(o).as_deref() == Some(key.as_str())).await?;
    let id = unique("h");
    queue.send(&health_event(&key, &id)).await?;
    let want = format!("EMERGENCY rotation (health:AWS_RISK_CREDENTIALS_EXPOSED_{id}:{key})");
    wait_ikr(&f.ikrs, "creds", "the Rotating condition names the report", |o| {
        condition(o, "Rotating").is_some_and(|c| c.0 == "True")
            && message(o, "Rotating").is_some_and(|m| m.starts_with(&want))
    })
    .await?;
    queue.drained().await?;
    Ok(())
}

#[tokio::test]
async fn a_report_that_cannot_be_committed_is_retried_by_the_queue_then_dropped_and_counted() -> anyhow::Result<()> {
    let f = Fixture::new("leak-deny").await?;
    let queue = EventsQueue::new(&f.env, "leak-deny").await?;
    let key = f.env.create_key(&f.user).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "suspend": true})).await?;
    let status = json!({"status": {"activeKey": {"accessKeyId": key.access_key_id}}});
    f.ikrs.patch_status("app", &PatchParams::default(), &Patch::Merge(&status)).await?;
    // The shipped RBAC without `patch` on IamKeyRotations: the emergency request cannot be written.
    let name = "rekey-leak-no-patch";
    let kubeconfig = operator_identity(&f.env, name, Some(("iamkeyrotations", "patch"))).await?;
    let op = Operator::start(
        &f.ns,
        &[
            ("KUBECONFIG", kubeconfig.to_str().context("path")?),
            ("REKEY_LEASE_NAMESPACE", OPERATOR_NS),
            ("REKEY_LEASE_NAME", name),
            ("REKEY_AWS_EVENTS_QUEUE_URL", &queue.url),
        ],
    )
    .await?;
    queue.send(&guardduty_event(&key.access_key_id, &f.user, &unique("gd"))).await?;
    // Delivered again at each visibility timeout (2 s) until its 10th delivery, then dropped.
    queue.drained().await?;
    let metrics = http_get(&op.http, "/metrics").await?;
    assert!(metrics.lines().any(|l| l == "rekey_leak_events_abandoned_total 1"), "{metrics}");
    assert!(op.output()?.contains("deliveries=10"), "the 10th delivery gave up");
    let o = f.ikrs.get("app").await?;
    assert!(!o.metadata.annotations.unwrap_or_default().contains_key("rekey.dev/rotate-emergency"));
    assert_eq!(f.env.keys(&f.user).await?.get(&key.access_key_id).map(String::as_str), Some("Active"));
    Ok(())
}

/// ReceiveMessage calls answered, as the operator counts them.
async fn polls(op: &Operator) -> anyhow::Result<u64> {
    let m = http_get(&op.http, "/metrics").await?;
    let line = m.lines().find(|l| l.starts_with("rekey_aws_calls_total{operation=\"ReceiveMessage\",outcome=\"ok\"}"));
    Ok(line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0))
}

#[tokio::test]
async fn only_the_leader_polls_the_queue() -> anyhow::Result<()> {
    let f = Fixture::new("leak-lead").await?;
    let queue = EventsQueue::new(&f.env, "leak-lead").await?;
    let url = [("REKEY_AWS_EVENTS_QUEUE_URL", queue.url.as_str())];
    let ops = [Operator::start(&f.ns, &url).await?, Operator::start(&f.ns, &url).await?];
    let leader = eventually("a leader", WAIT, || async {
        for (i, op) in ops.iter().enumerate() {
            if http_get(&op.http, "/metrics").await?.lines().any(|l| l == "rekey_leader 1") {
                return Ok(Ok(i));
            }
        }
        Ok(Err("none leads yet".to_owned()))
    })
    .await?;
    queue.send(&health_event("AKIANOBODY0000000000", &unique("lead"))).await?;
    queue.drained().await?;
    assert!(polls(&ops[leader]).await? >= 1, "the leader read the queue");
    assert_eq!(polls(&ops[1 - leader]).await?, 0, "the standby never polls");
    Ok(())
}

/// Idle, the poller makes one ReceiveMessage per 20 s whatever the number of resources.
#[tokio::test]
async fn an_idle_queue_costs_one_long_poll_at_a_time() -> anyhow::Result<()> {
    let f = Fixture::new("leak-idle").await?;
    let queue = EventsQueue::new(&f.env, "leak-idle").await?;
    let op = Operator::start(&f.ns, &[("REKEY_AWS_EVENTS_QUEUE_URL", &queue.url)]).await?;
    let polls = || polls(&op);
    // The first poll returned empty after its 20 s wait; the second is then waiting.
    eventually("a first empty long poll", Duration::from_secs(60), || async {
        let n = polls().await?;
        Ok(if n >= 1 { Ok(n) } else { Err("no poll answered yet".to_owned()) })
    })
    .await?;
    let before = polls().await?;
    // A message sent now is received by the poll already waiting, not by a new one.
    queue.send(&health_event("AKIANOBODY0000000000", &unique("idle"))).await?;
    queue.drained().await?;
    let after = polls().await?;
    assert!(after <= before + 1, "one poll answered the message: {before} -> {after}");
    Ok(())
}
