//! The `IamKeyRotation` resource (group `rekey.dev`, version `v1alpha1`).
//!
//! Field names are API: they are the ones docs/design.md documents. Doc comments become `kubectl explain`
//! text. Validation the apiserver can enforce lives in the schema (patterns, enums, bounds, and the
//! cross-field CEL rules of `cel`); `validate` checks them again, with what only the operator can
//! judge, and reports a failure as `Stalled/InvalidSpec`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::SpecDuration;

/// Annotation: set to a new value to request an on-demand rotation.
pub const ROTATE_ANNOTATION: &str = "rekey.dev/rotate";
/// Annotation: set to a new value to request an emergency rotation (the old key is leaked).
pub const ROTATE_EMERGENCY_ANNOTATION: &str = "rekey.dev/rotate-emergency";
/// Annotation: set to a new value to let rekey retire the old key again after a rollback or an
/// uncovered consumer was fixed.
pub const RETIRE_ANNOTATION: &str = "rekey.dev/retire";
/// Pod-template annotation that restarts a workload onto a key.
pub const ACCESS_KEY_ANNOTATION: &str = "rekey.dev/access-key-id";
/// Pod-template annotation that restarts a workload whose pods may have started from a Secret
/// another writer reverted (the stamp alone would not change).
pub const RESTART_ANNOTATION: &str = "rekey.dev/restarted-at";
/// Finalizer that runs the deletion policy.
pub const FINALIZER: &str = "rekey.dev/cleanup";

/// Rotates the access keys of one IAM user and keeps them in Secrets of this namespace.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[kube(
    group = "rekey.dev",
    version = "v1alpha1",
    kind = "IamKeyRotation",
    namespaced,
    shortname = "ikr",
    category = "rekey",
    status = "IamKeyRotationStatus",
    doc = "An IamKeyRotation keeps one AWS IAM user's access key fresh: before the key in use reaches spec.maxKeyAge, rekey creates a new key, verifies it, writes it into spec.secrets, restarts the workloads that read them, and retires the old key once nothing uses it. status.conditions say how it stands (Ready, Rotating, Degraded, Stalled).",
    printcolumn = r#"{"name":"User","type":"string","jsonPath":".spec.userName"}"#,
    printcolumn = r#"{"name":"Active Key","type":"string","jsonPath":".status.activeKey.accessKeyId"}"#,
    printcolumn = r#"{"name":"Key Age","type":"date","jsonPath":".status.activeKey.createdAt"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Next Rotation","type":"string","jsonPath":".status.nextRotationTime"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#,
    // Custom columns replace the default ones: Age comes back only if listed.
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::cel::spec)]
pub struct IamKeyRotationSpec {
    /// Name of the IAM user whose access keys are rotated. The user must carry the tag
    /// `rekey.dev/allow/<namespace>` with the operator's cluster name (or `*`) as value.
    #[schemars(pattern(r"^[\w+=,.@-]{1,64}$"))]
    pub user_name: String,

    /// The age no key may exceed (default 90d).
    #[serde(default = "default_max_key_age")]
    pub max_key_age: SpecDuration,

    /// Start rotating this long before maxKeyAge (default 10d); must be less than maxKeyAge.
    #[serde(default = "default_rotate_before")]
    pub rotate_before: SpecDuration,

    /// The Secrets of this namespace that receive the key (1 to 16), each named once.
    #[schemars(length(min = 1, max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub secrets: Vec<SecretTarget>,

    /// What consumes the key in this namespace, restarted onto each new key.
    #[serde(default)]
    pub workloads: WorkloadsSpec,

    /// How the old key is retired.
    #[serde(default)]
    pub retirement: RetirementSpec,

    /// When a leaked key (rekey.dev/rotate-emergency, a leak report) is switched off.
    #[serde(default)]
    pub emergency: EmergencySpec,

    /// Sign sts:GetCallerIdentity with the new key before handing it out (default true).
    #[serde(default = "default_true")]
    pub verify_new_key: bool,

    /// While true, rekey writes nothing to IAM, Secrets or workloads (status is still kept).
    #[serde(default)]
    pub suspend: bool,

    /// Plan and report the next step (status and an Event) but write nothing to IAM, Secrets or
    /// workloads.
    #[serde(default)]
    pub dry_run: bool,

