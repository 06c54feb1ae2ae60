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
use rolemesh_crds::{
    CaPhase, CaStatus, IdentityVerification, MTLSAuthority, MTLSAuthorityStatus, SignerType,
};
use rolemesh_profile::{
    CertificateInfo,
    inspect::{
        certificates_from_pem, crls_from_pem, inspect_crl, sha256_hex, trust_bundle_from_pem,
    },
    inspect_certificate, parse_duration,
    profile::{DEFAULT_CA_DURATION, ca_params, crl_params},
    self_signed_by,
};
use time::OffsetDateTime;
use tracing::info;

use crate::status::to_time;

use rolemesh_crds::names::{
    BLOCKED_ANNOTATION, CA_ACTIVATE_ANNOTATION, CA_CERT_KEY, CA_PREPARE_ANNOTATION,
    CA_RETIRE_ANNOTATION, CA_ROTATE_ANNOTATION, MANAGED_BY_LABEL, MANAGED_BY_VALUE,
    REVOKE_ANNOTATION_PREFIX,
};
use rustls_pki_types::CertificateDer;

use crate::{
    error::{Error, Result},
    metrics::Metrics,
    reverify::reverify_interval,
    rotation::{
        NewCa, Observed, ROTATION_POLL, Requests, next_look, plan, renewal_due, renewal_time,
    },
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
    /// Every CA of the bundle and its phase, the Active one first.
    pub cas: Vec<CaStatus>,
    /// The operator's requests acted on, for the status.
    pub last_rotate_request: Option<String>,
    pub last_prepare_request: Option<String>,
    /// When the CA should be looked at again: soon while a CA is Prepared or Retiring.
    pub next_look: Duration,
    /// Revoked workload serials (lowercase hex) and until when the CRLs list them.
    pub revoked: BTreeMap<String, OffsetDateTime>,
    /// ServiceAccounts that get no certificate, (namespace, name).
    pub blocked: BTreeSet<(String, String)>,
    /// Requests on the authority that were not carried out, and why (Warning Events).
    pub ignored: Vec<String>,
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
            .field("cas", &self.cas)
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

/// Whether `der` can be the CA the signer issues with: a CA certificate the signer's key signed
/// itself (a certificate that merely carries the key could be anyone's), for this trust domain,
/// valid now.
fn signs_for(
    der: &[u8],
    info: &CertificateInfo,
    signer: &dyn Signer,
    trust_domain: &str,
    now: OffsetDateTime,
) -> bool {
    info.is_ca
        && info.public_key_matches(signer.public_key_spki())
        && self_signed_by(der, signer.public_key_spki())
        && info
            .uri_sans
            .iter()
            .any(|u| u == &format!("spiffe://{trust_domain}"))
        && info.is_valid_at(now)
}

/// How long kubelet may take to bring a changed ConfigMap or Secret into running pods
/// (`spec.bundlePropagation`).
pub const DEFAULT_BUNDLE_PROPAGATION: Duration = Duration::from_secs(120);

/// ConfigMap `rolemesh-ca` key of the Prepared CA certificate, when there is one.
pub const NEXT_CA_KEY: &str = "next.crt";

fn record_of(der: &[u8], info: &CertificateInfo, phase: CaPhase, now: OffsetDateTime) -> CaStatus {
    CaStatus {
        fingerprint: sha256_hex(der),
        phase,
        subject: info.subject.clone(),
        not_after: to_time(info.not_after),
        since: to_time(now),
        settled_at: None,
        auto_activate: false,
    }
}

/// The operator's requests on `authority` that are not handled yet.
pub fn pending_requests(authority: &MTLSAuthority) -> Requests {
    let annotations = authority.metadata.annotations.clone().unwrap_or_default();
    let status = authority.status.clone().unwrap_or_default();
    let new = |key: &str, handled: &Option<String>| {
        annotations
            .get(key)
            .filter(|value| !value.is_empty() && Some(*value) != handled.as_ref())
            .cloned()
    };
    Requests {
        rotate: new(CA_ROTATE_ANNOTATION, &status.last_rotate_request),
        prepare: new(CA_PREPARE_ANNOTATION, &status.last_prepare_request),
        activate: annotations.get(CA_ACTIVATE_ANNOTATION).cloned(),
        retire: annotations.get(CA_RETIRE_ANNOTATION).cloned(),
    }
}

/// Establishes the CAs of `authority` and moves them through their phases ([`crate::rotation`]):
/// the user's CA when given (checked against the signer), else the self-signed CAs whose
/// certificates ConfigMap `rolemesh-ca` stores and whose phases the authority's status records.
/// A CA is made through the signer when none can sign (first start, other key, other trust
/// domain), when a rotation is asked for, and when the Active one nears the end of its life.
pub async fn establish_ca(
    client: &Client,
    namespace: &str,
    authority: &MTLSAuthority,
    aws: &aws_config::SdkConfig,
    metrics: &Metrics,
    observed: &dyn Observed,
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
    let propagation = match &authority.spec.bundle_propagation {
        Some(text) => {
            parse_duration(text).map_err(|e| invalid(format!("bundlePropagation: {e}")))?
        }
        None => DEFAULT_BUNDLE_PROPAGATION,
    };
    let ca_duration = match &authority.spec.ca_duration {
        Some(text) => parse_duration(text).map_err(|e| invalid(format!("caDuration: {e}")))?,
        None => DEFAULT_CA_DURATION,
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
    let parse = |pem: Option<String>| {
        pem.and_then(|pem| certificates_from_pem(&pem).ok())
            .unwrap_or_default()
    };
    let status = authority.status.clone().unwrap_or_default();
    // The status is the controller's to write, the ConfigMap anyone's who may edit ConfigMaps in
    // this namespace: a certificate is carried only when the status records its fingerprint (or,
    // for the self-signed CA, when the signer's key signed it).
    let recorded_bundle = parse(status.trust_bundle.clone());
    let stored_bundle = parse(stored(CA_BUNDLE_KEY));
    let mut known: Vec<Vec<u8>> = Vec::new();
    for der in recorded_bundle
        .iter()
        .chain(parse(stored(CA_CERT_KEY)).iter())
        .chain(parse(stored(NEXT_CA_KEY)).iter())
        .chain(&stored_bundle)
    {
        if !known.contains(der) {
            known.push(der.clone());
        }
    }
    let find = |fingerprint: &str| known.iter().find(|der| sha256_hex(der) == fingerprint);

    // The recorded phases, each with its certificate; expired or vanished CAs leave.
    let mut records = status.cas.clone();
    if records.is_empty() {
        // Before phases were recorded: the stored self-signed CA is the Active one and every
        // other CA the status recorded is Retiring.
        if authority.spec.ca.is_none()
            && let Some(der) = parse(stored(CA_CERT_KEY)).into_iter().next()
            && let Ok(info) = inspect_certificate(&der)
            && signs_for(&der, &info, signer.as_ref(), &trust_domain, now)
        {
            records.push(record_of(&der, &info, CaPhase::Active, now));
        }
        for der in &recorded_bundle {
            if let Ok(info) = inspect_certificate(der)
                && info.is_ca
                && !records.iter().any(|r| r.fingerprint == sha256_hex(der))
            {
                records.push(record_of(der, &info, CaPhase::Retiring, now));
            }
        }
    }
    let mut ders: Vec<(CaStatus, Vec<u8>)> = Vec::new();
    for mut record in records {
        let Some(der) = find(&record.fingerprint).cloned() else {
            continue;
        };
        let Ok(info) = inspect_certificate(&der) else {
            continue;
        };
        if !info.is_valid_at(now) {
            continue;
        }
        if record.phase != CaPhase::Retiring {
            let can_sign = authority.spec.ca.is_none()
                && signs_for(&der, &info, signer.as_ref(), &trust_domain, now);
            if !can_sign {
                if record.phase == CaPhase::Prepared {
                    continue;
                }
                // It cannot sign any more (the signer, trust domain or spec.ca changed), but
                // what it signed stays trusted while it is re-issued.
                record.phase = CaPhase::Retiring;
                record.since = to_time(now);
                record.settled_at = None;
            }
        }
        ders.push((record, der));
    }

    let mut user_chain: Vec<Vec<u8>> = Vec::new();
    let mut user_crls: Vec<Vec<u8>> = Vec::new();
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
        if let Some(pem) = &user.chain {
            user_chain =
                certificates_from_pem(pem).map_err(|e| user_err(format!("ca.chain: {e}")))?;
        }
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
            }
            user_crls = crls;
        }
        let fingerprint = sha256_hex(&ca_der);
        // The root above the CA and its chain are published with it; a recorded copy of one of
        // them is no CA of ours to retire.
        ders.retain(|(record, der)| record.fingerprint == fingerprint || !user_chain.contains(der));
        match ders
            .iter_mut()
            .find(|(record, _)| record.fingerprint == fingerprint)
        {
            Some((record, _)) => {
                if record.phase != CaPhase::Active {
                    *record = record_of(&ca_der, &info, CaPhase::Active, now);
                }
            }
            None => ders.insert(0, (record_of(&ca_der, &info, CaPhase::Active, now), ca_der)),
        }
    } else if !ders.iter().any(|(r, _)| r.phase == CaPhase::Active) {
        // Nothing signs: a Prepared CA is the best there is (its bundle went out first),
        // else a new one is made below.
        if let Some((record, _)) = ders.iter_mut().find(|(r, _)| r.phase == CaPhase::Prepared) {
            record.phase = CaPhase::Active;
            record.since = to_time(now);
            record.settled_at = None;
        }
    }

    let staged = authority.spec.ca.is_none();
    let requests = pending_requests(authority);
    let records: Vec<CaStatus> = ders.iter().map(|(r, _)| r.clone()).collect();
    let active_life = ders
        .iter()
        .find(|(r, _)| r.phase == CaPhase::Active)
        .and_then(|(_, der)| inspect_certificate(der).ok())
        .map(|info| (info.not_before, info.not_after));
    let renewal =
        staged && active_life.is_some_and(|(from, to)| renewal_due(from, to, propagation, now));
    let mut plan = plan(
        &records,
        &requests,
        observed,
        renewal,
        staged,
        propagation,
        now,
    );
    let mut new_ca = plan.new_ca;
    if staged && active_life.is_none() {
        new_ca = Some(NewCa::Active);
    }
    let mut ders: Vec<(CaStatus, Vec<u8>)> = plan
        .cas
        .drain(..)
        .filter_map(|record| {
            let der = ders
                .iter()
                .find(|(r, _)| r.fingerprint == record.fingerprint)?
                .1
                .clone();
            Some((record, der))
        })
        .collect();
    if let Some(kind) = new_ca {
        // One Sign call through the signer.
        let params = ca_params(&trust_domain, ca_duration, now);
        let der = sign_certificate(&signer, move |key| {
            Ok(params.self_signed(key)?.der().to_vec())
        })
        .await?;
        let info = inspect_certificate(&der).map_err(|e| Error::BuildCertificate(e.to_string()))?;
        let mut record = record_of(&der, &info, CaPhase::Prepared, now);
        match kind {
            NewCa::Prepared { auto_activate } => record.auto_activate = auto_activate,
            NewCa::Active => {
                for (other, _) in ders.iter_mut() {
                    if other.phase == CaPhase::Active {
                        other.phase = CaPhase::Retiring;
                        other.since = to_time(now);
                        other.settled_at = None;
                    }
                }
                record.phase = CaPhase::Active;
            }
        }
        info!(fingerprint = %record.fingerprint, phase = record.phase.as_str(), not_after = %info.not_after, signer = %signer.describe(), "issued a new self-signed CA certificate");
        ders.push((record, der));
    }
    // Active first, then Prepared, then Retiring: the order of `openssl x509` output and of the
    // status.
    ders.sort_by_key(|(record, _)| match record.phase {
        CaPhase::Active => 0,
        CaPhase::Prepared => 1,
        CaPhase::Retiring => 2,
    });
    let (active, ca_der) = ders
        .iter()
        .find(|(r, _)| r.phase == CaPhase::Active)
        .cloned()
        .ok_or_else(|| invalid("no CA can sign".into()))?;
    let active_info =
        inspect_certificate(&ca_der).map_err(|e| Error::BuildCertificate(e.to_string()))?;

    // The chain after the leaf: the CA and, for a user's CA, the chain above it. The bundle: the
    // Active CA and that chain, then the other CAs in force. A user's root (last of the chain;
    // without a chain the CA itself) anchors, and the CA is published as the one that issues,
    // being the only certificate of the bundle that signs no other of it
    // (rolemesh_profile::verify): publishing the root alone would let any other intermediate
    // under it sign identities of this trust domain.
    let mut chain_pem = pem_of(&ca_der);
    for der in &user_chain {
        chain_pem.push_str(&pem_of(der));
    }
    let mut certificates_pem = chain_pem.clone();
    for (record, der) in &ders {
        if record.phase != CaPhase::Active {
            certificates_pem.push_str(&pem_of(der));
        }
    }
    let mut bundle_pem = certificates_pem.clone();
    for der in &user_crls {
        bundle_pem.push_str(&pem_encode("X509 CRL", der));
    }
    let revocations = revocation_requests(authority, now);
    let recorded_crls = status
        .trust_bundle
        .as_deref()
        .and_then(|pem| trust_bundle_from_pem(pem).ok())
        .map(|bundle| bundle.crls)
        .unwrap_or_default();
    let mut crl_failures = Vec::new();
    for (record, der) in &ders {
        match crl_of(
            record,
            der,
            &signer,
            &revocations.serials,
            &recorded_crls,
            now,
        )
        .await
        {
            Ok(Some(crl)) => bundle_pem.push_str(&pem_encode("X509 CRL", &crl)),
            Ok(None) => {}
            Err(error) => crl_failures.push(format!(
                "could not sign the CRL of CA {}: {error}",
                record.fingerprint
            )),
        }
    }
    let refused = refused_certificates(
        &stored_bundle,
        &known_fingerprints(&status, &ders),
        &user_chain,
    );

    let mut data = existing
        .as_ref()
        .and_then(|cm| cm.data.clone())
        .unwrap_or_default();
    data.insert(CA_BUNDLE_KEY.to_string(), certificates_pem);
    if staged {
        data.insert(CA_CERT_KEY.to_string(), pem_of(&ca_der));
        match ders.iter().find(|(r, _)| r.phase == CaPhase::Prepared) {
            Some((_, der)) => data.insert(NEXT_CA_KEY.to_string(), pem_of(der)),
            None => data.remove(NEXT_CA_KEY),
        };
    }
    if existing.as_ref().and_then(|cm| cm.data.as_ref()) != Some(&data) {
        store_ca_configmap(&api, namespace, existing.as_ref(), data).await?;
    }
    let cas: Vec<CaStatus> = ders.into_iter().map(|(record, _)| record).collect();
    Ok(CaState {
        fingerprint: active.fingerprint.clone(),
        not_after: active_info.not_after,
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
        revoked: revocations.serials,
        blocked: revocations.blocked,
        ignored: revocations
            .ignored
            .into_iter()
            .chain(crl_failures.iter().cloned())
            .collect(),
        // A CRL that could not be signed is tried again soon.
        next_look: if !crl_failures.is_empty() || cas.iter().any(|ca| ca.phase != CaPhase::Active) {
            ROTATION_POLL
        } else {
            let renewal_at = staged
                .then(|| renewal_time(active_info.not_before, active_info.not_after, propagation));
            next_look(CA_RECHECK, renewal_at, now)
        },
        cas,
        last_rotate_request: requests.rotate.clone().or(status.last_rotate_request),
        last_prepare_request: requests.prepare.clone().or(status.last_prepare_request),
    })
}

