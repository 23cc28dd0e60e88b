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
    pub rotations: Family<ResultLabels, Counter>,
    pub phase_duration_seconds: Family<PhaseLabels, Histogram, fn() -> Histogram>,
    pub reconcile_duration_seconds: Histogram,
    pub reconcile_errors: Family<CategoryLabels, Counter>,
    pub aws_calls: Family<AwsLabels, Counter>,
    pub aws_throttles: Counter,
    pub last_reconcile_timestamp_seconds: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("rekey");
        let m = Self {
            key_age_seconds: Family::default(),
            next_rotation_timestamp_seconds: Family::default(),
            rotations: Family::default(),
            phase_duration_seconds: Family::new_with_constructor(seconds_histogram),
            reconcile_duration_seconds: seconds_histogram(),
            reconcile_errors: Family::default(),
            aws_calls: Family::default(),
            aws_throttles: Counter::default(),
            last_reconcile_timestamp_seconds: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("key_age_seconds", "Age of the key the Secrets hold", m.key_age_seconds.clone());
        registry.register(
            "next_rotation_timestamp_seconds",
            "When the next rotation starts (Unix time)",
            m.next_rotation_timestamp_seconds.clone(),
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
        assert!(text.contains("# TYPE rekey_reconcile_duration_seconds histogram"), "{text}");
        assert!(text.contains("# TYPE rekey_aws_throttles counter"), "{text}");
    }
}
