//! `scripts/bench burst`: 1,000 bootstrapped resources asked to rotate at once, twice — once with
//! the IAM identity allowed `iam:TagUser`, once refused it (every rotation then warns `TagFailed`,
//! which must never be fatal). Per run: how many rotations finished, were abandoned, were retried
//! to completion, are still unfinished, and the longest time an in-flight rotation went without a
//! look (from the operator's "performing" log lines, one per step decided at a look).
//!
//! Both runs rotate through a role (spec.aws.roleArn) whose policy grants or leaves out TagUser:
//! the refusal is IAM's own, and the shared operator identity keeps its policy.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use rekey::api::{HistoryOutcome, IamKeyRotation, Phase};
use rekey_testenv::env::{TestEnv, unique};
use serde_json::json;

use crate::support::*;
use crate::{Table, create_resources_with, make_users, operator, request_all, rss_mib, size};

/// How long a run may take before what is unfinished is reported as such.
const BOUND: Duration = Duration::from_secs(900);

pub async fn burst(env: &TestEnv, kubeconfig: &Path, t: &mut Table) -> anyhow::Result<()> {
    for tag_user in [true, false] {
        one_run(env, kubeconfig, t, tag_user).await?;
    }
    Ok(())
}

async fn one_run(env: &TestEnv, kubeconfig: &Path, t: &mut Table, tag_user: bool) -> anyhow::Result<()> {
    let n = size("REKEY_BENCH_RESOURCES", 1000) as usize;
    let cap = size("REKEY_BENCH_CALLS_PER_SECOND", 100).to_string();
    let ns = env.namespace("bench-burst").await?;
    let role = role(env, &ns, tag_user).await?;
    let ikrs: Api<IamKeyRotation> = Api::namespaced(env.kube.clone(), &ns);
    let users = make_users(env, &ns, n).await?;
    create_resources_with(&ikrs, &users, 0, json!({"aws": {"roleArn": role}})).await?;
    let max = n.to_string();
    let vars = [
        ("REKEY_AWS_CALLS_PER_SECOND", cap.as_str()),
        ("REKEY_MAX_CONCURRENT_ROTATIONS", max.as_str()),
        ("REKEY_ALLOWED_ROLE_ARNS", "arn:aws:iam::*:role/rekey-bench/*"),
    ];
    let op = operator(&ns, kubeconfig, &vars).await?;
    super::all(&ikrs, "all bootstrapped", n, |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    let logged_before = op.output()?.len();
    let t0 = Instant::now();
    request_all(&ikrs, n, "rekey.dev/rotate").await?;
    let mut peak_rss = 0f64;
    let items = loop {
        peak_rss = peak_rss.max(rss_mib(&op)?);
        let items = ikrs.list(&Default::default()).await?.items;
        if items.iter().filter(|o| rotated(o)).count() >= n || t0.elapsed() > BOUND {
            break items;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let took = t0.elapsed();
    let log = op.output()?;
    let gap = longest_gap(log.get(logged_before..).unwrap_or_default());
    let c = Counts::of(&items);
    let label = if tag_user { "allowed" } else { "denied (every rotation warns TagFailed)" };
    t.row(
        format!("{n} rotations requested at once, iam:TagUser {label} (cap {cap} AWS calls/s)"),
        format!(
            "{} finished in {:.0} s, {} abandoned, {} retried to completion, {} unfinished after {:.0} s; longest gap between two looks at an in-flight rotation {gap}",
            c.finished,
            took.as_secs_f64(),
            c.abandoned,
            c.retried,
            n - c.finished,
            BOUND.as_secs_f64(),
        ),
        "all finished, none silently dropped",
    );
    t.row(format!("operator RSS, peak during those {n} rotations"), format!("{peak_rss:.1} MiB"), "≤ 64 MiB");
    Ok(())
}

fn rotated(o: &IamKeyRotation) -> bool {
    o.status.as_ref().is_some_and(|s| s.rotations >= 1 && s.phase == Phase::Idle)
}

struct Counts {
    finished: usize,
    abandoned: usize,
    retried: usize,
}

impl Counts {
    fn of(items: &[IamKeyRotation]) -> Self {
        let abandoned = |o: &IamKeyRotation| {
            o.status.as_ref().is_some_and(|s| s.history.iter().any(|h| h.outcome == HistoryOutcome::Abandoned))
        };
        Self {
            finished: items.iter().filter(|o| rotated(o)).count(),
            abandoned: items.iter().filter(|o| abandoned(o)).count(),
            retried: items.iter().filter(|o| abandoned(o) && rotated(o)).count(),
        }
    }
}

/// The longest time between two consecutive looks at one resource while its rotation was in
/// flight (a look logged in a phase other than Idle, until the next look at it), with the resource.
fn longest_gap(log: &str) -> String {
    let mut last: BTreeMap<&str, (Timestamp, bool)> = BTreeMap::new();
    let mut worst: Option<(Duration, &str)> = None;
    for line in log.lines().filter(|l| l.contains("performing")) {
        let Some(at) = line.split_whitespace().next().and_then(|t| t.parse::<Timestamp>().ok()) else { continue };
        let Some(name) = field(line, "name=", '}') else { continue };
        let in_flight = field(line, "phase=", ' ').is_some_and(|p| p != "Idle");
        if let Some((prev, true)) = last.get(name) {
            let gap = Duration::try_from(at.duration_since(*prev)).unwrap_or_default();
            if worst.is_none_or(|(w, _)| gap > w) {
                worst = Some((gap, name));
            }
        }
        last.insert(name, (at, in_flight));
    }
    worst.map_or_else(|| "— (no look logged)".into(), |(d, name)| format!("{:.1} s ({name})", d.as_secs_f64()))
}

fn field<'a>(line: &'a str, key: &str, end: char) -> Option<&'a str> {
    let rest = &line[line.find(key)? + key.len()..];
    Some(rest.split(end).next().unwrap_or(rest).trim())
}

/// A role under /rekey-bench/ trusting the operator for namespace `ns`, allowed every IAM action of
/// a rotation, TagUser only if `tag_user`.
async fn role(env: &TestEnv, ns: &str, tag_user: bool) -> anyhow::Result<String> {
    let operator = std::env::var("REKEY_TEST_OPERATOR_USER").context("REKEY_TEST_OPERATOR_USER")?;
    let trust = json!({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "sts:AssumeRole",
        "Principal": {"AWS": format!("arn:aws:iam::{}:user/{operator}", env.account_id)},
        "Condition": {"StringEquals": {"sts:ExternalId": format!("{CLUSTER}/{ns}")}}}]});
    let name = unique("burst");
    let out = env
        .iam
        .create_role()
        .role_name(&name)
        .path("/rekey-bench/")
        .assume_role_policy_document(trust.to_string())
        .send()
        .await?;
    let mut actions = vec![
        "iam:CreateAccessKey",
        "iam:UpdateAccessKey",
        "iam:DeleteAccessKey",
        "iam:ListAccessKeys",
        "iam:GetUser",
        "iam:ListUserTags",
        "iam:UntagUser",
        "iam:GetAccessKeyLastUsed",
    ];
    if tag_user {
        actions.push("iam:TagUser");
    }
    let policy =
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]});
    env.iam.put_role_policy().role_name(&name).policy_name("keys").policy_document(policy.to_string()).send().await?;
    Ok(out.role().context("role")?.arn().to_owned())
}
