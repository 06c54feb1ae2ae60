//! The HTTP side: AdmissionReview in, AdmissionReview out, over rustls with the serving
//! certificate resolved per handshake; plus a plain-HTTP admin listener.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{Request, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::core::{
    DynamicObject, GroupVersionKind, TypeMeta,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
};
use rolemesh_connections::{Connections, Slot, Watched};
use tokio::{
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::{
    error::{Error, Result},
    inject::{InjectorConfig, injection_patch},
    limits::{Limits, ReviewShape, inspect_review},
    lookup::Lookups,
    metrics::Metrics,
    selection::{PodSelection, select_pod},
    serving::{ServingCertResolver, server_config},
};

/// The webhook answers within this, well inside the registration's `timeoutSeconds`.
pub const DECISION_TIMEOUT: Duration = Duration::from_secs(5);
/// hyper's read buffer grows up to this; it bounds the request head and what one connection
/// buffers ahead of the handler.
const MAX_READ_BUFFER: usize = 64 * 1024;

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    pub lookups: Lookups,
    pub injector: Arc<InjectorConfig>,
    pub own_namespace: Arc<str>,
    pub metrics: Arc<Metrics>,
    pub limits: Arc<Limits>,
    pub memory: Arc<MemoryBudget>,
}

/// The memory request bodies and decoded reviews may take together, in KiB permits.
pub struct MemoryBudget {
    body: Arc<Semaphore>,
    body_kib: u32,
    decode: Arc<Semaphore>,
    decode_kib: u32,
}

impl MemoryBudget {
    pub fn new(limits: &Limits) -> Arc<Self> {
        let body_kib = kib(limits.body_memory_bytes);
        let decode_kib = kib(limits.decode_memory_bytes);
        Arc::new(Self {
            body: Arc::new(Semaphore::new(body_kib as usize)),
            body_kib,
            decode: Arc::new(Semaphore::new(decode_kib as usize)),
            decode_kib,
        })
    }

    /// Waits until `bytes` of body may be buffered.
    async fn for_body(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let permits = kib(bytes).clamp(1, self.body_kib.max(1));
        self.body.clone().acquire_many_owned(permits).await.ok()
    }

    /// Waits until a review estimated at `bytes` may be decoded.
    async fn for_decode(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let permits = kib(bytes).clamp(1, self.decode_kib.max(1));
        self.decode.clone().acquire_many_owned(permits).await.ok()
    }
}

fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

/// The connection a request came on, for the handler to mark it busy.
#[derive(Clone)]
struct ConnectionSlot(Arc<Slot>);

/// Decides one admission request: `Ok(None)` admits unchanged, `Ok(Some(patch))` admits with the
/// patch, `Err` refuses with the error's message.
pub async fn decide(
    state: &AppState,
    request: &AdmissionRequest<Pod>,
) -> Result<Option<json_patch::Patch>> {
    require_pod(&request.kind)?;
    let pod = request
        .object
        .as_ref()
        .ok_or_else(|| Error::BadRequest("the request carries no object".into()))?;
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .ok_or_else(|| Error::BadRequest("the request names no namespace".into()))?;
    let pod_name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone())
        .unwrap_or_default();
    match select_pod(pod, &namespace, &state.own_namespace) {
        PodSelection::Skip(why) => {
            debug!(namespace = %namespace, pod = %pod_name, reason = why, "not injecting");
            return Ok(None);
        }
        PodSelection::Inject => {}
        PodSelection::AskNamespace => {
            if !state.lookups.namespace_opted_in(&namespace).await? {
                return Ok(None);
            }
        }
    }
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_string());
    let policy = state
        .lookups
        .covering_policy(&namespace, &service_account, &pod_name)
        .await?;
    let trust_domain = state.lookups.trust_domain().await?;
    let patch = injection_patch(pod, &policy, &trust_domain, &state.injector)?;
    Ok(Some(patch))
}

/// rolemesh mutates Pods only; a registration that sends anything else is refused by name.
fn require_pod(kind: &GroupVersionKind) -> Result<()> {
    if kind.kind != "Pod" || !kind.group.is_empty() {
        return Err(Error::BadRequest(format!(
            "expected a Pod, got {}/{}",
            kind.group, kind.kind
        )));
    }
    Ok(())
}

/// The response as the API server reads it: kube-core writes the patch as a JSON array of
/// numbers (Go accepts it, but it is ~2.7x larger and slower to write and read); Kubernetes'
/// own encoding of bytes is base64, as here.
#[derive(serde::Serialize)]
struct ResponseBody<'a> {
    #[serde(flatten)]
    response: &'a AdmissionResponse,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewBody<'a> {
    api_version: &'a str,
    kind: &'a str,
    response: ResponseBody<'a>,
}

fn review_response(mut response: AdmissionResponse) -> Response {
    use base64::Engine as _;
    let patch = response
        .patch
        .take()
        .map(|patch| base64::engine::general_purpose::STANDARD.encode(patch));
    let body = ReviewBody {
        api_version: &response.types.api_version,
        kind: &response.types.kind,
        response: ResponseBody {
            response: &response,
            patch,
        },
    };
    match serde_json::to_vec(&body) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("failed to encode the response: {error}"),
        )
            .into_response(),
    }
}

