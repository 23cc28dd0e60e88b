//! Killing the operator at any instant loses no access and leaks no key (docs/design.md, rules 3 and 4).
//! Built only with `--features failpoints`: the operator then exits (as if SIGKILLed) at a named
//! point, set through FAILPOINTS.
#![cfg(feature = "failpoints")]

mod support;

use std::cell::Cell;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use rekey::api::{HistoryOutcome, Phase};
use rekey_testenv::env::eventually;
use serde_json::json;
use support::*;

/// A killed leader's Lease expires in 2 s, so each restart acts soon.
const FAST_LEASE: (&str, &str) = ("REKEY_LEASE_DURATION_SECONDS", "2");
/// How long operators that each die after one status write get to finish a rotation: a few seconds
/// per status write, up to 30 s for each quiet one.
const CRASHING: Duration = Duration::from_secs(600);

async fn converged(f: &Fixture, rotations: u32) -> anyhow::Result<String> {
    let o = wait_ikr(&f.ikrs, "app", "rotation complete", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == rotations && s.phase == Phase::Idle)
    })
    .await?;
    let key = active_key(&o).context("active key")?;
    let keys = f.env.keys(&f.user).await?;
    assert_eq!(keys.into_keys().collect::<Vec<_>>(), vec![key.clone()], "exactly the active key is left");
    let secret = f.secrets.get("creds").await?;
    let get = |k: &str| secret.data.as_ref().and_then(|d| d.get(k)).map(|v| String::from_utf8_lossy(&v.0).to_string());
    let pair = rekey_testenv::creds::KeyPair {
        access_key_id: get("AWS_ACCESS_KEY_ID").context("id")?,
        secret_access_key: get("AWS_SECRET_ACCESS_KEY").context("secret")?,
    };
    assert_eq!(pair.access_key_id, key);
    assert!(f.env.caller_arn(&pair, &f.env.moto_url).await?.is_some(), "the Secret's key authenticates");
    Ok(key)
}

async fn setup(prefix: &str) -> anyhow::Result<Fixture> {
    let f = Fixture::new(prefix).await?;
    Api::<Deployment>::namespaced(f.env.kube.clone(), &f.ns)
        .create(&PostParams::default(), &deployment("web", 1, "creds")?)
        .await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "2s"}}))
        .await?;
    Ok(f)
}

#[tokio::test]
async fn a_crash_right_after_create_access_key_leaves_an_orphan_that_recovery_deletes() -> anyhow::Result<()> {
    let f = setup("orphan").await?;
    let mut op = Operator::start(&f.ns, &[("FAILPOINTS", "after-create=return"), FAST_LEASE]).await?;
    assert_eq!(op.exited(WAIT).await?, Some(137), "the failpoint ended the process");
    // The key exists in IAM, nobody has it, and status only has the write-ahead marker.
    assert_eq!(f.env.keys(&f.user).await?.len(), 1);
    let o = f.ikrs.get("app").await?;
    assert!(o.status.as_ref().and_then(|s| s.pending.as_ref()).is_some(), "pending marker committed");
    let _op = Operator::start(&f.ns, &[FAST_LEASE]).await?;
    let key = converged_bootstrap(&f).await?;
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(f.env.kube.clone(), &f.ns)
        .list(&Default::default())
        .await?;
    assert!(events.items.iter().any(|e| e.reason.as_deref() == Some("OrphanDeleted")), "orphan reported");
    assert!(!key.is_empty());
    Ok(())
}

async fn converged_bootstrap(f: &Fixture) -> anyhow::Result<String> {
    let o =
        wait_ikr(&f.ikrs, "app", "bootstrap complete", |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    let key = active_key(&o).context("active key")?;
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), vec![key.clone()]);
    Ok(key)
}

