//! The webhook's serving certificate and the `caBundle` of its MutatingWebhookConfiguration,
//! kept current by the leader; the webhook replicas only read the serving Secret.
//!
//! [`reconcile_webhook_tls`] is idempotent and safe to call concurrently from several processes:
//! every write is conditional on the resourceVersion read, and a loser of a race re-reads what the
//! winner wrote.

mod ca;
mod serving;

use std::{collections::BTreeSet, fmt, net::IpAddr, time::Duration};

use k8s_openapi::{
    ByteString, api::admissionregistration::v1::MutatingWebhookConfiguration, api::core::v1::Secret,
};
use kube::{Api, Client, api::PostParams};
use rolemesh_crds::names::{WEBHOOK_CA_SECRET, WEBHOOK_NAME, WEBHOOK_SERVING_SECRET};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use time::OffsetDateTime;
use tracing::{info, warn};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use self::{ca::ensure_ca, serving::ensure_serving};
use crate::error::{Error, Result};

/// Re-checks at least this often, so that an edited Secret or configuration is repaired soon.
const RECHECK: Duration = Duration::from_secs(60);

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
            ca_secret: WEBHOOK_CA_SECRET.to_string(),
            serving_secret: WEBHOOK_SERVING_SECRET.to_string(),
            webhook_configuration: Some(WEBHOOK_NAME.to_string()),
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

/// Keeps the webhook's TLS material current until the task is dropped.
pub async fn maintain_webhook_tls(client: Client, config: WebhookTlsConfig) {
    loop {
        let wait = match reconcile_webhook_tls(&client, &config).await {
            Ok(tls) => {
                if tls.issued || tls.ca_bundle_patched {
                    info!(serial = %tls.serial_hex, not_after = %tls.not_after, ca_bundle_patched = tls.ca_bundle_patched, "webhook serving certificate in force");
                }
                let until_renewal = tls.renew_at - OffsetDateTime::now_utc();
                Duration::try_from(until_renewal)
                    .unwrap_or(Duration::from_secs(1))
                    .min(RECHECK)
            }
            Err(error) => {
                warn!(%error, namespace = %config.namespace, "failed to maintain the webhook's TLS material");
                Duration::from_secs(10)
            }
        };
        tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
    }
}

fn tls_error(error: impl fmt::Display) -> Error {
    Error::WebhookTls(error.to_string())
}

pub(crate) fn secret_str(secret: &Secret, key: &str) -> Option<String> {
    let data = secret.data.as_ref()?.get(key)?;
    String::from_utf8(data.0.clone()).ok()
}

pub(crate) struct ParsedCert {
    pub(crate) subject_raw: Vec<u8>,
    pub(crate) issuer_raw: Vec<u8>,
    pub(crate) spki_raw: Vec<u8>,
    pub(crate) not_after: OffsetDateTime,
    pub(crate) serial_hex: String,
    pub(crate) dns: BTreeSet<String>,
    pub(crate) ips: BTreeSet<IpAddr>,
}

pub(crate) fn parse_cert(pem: &str) -> Result<ParsedCert> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| Error::WebhookTls(format!("certificate PEM: {e}")))?;
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| Error::WebhookTls(format!("certificate DER: {e}")))?;
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

pub(crate) fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

async fn patch_ca_bundle(client: &Client, name: &str, bundle: &str) -> Result<bool> {
    let api = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let what = || format!("set the caBundle of MutatingWebhookConfiguration {name}");
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
    Err(Error::WebhookTls(format!(
        "{}: too many concurrent changes",
        what()
    )))
}
