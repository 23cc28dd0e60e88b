//! Deletion policies, humans acting beside rekey, and bad input.

mod support;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use rekey::api::Phase;
use rekey_testenv::env::eventually;
use serde_json::json;
use support::*;

fn rotate(v: &str) -> serde_json::Value {
    json!({"metadata": {"annotations": {"rekey.dev/rotate": v}}})
}

async fn events_with_reason(f: &Fixture, reason: &str) -> anyhow::Result<usize> {
    let list = Api::<k8s_openapi::api::events::v1::Event>::namespaced(f.env.kube.clone(), &f.ns)
        .list(&Default::default())
        .await?;
    Ok(list.items.iter().filter(|e| e.reason.as_deref() == Some(reason)).count())
}

#[tokio::test]
async fn retain_mid_rotation_keeps_keys_and_secrets_and_drops_only_the_staging_secret() -> anyhow::Result<()> {
    let f = Fixture::new("retain").await?;
    Api::<Deployment>::namespaced(f.env.kube.clone(), &f.ns)
        .create(&PostParams::default(), &never_healthy("web")?)
        .await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}]})).await?;
    let _op = f.operator().await?;
    // The bootstrap itself stalls in RollingOut: the Deployment never becomes healthy.
    let o = wait_ikr(&f.ikrs, "app", "rolling out", |o| phase(o) == Phase::RollingOut).await?;
    let key = active_key(&o).context("key")?;
    f.ikrs.delete("app", &DeleteParams::default()).await?;
    f.gone("app").await?;
    assert_eq!(f.env.keys(&f.user).await?.get(&key).map(String::as_str), Some("Active"), "key retained");
    let s = f.secrets.get("creds").await?;
    assert!(s.data.as_ref().is_some_and(|d| d.contains_key("AWS_SECRET_ACCESS_KEY")), "Secret retained");
    assert!(s.metadata.owner_references.is_none(), "a target Secret is never owned by the resource");
    assert!(f.secrets.get_opt("app-rekey-staging").await?.is_none(), "staging Secret removed");
    Ok(())
}

#[tokio::test]
async fn delete_policy_mid_rotation_deletes_the_keys_rekey_created_and_only_the_data_it_wrote() -> anyhow::Result<()> {
    let f = Fixture::new("delpol").await?;
    let other: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(json!({"metadata": {"name": "creds"}, "stringData": {"OTHER": "keep me"}}))?;
    f.secrets.create(&PostParams::default(), &other).await?;
    Api::<Deployment>::namespaced(f.env.kube.clone(), &f.ns)
        .create(&PostParams::default(), &never_healthy("web")?)
        .await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "deletionPolicy": "Delete"})).await?;
    let _op = f.operator().await?;
    wait_ikr(&f.ikrs, "app", "rolling out", |o| phase(o) == Phase::RollingOut).await?;
    f.ikrs.delete("app", &DeleteParams::default()).await?;
    f.gone("app").await?;
    assert!(f.env.keys(&f.user).await?.is_empty(), "the created key was deleted");
    let s = f.secrets.get("creds").await?;
    let keys: Vec<String> = s.data.unwrap_or_default().into_keys().collect();
    assert_eq!(keys, vec!["OTHER".to_owned()], "only rekey's keys were removed");
    assert!(f.secrets.get_opt("app-rekey-staging").await?.is_none(), "staging Secret removed");
    Ok(())
}

