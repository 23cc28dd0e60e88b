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

/// What the cluster tells about coverage: the keys the statuses hold and, with this cluster's name
/// (`--cluster-name`), every resource of the namespaces read, so that a claim naming a resource of
/// this cluster that no longer exists is not taken for coverage.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub held: Held,
    pub name: Option<String>,
    /// Every IamKeyRotation read: `namespace/name` -> the IAM user it rotates.
    pub resources: BTreeMap<String, String>,
    /// The namespaces read (empty: every namespace).
    pub namespaces: Vec<String>,
}

impl Cluster {
    /// A claim of this cluster on `user`'s key naming no resource of this cluster that rotates
    /// `user` (deleted, or re-created under the same name for another user).
    fn stale(&self, owner: &str, user: &str) -> bool {
        let Some(cluster) = &self.name else { return false };
        let read = |ns: &str| self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == ns);
        let rotates = |r: &str| self.resources.get(r).is_some_and(|u| u.eq_ignore_ascii_case(user));
        crate::ownership::is_stale(owner, cluster, read, rotates)
    }

    /// Whether the claims confirm `name` is this cluster's: `Some(true)` when a key an
    /// IamKeyRotation's status holds carries a claim of that cluster naming that resource,
    /// `Some(false)` when such keys carry claims but none of that cluster (a wrong name would
    /// report every claim as stale), `None` when no claim tells.
    pub fn name_confirmed(&self, users: &[UserKeys]) -> Option<bool> {
        let name = self.name.as_deref()?;
        let mut told = None;
        for (key, owner) in users.iter().flat_map(|u| u.claims.iter()) {
            let Some(resource) = self.held.get(key) else { continue };
            if crate::ownership::is_own_claim(owner, &format!("{name}/{resource}")) {
                return Some(true);
            }
            told = Some(false);
        }
        told
    }
}

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
    /// `status` (an IamKeyRotation's status holds the key), `ownerClaim` (the user's tag), or
    /// `staleClaim` (a tag naming a resource of this cluster that no longer exists: no coverage).
    pub coverage: Option<&'static str>,
    /// The resource a stale claim names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_claim: Option<String>,
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

/// Who covers the key, how, and the resource a stale claim names.
type Coverage = (Option<String>, Option<&'static str>, Option<String>);

fn coverage(key: &str, user: &UserKeys, cluster: &Cluster) -> Coverage {
    if let Some(r) = cluster.held.get(key) {
        return (Some(r.clone()), Some("status"), None);
    }
    match user.claims.get(key) {
        Some(owner) if cluster.stale(owner, &user.user) => (None, Some("staleClaim"), Some(owner.clone())),
        Some(owner) => (Some(owner.clone()), Some("ownerClaim"), None),
        None => (None, None, None),
    }
}

fn row(user: &UserKeys, key: &IamKey, cluster: &Cluster, at: Timestamp, max_age: Duration) -> KeyRow {
    let age = at.duration_since(key.created).as_secs().max(0);
    let old = age as u64 > max_age.as_secs();
    let (covered_by, coverage, stale_claim) = coverage(&key.id, user, cluster);
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
        stale_claim,
        verdict,
    }
}

/// Every key's row and the counts.
pub fn assess(users: &[UserKeys], cluster: &Cluster, at: Timestamp, max_age: Duration, aws_calls: u64) -> Report {
    let keys: Vec<KeyRow> =
        users.iter().flat_map(|u| u.keys.iter().map(move |k| row(u, k, cluster, at, max_age))).collect();
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
            match (&k.covered_by, &k.stale_claim) {
                (Some(by), _) => by.clone(),
                (None, Some(gone)) => format!("- (stale claim: {gone})"),
                (None, None) => dash(),
            },
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
        let cluster = Cluster { held: Held::from([("K5".into(), "ns/c".into())]), ..Default::default() };
        let r = assess(&users, &cluster, at, Duration::from_secs(90 * 86_400), 7);
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

    /// A claim naming a resource of this cluster that no longer exists covers nothing; one of
    /// another cluster, one in a namespace not read, or one cut to fit IAM's limit still does.
    #[test]
    fn a_claim_naming_a_resource_that_is_gone_is_no_coverage() {
        let at: Timestamp = "2026-06-01T00:00:00Z".parse().unwrap();
        let old = "2026-01-01T00:00:00Z";
        let claims = [
            ("K1", "prod/ns/gone"),
            ("K2", "prod/ns/app"),
            ("K3", "staging/ns/gone"),
            ("K4", "prod/other/gone"),
            ("K5", "prod/ns/gone~0a1b2c3d"),
        ];
        let users = vec![UserKeys {
            user: "a".into(),
            keys: claims.iter().map(|(k, _)| key(k, true, old)).collect(),
            claims: claims.iter().map(|(k, o)| ((*k).to_owned(), (*o).to_owned())).collect(),
            ..Default::default()
        }];
        let mut cluster = Cluster {
            name: Some("prod".into()),
            resources: BTreeMap::from([("ns/app".to_owned(), "A".to_owned())]),
            namespaces: vec!["ns".into()],
            ..Default::default()
        };
        let verdicts = |c: &Cluster| -> Vec<Verdict> {
            assess(&users, c, at, Duration::from_secs(90 * 86_400), 0).keys.iter().map(|k| k.verdict).collect()
        };
        let fc = Verdict::FailCovered;
        assert_eq!(verdicts(&cluster), [Verdict::Fail, fc, fc, fc, fc]);
        let r = assess(&users, &cluster, at, Duration::from_secs(90 * 86_400), 0);
        assert_eq!((r.keys[0].coverage, r.keys[0].stale_claim.as_deref()), (Some("staleClaim"), Some("prod/ns/gone")));
        assert_eq!((r.summary.covered, r.summary.fail), (4, 1));
        assert!(table(&r).contains("- (stale claim: prod/ns/gone)"), "{}", table(&r));
        cluster.namespaces.clear();
        assert_eq!(verdicts(&cluster), [Verdict::Fail, fc, fc, Verdict::Fail, fc], "every namespace read");
        cluster.resources.insert("ns/app".into(), "b".into());
        let f = Verdict::Fail;
        assert_eq!(verdicts(&cluster), [f, f, fc, f, fc], "ns/app now rotates another user");
        cluster.name = None;
        assert_eq!(verdicts(&cluster), [fc; 5], "without --cluster-name no claim can be judged");
    }

    /// The claims on the keys the statuses hold tell whether --cluster-name is this cluster's.
    #[test]
    fn the_cluster_name_is_confirmed_by_the_claims_of_held_keys() {
        let users = vec![UserKeys {
            user: "a".into(),
            claims: BTreeMap::from([("K1".into(), "prod/ns/app".into()), ("K2".into(), "prod/ns/gone".into())]),
            ..Default::default()
        }];
        let held = |k: &str| Held::from([(k.to_owned(), "ns/app".to_owned())]);
        let cluster = |name: &str, k: &str| Cluster { name: Some(name.into()), held: held(k), ..Default::default() };
        assert_eq!(cluster("prod", "K1").name_confirmed(&users), Some(true));
        assert_eq!(cluster("staging", "K1").name_confirmed(&users), Some(false), "a wrong name");
        assert_eq!(cluster("prod", "K9").name_confirmed(&users), None, "no held key carries a claim");
        assert_eq!(Cluster { held: held("K1"), ..Default::default() }.name_confirmed(&users), None);
    }
}
