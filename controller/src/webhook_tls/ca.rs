//! The webhook CA: created when missing, rotated a third of its life before expiry while the
//! previous one stays trusted.

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyUsagePurpose,
};
use rolemesh_crds::names::{CA_CERT_KEY, MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use rolemesh_profile::profile::{BACKDATE, generate_workload_key, random_serial};
use time::OffsetDateTime;
use tracing::info;

use super::{WebhookTlsConfig, is_conflict, parse_cert, secret_str, tls_error};
use crate::error::{Error, Result};

const CA_KEY: &str = "ca.key";
const PREVIOUS_CRT: &str = "previous.crt";

pub(super) struct CaMaterial {
    pub(super) cert_pem: String,
    pub(super) key_pem: String,
    pub(super) not_after: OffsetDateTime,
    /// Every CA still trusted, current first: (PEM, subject DER).
    pub(super) trusted: Vec<(String, Vec<u8>)>,
}

impl CaMaterial {
    pub(super) fn bundle(&self) -> String {
        self.trusted
            .iter()
            .map(|(pem, _)| pem.as_str())
            .collect::<Vec<_>>()
            .join("")
    }
}

fn new_ca(config: &WebhookTlsConfig, now: OffsetDateTime) -> Result<(String, String)> {
    let key = generate_workload_key().map_err(tls_error)?;
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
    let cert = params.self_signed(&key).map_err(tls_error)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn ca_secret_object(
    config: &WebhookTlsConfig,
    cert: &str,
    key: &str,
    previous: Option<&str>,
) -> Secret {
    let mut data = std::collections::BTreeMap::from([
        (
            CA_CERT_KEY.to_string(),
            ByteString(cert.as_bytes().to_vec()),
        ),
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
            labels: Some([(MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string())].into()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(data),
        ..Secret::default()
    }
}

pub(super) async fn ensure_ca(
    secrets: &Api<Secret>,
    config: &WebhookTlsConfig,
    now: OffsetDateTime,
) -> Result<CaMaterial> {
    let what = || {
        format!(
            "keep the webhook CA Secret {}/{}",
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
        let (Some(cert_pem), Some(key_pem)) = (
            secret_str(&existing, CA_CERT_KEY),
            secret_str(&existing, CA_KEY),
        ) else {
            return Err(Error::WebhookTls(format!(
                "Secret {}/{} lacks {CA_CERT_KEY} or {CA_KEY}; delete it to have rolemesh create a new CA",
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
            not_after: parsed.not_after,
            trusted,
        });
    }
    Err(Error::WebhookTls(format!(
        "{}: too many concurrent changes",
        what()
    )))
}
