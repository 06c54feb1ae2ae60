//! Telling the app who the verified peer is, for inbound mappings whose `callerIdentity` is not
//! `l4`: a PROXY protocol v2 header in front of the stream (`proxyProtocolV2`), or identity
//! headers on every HTTP request (`http`).

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    client::conn::TrySendError,
    header::{self, HeaderMap, HeaderName, HeaderValue},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use ppp::v2::{Builder, Command, Protocol, Type, TypeLengthValue, Version, WriteToHeader, Writer};
use rolemesh_profile::inspect_certificate;
use rustls::ServerConnection;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::Mutex,
};
use tracing::debug;

use crate::{ProxyError, metrics::MappingMetrics};

/// Header carrying the peer's SPIFFE ID to the app in `http` mode.
pub const SPIFFE_ID_HEADER: &str = "x-rolemesh-peer-spiffe-id";
/// Header carrying the peer's IAM role ARN to the app in `http` mode.
pub const ROLE_ARN_HEADER: &str = "x-rolemesh-peer-role-arn";

/// PROXY v2 TLV (in the PP2_TYPE_MIN_CUSTOM range) with the peer's SPIFFE ID, a URI string.
pub const PP2_TYPE_SPIFFE_ID: u8 = 0xE0;
/// PROXY v2 TLV (in the PP2_TYPE_MIN_CUSTOM range) with the peer's IAM role ARN.
pub const PP2_TYPE_ROLE_ARN: u8 = 0xE1;
/// PP2_TYPE_SSL client field: PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS. Every
/// inbound connection is TLS with a client certificate verified on this very connection (the
/// proxy resumes no sessions).
pub const PP2_CLIENT_FLAGS: u8 = 0x01 | 0x02 | 0x04;

/// Hop-by-hop headers (RFC 9110, 7.6.1) that belong to the peer's connection, not the app's.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// Largest HTTP/1 read buffer per connection; hyper's default is ~400 KiB.
const H1_MAX_BUF: usize = 64 * 1024;
/// HTTP/2 flow-control windows: bounded, so a peer cannot make one connection hold megabytes.
const H2_STREAM_WINDOW: u32 = 256 * 1024;
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
const H2_MAX_STREAMS: u32 = 128;
/// Longest request head (HTTP/1 headers, HTTP/2 header list) accepted from a peer.
const MAX_HEADER_BYTES: u32 = 64 * 1024;
/// Longest interval between byte-count and idle checks.
const MAX_TICK: Duration = Duration::from_secs(5);

/// The verified peer of one connection, as the app is told about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub spiffe_id: String,
    pub role_arn: String,
    /// OpenSSL's spelling, as PROXY v2 consumers expect it: `TLSv1.3`.
    pub tls_version: &'static str,
    /// The IANA name of the cipher suite, e.g. `TLS_AES_128_GCM_SHA256`.
    pub cipher: String,
}

impl Caller {
    /// The peer of an accepted connection. Its certificate passed verification in the handshake,
    /// so only its identity is read again here.
    pub fn of(connection: &ServerConnection) -> Result<Self, String> {
        let leaf = connection
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("no peer certificate")?;
        let identity = inspect_certificate(leaf)
            .and_then(|info| info.workload_identity())
            .map_err(|e| e.to_string())?;
        let tls_version = match connection.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "unknown",
        };
        let cipher = connection
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            // rustls prefixes TLS 1.3 suites with TLS13_; the IANA names do not.
            .map(|name| name.replacen("TLS13_", "TLS_", 1))
            .unwrap_or_default();
        Ok(Self {
            spiffe_id: identity.spiffe_id.to_string(),
            role_arn: identity.role_arn,
            tls_version,
            cipher,
        })
    }
}

