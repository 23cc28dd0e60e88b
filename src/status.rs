//! Reporting: the status a reconcile starts from and the conditions it ends with (pure), and the
//! status write (TOUCHES THE CLUSTER: a replace of the status subresource, optionally with a
//! resourceVersion precondition). Events are `events`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kube::api::{Api, PostParams};

use std::time::Duration;

use crate::api::{IamKeyRotation, IamKeyRotationStatus, KeyRef, Phase};
use crate::error::Error;
use crate::plan::{Decision, DegradeReason, Requests, StallReason, Step};
use crate::validate::ValidSpec;

fn set(
    conds: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let s = if status { "True" } else { "False" };
    if let Some(c) = conds.iter_mut().find(|c| c.type_ == type_) {
        if c.status != s {
            c.last_transition_time = Time(now);
        }
        c.status = s.into();
        c.reason = reason.into();
        c.message = message.into();
        c.observed_generation = generation;
        return;
    }
    conds.push(Condition {
        type_: type_.into(),
        status: s.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(now),
    });
}

fn get<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

const HEALTHY: &str = "nothing is wrong";

/// What the reconcile concluded, for the conditions.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Stalled(StallReason, String),
    Degraded(DegradeReason, String),
    /// A step that moved the rotation forward: stale Degraded conditions clear.
    Progressed,
    /// Nothing new (waiting, dry run, suspended), and why.
    Waiting(String),
    /// A due scheduled rotation waits for a window of spec.schedule.windows to open.
    WaitingForWindow(String),
    /// Waiting out the backoff after a failure: the conditions that failure set stand.
    Retrying(String),
    /// The operator's own Kubernetes permissions are missing: not Ready until a human fixes them.
    Forbidden(String),
    /// A step failed and is retried with backoff: Degraded with the error's category as reason,
    /// for as long as the backoff runs.
    Failed(&'static str, String),
}

impl Verdict {
    pub fn of(decision: &Decision) -> Self {
        let v = Self::of_step(&decision.step);
        match (&decision.caveat, v) {
            (Some((reason, message)), Verdict::Progressed | Verdict::Waiting(_)) => {
                Verdict::Degraded(*reason, message.clone())
            }
            (_, v) => v,
        }
    }

    fn of_step(step: &Step) -> Self {
        match step {
            Step::Stall { reason, message } => Verdict::Stalled(*reason, message.clone()),
            Step::Degrade { reason, message, .. } | Step::Abandon { reason, message, .. } => {
                Verdict::Degraded(*reason, message.clone())
            }
            Step::Reactivate { key_id, broken } => Verdict::Degraded(
                DegradeReason::RolledBack,
                format!("key {key_id} was reactivated: {} broke after it was deactivated", broken.join(", ")),
            ),
            Step::MarkRevert { message } => Verdict::Degraded(DegradeReason::SecretReverted, message.clone()),
            // Carrying out the revert marked before: its Degraded stands.
            Step::Revert { .. } => Verdict::Waiting(String::new()),
            Step::Retry { why, .. } => Verdict::Retrying(why.clone()),
            Step::Wait { why, .. } | Step::WaitForSlot { message: why, .. } => Verdict::Waiting(why.clone()),
            Step::WaitForWindow { message, .. } => Verdict::WaitingForWindow(message.clone()),
            Step::Withhold { why, step } => {
                Verdict::Waiting(format!("{}: the next step would be {}", why.describe(), step.name()))
            }
            Step::NeedIam | Step::NeedWorkloads | Step::TrackSoak { .. } => Verdict::Waiting(String::new()),
            // Bookkeeping before the next attempt of a refused CreateAccessKey: not progress (the
            // refusal's Degraded stands until a key is created).
            Step::RenewMarker { .. } => Verdict::Waiting("trying CreateAccessKey again".into()),
            _ => Verdict::Progressed,
        }
    }

    /// A failed step: missing RBAC is for a human to fix, and says exactly which verb on which
    /// resource; any other failure is Degraded with its category while the backoff runs.
    pub fn of_failure(step: &str, e: &Error, attempts: u32) -> Self {
        match e.category() {
            "KubeForbidden" => Verdict::Forbidden(format!("{step} failed: {e}")),
            c => Verdict::Failed(c, format!("{step} failed (attempt {attempts}, retried with backoff): {e}")),
        }
    }
}

