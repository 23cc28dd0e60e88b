//! Every step `perform` handles, against FakeIam and FakeKube: what a user would notice after it
//! (IAM keys and claims, Secret contents, workload stamps, status, Events), and each safety
//! re-check made at act time, with the world changed by a human after the snapshot was taken.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Resource as _;
use kube::api::Api;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::json;

use super::{Env, Outcome, perform};
use crate::api::{
    ACCESS_KEY_ANNOTATION, HistoryOutcome, IamKeyRotation, IamKeyRotationStatus, KeyRef, KeyState, Pending, Phase,
    RetiringKey, RotationProgress, SecretTarget, Trigger, WorkloadKind, WorkloadRef,
};
use crate::error::Error;
use crate::fake::kube::kind_path;
use crate::fake::{FakeIam, FakeKube};
use crate::iam::Iam as _;
use crate::ownership::{Identity, claim_value};
use crate::plan::cleanup::CleanupPlan;
use crate::plan::{
    DegradeReason, IamState, Observed, Requests, SecretState, StallReason, Step, Withheld, WorkloadState,
    WorkloadsState,
};
use crate::secrets::{self, AccessKey, RenderContext};
use crate::validate::{self, ValidSpec};

const USER: &str = "billing-app";
const NS: &str = "payments";
const NAME: &str = "billing";
const UID: &str = "5f0c2a9e-1111-4222-8333-444455556666";
const TARGETS: [&str; 2] = ["a", "b"];

/// One resource, its IAM user and its Secrets, the snapshot a decision was made on, and the
/// status copy the step changes.
struct Fx {
    iam: FakeIam,
    kube: FakeKube,
    client: kube::Client,
    obj: IamKeyRotation,
    valid: ValidSpec,
    identity: Identity,
    observed: Observed,
    region: String,
    st: IamKeyRotationStatus,
}

impl Fx {
    /// A consenting user without keys; targets `a` and `b` exist, each with data of its own
    /// (`OTHER`) that rekey must never touch. Call inside a Tokio runtime.
    fn new() -> Self {
        let identity = Identity { cluster: "prod".into(), namespace: NS.into(), name: NAME.into() };
        let iam = FakeIam::new();
        let consent = identity.consent_tag();
        iam.add_user(USER, &[(consent.as_str(), "prod")]);
        let (kube, client) = FakeKube::new();
        let obj: IamKeyRotation = serde_json::from_value(json!({
            "apiVersion": "rekey.dev/v1alpha1", "kind": "IamKeyRotation",
            "metadata": {"name": NAME, "namespace": NS, "uid": UID},
            "spec": {"userName": USER, "secrets": [{"name": "a"}, {"name": "b"}]},
        }))
        .unwrap();
        kube.put(&obj);
        for name in TARGETS {
            kube.put(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
                "stringData": {"OTHER": "kept"}}));
        }
        let valid = validate::validate(&obj.spec).unwrap();
        let observed = Observed {
            now: iam.now(),
            requests: Requests::default(),
            secrets: Vec::new(),
            staging_key: None,
            iam: None,
            workloads: None,
            other_resource: None,
            resources: None,
            gitops_managed: Vec::new(),
            immutable: Vec::new(),
            conflicts: Vec::new(),
            writers: Default::default(),
            written_at: None,
        };
        let st = IamKeyRotationStatus::default();
        Self { iam, kube, client, obj, valid, identity, observed, region: "us-east-1".into(), st }
    }

    /// Takes the snapshot a decision is made on, as `observe` does, and starts both logs afresh:
    /// what a test finds in them afterwards is what the step did.
    async fn observe(&mut self) {
        let api = self.secrets();
        let mut states = Vec::new();
        for t in &self.obj.spec.secrets {
            states.push((t.name.clone(), secrets::held(t, api.get_opt(&t.name).await.unwrap().as_ref())));
        }
        let staging = api.get_opt(&secrets::staging_name(NAME)).await.unwrap();
        let staging_key = match secrets::held(&secrets::staging_target(NAME), staging.as_ref()) {
            SecretState::Holds(id) => Some(id),
            _ => None,
        };
        let iam = IamState {
            user_exists: true,
            keys: self.iam.keys(USER),
            tags: self.iam.tags(USER).unwrap_or_default(),
            retiring_last_used: None,
            operator_user: None,
        };
        self.observed.now = self.iam.now();
        self.observed.secrets = states;
        self.observed.staging_key = staging_key;
        self.observed.iam = Some(iam);
        self.observed.workloads = Some(WorkloadsState::default());
        self.kube.clear_requests();
        self.iam.clear_calls();
    }

    async fn run(&mut self, step: &Step) -> Result<Outcome, Error> {
        let env = Env {
            client: &self.client,
            iam: &self.iam,
            obj: &self.obj,
            valid: &self.valid,
            observed: &self.observed,
            identity: &self.identity,
            region: &self.region,
        };
        perform(&env, &mut self.st, step).await
    }

    async fn cleanup(&self, plan: &CleanupPlan) -> Vec<String> {
        super::cleanup(&self.client, &self.iam, &self.obj, USER, plan).await
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), NS)
    }

    fn now(&self) -> Timestamp {
        self.observed.now
    }

    fn ago(&self, secs: i64) -> Timestamp {
        self.now().checked_sub(SignedDuration::from_secs(secs)).unwrap()
    }

    /// A target by name; any other name is the staging Secret.
    fn target(&self, name: &str) -> SecretTarget {
        let t = self.obj.spec.secrets.iter().find(|t| t.name == name);
        t.cloned().unwrap_or_else(|| secrets::staging_target(NAME))
    }

    fn access(&self, id: &str) -> AccessKey {
        self.iam.secret_of(id).unwrap()
    }

    /// A key written as rekey's earlier steps write it: under its own field manager.
    async fn hold(&self, name: &str, key: &AccessKey) {
        let ctx = RenderContext { user_name: USER.into(), region: self.region.clone() };
        secrets::write_target(&self.secrets(), NAME, &self.target(name), key, &ctx, false).await.unwrap();
    }

    async fn stage(&self, key: &AccessKey) {
        let owner = self.obj.controller_owner_ref(&()).unwrap();
        secrets::ensure_staging(&self.secrets(), NAME, owner).await.unwrap();
        secrets::write_staging(&self.secrets(), NAME, key, false).await.unwrap();
    }

    async fn claim(&self, id: &str) {
        self.iam.tag_user(USER, id, &claim_value(&self.identity.owner())).await.unwrap();
    }

    fn secret(&self, name: &str) -> Option<Secret> {
        self.kube.object::<Secret>(NS, name)
    }

    /// The key a Secret holds now, with its secret.
    fn read(&self, name: &str) -> Option<AccessKey> {
        secrets::read_key(&self.target(name), &self.secret(name)?)
    }

    fn read_id(&self, name: &str) -> Option<String> {
        self.read(name).map(|k| k.id)
    }

    fn other_data(&self, name: &str) -> Option<String> {
        let s = self.secret(name)?;
        s.data?.get("OTHER").map(|v| String::from_utf8(v.0.clone()).unwrap())
    }

    fn staging(&self) -> Option<Secret> {
        self.secret(&secrets::staging_name(NAME))
    }

    /// Active (Some(true)), Inactive (Some(false)) or gone (None) in IAM.
    fn active_in_iam(&self, id: &str) -> Option<bool> {
        self.iam.keys(USER).iter().find(|k| k.id == id).map(|k| k.active)
    }

    fn claimed(&self, id: &str) -> bool {
        self.iam.tags(USER).unwrap_or_default().get(id) == Some(&claim_value(&self.identity.owner()))
    }

    fn key_ref(&self, id: &str) -> KeyRef {
        let created = self.iam.keys(USER).iter().find(|k| k.id == id).map(|k| k.created).unwrap();
        KeyRef { access_key_id: id.into(), created_at: Some(Time(created)) }
    }

    /// The writes the apiserver received (verb, object, dry run); reads left out.
    fn writes(&self) -> Vec<(&'static str, String, bool)> {
        let all = self.kube.requests().into_iter().filter(|r| !matches!(r.verb, "get" | "list"));
        all.map(|r| (r.verb, r.name.unwrap_or_default(), r.dry_run)).collect()
    }

    /// Idle with key OLD, claimed, in both targets.
    async fn idle(&mut self) -> String {
        let old = self.iam.add_key(USER, true);
        self.claim(&old).await;
        for t in TARGETS {
            self.hold(t, &self.access(&old)).await;
        }
        self.st.active_key = Some(self.key_ref(&old));
        self.observe().await;
        old
    }

    /// Mid-rotation in `phase`: OLD in the targets, NEW (from CreateAccessKey, so subject to
    /// `set_propagation`) claimed, in the staging Secret and in status.newKey.
    async fn rotating(&mut self, phase: Phase) -> (String, String) {
        let old = self.idle().await;
        let (key, _) = self.iam.create_key(USER).await.unwrap();
        self.claim(&key.id).await;
        self.stage(&key).await;
        self.st.new_key = Some(self.key_ref(&key.id));
        self.st.phase = phase;
        self.st.rotation = Some(RotationProgress::start(Trigger::Scheduled, self.ago(120)));
        self.observe().await;
        (old, key.id)
    }

    /// Past the handover, in `phase`: NEW active and in the targets, OLD retiring, Active or
    /// Inactive (an hour ago) in IAM and status alike.
    /// A rotation started by `trigger` from Idle, its new key created: the new key id.
    async fn created(&mut self, trigger: Trigger) -> String {
        self.idle().await;
        self.run(&Step::Begin { trigger }).await.unwrap();
        self.observe().await;
        self.run(&Step::Create).await.unwrap();
        self.st.new_key.clone().unwrap().access_key_id
    }

    async fn retiring(&mut self, phase: Phase, old_active: bool) -> (String, String) {
        let (old, new) = self.rotating(phase).await;
        for t in TARGETS {
            self.hold(t, &self.access(&new)).await;
        }
        self.iam.set_active(USER, &old, old_active);
        self.st.active_key = self.st.new_key.take();
        let state = if old_active { KeyState::Active } else { KeyState::Inactive };
        let deactivated_at = (!old_active).then(|| Time(self.ago(3600)));
        self.st.retiring_key = Some(RetiringKey { access_key_id: old.clone(), state, deactivated_at });
        self.observe().await;
        (old, new)
    }
}

