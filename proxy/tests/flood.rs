//! A flood of bad handshakes (garbage bytes, certificates from a CA nobody trusts, connections
//! that never speak) alongside a good peer: every good request is served, every bad one is
//! refused and counted, and the proxy's memory stays bounded and does not grow from one flood
//! to the next.

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
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GOOD_REQUESTS_PER_ROUND: u64 = 50;
/// Connections the flood holds open without sending a byte; each keeps a handshake slot until
/// the handshake timeout frees it.
const SILENT_CONNECTIONS: usize = 8;
/// Upper bound on any one flood task, so the test ends even if the good peer hangs.
const FLOOD_LIMIT: Duration = Duration::from_secs(90);

struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    tasks: tokio::task::JoinSet<()>,
}

impl Flood {
    fn start(port: u16, stranger: Arc<rustls::ClientConfig>) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let running = {
            let stop = stop.clone();
            move || !stop.load(Ordering::Relaxed) && started.elapsed() < FLOOD_LIMIT
        };
        let mut tasks = tokio::task::JoinSet::new();
        let garbage: Vec<u8> = (0..2048u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        for _ in 0..3 {
            let (running, sent, garbage) = (running.clone(), sent.clone(), garbage.clone());
            tasks.spawn(async move {
                while running() {
                    let Ok(mut tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                    else {
                        continue;
                    };
                    let _ = tcp.write_all(&garbage).await;
                    let mut answer = Vec::new();
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
                            .await;
                    assert!(
                        !String::from_utf8_lossy(&answer).contains(BANNER),
                        "app bytes reached a garbage peer"
                    );
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        for _ in 0..2 {
            let (running, sent, stranger) = (running.clone(), sent.clone(), stranger.clone());
            tasks.spawn(async move {
                while running() {
                    let refused =
                        tokio::time::timeout(Duration::from_secs(5), connect(port, &stranger))
                            .await;
                    assert!(
                        !matches!(refused, Ok(Ok(_))),
                        "a certificate from an untrusted CA was admitted"
                    );
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        for _ in 0..SILENT_CONNECTIONS {
            let running = running.clone();
            tasks.spawn(async move {
                while running() {
                    let Ok(mut tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                    else {
                        continue;
                    };
                    // Held until the proxy gives up on it (or the flood ends).
                    let mut byte = [0u8; 1];
                    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut byte)).await;
                }
            });
        }
        Flood { stop, sent, tasks }
    }

    async fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        while let Some(joined) = self.tasks.join_next().await {
            joined.unwrap();
        }
        self.sent.load(Ordering::Relaxed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_handshakes_neither_starves_good_peers_nor_grows_memory() {
    let dir = temp_dir("flood");
    let ca = Ca::new(TD);
    let port = free_port();
    let (proxy, _) = Proxy::with_identity(
        &dir,
        &ca.leaf("payments", SERVER_ROLE),
        &ca.pem,
        json!({
            "inbound": [{"name": "api", "port": port, "appPort": echo_app(), "allow": [CLIENT_ROLE]}],
            "limits": {"handshakeTimeoutMs": 1000, "maxConcurrentHandshakes": 16,
                       "idleTimeoutSecs": 60, "drainTimeoutSecs": 1},
        }),
    );
    let good = client_config(&ca, &ca.leaf("frontend", CLIENT_ROLE));
    // A CA of another name, so the refusal is for an unknown issuer rather than a bad signature.
    let stranger = client_config(
        &ca,
        &Ca::new("elsewhere.test").leaf("frontend", CLIENT_ROLE),
    );

    let (mut warm, _) = connect(port, &good).await.unwrap();
    round_trip(&mut warm, "warm").await.unwrap();
    drop(warm);
    let baseline_kib = proxy.rss_kib();

    let mut after_round_kib = Vec::new();
    let mut peak_kib = baseline_kib;
    let mut flood_sent = 0;
    for round in 0..2 {
        let flood = Flood::start(port, stranger.clone());
        for i in 0..GOOD_REQUESTS_PER_ROUND {
            let served = tokio::time::timeout(Duration::from_secs(30), async {
                let (mut stream, _) = connect(port, &good).await?;
                round_trip(&mut stream, &format!("round {round} request {i}")).await
            })
            .await;
            assert!(
                matches!(served, Ok(Ok(()))),
                "good request {i} of round {round} failed during the flood: {served:?}\n{}",
                proxy.metrics()
            );
            peak_kib = peak_kib.max(proxy.rss_kib());
        }
        flood_sent += flood.finish().await;
        // Let the proxy time out what the flood left half-open.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        after_round_kib.push(proxy.rss_kib());
    }

    let metrics = proxy.metrics();
    let not_tls = proxy.failures("not_tls");
    let unknown_issuer = proxy.failures("unknown_issuer");
    let timeouts = proxy.failures("handshake_timeout");
    eprintln!(
        "flood: {flood_sent} bad handshakes, refused not_tls={not_tls} unknown_issuer={unknown_issuer} \
         handshake_timeout={timeouts}; RSS KiB baseline={baseline_kib} peak={peak_kib} \
         after rounds={after_round_kib:?}"
    );
    assert!(not_tls > 0 && unknown_issuer > 0, "{metrics}");
    assert!(
        timeouts >= SILENT_CONNECTIONS as u64,
        "silent connections were not timed out: {metrics}"
    );
    assert!(
        flood_sent >= not_tls + unknown_issuer,
        "more refusals counted than bad handshakes sent: {flood_sent}\n{metrics}"
    );
    // Handshakes in flight are capped at 16, so the flood's cost is bounded by that, not by how
    // many connections it makes.
    assert!(
        peak_kib < baseline_kib + 48 * 1024,
        "RSS grew from {baseline_kib} KiB to {peak_kib} KiB under the flood"
    );
    assert!(
        after_round_kib[1] < after_round_kib[0] + 4 * 1024,
        "RSS kept growing from one flood to the next: {after_round_kib:?} KiB"
    );
    let (mut after, _) = connect(port, &good).await.unwrap();
    round_trip(&mut after, "after the flood").await.unwrap();
}
