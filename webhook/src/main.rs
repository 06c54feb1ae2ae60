//! `rolemesh-webhook`: flags and environment in, the admission server out.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
};

use anyhow::Context as _;
use clap::Parser;
use rolemesh_crds::names::WEBHOOK_SERVING_SECRET;
use rolemesh_profile::logging::{LogFormat, init_logging};
use rolemesh_webhook::{
    inject::InjectorConfig,
    limits::{Limits, MIB, defaults},
    lookup::Lookups,
    metrics::Metrics,
    server::{AppState, MemoryBudget, serve_admin, serve_tls},
    serving::{ServingCertResolver, follow_serving_secret},
};

// Each review allocates and frees thousands of small objects (the decoded Pod, the patch); glibc's
// allocator took ~17% of the webhook's CPU under load, mimalloc a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Injects the rolemesh mTLS proxy into opted-in pods.
#[derive(Debug, Parser)]
#[command(name = "rolemesh-webhook", version)]
struct Args {
    /// TLS listener for POST /mutate-pod.
    #[arg(long, env = "ROLEMESH_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Plain-HTTP listener for /healthz, /readyz and /metrics.
    #[arg(
        long,
        env = "ROLEMESH_WEBHOOK_ADMIN_LISTEN",
        default_value = "0.0.0.0:9443"
    )]
    admin_listen: SocketAddr,
    /// rolemesh's own namespace (never injected; holds the serving certificate Secret).
    #[arg(long, env = "ROLEMESH_NAMESPACE", default_value = "rolemesh")]
    namespace: String,
    /// The MTLSAuthority whose trust domain the proxies use.
    #[arg(long, env = "ROLEMESH_AUTHORITY", default_value = "default")]
    authority: String,
    /// Trust domain to use while the MTLSAuthority is missing.
    #[arg(long, env = "ROLEMESH_TRUST_DOMAIN")]
    trust_domain: Option<String>,
    /// Image of the injected proxy.
    #[arg(
        long,
        env = "ROLEMESH_PROXY_IMAGE",
        default_value = "ghcr.io/rolemesh/rolemesh-proxy:0.1.0"
    )]
    proxy_image: String,
    /// Requests and limits of the injected proxy container, as the JSON of a Kubernetes
    /// ResourceRequirements (the chart passes proxy.resources). Default: requests 10m CPU and
    /// 32Mi, limit 128Mi.
    #[arg(long, env = "ROLEMESH_PROXY_RESOURCES")]
    proxy_resources: Option<String>,
    /// The injected proxy's runtime threads: "auto" (from its CPU limit) or a number (the chart
    /// passes proxy.cores); a pod's rolemesh.dev/proxy-cores annotation overrides it.
    #[arg(long, env = "ROLEMESH_PROXY_CORES")]
    proxy_cores: Option<String>,
    /// The injected proxy's log level, a RUST_LOG filter (the chart passes proxy.logLevel).
    #[arg(long, env = "ROLEMESH_PROXY_LOG_LEVEL")]
    proxy_log_level: Option<String>,
    /// Secret (in --namespace) holding the serving certificate, written by the controller.
    #[arg(long, env = "ROLEMESH_WEBHOOK_TLS_SECRET", default_value = WEBHOOK_SERVING_SECRET)]
    tls_secret: String,
    #[arg(long, env = "ROLEMESH_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(flatten)]
    limits: LimitArgs,
}

/// What one client may cost the webhook; docs/operations.md explains each bound.
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// Connections open at once; at the cap a new connection replaces the oldest one that is not
    /// answering a request.
    #[arg(long, env = "ROLEMESH_WEBHOOK_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS)]
    max_connections: usize,
    /// Seconds for the TLS handshake.
    #[arg(long, env = "ROLEMESH_WEBHOOK_HANDSHAKE_TIMEOUT_SECONDS", default_value_t = defaults::HANDSHAKE_TIMEOUT_SECONDS)]
    handshake_timeout_seconds: u64,
    /// Seconds for a whole request (handshake, headers and body on a new connection); a
    /// connection that has not delivered one by then is closed.
    #[arg(long, env = "ROLEMESH_WEBHOOK_REQUEST_TIMEOUT_SECONDS", default_value_t = defaults::REQUEST_TIMEOUT_SECONDS)]
    request_timeout_seconds: u64,
    /// Seconds a kept-alive connection may wait for its next request.
    #[arg(long, env = "ROLEMESH_WEBHOOK_IDLE_TIMEOUT_SECONDS", default_value_t = defaults::IDLE_TIMEOUT_SECONDS)]
    idle_timeout_seconds: u64,
    /// Largest request body in MiB (413 beyond it).
    #[arg(long, env = "ROLEMESH_WEBHOOK_MAX_BODY_MIB", default_value_t = defaults::MAX_BODY_MIB)]
    max_body_mib: usize,
    /// MiB of request bodies buffered at once, all connections together.
    #[arg(long, env = "ROLEMESH_WEBHOOK_BODY_MEMORY_MIB", default_value_t = defaults::BODY_MEMORY_MIB)]
    body_memory_mib: usize,
    /// Estimated MiB one decoded review may take; larger reviews are refused.
    #[arg(long, env = "ROLEMESH_WEBHOOK_MAX_DECODED_MIB", default_value_t = defaults::MAX_DECODED_MIB)]
    max_decoded_mib: usize,
    /// Estimated MiB of decoded reviews held at once.
    #[arg(long, env = "ROLEMESH_WEBHOOK_DECODE_MEMORY_MIB", default_value_t = defaults::DECODE_MEMORY_MIB)]
    decode_memory_mib: usize,
    /// Containers, initContainers and ephemeralContainers of one pod, together; pods with more
    /// are refused.
    #[arg(long, env = "ROLEMESH_WEBHOOK_MAX_CONTAINERS", default_value_t = defaults::MAX_CONTAINERS)]
    max_containers: usize,
    /// Volumes of one pod; pods with more are refused.
    #[arg(long, env = "ROLEMESH_WEBHOOK_MAX_VOLUMES", default_value_t = defaults::MAX_VOLUMES)]
    max_volumes: usize,
}

