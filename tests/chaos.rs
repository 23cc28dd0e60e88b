//! Chaos: faults injected while an invariant checker samples the cluster and IAM continuously.
//! The run fails on the first violation of:
//! - every target Secret holds a key that authenticates and is Active;
//! - after convergence, exactly one key per user: the one in the Secrets (no key rekey created and
//!   lost track of);
//! - every workload that was Ready before the faults is Ready again after convergence;
//! - every resource returns to Idle and Ready.
//!
//! The faults are environment-wide (the IAM proxy's rates, a stopped kube-apiserver), so the
//! scenarios of this binary run one at a time, and cargo runs test binaries one after another.
//! Counts: REKEY_CHAOS_KILLS (SIGKILLs, default 20) and REKEY_CHAOS_LEADER_KILLS (leader kills,
//! default 3); `scripts/chaos` runs the full counts (200 and 20). REKEY_CHAOS_SEED replays a run.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use rekey::api::{IamKeyRotation, Phase};
use rekey_testenv::creds::KeyPair;
use rekey_testenv::env::{TestEnv, eventually};
use serde_json::json;
use support::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A killed leader's Lease expires in 2 s, so each restart acts soon.
const FAST_LEASE: (&str, &str) = ("REKEY_LEASE_DURATION_SECONDS", "2");
/// Convergence under slow, failing IAM takes longer than the usual wait.
const CONVERGE: Duration = Duration::from_secs(600);

