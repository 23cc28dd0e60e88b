//! PURE: the next step of a rotation, decided from (spec, status, observed snapshot, now).
//!
//! Nothing here touches the cluster or IAM. Every transition of the phase table in docs/design.md, and every
//! crash-recovery case, is a unit test below with an injected clock. The controller performs
//! exactly the step returned, writes status, and asks again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

pub mod cleanup;
mod emergency;
pub mod slots;
pub mod snapshot;

use crate::api::{
    IamKeyRotationSpec, IamKeyRotationStatus, KeyState, Pending, Phase, RotationProgress, Trigger, WorkloadRef,
};
use crate::ownership::{Identity, claims, is_own_claim};
use crate::validate::ValidSpec;
pub use snapshot::{IamKey, IamState, Observed, Requests, SecretState, WorkloadState, WorkloadsState};

/// How long verification of a new key may take (IAM propagation) before it is abandoned...
pub const VERIFY_BOUND: Duration = Duration::from_secs(180);
/// ...counted in attempts made, not only in time: an operator held up elsewhere (a restart, a
/// backlog) has not tried the key, so the time alone proves nothing. 12 attempts backing off 1, 2,
/// 4, 8 then 15 s span about three minutes.
pub const VERIFY_ATTEMPTS: u32 = 12;
/// A workload below its soak baseline this long counts as broken.
pub const BROKEN_AFTER: Duration = Duration::from_secs(30);
/// IAM's CreateDate has whole seconds and another clock: orphans may look this much older.
pub const ORPHAN_CLOCK_SLACK: Duration = Duration::from_secs(300);
/// How often a resource is looked at without a reason: its Secrets are read (a hand-deleted or
/// edited Secret is noticed), IAM is not called.
pub const IDLE_RESYNC: Duration = Duration::from_secs(600);
/// How often an in-flight rollout or soak is looked at when no watch event arrives.
pub const POLL: Duration = Duration::from_secs(5);

/// Why rekey cannot go on without a human (the Stalled condition's reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::Display, strum::IntoStaticStr)]
pub enum StallReason {
    InvalidSpec,
    Forbidden,
    UserNotFound,
    SecretConflict,
    UnknownKey,
    ParkedAfterRollback,
    SelfRotation,
    SecretImmutable,
}

/// What is wrong while the Secrets still work (the Degraded condition's reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::Display, strum::IntoStaticStr, strum::EnumString)]
pub enum DegradeReason {
    RolloutStalled,
    RolledBack,
    KeyQuotaExhausted,
    VerificationFailed,
    Conflict,
    GitOpsManagedSecret,
    UncoveredConsumers,
    SecretReverted,
    /// The new key was reported leaked before any Secret held it: deleted, the rotation starts over.
    NewKeyLeaked,
}

impl DegradeReason {
    /// Only a person clears it: rekey waits for someone to delete a foreign key, to settle who
    /// owns the user or the Secret, or to deal with uncovered pods. The other reasons rekey works
    /// through on its own (a slow rollout, a retried verification, a revert written back; a
    /// rollback parks the rotation as Stalled).
    pub fn needs_a_person(self) -> bool {
        matches!(self, Self::KeyQuotaExhausted | Self::Conflict | Self::GitOpsManagedSecret | Self::UncoveredConsumers)
    }
}

/// Why a step that writes is held back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::Display, strum::IntoStaticStr)]
pub enum Withheld {
    /// `spec.suspend`: nothing is written until it is lifted.
    Suspended,
    /// `spec.dryRun`: the step is reported, never performed.
    DryRun,
}

/// The one step to perform next. Its name (`IntoStaticStr`) is used in Events, logs, metrics and
/// the dry-run report.
#[derive(Clone, Debug, PartialEq, Eq, strum::IntoStaticStr)]
pub enum Step {
    /// Nothing to write; look again after `requeue` (None: only on a watch event).
    Wait { requeue: Option<Duration>, why: String },
    /// A rotation would start but waits for a --max-concurrent-rotations slot (`slots`): nothing is
    /// written; the operator remembers that this resource waits, for the namespaces' fair shares.
    WaitForSlot { requeue: Duration, message: String },
    /// A scheduled rotation is due but no window of spec.schedule.windows is open: nothing is
    /// written (the key in use stays Active) until `opens`.
    WaitForWindow { requeue: Duration, opens: Timestamp, message: String },
    /// The last attempt failed: nothing is done, and nothing concluded (the failure's conditions
    /// stand), until the backoff is over.
    Retry { requeue: Duration, why: String },
    /// The decision needs IAM facts: gather them and decide again.
    NeedIam,
    /// The decision needs the workloads: gather them and decide again.
    NeedWorkloads,
    /// rekey cannot go on without a human.
    Stall { reason: StallReason, message: String },
    /// Something is wrong but the Secrets still work; retry after `requeue`.
    Degrade { reason: DegradeReason, message: String, requeue: Duration },
    /// The Secrets already hold an Active key of the user: track it and claim it (and retire its
    /// partner, after the workloads are rolled onto it).
    Adopt { key_id: String, created: Timestamp, partner: Option<(String, bool)> },
    /// Copy the active key from `from` into Secrets that lack it.
    Fill { from: String, to: Vec<String> },
    /// Preflight, then commit the write-ahead marker (phase Creating).
    Begin { trigger: Trigger },
    /// CreateAccessKey, at once into the staging Secret, then status.newKey and the tag.
    Create,
    /// Recovery: a key created in a crashed one-time window, which nobody has.
    DeleteOrphan { key_id: String },
    /// A new attempt after IAM refused the last one: the write-ahead marker again, listing the keys
    /// the user has now (status only).
    RenewMarker { known_key_ids: Vec<String> },
    /// Recovery: the staging Secret holds a key status does not know yet.
    RecordNewKey { key_id: String, created: Timestamp },
    /// One sts:GetCallerIdentity signed with the new key.
    Verify { key_id: String },
    /// Give up this rotation; delete the new key if nobody has it.
    Abandon { delete_key: Option<String>, reason: DegradeReason, message: String },
    /// Write the new key into these Secrets (forward-only).
    Distribute { key_id: String, secrets: Vec<String> },
    /// Status-only move to the next phase.
    Advance { to: Phase },
    /// Another writer put a different key into target Secrets after the handover: write the
    /// active key back (from the staging Secret, or from the readable target `from`), restart every
    /// workload (pods may have started from the reverted content), and roll out again.
    Revert { key_id: String, from: Option<String>, secrets: Vec<String>, workloads: Vec<WorkloadRef>, message: String },
    /// A revert was found: the write-ahead record (reverts, the restart token, phase RollingOut)
    /// committed before the active key is written back and the workloads restarted (`Revert`).
    MarkRevert { message: String },
    /// An emergency was requested mid-rotation: the rotation becomes one (status only).
    Escalate,
    /// Restart these workloads onto the key.
    Stamp { key_id: String, workloads: Vec<WorkloadRef> },
    /// UpdateAccessKey Inactive on the retiring key.
    Deactivate { key_id: String },
    /// Rollback: UpdateAccessKey Active on the retiring key.
    Reactivate { key_id: String, broken: Vec<String> },
    /// Record which workloads are below their soak baseline, and since when.
    TrackSoak { below_since: BTreeMap<String, Timestamp> },
    /// DeleteAccessKey on the retiring key.
    Delete { key_id: String },
    /// The rotation is complete: back to Idle.
    Finish,
    /// A step that writes, held back by spec.suspend or spec.dryRun: reported, not performed.
    Withhold { why: Withheld, step: Box<Step> },
}

