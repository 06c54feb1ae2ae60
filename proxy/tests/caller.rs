//! callerIdentity: what the app learns about the verified peer. `http`: curl (HTTP/1.1 and
//! HTTP/2 over TLS with ALPN) and curl through a second rolemesh proxy (h2c with prior knowledge,
//! as gRPC reaches a mesh peer) against an echo app that answers with the headers it received.
//! `proxyProtocolV2`: an app that parses the header with ppp. `l4` is what the other tests run.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    path::Path,
    process::Command,
    sync::mpsc,
    time::Duration,
};

use common::*;
use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use ppp::v2::{Addresses, Header, ParseError, TypeLengthValues};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

const EVIL_ROLE: &str = "arn:aws:iam::999999999999:role/evil";
const CLIENT_SPIFFE: &str = "spiffe://rolemesh.test/ns/shop/sa/frontend";

/// An HTTP/1.1 and h2c app on 127.0.0.1 whose answer lists the version and every header it
/// received, one `name: value` a line.
fn header_echo_app() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let service =
                        service_fn(|request: Request<hyper::body::Incoming>| async move {
                            let mut text = format!("version: {:?}\n", request.version());
                            for (name, value) in request.headers() {
                                text.push_str(&format!("{name}: {}\n", value.to_str().unwrap()));
                            }
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from(text),
                            )))
                        });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    port
}

/// An inbound proxy (`payments`) in front of `app_port` with `callerIdentity`, admitting
/// [`CLIENT_ROLE`]; returns the proxy, its port and its CA.
fn inbound(dir: &Path, app_port: u16, caller_identity: &str) -> (Proxy, u16, Ca) {
    let ca = Ca::new(TD);
    let port = free_port();
    let (proxy, _mounted) = Proxy::with_identity(
        dir,
        &ca.leaf("payments", SERVER_ROLE),
        &ca.pem,
        json!({"inbound": [{"name": "api", "port": port, "appPort": app_port,
                            "callerIdentity": caller_identity, "allow": [CLIENT_ROLE]}]}),
    );
    (proxy, port, ca)
}

/// curl with the frontend's certificate, sending spoofed identity headers in two spellings.
fn curl(dir: &Path, ca: &Ca, url: &str, port: u16, extra: &[&str]) -> (String, String) {
    let leaf = ca.leaf("frontend", CLIENT_ROLE);
    let (cert, key, ca_file) = client_files(dir, "curl", &leaf, &ca.pem);
    let output = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\nnegotiated: %{http_version}\n",
        ])
        .arg("--cacert")
        .arg(&ca_file)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["-H", &format!("X-Rolemesh-Peer-Role-Arn: {EVIL_ROLE}")])
        .args([
            "-H",
            &format!("x-rolemesh-peer-spiffe-id: spiffe://{TD}/ns/evil/sa/evil"),
        ])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl is installed (dev/tools/install.sh)");
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The app saw the verified identity once each and nothing of the spoofed one.
fn assert_identity_headers(echo: &str, context: &str) {
    let lines: Vec<&str> = echo.lines().collect();
    let count = |line: &str| lines.iter().filter(|l| **l == line).count();
    assert_eq!(
        count(&format!("x-rolemesh-peer-role-arn: {CLIENT_ROLE}")),
        1,
        "{context}: {echo}"
    );
    assert_eq!(
        count(&format!("x-rolemesh-peer-spiffe-id: {CLIENT_SPIFFE}")),
        1,
        "{context}: {echo}"
    );
    for spoofed in ["999999999999", "/ns/evil/"] {
        assert!(!echo.contains(spoofed), "{context}: {echo}");
    }
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("x-rolemesh-peer-"))
            .count(),
        2,
        "{context}: {echo}"
    );
}

#[test]
fn http_mode_tells_the_app_who_called_over_http1_and_http2() {
    let dir = temp_dir("caller-http");
    let (_proxy, port, ca) = inbound(&dir, header_echo_app(), "http");
    let url = format!("https://localhost:{port}/who");
    for (flag, app_version, negotiated) in [
        ("--http1.1", "HTTP/1.1", "1.1"),
        // ALPN h2, which the proxy offers on an http-mode listener.
        ("--http2", "HTTP/2.0", "2"),
        ("--http2-prior-knowledge", "HTTP/2.0", "2"),
    ] {
        let (echo, stderr) = curl(&dir, &ca, &url, port, &[flag]);
        assert!(
            echo.contains(&format!("version: {app_version}\n")),
            "{flag}: {echo} {stderr}"
        );
        assert!(
            echo.contains(&format!("negotiated: {negotiated}\n")),
            "{flag}: {echo}"
        );
        assert_identity_headers(&echo, flag);
    }
}

