//! Who owns what, in IAM's terms. PURE.
//!
//! A resource is `<cluster>/<namespace>/<name>`; the keys it created carry that owner in a tag on
//! the IAM user (key: the access key id, value: `rekey:<owner>`), and the user consents to a
//! namespace with the tag `rekey.dev/allow/<namespace>`. Names cut to fit a limit keep a short
//! hash, so two long names stay distinct.

use std::collections::BTreeMap;

/// Who this resource is: the owner string of rule 7, and the consent it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
}

impl Identity {
    pub fn owner(&self) -> String {
        format!("{}/{}/{}", self.cluster, self.namespace, self.name)
    }
    pub fn consent_tag(&self) -> String {
        format!("rekey.dev/allow/{}", self.namespace)
    }
}

/// Owner claims on the user's keys: access key id -> owner, from the description tags.
pub fn claims(tags: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    tags.iter().filter_map(|(k, v)| v.strip_prefix("rekey:").map(|owner| (k.clone(), owner.to_owned()))).collect()
}

/// The description-tag value for an owner, cut to IAM's 256 characters with a short hash.
pub fn claim_value(owner: &str) -> String {
    let full = format!("rekey:{owner}");
    if full.len() <= 256 {
        return full;
    }
    let hash = fnv1a(owner.as_bytes());
    let mut cut = 256 - 9;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{hash:08x}", &full[..cut])
}

/// Whether a claim value (as read back from IAM) is this owner's.
pub fn is_own_claim(value_owner: &str, owner: &str) -> bool {
    let ours = claim_value(owner);
    ours.strip_prefix("rekey:") == Some(value_owner)
}

/// Whether a claim names a resource of `cluster` that no longer exists (deleted with
/// deletionPolicy Retain before claims were released, renamed in Git): `read` tells whether every
/// resource of a namespace was read, `exists` whether `namespace/name` is among them. Claims of
/// other clusters, and cut (hashed) ones, always count.
pub fn is_stale(claimed_by: &str, cluster: &str, read: impl Fn(&str) -> bool, exists: impl Fn(&str) -> bool) -> bool {
    let Some(rest) = claimed_by.strip_prefix(cluster).and_then(|r| r.strip_prefix('/')) else { return false };
    let ns = rest.split('/').next().unwrap_or_default();
    read(ns) && !claimed_by.contains('~') && !exists(rest)
}

/// 32-bit FNV-1a: a stable short hash for names cut to fit a limit.
pub fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

/// Whether `role` matches one of the operator's allow-list patterns (`*` matches any run of
/// characters): which AWS accounts and roles a namespace may make rekey act in.
pub fn role_allowed(patterns: &[String], role: &str) -> bool {
    patterns.iter().any(|p| glob(p.as_bytes(), role.as_bytes()))
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_owners_are_cut_to_iams_limit_and_stay_distinct() {
        let a = format!("c/ns/{}", "x".repeat(300));
        let b = format!("c/ns/{}y", "x".repeat(299));
        assert!(claim_value(&a).len() <= 256);
        assert_ne!(claim_value(&a), claim_value(&b));
        let tags = BTreeMap::from([("AKIA1".to_owned(), claim_value(&a)), ("other".to_owned(), "x".to_owned())]);
        let c = claims(&tags);
        assert_eq!(c.len(), 1);
        assert!(is_own_claim(&c["AKIA1"], &a));
        assert!(!is_own_claim(&c["AKIA1"], &b));
    }
    #[test]
    fn role_allow_list_patterns() {
        let allow = vec!["arn:aws:iam::111122223333:role/rekey/*".to_owned()];
        assert!(role_allowed(&allow, "arn:aws:iam::111122223333:role/rekey/payments"));
        assert!(!role_allowed(&allow, "arn:aws:iam::111122223333:role/admin"));
        assert!(!role_allowed(&allow, "arn:aws:iam::999999999999:role/rekey/payments"));
        assert!(!role_allowed(&[], "arn:aws:iam::111122223333:role/rekey/payments"));
        assert!(role_allowed(&["*".to_owned()], "anything"));
    }
}
