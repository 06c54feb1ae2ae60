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

/// A trust bundle as the controller publishes it and the proxy reads it: the CA certificates in
/// force and, when there are any, certificate revocation lists, each as DER.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    pub certificates: Vec<Vec<u8>>,
    pub crls: Vec<Vec<u8>>,
}

/// Splits a PEM trust bundle into its `CERTIFICATE` and `X509 CRL` blocks. Any other block is
/// refused rather than skipped: a bundle decides whom to trust, and a block nobody reads (a CRL
/// under another label, say) must not look as if it were in force.
pub fn trust_bundle_from_pem(pem: &str) -> Result<TrustBundle, ProfileError> {
    let mut bundle = TrustBundle::default();
    for (label, contents) in pem_blocks(pem, &["CERTIFICATE", "X509 CRL"])? {
        match label.as_str() {
            "CERTIFICATE" => bundle.certificates.push(contents),
            _ => bundle.crls.push(contents),
        }
    }
    if bundle.certificates.is_empty() {
        return Err(ProfileError::ParseTrustBundle(
            "no CERTIFICATE block; a trust bundle needs at least one CA certificate".into(),
        ));
    }
    Ok(bundle)
}

/// The DER of each `X509 CRL` block in `pem`, which may hold nothing else (and not nothing).
pub fn crls_from_pem(pem: &str) -> Result<Vec<Vec<u8>>, ProfileError> {
    let crls: Vec<Vec<u8>> = pem_blocks(pem, &["X509 CRL"])?
        .into_iter()
        .map(|(_, contents)| contents)
        .collect();
    if crls.is_empty() {
        return Err(ProfileError::ParseTrustBundle("no X509 CRL block".into()));
    }
    Ok(crls)
}

fn pem_blocks(pem: &str, allowed: &[&str]) -> Result<Vec<(String, Vec<u8>)>, ProfileError> {
    let mut blocks = Vec::new();
    for block in Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| ProfileError::ParseTrustBundle(format!("bad PEM: {e}")))?;
        if !allowed.contains(&block.label.as_str()) {
            return Err(ProfileError::ParseTrustBundle(format!(
                "unexpected PEM block {:?}; expected only {}",
                block.label,
                allowed.join(" and ")
            )));
        }
        blocks.push((block.label, block.contents));
    }
    Ok(blocks)
}

/// Lowercase hex SHA-256 of DER bytes, as certificate fingerprints are shown.
pub fn sha256_hex(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{DEFAULT_CA_DURATION, ca_params, crl_params, generate_workload_key};
    use rcgen::Issuer;
    use time::OffsetDateTime;

    fn ca_and_crl() -> (String, String) {
        let now = OffsetDateTime::now_utc();
        let key = generate_workload_key().unwrap();
        let params = ca_params("rolemesh.local", DEFAULT_CA_DURATION, now);
        let ca_pem = params.self_signed(&key).unwrap().pem();
        let crl = crl_params(Vec::new(), 1, now, std::time::Duration::from_secs(86400))
            .signed_by(&Issuer::from_params(&params, &key))
            .unwrap();
        (ca_pem, crl.pem().unwrap())
    }

    #[test]
    fn trust_bundle_splits_certificates_and_crls() {
        let (ca_pem, crl_pem) = ca_and_crl();
        let bundle = trust_bundle_from_pem(&format!("{ca_pem}{crl_pem}{ca_pem}")).unwrap();
        assert_eq!(bundle.certificates.len(), 2);
        assert_eq!(bundle.crls.len(), 1);
        assert!(trust_bundle_from_pem(&ca_pem).unwrap().crls.is_empty());
    }

    #[test]
    fn trust_bundle_refuses_what_it_would_otherwise_ignore() {
        let (ca_pem, crl_pem) = ca_and_crl();
        let key_pem = generate_workload_key().unwrap().serialize_pem();
        let error = trust_bundle_from_pem(&format!("{ca_pem}{key_pem}"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"PRIVATE KEY\""), "{error}");
        let error = trust_bundle_from_pem(&crl_pem).unwrap_err().to_string();
        assert!(error.contains("no CERTIFICATE block"), "{error}");
    }

    #[test]
    fn crls_alone_are_taken_and_anything_else_is_refused() {
        let (ca_pem, crl_pem) = ca_and_crl();
        assert_eq!(
            crls_from_pem(&format!("{crl_pem}{crl_pem}")).unwrap().len(),
            2
        );
        let error = crls_from_pem(&format!("{crl_pem}{ca_pem}"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("unexpected PEM block \"CERTIFICATE\""),
            "{error}"
        );
        assert!(crls_from_pem("").is_err());
    }
}
