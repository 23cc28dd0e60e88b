//! Wiring: watches, the finalizer, the reconcile pipeline, the error policy.
//!
//! reconcile = re-read the resource (not the cache) → validate (pure) → observe (reads) →
//! plan (pure; may ask for IAM or workload facts, gathered on demand) → act (one step) →
//! report (status with server-side apply, Events).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::Store;
use kube::runtime::{Controller, watcher};
use tracing::{Instrument as _, info, info_span, warn};

use crate::act::{self, Env, Outcome};
use crate::api::{DeletionPolicy, FINALIZER, IamKeyRotation, IamKeyRotationStatus};
use crate::cache::Cached;
use crate::error::Error;
use crate::iam::Iam;
use crate::ownership::{Identity, claims, fnv1a, is_own_claim};
use crate::plan::{self, Step};
use crate::plan::snapshot::SecretState;
use crate::secrets;
use crate::status::{self, Verdict};
use crate::validate::validate;

/// Reconciles in flight at once, per watched namespace. Each waits on AWS (capped calls per
/// second) or on the apiserver; more in parallel would only hold more memory.
pub const RECONCILE_CONCURRENCY: u16 = 16;
/// How often a resource is looked at without a reason: its Secrets are read (a hand-deleted or
/// edited Secret is noticed), IAM is not called.
pub const IDLE_RESYNC: Duration = Duration::from_secs(600);

/// Shared by every reconcile.
pub struct Context<I: Iam> {
    pub client: kube::Client,
    /// Watch only these namespaces (empty: all).
    pub namespaces: Vec<String>,
    pub iam: I,
    pub cluster: String,
    pub region: String,
    pub events: status::Events,
    /// At most this many rotations in flight at once (a backlog of overdue keys must not restart
    /// every workload of the cluster at the same moment).
    pub max_concurrent_rotations: usize,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub health: Arc<crate::http::Health>,
    /// Role ARN patterns (`*` matches anything) a resource's spec.aws.roleArn must match.
    pub allowed_role_arns: Vec<String>,
    /// One client per (role, external id), so assumed credentials are reused until they expire.
    pub role_clients: tokio::sync::Mutex<std::collections::HashMap<(String, String), I>>,
    /// The IAM user the operator runs as (None: a role, or not yet known).
    pub whoami: tokio::sync::OnceCell<Option<String>>,
    /// The controllers' caches of resources (one per watched namespace), for counting rotations
    /// in flight.
    pub stores: std::sync::Mutex<Vec<Store<Cached>>>,
}

impl<I: Iam> Context<I> {
    pub fn new(client: kube::Client, iam: I, cluster: String, region: String) -> Self {
        let reporter = Reporter { controller: "rekey".into(), instance: std::env::var("POD_NAME").ok() };
        Self {
            events: status::Events::new(client.clone(), reporter),
            client,
            iam,
            cluster,
            region,
            namespaces: Vec::new(),
            max_concurrent_rotations: 10,
            stores: std::sync::Mutex::new(Vec::new()),
            whoami: tokio::sync::OnceCell::new(),
            allowed_role_arns: Vec::new(),
            metrics: Arc::new(crate::metrics::Metrics::default()),
            health: Arc::new(crate::http::Health::default()),
            role_clients: tokio::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

/// Runs the controller until the stream ends (shutdown signal).
pub async fn run<I: Iam + 'static>(ctx: Arc<Context<I>>) {
    let client = ctx.client.clone();
    // Cluster-wide, or one controller per watched namespace (namespaced RBAC: a Role in each).
    let apis: Vec<Api<Cached>> = if ctx.namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        ctx.namespaces.iter().map(|ns| Api::namespaced(client.clone(), ns)).collect()
    };
    let mut stores = Vec::new();
    let runs: Vec<_> = apis
        .into_iter()
        .map(|api| {
            // No watch on Secrets: rekey may only get the Secrets a spec names (it cannot list them),
            // so their changes are seen on the next reconcile (see IDLE_RESYNC).
            // A bounded number of reconciles at once: 1,000 resources due together must not hold
            // 1,000 working sets in memory; the AWS cap is the throughput limit anyway.
            // The cache holds `Cached` (crate::cache), not whole resources; reconcile reads afresh.
            let controller = Controller::new(api, watcher::Config::default())
                .with_config(kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY));
            stores.push(controller.store());
            if let Ok(mut all) = ctx.stores.lock() {
                all.push(controller.store());
            }
            controller.shutdown_on_signal().run(reconcile, error_policy, ctx.clone()).for_each(|res| async move {
                if let Err(e) = res {
                    warn!(error = %e, "reconcile failed");
                }
            })
        })
        .collect();
    // Ready once the CRD answered and the first list of every watched namespace is in the cache.
    let health = ctx.health.clone();
    let synced = tokio::spawn(async move {
        for s in stores {
            if !synced(&s, None).await {
                return;
            }
        }
        info!("caches synced");
        health.set(crate::http::Lifecycle::Running);
    });
    // How many resources this replica manages, for the "not reconciling" alert: counted from the
    // cache on a timer, so it stays true when nothing reconciles (which is what the alert is for).
    let counter = ctx.clone();
    let counting = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(15));
        loop {
            tick.tick().await;
            let n = counter.stores.lock().map(|s| s.iter().map(|s| s.state().len()).sum::<usize>()).unwrap_or(0);
            counter.metrics.managed_resources.set(n as i64);
        }
    });
    futures::future::join_all(runs).await;
    synced.abort();
    counting.abort();
    ctx.health.set(crate::http::Lifecycle::Dead);
}

