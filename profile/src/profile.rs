//! The X.509 profile of rolemesh certificates, following the SPIFFE X509-SVID profile:
//!
//! - workload (leaf): ECDSA P-256 key, exactly one URI SAN (the SPIFFE ID), DNS SANs for the
//!   workload's Services where known, the IAM role ARN in the non-critical [`ROLE_ARN_OID`]
//!   extension, EKU serverAuth + clientAuth, KeyUsage digitalSignature (critical), not a CA,
//!   random positive 128-bit serial, notBefore backdated for clock skew;
//! - CA: a self-signed (or user-provided) CA limited to signing leaves (path length 0).

use std::{fmt, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
    SerialNumber,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::{ProfileError, ROLE_ARN_OID, SpiffeId, validate_role_arn};

/// Default certificate lifetime.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(24 * 3600);
/// The shortest workload certificate lifetime a policy may ask for.
pub const MIN_DURATION: Duration = Duration::from_secs(10 * 60);
/// The longest workload certificate lifetime a policy may ask for: 30 days. Nothing revokes a
/// certificate, so this bounds how long a key copied out of a Secret stays usable
/// (docs/security-model.md gives the reasoning).
pub const MAX_DURATION: Duration = Duration::from_secs(720 * 3600);
/// How far notBefore is set in the past, so peers whose clocks run a little behind accept a
/// certificate the moment it is issued.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Default lifetime of a CA certificate the controller self-signs.
pub const DEFAULT_CA_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Share of the renewal window used to spread renewals of certificates issued together.
const JITTER_FRACTION: f64 = 0.1;

/// Who a certificate is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadIdentity {
    pub spiffe_id: SpiffeId,
    pub role_arn: String,
}

impl WorkloadIdentity {
    pub fn new(spiffe_id: SpiffeId, role_arn: &str) -> Result<Self, ProfileError> {
        validate_role_arn(role_arn)?;
        Ok(Self {
            spiffe_id,
            role_arn: role_arn.to_string(),
        })
    }
}

/// Lifetime policy of workload certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertificateProfile {
    pub duration: Duration,
    /// Renew this long before expiry; `None` renews at two thirds of the lifetime.
    pub renew_before: Option<Duration>,
}

impl Default for CertificateProfile {
    fn default() -> Self {
        Self {
            duration: DEFAULT_DURATION,
            renew_before: None,
        }
    }
}

impl CertificateProfile {
    /// Parameters of a workload certificate valid from `now - BACKDATE` for `duration`.
    pub fn leaf_params(
        &self,
        identity: &WorkloadIdentity,
        dns_names: &[String],
        now: OffsetDateTime,
    ) -> Result<CertificateParams, ProfileError> {
        let mut params = CertificateParams::default();
        params.not_before = now - BACKDATE;
        params.not_after = now + self.duration;
        params.serial_number = Some(random_serial());
        // SPIFFE: the identity is the URI SAN; an empty subject makes the SAN critical.
        params.distinguished_name = DistinguishedName::new();
        let uri = identity.spiffe_id.to_string();
        params.subject_alt_names.push(SanType::URI(
            uri.clone()
                .try_into()
                .map_err(|_| ProfileError::NotInProfile(format!("URI SAN {uri} is not ASCII")))?,
        ));
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.clone().try_into().map_err(|_| {
                    ProfileError::NotInProfile(format!("DNS SAN {name} is not ASCII"))
                })?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params
            .custom_extensions
            .push(role_extension(&identity.role_arn));
        Ok(params)
    }

    /// When a certificate valid over [not_before, not_after] with this serial should be renewed.
    /// The jitter is derived from the serial, so it is spread across certificates yet stable
    /// across controller restarts without being stored anywhere.
    pub fn renewal_time(
        &self,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        serial: &[u8],
    ) -> OffsetDateTime {
        let life = (not_after - not_before).max(time::Duration::ZERO);
        let window = match self.renew_before {
            Some(before) => time::Duration::try_from(before).unwrap_or(life).min(life),
            None => life / 3,
        };
        let digest = Sha256::digest(serial);
        let unit = f64::from(u16::from_be_bytes([digest[0], digest[1]])) / f64::from(u16::MAX);
        let jitter = window * (JITTER_FRACTION * unit);
        not_after - window - jitter
    }
}

