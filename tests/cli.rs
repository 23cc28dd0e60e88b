//! The `rekey` CLI as a person at a terminal meets it: kubectl's flags and namespace defaults,
//! output formats, exit codes, the kubectl plugin name, `check` and `version` — and the CRD's
//! Ready=False/KeyExpired that `status` and `kubectl get` show.

mod support;

use std::path::PathBuf;

use rekey::api::Phase;
use rekey_testenv::env::eventually;
use serde_json::json;
use support::*;

struct Run {
    code: Option<i32>,
    out: String,
    err: String,
}

async fn rekey_as(program: &std::path::Path, args: &[&str], path: Option<&str>) -> anyhow::Result<Run> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    let out = cmd.output().await?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok(Run { code: out.status.code(), out: text(&out.stdout), err: text(&out.stderr) })
}

async fn rekey(args: &[&str]) -> anyhow::Result<Run> {
    rekey_as(std::path::Path::new(env!("CARGO_BIN_EXE_rekey")), args, None).await
}

/// A kubeconfig whose current context has `ns` as its namespace, plus a context "elsewhere" on the
/// same cluster without one (so: "default").
fn kubeconfig_in(ns: &str) -> anyhow::Result<String> {
    let path = std::env::var("KUBECONFIG")?;
    let mut cfg: serde_json::Value = serde_saphyr::from_str(&std::fs::read_to_string(path)?)?;
    let current = cfg["current-context"].as_str().unwrap_or_default().to_owned();
    let contexts = cfg["contexts"].as_array_mut().ok_or_else(|| anyhow::anyhow!("no contexts"))?;
    let mut elsewhere = contexts.iter().find(|c| c["name"].as_str() == Some(&current)).cloned().unwrap_or_default();
    for c in contexts.iter_mut().filter(|c| c["name"].as_str() == Some(&current)) {
        c["context"]["namespace"] = ns.into();
    }
    elsewhere["name"] = "elsewhere".into();
    if let Some(m) = elsewhere["context"].as_object_mut() {
        m.remove("namespace");
    }
    contexts.push(elsewhere);
    let file = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("kubeconfig-{ns}"));
    std::fs::write(&file, serde_saphyr::to_string(&cfg)?)?;
    Ok(file.display().to_string())
}

#[tokio::test]
async fn status_follows_kubectl_namespace_selector_and_output_conventions() -> anyhow::Result<()> {
    let f = Fixture::new("cli-status").await?;
    let spec = json!({"userName": f.user, "secrets": [{"name": "creds"}], "suspend": true});
    f.create("app", spec.clone()).await?;
    f.create("batch", spec).await?;
    let patch = json!({"metadata": {"labels": {"team": "a"}}});
    f.ikrs.patch("app", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await?;
    let kc = kubeconfig_in(&f.ns)?;

    // No -n: the context's namespace, for a list and for a name; no NAMESPACE column.
    let r = rekey(&["status", "--kubeconfig", &kc]).await?;
    assert_eq!(r.code, Some(0), "{}", r.err);
    assert!(r.out.starts_with("NAME ") && r.out.contains("app ") && r.out.contains("batch "), "{}", r.out);
    let r = rekey(&["status", "--kubeconfig", &kc, "app", "-o", "json"]).await?;
    let o: serde_json::Value = serde_json::from_str(&r.out)?;
    assert_eq!((o["kind"].as_str(), o["spec"]["userName"].as_str()), (Some("IamKeyRotation"), Some(f.user.as_str())));
    assert!(o["metadata"].get("managedFields").is_none(), "{o}");

    // -l, -A and yaml: a List of the selected resources, with their namespace.
    let r = rekey(&["status", "--kubeconfig", &kc, "-l", "team=a", "-o", "yaml"]).await?;
    let list: serde_json::Value = serde_saphyr::from_str(&r.out)?;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "{}", r.out);
    let r = rekey(&["status", "--kubeconfig", &kc, "-A", "-l", "team=a", "-o", "wide"]).await?;
    let head = r.out.lines().next().unwrap_or_default();
    assert!(head.starts_with("NAMESPACE ") && head.ends_with("MESSAGE"), "{}", r.out);
    assert!(r.out.contains(&f.ns), "{}", r.out);

    // Another context, another namespace: the name is not found there, and the error says where.
    let r = rekey(&["status", "--kubeconfig", &kc, "--context", "elsewhere", "app"]).await?;
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("iamkeyrotation app not found in namespace default"), "{}", r.err);
    let r = rekey(&["status", "--kubeconfig", &kc, "-A", "app"]).await?;
    assert_eq!(r.code, Some(1), "a name across all namespaces is refused, as kubectl refuses it");
    let r = rekey(&["status", "--kubeconfig", &kc, "--no-such-flag"]).await?;
    assert_eq!(r.code, Some(1), "a usage error is an error (1), not an outcome (2)");
    Ok(())
}

