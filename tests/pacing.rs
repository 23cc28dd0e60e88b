//! Restart pacing on the real control plane: rotations that hand over together restart a workload
//! they share once; a rotation waits for a rollout slot in view; rotations stuck on what rekey does
//! not control hold no rotation slot, and other namespaces' rotations never hold back a first key
//! or a request.

mod support;

use std::collections::BTreeSet;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use rekey::api::{IamKeyRotation, Phase};
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

/// A bare pod (no controller) reading `secret` through envFrom: a consumer rekey cannot restart.
fn bare_pod(name: &str, secret: &str) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "app", "image": "app:1", "envFrom": [{"secretRef": {"name": secret}}]}]}
    }))?)
}

fn rotated_once(o: &IamKeyRotation) -> bool {
    o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
}

/// --max-concurrent-rotations 2, and two rotations of namespace A wait (legitimately, for days) on
/// bare pods that read their Secrets: they hold no slot. A new resource of namespace B gets its
/// first key, a rekey.dev/rotate request in B and one in A rotate, while the stuck two still wait
/// with their old keys Active.
#[tokio::test]
async fn rotations_stuck_on_uncovered_consumers_hold_no_slot() -> anyhow::Result<()> {
    let f = Fixture::new("fair").await?;
    let ns_b = f.env.namespace("fair-b").await?;
    let ikrs_b: Api<IamKeyRotation> = Api::namespaced(f.env.kube.clone(), &ns_b);
    let secrets_b: Api<Secret> = Api::namespaced(f.env.kube.clone(), &ns_b);
    let pods: Api<Pod> = Api::namespaced(f.env.kube.clone(), &f.ns);
    let mut stuck_keys = Vec::new();
    for (name, user) in [("stuck-1", f.user.clone()), ("stuck-2", consenting_user(&f.env, "fair-2", &f.ns).await?)] {
        let secret = format!("creds-{name}");
        stuck_keys.push((user.clone(), adopted(&f, name, &user, &secret).await?));
        pods.create(&PostParams::default(), &bare_pod(&format!("bare-{name}"), &secret)?).await?;
    }
    let a_user = consenting_user(&f.env, "fair-3", &f.ns).await?;
    adopted(&f, "requested-a", &a_user, "creds-requested-a").await?;
    let b_user = consenting_user(&f.env, "fair-b1", &ns_b).await?;
    let key = f.env.create_key(&b_user).await?;
    secrets_b.create(&PostParams::default(), &key_secret("creds-requested", &key)?).await?;
    let spec = |user: &str, secret: &str| json!({"userName": user, "secrets": [{"name": secret}], "retirement": {"deleteAfter": "0s"}});
    ikrs_b.create(&PostParams::default(), &ikr("requested-b", spec(&b_user, "creds-requested"))?).await?;
    let _op = Operator::start_watching(&f.ns, &[&f.ns, &ns_b], &[("REKEY_MAX_CONCURRENT_ROTATIONS", "2")]).await?;
    let in_place = |o: &IamKeyRotation| is_true(o, "Ready", "KeyInPlace");
    for name in ["stuck-1", "stuck-2", "requested-a"] {
        wait_ikr(&f.ikrs, name, "adopted", in_place).await?;
    }
    wait_ikr(&ikrs_b, "requested-b", "adopted", in_place).await?;

    for name in ["stuck-1", "stuck-2"] {
        f.rotate(name, "1").await?;
    }
    for name in ["stuck-1", "stuck-2"] {
        wait_ikr(&f.ikrs, name, "held by its bare pod", |o| {
            phase(o) == Phase::Deactivating && is_true(o, "Degraded", "UncoveredConsumers")
        })
        .await?;
    }

    let first_user = consenting_user(&f.env, "fair-b2", &ns_b).await?;
    ikrs_b.create(&PostParams::default(), &ikr("first", spec(&first_user, "creds-first"))?).await?;
    let patch = json!({"metadata": {"annotations": {"rekey.dev/rotate": "1"}}});
    ikrs_b.patch("requested-b", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    f.rotate("requested-a", "1").await?;
    let first = wait_ikr(&ikrs_b, "first", "the first key in place", in_place).await?;
    let first_key = active_key(&first).context("first key")?;
    assert_eq!(held_key(&secrets_b, "creds-first").await?, Some(first_key));
    wait_ikr(&ikrs_b, "requested-b", "rotated on request", rotated_once).await?;
    wait_ikr(&f.ikrs, "requested-a", "rotated on request", rotated_once).await?;

    // The stuck two went on waiting, their old keys Active for the bare pods.
    for (name, (user, old)) in ["stuck-1", "stuck-2"].into_iter().zip(&stuck_keys) {
        let o = f.ikrs.get(name).await?;
        assert!(is_true(&o, "Degraded", "UncoveredConsumers"), "{name}: {:?}", condition(&o, "Degraded"));
        assert_eq!(f.env.keys(user).await?.get(old).map(String::as_str), Some("Active"), "{name}'s old key");
    }
    Ok(())
}
