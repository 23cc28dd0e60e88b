#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

/// mimalloc instead of glibc malloc: after a burst of reconciles glibc kept its per-thread arenas
/// (143 MiB resident for 1,000 resources); mimalloc hands freed memory back.
#[global_allocator]
#[cfg(not(feature = "system-allocator"))]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "rekey", version, about = "Rotates AWS IAM user access keys stored in Kubernetes Secrets")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `rekey run`: the operator's flags.
#[derive(clap::Args)]
struct RunArgs {
    /// Name of this cluster: the value the consent tag rekey.dev/allow/<namespace> must carry,
    /// and part of every key's owner claim.
    #[arg(long, env = "REKEY_CLUSTER_NAME")]
    cluster_name: String,
    /// Default AWS region (IAM is global): where new keys are verified with STS, and the
    /// template's {{ .Region }}; a resource's spec.aws.region overrides it.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    region: String,
    #[arg(long, env = "REKEY_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Cap on IAM API calls per second, per AWS account (IAM throttles per account: the home
    /// account and each spec.aws.roleArn's account have a budget of their own).
    #[arg(long, env = "REKEY_AWS_CALLS_PER_SECOND", default_value = "10")]
    aws_calls_per_second: std::num::NonZeroU32,
    /// Optional cap on AWS API calls per second over all accounts together.
    #[arg(long, env = "REKEY_AWS_CALLS_PER_SECOND_TOTAL")]
    aws_calls_per_second_total: Option<std::num::NonZeroU32>,
    /// At most this many rotations in flight at once.
    #[arg(long, env = "REKEY_MAX_CONCURRENT_ROTATIONS", default_value_t = 10)]
    max_concurrent_rotations: usize,
    /// Role ARN patterns (comma-separated, `*` wildcard) that spec.aws.roleArn may name; none by default.
    #[arg(long, env = "REKEY_ALLOWED_ROLE_ARNS", value_delimiter = ',')]
    allowed_role_arns: Vec<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "REKEY_METRICS_ADDRESS", default_value = "0.0.0.0:8080")]
    metrics_address: std::net::SocketAddr,
    /// Elect a leader on a Lease so that only one replica acts (default on).
    #[arg(long, env = "REKEY_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the Lease (default: the pod's namespace, else rekey-system).
    #[arg(long, env = "REKEY_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, env = "REKEY_LEASE_NAME", default_value = "rekey")]
    lease_name: String,
    /// Seconds a leader's lock stays valid after its last renewal.
    #[arg(long, env = "REKEY_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Watch only these namespaces (comma-separated; default: every namespace). With a list,
    /// the RBAC can be a Role per namespace (deploy/namespaced/).
    #[arg(long = "namespace", env = "REKEY_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Run(RunArgs),
    /// Show IamKeyRotations: user, active key and age, phase, next rotation, last failure.
    Status {
        /// Namespace (default: all namespaces).
        #[arg(short, long)]
        namespace: Option<String>,
        name: Option<String>,
    },
    /// Request an on-demand rotation (the rekey.dev/rotate annotation).
    Rotate {
        #[arg(short, long, default_value = "default")]
        namespace: String,
        name: String,
        /// The key leaked: retire it as soon as the Secrets hold the new one, no soak.
        #[arg(long)]
        emergency: bool,
        /// Follow the rotation to its end; exit non-zero if it ends Degraded or Stalled.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// After a rollback or an uncovered consumer was fixed: retire the old key again.
    Retire {
        #[arg(short, long, default_value = "default")]
        namespace: String,
        name: String,
    },
    /// Print the IamKeyRotation CustomResourceDefinition as YAML (the source of crds/).
    Crd,
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Status { namespace, name } => cli_run(|client| async move {
            rekey::cli::status(client, namespace.as_deref(), name.as_deref()).await.map(|t| print!("{t}"))
        }),
        Command::Rotate { namespace, name, emergency, wait, timeout } => cli_run(|client| async move {
            rekey::cli::rotate(client, &namespace, &name, emergency, wait.then_some(timeout)).await
        }),
        Command::Retire { namespace, name } => {
            cli_run(|client| async move { rekey::cli::retire(client, &namespace, &name).await })
        }
        Command::Crd => match rekey::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("rekey: cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Version => {
            println!("rekey {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Run(args) => run(args),
    }
}

/// `rekey run`: refuses an unsafe environment, sets up logging, then runs the operator.
fn run(args: RunArgs) -> ExitCode {
    // The AWS SDK would log request and response bodies, new secrets included.
    if std::env::var_os("LOG_SENSITIVE_BODIES").is_some() {
        eprintln!(
            "rekey: refusing to start: LOG_SENSITIVE_BODIES is set, which makes the AWS SDK log secret access keys"
        );
        return ExitCode::FAILURE;
    }
    init_logging(args.log_format);
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(operate(args)),
        Err(e) => {
            eprintln!("rekey: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// The controller and the metrics/health server; either one ending ends the process.
async fn operate(args: RunArgs) -> ExitCode {
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build a Kubernetes client");
            return ExitCode::FAILURE;
        }
    };
    let metrics = Arc::new(rekey::metrics::Metrics::default());
    let iam = rekey::iam::AwsIam::from_env(args.aws_calls_per_second, args.aws_calls_per_second_total)
        .await
        .with_metrics(metrics.clone());
    let config = rekey::context::Config {
        cluster: args.cluster_name.clone(),
        region: args.region.clone(),
        namespaces: args.namespaces.clone(),
        max_concurrent_rotations: args.max_concurrent_rotations.max(1),
        allowed_role_arns: args.allowed_role_arns.clone(),
    };
    let ctx = Arc::new(rekey::context::Context::new(client, iam, config, metrics.clone()));
    let health = ctx.health.clone();
    let server = rekey::http::serve(args.metrics_address, health.clone(), metrics);
    let server = tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "the metrics and health server stopped");
        }
    });
    // A dead metrics server means a blind operator: treat it as fatal, like the controller.
    let server_died = async move {
        let _ = server.await;
    };
    tracing::info!("rekey controller starting");
    if !args.leader_election {
        return tokio::select! {
            _ = rekey::controller::run(ctx) => ExitCode::SUCCESS,
            _ = server_died => ExitCode::FAILURE,
        };
    }
    health.set(rekey::http::Lifecycle::Standby);
    let cfg = rekey::leader::LeaderConfig {
        namespace: args
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "rekey-system".to_owned()),
        name: args.lease_name.clone(),
        identity: std::env::var("POD_NAME").unwrap_or_else(|_| format!("rekey-{}", std::process::id())),
        duration: args.lease_duration_seconds,
        grace: (args.lease_duration_seconds / 3).max(1),
    };
    let led = rekey::leader::run_as_leader(ctx.client.clone(), cfg, rekey::controller::run(ctx.clone()));
    tokio::select! {
        r = led => match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "stopping");
                ExitCode::FAILURE
            }
        },
        _ = server_died => ExitCode::FAILURE,
    }
}

/// Runs a client subcommand on a small runtime; its error goes to stderr with exit code 1.
fn cli_run<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce(kube::Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), rekey::cli::CliError>>,
{
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rekey: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let client = match kube::Client::try_default().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("rekey: no Kubernetes client: {e}");
                return ExitCode::FAILURE;
            }
        };
        match f(client).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rekey: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
