//! One reconcile, as a pipeline:
//!
//! 1. `load`: re-read the resource from the apiserver, never the cache (reads the cluster);
//! 2. `status::prepare` and `validate` (pure);
//! 3. `observe`: the Secrets, and IAM or the workloads when the plan asks for them (reads the
//!    cluster and IAM);
//! 4. `plan::decide` (pure: every decision, gates included);
//! 5. `act::perform`: exactly one step (writes);
//! 6. `commit`: conditions (pure), the status write, Events, metrics (writes the cluster).
//!
//! The status changes in `act` and nowhere else but `commit` (conditions) and `fail` (the
//! failure count); all three go out through `commit`.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kube::api::Api;
use kube::runtime::controller::Action;
use tracing::{info, warn};

use crate::act::{self, Env, Outcome};
use crate::api::{IamKeyRotation, IamKeyRotationStatus, Phase};
use crate::cache::Cached;
use crate::context::Context;
use crate::error::Error;
use crate::iam::Iam;
use crate::ownership::Identity;
use crate::plan::cleanup::{CleanupInput, cleanup};
use crate::plan::snapshot::{Observed, SecretState};
use crate::plan::{self, Decision, Gates, StallReason, Step};
use crate::status::{self, Verdict};
use crate::validate::{ValidSpec, validate_resource};

/// At most this many steps in one reconcile (a rotation's steps up to the restart are six).
const MAX_STEPS: usize = 8;

/// What the steps of one reconcile asked for, gathered until the status is written.
#[derive(Default)]
struct Progress {
    /// Each step's Events, with the step's name.
    events: Vec<(&'static str, act::Note)>,
    precondition: bool,
    requeue: Option<Duration>,
}

impl Progress {
    fn add(&mut self, step: &'static str, out: Outcome) {
        self.events.extend(out.events.into_iter().map(|n| (step, n)));
        self.precondition |= out.precondition;
        self.requeue = out.requeue;
    }
}

/// The retiring key is switched off (or about to be deleted): nothing of this rotation is urgent.
fn leaked_key_off(st: &IamKeyRotationStatus) -> bool {
    matches!(st.phase, Phase::Soaking | Phase::Deleting)
        || st.retiring_key.as_ref().is_some_and(|r| r.state == crate::api::KeyState::Inactive)
}

/// How long a reconcile that gave way to leaked keys waits before it looks again.
const GIVE_WAY: Duration = Duration::from_secs(10);

/// Whether this reconcile may end, instead of calling IAM for a routine step, to give its slot and
/// the AWS budget to leaked keys: another reconcile is at work on a leaked key of the same account
/// that may still be Active (or its calls wait for the budget). Reconciles are at most 32 at once;
/// without this, routine steps (deletions of keys already Inactive) took half of the AWS budget
/// while leaked keys waited (1,000 emergencies: 108–111 s). Only IAM reads and steps that call IAM
/// give way (Kubernetes-only steps such as writing a reverted Secret back never wait), and never a
/// rotation whose write-ahead marker stands (a key appearing meanwhile would look like its orphan),
/// one in Soaking (a rollback is decided there) or one repairing a reverted Secret.
fn gives_way(st: &IamKeyRotationStatus, urgent: bool, leaked_keys_wait: bool) -> bool {
    let repairing = st.rotation.as_ref().is_some_and(|r| r.reverting || r.reverts > 0);
    leaked_keys_wait && !urgent && st.phase != Phase::Soaking && st.pending.is_none() && !repairing
}

/// Whether the next step follows in the same reconcile: the step asked to go on at once and is not
/// the end of an attempt (a finished or abandoned rotation, adoption, a report).
fn goes_on(step: &Step, out: &Outcome) -> bool {
    out.requeue.is_some_and(|d| d.is_zero())
        && !matches!(step, Step::Finish | Step::Abandon { .. } | Step::Adopt { .. })
}

/// The write-ahead points: committed before the step after them is performed.
fn write_ahead(step: &Step) -> bool {
    matches!(step, Step::Begin { .. } | Step::RenewMarker { .. } | Step::DeleteOrphan { .. } | Step::MarkRevert { .. })
}

/// Whether the step makes IAM calls that can wait for leaked keys (a rollback never waits).
fn routine_aws(step: &Step) -> bool {
    touches_iam(step) && !matches!(step, Step::Reactivate { .. })
}

/// Whether the step changed anything in IAM (then the IAM facts are read again).
fn touches_iam(step: &Step) -> bool {
    matches!(
        step,
        Step::Create
            | Step::DeleteOrphan { .. }
            | Step::Abandon { .. }
            | Step::Deactivate { .. }
            | Step::Reactivate { .. }
            | Step::Delete { .. }
            | Step::Adopt { .. }
    )
}

/// One reconcile of one resource.
pub struct Reconciler<'a, I: Iam> {
    ctx: &'a Context<I>,
    api: Api<IamKeyRotation>,
    obj: IamKeyRotation,
    before: IamKeyRotationStatus,
    identity: Identity,
    now: Timestamp,
}

