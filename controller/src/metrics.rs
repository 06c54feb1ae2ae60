//! Prometheus metrics of the controller, served on `/metrics` next to `/healthz` and `/readyz`.

use std::{
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
};

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

use crate::{
    certificate::IssueReason,
    error::{Error, Result},
    status::Reason,
};

type Labels = Vec<(&'static str, String)>;

fn labels(key: &'static str, value: &str) -> Labels {
    vec![(key, value.to_string())]
}

/// One covered ServiceAccount as the leader's policy cache shows it, for the gauges computed at
/// scrape time.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadGauge {
    pub namespace: String,
    pub policy: String,
    pub service_account: String,
    /// notAfter of its certificate, Unix seconds; `None` when it has none.
    pub not_after: Option<i64>,
    /// Whether it holds a certificate it may use (status reason `Issued` or `IssuedUnverified`).
    pub ready: bool,
}

/// One CA of the authority, for the gauges computed at scrape time.
#[derive(Clone, Debug, PartialEq)]
pub struct CaGauge {
    pub fingerprint: String,
    pub phase: &'static str,
    pub not_after: i64,
}

/// What a scrape reads from the leader's caches.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CacheSnapshot {
    pub workloads: Vec<WorkloadGauge>,
    pub cas: Vec<CaGauge>,
}

type SnapshotSource = Box<dyn Fn() -> CacheSnapshot + Send + Sync>;

type IntGauges = Family<Labels, Gauge<i64, AtomicI64>>;

