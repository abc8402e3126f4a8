//! Prometheus metrics of the webhook, served on the probe port at `/metrics`.
//!
//! Labels are low-cardinality by construction: operation, a fixed list of kinds, the endpoint
//! and the verdict. Never a name, namespace or uid.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::workload::WorkloadKind;

/// Labels of one admission review.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    /// `mutate` or `validate`.
    pub endpoint: &'static str,
    /// CREATE, UPDATE, DELETE, CONNECT, or `none` for a malformed request.
    pub operation: &'static str,
    /// A workload kind, `other`, or `none`.
    pub kind: &'static str,
    /// skipped, allowed, patched, denied, error, bad_request.
    pub decision: &'static str,
}

/// Labels of a policy reload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `success` or `failure`.
    pub result: &'static str,
}

/// Every metric of the webhook.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Reviews answered.
    pub requests: Family<ReviewLabels, Counter>,
    /// Time from body received to answer ready, in seconds.
    pub duration: Family<ReviewLabels, Histogram>,
    /// Policy reload attempts.
    pub reloads: Family<ReloadLabels, Counter>,
    /// 1 when the last reload attempt succeeded (or none happened), 0 when the policies in force
    /// are older than the files.
    pub policy_current: Gauge,
}

fn buckets() -> impl Iterator<Item = f64> {
    [
        0.000_05, 0.000_1, 0.000_15, 0.000_2, 0.000_3, 0.000_4, 0.000_5, 0.000_75, 0.001, 0.002_5,
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("agentvm");
        let requests = Family::<ReviewLabels, Counter>::default();
        registry.register(
            "admission_requests",
            "Admission reviews answered",
            requests.clone(),
        );
        let duration =
            Family::<ReviewLabels, Histogram>::new_with_constructor(|| Histogram::new(buckets()));
        registry.register(
            "admission_duration_seconds",
            "Time to review one admission request",
            duration.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register("policy_reloads", "Policy reload attempts", reloads.clone());
        let policy_current = Gauge::default();
        policy_current.set(1);
        registry.register(
            "policy_current",
            "1 when the policies in force match the files, 0 after a rejected update",
            policy_current.clone(),
        );
        Self {
            registry,
            requests,
            duration,
            reloads,
            policy_current,
        }
    }

    /// Records one review.
    pub fn observe(&self, labels: ReviewLabels, seconds: f64) {
        self.requests.get_or_create(&labels).inc();
        self.duration.get_or_create(&labels).observe(seconds);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The label value for a request kind: one of the workload kinds, or `other`.
pub fn kind_label(group: &str, kind: &str) -> &'static str {
    WorkloadKind::from_group_kind(group, kind).map_or("other", WorkloadKind::name)
}
