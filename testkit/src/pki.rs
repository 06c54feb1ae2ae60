//! Certificate fixtures made by the project's own profile (`rolemesh_profile`) and signed with
//! rcgen in the test: CAs, intermediates, leaves (optionally spoiled in one way) and CRLs. No
//! committed certificate blobs.

use std::time::Duration;

use rcgen::{CertificateParams, Issuer, KeyPair, SanType};
use rolemesh_profile::{
    CertificateProfile, SpiffeId, WorkloadIdentity, inspect_certificate,
    profile::{ca_params, crl_params, generate_workload_key},
};
use time::OffsetDateTime;

/// The trust domain of leaves made by [`Ca::leaf`], whatever the CA's own trust domain: a CA of
/// another domain then signs a leaf that claims this one.
pub const TRUST_DOMAIN: &str = "rolemesh.test";
/// The namespace in the SPIFFE ID of leaves made by [`Ca::leaf`] and [`Ca::leaf_with`].
pub const NAMESPACE: &str = "shop";

/// A CA in the rolemesh profile (or a root of intermediates) that signs leaves and CRLs.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pub pem: String,
    /// For an intermediate, its certificate: every leaf's chain carries it after the leaf.
    chain_suffix: String,
}

/// A signed leaf: its chain (leaf first) and key as PEM, and its serial.
pub struct Leaf {
    pub chain_pem: String,
    pub key_pem: String,
    pub serial_hex: String,
    pub serial: Option<rcgen::SerialNumber>,
}

const CA_LIFETIME: Duration = Duration::from_secs(30 * 86400);

impl Ca {
    /// A self-signed CA of `trust_domain` as the controller makes one.
    pub fn new(trust_domain: &str) -> Ca {
        let key = generate_workload_key().expect("a P-256 key");
        let params = ca_params(trust_domain, CA_LIFETIME, OffsetDateTime::now_utc());
        let pem = params.self_signed(&key).expect("self-signed CA").pem();
        Ca {
            params,
            key,
            pem,
            chain_suffix: String::new(),
        }
    }

    /// A CA with the subject of `other` but a key of its own: an impostor a peer finds as the
    /// issuer by name, whose signature then fails.
    pub fn impostor_of(other: &Ca) -> Ca {
        let key = generate_workload_key().expect("a P-256 key");
        let params = other.params.clone();
        let pem = params.self_signed(&key).expect("self-signed CA").pem();
        Ca {
            params,
            key,
            pem,
            chain_suffix: String::new(),
        }
    }

