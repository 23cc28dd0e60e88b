//! Performing exactly one step. TOUCHES THE CLUSTER AND IAM.
//!
//! Each function changes the world, then the status copy it is given; the controller writes that
//! status afterwards. Before every UpdateAccessKey/DeleteAccessKey the user's keys are listed
//! afresh and the safety rules re-checked on that fresh list (never on the snapshot).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::{Resource as _, ResourceExt as _};
use secrecy::SecretString;

use crate::api::{
    HistoryEntry, IamKeyRotation, IamKeyRotationStatus, KeyRef, KeyState, Pending, Phase, RetiringKey,
    RotationProgress, Trigger,
};
use crate::error::Error;
use crate::iam::{Iam, Verification, user_of_arn};
use crate::ownership::{Identity, claim_value};
use crate::plan::{self, POLL, Step};
use crate::plan::snapshot::{Observed, SecretState};
use crate::secrets::{self, AccessKey, RenderContext};
use crate::validate::ValidSpec;
use crate::workloads;

/// What the step asks of the controller after the status is written.
#[derive(Debug, Default)]
pub struct Outcome {
    pub requeue: Option<Duration>,
    /// Events to publish: (warning, reason, note).
    pub events: Vec<(bool, String, String)>,
    /// Commit the status with a resourceVersion precondition (phase changes, the marker).
    pub precondition: bool,
    /// Target Secrets a GitOps tool manages (reported as Degraded/GitOpsManagedSecret).
    pub gitops_managed: Vec<(String, &'static str)>,
}

impl Outcome {
    fn requeue(d: Duration) -> Self {
        Self { requeue: Some(d), ..Default::default() }
    }
    fn event(mut self, warning: bool, reason: &str, note: String) -> Self {
        self.events.push((warning, reason.to_owned(), note));
        self
    }
    fn committed(mut self) -> Self {
        self.precondition = true;
        self
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
    pub region: &'a str,
}

impl<I: Iam> Env<'_, I> {
    fn ns(&self) -> String {
        self.obj.namespace().unwrap_or_default()
    }
    fn name(&self) -> String {
        self.obj.name_any()
    }
    fn user(&self) -> &str {
        &self.obj.spec.user_name
    }
    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns())
    }
    fn now(&self) -> Timestamp {
        self.observed.now
    }
    fn render_ctx(&self) -> RenderContext {
        RenderContext { user_name: self.user().to_owned(), region: self.region.to_owned() }
    }
    fn manager(&self) -> String {
        secrets::field_manager(&self.name())
    }
}

fn progress(trigger: Trigger, now: Timestamp) -> RotationProgress {
    RotationProgress {
        trigger,
        started_at: Time(now),
        phase_since: Time(now),
        distributed_at: None,
        baseline: BTreeMap::new(),
        below_since: BTreeMap::new(),
        verify_attempts: 0,
    }
}

fn enter(st: &mut IamKeyRotationStatus, phase: Phase, now: Timestamp) {
    st.phase = phase;
    if let Some(r) = st.rotation.as_mut() {
        r.phase_since = Time(now);
    }
}

fn next_rotation(st: &mut IamKeyRotationStatus, v: &ValidSpec) {
    st.next_rotation_time =
        st.active_key.as_ref().and_then(|k| k.created_at.as_ref()).map(|c| Time(plan::due_at(c.0, v)));
}

fn history(st: &mut IamKeyRotationStatus, old: Option<String>, new: Option<String>, outcome: &str, now: Timestamp) {
    let started = st.rotation.as_ref().map(|r| r.started_at.clone()).unwrap_or(Time(now));
    st.history.push(HistoryEntry {
        old_key_id: old,
        new_key_id: new,
        started_at: started,
        ended_at: Time(now),
        outcome: outcome.to_owned(),
    });
    let excess = st.history.len().saturating_sub(10);
    st.history.drain(..excess);
}

/// Reads the new key from the staging Secret.
async fn staged_key<I: Iam>(env: &Env<'_, I>) -> Result<AccessKey, Error> {
    let name = secrets::staging_name(&env.name());
    let s = env.secrets().get_opt(&name).await?;
    s.as_ref()
        .and_then(|s| secrets::read_key(&secrets::staging_target(&env.name()), s))
        .ok_or_else(|| Error::Unsafe(format!("the staging Secret {name} does not hold the new key")))
}

