//! Safety rules 5 and 6: AWS-side consent, tenancy, and no secret material anywhere but Secrets.

mod support;

use std::collections::BTreeSet;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rekey::api::{IamKeyRotation, Phase};
use rekey_testenv::env::TestEnv;
use serde_json::json;
use support::*;

fn rotate(v: &str) -> serde_json::Value {
    json!({"metadata": {"annotations": {"rekey.dev/rotate": v}}})
}

async fn stalled_message(api: &Api<IamKeyRotation>, name: &str) -> anyhow::Result<String> {
    let o = api.get(name).await?;
    o.status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Stalled"))
        .map(|c| c.message)
        .context("no Stalled condition")
}

async fn event_notes(env: &TestEnv, ns: &str) -> anyhow::Result<Vec<(String, String)>> {
    let list =
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(env.kube.clone(), ns).list(&Default::default()).await?;
    Ok(list.items.into_iter().map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default())).collect())
}

#[tokio::test]
async fn without_consent_nothing_is_written_and_the_event_names_the_tag_to_set() -> anyhow::Result<()> {
    let env = TestEnv::get().await?;
    ensure_crd(&env).await?;
    let ns = env.namespace("noconsent").await?;
    let user = env.create_user("noconsent").await?;
    // Consent for another cluster does not count.
    let tag = aws_sdk_iam::types::Tag::builder().key(format!("rekey.dev/allow/{ns}")).value("other-cluster").build()?;
    env.iam.tag_user().user_name(&user).tags(tag).send().await?;
    let api: Api<IamKeyRotation> = Api::namespaced(env.kube.clone(), &ns);
    api.create(&PostParams::default(), &ikr("app", json!({"userName": user, "secrets": [{"name": "creds"}]}))?).await?;
    let _op = Operator::start(&ns, &[]).await?;
    wait_ikr(&api, "app", "Forbidden", |o| is_true(o, "Stalled", "Forbidden")).await?;
    let want = format!("rekey.dev/allow/{ns}={CLUSTER}");
    assert!(stalled_message(&api, "app").await?.contains(&want));
    let notes = event_notes(&env, &ns).await?;
    assert!(
        notes.iter().any(|(r, n)| r == "Forbidden" && n.contains(&want) && n.contains(&user)),
        "an Event says which tag to set on which user: {notes:?}"
    );
    assert!(env.keys(&user).await?.is_empty(), "zero IAM writes");
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(env.kube.clone(), &ns);
    assert!(secrets.get_opt("creds").await?.is_none());
    Ok(())
}

#[tokio::test]
async fn withdrawn_consent_stops_the_next_rotation_and_leaves_the_key_in_use() -> anyhow::Result<()> {
    let f = Fixture::new("withdraw").await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}]})).await?;
    let _op = f.operator().await?;
    let o = wait_ikr(&f.ikrs, "app", "bootstrapped", |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    let key = active_key(&o).context("key")?;
    f.env.iam.untag_user().user_name(&f.user).tag_keys(format!("rekey.dev/allow/{}", f.ns)).send().await?;
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&rotate("1"))).await?;
    wait_ikr(&f.ikrs, "app", "Forbidden", |o| is_true(o, "Stalled", "Forbidden")).await?;
    let keys = f.env.keys(&f.user).await?;
    assert_eq!(keys.into_iter().collect::<Vec<_>>(), vec![(key, "Active".to_owned())], "key in use untouched");
    Ok(())
}

#[tokio::test]
async fn rekey_refuses_to_rotate_the_user_it_runs_as() -> anyhow::Result<()> {
    let env = TestEnv::get().await?;
    ensure_crd(&env).await?;
    let ns = env.namespace("self").await?;
    let me = std::env::var("REKEY_TEST_OPERATOR_USER").context("REKEY_TEST_OPERATOR_USER")?;
    let tag = aws_sdk_iam::types::Tag::builder().key(format!("rekey.dev/allow/{ns}")).value("*").build()?;
    env.iam.tag_user().user_name(&me).tags(tag).send().await?;
    let before = env.keys(&me).await?;
    let api: Api<IamKeyRotation> = Api::namespaced(env.kube.clone(), &ns);
    api.create(&PostParams::default(), &ikr("app", json!({"userName": me, "secrets": [{"name": "creds"}]}))?).await?;
    let _op = Operator::start(&ns, &[]).await?;
    wait_ikr(&api, "app", "SelfRotation", |o| is_true(o, "Stalled", "SelfRotation")).await?;
    assert_eq!(env.keys(&me).await?, before, "the operator's own keys are untouched");
    env.iam.untag_user().user_name(&me).tag_keys(format!("rekey.dev/allow/{ns}")).send().await?;
    Ok(())
}

