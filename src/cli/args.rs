//! The command line, as clap parses it (pure: tests parse it too). The client subcommands follow
//! kubectl's conventions: `--kubeconfig`, `--context`, `-n` (default: the context's namespace),
//! `-A`, `-l`, `-o`.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "rekey",
    version = crate::cli::VERSION,
    about = "Rotates AWS IAM user access keys stored in Kubernetes Secrets",
    after_help = "Exit codes: 0 done; 1 error; 2 ended Degraded or Stalled (rotate --wait), or unhealthy (check); 3 timed out (rotate --wait)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controller.
    Run(Box<RunArgs>),
    /// Show IamKeyRotations: user, active key and its age, phase, readiness, next rotation, last failure.
    Status(StatusArgs),
    /// Request an on-demand rotation (the rekey.dev/rotate annotation).
    Rotate(RotateArgs),
    /// After a rollback or an uncovered consumer was fixed: retire the old key again.
    Retire(RetireArgs),
    /// Is rekey healthy here? The CRD, the leader's Lease, the metrics endpoint.
    Check(CheckArgs),
    /// Every IAM user's access keys: age, last use, which IamKeyRotation covers them, and the CIS
    /// 1.14 verdict (exit 2 when an uncovered active key is older than --max-age).
    Audit(AuditArgs),
    /// Print the IamKeyRotation CustomResourceDefinition as YAML (the source of crds/).
    Crd,
    /// Print the version and commit of this binary, and the cluster's version when reachable.
    Version(VersionArgs),
    /// Print a shell completion script: `source <(rekey completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Which cluster, as kubectl picks it.
#[derive(Args, Debug, Clone, Default)]
pub struct KubeArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use (default: its current-context).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
}

/// Which namespaces, as kubectl picks them.
#[derive(Args, Debug, Clone, Default)]
pub struct ScopeArgs {
    /// Namespace (default: the kubeconfig context's namespace, else "default").
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    /// The table with the Ready reason and the message that explains the state.
    Wide,
    Json,
    Yaml,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// Only resources with these labels (`-l team=payments,tier!=dev`).
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
    /// Names (default: every resource in scope).
    pub names: Vec<String>,
}

/// What `rotate --wait` waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Until {
    InUse,
    Retired,
}

#[derive(Args, Debug)]
pub struct RotateArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// Rotate every resource with these labels instead of naming them.
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// The key leaked: retire it as soon as the Secrets hold the new one, no soak.
    #[arg(long)]
    pub emergency: bool,
    /// Follow the rotations until they end: exit 0 when done, 2 if one ends Degraded (for a
    /// reason only a person clears) or Stalled, 3 on --timeout.
    #[arg(long)]
    pub wait: bool,
    /// What --wait counts as done: `in-use` once every workload runs on the new key (the old one is
    /// then being retired), `retired` once the old key is deleted too (after deleteAfter, 1h by
    /// default: raise --timeout).
    #[arg(long, value_enum, default_value = "in-use")]
    pub until: Until,
    /// How long --wait waits.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    pub names: Vec<String>,
}

#[derive(Args, Debug)]
pub struct RetireArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Namespace (default: the kubeconfig context's namespace, else "default").
    #[arg(short, long)]
    pub namespace: Option<String>,
    #[arg(required = true)]
    pub names: Vec<String>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Namespace rekey runs in: its Lease and its metrics Service.
    #[arg(long, default_value = "rekey-system")]
    pub operator_namespace: String,
    /// Name of the leader-election Lease (`--lease-name` of `rekey run`).
    #[arg(long, default_value = "rekey")]
    pub lease_name: String,
    /// The metrics Service, reached through the apiserver's service proxy (needs `get` on
    /// `services/proxy`): NAME or NAME:PORT.
    #[arg(long, default_value = "rekey-metrics:metrics")]
    pub metrics_service: String,
    /// Reach /metrics at this plain-HTTP URL instead (e.g. after `kubectl port-forward`).
    #[arg(long, value_name = "URL")]
    pub metrics_url: Option<String>,
    /// Skip the metrics check (rekey run with leader election only, or no Service).
    #[arg(long)]
    pub skip_metrics: bool,
}

