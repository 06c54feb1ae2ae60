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
    self_signed_by,
};
use time::OffsetDateTime;
use tracing::info;

use rolemesh_crds::names::{CA_CERT_KEY, MANAGED_BY_LABEL, MANAGED_BY_VALUE};

use crate::{
    error::{Error, Result},
    metrics::Metrics,
    reverify::reverify_interval,
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
    /// How often STS is asked again about a workload it confirmed (`spec.reverifyInterval`).
    pub reverify_interval: Duration,
    pub fingerprint: String,
    pub not_after: OffsetDateTime,
    /// The MTLSAuthority generation this state was built from.
    pub generation: Option<i64>,
    /// Certificates found in the stored bundle that are not rolemesh's and were left out.
    pub refused: Vec<RefusedCertificate>,
}

/// A certificate of ConfigMap `rolemesh-ca` that did not enter the bundle: neither made by the
/// signer, nor named by the authority, nor recorded in the authority's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedCertificate {
    pub fingerprint: String,
    pub subject: String,
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
    der: &[u8],
    info: &CertificateInfo,
    signer: &dyn Signer,
    trust_domain: &str,
    now: OffsetDateTime,
) -> bool {
    let life = info.not_after - info.not_before;
    info.is_ca
        && info.public_key_matches(signer.public_key_spki())
        // A certificate that merely carries the signer's key could be anyone's: only one the key
        // signed itself is the CA rolemesh made.
        && self_signed_by(der, signer.public_key_spki())
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
    let reverify_interval =
        reverify_interval(authority.spec.reverify_interval.as_deref()).map_err(&invalid)?;

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
    // What the controller itself last published: the status is the controller's to write, the
    // ConfigMap anyone's who may edit ConfigMaps in this namespace.
    let recorded = authority
        .status
        .as_ref()
        .and_then(|status| status.trust_bundle.clone());
    let earlier = |current: Vec<Vec<u8>>| {
        with_earlier_cas(
            current,
            &EarlierCas {
                recorded: recorded.as_deref(),
                stored: stored(CA_BUNDLE_KEY).as_deref(),
                signer_spki: signer.public_key_spki(),
            },
            now,
        )
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
        let (certificates, refused) = earlier(chain_ders);
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
            reverify_interval,
            generation: authority.metadata.generation,
            refused,
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
        && usable_ca(&der, &info, signer.as_ref(), &trust_domain, now)
    {
        let (certificates, refused) = earlier(vec![der.clone()]);
        let bundle_pem: String = certificates.iter().map(|d| pem_of(d)).collect();
        if stored(CA_BUNDLE_KEY).as_deref() != Some(bundle_pem.as_str()) {
            let mut data = existing
                .as_ref()
                .and_then(|cm| cm.data.clone())
                .unwrap_or_default();
            data.insert(CA_BUNDLE_KEY.to_string(), bundle_pem.clone());
            store_ca_configmap(&api, namespace, existing.as_ref(), data).await?;
        }
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
            reverify_interval,
            generation: authority.metadata.generation,
            refused,
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
    let (certificates, refused) = earlier(vec![ca_der.clone()]);
    let bundle_pem: String = certificates.iter().map(|der| pem_of(der)).collect();
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
        reverify_interval,
        generation: authority.metadata.generation,
        refused,
    })
}

/// How often the CA is re-checked even when nothing changed (to roll it before it expires).
pub const CA_RECHECK: Duration = Duration::from_secs(300);

/// Where earlier CA certificates may come from, and how one of rolemesh's is told apart.
struct EarlierCas<'a> {
    /// The bundle the controller last published (the authority's `status.trustBundle`).
    recorded: Option<&'a str>,
    /// `bundle.crt` of ConfigMap `rolemesh-ca`: a copy anyone who may edit ConfigMaps in
    /// rolemesh's namespace can write, so what it holds proves nothing by itself.
    stored: Option<&'a str>,
    /// The signer's public key: every self-signed CA rolemesh makes (renewals too) is signed by it.
    signer_spki: &'a [u8],
}

