//! Benchmark of the proxy, driven by scripts/bench-proxy.sh. One run measures the same
//! workload against a local echo server through: direct loopback; one rolemesh hop (this
//! generator speaks mTLS to the server sidecar); two rolemesh hops (plain to a client sidecar,
//! mTLS between sidecars, the real mesh path); and stunnel4 in the same two-hop shape with the
//! same P-256 certificates. Prints a table of figures and ratios against the targets. Then the
//! cost of `callerIdentity: http` next to `l4` ([`caller_mode`]).

#[path = "proxy/caller_mode.rs"]
mod caller_mode;
#[path = "proxy/cores.rs"]
mod cores;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use rolemesh_bench::stats::{cpu_ms, machine_ticks, median, rss_kib};
use rolemesh_testkit::{pki::Ca, try_free_port as free_port, try_temp_dir};
use rustls::{ClientConfig, RootCertStore, client::Resumption};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsConnector;

const TRUST_DOMAIN: &str = "bench.rolemesh";
const CLIENT_ROLE: &str = "arn:aws:iam::111122223333:role/bench-client";
const SERVER_ROLE: &str = "arn:aws:iam::111122223333:role/bench-server";

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo server on 127.0.0.1:PORT (run as its own process by `run`).
    Echo {
        #[arg(long)]
        port: u16,
    },
    /// Plain TCP relay 127.0.0.1:LISTEN -> 127.0.0.1:CONNECT on one thread, no TLS: two of them
    /// in a chain are the floor any two-hop userspace proxy pays on this machine.
    Relay {
        #[arg(long)]
        listen: u16,
        #[arg(long)]
        connect: u16,
    },
    /// HTTP/1.1 app on 127.0.0.1:PORT for the caller-identity section (run as its own process).
    HttpApp {
        #[arg(long)]
        port: u16,
    },
    /// Handshake load against 127.0.0.1:PORT with the client certificate in DIR/client (run as
    /// its own process, pinned apart from the server, by the handshakes-by-cores section):
    /// prints "<handshakes/s> <CPU ms this process used>".
    HandshakeLoad {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        concurrency: usize,
        #[arg(long)]
        threads: usize,
    },
    /// The whole benchmark.
    Run {
        #[arg(
            long,
            env = "ROLEMESH_PROXY_BIN",
            default_value = "target/release/rolemesh-proxy"
        )]
        proxy: PathBuf,
        #[arg(long, env = "STUNNEL_BIN", default_value = "stunnel4")]
        stunnel: PathBuf,
        /// Seconds per bulk and handshake measurement.
        #[arg(long, env = "BENCH_SECONDS", default_value_t = 3)]
        seconds: u64,
        /// Seconds per latency measurement.
        #[arg(long, env = "BENCH_LATENCY_SECONDS", default_value_t = 4)]
        latency_seconds: u64,
        /// Rounds over all paths; figures are medians over rounds.
        #[arg(long, env = "BENCH_ROUNDS", default_value_t = 3)]
        rounds: usize,
    },
}

fn main() -> anyhow::Result<()> {
    if rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .is_err()
    {
        bail!("a rustls crypto provider was already installed");
    }
    let args = Args::parse();
    match args.command {
        Cmd::Echo { port } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(echo(port)),
        Cmd::HttpApp { port } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(caller_mode::http_app(port)),
        Cmd::Relay { listen, connect } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(relay(listen, connect)),
        Cmd::HandshakeLoad {
            port,
            dir,
            seconds,
            concurrency,
            threads,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads.max(1))
                .enable_all()
                .build()?;
            let read = |name: &str| std::fs::read_to_string(dir.join("client").join(name));
            let config = tls_client(
                &read("ca.crt")?,
                &Pem {
                    chain: read("tls.crt")?,
                    key: read("tls.key")?,
                },
            )?;
            let target = Target {
                port,
                tls: Some(config),
            };
            let start = cpu_ms(std::process::id());
            let rate = runtime.block_on(handshakes(&target, concurrency, seconds))?;
            println!("{rate} {}", cpu_ms(std::process::id()) - start);
            Ok(())
        }
        Cmd::Run {
            proxy,
            stunnel,
            seconds,
            latency_seconds,
            rounds,
        } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(run(proxy, stunnel, seconds, latency_seconds, rounds.max(1))),
    }
}

