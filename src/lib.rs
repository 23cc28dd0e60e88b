//! rekey: rotates AWS IAM user access keys stored in Kubernetes Secrets.
//!
//! The reconcile is a pipeline: `observe` (gather a snapshot; reads the cluster and IAM) →
//! `validate` and `plan` (pure) → `act` (performs exactly one step; writes) → `status` (report).
#![forbid(unsafe_code)]

pub mod api;
pub mod duration;
pub mod error;
pub mod plan;
pub mod secrets;
pub mod validate;

/// The CRD as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt as _;
    serde_yaml::to_string(&api::IamKeyRotation::crd())
}
