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

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

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

/// Connections that never send a request, far more than the cap, held open together.
const FLOOD: usize = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_admin_connections_is_capped_while_ready_and_mtls_keep_working() {
    let dir = temp_dir("admin-flood");
    let ca = Ca::new(TD);
    let port = free_port();
    let (proxy, _) = Proxy::with_identity(
        &dir,
        &ca.leaf("payments", SERVER_ROLE),
        &ca.pem,
        json!({"inbound": [{"name": "api", "port": port, "appPort": echo_app(), "allow": [CLIENT_ROLE]}]}),
    );
    let pid = proxy.pid();
    let baseline_kib = proxy.rss_kib();
    let baseline_fds = open_fds(pid);
    let admin = proxy.admin_port;
    let connecting = Instant::now();
    let flood: Vec<TcpStream> = tokio::task::spawn_blocking(move || {
        (0..FLOOD)
            .filter_map(|_| TcpStream::connect(("127.0.0.1", admin)).ok())
            .collect()
    })
    .await
    .unwrap();
    assert!(flood.len() > FLOOD * 9 / 10, "the flood connected");
    let connected = connecting.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let flooded_fds = open_fds(pid);
    let flooded_kib = proxy.rss_kib();

    // While the flood's connections are all still open on our side: /ready answers again once
    // the silent connections holding the slots have timed out, and mTLS is served throughout.
    let good = client_config(&ca, &ca.leaf("frontend", CLIENT_ROLE));
    let (mut stream, _) = connect(port, &good).await.unwrap();
    round_trip(&mut stream, "during the admin flood")
        .await
        .unwrap();
    let started = Instant::now();
    let ready = loop {
        if let Some((200, _)) = http_get(admin, "/ready") {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "/ready did not answer during the flood: {}",
            proxy.metrics()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let refused = metric_sum(
        &proxy.metrics(),
        "rolemesh_proxy_admin_connections_refused_total",
        "",
    );
    eprintln!(
        "admin flood of {} connections: proxy fds {baseline_fds} -> {flooded_fds}, RSS KiB \
         {baseline_kib} -> {flooded_kib}, {refused} closed on accept, /ready answered after {:.1}s (connecting took {:.1}s)",
        flood.len(),
        ready.as_secs_f64(),
        connected.as_secs_f64(),
    );
    assert!(
        flooded_fds < baseline_fds + 2 * 64,
        "the proxy holds {flooded_fds} descriptors for a flood of {}: uncapped",
        flood.len()
    );
    // The rest wait in the kernel's accept queue and are closed as the proxy reaches them.
    assert!(refused as usize >= flood.len() / 2, "{refused} refused");
    assert!(
        flooded_kib < baseline_kib + 8 * 1024,
        "RSS grew from {baseline_kib} to {flooded_kib} KiB"
    );
    drop(flood);
}