async fn echo(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

async fn relay(listen: u16, connect: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", listen)).await?;
    loop {
        let (mut downstream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", connect)).await else {
                return;
            };
            let _ = downstream.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            // The proxy's splice buffer size, so the floor is like for like.
            let _ = tokio::io::copy_bidirectional_with_sizes(
                &mut downstream,
                &mut upstream,
                rolemesh_proxy::splice::BUFFER_SIZE,
                rolemesh_proxy::splice::BUFFER_SIZE,
            )
            .await;
        });
    }
}

/// Resident KiB of a process by what is mapped: its own binary's pages, shared libraries, the
/// brk heap, the main stack, and anonymous mappings (thread stacks, glibc's mmap'd arenas and
/// large allocations).
fn rss_by_mapping(pid: u32, binary: &Path) -> Vec<(&'static str, u64)> {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return Vec::new();
    };
    let binary_name = binary.file_name().map(|n| n.to_string_lossy().into_owned());
    let kinds = [
        "the proxy binary (file-backed pages)",
        "shared libraries (libc, libm, ld.so)",
        "brk heap",
        "main stack",
        "anonymous mappings (thread stacks, malloc arenas, large buffers)",
        "other mappings (vdso, vvar, ...)",
    ];
    let mut totals = [0u64; 6];
    let mut kind = 5;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            let path = fields.nth(4).unwrap_or("");
            kind = if path.is_empty() {
                4
            } else if path == "[heap]" {
                2
            } else if path == "[stack]" {
                3
            } else if binary_name
                .as_deref()
                .is_some_and(|name| path.ends_with(&format!("/{name}")))
            {
                0
            } else if path.contains(".so") {
                1
            } else {
                5
            };
        } else if first == "Rss:" {
            totals[kind] += fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    kinds.into_iter().zip(totals).collect()
}

/// Kills its child on drop so a failed run leaves nothing behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Guard {
    fn rss_kib(&self) -> u64 {
        rss_kib(self.0.id())
    }
}

/// One bulk run with the CPU it cost: the path's proxies (summed) and the machine.
#[derive(Clone, Copy)]
struct BulkRun {
    mb_per_s: f64,
    /// Proxy CPU per MB echoed; every echoed byte crosses each proxy once each way.
    proxy_ms_per_mb: f64,
    /// CPUs the whole machine kept busy during the run.
    machine_cpus: f64,
}

async fn bulk_with_cpu(target: &Target, proxies: &[u32], seconds: u64) -> anyhow::Result<BulkRun> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let before: f64 = proxies.iter().map(|&pid| cpu_ms(pid)).sum();
    let (busy_before, total_before) = machine_ticks();
    let (mb_per_s, mb) = bulk(target, seconds).await?;
    let after: f64 = proxies.iter().map(|&pid| cpu_ms(pid)).sum();
    let (busy_after, total_after) = machine_ticks();
    let machine_cpus =
        (busy_after - busy_before) as f64 / (total_after - total_before).max(1) as f64 * cpus;
    Ok(BulkRun {
        mb_per_s,
        proxy_ms_per_mb: (after - before) / mb,
        machine_cpus,
    })
}

/// What AES-GCM alone costs per MB in the negotiated cipher suite, sealing and opening full
/// 16 KiB records through rustls's own aws-lc-rs record encrypter and decrypter: the share of a
/// sidecar's bulk CPU that no proxy built on this provider can shed.
fn aead_ms_per_mb() -> anyhow::Result<(String, f64)> {
    use rustls::{
        ContentType, ProtocolVersion,
        crypto::cipher::{AeadKey, InboundOpaqueMessage, Iv, OutboundPlainMessage},
    };
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let suite = provider
        .cipher_suites
        .iter()
        .find_map(|s| s.tls13())
        .context("the provider has no TLS 1.3 cipher suite")?;
    let key = || AeadKey::from([7u8; 32]);
    let iv = || Iv::new([9u8; 12]);
    let mut sealer = suite.aead_alg.encrypter(key(), iv());
    let mut opener = suite.aead_alg.decrypter(key(), iv());
    let plaintext = vec![0x5au8; 16 * 1024];
    let mut records = 0u64;
    // Median of several short samples: one long sample on this shared machine swings with
    // whatever else runs in it.
    let mut samples = Vec::new();
    for _ in 0..7 {
        let start = Instant::now();
        let mut sampled = 0u64;
        while start.elapsed() < Duration::from_millis(150) {
            let message = OutboundPlainMessage {
                typ: ContentType::ApplicationData,
                version: ProtocolVersion::TLSv1_2,
                payload: plaintext.as_slice().into(),
            };
            let mut sealed = sealer.encrypt(message, records)?.encode();
            let opened = opener.decrypt(
                InboundOpaqueMessage::new(
                    ContentType::ApplicationData,
                    ProtocolVersion::TLSv1_2,
                    &mut sealed[5..],
                ),
                records,
            )?;
            if opened.payload.len() != plaintext.len() {
                bail!("AES-GCM round trip changed the record length");
            }
            records += 1;
            sampled += 1;
        }
        let mb = sampled as f64 * plaintext.len() as f64 / 1e6;
        samples.push(start.elapsed().as_secs_f64() * 1e3 / mb);
    }
    Ok((format!("{:?}", suite.common.suite), median(samples)))
}

