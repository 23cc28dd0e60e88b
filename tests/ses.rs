//! SES SMTP credentials rotated for real on the local control plane and moto: the sesSmtp format
//! and a template's {{ .SesSmtpPassword }}, each password checked against an independent
//! derivation (Python's hmac/hashlib) of the key's secret.

mod support;

use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use rekey::api::Phase;
use rekey_testenv::creds::KeyPair;
use rekey_testenv::env::eventually;
use serde_json::json;
use support::*;

/// AWS's published derivation in Python (not rekey's code): tests/support/ses_calculate_key.py.
const CALCULATE_KEY: &str = include_str!("support/ses_calculate_key.py");

fn python_password(secret: &str, region: &str) -> anyhow::Result<String> {
    let mut child =
        Command::new("python3").args(["-c", CALCULATE_KEY]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    child.stdin.take().context("stdin")?.write_all(format!("{secret}\n{region}\n").as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "python3 failed");
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

fn text(s: &Secret, key: &str) -> Option<String> {
    s.data.as_ref()?.get(key).and_then(|v| String::from_utf8(v.0.clone()).ok())
}

/// The key of the env-format target: the secret the SMTP passwords must derive from.
async fn env_key(secrets: &Api<Secret>) -> anyhow::Result<KeyPair> {
    let s = secrets.get("app-aws").await?;
    Ok(KeyPair {
        access_key_id: text(&s, "AWS_ACCESS_KEY_ID").context("AWS_ACCESS_KEY_ID")?,
        secret_access_key: text(&s, "AWS_SECRET_ACCESS_KEY").context("AWS_SECRET_ACCESS_KEY")?,
    })
}

/// Every SES credential the resource delivers is the one of `key`: user names are its id, and
/// passwords are what AWS's derivation makes of its secret for each entry's region.
async fn assert_smtp_credentials_of(f: &Fixture, key: &KeyPair) -> anyhow::Result<()> {
    let relay = f.secrets.get("mail-relay").await?;
    assert_eq!(text(&relay, "SMTP_USERNAME").as_deref(), Some(key.access_key_id.as_str()));
    let want = python_password(&key.secret_access_key, "eu-west-1")?;
    assert_eq!(text(&relay, "SMTP_PASSWORD"), Some(want), "SMTP_PASSWORD of {}", key.access_key_id);
    let conf = f.secrets.get("postfix-sasl").await?;
    let want = format!(
        "[email-smtp.us-east-1.amazonaws.com]:587 {}:{}\n",
        key.access_key_id,
        python_password(&key.secret_access_key, "us-east-1")?
    );
    assert_eq!(text(&conf, "sasl_passwd"), Some(want));
    Ok(())
}

fn spec(user: &str) -> serde_json::Value {
    json!({
        "userName": user,
        "secrets": [
            {"name": "app-aws"},
            {"name": "mail-relay", "format": "sesSmtp", "region": "eu-west-1"},
            {"name": "postfix-sasl", "format": "template", "region": "us-east-1", "template": {
                "sasl_passwd": "[email-smtp.us-east-1.amazonaws.com]:587 {{ .AccessKeyId }}:{{ .SesSmtpPassword }}\n"}},
        ],
        "retirement": {"deleteAfter": "0s"},
    })
}

#[tokio::test]
async fn ses_smtp_credentials_follow_each_rotation() -> anyhow::Result<()> {
    let f = Fixture::new("ses").await?;
    let deploys: Api<Deployment> = Api::namespaced(f.env.kube.clone(), &f.ns);
    deploys.create(&PostParams::default(), &deployment("relay", 1, "mail-relay")?).await?;
    f.create("mail", spec(&f.user)).await?;
    let _op = f.operator().await?;

    let first = wait_ikr(&f.ikrs, "mail", "Ready after bootstrap", |o| {
        phase(o) == Phase::Idle && condition(o, "Ready").is_some_and(|c| c.0 == "True")
    })
    .await?;
    let first = active_key(&first).context("activeKey")?;
    let key = env_key(&f.secrets).await?;
    assert_eq!(key.access_key_id, first);
    assert_smtp_credentials_of(&f, &key).await?;

    f.rotate("mail", "1").await?;
    let rotated = wait_ikr(&f.ikrs, "mail", "one rotation completed", |o| {
        o.status.as_ref().is_some_and(|s| s.rotations == 1 && s.phase == Phase::Idle)
    })
    .await?;
    let second = active_key(&rotated).context("activeKey")?;
    assert_ne!(second, first);
    assert_eq!(
        f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(),
        std::slice::from_ref(&second),
        "old key deleted"
    );
    let key = env_key(&f.secrets).await?;
    assert_eq!(key.access_key_id, second);
    // The secret the passwords derive from is the verified key itself.
    let arn = f.env.caller_arn(&key, &f.env.moto_url).await?.context("the new key does not authenticate")?;
    assert!(arn.ends_with(&format!("user/{}", f.user)), "{arn}");
    assert_smtp_credentials_of(&f, &key).await?;

    // The relay, which reads the SMTP credentials from its environment, runs on the new key.
    eventually("relay restarted onto the new key", WAIT, || async {
        let d = deploys.get("relay").await?;
        let stamped = d
            .spec
            .and_then(|s| s.template.metadata)
            .and_then(|m| m.annotations)
            .and_then(|a| a.get("rekey.dev/access-key-id").cloned());
        Ok(if stamped.as_deref() == Some(second.as_str()) { Ok(()) } else { Err(format!("{stamped:?}")) })
    })
    .await
}

/// The common case: a mail relay's IAM user whose key lives only as SMTP credentials. Nothing can
/// be copied back out of them, so every rotation is a fresh key, staged and verified first.
#[tokio::test]
async fn a_resource_with_only_smtp_credentials_rotates() -> anyhow::Result<()> {
    let f = Fixture::new("ses-only").await?;
    f.create(
        "relay",
        json!({"userName": f.user, "secrets": [{"name": "smtp", "format": "sesSmtp", "region": "eu-central-1",
            "usernameKey": "user", "passwordKey": "password"}], "retirement": {"deleteAfter": "0s"}}),
    )
    .await?;
    let _op = f.operator().await?;
    let held = |o: &rekey::api::IamKeyRotation| phase(o) == Phase::Idle && active_key(o).is_some();
    let first = active_key(&wait_ikr(&f.ikrs, "relay", "bootstrapped", held).await?).context("activeKey")?;
    let before = f.secrets.get("smtp").await?;
    assert_eq!(text(&before, "user").as_deref(), Some(first.as_str()));

    f.rotate("relay", "1").await?;
    let rotated =
        wait_ikr(&f.ikrs, "relay", "rotated", |o| held(o) && o.status.as_ref().is_some_and(|s| s.rotations == 1))
            .await?;
    let second = active_key(&rotated).context("activeKey")?;
    assert_ne!(second, first);
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), std::slice::from_ref(&second));
    let after = f.secrets.get("smtp").await?;
    assert_eq!(text(&after, "user").as_deref(), Some(second.as_str()));
    let password = text(&after, "password").context("password")?;
    assert_ne!(Some(&password), text(&before, "password").as_ref(), "a new password with the new key");
    // AWS's SMTP password shape: base64 of the version byte 0x04 and a SHA-256 HMAC.
    assert!(password.len() == 44 && password.starts_with('B'), "{password}");
    Ok(())
}
