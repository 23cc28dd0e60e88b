//! Gathering the snapshot the plan decides on. TOUCHES THE CLUSTER AND IAM (reads only).
//!
//! The cheap part (the Secrets) is read on every reconcile; IAM and the workloads only when the
//! plan asks for them, so an Idle resource costs no AWS call.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::{Resource as _, ResourceExt as _};

use crate::api::{
    IamKeyRotation, IamKeyRotationStatus, RETIRE_ANNOTATION, ROTATE_ANNOTATION, ROTATE_EMERGENCY_ANNOTATION,
};
use crate::error::Error;
use crate::iam::Iam;
use crate::plan::snapshot::{IamState, Observed, Requests, SecretState};
use crate::secrets;

async fn get_secret(api: &Api<Secret>, name: &str) -> Result<Option<Secret>, Error> {
    Ok(api.get_opt(name).await?)
}

pub fn requests(obj: &IamKeyRotation) -> Requests {
    let a = obj.annotations();
    Requests {
        rotate: a.get(ROTATE_ANNOTATION).cloned(),
        emergency: a.get(ROTATE_EMERGENCY_ANNOTATION).cloned(),
        retire: a.get(RETIRE_ANNOTATION).cloned(),
    }
}

/// The Secrets and the staging Secret, read fresh from the apiserver.
/// `live`: whether an IamKeyRotation of this namespace exists (a field manager or claim of another
/// is a conflict only while that resource exists).
pub async fn basic(
    client: &kube::Client,
    obj: &IamKeyRotation,
    now: Timestamp,
    live: &(dyn Fn(&str) -> bool + Sync),
) -> Result<Observed, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut states = Vec::new();
    let mut gitops_managed = Vec::new();
    let mut writers = BTreeMap::new();
    let mut immutable = Vec::new();
    let mut conflicts = Vec::new();
    let own = secrets::field_manager(&obj.name_any());
    let mut written_at = Some(Timestamp::UNIX_EPOCH);
    for t in &obj.spec.secrets {
        let s = get_secret(&api, &t.name).await?;
        let last = s.as_ref().and_then(|s| secrets::last_write(&secrets::owned_keys(t), s));
        written_at = written_at.zip(last).map(|(a, b)| a.max(b));
        if let Some(tool) = s.as_ref().and_then(secrets::gitops_tool) {
            gitops_managed.push((t.name.clone(), tool));
        }
        if let Some(s) = &s {
            writers.insert(t.name.clone(), secrets::writers(t, s, &own));
            if secrets::immutable(s) {
                immutable.push(t.name.clone());
            }
            conflicts.extend(secrets::conflict(t, s, &own, live));
        }
        states.push((t.name.clone(), secrets::held(t, s.as_ref())));
    }
    let name = obj.name_any();
    let staging = get_secret(&api, &secrets::staging_name(&name)).await?;
    let staging_key = match secrets::held(&secrets::staging_target(&name), staging.as_ref()) {
        SecretState::Holds(id) => Some(id),
        _ => None,
    };
    Ok(Observed {
        now,
        requests: requests(obj),
        secrets: states,
        staging_key,
        iam: None,
        workloads: None,
        other_resource: None,
        resources: None,
        gitops_managed,
        immutable,
        conflicts,
        writers,
        written_at,
    })
}

/// The user's tags and keys (and the retiring key's last use when the spec asks for it), plus
/// whether an older resource among `resources` (see `Context::owner_candidates`: a read at
/// least as fresh as this resource) names the same user.
pub async fn iam<I: Iam>(
    resources: &[std::sync::Arc<crate::cache::Cached>],
    cluster: &str,
    iam: &I,
    operator_user: Option<String>,
    obj: &IamKeyRotation,
    status: &IamKeyRotationStatus,
    want_last_used: bool,
) -> Result<(IamState, Option<String>), Error> {
    let user = &obj.spec.user_name;
    let state = match iam.user_tags(user).await? {
        None => IamState { user_exists: false, operator_user, ..Default::default() },
        Some(tags) => {
            let keys = iam.list_keys(user).await?;
            let retiring_last_used = match (&status.retiring_key, want_last_used) {
                (Some(r), true) => Some(iam.last_used(&r.access_key_id).await?),
                _ => None,
            };
            IamState { user_exists: true, keys, tags, retiring_last_used, operator_user }
        }
    };
    let me = (obj.creation_timestamp().map(|t| t.0), obj.namespace().unwrap_or_default(), obj.name_any());
    // Only a resource that can rotate the user holds it: one the user consents to, with a valid
    // spec. Otherwise a tenant could hold another namespace's rotations in Conflict.
    let consents =
        |ns: &str| state.tags.get(&format!("rekey.dev/allow/{ns}")).is_some_and(|v| v == cluster || v == "*");
    let older = resources
        .iter()
        .filter(|o| o.spec.user_name.eq_ignore_ascii_case(user) && o.meta().deletion_timestamp.is_none())
        .filter(|o| !o.status.as_ref().is_some_and(|s| s.conditions.invalid_spec))
        .filter(|o| consents(&o.namespace().unwrap_or_default()))
        .map(|o| (o.creation_timestamp().map(|t| t.0), o.namespace().unwrap_or_default(), o.name_any()))
        .filter(|other| *other < me)
        .min()
        .map(|(_, ns, name)| format!("{ns}/{name}"));
    Ok((state, older))
}

/// The Secret names of the spec, as a set (for workload discovery).
pub fn secret_names(obj: &IamKeyRotation) -> BTreeSet<String> {
    obj.spec.secrets.iter().map(|s| s.name.clone()).collect()
}
