//! What every reconcile shares: the operator's configuration, its clients, and what the watch
//! caches say about other resources (who else names a user, how many rotations are in flight).
//! Reads the cluster (the caches, and a fresh list where a cache cannot answer) and IAM (whoami).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt as _;
use kube::api::Api;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::Store;

use crate::api::IamKeyRotation;
use crate::cache::Cached;
use crate::error::Error;
use crate::iam::Iam;
use crate::ownership::{fnv1a, role_allowed};
use crate::plan::slots::{RotationSlots, holds_slot};

/// The operator's settings (the `rekey run` flags).
#[derive(Clone, Debug)]
pub struct Config {
    /// This cluster's name: part of every owner claim and of the consent tag's value.
    pub cluster: String,
    /// Default AWS region: STS verification of new keys and the template's {{ .Region }}, unless
    /// a resource's spec.aws.region says otherwise.
    pub region: String,
    /// Watch only these namespaces (empty: all).
    pub namespaces: Vec<String>,
    /// At most this many rotations in flight at once (a backlog of overdue keys must not restart
    /// every workload of the cluster at the same moment).
    pub max_concurrent_rotations: usize,
    /// At most this many resources restarting workloads at once (0: no limit of its own).
    pub max_concurrent_rollouts: usize,
    /// The least time between two restarts by rekey in one namespace.
    pub rollout_cooldown: Duration,
    /// Role ARN patterns (`*` matches anything) a resource's spec.aws.roleArn must match.
    pub allowed_role_arns: Vec<String>,
}

impl Config {
    pub fn new(cluster: impl Into<String>, region: impl Into<String>) -> Self {
        Self {
            cluster: cluster.into(),
            region: region.into(),
            namespaces: Vec::new(),
            max_concurrent_rotations: 10,
            max_concurrent_rollouts: 0,
            rollout_cooldown: Duration::ZERO,
            allowed_role_arns: Vec::new(),
        }
    }
}

/// Shared by every reconcile.
pub struct Context<I: Iam> {
    pub client: kube::Client,
    pub config: Config,
    /// The home account's IAM client; resources with spec.aws.roleArn get one of their own.
    pub iam: I,
    pub events: crate::events::Events,
    /// Wakes in-flight rotations when their namespace's pods and workloads change.
    pub nudger: crate::nudge::Nudger,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub health: Arc<crate::http::Health>,
    /// One client per (role, external id), so assumed credentials are reused until they expire.
    role_clients: tokio::sync::Mutex<std::collections::HashMap<(String, String), I>>,
    /// The IAM user the operator runs as (None: a role, or not yet known).
    whoami: tokio::sync::OnceCell<Option<String>>,
    /// The controllers' caches of resources (one per watched namespace), for counting rotations
    /// in flight.
    stores: std::sync::Mutex<Vec<Store<Cached>>>,
    /// Per AWS account ("" for the home account): reconciles at work on a leaked key that may
    /// still be Active (see `urgent_work`).
    urgent: std::sync::Mutex<std::collections::HashMap<String, Arc<std::sync::atomic::AtomicUsize>>>,
    /// Restart pacing (--max-concurrent-rollouts, --rollout-cooldown).
    pub pacing: crate::pacing::Pacing,
}