async fn wait_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("nothing listens on port {port}")
}

struct Pem {
    chain: String,
    key: String,
}

/// CA and two leaves from the project's issuance code, written as files for both proxies.
fn issue(dir: &Path) -> anyhow::Result<(String, Pem, Pem)> {
    let ca = Ca::new(TRUST_DOMAIN);
    let ca_pem = ca.pem.clone();
    let leaf = |sa: &str, role: &str| -> anyhow::Result<Pem> {
        let leaf = ca.leaf_in(TRUST_DOMAIN, "bench", sa, role, |_| {});
        Ok(Pem {
            chain: leaf.chain_pem,
            key: leaf.key_pem,
        })
    };
    let client = leaf("client", CLIENT_ROLE)?;
    let server = leaf("server", SERVER_ROLE)?;
    for (name, pem) in [("client", &client), ("server", &server)] {
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub)?;
        std::fs::write(sub.join("tls.crt"), &pem.chain)?;
        std::fs::write(sub.join("tls.key"), &pem.key)?;
        std::fs::write(sub.join("ca.crt"), &ca_pem)?;
    }
    Ok((ca_pem, client, server))
}

fn tls_client(ca_pem: &str, leaf: &Pem) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let chain =
        CertificateDer::pem_slice_iter(leaf.chain.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes())?;
    let mut config = ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    // Every connection must be a full handshake, as a new peer's is.
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Where the load generator connects, and whether it speaks mTLS itself.
#[derive(Clone)]
struct Target {
    port: u16,
    tls: Option<Arc<ClientConfig>>,
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

impl Target {
    async fn connect(&self) -> anyhow::Result<Box<dyn Io>> {
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).await?;
        tcp.set_nodelay(true)?;
        Ok(match &self.tls {
            None => Box::new(tcp),
            Some(config) => Box::new(
                TlsConnector::from(config.clone())
                    .connect(ServerName::try_from("localhost")?, tcp)
                    .await?,
            ),
        })
    }
}

