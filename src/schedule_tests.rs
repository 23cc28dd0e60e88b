//! Window edges with fixed instants: opening, closing, midnight, both daylight-saving changes.

use super::*;

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn window(days: &[&str], start: &str, end: &str, tz: &str) -> Window {
    let w: RotationWindow =
        serde_json::from_value(serde_json::json!({"days": days, "start": start, "end": end, "timeZone": tz})).unwrap();
    Window::parse(&w).unwrap()
}

fn berlin_nights() -> Vec<Window> {
    vec![window(&["Tue", "Wed", "Thu"], "02:00", "05:00", "Europe/Berlin")]
}

#[test]
fn a_window_is_open_from_its_start_until_just_before_its_end() {
    // Tuesday 2026-06-02, summer time (UTC+2): 02:00–05:00 local is 00:00–03:00 UTC.
    let w = berlin_nights();
    assert!(!is_open(&w, t("2026-06-01T23:59:59Z")));
    assert!(is_open(&w, t("2026-06-02T00:00:00Z")));
    assert!(is_open(&w, t("2026-06-02T02:59:59Z")));
    assert!(!is_open(&w, t("2026-06-02T03:00:00Z")));
    // Monday is not one of its days.
    assert!(!is_open(&w, t("2026-06-01T01:00:00Z")));
}

#[test]
fn the_next_opening_is_now_inside_a_window_and_the_next_listed_day_outside() {
    let w = berlin_nights();
    assert_eq!(next_opening(&w, t("2026-06-01T12:00:00Z")), Some(t("2026-06-02T00:00:00Z")));
    assert_eq!(next_opening(&w, t("2026-06-02T01:00:00Z")), Some(t("2026-06-02T01:00:00Z")));
    assert_eq!(next_opening(&w, t("2026-06-02T03:00:00Z")), Some(t("2026-06-03T00:00:00Z")));
    // After Thursday's window closes, the next is Tuesday's.
    assert_eq!(next_opening(&w, t("2026-06-04T03:00:00Z")), Some(t("2026-06-09T00:00:00Z")));
    // Winter time (UTC+1) shifts the same local hours.
    assert_eq!(next_opening(&w, t("2026-01-05T12:00:00Z")), Some(t("2026-01-06T01:00:00Z")));
}

#[test]
fn an_end_before_the_start_spans_midnight_and_belongs_to_the_day_it_opens() {
    let w = vec![window(&["Fri"], "22:00", "02:00", "UTC")];
    assert!(!is_open(&w, t("2026-06-05T21:59:59Z")));
    assert!(is_open(&w, t("2026-06-05T22:00:00Z")));
    assert!(is_open(&w, t("2026-06-06T01:00:00Z")), "Friday's window is open at Saturday 01:00");
    assert!(!is_open(&w, t("2026-06-06T02:00:00Z")));
    assert!(!is_open(&w, t("2026-06-06T22:30:00Z")), "Saturday is not one of its days");
    assert!(!is_open(&w, t("2026-06-05T01:00:00Z")), "Thursday's night is not Friday's");
    assert_eq!(next_opening(&w, t("2026-06-06T02:00:00Z")), Some(t("2026-06-12T22:00:00Z")));
}

#[test]
fn a_start_the_spring_change_skips_opens_at_the_first_instant_after_it() {
    // 2026-03-29, Europe/Berlin: 02:00 CET becomes 03:00 CEST (01:00 UTC); 02:00 local never happens.
    let w = vec![window(&["Sun"], "02:00", "05:00", "Europe/Berlin")];
    assert!(!is_open(&w, t("2026-03-29T00:59:59Z")));
    assert!(is_open(&w, t("2026-03-29T01:00:00Z")));
    assert_eq!(next_opening(&w, t("2026-03-28T12:00:00Z")), Some(t("2026-03-29T01:00:00Z")));
    // 05:00 CEST.
    assert!(!is_open(&w, t("2026-03-29T03:00:00Z")));
    // A window wholly inside the skipped hour does not open that day; a week later it does.
    let inside = vec![window(&["Sun"], "02:15", "02:45", "Europe/Berlin")];
    assert_eq!(next_opening(&inside, t("2026-03-28T12:00:00Z")), Some(t("2026-04-05T00:15:00Z")));
}

