//! Who else holds the key: pods rekey does not restart (a bare ReplicaSet's, a Job's, a Deployment
//! selecting by expressions), and a Secret another writer reverts after the handover; each as a
//! user would meet it, on the real control plane, moto and the simulated kubelet.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use rekey::api::{IamKeyRotation, Phase};
use rekey_testenv::creds::KeyPair;
use rekey_testenv::env::{TestEnv, eventually};
use serde_json::json;
use support::*;

fn annotate(key: &str, v: &str) -> serde_json::Value {
    json!({"metadata": {"annotations": {key: v}}})
}

/// The retirement of the tests that only need it to go on: at once, with a short soak.
fn quick() -> serde_json::Value {
    json!({"retirement": {"deactivateAfter": "0s", "deleteAfter": "5s"}})
}

/// Prints the operator's log when the test fails (an error or a panic): the reason is usually there.
struct LogOnFailure {
    path: PathBuf,
    passed: bool,
}

impl LogOnFailure {
    fn new(ns: &str) -> Self {
        Self { path: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("operator-{ns}.log")), passed: false }
    }

    fn passed(mut self) {
        self.passed = true;
    }
}

impl Drop for LogOnFailure {
    fn drop(&mut self) {
        if self.passed {
            return;
        }
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(150)..].join("\n");
        eprintln!("--- operator log {} (last 150 lines) ---\n{tail}\n--- end of operator log ---", self.path.display());
    }
}

/// Secret "creds" holding a key made before rekey, Deployment `d` reading it, resource "app" (the
/// base spec plus `extra`) adopting that key, the operator running and `d` Ready.
async fn adopted(f: &Fixture, d: Deployment, extra: serde_json::Value) -> anyhow::Result<(KeyPair, Operator)> {
    let old = f.env.create_key(&f.user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &old)?).await?;
    let deploys: Api<Deployment> = Api::namespaced(f.env.kube.clone(), &f.ns);
    let name = d.metadata.name.clone().context("Deployment name")?;
    deploys.create(&PostParams::default(), &d).await?;
    let mut spec = json!({"userName": f.user, "secrets": [{"name": "creds"}]});
    for (k, v) in extra.as_object().context("spec fields")? {
        spec[k] = v.clone();
    }
    f.create("app", spec).await?;
    let op = f.operator().await?;
    let id = old.access_key_id.clone();
    wait_ikr(&f.ikrs, "app", "adopted", |o| active_key(o).as_deref() == Some(id.as_str())).await?;
    deployment_ready(&deploys, &name, WAIT).await?;
    Ok((old, op))
}

async fn rotate(f: &Fixture) -> anyhow::Result<()> {
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&annotate("rekey.dev/rotate", "1"))).await?;
    Ok(())
}

/// Waits until the requested rotation is complete.
async fn rotated(f: &Fixture) -> anyhow::Result<IamKeyRotation> {
    wait_ikr(&f.ikrs, "app", "rotation complete", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await
}

/// The IAM status of `key` ("Active", "Inactive"), None once deleted.
async fn key_status(f: &Fixture, key: &str) -> anyhow::Result<Option<String>> {
    Ok(f.env.keys(&f.user).await?.get(key).cloned())
}

fn reverts(o: &IamKeyRotation) -> u32 {
    o.status.as_ref().and_then(|s| s.rotation.as_ref()).map_or(0, |r| r.reverts)
}

async fn pods(f: &Fixture, app: &str) -> anyhow::Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(f.env.kube.clone(), &f.ns);
    Ok(api.list(&ListParams::default().labels(&format!("app={app}"))).await?.items)
}

