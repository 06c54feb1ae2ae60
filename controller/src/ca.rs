//! The CA in force: its signer, its certificate, the chain that goes into every `tls.crt`, and
//! the trust bundle of every CA certificate still in force.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use rolemesh_crds::{IdentityVerification, MTLSAuthority, SignerType};
use rolemesh_profile::{
    CertificateInfo,
    inspect::{certificates_from_pem, crls_from_pem, sha256_hex},
    inspect_certificate, parse_duration,
    profile::{DEFAULT_CA_DURATION, ca_params},
};
use time::OffsetDateTime;
use tracing::info;

use rolemesh_crds::names::{CA_CERT_KEY, MANAGED_BY_LABEL, MANAGED_BY_VALUE};

use crate::{
    error::{Error, Result},
    metrics::Metrics,
    signer::{KmsSigner, LocalSigner, RcgenKey, Signer},
};

/// ConfigMap in rolemesh's namespace holding the self-signed CA (`ca.crt`) and every CA
/// certificate still trusted (`bundle.crt`).
pub const CA_CONFIGMAP: &str = "rolemesh-ca";
pub const CA_BUNDLE_KEY: &str = "bundle.crt";

/// Everything needed to sign workload certificates.
#[derive(Clone)]
pub struct CaState {
    pub signer: Arc<dyn Signer>,
    pub ca_der: Vec<u8>,
    /// PEM appended after the leaf in `tls.crt`: the CA certificate and any chain above it.
    pub chain_pem: String,
    /// PEM of every CA certificate in force, the content of `ca.crt` and the trust bundles.
    pub bundle_pem: String,
    pub trust_domain: String,
    pub verification: IdentityVerification,
    /// The AWS accounts whose roles may be certified (`spec.allowedAccounts`); `None`: any.
    pub allowed_accounts: Option<BTreeSet<String>>,
    pub fingerprint: String,
    pub not_after: OffsetDateTime,
    /// The MTLSAuthority generation this state was built from.
    pub generation: Option<i64>,
}

impl fmt::Debug for CaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaState")
            .field("signer", &self.signer.describe())
            .field("trust_domain", &self.trust_domain)
            .field("fingerprint", &self.fingerprint)
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// The authority's `allowedAccounts` as a set; `None` when absent (any account).
pub fn allowed_accounts(authority: &MTLSAuthority) -> Option<BTreeSet<String>> {
    authority
        .spec
        .allowed_accounts
        .as_ref()
        .map(|accounts| accounts.iter().cloned().collect())
}

pub fn pem_of(der: &[u8]) -> String {
    pem_encode("CERTIFICATE", der)
}

fn pem_encode(tag: &str, der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {tag}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {tag}-----\n"));
    out
}

/// Builds the signer an MTLSAuthority names.
pub async fn connect_signer(
    client: &Client,
    namespace: &str,
    authority: &MTLSAuthority,
    aws: &aws_config::SdkConfig,
    metrics: &Metrics,
) -> Result<Arc<dyn Signer>> {
    let name = authority.metadata.name.clone().unwrap_or_default();
    let spec = &authority.spec.signer;
    match spec.signer_type {
        SignerType::Local => {
            let local = spec.local.as_ref().ok_or_else(|| Error::AuthorityInvalid {
                name: name.clone(),
                message: "signer.type is local but signer.local is missing".into(),
            })?;
            Ok(Arc::new(
                LocalSigner::load_or_create(client, namespace, &local.secret_name, metrics.clone())
                    .await?,
            ))
        }
        SignerType::Kms => {
            let kms = spec.kms.as_ref().ok_or_else(|| Error::AuthorityInvalid {
                name: name.clone(),
                message: "signer.type is kms but signer.kms is missing".into(),
            })?;
            let config = aws_sdk_kms::config::Builder::from(aws)
                .region(aws_sdk_kms::config::Region::new(kms.region.clone()))
                .retry_config(
                    aws_sdk_kms::config::retry::RetryConfig::standard().with_max_attempts(4),
                )
                .build();
            let client = aws_sdk_kms::Client::from_conf(config);
            Ok(Arc::new(
                KmsSigner::connect(client, &kms.key_id, metrics.clone()).await?,
            ))
        }
    }
}

