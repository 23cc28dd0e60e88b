//! /metrics, /healthz and /readyz. Health reports whether the controller is actually alive, not a
//! constant "ok": a controller that stopped makes /healthz fail.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::Metrics;

/// Where the process stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Lifecycle {
    Starting = 0,
    /// A follower waiting for the Lease: healthy, and ready (so rolling updates of the operator
    /// Deployment are not blocked by a standby replica).
    Standby = 1,
    /// Leading, caches synced.
    Running = 2,
    /// The controller has stopped.
    Dead = 3,
}

#[derive(Default)]
pub struct Health(AtomicU8);

impl Health {
    pub fn set(&self, l: Lifecycle) {
        self.0.store(l as u8, Ordering::SeqCst);
    }
    pub fn get(&self) -> Lifecycle {
        match self.0.load(Ordering::SeqCst) {
            1 => Lifecycle::Standby,
            2 => Lifecycle::Running,
            3 => Lifecycle::Dead,
            _ => Lifecycle::Starting,
        }
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

pub fn router(health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { health, metrics })
}

async fn metrics_handler(State(s): State<AppState>) -> ([(&'static str, &'static str); 1], String) {
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.encode())
}

async fn healthz(State(s): State<AppState>) -> (StatusCode, &'static str) {
    match s.health.get() {
        Lifecycle::Dead => (StatusCode::SERVICE_UNAVAILABLE, "controller stopped"),
        _ => (StatusCode::OK, "ok"),
    }
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, &'static str) {
    match s.health.get() {
        Lifecycle::Running => (StatusCode::OK, "ready"),
        Lifecycle::Standby => (StatusCode::OK, "standby: waiting for leadership"),
        Lifecycle::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting: caches not synced"),
        Lifecycle::Dead => (StatusCode::SERVICE_UNAVAILABLE, "controller stopped"),
    }
}

/// Serves until the process ends.
pub async fn serve(addr: std::net::SocketAddr, health: Arc<Health>, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(address = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, router(health, metrics)).await
}
