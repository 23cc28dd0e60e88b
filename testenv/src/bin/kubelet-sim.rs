//! A simulated kubelet for the local control plane.
//!
//! There is no container runtime here, so this process plays the node: it registers a Node, binds
//! every pending pod to it (there is no scheduler either), reports pods Running, and finishes the
//! graceful deletion of pods after a short grace period (during which they keep running on the
//! credentials they had). It reports a pod Ready only if every AWS key the pod holds authenticates
//! against the IAM emulator and is Active — so a rotation that hands out a broken key, retires a key
//! still in use, or forgets to restart an env-consuming workload visibly breaks that workload.
//!
//! Environment credentials are read once when the pod starts, as a container's environment is;
//! file credentials are re-read on every check, as an application that reloads its file would.
#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aws_config::BehaviorVersion;
use aws_credential_types::Credentials;
use clap::Parser;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use rekey_testenv::creds::{
    KeyPair, PodCredentials, env_credentials, file_credentials, is_sidecar, running_containers,
};
use serde_json::json;
use tracing::{debug, info, warn};

/// The kubelet version the Node reports: the control plane's own (a node may not be newer).
const KUBELET_VERSION: &str = "v1.34.0";

/// Annotation on a pod: it exits successfully this long after it started (Job pods, bare pods).
const EXIT_AFTER: &str = "sim.rekey.dev/exit-after-seconds";

#[derive(Parser, Debug)]
struct Args {
    /// Name of the Node this kubelet registers and binds pods to.
    #[arg(long, default_value = "rekey-sim-node")]
    node_name: String,
    /// Seconds a deleted pod keeps running before it is gone (capped by the pod's own grace period).
    #[arg(long, env = "REKEY_SIM_GRACE_SECONDS", default_value_t = 2.0)]
    grace_seconds: f64,
    /// How often pods are checked.
    #[arg(long, env = "REKEY_SIM_INTERVAL_MS", default_value_t = 500)]
    interval_ms: u64,
    /// How long a successful authentication of a key pair is trusted before it is checked again.
    #[arg(long, env = "REKEY_SIM_AUTH_TTL_SECONDS", default_value_t = 5.0)]
    auth_ttl_seconds: f64,
}

/// The keys a running pod holds, or why it cannot start.
type PodKeys = Result<BTreeSet<KeyPair>, String>;

struct Started {
    at: Instant,
    env: PodCredentials,
}

#[derive(Clone)]
enum Auth {
    /// Authenticated as this IAM user.
    User(String),
    /// The emulator rejected the key pair.
    Rejected(String),
}

struct Sim {
    args: Args,
    client: kube::Client,
    sts_base: aws_config::SdkConfig,
    iam: aws_sdk_iam::Client,
    pods: Store<Pod>,
    secrets: Store<Secret>,
    started: HashMap<String, Started>,
    deleting_since: HashMap<String, Instant>,
    auth_cache: HashMap<KeyPair, (Instant, Auth)>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let client = kube::Client::try_default().await.context("kube client")?;
    let sdk = aws_config::defaults(BehaviorVersion::latest()).region(aws_config::Region::new("us-east-1")).load().await;
    let iam = aws_sdk_iam::Client::new(&sdk);

    register_node(&client, &args.node_name).await?;

    let (pods, pod_writer) = reflector::store();
    let (secrets, secret_writer) = reflector::store();
    let pod_stream = reflector::reflector(pod_writer, watcher(Api::<Pod>::all(client.clone()), Default::default()))
        .default_backoff()
        .for_each(|_| futures::future::ready(()));
    let secret_stream =
        reflector::reflector(secret_writer, watcher(Api::<Secret>::all(client.clone()), Default::default()))
            .default_backoff()
            .for_each(|_| futures::future::ready(()));
    tokio::spawn(pod_stream);
    tokio::spawn(secret_stream);
    pods.wait_until_ready().await.context("pod store")?;
    secrets.wait_until_ready().await.context("secret store")?;
    // The Ready node is what `testenv up` waits for; mark it only once the caches are synced.
    set_node_ready(&client, &args.node_name).await?;
    info!(node = %args.node_name, "kubelet-sim ready");

    let mut sim = Sim {
        client,
        sts_base: sdk,
        iam,
        pods,
        secrets,
        started: HashMap::new(),
        deleting_since: HashMap::new(),
        auth_cache: HashMap::new(),
        args,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(sim.args.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = sim.tick().await {
                    warn!(error = %format!("{e:#}"), "tick failed");
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

async fn register_node(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}},
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e).context("register node"),
    }
    Ok(())
}