impl LimitArgs {
    fn limits(&self) -> anyhow::Result<Limits> {
        use std::time::Duration;
        let limits = Limits {
            max_connections: self.max_connections,
            handshake_timeout: Duration::from_secs(self.handshake_timeout_seconds),
            request_timeout: Duration::from_secs(self.request_timeout_seconds),
            idle_timeout: Duration::from_secs(self.idle_timeout_seconds),
            max_body_bytes: self.max_body_mib.saturating_mul(MIB),
            body_memory_bytes: self.body_memory_mib.saturating_mul(MIB),
            max_decoded_bytes: self.max_decoded_mib.saturating_mul(MIB),
            decode_memory_bytes: self.decode_memory_mib.saturating_mul(MIB),
            max_containers: self.max_containers,
            max_volumes: self.max_volumes,
        };
        limits.validate()?;
        Ok(limits)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let args = Args::parse();
    init_logging(args.log_format);
    let limits = args.limits.limits()?;
    tracing::info!(?limits, "limits per client");
    let client = kube::Client::try_default()
        .await
        .context("failed to connect to the Kubernetes API")?;
    let metrics = Arc::new(Metrics::new());
    let lookups = Lookups::start(
        client.clone(),
        args.authority.clone(),
        args.trust_domain.clone(),
        metrics.clone(),
    );
    let resources = match &args.proxy_resources {
        None => rolemesh_webhook::inject::default_resources(),
        Some(text) => serde_json::from_str(text).with_context(|| {
            format!("--proxy-resources / ROLEMESH_PROXY_RESOURCES is not a Kubernetes ResourceRequirements in JSON (e.g. {{\"requests\":{{\"cpu\":\"10m\"}}}}): {text}")
        })?,
    };
    let injector = InjectorConfig {
        proxy_image: args.proxy_image.clone(),
        resources,
        log_level: args
            .proxy_log_level
            .clone()
            .filter(|level| !level.is_empty()),
        cores: match args
            .proxy_cores
            .as_deref()
            .filter(|cores| !cores.is_empty())
        {
            None => None,
            Some(cores) => Some(cores.parse().map_err(|why| {
                anyhow::anyhow!(
                    "--proxy-cores / ROLEMESH_PROXY_CORES (the chart's proxy.cores): {why}"
                )
            })?),
        },
        ..InjectorConfig::default()
    };
    let state = AppState {
        lookups,
        injector: Arc::new(injector),
        own_namespace: args.namespace.clone().into(),
        metrics: metrics.clone(),
        memory: MemoryBudget::new(&limits),
        limits: Arc::new(limits),
    };

    // Until the controller has written the serving certificate there is nothing to serve.
    let resolver = Arc::new(ServingCertResolver::new(placeholder_key()?, String::new()));
    let loaded = Arc::new(AtomicBool::new(false));
    tokio::spawn(follow_serving_secret(
        client,
        args.namespace.clone(),
        args.tls_secret.clone(),
        resolver.clone(),
        metrics,
        loaded.clone(),
    ));
    tokio::spawn(serve_admin(args.admin_listen, state.clone(), loaded));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to bind {}", args.listen))?;
    tracing::info!(listen = %args.listen, admin = %args.admin_listen, "serving admission requests");
    serve_tls(listener, state, resolver).await?;
    Ok(())
}

/// A throwaway self-signed certificate served only until the real one is loaded (readiness stays
/// false meanwhile, so no API server call depends on it).
fn placeholder_key() -> anyhow::Result<rustls::sign::CertifiedKey> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = rcgen::CertificateParams::new(vec!["rolemesh-webhook.invalid".to_string()])?
        .self_signed(&key)?;
    Ok(rolemesh_webhook::serving::certified_key(
        &cert.pem(),
        &key.serialize_pem(),
    )?)
}
