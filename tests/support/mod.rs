//! Shared by the integration tests: the operator as a real process, the CRD, fixtures.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use rekey::api::IamKeyRotation;
use rekey_testenv::env::{TestEnv, eventually};
use serde_json::json;

pub const CLUSTER: &str = "test";
pub const WAIT: Duration = Duration::from_secs(120);

/// Installs the committed CRD (server-side apply) and waits until it is established.
pub async fn ensure_crd(env: &TestEnv) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/iamkeyrotation.yaml"))?;
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text)?;
    let api: Api<CustomResourceDefinition> = Api::all(env.kube.clone());
    api.patch("iamkeyrotations.rekey.dev", &PatchParams::apply("rekey-tests").force(), &Patch::Apply(&crd)).await?;
    eventually("CRD established", WAIT, || async {
        let c = api.get("iamkeyrotations.rekey.dev").await?;
        let ok = c
            .status
            .and_then(|s| s.conditions)
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"));
        Ok(if ok { Ok(()) } else { Err("not established".into()) })
    })
    .await
}

/// A user consenting to namespace `ns` of the test cluster.
pub async fn consenting_user(env: &TestEnv, prefix: &str, ns: &str) -> anyhow::Result<String> {
    let user = env.create_user(prefix).await?;
    let tag = aws_sdk_iam::types::Tag::builder().key(format!("rekey.dev/allow/{ns}")).value(CLUSTER).build()?;
    env.iam.tag_user().user_name(&user).tags(tag).send().await?;
    Ok(user)
}

/// The operator binary, running as a process of its own against the test environment.
pub struct Operator {
    child: tokio::process::Child,
    pub log: PathBuf,
}

impl Operator {
    pub async fn start(ns: &str, extra_env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("operator-{ns}.log"));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_rekey"));
        cmd.args(["run", "--cluster-name", CLUSTER, "--namespace", ns])
            .env("RUST_LOG", std::env::var("REKEY_TEST_OPERATOR_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("start the operator")?;
        Ok(Self { child, log })
    }

    /// SIGKILL, as an OOM kill or a node loss would.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// Waits for the process to exit (a failpoint ends it), returning its exit code.
    pub async fn exited(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let status = tokio::time::timeout(timeout, self.child.wait()).await.context("operator did not exit")??;
        Ok(status.code())
    }
}

pub fn ikr(name: &str, spec: serde_json::Value) -> anyhow::Result<IamKeyRotation> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "rekey.dev/v1alpha1", "kind": "IamKeyRotation",
        "metadata": {"name": name}, "spec": spec,
    }))?)
}

/// The status condition `type_` as (status, reason).
pub fn condition(obj: &IamKeyRotation, type_: &str) -> Option<(String, String)> {
    obj.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_).map(|c| (c.status.clone(), c.reason.clone()))
}