/// How long a CRL the controller signs promises to be current (its nextUpdate); it is signed
/// anew when half of that has passed. Proxies keep enforcing a CRL past its nextUpdate.
pub const CRL_LIFE: Duration = Duration::from_secs(7 * 24 * 3600);

/// What the authority's annotations ask to revoke and block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Revocations {
    /// Revoked serials (lowercase hex) and until when they are listed.
    pub serials: BTreeMap<String, OffsetDateTime>,
    /// Blocked ServiceAccounts, (namespace, name).
    pub blocked: BTreeSet<(String, String)>,
    /// Annotations that were ignored, and why.
    pub ignored: Vec<String>,
}

/// Reads the `revoke.rolemesh.dev/<serial>` and `rolemesh.dev/blocked-service-accounts`
/// annotations of `authority`; revocations whose certificate has expired are left out.
pub fn revocation_requests(authority: &MTLSAuthority, now: OffsetDateTime) -> Revocations {
    let mut revocations = Revocations::default();
    let annotations = authority.metadata.annotations.clone().unwrap_or_default();
    for (key, value) in &annotations {
        let Some(serial) = key.strip_prefix(REVOKE_ANNOTATION_PREFIX) else {
            continue;
        };
        let serial = serial.to_ascii_lowercase();
        if serial.is_empty()
            || serial.len() > 40
            || serial.len() % 2 != 0
            || !serial.bytes().all(|b| b.is_ascii_hexdigit())
        {
            revocations.ignored.push(format!(
                "annotation {key}: {serial:?} is not a certificate serial (an even number of hex digits, 40 at most, as kubectl rolemesh status shows it)"
            ));
            continue;
        }
        match OffsetDateTime::parse(value.trim(), &time::format_description::well_known::Rfc3339) {
            Ok(not_after) if not_after > now => {
                revocations.serials.insert(serial, not_after);
            }
            Ok(_) => {}
            Err(error) => revocations.ignored.push(format!(
                "annotation {key}: {value:?} is not the certificate's notAfter as an RFC 3339 time ({error})"
            )),
        }
    }
    if let Some(list) = annotations.get(BLOCKED_ANNOTATION) {
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            match entry.split_once('/') {
                Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => {
                    revocations
                        .blocked
                        .insert((namespace.to_string(), name.to_string()));
                }
                _ => revocations.ignored.push(format!(
                    "annotation {BLOCKED_ANNOTATION}: {entry:?} is not <namespace>/<serviceaccount>"
                )),
            }
        }
    }
    revocations
}

