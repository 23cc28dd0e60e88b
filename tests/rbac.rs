//! The operator runs with exactly the RBAC of deploy/rbac.yaml, authenticated as its
//! ServiceAccount against the RBAC-enabled apiserver; without one of its rules it says which.

mod support;

use std::path::PathBuf;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, Patch, PatchParams, PostParams};
use rekey::api::Phase;
use rekey_testenv::env::{TestEnv, eventually};
use serde::Deserialize as _;
use serde_json::json;
use support::*;

const NS: &str = "rekey-system";

/// Applies deploy/rbac.yaml, optionally under other names and without one rule, and returns a
/// kubeconfig file that authenticates as the ServiceAccount.
async fn operator_identity(env: &TestEnv, name: &str, drop_rule: Option<(&str, &str)>) -> anyhow::Result<PathBuf> {
    operator_identity_in(env, name, drop_rule, None).await
}

/// As [`operator_identity`]; with `namespaced`, no ClusterRole: deploy/namespaced/role.yaml in
/// that namespace instead.
async fn operator_identity_in(
    env: &TestEnv,
    name: &str,
    drop_rule: Option<(&str, &str)>,
    namespaced: Option<&str>,
) -> anyhow::Result<PathBuf> {
    let pp = PatchParams::apply("rekey-tests").force();
    let nss: Api<Namespace> = Api::all(env.kube.clone());
    nss.patch(NS, &pp, &Patch::Apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})))
        .await?;
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/rbac.yaml"))?;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_json::Value::deserialize(doc)?;
        match v["kind"].as_str() {
            Some("ServiceAccount") => {
                let mut sa: ServiceAccount = serde_json::from_value(v)?;
                sa.metadata.name = Some(name.into());
                Api::<ServiceAccount>::namespaced(env.kube.clone(), NS).patch(name, &pp, &Patch::Apply(&sa)).await?;
            }
            Some("ClusterRole" | "ClusterRoleBinding") if namespaced.is_some() => {}
            Some("ClusterRole") => {
                let mut role: ClusterRole = serde_json::from_value(v)?;
                role.metadata.name = Some(name.into());
                if let (Some((resource, verb)), Some(rules)) = (drop_rule, role.rules.as_mut()) {
                    for r in rules.iter_mut().filter(|r| r.resources.iter().flatten().any(|x| x == resource)) {
                        r.verbs.retain(|v| v != verb);
                    }
                }
                Api::<ClusterRole>::all(env.kube.clone()).patch(name, &pp, &Patch::Apply(&role)).await?;
            }
            Some("ClusterRoleBinding") => {
                let mut b: ClusterRoleBinding = serde_json::from_value(v)?;
                b.metadata.name = Some(name.into());
                b.role_ref.name = name.into();
                for s in b.subjects.iter_mut().flatten() {
                    s.name = name.into();
                }
                Api::<ClusterRoleBinding>::all(env.kube.clone()).patch(name, &pp, &Patch::Apply(&b)).await?;
            }
            Some("Role") => {
                let mut role: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(v)?;
                role.metadata.name = Some(name.into());
                for r in role.rules.iter_mut().flatten() {
                    if let Some(names) = r.resource_names.as_mut() {
                        *names = vec![name.to_owned()];
                    }
                }
                Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(env.kube.clone(), NS)
                    .patch(name, &pp, &Patch::Apply(&role))
                    .await?;
            }
            Some("RoleBinding") => {
                let mut b: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(v)?;
                b.metadata.name = Some(name.into());
                b.role_ref.name = name.into();
                for s in b.subjects.iter_mut().flatten() {
                    s.name = name.into();
                }
                Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(env.kube.clone(), NS)
                    .patch(name, &pp, &Patch::Apply(&b))
                    .await?;
            }
            other => anyhow::bail!("unexpected object in deploy/rbac.yaml: {other:?}"),
        }
    }
    if let Some(ns) = namespaced {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/namespaced/role.yaml"))?
            .replace("WATCHED-NAMESPACE", ns);
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_json::Value::deserialize(doc)?;
            if v["kind"] == "Role" {
                let role: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(v)?;
                Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(env.kube.clone(), ns)
                    .patch("rekey", &pp, &Patch::Apply(&role))
                    .await?;
            } else {
                let mut b: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(v)?;
                for s in b.subjects.iter_mut().flatten() {
                    s.name = name.into();
                }
                Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(env.kube.clone(), ns)
                    .patch("rekey", &pp, &Patch::Apply(&b))
                    .await?;
            }
        }
    }
    // Kubernetes 1.20 mints a token Secret for every ServiceAccount.
    let sas: Api<ServiceAccount> = Api::namespaced(env.kube.clone(), NS);
    let secret_name = eventually("ServiceAccount token", WAIT, || async {
        let sa = sas.get(name).await?;
        Ok(sa.secrets.and_then(|s| s.into_iter().next()).and_then(|r| r.name).ok_or_else(|| "no token yet".to_owned()))
    })
    .await?;
    let token_secret: Secret = Api::<Secret>::namespaced(env.kube.clone(), NS).get(&secret_name).await?;
    let token = token_secret.data.and_then(|d| d.get("token").cloned()).context("token")?;
    let mut kubeconfig: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(std::env::var("KUBECONFIG").context("KUBECONFIG")?)?)?;
    kubeconfig["users"][0]["user"] = serde_yaml::to_value(json!({"token": String::from_utf8(token.0)?}))?;
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("kubeconfig-{name}"));
    std::fs::write(&path, serde_yaml::to_string(&kubeconfig)?)?;
    Ok(path)
}

