//! Prometheus metrics. Per-mapping handles are created once at start, so the connection path only
//! touches atomics; only failures (rare, by definition) go through a labelled family lookup.

use std::sync::atomic::AtomicI64;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MappingLabels {
    mapping: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    mapping: String,
    direction: &'static str,
    /// `in`: bytes from the side that opened the connection; `out`: bytes back to it.
    flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    mapping: String,
    direction: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    open: Family<MappingLabels, Gauge>,
    total: Family<MappingLabels, Counter>,
    bytes: Family<FlowLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    not_after: Gauge<i64, AtomicI64>,
    rules_reloads: Family<ReloadLabels, Counter>,
    policy_generation: Gauge<i64, AtomicI64>,
    admin_closed: Family<ClosedLabels, Counter>,
    worker_threads: Gauge<i64, AtomicI64>,
}

/// The handles one mapping's connections update.
#[derive(Clone)]
pub struct MappingMetrics {
    name: String,
    direction: &'static str,
    pub open: Gauge,
    pub total: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    failures: Family<FailureLabels, Counter>,
}

impl MappingMetrics {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn direction(&self) -> &'static str {
        self.direction
    }

    pub fn failed(&self, reason: &'static str) {
        self.failures
            .get_or_create(&FailureLabels {
                mapping: self.name.clone(),
                direction: self.direction,
                reason,
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("rolemesh_proxy");
        let open = Family::<MappingLabels, Gauge>::default();
        let total = Family::<MappingLabels, Counter>::default();
        let bytes = Family::<FlowLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let reloads = Family::<ReloadLabels, Counter>::default();
        let not_after = Gauge::<i64, AtomicI64>::default();
        let admin_closed = Family::<ClosedLabels, Counter>::default();
        let rules_reloads = Family::<ReloadLabels, Counter>::default();
        let policy_generation = Gauge::<i64, AtomicI64>::default();
        policy_generation.set(-1);
        let worker_threads = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "runtime_worker_threads",
            "Threads the proxy's runtime runs connections on (sized from the container's CPU limit unless fixed)",
            worker_threads.clone(),
        );
        registry.register(
            "build",
            "The proxy's version: 1, labelled",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "connections_open",
            "Connections currently spliced",
            open.clone(),
        );
        registry.register(
            "connections",
            "Connections spliced since start (handshake completed)",
            total.clone(),
        );
        registry.register(
            "bytes",
            "Bytes spliced; flow=in is from the side that opened the connection",
            bytes.clone(),
        );
        registry.register(
            "handshake_failures",
            "Connections refused or failed before splicing, by reason",
            failures.clone(),
        );
        registry.register(
            "certificate_reloads",
            "Certificate sets seen on disk, by whether they were taken into use",
            reloads.clone(),
        );
        registry.register(
            "certificate_expiration_timestamp_seconds",
            "notAfter of the workload certificate in use, as a Unix timestamp",
            not_after.clone(),
        );
        registry.register(
            "rules_reloads",
            "Peer rules files seen on disk, by whether they were taken into use",
            rules_reloads.clone(),
        );
        registry.register(
            "policy_generation",
            "metadata.generation of the MTLSPolicy whose peer rules are in force; -1 before any",
            policy_generation.clone(),
        );
        registry.register(
            "admin_connections_closed",
            "Admin-port connections the proxy closed itself, by reason: evicted (a newer connection \
             took its slot at the cap), request_timeout, idle_timeout, refused (at the cap with \
             every connection being answered)",
            admin_closed.clone(),
        );
        Self {
            registry,
            open,
            total,
            bytes,
            failures,
            reloads,
            not_after,
            rules_reloads,
            policy_generation,
            admin_closed,
            worker_threads,
        }
    }

    pub fn mapping(&self, name: &str, direction: &'static str) -> MappingMetrics {
        let labels = MappingLabels {
            mapping: name.to_string(),
            direction,
        };
        let flow = |flow| FlowLabels {
            mapping: name.to_string(),
            direction,
            flow,
        };
        // One statement per lookup: a Family's read guard lives to the end of its statement, and a
        // second get_or_create on the same Family within it would wait for itself.
        let open = self.open.get_or_create(&labels).clone();
        let total = self.total.get_or_create(&labels).clone();
        let bytes_in = self.bytes.get_or_create(&flow("in")).clone();
        let bytes_out = self.bytes.get_or_create(&flow("out")).clone();
        MappingMetrics {
            name: name.to_string(),
            direction,
            open,
            total,
            bytes_in,
            bytes_out,
            failures: self.failures.clone(),
        }
    }

    pub fn reload(&self, accepted: bool) {
        let result = if accepted { "accepted" } else { "rejected" };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    pub fn rules_reload(&self, accepted: bool) {
        let result = if accepted { "accepted" } else { "rejected" };
        self.rules_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    pub fn set_worker_threads(&self, threads: usize) {
        self.worker_threads
            .set(i64::try_from(threads).unwrap_or(i64::MAX));
    }

    pub fn set_policy_generation(&self, generation: i64) {
        self.policy_generation.set(generation);
    }

    pub fn admin_connection_closed(&self, reason: &'static str) {
        self.admin_closed
            .get_or_create(&ClosedLabels { reason })
            .inc();
    }

    pub fn set_not_after(&self, unix_seconds: i64) {
        self.not_after.set(unix_seconds);
    }

    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_per_mapping_series() {
        let metrics = Metrics::new();
        let m = metrics.mapping("web", "inbound");
        m.total.inc();
        m.bytes_in.inc_by(10);
        m.failed("not_allowed");
        metrics.set_not_after(1_700_000_000);
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"rolemesh_proxy_connections_total{mapping="web",direction="inbound"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"rolemesh_proxy_bytes_total{mapping="web",direction="inbound",flow="in"} 10"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"rolemesh_proxy_handshake_failures_total{mapping="web",direction="inbound",reason="not_allowed"} 1"#), "{text}");
        assert!(
            text.contains("rolemesh_proxy_certificate_expiration_timestamp_seconds 1700000000"),
            "{text}"
        );
    }
}
