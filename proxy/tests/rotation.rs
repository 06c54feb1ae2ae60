//! Certificate rotation the way kubelet does it (`..data` symlink swap) under continuous load:
//! no failed request, the new serial in use for new handshakes within one second, connections
//! already open keep working, and a bad new file set is refused while the old one stays in use.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_has_no_failures_and_new_serial_within_one_second() {
    let dir = temp_dir("rot");
    let ca = Ca::new(TD);
    let first = ca.leaf("payments", SERVER_ROLE);
    let port = free_port();
    let app = echo_app();
    let (proxy, mut mounted) = Proxy::with_identity(
        &dir,
        &first,
        &ca.pem,
        json!({"inbound": [{"name": "api", "port": port, "appPort": app, "allow": [CLIENT_ROLE]}]}),
    );
    let config = client_config(&ca, &ca.leaf("frontend", CLIENT_ROLE));

    // A connection opened before the rotation must keep working after it.
    let (mut long_lived, serial) = connect(port, &config).await.unwrap();
    assert_eq!(serial, first.serial_hex);
    round_trip(&mut long_lived, "before").await.unwrap();

    // Continuous load: new connection per request, plus requests on a kept-alive connection.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for worker in 0..4 {
        let (stop, ok, config) = (stop.clone(), ok.clone(), config.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let result = async {
                    let (mut stream, _) = connect(port, &config).await?;
                    round_trip(&mut stream, &format!("w{worker}-{i}")).await?;
                    round_trip(&mut stream, "quit-not").await
                }
                .await;
                match result {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => failures.push(error.to_string()),
                }
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A bad set (key not matching the certificate) is refused; the old set stays in use.
    let other = ca.leaf("payments", SERVER_ROLE);
    mounted.swap(
        other.chain_pem.as_bytes(),
        first.key_pem.as_bytes(),
        &ca.pem,
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, serial) = connect(port, &config).await.unwrap();
    assert_eq!(
        serial, first.serial_hex,
        "a mismatched key was taken into use"
    );
    assert!(
        proxy.log_text().contains("certificate set refused"),
        "{}",
        proxy.log_text()
    );
    // So is an unparsable one.
    mounted.swap(b"not a certificate", b"not a key", &ca.pem);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_, serial) = connect(port, &config).await.unwrap();
    assert_eq!(serial, first.serial_hex);

    // The real rotation.
    let second = ca.leaf("payments", SERVER_ROLE);
    mounted.swap(
        second.chain_pem.as_bytes(),
        second.key_pem.as_bytes(),
        &ca.pem,
    );
    let swapped = Instant::now();
    let seen_after = loop {
        let (_, serial) = connect(port, &config).await.unwrap();
        if serial == second.serial_hex {
            break swapped.elapsed();
        }
        assert!(
            swapped.elapsed() < Duration::from_secs(5),
            "new serial never used"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for worker in workers {
        failures.extend(worker.await.unwrap());
    }
    round_trip(&mut long_lived, "after").await.unwrap();

    let requests = ok.load(Ordering::Relaxed);
    println!(
        "rotation: {requests} requests, {} failed, new serial after {seen_after:?}",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(requests > 50, "too little load: {requests}");
    assert!(
        seen_after <= Duration::from_secs(1),
        "new serial after {seen_after:?}"
    );
    let metrics = proxy.metrics();
    assert_eq!(
        metric_sum(
            &metrics,
            "rolemesh_proxy_certificate_reloads_total",
            "result=\"rejected\""
        ),
        2,
        "{metrics}"
    );
}