/// The status a reconcile starts from: request annotations present when rekey first sees the
/// resource count as already acted on, and a spec edit is a new attempt that does not wait out the
/// failures of the spec before it.
pub fn prepare(
    before: &IamKeyRotationStatus,
    generation: Option<i64>,
    requests: &Requests,
    user: &str,
) -> IamKeyRotationStatus {
    let mut st = before.clone();
    // Keys tracked before status recorded their user belong to the spec's user of that time.
    if st.user_name.is_none() && (st.active_key.is_some() || st.phase != Phase::Idle) {
        st.user_name = Some(user.to_owned());
    }
    if before.observed_generation.is_none() {
        st.last_rotate_request.clone_from(&requests.rotate);
        st.last_emergency_request.clone_from(&requests.emergency);
        st.last_retire_request.clone_from(&requests.retire);
    }
    if before.observed_generation.is_some() && before.observed_generation != generation {
        st.failed_attempts = 0;
        st.last_failure_time = None;
    }
    st.observed_generation = generation;
    st
}

/// status.nextRotationTime as the spec says now: a spec edit (maxKeyAge, rotateBefore, windows)
/// or the spread added in 0.1.0 moves it without a step of its own. Steps that change the active
/// key set it the same way (`act`).
pub fn next_rotation(st: &IamKeyRotationStatus, v: &ValidSpec) -> Option<Time> {
    let created = st.active_key.as_ref()?.created_at.as_ref()?;
    Some(Time(crate::plan::due_at(created.0, v)))
}

/// A failed step recorded: the backoff (failedAttempts, lastFailureTime) lives in status, so it
/// survives restarts.
pub fn failed(before: &IamKeyRotationStatus, generation: Option<i64>, now: Timestamp) -> IamKeyRotationStatus {
    let mut st = before.clone();
    st.observed_generation = generation;
    st.failed_attempts += 1;
    st.last_failure_time = Some(Time(now));
    st
}

/// Why a key in place is not good enough: it is older than spec.maxKeyAge (cert-manager's Ready
/// goes False for an expired certificate the same way). None while it is younger, or when its age
/// or the limit is unknown (an invalid spec is Stalled already).
pub fn expired(key: &KeyRef, max_key_age: Option<Duration>, now: Timestamp) -> Option<String> {
    let (created, max) = (key.created_at.as_ref()?.0, max_key_age?);
    let age = Duration::try_from(now.duration_since(created)).ok()?;
    (age >= max).then(|| {
        // The creation time, not the age: a message that changed every second would be rewritten
        // at random moments and stale in between.
        format!(
            "key {} (created {created}) is past maxKeyAge ({}): rotate it, or see Degraded/Stalled for why rekey has not",
            key.access_key_id,
            crate::duration::format(max)
        )
    })
}

/// How long until the key passes maxKeyAge; None once it has, or when its age or the limit is
/// unknown (pure).
pub fn until_expiry(key: &KeyRef, max_key_age: Option<Duration>, now: Timestamp) -> Option<Duration> {
    let (created, max) = (key.created_at.as_ref()?.0, max_key_age?);
    let age = Duration::try_from(now.duration_since(created)).unwrap_or_default();
    max.checked_sub(age).filter(|d| !d.is_zero())
}

