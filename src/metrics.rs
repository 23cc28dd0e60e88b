//! Prometheus metrics. Labels are bounded: namespace, name, user, phase, operation, outcome and
//! error category — never an error's text, never a key.
//!
//! The per-resource series carry the resource's own `namespace` label; the ServiceMonitor scrapes
//! with `honorLabels: true` so that it survives scraping (docs/operations.md, "Metrics"). Every
//! family is exported from the start, labelled counters with their known label values at 0, so
//! that `rate()`/`increase()` and the alerts see the first increment.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use k8s_openapi::jiff::Timestamp;

use crate::api::{IamKeyRotation, IamKeyRotationStatus};
use crate::plan::Step;

fn secs(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

fn key_of(obj: &IamKeyRotation) -> (String, String) {
    (obj.metadata.namespace.clone().unwrap_or_default(), obj.metadata.name.clone().unwrap_or_default())
}
use std::sync::{Arc, RwLock, RwLockWriteGuard};

/// The commit rekey was built from: a build step may set REKEY_GIT_COMMIT; a plain `cargo build`
/// (also from a source tarball without .git) says "unknown".
pub const GIT_COMMIT: &str = match option_env!("REKEY_GIT_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub commit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabels {
    pub category: String,
}

/// `rekey_leak_events_total`: where a report came from, and whether an IamKeyRotation held its key.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeakLabels {
    pub source: String,
    pub matched: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AwsLabels {
    pub operation: String,
    pub outcome: String,
}

/// The conditions exported as `rekey_condition{condition}`, in [`ResourceFigures::conditions`] order.
pub const CONDITIONS: [&str; 5] = ["Ready", "Rotating", "Degraded", "Stalled", "Reconciling"];
/// The results of `rekey_rotations_total{result}`, in [`ResourceFigures::rotations`] order.
pub const RESULTS: [&str; 3] = ["completed", "abandoned", "rolled_back"];
/// The AWS operations rekey calls (src/iam.rs), exported from 0 with the outcomes the alerts use.
pub const AWS_OPERATIONS: [&str; 9] = [
    "CreateAccessKey",
    "DeleteAccessKey",
    "GetAccessKeyLastUsed",
    "GetCallerIdentity",
    "ListAccessKeys",
    "ListUserTags",
    "TagUser",
    "UntagUser",
    "UpdateAccessKey",
];
/// The phases of a rotation in flight (`crate::api::Phase` but Idle), timed when left.
pub const ROTATION_PHASES: [&str; 7] =
    ["Creating", "Verifying", "Distributing", "RollingOut", "Deactivating", "Soaking", "Deleting"];
/// The outcomes of `rekey_aws_calls_total` present from the start (others appear when first met).
pub const AWS_OUTCOMES: [&str; 2] = ["ok", "AccessDenied"];

/// What the per-resource series say of one resource. Kept as one small record per resource and
/// written out at scrape time: a label set per series (three strings, six series a resource) cost
/// more memory at 10,000 resources than the resources themselves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResourceFigures {
    pub user: String,
    /// When the active key was created (Unix seconds); its age is computed at scrape time.
    pub key_created: Option<f64>,
    pub next_rotation: Option<f64>,
    pub max_key_age: Option<f64>,
    pub conditions: [Option<bool>; 5],
    pub rotations: [u64; 3],
}

/// Every managed resource's figures, by (namespace, name).
#[derive(Debug, Default)]
pub struct Resources(RwLock<BTreeMap<(String, String), ResourceFigures>>);

