//! The steps from the new key's handover to the old key's deletion: advance, stamp, deactivate,
//! reactivate, soak, delete, finish; and the report of a withheld step. TOUCHES THE CLUSTER AND IAM.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::{
    DRY_RUN_RECHECK, Env, Note, Outcome, active_id, enter, history, next_rotation, park, require_active, reset_to_idle,
};
use crate::api::{HistoryOutcome, IamKeyRotationStatus, KeyState, Phase, RetiringKey, Trigger, WorkloadRef};
use crate::error::Error;
use crate::iam::Iam;
use crate::plan::{self, Step, Withheld};
use crate::secrets;
use crate::workloads;

/// A step spec.suspend or spec.dryRun holds back: reported once (status.plannedStep, an Event).
pub fn withhold(st: &mut IamKeyRotationStatus, why: Withheld, step: &Step) -> Outcome {
    // A suspended resource is looked at again when its spec changes (the watch) or at the idle
    // resync, not polled: thousands of suspended resources must cost no AWS calls.
    let requeue = match why {
        Withheld::Suspended => None,
        Withheld::DryRun => Some(DRY_RUN_RECHECK),
    };
    let mut out = Outcome { requeue, ..Default::default() };
    if st.planned_step.as_deref() != Some(step.name()) {
        let reason: &'static str = why.into();
        out = out.event(false, reason, format!("{}: next step would be {} ({step:?})", why.describe(), step.name()));
    }
    st.planned_step = Some(step.name().to_owned());
    out
}

/// A status-only move to the next phase; the handover (Distributing → RollingOut) makes the new
/// key the active one and the old one the retiring one.
pub fn advance<I: Iam>(env: &Env<'_, I>, st: &mut IamKeyRotationStatus, to: Phase) -> Outcome {
    let from = st.phase;
    if from == Phase::Distributing
        && to == Phase::RollingOut
        && let Some(new) = st.new_key.take()
    {
        if let Some(old) = st.active_key.take() {
            st.retiring_key =
                Some(RetiringKey { access_key_id: old.access_key_id, state: KeyState::Active, deactivated_at: None });
        }
        st.active_key = Some(new);
        next_rotation(st, env.valid);
        if let Some(r) = st.rotation.as_mut() {
            r.handed_over_at = Some(Time(env.now()));
        }
        if st.emergency()
            && let Some(r) = st.rotation.as_mut()
        {
            r.emergency_since = Some(Time(env.now()));
        }
    }
    if from == Phase::Soaking
        && to == Phase::Deactivating
        && st.emergency()
        && let Some(r) = st.rotation.as_mut()
    {
        // A parked emergency resumes: its pods get maxWait again before the leaked key goes.
        r.emergency_since = Some(Time(env.now()));
    }
    if to == Phase::Deactivating {
        st.last_retire_request.clone_from(&env.observed.requests.retire);
    }
    enter(st, to, env.now());
    Outcome::next().committed().event(false, to.into(), format!("{from} -> {to}"))
}

/// Restarts workloads onto the key by stamping their pod templates.
pub async fn stamp<I: Iam>(env: &Env<'_, I>, key_id: &str, ids: &[WorkloadRef]) -> Result<Outcome, Error> {
    for id in ids {
        workloads::stamp(env.client, &env.identity.namespace, id, key_id, &env.manager(), &env.identity.name, None)
            .await?;
    }
    let names: Vec<String> = ids.iter().map(ToString::to_string).collect();
    Ok(Outcome::requeue(plan::POLL).event(
        false,
        "Restarted",
        format!("restarting {} onto key {key_id}", names.join(", ")),
    ))
}

/// The write-ahead record of a revert: counted, a restart token chosen, back to RollingOut; the
/// active key is written back and the workloads restarted only once this is committed.
pub fn mark_revert(env_now: Timestamp, st: &mut IamKeyRotationStatus, message: &str) -> Outcome {
    if let Some(r) = st.rotation.as_mut() {
        r.reverts += 1;
        r.reverting = true;
        r.restart = Some(env_now.to_string());
    }
    enter(st, Phase::RollingOut, env_now);
    Outcome::next().committed().event(true, "SecretReverted", message.to_owned())
}

