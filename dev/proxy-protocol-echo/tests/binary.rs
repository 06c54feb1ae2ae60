//! The binary as the node test runs it: a header built with ppp and some bytes in, one caller
//! line on stdout and the bytes back.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ppp::v2::{
    Builder, Command as PpCommand, Protocol, Type, TypeLengthValue, Version, WriteToHeader, Writer,
};

#[test]
fn prints_the_caller_and_echoes_what_follows_the_header() {
    let port = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_proxy-protocol-echo"))
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(error) => panic!("{error}"),
        }
    };
    let mut ssl = Writer::default();
    0x07u8.write_to(&mut ssl).unwrap();
    0u32.write_to(&mut ssl).unwrap();
    TypeLengthValue::new(Type::SSLVersion, b"TLSv1.3")
        .write_to(&mut ssl)
        .unwrap();
    let source: SocketAddr = "10.0.0.1:40000".parse().unwrap();
    let destination: SocketAddr = "10.0.0.2:8443".parse().unwrap();
    let header = Builder::with_addresses(
        Version::Two | PpCommand::Proxy,
        Protocol::Stream,
        (source, destination),
    )
    .write_tlv(Type::SSL, &ssl.finish())
    .unwrap()
    .write_tlv(0xE0u8, b"spiffe://rolemesh.test/ns/shop/sa/frontend")
    .unwrap()
    .write_tlv(0xE1u8, b"arn:aws:iam::111122223333:role/frontend")
    .unwrap()
    .build()
    .unwrap();
    // Header and data in one write: the app must not eat data bytes with the header.
    stream
        .write_all(&[header.as_slice(), b"ping\n"].concat())
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut echoed = [0u8; 5];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"ping\n");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        line.trim_end(),
        "caller source=10.0.0.1:40000 spiffe_id=spiffe://rolemesh.test/ns/shop/sa/frontend \
         role_arn=arn:aws:iam::111122223333:role/frontend tls_version=TLSv1.3 client_cert=yes"
    );
}