impl Step {
    pub fn name(&self) -> &'static str {
        self.into()
    }

    /// Whether performing the step writes to IAM, Secrets or workloads (what dryRun and suspend
    /// withhold). Status writes are not counted.
    pub fn writes(&self) -> bool {
        !matches!(
            self,
            Step::Wait { .. }
                | Step::WaitForSlot { .. }
                | Step::WaitForWindow { .. }
                | Step::Retry { .. }
                | Step::NeedIam
                | Step::NeedWorkloads
                | Step::Stall { .. }
                | Step::Degrade { .. }
                | Step::Advance { .. }
                | Step::TrackSoak { .. }
                | Step::RecordNewKey { .. }
                | Step::RenewMarker { .. }
                | Step::MarkRevert { .. }
                | Step::Escalate
                | Step::Withhold { .. }
        )
    }
}

/// Everything the decision reads.
pub struct Input<'a> {
    pub spec: &'a IamKeyRotationSpec,
    pub valid: &'a ValidSpec,
    pub status: &'a IamKeyRotationStatus,
    pub observed: &'a Observed,
    pub identity: &'a Identity,
    pub gates: &'a Gates,
}

/// What the operator's own configuration and its other resources allow this resource right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gates {
    /// `spec.aws.roleArn`, when the operator's allow-list (--allowed-role-arns) does not match it.
    pub denied_role: Option<String>,
    /// Who holds the --max-concurrent-rotations slots (`slots`).
    pub rotation_slots: slots::RotationSlots,
    /// Who holds every --max-concurrent-rollouts slot while this resource may not restart
    /// workloads (empty: it holds one, or there is no limit).
    pub rollout_slot_holders: Vec<String>,
    /// --max-concurrent-rollouts, for the message while waiting for a slot.
    pub max_rollouts: usize,
    /// --rollout-cooldown: no restart in this namespace before this instant.
    pub restart_not_before: Option<Timestamp>,
    /// --rollout-cooldown: how long a rotation ready to restart waits for `handing_over`.
    pub restart_cooldown: Duration,
    /// Other resources of this namespace about to hand over a new key (Creating, Verifying,
    /// Distributing): a restart that waits for them carries their keys too (`workloads::stamp`).
    pub handing_over: Vec<String>,
    /// The namespaces this operator watches (empty: all). A claim of a resource elsewhere may be
    /// another operator's, so it is never taken for stale.
    pub watched: Vec<String>,
}

impl Default for Gates {
    fn default() -> Self {
        Self {
            denied_role: None,
            rotation_slots: slots::RotationSlots { max: 10, ..Default::default() },
            rollout_slot_holders: Vec::new(),
            max_rollouts: 0,
            restart_not_before: None,
            restart_cooldown: Duration::ZERO,
            handing_over: Vec::new(),
            watched: Vec::new(),
        }
    }
}

/// The decision: one step, and what to report beside it while it proceeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub step: Step,
    /// Something wrong that does not stop the step (reported as Degraded with this reason).
    pub caveat: Option<(DegradeReason, String)>,
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d).ok().and_then(|d| t.checked_add(d).ok()).unwrap_or(Timestamp::MAX)
}

fn until(now: Timestamp, then: Timestamp) -> Duration {
    Duration::try_from(then.duration_since(now)).unwrap_or(Duration::ZERO)
}

/// When the key created at `created` comes due: maxKeyAge - rotateBefore, plus the resource's
/// spread. Windows aside.
pub fn due(created: Timestamp, v: &ValidSpec) -> Timestamp {
    add(created, v.max_key_age.saturating_sub(v.rotate_before).saturating_add(v.spread))
}

/// When the scheduled rotation of the key created at `created` starts (status.nextRotationTime):
/// when it comes due, or the resource's place in the next window after that.
pub fn due_at(created: Timestamp, v: &ValidSpec) -> Timestamp {
    let due = due(created, v);
    crate::schedule::place(&v.windows, due, v.share).map_or(due, |(_, start)| start)
}

/// The one backoff: `first` after the first attempt, doubling with each further one, at most `cap`.
pub fn doubling(attempts: u32, first: Duration, cap: Duration) -> Duration {
    let exp = attempts.saturating_sub(1).min(16);
    first.saturating_mul(1u32 << exp).min(cap)
}

/// Failure backoff: 10 s doubling per failed attempt, at most 10 min.
pub fn backoff(failed_attempts: u32) -> Duration {
    doubling(failed_attempts, Duration::from_secs(10), Duration::from_secs(600))
}

fn consent(iam: &IamState, id: &Identity) -> bool {
    iam.tags.get(&id.consent_tag()).is_some_and(|v| v == &id.cluster || v == "*")
}

fn wait(requeue: Option<Duration>, why: impl Into<String>) -> Step {
    Step::Wait { requeue, why: why.into() }
}

fn stall(reason: StallReason, message: impl Into<String>) -> Step {
    Step::Stall { reason, message: message.into() }
}

/// Decides the next step, and what to report beside it.
pub fn decide(i: &Input) -> Decision {
    let step = withhold(i, next_step(i));
    Decision { caveat: caveat(i, &step), step }
}

fn next_step(i: &Input) -> Step {
    emergency::with_retry_promised(i, emergency::with_report_pending(i, phase_step(i)))
}

