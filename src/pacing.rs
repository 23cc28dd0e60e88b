//! Pacing facts: which resources hold one of the --max-concurrent-rollouts slots, when rekey last
//! restarted workloads in each namespace (--rollout-cooldown), and which resources waited for a
//! --max-concurrent-rotations slot lately (the namespaces' fair shares, `plan::slots`). The plan
//! decides from them (`plan::Gates`); this only remembers.
//!
//! This replica's memory, not status: pacing smooths load and guards nothing. After a restart of
//! the operator, resources still rolling out take their slots again at their next look, and the
//! cooldowns start empty (at worst one restart per namespace comes early).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

#[derive(Debug, Default)]
pub struct Pacing {
    /// "namespace/name" of the resources holding a rollout slot.
    held: Mutex<BTreeSet<String>>,
    /// When rekey last restarted workloads, per namespace.
    restarts: Mutex<BTreeMap<String, Timestamp>>,
    /// "namespace/name" of the resources whose rotation waited for a rotation slot, and when last.
    waiting: Mutex<BTreeMap<String, Timestamp>>,
}

/// A resource waiting for a rotation slot looks again every 15 s: one not seen waiting for this
/// long got a slot, was deleted, or wants none any more.
const WAITING_FOR: SignedDuration = SignedDuration::from_secs(60);

impl Pacing {
    /// Whether `me` ("namespace/name") may restart workloads now: it holds a rollout slot, or takes
    /// a free one while `rolling` (in phase RollingOut). Slots of resources the caches no longer
    /// show rolling out (`rolling_out`) are given back first; a resource that leaves RollingOut gives
    /// its own back. `max` 0: no limit. Two resources deciding at once may overshoot by one, which
    /// load smoothing tolerates (as --max-concurrent-rotations does). Refused: the slots' holders.
    pub fn slot(&self, me: &str, rolling: bool, rolling_out: &BTreeSet<String>, max: usize) -> Result<(), Vec<String>> {
        let Ok(mut held) = self.held.lock() else { return Ok(()) };
        let mine = held.contains(me);
        held.retain(|k| rolling_out.contains(k) && k != me);
        if !rolling {
            return Ok(());
        }
        if mine || max == 0 || held.len() < max {
            held.insert(me.to_owned());
            return Ok(());
        }
        Err(held.iter().cloned().collect())
    }

    /// Whether `me` ("namespace/name") waits for a rotation slot, decided at `now`.
    pub fn waits_for_rotation_slot(&self, me: &str, waits: bool, now: Timestamp) {
        let Ok(mut w) = self.waiting.lock() else { return };
        if waits {
            w.insert(me.to_owned(), now);
        } else {
            w.remove(me);
        }
    }

    /// The namespaces with a resource that waited for a rotation slot lately.
    pub fn waiting_namespaces(&self, now: Timestamp) -> BTreeSet<String> {
        let Ok(mut w) = self.waiting.lock() else { return BTreeSet::new() };
        w.retain(|_, at| at.checked_add(WAITING_FOR).is_ok_and(|until| until > now));
        w.keys().filter_map(|k| k.split_once('/')).map(|(ns, _)| ns.to_owned()).collect()
    }

    /// rekey restarted workloads in namespace `ns` at `at`.
    pub fn restarted(&self, ns: &str, at: Timestamp) {
        if let Ok(mut r) = self.restarts.lock() {
            r.insert(ns.to_owned(), at);
        }
    }

    /// Takes namespace `ns`'s next restart at `now` unless one was taken within `cooldown`: the
    /// plan's cooldown check reads a snapshot, and up to 32 reconciles deciding at once would
    /// otherwise all restart at the same instant.
    pub fn reserve(&self, ns: &str, cooldown: Duration, now: Timestamp) -> bool {
        let Ok(mut r) = self.restarts.lock() else { return true };
        let cooldown = SignedDuration::try_from(cooldown).unwrap_or(SignedDuration::ZERO);
        let taken = r.get(ns).and_then(|last| last.checked_add(cooldown).ok()).is_some_and(|until| until > now);
        if taken && !cooldown.is_zero() {
            return false;
        }
        r.insert(ns.to_owned(), now);
        true
    }