fn ready(p: &Pod) -> bool {
    let conds = p.status.as_ref().and_then(|s| s.conditions.as_ref());
    conds.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until `n` pods labelled app=`app` run Ready; their names.
async fn running_pods(f: &Fixture, app: &str, n: usize) -> anyhow::Result<Vec<String>> {
    eventually(&format!("{n} pod(s) of {app} Ready"), WAIT, || async {
        let list = pods(f, app).await?;
        let names: Vec<String> = list.iter().filter(|p| ready(p)).filter_map(|p| p.metadata.name.clone()).collect();
        Ok(if names.len() == n && list.len() == n {
            Ok(names)
        } else {
            Err(format!("{} pods, {names:?} Ready", list.len()))
        })
    })
    .await
}

/// What a Helm upgrade does to a Secret its chart renders: its own (old) key back into the data,
/// under its field manager (Helm 3 writes with a merge patch as manager "helm").
async fn helm_writes(secrets: &Api<Secret>, name: &str, key: &KeyPair) -> anyhow::Result<()> {
    let data = json!({"data": {
        "AWS_ACCESS_KEY_ID": ByteString(key.access_key_id.clone().into_bytes()),
        "AWS_SECRET_ACCESS_KEY": ByteString(key.secret_access_key.clone().into_bytes()),
    }});
    let pp = PatchParams { field_manager: Some("helm".into()), ..Default::default() };
    secrets.patch(name, &pp, &Patch::Merge(&data)).await?;
    Ok(())
}

/// A Job whose one pod reads `secret` and, under the simulated kubelet, succeeds `seconds` after
/// it started (annotation sim.rekey.dev/exit-after-seconds).
fn job(name: &str, secret: &str, seconds: u32) -> anyhow::Result<Job> {
    Ok(serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"backoffLimit": 0, "template": {
        "metadata": {"labels": {"app": name}, "annotations": {"sim.rekey.dev/exit-after-seconds": seconds.to_string()}},
        "spec": {"restartPolicy": "Never", "containers": [
            {"name": "report", "image": "report:1", "envFrom": [{"secretRef": {"name": secret}}]}]}}}}))?)
}