#[tokio::test]
async fn killed_after_every_status_write_a_rotation_still_completes() -> anyhow::Result<()> {
    let f = setup("boundary").await?;
    let _op = Operator::start(&f.ns, &[FAST_LEASE]).await?;
    converged_bootstrap(&f).await?;
    drop(_op);
    f.ikrs
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {"rekey.dev/rotate": "1"}}})),
        )
        .await?;
    // Each operator process commits one status write and dies right after it: a crash after every
    // phase boundary of the rotation.
    let kills = Cell::new(0);
    let crashing = eventually("the rotation done by operators dying after each status write", CRASHING, || async {
        let s = f.ikrs.get("app").await?.status.unwrap_or_default();
        if s.rotations == 1 && s.phase == Phase::Idle {
            return Ok(Ok(()));
        }
        let mut op = Operator::start(&f.ns, &[("FAILPOINTS", "after-status=return"), FAST_LEASE]).await?;
        match op.exited(Duration::from_secs(30)).await {
            Ok(Some(137)) => kills.set(kills.get() + 1),
            // Quiet (waiting on a rollout or the soak): no status write to die at.
            _ => op.kill().await?,
        }
        Ok(Err(format!("phase {:?}, rotations {}", s.phase, s.rotations)))
    })
    .await;
    // Not fatal: the kill count and the healthy operator's convergence below are what this test
    // asserts, so running out of time here only ends the crashes.
    if let Err(e) = crashing {
        eprintln!("{e:#}");
    }
    let kills = kills.get();
    eprintln!("operator killed after {kills} status writes");
    // A rotation's status writes: the marker before CreateAccessKey, the end of the steps up to the
    // restart, the deactivation, the deletion (steps chain between them; more writes come from
    // conditions changing while it waits).
    assert!(kills >= 4, "the operator died at {kills} phase boundaries");
    let _op = Operator::start(&f.ns, &[FAST_LEASE]).await?;
    converged(&f, 1).await?;
    Ok(())
}

#[tokio::test]
async fn sigterm_lets_the_step_in_flight_finish_and_exits_cleanly() -> anyhow::Result<()> {
    let f = setup("sigterm").await?;
    let op = Operator::start(&f.ns, &[FAST_LEASE]).await?;
    let old = converged_bootstrap(&f).await?;
    drop(op);
    let mut op = Operator::start(&f.ns, &[("FAILPOINTS", "before-deactivate=return(pause:3000)"), FAST_LEASE]).await?;
    let rotate = json!({"metadata": {"annotations": {"rekey.dev/rotate": "1"}}});
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&rotate)).await?;
    // The deactivation step has started (its fresh key listing is done) and is paused: terminate now.
    op.logged("failpoint hit: pausing").await?;
    op.terminate().await?;
    assert_eq!(op.exited(WAIT).await?, Some(0), "a clean exit after the step, not a kill");
    // The step finished: the old key is Inactive in IAM and the status says so.
    assert_eq!(f.env.keys(&f.user).await?.get(&old).map(String::as_str), Some("Inactive"));
    let o = f.ikrs.get("app").await?;
    let retiring = o.status.as_ref().and_then(|s| s.retiring_key.as_ref()).context("retiring key")?;
    assert_eq!(retiring.access_key_id, old);
    assert!(retiring.deactivated_at.is_some(), "the status recorded the deactivation");
    let log = op.output()?;
    assert!(!log.contains("failpoint hit: exiting"), "{log}");
    let _op = Operator::start(&f.ns, &[FAST_LEASE]).await?;
    converged(&f, 1).await?;
    Ok(())
}

