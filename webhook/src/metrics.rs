//! Prometheus metrics served on `/metrics`.

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::Registry,
};

type Labels = [(&'static str, &'static str); 1];

/// The webhook's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    admissions: Family<Labels, Counter>,
    lookups: Family<Labels, Counter>,
    duration: Histogram,
    serving_cert_not_after: Gauge,
    serving_cert_rotations: Counter,
    connections_closed: Family<Labels, Counter>,
    open_connections: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("rolemesh_webhook");
        let admissions = Family::<Labels, Counter>::default();
        registry.register(
            "admissions",
            "Admission reviews answered, by outcome (injected, already_injected, skipped, denied, \
             error, bad_request, too_large, overloaded)",
            admissions.clone(),
        );
        let lookups = Family::<Labels, Counter>::default();
        registry.register(
            "policy_lookups",
            "Lookups of covering MTLSPolicies (and the API reads behind them: namespaces, ServiceAccounts), by how they were answered: cache, api, coalesced (shared a concurrent lookup's API read) or throttled (the API read budget was spent)",
            lookups.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.000_125, 2.0, 16));
        registry.register(
            "admission_duration_seconds",
            "Time to answer one admission review",
            duration.clone(),
        );
        let serving_cert_not_after = Gauge::default();
        registry.register(
            "serving_certificate_expiration_timestamp_seconds",
            "notAfter of the serving certificate in use, as a Unix time",
            serving_cert_not_after.clone(),
        );
        let serving_cert_rotations = Counter::default();
        registry.register(
            "serving_certificate_loads",
            "Serving certificates loaded (the first one and every rotation)",
            serving_cert_rotations.clone(),
        );
        let connections_closed = Family::<Labels, Counter>::default();
        registry.register(
            "connections_closed",
            "Connections the webhook closed itself, by reason (request_timeout, idle_timeout, \
             handshake_timeout, evicted, refused)",
            connections_closed.clone(),
        );
        registry.register(
            "build",
            "The webhook's version: 1, labelled",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Connections open on the admission listener",
            open_connections.clone(),
        );
        Self {
            registry,
            connections_closed,
            open_connections,
            admissions,
            lookups,
            duration,
            serving_cert_not_after,
            serving_cert_rotations,
        }
    }

    pub fn admission(&self, outcome: &'static str, seconds: f64) {
        self.admissions.get_or_create(&[("outcome", outcome)]).inc();
        self.duration.observe(seconds);
    }

    pub fn lookup(&self, source: &'static str) {
        self.lookups.get_or_create(&[("source", source)]).inc();
    }

    pub fn serving_cert_loaded(&self, not_after_unix: i64) {
        self.serving_cert_not_after.set(not_after_unix);
        self.serving_cert_rotations.inc();
    }

    pub fn connection_closed(&self, reason: &'static str) {
        self.connections_closed
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn set_open_connections(&self, open: usize) {
        self.open_connections
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    /// Count of connections closed for this reason so far.
    pub fn connections_closed_with(&self, reason: &'static str) -> u64 {
        self.connections_closed
            .get_or_create(&[("reason", reason)])
            .get()
    }

    /// Count of admissions with this outcome so far.
    pub fn admissions_with(&self, outcome: &'static str) -> u64 {
        self.admissions.get_or_create(&[("outcome", outcome)]).get()
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
