//! The Secrets rekey writes: rendering a key and reading back which key a Secret holds (each format
//! in its own module under `format`; the functions here pick it from the target), and the staging
//! Secret. Rendering and reading are pure; the functions taking a client touch the cluster and say so.
//!
//! A target Secret is written with server-side apply under the resource's own field manager, with
//! only the keys rekey owns: other keys of the Secret are never touched, and two resources never
//! strip each other's fields. A shared format (credentialsFile: several resources each own a
//! profile of one key) is read, merged into and written back with the read's resourceVersion, so a
//! concurrent write makes the apiserver answer 409 (retried on a fresh read) instead of being lost.
//! Target Secrets never get an ownerReference (deleting the resource must not delete credentials in
//! use); the staging Secret does, and rekey touches a staging-named Secret only when it is its own.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource as _;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::json;

use crate::api::{ACCESS_KEY_ANNOTATION, IamKeyRotation, SecretFormat, SecretTarget};
use crate::error::{SecretWriteError, summarise};
use crate::ownership::fnv1a;
use crate::plan::snapshot::SecretState;

pub mod format;
mod managers;
pub mod ses;

pub use managers::{gitops_tool, last_write, writers};

pub use format::credentials_file::{CREDENTIALS_KEY, profile_annotation};
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

/// The Secret keys rekey owns in a target, with their content for `key`; `existing` is the Secret
/// as read before the write (a shared format keeps the parts of it rekey does not own).
pub fn render(
    t: &SecretTarget,
    key: &AccessKey,
    ctx: &RenderContext,
    existing: Option<&Secret>,
) -> BTreeMap<String, SecretString> {
    format::of(t.format).render(t, key, ctx, existing)
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

/// PURE. Why this target must not be written, in the user's terms, when another rekey resource
/// already writes what it would: one of its keys (env, template: a field manager `rekey/…` other
/// than `own_manager` owns it), or its profile (credentialsFile: the profile's annotation names
/// another resource; the `credentials` key itself is legitimately shared).
pub fn conflict(t: &SecretTarget, s: &Secret, own_manager: &str, live: &dyn Fn(&str) -> bool) -> Option<String> {
    format::of(t.format).conflict(t, s, own_manager, live)
}

/// PURE. Whether the Secret is immutable: the apiserver refuses any change to its data, so a
/// rotation must not start on it.
pub fn immutable(s: &Secret) -> bool {
    s.immutable == Some(true)
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
        region: None,
        username_key: None,
        password_key: None,
    }
}

/// PURE. Whether `s` is the staging Secret rekey created for `resource`: labelled for it AND owned
/// by it — by `uid` when the caller knows the resource's uid, else by kind and name. A Secret
/// someone else made under that name is never taken over, written or deleted.
pub fn is_own_staging(s: &Secret, resource: &str, uid: Option<&str>) -> bool {
    let labelled = s.metadata.labels.as_ref().and_then(|l| l.get(MANAGED_LABEL)).is_some_and(|v| v == resource);
    let owned = s.metadata.owner_references.iter().flatten().any(|o| match uid {
        Some(uid) => o.uid == uid,
        None => {
            o.kind == IamKeyRotation::kind(&())
                && o.api_version.starts_with(&format!("{}/", IamKeyRotation::group(&())))
                && o.name == resource
        }
    });
    labelled && owned
}

fn apply_body(name: &str, resource: &str, key_id: Option<&str>, data: BTreeMap<String, String>) -> serde_json::Value {
    let mut meta = json!({"name": name, "labels": {MANAGED_LABEL: resource}});
    if let Some(id) = key_id {
        meta["annotations"] = json!({ACCESS_KEY_ANNOTATION: id});
    }
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": data})
}

fn encode(data: BTreeMap<String, SecretString>) -> BTreeMap<String, String> {
    data.into_iter().map(|(k, v)| (k, base64(v.expose_secret().as_bytes()))).collect()
}

