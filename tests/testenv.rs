//! The test environment itself works: workloads roll out through the real controllers and the
//! simulated kubelet, pods are Ready only while the key they hold works, and the IAM emulator
//! enforces signatures. Every later integration test stands on these facts.

use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use rekey_testenv::creds::KeyPair;
use rekey_testenv::env::{TestEnv, eventually};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);

fn deployment(name: &str, replicas: i32, pod_spec: serde_json::Value) -> anyhow::Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
        }
    }))?)
}

fn env_pod_spec(secret: &str) -> serde_json::Value {
    json!({"containers": [{"name": "app", "image": "app:1", "envFrom": [{"secretRef": {"name": secret}}]}]})
}

fn key_secret(name: &str, key: &KeyPair) -> anyhow::Result<Secret> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "stringData": {"AWS_ACCESS_KEY_ID": key.access_key_id, "AWS_SECRET_ACCESS_KEY": key.secret_access_key},
    }))?)
}

/// `kubectl rollout status` rules: the controller saw the newest spec and every replica is
/// updated, available, and no old one is left.
async fn rolled_out(api: &Api<Deployment>, name: &str) -> anyhow::Result<Result<(), String>> {
    let d = api.get(name).await?;
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let st = d.status.clone().unwrap_or_default();
    let done = st.observed_generation == d.metadata.generation
        && st.updated_replicas == Some(want)
        && st.replicas == Some(want)
        && st.available_replicas == Some(want);
    Ok(if done { Ok(()) } else { Err(format!("{st:?}")) })
}

/// Whether the app has pods and every one of them has Ready == `want`.
async fn all_pods(env: &TestEnv, ns: &str, app: &str, want: bool) -> anyhow::Result<Result<(), String>> {
    let pods = pods_ready(env, ns, app).await?;
    Ok(if !pods.is_empty() && pods.iter().all(|(_, r)| *r == want) { Ok(()) } else { Err(format!("{pods:?}")) })
}

/// Ready flag of every pod of the app, by pod name.
async fn pods_ready(env: &TestEnv, ns: &str, app: &str) -> anyhow::Result<Vec<(String, bool)>> {
    let pods: Api<Pod> = Api::namespaced(env.kube.clone(), ns);
    let list = pods.list(&ListParams::default().labels(&format!("app={app}"))).await?;
    Ok(list
        .items
        .iter()
        .map(|p| {
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .is_some_and(|c| c.status == "True");
            (p.metadata.name.clone().unwrap_or_default(), ready)
        })
        .collect())
}

