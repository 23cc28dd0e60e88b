//! Shared by the integration tests (and `benches/scale.rs`), by concern: the operator as a real
//! process (`operator`), what a test sets up and reads back (`fixtures`), the shipped manifests
//! and RBAC identity (`rbac`), and the leak response's SQS queue and AWS's reports (`queue`).
//! Everything is re-exported here, as `support::*`.
//! Waits go through `rekey_testenv::env::eventually`, or a helper here built on it.
// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::time::Duration;

mod fixtures;
mod operator;
mod queue;
mod rbac;

// A binary that uses nothing from one of these would otherwise warn about its re-export.
#[allow(unused_imports)]
pub use fixtures::*;
#[allow(unused_imports)]
pub use operator::*;
#[allow(unused_imports)]
pub use queue::*;
#[allow(unused_imports)]
pub use rbac::*;

/// The cluster name every operator of the tests runs with, and that users consent to.
pub const CLUSTER: &str = "test";
/// How long a test waits for a condition unless it says otherwise.
pub const WAIT: Duration = Duration::from_secs(120);