fn bad_request(state: &AppState, started: Instant, message: String) -> Response {
    state
        .metrics
        .admission("bad_request", started.elapsed().as_secs_f64());
    (StatusCode::BAD_REQUEST, message).into_response()
}

/// A body that did not decode as a review of a Pod (`pod_error` says why, when it got that far),
/// decoded again generically so that the answer says what is wrong: 400 when there is no usable
/// review, a denial naming the kind or the decoding error otherwise.
fn refuse_undecodable(
    state: &AppState,
    started: Instant,
    body: &[u8],
    pod_error: Option<serde_json::Error>,
) -> Response {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(error) => {
            return bad_request(
                state,
                started,
                format!("the body is not an AdmissionReview: {error}"),
            );
        }
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(request) => request,
        Err(error) => {
            return bad_request(
                state,
                started,
                format!("the AdmissionReview has no usable request: {error}"),
            );
        }
    };
    let message = match require_pod(&request.kind) {
        Err(error) => error.to_string(),
        Ok(()) => format!(
            "the Pod in the request could not be decoded: {}",
            pod_error.map(|e| e.to_string()).unwrap_or_default()
        ),
    };
    warn!(namespace = ?request.namespace, %message, "refused a request");
    state
        .metrics
        .admission("error", started.elapsed().as_secs_f64());
    review_response(AdmissionResponse::from(&request).deny(message))
}

/// A review refused before decoding (beyond a limit, or no room to decode it now), answered as
/// a review when it names its request, 400 otherwise.
fn refuse_shape(
    state: &AppState,
    started: Instant,
    shape: &ReviewShape,
    outcome: &'static str,
    error: Error,
) -> Response {
    let Some(uid) = shape.uid.clone() else {
        return bad_request(
            state,
            started,
            format!("the AdmissionReview has no request uid: {error}"),
        );
    };
    warn!(%error, namespace = ?shape.namespace, containers = shape.containers, volumes = shape.volumes,
        estimated_bytes = shape.estimated_bytes, "refused a review without decoding it");
    state
        .metrics
        .admission(outcome, started.elapsed().as_secs_f64());
    let mut response = AdmissionResponse::invalid(error.to_string());
    response.uid = uid;
    response.types = TypeMeta {
        api_version: shape
            .api_version
            .clone()
            .unwrap_or_else(|| "admission.k8s.io/v1".to_string()),
        kind: shape
            .kind
            .clone()
            .unwrap_or_else(|| "AdmissionReview".to_string()),
    };
    review_response(response)
}

/// Reads the body within the memory budget: 413 beyond the size limit (by `Content-Length`
/// before reading anything, or while reading). The time it may take is bounded by the
/// connection's request deadline, which closes the connection and drops this future.
async fn read_body(
    state: &AppState,
    request: Request,
) -> Result<(Vec<u8>, OwnedSemaphorePermit), Response> {
    let max = state.limits.max_body_bytes;
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body exceeds {max} bytes, the most rolemesh's webhook reads (--max-body-mib)"),
        )
            .into_response()
    };
    let length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if length.is_some_and(|length| length > max) {
        return Err(too_large());
    }
    let Some(permit) = state.memory.for_body(length.unwrap_or(max)).await else {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response());
    };
    let mut body = Vec::with_capacity(length.unwrap_or(0));
    let mut stream = request.into_body().into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| {
            (
                StatusCode::BAD_REQUEST,
                format!("failed to read the request body: {error}"),
            )
                .into_response()
        })?;
        if body.len() + chunk.len() > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, permit))
}

