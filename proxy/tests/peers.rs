//! The proxy against peers nobody here wrote (openssl s_client/s_server, curl), with certificates
//! from the project's issuance code. Each bad input is refused with a TLS alert (never app
//! bytes), counted by reason, logged once, and good peers keep being served.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use rcgen::{BasicConstraints, IsCa, KeyUsagePurpose};
use rolemesh_testkit::pki::add_uri_san;
use serde_json::json;

struct Inbound {
    dir: PathBuf,
    ca: Ca,
    proxy: Proxy,
    port: u16,
}

fn inbound(app_port: u16) -> Inbound {
    inbound_with_bundle(app_port, |ca| ca.pem.clone()).0
}

/// An inbound proxy whose trust bundle is what `bundle` makes of its CA; also returns the
/// mounted identity, to update it as kubelet would.
fn inbound_with_bundle(
    app_port: u16,
    bundle: impl FnOnce(&Ca) -> String,
) -> (Inbound, MountedSecret) {
    let dir = temp_dir("in");
    let ca = Ca::new(TD);
    let port = free_port();
    let (proxy, mounted) = Proxy::with_identity(
        &dir,
        &ca.leaf("payments", SERVER_ROLE),
        &bundle(&ca),
        json!({"inbound": [{"name": "api", "port": port, "appPort": app_port,
                            "allow": [CLIENT_ROLE, "spiffe://rolemesh.test/ns/tools/sa/*"]}]}),
    );
    let setup = Inbound {
        dir,
        ca,
        proxy,
        port,
    };
    (setup, mounted)
}

/// `openssl s_client` presenting `leaf` to the setup's inbound port; with `verify_server` it
/// also checks the proxy's certificate against the setup's CA.
fn s_client_with(setup: &Inbound, name: &str, leaf: &Leaf, verify_server: bool) -> (bool, String) {
    let (cert, key, ca) = client_files(&setup.dir, name, leaf, &setup.ca.pem);
    let (cert, key, ca) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        ca.to_str().unwrap(),
    );
    let mut args = vec!["-cert", cert, "-key", key];
    if verify_server {
        args.extend(["-CAfile", ca, "-verify_return_error"]);
    }
    s_client(setup.port, &args)
}

fn good_client(setup: &Inbound) -> (bool, String) {
    s_client_with(setup, "good", &setup.ca.leaf("frontend", CLIENT_ROLE), true)
}

#[test]
fn openssl_s_client_with_a_good_certificate_reaches_the_app() {
    let setup = inbound(echo_app());
    let (ok, out) = good_client(&setup);
    assert!(ok, "{out}");
    assert!(out.contains(BANNER) && out.contains("ping"), "{out}");
    assert!(out.contains("TLSv1.3") || !out.contains("TLSv1.2"), "{out}");
    let metrics = setup.proxy.metrics();
    assert_eq!(
        metric_sum(
            &metrics,
            "rolemesh_proxy_connections_total",
            "mapping=\"api\""
        ),
        1,
        "{metrics}"
    );
    assert!(
        metric_sum(&metrics, "rolemesh_proxy_bytes_total", "mapping=\"api\"") > 0,
        "{metrics}"
    );
    assert!(
        metrics.contains("rolemesh_proxy_certificate_expiration_timestamp_seconds"),
        "{metrics}"
    );
}

#[test]
fn curl_with_client_certificate_gets_the_app_response() {
    let setup = inbound(http_app());
    let leaf = setup.ca.leaf("frontend", CLIENT_ROLE);
    let (cert, key, ca) = client_files(&setup.dir, "curl", &leaf, &setup.ca.pem);
    let run = |with_cert: bool| {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "--tlsv1.3", "--cacert"])
            .arg(&ca)
            .args([
                "--resolve",
                &format!("localhost:{}:127.0.0.1", setup.port),
                &format!("https://localhost:{}/", setup.port),
            ]);
        if with_cert {
            cmd.arg("--cert").arg(&cert).arg("--key").arg(&key);
        }
        cmd.output()
            .expect("curl is installed (dev/tools/install.sh)")
    };
    let good = run(true);
    let body = String::from_utf8_lossy(&good.stdout);
    assert!(
        good.status.success() && body.contains("hello over mtls"),
        "{body} {}",
        String::from_utf8_lossy(&good.stderr)
    );
    let bad = run(false);
    assert!(!bad.status.success());
    assert!(!String::from_utf8_lossy(&bad.stdout).contains("hello over mtls"));
    assert_eq!(setup.proxy.failures("no_client_certificate"), 1);
}