/// Server-side apply of `body` under the resource's field manager.
async fn apply(
    api: &Api<Secret>,
    name: &str,
    resource: &str,
    body: &serde_json::Value,
    force: bool,
    dry_run: bool,
) -> Result<(), kube::Error> {
    let mut pp = PatchParams::apply(&field_manager(resource)).validation_strict();
    pp.force = force;
    if dry_run {
        pp = pp.dry_run();
    }
    api.patch(name, &pp, &Patch::Apply(body)).await.map(drop)
}

/// TOUCHES THE CLUSTER. Writes `key` into a target Secret's owned keys (creating the Secret if
/// missing); `dry_run` asks the apiserver to check the write without persisting it. A shared
/// format's Secret is read first and the write is conditional on it (409 when it changed since,
/// which `Error` turns into a quick retry on a fresh read).
pub async fn write_target(
    api: &Api<Secret>,
    resource: &str,
    t: &SecretTarget,
    key: &AccessKey,
    ctx: &RenderContext,
    dry_run: bool,
) -> Result<(), SecretWriteError> {
    // Only a shared format merges into what is there; the others need no read.
    let existing = if format::of(t.format).shared() {
        api.get_opt(&t.name).await.map_err(|e| summarise("read", &t.name, e))?
    } else {
        None
    };
    apply_target(api, resource, t, key, ctx, existing.as_ref(), dry_run).await
}

/// The write of `write_target`, on the Secret as it was read (`existing`).
async fn apply_target(
    api: &Api<Secret>,
    resource: &str,
    t: &SecretTarget,
    key: &AccessKey,
    ctx: &RenderContext,
    existing: Option<&Secret>,
    dry_run: bool,
) -> Result<(), SecretWriteError> {
    let f = format::of(t.format);
    let mut body = apply_body(&t.name, resource, Some(&key.id), encode(render(t, key, ctx, existing)));
    let mut force = true;
    if f.shared() {
        for (k, v) in f.claims(t, resource) {
            body["metadata"]["annotations"][k] = json!(v);
        }
        match existing.and_then(|s| s.metadata.resource_version.as_deref()) {
            Some(rv) => body["metadata"]["resourceVersion"] = json!(rv),
            // Created by this write: if another resource created it since the read, it owns the
            // key, and an unforced apply conflicts (409) instead of overwriting its profile.
            None => force = false,
        }
    }
    apply(api, &t.name, resource, &body, force, dry_run).await.map_err(|e| summarise("apply", &t.name, e))
}

/// TOUCHES THE CLUSTER. Removes what rekey wrote from a target Secret (deletionPolicy Delete): the
/// owned keys, or for a shared format this resource's part of them.
pub async fn clear_target(api: &Api<Secret>, resource: &str, t: &SecretTarget) -> Result<(), SecretWriteError> {
    let ignore_missing = |r: Result<(), kube::Error>| match r {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other.map_err(|e| summarise("clear", &t.name, e)),
    };
    // Applying an object without the owned keys, under the same manager, removes exactly them.
    let release = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": t.name}});
    let f = format::of(t.format);
    // A Secret deleted by hand stays deleted: an apply would create it, empty.
    let Some(s) = api.get_opt(&t.name).await.map_err(|e| summarise("read", &t.name, e))? else {
        return Ok(());
    };
    if !f.shared() {
        return ignore_missing(apply(api, &t.name, resource, &release, true, false).await);
    }
    let kept = f.without(t, &s, resource);
    // Every owned key is written, an emptied one as "": this manager then owns it (whoever wrote it
    // last), and the release below removes it. Omitting the claim annotations drops them.
    let data: BTreeMap<String, String> = owned_keys(t)
        .into_iter()
        .map(|k| {
            let v = kept.get(&k).map(|v| base64(v.expose_secret().as_bytes())).unwrap_or_default();
            (k, v)
        })
        .collect();
    let rv = s.metadata.resource_version.clone().unwrap_or_default();
    let body = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": t.name, "resourceVersion": rv},
        "data": data});
    ignore_missing(apply(api, &t.name, resource, &body, true, false).await)?;
    if kept.len() < data.len() {
        return ignore_missing(apply(api, &t.name, resource, &release, true, false).await);
    }
    Ok(())
}