async fn mutate_pod(State(state): State<AppState>, request: Request) -> Response {
    let started = Instant::now();
    let connection = request.extensions().get::<ConnectionSlot>().cloned();
    let (body, _body_memory) = match read_body(&state, request).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    // A whole request is in: from here the handler's own timeouts bound the time, and the
    // connection must not be evicted while it waits for its answer.
    let _busy = connection.map(|c| c.0.busy());
    // Measured before anything is decoded: a `{}` in the wrong place is kilobytes once decoded.
    let shape = match inspect_review(&body) {
        Ok(shape) => shape,
        Err(error) => {
            return bad_request(
                &state,
                started,
                format!("the body is not an AdmissionReview: {error}"),
            );
        }
    };
    if let Err(error) = shape.check(&state.limits) {
        return refuse_shape(&state, started, &shape, "too_large", error);
    }
    let _decode_memory = match tokio::time::timeout(
        DECISION_TIMEOUT,
        state.memory.for_decode(shape.estimated_bytes),
    )
    .await
    {
        Ok(Some(permit)) => permit,
        _ => {
            let error = Error::Overloaded(format!(
                "no room to decode a review of about {} KiB within {DECISION_TIMEOUT:?} \
                 (--decode-memory-mib)",
                kib(shape.estimated_bytes)
            ));
            return refuse_shape(&state, started, &shape, "overloaded", error);
        }
    };
    // The common case decodes straight into a Pod, with no generic JSON tree in between.
    let request: AdmissionRequest<Pod> = match serde_json::from_slice::<AdmissionReview<Pod>>(&body)
    {
        Ok(review) => match review.try_into() {
            Ok(request) => request,
            Err(_) => return refuse_undecodable(&state, started, &body, None),
        },
        Err(error) => return refuse_undecodable(&state, started, &body, Some(error)),
    };
    let decision = match tokio::time::timeout(DECISION_TIMEOUT, decide(&state, &request)).await {
        Ok(decision) => decision,
        Err(_) => Err(Error::Timeout(DECISION_TIMEOUT)),
    };
    let response = AdmissionResponse::from(&request);
    let (outcome, response) = match decision {
        Ok(None) => ("skipped", response),
        Ok(Some(patch)) if patch.0.is_empty() => ("already_injected", response),
        Ok(Some(patch)) => match response.with_patch(patch) {
            Ok(response) => ("injected", response),
            Err(error) => (
                "error",
                AdmissionResponse::from(&request)
                    .deny(format!("rolemesh could not encode its patch: {error}")),
            ),
        },
        Err(error) => {
            let outcome = if error.is_refusal() {
                "denied"
            } else {
                "error"
            };
            warn!(%error, namespace = ?request.namespace, "refused a pod");
            (
                outcome,
                AdmissionResponse::from(&request).deny(error.to_string()),
            )
        }
    };
    state
        .metrics
        .admission(outcome, started.elapsed().as_secs_f64());
    review_response(response)
}

/// The admission router: `POST /mutate-pod`, with panics turned into 500s so one bad request
/// never takes the server down.
pub fn admission_router(state: AppState) -> Router {
    Router::new()
        .route("/mutate-pod", post(mutate_pod))
        .route("/healthz", get(|| async { "ok" }))
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .with_state(state)
}

/// Serves the admission router over TLS on `listener`, resolving the certificate per handshake,
/// with the connection cap and deadlines of `state.limits`.
pub async fn serve_tls(
    listener: TcpListener,
    state: AppState,
    resolver: Arc<ServingCertResolver>,
) -> Result<()> {
    let acceptor = TlsAcceptor::from(server_config(resolver)?);
    let limits = state.limits.clone();
    let metrics = state.metrics.clone();
    let connections = Connections::new(limits.connections());
    let router = admission_router(state);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Accepted at once whatever the count: left in the kernel's queue, the API server's
        // connections would wait behind every connection a flooding client queued first.
        let Some(lease) = connections.admit() else {
            debug!(%peer, "every connection is busy; closing a new one");
            metrics.connection_closed("refused");
            continue;
        };
        metrics.set_open_connections(connections.open());
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let metrics = metrics.clone();
        let connections = connections.clone();
        let handshake_timeout = limits.handshake_timeout;
        tokio::spawn(async move {
            let slot = lease.slot().clone();
            let connection = async {
                let tls =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(error)) => {
                            debug!(%error, %peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "TLS handshake timed out");
                            metrics.connection_closed("handshake_timeout");
                            return;
                        }
                    };
                let for_requests = slot.clone();
                let service = hyper::service::service_fn(
                    move |mut request: hyper::Request<hyper::body::Incoming>| {
                        let router = router.clone();
                        request
                            .extensions_mut()
                            .insert(ConnectionSlot(for_requests.clone()));
                        async move {
                            tower::ServiceExt::oneshot(router, request.map(axum::body::Body::new))
                                .await
                        }
                    },
                );
                let mut builder = hyper::server::conn::http1::Builder::new();
                // The slot's deadlines bound the request head, the body and the idle time
                // together; hyper's header timer would also cut idle connections early.
                builder
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(None::<Duration>)
                    .max_buf_size(MAX_READ_BUFFER)
                    .keep_alive(true);
                let io = hyper_util::rt::TokioIo::new(Watched::new(tls, slot.clone()));
                if let Err(error) = builder.serve_connection(io, service).await {
                    debug!(%error, %peer, "connection ended with an error");
                }
            };
            if let Err(closed) = lease.slot().watch(connection).await {
                debug!(%peer, reason = closed.as_str(), "closed a connection");
                metrics.connection_closed(closed.as_str());
            }
            drop(lease);
            metrics.set_open_connections(connections.open());
        });
    }
}

/// `/healthz`, `/readyz` (caches synced and a certificate loaded) and `/metrics`, plain HTTP.
pub async fn serve_admin(
    listen: SocketAddr,
    state: AppState,
    cert_loaded: Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(Error::io(format!("binding the admin listener {listen}")))?;
    let ready_state = state.clone();
    let metrics = state.metrics.clone();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready_state.lookups.synced()
                    && cert_loaded.load(std::sync::atomic::Ordering::Acquire);
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics.encode();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        );
    axum::serve(listener, app)
        .await
        .map_err(Error::io("serving the admin listener"))
}
