//! The steps up to the distribution of the new key: adopt, fill, begin, create, recover, verify,
//! abandon, distribute. TOUCHES THE CLUSTER AND IAM.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Resource as _;
use secrecy::SecretString;

use super::{Env, Outcome, active_id, enter, history, next_rotation, reset_to_idle};
use crate::api::{
    HistoryOutcome, IamKeyRotationStatus, KeyRef, KeyState, Pending, Phase, RetiringKey, RotationProgress, Trigger,
};
use crate::error::Error;
use crate::iam::{Iam, Verification, user_of_arn};
use crate::plan::{self, SecretState};
use crate::secrets::{self, AccessKey};

/// The Secrets already hold an Active key of the user: track it and claim it (taking over the claim
/// of a resource that no longer exists); a retiring partner is retired only after the workloads
/// were rolled onto the adopted key (phase RollingOut), like a rotation's old key.
pub async fn adopt<I: Iam>(
    env: &Env<'_, I>,
    st: &mut IamKeyRotationStatus,
    key_id: &str,
    created: Timestamp,
    partner: Option<&(String, bool)>,
) -> Outcome {
    let now = env.now();
    st.active_key = Some(KeyRef { access_key_id: key_id.to_owned(), created_at: Some(Time(created)) });
    st.user_name = Some(env.user().to_owned());
    next_rotation(st, env.valid);
    let mut out = Outcome::default().event(false, "Adopted", format!("adopted key {key_id} found in the Secrets"));
    if let Some((p, active)) = partner {
        st.retiring_key = Some(RetiringKey {
            access_key_id: p.clone(),
            state: if *active { KeyState::Active } else { KeyState::Inactive },
            deactivated_at: (!active).then_some(Time(now)),
        });
        st.rotation = Some(RotationProgress::start(Trigger::Scheduled, now));
        st.phase = Phase::RollingOut;
        out = out.event(false, "AdoptedRetiringKey", format!("key {p}, created by this resource, is retired"));
    }
    out = env.claim(key_id, out).await;
    out.committed()
}

/// Copies the active key from one target Secret into those that lack it.
pub async fn fill<I: Iam>(
    env: &Env<'_, I>,
    st: &IamKeyRotationStatus,
    from: &str,
    to: &[String],
) -> Result<Outcome, Error> {
    let active = active_id(st).ok_or_else(|| Error::Unsafe("no active key to copy".into()))?;
    let key = env.target_key(from, active).await?;
    env.write_targets(to, &key, false).await?;
    Ok(Outcome::requeue(Duration::from_secs(1)).event(
        false,
        "SecretsFilled",
        format!("wrote key {} into {}", key.id, to.join(", ")),
    ))
}

/// Preflight, then the write-ahead marker (phase Creating, committed with a precondition).
pub async fn begin<I: Iam>(
    env: &Env<'_, I>,
    st: &mut IamKeyRotationStatus,
    trigger: Trigger,
) -> Result<Outcome, Error> {
    let now = env.now();
    preflight(env).await?;
    let keys = env.observed.iam.as_ref().map(|i| i.keys.clone()).unwrap_or_default();
    st.pending = Some(Pending::attempt(now, keys.iter().map(|k| k.id.clone()).collect()));
    st.rotation = Some(RotationProgress::start(trigger, now));
    st.phase = Phase::Creating;
    st.user_name = Some(env.user().to_owned());
    match trigger {
        Trigger::Requested => st.last_rotate_request.clone_from(&env.observed.requests.rotate),
        Trigger::Emergency => st.last_emergency_request.clone_from(&env.observed.requests.emergency),
        Trigger::Bootstrap | Trigger::Scheduled => {}
    }
    let why = match trigger {
        Trigger::Bootstrap => "no key in the Secrets yet".to_owned(),
        Trigger::Scheduled => "the active key is due".to_owned(),
        Trigger::Requested => "rotation requested by annotation".to_owned(),
        Trigger::Emergency => format!(
            "EMERGENCY rotation requested ({}): {}",
            st.last_emergency_request.as_deref().unwrap_or_default(),
            super::retire::switch_off_rule(env.valid)
        ),
    };
    Ok(Outcome::next().committed().event(false, "Creating", format!("rotation started: {why}")))
}