#[tokio::test]
async fn rotate_waits_for_the_outcome_and_says_it_with_its_exit_code() -> anyhow::Result<()> {
    let f = Fixture::new("cli-rotate").await?;
    let spec = |suspend| json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "0s"}, "suspend": suspend});
    f.create("app", spec(false)).await?;
    let patch = json!({"metadata": {"labels": {"team": "a"}}});
    f.ikrs.patch("app", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await?;
    let _op = f.operator().await?;
    wait_ikr(&f.ikrs, "app", "bootstrapped", |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    let kc = kubeconfig_in(&f.ns)?;

    let r = rekey(&["rotate", "--kubeconfig", &kc, "-l", "team=a", "--wait", "--timeout", "2m"]).await?;
    assert_eq!(r.code, Some(0), "{}{}", r.out, r.err);
    assert!(r.out.contains("done in"), "{}", r.out);

    // With the default deleteAfter (1h) the wait ends once the new key is in use, not an hour later.
    let soak = |after: &str| json!({"spec": {"retirement": {"deleteAfter": after}}});
    let merge = |v: &serde_json::Value| kube::api::Patch::Merge(v.clone());
    f.ikrs.patch("app", &kube::api::PatchParams::default(), &merge(&soak("1h"))).await?;
    let r = rekey(&["rotate", "--kubeconfig", &kc, "app", "--wait", "--timeout", "2m"]).await?;
    assert_eq!(r.code, Some(0), "{}{}", r.out, r.err);
    let o = f.ikrs.get("app").await?;
    assert!(
        matches!(phase(&o), Phase::Deactivating | Phase::Soaking),
        "done while the old key is retired: {:?}",
        phase(&o)
    );
    f.ikrs.patch("app", &kube::api::PatchParams::default(), &merge(&soak("0s"))).await?;
    wait_ikr(&f.ikrs, "app", "old key deleted", |o| phase(o) == Phase::Idle).await?;

    // Suspended: the request is never acted on; --wait gives up at its timeout with 3.
    f.ikrs
        .patch("app", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&json!({"spec": spec(true)})))
        .await?;
    let r = rekey(&["rotate", "--kubeconfig", &kc, "app", "--wait", "--timeout", "2s"]).await?;
    assert_eq!(r.code, Some(3), "{}{}", r.out, r.err);
    assert!(r.err.contains("timed out: app not done"), "{}", r.err);

    // A foreign key fills the quota: only a person can clear it, so the wait ends with 2.
    f.ikrs
        .patch("app", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&json!({"spec": spec(false)})))
        .await?;
    f.env.create_key(&f.user).await?;
    let r = rekey(&["rotate", "--kubeconfig", &kc, "app", "--wait", "--timeout", "2m"]).await?;
    assert_eq!(r.code, Some(2), "{}{}", r.out, r.err);
    assert!(r.err.contains("Degraded/KeyQuotaExhausted"), "{}", r.err);
    Ok(())
}

