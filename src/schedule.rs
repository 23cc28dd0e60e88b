//! PURE: when a scheduled rotation may start (spec.schedule.windows), and how far a resource's due
//! time, and its start inside a window, are spread (from its uid). No clock is read here: every function takes the instant it
//! judges.
//!
//! Daylight-saving rules (docs/design.md, "Rotation windows"): a start or end the clocks skip
//! (Europe/Berlin 02:00–02:59 on the last Sunday of March) is the first instant after the skipped
//! hour; a time the clocks pass twice (02:00–02:59 on the last Sunday of October) opens a window at
//! its first pass and closes it at its second, so the window is never shorter than its wall-clock
//! span because of the change.

use std::time::Duration;

use jiff::Timestamp;
use jiff::civil::{Date, DateTime, Time};
use jiff::tz::{AmbiguousOffset, TimeZone};

use crate::api::{RotationWindow, Weekday};

/// A window of spec.schedule.windows, parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    /// Indexed Monday = 0.
    days: [bool; 7],
    start: Time,
    end: Time,
    tz: TimeZone,
}

/// Which end of a window a wall-clock time is (they resolve a repeated hour differently).
#[derive(Clone, Copy)]
enum Edge {
    Open,
    Close,
}

impl Window {
    /// The window, or what is wrong with it (in the spec's terms, without the field's path).
    pub fn parse(w: &RotationWindow) -> Result<Self, String> {
        let tz = TimeZone::get(&w.time_zone)
            .map_err(|_| format!("timeZone {:?} is not an IANA time zone (e.g. Europe/Berlin, UTC)", w.time_zone))?;
        let start = clock("start", &w.start)?;
        let end = clock("end", &w.end)?;
        if start == end {
            return Err(format!(
                "start and end are both {:?}: the window would be empty (an end before the start spans midnight)",
                w.start
            ));
        }
        let mut days = [w.days.is_empty(); 7];
        for d in &w.days {
            days[index(*d)] = true;
        }
        Ok(Self { days, start, end, tz })
    }

    /// When the window that opens on `date` (a local date in its zone) opens and closes; None if
    /// it does not open that day (or the clocks skip all of it).
    fn on(&self, date: Date) -> Option<(Timestamp, Timestamp)> {
        let weekday = usize::try_from(date.weekday().to_monday_zero_offset()).ok()?;
        if !self.days.get(weekday).copied().unwrap_or(false) {
            return None;
        }
        let end_date = if self.end < self.start { date.tomorrow().ok()? } else { date };
        let open = self.instant(date.to_datetime(self.start), Edge::Open)?;
        let close = self.instant(end_date.to_datetime(self.end), Edge::Close)?;
        (open < close).then_some((open, close))
    }

    fn instant(&self, dt: DateTime, edge: Edge) -> Option<Timestamp> {
        match self.tz.to_ambiguous_timestamp(dt).offset() {
            AmbiguousOffset::Unambiguous { offset } => offset.to_timestamp(dt).ok(),
            // `dt` read with the offset after the change is an instant before it: the change
            // itself is the first instant after the skipped hour.
            AmbiguousOffset::Gap { after, .. } => {
                let before_change = after.to_timestamp(dt).ok()?;
                self.tz.following(before_change).next().map(|t| t.timestamp())
            }
            AmbiguousOffset::Fold { before, after } => match edge {
                Edge::Open => before.to_timestamp(dt).ok(),
                Edge::Close => after.to_timestamp(dt).ok(),
            },
        }
    }

    /// Every opening of this window that can contain `t` or follow it within two weeks (one
    /// opening may fall wholly in a skipped hour).
    fn around(&self, t: Timestamp) -> impl Iterator<Item = (Timestamp, Timestamp)> + '_ {
        let today = t.to_zoned(self.tz.clone()).date();
        (-1..=14).filter_map(move |d| today.checked_add(jiff::Span::new().days(d)).ok()).filter_map(|d| self.on(d))
    }
}

fn index(d: Weekday) -> usize {
    match d {
        Weekday::Mon => 0,
        Weekday::Tue => 1,
        Weekday::Wed => 2,
        Weekday::Thu => 3,
        Weekday::Fri => 4,
        Weekday::Sat => 5,
        Weekday::Sun => 6,
    }
}

fn clock(field: &str, s: &str) -> Result<Time, String> {
    let bad = || format!("{field} {s:?} is not a time of day \"HH:MM\" (00:00 to 23:59)");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let (h, m): (i8, i8) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    Time::new(h, m, 0, 0).map_err(|_| bad())
}

/// Whether a scheduled rotation may start at `t` (no windows: always).
pub fn is_open(windows: &[Window], t: Timestamp) -> bool {
    windows.is_empty() || windows.iter().flat_map(|w| w.around(t)).any(|(open, close)| open <= t && t < close)
}

/// The first instant from `t` on at which a scheduled rotation may start: `t` itself while a
/// window is open. None only if no window opens within two weeks (never, for a window that passed validation).
pub fn next_opening(windows: &[Window], t: Timestamp) -> Option<Timestamp> {
    if is_open(windows, t) {
        return Some(t);
    }
    next_after(windows, t).map(|(open, _)| open)
}

/// The first window to open after `t`, and when it closes.
fn next_after(windows: &[Window], t: Timestamp) -> Option<(Timestamp, Timestamp)> {
    windows.iter().flat_map(|w| w.around(t)).filter(|(open, _)| *open > t).min()
}

/// When a rotation due at `t` starts, and when its window opens: at `t` while a window is open;
/// else at this resource's place (`share` of 2³²) in the first half of the next window, so that
/// resources that came due while it was closed do not all start at its opening (the second half is
/// left for a backlog and retries).
pub fn place(windows: &[Window], t: Timestamp, share: u32) -> Option<(Timestamp, Timestamp)> {
    if is_open(windows, t) {
        return Some((t, t));
    }
    let (open, close) = next_after(windows, t)?;
    let half = u128::try_from(close.duration_since(open).as_secs() / 2).unwrap_or(0);
    let offset = i64::try_from((half * u128::from(share)) >> 32).unwrap_or(0);
    Some((open, open.checked_add(jiff::SignedDuration::from_secs(offset)).unwrap_or(open)))
}

/// A resource's share of a span, fixed by its uid (`spread`, `place`).
pub fn share(uid: &str) -> u32 {
    crate::ownership::fnv1a(uid.as_bytes())
}

/// How much later than maxKeyAge - rotateBefore this resource's key comes due: a fraction of half
/// of rotateBefore taken from the uid, so that resources created together come due apart, and the
/// same resource always at the same point. Half, so that at least half of the margin is left for
/// retries (and for a window to open) before maxKeyAge. Whole seconds.
pub fn spread(share: u32, rotate_before: Duration) -> Duration {
    let span = u128::from(rotate_before.as_secs() / 2);
    let fraction = u128::from(share);
    Duration::from_secs(u64::try_from((span * fraction) >> 32).unwrap_or(0))
}

#[cfg(test)]
#[path = "schedule_tests.rs"]
mod tests;