/// Performs `step`, updating `st`.
pub async fn perform<I: Iam>(env: &Env<'_, I>, st: &mut IamKeyRotationStatus, step: &Step) -> Result<Outcome, Error> {
    let now = env.now();
    match step {
        Step::Wait { requeue, .. } => Ok(Outcome { requeue: *requeue, ..Default::default() }),
        Step::Retry { requeue, .. } => Ok(Outcome { requeue: Some(*requeue), ..Default::default() }),
        Step::NeedIam | Step::NeedWorkloads => Err(Error::Internal("the plan asked for facts twice".into())),
        Step::Stall { .. } => Ok(Outcome::requeue(Duration::from_secs(300))),
        Step::Degrade { requeue, .. } => Ok(Outcome::requeue(*requeue)),
        Step::Adopt { key_id, created, partner } => {
            st.active_key = Some(KeyRef { access_key_id: key_id.clone(), created_at: Some(Time(*created)) });
            next_rotation(st, env.valid);
            let mut out =
                Outcome::default().event(false, "Adopted", format!("adopted key {key_id} found in the Secrets"));
            if let Some((p, active)) = partner {
                st.retiring_key = Some(RetiringKey {
                    access_key_id: p.clone(),
                    state: if *active { KeyState::Active } else { KeyState::Inactive },
                    deactivated_at: (!active).then_some(Time(now)),
                });
                st.rotation = Some(progress(Trigger::Scheduled, now));
                st.phase = if *active { Phase::Deactivating } else { Phase::Soaking };
                out = out.event(false, "AdoptedRetiringKey", format!("key {p}, created by this resource, is retired"));
            }
            Ok(out.committed())
        }
        Step::Fill { from, to } => {
            let api = env.secrets();
            let src_target = env.obj.spec.secrets.iter().find(|t| &t.name == from);
            let src = api.get_opt(from).await?;
            let key = match (src_target, src.as_ref()) {
                (Some(t), Some(s)) => secrets::read_key(t, s),
                _ => None,
            }
            .ok_or_else(|| Error::Unsafe(format!("Secret {from} cannot be read back to copy its key")))?;
            // Read again at act time: only the key rekey accounts for is ever copied, never one a
            // human put into the source Secret since the decision.
            let active = st.active_key.as_ref().map(|k| k.access_key_id.as_str());
            if active != Some(key.id.as_str()) {
                return Err(Error::Unsafe(format!(
                    "Secret {from} now holds {}, not the active key {}; nothing copied",
                    key.id,
                    active.unwrap_or("(none)")
                )));
            }
            for name in to {
                if let Some(t) = env.obj.spec.secrets.iter().find(|t| &t.name == name) {
                    secrets::write_target(&api, &env.name(), t, &key, &env.render_ctx(), false).await?;
                }
            }
            Ok(Outcome::requeue(Duration::from_secs(1)).event(
                false,
                "SecretsFilled",
                format!("wrote key {} into {}", key.id, to.join(", ")),
            ))
        }
        Step::Begin { trigger } => begin(env, st, *trigger).await,
        Step::Create => create(env, st).await,
        Step::DeleteOrphan { key_id } => {
            let keys = env.iam.list_keys(env.user()).await?;
            if keys.iter().any(|k| &k.id == key_id) {
                env.iam.delete_key(env.user(), key_id).await?;
                env.iam.untag_user(env.user(), key_id).await.ok();
            }
            st.pending = Some(Pending {
                started_at: Time(now),
                known_key_ids: keys.iter().filter(|k| &k.id != key_id).map(|k| k.id.clone()).collect(),
            });
            Ok(Outcome::requeue(Duration::ZERO).committed().event(
                true,
                "OrphanDeleted",
                format!("deleted key {key_id}, created by an interrupted attempt and held by nobody; creating again"),
            ))
        }
        Step::RecordNewKey { key_id, created } => {
            st.new_key = Some(KeyRef { access_key_id: key_id.clone(), created_at: Some(Time(*created)) });
            st.pending = None;
            enter(st, Phase::Verifying, now);
            Ok(Outcome::requeue(Duration::ZERO).committed())
        }
        Step::Verify { key_id } => verify(env, st, key_id).await,
        Step::Abandon { delete_key, reason, message } => {
            if let Some(k) = delete_key {
                let keys = env.iam.list_keys(env.user()).await?;
                let in_secret = env.observed.secrets.iter().any(|(_, s)| *s == SecretState::Holds(k.clone()));
                let is_active = st.active_key.as_ref().is_some_and(|a| &a.access_key_id == k);
                if !in_secret && !is_active && keys.iter().any(|x| &x.id == k) {
                    env.iam.delete_key(env.user(), k).await?;
                    env.iam.untag_user(env.user(), k).await.ok();
                }
            }
            secrets::delete_staging(&env.secrets(), &env.name()).await?;
            let old = st.active_key.as_ref().map(|k| k.access_key_id.clone());
            history(st, old, delete_key.clone(), "Abandoned", now);
            st.phase = Phase::Idle;
            st.pending = None;
            st.new_key = None;
            st.rotation = None;
            st.failed_attempts += 1;
            st.last_failure_time = Some(Time(now));
            Ok(Outcome::requeue(plan::backoff(st.failed_attempts)).committed().event(
                true,
                reason.as_str(),
                message.clone(),
            ))
        }
        Step::Distribute { key_id, secrets: names } => {
            let key = staged_key(env).await?;
            if &key.id != key_id {
                return Err(Error::Unsafe(format!("the staging Secret holds {}, not {key_id}", key.id)));
            }
            let api = env.secrets();
            for name in names {
                if let Some(t) = env.obj.spec.secrets.iter().find(|t| &t.name == name) {
                    secrets::write_target(&api, &env.name(), t, &key, &env.render_ctx(), false).await?;
                }
            }
            Ok(Outcome::requeue(Duration::ZERO).event(
                false,
                "Distributed",
                format!("wrote key {key_id} into {}", names.join(", ")),
            ))
        }
        Step::Advance { to } => Ok(advance(env, st, *to)),
        Step::Stamp { key_id, workloads: ids } => {
            for id in ids {
                workloads::stamp(env.client, &env.ns(), id, key_id, &env.manager()).await?;
            }
            Ok(Outcome::requeue(POLL).event(
                false,
                "Restarted",
                format!("restarting {} onto key {key_id}", ids.join(", ")),
            ))
        }
        Step::Deactivate { key_id } => deactivate(env, st, key_id).await,
        Step::Reactivate { key_id, broken } => {
            let keys = env.iam.list_keys(env.user()).await?;
            if keys.iter().any(|k| &k.id == key_id) {
                env.iam.set_key_active(env.user(), key_id, true).await?;
            }
            if let Some(r) = st.retiring_key.as_mut() {
                r.state = KeyState::Active;
                r.deactivated_at = None;
            }
            st.last_retire_request = env.observed.requests.retire.clone();
            Ok(Outcome::requeue(Duration::ZERO).committed().event(
                true,
                "RolledBack",
                format!("reactivated key {key_id}: {} broke after it was deactivated", broken.join(", ")),
            ))
        }
        Step::TrackSoak { below_since } => {
            if let Some(r) = st.rotation.as_mut() {
                r.below_since = below_since.iter().map(|(k, v)| (k.clone(), Time(*v))).collect();
            }
            Ok(Outcome::requeue(Duration::from_secs(1)))
        }
        Step::Delete { key_id } => delete(env, st, key_id).await,
        Step::Finish => finish(env, st).await,
    }
}