    /// What happens to keys and Secrets when this resource is deleted: Retain (default) leaves
    /// them as they are; Delete deletes the keys rekey created and the data it wrote.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// AWS settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsSpec>,

    /// When scheduled rotations may start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleSpec>,
}

fn default_max_key_age() -> SpecDuration {
    SpecDuration::new("90d")
}
fn default_rotate_before() -> SpecDuration {
    SpecDuration::new("10d")
}
fn default_rollout_timeout() -> SpecDuration {
    SpecDuration::new("10m")
}
fn default_zero() -> SpecDuration {
    SpecDuration::new("0s")
}
fn default_delete_after() -> SpecDuration {
    SpecDuration::new("1h")
}
fn default_true() -> bool {
    true
}

/// A Secret that receives the key, and the layout the key is written in.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::cel::secret_target)]
pub struct SecretTarget {
    /// Name of the Secret (in this namespace). Created if missing.
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,

    /// env (default): two keys, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (names overridable);
    /// credentialsFile: one key "credentials" holding an INI profile section; template: keys
    /// rendered from the `template` map; sesSmtp: Amazon SES SMTP credentials, SMTP_USERNAME (the
    /// access key id) and SMTP_PASSWORD (derived from the secret for `region`; names overridable).
    #[serde(default)]
    pub format: SecretFormat,

    /// env format: the Secret key that holds the access key id (default AWS_ACCESS_KEY_ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[-._a-zA-Z0-9]{1,253}$"))]
    pub access_key_id_key: Option<String>,

    /// env format: the Secret key that holds the secret access key (default AWS_SECRET_ACCESS_KEY).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[-._a-zA-Z0-9]{1,253}$"))]
    pub secret_access_key_key: Option<String>,

    /// credentialsFile format: the profile name of the INI section (default "default").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[-._a-zA-Z0-9]{1,64}$"))]
    pub profile: Option<String>,

    /// template format: Secret key -> text with the placeholders {{ .AccessKeyId }},
    /// {{ .SecretAccessKey }}, {{ .UserName }}, {{ .Region }} and {{ .SesSmtpPassword }} (the SES
    /// SMTP password for this entry's `region`); plain substitution.
    /// At most 32 entries of at most 4 KiB each: bounds the CRD's CEL rules can be costed by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 32, "additionalProperties" = {"type": "string", "maxLength": 4096}))]
    pub template: Option<BTreeMap<String, String>>,

    /// sesSmtp format, and a template using {{ .SesSmtpPassword }}: the SES region the SMTP
    /// password is for (the password differs per region). Required with them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"))]
    pub region: Option<String>,

    /// sesSmtp format: the Secret key that holds the SMTP user name (default SMTP_USERNAME).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[-._a-zA-Z0-9]{1,253}$"))]
    pub username_key: Option<String>,

    /// sesSmtp format: the Secret key that holds the SMTP password (default SMTP_PASSWORD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[-._a-zA-Z0-9]{1,253}$"))]
    pub password_key: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, JsonSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum SecretFormat {
    #[default]
    Env,
    CredentialsFile,
    Template,
    SesSmtp,
}

/// The workloads restarted onto each new key.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::cel::workloads)]
pub struct WorkloadsSpec {
    /// Workloads to restart, named explicitly.
    #[serde(default)]
    pub targets: Vec<WorkloadRef>,

    /// Also restart every Deployment, StatefulSet and DaemonSet of this namespace whose pod template
    /// references one of the Secrets (env valueFrom, envFrom, volume, projected volume). Default true.
    #[serde(default = "default_true")]
    pub discover: bool,

