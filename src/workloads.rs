//! The workloads that consume a key: discovery, the restart stamp, rollout completion, and the
//! census of pods no rolled workload covers (`census`).
//!
//! Completion follows `kubectl rollout status` (observedGeneration, updated/ready/available
//! replicas, ProgressDeadlineExceeded) **and** requires that no pod of the workload without the
//! stamp remains, terminating pods included: a terminating pod still runs on the old key. A pod
//! belongs to a workload by its controller chain (owner references with uids), not by labels.

pub mod census;
pub mod stamp;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodTemplateSpec};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use crate::api::{ACCESS_KEY_ANNOTATION, RESTART_ANNOTATION, WorkloadKind, WorkloadRef};
use crate::error::Error;
use crate::plan::snapshot::{WorkloadState, WorkloadsState};
use census::Census;

/// Whether a pod spec reads any of `secrets` (env valueFrom, envFrom, secret, projected or CSI volume).
pub fn references(spec: &PodSpec, secrets: &BTreeSet<String>) -> bool {
    census::pod_references(spec, secrets)
}

/// A secret volume, a projected volume, or a CSI volume's nodePublishSecretRef (how S3 CSI
/// drivers take their keys: the driver reads the Secret when the pod's volume is mounted, so the
/// pod holds the key for as long as it runs).
pub(crate) fn volume_references(spec: &PodSpec, secrets: &BTreeSet<String>) -> bool {
    spec.volumes.iter().flatten().any(|v| {
        v.secret.as_ref().and_then(|s| s.secret_name.as_ref()).is_some_and(|n| secrets.contains(n))
            || v.csi
                .as_ref()
                .and_then(|c| c.node_publish_secret_ref.as_ref())
                .is_some_and(|r| secrets.contains(&r.name))
            || v.projected.as_ref().is_some_and(|p| {
                p.sources.iter().flatten().any(|s| s.secret.as_ref().is_some_and(|s| secrets.contains(&s.name)))
            })
    })
}

fn stamp_of(t: Option<&PodTemplateSpec>) -> Option<String> {
    t.and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(ACCESS_KEY_ANNOTATION))
        .cloned()
}

/// A workload in a uniform shape.
struct Seen {
    reference: WorkloadRef,
    uid: String,
    template: Option<PodTemplateSpec>,
    /// Rollout complete by `kubectl rollout status` rules.
    rolled_out: bool,
    /// A newer template is still being rolled out (unlike a rolled-out workload whose pods broke).
    progressing: bool,
    ready: i32,
    refused: Option<String>,
    /// "1 of 2 updated, 1 ready".
    progress: String,
}

fn progress(updated: i32, want: i32, ready: i32) -> String {
    format!("{updated} of {want} updated, {ready} ready")
}

fn deployment(d: Deployment) -> Seen {
    let spec = d.spec.clone().unwrap_or_default();
    let st = d.status.clone().unwrap_or_default();
    let want = spec.replicas.unwrap_or(1);
    let deadline_exceeded = st
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded"));
    let updated = st.updated_replicas.unwrap_or(0);
    let rolled_out = st.observed_generation >= d.metadata.generation
        && !deadline_exceeded
        && updated >= want
        && st.replicas.unwrap_or(0) <= updated
        && st.available_replicas.unwrap_or(0) >= updated;
    let progressing =
        st.observed_generation < d.metadata.generation || updated < want || st.replicas.unwrap_or(0) > updated;
    Seen {
        reference: WorkloadRef { kind: WorkloadKind::Deployment, name: d.metadata.name.clone().unwrap_or_default() },
        uid: d.metadata.uid.clone().unwrap_or_default(),
        template: Some(spec.template),
        rolled_out,
        progressing,
        ready: st.ready_replicas.unwrap_or(0),
        refused: None,
        progress: progress(updated, want, st.ready_replicas.unwrap_or(0)),
    }
}