#[tokio::test]
async fn deployment_rolls_out_through_the_real_controllers_and_the_simulated_kubelet() -> anyhow::Result<()> {
    let env = TestEnv::get().await?;
    let ns = env.namespace("rollout").await?;
    let api: Api<Deployment> = Api::namespaced(env.kube.clone(), &ns);
    let spec = json!({"containers": [{"name": "app", "image": "app:1"}]});
    api.create(&PostParams::default(), &deployment("web", 2, spec)?).await?;
    eventually("first rollout", WAIT, || rolled_out(&api, "web")).await?;

    // A template change rolls every pod; the old ones finish terminating.
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {"restarted": "1"}}}}});
    api.patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    eventually("second rollout", WAIT, || rolled_out(&api, "web")).await?;
    eventually("old pods gone", WAIT, || async {
        let pods: Api<Pod> = Api::namespaced(env.kube.clone(), &ns);
        let list = pods.list(&ListParams::default().labels("app=web")).await?;
        let stale: Vec<String> = list
            .items
            .iter()
            .filter(|p| {
                p.metadata.annotations.as_ref().and_then(|a| a.get("restarted")).map(String::as_str) != Some("1")
            })
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        Ok(if stale.is_empty() && list.items.len() == 2 { Ok(()) } else { Err(format!("pods: {}", list.items.len())) })
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn moto_authenticates_a_new_key_and_rejects_a_wrong_secret() -> anyhow::Result<()> {
    let env = TestEnv::get().await?;
    let user = env.create_user("auth").await?;
    let key = env.create_key(&user).await?;
    let arn = env.caller_arn(&key, &env.proxy_url).await?.context("new key was rejected")?;
    assert!(arn.ends_with(&format!(":user/{user}")), "{arn}");

    let wrong = KeyPair { secret_access_key: format!("{}x", key.secret_access_key), ..key.clone() };
    assert_eq!(env.caller_arn(&wrong, &env.proxy_url).await?, None, "a wrong secret authenticated");
    let unknown = KeyPair { access_key_id: "AKIAIOSFODNN7EXAMPLE".into(), ..key };
    assert_eq!(env.caller_arn(&unknown, &env.moto_url).await?, None, "an unknown key authenticated");

    // The proxy saw the two calls sent through it.
    let stats = env.proxy_stats().await?;
    let ok = stats["calls"]["sts:GetCallerIdentity"]["ok"].as_u64().unwrap_or(0);
    assert!(ok >= 1, "{stats}");
    Ok(())
}

#[tokio::test]
async fn fault_proxy_injects_throttling_and_lost_answers() -> anyhow::Result<()> {
    let env = TestEnv::get().await?;
    let user = env.create_user("faults").await?;
    let operator = aws_sdk_iam::Client::from_conf(
        aws_sdk_iam::config::Builder::from(&env.admin_sdk)
            .endpoint_url(&env.proxy_url)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .build(),
    );
    // A 5xx after forwarding: the key exists although the caller saw an error.
    env.proxy_control("fail-next", json!({"action": "iam:CreateAccessKey", "fault": "error_after"})).await?;
    let err = operator.create_access_key().user_name(&user).send().await.expect_err("fault not injected");
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(500));
    assert_eq!(env.keys(&user).await?.len(), 1, "the forwarded CreateAccessKey did not take effect");

    env.proxy_control("fail-next", json!({"action": "iam:ListAccessKeys", "fault": "throttle"})).await?;
    let err = operator.list_access_keys().user_name(&user).send().await.expect_err("fault not injected");
    assert_eq!(err.as_service_error().and_then(|e| e.meta().code()), Some("Throttling"));
    // One-shot: the next call goes through.
    assert_eq!(operator.list_access_keys().user_name(&user).send().await?.access_key_metadata().len(), 1);
    Ok(())
}

#[tokio::test]
async fn pod_is_ready_only_while_its_env_key_is_active_and_keeps_the_key_it_started_with() -> anyhow::Result<()> {
    let env = TestEnv::get().await?;
    let ns = env.namespace("podkey").await?;
    let user = env.create_user("podkey").await?;
    let key = env.create_key(&user).await?;
    let secrets: Api<Secret> = Api::namespaced(env.kube.clone(), &ns);
    secrets.create(&PostParams::default(), &key_secret("creds", &key)?).await?;
    let api: Api<Deployment> = Api::namespaced(env.kube.clone(), &ns);
    api.create(&PostParams::default(), &deployment("app", 1, env_pod_spec("creds"))?).await?;
    eventually("rollout on a working key", WAIT, || rolled_out(&api, "app")).await?;

    env.set_key_status(&user, &key.access_key_id, false).await?;
    eventually("pod NotReady once its key is Inactive", WAIT, || all_pods(&env, &ns, "app", false)).await?;
    env.set_key_status(&user, &key.access_key_id, true).await?;
    eventually("pod Ready again once its key is Active", WAIT, || all_pods(&env, &ns, "app", true)).await?;

    // The Secret moves to a new key and the old one is deleted, but nobody restarted the pod:
    // its environment still holds the old key, so it breaks.
    let new = env.create_key(&user).await?;
    secrets.replace("creds", &PostParams::default(), &key_secret("creds", &new)?).await?;
    env.iam.delete_access_key().user_name(&user).access_key_id(&key.access_key_id).send().await?;
    eventually("un-restarted pod breaks on its deleted key", WAIT, || all_pods(&env, &ns, "app", false)).await?;

    // A restart picks up the new key.
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {"restarted": "1"}}}}});
    api.patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    eventually("restarted pods on the new key", WAIT, || rolled_out(&api, "app")).await?;
    eventually("only Ready pods left", WAIT, || all_pods(&env, &ns, "app", true)).await?;
    Ok(())
}