    /// How long a rollout may take before the rotation is reported Degraded/RolloutStalled
    /// (it keeps waiting; both keys stay Active). Default 10m.
    #[serde(default = "default_rollout_timeout")]
    pub rollout_timeout: SpecDuration,
}

impl Default for WorkloadsSpec {
    fn default() -> Self {
        Self { targets: Vec::new(), discover: true, rollout_timeout: default_rollout_timeout() }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    pub kind: WorkloadKind,
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

#[derive(
    Deserialize,
    Serialize,
    Clone,
    Copy,
    Debug,
    JsonSchema,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    strum::Display,
    strum::IntoStaticStr,
)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl std::fmt::Display for WorkloadRef {
    /// `Kind/name`, as `kubectl` names objects (and the keys of status.rotation.baseline).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// When scheduled rotations may start. A key comes due between maxKeyAge - rotateBefore and half of
/// rotateBefore later (spread by the resource's uid, so resources created together do not come due
/// together); status.nextRotationTime shows the resulting time.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleSpec {
    /// A due scheduled rotation starts only inside one of these windows (none listed: at any time);
    /// one that came due while they were closed starts at its place (from its uid) in the first
    /// half of the next, so that a backlog does not start all at the opening. Until then, condition
    /// Rotating is False with reason WaitingForWindow. The windows hold
    /// even past maxKeyAge (Ready turns False, KeyExpired). They do not apply to the annotations
    /// rekey.dev/rotate and rekey.dev/rotate-emergency, to the first key, nor to a replacement for
    /// a key no Secret holds any more: those start at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub windows: Vec<RotationWindow>,
}

/// A weekly time span in which scheduled rotations may start.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::cel::window)]
pub struct RotationWindow {
    /// The days it opens on (Mon, Tue, Wed, Thu, Fri, Sat, Sun); none listed: every day. A window
    /// spanning midnight belongs to the day it opens on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 7))]
    pub days: Vec<Weekday>,
    /// When it opens, "HH:MM" (24-hour clock) in timeZone. A time a daylight-saving change skips
    /// opens it at the first instant after the skipped hour; a repeated time, at its first pass.
    #[schemars(length(max = 5), pattern(r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub start: String,
    /// When it closes, "HH:MM" in timeZone; earlier than start: on the next day (the window spans
    /// midnight). Equal to start is refused. A repeated time closes it at its second pass.
    #[schemars(length(max = 5), pattern(r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub end: String,
    /// The IANA time zone start and end are in, e.g. Europe/Berlin (default UTC).
    #[serde(default = "default_time_zone")]
    #[schemars(length(max = 64))]
    pub time_zone: String,
}

fn default_time_zone() -> String {
    "UTC".into()
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, JsonSchema, PartialEq, Eq, strum::Display)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// How and when the old key is retired.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetirementSpec {
    /// Wait this long after every workload runs on the new key before deactivating the old one.
    #[serde(default = "default_zero")]
    pub deactivate_after: SpecDuration,
    /// How long the old key stays Inactive, with the workloads watched, before it is deleted.
    #[serde(default = "default_delete_after")]
    pub delete_after: SpecDuration,
    /// If more than 0s: deactivate only once IAM shows the old key unused for this long.
    #[serde(default = "default_zero")]
    pub require_old_key_unused_for: SpecDuration,
}

impl Default for RetirementSpec {
    fn default() -> Self {
        Self {
            deactivate_after: default_zero(),
            delete_after: default_delete_after(),
            require_old_key_unused_for: default_zero(),
        }
    }
}

/// When an emergency rotation (a leaked key) switches the leaked key off.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EmergencySpec {
    /// AfterRollout (default): the workloads are restarted at once and the leaked key is switched
    /// off (Inactive) the moment their new pods are Ready and no pod of the old template is left,
    /// without deactivateAfter, requireOldKeyUnusedFor or a soak, and no later than maxWait even if
    /// the rollout hangs. Immediately: as soon as the Secrets hold the new key, whoever still uses
    /// it (pods not yet replaced lose access until they are).
    #[serde(default)]
    pub switch_off: SwitchOff,
    /// AfterRollout: the longest the leaked key stays Active once the Secrets hold the new key
    /// (1s to 1h, default 5m).
    #[serde(default = "default_max_wait")]
    pub max_wait: SpecDuration,
}

impl Default for EmergencySpec {
    fn default() -> Self {
        Self { switch_off: SwitchOff::default(), max_wait: default_max_wait() }
    }
}

fn default_max_wait() -> SpecDuration {
    SpecDuration::new("5m")
}

/// When an emergency switches the leaked key off.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, JsonSchema, PartialEq, Eq, Default, strum::Display)]
pub enum SwitchOff {
    /// Once the workloads run on the new key, at most spec.emergency.maxWait after the handover.
    #[default]
    AfterRollout,
    /// As soon as the Secrets hold the new key (exposure first: pods not yet replaced lose access).
    Immediately,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, JsonSchema, PartialEq, Eq, Default, strum::Display)]
