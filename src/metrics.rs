//! Prometheus metrics. Labels are bounded: namespace, name, user, phase, operation, outcome and
//! error category — never an error's text, never a key.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub namespace: String,
    pub name: String,
    pub user: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub namespace: String,
    pub name: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub namespace: String,
    pub name: String,
    pub condition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabels {
    pub category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AwsLabels {
    pub operation: String,
    pub outcome: String,
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 18))
}

/// Every metric rekey exports.
pub struct Metrics {
    pub registry: Registry,
    pub key_age_seconds: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    pub next_rotation_timestamp_seconds: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    pub max_key_age_seconds: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    pub condition: Family<ConditionLabels, Gauge>,
    pub rotations: Family<ResultLabels, Counter>,
    pub phase_duration_seconds: Family<PhaseLabels, Histogram, fn() -> Histogram>,
    pub reconcile_duration_seconds: Histogram,
    pub reconcile_errors: Family<CategoryLabels, Counter>,
    pub aws_calls: Family<AwsLabels, Counter>,
    pub aws_throttles: Counter,
    pub last_reconcile_timestamp_seconds: Gauge<f64, AtomicU64>,
    pub managed_resources: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("rekey");
        let m = Self {
            key_age_seconds: Family::default(),
            next_rotation_timestamp_seconds: Family::default(),
            max_key_age_seconds: Family::default(),
            condition: Family::default(),
            rotations: Family::default(),
            phase_duration_seconds: Family::new_with_constructor(seconds_histogram),
            reconcile_duration_seconds: seconds_histogram(),
            reconcile_errors: Family::default(),
            aws_calls: Family::default(),
            aws_throttles: Counter::default(),
            last_reconcile_timestamp_seconds: Gauge::default(),
            managed_resources: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("key_age_seconds", "Age of the key the Secrets hold", m.key_age_seconds.clone());
        registry.register(
            "next_rotation_timestamp_seconds",
            "When the next rotation starts (Unix time)",
            m.next_rotation_timestamp_seconds.clone(),
        );
        registry.register(
            "max_key_age_seconds",
            "spec.maxKeyAge: the age a key must never reach",
            m.max_key_age_seconds.clone(),
        );
        registry.register(
            "condition",
            "1 while the condition (Ready, Rotating, Degraded, Stalled, Reconciling) is True, else 0",
            m.condition.clone(),
        );
        registry.register("rotations", "Rotations finished, by result", m.rotations.clone());
        registry.register("phase_duration_seconds", "Time spent in each phase", m.phase_duration_seconds.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            m.reconcile_duration_seconds.clone(),
        );
        registry.register("reconcile_errors", "Failed reconciles, by error category", m.reconcile_errors.clone());
        registry.register("aws_calls", "AWS calls by operation and outcome", m.aws_calls.clone());
        registry.register("aws_throttles", "AWS calls answered with throttling", m.aws_throttles.clone());
        registry.register(
            "last_reconcile_timestamp_seconds",
            "When a reconcile last finished (Unix time)",
            m.last_reconcile_timestamp_seconds.clone(),
        );
        registry.register(
            "managed_resources",
            "IamKeyRotations in this replica's cache (0 on a standby)",
            m.managed_resources.clone(),
        );
        // Errors by category from 0, so rate() and alerts see a series before the first error.
        for category in crate::error::Error::CATEGORIES {
            let _created = m.reconcile_errors.get_or_create(&CategoryLabels { category: category.into() });
        }
        Self { registry, ..m }
    }
}

impl Metrics {
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
    pub fn forget(&self, namespace: &str, name: &str, user: &str) {
        let resource = ResourceLabels { namespace: namespace.into(), name: name.into(), user: user.into() };
        self.key_age_seconds.remove(&resource);
        self.next_rotation_timestamp_seconds.remove(&resource);
        self.max_key_age_seconds.remove(&resource);
        for condition in ["Ready", "Rotating", "Degraded", "Stalled", "Reconciling"] {
            self.condition.remove(&ConditionLabels {
                namespace: namespace.into(),
                name: name.into(),
                condition: condition.into(),
            });
        }
        for result in ["completed", "abandoned", "rolled_back"] {
            self.rotations.remove(&ResultLabels {
                namespace: namespace.into(),
                name: name.into(),
                result: result.into(),
            });
        }
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
        let mine = ResourceLabels { namespace: "ns".into(), name: "a".into(), user: "u".into() };
        let other = ResourceLabels { namespace: "ns".into(), name: "b".into(), user: "v".into() };
        for l in [&mine, &other] {
            m.key_age_seconds.get_or_create(l).set(5.0);
            m.max_key_age_seconds.get_or_create(l).set(10.0);
            m.condition
                .get_or_create(&ConditionLabels {
                    namespace: l.namespace.clone(),
                    name: l.name.clone(),
                    condition: "Degraded".into(),
                })
                .set(1);
        }
        m.forget("ns", "a", "u");
        let text = m.encode();
        assert!(!text.contains("name=\"a\""), "{text}");
        assert!(text.contains("rekey_condition{namespace=\"ns\",name=\"b\",condition=\"Degraded\"} 1"), "{text}");
        assert!(text.contains("rekey_max_key_age_seconds{namespace=\"ns\",name=\"b\",user=\"v\"} 10.0"), "{text}");
    }
}
