//! rekey: rotates AWS IAM user access keys stored in Kubernetes Secrets.
//!
//! The reconcile (`reconciler`) is a pipeline: `observe` (gather a snapshot; reads the cluster and
//! IAM) → `validate` and `plan` (pure: every decision) → `act` (performs exactly one step; writes)
//! → `status` (report: conditions are pure, the write touches the cluster).
#![forbid(unsafe_code)]

pub mod act;
pub mod api;
pub mod budget;
pub mod cache;
pub mod cel;
pub mod cli;
pub mod context;
pub mod controller;
pub mod duration;
pub mod error;
pub mod events;
#[cfg(test)]
pub mod fake;
pub mod http;
pub mod iam;
pub mod leader;
pub mod leak_event;
pub mod leak_response;
pub mod metrics;
pub mod nudge;
pub mod observe;
pub mod ownership;
pub mod pacing;
pub mod plan;
pub mod process_metrics;
pub mod reconciler;
pub mod schedule;
pub mod secrets;
pub mod status;
pub mod validate;
pub mod workloads;

/// The CRD as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    use kube::CustomResourceExt as _;
    to_yaml(&api::IamKeyRotation::crd())
}

/// YAML as kubectl prints it: a long description stays on one line rather than folded at 80
/// columns, so the committed CRD diffs line by line when one changes.
pub fn to_yaml<T: serde::Serialize>(value: &T) -> Result<String, serde_saphyr::SerializeError> {
    let mut options = serde_saphyr::SerializerOptions::default();
    options.folded_wrap_chars = usize::MAX;
    serde_saphyr::to_string_with_options(value, options)
}

/// A point where tests built with `--features failpoints` can make the process die, as if killed
/// at that instant (`FAILPOINTS=after-create=return`), or pause there for a number of milliseconds
/// (`FAILPOINTS=before-deactivate=return(pause:3000)`, logged, so a test knows a step is in flight).
/// Compiled out otherwise. Only in async code.
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        {
            if let Some(arg) = fail::eval($name, |arg| arg) {
                match arg.as_deref().and_then(|a| a.strip_prefix("pause:")).and_then(|ms| ms.parse::<u64>().ok()) {
                    Some(ms) => {
                        tracing::warn!(failpoint = $name, ms, "failpoint hit: pausing");
                        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                    }
                    None => {
                        tracing::error!(failpoint = $name, "failpoint hit: exiting as if killed");
                        std::process::exit(137);
                    }
                }
            }
        }
    };
}

/// Whether failpoint `name` is set (`FAILPOINTS=verify-rejected=return`): the outside world
/// answers as it may (IAM not accepting a new key yet), so that a test can hold a phase. Always
/// false when compiled without `--features failpoints`.
#[macro_export]
macro_rules! failpoint_set {
    ($name:literal) => {{
        #[cfg(feature = "failpoints")]
        let set = fail::eval($name, |_| ()).is_some();
        #[cfg(not(feature = "failpoints"))]
        let set = false;
        set
    }};
}