/// Writes the active key back into target Secrets another writer changed, restarts the workloads
/// with the recorded token (pods may have started from the reverted content), and rolls out again.
pub async fn revert<I: Iam>(
    env: &Env<'_, I>,
    st: &mut IamKeyRotationStatus,
    key_id: &str,
    from: Option<&str>,
    names: &[String],
    ids: &[WorkloadRef],
) -> Result<Outcome, Error> {
    let key = match from {
        None => env.staged_key(key_id).await?,
        Some(src) => env.target_key(src, key_id).await?,
    };
    env.write_targets(names, &key, false).await?;
    let token = st.rotation.as_ref().and_then(|r| r.restart.clone()).unwrap_or_else(|| env.now().to_string());
    for id in ids {
        // The merged stamp, as a rollout's: a single-key one would take other rotations' keys
        // off the pods and make them restart the workload again.
        let (ns, name) = (&env.identity.namespace, &env.identity.name);
        workloads::stamp(env.client, ns, id, key_id, &env.manager(), name, Some(&token)).await?;
    }
    if let Some(r) = st.rotation.as_mut() {
        r.reverting = false;
        r.restart = Some(token);
        r.handed_over_at = Some(Time(env.now()));
    }
    Ok(Outcome::requeue(plan::POLL).committed())
}

/// An emergency requested mid-rotation: from now on the old key goes as soon as the workloads run
/// on the new one (spec.emergency). A report on the rotation's new key never comes here
/// (`plan::emergency::new_key_reported`): the request names the old key, or no key at all.
pub fn escalate<I: Iam>(env: &Env<'_, I>, st: &mut IamKeyRotationStatus) -> Outcome {
    let now = env.now();
    let handed_over = st.retiring_key.is_some();
    if let Some(r) = st.rotation.as_mut() {
        r.trigger = Trigger::Emergency;
        // Handed over already: maxWait counts from now (else from the handover, `advance`).
        if handed_over {
            r.emergency_since = Some(Time(now));
        }
    }
    st.last_emergency_request.clone_from(&env.observed.requests.emergency);
    let request = env.observed.requests.emergency.clone().unwrap_or_default();
    Outcome::next().committed().event(
        true,
        "Emergency",
        format!("EMERGENCY rotation requested mid-rotation ({request}): {}", switch_off_rule(env.valid)),
    )
}

/// How an emergency retires its leaked key, for Events.
pub fn switch_off_rule(v: &crate::validate::ValidSpec) -> String {
    match v.switch_off {
        crate::api::SwitchOff::Immediately => {
            "the leaked key is switched off as soon as the Secrets hold the new one (spec.emergency.switchOff: Immediately)".into()
        }
        crate::api::SwitchOff::AfterRollout => format!(
            "the workloads are restarted at once and the leaked key is switched off once they run on the new one, {} after the handover at the latest",
            crate::duration::format(v.emergency_max_wait)
        ),
    }
}

/// UpdateAccessKey Inactive on the retiring key, after the fresh-list checks.
pub async fn deactivate<I: Iam>(
    env: &Env<'_, I>,
    st: &mut IamKeyRotationStatus,
    key_id: &str,
) -> Result<Outcome, Error> {
    let now = env.now();
    let keys = env.fresh_keys().await?;
    // Never leave the user without an Active key, and never deactivate the key in the Secrets.
    require_active(&keys, active_id(st), "deactivate", key_id)?;
    env.require_targets_hold(active_id(st)).await?;
    let switched_now = keys.iter().any(|k| k.id == key_id && k.active);
    if switched_now {
        crate::failpoint!("before-deactivate");
        env.iam.set_key_active(env.user(), key_id, false).await?;
    }
    if let Some(r) = st.retiring_key.as_mut() {
        r.state = KeyState::Inactive;
        r.deactivated_at = Some(Time(now));
    }
    if !st.emergency() {
        // The soak baseline: Ready pods per workload as the old key goes away.
        let baseline: BTreeMap<String, i32> =
            env.observed.workloads.iter().flat_map(|w| w.items.iter()).map(|w| (w.id.to_string(), w.ready)).collect();
        if let Some(r) = st.rotation.as_mut() {
            // Replayed after a lost status write (the key was Inactive already): the baseline taken
            // then stands; one taken now could count pods that broke since.
            if switched_now || r.baseline.is_empty() {
                r.baseline = baseline;
                r.below_since.clear();
            }
        }
        enter(st, Phase::Soaking, now);
    }
    Ok(Outcome::next().committed().event(false, "Deactivated", format!("key {key_id} is Inactive")))
}

