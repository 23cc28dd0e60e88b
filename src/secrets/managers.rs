//! PURE: who else writes a target Secret. Tools that own a Secret's content (GitOps controllers,
//! External Secrets, Helm) rewrite it on their next sync, putting back whatever key they hold; the
//! field managers in `managedFields` name whoever last wrote the keys rekey owns.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;

use crate::api::SecretTarget;

/// The tool that owns this Secret's content, from the labels, annotations and owner references
/// Argo CD, Flux, External Secrets and Helm put on what they manage.
pub fn gitops_tool(s: &Secret) -> Option<&'static str> {
    let m = &s.metadata;
    let label = |k: &str| m.labels.as_ref().and_then(|l| l.get(k)).map(String::as_str);
    let has_label = |k: &str| label(k).is_some();
    let has_annotation = |k: &str| m.annotations.as_ref().is_some_and(|a| a.contains_key(k));
    let owned_by = |group: &str, kind: &str| {
        m.owner_references.iter().flatten().any(|o| o.kind == kind && o.api_version.starts_with(group))
    };
    if has_annotation("argocd.argoproj.io/tracking-id") || has_label("argocd.argoproj.io/instance") {
        return Some("Argo CD");
    }
    if has_label("kustomize.toolkit.fluxcd.io/name") || has_label("helm.toolkit.fluxcd.io/name") {
        return Some("Flux");
    }
    if owned_by("external-secrets.io/", "ExternalSecret") || has_annotation("reconcile.external-secrets.io/data-hash") {
        return Some("External Secrets");
    }
    if label("app.kubernetes.io/managed-by") == Some("Helm") && has_annotation("meta.helm.sh/release-name") {
        return Some("Helm");
    }
    None
}

/// When the keys a target owns were last written, by the apiserver's clock: the newest time among
/// the field managers that own one of `keys` (the apiserver stamps a manager's entry when its write
/// changes the object). Writes of other keys or of metadata do not count. `None` when no manager
/// owns them.
pub fn last_write(keys: &[String], s: &Secret) -> Option<k8s_openapi::jiff::Timestamp> {
    let owns = |f: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry| {
        let fields = f.fields_v1.as_ref().map(|v| &v.0);
        ["f:data", "f:stringData"].iter().any(|section| {
            let owned = fields.and_then(|v| v.get(*section)).and_then(|d| d.as_object());
            owned.is_some_and(|o| keys.iter().any(|k| o.contains_key(&format!("f:{k}"))))
        })
    };
    s.metadata.managed_fields.iter().flatten().filter(|f| owns(f)).filter_map(|f| f.time.as_ref().map(|t| t.0)).max()
}

/// What every rekey field manager starts with (`rekey/<resource>`, see `field_manager`).
pub const REKEY_PREFIX: &str = "rekey/";

/// The field managers other than `own` that own one of the target's keys in `data` (or
/// `stringData`): who wrote what rekey did not.
pub fn writers(t: &SecretTarget, s: &Secret, own: &str) -> Vec<String> {
    key_owners(&super::owned_keys(t), s, own).into_keys().collect()
}

