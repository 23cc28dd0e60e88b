//! `rekey audit`: which access keys in the account no rotation covers, and which fail CIS 1.14.
//! TOUCHES AWS (reads only: ListUsers, ListAccessKeys, ListUserTags, GetAccessKeyLastUsed, under the
//! operator's call cap) and THE CLUSTER (reads IamKeyRotations); `audit_report` judges and prints.

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kube::api::{Api, ListParams};

use super::CliError;
use super::args::{AuditArgs, AuditOutput};
use super::audit_report::{Cluster, UserKeys, assess, table};
use super::connect::Connection;
use crate::api::IamKeyRotation;
use crate::iam::{AwsIam, Iam as _};

/// Users read at once: enough to keep the call cap busy over a round trip, few enough that a
/// slow account does not pile up requests behind the cap.
const IN_FLIGHT: usize = 8;

/// The keys each IamKeyRotation's status holds (active, new, or retiring: all are rekey's), and
/// which resources exist.
async fn read_cluster(conn: &Connection, namespaces: &[String], name: Option<String>) -> Result<Cluster, CliError> {
    let apis: Vec<Api<IamKeyRotation>> = if namespaces.is_empty() {
        vec![Api::all(conn.client.clone())]
    } else {
        namespaces.iter().map(|ns| Api::namespaced(conn.client.clone(), ns)).collect()
    };
    let mut c = Cluster { name, namespaces: namespaces.to_vec(), ..Default::default() };
    for api in apis {
        let items = match api.list(&ListParams::default()).await {
            Ok(l) => l.items,
            Err(kube::Error::Api(e)) if e.code == 403 && namespaces.is_empty() => {
                return Err(CliError::Usage(format!(
                    "cannot list IamKeyRotations in every namespace ({}): name the namespaces you can read with -n",
                    e.message
                )));
            }
            Err(e) => return Err(e.into()),
        };
        for o in items {
            let owner = format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any());
            let user = o.status.as_ref().and_then(|s| s.user_name.clone()).unwrap_or_else(|| o.spec.user_name.clone());
            c.resources.insert(owner.clone(), user);
            let Some(st) = o.status else { continue };
            let ids = [
                st.active_key.map(|k| k.access_key_id),
                st.new_key.map(|k| k.access_key_id),
                st.retiring_key.map(|k| k.access_key_id),
            ];
            for id in ids.into_iter().flatten() {
                c.held.insert(id, owner.clone());
            }
        }
    }
    Ok(c)
}

/// One user's keys, claims and last uses, and the calls that took: a user without keys costs one.
async fn user_keys(iam: &AwsIam, user: String) -> Result<(UserKeys, u64), CliError> {
    let keys = iam.list_keys(&user).await?;
    if keys.is_empty() {
        return Ok((UserKeys { user, ..Default::default() }, 1));
    }
    let tags = iam.user_tags(&user).await?.unwrap_or_default();
    let mut last_use = std::collections::BTreeMap::new();
    for k in &keys {
        if let Some(u) = iam.last_use(&k.id).await? {
            last_use.insert(k.id.clone(), u);
        }
    }
    let calls = 2 + keys.len() as u64;
    Ok((UserKeys { user, keys, claims: crate::ownership::claims(&tags), last_use }, calls))
}

pub async fn run(conn: &Connection, args: &AuditArgs) -> Result<(), CliError> {
    let cluster = read_cluster(conn, &args.namespace, args.cluster_name.clone()).await?;
    let iam = AwsIam::from_env(args.aws_calls_per_second, None).await;
    let (names, pages) = iam.list_users(args.path_prefix.as_deref()).await?;
    let mut users: Vec<(UserKeys, u64)> =
        futures::stream::iter(names).map(|u| user_keys(&iam, u)).buffer_unordered(IN_FLIGHT).try_collect().await?;
    users.sort_by(|a, b| a.0.user.cmp(&b.0.user));
    let calls = u64::from(pages) + users.iter().map(|u| u.1).sum::<u64>();
    let users: Vec<UserKeys> = users.into_iter().map(|u| u.0).collect();
    match cluster.name_confirmed(&users) {
        Some(false) => {
            return Err(CliError::Usage(format!(
                "--cluster-name {} is not the name in the owner claims of the keys this cluster's IamKeyRotations hold: a wrong name would report every claim as stale",
                cluster.name.unwrap_or_default()
            )));
        }
        // Trusted: when every resource of this cluster is gone, its claims are all stale; a wrong
        // name can only make keys fail that should pass (a gate errs on that side).
        None if cluster.name.is_some() => eprintln!(
            "rekey audit: no key an IamKeyRotation holds carries a claim to confirm --cluster-name against; it is trusted"
        ),
        _ => {}
    }
    let report = assess(&users, &cluster, args.at.unwrap_or_else(Timestamp::now), args.max_age, calls);
    match args.output {
        AuditOutput::Table => print!("{}", table(&report)),
        AuditOutput::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    if report.summary.fail > 0 {
        return Err(CliError::AuditFailed(format!(
            "{} active keys older than {} are covered by no IamKeyRotation",
            report.summary.fail,
            humantime::format_duration(args.max_age)
        )));
    }
    Ok(())
}
