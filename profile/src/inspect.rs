//! Reading certificates back: what the controller checks in a Secret it finds, what the CLI shows,
//! and what the proxy needs from a peer certificate after rustls-webpki has validated its chain.
//! Parsing is x509-parser's; this module only decides what the parsed fields mean.

use time::OffsetDateTime;
use x509_parser::{
    extensions::GeneralName,
    pem::Pem,
    prelude::{FromDer, X509Certificate},
};

use crate::{
    ProfileError, ROLE_ARN_OID_DOTTED, SpiffeId, WorkloadIdentity, spiffe::split_spiffe_id,
    validate_role_arn,
};

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
    /// Whether the certificate has a basicConstraints extension at all (`is_ca` is its cA).
    pub basic_constraints_present: bool,
    pub key_usage_present: bool,
    pub key_usage_digital_signature: bool,
    pub key_usage_key_cert_sign: bool,
    pub key_usage_crl_sign: bool,
    pub key_usage_critical: bool,
    pub extended_key_usage_present: bool,
    /// Whether the subject is an empty name (rolemesh leaves have none: the SAN is the name).
    pub subject_empty: bool,
    pub subject_alt_name_critical: bool,
    /// DER SubjectPublicKeyInfo.
    pub public_key_der: Vec<u8>,
    pub subject: String,
    pub issuer: String,
}

/// A rule of the X509-SVID specification for leaf certificates, as [`CertificateInfo::check_svid_leaf`]
/// checks them; [`ProfileError::NotAnSvid`] names the one a certificate broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SvidRule {
    OneUriSan,
    SpiffeId,
    SanCriticalWithoutSubject,
    BasicConstraints,
    NotCa,
    KeyUsagePresent,
    KeyUsageCritical,
    DigitalSignature,
    NoKeyCertSign,
    NoCrlSign,
    ExtendedKeyUsage,
}

impl SvidRule {
    pub const ALL: &[SvidRule] = &[
        Self::OneUriSan,
        Self::SpiffeId,
        Self::SanCriticalWithoutSubject,
        Self::BasicConstraints,
        Self::NotCa,
        Self::KeyUsagePresent,
        Self::KeyUsageCritical,
        Self::DigitalSignature,
        Self::NoKeyCertSign,
        Self::NoCrlSign,
        Self::ExtendedKeyUsage,
    ];

    /// A short name, the `reason` label of the proxy's handshake failure metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OneUriSan => "uri_san_count",
            Self::SpiffeId => "bad_spiffe_id",
            Self::SanCriticalWithoutSubject => "san_not_critical",
            Self::BasicConstraints => "no_basic_constraints",
            Self::NotCa => "leaf_is_ca",
            Self::KeyUsagePresent => "no_key_usage",
            Self::KeyUsageCritical => "key_usage_not_critical",
            Self::DigitalSignature => "no_digital_signature",
            Self::NoKeyCertSign => "leaf_key_cert_sign",
            Self::NoCrlSign => "leaf_crl_sign",
            Self::ExtendedKeyUsage => "eku_not_tls",
        }
    }

    /// What the rule asks, and where the X509-SVID specification says so.
    pub fn requirement(self) -> &'static str {
        match self {
            Self::OneUriSan => "a leaf must have exactly one URI SAN (X509-SVID §2, §5.2)",
            Self::SpiffeId => {
                "the URI SAN must be a SPIFFE ID with a non-root path (X509-SVID §2, §3.1, §5.2; SPIFFE-ID §2)"
            }
            Self::SanCriticalWithoutSubject => {
                "a leaf without a subject must mark subjectAltName critical (X509-SVID §3.1)"
            }
            Self::BasicConstraints => {
                "a leaf must set basicConstraints with cA=false (X509-SVID §4.1)"
            }
            Self::NotCa => "a leaf must have cA=false (X509-SVID §4.1, §5.2)",
            Self::KeyUsagePresent => "an SVID must have the keyUsage extension (X509-SVID §4.3)",
            Self::KeyUsageCritical => "keyUsage must be marked critical (X509-SVID §4.3)",
            Self::DigitalSignature => "a leaf must set digitalSignature (X509-SVID §4.3)",
            Self::NoKeyCertSign => "a leaf must not set keyCertSign (X509-SVID §4.3, §5.2)",
            Self::NoCrlSign => "a leaf must not set cRLSign (X509-SVID §4.3, §5.2)",
            Self::ExtendedKeyUsage => {
                "extendedKeyUsage, when present, must include serverAuth and clientAuth (X509-SVID §4.4)"
            }
        }
    }
}

impl std::fmt::Display for SvidRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.requirement())
    }
}