fn statefulset(s: StatefulSet) -> Seen {
    let spec = s.spec.clone().unwrap_or_default();
    let st = s.status.clone().unwrap_or_default();
    let want = spec.replicas.unwrap_or(1);
    let strategy = spec.update_strategy.clone().unwrap_or_default();
    let partition = strategy.rolling_update.as_ref().and_then(|r| r.partition).unwrap_or(0);
    let refused = if strategy.type_.as_deref() == Some("OnDelete") {
        Some("updateStrategy OnDelete never replaces running pods".to_owned())
    } else if partition > 0 {
        Some(format!("rollingUpdate.partition {partition} > 0 keeps pods on the old template"))
    } else {
        None
    };
    let rolled_out = st.observed_generation >= s.metadata.generation
        && st.updated_replicas.unwrap_or(0) >= want
        && st.ready_replicas.unwrap_or(0) >= want
        && st.update_revision.is_some()
        && st.current_revision == st.update_revision;
    let progressing = st.observed_generation < s.metadata.generation
        || st.updated_replicas.unwrap_or(0) < want
        || st.current_revision != st.update_revision;
    Seen {
        reference: WorkloadRef { kind: WorkloadKind::StatefulSet, name: s.metadata.name.clone().unwrap_or_default() },
        uid: s.metadata.uid.clone().unwrap_or_default(),
        template: Some(spec.template),
        rolled_out,
        progressing,
        ready: st.ready_replicas.unwrap_or(0),
        refused,
        progress: progress(st.updated_replicas.unwrap_or(0), want, st.ready_replicas.unwrap_or(0)),
    }
}

fn daemonset(d: DaemonSet) -> Seen {
    let spec = d.spec.clone().unwrap_or_default();
    let st = d.status.clone().unwrap_or_default();
    let refused = (spec.update_strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("OnDelete"))
        .then(|| "updateStrategy OnDelete never replaces running pods".to_owned());
    let rolled_out = st.observed_generation >= d.metadata.generation
        && st.updated_number_scheduled.unwrap_or(0) >= st.desired_number_scheduled
        && st.number_available.unwrap_or(0) >= st.desired_number_scheduled;
    let progressing = st.observed_generation < d.metadata.generation
        || st.updated_number_scheduled.unwrap_or(0) < st.desired_number_scheduled;
    Seen {
        reference: WorkloadRef { kind: WorkloadKind::DaemonSet, name: d.metadata.name.clone().unwrap_or_default() },
        uid: d.metadata.uid.clone().unwrap_or_default(),
        template: Some(spec.template),
        rolled_out,
        progressing,
        ready: st.number_ready,
        refused,
        progress: progress(st.updated_number_scheduled.unwrap_or(0), st.desired_number_scheduled, st.number_ready),
    }
}

/// TOUCHES THE CLUSTER (reads). The workloads to roll for a resource: its explicit targets plus,
/// with discovery, every workload of the namespace whose pod template references a target Secret;
/// and the census of pods reading a target Secret that none of them controls.
pub async fn observe(
    client: &kube::Client,
    ns: &str,
    targets: &[WorkloadRef],
    discover: bool,
    secrets: &BTreeSet<String>,
    key: &KeyFacts<'_>,
) -> Result<WorkloadsState, Error> {
    let key_id = key.id;
    let lp = ListParams::default();
    let mut seen: Vec<Seen> = Vec::new();
    seen.extend(Api::<Deployment>::namespaced(client.clone(), ns).list(&lp).await?.items.into_iter().map(deployment));
    seen.extend(Api::<StatefulSet>::namespaced(client.clone(), ns).list(&lp).await?.items.into_iter().map(statefulset));
    seen.extend(Api::<DaemonSet>::namespaced(client.clone(), ns).list(&lp).await?.items.into_iter().map(daemonset));
    let replicasets: Vec<ReplicaSet> = Api::<ReplicaSet>::namespaced(client.clone(), ns).list(&lp).await?.items;
    let pods: Vec<Pod> = Api::<Pod>::namespaced(client.clone(), ns).list(&lp).await?.items;
    let chosen = choose(seen, targets, discover, secrets);
    let census = Census::new(chosen.values().map(|s| (s.uid.clone(), s.reference.clone())), &replicasets);
    let mut items: Vec<WorkloadState> = targets.iter().filter(|t| !chosen.contains_key(*t)).map(missing).collect();
    for (r, s) in chosen {
        let unstamped = old_pods(&pods, &census, &r, key);
        items.push(state(r, s, unstamped));
    }
    let outsiders = census.outsiders(&pods, secrets, key_id, key.handed_over);
    Ok(WorkloadsState { items, uncovered: outsiders.uncovered, jobs: outsiders.jobs })
}