#[tokio::test]
async fn two_namespaces_naming_one_user_are_a_conflict_not_a_race() -> anyhow::Result<()> {
    let f = Fixture::new("ns-a").await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}]})).await?;
    let _op_a = f.operator().await?;
    wait_ikr(&f.ikrs, "app", "first namespace bootstrapped", |o| active_key(o).is_some()).await?;
    let ns_b = f.env.namespace("ns-b").await?;
    let tag = aws_sdk_iam::types::Tag::builder().key(format!("rekey.dev/allow/{ns_b}")).value(CLUSTER).build()?;
    f.env.iam.tag_user().user_name(&f.user).tags(tag).send().await?;
    let api_b: Api<IamKeyRotation> = Api::namespaced(f.env.kube.clone(), &ns_b);
    api_b
        .create(&PostParams::default(), &ikr("app", json!({"userName": f.user, "secrets": [{"name": "creds"}]}))?)
        .await?;
    let _op_b = Operator::start(&ns_b, &[]).await?;
    wait_ikr(&api_b, "app", "Conflict", |o| is_true(o, "Degraded", "Conflict")).await?;
    assert_eq!(f.env.keys(&f.user).await?.len(), 1, "the second namespace created no key");
    Ok(())
}

#[tokio::test]
async fn rekey_refuses_to_start_when_the_sdk_would_log_bodies() -> anyhow::Result<()> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_rekey"))
        .args(["run", "--cluster-name", "x"])
        .env("LOG_SENSITIVE_BODIES", "true")
        .output()
        .await?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("LOG_SENSITIVE_BODIES"));
    Ok(())
}

/// Every secret access key that passed through the target Secrets.
async fn secrets_seen(f: &Fixture, names: &[&str], seen: &mut BTreeSet<String>) -> anyhow::Result<()> {
    for n in names {
        if let Some(s) = f.secrets.get_opt(n).await? {
            for v in s.data.unwrap_or_default().values() {
                let text = String::from_utf8_lossy(&v.0).to_string();
                for k in rekey_testenv::creds::parse_credentials_text(&text) {
                    seen.insert(k.secret_access_key);
                }
                if text.len() == 40 && !text.starts_with("AKIA") {
                    seen.insert(text);
                }
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn no_secret_reaches_logs_events_or_status_even_at_trace_level() -> anyhow::Result<()> {
    let f = Fixture::new("leak").await?;
    Api::<Deployment>::namespaced(f.env.kube.clone(), &f.ns)
        .create(&PostParams::default(), &deployment("web", 1, "env-creds")?)
        .await?;
    f.create(
        "app",
        json!({"userName": f.user, "retirement": {"deleteAfter": "0s"}, "secrets": [
            {"name": "env-creds"},
            {"name": "file-creds", "format": "credentialsFile"},
            {"name": "tmpl-creds", "format": "template", "template": {"t": "k={{ .AccessKeyId }} s={{ .SecretAccessKey }}"}}]}),
    )
    .await?;
    let mut op = Operator::start(&f.ns, &[("RUST_LOG", "trace")]).await?;
    let names = ["env-creds", "file-creds", "tmpl-creds"];
    let mut seen = BTreeSet::new();
    wait_ikr(&f.ikrs, "app", "bootstrapped", |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    secrets_seen(&f, &names, &mut seen).await?;
    for round in 1..=2 {
        f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&rotate(&round.to_string()))).await?;
        wait_ikr(&f.ikrs, "app", "rotated", |o| {
            o.status.as_ref().is_some_and(|s| s.rotations == round && s.phase == Phase::Idle)
        })
        .await?;
        secrets_seen(&f, &names, &mut seen).await?;
    }
    let metrics = rekey_testenv::env::http_get(&op.http, "/metrics").await?;
    assert!(metrics.contains("rekey_aws_calls_total"), "metrics scraped");
    op.kill().await?;
    assert!(seen.len() >= 3, "three keys' secrets collected: {}", seen.len());

    let log = std::fs::read_to_string(&op.log)?;
    assert!(log.len() > 10_000, "trace logging was on ({} bytes)", log.len());
    let events = serde_json::to_string(
        &Api::<k8s_openapi::api::events::v1::Event>::namespaced(f.env.kube.clone(), &f.ns)
            .list(&Default::default())
            .await?
            .items,
    )?;
    let status = serde_json::to_string(&f.ikrs.get("app").await?)?;
    for secret in &seen {
        let b64 = serde_json::to_value(k8s_openapi::ByteString(secret.as_bytes().to_vec()))?;
        for (place, text) in [("operator log", &log), ("Events", &events), ("status", &status), ("metrics", &metrics)] {
            assert!(!text.contains(secret.as_str()), "a secret access key appears in the {place}");
            assert!(!text.contains(b64.as_str().unwrap_or("-")), "a base64 secret access key appears in the {place}");
        }
    }
    Ok(())
}

/// A role under /rekey/ that trusts the operator's user with `external_id` and may manage keys.
async fn role(env: &TestEnv, external_id: &str) -> anyhow::Result<String> {
    let name = rekey_testenv::env::unique("role");
    let operator = std::env::var("REKEY_TEST_OPERATOR_USER").context("REKEY_TEST_OPERATOR_USER")?;
    let trust = json!({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "sts:AssumeRole",
        "Principal": {"AWS": format!("arn:aws:iam::{}:user/{operator}", env.account_id)},
        "Condition": {"StringEquals": {"sts:ExternalId": external_id}}}]});
    let out = env
        .iam
        .create_role()
        .role_name(&name)
        .path("/rekey/")
        .assume_role_policy_document(trust.to_string())
        .send()
        .await?;
    let policy = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": [
        "iam:CreateAccessKey", "iam:UpdateAccessKey", "iam:DeleteAccessKey", "iam:ListAccessKeys",
        "iam:GetUser", "iam:ListUserTags", "iam:TagUser", "iam:UntagUser", "iam:GetAccessKeyLastUsed"],
        "Resource": "*"}]});
    env.iam.put_role_policy().role_name(&name).policy_name("keys").policy_document(policy.to_string()).send().await?;
    Ok(out.role().context("role")?.arn().to_owned())
}

