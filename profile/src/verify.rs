//! The one chain check: does a certificate chain to the trust bundle, for this use, at this time,
//! with no certificate of the chain revoked by the bundle's CRLs? Path building, signatures,
//! validity, EKU and CRL processing are rustls-webpki's; this module only fixes the policy, so
//! that the controller (checking what it issued), the proxy (checking peers) and the CLI
//! (inspecting a Secret) reach the same verdict on the same chain.
//!
//! Revocation policy: every certificate of the chain is checked against the CRL of its issuer
//! when the bundle has one. A certificate whose issuer has no CRL in the bundle is not refused for
//! that (the bundle holds CRLs "when there are any"; during a CA rotation the new CA may have
//! none), and a CRL past its nextUpdate still revokes what it lists: a stale CRL is better
//! evidence than none.

use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, SignatureVerificationAlgorithm, TrustAnchor,
    UnixTime,
};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};

use crate::{
    ProfileError,
    inspect::{TrustBundle, trust_bundle_from_pem},
};

/// What the end-entity certificate is being accepted for (its extended key usage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// A TLS server: an upstream the proxy dialled.
    ServerAuth,
    /// A TLS client: a peer connecting to the proxy, or a workload certificate checked at rest.
    ClientAuth,
}

impl Usage {
    fn key_usage(self) -> KeyUsage {
        match self {
            Usage::ServerAuth => KeyUsage::server_auth(),
            Usage::ClientAuth => KeyUsage::client_auth(),
        }
    }
}

/// A trust bundle ready to verify against: its CA certificates as trust anchors, its CRLs parsed,
/// and the signature algorithms accepted in certificates and CRLs.
#[derive(Debug)]
pub struct TrustStore {
    anchors: Vec<TrustAnchor<'static>>,
    crls: Vec<CertRevocationList<'static>>,
    crl_ders: Vec<CertificateRevocationListDer<'static>>,
    algorithms: &'static [&'static dyn SignatureVerificationAlgorithm],
}

impl TrustStore {
    /// Trust anchors and CRLs from a PEM trust bundle (see [`trust_bundle_from_pem`]).
    pub fn from_pem(pem: &str) -> Result<Self, ProfileError> {
        Self::from_bundle(&trust_bundle_from_pem(pem)?)
    }