fn phase_step(i: &Input) -> Step {
    let st = i.status;
    if let Some(role) = &i.gates.denied_role {
        return stall(
            StallReason::Forbidden,
            format!(
                "spec.aws.roleArn {role} is not allowed by this operator (--allowed-role-arns); no IAM call was made"
            ),
        );
    }
    if let Some(s) = user_changed(i) {
        return s;
    }
    if !i.observed.conflicts.is_empty() {
        // Two resources writing the same keys would take them from each other at every look.
        return stall(StallReason::SecretConflict, i.observed.conflicts.join("; "));
    }
    if let Some(s) = backing_off(i) {
        return s;
    }
    if let Some(s) = leaked_before_handover(i) {
        return s;
    }
    // A report on the new key leaves the healthy old key to the routine gates (`new_key_reported`).
    if st.phase != Phase::Idle && !st.emergency() && emergency_requested(i) && emergency::new_key_reported(i).is_none()
    {
        return Step::Escalate;
    }
    match st.phase {
        Phase::Idle => idle(i),
        Phase::Creating => creating(i),
        Phase::Verifying => verifying(i),
        Phase::Distributing => distributing(i),
        Phase::RollingOut | Phase::Deactivating | Phase::Soaking | Phase::Deleting
            if let Some(s) = refill(i).or_else(|| reverted(i)) =>
        {
            s
        }
        Phase::RollingOut => rolling_out(i),
        Phase::Deactivating => deactivating(i),
        Phase::Soaking => soaking(i),
        Phase::Deleting => deleting(i),
    }
}

/// An edit of spec.userName while keys of the previous user are tracked would leave them Active and
/// untracked (every later IAM call would name the new user): refused. IAM compares user names
/// case-insensitively, and so does this.
fn user_changed(i: &Input) -> Option<Step> {
    let st = i.status;
    let tracked = st.user_name.as_deref()?;
    let new = &i.spec.user_name;
    let holds = st.active_key.is_some() || st.retiring_key.is_some() || st.phase != Phase::Idle;
    if tracked.eq_ignore_ascii_case(new) || !holds {
        return None;
    }
    Some(stall(
        StallReason::InvalidSpec,
        format!(
            "spec.userName changed from {tracked} to {new} while rekey tracks keys of {tracked}: set it back to {tracked}, or delete this IamKeyRotation (its deletionPolicy decides what happens to the keys of {tracked}) and create one for {new}"
        ),
    ))
}

/// spec.suspend and spec.dryRun hold back every step that writes to IAM, Secrets or workloads.
fn withhold(i: &Input, step: Step) -> Step {
    let why = match (i.spec.suspend, i.spec.dry_run) {
        (true, _) => Withheld::Suspended,
        (false, true) => Withheld::DryRun,
        (false, false) => return step,
    };
    if !step.writes() {
        return step;
    }
    Step::Withhold { why, step: Box::new(step) }
}

impl Withheld {
    pub fn describe(self) -> &'static str {
        match self {
            Withheld::Suspended => "suspended",
            Withheld::DryRun => "dry run",
        }
    }
}

/// A target Secret applied by a GitOps tool is written all the same (its pods need the key), but
/// the tool's next sync reverts it: reported as Degraded for as long as nothing worse is.
fn caveat(i: &Input, step: &Step) -> Option<(DegradeReason, String)> {
    let managed = &i.observed.gitops_managed;
    let worse = matches!(
        step,
        Step::Stall { .. } | Step::Degrade { .. } | Step::Abandon { .. } | Step::Reactivate { .. } | Step::Retry { .. }
    );
    if managed.is_empty() || worse {
        return None;
    }
    let which: Vec<String> = managed.iter().map(|(s, tool)| format!("{s} ({tool})")).collect();
    Some((
        DegradeReason::GitOpsManagedSecret,
        format!(
            "Secret {} is applied by a GitOps tool, whose next sync reverts the key rekey writes: keep the Secret out of Git, or make the tool ignore its data (Argo CD: ignoreDifferences on /data; Flux: remove it from the Kustomization)",
            which.join(", ")
        ),
    ))
}

/// After a failure, whatever the phase, the next attempt waits for the backoff. Recording the
/// failure in status is itself a change the watch reports, which would otherwise retry at once,
/// and again (ten times a second, each with a status write and an Event). A new request annotation
/// waits too: it is marked as acted on only when its step succeeds, so letting it through would
/// bring that loop back for as long as the step fails. A spec edit clears the failure count before
/// deciding (status::prepare), so it is tried at once.
fn backing_off(i: &Input) -> Option<Step> {
    let (st, o) = (i.status, i.observed);
    let last = st.last_failure_time.as_ref().filter(|_| st.failed_attempts > 0)?;
    let retry = add(last.0, backoff(st.failed_attempts));
    if o.now >= retry {
        return None;
    }
    // A leaked key's request is never dropped: it stays in view while its next attempt waits.
    let why = match o.requests.emergency.as_deref().filter(|_| emergency_requested(i) || st.emergency()) {
        Some(request) => format!(
            "EMERGENCY rotation ({request}) is tried again at {retry}, after {} failed attempts",
            st.failed_attempts
        ),
        None => format!("retrying after failure at {retry}"),
    };
    Some(Step::Retry { requeue: until(o.now, retry), why })
}

/// After distribution every target Secret holds the active key. One deleted or emptied by hand
/// meanwhile gets it back before anything else happens (its pods cannot start without it, and the
/// old key must not be retired under them): from a target Secret that holds it, else from the
/// staging Secret. With neither, the rotation goes on and Idle starts over with a new key.
fn refill(i: &Input) -> Option<Step> {
    let (st, o) = (i.status, i.observed);
    let active = &st.active_key.as_ref()?.access_key_id;
    let lacking = lacking(o);
    if lacking.is_empty() {
        return None;
    }
    if st.rotation.as_ref().is_some_and(|r| r.reverting) {
        // A revert is being carried out: it writes these back too (`reverted`).
        return None;
    }
    if st.rotation.as_ref().is_some_and(|r| r.reverts > 0) {
        // This rotation saw a Secret reverted: pods may have started on the reverted key since (a
        // person emptying the Secret is how a revert is fixed). Written back with a restart.
        return Some(Step::MarkRevert {
            message: format!(
                "Secret {} is refilled with the active key {active} after a revert in this rotation: the workloads are restarted, as pods may have started on the reverted key",
                lacking.join(", ")
            ),
        });
    }
    match readable_holder(i, active) {
        Some(from) => Some(Step::Fill { from, to: lacking }),
        None if o.staging_key.as_ref() == Some(active) => {
            Some(Step::Distribute { key_id: active.clone(), secrets: lacking })
        }
        None => None,
    }
}