/// A staging-named Secret that is not rekey's, as an error. Code 409 (a name clash) with a reason
/// that is not "Conflict": retrying soon would not help, a person must act.
fn not_own_staging(verb: &'static str, name: &str) -> SecretWriteError {
    let reason = "a Secret of this name exists that rekey did not create (no rekey.dev/managed-by label and \
                  owner reference for this resource); rekey will not take it over, change or delete it: rename \
                  or remove it, or rename the IamKeyRotation";
    SecretWriteError { verb, name: name.to_owned(), reason: reason.into(), code: 409 }
}

/// TOUCHES THE CLUSTER. Creates the staging Secret empty, owned by the resource, if missing; one
/// that exists is accepted only if it is rekey's own for this resource (`owner` holds its uid).
/// `clear_staging` and `write_staging` are called only after this succeeded, which is what makes
/// the staging Secret they patch rekey's. Answers whether it holds anything (a leftover to clear):
/// a write that would change nothing is not made.
pub async fn ensure_staging(
    api: &Api<Secret>,
    resource: &str,
    owner: OwnerReference,
) -> Result<bool, SecretWriteError> {
    let name = staging_name(resource);
    let uid = owner.uid.clone();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {MANAGED_LABEL: resource}, "ownerReferences": [owner]},
        "type": "Opaque",
    }))
    .map_err(|_| SecretWriteError { verb: "build", name: name.clone(), reason: "Invalid".into(), code: 0 })?;
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(false),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            match api.get_opt(&name).await.map_err(|e| summarise("read", &name, e))? {
                Some(s) if is_own_staging(&s, resource, Some(&uid)) => Ok(holds_anything(&s)),
                Some(_) => Err(not_own_staging("create", &name)),
                // Deleted since the create: a quick retry creates it.
                None => Err(SecretWriteError { verb: "create", name, reason: "Conflict".into(), code: 409 }),
            }
        }
        Err(e) => Err(summarise("create", &name, e)),
    }
}

fn holds_anything(s: &Secret) -> bool {
    let annotated = s.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(ACCESS_KEY_ANNOTATION));
    annotated || s.data.as_ref().is_some_and(|d| !d.is_empty())
}

/// TOUCHES THE CLUSTER. Puts the new key into the staging Secret: the one write between
/// CreateAccessKey and safety, so it is a plain update of an object known to exist. With
/// `dry_run` (the preflight) the apiserver only checks that the write would be admitted.
/// Call only after `ensure_staging` succeeded for this rotation (it checks the Secret is rekey's;
/// this write does not read first, to stay the one request it is).
pub async fn write_staging(
    api: &Api<Secret>,
    resource: &str,
    key: &AccessKey,
    dry_run: bool,
) -> Result<(), SecretWriteError> {
    let t = staging_target(resource);
    let data: BTreeMap<String, ByteString> = render(&t, key, &RenderContext::default(), None)
        .into_iter()
        .map(|(k, v)| (k, ByteString(v.expose_secret().as_bytes().to_vec())))
        .collect();
    let patch = json!({"metadata": {"annotations": {ACCESS_KEY_ANNOTATION: key.id}}, "data": data});
    let pp = PatchParams::default().validation_strict();
    let pp = if dry_run { pp.dry_run() } else { pp };
    api.patch(&t.name, &pp, &Patch::Merge(&patch)).await.map_err(|e| summarise("write", &t.name, e))?;
    Ok(())
}

/// TOUCHES THE CLUSTER. Empties the staging Secret (a leftover of an abandoned attempt). Call only
/// after `ensure_staging` succeeded: it is what checks that the Secret is rekey's.
pub async fn clear_staging(api: &Api<Secret>, resource: &str) -> Result<(), SecretWriteError> {
    let name = staging_name(resource);
    let patch = json!({"metadata": {"annotations": {ACCESS_KEY_ANNOTATION: null}}, "data": null});
    let pp = PatchParams::default().validation_strict();
    api.patch(&name, &pp, &Patch::Merge(&patch)).await.map_err(|e| summarise("clear", &name, e))?;
    Ok(())
}

