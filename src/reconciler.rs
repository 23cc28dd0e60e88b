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
use crate::api::{IamKeyRotation, IamKeyRotationStatus};
use crate::cache::Cached;
use crate::context::Context;
use crate::error::Error;
use crate::iam::Iam;
use crate::ownership::Identity;
use crate::plan::cleanup::{CleanupInput, cleanup};
use crate::plan::snapshot::{Observed, SecretState};
use crate::plan::{self, Decision, Gates, StallReason, Step};
use crate::status::{self, Verdict};
use crate::validate::{ValidSpec, validate_for};

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

    /// The pipeline for a live resource.
    pub async fn apply(self) -> Result<Action, Error> {
        let requests = crate::observe::requests(&self.obj);
        let mut st = status::prepare(&self.before, self.obj.metadata.generation, &requests, &self.obj.spec.user_name);
        let valid = match validate_for(&self.obj.spec, &self.identity.name) {
            Ok(v) => v,
            Err(e) => {
                let stall =
                    Decision { step: Step::Stall { reason: StallReason::InvalidSpec, message: e.0 }, caveat: None };
                return self.commit(st, &stall, Outcome::default()).await;
            }
        };
        let iam = self.ctx.iam_for(&self.obj).await;
        let live = self.ctx.names_in(&self.identity.namespace);
        let observed = match crate::observe::basic(&self.ctx.client, &self.obj, self.now, &live).await {
            Ok(o) => o,
            Err(e) => return self.fail("Observe", e).await,
        };
        let (decision, observed) = match self.decide(&valid, &st, iam.as_ref(), observed).await {
            Ok(d) => d,
            Err((what, e)) => return self.fail(what, e).await,
        };
        let iam = iam.unwrap_or_else(|| self.ctx.iam.clone());
        let region = self.region();
        let env = Env {
            client: &self.ctx.client,
            iam: &iam,
            obj: &self.obj,
            valid: &valid,
            observed: &observed,
            identity: &self.identity,
            region: &region,
        };
        info!(step = decision.step.name(), phase = %st.phase, "performing");
        match act::perform(&env, &mut st, &decision.step).await {
            Ok(out) => self.commit(st, &decision, out).await,
            Err(e) => self.fail(decision.step.name(), e).await,
        }
    }

    fn region(&self) -> String {
        self.obj.spec.aws.as_ref().and_then(|a| a.region.clone()).unwrap_or_else(|| self.ctx.config.region.clone())
    }

    fn gates(&self) -> Gates {
        let role = self.obj.spec.aws.as_ref().and_then(|a| a.role_arn.clone());
        Gates {
            denied_role: role.filter(|r| !crate::ownership::role_allowed(&self.ctx.config.allowed_role_arns, r)),
            slot_free: self.ctx.rotation_slot_free(&self.obj),
            max_rotations: self.ctx.config.max_concurrent_rotations,
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
    ) -> Result<(Decision, Observed), (&'static str, Error)> {
        let gates = self.gates();
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
                (Step::NeedIam, Some(iam)) if observed.iam.is_none() => {
                    let (facts, other) = self.gather_iam(iam, st, valid).await.map_err(|e| ("ObserveIam", e))?;
                    observed.iam = Some(facts);
                    observed.other_resource = other;
                    observed.resources = Some(self.ctx.resource_names());
                }
                (Step::NeedWorkloads, _) if observed.workloads.is_none() => {
                    observed.workloads = Some(self.gather_workloads(st).await.map_err(|e| ("ObserveWorkloads", e))?);
                }
                _ => return Ok((decision, observed)),
            }
        }
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

    /// TOUCHES THE CLUSTER (reads).
    async fn gather_workloads(&self, st: &IamKeyRotationStatus) -> Result<plan::WorkloadsState, Error> {
        let key = st.active_key.as_ref().map(|k| k.access_key_id.as_str());
        let w = &self.obj.spec.workloads;
        let names = crate::observe::secret_names(&self.obj);
        crate::workloads::observe(&self.ctx.client, &self.identity.namespace, &w.targets, w.discover, &names, key).await
    }

    /// The one way out: conditions from the verdict, metrics, the status write (when it changed),
    /// then the step's Events, and when to look again.
    async fn commit(&self, mut st: IamKeyRotationStatus, decision: &Decision, out: Outcome) -> Result<Action, Error> {
        let verdict = Verdict::of(decision);
        st.conditions = status::conditions(&st, &verdict, self.obj.metadata.generation, self.now);
        self.ctx.metrics.record(&self.obj, &self.before, &st, &decision.step, self.now);
        self.warn_on_change(&verdict, &decision.step).await;
        if st != self.before {
            status::write(&self.api, &self.obj, &st, out.precondition).await?;
            crate::failpoint!("after-status");
        }
        for n in out.events {
            self.ctx.events.publish(&self.obj, n.warning, &n.reason, n.message, decision.step.name());
        }
        Ok(match out.requeue {
            Some(d) if d.is_zero() => Action::requeue(Duration::from_millis(100)),
            Some(d) => Action::requeue(d.min(plan::IDLE_RESYNC)),
            None => Action::requeue(plan::IDLE_RESYNC),
        })
    }

    /// Warns once when a stall or degradation starts, not on every look.
    async fn warn_on_change(&self, verdict: &Verdict, step: &Step) {
        let was = |t: &str| {
            self.before.conditions.iter().find(|c| c.type_ == t).map(|c| (c.status.clone(), c.reason.clone()))
        };
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
            failed.conditions = status::conditions(&failed, &v, self.obj.metadata.generation, self.now);
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
        let held =
            crate::observe::basic(&self.ctx.client, &self.obj, self.now, &Default::default()).await.ok().map(|o| {
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
        // Never block deletion (or the namespace's) on IAM being unreachable: report and let go.
        Ok(Action::await_change())
    }
}
