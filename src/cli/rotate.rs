//! `rekey rotate` and `rekey retire`: set the request annotation, exactly what `kubectl annotate`
//! would; `rotate --wait` follows the rotations to a terminal outcome. TOUCHES THE CLUSTER.

use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams};

use super::CliError;
use super::args::{RetireArgs, RotateArgs, Until};
use super::connect::{Connection, Scope, scope};
use super::output::problem;
use crate::api::{
    HistoryOutcome, IamKeyRotation, Phase, RETIRE_ANNOTATION, ROTATE_ANNOTATION, ROTATE_EMERGENCY_ANNOTATION,
};
use crate::plan::DegradeReason;

/// What a rotation request was, to recognise its outcome.
#[derive(Clone, Debug)]
pub struct Request {
    pub emergency: bool,
    /// The annotation's value: the status echoes it once rekey acted on it.
    pub value: String,
    /// Conditions carry whole seconds: one that turned True from this second on is news.
    pub since: Timestamp,
    /// status.rotations before the request.
    pub rotations: u32,
    /// The active key before the request.
    pub key_before: Option<String>,
    pub until: Until,
}

/// How a requested rotation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The new key is in use (its id).
    Done(String),
    /// Rekey cannot finish without a person: `Type/Reason: message`.
    Ended(String),
}

fn turned_true_since(o: &IamKeyRotation, t: &str, since: Timestamp) -> Option<(String, String)> {
    let c = o.status.as_ref()?.conditions.iter().find(|c| c.type_ == t && c.status == "True")?;
    (c.last_transition_time.0 >= since).then(|| (c.reason.clone(), c.message.clone()))
}

/// The request's outcome, once it has one (pure). Only terminal states end a wait: a Degraded
/// rekey works through on its own (a slow rollout, a retried failure) does not.
pub fn outcome(o: &IamKeyRotation, r: &Request) -> Option<Outcome> {
    if let Some((reason, message)) = turned_true_since(o, "Stalled", r.since) {
        return Some(Outcome::Ended(format!("Stalled/{reason}: {message}")));
    }
    if let Some((reason, message)) = turned_true_since(o, "Degraded", r.since)
        && reason.parse::<DegradeReason>().is_ok_and(DegradeReason::needs_a_person)
    {
        return Some(Outcome::Ended(format!("Degraded/{reason}: {message}")));
    }
    let st = o.status.as_ref()?;
    let acted_on = if r.emergency { &st.last_emergency_request } else { &st.last_rotate_request };
    if acted_on.as_deref() != Some(r.value.as_str()) {
        return None;
    }
    let active = st.active_key.as_ref().map(|k| k.access_key_id.clone());
    // Past the rollout, the new key is what every workload runs on; the old one is being retired.
    let retiring = matches!(st.phase, Phase::Deactivating | Phase::Soaking | Phase::Deleting);
    if r.until == Until::InUse && retiring && active.is_some() && active != r.key_before {
        return active.map(Outcome::Done);
    }
    if st.phase != Phase::Idle {
        return None;
    }
    if st.rotations > r.rotations {
        return Some(Outcome::Done(st.active_key.as_ref().map(|k| k.access_key_id.clone()).unwrap_or_default()));
    }
    // Acted on, back to Idle, no new rotation: rekey gave the request up after its retries.
    let gave_up = st.history.last().is_some_and(|h| h.outcome == HistoryOutcome::Abandoned && h.ended_at.0 >= r.since);
    gave_up.then(|| {
        let why = problem(o).map(|(p, m)| format!("{p}: {m}")).unwrap_or_else(|| "see the Events".into());
        Outcome::Ended(format!("abandoned after its retries; {why}"))
    })
}

async fn annotate(api: &Api<IamKeyRotation>, name: &str, key: &str, value: &str) -> Result<IamKeyRotation, CliError> {
    let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
    Ok(api.patch(name, &PatchParams::default().validation_strict(), &Patch::Merge(&patch)).await?)
}

fn api_for(conn: &Connection, o: &IamKeyRotation) -> Api<IamKeyRotation> {
    Api::namespaced(conn.client.clone(), &o.namespace().unwrap_or_default())
}

