//! Benchmarks on the local control plane (`scripts/bench`): every figure is measured, printed as a
//! table, and never asserted (these machines are shared and noisy).
//!
//! AWS calls are counted at the fault proxy every operator call goes through; Kubernetes writes in
//! kube-apiserver's audit log, where the operator is told apart by its own ServiceAccount (the
//! shipped cluster-wide RBAC) and the plain script by kubectl's user agent.
//! Sizes: REKEY_BENCH_RESOURCES (1000), REKEY_BENCH_LARGE (10000), REKEY_BENCH_UNRELATED (10000),
//! REKEY_BENCH_IDLE_SECS (600), REKEY_BENCH_LATENCY_N (100), REKEY_BENCH_CALLS_PER_SECOND (100),
//! REKEY_BENCH_ROUNDS (3: rounds of the exposure-window comparison).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "scale/retirement.rs"]
mod retirement;

#[path = "scale/burst.rs"]
mod burst;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt as _;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use rekey::api::{IamKeyRotation, Phase};
use rekey_testenv::env::{TestEnv, eventually, http_get};
use serde_json::json;
use support::*;

const BENCH_SA: &str = "rekey-bench";
const PARALLEL: usize = 32;

fn size(var: &str, default: u64) -> u64 {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Table(Vec<(String, String, String)>);

impl Table {
    fn row(&mut self, what: impl Into<String>, figure: impl Into<String>, target: impl Into<String>) {
        let (what, figure, target) = (what.into(), figure.into(), target.into());
        eprintln!("bench: {what}: {figure}");
        self.0.push((what, figure, target));
    }

    fn print(&self) {
        println!("| measure | figure | target |");
        println!("| --- | --- | --- |");
        for (w, f, t) in &self.0 {
            println!("| {w} | {f} | {t} |");
        }
    }
}

/// Kubernetes writes in the audit log after byte `from`, by `who`, as "resource[/subresource] verb".
fn audit_writes(from: u64, who: impl Fn(&serde_json::Value) -> bool) -> anyhow::Result<BTreeMap<String, u64>> {
    let path = std::env::var("REKEY_TEST_AUDIT_LOG").context("REKEY_TEST_AUDIT_LOG")?;
    let bytes = std::fs::read(&path)?;
    let mut out = BTreeMap::new();
    for line in bytes.get(from as usize..).unwrap_or_default().split(|b| *b == b'\n') {
        let Ok(e) = serde_json::from_slice::<serde_json::Value>(line) else { continue };
        if e["stage"] != "ResponseComplete" || !who(&e) {
            continue;
        }
        let r = &e["objectRef"];
        let mut what = r["resource"].as_str().unwrap_or("?").to_owned();
        if let Some(sub) = r["subresource"].as_str() {
            what = format!("{what}/{sub}");
        }
        *out.entry(format!("{what} {}", e["verb"].as_str().unwrap_or("?"))).or_default() += 1;
    }
    Ok(out)
}

fn audit_offset() -> anyhow::Result<u64> {
    Ok(std::fs::metadata(std::env::var("REKEY_TEST_AUDIT_LOG")?)?.len())
}

fn by_operator(e: &serde_json::Value) -> bool {
    e["user"]["username"] == format!("system:serviceaccount:{OPERATOR_NS}:{BENCH_SA}")
        && e["objectRef"]["resource"] != "leases"
}

fn by_kubectl(e: &serde_json::Value) -> bool {
    e["userAgent"].as_str().is_some_and(|a| a.starts_with("kubectl"))
}

fn total(m: &BTreeMap<String, u64>) -> u64 {
    m.values().sum()
}

fn list(m: &BTreeMap<String, u64>) -> String {
    m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
}

/// LIST requests the apiserver served so far for the workload kinds the consumer census reads, by
/// resource (its `apiserver_request_total`; nothing else on the test control plane lists them while
/// a benchmark runs: the controller-manager and the simulated kubelet watch).
async fn census_lists(env: &TestEnv) -> anyhow::Result<BTreeMap<String, u64>> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = env.kube.request_text(req).await?;
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{") && l.contains("verb=\"LIST\"")) {
        let Some(resource) = line.split("resource=\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
        if !["pods", "replicasets", "deployments", "statefulsets", "daemonsets"].contains(&resource) {
            continue;
        }
        let n: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        *out.entry(resource.to_owned()).or_default() += n as u64;
    }
    Ok(out)
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after.iter().map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0))).filter(|(_, v)| *v > 0).collect()
}

