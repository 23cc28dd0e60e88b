//! The shipped manifests as the tests install them: kustomize output, server-side apply, and the
//! operator's RBAC identity (a kubeconfig that authenticates as its ServiceAccount).

use std::path::PathBuf;

use anyhow::Context as _;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rekey_testenv::env::{TestEnv, eventually};
use serde_json::json;

use super::WAIT;

/// The operator's namespace in the shipped manifests.
pub const OPERATOR_NS: &str = "rekey-system";

/// `kubectl kustomize deploy/<dir>`: the objects a user installs, as JSON.
pub fn kustomize(dir: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let path = format!("{}/deploy/{dir}", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("kubectl").args(["kustomize", &path]).output().context("kubectl")?;
    anyhow::ensure!(out.status.success(), "kubectl kustomize {path}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    Ok(serde_saphyr::from_multiple(&text)?)
}

/// The namespaced overlay with `ns` where it marks the watched namespace (what a user edits).
pub fn watching(objects: Vec<serde_json::Value>, ns: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = serde_json::to_string(&objects)?;
    anyhow::ensure!(text.contains("team-a"), "the namespaced overlay marks its watched namespace as team-a");
    Ok(serde_json::from_str(&text.replace("team-a", ns))?)
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
    service_account_kubeconfig(env, name).await
}

/// A copy of $KUBECONFIG that authenticates with the token of ServiceAccount `name` in
/// [`OPERATOR_NS`].
async fn service_account_kubeconfig(env: &TestEnv, name: &str) -> anyhow::Result<PathBuf> {
    service_account_kubeconfig_in(env, OPERATOR_NS, name).await
}

/// A copy of $KUBECONFIG that authenticates with the token of ServiceAccount `ns`/`name` (the Helm
/// chart's, installed in a release namespace of the test's choosing).
pub async fn service_account_kubeconfig_in(env: &TestEnv, ns: &str, name: &str) -> anyhow::Result<PathBuf> {
    // A bound token from the TokenRequest API (1.24 on no longer mints token Secrets); the
    // ServiceAccount may be seconds old.
    let sas: Api<ServiceAccount> = Api::namespaced(env.kube.clone(), ns);
    let request = TokenRequest {
        spec: TokenRequestSpec { expiration_seconds: Some(24 * 3600), ..Default::default() },
        ..Default::default()
    };
    let token = eventually("ServiceAccount token", WAIT, || async {
        let minted = sas.create_token_request(name, &PostParams::default(), &request).await?;
        Ok(minted.status.map(|s| s.token).filter(|t| !t.is_empty()).ok_or_else(|| "no token yet".to_owned()))
    })
    .await?;
    let mut kubeconfig: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(std::env::var("KUBECONFIG").context("KUBECONFIG")?)?)?;
    kubeconfig["users"][0]["user"] = json!({"token": token});
    let file = if ns == OPERATOR_NS { format!("kubeconfig-{name}") } else { format!("kubeconfig-{ns}-{name}") };
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(file);
    std::fs::write(&path, serde_saphyr::to_string(&kubeconfig)?)?;
    Ok(path)
}
