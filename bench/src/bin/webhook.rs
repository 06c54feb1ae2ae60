//! Load generator for `rolemesh-webhook`: sets up a policy on the local control plane, starts one
//! webhook process (pinned to a core with taskset), and drives ~10 KiB Pod AdmissionReviews at it
//! from concurrent TLS clients in four phases: keep-alive connections at an offered rate (the
//! latency targets), keep-alive closed loop (capacity), a new TLS connection with a full handshake
//! per review at an offered rate, and the same closed loop. Prints p50/p99 latency, reviews/s,
//! errors and CPU use, and the ratio to each target. docs/benchmarks.md explains the phases.
//!
//! The webhook's policy, ServiceAccount, namespace and authority lookups are served from its
//! reflector caches, primed from the local API server before the load starts (the first review is
//! checked to be a real injection, so the measured path is the full one).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use rolemesh_bench::stats::{cpu_ms, percentile, rss_kib};
use rolemesh_controller::webhook_tls::{WebhookTlsConfig, reconcile_webhook_tls};
use rolemesh_crds::{MTLSAuthority, MTLSPolicy};
use rolemesh_testkit::{ClusterEnv, try_free_port};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde_json::json;
use tokio::{net::TcpStream, task::JoinSet};
use tokio_rustls::TlsConnector;

/// Benchmarks rolemesh-webhook against the local control plane.
#[derive(Debug, Parser)]
#[command(name = "bench-webhook")]
struct Args {
    /// The webhook binary to start (a --release build).
    #[arg(long, env = "ROLEMESH_WEBHOOK_BIN")]
    webhook_bin: PathBuf,
    /// Core the webhook process is pinned to (taskset -c); the load generator should run on another.
    #[arg(long, default_value = "0")]
    webhook_cpu: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds of load per phase.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Approximate size of each AdmissionReview in bytes.
    #[arg(long, default_value_t = 10 * 1024)]
    review_bytes: usize,
    /// Reviews per second the clients offer together in the paced keep-alive phase.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Reviews per second offered in the paced new-connection phase.
    #[arg(long, default_value_t = 1000.0)]
    new_connection_rate: f64,
    /// Port of the webhook's TLS listener (0: a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Port of the webhook's admin listener (0: a free one).
    #[arg(long, default_value_t = 0)]
    admin_port: u16,
}

fn main() -> Result<()> {
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let mut args = Args::parse();
    for port in [&mut args.port, &mut args.admin_port] {
        if *port == 0 {
            *port = try_free_port()?;
        }
    }
    // One worker thread: the load generator gets the one core taskset gives it.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(run(args))
}

struct Fixture {
    client: Client,
    namespace: String,
    system_namespace: String,
    authority: String,
}

impl Fixture {
    async fn create(client: Client) -> Result<Self> {
        let suffix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
            % 100_000_000;
        let fixture = Self {
            client,
            namespace: format!("rolemesh-bench-{suffix}"),
            system_namespace: format!("rolemesh-bench-{suffix}-sys"),
            authority: format!("rolemesh-bench-{suffix}"),
        };
        let namespaces: Api<Namespace> = Api::all(fixture.client.clone());
        for name in [&fixture.namespace, &fixture.system_namespace] {
            namespaces
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({ "metadata": { "name": name } }))?,
                )
                .await
                .with_context(|| format!("creating namespace {name}"))?;
        }
        Api::<MTLSAuthority>::all(fixture.client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "apiVersion": "rolemesh.dev/v1alpha1", "kind": "MTLSAuthority",
                    "metadata": { "name": fixture.authority },
                    "spec": { "trustDomain": "mesh.bench", "signer": { "type": "local", "local": { "secretName": "k" } } },
                }))?,
            )
            .await
            .context("creating the MTLSAuthority (are the CRDs installed?)")?;
        Api::<ServiceAccount>::namespaced(fixture.client.clone(), &fixture.namespace)
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({ "metadata": { "name": "web" } }))?,
            )
            .await?;
        Api::<MTLSPolicy>::namespaced(fixture.client.clone(), &fixture.namespace)
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "apiVersion": "rolemesh.dev/v1alpha1", "kind": "MTLSPolicy",
                    "metadata": { "name": "web" },
                    "spec": {
                        "serviceAccounts": { "names": ["web"] },
                        "inbound": [{ "name": "http", "port": 8443, "appPort": 8080,
                                      "allow": ["arn:aws:iam::123456789012:role/*"] }],
                        "outbound": [{ "name": "db", "localPort": 9001,
                                       "upstream": format!("db.{}.svc:8443", fixture.namespace),
                                       "expect": [format!("spiffe://mesh.bench/ns/{}/sa/db", fixture.namespace)] }],
                    },
                }))?,
            )
            .await?;
        Ok(fixture)
    }

    async fn delete(&self) {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        for name in [&self.namespace, &self.system_namespace] {
            let _ = namespaces.delete(name, &DeleteParams::default()).await;
        }
        let _ = Api::<MTLSAuthority>::all(self.client.clone())
            .delete(&self.authority, &DeleteParams::default())
            .await;
    }
}