/// A reconcile at work on a leaked key, for as long as it is held.
pub struct UrgentWork(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for UrgentWork {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl<I: Iam> Context<I> {
    pub fn new(client: kube::Client, iam: I, config: Config, metrics: Arc<crate::metrics::Metrics>) -> Self {
        let reporter = Reporter { controller: "rekey".into(), instance: std::env::var("POD_NAME").ok() };
        Self {
            events: crate::events::Events::new(client.clone(), reporter),
            nudger: crate::nudge::Nudger::new(client.clone()),
            client,
            iam,
            config,
            metrics,
            health: Arc::new(crate::http::Health::default()),
            stores: std::sync::Mutex::new(Vec::new()),
            urgent: std::sync::Mutex::default(),
            pacing: crate::pacing::Pacing::default(),
            whoami: tokio::sync::OnceCell::new(),
            role_clients: tokio::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// The IAM client for a resource: its spec.aws.roleArn's (assumed with ExternalId
    /// "<cluster>/<namespace>", which the role's trust policy can require), else the home account's.
    /// A role the allow-list refuses gets no client at all.
    pub async fn iam_for(&self, obj: &IamKeyRotation) -> Option<I> {
        let Some(role) = obj.spec.aws.as_ref().and_then(|a| a.role_arn.as_deref()) else {
            return Some(self.iam.clone());
        };
        if !role_allowed(&self.config.allowed_role_arns, role) {
            return None;
        }
        let external_id = format!("{}/{}", self.config.cluster, obj.namespace().unwrap_or_default());
        let mut cache = self.role_clients.lock().await;
        let key = (role.to_owned(), external_id.clone());
        if let Some(c) = cache.get(&key) {
            return Some(c.clone());
        }
        let session = format!("rekey-{}", fnv1a(external_id.as_bytes()));
        let c = self.iam.for_role(role, &external_id, &session).await;
        cache.insert(key, c.clone());
        Some(c)
    }

    fn urgent_counter(&self, account: &str) -> Arc<std::sync::atomic::AtomicUsize> {
        let Ok(mut all) = self.urgent.lock() else { return Arc::default() };
        all.entry(account.to_owned()).or_default().clone()
    }

    /// Marks this reconcile as at work on a leaked key of `account` until the value is dropped.
    pub fn urgent_work(&self, account: &str) -> UrgentWork {
        let counter = self.urgent_counter(account);
        counter.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        UrgentWork(counter)
    }

    /// Whether a reconcile is at work on a leaked key of `account` now: routine work for the same
    /// account gives way to it (IAM throttles per account; other accounts are not held up).
    pub fn urgent_in_flight(&self, account: &str) -> bool {
        self.urgent_counter(account).load(std::sync::atomic::Ordering::Acquire) > 0
    }

    /// The IAM user the operator itself runs as, asked once.
    pub async fn whoami(&self) -> Result<Option<String>, Error> {
        let me = self
            .whoami
            .get_or_try_init(|| async {
                self.iam.whoami().await.map(|arn| crate::iam::user_of_arn(&arn).map(str::to_owned))
            })
            .await?;
        Ok(me.clone())
    }

    /// Registers a watch cache (one per watched namespace).
    pub fn register_store(&self, store: Store<Cached>) {
        if let Ok(mut all) = self.stores.lock() {
            all.push(store);
        }
    }

    /// Whether the watch caches hold IamKeyRotation `ns`/`name`. A lookup, not a list: a set of
    /// every name built at each look made a look cost O(resources) in time and memory.
    pub fn exists(&self, ns: &str, name: &str) -> bool {
        let Ok(stores) = self.stores.lock() else { return false };
        let key = kube::runtime::reflector::ObjectRef::<Cached>::new(name).within(ns);
        stores.iter().any(|s| s.get(&key).is_some())
    }

    /// How many resources this replica watches.
    pub fn managed(&self) -> usize {
        self.stores.lock().map(|s| s.iter().map(|s| s.state().len()).sum::<usize>()).unwrap_or(0)
    }

    /// Every IamKeyRotation that could own the same user, for the one-owner check (made on a fresh
    /// read, so two resources cannot both start).
    ///
    /// With one watch (cluster-wide, or one namespace) the cache is that fresh read: it holds this
    /// resource, so it has applied every event before this resource's creation — every resource created
    /// earlier is in it. A fresh list adds nothing but load (a list of every resource per reconcile made
    /// bootstrapping 1,000 resources O(n²) for the apiserver: 504s, 5 GiB). Separate watches of several
    /// namespaces are not ordered with one another, so then the watched namespaces are listed afresh.
    pub async fn owner_candidates(&self) -> Result<Vec<Arc<Cached>>, Error> {
        if self.config.namespaces.len() > 1 {
            let mut out = Vec::new();
            for ns in &self.config.namespaces {
                let list = Api::<Cached>::namespaced(self.client.clone(), ns).list(&Default::default()).await?;
                out.extend(list.items.into_iter().map(Arc::new));
            }
            return Ok(out);
        }
        let stores: Vec<_> = self.stores.lock().map(|s| s.clone()).unwrap_or_default();
        let mut out = Vec::new();
        for s in stores {
            // Before the first list is in, an empty cache means "not known yet", not "nobody else".
            match synced(&s, Some(Duration::from_secs(30))).await {
                true => out.extend(s.state()),
                false => {
                    return Err(Error::Internal(
                        "the IamKeyRotation cache has not synced, so one owner per IAM user cannot be checked yet"
                            .into(),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// "namespace/name" of every resource the watch caches show in phase RollingOut, but for those
    /// that wait on something outside rekey's control (a stalled rollout): they hold no rollout slot.
    pub fn rolling_out(&self) -> BTreeSet<String> {
        let Ok(stores) = self.stores.lock() else { return Default::default() };
        stores
            .iter()
            .flat_map(|s| s.state())
            .filter(|o| {
                o.status
                    .as_ref()
                    .is_some_and(|s| s.phase == crate::api::Phase::RollingOut && !s.conditions.waits_outside)
            })
            .map(|o| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()))
            .collect()
    }

    /// The other resources of namespace `ns` about to hand over a new key (Creating, Verifying,
    /// Distributing), by the watch caches.
    pub fn handing_over(&self, ns: &str, me: &str) -> Vec<String> {
        use crate::api::Phase;
        let Ok(stores) = self.stores.lock() else { return Vec::new() };
        stores
            .iter()
            .flat_map(|s| s.state())
            .filter(|o| o.namespace().as_deref() == Some(ns) && o.name_any() != me)
            .filter(|o| {
                o.status
                    .as_ref()
                    .is_some_and(|s| matches!(s.phase, Phase::Creating | Phase::Verifying | Phase::Distributing))
            })
            .map(|o| o.name_any())
            .collect()
    }

    /// Who holds the --max-concurrent-rotations slots, for `obj` deciding whether to start a
    /// rotation (`plan::slots`); `waiting`: the namespaces whose rotations waited for one lately.
    /// Counted from the cache: two resources deciding at the same instant may overshoot by one,
    /// which this limit (load smoothing, not a safety rule) tolerates.
    pub fn rotation_slots(&self, obj: &IamKeyRotation, waiting: &BTreeSet<String>) -> RotationSlots {
        let (ns, me) = (obj.namespace().unwrap_or_default(), obj.name_any());
        let mut contending: BTreeSet<String> = waiting.iter().filter(|n| **n != ns).cloned().collect();
        let mut s = RotationSlots {
            max: self.config.max_concurrent_rotations,
            others_waiting: !contending.is_empty(),
            ..Default::default()
        };
        let Ok(stores) = self.stores.lock() else { return s };
        for o in stores.iter().flat_map(|s| s.state()) {
            let holds = o.status.as_ref().is_some_and(|st| holds_slot(st.phase, st.conditions.waits_outside));
            let o_ns = o.namespace().unwrap_or_default();
            if !holds || (o_ns == ns && o.name_any() == me) {
                continue;
            }
            s.held += 1;
            if o_ns == ns {
                s.held_here += 1;
            } else {
                contending.insert(o_ns);
            }
        }
        s.contending = contending.len();
        s
    }
}

/// Whether `store` holds its first full list, waiting for it at most `limit` (None: for as long as
/// the watch lives). kube-runtime's readiness signal wakes only the last task that waited on it, and
/// the controller's runner waits on it too: a second waiter would sleep forever (readiness never
/// reported). So this looks again every 100 ms instead of relying on being woken.
pub async fn synced(store: &Store<Cached>, limit: Option<Duration>) -> bool {
    let start = tokio::time::Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await {
            Ok(r) => return r.is_ok(),
            Err(_) if limit.is_some_and(|l| start.elapsed() >= l) => return false,
            Err(_) => {}
        }
    }
}