impl<'a, I: Iam> Reconciler<'a, I> {
    /// TOUCHES THE CLUSTER (a GET). None when the resource is gone.
    pub async fn load(ctx: &'a Context<I>, cached: &Cached) -> Result<Option<Self>, Error> {
        let ns = cached.namespace().unwrap_or_default();
        let api: Api<IamKeyRotation> = Api::namespaced(ctx.client.clone(), &ns);
        // Decide on the apiserver's current object, never on a possibly stale cache.
        let Some(obj) = api.get_opt(&cached.name_any()).await? else { return Ok(None) };
        let identity = Identity { cluster: ctx.config.cluster.clone(), namespace: ns, name: obj.name_any() };
        let before = obj.status.clone().unwrap_or_default();
        Ok(Some(Self { ctx, api, obj, before, identity, now: Timestamp::now() }))
    }

    /// The pipeline for a live resource. Steps follow one another in the same reconcile while each
    /// asks to go on at once (up to MAX_STEPS): their status changes are written once at the end,
    /// except at a write-ahead point (the marker before CreateAccessKey), which is written before
    /// the next step. Every step is decided on fresh reads of the Secrets (and of the workloads,
    /// when the decision needs them); IAM facts are kept only across steps that changed nothing in IAM.
    pub async fn apply(mut self) -> Result<Action, Error> {
        let requests = crate::observe::requests(&self.obj);
        let st = status::prepare(&self.before, self.obj.metadata.generation, &requests, &self.obj.spec.user_name);
        let valid = match validate_resource(&self.obj) {
            Ok(v) => v,
            Err(e) => {
                let stall =
                    Decision { step: Step::Stall { reason: StallReason::InvalidSpec, message: e.0 }, caveat: None };
                let mut st = st;
                self.conclude(&mut st, &stall);
                return self.commit(st, &stall, Progress::default()).await;
            }
        };
        let mut st = st;
        st.next_rotation_time = status::next_rotation(&st, &valid);
        // A leaked key's rotation goes before routine IAM calls, its reads included.
        let emergency =
            st.emergency() || (requests.emergency.is_some() && requests.emergency != st.last_emergency_request);
        let iam = self.ctx.iam_for(&self.obj).await;
        self.run_steps(st, &valid, iam.as_ref(), emergency).await
    }

