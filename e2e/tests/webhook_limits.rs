//! The chart's webhook pod, with the chart's resources and limits, under the attacks any pod in
//! the cluster can make on it: 200 TLS connections that send their request at one byte a second,
//! and a 1 MiB AdmissionReview of empty containers (each `{}` a struct of kilobytes once
//! decoded). Its peak RSS stays under half its memory limit, every slow connection is closed
//! within the request deadline, the big review is answered with a refusal naming the limit, and
//! an opted-in pod created meanwhile is admitted with its proxy.
//!
//! The release is installed as docs/development.md shows (one webhook replica, so the pod under
//! attack is the one the API server calls) and uninstalled at the end whatever happens.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::Api;
use rolemesh_e2e::{RELEASE_NAMESPACE, install_release, uninstall_release};
use rolemesh_testkit::{ClusterEnv, TestNamespace, in_namespace, node_ready};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

const BUSYBOX: &str = "rolemesh.local/busybox:1.35.0";
const TRUST_DOMAIN: &str = "limits.rolemesh.test";
const WEBHOOK_PORT: u16 = 8443;
const SERVER_NAME: &str = "rolemesh-webhook.rolemesh.svc";
const SLOW_CONNECTIONS: usize = 200;
/// The chart's default request deadline, and what the closing may take beyond it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const SLACK: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_webhook_survives_slow_clients_and_a_review_of_empty_containers() -> Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let env = node_ready().await?;
    install_release(&env, TRUST_DOMAIN, &["webhook.replicas=1"]).context("installing the chart")?;
    let outcome = in_namespace("whlimits", |ns| async move { attack(&ns).await }).await;
    let uninstall = uninstall_release(&env);
    outcome?;
    uninstall
}

async fn attack(ns: &TestNamespace) -> Result<()> {
    let env = &ns.env;
    ns.apply_manifest(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web}\n---\n\
         apiVersion: rolemesh.dev/v1alpha1\nkind: MTLSPolicy\nmetadata: {name: web}\nspec:\n  \
         serviceAccounts: {names: [web]}\n  \
         inbound: [{name: http, port: 8443, appPort: 8080, allow: ['arn:aws:iam::123456789012:role/*']}]\n",
    )?;
    let webhook = WebhookPod::find(env).await?;
    let limit_kib = memory_limit_kib(env)?;
    println!(
        "webhook pod {} at {} (pid {}), memory limit {} MiB",
        webhook.uid,
        webhook.ip,
        webhook.pid,
        limit_kib / 1024
    );
    // The peak from here on (Linux resets the high-water mark with clear_refs 5); if that is
    // not allowed, the lifetime peak, which is no smaller.
    if let Err(error) = std::fs::write(format!("/proc/{}/clear_refs", webhook.pid), "5") {
        println!("could not reset the webhook's peak RSS ({error}); using its lifetime peak");
    }
    let connector = connector(ns).await?;
    let address = format!("{}:{WEBHOOK_PORT}", webhook.ip);

    // 200 connections that send a review's headers and body one byte a second.
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..SLOW_CONNECTIONS {
        let connector = connector.clone();
        let address = address.clone();
        slow.spawn(async move { slow_client(&connector, &address).await });
    }
    let sampling = {
        let pid = webhook.pid;
        tokio::spawn(async move {
            let mut peak = 0;
            for _ in 0..((REQUEST_TIMEOUT + SLACK * 3).as_millis() / 200) {
                peak = peak.max(rolemesh_testkit::procfs::rss_kib(pid));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            peak
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Meanwhile, a 1 MiB review of empty containers straight to the pod: refused by name.
    let (code, answer) = post(
        &connector,
        &address,
        &rolemesh_testkit::empty_containers_review("default", 1024 * 1024),
    )
    .await?;
    ensure!(
        code == 200,
        "the big review is answered as a review: {code} {answer}"
    );
    let answer: Value = serde_json::from_str(&answer)?;
    let message = answer["response"]["status"]["message"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        answer["response"]["allowed"] == false && message.contains("--max-containers"),
        "refused, naming the limit: {answer}"
    );

    // And a real opted-in pod, through the API server: admitted, with its proxy.
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "during-attack", "labels": { "rolemesh.dev/inject": "true" } },
        "spec": {
            "serviceAccountName": "web", "terminationGracePeriodSeconds": 1,
            "containers": [{ "name": "app", "image": BUSYBOX, "command": ["sleep", "3600"] }],
        },
    });
    let started = Instant::now();
    let created = env.run(
        "kubectl",
        &["create", "-n", &ns.name, "-o", "json", "-f", "-"],
        Some(&pod.to_string()),
    )?;
    ensure!(
        created.status.success(),
        "an opted-in pod is admitted during the attack: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let stored: Value = serde_json::from_slice(&created.stdout)?;
    let injected = stored["spec"]["initContainers"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["name"] == "rolemesh-proxy"));
    ensure!(injected, "the admitted pod has its proxy: {stored}");
    println!(
        "opted-in pod admitted in {:?} during the attack",
        started.elapsed()
    );

    // Every slow connection closed within the deadline.
    let mut slowest = Duration::ZERO;
    while let Some(closed) = slow.join_next().await {
        let after = closed??;
        slowest = slowest.max(after);
    }
    println!("the slowest of {SLOW_CONNECTIONS} slow connections was closed after {slowest:?}");
    ensure!(
        slowest <= REQUEST_TIMEOUT + SLACK,
        "a slow connection stayed open {slowest:?}"
    );

    let sampled_kib = sampling.await?;
    let peak_kib = rolemesh_testkit::procfs::status_kib(webhook.pid, "VmHWM:");
    println!(
        "webhook RSS: peak {} MiB (sampled {} MiB) of a {} MiB limit",
        peak_kib / 1024,
        sampled_kib / 1024,
        limit_kib / 1024
    );
    ensure!(
        peak_kib.max(sampled_kib) < limit_kib / 2,
        "the webhook's peak RSS {peak_kib} KiB is not under half its {limit_kib} KiB limit"
    );
    // Still the same process: nothing was OOM-killed or restarted.
    ensure!(
        WebhookPod::find(env).await?.pid == webhook.pid,
        "the webhook restarted"
    );
    Ok(())
}