/// Bootstrap and one rotation of a Deployment's key, by an operator authenticated through
/// `kubeconfig` and leading on Lease `lease` in rekey-system.
async fn rotation_as(f: &Fixture, kubeconfig: &std::path::Path, lease: &str) -> anyhow::Result<()> {
    Api::<Deployment>::namespaced(f.env.kube.clone(), &f.ns)
        .create(&PostParams::default(), &deployment("web", 2, "creds")?)
        .await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "1s"}}))
        .await?;
    let path = kubeconfig.to_str().context("path")?;
    let _op =
        Operator::start(&f.ns, &[("KUBECONFIG", path), ("REKEY_LEASE_NAMESPACE", NS), ("REKEY_LEASE_NAME", lease)])
            .await?;
    wait_ikr(&f.ikrs, "app", "bootstrapped", |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    let patch = json!({"metadata": {"annotations": {"rekey.dev/rotate": "1"}}});
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    let o = wait_ikr(&f.ikrs, "app", "rotated as the ServiceAccount", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await?;
    let key = active_key(&o).context("key")?;
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), vec![key]);
    Ok(())
}

#[tokio::test]
async fn a_full_rotation_passes_with_exactly_the_shipped_rbac() -> anyhow::Result<()> {
    let f = Fixture::new("rbac").await?;
    let kubeconfig = operator_identity(&f.env, "rekey", None).await?;
    rotation_as(&f, &kubeconfig, "rekey").await
}

#[tokio::test]
async fn without_one_needed_rule_the_condition_names_the_forbidden_verb_and_resource() -> anyhow::Result<()> {
    let f = Fixture::new("norbac").await?;
    let kubeconfig = operator_identity(&f.env, "rekey-no-patch-deployments", Some(("deployments", "patch"))).await?;
    Api::<Deployment>::namespaced(f.env.kube.clone(), &f.ns)
        .create(&PostParams::default(), &deployment("web", 1, "creds")?)
        .await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}]})).await?;
    let _op = Operator::start(
        &f.ns,
        &[
            ("KUBECONFIG", kubeconfig.to_str().context("path")?),
            ("REKEY_LEASE_NAMESPACE", NS),
            ("REKEY_LEASE_NAME", "rekey-no-patch-deployments"),
        ],
    )
    .await?;
    let o = wait_ikr(&f.ikrs, "app", "Ready=False/Forbidden", |o| {
        condition(o, "Ready").is_some_and(|c| c.1 == "Forbidden")
    })
    .await?;
    let ready = o.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready")).context("Ready")?;
    assert_eq!(ready.status, "False");
    assert!(
        ready.message.contains("cannot patch resource \"deployments\""),
        "the message names the verb and resource: {}",
        ready.message
    );
    // Safe where it stopped: the key in the Secret is Active, nothing was retired.
    let keys = f.env.keys(&f.user).await?;
    assert_eq!(keys.len(), 1);
    assert!(keys.values().all(|s| s == "Active"));
    Ok(())
}

#[tokio::test]
async fn the_deploy_manifests_are_hardened_and_accepted_by_the_apiserver() -> anyhow::Result<()> {
    use kube::api::{DynamicObject, GroupVersionKind};
    use kube::discovery::ApiResource;
    let env = TestEnv::get().await?;
    let mut kinds = Vec::new();
    for file in ["deploy/operator.yaml", "deploy/rbac.yaml"] {
        let text = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR")))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_json::Value::deserialize(doc)?;
            let obj: DynamicObject = serde_json::from_value(v.clone())?;
            let types = obj.types.clone().context("apiVersion/kind")?;
            let (group, version) = types.api_version.rsplit_once('/').unwrap_or(("", &types.api_version));
            let gvk = GroupVersionKind::gvk(group, version, &types.kind);
            let plural = format!("{}s", types.kind.to_lowercase()).replace("policys", "policies");
            let ar = ApiResource::from_gvk_with_plural(&gvk, &plural);
            let name = obj.metadata.name.clone().context("name")?;
            let api: Api<DynamicObject> = match &obj.metadata.namespace {
                Some(ns) => Api::namespaced_with(env.kube.clone(), ns, &ar),
                None => Api::all_with(env.kube.clone(), &ar),
            };
            if types.kind == "Namespace" {
                api.patch(&name, &PatchParams::apply("rekey-tests"), &Patch::Apply(&v)).await?;
            } else {
                api.patch(&name, &PatchParams::apply("rekey-tests").dry_run(), &Patch::Apply(&v))
                    .await
                    .with_context(|| format!("{file}: {} {name} rejected", types.kind))?;
            }
            kinds.push(types.kind.clone());
            if types.kind == "Deployment" {
                let pod = &v["spec"]["template"]["spec"];
                assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
                assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
                let c = &pod["containers"][0]["securityContext"];
                assert_eq!(c["readOnlyRootFilesystem"], true);
                assert_eq!(c["allowPrivilegeEscalation"], false);
                assert_eq!(c["capabilities"]["drop"], json!(["ALL"]));
            }
            if types.kind == "ClusterRole" {
                let text = v.to_string();
                assert!(!text.contains("\"*\""), "no wildcard verbs or resources");
                assert!(!text.contains("customresourcedefinitions"), "the operator never writes CRDs");
            }
        }
    }
    for k in ["Deployment", "NetworkPolicy", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role"] {
        assert!(kinds.iter().any(|x| x == k), "{k} shipped");
    }
    Ok(())
}

#[tokio::test]
async fn namespaced_mode_needs_no_cluster_role() -> anyhow::Result<()> {
    let f = Fixture::new("nsrbac").await?;
    let name = format!("rekey-{}", f.ns);
    let kubeconfig = operator_identity_in(&f.env, &name, None, Some(&f.ns)).await?;
    rotation_as(&f, &kubeconfig, &name).await
}