/// Everything that could make the staging write fail after CreateAccessKey is checked now, while
/// failing costs nothing: the staging Secret exists and takes a write, and so does every target.
async fn preflight<I: Iam>(env: &Env<'_, I>) -> Result<(), Error> {
    let api = env.secrets();
    let owner = env.obj.controller_owner_ref(&()).ok_or_else(|| Error::Internal("resource has no uid".into()))?;
    if secrets::ensure_staging(&api, env.name(), owner).await? {
        secrets::clear_staging(&api, env.name()).await?;
    }
    let probe = AccessKey { id: "AKIAPREFLIGHTPROBE00".into(), secret: SecretString::from("preflight".to_owned()) };
    secrets::write_staging(&api, env.name(), &probe, true).await?;
    let all: Vec<String> = env.obj.spec.secrets.iter().map(|t| t.name.clone()).collect();
    env.write_targets(&all, &probe, true).await
}

/// CreateAccessKey, at once into the staging Secret, then status.newKey and the owner claim.
pub async fn create<I: Iam>(env: &Env<'_, I>, st: &mut IamKeyRotationStatus) -> Result<Outcome, Error> {
    crate::failpoint!("before-create");
    let (key, created) = match env.iam.create_key(env.user()).await {
        Ok(k) => k,
        // IAM answered and created nothing: the marker is lowered (see Error::NotCreated).
        Err(e) if e.answered() => return Err(Error::NotCreated(Box::new(e))),
        Err(e) => return Err(e),
    };
    crate::failpoint!("after-create");
    // Nothing between the create and this write: the secret exists nowhere else.
    secrets::write_staging(&env.secrets(), env.name(), &key, false).await?;
    crate::failpoint!("after-staging");
    // Not committed with a precondition: a concurrent edit of the resource must not keep the new
    // key out of status (the write is retried on a fresh read instead).
    set_new_key(st, &key.id, created, env.now());
    let out = Outcome::next().event(false, "Created", format!("created key {}", key.id));
    if st.emergency() {
        // A leaked key: its deactivation waits for no call it does not need. The leaked key's own
        // claim keeps other owners out until the deletion, which claims the new key first.
        return Ok(out);
    }
    Ok(env.claim(&key.id, out).await)
}

/// The new key is in the staging Secret: record it, drop the marker, verify next.
pub fn record_new_key<I: Iam>(
    env: &Env<'_, I>,
    st: &mut IamKeyRotationStatus,
    key_id: &str,
    created: Timestamp,
) -> Outcome {
    set_new_key(st, key_id, created, env.now());
    Outcome::next().committed()
}

fn set_new_key(st: &mut IamKeyRotationStatus, key_id: &str, created: Timestamp, now: Timestamp) {
    st.new_key = Some(KeyRef { access_key_id: key_id.to_owned(), created_at: Some(Time(created)) });
    st.pending = None;
    enter(st, Phase::Verifying, now);
}

/// The write-ahead marker of a new attempt, committed before CreateAccessKey is called again.
pub fn renew_marker<I: Iam>(env: &Env<'_, I>, st: &mut IamKeyRotationStatus, known: &[String]) -> Outcome {
    st.pending = Some(Pending::attempt(env.now(), known.to_vec()));
    Outcome::next().committed()
}

/// Recovery: deletes the key an interrupted attempt created (nobody has it), and renews the marker.
pub async fn delete_orphan<I: Iam>(
    env: &Env<'_, I>,
    st: &mut IamKeyRotationStatus,
    key_id: &str,
) -> Result<Outcome, Error> {
    let keys = env.fresh_keys().await?;
    if keys.iter().any(|k| k.id == key_id) {
        env.delete_key(key_id).await?;
    }
    st.pending =
        Some(Pending::attempt(env.now(), keys.iter().filter(|k| k.id != key_id).map(|k| k.id.clone()).collect()));
    Ok(Outcome::next().committed().event(
        true,
        "OrphanDeleted",
        format!("deleted key {key_id}, created by an interrupted attempt and held by nobody; creating again"),
    ))
}