fn error_policy<I: Iam>(obj: Arc<Cached>, err: &Error, _ctx: Arc<Context<I>>) -> Action {
    let failed = obj.status.as_ref().map(|s| s.failed_attempts).unwrap_or(0);
    match err {
        Error::Conflict => Action::requeue(Duration::from_millis(500)),
        _ => Action::requeue(plan::backoff(failed.max(1))),
    }
}

async fn reconcile<I: Iam>(obj: Arc<Cached>, ctx: Arc<Context<I>>) -> Result<Action, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let span = info_span!("reconcile", namespace = %ns, name = %obj.name_any());
    let started = std::time::Instant::now();
    let metrics = ctx.metrics.clone();
    let result = async move {
        let api: Api<Cached> = Api::namespaced(ctx.client.clone(), &ns);
        finalizer(&api, FINALIZER, obj, |event| async {
            match event {
                Finalizer::Apply(o) => apply(o, ctx.clone()).await,
                Finalizer::Cleanup(o) => cleanup(o, ctx.clone()).await,
            }
        })
        .await
        .map_err(|e| match e {
            kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            kube::runtime::finalizer::Error::AddFinalizer(e) | kube::runtime::finalizer::Error::RemoveFinalizer(e) => {
                Error::from(e)
            }
            other => Error::Internal(other.to_string()),
        })
    }
    .instrument(span)
    .await;
    metrics.reconcile_duration_seconds.observe(started.elapsed().as_secs_f64());
    metrics.last_reconcile_timestamp_seconds.set(Timestamp::now().as_millisecond() as f64 / 1000.0);
    result
}

fn identity<I: Iam>(obj: &IamKeyRotation, ctx: &Context<I>) -> Identity {
    Identity { cluster: ctx.cluster.clone(), namespace: obj.namespace().unwrap_or_default(), name: obj.name_any() }
}