    async fn run_steps(
        &mut self,
        mut st: IamKeyRotationStatus,
        valid: &ValidSpec,
        iam: Option<&I>,
        emergency: bool,
    ) -> Result<Action, Error> {
        let mut done = Progress::default();
        let mut last: Option<Decision> = None;
        let mut kept_iam: Option<Observed> = None;
        let mut urgent_work = None;
        for _ in 0..MAX_STEPS {
            // An emergency's calls go first only while the leaked key may still be Active: its
            // deletion and cleanup wait their turn behind other leaked keys' deactivations.
            let urgent = emergency && !leaked_key_off(&st);
            let account = self.account();
            if !urgent {
                urgent_work = None;
            } else if urgent_work.is_none() {
                urgent_work = Some(self.ctx.urgent_work(account));
            }
            let step_iam = iam.map(|i| if urgent { i.urgent() } else { i.routine() });
            let iam = step_iam.as_ref();
            let leaked_keys_wait = self.ctx.urgent_in_flight(account) || iam.is_some_and(I::urgent_waiting);
            let may_give_way = gives_way(&st, urgent, leaked_keys_wait);
            // Neither an idle look with no request (after a finished rotation's own status write)
            // nor the deletion after an emergency's leaked key is off is even read: every look
            // costs the slot three apiserver reads, and 1,000 of them kept the slots from 94
            // leaked keys for 34 s.
            let follow_up = (st.phase == Phase::Idle && !self.requested()) || (emergency && !urgent);
            if may_give_way && follow_up {
                if last.is_none() {
                    return Ok(Action::requeue(GIVE_WAY));
                }
                done.requeue = Some(GIVE_WAY);
                break;
            }
            let (decision, observed) = match self.look(valid, &st, iam, kept_iam.take(), may_give_way).await {
                Ok(Some(d)) if !(may_give_way && routine_aws(&d.0.step)) => d,
                Ok(_) => {
                    tracing::debug!("gave way to leaked keys before routine AWS calls");
                    if last.is_none() {
                        return Ok(Action::requeue(GIVE_WAY));
                    }
                    done.requeue = Some(GIVE_WAY);
                    break;
                }
                Err((what, e)) => return self.stop(st, last, done, what, e).await,
            };
            let before_step = st.clone();
            let out = match self.perform(valid, iam, &observed, &mut st, &decision.step).await {
                Ok(out) => out,
                Err(e) => return self.stop(st, last, done, decision.step.name(), e).await,
            };
            self.ctx.metrics.step(&self.obj, &before_step, &st, &decision.step, self.now);
            self.conclude(&mut st, &decision);
            let again = goes_on(&decision.step, &out);
            done.add(decision.step.name(), out);
            if again && write_ahead(&decision.step) {
                // The marker must be in the apiserver before the call it stands for.
                let ahead = std::mem::take(&mut done);
                if let Err(e) = self.commit_progress(&st, &decision, ahead).await {
                    return self.fail(decision.step.name(), e).await;
                }
            }
            kept_iam = (again && !touches_iam(&decision.step)).then_some(observed);
            last = Some(decision);
            if !again {
                break;
            }
        }
        let Some(decision) = last else { return Err(Error::Internal("no step was decided".into())) };
        self.commit(st, &decision, done).await
    }

    /// Reads the Secrets afresh and decides, gathering what the plan asks for.
    async fn look(
        &self,
        valid: &ValidSpec,
        st: &IamKeyRotationStatus,
        iam: Option<&I>,
        kept: Option<Observed>,
        may_give_way: bool,
    ) -> Result<Option<(Decision, Observed)>, (&'static str, Error)> {
        let live = |name: &str| self.ctx.exists(&self.identity.namespace, name);
        let mut observed =
            crate::observe::basic(&self.ctx.client, &self.obj, self.now, &live).await.map_err(|e| ("Observe", e))?;
        if let Some(k) = kept {
            observed.iam = k.iam;
            observed.other_resource = k.other_resource;
            observed.resources = k.resources;
        }
        self.decide(valid, st, iam, observed, may_give_way).await
    }

    /// Performs one step (act).
    async fn perform(
        &self,
        valid: &ValidSpec,
        iam: Option<&I>,
        observed: &Observed,
        st: &mut IamKeyRotationStatus,
        step: &Step,
    ) -> Result<Outcome, Error> {
        let iam = iam.cloned().unwrap_or_else(|| self.ctx.iam.clone());
        let region = self.region();
        let env = Env {
            client: &self.ctx.client,
            iam: &iam,
            obj: &self.obj,
            valid,
            observed,
            identity: &self.identity,
            region: &region,
        };
        let ns = &self.identity.namespace;
        // Remembered for the namespaces' fair shares of the rotation slots (`plan::slots`).
        let me = format!("{ns}/{}", self.identity.name);
        self.ctx.pacing.waits_for_rotation_slot(&me, matches!(step, Step::WaitForSlot { .. }), self.now);
        let cooldown = if st.emergency() { Duration::ZERO } else { self.ctx.config.rollout_cooldown };
        if matches!(step, Step::Stamp { .. }) && !self.ctx.pacing.reserve(ns, cooldown, self.now) {
            // Another rotation of the namespace took this restart since the snapshot: look again.
            return Ok(Outcome { requeue: Some(Duration::from_secs(1)), ..Default::default() });
        }
        info!(step = step.name(), phase = %st.phase, "performing");
        let out = act::perform(&env, st, step).await?;
        if matches!(step, Step::Revert { .. }) {
            self.ctx.pacing.restarted(ns, self.now);
        }
        Ok(out)
    }