#[test]
fn a_start_the_autumn_change_repeats_opens_at_its_first_pass_and_an_end_closes_at_its_second() {
    // 2026-10-25, Europe/Berlin: 03:00 CEST becomes 02:00 CET (01:00 UTC); 02:00–02:59 happen twice.
    let w = vec![window(&["Sun"], "02:00", "05:00", "Europe/Berlin")];
    assert!(!is_open(&w, t("2026-10-24T23:59:59Z")));
    assert!(is_open(&w, t("2026-10-25T00:00:00Z")), "02:00 CEST");
    assert!(is_open(&w, t("2026-10-25T03:59:59Z")), "04:59 CET");
    assert!(!is_open(&w, t("2026-10-25T04:00:00Z")), "05:00 CET");
    let ending = vec![window(&["Sat"], "23:00", "02:30", "Europe/Berlin")];
    assert!(is_open(&w, t("2026-10-25T01:15:00Z")), "02:15 CET, the second pass");
    assert!(is_open(&ending, t("2026-10-25T01:29:59Z")), "02:29 CET, the second pass");
    assert!(!is_open(&ending, t("2026-10-25T01:30:00Z")));
}

#[test]
fn a_rotation_due_while_closed_starts_at_its_place_in_the_first_half_of_the_next_window() {
    let w = berlin_nights();
    let monday = t("2026-06-01T12:00:00Z");
    // Tuesday's window: 00:00 to 03:00 UTC; its first half is 90 minutes.
    assert_eq!(place(&w, monday, 0), Some((t("2026-06-02T00:00:00Z"), t("2026-06-02T00:00:00Z"))));
    assert_eq!(place(&w, monday, u32::MAX / 2 + 1), Some((t("2026-06-02T00:00:00Z"), t("2026-06-02T00:45:00Z"))));
    let (_, last) = place(&w, monday, u32::MAX).unwrap();
    assert!(last < t("2026-06-02T01:30:00Z"), "{last}");
    // Due inside a window: at once, whatever the share.
    let inside = t("2026-06-02T02:00:00Z");
    assert_eq!(place(&w, inside, u32::MAX), Some((inside, inside)));
    assert_eq!(place(&[], monday, u32::MAX), Some((monday, monday)));
}

#[test]
fn no_windows_means_always_open() {
    assert!(is_open(&[], t("2026-06-01T12:00:00Z")));
    assert_eq!(next_opening(&[], t("2026-06-01T12:00:00Z")), Some(t("2026-06-01T12:00:00Z")));
}

#[test]
fn any_of_several_windows_counts() {
    let w = vec![window(&["Mon"], "10:00", "11:00", "UTC"), window(&["Mon"], "13:00", "14:00", "UTC")];
    assert_eq!(next_opening(&w, t("2026-06-01T12:00:00Z")), Some(t("2026-06-01T13:00:00Z")));
    assert_eq!(next_opening(&w, t("2026-06-01T09:00:00Z")), Some(t("2026-06-01T10:00:00Z")));
}

#[test]
fn no_days_listed_means_every_day() {
    let w = vec![window(&[], "02:00", "03:00", "UTC")];
    for day in 1..=7 {
        assert!(is_open(&w, t(&format!("2026-06-0{day}T02:30:00Z"))), "day {day}");
    }
}

#[test]
fn a_window_that_cannot_work_is_refused_with_what_to_fix() {
    let parse = |start: &str, end: &str, tz: &str| {
        let w: RotationWindow =
            serde_json::from_value(serde_json::json!({"start": start, "end": end, "timeZone": tz})).unwrap();
        Window::parse(&w).unwrap_err()
    };
    assert_eq!(
        parse("02:00", "05:00", "Europe/Berlinn"),
        "timeZone \"Europe/Berlinn\" is not an IANA time zone (e.g. Europe/Berlin, UTC)"
    );
    assert_eq!(
        parse("02:00", "02:00", "UTC"),
        "start and end are both \"02:00\": the window would be empty (an end before the start spans midnight)"
    );
    assert_eq!(parse("24:00", "02:00", "UTC"), "start \"24:00\" is not a time of day \"HH:MM\" (00:00 to 23:59)");
    // An unknown day is refused when the spec is read (and by the CRD schema before that).
    let day: Result<RotationWindow, _> =
        serde_json::from_value(serde_json::json!({"days": ["Tues"], "start": "02:00", "end": "05:00"}));
    assert!(day.unwrap_err().to_string().contains("unknown variant `Tues`"));
}

