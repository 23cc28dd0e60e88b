//! Leak response: AWS's reports of a leaked key (AWS Health, GuardDuty, the quarantine policy
//! attached), sent to a real SQS queue in the documented EventBridge shapes, start an emergency
//! rotation of the resource holding the key; what rekey cannot act on changes nothing and leaves
//! the queue. (The crash between commit and delete: tests/crash.rs.) An emergency switches the
//! leaked key off only once no pod of the old template holds it (at spec.emergency.maxWait at the
//! latest), unless spec.emergency.switchOff says Immediately; a report on a rotation's new key
//! leaves the old key to the routine gates; a parked emergency goes on.

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use rekey::api::{IamKeyRotation, Phase};
use rekey_testenv::env::{eventually, http_get, unique};
use serde_json::json;
use support::*;

/// A resource that adopted a key of `user` (its own Secret `name`), with a day-long soak that an
/// emergency skips: the key id.
async fn adopted(f: &Fixture, name: &str, user: &str) -> anyhow::Result<String> {
    adopted_with(f, name, user, json!({})).await
}

/// `adopted`, with the spec fields of `extra` on top.
async fn adopted_with(f: &Fixture, name: &str, user: &str, extra: serde_json::Value) -> anyhow::Result<String> {
    let key = f.env.create_key(user).await?;
    f.secrets.create(&PostParams::default(), &key_secret(name, &key)?).await?;
    let mut spec = json!({"userName": user, "secrets": [{"name": name}], "retirement": {"deleteAfter": "24h"}});
    for (k, v) in extra.as_object().context("spec fields")? {
        spec[k] = v.clone();
    }
    f.create(name, spec).await?;
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

/// Requests an emergency rotation of `name` by hand (`rekey rotate --emergency`), or as a leak
/// report does (`<source>:<event id>:<key id>`).
async fn request_emergency(f: &Fixture, name: &str, value: &str) -> anyhow::Result<()> {
    let patch = json!({"metadata": {"annotations": {"rekey.dev/rotate-emergency": value}}});
    f.ikrs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// The uids of the pods labelled app=`app`.
async fn pod_uids(f: &Fixture, app: &str) -> anyhow::Result<BTreeSet<String>> {
    let pods: Api<Pod> = Api::namespaced(f.env.kube.clone(), &f.ns);
    let list = pods.list(&ListParams::default().labels(&format!("app={app}"))).await?;
    Ok(list.items.into_iter().filter_map(|p| p.metadata.uid).collect())
}

/// Samples, in the background, the leaked key's state in IAM and then the pods of `old_pods`
/// (uids): every pod seen after the key stopped being Active (IAM is read first, so the pod was
/// there after the key went), and how long after the last of them was gone the key was seen off.
/// (pods seen after the key went off, when the last old pod was gone, when the key was seen off)
type Sightings = (Vec<String>, Option<Instant>, Option<Instant>);

struct Exposure {
    seen: Arc<Mutex<Sightings>>,
    task: tokio::task::JoinHandle<()>,
}

impl Exposure {
    fn start(f: &Fixture, key: &str, old_pods: BTreeSet<String>) -> Self {
        let pods: Api<Pod> = Api::namespaced(f.env.kube.clone(), &f.ns);
        let (env, user, key) = (f.env.clone(), f.user.clone(), key.to_owned());
        let seen = Arc::new(Mutex::new((Vec::new(), None, None)));
        let out = seen.clone();
        let task = tokio::spawn(async move {
            // Samples until stop(), for as long as the test watches; not a wait, so not `eventually`.
            loop {
                if let Ok(keys) = env.keys(&user).await
                    && let Ok(list) = pods.list(&Default::default()).await
                    && let Ok(mut v) = out.lock()
                {
                    let now = Instant::now();
                    let off = keys.get(&key).map(String::as_str) != Some("Active");
                    let left: Vec<String> = list
                        .items
                        .iter()
                        .filter(|p| p.metadata.uid.as_ref().is_some_and(|u| old_pods.contains(u)))
                        .filter_map(|p| p.metadata.name.clone())
                        .collect();
                    if left.is_empty() && v.1.is_none() {
                        v.1 = Some(now);
                    }
                    if off && v.2.is_none() {
                        v.2 = Some(now);
                    }
                    if off {
                        v.0.extend(left.into_iter().map(|p| format!("{p} still there with key {key} off")));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { seen, task }
    }

    /// Stops sampling: the old pods seen with the key off, and the time from the last of them gone
    /// to the key seen off (None if either was not seen).
    fn stop(self) -> (Vec<String>, Option<Duration>) {
        self.task.abort();
        let v = self.seen.lock().map(|v| v.clone()).unwrap_or_default();
        let lag = match (v.1, v.2) {
            (Some(gone), Some(off)) => Some(off.saturating_duration_since(gone)),
            _ => None,
        };
        (v.0, lag)
    }
}

/// The reasons of the Events on resource `name`, oldest first.
async fn event_reasons(f: &Fixture, name: &str) -> anyhow::Result<Vec<String>> {
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(f.env.kube.clone(), &f.ns);
    let mut items: Vec<_> = events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect();
    items.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    Ok(items.into_iter().filter_map(|e| e.reason).collect())
}

/// Pauses (or resumes) Deployment `web`'s rollouts.
async fn set_paused(f: &Fixture, paused: bool) -> anyhow::Result<()> {
    let deploys: Api<Deployment> = Api::namespaced(f.env.kube.clone(), &f.ns);
    deploys.patch("web", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"paused": paused}}))).await?;
    Ok(())
}

/// A 2-replica Deployment `web` reading Secret "creds" (paused once Ready: its rollout hangs), resource
/// "creds" (with `extra`) adopting the key in it, the operator running and `web` Ready: the key,
/// the operator, and the uids of web's pods.
async fn web_on_adopted_key(
    f: &Fixture,
    paused: bool,
    extra: serde_json::Value,
) -> anyhow::Result<(String, Operator, BTreeSet<String>)> {
    let deploys: Api<Deployment> = Api::namespaced(f.env.kube.clone(), &f.ns);
    let key = adopted_with(f, "creds", &f.user, extra).await?;
    deploys.create(&PostParams::default(), &deployment("web", 2, "creds")?).await?;
    let op = f.operator().await?;
    wait_ikr(&f.ikrs, "creds", "adopted", |o| active_key(o).as_deref() == Some(key.as_str())).await?;
    deployment_ready(&deploys, "web", WAIT).await?;
    if paused {
        set_paused(f, true).await?;
    }
    let pods = pod_uids(f, "web").await?;
    anyhow::ensure!(pods.len() == 2, "two pods of web: {pods:?}");
    Ok((key, op, pods))
}

/// The kubelet that keeps a pod Ready only while its key authenticates: through an emergency no pod
/// of the 2-replica Deployment loses Ready, the leaked key stays Active until the new pods are
/// Ready and the old ones gone, then is switched off (Inactive) and deleted. (Before: switched off
/// at the handover, both old pods NotReady until replaced.)
#[tokio::test]
async fn an_emergency_switches_the_leaked_key_off_once_no_pod_of_the_old_template_is_left() -> anyhow::Result<()> {
    let f = Fixture::new("leak-roll").await?;
    let (leaked, _op, old_pods) = web_on_adopted_key(&f, false, json!({})).await?;
    let breaks = KeyBreakWatch::start(&f.env, &f.ns);
    let exposure = Exposure::start(&f, &leaked, old_pods);
    request_emergency(&f, "creds", "leaked-1").await?;
    let o = rotated_once(&f.ikrs, "creds").await?;
    let (seen, lag) = exposure.stop();
    let broken = breaks.stop();
    assert!(broken.is_empty(), "pods lost access during the emergency: {broken:?}");
    assert!(seen.is_empty(), "the leaked key went while pods of the old template ran: {seen:?}");
    println!("last old pod gone -> leaked key off: {lag:?}");
    let keys = f.env.keys(&f.user).await?;
    assert!(!keys.contains_key(&leaked), "the leaked key is deleted: {keys:?}");
    assert_eq!(keys.get(&active_key(&o).context("active key")?).map(String::as_str), Some("Active"));
    let reasons = event_reasons(&f, "creds").await?;
    let at = |r: &str| reasons.iter().position(|x| x == r);
    assert!(at("Deactivated").is_some() && at("Deactivated") < at("Deleted"), "Inactive, then deleted: {reasons:?}");
    Ok(())
}

/// A rollout that hangs (a paused Deployment) holds the leaked key at most spec.emergency.maxWait:
/// the Rotating condition says until when, the key stays Active until then, and goes then.
#[tokio::test]
async fn a_hanging_rollout_holds_the_leaked_key_until_max_wait_at_most() -> anyhow::Result<()> {
    let f = Fixture::new("leak-wait").await?;
    let (leaked, _op, old_pods) = web_on_adopted_key(&f, true, json!({"emergency": {"maxWait": "20s"}})).await?;
    request_emergency(&f, "creds", "leaked-2").await?;
    let o = wait_ikr(&f.ikrs, "creds", "the emergency waiting, in view", |o| {
        message(o, "Rotating").is_some_and(|m| m.contains("at the latest (spec.emergency.maxWait 20s)"))
    })
    .await?;
    let m = message(&o, "Rotating").unwrap_or_default();
    let by: k8s_openapi::jiff::Timestamp =
        m.split(", at ").nth(1).and_then(|r| r.split(' ').next()).context("the deadline")?.parse()?;
    assert!(m.starts_with("EMERGENCY rotation (leaked-2) in phase RollingOut"), "{m}");
    assert_eq!(f.env.keys(&f.user).await?.get(&leaked).map(String::as_str), Some("Active"), "{m}");
    key_off(&f, &f.user, &leaked).await?;
    let now = k8s_openapi::jiff::Timestamp::now();
    assert!(now >= by, "switched off at {now}, before the deadline {by}");
    assert_eq!(pod_uids(&f, "web").await?, old_pods, "the rollout hung: the old pods are still there");
    // The rollout resumes: the rotation ends.
    set_paused(&f, false).await?;
    rotated_once(&f.ikrs, "creds").await?;
    assert!(!f.env.keys(&f.user).await?.contains_key(&leaked));
    Ok(())
}

/// spec.emergency.switchOff: Immediately keeps exposure first: the leaked key goes at the handover
/// while the pods of the old template still run on it (they lose Ready), as before.
#[tokio::test]
async fn switch_off_immediately_switches_the_leaked_key_off_at_the_handover() -> anyhow::Result<()> {
    let f = Fixture::new("leak-now").await?;
    let (leaked, _op, old_pods) =
        web_on_adopted_key(&f, true, json!({"emergency": {"switchOff": "Immediately"}})).await?;
    request_emergency(&f, "creds", "leaked-3").await?;
    key_off(&f, &f.user, &leaked).await?;
    assert_eq!(pod_uids(&f, "web").await?, old_pods, "the old pods are still there (paused rollout)");
    // The price of Immediately: the kubelet takes both old pods out of service on the leaked key.
    eventually("the old pods NotReady on the leaked key", WAIT, || async {
        let pods: Api<Pod> = Api::namespaced(f.env.kube.clone(), &f.ns);
        let list = pods.list(&ListParams::default().labels("app=web")).await?.items;
        let broken = list
            .iter()
            .filter(|p| {
                let conds = p.status.as_ref().and_then(|s| s.conditions.as_ref());
                conds.is_some_and(|c| {
                    c.iter().any(|c| {
                        c.type_ == "Ready"
                            && c.status == "False"
                            && c.message.as_deref().is_some_and(|m| m.contains(&format!("access key {leaked}")))
                    })
                })
            })
            .count();
        Ok(if broken == 2 { Ok(()) } else { Err(format!("{broken} of 2 NotReady on {leaked}")) })
    })
    .await?;
    set_paused(&f, false).await?;
    rotated_once(&f.ikrs, "creds").await?;
    assert!(!f.env.keys(&f.user).await?.contains_key(&leaked));
    Ok(())
}

/// A leak report on the new key of a rotation whose old key a bare ReplicaSet's pod still uses
/// (`Degraded/UncoveredConsumers`): the healthy old key stays Active and the pod keeps access until
/// the consumer is gone; then the rotation ends without its soak and the leaked new key is rotated
/// away. (Before: the rotation escalated and the old key was switched off under the pod at once.)
#[tokio::test]
async fn a_report_on_the_new_key_never_switches_the_old_key_off_early() -> anyhow::Result<()> {
    let f = Fixture::new("leak-early").await?;
    let old = adopted(&f, "creds", &f.user).await?;
    let rss: Api<ReplicaSet> = Api::namespaced(f.env.kube.clone(), &f.ns);
    rss.create(&PostParams::default(), &bare_replicaset("legacy", 1, "creds")?).await?;
    let _op = f.operator().await?;
    wait_ikr(&f.ikrs, "creds", "adopted", |o| active_key(o).as_deref() == Some(old.as_str())).await?;
    eventually("legacy running", WAIT, || async {
        let n = pod_uids(&f, "legacy").await?.len();
        Ok(if n == 1 { Ok(()) } else { Err(format!("{n} pods")) })
    })
    .await?;
    let breaks = KeyBreakWatch::start(&f.env, &f.ns);
    f.rotate("creds", "routine").await?;
    let o = wait_ikr(&f.ikrs, "creds", "Degraded/UncoveredConsumers", |o| is_true(o, "Degraded", "UncoveredConsumers"))
        .await?;
    let leaked = active_key(&o).context("the new key")?;
    let request = format!("guardduty:{}:{leaked}", unique("gd"));
    request_emergency(&f, "creds", &request).await?;
    wait_ikr(&f.ikrs, "creds", "the report in view, the census still holding", |o| {
        is_true(o, "Degraded", "UncoveredConsumers")
            && message(o, "Degraded")
                .is_some_and(|m| m.contains(&format!("the new key was reported leaked ({request})")))
    })
    .await?;
    let o = f.ikrs.get("creds").await?;
    assert!(!o.status.as_ref().is_some_and(|s| s.emergency()), "not an emergency of the old key");
    assert_eq!(f.env.keys(&f.user).await?.get(&old).map(String::as_str), Some("Active"), "the old key stays");
    let broken = breaks.stop();
    assert!(broken.is_empty(), "pods lost access: {broken:?}");
    // The person removes the stray ReplicaSet: the old key goes (no day-long soak), then the leaked one.
    rss.delete("legacy", &DeleteParams::background()).await?;
    leaked_new_key_rotated_away(&f, "creds", &old, &leaked, &request).await
}

/// A rotation parked after its old key was reactivated (`Stalled/ParkedAfterRollback`) whose old
/// key is then reported leaked goes on: the leaked key is switched off and deleted. (Before: it
/// stayed parked, the leaked key Active, until a person set rekey.dev/retire.)
#[tokio::test]
async fn a_parked_rotation_whose_old_key_leaks_switches_it_off() -> anyhow::Result<()> {
    let f = Fixture::new("leak-park").await?;
    let old = adopted_with(&f, "creds", &f.user, json!({"retirement": {"deleteAfter": "1m"}})).await?;
    let _op = f.operator().await?;
    wait_ikr(&f.ikrs, "creds", "adopted", |o| active_key(o).as_deref() == Some(old.as_str())).await?;
    f.rotate("creds", "routine").await?;
    wait_ikr(&f.ikrs, "creds", "soaking", |o| phase(o) == Phase::Soaking).await?;
    // A person reactivates the old key to rescue a consumer: rekey parks instead of deleting it.
    f.env.set_key_status(&f.user, &old, true).await?;
    wait_ikr(&f.ikrs, "creds", "Stalled/ParkedAfterRollback", |o| is_true(o, "Stalled", "ParkedAfterRollback")).await?;
    let request = format!("guardduty:{}:{old}", unique("gd"));
    request_emergency(&f, "creds", &request).await?;
    key_off(&f, &f.user, &old).await?;
    let o = rotated_once(&f.ikrs, "creds").await?;
    assert!(!f.env.keys(&f.user).await?.contains_key(&old), "the leaked key is deleted");
    assert_eq!(o.status.and_then(|s| s.last_emergency_request), Some(request));
    Ok(())
}
