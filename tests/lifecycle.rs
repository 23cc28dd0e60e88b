//! The rotation's phases, degraded paths and stalls, each as a user would meet them, on the real
//! control plane, moto and the simulated kubelet.

mod support;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use rekey::api::Phase;
use rekey_testenv::env::eventually;
use serde_json::json;
use support::*;

fn annotate(key: &str, v: &str) -> serde_json::Value {
    json!({"metadata": {"annotations": {key: v}}})
}

#[tokio::test]
async fn adoption_takes_over_an_active_key_without_rotating_it() -> anyhow::Result<()> {
    let f = Fixture::new("adopt").await?;
    let key = f.env.create_key(&f.user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &key)?).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}]})).await?;
    let _op = f.operator().await?;
    let o = wait_ikr(&f.ikrs, "app", "adopted and Ready", |o| is_true(o, "Ready", "KeyInPlace")).await?;
    assert_eq!(active_key(&o).as_deref(), Some(key.access_key_id.as_str()));
    let st = o.status.context("status")?;
    assert_eq!((st.phase, st.rotations), (Phase::Idle, 0));
    assert_eq!(f.env.keys(&f.user).await?.len(), 1, "no new key was created");
    // The schedule starts from the key's IAM CreateDate.
    let created = st.active_key.and_then(|k| k.created_at).context("createdAt")?.0;
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(created).as_secs();
    assert!((0..120).contains(&age), "createdAt is the IAM CreateDate, {age}s ago");
    Ok(())
}

