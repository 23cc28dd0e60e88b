//! The handles integration tests use: a Kubernetes client, the IAM emulator as an administrator,
//! and the fault proxy's control API. Everything comes from the variables `scripts/testenv env`
//! prints.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::creds::KeyPair;

/// The running test environment.
#[derive(Clone)]
pub struct TestEnv {
    pub kube: kube::Client,
    /// IAM as the test administrator, straight to moto (not counted or faulted by the proxy).
    pub iam: aws_sdk_iam::Client,
    /// Administrator SDK config, straight to moto.
    pub admin_sdk: SdkConfig,
    /// Where the operator's AWS calls go (the fault proxy).
    pub proxy_url: String,
    pub moto_url: String,
    pub account_id: String,
}

fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| {
        format!(
            "{name} is not set: the test environment is not up. Run `scripts/testenv up` and \
             `eval \"$(scripts/testenv env)\"`, or use the README's test command"
        )
    })
}

impl TestEnv {
    pub async fn get() -> anyhow::Result<Self> {
        let moto_url = var("REKEY_TEST_MOTO_URL")?;
        let proxy_url = var("REKEY_TEST_PROXY_URL")?;
        let account_id = var("REKEY_TEST_ACCOUNT_ID")?;
        let admin = Credentials::new(
            var("REKEY_TEST_ADMIN_ACCESS_KEY_ID")?,
            var("REKEY_TEST_ADMIN_SECRET_ACCESS_KEY")?,
            None,
            None,
            "testenv-admin",
        );
        let admin_sdk = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(&moto_url)
            .credentials_provider(admin)
            .load()
            .await;
        let kube = kube::Client::try_default().await.context("kube client from KUBECONFIG")?;
        Ok(Self { iam: aws_sdk_iam::Client::new(&admin_sdk), admin_sdk, kube, proxy_url, moto_url, account_id })
    }

    /// A fresh namespace named after the test.
    pub async fn namespace(&self, prefix: &str) -> anyhow::Result<String> {
        let name = unique(prefix);
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
        Api::<Namespace>::all(self.kube.clone()).create(&PostParams::default(), &ns).await?;
        Ok(name)
    }

    pub async fn create_user(&self, prefix: &str) -> anyhow::Result<String> {
        let name = unique(prefix);
        self.iam.create_user().user_name(&name).send().await?;
        Ok(name)
    }

    pub async fn create_key(&self, user: &str) -> anyhow::Result<KeyPair> {
        let out = self.iam.create_access_key().user_name(user).send().await?;
        let k = out.access_key().context("no access key returned")?;
        Ok(KeyPair { access_key_id: k.access_key_id().to_owned(), secret_access_key: k.secret_access_key().to_owned() })
    }

    /// Status ("Active"/"Inactive") of every key of the user.
    pub async fn keys(&self, user: &str) -> anyhow::Result<BTreeMap<String, String>> {
        let out = self.iam.list_access_keys().user_name(user).send().await?;
        Ok(out
            .access_key_metadata()
            .iter()
            .filter_map(|m| Some((m.access_key_id()?.to_owned(), m.status()?.as_str().to_owned())))
            .collect())
    }

    pub async fn set_key_status(&self, user: &str, key_id: &str, active: bool) -> anyhow::Result<()> {
        let status =
            if active { aws_sdk_iam::types::StatusType::Active } else { aws_sdk_iam::types::StatusType::Inactive };
        self.iam.update_access_key().user_name(user).access_key_id(key_id).status(status).send().await?;
        Ok(())
    }

    /// Signs sts:GetCallerIdentity with the key, through `endpoint`. Ok(Some(arn)) when it
    /// authenticates, Ok(None) when the service rejects it.
    pub async fn caller_arn(&self, key: &KeyPair, endpoint: &str) -> anyhow::Result<Option<String>> {
        let conf = aws_sdk_sts::config::Builder::from(&self.admin_sdk)
            .endpoint_url(endpoint)
            .credentials_provider(Credentials::new(
                key.access_key_id.clone(),
                key.secret_access_key.clone(),
                None,
                None,
                "test",
            ))
            .build();
        match aws_sdk_sts::Client::from_conf(conf).get_caller_identity().send().await {
            Ok(out) => Ok(out.arn().map(str::to_owned)),
            Err(e) if e.as_service_error().is_some() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The fault proxy's counters (see scripts/faultproxy.py).
    pub async fn proxy_stats(&self) -> anyhow::Result<serde_json::Value> {
        let body = http(&self.proxy_url, "GET", "/__proxy/stats", "").await?;
        Ok(serde_json::from_str(&body)?)
    }

    /// POST a control request to the fault proxy (`faults`, `fail-next`, `reset`).
    pub async fn proxy_control(&self, what: &str, body: serde_json::Value) -> anyhow::Result<()> {
        http(&self.proxy_url, "POST", &format!("/__proxy/{what}"), &body.to_string()).await?;
        Ok(())
    }
}

/// A name unique across tests and runs: `<prefix>-<pid>-<n>`, within Kubernetes' name rules.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{prefix}-{:x}{}-{}", secs % 0x10000, std::process::id() % 1000, N.fetch_add(1, Ordering::Relaxed))
}

/// Polls `check` until it yields a value or `timeout` passes; the error names what was awaited and
/// the last thing `check` reported.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Result<T, String>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(state)) => state,
            Err(e) => format!("error: {e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// GET `path` from a loopback HTTP server; an error unless it answers 200.
pub async fn http_get(base: &str, path: &str) -> anyhow::Result<String> {
    http(base, "GET", path, "").await
}

/// A minimal HTTP/1.0 exchange with a loopback control endpoint.
async fn http(base: &str, method: &str, path: &str, body: &str) -> anyhow::Result<String> {
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let (head, body) = buf.split_once("\r\n\r\n").context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("{method} {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}
