//! Listeners, the reload loop and shutdown.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwapOption;
use rolemesh_profile::{inspect_certificate, proxy_config::ProxyConfig};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::ServerName;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, error, info, warn};

use crate::{
    ProxyError, admin,
    material::{FileSet, Material, MaterialPaths, TlsConfigs},
    metrics::{MappingMetrics, Metrics},
    splice::{ReadAhead, SpliceEnd, splice},
    verify::classify_handshake_error,
};

/// How often the mounted files are compared with what is in use; well inside the one second in
/// which new handshakes must use new material.
const RELOAD_POLL: Duration = Duration::from_millis(250);
/// Back-off after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// State shared by every task of one proxy.
pub struct Shared {
    pub config: ProxyConfig,
    pub provider: Arc<CryptoProvider>,
    pub tls: ArcSwapOption<TlsConfigs>,
    pub metrics: Metrics,
    handshakes: Arc<Semaphore>,
    active: AtomicUsize,
    draining: AtomicBool,
}

impl Shared {
    pub fn is_ready(&self) -> bool {
        self.tls.load().is_some() && !self.draining.load(Ordering::Relaxed)
    }
}

/// Counts a connection as open until dropped, so shutdown can wait for it.
struct ActiveGuard<'a>(&'a Shared);

impl<'a> ActiveGuard<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.active.fetch_add(1, Ordering::Relaxed);
        Self(shared)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
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
    let metrics = Metrics::new();
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
    let mut inbound = Vec::new();
    for (index, mapping) in config.inbound.iter().enumerate() {
        let listener = bind(
            format!("inbound {}", mapping.name),
            format!("0.0.0.0:{}", mapping.port),
        )
        .await?;
        inbound.push((index, listener, metrics.mapping(&mapping.name, "inbound")));
    }
    let mut outbound = Vec::new();
    for (index, mapping) in config.outbound.iter().enumerate() {
        let listener = bind(
            format!("outbound {}", mapping.name),
            format!("127.0.0.1:{}", mapping.local_port),
        )
        .await?;
        let server_name =
            upstream_server_name(&mapping.upstream).map_err(ProxyError::ParseConfig)?;
        outbound.push((
            index,
            listener,
            server_name,
            metrics.mapping(&mapping.name, "outbound"),
        ));
    }

    let shared = Arc::new(Shared {
        handshakes: Arc::new(Semaphore::new(
            config.limits.max_concurrent_handshakes.max(1),
        )),
        config,
        provider,
        tls: ArcSwapOption::empty(),
        metrics,
        active: AtomicUsize::new(0),
        draining: AtomicBool::new(false),
    });
    let paths = MaterialPaths::from_config(&shared.config);
    let mut reloader = Reloader {
        paths,
        last_seen: None,
        read_error_logged: false,
    };
    reloader.poll(&shared);

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for (index, listener, metrics) in inbound {
        tasks.spawn(serve_inbound(
            shared.clone(),
            index,
            listener,
            metrics,
            stop_rx.clone(),
        ));
    }
    for (index, listener, name, metrics) in outbound {
        tasks.spawn(serve_outbound(
            shared.clone(),
            index,
            listener,
            name,
            metrics,
            stop_rx.clone(),
        ));
    }
    let admin = tokio::spawn(admin::serve(admin_listener, shared.clone()));
    let reload = tokio::spawn({
        let shared = shared.clone();
        let mut stop = stop_rx.clone();
        async move {
            let mut interval = tokio::time::interval(RELOAD_POLL);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => reloader.poll(&shared),
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
    shared.draining.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    let _ = reload.await;
    let drain = Duration::from_secs(shared.config.limits.drain_timeout_secs);
    let open = shared.active.load(Ordering::Relaxed);
    info!(
        open,
        drain_timeout_secs = drain.as_secs(),
        "stopped accepting; draining"
    );
    let deadline = tokio::time::Instant::now() + drain;
    while shared.active.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = shared.active.load(Ordering::Relaxed);
    if left > 0 {
        warn!(
            open = left,
            "drain timeout reached; closing remaining connections"
        );
    } else {
        info!("drained");
    }
    admin.abort();
    Ok(())
}

struct Reloader {
    paths: MaterialPaths,
    /// The last set read from disk, taken into use or not: each new set is judged (and a
    /// refusal logged) once.
    last_seen: Option<FileSet>,
    read_error_logged: bool,
}

impl Reloader {
    fn poll(&mut self, shared: &Shared) {
        let files = match self.paths.read() {
            Ok(Some(files)) => files,
            // Swapped while reading; the next poll sees a consistent set.
            Ok(None) => return,
            Err(error) => {
                if !self.read_error_logged {
                    warn!(%error, "cannot read the certificate files; keeping what is in use");
                    self.read_error_logged = true;
                }
                return;
            }
        };
        self.read_error_logged = false;
        if self.last_seen.as_ref() == Some(&files) {
            return;
        }
        let result = Material::validate(&files, &shared.config.trust_domain, &shared.provider)
            .and_then(|material| TlsConfigs::build(material, &shared.config, &shared.provider));
        self.last_seen = Some(files);
        match result {
            Ok(configs) => {
                let material = &configs.material;
                info!(
                    serial = %material.serial_hex,
                    spiffe_id = %material.identity.spiffe_id,
                    role_arn = %material.identity.role_arn,
                    not_after = material.not_after_unix,
                    "certificate set loaded"
                );
                if material.own_chain_revoked {
                    warn!(
                        serial = %material.serial_hex,
                        "a CRL in the trust bundle revokes this workload's own certificate chain; peers holding the same bundle will refuse it until it is re-issued under a CA that is not revoked"
                    );
                }
                shared.metrics.set_not_after(material.not_after_unix);
                shared.metrics.reload(true);
                shared.tls.store(Some(Arc::new(configs)));
            }
            Err(error) => {
                shared.metrics.reload(false);
                let in_use = shared
                    .tls
                    .load()
                    .as_ref()
                    .map(|c| c.material.serial_hex.clone());
                error!(%error, serial_in_use = ?in_use, "certificate set refused; keeping the one in use");
            }
        }
    }
}

async fn serve_inbound(
    shared: Arc<Shared>,
    index: usize,
    listener: TcpListener,
    metrics: MappingMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let metrics = Arc::new(metrics);
    loop {
        // The permit is taken before accepting: under a flood, connections wait in the kernel's
        // bounded backlog rather than in our memory, and each handshake in flight is bounded by
        // the handshake timeout, so good peers keep getting through.
        let permit = tokio::select! {
            permit = shared.handshakes.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(mapping = metrics.name(), %error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let shared = shared.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _active = ActiveGuard::new(&shared);
            let Some(config) = shared.tls.load().as_ref().map(|c| c.inbound[index].clone()) else {
                refuse(&metrics, peer, "not_ready", "no certificate loaded yet");
                return;
            };
            let _ = tcp.set_nodelay(true);
            let timeout = Duration::from_millis(shared.config.limits.handshake_timeout_ms);
            let accepted = tokio::time::timeout(
                timeout,
                TlsAcceptor::from(config).accept(ReadAhead::new(tcp)),
            )
            .await;
            drop(permit);
            let tls = match accepted {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    let (reason, detail) = classify_handshake_error(&error);
                    refuse(&metrics, peer, reason, &detail);
                    return;
                }
                Err(_) => {
                    refuse(
                        &metrics,
                        peer,
                        "handshake_timeout",
                        "no handshake within the timeout",
                    );
                    return;
                }
            };
            if tracing::enabled!(tracing::Level::DEBUG) {
                let id = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| inspect_certificate(c).ok())
                    .map(|i| i.uri_sans.join(","));
                debug!(mapping = metrics.name(), %peer, peer_id = ?id, "peer admitted");
            }
            let app_port = shared.config.inbound[index].app_port;
            let app = match TcpStream::connect(("127.0.0.1", app_port)).await {
                Ok(app) => app,
                Err(error) => {
                    refuse(&metrics, peer, "app_unreachable", &error.to_string());
                    return;
                }
            };
            let _ = app.set_nodelay(true);
            spliced(&shared, &metrics, peer, tls, app).await;
        });
    }
}

