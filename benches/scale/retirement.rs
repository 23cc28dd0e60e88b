//! The exposure window: how long the old key stays Active once it is safe to switch it off, rekey
//! beside the plain script, in the same run (`scripts/bench retirement`).
//!
//! Each round rotates the key of a 2-replica Deployment reading it through envFrom. A sampler looks
//! every 50 ms at the namespace's pods and at IAM (straight at moto, so nothing is counted at the
//! proxy) and notes when the pod template was restarted, when it became safe to switch the old key
//! off (every pod that existed at the request gone, terminating ones included, and the Deployment's
//! replicas Ready), and when the old key stopped being Active. Pods that lost access are counted
//! from the simulated kubelet's Ready messages.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rekey::api::{IamKeyRotation, Phase};
use rekey_testenv::env::TestEnv;
use serde_json::json;

use crate::support::*;

/// What the sampler saw, in seconds after the request.
#[derive(Clone, Debug, Default)]
pub struct Round {
    pub restarted: Option<f64>,
    pub safe: Option<f64>,
    pub off: Option<f64>,
    pub lost: usize,
}

impl Round {
    /// The old key's Active time past the safe moment (negative: switched off before it was safe).
    pub fn lag(&self) -> Option<f64> {
        Some(self.off? - self.safe?)
    }
}

