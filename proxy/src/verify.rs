//! Peer verification. Chains, validity, signatures, EKU and revocation against the bundle's CRLs
//! are rustls-webpki's; on top of that the peer must carry a rolemesh workload identity in our
//! trust domain that the mapping admits. Both checks run inside the handshake, so a refused peer
//! gets a TLS alert and never app bytes.
//!
//! Revocation: every certificate of the peer's chain is checked against the CRL of its issuer
//! when the bundle has one. A certificate whose issuer has no CRL in the bundle is not refused
//! for that (the bundle holds CRLs "when there are any"; during a CA rotation the new CA may have
//! none), and a CRL past its nextUpdate still revokes what it lists.

use std::{fmt, io, sync::Arc};

use rolemesh_profile::{WorkloadIdentity, inspect_certificate, proxy_config::PeerPattern};
use rustls::{
    CertRevocationListError, CertificateError, DigitallySignedStruct, DistinguishedName,
    Error as TlsError, OtherError, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};

/// Why a peer that presented a valid chain was still refused.
#[derive(Debug)]
pub struct Rejection {
    pub reason: &'static str,
    pub detail: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

impl std::error::Error for Rejection {}

impl From<Rejection> for TlsError {
    fn from(rejection: Rejection) -> Self {
        TlsError::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(rejection))))
    }
}

/// Checks a chain-validated end-entity certificate against the rolemesh profile, the trust
/// domain and the allowed patterns.
pub fn check_peer(
    end_entity: &CertificateDer<'_>,
    trust_domain: &str,
    allowed: &[PeerPattern],
) -> Result<WorkloadIdentity, Rejection> {
    let reject = |reason, detail: String| Rejection { reason, detail };
    let info =
        inspect_certificate(end_entity).map_err(|e| reject("not_in_profile", e.to_string()))?;
    if info.is_ca {
        return Err(reject(
            "leaf_is_ca",
            "the peer's certificate is a CA".into(),
        ));
    }
    if info.uri_sans.len() != 1 {
        return Err(reject(
            "uri_san_count",
            format!("expected exactly one URI SAN, found {:?}", info.uri_sans),
        ));
    }
    let identity = info
        .workload_identity()
        .map_err(|e| reject("not_in_profile", e.to_string()))?;
    if identity.spiffe_id.trust_domain() != trust_domain {
        return Err(reject(
            "wrong_trust_domain",
            format!(
                "{} is not in trust domain {trust_domain}",
                identity.spiffe_id
            ),
        ));
    }
    let spiffe = identity.spiffe_id.to_string();
    if !allowed
        .iter()
        .any(|p| p.matches(&spiffe, &identity.role_arn))
    {
        return Err(reject(
            "not_allowed",
            format!(
                "{spiffe} with role {} is not on the list",
                identity.role_arn
            ),
        ));
    }
    Ok(identity)
}

/// rustls's webpki client verifier (chain to the bundle, validity, EKU clientAuth) plus
/// [`check_peer`] against one inbound mapping's allow list.
#[derive(Debug)]
pub struct PeerClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
    allowed: Vec<PeerPattern>,
}

impl PeerClientVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        crls: &[CertificateRevocationListDer<'static>],
        provider: Arc<CryptoProvider>,
        trust_domain: &str,
        allowed: Vec<PeerPattern>,
    ) -> Result<Self, TlsError> {
        // Chain depth and no nextUpdate enforcement are the builder's defaults; see the module
        // comment for why an issuer without a CRL is allowed.
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
            .with_crls(crls.iter().cloned())
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| TlsError::General(e.to_string()))?;
        Ok(Self {
            inner,
            trust_domain: trust_domain.to_string(),
            allowed,
        })
    }
}

impl ClientCertVerifier for PeerClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_peer(end_entity, &self.trust_domain, &self.allowed)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Verifies an upstream: chain to the bundle, validity, EKU serverAuth and revocation by
/// rustls-webpki, then identity by SPIFFE ID / role against the mapping's expectations. The DNS
/// name the proxy dialled is deliberately not checked: in the mesh a workload is who its
/// certificate says, not where it was reached. (rustls's own server verifier always checks the
/// name, hence webpki directly.)
#[derive(Debug)]
pub struct UpstreamVerifier {
    roots: Arc<RootCertStore>,
    crls: Vec<CertRevocationList<'static>>,
    provider: Arc<CryptoProvider>,
    trust_domain: String,
    expected: Vec<PeerPattern>,
}

impl UpstreamVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        crls: &[CertificateRevocationListDer<'static>],
        provider: Arc<CryptoProvider>,
        trust_domain: &str,
        expected: Vec<PeerPattern>,
    ) -> Result<Self, TlsError> {
        let crls = parse_crls(crls).map_err(certificate_error)?;
        Ok(Self {
            roots,
            crls,
            provider,
            trust_domain: trust_domain.to_string(),
            expected,
        })
    }
}