#[tokio::test]
async fn deleting_the_namespace_is_not_blocked_even_when_the_user_is_gone() -> anyhow::Result<()> {
    let f = Fixture::new("nsdel").await?;
    f.create("app", json!({"userName": "no-such-user-anywhere", "secrets": [{"name": "creds"}]})).await?;
    let _op = f.operator().await?;
    wait_ikr(&f.ikrs, "app", "UserNotFound", |o| is_true(o, "Stalled", "UserNotFound")).await?;
    let nss: Api<Namespace> = Api::all(f.env.kube.clone());
    nss.delete(&f.ns, &DeleteParams::default()).await?;
    eventually("namespace deleted", WAIT, || async {
        Ok(if nss.get_opt(&f.ns).await?.is_none() { Ok(()) } else { Err("terminating".into()) })
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_human_reactivating_the_old_key_during_the_soak_parks_the_rotation() -> anyhow::Result<()> {
    let f = Fixture::new("human").await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deleteAfter": "20s"}}))
        .await?;
    let _op = f.operator().await?;
    let o = wait_ikr(&f.ikrs, "app", "bootstrapped", |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    let old = active_key(&o).context("key")?;
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&rotate("1"))).await?;
    wait_ikr(&f.ikrs, "app", "soaking", |o| phase(o) == Phase::Soaking).await?;
    f.env.set_key_status(&f.user, &old, true).await?;
    wait_ikr(&f.ikrs, "app", "parked", |o| is_true(o, "Stalled", "ParkedAfterRollback")).await?;
    let keys = f.env.keys(&f.user).await?;
    assert_eq!(keys.get(&old).map(String::as_str), Some("Active"), "an Active key is never deleted: {keys:?}");
    assert_eq!(keys.len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_human_deactivating_the_new_key_never_leaves_the_user_without_an_active_key() -> anyhow::Result<()> {
    let f = Fixture::new("newoff").await?;
    let key = f.env.create_key(&f.user).await?;
    f.secrets.create(&PostParams::default(), &key_secret("creds", &key)?).await?;
    Api::<Deployment>::namespaced(f.env.kube.clone(), &f.ns)
        .create(&PostParams::default(), &deployment("web", 1, "creds")?)
        .await?;
    f.create(
        "app",
        json!({"userName": f.user, "secrets": [{"name": "creds"}], "retirement": {"deactivateAfter": "15s"}}),
    )
    .await?;
    let _op = f.operator().await?;
    wait_ikr(&f.ikrs, "app", "adopted", |o| active_key(o).is_some()).await?;
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&rotate("1"))).await?;
    let o = wait_ikr(&f.ikrs, "app", "deactivating", |o| phase(o) == Phase::Deactivating).await?;
    let new = active_key(&o).context("new key")?;
    f.env.set_key_status(&f.user, &new, false).await?;
    // The pods on the new key break: rekey either waits for them (the fresh census before
    // deactivating finds the rollout incomplete) or, if it tries, its fresh IAM list refuses.
    eventually("the unsafe deactivation held back", WAIT, || async {
        let refused = events_with_reason(&f, "SafetyCheckFailed").await? > 0;
        let o = f.ikrs.get("app").await?;
        let waiting = message(&o, "Rotating").is_some_and(|m| m.contains("waiting for the rollout"));
        Ok(if refused || waiting { Ok(()) } else { Err("neither waiting nor refused yet".into()) })
    })
    .await?;
    let o = f.ikrs.get("app").await?;
    assert_eq!(phase(&o), Phase::Deactivating, "the old key is not retired");
    let keys = f.env.keys(&f.user).await?;
    assert_eq!(keys.get(&key.access_key_id).map(String::as_str), Some("Active"), "{keys:?}");
    Ok(())
}

#[tokio::test]
async fn the_schema_rejects_what_it_can_express() -> anyhow::Result<()> {
    let f = Fixture::new("schema").await?;
    let ok = json!({"userName": "u", "secrets": [{"name": "s"}]});
    let with = |path: &[&str], v: serde_json::Value| {
        let mut spec = ok.clone();
        let mut cur = &mut spec;
        for p in &path[..path.len() - 1] {
            cur = cur.get_mut(*p).expect("path");
        }
        cur[path[path.len() - 1]] = v;
        spec
    };
    let bad = vec![
        ("missing userName", json!({"secrets": [{"name": "s"}]})),
        ("user name with a space", with(&["userName"], json!("bad name"))),
        ("malformed duration", with(&["maxKeyAge"], json!("90x"))),
        ("negative duration", with(&["rotateBefore"], json!("-1d"))),
        ("no Secrets", with(&["secrets"], json!([]))),
        (
            "17 Secrets",
            with(&["secrets"], json!((0..17).map(|i| json!({"name": format!("s{i}")})).collect::<Vec<_>>())),
        ),
        ("invalid Secret name", with(&["secrets"], json!([{"name": "Bad_Name"}]))),
        ("unknown format", with(&["secrets"], json!([{"name": "s", "format": "yaml"}]))),
        ("unsupported workload kind", with(&["workloads"], json!({"targets": [{"kind": "CronJob", "name": "x"}]}))),
        ("unknown deletion policy", with(&["deletionPolicy"], json!("Purge"))),
        ("roleArn that is not an ARN", with(&["aws"], json!({"roleArn": "not-an-arn"}))),
    ];
    for (what, spec) in bad {
        let raw = json!({"apiVersion": "rekey.dev/v1alpha1", "kind": "IamKeyRotation", "metadata": {"name": "bad"}, "spec": spec});
        let res = f.ikrs.patch("bad", &PatchParams::apply("rekey-tests").dry_run(), &Patch::Apply(&raw)).await;
        match res {
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => {}
            other => panic!("{what}: expected the apiserver to reject it, got {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn cross_field_mistakes_are_refused_at_apply_and_what_only_rekey_can_judge_stalls() -> anyhow::Result<()> {
    let f = Fixture::new("judge").await?;
    // The CRD's CEL rules: `kubectl apply` (and --dry-run=server, a GitOps diff) refuses these with
    // the field and the message validate would give after apply.
    let refused = [
        (json!({"maxKeyAge": "0s"}), "spec.maxKeyAge", "maxKeyAge must be more than 0s"),
        (
            json!({"workloads": {"rolloutTimeout": "0s"}}),
            "spec.workloads.rolloutTimeout",
            "rolloutTimeout must be more than 0s",
        ),
        (
            json!({"maxKeyAge": "10d", "rotateBefore": "240h"}),
            "spec.rotateBefore",
            "rotateBefore must be less than spec.maxKeyAge",
        ),
        (json!({"maxKeyAge": "99999999999999999999d"}), "spec", "maxKeyAge"),
        (
            json!({"schedule": {"windows": [{"start": "02:00", "end": "02:00"}]}}),
            "spec.schedule.windows[0].end",
            "the window would be empty",
        ),
        (
            json!({"secrets": [{"name": "t", "format": "template", "template": {"k": "{{ .AccessKeyId }}"}}]}),
            "spec.secrets[0].template",
            "so no key would be delivered",
        ),
        (json!({"secrets": [{"name": "t", "format": "sesSmtp"}]}), "spec.secrets[0].region", "need region"),
        (
            json!({"secrets": [{"name": "t", "profile": "p"}]}),
            "spec.secrets[0].profile",
            "profile belongs to format credentialsFile",
        ),
        (
            json!({"secrets": [{"name": "t", "secretAccessKeyKey": "AWS_ACCESS_KEY_ID"}]}),
            "spec.secrets[0].secretAccessKeyKey",
            "must differ",
        ),
    ];
    for (i, (extra, field, message)) in refused.iter().enumerate() {
        let mut spec = json!({"userName": f.user, "secrets": [{"name": "creds"}]});
        for (k, v) in extra.as_object().context("object")? {
            spec[k] = v.clone();
        }
        let err = f.create(&format!("bad-{i}"), spec.clone()).await.expect_err(&format!("{spec} refused"));
        let text = format!("{err:#}");
        assert!(text.contains(field) && text.contains(message), "{spec}: {text}");
        // validate stays the backstop of every rule but the one a stray field breaks (harmless).
        if !message.contains("belongs to") {
            let parsed: rekey::api::IamKeyRotationSpec = serde_json::from_value(spec)?;
            assert!(rekey::validate::validate(&parsed).is_err(), "{message}: validate agrees");
        }
    }
    // What CEL cannot judge (a time zone's existence) is admitted and stalls with a reason.
    let tz = json!({"userName": f.user, "secrets": [{"name": "tz-creds"}],
        "schedule": {"windows": [{"start": "02:00", "end": "05:00", "timeZone": "Europe/Berln"}]}});
    f.create("bad-zone", tz).await?;
    let _op = f.operator().await?;
    let o = wait_ikr(&f.ikrs, "bad-zone", "bad-zone stalled", |o| is_true(o, "Stalled", "InvalidSpec")).await?;
    let m = message(&o, "Stalled").unwrap_or_default();
    assert!(m.contains("timeZone \"Europe/Berln\" is not an IANA time zone"), "{m}");
    assert!(f.env.keys(&f.user).await?.is_empty(), "no IAM write");
    Ok(())
}

#[tokio::test]
async fn a_target_secret_deleted_while_idle_gets_the_active_key_copied_back() -> anyhow::Result<()> {
    let f = Fixture::new("fill").await?;
    f.create("app", json!({"userName": f.user, "secrets": [{"name": "creds"}, {"name": "copy"}]})).await?;
    let _op = f.operator().await?;
    let o = wait_ikr(&f.ikrs, "app", "bootstrapped", |o| phase(o) == Phase::Idle && active_key(o).is_some()).await?;
    let key = active_key(&o).context("key")?;
    f.secrets.delete("copy", &DeleteParams::default()).await?;
    // rekey reads its Secrets at the idle resync; a spec touch makes it look now.
    let touch = json!({"metadata": {"annotations": {"touched": "1"}}});
    f.ikrs.patch("app", &PatchParams::default(), &Patch::Merge(&touch)).await?;
    let held = eventually("the deleted Secret is back", WAIT, || async {
        let s = f.secrets.get_opt("copy").await?;
        let id = s.and_then(|s| s.data).and_then(|d| d.get("AWS_ACCESS_KEY_ID").cloned());
        Ok(id.map(|v| String::from_utf8_lossy(&v.0).into_owned()).ok_or_else(|| "not yet".to_owned()))
    })
    .await?;
    assert_eq!(held, key, "the active key, copied from the Secret that still holds it");
    assert_eq!(f.env.keys(&f.user).await?.into_keys().collect::<Vec<_>>(), vec![key], "no new key was made");
    let o = f.ikrs.get("app").await?;
    assert_eq!(o.status.map(|s| s.rotations), Some(0));
    Ok(())
}