/// One connection: write for `seconds`, read back everything echoed. Returns MB/s each way and
/// the MB echoed.
async fn bulk(target: &Target, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let stream = target.connect().await?;
    let (mut r, mut w) = tokio::io::split(stream);
    let written = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // Wakes a reader that has caught up with everything written just before the writer stops:
    // without it that read waits for bytes that never come.
    let finished = Arc::new(tokio::sync::Notify::new());
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let writer = {
        let (written, done, finished) = (written.clone(), done.clone(), finished.clone());
        tokio::spawn(async move {
            let chunk = vec![0x5au8; 64 * 1024];
            while Instant::now() < deadline {
                if w.write_all(&chunk).await.is_err() {
                    break;
                }
                written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            done.store(true, Ordering::Release);
            finished.notify_one();
            w
        })
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = 0u64;
    loop {
        if done.load(Ordering::Acquire) && read >= written.load(Ordering::Relaxed) {
            break;
        }
        let n = tokio::select! {
            n = tokio::time::timeout(Duration::from_secs(10), r.read(&mut buf)) => {
                n.context("bulk read stalled")??
            }
            () = finished.notified() => continue,
        };
        if n == 0 {
            bail!("connection closed during bulk transfer");
        }
        read += n as u64;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = writer.await;
    Ok((read as f64 / elapsed / 1e6, read as f64 / 1e6))
}

/// 1 KiB request/response at `rate` req/s spread over `conns` keep-alive connections.
/// Returns (p50, p99) in milliseconds.
async fn latency(
    target: &Target,
    conns: usize,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(f64, f64, u64)> {
    let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let per_conn = rate * seconds / conns as u64;
    let mut tasks = Vec::new();
    for i in 0..conns {
        let mut stream = target.connect().await?;
        // Stagger connections so the requests arrive evenly, not in bursts of `conns`.
        let offset = interval.mul_f64(i as f64 / conns as f64);
        tasks.push(tokio::spawn(async move {
            let request = vec![0x42u8; 1024];
            let mut response = vec![0u8; 1024];
            let mut samples = Vec::with_capacity(per_conn as usize);
            let start = tokio::time::Instant::now() + offset;
            for k in 0..per_conn {
                tokio::time::sleep_until(start + interval * k as u32).await;
                let sent = Instant::now();
                stream.write_all(&request).await?;
                stream.read_exact(&mut response).await?;
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
    Ok((pick(0.50), pick(0.99), all.len() as u64))
}

/// New mTLS connections per second from `concurrency` clients, each completing a 1-byte round
/// trip so the server has verified the client certificate before the next connection.
async fn handshakes(target: &Target, concurrency: usize, seconds: u64) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut count = 0u64;
            while Instant::now() < deadline {
                let mut stream = target.connect().await?;
                stream.write_all(b"x").await?;
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await?;
                count += 1;
            }
            anyhow::Ok(count)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// The paths of the bulk and latency runs, in their order, for error messages.
const PATH_NAMES: [&str; 5] = ["direct", "one hop", "two hops", "stunnel", "plain relays"];

/// Connections held open at once to measure what each costs a sidecar.
const HELD_CONNECTIONS: usize = 256;

/// Opens [`HELD_CONNECTIONS`] connections through `target`, moves 1 KiB each way on every one
/// and keeps them open: the growth of each sidecar's RSS over the count is what an open
/// connection costs it (buffers, TLS state, task). Returns the larger of the two, in KiB.
async fn held_connection_cost(target: &Target, sidecars: [&Guard; 2]) -> anyhow::Result<f64> {
    let before = sidecars.map(Guard::rss_kib);
    let mut held = Vec::with_capacity(HELD_CONNECTIONS);
    for _ in 0..HELD_CONNECTIONS {
        let mut stream = target.connect().await?;
        stream.write_all(&[0x42u8; 1024]).await?;
        let mut echoed = [0u8; 1024];
        stream.read_exact(&mut echoed).await?;
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = sidecars.map(Guard::rss_kib);
    drop(held);
    Ok(before
        .iter()
        .zip(after)
        .map(|(b, a)| a.saturating_sub(*b) as f64 / HELD_CONNECTIONS as f64)
        .fold(0.0, f64::max))
}

fn start_proxy(
    bin: &Path,
    dir: &Path,
    name: &str,
    config: serde_json::Value,
    rules: serde_json::Value,
) -> anyhow::Result<Guard> {
    start_proxy_on(bin, dir, name, config, rules, None)
}

/// A server sidecar with the server's identity in `dir/server`, one inbound mapping (`inbound`,
/// its JSON) and peer rules that admit the client's role on it.
fn start_server_sidecar(
    bin: &Path,
    dir: &Path,
    name: &str,
    admin_port: u16,
    inbound: serde_json::Value,
    pinned: Option<&cores::CpuSet>,
) -> anyhow::Result<Guard> {
    let mapping = inbound["name"].clone();
    start_proxy_on(
        bin,
        dir,
        name,
        serde_json::json!({
            "trustDomain": TRUST_DOMAIN,
            "identityDir": dir.join("server"),
            "trustBundle": dir.join("server/ca.crt"),
            "adminPort": admin_port, "adminAddress": "127.0.0.1",
            "rulesFile": dir.join(format!("{name}-rules.json")),
            "inbound": [inbound],
        }),
        serde_json::json!({"policy": "bench", "generation": 1,
            "inbound": [{"name": mapping, "allow": [CLIENT_ROLE]}]}),
        pinned,
    )
}

/// [`start_proxy`] on the CPUs `pinned` lists (`taskset -c`), with that many runtime threads.
fn start_proxy_on(
    bin: &Path,
    dir: &Path,
    name: &str,
    config: serde_json::Value,
    rules: serde_json::Value,
    pinned: Option<&cores::CpuSet>,
) -> anyhow::Result<Guard> {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, config.to_string())?;
    if let Some(rules_file) = config["rulesFile"].as_str() {
        std::fs::write(rules_file, rules.to_string())?;
    }
    let mut command = cores::command_on(pinned, bin);
    if let Some(cpus) = pinned {
        command.env("ROLEMESH_PROXY_CORES", cpus.count().to_string());
    }
    let child = command
        .arg("--config-file")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log")))?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Guard(child))
}

fn start_stunnel(bin: &Path, dir: &Path, name: &str, body: &str) -> anyhow::Result<Guard> {
    start_stunnel_on(bin, dir, name, body, None)
}

/// [`start_stunnel`] on the CPUs `pinned` lists; stunnel4 runs a thread per connection, all of
/// them on those CPUs.
fn start_stunnel_on(
    bin: &Path,
    dir: &Path,
    name: &str,
    body: &str,
    pinned: Option<&cores::CpuSet>,
) -> anyhow::Result<Guard> {
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(
        &path,
        format!(
            "foreground = yes\npid =\nsyslog = no\ndebug = 3\noutput = {}\n{body}",
            dir.join(format!("{name}.log")).display()
        ),
    )?;
    let child = cores::command_on(pinned, bin)
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Guard(child))
}

async fn run(
    proxy: PathBuf,
    stunnel: PathBuf,
    seconds: u64,
    latency_seconds: u64,
    rounds: usize,
) -> anyhow::Result<()> {
    let dir = try_temp_dir("proxy-bench")?;
    let (ca_pem, client_pem, _server_pem) = issue(&dir)?;
    let mtls = tls_client(&ca_pem, &client_pem)?;

    let echo_port = free_port()?;
    let _echo = Guard(
        Command::new(std::env::current_exe()?)
            .args(["echo", "--port", &echo_port.to_string()])
            .spawn()?,
    );
    let (relay_outer, relay_inner) = (free_port()?, free_port()?);
    let relay = |listen: u16, connect: u16| -> anyhow::Result<Guard> {
        Ok(Guard(
            Command::new(std::env::current_exe()?)
                .args(["relay", "--listen", &listen.to_string()])
                .args(["--connect", &connect.to_string()])
                .spawn()?,
        ))
    };
    let relay_inner_guard = relay(relay_inner, echo_port)?;
    let relay_outer_guard = relay(relay_outer, relay_inner)?;
    let (server_port, server_admin, client_port, client_admin) =
        (free_port()?, free_port()?, free_port()?, free_port()?);
    let server = start_server_sidecar(
        &proxy,
        &dir,
        "server-sidecar",
        server_admin,
        serde_json::json!({"name": "echo", "port": server_port, "appPort": echo_port}),
        None,
    )?;
    let client = start_proxy(
        &proxy,
        &dir,
        "client-sidecar",
        serde_json::json!({
            "trustDomain": TRUST_DOMAIN,
            "identityDir": dir.join("client"),
            "trustBundle": dir.join("client/ca.crt"),
            "adminPort": client_admin, "adminAddress": "127.0.0.1",
            "rulesFile": dir.join("client-rules.json"),
            "outbound": [{"name": "echo", "localPort": client_port}],
        }),
        serde_json::json!({"policy": "bench", "generation": 1,
            "outbound": [{"name": "echo", "upstream": format!("127.0.0.1:{server_port}"), "expect": [SERVER_ROLE]}]}),
    )?;
    let (st_server_port, st_client_port) = (free_port()?, free_port()?);
    let tls_opts = |name: &str| {
        format!(
            "cert = {d}/{name}/tls.crt\nkey = {d}/{name}/tls.key\nCAfile = {d}/{name}/ca.crt\nverifyChain = yes\nsslVersionMin = TLSv1.3\n",
            d = dir.display()
        )
    };
    let st_server = start_stunnel(
        &stunnel,
        &dir,
        "stunnel-server",
        &format!(
            "[srv]\naccept = 127.0.0.1:{st_server_port}\nconnect = 127.0.0.1:{echo_port}\nrequireCert = yes\n{}",
            tls_opts("server")
        ),
    )?;
    let st_client = start_stunnel(
        &stunnel,
        &dir,
        "stunnel-client",
        &format!(
            "[cli]\nclient = yes\naccept = 127.0.0.1:{st_client_port}\nconnect = 127.0.0.1:{st_server_port}\n{}",
            tls_opts("client")
        ),
    )?;
    for port in [
        echo_port,
        relay_inner,
        relay_outer,
        server_port,
        client_port,
        st_server_port,
        st_client_port,
    ] {
        wait_port(port).await?;
    }
    // Readiness: the sidecars answer /ready once their certificates are loaded.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = server.rss_kib().max(client.rss_kib());
    let idle_breakdown = rss_by_mapping(server.0.id(), &proxy);

    let direct = Target {
        port: echo_port,
        tls: None,
    };
    let one_hop = Target {
        port: server_port,
        tls: Some(mtls.clone()),
    };
    let two_hop = Target {
        port: client_port,
        tls: None,
    };
    let stunnel_two_hop = Target {
        port: st_client_port,
        tls: None,
    };
    let relay_two_hop = Target {
        port: relay_outer,
        tls: None,
    };
    let stunnel_server = Target {
        port: st_server_port,
        tls: Some(mtls.clone()),
    };
    // Fail early (with a clear message) if any path does not carry bytes.
    for (name, target) in [
        ("direct", &direct),
        ("one hop", &one_hop),
        ("two hops", &two_hop),
        ("stunnel", &stunnel_two_hop),
        ("plain relays", &relay_two_hop),
    ] {
        let mut s = target
            .connect()
            .await
            .with_context(|| format!("{name}: connect"))?;
        s.write_all(b"ping").await?;
        let mut b = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .with_context(|| format!("{name}: no echo (see logs in {})", dir.display()))??;
    }

    // Paths alternate within each round and every figure is the median over rounds, so a burst of
    // noise on this shared machine lands on one sample of every path, not on all of one.
    let paths = [
        &direct,
        &one_hop,
        &two_hop,
        &stunnel_two_hop,
        &relay_two_hop,
    ];
    eprintln!("bulk throughput, {rounds} rounds of {seconds} s per path...");
    // The proxy processes each path crosses, whose CPU each bulk run accounts for.
    let path_proxies: [Vec<u32>; 5] = [
        vec![],
        vec![server.0.id()],
        vec![client.0.id(), server.0.id()],
        vec![st_client.0.id(), st_server.0.id()],
        vec![relay_outer_guard.0.id(), relay_inner_guard.0.id()],
    ];
    let mut bulk_cpu_runs: Vec<Vec<BulkRun>> = vec![Vec::new(); paths.len()];
    for _ in 0..rounds {
        for (((runs, target), proxies), name) in bulk_cpu_runs
            .iter_mut()
            .zip(paths)
            .zip(&path_proxies)
            .zip(PATH_NAMES)
        {
            runs.push(
                bulk_with_cpu(target, proxies, seconds)
                    .await
                    .with_context(|| {
                        format!("bulk throughput through {name} (logs in {})", dir.display())
                    })?,
            );
        }
    }
    let bulk_runs: Vec<Vec<f64>> = bulk_cpu_runs
        .iter()
        .map(|runs| runs.iter().map(|r| r.mb_per_s).collect())
        .collect();
    let (aead_suite, aead_ms) = aead_ms_per_mb()?;

    eprintln!(
        "latency, 1 KiB at 1,000 req/s over 16 connections, {rounds} rounds of {latency_seconds} s per path..."
    );
    // RSS under load: the most either sidecar reaches during the latency runs.
    let sampler = {
        let stop = Arc::new(AtomicBool::new(false));
        let pids = [server.0.id(), client.0.id()];
        let s = stop.clone();
        let handle = tokio::spawn(async move {
            let mut max = 0u64;
            while !s.load(Ordering::Relaxed) {
                for pid in pids {
                    max = max.max(rss_kib(pid));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            max
        });
        (stop, handle)
    };
    let mut latency_runs: Vec<Vec<(f64, f64, u64)>> = vec![Vec::new(); paths.len()];
    for _ in 0..rounds {
        for (runs, target) in latency_runs.iter_mut().zip(paths) {
            runs.push(latency(target, 16, 1000, latency_seconds).await?);
        }
    }
    sampler.0.store(true, Ordering::Relaxed);
    let load_rss = sampler.1.await?;

    eprintln!(
        "new mTLS handshakes/s, {rounds} rounds of {seconds} s per server, 8 clients, no resumption..."
    );
    let (mut hs_rolemesh_runs, mut hs_stunnel_runs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        hs_rolemesh_runs.push(handshakes(&one_hop, 8, seconds).await?);
        hs_stunnel_runs.push(handshakes(&stunnel_server, 8, seconds).await?);
    }
    let hs_rolemesh = median(hs_rolemesh_runs.iter().copied());
    let hs_stunnel = median(hs_stunnel_runs.iter().copied());
    let hs_ratio = median(
        hs_rolemesh_runs
            .iter()
            .zip(&hs_stunnel_runs)
            .map(|(r, s)| r / s),
    );

    eprintln!("new mTLS handshakes/s by server CPUs (taskset), {rounds} rounds of {seconds} s...");
    let by_cores = cores::measure(
        &proxy,
        &stunnel,
        &dir,
        echo_port,
        &tls_opts("server"),
        seconds,
        rounds,
    )
    .await?;

    eprintln!("memory per open connection, {HELD_CONNECTIONS} connections through two hops...");
    let per_connection_kib = held_connection_cost(&two_hop, [&server, &client]).await?;

    let [bulk_direct, bulk_one, bulk_two, bulk_stunnel, bulk_relay] =
        [0, 1, 2, 3, 4].map(|i| median(bulk_runs[i].iter().copied()));
    // Ratios and added latencies are taken within a round (against that round's direct run),
    // then the median over rounds.
    let bulk_ratio = |i: usize| {
        median(
            bulk_runs[i]
                .iter()
                .zip(&bulk_runs[0])
                .map(|(path, direct)| path / direct),
        )
    };
    let added = |i: usize| {
        let pairs = latency_runs[i].iter().zip(&latency_runs[0]);
        (
            median(pairs.clone().map(|(l, d)| l.0 - d.0)),
            median(pairs.map(|(l, d)| l.1 - d.1)),
        )
    };
    let medians = |i: usize| {
        (
            median(latency_runs[i].iter().map(|l| l.0)),
            median(latency_runs[i].iter().map(|l| l.1)),
        )
    };
    let [lat_direct, lat_one, lat_two, lat_stunnel, lat_relay] = [0, 1, 2, 3, 4].map(medians);
    let (one_p50, one_p99) = added(1);
    let (two_p50, two_p99) = added(2);
    let (st_p50, st_p99) = added(3);
    let (relay_p50, relay_p99) = added(4);
    let floor_gap = median(
        latency_runs[2]
            .iter()
            .zip(&latency_runs[4])
            .map(|(two, relay)| two.0 - relay.0),
    );
    let mib = |kib: u64| kib as f64 / 1024.0;

    println!();
    println!(
        "rolemesh-proxy benchmark (one run, medians of {rounds} rounds; {} CPUs shared by load generator, echo server and proxies)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("{:<54} {:>12} {:>12}", "path", "bulk MB/s", "p50/p99 ms");
    for (name, mbps, lat) in [
        ("direct loopback", bulk_direct, lat_direct),
        (
            "one rolemesh hop (mTLS client -> server sidecar)",
            bulk_one,
            lat_one,
        ),
        (
            "two rolemesh hops (client sidecar -> server sidecar)",
            bulk_two,
            lat_two,
        ),
        ("stunnel4, two hops", bulk_stunnel, lat_stunnel),
        (
            "plain TCP relays, two hops (no TLS: the floor)",
            bulk_relay,
            lat_relay,
        ),
    ] {
        let (p50, p99): (f64, f64) = lat;
        println!("{name:<54} {mbps:>12.0} {p50:>5.3}/{p99:<6.3}");
    }
    println!();
    println!(
        "{:<58} {:>12} {:>10} {:>8}",
        "figure", "measured", "target", "ratio"
    );
    let row = |name: &str, value: String, target: &str, ratio: &str| {
        println!("{name:<58} {value:>12} {target:>10} {ratio:>8}");
    };
    let ratio = bulk_ratio(2);
    row(
        "bulk throughput two-hop / direct",
        format!("{ratio:.2}"),
        ">= 0.5",
        &format!("{:.2}", ratio / 0.5),
    );
    row(
        "bulk throughput stunnel two-hop / direct",
        format!("{:.2}", bulk_ratio(3)),
        "-",
        "-",
    );
    row(
        "added latency p50, two hops (ms)",
        format!("{two_p50:.3}"),
        "<= 0.15",
        &format!("{:.2}", two_p50 / 0.15),
    );
    row(
        "added latency p99, two hops (ms)",
        format!("{two_p99:.3}"),
        "<= 0.5",
        &format!("{:.2}", two_p99 / 0.5),
    );
    row(
        "added latency p50/p99, one hop (ms)",
        format!("{one_p50:.3}/{one_p99:.3}"),
        "-",
        "-",
    );
    row(
        "added latency p50/p99, stunnel4 two hops (ms)",
        format!("{st_p50:.3}/{st_p99:.3}"),
        "-",
        "-",
    );
    row(
        "added latency p50/p99, plain relays two hops (ms)",
        format!("{relay_p50:.3}/{relay_p99:.3}"),
        "-",
        "-",
    );
    row(
        "bulk throughput plain relays two-hop / direct",
        format!("{:.2}", bulk_ratio(4)),
        "-",
        "-",
    );
    row(
        "rolemesh's own p50 latency over the floor, two hops (ms)",
        format!("{floor_gap:.3}"),
        "-",
        "-",
    );
    row(
        "new mTLS handshakes/s, rolemesh server sidecar",
        format!("{hs_rolemesh:.0}"),
        "-",
        "-",
    );
    row(
        "new mTLS handshakes/s, stunnel4 server",
        format!("{hs_stunnel:.0}"),
        "-",
        "-",
    );
    row(
        "handshakes/s rolemesh / stunnel4",
        format!("{hs_ratio:.2}"),
        ">= 1.5",
        &format!("{:.2}", hs_ratio / 1.5),
    );
    row(
        "proxy RSS idle (MiB, max of both sidecars)",
        format!("{:.1}", mib(idle_rss)),
        "<= 8",
        &format!("{:.2}", mib(idle_rss) / 8.0),
    );
    row(
        "proxy RSS per open connection (KiB, max of both sidecars)",
        format!("{per_connection_kib:.0}"),
        "-",
        "-",
    );
    row(
        "proxy RSS at 1,000 req/s (MiB, max of both)",
        format!("{:.1}", mib(load_rss)),
        "<= 15",
        &format!("{:.2}", mib(load_rss) / 15.0),
    );
    println!("(ratio: measured / target; <= 1 meets a maximum, >= 1 meets a minimum)");
    cores::print(&by_cores, rounds);
    println!();
    println!("what the server sidecar's idle RSS is made of (KiB, /proc/PID/smaps)");
    for (kind, kib) in &idle_breakdown {
        println!("  {kind:<58} {kib:>6}");
    }
    println!();
    println!(
        "bulk CPU (medians): what each proxy spends per MB echoed (every echoed MB crosses it once each way)"
    );
    println!(
        "{:<54} {:>12} {:>14}",
        "path", "ms/MB/proxy", "machine CPUs"
    );
    let cpu_median = |i: usize, f: fn(&BulkRun) -> f64| median(bulk_cpu_runs[i].iter().map(f));
    let per_proxy =
        |i: usize| cpu_median(i, |r| r.proxy_ms_per_mb) / path_proxies[i].len().max(1) as f64;
    for (i, name) in [
        (0, "direct loopback (no proxy)"),
        (1, "one rolemesh hop"),
        (2, "two rolemesh hops"),
        (3, "stunnel4, two hops"),
        (4, "plain TCP relays, two hops"),
    ] {
        let proxy = if path_proxies[i].is_empty() {
            "-".to_string()
        } else {
            format!("{:.2}", per_proxy(i))
        };
        println!(
            "{name:<54} {proxy:>12} {:>14.2}",
            cpu_median(i, |r| r.machine_cpus)
        );
    }
    println!(
        "AES-GCM alone ({aead_suite}, rustls's aws-lc-rs record layer), seal + open: {aead_ms:.2} ms/MB"
    );
    println!(
        "=> a sidecar's bulk CPU per MB: {:.2} = plain relay {:.2} + AES-GCM {aead_ms:.2} + the rest {:.2}",
        per_proxy(2),
        per_proxy(4),
        per_proxy(2) - per_proxy(4) - aead_ms
    );
    if let Ok(tunables) = std::env::var("GLIBC_TUNABLES") {
        println!("every process ran with GLIBC_TUNABLES={tunables}, as the proxy image sets it");
    }
    println!(
        "requests measured per latency run: {}; every figure is the median of {rounds} rounds",
        latency_runs[2].first().map_or(0, |l| l.2)
    );
    eprintln!("callerIdentity http vs l4, {rounds} rounds of {latency_seconds} s per mode...");
    let caller = caller_mode::measure(&proxy, &dir, &mtls, rounds, latency_seconds).await?;
    caller_mode::print(&caller, rounds);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aead_cost_is_measured_on_the_default_suite() {
        let (suite, ms_per_mb) = aead_ms_per_mb().expect("AES-GCM round trip");
        assert_eq!(suite, "TLS13_AES_256_GCM_SHA384");
        assert!(ms_per_mb > 0.0 && ms_per_mb.is_finite());
    }
}
