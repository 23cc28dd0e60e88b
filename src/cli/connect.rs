//! Connecting as kubectl would: `--kubeconfig` (else $KUBECONFIG, ~/.kube/config, then the pod's
//! service account), `--context`, and the namespace that context names. TOUCHES THE CLUSTER only
//! to run auth plugins of the kubeconfig.

use std::time::Duration;

use kube::config::{Config, KubeConfigOptions, Kubeconfig};

use super::CliError;
use super::args::{KubeArgs, ScopeArgs};

/// A client and the namespace an unqualified name means.
pub struct Connection {
    pub client: kube::Client,
    pub default_namespace: String,
}

/// Which namespaces a command covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    All,
    One(String),
}

/// `-n` wins, then `-A`, then the context's namespace (pure).
pub fn scope(args: &ScopeArgs, default_namespace: &str) -> Scope {
    match (&args.namespace, args.all_namespaces) {
        (Some(ns), _) => Scope::One(ns.clone()),
        (None, true) => Scope::All,
        (None, false) => Scope::One(default_namespace.to_owned()),
    }
}

async fn config(args: &KubeArgs) -> Result<Config, CliError> {
    let options = KubeConfigOptions { context: args.context.clone(), ..Default::default() };
    let config = match (&args.kubeconfig, &args.context) {
        (Some(path), _) => {
            let file = Kubeconfig::read_from(path).map_err(|e| CliError::Config(format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(file, &options).await.map_err(|e| CliError::Config(e.to_string()))?
        }
        // A named context only exists in a kubeconfig: no in-cluster fallback.
        (None, Some(_)) => Config::from_kubeconfig(&options).await.map_err(|e| CliError::Config(e.to_string()))?,
        (None, None) => Config::infer().await.map_err(|e| CliError::Config(e.to_string()))?,
    };
    Ok(config)
}

/// A client for the cluster the flags name; `timeout` bounds each request (None: kube's default).
pub async fn connect(args: &KubeArgs, timeout: Option<Duration>) -> Result<Connection, CliError> {
    let mut config = config(args).await?;
    if let Some(t) = timeout {
        config.connect_timeout = Some(t);
        config.read_timeout = Some(t);
    }
    let default_namespace = config.default_namespace.clone();
    let client = kube::Client::try_from(config).map_err(|e| CliError::Config(e.to_string()))?;
    Ok(Connection { client, default_namespace })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_namespace_flag_wins_then_all_namespaces_then_the_context() {
        let a =
            |namespace: Option<&str>, all| ScopeArgs { namespace: namespace.map(String::from), all_namespaces: all };
        assert_eq!(scope(&a(Some("x"), false), "ctx"), Scope::One("x".into()));
        assert_eq!(scope(&a(None, true), "ctx"), Scope::All);
        assert_eq!(scope(&a(None, false), "ctx"), Scope::One("ctx".into()));
    }

    #[tokio::test]
    async fn the_context_names_the_default_namespace() {
        let dir = std::env::temp_dir().join(format!("rekey-kubeconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: a\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:1'}\nusers:\n- name: u\n  user: {token: t}\ncontexts:\n- name: a\n  context: {cluster: c, user: u, namespace: team-a}\n- name: b\n  context: {cluster: c, user: u}\n",
        )
        .unwrap();
        let args =
            |context: Option<&str>| KubeArgs { kubeconfig: Some(path.clone()), context: context.map(String::from) };
        assert_eq!(connect(&args(None), None).await.unwrap().default_namespace, "team-a");
        assert_eq!(connect(&args(Some("b")), None).await.unwrap().default_namespace, "default");
        assert!(matches!(connect(&args(Some("nope")), None).await, Err(CliError::Config(_))));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
