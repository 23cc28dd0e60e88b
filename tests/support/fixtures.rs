//! What a test sets up and reads back: the CRD, namespaces and consenting users, the objects it
//! creates, and the resource's status (phase, conditions, active key).

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use rekey::api::IamKeyRotation;
use rekey_testenv::creds::KeyPair;
use rekey_testenv::env::{TestEnv, eventually};
use serde_json::json;

use super::operator::Operator;
use super::{CLUSTER, WAIT};

/// A namespace, a consenting user, the CRD, and the API handles a lifecycle test needs.
pub struct Fixture {
    pub env: TestEnv,
    pub ns: String,
    pub user: String,
    pub ikrs: Api<IamKeyRotation>,
    pub secrets: Api<Secret>,
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

    /// Requests a rotation of `name` (annotation rekey.dev/rotate set to `value`).
    pub async fn rotate(&self, name: &str, value: &str) -> anyhow::Result<()> {
        let patch = json!({"metadata": {"annotations": {"rekey.dev/rotate": value}}});
        self.ikrs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        Ok(())
    }

    /// Waits until the resource is gone (its finalizer done).
    pub async fn gone(&self, name: &str) -> anyhow::Result<()> {
        eventually(&format!("{name} deleted"), WAIT, || async {
            Ok(if self.ikrs.get_opt(name).await?.is_none() { Ok(()) } else { Err("still there".into()) })
        })
        .await
    }

    /// The owner a key's claim tag on the user names (`rekey:<owner>`), if any.
    pub async fn claim(&self, key_id: &str) -> anyhow::Result<Option<String>> {
        let out = self.env.iam.list_user_tags().user_name(&self.user).send().await?;
        Ok(out.tags().iter().find(|t| t.key() == key_id).map(|t| t.value().to_owned()))
    }

    /// Tags the user with a claim on `key_id`, as rekey tags the keys it created or adopted.
    pub async fn set_claim(&self, key_id: &str, owner: &str) -> anyhow::Result<()> {
        let tag = aws_sdk_iam::types::Tag::builder().key(key_id).value(format!("rekey:{owner}")).build()?;
        self.env.iam.tag_user().user_name(&self.user).tags(tag).send().await?;
        Ok(())
    }

    /// The owner string of resource `name` in this namespace (`<cluster>/<namespace>/<name>`).
    pub fn owner(&self, name: &str) -> String {
        format!("{CLUSTER}/{}/{name}", self.ns)
    }
}

/// Installs the committed CRD (server-side apply) and waits until it is established.
pub async fn ensure_crd(env: &TestEnv) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/iamkeyrotation.yaml"))?;
    let crd: CustomResourceDefinition = serde_saphyr::from_str(&text)?;
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

/// A user consenting to namespace `ns` of the test cluster.
pub async fn consenting_user(env: &TestEnv, prefix: &str, ns: &str) -> anyhow::Result<String> {
    let user = env.create_user(prefix).await?;
    let tag = aws_sdk_iam::types::Tag::builder().key(format!("rekey.dev/allow/{ns}")).value(CLUSTER).build()?;
    env.iam.tag_user().user_name(&user).tags(tag).send().await?;
    Ok(user)
}

pub fn ikr(name: &str, spec: serde_json::Value) -> anyhow::Result<IamKeyRotation> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "rekey.dev/v1alpha1", "kind": "IamKeyRotation",
        "metadata": {"name": name}, "spec": spec,
    }))?)
}

pub fn deployment(name: &str, replicas: i32, secret: &str) -> anyhow::Result<Deployment> {
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

/// A bare `apps/v1` ReplicaSet (no Deployment above it) whose pods read `secret` through envFrom,
/// as an old manifest or another tool might have left one.
pub fn bare_replicaset(name: &str, replicas: i32, secret: &str) -> anyhow::Result<ReplicaSet> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [
                {"name": "app", "image": "app:1", "envFrom": [{"secretRef": {"name": secret}}]}]}},
        }
    }))?)
}

/// A Deployment whose pods never start (they also need a Secret that does not exist, `missing`).
pub fn never_healthy(name: &str) -> anyhow::Result<Deployment> {
    let mut d = deployment(name, 1, "creds")?;
    if let Some(c) = d.spec.as_mut().and_then(|s| s.template.spec.as_mut()).map(|s| &mut s.containers[0]) {
        c.env = Some(vec![serde_json::from_value(
            json!({"name": "X", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k"}}}),
        )?]);
    }
    Ok(d)
}

/// An env-format Secret holding `key`, as a team would have created it before rekey.
pub fn key_secret(name: &str, key: &KeyPair) -> anyhow::Result<Secret> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "stringData": {"AWS_ACCESS_KEY_ID": key.access_key_id, "AWS_SECRET_ACCESS_KEY": key.secret_access_key},
    }))?)
}

/// Waits until every replica of the Deployment is updated and Ready.
pub async fn deployment_ready(api: &Api<Deployment>, name: &str, timeout: Duration) -> anyhow::Result<()> {
    eventually(&format!("{name} ready"), timeout, || async {
        let d = api.get(name).await?;
        let s = d.status.unwrap_or_default();
        let want = d.spec.and_then(|s| s.replicas).unwrap_or(1);
        let ok = s.ready_replicas == Some(want) && s.updated_replicas == Some(want) && s.replicas == Some(want);
        Ok(if ok { Ok(()) } else { Err(format!("{s:?}")) })
    })
    .await
}

/// The status condition `type_` as (status, reason).
pub fn condition(obj: &IamKeyRotation, type_: &str) -> Option<(String, String)> {
    obj.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_).map(|c| (c.status.clone(), c.reason.clone()))
}

/// The message of status condition `type_`.
pub fn message(o: &IamKeyRotation, type_: &str) -> Option<String> {
    o.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_).map(|c| c.message.clone())
}

/// The access key id an env-format Secret holds, if it exists and holds one.
pub async fn held_key(secrets: &Api<Secret>, name: &str) -> anyhow::Result<Option<String>> {
    let s = secrets.get_opt(name).await?;
    let id = s.and_then(|s| s.data).and_then(|d| d.get("AWS_ACCESS_KEY_ID").cloned());
    Ok(id.map(|v| String::from_utf8_lossy(&v.0).into_owned()))
}

pub fn is_true(o: &IamKeyRotation, type_: &str, reason: &str) -> bool {
    condition(o, type_) == Some(("True".into(), reason.into()))
}

pub fn phase(o: &IamKeyRotation) -> rekey::api::Phase {
    o.status.as_ref().map(|s| s.phase).unwrap_or_default()
}

pub fn active_key(o: &IamKeyRotation) -> Option<String> {
    o.status.as_ref()?.active_key.as_ref().map(|k| k.access_key_id.clone())
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

/// Watches every pod of a namespace in the background and records each one that went NotReady
/// because of its AWS key (the simulated kubelet says so in the Ready condition's message).
pub struct KeyBreakWatch {
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl KeyBreakWatch {
    pub fn start(env: &TestEnv, ns: &str) -> Self {
        let pods: Api<Pod> = Api::namespaced(env.kube.clone(), ns);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let out = seen.clone();
        let task = tokio::spawn(async move {
            // Samples until stop(), for as long as the test watches; not a wait, so not `eventually`.
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
