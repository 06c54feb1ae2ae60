//! The webhook's serving certificate: issued by a webhook CA that rolemesh keeps in a Secret,
//! resolved per TLS handshake from an [`ArcSwap`] so it can be rotated without a restart, and the
//! `caBundle` of the MutatingWebhookConfiguration kept current.
//!
//! [`reconcile_webhook_tls`] is idempotent and safe to call concurrently from several processes
//! (the controller and every webhook replica): every write is conditional on the resourceVersion
//! read, and a loser of a race re-reads what the winner wrote.

use std::{collections::BTreeSet, fmt, net::IpAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use k8s_openapi::{
    ByteString, api::admissionregistration::v1::MutatingWebhookConfiguration, api::core::v1::Secret,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rolemesh_profile::profile::{BACKDATE, generate_workload_key, random_serial};
use rustls::{
    crypto::aws_lc_rs,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use time::OffsetDateTime;
use tracing::{info, warn};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::{
    error::{Error, Result},
    metrics::Metrics,
};

/// Secret (in rolemesh's namespace) holding the webhook CA: `ca.crt`, `ca.key`, and
/// `previous.crt` while a replaced CA is still trusted.
pub const DEFAULT_CA_SECRET: &str = "rolemesh-webhook-ca";
/// `kubernetes.io/tls` Secret (in rolemesh's namespace) holding the serving certificate.
pub const DEFAULT_SERVING_SECRET: &str = "rolemesh-webhook-tls";
/// Name of the MutatingWebhookConfiguration the chart installs.
pub const DEFAULT_WEBHOOK_CONFIGURATION: &str = "rolemesh-webhook";

const CA_CRT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const PREVIOUS_CRT: &str = "previous.crt";
const TLS_CRT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "rolemesh");

/// Where the webhook's TLS material lives and how long it lasts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookTlsConfig {
    /// rolemesh's namespace, holding both Secrets.
    pub namespace: String,
    pub ca_secret: String,
    pub serving_secret: String,
    /// The MutatingWebhookConfiguration whose webhooks' `caBundle` is kept current; `None` leaves
    /// it alone.
    pub webhook_configuration: Option<String>,
    /// DNS SANs of the serving certificate (the Service's names).
    pub dns_names: Vec<String>,
    /// IP SANs of the serving certificate (tests and `url:` registrations).
    pub ip_addresses: Vec<IpAddr>,
    pub ca_duration: Duration,
    pub cert_duration: Duration,
    /// Re-issue the serving certificate this long before it expires.
    pub renew_before: Duration,
}

impl WebhookTlsConfig {
    /// The defaults for a webhook behind Service `service` in `namespace`: a 5-year CA, 30-day
    /// serving certificates renewed 10 days before expiry, and the chart's
    /// MutatingWebhookConfiguration.
    pub fn for_service(namespace: &str, service: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            ca_secret: DEFAULT_CA_SECRET.to_string(),
            serving_secret: DEFAULT_SERVING_SECRET.to_string(),
            webhook_configuration: Some(DEFAULT_WEBHOOK_CONFIGURATION.to_string()),
            dns_names: vec![
                service.to_string(),
                format!("{service}.{namespace}"),
                format!("{service}.{namespace}.svc"),
                format!("{service}.{namespace}.svc.cluster.local"),
            ],
            ip_addresses: Vec::new(),
            ca_duration: Duration::from_secs(5 * 365 * 24 * 3600),
            cert_duration: Duration::from_secs(30 * 24 * 3600),
            renew_before: Duration::from_secs(10 * 24 * 3600),
        }
    }
}

/// The outcome of [`reconcile_webhook_tls`]: what to serve and what clients must trust.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookTls {
    /// PEM of every CA the API server must trust (the current CA, and the previous one while
    /// still valid): the `caBundle`.
    pub ca_bundle_pem: String,
    /// The serving certificate (leaf) in PEM.
    pub cert_pem: String,
    /// Its PKCS#8 private key in PEM.
    pub key_pem: String,
    pub serial_hex: String,
    pub not_after: OffsetDateTime,
    /// When the serving certificate is due for renewal.
    pub renew_at: OffsetDateTime,
    /// Whether this call changed the caBundle of the webhook configuration.
    pub ca_bundle_patched: bool,
    /// Whether this call issued a new serving certificate.
    pub issued: bool,
}