/// The mesh's own path: the app calls its local outbound proxy in plain h2c with prior knowledge
/// (as a gRPC client does), that proxy dials the inbound one over mTLS without ALPN, and the
/// inbound proxy recognises HTTP/2 by its preface.
#[test]
fn http_mode_serves_h2c_prior_knowledge_through_an_outbound_proxy() {
    let dir = temp_dir("caller-mesh");
    let (_server, port, ca) = inbound(&dir.join("server"), header_echo_app(), "http");
    let client_dir = dir.join("client");
    std::fs::create_dir_all(&client_dir).unwrap();
    let local_port = free_port();
    let (_client, _mounted) = Proxy::with_identity(
        &client_dir,
        &ca.leaf("frontend", CLIENT_ROLE),
        &ca.pem,
        json!({"outbound": [{"name": "payments", "localPort": local_port,
                             "upstream": format!("127.0.0.1:{port}"), "expect": [SERVER_ROLE]}]}),
    );
    for flag in ["--http2-prior-knowledge", "--http1.1"] {
        let output = Command::new("curl")
            .args(["-sS", "--max-time", "10", flag])
            .args(["-H", &format!("x-rolemesh-peer-role-arn: {EVIL_ROLE}")])
            .arg(format!("http://127.0.0.1:{local_port}/grpc.like/Call"))
            .output()
            .unwrap();
        let echo = String::from_utf8_lossy(&output.stdout);
        let expected = if flag == "--http1.1" {
            "HTTP/1.1"
        } else {
            "HTTP/2.0"
        };
        assert!(
            echo.contains(&format!("version: {expected}\n")),
            "{flag}: {echo} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_identity_headers(&echo, flag);
    }
}

/// Upgrades are refused (501) rather than passed half-working.
#[test]
fn http_mode_refuses_upgrades() {
    let dir = temp_dir("caller-upgrade");
    let (_proxy, port, ca) = inbound(&dir, header_echo_app(), "http");
    let (echo, stderr) = curl(
        &dir,
        &ca,
        &format!("https://localhost:{port}/ws"),
        port,
        &[
            "--http1.1",
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-o",
            "/dev/null",
            "-w",
            "status: %{http_code}\n",
        ],
    );
    assert!(echo.contains("status: 501"), "{echo} {stderr}");
}

/// What the PROXY v2 app saw of one connection.
struct Seen {
    addresses: Addresses,
    tlvs: Vec<(u8, Vec<u8>)>,
}

/// Reads a whole PROXY v2 header off `stream`, letting ppp say how much more it needs.
fn read_proxy_header(stream: &mut std::net::TcpStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    loop {
        let more = match Header::try_from(bytes.as_slice()) {
            Ok(header) => return header.as_bytes().to_vec(),
            Err(ParseError::Incomplete(_)) => 16 - bytes.len(),
            Err(ParseError::Partial(has, needs)) => needs - has,
            Err(error) => panic!("not a PROXY v2 header: {error} {bytes:?}"),
        };
        let mut chunk = vec![0; more];
        stream.read_exact(&mut chunk).unwrap();
        bytes.extend_from_slice(&chunk);
    }
}

/// An app that expects a PROXY v2 header, reports it, then echoes the stream.
fn proxy_protocol_app() -> (u16, mpsc::Receiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let bytes = read_proxy_header(&mut stream);
                let header = Header::try_from(bytes.as_slice()).unwrap();
                let tlvs = header
                    .tlvs()
                    .map(|t| t.unwrap())
                    .map(|t| (t.kind, t.value.to_vec()))
                    .collect();
                let _ = tx.send(Seen {
                    addresses: header.addresses,
                    tlvs,
                });
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, rx)
}

#[test]
fn proxy_protocol_v2_mode_sends_the_peer_before_its_bytes() {
    let dir = temp_dir("caller-ppv2");
    let (app_port, seen) = proxy_protocol_app();
    let (_proxy, port, ca) = inbound(&dir, app_port, "proxyProtocolV2");
    let config = client_config(&ca, &ca.leaf("frontend", CLIENT_ROLE));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client_address: SocketAddr = runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let client_address = tcp.local_addr().unwrap();
        let mut tls = TlsConnector::from(config)
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(b"ping\n").await.unwrap();
        let mut echoed = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            &echoed, b"ping\n",
            "the app's bytes follow the header untouched"
        );
        client_address
    });
    let seen = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    let proxy_address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(
        seen.addresses,
        Addresses::from((client_address, proxy_address))
    );
    let tlv = |kind: u8| {
        seen.tlvs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no TLV {kind:#x}"))
    };
    assert_eq!(tlv(0xE0), CLIENT_SPIFFE.as_bytes());
    assert_eq!(tlv(0xE1), CLIENT_ROLE.as_bytes());
    let ssl = tlv(0x20);
    assert_eq!(ssl[0], 0x01 | 0x02 | 0x04, "SSL, CERT_CONN, CERT_SESS");
    assert_eq!(ssl[1..5], [0, 0, 0, 0], "verify: 0 (verified)");
    let subs: Vec<(u8, String)> = TypeLengthValues::from(&ssl[5..])
        .map(|t| t.unwrap())
        .map(|t| (t.kind, String::from_utf8(t.value.to_vec()).unwrap()))
        .collect();
    assert_eq!(subs[0], (0x21, "TLSv1.3".to_string()));
    assert_eq!(subs[1].0, 0x23);
    assert!(
        subs[1].1.starts_with("TLS_") && !subs[1].1.starts_with("TLS13_"),
        "{subs:?}"
    );
}