#[tokio::test]
async fn scheduled_rotation_rolls_a_deployment_a_statefulset_and_a_daemonset_without_breaking_a_pod()
-> anyhow::Result<()> {
    let f = Fixture::new("sched").await?;
    let kube = f.env.kube.clone();
    let pod = |app: &str| {
        json!({"metadata": {"labels": {"app": app}}, "spec": {"containers": [
            {"name": "app", "image": "app:1", "env": [
                {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "AWS_ACCESS_KEY_ID"}}},
                {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "AWS_SECRET_ACCESS_KEY"}}}]}]}})
    };
    Api::<Deployment>::namespaced(kube.clone(), &f.ns)
        .create(&PostParams::default(), &deployment("web", 2, "creds")?)
        .await?;
    let sts: StatefulSet = serde_json::from_value(json!({"metadata": {"name": "db"}, "spec": {
        "replicas": 2, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}}, "template": pod("db")}}))?;
    Api::<StatefulSet>::namespaced(kube.clone(), &f.ns).create(&PostParams::default(), &sts).await?;
    let ds: DaemonSet = serde_json::from_value(json!({"metadata": {"name": "agent"}, "spec": {
        "selector": {"matchLabels": {"app": "agent"}}, "template": pod("agent")}}))?;
    Api::<DaemonSet>::namespaced(kube.clone(), &f.ns).create(&PostParams::default(), &ds).await?;
    // Due 30 s after the key's creation; the old key soaks 5 s.
    f.create(
        "app",
        json!({"userName": f.user, "maxKeyAge": "40s", "rotateBefore": "10s", "secrets": [{"name": "creds"}],
               "retirement": {"deleteAfter": "5s"}}),
    )
    .await?;
    let _op = f.operator().await?;
    let first = wait_ikr(&f.ikrs, "app", "bootstrap", |o| is_true(o, "Ready", "KeyInPlace") && phase(o) == Phase::Idle)
        .await
        .map(|o| active_key(&o))?
        .context("first key")?;
    let watch = KeyBreakWatch::start(&f.env, &f.ns);
    let o = wait_ikr(&f.ikrs, "app", "scheduled rotation done", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await?;
    let broken = watch.stop();
    assert!(broken.is_empty(), "pods broke on their key during the rotation: {broken:?}");
    let second = active_key(&o).context("second key")?;
    assert_ne!(first, second);
    assert_eq!(
        f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(),
        vec![second.clone()],
        "exactly one key left"
    );
    // Every workload runs on the new key.
    for (kind, name) in [("Deployment", "web"), ("StatefulSet", "db"), ("DaemonSet", "agent")] {
        let pods: Api<Pod> = Api::namespaced(kube.clone(), &f.ns);
        eventually(&format!("{kind} {name} on the new key"), WAIT, || async {
            let list = pods.list(&kube::api::ListParams::default().labels(&format!("app={name}"))).await?;
            let ok = !list.items.is_empty()
                && list.items.iter().all(|p| {
                    p.metadata.annotations.as_ref().and_then(|a| a.get("rekey.dev/access-key-id")) == Some(&second)
                });
            Ok(if ok { Ok(()) } else { Err(format!("{} pods", list.items.len())) })
        })
        .await?;
    }
    // The old key went Inactive before it was deleted: the Events tell the order.
    let events =
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(kube.clone(), &f.ns).list(&Default::default()).await?;
    let at = |reason: &str| {
        events
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .filter_map(|e| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
            .min()
    };
    let (deactivated, deleted) =
        (at("Deactivated").context("Deactivated Event")?, at("Deleted").context("Deleted Event")?);
    assert!(deactivated <= deleted, "deactivated {deactivated}, deleted {deleted}");
    Ok(())
}

#[tokio::test]
async fn a_workload_that_never_becomes_healthy_keeps_both_keys_active() -> anyhow::Result<()> {
    let f = Fixture::new("stuck").await?;
    let key = f.env.create_key(&f.user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &key)?).await?;
    // Its pods need a Secret that does not exist, so they never start.
    let mut d = deployment("web", 1, "creds")?;
    if let Some(c) = d.spec.as_mut().and_then(|s| s.template.spec.as_mut()).map(|s| &mut s.containers[0]) {
        c.env = Some(vec![serde_json::from_value(
            json!({"name": "X", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k"}}}),
        )?]);
    }
    Api::<Deployment>::namespaced(f.env.kube.clone(), &f.ns).create(&PostParams::default(), &d).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "workloads": {"rolloutTimeout": "5s"}}))
        .await?;
    let _op = f.operator().await?;
    wait_ikr(&f.ikrs, "app", "adopted", |o| active_key(o).is_some()).await?;
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&annotate("rekey.dev/rotate", "now"))).await?;
    let o = wait_ikr(&f.ikrs, "app", "Degraded/RolloutStalled", |o| is_true(o, "Degraded", "RolloutStalled")).await?;
    assert_eq!(phase(&o), Phase::RollingOut);
    assert!(condition(&o, "Ready").is_some_and(|c| c.0 == "True"), "the Secrets still work");
    let keys = f.env.keys(&f.user).await?;
    assert_eq!(keys.len(), 2);
    assert!(keys.values().all(|s| s == "Active"), "{keys:?}");
    Ok(())
}