/// After the handover every target Secret must keep the active key until the old one is gone:
/// Helm, External Secrets or a GitOps sync may write the old key back, and pods started from that
/// content would lose access when it is retired. Written back once; a second time, a human decides.
fn reverted(i: &Input) -> Option<Step> {
    let (st, o) = (i.status, i.observed);
    let active = &st.active_key.as_ref()?.access_key_id;
    let bad: Vec<String> = o
        .secrets
        .iter()
        .filter(|(name, s)| match s {
            // A template cannot be read back: another writer of its keys since rekey's last write
            // (managedFields) is the revert.
            SecretState::Holds(id) => {
                id != active || (!readable(i, name) && o.writers.get(name).is_some_and(|w| !w.is_empty()))
            }
            SecretState::Unreadable(_) => true,
            SecretState::Missing | SecretState::Empty => false,
        })
        .map(|(n, _)| n.clone())
        .collect();
    let rotation = st.rotation.as_ref();
    if rotation.is_some_and(|r| r.reverting) {
        // Marked before: finish writing back and restarting (again, after a crash or a failure).
        let mut secrets = bad;
        secrets.extend(lacking(o));
        return Some(revert(i, active, secrets, "the revert marked before is carried out".into()));
    }
    if bad.is_empty() {
        return None;
    }
    let what = bad.iter().map(|n| written_by(o, n)).collect::<Vec<_>>().join(", ");
    if rotation.map_or(0, |r| r.reverts) == 0 {
        return Some(Step::MarkRevert {
            message: format!(
                "Secret {what} no longer held the active key {active}: rekey writes it back and restarts the workloads; the old key is not retired until the Secrets keep the new one (make the writer leave the key alone: docs/gitops.md)"
            ),
        });
    }
    if let Some(r) = st.retiring_key.as_ref().filter(|r| r.state == KeyState::Inactive) {
        // Pods started from the reverted content hold the old key: it must work again.
        let broken = vec![format!("Secret {what} was reverted to another key again")];
        return Some(Step::Reactivate { key_id: r.access_key_id.clone(), broken });
    }
    Some(stall(
        StallReason::SecretConflict,
        format!(
            "Secret {what} was reverted again after rekey wrote the active key {active} back: the old key stays Active and rekey writes nothing until the writer stops (docs/gitops.md); then clear the Secret's key fields, and rekey refills them and restarts the workloads"
        ),
    ))
}

fn readable(i: &Input, name: &str) -> bool {
    i.spec.secrets.iter().any(|t| t.name == name && crate::secrets::readable(t))
}

fn written_by(o: &Observed, secret: &str) -> String {
    match o.writers.get(secret).filter(|w| !w.is_empty()) {
        Some(w) => format!("{secret} (written by {})", w.join(", ")),
        None => format!("{secret} (writer unknown)"),
    }
}

fn revert(i: &Input, active: &str, secrets: Vec<String>, message: String) -> Step {
    let o = i.observed;
    let Some(w) = &o.workloads else { return Step::NeedWorkloads };
    let from = match o.staging_key.as_deref() == Some(active) {
        true => None,
        false => match readable_holder(i, active) {
            Some(h) => Some(h),
            None => {
                return stall(
                    StallReason::SecretConflict,
                    format!(
                        "Secret {} does not hold the active key {active}, and no readable copy of it is left to write back",
                        secrets.join(", ")
                    ),
                );
            }
        },
    };
    Step::Revert {
        key_id: active.to_owned(),
        from,
        secrets,
        workloads: w.items.iter().filter(|w| w.refused.is_none()).map(|w| w.id.clone()).collect(),
        message,
    }
}

/// A target Secret that holds `key` in a format it can be copied back out of.
fn readable_holder(i: &Input, key: &str) -> Option<String> {
    i.observed
        .secrets
        .iter()
        .find(|(n, s)| matches!(s, SecretState::Holds(id) if id == key) && readable(i, n))
        .map(|(n, _)| n.clone())
}

/// The checks every IAM write for this user is preceded by; None when all pass.
fn iam_gate(i: &Input, iam: &IamState) -> Option<Step> {
    let user = &i.spec.user_name;
    if iam.operator_user.as_deref().is_some_and(|me| me.eq_ignore_ascii_case(user)) {
        return Some(stall(
            StallReason::SelfRotation,
            format!("IAM user {user} is the identity rekey runs as; rekey never rotates its own keys"),
        ));
    }
    if !iam.user_exists {
        return Some(stall(StallReason::UserNotFound, format!("IAM user {user} does not exist")));
    }
    if !consent(iam, i.identity) {
        return Some(stall(
            StallReason::Forbidden,
            format!(
                "IAM user {user} does not consent: tag it with {}={} (or \"*\") to let namespace {} rotate its keys",
                i.identity.consent_tag(),
                i.identity.cluster,
                i.identity.namespace
            ),
        ));
    }
    if let Some(other) = &i.observed.other_resource {
        return Some(Step::Degrade {
            reason: DegradeReason::Conflict,
            message: format!("IAM user {user} is already rotated by {other}; this resource writes nothing"),
            requeue: Duration::from_secs(300),
        });
    }
    let owner = i.identity.owner();
    for (key, claimed_by) in claims(&iam.tags) {
        let exists = iam.keys.iter().any(|k| k.id == key);
        if exists && !is_own_claim(&claimed_by, &owner) && !stale_claim(i, &claimed_by) {
            return Some(Step::Degrade {
                reason: DegradeReason::Conflict,
                message: format!(
                    "key {key} of IAM user {user} is claimed by {claimed_by}; this resource writes nothing"
                ),
                requeue: Duration::from_secs(300),
            });
        }
    }
    None
}

/// An immutable target Secret can never receive a new key: found before a key is created (or
/// before the new one is distributed), the rotation stops there, the old key untouched.
fn immutable(o: &Observed) -> Option<Step> {
    (!o.immutable.is_empty()).then(|| {
        stall(
            StallReason::SecretImmutable,
            format!(
                "Secret {} is immutable (immutable: true), so rekey can never write a new key into it: delete it and re-create it without immutable (its consumers keep the key they started with)",
                o.immutable.join(", ")
            ),
        )
    })
}

/// A claim naming a resource of this cluster that no longer exists (deleted with deletionPolicy
/// Retain before claims were released, or renamed in Git) blocks nobody: the resource that adopts
/// the key takes it over. Claims of other clusters, and cut (hashed) ones, always count.
fn stale_claim(i: &Input, claimed_by: &str) -> bool {
    let Some(existing) = &i.observed.resources else { return false };
    let watched = |ns: &str| i.gates.watched.is_empty() || i.gates.watched.iter().any(|w| w == ns);
    crate::ownership::is_stale(claimed_by, &i.identity.cluster, watched, |r| existing.contains(r))
}

/// The target Secrets that hold no key at all (deleted, or emptied).
fn lacking(o: &Observed) -> Vec<String> {
    o.secrets
        .iter()
        .filter(|(_, s)| matches!(s, SecretState::Missing | SecretState::Empty))
        .map(|(n, _)| n.clone())
        .collect()
}