/// Records, in the background, every pod of `old_pods` (uids) still present after `key` stopped
/// being Active. IAM is read before the pods, so a pod seen in a sample was there after the key
/// went, whatever happened between the two reads.
struct RetiredUnder {
    seen: Arc<Mutex<BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RetiredUnder {
    fn start(env: &TestEnv, ns: &str, user: &str, key: &str, old_pods: BTreeSet<String>) -> Self {
        let pods: Api<Pod> = Api::namespaced(env.kube.clone(), ns);
        let (env, user, key) = (env.clone(), user.to_owned(), key.to_owned());
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let out = seen.clone();
        let task = tokio::spawn(async move {
            // Samples until stop(), for as long as the test watches; not a wait, so not `eventually`.
            loop {
                if let Ok(keys) = env.keys(&user).await
                    && let Some(state) = keys.get(&key).map_or(Some("deleted"), |s| (s != "Active").then_some(s))
                    && let Ok(list) = pods.list(&Default::default()).await
                {
                    for p in list.items.iter().filter(|p| p.metadata.uid.as_ref().is_some_and(|u| old_pods.contains(u)))
                    {
                        let name = p.metadata.name.clone().unwrap_or_default();
                        if let Ok(mut v) = out.lock() {
                            v.insert(format!("{name} still there with key {key} {state}"));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Self { seen, task }
    }

    fn stop(self) -> Vec<String> {
        self.task.abort();
        self.seen.lock().map(|v| v.iter().cloned().collect()).unwrap_or_default()
    }
}

#[tokio::test]
async fn a_bare_replicaset_reading_the_secret_keeps_the_old_key_active() -> anyhow::Result<()> {
    let f = Fixture::new("barers").await?;
    let log = LogOnFailure::new(&f.ns);
    let (old, _op) = adopted(&f, deployment("web", 1, "creds")?, quick()).await?;
    let rss: Api<ReplicaSet> = Api::namespaced(f.env.kube.clone(), &f.ns);
    rss.create(&PostParams::default(), &bare_replicaset("legacy", 1, "creds")?).await?;
    let legacy = running_pods(&f, "legacy", 1).await?;
    let watch = KeyBreakWatch::start(&f.env, &f.ns);
    rotate(&f).await?;
    let o = wait_ikr(&f.ikrs, "app", "Degraded/UncoveredConsumers", |o| is_true(o, "Degraded", "UncoveredConsumers"))
        .await?;
    let msg = message(&o, "Degraded").unwrap_or_default();
    for p in &legacy {
        assert!(msg.contains(&format!("Pod/{p} (controlled by ReplicaSet/legacy)")), "{msg}");
    }
    assert!(!msg.contains("Pod/web-"), "the Deployment's pods are rolled by rekey: {msg}");
    assert_eq!(phase(&o), Phase::Deactivating);
    assert_eq!(key_status(&f, &old.access_key_id).await?.as_deref(), Some("Active"), "the old key stays Active");
    let broken = watch.stop();
    assert!(broken.is_empty(), "pods broke on their key: {broken:?}");
    // The human removes the stray ReplicaSet; once its pods are gone the rotation goes on by itself.
    let watch = KeyBreakWatch::start(&f.env, &f.ns);
    rss.delete("legacy", &DeleteParams::background()).await?;
    let o = rotated(&f).await?;
    let broken = watch.stop();
    assert!(broken.is_empty(), "pods broke on their key: {broken:?}");
    let new = active_key(&o).context("new key")?;
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), vec![new], "the old key is deleted");
    log.passed();
    Ok(())
}

#[tokio::test]
async fn annotation_retire_accepts_an_uncovered_consumer() -> anyhow::Result<()> {
    let f = Fixture::new("accept").await?;
    let log = LogOnFailure::new(&f.ns);
    let (old, _op) = adopted(&f, deployment("web", 1, "creds")?, quick()).await?;
    let rss: Api<ReplicaSet> = Api::namespaced(f.env.kube.clone(), &f.ns);
    rss.create(&PostParams::default(), &bare_replicaset("legacy", 1, "creds")?).await?;
    running_pods(&f, "legacy", 1).await?;
    let watch = KeyBreakWatch::start(&f.env, &f.ns);
    rotate(&f).await?;
    wait_ikr(&f.ikrs, "app", "Degraded/UncoveredConsumers", |o| is_true(o, "Degraded", "UncoveredConsumers")).await?;
    assert_eq!(key_status(&f, &old.access_key_id).await?.as_deref(), Some("Active"));
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&annotate("rekey.dev/retire", "legacy-ok"))).await?;
    eventually("the old key deactivated", WAIT, || async {
        let s = key_status(&f, &old.access_key_id).await?;
        Ok(if s.as_deref() != Some("Active") { Ok(()) } else { Err("still Active".to_owned()) })
    })
    .await?;
    // The risk the human accepted: the uncovered pod loses access (it was holding the old key).
    eventually("the legacy pod lost access", WAIT, || async {
        let lost = pods(&f, "legacy").await?.iter().any(|p| {
            let conds = p.status.as_ref().and_then(|s| s.conditions.as_ref());
            conds.is_some_and(|c| {
                c.iter().any(|c| c.type_ == "Ready" && c.message.as_deref().is_some_and(|m| m.contains("access key")))
            })
        });
        Ok(if lost { Ok(()) } else { Err("still Ready".to_owned()) })
    })
    .await?;
    rotated(&f).await?;
    let broken = watch.stop();
    let rolled: Vec<&String> = broken.iter().filter(|b| !b.starts_with("legacy-")).collect();
    assert!(rolled.is_empty(), "only the accepted consumer may break: {broken:?}");
    log.passed();
    Ok(())
}

#[tokio::test]
async fn a_job_pod_is_waited_for_until_it_finishes() -> anyhow::Result<()> {
    let f = Fixture::new("job").await?;
    let log = LogOnFailure::new(&f.ns);
    let spec =
        json!({"workloads": {"rolloutTimeout": "5m"}, "retirement": {"deactivateAfter": "0s", "deleteAfter": "5s"}});
    let (old, _op) = adopted(&f, deployment("web", 1, "creds")?, spec).await?;
    // A report that runs 45 s on the old key; the simulated kubelet then ends its pod.
    Api::<Job>::namespaced(f.env.kube.clone(), &f.ns)
        .create(&PostParams::default(), &job("report", "creds", 45)?)
        .await?;
    let pod = running_pods(&f, "report", 1).await?.remove(0);
    let watch = KeyBreakWatch::start(&f.env, &f.ns);
    rotate(&f).await?;
    let waiting = format!("waiting for Pod/{pod} (Job pods) to finish");
    let o = wait_ikr(&f.ikrs, "app", "waiting for the Job pod", |o| {
        message(o, "Rotating").is_some_and(|m| m.contains(&waiting))
    })
    .await?;
    assert_eq!(phase(&o), Phase::Deactivating);
    assert!(!is_true(&o, "Degraded", "UncoveredConsumers"), "a running Job pod is waited for, not reported");
    assert_eq!(key_status(&f, &old.access_key_id).await?.as_deref(), Some("Active"), "the old key stays Active");
    let o = rotated(&f).await?;
    let broken = watch.stop();
    // Had the old key gone while the Job ran, its pod would have lost access before it succeeded.
    assert!(broken.is_empty(), "pods broke on their key: {broken:?}");
    let phases: Vec<Option<String>> =
        pods(&f, "report").await?.into_iter().map(|p| p.status.and_then(|s| s.phase)).collect();
    assert_eq!(phases, vec![Some("Succeeded".to_owned())], "the Job's pod finished");
    let new = active_key(&o).context("new key")?;
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), vec![new], "the old key is deleted");
    log.passed();
    Ok(())
}

#[tokio::test]
async fn a_secret_reverted_after_the_handover_is_written_back_and_nothing_loses_access() -> anyhow::Result<()> {
    let f = Fixture::new("revert").await?;
    let log = LogOnFailure::new(&f.ns);
    let spec = json!({"retirement": {"deactivateAfter": "20s", "deleteAfter": "5s"}});
    let (old, _op) = adopted(&f, deployment("web", 1, "creds")?, spec).await?;
    let deploys: Api<Deployment> = Api::namespaced(f.env.kube.clone(), &f.ns);
    let watch = KeyBreakWatch::start(&f.env, &f.ns);
    rotate(&f).await?;
    let o = wait_ikr(&f.ikrs, "app", "Deactivating", |o| phase(o) == Phase::Deactivating).await?;
    let new = active_key(&o).context("new key")?;
    assert_ne!(new, old.access_key_id);
    // A Helm upgrade puts the chart's old key back, and the Deployment scales up meanwhile (as an
    // autoscaler would): its new pod starts on the old key, under the new key's stamp.
    helm_writes(&f.secrets, "creds", &old).await?;
    deploys.patch("web", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"replicas": 2}}))).await?;
    let o = wait_ikr(&f.ikrs, "app", "Degraded/SecretReverted", |o| is_true(o, "Degraded", "SecretReverted")).await?;
    let msg = message(&o, "Degraded").unwrap_or_default();
    assert!(msg.contains("creds (written by helm)"), "{msg}");
    // The condition is written ahead of the write-back (step MarkRevert, then Revert): wait for it.
    eventually("the active key written back", WAIT, || async {
        let held = held_key(&f.secrets, "creds").await?;
        Ok(if held.as_deref() == Some(new.as_str()) { Ok(()) } else { Err(format!("holds {held:?}")) })
    })
    .await?;
    let template = deploys.get("web").await?.spec.and_then(|s| s.template.metadata).and_then(|m| m.annotations);
    assert!(template.is_some_and(|a| a.contains_key("rekey.dev/restarted-at")), "the Deployment is restarted");
    assert_eq!(key_status(&f, &old.access_key_id).await?.as_deref(), Some("Active"), "not retired meanwhile");
    let o = rotated(&f).await?;
    let broken = watch.stop();
    assert!(broken.is_empty(), "pods broke on their key: {broken:?}");
    assert_eq!(active_key(&o).as_deref(), Some(new.as_str()));
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), vec![new], "the old key is deleted");
    log.passed();
    Ok(())
}