impl fmt::Debug for WebhookTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookTls")
            .field("serial_hex", &self.serial_hex)
            .field("not_after", &self.not_after)
            .field("renew_at", &self.renew_at)
            .field("ca_bundle_patched", &self.ca_bundle_patched)
            .field("issued", &self.issued)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Ensures the webhook CA Secret (creating it, or rotating a CA near its expiry while keeping the
/// old one trusted), ensures a valid serving certificate for the configured names in the serving
/// Secret (issuing or renewing it), and sets the `caBundle` of every webhook of the configured
/// MutatingWebhookConfiguration (if it exists). Idempotent; returns what to serve.
pub async fn reconcile_webhook_tls(
    client: &Client,
    config: &WebhookTlsConfig,
) -> Result<WebhookTls> {
    let secrets = Api::<Secret>::namespaced(client.clone(), &config.namespace);
    let now = OffsetDateTime::now_utc();
    let ca = ensure_ca(&secrets, config, now).await?;
    let mut tls = ensure_serving(&secrets, config, &ca, now).await?;
    if let Some(name) = &config.webhook_configuration {
        tls.ca_bundle_patched = patch_ca_bundle(client, name, &tls.ca_bundle_pem).await?;
    }
    Ok(tls)
}

struct CaMaterial {
    cert_pem: String,
    key_pem: String,
    #[allow(dead_code)]
    subject_raw: Vec<u8>,
    not_after: OffsetDateTime,
    /// Every CA still trusted, current first: (PEM, subject DER).
    trusted: Vec<(String, Vec<u8>)>,
}

impl CaMaterial {
    fn bundle(&self) -> String {
        self.trusted
            .iter()
            .map(|(pem, _)| pem.as_str())
            .collect::<Vec<_>>()
            .join("")
    }
}

fn secret_str(secret: &Secret, key: &str) -> Option<String> {
    let data = secret.data.as_ref()?.get(key)?;
    String::from_utf8(data.0.clone()).ok()
}

struct ParsedCert {
    subject_raw: Vec<u8>,
    issuer_raw: Vec<u8>,
    spki_raw: Vec<u8>,
    not_after: OffsetDateTime,
    serial_hex: String,
    dns: BTreeSet<String>,
    ips: BTreeSet<IpAddr>,
}

fn parse_cert(pem: &str) -> Result<ParsedCert> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| Error::Tls(format!("certificate PEM: {e}")))?;
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| Error::Tls(format!("certificate DER: {e}")))?;
    let mut dns = BTreeSet::new();
    let mut ips = BTreeSet::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => {
                    dns.insert((*d).to_string());
                }
                GeneralName::IPAddress(bytes) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                        ips.insert(IpAddr::from(v4));
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                        ips.insert(IpAddr::from(v6));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(ParsedCert {
        subject_raw: cert.subject().as_raw().to_vec(),
        issuer_raw: cert.issuer().as_raw().to_vec(),
        spki_raw: cert.public_key().raw.to_vec(),
        not_after: cert.validity().not_after.to_datetime(),
        serial_hex: cert.raw_serial_as_string().replace(':', ""),
        dns,
        ips,
    })
}

