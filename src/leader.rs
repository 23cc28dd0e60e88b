//! Leader election on a coordination.k8s.io Lease: two replicas never act at once.
//! TOUCHES THE CLUSTER (the Lease).
//!
//! Leadership is not fencing: a deposed leader may still finish a request in flight. The reconcile
//! does not rely on it for safety (docs/design.md, rule 4: fresh reads and resourceVersion preconditions);
//! the Lease keeps two replicas from doing the same work at the same time.

use std::future::Future;

use kube_lease_manager::LeaseManagerBuilder;
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// Seconds a lock stays valid after its last renewal.
    pub duration: u64,
    /// Seconds before expiry at which the holder renews.
    pub grace: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("leader election settings: {0}")]
    Settings(String),
    #[error("leader election failed: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    #[error("leadership lost: stopping so that only the new leader acts")]
    Lost,
}

/// Runs `work` once this process holds the Lease, until `work` ends (Ok) or leadership is lost
/// (Err(Lost): the caller exits, as a crash would, and the new leader resumes the work).
pub async fn run_as_leader<F: Future<Output = ()>>(
    client: kube::Client,
    cfg: LeaderConfig,
    work: F,
) -> Result<(), LeaderError> {
    if cfg.duration == 0 || cfg.grace == 0 || cfg.grace >= cfg.duration {
        return Err(LeaderError::Settings(format!(
            "lease duration ({}s) must be more than the grace period ({}s), both more than 0",
            cfg.duration, cfg.grace
        )));
    }
    let manager = LeaseManagerBuilder::new(client, &cfg.name)
        .with_namespace(&cfg.namespace)
        .with_identity(&cfg.identity)
        .with_duration(cfg.duration)
        .with_grace(cfg.grace)
        .build()
        .await?;
    let (mut leading, task) = manager.watch().await;
    info!(lease = %cfg.name, namespace = %cfg.namespace, identity = %cfg.identity, "waiting for leadership");
    while !*leading.borrow_and_update() {
        if leading.changed().await.is_err() {
            return Err(LeaderError::Lost);
        }
    }
    info!("leading");
    let lost = async {
        loop {
            if leading.changed().await.is_err() || !*leading.borrow_and_update() {
                return;
            }
        }
    };
    let outcome = tokio::select! {
        _ = work => Ok(()),
        _ = lost => Err(LeaderError::Lost),
    };
    // Hand the Lease over at once on a clean stop instead of letting it expire.
    drop(leading);
    match task.await {
        Ok(Ok(manager)) if outcome.is_ok() => {
            if let Err(e) = manager.release().await {
                warn!(error = %e, "could not release the Lease");
            }
        }
        Ok(Err(e)) => warn!(error = %e, "lease manager ended with an error"),
        _ => {}
    }
    outcome
}