#[tokio::test]
async fn pod_reading_a_credentials_file_follows_the_file() -> anyhow::Result<()> {
    let env = TestEnv::get().await?;
    let ns = env.namespace("podfile").await?;
    let user = env.create_user("podfile").await?;
    let key = env.create_key(&user).await?;
    let ini = |k: &KeyPair| {
        format!("[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n", k.access_key_id, k.secret_access_key)
    };
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "creds"}, "stringData": {"credentials": ini(&key)}}))?;
    let secrets: Api<Secret> = Api::namespaced(env.kube.clone(), &ns);
    secrets.create(&PostParams::default(), &secret).await?;
    let spec = json!({
        "containers": [{"name": "app", "image": "app:1",
            "volumeMounts": [{"name": "aws", "mountPath": "/aws"}]}],
        "volumes": [{"name": "aws", "projected": {"sources": [{"secret": {"name": "creds"}}]}}],
    });
    let api: Api<Deployment> = Api::namespaced(env.kube.clone(), &ns);
    api.create(&PostParams::default(), &deployment("app", 1, spec)?).await?;
    eventually("rollout on a working file", WAIT, || rolled_out(&api, "app")).await?;

    // A file is re-read: a broken key in it breaks the running pod without a restart...
    let broken = KeyPair { secret_access_key: "wrong".into(), ..key.clone() };
    let patch = json!({"stringData": {"credentials": ini(&broken)}});
    secrets.patch("creds", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    eventually("pod NotReady on a broken file", WAIT, || all_pods(&env, &ns, "app", false)).await?;
    // ...and a new working key in it heals the pod, also without a restart.
    let new = env.create_key(&user).await?;
    let patch = json!({"stringData": {"credentials": ini(&new)}});
    secrets.patch("creds", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    eventually("pod Ready on the new file", WAIT, || all_pods(&env, &ns, "app", true)).await?;
    Ok(())
}

#[tokio::test]
async fn statefulset_and_daemonset_roll_out_too() -> anyhow::Result<()> {
    use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
    let env = TestEnv::get().await?;
    let ns = env.namespace("stsds").await?;
    let pod = |app: &str| json!({"metadata": {"labels": {"app": app}}, "spec": {"containers": [{"name": "app", "image": "app:1"}]}});
    let sts: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "db"},
        "spec": {"replicas": 2, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}}, "template": pod("db")}
    }))?;
    let ds: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "agent"},
        "spec": {"selector": {"matchLabels": {"app": "agent"}}, "template": pod("agent")}
    }))?;
    let sts_api: Api<StatefulSet> = Api::namespaced(env.kube.clone(), &ns);
    let ds_api: Api<DaemonSet> = Api::namespaced(env.kube.clone(), &ns);
    sts_api.create(&PostParams::default(), &sts).await?;
    ds_api.create(&PostParams::default(), &ds).await?;
    let restart = json!({"spec": {"template": {"metadata": {"annotations": {"restarted": "1"}}}}});
    for round in 0..2 {
        eventually(&format!("statefulset rollout {round}"), WAIT, || async {
            let s = sts_api.get("db").await?;
            let st = s.status.clone().unwrap_or_default();
            let done = st.observed_generation == s.metadata.generation
                && st.ready_replicas == Some(2)
                && st.updated_replicas == Some(2)
                && st.current_revision == st.update_revision;
            Ok(if done { Ok(()) } else { Err(format!("{st:?}")) })
        })
        .await?;
        eventually(&format!("daemonset rollout {round}"), WAIT, || async {
            let d = ds_api.get("agent").await?;
            let st = d.status.clone().unwrap_or_default();
            let done = st.observed_generation == d.metadata.generation
                && st.desired_number_scheduled == 1
                && st.updated_number_scheduled == Some(1)
                && st.number_available == Some(1);
            Ok(if done { Ok(()) } else { Err(format!("{st:?}")) })
        })
        .await?;
        sts_api.patch("db", &PatchParams::default(), &Patch::Merge(&restart)).await?;
        ds_api.patch("agent", &PatchParams::default(), &Patch::Merge(&restart)).await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_job_pod_marked_to_exit_completes_the_job() -> anyhow::Result<()> {
    use k8s_openapi::api::batch::v1::Job;
    let env = TestEnv::get().await?;
    let ns = env.namespace("job").await?;
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": "once"},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": {"annotations": {"sim.rekey.dev/exit-after-seconds": "1"}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "job", "image": "job:1"}]}}}
    }))?;
    let api: Api<Job> = Api::namespaced(env.kube.clone(), &ns);
    api.create(&PostParams::default(), &job).await?;
    eventually("job succeeded", WAIT, || async {
        let st = api.get("once").await?.status.unwrap_or_default();
        Ok(if st.succeeded == Some(1) { Ok(()) } else { Err(format!("{st:?}")) })
    })
    .await?;
    Ok(())
}