/// The conditions after a reconcile (pure). `max_key_age` is spec.maxKeyAge (None if invalid).
pub fn conditions(
    st: &IamKeyRotationStatus,
    verdict: &Verdict,
    max_key_age: Option<Duration>,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let mut c = st.conditions.clone();
    if let Verdict::Retrying(why) = verdict {
        rotating(&mut c, st, why, generation, now);
        // The failure's conditions stand through the backoff; an expiry meanwhile still shows.
        if let Some(message) = st.active_key.as_ref().and_then(|k| expired(k, max_key_age, now)) {
            set(&mut c, "Ready", false, "KeyExpired", &message, generation, now);
        }
        return c;
    }
    let secret_broken = matches!(verdict, Verdict::Stalled(StallReason::SecretConflict, _));
    let forbidden = match verdict {
        Verdict::Forbidden(m) => Some(m.as_str()),
        _ => None,
    };
    match (&st.active_key, secret_broken) {
        _ if forbidden.is_some() => {
            set(&mut c, "Ready", false, "Forbidden", forbidden.unwrap_or_default(), generation, now)
        }
        (Some(k), false) if expired(k, max_key_age, now).is_some() => {
            let message = expired(k, max_key_age, now).unwrap_or_default();
            set(&mut c, "Ready", false, "KeyExpired", &message, generation, now)
        }
        (Some(k), false) => set(
            &mut c,
            "Ready",
            true,
            "KeyInPlace",
            &format!("the Secrets hold key {}, verified and Active", k.access_key_id),
            generation,
            now,
        ),
        (_, true) => set(
            &mut c,
            "Ready",
            false,
            "SecretConflict",
            "the Secrets do not hold a key rekey can account for",
            generation,
            now,
        ),
        (None, false) => set(&mut c, "Ready", false, "NoKey", "no key is in the Secrets yet", generation, now),
    }
    match verdict {
        Verdict::WaitingForWindow(message) => {
            set(&mut c, "Rotating", false, "WaitingForWindow", message, generation, now)
        }
        Verdict::Waiting(why) => rotating(&mut c, st, why, generation, now),
        _ => rotating(&mut c, st, "", generation, now),
    }
    match verdict {
        Verdict::Stalled(reason, message) => set(&mut c, "Stalled", true, (*reason).into(), message, generation, now),
        Verdict::Forbidden(message) => set(&mut c, "Stalled", true, "Forbidden", message, generation, now),
        _ => set(&mut c, "Stalled", false, "AsExpected", "rekey can proceed on its own", generation, now),
    }
    match verdict {
        Verdict::Degraded(reason, message) => set(&mut c, "Degraded", true, (*reason).into(), message, generation, now),
        Verdict::Failed(reason, message) => set(&mut c, "Degraded", true, reason, message, generation, now),
        Verdict::Progressed => set(&mut c, "Degraded", false, "AsExpected", HEALTHY, generation, now),
        _ if get(&c, "Degraded").is_none() => set(&mut c, "Degraded", false, "AsExpected", HEALTHY, generation, now),
        _ => {}
    }
    if st.active_key.is_none() {
        set(&mut c, "Reconciling", true, "Bootstrapping", "the first key is not in place yet", generation, now);
    } else {
        set(&mut c, "Reconciling", false, "KeyInPlace", "the first key is in place", generation, now);
    }
    c
}

/// The Rotating condition, whose message says what the rotation waits for, if anything.
fn rotating(c: &mut Vec<Condition>, st: &IamKeyRotationStatus, why: &str, generation: Option<i64>, now: Timestamp) {
    let (status, reason, what) = match st.phase {
        Phase::Idle => (false, "Idle", "no rotation in flight".to_owned()),
        // An emergency names its request: the leak response's says which source and event.
        p if st.emergency() => match st.last_emergency_request.as_deref() {
            Some(request) => (true, p.into(), format!("EMERGENCY rotation ({request}) in phase {p}")),
            // Escalated by a report on the key it hands over, kept for the rotation after this one.
            None => (true, p.into(), format!("EMERGENCY rotation in phase {p}")),
        },
        p => (true, p.into(), format!("rotation in phase {p}")),
    };
    let message = if why.is_empty() { what } else { format!("{what}; {why}") };
    set(c, "Rotating", status, reason, &message, generation, now);
}

/// TOUCHES THE CLUSTER. Writes the whole status. With `precondition`, the write only succeeds if
/// the resource is unchanged since it was read (a phase change decided on a stale view fails with
/// Conflict instead of repeating or undoing a step); without, a conflict with a concurrent edit of
/// spec or metadata is retried on a fresh read.
///
/// Whether `after` says anything `before` does not: live rollout progress in the Rotating
/// message ("1 of 2 updated, 1 ready" → "2 of 2 updated, 2 ready") is not worth a status write of
/// its own; it goes out with the next change that is. Every other difference is written, names
/// and times in any message included.
pub fn worth_writing(before: &IamKeyRotationStatus, after: &IamKeyRotationStatus) -> bool {
    if before == after {
        return false;
    }
    let skeleton = |st: &IamKeyRotationStatus| {
        let mut st = st.clone();
        for c in st.conditions.iter_mut().filter(|c| c.type_ == "Rotating") {
            c.message = without_progress_counts(&c.message);
        }
        st
    };
    skeleton(before) != skeleton(after)
}

