//! Every transition of the phase table and every crash-recovery case, with an injected clock.

use super::*;
use crate::api::{KeyRef, Pending, RetiringKey, RotationProgress};
use crate::ownership::claim_value;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

const OLD: &str = "AKIAOLD0000000000001";
const NEW: &str = "AKIANEW0000000000002";
const FOREIGN: &str = "AKIAFOREIGN000000003";

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn now() -> Timestamp {
    t("2026-06-01T12:00:00Z")
}

fn secs(n: i64) -> SignedDuration {
    SignedDuration::from_secs(n)
}

struct Case {
    spec: IamKeyRotationSpec,
    status: IamKeyRotationStatus,
    observed: Observed,
    identity: Identity,
    gates: Gates,
}

impl Case {
    fn new() -> Self {
        let spec: IamKeyRotationSpec = serde_json::from_value(serde_json::json!({
            "userName": "billing-app",
            "secrets": [{"name": "a"}, {"name": "b"}],
        }))
        .unwrap();
        let identity = Identity { cluster: "prod".into(), namespace: "payments".into(), name: "billing".into() };
        let mut tags = BTreeMap::new();
        tags.insert(identity.consent_tag(), "prod".into());
        Case {
            spec,
            status: IamKeyRotationStatus::default(),
            observed: Observed {
                now: now(),
                requests: Requests::default(),
                secrets: vec![("a".into(), SecretState::Missing), ("b".into(), SecretState::Missing)],
                staging_key: None,
                iam: Some(IamState {
                    user_exists: true,
                    keys: vec![],
                    tags,
                    retiring_last_used: None,
                    operator_user: Some("rekey-operator".into()),
                }),
                workloads: Some(WorkloadsState::default()),
                other_resource: None,
                resources: None,
                gitops_managed: Vec::new(),
                immutable: Vec::new(),
                conflicts: Vec::new(),
                writers: BTreeMap::new(),
                written_at: None,
            },
            identity,
            gates: Gates::default(),
        }
    }

    fn decision(&self) -> Decision {
        let valid = crate::validate::validate(&self.spec).unwrap();
        decide(&Input {
            spec: &self.spec,
            valid: &valid,
            status: &self.status,
            observed: &self.observed,
            identity: &self.identity,
            gates: &self.gates,
        })
    }

    fn decide(&self) -> Step {
        self.decision().step
    }

    fn iam(&mut self) -> &mut IamState {
        self.observed.iam.as_mut().unwrap()
    }

    fn key(mut self, id: &str, active: bool, created: Timestamp) -> Self {
        self.iam().keys.push(IamKey { id: id.into(), active, created });
        self
    }

    fn secrets(mut self, state: SecretState) -> Self {
        for s in &mut self.observed.secrets {
            s.1 = state.clone();
        }
        self
    }

    fn active(mut self, id: &str, created: Timestamp) -> Self {
        self.status.active_key = Some(KeyRef { access_key_id: id.into(), created_at: Some(Time(created)) });
        self
    }

    fn phase(mut self, phase: Phase, since: Timestamp, trigger: Trigger) -> Self {
        self.status.phase = phase;
        self.status.rotation = Some(RotationProgress::start(trigger, since));
        self
    }

    fn retiring(mut self, state: KeyState, deactivated_at: Option<Timestamp>) -> Self {
        self.status.retiring_key =
            Some(RetiringKey { access_key_id: OLD.into(), state, deactivated_at: deactivated_at.map(Time) });
        self
    }

    fn workload(mut self, id: &str, stamped: Option<&str>, complete: bool, ready: i32) -> Self {
        self.observed.workloads.as_mut().unwrap().items.push(WorkloadState {
            id: wl(id),
            stamped: stamped.map(Into::into),
            complete,
            refused: None,
            ready,
            progressing: !complete,
            progress: if complete { String::new() } else { "0 of 2 updated, 0 ready".into() },
        });
        self
    }
}

/// "Kind/name" as a workload reference.
fn wl(id: &str) -> WorkloadRef {
    let (kind, name) = id.split_once('/').unwrap();
    serde_json::from_value(serde_json::json!({"kind": kind, "name": name})).unwrap()
}

fn stall_reason(s: &Step) -> Option<StallReason> {
    match s {
        Step::Stall { reason, .. } => Some(*reason),
        _ => None,
    }
}

fn degrade_reason(s: &Step) -> Option<DegradeReason> {
    match s {
        Step::Degrade { reason, .. } | Step::Abandon { reason, .. } => Some(*reason),
        _ => None,
    }
}

// ---- Idle: bootstrap, adoption, schedule, requests ----

#[test]
fn bootstrap_begins_when_secrets_are_missing_and_a_slot_is_free() {
    assert_eq!(Case::new().decide(), Step::Begin { trigger: Trigger::Bootstrap });
}

#[test]
fn first_decision_asks_for_iam_facts() {
    let mut c = Case::new();
    c.observed.iam = None;
    assert_eq!(c.decide(), Step::NeedIam);
}

#[test]
fn adoption_of_an_active_key_held_by_every_secret() {
    let created = now() - secs(86_400);
    let c = Case::new().key(OLD, true, created).secrets(SecretState::Holds(OLD.into()));
    assert_eq!(c.decide(), Step::Adopt { key_id: OLD.into(), created, partner: None });
}

#[test]
fn adoption_takes_the_retiring_partner_claimed_by_this_owner() {
    let created = now() - secs(86_400);
    let mut c = Case::new().key(OLD, true, created).key(NEW, false, created).secrets(SecretState::Holds(OLD.into()));
    let owner = c.identity.owner();
    c.iam().tags.insert(NEW.into(), claim_value(&owner));
    assert_eq!(c.decide(), Step::Adopt { key_id: OLD.into(), created, partner: Some((NEW.into(), false)) });
}

#[test]
fn secrets_that_disagree_or_hold_foreign_or_inactive_keys_stall() {
    let mut c = Case::new().key(OLD, true, now()).key(NEW, true, now());
    c.observed.secrets[0].1 = SecretState::Holds(OLD.into());
    c.observed.secrets[1].1 = SecretState::Holds(NEW.into());
    assert_eq!(stall_reason(&c.decide()), Some(StallReason::SecretConflict));

    let c = Case::new().secrets(SecretState::Holds(FOREIGN.into()));
    assert_eq!(stall_reason(&c.decide()), Some(StallReason::SecretConflict));

    let c = Case::new().key(OLD, false, now()).secrets(SecretState::Holds(OLD.into()));
    assert_eq!(stall_reason(&c.decide()), Some(StallReason::SecretConflict));
}

#[test]
fn missing_user_and_missing_consent_stall_before_any_write() {
    let mut c = Case::new();
    c.iam().user_exists = false;
    assert_eq!(stall_reason(&c.decide()), Some(StallReason::UserNotFound));

    let mut c = Case::new();
    let tag = c.identity.consent_tag();
    c.iam().tags.insert(tag.clone(), "other-cluster".into());
    let step = c.decide();
    assert_eq!(stall_reason(&step), Some(StallReason::Forbidden));
    assert!(matches!(&step, Step::Stall { message, .. } if message.contains(&tag) && message.contains("billing-app")));

    let mut c = Case::new();
    c.iam().tags.insert(tag, "*".into());
    assert_eq!(c.decide(), Step::Begin { trigger: Trigger::Bootstrap });
}

#[test]
fn rekey_never_rotates_the_user_it_runs_as() {
    let mut c = Case::new();
    c.spec.user_name = "rekey-operator".into();
    assert_eq!(stall_reason(&c.decide()), Some(StallReason::SelfRotation));
}

#[test]
fn a_key_claimed_by_another_owner_or_an_older_resource_is_a_conflict() {
    let mut c = Case::new().key(FOREIGN, true, now());
    c.iam().tags.insert(FOREIGN.into(), "rekey:other/ns/x".into());
    assert_eq!(degrade_reason(&c.decide()), Some(DegradeReason::Conflict));

    let mut c = Case::new();
    c.observed.other_resource = Some("payments/older".into());
    assert_eq!(degrade_reason(&c.decide()), Some(DegradeReason::Conflict));
}

#[test]
fn idle_waits_exactly_until_the_key_is_due_without_iam() {
    let created = now() - secs(10 * 86_400);
    let mut c = Case::new().active(OLD, created).secrets(SecretState::Holds(OLD.into()));
    c.observed.iam = None;
    // 90d - 10d = 80 days after creation; 10 days have passed.
    assert_eq!(c.decide(), Step::Wait { requeue: Some(Duration::from_secs(70 * 86_400)), why: c.decide_why() });
}

impl Case {
    fn decide_why(&self) -> String {
        match self.decide() {
            Step::Wait { why, .. } => why,
            other => panic!("not a wait: {other:?}"),
        }
    }
}

#[test]
fn a_due_key_begins_a_scheduled_rotation() {
    let created = now() - secs(80 * 86_400);
    let c = Case::new().key(OLD, true, created).active(OLD, created).secrets(SecretState::Holds(OLD.into()));
    assert_eq!(c.decide(), Step::Begin { trigger: Trigger::Scheduled });
}

#[test]
fn rotate_annotation_rotates_once_per_value() {
    let created = now() - secs(86_400);
    let mut c = Case::new().key(OLD, true, created).active(OLD, created).secrets(SecretState::Holds(OLD.into()));
    c.observed.requests.rotate = Some("1".into());
    assert_eq!(c.decide(), Step::Begin { trigger: Trigger::Requested });
    c.status.last_rotate_request = Some("1".into());
    assert!(matches!(c.decide(), Step::Wait { .. }));
    c.observed.requests.emergency = Some("x".into());
    assert_eq!(c.decide(), Step::Begin { trigger: Trigger::Emergency });
}