    /// Trust anchors and CRLs from a parsed bundle. Every certificate must be usable as an anchor
    /// and every CRL must parse: a bundle entry that cannot take effect is refused, not skipped.
    pub fn from_bundle(bundle: &TrustBundle) -> Result<Self, ProfileError> {
        let anchors = bundle
            .certificates
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                    .map(|anchor| anchor.to_owned())
                    .map_err(|e| {
                        ProfileError::ParseTrustBundle(format!(
                            "certificate {} of the bundle is not usable as a trust anchor: {e}",
                            index + 1
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let crls = bundle
            .crls
            .iter()
            .enumerate()
            .map(|(index, der)| {
                OwnedCertRevocationList::from_der(der)
                    .map(CertRevocationList::from)
                    .map_err(|e| {
                        ProfileError::ParseTrustBundle(format!(
                            "CRL {} of the bundle does not parse: {e}",
                            index + 1
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            anchors,
            crls,
            crl_ders: bundle
                .crls
                .iter()
                .map(|der| CertificateRevocationListDer::from(der.clone()))
                .collect(),
            algorithms: webpki::ALL_VERIFICATION_ALGS,
        })
    }

    /// The same anchors and CRLs, accepting exactly `algorithms` (a TLS stack's own list, so
    /// that a chain and the handshake signatures are judged by one set).
    pub fn with_algorithms(
        mut self,
        algorithms: &'static [&'static dyn SignatureVerificationAlgorithm],
    ) -> Self {
        self.algorithms = algorithms;
        self
    }

    /// The same anchors without the CRLs: whether a chain is sound apart from revocation.
    pub fn without_crls(&self) -> Self {
        Self {
            crls: Vec::new(),
            crl_ders: Vec::new(),
            anchors: self.anchors.clone(),
            algorithms: self.algorithms,
        }
    }

    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// The bundle's CRLs as DER, as they were in the bundle.
    pub fn crls(&self) -> &[CertificateRevocationListDer<'static>] {
        &self.crl_ders
    }
}

/// Why a chain was refused. The variants a caller acts on are split out; the rest keep
/// rustls-webpki's error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("the chain holds no certificate")]
    Empty,
    #[error("a certificate of the chain is not well-formed DER: {0}")]
    Malformed(webpki::Error),
    #[error("the certificate expired at {not_after:?} (now {time:?})")]
    Expired { time: UnixTime, not_after: UnixTime },
    #[error("the certificate is not valid before {not_before:?} (now {time:?})")]
    NotYetValid {
        time: UnixTime,
        not_before: UnixTime,
    },
    #[error("the certificate's validity period is invalid")]
    InvalidValidity,
    #[error("the chain does not lead to a certificate of the trust bundle")]
    UnknownIssuer,
    #[error("a certificate of the chain is revoked by a CRL of the trust bundle")]
    Revoked,
    #[error("a signature in the chain does not verify")]
    BadSignature,
    #[error("the certificate is not for this use (extended key usage)")]
    WrongUsage,
    #[error("the end-entity certificate is a CA")]
    CaUsedAsEndEntity,
    #[error("a CRL of the trust bundle is not signed by a CA allowed to sign CRLs")]
    CrlIssuerNotCrlSigner,
    #[error("a CRL of the trust bundle has a bad signature")]
    CrlBadSignature,
    #[error("the chain does not verify: {0}")]
    Other(webpki::Error),
}

impl From<webpki::Error> for ChainError {
    fn from(error: webpki::Error) -> Self {
        use webpki::Error as E;
        match error {
            E::BadDer | E::BadDerTime | E::TrailingData(_) => ChainError::Malformed(error),
            E::CertExpired { time, not_after } => ChainError::Expired { time, not_after },
            E::CertNotValidYet { time, not_before } => ChainError::NotYetValid { time, not_before },
            E::InvalidCertValidity => ChainError::InvalidValidity,
            E::UnknownIssuer => ChainError::UnknownIssuer,
            E::CertRevoked => ChainError::Revoked,
            E::InvalidSignatureForPublicKey => ChainError::BadSignature,
            E::RequiredEkuNotFoundContext(_) => ChainError::WrongUsage,
            E::CaUsedAsEndEntity => ChainError::CaUsedAsEndEntity,
            E::IssuerNotCrlSigner => ChainError::CrlIssuerNotCrlSigner,
            E::InvalidCrlSignatureForPublicKey => ChainError::CrlBadSignature,
            other => ChainError::Other(other),
        }
    }
}

/// Verifies that `end_entity`, with `intermediates` (in any order, as presented), chains to an
/// anchor of `trust` and is valid at `now` for `usage`, and that no certificate of the chain is
/// revoked by the bundle's CRLs (see the module comment for the policy). Identity (SPIFFE ID,
/// role) is not looked at here: see [`crate::inspect`].
pub fn verify_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    trust: &TrustStore,
    usage: Usage,
    now: UnixTime,
) -> Result<(), ChainError> {
    let cert = EndEntityCert::try_from(end_entity)?;
    let crls: Vec<&CertRevocationList<'_>> = trust.crls.iter().collect();
    // No CRLs, no revocation options (the builder refuses an empty list).
    let revocation = RevocationOptionsBuilder::new(&crls).ok().map(|options| {
        options
            .with_depth(RevocationCheckDepth::Chain)
            .with_status_policy(UnknownStatusPolicy::Allow)
            .with_expiration_policy(ExpirationPolicy::Ignore)
            .build()
    });
    cert.verify_for_usage(
        trust.algorithms,
        &trust.anchors,
        intermediates,
        now,
        usage.key_usage(),
        revocation,
        None,
    )?;
    Ok(())
}

/// [`verify_chain`] for a chain given leaf first, as a `tls.crt` holds it.
pub fn verify_chain_der(
    chain: &[impl AsRef<[u8]>],
    trust: &TrustStore,
    usage: Usage,
    now: UnixTime,
) -> Result<(), ChainError> {
    let mut chain = chain.iter().map(|der| CertificateDer::from(der.as_ref()));
    let end_entity = chain.next().ok_or(ChainError::Empty)?;
    let intermediates: Vec<CertificateDer<'_>> = chain.collect();
    verify_chain(&end_entity, &intermediates, trust, usage, now)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
        SerialNumber,
    };
    use time::OffsetDateTime;

    use super::*;
    use crate::{
        CertificateProfile, SpiffeId, WorkloadIdentity,
        profile::{DEFAULT_CA_DURATION, ca_params, crl_params, generate_workload_key},
    };

    const TD: &str = "rolemesh.test";
    const DAY: Duration = Duration::from_secs(86400);

    struct Ca {
        params: CertificateParams,
        key: KeyPair,
        der: Vec<u8>,
    }

    /// CA parameters under a name of their own: CRLs are matched to their issuer by name.
    fn named_ca_params(name: &str, now: OffsetDateTime) -> CertificateParams {
        let mut params = ca_params(TD, DEFAULT_CA_DURATION, now);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
    }

    impl Ca {
        fn root(name: &str, now: OffsetDateTime) -> Self {
            let key = generate_workload_key().unwrap();
            let params = named_ca_params(name, now);
            let der = params.self_signed(&key).unwrap().der().to_vec();
            Self { params, key, der }
        }

        /// A root that may have intermediates below it.
        fn root_of_intermediates(now: OffsetDateTime) -> Self {
            let key = generate_workload_key().unwrap();
            let mut params = named_ca_params("root", now);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let der = params.self_signed(&key).unwrap().der().to_vec();
            Self { params, key, der }
        }

        /// An intermediate CA below `self` that may sign leaves.
        fn intermediate(&self, now: OffsetDateTime) -> Self {
            let key = generate_workload_key().unwrap();
            let params = ca_params(TD, DEFAULT_CA_DURATION, now);
            let der = params
                .signed_by(&key, &self.issuer())
                .unwrap()
                .der()
                .to_vec();
            Self { params, key, der }
        }

        fn issuer(&self) -> Issuer<'_, &KeyPair> {
            Issuer::from_params(&self.params, &self.key)
        }

        /// A workload leaf valid from `now`, and its serial.
        fn leaf(&self, now: OffsetDateTime) -> (Vec<u8>, SerialNumber) {
            let identity = WorkloadIdentity::new(
                SpiffeId::new(TD, "shop", "payments").unwrap(),
                "arn:aws:iam::111122223333:role/payments",
            )
            .unwrap();
            let params = CertificateProfile::default()
                .leaf_params(&identity, &[], now)
                .unwrap();
            let serial = params.serial_number.clone().unwrap();
            let key = generate_workload_key().unwrap();
            let der = params
                .signed_by(&key, &self.issuer())
                .unwrap()
                .der()
                .to_vec();
            (der, serial)
        }

        fn crl(&self, revoked: Vec<SerialNumber>, now: OffsetDateTime) -> Vec<u8> {
            self.crl_for(revoked, now, DAY)
        }

        fn crl_for(
            &self,
            revoked: Vec<SerialNumber>,
            now: OffsetDateTime,
            next_update_in: Duration,
        ) -> Vec<u8> {
            crl_params(revoked, 1, now, next_update_in)
                .signed_by(&self.issuer())
                .unwrap()
                .der()
                .to_vec()
        }
    }

    fn store(certificates: Vec<Vec<u8>>, crls: Vec<Vec<u8>>) -> TrustStore {
        TrustStore::from_bundle(&TrustBundle { certificates, crls }).unwrap()
    }

    fn unix(at: OffsetDateTime) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(at.unix_timestamp() as u64))
    }

    #[test]
    fn a_leaf_of_the_bundle_verifies_for_both_uses() {
        let now = OffsetDateTime::now_utc();
        let ca = Ca::root("ca", now);
        let (leaf, _) = ca.leaf(now);
        let trust = store(vec![ca.der.clone()], vec![]);
        for usage in [Usage::ServerAuth, Usage::ClientAuth] {
            verify_chain_der(&[&leaf], &trust, usage, unix(now)).unwrap();
        }
    }

    #[test]
    fn verdicts() {
        let now = OffsetDateTime::now_utc();
        let ca = Ca::root("ca", now);
        let other = Ca::root("other", now);
        let (leaf, serial) = ca.leaf(now);
        let (_, other_serial) = ca.leaf(now);
        let trusted = store(vec![ca.der.clone()], vec![]);
        let revoking = store(vec![ca.der.clone()], vec![ca.crl(vec![serial], now)]);
        let revoking_others = store(vec![ca.der.clone()], vec![ca.crl(vec![other_serial], now)]);
        let foreign_crl = store(
            vec![ca.der.clone(), other.der.clone()],
            vec![other.crl(vec![], now)],
        );
        let foreign = store(vec![other.der.clone()], vec![]);
        // tls.crt holds the leaf followed by its CA.
        let as_issued = vec![leaf.clone(), ca.der.clone()];
        let leaf = vec![leaf];
        type Case<'a> = (
            &'a str,
            &'a [Vec<u8>],
            &'a TrustStore,
            Result<(), ChainError>,
        );
        let cases: [Case<'_>; 8] = [
            ("trusted", &leaf, &trusted, Ok(())),
            ("leaf and CA, as issued", &as_issued, &trusted, Ok(())),
            ("CRL lists another serial", &leaf, &revoking_others, Ok(())),
            ("CRL of another issuer only", &leaf, &foreign_crl, Ok(())),
            ("revoked", &leaf, &revoking, Err(ChainError::Revoked)),
            (
                "not in the bundle",
                &leaf,
                &foreign,
                Err(ChainError::UnknownIssuer),
            ),
            ("empty", &[], &trusted, Err(ChainError::Empty)),
            (
                "the CA itself",
                std::slice::from_ref(&ca.der),
                &trusted,
                Err(ChainError::CaUsedAsEndEntity),
            ),
        ];
        for (name, chain, trust, expected) in cases {
            assert_eq!(
                verify_chain_der(chain, trust, Usage::ClientAuth, unix(now)),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn validity_is_checked_at_the_given_time() {
        let now = OffsetDateTime::now_utc();
        let ca = Ca::root("ca", now);
        let (leaf, _) = ca.leaf(now);
        let trust = store(vec![ca.der.clone()], vec![]);
        let later = now + time::Duration::days(2);
        assert!(matches!(
            verify_chain_der(&[&leaf], &trust, Usage::ClientAuth, unix(later)),
            Err(ChainError::Expired { .. })
        ));
        let earlier = now - time::Duration::hours(1);
        assert!(matches!(
            verify_chain_der(&[&leaf], &trust, Usage::ClientAuth, unix(earlier)),
            Err(ChainError::NotYetValid { .. })
        ));
    }

    #[test]
    fn every_certificate_of_the_chain_is_checked_against_its_issuers_crl() {
        let now = OffsetDateTime::now_utc();
        let root = Ca::root_of_intermediates(now);
        let intermediate = root.intermediate(now);
        let intermediate_serial = intermediate.params.serial_number.clone().unwrap();
        let (leaf, _) = intermediate.leaf(now);
        let chain = vec![leaf, intermediate.der.clone()];
        let sound = store(vec![root.der.clone()], vec![root.crl(vec![], now)]);
        verify_chain_der(&chain, &sound, Usage::ServerAuth, unix(now)).unwrap();
        let revoked = store(
            vec![root.der.clone()],
            vec![root.crl(vec![intermediate_serial], now)],
        );
        assert_eq!(
            verify_chain_der(&chain, &revoked, Usage::ServerAuth, unix(now)),
            Err(ChainError::Revoked)
        );
        verify_chain_der(
            &chain,
            &revoked.without_crls(),
            Usage::ServerAuth,
            unix(now),
        )
        .unwrap();
        // Without the intermediate the leaf has no path.
        assert_eq!(
            verify_chain_der(&chain[..1], &sound, Usage::ServerAuth, unix(now)),
            Err(ChainError::UnknownIssuer)
        );
    }

    #[test]
    fn a_stale_crl_still_revokes() {
        let now = OffsetDateTime::now_utc();
        let ca = Ca::root("ca", now);
        let (leaf, serial) = ca.leaf(now);
        let crl = ca.crl_for(vec![serial], now, Duration::from_secs(60));
        let trust = store(vec![ca.der.clone()], vec![crl]);
        let after_next_update = now + time::Duration::hours(1);
        assert_eq!(
            verify_chain_der(&[&leaf], &trust, Usage::ClientAuth, unix(after_next_update)),
            Err(ChainError::Revoked)
        );
    }

    #[test]
    fn bundles_whose_entries_cannot_take_effect_are_refused() {
        let now = OffsetDateTime::now_utc();
        let ca = Ca::root("ca", now);
        let error = TrustStore::from_bundle(&TrustBundle {
            certificates: vec![ca.der.clone()],
            crls: vec![vec![1, 2, 3]],
        })
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("CRL 1 of the bundle does not parse"),
            "{error}"
        );
        let error = TrustStore::from_bundle(&TrustBundle {
            certificates: vec![ca.der.clone(), vec![0x30, 0x00]],
            crls: vec![],
        })
        .unwrap_err()
        .to_string();
        assert!(error.contains("certificate 2 of the bundle"), "{error}");
        assert!(TrustStore::from_pem("").is_err());
    }

    #[test]
    fn a_trust_store_reads_a_pem_bundle_with_crls() {
        let now = OffsetDateTime::now_utc();
        let ca = Ca::root("ca", now);
        let crl_pem = crl_params(vec![], 1, now, DAY)
            .signed_by(&ca.issuer())
            .unwrap()
            .pem()
            .unwrap();
        let ca_pem = ca.params.self_signed(&ca.key).unwrap().pem();
        let trust = TrustStore::from_pem(&format!("{ca_pem}{crl_pem}")).unwrap();
        assert_eq!(trust.anchors().len(), 1);
        assert_eq!(trust.crls().len(), 1);
        assert!(trust.without_crls().crls().is_empty());
    }
}
