//! Test harness: the proxy binary with a kubelet-style mounted Secret, small loopback apps and
//! clients. Certificates, ports and directories come from `rolemesh_testkit`.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use rolemesh_profile::inspect_certificate;
pub use rolemesh_testkit::{
    free_port,
    pki::{Ca, Leaf, TRUST_DOMAIN as TD},
    temp_dir,
};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio_rustls::{TlsConnector, client::TlsStream};

pub const CLIENT_ROLE: &str = "arn:aws:iam::111122223333:role/frontend";
pub const SERVER_ROLE: &str = "arn:aws:iam::111122223333:role/payments";
pub const BANNER: &str = "hello-from-app";

/// A directory laid out as kubelet mounts a Secret: the files live in a timestamped directory,
/// `..data` points at it, and the visible names point through `..data`.
pub struct MountedSecret {
    pub dir: PathBuf,
    generation: u32,
}

impl MountedSecret {
    pub fn new(dir: &Path, leaf: &Leaf, ca_pem: &str) -> MountedSecret {
        let mut mounted = MountedSecret {
            dir: dir.to_path_buf(),
            generation: 0,
        };
        mounted.swap(leaf.chain_pem.as_bytes(), leaf.key_pem.as_bytes(), ca_pem);
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
        mounted
    }

    /// Writes a new generation and swaps `..data` atomically (rename of a symlink), as kubelet does.
    pub fn swap(&mut self, chain: &[u8], key: &[u8], ca_pem: &str) {
        self.generation += 1;
        let generation = format!(
            "..2026_11_24_00_00_{:02}.{}",
            self.generation, self.generation
        );
        let target = self.dir.join(&generation);
        std::fs::create_dir_all(&target).unwrap();
        std::fs::write(target.join("tls.crt"), chain).unwrap();
        std::fs::write(target.join("tls.key"), key).unwrap();
        std::fs::write(target.join("ca.crt"), ca_pem).unwrap();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&generation, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

/// A directory laid out as kubelet mounts the proxy's rules volume (one ConfigMap key as
/// `rules.json`), swapped the same way as [`MountedSecret`].
pub struct MountedRules {
    pub dir: PathBuf,
    generation: u32,
}

impl MountedRules {
    pub fn new(dir: &Path, rules: &str) -> MountedRules {
        std::fs::create_dir_all(dir).unwrap();
        let mut mounted = MountedRules {
            dir: dir.to_path_buf(),
            generation: 0,
        };
        mounted.swap(rules);
        std::os::unix::fs::symlink("..data/rules.json", dir.join("rules.json")).unwrap();
        mounted
    }

    pub fn file(&self) -> PathBuf {
        self.dir.join("rules.json")
    }

    /// Writes `rules` as a new generation and swaps `..data` atomically, as kubelet does.
    pub fn swap(&mut self, rules: &str) {
        self.generation += 1;
        let generation = format!(
            "..2026_11_24_00_00_{:02}.{}",
            self.generation, self.generation
        );
        let target = self.dir.join(&generation);
        std::fs::create_dir_all(&target).unwrap();
        std::fs::write(target.join("rules.json"), rules).unwrap();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&generation, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

/// Moves the peer rules out of a test's listener JSON (`allow` of inbound mappings, `upstream`
/// and `expect` of outbound ones), where tests write them for brevity, into the rules file the
/// proxy reads (policy `test`, generation 1).
pub fn split_rules(config: &mut serde_json::Value) -> serde_json::Value {
    let mut inbound = Vec::new();
    for listener in config
        .get_mut("inbound")
        .and_then(|l| l.as_array_mut())
        .into_iter()
        .flatten()
    {
        let listener = listener.as_object_mut().unwrap();
        if let Some(allow) = listener.remove("allow") {
            inbound.push(serde_json::json!({"name": listener["name"], "allow": allow}));
        }
    }
    let mut outbound = Vec::new();
    for listener in config
        .get_mut("outbound")
        .and_then(|l| l.as_array_mut())
        .into_iter()
        .flatten()
    {
        let listener = listener.as_object_mut().unwrap();
        if let (Some(upstream), Some(expect)) =
            (listener.remove("upstream"), listener.remove("expect"))
        {
            outbound.push(serde_json::json!({"name": listener["name"], "upstream": upstream, "expect": expect}));
        }
    }
    serde_json::json!({"policy": "test", "generation": 1, "inbound": inbound, "outbound": outbound})
}

/// An app on 127.0.0.1 that greets with [`BANNER`] and echoes lines until it reads `quit`.
pub fn echo_app() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                if stream.write_all(format!("{BANNER}\n").as_bytes()).is_err() {
                    return;
                }
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    if line.trim() == "quit" {
                        return;
                    }
                    if stream.write_all(line.as_bytes()).is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    port
}

/// A one-request HTTP app for curl.
pub fn http_app() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = "hello over mtls\n";
                let _ = stream.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            });
        }
    });
    port
}

