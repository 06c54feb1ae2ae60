//! The workload's certificate, key and trust bundle: read from the mounted Secret and ConfigMap,
//! validated as a set, turned into the TLS configurations every listener uses, and reloaded when
//! the files change.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rolemesh_profile::{
    ChainError, TrustStore, Usage, WorkloadIdentity,
    inspect::{certificates_from_pem, inspect_certificate, trust_bundle_from_pem},
    proxy_config::{CallerIdentity, ProxyConfig, TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY},
    verify_chain,
};
use rustls::{
    ClientConfig, ServerConfig, client::Resumption, crypto::CryptoProvider,
    server::NoServerSessionStorage, sign::CertifiedKey, version::TLS13,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};

use tracing::{error, info, warn};

use crate::{
    ProxyError,
    rules::RulesHandle,
    state::Shared,
    verify::{PeerClientVerifier, UpstreamVerifier},
};

/// The raw bytes of one certificate set as found on disk.
#[derive(Clone, PartialEq, Eq)]
pub struct FileSet {
    pub cert_chain: Vec<u8>,
    pub key: Vec<u8>,
    pub trust_bundle: Vec<u8>,
}

impl fmt::Debug for FileSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSet")
            .field("cert_chain_len", &self.cert_chain.len())
            .field("key", &"<redacted>")
            .field("trust_bundle_len", &self.trust_bundle.len())
            .finish()
    }
}

/// Paths of the three files.
#[derive(Clone, Debug)]
pub struct MaterialPaths {
    pub cert_chain: PathBuf,
    pub key: PathBuf,
    pub trust_bundle: PathBuf,
}

impl MaterialPaths {
    pub fn from_config(config: &ProxyConfig) -> Self {
        Self {
            cert_chain: config.identity_dir.join(TLS_CERT_KEY),
            key: config.identity_dir.join(TLS_PRIVATE_KEY_KEY),
            trust_bundle: config.trust_bundle.clone(),
        }
    }

    /// Reads the set. The chain is read again at the end: if it changed, kubelet swapped the
    /// directory while we were reading and the set may mix two versions, so the caller retries.
    pub fn read(&self) -> Result<Option<FileSet>, ProxyError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| ProxyError::ReadMaterial {
                path: path.to_path_buf(),
                source,
            })
        };
        let cert_chain = read(&self.cert_chain)?;
        let key = read(&self.key)?;
        let trust_bundle = read(&self.trust_bundle)?;
        if read(&self.cert_chain)? != cert_chain {
            return Ok(None);
        }
        Ok(Some(FileSet {
            cert_chain,
            key,
            trust_bundle,
        }))
    }
}