/// The CRL a CA publishes: `None` when nothing is revoked or the CA is only Prepared (it signed
/// nothing) or is not the signer's (a CA of an earlier signer key cannot sign any more); the one
/// the status recorded when it lists the same serials and is not half way to its nextUpdate;
/// else a new one signed through the signer (one Sign call).
async fn crl_of(
    record: &CaStatus,
    ca_der: &[u8],
    signer: &Arc<dyn Signer>,
    serials: &BTreeMap<String, OffsetDateTime>,
    recorded: &[Vec<u8>],
    now: OffsetDateTime,
) -> Result<Option<Vec<u8>>> {
    if serials.is_empty() || record.phase == CaPhase::Prepared {
        return Ok(None);
    }
    let info = inspect_certificate(ca_der).map_err(|e| Error::BuildCertificate(e.to_string()))?;
    if !info.public_key_matches(signer.public_key_spki()) {
        return Ok(None);
    }
    let wanted: Vec<String> = serials.keys().cloned().collect();
    let fresh = |crl: &Vec<u8>| {
        inspect_crl(crl).is_ok_and(|crl| {
            let mut listed = crl.serials.clone();
            listed.sort();
            crl.issuer == record.subject
                && listed == wanted
                && crl.next_update.is_some_and(|next| {
                    next - now > time::Duration::try_from(CRL_LIFE / 2).unwrap_or_default()
                })
        })
    };
    if let Some(crl) = recorded.iter().find(|crl| fresh(crl)) {
        return Ok(Some(crl.clone()));
    }
    let revoked: Vec<rcgen::SerialNumber> = wanted
        .iter()
        .filter_map(|hex| hex::decode(hex).ok())
        .map(|bytes| rcgen::SerialNumber::from_slice(&bytes))
        .collect();
    // The CRL number only has to grow: the signing time does, across leaders too.
    let number = u64::try_from(now.unix_timestamp()).unwrap_or_default();
    let params = crl_params(revoked, number, now, CRL_LIFE);
    let ca_der = ca_der.to_vec();
    let crl = sign_certificate(signer, move |key| {
        let issuer =
            rcgen::Issuer::from_ca_cert_der(&CertificateDer::from(ca_der.as_slice()), key)?;
        Ok(params.signed_by(&issuer)?.der().to_vec())
    })
    .await?;
    // Parsed as the proxies parse it before it goes out.
    webpki::OwnedCertRevocationList::from_der(&crl)
        .map_err(|e| Error::BuildCertificate(format!("the signed CRL does not parse: {e}")))?;
    info!(ca = %record.fingerprint, revoked = wanted.len(), "signed a CRL");
    Ok(Some(crl))
}

