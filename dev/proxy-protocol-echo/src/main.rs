//! A test app for rolemesh's `callerIdentity: proxyProtocolV2`: listens on `args[1]` (default
//! `0.0.0.0:8080`), and for each connection parses the PROXY protocol v2 header with ppp, prints
//! one line to stdout
//!
//! `caller source=<addr> spiffe_id=<..> role_arn=<..> tls_version=<..> client_cert=yes|no`
//!
//! and echoes the rest of the stream back. A connection without a valid header is reported on
//! stderr and closed. One thread per connection: it serves a test, not traffic.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
};

use ppp::v2::{Addresses, Header, ParseError, Type, TypeLengthValues};

/// rolemesh's custom TLVs (PP2_TYPE_MIN_CUSTOM range).
const PP2_TYPE_SPIFFE_ID: u8 = 0xE0;
const PP2_TYPE_ROLE_ARN: u8 = 0xE1;
/// PP2_CLIENT_CERT_CONN: the client presented a certificate on this connection.
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
/// Bytes of the PP2_TYPE_SSL value before its sub-TLVs: client (1) and verify (4).
const SSL_FIXED_LEN: usize = 5;
/// Bytes of a PROXY v2 header before its addresses and TLVs.
const MINIMUM_LENGTH: usize = 16;

fn main() {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "0.0.0.0:8080".to_string());
    let listener = match TcpListener::bind(&address) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("proxy-protocol-echo: cannot listen on {address}: {error}");
            std::process::exit(1);
        }
    };
    eprintln!("proxy-protocol-echo: listening on {address}");
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                std::thread::spawn(move || {
                    if let Err(error) = serve(stream) {
                        eprintln!("proxy-protocol-echo: {error}");
                    }
                });
            }
            Err(error) => eprintln!("proxy-protocol-echo: accept failed: {error}"),
        }
    }
}

fn serve(mut stream: TcpStream) -> io::Result<()> {
    let bytes = read_header(&mut stream)?;
    let header = Header::try_from(bytes.as_slice()).map_err(invalid)?;
    println!("{}", describe(&header));
    // The line is the test's evidence; a buffered stdout (not a terminal) would hold it back.
    io::stdout().flush()?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

/// Reads exactly one PROXY v2 header off `stream`, letting ppp say how many bytes it lacks, so
/// that not a byte of the stream after it is consumed.
fn read_header(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    loop {
        let more = match Header::try_from(bytes.as_slice()) {
            Ok(header) => return Ok(header.as_bytes().to_vec()),
            Err(ParseError::Incomplete(has)) => MINIMUM_LENGTH - has,
            Err(ParseError::Partial(has, needs)) => needs - has,
            Err(error) => return Err(invalid(error)),
        };
        let start = bytes.len();
        bytes.resize(start + more, 0);
        stream.read_exact(&mut bytes[start..])?;
    }
}

fn invalid(error: ParseError) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("no PROXY v2 header: {error}"),
    )
}

/// The line printed for one connection; `-` for what the header does not carry.
fn describe(header: &Header<'_>) -> String {
    let source = match header.addresses {
        Addresses::IPv4(a) => SocketAddr::from((a.source_address, a.source_port)).to_string(),
        Addresses::IPv6(a) => SocketAddr::from((a.source_address, a.source_port)).to_string(),
        Addresses::Unix(_) | Addresses::Unspecified => "-".to_string(),
    };
    let (mut spiffe_id, mut role_arn, mut tls_version) = ("-".into(), "-".into(), "-".into());
    let mut client_cert = false;
    for tlv in header.tlvs().flatten() {
        let text = || String::from_utf8_lossy(&tlv.value).into_owned();
        match tlv.kind {
            PP2_TYPE_SPIFFE_ID => spiffe_id = text(),
            PP2_TYPE_ROLE_ARN => role_arn = text(),
            kind if kind == u8::from(Type::SSL) && tlv.value.len() >= SSL_FIXED_LEN => {
                client_cert = tlv.value[0] & PP2_CLIENT_CERT_CONN != 0;
                for sub in TypeLengthValues::from(&tlv.value[SSL_FIXED_LEN..]).flatten() {
                    if sub.kind == u8::from(Type::SSLVersion) {
                        tls_version = String::from_utf8_lossy(&sub.value).into_owned();
                    }
                }
            }
            _ => {}
        }
    }
    format!(
        "caller source={source} spiffe_id={spiffe_id} role_arn={role_arn} tls_version={tls_version} client_cert={}",
        if client_cert { "yes" } else { "no" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{Builder, Command, Protocol, TypeLengthValue, Version, WriteToHeader, Writer};

    #[test]
    fn a_header_is_described_in_one_line() {
        let mut ssl = Writer::default();
        0x07u8.write_to(&mut ssl).unwrap();
        0u32.write_to(&mut ssl).unwrap();
        TypeLengthValue::new(Type::SSLVersion, b"TLSv1.3")
            .write_to(&mut ssl)
            .unwrap();
        let source: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let destination: SocketAddr = "10.0.0.2:8443".parse().unwrap();
        let bytes = Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Stream,
            (source, destination),
        )
        .write_tlv(Type::SSL, &ssl.finish())
        .unwrap()
        .write_tlv(PP2_TYPE_SPIFFE_ID, b"spiffe://t/ns/a/sa/b")
        .unwrap()
        .write_tlv(PP2_TYPE_ROLE_ARN, b"arn:aws:iam::111122223333:role/b")
        .unwrap()
        .build()
        .unwrap();
        let header = Header::try_from(bytes.as_slice()).unwrap();
        assert_eq!(
            describe(&header),
            "caller source=10.0.0.1:40000 spiffe_id=spiffe://t/ns/a/sa/b \
             role_arn=arn:aws:iam::111122223333:role/b tls_version=TLSv1.3 client_cert=yes"
        );
    }
}
