//! Restart pacing on the real control plane: rotations that hand over together restart a workload
//! they share once; a rotation waits for a rollout slot in view.

mod support;

use std::collections::BTreeSet;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use kube::api::{Api, PostParams};
use rekey::api::Phase;
use rekey_testenv::env::eventually;
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

/// A resource that adopted a key of `user` in its own Secret `secret`, retired at once: the key id.
async fn adopted(f: &Fixture, name: &str, user: &str, secret: &str) -> anyhow::Result<String> {
    let key = f.env.create_key(user).await?;
    f.secrets.create(&PostParams::default(), &key_secret(secret, &key)?).await?;
    let spec = json!({"userName": user, "secrets": [{"name": secret}], "retirement": {"deleteAfter": "0s"}});
    f.create(name, spec).await?;
    Ok(key.access_key_id)
}

/// --max-concurrent-rollouts 1: a rotation whose rollout is stuck keeps the slot; the next one waits
/// in RollingOut, restarting nothing, with both keys Active, and names who holds the slot (the way
/// to the stuck rollout); it goes on once that rollout completes.
#[tokio::test]
async fn a_rotation_waiting_for_a_rollout_slot_names_its_holder_and_goes_on_when_it_frees() -> anyhow::Result<()> {
    let f = Fixture::new("slots").await?;
    let other_user = consenting_user(&f.env, "slots-b", &f.ns).await?;
    let deployments: Api<Deployment> = Api::namespaced(f.env.kube.clone(), &f.ns);
    // "stuck" reads Secret creds, and its pods also need Secret "missing", which does not exist.
    deployments.create(&PostParams::default(), &never_healthy("stuck")?).await?;
    deployments.create(&PostParams::default(), &deployment("web", 1, "creds-b")?).await?;
    adopted(&f, "a", &f.user, "creds").await?;
    let old_b = adopted(&f, "b", &other_user, "creds-b").await?;
    let _op = Operator::start(&f.ns, &[("REKEY_MAX_CONCURRENT_ROLLOUTS", "1")]).await?;
    for name in ["a", "b"] {
        wait_ikr(&f.ikrs, name, "adopted", |o| is_true(o, "Ready", "KeyInPlace")).await?;
    }
    deployment_ready(&deployments, "web", WAIT).await?;
    let stamp = |d: Deployment| {
        d.spec
            .and_then(|s| s.template.metadata)
            .and_then(|m| m.annotations)
            .and_then(|a| a.get("rekey.dev/access-key-id").cloned())
    };

    f.rotate("a", "1").await?;
    let a = wait_ikr(&f.ikrs, "a", "rolling out", |o| phase(o) == Phase::RollingOut).await?;
    let new_a = active_key(&a).context("a's new key")?;
    eventually("stuck restarted onto a's key", WAIT, || async {
        let s = stamp(deployments.get("stuck").await?);
        Ok(if s.as_deref() == Some(new_a.as_str()) { Ok(()) } else { Err(format!("{s:?}")) })
    })
    .await?;
    f.rotate("b", "1").await?;
    let holder = format!("held by {}/a", f.ns);
    let b = wait_ikr(&f.ikrs, "b", "waiting for the slot", |o| {
        phase(o) == Phase::RollingOut
            && message(o, "Rotating").is_some_and(|m| m.contains("waiting for a rollout slot") && m.contains(&holder))
    })
    .await?;
    let new_b = active_key(&b).context("b's new key")?;
    assert_eq!(stamp(deployments.get("web").await?), None, "web is not restarted while b waits");
    let keys = f.env.keys(&other_user).await?;
    assert_eq!((keys.get(&old_b), keys.get(&new_b)), (Some(&"Active".to_owned()), Some(&"Active".to_owned())));

    // The stuck pods get what they lacked: a's rollout completes and frees the slot.
    let missing = json!({"metadata": {"name": "missing"}, "stringData": {"k": "v"}});
    f.secrets.create(&PostParams::default(), &serde_json::from_value(missing)?).await?;
    for name in ["a", "b"] {
        wait_ikr(&f.ikrs, name, "rotated", |o| {
            o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
        })
        .await?;
    }
    assert_eq!(stamp(deployments.get("web").await?), Some(new_b.clone()));
    assert!(!f.env.keys(&other_user).await?.contains_key(&old_b), "b's old key is retired");
    Ok(())
}
