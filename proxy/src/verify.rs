//! Peer verification, inside the handshake so that a refused peer gets a TLS alert and never app
//! bytes. Both directions run the same two checks: the chain ([`rolemesh_profile::verify_chain`]:
//! chain to the bundle, validity, EKU and revocation against the bundle's CRLs), then identity:
//! the peer must carry a rolemesh workload identity in our trust domain that the mapping admits.

use std::{io, sync::Arc};

use rolemesh_profile::{
    ChainError, ProfileError, TrustStore, Usage, WorkloadIdentity, inspect_certificate,
    proxy_config::PeerPattern, verify_chain,
};
use rustls::{
    CertRevocationListError, CertificateError, DigitallySignedStruct, DistinguishedName,
    Error as TlsError, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::rules::RulesHandle;

/// Which listener's patterns a verifier checks peers against, in the rules in force at the
/// handshake: a rules reload changes whom the next handshake admits without rebuilding TLS.
#[derive(Clone, Copy, Debug)]
pub enum RulesFor {
    /// The allow list of `config.inbound[index]`.
    Inbound(usize),
    /// The expected identities of `config.outbound[index]`.
    Outbound(usize),
}

/// Why a peer that presented a valid chain was still refused.
#[derive(Debug)]
pub struct Rejection {
    pub reason: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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
    // The X509-SVID leaf rules first (each refusal labelled with the rule it broke), then
    // rolemesh's profile.
    let identity = info.workload_identity().map_err(|e| match &e {
        ProfileError::NotAnSvid { rule, .. } => reject(rule.as_str(), e.to_string()),
        _ => reject("not_in_profile", e.to_string()),
    })?;
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

/// Verifies a connecting peer: [`verify_chain`] for clientAuth, then [`check_peer`] against one
/// inbound mapping's allow list. Client authentication is mandatory (the trait's default).
#[derive(Debug)]
pub struct PeerClientVerifier {
    peer: PeerCheck,
    /// The bundle's CA subjects, sent in the CertificateRequest.
    root_hint_subjects: Vec<DistinguishedName>,
}

impl PeerClientVerifier {
    pub fn new(
        trust: Arc<TrustStore>,
        provider: Arc<CryptoProvider>,
        trust_domain: &str,
        rules: RulesHandle,
        index: usize,
    ) -> Self {
        let root_hint_subjects = trust
            .anchors()
            .iter()
            .map(|anchor| DistinguishedName::in_sequence(anchor.subject.as_ref()))
            .collect();
        Self {
            peer: PeerCheck::new(
                trust,
                provider,
                trust_domain,
                rules,
                RulesFor::Inbound(index),
            ),
            root_hint_subjects,
        }
    }
}

impl ClientCertVerifier for PeerClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.root_hint_subjects
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.peer
            .verify(end_entity, intermediates, Usage::ClientAuth, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.peer.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.peer.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.peer.supported_verify_schemes()
    }
}

/// Verifies an upstream: [`verify_chain`] for serverAuth, then [`check_peer`] against the
/// mapping's expectations. The DNS name the proxy dialled is deliberately not checked: in the
/// mesh a workload is who its certificate says, not where it was reached.
#[derive(Debug)]
pub struct UpstreamVerifier {
    peer: PeerCheck,
}

impl UpstreamVerifier {
    pub fn new(
        trust: Arc<TrustStore>,
        provider: Arc<CryptoProvider>,
        trust_domain: &str,
        rules: RulesHandle,
        index: usize,
    ) -> Self {
        Self {
            peer: PeerCheck::new(
                trust,
                provider,
                trust_domain,
                rules,
                RulesFor::Outbound(index),
            ),
        }
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
        self.peer
            .verify(end_entity, intermediates, Usage::ServerAuth, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.peer.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.peer.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.peer.supported_verify_schemes()
    }
}

/// What both verifiers share: the bundle, the crypto provider (whose algorithms judge both the
/// chain and the handshake signatures) and whom the mapping admits.
#[derive(Debug)]
struct PeerCheck {
    trust: Arc<TrustStore>,
    provider: Arc<CryptoProvider>,
    trust_domain: String,
    rules: RulesHandle,
    rules_for: RulesFor,
}

impl PeerCheck {
    fn new(
        trust: Arc<TrustStore>,
        provider: Arc<CryptoProvider>,
        trust_domain: &str,
        rules: RulesHandle,
        rules_for: RulesFor,
    ) -> Self {
        Self {
            trust,
            provider,
            trust_domain: trust_domain.to_string(),
            rules,
            rules_for,
        }
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        usage: Usage,
        now: UnixTime,
    ) -> Result<WorkloadIdentity, TlsError> {
        verify_chain(end_entity, intermediates, &self.trust, usage, now)
            .map_err(certificate_error)?;
        let rules = self.rules.load();
        let Some(rules) = rules.as_deref() else {
            return Err(Rejection {
                reason: "no_rules",
                detail: "no peer rules loaded yet".to_string(),
            }
            .into());
        };
        let allowed = match self.rules_for {
            RulesFor::Inbound(index) => rules.inbound.get(index).map(Vec::as_slice),
            RulesFor::Outbound(index) => rules
                .outbound
                .get(index)
                .and_then(Option::as_ref)
                .map(|upstream| upstream.expect.as_slice()),
        };
        Ok(check_peer(
            end_entity,
            &self.trust_domain,
            allowed.unwrap_or_default(),
        )?)
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

/// rustls's error for a refused chain, in the variants rustls's own webpki verifiers yield, so
/// that the alert a peer gets is the one any rustls verifier would send.
fn certificate_error(error: ChainError) -> TlsError {
    match error {
        ChainError::Empty | ChainError::Malformed(_) => CertificateError::BadEncoding.into(),
        ChainError::NotYetValid { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }.into()
        }
        ChainError::Expired { time, not_after } => {
            CertificateError::ExpiredContext { time, not_after }.into()
        }
        ChainError::InvalidValidity => CertificateError::Expired.into(),
        ChainError::UnknownIssuer => CertificateError::UnknownIssuer.into(),
        ChainError::Revoked => CertificateError::Revoked.into(),
        ChainError::BadSignature => CertificateError::BadSignature.into(),
        ChainError::WrongUsage => CertificateError::InvalidPurpose.into(),
        ChainError::CrlIssuerNotCrlSigner => CertRevocationListError::IssuerInvalidForCrl.into(),
        ChainError::CrlBadSignature => CertRevocationListError::BadSignature.into(),
        other @ (ChainError::CaUsedAsEndEntity
        | ChainError::UnpinnedIssuer
        | ChainError::Other(_)) => CertificateError::Other(OtherError(Arc::new(other))).into(),
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
                } else if let Some(ChainError::CaUsedAsEndEntity) = inner.downcast_ref() {
                    "leaf_is_ca"
                } else if let Some(ChainError::UnpinnedIssuer) = inner.downcast_ref() {
                    "unpinned_issuer"
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
