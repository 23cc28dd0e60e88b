//! Rotation windows on the real control plane: a closed window holds a due rotation (the key in use
//! stays the only one), an open one lets it run.

mod support;

use anyhow::Context as _;
use k8s_openapi::jiff::{SignedDuration, Timestamp, tz::TimeZone};
use kube::api::{Patch, PatchParams};
use rekey::api::Phase;
use serde_json::json;
use support::*;

/// "HH:MM" in UTC, `hours` from now.
fn hh_mm(hours: i64) -> String {
    let t = Timestamp::now() + SignedDuration::from_hours(hours);
    t.to_zoned(TimeZone::UTC).strftime("%H:%M").to_string()
}

/// The next instant the UTC clock shows `hh_mm`.
fn opening(hh_mm: &str) -> anyhow::Result<Timestamp> {
    let now = Timestamp::now().to_zoned(TimeZone::UTC);
    let today = now.date().at(hh_mm[..2].parse()?, hh_mm[3..].parse()?, 0, 0).to_zoned(TimeZone::UTC)?;
    let at = if today.timestamp() > now.timestamp() { today } else { today.tomorrow()? };
    Ok(at.timestamp())
}

fn window(start: &str, end: &str) -> serde_json::Value {
    json!({"windows": [{"start": start, "end": end, "timeZone": "UTC"}]})
}

#[tokio::test]
async fn a_closed_window_holds_a_due_rotation_and_an_open_one_lets_it_run() -> anyhow::Result<()> {
    let f = Fixture::new("window").await?;
    // Due 30 to 35 s after the key's creation (the spread); the window opens in two hours.
    let (start, end) = (hh_mm(2), hh_mm(3));
    f.create(
        "app",
        json!({"userName": f.user, "maxKeyAge": "40s", "rotateBefore": "10s", "secrets": [{"name": "creds"}],
               "retirement": {"deleteAfter": "0s"}, "schedule": window(&start, &end)}),
    )
    .await?;
    let _op = f.operator().await?;
    // The first key does not wait for the window.
    let o =
        wait_ikr(&f.ikrs, "app", "bootstrap", |o| is_true(o, "Ready", "KeyInPlace") && phase(o) == Phase::Idle).await?;
    let first = active_key(&o).context("first key")?;
    let next = o.status.as_ref().and_then(|s| s.next_rotation_time.clone()).context("nextRotationTime")?.0;
    // The window's next opening, and this resource's place in its first half hour.
    let opens = opening(&start)?;
    assert!(
        next >= opens && next < opens + SignedDuration::from_mins(30),
        "nextRotationTime {next}, window at {opens}"
    );

    let o = wait_ikr(&f.ikrs, "app", "due, waiting for the window", |o| {
        condition(o, "Rotating") == Some(("False".into(), "WaitingForWindow".into()))
    })
    .await?;
    let why = message(&o, "Rotating").unwrap_or_default();
    assert!(
        why.contains(&format!("is due for rotation; the next window of spec.schedule.windows opens at {opens}")),
        "{why}"
    );
    assert!(next == opens || why.contains(&format!("this resource's rotation starts at {next}")), "{why}");
    assert_eq!(phase(&o), Phase::Idle);
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), vec![first.clone()], "no new key");

    // A window open now: the rotation runs.
    let open = json!({"spec": {"schedule": window(&hh_mm(-1), &hh_mm(1))}});
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&open)).await?;
    let o = wait_ikr(&f.ikrs, "app", "rotated inside the window", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await?;
    let second = active_key(&o).context("second key")?;
    assert_ne!(first, second);
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), vec![second], "the old key is gone");
    Ok(())
}