fn held_ids(o: &Observed) -> Result<BTreeSet<String>, Step> {
    let mut held = BTreeSet::new();
    for (name, s) in &o.secrets {
        match s {
            SecretState::Holds(id) => {
                held.insert(id.clone());
            }
            SecretState::Unreadable(why) => {
                return Err(stall(StallReason::SecretConflict, format!("Secret {name}: {why}")));
            }
            SecretState::Missing | SecretState::Empty => {}
        }
    }
    Ok(held)
}

fn idle(i: &Input) -> Step {
    let (st, o) = (i.status, i.observed);
    let Some(active) = &st.active_key else { return first_key(i) };
    let held = match held_ids(o) {
        Ok(h) => h,
        Err(s) => return s,
    };
    if let Some(other) = held.iter().find(|id| **id != active.access_key_id) {
        let who: Vec<&str> = o
            .secrets
            .iter()
            .filter(|(_, s)| *s == SecretState::Holds(other.clone()))
            .map(|(n, _)| n.as_str())
            .collect();
        return stall(
            StallReason::SecretConflict,
            format!(
                "Secret {} holds key {other}, not the active key {}: rekey never overwrites credentials it cannot account for",
                who.join(", "),
                active.access_key_id
            ),
        );
    }
    let lacking = lacking(o);
    if !lacking.is_empty() {
        match readable_holder(i, &active.access_key_id) {
            Some(from) => return Step::Fill { from, to: lacking },
            // Every readable copy of the secret is gone (a template cannot be read back): only a
            // new key can put working credentials back.
            None => return begin(i, Trigger::Bootstrap),
        }
    }
    if let Some(v) = &o.requests.emergency
        && st.last_emergency_request.as_ref() != Some(v)
    {
        return begin(i, Trigger::Emergency);
    }
    if let Some(v) = &o.requests.rotate
        && st.last_rotate_request.as_ref() != Some(v)
    {
        return begin(i, Trigger::Requested);
    }
    let created = active.created_at.as_ref().map(|t| t.0).unwrap_or(o.now);
    if o.now < due(created, i.valid) {
        let next = due_at(created, i.valid);
        return wait(Some(until(o.now, next)), format!("next rotation at {next}"));
    }
    let start = due_at(created, i.valid);
    if o.now >= start && crate::schedule::is_open(&i.valid.windows, o.now) {
        return begin(i, Trigger::Scheduled);
    }
    // Before its place in the window, or the window closed before it started (an operator down).
    let from = if o.now < start { due(created, i.valid) } else { o.now };
    wait_for_window(i, &active.access_key_id, created, from)
}

/// A due rotation outside every window waits for the next to open, even past maxKeyAge: the key
/// keeps working until someone deletes it, while a rotation outside the agreed hours restarts
/// workloads when nobody is there to watch. Ready turns False (KeyExpired) at maxKeyAge as without
/// windows, and the message says so beforehand; rekey.dev/rotate starts one at once.
fn wait_for_window(i: &Input, key: &str, created: Timestamp, from: Timestamp) -> Step {
    let now = i.observed.now;
    let Some((opens, starts)) = crate::schedule::place(&i.valid.windows, from, i.valid.share) else {
        return wait(None, "no window of spec.schedule.windows opens within two weeks");
    };
    let expires = add(created, i.valid.max_key_age);
    let mut message =
        format!("key {key} is due for rotation; the next window of spec.schedule.windows opens at {opens}");
    if starts > opens {
        message.push_str(&format!(", and this resource's rotation starts at {starts} (its place in the window)"));
    }
    if starts > expires {
        message.push_str(&format!(
            "; the key passes maxKeyAge at {expires}, before then: set annotation rekey.dev/rotate to rotate now"
        ));
    }
    Step::WaitForWindow { requeue: until(now, starts), opens: starts, message }
}

fn first_key(i: &Input) -> Step {
    let o = i.observed;
    let Some(iam) = &o.iam else { return Step::NeedIam };
    if let Some(s) = iam_gate(i, iam) {
        return s;
    }
    let held = match held_ids(o) {
        Ok(h) => h,
        Err(s) => return s,
    };
    let user = &i.spec.user_name;
    match held.len() {
        0 => begin(i, Trigger::Bootstrap),
        1 => {
            let id = held.iter().next().cloned().unwrap_or_default();
            match iam.keys.iter().find(|k| k.id == id) {
                None => stall(
                    StallReason::SecretConflict,
                    format!("the Secrets hold key {id}, which is not a key of IAM user {user}"),
                ),
                Some(k) if !k.active => stall(
                    StallReason::SecretConflict,
                    format!("the Secrets hold key {id} of IAM user {user}, which is Inactive"),
                ),
                Some(k) => {
                    let owner = i.identity.owner();
                    let claims = claims(&iam.tags);
                    let partner = iam
                        .keys
                        .iter()
                        .find(|p| p.id != id && claims.get(&p.id).is_some_and(|c| is_own_claim(c, &owner)))
                        .map(|p| (p.id.clone(), p.active));
                    Step::Adopt { key_id: id, created: k.created, partner }
                }
            }
        }
        _ => stall(
            StallReason::SecretConflict,
            format!(
                "the Secrets disagree: they hold keys {}; make them hold one key of IAM user {user}",
                held.into_iter().collect::<Vec<_>>().join(", ")
            ),
        ),
    }
}

/// Starting a rotation: the gate, the Secrets' writability and the 2-key quota (the failure
/// backoff is `backing_off`).
fn begin(i: &Input, trigger: Trigger) -> Step {
    let (st, o) = (i.status, i.observed);
    if let Some(s) = immutable(o) {
        return s;
    }
    let Some(iam) = &o.iam else { return Step::NeedIam };
    if let Some(s) = iam_gate(i, iam) {
        return s;
    }
    let active = st.active_key.as_ref().map(|k| k.access_key_id.as_str());
    if iam.keys.len() >= 2 {
        let foreign: Vec<&str> = iam.keys.iter().map(|k| k.id.as_str()).filter(|id| Some(*id) != active).collect();
        return Step::Degrade {
            reason: DegradeReason::KeyQuotaExhausted,
            message: format!(
                "IAM user {} already has 2 access keys ({} besides the active one); rekey never deletes a key it did not create: remove it to let the rotation start",
                i.spec.user_name,
                foreign.join(", ")
            ),
            requeue: backoff(st.failed_attempts + 1),
        };
    }
    let slots = &i.gates.rotation_slots;
    if let Some(why) = slots::refusal(slots, trigger) {
        return Step::WaitForSlot {
            requeue: Duration::from_secs(15),
            message: slots::waiting_message(slots, why, &i.identity.namespace),
        };
    }
    Step::Begin { trigger }
}