/// Each field manager other than `own`, with those of `keys` it owns in `data` or `stringData`
/// (only managers owning at least one).
pub fn key_owners(keys: &[String], s: &Secret, own: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in s.metadata.managed_fields.iter().flatten() {
        let Some(manager) = f.manager.as_deref().filter(|m| *m != own) else { continue };
        let fields = f.fields_v1.as_ref().map(|v| &v.0);
        for section in ["f:data", "f:stringData"] {
            let Some(owned) = fields.and_then(|v| v.get(section)).and_then(|d| d.as_object()) else { continue };
            for k in keys.iter().filter(|k| owned.contains_key(&format!("f:{k}"))) {
                out.entry(manager.to_owned()).or_default().insert(k.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn secret(meta: serde_json::Value) -> Secret {
        serde_json::from_value(json!({ "metadata": meta })).unwrap()
    }

    #[test]
    fn each_tool_that_rewrites_secrets_is_recognised() {
        let cases = [
            (json!({"annotations": {"argocd.argoproj.io/tracking-id": "app:/Secret:ns/s"}}), Some("Argo CD")),
            (json!({"labels": {"kustomize.toolkit.fluxcd.io/name": "apps"}}), Some("Flux")),
            (
                json!({"ownerReferences": [{"apiVersion": "external-secrets.io/v1beta1", "kind": "ExternalSecret", "name": "s", "uid": "u"}]}),
                Some("External Secrets"),
            ),
            (json!({"annotations": {"reconcile.external-secrets.io/data-hash": "abc"}}), Some("External Secrets")),
            (
                json!({"labels": {"app.kubernetes.io/managed-by": "Helm"}, "annotations": {"meta.helm.sh/release-name": "billing"}}),
                Some("Helm"),
            ),
            // The label alone is what many charts copy into templates: not proof Helm owns it.
            (json!({"labels": {"app.kubernetes.io/managed-by": "Helm"}}), None),
            (json!({"labels": {"app": "x"}}), None),
        ];
        for (meta, want) in cases {
            assert_eq!(gitops_tool(&secret(meta.clone())), want, "{meta}");
        }
    }

    #[test]
    fn writers_are_the_other_managers_of_the_owned_keys() {
        let t: SecretTarget = serde_json::from_value(json!({"name": "s"})).unwrap();
        let s = secret(json!({"managedFields": [
            {"manager": "rekey/billing", "operation": "Apply", "fieldsType": "FieldsV1",
             "fieldsV1": {"f:data": {"f:AWS_ACCESS_KEY_ID": {}, "f:AWS_SECRET_ACCESS_KEY": {}}}},
            {"manager": "helm", "operation": "Update", "fieldsType": "FieldsV1",
             "fieldsV1": {"f:data": {"f:AWS_ACCESS_KEY_ID": {}}}},
            {"manager": "kubectl-label", "operation": "Update", "fieldsType": "FieldsV1",
             "fieldsV1": {"f:metadata": {"f:labels": {}}}},
            {"manager": "other", "operation": "Update", "fieldsType": "FieldsV1",
             "fieldsV1": {"f:data": {"f:UNRELATED": {}}}},
        ]}));
        assert_eq!(writers(&t, &s, "rekey/billing"), ["helm"]);
    }

    #[test]
    fn the_last_write_is_the_newest_time_of_a_manager_of_the_owned_keys() {
        let keys = ["AWS_ACCESS_KEY_ID".to_owned()];
        let s = secret(json!({"managedFields": [
            {"manager": "rekey/billing", "operation": "Apply", "time": "2026-06-01T12:00:05Z", "fieldsType": "FieldsV1",
             "fieldsV1": {"f:data": {"f:AWS_ACCESS_KEY_ID": {}}}},
            {"manager": "helm", "operation": "Update", "time": "2026-06-01T12:00:07Z", "fieldsType": "FieldsV1",
             "fieldsV1": {"f:stringData": {"f:AWS_ACCESS_KEY_ID": {}}}},
            // Another key, or only a label, written later: what the pods read of rekey's keys did not change.
            {"manager": "other", "operation": "Update", "time": "2026-06-01T12:00:09Z", "fieldsType": "FieldsV1",
             "fieldsV1": {"f:data": {"f:UNRELATED": {}}}},
            {"manager": "kubectl-label", "operation": "Update", "time": "2026-06-01T12:00:11Z", "fieldsType": "FieldsV1",
             "fieldsV1": {"f:metadata": {"f:labels": {}}}},
        ]}));
        assert_eq!(last_write(&keys, &s), Some("2026-06-01T12:00:07Z".parse().unwrap()));
        assert_eq!(last_write(&keys, &secret(json!({}))), None, "no managedFields: no time to excuse a pod by");
    }
}
