//! The plan's input types: the observed snapshot a decision is made on. Plain data, PURE. The
//! gatherers (`observe`, `secrets`, `workloads`, `iam`) map what they read into these types; this
//! file imports nothing of the plan, so they can without importing the plan itself.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;

use crate::api::WorkloadRef;

/// What a target Secret holds in the keys rekey owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretState {
    Missing,
    Empty,
    Holds(String),
    /// Present but its content cannot be read as a key (e.g. half of a pair).
    Unreadable(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IamKey {
    pub id: String,
    pub active: bool,
    pub created: Timestamp,
}

/// What IAM says about the user, gathered only when the decision needs it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct IamState {
    pub user_exists: bool,
    pub keys: Vec<IamKey>,
    pub tags: BTreeMap<String, String>,
    /// Last use of the retiring key, when requireOldKeyUnusedFor asks for it (None: never used).
    pub retiring_last_used: Option<Option<Timestamp>>,
    /// The IAM user the operator itself runs as, if it runs as one.
    pub operator_user: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadState {
    pub id: WorkloadRef,
    /// Value of the rekey.dev/access-key-id annotation on its pod template (`workloads::stamp`).
    pub stamped: Option<String>,
    /// Rollout complete by `kubectl rollout status` rules and no unstamped pod left.
    pub complete: bool,
    /// Why rekey refuses to roll it (partitioned or OnDelete StatefulSet).
    pub refused: Option<String>,
    pub ready: i32,
    /// A rollout of it is in progress (a newer template than the one running).
    pub progressing: bool,
    /// Where its rollout stands, for people ("1 of 2 updated, 1 ready").
    pub progress: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct WorkloadsState {
    pub items: Vec<WorkloadState>,
    /// Pods reading a target Secret that no workload of this rotation controls, not on the active
    /// key: "Pod/name (why)".
    pub uncovered: Vec<String>,
    /// Pods of Jobs reading a target Secret: they end by themselves, so they are waited for.
    pub jobs: Vec<String>,
}

/// The annotations that ask for something.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Requests {
    pub rotate: Option<String>,
    pub emergency: Option<String>,
    pub retire: Option<String>,
}

/// The observed snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub now: Timestamp,
    pub requests: Requests,
    /// Same order as spec.secrets.
    pub secrets: Vec<(String, SecretState)>,
    /// The key id in the staging Secret, if any.
    pub staging_key: Option<String>,
    pub iam: Option<IamState>,
    pub workloads: Option<WorkloadsState>,
    /// Another, older resource of this cluster names the same user.
    pub other_resource: Option<String>,
    /// "namespace/name" of the IamKeyRotations of this cluster that the user's claims name and that
    /// exist, gathered with the IAM facts (for telling a claim of a deleted resource from a live one).
    pub resources: Option<BTreeSet<String>>,
    /// Target Secrets applied by a GitOps tool, with the tool's name: its next sync reverts them.
    pub gitops_managed: Vec<(String, &'static str)>,
    /// Another IamKeyRotation owns keys (or the credentials profile) of a target Secret that this
    /// one owns too: what it says, per Secret.
    pub conflicts: Vec<String>,
    /// Target Secrets marked `immutable: true`: no write can ever change them.
    pub immutable: Vec<String>,
    /// Per target Secret, the field managers other than this resource that wrote the keys it owns.
    pub writers: BTreeMap<String, Vec<String>>,
    /// When the last of the target Secrets was last written, by the apiserver's clock (`None` when
    /// one is missing or carries no managedFields): a pod created later read what they hold now.
    pub written_at: Option<Timestamp>,
}
