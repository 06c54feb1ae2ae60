//! The one chain check: does a certificate chain to the trust bundle, for this use, at this time,
//! with no certificate of the chain revoked by the bundle's CRLs? Path building, signatures,
//! validity, EKU and CRL processing are rustls-webpki's; this module only fixes the policy, so
//! that the controller (checking what it issued), the proxy (checking peers) and the CLI
//! (inspecting a Secret) reach the same verdict on the same chain.
//!
//! Issuer pinning: ending at a root of the bundle is not enough. A user's offline root may sign
//! other teams' intermediates too, and any of them could sign a leaf that names our trust domain.
//! The bundle therefore says which of its CA certificates *issue*: a certificate of the bundle
//! that is the issuer of no other CA certificate of the bundle (rolemesh's own signing CA, an
//! intermediate under the user's root, or a self-signed CA that anchors nothing else). The
//! certificate that signed the leaf must be one of those, compared by subject and public key; a
//! root that only anchors an issuing intermediate of the bundle is not one. Only the bundle's
//! roots (certificates whose issuer is not in the bundle) are trust anchors, so a path through a
//! pinned intermediate still ends at the root and the root's CRL still applies to it. The rule
//! reads nothing but the bundle, which keeps it a plain PEM list that `openssl verify -CAfile`
//! reads as before; a peer's own chain never adds to it.
//!
//! Revocation policy: every certificate of the chain is checked against the CRL of its issuer
//! when the bundle has one. A certificate whose issuer has no CRL in the bundle is not refused for
//! that (the bundle holds CRLs "when there are any"; during a CA rotation the new CA may have
//! none), and a CRL past its nextUpdate still revokes what it lists: a stale CRL is better
//! evidence than none.

use std::cell::Cell;

use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, SignatureVerificationAlgorithm, TrustAnchor,
    UnixTime,
};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy, VerifiedPath,
};
use x509_parser::prelude::{FromDer, X509Certificate};

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

/// A trust bundle ready to verify against: its roots as trust anchors, its other CA certificates
/// as intermediates, the CAs that may sign leaves (see the module comment), its CRLs parsed, and
/// the signature algorithms accepted in certificates and CRLs.
#[derive(Debug)]
pub struct TrustStore {
    anchors: Vec<TrustAnchor<'static>>,
    intermediates: Vec<CertificateDer<'static>>,
    issuers: Vec<PinnedIssuer>,
    crls: Vec<CertRevocationList<'static>>,
    crl_ders: Vec<CertificateRevocationListDer<'static>>,
    algorithms: &'static [&'static dyn SignatureVerificationAlgorithm],
}

impl TrustStore {
    /// Trust anchors and CRLs from a PEM trust bundle (see [`trust_bundle_from_pem`]).
    pub fn from_pem(pem: &str) -> Result<Self, ProfileError> {
        Self::from_bundle(&trust_bundle_from_pem(pem)?)
    }