/// AWS calls at the proxy since its last reset, by "service:Action", successful or not.
async fn aws_calls(env: &TestEnv) -> anyhow::Result<(BTreeMap<String, u64>, u64)> {
    let stats = env.proxy_stats().await?;
    let mut out = BTreeMap::new();
    for (action, outcomes) in stats["calls"].as_object().into_iter().flatten() {
        let n: u64 = outcomes.as_object().into_iter().flatten().filter_map(|(_, n)| n.as_u64()).sum();
        out.insert(action.trim_start_matches("iam:").to_owned(), n);
    }
    Ok((out, stats["max_per_second"].as_u64().unwrap_or(0)))
}

fn rss_mib(op: &Operator) -> anyhow::Result<f64> {
    let pid = op.pid().context("operator exited")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    Ok(kib / 1024.0)
}

async fn operator(ns: &str, kubeconfig: &Path, extra: &[(&str, &str)]) -> anyhow::Result<Operator> {
    let lease = format!("rekey-bench-{ns}");
    let mut vars = vec![
        ("KUBECONFIG", kubeconfig.to_str().context("path")?),
        ("REKEY_LEASE_NAMESPACE", OPERATOR_NS),
        ("REKEY_LEASE_NAME", lease.as_str()),
    ];
    vars.extend_from_slice(extra);
    // The shipped Lease Role names one Lease; this identity may hold the benchmark's.
    let roles: Api<k8s_openapi::api::rbac::v1::Role> = Api::namespaced(TestEnv::get().await?.kube, OPERATOR_NS);
    let patch = json!({"rules": [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [lease],
         "verbs": ["get", "watch", "list", "patch", "update"]}]});
    roles.patch(BENCH_SA, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Operator::start(ns, &vars).await
}

async fn ready(api: &Api<IamKeyRotation>, name: &str) -> anyhow::Result<bool> {
    let o = api.get(name).await?;
    Ok(condition(&o, "Ready").is_some_and(|c| c.0 == "True"))
}

