//! What GitOps tools show: the shipped Argo CD health check, run by Lua 5.1 (as Argo CD's
//! gopher-lua runs it) on the statuses a real rotation goes through.

mod support;

use anyhow::Context as _;
use kube::api::{Patch, PatchParams};
use rekey::api::{IamKeyRotation, Phase};
use serde_json::json;
use support::*;

/// Argo CD's verdict on `obj`: (health status, message).
async fn argocd_health(obj: &IamKeyRotation) -> anyhow::Result<(String, String)> {
    use tokio::io::AsyncWriteExt as _;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/gitops/argocd-health.lua");
    // Argo CD hands the script the object as the global `obj` and reads the table it returns.
    let runner = format!(
        "local cjson = require 'cjson'; obj = cjson.decode(io.read('*a')); local hs = dofile('{script}'); \
         io.write(hs.status, '\\n', hs.message or '')"
    );
    let mut child = tokio::process::Command::new("lua5.1")
        .args(["-e", &runner])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("lua5.1 (scripts/testenv installs it)")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(&serde_json::to_vec(obj)?).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    anyhow::ensure!(out.status.success(), "the health check failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let (status, message) = text.split_once('\n').context("two lines")?;
    Ok((status.to_owned(), message.to_owned()))
}

#[tokio::test]
async fn argocd_shows_progressing_healthy_degraded_and_suspended() -> anyhow::Result<()> {
    let f = Fixture::new("argocd").await?;
    let spec = json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "20s"}});
    f.create("app", spec).await?;
    let (status, message) = argocd_health(&f.ikrs.get("app").await?).await?;
    assert_eq!((status.as_str(), message.as_str()), ("Progressing", "Waiting for rekey to report a status"));

    let _op = f.operator().await?;
    let o = wait_ikr(&f.ikrs, "app", "bootstrapped", |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    let (status, message) = argocd_health(&o).await?;
    assert_eq!(status, "Healthy", "{message}");
    assert!(message.starts_with("Ready/KeyInPlace"), "{message}");

    // Mid-rotation (the old key waits 20 s before deletion): Progressing, naming the phase.
    let rotate = |v: &str| json!({"metadata": {"annotations": {"rekey.dev/rotate": v}}});
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&rotate("1"))).await?;
    let o = wait_ikr(&f.ikrs, "app", "rotating", |o| phase(o) != Phase::Idle).await?;
    let (status, message) = argocd_health(&o).await?;
    assert_eq!(status, "Progressing", "{message}");
    assert!(message.starts_with(&format!("Rotating/{}", phase(&o))), "{message}");
    let o = wait_ikr(&f.ikrs, "app", "rotated", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await?;
    assert_eq!(argocd_health(&o).await?.0, "Healthy");

    // Suspended, once rekey has seen the change; before that the spec is not judged yet.
    let suspend = |on: bool| json!({"spec": {"suspend": on}});
    let o = f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&suspend(true))).await?;
    assert_eq!(argocd_health(&o).await?.0, "Progressing", "generation {:?} not yet observed", o.metadata.generation);
    let o = wait_ikr(&f.ikrs, "app", "suspend observed", |o| {
        o.status.as_ref().and_then(|s| s.observed_generation) == o.metadata.generation
    })
    .await?;
    assert_eq!(argocd_health(&o).await?, ("Suspended".into(), "spec.suspend is true: no rotation starts".into()));
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&suspend(false))).await?;

    // A foreign key fills the user's quota: the next rotation cannot create one. Degraded, with why.
    f.env.create_key(&f.user).await?;
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&rotate("2"))).await?;
    let o = wait_ikr(&f.ikrs, "app", "Degraded", |o| is_true(o, "Degraded", "KeyQuotaExhausted")).await?;
    let (status, message) = argocd_health(&o).await?;
    assert_eq!(status, "Degraded");
    assert!(message.starts_with("Degraded/KeyQuotaExhausted: "), "{message}");
    Ok(())
}
