//! Prometheus metrics of the controller, served on `/metrics` next to `/healthz` and `/readyz`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
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
    soonest_expiry: Gauge<i64, AtomicI64>,
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
        let soonest_expiry = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "certificate_soonest_expiry_timestamp_seconds",
            "notAfter of the certificate that expires first, as a Unix timestamp",
            soonest_expiry.clone(),
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
                soonest_expiry,
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

    pub fn set_soonest_expiry(&self, unix_seconds: i64) {
        self.inner.soonest_expiry.set(unix_seconds);
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