/// Parameters of a self-signed CA certificate for `trust_domain`.
pub fn ca_params(trust_domain: &str, duration: Duration, now: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.not_before = now - BACKDATE;
    params.not_after = now + duration;
    let serial = random_serial();
    // Each CA gets a subject of its own: peers pin the issuing CA by subject and key, and every
    // CA a signer makes has the signer's key, so only the subject tells a retired CA (and what
    // it signed) from the one that replaced it.
    let tag: String = serial.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    params.serial_number = Some(serial);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "rolemesh");
    dn.push(
        DnType::CommonName,
        format!("rolemesh CA {trust_domain} {tag}"),
    );
    params.distinguished_name = dn;
    // SPIFFE: the trust domain as a URI SAN of the CA.
    if let Ok(uri) = format!("spiffe://{trust_domain}").try_into() {
        params.subject_alt_names.push(SanType::URI(uri));
    }
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// Parameters of a CRL that revokes the certificates with `revoked` serials, issued now (backdated
/// like certificates, for peers whose clocks run behind) and promising the next within
/// `next_update_in`: the CRLs the controller signs through the signer for `kubectl rolemesh
/// revoke`, and the shape tests make theirs in.
pub fn crl_params(
    revoked: Vec<SerialNumber>,
    crl_number: u64,
    now: OffsetDateTime,
    next_update_in: Duration,
) -> rcgen::CertificateRevocationListParams {
    rcgen::CertificateRevocationListParams {
        this_update: now - BACKDATE,
        next_update: now + next_update_in,
        crl_number: SerialNumber::from(crl_number),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .into_iter()
            .map(|serial_number| rcgen::RevokedCertParams {
                serial_number,
                revocation_time: now - BACKDATE,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
}

/// The role-ARN extension: non-critical, a DER UTF8String.
pub fn role_extension(role_arn: &str) -> CustomExtension {
    let content = yasna::construct_der(|writer| writer.write_utf8_string(role_arn));
    let mut extension = CustomExtension::from_oid_content(ROLE_ARN_OID, content);
    extension.set_criticality(false);
    extension
}

/// A random positive 128-bit serial (RFC 5280: at most 20 octets, positive, unpredictable).
pub fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    // A leading zero octet would make the DER INTEGER 15 bytes; keep the width fixed.
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// A new ECDSA P-256 key for a workload.
pub fn generate_workload_key() -> Result<KeyPair, ProfileError> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

/// A certificate with its key, as written to a `kubernetes.io/tls` Secret.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// Leaf, then the chain up to (not including) the trust anchor.
    pub chain_pem: String,
    /// The leaf's PKCS#8 private key.
    pub key_pem: String,
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("serial_hex", &self.serial_hex)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect_certificate;

    fn identity() -> WorkloadIdentity {
        WorkloadIdentity::new(
            SpiffeId::new("rolemesh.local", "shop", "payments").unwrap(),
            "arn:aws:iam::111122223333:role/payments",
        )
        .unwrap()
    }

    #[test]
    fn leaf_follows_the_profile() {
        let now = OffsetDateTime::now_utc();
        let ca_key = generate_workload_key().unwrap();
        let ca = ca_params("rolemesh.local", DEFAULT_CA_DURATION, now);
        let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
        let key = generate_workload_key().unwrap();
        let params = CertificateProfile::default()
            .leaf_params(&identity(), &["payments.shop.svc".to_string()], now)
            .unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let info = inspect_certificate(cert.der()).unwrap();
        let checked = info.workload_identity().unwrap();
        assert_eq!(checked, identity());
        assert!(!info.is_ca);
        assert!(info.eku_server_auth && info.eku_client_auth);
        assert!(info.key_usage_digital_signature && info.key_usage_critical);
        assert_eq!(info.dns_names, vec!["payments.shop.svc".to_string()]);
        assert_eq!(info.serial_hex.len(), 32);
        assert!(info.not_before < now && info.not_after > now + time::Duration::hours(23));
    }

    #[test]
    fn serials_are_positive_and_distinct() {
        let a = random_serial().to_bytes();
        let b = random_serial().to_bytes();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a[0] & 0x80 == 0 && a[0] != 0);
    }

    #[test]
    fn renewal_at_two_thirds_with_bounded_jitter() {
        let profile = CertificateProfile::default();
        let nb = OffsetDateTime::UNIX_EPOCH;
        let na = nb + time::Duration::hours(24);
        let mut times = std::collections::BTreeSet::new();
        for i in 0u32..50 {
            let at = profile.renewal_time(nb, na, &i.to_be_bytes());
            assert!(at <= nb + time::Duration::hours(16), "{at}");
            assert!(
                at >= nb + time::Duration::hours(16) - time::Duration::minutes(49),
                "{at}"
            );
            times.insert(at);
        }
        assert!(times.len() > 40, "jitter does not spread renewals");
        let explicit = CertificateProfile {
            renew_before: Some(Duration::from_secs(3600)),
            ..profile
        };
        let at = explicit.renewal_time(nb, na, b"x");
        assert!(at <= na - time::Duration::hours(1));
    }

    #[test]
    fn issued_certificate_debug_redacts_key() {
        let issued = IssuedCertificate {
            chain_pem: String::new(),
            key_pem: "-----BEGIN PRIVATE KEY-----secret".into(),
            serial_hex: "01".into(),
            not_before: OffsetDateTime::UNIX_EPOCH,
            not_after: OffsetDateTime::UNIX_EPOCH,
        };
        assert!(!format!("{issued:?}").contains("secret"));
    }
}