/// A validated certificate set.
pub struct Material {
    pub certified_key: Arc<CertifiedKey>,
    /// The bundle's CAs and CRLs. The CRLs are enforced on peers, never on our own certificate:
    /// a bundle that revokes it must still be taken, so that peers are checked against it.
    pub trust: Arc<TrustStore>,
    /// The bundle's CRLs revoke a certificate of our own chain: peers will refuse us.
    pub own_chain_revoked: bool,
    pub identity: WorkloadIdentity,
    pub serial_hex: String,
    pub not_after_unix: i64,
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("identity", &self.identity)
            .field("serial_hex", &self.serial_hex)
            .field("not_after_unix", &self.not_after_unix)
            .field("anchors", &self.trust.anchors().len())
            .field("crls", &self.trust.crls().len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Material {
    /// Parses and checks a set: the key is the certificate's, the certificate chains to the
    /// bundle now, and it carries a rolemesh identity in `trust_domain`.
    pub fn validate(
        files: &FileSet,
        trust_domain: &str,
        provider: &CryptoProvider,
    ) -> Result<Self, ProxyError> {
        let invalid =
            |what: &str, e: &dyn fmt::Display| ProxyError::ValidateMaterial(format!("{what}: {e}"));
        let chain_pem = std::str::from_utf8(&files.cert_chain)
            .map_err(|e| invalid("tls.crt is not text", &e))?;
        let chain: Vec<CertificateDer<'static>> = certificates_from_pem(chain_pem)
            .map_err(|e| invalid(TLS_CERT_KEY, &e))?
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let bundle_pem = std::str::from_utf8(&files.trust_bundle)
            .map_err(|e| invalid("trust bundle is not text", &e))?;
        let bundle = trust_bundle_from_pem(bundle_pem).map_err(|e| invalid("trust bundle", &e))?;
        let trust = TrustStore::from_bundle(&bundle)
            .map_err(|e| invalid("trust bundle", &e))?
            .with_algorithms(provider.signature_verification_algorithms.all);
        let key = PrivateKeyDer::from_pem_slice(&files.key)
            .map_err(|e| invalid(TLS_PRIVATE_KEY_KEY, &e))?;
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| invalid(TLS_PRIVATE_KEY_KEY, &e))?;
        let certified_key = CertifiedKey::new(chain, signing_key);
        certified_key
            .keys_match()
            .map_err(|e| invalid("tls.key does not belong to tls.crt", &e))?;
        let leaf = certified_key
            .end_entity_cert()
            .map_err(|e| invalid(TLS_CERT_KEY, &e))?;
        let intermediates = certified_key.cert.get(1..).unwrap_or_default();
        let now = UnixTime::now();
        verify_chain(
            leaf,
            intermediates,
            &trust.without_crls(),
            Usage::ServerAuth,
            now,
        )
        .map_err(|e| invalid("tls.crt does not chain to the trust bundle", &e))?;
        // The verdict a peer holding this bundle reaches on us; only worth a warning (see `trust`).
        let own_chain_revoked = !trust.crls().is_empty()
            && matches!(
                verify_chain(leaf, intermediates, &trust, Usage::ServerAuth, now),
                Err(ChainError::Revoked)
            );
        let info = inspect_certificate(leaf).map_err(|e| invalid(TLS_CERT_KEY, &e))?;
        let identity = info
            .workload_identity()
            .map_err(|e| invalid(TLS_CERT_KEY, &e))?;
        if identity.spiffe_id.trust_domain() != trust_domain {
            return Err(ProxyError::ValidateMaterial(format!(
                "tls.crt is for {}, not in trust domain {trust_domain}",
                identity.spiffe_id
            )));
        }
        Ok(Self {
            certified_key: Arc::new(certified_key),
            trust: Arc::new(trust),
            own_chain_revoked,
            identity,
            serial_hex: info.serial_hex,
            not_after_unix: info.not_after.unix_timestamp(),
        })
    }
}

/// The TLS configurations built from one [`Material`], one per mapping, swapped as a whole on
/// reload so that every handshake sees a consistent certificate, key and bundle.
#[derive(Debug)]
pub struct TlsConfigs {
    pub material: Material,
    pub inbound: Vec<Arc<ServerConfig>>,
    pub outbound: Vec<Arc<ClientConfig>>,
}

impl TlsConfigs {
    pub fn build(
        material: Material,
        config: &ProxyConfig,
        provider: &Arc<CryptoProvider>,
        rules: &RulesHandle,
    ) -> Result<Self, ProxyError> {
        let build_err = |e: rustls::Error| ProxyError::BuildTls(e.to_string());
        let mut inbound = Vec::with_capacity(config.inbound.len());
        for index in 0..config.inbound.len() {
            let verifier = PeerClientVerifier::new(
                material.trust.clone(),
                provider.clone(),
                &config.trust_domain,
                rules.clone(),
                index,
            );
            let mut server = ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&TLS13])
                .map_err(build_err)?
                .with_client_cert_verifier(Arc::new(verifier))
                .with_cert_resolver(Arc::new(AlwaysResolvesServerCert(
                    material.certified_key.clone(),
                )));
            // Every connection is a full handshake that re-checks the peer against the current
            // bundle and policy; a session cache would also cost memory in every pod.
            server.session_storage = Arc::new(NoServerSessionStorage {});
            server.send_tls13_tickets = 0;
            if config.inbound[index].caller_identity == CallerIdentity::Http {
                // The proxy speaks HTTP on this listener itself, so it can say which versions;
                // a peer that offers no ALPN (another rolemesh proxy) is still served, and an
                // HTTP/2 peer without ALPN is detected by its connection preface.
                server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            }
            inbound.push(Arc::new(server));
        }
        let mut outbound = Vec::with_capacity(config.outbound.len());
        for index in 0..config.outbound.len() {
            let verifier = UpstreamVerifier::new(
                material.trust.clone(),
                provider.clone(),
                &config.trust_domain,
                rules.clone(),
                index,
            );
            let mut client = ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&TLS13])
                .map_err(build_err)?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_client_cert_resolver(Arc::new(AlwaysResolvesClientCert(
                    material.certified_key.clone(),
                )));
            client.resumption = Resumption::disabled();
            outbound.push(Arc::new(client));
        }
        Ok(Self {
            material,
            inbound,
            outbound,
        })
    }
}

/// Follows the mounted files: each new set is validated and, if good, taken into use for every
/// new handshake; a bad set is refused and the one in use kept.
pub struct Reloader {
    paths: MaterialPaths,
    /// The last set read from disk, taken into use or not: each new set is judged (and a
    /// refusal logged) once.
    last_seen: Option<FileSet>,
    read_error_logged: bool,
}