/// The PROXY protocol v2 header sent to the app before the peer's bytes: PROXY command over TCP,
/// `source` the peer's address, `destination` the proxy's address the peer connected to, and the
/// TLVs PP2_TYPE_SSL (client flags [`PP2_CLIENT_FLAGS`], verify 0, sub-TLVs
/// PP2_SUBTYPE_SSL_VERSION and PP2_SUBTYPE_SSL_CIPHER), [`PP2_TYPE_SPIFFE_ID`] and
/// [`PP2_TYPE_ROLE_ARN`].
pub fn proxy_protocol_header(
    source: SocketAddr,
    destination: SocketAddr,
    caller: &Caller,
) -> Result<Vec<u8>, ProxyError> {
    let build = || -> io::Result<Vec<u8>> {
        let mut ssl = Writer::default();
        PP2_CLIENT_FLAGS.write_to(&mut ssl)?;
        // verify: 0 means the client presented a certificate and it was verified.
        0u32.write_to(&mut ssl)?;
        TypeLengthValue::new(Type::SSLVersion, caller.tls_version.as_bytes()).write_to(&mut ssl)?;
        TypeLengthValue::new(Type::SSLCipher, caller.cipher.as_bytes()).write_to(&mut ssl)?;
        let ssl = ssl.finish();
        Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Stream,
            same_family(source, destination),
        )
        .write_tlv(Type::SSL, &ssl)?
        .write_tlv(PP2_TYPE_SPIFFE_ID, caller.spiffe_id.as_bytes())?
        .write_tlv(PP2_TYPE_ROLE_ARN, caller.role_arn.as_bytes())?
        .build()
    };
    build().map_err(ProxyError::BuildProxyHeader)
}

/// Both addresses in one family, as the header has one: an IPv4 address beside an IPv6 one (a
/// dual-stack socket) is written IPv4-mapped rather than dropping both.
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    };
    if source.is_ipv4() == destination.is_ipv4() {
        (source, destination)
    } else {
        (v6(source), v6(destination))
    }
}

/// Makes a request's headers say who the peer is and nothing else about it: every copy of the
/// identity headers the peer sent is removed (header names are case-insensitive, and
/// [`HeaderMap`] holds them lower-cased), then the verified values are set, along with the
/// hop-by-hop headers of the peer's connection.
pub fn set_identity_headers(headers: &mut HeaderMap, caller: &Caller) -> Result<(), String> {
    // Headers the peer's Connection header names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    // HTTP/2 allows `te: trailers` only, which gRPC needs; any other value is hop-by-hop.
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
    let value = |v: &str| HeaderValue::from_str(v).map_err(|e| format!("{v:?}: {e}"));
    // `insert` replaces every value under the name, so no copy of the peer's survives.
    headers.insert(SPIFFE_ID_HEADER, value(&caller.spiffe_id)?);
    headers.insert(ROLE_ARN_HEADER, value(&caller.role_arn)?);
    Ok(())
}

type Body = BoxBody<Bytes, hyper::Error>;

/// The connection to the app a peer connection's requests go over, opened at the first request
/// in the version the peer speaks (HTTP/2 as h2c with prior knowledge), and again if the app
/// closed it.
enum Upstream {
    None,
    Http1(hyper::client::conn::http1::SendRequest<Incoming>),
    Http2(hyper::client::conn::http2::SendRequest<Incoming>),
}

/// Serves one peer connection as HTTP/1.1 or HTTP/2 (whichever the peer speaks) and forwards each
/// request to the app on 127.0.0.1:`app_port` with the peer's identity set. Ends when the peer
/// closes, or when no byte moved either way for `idle`.
pub async fn serve_http<S>(
    io: S,
    app_port: u16,
    caller: Caller,
    idle: Duration,
    metrics: &MappingMetrics,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let read = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let io = Counted {
        inner: io,
        read: read.clone(),
        written: written.clone(),
    };
    let caller = Arc::new(caller);
    let upstream = Arc::new(Mutex::new(Upstream::None));
    let service = hyper::service::service_fn(move |request| {
        let caller = caller.clone();
        let upstream = upstream.clone();
        async move {
            Ok::<_, std::convert::Infallible>(forward(request, app_port, &caller, &upstream).await)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(H1_MAX_BUF)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);

    let tick = (idle / 4).clamp(Duration::from_millis(10), MAX_TICK);
    let (mut reported_in, mut reported_out) = (0u64, 0u64);
    let mut report = || {
        let (now_in, now_out) = (
            read.load(Ordering::Relaxed),
            written.load(Ordering::Relaxed),
        );
        metrics.bytes_in.inc_by(now_in - reported_in);
        metrics.bytes_out.inc_by(now_out - reported_out);
        let moved = now_in != reported_in || now_out != reported_out;
        (reported_in, reported_out) = (now_in, now_out);
        moved
    };
    let mut quiet = Duration::ZERO;
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            () = tokio::time::sleep(tick) => {
                if report() {
                    quiet = Duration::ZERO;
                } else {
                    quiet += tick;
                    if quiet >= idle {
                        debug!(mapping = metrics.name(), "idle HTTP connection closed");
                        break Ok(());
                    }
                }
            }
        }
    };
    report();
    result.map_err(|e| e.to_string())
}

