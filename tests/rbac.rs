//! The operator runs with exactly the RBAC that `kubectl kustomize deploy/<mode>` renders, authenticated as its
//! ServiceAccount against the RBAC-enabled apiserver; without one of its rules it says which.

mod support;

use std::path::PathBuf;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use rekey::api::Phase;
use rekey_testenv::env::{TestEnv, eventually};
use serde::Deserialize as _;
use serde_json::json;
use support::*;

const NS: &str = "rekey-system";

/// Applies the RBAC objects of the cluster-wide kustomize overlay, under other names (tests run side
/// by side) and optionally without one rule, and returns a kubeconfig file that authenticates as the
/// ServiceAccount.
async fn operator_identity(env: &TestEnv, name: &str, drop_rule: Option<(&str, &str)>) -> anyhow::Result<PathBuf> {
    operator_identity_in(env, name, drop_rule, None).await
}

/// As [`operator_identity`]; with `namespaced`, the namespaced overlay with that namespace in the
/// place marked for the watched namespace.
async fn operator_identity_in(
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
        if !["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"].contains(&kind.as_str()) {
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
        for s in v["subjects"].as_array_mut().into_iter().flatten() {
            s["name"] = json!(name);
        }
        for r in v["rules"].as_array_mut().into_iter().flatten() {
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

/// The namespaced overlay with `ns` where it marks the watched namespace (what a user edits).
fn watching(objects: Vec<serde_json::Value>, ns: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = serde_json::to_string(&objects)?;
    anyhow::ensure!(text.contains("team-a"), "the namespaced overlay marks its watched namespace as team-a");
    Ok(serde_json::from_str(&text.replace("team-a", ns))?)
}

#[tokio::test]
async fn every_kustomize_overlay_renders_is_hardened_and_accepted_by_the_apiserver() -> anyhow::Result<()> {
    let env = TestEnv::get().await?;
    let watched = env.namespace("kustomize").await?;
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_rekey")).args(["run", "--help"]).output()?;
    let help = String::from_utf8(help.stdout)?;
    for overlay in ["", "cluster-wide", "namespaced"] {
        let objects = watching(kustomize(overlay)?, &watched).or_else(|_| kustomize(overlay))?;
        let mut kinds = Vec::new();
        for v in &objects {
            let kind = v["kind"].as_str().context("kind")?.to_owned();
            // The namespace is created for real, so the objects in it can be checked.
            apply_manifest(&env.kube, v, kind != "Namespace").await.with_context(|| format!("deploy/{overlay}"))?;
            if kind == "Deployment" {
                let pod = &v["spec"]["template"]["spec"];
                assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
                assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
                let c = &pod["containers"][0];
                assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
                assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
                assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
                assert_eq!(c["image"], "registry.example.com/rekey:0.1.0", "the image is set in deploy/settings/");
                assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
                assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
                // Every variable the manifests set is one `rekey run` reads (a typo would be ignored).
                for e in c["env"].as_array().context("env")? {
                    let name = e["name"].as_str().context("env name")?;
                    let known = help.contains(&format!("[env: {name}=")) || ["POD_NAME", "POD_NAMESPACE"].contains(&name);
                    assert!(known, "deploy/{overlay}: {name} is not a setting of `rekey run`");
                }
                let cluster = c["env"].as_array().into_iter().flatten().find(|e| e["name"] == "REKEY_CLUSTER_NAME");
                assert_ne!(cluster.map(|e| &e["value"]), Some(&json!("CHANGE-ME")), "settings override the base");
            }
            if kind == "ServiceAccount" {
                assert!(v["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].is_string(), "the IRSA place");
            }
            if kind == "ClusterRole" || kind == "Role" {
                let text = v.to_string();
                assert!(!text.contains("\"*\""), "no wildcard verbs or resources");
                assert!(!text.contains("customresourcedefinitions"), "the operator never writes CRDs");
                for r in v["rules"].as_array().into_iter().flatten() {
                    if r["resources"].as_array().is_some_and(|rs| rs.iter().any(|x| x == "secrets")) {
                        let verbs = r["verbs"].to_string();
                        assert!(!verbs.contains("list") && !verbs.contains("watch"), "rekey cannot enumerate Secrets");
                    }
                }
            }
            kinds.push(kind);
        }
        for k in ["Namespace", "Deployment", "Service", "NetworkPolicy", "ServiceAccount", "Role", "RoleBinding"] {
            assert!(kinds.iter().any(|x| x == k), "deploy/{overlay} ships a {k}");
        }
        let cluster_role = kinds.iter().any(|x| x == "ClusterRole");
        assert_eq!(cluster_role, overlay != "namespaced", "deploy/{overlay}: a ClusterRole only in cluster-wide mode");
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