struct Webhook(Child);

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Pod AdmissionReview of about `bytes` bytes: three containers with env, ports and mounts, as a
/// real application pod would be, padded with an annotation to the exact size.
fn review(namespace: &str, bytes: usize) -> Result<Vec<u8>> {
    let container = |name: &str, port: u16| {
        let env: Vec<_> = (0..20)
            .map(|i| json!({ "name": format!("{}_SETTING_{i}", name.to_uppercase()), "value": format!("value-{i}-of-{name}") }))
            .collect();
        json!({
            "name": name, "image": format!("registry.example.com/shop/{name}:1.2.3"),
            "ports": [{ "containerPort": port, "protocol": "TCP" }],
            "env": env,
            "resources": { "requests": { "cpu": "100m", "memory": "128Mi" }, "limits": { "memory": "256Mi" } },
            "volumeMounts": [{ "name": "data", "mountPath": format!("/data/{name}") }],
        })
    };
    let mut review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "00000000-0000-0000-0000-000000000000",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
            "requestResource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": namespace, "operation": "CREATE",
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts", "system:authenticated"] },
            "dryRun": false,
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "generateName": "web-7d4b9c8f6-", "namespace": namespace,
                    "labels": { "app": "web", "pod-template-hash": "7d4b9c8f6", "rolemesh.dev/inject": "true" },
                    "annotations": { "bench.rolemesh.dev/padding": "" },
                },
                "spec": {
                    "serviceAccountName": "web",
                    "containers": [container("web", 8080), container("worker", 8081), container("metrics", 9090)],
                    "volumes": [{ "name": "data", "emptyDir": {} }],
                },
            },
            "oldObject": null,
        },
    });
    let size = serde_json::to_vec(&review)?.len();
    let padding = "x".repeat(bytes.saturating_sub(size));
    review["request"]["object"]["metadata"]["annotations"]["bench.rolemesh.dev/padding"] =
        json!(padding);
    Ok(serde_json::to_vec(&review)?)
}

async fn ready(admin_port: u16) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", admin_port)).await else {
        return false;
    };
    if stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out).await;
    out.starts_with("HTTP/1.1 200")
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(connector: &TlsConnector, port: u16) -> Result<Sender> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let tls = connector
        .connect(
            ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            tcp,
        )
        .await?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Sends one review; `Ok(true)` when the answer is an admission with a patch.
async fn send(sender: &mut Sender, port: u16, body: &Bytes) -> Result<bool> {
    sender.ready().await?;
    let request = hyper::Request::post(format!("https://127.0.0.1:{port}/mutate-pod"))
        .header("host", format!("127.0.0.1:{port}"))
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    // A substring check keeps the load generator's own cost low; the first review is fully parsed.
    Ok(status == 200
        && memfind(&body, b"\"allowed\":true")
        && memfind(&body, b"\"patchType\":\"JSONPatch\""))
}

