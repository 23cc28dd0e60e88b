//! How `rekey status` prints resources (pure): kubectl's table (NAMESPACE only with -A), `-o wide`
//! with the reason and the message that explain the state, and `-o json|yaml` (a v1 List for
//! several, as kubectl prints them, without managedFields).

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;

use super::CliError;
use super::args::Output;
use crate::api::IamKeyRotation;

/// An age as kubectl prints it: 3m10s, 5h2m, 12d3h.
pub fn age(since: Timestamp, now: Timestamp) -> String {
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

/// A condition of this type, if True: (reason, message).
pub fn condition_true(o: &IamKeyRotation, t: &str) -> Option<(String, String)> {
    let c = o.status.as_ref()?.conditions.iter().find(|c| c.type_ == t && c.status == "True")?;
    Some((c.reason.clone(), c.message.clone()))
}

/// What needs attention, worst first: Stalled, then Degraded (`Type/Reason`, message).
pub fn problem(o: &IamKeyRotation) -> Option<(String, String)> {
    ["Stalled", "Degraded"].iter().find_map(|t| condition_true(o, t).map(|(r, m)| (format!("{t}/{r}"), m)))
}

fn condition(o: &IamKeyRotation, t: &str) -> Option<(String, String, String)> {
    let c = o.status.as_ref()?.conditions.iter().find(|c| c.type_ == t)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The one message that best explains the state: the problem's, else the rotation's, else Ready's.
fn explanation(o: &IamKeyRotation) -> String {
    problem(o)
        .map(|(_, m)| m)
        .or_else(|| condition_true(o, "Rotating").map(|(_, m)| m))
        .or_else(|| condition(o, "Ready").map(|(_, _, m)| m))
        .unwrap_or_else(|| "-".into())
}

fn row(o: &IamKeyRotation, now: Timestamp, wide: bool) -> Vec<String> {
    let dash = || "-".to_owned();
    let st = o.status.clone().unwrap_or_default();
    let key = st.active_key.as_ref();
    let failure = match (&st.last_failure_time, problem(o)) {
        (_, Some((p, _))) => p,
        (Some(t), None) => format!("{} ago ({} attempts)", age(t.0, now), st.failed_attempts),
        (None, None) => dash(),
    };
    let ready = condition(o, "Ready");
    let mut r = vec![
        o.name_any(),
        o.spec.user_name.clone(),
        key.map(|k| k.access_key_id.clone()).unwrap_or_else(dash),
        key.and_then(|k| k.created_at.as_ref()).map(|t| age(t.0, now)).unwrap_or_else(dash),
        st.phase.to_string(),
        ready.as_ref().map(|(s, _, _)| s.clone()).unwrap_or_else(dash),
        st.next_rotation_time.as_ref().map(|t| t.0.to_string()).unwrap_or_else(dash),
        failure,
        o.creation_timestamp().map(|t| age(t.0, now)).unwrap_or_else(dash),
    ];
    if wide {
        r.push(ready.map(|(_, reason, _)| reason).unwrap_or_else(dash));
        r.push(explanation(o));
    }
    r
}

/// One table row per resource.
pub fn table(items: &[IamKeyRotation], now: Timestamp, all_namespaces: bool, wide: bool) -> String {
    let mut head: Vec<&str> =
        vec!["NAME", "USER", "ACTIVE KEY", "KEY AGE", "PHASE", "READY", "NEXT ROTATION", "LAST FAILURE", "AGE"];
    if wide {
        head.extend(["REASON", "MESSAGE"]);
    }
    let mut rows: Vec<Vec<String>> = vec![head.into_iter().map(String::from).collect()];
    rows.extend(items.iter().map(|o| row(o, now, wide)));
    if all_namespaces {
        rows[0].insert(0, "NAMESPACE".into());
        for (r, o) in rows[1..].iter_mut().zip(items) {
            r.insert(0, o.namespace().unwrap_or_default());
        }
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|r| r.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect::<Vec<_>>().join("   "))
        .map(|l| l.trim_end().to_owned() + "\n")
        .collect()
}

/// JSON or YAML: the object itself for one named resource, else a v1 List.
pub fn document(items: &[IamKeyRotation], single: bool, output: Output) -> Result<String, CliError> {
    let clean = |o: &IamKeyRotation| {
        let mut o = o.clone();
        o.metadata.managed_fields = None;
        serde_json::to_value(o)
    };
    let value = match (single, items) {
        (true, [o]) => clean(o)?,
        _ => serde_json::json!({
            "apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
            "items": items.iter().map(clean).collect::<Result<Vec<_>, _>>()?,
        }),
    };
    Ok(match output {
        Output::Yaml => crate::to_yaml(&value).map_err(|e| CliError::Failed(e.to_string()))?,
        _ => serde_json::to_string_pretty(&value)? + "\n",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn billing() -> IamKeyRotation {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "rekey.dev/v1alpha1", "kind": "IamKeyRotation",
            "metadata": {"name": "billing", "namespace": "payments", "creationTimestamp": "2025-12-01T00:00:00Z",
                "managedFields": [{"manager": "kubectl"}]},
            "spec": {"userName": "billing-app", "secrets": [{"name": "s"}]},
            "status": {"phase": "Soaking", "activeKey": {"accessKeyId": "AKIA1", "createdAt": "2026-01-01T00:00:00Z"},
                "conditions": [
                    {"type": "Degraded", "status": "True", "reason": "RolloutStalled", "message": "api did not roll out",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"},
                    {"type": "Ready", "status": "True", "reason": "KeyInPlace", "message": "m",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap()
    }

    #[test]
    fn the_table_shows_key_age_phase_readiness_and_the_last_problem() {
        let now = "2026-01-03T01:00:00Z".parse().unwrap();
        let t = table(&[billing()], now, false, false);
        let (head, row) = (t.lines().next().unwrap(), t.lines().nth(1).unwrap());
        assert!(head.starts_with("NAME ") && head.ends_with("AGE"), "{head}");
        for want in ["billing-app", "AKIA1", "2d1h", "Soaking", "True", "Degraded/RolloutStalled", "33d1h"] {
            assert!(row.contains(want), "{row}");
        }
        assert!(!t.contains("payments"), "NAMESPACE only with -A: {t}");
        assert!(table(&[billing()], now, true, false).lines().nth(1).unwrap().starts_with("payments "));
    }

    #[test]
    fn wide_adds_the_ready_reason_and_the_message_that_explains_the_state() {
        let t = table(&[billing()], "2026-01-03T01:00:00Z".parse().unwrap(), false, true);
        assert!(t.lines().next().unwrap().ends_with("REASON       MESSAGE"), "{t}");
        assert!(t.lines().nth(1).unwrap().ends_with("KeyInPlace   api did not roll out"), "{t}");
    }

    #[test]
    fn json_and_yaml_print_the_object_or_a_list_without_managed_fields() {
        let one: serde_json::Value =
            serde_json::from_str(&document(&[billing()], true, Output::Json).unwrap()).unwrap();
        assert_eq!((one["kind"].as_str(), one["metadata"].get("managedFields")), (Some("IamKeyRotation"), None));
        let list: serde_json::Value =
            serde_saphyr::from_str(&document(&[billing(), billing()], false, Output::Yaml).unwrap()).unwrap();
        assert_eq!((list["kind"].as_str(), list["items"].as_array().map(Vec::len)), (Some("List"), Some(2)));
    }
}