pub struct Proxy {
    child: Child,
    pub admin_port: u16,
    pub log: PathBuf,
    /// The mounted rules file, for tests that change the rules under the running proxy.
    pub rules: Option<MountedRules>,
}

impl Proxy {
    /// Mounts `leaf` and `ca_pem` under `dir/identity` as kubelet would and starts the proxy with
    /// them, in trust domain [`TD`], with the listeners and limits in `listeners` (JSON object).
    pub fn with_identity(
        dir: &Path,
        leaf: &Leaf,
        ca_pem: &str,
        listeners: serde_json::Value,
    ) -> (Proxy, MountedSecret) {
        Proxy::with_identity_env(dir, leaf, ca_pem, listeners, &[])
    }

    /// [`Proxy::with_identity`] with extra environment for the proxy.
    pub fn with_identity_env(
        dir: &Path,
        leaf: &Leaf,
        ca_pem: &str,
        listeners: serde_json::Value,
        env: &[(&str, &str)],
    ) -> (Proxy, MountedSecret) {
        let identity = dir.join("identity");
        std::fs::create_dir_all(&identity).unwrap();
        let mounted = MountedSecret::new(&identity, leaf, ca_pem);
        let mut config = serde_json::json!({
            "trustDomain": TD,
            "identityDir": identity,
            "trustBundle": identity.join("ca.crt"),
            "adminPort": free_port(),
            "adminAddress": "127.0.0.1",
        });
        let serde_json::Value::Object(listeners) = listeners else {
            panic!("listeners must be a JSON object");
        };
        config.as_object_mut().unwrap().extend(listeners);
        (Proxy::start_with(dir, config, env, None), mounted)
    }

    /// Starts the binary with `config` (JSON) in a file, its peer rules ([`split_rules`]) in a
    /// kubelet-style mounted rules file, and waits until /ready says 200.
    pub fn start(dir: &Path, config: serde_json::Value) -> Proxy {
        Proxy::start_with(dir, config, &[], None)
    }

    /// [`Proxy::start`] with the extra environment and cgroup of [`Proxy::spawn_with`].
    pub fn start_with(
        dir: &Path,
        mut config: serde_json::Value,
        env: &[(&str, &str)],
        cgroup_procs: Option<&Path>,
    ) -> Proxy {
        let rules = split_rules(&mut config);
        let mounted = MountedRules::new(&dir.join("rules"), &rules.to_string());
        config["rulesFile"] = serde_json::json!(mounted.file());
        let mut proxy = Proxy::spawn_with(dir, config, env, cgroup_procs);
        proxy.rules = Some(mounted);
        proxy.wait_ready();
        proxy
    }

    /// Starts the binary with `config` (JSON, its `rulesFile` as given) and returns at once.
    pub fn spawn(dir: &Path, config: serde_json::Value) -> Proxy {
        Proxy::spawn_with(dir, config, &[], None)
    }

