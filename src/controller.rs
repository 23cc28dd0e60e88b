//! Wiring: the operator's configuration and shared context, watches, the finalizer, the error
//! policy, and the facts that come from the watch cache (other resources, rotations in flight).
//! One reconcile's pipeline is `reconciler`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::{Controller, watcher};
use tracing::{Instrument as _, info, info_span, warn};

use crate::api::FINALIZER;
use crate::cache::Cached;
use crate::context::{Context, synced};
use crate::error::Error;
use crate::iam::Iam;
use crate::plan;
use crate::reconciler::Reconciler;

/// Reconciles in flight at once, per watched namespace. Each waits on AWS (capped calls per
/// second) or on the apiserver. 16 left a fifth of the AWS budget unused while 1,000 leaked keys
/// waited (each reconcile spends most of its time on apiserver round trips): 63 s to switch them
/// all off, 58 s with 32, at a peak RSS of 52 MiB.
pub const RECONCILE_CONCURRENCY: u16 = 32;

/// Runs the controller until the stream ends (shutdown signal).
pub async fn run<I: Iam + 'static>(ctx: Arc<Context<I>>) {
    // This future runs only once this replica leads (crate::leader) or leader election is off, and
    // is dropped when leadership is lost: leading is exactly while it lives (the guard says so
    // however it ends).
    let _leading = Leading::new(ctx.metrics.leader.clone());
    let client = ctx.client.clone();
    // Cluster-wide, or one controller per watched namespace (namespaced RBAC: a Role in each).
    let apis: Vec<(Option<String>, Api<Cached>)> = if ctx.config.namespaces.is_empty() {
        vec![(None, Api::all(client.clone()))]
    } else {
        ctx.config.namespaces.iter().map(|ns| (Some(ns.clone()), Api::namespaced(client.clone(), ns))).collect()
    };
    let mut stores = Vec::new();
    let runs: Vec<_> = apis
        .into_iter()
        .map(|(scope, api)| {
            // No watch on Secrets: rekey may only get the Secrets a spec names (it cannot list them),
            // so their changes are seen on the next reconcile (see plan::IDLE_RESYNC).
            // A bounded number of reconciles at once: 1,000 resources due together must not hold
            // 1,000 working sets in memory; the AWS cap is the throughput limit anyway.
            // The cache holds `Cached` (crate::cache), not whole resources; reconcile reads afresh.
            // In-flight rotations are also woken by changes of their namespace's pods (crate::nudge).
            let controller = Controller::new(api, watcher::Config::default())
                .with_config(kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY))
                .reconcile_on(ctx.nudger.route(scope));
            stores.push(controller.store());
            ctx.register_store(controller.store());
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
            counter.metrics.managed_resources.set(counter.managed() as i64);
        }
    });
    futures::future::join_all(runs).await;
    synced.abort();
    counting.abort();
    ctx.health.set(crate::http::Lifecycle::Dead);
}

/// `rekey_leader` is 1 while this lives.
struct Leading(prometheus_client::metrics::gauge::Gauge);

impl Leading {
    fn new(gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.set(1);
        Self(gauge)
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        self.0.set(0);
    }
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
                Finalizer::Apply(o) => match Reconciler::load(&ctx, &o).await? {
                    // Boxed: the pipeline's future is deep enough to pass the compiler's layout limit.
                    Some(r) => Box::pin(r.apply()).await,
                    None => Ok(Action::await_change()),
                },
                Finalizer::Cleanup(o) => match Reconciler::load(&ctx, &o).await? {
                    Some(r) => Box::pin(r.cleanup()).await,
                    None => Ok(Action::await_change()),
                },
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