/// Requests a rotation of each resource named or selected; with --wait, follows them all.
pub async fn rotate(conn: &Connection, args: &RotateArgs) -> Result<(), CliError> {
    let scope = scope(&args.scope, &conn.default_namespace);
    if args.names.is_empty() && args.selector.is_none() {
        return Err(CliError::Usage("name the resources to rotate, or select them with -l".into()));
    }
    let targets = super::status::fetch(conn, &scope, &args.names, args.selector.as_deref()).await?;
    if targets.is_empty() {
        return Err(CliError::NotFound("no IamKeyRotation matches the selector".into()));
    }
    let key = if args.emergency { ROTATE_EMERGENCY_ANNOTATION } else { ROTATE_ANNOTATION };
    let asked = Timestamp::now();
    let value = asked.as_second().to_string();
    let since = Timestamp::from_second(asked.as_second()).unwrap_or(asked);
    let mut waits = Vec::new();
    for o in &targets {
        let rotations = o.status.as_ref().map(|s| s.rotations).unwrap_or(0);
        let key_before = o.status.as_ref().and_then(|s| s.active_key.as_ref()).map(|k| k.access_key_id.clone());
        annotate(&api_for(conn, o), &o.name_any(), key, &value).await?;
        println!("{key}={value} set on {}/{}", o.namespace().unwrap_or_default(), o.name_any());
        if let Some((p, m)) = problem(o) {
            println!("  note: it was {p} before the request: {m}");
        }
        let (emergency, until) = (args.emergency, args.until);
        waits.push((o.clone(), Request { emergency, value: value.clone(), since, rotations, key_before, until }));
    }
    if !args.wait {
        return Ok(());
    }
    follow(conn, waits, args.timeout, scope == Scope::All || targets.len() > 1).await
}

