//! The listeners: one accept loop for both directions, and what each direction does with a
//! connection it accepted (an inbound peer is TLS-accepted and spliced to the app, after a PROXY
//! protocol header or through an HTTP server when its mapping's callerIdentity asks; an outbound
//! app connection is spliced to an upstream dialled over mTLS).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use rolemesh_profile::{inspect_certificate, proxy_config::CallerIdentity};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, watch},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, warn};

use crate::{
    caller::{Caller, proxy_protocol_header, serve_http},
    metrics::MappingMetrics,
    read_ahead::ReadAhead,
    splice::{SpliceEnd, splice},
    state::{ActiveGuard, Shared},
    verify::classify_handshake_error,
};

/// Back-off after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A refusal: a bounded metric label and a human-readable detail.
type Refusal = (&'static str, String);

/// One mapping's listener and what it does with a connection.
pub enum Mapping {
    /// `config.inbound[index]`.
    Inbound { index: usize },
    /// `config.outbound[index]`, whose upstream the peer rules in force name.
    Outbound { index: usize },
}

/// Accepts connections until `stop` changes, each handled in a task of its own that counts as an
/// open connection until it ends.
pub async fn serve(
    shared: Arc<Shared>,
    mapping: Mapping,
    listener: TcpListener,
    metrics: MappingMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let mapping = Arc::new(mapping);
    let metrics = Arc::new(metrics);
    loop {
        // Inbound, the permit is taken before accepting: under a flood, connections wait in the
        // kernel's bounded backlog rather than in our memory, and each handshake in flight is
        // bounded by the handshake timeout, so good peers keep getting through. Outbound
        // connections come from our own app and are not bounded.
        let permit = match *mapping {
            Mapping::Inbound { .. } => tokio::select! {
                permit = shared.handshakes.clone().acquire_owned() => match permit {
                    Ok(permit) => Some(permit),
                    Err(_) => break,
                },
                _ = stop.changed() => break,
            },
            Mapping::Outbound { .. } => None,
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
        let mapping = mapping.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _active = ActiveGuard::new(&shared);
            let result = match &*mapping {
                Mapping::Inbound { index } => {
                    inbound(&shared, *index, &metrics, tcp, peer, permit).await
                }
                Mapping::Outbound { index } => outbound(&shared, *index, &metrics, tcp, peer).await,
            };
            if let Err((reason, detail)) = result {
                refuse(&metrics, peer, reason, &detail);
            }
        });
    }
}

/// A peer connecting to an inbound mapping: TLS-accepted (which verifies it), then spliced to the
/// app on 127.0.0.1.
async fn inbound(
    shared: &Shared,
    index: usize,
    metrics: &MappingMetrics,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: Option<OwnedSemaphorePermit>,
) -> Result<(), Refusal> {
    let config = shared
        .with_tls(|c| c.inbound[index].clone())
        .ok_or_else(not_ready)?;
    let _ = tcp.set_nodelay(true);
    // The header's destination; asked of the kernel only where a header is sent.
    let local = match shared.config.inbound[index].caller_identity {
        CallerIdentity::ProxyProtocolV2 => tcp.local_addr().ok(),
        _ => None,
    };
    let accepted = within_handshake_timeout(shared, async {
        TlsAcceptor::from(config)
            .accept(ReadAhead::new(tcp))
            .await
            .map_err(|e| classify_handshake_error(&e))
    })
    .await;
    drop(permit);
    let tls = accepted?;
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
    let listener = &shared.config.inbound[index];
    let app_port = listener.app_port;
    match listener.caller_identity {
        CallerIdentity::L4 => {
            let app = connect_app(app_port).await?;
            spliced(shared, metrics, peer, tls, app).await;
        }
        CallerIdentity::ProxyProtocolV2 => {
            let caller = Caller::of(tls.get_ref().1).map_err(|e| ("not_in_profile", e))?;
            let local = local.ok_or(("io", "no local address".to_string()))?;
            let header = proxy_protocol_header(peer, local, &caller)
                .map_err(|e| ("proxy_header", e.to_string()))?;
            let mut app = connect_app(app_port).await?;
            // Before any byte of the peer's: the app reads the header first.
            app.write_all(&header)
                .await
                .map_err(|error| ("app_unreachable", error.to_string()))?;
            spliced(shared, metrics, peer, tls, app).await;
        }
        CallerIdentity::Http => {
            let caller = Caller::of(tls.get_ref().1).map_err(|e| ("not_in_profile", e))?;
            metrics.total.inc();
            metrics.open.inc();
            let idle = Duration::from_secs(shared.config.limits.idle_timeout_secs.max(1));
            let served = serve_http(tls, app_port, caller, idle, metrics).await;
            metrics.open.dec();
            if let Err(error) = served {
                debug!(mapping = metrics.name(), %peer, %error, "HTTP connection ended with an error");
            }
        }
    }
    Ok(())
}

async fn connect_app(app_port: u16) -> Result<TcpStream, Refusal> {
    let app = TcpStream::connect(("127.0.0.1", app_port))
        .await
        .map_err(|error| ("app_unreachable", error.to_string()))?;
    let _ = app.set_nodelay(true);
    Ok(app)
}

/// The app connecting to an outbound mapping: the upstream the rules in force name is dialled
/// over mTLS (which verifies the upstream), then the two are spliced.
async fn outbound(
    shared: &Shared,
    index: usize,
    metrics: &MappingMetrics,
    local: TcpStream,
    peer: SocketAddr,
) -> Result<(), Refusal> {
    let config = shared
        .with_tls(|c| c.outbound[index].clone())
        .ok_or_else(not_ready)?;
    let upstream = shared
        .rules
        .load()
        .as_deref()
        .and_then(|rules| rules.outbound.get(index).cloned().flatten())
        .ok_or_else(|| {
            (
                "no_rules",
                "the peer rules in force name no upstream for this mapping".to_string(),
            )
        })?;
    let _ = local.set_nodelay(true);
    let server_name = &upstream.server_name;
    let tls = within_handshake_timeout(shared, async {
        let tcp = TcpStream::connect(upstream.address.as_str())
            .await
            .map_err(|e| ("upstream_unreachable", e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(config)
            .connect(server_name.clone(), ReadAhead::new(tcp))
            .await
            .map_err(|e| classify_handshake_error(&e))
    })
    .await?;
    spliced(shared, metrics, peer, local, tls).await;
    Ok(())
}

fn not_ready() -> Refusal {
    ("not_ready", "no certificate loaded yet".to_string())
}

/// `handshake`, refused if it does not finish within the configured handshake timeout.
async fn within_handshake_timeout<T>(
    shared: &Shared,
    handshake: impl Future<Output = Result<T, Refusal>>,
) -> Result<T, Refusal> {
    let timeout = Duration::from_millis(shared.config.limits.handshake_timeout_ms);
    tokio::time::timeout(timeout, handshake)
        .await
        .unwrap_or_else(|_| {
            Err((
                "handshake_timeout",
                "no handshake within the timeout".to_string(),
            ))
        })
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
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
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