/// One request, forwarded to the app; a failure to reach the app is answered 502.
async fn forward(
    mut request: Request<Incoming>,
    app_port: u16,
    caller: &Caller,
    upstream: &Mutex<Upstream>,
) -> Response<Body> {
    // Forwarding an upgraded stream would need the upgrade machinery on both sides; refused
    // until an app needs it. HTTP/2's extended CONNECT (RFC 8441) is refused for the same reason.
    if request.headers().contains_key(header::UPGRADE)
        || *request.method() == hyper::Method::CONNECT
    {
        return text(
            StatusCode::NOT_IMPLEMENTED,
            "rolemesh-proxy: upgrades and CONNECT are not forwarded in callerIdentity http mode\n",
        );
    }
    if let Err(error) = set_identity_headers(request.headers_mut(), caller) {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("rolemesh-proxy: the peer's identity is not a header value: {error}\n"),
        );
    }
    let http2 = request.version() == hyper::Version::HTTP_2;
    let failed = |error: String| {
        text(
            StatusCode::BAD_GATEWAY,
            &format!("rolemesh-proxy: the app on 127.0.0.1:{app_port} failed: {error}\n"),
        )
    };
    // The lock is held only until the request is handed over, so HTTP/2 streams of one peer
    // connection go to the app concurrently.
    let sent = match send(&mut *upstream.lock().await, request, app_port, http2).await {
        Ok(sent) => sent,
        Err(error) => return failed(error),
    };
    let mut error = match sent.await {
        Ok(response) => return response.map(BodyExt::boxed),
        Err(error) => error,
    };
    // The app closed its keep-alive connection before taking the request (hyper hands back a
    // request it has not begun to write): once more on a new connection.
    let Some(request) = error.take_message() else {
        return failed(error.into_error().to_string());
    };
    let sent = {
        let mut upstream = upstream.lock().await;
        *upstream = Upstream::None;
        send(&mut upstream, request, app_port, http2).await
    };
    match sent {
        Ok(sent) => match sent.await {
            Ok(response) => response.map(BodyExt::boxed),
            Err(error) => failed(error.into_error().to_string()),
        },
        Err(error) => failed(error),
    }
}

type ResponseFuture = Pin<
    Box<
        dyn Future<Output = Result<Response<Incoming>, TrySendError<Request<Incoming>>>>
            + Send
            + 'static,
    >,
>;

/// Hands `request` to the app's connection, opening one first if there is none, the app closed
/// it, or it speaks the other version.
async fn send(
    upstream: &mut Upstream,
    request: Request<Incoming>,
    app_port: u16,
    http2: bool,
) -> Result<ResponseFuture, String> {
    let usable = match upstream {
        Upstream::None => false,
        Upstream::Http1(sender) => !http2 && sender.ready().await.is_ok(),
        Upstream::Http2(sender) => http2 && sender.ready().await.is_ok(),
    };
    if !usable {
        *upstream = connect(app_port, http2).await?;
    }
    Ok(match upstream {
        Upstream::Http1(sender) => Box::pin(sender.try_send_request(request)),
        Upstream::Http2(sender) => Box::pin(sender.try_send_request(request)),
        Upstream::None => return Err("no connection".into()),
    })
}

