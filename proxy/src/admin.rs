//! The plain-HTTP admin port: `/live`, `/ready`, `/metrics`, and the app's own kubelet probes
//! (`/app-health/<container>/<kind>`), which the pod's netfilter rules keep from reaching the app
//! directly. It sees the proxy only through a readiness handle, the metrics registry and the
//! rewritten probes.

use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use http_body_util::{Empty, Full};
use hyper::{Request, Response, StatusCode, body::Bytes, header, service::service_fn};
use hyper_util::rt::TokioIo;
use rolemesh_connections::{ConnectionLimits, Connections, Watched};
use rolemesh_profile::proxy_config::{APP_HEALTH_PREFIX, AppHttpProbe, AppProbe};
use tokio::net::{TcpListener, TcpStream};

use crate::{metrics::Metrics, state::Readiness};

/// A request's headers must arrive within this (from the accept, or from the first byte of a
/// request on a kept-alive connection); a silent or trickling client frees its slot.
const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A kept-alive connection (a Prometheus scrape's) may wait this long for its next request.
const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections open at once (kubelet's probes and a Prometheus scrape need a handful). The
/// port is open to every pod, and each held connection costs a file descriptor and buffers on the
/// thread the data plane runs on. At the cap a new connection evicts the oldest one that is not
/// being answered, so a pod that floods the port without sending requests cannot keep kubelet's
/// probes out: a probe sends its request as soon as it connects, and once read it is not evicted.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// The running admin server; [`AdminServer::stop`] ends it.
pub enum AdminServer {
    /// On the proxy's own (current-thread) runtime.
    Task(tokio::task::JoinHandle<()>),
    /// On a thread of its own, beside a multi-threaded runtime.
    Thread(tokio::sync::oneshot::Sender<()>),
}

impl AdminServer {
    pub fn stop(self) {
        match self {
            Self::Task(task) => task.abort(),
            Self::Thread(stop) => {
                let _ = stop.send(());
            }
        }
    }
}

/// Starts [`serve`]. Under a multi-threaded runtime the admin port gets a thread and a
/// current-thread runtime of its own: the cap's promise that a probe is read before enough newer
/// connections arrive to evict it rests on the accept loop yielding to the connections it
/// spawned, which holds only when both run on one thread (on two, the worker holding the probe's
/// task can be descheduled while the other accepts the flood). It also keeps a flood of the
/// admin port off the threads that carry the data plane.
pub fn start(
    listener: TcpListener,
    readiness: Readiness,
    metrics: Arc<Metrics>,
    app_probes: Arc<[AppProbe]>,
) -> Result<AdminServer, crate::ProxyError> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() == RuntimeFlavor::CurrentThread {
        return Ok(AdminServer::Task(tokio::spawn(serve(
            listener, readiness, metrics, app_probes,
        ))));
    }
    let listener = listener.into_std().map_err(crate::ProxyError::StartAdmin)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(crate::ProxyError::StartAdmin)?;
    // The listener joins the admin runtime's reactor here, under its guard, so that a failure is
    // the start's error rather than a thread that ends with the port.
    let listener = {
        let _guard = runtime.enter();
        TcpListener::from_std(listener).map_err(crate::ProxyError::StartAdmin)?
    };
    let (stop, stopped) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("rolemesh-admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                tokio::select! {
                    () = serve(listener, readiness, metrics, app_probes) => {}
                    _ = stopped => {}
                }
            });
        })
        .map_err(crate::ProxyError::StartAdmin)?;
    Ok(AdminServer::Thread(stop))
}

pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    metrics: Arc<Metrics>,
    app_probes: Arc<[AppProbe]>,
) {
    let connections = Connections::new(ConnectionLimits {
        max_connections: ADMIN_MAX_CONNECTIONS,
        request_timeout: ADMIN_REQUEST_TIMEOUT,
        idle_timeout: ADMIN_IDLE_TIMEOUT,
    });
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // A flood of connects must not keep the thread from the data plane's tasks.
        tokio::task::yield_now().await;
        let Some(lease) = connections.admit() else {
            metrics.admin_connection_closed("refused");
            drop(stream);
            continue;
        };
        let readiness = readiness.clone();
        let metrics = metrics.clone();
        let app_probes = app_probes.clone();
        tokio::spawn(async move {
            let slot = lease.slot().clone();
            let for_requests = slot.clone();
            let closed_metrics = metrics.clone();
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                // The head is in (admin requests have no body worth waiting for): from here the
                // slot is neither timed out nor evicted until the answer is handed to hyper.
                let answering = for_requests.busy();
                let path = request.uri().path().to_string();
                let readiness = readiness.clone();
                let metrics = metrics.clone();
                let app_probes = app_probes.clone();
                async move {
                    let response = if path.starts_with(APP_HEALTH_PREFIX) {
                        probe_app(&app_probes, &path).await
                    } else {
                        respond(&readiness, &metrics, &path)
                    };
                    drop(answering);
                    Ok::<_, Infallible>(response)
                }
            });
            // The slot's deadlines bound the head and the idle time; hyper's header timer would
            // also cut kept-alive connections early.
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(None::<Duration>)
                .serve_connection(TokioIo::new(Watched::new(stream, slot.clone())), service);
            if let Err(closed) = slot.watch(connection).await {
                closed_metrics.admin_connection_closed(closed.as_str());
            }
            drop(lease);
        });
    }
}

/// Runs the original check of the rewritten probe at `path` against the app on 127.0.0.1 and
/// answers as kubelet would judge it: 200 when the app passed (a 2xx or 3xx answer, or an accepted
/// TCP connection), 503 with the reason otherwise, 404 for a probe the pod does not have.
async fn probe_app(app_probes: &[AppProbe], path: &str) -> Response<Full<Bytes>> {
    let Some(probe) = app_probes.iter().find(|p| p.admin_path() == path) else {
        return text(StatusCode::NOT_FOUND, "no such app probe\n".to_string());
    };
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, probe.port));
    let timeout = Duration::from_secs(u64::from(probe.timeout_secs.max(1)));
    let outcome = tokio::time::timeout(timeout, async {
        let stream = TcpStream::connect(address)
            .await
            .map_err(|error| format!("connect to {address}: {error}"))?;
        match &probe.http {
            None => Ok(StatusCode::OK),
            Some(http) => get(stream, address, http).await,
        }
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {}s", timeout.as_secs())));
    match outcome {
        Ok(status) if status.is_success() || status.is_redirection() => text(
            StatusCode::OK,
            format!("app answered {}\n", status.as_u16()),
        ),
        Ok(status) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("app answered {}\n", status.as_u16()),
        ),
        Err(reason) => {
            tracing::debug!(container = %probe.container, kind = %probe.kind, %reason, "app probe failed");
            text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"))
        }
    }
}

/// The HTTP GET kubelet would have sent, through hyper's client.
async fn get(
    stream: TcpStream,
    address: SocketAddr,
    http: &AppHttpProbe,
) -> Result<StatusCode, String> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| format!("HTTP to {address}: {error}"))?;
    let connection = tokio::spawn(connection);
    let mut request = Request::get(http.path.as_str())
        .header(header::HOST, address.to_string())
        .header(header::USER_AGENT, "kube-probe (rolemesh-proxy)");
    for (name, value) in &http.headers {
        // kubelet lets a probe's headers replace its own, Host included.
        if let Some(headers) = request.headers_mut() {
            match (
                header::HeaderName::try_from(name.as_str()),
                header::HeaderValue::try_from(value.as_str()),
            ) {
                (Ok(name), Ok(value)) => {
                    headers.insert(name, value);
                }
                _ => return Err(format!("header {name:?} of the probe is not valid HTTP")),
            }
        }
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|error| format!("probe request: {error}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| format!("HTTP to {address}: {error}"));
    connection.abort();
    Ok(response?.status())
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    response
}

fn respond(readiness: &Readiness, metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/live" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/ready" if readiness.is_ready() => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            match readiness.rules_generation() {
                None => "not ready: no peer rules loaded\n".to_string(),
                Some(_) => "not ready\n".to_string(),
            },
        ),
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    // The generation of the policy whose peer rules are in force, beside the body that probes and
    // scripts read as it always was.
    if path == "/ready"
        && let Some(generation) = readiness.rules_generation()
    {
        response.headers_mut().insert(
            POLICY_GENERATION_HEADER,
            header::HeaderValue::from(generation),
        );
    }
    response
}

/// Response header of `/ready` with the policy generation whose peer rules are in force.
pub const POLICY_GENERATION_HEADER: &str = "x-rolemesh-policy-generation";
