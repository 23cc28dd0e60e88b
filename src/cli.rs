//! The user-facing subcommands besides `run`, with kubectl's conventions (flags, namespace
//! defaults, output formats) and documented exit codes. `args` is the command line; `connect`
//! finds the cluster; `status`, `rotate` (and retire), `check`, `audit` and `version` each do one
//! command; `output` and `audit_report` print (pure).

pub mod args;
pub mod audit;
pub mod audit_report;
pub mod check;
pub mod connect;
pub mod output;
pub mod rotate;
pub mod status;
pub mod version;

use std::process::ExitCode;

use args::Command;

/// `0.1.0 (commit 1a2b3c4d5e6f)`: the commit comes from build.rs ("unknown" without git).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("REKEY_GIT_COMMIT"), ")");

/// Exit codes, documented in docs/operations.md ("CLI").
pub mod exit {
    /// Any error: the cluster, the flags, a resource not found.
    pub const ERROR: u8 = 1;
    /// The outcome is bad: a rotation ended Degraded (for a reason only a person clears) or
    /// Stalled, `check` found rekey unhealthy, or `audit` found an uncovered key too old.
    pub const ENDED_BADLY: u8 = 2;
    /// `--wait` ran out of time.
    pub const TIMED_OUT: u8 = 3;
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("kubeconfig: {0}")]
    Config(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Ended(String),
    #[error("timed out: {0}")]
    TimedOut(String),
    #[error("unhealthy: {0}")]
    Unhealthy(String),
    #[error("{0}")]
    Aws(#[from] crate::error::Error),
    #[error("audit failed: {0}")]
    AuditFailed(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Ended(_) | CliError::Unhealthy(_) | CliError::AuditFailed(_) => exit::ENDED_BADLY,
            CliError::TimedOut(_) => exit::TIMED_OUT,
            _ => exit::ERROR,
        }
    }

    /// A 404 on a named resource says where it was looked for: the namespace may be the
    /// context's, not the one the user meant.
    pub fn about(self, name: &str, namespace: &str) -> Self {
        match self {
            CliError::Kube(kube::Error::Api(e)) if e.code == 404 => {
                CliError::NotFound(format!("iamkeyrotation {name} not found in namespace {namespace}"))
            }
            e => e,
        }
    }

    fn named(name: &str, scope: &connect::Scope, e: kube::Error) -> Self {
        match scope {
            connect::Scope::One(ns) => CliError::Kube(e).about(name, ns),
            connect::Scope::All => CliError::Kube(e),
        }
    }
}

/// Runs a client subcommand: errors go to stderr, and the exit code says what kind of end it was.
pub async fn dispatch(command: Command) -> ExitCode {
    let result = match command {
        Command::Status(a) => match connect::connect(&a.kube, None).await {
            Ok(conn) => status::run(&conn, &a).await,
            Err(e) => Err(e),
        },
        Command::Rotate(a) => match connect::connect(&a.kube, None).await {
            Ok(conn) => rotate::rotate(&conn, &a).await,
            Err(e) => Err(e),
        },
        Command::Retire(a) => match connect::connect(&a.kube, None).await {
            Ok(conn) => rotate::retire(&conn, &a).await,
            Err(e) => Err(e),
        },
        Command::Check(a) => match connect::connect(&a.kube, Some(std::time::Duration::from_secs(10))).await {
            Ok(conn) => check::run(&conn, &a).await,
            Err(e) => Err(e),
        },
        Command::Audit(a) => match connect::connect(&a.kube, None).await {
            Ok(conn) => audit::run(&conn, &a).await,
            Err(e) => Err(e),
        },
        Command::Version(a) => {
            version::run(&a).await;
            Ok(())
        }
        Command::Run(_) | Command::Crd | Command::Completion { .. } => {
            Err(CliError::Usage("not a client subcommand".into()))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rekey: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
