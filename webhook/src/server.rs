//! The HTTP side: AdmissionReview in, AdmissionReview out, over rustls with the serving
//! certificate resolved per handshake; plus a plain-HTTP admin listener.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use k8s_openapi::api::core::v1::Pod;
use kube::core::{
    DynamicObject, GroupVersionKind,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::{
    error::{Error, Result},
    inject::{InjectorConfig, injection_patch},
    lookup::Lookups,
    metrics::Metrics,
    selection::{PodSelection, select_pod},
    serving::{ServingCertResolver, server_config},
};

/// Largest AdmissionReview accepted; bigger bodies get 413.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// How long a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The webhook answers within this, well inside the registration's `timeoutSeconds`.
pub const DECISION_TIMEOUT: Duration = Duration::from_secs(5);

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    pub lookups: Lookups,
    pub injector: Arc<InjectorConfig>,
    pub own_namespace: Arc<str>,
    pub metrics: Arc<Metrics>,
}

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

async fn mutate_pod(State(state): State<AppState>, body: Bytes) -> Response {
    let started = Instant::now();
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

/// The admission router: `POST /mutate-pod`, with a body limit (413 beyond it) and panics turned
/// into 500s so one bad request never takes the server down.
pub fn admission_router(state: AppState) -> Router {
    Router::new()
        .route("/mutate-pod", post(mutate_pod))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .with_state(state)
}

/// Serves `router` over TLS on `listener`, resolving the certificate per handshake.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    resolver: Arc<ServingCertResolver>,
) -> Result<()> {
    let acceptor = TlsAcceptor::from(server_config(resolver)?);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    debug!(%error, %peer, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    let router = router.clone();
                    async move {
                        tower::ServiceExt::oneshot(router, request.map(axum::body::Body::new)).await
                    }
                },
            );
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true);
            if let Err(error) = builder
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await
            {
                debug!(%error, %peer, "connection ended with an error");
            }
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