/// `rekey audit`: the caller's AWS credentials (the default chain) and kubeconfig.
#[derive(Args, Debug)]
pub struct AuditArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Namespaces whose IamKeyRotations count as coverage (comma-separated; default: every namespace).
    #[arg(short, long, value_delimiter = ',')]
    pub namespace: Vec<String>,
    /// The age an active key may reach (CIS 1.14: 90 days).
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    pub max_age: Duration,
    /// Judge the keys' ages as of this instant (RFC 3339) instead of now: what will fail by the
    /// next audit.
    #[arg(long, value_name = "TIME")]
    pub at: Option<k8s_openapi::jiff::Timestamp>,
    /// Only the users under this IAM path (e.g. /rekey/), as ListUsers' PathPrefix.
    #[arg(long, value_name = "PATH")]
    pub path_prefix: Option<String>,
    /// This cluster's name, as the operator's --cluster-name: an owner claim naming an
    /// IamKeyRotation of this cluster that no longer exists is then reported as a stale claim, not
    /// as coverage (without it, every claim counts).
    #[arg(long, env = "REKEY_CLUSTER_NAME", value_parser = cluster_name)]
    pub cluster_name: Option<String>,
    /// Cap on IAM API calls per second (the operator's default: the account's quota is shared).
    #[arg(long, env = "REKEY_AWS_CALLS_PER_SECOND", default_value = "10")]
    pub aws_calls_per_second: std::num::NonZeroU32,
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: AuditOutput,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum AuditOutput {
    #[default]
    Table,
    Json,
}

#[derive(Args, Debug)]
pub struct VersionArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Only this binary's version: do not ask the cluster.
    #[arg(long)]
    pub client: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `rekey run`: the operator's flags.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Name of this cluster: the value the consent tag rekey.dev/allow/<namespace> must carry,
    /// and part of every key's owner claim.
    #[arg(long, env = "REKEY_CLUSTER_NAME", value_parser = cluster_name)]
    pub cluster_name: String,
    /// Default AWS region (IAM is global): where new keys are verified with STS, and the
    /// template's {{ .Region }}; a resource's spec.aws.region overrides it.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,
    #[arg(long, env = "REKEY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Cap on IAM API calls per second, per AWS account (IAM throttles per account: the home
    /// account and each spec.aws.roleArn's account have a budget of their own).
    #[arg(long, env = "REKEY_AWS_CALLS_PER_SECOND", default_value = "10")]
    pub aws_calls_per_second: std::num::NonZeroU32,
    /// Optional cap on AWS API calls per second over all accounts together.
    #[arg(long, env = "REKEY_AWS_CALLS_PER_SECOND_TOTAL")]
    pub aws_calls_per_second_total: Option<std::num::NonZeroU32>,
    /// At most this many rotations in flight at once.
    #[arg(long, env = "REKEY_MAX_CONCURRENT_ROTATIONS", default_value_t = 10)]
    pub max_concurrent_rotations: usize,
    /// At most this many resources restarting workloads at once, cluster-wide (0: no limit of its
    /// own besides --max-concurrent-rotations). Emergency rotations are not held back.
    #[arg(long, env = "REKEY_MAX_CONCURRENT_ROLLOUTS", default_value_t = 0)]
    pub max_concurrent_rollouts: usize,
    /// The least time between two restarts by rekey in one namespace (0s: none). Emergency
    /// rotations are not held back.
    #[arg(long, env = "REKEY_ROLLOUT_COOLDOWN", default_value = "0s", value_parser = humantime::parse_duration)]
    pub rollout_cooldown: Duration,
    /// Role ARN patterns (comma-separated, `*` wildcard) that spec.aws.roleArn may name; none by default.
    #[arg(long, env = "REKEY_ALLOWED_ROLE_ARNS", value_delimiter = ',')]
    pub allowed_role_arns: Vec<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "REKEY_METRICS_ADDRESS", default_value = "0.0.0.0:8080")]
    pub metrics_address: std::net::SocketAddr,
    /// Elect a leader on a Lease so that only one replica acts (default on).
    #[arg(long, env = "REKEY_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Namespace of the Lease (default: the pod's namespace, else rekey-system).
    #[arg(long, env = "REKEY_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, env = "REKEY_LEASE_NAME", default_value = "rekey")]
    pub lease_name: String,
    /// Seconds a leader's lock stays valid after its last renewal.
    #[arg(long, env = "REKEY_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Watch only these namespaces (comma-separated; default: every namespace). With a list,
    /// the RBAC can be a Role per namespace (deploy/namespaced/).
    #[arg(long = "namespace", env = "REKEY_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// SQS queue that EventBridge routes AWS's leaked-key reports to (AWS Health
    /// AWS_RISK_CREDENTIALS_EXPOSED, GuardDuty findings, the quarantine policy attached): the
    /// leader long-polls it and starts an emergency rotation of the resource holding the key.
    #[arg(long, env = "REKEY_AWS_EVENTS_QUEUE_URL", value_name = "URL")]
    pub aws_events_queue_url: Option<String>,
}

