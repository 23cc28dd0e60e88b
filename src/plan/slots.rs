//! PURE: who may start a rotation under --max-concurrent-rotations, and who holds a slot.
//!
//! The limit smooths load (a backlog of due keys must not restart every workload of the cluster at
//! once). It must not let rotations that wait on a person or another party, nor one busy
//! namespace, keep other tenants from their keys: a rotation holds a slot only while rekey makes
//! progress on it; first keys and explicit requests count only their own namespace's rotations;
//! and while other namespaces wait, a namespace that holds its share of the slots waits too.

use std::str::FromStr as _;

use crate::api::{Phase, Trigger};
use crate::plan::DegradeReason;

/// What the operator's caches say about the rotation slots, for one resource deciding whether to
/// start a rotation (the resource itself is never counted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RotationSlots {
    /// --max-concurrent-rotations (0: no limit).
    pub max: usize,
    /// Other resources holding a slot, cluster-wide (as far as this operator watches)...
    pub held: usize,
    /// ...and in this resource's namespace.
    pub held_here: usize,
    /// Other namespaces whose rotations hold a slot or waited for one lately.
    pub contending: usize,
    /// Whether a rotation of another namespace waited for a slot lately.
    pub others_waiting: bool,
}

/// Why a rotation may not start yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot is held.
    Full,
    /// Every slot is held by this namespace's own rotations (first keys and requests count only
    /// those).
    FullHere,
    /// This namespace holds its share of the slots (the number) while other namespaces wait.
    Share(usize),
}

/// Whether a rotation started by `trigger` waits for a slot. A leaked key never waits; a first key
/// or a person's request is never held back by other namespaces (the runbooks' way out must not
/// depend on other tenants); a scheduled rotation waits for a free slot and, while other
/// namespaces wait for one, for its namespace to be below its share (the limit divided among the
/// contending namespaces, at least 1), so freed slots go to those below theirs first.
pub fn refusal(s: &RotationSlots, trigger: Trigger) -> Option<Refusal> {
    if s.max == 0 {
        return None;
    }
    match trigger {
        Trigger::Emergency => None,
        Trigger::Bootstrap | Trigger::Requested => (s.held_here >= s.max).then_some(Refusal::FullHere),
        Trigger::Scheduled if s.held >= s.max => Some(Refusal::Full),
        Trigger::Scheduled => {
            let share = (s.max / (s.contending + 1)).max(1);
            (s.others_waiting && s.held_here >= share).then_some(Refusal::Share(share))
        }
    }
}

/// The message while a rotation waits for a slot.
pub fn waiting_message(s: &RotationSlots, why: Refusal, namespace: &str) -> String {
    let max = s.max;
    match why {
        Refusal::Full => format!(
            "waiting for a rotation slot (at most {max} rotations at once; held by {} in namespace {namespace} and {} in other namespaces; rotations that wait on a person or another party hold none)",
            s.held_here,
            s.held.saturating_sub(s.held_here)
        ),
        Refusal::FullHere => format!(
            "waiting for a rotation slot (at most {max} rotations at once, all held by rotations of namespace {namespace})"
        ),
        Refusal::Share(share) => format!(
            "waiting for a rotation slot (at most {max} rotations at once; namespace {namespace} holds {}, its share while other namespaces wait for one, {share})",
            s.held_here
        ),
    }
}

/// Degraded reasons of a rotation that waits on a person or another party: consumers rekey does
/// not restart, a rollout that does not complete (paused, or pods that do not become Ready), a
/// rollback parked for a person, another owner, a foreign key in the way, IAM refusing the calls.
fn waits_on_others(reason: &str) -> bool {
    match DegradeReason::from_str(reason) {
        Ok(r) => matches!(
            r,
            DegradeReason::UncoveredConsumers
                | DegradeReason::RolloutStalled
                | DegradeReason::RolledBack
                | DegradeReason::Conflict
                | DegradeReason::KeyQuotaExhausted
        ),
        // A failed step's category: only a refusal waits on a person (throttling, 5xx and lost
        // connections are rekey's to retry, and an outage must not admit every due rotation).
        Err(_) => reason == "IamAccessDenied",
    }
}

/// Whether a rotation's conditions (Stalled's and Degraded's reason while True) say it waits on
/// something outside rekey's control: then it holds no rotation slot and no rollout slot, however
/// long it waits. It takes one again, past the limit if need be, when it goes on (it is mid-way,
/// and finishing it retires a key).
pub fn waits_outside(stalled: Option<&str>, degraded: Option<&str>) -> bool {
    stalled.is_some() || degraded.is_some_and(waits_on_others)
}

/// `waits_outside` from conditions given as (type, status, reason).
pub fn waits_outside_by<'a>(conditions: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>) -> bool {
    let (mut stalled, mut degraded) = (None, None);
    for (type_, status, reason) in conditions {
        match (type_, status) {
            ("Stalled", "True") => stalled = Some(reason),
            ("Degraded", "True") => degraded = Some(reason),
            _ => {}
        }
    }
    waits_outside(stalled, degraded)
}

/// Whether a resource in `phase` holds a rotation slot.
pub fn holds_slot(phase: Phase, waits_outside: bool) -> bool {
    phase != Phase::Idle && !waits_outside
}