/// Signs `params` with the CA signer on a blocking thread (rcgen's signing is synchronous).
pub async fn sign_certificate<T: Send + 'static>(
    signer: &Arc<dyn Signer>,
    build: impl FnOnce(&RcgenKey) -> std::result::Result<T, rcgen::Error> + Send + 'static,
) -> Result<T> {
    let key = RcgenKey::new(signer.clone(), tokio::runtime::Handle::current())?;
    tokio::task::spawn_blocking(move || {
        build(&key).map_err(|e| match key.take_error() {
            Some(signer_error) => signer_error,
            None => Error::BuildCertificate(e.to_string()),
        })
    })
    .await
    .map_err(|e| Error::BuildCertificate(format!("signing task failed: {e}")))?
}

fn usable_ca(
    info: &CertificateInfo,
    signer: &dyn Signer,
    trust_domain: &str,
    now: OffsetDateTime,
) -> bool {
    let life = info.not_after - info.not_before;
    info.is_ca
        && info.public_key_matches(signer.public_key_spki())
        && info.uri_sans.iter().any(|u| u == &format!("spiffe://{trust_domain}"))
        && info.is_valid_at(now)
        // Replace a self-signed CA in the last third of its life, well before leaves outlive it.
        && info.not_after - now > life / 3
}