fn creating(i: &Input) -> Step {
    let (st, o) = (i.status, i.observed);
    let Some(pending) = &st.pending else {
        // The marker and newKey are written together: no marker means the key is recorded.
        return match &st.new_key {
            Some(_) => Step::Advance { to: Phase::Verifying },
            None => Step::Abandon {
                delete_key: None,
                reason: DegradeReason::VerificationFailed,
                message: "rotation state lost its write-ahead marker; starting over".into(),
            },
        };
    };
    let Some(iam) = &o.iam else { return Step::NeedIam };
    if let Some(staged) = &o.staging_key {
        return match iam.keys.iter().find(|k| &k.id == staged) {
            Some(k) => Step::RecordNewKey { key_id: k.id.clone(), created: k.created },
            None => Step::Abandon {
                delete_key: None,
                reason: DegradeReason::VerificationFailed,
                message: format!("the staged key {staged} no longer exists in IAM; starting over"),
            },
        };
    }
    if !pending.in_flight {
        // IAM refused the last attempt, so nothing of it exists: every key the user has now is
        // someone else's. The marker is raised again, with them, before the next call.
        return Step::RenewMarker { known_key_ids: iam.keys.iter().map(|k| k.id.clone()).collect() };
    }
    let known: BTreeSet<&str> = pending.known_key_ids.iter().map(String::as_str).collect();
    let unknown: Vec<&IamKey> = iam.keys.iter().filter(|k| !known.contains(k.id.as_str())).collect();
    match unknown.as_slice() {
        [] => {
            if iam.keys.len() >= 2 {
                return Step::Abandon {
                    delete_key: None,
                    reason: DegradeReason::KeyQuotaExhausted,
                    message: format!("IAM user {} has no free key slot", i.spec.user_name),
                };
            }
            if let Some(s) = iam_gate(i, iam) {
                return s;
            }
            // The last attempt failed without an answer and made no key: the next one gets a
            // marker of its own, so the orphan window stays short.
            if st.last_failure_time.as_ref().is_some_and(|f| f.0 > pending.started_at.0) {
                return Step::RenewMarker { known_key_ids: iam.keys.iter().map(|k| k.id.clone()).collect() };
            }
            Step::Create
        }
        [k] => match not_an_orphan(k, pending, &held_ids_lenient(o), &iam.tags, &i.identity.owner()) {
            None => Step::DeleteOrphan { key_id: k.id.clone() },
            Some(why) => stall(
                StallReason::UnknownKey,
                format!(
                    "key {} appeared on IAM user {} during key creation but is not provably rekey's ({why}): a human must decide",
                    k.id, i.spec.user_name
                ),
            ),
        },
        many => stall(
            StallReason::UnknownKey,
            format!(
                "keys {} appeared on IAM user {} during key creation: a human must decide",
                many.iter().map(|k| k.id.as_str()).collect::<Vec<_>>().join(", "),
                i.spec.user_name
            ),
        ),
    }
}

/// Why `k`, a key that appeared while the write-ahead marker stood, is not provably the orphan of
/// an interrupted CreateAccessKey (None: it is, and nobody else can have it).
pub fn not_an_orphan(
    k: &IamKey,
    pending: &Pending,
    held: &BTreeSet<String>,
    tags: &BTreeMap<String, String>,
    owner: &str,
) -> Option<&'static str> {
    let slack = SignedDuration::try_from(ORPHAN_CLOCK_SLACK).unwrap_or_default();
    let floor = pending.started_at.0.checked_sub(slack);
    // The call follows its marker within seconds (the AWS call budget may queue it for a while).
    let ceiling = pending.started_at.0.checked_add(slack.saturating_mul(2));
    if held.contains(&k.id) {
        Some("a target Secret holds it")
    } else if claims(tags).get(&k.id).is_some_and(|c| !is_own_claim(c, owner)) {
        Some("another owner claims it")
    } else if floor.is_ok_and(|f| k.created < f) {
        Some("it is older than the rotation")
    } else if ceiling.is_ok_and(|c| k.created > c) {
        Some("it was created long after rekey's attempt")
    } else {
        None
    }
}

/// The key ids the target Secrets hold (unreadable ones aside).
fn held_ids_lenient(o: &Observed) -> BTreeSet<String> {
    o.secrets
        .iter()
        .filter_map(|(_, s)| match s {
            SecretState::Holds(id) => Some(id.clone()),
            _ => None,
        })
        .collect()
}

fn phase_since(i: &Input) -> Timestamp {
    i.status.rotation.as_ref().map(|r| r.phase_since.0).unwrap_or(i.observed.now)
}

fn verifying(i: &Input) -> Step {
    let Some(new) = &i.status.new_key else { return Step::Advance { to: Phase::Idle } };
    if !i.spec.verify_new_key {
        return Step::Advance { to: Phase::Distributing };
    }
    let attempts = i.status.rotation.as_ref().map_or(0, |r| r.verify_attempts);
    if i.observed.now >= add(phase_since(i), VERIFY_BOUND) && attempts >= VERIFY_ATTEMPTS {
        return Step::Abandon {
            delete_key: Some(new.access_key_id.clone()),
            reason: DegradeReason::VerificationFailed,
            message: format!(
                "new key {} did not authenticate as {} in {attempts} attempts over {}; it was deleted (nobody had it)",
                new.access_key_id,
                i.spec.user_name,
                crate::duration::format(VERIFY_BOUND)
            ),
        };
    }
    Step::Verify { key_id: new.access_key_id.clone() }
}

fn distributing(i: &Input) -> Step {
    let (st, o) = (i.status, i.observed);
    let Some(new) = &st.new_key else { return Step::Advance { to: Phase::RollingOut } };
    if let Some(s) = immutable(o) {
        return s;
    }
    let old = st.active_key.as_ref().map(|k| k.access_key_id.clone());
    let mut todo = Vec::new();
    for (name, s) in &o.secrets {
        match s {
            SecretState::Holds(id) if *id == new.access_key_id => {}
            SecretState::Holds(id) if Some(id) != old.as_ref() => {
                return stall(
                    StallReason::SecretConflict,
                    format!("Secret {name} holds key {id}, which rekey did not put there; it was not overwritten"),
                );
            }
            SecretState::Unreadable(why) => {
                return stall(StallReason::SecretConflict, format!("Secret {name}: {why}"));
            }
            _ => todo.push(name.clone()),
        }
    }
    if todo.is_empty() {
        Step::Advance { to: Phase::RollingOut }
    } else {
        Step::Distribute { key_id: new.access_key_id.clone(), secrets: todo }
    }
}

fn emergency(i: &Input) -> bool {
    i.status.emergency()
}

