//! `rekey audit` on the IAM emulator: 500 users under a path of their own, with keys that are old
//! or young, active or not, used or never, covered by an owner claim, by an IamKeyRotation's status,
//! or by nothing. The counts in `-o json` are exact, and the exit code gates on uncovered old keys.

mod support;

use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use rekey::api::IamKeyRotation;
use rekey_testenv::creds::KeyPair;
use rekey_testenv::env::{TestEnv, eventually, unique};
use serde_json::json;
use support::*;

const USERS: usize = 500;
/// Users below this index get their keys before the boundary instant: "old" at `--at`.
const OLD: usize = 250;
/// Users whose keys an IamKeyRotation's status holds.
const HELD: [usize; 3] = [2, 12, 252];

/// A key and IAM's creation time of it.
async fn create_key(env: &TestEnv, user: &str) -> anyhow::Result<(KeyPair, Timestamp)> {
    let out = env.iam.create_access_key().user_name(user).send().await?;
    let k = out.access_key().ok_or_else(|| anyhow::anyhow!("no key"))?;
    let created = k.create_date().ok_or_else(|| anyhow::anyhow!("no create date"))?;
    let created = Timestamp::new(created.secs(), created.subsec_nanos() as i32)?;
    let pair = KeyPair { access_key_id: k.access_key_id().into(), secret_access_key: k.secret_access_key().into() };
    Ok((pair, created))
}

/// User `i` as the table in the module doc has it: i % 10 == 0 no key; 1 claimed; 3 used once
/// (signed an STS call); 9 a second, inactive key. Returns its active key id and creation times.
async fn user(
    env: &TestEnv,
    base: &str,
    path: &str,
    i: usize,
) -> anyhow::Result<(usize, Option<String>, Vec<Timestamp>)> {
    let name = format!("{base}-u{i}");
    env.iam.create_user().user_name(&name).path(path).send().await?;
    if i.is_multiple_of(10) {
        return Ok((i, None, vec![]));
    }
    let (key, created) = create_key(env, &name).await?;
    let mut times = vec![created];
    if i % 10 == 1 {
        let tag = aws_sdk_iam::types::Tag::builder()
            .key(&key.access_key_id)
            .value(format!("rekey:other-cluster/ns/{name}"))
            .build()?;
        env.iam.tag_user().user_name(&name).tags(tag).send().await?;
    }
    if i % 10 == 3 {
        anyhow::ensure!(env.caller_arn(&key, &env.moto_url).await?.is_some(), "key of {name} does not authenticate");
    }
    if i % 10 == 9 {
        let (second, created) = create_key(env, &name).await?;
        env.set_key_status(&name, &second.access_key_id, false).await?;
        times.push(created);
    }
    Ok((i, Some(key.access_key_id), times))
}

async fn users(
    env: &TestEnv,
    base: &str,
    path: &str,
    range: std::ops::Range<usize>,
) -> anyhow::Result<Vec<(usize, Option<String>, Vec<Timestamp>)>> {
    futures::stream::iter(range).map(|i| user(env, base, path, i)).buffer_unordered(16).try_collect().await
}

/// Runs `rekey audit` as the administrator (the audit's reads need ListUsers on the account).
async fn audit(args: &[&str]) -> anyhow::Result<(Option<i32>, serde_json::Value, String)> {
    let out = audit_output(args).await?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let doc = serde_json::from_slice(&out.stdout).map_err(|e| anyhow::anyhow!("{e}: {err}"))?;
    Ok((out.status.code(), doc, err))
}

async fn audit_output(args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(tokio::process::Command::new(env!("CARGO_BIN_EXE_rekey"))
        .arg("audit")
        .args(args)
        .env("AWS_ACCESS_KEY_ID", std::env::var("REKEY_TEST_ADMIN_ACCESS_KEY_ID")?)
        .env("AWS_SECRET_ACCESS_KEY", std::env::var("REKEY_TEST_ADMIN_SECRET_ACCESS_KEY")?)
        .output()
        .await?)
}

/// The IamKeyRotations whose status holds the `HELD` users' keys.
async fn hold(env: &TestEnv, ns: &str, base: &str, ids: &[(usize, String)]) -> anyhow::Result<()> {
    let api: Api<IamKeyRotation> = Api::namespaced(env.kube.clone(), ns);
    for (i, id) in ids {
        let name = format!("held-{i}");
        let spec = json!({"userName": format!("{base}-u{i}"), "secrets": [{"name": "creds"}], "suspend": true});
        api.create(&Default::default(), &ikr(&name, spec)?).await?;
        let status = json!({"status": {"activeKey": {"accessKeyId": id}}});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?;
        // The claim rekey writes on the keys it holds, as a cluster named "other-cluster".
        let tag =
            aws_sdk_iam::types::Tag::builder().key(id).value(format!("rekey:other-cluster/{ns}/{name}")).build()?;
        env.iam.tag_user().user_name(format!("{base}-u{i}")).tags(tag).send().await?;
    }
    Ok(())
}