/// The pods of workload `r` that may still hold a key other than the active one: every pod of it
/// by controller chain, old templates and terminating ones included, but not the finished ones
/// (`census::finished`: an evicted pod of the old template runs nothing). 0 without an active key.
fn old_pods(pods: &[Pod], census: &Census, r: &WorkloadRef, key: &KeyFacts<'_>) -> usize {
    let Some(k) = key.id else { return 0 };
    pods.iter()
        .filter(|p| census.owner_of(p) == Some(r) && !census::finished(p))
        .filter(|p| !stamp::carries(stamp_of_pod(p), k) || restarted_before(p, key.restart))
        .count()
}

/// The explicit targets plus, with discovery, the workloads whose template reads a target Secret.
fn choose(
    seen: Vec<Seen>,
    targets: &[WorkloadRef],
    discover: bool,
    secrets: &BTreeSet<String>,
) -> BTreeMap<WorkloadRef, Seen> {
    let wanted: BTreeSet<&WorkloadRef> = targets.iter().collect();
    seen.into_iter()
        .filter(|s| {
            let refs = s.template.as_ref().and_then(|t| t.spec.as_ref()).is_some_and(|p| references(p, secrets));
            wanted.contains(&s.reference) || (discover && refs)
        })
        .map(|s| (s.reference.clone(), s))
        .collect()
}

fn missing(target: &WorkloadRef) -> WorkloadState {
    WorkloadState {
        id: target.clone(),
        stamped: None,
        complete: false,
        refused: Some("not found in this namespace".into()),
        ready: 0,
        progressing: false,
        progress: String::new(),
    }
}

fn state(id: WorkloadRef, s: Seen, unstamped: usize) -> WorkloadState {
    let progress = match unstamped {
        0 => s.progress,
        n => format!("{}, {n} pod(s) of the old template left", s.progress),
    };
    WorkloadState {
        id,
        stamped: stamp_of(s.template.as_ref()),
        complete: s.rolled_out && unstamped == 0,
        refused: s.refused,
        ready: s.ready,
        progressing: s.progressing || unstamped > 0,
        progress,
    }
}

/// What the rotation knows of the active key, for telling old pods from new ones.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeyFacts<'a> {
    /// The active key (pods stamped with another started before the restart onto it).
    pub id: Option<&'a str>,
    /// The restart token of the last revert: a pod without it may have started on the reverted key.
    pub restart: Option<&'a str>,
    /// After the handover, when the target Secrets (holding the active key) were last written, by
    /// the apiserver's clock: a pod created later read it.
    pub handed_over: Option<k8s_openapi::jiff::Timestamp>,
}

/// Whether a pod started before the restart that followed a revert (it may hold the reverted key).
fn restarted_before(p: &Pod, token: Option<&str>) -> bool {
    let restart = p.metadata.annotations.as_ref().and_then(|a| a.get(RESTART_ANNOTATION)).map(String::as_str);
    token.is_some_and(|t| restart != Some(t))
}

fn stamp_of_pod(p: &Pod) -> Option<&str> {
    p.metadata.annotations.as_ref().and_then(|a| a.get(ACCESS_KEY_ANNOTATION)).map(String::as_str)
}

/// TOUCHES THE CLUSTER (reads the namespace's IamKeyRotations and the workload, then writes).
/// Restarts a workload onto `key_id` by stamping its pod template (`stamp::merged`: with the keys
/// of other resources that its pods need too), with server-side apply under the resource's own
/// field manager (idempotent; a GitOps tool sees another manager's field, not drift). With
/// `restart`, a token beside it: a revert restarts the pods even where the stamp lists the key.
pub async fn stamp(
    client: &kube::Client,
    ns: &str,
    id: &WorkloadRef,
    key_id: &str,
    manager: &str,
    resource: &str,
    restart: Option<&str>,
) -> Result<(), Error> {
    let others = neighbours(client, ns, resource).await?;
    let value = stamp::merged(key_id, current_stamp(client, ns, id).await?.as_deref(), &others);
    let mut annotations = json!({ACCESS_KEY_ANNOTATION: value});
    if let Some(at) = restart {
        annotations[RESTART_ANNOTATION] = json!(at);
    }
    annotate_template(client, ns, id, annotations, manager).await
}