    /// Trust anchors, intermediates, issuing CAs and CRLs from a parsed bundle. Every
    /// certificate must parse (and be usable as an anchor) and every CRL must parse: a bundle
    /// entry that cannot take effect is refused, not skipped.
    pub fn from_bundle(bundle: &TrustBundle) -> Result<Self, ProfileError> {
        let unusable = |index: usize, e: String| {
            ProfileError::ParseTrustBundle(format!(
                "certificate {} of the bundle is not usable as a trust anchor: {e}",
                index + 1
            ))
        };
        let mut entries = Vec::with_capacity(bundle.certificates.len());
        for (index, der) in bundle.certificates.iter().enumerate() {
            let anchor = webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                .map(|anchor| anchor.to_owned())
                .map_err(|e| unusable(index, e.to_string()))?;
            let (_, cert) =
                X509Certificate::from_der(der).map_err(|e| unusable(index, e.to_string()))?;
            entries.push(BundleEntry {
                subject: cert.subject().as_raw().to_vec(),
                issuer: cert.issuer().as_raw().to_vec(),
                anchor,
            });
        }
        let mut anchors = Vec::new();
        let mut intermediates = Vec::new();
        let mut issuers = Vec::new();
        for (index, entry) in entries.iter().enumerate() {
            let others = || {
                entries
                    .iter()
                    .enumerate()
                    .filter(move |(other, _)| *other != index)
                    .map(|(_, other)| other)
            };
            let has_parent = !entry.self_issued() && others().any(|o| o.subject == entry.issuer);
            let signs_a_ca = others().any(|o| !o.self_issued() && o.issuer == entry.subject);
            if has_parent {
                intermediates.push(CertificateDer::from(bundle.certificates[index].clone()));
            } else {
                anchors.push(entry.anchor.clone());
            }
            if !signs_a_ca {
                issuers.push(PinnedIssuer::of_anchor(&entry.anchor));
            }
        }
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
            intermediates,
            issuers,
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
            intermediates: self.intermediates.clone(),
            issuers: self.issuers.clone(),
            algorithms: self.algorithms,
        }
    }

    /// The bundle's roots: its certificates whose issuer is not in the bundle.
    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// The bundle's CRLs as DER, as they were in the bundle.
    pub fn crls(&self) -> &[CertificateRevocationListDer<'static>] {
        &self.crl_ders
    }

    /// How many of the bundle's CA certificates may sign leaves.
    pub fn issuer_count(&self) -> usize {
        self.issuers.len()
    }

    fn is_pinned_issuer(&self, subject: &[u8], spki: &[u8]) -> bool {
        self.issuers
            .iter()
            .any(|issuer| issuer.subject == subject && issuer.spki == spki)
    }

    /// Whether the certificate that signed the leaf of `path` is an issuing CA of the bundle.
    fn leaf_issuer_is_pinned(&self, path: &VerifiedPath<'_>) -> bool {
        match path.intermediate_certificates().next() {
            Some(issuer) => {
                self.is_pinned_issuer(issuer.subject(), issuer.subject_public_key_info().as_ref())
            }
            None => {
                let anchor = path.anchor();
                self.is_pinned_issuer(
                    anchor.subject.as_ref(),
                    webpki::spki_for_anchor(anchor).as_ref(),
                )
            }
        }
    }
}

/// A certificate of the bundle, named as X.509 names it (x509-parser's raw DER names, compared
/// with each other only) and as an anchor.
struct BundleEntry {
    subject: Vec<u8>,
    issuer: Vec<u8>,
    anchor: TrustAnchor<'static>,
}

impl BundleEntry {
    /// A root in the bundle's sense: its own issuer. A CA renewed under the same name is two
    /// such roots, neither the other's parent.
    fn self_issued(&self) -> bool {
        self.subject == self.issuer
    }
}

/// A CA that may sign leaves: its subject (DER without the outer tag, as rustls-webpki gives it
/// for certificates and anchors alike) and its SubjectPublicKeyInfo (DER, with the outer tag).
/// Both together: another CA with the same name but another key is not this one.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PinnedIssuer {
    subject: Vec<u8>,
    spki: Vec<u8>,
}

impl PinnedIssuer {
    fn of_anchor(anchor: &TrustAnchor<'_>) -> Self {
        Self {
            subject: anchor.subject.as_ref().to_vec(),
            spki: webpki::spki_for_anchor(anchor).as_ref().to_vec(),
        }
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
    #[error(
        "the certificate was not signed by an issuing CA of the trust bundle: its chain ends at a root of the bundle, but through a CA the bundle does not publish as issuing (another intermediate under the same root, or the root itself)"
    )]
    UnpinnedIssuer,
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
/// anchor of `trust` through an issuing CA of the bundle, is valid at `now` for `usage`, and that
/// no certificate of the chain is revoked by the bundle's CRLs (see the module comment for the
/// policy). Identity (SPIFFE ID, role) is not looked at here: see [`crate::inspect`].
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
    // The bundle's own intermediates (issuing CAs under a root) need not be sent by the peer.
    let joined: Vec<CertificateDer<'_>>;
    let candidates = if trust.intermediates.is_empty() {
        intermediates
    } else {
        joined = intermediates
            .iter()
            .map(|der| CertificateDer::from(der.as_ref()))
            .chain(
                trust
                    .intermediates
                    .iter()
                    .map(|der| CertificateDer::from(der.as_ref())),
            )
            .collect();
        joined.as_slice()
    };
    // Checked as each candidate path is complete, so that path building goes on to another path
    // (e.g. through the pinned CA rather than a same-named sibling) when one fails the pin.
    let unpinned = Cell::new(false);
    let pinned = |path: &VerifiedPath<'_>| {
        if trust.leaf_issuer_is_pinned(path) {
            Ok(())
        } else {
            unpinned.set(true);
            // rustls-webpki takes only its own errors here; this one ranks with revocation, so it
            // is what the caller sees unless another path failed for a weightier reason.
            Err(webpki::Error::CertDistrusted)
        }
    };
    match cert.verify_for_usage(
        trust.algorithms,
        &trust.anchors,
        candidates,
        now,
        usage.key_usage(),
        revocation,
        Some(&pinned),
    ) {
        Ok(_) => Ok(()),
        Err(webpki::Error::CertDistrusted) if unpinned.get() => Err(ChainError::UnpinnedIssuer),
        Err(error) => Err(error.into()),
    }
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

