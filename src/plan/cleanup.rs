//! PURE: what deleting an IamKeyRotation does, by its `deletionPolicy`, decided from fresh reads.
//!
//! Deletion never waits for IAM: whatever could not be read is reported and left behind, and the
//! finalizer lets go (a namespace being deleted must not hang on an unreachable AWS).

use std::collections::{BTreeMap, BTreeSet};

use crate::api::{DeletionPolicy, IamKeyRotationStatus};
use crate::ownership::{claims, is_own_claim};
use crate::plan::not_an_orphan;
use crate::plan::snapshot::IamKey;

/// What the cleanup read.
pub struct CleanupInput<'a> {
    pub policy: DeletionPolicy,
    pub status: &'a IamKeyRotationStatus,
    /// This resource's owner string (cluster/namespace/name).
    pub owner: &'a str,
    /// The key ids the target Secrets hold; None when they could not be read.
    pub held: Option<BTreeSet<String>>,
    /// The user's keys and tags; None when IAM could not be read.
    pub iam: Option<(Vec<IamKey>, BTreeMap<String, String>)>,
}

/// What the cleanup does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupPlan {
    /// Keys to delete (each with its claim tag).
    pub delete_keys: Vec<String>,
    /// Claims to remove from keys that stay (Retain): the key is nobody's once this resource is gone,
    /// so a resource re-created under another name (a rename in Git) can adopt it.
    pub release_claims: Vec<String>,
    /// Remove the data rekey wrote from the target Secrets.
    pub clear_targets: bool,
    /// What is left behind and why, for the Event.
    pub kept: Vec<String>,
}

/// Retain keeps every key a Secret may hold; the keys of an unfinished rotation that no target
/// Secret holds (the new key, or the orphan of an interrupted create) are deleted under any policy,
/// since nobody can have them. Delete also deletes every key this resource claims, and its data.
pub fn cleanup(c: &CleanupInput) -> CleanupPlan {
    let mut plan = CleanupPlan { clear_targets: c.policy == DeletionPolicy::Delete, ..Default::default() };
    let Some((keys, tags)) = &c.iam else {
        plan.kept.push("IAM could not be read, so no key was deleted".into());
        return plan;
    };
    let exists = |id: &str| keys.iter().any(|k| k.id == id);
    let mut delete: BTreeSet<String> = BTreeSet::new();
    match &c.held {
        None => plan.kept.push("the target Secrets could not be read, so a new key was kept".into()),
        Some(held) => delete.extend(unhanded(c, keys, tags, held)),
    }
    let own: Vec<String> = claims(tags).into_iter().filter(|(_, o)| is_own_claim(o, c.owner)).map(|(k, _)| k).collect();
    if c.policy == DeletionPolicy::Delete {
        delete.extend(own.iter().cloned());
        // An emergency claims its new key only at the deletion of the leaked one (rule 7): until
        // then the key in use is this resource's by its status alone, unless another owner claims it.
        let unclaimed = |id: &String| claims(tags).get(id).is_none_or(|o| is_own_claim(o, c.owner));
        if c.status.emergency() {
            delete.extend(c.status.active_key.iter().map(|k| k.access_key_id.clone()).filter(unclaimed));
        }
    }
    plan.delete_keys = delete.iter().filter(|k| exists(k)).cloned().collect();
    plan.release_claims = own.into_iter().filter(|k| !delete.contains(k)).collect();
    plan
}

