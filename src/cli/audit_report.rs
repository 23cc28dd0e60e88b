//! What `rekey audit` concludes from what it read (pure): each key's coverage and CIS 1.14 verdict,
//! the counts, and the table or JSON document.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use crate::iam::LastUse;
use crate::plan::snapshot::IamKey;

/// One user as read from IAM: its keys, their owner claims (key id -> owner), their last use.
#[derive(Clone, Debug, Default)]
pub struct UserKeys {
    pub user: String,
    pub keys: Vec<IamKey>,
    pub claims: BTreeMap<String, String>,
    pub last_use: BTreeMap<String, LastUse>,
}

/// What an IamKeyRotation's status holds: key id -> `namespace/name` (active, new or retiring key).
pub type Held = BTreeMap<String, String>;

/// CIS 1.14 ("access keys are rotated every 90 days or less") applies to active keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Active and younger than --max-age.
    Pass,
    /// Inactive: it authenticates nothing (CIS 1.14 does not count it).
    Inactive,
    /// Too old, but an IamKeyRotation covers it: rekey is late (see `rekey status`), not absent.
    FailCovered,
    /// Too old and no rotation covers it: the finding the exit code gates on.
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LastUsed {
    pub time: Timestamp,
    pub service: String,
    pub region: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyRow {
    pub user: String,
    pub access_key_id: String,
    pub status: &'static str,
    pub created: Timestamp,
    pub age_days: i64,
    pub last_used: Option<LastUsed>,
    /// The IamKeyRotation (`namespace/name`, or the claim's `cluster/namespace/name`).
    pub covered_by: Option<String>,
    /// `status` (an IamKeyRotation's status holds the key) or `ownerClaim` (the user's tag).
    pub coverage: Option<&'static str>,
    pub verdict: Verdict,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub users: usize,
    pub users_without_keys: usize,
    pub keys: usize,
    pub active: usize,
    pub inactive: usize,
    pub covered: usize,
    pub uncovered: usize,
    pub older_than_max_age: usize,
    pub never_used: usize,
    pub pass: usize,
    pub fail_covered: usize,
    pub fail: usize,
    pub aws_calls: u64,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub at: Timestamp,
    pub max_age_seconds: u64,
    pub summary: Summary,
    pub keys: Vec<KeyRow>,
}

fn coverage(key: &str, user: &UserKeys, held: &Held) -> (Option<String>, Option<&'static str>) {
    if let Some(r) = held.get(key) {
        return (Some(r.clone()), Some("status"));
    }
    match user.claims.get(key) {
        Some(owner) => (Some(owner.clone()), Some("ownerClaim")),
        None => (None, None),
    }
}

fn row(user: &UserKeys, key: &IamKey, held: &Held, at: Timestamp, max_age: Duration) -> KeyRow {
    let age = at.duration_since(key.created).as_secs().max(0);
    let old = age as u64 > max_age.as_secs();
    let (covered_by, coverage) = coverage(&key.id, user, held);
    let verdict = match (key.active, old, covered_by.is_some()) {
        (false, _, _) => Verdict::Inactive,
        (true, false, _) => Verdict::Pass,
        (true, true, true) => Verdict::FailCovered,
        (true, true, false) => Verdict::Fail,
    };
    KeyRow {
        user: user.user.clone(),
        access_key_id: key.id.clone(),
        status: if key.active { "Active" } else { "Inactive" },
        created: key.created,
        age_days: age / 86_400,
        last_used: user.last_use.get(&key.id).map(|u| LastUsed {
            time: u.time,
            service: u.service.clone(),
            region: u.region.clone(),
        }),
        covered_by,
        coverage,
        verdict,
    }
}

/// Every key's row and the counts.
pub fn assess(users: &[UserKeys], held: &Held, at: Timestamp, max_age: Duration, aws_calls: u64) -> Report {
    let keys: Vec<KeyRow> =
        users.iter().flat_map(|u| u.keys.iter().map(move |k| row(u, k, held, at, max_age))).collect();
    let count = |f: &dyn Fn(&KeyRow) -> bool| keys.iter().filter(|k| f(k)).count();
    let limit = max_age.as_secs() as i64;
    let summary = Summary {
        users: users.len(),
        users_without_keys: users.iter().filter(|u| u.keys.is_empty()).count(),
        keys: keys.len(),
        active: count(&|k| k.status == "Active"),
        inactive: count(&|k| k.status == "Inactive"),
        covered: count(&|k| k.covered_by.is_some()),
        uncovered: count(&|k| k.covered_by.is_none()),
        older_than_max_age: count(&|k| at.duration_since(k.created).as_secs() > limit),
        never_used: count(&|k| k.last_used.is_none()),
        pass: count(&|k| k.verdict == Verdict::Pass),
        fail_covered: count(&|k| k.verdict == Verdict::FailCovered),
        fail: count(&|k| k.verdict == Verdict::Fail),
        aws_calls,
    };
    Report { at, max_age_seconds: max_age.as_secs(), summary, keys }
}

/// One line per key, then the counts.
pub fn table(report: &Report) -> String {
    let dash = || "-".to_owned();
    let head = ["USER", "ACCESS KEY ID", "STATUS", "AGE", "LAST USED", "SERVICE", "REGION", "COVERED BY", "VERDICT"];
    let mut rows: Vec<Vec<String>> = vec![head.iter().map(|h| (*h).to_owned()).collect()];
    for k in &report.keys {
        let used = k.last_used.as_ref();
        rows.push(vec![
            k.user.clone(),
            k.access_key_id.clone(),
            k.status.to_owned(),
            format!("{}d", k.age_days),
            used.map(|u| super::output::age(u.time, report.at) + " ago").unwrap_or_else(|| "never".into()),
            used.map(|u| u.service.clone()).unwrap_or_else(dash),
            used.map(|u| u.region.clone()).unwrap_or_else(dash),
            k.covered_by.clone().unwrap_or_else(dash),
            serde_json::to_value(k.verdict).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
        ]);
    }
    let widths: Vec<usize> =
        (0..head.len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out: String = rows
        .iter()
        .map(|r| r.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect::<Vec<_>>().join("   "))
        .map(|l| l.trim_end().to_owned() + "\n")
        .collect();
    let s = &report.summary;
    out.push_str(&format!(
        "\n{} users ({} without keys), {} keys: {} pass, {} inactive, {} older than the limit but covered, {} FAIL \
         (uncovered and older than the limit); {} uncovered, {} never used; {} AWS calls\n",
        s.users,
        s.users_without_keys,
        s.keys,
        s.pass,
        s.inactive,
        s.fail_covered,
        s.fail,
        s.uncovered,
        s.never_used,
        s.aws_calls
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, active: bool, created: &str) -> IamKey {
        IamKey { id: id.into(), active, created: created.parse().unwrap() }
    }

    #[test]
    fn verdicts_follow_status_age_and_coverage() {
        let at: Timestamp = "2026-06-01T00:00:00Z".parse().unwrap();
        let old = "2026-01-01T00:00:00Z";
        let young = "2026-05-01T00:00:00Z";
        let users = vec![
            UserKeys {
                user: "a".into(),
                keys: vec![key("K1", true, old), key("K2", true, young)],
                claims: BTreeMap::from([("K1".into(), "prod/ns/app".into())]),
                last_use: BTreeMap::from([(
                    "K2".into(),
                    LastUse { time: young.parse().unwrap(), service: "s3".into(), region: "eu-west-1".into() },
                )]),
            },
            UserKeys {
                user: "b".into(),
                keys: vec![key("K3", true, old), key("K4", false, old)],
                ..Default::default()
            },
            UserKeys { user: "c".into(), keys: vec![key("K5", true, old)], ..Default::default() },
            UserKeys { user: "d".into(), ..Default::default() },
        ];
        let held = Held::from([("K5".into(), "ns/c".into())]);
        let r = assess(&users, &held, at, Duration::from_secs(90 * 86_400), 7);
        let v: Vec<_> = r.keys.iter().map(|k| (k.access_key_id.as_str(), k.verdict, k.coverage)).collect();
        assert_eq!(
            v,
            [
                ("K1", Verdict::FailCovered, Some("ownerClaim")),
                ("K2", Verdict::Pass, None),
                ("K3", Verdict::Fail, None),
                ("K4", Verdict::Inactive, None),
                ("K5", Verdict::FailCovered, Some("status")),
            ]
        );
        let s = &r.summary;
        assert_eq!((s.users, s.users_without_keys, s.keys, s.active, s.inactive), (4, 1, 5, 4, 1));
        assert_eq!((s.covered, s.uncovered, s.older_than_max_age, s.never_used), (2, 3, 4, 4));
        assert_eq!((s.pass, s.fail_covered, s.fail, s.aws_calls), (1, 2, 1, 7));
        assert_eq!(r.keys[0].age_days, 151);
        let t = table(&r);
        assert!(t.lines().nth(2).unwrap().contains("s3") && t.contains("1 FAIL"), "{t}");
    }
}
