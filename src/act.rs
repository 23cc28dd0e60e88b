//! Performing exactly one step. TOUCHES THE CLUSTER AND IAM.
//!
//! Each step is one function (`start` holds those up to the distribution of the new key, `retire`
//! those after, `cleanup` the deletion policy): it changes the world, then the status copy it is
//! given, which the reconciler writes afterwards. Before every UpdateAccessKey/DeleteAccessKey the
//! user's keys are listed afresh and the safety rules re-checked on that fresh list (never on the
//! snapshot).

mod cleanup;
mod retire;
mod start;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;

pub use cleanup::cleanup;

use crate::api::{HistoryEntry, HistoryOutcome, IamKeyRotation, IamKeyRotationStatus, KeyState, Phase};
use crate::error::Error;
use crate::iam::Iam;
use crate::ownership::Identity;
use crate::plan::snapshot::{IamKey, Observed};
use crate::plan::{self, Step};
use crate::secrets::{self, AccessKey, RenderContext};
use crate::validate::ValidSpec;

/// How long a stalled resource waits before it is looked at again without a watch event.
const STALL_RECHECK: Duration = Duration::from_secs(300);
/// How often a dry-run resource reports its next step again.
const DRY_RUN_RECHECK: Duration = Duration::from_secs(60);

/// An Event to publish once the status is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

/// What the step asks of the reconciler after the status is written.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Look again after this long (None: only on a watch event or the idle resync).
    pub requeue: Option<Duration>,
    pub events: Vec<Note>,
    /// Commit the status with a resourceVersion precondition (phase changes, the marker).
    pub precondition: bool,
}

impl Outcome {
    fn requeue(d: Duration) -> Self {
        Self { requeue: Some(d), ..Default::default() }
    }
    /// At once: the next step follows the status write.
    fn next() -> Self {
        Self::requeue(Duration::ZERO)
    }
    fn event(mut self, warning: bool, reason: &str, message: String) -> Self {
        self.events.push(Note { warning, reason: reason.to_owned(), message });
        self
    }
    fn committed(mut self) -> Self {
        self.precondition = true;
        self
    }
    /// `then` after this outcome's Events (a warning of an earlier call first).
    fn and(mut self, mut then: Outcome) -> Self {
        self.events.append(&mut then.events);
        Self { requeue: then.requeue, precondition: then.precondition, events: self.events }
    }
}

/// Everything a step needs.
pub struct Env<'a, I: Iam> {
    pub client: &'a kube::Client,
    pub iam: &'a I,
    pub obj: &'a IamKeyRotation,
    pub valid: &'a ValidSpec,
    pub observed: &'a Observed,
    pub identity: &'a Identity,
    /// spec.aws.region, else the operator's: STS verification and the template's {{ .Region }}.
    pub region: &'a str,
}

