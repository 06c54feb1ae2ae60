//! Reading certificates back: what the controller checks in a Secret it finds, what the CLI shows,
//! and what the proxy needs from a peer certificate after rustls-webpki has validated its chain.
//! Parsing is x509-parser's; this module only decides what the parsed fields mean.

use time::OffsetDateTime;
use x509_parser::{
    extensions::GeneralName,
    pem::Pem,
    prelude::{FromDer, X509Certificate},
};

use crate::{ProfileError, ROLE_ARN_OID_DOTTED, SpiffeId, WorkloadIdentity, validate_role_arn};

/// What a certificate says, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    pub uri_sans: Vec<String>,
    pub dns_names: Vec<String>,
    /// The role extension's value, when present and a well-formed UTF8String.
    pub role_arn: Option<String>,
    /// True when the role extension is present but malformed or critical.
    pub role_extension_malformed: bool,
    pub serial: Vec<u8>,
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub is_ca: bool,
    pub eku_server_auth: bool,
    pub eku_client_auth: bool,
    pub key_usage_digital_signature: bool,
    pub key_usage_critical: bool,
    /// DER SubjectPublicKeyInfo.
    pub public_key_der: Vec<u8>,
    pub subject: String,
    pub issuer: String,
}

impl CertificateInfo {
    /// The workload identity, if the certificate follows rolemesh's leaf profile: exactly one URI
    /// SAN that is a rolemesh SPIFFE ID, a well-formed role extension, not a CA, and both
    /// serverAuth and clientAuth.
    pub fn workload_identity(&self) -> Result<WorkloadIdentity, ProfileError> {
        let not = |why: &str| ProfileError::NotInProfile(why.to_string());
        if self.is_ca {
            return Err(not("certificate is a CA, not a workload certificate"));
        }
        let [uri] = self.uri_sans.as_slice() else {
            return Err(not(&format!(
                "expected exactly one URI SAN, found {}",
                self.uri_sans.len()
            )));
        };
        let spiffe_id = SpiffeId::parse(uri)?;
        if self.role_extension_malformed {
            return Err(not(
                "the IAM role extension is malformed or marked critical",
            ));
        }
        let role = self
            .role_arn
            .as_deref()
            .ok_or_else(|| not("the IAM role extension is missing"))?;
        validate_role_arn(role)?;
        if !(self.eku_server_auth && self.eku_client_auth) {
            return Err(not(
                "extended key usage must include serverAuth and clientAuth",
            ));
        }
        Ok(WorkloadIdentity {
            spiffe_id,
            role_arn: role.to_string(),
        })
    }

    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// Whether `spki_der` (a private key's public half) is this certificate's key.
    pub fn public_key_matches(&self, spki_der: &[u8]) -> bool {
        self.public_key_der == spki_der
    }
}

/// Parses one DER certificate.
pub fn inspect_certificate(der: &[u8]) -> Result<CertificateInfo, ProfileError> {
    let parse_err = |e: String| ProfileError::ParseCertificate(e);
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| parse_err(e.to_string()))?;
    if !rest.is_empty() {
        return Err(parse_err("trailing bytes after the certificate".into()));
    }
    let mut uri_sans = Vec::new();
    let mut dns_names = Vec::new();
    if let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| parse_err(e.to_string()))?
    {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => uri_sans.push(uri.to_string()),
                GeneralName::DNSName(dns) => dns_names.push(dns.to_string()),
                _ => {}
            }
        }
    }
    let (eku_server_auth, eku_client_auth) = match cert
        .extended_key_usage()
        .map_err(|e| parse_err(e.to_string()))?
    {
        Some(eku) => (eku.value.server_auth, eku.value.client_auth),
        None => (false, false),
    };
    let (key_usage_digital_signature, key_usage_critical) =
        match cert.key_usage().map_err(|e| parse_err(e.to_string()))? {
            Some(ku) => (ku.value.digital_signature(), ku.critical),
            None => (false, false),
        };
    let mut role_arn = None;
    let mut role_extension_malformed = false;
    for extension in cert.extensions() {
        if extension.oid.to_id_string() != ROLE_ARN_OID_DOTTED {
            continue;
        }
        if role_arn.is_some() || extension.critical {
            role_extension_malformed = true;
        }
        match yasna::parse_der(extension.value, |reader| reader.read_utf8string()) {
            Ok(value) => role_arn = Some(value),
            Err(_) => role_extension_malformed = true,
        }
    }
    let serial = cert.raw_serial().to_vec();
    let validity = cert.validity();
    Ok(CertificateInfo {
        uri_sans,
        dns_names,
        role_arn,
        role_extension_malformed,
        serial_hex: hex::encode(&serial),
        serial,
        not_before: validity.not_before.to_datetime(),
        not_after: validity.not_after.to_datetime(),
        is_ca: cert.is_ca(),
        eku_server_auth,
        eku_client_auth,
        key_usage_digital_signature,
        key_usage_critical,
        public_key_der: cert.public_key().raw.to_vec(),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
    })
}

/// The DER contents of every `CERTIFICATE` block in a PEM bundle, in order.
pub fn certificates_from_pem(pem: &str) -> Result<Vec<Vec<u8>>, ProfileError> {
    let mut out = Vec::new();
    for block in Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| ProfileError::ParseCertificate(format!("bad PEM: {e}")))?;
        if block.label == "CERTIFICATE" {
            out.push(block.contents);
        }
    }
    if out.is_empty() {
        return Err(ProfileError::ParseCertificate(
            "no CERTIFICATE block in PEM".into(),
        ));
    }
    Ok(out)
}

/// Lowercase hex SHA-256 of DER bytes, as certificate fingerprints are shown.
pub fn sha256_hex(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}
