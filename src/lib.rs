//! rekey: rotates AWS IAM user access keys stored in Kubernetes Secrets.
//!
//! The reconcile is a pipeline: `observe` (gather a snapshot; reads the cluster and IAM) →
//! `validate` and `plan` (pure) → `act` (performs exactly one step; writes) → `status` (report).
#![forbid(unsafe_code)]

pub mod act;
pub mod api;
pub mod cli;
pub mod controller;
pub mod duration;
pub mod error;
pub mod http;
pub mod iam;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod plan;
pub mod secrets;
pub mod status;
pub mod validate;
pub mod workloads;

/// The CRD as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt as _;
    serde_yaml::to_string(&api::IamKeyRotation::crd())
}

/// A point where tests built with `--features failpoints` can make the process die, as if killed
/// at that instant (`FAILPOINTS=after-create=return`). Compiled out otherwise.
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        {
            if fail::eval($name, |_| ()).is_some() {
                tracing::error!(failpoint = $name, "failpoint hit: exiting as if killed");
                std::process::exit(137);
            }
        }
    };
}