async fn apply<I: Iam>(cached: Arc<Cached>, ctx: Arc<Context<I>>) -> Result<Action, Error> {
    let ns = cached.namespace().unwrap_or_default();
    let api: Api<IamKeyRotation> = Api::namespaced(ctx.client.clone(), &ns);
    // Rule 4: decide on the apiserver's current object, never on a possibly stale cache.
    let Some(obj) = api.get_opt(&cached.name_any()).await? else { return Ok(Action::await_change()) };
    let before = obj.status.clone().unwrap_or_default();
    let mut st = before.clone();
    let now = Timestamp::now();
    if before.observed_generation.is_none() {
        // A request value present when rekey first sees a resource counts as already used.
        let r = crate::observe::requests(&obj);
        st.last_rotate_request = r.rotate;
        st.last_emergency_request = r.emergency;
        st.last_retire_request = r.retire;
    }
    if before.observed_generation.is_some() && before.observed_generation != obj.metadata.generation {
        // A spec edit is a new attempt: it does not wait out the failures of the spec before it.
        st.failed_attempts = 0;
        st.last_failure_time = None;
    }
    st.observed_generation = obj.metadata.generation;

    let valid = match validate(&obj.spec) {
        Ok(v) => v,
        Err(e) => {
            let step = Step::Stall { reason: plan::StallReason::InvalidSpec, message: e.0 };
            return report(&ctx, &api, &obj, &before, st, &step, Outcome::default(), now).await;
        }
    };
    let id = identity(&obj, &ctx);
    let iam = match obj.spec.aws.as_ref().and_then(|a| a.role_arn.as_deref()) {
        None => ctx.iam.clone(),
        Some(role) if !role_allowed(&ctx.allowed_role_arns, role) => {
            let step = Step::Stall {
                reason: plan::StallReason::Forbidden,
                message: format!(
                    "spec.aws.roleArn {role} is not allowed by this operator (--allowed-role-arns); no IAM call was made"
                ),
            };
            return report(&ctx, &api, &obj, &before, st, &step, Outcome::default(), now).await;
        }
        Some(role) => {
            // The role's trust policy can bind it to this namespace of this cluster.
            let external_id = format!("{}/{}", ctx.cluster, ns);
            let mut cache = ctx.role_clients.lock().await;
            let key = (role.to_owned(), external_id.clone());
            match cache.get(&key) {
                Some(c) => c.clone(),
                None => {
                    let session = format!("rekey-{}", fnv1a(external_id.as_bytes()));
                    let c = ctx.iam.for_role(role, &external_id, &session).await;
                    cache.insert(key, c.clone());
                    c
                }
            }
        }
    };
    let mut observed = match crate::observe::basic(&ctx.client, &obj, now).await {
        Ok(o) => o,
        Err(e) => return fail(&ctx, &api, &obj, &before, "Observe", e, now).await,
    };
    let step = loop {
        let step = plan::decide(&plan::Input {
            spec: &obj.spec,
            valid: &valid,
            status: &st,
            observed: &observed,
            identity: &id,
        });
        match step {
            Step::NeedIam if observed.iam.is_none() => {
                let want_last_used = !valid.require_unused_for.is_zero();
                let gathered = async {
                    let me = ctx
                        .whoami
                        .get_or_try_init(|| async {
                            ctx.iam.whoami().await.map(|arn| crate::iam::user_of_arn(&arn).map(str::to_owned))
                        })
                        .await?
                        .clone();
                    let candidates = owner_candidates(&ctx).await?;
                    crate::observe::iam(&candidates, &iam, me, &obj, &st, want_last_used).await
                };
                let (facts, other) = match gathered.await {
                    Ok(g) => g,
                    Err(e) => return fail(&ctx, &api, &obj, &before, "ObserveIam", e, now).await,
                };
                observed.iam = Some(facts);
                observed.other_resource = other;
            }
            Step::NeedWorkloads if observed.workloads.is_none() => {
                let names = crate::observe::secret_names(&obj);
                let key = st.active_key.as_ref().map(|k| k.access_key_id.clone());
                let gathered = crate::workloads::observe(
                    &ctx.client,
                    &ns,
                    &obj.spec.workloads.targets,
                    obj.spec.workloads.discover,
                    &names,
                    key.as_deref(),
                )
                .await;
                match gathered {
                    Ok(w) => observed.workloads = Some(w),
                    Err(e) => return fail(&ctx, &api, &obj, &before, "ObserveWorkloads", e, now).await,
                }
            }
            other => break other,
        }
    };

    let step = match step {
        Step::Begin { .. } if !rotation_slot_free(&ctx, &obj) => Step::Wait {
            requeue: Some(Duration::from_secs(15)),
            why: format!("waiting for a rotation slot (--max-concurrent-rotations={})", ctx.max_concurrent_rotations),
        },
        other => other,
    };

    if step.writes() && (obj.spec.suspend || obj.spec.dry_run) {
        let what = if obj.spec.suspend { "suspended" } else { "dry run" };
        let note = format!("{what}: next step would be {} ({step:?})", step.name());
        // A suspended resource is looked at again when its spec changes (the watch) or at the idle
        // resync, not polled: thousands of suspended resources must cost no AWS calls.
        let requeue = if obj.spec.suspend { IDLE_RESYNC } else { Duration::from_secs(60) };
        let mut out = Outcome { requeue: Some(requeue), ..Default::default() };
        if st.planned_step.as_deref() != Some(step.name()) {
            out.events.push((false, if obj.spec.suspend { "Suspended" } else { "DryRun" }.into(), note));
        }
        st.planned_step = Some(step.name().to_owned());
        return report(&ctx, &api, &obj, &before, st, &Step::Wait { requeue: None, why: String::new() }, out, now)
            .await;
    }
    st.planned_step = None;

    let env = Env {
        client: &ctx.client,
        iam: &iam,
        obj: &obj,
        valid: &valid,
        observed: &observed,
        identity: &id,
        region: &ctx.region,
    };
    info!(step = step.name(), phase = %st.phase, "performing");
    match act::perform(&env, &mut st, &step).await {
        Ok(mut out) => {
            out.gitops_managed = observed.gitops_managed.clone();
            report(&ctx, &api, &obj, &before, st, &step, out, now).await
        }
        Err(e) => fail(&ctx, &api, &obj, &before, step.name(), e, now).await,
    }
}