/// The keys of the rotation in flight that nobody has: status.newKey when no target Secret holds
/// it, and, while the write-ahead marker stands, a key that appeared since and is provably rekey's.
fn unhanded(
    c: &CleanupInput,
    keys: &[IamKey],
    tags: &BTreeMap<String, String>,
    held: &BTreeSet<String>,
) -> Vec<String> {
    let mut out: Vec<String> =
        c.status.new_key.iter().map(|k| k.access_key_id.clone()).filter(|k| !held.contains(k)).collect();
    // Only an attempt that may be in flight can have left an orphan.
    if let Some(pending) = c.status.pending.as_ref().filter(|p| p.in_flight) {
        let known: BTreeSet<&str> = pending.known_key_ids.iter().map(String::as_str).collect();
        out.extend(
            keys.iter()
                .filter(|k| !known.contains(k.id.as_str()))
                .filter(|k| not_an_orphan(k, pending, held, tags, c.owner).is_none())
                .map(|k| k.id.clone()),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::api::{KeyRef, Pending, RotationProgress, Trigger};
    use crate::ownership::claim_value;

    const OWNER: &str = "prod/payments/billing";

    fn now() -> Timestamp {
        "2026-06-01T12:00:00Z".parse().unwrap()
    }

    fn key(id: &str) -> IamKey {
        IamKey { id: id.into(), active: true, created: now() }
    }

    fn input<'a>(
        policy: DeletionPolicy,
        st: &'a IamKeyRotationStatus,
        held: &[&str],
        keys: &[&str],
    ) -> CleanupInput<'a> {
        let tags: BTreeMap<String, String> = keys.iter().map(|k| (k.to_string(), claim_value(OWNER))).collect();
        CleanupInput {
            policy,
            status: st,
            owner: OWNER,
            held: Some(held.iter().map(|s| s.to_string()).collect()),
            iam: Some((keys.iter().map(|k| key(k)).collect(), tags)),
        }
    }

    #[test]
    fn retain_keeps_keys_in_use_and_deletes_an_unhanded_new_key() {
        let st = IamKeyRotationStatus {
            active_key: Some(KeyRef { access_key_id: "OLD".into(), created_at: None }),
            new_key: Some(KeyRef { access_key_id: "NEW".into(), created_at: None }),
            ..Default::default()
        };
        let p = cleanup(&input(DeletionPolicy::Retain, &st, &["OLD"], &["OLD", "NEW"]));
        assert_eq!(p.delete_keys, vec!["NEW"]);
        assert!(!p.clear_targets);
        // The key that stays is nobody's now: a resource re-created under another name adopts it.
        assert_eq!(p.release_claims, vec!["OLD"]);
        // Once a Secret holds it, somebody may use it: kept.
        let p = cleanup(&input(DeletionPolicy::Retain, &st, &["NEW"], &["OLD", "NEW"]));
        assert!(p.delete_keys.is_empty());
    }

    #[test]
    fn delete_mid_emergency_deletes_the_new_key_its_claim_waits_for() {
        let mut st = IamKeyRotationStatus {
            active_key: Some(KeyRef { access_key_id: "NEW".into(), created_at: None }),
            rotation: Some(RotationProgress::start(Trigger::Emergency, now())),
            ..Default::default()
        };
        let mut i = input(DeletionPolicy::Delete, &st, &["NEW"], &["LEAKED"]);
        if let Some((keys, _)) = i.iam.as_mut() {
            keys.push(key("NEW"));
        }
        assert_eq!(cleanup(&i).delete_keys, vec!["LEAKED", "NEW"]);
        // Retain keeps it; a routine rotation's unclaimed key in use is not this resource's to delete.
        i.policy = DeletionPolicy::Retain;
        assert!(cleanup(&i).delete_keys.is_empty());
        let iam = i.iam.clone();
        st.rotation = Some(RotationProgress::start(Trigger::Scheduled, now()));
        let mut i = input(DeletionPolicy::Delete, &st, &["NEW"], &["LEAKED"]);
        i.iam = iam;
        assert_eq!(cleanup(&i).delete_keys, vec!["LEAKED"]);
    }

    #[test]
    fn delete_deletes_every_claimed_key_and_clears_the_data() {
        let st = IamKeyRotationStatus::default();
        let p = cleanup(&input(DeletionPolicy::Delete, &st, &["A"], &["A", "B"]));
        assert_eq!(p.delete_keys, vec!["A", "B"]);
        assert!(p.clear_targets);
        assert!(p.release_claims.is_empty());
    }

    #[test]
    fn deleted_mid_create_the_orphan_of_the_interrupted_create_is_deleted() {
        let st =
            IamKeyRotationStatus { pending: Some(Pending::attempt(now(), vec!["OLD".into()])), ..Default::default() };
        let p = cleanup(&input(DeletionPolicy::Retain, &st, &["OLD"], &["OLD", "ORPHAN"]));
        assert_eq!(p.delete_keys, vec!["ORPHAN"]);
    }

    #[test]
    fn unreadable_secrets_or_iam_keep_every_key() {
        let st = IamKeyRotationStatus {
            new_key: Some(KeyRef { access_key_id: "NEW".into(), created_at: None }),
            ..Default::default()
        };
        let mut i = input(DeletionPolicy::Retain, &st, &[], &["NEW"]);
        i.held = None;
        let p = cleanup(&i);
        assert!(p.delete_keys.is_empty());
        assert_eq!(p.kept.len(), 1);
        i.iam = None;
        assert!(cleanup(&i).delete_keys.is_empty());
    }
}