pub enum DeletionPolicy {
    #[default]
    Retain,
    Delete,
}

#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AwsSpec {
    /// AWS region (IAM is global) where the new key is verified with STS, and the template's
    /// {{ .Region }}. Defaults to the operator's (--region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"))]
    pub region: Option<String>,
    /// Role assumed for this resource's IAM calls, with ExternalId "<cluster>/<namespace>".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[\w+=,.@/-]{1,512}$"))]
    pub role_arn: Option<String>,
}

/// Where a rotation stands.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, JsonSchema, PartialEq, Eq, Default, strum::Display, strum::IntoStaticStr,
)]
pub enum Phase {
    #[default]
    Idle,
    Creating,
    Verifying,
    Distributing,
    RollingOut,
    Deactivating,
    Soaking,
    Deleting,
}

/// A key rekey tracks.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    /// The access key id (the secret access key is only ever in the Secrets).
    pub access_key_id: String,
    /// When IAM created the key: its age, compared with maxKeyAge, counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Time>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, JsonSchema, PartialEq, Eq, strum::Display)]
pub enum KeyState {
    Active,
    Inactive,
}

/// The key being retired.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetiringKey {
    /// The access key id.
    pub access_key_id: String,
    /// Active until rekey deactivates it, then Inactive until it is deleted.
    pub state: KeyState,
    /// When rekey deactivated it: retirement.deleteAfter counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deactivated_at: Option<Time>,
}

/// Write-ahead marker committed before CreateAccessKey: if the operator dies before the new key is
/// recorded, recovery finds the key created in between (docs/design.md, rule 3).
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Pending {
    /// When the attempt began (a key created before it, less IAM's clock slack, is not its orphan).
    pub started_at: Time,
    /// The user's keys before the attempt.
    pub known_key_ids: Vec<String>,
    /// A CreateAccessKey may be in flight. False once IAM answered that it created nothing (an SCP,
    /// LimitExceeded): a key that appears before the next attempt is someone else's, never an orphan.
    #[serde(default = "default_true")]
    pub in_flight: bool,
}

impl Pending {
    /// A new attempt, about to call CreateAccessKey, with the keys the user has now.
    pub fn attempt(now: Timestamp, known_key_ids: Vec<String>) -> Self {
        Self { started_at: Time(now), known_key_ids, in_flight: true }
    }
}

/// Why a rotation started.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, JsonSchema, PartialEq, Eq, strum::Display)]
pub enum Trigger {
    Bootstrap,
    Scheduled,
    Requested,
    Emergency,
}

/// Progress of the rotation in flight, kept in status so a restarted operator resumes it.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RotationProgress {
    /// Why it started: Bootstrap (no key yet), Scheduled (maxKeyAge - rotateBefore reached),
    /// Requested (rekey.dev/rotate) or Emergency (rekey.dev/rotate-emergency).
    pub trigger: Trigger,
    /// When it started.
    pub started_at: Time,
    /// When the current phase began (rollout timeout, deactivateAfter and the soak count from it).
    pub phase_since: Time,
    /// Soak baseline: Ready pods per workload ("Kind/name") when the soak began.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub baseline: BTreeMap<String, i32>,
    /// Since when a workload has been below its baseline (the 30 s rule), per workload.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub below_since: BTreeMap<String, Time>,
    /// Verification attempts made on the new key.
    #[serde(default)]
    pub verify_attempts: u32,
    /// How often another writer put a different key into a target Secret during this rotation
    /// (rekey writes the active key back once; a second time it stops and asks a human).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reverts: u32,
    /// A revert is being undone (write-ahead: set before the active key is written back and the
    /// workloads restarted, cleared once both are done).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reverting: bool,
    /// The value of the workloads' `rekey.dev/restarted-at` after the last revert: a pod without it
    /// may have started on the reverted key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
    /// When every target Secret last received the active key: a pod created later reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed_over_at: Option<Time>,
    /// An emergency: since when the leaked key is waited on (the handover, the escalation of a
    /// rotation already handed over, or its resumption after a park); spec.emergency.maxWait
    /// counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emergency_since: Option<Time>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl RotationProgress {
    /// A rotation starting now.
    pub fn start(trigger: Trigger, now: Timestamp) -> Self {
        Self {
            trigger,
            started_at: Time(now),
            phase_since: Time(now),
            baseline: BTreeMap::new(),
            below_since: BTreeMap::new(),
            verify_attempts: 0,
            reverts: 0,
            reverting: false,
            restart: None,
            handed_over_at: None,
            emergency_since: None,
        }
    }
}