impl Resources {
    pub fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<(String, String), ResourceFigures>> {
        // A panic elsewhere while holding the lock leaves figures that are still figures.
        self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl Collector for Resources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let all = self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = unix_now();
        type Value = fn(&ResourceFigures, f64) -> Option<f64>;
        let gauges: [(&str, &str, Value); 5] = [
            ("key_age_seconds", "Age of the key the Secrets hold", |f, now| f.key_created.map(|c| now - c)),
            ("key_created_timestamp_seconds", "When the key the Secrets hold was created (Unix time)", |f, _| {
                f.key_created
            }),
            (
                "key_expiration_timestamp_seconds",
                "When the key the Secrets hold reaches spec.maxKeyAge (Unix time)",
                |f, _| Some(f.key_created? + f.max_key_age?),
            ),
            ("next_rotation_timestamp_seconds", "When the next rotation starts (Unix time)", |f, _| f.next_rotation),
            ("max_key_age_seconds", "spec.maxKeyAge: the age a key must never reach", |f, _| f.max_key_age),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for ((ns, n), f) in all.iter() {
                if let Some(v) = value(f, now) {
                    let labels = [("namespace", ns.as_str()), ("name", n.as_str()), ("user", f.user.as_str())];
                    ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let help = "1 while the condition (Ready, Rotating, Degraded, Stalled, Reconciling) is True, else 0";
        let mut family = encoder.encode_descriptor("condition", help, None, MetricType::Gauge)?;
        for ((ns, n), f) in all.iter() {
            for (condition, status) in CONDITIONS.iter().zip(f.conditions) {
                if let Some(status) = status {
                    let labels = [("namespace", ns.as_str()), ("name", n.as_str()), ("condition", condition)];
                    ConstGauge::new(i64::from(status)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let mut family =
            encoder.encode_descriptor("rotations", "Rotations finished, by result", None, MetricType::Counter)?;
        for ((ns, n), f) in all.iter() {
            // Every result from 0: increase() does not count a series' first sample.
            for (result, count) in RESULTS.iter().zip(f.rotations) {
                let labels = [("namespace", ns.as_str()), ("name", n.as_str()), ("result", result)];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 18))
}

/// Phases last from milliseconds (Creating) to the soak (`deleteAfter`, 1 h by default, days when
/// set so) and a stalled rollout's wait: buckets up to a week.
pub const PHASE_BUCKETS: [f64; 17] = [
    0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 43200.0, 86400.0, 259200.0,
    604800.0,
];

fn phase_histogram() -> Histogram {
    Histogram::new(PHASE_BUCKETS)
}

/// Every metric rekey exports.
pub struct Metrics {
    pub registry: Registry,
    /// Per-resource figures (key age and timestamps, next rotation, maxKeyAge, conditions,
    /// rotations).
    pub resources: Arc<Resources>,
    pub phase_duration_seconds: Family<PhaseLabels, Histogram, fn() -> Histogram>,
    pub reconcile_duration_seconds: Histogram,
    pub reconcile_errors: Family<CategoryLabels, Counter>,
    pub aws_calls: Family<AwsLabels, Counter>,
    pub aws_throttles: Counter,
    pub last_reconcile_timestamp_seconds: Gauge<f64, AtomicU64>,
    pub managed_resources: Gauge,
    /// 1 while this replica leads (runs the controller), else 0.
    pub leader: Gauge,
    pub build_info: Family<BuildLabels, Gauge>,
    /// Leak reports read from --aws-events-queue-url, by the leak response.
    pub leak_events: Family<LeakLabels, Counter>,
    /// Leak reports whose emergency request could not be committed after their last delivery.
    pub leak_events_abandoned: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            resources: Arc::default(),
            phase_duration_seconds: Family::new_with_constructor(phase_histogram),
            reconcile_duration_seconds: seconds_histogram(),
            reconcile_errors: Family::default(),
            aws_calls: Family::default(),
            aws_throttles: Counter::default(),
            last_reconcile_timestamp_seconds: Gauge::default(),
            managed_resources: Gauge::default(),
            leader: Gauge::default(),
            build_info: Family::default(),
            leak_events: Family::default(),
            leak_events_abandoned: Counter::default(),
            registry: Registry::default(),
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(crate::process_metrics::ProcessCollector));
        m.register(registry.sub_registry_with_prefix("rekey"));
        m.preregister();
        Self { registry, ..m }
    }
}

impl Metrics {
    fn register(&self, r: &mut Registry) {
        r.register_collector(Box::new(self.resources.clone()));
        r.register("phase_duration_seconds", "Time spent in each phase", self.phase_duration_seconds.clone());
        r.register("reconcile_duration_seconds", "Duration of one reconcile", self.reconcile_duration_seconds.clone());
        r.register("reconcile_errors", "Failed reconciles, by error category", self.reconcile_errors.clone());
        r.register("aws_calls", "AWS calls by operation and outcome", self.aws_calls.clone());
        r.register("aws_throttles", "AWS calls answered with throttling", self.aws_throttles.clone());
        r.register(
            "last_reconcile_timestamp_seconds",
            "When a reconcile last finished (Unix time)",
            self.last_reconcile_timestamp_seconds.clone(),
        );
        r.register(
            "managed_resources",
            "IamKeyRotations in this replica's cache (0 on a standby)",
            self.managed_resources.clone(),
        );
        r.register("leader", "1 while this replica leads (holds the Lease and acts), else 0", self.leader.clone());
        r.register("build_info", "Always 1; the labels say which rekey this is", self.build_info.clone());
        r.register(
            "leak_events",
            "Leaked-key reports from the AWS events queue, by source and whether an IamKeyRotation held the key",
            self.leak_events.clone(),
        );
        r.register(
            "leak_events_abandoned",
            "Leaked-key reports dropped after their last delivery without an emergency request committed",
            self.leak_events_abandoned.clone(),
        );
    }

    /// The label values known in advance, at 0 (1 for build_info), so alerts see a series before
    /// the first event.
    fn preregister(&self) {
        for category in crate::error::Error::CATEGORIES {
            let _created = self.reconcile_errors.get_or_create(&CategoryLabels { category: category.into() });
        }
        for operation in AWS_OPERATIONS {
            for outcome in AWS_OUTCOMES {
                let _created =
                    self.aws_calls.get_or_create(&AwsLabels { operation: operation.into(), outcome: outcome.into() });
            }
        }
        for phase in ROTATION_PHASES {
            let _created = self.phase_duration_seconds.get_or_create(&PhaseLabels { phase: phase.into() });
        }
        for source in crate::leak_event::SOURCES {
            for matched in ["true", "false"] {
                let labels = LeakLabels { source: <&str>::from(source).into(), matched: matched.into() };
                let _created = self.leak_events.get_or_create(&labels);
            }
        }
        let build = BuildLabels { version: env!("CARGO_PKG_VERSION").into(), commit: GIT_COMMIT.into() };
        self.build_info.get_or_create(&build).set(1);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Drops every series of a deleted resource, so label sets do not pile up for resources that
    /// are gone (and alerts about them resolve).
    pub fn forget(&self, namespace: &str, name: &str) {
        self.resources.write().remove(&(namespace.to_owned(), name.to_owned()));
    }

    pub fn reconcile_error(&self, category: &str) {
        self.reconcile_errors.get_or_create(&CategoryLabels { category: category.to_owned() }).inc();
    }

    /// What one step changed: the phase it left (its duration) and the rotation it ended (its
    /// result).
    pub fn step(
        &self,
        obj: &IamKeyRotation,
        before: &IamKeyRotationStatus,
        st: &IamKeyRotationStatus,
        step: &Step,
        now: Timestamp,
    ) {
        if before.phase != st.phase
            && let Some(since) = before.rotation.as_ref().map(|r| r.phase_since.0)
        {
            let phase = PhaseLabels { phase: before.phase.to_string() };
            self.phase_duration_seconds.get_or_create(&phase).observe((secs(now) - secs(since)).max(0.0));
        }
        let result = match step {
            _ if st.rotations > before.rotations => Some("completed"),
            Step::Abandon { .. } => Some("abandoned"),
            Step::Reactivate { .. } => Some("rolled_back"),
            _ => None,
        };
        if let Some(i) = result.and_then(|r| RESULTS.iter().position(|x| *x == r)) {
            self.resources.write().entry(key_of(obj)).or_default().rotations[i] += 1;
        }
    }

    /// The resource's own figures, as its status now says.
    pub fn resource(&self, obj: &IamKeyRotation, st: &IamKeyRotationStatus) {
        let mut all = self.resources.write();
        let f = all.entry(key_of(obj)).or_default();
        f.user.clone_from(&obj.spec.user_name);
        f.key_created = st.active_key.as_ref().and_then(|k| k.created_at.as_ref()).map(|t| secs(t.0));
        f.next_rotation = st.next_rotation_time.as_ref().map(|t| secs(t.0));
        f.max_key_age = crate::validate::validate(&obj.spec).ok().map(|v| v.max_key_age.as_secs_f64());
        for (slot, name) in f.conditions.iter_mut().zip(CONDITIONS) {
            *slot = st.conditions.iter().find(|c| c.type_ == name).map(|c| c.status == "True");
        }
    }

    pub fn leak_event(&self, source: crate::leak_event::Source, matched: bool) {
        let labels = LeakLabels { source: <&str>::from(source).into(), matched: matched.to_string() };
        self.leak_events.get_or_create(&labels).inc();
    }

    pub fn aws_call(&self, operation: &str, outcome: &str) {
        if outcome == "Throttling" {
            self.aws_throttles.inc();
        }
        self.aws_calls.get_or_create(&AwsLabels { operation: operation.into(), outcome: outcome.into() }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_names_carry_the_prefix_and_bounded_labels() {
        let m = Metrics::default();
        m.aws_call("CreateAccessKey", "ok");
        m.reconcile_errors.get_or_create(&CategoryLabels { category: "IamError".into() }).inc();
        let text = m.encode();
        assert!(text.contains("rekey_aws_calls_total{operation=\"CreateAccessKey\",outcome=\"ok\"} 1"), "{text}");
        assert!(text.contains("rekey_reconcile_errors_total{category=\"IamError\"} 1"), "{text}");
        assert!(text.contains("rekey_reconcile_errors_total{category=\"Conflict\"} 0"), "{text}");
        assert!(text.contains("# TYPE rekey_reconcile_duration_seconds histogram"), "{text}");
        assert!(text.contains("# TYPE rekey_aws_throttles counter"), "{text}");
    }

    #[test]
    fn a_deleted_resource_leaves_no_series_behind() {
        let m = Metrics::default();
        for (name, user) in [("a", "u"), ("b", "v")] {
            let mut f = ResourceFigures { user: user.into(), max_key_age: Some(10.0), ..Default::default() };
            f.conditions[2] = Some(true);
            f.rotations[0] = 2;
            m.resources.write().insert(("ns".into(), name.into()), f);
        }
        m.forget("ns", "a");
        let text = m.encode();
        assert!(!text.contains("name=\"a\""), "{text}");
        assert!(text.contains("rekey_condition{namespace=\"ns\",name=\"b\",condition=\"Degraded\"} 1"), "{text}");
        assert!(text.contains("rekey_max_key_age_seconds{namespace=\"ns\",name=\"b\",user=\"v\"} 10.0"), "{text}");
        assert!(text.contains("rekey_rotations_total{namespace=\"ns\",name=\"b\",result=\"completed\"} 2"), "{text}");
    }

    #[test]
    fn key_age_is_computed_when_scraped_and_unknown_figures_are_not_exported() {
        let m = Metrics::default();
        let created = unix_now() - 3600.0;
        let f = ResourceFigures { user: "u".into(), key_created: Some(created), ..Default::default() };
        m.resources.write().insert(("ns".into(), "a".into()), f);
        let text = m.encode();
        let age: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("rekey_key_age_seconds{namespace=\"ns\",name=\"a\",user=\"u\"} "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no key age in {text}"));
        assert!((3600.0..3700.0).contains(&age), "{age}");
        assert!(!text.contains("rekey_next_rotation_timestamp_seconds{"), "{text}");
        assert!(!text.contains("rekey_condition{"), "{text}");
        assert!(text.contains("# TYPE rekey_rotations counter"), "{text}");
    }

    #[test]
    fn every_family_is_there_from_the_start() {
        let text = Metrics::default().encode();
        for want in [
            "rekey_aws_calls_total{operation=\"CreateAccessKey\",outcome=\"AccessDenied\"} 0",
            "rekey_aws_calls_total{operation=\"GetCallerIdentity\",outcome=\"ok\"} 0",
            "rekey_phase_duration_seconds_count{phase=\"Soaking\"} 0",
            "rekey_leader 0",
            "rekey_managed_resources 0",
            "rekey_aws_throttles_total 0",
            &format!("rekey_build_info{{version=\"{}\",commit=\"{GIT_COMMIT}\"}} 1", env!("CARGO_PKG_VERSION")),
        ] {
            assert!(text.contains(want), "{want} missing from {text}");
        }
        #[cfg(target_os = "linux")]
        for want in [
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_start_time_seconds ",
            "process_open_fds ",
        ] {
            assert!(text.lines().any(|l| l.starts_with(want)), "{want} missing from {text}");
        }
    }

    #[test]
    fn a_new_resource_has_its_rotation_counters_at_zero_and_its_key_expiry() {
        let m = Metrics::default();
        let f = ResourceFigures {
            user: "u".into(),
            key_created: Some(1000.0),
            max_key_age: Some(500.0),
            ..Default::default()
        };
        m.resources.write().insert(("ns".into(), "a".into()), f);
        let text = m.encode();
        for result in RESULTS {
            let want = format!("rekey_rotations_total{{namespace=\"ns\",name=\"a\",result=\"{result}\"}} 0");
            assert!(text.contains(&want), "{want} missing from {text}");
        }
        let labels = "{namespace=\"ns\",name=\"a\",user=\"u\"}";
        assert!(text.contains(&format!("rekey_key_created_timestamp_seconds{labels} 1000.0")), "{text}");
        assert!(text.contains(&format!("rekey_key_expiration_timestamp_seconds{labels} 1500.0")), "{text}");
    }

    #[test]
    fn phase_buckets_cover_a_soak_of_a_day_and_more() {
        let m = Metrics::default();
        m.phase_duration_seconds.get_or_create(&PhaseLabels { phase: "Soaking".into() }).observe(3600.0 * 30.0);
        let text = m.encode();
        assert!(text.contains("rekey_phase_duration_seconds_bucket{le=\"86400.0\",phase=\"Soaking\"} 0"), "{text}");
        assert!(text.contains("rekey_phase_duration_seconds_bucket{le=\"259200.0\",phase=\"Soaking\"} 1"), "{text}");
    }
}