async fn begin<I: Iam>(env: &Env<'_, I>, st: &mut IamKeyRotationStatus, trigger: Trigger) -> Result<Outcome, Error> {
    let now = env.now();
    let api = env.secrets();
    // Preflight: everything that could make the staging write fail after CreateAccessKey is
    // checked now, while failing costs nothing.
    let owner = env.obj.controller_owner_ref(&()).ok_or_else(|| Error::Internal("resource has no uid".into()))?;
    secrets::ensure_staging(&api, &env.name(), owner).await?;
    secrets::clear_staging(&api, &env.name()).await?;
    let probe = AccessKey { id: "AKIAPREFLIGHTPROBE00".into(), secret: SecretString::from("preflight".to_owned()) };
    secrets::write_staging(&api, &env.name(), &probe, true).await?;
    for t in &env.obj.spec.secrets {
        secrets::write_target(&api, &env.name(), t, &probe, &env.render_ctx(), true).await?;
    }
    let keys = env.observed.iam.as_ref().map(|i| i.keys.clone()).unwrap_or_default();
    st.pending = Some(Pending { started_at: Time(now), known_key_ids: keys.iter().map(|k| k.id.clone()).collect() });
    st.rotation = Some(progress(trigger, now));
    st.phase = Phase::Creating;
    match trigger {
        Trigger::Requested => st.last_rotate_request = env.observed.requests.rotate.clone(),
        Trigger::Emergency => st.last_emergency_request = env.observed.requests.emergency.clone(),
        _ => {}
    }
    let why = match trigger {
        Trigger::Bootstrap => "no key in the Secrets yet",
        Trigger::Scheduled => "the active key is due",
        Trigger::Requested => "rotation requested by annotation",
        Trigger::Emergency => {
            "EMERGENCY rotation requested: the old key is retired as soon as the Secrets hold the new one"
        }
    };
    Ok(Outcome::requeue(Duration::ZERO).committed().event(false, "Creating", format!("rotation started: {why}")))
}

