//! Shared by the integration tests: the operator as a real process, the CRD, fixtures.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use rekey::api::IamKeyRotation;
use rekey_testenv::env::{TestEnv, eventually};
use serde_json::json;

pub const CLUSTER: &str = "test";
pub const WAIT: Duration = Duration::from_secs(120);

/// Installs the committed CRD (server-side apply) and waits until it is established.
pub async fn ensure_crd(env: &TestEnv) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/iamkeyrotation.yaml"))?;
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text)?;
    let api: Api<CustomResourceDefinition> = Api::all(env.kube.clone());
    api.patch("iamkeyrotations.rekey.dev", &PatchParams::apply("rekey-tests").force(), &Patch::Apply(&crd)).await?;
    eventually("CRD established", WAIT, || async {
        let c = api.get("iamkeyrotations.rekey.dev").await?;
        let ok = c
            .status
            .and_then(|s| s.conditions)
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"));
        Ok(if ok { Ok(()) } else { Err("not established".into()) })
    })
    .await
}

/// `kubectl kustomize deploy/<dir>`: the objects a user installs, as JSON.
pub fn kustomize(dir: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    use serde::Deserialize as _;
    let path = format!("{}/deploy/{dir}", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("kubectl").args(["kustomize", &path]).output().context("kubectl")?;
    anyhow::ensure!(out.status.success(), "kubectl kustomize {path}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    serde_yaml::Deserializer::from_str(&text).map(|doc| Ok(serde_json::Value::deserialize(doc)?)).collect()
}

/// Server-side applies one manifest of any kind (`dry_run`: validated and admitted, not stored).
pub async fn apply_manifest(kube: &kube::Client, v: &serde_json::Value, dry_run: bool) -> anyhow::Result<()> {
    use kube::api::{DynamicObject, GroupVersionKind};
    use kube::discovery::ApiResource;
    let obj: DynamicObject = serde_json::from_value(v.clone())?;
    let types = obj.types.clone().context("apiVersion/kind")?;
    let (group, version) = types.api_version.rsplit_once('/').unwrap_or(("", &types.api_version));
    let gvk = GroupVersionKind::gvk(group, version, &types.kind);
    let plural = format!("{}s", types.kind.to_lowercase()).replace("policys", "policies");
    let ar = ApiResource::from_gvk_with_plural(&gvk, &plural);
    let name = obj.metadata.name.clone().context("name")?;
    let api: Api<DynamicObject> = match &obj.metadata.namespace {
        Some(ns) => Api::namespaced_with(kube.clone(), ns, &ar),
        None => Api::all_with(kube.clone(), &ar),
    };
    let mut pp = PatchParams::apply("rekey-tests").force();
    pp.dry_run = dry_run;
    api.patch(&name, &pp, &Patch::Apply(v)).await.with_context(|| format!("{} {name} rejected", types.kind))?;
    Ok(())
}

/// A user consenting to namespace `ns` of the test cluster.
pub async fn consenting_user(env: &TestEnv, prefix: &str, ns: &str) -> anyhow::Result<String> {
    let user = env.create_user(prefix).await?;
    let tag = aws_sdk_iam::types::Tag::builder().key(format!("rekey.dev/allow/{ns}")).value(CLUSTER).build()?;
    env.iam.tag_user().user_name(&user).tags(tag).send().await?;
    Ok(user)
}

/// The operator binary, running as a process of its own against the test environment.
pub struct Operator {
    child: tokio::process::Child,
    pub log: PathBuf,
    /// Where this process's lines start in `log` (shared by the operators of one namespace).
    log_start: usize,
    /// Base URL of its /metrics, /healthz and /readyz.
    pub http: String,
}

impl Operator {
    pub async fn start(ns: &str, extra_env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("operator-{ns}.log"));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let log_start = file.metadata()?.len() as usize;
        // A free loopback port for this process's metrics and health server.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_rekey"));
        cmd.env("REKEY_METRICS_ADDRESS", format!("127.0.0.1:{port}"));
        cmd.args(["run", "--cluster-name", CLUSTER, "--namespace", ns])
            .env("RUST_LOG", std::env::var("REKEY_TEST_OPERATOR_LOG").unwrap_or_else(|_| "info".into()))
            // One Lease per test namespace: operators of different tests never wait for each other.
            .env("REKEY_LEASE_NAMESPACE", ns)
            .env("REKEY_LEASE_NAME", "rekey")
            .env("REKEY_LEASE_DURATION_SECONDS", "6")
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("start the operator")?;
        Ok(Self { child, log, log_start, http: format!("http://127.0.0.1:{port}") })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, as an OOM kill or a node loss would.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGTERM, as the kubelet sends when the pod is deleted or rolled.
    pub async fn terminate(&self) -> anyhow::Result<()> {
        let pid = self.pid().context("already exited")?;
        let ok = tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?.success();
        anyhow::ensure!(ok, "kill -TERM {pid}");
        Ok(())
    }

    /// What this process has logged so far.
    pub fn output(&self) -> anyhow::Result<String> {
        let bytes = std::fs::read(&self.log)?;
        Ok(String::from_utf8_lossy(bytes.get(self.log_start..).unwrap_or_default()).into_owned())
    }

    /// Waits until this process has logged `needle`.
    pub async fn logged(&self, needle: &str) -> anyhow::Result<()> {
        eventually(&format!("operator log shows {needle:?}"), WAIT, || async {
            Ok(if self.output()?.contains(needle) { Ok(()) } else { Err("not yet".to_owned()) })
        })
        .await
    }

    /// Waits for the process to exit (a failpoint ends it), returning its exit code.
    pub async fn exited(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let status = tokio::time::timeout(timeout, self.child.wait()).await.context("operator did not exit")??;
        Ok(status.code())
    }
}

pub fn ikr(name: &str, spec: serde_json::Value) -> anyhow::Result<IamKeyRotation> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "rekey.dev/v1alpha1", "kind": "IamKeyRotation",
        "metadata": {"name": name}, "spec": spec,
    }))?)
}