async fn set_node_ready(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let now = now_rfc3339();
    let status = json!({"status": {
        "capacity": {"cpu": "64", "memory": "256Gi", "pods": "10000"},
        "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "10000"},
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "kubelet-sim is posting ready status", "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "nodeInfo": {"machineID": "sim", "systemUUID": "sim", "bootID": "sim", "kernelVersion": "sim",
            "osImage": "kubelet-sim", "containerRuntimeVersion": "sim://1", "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": KUBELET_VERSION, "operatingSystem": "linux", "architecture": "amd64"},
    }});
    nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await.context("node status")?;
    // The apiserver taints a new node not-ready; the node lifecycle controller that would lift the
    // taint is disabled here, so the kubelet lifts it (DaemonSet pods do not tolerate it).
    nodes
        .patch(name, &PatchParams::default(), &Patch::Merge(&json!({"spec": {"taints": null}})))
        .await
        .context("node taints")?;
    Ok(())
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// What the simulated container reports.
#[derive(Debug, PartialEq, Eq)]
enum Desired {
    /// Cannot start: a referenced Secret or key is missing.
    Waiting(String),
    Running {
        ready: bool,
        message: String,
    },
    Succeeded,
}

impl Sim {
    fn lookup<'a>(&'a self, ns: &'a str) -> impl Fn(&str) -> Option<Secret> + 'a {
        move |name: &str| self.secrets.get(&ObjectRef::new(name).within(ns)).map(|s| (*s).clone())
    }