#[tokio::test]
async fn deleting_a_resource_whose_create_was_interrupted_deletes_the_orphan_and_keeps_the_rest() -> anyhow::Result<()>
{
    let f = Fixture::new("delorphan").await?;
    let key = f.env.create_key(&f.user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &key)?).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "deletionPolicy": "Retain"})).await?;
    let op = Operator::start(&f.ns, &[FAST_LEASE]).await?;
    wait_ikr(&f.ikrs, "app", "adopted", |o| is_true(o, "Ready", "KeyInPlace")).await?;
    drop(op);
    let before = f.env.keys(&f.user).await?;
    let mut op = Operator::start(&f.ns, &[("FAILPOINTS", "after-create=return"), FAST_LEASE]).await?;
    f.rotate("app", "1").await?;
    assert_eq!(op.exited(WAIT).await?, Some(137), "the failpoint ended the process");
    // The new key exists in IAM, nobody has it, and status only has the write-ahead marker.
    let after_crash = f.env.keys(&f.user).await?;
    let orphan = after_crash.keys().find(|k| !before.contains_key(*k)).cloned().context("the orphan")?;
    let o = f.ikrs.get("app").await?;
    let pending = o.status.as_ref().and_then(|s| s.pending.as_ref()).context("pending marker")?;
    assert!(pending.in_flight, "the create may have taken effect");
    f.ikrs.delete("app", &DeleteParams::default()).await?;
    let _op = Operator::start(&f.ns, &[FAST_LEASE]).await?;
    f.gone("app").await?;
    assert_eq!(f.env.keys(&f.user).await?, before, "the orphan {orphan} was deleted, the key in use retained");
    let secret = f.secrets.get("creds").await?;
    let held = secret.data.as_ref().and_then(|d| d.get("AWS_ACCESS_KEY_ID")).map(|v| v.0.clone());
    assert_eq!(held, Some(key.access_key_id.clone().into_bytes()), "the Secret is retained");
    assert_eq!(f.claim(&key.access_key_id).await?, None, "Retain released the claim");
    // Events are written off the step's path (src/events.rs): the report may follow the deletion.
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(f.env.kube.clone(), &f.ns);
    eventually("the deletion reports the orphan", WAIT, || async {
        let items = events.list(&Default::default()).await?.items;
        let deleted = items.iter().filter(|e| e.reason.as_deref() == Some("Deleted")).filter_map(|e| e.note.clone());
        let notes: Vec<String> = deleted.collect();
        Ok(if notes.iter().any(|n| n.contains(&orphan)) { Ok(()) } else { Err(format!("Deleted Events: {notes:?}")) })
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_crash_between_committing_a_leak_report_and_deleting_it_rotates_once() -> anyhow::Result<()> {
    let f = Fixture::new("leak-crash").await?;
    let queue = EventsQueue::new(&f.env, "leak-crash").await?;
    let leaked = f.env.create_key(&f.user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &leaked)?).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "24h"}}))
        .await?;
    let url = ("REKEY_AWS_EVENTS_QUEUE_URL", queue.url.as_str());
    let mut op = Operator::start(&f.ns, &[url, ("FAILPOINTS", "leak-before-delete=return"), FAST_LEASE]).await?;
    wait_ikr(&f.ikrs, "app", "adopted", |o| active_key(o).as_deref() == Some(leaked.access_key_id.as_str())).await?;
    let id = rekey_testenv::env::unique("gd");
    queue.send(&guardduty_event(&leaked.access_key_id, &f.user, &id)).await?;
    assert_eq!(op.exited(WAIT).await?, Some(137), "the failpoint ended the process");
    // Committed, not deleted: the request is on the resource and the report still in the queue.
    let request = format!("guardduty:{id}:{}", leaked.access_key_id);
    let o = f.ikrs.get("app").await?;
    let annotation = o.metadata.annotations.as_ref().and_then(|a| a.get("rekey.dev/rotate-emergency"));
    assert_eq!(annotation, Some(&request));
    assert_eq!(queue.in_queue().await?, 1, "the report is still queued");

    let op = Operator::start(&f.ns, &[url, FAST_LEASE]).await?;
    // The report comes back after the visibility timeout; the new leader finds it committed.
    queue.drained().await?;
    let key = converged(&f, 1).await?;
    assert_ne!(key, leaked.access_key_id);
    let st = f.ikrs.get("app").await?.status.context("status")?;
    assert_eq!((st.last_emergency_request.as_ref(), st.history.len()), (Some(&request), 1), "one rotation");
    let metrics = rekey_testenv::env::http_get(&op.http, "/metrics").await?;
    let seen: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("rekey_leak_events_total{source=\"guardduty\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(seen, 1, "the redelivered report was read once more, and deleted");
    Ok(())
}