/// Records a failed step in status (failedAttempts, lastFailureTime: the backoff survives
/// restarts), as an Event, and for missing RBAC as a condition; then returns the error.
async fn fail<I: Iam>(
    ctx: &Context<I>,
    api: &Api<IamKeyRotation>,
    obj: &IamKeyRotation,
    before: &IamKeyRotationStatus,
    what: &str,
    e: Error,
    now: Timestamp,
) -> Result<Action, Error> {
    if !matches!(e, Error::Conflict) {
        let mut failed = before.clone();
        failed.observed_generation = obj.metadata.generation;
        failed.failed_attempts += 1;
        failed.last_failure_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
        if e.category() == "KubeForbidden" {
            // Missing RBAC is for a human to fix: say exactly which verb on which resource.
            let v = Verdict::Forbidden(format!("{what} failed: {e}"));
            failed.conditions = status::conditions(&failed, &v, obj.metadata.generation, now);
        }
        ctx.events.publish(obj, true, e.category(), format!("{what} failed: {e}"), what).await;
        if let Err(we) = status::write(api, obj, &failed, false).await {
            warn!(error = %we, "could not record the failure in status");
        }
    }
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::CategoryLabels { category: e.category().to_owned() })
        .inc();
    warn!(step = what, category = e.category(), error = %e, "step failed");
    Err(e)
}

/// Whether `role` matches one of the allow-list's patterns (`*` matches any run of characters).
pub fn role_allowed(patterns: &[String], role: &str) -> bool {
    patterns.iter().any(|p| glob(p.as_bytes(), role.as_bytes()))
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
        _ => false,
    }
}

/// Every IamKeyRotation that could own the same user, for the one-owner check (DESIGN rule 7: made
/// on a fresh read, so two resources cannot both start).
///
/// With one watch (cluster-wide, or one namespace) the cache is that fresh read: it holds this
/// resource, so it has applied every event before this resource's creation — every resource created
/// earlier is in it. A fresh list adds nothing but load (a list of every resource per reconcile made
/// bootstrapping 1,000 resources O(n²) for the apiserver: 504s, 5 GiB). Separate watches of several
/// namespaces are not ordered with one another, so then the watched namespaces are listed afresh.
async fn owner_candidates<I: Iam>(ctx: &Context<I>) -> Result<Vec<Arc<Cached>>, Error> {
    if ctx.namespaces.len() > 1 {
        let mut out = Vec::new();
        for ns in &ctx.namespaces {
            let list = Api::<Cached>::namespaced(ctx.client.clone(), ns).list(&Default::default()).await?;
            out.extend(list.items.into_iter().map(Arc::new));
        }
        return Ok(out);
    }
    let stores: Vec<_> = ctx.stores.lock().map(|s| s.clone()).unwrap_or_default();
    let mut out = Vec::new();
    for s in stores {
        // Before the first list is in, an empty cache means "not known yet", not "nobody else".
        match synced(&s, Some(Duration::from_secs(30))).await {
            true => out.extend(s.state()),
            false => {
                return Err(Error::Internal(
                    "the IamKeyRotation cache has not synced, so one owner per IAM user cannot be checked yet".into(),
                ));
            }
        }
    }
    Ok(out)
}

/// Whether `store` holds its first full list, waiting for it at most `limit` (None: for as long as
/// the watch lives). kube-runtime's readiness signal wakes only the last task that waited on it, and
/// the controller's runner waits on it too: a second waiter would sleep forever (readiness never
/// reported). So this looks again every 100 ms instead of relying on being woken.
async fn synced(store: &Store<Cached>, limit: Option<Duration>) -> bool {
    let start = tokio::time::Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await {
            Ok(r) => return r.is_ok(),
            Err(_) if limit.is_some_and(|l| start.elapsed() >= l) => return false,
            Err(_) => {}
        }
    }
}