    /// A step failed after others succeeded in this reconcile: what they did is written first, so
    /// the failure record (and the retry) starts from it.
    async fn stop(
        &mut self,
        st: IamKeyRotationStatus,
        last: Option<Decision>,
        done: Progress,
        what: &str,
        e: Error,
    ) -> Result<Action, Error> {
        if let Some(decision) = last
            && let Err(we) = self.commit_progress(&st, &decision, done).await
        {
            warn!(error = %we, "could not record the steps done before a failure");
        }
        self.fail(what, e).await
    }

    /// Whether a rotation request (rekey.dev/rotate or rekey.dev/rotate-emergency) waits to be acted on.
    fn requested(&self) -> bool {
        let r = crate::observe::requests(&self.obj);
        (r.rotate.is_some() && r.rotate != self.before.last_rotate_request)
            || (r.emergency.is_some() && r.emergency != self.before.last_emergency_request)
    }

    /// The AWS account this resource's calls go to ("" for the home account), as the budgets key it.
    fn account(&self) -> &str {
        let role = self.obj.spec.aws.as_ref().and_then(|a| a.role_arn.as_deref());
        role.map_or("", crate::budget::account_of)
    }

    fn region(&self) -> String {
        self.obj.spec.aws.as_ref().and_then(|a| a.region.clone()).unwrap_or_else(|| self.ctx.config.region.clone())
    }

    fn gates(&self, st: &IamKeyRotationStatus) -> Gates {
        let role = self.obj.spec.aws.as_ref().and_then(|a| a.role_arn.clone());
        let (ns, cfg) = (&self.identity.namespace, &self.ctx.config);
        let me = format!("{ns}/{}", self.identity.name);
        let rolling = st.phase == Phase::RollingOut;
        // Both read every cached resource: only when pacing is on (a look must not cost
        // O(resources) otherwise).
        let slot = match cfg.max_concurrent_rollouts {
            0 => Ok(()),
            max => self.ctx.pacing.slot(&me, rolling, &self.ctx.rolling_out(), max),
        };
        Gates {
            rollout_slot_holders: slot.err().unwrap_or_default(),
            max_rollouts: cfg.max_concurrent_rollouts,
            restart_not_before: self.ctx.pacing.not_before(ns, cfg.rollout_cooldown),
            restart_cooldown: cfg.rollout_cooldown,
            handing_over: if cfg.rollout_cooldown.is_zero() {
                Vec::new()
            } else {
                self.ctx.handing_over(ns, &self.identity.name)
            },
            denied_role: role.filter(|r| !crate::ownership::role_allowed(&self.ctx.config.allowed_role_arns, r)),
            rotation_slots: self.ctx.rotation_slots(&self.obj, &self.ctx.pacing.waiting_namespaces(self.now)),
            watched: self.ctx.config.namespaces.clone(),
        }
    }