/// The Rotating message with the counts of `workloads::progress` ("N of M updated, K ready",
/// "N pod(s) of the old template left") masked; every other number kept.
fn without_progress_counts(message: &str) -> String {
    let words: Vec<&str> = message.split(' ').collect();
    let count = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit());
    let progress = |i: usize| {
        let next = words.get(i + 1).map(|w| w.trim_end_matches(','));
        let after_of = i > 0 && words[i - 1] == "of" && words.get(i + 1).is_some_and(|w| w.starts_with("updated"));
        matches!(next, Some("of" | "ready" | "pod(s)")) || after_of
    };
    let masked: Vec<&str> = words
        .iter()
        .enumerate()
        .map(|(i, w)| if count(w.trim_end_matches(',')) && progress(i) { "#" } else { w })
        .collect();
    masked.join(" ")
}

/// A replace of the status subresource, not server-side apply: on the 1.20 apiserver, applying a
/// status without a nested object rekey owned (e.g. `rotation` at the end of a rotation) leaves an
/// empty shell of it behind that fails schema validation.
pub async fn write(
    api: &Api<IamKeyRotation>,
    obj: &IamKeyRotation,
    status: &IamKeyRotationStatus,
    precondition: bool,
) -> Result<IamKeyRotation, Error> {
    let mut current = obj.clone();
    for _ in 0..5 {
        current.status = Some(status.clone());
        match api.replace_status(&obj.name_any(), &PostParams::default(), &current).await {
            Ok(o) => return Ok(o),
            Err(kube::Error::Api(e)) if e.code == 409 && !precondition => {
                current = api.get(&obj.name_any()).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Conflict)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: Phase, key: bool) -> IamKeyRotationStatus {
        IamKeyRotationStatus {
            phase,
            active_key: key.then(|| KeyRef { access_key_id: "AKIA1".into(), created_at: None }),
            ..Default::default()
        }
    }

    fn cond<'a>(c: &'a [Condition], t: &str) -> (&'a str, &'a str) {
        let c = get(c, t).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn ready_stays_true_during_a_rotation_and_rotating_names_the_phase() {
        let c = conditions(
            &status(Phase::Soaking, true),
            &Verdict::Waiting(String::new()),
            None,
            Some(3),
            Timestamp::now(),
        );
        assert_eq!(cond(&c, "Ready"), ("True", "KeyInPlace"));
        assert_eq!(cond(&c, "Rotating"), ("True", "Soaking"));
        assert_eq!(cond(&c, "Reconciling").0, "False");
        assert!(c.iter().all(|c| c.observed_generation == Some(3)));
    }

    #[test]
    fn bootstrap_is_reconciling_and_not_ready() {
        let c = conditions(&status(Phase::Creating, false), &Verdict::Progressed, None, None, Timestamp::now());
        assert_eq!(cond(&c, "Ready"), ("False", "NoKey"));
        assert_eq!(cond(&c, "Reconciling"), ("True", "Bootstrapping"));
    }

    #[test]
    fn degraded_persists_while_waiting_and_clears_on_progress() {
        let now = Timestamp::now();
        let mut st = status(Phase::RollingOut, true);
        st.conditions = conditions(&st, &Verdict::Degraded(DegradeReason::RolloutStalled, "x".into()), None, None, now);
        assert_eq!(cond(&st.conditions, "Degraded"), ("True", "RolloutStalled"));
        st.conditions = conditions(&st, &Verdict::Waiting(String::new()), None, None, now);
        assert_eq!(cond(&st.conditions, "Degraded"), ("True", "RolloutStalled"));
        st.conditions = conditions(&st, &Verdict::Progressed, None, None, now);
        assert_eq!(cond(&st.conditions, "Degraded").0, "False");
    }

    #[test]
    fn what_a_failure_said_stands_while_its_backoff_runs() {
        let now = Timestamp::now();
        let mut st = status(Phase::RollingOut, true);
        st.conditions = conditions(&st, &Verdict::Forbidden("cannot patch deployments".into()), None, None, now);
        assert_eq!(cond(&st.conditions, "Ready"), ("False", "Forbidden"));
        let c = conditions(&st, &Verdict::Retrying(String::new()), None, None, now);
        assert_eq!(cond(&c, "Ready"), ("False", "Forbidden"));
        assert_eq!(cond(&c, "Stalled"), ("True", "Forbidden"));
        let c = conditions(&st, &Verdict::Progressed, None, None, now);
        assert_eq!(cond(&c, "Ready"), ("True", "KeyInPlace"));
    }

    #[test]
    fn a_secret_conflict_is_stalled_and_not_ready() {
        let v = Verdict::Stalled(StallReason::SecretConflict, "disagree".into());
        let c = conditions(&status(Phase::Idle, true), &v, None, None, Timestamp::now());
        assert_eq!(cond(&c, "Stalled"), ("True", "SecretConflict"));
        assert_eq!(cond(&c, "Ready").0, "False");
    }

    #[test]
    fn a_failing_step_is_degraded_with_its_category_while_its_backoff_runs() {
        let now = Timestamp::now();
        let mut st = status(Phase::Idle, true);
        let e = Error::Iam { operation: "CreateAccessKey", code: "AccessDenied".into(), message: "scp".into() };
        st.conditions = conditions(&st, &Verdict::of_failure("Create", &e, 2), None, None, now);
        assert_eq!(cond(&st.conditions, "Degraded"), ("True", "IamAccessDenied"));
        assert!(get(&st.conditions, "Degraded").unwrap().message.contains("Create failed (attempt 2"));
        let c = conditions(&st, &Verdict::Retrying("retrying after failure at t".into()), None, None, now);
        assert_eq!(cond(&c, "Degraded"), ("True", "IamAccessDenied"));
        assert!(get(&c, "Rotating").unwrap().message.contains("retrying after failure at t"));
        let c = conditions(&st, &Verdict::Progressed, None, None, now);
        assert_eq!(cond(&c, "Degraded").0, "False");
    }

    #[test]
    fn the_rotating_condition_says_what_the_rotation_waits_for() {
        let c = conditions(
            &status(Phase::RollingOut, true),
            &Verdict::Waiting("waiting for the rollout of Deployment/api: 1 of 2 updated, 1 ready".into()),
            None,
            None,
            Timestamp::now(),
        );
        let r = get(&c, "Rotating").unwrap();
        assert_eq!(
            r.message,
            "rotation in phase RollingOut; waiting for the rollout of Deployment/api: 1 of 2 updated, 1 ready"
        );
    }

    #[test]
    fn a_message_whose_rollout_counts_alone_moved_is_not_worth_a_write() {
        let with = |type_: &str, message: &str| {
            let mut st = status(Phase::RollingOut, true);
            st.conditions = vec![Condition {
                type_: type_.into(),
                status: "True".into(),
                reason: "RollingOut".into(),
                message: message.into(),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
                observed_generation: Some(1),
            }];
            st
        };
        let at = |m: &str| with("Rotating", &format!("waiting for the rollout of Deployment/web-1: {m}"));
        assert!(!worth_writing(&at("9 of 10 updated, 8 ready"), &at("10 of 10 updated, 10 ready")));
        assert!(!worth_writing(
            &at("2 of 2 updated, 2 ready, 2 pod(s) of the old template left"),
            &at("2 of 2 updated, 2 ready, 1 pod(s) of the old template left")
        ));
        assert!(worth_writing(&at("2 of 2 updated"), &at("2 of 2 updated, 1 pod(s) of the old template left")));
        assert!(worth_writing(&at("2 of 2 updated"), &with("Rotating", "waiting for a rotation slot (at most 10)")));
        // Names and times are not counts, in the Rotating message or any other.
        let rollout =
            |name: &str| with("Rotating", &format!("waiting for the rollout of Deployment/{name}: 1 of 2 updated"));
        assert!(worth_writing(&rollout("worker-1"), &rollout("worker-2")));
        let used = |t: &str| with("Rotating", &format!("key AKIA1 was used at 2026-06-01T12:{t}:00Z; waiting"));
        assert!(worth_writing(&used("00"), &used("05")));
        let stalled = |n: &str| with("Degraded", &format!("waiting for Deployment/web: 1 of 2 Ready, and {n} more"));
        assert!(worth_writing(&stalled("3"), &stalled("9")));
        let mut moved = at("2 of 2 updated");
        moved.phase = Phase::Deactivating;
        assert!(worth_writing(&at("1 of 2 updated"), &moved), "anything besides the counts is written");
    }

    #[test]
    fn a_key_past_max_key_age_is_not_ready_even_while_it_is_replaced() {
        let now: Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
        let mut st = status(Phase::RollingOut, true);
        let max = Some(Duration::from_secs(30 * 86_400));
        let created = |days: i64| Some(Time(now - jiff_days(days)));
        st.active_key.as_mut().unwrap().created_at = created(29);
        let c = conditions(&st, &Verdict::Waiting(String::new()), max, None, now);
        assert_eq!(cond(&c, "Ready"), ("True", "KeyInPlace"));
        st.active_key.as_mut().unwrap().created_at = created(31);
        let c = conditions(&st, &Verdict::Waiting(String::new()), max, None, now);
        assert_eq!(cond(&c, "Ready"), ("False", "KeyExpired"));
        assert_eq!(
            get(&c, "Ready").unwrap().message,
            "key AKIA1 (created 2026-01-29T00:00:00Z) is past maxKeyAge (30d): rotate it, or see Degraded/Stalled for why rekey has not"
        );
        let c = conditions(&st, &Verdict::Retrying("retrying".into()), max, None, now);
        assert_eq!(cond(&c, "Ready"), ("False", "KeyExpired"), "an expiry during a backoff shows too");
        // Unknown age or an invalid spec: no judgement.
        assert_eq!(cond(&conditions(&st, &Verdict::Progressed, None, None, now), "Ready").0, "True");
        st.active_key.as_mut().unwrap().created_at = None;
        assert_eq!(cond(&conditions(&st, &Verdict::Progressed, max, None, now), "Ready").0, "True");
        // The reconcile looks again when the key expires.
        let key = KeyRef { access_key_id: "AKIA1".into(), created_at: created(29) };
        assert_eq!(until_expiry(&key, max, now), Some(Duration::from_secs(86_400)));
        assert_eq!(until_expiry(&KeyRef { created_at: created(31), ..key }, max, now), None);
    }

    #[test]
    fn a_rotation_waiting_for_its_window_is_not_rotating_and_says_when_the_window_opens() {
        let now: Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
        let mut st = status(Phase::Idle, true);
        let max = Some(Duration::from_secs(30 * 86_400));
        st.active_key.as_mut().unwrap().created_at = Some(Time(now - jiff_days(29)));
        let why =
            "key AKIA1 is due for rotation; the next window of spec.schedule.windows opens at 2026-03-03T01:00:00Z";
        let waiting = Verdict::of(&Decision {
            step: Step::WaitForWindow { requeue: Duration::from_secs(1), opens: now, message: why.into() },
            caveat: None,
        });
        let c = conditions(&st, &waiting, max, None, now);
        assert_eq!(cond(&c, "Rotating"), ("False", "WaitingForWindow"));
        assert_eq!(get(&c, "Rotating").unwrap().message, why);
        assert_eq!(cond(&c, "Ready"), ("True", "KeyInPlace"));
        // Past maxKeyAge the window still holds, and Ready says the key expired.
        st.active_key.as_mut().unwrap().created_at = Some(Time(now - jiff_days(31)));
        let c = conditions(&st, &waiting, max, None, now);
        assert_eq!((cond(&c, "Rotating"), cond(&c, "Ready")), (("False", "WaitingForWindow"), ("False", "KeyExpired")));
    }

    fn jiff_days(days: i64) -> k8s_openapi::jiff::SignedDuration {
        k8s_openapi::jiff::SignedDuration::from_hours(24 * days)
    }
}