#[tokio::test]
async fn a_secret_reverted_twice_stops_with_the_old_key_active() -> anyhow::Result<()> {
    let f = Fixture::new("revert2").await?;
    let log = LogOnFailure::new(&f.ns);
    let spec = json!({"retirement": {"deactivateAfter": "0s", "deleteAfter": "2m"}});
    let (old, _op) = adopted(&f, deployment("web", 1, "creds")?, spec).await?;
    rotate(&f).await?;
    let o = wait_ikr(&f.ikrs, "app", "soaking", |o| phase(o) == Phase::Soaking).await?;
    let new = active_key(&o).context("new key")?;
    assert_eq!(key_status(&f, &old.access_key_id).await?.as_deref(), Some("Inactive"));
    helm_writes(&f.secrets, "creds", &old).await?;
    // Written back once, rolled out again, and soaking again.
    wait_ikr(&f.ikrs, "app", "written back once", |o| reverts(o) == 1 && phase(o) == Phase::Soaking).await?;
    assert_eq!(held_key(&f.secrets, "creds").await?, Some(new.clone()));
    helm_writes(&f.secrets, "creds", &old).await?;
    let o = wait_ikr(&f.ikrs, "app", "Stalled/SecretConflict", |o| is_true(o, "Stalled", "SecretConflict")).await?;
    assert_eq!(condition(&o, "Ready").map(|c| c.0).as_deref(), Some("False"));
    let msg = message(&o, "Stalled").unwrap_or_default();
    assert!(msg.contains("helm"), "{msg}");
    assert_eq!(key_status(&f, &old.access_key_id).await?.as_deref(), Some("Active"), "the old key reactivated");
    assert_eq!(key_status(&f, &new).await?.as_deref(), Some("Active"), "the new key kept");
    // rekey looks again (a spec edit makes it) and still writes nothing to the Secret.
    let before = f.secrets.get("creds").await?.metadata.resource_version;
    let edit = json!({"spec": {"retirement": {"deleteAfter": "3m"}}});
    let generation = f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&edit)).await?.metadata.generation;
    wait_ikr(&f.ikrs, "app", "the edited spec looked at, still stalled", |o| {
        let stalled = o.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Stalled"));
        stalled
            .is_some_and(|c| c.reason == "SecretConflict" && c.status == "True" && c.observed_generation == generation)
    })
    .await?;
    assert_eq!(f.secrets.get("creds").await?.metadata.resource_version, before, "the Secret was not written");
    assert_eq!(held_key(&f.secrets, "creds").await?, Some(old.access_key_id.clone()), "it still holds the old key");
    assert_eq!(key_status(&f, &old.access_key_id).await?.as_deref(), Some("Active"));
    log.passed();
    Ok(())
}