fn count(var: &str, default: u32) -> u32 {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rng() -> fastrand::Rng {
    let seed = std::env::var("REKEY_CHAOS_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
    eprintln!("chaos seed: {seed} (REKEY_CHAOS_SEED={seed} replays the instants)");
    fastrand::Rng::with_seed(seed)
}

/// One rotated thing: an IamKeyRotation, its own IAM user, Secret and Deployment.
#[derive(Clone)]
struct Target {
    name: String,
    user: String,
    secret: String,
    deployment: String,
}

struct World {
    env: TestEnv,
    ns: String,
    ikrs: Api<IamKeyRotation>,
    secrets: Api<Secret>,
    deployments: Api<Deployment>,
    targets: Vec<Target>,
}

impl World {
    async fn new(prefix: &str, n: usize, delete_after: &str) -> anyhow::Result<Self> {
        let env = TestEnv::get().await?;
        ensure_crd(&env).await?;
        let ns = env.namespace(prefix).await?;
        let w = Self {
            ikrs: Api::namespaced(env.kube.clone(), &ns),
            secrets: Api::namespaced(env.kube.clone(), &ns),
            deployments: Api::namespaced(env.kube.clone(), &ns),
            targets: Vec::new(),
            env,
            ns,
        };
        let mut targets = Vec::new();
        for i in 0..n {
            let t = Target {
                name: format!("app{i}"),
                user: consenting_user(&w.env, prefix, &w.ns).await?,
                secret: format!("creds{i}"),
                deployment: format!("web{i}"),
            };
            w.deployments.create(&PostParams::default(), &deployment(&t.deployment, 1, &t.secret)?).await?;
            let spec = json!({"userName": t.user, "secrets": [{"name": t.secret}],
                              "retirement": {"deleteAfter": delete_after}});
            w.ikrs.create(&PostParams::default(), &ikr(&t.name, spec)?).await?;
            targets.push(t);
        }
        Ok(Self { targets, ..w })
    }

    async fn rotate(&self, t: &Target, value: &str) -> anyhow::Result<()> {
        let patch = json!({"metadata": {"annotations": {"rekey.dev/rotate": value}}});
        self.ikrs.patch(&t.name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        Ok(())
    }

    /// Every resource Idle and Ready with `rotations` rotations done (when given); exactly one key
    /// per user, the one in its Secret, Active and authenticating; every Deployment Ready on it.
    async fn converged(&self, rotations: &BTreeMap<String, u32>) -> anyhow::Result<()> {
        for t in &self.targets {
            let want = rotations.get(&t.name).copied();
            let o = eventually(&format!("{} converged", t.name), CONVERGE, || async {
                let o = self.ikrs.get(&t.name).await?;
                let s = o.status.clone().unwrap_or_default();
                let done = s.phase == Phase::Idle
                    && condition(&o, "Ready").is_some_and(|c| c.0 == "True")
                    && want.is_none_or(|n| s.rotations == n);
                let conds: Vec<String> = s
                    .conditions
                    .iter()
                    .filter(|c| c.status == "True")
                    .map(|c| format!("{}={}", c.type_, c.reason))
                    .collect();
                Ok(if done {
                    Ok(o)
                } else {
                    Err(format!("phase {:?}, rotations {} (want {want:?}), {conds:?}", s.phase, s.rotations))
                })
            })
            .await?;
            let active = active_key(&o).context("active key")?;
            let keys = self.env.keys(&t.user).await?;
            anyhow::ensure!(
                keys.keys().collect::<Vec<_>>() == vec![&active],
                "{}: user {} has keys {keys:?}, not exactly the active key {active}",
                t.name,
                t.user
            );
            let pair = secret_pair(&self.secrets.get(&t.secret).await?).context("the Secret holds a key")?;
            anyhow::ensure!(pair.access_key_id == active, "{}: the Secret holds {}", t.name, pair.access_key_id);
            anyhow::ensure!(self.env.caller_arn(&pair, &self.env.moto_url).await?.is_some(), "the key authenticates");
            deployment_ready(&self.deployments, &t.deployment, CONVERGE).await?;
        }
        Ok(())
    }
}

fn secret_pair(s: &Secret) -> Option<KeyPair> {
    let get = |k: &str| s.data.as_ref()?.get(k).map(|v| String::from_utf8_lossy(&v.0).into_owned());
    Some(KeyPair { access_key_id: get("AWS_ACCESS_KEY_ID")?, secret_access_key: get("AWS_SECRET_ACCESS_KEY")? })
}

#[derive(Debug, Default)]
struct Tally {
    samples: u64,
    /// Invariant checks made: one per target Secret that held a key when sampled.
    checks: u64,
    /// Samples that could not be made (apiserver down, Secret deleted by the fault).
    skipped: u64,
    violations: Vec<String>,
    keys_seen: BTreeSet<String>,
}

/// Samples every target continuously until stopped; a violation is recorded, never retried away.
struct Checker {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Tally>,
}

impl Checker {
    fn start(w: &World) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (env, secrets, targets, flag) = (w.env.clone(), w.secrets.clone(), w.targets.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut tally = Tally::default();
            // Samples for the test's whole duration, until finish(): not a wait, so not `eventually`.
            while !flag.load(Ordering::SeqCst) {
                tally.samples += 1;
                for t in &targets {
                    sample(&env, &secrets, t, &mut tally).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            tally
        });
        Self { stop, task }
    }

    async fn finish(self) -> anyhow::Result<Tally> {
        self.stop.store(true, Ordering::SeqCst);
        Ok(self.task.await?)
    }
}

async fn sample(env: &TestEnv, secrets: &Api<Secret>, t: &Target, tally: &mut Tally) {
    let read = |secrets: Api<Secret>| async move {
        secrets.get_opt(&t.secret).await.ok().flatten().as_ref().and_then(secret_pair)
    };
    let Some(pair) = read(secrets.clone()).await else {
        tally.skipped += 1;
        return;
    };
    let Ok(keys) = env.keys(&t.user).await else {
        tally.skipped += 1;
        return;
    };
    tally.keys_seen.extend(keys.keys().cloned());
    let active = keys.get(&pair.access_key_id).map(String::as_str) == Some("Active");
    let authenticates = match env.caller_arn(&pair, &env.moto_url).await {
        Ok(a) => a.is_some(),
        Err(_) => {
            tally.skipped += 1;
            return;
        }
    };
    tally.checks += 1;
    if !(active && authenticates) {
        // The two reads are not atomic: if the Secret moved on in between, this sample proves nothing.
        if read(secrets.clone()).await.is_some_and(|p| p.access_key_id == pair.access_key_id) {
            let status = keys.get(&pair.access_key_id).cloned().unwrap_or_else(|| "deleted".into());
            tally.violations.push(format!(
                "{}: Secret {} holds {} which is {status} in IAM{}",
                t.name,
                t.secret,
                pair.access_key_id,
                if authenticates { "" } else { " and does not authenticate" }
            ));
        }
    }
}

fn report(scenario: &str, faults: &str, tally: &Tally) {
    eprintln!(
        "chaos {scenario}: faults [{faults}]; {} samples, {} invariant checks, {} skipped, {} keys seen, {} violations",
        tally.samples,
        tally.checks,
        tally.skipped,
        tally.keys_seen.len(),
        tally.violations.len()
    );
    for v in &tally.violations {
        eprintln!("  VIOLATION {v}");
    }
}

/// An operator kept running as the kubelet would (restartPolicy Always): restarted when it exits.
struct Supervised {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<anyhow::Result<u32>>,
}

impl Supervised {
    fn start(ns: &str, extra: &[(&'static str, &'static str)]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, extra, flag) = (ns.to_owned(), extra.to_vec(), stop.clone());
        let task = tokio::spawn(async move {
            let mut restarts = 0;
            // Supervises for the test's whole duration, until finish(): not a wait, so not `eventually`.
            loop {
                let mut op = Operator::start(&ns, &extra).await?;
                loop {
                    if flag.load(Ordering::SeqCst) {
                        op.kill().await?;
                        return Ok(restarts);
                    }
                    if op.exited(Duration::from_millis(500)).await.is_ok() {
                        break;
                    }
                }
                restarts += 1;
                // A pause before the restart, as the kubelet's back-off makes; not a wait on anything.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Self { stop, task }
    }

    async fn finish(self) -> anyhow::Result<u32> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await?
    }
}

/// One of several replicas, with its own identity on the Lease.
async fn replica(ns: &str, n: u32) -> anyhow::Result<(String, Operator)> {
    let id = format!("replica-{n}");
    let op = Operator::start(ns, &[FAST_LEASE, ("POD_NAME", &id)]).await?;
    Ok((id, op))
}

async fn bootstrap(w: &World) -> anyhow::Result<()> {
    let op = Operator::start(&w.ns, &[FAST_LEASE]).await?;
    w.converged(&w.targets.iter().map(|t| (t.name.clone(), 0)).collect()).await?;
    drop(op);
    Ok(())
}

#[tokio::test]
async fn sigkill_at_random_instants_loses_no_access_and_leaks_no_key() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let wanted = count("REKEY_CHAOS_KILLS", 20);
    let mut rng = rng();
    let w = World::new("chaos-kill", 2, "1s").await?;
    bootstrap(&w).await?;
    let checker = Checker::start(&w);
    let mut requested: BTreeMap<String, u32> = w.targets.iter().map(|t| (t.name.clone(), 0)).collect();
    let (mut kills, mut mid_rotation) = (0, 0);
    // Injects faults for the test's whole fault phase, at random instants: not a wait, so not `eventually`.
    while kills < wanted {
        // Keep every resource rotating: a new request as soon as the previous one is done.
        for t in &w.targets {
            let o = w.ikrs.get(&t.name).await?;
            let s = o.status.unwrap_or_default();
            let n = requested[&t.name];
            if s.phase == Phase::Idle && s.rotations == n {
                requested.insert(t.name.clone(), n + 1);
                w.rotate(t, &(n + 1).to_string()).await?;
            }
        }
        let mut op = Operator::start(&w.ns, &[FAST_LEASE]).await?;
        // Kill a leader, at a random instant of its work (a standby has nothing to lose).
        op.logged(": leading").await?;
        tokio::time::sleep(Duration::from_millis(rng.u64(0..2500))).await;
        op.kill().await?;
        kills += 1;
        let phases: Vec<Phase> = w.ikrs.list(&Default::default()).await?.items.iter().map(phase).collect();
        if phases.iter().any(|p| *p != Phase::Idle) {
            mid_rotation += 1;
        }
    }
    let _op = Operator::start(&w.ns, &[FAST_LEASE]).await?;
    w.converged(&requested).await?;
    let tally = checker.finish().await?;
    let rotations: u32 = requested.values().sum();
    report(
        "sigkill",
        &format!(
            "{kills} SIGKILLs of the leader ({mid_rotation} with a rotation in flight) across {rotations} rotations"
        ),
        &tally,
    );
    anyhow::ensure!(tally.violations.is_empty(), "{:?}", tally.violations);
    anyhow::ensure!(tally.checks > 0, "the checker checked nothing");
    Ok(())
}

#[tokio::test]
async fn killing_the_leader_of_two_replicas_mid_rotation_never_creates_twice() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let wanted = count("REKEY_CHAOS_LEADER_KILLS", 3);
    let w = World::new("chaos-leader", 1, "1s").await?;
    bootstrap(&w).await?;
    let t = w.targets[0].clone();
    let leases: Api<Lease> = Api::namespaced(w.env.kube.clone(), &w.ns);
    w.env.proxy_control("reset", json!({})).await?;
    let checker = Checker::start(&w);
    let mut replicas: BTreeMap<String, Operator> = BTreeMap::new();
    for n in 0..2 {
        let (id, op) = replica(&w.ns, n).await?;
        replicas.insert(id, op);
    }
    for round in 1..=wanted {
        w.rotate(&t, &round.to_string()).await?;
        // Past Distributing: the new key is committed, so a second CreateAccessKey could only come
        // from two replicas acting at once.
        wait_ikr(&w.ikrs, &t.name, "rotation past Distributing", |o| {
            matches!(phase(o), Phase::RollingOut | Phase::Deactivating | Phase::Soaking | Phase::Deleting)
        })
        .await?;
        let holder = leases.get("rekey").await?.spec.and_then(|s| s.holder_identity).context("a leader")?;
        let mut leader = replicas.remove(&holder).with_context(|| format!("leader {holder} is one of ours"))?;
        leader.kill().await?;
        let (id, op) = replica(&w.ns, round + 1).await?;
        replicas.insert(id, op);
        wait_ikr(&w.ikrs, &t.name, "rotation done by the other replica", |o| {
            o.status.as_ref().is_some_and(|s| s.rotations == round && s.phase == Phase::Idle)
        })
        .await?;
    }
    w.converged(&BTreeMap::from([(t.name.clone(), wanted)])).await?;
    let tally = checker.finish().await?;
    let stats = w.env.proxy_stats().await?;
    let creates = stats["calls"]["iam:CreateAccessKey"]["ok"].as_u64().unwrap_or(0);
    report("leader", &format!("{wanted} leader SIGKILLs mid-rotation, 2 replicas; {creates} CreateAccessKey"), &tally);
    anyhow::ensure!(tally.violations.is_empty(), "{:?}", tally.violations);
    assert_eq!(creates, u64::from(wanted), "exactly one CreateAccessKey per rotation");
    drop(replicas);
    Ok(())
}

#[tokio::test]
async fn a_stopped_apiserver_mid_rotation_is_survived() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let w = World::new("chaos-apiserver", 1, "1s").await?;
    bootstrap(&w).await?;
    let t = w.targets[0].clone();
    let checker = Checker::start(&w);
    let op = Supervised::start(&w.ns, &[]);
    w.rotate(&t, "1").await?;
    wait_ikr(&w.ikrs, &t.name, "mid-rotation", |o| phase(o) != Phase::Idle).await?;
    let started = Instant::now();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/testenv");
    let out = tokio::process::Command::new(script).args(["restart-apiserver", "30"]).output().await?;
    anyhow::ensure!(out.status.success(), "restart-apiserver: {}", String::from_utf8_lossy(&out.stderr));
    let down = started.elapsed();
    w.converged(&BTreeMap::from([(t.name.clone(), 1)])).await?;
    let restarts = op.finish().await?;
    let tally = checker.finish().await?;
    report(
        "apiserver",
        &format!(
            "kube-apiserver stopped mid-rotation, back after {} s; operator restarted {restarts} times",
            down.as_secs()
        ),
        &tally,
    );
    anyhow::ensure!(tally.violations.is_empty(), "{:?}", tally.violations);
    Ok(())
}

#[tokio::test]
async fn throttling_5xx_lost_answers_and_latency_from_iam_are_survived() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let w = World::new("chaos-iam", 2, "1s").await?;
    bootstrap(&w).await?;
    let checker = Checker::start(&w);
    w.env.proxy_control("reset", json!({})).await?;
    // 30 % of calls fail (throttled, 5xx, or 5xx after the call took effect), every call 2 s late,
    // and the first CreateAccessKey's answer is lost after the key was made.
    w.env
        .proxy_control("faults", json!({"throttle": 0.15, "error": 0.1, "error_after": 0.05, "latency_ms": 2000}))
        .await?;
    w.env
        .proxy_control("fail-next", json!({"action": "iam:CreateAccessKey", "fault": "error_after", "count": 1}))
        .await?;
    let op = Supervised::start(&w.ns, &[]);
    for t in &w.targets {
        w.rotate(t, "1").await?;
    }
    let result = w.converged(&w.targets.iter().map(|t| (t.name.clone(), 1)).collect()).await;
    let stats = w.env.proxy_stats().await?;
    w.env.proxy_control("reset", json!({})).await?;
    result?;
    op.finish().await?;
    let tally = checker.finish().await?;
    let mut injected: BTreeMap<String, u64> = BTreeMap::new();
    for outcomes in stats["calls"].as_object().into_iter().flat_map(|o| o.values()) {
        for (outcome, n) in outcomes.as_object().into_iter().flatten() {
            if outcome != "ok" {
                *injected.entry(outcome.clone()).or_default() += n.as_u64().unwrap_or(0);
            }
        }
    }
    report("iam", &format!("{} AWS calls, injected {injected:?}, 2 s latency each", stats["total"]), &tally);
    anyhow::ensure!(tally.violations.is_empty(), "{:?}", tally.violations);
    Ok(())
}