#[test]
fn the_spread_is_fixed_per_uid_and_within_half_of_rotate_before() {
    let before = Duration::from_secs(10 * 86_400);
    let a = spread(share("0b7c2f5e-1c8e-4a3c-9f55-6f1f2a0d3e11"), before);
    assert_eq!(a, spread(share("0b7c2f5e-1c8e-4a3c-9f55-6f1f2a0d3e11"), before));
    assert_ne!(a, spread(share("5d0e8a1c-7b2f-4e69-8a0d-2c4b6f8e1a37"), before));
    for i in 0..1_000 {
        assert!(spread(share(&format!("uid-{i}")), before) < before / 2);
    }
    assert_eq!(spread(share(""), Duration::ZERO), Duration::ZERO);
}

/// docs/benchmarks.md, "2026-11-30 (windows and jitter)": 1,000 resources whose keys were created in
/// the same second, with the real due-time function. Rotations start when due, at most
/// --max-concurrent-rotations (10) at once, each taking 6 s (the measured 5.8 s of a rotation of a
/// 2-replica Deployment with deleteAfter 0s); each restarts one Deployment as it starts. Prints, does
/// not assert: `cargo test --lib figures_for_1000 -- --ignored --nocapture`.
#[test]
#[ignore]
fn figures_for_1000_resources_created_together() {
    let mut rng = fastrand::Rng::with_seed(14);
    let uids: Vec<String> = (0..1_000)
        .map(|_| {
            let h = format!("{:032x}", rng.u128(..));
            format!("{}-{}-4{}-a{}-{}", &h[..8], &h[8..12], &h[13..16], &h[17..20], &h[20..])
        })
        .collect();
    let created = t("2026-11-30T10:00:00Z");
    let spec = |windows: serde_json::Value| {
        let mut s: crate::api::IamKeyRotationSpec = serde_json::from_value(serde_json::json!({
            "userName": "u", "secrets": [{"name": "s"}], "schedule": {"windows": windows}
        }))
        .unwrap();
        if s.schedule.as_ref().is_some_and(|s| s.windows.is_empty()) {
            s.schedule = None;
        }
        crate::validate::validate(&s).unwrap()
    };
    let nights = serde_json::json!([{"days": ["Tue", "Wed", "Thu"], "start": "02:00", "end": "05:00", "timeZone": "Europe/Berlin"}]);
    for (name, windows, jitter) in [
        ("no jitter", serde_json::json!([]), false),
        ("jitter", serde_json::json!([]), true),
        ("jitter, window Tue-Thu 02:00-05:00 Berlin", nights, true),
    ] {
        let base = spec(windows);
        let mut due: Vec<i64> = uids
            .iter()
            .map(|uid| {
                let mut v = base.clone();
                if jitter {
                    v.share = share(uid);
                    v.spread = spread(v.share, v.rotate_before);
                }
                crate::plan::due_at(created, &v).as_second()
            })
            .collect();
        due.sort_unstable();
        report(name, &due);
    }
}

/// Due times (Unix seconds, sorted) → the busiest minute of due times and of rotation starts.
fn report(name: &str, due: &[i64]) {
    const SLOTS: usize = 10;
    const ROTATION: i64 = 6;
    let per_minute = |times: &[i64]| {
        let mut m = std::collections::BTreeMap::<i64, usize>::new();
        for t in times {
            *m.entry(t.div_euclid(60)).or_default() += 1;
        }
        m.into_values().max().unwrap_or(0)
    };
    let (mut starts, mut busy_until, mut next) = (Vec::new(), Vec::<i64>::new(), 0);
    let mut now = due[0];
    while next < due.len() {
        busy_until.retain(|end| *end > now);
        while next < due.len() && due[next] <= now && busy_until.len() < SLOTS {
            starts.push(now);
            busy_until.push(now + ROTATION);
            next += 1;
        }
        now = if busy_until.len() < SLOTS && next < due.len() { due[next].max(now + 1) } else { now + 1 };
    }
    let span = |v: &[i64]| jiff::SignedDuration::from_secs(v[v.len() - 1] - v[0]);
    println!(
        "{name}: due {} .. {} (span {:#}); busiest minute: {} due, {} rotations and {} restarts started; all started after {:#}",
        Timestamp::from_second(due[0]).unwrap(),
        Timestamp::from_second(due[due.len() - 1]).unwrap(),
        span(due),
        per_minute(due),
        per_minute(&starts),
        per_minute(&starts),
        span(&starts),
    );
}