fn reasons(out: &Outcome) -> Vec<&str> {
    out.events.iter().map(|e| e.reason.as_str()).collect()
}

/// The step was refused by a safety re-check.
fn refused(r: Result<Outcome, Error>) -> String {
    match r {
        Err(e) => {
            assert_eq!(e.category(), "SafetyCheckFailed", "{e}");
            e.to_string()
        }
        Ok(out) => panic!("expected a refusal, got {out:?}"),
    }
}

/// When a key made at `created` is due: maxKeyAge 90d less rotateBefore 10d.
fn due(created: &KeyRef) -> Option<Time> {
    created.created_at.as_ref().map(|c| Time(c.0.checked_add(SignedDuration::from_hours(80 * 24)).unwrap()))
}

fn workload(kind: WorkloadKind, name: &str) -> WorkloadRef {
    WorkloadRef { kind, name: name.into() }
}

fn web() -> WorkloadRef {
    workload(WorkloadKind::Deployment, "web")
}

fn stray_key() -> AccessKey {
    AccessKey { id: "AKIASTRAY00000000000".into(), secret: SecretString::from("stray-secret".to_owned()) }
}

// ---------------------------------------------------------------------------------------------
// Adopt, Fill

#[tokio::test]
async fn adopt_tracks_the_key_in_the_secrets_and_its_retired_partner() {
    // Either way the workloads are rolled onto the adopted key before the partner is retired.
    for (partner_active, phase, state) in
        [(false, Phase::RollingOut, KeyState::Inactive), (true, Phase::RollingOut, KeyState::Active)]
    {
        let mut fx = Fx::new();
        let held = fx.iam.add_key(USER, true);
        let partner = fx.iam.add_key(USER, partner_active);
        fx.observe().await;
        let created = fx.iam.keys(USER)[0].created;
        let step = Step::Adopt { key_id: held.clone(), created, partner: Some((partner.clone(), partner_active)) };
        let out = fx.run(&step).await.unwrap();
        let active = fx.st.active_key.clone().unwrap();
        assert_eq!(active, fx.key_ref(&held));
        assert_eq!(fx.st.next_rotation_time, due(&active));
        let retiring = fx.st.retiring_key.clone().unwrap();
        assert_eq!((retiring.access_key_id.as_str(), retiring.state), (partner.as_str(), state));
        // An Inactive partner's soak counts from now: rekey does not know when it went Inactive.
        assert_eq!(retiring.deactivated_at, (!partner_active).then_some(Time(fx.now())));
        assert_eq!(fx.st.phase, phase);
        assert_eq!(reasons(&out), ["Adopted", "AdoptedRetiringKey"]);
        assert!(out.precondition);
        // The adopted key is claimed like a created one; nothing else is written.
        assert_eq!(fx.iam.operations(), ["TagUser"]);
        assert!(fx.iam.tags(USER).unwrap().get(&held).is_some_and(|v| v.starts_with("rekey:")));
        assert!(fx.writes().is_empty(), "adopting writes no Secret");
    }
}

#[tokio::test]
async fn adopt_without_a_partner_stays_idle() {
    let mut fx = Fx::new();
    let held = fx.iam.add_key(USER, true);
    fx.observe().await;
    let created = fx.iam.keys(USER)[0].created;
    let out = fx.run(&Step::Adopt { key_id: held.clone(), created, partner: None }).await.unwrap();
    assert_eq!(fx.st.active_key, Some(fx.key_ref(&held)));
    assert_eq!((fx.st.phase, fx.st.retiring_key.is_none(), fx.st.rotation.is_none()), (Phase::Idle, true, true));
    assert_eq!(reasons(&out), ["Adopted"]);
    assert!(out.precondition);
    assert_eq!(fx.iam.operations(), ["TagUser"]);
}

#[tokio::test]
async fn fill_copies_the_active_key_into_a_secret_that_lost_it() {
    let mut fx = Fx::new();
    let old = fx.idle().await;
    fx.kube.remove(&kind_path::<Secret>(), NS, "b");
    fx.observe().await;
    let out = fx.run(&Step::Fill { from: "a".into(), to: vec!["b".into()] }).await.unwrap();
    let copied = fx.read("b").unwrap();
    assert_eq!(copied.id, old);
    assert_eq!(copied.secret.expose_secret(), fx.access(&old).secret.expose_secret());
    assert_eq!(fx.read_id("a"), Some(old));
    assert_eq!(fx.other_data("a").as_deref(), Some("kept"));
    assert_eq!(reasons(&out), ["SecretsFilled"]);
    assert_eq!((out.requeue, out.precondition), (Some(Duration::from_secs(1)), false));
    assert!(fx.iam.operations().is_empty());
}

