//! What an operator of rekey meets: health endpoints tied to the controller, and metrics.

mod support;

use rekey::api::Phase;
use rekey_testenv::env::{eventually, http_get};
use serde_json::json;
use support::*;

#[tokio::test]
async fn readiness_follows_the_cache_and_metrics_describe_the_rotation() -> anyhow::Result<()> {
    let f = Fixture::new("metrics").await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "0s"}}))
        .await?;
    let op = f.operator().await?;
    ready(&op).await?;
    assert_eq!(http_get(&op.http, "/healthz").await?, "ok");
    wait_ikr(&f.ikrs, "app", "bootstrapped", |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    let patch = json!({"metadata": {"annotations": {"rekey.dev/rotate": "1"}}});
    f.ikrs.patch("app", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await?;
    wait_ikr(&f.ikrs, "app", "rotated", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await?;
    let text = http_get(&op.http, "/metrics").await?;
    let labels = format!("namespace=\"{}\",name=\"app\"", f.ns);
    for want in [
        format!("rekey_key_age_seconds{{{labels},user=\"{}\"}}", f.user),
        format!("rekey_next_rotation_timestamp_seconds{{{labels},user=\"{}\"}}", f.user),
        format!("rekey_key_expiration_timestamp_seconds{{{labels},user=\"{}\"}}", f.user),
        format!("rekey_rotations_total{{{labels},result=\"completed\"}} 1"),
        format!("rekey_rotations_total{{{labels},result=\"rolled_back\"}} 0"),
        "rekey_leader 1".to_owned(),
        "rekey_build_info{version=".to_owned(),
        "process_resident_memory_bytes ".to_owned(),
        "rekey_aws_calls_total{operation=\"CreateAccessKey\",outcome=\"ok\"} 2".to_owned(),
        "rekey_phase_duration_seconds_count{phase=\"Soaking\"}".to_owned(),
        "rekey_reconcile_duration_seconds_count".to_owned(),
    ] {
        assert!(text.contains(&want), "/metrics lacks {want}:\n{text}");
    }
    // Every metric the shipped alerts and dashboard use is one rekey exports.
    let named = monitoring_metric_names()?;
    assert!(named.len() >= 8, "{named:?}");
    for name in &named {
        let family = ["_total", "_bucket", "_sum", "_count"].iter().fold(name.as_str(), |n, s| n.trim_end_matches(s));
        let exported = text.lines().any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            || text.contains(&format!("# TYPE {family} "));
        assert!(exported, "deploy/monitoring/ uses {name}, which /metrics does not export:\n{text}");
    }
    Ok(())
}

/// Without leader election and with nothing to manage yet, readiness still comes once the cache has
/// its first list: a Deployment run with --leader-election=false becomes Ready on an empty cluster.
#[tokio::test]
async fn ready_without_leader_election_and_without_resources() -> anyhow::Result<()> {
    let f = Fixture::new("ready").await?;
    let op = Operator::start(&f.ns, &[("REKEY_LEADER_ELECTION", "false")]).await?;
    ready(&op).await
}

/// Waits until /readyz says the leader's cache is synced (a standby also answers 200, differently).
async fn ready(op: &Operator) -> anyhow::Result<()> {
    eventually("/readyz answers 200 \"ready\"", WAIT, || async {
        Ok(match http_get(&op.http, "/readyz").await {
            Ok(body) if body == "ready" => Ok(()),
            Ok(body) => Err(body),
            Err(e) => Err(e.to_string()),
        })
    })
    .await
}

/// The `rekey_*` names in the PrometheusRule and the Grafana dashboard.
fn monitoring_metric_names() -> anyhow::Result<std::collections::BTreeSet<String>> {
    let mut names = std::collections::BTreeSet::new();
    for file in ["prometheusrule.yaml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(format!("{}/deploy/monitoring/{file}", env!("CARGO_MANIFEST_DIR")))?;
        let mut rest = text.as_str();
        while let Some(i) = rest.find("rekey_") {
            let tail = &rest[i..];
            let end = tail.find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    Ok(names)
}

async fn rekey(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_rekey")).args(args).output().await?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into()))
}

#[tokio::test]
async fn the_cli_shows_status_follows_a_rotation_and_fails_when_it_degrades() -> anyhow::Result<()> {
    let f = Fixture::new("cli").await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "0s"}}))
        .await?;
    let _op = f.operator().await?;
    let o = wait_ikr(&f.ikrs, "app", "bootstrapped", |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    let key = active_key(&o).unwrap_or_default();
    let (ok, out, _) = rekey(&["status", "-n", &f.ns]).await?;
    assert!(ok && out.contains(&f.user) && out.contains(&key) && out.contains("Idle"), "{out}");

    let (ok, out, err) = rekey(&["rotate", "-n", &f.ns, "app", "--wait", "--timeout", "2m"]).await?;
    assert!(ok, "rotate --wait failed: {out}{err}");
    assert!(out.contains("done in"), "{out}");
    let (_, out, _) = rekey(&["status", "-n", &f.ns, "app"]).await?;
    assert!(!out.contains(&key), "the old key is gone from the status: {out}");

    // A foreign key fills the quota: the rotation ends Degraded and the CLI says so, non-zero.
    f.env.create_key(&f.user).await?;
    let (ok, out, err) = rekey(&["rotate", "-n", &f.ns, "app", "--wait", "--timeout", "2m"]).await?;
    assert!(!ok, "{out}");
    assert!(err.contains("Degraded/KeyQuotaExhausted"), "{err}");

    let (ok, out, _) = rekey(&["retire", "-n", &f.ns, "app"]).await?;
    assert!(ok && out.contains("rekey.dev/retire="), "{out}");
    let o = f.ikrs.get("app").await?;
    assert!(o.metadata.annotations.unwrap_or_default().contains_key("rekey.dev/retire"));
    Ok(())
}