/// A TLS client that begins a review and sends it one byte a second; returns when the server
/// closes the connection, with how long it stayed open.
async fn slow_client(connector: &TlsConnector, address: &str) -> Result<Duration> {
    let started = Instant::now();
    let tcp = TcpStream::connect(address).await?;
    let tls = connector
        .connect(ServerName::try_from(SERVER_NAME)?, tcp)
        .await?;
    let (mut reader, mut writer) = tokio::io::split(tls);
    let request = b"POST /mutate-pod HTTP/1.1\r\nHost: rolemesh-webhook\r\nContent-Type: application/json\r\nContent-Length: 4096\r\n\r\n{\"apiVersion\":\"admission.k8s.io/v1\"";
    let writing = tokio::spawn(async move {
        for byte in request.iter().chain(std::iter::repeat(&b' ')) {
            if writer.write_all(&[*byte]).await.is_err() || writer.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(REQUEST_TIMEOUT * 3, async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    writing.abort();
    if closed.is_err() {
        bail!(
            "a slow connection was still open after {:?}",
            REQUEST_TIMEOUT * 3
        );
    }
    Ok(started.elapsed())
}

async fn post(connector: &TlsConnector, address: &str, body: &[u8]) -> Result<(u16, String)> {
    let tcp = TcpStream::connect(address).await?;
    let mut tls = connector
        .connect(ServerName::try_from(SERVER_NAME)?, tcp)
        .await?;
    tls.write_all(
        format!(
            "POST /mutate-pod HTTP/1.1\r\nHost: rolemesh-webhook\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    tls.write_all(body).await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no response head")?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status code")?;
    Ok((code, body.to_string()))
}

/// A review of about `size` bytes for a pod whose containers are all `{}`.
/// Trusts the webhook's serving CA as the API server does: from the caBundle the controller
/// keeps in the MutatingWebhookConfiguration.
async fn connector(ns: &TestNamespace) -> Result<TlsConnector> {
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(ns.client.clone());
    let configuration = configurations.get("rolemesh-webhook").await?;
    let bundle = configuration
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .find_map(|w| w.client_config.ca_bundle)
        .context("the webhook configuration has no caBundle")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bundle.0) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

struct WebhookPod {
    uid: String,
    ip: String,
    /// The webhook process on this node.
    pid: u32,
}

impl WebhookPod {
    async fn find(env: &ClusterEnv) -> Result<Self> {
        let out = env.kubectl(&[
            "get",
            "pods",
            "-n",
            RELEASE_NAMESPACE,
            "-l",
            "app.kubernetes.io/component=webhook",
            "-o",
            "jsonpath={range .items[*]}{.metadata.uid} {.status.podIP}{\"\\n\"}{end}",
        ])?;
        let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
        ensure!(lines.len() == 1, "one webhook pod expected: {out:?}");
        let (uid, ip) = lines[0].trim().split_once(' ').context("pod uid and IP")?;
        let pid = rolemesh_testkit::procfs::pod_process(uid, "rolemesh-webhook")
            .with_context(|| format!("no rolemesh-webhook process of pod {uid} in /proc"))?;
        Ok(Self {
            uid: uid.to_string(),
            ip: ip.to_string(),
            pid,
        })
    }
}

/// The webhook container's memory limit as the chart set it, in KiB.
fn memory_limit_kib(env: &ClusterEnv) -> Result<u64> {
    let limit = env.kubectl(&[
        "get",
        "deployment/rolemesh-webhook",
        "-n",
        RELEASE_NAMESPACE,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].resources.limits.memory}",
    ])?;
    let limit = limit.trim();
    let (number, unit) = limit.split_at(
        limit
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(limit.len()),
    );
    let number: u64 = number
        .parse()
        .with_context(|| format!("memory limit {limit:?}"))?;
    let kib = match unit {
        "Ki" => number,
        "Mi" => number * 1024,
        "Gi" => number * 1024 * 1024,
        "" => number / 1024,
        other => bail!("memory limit {limit:?}: unit {other:?} not understood"),
    };
    Ok(kib)
}
