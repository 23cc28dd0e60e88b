//! The Secrets rekey writes: rendering a key and reading back which key a Secret holds (each format
//! in its own module under `format`; the functions here pick it from the target), and the staging
//! Secret. Rendering and reading are pure; the functions taking a client touch the cluster and say so.
//!
//! A target Secret is written with server-side apply under the resource's own field manager, with
//! only the keys rekey owns: other keys of the Secret are never touched, and two resources never
//! strip each other's fields. Target Secrets never get an ownerReference (deleting the resource must
//! not delete credentials in use); the staging Secret does.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::json;

use crate::api::{ACCESS_KEY_ANNOTATION, SecretFormat, SecretTarget};
use crate::error::{SecretWriteError, summarise};
use crate::ownership::fnv1a;
use crate::plan::snapshot::SecretState;

pub mod format;
mod managers;

pub use managers::{gitops_tool, writers};

pub use format::credentials_file::CREDENTIALS_KEY;
pub use format::env::{DEFAULT_ID_KEY, DEFAULT_SECRET_KEY};
pub use format::template::SECRET_PLACEHOLDER;

/// Label on every Secret rekey writes, naming the resource that wrote it (for people and
/// `kubectl get secrets -l`; rekey itself does not watch Secrets).
pub const MANAGED_LABEL: &str = "rekey.dev/managed-by";

/// An access key with its secret, which never leaves this type except into a Secret's data.
#[derive(Clone)]
pub struct AccessKey {
    pub id: String,
    pub secret: SecretString,
}

impl std::fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessKey").field("id", &self.id).field("secret", &"[REDACTED]").finish()
    }
}

/// What goes into the template placeholders besides the key.
#[derive(Clone, Debug, Default)]
pub struct RenderContext {
    pub user_name: String,
    pub region: String,
}

/// The Secret keys rekey owns in a target, with their content for `key`.
pub fn render(t: &SecretTarget, key: &AccessKey, ctx: &RenderContext) -> BTreeMap<String, SecretString> {
    format::of(t.format).render(t, key, ctx)
}

/// The Secret keys rekey owns in a target (for removal and for "is it empty").
pub fn owned_keys(t: &SecretTarget) -> Vec<String> {
    format::of(t.format).owned_keys(t)
}

/// Which key a target Secret holds, read from the keys rekey owns.
pub fn held(t: &SecretTarget, s: Option<&Secret>) -> SecretState {
    match s {
        None => SecretState::Missing,
        Some(s) => format::of(t.format).held(t, s),
    }
}

/// The secret access key a target Secret holds (to copy it into a Secret added later).
pub fn read_key(t: &SecretTarget, s: &Secret) -> Option<AccessKey> {
    format::of(t.format).read_key(t, s)
}

/// Whether a key can be copied back out of this target's Secret (to fill another Secret from it):
/// a template's cannot.
pub fn readable(t: &SecretTarget) -> bool {
    format::of(t.format).readable()
}

/// Field manager of a resource: `rekey/<name>`, hashed when it would pass the apiserver's 128.
pub fn field_manager(resource: &str) -> String {
    let m = format!("rekey/{resource}");
    if m.len() <= 128 {
        return m;
    }
    format!("rekey/{}~{:08x}", &resource[..100], fnv1a(resource.as_bytes()))
}

/// Name of a resource's staging Secret.
pub fn staging_name(resource: &str) -> String {
    let n = format!("{resource}-rekey-staging");
    if n.len() <= 253 {
        return n;
    }
    format!("{}-{:08x}-rekey-staging", &resource[..200], fnv1a(resource.as_bytes()))
}

/// The staging Secret's layout: env format with the default key names.
pub fn staging_target(resource: &str) -> SecretTarget {
    SecretTarget {
        name: staging_name(resource),
        format: SecretFormat::Env,
        access_key_id_key: None,
        secret_access_key_key: None,
        profile: None,
        template: None,
    }
}

fn apply_body(name: &str, resource: &str, key_id: Option<&str>, data: BTreeMap<String, String>) -> serde_json::Value {
    let mut meta = json!({"name": name, "labels": {MANAGED_LABEL: resource}});
    if let Some(id) = key_id {
        meta["annotations"] = json!({ACCESS_KEY_ANNOTATION: id});
    }
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": data})
}

/// TOUCHES THE CLUSTER. Writes `key` into a target Secret's owned keys (creating the Secret if
/// missing); `dry_run` asks the apiserver to check the write without persisting it.
pub async fn write_target(
    api: &Api<Secret>,
    resource: &str,
    t: &SecretTarget,
    key: &AccessKey,
    ctx: &RenderContext,
    dry_run: bool,
) -> Result<(), SecretWriteError> {
    let data: BTreeMap<String, String> =
        render(t, key, ctx).into_iter().map(|(k, v)| (k, base64(v.expose_secret().as_bytes()))).collect();
    let body = apply_body(&t.name, resource, Some(&key.id), data);
    let mut pp = PatchParams::apply(&field_manager(resource)).force();
    if dry_run {
        pp = pp.dry_run();
    }
    api.patch(&t.name, &pp, &Patch::Apply(&body)).await.map_err(|e| summarise("apply", &t.name, e))?;
    Ok(())
}

