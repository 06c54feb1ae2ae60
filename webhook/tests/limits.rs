//! The webhook's bounds against clients that try to take it down, against the in-process server
//! over real TLS: slow clients are closed by the deadlines, connections beyond the cap do not
//! starve a real request, and a review that would expand into gigabytes when decoded is refused
//! by its measured shape, with a review answer that names the limit.
//!
//! No Kubernetes here: the reviews are for pods the webhook skips without asking the API server
//! (kube-system), or that it refuses before deciding; its lookups point at a closed port.

use std::{
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::core::{DynamicObject, admission::AdmissionReview};
use rolemesh_webhook::{
    inject::InjectorConfig,
    limits::{Limits, MIB, inspect_review},
    lookup::Lookups,
    metrics::Metrics,
    server::{AppState, MemoryBudget, serve_tls},
    serving::{ServingCertResolver, certified_key},
};
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsConnector, client::TlsStream};

struct Server {
    port: u16,
    connector: TlsConnector,
    metrics: Arc<Metrics>,
}

async fn start(limits: Limits) -> Result<Server> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])?.self_signed(&key)?;
    let resolver = Arc::new(ServingCertResolver::new(
        certified_key(&cert.pem(), &key.serialize_pem())?,
        "test".into(),
    ));
    // Nothing listens on port 9: the reviews here never need the API server.
    let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse()?))?;
    let metrics = Arc::new(Metrics::new());
    let lookups = Lookups::start(
        client,
        "default".into(),
        Some("mesh.test".into()),
        metrics.clone(),
    );
    let state = AppState {
        lookups,
        injector: Arc::new(InjectorConfig::default()),
        own_namespace: "rolemesh".into(),
        metrics: metrics.clone(),
        memory: MemoryBudget::new(&limits),
        limits: Arc::new(limits),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(serve_tls(listener, state, resolver));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone())?;
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Server {
        port,
        connector: TlsConnector::from(Arc::new(config)),
        metrics,
    })
}

impl Server {
    async fn tcp(&self) -> Result<TcpStream> {
        Ok(TcpStream::connect(("127.0.0.1", self.port)).await?)
    }

    async fn tls(&self) -> Result<TlsStream<TcpStream>> {
        let tcp = self.tcp().await?;
        Ok(self
            .connector
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?)
    }

