//! PURE: when an emergency switches its leaked key off, and what a leak report on a rotation's new
//! key does instead of an emergency (docs/design.md, "Emergencies").
//!
//! A leaked key is switched off the moment the workloads run on the new key (their new pods Ready,
//! no pod of the old template left) and no later than spec.emergency.maxWait after the handover,
//! so that no pod loses access while its workload can be rolled; spec.emergency.switchOff:
//! Immediately trades that for the shortest exposure.

use k8s_openapi::jiff::Timestamp;

use super::{DegradeReason, until, wait};
use super::{Input, POLL, Step, add, emergency_requested, few, incomplete, names_key, phase_since, retire_requested};
use crate::api::SwitchOff;

/// The emergency's switch-off of the leaked `key`, still Active, with the Secrets holding the new
/// key: Deactivate, or a wait (the condition says until when at the latest).
pub(super) fn switch_off(i: &Input, key: &str) -> Step {
    let deactivate = Step::Deactivate { key_id: key.to_owned() };
    if i.valid.switch_off == SwitchOff::Immediately {
        return deactivate;
    }
    let Some(w) = &i.observed.workloads else { return Step::NeedWorkloads };
    let now = i.observed.now;
    let by = deadline(i);
    if now >= by {
        return deactivate;
    }
    let requeue = until(now, by).min(POLL);
    let waiting = incomplete(w);
    if !waiting.is_empty() {
        return wait(
            Some(requeue),
            format!(
                "the leaked key {key} is switched off once {} rolled out, at {by} at the latest (spec.emergency.maxWait {})",
                waiting.join("; "),
                i.spec.emergency.max_wait
            ),
        );
    }
    // Pods rekey cannot restart are given the same bound: a person can restart them onto the new
    // key meanwhile, or let the key go at once (rekey.dev/retire). At the bound they lose access.
    if retire_requested(i) || (w.uncovered.is_empty() && w.jobs.is_empty()) {
        return deactivate;
    }
    let all: Vec<String> = w.uncovered.iter().chain(&w.jobs).cloned().collect();
    Step::Degrade {
        reason: DegradeReason::UncoveredConsumers,
        message: format!(
            "{} read the Secrets but no Deployment, StatefulSet or DaemonSet rekey restarts controls them: the leaked key {key} is switched off at {by} regardless; restart or delete them before then (they start on the new key), or set annotation rekey.dev/retire to a new value to switch it off now",
            few(&all)
        ),
        requeue,
    }
}

/// The latest instant the leaked key stays Active: maxWait after it is first waited on.
pub(super) fn deadline(i: &Input) -> Timestamp {
    let r = i.status.rotation.as_ref();
    let since = r.and_then(|r| r.emergency_since.as_ref().or(r.handed_over_at.as_ref())).map(|t| t.0);
    add(since.unwrap_or_else(|| phase_since(i)), i.valid.emergency_max_wait)
}

/// The pending leak report names this rotation's new key (its `newKey`, or once handed over its
/// active key while the old one is retiring). The healthy old key is then not treated as leaked:
/// the rotation goes on through the rollout and the census, and the report, left pending, rotates
/// the leaked key as soon as it ends. (One in no Secret yet is deleted instead:
/// `leaked_before_handover`.)
pub(super) fn new_key_reported<'a>(i: &'a Input<'a>) -> Option<&'a str> {
    let st = i.status;
    let request = i.observed.requests.emergency.as_deref().filter(|_| emergency_requested(i))?;
    let handed_over = st.retiring_key.as_ref().and(st.active_key.as_ref()).map(|k| k.access_key_id.as_str());
    let new = st.new_key.as_ref().map(|k| k.access_key_id.as_str());
    (names_key(request, handed_over) || names_key(request, new)).then_some(request)
}

/// What a step reports while a report on the new key waits for the rotation to end.
pub(super) fn with_report_pending(i: &Input, step: Step) -> Step {
    let Some(request) = new_key_reported(i) else { return step };
    let note = |m: String| {
        format!(
            "{m}; the new key was reported leaked ({request}): it is rotated as soon as this rotation has retired the old key"
        )
    };
    match step {
        Step::Wait { requeue, why } => Step::Wait { requeue, why: note(why) },
        Step::Stall { reason, message } => Step::Stall { reason, message: note(message) },
        Step::Degrade { reason, message, requeue } => Step::Degrade { reason, message: note(message), requeue },
        other => other,
    }
}

/// An emergency's attempt given up: the leaked key is still Active, and the request is never used
/// up by failures (`act::start::abandon`); the condition says so.
pub(super) fn with_retry_promised(i: &Input, step: Step) -> Step {
    let st = i.status;
    match step {
        Step::Abandon { delete_key, reason, message } if st.emergency() => {
            let leaked = st.active_key.as_ref().map_or("?", |k| k.access_key_id.as_str());
            let message = format!(
                "{message}; the leaked key {leaked} is still Active: the EMERGENCY rotation ({}) is tried again after the backoff, until it succeeds",
                st.last_emergency_request.as_deref().unwrap_or("requested")
            );
            Step::Abandon { delete_key, reason, message }
        }
        other => other,
    }
}
