//! Wakes in-flight rotations when what they wait for changes. READS THE CLUSTER (metadata-only
//! watches of Pods and workloads).
//!
//! A rotation between the restart and the deletion of the old key waits for pods and workloads of
//! its namespace: the last pod of the old template going away is the moment the old key may be
//! switched off. Looking every few seconds puts seconds between that moment and the switch; so while
//! at least one rotation of a namespace is in flight, its Pods, Deployments, StatefulSets,
//! DaemonSets and ReplicaSets are watched — metadata only, nothing cached — and any change wakes the
//! rotations of that namespace. The watches start with the first such rotation of a namespace and
//! stop with the last, so an idle operator watches nothing but its IamKeyRotations.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::mpsc;

use crate::cache::Cached;

/// A burst of events (a rollout replacing pods) wakes a rotation once, this long after it began.
const COALESCE: Duration = Duration::from_millis(100);
/// Wake-ups waiting for a controller; more are dropped (the controller merges them anyway).
const QUEUE: usize = 1024;

/// Who to wake: the controller watching a namespace (None: all namespaces).
type Routes = Arc<Mutex<Vec<(Option<String>, mpsc::Sender<ObjectRef<Cached>>)>>>;

struct Watch {
    waiting: Arc<Mutex<BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The namespaces watched for in-flight rotations, and where their wake-ups go.
pub struct Nudger {
    client: kube::Client,
    routes: Routes,
    watches: Mutex<BTreeMap<String, Watch>>,
}

impl Nudger {
    pub fn new(client: kube::Client) -> Self {
        Self { client, routes: Arc::default(), watches: Mutex::default() }
    }

    /// The wake-ups for the controller watching `scope` (None: all namespaces).
    pub fn route(&self, scope: Option<String>) -> impl Stream<Item = ObjectRef<Cached>> + Send + 'static {
        let (tx, rx) = mpsc::channel(QUEUE);
        if let Ok(mut r) = self.routes.lock() {
            r.push((scope, tx));
        }
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|o| (o, rx)) })
    }

    /// Whether resource `name` of `ns` is in flight (waiting for its namespace's pods and workloads).
    pub fn waiting(&self, ns: &str, name: &str, waiting: bool) {
        let Ok(mut watches) = self.watches.lock() else { return };
        match (watches.get(ns), waiting) {
            (Some(w), true) => {
                if let Ok(mut names) = w.waiting.lock() {
                    names.insert(name.to_owned());
                }
            }
            (Some(w), false) => {
                let empty = w.waiting.lock().map(|mut names| names.remove(name) && names.is_empty()).unwrap_or(false);
                if empty && let Some(w) = watches.remove(ns) {
                    w.task.abort();
                }
            }
            (None, true) => {
                let waiting = Arc::new(Mutex::new(BTreeSet::from([name.to_owned()])));
                let task =
                    tokio::spawn(watch(self.client.clone(), ns.to_owned(), waiting.clone(), self.routes.clone()));
                watches.insert(ns.to_owned(), Watch { waiting, task });
            }
            (None, false) => {}
        }
    }

    /// How many namespaces are watched (for tests and metrics).
    pub fn watched(&self) -> usize {
        self.watches.lock().map(|w| w.len()).unwrap_or(0)
    }
}

/// Watches one namespace until aborted; every burst of changes wakes its waiting rotations.
async fn watch(client: kube::Client, ns: String, waiting: Arc<Mutex<BTreeSet<String>>>, routes: Routes) {
    let cfg = watcher::Config::default;
    let changes = futures::stream::select_all([
        watcher(Api::<PartialObjectMeta<Pod>>::namespaced(client.clone(), &ns), cfg())
            .default_backoff()
            .map(|_| ())
            .boxed(),
        watcher(Api::<PartialObjectMeta<Deployment>>::namespaced(client.clone(), &ns), cfg())
            .default_backoff()
            .map(|_| ())
            .boxed(),
        watcher(Api::<PartialObjectMeta<StatefulSet>>::namespaced(client.clone(), &ns), cfg())
            .default_backoff()
            .map(|_| ())
            .boxed(),
        watcher(Api::<PartialObjectMeta<DaemonSet>>::namespaced(client.clone(), &ns), cfg())
            .default_backoff()
            .map(|_| ())
            .boxed(),
        watcher(Api::<PartialObjectMeta<ReplicaSet>>::namespaced(client.clone(), &ns), cfg())
            .default_backoff()
            .map(|_| ())
            .boxed(),
    ]);
    futures::pin_mut!(changes);
    while changes.next().await.is_some() {
        let _ = tokio::time::timeout(COALESCE, async { while changes.next().await.is_some() {} }).await;
        let names: Vec<String> = waiting.lock().map(|n| n.iter().cloned().collect()).unwrap_or_default();
        let Ok(routes) = routes.lock() else { return };
        let Some((_, tx)) = routes.iter().find(|(scope, _)| scope.as_deref().is_none_or(|s| s == ns)) else { continue };
        for name in names {
            // A full queue means a wake-up is pending already.
            let _ = tx.try_send(ObjectRef::new(&name).within(&ns));
        }
    }
}