#[tokio::test]
async fn role_arn_is_assumed_with_the_namespace_external_id_and_checked_against_the_allow_list() -> anyhow::Result<()> {
    let f = Fixture::new("role").await?;
    let good = role(&f.env, &format!("{CLUSTER}/{}", f.ns)).await?;
    let other_ns = role(&f.env, &format!("{CLUSTER}/someone-else")).await?;
    let user_b = consenting_user(&f.env, "roleb", &f.ns).await?;
    let user_c = consenting_user(&f.env, "rolec", &f.ns).await?;
    f.create("good", json!({"userName": f.user, "secrets": [{"name": "a"}], "aws": {"roleArn": good}})).await?;
    f.create("wrong-trust", json!({"userName": user_b, "secrets": [{"name": "b"}], "aws": {"roleArn": other_ns}}))
        .await?;
    let not_listed = format!("arn:aws:iam::{}:role/admin", f.env.account_id);
    f.create("not-allowed", json!({"userName": user_c, "secrets": [{"name": "c"}], "aws": {"roleArn": not_listed}}))
        .await?;
    let allow = "arn:aws:iam::*:role/rekey/*";
    let _op = Operator::start(&f.ns, &[("REKEY_ALLOWED_ROLE_ARNS", allow)]).await?;
    wait_ikr(&f.ikrs, "good", "bootstrapped through the role", |o| phase(o) == Phase::Idle && active_key(o).is_some())
        .await?;
    let stats = f.env.proxy_stats().await?;
    assert!(stats["calls"]["sts:AssumeRole"]["ok"].as_u64().unwrap_or(0) >= 1, "{stats}");
    let o = wait_ikr(&f.ikrs, "not-allowed", "Forbidden", |o| is_true(o, "Stalled", "Forbidden")).await?;
    assert!(stalled_message(&f.ikrs, "not-allowed").await?.contains("not allowed"), "{:?}", o.status);
    // A role whose trust policy names another namespace's external id cannot be assumed from here.
    rekey_testenv::env::eventually("assume refused", WAIT, || async {
        let n = event_notes(&f.env, &f.ns).await?.iter().filter(|(r, _)| r.starts_with("Iam")).count();
        Ok(if n > 0 { Ok(()) } else { Err("no IAM failure yet".into()) })
    })
    .await?;
    // The refusal comes back at every retry, after a backoff (10 s, then 20 s, ...): one Warning
    // Event whose series counts the repeats, and no more repeats than the backoff allows.
    let (count, first) = rekey_testenv::env::eventually("the repeated refusal folded into one Event", WAIT, || async {
        let list = Api::<k8s_openapi::api::events::v1::Event>::namespaced(f.env.kube.clone(), &f.ns)
            .list(&Default::default())
            .await?;
        let mine: Vec<_> = list
            .items
            .iter()
            .filter(|e| e.reason.as_deref().is_some_and(|r| r.starts_with("Iam")))
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("wrong-trust"))
            .collect();
        let count = mine.first().and_then(|e| e.series.as_ref()).map_or(1, |s| s.count);
        let first = mine.first().and_then(|e| e.event_time.as_ref()).map(|t| t.0);
        Ok(match first {
            Some(first) if mine.len() == 1 && count >= 2 => Ok((count, first)),
            _ => Err(format!("{} Events, count {count}", mine.len())),
        })
    })
    .await?;
    let elapsed = k8s_openapi::jiff::Timestamp::now().duration_since(first).as_secs_f64();
    assert!(
        f64::from(count) <= 2.0 + elapsed / 10.0,
        "{count} attempts in {elapsed:.1} s: the backoff was not waited for"
    );
    assert!(f.env.keys(&user_b).await?.is_empty(), "nothing written through a role that refused");
    assert!(f.env.keys(&user_c).await?.is_empty(), "nothing written for a role not allowed");
    Ok(())
}