    /// [`Proxy::spawn`] with extra environment, and in the cgroup whose `cgroup.procs` is given
    /// (joined by a shell before it execs the proxy, so the proxy starts inside it).
    pub fn spawn_with(
        dir: &Path,
        config: serde_json::Value,
        env: &[(&str, &str)],
        cgroup_procs: Option<&Path>,
    ) -> Proxy {
        let admin_port = config["adminPort"].as_u64().unwrap() as u16;
        let path = dir.join("config.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let log = dir.join("proxy.log");
        let binary = env!("CARGO_BIN_EXE_rolemesh-proxy");
        let mut command = match cgroup_procs {
            Some(procs) => {
                let mut command = Command::new("sh");
                command
                    .arg("-c")
                    .arg("echo $$ > \"$0\" && exec \"$@\"")
                    .arg(procs)
                    .arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let child = command
            .arg("--config-file")
            .arg(&path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Proxy {
            child,
            admin_port,
            log,
            rules: None,
        }
    }

    /// Waits until /ready says 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((status, _)) = http_get(self.admin_port, "/ready")
                && status == 200
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "proxy not ready: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn metrics(&self) -> String {
        http_get(self.admin_port, "/metrics").unwrap().1
    }

    /// The value of the handshake-failure counter for `reason` (summed over mappings).
    pub fn failures(&self, reason: &str) -> u64 {
        metric_sum(
            &self.metrics(),
            "rolemesh_proxy_handshake_failures_total",
            &format!("reason=\"{reason}\""),
        )
    }

    /// The proxy's resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let kib = rolemesh_testkit::procfs::rss_kib(self.child.id());
        assert!(kib > 0, "the proxy has exited: {}", self.log_text());
        kib
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A counter's samples summed, as a whole number.
pub fn metric_sum(metrics: &str, name: &str, label: &str) -> u64 {
    rolemesh_testkit::metric_sum(metrics, name, label) as u64
}

pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((status, text))
}

/// Writes PEM files for an openssl/curl client and returns (cert, key, ca) paths.
pub fn client_files(
    dir: &Path,
    name: &str,
    leaf: &Leaf,
    ca_pem: &str,
) -> (PathBuf, PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let ca = dir.join(format!("{name}-ca.crt"));
    std::fs::write(&cert, &leaf.chain_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    std::fs::write(&ca, ca_pem).unwrap();
    (cert, key, ca)
}

/// Runs `openssl s_client` against `port`, sends "ping" then "quit", returns (success, stdout+stderr).
pub fn s_client(port: u16, extra: &[&str]) -> (bool, String) {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-quiet",
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is installed (dev/tools/install.sh)");
    {
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"ping\n");
        // Give the handshake and the echo time before asking the app to close.
        std::thread::sleep(Duration::from_millis(300));
        let _ = stdin.write_all(b"quit\n");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// A TLS 1.3 client presenting `leaf`, trusting `ca`.
pub fn client_config(ca: &Ca, leaf: &Leaf) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

/// Connects, reads the banner, and returns the stream and the serial the server presented.
pub async fn connect(
    port: u16,
    config: &Arc<ClientConfig>,
) -> std::io::Result<(
    tokio::io::BufReader<TlsStream<tokio::net::TcpStream>>,
    String,
)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let tls = TlsConnector::from(config.clone())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let serial = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| inspect_certificate(c).unwrap().serial_hex)
        .unwrap_or_default();
    let mut stream = tokio::io::BufReader::new(tls);
    let mut banner = String::new();
    stream.read_line(&mut banner).await?;
    if banner.trim() != BANNER {
        return Err(std::io::Error::other(format!("banner {banner:?}")));
    }
    Ok((stream, serial))
}

pub async fn round_trip(
    stream: &mut tokio::io::BufReader<TlsStream<tokio::net::TcpStream>>,
    line: &str,
) -> std::io::Result<()> {
    stream
        .get_mut()
        .write_all(format!("{line}\n").as_bytes())
        .await?;
    let mut answer = String::new();
    stream.read_line(&mut answer).await?;
    if answer.trim() != line {
        return Err(std::io::Error::other(format!(
            "echo {answer:?} for {line:?}"
        )));
    }
    Ok(())
}