/// Polls each resource until its request has an outcome or the timeout passes, printing phase
/// changes; the worst outcome decides the error (Ended before TimedOut).
async fn follow(
    conn: &Connection,
    mut waits: Vec<(IamKeyRotation, Request)>,
    timeout: Duration,
    prefix: bool,
) -> Result<(), CliError> {
    let started = Instant::now();
    let mut last: Vec<String> = vec![String::new(); waits.len()];
    let mut ended = Vec::new();
    while !waits.is_empty() {
        let mut i = 0;
        while i < waits.len() {
            let (o, r) = &waits[i];
            let name = if prefix {
                format!("{}/{}: ", o.namespace().unwrap_or_default(), o.name_any())
            } else {
                String::new()
            };
            let now = api_for(conn, o).get(&o.name_any()).await?;
            let line = progress(&now);
            if line != last[i] {
                println!("{:>4}s  {name}{line}", started.elapsed().as_secs());
                last[i] = line;
            }
            match outcome(&now, r) {
                None => i += 1,
                Some(Outcome::Done(key)) => {
                    println!("{name}done in {}s: key {key} in use", started.elapsed().as_secs());
                    waits.remove(i);
                    last.remove(i);
                }
                Some(Outcome::Ended(why)) => {
                    eprintln!("rekey: {name}{why}");
                    ended.push(format!("{name}{why}"));
                    waits.remove(i);
                    last.remove(i);
                }
            }
        }
        if waits.is_empty() {
            break;
        }
        if started.elapsed() > timeout {
            let still: Vec<String> = waits.iter().map(|(o, _)| o.name_any()).collect();
            let last = last.join("; ");
            return Err(CliError::TimedOut(format!("{} not done after {:?}: {last}", still.join(", "), timeout)));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    match ended.len() {
        0 => Ok(()),
        n => Err(CliError::Ended(format!("{n} of the rotations did not finish"))),
    }
}

/// One line for where a rotation stands: its phase, and what is wrong, if anything.
fn progress(o: &IamKeyRotation) -> String {
    let phase = o.status.as_ref().map(|s| s.phase).unwrap_or_default();
    match problem(o) {
        Some((p, m)) => format!("phase {phase}; {p}: {m}"),
        None => format!("phase {phase}"),
    }
}

/// Asks rekey to retire the old key again (after a rollback or an uncovered consumer was fixed).
pub async fn retire(conn: &Connection, args: &RetireArgs) -> Result<(), CliError> {
    let ns = args.namespace.clone().unwrap_or_else(|| conn.default_namespace.clone());
    let api: Api<IamKeyRotation> = Api::namespaced(conn.client.clone(), &ns);
    let value = Timestamp::now().as_second().to_string();
    for name in &args.names {
        annotate(&api, name, RETIRE_ANNOTATION, &value).await.map_err(|e| e.about(name, &ns))?;
        println!("{RETIRE_ANNOTATION}={value} set on {ns}/{name}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ikr(status: serde_json::Value) -> IamKeyRotation {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "rekey.dev/v1alpha1", "kind": "IamKeyRotation", "metadata": {"name": "a", "namespace": "n"},
            "spec": {"userName": "u", "secrets": [{"name": "s"}]}, "status": status,
        }))
        .unwrap()
    }

    fn request() -> Request {
        Request {
            emergency: false,
            value: "100".into(),
            since: "2026-01-01T00:01:40Z".parse().unwrap(),
            rotations: 1,
            key_before: Some("AKIAOLD".into()),
            until: Until::Retired,
        }
    }

    fn degraded(reason: &str, at: &str) -> serde_json::Value {
        serde_json::json!([{"type": "Degraded", "status": "True", "reason": reason, "message": "m", "lastTransitionTime": at}])
    }

    #[test]
    fn done_once_the_request_was_acted_on_and_a_rotation_completed() {
        let o = ikr(
            serde_json::json!({"phase": "Idle", "rotations": 2, "lastRotateRequest": "100", "activeKey": {"accessKeyId": "AKIA2"}}),
        );
        assert_eq!(outcome(&o, &request()), Some(Outcome::Done("AKIA2".into())));
        let o = ikr(serde_json::json!({"phase": "Soaking", "rotations": 1, "lastRotateRequest": "100"}));
        assert_eq!(outcome(&o, &request()), None);
        let o = ikr(serde_json::json!({"phase": "Idle", "rotations": 2, "lastRotateRequest": "99"}));
        assert_eq!(outcome(&o, &request()), None, "an earlier request's rotation is not this one's");
    }

    #[test]
    fn by_default_done_once_the_new_key_is_in_use_while_the_old_one_is_retired() {
        let in_use = Request { until: Until::InUse, ..request() };
        let at = |phase: &str, key: &str| {
            ikr(serde_json::json!({"phase": phase, "rotations": 1, "lastRotateRequest": "100",
                "activeKey": {"accessKeyId": key}}))
        };
        assert_eq!(outcome(&at("Soaking", "AKIANEW"), &in_use), Some(Outcome::Done("AKIANEW".into())));
        assert_eq!(outcome(&at("Deactivating", "AKIANEW"), &in_use), Some(Outcome::Done("AKIANEW".into())));
        assert_eq!(outcome(&at("RollingOut", "AKIANEW"), &in_use), None, "pods may still run on the old key");
        assert_eq!(outcome(&at("Soaking", "AKIAOLD"), &in_use), None, "not this request's key");
        assert_eq!(outcome(&at("Soaking", "AKIANEW"), &request()), None, "--until retired waits for the deletion");
    }

    #[test]
    fn a_degradation_rekey_works_through_does_not_end_the_wait_one_for_a_person_does() {
        let later = "2026-01-01T00:05:00Z";
        let o = ikr(serde_json::json!({"phase": "RollingOut", "conditions": degraded("RolloutStalled", later)}));
        assert_eq!(outcome(&o, &request()), None);
        let o = ikr(serde_json::json!({"phase": "Idle", "conditions": degraded("IamThrottled", later)}));
        assert_eq!(outcome(&o, &request()), None);
        let o = ikr(serde_json::json!({"phase": "Idle", "conditions": degraded("KeyQuotaExhausted", later)}));
        assert_eq!(outcome(&o, &request()), Some(Outcome::Ended("Degraded/KeyQuotaExhausted: m".into())));
        let o = ikr(
            serde_json::json!({"phase": "Idle", "conditions": degraded("KeyQuotaExhausted", "2025-12-01T00:00:00Z")}),
        );
        assert_eq!(outcome(&o, &request()), None, "a condition from before the request is not its outcome");
    }

    #[test]
    fn a_stall_or_a_request_given_up_ends_the_wait() {
        let o = ikr(serde_json::json!({"phase": "Deactivating", "conditions": [{"type": "Stalled", "status": "True",
            "reason": "ParkedAfterRollback", "message": "m", "lastTransitionTime": "2026-01-01T00:05:00Z"}]}));
        assert_eq!(outcome(&o, &request()), Some(Outcome::Ended("Stalled/ParkedAfterRollback: m".into())));
        let o = ikr(serde_json::json!({"phase": "Idle", "rotations": 1, "lastRotateRequest": "100",
            "history": [{"startedAt": "2026-01-01T00:02:00Z", "endedAt": "2026-01-01T00:03:00Z", "outcome": "Abandoned"}]}));
        assert!(matches!(outcome(&o, &request()), Some(Outcome::Ended(m)) if m.starts_with("abandoned")));
    }
}