impl<I: Iam> Env<'_, I> {
    fn name(&self) -> &str {
        &self.identity.name
    }
    fn user(&self) -> &str {
        &self.obj.spec.user_name
    }
    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.identity.namespace)
    }
    fn now(&self) -> Timestamp {
        self.observed.now
    }
    fn render_ctx(&self) -> RenderContext {
        RenderContext { user_name: self.user().to_owned(), region: self.region.to_owned() }
    }
    fn manager(&self) -> String {
        secrets::field_manager(self.name())
    }

    /// The user's keys, listed afresh: the only list a safety re-check may use.
    async fn fresh_keys(&self) -> Result<Vec<IamKey>, Error> {
        self.iam.list_keys(self.user()).await
    }

    /// Deletes a key and its owner claim.
    async fn delete_key(&self, key_id: &str) -> Result<(), Error> {
        self.iam.delete_key(self.user(), key_id).await?;
        self.delete_claim(key_id).await;
        Ok(())
    }

    /// Writes the owner claim on a key; reported, never fatal (e.g. IAM's 50-tag quota).
    async fn claim(&self, key_id: &str, out: Outcome) -> Outcome {
        let value = crate::ownership::claim_value(&self.identity.owner());
        match self.iam.tag_user(self.user(), key_id, &value).await {
            Ok(()) => out,
            Err(e) => out.event(true, "TagFailed", format!("could not tag IAM user with the claim on {key_id}: {e}")),
        }
    }

    /// Removes a key's owner claim; one that cannot be removed only leaves a stale tag.
    async fn delete_claim(&self, key_id: &str) {
        if let Err(e) = self.iam.untag_user(self.user(), key_id).await {
            tracing::warn!(error = %e, key = %key_id, "could not remove the claim tag");
        }
    }

    /// Writes `key` into the named target Secrets (unknown names are ignored: the spec changed).
    async fn write_targets(&self, names: &[String], key: &AccessKey, dry_run: bool) -> Result<(), Error> {
        let api = self.secrets();
        for t in self.obj.spec.secrets.iter().filter(|t| names.contains(&t.name)) {
            secrets::write_target(&api, self.name(), t, key, &self.render_ctx(), dry_run).await?;
        }
        Ok(())
    }

    /// The key a target Secret holds, read again at act time and checked to be `key_id`: only the
    /// key rekey accounts for is ever copied, never one a human put there since the decision.
    async fn target_key(&self, name: &str, key_id: &str) -> Result<AccessKey, Error> {
        let target = self.obj.spec.secrets.iter().find(|t| t.name == name);
        let s = self.secrets().get_opt(name).await?;
        let key = match (target, s.as_ref()) {
            (Some(t), Some(s)) => secrets::read_key(t, s),
            _ => None,
        }
        .ok_or_else(|| Error::Unsafe(format!("Secret {name} cannot be read back to copy its key")))?;
        if key.id != key_id {
            return Err(Error::Unsafe(format!(
                "Secret {name} now holds {}, not the active key {key_id}; nothing copied",
                key.id
            )));
        }
        Ok(key)
    }

    /// Every target Secret, read afresh right before the old key is switched off or deleted, holds
    /// the active key: a writer that put another key back since the decision stops the step. So
    /// does a write of the keys since the census (which excused pods created after the last one):
    /// a revert and a write-back in between would leave a pod on the old key excused.
    async fn require_targets_hold(&self, active: Option<&str>) -> Result<(), Error> {
        let api = self.secrets();
        for t in &self.obj.spec.secrets {
            let s = api.get_opt(&t.name).await?;
            let held = secrets::held(t, s.as_ref());
            if !matches!(&held, crate::plan::SecretState::Holds(id) if Some(id.as_str()) == active) {
                return Err(Error::Unsafe(format!(
                    "refusing to retire the old key: Secret {} no longer holds the active key {} ({held:?})",
                    t.name,
                    active.unwrap_or("none")
                )));
            }
            let last = s.as_ref().and_then(|s| secrets::last_write(&secrets::owned_keys(t), s));
            if let (Some(census), Some(last)) = (self.observed.written_at, last)
                && last > census
            {
                return Err(Error::Unsafe(format!(
                    "refusing to retire the old key: Secret {} was written at {last}, after the consumer census; looking again",
                    t.name
                )));
            }
        }
        Ok(())
    }

    /// The new key, from the staging Secret, checked to be `key_id`.
    async fn staged_key(&self, key_id: &str) -> Result<AccessKey, Error> {
        let name = secrets::staging_name(self.name());
        let s = self.secrets().get_opt(&name).await?;
        let key = s
            .as_ref()
            .and_then(|s| secrets::read_key(&secrets::staging_target(self.name()), s))
            .ok_or_else(|| Error::Unsafe(format!("the staging Secret {name} does not hold the new key")))?;
        if key.id != key_id {
            return Err(Error::Unsafe(format!("the staging Secret holds {}, not {key_id}", key.id)));
        }
        Ok(key)
    }
}

/// Never leave the user without an Active key: the key the Secrets hold must be Active in IAM,
/// on the fresh list, before another key is switched off or deleted.
fn require_active(keys: &[IamKey], active: Option<&str>, verb: &str, key_id: &str) -> Result<(), Error> {
    match active {
        Some(a) if a != key_id && keys.iter().any(|k| k.id == a && k.active) => Ok(()),
        a => Err(Error::Unsafe(format!(
            "refusing to {verb} {key_id}: the key in the Secrets ({}) is not Active in IAM",
            a.unwrap_or("none")
        ))),
    }
}

fn active_id(st: &IamKeyRotationStatus) -> Option<&str> {
    st.active_key.as_ref().map(|k| k.access_key_id.as_str())
}

fn enter(st: &mut IamKeyRotationStatus, phase: Phase, now: Timestamp) {
    st.phase = phase;
    if let Some(r) = st.rotation.as_mut() {
        r.phase_since = Time(now);
    }
}