/// The workloads whose rollout onto the active key is not complete, each with where it stands.
fn incomplete(w: &WorkloadsState) -> Vec<String> {
    w.items
        .iter()
        .filter(|w| !w.complete)
        .map(|w| if w.progress.is_empty() { w.id.to_string() } else { format!("{}: {}", w.id, w.progress) })
        .collect()
}

fn rolling_out(i: &Input) -> Step {
    let (st, o) = (i.status, i.observed);
    let Some(active) = &st.active_key else { return Step::Finish };
    let Some(w) = &o.workloads else { return Step::NeedWorkloads };
    if let Some(r) = w.items.iter().find_map(|w| w.refused.as_ref().map(|why| format!("{}: {why}", w.id))) {
        return stall(StallReason::InvalidSpec, format!("{r}; it would keep the old key, so rekey will not retire it"));
    }
    let unstamped: Vec<WorkloadRef> = w
        .items
        .iter()
        .filter(|w| !crate::workloads::stamp::carries(w.stamped.as_deref(), &active.access_key_id))
        .map(|w| w.id.clone())
        .collect();
    if !unstamped.is_empty() {
        if let Some(s) = paced(i) {
            return s;
        }
        return Step::Stamp { key_id: active.access_key_id.clone(), workloads: unstamped };
    }
    if emergency(i)
        && let Some(r) = &st.retiring_key
        && r.state == KeyState::Active
    {
        return emergency::switch_off(i, &r.access_key_id);
    }
    let waiting = incomplete(w);
    if waiting.is_empty() {
        return match &st.retiring_key {
            Some(_) if emergency(i) => Step::Advance { to: Phase::Soaking },
            Some(_) => Step::Advance { to: Phase::Deactivating },
            None => Step::Finish,
        };
    }
    let deadline = add(phase_since(i), i.valid.rollout_timeout);
    if o.now >= deadline {
        return Step::Degrade {
            reason: DegradeReason::RolloutStalled,
            message: format!(
                "{} not rolled out onto key {} after {}; both keys stay Active and rekey keeps waiting",
                waiting.join("; "),
                active.access_key_id,
                i.spec.workloads.rollout_timeout
            ),
            requeue: POLL,
        };
    }
    wait(Some(POLL), format!("waiting for the rollout of {}", waiting.join("; ")))
}

/// Restart pacing: a rotation waits for a rollout slot and for its namespace's cooldown before it
/// restarts workloads. Waiting costs nothing but time: both keys stay Active, the Secrets hold the
/// new one. A leaked key's rotation never waits.
fn paced(i: &Input) -> Option<Step> {
    let (g, now) = (i.gates, i.observed.now);
    if emergency(i) {
        return None;
    }
    if !g.rollout_slot_holders.is_empty() {
        return Some(wait(
            Some(Duration::from_secs(15)),
            format!(
                "waiting for a rollout slot (at most {} rollouts at once; held by {})",
                g.max_rollouts,
                holders(&g.rollout_slot_holders, &i.identity.namespace)
            ),
        ));
    }
    let gather_until = add(phase_since(i), g.restart_cooldown);
    if !g.handing_over.is_empty() && now < gather_until {
        return Some(wait(
            Some(Duration::from_secs(1)),
            format!(
                "waiting until {gather_until} at most for {} to hand over, so that one restart carries every new key",
                few(&g.handing_over)
            ),
        ));
    }
    let at = g.restart_not_before.filter(|t| *t > now)?;
    Some(wait(
        Some(until(now, at)),
        format!(
            "waiting until {at} to restart workloads (--rollout-cooldown since the last restart in namespace {})",
            i.identity.namespace
        ),
    ))
}

/// Who holds the rollout slots, so that a stuck rollout (its Degraded/RolloutStalled) is found
/// from the rotations waiting behind it: named in this namespace, only counted in others (a
/// status tells its readers nothing of other tenants' resources).
fn holders(all: &[String], ns: &str) -> String {
    let (here, elsewhere): (Vec<String>, Vec<String>) =
        all.iter().cloned().partition(|h| h.split_once('/').is_some_and(|(n, _)| n == ns));
    let others = match elsewhere.len() {
        0 => String::new(),
        1 => "1 resource in another namespace".to_owned(),
        n => format!("{n} resources in other namespaces"),
    };
    match (here.is_empty(), others.is_empty()) {
        (false, false) => format!("{} and {others}", few(&here)),
        (false, true) => few(&here),
        _ => others,
    }
}

/// The new key of this rotation was reported leaked before it was written into a Secret: deleting it closes
/// the leak at once and restarts no pod, where carrying on would hand the leaked key over and then
/// retire the old key as an emergency, whoever still uses it. The request is used up (the key is
/// gone); the rotation starts over after the backoff.
fn leaked_before_handover(i: &Input) -> Option<Step> {
    // Before Distributing, no target Secret was ever written with it (one written and then
    // emptied or reverted may have been read meanwhile); an unreadable Secret tells nothing.
    if !matches!(i.status.phase, Phase::Creating | Phase::Verifying) {
        return None;
    }
    let new = &i.status.new_key.as_ref()?.access_key_id;
    let request = i.observed.requests.emergency.as_deref().filter(|_| emergency_requested(i))?;
    let unsure = i.observed.secrets.iter().any(|(_, s)| match s {
        SecretState::Holds(id) => id == new,
        SecretState::Unreadable(_) => true,
        _ => false,
    });
    if unsure || !names_key(request, Some(new)) {
        return None;
    }
    Some(Step::Abandon {
        delete_key: Some(new.clone()),
        reason: DegradeReason::NewKeyLeaked,
        message: format!(
            "new key {new} was reported leaked ({request}) before any Secret held it: it was deleted, and the rotation starts over after the backoff"
        ),
    })
}

/// Whether an emergency request's last `:`-separated part (a leak report's key) is `key`.
pub fn names_key(request: &str, key: Option<&str>) -> bool {
    key.is_some_and(|k| request.rsplit(':').next() == Some(k))
}

/// A new rekey.dev/rotate-emergency value: the key is leaked.
fn emergency_requested(i: &Input) -> bool {
    i.observed.requests.emergency.as_ref().is_some_and(|v| i.status.last_emergency_request.as_ref() != Some(v))
}

fn retire_requested(i: &Input) -> bool {
    i.observed.requests.retire.as_ref().is_some_and(|v| i.status.last_retire_request.as_ref() != Some(v))
}

