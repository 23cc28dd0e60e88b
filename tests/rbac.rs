//! The operator runs with exactly the RBAC that `kubectl kustomize deploy/<mode>` renders, authenticated as its
//! ServiceAccount against the RBAC-enabled apiserver; without one of its rules it says which.

mod support;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rekey::api::Phase;
use rekey_testenv::env::TestEnv;
use serde_json::json;
use support::*;

const NS: &str = OPERATOR_NS;

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
async fn every_kustomize_overlay_renders_is_hardened_and_accepted_by_the_apiserver() -> anyhow::Result<()> {
    let env = TestEnv::get().await?;
    let watched = env.namespace("kustomize").await?;
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_rekey")).args(["run", "--help"]).output()?;
    let help = String::from_utf8(help.stdout)?;
    for overlay in ["", "cluster-wide", "namespaced"] {
        let rendered = kustomize(overlay)?;
        let objects = if overlay == "namespaced" { watching(rendered, &watched)? } else { rendered };
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
                    let known =
                        help.contains(&format!("[env: {name}=")) || ["POD_NAME", "POD_NAMESPACE"].contains(&name);
                    assert!(known, "deploy/{overlay}: {name} is not a setting of `rekey run`");
                }
                let cluster = c["env"].as_array().into_iter().flatten().find(|e| e["name"] == "REKEY_CLUSTER_NAME");
                // A forgotten CHANGE line cannot pass silently: rekey refuses the placeholder.
                let value = cluster.and_then(|e| e["value"].as_str()).context("REKEY_CLUSTER_NAME")?;
                assert_eq!(value, "CHANGE-ME-cluster-name", "settings override the base");
                let refused = std::process::Command::new(env!("CARGO_BIN_EXE_rekey"))
                    .args(["run", "--cluster-name", value])
                    .output()?;
                assert!(!refused.status.success(), "the placeholder is refused");
                assert!(String::from_utf8_lossy(&refused.stderr).contains("is not this cluster's name"));
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

/// Installing into another namespace is kustomize's namespace transformer, nothing else to edit.
#[test]
fn an_overlay_with_a_namespace_moves_every_object_of_the_install() -> anyhow::Result<()> {
    let objects = kustomize("../examples/other-namespace")?;
    let text = serde_json::to_string(&objects)?;
    assert!(!text.contains(OPERATOR_NS), "something still names {OPERATOR_NS}");
    for v in &objects {
        let (kind, meta) = (v["kind"].as_str().unwrap_or_default(), &v["metadata"]);
        match kind {
            "Namespace" => assert_eq!(meta["name"], "platform-rekey"),
            "ClusterRole" | "ClusterRoleBinding" => assert!(meta["namespace"].is_null(), "{kind}"),
            _ => assert_eq!(meta["namespace"], "platform-rekey", "{kind} {}", meta["name"]),
        }
        for s in v["subjects"].as_array().into_iter().flatten() {
            assert_eq!(s["namespace"], "platform-rekey", "{kind}'s subject");
        }
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