/// Establishes the CA for `authority`: the user's CA when given (checked against the signer), or
/// the self-signed CA stored in ConfigMap `rolemesh-ca`, made anew through the signer when there
/// is none or it no longer fits (other key, other trust domain, last third of its life).
pub async fn establish_ca(
    client: &Client,
    namespace: &str,
    authority: &MTLSAuthority,
    aws: &aws_config::SdkConfig,
    metrics: &Metrics,
) -> Result<CaState> {
    let name = authority.metadata.name.clone().unwrap_or_default();
    let trust_domain = authority.spec.trust_domain.clone();
    let signer = connect_signer(client, namespace, authority, aws, metrics).await?;
    let now = OffsetDateTime::now_utc();
    let invalid = |message: String| Error::AuthorityInvalid {
        name: name.clone(),
        message,
    };

    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let existing = api
        .get_opt(CA_CONFIGMAP)
        .await
        .map_err(Error::kube(format!(
            "read ConfigMap {namespace}/{CA_CONFIGMAP}"
        )))?;
    let stored = |key: &str| {
        existing
            .as_ref()
            .and_then(|cm| cm.data.as_ref())
            .and_then(|d| d.get(key))
            .cloned()
    };

    if let Some(user) = &authority.spec.ca {
        let user_err = |message: String| Error::UserCa {
            authority: name.clone(),
            message,
        };
        let certs =
            certificates_from_pem(&user.certificate).map_err(|e| user_err(e.to_string()))?;
        let ca_der = certs
            .first()
            .cloned()
            .ok_or_else(|| user_err("ca.certificate holds no PEM certificate".into()))?;
        let info = inspect_certificate(&ca_der).map_err(|e| user_err(e.to_string()))?;
        if !info.is_ca {
            return Err(user_err(
                "ca.certificate is not a CA certificate (basicConstraints CA:TRUE)".into(),
            ));
        }
        if !info.public_key_matches(signer.public_key_spki()) {
            return Err(user_err(format!(
                "the public key of ca.certificate is not the key of the signer ({}); issue the CA certificate for that key",
                signer.describe()
            )));
        }
        if !info.is_valid_at(now) {
            return Err(user_err(format!(
                "ca.certificate is not valid now (valid {} to {})",
                info.not_before, info.not_after
            )));
        }
        let chain = match &user.chain {
            Some(pem) => {
                certificates_from_pem(pem).map_err(|e| user_err(format!("ca.chain: {e}")))?
            }
            None => Vec::new(),
        };
        let mut chain_pem = pem_of(&ca_der);
        for der in &chain {
            chain_pem.push_str(&pem_of(der));
        }
        // The bundle holds the CA rolemesh issues with and the chain above it: the root (last
        // of the chain; without a chain the CA itself) anchors, and the CA is published as the
        // one that issues, being the only certificate of the bundle that signs no other of it
        // (rolemesh_profile::verify). Publishing the root alone would let any other
        // intermediate under it sign identities of this trust domain.
        let chain_ders: Vec<Vec<u8>> = std::iter::once(ca_der.clone()).chain(chain).collect();
        // Earlier CAs stay while they are valid, as with the self-signed CA: leaves of the
        // previous intermediate keep working while they are re-issued under this one.
        let certificates = with_earlier_cas(chain_ders, stored(CA_BUNDLE_KEY).as_deref(), now);
        let mut bundle_pem: String = certificates.iter().map(|der| pem_of(der)).collect();
        let certificates_pem = bundle_pem.clone();
        if let Some(pem) = &user.crls {
            let crls = crls_from_pem(pem).map_err(|e| user_err(format!("ca.crls: {e}")))?;
            for (index, der) in crls.iter().enumerate() {
                // Parsed as the proxies will parse it, so a CRL they would refuse (and with it
                // the whole bundle) never reaches them.
                webpki::OwnedCertRevocationList::from_der(der).map_err(|e| {
                    user_err(format!(
                        "ca.crls: CRL {} does not parse: {e}; give PEM X509 CRL blocks",
                        index + 1
                    ))
                })?;
                bundle_pem.push_str(&pem_encode("X509 CRL", der));
            }
        }
        if stored(CA_BUNDLE_KEY).as_deref() != Some(certificates_pem.as_str()) {
            let mut data = existing
                .as_ref()
                .and_then(|cm| cm.data.clone())
                .unwrap_or_default();
            data.insert(CA_BUNDLE_KEY.to_string(), certificates_pem);
            store_ca_configmap(&api, namespace, existing.as_ref(), data).await?;
        }
        return Ok(CaState {
            fingerprint: sha256_hex(&ca_der),
            not_after: info.not_after,
            ca_der,
            chain_pem,
            bundle_pem,
            signer,
            trust_domain,
            verification: authority.spec.identity_verification,
            allowed_accounts: allowed_accounts(authority),
            generation: authority.metadata.generation,
        });
    }

    let ca_duration = match &authority.spec.ca_duration {
        Some(text) => parse_duration(text).map_err(|e| invalid(e.to_string()))?,
        None => DEFAULT_CA_DURATION,
    };
    if let Some(pem) = stored(CA_CERT_KEY)
        && let Some(der) = certificates_from_pem(&pem)
            .ok()
            .and_then(|c| c.into_iter().next())
        && let Ok(info) = inspect_certificate(&der)
        && usable_ca(&info, signer.as_ref(), &trust_domain, now)
    {
        let bundle_pem = stored(CA_BUNDLE_KEY).unwrap_or_else(|| pem_of(&der));
        return Ok(CaState {
            fingerprint: sha256_hex(&der),
            not_after: info.not_after,
            chain_pem: pem_of(&der),
            ca_der: der,
            bundle_pem,
            signer,
            trust_domain,
            verification: authority.spec.identity_verification,
            allowed_accounts: allowed_accounts(authority),
            generation: authority.metadata.generation,
        });
    }

    // A new self-signed CA, signed through the signer (one Sign call).
    let params = ca_params(&trust_domain, ca_duration, now);
    let ca_der = sign_certificate(&signer, move |key| {
        Ok(params.self_signed(key)?.der().to_vec())
    })
    .await?;
    let info = inspect_certificate(&ca_der).map_err(|e| Error::BuildCertificate(e.to_string()))?;
    // Keep every earlier CA that has not expired, so leaves signed by it stay trusted while they
    // are re-issued under the new one.
    let bundle_pem: String =
        with_earlier_cas(vec![ca_der.clone()], stored(CA_BUNDLE_KEY).as_deref(), now)
            .iter()
            .map(|der| pem_of(der))
            .collect();
    store_ca_configmap(
        &api,
        namespace,
        existing.as_ref(),
        BTreeMap::from([
            (CA_CERT_KEY.to_string(), pem_of(&ca_der)),
            (CA_BUNDLE_KEY.to_string(), bundle_pem.clone()),
        ]),
    )
    .await?;
    info!(fingerprint = %sha256_hex(&ca_der), not_after = %info.not_after, signer = %signer.describe(), "issued a new self-signed CA certificate");
    Ok(CaState {
        fingerprint: sha256_hex(&ca_der),
        not_after: info.not_after,
        chain_pem: pem_of(&ca_der),
        ca_der,
        bundle_pem,
        signer,
        trust_domain,
        verification: authority.spec.identity_verification,
        allowed_accounts: allowed_accounts(authority),
        generation: authority.metadata.generation,
    })
}

