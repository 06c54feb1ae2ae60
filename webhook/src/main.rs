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
    lookup::Lookups,
    metrics::Metrics,
    server::{AppState, admission_router, serve_admin, serve_tls},
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
    /// Secret (in --namespace) holding the serving certificate, written by the controller.
    #[arg(long, env = "ROLEMESH_WEBHOOK_TLS_SECRET", default_value = WEBHOOK_SERVING_SECRET)]
    tls_secret: String,
    #[arg(long, env = "ROLEMESH_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let args = Args::parse();
    init_logging(args.log_format);
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
    let injector = InjectorConfig {
        proxy_image: args.proxy_image.clone(),
        ..InjectorConfig::default()
    };
    let state = AppState {
        lookups,
        injector: Arc::new(injector),
        own_namespace: args.namespace.clone().into(),
        metrics: metrics.clone(),
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
    serve_tls(listener, admission_router(state), resolver).await?;
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