    /// Decides, gathering the IAM and workload facts the plan asks for (each at most once).
    async fn decide(
        &self,
        valid: &ValidSpec,
        st: &IamKeyRotationStatus,
        iam: Option<&I>,
        mut observed: Observed,
        may_give_way: bool,
    ) -> Result<Option<(Decision, Observed)>, (&'static str, Error)> {
        let gates = self.gates(st);
        loop {
            let decision = plan::decide(&plan::Input {
                spec: &self.obj.spec,
                valid,
                status: st,
                observed: &observed,
                identity: &self.identity,
                gates: &gates,
            });
            match (&decision.step, iam) {
                // Routine IAM reads wait for the budget behind leaked keys: the slot goes to them.
                (Step::NeedIam, Some(_)) if observed.iam.is_none() && may_give_way => return Ok(None),
                (Step::NeedIam, Some(iam)) if observed.iam.is_none() => {
                    let (facts, other) = self.gather_iam(iam, st, valid).await.map_err(|e| ("ObserveIam", e))?;
                    observed.resources = Some(self.claimants(&facts.tags));
                    observed.iam = Some(facts);
                    observed.other_resource = other;
                }
                (Step::NeedWorkloads, _) if observed.workloads.is_none() => {
                    observed.workloads = Some(
                        self.gather_workloads(st, observed.written_at).await.map_err(|e| ("ObserveWorkloads", e))?,
                    );
                }
                _ => return Ok(Some((decision, observed))),
            }
        }
    }

    /// The resources of this cluster named by the user's claims that exist ("namespace/name").
    fn claimants(&self, tags: &std::collections::BTreeMap<String, String>) -> std::collections::BTreeSet<String> {
        let cluster = format!("{}/", self.ctx.config.cluster);
        crate::ownership::claims(tags)
            .into_values()
            .filter_map(|owner| owner.strip_prefix(&cluster).map(str::to_owned))
            .filter(|rest| rest.split_once('/').is_some_and(|(ns, name)| self.ctx.exists(ns, name)))
            .collect()
    }

    /// TOUCHES IAM (reads).
    async fn gather_iam(
        &self,
        iam: &I,
        st: &IamKeyRotationStatus,
        valid: &ValidSpec,
    ) -> Result<(plan::IamState, Option<String>), Error> {
        let me = self.ctx.whoami().await?;
        let candidates = self.ctx.owner_candidates().await?;
        crate::observe::iam(
            &candidates,
            &self.ctx.config.cluster,
            iam,
            me,
            &self.obj,
            st,
            !valid.require_unused_for.is_zero(),
        )
        .await
    }

    /// TOUCHES THE CLUSTER (reads). `written_at`: when the targets were last written, by the
    /// apiserver's clock — the one pods' creation times are in (the operator's may be skewed).
    async fn gather_workloads(
        &self,
        st: &IamKeyRotationStatus,
        written_at: Option<k8s_openapi::jiff::Timestamp>,
    ) -> Result<plan::WorkloadsState, Error> {
        let rotation = st.rotation.as_ref();
        let handed_over = rotation.and_then(|r| r.handed_over_at.as_ref());
        let key = crate::workloads::KeyFacts {
            id: st.active_key.as_ref().map(|k| k.access_key_id.as_str()),
            restart: rotation.and_then(|r| r.restart.as_deref()),
            handed_over: handed_over.and(written_at),
        };
        let w = &self.obj.spec.workloads;
        let names = crate::observe::secret_names(&self.obj);
        crate::workloads::observe(&self.ctx.client, &self.identity.namespace, &w.targets, w.discover, &names, &key)
            .await
    }

    /// The one way out: conditions from the verdict, the status write (when it changed), then the
    /// steps' Events, and when to look again.
    async fn commit(&mut self, st: IamKeyRotationStatus, decision: &Decision, done: Progress) -> Result<Action, Error> {
        // Ready turns False the moment the key passes maxKeyAge, even if nothing else happens then
        // (suspended, or a rotation stuck): look again at that moment.
        let max_key_age = self.obj.spec.max_key_age.parse().ok();
        let expiry = st.active_key.as_ref().and_then(|k| status::until_expiry(k, max_key_age, self.now));
        let requeue = done.requeue.unwrap_or(plan::IDLE_RESYNC).min(plan::IDLE_RESYNC);
        let requeue = expiry.map_or(requeue, |e| requeue.min(e + Duration::from_secs(1)));
        self.commit_progress(&st, decision, done).await?;
        Ok(if requeue.is_zero() { Action::requeue(Duration::from_millis(100)) } else { Action::requeue(requeue) })
    }