/// Safety re-check 5: the source is read again at act time.
#[tokio::test]
async fn fill_copies_nothing_when_the_source_was_edited_after_the_decision() {
    let mut fx = Fx::new();
    let old = fx.idle().await;
    fx.kube.remove(&kind_path::<Secret>(), NS, "b");
    fx.observe().await;
    // A human puts another key of the user into the source after the snapshot.
    let other = fx.iam.add_key(USER, true);
    fx.hold("a", &fx.access(&other)).await;
    fx.kube.clear_requests();
    let why = refused(fx.run(&Step::Fill { from: "a".into(), to: vec!["b".into()] }).await);
    assert!(why.contains(&other) && why.contains(&old), "{why}");
    assert!(fx.secret("b").is_none(), "nothing copied");
    assert!(fx.writes().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Begin, Create, DeleteOrphan, RecordNewKey

#[tokio::test]
async fn begin_commits_the_marker_after_a_preflight_that_persists_nothing() {
    let mut fx = Fx::new();
    let old = fx.idle().await;
    fx.kube.remove(&kind_path::<Secret>(), NS, "b");
    // A leftover of an abandoned attempt: emptied by the preflight.
    fx.stage(&stray_key()).await;
    fx.observe().await;
    fx.observed.requests.rotate = Some("r1".into());
    let a_before = fx.secret("a").unwrap().metadata.resource_version;
    let out = fx.run(&Step::Begin { trigger: Trigger::Requested }).await.unwrap();

    let pending = fx.st.pending.clone().unwrap();
    assert_eq!((pending.known_key_ids, pending.started_at), (vec![old.clone()], Time(fx.now())));
    assert_eq!(fx.st.phase, Phase::Creating);
    assert_eq!(fx.st.rotation.as_ref().map(|r| r.trigger), Some(Trigger::Requested));
    assert_eq!(fx.st.last_rotate_request.as_deref(), Some("r1"));
    assert_eq!((reasons(&out), out.precondition, out.requeue), (vec!["Creating"], true, Some(Duration::ZERO)));

    assert_eq!(fx.secret("a").unwrap().metadata.resource_version, a_before, "the dry run changed nothing");
    assert_eq!(fx.read_id("a"), Some(old));
    assert!(fx.secret("b").is_none(), "the dry run created nothing");
    let target_writes: Vec<_> = fx.writes().into_iter().filter(|(_, n, _)| TARGETS.contains(&n.as_str())).collect();
    assert_eq!(target_writes.len(), 2);
    assert!(target_writes.iter().all(|(_, _, dry)| *dry), "{target_writes:?}");
    let staging = fx.staging().unwrap();
    assert_eq!(secrets::held(&fx.target("staging"), Some(&staging)), SecretState::Empty);
    let owner = &staging.metadata.owner_references.unwrap()[0];
    assert_eq!((owner.uid.as_str(), owner.controller), (UID, Some(true)));
    assert!(fx.iam.operations().is_empty(), "begin makes no IAM call");
}

/// No write that changes nothing: a staging Secret created empty by the preflight is not cleared.
#[tokio::test]
async fn begin_writes_the_staging_secret_only_to_create_it_when_there_is_no_leftover() {
    let mut fx = Fx::new();
    fx.idle().await;
    fx.observe().await;
    fx.run(&Step::Begin { trigger: Trigger::Requested }).await.unwrap();
    let persisted: Vec<_> = fx.writes().into_iter().filter(|(_, _, dry)| !dry).map(|(verb, _, _)| verb).collect();
    assert_eq!(persisted, ["create"], "the staging Secret created, and no clearing patch");
    assert_eq!(secrets::held(&fx.target("staging"), fx.staging().as_ref()), SecretState::Empty);
}

/// Safety re-check 10: a target that cannot take the key fails the step while failing is free.
#[tokio::test]
async fn begin_fails_before_any_iam_call_when_a_target_refuses_writes() {
    let mut fx = Fx::new();
    fx.idle().await;
    let mut b = fx.kube.get(&kind_path::<Secret>(), NS, "b").unwrap();
    b["immutable"] = json!(true);
    fx.kube.put(b);
    fx.observe().await;
    let before = fx.st.clone();
    let err = fx.run(&Step::Begin { trigger: Trigger::Scheduled }).await.unwrap_err();
    assert_eq!(err.category(), "SecretWriteFailed");
    assert!(err.to_string().contains("Secret b"), "{err}");
    assert_eq!(fx.st, before, "no marker: the plan will not go on to Create");
    assert!(fx.iam.operations().is_empty(), "no IAM call, so no CreateAccessKey");
}

#[tokio::test]
async fn create_puts_the_new_key_into_staging_then_status_and_claims_it() {
    let mut fx = Fx::new();
    let old = fx.idle().await;
    fx.run(&Step::Begin { trigger: Trigger::Scheduled }).await.unwrap();
    fx.observe().await;
    let out = fx.run(&Step::Create).await.unwrap();
    let new = fx.iam.keys(USER).into_iter().find(|k| k.id != old).unwrap();
    let staged = fx.read(&secrets::staging_name(NAME)).unwrap();
    assert_eq!(staged.id, new.id);
    assert_eq!(staged.secret.expose_secret(), fx.access(&new.id).secret.expose_secret());
    assert_eq!(fx.st.new_key, Some(KeyRef { access_key_id: new.id.clone(), created_at: Some(Time(new.created)) }));
    assert_eq!((fx.st.pending.is_none(), fx.st.phase), (true, Phase::Verifying));
    assert!(fx.claimed(&new.id));
    assert_eq!(fx.iam.operations(), ["CreateAccessKey", "TagUser"]);
    assert_eq!(reasons(&out), ["Created"]);
    // A concurrent edit of the resource must not keep the new key out of status.
    assert!(!out.precondition);
    assert_eq!(fx.read_id("a"), Some(old), "the targets get it only once verified");
}

/// Safety re-check 9: the claim is best effort, and the secret goes to the staging Secret only.
#[tokio::test]
async fn a_failed_claim_tag_is_a_warning_event_and_the_secret_stays_in_staging() {
    let mut fx = Fx::new();
    fx.idle().await;
    fx.run(&Step::Begin { trigger: Trigger::Scheduled }).await.unwrap();
    fx.observe().await;
    fx.iam.fail_next("TagUser", "LimitExceeded");
    let out = fx.run(&Step::Create).await.unwrap();
    let new = fx.st.new_key.clone().unwrap().access_key_id;
    assert_eq!(reasons(&out), ["Created", "TagFailed"]);
    assert!(out.events[1].warning && out.events[1].message.contains(&new));
    assert!(!fx.claimed(&new));
    let secret = fx.access(&new).secret.expose_secret().to_owned();
    assert_eq!(fx.read(&secrets::staging_name(NAME)).unwrap().secret.expose_secret(), secret);
    assert_eq!(fx.st.phase, Phase::Verifying);
    for (what, text) in [
        ("status", format!("{:?} {}", fx.st, serde_json::to_string(&fx.st).unwrap())),
        ("events", format!("{:?}", out.events)),
        ("IAM call log", format!("{:?}", fx.iam.calls())),
        ("apiserver requests", format!("{:?}", fx.kube.requests())),
    ] {
        assert!(!text.contains(&secret), "the new key's secret is in the {what}");
    }
}

/// Safety re-check 8: only a key on the fresh list is deleted; the marker takes the rest.
#[tokio::test]
async fn delete_orphan_deletes_the_orphan_and_renews_the_marker() {
    let mut fx = Fx::new();
    let old = fx.idle().await;
    let orphan = fx.iam.add_key(USER, true);
    fx.st.phase = Phase::Creating;
    fx.st.pending = Some(Pending::attempt(fx.ago(60), vec![old.clone()]));
    fx.observe().await;
    let out = fx.run(&Step::DeleteOrphan { key_id: orphan.clone() }).await.unwrap();
    assert_eq!(fx.active_in_iam(&orphan), None);
    assert_eq!(fx.active_in_iam(&old), Some(true));
    assert_eq!(fx.iam.operations(), ["ListAccessKeys", "DeleteAccessKey", "UntagUser"]);
    assert_eq!(fx.iam.calls()[1].key_id.as_deref(), Some(orphan.as_str()));
    let pending = fx.st.pending.clone().unwrap();
    assert_eq!((pending.known_key_ids, pending.started_at), (vec![old], Time(fx.now())));
    assert_eq!(fx.st.phase, Phase::Creating);
    assert_eq!(reasons(&out), ["OrphanDeleted"]);
    assert!(out.events[0].warning && out.precondition);
}

#[tokio::test]
async fn delete_orphan_of_a_key_gone_since_the_snapshot_deletes_nothing() {
    let mut fx = Fx::new();
    let old = fx.idle().await;
    let orphan = fx.iam.add_key(USER, true);
    fx.st.phase = Phase::Creating;
    fx.st.pending = Some(Pending::attempt(fx.ago(60), vec![old.clone()]));
    fx.observe().await;
    fx.iam.remove_key(USER, &orphan);
    fx.run(&Step::DeleteOrphan { key_id: orphan }).await.unwrap();
    assert_eq!(fx.iam.operations(), ["ListAccessKeys"]);
    assert_eq!(fx.st.pending.unwrap().known_key_ids, vec![old]);
}

#[tokio::test]
async fn record_new_key_records_the_staged_key_and_drops_the_marker() {
    let mut fx = Fx::new();
    let (_, new) = fx.rotating(Phase::Creating).await;
    fx.st.new_key = None;
    fx.st.pending = Some(Pending::attempt(fx.ago(60), vec![]));
    let created = fx.iam.keys(USER)[1].created;
    let out = fx.run(&Step::RecordNewKey { key_id: new.clone(), created }).await.unwrap();
    assert_eq!(fx.st.new_key, Some(fx.key_ref(&new)));
    assert_eq!((fx.st.pending.is_none(), fx.st.phase), (true, Phase::Verifying));
    assert_eq!(fx.st.rotation.as_ref().unwrap().phase_since, Time(fx.now()));
    assert!(out.precondition && out.events.is_empty());
    assert!(fx.iam.operations().is_empty() && fx.writes().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Verify, Abandon, Distribute

/// Safety re-check 11: STS goes to the resource's region; propagation is waited out.
#[tokio::test]
async fn verify_asks_sts_in_the_resources_region_and_waits_out_propagation() {
    let mut fx = Fx::new();
    fx.region = "eu-west-1".into();
    fx.iam.set_propagation(2);
    let (_, new) = fx.rotating(Phase::Verifying).await;
    for (attempt, wait) in [(1, 1), (2, 2)] {
        let out = fx.run(&Step::Verify { key_id: new.clone() }).await.unwrap();
        assert_eq!(reasons(&out), ["VerificationPending"]);
        assert_eq!((out.requeue, out.precondition), (Some(Duration::from_secs(wait)), false));
        assert_eq!(fx.st.rotation.as_ref().unwrap().verify_attempts, attempt);
        assert_eq!(fx.st.phase, Phase::Verifying);
    }
    let out = fx.run(&Step::Verify { key_id: new.clone() }).await.unwrap();
    assert_eq!(reasons(&out), ["Verified"]);
    assert_eq!((fx.st.phase, out.precondition), (Phase::Distributing, true));
    let calls = fx.iam.calls();
    assert_eq!(calls.len(), 3);
    for c in calls {
        assert_eq!((c.operation, c.key_id.as_deref()), ("GetCallerIdentity", Some(new.as_str())));
        assert_eq!(c.detail.as_deref(), Some("eu-west-1"));
    }
}

/// Safety re-check 6 (verify): the staged key must be the one the step names.
#[tokio::test]
async fn verify_refuses_a_staging_secret_holding_another_key() {
    let mut fx = Fx::new();
    let (_, new) = fx.rotating(Phase::Verifying).await;
    fx.stage(&stray_key()).await;
    fx.iam.clear_calls();
    let why = refused(fx.run(&Step::Verify { key_id: new }).await);
    assert!(why.contains("AKIASTRAY00000000000"), "{why}");
    assert!(fx.iam.operations().is_empty(), "no STS call");
    assert_eq!(fx.st.phase, Phase::Verifying);
}

#[tokio::test]
async fn verify_refuses_a_key_that_authenticates_as_another_user() {
    let mut fx = Fx::new();
    fx.rotating(Phase::Verifying).await;
    fx.iam.add_user("someone-else", &[]);
    let foreign = fx.iam.add_key("someone-else", true);
    fx.stage(&fx.access(&foreign)).await;
    let why = refused(fx.run(&Step::Verify { key_id: foreign }).await);
    assert!(why.contains("user/someone-else"), "{why}");
    assert_eq!(fx.st.phase, Phase::Verifying);
}

#[tokio::test]
async fn abandon_deletes_a_new_key_nobody_has_and_goes_back_to_idle() {
    let mut fx = Fx::new();
    let (old, new) = fx.rotating(Phase::Verifying).await;
    let started = fx.st.rotation.as_ref().unwrap().started_at.clone();
    let reason = DegradeReason::VerificationFailed;
    let out = fx.run(&Step::Abandon { delete_key: Some(new.clone()), reason, message: "gave up".into() }).await;
    let out = out.unwrap();
    assert_eq!(fx.active_in_iam(&new), None);
    assert!(!fx.claimed(&new) && fx.claimed(&old));
    assert!(fx.staging().is_none());
    assert_eq!(fx.read_id("a"), Some(old.clone()));
    assert_eq!(fx.st.phase, Phase::Idle);
    assert_eq!(fx.st.active_key, Some(fx.key_ref(&old)));
    assert!(fx.st.new_key.is_none() && fx.st.pending.is_none() && fx.st.rotation.is_none());
    let h = fx.st.history.last().unwrap();
    assert_eq!((h.old_key_id.as_deref(), h.new_key_id.as_deref()), (Some(old.as_str()), Some(new.as_str())));
    assert_eq!((h.outcome, &h.started_at, &h.ended_at), (HistoryOutcome::Abandoned, &started, &Time(fx.now())));
    assert_eq!((fx.st.failed_attempts, fx.st.last_failure_time.clone()), (1, Some(Time(fx.now()))));
    assert_eq!(reasons(&out), ["VerificationFailed"]);
    assert!(out.events[0].warning && out.precondition);
    assert_eq!(out.requeue, Some(Duration::from_secs(10)));
}

/// Safety re-check 7: a new key somebody may have is never deleted.
#[tokio::test]
async fn abandon_keeps_a_new_key_a_target_secret_holds() {
    let mut fx = Fx::new();
    let (_, new) = fx.rotating(Phase::Verifying).await;
    fx.hold("a", &fx.access(&new)).await;
    fx.observe().await;
    let reason = DegradeReason::VerificationFailed;
    fx.run(&Step::Abandon { delete_key: Some(new.clone()), reason, message: "gave up".into() }).await.unwrap();
    assert_eq!(fx.active_in_iam(&new), Some(true));
    assert!(!fx.iam.operations().contains(&"DeleteAccessKey"));
    assert_eq!(fx.st.phase, Phase::Idle);
}

#[tokio::test]
async fn abandon_keeps_the_new_key_when_it_is_the_active_key() {
    let mut fx = Fx::new();
    let (_, new) = fx.rotating(Phase::Verifying).await;
    fx.st.active_key = Some(fx.key_ref(&new));
    let reason = DegradeReason::KeyQuotaExhausted;
    fx.run(&Step::Abandon { delete_key: Some(new.clone()), reason, message: "gave up".into() }).await.unwrap();
    assert_eq!(fx.active_in_iam(&new), Some(true));
    assert!(!fx.iam.operations().contains(&"DeleteAccessKey"));
}

#[tokio::test]
async fn distribute_writes_the_staged_key_into_the_named_targets_only() {
    let mut fx = Fx::new();
    let (old, new) = fx.rotating(Phase::Distributing).await;
    let before = fx.st.clone();
    let out = fx.run(&Step::Distribute { key_id: new.clone(), secrets: vec!["a".into()] }).await.unwrap();
    let written = fx.read("a").unwrap();
    assert_eq!(written.id, new);
    assert_eq!(written.secret.expose_secret(), fx.access(&new).secret.expose_secret());
    let annotations = fx.secret("a").unwrap().metadata.annotations.unwrap();
    assert_eq!(annotations[ACCESS_KEY_ANNOTATION], new);
    assert_eq!(fx.other_data("a").as_deref(), Some("kept"));
    assert_eq!(fx.read_id("b"), Some(old));
    assert_eq!(fx.st, before, "forward only: the handover is Advance's");
    assert_eq!(reasons(&out), ["Distributed"]);
    assert_eq!((out.requeue, out.precondition), (Some(Duration::ZERO), false));
    assert!(fx.iam.operations().is_empty());
}

/// Safety re-check 6 (distribute): the staged key must be the one the step names.
#[tokio::test]
async fn distribute_refuses_a_staging_secret_holding_another_key_or_none() {
    let mut fx = Fx::new();
    let (old, new) = fx.rotating(Phase::Distributing).await;
    fx.stage(&stray_key()).await;
    fx.kube.clear_requests();
    let step = Step::Distribute { key_id: new, secrets: vec!["a".into(), "b".into()] };
    let why = refused(fx.run(&step).await);
    assert!(why.contains("AKIASTRAY00000000000"), "{why}");
    assert!(fx.writes().is_empty(), "nothing written to the targets");
    assert_eq!((fx.read_id("a"), fx.read_id("b")), (Some(old.clone()), Some(old.clone())));
    fx.kube.remove(&kind_path::<Secret>(), NS, &secrets::staging_name(NAME));
    refused(fx.run(&step).await);
    assert_eq!((fx.read_id("a"), fx.read_id("b")), (Some(old.clone()), Some(old)));
}

// ---------------------------------------------------------------------------------------------
// Advance, Stamp

#[tokio::test]
async fn advance_to_rolling_out_hands_the_new_key_over() {
    let mut fx = Fx::new();
    let (old, new) = fx.rotating(Phase::Distributing).await;
    let out = fx.run(&Step::Advance { to: Phase::RollingOut }).await.unwrap();
    let active = fx.st.active_key.clone().unwrap();
    assert_eq!(active, fx.key_ref(&new));
    assert_eq!(fx.st.next_rotation_time, due(&active));
    let retiring = RetiringKey { access_key_id: old, state: KeyState::Active, deactivated_at: None };
    assert_eq!(fx.st.retiring_key, Some(retiring));
    assert!(fx.st.new_key.is_none());
    assert_eq!(fx.st.phase, Phase::RollingOut);
    assert_eq!(fx.st.rotation.as_ref().unwrap().phase_since, Time(fx.now()));
    assert_eq!((reasons(&out), out.precondition), (vec!["RollingOut"], true));
    assert!(fx.iam.operations().is_empty() && fx.writes().is_empty());
}

#[tokio::test]
async fn advance_to_deactivating_takes_the_retire_request_as_acted_on() {
    let mut fx = Fx::new();
    let (old, new) = fx.retiring(Phase::Soaking, true).await;
    fx.observed.requests.retire = Some("fixed-1".into());
    let out = fx.run(&Step::Advance { to: Phase::Deactivating }).await.unwrap();
    assert_eq!(fx.st.last_retire_request.as_deref(), Some("fixed-1"));
    assert_eq!(fx.st.phase, Phase::Deactivating);
    assert_eq!(fx.st.active_key.as_ref().map(|k| k.access_key_id.clone()), Some(new));
    assert_eq!(fx.st.retiring_key.as_ref().map(|k| k.access_key_id.clone()), Some(old));
    assert_eq!(reasons(&out), ["Deactivating"]);
}

fn put_workload(fx: &Fx, kind: &str, name: &str) {
    fx.kube.put(json!({"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name, "namespace": NS},
        "spec": {"selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}}}}));
}

fn stamp_of(template: Option<k8s_openapi::api::core::v1::PodTemplateSpec>) -> Option<String> {
    template?.metadata?.annotations?.get(ACCESS_KEY_ANNOTATION).cloned()
}

#[tokio::test]
async fn stamp_restarts_the_named_workloads_onto_the_key() {
    let mut fx = Fx::new();
    let (_, new) = fx.retiring(Phase::RollingOut, true).await;
    put_workload(&fx, "Deployment", "web");
    put_workload(&fx, "Deployment", "unrelated");
    put_workload(&fx, "DaemonSet", "agent");
    let ids = vec![web(), workload(WorkloadKind::DaemonSet, "agent")];
    let out = fx.run(&Step::Stamp { key_id: new.clone(), workloads: ids }).await.unwrap();
    let template = |name: &str| fx.kube.object::<Deployment>(NS, name).and_then(|d| d.spec).map(|s| s.template);
    assert_eq!(stamp_of(template("web")), Some(new.clone()));
    assert_eq!(stamp_of(template("unrelated")), None);
    let agent = fx.kube.object::<DaemonSet>(NS, "agent").and_then(|d| d.spec).map(|s| s.template);
    assert_eq!(stamp_of(agent), Some(new));
    // The writes; the stamp reads the namespace's resources and the workload first.
    let writes: Vec<_> = fx.kube.requests().into_iter().filter(|r| r.verb == "patch").collect();
    assert_eq!(writes.len(), 2);
    assert!(writes.iter().all(|r| r.field_manager.as_deref() == Some("rekey/billing")));
    assert_eq!(reasons(&out), ["Restarted"]);
    assert!(out.events[0].message.contains("Deployment/web") && out.events[0].message.contains("DaemonSet/agent"));
    assert_eq!((out.requeue, out.precondition), (Some(crate::plan::POLL), false));
}

/// A revert writes the active key back and restarts the workloads with a token, keeping on the
/// stamp the key another rotation's pods were restarted onto (a single-key stamp made that rotation
/// restart the workload again).
#[tokio::test]
async fn revert_writes_the_key_back_and_restarts_keeping_other_rotations_keys_on_the_stamp() {
    let mut fx = Fx::new();
    let (old, new) = fx.retiring(Phase::RollingOut, true).await;
    fx.hold("a", &fx.access(&old)).await;
    let mut both = [new.clone(), "AKIAOTHER".to_owned()];
    both.sort();
    fx.kube.put(json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": NS},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {"metadata": {"labels": {"app": "web"},
            "annotations": {ACCESS_KEY_ANNOTATION: both.join(",")}}}}}));
    fx.kube.put(json!({"apiVersion": "rekey.dev/v1alpha1", "kind": "IamKeyRotation",
        "metadata": {"name": "other", "namespace": NS}, "spec": {"userName": "u2", "secrets": [{"name": "o"}]},
        "status": {"phase": "Idle", "activeKey": {"accessKeyId": "AKIAOTHER"}}}));
    fx.st.rotation.as_mut().unwrap().restart = Some("token-1".into());
    let step = Step::Revert {
        key_id: new.clone(),
        from: None,
        secrets: vec!["a".into()],
        workloads: vec![web()],
        message: "reverted".into(),
    };
    fx.run(&step).await.unwrap();
    assert_eq!(fx.read_id("a"), Some(new.clone()), "the key is written back");
    let annotations = fx
        .kube
        .object::<Deployment>(NS, "web")
        .and_then(|d| d.spec)
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .unwrap_or_default();
    assert_eq!(annotations.get(ACCESS_KEY_ANNOTATION), Some(&both.join(",")));
    assert_eq!(annotations.get(crate::api::RESTART_ANNOTATION).map(String::as_str), Some("token-1"));
    assert!(fx.st.rotation.as_ref().is_some_and(|r| !r.reverting && r.handed_over_at.is_some()));
}

// ---------------------------------------------------------------------------------------------
// Deactivate, Reactivate, TrackSoak

fn with_web_ready(fx: &mut Fx, ready: i32) {
    let w = WorkloadState {
        id: web(),
        stamped: None,
        complete: true,
        refused: None,
        ready,
        progressing: false,
        progress: String::new(),
    };
    fx.observed.workloads = Some(WorkloadsState { items: vec![w], ..Default::default() });
}

/// Safety re-check 1 (order): the list the checks run on is taken before the write.
#[tokio::test]
async fn deactivate_lists_afresh_then_switches_off_the_retiring_key_and_soaks() {
    let mut fx = Fx::new();
    let (old, new) = fx.retiring(Phase::Deactivating, true).await;
    with_web_ready(&mut fx, 3);
    let out = fx.run(&Step::Deactivate { key_id: old.clone() }).await.unwrap();
    assert_eq!(fx.iam.operations(), ["ListAccessKeys", "UpdateAccessKey"]);
    let update = &fx.iam.calls()[1];
    assert_eq!((update.key_id.as_deref(), update.detail.as_deref()), (Some(old.as_str()), Some("Inactive")));
    assert_eq!((fx.active_in_iam(&old), fx.active_in_iam(&new)), (Some(false), Some(true)));
    let retiring = fx.st.retiring_key.clone().unwrap();
    assert_eq!((retiring.state, retiring.deactivated_at), (KeyState::Inactive, Some(Time(fx.now()))));
    assert_eq!(fx.st.phase, Phase::Soaking);
    let rotation = fx.st.rotation.clone().unwrap();
    assert_eq!(rotation.baseline, BTreeMap::from([("Deployment/web".to_owned(), 3)]));
    assert_eq!(rotation.phase_since, Time(fx.now()));
    assert_eq!((reasons(&out), out.precondition), (vec!["Deactivated"], true));
}

/// Safety re-check (census): a write of a target's keys after the census that excused pods by
/// their creation time stops the step, even when the target holds the active key again.
#[tokio::test]
async fn deactivate_refuses_when_a_target_was_written_after_the_census() {
    for (census, refuses) in [("2029-01-01T00:00:00Z", true), ("2030-01-01T00:00:00Z", false)] {
        let mut fx = Fx::new();
        let (old, _new) = fx.retiring(Phase::Deactivating, true).await;
        with_web_ready(&mut fx, 3);
        let mut a = fx.kube.get(&kind_path::<Secret>(), NS, "a").unwrap();
        a["metadata"]["managedFields"] = json!([{"manager": "helm", "operation": "Update",
            "time": "2030-01-01T00:00:00Z", "fieldsType": "FieldsV1",
            "fieldsV1": {"f:data": {"f:AWS_ACCESS_KEY_ID": {}}}}]);
        fx.kube.put(a);
        fx.observed.written_at = Some(census.parse().unwrap());
        let done = fx.run(&Step::Deactivate { key_id: old.clone() }).await;
        if refuses {
            let why = refused(done);
            assert!(why.contains("Secret a was written at") && why.contains("after the consumer census"), "{why}");
            assert_eq!(fx.active_in_iam(&old), Some(true), "the old key stays Active");
        } else {
            done.unwrap();
            assert_eq!(fx.active_in_iam(&old), Some(false), "census after the last write: switched off");
        }
    }
}

/// What a human does to the key in the Secrets after the snapshot: (what, how).
type HumanAct = (&'static str, fn(&FakeIam, &str));

fn active_key_taken_away() -> [HumanAct; 2] {
    [("deactivated", |iam, id| iam.set_active(USER, id, false)), ("deleted", |iam, id| iam.remove_key(USER, id))]
}

/// Safety re-check 1: the active key must be Active on the fresh list, whatever the snapshot said.
#[tokio::test]
async fn deactivate_refuses_when_the_active_key_went_away_after_the_snapshot() {
    for (what, human) in active_key_taken_away() {
        let mut fx = Fx::new();
        let (old, new) = fx.retiring(Phase::Deactivating, true).await;
        human(&fx.iam, &new);
        let before = fx.st.clone();
        let why = refused(fx.run(&Step::Deactivate { key_id: old.clone() }).await);
        assert!(why.contains(&new), "{what}: {why}");
        assert_eq!(fx.active_in_iam(&old), Some(true), "{what}: the retiring key is still Active");
        assert_eq!(fx.iam.operations(), ["ListAccessKeys"], "{what}");
        assert_eq!(fx.st, before, "{what}");
    }
}

/// Safety re-check 2: the key the Secrets hold is never switched off, whatever the step names.
#[tokio::test]
async fn deactivate_refuses_to_switch_off_the_active_key_itself() {
    let mut fx = Fx::new();
    let (_, new) = fx.retiring(Phase::Deactivating, true).await;
    let before = fx.st.clone();
    refused(fx.run(&Step::Deactivate { key_id: new.clone() }).await);
    assert_eq!(fx.active_in_iam(&new), Some(true));
    assert!(!fx.iam.operations().contains(&"UpdateAccessKey"));
    assert_eq!(fx.st, before);
}

#[tokio::test]
async fn deactivate_of_a_key_already_inactive_only_records_it() {
    let mut fx = Fx::new();
    let (old, _) = fx.retiring(Phase::Deactivating, true).await;
    fx.iam.set_active(USER, &old, false);
    fx.run(&Step::Deactivate { key_id: old }).await.unwrap();
    assert_eq!(fx.iam.operations(), ["ListAccessKeys"]);
    assert_eq!(fx.st.retiring_key.unwrap().state, KeyState::Inactive);
    assert_eq!(fx.st.phase, Phase::Soaking);
}

#[tokio::test]
async fn an_emergency_deactivation_skips_the_soak_baseline() {
    let mut fx = Fx::new();
    let (old, _) = fx.retiring(Phase::RollingOut, true).await;
    fx.st.rotation.as_mut().unwrap().trigger = Trigger::Emergency;
    with_web_ready(&mut fx, 3);
    let out = fx.run(&Step::Deactivate { key_id: old.clone() }).await.unwrap();
    assert_eq!(fx.active_in_iam(&old), Some(false));
    assert_eq!(fx.st.retiring_key.unwrap().state, KeyState::Inactive);
    assert_eq!(fx.st.phase, Phase::RollingOut, "the rollout goes on; the old key is deleted after it");
    assert!(fx.st.rotation.unwrap().baseline.is_empty());
    assert_eq!(reasons(&out), ["Deactivated"]);
}

#[tokio::test]
async fn reactivate_switches_the_retired_key_back_on_and_parks_it() {
    let mut fx = Fx::new();
    let (old, new) = fx.retiring(Phase::Soaking, false).await;
    fx.observed.requests.retire = Some("r2".into());
    let broken = vec!["Deployment/web (1 of 3 Ready)".to_owned()];
    let out = fx.run(&Step::Reactivate { key_id: old.clone(), broken }).await.unwrap();
    assert_eq!(fx.iam.operations(), ["ListAccessKeys", "UpdateAccessKey"]);
    assert_eq!(fx.iam.calls()[1].detail.as_deref(), Some("Active"));
    assert_eq!((fx.active_in_iam(&old), fx.active_in_iam(&new)), (Some(true), Some(true)));
    let parked = RetiringKey { access_key_id: old, state: KeyState::Active, deactivated_at: None };
    assert_eq!(fx.st.retiring_key, Some(parked));
    // The retire annotation standing now does not count as the human's go-ahead.
    assert_eq!(fx.st.last_retire_request.as_deref(), Some("r2"));
    assert_eq!(fx.st.phase, Phase::Soaking);
    assert_eq!(reasons(&out), ["RolledBack"]);
    assert!(out.events[0].warning && out.events[0].message.contains("Deployment/web (1 of 3 Ready)"));
    assert!(out.precondition);
}

#[tokio::test]
async fn track_soak_records_since_when_workloads_are_below_baseline() {
    let mut fx = Fx::new();
    fx.retiring(Phase::Soaking, false).await;
    let below = BTreeMap::from([("Deployment/web".to_owned(), fx.ago(10))]);
    let out = fx.run(&Step::TrackSoak { below_since: below }).await.unwrap();
    let recorded = fx.st.rotation.clone().unwrap().below_since;
    assert_eq!(recorded, BTreeMap::from([("Deployment/web".to_owned(), Time(fx.ago(10)))]));
    assert_eq!((out.requeue, out.precondition, out.events.len()), (Some(Duration::from_secs(1)), false, 0));
    assert!(fx.iam.operations().is_empty() && fx.writes().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Delete, Finish

#[tokio::test]
async fn delete_lists_afresh_deletes_the_retired_key_and_its_claim_then_finishes() {
    let mut fx = Fx::new();
    let (old, new) = fx.retiring(Phase::Deleting, false).await;
    fx.st.failed_attempts = 2;
    fx.st.last_failure_time = Some(Time(fx.ago(600)));
    let started = fx.st.rotation.as_ref().unwrap().started_at.clone();
    let out = fx.run(&Step::Delete { key_id: old.clone() }).await.unwrap();
    assert_eq!(fx.iam.operations(), ["ListAccessKeys", "DeleteAccessKey", "UntagUser"]);
    assert_eq!(fx.iam.calls()[1].key_id.as_deref(), Some(old.as_str()));
    assert_eq!((fx.active_in_iam(&old), fx.active_in_iam(&new)), (None, Some(true)));
    assert!(!fx.claimed(&old) && fx.claimed(&new));
    assert!(fx.staging().is_none());
    assert_eq!((fx.read_id("a"), fx.read_id("b")), (Some(new.clone()), Some(new.clone())));
    assert_eq!(fx.st.phase, Phase::Idle);
    assert!(fx.st.retiring_key.is_none() && fx.st.rotation.is_none());
    let h = fx.st.history.last().unwrap();
    assert_eq!((h.old_key_id.as_deref(), h.new_key_id.as_deref()), (Some(old.as_str()), Some(new.as_str())));
    assert_eq!((h.outcome, &h.started_at), (HistoryOutcome::Completed, &started));
    assert_eq!((fx.st.rotations, fx.st.last_rotation_time.clone()), (1, Some(Time(fx.now()))));
    assert_eq!((fx.st.failed_attempts, fx.st.last_failure_time.is_none()), (0, true));
    assert_eq!(fx.st.next_rotation_time, due(&fx.key_ref(&new)));
    assert_eq!((reasons(&out), out.precondition), (vec!["Deleted", "Idle"], true));
}

/// Escalation (a request on the old key, or naming none; the plan never escalates for a report on
/// the new key) uses the request up, and starts maxWait's clock once the rotation is handed over.
#[tokio::test]
async fn escalate_uses_the_request_up_and_starts_the_clock_after_the_handover() {
    let mut fx = Fx::new();
    let (old, _) = fx.retiring(Phase::Soaking, false).await;
    fx.observed.requests.emergency = Some(format!("guardduty:e1:{old}"));
    let out = fx.run(&Step::Escalate).await.unwrap();
    assert!(fx.st.emergency());
    assert_eq!(fx.st.last_emergency_request, Some(format!("guardduty:e1:{old}")), "the retiring key: used up");
    assert_eq!(fx.st.rotation.as_ref().unwrap().emergency_since, Some(Time(fx.now())));
    assert!(out.events[0].message.contains("switched off once they run on the new one, 5m after"), "{:?}", out.events);
    // Before the handover the active key is the old one: a report on it is used up; the clock
    // starts at the handover.
    let mut fx = Fx::new();
    fx.created(Trigger::Requested).await;
    let active = fx.st.active_key.clone().unwrap().access_key_id;
    fx.observed.requests.emergency = Some(format!("guardduty:e4:{active}"));
    fx.run(&Step::Escalate).await.unwrap();
    assert_eq!(fx.st.last_emergency_request, Some(format!("guardduty:e4:{active}")), "the old key: used up");
    assert_eq!(fx.st.rotation.as_ref().unwrap().emergency_since, None);
}

/// maxWait's clock: an emergency's handover starts it; a parked emergency resuming restarts it.
#[tokio::test]
async fn an_emergency_handover_and_resumption_start_the_max_wait_clock() {
    let mut fx = Fx::new();
    fx.rotating(Phase::Distributing).await;
    fx.st.rotation.as_mut().unwrap().trigger = Trigger::Emergency;
    fx.run(&Step::Advance { to: Phase::RollingOut }).await.unwrap();
    assert_eq!(fx.st.rotation.as_ref().unwrap().emergency_since, Some(Time(fx.now())));
    let mut fx = Fx::new();
    fx.rotating(Phase::Distributing).await;
    fx.run(&Step::Advance { to: Phase::RollingOut }).await.unwrap();
    assert_eq!(fx.st.rotation.as_ref().unwrap().emergency_since, None, "a routine rotation has none");
    let mut fx = Fx::new();
    fx.retiring(Phase::Soaking, true).await;
    fx.st.rotation.as_mut().unwrap().trigger = Trigger::Emergency;
    fx.run(&Step::Advance { to: Phase::Deactivating }).await.unwrap();
    assert_eq!(fx.st.rotation.as_ref().unwrap().emergency_since, Some(Time(fx.now())));
}

/// An abandoned rotation whose deleted new key is the one a leak report names has answered the
/// report: the request is used up (the key in use never leaked, so no emergency rotation follows).
#[tokio::test]
async fn abandoning_the_reported_new_key_uses_the_request_up() {
    let mut fx = Fx::new();
    let new = fx.created(Trigger::Requested).await;
    let request = format!("guardduty:e5:{new}");
    fx.observed.requests.emergency = Some(request.clone());
    let out = fx.run(&step_for(&new)).await.unwrap();
    assert_eq!(fx.active_in_iam(&new), None, "deleted");
    assert_eq!(fx.st.last_emergency_request, Some(request));
    assert_eq!((fx.st.phase, reasons(&out)), (Phase::Idle, vec!["NewKeyLeaked"]));

    // An emergency (its own key leaked) whose new key is reported too: the new key goes, and the
    // emergency is not over: the request stays pending, to rotate the leaked key in use.
    let mut fx = Fx::new();
    fx.observed.requests.emergency = Some("guardduty:e0:old".into());
    let new = fx.created(Trigger::Emergency).await;
    fx.observed.requests.emergency = Some(format!("guardduty:e6:{new}"));
    fx.run(&step_for(&new)).await.unwrap();
    assert_eq!(fx.active_in_iam(&new), None, "deleted");
    assert_eq!(fx.st.last_emergency_request, None, "the emergency starts again");
}

fn step_for(new: &str) -> Step {
    Step::Abandon {
        delete_key: Some(new.to_owned()),
        reason: crate::plan::DegradeReason::NewKeyLeaked,
        message: "leaked".into(),
    }
}

/// A leaked key is switched off with no call it does not need: the new key's claim waits for the
/// deletion, which writes it before the leaked key (and its claim) goes.
#[tokio::test]
async fn an_emergency_claims_the_new_key_at_the_deletion_not_before_the_deactivation() {
    let mut fx = Fx::new();
    let old = fx.idle().await;
    fx.run(&Step::Begin { trigger: Trigger::Emergency }).await.unwrap();
    fx.observe().await;
    fx.run(&Step::Create).await.unwrap();
    assert_eq!(fx.iam.operations(), ["CreateAccessKey"]);
    let new = fx.st.new_key.clone().unwrap().access_key_id;
    assert!(!fx.claimed(&new) && fx.claimed(&old), "the leaked key's claim still keeps other owners out");
    for t in TARGETS {
        fx.hold(t, &fx.access(&new)).await;
    }
    fx.iam.set_active(USER, &old, false);
    fx.st.active_key = fx.st.new_key.take();
    fx.st.retiring_key =
        Some(RetiringKey { access_key_id: old.clone(), state: KeyState::Inactive, deactivated_at: None });
    fx.st.phase = Phase::Deleting;
    fx.observe().await;
    let out = fx.run(&Step::Delete { key_id: old.clone() }).await.unwrap();
    assert_eq!(fx.iam.operations(), ["TagUser", "ListAccessKeys", "DeleteAccessKey", "UntagUser"]);
    assert!(fx.claimed(&new) && !fx.claimed(&old));
    assert_eq!(reasons(&out), ["Deleted", "Idle"]);
}

/// Safety re-check 3: the active key must be Active on the fresh list before a delete.
#[tokio::test]
async fn delete_refuses_when_the_active_key_went_away_after_the_snapshot() {
    for (what, human) in active_key_taken_away() {
        let mut fx = Fx::new();
        let (old, new) = fx.retiring(Phase::Deleting, false).await;
        human(&fx.iam, &new);
        let before = fx.st.clone();
        let why = refused(fx.run(&Step::Delete { key_id: old.clone() }).await);
        assert!(why.contains(&new), "{what}: {why}");
        assert_eq!(fx.active_in_iam(&old), Some(false), "{what}: the retired key still exists");
        assert_eq!(fx.iam.operations(), ["ListAccessKeys"], "{what}");
        assert_eq!(fx.st, before, "{what}");
        assert!(fx.staging().is_some(), "{what}: the rotation did not finish");
    }
}

/// Safety re-check 4: an Active key is never deleted.
#[tokio::test]
async fn delete_parks_a_retired_key_a_human_reactivated() {
    let mut fx = Fx::new();
    let (old, _) = fx.retiring(Phase::Deleting, false).await;
    fx.observed.requests.retire = Some("r1".into());
    // A human rescues a consumer that still used it, after the snapshot.
    fx.iam.set_active(USER, &old, true);
    let out = fx.run(&Step::Delete { key_id: old.clone() }).await.unwrap();
    assert_eq!(fx.active_in_iam(&old), Some(true));
    assert!(!fx.iam.operations().contains(&"DeleteAccessKey"));
    let parked = RetiringKey { access_key_id: old, state: KeyState::Active, deactivated_at: None };
    assert_eq!(fx.st.retiring_key, Some(parked));
    assert_eq!(fx.st.last_retire_request.as_deref(), Some("r1"));
    assert_eq!(fx.st.phase, Phase::Soaking);
    assert_eq!(fx.st.rotation.as_ref().unwrap().phase_since, Time(fx.now()));
    assert_eq!(reasons(&out), ["ParkedAfterRollback"]);
    assert!(out.events[0].warning && out.precondition);
    assert!(fx.staging().is_some() && fx.st.history.is_empty(), "the rotation is not over");
}

#[tokio::test]
async fn delete_of_a_key_gone_since_only_drops_its_claim_and_finishes() {
    let mut fx = Fx::new();
    let (old, new) = fx.retiring(Phase::Deleting, false).await;
    fx.iam.remove_key(USER, &old);
    let out = fx.run(&Step::Delete { key_id: old.clone() }).await.unwrap();
    assert_eq!(fx.iam.operations(), ["ListAccessKeys", "UntagUser"]);
    assert!(!fx.claimed(&old) && fx.claimed(&new));
    assert_eq!((fx.st.phase, fx.st.rotations), (Phase::Idle, 1));
    assert_eq!(reasons(&out), ["Deleted", "Idle"]);
}

#[tokio::test]
async fn finish_of_a_first_key_records_a_bootstrap_not_a_rotation() {
    let mut fx = Fx::new();
    let (old, new) = fx.rotating(Phase::RollingOut).await;
    fx.iam.remove_key(USER, &old);
    fx.st.active_key = fx.st.new_key.take();
    fx.st.rotation.as_mut().unwrap().trigger = Trigger::Bootstrap;
    fx.st.failed_attempts = 1;
    let out = fx.run(&Step::Finish).await.unwrap();
    let h = fx.st.history.last().unwrap();
    assert_eq!((h.old_key_id.as_deref(), h.new_key_id.as_deref()), (None, Some(new.as_str())));
    assert_eq!(h.outcome, HistoryOutcome::Bootstrapped);
    assert_eq!((fx.st.rotations, fx.st.last_rotation_time.is_none()), (0, true));
    assert_eq!((fx.st.phase, fx.st.failed_attempts, fx.st.rotation.is_none()), (Phase::Idle, 0, true));
    assert!(fx.staging().is_none());
    assert_eq!((reasons(&out), out.precondition), (vec!["Idle"], true));
    assert!(fx.iam.operations().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Withhold, Wait/Retry/Stall/Degrade

#[tokio::test]
async fn a_withheld_step_writes_nothing_and_is_reported_once() {
    let mut fx = Fx::new();
    let (old, new) = fx.rotating(Phase::Distributing).await;
    let distribute = Step::Distribute { key_id: new, secrets: vec!["a".into(), "b".into()] };
    let dry = Step::Withhold { why: Withheld::DryRun, step: Box::new(distribute) };
    let out = fx.run(&dry).await.unwrap();
    assert_eq!((reasons(&out), out.requeue, out.precondition), (vec!["DryRun"], Some(Duration::from_secs(60)), false));
    assert_eq!(fx.st.planned_step.as_deref(), Some("Distribute"));
    assert!(fx.run(&dry).await.unwrap().events.is_empty(), "reported once");
    let suspended = Step::Withhold { why: Withheld::Suspended, step: Box::new(Step::Create) };
    let out = fx.run(&suspended).await.unwrap();
    assert_eq!((reasons(&out), out.requeue), (vec!["Suspended"], None));
    assert_eq!(fx.st.planned_step.as_deref(), Some("Create"));
    assert!(fx.kube.requests().is_empty(), "no request at all: {:?}", fx.kube.requests());
    assert!(fx.iam.operations().is_empty());
    assert_eq!((fx.read_id("a"), fx.read_id("b")), (Some(old.clone()), Some(old)));
    assert_eq!((fx.iam.keys(USER).len(), fx.st.phase), (2, Phase::Distributing));
}

#[tokio::test]
async fn steps_that_write_nothing_only_ask_to_look_again() {
    let mut fx = Fx::new();
    fx.idle().await;
    let secs = Duration::from_secs;
    let cases = [
        (Step::Wait { requeue: Some(secs(7)), why: "w".into() }, Some(secs(7))),
        (Step::Wait { requeue: None, why: "w".into() }, None),
        (Step::Retry { requeue: secs(20), why: "r".into() }, Some(secs(20))),
        (Step::Stall { reason: StallReason::UnknownKey, message: "s".into() }, Some(secs(300))),
        (Step::Degrade { reason: DegradeReason::Conflict, message: "d".into(), requeue: secs(30) }, Some(secs(30))),
    ];
    for (step, requeue) in cases {
        fx.st.planned_step = Some("Begin".into());
        let mut before = fx.st.clone();
        before.planned_step = None;
        let out = fx.run(&step).await.unwrap();
        assert_eq!((out.requeue, out.precondition, out.events.len()), (requeue, false, 0), "{step:?}");
        assert_eq!(fx.st, before, "{step:?}: only the stale planned step is dropped");
    }
    assert!(fx.iam.operations().is_empty() && fx.kube.requests().is_empty());
    assert_eq!(fx.run(&Step::NeedIam).await.unwrap_err().category(), "Internal");
}

// ---------------------------------------------------------------------------------------------
// cleanup

#[tokio::test]
async fn cleanup_deletes_the_listed_keys_with_their_claims_and_the_staging_secret() {
    let mut fx = Fx::new();
    let (old, new) = fx.rotating(Phase::Verifying).await;
    let plan = CleanupPlan {
        delete_keys: vec![new.clone()],
        release_claims: vec![old.clone()],
        clear_targets: false,
        kept: vec!["kept".into()],
    };
    let problems = fx.cleanup(&plan).await;
    assert_eq!(problems, ["kept"]);
    assert_eq!((fx.active_in_iam(&old), fx.active_in_iam(&new)), (Some(true), None));
    // The key that stays is released: nobody's claim is left on it.
    assert!(!fx.claimed(&old) && !fx.claimed(&new));
    assert_eq!((fx.read_id("a"), fx.read_id("b")), (Some(old.clone()), Some(old)));
    assert!(fx.staging().is_none());
}

#[tokio::test]
async fn cleanup_clears_only_rekeys_data_from_the_targets_when_asked() {
    let mut fx = Fx::new();
    let old = fx.idle().await;
    let plan =
        CleanupPlan { delete_keys: vec![old.clone()], clear_targets: true, kept: Vec::new(), ..Default::default() };
    assert!(fx.cleanup(&plan).await.is_empty());
    assert!(fx.iam.keys(USER).is_empty() && !fx.claimed(&old));
    for t in TARGETS {
        assert_eq!(secrets::held(&fx.target(t), fx.secret(t).as_ref()), SecretState::Empty, "{t}");
        assert_eq!(fx.other_data(t).as_deref(), Some("kept"), "{t}");
    }
}

#[tokio::test]
async fn cleanup_reports_a_failed_delete_and_goes_on() {
    let mut fx = Fx::new();
    let (_, new) = fx.rotating(Phase::Verifying).await;
    fx.iam.fail_next("DeleteAccessKey", "AccessDenied");
    let plan =
        CleanupPlan { delete_keys: vec![new.clone()], clear_targets: true, kept: Vec::new(), ..Default::default() };
    let problems = fx.cleanup(&plan).await;
    assert_eq!(problems.len(), 1);
    assert!(problems[0].contains("DeleteAccessKey") && problems[0].contains("AccessDenied"), "{problems:?}");
    assert_eq!(fx.active_in_iam(&new), Some(true));
    assert!(fx.claimed(&new), "a key that is still there keeps its claim");
    assert_eq!((fx.read_id("a"), fx.staging().is_none()), (None, true));
}

/// deletionPolicy Delete on a target Secret a human deleted: a server-side apply of a missing object
/// would create it, so `secrets::clear_target` looks first and leaves a deleted Secret deleted.
#[tokio::test]
async fn cleanup_does_not_recreate_a_target_secret_deleted_by_hand() {
    let mut fx = Fx::new();
    fx.idle().await;
    fx.kube.remove(&kind_path::<Secret>(), NS, "b");
    let plan = CleanupPlan { delete_keys: Vec::new(), clear_targets: true, kept: Vec::new(), ..Default::default() };
    assert!(fx.cleanup(&plan).await.is_empty());
    assert!(fx.secret("b").is_none(), "deleting the resource created Secret b");
}

/// A refusal from IAM (an answer) says no key was created: the error says so, for the marker to be
/// lowered; a lost answer may have created one, and says nothing of the kind.
#[tokio::test]
async fn a_refused_create_is_told_apart_from_a_lost_one() {
    let mut fx = Fx::new();
    fx.idle().await;
    fx.run(&Step::Begin { trigger: Trigger::Scheduled }).await.unwrap();
    fx.observe().await;
    fx.iam.fail_next("CreateAccessKey", "LimitExceeded");
    let e = fx.run(&Step::Create).await.unwrap_err();
    assert!(matches!(e, Error::NotCreated(_)), "{e:?}");
    assert_eq!(e.category(), "IamError");
    fx.iam.lose_next_response("CreateAccessKey", "HTTP503");
    let e = fx.run(&Step::Create).await.unwrap_err();
    assert!(!matches!(e, Error::NotCreated(_)), "{e:?}");
    assert_eq!(fx.iam.keys(USER).len(), 2, "the lost answer's key exists: the orphan rule finds it");
}

#[tokio::test]
async fn a_renewed_marker_lists_the_keys_the_user_has_now() {
    let mut fx = Fx::new();
    fx.idle().await;
    fx.run(&Step::Begin { trigger: Trigger::Scheduled }).await.unwrap();
    fx.st.pending.as_mut().unwrap().in_flight = false;
    let out = fx.run(&Step::RenewMarker { known_key_ids: vec!["AKIAHUMAN".into()] }).await.unwrap();
    let p = fx.st.pending.clone().unwrap();
    assert_eq!((p.known_key_ids, p.in_flight, p.started_at), (vec!["AKIAHUMAN".to_owned()], true, Time(fx.now())));
    assert!(out.precondition && fx.iam.operations().is_empty());
}

/// Safety re-check: a target Secret reverted to the old key after the decision (a Helm upgrade, an
/// External Secrets refresh) stops the old key's deactivation and its deletion.
#[tokio::test]
async fn the_old_key_is_not_retired_when_a_target_was_reverted_since_the_decision() {
    for (phase, old_active) in [(Phase::Deactivating, true), (Phase::Deleting, false)] {
        let mut fx = Fx::new();
        let (old, _new) = fx.retiring(phase, old_active).await;
        // After the snapshot: the old key is written back into one target.
        fx.hold("b", &fx.access(&old)).await;
        let before = fx.st.clone();
        let step = match phase {
            Phase::Deactivating => Step::Deactivate { key_id: old.clone() },
            _ => Step::Delete { key_id: old.clone() },
        };
        let why = refused(fx.run(&step).await);
        assert!(why.contains("Secret b"), "{phase}: {why}");
        assert_eq!(fx.active_in_iam(&old), Some(old_active), "{phase}: the old key is untouched");
        assert_eq!(fx.iam.operations(), ["ListAccessKeys"], "{phase}");
        assert_eq!(fx.st, before, "{phase}");
    }
}

/// A person's request is not used up by a failed attempt: it is tried again after the backoff,
/// until it failed MAX_REQUEST_RETRIES times; an emergency's, never.
#[tokio::test]
async fn an_abandoned_request_stays_pending_for_another_attempt() {
    for (trigger, abandoned_before, pending) in [
        (Trigger::Emergency, 0, true),
        (Trigger::Requested, 0, true),
        (Trigger::Requested, 4, false),
        // A leaked key's request is never dropped: its key is still Active.
        (Trigger::Emergency, 4, true),
        (Trigger::Emergency, 40, true),
    ] {
        let mut fx = Fx::new();
        let (_, new) = fx.rotating(Phase::Verifying).await;
        fx.st.rotation.as_mut().unwrap().trigger = trigger;
        fx.st.last_rotate_request = Some("r1".into());
        fx.st.last_emergency_request = Some("e1".into());
        // Other failures do not count against the request: only abandoned attempts in a row.
        fx.st.failed_attempts = 7;
        for _ in 0..abandoned_before {
            fx.st.history.push(crate::api::HistoryEntry {
                old_key_id: None,
                new_key_id: None,
                started_at: Time(fx.now()),
                ended_at: Time(fx.now()),
                outcome: crate::api::HistoryOutcome::Abandoned,
            });
        }
        let step =
            Step::Abandon { delete_key: Some(new), reason: DegradeReason::VerificationFailed, message: "m".into() };
        fx.run(&step).await.unwrap();
        let request = match trigger {
            Trigger::Emergency => &fx.st.last_emergency_request,
            _ => &fx.st.last_rotate_request,
        };
        assert_eq!(request.is_none(), pending, "{trigger} after {abandoned_before} abandoned attempts");
    }
}