#[tokio::test]
async fn secrets_and_workloads_deleted_or_edited_by_hand_mid_rotation() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let w = World::new("chaos-hand", 3, "5s").await?;
    bootstrap(&w).await?;
    let checker = Checker::start(&w);
    let _op = Operator::start(&w.ns, &[FAST_LEASE]).await?;
    let (deleted, edited, gone) = (&w.targets[0], &w.targets[1], &w.targets[2]);
    for t in &w.targets {
        w.rotate(t, "1").await?;
    }
    let past_distributing = |o: &IamKeyRotation| {
        matches!(phase(o), Phase::RollingOut | Phase::Deactivating | Phase::Soaking | Phase::Deleting)
    };
    wait_ikr(&w.ikrs, &deleted.name, "rolling out", past_distributing).await?;
    w.secrets.delete(&deleted.secret, &DeleteParams::default()).await?;
    wait_ikr(&w.ikrs, &edited.name, "rolling out", past_distributing).await?;
    let edit = json!({"metadata": {"labels": {"team": "payments"}}, "stringData": {"note": "rotated by rekey"}});
    w.secrets.patch(&edited.secret, &PatchParams::default(), &Patch::Merge(&edit)).await?;
    wait_ikr(&w.ikrs, &gone.name, "rolling out", past_distributing).await?;
    w.deployments.delete(&gone.deployment, &DeleteParams::default()).await?;
    // The deleted workload is not coming back: converge on the two that remain.
    let remaining = World { targets: w.targets[..2].to_vec(), ..World::clone_handles(&w) };
    remaining.converged(&BTreeMap::from([(deleted.name.clone(), 1), (edited.name.clone(), 1)])).await?;
    let o = wait_ikr(&w.ikrs, &gone.name, "rotation without its workload", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await?;
    let keys = w.env.keys(&gone.user).await?;
    assert_eq!(keys.into_keys().collect::<Vec<_>>(), vec![active_key(&o).context("key")?]);
    let s = w.secrets.get(&edited.secret).await?;
    assert_eq!(s.metadata.labels.unwrap_or_default().get("team").map(String::as_str), Some("payments"));
    assert!(s.data.unwrap_or_default().contains_key("note"), "the hand-added field is kept");
    let tally = checker.finish().await?;
    report("by hand", "a target Secret deleted, one edited, a Deployment deleted, each mid-rotation", &tally);
    anyhow::ensure!(tally.violations.is_empty(), "{:?}", tally.violations);
    Ok(())
}

impl World {
    fn clone_handles(w: &World) -> World {
        World {
            env: w.env.clone(),
            ns: w.ns.clone(),
            ikrs: w.ikrs.clone(),
            secrets: w.secrets.clone(),
            deployments: w.deployments.clone(),
            targets: w.targets.clone(),
        }
    }
}