/// Whether fewer than --max-concurrent-rotations other resources are mid-rotation. Counted from
/// the cache: two resources deciding at the same instant may overshoot by one, which this limit
/// (load smoothing, not a safety rule) tolerates.
fn rotation_slot_free<I: Iam>(ctx: &Context<I>, obj: &IamKeyRotation) -> bool {
    let Ok(stores) = ctx.stores.lock() else { return true };
    let me = (obj.namespace(), obj.name_any());
    let busy = stores
        .iter()
        .flat_map(|s| s.state())
        .filter(|o| (o.namespace(), o.name_any()) != me)
        .filter(|o| o.status.as_ref().is_some_and(|s| s.phase != crate::api::Phase::Idle))
        .count();
    busy < ctx.max_concurrent_rotations
}

#[allow(clippy::too_many_arguments)]
async fn report<I: Iam>(
    ctx: &Context<I>,
    api: &Api<IamKeyRotation>,
    obj: &IamKeyRotation,
    before: &IamKeyRotationStatus,
    mut st: IamKeyRotationStatus,
    step: &Step,
    out: Outcome,
    now: Timestamp,
) -> Result<Action, Error> {
    let verdict = match Verdict::of(step) {
        Verdict::Progressed | Verdict::Unchanged if !out.gitops_managed.is_empty() => {
            let which: Vec<String> = out.gitops_managed.iter().map(|(s, tool)| format!("{s} ({tool})")).collect();
            Verdict::Degraded(
                plan::DegradeReason::GitOpsManagedSecret,
                format!(
                    "Secret {} is applied by a GitOps tool, whose next sync reverts the key rekey writes: keep the Secret out of Git, or make the tool ignore its data (Argo CD: ignoreDifferences on /data; Flux: remove it from the Kustomization)",
                    which.join(", ")
                ),
            )
        }
        v => v,
    };
    st.conditions = status::conditions(&st, &verdict, obj.metadata.generation, now);
    record_metrics(ctx, obj, before, &st, step, now);
    // Warn once when a stall or degradation starts, not on every look.
    let was = |t: &str| before.conditions.iter().find(|c| c.type_ == t).map(|c| (c.status.clone(), c.reason.clone()));
    match &verdict {
        Verdict::Stalled(r, m) if was("Stalled") != Some(("True".into(), r.as_str().into())) => {
            ctx.events.publish(obj, true, r.as_str(), m.clone(), "Stall").await;
        }
        Verdict::Degraded(r, m)
            if was("Degraded") != Some(("True".into(), r.as_str().into())) && !matches!(step, Step::Abandon { .. }) =>
        {
            ctx.events.publish(obj, true, r.as_str(), m.clone(), "Degrade").await;
        }
        _ => {}
    }
    if st != *before {
        status::write(api, obj, &st, out.precondition).await?;
        crate::failpoint!("after-status");
    }
    for (warning, reason, note) in out.events {
        ctx.events.publish(obj, warning, &reason, note, step.name()).await;
    }
    Ok(match out.requeue {
        Some(d) if d.is_zero() => Action::requeue(Duration::from_millis(100)),
        Some(d) => Action::requeue(d.min(IDLE_RESYNC)),
        None => Action::requeue(IDLE_RESYNC),
    })
}

fn record_metrics<I: Iam>(
    ctx: &Context<I>,
    obj: &IamKeyRotation,
    before: &IamKeyRotationStatus,
    st: &IamKeyRotationStatus,
    step: &Step,
    now: Timestamp,
) {
    use crate::metrics::{CONDITIONS, PhaseLabels, RESULTS};
    let m = &ctx.metrics;
    let secs = |t: Timestamp| t.as_millisecond() as f64 / 1000.0;
    if before.phase != st.phase
        && let Some(since) = before.rotation.as_ref().map(|r| r.phase_since.0)
    {
        let phase = PhaseLabels { phase: before.phase.to_string() };
        m.phase_duration_seconds.get_or_create(&phase).observe((secs(now) - secs(since)).max(0.0));
    }
    let result = match step {
        _ if st.rotations > before.rotations => Some("completed"),
        Step::Abandon { .. } => Some("abandoned"),
        Step::Reactivate { .. } => Some("rolled_back"),
        _ => None,
    };
    let mut all = m.resources.write();
    let f = all.entry((obj.namespace().unwrap_or_default(), obj.name_any())).or_default();
    f.user.clone_from(&obj.spec.user_name);
    f.key_created = st.active_key.as_ref().and_then(|k| k.created_at.as_ref()).map(|t| secs(t.0));
    f.next_rotation = st.next_rotation_time.as_ref().map(|t| secs(t.0));
    f.max_key_age = crate::validate::validate(&obj.spec).ok().map(|v| v.max_key_age.as_secs_f64());
    for (slot, name) in f.conditions.iter_mut().zip(CONDITIONS) {
        *slot = st.conditions.iter().find(|c| c.type_ == name).map(|c| c.status == "True");
    }
    if let Some(i) = result.and_then(|r| RESULTS.iter().position(|x| *x == r)) {
        f.rotations[i] += 1;
    }
}