async fn create<I: Iam>(env: &Env<'_, I>, st: &mut IamKeyRotationStatus) -> Result<Outcome, Error> {
    let now = env.now();
    crate::failpoint!("before-create");
    let (key, created) = env.iam.create_key(env.user()).await?;
    crate::failpoint!("after-create");
    // Nothing between the create and this write: the secret exists nowhere else.
    secrets::write_staging(&env.secrets(), &env.name(), &key, false).await?;
    crate::failpoint!("after-staging");
    st.new_key = Some(KeyRef { access_key_id: key.id.clone(), created_at: Some(Time(created)) });
    st.pending = None;
    enter(st, Phase::Verifying, now);
    let mut out = Outcome::requeue(Duration::ZERO).event(false, "Created", format!("created key {}", key.id));
    // The owner claim (DESIGN rule 7); reported, never fatal (e.g. the 50-tag quota).
    if let Err(e) = env.iam.tag_user(env.user(), &key.id, &claim_value(&env.identity.owner())).await {
        out = out.event(true, "TagFailed", format!("could not tag IAM user with the claim on {}: {e}", key.id));
    }
    Ok(out)
}

async fn verify<I: Iam>(env: &Env<'_, I>, st: &mut IamKeyRotationStatus, key_id: &str) -> Result<Outcome, Error> {
    let now = env.now();
    let key = staged_key(env).await?;
    if key.id != key_id {
        return Err(Error::Unsafe(format!("the staging Secret holds {}, not {key_id}", key.id)));
    }
    let attempts = st.rotation.as_ref().map(|r| r.verify_attempts).unwrap_or(0);
    match env.iam.verify(&key).await? {
        Verification::Authenticated(arn) if user_of_arn(&arn) == Some(env.user()) => {
            enter(st, Phase::Distributing, now);
            Ok(Outcome::requeue(Duration::ZERO).committed().event(
                false,
                "Verified",
                format!("key {key_id} authenticates as {arn}"),
            ))
        }
        Verification::Authenticated(arn) => {
            Err(Error::Unsafe(format!("key {key_id} authenticates as {arn}, not as IAM user {}", env.user())))
        }
        Verification::Rejected(code) => {
            if let Some(r) = st.rotation.as_mut() {
                r.verify_attempts += 1;
            }
            // IAM takes seconds to propagate a new key: back off 1, 2, 4 ... 15 s.
            let wait = Duration::from_secs(1u64 << attempts.min(4)).min(Duration::from_secs(15));
            Ok(Outcome::requeue(wait).event(
                false,
                "VerificationPending",
                format!("key {key_id} not accepted yet ({code}); attempt {}", attempts + 1),
            ))
        }
    }
}

fn advance<I: Iam>(env: &Env<'_, I>, st: &mut IamKeyRotationStatus, to: Phase) -> Outcome {
    let now = env.now();
    let from = st.phase;
    if from == Phase::Distributing && to == Phase::RollingOut {
        if let Some(new) = st.new_key.take() {
            if let Some(old) = st.active_key.take() {
                st.retiring_key = Some(RetiringKey {
                    access_key_id: old.access_key_id,
                    state: KeyState::Active,
                    deactivated_at: None,
                });
            }
            st.active_key = Some(new);
            next_rotation(st, env.valid);
        }
        if let Some(r) = st.rotation.as_mut() {
            r.distributed_at = Some(Time(now));
        }
    }
    if to == Phase::Deactivating {
        st.last_retire_request = env.observed.requests.retire.clone();
    }
    enter(st, to, now);
    Outcome::requeue(Duration::ZERO).committed().event(false, &to.to_string(), format!("{from} -> {to}"))
}

