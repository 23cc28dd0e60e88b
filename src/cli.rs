//! The user-facing subcommands besides `run`: status, rotate, retire. TOUCHES THE CLUSTER
//! (reads resources; rotate and retire set an annotation, exactly what `kubectl annotate` would).

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kube::api::{Api, ListParams, Patch, PatchParams};

use crate::api::{IamKeyRotation, Phase, RETIRE_ANNOTATION, ROTATE_ANNOTATION, ROTATE_EMERGENCY_ANNOTATION};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Failed(String),
}

fn age(since: Timestamp, now: Timestamp) -> String {
    let secs = now.duration_since(since).as_secs().max(0) as u64;
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3_600, secs % 3_600 / 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else {
        format!("{m}m{}s", secs % 60)
    }
}

fn condition_true(o: &IamKeyRotation, t: &str) -> Option<(String, String)> {
    condition_since(o, t, Timestamp::UNIX_EPOCH)
}

/// A condition that turned True at or after `since`.
fn condition_since(o: &IamKeyRotation, t: &str, since: Timestamp) -> Option<(String, String)> {
    o.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t && c.status == "True" && c.last_transition_time.0 >= since)
        .map(|c| (c.reason.clone(), c.message.clone()))
}

/// One table row per resource (pure, for tests).
pub fn table(items: &[IamKeyRotation], now: Timestamp) -> String {
    let mut rows = vec![[
        "NAMESPACE".to_owned(),
        "NAME".to_owned(),
        "USER".to_owned(),
        "ACTIVE KEY".to_owned(),
        "KEY AGE".to_owned(),
        "PHASE".to_owned(),
        "NEXT ROTATION".to_owned(),
        "LAST FAILURE".to_owned(),
    ]];
    for o in items {
        let st = o.status.clone().unwrap_or_default();
        let key = st.active_key.as_ref();
        let problem = condition_true(o, "Stalled")
            .map(|(r, _)| format!("Stalled/{r}"))
            .or_else(|| condition_true(o, "Degraded").map(|(r, _)| format!("Degraded/{r}")));
        let failure = match (&st.last_failure_time, problem) {
            (_, Some(p)) => p,
            (Some(t), None) => format!("{} ago ({} attempts)", age(t.0, now), st.failed_attempts),
            (None, None) => "-".to_owned(),
        };
        rows.push([
            o.namespace().unwrap_or_default(),
            o.name_any(),
            o.spec.user_name.clone(),
            key.map(|k| k.access_key_id.clone()).unwrap_or_else(|| "-".into()),
            key.and_then(|k| k.created_at.as_ref()).map(|t| age(t.0, now)).unwrap_or_else(|| "-".into()),
            st.phase.to_string(),
            st.next_rotation_time.as_ref().map(|t| t.0.to_string()).unwrap_or_else(|| "-".into()),
            failure,
        ]);
    }
    let widths: Vec<usize> = (0..8).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|r| r.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect::<Vec<_>>().join("   "))
        .map(|l| l.trim_end().to_owned() + "\n")
        .collect()
}

pub async fn status(client: kube::Client, namespace: Option<&str>, name: Option<&str>) -> Result<String, CliError> {
    let api: Api<IamKeyRotation> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let items = match name {
        Some(n) => vec![api.get(n).await?],
        None => api.list(&ListParams::default()).await?.items,
    };
    Ok(table(&items, Timestamp::now()))
}

async fn annotate(api: &Api<IamKeyRotation>, name: &str, key: &str, value: &str) -> Result<IamKeyRotation, CliError> {
    let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
    Ok(api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?)
}

/// Requests a rotation (or an emergency rotation); with `wait`, follows it to its end, printing
/// each phase, and fails if it ends Degraded or Stalled.
pub async fn rotate(
    client: kube::Client,
    namespace: &str,
    name: &str,
    emergency: bool,
    wait: Option<Duration>,
) -> Result<(), CliError> {
    let api: Api<IamKeyRotation> = Api::namespaced(client, namespace);
    let before = api.get(name).await?;
    let rotations = before.status.as_ref().map(|s| s.rotations).unwrap_or(0);
    let key = if emergency { ROTATE_EMERGENCY_ANNOTATION } else { ROTATE_ANNOTATION };
    let asked = Timestamp::now();
    let value = asked.as_second().to_string();
    // Conditions carry whole seconds: anything that turned True from this second on is news.
    let since = Timestamp::from_second(asked.as_second()).unwrap_or(asked);
    annotate(&api, name, key, &value).await?;
    println!("{key}={value} set on {namespace}/{name}");
    let Some(timeout) = wait else { return Ok(()) };
    let started = std::time::Instant::now();
    let mut last = String::new();
    loop {
        let o = api.get(name).await?;
        let st = o.status.clone().unwrap_or_default();
        let line = format!("phase {}", st.phase);
        if line != last {
            println!("{:>4}s  {line}", started.elapsed().as_secs());
            last = line;
        }
        if let Some((reason, message)) = condition_since(&o, "Stalled", since) {
            return Err(CliError::Failed(format!("Stalled/{reason}: {message}")));
        }
        if let Some((reason, message)) = condition_since(&o, "Degraded", since) {
            return Err(CliError::Failed(format!("Degraded/{reason}: {message}")));
        }
        let requested =
            if emergency { st.last_emergency_request.as_deref() } else { st.last_rotate_request.as_deref() };
        if requested == Some(value.as_str()) && st.rotations > rotations && st.phase == Phase::Idle {
            let key = st.active_key.map(|k| k.access_key_id).unwrap_or_default();
            println!("done in {}s: key {key} in use", started.elapsed().as_secs());
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(CliError::Failed(format!("still {} after {}s", st.phase, timeout.as_secs())));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Asks rekey to retire the old key again (after a rollback or an uncovered consumer was fixed).
pub async fn retire(client: kube::Client, namespace: &str, name: &str) -> Result<(), CliError> {
    let api: Api<IamKeyRotation> = Api::namespaced(client, namespace);
    let value = Timestamp::now().as_second().to_string();
    annotate(&api, name, RETIRE_ANNOTATION, &value).await?;
    println!("{RETIRE_ANNOTATION}={value} set on {namespace}/{name}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_key_age_phase_and_the_last_problem() {
        let o: IamKeyRotation = serde_json::from_value(serde_json::json!({
            "apiVersion": "rekey.dev/v1alpha1", "kind": "IamKeyRotation",
            "metadata": {"name": "billing", "namespace": "payments"},
            "spec": {"userName": "billing-app", "secrets": [{"name": "s"}]},
            "status": {"phase": "Soaking", "activeKey": {"accessKeyId": "AKIA1", "createdAt": "2026-01-01T00:00:00Z"},
                "conditions": [{"type": "Degraded", "status": "True", "reason": "RolloutStalled", "message": "m",
                    "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap();
        let t = table(&[o], "2026-01-03T01:00:00Z".parse().unwrap());
        let row = t.lines().nth(1).unwrap();
        for want in ["payments", "billing-app", "AKIA1", "2d1h", "Soaking", "Degraded/RolloutStalled"] {
            assert!(row.contains(want), "{row}");
        }
    }
}