impl CertificateInfo {
    /// Whether the certificate is an X509-SVID leaf: every MUST of the X509-SVID specification
    /// for leaves (<https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md>), one
    /// check per rule, in the order of the specification. The chain and validity are not looked
    /// at here ([`crate::verify`] does that).
    pub fn check_svid_leaf(&self) -> Result<(), ProfileError> {
        let broken = |rule, detail: String| Err(ProfileError::NotAnSvid { rule, detail });
        // §2, §5.2: exactly one URI SAN; validators must reject more than one.
        let [uri] = self.uri_sans.as_slice() else {
            return broken(
                SvidRule::OneUriSan,
                format!("found {}: {:?}", self.uri_sans.len(), self.uri_sans),
            );
        };
        // §2 (by SPIFFE-ID §2 to §2.3), §3.1 and §5.2: that URI is a SPIFFE ID with the spiffe
        // scheme and a non-root path.
        if let Err(reason) = split_spiffe_id(uri) {
            return broken(SvidRule::SpiffeId, format!("{uri:?}: {reason}"));
        }
        // §3.1: without a subject, the SAN extension must be critical (RFC 5280 §4.1.2.6).
        if self.subject_empty && !self.subject_alt_name_critical {
            return broken(
                SvidRule::SanCriticalWithoutSubject,
                "the subject is empty and the subjectAltName extension is not critical".into(),
            );
        }
        // §4.1: a leaf sets cA to false, which takes a basicConstraints extension to say.
        if !self.basic_constraints_present {
            return broken(
                SvidRule::BasicConstraints,
                "the certificate has no basicConstraints extension".into(),
            );
        }
        // §4.1, §5.2: cA is false.
        if self.is_ca {
            return broken(SvidRule::NotCa, "basicConstraints has cA=TRUE".into());
        }
        // §4.3: the key usage extension is set on every SVID...
        if !self.key_usage_present {
            return broken(
                SvidRule::KeyUsagePresent,
                "the certificate has no keyUsage extension".into(),
            );
        }
        // §4.3: ...and marked critical.
        if !self.key_usage_critical {
            return broken(
                SvidRule::KeyUsageCritical,
                "the keyUsage extension is not critical".into(),
            );
        }
        // §4.3: a leaf sets digitalSignature.
        if !self.key_usage_digital_signature {
            return broken(
                SvidRule::DigitalSignature,
                "keyUsage lacks digitalSignature".into(),
            );
        }
        // §4.3, §5.2: a leaf sets neither keyCertSign...
        if self.key_usage_key_cert_sign {
            return broken(SvidRule::NoKeyCertSign, "keyUsage has keyCertSign".into());
        }
        // ...nor cRLSign.
        if self.key_usage_crl_sign {
            return broken(SvidRule::NoCrlSign, "keyUsage has cRLSign".into());
        }
        // §4.4: when a leaf has extended key usage, it includes serverAuth and clientAuth.
        if self.extended_key_usage_present && !(self.eku_server_auth && self.eku_client_auth) {
            return broken(
                SvidRule::ExtendedKeyUsage,
                format!(
                    "extendedKeyUsage has serverAuth={} clientAuth={}",
                    self.eku_server_auth, self.eku_client_auth
                ),
            );
        }
        Ok(())
    }