fn new_ca(config: &WebhookTlsConfig, now: OffsetDateTime) -> Result<(String, String)> {
    let key = generate_workload_key()?;
    let mut params = CertificateParams::default();
    params.not_before = now - BACKDATE;
    params.not_after = now + config.ca_duration;
    let serial = random_serial();
    let tag: String = serial
        .to_bytes()
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    params.serial_number = Some(serial);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "rolemesh");
    dn.push(DnType::CommonName, format!("rolemesh webhook CA {tag}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn ca_secret_object(
    config: &WebhookTlsConfig,
    cert: &str,
    key: &str,
    previous: Option<&str>,
) -> Secret {
    let mut data = std::collections::BTreeMap::from([
        (CA_CRT.to_string(), ByteString(cert.as_bytes().to_vec())),
        (CA_KEY.to_string(), ByteString(key.as_bytes().to_vec())),
    ]);
    if let Some(previous) = previous {
        data.insert(
            PREVIOUS_CRT.to_string(),
            ByteString(previous.as_bytes().to_vec()),
        );
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(config.ca_secret.clone()),
            namespace: Some(config.namespace.clone()),
            labels: Some([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(data),
        ..Secret::default()
    }
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

async fn ensure_ca(
    secrets: &Api<Secret>,
    config: &WebhookTlsConfig,
    now: OffsetDateTime,
) -> Result<CaMaterial> {
    let what = || {
        format!(
            "keeping the webhook CA Secret {}/{}",
            config.namespace, config.ca_secret
        )
    };
    for _ in 0..5 {
        let Some(existing) = secrets
            .get_opt(&config.ca_secret)
            .await
            .map_err(Error::kube(what()))?
        else {
            let (cert, key) = new_ca(config, now)?;
            match secrets
                .create(
                    &PostParams::default(),
                    &ca_secret_object(config, &cert, &key, None),
                )
                .await
            {
                Ok(_) => info!(secret = %config.ca_secret, "created the webhook CA"),
                Err(e) if is_conflict(&e) => {}
                Err(e) => return Err(Error::kube(what())(e)),
            }
            continue;
        };
        let (Some(cert_pem), Some(key_pem)) =
            (secret_str(&existing, CA_CRT), secret_str(&existing, CA_KEY))
        else {
            return Err(Error::Tls(format!(
                "Secret {}/{} lacks {CA_CRT} or {CA_KEY}; delete it to have rolemesh create a new CA",
                config.namespace, config.ca_secret
            )));
        };
        let parsed = parse_cert(&cert_pem)?;
        let life =
            time::Duration::try_from(config.ca_duration).unwrap_or(time::Duration::days(365));
        if now >= parsed.not_after - life / 3 {
            // Rotate: a new CA signs from now on; the old one stays trusted until it expires, so
            // serving certificates it signed keep working until their own renewal.
            let (cert, key) = new_ca(config, now)?;
            let mut replacement = ca_secret_object(config, &cert, &key, Some(&cert_pem));
            replacement.metadata.resource_version = existing.metadata.resource_version.clone();
            match secrets
                .replace(&config.ca_secret, &PostParams::default(), &replacement)
                .await
            {
                Ok(_) => info!(secret = %config.ca_secret, "rotated the webhook CA"),
                Err(e) if is_conflict(&e) => {}
                Err(e) => return Err(Error::kube(what())(e)),
            }
            continue;
        }
        let mut trusted = vec![(cert_pem.clone(), parsed.subject_raw.clone())];
        if let Some(previous) = secret_str(&existing, PREVIOUS_CRT)
            && let Ok(old) = parse_cert(&previous)
            && old.not_after > now
        {
            trusted.push((previous, old.subject_raw));
        }
        return Ok(CaMaterial {
            cert_pem,
            key_pem,
            subject_raw: parsed.subject_raw,
            not_after: parsed.not_after,
            trusted,
        });
    }
    Err(Error::Tls(format!(
        "{}: too many concurrent changes",
        what()
    )))
}

fn issue_serving(
    config: &WebhookTlsConfig,
    ca: &CaMaterial,
    now: OffsetDateTime,
) -> Result<(String, String)> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let key = generate_workload_key()?;
    let mut params = CertificateParams::default();
    params.not_before = now - BACKDATE;
    params.not_after = (now + config.cert_duration).min(ca.not_after);
    params.serial_number = Some(random_serial());
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        config
            .dns_names
            .first()
            .cloned()
            .unwrap_or_else(|| "rolemesh-webhook".to_string()),
    );
    params.distinguished_name = dn;
    for name in &config.dns_names {
        params.subject_alt_names.push(SanType::DnsName(
            name.clone()
                .try_into()
                .map_err(|_| Error::Config(format!("DNS name {name:?} is not valid")))?,
        ));
    }
    for ip in &config.ip_addresses {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Why the stored serving certificate cannot be used, if it cannot.
fn serving_problem(
    config: &WebhookTlsConfig,
    ca: &CaMaterial,
    cert_pem: &str,
    key_pem: &str,
    now: OffsetDateTime,
) -> Result<ParsedCert, String> {
    let parsed = parse_cert(cert_pem).map_err(|e| e.to_string())?;
    let key = KeyPair::from_pem(key_pem).map_err(|e| format!("key: {e}"))?;
    if rcgen::PublicKeyData::subject_public_key_info(&key) != parsed.spki_raw {
        return Err("key does not match certificate".into());
    }
    if !ca
        .trusted
        .iter()
        .any(|(_, subject)| *subject == parsed.issuer_raw)
    {
        return Err("not signed by a trusted webhook CA".into());
    }
    let want_dns: BTreeSet<String> = config.dns_names.iter().cloned().collect();
    let want_ips: BTreeSet<IpAddr> = config.ip_addresses.iter().copied().collect();
    if parsed.dns != want_dns || parsed.ips != want_ips {
        return Err("names differ from the configured ones".into());
    }
    if now >= renew_at(config, parsed.not_after) {
        return Err("due for renewal".into());
    }
    Ok(parsed)
}

fn renew_at(config: &WebhookTlsConfig, not_after: OffsetDateTime) -> OffsetDateTime {
    not_after - time::Duration::try_from(config.renew_before).unwrap_or(time::Duration::ZERO)
}

async fn ensure_serving(
    secrets: &Api<Secret>,
    config: &WebhookTlsConfig,
    ca: &CaMaterial,
    now: OffsetDateTime,
) -> Result<WebhookTls> {
    let what = || {
        format!(
            "keeping the serving Secret {}/{}",
            config.namespace, config.serving_secret
        )
    };
    let mut issued = false;
    for _ in 0..5 {
        let existing = secrets
            .get_opt(&config.serving_secret)
            .await
            .map_err(Error::kube(what()))?;
        if let Some(secret) = &existing
            && let (Some(cert_pem), Some(key_pem)) =
                (secret_str(secret, TLS_CRT), secret_str(secret, TLS_KEY))
        {
            match serving_problem(config, ca, &cert_pem, &key_pem, now) {
                Ok(parsed) => {
                    return Ok(WebhookTls {
                        ca_bundle_pem: ca.bundle(),
                        renew_at: renew_at(config, parsed.not_after),
                        not_after: parsed.not_after,
                        serial_hex: parsed.serial_hex,
                        cert_pem,
                        key_pem,
                        ca_bundle_patched: false,
                        issued,
                    });
                }
                Err(reason) => {
                    info!(secret = %config.serving_secret, %reason, "issuing a new serving certificate");
                }
            }
        }
        let (cert, key) = issue_serving(config, ca, now)?;
        let data = std::collections::BTreeMap::from([
            (TLS_CRT.to_string(), ByteString(cert.into_bytes())),
            (TLS_KEY.to_string(), ByteString(key.into_bytes())),
            (CA_CRT.to_string(), ByteString(ca.bundle().into_bytes())),
        ]);
        let mut secret = Secret {
            metadata: ObjectMeta {
                name: Some(config.serving_secret.clone()),
                namespace: Some(config.namespace.clone()),
                labels: Some([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into()),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".to_string()),
            data: Some(data),
            ..Secret::default()
        };
        let written = match existing {
            Some(old) => {
                secret.metadata.resource_version = old.metadata.resource_version;
                secrets
                    .replace(&config.serving_secret, &PostParams::default(), &secret)
                    .await
            }
            None => secrets.create(&PostParams::default(), &secret).await,
        };
        match written {
            Ok(_) => issued = true,
            Err(e) if is_conflict(&e) => {}
            Err(e) => return Err(Error::kube(what())(e)),
        }
    }
    Err(Error::Tls(format!(
        "{}: too many concurrent changes",
        what()
    )))
}

async fn patch_ca_bundle(client: &Client, name: &str, bundle: &str) -> Result<bool> {
    let api = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let what = || format!("setting the caBundle of MutatingWebhookConfiguration {name}");
    for _ in 0..5 {
        let Some(mut current) = api.get_opt(name).await.map_err(Error::kube(what()))? else {
            warn!(
                configuration = name,
                "MutatingWebhookConfiguration not found; caBundle not set"
            );
            return Ok(false);
        };
        let wanted = ByteString(bundle.as_bytes().to_vec());
        let mut changed = false;
        for webhook in current.webhooks.iter_mut().flatten() {
            if webhook.client_config.ca_bundle.as_ref() != Some(&wanted) {
                webhook.client_config.ca_bundle = Some(wanted.clone());
                changed = true;
            }
        }
        if !changed {
            return Ok(false);
        }
        match api.replace(name, &PostParams::default(), &current).await {
            Ok(_) => {
                info!(configuration = name, "caBundle updated");
                return Ok(true);
            }
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(Error::kube(what())(e)),
        }
    }
    Err(Error::Tls(format!(
        "{}: too many concurrent changes",
        what()
    )))
}

/// Builds a rustls certified key from a PEM chain and PEM private key.
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey> {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("certificate chain PEM: {e}")))?;
    if chain.is_empty() {
        return Err(Error::Tls(
            "certificate chain PEM holds no certificate".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| Error::Tls(format!("private key PEM: {e}")))?;
    let signing = aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|e| Error::Tls(format!("private key: {e}")))?;
    Ok(CertifiedKey::new(chain, signing))
}

/// The serving certificate in force, picked up by every new TLS handshake.
#[derive(Debug)]
pub struct ServingCertResolver {
    current: ArcSwap<CertifiedKey>,
    serial: ArcSwap<String>,
}

impl ServingCertResolver {
    pub fn new(key: CertifiedKey, serial_hex: String) -> Self {
        Self {
            current: ArcSwap::from_pointee(key),
            serial: ArcSwap::from_pointee(serial_hex),
        }
    }

    /// From what [`reconcile_webhook_tls`] returned.
    pub fn from_tls(tls: &WebhookTls) -> Result<Self> {
        Ok(Self::new(
            certified_key(&tls.cert_pem, &tls.key_pem)?,
            tls.serial_hex.clone(),
        ))
    }

    /// Serves `key` from the next handshake on.
    pub fn set(&self, key: CertifiedKey, serial_hex: String) {
        self.current.store(Arc::new(key));
        self.serial.store(Arc::new(serial_hex));
    }

    /// Serves what [`reconcile_webhook_tls`] returned if it differs from what is served; returns
    /// whether it changed.
    pub fn update(&self, tls: &WebhookTls) -> Result<bool> {
        if **self.serial.load() == tls.serial_hex {
            return Ok(false);
        }
        self.set(
            certified_key(&tls.cert_pem, &tls.key_pem)?,
            tls.serial_hex.clone(),
        );
        Ok(true)
    }

    /// Serial (hex) of the certificate served.
    pub fn serial_hex(&self) -> String {
        (**self.serial.load()).clone()
    }
}

impl ResolvesServerCert for ServingCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A rustls server configuration (aws-lc-rs, TLS 1.2 and 1.3, HTTP/1.1) resolving the
/// certificate per handshake.
pub fn server_config(resolver: Arc<ServingCertResolver>) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Keeps the served certificate current: runs [`reconcile_webhook_tls`] every `interval` (sooner
/// when renewal is due) and swaps in what it returns. Runs until the task is dropped.
pub async fn maintain_serving_cert(
    client: Client,
    config: WebhookTlsConfig,
    resolver: Arc<ServingCertResolver>,
    metrics: Arc<Metrics>,
    interval: Duration,
) {
    loop {
        let wait = match reconcile_webhook_tls(&client, &config).await {
            Ok(tls) => {
                match resolver.update(&tls) {
                    Ok(true) => {
                        metrics.serving_cert_loaded(tls.not_after.unix_timestamp());
                        info!(serial = %tls.serial_hex, not_after = %tls.not_after, "serving certificate rotated");
                    }
                    Ok(false) => {}
                    Err(error) => warn!(%error, "could not load the serving certificate"),
                }
                let until_renewal = (tls.renew_at - OffsetDateTime::now_utc())
                    .try_into()
                    .unwrap_or(Duration::ZERO);
                interval.min(until_renewal).max(Duration::from_millis(100))
            }
            Err(error) => {
                warn!(%error, "webhook TLS reconciliation failed; retrying");
                interval.min(Duration::from_secs(5))
            }
        };
        tokio::time::sleep(wait).await;
    }
}