/// Whether `der` is a CA certificate that the holder of the key `spki` (SubjectPublicKeyInfo DER)
/// made for itself: its key is that key, it names itself as issuer, and its signature verifies
/// under that key. Only the key's holder can produce one, so a certificate found in a place others
/// can write (a ConfigMap) proves by this alone that the signer made it, whatever else that place
/// holds. The signature is rustls-webpki's to check.
pub fn self_signed_by(der: &[u8], spki: &[u8]) -> bool {
    let Ok((rest, cert)) = X509Certificate::from_der(der) else {
        return false;
    };
    if !rest.is_empty()
        || cert.public_key().raw != spki
        || cert.subject().as_raw() != cert.issuer().as_raw()
        || !cert.is_ca()
    {
        return false;
    }
    let certificate = CertificateDer::from(der);
    let Ok(parsed) = EndEntityCert::try_from(&certificate) else {
        return false;
    };
    let signed = cert.tbs_certificate.as_ref();
    let signature = cert.signature_value.data.as_ref();
    webpki::ALL_VERIFICATION_ALGS.iter().any(|algorithm| {
        parsed
            .verify_signature(*algorithm, signed, signature)
            .is_ok()
    })
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

        /// Another intermediate below `self` with the name of `like` but a key of its own.
        fn intermediate_named_like(&self, like: &Ca) -> Self {
            let key = generate_workload_key().unwrap();
            let params = like.params.clone();
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
        // The bundle as the controller publishes it for a user's root: the root and the
        // intermediate rolemesh issues with.
        let published = vec![root.der.clone(), intermediate.der.clone()];
        let sound = store(published.clone(), vec![root.crl(vec![], now)]);
        verify_chain_der(&chain, &sound, Usage::ServerAuth, unix(now)).unwrap();
        // The intermediate is in the bundle, yet not an anchor: the path still ends at the root,
        // whose CRL revokes it.
        let revoked = store(published, vec![root.crl(vec![intermediate_serial], now)]);
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
        // A peer that sends only its leaf still verifies: the bundle carries the intermediate.
        verify_chain_der(&chain[..1], &sound, Usage::ServerAuth, unix(now)).unwrap();
        // Without the intermediate anywhere the leaf has no path.
        let root_and_its_crl = store(vec![root.der.clone()], vec![root.crl(vec![], now)]);
        assert_eq!(
            verify_chain_der(&chain[..1], &root_and_its_crl, Usage::ServerAuth, unix(now)),
            Err(ChainError::UnknownIssuer)
        );
    }

    #[test]
    fn only_an_issuing_ca_of_the_bundle_may_sign_the_leaf() {
        let now = OffsetDateTime::now_utc();
        let root = Ca::root_of_intermediates(now);
        let ours = root.intermediate(now);
        // Another team's intermediate under the same root, even with our intermediate's name.
        let sibling = root.intermediate_named_like(&ours);
        let bundle = store(vec![root.der.clone(), ours.der.clone()], vec![]);
        let verify = |chain: &[Vec<u8>], trust: &TrustStore| {
            verify_chain_der(chain, trust, Usage::ClientAuth, unix(now))
        };
        let (leaf, _) = ours.leaf(now);
        verify(&[leaf.clone(), ours.der.clone()], &bundle).unwrap();
        // A well-formed leaf for our trust domain, chained to our root through the sibling.
        let (forged, _) = sibling.leaf(now);
        assert_eq!(
            verify(&[forged.clone(), sibling.der.clone()], &bundle),
            Err(ChainError::UnpinnedIssuer)
        );
        // Without the sibling in the chain the only candidate is ours, whose key did not sign it.
        assert_eq!(verify(&[forged], &bundle), Err(ChainError::BadSignature));
        // The root anchors our intermediate; it does not issue leaves of its own.
        let (by_root, _) = root.leaf(now);
        assert_eq!(verify(&[by_root], &bundle), Err(ChainError::UnpinnedIssuer));
        // A bundle of the root alone pins nothing but the root: it cannot tell our intermediate
        // from the sibling, so it admits neither.
        let root_only = store(vec![root.der.clone()], vec![]);
        assert_eq!(
            verify(&[leaf, ours.der.clone()], &root_only),
            Err(ChainError::UnpinnedIssuer)
        );
    }

    #[test]
    fn which_certificates_of_a_bundle_anchor_and_which_issue() {
        let now = OffsetDateTime::now_utc();
        let root = Ca::root_of_intermediates(now);
        let ours = root.intermediate(now);
        let self_signed = Ca::root("rolemesh CA", now);
        // A self-signed CA renewed under the same name: both issue, neither is the other's parent.
        let renewed = Ca::root("rolemesh CA", now);
        let roles = |certificates: Vec<Vec<u8>>| {
            let trust = store(certificates, vec![]);
            (trust.anchors().len(), trust.issuer_count())
        };
        assert_eq!(roles(vec![self_signed.der.clone()]), (1, 1));
        assert_eq!(
            roles(vec![renewed.der.clone(), self_signed.der.clone()]),
            (2, 2)
        );
        assert_eq!(roles(vec![ours.der.clone(), root.der.clone()]), (1, 1));
        // An intermediate given without its root is the anchor and the issuer.
        assert_eq!(roles(vec![ours.der.clone()]), (1, 1));
        let trust = store(vec![renewed.der.clone(), self_signed.der.clone()], vec![]);
        for ca in [&self_signed, &renewed] {
            let (leaf, _) = ca.leaf(now);
            verify_chain_der(&[&leaf], &trust, Usage::ClientAuth, unix(now)).unwrap();
        }
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

    /// Only a certificate made with the key itself counts as the key holder's own: one carrying
    /// the key and its own name but signed by someone else's key is anyone's to make.
    #[test]
    fn only_the_keys_own_self_signed_ca_is_self_signed_by_it() {
        use rcgen::PublicKeyData;
        let now = OffsetDateTime::now_utc();
        let ours = Ca::root("ours", now);
        let spki = ours.key.subject_public_key_info();
        assert!(self_signed_by(&ours.der, &spki));

        let stranger = Ca::root("stranger", now);
        assert!(!self_signed_by(&stranger.der, &spki), "another key");

        // Our key and name, signed by a stranger's key under the same name.
        let mut forger_params = named_ca_params("ours", now);
        forger_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let forger_key = generate_workload_key().unwrap();
        let forged = named_ca_params("ours", now)
            .signed_by(&ours.key, &Issuer::from_params(&forger_params, &forger_key))
            .unwrap()
            .der()
            .to_vec();
        assert_eq!(
            inspect_certificate_key(&forged),
            spki,
            "the forged certificate carries our key"
        );
        assert!(!self_signed_by(&forged, &spki), "signed by another key");

        // Our key under another issuer's name (an intermediate): not self-signed.
        let intermediate = named_ca_params("ours", now)
            .signed_by(&ours.key, &stranger.issuer())
            .unwrap()
            .der()
            .to_vec();
        assert!(!self_signed_by(&intermediate, &spki), "an intermediate");

        let (leaf, _) = ours.leaf(now);
        assert!(!self_signed_by(&leaf, &spki), "a leaf");
        assert!(!self_signed_by(&[0x30, 0x00], &spki), "not DER");
    }

    fn inspect_certificate_key(der: &[u8]) -> Vec<u8> {
        crate::inspect_certificate(der).unwrap().public_key_der
    }
}