/// The namespace's other resources with a key in place, read fresh (a watch cache a moment behind
/// would miss a resource that just handed over).
async fn neighbours(client: &kube::Client, ns: &str, resource: &str) -> Result<Vec<stamp::Neighbour>, Error> {
    let list = Api::<crate::api::IamKeyRotation>::namespaced(client.clone(), ns).list(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|r| r.metadata.name.as_deref() != Some(resource))
        .filter_map(|r| r.status)
        .filter_map(|s| {
            let rolling_out = s.phase == crate::api::Phase::RollingOut;
            s.active_key.map(|k| stamp::Neighbour { active_key: k.access_key_id, rolling_out })
        })
        .collect())
}

async fn current_stamp(client: &kube::Client, ns: &str, id: &WorkloadRef) -> Result<Option<String>, Error> {
    let template = match id.kind {
        WorkloadKind::Deployment => Api::<Deployment>::namespaced(client.clone(), ns)
            .get_opt(&id.name)
            .await?
            .and_then(|d| d.spec)
            .map(|s| s.template),
        WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(client.clone(), ns)
            .get_opt(&id.name)
            .await?
            .and_then(|d| d.spec)
            .map(|s| s.template),
        WorkloadKind::DaemonSet => Api::<DaemonSet>::namespaced(client.clone(), ns)
            .get_opt(&id.name)
            .await?
            .and_then(|d| d.spec)
            .map(|s| s.template),
    };
    Ok(stamp_of(template.as_ref()))
}