/// The command line under the name it was started as: installed as `kubectl-rekey` (a krew
/// plugin, or a link on PATH), kubectl runs it for `kubectl rekey`, and its help says so.
pub fn command(argv0: Option<&std::ffi::OsStr>) -> clap::Command {
    let cmd = <Cli as clap::CommandFactory>::command();
    let plugin = argv0
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n.to_string_lossy().starts_with("kubectl-"));
    if plugin { cmd.bin_name("kubectl rekey").display_name("kubectl-rekey") } else { cmd.bin_name("rekey") }
}

/// A cluster's name is part of every owner claim and consent tag: two clusters that kept a
/// placeholder would take each other for the same owner, so the shipped placeholders (upper case)
/// are refused along with anything that is not a lowercase DNS label.
fn cluster_name(v: &str) -> Result<String, String> {
    let label = !v.is_empty()
        && v.len() <= 63
        && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if label {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "{v:?} is not this cluster's name: set a lowercase DNS label (a-z, 0-9, '-', at most 63), e.g. prod-eu-1; \
             it goes into every key's owner claim and the consent tag rekey.dev/allow/<namespace>"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn help(argv0: &str, sub: &str) -> String {
        let mut cmd = command(Some(std::ffi::OsStr::new(argv0)));
        cmd.build();
        cmd.find_subcommand_mut(sub).unwrap().render_help().to_string()
    }

    #[test]
    fn as_a_kubectl_plugin_the_help_names_kubectl_rekey() {
        assert!(help("/home/u/.krew/bin/kubectl-rekey", "status").contains("Usage: kubectl rekey status"));
        assert!(help("/usr/local/bin/rekey", "status").contains("Usage: rekey status"));
    }

    #[test]
    fn the_command_line_is_consistent() {
        command(None).debug_assert();
    }

    #[test]
    fn all_namespaces_and_a_namespace_exclude_each_other() {
        let r = Cli::try_parse_from(["rekey", "status", "-A", "-n", "x"]);
        assert!(r.is_err());
        let c = Cli::try_parse_from(["rekey", "status", "-o", "wide", "-l", "team=a", "--context", "prod"]).unwrap();
        let Command::Status(s) = c.command else { panic!("{c:?}") };
        assert_eq!(
            (s.output, s.selector.as_deref(), s.kube.context.as_deref()),
            (Output::Wide, Some("team=a"), Some("prod"))
        );
    }

    #[test]
    fn a_placeholder_cluster_name_is_refused() {
        for bad in ["CHANGE-ME", "CHANGE-ME-cluster-name", "", "-prod", "prod_eu", &"a".repeat(64)] {
            assert!(cluster_name(bad).is_err(), "{bad:?}");
        }
        for good in ["prod-eu-1", "test", "a"] {
            assert_eq!(cluster_name(good).as_deref(), Ok(good));
        }
    }
}