fn memfind(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

struct Phase {
    latencies_us: Vec<u64>,
    errors: u64,
    elapsed: Duration,
}

/// How the clients pace their reviews.
#[derive(Clone, Copy)]
enum Pacing {
    /// Each client sends its next review as soon as the last is answered: the webhook's capacity.
    ClosedLoop,
    /// The clients together offer this many reviews per second, each on its own schedule, as the
    /// API server does when pods are created at that rate. A review that has to wait for the
    /// client's previous one is charged from its scheduled time, so a slow answer is not hidden
    /// by the reviews it delays (no coordinated omission).
    Rate(f64),
}

async fn load(
    connector: TlsConnector,
    port: u16,
    body: Bytes,
    concurrency: usize,
    duration: Duration,
    reuse: bool,
    pacing: Pacing,
) -> Phase {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = JoinSet::new();
    for client in 0..concurrency {
        let connector = connector.clone();
        let body = body.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 14);
            let mut errors = 0u64;
            let mut sender: Option<Sender> = None;
            // Clients are staggered evenly over one interval so reviews arrive spread out.
            let interval = match pacing {
                Pacing::Rate(rate) => Some(Duration::from_secs_f64(concurrency as f64 / rate)),
                Pacing::ClosedLoop => None,
            };
            let mut next =
                interval.map(|i| started + i.mul_f64(client as f64 / concurrency as f64));
            loop {
                let t0 = match (interval, next.as_mut()) {
                    (Some(interval), Some(scheduled)) => {
                        let due = *scheduled;
                        *scheduled += interval;
                        if due >= deadline {
                            break;
                        }
                        let behind = Instant::now() > due;
                        tokio::time::sleep_until(due.into()).await;
                        // Late because of our own previous review: charge the wait. Late only by
                        // the timer's millisecond granularity: that is the load generator's delay.
                        if behind { due } else { Instant::now() }
                    }
                    _ => {
                        if Instant::now() >= deadline {
                            break;
                        }
                        Instant::now()
                    }
                };
                let outcome = async {
                    let mut current = match sender.take() {
                        Some(s) if reuse && !s.is_closed() => s,
                        _ => connect(&connector, port).await?,
                    };
                    let ok = send(&mut current, port, &body).await?;
                    if reuse {
                        sender = Some(current);
                    }
                    Ok::<_, anyhow::Error>(ok)
                }
                .await;
                match outcome {
                    Ok(true) => latencies.push(t0.elapsed().as_micros() as u64),
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        });
    }
    let mut phase = Phase {
        latencies_us: Vec::new(),
        errors: 0,
        elapsed: Duration::ZERO,
    };
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((latencies, errors)) => {
                phase.latencies_us.extend(latencies);
                phase.errors += errors;
            }
            Err(_) => phase.errors += 1,
        }
    }
    phase.elapsed = started.elapsed();
    phase.latencies_us.sort_unstable();
    phase
}

/// Targets a phase is held to; `None` prints the figure without a target.
#[derive(Default)]
struct Targets {
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    min_rate: Option<f64>,
}

fn report(name: &str, phase: &Phase, targets: Targets) {
    let p50 = percentile(&phase.latencies_us, 0.50) / 1000.0;
    let p99 = percentile(&phase.latencies_us, 0.99) / 1000.0;
    let rate = phase.latencies_us.len() as f64 / phase.elapsed.as_secs_f64();
    println!(
        "{name}: {} reviews in {:.1}s, {rate:.0} reviews/s, p50 {p50:.2} ms, p99 {p99:.2} ms, {} errors",
        phase.latencies_us.len(),
        phase.elapsed.as_secs_f64(),
        phase.errors
    );
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    if let Some(target) = targets.p50_ms {
        println!(
            "  p50 target <= {target} ms: ratio {:.2}, {}",
            p50 / target,
            verdict(p50 <= target)
        );
    }
    if let Some(target) = targets.p99_ms {
        println!(
            "  p99 target <= {target} ms: ratio {:.2}, {}",
            p99 / target,
            verdict(p99 <= target)
        );
    }
    if let Some(target) = targets.min_rate {
        println!(
            "  rate target >= {target:.0}/s: ratio {:.2}, {}",
            rate / target,
            verdict(rate >= target * 0.99)
        );
    }
    println!(
        "  errors target 0: {} ({})",
        phase.errors,
        verdict(phase.errors == 0)
    );
}

async fn run(args: Args) -> Result<()> {
    let cluster = rolemesh_testkit::cluster().await?;
    let client = cluster.client().await?;
    let fixture = Fixture::create(client.clone()).await?;
    let outcome = bench(&args, &cluster, &fixture).await;
    fixture.delete().await;
    outcome
}