fn deactivating(i: &Input) -> Step {
    let (st, o) = (i.status, i.observed);
    let Some(r) = &st.retiring_key else { return Step::Finish };
    if r.state == KeyState::Inactive {
        return Step::Advance { to: Phase::Soaking };
    }
    if emergency(i) {
        // A leaked key waits for the workloads (at most spec.emergency.maxWait), for nothing else.
        return emergency::switch_off(i, &r.access_key_id);
    }
    let since = phase_since(i);
    let ready_at = add(since, i.valid.deactivate_after);
    if o.now < ready_at {
        return wait(Some(until(o.now, ready_at)), format!("deactivateAfter: waiting until {ready_at}"));
    }
    let Some(w) = &o.workloads else { return Step::NeedWorkloads };
    // Looked at again on the fresh census: a workload may have restarted since RollingOut.
    let waiting = incomplete(w);
    if !waiting.is_empty() {
        if o.now >= add(since, i.valid.rollout_timeout) {
            return Step::Degrade {
                reason: DegradeReason::RolloutStalled,
                message: format!(
                    "{} not rolled out onto key {} after {}; both keys stay Active and rekey keeps waiting",
                    waiting.join("; "),
                    st.active_key.as_ref().map_or("?", |k| k.access_key_id.as_str()),
                    i.spec.workloads.rollout_timeout
                ),
                requeue: POLL,
            };
        }
        return wait(Some(POLL), format!("waiting for the rollout of {}", waiting.join("; ")));
    }
    if let Some(s) = census(i, w, &r.access_key_id, "deactivated") {
        return s;
    }
    if !i.valid.require_unused_for.is_zero() {
        let Some(iam) = &o.iam else { return Step::NeedIam };
        let Some(last_used) = &iam.retiring_last_used else { return Step::NeedIam };
        if let Some(t) = last_used {
            let quiet_at = add(*t, i.valid.require_unused_for);
            if o.now < quiet_at {
                return wait(
                    Some(until(o.now, quiet_at).min(Duration::from_secs(300))),
                    format!(
                        "key {} was used at {t}; waiting until it has been unused for {}",
                        r.access_key_id, i.spec.retirement.require_old_key_unused_for
                    ),
                );
            }
        }
    }
    Step::Deactivate { key_id: r.access_key_id.clone() }
}

/// The consumer census, taken on fresh reads before the old key is deactivated and again before
/// it is deleted: a pod rekey does not restart may still hold it. Job pods end by themselves and are
/// waited for (at most rolloutTimeout); any other is reported until it is gone or a human accepts
/// the risk (rekey.dev/retire).
fn census(i: &Input, w: &WorkloadsState, key: &str, verb: &str) -> Option<Step> {
    if retire_requested(i) || (w.uncovered.is_empty() && w.jobs.is_empty()) {
        return None;
    }
    let deadline = add(phase_since(i), i.valid.rollout_timeout);
    if w.uncovered.is_empty() && i.observed.now < deadline {
        return Some(wait(
            Some(POLL),
            format!("waiting for {} (Job pods) to finish before key {key} is {verb}", few(&w.jobs)),
        ));
    }
    let all: Vec<String> = w.uncovered.iter().chain(&w.jobs).cloned().collect();
    Some(Step::Degrade {
        reason: DegradeReason::UncoveredConsumers,
        message: format!(
            "{} read the Secrets but no Deployment, StatefulSet or DaemonSet rekey restarts controls them, so key {key} is not {verb}: restart or delete them (they start on the new key), or accept the risk by setting annotation rekey.dev/retire to a new value",
            few(&all)
        ),
        requeue: POLL,
    })
}

/// The first few of a list, and how many more.
fn few(items: &[String]) -> String {
    const SHOWN: usize = 5;
    let head = items.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    match items.len().saturating_sub(SHOWN) {
        0 => head,
        more => format!("{head} and {more} more"),
    }
}

fn deleting(i: &Input) -> Step {
    let Some(r) = &i.status.retiring_key else { return Step::Finish };
    let Some(w) = &i.observed.workloads else { return Step::NeedWorkloads };
    if let Some(s) = census(i, w, &r.access_key_id, "deleted") {
        return s;
    }
    Step::Delete { key_id: r.access_key_id.clone() }
}

fn soaking(i: &Input) -> Step {
    let (st, o) = (i.status, i.observed);
    let Some(r) = &st.retiring_key else { return Step::Finish };
    if r.state == KeyState::Active {
        // Parked after a rollback: both keys Active until a human says the missed place is fixed,
        // unless the parked key leaked: it goes under the emergency rule all the same.
        if retire_requested(i) || emergency(i) {
            return Step::Advance { to: Phase::Deactivating };
        }
        return stall(
            StallReason::ParkedAfterRollback,
            format!(
                "key {} was reactivated because workloads broke after it was deactivated; fix the consumer that still uses it, then set annotation rekey.dev/retire to a new value",
                r.access_key_id
            ),
        );
    }
    let Some(w) = &o.workloads else { return Step::NeedWorkloads };
    // A report on the new key skips the soak too: the leaked key is rotated once the old one is gone.
    if emergency(i) || emergency::new_key_reported(i).is_some() {
        let waiting = incomplete(w);
        return if waiting.is_empty() {
            Step::Advance { to: Phase::Deleting }
        } else {
            wait(
                Some(POLL),
                format!("emergency: deleting key {} once {} rolled out", r.access_key_id, waiting.join("; ")),
            )
        };
    }
    let rotation = st.rotation.clone().unwrap_or_else(|| RotationProgress::start(Trigger::Scheduled, o.now));
    let mut below: BTreeMap<String, Timestamp> = BTreeMap::new();
    let mut broken = Vec::new();
    for wl in &w.items {
        let id = wl.id.to_string();
        let Some(base) = rotation.baseline.get(&id) else { continue };
        if wl.ready < *base && !wl.progressing {
            let since = rotation.below_since.get(&id).map(|t| t.0).unwrap_or(o.now);
            if o.now >= add(since, BROKEN_AFTER) {
                broken.push(format!("{} ({} of {} Ready)", wl.id, wl.ready, base));
            }
            below.insert(id, since);
        }
    }
    if !broken.is_empty() {
        return Step::Reactivate { key_id: r.access_key_id.clone(), broken };
    }
    let recorded: BTreeMap<String, Timestamp> = rotation.below_since.iter().map(|(k, v)| (k.clone(), v.0)).collect();
    if recorded != below {
        return Step::TrackSoak { below_since: below };
    }
    let deactivated = r.deactivated_at.as_ref().map(|t| t.0).unwrap_or(o.now);
    let delete_at = add(deactivated, i.valid.delete_after);
    if o.now >= delete_at {
        return Step::Advance { to: Phase::Deleting };
    }
    let next = if below.is_empty() { until(o.now, delete_at).min(POLL) } else { Duration::from_secs(1) };
    wait(Some(next), format!("soaking: key {} is Inactive until {delete_at}", r.access_key_id))
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
