//! Restart pacing on the real control plane: rotations that hand over together restart a workload
//! they share once.

mod support;

use std::collections::BTreeSet;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use kube::api::{Api, PostParams};
use rekey::api::Phase;
use serde_json::json;
use support::*;

/// A Deployment with one container per Secret (each reads its own through envFrom).
fn shared(name: &str, secrets: &[&str]) -> anyhow::Result<Deployment> {
    let containers: Vec<_> =
        secrets.iter().map(|s| json!({"name": s, "image": "app:1", "envFrom": [{"secretRef": {"name": s}}]})).collect();
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": containers}},
        }
    }))?)
}

async fn replicasets(api: &Api<ReplicaSet>) -> anyhow::Result<BTreeSet<String>> {
    Ok(api.list(&Default::default()).await?.items.into_iter().filter_map(|r| r.metadata.name).collect())
}

#[tokio::test]
async fn two_rotations_sharing_a_deployment_restart_it_once() -> anyhow::Result<()> {
    let f = Fixture::new("shared").await?;
    let other_user = consenting_user(&f.env, "shared-b", &f.ns).await?;
    let deployments: Api<Deployment> = Api::namespaced(f.env.kube.clone(), &f.ns);
    deployments.create(&PostParams::default(), &shared("web", &["creds-a", "creds-b"])?).await?;
    for (name, user, secret) in [("a", &f.user, "creds-a"), ("b", &other_user, "creds-b")] {
        let spec = json!({"userName": user, "secrets": [{"name": secret}], "retirement": {"deleteAfter": "0s"}});
        f.create(name, spec).await?;
    }
    let _op = Operator::start(&f.ns, &[("REKEY_ROLLOUT_COOLDOWN", "20s")]).await?;
    let idle = |o: &rekey::api::IamKeyRotation| is_true(o, "Ready", "KeyInPlace") && phase(o) == Phase::Idle;
    for name in ["a", "b"] {
        wait_ikr(&f.ikrs, name, "bootstrapped", idle).await?;
    }
    deployment_ready(&deployments, "web", WAIT).await?;
    let rs: Api<ReplicaSet> = Api::namespaced(f.env.kube.clone(), &f.ns);
    let before = replicasets(&rs).await?;

    f.rotate("a", "1").await?;
    f.rotate("b", "1").await?;
    let mut keys = Vec::new();
    for name in ["a", "b"] {
        let o = wait_ikr(&f.ikrs, name, "rotated", |o| {
            o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
        })
        .await?;
        keys.push(active_key(&o).context("new key")?);
    }
    let restarts: Vec<String> = replicasets(&rs).await?.difference(&before).cloned().collect();
    assert_eq!(restarts.len(), 1, "one new ReplicaSet for both rotations: {restarts:?}");
    let d = deployments.get("web").await?;
    let stamp = d
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .and_then(|a| a.get("rekey.dev/access-key-id").cloned())
        .context("stamp")?;
    for k in &keys {
        assert!(stamp.split(',').any(|s| s == k), "the stamp {stamp} carries {k}");
    }
    Ok(())
}