async fn connect(app_port: u16, http2: bool) -> Result<Upstream, String> {
    let tcp = TcpStream::connect(("127.0.0.1", app_port))
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let io = TokioIo::new(tcp);
    if http2 {
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, "app connection ended with an error");
            }
        });
        Ok(Upstream::Http2(sender))
    } else {
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(H1_MAX_BUF)
            .handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, "app connection ended with an error");
            }
        });
        Ok(Upstream::Http1(sender))
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Counts the bytes moved through it, for the mapping's byte metrics and the idle check.
struct Counted<S> {
    inner: S,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &poll {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{Addresses, Header, TypeLengthValues};

    fn caller() -> Caller {
        Caller {
            spiffe_id: "spiffe://rolemesh.local/ns/shop/sa/frontend".into(),
            role_arn: "arn:aws:iam::111122223333:role/frontend".into(),
            tls_version: "TLSv1.3",
            cipher: "TLS_AES_128_GCM_SHA256".into(),
        }
    }

    /// The header parses back (with ppp) into the peer's address, the SSL TLV with its flags,
    /// verify result and sub-TLVs, and the two identity TLVs.
    #[test]
    fn the_proxy_header_carries_the_peer() {
        let source: SocketAddr = "10.1.2.3:40000".parse().unwrap();
        let destination: SocketAddr = "10.1.2.4:8443".parse().unwrap();
        let bytes = proxy_protocol_header(source, destination, &caller()).unwrap();
        let header = Header::try_from(bytes.as_slice()).unwrap();
        assert_eq!(header.len(), bytes.len(), "nothing after the header");
        assert_eq!(header.command, Command::Proxy);
        assert_eq!(header.protocol, Protocol::Stream);
        assert_eq!(header.addresses, Addresses::from((source, destination)));
        let tlvs: Vec<_> = header.tlvs().map(Result::unwrap).collect();
        assert_eq!(
            tlvs.iter().map(|t| t.kind).collect::<Vec<_>>(),
            [0x20, 0xE0, 0xE1]
        );
        let ssl = &tlvs[0].value;
        assert_eq!(ssl[0], 0x07, "PP2_CLIENT_SSL | CERT_CONN | CERT_SESS");
        assert_eq!(&ssl[1..5], &[0, 0, 0, 0], "verify 0: certificate verified");
        let subs: Vec<_> = TypeLengthValues::from(&ssl[5..])
            .map(Result::unwrap)
            .map(|t| (t.kind, String::from_utf8(t.value.to_vec()).unwrap()))
            .collect();
        assert_eq!(
            subs,
            [
                (0x21, "TLSv1.3".to_string()),
                (0x23, "TLS_AES_128_GCM_SHA256".to_string())
            ]
        );
        assert_eq!(
            &*tlvs[1].value,
            b"spiffe://rolemesh.local/ns/shop/sa/frontend"
        );
        assert_eq!(&*tlvs[2].value, b"arn:aws:iam::111122223333:role/frontend");
    }

    /// An IPv4 peer on an IPv6 socket keeps its address, IPv4-mapped, rather than the header
    /// losing both addresses.
    #[test]
    fn mixed_families_are_written_as_ipv6() {
        let source: SocketAddr = "10.1.2.3:40000".parse().unwrap();
        let destination: SocketAddr = "[fd00::4]:8443".parse().unwrap();
        let bytes = proxy_protocol_header(source, destination, &caller()).unwrap();
        let header = Header::try_from(bytes.as_slice()).unwrap();
        let Addresses::IPv6(addresses) = header.addresses else {
            panic!("{:?}", header.addresses)
        };
        assert_eq!(
            addresses.source_address.to_ipv4_mapped(),
            Some([10, 1, 2, 3].into())
        );
        assert_eq!(addresses.source_port, 40000);
        assert_eq!(addresses.destination_port, 8443);
    }

    /// Every copy of a spoofed identity header goes, whatever its case on the wire, and the
    /// verified values are the only ones left; hop-by-hop headers go too, `te: trailers` stays.
    #[test]
    fn spoofed_identity_headers_are_replaced() {
        let mut headers = HeaderMap::new();
        let evil = "arn:aws:iam::999999999999:role/evil";
        for name in [
            "X-Rolemesh-Peer-Role-Arn",
            "x-rolemesh-peer-role-arn",
            "X-ROLEMESH-PEER-SPIFFE-ID",
        ] {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static(evil),
            );
        }
        headers.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-app", HeaderValue::from_static("kept"));
        set_identity_headers(&mut headers, &caller()).unwrap();
        let all = |name: &HeaderName| {
            headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            all(&HeaderName::from_static(ROLE_ARN_HEADER)),
            ["arn:aws:iam::111122223333:role/frontend"]
        );
        assert_eq!(
            all(&HeaderName::from_static(SPIFFE_ID_HEADER)),
            ["spiffe://rolemesh.local/ns/shop/sa/frontend"]
        );
        for gone in ["connection", "x-hop", "keep-alive"] {
            assert!(!headers.contains_key(gone), "{gone}");
        }
        assert_eq!(headers["te"], "trailers");
        assert_eq!(headers["x-app"], "kept");

        let mut other_te = HeaderMap::new();
        other_te.insert(header::TE, HeaderValue::from_static("gzip"));
        set_identity_headers(&mut other_te, &caller()).unwrap();
        assert!(!other_te.contains_key(header::TE));
    }
}