/// Rollback: UpdateAccessKey Active on the retiring key, which stays parked.
pub async fn reactivate<I: Iam>(
    env: &Env<'_, I>,
    st: &mut IamKeyRotationStatus,
    key_id: &str,
    broken: &[String],
) -> Result<Outcome, Error> {
    let keys = env.fresh_keys().await?;
    if keys.iter().any(|k| k.id == key_id) {
        env.iam.set_key_active(env.user(), key_id, true).await?;
    }
    park(st, env.observed.requests.retire.clone());
    Ok(Outcome::next().committed().event(
        true,
        "RolledBack",
        format!("reactivated key {key_id}: {} broke after it was deactivated", broken.join(", ")),
    ))
}

/// Records which workloads are below their soak baseline, and since when.
pub fn track_soak(st: &mut IamKeyRotationStatus, below_since: &BTreeMap<String, Timestamp>) -> Outcome {
    if let Some(r) = st.rotation.as_mut() {
        r.below_since = below_since.iter().map(|(k, v)| (k.clone(), Time(*v))).collect();
    }
    Outcome::requeue(Duration::from_secs(1))
}

/// DeleteAccessKey on the retiring key, after the fresh-list checks; then the rotation is done.
pub async fn delete<I: Iam>(env: &Env<'_, I>, st: &mut IamKeyRotationStatus, key_id: &str) -> Result<Outcome, Error> {
    // An emergency left the new key's claim for now (start::create), before the leaked key's goes.
    let claimed = match active_id(st) {
        Some(active) if st.emergency() => env.claim(active, Outcome::default()).await,
        _ => Outcome::default(),
    };
    let keys = env.fresh_keys().await?;
    match keys.iter().find(|k| k.id == key_id) {
        Some(k) if k.active => {
            // A human reactivated it to rescue a consumer: park, never delete an Active key.
            park(st, env.observed.requests.retire.clone());
            enter(st, Phase::Soaking, env.now());
            return Ok(claimed.and(Outcome::next().committed()).event(
                true,
                "ParkedAfterRollback",
                format!("key {key_id} was reactivated outside rekey; it is not deleted"),
            ));
        }
        Some(_) => {
            require_active(&keys, active_id(st), "delete", key_id)?;
            env.require_targets_hold(active_id(st)).await?;
            crate::failpoint!("before-delete");
            env.delete_key(key_id).await?;
        }
        None => env.delete_claim(key_id).await,
    }
    let mut out = finish(env, st).await?;
    out.events.insert(0, Note { warning: false, reason: "Deleted".into(), message: format!("deleted key {key_id}") });
    Ok(claimed.and(out))
}

/// The rotation is complete: history, counters, back to Idle.
pub async fn finish<I: Iam>(env: &Env<'_, I>, st: &mut IamKeyRotationStatus) -> Result<Outcome, Error> {
    let now = env.now();
    secrets::delete_staging(&env.secrets(), env.name()).await?;
    let old = st.retiring_key.take().map(|r| r.access_key_id);
    let new = active_id(st).map(str::to_owned);
    if st.rotation.is_some() {
        // A first key replaces nothing: it is recorded, not counted as a rotation.
        if old.is_some() {
            history(st, old, new.clone(), HistoryOutcome::Completed, now);
            st.rotations += 1;
            st.last_rotation_time = Some(Time(now));
        } else {
            history(st, None, new.clone(), HistoryOutcome::Bootstrapped, now);
        }
    }
    reset_to_idle(st);
    st.failed_attempts = 0;
    st.last_failure_time = None;
    next_rotation(st, env.valid);
    Ok(Outcome::next().committed().event(
        false,
        "Idle",
        format!("rotation complete; key {} in use", new.unwrap_or_default()),
    ))
}
