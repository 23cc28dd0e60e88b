//! PURE: who holds a key. Every pod of the namespace that reads a target Secret is accounted for by
//! its controller chain — owner references matched by apiVersion, kind and uid — to a workload this
//! rotation rolls (apps/v1 ReplicaSet → Deployment, StatefulSet, DaemonSet). A pod whose chain ends
//! anywhere else (a bare ReplicaSet, an Argo Rollout, a hand-made pod, a Job) is not restarted by
//! rekey, so the old key must not be retired under it.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;

use crate::api::{ACCESS_KEY_ANNOTATION, WorkloadKind, WorkloadRef};

/// The workloads of this rotation by uid, and the ReplicaSets their Deployments own.
pub struct Census {
    workloads: BTreeMap<String, WorkloadRef>,
    /// ReplicaSet uid → the uid of the Deployment that controls it.
    replicasets: BTreeMap<String, String>,
}

/// The pods that hold a key rekey does not restart.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outsiders {
    /// Not restarted by anything rekey rolls; "Pod/name (why)".
    pub uncovered: Vec<String>,
    /// Pods of Jobs: they end by themselves, so they are waited for.
    pub jobs: Vec<String>,
}

fn controller(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references.iter().flatten().find(|o| o.controller == Some(true))
}

impl Census {
    /// `workloads`: (uid, reference) of each workload this rotation rolls.
    pub fn new(workloads: impl IntoIterator<Item = (String, WorkloadRef)>, replicasets: &[ReplicaSet]) -> Self {
        let workloads: BTreeMap<String, WorkloadRef> = workloads.into_iter().collect();
        let replicasets = replicasets
            .iter()
            .filter_map(|rs| {
                let owner = controller(&rs.metadata)?;
                let is_deployment = owner.api_version == "apps/v1" && owner.kind == "Deployment";
                Some((rs.metadata.uid.clone()?, owner.uid.clone())).filter(|_| is_deployment)
            })
            .collect();
        Self { workloads, replicasets }
    }

    /// The workload of this rotation that controls `pod`, if any.
    pub fn owner_of(&self, pod: &Pod) -> Option<&WorkloadRef> {
        let c = controller(&pod.metadata).filter(|c| c.api_version == "apps/v1")?;
        let (uid, kind) = match c.kind.as_str() {
            "ReplicaSet" => (self.replicasets.get(&c.uid)?, WorkloadKind::Deployment),
            "StatefulSet" => (&c.uid, WorkloadKind::StatefulSet),
            "DaemonSet" => (&c.uid, WorkloadKind::DaemonSet),
            _ => return None,
        };
        self.workloads.get(uid).filter(|w| w.kind == kind)
    }

    /// The pods that read a target Secret, hold a key other than `key_id`, and are not controlled
    /// by a workload of this rotation. Terminating pods count: they run until they are gone;
    /// finished ones do not (`finished`). A pod
    /// created after `handed_over` (every target Secret held the active key from then on) read it.
    pub fn outsiders(
        &self,
        pods: &[Pod],
        secrets: &BTreeSet<String>,
        key_id: Option<&str>,
        handed_over: Option<Timestamp>,
    ) -> Outsiders {
        let mut out = Outsiders::default();
        for p in pods {
            let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
            if handed_over.is_some_and(|h| created.is_some_and(|c| c > h)) {
                continue;
            }
            let reads = p.spec.as_ref().is_some_and(|s| pod_references(s, secrets));
            let stamp = p.metadata.annotations.as_ref().and_then(|a| a.get(ACCESS_KEY_ANNOTATION)).map(String::as_str);
            if finished(p)
                || !reads
                || key_id.is_some_and(|k| super::stamp::carries(stamp, k))
                || self.owner_of(p).is_some()
            {
                continue;
            }
            let name = p.metadata.name.clone().unwrap_or_default();
            match controller(&p.metadata) {
                Some(c) if c.api_version == "batch/v1" && c.kind == "Job" => out.jobs.push(format!("Pod/{name}")),
                Some(c) => out.uncovered.push(format!("Pod/{name} (controlled by {}/{})", c.kind, c.name)),
                None => out.uncovered.push(format!("Pod/{name} (no controller)")),
            }
        }
        out
    }
}