#[test]
fn a_foreign_second_key_exhausts_the_quota_and_is_left_alone() {
    let created = now() - secs(80 * 86_400);
    let c = Case::new()
        .key(OLD, true, created)
        .key(FOREIGN, true, created)
        .active(OLD, created)
        .secrets(SecretState::Holds(OLD.into()));
    let step = c.decide();
    assert_eq!(degrade_reason(&step), Some(DegradeReason::KeyQuotaExhausted));
    assert!(matches!(&step, Step::Degrade { message, .. } if message.contains(FOREIGN)));
}

#[test]
fn failure_backoff_from_status_delays_the_next_attempt() {
    let created = now() - secs(80 * 86_400);
    let mut c = Case::new().key(OLD, true, created).active(OLD, created).secrets(SecretState::Holds(OLD.into()));
    c.status.failed_attempts = 3; // 40 s
    c.status.last_failure_time = Some(Time(now() - secs(30)));
    assert!(matches!(c.decide(), Step::Retry { requeue, .. } if requeue == Duration::from_secs(10)));
    c.status.last_failure_time = Some(Time(now() - secs(41)));
    assert_eq!(c.decide(), Step::Begin { trigger: Trigger::Scheduled });
    assert_eq!(backoff(1), Duration::from_secs(10));
    assert_eq!(backoff(50), Duration::from_secs(600));
}

#[test]
fn an_added_empty_secret_is_filled_from_one_that_holds_the_key() {
    let mut c = Case::new().active(OLD, now());
    c.observed.secrets[0].1 = SecretState::Holds(OLD.into());
    assert_eq!(c.decide(), Step::Fill { from: "a".into(), to: vec!["b".into()] });
}

#[test]
fn a_secret_edited_to_another_key_stalls_instead_of_being_overwritten() {
    let mut c = Case::new().active(OLD, now());
    c.observed.secrets[0].1 = SecretState::Holds(OLD.into());
    c.observed.secrets[1].1 = SecretState::Holds(FOREIGN.into());
    assert_eq!(stall_reason(&c.decide()), Some(StallReason::SecretConflict));
}

// ---- Creating: the one-time window and its recovery ----

fn creating(known: &[&str]) -> Case {
    let mut c = Case::new().phase(Phase::Creating, now(), Trigger::Scheduled);
    c.status.pending = Some(Pending::attempt(now(), known.iter().map(|s| s.to_string()).collect()));
    c
}

#[test]
fn creating_with_the_marker_and_no_new_key_creates() {
    let c = creating(&[OLD]).key(OLD, true, now() - secs(100));
    assert_eq!(c.decide(), Step::Create);
}

#[test]
fn crash_after_create_finds_and_deletes_the_orphan_despite_whole_second_create_dates() {
    // The marker has sub-second precision; IAM's CreateDate is whole seconds and a bit earlier.
    let mut c = creating(&[OLD]).key(OLD, true, now() - secs(100));
    c.status.pending.as_mut().unwrap().started_at = Time(t("2026-06-01T12:00:00.900Z"));
    let c = c.key(NEW, true, t("2026-06-01T12:00:00Z"));
    assert_eq!(c.decide(), Step::DeleteOrphan { key_id: NEW.into() });
}

#[test]
fn crash_after_the_staging_write_records_the_staged_key() {
    let created = now() + secs(1);
    let mut c = creating(&[OLD]).key(OLD, true, now() - secs(100)).key(NEW, true, created);
    c.observed.staging_key = Some(NEW.into());
    assert_eq!(c.decide(), Step::RecordNewKey { key_id: NEW.into(), created });
}

#[test]
fn unknown_keys_that_are_not_provably_ours_stall() {
    // Two unknown keys.
    let c = creating(&[]).key(NEW, true, now()).key(FOREIGN, true, now());
    assert_eq!(stall_reason(&c.decide()), Some(StallReason::UnknownKey));
    // Claimed by another owner.
    let mut c = creating(&[OLD]).key(OLD, true, now()).key(FOREIGN, true, now());
    c.iam().tags.insert(FOREIGN.into(), "rekey:else/where/x".into());
    assert!(matches!(c.decide(), Step::Stall { .. } | Step::Degrade { .. }));
    // Older than the marker (minus the clock slack).
    let c = creating(&[OLD]).key(OLD, true, now()).key(FOREIGN, true, now() - secs(301));
    assert_eq!(stall_reason(&c.decide()), Some(StallReason::UnknownKey));
    // Held by a target Secret.
    let mut c = creating(&[OLD]).key(OLD, true, now()).key(FOREIGN, true, now());
    c.observed.secrets[0].1 = SecretState::Holds(FOREIGN.into());
    assert_eq!(stall_reason(&c.decide()), Some(StallReason::UnknownKey));
}

#[test]
fn a_staged_key_that_vanished_from_iam_abandons_the_attempt() {
    let mut c = creating(&[OLD]).key(OLD, true, now());
    c.observed.staging_key = Some(NEW.into());
    assert!(matches!(c.decide(), Step::Abandon { delete_key: None, .. }));
}

// ---- Verifying ----

fn verifying(since: Timestamp) -> Case {
    let mut c = Case::new().active(OLD, now()).phase(Phase::Verifying, since, Trigger::Scheduled);
    c.status.new_key = Some(KeyRef { access_key_id: NEW.into(), created_at: Some(Time(now())) });
    c
}

#[test]
fn verifying_verifies_then_gives_up_after_the_bound_and_deletes_the_unhanded_key() {
    assert_eq!(verifying(now()).decide(), Step::Verify { key_id: NEW.into() });
    // Three minutes passed without the attempts (the operator was held up): try again.
    let mut c = verifying(now() - secs(181));
    c.status.rotation.as_mut().unwrap().verify_attempts = 3;
    assert_eq!(c.decide(), Step::Verify { key_id: NEW.into() });
    c.status.rotation.as_mut().unwrap().verify_attempts = VERIFY_ATTEMPTS;
    let step = c.decide();
    assert!(
        matches!(&step, Step::Abandon { delete_key: Some(k), reason: DegradeReason::VerificationFailed, .. } if k == NEW)
    );
    let mut c = verifying(now());
    c.spec.verify_new_key = false;
    assert_eq!(c.decide(), Step::Advance { to: Phase::Distributing });
}

// ---- Distributing ----

#[test]
fn distributing_writes_forward_only_then_advances() {
    let mut c = verifying(now());
    c.status.phase = Phase::Distributing;
    c.observed.secrets[0].1 = SecretState::Holds(NEW.into());
    c.observed.secrets[1].1 = SecretState::Holds(OLD.into());
    assert_eq!(c.decide(), Step::Distribute { key_id: NEW.into(), secrets: vec!["b".into()] });
    c.observed.secrets[1].1 = SecretState::Holds(NEW.into());
    assert_eq!(c.decide(), Step::Advance { to: Phase::RollingOut });
    c.observed.secrets[1].1 = SecretState::Holds(FOREIGN.into());
    assert_eq!(stall_reason(&c.decide()), Some(StallReason::SecretConflict));
}

// ---- RollingOut ----

fn rolling(since: Timestamp, trigger: Trigger) -> Case {
    Case::new()
        .active(NEW, now())
        .retiring(KeyState::Active, None)
        .phase(Phase::RollingOut, since, trigger)
        .secrets(SecretState::Holds(NEW.into()))
}

#[test]
fn rolling_out_stamps_waits_and_then_deactivates() {
    let c = rolling(now(), Trigger::Scheduled).workload("Deployment/web", Some(OLD), true, 2);
    assert_eq!(c.decide(), Step::Stamp { key_id: NEW.into(), workloads: vec![wl("Deployment/web")] });
    let c = rolling(now(), Trigger::Scheduled).workload("Deployment/web", Some(NEW), false, 1);
    assert!(matches!(c.decide(), Step::Wait { requeue: Some(POLL), .. }));
    let c = rolling(now(), Trigger::Scheduled).workload("Deployment/web", Some(NEW), true, 2);
    assert_eq!(c.decide(), Step::Advance { to: Phase::Deactivating });
}

#[test]
fn a_target_secret_deleted_after_distribution_gets_the_active_key_back_first() {
    for phase in [Phase::RollingOut, Phase::Deactivating, Phase::Soaking, Phase::Deleting] {
        let mut c = rolling(now(), Trigger::Scheduled).workload("Deployment/web", Some(NEW), true, 2);
        c.status.phase = phase;
        c.observed.secrets[1].1 = SecretState::Missing;
        // From the target Secret that still holds it.
        assert_eq!(c.decide(), Step::Fill { from: "a".into(), to: vec!["b".into()] }, "{phase}");
        // Every target gone: from the staging Secret, while it holds the active key.
        c.observed.secrets[0].1 = SecretState::Empty;
        c.observed.staging_key = Some(NEW.into());
        assert_eq!(c.decide(), Step::Distribute { key_id: NEW.into(), secrets: vec!["a".into(), "b".into()] });
        // Nothing to copy from: the rotation goes on (Idle starts over with a new key).
        c.observed.staging_key = Some(OLD.into());
        assert!(!matches!(c.decide(), Step::Fill { .. } | Step::Distribute { .. }), "{phase}");
    }
}

#[test]
fn a_rollout_past_its_timeout_is_degraded_and_nothing_is_retired() {
    let c = rolling(now() - secs(601), Trigger::Scheduled).workload("Deployment/web", Some(NEW), false, 0);
    assert_eq!(degrade_reason(&c.decide()), Some(DegradeReason::RolloutStalled));
}

#[test]
fn a_partitioned_statefulset_is_refused() {
    let mut c = rolling(now(), Trigger::Scheduled).workload("StatefulSet/db", Some(NEW), true, 2);
    c.observed.workloads.as_mut().unwrap().items[0].refused = Some("partition 1 > 0".into());
    assert_eq!(stall_reason(&c.decide()), Some(StallReason::InvalidSpec));
}