#[tokio::test]
async fn a_key_past_max_key_age_is_not_ready_and_every_view_says_key_expired() -> anyhow::Result<()> {
    let f = Fixture::new("cli-expired").await?;
    f.create(
        "app",
        json!({"userName": f.user, "secrets": [{"name": "creds"}], "maxKeyAge": "1h", "rotateBefore": "30m"}),
    )
    .await?;
    let _op = f.operator().await?;
    wait_ikr(&f.ikrs, "app", "bootstrapped and Ready", |o| is_true(o, "Ready", "KeyInPlace")).await?;
    // Suspended, nothing replaces the key: it outlives a short maxKeyAge, and Ready turns False
    // at that moment without any other event.
    let spec = json!({"spec": {"suspend": true, "maxKeyAge": "20s", "rotateBefore": "10s"}});
    f.ikrs.patch("app", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&spec)).await?;
    let o = wait_ikr(&f.ikrs, "app", "Ready=False/KeyExpired", |o| {
        condition(o, "Ready").is_some_and(|(s, r)| s == "False" && r == "KeyExpired")
    })
    .await?;
    let key = active_key(&o).unwrap_or_default();
    assert!(message(&o, "Ready").unwrap_or_default().contains(&format!("key {key} (created ")), "{o:?}");
    let r = rekey(&["status", "-n", &f.ns, "-o", "wide"]).await?;
    assert!(r.out.contains("KeyExpired") && r.out.contains("False"), "{}", r.out);
    let out = tokio::process::Command::new("kubectl").args(["get", "ikr", "-n", &f.ns, "-o", "wide"]).output().await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let head = text.lines().next().unwrap_or_default();
    for col in ["READY", "REASON", "MESSAGE", "AGE"] {
        assert!(head.contains(col), "kubectl get -o wide lacks {col}: {text}");
    }
    assert!(text.contains("KeyExpired"), "{text}");
    Ok(())
}

#[tokio::test]
async fn check_reports_the_crd_the_leader_and_the_metrics() -> anyhow::Result<()> {
    let f = Fixture::new("cli-check").await?;
    let op = f.operator().await?;
    let url = format!("{}/metrics", op.http);
    let args = ["check", "--operator-namespace", &f.ns, "--metrics-url", &url];
    let r = eventually("rekey check passes", WAIT, || async {
        let r = rekey(&args).await?;
        Ok(if r.code == Some(0) { Ok(r) } else { Err(format!("{}{}", r.out, r.err)) })
    })
    .await?;
    assert!(r.out.contains("storage version v1alpha1") && r.out.contains("schema matches"), "{}", r.out);
    assert!(r.out.contains(&format!("Lease {}/rekey held by", f.ns)), "{}", r.out);

    // No Lease there, and no metrics Service to proxy to: unhealthy, exit 2, each said.
    let r = rekey(&["check", "--operator-namespace", "default", "--lease-name", "no-such-lease"]).await?;
    assert_eq!(r.code, Some(2), "{}{}", r.out, r.err);
    assert!(r.out.contains("Leader   FAIL  no Lease default/no-such-lease"), "{}", r.out);
    assert!(r.out.contains("Metrics  FAIL  service default/rekey-metrics:metrics"), "{}", r.out);
    Ok(())
}

#[tokio::test]
async fn it_runs_as_kubectl_rekey_and_tells_its_version_and_completions() -> anyhow::Result<()> {
    // kubectl finds plugins on PATH by name; a link is what krew installs.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plugin-bin");
    std::fs::create_dir_all(&dir)?;
    let link = dir.join("kubectl-rekey");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_rekey"), &link)?;
    let path = format!("{}:{}", dir.display(), std::env::var("PATH")?);
    let kubectl = std::path::Path::new("kubectl");
    let r = rekey_as(kubectl, &["rekey", "status", "--help"], Some(&path)).await?;
    assert_eq!(r.code, Some(0), "{}", r.err);
    assert!(r.out.contains("Usage: kubectl rekey status"), "{}", r.out);

    let r = rekey(&["version"]).await?;
    let commit = r.out.split("(commit ").nth(1).and_then(|s| s.split(')').next()).unwrap_or_default().to_owned();
    assert!(r.out.starts_with(&format!("Client Version: rekey {}", env!("CARGO_PKG_VERSION"))), "{}", r.out);
    assert!(commit == "unknown" || commit.chars().all(|c| c.is_ascii_hexdigit()) && commit.len() >= 7, "{}", r.out);
    assert!(r.out.contains("Server Version: v1."), "{}", r.out);

    for shell in ["bash", "zsh", "fish"] {
        let r = rekey(&["completion", shell]).await?;
        assert!(r.code == Some(0) && r.out.contains("rotate") && r.out.contains("kubeconfig"), "{shell}: {}", r.err);
    }
    Ok(())
}