#[tokio::test]
async fn workloads_breaking_during_the_soak_reactivate_the_old_key() -> anyhow::Result<()> {
    let f = Fixture::new("soak").await?;
    let old = f.env.create_key(&f.user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &old)?).await?;
    // A consumer rekey does not know about: its own copy of the old key, in another Secret that a
    // Deployment reads. It breaks when the old key is deactivated.
    f.secrets.create(&PostParams::default(), &key_secret("copy", &old)?).await?;
    let deploys: Api<Deployment> = Api::namespaced(f.env.kube.clone(), &f.ns);
    deploys.create(&PostParams::default(), &deployment("web", 1, "creds")?).await?;
    deploys.create(&PostParams::default(), &deployment("missed", 2, "copy")?).await?;
    f.create(
        "app",
        json!({"userName": f.user, "secrets": [{"name": "creds"}],
               "workloads": {"targets": [{"kind": "Deployment", "name": "missed"}]},
               "retirement": {"deleteAfter": "10m"}}),
    )
    .await?;
    let _op = f.operator().await?;
    wait_ikr(&f.ikrs, "app", "adopted", |o| active_key(o).is_some()).await?;
    // "missed" is a target, so it is restarted, but on the copy, which still holds the old key.
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&annotate("rekey.dev/rotate", "1"))).await?;
    let o = wait_ikr(&f.ikrs, "app", "rolled back", |o| is_true(o, "Degraded", "RolledBack")).await?;
    assert!(is_true(&o, "Stalled", "ParkedAfterRollback") || phase(&o) == Phase::Soaking);
    let keys = f.env.keys(&f.user).await?;
    assert_eq!(keys.get(&old.access_key_id).map(String::as_str), Some("Active"), "old key reactivated: {keys:?}");
    let o = wait_ikr(&f.ikrs, "app", "parked", |o| is_true(o, "Stalled", "ParkedAfterRollback")).await?;
    assert_eq!(f.env.keys(&f.user).await?.len(), 2, "nothing deleted");
    // The human fixes the missed place and says so: rekey retires the old key again.
    assert!(phase(&o) == Phase::Soaking);
    let fixed = f.secrets.get("creds").await?.data;
    f.secrets.patch("copy", &PatchParams::default(), &Patch::Merge(&json!({"data": fixed}))).await?;
    let restart = json!({"spec": {"template": {"metadata": {"annotations": {"fixed": "1"}}}}});
    deploys.patch("missed", &PatchParams::default(), &Patch::Merge(&restart)).await?;
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&annotate("rekey.dev/retire", "fixed"))).await?;
    wait_ikr(&f.ikrs, "app", "deactivated again", |o| {
        o.status
            .as_ref()
            .and_then(|s| s.retiring_key.as_ref())
            .is_some_and(|r| r.state == rekey::api::KeyState::Inactive)
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_foreign_second_key_exhausts_the_quota_and_is_never_touched() -> anyhow::Result<()> {
    let f = Fixture::new("quota").await?;
    let key = f.env.create_key(&f.user).await?;
    let foreign = f.env.create_key(&f.user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &key)?).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}]})).await?;
    let _op = f.operator().await?;
    wait_ikr(&f.ikrs, "app", "adopted", |o| active_key(o).is_some()).await?;
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&annotate("rekey.dev/rotate", "1"))).await?;
    let o = wait_ikr(&f.ikrs, "app", "KeyQuotaExhausted", |o| is_true(o, "Degraded", "KeyQuotaExhausted")).await?;
    assert_eq!(phase(&o), Phase::Idle);
    let keys = f.env.keys(&f.user).await?;
    assert_eq!(keys.get(&foreign.access_key_id).map(String::as_str), Some("Active"), "{keys:?}");
    assert_eq!(keys.len(), 2);
    Ok(())
}

#[tokio::test]
async fn two_resources_naming_one_user_the_younger_conflicts_and_writes_nothing() -> anyhow::Result<()> {
    let f = Fixture::new("twice").await?;
    f.create("first", json!({"userName": f.user, "secrets": [{"name": "a"}]})).await?;
    let _op = f.operator().await?;
    wait_ikr(&f.ikrs, "first", "first bootstrapped", |o| is_true(o, "Ready", "KeyInPlace")).await?;
    f.create("second", json!({"userName": f.user, "secrets": [{"name": "b"}]})).await?;
    wait_ikr(&f.ikrs, "second", "Degraded/Conflict", |o| is_true(o, "Degraded", "Conflict")).await?;
    assert_eq!(f.env.keys(&f.user).await?.len(), 1, "the second resource created no key");
    assert!(f.secrets.get_opt("b").await?.is_none(), "the second resource wrote no Secret");
    Ok(())
}

#[tokio::test]
async fn dry_run_reports_the_next_step_and_changes_nothing() -> anyhow::Result<()> {
    let f = Fixture::new("dry").await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "dryRun": true})).await?;
    let _op = f.operator().await?;
    let o = wait_ikr(&f.ikrs, "app", "planned step reported", |o| {
        o.status.as_ref().and_then(|s| s.planned_step.as_deref()) == Some("Begin")
    })
    .await?;
    assert!(active_key(&o).is_none());
    assert!(f.env.keys(&f.user).await?.is_empty(), "no key created");
    assert!(f.secrets.get_opt("creds").await?.is_none(), "no Secret written");
    assert!(f.secrets.get_opt("app-rekey-staging").await?.is_none(), "no staging Secret");
    Ok(())
}