    /// What a step concluded, into the conditions (each step's in turn: a rollback's Degraded stands
    /// beside the stall that follows it); a stall or degradation that starts is warned of once.
    fn conclude(&self, st: &mut IamKeyRotationStatus, decision: &Decision) {
        let verdict = Verdict::of(decision);
        let was = st.conditions.clone();
        let max_key_age = self.obj.spec.max_key_age.parse().ok();
        st.conditions = status::conditions(st, &verdict, max_key_age, self.obj.metadata.generation, self.now);
        self.warn_on_change(&was, &verdict, &decision.step);
    }

    /// Writes the status, then publishes the Events; afterwards this reconcile goes on from what
    /// was written.
    async fn commit_progress(
        &mut self,
        st: &IamKeyRotationStatus,
        _decision: &Decision,
        done: Progress,
    ) -> Result<(), Error> {
        let st = st.clone();
        self.ctx.metrics.resource(&self.obj, &st);
        if status::worth_writing(&self.before, &st) {
            self.obj = status::write(&self.api, &self.obj, &st, done.precondition).await?;
            self.before = st;
            crate::failpoint!("after-status");
        }
        // The soak is timed (deleteAfter) and polled each second while a workload is below its
        // baseline: no watch through its hour.
        let waits_on_pods = matches!(self.before.phase, Phase::RollingOut | Phase::Deactivating | Phase::Deleting);
        self.ctx.nudger.waiting(&self.identity.namespace, &self.identity.name, waits_on_pods);
        for (action, n) in done.events {
            self.ctx.events.publish(&self.obj, n.warning, &n.reason, n.message, action);
        }
        Ok(())
    }

    /// Warns once when a stall or degradation starts, not on every look.
    fn warn_on_change(
        &self,
        before: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
        verdict: &Verdict,
        step: &Step,
    ) {
        let was = |t: &str| before.iter().find(|c| c.type_ == t).map(|c| (c.status.clone(), c.reason.clone()));
        match verdict {
            Verdict::Stalled(r, m) if was("Stalled") != Some(("True".into(), r.to_string())) => {
                self.ctx.events.publish(&self.obj, true, r.into(), m.clone(), "Stall");
            }
            // An abandoned attempt has its own Event.
            Verdict::Degraded(r, m)
                if was("Degraded") != Some(("True".into(), r.to_string())) && !matches!(step, Step::Abandon { .. }) =>
            {
                self.ctx.events.publish(&self.obj, true, r.into(), m.clone(), "Degrade");
            }
            _ => {}
        }
    }

    /// A failed step: the failure count and time go into status (the backoff survives restarts),
    /// missing RBAC into the conditions, the failure into an Event; then the error is returned.
    async fn fail(&self, what: &str, e: Error) -> Result<Action, Error> {
        if !matches!(e, Error::Conflict) {
            let mut failed = status::failed(&self.before, self.obj.metadata.generation, self.now);
            if let (Error::NotCreated(_), Some(p)) = (&e, failed.pending.as_mut()) {
                p.in_flight = false;
            }
            let v = Verdict::of_failure(what, &e, failed.failed_attempts);
            let max_key_age = self.obj.spec.max_key_age.parse().ok();
            failed.conditions = status::conditions(&failed, &v, max_key_age, self.obj.metadata.generation, self.now);
            self.ctx.events.publish(&self.obj, true, e.category(), format!("{what} failed: {e}"), what);
            if let Err(we) = status::write(&self.api, &self.obj, &failed, false).await {
                warn!(error = %we, "could not record the failure in status");
            }
        }
        self.ctx.metrics.reconcile_error(e.category());
        warn!(step = what, category = e.category(), error = %e, "step failed");
        Err(e)
    }

