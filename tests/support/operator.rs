//! The operator as the tests run it: the real `rekey` binary, a process of its own.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use rekey_testenv::env::eventually;

use super::{CLUSTER, WAIT};

/// The operator binary, running as a process of its own against the test environment.
pub struct Operator {
    child: tokio::process::Child,
    pub log: PathBuf,
    /// Where this process's lines start in `log` (shared by the operators of one namespace).
    log_start: usize,
    /// Base URL of its /metrics, /healthz and /readyz.
    pub http: String,
}

impl Operator {
    pub async fn start(ns: &str, extra_env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_watching(ns, &[ns], extra_env).await
    }

    /// An operator that watches `watched` (its Lease and log are `ns`'s).
    pub async fn start_watching(ns: &str, watched: &[&str], extra_env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("operator-{ns}.log"));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let log_start = file.metadata()?.len() as usize;
        // A free loopback port for this process's metrics and health server.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_rekey"));
        cmd.env("REKEY_METRICS_ADDRESS", format!("127.0.0.1:{port}"));
        cmd.args(["run", "--cluster-name", CLUSTER, "--namespace", &watched.join(",")])
            .env("RUST_LOG", std::env::var("REKEY_TEST_OPERATOR_LOG").unwrap_or_else(|_| "info".into()))
            // One Lease per test namespace: operators of different tests never wait for each other.
            .env("REKEY_LEASE_NAMESPACE", ns)
            .env("REKEY_LEASE_NAME", "rekey")
            .env("REKEY_LEASE_DURATION_SECONDS", "6")
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("start the operator")?;
        Ok(Self { child, log, log_start, http: format!("http://127.0.0.1:{port}") })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, as an OOM kill or a node loss would.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGTERM, as the kubelet sends when the pod is deleted or rolled.
    pub async fn terminate(&self) -> anyhow::Result<()> {
        let pid = self.pid().context("already exited")?;
        let ok = tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?.success();
        anyhow::ensure!(ok, "kill -TERM {pid}");
        Ok(())
    }

    /// What this process has logged so far.
    pub fn output(&self) -> anyhow::Result<String> {
        let bytes = std::fs::read(&self.log)?;
        Ok(String::from_utf8_lossy(bytes.get(self.log_start..).unwrap_or_default()).into_owned())
    }

    /// Waits until this process has logged `needle`.
    pub async fn logged(&self, needle: &str) -> anyhow::Result<()> {
        eventually(&format!("operator log shows {needle:?}"), WAIT, || async {
            Ok(if self.output()?.contains(needle) { Ok(()) } else { Err("not yet".to_owned()) })
        })
        .await
    }

    /// Waits for the process to exit (a failpoint ends it), returning its exit code.
    pub async fn exited(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let status = tokio::time::timeout(timeout, self.child.wait()).await.context("operator did not exit")??;
        Ok(status.code())
    }
}