/// Waits until every resource of the namespace satisfies `done`; returns how long it took.
async fn all(
    api: &Api<IamKeyRotation>,
    what: &str,
    n: usize,
    done: impl Fn(&IamKeyRotation) -> bool,
) -> anyhow::Result<Duration> {
    // Every 2 s: a list of thousands of resources is a load of its own on the apiserver.
    let t0 = Instant::now();
    loop {
        let items = api.list(&ListParams::default()).await?.items;
        let k = items.iter().filter(|o| done(o)).count();
        if k >= n {
            return Ok(t0.elapsed());
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(3600), "{what}: {k}/{n} after an hour");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

/// One rotation of a 2-replica Deployment's key by rekey, then the same by a plain script.
async fn one_rotation(env: &TestEnv, kubeconfig: &Path, t: &mut Table) -> anyhow::Result<()> {
    let ns = env.namespace("bench-one").await?;
    let user = consenting_user(env, "bench-one", &ns).await?;
    let deployments: Api<Deployment> = Api::namespaced(env.kube.clone(), &ns);
    deployments.create(&PostParams::default(), &deployment("web", 2, "creds")?).await?;
    let ikrs: Api<IamKeyRotation> = Api::namespaced(env.kube.clone(), &ns);
    let spec = json!({"userName": user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "0s"}});
    ikrs.create(&PostParams::default(), &ikr("app", spec)?).await?;
    let _op = operator(&ns, kubeconfig, &[]).await?;
    wait_ikr(&ikrs, "app", "bootstrapped", |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    deployment_ready(&deployments, "web", WAIT).await?;
    env.proxy_control("reset", json!({})).await?;
    let from = audit_offset()?;
    let lists_before = census_lists(env).await?;
    let t0 = Instant::now();
    let patch = json!({"metadata": {"annotations": {"rekey.dev/rotate": "1"}}});
    ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    wait_ikr(&ikrs, "app", "rotated", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await?;
    let rekey_secs = t0.elapsed().as_secs_f64();
    let lists = delta(&census_lists(env).await?, &lists_before);
    let (calls, _) = aws_calls(env).await?;
    let writes = audit_writes(from, by_operator)?;
    t.row("AWS calls, one rotation (2-replica Deployment)", format!("{} ({})", total(&calls), list(&calls)), "≤ 10");
    let events: u64 = writes.iter().filter(|(k, _)| k.starts_with("events")).map(|(_, n)| n).sum();
    t.row(
        "Kubernetes writes by rekey, one rotation",
        format!("{} ({}): {} besides Events", total(&writes), list(&writes), total(&writes) - events),
        "≤ 15 + Events",
    );
    t.row("rekey: wall time of that rotation (deleteAfter 0s)", format!("{rekey_secs:.1} s"), "—");
    t.row("consumer census: LISTs during that rotation", format!("{} ({})", total(&lists), list(&lists)), "—");

    // The plain script, on a twin namespace: same Deployment, a key the admin made.
    let ns2 = env.namespace("bench-script").await?;
    let user2 = env.create_user("bench-script").await?;
    let key = env.create_key(&user2).await?;
    let secrets: Api<Secret> = Api::namespaced(env.kube.clone(), &ns2);
    secrets.create(&PostParams::default(), &key_secret("creds", &key)?).await?;
    let deployments2: Api<Deployment> = Api::namespaced(env.kube.clone(), &ns2);
    deployments2.create(&PostParams::default(), &deployment("web", 2, "creds")?).await?;
    deployment_ready(&deployments2, "web", WAIT).await?;
    env.proxy_control("reset", json!({})).await?;
    let from = audit_offset()?;
    let t0 = Instant::now();
    plain_script(env, &ns2, &user2).await?;
    let script_secs = t0.elapsed().as_secs_f64();
    let (calls2, _) = aws_calls(env).await?;
    let writes2 = audit_writes(from, by_kubectl)?;
    t.row("plain script (aws cli + kubectl): wall time", format!("{script_secs:.1} s"), "—");
    t.row("plain script: AWS calls", format!("{} ({})", total(&calls2), list(&calls2)), "—");
    t.row("plain script: Kubernetes writes", format!("{} ({})", total(&writes2), list(&writes2)), "—");
    t.row(
        "rekey / plain script",
        format!(
            "wall time ×{:.1}, AWS calls ×{:.1}, Kubernetes writes ×{:.1}",
            rekey_secs / script_secs,
            total(&calls) as f64 / total(&calls2).max(1) as f64,
            total(&writes) as f64 / total(&writes2).max(1) as f64
        ),
        "—",
    );
    Ok(())
}

/// The old key's exposure window, rekey beside the plain script (benches/scale/retirement.rs).
async fn exposure(env: &TestEnv, kubeconfig: &Path, t: &mut Table) -> anyhow::Result<()> {
    let n = size("REKEY_BENCH_ROUNDS", 3) as usize;
    let mut rekey = Vec::new();
    let mut script = Vec::new();
    for round in 0..n {
        rekey.push(retirement::rekey_round(env, kubeconfig, round).await?);
        script.push(retirement::script_round(env).await?);
    }
    for (what, figure, target) in retirement::rows(&rekey, &script) {
        t.row(what, figure, target);
    }
    Ok(())
}

/// create → Ready for a bootstrap with no workloads, one resource at a time.
async fn latency(env: &TestEnv, kubeconfig: &Path, t: &mut Table) -> anyhow::Result<()> {
    let n = size("REKEY_BENCH_LATENCY_N", 100);
    let ns = env.namespace("bench-latency").await?;
    let mut users = Vec::new();
    for _ in 0..n {
        users.push(consenting_user(env, "bench-lat", &ns).await?);
    }
    let ikrs: Api<IamKeyRotation> = Api::namespaced(env.kube.clone(), &ns);
    let op = operator(&ns, kubeconfig, &[]).await?;
    eventually("operator ready", WAIT, || async { Ok(http_get(&op.http, "/readyz").await.map_err(|e| e.to_string())) })
        .await?;
    let mut secs = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let name = format!("app{i}");
        let spec = json!({"userName": user, "secrets": [{"name": format!("creds{i}")}]});
        let t0 = Instant::now();
        ikrs.create(&PostParams::default(), &ikr(&name, spec)?).await?;
        while !ready(&ikrs, &name).await? {
            anyhow::ensure!(t0.elapsed() < WAIT, "{name} not Ready after {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        secs.push(t0.elapsed().as_secs_f64());
    }
    secs.sort_by(f64::total_cmp);
    t.row(
        format!("create → Ready, bootstrap without workloads (n={n}, polled every 0.05 s)"),
        format!("p50 {:.2} s, p99 {:.2} s", percentile(&secs, 0.5), percentile(&secs, 0.99)),
        "—",
    );
    Ok(())
}

/// Many resources: bootstrap, idle, all due at once, memory.
async fn scale(env: &TestEnv, kubeconfig: &Path, t: &mut Table) -> anyhow::Result<()> {
    let n = size("REKEY_BENCH_RESOURCES", 1000) as usize;
    let large = size("REKEY_BENCH_LARGE", 10_000) as usize;
    let unrelated = size("REKEY_BENCH_UNRELATED", 10_000) as usize;
    let idle_secs = size("REKEY_BENCH_IDLE_SECS", 600);
    let cap = size("REKEY_BENCH_CALLS_PER_SECOND", 100).to_string();
    let ns = env.namespace("bench-scale").await?;
    let ikrs: Api<IamKeyRotation> = Api::namespaced(env.kube.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(env.kube.clone(), &ns);
    let users = make_users(env, &ns, n).await?;
    create_resources(&ikrs, &users, 0, false).await?;
    let max = n.max(large).to_string();
    let op =
        operator(&ns, kubeconfig, &[("REKEY_AWS_CALLS_PER_SECOND", &cap), ("REKEY_MAX_CONCURRENT_ROTATIONS", &max)])
            .await?;
    env.proxy_control("reset", json!({})).await?;
    let took = all(&ikrs, "all bootstrapped", n, |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    let (calls, peak) = aws_calls(env).await?;
    t.row(
        format!("{n} resources created at once: all bootstrapped"),
        format!("{:.0} s, {} AWS calls, peak {peak}/s (cap {cap}/s)", took.as_secs_f64(), total(&calls)),
        "—",
    );
    t.row(format!("operator RSS, {n} resources"), format!("{:.1} MiB", rss_mib(&op)?), "—");

    env.proxy_control("reset", json!({})).await?;
    let from = audit_offset()?;
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let (calls, _) = aws_calls(env).await?;
    let writes = audit_writes(from, by_operator)?;
    t.row(
        format!("{n} resources idle for {idle_secs} s"),
        format!(
            "{} AWS calls, {} Kubernetes writes{}",
            total(&calls),
            total(&writes),
            if writes.is_empty() { String::new() } else { format!(" ({})", list(&writes)) }
        ),
        "0 (Lease renewals aside)",
    );

    env.proxy_control("reset", json!({})).await?;
    let t0 = Instant::now();
    request_all(&ikrs, n, "rekey.dev/rotate").await?;
    all(&ikrs, "all rotated", n, |o| o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle))
        .await?;
    let took = t0.elapsed();
    let (calls, peak) = aws_calls(env).await?;
    t.row(
        format!("{n} resources due at once (deleteAfter 0s, cap {cap} AWS calls/s): all Idle again"),
        format!("{:.0} s; {} AWS calls, highest rate {peak}/s", took.as_secs_f64(), total(&calls)),
        format!("≤ 180 s, rate ≤ {cap}/s"),
    );

    emergencies(env, &ikrs, n, &cap, t).await?;

    // Up to `large` resources (the extra ones suspended: their first look costs two IAM reads, then
    // nothing), their Secrets, and Secrets rekey has nothing to do with.
    let extra = large.saturating_sub(n);
    let more = make_users(env, &ns, extra).await?;
    create_resources(&ikrs, &more, n, true).await?;
    create_secrets(&secrets, "managed", extra, true).await?;
    create_secrets(&secrets, "unrelated", unrelated, false).await?;
    all(&ikrs, "all looked at", large, |o| o.status.as_ref().is_some_and(|s| s.observed_generation.is_some())).await?;
    t.row(
        format!("operator RSS, {large} resources ({extra} suspended) + {unrelated} unrelated Secrets"),
        format!("{:.1} MiB", rss_mib(&op)?),
        "≤ 64 MiB",
    );
    Ok(())
}

/// Only the emergencies of `scale`: `n` resources bootstrapped, then every key leaked at once.
async fn leaked(env: &TestEnv, kubeconfig: &Path, t: &mut Table) -> anyhow::Result<()> {
    let n = size("REKEY_BENCH_RESOURCES", 1000) as usize;
    let cap = size("REKEY_BENCH_CALLS_PER_SECOND", 100).to_string();
    let ns = env.namespace("bench-leaked").await?;
    let ikrs: Api<IamKeyRotation> = Api::namespaced(env.kube.clone(), &ns);
    let users = make_users(env, &ns, n).await?;
    create_resources(&ikrs, &users, 0, false).await?;
    let max = n.to_string();
    let _op =
        operator(&ns, kubeconfig, &[("REKEY_AWS_CALLS_PER_SECOND", &cap), ("REKEY_MAX_CONCURRENT_ROTATIONS", &max)])
            .await?;
    all(&ikrs, "all bootstrapped", n, |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    emergencies(env, &ikrs, n, &cap, t).await
}

/// Every key leaked at once: `n` emergency rotations requested together; when is every old key off?
async fn emergencies(
    env: &TestEnv,
    ikrs: &Api<IamKeyRotation>,
    n: usize,
    cap: &str,
    t: &mut Table,
) -> anyhow::Result<()> {
    // Rotations done before: the leaked key is gone once one more is.
    let before: std::collections::HashMap<String, u32> = ikrs
        .list(&Default::default())
        .await?
        .items
        .iter()
        .map(|o| (o.name_any(), o.status.as_ref().map_or(0, |s| s.rotations)))
        .collect();
    env.proxy_control("reset", json!({})).await?;
    let t0 = Instant::now();
    request_all(ikrs, n, "rekey.dev/rotate-emergency").await?;
    // The leaked key is off once it is Inactive (the rotation may still be finishing) or deleted.
    all(ikrs, "every leaked key off", n, |o| {
        let done = before.get(&o.name_any()).copied().unwrap_or(0) + 1;
        o.status.as_ref().is_some_and(|s| {
            s.rotations >= done || s.retiring_key.as_ref().is_some_and(|r| r.state == rekey::api::KeyState::Inactive)
        })
    })
    .await?;
    let off = t0.elapsed();
    let (calls, peak) = aws_calls(env).await?;
    let abandoned = ikrs
        .list(&Default::default())
        .await?
        .items
        .iter()
        .filter(|o| {
            o.status
                .as_ref()
                .is_some_and(|s| s.history.iter().any(|h| h.outcome == rekey::api::HistoryOutcome::Abandoned))
        })
        .count();
    t.row(
        format!("{n} emergency rotations requested at once (cap {cap} IAM calls/s): every leaked key off"),
        format!(
            "{:.0} s; {} AWS calls, highest rate {peak}/s; {abandoned} resources with an abandoned attempt",
            off.as_secs_f64(),
            total(&calls)
        ),
        "≤ 60 s",
    );
    Ok(())
}

/// Sets annotation `annotation` to "1" on resources app0..app{n}, PARALLEL at a time.
async fn request_all(ikrs: &Api<IamKeyRotation>, n: usize, annotation: &str) -> anyhow::Result<()> {
    futures::stream::iter(0..n)
        .map(|i| {
            let ikrs = ikrs.clone();
            let patch = json!({"metadata": {"annotations": {annotation: "1"}}});
            async move { ikrs.patch(&format!("app{i}"), &PatchParams::default(), &Patch::Merge(&patch)).await }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// Runs scripts/bench-plain-rotation on namespace `ns` (Secret creds, Deployment web) with the
/// administrator's key, through the counting proxy.
async fn plain_script(env: &TestEnv, ns: &str, user: &str) -> anyhow::Result<()> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench-plain-rotation");
    let out = tokio::process::Command::new(script)
        .args([ns, user, "creds", "web"])
        .env("AWS_ENDPOINT_URL", &env.proxy_url)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", std::env::var("REKEY_TEST_ADMIN_ACCESS_KEY_ID")?)
        .env("AWS_SECRET_ACCESS_KEY", std::env::var("REKEY_TEST_ADMIN_SECRET_ACCESS_KEY")?)
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "the plain script failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

async fn make_users(env: &TestEnv, ns: &str, n: usize) -> anyhow::Result<Vec<String>> {
    futures::stream::iter(0..n)
        .map(|_| consenting_user(env, "bench", ns))
        .buffer_unordered(PARALLEL)
        .try_collect()
        .await
}

async fn create_resources(
    api: &Api<IamKeyRotation>,
    users: &[String],
    first: usize,
    suspend: bool,
) -> anyhow::Result<()> {
    create_resources_with(api, users, first, json!({"suspend": suspend})).await
}

/// Resources app{first}.. for `users`, each with Secret creds{i}, deleteAfter 0s and `extra`'s
/// fields in its spec.
async fn create_resources_with(
    api: &Api<IamKeyRotation>,
    users: &[String],
    first: usize,
    extra: serde_json::Value,
) -> anyhow::Result<()> {
    futures::stream::iter(users.iter().enumerate())
        .map(|(i, user)| {
            let api = api.clone();
            let extra = extra.clone();
            async move {
                let i = first + i;
                let mut spec = json!({"userName": user, "secrets": [{"name": format!("creds{i}")}],
                                      "retirement": {"deleteAfter": "0s"}});
                for (k, v) in extra.as_object().into_iter().flatten() {
                    spec[k] = v.clone();
                }
                api.create(&PostParams::default(), &ikr(&format!("app{i}"), spec)?).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

async fn create_secrets(api: &Api<Secret>, prefix: &str, n: usize, managed: bool) -> anyhow::Result<()> {
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let labels = if managed { json!({"rekey.dev/managed-by": "bench"}) } else { json!({}) };
                let s: Secret = serde_json::from_value(json!({
                    "metadata": {"name": format!("{prefix}-{i}"), "labels": labels},
                    "stringData": {"config": "x".repeat(512)},
                }))?;
                api.create(&PostParams::default(), &s).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<u64>().ok()))
        .map(|kib| kib / 1024 / 1024)
        .unwrap_or(0);
    format!("{cpus} CPUs, {mem} GiB")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let which: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wants = |s: &str| which.is_empty() || which.iter().any(|w| w == s);
    let env = TestEnv::get().await?;
    ensure_crd(&env).await?;
    let kubeconfig: PathBuf = operator_identity(&env, BENCH_SA, None).await?;
    let mut t = Table(Vec::new());
    if wants("rotation") {
        one_rotation(&env, &kubeconfig, &mut t).await?;
    }
    if wants("retirement") {
        exposure(&env, &kubeconfig, &mut t).await?;
    }
    if wants("latency") {
        latency(&env, &kubeconfig, &mut t).await?;
    }
    if wants("burst") {
        burst::burst(&env, &kubeconfig, &mut t).await?;
    }
    if wants("scale") {
        scale(&env, &kubeconfig, &mut t).await?;
    }
    // Part of `scale`; on its own only when named.
    if which.iter().any(|w| w == "emergencies") {
        leaked(&env, &kubeconfig, &mut t).await?;
    }
    println!("rekey benchmarks, {}, {}", k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%d"), machine());
    println!();
    t.print();
    Ok(())
}
