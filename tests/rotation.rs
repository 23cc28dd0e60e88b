//! The rotation lifecycle end to end, on the real control plane, moto and the simulated kubelet.

mod support;

use std::collections::BTreeMap;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rekey::api::IamKeyRotation;
use rekey_testenv::creds::{KeyPair, parse_credentials_text};
use rekey_testenv::env::{TestEnv, eventually};
use serde_json::json;
use support::*;

fn text(s: &Secret, key: &str) -> Option<String> {
    s.data.as_ref()?.get(key).and_then(|v| String::from_utf8(v.0.clone()).ok())
}

/// The key pair each target Secret delivers, by Secret name.
async fn delivered(env: &TestEnv, ns: &str) -> anyhow::Result<BTreeMap<String, KeyPair>> {
    let api: Api<Secret> = Api::namespaced(env.kube.clone(), ns);
    let mut out = BTreeMap::new();
    if let Some(s) = api.get_opt("env-creds").await?
        && let (Some(id), Some(secret)) = (text(&s, "AWS_ACCESS_KEY_ID"), text(&s, "AWS_SECRET_ACCESS_KEY"))
    {
        out.insert("env-creds".into(), KeyPair { access_key_id: id, secret_access_key: secret });
    }
    for (name, key) in [("file-creds", "credentials"), ("tmpl-creds", "config.json")] {
        if let Some(s) = api.get_opt(name).await?
            && let Some(k) = text(&s, key).and_then(|t| parse_credentials_text(&t).into_iter().next())
        {
            out.insert(name.into(), k);
        }
    }
    Ok(out)
}

fn spec(user: &str) -> serde_json::Value {
    json!({
        "userName": user,
        "secrets": [
            {"name": "env-creds"},
            {"name": "file-creds", "format": "credentialsFile"},
            {"name": "tmpl-creds", "format": "template", "template": {
                "config.json": "{\"accessKeyId\": \"{{ .AccessKeyId }}\", \"secretAccessKey\": \"{{ .SecretAccessKey }}\", \"user\": \"{{ .UserName }}\"}"}},
        ],
        "retirement": {"deleteAfter": "0s"},
    })
}

async fn get(api: &Api<IamKeyRotation>, name: &str) -> anyhow::Result<IamKeyRotation> {
    Ok(api.get(name).await?)
}

#[tokio::test]
async fn bootstrap_then_on_demand_rotation_with_a_deployment() -> anyhow::Result<()> {
    let env = TestEnv::get().await?;
    ensure_crd(&env).await?;
    let ns = env.namespace("rot").await?;
    let user = consenting_user(&env, "rot", &ns).await?;
    let deploys: Api<Deployment> = Api::namespaced(env.kube.clone(), &ns);
    deploys.create(&PostParams::default(), &deployment("app", 2, "env-creds")?).await?;
    let api: Api<IamKeyRotation> = Api::namespaced(env.kube.clone(), &ns);
    api.create(&PostParams::default(), &ikr("billing", spec(&user))?).await?;
    let _op = Operator::start(&ns, &[]).await?;

    // 1. Bootstrap: one verified key in every Secret format, Ready, scheduled.
    let obj = eventually("Ready after bootstrap", WAIT, || async {
        let o = get(&api, "billing").await?;
        let idle = o.status.as_ref().is_some_and(|s| s.phase == rekey::api::Phase::Idle);
        Ok(if idle && condition(&o, "Ready").map(|c| c.0) == Some("True".into()) {
            Ok(o)
        } else {
            Err(format!("{:?}", o.status.map(|s| (s.phase, s.conditions))))
        })
    })
    .await?;
    let st = obj.status.clone().context("status")?;
    let first = st.active_key.clone().context("activeKey")?;
    let keys = env.keys(&user).await?;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys.get(&first.access_key_id).map(String::as_str), Some("Active"));
    let got = delivered(&env, &ns).await?;
    assert_eq!(got.len(), 3, "every format delivered a key: {got:?}");
    for (secret, k) in &got {
        assert_eq!(k.access_key_id, first.access_key_id, "{secret}");
        let arn = env.caller_arn(k, &env.moto_url).await?.with_context(|| format!("{secret} does not authenticate"))?;
        assert!(arn.ends_with(&format!("user/{user}")), "{arn}");
    }
    let created = first.created_at.clone().context("createdAt")?.0;
    let next = st.next_rotation_time.clone().context("nextRotationTime")?.0;
    // maxKeyAge 90d - rotateBefore 10d, plus the resource's spread (up to half of rotateBefore).
    let after = next.duration_since(created).as_secs();
    assert!((80 * 86_400..85 * 86_400).contains(&after), "nextRotationTime {next} is {after} s after {created}");
    let tags = env.iam.list_user_tags().user_name(&user).send().await?;
    let claim = tags.tags().iter().find(|t| t.key() == first.access_key_id).map(|t| t.value().to_owned());
    assert_eq!(claim, Some(format!("rekey:{CLUSTER}/{ns}/billing")));

    // 2. On-demand rotation via the annotation.
    let annotate = |v: &str| json!({"metadata": {"annotations": {"rekey.dev/rotate": v}}});
    api.patch("billing", &PatchParams::default(), &Patch::Merge(&annotate("1"))).await?;
    let obj = eventually("one rotation completed", WAIT, || async {
        let o = get(&api, "billing").await?;
        let s = o.status.clone().unwrap_or_default();
        Ok(if s.rotations == 1 && s.phase == rekey::api::Phase::Idle {
            Ok(o)
        } else {
            Err(format!("{:?} {}", s.phase, s.rotations))
        })
    })
    .await?;
    let st = obj.status.clone().context("status")?;
    let second = st.active_key.clone().context("activeKey")?;
    assert_ne!(second.access_key_id, first.access_key_id);
    let keys = env.keys(&user).await?;
    assert_eq!(keys.keys().cloned().collect::<Vec<_>>(), vec![second.access_key_id.clone()], "old key deleted");
    for (secret, k) in delivered(&env, &ns).await? {
        assert_eq!(k.access_key_id, second.access_key_id, "{secret}");
    }
    assert_eq!(st.last_rotate_request.as_deref(), Some("1"));
    assert_eq!(st.history.last().map(|h| h.outcome), Some(rekey::api::HistoryOutcome::Completed));
    // The Deployment runs on the new key, all pods Ready (the kubelet checks the key).
    eventually("deployment on the new key", WAIT, || async {
        let d = deploys.get("app").await?;
        let stamped = d
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get("rekey.dev/access-key-id"))
            .cloned();
        let ready = d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
        Ok(if stamped.as_deref() == Some(&second.access_key_id) && ready == 2 {
            Ok(())
        } else {
            Err(format!("{stamped:?} ready={ready}"))
        })
    })
    .await?;

    // 3. The same value again does not rotate: a spec change makes rekey look, and nothing happens.
    api.patch("billing", &PatchParams::default(), &Patch::Merge(&annotate("1"))).await?;
    let bump = json!({"spec": {"workloads": {"rolloutTimeout": "11m"}}});
    let generation = api.patch("billing", &PatchParams::default(), &Patch::Merge(&bump)).await?.metadata.generation;
    eventually("new generation observed", WAIT, || async {
        let o = get(&api, "billing").await?;
        let s = o.status.clone().unwrap_or_default();
        Ok(if s.observed_generation == generation { Ok(s) } else { Err(format!("{:?}", s.observed_generation)) })
    })
    .await
    .map(|s| assert_eq!((s.rotations, s.phase), (1, rekey::api::Phase::Idle)))?;
    Ok(())
}