/// Runs a refused client, then checks: no app bytes, counted once under `reason`, logged once
/// with the reason, and a good peer is still served.
fn assert_refused(setup: &Inbound, out: &str, reason: &str) {
    assert!(
        !out.contains(BANNER),
        "app bytes reached a refused peer: {out}"
    );
    // The refusal is counted after the alert is written; allow the proxy a moment.
    let mut counted = 0;
    for _ in 0..50 {
        counted = setup.proxy.failures(reason);
        if counted > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(counted, 1, "{}", setup.proxy.metrics());
    let log = setup.proxy.log_text();
    assert_eq!(
        log.matches(&format!("\"reason\":\"{reason}\"")).count(),
        1,
        "{log}"
    );
    let (ok, out) = good_client(setup);
    assert!(
        ok && out.contains(BANNER),
        "good peer not served after refusal: {out}"
    );
}

fn refused_leaf(leaf: Leaf, reason: &str) {
    let setup = inbound(echo_app());
    let (ok, out) = s_client_with(&setup, "bad", &leaf, false);
    assert!(!ok || !out.contains(BANNER), "{out}");
    assert_refused(&setup, &out, reason);
}

/// A client leaf issued by a CA the proxy does not trust, for trust domain `ca_trust_domain`.
fn leaf_of_another_ca(ca_trust_domain: &str) -> Leaf {
    Ca::new(ca_trust_domain).leaf("frontend", CLIENT_ROLE)
}

/// Like [`refused_leaf`] but the bad leaf is signed by the proxy's own CA.
fn refused_from_our_ca(reason: &str, make: impl FnOnce(&Ca) -> Leaf) {
    let setup = inbound(echo_app());
    let leaf = make(&setup.ca);
    let (_, out) = s_client_with(&setup, "bad", &leaf, false);
    assert_refused(&setup, &out, reason);
}

#[test]
fn plaintext_is_refused() {
    let setup = inbound(echo_app());
    let mut stream = TcpStream::connect(("127.0.0.1", setup.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    assert_refused(&setup, &String::from_utf8_lossy(&got), "not_tls");
}

#[test]
fn garbage_is_refused() {
    let setup = inbound(echo_app());
    let mut stream = TcpStream::connect(("127.0.0.1", setup.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let _ = stream.write_all(&garbage);
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    assert_refused(&setup, &String::from_utf8_lossy(&got), "not_tls");
}

#[test]
fn no_client_certificate_is_refused() {
    let setup = inbound(echo_app());
    let (_, out) = s_client(setup.port, &[]);
    assert_refused(&setup, &out, "no_client_certificate");
}

#[test]
fn tls12_only_client_is_refused() {
    let setup = inbound(echo_app());
    let leaf = setup.ca.leaf("frontend", CLIENT_ROLE);
    let (cert, key, _) = client_files(&setup.dir, "tls12", &leaf, &setup.ca.pem);
    let (_, out) = s_client(
        setup.port,
        &[
            "-tls1_2",
            "-cert",
            cert.to_str().unwrap(),
            "-key",
            key.to_str().unwrap(),
        ],
    );
    assert_refused(&setup, &out, "protocol_version");
}

#[test]
fn expired_certificate_is_refused() {
    refused_from_our_ca("expired", |ca| {
        ca.leaf_with(TD, "frontend", CLIENT_ROLE, |p| {
            p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(2);
            p.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        })
    });
}

#[test]
fn not_yet_valid_certificate_is_refused() {
    refused_from_our_ca("not_yet_valid", |ca| {
        ca.leaf_with(TD, "frontend", CLIENT_ROLE, |p| {
            p.not_before = time::OffsetDateTime::now_utc() + time::Duration::days(1);
            p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(2);
        })
    });
}

#[test]
fn certificate_from_another_ca_is_refused() {
    refused_leaf(leaf_of_another_ca("other.test"), "unknown_issuer");
}

#[test]
fn certificate_from_an_impostor_ca_with_our_ca_name_is_refused() {
    // Same subject as the real CA, different key: found as issuer by name, fails the signature.
    refused_from_our_ca("bad_signature", |ca| {
        Ca::impostor_of(ca).leaf("frontend", CLIENT_ROLE)
    });
}

#[test]
fn leaf_that_is_a_ca_is_refused() {
    refused_from_our_ca("leaf_is_ca", |ca| {
        ca.leaf_with(TD, "frontend", CLIENT_ROLE, |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
            ];
        })
    });
}

#[test]
fn two_uri_sans_are_refused() {
    refused_from_our_ca("uri_san_count", |ca| {
        ca.leaf_with(TD, "frontend", CLIENT_ROLE, |p| {
            add_uri_san(p, "spiffe://rolemesh.test/ns/shop/sa/admin")
        })
    });
}

/// X509-SVID §4.3 and §5.2: a leaf whose key may sign certificates is no SVID, even with cA=false.
#[test]
fn a_leaf_that_may_sign_certificates_is_refused() {
    refused_from_our_ca("leaf_key_cert_sign", |ca| {
        ca.leaf_with(TD, "frontend", CLIENT_ROLE, |p| {
            p.key_usages.push(KeyUsagePurpose::KeyCertSign)
        })
    });
}

/// X509-SVID §4.3: every SVID has the key usage extension.
#[test]
fn a_leaf_without_key_usage_is_refused() {
    refused_from_our_ca("no_key_usage", |ca| {
        ca.leaf_with(TD, "frontend", CLIENT_ROLE, |p| p.key_usages.clear())
    });
}

/// SPIFFE-ID §2.2: no '.' or '..' path segments, whatever the role would admit.
#[test]
fn a_dot_segment_in_the_spiffe_id_is_refused() {
    refused_from_our_ca("bad_spiffe_id", |ca| {
        ca.leaf_with(TD, "frontend", CLIENT_ROLE, |p| {
            p.subject_alt_names
                .retain(|s| !matches!(s, rcgen::SanType::URI(_)));
            add_uri_san(p, "spiffe://rolemesh.test/ns/../sa/frontend");
        })
    });
}

#[test]
fn another_trust_domain_is_refused() {
    refused_from_our_ca("wrong_trust_domain", |ca| {
        ca.leaf_with("evil.test", "frontend", CLIENT_ROLE, |_| {})
    });
}

#[test]
fn role_not_on_the_allow_list_is_refused() {
    refused_from_our_ca("not_allowed", |ca| {
        ca.leaf("intruder", "arn:aws:iam::111122223333:role/intruder")
    });
}

#[test]
fn revoked_client_certificate_is_refused() {
    let mut revoked = None;
    let (setup, _) = inbound_with_bundle(echo_app(), |ca| {
        let leaf = ca.leaf("frontend", CLIENT_ROLE);
        let bundle = format!("{}{}", ca.pem, ca.crl(&[&leaf]));
        revoked = Some(leaf);
        bundle
    });
    // A chain, role and SPIFFE ID the mapping admits; only the CRL in the bundle stands in the way.
    let (_, out) = s_client_with(&setup, "revoked", &revoked.unwrap(), false);
    // ...and the good client of assert_refused is a sibling under the same CA and CRL.
    assert_refused(&setup, &out, "revoked");
}

/// `openssl s_client` presenting a leaf of intermediate `ca` with `ca` in its chain, checking the
/// proxy against `root_pem`.
fn s_client_under(
    dir: &std::path::Path,
    port: u16,
    name: &str,
    ca: &Ca,
    root_pem: &str,
) -> (bool, String) {
    let (cert, key, ca_file) = client_files(dir, name, &ca.leaf("frontend", CLIENT_ROLE), root_pem);
    // s_client sends only the first certificate of -cert; the intermediate goes separately.
    let intermediate = dir.join(format!("{name}-intermediate.crt"));
    std::fs::write(&intermediate, &ca.pem).unwrap();
    s_client(
        port,
        &[
            "-cert",
            cert.to_str().unwrap(),
            "-cert_chain",
            intermediate.to_str().unwrap(),
            "-key",
            key.to_str().unwrap(),
            "-CAfile",
            ca_file.to_str().unwrap(),
            "-verify_return_error",
        ],
    )
}

/// A user's offline root also signed another team's intermediate (here even with our
/// intermediate's name). A well-formed leaf for our trust domain and an admitted role, chained to
/// that root through the other intermediate, is refused; leaves of ours are served.
#[test]
fn a_sibling_intermediate_under_our_root_cannot_mint_our_identities() {
    let root = Ca::root_of_intermediates(TD);
    let ours = root.intermediate(TD);
    let sibling = root.intermediate(TD);
    let dir = temp_dir("in");
    let port = free_port();
    let bundle = format!("{}{}", ours.pem, root.pem);
    let (proxy, _) = Proxy::with_identity(
        &dir,
        &ours.leaf("payments", SERVER_ROLE),
        &bundle,
        json!({"inbound": [{"name": "api", "port": port, "appPort": echo_app(),
                            "allow": [CLIENT_ROLE]}]}),
    );
    let (_, out) = s_client_under(&dir, port, "sibling", &sibling, &root.pem);
    assert!(
        !out.contains(BANNER),
        "app bytes reached a sibling's leaf: {out}"
    );
    assert_eq!(
        proxy.failures("unpinned_issuer"),
        1,
        "{out}\n{}",
        proxy.log_text()
    );
    let (ok, out) = s_client_under(&dir, port, "ours", &ours, &root.pem);
    assert!(ok && out.contains(BANNER), "{out}\n{}", proxy.log_text());
}

/// The case `MTLSAuthority.spec.ca.crls` is for: the user's root revokes an intermediate it
/// retired; peers under it are refused, peers under the current intermediate are served.
#[test]
fn peer_under_an_intermediate_the_root_revoked_is_refused() {
    let root = Ca::root_of_intermediates(TD);
    let current = root.intermediate(TD);
    let retired = root.intermediate(TD);
    let dir = temp_dir("in");
    let port = free_port();
    // As the controller publishes it: the issuing intermediate, the root and the root's CRL.
    let bundle = format!(
        "{}{}{}",
        current.pem,
        root.pem,
        root.crl_of(vec![retired.serial()])
    );
    let (proxy, _) = Proxy::with_identity(
        &dir,
        &current.leaf("payments", SERVER_ROLE),
        &bundle,
        json!({"inbound": [{"name": "api", "port": port, "appPort": echo_app(),
                            "allow": [CLIENT_ROLE]}]}),
    );
    let connect = |name: &str, ca: &Ca| s_client_under(&dir, port, name, ca, &root.pem);
    let (_, out) = connect("retired", &retired);
    assert!(
        !out.contains(BANNER),
        "app bytes reached a revoked chain: {out}"
    );
    assert_eq!(proxy.failures("revoked"), 1, "{out}\n{}", proxy.log_text());
    let (ok, out) = connect("current", &current);
    assert!(ok && out.contains(BANNER), "{out}");
}

#[test]
fn crl_in_an_updated_bundle_refuses_the_next_handshakes_without_a_restart() {
    let (setup, mut mounted) = inbound_with_bundle(echo_app(), |ca| ca.pem.clone());
    let client = setup.ca.leaf("frontend", CLIENT_ROLE);
    let (ok, out) = s_client_with(&setup, "before", &client, false);
    assert!(ok && out.contains(BANNER), "{out}");
    let server = setup.ca.leaf("payments", SERVER_ROLE);
    let bundle = format!("{}{}", setup.ca.pem, setup.ca.crl(&[&client]));
    mounted.swap(
        server.chain_pem.as_bytes(),
        server.key_pem.as_bytes(),
        &bundle,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out) = s_client_with(&setup, "after", &client, false);
        if !out.contains(BANNER) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked client is still served: {}",
            setup.proxy.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        setup.proxy.failures("revoked"),
        1,
        "{}",
        setup.proxy.metrics()
    );
    let (ok, out) = good_client(&setup);
    assert!(ok && out.contains(BANNER), "good peer not served: {out}");
}

#[test]
fn spiffe_pattern_admits_a_matching_peer() {
    let setup = inbound(echo_app());
    let leaf = setup.ca.leaf_with(
        TD,
        "debugger",
        "arn:aws:iam::111122223333:role/tools",
        |p| {
            // The allow list admits spiffe://rolemesh.test/ns/tools/sa/*; this leaf's namespace is
            // "shop", so rewrite its URI SAN to the tools namespace.
            p.subject_alt_names
                .retain(|s| !matches!(s, rcgen::SanType::URI(_)));
            add_uri_san(p, "spiffe://rolemesh.test/ns/tools/sa/debugger");
        },
    );
    let (cert, key, _) = client_files(&setup.dir, "tools", &leaf, &setup.ca.pem);
    let (ok, out) = s_client(
        setup.port,
        &[
            "-cert",
            cert.to_str().unwrap(),
            "-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(ok && out.contains(BANNER), "{out}");
}

/// Outbound: a plain local listener dialling `openssl s_server` over mTLS.
fn outbound_to_s_server(server_role: &str) -> (Proxy, u16, String, std::process::Child) {
    outbound_to_s_server_with(server_role, false)
}

/// Like [`outbound_to_s_server`]; with `revoke_server` the proxy's bundle carries a CRL that
/// revokes the server's certificate.
fn outbound_to_s_server_with(
    server_role: &str,
    revoke_server: bool,
) -> (Proxy, u16, String, std::process::Child) {
    let dir = temp_dir("out");
    let ca = Ca::new(TD);
    let server_leaf = ca.leaf("payments", server_role);
    let bundle = if revoke_server {
        format!("{}{}", ca.pem, ca.crl(&[&server_leaf]))
    } else {
        ca.pem.clone()
    };
    let (cert, key, ca_file) = client_files(&dir, "server", &server_leaf, &ca.pem);
    let upstream_port = free_port();
    let server = Command::new("openssl")
        .args(["s_server", "-quiet", "-rev", "-tls1_3", "-accept"])
        .arg(upstream_port.to_string())
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .arg("-CAfile")
        .arg(&ca_file)
        .args(["-Verify", "1", "-verify_return_error"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", upstream_port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let local = free_port();
    let (proxy, _) = Proxy::with_identity(
        &dir,
        &ca.leaf("frontend", CLIENT_ROLE),
        &bundle,
        json!({"outbound": [{"name": "payments", "localPort": local,
                             "upstream": format!("127.0.0.1:{upstream_port}"),
                             "expect": [SERVER_ROLE]}]}),
    );
    (proxy, local, ca.pem, server)
}

fn talk_plain(port: u16, line: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    stream.write_all(line.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if got.ends_with(b"\n") {
            break;
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn outbound_reaches_openssl_s_server_with_the_expected_identity() {
    let (proxy, local, _, mut server) = outbound_to_s_server(SERVER_ROLE);
    let got = talk_plain(local, "olleh\n");
    let _ = server.kill();
    let _ = server.wait();
    // s_server -rev answers each line reversed.
    assert!(got.contains("hello"), "got {got:?}; {}", proxy.log_text());
}

/// The outbound proxy dials `openssl s_server` and refuses it for `reason`: no bytes reach the
/// local client, the refusal is counted once and logged once.
fn assert_upstream_refused(server_role: &str, revoke_server: bool, reason: &str) {
    let (proxy, local, _, mut server) = outbound_to_s_server_with(server_role, revoke_server);
    let got = talk_plain(local, "olleh\n");
    let _ = server.kill();
    let _ = server.wait();
    assert!(got.is_empty(), "got {got:?}");
    assert_eq!(proxy.failures(reason), 1, "{}", proxy.metrics());
    let log = proxy.log_text();
    let logged = format!("\"reason\":\"{reason}\"");
    assert_eq!(log.matches(&logged).count(), 1, "{log}");
}

#[test]
fn upstream_with_the_wrong_identity_is_refused() {
    assert_upstream_refused(
        "arn:aws:iam::111122223333:role/impostor",
        false,
        "not_allowed",
    );
}

#[test]
fn upstream_with_a_revoked_certificate_is_refused() {
    assert_upstream_refused(SERVER_ROLE, true, "revoked");
}

#[test]
fn bad_config_exits_non_zero_with_a_clear_error() {
    let dir = temp_dir("badcfg");
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        r#"{"trustDomain": "rolemesh.test", "inbound": [{"name": "x"}]}"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rolemesh-proxy"))
        .arg("--config-file")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid configuration"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_rolemesh-proxy"))
        .env_remove("ROLEMESH_PROXY_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no configuration"));
}

#[test]
fn sigterm_stops_the_proxy_cleanly() {
    let mut setup = inbound(echo_app());
    let status = setup.proxy.terminate();
    assert!(status.success(), "{status:?}: {}", setup.proxy.log_text());
    assert!(setup.proxy.log_text().contains("drained"));
}