/// One sts:GetCallerIdentity signed with the new key.
pub async fn verify<I: Iam>(env: &Env<'_, I>, st: &mut IamKeyRotationStatus, key_id: &str) -> Result<Outcome, Error> {
    let key = env.staged_key(key_id).await?;
    let attempts = st.rotation.as_ref().map(|r| r.verify_attempts).unwrap_or(0);
    let verification = match crate::failpoint_set!("verify-rejected") {
        true => Verification::Rejected("InvalidClientTokenId (failpoint)".into()),
        false => env.iam.verify(&key, env.region).await?,
    };
    match verification {
        Verification::Authenticated(arn) if user_of_arn(&arn).is_some_and(|u| u.eq_ignore_ascii_case(env.user())) => {
            enter(st, Phase::Distributing, env.now());
            Ok(Outcome::next().committed().event(false, "Verified", format!("key {key_id} authenticates as {arn}")))
        }
        Verification::Authenticated(arn) => {
            Err(Error::Unsafe(format!("key {key_id} authenticates as {arn}, not as IAM user {}", env.user())))
        }
        Verification::Rejected(code) => {
            if let Some(r) = st.rotation.as_mut() {
                r.verify_attempts += 1;
            }
            // IAM takes seconds to propagate a new key: 1, 2, 4 ... 15 s.
            let wait = plan::doubling(attempts + 1, Duration::from_secs(1), Duration::from_secs(15));
            Ok(Outcome::requeue(wait).event(
                false,
                "VerificationPending",
                format!("key {key_id} not accepted yet ({code}); attempt {}", attempts + 1),
            ))
        }
    }
}

/// How many failed attempts a rotation request survives before it counts as used.
pub const MAX_REQUEST_RETRIES: u32 = 5;

/// Gives up the rotation; deletes the new key if the fresh list still has it and nobody has it.
pub async fn abandon<I: Iam>(
    env: &Env<'_, I>,
    st: &mut IamKeyRotationStatus,
    delete_key: Option<&str>,
    reason: &'static str,
    message: &str,
) -> Result<Outcome, Error> {
    let now = env.now();
    let mut gone = None;
    if let Some(k) = delete_key {
        // Deleted even when the fresh list lacks it: IAM's list may lag a key created seconds
        // ago, and deleting a key that is gone is a no-op (NoSuchEntity).
        let in_secret = env.observed.secrets.iter().any(|(_, s)| *s == SecretState::Holds(k.to_owned()));
        if !in_secret && active_id(st) != Some(k) {
            env.delete_key(k).await?;
            gone = Some(k);
        }
    }
    secrets::delete_staging(&env.secrets(), env.name()).await?;
    let old = active_id(st).map(str::to_owned);
    history(st, old, delete_key.map(str::to_owned), HistoryOutcome::Abandoned, now);
    // A person asked for this rotation: a failed attempt does not use the request up. It is tried
    // again after the backoff, until MAX_REQUEST_RETRIES attempts in a row were abandoned (counted
    // in the history, apart from other failures). A leaked key's never: its key stays Active until
    // an attempt succeeds, so it keeps trying (the backoff grows to 10 min) and stays in view.
    st.failed_attempts += 1;
    let abandoned = st.history.iter().rev().take_while(|h| h.outcome == HistoryOutcome::Abandoned).count();
    match st.rotation.as_ref().map(|r| r.trigger) {
        Some(Trigger::Requested) if abandoned < MAX_REQUEST_RETRIES as usize => st.last_rotate_request = None,
        Some(Trigger::Emergency) => st.last_emergency_request = None,
        _ => {}
    }
    // A leak report on the new key just deleted is answered (the key is gone): rotating the
    // healthy key in use as an emergency would only cut off its consumers. Not in an emergency:
    // its own leaked key, the one in use, is still to be rotated, and the pending request does so.
    let request = env.observed.requests.emergency.as_deref();
    let emergency = st.rotation.as_ref().is_some_and(|r| r.trigger == Trigger::Emergency);
    if !emergency && request.is_some_and(|r| plan::names_key(r, gone)) {
        st.last_emergency_request = request.map(str::to_owned);
    }
    reset_to_idle(st);
    st.last_failure_time = Some(Time(now));
    Ok(Outcome::requeue(plan::backoff(st.failed_attempts)).committed().event(true, reason, message.to_owned()))
}

/// Writes the verified new key, from the staging Secret, into target Secrets (forward only).
pub async fn distribute<I: Iam>(env: &Env<'_, I>, key_id: &str, names: &[String]) -> Result<Outcome, Error> {
    crate::failpoint!("before-distribute");
    let key = env.staged_key(key_id).await?;
    env.write_targets(names, &key, false).await?;
    Ok(Outcome::next().event(false, "Distributed", format!("wrote key {key_id} into {}", names.join(", "))))
}