/// TOUCHES THE CLUSTER. Removes the keys rekey wrote from a target Secret (deletionPolicy Delete).
pub async fn clear_target(api: &Api<Secret>, resource: &str, t: &SecretTarget) -> Result<(), SecretWriteError> {
    // Applying an object without the owned keys, under the same manager, removes exactly them.
    let body = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": t.name}});
    match api.patch(&t.name, &PatchParams::apply(&field_manager(resource)).force(), &Patch::Apply(&body)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(summarise("clear", &t.name, e)),
    }
}

/// TOUCHES THE CLUSTER. Creates the staging Secret empty, owned by the resource, if missing.
pub async fn ensure_staging(
    api: &Api<Secret>,
    resource: &str,
    owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
) -> Result<(), SecretWriteError> {
    let name = staging_name(resource);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {MANAGED_LABEL: resource}, "ownerReferences": [owner]},
        "type": "Opaque",
    }))
    .map_err(|_| SecretWriteError { verb: "build", name: name.clone(), reason: "Invalid".into(), code: 0 })?;
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(summarise("create", &name, e)),
    }
}

/// TOUCHES THE CLUSTER. Puts the new key into the staging Secret: the one write between
/// CreateAccessKey and safety, so it is a plain update of an object known to exist. With
/// `dry_run` (the preflight) the apiserver only checks that the write would be admitted.
pub async fn write_staging(
    api: &Api<Secret>,
    resource: &str,
    key: &AccessKey,
    dry_run: bool,
) -> Result<(), SecretWriteError> {
    let t = staging_target(resource);
    let data: BTreeMap<String, ByteString> = render(&t, key, &RenderContext::default())
        .into_iter()
        .map(|(k, v)| (k, ByteString(v.expose_secret().as_bytes().to_vec())))
        .collect();
    let patch = json!({"metadata": {"annotations": {ACCESS_KEY_ANNOTATION: key.id}}, "data": data});
    let pp = if dry_run { PatchParams::default().dry_run() } else { PatchParams::default() };
    api.patch(&t.name, &pp, &Patch::Merge(&patch)).await.map_err(|e| summarise("write", &t.name, e))?;
    Ok(())
}

/// TOUCHES THE CLUSTER. Empties the staging Secret (a leftover of an abandoned attempt).
pub async fn clear_staging(api: &Api<Secret>, resource: &str) -> Result<(), SecretWriteError> {
    let name = staging_name(resource);
    let patch = json!({"metadata": {"annotations": {ACCESS_KEY_ANNOTATION: null}}, "data": null});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(|e| summarise("clear", &name, e))?;
    Ok(())
}

/// TOUCHES THE CLUSTER. Deletes the staging Secret.
pub async fn delete_staging(api: &Api<Secret>, resource: &str) -> Result<(), SecretWriteError> {
    let name = staging_name(resource);
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(summarise("delete", &name, e)),
    }
}

fn base64(bytes: &[u8]) -> String {
    // k8s-openapi's ByteString serialises as base64; reuse it rather than a second encoder.
    serde_json::to_value(ByteString(bytes.to_vec()))
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(format: SecretFormat) -> SecretTarget {
        SecretTarget { format, ..staging_target("r") }
    }

    fn key() -> AccessKey {
        AccessKey { id: "AKIAEXAMPLE".into(), secret: SecretString::from("s3cr3t/+=".to_owned()) }
    }

    fn secret_of(data: BTreeMap<String, SecretString>) -> Secret {
        Secret {
            data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v.expose_secret().as_bytes().to_vec()))).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn the_free_functions_answer_for_the_targets_format() {
        let t = target(SecretFormat::CredentialsFile);
        let rendered = render(&t, &key(), &RenderContext::default());
        assert_eq!(rendered.keys().collect::<Vec<_>>(), owned_keys(&t).iter().collect::<Vec<_>>());
        assert_eq!(owned_keys(&t), [CREDENTIALS_KEY]);
        let s = secret_of(rendered);
        assert_eq!(held(&t, Some(&s)), SecretState::Holds("AKIAEXAMPLE".into()));
        assert_eq!(read_key(&t, &s).unwrap().secret.expose_secret(), "s3cr3t/+=");
        assert!(readable(&t));
        assert!(!readable(&target(SecretFormat::Template)));
    }

    #[test]
    fn a_missing_secret_is_told_from_an_empty_one() {
        let t = target(SecretFormat::Env);
        assert_eq!(held(&t, None), SecretState::Missing);
        assert_eq!(held(&t, Some(&Secret::default())), SecretState::Empty);
    }

    #[test]
    fn the_staging_secret_reads_back_what_was_written_to_it() {
        let t = staging_target("r");
        let s = secret_of(render(&t, &key(), &RenderContext::default()));
        assert_eq!(read_key(&t, &s).unwrap().id, "AKIAEXAMPLE");
    }

    #[test]
    fn debug_of_a_key_never_shows_the_secret() {
        assert!(!format!("{:?}", key()).contains("s3cr3t"));
    }

    #[test]
    fn long_names_are_cut_to_the_apiservers_limits() {
        let long = "r".repeat(253);
        assert!(field_manager(&long).len() <= 128);
        assert!(staging_name(&long).len() <= 253);
        assert_ne!(field_manager(&long), field_manager(&format!("{}x", &long[..252])));
    }
}