/// How often the CA is re-checked even when nothing changed (to renew it before it expires).
pub const CA_RECHECK: Duration = Duration::from_secs(300);

/// Fingerprints of the certificates that are rolemesh's: the CAs in force and every certificate
/// the status recorded as published.
fn known_fingerprints(
    status: &MTLSAuthorityStatus,
    cas: &[(CaStatus, Vec<u8>)],
) -> BTreeSet<String> {
    let mut known: BTreeSet<String> = cas.iter().map(|(r, _)| r.fingerprint.clone()).collect();
    known.extend(status.cas.iter().map(|r| r.fingerprint.clone()));
    if let Some(pem) = &status.trust_bundle
        && let Ok(certificates) = certificates_from_pem(pem)
    {
        known.extend(certificates.iter().map(|der| sha256_hex(der)));
    }
    known
}

/// The certificates of the stored copy that are none of rolemesh's: left out, so that planting
/// one in ConfigMap `rolemesh-ca` adds no trust anchor, and reported by fingerprint.
fn refused_certificates(
    stored: &[Vec<u8>],
    known: &BTreeSet<String>,
    user_chain: &[Vec<u8>],
) -> Vec<RefusedCertificate> {
    let mut refused: Vec<RefusedCertificate> = Vec::new();
    for der in stored {
        let fingerprint = sha256_hex(der);
        if known.contains(&fingerprint)
            || user_chain.contains(der)
            || refused.iter().any(|r| r.fingerprint == fingerprint)
        {
            continue;
        }
        // An expired certificate leaves whoever put it there.
        let Ok(info) = inspect_certificate(der) else {
            continue;
        };
        if !info.is_valid_at(OffsetDateTime::now_utc()) {
            continue;
        }
        refused.push(RefusedCertificate {
            fingerprint,
            subject: info.subject,
        });
    }
    refused
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
    use rolemesh_profile::profile::generate_workload_key;

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

    /// A write to ConfigMap rolemesh-ca must not add a trust anchor: a stranger's CA, and one
    /// that carries the signer's key but was signed by another key (anyone can make that), are
    /// left out and reported by fingerprint; the CAs the status records and the user's chain are
    /// not.
    #[test]
    fn a_foreign_ca_planted_in_the_stored_bundle_is_refused() {
        let now = OffsetDateTime::now_utc();
        let signer = generate_workload_key().expect("key");
        let current = ca_der("current", &signer, now, DEFAULT_CA_DURATION);
        let stranger_key = generate_workload_key().expect("key");
        let stranger = ca_der("stranger", &stranger_key, now, DEFAULT_CA_DURATION);
        let root = ca_der("user root", &stranger_key, now, DEFAULT_CA_DURATION);
        let forger_params = ca_params_named("current", now, DEFAULT_CA_DURATION);
        let forged = ca_params_named("forged", now, DEFAULT_CA_DURATION)
            .signed_by(
                &signer,
                &rcgen::Issuer::from_params(&forger_params, &stranger_key),
            )
            .expect("forged")
            .der()
            .to_vec();
        let expired = ca_der(
            "expired",
            &stranger_key,
            now - time::Duration::days(2),
            Duration::from_secs(3600),
        );
        let stored = vec![
            current.clone(),
            stranger.clone(),
            forged.clone(),
            root.clone(),
            expired,
        ];
        let known = BTreeSet::from([sha256_hex(&current)]);
        let refused = refused_certificates(&stored, &known, std::slice::from_ref(&root));
        assert_eq!(
            refused
                .iter()
                .map(|r| r.fingerprint.clone())
                .collect::<Vec<_>>(),
            vec![sha256_hex(&stranger), sha256_hex(&forged)]
        );
        assert!(refused[0].subject.contains("stranger"), "{refused:?}");
    }

    /// Only a CA the signer's key signed itself, for this trust domain, can be the signing CA.
    #[test]
    fn only_the_signers_own_ca_of_this_trust_domain_signs() {
        use rcgen::PublicKeyData;
        let now = OffsetDateTime::now_utc();
        let key = generate_workload_key().expect("key");
        let signer = crate::signer::LocalSigner::from_pem(
            &key.serialize_pem(),
            "test key".into(),
            Metrics::new(),
        )
        .expect("signer");
        let other = generate_workload_key().expect("key");
        let ours = ca_der("ours", &key, now, DEFAULT_CA_DURATION);
        let theirs = ca_der("theirs", &other, now, DEFAULT_CA_DURATION);
        let check = |der: &Vec<u8>, trust_domain: &str| {
            let info = inspect_certificate(der).expect("CA");
            signs_for(der, &info, &signer, trust_domain, now)
        };
        assert!(check(&ours, "mesh.test"));
        assert!(!check(&ours, "other.test"));
        assert!(!check(&theirs, "mesh.test"));
        assert_eq!(signer.public_key_spki(), key.subject_public_key_info());
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
