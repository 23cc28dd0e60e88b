//! `rekey status`: reads IamKeyRotations, as `kubectl get` would pick them. TOUCHES THE CLUSTER
//! (reads only).

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};

use super::CliError;
use super::args::{Output, StatusArgs};
use super::connect::{Connection, Scope, scope};
use super::output::{document, table};
use crate::api::IamKeyRotation;

/// The resources named, or every one in scope that matches the selector.
pub async fn fetch(
    conn: &Connection,
    scope: &Scope,
    names: &[String],
    selector: Option<&str>,
) -> Result<Vec<IamKeyRotation>, CliError> {
    let api: Api<IamKeyRotation> = match scope {
        Scope::One(ns) => Api::namespaced(conn.client.clone(), ns),
        Scope::All if names.is_empty() => Api::all(conn.client.clone()),
        Scope::All => {
            return Err(CliError::Usage("a resource cannot be retrieved by name across all namespaces".into()));
        }
    };
    if !names.is_empty() {
        if selector.is_some() {
            return Err(CliError::Usage("name cannot be provided when a selector is specified".into()));
        }
        let mut items = Vec::with_capacity(names.len());
        for n in names {
            items.push(api.get(n).await.map_err(|e| CliError::named(n, scope, e))?);
        }
        return Ok(items);
    }
    let lp = match selector {
        Some(s) => ListParams::default().labels(s),
        None => ListParams::default(),
    };
    Ok(api.list(&lp).await?.items)
}

/// Prints the resources; "No resources found" goes to stderr, as kubectl has it.
pub async fn run(conn: &Connection, args: &StatusArgs) -> Result<(), CliError> {
    let scope = scope(&args.scope, &conn.default_namespace);
    let items = fetch(conn, &scope, &args.names, args.selector.as_deref()).await?;
    let text = match args.output {
        Output::Table | Output::Wide if items.is_empty() => {
            match &scope {
                Scope::One(ns) => eprintln!("No resources found in {ns} namespace."),
                Scope::All => eprintln!("No resources found"),
            }
            return Ok(());
        }
        Output::Table | Output::Wide => {
            table(&items, Timestamp::now(), scope == Scope::All, args.output == Output::Wide)
        }
        Output::Json | Output::Yaml => document(&items, args.names.len() == 1, args.output)?,
    };
    print!("{text}");
    Ok(())
}