async fn bench(args: &Args, cluster: &ClusterEnv, fixture: &Fixture) -> Result<()> {
    let mut tls_config =
        WebhookTlsConfig::for_service(&fixture.system_namespace, "rolemesh-webhook");
    tls_config.webhook_configuration = None;
    tls_config.ip_addresses = vec!["127.0.0.1".parse()?];
    let tls = reconcile_webhook_tls(&fixture.client, &tls_config).await?;

    let log = std::env::temp_dir().join(format!("{}-webhook.log", fixture.namespace));
    let webhook = Webhook(
        Command::new("taskset")
            // The webhook reaches the same control plane as this driver.
            .envs(cluster.vars())
            .args(["-c", &args.webhook_cpu])
            .arg(&args.webhook_bin)
            .args(["--namespace", &fixture.system_namespace])
            .args(["--authority", &fixture.authority])
            .args(["--listen", &format!("127.0.0.1:{}", args.port)])
            .args(["--admin-listen", &format!("127.0.0.1:{}", args.admin_port)])
            .args(["--proxy-image", "ghcr.io/rolemesh/rolemesh-proxy:bench"])
            // Per-review logging would measure the terminal, not the webhook.
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting the webhook under taskset")?,
    );
    let waited = Instant::now();
    while !ready(args.admin_port).await {
        if waited.elapsed() > Duration::from_secs(30) {
            bail!(
                "the webhook did not become ready; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(tls.ca_bundle_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let client_config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(client_config.clone()));
    // The API server's Go TLS client keeps no session cache, so every new connection to a webhook
    // is a full handshake; the new-connection phases do the same.
    let mut full_handshakes = client_config;
    full_handshakes.resumption = rustls::client::Resumption::disabled();
    let full_handshakes = TlsConnector::from(Arc::new(full_handshakes));
    let body = Bytes::from(review(&fixture.namespace, args.review_bytes)?);

    // The measured path is a real injection: check the first answer in full.
    let mut sender = connect(&connector, args.port).await?;
    let request = hyper::Request::post("/mutate-pod")
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))?;
    let answer = sender
        .send_request(request)
        .await?
        .into_body()
        .collect()
        .await?
        .to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&answer)?;
    ensure!(
        answer["response"]["allowed"] == json!(true) && !answer["response"]["patch"].is_null(),
        "the webhook did not inject the bench pod: {answer}"
    );
    drop(sender);

    println!(
        "rolemesh-webhook bench: {} B Pod AdmissionReviews, {} clients, {} s per phase, webhook pinned to CPU {} (lookups served from its caches of the local API server)",
        body.len(),
        args.concurrency,
        args.duration,
        args.webhook_cpu
    );
    let duration = Duration::from_secs(args.duration);
    let webhook_pid = webhook.0.id();
    let phases = [
        (
            format!("keep-alive TLS, {:.0} reviews/s offered", args.rate),
            &connector,
            true,
            Pacing::Rate(args.rate),
            Targets {
                p50_ms: Some(2.0),
                p99_ms: Some(10.0),
                min_rate: Some(2000.0),
            },
        ),
        (
            "keep-alive TLS, closed loop (capacity; latency is clients / rate)".to_string(),
            &connector,
            true,
            Pacing::ClosedLoop,
            Targets {
                min_rate: Some(2000.0),
                ..Targets::default()
            },
        ),
        (
            format!(
                "new TLS connection (full handshake) per review, {:.0} reviews/s offered",
                args.new_connection_rate
            ),
            &full_handshakes,
            false,
            Pacing::Rate(args.new_connection_rate),
            Targets {
                p99_ms: Some(20.0),
                ..Targets::default()
            },
        ),
        (
            "new TLS connection (full handshake) per review, closed loop (capacity)".to_string(),
            &full_handshakes,
            false,
            Pacing::ClosedLoop,
            Targets::default(),
        ),
    ];
    for (name, connector, reuse, pacing, targets) in phases {
        let (webhook_before, own_before) = (cpu_ms(webhook_pid), cpu_ms(std::process::id()));
        let phase = load(
            connector.clone(),
            args.port,
            body.clone(),
            args.concurrency,
            duration,
            reuse,
            pacing,
        )
        .await;
        report(&name, &phase, targets);
        let busy = |before: f64, pid: u32| {
            (cpu_ms(pid) - before) / 1e3 / phase.elapsed.as_secs_f64() * 100.0
        };
        println!(
            "  CPU: webhook {:.0}% of its core, load generator {:.0}% of its core; webhook RSS {:.1} MiB",
            busy(webhook_before, webhook_pid),
            busy(own_before, std::process::id()),
            rss_kib(webhook_pid) as f64 / 1024.0
        );
    }
    drop(webhook);
    Ok(())
}