    /// The Secrets a pod's env names, read from the apiserver (None while it cannot be reached).
    async fn fresh_secrets(
        &self,
        ns: &str,
        spec: &k8s_openapi::api::core::v1::PodSpec,
    ) -> Option<HashMap<String, Secret>> {
        let mut names = BTreeSet::new();
        for c in running_containers(spec) {
            names.extend(c.env_from.iter().flatten().filter_map(|f| f.secret_ref.as_ref()).map(|r| r.name.clone()));
            names.extend(
                c.env
                    .iter()
                    .flatten()
                    .filter_map(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
                    .map(|r| r.name.clone()),
            );
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let mut out = HashMap::new();
        for name in names {
            match api.get_opt(&name).await {
                Ok(Some(s)) => {
                    out.insert(name, s);
                }
                Ok(None) => {}
                Err(e) => {
                    debug!(error = %e, "reading a pod's Secret");
                    return None;
                }
            }
        }
        Some(out)
    }

    async fn tick(&mut self) -> anyhow::Result<()> {
        let pods = self.pods.state();
        let live: BTreeSet<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        self.started.retain(|uid, _| live.contains(uid));
        self.deleting_since.retain(|uid, _| live.contains(uid));
        let ttl = Duration::from_secs_f64(self.args.auth_ttl_seconds);
        self.auth_cache.retain(|_, (at, _)| at.elapsed() < ttl);

        // Per pod on this node: the keys it holds and the problems that keep it from starting.
        let mut running: Vec<(std::sync::Arc<Pod>, PodKeys)> = Vec::new();
        for pod in pods {
            let (Some(ns), Some(name), Some(uid)) =
                (pod.metadata.namespace.clone(), pod.metadata.name.clone(), pod.metadata.uid.clone())
            else {
                continue;
            };
            let spec = match &pod.spec {
                Some(s) => s,
                None => continue,
            };
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
            match spec.node_name.as_deref() {
                None if pod.metadata.deletion_timestamp.is_none() => {
                    self.bind(&ns, &name, &uid).await;
                    continue;
                }
                Some(n) if n == self.args.node_name => {}
                _ => continue,
            }
            if pod.metadata.deletion_timestamp.is_some() {
                self.finish_deletion(&pod, &ns, &name, &uid).await;
                continue;
            }
            if phase == "Succeeded" || phase == "Failed" {
                continue;
            }
            if !self.started.contains_key(&uid) {
                // Like the kubelet, a container starts with the Secret as it is now: the cache may
                // lag (after an apiserver restart the Secret watch can relist after the new pod
                // appears), so the Secrets its env names are read afresh.
                let Some(fresh) = self.fresh_secrets(&ns, spec).await else { continue };
                let env = env_credentials(spec, &|n: &str| fresh.get(n).cloned());
                if !env.problems.is_empty() {
                    running.push((pod.clone(), Err(env.problems.join("; "))));
                    continue;
                }
                self.started.insert(uid.clone(), Started { at: Instant::now(), env });
            }
            let Some(started) = self.started.get(&uid) else { continue };
            let files = file_credentials(spec, &self.lookup(&ns));
            if !files.problems.is_empty() {
                running.push((pod.clone(), Err(files.problems.join("; "))));
                continue;
            }
            let mut keys = started.env.keys.clone();
            keys.extend(files.keys);
            running.push((pod.clone(), Ok(keys)));
        }

        let all_keys: BTreeSet<KeyPair> =
            running.iter().filter_map(|(_, k)| k.as_ref().ok()).flatten().cloned().collect();
        self.authenticate(&all_keys).await;
        let statuses = self.key_statuses(&all_keys).await;

        for (pod, keys) in running {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let desired = match keys {
                Err(problem) => Desired::Waiting(problem),
                Ok(_) if self.exited(&pod, &uid) => Desired::Succeeded,
                Ok(keys) => self.readiness(&keys, &statuses),
            };
            if let Err(e) = self.report(&pod, desired).await {
                debug!(error = %e, "status update");
            }
        }
        Ok(())
    }

    fn exited(&self, pod: &Pod, uid: &str) -> bool {
        let after =
            pod.metadata.annotations.as_ref().and_then(|a| a.get(EXIT_AFTER)).and_then(|v| v.parse::<f64>().ok());
        match (after, self.started.get(uid)) {
            (Some(secs), Some(s)) => s.at.elapsed() >= Duration::from_secs_f64(secs),
            _ => false,
        }
    }

    fn readiness(&self, keys: &BTreeSet<KeyPair>, statuses: &HashMap<String, HashMap<String, String>>) -> Desired {
        for k in keys {
            match self.auth_cache.get(k).map(|(_, a)| a) {
                Some(Auth::User(user)) => {
                    let status = statuses.get(user).and_then(|m| m.get(&k.access_key_id));
                    match status.map(String::as_str) {
                        Some("Active") => {}
                        Some(other) => {
                            return Desired::Running {
                                ready: false,
                                message: format!("access key {} is {other}", k.access_key_id),
                            };
                        }
                        None => {
                            return Desired::Running {
                                ready: false,
                                message: format!("access key {} no longer exists", k.access_key_id),
                            };
                        }
                    }
                }
                Some(Auth::Rejected(why)) => {
                    return Desired::Running {
                        ready: false,
                        message: format!("access key {} does not authenticate: {why}", k.access_key_id),
                    };
                }
                None => {
                    return Desired::Running {
                        ready: false,
                        message: format!("access key {} could not be checked", k.access_key_id),
                    };
                }
            }
        }
        Desired::Running { ready: true, message: String::new() }
    }

    async fn authenticate(&mut self, keys: &BTreeSet<KeyPair>) {
        let todo: Vec<KeyPair> = keys.iter().filter(|k| !self.auth_cache.contains_key(*k)).cloned().collect();
        let checks = todo.into_iter().map(|k| {
            let conf = aws_sdk_sts::config::Builder::from(&self.sts_base)
                .credentials_provider(Credentials::new(
                    k.access_key_id.clone(),
                    k.secret_access_key.clone(),
                    None,
                    None,
                    "pod",
                ))
                .build();
            async move {
                let res = aws_sdk_sts::Client::from_conf(conf).get_caller_identity().send().await;
                (k, res)
            }
        });
        for (k, res) in futures::future::join_all(checks).await {
            let auth = match res {
                Ok(out) => {
                    let arn = out.arn().unwrap_or_default();
                    Auth::User(arn.rsplit('/').next().unwrap_or_default().to_owned())
                }
                Err(e) => match e.as_service_error() {
                    Some(se) => Auth::Rejected(se.meta().code().unwrap_or("rejected").to_owned()),
                    // The emulator is unreachable: say nothing rather than flip pods NotReady.
                    None => continue,
                },
            };
            self.auth_cache.insert(k, (Instant::now(), auth));
        }
    }

    /// Status of every key of the users the pods' keys belong to, listed fresh on each check.
    async fn key_statuses(&self, keys: &BTreeSet<KeyPair>) -> HashMap<String, HashMap<String, String>> {
        let users: BTreeSet<String> = keys
            .iter()
            .filter_map(|k| match self.auth_cache.get(k) {
                Some((_, Auth::User(u))) => Some(u.clone()),
                _ => None,
            })
            .collect();
        let lists = users.into_iter().map(|u| async move {
            let res = self.iam.list_access_keys().user_name(&u).send().await;
            (u, res)
        });
        let mut out = HashMap::new();
        for (user, res) in futures::future::join_all(lists).await {
            match res {
                Ok(list) => {
                    let m: HashMap<String, String> = list
                        .access_key_metadata()
                        .iter()
                        .filter_map(|m| Some((m.access_key_id()?.to_owned(), m.status()?.as_str().to_owned())))
                        .collect();
                    out.insert(user, m);
                }
                Err(e) => debug!(%user, error = %e, "list access keys"),
            }
        }
        out
    }

    async fn bind(&self, ns: &str, name: &str, uid: &str) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name, "uid": uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.args.node_name},
        });
        match api.create_subresource::<_, serde_json::Value>("binding", name, &PostParams::default(), &binding).await {
            Ok(_) => debug!(%ns, %name, "bound"),
            Err(e) => debug!(%ns, %name, error = %e, "bind"),
        }
    }

    async fn finish_deletion(&mut self, pod: &Pod, ns: &str, name: &str, uid: &str) {
        let since = *self.deleting_since.entry(uid.to_owned()).or_insert_with(Instant::now);
        let pod_grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30).max(0) as f64;
        if since.elapsed() < Duration::from_secs_f64(self.args.grace_seconds.min(pod_grace)) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions { uid: Some(uid.to_owned()), resource_version: None }),
            ..Default::default()
        };
        match api.delete(name, &dp).await {
            Ok(_) => debug!(%ns, %name, "terminated"),
            Err(e) => debug!(%ns, %name, error = %e, "terminate"),
        }
    }

    async fn report(&self, pod: &Pod, desired: Desired) -> anyhow::Result<()> {
        let status = pod.status.clone().unwrap_or_default();
        let ready_now = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .map(|c| (c.status == "True", c.message.clone().unwrap_or_default()));
        let phase = status.phase.clone().unwrap_or_default();
        let (new_phase, ready, message, waiting) = match &desired {
            Desired::Waiting(m) => ("Pending", false, m.clone(), true),
            Desired::Running { ready, message } => ("Running", *ready, message.clone(), false),
            Desired::Succeeded => ("Succeeded", false, "completed".to_owned(), false),
        };
        if phase == new_phase && ready_now == Some((ready, message.clone())) {
            return Ok(());
        }
        let now = now_rfc3339();
        let start = status.start_time.as_ref().map(|t| t.0.to_string()).unwrap_or_else(|| now.clone());
        let flag = if ready { "True" } else { "False" };
        let transition = match &ready_now {
            Some((r, _)) if *r == ready => status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "Ready")
                .and_then(|c| c.last_transition_time.as_ref().map(|t| t.0.to_string()))
                .unwrap_or_else(|| now.clone()),
            _ => now.clone(),
        };
        let spec = pod.spec.clone().unwrap_or_default();
        let status_of = |c: &k8s_openapi::api::core::v1::Container| {
            let state = if waiting {
                json!({"waiting": {"reason": "CreateContainerConfigError", "message": message}})
            } else if new_phase == "Succeeded" {
                json!({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": start, "finishedAt": now}})
            } else {
                json!({"running": {"startedAt": start}})
            };
            json!({"name": c.name, "ready": ready, "restartCount": 0, "started": !waiting,
                    "image": c.image.clone().unwrap_or_default(), "imageID": "", "state": state})
        };
        let containers: Vec<serde_json::Value> = spec.containers.iter().map(status_of).collect();
        // Sidecars run (and are ready) like the containers; they are reported among the init
        // containers, as the kubelet does.
        let sidecars: Vec<serde_json::Value> =
            spec.init_containers.iter().flatten().filter(|c| is_sidecar(c)).map(status_of).collect();
        let mut conditions = vec![
            json!({"type": "Initialized", "status": "True", "lastTransitionTime": start}),
            json!({"type": "Ready", "status": flag, "lastTransitionTime": transition, "message": message,
                "reason": if ready { "" } else { "ContainersNotReady" }}),
            json!({"type": "ContainersReady", "status": flag, "lastTransitionTime": transition}),
            json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": start}),
        ];
        if ready {
            conditions[1]["message"] = json!(null);
            conditions[1]["reason"] = json!(null);
        }
        let patch = json!({"status": {
            "phase": new_phase, "hostIP": "127.0.0.1", "podIP": pod_ip(pod), "startTime": start,
            "conditions": conditions, "containerStatuses": containers, "initContainerStatuses": sidecars,
        }});
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        if ready_now.map(|(r, _)| r) != Some(ready) {
            info!(%ns, %name, phase = new_phase, ready, %message, "pod status");
        }
        Ok(())
    }
}

/// A stable fake IP per pod, so status updates do not churn it.
fn pod_ip(pod: &Pod) -> String {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let h = uid.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    format!("10.244.{}.{}", (h >> 8) & 0xff, (h & 0xff).max(1))
}