async fn deactivate<I: Iam>(env: &Env<'_, I>, st: &mut IamKeyRotationStatus, key_id: &str) -> Result<Outcome, Error> {
    let now = env.now();
    let keys = env.iam.list_keys(env.user()).await?;
    let active = st.active_key.as_ref().map(|k| k.access_key_id.clone()).unwrap_or_default();
    // Never leave the user without an Active key, and never deactivate the key in the Secrets.
    if active == key_id || !keys.iter().any(|k| k.id == active && k.active) {
        return Err(Error::Unsafe(format!(
            "refusing to deactivate {key_id}: the key in the Secrets ({active}) is not Active in IAM"
        )));
    }
    if keys.iter().any(|k| k.id == key_id && k.active) {
        crate::failpoint!("before-deactivate");
        env.iam.set_key_active(env.user(), key_id, false).await?;
    }
    if let Some(r) = st.retiring_key.as_mut() {
        r.state = KeyState::Inactive;
        r.deactivated_at = Some(Time(now));
    }
    let emergency = st.rotation.as_ref().is_some_and(|r| r.trigger == Trigger::Emergency);
    if !emergency {
        // The soak baseline: Ready pods per workload as the old key goes away.
        let baseline: BTreeMap<String, i32> =
            env.observed.workloads.iter().flat_map(|w| w.items.iter()).map(|w| (w.id.clone(), w.ready)).collect();
        if let Some(r) = st.rotation.as_mut() {
            r.baseline = baseline;
            r.below_since.clear();
        }
        enter(st, Phase::Soaking, now);
    }
    Ok(Outcome::requeue(Duration::ZERO).committed().event(false, "Deactivated", format!("key {key_id} is Inactive")))
}

async fn delete<I: Iam>(env: &Env<'_, I>, st: &mut IamKeyRotationStatus, key_id: &str) -> Result<Outcome, Error> {
    let keys = env.iam.list_keys(env.user()).await?;
    let active = st.active_key.as_ref().map(|k| k.access_key_id.clone()).unwrap_or_default();
    match keys.iter().find(|k| k.id == key_id) {
        Some(k) if k.active => {
            // A human reactivated it to rescue a consumer: park, never delete an Active key.
            if let Some(r) = st.retiring_key.as_mut() {
                r.state = KeyState::Active;
                r.deactivated_at = None;
            }
            st.last_retire_request = env.observed.requests.retire.clone();
            enter(st, Phase::Soaking, env.now());
            return Ok(Outcome::requeue(Duration::ZERO).committed().event(
                true,
                "ParkedAfterRollback",
                format!("key {key_id} was reactivated outside rekey; it is not deleted"),
            ));
        }
        Some(_) => {
            if !keys.iter().any(|k| k.id == active && k.active) {
                return Err(Error::Unsafe(format!(
                    "refusing to delete {key_id}: the key in the Secrets ({active}) is not Active in IAM"
                )));
            }
            crate::failpoint!("before-delete");
            env.iam.delete_key(env.user(), key_id).await?;
        }
        None => {}
    }
    if let Err(e) = env.iam.untag_user(env.user(), key_id).await {
        tracing::warn!(error = %e, key = %key_id, "could not remove the claim tag");
    }
    let mut out = finish(env, st).await?;
    out.events.insert(0, (false, "Deleted".into(), format!("deleted key {key_id}")));
    Ok(out)
}

async fn finish<I: Iam>(env: &Env<'_, I>, st: &mut IamKeyRotationStatus) -> Result<Outcome, Error> {
    let now = env.now();
    secrets::delete_staging(&env.secrets(), &env.name()).await?;
    let old = st.retiring_key.take().map(|r| r.access_key_id);
    let new = st.active_key.as_ref().map(|k| k.access_key_id.clone());
    if st.rotation.is_some() {
        // A first key replaces nothing: it is recorded, not counted as a rotation.
        if old.is_some() {
            history(st, old, new.clone(), "Completed", now);
            st.rotations += 1;
            st.last_rotation_time = Some(Time(now));
        } else {
            history(st, None, new.clone(), "Bootstrapped", now);
        }
    }
    st.phase = Phase::Idle;
    st.rotation = None;
    st.pending = None;
    st.new_key = None;
    st.failed_attempts = 0;
    st.last_failure_time = None;
    next_rotation(st, env.valid);
    Ok(Outcome::requeue(Duration::ZERO).committed().event(
        false,
        "Idle",
        format!("rotation complete; key {} in use", new.unwrap_or_default()),
    ))
}
