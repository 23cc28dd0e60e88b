//! In-memory stand-ins for IAM and the Kubernetes apiserver, for unit tests of the code that
//! touches them (`act`, `secrets`, `workloads`) without AWS or a cluster.

pub mod iam;
mod json;
pub mod kube;

pub use self::iam::FakeIam;
pub use self::kube::FakeKube;
