//! Peer rules changed under a running proxy, the way kubelet delivers a ConfigMap edit (`..data`
//! symlink swap): the next handshake obeys the new rules within one second, connections already
//! spliced are kept, a bad file leaves the rules in use (logged once), and without any rules file
//! the proxy admits no one and is not ready.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn rules(generation: i64, allow: &[&str]) -> String {
    json!({"policy": "test", "generation": generation,
           "inbound": [{"name": "api", "allow": allow}]})
    .to_string()
}

/// How long after `since` until `connect` to `port` gives `admitted`, polled every 20 ms for
/// at most 5 s.
async fn until_admitted(
    port: u16,
    config: &std::sync::Arc<rustls::ClientConfig>,
    admitted: bool,
    since: Instant,
) -> Duration {
    let deadline = since + Duration::from_secs(5);
    loop {
        if connect(port, config).await.is_ok() == admitted {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "still {} after 5 s",
            if admitted { "refused" } else { "admitted" }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn generation_metric(proxy: &Proxy) -> i64 {
    rolemesh_testkit::metric_sum(&proxy.metrics(), "rolemesh_proxy_policy_generation", "") as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_role_refuses_its_next_handshake_within_a_second_and_adding_it_back_admits_it() {
    let dir = temp_dir("live-rules");
    let ca = Ca::new(TD);
    let port = free_port();
    let (mut proxy, _mounted) = Proxy::with_identity(
        &dir,
        &ca.leaf("payments", SERVER_ROLE),
        &ca.pem,
        json!({"inbound": [{"name": "api", "port": port, "appPort": echo_app(), "allow": [CLIENT_ROLE]}]}),
    );
    let client = client_config(&ca, &ca.leaf("frontend", CLIENT_ROLE));
    let leaf = ca.leaf("frontend", CLIENT_ROLE);
    let (cert, key, ca_file) = client_files(&dir, "frontend", &leaf, &ca.pem);
    let s_client_admitted = || {
        let (_, out) = s_client(
            port,
            &[
                "-cert",
                cert.to_str().unwrap(),
                "-key",
                key.to_str().unwrap(),
                "-CAfile",
                ca_file.to_str().unwrap(),
            ],
        );
        out.contains(BANNER)
    };
    assert!(s_client_admitted(), "the allowed role is admitted at first");
    assert_eq!(generation_metric(&proxy), 1);

    // A connection spliced under the old rules is kept (docs/security-model.md).
    let (mut open, _) = connect(port, &client).await.unwrap();
    round_trip(&mut open, "before").await.unwrap();

    let mut rules_mount = proxy.rules.take().unwrap();
    let refused_before = proxy.failures("not_allowed");
    let changed = Instant::now();
    rules_mount.swap(&rules(2, &["arn:aws:iam::111122223333:role/someone-else"]));
    let took = until_admitted(port, &client, false, changed).await;
    assert!(took < Duration::from_secs(1), "refused only after {took:?}");
    assert!(!s_client_admitted(), "openssl s_client is refused too");
    assert!(proxy.failures("not_allowed") > refused_before);
    assert_eq!(generation_metric(&proxy), 2);
    let (status, body) = http_get(proxy.admin_port, "/ready").unwrap();
    assert_eq!(status, 200);
    assert!(
        body.to_ascii_lowercase()
            .contains("x-rolemesh-policy-generation: 2"),
        "{body}"
    );
    round_trip(&mut open, "after").await.unwrap();

    let changed = Instant::now();
    rules_mount.swap(&rules(3, &[CLIENT_ROLE]));
    let took = until_admitted(port, &client, true, changed).await;
    assert!(
        took < Duration::from_secs(1),
        "admitted again only after {took:?}"
    );
    assert!(s_client_admitted());
    assert_eq!(generation_metric(&proxy), 3);
    assert!(proxy.log_text().contains("peer rules loaded"));
    proxy.rules = Some(rules_mount);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rules_file_keeps_the_rules_in_use_and_is_reported_once() {
    let dir = temp_dir("live-rules-bad");
    let ca = Ca::new(TD);
    let port = free_port();
    let (mut proxy, _mounted) = Proxy::with_identity(
        &dir,
        &ca.leaf("payments", SERVER_ROLE),
        &ca.pem,
        json!({"inbound": [{"name": "api", "port": port, "appPort": echo_app(), "allow": [CLIENT_ROLE]}]}),
    );
    let client = client_config(&ca, &ca.leaf("frontend", CLIENT_ROLE));
    let mut rules_mount = proxy.rules.take().unwrap();
    // A wildcard account would admit strangers' roles: refused as a whole, not partly taken.
    rules_mount.swap(&rules(2, &["arn:aws:iam::*:role/frontend"]));
    // Several polls see the same bad content.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    connect(port, &client)
        .await
        .expect("the rules in use still admit the client");
    assert_eq!(generation_metric(&proxy), 1);
    let metrics = proxy.metrics();
    assert_eq!(
        rolemesh_testkit::metric_sum(
            &metrics,
            "rolemesh_proxy_rules_reloads_total",
            "result=\"rejected\""
        ),
        1.0,
        "{metrics}"
    );
    let log = proxy.log_text();
    assert_eq!(log.matches("peer rules refused").count(), 1, "{log}");
    assert!(
        log.contains("account field"),
        "the log says what is wrong: {log}"
    );

    // Not JSON at all: refused the same way, once.
    rules_mount.swap("{not json");
    tokio::time::sleep(Duration::from_millis(800)).await;
    connect(port, &client).await.expect("still admitted");
    assert_eq!(proxy.log_text().matches("peer rules refused").count(), 2);

    // A good file afterwards is taken.
    rules_mount.swap(&rules(4, &[]));
    until_admitted(port, &client, false, Instant::now()).await;
    assert_eq!(generation_metric(&proxy), 4);
    proxy.rules = Some(rules_mount);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_rules_file_the_proxy_admits_no_one_and_is_not_ready() {
    let dir = temp_dir("live-rules-none");
    let ca = Ca::new(TD);
    let port = free_port();
    let identity = dir.join("identity");
    std::fs::create_dir_all(&identity).unwrap();
    let _mounted = MountedSecret::new(&identity, &ca.leaf("payments", SERVER_ROLE), &ca.pem);
    let rules_dir = dir.join("rules");
    let admin_port = free_port();
    let proxy = Proxy::spawn(
        &dir,
        json!({
            "trustDomain": TD, "identityDir": identity, "trustBundle": identity.join("ca.crt"),
            "rulesFile": rules_dir.join("rules.json"),
            "adminPort": admin_port, "adminAddress": "127.0.0.1",
            "inbound": [{"name": "api", "port": port, "appPort": echo_app()}],
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        if let Some(answer) = http_get(admin_port, "/ready") {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "no admin port: {}",
            proxy.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no peer rules"), "{body}");
    assert_eq!(generation_metric(&proxy), -1);
    let client = client_config(&ca, &ca.leaf("frontend", CLIENT_ROLE));
    assert!(connect(port, &client).await.is_err(), "no rules: no one");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(proxy.failures("no_rules") >= 1, "{}", proxy.metrics());

    // kubelet delivers the key once the controller has written it.
    let _rules = MountedRules::new(&rules_dir, &rules(1, &[CLIENT_ROLE]));
    let took = until_admitted(port, &client, true, Instant::now()).await;
    assert!(
        took < Duration::from_secs(1),
        "admitted only after {took:?}"
    );
    proxy.wait_ready();
}

/// `openssl s_server -rev` (answers each line reversed) presenting `leaf`, requiring a client
/// certificate of `ca`.
fn s_server(dir: &std::path::Path, name: &str, leaf: &Leaf, ca: &Ca) -> (u16, std::process::Child) {
    let (cert, key, ca_file) = client_files(dir, name, leaf, &ca.pem);
    let port = free_port();
    let server = std::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-rev", "-tls1_3", "-accept"])
        .arg(port.to_string())
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .arg("-CAfile")
        .arg(&ca_file)
        .args(["-Verify", "1", "-verify_return_error"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl is installed (dev/tools/install.sh)");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (port, server)
}

/// Sends `olleh` through the outbound listener: whether `hello` comes back.
fn through(local: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", local)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    if stream.write_all(b"olleh\n").is_err() {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if got.ends_with(b"\n") {
            break;
        }
    }
    String::from_utf8_lossy(&got).contains("hello")
}

/// The upstream and its expected identities are live too: the app's next connection dials the
/// upstream the rules in force name and checks it against their `expect`.
#[test]
fn an_outbound_edit_moves_the_next_connection_to_the_new_upstream() {
    let dir = temp_dir("live-rules-out");
    let ca = Ca::new(TD);
    const LEDGER_ROLE: &str = "arn:aws:iam::111122223333:role/ledger";
    let (payments, mut payments_server) =
        s_server(&dir, "payments", &ca.leaf("payments", SERVER_ROLE), &ca);
    let (ledger, mut ledger_server) =
        s_server(&dir, "ledger", &ca.leaf("ledger", LEDGER_ROLE), &ca);
    let local = free_port();
    let (mut proxy, _mounted) = Proxy::with_identity(
        &dir,
        &ca.leaf("frontend", CLIENT_ROLE),
        &ca.pem,
        json!({"outbound": [{"name": "upstream", "localPort": local,
                             "upstream": format!("127.0.0.1:{payments}"), "expect": [SERVER_ROLE]}]}),
    );
    assert!(through(local), "{}", proxy.log_text());
    let outbound = |generation: i64, port: u16, expect: &str| {
        json!({"policy": "test", "generation": generation,
               "outbound": [{"name": "upstream", "upstream": format!("127.0.0.1:{port}"), "expect": [expect]}]})
        .to_string()
    };
    let mut rules_mount = proxy.rules.take().unwrap();

    // Same upstream, another expected identity: refused as the wrong peer.
    rules_mount.swap(&outbound(2, payments, LEDGER_ROLE));
    let changed = Instant::now();
    while through(local) {
        assert!(changed.elapsed() < Duration::from_secs(1), "still admitted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(proxy.failures("not_allowed") >= 1, "{}", proxy.metrics());

    // The ledger as the upstream, expected as the ledger: the connection goes there.
    rules_mount.swap(&outbound(3, ledger, LEDGER_ROLE));
    let changed = Instant::now();
    while !through(local) {
        assert!(changed.elapsed() < Duration::from_secs(1), "not moved");
        std::thread::sleep(Duration::from_millis(20));
    }
    for server in [&mut payments_server, &mut ledger_server] {
        let _ = server.kill();
        let _ = server.wait();
    }
    proxy.rules = Some(rules_mount);
}
