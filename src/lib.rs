//! rekey: rotates AWS IAM user access keys stored in Kubernetes Secrets.
#![forbid(unsafe_code)]

pub mod api;
pub mod duration;

/// The CRD as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt as _;
    serde_yaml::to_string(&api::IamKeyRotation::crd())
}