#[test]
fn after_a_failure_every_phase_waits_for_the_backoff_before_trying_again() {
    let failed = |mut c: Case, ago: i64| {
        c.status.failed_attempts = 2; // 20 s
        c.status.last_failure_time = Some(Time(now() - secs(ago)));
        c
    };
    // Mid-rotation: the deactivation is due, but the last attempt failed 5 s ago.
    let c = failed(deactivating(now() - secs(3600)), 5);
    assert!(matches!(c.decide(), Step::Retry { requeue, .. } if requeue == Duration::from_secs(15)));
    assert_eq!(failed(deactivating(now() - secs(3600)), 21).decide(), Step::Deactivate { key_id: OLD.into() });
    // First look: not even IAM is asked again before the backoff is over.
    let mut c = failed(Case::new(), 5);
    c.observed.iam = None;
    assert!(matches!(c.decide(), Step::Retry { .. }));
    c.status.last_failure_time = Some(Time(now() - secs(21)));
    assert_eq!(c.decide(), Step::NeedIam);
}

#[test]
fn a_new_request_waits_out_the_failure_backoff_then_is_acted_on() {
    // The request is marked done only when its step succeeds: were it let through the backoff, a
    // failing step would be retried at every status write for as long as the annotation stands.
    let created = now() - secs(86_400);
    let mut c = Case::new().key(OLD, true, created).active(OLD, created).secrets(SecretState::Holds(OLD.into()));
    c.status.failed_attempts = 6; // 320 s
    c.status.last_failure_time = Some(Time(now() - secs(5)));
    c.observed.requests.rotate = Some("2".into());
    c.observed.requests.emergency = Some("2".into());
    assert!(matches!(c.decide(), Step::Retry { .. }));
    c.status.last_failure_time = Some(Time(now() - secs(321)));
    assert_eq!(c.decide(), Step::Begin { trigger: Trigger::Emergency });
}

#[test]
fn bootstrap_without_an_old_key_finishes_after_rollout() {
    let mut c = rolling(now(), Trigger::Bootstrap).workload("Deployment/web", Some(NEW), true, 2);
    c.status.retiring_key = None;
    assert_eq!(c.decide(), Step::Finish);
}

/// An emergency rotation handed over `ago` seconds ago, its workload `Deployment/web` stamped and
/// `complete` or not.
fn emergency_rolling(ago: i64, complete: bool) -> Case {
    let mut c = rolling(now() - secs(ago), Trigger::Emergency).workload("Deployment/web", Some(NEW), complete, 1);
    c.status.rotation.as_mut().unwrap().handed_over_at = Some(Time(now() - secs(ago)));
    c
}

/// The leaked key goes the moment the workloads run on the new key, and at maxWait (5m by default)
/// after the handover at the latest; never with pods of the old template left before then.
#[test]
fn an_emergency_switches_the_leaked_key_off_once_the_rollout_is_done_or_at_max_wait() {
    let off = Step::Deactivate { key_id: OLD.into() };
    // Rollout done (new pods Ready, none of the old template left): off at once.
    assert_eq!(emergency_rolling(2, true).decide(), off);
    // Rolling: waiting, the condition says until when at the latest.
    match emergency_rolling(2, false).decide() {
        Step::Wait { requeue, why } => {
            assert_eq!(requeue, Some(POLL));
            assert!(
                why.contains("the leaked key AKIAOLD0000000000001 is switched off once Deployment/web: 0 of 2 updated, 0 ready rolled out, at 2026-06-01T12:04:58Z at the latest (spec.emergency.maxWait 5m)"),
                "{why}"
            );
        }
        other => panic!("{other:?}"),
    }
    // A second before the bound: looked at again at the bound.
    let c = emergency_rolling(299, false);
    assert!(
        matches!(c.decide(), Step::Wait { requeue: Some(d), .. } if d == Duration::from_secs(1)),
        "{:?}",
        c.decide()
    );
    // The rollout hangs past maxWait: off regardless.
    assert_eq!(emergency_rolling(300, false).decide(), off);
    let mut c = emergency_rolling(60, false);
    c.spec.emergency.max_wait = crate::duration::SpecDuration::new("1m");
    assert_eq!(c.decide(), off, "maxWait is the spec's");
    // Escalated (or resumed after a park) after the handover: maxWait counts from then.
    let mut c = emergency_rolling(900, false);
    c.status.rotation.as_mut().unwrap().emergency_since = Some(Time(now() - secs(10)));
    assert!(matches!(c.decide(), Step::Wait { .. }), "{:?}", c.decide());
    // Exposure first, by choice: off at the handover, whoever still uses it.
    let mut c = emergency_rolling(0, false);
    c.spec.emergency.switch_off = crate::api::SwitchOff::Immediately;
    assert_eq!(c.decide(), off);
    // A routine rotation is not affected: it waits for its rollout, however long.
    let mut c = emergency_rolling(3_000, false);
    c.status.rotation.as_mut().unwrap().trigger = Trigger::Scheduled;
    assert!(matches!(c.decide(), Step::Degrade { reason: DegradeReason::RolloutStalled, .. }));
}

