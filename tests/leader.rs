//! Two replicas with leader election: only the leader acts; killing it mid-rotation hands the
//! rotation to the other, with no double create.

mod support;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rekey::api::Phase;
use rekey_testenv::env::eventually;
use serde_json::json;
use support::*;

#[tokio::test]
async fn killing_the_leader_mid_rotation_hands_over_without_a_double_create() -> anyhow::Result<()> {
    let f = Fixture::new("leader").await?;
    Api::<Deployment>::namespaced(f.env.kube.clone(), &f.ns)
        .create(&PostParams::default(), &deployment("web", 1, "creds")?)
        .await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "5s"}}))
        .await?;
    // This binary's only test: the proxy's counters are this test's calls.
    f.env.proxy_control("reset", json!({})).await?;
    let mut ops = [f.operator().await?, f.operator().await?];
    wait_ikr(&f.ikrs, "app", "bootstrapped", |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    let patch = json!({"metadata": {"annotations": {"rekey.dev/rotate": "1"}}});
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    // Past the new key's creation (committed): a second CreateAccessKey could then only come from
    // two replicas acting at once. (A kill inside the create window is the crash tests' subject:
    // the orphan is found and deleted, and the create repeated.)
    wait_ikr(&f.ikrs, "app", "rotation past Creating", |o| {
        matches!(
            phase(o),
            Phase::Verifying | Phase::Distributing | Phase::RollingOut | Phase::Deactivating | Phase::Soaking
        )
    })
    .await?;
    // Kill whichever replica holds the Lease.
    let leases: Api<Lease> = Api::namespaced(f.env.kube.clone(), &f.ns);
    let holder = leases.get("rekey").await?.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    let leader = ops
        .iter()
        .position(|o| o.pid().is_some_and(|p| holder == format!("rekey-{p}")))
        .ok_or_else(|| anyhow::anyhow!("no replica holds the Lease ({holder})"))?;
    ops[leader].kill().await?;
    eventually("the other replica takes the Lease", WAIT, || async {
        let h = leases.get("rekey").await?.spec.and_then(|s| s.holder_identity).unwrap_or_default();
        Ok(if h != holder && !h.is_empty() { Ok(()) } else { Err(h) })
    })
    .await?;
    let o = wait_ikr(&f.ikrs, "app", "rotation finished by the new leader", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await?;
    let key = active_key(&o).unwrap_or_default();
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), vec![key]);
    let stats = f.env.proxy_stats().await?;
    let created = stats["calls"]["iam:CreateAccessKey"]["ok"].as_u64();
    assert_eq!(created, Some(2), "one CreateAccessKey for the bootstrap, one for the rotation: {stats}");
    Ok(())
}