/// The status condition `type_` as (status, reason).
pub fn condition(obj: &IamKeyRotation, type_: &str) -> Option<(String, String)> {
    obj.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_).map(|c| (c.status.clone(), c.reason.clone()))
}

/// Waits until the resource satisfies `check`, reporting its phase and conditions otherwise.
pub async fn wait_ikr(
    api: &Api<IamKeyRotation>,
    name: &str,
    what: &str,
    check: impl Fn(&IamKeyRotation) -> bool,
) -> anyhow::Result<IamKeyRotation> {
    eventually(what, WAIT, || async {
        let o = api.get(name).await?;
        if check(&o) {
            return Ok(Ok(o));
        }
        let s = o.status.clone().unwrap_or_default();
        let conds: Vec<String> =
            s.conditions.iter().filter(|c| c.status == "True").map(|c| format!("{}={}", c.type_, c.reason)).collect();
        Ok(Err(format!("phase {:?}, rotations {}, conditions {conds:?}", s.phase, s.rotations)))
    })
    .await
}

pub fn phase(o: &IamKeyRotation) -> rekey::api::Phase {
    o.status.as_ref().map(|s| s.phase).unwrap_or_default()
}

pub fn is_true(o: &IamKeyRotation, type_: &str, reason: &str) -> bool {
    condition(o, type_) == Some(("True".into(), reason.into()))
}

pub fn active_key(o: &IamKeyRotation) -> Option<String> {
    o.status.as_ref()?.active_key.as_ref().map(|k| k.access_key_id.clone())
}

/// Watches every pod of a namespace in the background and records each one that went NotReady
/// because of its AWS key (the simulated kubelet says so in the Ready condition's message).
pub struct KeyBreakWatch {
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl KeyBreakWatch {
    pub fn start(env: &TestEnv, ns: &str) -> Self {
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(env.kube.clone(), ns);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let out = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Ok(list) = pods.list(&Default::default()).await {
                    for p in list.items {
                        let broken = p
                            .status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .and_then(|c| c.iter().find(|c| c.type_ == "Ready" && c.status == "False"))
                            .and_then(|c| c.message.clone())
                            .filter(|m| m.contains("access key"));
                        if let (Some(m), Ok(mut v)) = (broken, out.lock()) {
                            v.push(format!("{}: {m}", p.metadata.name.unwrap_or_default()));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        Self { seen, task }
    }

    /// Stops watching; the pods that broke on their key.
    pub fn stop(self) -> Vec<String> {
        self.task.abort();
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

pub fn deployment(name: &str, replicas: i32, secret: &str) -> anyhow::Result<k8s_openapi::api::apps::v1::Deployment> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [
                {"name": "app", "image": "app:1", "envFrom": [{"secretRef": {"name": secret}}]}]}},
        }
    }))?)
}

/// An env-format Secret holding `key`, as a team would have created it before rekey.
pub fn key_secret(
    name: &str,
    key: &rekey_testenv::creds::KeyPair,
) -> anyhow::Result<k8s_openapi::api::core::v1::Secret> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "stringData": {"AWS_ACCESS_KEY_ID": key.access_key_id, "AWS_SECRET_ACCESS_KEY": key.secret_access_key},
    }))?)
}

/// Waits until every replica of the Deployment is updated and Ready.
pub async fn deployment_ready(
    api: &Api<k8s_openapi::api::apps::v1::Deployment>,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    eventually(&format!("{name} ready"), timeout, || async {
        let d = api.get(name).await?;
        let s = d.status.unwrap_or_default();
        let want = d.spec.and_then(|s| s.replicas).unwrap_or(1);
        let ok = s.ready_replicas == Some(want) && s.updated_replicas == Some(want) && s.replicas == Some(want);
        Ok(if ok { Ok(()) } else { Err(format!("{s:?}")) })
    })
    .await
}