impl Reloader {
    pub fn new(paths: MaterialPaths) -> Self {
        Self {
            paths,
            last_seen: None,
            read_error_logged: false,
        }
    }

    pub fn poll(&mut self, shared: &Shared) {
        let files = match self.paths.read() {
            Ok(Some(files)) => files,
            // Swapped while reading; the next poll sees a consistent set.
            Ok(None) => return,
            Err(error) => {
                if !self.read_error_logged {
                    warn!(%error, "cannot read the certificate files; keeping what is in use");
                    self.read_error_logged = true;
                }
                return;
            }
        };
        self.read_error_logged = false;
        if self.last_seen.as_ref() == Some(&files) {
            return;
        }
        let result = Material::validate(&files, &shared.config.trust_domain, &shared.provider)
            .and_then(|material| {
                TlsConfigs::build(material, &shared.config, &shared.provider, &shared.rules)
            });
        self.last_seen = Some(files);
        match result {
            Ok(configs) => {
                let material = &configs.material;
                info!(
                    serial = %material.serial_hex,
                    spiffe_id = %material.identity.spiffe_id,
                    role_arn = %material.identity.role_arn,
                    not_after = material.not_after_unix,
                    "certificate set loaded"
                );
                if material.own_chain_revoked {
                    warn!(
                        serial = %material.serial_hex,
                        "a CRL in the trust bundle revokes this workload's own certificate chain; peers holding the same bundle will refuse it until it is re-issued under a CA that is not revoked"
                    );
                }
                shared.metrics.set_not_after(material.not_after_unix);
                shared.metrics.reload(true);
                shared.use_tls(configs);
            }
            Err(error) => {
                shared.metrics.reload(false);
                let in_use = shared.with_tls(|c| c.material.serial_hex.clone());
                error!(%error, serial_in_use = ?in_use, "certificate set refused; keeping the one in use");
            }
        }
    }
}

#[derive(Debug)]
struct AlwaysResolvesClientCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for AlwaysResolvesClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct AlwaysResolvesServerCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for AlwaysResolvesServerCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rolemesh_profile::{
        CertificateProfile, SpiffeId,
        profile::{ca_params, crl_params, generate_workload_key},
    };
    use time::OffsetDateTime;

    const TD: &str = "rolemesh.test";

    /// A valid file set whose bundle is the CA plus `extra`; `revoke_own` adds a CRL of the CA
    /// that revokes the set's own certificate.
    fn files(extra: &str, revoke_own: bool) -> FileSet {
        let now = OffsetDateTime::now_utc();
        let ca_key = generate_workload_key().unwrap();
        let ca = ca_params(TD, std::time::Duration::from_secs(86400), now);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
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
        let leaf = params.signed_by(&key, &issuer).unwrap();
        let mut bundle = format!("{ca_pem}{extra}");
        if revoke_own {
            let crl = crl_params(vec![serial], 7, now, std::time::Duration::from_secs(86400));
            bundle.push_str(&crl.signed_by(&issuer).unwrap().pem().unwrap());
        }
        FileSet {
            cert_chain: leaf.pem().into_bytes(),
            key: key.serialize_pem().into_bytes(),
            trust_bundle: bundle.into_bytes(),
        }
    }

    fn validate(files: &FileSet) -> Result<Material, ProxyError> {
        Material::validate(files, TD, &rustls::crypto::aws_lc_rs::default_provider())
    }

    #[test]
    fn a_bundle_that_revokes_our_own_certificate_is_still_taken_for_its_crl() {
        let material = validate(&files("", true)).unwrap();
        assert_eq!(material.trust.crls().len(), 1);
        assert!(material.own_chain_revoked);
        let material = validate(&files("", false)).unwrap();
        assert!(material.trust.crls().is_empty() && !material.own_chain_revoked);
    }

    #[test]
    fn a_crl_that_does_not_parse_refuses_the_set_and_says_which() {
        let garbage = "-----BEGIN X509 CRL-----\nAAECAwQF\n-----END X509 CRL-----\n";
        let error = validate(&files(garbage, false)).unwrap_err().to_string();
        assert!(
            error.contains("CRL 1 of the bundle does not parse"),
            "{error}"
        );
    }

    #[test]
    fn a_block_the_bundle_may_not_hold_refuses_the_set() {
        let key = generate_workload_key().unwrap().serialize_pem();
        let error = validate(&files(&key, false)).unwrap_err().to_string();
        assert!(
            error.contains("unexpected PEM block \"PRIVATE KEY\""),
            "{error}"
        );
    }
}
