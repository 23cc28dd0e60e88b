//! PURE: the restart stamp's value. `rekey.dev/access-key-id` on a pod template lists the keys its
//! pods start with, comma-separated and sorted: the restarting resource's key, and those of other
//! resources of the namespace whose Secrets already hold their new key (phase RollingOut) or that
//! the stamp listed before. Sorted, so that two resources stamping at once write the same value
//! (the second write changes nothing, and restarts nothing). A workload that reads the Secrets of several resources is then
//! restarted once for rotations that hand over together, and a later stamp never takes away a key
//! an earlier rotation still waits to see on the pods.

use std::collections::BTreeSet;

/// Whether a stamp (of a template or a pod) says its pods start with `key`.
pub fn carries(stamp: Option<&str>, key: &str) -> bool {
    stamp.is_some_and(|s| s.split(',').any(|k| k == key))
}

/// Another resource of the namespace, as the stamp sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    /// Its status.activeKey.
    pub active_key: String,
    /// In phase RollingOut: its Secrets hold `active_key`, so pods started now read it.
    pub rolling_out: bool,
}

/// The stamp that restarts a workload onto `key`, from the template's `current` stamp. Keys of
/// resources no longer in the namespace, or rotated since, drop out (the list stays short).
pub fn merged(key: &str, current: Option<&str>, neighbours: &[Neighbour]) -> String {
    let keys: BTreeSet<&str> = neighbours
        .iter()
        .filter(|n| n.rolling_out || carries(current, &n.active_key))
        .map(|n| n.active_key.as_str())
        .chain(std::iter::once(key))
        .collect();
    keys.into_iter().collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(key: &str, rolling_out: bool) -> Neighbour {
        Neighbour { active_key: key.into(), rolling_out }
    }

    #[test]
    fn a_stamp_carries_each_listed_key() {
        assert!(carries(Some("AKIA1"), "AKIA1"));
        assert!(carries(Some("AKIA1,AKIA2"), "AKIA2"));
        assert!(!carries(Some("AKIA12"), "AKIA1"));
        assert!(!carries(None, "AKIA1"));
    }

    #[test]
    fn a_stamp_keeps_what_neighbours_need_and_drops_the_rest() {
        // Alone in its namespace: the key alone, as before.
        assert_eq!(merged("AKIAA2", Some("AKIAA1"), &[]), "AKIAA2");
        // B hands over at the same time: one restart carries both keys.
        assert_eq!(merged("AKIAA2", Some("AKIAA1,AKIAB1"), &[n("AKIAB2", true)]), "AKIAA2,AKIAB2");
        // B's key is on the pods already: kept. B's previous key, and a deleted resource's: dropped.
        assert_eq!(merged("AKIAA2", Some("AKIAB1,AKIAC1,AKIAA1"), &[n("AKIAB1", false)]), "AKIAA2,AKIAB1");
        // Either resource stamping writes the same value.
        assert_eq!(merged("AKIAB2", None, &[n("AKIAA2", true)]), merged("AKIAA2", None, &[n("AKIAB2", true)]));
        // Idle and not on the pods: B restarts it itself when it rotates.
        assert_eq!(merged("AKIAA2", None, &[n("AKIAB1", false), n("AKIAA2", true)]), "AKIAA2");
    }
}