/// Back to Idle: the rotation's working state is dropped.
fn reset_to_idle(st: &mut IamKeyRotationStatus) {
    st.phase = Phase::Idle;
    st.pending = None;
    st.new_key = None;
    st.rotation = None;
}

/// The retiring key stays Active until a human says the consumer that broke is fixed.
fn park(st: &mut IamKeyRotationStatus, retire_request: Option<String>) {
    if let Some(r) = st.retiring_key.as_mut() {
        r.state = KeyState::Active;
        r.deactivated_at = None;
    }
    st.last_retire_request = retire_request;
}

fn next_rotation(st: &mut IamKeyRotationStatus, v: &ValidSpec) {
    st.next_rotation_time =
        st.active_key.as_ref().and_then(|k| k.created_at.as_ref()).map(|c| Time(plan::due_at(c.0, v)));
}

fn history(
    st: &mut IamKeyRotationStatus,
    old: Option<String>,
    new: Option<String>,
    outcome: HistoryOutcome,
    now: Timestamp,
) {
    let started = st.rotation.as_ref().map(|r| r.started_at.clone()).unwrap_or(Time(now));
    st.history.push(HistoryEntry {
        old_key_id: old,
        new_key_id: new,
        started_at: started,
        ended_at: Time(now),
        outcome,
    });
    let excess = st.history.len().saturating_sub(10);
    st.history.drain(..excess);
}

/// Performs `step`, updating `st`.
pub async fn perform<I: Iam>(env: &Env<'_, I>, st: &mut IamKeyRotationStatus, step: &Step) -> Result<Outcome, Error> {
    if !matches!(step, Step::Withhold { .. }) {
        st.planned_step = None;
    }
    match step {
        Step::Wait { requeue, .. } => Ok(Outcome { requeue: *requeue, ..Default::default() }),
        Step::WaitForWindow { requeue, .. } | Step::WaitForSlot { requeue, .. } => Ok(Outcome::requeue(*requeue)),
        Step::Retry { requeue, .. } | Step::Degrade { requeue, .. } => Ok(Outcome::requeue(*requeue)),
        Step::NeedIam | Step::NeedWorkloads => Err(Error::Internal("the plan asked for facts twice".into())),
        Step::Stall { .. } => Ok(Outcome::requeue(STALL_RECHECK)),
        Step::Withhold { why, step } => Ok(retire::withhold(st, *why, step)),
        Step::Adopt { key_id, created, partner } => Ok(start::adopt(env, st, key_id, *created, partner.as_ref()).await),
        Step::Fill { from, to } => start::fill(env, st, from, to).await,
        Step::Begin { trigger } => start::begin(env, st, *trigger).await,
        Step::Create => start::create(env, st).await,
        Step::DeleteOrphan { key_id } => start::delete_orphan(env, st, key_id).await,
        Step::RenewMarker { known_key_ids } => Ok(start::renew_marker(env, st, known_key_ids)),
        Step::RecordNewKey { key_id, created } => Ok(start::record_new_key(env, st, key_id, *created)),
        Step::Verify { key_id } => start::verify(env, st, key_id).await,
        Step::Abandon { delete_key, reason, message } => {
            start::abandon(env, st, delete_key.as_deref(), reason.into(), message).await
        }
        Step::Distribute { key_id, secrets } => start::distribute(env, key_id, secrets).await,
        Step::MarkRevert { message } => Ok(retire::mark_revert(env.now(), st, message)),
        Step::Revert { key_id, from, secrets, workloads, .. } => {
            retire::revert(env, st, key_id, from.as_deref(), secrets, workloads).await
        }
        Step::Escalate => Ok(retire::escalate(env, st)),
        Step::Advance { to } => Ok(retire::advance(env, st, *to)),
        Step::Stamp { key_id, workloads } => retire::stamp(env, key_id, workloads).await,
        Step::Deactivate { key_id } => retire::deactivate(env, st, key_id).await,
        Step::Reactivate { key_id, broken } => retire::reactivate(env, st, key_id, broken).await,
        Step::TrackSoak { below_since } => Ok(retire::track_soak(st, below_since)),
        Step::Delete { key_id } => retire::delete(env, st, key_id).await,
        Step::Finish => retire::finish(env, st).await,
    }
}

#[cfg(test)]
mod tests;