/// In Deactivating an emergency waits for nothing but the workloads: no deactivateAfter, no
/// requireOldKeyUnusedFor (nor a soak after it). Consumers rekey cannot restart get the same bound.
#[test]
fn an_emergency_skips_the_retirement_waits_and_gives_uncovered_consumers_max_wait() {
    let off = Step::Deactivate { key_id: OLD.into() };
    let mut c = emergency_rolling(2, true).with_phase(Phase::Deactivating);
    c.spec.retirement.deactivate_after = crate::duration::SpecDuration::new("1h");
    c.spec.retirement.require_old_key_unused_for = crate::duration::SpecDuration::new("1h");
    c.iam().retiring_last_used = Some(Some(now()));
    assert_eq!(c.decide(), off);
    c.observed.workloads.as_mut().unwrap().items[0].complete = false;
    assert!(matches!(c.decide(), Step::Wait { .. }), "a workload restarted since: {:?}", c.decide());
    c.observed.workloads.as_mut().unwrap().items[0].complete = true;
    c.observed.workloads.as_mut().unwrap().uncovered = vec!["Pod/adhoc (no controller)".into()];
    match c.decide() {
        Step::Degrade { reason: DegradeReason::UncoveredConsumers, message, .. } => assert!(
            message.contains("the leaked key AKIAOLD0000000000001 is switched off at 2026-06-01T12:04:58Z regardless")
                && message.contains("rekey.dev/retire"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    c.observed.requests.retire = Some("now".into());
    assert_eq!(c.decide(), off, "a person lets it go at once");
    c.observed.requests.retire = None;
    c.status.rotation.as_mut().unwrap().handed_over_at = Some(Time(now() - secs(300)));
    assert_eq!(c.decide(), off, "at maxWait they lose it");
    c.observed.workloads = None;
    assert_eq!(c.decide(), Step::NeedWorkloads);
    c.spec.emergency.switch_off = crate::api::SwitchOff::Immediately;
    assert_eq!(c.decide(), off, "Immediately needs no census");
}

// ---- Deactivating ----

fn deactivating(since: Timestamp) -> Case {
    rolling(since, Trigger::Scheduled).workload("Deployment/web", Some(NEW), true, 2).with_phase(Phase::Deactivating)
}

impl Case {
    fn with_phase(mut self, p: Phase) -> Self {
        self.status.phase = p;
        self
    }
}

#[test]
fn deactivating_honours_deactivate_after() {
    let mut c = deactivating(now() - secs(30));
    c.spec.retirement.deactivate_after = crate::duration::SpecDuration::new("1m");
    assert!(matches!(c.decide(), Step::Wait { requeue: Some(d), .. } if d == Duration::from_secs(30)));
    c.spec.retirement.deactivate_after = crate::duration::SpecDuration::new("30s");
    assert_eq!(c.decide(), Step::Deactivate { key_id: OLD.into() });
}

#[test]
fn an_uncovered_consumer_keeps_the_old_key_active_until_it_is_gone_or_retire_is_requested() {
    let mut c = deactivating(now() - secs(10));
    let pods: Vec<String> = (0..7).map(|n| format!("Pod/adhoc-{n} (no controller)")).collect();
    c.observed.workloads.as_mut().unwrap().uncovered = pods;
    match c.decide() {
        Step::Degrade { reason: DegradeReason::UncoveredConsumers, message, .. } => {
            assert!(message.contains("Pod/adhoc-0 (no controller)") && message.contains("and 2 more"), "{message}");
            assert!(message.contains("rekey.dev/retire"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    c.observed.requests.retire = Some("accepted".into());
    assert_eq!(c.decide(), Step::Deactivate { key_id: OLD.into() });
    c.observed.requests.retire = None;
    c.observed.workloads.as_mut().unwrap().uncovered.clear();
    assert_eq!(c.decide(), Step::Deactivate { key_id: OLD.into() });
}

#[test]
fn job_pods_are_waited_for_until_the_rollout_timeout_then_reported() {
    let mut c = deactivating(now() - secs(10));
    c.observed.workloads.as_mut().unwrap().jobs = vec!["Pod/migrate-x1".into()];
    match c.decide() {
        Step::Wait { why, .. } => assert!(why.contains("Pod/migrate-x1 (Job pods) to finish"), "{why}"),
        other => panic!("{other:?}"),
    }
    let mut c = deactivating(now() - secs(601));
    c.observed.workloads.as_mut().unwrap().jobs = vec!["Pod/migrate-x1".into()];
    assert_eq!(degrade_reason(&c.decide()), Some(DegradeReason::UncoveredConsumers));
}

#[test]
fn require_old_key_unused_for_waits_on_last_use() {
    let mut c = deactivating(now());
    c.spec.retirement.require_old_key_unused_for = crate::duration::SpecDuration::new("1h");
    c.iam().retiring_last_used = None;
    assert_eq!(c.decide(), Step::NeedIam);
    c.iam().retiring_last_used = Some(Some(now() - secs(600)));
    assert!(matches!(c.decide(), Step::Wait { .. }));
    c.iam().retiring_last_used = Some(Some(now() - secs(3_601)));
    assert_eq!(c.decide(), Step::Deactivate { key_id: OLD.into() });
    c.iam().retiring_last_used = Some(None);
    assert_eq!(c.decide(), Step::Deactivate { key_id: OLD.into() });
}

// ---- Soaking ----

fn soaking(deactivated: Timestamp) -> Case {
    let mut c = Case::new()
        .active(NEW, now())
        .retiring(KeyState::Inactive, Some(deactivated))
        .phase(Phase::Soaking, deactivated, Trigger::Scheduled)
        .secrets(SecretState::Holds(NEW.into()));
    c.status.rotation.as_mut().unwrap().baseline.insert("Deployment/web".into(), 2);
    c
}

#[test]
fn a_healthy_soak_deletes_after_delete_after() {
    let c = soaking(now() - secs(600)).workload("Deployment/web", Some(NEW), true, 2);
    assert!(matches!(c.decide(), Step::Wait { .. }));
    let c = soaking(now() - secs(3_600)).workload("Deployment/web", Some(NEW), true, 2);
    assert_eq!(c.decide(), Step::Advance { to: Phase::Deleting });
}

#[test]
fn a_workload_below_baseline_for_30s_rolls_back() {
    let c = soaking(now() - secs(60)).workload("Deployment/web", Some(NEW), true, 1);
    assert_eq!(c.decide(), Step::TrackSoak { below_since: BTreeMap::from([("Deployment/web".into(), now())]) });
    let mut c = soaking(now() - secs(60)).workload("Deployment/web", Some(NEW), true, 1);
    c.status.rotation.as_mut().unwrap().below_since.insert("Deployment/web".into(), Time(now() - secs(31)));
    assert!(matches!(c.decide(), Step::Reactivate { key_id, .. } if key_id == OLD));
    // A newer rollout in progress is not breakage.
    let mut c = soaking(now() - secs(60)).workload("Deployment/web", Some(NEW), false, 1);
    c.status.rotation.as_mut().unwrap().below_since.insert("Deployment/web".into(), Time(now() - secs(31)));
    assert_eq!(c.decide(), Step::TrackSoak { below_since: BTreeMap::new() });
}

#[test]
fn parked_after_rollback_until_retire_is_requested() {
    let mut c = soaking(now()).retiring(KeyState::Active, None);
    assert_eq!(stall_reason(&c.decide()), Some(StallReason::ParkedAfterRollback));
    c.observed.requests.retire = Some("1".into());
    assert_eq!(c.decide(), Step::Advance { to: Phase::Deactivating });
    c.status.last_retire_request = Some("1".into());
    assert_eq!(stall_reason(&c.decide()), Some(StallReason::ParkedAfterRollback));
}

#[test]
fn emergency_deletes_as_soon_as_rollouts_complete() {
    let mut c = soaking(now()).workload("Deployment/web", Some(NEW), false, 1);
    c.status.rotation.as_mut().unwrap().trigger = Trigger::Emergency;
    assert!(matches!(c.decide(), Step::Wait { .. }));
    let mut c = soaking(now()).workload("Deployment/web", Some(NEW), true, 2);
    c.status.rotation.as_mut().unwrap().trigger = Trigger::Emergency;
    assert_eq!(c.decide(), Step::Advance { to: Phase::Deleting });
}

// ---- Deleting ----

#[test]
fn deleting_deletes_the_retiring_key_after_a_fresh_census() {
    let mut c = soaking(now()).with_phase(Phase::Deleting);
    c.observed.workloads = None;
    assert_eq!(c.decide(), Step::NeedWorkloads);
    c.observed.workloads =
        Some(WorkloadsState { uncovered: vec!["Pod/late (no controller)".into()], ..Default::default() });
    assert_eq!(degrade_reason(&c.decide()), Some(DegradeReason::UncoveredConsumers));
    c.observed.workloads = Some(WorkloadsState::default());
    assert_eq!(c.decide(), Step::Delete { key_id: OLD.into() });
}

// ---- helpers ----

#[test]
fn claim_values_fit_iam_and_stay_recognisable() {
    let long = format!("c/ns/{}", "x".repeat(300));
    let v = claim_value(&long);
    assert_eq!(v.len(), 256);
    assert!(is_own_claim(v.strip_prefix("rekey:").unwrap(), &long));
    assert!(!is_own_claim(v.strip_prefix("rekey:").unwrap(), &format!("{long}y")));
    assert_eq!(claim_value("prod/payments/billing"), "rekey:prod/payments/billing");
}

#[test]
fn only_writing_steps_are_withheld_by_dry_run() {
    assert!(Step::Create.writes());
    assert!(Step::Deactivate { key_id: OLD.into() }.writes());
    assert!(!Step::Advance { to: Phase::Soaking }.writes());
    assert!(!Step::NeedIam.writes());
}

#[test]
fn malformed_consent_values_are_no_consent() {
    for bad in ["", " prod", "prod ", "PROD", "prod,dev", "prod/payments", "**"] {
        let mut c = Case::new();
        let tag = c.identity.consent_tag();
        c.iam().tags.insert(tag, bad.into());
        assert_eq!(stall_reason(&c.decide()), Some(StallReason::Forbidden), "{bad:?}");
    }
}

// ---- Gates: the operator's configuration, other resources, suspend and dry run, GitOps ----

#[test]
fn a_role_outside_the_allow_list_stalls_before_anything_else() {
    let mut c = Case::new();
    c.observed.iam = None;
    c.gates.denied_role = Some("arn:aws:iam::999999999999:role/x".into());
    let s = c.decide();
    assert_eq!(stall_reason(&s), Some(StallReason::Forbidden), "{s:?}");
    // Not even the IAM facts are asked for: no call is made with a role the operator refuses.
    c.gates.denied_role = None;
    assert_eq!(c.decide(), Step::NeedIam);
}

#[test]
fn a_rotation_waits_for_a_slot_and_says_so() {
    let mut c = Case::new().secrets(SecretState::Holds(OLD.into())).active(OLD, now() - secs(86 * 86_400)).key(
        OLD,
        true,
        now() - secs(86 * 86_400),
    );
    c.gates.rotation_slots = slots::RotationSlots { max: 3, held: 3, held_here: 1, ..Default::default() };
    match c.decide() {
        Step::WaitForSlot { message, .. } => assert!(
            message.contains(
                "rotation slot (at most 3 rotations at once; held by 1 in namespace payments and 2 in other namespaces"
            ),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    c.gates.rotation_slots.held = 2;
    assert_eq!(c.decide(), Step::Begin { trigger: Trigger::Scheduled });
}

/// --max-concurrent-rotations is load smoothing: it must not let other namespaces starve a first
/// key or a person's request, nor one namespace keep the freed slots while others wait.
#[test]
fn rotation_slots_table() {
    use Trigger::*;
    use slots::{Refusal, RotationSlots, refusal};
    let s = |held, held_here, contending, others_waiting| RotationSlots {
        max: 4,
        held,
        held_here,
        contending,
        others_waiting,
    };
    let table = [
        // (slots, trigger, refused?, why)
        (s(3, 0, 1, false), Scheduled, None, "a free slot"),
        (s(4, 0, 2, true), Scheduled, Some(Refusal::Full), "every slot held, by others"),
        (s(4, 4, 0, false), Scheduled, Some(Refusal::Full), "every slot held, here"),
        (s(4, 0, 2, true), Bootstrap, None, "a first key: other namespaces' rotations do not count"),
        (s(4, 0, 2, true), Requested, None, "a request: other namespaces' rotations do not count"),
        (s(9, 3, 2, true), Requested, None, "its own namespace holds fewer than the limit"),
        (s(4, 4, 0, false), Bootstrap, Some(Refusal::FullHere), "its own namespace holds every slot"),
        (s(4, 4, 0, false), Requested, Some(Refusal::FullHere), "its own namespace holds every slot"),
        (s(40, 40, 0, true), Emergency, None, "a leaked key never waits"),
        // Fair shares: 4 slots, this namespace and one other contending, 2 each.
        (s(3, 2, 1, true), Scheduled, Some(Refusal::Share(2)), "its share held while another namespace waits"),
        (s(3, 2, 1, false), Scheduled, None, "its share held, nobody else waits: the slot is not left idle"),
        (s(3, 1, 1, true), Scheduled, None, "below its share"),
        // Three others contend: a share of 4 / 4 = 1.
        (s(2, 1, 3, true), Scheduled, Some(Refusal::Share(1)), "its one slot of four namespaces"),
        (s(2, 0, 3, true), Scheduled, None, "none yet: it gets the freed slot"),
        // More namespaces than slots: a share is still 1.
        (s(3, 1, 9, true), Scheduled, Some(Refusal::Share(1)), "at least one each"),
    ];
    for (slots, trigger, want, why) in table {
        assert_eq!(refusal(&slots, trigger), want, "{why}: {slots:?} {trigger}");
    }
    assert_eq!(refusal(&RotationSlots { max: 0, held: 100, ..Default::default() }, Scheduled), None, "no limit");
}

/// Only a rotation rekey makes progress on holds a slot: one that waits on consumers rekey does
/// not restart, a stalled rollout, a parked rollback, another owner or a refused call holds none.
#[test]
fn who_holds_a_rotation_slot_table() {
    use slots::{holds_slot, waits_outside_by};
    type Conditions<'a> = &'a [(&'a str, &'a str, &'a str)];
    let table: [(Conditions, Phase, bool, &str); 12] = [
        (&[], Phase::Creating, true, "creating"),
        (&[("Degraded", "False", "AsExpected")], Phase::Soaking, true, "soaking: rekey's own wait"),
        (&[], Phase::Idle, false, "idle"),
        (&[("Degraded", "True", "UncoveredConsumers")], Phase::Deactivating, false, "a bare pod or ReplicaSet"),
        (&[("Degraded", "True", "RolloutStalled")], Phase::RollingOut, false, "a stalled or paused rollout"),
        (&[("Stalled", "True", "ParkedAfterRollback")], Phase::Soaking, false, "a parked rollback"),
        (&[("Stalled", "True", "InvalidSpec")], Phase::RollingOut, false, "a workload rekey cannot roll"),
        (&[("Degraded", "True", "IamAccessDenied")], Phase::Creating, false, "a refused create"),
        (&[("Degraded", "True", "KeyQuotaExhausted")], Phase::Creating, false, "a foreign key in the way"),
        (&[("Degraded", "True", "IamThrottled")], Phase::Creating, true, "throttled: rekey retries it"),
        (&[("Degraded", "True", "SecretReverted")], Phase::RollingOut, true, "a revert rekey is writing back"),
        (&[("Degraded", "True", "GitOpsManagedSecret")], Phase::RollingOut, true, "a caveat, not a wait"),
    ];
    for (conds, phase, holds, why) in table {
        assert_eq!(holds_slot(phase, waits_outside_by(conds.iter().copied())), holds, "{why}");
    }
}

#[test]
fn a_first_key_and_a_request_do_not_wait_for_other_namespaces_slots() {
    let full = slots::RotationSlots { max: 2, held: 2, held_here: 0, contending: 1, others_waiting: false };
    let mut c = Case::new();
    c.gates.rotation_slots = full.clone();
    assert_eq!(c.decide(), Step::Begin { trigger: Trigger::Bootstrap }, "the first key");
    let mut c = Case::new().secrets(SecretState::Holds(OLD.into())).active(OLD, now()).key(OLD, true, now());
    c.gates.rotation_slots = full;
    c.observed.requests.rotate = Some("now".into());
    assert_eq!(c.decide(), Step::Begin { trigger: Trigger::Requested });
    c.gates.rotation_slots.held_here = 2;
    assert!(
        matches!(c.decide(), Step::WaitForSlot { ref message, .. } if message.contains("all held by rotations of namespace payments"))
    );
}

#[test]
fn suspend_and_dry_run_withhold_every_write_and_nothing_else() {
    for (suspend, dry_run, why) in
        [(true, false, Withheld::Suspended), (false, true, Withheld::DryRun), (true, true, Withheld::Suspended)]
    {
        let mut c = Case::new();
        c.spec.suspend = suspend;
        c.spec.dry_run = dry_run;
        assert_eq!(
            c.decide(),
            Step::Withhold { why, step: Box::new(Step::Begin { trigger: Trigger::Bootstrap }) },
            "suspend={suspend} dryRun={dry_run}"
        );
        // Steps that only read or report are not withheld.
        c.observed.iam = None;
        assert_eq!(c.decide(), Step::NeedIam);
        let mut idle = Case::new().secrets(SecretState::Holds(OLD.into())).active(OLD, now());
        idle.spec.suspend = suspend;
        idle.spec.dry_run = dry_run;
        assert!(matches!(idle.decide(), Step::Wait { .. }));
    }
}

#[test]
fn a_gitops_managed_secret_is_a_caveat_while_nothing_worse_is_reported() {
    let mut c = Case::new().secrets(SecretState::Holds(OLD.into())).active(OLD, now());
    c.observed.gitops_managed = vec![("a".into(), "Argo CD")];
    let d = c.decision();
    assert!(matches!(d.step, Step::Wait { .. }));
    let (reason, message) = d.caveat.expect("a caveat");
    assert_eq!(reason, DegradeReason::GitOpsManagedSecret);
    assert!(message.contains("a (Argo CD)"), "{message}");
    // A stall says more than the caveat: it is reported instead.
    c.observed.secrets[1].1 = SecretState::Holds(FOREIGN.into());
    let d = c.decision();
    assert_eq!(stall_reason(&d.step), Some(StallReason::SecretConflict));
    assert_eq!(d.caveat, None);
}

#[test]
fn waiting_for_a_rollout_names_each_workload_and_where_it_stands() {
    let c = rolling(now(), Trigger::Scheduled).workload("Deployment/web", Some(NEW), false, 0);
    match c.decide() {
        Step::Wait { why, .. } => assert_eq!(why, "waiting for the rollout of Deployment/web: 0 of 2 updated, 0 ready"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_template_secret_is_never_the_source_of_a_copy() {
    let mut c = Case::new().secrets(SecretState::Holds(OLD.into())).active(OLD, now());
    c.spec.secrets[0] = serde_json::from_value(serde_json::json!({
        "name": "a", "format": "template", "template": {"k": "{{ .SecretAccessKey }}"},
    }))
    .unwrap();
    c.observed.secrets[1].1 = SecretState::Missing;
    // Only the template holds the key: a new key, rather than a copy that can never succeed.
    assert_eq!(c.decide(), Step::Begin { trigger: Trigger::Bootstrap });
    // With the staging Secret holding the active key mid-rotation, the copy comes from there.
    let mut c = rolling(now(), Trigger::Scheduled);
    c.spec.secrets[0] = serde_json::from_value(serde_json::json!({
        "name": "a", "format": "template", "template": {"k": "{{ .SecretAccessKey }}"},
    }))
    .unwrap();
    c.observed.secrets[1].1 = SecretState::Missing;
    c.observed.staging_key = Some(NEW.into());
    assert_eq!(c.decide(), Step::Distribute { key_id: NEW.into(), secrets: vec!["b".into()] });
}

#[test]
fn an_ses_smtp_secret_holds_its_key_id_but_is_never_the_source_of_a_copy() {
    let smtp = |name: &str| {
        serde_json::from_value(serde_json::json!({"name": name, "format": "sesSmtp", "region": "eu-west-1"})).unwrap()
    };
    let mut c = Case::new().secrets(SecretState::Holds(OLD.into())).active(OLD, now());
    c.spec.secrets[0] = smtp("a");
    c.observed.secrets[1].1 = SecretState::Missing;
    // The SMTP password is no secret access key: only a new key can fill the other Secret.
    assert_eq!(c.decide(), Step::Begin { trigger: Trigger::Bootstrap });
    // A writer that replaced its content (the user name may still read as the new key) is a revert.
    let mut c = rolling(now(), Trigger::Scheduled).workload("Deployment/web", Some(NEW), true, 2);
    c.spec.secrets[1] = smtp("b");
    assert!(!matches!(c.decide(), Step::MarkRevert { .. }), "rekey alone wrote it");
    c.observed.writers.insert("b".into(), vec!["kubectl-edit".into()]);
    assert!(matches!(c.decide(), Step::MarkRevert { .. }));
}

// ---- Secrets stay verified until the old key is gone ----

fn reverted_by_helm(c: Case) -> Case {
    let mut c = c;
    c.observed.secrets[1].1 = SecretState::Holds(OLD.into());
    c.observed.writers.insert("b".into(), vec!["helm".into()]);
    c.observed.staging_key = Some(NEW.into());
    c
}

#[test]
fn a_secret_reverted_after_the_handover_is_written_back_and_the_workloads_restart() {
    for phase in [Phase::RollingOut, Phase::Deactivating, Phase::Soaking, Phase::Deleting] {
        let c = reverted_by_helm(
            rolling(now(), Trigger::Scheduled).workload("Deployment/web", Some(NEW), true, 2).with_phase(phase),
        );
        // First the write-ahead record of the revert...
        match c.decide() {
            Step::MarkRevert { message } => assert!(message.contains("b (written by helm)"), "{message}"),
            other => panic!("{phase}: {other:?}"),
        }
        // ...then, with it committed, the write back and the restart.
        let mut c = c;
        c.status.rotation.as_mut().unwrap().reverts = 1;
        c.status.rotation.as_mut().unwrap().reverting = true;
        match c.decide() {
            Step::Revert { key_id, from, secrets, workloads, .. } => {
                assert_eq!((key_id.as_str(), from, secrets.as_slice()), (NEW, None, &["b".to_owned()][..]), "{phase}");
                assert_eq!(workloads, vec![wl("Deployment/web")]);
            }
            other => panic!("{phase}: {other:?}"),
        }
    }
    // Without the staging Secret, the copy comes from a target that still holds the active key.
    let mut c = reverted_by_helm(rolling(now(), Trigger::Scheduled).workload("Deployment/web", Some(NEW), true, 2));
    c.status.rotation.as_mut().unwrap().reverting = true;
    c.observed.staging_key = None;
    assert!(matches!(c.decide(), Step::Revert { from: Some(ref a), .. } if a == "a"));
    // The workloads to restart are known first.
    c.observed.workloads = None;
    assert_eq!(c.decide(), Step::NeedWorkloads);
}

#[test]
fn a_template_target_written_by_another_manager_is_a_revert() {
    // A template's content cannot be read back: the annotation rekey wrote still names the new key.
    let mut c = rolling(now(), Trigger::Scheduled).workload("Deployment/web", Some(NEW), true, 2);
    c.spec.secrets[1] = serde_json::from_value(serde_json::json!({
        "name": "b", "format": "template", "template": {"k": "{{ .SecretAccessKey }}"},
    }))
    .unwrap();
    assert!(!matches!(c.decide(), Step::MarkRevert { .. }), "rekey alone wrote it");
    c.observed.writers.insert("b".into(), vec!["helm".into()]);
    assert!(matches!(c.decide(), Step::MarkRevert { .. }));
}

#[test]
fn reverted_again_the_old_key_is_kept_active_and_a_human_decides() {
    let mut c = reverted_by_helm(rolling(now(), Trigger::Scheduled).workload("Deployment/web", Some(NEW), true, 2));
    c.status.rotation.as_mut().unwrap().reverts = 1;
    let s = c.decide();
    assert_eq!(stall_reason(&s), Some(StallReason::SecretConflict), "{s:?}");
    // Already Inactive (soaking): pods started from the reverted content need it back first.
    let mut c = reverted_by_helm(soaking(now() - secs(60)).workload("Deployment/web", Some(NEW), true, 2));
    c.status.rotation.as_mut().unwrap().reverts = 1;
    assert!(matches!(c.decide(), Step::Reactivate { ref key_id, .. } if key_id == OLD));
}

#[test]
fn nothing_is_deactivated_or_deleted_while_a_secret_holds_another_key() {
    for c in [deactivating(now() - secs(10)), soaking(now() - secs(7_200)), soaking(now()).with_phase(Phase::Deleting)]
    {
        let c = reverted_by_helm(c);
        let s = c.decide();
        assert!(!matches!(s, Step::Deactivate { .. } | Step::Delete { .. } | Step::Advance { .. }), "{s:?}");
    }
}

#[test]
fn a_key_a_person_creates_while_create_keeps_being_refused_is_never_deleted() {
    // IAM refused the last CreateAccessKey (an SCP, LimitExceeded): the marker is lowered.
    let mut c = creating(&[OLD]).key(OLD, true, now() - secs(86_400)).key(FOREIGN, true, now());
    c.status.pending.as_mut().unwrap().in_flight = false;
    assert_eq!(c.decide(), Step::RenewMarker { known_key_ids: vec![OLD.into(), FOREIGN.into()] });
    // Raised again with the person's key known: it is not an orphan, and it fills the quota.
    let c = creating(&[OLD, FOREIGN]).key(OLD, true, now() - secs(86_400)).key(FOREIGN, true, now());
    assert_eq!(degrade_reason(&c.decide()), Some(DegradeReason::KeyQuotaExhausted));
    // While a call may be in flight, the same key is the attempt's orphan.
    let c = creating(&[OLD]).key(OLD, true, now() - secs(86_400)).key(FOREIGN, true, now());
    assert_eq!(c.decide(), Step::DeleteOrphan { key_id: FOREIGN.into() });
}

#[test]
fn an_immutable_target_stops_a_rotation_before_any_key_is_created() {
    let mut c = Case::new().secrets(SecretState::Holds(OLD.into())).active(OLD, now() - secs(86 * 86_400)).key(
        OLD,
        true,
        now() - secs(86 * 86_400),
    );
    c.observed.immutable = vec!["b".into()];
    let s = c.decide();
    assert_eq!(stall_reason(&s), Some(StallReason::SecretImmutable), "{s:?}");
    // Mid-rotation (made immutable after the key was created): nothing is distributed.
    let mut c = verifying(now()).with_phase(Phase::Distributing);
    c.observed.immutable = vec!["a".into()];
    assert_eq!(stall_reason(&c.decide()), Some(StallReason::SecretImmutable));
}

#[test]
fn a_user_name_edit_is_refused_while_keys_of_the_previous_user_are_tracked() {
    let mut c = rolling(now(), Trigger::Scheduled);
    c.status.user_name = Some("billing-app".into());
    c.spec.user_name = "Billing-App".into();
    assert!(stall_reason(&c.decide()).is_none(), "IAM user names compare case-insensitively");
    c.spec.user_name = "other-app".into();
    let s = c.decide();
    assert_eq!(stall_reason(&s), Some(StallReason::InvalidSpec), "{s:?}");
    let mut idle = Case::new().secrets(SecretState::Holds(OLD.into())).active(OLD, now());
    idle.status.user_name = Some("billing-app".into());
    idle.spec.user_name = "other-app".into();
    assert_eq!(stall_reason(&idle.decide()), Some(StallReason::InvalidSpec));
}

#[test]
fn a_claim_of_a_deleted_resource_of_this_cluster_blocks_nobody() {
    let stale = claim_value("prod/payments/old-name");
    let mut c = Case::new().secrets(SecretState::Holds(OLD.into())).key(OLD, true, now());
    c.iam().tags.insert(OLD.into(), stale.clone());
    // Unknown which resources exist: the claim counts.
    assert_eq!(degrade_reason(&c.decide()), Some(DegradeReason::Conflict));
    c.observed.resources = Some(["payments/billing".to_owned()].into());
    assert!(matches!(c.decide(), Step::Adopt { .. }), "taken over by the resource that adopts the key");
    // It still exists: a conflict.
    c.observed.resources = Some(["payments/billing".to_owned(), "payments/old-name".to_owned()].into());
    assert_eq!(degrade_reason(&c.decide()), Some(DegradeReason::Conflict));
    // A namespace this operator does not watch may be another operator's.
    c.observed.resources = Some(["payments/billing".to_owned()].into());
    c.gates.watched = vec!["other".into()];
    assert_eq!(degrade_reason(&c.decide()), Some(DegradeReason::Conflict));
}

#[test]
fn another_resource_owning_the_same_secret_keys_stalls_everything() {
    let mut c = rolling(now(), Trigger::Scheduled).workload("Deployment/web", Some(NEW), true, 2);
    c.observed.conflicts = vec!["Secret a: keys AWS_ACCESS_KEY_ID are written by IamKeyRotation other".into()];
    let s = c.decide();
    assert_eq!(stall_reason(&s), Some(StallReason::SecretConflict), "{s:?}");
}

#[test]
fn a_secret_refilled_after_a_revert_restarts_the_workloads_too() {
    // The fix for a second revert is emptying the Secret: pods started on the reverted key meanwhile
    // must be restarted before the old key goes.
    let mut c = rolling(now(), Trigger::Scheduled).workload("Deployment/web", Some(NEW), true, 2);
    c.observed.secrets[1].1 = SecretState::Empty;
    c.observed.staging_key = Some(NEW.into());
    assert!(matches!(c.decide(), Step::Fill { .. }), "without a revert, a plain refill");
    c.status.rotation.as_mut().unwrap().reverts = 2;
    assert!(matches!(c.decide(), Step::MarkRevert { .. }));
    c.status.rotation.as_mut().unwrap().reverting = true;
    match c.decide() {
        Step::Revert { secrets, workloads, .. } => {
            assert_eq!((secrets, workloads), (vec!["b".to_owned()], vec![wl("Deployment/web")]));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_emergency_requested_mid_rotation_escalates_it_and_skips_the_waits() {
    let mut c = deactivating(now() - secs(10));
    c.observed.workloads.as_mut().unwrap().uncovered = vec!["Pod/adhoc (no controller)".into()];
    c.observed.requests.emergency = Some("leak".into());
    assert_eq!(c.decide(), Step::Escalate);
    c.status.rotation.as_mut().unwrap().trigger = Trigger::Emergency;
    c.status.last_emergency_request = Some("leak".into());
    assert_eq!(degrade_reason(&c.decide()), Some(DegradeReason::UncoveredConsumers), "until maxWait");
    c.status.rotation.as_mut().unwrap().emergency_since = Some(Time(now() - secs(300)));
    assert_eq!(c.decide(), Step::Deactivate { key_id: OLD.into() }, "a leaked key waits at most maxWait");
}

/// A leak report on the new key, once a Secret may hold it, does not make the healthy old key an
/// emergency's: every gate before its deactivation holds (rollout, deactivateAfter, the census),
/// the soak is skipped, and the report stays pending to rotate the leaked key right after.
#[test]
fn a_report_on_the_new_key_leaves_the_old_key_to_the_routine_gates_and_skips_only_the_soak() {
    let report = format!("guardduty:e1:{NEW}");
    let mut c = deactivating(now() - secs(10));
    c.observed.workloads.as_mut().unwrap().uncovered = vec!["Pod/adhoc (no controller)".into()];
    c.observed.requests.emergency = Some(report.clone());
    match c.decide() {
        Step::Degrade { reason: DegradeReason::UncoveredConsumers, message, .. } => {
            assert!(message.contains(&format!("the new key was reported leaked ({report}): it is rotated as soon as this rotation has retired the old key")), "{message}");
        }
        other => panic!("not escalated, the census holds: {other:?}"),
    }
    c.spec.retirement.deactivate_after = crate::duration::SpecDuration::new("1m");
    c.observed.workloads.as_mut().unwrap().uncovered.clear();
    assert!(matches!(c.decide(), Step::Wait { ref why, .. } if why.starts_with("deactivateAfter")), "{:?}", c.decide());
    c.spec.retirement.deactivate_after = crate::duration::SpecDuration::new("0s");
    assert_eq!(c.decide(), Step::Deactivate { key_id: OLD.into() });
    // Rolling out: the rollout is waited for, the old key untouched.
    let mut r = rolling(now(), Trigger::Scheduled).workload("Deployment/web", Some(NEW), false, 1);
    r.observed.requests.emergency = Some(report.clone());
    assert!(matches!(r.decide(), Step::Wait { ref why, .. } if why.starts_with("waiting for the rollout")));
    // Soaking: no soak, the old key goes once the rollouts are complete.
    let mut s = soaking(now()).workload("Deployment/web", Some(NEW), true, 2);
    s.observed.requests.emergency = Some(report.clone());
    assert_eq!(s.decide(), Step::Advance { to: Phase::Deleting });
    s.observed.requests.emergency = None;
    assert!(matches!(s.decide(), Step::Wait { .. }), "without the report the soak runs");
    // Before the handover, with a Secret that may hold it: distributed as usual.
    let mut d = verifying(now()).with_phase(Phase::Distributing).secrets(SecretState::Holds(OLD.into()));
    d.observed.requests.emergency = Some(report);
    assert!(matches!(d.decide(), Step::Distribute { .. }), "{:?}", d.decide());
}

/// A rotation parked after a rollback whose retiring key is then reported leaked goes on: the
/// leaked key is switched off under the emergency rule instead of waiting for a person.
#[test]
fn a_parked_emergency_goes_on_to_switch_the_leaked_key_off() {
    let mut c = soaking(now()).retiring(KeyState::Active, None);
    c.observed.requests.emergency = Some(format!("guardduty:e1:{OLD}"));
    assert_eq!(c.decide(), Step::Escalate);
    c.status.rotation.as_mut().unwrap().trigger = Trigger::Emergency;
    c.status.last_emergency_request = c.observed.requests.emergency.clone();
    assert_eq!(c.decide(), Step::Advance { to: Phase::Deactivating });
    // A report on the new key of a parked rotation: parked (the old key is healthy), in view.
    let mut p = soaking(now()).retiring(KeyState::Active, None);
    p.observed.requests.emergency = Some(format!("guardduty:e2:{NEW}"));
    match p.decide() {
        Step::Stall { reason: StallReason::ParkedAfterRollback, message } => {
            assert!(message.contains("the new key was reported leaked (guardduty:e2:"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

/// An emergency whose attempt was given up says so, and its backoff names it.
#[test]
fn an_abandoned_emergency_stays_in_view_while_it_waits_to_try_again() {
    let mut c = verifying(now() - secs(181));
    c.status.rotation.as_mut().unwrap().verify_attempts = VERIFY_ATTEMPTS;
    c.status.rotation.as_mut().unwrap().trigger = Trigger::Emergency;
    c.status.last_emergency_request = Some("leak".into());
    match c.decide() {
        Step::Abandon { message, .. } => assert!(
            message.ends_with("the leaked key AKIAOLD0000000000001 is still Active: the EMERGENCY rotation (leak) is tried again after the backoff, until it succeeds"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    let created = now() - secs(86_400);
    let mut idle = Case::new().key(OLD, true, created).active(OLD, created).secrets(SecretState::Holds(OLD.into()));
    idle.status.failed_attempts = 7;
    idle.status.last_failure_time = Some(Time(now() - secs(5)));
    idle.observed.requests.emergency = Some("leak".into());
    match idle.decide() {
        Step::Retry { why, .. } => {
            assert_eq!(
                why,
                "EMERGENCY rotation (leak) is tried again at 2026-06-01T12:09:55Z, after 7 failed attempts"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// A leak report on the rotation's new key before any Secret holds it deletes the key (nobody
/// has it) instead of handing it over; once a Secret holds it, or for a report on the old key, the
/// rotation escalates. The same under an emergency already running.
#[test]
fn a_new_key_reported_leaked_before_any_secret_holds_it_is_deleted_not_handed_over() {
    let leaked = |c: &Case| {
        matches!(c.decide(), Step::Abandon { delete_key: Some(ref k), reason: DegradeReason::NewKeyLeaked, ref message }
            if k == NEW && message.contains(&format!("guardduty:e1:{NEW}")))
    };
    let mut c = verifying(now());
    c.observed.requests.emergency = Some(format!("guardduty:e1:{NEW}"));
    assert!(leaked(&c), "{:?}", c.decide());
    c.status.rotation.as_mut().unwrap().trigger = Trigger::Emergency;
    assert!(leaked(&c), "an emergency under way: {:?}", c.decide());
    c.status.rotation.as_mut().unwrap().trigger = Trigger::Scheduled;
    c.observed.secrets[1].1 = SecretState::Unreadable("not a key".into());
    assert_eq!(c.decide(), Step::Verify { key_id: NEW.into() }, "an unreadable Secret may hold it: not deleted");
    c.observed.secrets[1].1 = SecretState::Holds(OLD.into());
    c.status.phase = Phase::Distributing;
    assert!(matches!(c.decide(), Step::Distribute { .. }), "a Secret may have held it: the rotation goes on");
    c.observed.secrets[0].1 = SecretState::Holds(NEW.into());
    assert!(matches!(c.decide(), Step::Distribute { .. }), "a Secret holds it: the rotation goes on");
    c.observed.secrets[0].1 = SecretState::Holds(OLD.into());
    c.observed.requests.emergency = Some(format!("guardduty:e1:{OLD}"));
    assert_eq!(c.decide(), Step::Escalate, "the old key leaked: the rotation becomes an emergency");
    c.status.last_emergency_request = Some(format!("guardduty:e1:{NEW}"));
    c.observed.requests.emergency = Some(format!("guardduty:e1:{NEW}"));
    assert!(!matches!(c.decide(), Step::Abandon { .. } | Step::Escalate), "a request already acted on");
}

#[test]
fn an_emergency_does_not_wait_for_a_rotation_slot() {
    let mut c = Case::new().secrets(SecretState::Holds(OLD.into())).active(OLD, now()).key(OLD, true, now());
    c.gates.rotation_slots = slots::RotationSlots { max: 1, held: 1, held_here: 1, ..Default::default() };
    c.observed.requests.emergency = Some("leak".into());
    assert_eq!(c.decide(), Step::Begin { trigger: Trigger::Emergency });
}

#[test]
fn deactivation_waits_for_a_workload_that_restarted_since_the_rollout() {
    let c = rolling(now(), Trigger::Scheduled)
        .workload("Deployment/web", Some(NEW), false, 1)
        .with_phase(Phase::Deactivating);
    assert!(matches!(c.decide(), Step::Wait { ref why, .. } if why.contains("rollout of Deployment/web")));
}

#[test]
fn an_orphan_is_only_a_key_created_close_to_its_attempt() {
    // Created an hour after the marker: a person's, not the attempt's.
    let c = creating(&[OLD]).key(OLD, true, now() - secs(86_400)).key(FOREIGN, true, now() + secs(3_600));
    assert_eq!(stall_reason(&c.decide()), Some(StallReason::UnknownKey));
}

#[test]
fn after_an_unanswered_failure_the_next_attempt_gets_a_marker_of_its_own() {
    let mut c = creating(&[OLD]).key(OLD, true, now() - secs(86_400));
    c.status.failed_attempts = 1;
    c.status.last_failure_time = Some(Time(now() - secs(20)));
    c.status.pending.as_mut().unwrap().started_at = Time(now() - secs(30));
    assert_eq!(c.decide(), Step::RenewMarker { known_key_ids: vec![OLD.into()] });
}

/// A key that came due an hour before `at`, under spec.schedule.windows `windows`, decided at `at`.
fn due_under(windows: serde_json::Value, at: &str) -> Case {
    let at = t(at);
    let created = at - secs(80 * 86_400 + 3_600);
    let mut c = Case::new().key(OLD, true, created).active(OLD, created).secrets(SecretState::Holds(OLD.into()));
    c.spec.schedule = Some(serde_json::from_value(serde_json::json!({ "windows": windows })).unwrap());
    c.observed.now = at;
    c
}

fn berlin_nights() -> serde_json::Value {
    serde_json::json!([{"days": ["Tue", "Wed", "Thu"], "start": "02:00", "end": "05:00", "timeZone": "Europe/Berlin"}])
}

fn opens(step: &Step) -> Option<Timestamp> {
    match step {
        Step::WaitForWindow { opens, .. } => Some(*opens),
        _ => None,
    }
}

#[test]
fn a_due_rotation_waits_for_a_window_and_starts_inside_one() {
    // Monday 12:00 UTC: the next window is Tuesday 02:00 Berlin summer time (00:00 UTC).
    let c = due_under(berlin_nights(), "2026-06-01T12:00:00Z");
    let step = c.decide();
    assert_eq!(opens(&step), Some(t("2026-06-02T00:00:00Z")));
    assert!(matches!(&step, Step::WaitForWindow { requeue, .. } if *requeue == Duration::from_secs(12 * 3_600)));
    assert!(!step.writes(), "nothing is written while the window is closed");
    // Its first instant, and its last.
    assert_eq!(
        due_under(berlin_nights(), "2026-06-02T00:00:00Z").decide(),
        Step::Begin { trigger: Trigger::Scheduled }
    );
    assert_eq!(
        due_under(berlin_nights(), "2026-06-02T02:59:59Z").decide(),
        Step::Begin { trigger: Trigger::Scheduled }
    );
    // Closed at its end: the next one is Wednesday's.
    let closed = due_under(berlin_nights(), "2026-06-02T03:00:00Z").decide();
    assert_eq!(opens(&closed), Some(t("2026-06-03T00:00:00Z")));
}

#[test]
fn a_window_spanning_midnight_lets_a_rotation_start_after_midnight() {
    let fri_night = serde_json::json!([{"days": ["Fri"], "start": "22:00", "end": "02:00"}]);
    let sat_1am = due_under(fri_night.clone(), "2026-06-06T01:00:00Z");
    assert_eq!(sat_1am.decide(), Step::Begin { trigger: Trigger::Scheduled });
    let sat_2am = due_under(fri_night, "2026-06-06T02:00:00Z").decide();
    assert_eq!(opens(&sat_2am), Some(t("2026-06-12T22:00:00Z")));
}

#[test]
fn a_window_whose_start_the_spring_change_skips_opens_after_the_skipped_hour() {
    let sunday = serde_json::json!([{"days": ["Sun"], "start": "02:00", "end": "05:00", "timeZone": "Europe/Berlin"}]);
    let before = due_under(sunday.clone(), "2026-03-29T00:59:59Z").decide();
    assert_eq!(opens(&before), Some(t("2026-03-29T01:00:00Z")), "03:00 CEST, the first instant after 02:00 CET");
    assert_eq!(due_under(sunday, "2026-03-29T01:00:00Z").decide(), Step::Begin { trigger: Trigger::Scheduled });
}

#[test]
fn a_window_on_the_autumn_change_opens_at_the_first_pass_and_closes_at_local_end() {
    let sunday = serde_json::json!([{"days": ["Sun"], "start": "02:00", "end": "05:00", "timeZone": "Europe/Berlin"}]);
    let before = due_under(sunday.clone(), "2026-10-24T23:00:00Z").decide();
    assert_eq!(opens(&before), Some(t("2026-10-25T00:00:00Z")), "02:00 CEST");
    // 04:59 CET, four hours after it opened.
    assert_eq!(due_under(sunday.clone(), "2026-10-25T03:59:59Z").decide(), Step::Begin { trigger: Trigger::Scheduled });
    let after = due_under(sunday, "2026-10-25T04:00:00Z").decide();
    assert_eq!(opens(&after), Some(t("2026-11-01T01:00:00Z")), "a week later, 02:00 CET");
}

#[test]
fn the_annotations_the_first_key_and_a_lost_key_ignore_windows() {
    let mut c = due_under(berlin_nights(), "2026-06-01T12:00:00Z");
    c.observed.requests.rotate = Some("now".into());
    assert_eq!(c.decide(), Step::Begin { trigger: Trigger::Requested });
    c.observed.requests.emergency = Some("leak".into());
    assert_eq!(c.decide(), Step::Begin { trigger: Trigger::Emergency });
    // No key yet.
    let mut first = Case::new();
    first.spec.schedule = due_under(berlin_nights(), "2026-06-01T12:00:00Z").spec.schedule;
    assert_eq!(first.decide(), Step::Begin { trigger: Trigger::Bootstrap });
    // Every Secret emptied by hand: only a new key puts working credentials back.
    let lost = due_under(berlin_nights(), "2026-06-01T12:00:00Z").secrets(SecretState::Missing);
    assert_eq!(lost.decide(), Step::Begin { trigger: Trigger::Bootstrap });
}

#[test]
fn a_key_not_yet_due_shows_the_windows_opening_as_its_next_rotation() {
    // Due on Monday 2026-06-01 13:00 UTC; the rotation starts on Tuesday at 00:00 UTC.
    let mut c = due_under(berlin_nights(), "2026-06-01T14:00:00Z");
    c.observed.now = t("2026-06-01T12:00:00Z");
    assert_eq!(c.decide_why(), "next rotation at 2026-06-02T00:00:00Z");
    let created = t("2026-06-01T14:00:00Z") - secs(80 * 86_400 + 3_600);
    let valid = crate::validate::validate(&c.spec).unwrap();
    assert_eq!(due(created, &valid), t("2026-06-01T13:00:00Z"));
    assert_eq!(due_at(created, &valid), t("2026-06-02T00:00:00Z"));
}

#[test]
fn the_spread_delays_the_due_time_within_half_of_rotate_before() {
    let created = now();
    let mut valid = crate::validate::validate(&Case::new().spec).unwrap();
    assert_eq!(due_at(created, &valid), created + secs(80 * 86_400), "no uid: no spread");
    valid.spread =
        crate::schedule::spread(crate::schedule::share("0b7c2f5e-1c8e-4a3c-9f55-6f1f2a0d3e11"), valid.rotate_before);
    let at = due_at(created, &valid);
    assert!(at > created + secs(80 * 86_400) && at < created + secs(85 * 86_400), "{at}");
    assert_eq!(at, created + secs(80 * 86_400) + SignedDuration::try_from(valid.spread).unwrap());
}

#[test]
fn a_resource_due_while_the_window_is_closed_starts_at_its_place_in_it() {
    // Tuesday's window opens at 00:00 UTC; a share of a quarter puts this resource at 00:22:30.
    let mut c = due_under(berlin_nights(), "2026-06-01T12:00:00Z");
    let valid = |c: &Case| {
        let mut v = crate::validate::validate(&c.spec).unwrap();
        v.share = u32::MAX / 4 + 1;
        v
    };
    let decide_at = |c: &Case| {
        decide(&Input {
            spec: &c.spec,
            valid: &valid(c),
            status: &c.status,
            observed: &c.observed,
            identity: &c.identity,
            gates: &c.gates,
        })
        .step
    };
    match decide_at(&c) {
        Step::WaitForWindow { opens, message, .. } => {
            assert_eq!(opens, t("2026-06-02T00:22:30Z"));
            assert!(message.ends_with("opens at 2026-06-02T00:00:00Z, and this resource's rotation starts at 2026-06-02T00:22:30Z (its place in the window)"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Open, but before its place: it still waits.
    c.observed.now = t("2026-06-02T00:10:00Z");
    assert!(matches!(decide_at(&c), Step::WaitForWindow { opens, .. } if opens == t("2026-06-02T00:22:30Z")));
    c.observed.now = t("2026-06-02T00:22:30Z");
    assert_eq!(decide_at(&c), Step::Begin { trigger: Trigger::Scheduled });
    // An operator that was down through the whole window: the next window, at the same place.
    c.observed.now = t("2026-06-02T04:00:00Z");
    assert!(matches!(decide_at(&c), Step::WaitForWindow { opens, .. } if opens == t("2026-06-03T00:22:30Z")));
    let created = c.status.active_key.as_ref().unwrap().created_at.as_ref().unwrap().0;
    assert_eq!(due_at(created, &valid(&c)), t("2026-06-02T00:22:30Z"), "status.nextRotationTime");
}

#[test]
fn a_window_after_max_key_age_holds_the_rotation_and_says_the_key_will_expire() {
    // Due Monday 11:00 UTC with maxKeyAge 80d + 2h: it expires Monday 13:00, before Tuesday's window.
    let mut c = due_under(berlin_nights(), "2026-06-01T12:00:00Z");
    c.spec.max_key_age = crate::duration::SpecDuration::new("1922h");
    c.spec.rotate_before = crate::duration::SpecDuration::new("2h");
    match c.decide() {
        Step::WaitForWindow { message, opens, .. } => {
            assert_eq!(opens, t("2026-06-02T00:00:00Z"));
            assert_eq!(
                message,
                format!(
                    "key {OLD} is due for rotation; the next window of spec.schedule.windows opens at 2026-06-02T00:00:00Z; the key passes maxKeyAge at 2026-06-01T13:00:00Z, before then: set annotation rekey.dev/rotate to rotate now"
                )
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_restart_waits_for_a_rollout_slot_and_the_namespace_cooldown_but_an_emergency_does_not() {
    let stamp = Step::Stamp { key_id: NEW.into(), workloads: vec![wl("Deployment/web")] };
    let mut c = rolling(now(), Trigger::Scheduled).workload("Deployment/web", Some(OLD), true, 2);
    let holders = vec!["a/one".to_owned(), "payments/web".to_owned(), "z/two".to_owned()];
    c.gates = Gates { rollout_slot_holders: holders.clone(), max_rollouts: 2, ..Gates::default() };
    assert_eq!(
        c.decide(),
        Step::Wait {
            requeue: Some(Duration::from_secs(15)),
            why: "waiting for a rollout slot (at most 2 rollouts at once; held by payments/web and 2 resources in other namespaces)".into()
        }
    );
    assert!(!c.decide().writes(), "the old key stays Active, nothing is written");
    c.gates = Gates { restart_not_before: Some(now() + secs(20)), ..Gates::default() };
    assert_eq!(
        c.decide(),
        Step::Wait {
            requeue: Some(Duration::from_secs(20)),
            why: "waiting until 2026-06-01T12:00:20Z to restart workloads (--rollout-cooldown since the last restart in namespace payments)".into()
        }
    );
    // The cooldown is over.
    c.gates = Gates { restart_not_before: Some(now()), ..Gates::default() };
    assert_eq!(c.decide(), stamp);
    // A leaked key's workloads are restarted at once.
    let mut e = rolling(now(), Trigger::Emergency).workload("Deployment/web", Some(OLD), true, 2);
    e.gates =
        Gates { rollout_slot_holders: holders.clone(), restart_not_before: Some(now() + secs(20)), ..Gates::default() };
    assert_eq!(e.decide(), stamp);
    // Workloads already stamped wait for nothing but their rollout.
    let mut done = rolling(now(), Trigger::Scheduled).workload("Deployment/web", Some(NEW), false, 1);
    done.gates = Gates { rollout_slot_holders: holders, ..Gates::default() };
    assert!(matches!(done.decide(), Step::Wait { why, .. } if why.starts_with("waiting for the rollout of")));
}

#[test]
fn a_restart_waits_within_the_cooldown_for_neighbours_handing_over_so_one_restart_carries_all() {
    let stamp = Step::Stamp { key_id: NEW.into(), workloads: vec![wl("Deployment/web")] };
    let mut c = rolling(now() - secs(5), Trigger::Requested).workload("Deployment/web", Some(OLD), true, 2);
    c.gates = Gates { restart_cooldown: Duration::from_secs(20), handing_over: vec!["b".into()], ..Gates::default() };
    assert_eq!(
        c.decide(),
        Step::Wait {
            requeue: Some(Duration::from_secs(1)),
            why: "waiting until 2026-06-01T12:00:15Z at most for b to hand over, so that one restart carries every new key".into()
        }
    );
    // The cooldown since entering RollingOut is over: it restarts without them.
    c.status.rotation.as_mut().unwrap().phase_since = Time(now() - secs(20));
    assert_eq!(c.decide(), stamp);
    // No cooldown configured: no waiting.
    let mut c = rolling(now(), Trigger::Requested).workload("Deployment/web", Some(OLD), true, 2);
    c.gates = Gates { handing_over: vec!["b".into()], ..Gates::default() };
    assert_eq!(c.decide(), stamp);
    // A neighbour's restart already carried this key: nothing to restart.
    let c = rolling(now(), Trigger::Requested).workload("Deployment/web", Some(&format!("AKIAB,{NEW}")), true, 2);
    assert_eq!(c.decide(), Step::Advance { to: Phase::Deactivating });
}
