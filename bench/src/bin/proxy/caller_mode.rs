//! What `callerIdentity: http` costs next to `l4`: the same HTTP/1.1 app behind one server
//! sidecar per mode, the same keep-alive load through each, measured side by side in one run.
//! In `http` mode the proxy parses every request (hyper), sets the peer headers and forwards it on
//! its own connection to the app; in `l4` it splices bytes.

use std::{convert::Infallible, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, bail, ensure};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{
    Request, Response,
    body::{Bytes, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use rolemesh_bench::stats::median;
use rustls::ClientConfig;
use tokio::net::TcpListener;

use super::{CLIENT_ROLE, Guard, Target, free_port, start_server_sidecar, wait_port};

/// Response body of the app.
const BODY: usize = 1024;
/// Keep-alive connections of the latency load, and its request rate over all of them.
const CONNECTIONS: usize = 8;
const RATE: u64 = 400;
/// Connections held open to measure what each costs a sidecar.
const HELD: usize = 256;
/// The header the app answers with: the role the proxy told it, if any.
const SEEN_ROLE: &str = "x-bench-seen-role";

/// The app: answers every request with [`BODY`] bytes, echoing the peer role header it got.
pub async fn http_app(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let body = Bytes::from(vec![b'x'; BODY]);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let body = body.clone();
                async move {
                    let mut response = Response::new(Full::new(body));
                    if let Some(role) = request.headers().get("x-rolemesh-peer-role-arn") {
                        response.headers_mut().insert(SEEN_ROLE, role.clone());
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One keep-alive HTTP/1.1 connection through `target`.
struct HttpConnection {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl HttpConnection {
    async fn open(target: &Target) -> anyhow::Result<Self> {
        let stream = target.connect().await?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self { sender })
    }

    /// One GET; the role the app says the proxy told it.
    async fn get(&mut self) -> anyhow::Result<Option<String>> {
        self.sender.ready().await?;
        let request = Request::get("/")
            .header("host", "app")
            .body(Empty::<Bytes>::new())?;
        let response = self.sender.send_request(request).await?;
        ensure!(
            response.status().is_success(),
            "status {}",
            response.status()
        );
        let seen = response
            .headers()
            .get(SEEN_ROLE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response.into_body().collect().await?.to_bytes();
        ensure!(body.len() == BODY, "a {} byte body", body.len());
        Ok(seen)
    }
}

/// Request latency at [`RATE`] over [`CONNECTIONS`]: (p50, p99) in ms.
async fn latency(target: &Target, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let interval = Duration::from_secs_f64(CONNECTIONS as f64 / RATE as f64);
    let per_connection = RATE * seconds / CONNECTIONS as u64;
    let mut tasks = Vec::new();
    for i in 0..CONNECTIONS {
        let mut connection = HttpConnection::open(target).await?;
        let offset = interval.mul_f64(i as f64 / CONNECTIONS as f64);
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(per_connection as usize);
            let start = tokio::time::Instant::now() + offset;
            for k in 0..per_connection {
                tokio::time::sleep_until(start + interval * k as u32).await;
                let sent = std::time::Instant::now();
                connection.get().await?;
                samples.push(sent.elapsed().as_secs_f64() * 1e3);
            }
            anyhow::Ok(samples)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    all.sort_by(f64::total_cmp);
    let pick = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    Ok((pick(0.50), pick(0.99)))
}

/// RSS growth of `sidecar` per connection held open through it, each having carried a request.
async fn held_cost(target: &Target, sidecar: &Guard) -> anyhow::Result<f64> {
    let before = sidecar.rss_kib();
    let mut held = Vec::with_capacity(HELD);
    for _ in 0..HELD {
        let mut connection = HttpConnection::open(target).await?;
        connection.get().await?;
        held.push(connection);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = sidecar.rss_kib();
    drop(held);
    Ok(after.saturating_sub(before) as f64 / HELD as f64)
}

/// Figures of one mode.
pub struct ModeFigures {
    pub p50: f64,
    pub p99: f64,
    pub idle_rss_kib: u64,
    pub kib_per_connection: f64,
}

/// The figures for direct, `l4` and `http`, medians over `rounds` with the modes alternating.
pub struct CallerFigures {
    pub direct: (f64, f64),
    pub l4: ModeFigures,
    pub http: ModeFigures,
}

pub async fn measure(
    proxy: &Path,
    dir: &Path,
    mtls: &Arc<ClientConfig>,
    rounds: usize,
    seconds: u64,
) -> anyhow::Result<CallerFigures> {
    let app_port = free_port()?;
    let _app = Guard(
        std::process::Command::new(std::env::current_exe()?)
            .args(["http-app", "--port", &app_port.to_string()])
            .spawn()?,
    );
    let sidecar = |mode: &str| -> anyhow::Result<(Guard, u16)> {
        let (port, admin) = (free_port()?, free_port()?);
        let mut inbound = serde_json::json!({"name": "app", "port": port, "appPort": app_port});
        if mode != "l4" {
            inbound["callerIdentity"] = mode.into();
        }
        let guard =
            start_server_sidecar(proxy, dir, &format!("server-{mode}"), admin, inbound, None)?;
        Ok((guard, port))
    };
    let (l4_sidecar, l4_port) = sidecar("l4")?;
    let (http_sidecar, http_port) = sidecar("http")?;
    for port in [app_port, l4_port, http_port] {
        wait_port(port).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = (l4_sidecar.rss_kib(), http_sidecar.rss_kib());
    let direct = Target {
        port: app_port,
        tls: None,
    };
    let l4 = Target {
        port: l4_port,
        tls: Some(mtls.clone()),
    };
    let http = Target {
        port: http_port,
        tls: Some(mtls.clone()),
    };
    // Each path carries the request, and only the http mode tells the app who called.
    for (name, target, told) in [
        ("direct", &direct, None),
        ("l4", &l4, None),
        ("http", &http, Some(CLIENT_ROLE)),
    ] {
        let seen = HttpConnection::open(target)
            .await
            .with_context(|| format!("{name}: connect (logs in {})", dir.display()))?
            .get()
            .await
            .with_context(|| format!("{name}: GET (logs in {})", dir.display()))?;
        if seen.as_deref() != told {
            bail!("{name}: the app was told the role {seen:?}, expected {told:?}");
        }
    }
    let mut runs: [Vec<(f64, f64)>; 3] = Default::default();
    for _ in 0..rounds {
        for (run, target) in runs.iter_mut().zip([&direct, &l4, &http]) {
            run.push(latency(target, seconds).await?);
        }
    }
    let medians = |run: &[(f64, f64)]| {
        (
            median(run.iter().map(|r| r.0)),
            median(run.iter().map(|r| r.1)),
        )
    };
    let l4_cost = held_cost(&l4, &l4_sidecar).await?;
    let http_cost = held_cost(&http, &http_sidecar).await?;
    let (l4_p50, l4_p99) = medians(&runs[1]);
    let (http_p50, http_p99) = medians(&runs[2]);
    Ok(CallerFigures {
        direct: medians(&runs[0]),
        l4: ModeFigures {
            p50: l4_p50,
            p99: l4_p99,
            idle_rss_kib: idle.0,
            kib_per_connection: l4_cost,
        },
        http: ModeFigures {
            p50: http_p50,
            p99: http_p99,
            idle_rss_kib: idle.1,
            kib_per_connection: http_cost,
        },
    })
}

/// Prints the section.
pub fn print(figures: &CallerFigures, rounds: usize) {
    let (direct_p50, direct_p99) = figures.direct;
    println!();
    println!(
        "callerIdentity http vs l4 (one server sidecar each, HTTP/1.1 keep-alive GETs of {BODY} B, {CONNECTIONS} connections at {RATE} req/s, medians of {rounds} rounds)"
    );
    println!(
        "{:<30} {:>9} {:>9} {:>20} {:>13} {:>15}",
        "path", "p50 ms", "p99 ms", "added p50/p99 ms", "idle RSS KiB", "KiB/connection"
    );
    println!(
        "{:<30} {direct_p50:>9.3} {direct_p99:>9.3} {:>20} {:>13} {:>15}",
        "direct (no proxy)", "-", "-", "-"
    );
    for (name, mode) in [
        ("l4 (splice)", &figures.l4),
        ("http (hyper, peer headers)", &figures.http),
    ] {
        println!(
            "{name:<30} {:>9.3} {:>9.3} {:>20} {:>13} {:>15.1}",
            mode.p50,
            mode.p99,
            format!("{:.3}/{:.3}", mode.p50 - direct_p50, mode.p99 - direct_p99),
            mode.idle_rss_kib,
            mode.kib_per_connection
        );
    }
    let (l4, http) = (&figures.l4, &figures.http);
    println!(
        "http over l4: p50 {:+.3} ms (x{:.2}), p99 {:+.3} ms (x{:.2}); per held connection {:.1} KiB vs {:.1} KiB (x{:.2})",
        http.p50 - l4.p50,
        http.p50 / l4.p50,
        http.p99 - l4.p99,
        http.p99 / l4.p99,
        http.kib_per_connection,
        l4.kib_per_connection,
        if l4.kib_per_connection > 0.0 {
            http.kib_per_connection / l4.kib_per_connection
        } else {
            f64::NAN
        }
    );
}