#[tokio::test]
async fn a_partitioned_statefulset_among_the_targets_stalls_and_the_old_key_stays() -> anyhow::Result<()> {
    let f = Fixture::new("part").await?;
    let key = f.env.create_key(&f.user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &key)?).await?;
    let sts: StatefulSet = serde_json::from_value(json!({"metadata": {"name": "db"}, "spec": {
        "replicas": 2, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 1}},
        "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [
            {"name": "db", "image": "db:1", "envFrom": [{"secretRef": {"name": "creds"}}]}]}}}}))?;
    Api::<StatefulSet>::namespaced(f.env.kube.clone(), &f.ns).create(&PostParams::default(), &sts).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}]})).await?;
    let _op = f.operator().await?;
    wait_ikr(&f.ikrs, "app", "adopted", |o| active_key(o).is_some()).await?;
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&annotate("rekey.dev/rotate", "1"))).await?;
    let o = wait_ikr(&f.ikrs, "app", "Stalled", |o| is_true(o, "Stalled", "InvalidSpec")).await?;
    let msg =
        o.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Stalled")).map(|c| c.message.clone());
    assert!(msg.as_deref().is_some_and(|m| m.contains("StatefulSet/db") && m.contains("partition")), "{msg:?}");
    assert_eq!(f.env.keys(&f.user).await?.get(&key.access_key_id).map(String::as_str), Some("Active"));
    Ok(())
}

#[tokio::test]
async fn a_bare_pod_holding_the_old_key_keeps_it_active_until_the_pod_is_gone() -> anyhow::Result<()> {
    let f = Fixture::new("bare").await?;
    let key = f.env.create_key(&f.user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &key)?).await?;
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "adhoc"}, "spec": {"containers": [
        {"name": "sh", "image": "sh:1", "envFrom": [{"secretRef": {"name": "creds"}}]}]}}))?;
    Api::<Pod>::namespaced(f.env.kube.clone(), &f.ns).create(&PostParams::default(), &pod).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "workloads": {"rolloutTimeout": "3s"}}))
        .await?;
    let _op = f.operator().await?;
    wait_ikr(&f.ikrs, "app", "adopted", |o| active_key(o).is_some()).await?;
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&annotate("rekey.dev/rotate", "1"))).await?;
    let o = wait_ikr(&f.ikrs, "app", "UncoveredConsumers", |o| is_true(o, "Degraded", "UncoveredConsumers")).await?;
    assert_eq!(phase(&o), Phase::Deactivating);
    let message =
        o.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Degraded")).map(|c| c.message.clone());
    assert!(message.as_deref().is_some_and(|m| m.contains("Pod/adhoc (no controller)")), "{message:?}");
    assert_eq!(f.env.keys(&f.user).await?.get(&key.access_key_id).map(String::as_str), Some("Active"));
    // The human ends the pod: nothing holds the old key any more, and it is retired.
    Api::<Pod>::namespaced(f.env.kube.clone(), &f.ns).delete("adhoc", &Default::default()).await?;
    wait_ikr(&f.ikrs, "app", "soaking", |o| phase(o) == Phase::Soaking).await?;
    assert_eq!(f.env.keys(&f.user).await?.get(&key.access_key_id).map(String::as_str), Some("Inactive"));
    Ok(())
}

#[tokio::test]
async fn secrets_that_disagree_or_hold_another_users_key_stall_and_are_not_overwritten() -> anyhow::Result<()> {
    let f = Fixture::new("conflict").await?;
    let a = f.env.create_key(&f.user).await?;
    let other_user = f.env.create_user("other").await?;
    let b = f.env.create_key(&other_user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("one", &a)?).await?;
    f.secrets.create(&PostParams::default(), &key_secret("two", &b)?).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "one"}, {"name": "two"}]})).await?;
    let _op = f.operator().await?;
    let o = wait_ikr(&f.ikrs, "app", "SecretConflict", |o| is_true(o, "Stalled", "SecretConflict")).await?;
    assert_eq!(condition(&o, "Ready").map(|c| c.0).as_deref(), Some("False"));
    let two: Secret = f.secrets.get("two").await?;
    let id =
        two.data.as_ref().and_then(|d| d.get("AWS_ACCESS_KEY_ID")).map(|v| String::from_utf8_lossy(&v.0).to_string());
    assert_eq!(id.as_deref(), Some(b.access_key_id.as_str()), "not overwritten");
    assert_eq!(f.env.keys(&f.user).await?.len(), 1, "no key created");
    Ok(())
}

