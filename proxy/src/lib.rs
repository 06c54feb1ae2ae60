//! rolemesh's sidecar proxy. Inbound: a TLS 1.3 listener per mapping that admits only peers whose
//! certificate chains to the trust bundle, follows the rolemesh profile and matches the mapping's
//! allow list, spliced to the app on 127.0.0.1. Outbound: a plain listener on 127.0.0.1 per
//! mapping that dials its upstream over mTLS and checks the upstream's identity. Certificates and
//! the peer rules (allow lists, upstreams and their expected identities) are reloaded from their
//! mounted files without dropping connections; health and Prometheus metrics
//! are served on a separate plain-HTTP admin port.

pub mod admin;
pub mod caller;
pub mod cores;
pub mod listeners;
pub mod material;
pub mod metrics;
pub mod read_ahead;
pub mod rules;
pub mod splice;
pub mod state;
pub mod verify;

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rolemesh_profile::proxy_config::ProxyConfig;
use rustls_pki_types::ServerName;
use tokio::{net::TcpListener, sync::watch};
use tracing::{info, warn};

use crate::{
    listeners::Mapping,
    material::{MaterialPaths, Reloader},
    metrics::Metrics,
    rules::RulesReloader,
    state::Shared,
};

/// How often the mounted files (certificates, trust bundle, peer rules) are compared with what is
/// in use; well inside the one second in which new handshakes must use new material or rules.
const RELOAD_POLL: Duration = Duration::from_millis(250);

/// Everything that can stop the proxy or refuse a reload, named after the action that failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("failed to read the configuration file {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    ParseConfig(String),
    #[error("invalid peer rules: {0}")]
    ParseRules(String),
    #[error(
        "no configuration: pass --config-file or set {}",
        rolemesh_profile::proxy_config::CONFIG_ENV
    )]
    MissingConfig,
    #[error("failed to bind {what} on {address}: {source}")]
    Bind {
        what: String,
        address: String,
        source: std::io::Error,
    },
    #[error("failed to start the admin port's thread: {0}")]
    StartAdmin(std::io::Error),
    #[error("failed to read {path}: {source}")]
    ReadMaterial {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refused the certificate set: {0}")]
    ValidateMaterial(String),
    #[error("failed to build the TLS configuration: {0}")]
    BuildTls(String),
    #[error("failed to build the PROXY protocol header: {0}")]
    BuildProxyHeader(std::io::Error),
}

/// Reads the configuration from a file, or else from the JSON in `inline` (the value of
/// `ROLEMESH_PROXY_CONFIG`), and validates it.
pub fn load_config(file: Option<&Path>, inline: Option<&str>) -> Result<ProxyConfig, ProxyError> {
    let text = match (file, inline) {
        (Some(path), _) => {
            std::fs::read_to_string(path).map_err(|source| ProxyError::ReadConfig {
                path: path.to_path_buf(),
                source,
            })?
        }
        (None, Some(json)) => json.to_string(),
        (None, None) => return Err(ProxyError::MissingConfig),
    };
    ProxyConfig::from_json(&text).map_err(|e| ProxyError::ParseConfig(e.to_string()))
}

/// The TLS name to send when dialling `upstream` (`host:port`). It is only SNI: the upstream is
/// verified by identity, not by name.
pub fn upstream_server_name(upstream: &str) -> Result<ServerName<'static>, String> {
    let (host, _) = upstream
        .rsplit_once(':')
        .ok_or("upstream must be host:port")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|e| format!("upstream host {host:?} is not a DNS name or IP address: {e}"))
}

/// Runs the proxy until `shutdown` resolves, then stops accepting and drains open connections
/// for at most `limits.drainTimeoutSecs`.
pub async fn run(
    config: ProxyConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let metrics = Arc::new(Metrics::new());
    metrics.set_worker_threads(tokio::runtime::Handle::current().metrics().num_workers());
    let bind = |what: String, address: String| async move {
        TcpListener::bind(&address)
            .await
            .map_err(|source| ProxyError::Bind {
                what,
                address,
                source,
            })
    };
    let admin_listener = bind(
        "the admin port".into(),
        format!("{}:{}", config.admin_address, config.admin_port),
    )
    .await?;
    let mut bound = Vec::new();
    for (index, mapping) in config.inbound.iter().enumerate() {
        let listener = bind(
            format!("inbound {}", mapping.name),
            format!("0.0.0.0:{}", mapping.port),
        )
        .await?;
        bound.push((
            Mapping::Inbound { index },
            listener,
            metrics.mapping(&mapping.name, "inbound"),
        ));
    }
    for (index, mapping) in config.outbound.iter().enumerate() {
        let listener = bind(
            format!("outbound {}", mapping.name),
            format!("127.0.0.1:{}", mapping.local_port),
        )
        .await?;
        bound.push((
            Mapping::Outbound { index },
            listener,
            metrics.mapping(&mapping.name, "outbound"),
        ));
    }

    let shared = Arc::new(Shared::new(config, provider, metrics));
    let mut reloader = Reloader::new(MaterialPaths::from_config(&shared.config));
    let mut rules_reloader = RulesReloader::new(shared.config.rules_file.clone());
    rules_reloader.poll(&shared);
    reloader.poll(&shared);

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for (mapping, listener, metrics) in bound {
        tasks.spawn(listeners::serve(
            shared.clone(),
            mapping,
            listener,
            metrics,
            stop_rx.clone(),
        ));
    }
    let admin = admin::start(
        admin_listener,
        shared.readiness.clone(),
        shared.metrics.clone(),
        shared.config.app_probes.clone().into(),
    )?;
    let reload = tokio::spawn({
        let shared = shared.clone();
        let mut stop = stop_rx.clone();
        async move {
            let mut interval = tokio::time::interval(RELOAD_POLL);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => {
                        rules_reloader.poll(&shared);
                        reloader.poll(&shared);
                    }
                    _ = stop.changed() => break,
                }
            }
        }
    });
    info!(
        inbound = shared.config.inbound.len(),
        outbound = shared.config.outbound.len(),
        admin_port = shared.config.admin_port,
        "rolemesh-proxy started"
    );

    shutdown.await;
    shared.readiness.set_draining();
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    let _ = reload.await;
    let drain = Duration::from_secs(shared.config.limits.drain_timeout_secs);
    let open = shared.open_connections();
    info!(
        open,
        drain_timeout_secs = drain.as_secs(),
        "stopped accepting; draining"
    );
    let deadline = tokio::time::Instant::now() + drain;
    while shared.open_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = shared.open_connections();
    if left > 0 {
        warn!(
            open = left,
            "drain timeout reached; closing remaining connections"
        );
    } else {
        info!("drained");
    }
    admin.stop();
    Ok(())
}