/// One finished rotation.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// The key that was in use when the rotation started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_key_id: Option<String>,
    /// The key the rotation created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_key_id: Option<String>,
    /// When the rotation started.
    pub started_at: Time,
    /// When it ended.
    pub ended_at: Time,
    pub outcome: HistoryOutcome,
}

/// How a rotation ended.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, JsonSchema, PartialEq, Eq, strum::Display)]
pub enum HistoryOutcome {
    /// The old key was deleted; the new one is in use.
    Completed,
    /// The first key was put in place (nothing was replaced).
    Bootstrapped,
    /// Given up before anyone had the new key, which was deleted; the old key stays in use.
    Abandoned,
}

/// What rekey observed and did: the keys it tracks, the rotation in flight (phase, write-ahead
/// marker), counters, history and conditions. Written by rekey only; enough to resume after a restart.
#[derive(Deserialize, Serialize, Clone, Debug, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = drop_time_boilerplate)]
pub struct IamKeyRotationStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where the rotation in flight stands; Idle when none is.
    #[serde(default)]
    pub phase: Phase,
    /// The IAM user whose keys this status tracks: spec.userName as it was when they were created
    /// or adopted. An edit of spec.userName is refused while keys of this user are tracked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_name: Option<String>,
    /// The key the Secrets hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_key: Option<KeyRef>,
    /// During a rotation, once created: the key that replaces activeKey.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_key: Option<KeyRef>,
    /// The previous key, on its way out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring_key: Option<RetiringKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationProgress>,
    /// When the last rotation ended with its new key in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation_time: Option<Time>,
    /// When the next scheduled rotation starts: the active key's creation + maxKeyAge - rotateBefore,
    /// plus this resource's spread (0 to half of rotateBefore, from its uid); if that falls outside
    /// spec.schedule.windows, this resource's place (from its uid) in the first half of the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_time: Option<Time>,
    /// Rotations completed.
    #[serde(default)]
    pub rotations: u32,
    /// Failed attempts in a row: the retry backoff (10 s doubling, at most 10 min) counts from them.
    #[serde(default)]
    pub failed_attempts: u32,
    /// When a step last failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// The last rekey.dev/rotate value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotate_request: Option<String>,
    /// The last rekey.dev/rotate-emergency value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_emergency_request: Option<String>,
    /// The last rekey.dev/retire value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_retire_request: Option<String>,
    /// With dryRun or suspend: the step rekey would take next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned_step: Option<String>,
    /// The last 10 rotations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEntry>,
    /// Ready (a verified key is in place and younger than maxKeyAge), Rotating, Degraded (something
    /// is wrong but the Secrets work), Stalled (rekey needs a person), Reconciling (no key yet).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// k8s-openapi's `Time` brings its Go doc ("Time is a wrapper around time.Time ...") to every field
/// of that type; `kubectl explain` would repeat it a dozen times. The fields say what they mean.
fn drop_time_boilerplate(schema: &mut schemars::Schema) {
    use schemars::transform::{RecursiveTransform, Transform as _};
    let mut drop = RecursiveTransform(|s: &mut schemars::Schema| {
        let boilerplate =
            s.get("description").and_then(|d| d.as_str()).is_some_and(|d| d.starts_with("Time is a wrapper"));
        if boilerplate {
            s.remove("description");
        }
        // OpenAPI knows int32 and int64; the apiserver warns on schemars' "uint32" at every apply.
        if s.get("format").and_then(|f| f.as_str()) == Some("uint32") {
            s.remove("format");
        }
    });
    drop.transform(schema);
}

impl IamKeyRotationStatus {
    /// Whether the rotation in flight is an emergency: the old key is leaked, so it goes as soon
    /// as the workloads run on the new one (spec.emergency), without a soak.
    pub fn emergency(&self) -> bool {
        self.rotation.as_ref().is_some_and(|r| r.trigger == Trigger::Emergency)
    }
}
