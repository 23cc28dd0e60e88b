//! Test support for rekey: the simulated kubelet's credential reading and the helpers integration
//! tests use to reach the local control plane and the IAM emulator started by `scripts/testenv up`.
#![forbid(unsafe_code)]

pub mod creds;
pub mod env;