/// TOUCHES THE CLUSTER. Deletes the staging Secret if it is rekey's (by label and an owner
/// reference naming the resource: callers do not all know its uid); a foreign Secret of that name
/// is left alone and reported as an error.
pub async fn delete_staging(api: &Api<Secret>, resource: &str) -> Result<(), SecretWriteError> {
    let name = staging_name(resource);
    let Some(s) = api.get_opt(&name).await.map_err(|e| summarise("read", &name, e))? else {
        return Ok(());
    };
    if !is_own_staging(&s, resource, None) {
        return Err(not_own_staging("delete", &name));
    }
    // The object checked is the one deleted, not one put in its place since.
    let preconditions =
        Preconditions { uid: s.metadata.uid.clone(), resource_version: s.metadata.resource_version.clone() };
    let dp = DeleteParams { preconditions: Some(preconditions), ..DeleteParams::default() };
    match api.delete(&name, &dp).await {
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
        let rendered = render(&t, &key(), &RenderContext::default(), None);
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
        let s = secret_of(render(&t, &key(), &RenderContext::default(), None));
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

    #[test]
    fn conflict_answers_for_the_targets_format() {
        let env = target(SecretFormat::Env);
        let s: Secret = serde_json::from_value(json!({"metadata": {
            "annotations": {profile_annotation("default"): "other"},
            "managedFields": [{"manager": "rekey/other", "operation": "Apply", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:data": {"f:AWS_ACCESS_KEY_ID": {}, "f:credentials": {}}}}],
        }}))
        .unwrap();
        assert!(conflict(&env, &s, "rekey/r", &|_| true).unwrap().contains("key(s) AWS_ACCESS_KEY_ID"));
        // A credentials file's key is shared; its profile's claim is what conflicts.
        let file = target(SecretFormat::CredentialsFile);
        assert!(conflict(&file, &s, "rekey/r", &|_| true).unwrap().contains("profile default of key credentials"));
        let other_profile = SecretTarget { profile: Some("billing".into()), ..file };
        assert_eq!(conflict(&other_profile, &s, "rekey/r", &|_| true), None);
    }

    #[test]
    fn only_a_secret_marked_immutable_is_immutable() {
        let of =
            |v: serde_json::Value| serde_json::from_value::<Secret>(json!({"metadata": {}, "immutable": v})).unwrap();
        assert!(immutable(&of(json!(true))));
        assert!(!immutable(&of(json!(false))));
        assert!(!immutable(&of(serde_json::Value::Null)));
    }

    #[test]
    fn a_staging_secret_is_rekeys_only_with_its_label_and_its_owner() {
        let staging = |labels: serde_json::Value, owners: serde_json::Value| -> Secret {
            serde_json::from_value(json!({"metadata": {"labels": labels, "ownerReferences": owners}})).unwrap()
        };
        let owner = json!([{"apiVersion": "rekey.dev/v1alpha1", "kind": "IamKeyRotation", "name": "r", "uid": "u-1"}]);
        let label = json!({MANAGED_LABEL: "r"});
        let own = staging(label.clone(), owner.clone());
        assert!(is_own_staging(&own, "r", Some("u-1")) && is_own_staging(&own, "r", None));
        assert!(!is_own_staging(&own, "r", Some("u-2")), "an earlier resource of the same name");
        assert!(!is_own_staging(&own, "q", None), "another resource's");
        assert!(!is_own_staging(&staging(json!({}), owner), "r", Some("u-1")), "no label");
        assert!(!is_own_staging(&staging(label.clone(), json!([])), "r", None), "no owner");
        let foreign_kind = json!([{"apiVersion": "apps/v1", "kind": "Deployment", "name": "r", "uid": "u-1"}]);
        assert!(!is_own_staging(&staging(label, foreign_kind), "r", None), "owned by something else");
    }
}

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod cluster_tests;