/// `current` (the CA in force and the chain the authority names above it), then every earlier
/// CA certificate still valid at `now` that is rolemesh's: recorded in the authority's status, or
/// self-signed by the signer's key. An earlier issuing CA thus stays an issuing CA of the bundle
/// (it signs no other certificate of it) until it expires. Any other certificate of the stored
/// copy is left out and returned, so that planting one there adds no trust anchor.
fn with_earlier_cas(
    current: Vec<Vec<u8>>,
    sources: &EarlierCas<'_>,
    now: OffsetDateTime,
) -> (Vec<Vec<u8>>, Vec<RefusedCertificate>) {
    let parse = |pem: Option<&str>| {
        pem.and_then(|pem| certificates_from_pem(pem).ok())
            .unwrap_or_default()
    };
    let recorded = parse(sources.recorded);
    let stored = parse(sources.stored);
    let mut certificates = current;
    let mut refused = Vec::new();
    for der in recorded.iter().chain(&stored) {
        if certificates.contains(der) {
            continue;
        }
        let Ok(info) = inspect_certificate(der) else {
            continue;
        };
        // An expired certificate leaves whoever put it there.
        if !info.is_valid_at(now) {
            continue;
        }
        let ours =
            info.is_ca && (recorded.contains(der) || self_signed_by(der, sources.signer_spki));
        if ours {
            certificates.push(der.clone());
        } else {
            let fingerprint = sha256_hex(der);
            if !refused
                .iter()
                .any(|r: &RefusedCertificate| r.fingerprint == fingerprint)
            {
                refused.push(RefusedCertificate {
                    fingerprint,
                    subject: info.subject,
                });
            }
        }
    }
    (certificates, refused)
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

    fn ca_params_named(
        name: &str,
        now: OffsetDateTime,
        life: Duration,
    ) -> rcgen::CertificateParams {
        let mut params = ca_params("mesh.test", life, now);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params
    }

    fn ca_der(name: &str, key: &rcgen::KeyPair, now: OffsetDateTime, life: Duration) -> Vec<u8> {
        ca_params_named(name, now, life)
            .self_signed(key)
            .expect("CA")
            .der()
            .to_vec()
    }

    fn pem_list(ders: &[&Vec<u8>]) -> String {
        ders.iter().map(|der| pem_of(der)).collect()
    }

    /// Genuine earlier CAs stay while valid: a renewal of the self-signed CA (the signer's key),
    /// and a CA under another key the controller published before (recorded in the status, as
    /// after a change of spec.ca or of the signer). Expired ones go.
    #[test]
    fn earlier_cas_stay_in_the_bundle_while_valid() {
        use rcgen::PublicKeyData;
        let now = OffsetDateTime::now_utc();
        let signer = generate_workload_key().expect("key");
        let spki = signer.subject_public_key_info();
        let current = ca_der("current", &signer, now, DEFAULT_CA_DURATION);
        let renewed_from = ca_der("earlier", &signer, now, DEFAULT_CA_DURATION);
        let previous_key = generate_workload_key().expect("key");
        let previous = ca_der("previous", &previous_key, now, DEFAULT_CA_DURATION);
        let expired = ca_der(
            "expired",
            &signer,
            now - time::Duration::days(2),
            Duration::from_secs(3600),
        );
        let stored = pem_list(&[&current, &renewed_from, &previous, &expired]);
        // The recorded bundle is a published one: CRLs follow its certificates.
        let crl = rolemesh_profile::profile::crl_params(vec![], 1, now, Duration::from_secs(3600))
            .signed_by(&rcgen::Issuer::from_params(
                &ca_params_named("previous", now, DEFAULT_CA_DURATION),
                &previous_key,
            ))
            .expect("CRL")
            .pem()
            .expect("CRL PEM");
        let recorded = format!("{}{crl}", pem_list(&[&previous]));
        let sources = EarlierCas {
            recorded: Some(&recorded),
            stored: Some(&stored),
            signer_spki: &spki,
        };
        let (bundle, refused) = with_earlier_cas(vec![current.clone()], &sources, now);
        assert_eq!(
            bundle,
            vec![current.clone(), previous.clone(), renewed_from.clone()]
        );
        assert!(refused.is_empty(), "{refused:?}");
        // All still issue: none signs another.
        let pem: String = bundle.iter().map(|der| pem_of(der)).collect();
        assert_eq!(
            TrustStore::from_pem(&pem).expect("bundle").issuer_count(),
            3
        );
        // The recorded bundle alone suffices: the ConfigMap may be gone.
        let only_recorded = EarlierCas {
            recorded: Some(&recorded),
            stored: None,
            signer_spki: &spki,
        };
        assert_eq!(
            with_earlier_cas(vec![current.clone()], &only_recorded, now).0,
            vec![current.clone(), previous]
        );
        let nothing = EarlierCas {
            recorded: None,
            stored: None,
            signer_spki: &spki,
        };
        assert_eq!(
            with_earlier_cas(vec![current.clone()], &nothing, now).0,
            vec![current]
        );
    }

    /// A write to ConfigMap rolemesh-ca must not add a trust anchor: a stranger's CA, and one
    /// that carries the signer's key but was signed by another key (anyone can make that), are
    /// left out and reported by fingerprint.
    #[test]
    fn a_foreign_ca_planted_in_the_stored_bundle_is_not_carried() {
        use rcgen::PublicKeyData;
        let now = OffsetDateTime::now_utc();
        let signer = generate_workload_key().expect("key");
        let spki = signer.subject_public_key_info();
        let current = ca_der("current", &signer, now, DEFAULT_CA_DURATION);
        let stranger_key = generate_workload_key().expect("key");
        let stranger = ca_der("stranger", &stranger_key, now, DEFAULT_CA_DURATION);
        let forger_params = ca_params_named("current", now, DEFAULT_CA_DURATION);
        let forged = ca_params_named("forged", now, DEFAULT_CA_DURATION)
            .signed_by(
                &signer,
                &rcgen::Issuer::from_params(&forger_params, &stranger_key),
            )
            .expect("forged")
            .der()
            .to_vec();
        let stored = pem_list(&[&current, &stranger, &forged]);
        let recorded = pem_list(&[&current]);
        let sources = EarlierCas {
            recorded: Some(&recorded),
            stored: Some(&stored),
            signer_spki: &spki,
        };
        let (bundle, refused) = with_earlier_cas(vec![current.clone()], &sources, now);
        assert_eq!(bundle, vec![current]);
        assert_eq!(
            refused
                .iter()
                .map(|r| r.fingerprint.clone())
                .collect::<Vec<_>>(),
            vec![sha256_hex(&stranger), sha256_hex(&forged)]
        );
        assert!(refused[0].subject.contains("stranger"), "{refused:?}");
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
