//! What rekey keeps of each IamKeyRotation between reconciles.
//!
//! Every decision reads the resource afresh from the apiserver (DESIGN rule 4), so the watch cache
//! only has to answer three questions: which resources exist (and who they name, for the one-owner
//! check), which are mid-rotation (--max-concurrent-rotations) and how often each failed (the retry
//! backoff). managedFields, conditions, history and annotations are most of an object's memory and
//! answer none of them: at 10,000 resources they were most of the operator's memory.

use crate::api::{IamKeyRotation, IamKeyRotationStatus};

/// Drops what the cache does not need, in place (applied to every object the watch delivers).
/// Whoever reads a cached object for anything but the three questions above must read the
/// resource from the apiserver instead: this is why reconcile starts with a GET.
pub fn slim(obj: &mut IamKeyRotation) {
    let m = &mut obj.metadata;
    m.managed_fields = None;
    m.annotations = None;
    m.labels = None;
    if let Some(st) = obj.status.take() {
        obj.status =
            Some(IamKeyRotationStatus { phase: st.phase, failed_attempts: st.failed_attempts, ..Default::default() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Phase;

    fn full() -> IamKeyRotation {
        serde_json::from_value(serde_json::json!({
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
            "spec": {"userName": "billing", "secrets": [{"name": "creds"}]},
            "status": {"phase": "RollingOut", "failedAttempts": 2, "rotations": 7,
                       "activeKey": {"accessKeyId": "AKIA1"},
                       "conditions": [{"type": "Ready", "status": "True", "reason": "KeyInPlace", "message": "m",
                                       "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap()
    }

    #[test]
    fn keeps_what_the_owner_check_the_rotation_limit_and_the_backoff_read() {
        let mut o = full();
        slim(&mut o);
        let m = &o.metadata;
        assert_eq!(
            (m.name.as_deref(), m.namespace.as_deref(), m.uid.as_deref()),
            (Some("app"), Some("team-a"), Some("u1"))
        );
        assert_eq!((m.generation, m.resource_version.as_deref()), (Some(3), Some("42")));
        assert!(m.creation_timestamp.is_some() && m.deletion_timestamp.is_some());
        assert_eq!(m.finalizers.as_deref(), Some(&["rekey.dev/cleanup".to_owned()][..]));
        assert_eq!(o.spec.user_name, "billing");
        let st = o.status.as_ref().unwrap();
        assert_eq!((st.phase, st.failed_attempts), (Phase::RollingOut, 2));
    }

    #[test]
    fn drops_the_rest() {
        let mut o = full();
        slim(&mut o);
        assert!(o.metadata.managed_fields.is_none() && o.metadata.annotations.is_none() && o.metadata.labels.is_none());
        let st = o.status.as_ref().unwrap();
        assert!(st.conditions.is_empty() && st.active_key.is_none() && st.rotations == 0);
        let mut none = full();
        none.status = None;
        slim(&mut none);
        assert!(none.status.is_none());
    }
}