impl ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        verify_server_chain(
            end_entity,
            intermediates,
            &self.roots,
            &self.crls,
            &self.provider,
            now,
        )
        .map_err(certificate_error)?;
        check_peer(end_entity, &self.trust_domain, &self.expected)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The bundle's CRLs as rustls-webpki takes them.
pub fn parse_crls(
    crls: &[CertificateRevocationListDer<'_>],
) -> Result<Vec<CertRevocationList<'static>>, webpki::Error> {
    crls.iter()
        .map(|der| OwnedCertRevocationList::from_der(der).map(CertRevocationList::from))
        .collect()
}

/// rustls-webpki's path validation of a server certificate: chain to `roots`, validity, EKU
/// serverAuth, and every certificate of the chain against its issuer's CRL in `crls` (see the
/// module comment for the policy).
pub fn verify_server_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
    crls: &[CertRevocationList<'_>],
    provider: &CryptoProvider,
    now: UnixTime,
) -> Result<(), webpki::Error> {
    let cert = EndEntityCert::try_from(end_entity)?;
    let crls: Vec<&CertRevocationList<'_>> = crls.iter().collect();
    // No CRLs, no revocation options (the builder refuses an empty list).
    let revocation = RevocationOptionsBuilder::new(&crls).ok().map(|options| {
        options
            .with_depth(RevocationCheckDepth::Chain)
            .with_status_policy(UnknownStatusPolicy::Allow)
            .with_expiration_policy(ExpirationPolicy::Ignore)
            .build()
    });
    cert.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &roots.roots,
        intermediates,
        now,
        KeyUsage::server_auth(),
        revocation,
        None,
    )?;
    Ok(())
}

/// rustls's error for a rustls-webpki verification failure, in the variants the client verifier
/// (which does the same mapping inside rustls) yields, so that both directions classify alike.
fn certificate_error(error: webpki::Error) -> TlsError {
    use webpki::Error as E;
    match error {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding.into(),
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }.into()
        }
        E::CertExpired { time, not_after } => {
            CertificateError::ExpiredContext { time, not_after }.into()
        }
        E::InvalidCertValidity => CertificateError::Expired.into(),
        E::UnknownIssuer => CertificateError::UnknownIssuer.into(),
        E::CertRevoked => CertificateError::Revoked.into(),
        E::UnknownRevocationStatus => CertificateError::UnknownRevocationStatus.into(),
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature.into(),
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose.into(),
        E::IssuerNotCrlSigner => CertRevocationListError::IssuerInvalidForCrl.into(),
        E::InvalidCrlSignatureForPublicKey => CertRevocationListError::BadSignature.into(),
        other => CertificateError::Other(OtherError(Arc::new(other))).into(),
    }
}

/// A bounded set of metric labels for a failed handshake, and a human-readable detail.
pub fn classify_handshake_error(error: &io::Error) -> (&'static str, String) {
    let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<TlsError>()) else {
        let reason = match error.kind() {
            io::ErrorKind::UnexpectedEof => "peer_closed",
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => "peer_closed",
            _ => "io",
        };
        return (reason, error.to_string());
    };
    (classify_tls_error(tls), tls.to_string())
}

fn classify_tls_error(error: &TlsError) -> &'static str {
    use rustls::PeerIncompatible as P;
    match error {
        TlsError::InvalidCertificate(cert) => match cert {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::BadSignature => "bad_signature",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "wrong_key_usage"
            }
            CertificateError::Revoked => "revoked",
            CertificateError::BadEncoding => "bad_certificate",
            CertificateError::Other(OtherError(inner)) => {
                if let Some(rejection) = inner.downcast_ref::<Rejection>() {
                    rejection.reason
                } else if inner.to_string().contains("CaUsedAsEndEntity") {
                    "leaf_is_ca"
                } else {
                    "bad_certificate"
                }
            }
            _ => "bad_certificate",
        },
        TlsError::InvalidCertRevocationList(_) => "bad_crl",
        TlsError::NoCertificatesPresented => "no_client_certificate",
        TlsError::PeerIncompatible(
            P::SupportedVersionsExtensionRequired
            | P::Tls12NotOffered
            | P::Tls12NotOfferedOrEnabled
            | P::ServerDoesNotSupportTls12Or13
            | P::ServerTlsVersionIsDisabledByOurConfig,
        ) => "protocol_version",
        TlsError::PeerIncompatible(_) => "incompatible",
        TlsError::InvalidMessage(_) | TlsError::InappropriateMessage { .. } => "not_tls",
        TlsError::InappropriateHandshakeMessage { .. } => "not_tls",
        TlsError::AlertReceived(_) => "alert_received",
        TlsError::PeerMisbehaved(_) => "peer_misbehaved",
        _ => "tls_error",
    }
}