/// Deletion, by `deletionPolicy`. Works with an invalid spec, a missing user or withdrawn
/// consent, and never blocks namespace deletion for longer than one reconcile.
async fn cleanup<I: Iam>(cached: Arc<Cached>, ctx: Arc<Context<I>>) -> Result<Action, Error> {
    let ns = cached.namespace().unwrap_or_default();
    let name = cached.name_any();
    // The cache keeps no status (crate::cache): which keys to delete is read from the apiserver.
    let api: Api<IamKeyRotation> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(obj) = api.get_opt(&name).await? else { return Ok(Action::await_change()) };
    let user = obj.spec.user_name.clone();
    let st = obj.status.clone().unwrap_or_default();
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let owner = identity(&obj, &ctx).owner();
    // A new key that no target Secret holds yet: nobody has it, delete it under any policy. If the
    // Secrets cannot be read, nothing proves nobody has it: keep it (reported below).
    let held: Option<Vec<String>> = crate::observe::basic(&ctx.client, &obj, Timestamp::now()).await.ok().map(|o| {
        o.secrets
            .into_iter()
            .filter_map(|(_, s)| match s {
                SecretState::Holds(id) => Some(id),
                _ => None,
            })
            .collect()
    });
    let mut problems = Vec::new();
    if held.is_none() {
        problems.push("the target Secrets could not be read, so a new key was kept".to_owned());
    }
    let keys = match ctx.iam.list_keys(&user).await {
        Ok(k) => k,
        Err(e) => {
            problems.push(e.to_string());
            Vec::new()
        }
    };
    let tags = ctx.iam.user_tags(&user).await.ok().flatten().unwrap_or_default();
    let ours: Vec<String> = claims(&tags)
        .into_iter()
        .filter(|(_, o)| is_own_claim(o, &owner))
        .map(|(k, _)| k)
        .filter(|k| keys.iter().any(|x| &x.id == k))
        .collect();
    let unhanded: Vec<String> = st
        .new_key
        .iter()
        .map(|k| k.access_key_id.clone())
        .filter(|k| held.as_ref().is_some_and(|h| !h.contains(k)) && keys.iter().any(|x| &x.id == k))
        .collect();
    let to_delete: Vec<String> = match obj.spec.deletion_policy {
        DeletionPolicy::Retain => unhanded,
        DeletionPolicy::Delete => ours,
    };
    for k in &to_delete {
        match ctx.iam.delete_key(&user, k).await {
            Ok(()) => {
                ctx.iam.untag_user(&user, k).await.ok();
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    if obj.spec.deletion_policy == DeletionPolicy::Delete {
        for t in &obj.spec.secrets {
            if let Err(e) = secrets::clear_target(&secrets_api, &name, t).await {
                problems.push(e.to_string());
            }
        }
    }
    if let Err(e) = secrets::delete_staging(&secrets_api, &name).await {
        problems.push(e.to_string());
    }
    let note = format!(
        "deleted ({:?}): keys deleted: [{}]{}",
        obj.spec.deletion_policy,
        to_delete.join(", "),
        if problems.is_empty() {
            String::new()
        } else {
            format!("; left behind after errors: {}", problems.join("; "))
        }
    );
    ctx.events.publish(&obj, !problems.is_empty(), "Deleted", note, "Cleanup").await;
    ctx.metrics.forget(&ns, &name);
    // Never block deletion (or the namespace's) on IAM being unreachable: report and let go.
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::role_allowed;

    #[test]
    fn role_allow_list_patterns() {
        let allow = vec!["arn:aws:iam::111122223333:role/rekey/*".to_owned()];
        assert!(role_allowed(&allow, "arn:aws:iam::111122223333:role/rekey/payments"));
        assert!(!role_allowed(&allow, "arn:aws:iam::111122223333:role/admin"));
        assert!(!role_allowed(&allow, "arn:aws:iam::999999999999:role/rekey/payments"));
        assert!(!role_allowed(&[], "arn:aws:iam::111122223333:role/rekey/payments"));
        assert!(role_allowed(&["*".to_owned()], "anything"));
    }
}