    /// A root that may sign intermediates (the profile's CA may sign only leaves), as a user's
    /// offline root would.
    pub fn root_of_intermediates(trust_domain: &str) -> Ca {
        let mut ca = Ca::new(trust_domain);
        ca.params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // A name of its own: an intermediate with the root's name would look self-signed.
        ca.params.distinguished_name = rcgen::DistinguishedName::new();
        ca.params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "offline root");
        ca.pem = ca
            .params
            .self_signed(&ca.key)
            .expect("self-signed root")
            .pem();
        ca
    }

    /// An intermediate CA in the rolemesh profile signed by this root; its leaves carry it.
    pub fn intermediate(&self, trust_domain: &str) -> Ca {
        let key = generate_workload_key().expect("a P-256 key");
        let params = ca_params(trust_domain, CA_LIFETIME, OffsetDateTime::now_utc());
        let pem = params
            .signed_by(&key, &self.issuer())
            .expect("intermediate signed by the root")
            .pem();
        Ca {
            params,
            key,
            chain_suffix: pem.clone(),
            pem,
        }
    }

    pub fn serial(&self) -> rcgen::SerialNumber {
        self.params
            .serial_number
            .clone()
            .expect("ca_params sets a serial")
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }

    /// A leaf from the rolemesh profile for `spiffe://td/ns/namespace/sa/sa` with `role`, valid
    /// for `localhost`, with `tweak` applied to make it bad in one way.
    pub fn leaf_in(
        &self,
        td: &str,
        namespace: &str,
        sa: &str,
        role: &str,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> Leaf {
        let spiffe_id = SpiffeId::new(td, namespace, sa).expect("a valid SPIFFE ID");
        let identity = WorkloadIdentity::new(spiffe_id, role).expect("a valid identity");
        let mut params = CertificateProfile::default()
            .leaf_params(
                &identity,
                &["localhost".to_string()],
                OffsetDateTime::now_utc(),
            )
            .expect("leaf parameters");
        tweak(&mut params);
        let serial = params.serial_number.clone();
        let key = generate_workload_key().expect("a P-256 key");
        let cert = params
            .signed_by(&key, &self.issuer())
            .expect("leaf signed by the CA");
        let serial_hex = inspect_certificate(cert.der())
            .expect("our own leaf parses")
            .serial_hex;
        Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.chain_suffix),
            key_pem: key.serialize_pem(),
            serial_hex,
            serial,
        }
    }

    /// [`Ca::leaf_in`] namespace [`NAMESPACE`].
    pub fn leaf_with(
        &self,
        td: &str,
        sa: &str,
        role: &str,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> Leaf {
        self.leaf_in(td, NAMESPACE, sa, role, tweak)
    }

    /// A good leaf of [`TRUST_DOMAIN`] and [`NAMESPACE`].
    pub fn leaf(&self, sa: &str, role: &str) -> Leaf {
        self.leaf_with(TRUST_DOMAIN, sa, role, |_| {})
    }

    /// A CRL signed by this CA that revokes `revoked`, as a bundle would carry it (PEM).
    pub fn crl(&self, revoked: &[&Leaf]) -> String {
        self.crl_of(
            revoked
                .iter()
                .map(|leaf| leaf.serial.clone().expect("the profile sets a serial"))
                .collect(),
        )
    }

    /// A CRL signed by this CA that revokes the certificates with these serials (PEM).
    pub fn crl_of(&self, serials: Vec<rcgen::SerialNumber>) -> String {
        crl_params(
            serials,
            1,
            OffsetDateTime::now_utc(),
            Duration::from_secs(86400),
        )
        .signed_by(&self.issuer())
        .expect("CRL signed by the CA")
        .pem()
        .expect("CRL as PEM")
    }
}

/// Adds a URI SAN (a second SPIFFE ID, say) to leaf parameters.
pub fn add_uri_san(params: &mut CertificateParams, uri: &str) {
    params.subject_alt_names.push(SanType::URI(
        uri.to_string().try_into().expect("an IA5 URI"),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rolemesh_profile::inspect::certificates_from_pem;

    #[test]
    fn a_leaf_names_its_identity_and_an_intermediate_rides_in_its_chain() {
        let root = Ca::root_of_intermediates("kit.test");
        let intermediate = root.intermediate("kit.test");
        let leaf = intermediate.leaf("web", "arn:aws:iam::111122223333:role/web");
        let chain = certificates_from_pem(&leaf.chain_pem).unwrap();
        assert_eq!(chain.len(), 2);
        let info = inspect_certificate(&chain[0]).unwrap();
        assert_eq!(
            info.uri_sans,
            vec![format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/web")]
        );
        assert_eq!(info.serial_hex, leaf.serial_hex);
        assert!(inspect_certificate(&chain[1]).unwrap().is_ca);
    }

    #[test]
    fn distinct_leaves_have_distinct_serials_and_a_crl_is_pem() {
        let ca = Ca::new("kit.test");
        let a = ca.leaf("a", "arn:aws:iam::111122223333:role/a");
        let b = ca.leaf("b", "arn:aws:iam::111122223333:role/b");
        assert_ne!(a.serial_hex, b.serial_hex);
        assert!(ca.crl(&[&a]).starts_with("-----BEGIN X509 CRL-----"));
    }
}