/// How often the CA is re-checked even when nothing changed (to roll it before it expires).
pub const CA_RECHECK: Duration = Duration::from_secs(300);

/// `current` (the CA in force and the chain above it), then every certificate of the stored
/// bundle that is not among them and still valid at `now`. An earlier issuing CA thus stays an
/// issuing CA of the bundle (it signs no other certificate of it) until it expires.
fn with_earlier_cas(
    current: Vec<Vec<u8>>,
    stored_bundle: Option<&str>,
    now: OffsetDateTime,
) -> Vec<Vec<u8>> {
    let mut certificates = current;
    let earlier = stored_bundle
        .and_then(|pem| certificates_from_pem(pem).ok())
        .unwrap_or_default();
    for der in earlier {
        if !certificates.contains(&der)
            && inspect_certificate(&der).is_ok_and(|i| i.is_valid_at(now))
        {
            certificates.push(der);
        }
    }
    certificates
}

/// Writes ConfigMap `rolemesh-ca` with `data`, replacing `existing` when there is one.
async fn store_ca_configmap(
    api: &Api<ConfigMap>,
    namespace: &str,
    existing: Option<&ConfigMap>,
    data: BTreeMap<String, String>,
) -> Result<()> {
    let configmap = ConfigMap {
        metadata: ObjectMeta {
            name: Some(CA_CONFIGMAP.into()),
            namespace: Some(namespace.into()),
            resource_version: existing.and_then(|cm| cm.metadata.resource_version.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY_VALUE.to_string(),
            )])),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    // Optimistic concurrency: if another writer got there first, the caller retries and loads it.
    if existing.is_some() {
        api.replace(CA_CONFIGMAP, &PostParams::default(), &configmap)
            .await
    } else {
        api.create(&PostParams::default(), &configmap).await
    }
    .map_err(Error::kube(format!(
        "store the CA certificates in ConfigMap {namespace}/{CA_CONFIGMAP}"
    )))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rolemesh_crds::names::TRUST_BUNDLE_CONFIGMAP;
    use rolemesh_profile::{TrustStore, profile::generate_workload_key};

    fn ca_der(name: &str, now: OffsetDateTime, life: Duration) -> Vec<u8> {
        let key = generate_workload_key().expect("key");
        let mut params = ca_params("mesh.test", life, now);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.self_signed(&key).expect("CA").der().to_vec()
    }

    #[test]
    fn earlier_cas_stay_in_the_bundle_while_valid() {
        let now = OffsetDateTime::now_utc();
        let current = ca_der("current", now, DEFAULT_CA_DURATION);
        let earlier = ca_der("earlier", now, DEFAULT_CA_DURATION);
        let expired = ca_der(
            "expired",
            now - time::Duration::days(2),
            Duration::from_secs(3600),
        );
        let stored: String = [&current, &earlier, &expired]
            .iter()
            .map(|der| pem_of(der))
            .collect();
        let bundle = with_earlier_cas(vec![current.clone()], Some(&stored), now);
        assert_eq!(bundle, vec![current.clone(), earlier.clone()]);
        // Both still issue: neither signs the other.
        let pem: String = bundle.iter().map(|der| pem_of(der)).collect();
        assert_eq!(
            TrustStore::from_pem(&pem).expect("bundle").issuer_count(),
            2
        );
        assert_eq!(
            with_earlier_cas(vec![current.clone()], None, now),
            vec![current]
        );
    }

    fn chart_template(name: &str) -> String {
        let path = format!(
            "{}/../charts/rolemesh/templates/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
    }

    /// The chart grants the controller its ConfigMaps by name: renaming one here without the
    /// chart would leave the controller unable to write it.
    #[test]
    fn the_chart_lets_the_controller_write_exactly_its_configmaps() {
        let rbac = chart_template("rbac.yaml");
        assert!(rbac.contains(&format!("resourceNames: [{TRUST_BUNDLE_CONFIGMAP}]")));
        assert!(rbac.contains(&format!("resourceNames: [{CA_CONFIGMAP}]")));
        let policy = chart_template("controller-admissionpolicy.yaml");
        assert!(policy.contains(&format!(
            "object.metadata.name == '{TRUST_BUNDLE_CONFIGMAP}'"
        )));
        assert!(policy.contains(&format!("object.metadata.name == '{CA_CONFIGMAP}'")));
    }
}
