//! Deletion of an IamKeyRotation: carries out `plan::cleanup`. TOUCHES THE CLUSTER AND IAM.

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use crate::api::IamKeyRotation;
use crate::iam::Iam;
use crate::plan::cleanup::CleanupPlan;
use crate::secrets;

/// Deletes the planned keys (with their claims), releases the claims of the keys that stay, clears the target Secrets if asked, deletes the
/// staging Secret. Never fails: what could not be done is returned, for the Event.
pub async fn cleanup<I: Iam>(
    client: &kube::Client,
    iam: &I,
    obj: &IamKeyRotation,
    user: &str,
    plan: &CleanupPlan,
) -> Vec<String> {
    let ns = obj.metadata.namespace.clone().unwrap_or_default();
    let name = obj.metadata.name.clone().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut problems = plan.kept.clone();
    for k in &plan.delete_keys {
        match iam.delete_key(user, k).await {
            Ok(()) => {
                if let Err(e) = iam.untag_user(user, k).await {
                    tracing::warn!(error = %e, key = %k, "could not remove the claim tag");
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    for k in &plan.release_claims {
        if let Err(e) = iam.untag_user(user, k).await {
            problems.push(e.to_string());
        }
    }
    if plan.clear_targets {
        for t in &obj.spec.secrets {
            if let Err(e) = secrets::clear_target(&api, &name, t).await {
                problems.push(e.to_string());
            }
        }
    }
    if let Err(e) = secrets::delete_staging(&api, &name).await {
        problems.push(e.to_string());
    }
    problems
}