/// Whether a pod runs nothing any more: phase Succeeded or Failed (completed, evicted, its node
/// shut down). Its containers are gone and never restart, so it holds no key, whatever template it
/// was made from; pods like these stay until pod GC (12,500 of them by default), so counting them
/// would keep a rotation waiting forever.
pub fn finished(p: &Pod) -> bool {
    matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

/// Whether a pod reads any of `secrets`: env valueFrom or envFrom of any container (init and
/// ephemeral ones included), a secret volume, a projected volume, or a CSI volume's
/// nodePublishSecretRef.
pub fn pod_references(spec: &PodSpec, secrets: &BTreeSet<String>) -> bool {
    let env_of = |env: Option<&Vec<k8s_openapi::api::core::v1::EnvVar>>,
                  from: Option<&Vec<k8s_openapi::api::core::v1::EnvFromSource>>| {
        from.into_iter().flatten().any(|f| f.secret_ref.as_ref().is_some_and(|r| secrets.contains(&r.name)))
            || env.into_iter().flatten().any(|e| {
                e.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).is_some_and(|r| secrets.contains(&r.name))
            })
    };
    let containers = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    containers.clone().any(|c| env_of(c.env.as_ref(), c.env_from.as_ref()))
        || spec.ephemeral_containers.iter().flatten().any(|c| env_of(c.env.as_ref(), c.env_from.as_ref()))
        || super::volume_references(spec, secrets)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn secrets() -> BTreeSet<String> {
        ["creds".to_owned()].into()
    }

    fn pod(name: &str, owner: Option<(&str, &str, &str)>, spec: serde_json::Value) -> Pod {
        let owners: Vec<serde_json::Value> = owner
            .into_iter()
            .map(|(api, kind, uid)| json!({"apiVersion": api, "kind": kind, "name": "o", "uid": uid, "controller": true}))
            .collect();
        serde_json::from_value(json!({"metadata": {"name": name, "ownerReferences": owners}, "spec": spec})).unwrap()
    }

    fn env_from() -> serde_json::Value {
        json!({"containers": [{"name": "a", "envFrom": [{"secretRef": {"name": "creds"}}]}]})
    }

    fn rs(uid: &str, deployment_uid: &str) -> ReplicaSet {
        serde_json::from_value(json!({"metadata": {"name": "rs", "uid": uid, "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": deployment_uid, "controller": true}]}}))
        .unwrap()
    }

    fn census() -> Census {
        let web = WorkloadRef { kind: WorkloadKind::Deployment, name: "web".into() };
        let db = WorkloadRef { kind: WorkloadKind::StatefulSet, name: "db".into() };
        Census::new([("d-1".to_owned(), web), ("s-1".to_owned(), db)], &[rs("rs-1", "d-1"), rs("rs-x", "d-other")])
    }

    #[test]
    fn only_a_chain_to_a_rolled_workload_covers_a_pod() {
        let c = census();
        let pods = vec![
            pod("covered", Some(("apps/v1", "ReplicaSet", "rs-1")), env_from()),
            pod("sts", Some(("apps/v1", "StatefulSet", "s-1")), env_from()),
            pod("bare-rs", Some(("apps/v1", "ReplicaSet", "rs-bare")), env_from()),
            pod("other-deploy", Some(("apps/v1", "ReplicaSet", "rs-x")), env_from()),
            // Same uid, wrong kind: a forged or mistaken reference covers nothing.
            pod("wrong-kind", Some(("apps/v1", "DaemonSet", "s-1")), env_from()),
            pod("rollout", Some(("argoproj.io/v1alpha1", "Rollout", "r-1")), env_from()),
            pod("bare", None, env_from()),
            pod("job", Some(("batch/v1", "Job", "j-1")), env_from()),
            pod("unrelated", None, json!({"containers": [{"name": "a"}]})),
        ];
        let out = c.outsiders(&pods, &secrets(), Some("AKIANEW"), None);
        let names: Vec<&str> = out.uncovered.iter().map(|s| s.split(' ').next().unwrap()).collect();
        assert_eq!(names, ["Pod/bare-rs", "Pod/other-deploy", "Pod/wrong-kind", "Pod/rollout", "Pod/bare"]);
        assert_eq!(out.jobs, ["Pod/job"]);
        assert!(out.uncovered[0].contains("controlled by ReplicaSet/o"), "{:?}", out.uncovered);
    }

    #[test]
    fn every_way_a_pod_reads_a_secret_counts() {
        let ways = [
            json!({"containers": [{"name": "a", "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "k"}}}]}]}),
            json!({"containers": [{"name": "a"}], "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "creds"}}]}]}),
            json!({"containers": [{"name": "a"}], "ephemeralContainers": [{"name": "e", "envFrom": [{"secretRef": {"name": "creds"}}]}]}),
            json!({"containers": [{"name": "a"}], "volumes": [{"name": "v", "secret": {"secretName": "creds"}}]}),
            json!({"containers": [{"name": "a"}], "volumes": [{"name": "v", "projected": {"sources": [{"secret": {"name": "creds"}}]}}]}),
            json!({"containers": [{"name": "a"}], "volumes": [{"name": "v", "csi": {"driver": "s3.csi.example.com", "nodePublishSecretRef": {"name": "creds"}}}]}),
        ];
        for spec in ways {
            let p = pod("p", None, spec.clone());
            assert_eq!(census().outsiders(&[p], &secrets(), Some("AKIANEW"), None).uncovered.len(), 1, "{spec}");
        }
    }

    #[test]
    fn finished_pods_and_pods_on_the_active_key_hold_nothing_old() {
        let mut done = pod("done", None, env_from());
        done.status = Some(serde_json::from_value(json!({"phase": "Succeeded"})).unwrap());
        let mut evicted = pod("evicted", Some(("apps/v1", "ReplicaSet", "rs-bare")), env_from());
        evicted.status = Some(serde_json::from_value(json!({"phase": "Failed", "reason": "Evicted"})).unwrap());
        let mut running = pod("running", None, env_from());
        running.status = Some(serde_json::from_value(json!({"phase": "Running"})).unwrap());
        assert!(finished(&done) && finished(&evicted) && !finished(&running));
        assert_eq!(census().outsiders(&[evicted], &secrets(), Some("AKIANEW"), None), Outsiders::default());
        let mut stamped = pod("stamped", None, env_from());
        stamped.metadata.annotations = Some([(ACCESS_KEY_ANNOTATION.to_owned(), "AKIANEW".to_owned())].into());
        assert_eq!(census().outsiders(&[done, stamped], &secrets(), Some("AKIANEW"), None), Outsiders::default());
    }

    #[test]
    fn a_pod_created_after_the_handover_read_the_new_key() {
        let mut late = pod("late", Some(("argoproj.io/v1alpha1", "Rollout", "r-1")), env_from());
        late.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-06-01T12:00:10Z".parse().unwrap()));
        let handed_over: Timestamp = "2026-06-01T12:00:00Z".parse().unwrap();
        assert!(
            census().outsiders(&[late.clone()], &secrets(), Some("AKIANEW"), Some(handed_over)).uncovered.is_empty()
        );
        let before: Timestamp = "2026-06-01T12:00:20Z".parse().unwrap();
        assert_eq!(census().outsiders(&[late], &secrets(), Some("AKIANEW"), Some(before)).uncovered.len(), 1);
    }
}
