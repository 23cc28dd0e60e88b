//! What rekey keeps of each IamKeyRotation between reconciles.
//!
//! Every decision reads the resource afresh from the apiserver (docs/design.md, rule 4), so the watch cache
//! only has to answer three questions: which resources exist and whom they name (the one-owner
//! check, which counts only resources whose spec is valid), which are mid-rotation and making
//! progress (--max-concurrent-rotations, --max-concurrent-rollouts) and how often each failed (the retry backoff). The controller therefore watches IamKeyRotations as [`Cached`], which deserializes
//! only that: managedFields, conditions, history and annotations were most of the operator's
//! memory at 10,000 resources and answer none of the three.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::Resource;
use serde::{Deserialize, Serialize};

use crate::api::{IamKeyRotation, Phase};

/// An IamKeyRotation as the watch cache holds it. Anything else about the resource is read from
/// the apiserver, which is why reconcile starts with a GET.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Cached {
    #[serde(deserialize_with = "identity_only")]
    pub metadata: ObjectMeta,
    pub spec: CachedSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<CachedStatus>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedSpec {
    #[serde(default)]
    pub user_name: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedStatus {
    #[serde(default)]
    pub phase: Phase,
    #[serde(default)]
    pub failed_attempts: u32,
    /// What the conditions say, as far as the cache needs it.
    #[serde(rename = "conditions", default, deserialize_with = "condition_flags", skip_serializing)]
    pub conditions: ConditionFlags,
}

/// What the cache keeps of the conditions (the conditions themselves are not kept).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConditionFlags {
    /// Stalled with reason InvalidSpec: such a resource rotates nothing, so it owns no user.
    pub invalid_spec: bool,
    /// Its rotation waits on something outside rekey's control (`plan::slots::waits_outside`): it
    /// holds no rotation or rollout slot.
    pub waits_outside: bool,
}

fn condition_flags<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ConditionFlags, D::Error> {
    #[derive(Deserialize)]
    struct Cond {
        #[serde(rename = "type")]
        type_: String,
        status: String,
        #[serde(default)]
        reason: String,
    }
    let conds = Vec::<Cond>::deserialize(d)?;
    let triples = || conds.iter().map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()));
    Ok(ConditionFlags {
        invalid_spec: triples().any(|c| c == ("Stalled", "True", "InvalidSpec")),
        waits_outside: crate::plan::slots::waits_outside_by(triples()),
    })
}

/// The same API resource as [`IamKeyRotation`] (group, version, kind, plural, namespaced).
impl Resource for Cached {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        IamKeyRotation::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        IamKeyRotation::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        IamKeyRotation::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        IamKeyRotation::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The metadata the cache needs: identity, generation, lifecycle and finalizers. The rest
/// (managedFields above all) is skipped while parsing.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeptMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    generation: Option<i64>,
    creation_timestamp: Option<Time>,
    deletion_timestamp: Option<Time>,
    finalizers: Option<Vec<String>>,
}

fn identity_only<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = KeptMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        generation: m.generation,
        creation_timestamp: m.creation_timestamp,
        deletion_timestamp: m.deletion_timestamp,
        finalizers: m.finalizers,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt as _;

    fn full() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "rekey.dev/v1alpha1", "kind": "IamKeyRotation",
            "metadata": {
                "name": "app", "namespace": "team-a", "uid": "u1", "generation": 3, "resourceVersion": "42",
                "creationTimestamp": "2026-01-01T00:00:00Z", "deletionTimestamp": "2026-02-01T00:00:00Z",
                "finalizers": ["rekey.dev/cleanup"],
                "annotations": {"rekey.dev/rotate": "1", "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "labels": {"team": "a"},
                "managedFields": [{"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1",
                                   "fieldsV1": {"f:spec": {"f:userName": {}}}}]
            },
            "spec": {"userName": "billing", "secrets": [{"name": "creds"}], "maxKeyAge": "30d"},
            "status": {"phase": "RollingOut", "failedAttempts": 2, "rotations": 7,
                       "activeKey": {"accessKeyId": "AKIA1"},
                       "conditions": [{"type": "Ready", "status": "True", "reason": "KeyInPlace", "message": "m",
                                       "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        })
    }

    #[test]
    fn is_the_same_api_resource_as_the_full_type() {
        assert_eq!(Cached::url_path(&(), Some("ns")), IamKeyRotation::url_path(&(), Some("ns")));
        assert_eq!(Cached::kind(&()), "IamKeyRotation");
        assert_eq!(Cached::api_version(&()), IamKeyRotation::api_version(&()));
    }

    #[test]
    fn keeps_what_the_owner_check_the_rotation_limit_and_the_backoff_read() {
        let o: Cached = serde_json::from_value(full()).unwrap();
        assert_eq!((o.name_any(), o.namespace(), o.uid()), ("app".into(), Some("team-a".into()), Some("u1".into())));
        let m = &o.metadata;
        assert_eq!((m.generation, m.resource_version.as_deref()), (Some(3), Some("42")));
        assert!(m.creation_timestamp.is_some() && m.deletion_timestamp.is_some());
        assert_eq!(o.finalizers(), ["rekey.dev/cleanup".to_owned()]);
        assert_eq!(o.spec.user_name, "billing");
        let st = o.status.as_ref().unwrap();
        assert_eq!((st.phase, st.failed_attempts, st.conditions), (Phase::RollingOut, 2, ConditionFlags::default()));
        let mut invalid = full();
        invalid["status"]["conditions"] = serde_json::json!([{"type": "Stalled", "status": "True", "reason": "InvalidSpec",
            "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"}]);
        let o: Cached = serde_json::from_value(invalid).unwrap();
        assert_eq!(o.status.unwrap().conditions, ConditionFlags { invalid_spec: true, waits_outside: true });
        let mut uncovered = full();
        uncovered["status"]["conditions"] = serde_json::json!([{"type": "Degraded", "status": "True",
            "reason": "UncoveredConsumers", "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"}]);
        let o: Cached = serde_json::from_value(uncovered).unwrap();
        assert_eq!(o.status.unwrap().conditions, ConditionFlags { invalid_spec: false, waits_outside: true });
    }

    #[test]
    fn drops_the_rest() {
        let o: Cached = serde_json::from_value(full()).unwrap();
        let m = &o.metadata;
        assert!(m.managed_fields.is_none() && m.annotations.is_none() && m.labels.is_none());
        let back = serde_json::to_value(&o).unwrap();
        assert_eq!(back["spec"], serde_json::json!({"userName": "billing"}));
        assert_eq!(back["status"], serde_json::json!({"phase": "RollingOut", "failedAttempts": 2}));
        let mut none = full();
        none.as_object_mut().unwrap().remove("status");
        let o: Cached = serde_json::from_value(none).unwrap();
        assert!(o.status.is_none());
    }
}