async fn annotate_template(
    client: &kube::Client,
    ns: &str,
    id: &WorkloadRef,
    annotations: serde_json::Value,
    manager: &str,
) -> Result<(), Error> {
    let kind: &'static str = id.kind.into();
    let body = json!({
        "apiVersion": "apps/v1", "kind": kind, "metadata": {"name": id.name},
        "spec": {"template": {"metadata": {"annotations": annotations}}},
    });
    let pp = PatchParams::apply(manager).force().validation_strict();
    let patch = Patch::Apply(&body);
    match id.kind {
        WorkloadKind::Deployment => {
            drop(Api::<Deployment>::namespaced(client.clone(), ns).patch(&id.name, &pp, &patch).await?)
        }
        WorkloadKind::StatefulSet => {
            drop(Api::<StatefulSet>::namespaced(client.clone(), ns).patch(&id.name, &pp, &patch).await?)
        }
        WorkloadKind::DaemonSet => {
            drop(Api::<DaemonSet>::namespaced(client.clone(), ns).patch(&id.name, &pp, &patch).await?)
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> PodSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn every_way_of_reading_a_secret_is_a_reference() {
        let s: BTreeSet<String> = ["creds".to_owned()].into();
        let c = |extra: serde_json::Value| {
            let mut base = json!({"containers": [{"name": "a"}]});
            for (k, v) in extra.as_object().unwrap() {
                if k == "volumes" {
                    base["volumes"] = v.clone();
                } else {
                    base["containers"][0][k] = v.clone();
                }
            }
            spec(base)
        };
        assert!(references(&c(json!({"envFrom": [{"secretRef": {"name": "creds"}}]})), &s));
        assert!(references(
            &c(json!({"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "k"}}}]})),
            &s
        ));
        let vol = c(json!({"volumes": [{"name": "v", "secret": {"secretName": "creds"}}]}));
        assert!(references(&vol, &s));
        let proj = c(json!({"volumes": [{"name": "v", "projected": {"sources": [{"secret": {"name": "creds"}}]}}]}));
        assert!(references(&proj, &s));
        let csi = |secret: &str| {
            c(json!({"volumes": [{"name": "v", "csi": {"driver": "s3.csi.example.com",
                "nodePublishSecretRef": {"name": secret}}}]}))
        };
        assert!(references(&csi("creds"), &s), "a CSI driver mounting with the Secret's key");
        assert!(!references(&csi("other"), &s));
        assert!(!references(&c(json!({"volumes": [{"name": "v", "csi": {"driver": "d"}}]})), &s));
        assert!(!references(&c(json!({"envFrom": [{"secretRef": {"name": "other"}}]})), &s));
    }

    /// A pod of ReplicaSet rs-1 (Deployment web), stamped with `key`, in `phase`.
    fn web_pod(name: &str, key: &str, phase: &str, terminating: bool) -> Pod {
        let mut p: Pod = serde_json::from_value(json!({"metadata": {"name": name,
            "annotations": {ACCESS_KEY_ANNOTATION: key},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "rs-1", "controller": true}]},
            "status": {"phase": phase}}))
        .unwrap();
        if terminating {
            p.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-06-01T12:00:00Z".parse().unwrap()));
        }
        p
    }

    #[test]
    fn finished_pods_of_the_old_template_are_not_left_on_it() {
        let web = WorkloadRef { kind: WorkloadKind::Deployment, name: "web".into() };
        let rs: ReplicaSet =
            serde_json::from_value(json!({"metadata": {"name": "web-1", "uid": "rs-1", "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "d-1", "controller": true}]}}))
            .unwrap();
        let census = Census::new([("d-1".to_owned(), web.clone())], &[rs]);
        let key = KeyFacts { id: Some("AKIANEW"), ..Default::default() };
        // (pods, old pods left): evicted, completed and failed pods run nothing; a terminating or
        // pending pod of the old template still may.
        let cases = [
            (vec![web_pod("new", "AKIANEW", "Running", false)], 0),
            (vec![web_pod("new", "AKIANEW", "Running", false), web_pod("evicted", "AKIAOLD", "Failed", false)], 0),
            (vec![web_pod("done", "AKIAOLD", "Succeeded", false), web_pod("gone", "AKIAOLD", "Failed", true)], 0),
            (vec![web_pod("old", "AKIAOLD", "Running", false), web_pod("evicted", "AKIAOLD", "Failed", false)], 1),
            (vec![web_pod("leaving", "AKIAOLD", "Running", true), web_pod("starting", "AKIAOLD", "Pending", false)], 2),
        ];
        for (pods, want) in cases {
            let names: Vec<_> = pods.iter().map(|p| p.metadata.name.clone().unwrap_or_default()).collect();
            assert_eq!(old_pods(&pods, &census, &web, &key), want, "{names:?}");
        }
        let no_key = KeyFacts::default();
        assert_eq!(old_pods(&[web_pod("old", "AKIAOLD", "Running", false)], &census, &web, &no_key), 0);
    }

    #[test]
    fn partitioned_and_on_delete_statefulsets_are_refused() {
        let sts = |strategy: serde_json::Value| -> StatefulSet {
            serde_json::from_value(json!({"metadata": {"name": "db"}, "spec": {
                "serviceName": "db", "selector": {"matchLabels": {"a": "b"}}, "template": {},
                "updateStrategy": strategy}}))
            .unwrap()
        };
        assert!(statefulset(sts(json!({"type": "OnDelete"}))).refused.is_some());
        assert!(
            statefulset(sts(json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 1}}))).refused.is_some()
        );
        assert!(statefulset(sts(json!({"type": "RollingUpdate"}))).refused.is_none());
    }

    #[test]
    fn a_deployment_past_its_progress_deadline_is_not_rolled_out() {
        let d: Deployment = serde_json::from_value(json!({"metadata": {"name": "w", "generation": 2}, "spec": {
            "replicas": 1, "selector": {"matchLabels": {"a": "b"}}, "template": {}},
            "status": {"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1,
                "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}}))
        .unwrap();
        assert!(!deployment(d.clone()).rolled_out);
        let mut ok = d;
        ok.status.as_mut().unwrap().conditions = None;
        assert!(deployment(ok).rolled_out);
    }
}
