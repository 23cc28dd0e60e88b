//! docs/design.md, rule 8: IAM throttling and 5xx are retried with backoff, never for CreateAccessKey,
//! whose lost answer is recovered by the write-ahead marker. The fault proxy is shared by every
//! operator of the environment, so this binary holds one test that runs its scenarios in turn.

mod support;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rekey::api::Phase;
use serde_json::json;
use support::*;

async fn rotate_and_converge(f: &Fixture, value: &str, rotations: u32) -> anyhow::Result<String> {
    let patch = json!({"metadata": {"annotations": {"rekey.dev/rotate": value}}});
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    let o = wait_ikr(&f.ikrs, "app", "rotation converged", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == rotations && s.phase == Phase::Idle)
    })
    .await?;
    let key = active_key(&o).unwrap_or_default();
    let keys = f.env.keys(&f.user).await?;
    assert_eq!(keys.into_keys().collect::<Vec<_>>(), vec![key.clone()], "exactly the active key is left");
    Ok(key)
}

#[tokio::test]
async fn rotations_survive_throttling_5xx_and_a_lost_create_answer() -> anyhow::Result<()> {
    let f = Fixture::new("faults").await?;
    Api::<Deployment>::namespaced(f.env.kube.clone(), &f.ns)
        .create(&PostParams::default(), &deployment("web", 1, "creds")?)
        .await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "1s"}}))
        .await?;
    f.env.proxy_control("reset", json!({})).await?;
    let _op = f.operator().await?;
    let result = async {
        // 30% of IAM and STS calls throttled or failing with 5xx, before or after taking effect.
        f.env.proxy_control("faults", json!({"throttle": 0.15, "error": 0.1, "error_after": 0.05, "seed": 7})).await?;
        wait_ikr(&f.ikrs, "app", "bootstrap under faults", |o| phase(o) == Phase::Idle && active_key(o).is_some())
            .await?;
        rotate_and_converge(&f, "1", 1).await?;
        let stats = f.env.proxy_stats().await?;
        let faulted: u64 = stats["calls"]
            .as_object()
            .map(|calls| {
                calls
                    .values()
                    .flat_map(|o| ["throttled", "error", "error_after"].map(|k| o[k].as_u64().unwrap_or(0)))
                    .sum()
            })
            .unwrap_or(0);
        eprintln!("faults injected: {faulted}; proxy stats: {stats}");
        assert!(faulted > 0, "the proxy injected faults: {stats}");

        // The answer to CreateAccessKey lost after the key was made.
        f.env.proxy_control("faults", json!({})).await?;
        f.env.proxy_control("fail-next", json!({"action": "iam:CreateAccessKey", "fault": "error_after"})).await?;
        rotate_and_converge(&f, "2", 2).await?;
        let stats = f.env.proxy_stats().await?;
        assert_eq!(stats["calls"]["iam:CreateAccessKey"]["error_after"].as_u64(), Some(1), "{stats}");
        anyhow::Ok(())
    }
    .await;
    f.env.proxy_control("reset", json!({})).await?;
    result
}