#[tokio::test]
async fn emergency_rotation_retires_the_leaked_key_without_a_soak() -> anyhow::Result<()> {
    let f = Fixture::new("emerg").await?;
    let leaked = f.env.create_key(&f.user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &leaked)?).await?;
    Api::<Deployment>::namespaced(f.env.kube.clone(), &f.ns)
        .create(&PostParams::default(), &deployment("web", 1, "creds")?)
        .await?;
    // A day-long soak that an emergency must skip.
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "24h"}}))
        .await?;
    let _op = f.operator().await?;
    wait_ikr(&f.ikrs, "app", "adopted", |o| active_key(o).is_some()).await?;
    f.ikrs
        .patch("app", &PatchParams::default(), &Patch::Merge(&annotate("rekey.dev/rotate-emergency", "leak-42")))
        .await?;
    let o = wait_ikr(&f.ikrs, "app", "emergency rotation complete", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await?;
    let keys = f.env.keys(&f.user).await?;
    assert!(!keys.contains_key(&leaked.access_key_id), "the leaked key is deleted: {keys:?}");
    assert_eq!(keys.len(), 1);
    assert_eq!(o.status.and_then(|s| s.last_emergency_request).as_deref(), Some("leak-42"));
    Ok(())
}

#[tokio::test]
async fn suspend_stops_every_write_until_lifted() -> anyhow::Result<()> {
    let f = Fixture::new("suspend").await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "suspend": true})).await?;
    let _op = f.operator().await?;
    wait_ikr(&f.ikrs, "app", "suspended with a plan", |o| {
        o.status.as_ref().and_then(|s| s.planned_step.as_deref()) == Some("Begin")
    })
    .await?;
    assert!(f.env.keys(&f.user).await?.is_empty(), "no key while suspended");
    assert!(f.secrets.get_opt("creds").await?.is_none(), "no Secret while suspended");
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"suspend": false}}))).await?;
    wait_ikr(&f.ikrs, "app", "bootstrapped after resume", |o| is_true(o, "Ready", "KeyInPlace")).await?;
    Ok(())
}

#[tokio::test]
async fn a_secret_applied_by_argo_cd_is_still_written_but_reported() -> anyhow::Result<()> {
    let f = Fixture::new("gitops").await?;
    let key = f.env.create_key(&f.user).await?;
    let mut s = key_secret("creds", &key)?;
    s.metadata.annotations =
        Some([("argocd.argoproj.io/tracking-id".to_owned(), "payments:/Secret:ns/creds".to_owned())].into());
    f.secrets.create(&PostParams::default(), &s).await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "0s"}}))
        .await?;
    let _op = f.operator().await?;
    let o = wait_ikr(&f.ikrs, "app", "Degraded/GitOpsManagedSecret", |o| is_true(o, "Degraded", "GitOpsManagedSecret"))
        .await?;
    assert!(is_true(&o, "Ready", "KeyInPlace"), "the Secret still works");
    let msg =
        o.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Degraded")).map(|c| c.message.clone());
    assert!(
        msg.as_deref().is_some_and(|m| m.contains("creds (Argo CD)") && m.contains("ignoreDifferences")),
        "{msg:?}"
    );
    // rekey still rotates it.
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&annotate("rekey.dev/rotate", "1"))).await?;
    wait_ikr(&f.ikrs, "app", "rotated", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await?;
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(f.env.kube.clone(), &f.ns)
        .list(&Default::default())
        .await?;
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("GitOpsManagedSecret") && e.type_.as_deref() == Some("Warning"))
    );
    Ok(())
}
