//! The admin port as kubelet and any other pod meet it: the app's own probes of app ports run
//! through it against 127.0.0.1, and a flood of connections to it is capped, so it costs a bounded
//! number of file descriptors and bytes while `/ready` and mTLS keep working.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use common::*;
use serde_json::json;

#[test]
fn kubelet_probes_of_app_ports_run_through_the_admin_port() {
    let dir = temp_dir("app-probes");
    let ca = Ca::new(TD);
    let http = http_app();
    let tcp = echo_app();
    // A port nothing listens on: the app is down.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (proxy, _) = Proxy::with_identity(
        &dir,
        &ca.leaf("payments", SERVER_ROLE),
        &ca.pem,
        json!({
            "inbound": [
                {"name": "http", "port": free_port(), "appPort": http, "allow": [CLIENT_ROLE]},
                {"name": "tcp", "port": free_port(), "appPort": tcp, "allow": [CLIENT_ROLE]},
                {"name": "down", "port": free_port(), "appPort": closed, "allow": [CLIENT_ROLE]},
            ],
            "appProbes": [
                {"container": "app", "kind": "readiness", "port": http, "timeoutSecs": 1,
                 "http": {"path": "/healthz", "headers": [["X-Probe", "yes"]]}},
                {"container": "app", "kind": "liveness", "port": tcp, "timeoutSecs": 1},
                {"container": "app", "kind": "startup", "port": closed, "timeoutSecs": 1},
            ],
        }),
    );
    let get = |path: &str| http_get(proxy.admin_port, path).expect("the admin port answers");
    let (status, body) = get("/app-health/app/readiness");
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("app answered 200\n"), "{body}");
    let (status, _) = get("/app-health/app/liveness");
    assert_eq!(status, 200, "a TCP probe passes when the app accepts");
    let (status, body) = get("/app-health/app/startup");
    assert_eq!(status, 503, "the app is down: {body}");
    assert!(body.contains("connect to 127.0.0.1"), "{body}");
    let (status, _) = get("/app-health/other/readiness");
    assert_eq!(status, 404, "only the probes in the configuration run");
}

#[test]
fn a_probe_of_a_port_no_mapping_closes_is_refused_in_the_configuration() {
    let dir = temp_dir("app-probe-elsewhere");
    let ca = Ca::new(TD);
    let identity = dir.join("identity");
    std::fs::create_dir_all(&identity).unwrap();
    let _mounted = MountedSecret::new(&identity, &ca.leaf("payments", SERVER_ROLE), &ca.pem);
    let config = json!({
        "trustDomain": TD, "identityDir": identity, "trustBundle": identity.join("ca.crt"),
        "adminPort": free_port(), "adminAddress": "127.0.0.1",
        "inbound": [{"name": "http", "port": free_port(), "appPort": 8080}],
        "appProbes": [{"container": "app", "kind": "readiness", "port": 22, "timeoutSecs": 1}],
    });
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rolemesh-proxy"))
        .arg("--config-file")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the proxy must refuse to start");
    assert!(
        stderr.contains("port 22 is not an inbound appPort"),
        "{stderr}"
    );
}

/// Connections that never send a request, opened without pause by two threads, each keeping its
/// newest [`HELD_PER_THREAD`] open: far more than the cap, all the time.
const FLOOD: usize = 20_000;
const HELD_PER_THREAD: usize = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sustained_flood_of_admin_connections_is_capped_while_ready_and_mtls_keep_working() {
    sustained_flood("1").await;
}

/// The same with a multi-threaded proxy (a CPU limit of two cores or more): the admin port keeps
/// its promise there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_holds_with_two_runtime_threads() {
    sustained_flood("2").await;
}

/// One flood at a time: two at once on a small machine starve the probing client itself (it is
/// descheduled between its connect and its request), which no cap can make up for.
static ONE_FLOOD_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn sustained_flood(cores: &str) {
    let _alone = ONE_FLOOD_AT_A_TIME.lock().await;
    let dir = temp_dir("admin-flood");
    let ca = Ca::new(TD);
    let port = free_port();
    let (proxy, _) = Proxy::with_identity_env(
        &dir,
        &ca.leaf("payments", SERVER_ROLE),
        &ca.pem,
        json!({"inbound": [{"name": "api", "port": port, "appPort": echo_app(), "allow": [CLIENT_ROLE]}]}),
        &[("ROLEMESH_PROXY_CORES", cores)],
    );
    let pid = proxy.pid();
    let baseline_kib = proxy.rss_kib();
    let baseline_fds = rolemesh_testkit::procfs::open_fds(pid);
    let admin = proxy.admin_port;
    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flooders: Vec<_> = (0..2)
        .map(|_| {
            let flooding = flooding.clone();
            std::thread::spawn(move || {
                let mut held = std::collections::VecDeque::new();
                let mut opened = 0;
                while opened < FLOOD / 2 && flooding.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(stream) = TcpStream::connect(("127.0.0.1", admin)) {
                        opened += 1;
                        held.push_back(stream);
                        if held.len() > HELD_PER_THREAD {
                            held.pop_front();
                        }
                    }
                }
                opened
            })
        })
        .collect();

    // Throughout the flood, kubelet's kind of client: a probe every 20 ms must be answered, and
    // a new mTLS connection every 50 ms must round-trip.
    let good = client_config(&ca, &ca.leaf("frontend", CLIENT_ROLE));
    let started = Instant::now();
    let (mut probes, mut handshakes, mut peak_fds, mut peak_kib) = (0, 0, 0, 0);
    let mut last_handshake = Instant::now() - Duration::from_secs(1);
    while !flooders.iter().all(|f| f.is_finished()) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the flood did not finish"
        );
        let answer = tokio::task::spawn_blocking(move || http_get(admin, "/ready"))
            .await
            .unwrap();
        assert!(
            matches!(answer, Some((200, _))),
            "/ready was not answered during the flood (probe {probes}): {answer:?}\n{}",
            proxy.metrics()
        );
        probes += 1;
        if last_handshake.elapsed() >= Duration::from_millis(50) {
            let (mut stream, _) = connect(port, &good).await.unwrap();
            round_trip(&mut stream, "during the admin flood")
                .await
                .unwrap();
            handshakes += 1;
            last_handshake = Instant::now();
        }
        peak_fds = peak_fds.max(rolemesh_testkit::procfs::open_fds(pid));
        peak_kib = peak_kib.max(proxy.rss_kib());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    let opened: usize = flooders.into_iter().map(|f| f.join().unwrap()).sum();
    let flooded = started.elapsed();
    let metrics = proxy.metrics();
    let evicted = metric_sum(
        &metrics,
        "rolemesh_proxy_admin_connections_closed_total",
        "reason=\"evicted\"",
    );
    eprintln!(
        "admin flood of {opened} connections in {:.1}s: {probes} probes answered, {handshakes} mTLS \
         round trips; proxy fds {baseline_fds} -> peak {peak_fds}, RSS KiB {baseline_kib} -> peak \
         {peak_kib}; {evicted} evicted",
        flooded.as_secs_f64(),
    );
    assert_eq!(opened, FLOOD, "the flood connected");
    assert!(probes >= 10 && handshakes >= 5, "too few checks to tell");
    assert!(
        peak_fds < baseline_fds + 2 * 64,
        "the proxy held {peak_fds} descriptors during a flood of {opened}: uncapped"
    );
    assert!(
        evicted as usize >= opened / 2,
        "{evicted} evicted of {opened}"
    );
    assert!(
        peak_kib < baseline_kib + 8 * 1024,
        "RSS grew from {baseline_kib} to {peak_kib} KiB"
    );
}