    /// Deletion, by `deletionPolicy`, decided by `plan::cleanup` on fresh reads. Works with an
    /// invalid spec, a missing user or withdrawn consent, and never blocks namespace deletion for
    /// longer than one reconcile.
    pub async fn cleanup(self) -> Result<Action, Error> {
        // The keys belong to the user status tracks, even if spec.userName was edited since.
        let user = self.before.user_name.clone().unwrap_or_else(|| self.obj.spec.user_name.clone());
        let held = crate::observe::basic(&self.ctx.client, &self.obj, self.now, &|_: &str| false).await.ok().map(|o| {
            o.secrets
                .into_iter()
                .filter_map(|(_, s)| match s {
                    SecretState::Holds(id) => Some(id),
                    _ => None,
                })
                .collect()
        });
        let mut problems = Vec::new();
        let iam = self.ctx.iam_for(&self.obj).await;
        let facts = match &iam {
            None => {
                problems.push("spec.aws.roleArn is not allowed by this operator: no IAM call was made".to_owned());
                None
            }
            Some(iam) => match (iam.list_keys(&user).await, iam.user_tags(&user).await) {
                (Ok(keys), Ok(tags)) => Some((keys, tags.unwrap_or_default())),
                (Err(e), _) | (_, Err(e)) => {
                    problems.push(e.to_string());
                    None
                }
            },
        };
        let owner = self.identity.owner();
        let input = CleanupInput {
            policy: self.obj.spec.deletion_policy,
            status: &self.before,
            owner: &owner,
            held,
            iam: facts,
        };
        let decided = cleanup(&input);
        if let Some(iam) = &iam {
            problems.extend(act::cleanup(&self.ctx.client, iam, &self.obj, &user, &decided).await);
        } else {
            problems.extend(decided.kept.iter().cloned());
        }
        let note = format!(
            "deleted ({}): keys deleted: [{}]{}",
            self.obj.spec.deletion_policy,
            decided.delete_keys.join(", "),
            if problems.is_empty() {
                String::new()
            } else {
                format!("; left behind after errors: {}", problems.join("; "))
            }
        );
        self.ctx.events.publish(&self.obj, !problems.is_empty(), "Deleted", note, "Cleanup");
        self.ctx.metrics.forget(&self.identity.namespace, &self.identity.name);
        self.ctx.nudger.waiting(&self.identity.namespace, &self.identity.name, false);
        // Never block deletion (or the namespace's) on IAM being unreachable: report and let go.
        Ok(Action::await_change())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{KeyState, RetiringKey};

    #[test]
    fn an_emergency_is_urgent_only_until_the_leaked_key_is_off() {
        let at = |phase: Phase, state: KeyState| IamKeyRotationStatus {
            phase,
            retiring_key: Some(RetiringKey { access_key_id: "AKIAOLD".into(), state, deactivated_at: None }),
            ..Default::default()
        };
        for phase in [Phase::Idle, Phase::Creating, Phase::Verifying, Phase::Distributing, Phase::RollingOut] {
            assert!(!leaked_key_off(&at(phase, KeyState::Active)), "{phase}");
        }
        assert!(!leaked_key_off(&at(Phase::Deactivating, KeyState::Active)));
        assert!(leaked_key_off(&at(Phase::Deactivating, KeyState::Inactive)));
        assert!(leaked_key_off(&at(Phase::Soaking, KeyState::Inactive)));
        assert!(leaked_key_off(&at(Phase::Deleting, KeyState::Inactive)));
    }

    #[test]
    fn only_routine_work_gives_way_to_waiting_leaked_keys_and_never_a_soak() {
        let at = |phase: Phase| IamKeyRotationStatus { phase, ..Default::default() };
        assert!(gives_way(&at(Phase::Deleting), false, true));
        assert!(gives_way(&at(Phase::Idle), false, true));
        assert!(!gives_way(&at(Phase::Deleting), false, false), "nothing urgent waits");
        assert!(!gives_way(&at(Phase::Deactivating), true, true), "a leaked key's own step");
        assert!(!gives_way(&at(Phase::Soaking), false, true), "a rollback may be decided");
        let mut marked = at(Phase::Creating);
        marked.pending = Some(crate::api::Pending::attempt(Timestamp::UNIX_EPOCH, vec![]));
        assert!(!gives_way(&marked, false, true), "a standing marker");
        let mut repairing = at(Phase::RollingOut);
        let mut r = crate::api::RotationProgress::start(crate::api::Trigger::Scheduled, Timestamp::UNIX_EPOCH);
        r.reverts = 1;
        repairing.rotation = Some(r);
        assert!(!gives_way(&repairing, false, true), "a reverted Secret being repaired");
    }
}