/// A report names the new key while it is verified, before any Secret holds it (status.newKey;
/// with real IAM a new key takes seconds to authenticate, so Verifying lasts: here IAM is made to
/// reject it): rekey deletes the leaked key, which nobody has, counts the report as answered, and
/// rotates again. The old key is never retired as an emergency and no pod restarts onto the
/// leaked key. Before, the report matched nobody and the leaked key became the active one.
#[tokio::test]
async fn a_report_on_a_new_key_in_no_secret_yet_deletes_it_and_the_rotation_starts_over() -> anyhow::Result<()> {
    let f = Fixture::new("leak-pending").await?;
    let queue = EventsQueue::new(&f.env, "leak-pending").await?;
    let old = f.env.create_key(&f.user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &old)?).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "0s"}}))
        .await?;
    let old = old.access_key_id;
    let url = ("REKEY_AWS_EVENTS_QUEUE_URL", queue.url.as_str());
    let mut op = Operator::start(&f.ns, &[url, ("FAILPOINTS", "verify-rejected=return"), FAST_LEASE]).await?;
    wait_ikr(&f.ikrs, "app", "adopted", |o| active_key(o).as_deref() == Some(old.as_str())).await?;
    f.rotate("app", "routine").await?;
    let o = wait_ikr(&f.ikrs, "app", "verifying", |o| {
        phase(o) == Phase::Verifying && o.status.as_ref().is_some_and(|s| s.new_key.is_some())
    })
    .await?;
    let leaked = o.status.and_then(|s| s.new_key).context("status.newKey")?.access_key_id;
    let id = rekey_testenv::env::unique("gd");
    queue.send(&guardduty_event(&leaked, &f.user, &id)).await?;
    let request = format!("guardduty:{id}:{leaked}");
    let o = wait_ikr(&f.ikrs, "app", "the leaked key given up", |o| {
        o.status.as_ref().is_some_and(|s| s.history.iter().any(|h| h.outcome == HistoryOutcome::Abandoned))
    })
    .await?;
    assert!(is_true(&o, "Degraded", "NewKeyLeaked"), "{:?}", o.status.map(|s| s.conditions));
    assert!(!f.env.keys(&f.user).await?.contains_key(&leaked), "the leaked key is deleted");
    queue.drained().await?;
    op.kill().await?;

    // IAM accepts new keys again: the rotation starts over and completes, with no second rotation.
    let _op = Operator::start(&f.ns, &[url, FAST_LEASE]).await?;
    let o = wait_ikr(&f.ikrs, "app", "rotated", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await?;
    let keys = f.env.keys(&f.user).await?;
    assert!(!keys.contains_key(&old) && !keys.contains_key(&leaked), "both keys are gone: {keys:?}");
    let now = active_key(&o).context("active key")?;
    assert_eq!(keys.get(&now).map(String::as_str), Some("Active"));
    let st = o.status.context("status")?;
    assert_eq!(st.last_emergency_request, Some(request), "the report is answered");
    let outcomes: Vec<_> = st.history.iter().map(|h| (h.outcome, h.new_key_id.clone())).collect();
    assert_eq!(
        outcomes,
        [(HistoryOutcome::Abandoned, Some(leaked)), (HistoryOutcome::Completed, Some(now.clone()))],
        "the leaked key was given up, the next one completed"
    );
    let held = f.secrets.get("creds").await?.data.and_then(|d| d.get("AWS_ACCESS_KEY_ID").cloned());
    assert_eq!(held.map(|v| v.0), Some(now.into_bytes()));
    Ok(())
}

/// A report names the new key while it is being written into the Secrets (Distributing: a Secret
/// may have held it already and been reverted since, so it is not deleted): the operator cannot
/// write the Secret (held at the write, then its `patch` on Secrets revoked), answers the report,
/// and is killed. The next one ends the rotation at once and rotates the leaked key away right
/// after. Before, the report matched nobody (or the escalation used it up) and the leaked key
/// became the active one.
#[tokio::test]
async fn a_report_on_a_new_key_being_distributed_rotates_it_after_the_handover() -> anyhow::Result<()> {
    let f = Fixture::new("leak-pending").await?;
    let queue = EventsQueue::new(&f.env, "leak-pending").await?;
    let old = f.env.create_key(&f.user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &old)?).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "24h"}}))
        .await?;
    let old = old.access_key_id;
    let name = "rekey-leak-pending";
    let kubeconfig = operator_identity(&f.env, name, None).await?;
    let url = ("REKEY_AWS_EVENTS_QUEUE_URL", queue.url.as_str());
    let env = [
        ("KUBECONFIG", kubeconfig.to_str().context("path")?),
        ("REKEY_LEASE_NAMESPACE", OPERATOR_NS),
        ("REKEY_LEASE_NAME", name),
        ("FAILPOINTS", "before-distribute=return(pause:10000)"),
        url,
        FAST_LEASE,
    ];
    let mut op = Operator::start(&f.ns, &env).await?;
    wait_ikr(&f.ikrs, "app", "adopted", |o| active_key(o).as_deref() == Some(old.as_str())).await?;
    f.rotate("app", "routine").await?;
    op.logged("failpoint hit: pausing").await?;
    operator_identity(&f.env, name, Some(("secrets", "patch"))).await?;
    let o = wait_ikr(&f.ikrs, "app", "a refused write", |o| {
        o.status.as_ref().is_some_and(|s| s.new_key.is_some() && s.failed_attempts > 0)
    })
    .await?;
    assert_eq!(phase(&o), Phase::Distributing);
    let leaked = o.status.and_then(|s| s.new_key).context("status.newKey")?.access_key_id;
    let id = rekey_testenv::env::unique("gd");
    queue.send(&guardduty_event(&leaked, &f.user, &id)).await?;
    let request = format!("guardduty:{id}:{leaked}");
    wait_ikr(&f.ikrs, "app", "the emergency requested", |o| {
        o.metadata.annotations.as_ref().and_then(|a| a.get("rekey.dev/rotate-emergency")) == Some(&request)
    })
    .await?;
    queue.drained().await?;
    op.kill().await?;

    let _op = Operator::start(&f.ns, &[url, FAST_LEASE]).await?;
    leaked_new_key_rotated_away(&f, "app", &old, &leaked, &request).await
}