    /// POSTs `body` on a new connection and returns the status code and the response body.
    async fn review(&self, body: &[u8]) -> Result<(u16, String)> {
        let mut tls = self.tls().await?;
        tls.write_all(
            format!(
                "POST /mutate-pod HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await?;
        tls.write_all(body).await?;
        let mut out = Vec::new();
        // The server may close without close_notify; what arrived is the answer.
        let _ = tls.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").context("no response head")?;
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no status code")?;
        Ok((code, body.to_string()))
    }
}

/// Waits (briefly: the server counts a close just after closing) for `reason` to be counted
/// `at_least` times.
async fn closed_count_reaches(
    metrics: &Metrics,
    reason: &'static str,
    at_least: usize,
) -> Result<()> {
    let started = Instant::now();
    loop {
        let count = usize::try_from(metrics.connections_closed_with(reason))?;
        if count >= at_least {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(2) {
            bail!("{count} connections closed for {reason}, expected at least {at_least}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads one HTTP response (head and a `Content-Length` body) from a kept-alive connection.
async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> Result<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if body.len() >= length {
                return Ok(text);
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .context("no response within 10s")??;
        if n == 0 {
            bail!("the connection closed mid-response: {text}");
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Seconds until the server closes `stream`, while `dribble` is written to it one byte per
/// `every`; fails after `give_up`.
async fn closed_after<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    dribble: &[u8],
    every: Duration,
    give_up: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let dribble = dribble.to_vec();
    let writing = tokio::spawn(async move {
        for byte in dribble.iter().cycle() {
            if writer.write_all(&[*byte]).await.is_err() || writer.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    let mut buf = [0u8; 4096];
    let outcome = tokio::time::timeout(give_up, async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    writing.abort();
    outcome.map_err(|_| anyhow::anyhow!("still open after {give_up:?}"))?;
    Ok(started.elapsed())
}

fn review(namespace: &str, spec: Value) -> Vec<u8> {
    rolemesh_testkit::pod_review(namespace, spec)
}

/// A review the webhook answers without the API server: pods in kube-system are never injected.
fn skipped_review() -> Vec<u8> {
    review(
        "kube-system",
        json!({ "containers": [{ "name": "app", "image": "app:1" }] }),
    )
}

fn empty_containers_review(size: usize) -> Vec<u8> {
    rolemesh_testkit::empty_containers_review("shop", size)
}

fn status_kib(field: &str) -> u64 {
    rolemesh_testkit::procfs::status_kib(std::process::id(), field)
}

fn short_deadlines() -> Limits {
    Limits {
        handshake_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(3),
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_its_body_at_one_byte_a_second_is_closed_by_the_request_deadline()
-> Result<()> {
    let server = start(short_deadlines()).await?;
    // Headers complete, the body never: hyper alone has no timeout for a body.
    let mut tls = server.tls().await?;
    tls.write_all(
        b"POST /mutate-pod HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n{",
    )
    .await?;
    let after = closed_after(tls, b" ", Duration::from_secs(1), Duration::from_secs(8)).await?;
    println!("slow body closed after {after:?}");
    ensure!(
        after >= Duration::from_millis(1500) && after <= Duration::from_millis(3500),
        "closed after {after:?}, the request deadline is 2s"
    );
    closed_count_reaches(&server.metrics, "request_timeout", 1).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_a_slow_tls_handshake_are_closed_too() -> Result<()> {
    let server = start(short_deadlines()).await?;
    let tls = server.tls().await?;
    let headers = closed_after(
        tls,
        b"POST /mutate-pod HTTP/1.1\r\nHost: localhost\r\n",
        Duration::from_millis(200),
        Duration::from_secs(8),
    )
    .await?;
    ensure!(
        headers <= Duration::from_millis(3500),
        "slow headers closed after {headers:?}"
    );
    // Plain bytes where a ClientHello should be: the start of a TLS record, then nothing more
    // than a byte a second.
    let tcp = server.tcp().await?;
    let handshake = closed_after(
        tcp,
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01],
        Duration::from_secs(1),
        Duration::from_secs(8),
    )
    .await?;
    ensure!(
        handshake <= Duration::from_millis(2500),
        "slow handshake closed after {handshake:?}, the handshake timeout is 1s"
    );
    closed_count_reaches(&server.metrics, "handshake_timeout", 1).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_gets_the_request_deadline_again_and_an_idle_timeout() -> Result<()>
{
    let server = start(short_deadlines()).await?;
    let body = skipped_review();
    let request = format!(
        "POST /mutate-pod HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut tls = server.tls().await?;
    // Three quick requests across more than the request deadline: served, not cut.
    for _ in 0..3 {
        tls.write_all(request.as_bytes()).await?;
        tls.write_all(&body).await?;
        let answer = read_response(&mut tls).await?;
        ensure!(
            answer.contains("\"allowed\":true"),
            "a kept-alive request is answered: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    // Then the next request dribbled: the deadline counts from its first byte.
    let slow = closed_after(
        tls,
        request.as_bytes(),
        Duration::from_millis(300),
        Duration::from_secs(8),
    )
    .await?;
    ensure!(
        slow <= Duration::from_millis(3500),
        "slow second request closed after {slow:?}"
    );
    // And a connection that only waits is closed after the idle timeout.
    let mut idle = server.tls().await?;
    idle.write_all(request.as_bytes()).await?;
    idle.write_all(&body).await?;
    read_response(&mut idle).await?;
    let mut buf = vec![0u8; 1024];
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(8), idle.read(&mut buf)).await;
    ensure!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "idle connection closed"
    );
    let after = started.elapsed();
    ensure!(
        after >= Duration::from_millis(2500) && after <= Duration::from_millis(4500),
        "idle connection closed after {after:?}, the idle timeout is 3s"
    );
    closed_count_reaches(&server.metrics, "idle_timeout", 1).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_do_not_starve_a_real_request() -> Result<()> {
    const CAP: usize = 8;
    let server = start(Limits {
        max_connections: CAP,
        // Long enough that no deadline frees a slot during the test.
        request_timeout: Duration::from_secs(60),
        handshake_timeout: Duration::from_secs(60),
        ..Limits::default()
    })
    .await?;
    let before = status_kib("VmRSS:");
    // Twenty slow clients, each with a request begun and never finished.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut tls = server.tls().await?;
        tls.write_all(b"POST /mutate-pod HTTP/1.1\r\nHost: localhost\r\n")
            .await?;
        tls.flush().await?;
        slow.push(tls);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "RSS with {} slow connections: {} KiB more",
        slow.len(),
        status_kib("VmRSS:").saturating_sub(before)
    );
    // A real request is answered at once, evicting the oldest slow connection.
    let started = Instant::now();
    let (code, body) =
        tokio::time::timeout(Duration::from_secs(5), server.review(&skipped_review()))
            .await
            .context("a real request waited more than 5s at the cap")??;
    ensure!(
        code == 200 && body.contains("\"allowed\":true"),
        "{code} {body}"
    );
    println!(
        "real request at the cap answered in {:?}",
        started.elapsed()
    );
    // No more than the cap stay open: the oldest were closed as new ones came.
    let mut open = 0;
    for tls in &mut slow {
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_millis(200), tls.read(&mut buf)).await {
            Err(_) => open += 1,
            Ok(Ok(0) | Err(_)) => {}
            Ok(Ok(_)) => bail!("a slow connection got an answer to half a request"),
        }
    }
    ensure!(
        open <= CAP,
        "{open} slow connections still open, the cap is {CAP}"
    );
    ensure!(open >= CAP - 2, "only the oldest are evicted: {open} open");
    closed_count_reaches(&server.metrics, "evicted", 20 - CAP).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mebibyte_of_empty_containers_is_refused_by_name_without_decoding_it() -> Result<()> {
    let server = start(Limits::default()).await?;
    let body = empty_containers_review(MIB);
    ensure!(body.len() <= MIB && body.len() > MIB - 16);
    let before = status_kib("VmHWM:");
    let (code, answer) = server.review(&body).await?;
    let grown = status_kib("VmHWM:").saturating_sub(before);
    println!("peak RSS grew by {grown} KiB answering a 1 MiB review of empty containers");
    ensure!(code == 200, "answered as a review: {code} {answer}");
    let answer: Value = serde_json::from_str(&answer)?;
    let response = &answer["response"];
    ensure!(response["uid"] == "review-1", "{answer}");
    ensure!(response["allowed"] == false, "{answer}");
    let message = response["status"]["message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("containers") && message.contains("--max-containers"),
        "the message names the limit: {message}"
    );
    ensure!(answer["apiVersion"] == "admission.k8s.io/v1");
    // Decoded, these containers would take hundreds of MiB; the answer takes a few.
    ensure!(grown < 64 * 1024, "peak RSS grew by {grown} KiB");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_bodies_get_http_errors() -> Result<()> {
    let server = start(Limits::default()).await?;
    // Refused by its Content-Length, before a byte of the body is read.
    let mut tls = server.tls().await?;
    tls.write_all(
        format!(
            "POST /mutate-pod HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
            4 * MIB
        )
        .as_bytes(),
    )
    .await?;
    let answer = read_response(&mut tls).await?;
    ensure!(
        answer.starts_with("HTTP/1.1 413") && answer.contains("--max-body-mib"),
        "{answer}"
    );
    let (code, body) = server.review(b"{\"request\": [").await?;
    ensure!(
        code == 400 && body.contains("not an AdmissionReview"),
        "{code} {body}"
    );
    // Within the limits, a refusal without a request uid cannot be a review answer.
    let (code, _) = server
        .review(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#)
        .await?;
    ensure!(code == 400);
    Ok(())
}

/// Reviews at and around the limits, in the shapes that expand most when decoded; each is
/// built only when asked for, so that a child process measuring one holds no other.
type Case = (&'static str, fn() -> Result<Vec<u8>>);

/// `body` with the string `"@LIST@"` replaced by a JSON array of `n` copies of `item`, built as
/// text: building a large `Value` first would leave its freed memory in the child's heap, where
/// the decode would reuse it unseen by RSS.
fn with_list(body: Vec<u8>, n: usize, item: &str) -> Result<Vec<u8>> {
    let text = String::from_utf8(body)?;
    let list = format!("[{}]", vec![item; n].join(","));
    ensure!(text.contains("\"@LIST@\""), "no list placeholder");
    Ok(text.replacen("\"@LIST@\"", &list, 1).into_bytes())
}

fn full_review(request: Value) -> Result<Vec<u8>> {
    let mut request = request;
    for (key, value) in [
        ("uid", json!("u")),
        (
            "kind",
            json!({ "group": "", "version": "v1", "kind": "Pod" }),
        ),
        (
            "resource",
            json!({ "group": "", "version": "v1", "resource": "pods" }),
        ),
        ("operation", json!("CREATE")),
        ("userInfo", json!({})),
        ("namespace", json!("shop")),
    ] {
        request[key] = value;
    }
    Ok(serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request,
    }))?)
}

const DECODE_CASES: &[Case] = &[
    ("256 empty containers", || {
        with_list(review("shop", json!({ "containers": "@LIST@" })), 256, "{}")
    }),
    ("1024 empty volumes", || {
        with_list(
            review("shop", json!({ "containers": [], "volumes": "@LIST@" })),
            1024,
            "{}",
        )
    }),
    ("empty projected sources", || {
        with_list(
            review(
                "shop",
                json!({ "containers": [], "volumes": [{ "name": "p", "projected": { "sources": "@LIST@" } }] }),
            ),
            20_000,
            "{}",
        )
    }),
    ("empty env entries", || {
        with_list(
            review(
                "shop",
                json!({ "containers": [{ "name": "a", "env": "@LIST@" }] }),
            ),
            50_000,
            "{}",
        )
    }),
    ("empty tolerations", || {
        with_list(
            review("shop", json!({ "tolerations": "@LIST@", "containers": [] })),
            40_000,
            "{}",
        )
    }),
    ("numbers in supplementalGroups", || {
        with_list(
            review(
                "shop",
                json!({ "securityContext": { "supplementalGroups": "@LIST@" }, "containers": [] }),
            ),
            100_000,
            "0",
        )
    }),
    ("a real pod with managed fields", || {
        let env = format!(
            "[{}]",
            (0..200)
                .map(|i| format!(r#"{{"name":"VAR_{i}","valueFrom":{{"fieldRef":{{"fieldPath":"metadata.name"}}}}}}"#))
                .collect::<Vec<_>>()
                .join(",")
        );
        let container = format!(
            r#"{{"name":"app","image":"registry.example/app:1.2.3","env":{env},"ports":[{{"containerPort":8080,"name":"http"}}],"volumeMounts":[{{"name":"data","mountPath":"/data"}}],"readinessProbe":{{"httpGet":{{"path":"/ready","port":8080}}}},"resources":{{"requests":{{"cpu":"100m","memory":"128Mi"}}}}}}"#
        );
        let fields = format!(
            "{{{}}}",
            (0..2000)
                .map(|i| format!(r#""f:k{i}":{{".":{{}},"f:name":{{}}}}"#))
                .collect::<Vec<_>>()
                .join(",")
        );
        let body = full_review(json!({
            "object": {
                "metadata": { "name": "p", "labels": { "app": "shop" },
                    "managedFields": [{ "manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": "@FIELDS@" }] },
                "spec": { "containers": "@LIST@" },
            },
        }))?;
        let text = String::from_utf8(with_list(body, 4, &container)?)?;
        Ok(text.replacen("\"@FIELDS@\"", &fields, 1).into_bytes())
    }),
    ("options as a generic tree", || {
        with_list(
            full_review(
                json!({ "options": "@LIST@", "object": { "spec": { "containers": [] } } }),
            )?,
            20_000,
            r#"{"a":[1],"b":{"c":"d"}}"#,
        )
    }),
];

const CASE_VAR: &str = "ROLEMESH_TEST_DECODE_CASE";

/// Run by [`the_estimate_bounds_what_decoding_takes`] in a process of its own, so that the peak
/// RSS it reports belongs to one decode.
#[test]
#[ignore = "run one case per process by the_estimate_bounds_what_decoding_takes"]
fn decode_one_case() -> Result<()> {
    let index: usize = std::env::var(CASE_VAR)?.parse()?;
    let (name, build) = DECODE_CASES.get(index).context("no such case")?;
    let body = &build()?;
    // Decoding first runs code that is paged in from the binary, which RSS counts: a small
    // review of every shape first, so that the peak below is the decode's memory.
    let warm_up = full_review(json!({
        "options": [{ "a": [1] }],
        "object": {
            "metadata": { "managedFields": [{ "fieldsV1": { "f:a": { ".": {} } } }] },
            "spec": {
                "containers": [{ "env": [{}], "ports": [{}] }], "tolerations": [{}],
                "volumes": [{ "projected": { "sources": [{}] } }],
            },
        },
    }))?;
    serde_json::from_slice::<AdmissionReview<Pod>>(&warm_up)?;
    serde_json::from_slice::<AdmissionReview<DynamicObject>>(&warm_up)?;
    // Reset the high-water mark to the current RSS (Linux's clear_refs, value 5).
    std::fs::write("/proc/self/clear_refs", "5")?;
    let before = status_kib("VmRSS:");
    // The server decodes generically only when decoding as a Pod failed: one at a time.
    serde_json::from_slice::<AdmissionReview<Pod>>(body)
        .map(drop)
        .with_context(|| format!("{name}: decodes as a Pod review"))?;
    serde_json::from_slice::<AdmissionReview<DynamicObject>>(body)
        .map(drop)
        .with_context(|| format!("{name}: decodes generically"))?;
    let peak = status_kib("VmHWM:").saturating_sub(before);
    println!("PEAK_KIB {peak}");
    Ok(())
}

/// The shape's estimate must never be below what decoding really takes: each case is decoded
/// as the server decodes it (as a Pod review, and generically when that fails) in a child
/// process, whose peak RSS growth is compared with the estimate.
#[test]
fn the_estimate_bounds_what_decoding_takes() -> Result<()> {
    for (index, (name, build)) in DECODE_CASES.iter().enumerate() {
        let body = build()?;
        let shape = inspect_review(&body)?;
        let output = Command::new(std::env::current_exe()?)
            .args([
                "--exact",
                "decode_one_case",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CASE_VAR, index.to_string())
            .output()?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(
            output.status.success(),
            "{name}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let peak_kib: usize = stdout
            .lines()
            .find_map(|l| l.split_once("PEAK_KIB ").map(|(_, peak)| peak))
            .context("no PEAK_KIB line")?
            .trim()
            .parse()?;
        println!(
            "{name}: {} KiB of JSON, estimate {} KiB, decoding took {peak_kib} KiB of RSS",
            body.len() / 1024,
            shape.estimated_bytes / 1024,
        );
        ensure!(
            peak_kib * 1024 <= shape.estimated_bytes,
            "{name}: the estimate of {} KiB is below the {peak_kib} KiB decoding took",
            shape.estimated_bytes / 1024
        );
    }
    Ok(())
}

#[test]
fn a_real_pod_is_far_inside_the_limits() -> Result<()> {
    // 10 containers with 100 environment variables each: a large pod, and still a small
    // fraction of every limit.
    let env: Vec<Value> = (0..100)
        .map(|i| json!({ "name": format!("VAR_{i}"), "value": "x".repeat(40) }))
        .collect();
    let containers: Vec<Value> = (0..10)
        .map(|i| json!({ "name": format!("c{i}"), "image": "app:1", "env": env }))
        .collect();
    let body = review("shop", json!({ "containers": containers }));
    let shape = inspect_review(&body)?;
    let limits = Limits::default();
    shape.check(&limits)?;
    println!(
        "{} KiB review, estimate {} KiB",
        body.len() / 1024,
        shape.estimated_bytes / 1024
    );
    ensure!(shape.estimated_bytes * 8 < limits.max_decoded_bytes);
    Ok(())
}