    /// The earliest instant the next restart in `ns` may happen (None: no restart remembered, or
    /// no cooldown).
    pub fn not_before(&self, ns: &str, cooldown: Duration) -> Option<Timestamp> {
        let cooldown = SignedDuration::try_from(cooldown).ok().filter(|c| !c.is_zero())?;
        let last = *self.restarts.lock().ok()?.get(ns)?;
        last.checked_add(cooldown).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn one_restart_per_cooldown_even_when_several_decide_at_once() {
        let p = Pacing::default();
        let t: Timestamp = "2026-11-30T10:00:00Z".parse().unwrap();
        let cd = Duration::from_secs(60);
        assert!(p.reserve("a", cd, t));
        assert!(!p.reserve("a", cd, t), "the second one decided on the same snapshot waits");
        assert!(p.reserve("b", cd, t), "another namespace");
        assert!(p.reserve("a", cd, t.checked_add(SignedDuration::from_secs(60)).unwrap()));
        assert!(p.reserve("a", Duration::ZERO, t) && p.reserve("a", Duration::ZERO, t), "no cooldown");
    }

    #[test]
    fn a_slot_is_held_until_its_resource_stops_rolling_out() {
        let p = Pacing::default();
        assert_eq!(p.slot("a/one", true, &set(&[]), 1), Ok(()), "free: taken");
        assert_eq!(p.slot("a/two", true, &set(&["a/one", "a/two"]), 1), Err(vec!["a/one".to_owned()]), "one's");
        assert_eq!(p.slot("a/one", true, &set(&["a/one", "a/two"]), 1), Ok(()), "one keeps its slot");
        // one moved on (Deactivating): the caches no longer show it rolling out.
        assert!(p.slot("a/two", true, &set(&["a/two"]), 1).is_ok());
        // Not rolling out: never held back, and holds nothing.
        assert!(p.slot("a/three", false, &set(&["a/two"]), 1).is_ok());
        assert!(p.slot("a/four", true, &set(&["a/two", "a/four"]), 1).is_err());
        assert!(p.slot("a/four", true, &set(&["a/two", "a/four"]), 0).is_ok(), "0: no limit");
    }

    #[test]
    fn namespaces_waiting_for_a_rotation_slot_are_remembered_for_a_minute() {
        let p = Pacing::default();
        let t: Timestamp = "2026-11-30T10:00:00Z".parse().unwrap();
        p.waits_for_rotation_slot("a/one", true, t);
        p.waits_for_rotation_slot("a/two", true, t);
        p.waits_for_rotation_slot("b/one", true, t);
        assert_eq!(p.waiting_namespaces(t), set(&["a", "b"]));
        p.waits_for_rotation_slot("b/one", false, t);
        assert_eq!(p.waiting_namespaces(t), set(&["a"]), "b/one got its slot");
        p.waits_for_rotation_slot("a/two", true, t + SignedDuration::from_secs(30));
        assert_eq!(p.waiting_namespaces(t + SignedDuration::from_secs(61)), set(&["a"]), "a/two waits still");
        assert_eq!(p.waiting_namespaces(t + SignedDuration::from_secs(91)), set(&[]), "not seen since");
    }

    #[test]
    fn a_cooldown_counts_from_the_last_restart_in_the_namespace() {
        let p = Pacing::default();
        let at: Timestamp = "2026-06-01T12:00:00Z".parse().unwrap();
        assert_eq!(p.not_before("a", Duration::from_secs(30)), None);
        p.restarted("a", at);
        assert_eq!(p.not_before("a", Duration::from_secs(30)), Some(at + SignedDuration::from_secs(30)));
        assert_eq!(p.not_before("b", Duration::from_secs(30)), None, "per namespace");
        assert_eq!(p.not_before("a", Duration::ZERO), None, "no cooldown");
    }
}
