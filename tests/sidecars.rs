//! Sidecar containers (init containers with `restartPolicy: Always`, GA in Kubernetes 1.33) read
//! Secrets for the pod's whole life: a sidecar that reads a target Secret makes its pod a consumer,
//! restarted like any other when its workload is rolled, and keeping the old key when nothing rekey
//! rolls owns it. On the real control plane, with the simulated kubelet running sidecars as
//! containers (environment fixed at start, Ready only while their key authenticates).

mod support;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use rekey::api::Phase;
use serde_json::json;
use support::*;

/// A pod spec whose only reader of `secret` is a sidecar: the app container reads nothing.
fn sidecar_spec(secret: &str) -> serde_json::Value {
    json!({
        "initContainers": [{"name": "aws-proxy", "image": "proxy:1", "restartPolicy": "Always",
            "envFrom": [{"secretRef": {"name": secret}}]}],
        "containers": [{"name": "app", "image": "app:1"}],
    })
}

/// Secret "creds" with a key made before rekey, and resource "app" adopting it.
async fn adopt(f: &Fixture) -> anyhow::Result<rekey_testenv::creds::KeyPair> {
    let old = f.env.create_key(&f.user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &old)?).await?;
    let retirement = json!({"deactivateAfter": "0s", "deleteAfter": "5s"});
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": retirement})).await?;
    Ok(old)
}

async fn request_rotation(f: &Fixture) -> anyhow::Result<()> {
    let patch = json!({"metadata": {"annotations": {"rekey.dev/rotate": "1"}}});
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

fn ready(p: &Pod) -> bool {
    let conds = p.status.as_ref().and_then(|s| s.conditions.as_ref());
    conds.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::test]
async fn a_deployment_whose_only_reader_is_a_sidecar_is_restarted_onto_the_new_key() -> anyhow::Result<()> {
    let f = Fixture::new("sidecar-deploy").await?;
    let old = adopt(&f).await?;
    let deploys: Api<Deployment> = Api::namespaced(f.env.kube.clone(), &f.ns);
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": sidecar_spec("creds")}},
    }))?;
    deploys.create(&PostParams::default(), &d).await?;
    let _op = f.operator().await?;
    let id = old.access_key_id.clone();
    wait_ikr(&f.ikrs, "app", "adopted", |o| active_key(o).as_deref() == Some(id.as_str())).await?;
    deployment_ready(&deploys, "web", WAIT).await?;
    let watch = KeyBreakWatch::start(&f.env, &f.ns);
    request_rotation(&f).await?;
    let o = wait_ikr(&f.ikrs, "app", "rotation complete", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await?;
    let broken = watch.stop();
    assert!(broken.is_empty(), "pods broke on their key: {broken:?}");
    let new = active_key(&o).context("new key")?;
    assert_ne!(new, old.access_key_id);
    // Discovery found the Deployment through its sidecar alone, and rolled it onto the new key.
    let stamp = deploys.get("web").await?.spec.and_then(|s| s.template.metadata).and_then(|m| m.annotations);
    assert_eq!(stamp.and_then(|a| a.get("rekey.dev/access-key-id").cloned()).as_deref(), Some(new.as_str()));
    let pods: Api<Pod> = Api::namespaced(f.env.kube.clone(), &f.ns);
    let running: Vec<Pod> = pods.list(&ListParams::default().labels("app=web")).await?.items;
    assert!(running.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).all(ready), "the new pods are Ready");
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), vec![new], "the old key is deleted");
    Ok(())
}

#[tokio::test]
async fn a_bare_pod_whose_sidecar_reads_the_secret_keeps_the_old_key_active() -> anyhow::Result<()> {
    let f = Fixture::new("sidecar-pod").await?;
    let old = adopt(&f).await?;
    let pods: Api<Pod> = Api::namespaced(f.env.kube.clone(), &f.ns);
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "debug"}, "spec": sidecar_spec("creds")}))?;
    pods.create(&PostParams::default(), &pod).await?;
    let _op = f.operator().await?;
    let id = old.access_key_id.clone();
    wait_ikr(&f.ikrs, "app", "adopted", |o| active_key(o).as_deref() == Some(id.as_str())).await?;
    request_rotation(&f).await?;
    let o = wait_ikr(&f.ikrs, "app", "Degraded/UncoveredConsumers", |o| is_true(o, "Degraded", "UncoveredConsumers"))
        .await?;
    let msg = message(&o, "Degraded").unwrap_or_default();
    assert!(msg.contains("Pod/debug (no controller)"), "{msg}");
    assert_eq!(phase(&o), Phase::Deactivating);
    let status = f.env.keys(&f.user).await?.get(&old.access_key_id).cloned();
    assert_eq!(status.as_deref(), Some("Active"), "the sidecar's key stays Active");
    // The pod is removed; the rotation goes on by itself and retires the old key.
    pods.delete("debug", &DeleteParams::default()).await?;
    let o = wait_ikr(&f.ikrs, "app", "rotation complete", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await?;
    let new = active_key(&o).context("new key")?;
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), vec![new], "the old key is deleted");
    Ok(())
}