#[tokio::test]
async fn audit_counts_every_key_of_500_users_exactly_and_gates_on_uncovered_old_ones() -> anyhow::Result<()> {
    let env = TestEnv::get().await?;
    ensure_crd(&env).await?;
    let ns = env.namespace("audit").await?;
    let base = unique("au");
    let path = format!("/{base}/");

    let mut made = users(&env, &base, &path, 0..OLD).await?;
    let last_old = made.iter().flat_map(|u| u.2.iter()).max().copied().unwrap_or_else(Timestamp::now);
    // The boundary between old and young keys: a whole second after the last old key, and the
    // young ones a whole second later still (the audit counts ages in whole seconds).
    let boundary = last_old + SignedDuration::from_secs(1);
    eventually("the clock passes the boundary by a second", Duration::from_secs(10), || async {
        Ok(if Timestamp::now() > boundary + SignedDuration::from_secs(1) { Ok(()) } else { Err("not yet".into()) })
    })
    .await?;
    made.extend(users(&env, &base, &path, OLD..USERS).await?);
    let first_young = made.iter().filter(|u| u.0 >= OLD).flat_map(|u| u.2.iter()).min().copied();
    assert!(first_young.is_some_and(|t| t > boundary + SignedDuration::from_secs(1)), "{first_young:?} {boundary}");
    let held: Vec<(usize, String)> =
        made.iter().filter(|u| HELD.contains(&u.0)).filter_map(|u| Some((u.0, u.1.clone()?))).collect();
    hold(&env, &ns, &base, &held).await?;

    // As of 90 days after the boundary, the first 250 users' keys are older than 90 days.
    let at = (boundary + SignedDuration::from_hours(90 * 24)).to_string();
    let common = ["--path-prefix", &path, "--aws-calls-per-second", "200", "-o", "json"];
    let started = std::time::Instant::now();
    let (code, doc, err) = audit(&[&common[..], &["--at", &at]].concat()).await?;
    let took = started.elapsed();
    let s = &doc["summary"];
    let counts: Vec<(&str, u64)> = [
        "users",
        "usersWithoutKeys",
        "keys",
        "active",
        "inactive",
        "covered",
        "uncovered",
        "olderThanMaxAge",
        "neverUsed",
        "pass",
        "failCovered",
        "fail",
    ]
    .into_iter()
    .map(|k| (k, s[k].as_u64().unwrap_or(u64::MAX)))
    .collect();
    // 450 users hold 450 active keys, 50 of them a second, inactive one; claims on users 1, 11, ..;
    // statuses hold 3 keys; users 3, 13, .. used theirs; the first 250 users' 250 keys are old:
    // 225 active, of which 25 claimed and 2 held.
    let want = [
        ("users", 500),
        ("usersWithoutKeys", 50),
        ("keys", 500),
        ("active", 450),
        ("inactive", 50),
        ("covered", 53),
        ("uncovered", 447),
        ("olderThanMaxAge", 250),
        ("neverUsed", 450),
        ("pass", 225),
        ("failCovered", 27),
        ("fail", 198),
    ];
    assert_eq!(counts, want, "{err}");
    assert_eq!(code, Some(2), "an uncovered old key fails the audit: {err}");
    let calls = s["awsCalls"].as_u64().unwrap_or_default();
    // One ListUsers page, ListAccessKeys per user, then ListUserTags and a GetAccessKeyLastUsed
    // per key for users with keys.
    assert_eq!(calls, 1 + 500 + 450 + 500, "{s}");
    println!(
        "rekey audit: {calls} AWS calls for {USERS} users ({:.2} per user) in {took:.1?} at a cap of 200/s",
        calls as f64 / USERS as f64
    );

    let used = doc["keys"].as_array().into_iter().flatten().find(|k| k["user"] == format!("{base}-u3"));
    let used = used.map(|k| (k["lastUsed"]["service"].clone(), k["lastUsed"]["region"].clone()));
    assert_eq!(used, Some((json!("sts"), json!("us-east-1"))));
    let by_status = doc["keys"].as_array().into_iter().flatten().find(|k| k["user"] == format!("{base}-u252"));
    assert_eq!(by_status.map(|k| k["coveredBy"].clone()), Some(json!(format!("{ns}/held-252"))));

    // Named as the cluster the claims name, the audit knows their resources are gone (every
    // namespace was read): 50 stale claims cover nothing, and the 25 old ones fail. Reading one
    // namespace only, the claims in others cannot be judged and still count.
    let summary = |d: &serde_json::Value, k: &str| d["summary"][k].as_u64().unwrap_or(u64::MAX);
    let (covered, fail) = (summary(&doc, "covered"), summary(&doc, "fail"));
    let named = [&common[..], &["--at", &at, "--cluster-name", "other-cluster"]].concat();
    let (code, stale, err) = audit(&named).await?;
    assert_eq!(
        (code, summary(&stale, "covered"), summary(&stale, "fail")),
        (Some(2), covered - 50, fail + 25),
        "{err}"
    );
    let claimed = stale["keys"].as_array().into_iter().flatten().find(|k| k["user"] == format!("{base}-u1"));
    let claimed = claimed.map(|k| (k["coverage"].clone(), k["staleClaim"].clone(), k["verdict"].clone()));
    assert_eq!(claimed, Some((json!("staleClaim"), json!(format!("other-cluster/ns/{base}-u1")), json!("fail"))));
    let (_, one_ns, err) = audit(&[&named[..], &["-n", &ns]].concat()).await?;
    assert_eq!((summary(&one_ns, "covered"), summary(&one_ns, "fail")), (covered, fail), "{err}");
    // A name the claims of the held keys do not confirm would make every claim stale: refused.
    let wrong = [&common[..], &["--at", &at, "--cluster-name", "prod"]].concat();
    let out = audit_output(&wrong).await?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--cluster-name prod is not the name"), "{err}");

    // Today every key is young: nothing fails, the gate opens.
    let (code, doc, err) = audit(&common).await?;
    assert_eq!(
        (code, doc["summary"]["fail"].as_u64(), doc["summary"]["pass"].as_u64()),
        (Some(0), Some(0), Some(450)),
        "{err}"
    );
    Ok(())
}