/// All of the controller's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    issued: Family<Labels, Counter>,
    failed: Family<Labels, Counter>,
    sts_verifications: Family<Labels, Counter>,
    sign_calls: Family<Labels, Counter>,
    sign_errors: Family<Labels, Counter>,
    sign_latency: Family<Labels, Histogram>,
    expiration: IntGauges,
    ready_status: IntGauges,
    ca_expiration: IntGauges,
    ca_phase: IntGauges,
    snapshot: RwLock<Option<SnapshotSource>>,
    reconciles: Family<Labels, Counter>,
    reconcile_duration: Histogram,
    leader: Gauge<i64, AtomicI64>,
    bundles_repaired: Counter,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("rolemesh");
        let issued = Family::<Labels, Counter>::default();
        registry.register(
            "certificates_issued",
            "Workload certificates issued, by why they were issued (new, renewal, rotation, repair)",
            issued.clone(),
        );
        let failed = Family::<Labels, Counter>::default();
        registry.register(
            "certificate_failures",
            "ServiceAccounts left without a valid certificate, by reason",
            failed.clone(),
        );
        let sts_verifications = Family::<Labels, Counter>::default();
        registry.register(
            "sts_verifications",
            "AssumeRoleWithWebIdentity calls made to verify a ServiceAccount's role, by result (verified, refused, transient)",
            sts_verifications.clone(),
        );
        let sign_calls = Family::<Labels, Counter>::default();
        registry.register(
            "signer_sign_calls",
            "Sign calls made to the CA signer",
            sign_calls.clone(),
        );
        let sign_errors = Family::<Labels, Counter>::default();
        registry.register(
            "signer_sign_errors",
            "Failed Sign calls, by class (throttled, denied, key_disabled, unavailable, network)",
            sign_errors.clone(),
        );
        let sign_latency = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 14))
        });
        registry.register(
            "signer_sign_duration_seconds",
            "Latency of Sign calls to the CA signer (KMS or local)",
            sign_latency.clone(),
        );
        // Computed from the leader's caches at each scrape (cert-manager's way): a standby
        // replica, whose caches nobody reconciles from, exports none of them.
        let expiration = IntGauges::default();
        registry.register(
            "certificate_expiration_timestamp_seconds",
            "notAfter of each covered ServiceAccount's certificate, as a Unix timestamp (leader only)",
            expiration.clone(),
        );
        let ready_status = IntGauges::default();
        registry.register(
            "certificate_ready_status",
            "1 for the condition (True, False) of each covered ServiceAccount's certificate: True when it holds one it may use (leader only)",
            ready_status.clone(),
        );
        let ca_expiration = IntGauges::default();
        registry.register(
            "ca_expiration_timestamp_seconds",
            "notAfter of each CA certificate of the trust bundle, by fingerprint and phase (leader only)",
            ca_expiration.clone(),
        );
        let ca_phase = IntGauges::default();
        registry.register(
            "ca_phase",
            "1 for the phase (Prepared, Active, Retiring) of each CA of the trust bundle (leader only)",
            ca_phase.clone(),
        );
        let reconciles = Family::<Labels, Counter>::default();
        registry.register(
            "reconciles",
            "MTLSPolicy reconciliations, by result",
            reconciles.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "reconcile_duration_seconds",
            "Duration of MTLSPolicy reconciliations",
            reconcile_duration.clone(),
        );
        registry.register(
            "build",
            "The controller's version: 1, labelled",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let leader = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        let bundles_repaired = Counter::default();
        registry.register(
            "trust_bundles_repaired",
            "rolemesh-trust-bundle ConfigMaps that someone else had changed, restored",
            bundles_repaired.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                issued,
                failed,
                sts_verifications,
                sign_calls,
                sign_errors,
                sign_latency,
                expiration,
                ready_status,
                ca_expiration,
                ca_phase,
                snapshot: RwLock::new(None),
                reconciles,
                reconcile_duration,
                leader,
                bundles_repaired,
                ready: AtomicBool::new(false),
            }),
        }
    }

    pub fn certificate_issued(&self, why: IssueReason) {
        self.inner
            .issued
            .get_or_create(&labels("reason", why.as_str()))
            .inc();
    }

    pub fn certificate_failed(&self, reason: Reason) {
        self.inner
            .failed
            .get_or_create(&labels("reason", reason.as_str()))
            .inc();
    }

    pub fn sts_verification(&self, result: &'static str) {
        self.inner
            .sts_verifications
            .get_or_create(&labels("result", result))
            .inc();
    }

    pub fn sign_call(&self, signer: &'static str, seconds: f64, error: Option<&'static str>) {
        self.inner
            .sign_calls
            .get_or_create(&labels("signer", signer))
            .inc();
        self.inner
            .sign_latency
            .get_or_create(&labels("signer", signer))
            .observe(seconds);
        if let Some(class) = error {
            self.inner
                .sign_errors
                .get_or_create(&vec![
                    ("signer", signer.to_string()),
                    ("class", class.to_string()),
                ])
                .inc();
        }
    }

    /// Sign calls made so far through `signer` ("kms" or "local").
    pub fn sign_calls(&self, signer: &'static str) -> u64 {
        self.inner
            .sign_calls
            .get_or_create(&labels("signer", signer))
            .get()
    }

    /// Certificates issued so far, all reasons together.
    pub fn certificates_issued(&self) -> u64 {
        IssueReason::ALL
            .iter()
            .map(|why| {
                self.inner
                    .issued
                    .get_or_create(&labels("reason", why.as_str()))
                    .get()
            })
            .sum()
    }

    /// Where scrapes read the per-workload and per-CA gauges from.
    pub fn set_snapshot_source(&self, source: impl Fn() -> CacheSnapshot + Send + Sync + 'static) {
        if let Ok(mut slot) = self.inner.snapshot.write() {
            *slot = Some(Box::new(source));
        }
    }

    /// Sets the gauges computed from the caches to `snapshot`, dropping every series it does not
    /// name (a workload or CA that is gone).
    fn show_snapshot(&self, snapshot: &CacheSnapshot) {
        let inner = &self.inner;
        for family in [
            &inner.expiration,
            &inner.ready_status,
            &inner.ca_expiration,
            &inner.ca_phase,
        ] {
            family.clear();
        }
        for workload in &snapshot.workloads {
            let labels: Labels = vec![
                ("namespace", workload.namespace.clone()),
                ("policy", workload.policy.clone()),
                ("service_account", workload.service_account.clone()),
            ];
            if let Some(not_after) = workload.not_after {
                inner.expiration.get_or_create(&labels).set(not_after);
            }
            for (condition, value) in [("True", workload.ready), ("False", !workload.ready)] {
                let mut labels = labels.clone();
                labels.push(("condition", condition.to_string()));
                inner
                    .ready_status
                    .get_or_create(&labels)
                    .set(i64::from(value));
            }
        }
        for ca in &snapshot.cas {
            inner
                .ca_expiration
                .get_or_create(&vec![
                    ("fingerprint", ca.fingerprint.clone()),
                    ("phase", ca.phase.to_string()),
                ])
                .set(ca.not_after);
            for phase in ["Prepared", "Active", "Retiring"] {
                inner
                    .ca_phase
                    .get_or_create(&vec![
                        ("fingerprint", ca.fingerprint.clone()),
                        ("phase", phase.to_string()),
                    ])
                    .set(i64::from(phase == ca.phase));
            }
        }
    }

    pub fn reconciled(&self, result: &str, seconds: f64) {
        self.inner
            .reconciles
            .get_or_create(&labels("result", result))
            .inc();
        self.inner.reconcile_duration.observe(seconds);
    }

    pub fn trust_bundles_repaired(&self, count: usize) {
        self.inner
            .bundles_repaired
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }

    pub fn set_leader(&self, leader: bool) {
        self.inner.leader.set(i64::from(leader));
    }

    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }

    pub fn encode(&self) -> String {
        let snapshot = match self.inner.snapshot.read() {
            Ok(source) if self.inner.leader.get() == 1 => {
                source.as_ref().map(|source| source()).unwrap_or_default()
            }
            _ => CacheSnapshot::default(),
        };
        self.show_snapshot(&snapshot);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.inner.registry);
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz`.
pub async fn serve(listen: SocketAddr, metrics: Metrics) -> Result<()> {
    use axum::{Router, http::StatusCode, routing::get};
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| Error::ServeMetrics {
            address: listen.to_string(),
            source,
        })?;
    let ready_metrics = metrics.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready_metrics.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .await
        .map_err(|source| Error::ServeMetrics {
            address: listen.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> CacheSnapshot {
        CacheSnapshot {
            workloads: vec![
                WorkloadGauge {
                    namespace: "shop".into(),
                    policy: "web".into(),
                    service_account: "frontend".into(),
                    not_after: Some(1_900_000_000),
                    ready: true,
                },
                WorkloadGauge {
                    namespace: "shop".into(),
                    policy: "web".into(),
                    service_account: "unverified".into(),
                    not_after: None,
                    ready: false,
                },
            ],
            cas: vec![CaGauge {
                fingerprint: "ab12".into(),
                phase: "Active",
                not_after: 1_950_000_000,
            }],
        }
    }

    /// The leader exports one series per workload and CA from the caches at each scrape; a
    /// workload that left, and every series on a standby, is gone.
    #[test]
    fn cache_gauges_are_the_leaders_and_follow_the_cache() {
        let metrics = Metrics::new();
        let shown = Arc::new(std::sync::Mutex::new(snapshot()));
        let source = shown.clone();
        metrics.set_snapshot_source(move || source.lock().expect("snapshot").clone());
        metrics.set_leader(true);
        let text = metrics.encode();
        for series in [
            r#"rolemesh_certificate_expiration_timestamp_seconds{namespace="shop",policy="web",service_account="frontend"} 1900000000"#,
            r#"rolemesh_certificate_ready_status{namespace="shop",policy="web",service_account="frontend",condition="True"} 1"#,
            r#"rolemesh_certificate_ready_status{namespace="shop",policy="web",service_account="unverified",condition="False"} 1"#,
            r#"rolemesh_ca_expiration_timestamp_seconds{fingerprint="ab12",phase="Active"} 1950000000"#,
            r#"rolemesh_ca_phase{fingerprint="ab12",phase="Active"} 1"#,
            r#"rolemesh_ca_phase{fingerprint="ab12",phase="Retiring"} 0"#,
        ] {
            assert!(text.contains(series), "{series} in\n{text}");
        }
        assert!(
            !text.contains(r#"service_account="unverified"} "#),
            "{text}"
        );
        shown.lock().expect("snapshot").workloads.remove(0);
        assert!(!metrics.encode().contains("frontend"));
        metrics.set_leader(false);
        let standby = metrics.encode();
        assert!(!standby.contains("service_account="), "{standby}");
        assert!(!standby.contains("fingerprint="), "{standby}");
    }
}