    /// The workload identity, if the certificate is an X509-SVID leaf ([`Self::check_svid_leaf`])
    /// that also follows rolemesh's profile: its SPIFFE ID is a rolemesh workload's, it has a
    /// well-formed role extension, and extended key usage (which X509-SVID §4.4 only recommends)
    /// is present.
    pub fn workload_identity(&self) -> Result<WorkloadIdentity, ProfileError> {
        self.check_svid_leaf()?;
        let not = |why: &str| ProfileError::NotInProfile(why.to_string());
        let [uri] = self.uri_sans.as_slice() else {
            return Err(not("expected exactly one URI SAN"));
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
        if !self.extended_key_usage_present {
            return Err(not(
                "extended key usage must be present, with serverAuth and clientAuth",
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
    let san = cert
        .subject_alternative_name()
        .map_err(|e| parse_err(e.to_string()))?;
    let subject_alt_name_critical = san.as_ref().is_some_and(|san| san.critical);
    let mut uri_sans = Vec::new();
    let mut dns_names = Vec::new();
    if let Some(san) = &san {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => uri_sans.push(uri.to_string()),
                GeneralName::DNSName(dns) => dns_names.push(dns.to_string()),
                _ => {}
            }
        }
    }
    let eku = cert
        .extended_key_usage()
        .map_err(|e| parse_err(e.to_string()))?;
    let (eku_server_auth, eku_client_auth) = match &eku {
        Some(eku) => (eku.value.server_auth, eku.value.client_auth),
        None => (false, false),
    };
    let key_usage = cert.key_usage().map_err(|e| parse_err(e.to_string()))?;
    let basic_constraints = cert
        .basic_constraints()
        .map_err(|e| parse_err(e.to_string()))?;
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
        is_ca: basic_constraints.as_ref().is_some_and(|bc| bc.value.ca),
        basic_constraints_present: basic_constraints.is_some(),
        eku_server_auth,
        eku_client_auth,
        extended_key_usage_present: eku.is_some(),
        key_usage_present: key_usage.is_some(),
        key_usage_digital_signature: key_usage
            .as_ref()
            .is_some_and(|ku| ku.value.digital_signature()),
        key_usage_key_cert_sign: key_usage
            .as_ref()
            .is_some_and(|ku| ku.value.key_cert_sign()),
        key_usage_crl_sign: key_usage.as_ref().is_some_and(|ku| ku.value.crl_sign()),
        key_usage_critical: key_usage.as_ref().is_some_and(|ku| ku.critical),
        subject_empty: cert.subject().iter().next().is_none(),
        subject_alt_name_critical,
        public_key_der: cert.public_key().raw.to_vec(),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
    })
}

/// What a certificate revocation list says, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrlInfo {
    /// The issuer's name, as [`CertificateInfo::subject`] writes the CA's.
    pub issuer: String,
    /// The serials it revokes, lowercase hex as [`CertificateInfo::serial_hex`] writes them.
    pub serials: Vec<String>,
    pub this_update: OffsetDateTime,
    pub next_update: Option<OffsetDateTime>,
}

