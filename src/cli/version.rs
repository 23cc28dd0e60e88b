//! `rekey version`: this binary's version and commit, and the cluster's version when it answers
//! within a few seconds (a version command must not hang on an unreachable cluster).

use std::time::Duration;

use super::args::VersionArgs;
use super::connect::connect;

/// How long the cluster gets to say its version.
const SERVER_TIMEOUT: Duration = Duration::from_secs(3);

/// The server's line: its version, or why there is none.
async fn server(args: &VersionArgs) -> String {
    let ask = async {
        let conn = connect(&args.kube, Some(SERVER_TIMEOUT)).await.map_err(|e| e.to_string())?;
        conn.client.apiserver_version().await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(SERVER_TIMEOUT, ask).await {
        Ok(Ok(info)) => format!("Server Version: {} ({})", info.git_version, info.platform),
        Ok(Err(e)) => format!("Server Version: unreachable ({e})"),
        Err(_) => format!("Server Version: unreachable (no answer within {}s)", SERVER_TIMEOUT.as_secs()),
    }
}

/// Prints the versions; an unreachable cluster is reported, not an error.
pub async fn run(args: &VersionArgs) {
    println!("Client Version: rekey {}", super::VERSION);
    if !args.client {
        println!("{}", server(args).await);
    }
}