/// A namespace, a consenting user, the CRD, and the API handles a lifecycle test needs.
pub struct Fixture {
    pub env: TestEnv,
    pub ns: String,
    pub user: String,
    pub ikrs: Api<IamKeyRotation>,
    pub secrets: Api<k8s_openapi::api::core::v1::Secret>,
}

impl Fixture {
    pub async fn new(prefix: &str) -> anyhow::Result<Self> {
        let env = TestEnv::get().await?;
        ensure_crd(&env).await?;
        let ns = env.namespace(prefix).await?;
        let user = consenting_user(&env, prefix, &ns).await?;
        Ok(Self {
            ikrs: Api::namespaced(env.kube.clone(), &ns),
            secrets: Api::namespaced(env.kube.clone(), &ns),
            env,
            ns,
            user,
        })
    }

    pub async fn create(&self, name: &str, spec: serde_json::Value) -> anyhow::Result<()> {
        self.ikrs.create(&Default::default(), &ikr(name, spec)?).await?;
        Ok(())
    }

    pub async fn operator(&self) -> anyhow::Result<Operator> {
        Operator::start(&self.ns, &[]).await
    }
}

/// The operator's namespace in the shipped manifests.
pub const OPERATOR_NS: &str = "rekey-system";

/// Applies the RBAC objects of the cluster-wide kustomize overlay, under other names (tests run side
/// by side) and optionally without one rule, and returns a kubeconfig file that authenticates as the
/// ServiceAccount.
pub async fn operator_identity(env: &TestEnv, name: &str, drop_rule: Option<(&str, &str)>) -> anyhow::Result<PathBuf> {
    operator_identity_in(env, name, drop_rule, None).await
}

/// As [`operator_identity`]; with `namespaced`, the namespaced overlay with that namespace in the
/// place marked for the watched namespace.
pub async fn operator_identity_in(
    env: &TestEnv,
    name: &str,
    drop_rule: Option<(&str, &str)>,
    namespaced: Option<&str>,
) -> anyhow::Result<PathBuf> {
    let objects = match namespaced {
        None => kustomize("cluster-wide")?,
        Some(ns) => watching(kustomize("namespaced")?, ns)?,
    };
    for mut v in objects {
        let kind = v["kind"].as_str().unwrap_or_default().to_owned();
        if !["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]
            .contains(&kind.as_str())
        {
            continue;
        }
        // The objects in the operator's namespace, and the cluster-wide ones, get this test's name;
        // a watched namespace's Role is per namespace already.
        let watched = namespaced.is_some_and(|ns| v["metadata"]["namespace"] == ns) || kind == "Namespace";
        if !watched {
            v["metadata"]["name"] = json!(name);
            if v.get("roleRef").is_some() {
                v["roleRef"]["name"] = json!(name);
            }
        }
        // get_mut, not indexing: indexing a missing field would add it as null.
        for s in v.get_mut("subjects").and_then(|s| s.as_array_mut()).into_iter().flatten() {
            s["name"] = json!(name);
        }
        for r in v.get_mut("rules").and_then(|r| r.as_array_mut()).into_iter().flatten() {
            if let Some(names) = r.get_mut("resourceNames") {
                *names = json!([name]);
            }
            if let Some((resource, verb)) = drop_rule
                && kind == "ClusterRole"
                && r["resources"].as_array().is_some_and(|rs| rs.iter().any(|x| x == resource))
                && let Some(verbs) = r["verbs"].as_array_mut()
            {
                verbs.retain(|v| v != verb);
            }
        }
        apply_manifest(&env.kube, &v, false).await?;
    }
    // Kubernetes 1.20 mints a token Secret for every ServiceAccount.
    let sas: Api<ServiceAccount> = Api::namespaced(env.kube.clone(), OPERATOR_NS);
    let secret_name = eventually("ServiceAccount token", WAIT, || async {
        let sa = sas.get(name).await?;
        Ok(sa.secrets.and_then(|s| s.into_iter().next()).and_then(|r| r.name).ok_or_else(|| "no token yet".to_owned()))
    })
    .await?;
    let token_secret: Secret = Api::<Secret>::namespaced(env.kube.clone(), OPERATOR_NS).get(&secret_name).await?;
    let token = token_secret.data.and_then(|d| d.get("token").cloned()).context("token")?;
    let mut kubeconfig: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(std::env::var("KUBECONFIG").context("KUBECONFIG")?)?)?;
    kubeconfig["users"][0]["user"] = serde_yaml::to_value(json!({"token": String::from_utf8(token.0)?}))?;
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("kubeconfig-{name}"));
    std::fs::write(&path, serde_yaml::to_string(&kubeconfig)?)?;
    Ok(path)
}

/// The namespaced overlay with `ns` where it marks the watched namespace (what a user edits).
pub fn watching(objects: Vec<serde_json::Value>, ns: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = serde_json::to_string(&objects)?;
    anyhow::ensure!(text.contains("team-a"), "the namespaced overlay marks its watched namespace as team-a");
    Ok(serde_json::from_str(&text.replace("team-a", ns))?)
}