/// Parses a DER CRL (x509-parser; its signature is not checked here).
pub fn inspect_crl(der: &[u8]) -> Result<CrlInfo, ProfileError> {
    use x509_parser::revocation_list::CertificateRevocationList;
    let parse_err = |e: String| ProfileError::ParseTrustBundle(format!("CRL: {e}"));
    let (rest, crl) =
        CertificateRevocationList::from_der(der).map_err(|e| parse_err(e.to_string()))?;
    if !rest.is_empty() {
        return Err(parse_err("trailing bytes after the CRL".into()));
    }
    Ok(CrlInfo {
        issuer: crl.issuer().to_string(),
        serials: crl
            .iter_revoked_certificates()
            .map(|revoked| hex::encode(revoked.raw_serial()))
            .collect(),
        this_update: crl.last_update().to_datetime(),
        next_update: crl.next_update().map(|t| t.to_datetime()),
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
    use rcgen::{
        BasicConstraints, CustomExtension, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose,
        SanType,
    };
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

    /// A workload leaf from the issuance profile with `tweak` applied, signed by a profile CA,
    /// and parsed.
    fn leaf_info(tweak: impl FnOnce(&mut rcgen::CertificateParams)) -> CertificateInfo {
        let now = OffsetDateTime::now_utc();
        let ca_key = generate_workload_key().unwrap();
        let ca = ca_params("rolemesh.test", DEFAULT_CA_DURATION, now);
        let identity = WorkloadIdentity::new(
            SpiffeId::new("rolemesh.test", "shop", "payments").unwrap(),
            "arn:aws:iam::111122223333:role/payments",
        )
        .unwrap();
        let mut params = crate::CertificateProfile::default()
            .leaf_params(&identity, &["payments.shop.svc".to_string()], now)
            .unwrap();
        tweak(&mut params);
        let cert = params
            .signed_by(
                &generate_workload_key().unwrap(),
                &Issuer::from_params(&ca, &ca_key),
            )
            .unwrap();
        inspect_certificate(cert.der()).unwrap()
    }

    fn set_uri(params: &mut rcgen::CertificateParams, uri: &str) {
        params
            .subject_alt_names
            .retain(|san| !matches!(san, SanType::URI(_)));
        params
            .subject_alt_names
            .push(SanType::URI(uri.to_string().try_into().unwrap()));
    }

    /// An extension rcgen would only write critical, written non-critical by hand.
    fn non_critical(oid: &[u64], content: Vec<u8>) -> CustomExtension {
        let mut extension = CustomExtension::from_oid_content(oid, content);
        extension.set_criticality(false);
        extension
    }

    #[test]
    fn the_issuance_profile_makes_svid_leaves() {
        let info = leaf_info(|_| {});
        info.check_svid_leaf().unwrap();
        info.workload_identity().unwrap();
        // §3.1 holds because the subject is empty and rcgen then marks the SAN critical.
        assert!(info.subject_empty && info.subject_alt_name_critical);
        assert!(info.basic_constraints_present && !info.is_ca);
    }

    /// Each rule of the X509-SVID leaf profile, broken alone by a certificate that is otherwise
    /// the issuance profile's, is refused for that rule.
    #[test]
    fn each_x509_svid_leaf_rule_is_checked_on_its_own() {
        type Tweak = Box<dyn FnOnce(&mut rcgen::CertificateParams)>;
        fn tweak(f: impl FnOnce(&mut rcgen::CertificateParams) + 'static) -> Tweak {
            Box::new(f)
        }
        let cases: Vec<(SvidRule, Tweak)> = vec![
            (
                SvidRule::OneUriSan,
                tweak(|p| {
                    p.subject_alt_names.push(SanType::URI(
                        "spiffe://rolemesh.test/ns/shop/sa/admin"
                            .to_string()
                            .try_into()
                            .unwrap(),
                    ))
                }),
            ),
            (
                SvidRule::OneUriSan,
                tweak(|p| {
                    p.subject_alt_names
                        .retain(|s| !matches!(s, SanType::URI(_)))
                }),
            ),
            (
                SvidRule::SpiffeId,
                tweak(|p| set_uri(p, "spiffe://rolemesh.test/ns/../sa/payments")),
            ),
            (
                SvidRule::SpiffeId,
                tweak(|p| set_uri(p, "spiffe://rolemesh.test")),
            ),
            (
                SvidRule::SpiffeId,
                tweak(|p| set_uri(p, "https://rolemesh.test/ns/shop/sa/payments")),
            ),
            (
                SvidRule::SanCriticalWithoutSubject,
                tweak(|p| {
                    p.subject_alt_names.clear();
                    let uri = "spiffe://rolemesh.test/ns/shop/sa/payments";
                    let san = yasna::construct_der(|w| {
                        w.write_sequence(|w| {
                            w.next().write_tagged_implicit(yasna::Tag::context(6), |w| {
                                w.write_ia5_string(uri)
                            })
                        })
                    });
                    p.custom_extensions.push(non_critical(&[2, 5, 29, 17], san));
                }),
            ),
            (SvidRule::BasicConstraints, tweak(|p| p.is_ca = IsCa::NoCa)),
            (
                SvidRule::NotCa,
                tweak(|p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0))),
            ),
            (SvidRule::KeyUsagePresent, tweak(|p| p.key_usages.clear())),
            (
                SvidRule::KeyUsageCritical,
                tweak(|p| {
                    p.key_usages.clear();
                    // digitalSignature alone: bit 0 of the KeyUsage BIT STRING.
                    let ku = yasna::construct_der(|w| w.write_bitvec_bytes(&[0x80], 1));
                    p.custom_extensions.push(non_critical(&[2, 5, 29, 15], ku));
                }),
            ),
            (
                SvidRule::DigitalSignature,
                tweak(|p| p.key_usages = vec![KeyUsagePurpose::KeyEncipherment]),
            ),
            (
                SvidRule::NoKeyCertSign,
                tweak(|p| p.key_usages.push(KeyUsagePurpose::KeyCertSign)),
            ),
            (
                SvidRule::NoCrlSign,
                tweak(|p| p.key_usages.push(KeyUsagePurpose::CrlSign)),
            ),
            (
                SvidRule::ExtendedKeyUsage,
                tweak(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]),
            ),
        ];
        let mut seen = std::collections::HashSet::new();
        for (rule, tweak) in cases {
            let info = leaf_info(tweak);
            match info.check_svid_leaf() {
                Err(ProfileError::NotAnSvid { rule: broken, .. }) if broken == rule => {}
                other => panic!("{rule:?}: {other:?}"),
            }
            // The identity is refused for the same reason, citing the section.
            let error = info.workload_identity().unwrap_err().to_string();
            assert!(error.contains("X509-SVID §"), "{rule:?}: {error}");
            seen.insert(rule);
        }
        assert_eq!(seen.len(), SvidRule::ALL.len(), "a rule has no case");
    }

    #[test]
    fn rolemesh_asks_for_more_than_the_svid_profile() {
        // X509-SVID §4.4 only recommends extended key usage; rolemesh requires it.
        let info = leaf_info(|p| p.extended_key_usages.clear());
        info.check_svid_leaf().unwrap();
        let error = info.workload_identity().unwrap_err().to_string();
        assert!(
            error.contains("extended key usage must be present"),
            "{error}"
        );
        // Any SPIFFE ID is an SVID's; only /ns/<namespace>/sa/<serviceaccount> is a workload's.
        let info = leaf_info(|p| set_uri(p, "spiffe://rolemesh.test/payments"));
        info.check_svid_leaf().unwrap();
        assert!(matches!(
            info.workload_identity(),
            Err(ProfileError::InvalidSpiffeId { .. })
        ));
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