struct Sampler {
    seen: Arc<Mutex<Round>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    /// Starts sampling at the request instant `t0`.
    async fn start(env: &TestEnv, ns: &str, user: &str, old: &str, t0: Instant) -> anyhow::Result<Self> {
        let pods: Api<Pod> = Api::namespaced(env.kube.clone(), ns);
        let deployments: Api<Deployment> = Api::namespaced(env.kube.clone(), ns);
        let before: BTreeSet<String> =
            pods.list(&Default::default()).await?.items.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        let template =
            |d: &Deployment| d.spec.as_ref().and_then(|s| s.template.metadata.clone()).and_then(|m| m.annotations);
        let first = template(&deployments.get("web").await?);
        let seen = Arc::new(Mutex::new(Round::default()));
        let (env, user, old, out) = (env.clone(), user.to_owned(), old.to_owned(), seen.clone());
        let task = tokio::spawn(async move {
            // Samples for the whole round, until stopped: not a wait on a condition.
            loop {
                let at = t0.elapsed().as_secs_f64();
                let d = deployments.get("web").await.ok();
                let list = pods.list(&Default::default()).await.map(|l| l.items).unwrap_or_default();
                let old_left = list.iter().any(|p| p.metadata.uid.as_ref().is_some_and(|u| before.contains(u)));
                let ready = d.as_ref().and_then(|d| d.status.as_ref()).and_then(|s| s.ready_replicas).unwrap_or(0);
                let keys = env.keys(&user).await.unwrap_or_default();
                if let Ok(mut r) = out.lock() {
                    if r.restarted.is_none() && d.as_ref().is_some_and(|d| template(d) != first) {
                        r.restarted = Some(at);
                    }
                    if r.safe.is_none() && !old_left && ready >= 2 {
                        r.safe = Some(at);
                    }
                    if r.off.is_none() && keys.get(&old).map(String::as_str) != Some("Active") {
                        r.off = Some(at);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Ok(Self { seen, task })
    }

    /// Waits (at most a minute) until the safe moment was seen: the old pods are gone.
    async fn settle(&self) {
        let _ = rekey_testenv::env::eventually("old pods gone", Duration::from_secs(60), || async {
            let safe = self.seen.lock().map(|r| r.safe.is_some()).unwrap_or(true);
            Ok(if safe { Ok(()) } else { Err("old pods still there".into()) })
        })
        .await;
    }

    fn stop(self) -> Round {
        self.task.abort();
        self.seen.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// One rotation by rekey: the resource is Idle on a key, a request rotates it.
pub async fn rekey_round(env: &TestEnv, kubeconfig: &std::path::Path, round: usize) -> anyhow::Result<Round> {
    let ns = env.namespace("bench-exposure").await?;
    let user = consenting_user(env, "bench-exposure", &ns).await?;
    let deployments: Api<Deployment> = Api::namespaced(env.kube.clone(), &ns);
    deployments.create(&PostParams::default(), &deployment("web", 2, "creds")?).await?;
    let ikrs: Api<IamKeyRotation> = Api::namespaced(env.kube.clone(), &ns);
    let spec = json!({"userName": user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "1h"}});
    ikrs.create(&PostParams::default(), &ikr("app", spec)?).await?;
    let _op = crate::operator(&ns, kubeconfig, &[]).await?;
    let o = wait_ikr(&ikrs, "app", "bootstrapped", |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    deployment_ready(&deployments, "web", WAIT).await?;
    let old = active_key(&o).unwrap_or_default();
    let broke = KeyBreakWatch::start(env, &ns);
    let t0 = Instant::now();
    let sampler = Sampler::start(env, &ns, &user, &old, t0).await?;
    let patch = json!({"metadata": {"annotations": {"rekey.dev/rotate": format!("{round}")}}});
    ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    wait_ikr(&ikrs, "app", "old key off", |o| {
        o.status
            .as_ref()
            .and_then(|s| s.retiring_key.as_ref())
            .is_some_and(|r| r.state == rekey::api::KeyState::Inactive)
    })
    .await?;
    let mut r = sampler.stop();
    r.lost = broke.stop().len();
    Ok(r)
}

/// One rotation by the plain script (aws cli + kubectl), on a twin namespace.
pub async fn script_round(env: &TestEnv) -> anyhow::Result<Round> {
    let ns = env.namespace("bench-exposure-script").await?;
    let user = env.create_user("bench-exposure-script").await?;
    let key = env.create_key(&user).await?;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(env.kube.clone(), &ns);
    secrets.create(&PostParams::default(), &key_secret("creds", &key)?).await?;
    let deployments: Api<Deployment> = Api::namespaced(env.kube.clone(), &ns);
    deployments.create(&PostParams::default(), &deployment("web", 2, "creds")?).await?;
    deployment_ready(&deployments, "web", WAIT).await?;
    let broke = KeyBreakWatch::start(env, &ns);
    let t0 = Instant::now();
    let sampler = Sampler::start(env, &ns, &user, &key.access_key_id, t0).await?;
    crate::plain_script(env, &ns, &user).await?;
    // Pods started on the deleted key break a moment later: give the kubelet's next look a chance.
    deployment_ready(&deployments, "web", Duration::from_secs(20)).await.ok();
    sampler.settle().await;
    let mut r = sampler.stop();
    r.lost = broke.stop().len();
    Ok(r)
}

fn secs(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "—".into())
}

/// "median (min–max)" of the rounds' figures.
fn spread(rounds: &[Round], f: impl Fn(&Round) -> Option<f64>) -> String {
    let mut v: Vec<f64> = rounds.iter().filter_map(&f).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.as_slice() {
        [] => "—".into(),
        [only] => secs(Some(*only)),
        all => {
            format!("{} ({}–{})", secs(Some(all[all.len() / 2])), secs(all.first().copied()), secs(all.last().copied()))
        }
    }
}

/// Rows for the table: rekey's and the script's rounds side by side.
pub fn rows(rekey: &[Round], script: &[Round]) -> Vec<(String, String, String)> {
    let lost = |rs: &[Round]| rs.iter().map(|r| r.lost).sum::<usize>().to_string();
    vec![
        ("exposure: rekey, request → pod template restarted".into(), spread(rekey, |r| r.restarted), "≤ 1 s".into()),
        ("exposure: rekey, request → safe (old pods gone, new Ready)".into(), spread(rekey, |r| r.safe), "—".into()),
        ("exposure: rekey, request → old key off".into(), spread(rekey, |r| r.off), "—".into()),
        ("exposure: rekey, safe → old key off".into(), spread(rekey, Round::lag), "≤ 1 s".into()),
        ("exposure: rekey, pods that lost access".into(), lost(rekey), "0".into()),
        ("exposure: plain script, request → old key off".into(), spread(script, |r| r.off), "—".into()),
        (
            "exposure: plain script, safe → old key off (negative: too early)".into(),
            spread(script, Round::lag),
            "—".into(),
        ),
        ("exposure: plain script, pods that lost access".into(), lost(script), "—".into()),
    ]
}