async fn serve_outbound(
    shared: Arc<Shared>,
    index: usize,
    listener: TcpListener,
    server_name: ServerName<'static>,
    metrics: MappingMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let metrics = Arc::new(metrics);
    loop {
        let (local, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(mapping = metrics.name(), %error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let shared = shared.clone();
        let metrics = metrics.clone();
        let server_name = server_name.clone();
        tokio::spawn(async move {
            let _active = ActiveGuard::new(&shared);
            let Some(config) = shared
                .tls
                .load()
                .as_ref()
                .map(|c| c.outbound[index].clone())
            else {
                refuse(&metrics, peer, "not_ready", "no certificate loaded yet");
                return;
            };
            let _ = local.set_nodelay(true);
            let upstream = &shared.config.outbound[index].upstream;
            let timeout = Duration::from_millis(shared.config.limits.handshake_timeout_ms);
            let dialled = tokio::time::timeout(timeout, async {
                let tcp = TcpStream::connect(upstream.as_str())
                    .await
                    .map_err(|e| ("upstream_unreachable", e.to_string()))?;
                let _ = tcp.set_nodelay(true);
                TlsConnector::from(config)
                    .connect(server_name, ReadAhead::new(tcp))
                    .await
                    .map_err(|e| classify_handshake_error(&e))
            })
            .await;
            let tls = match dialled {
                Ok(Ok(tls)) => tls,
                Ok(Err((reason, detail))) => {
                    refuse(&metrics, peer, reason, &detail);
                    return;
                }
                Err(_) => {
                    refuse(
                        &metrics,
                        peer,
                        "handshake_timeout",
                        "no handshake within the timeout",
                    );
                    return;
                }
            };
            spliced(&shared, &metrics, peer, local, tls).await;
        });
    }
}

fn refuse(metrics: &MappingMetrics, peer: SocketAddr, reason: &'static str, detail: &str) {
    metrics.failed(reason);
    warn!(
        mapping = metrics.name(),
        direction = metrics.direction(),
        %peer,
        reason,
        detail,
        "connection refused"
    );
}

async fn spliced<A, B>(shared: &Shared, metrics: &MappingMetrics, peer: SocketAddr, a: A, b: B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    metrics.total.inc();
    metrics.open.inc();
    let idle = Duration::from_secs(shared.config.limits.idle_timeout_secs.max(1));
    let end = splice(a, b, idle, metrics).await;
    metrics.open.dec();
    match end {
        SpliceEnd::Closed => {}
        SpliceEnd::Idle => debug!(mapping = metrics.name(), %peer, "idle connection closed"),
        SpliceEnd::Failed(error) => {
            debug!(mapping = metrics.name(), %peer, %error, "connection ended with an error")
        }
    }
}