#[tokio::test]
async fn a_pod_selected_by_match_expressions_is_waited_for() -> anyhow::Result<()> {
    let f = Fixture::new("exprs").await?;
    let log = LogOnFailure::new(&f.ns);
    let mut d = deployment("web", 2, "creds")?;
    if let Some(s) = d.spec.as_mut() {
        s.selector =
            serde_json::from_value(json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]}))?;
    }
    let (old, _op) = adopted(&f, d, quick()).await?;
    let before: BTreeSet<String> = pods(&f, "web").await?.into_iter().filter_map(|p| p.metadata.uid).collect();
    assert_eq!(before.len(), 2);
    // One old pod stays Terminating (as one with a long grace period or a stuck preStop hook does)
    // after the Deployment reports its rollout complete: it still runs on the old key.
    let held = pods(&f, "web").await?.into_iter().next().and_then(|p| p.metadata.name).context("a pod")?;
    let pod_api: Api<Pod> = Api::namespaced(f.env.kube.clone(), &f.ns);
    let hold =
        |on: bool| json!({"metadata": {"finalizers": if on { json!(["rekey.test/hold"]) } else { json!(null) }}});
    pod_api.patch(&held, &PatchParams::default(), &Patch::Merge(&hold(true))).await?;
    let watch = KeyBreakWatch::start(&f.env, &f.ns);
    let early = RetiredUnder::start(&f.env, &f.ns, &f.user, &old.access_key_id, before);
    rotate(&f).await?;
    let o = wait_ikr(&f.ikrs, "app", "rolling out", |o| phase(o) == Phase::RollingOut).await?;
    let new = active_key(&o).context("new key")?;
    eventually("2 pods on the new key Ready", WAIT, || async {
        let on_new = pods(&f, "web").await?.into_iter().filter(|p| ready(p) && stamp(p) == Some(new.clone())).count();
        Ok(if on_new == 2 { Ok(()) } else { Err(format!("{on_new} Ready on the new key")) })
    })
    .await?;
    eventually("the held pod Terminating", WAIT, || async {
        let p = pod_api.get(&held).await?;
        Ok(if p.metadata.deletion_timestamp.is_some() { Ok(()) } else { Err("not deleted yet".to_owned()) })
    })
    .await?;
    let deploys: Api<Deployment> = Api::namespaced(f.env.kube.clone(), &f.ns);
    deployment_ready(&deploys, "web", WAIT).await?;
    // The rollout is complete; through at least one 5 s poll and every pod event in between, rekey
    // keeps the old key for the pod still running on it.
    let until = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < until {
        let o = f.ikrs.get("app").await?;
        assert_eq!(phase(&o), Phase::RollingOut, "{:?}", message(&o, "Rotating"));
        assert_eq!(key_status(&f, &old.access_key_id).await?.as_deref(), Some("Active"), "the held pod uses it");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    pod_api.patch(&held, &PatchParams::default(), &Patch::Merge(&hold(false))).await?;
    let o = rotated(&f).await?;
    let (broken, early) = (watch.stop(), early.stop());
    assert!(early.is_empty(), "the old key went while the Deployment's old pods ran: {early:?}");
    assert!(broken.is_empty(), "pods broke on their key: {broken:?}");
    assert_eq!(active_key(&o), Some(new.clone()));
    let stamps: Vec<Option<String>> = pods(&f, "web").await?.iter().map(stamp).collect();
    assert_eq!(stamps, vec![Some(new.clone()); 2], "every pod runs on the new key");
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), vec![new], "the old key is deleted");
    log.passed();
    Ok(())
}

/// The key id rekey stamped on the pod's template.
fn stamp(p: &Pod) -> Option<String> {
    p.metadata.annotations.as_ref().and_then(|a| a.get("rekey.dev/access-key-id").cloned())
}
