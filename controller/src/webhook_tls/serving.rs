//! The webhook's serving certificate: issued by the webhook CA for the configured names, renewed
//! `renew_before` its expiry, re-issued when the names or the CA change.

use std::{collections::BTreeSet, net::IpAddr};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rolemesh_crds::names::{
    CA_CERT_KEY, MANAGED_BY_LABEL, MANAGED_BY_VALUE, TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY,
    WEBHOOK_NAME,
};
use rolemesh_profile::profile::{BACKDATE, generate_workload_key, random_serial};
use time::OffsetDateTime;
use tracing::info;

use super::{
    ParsedCert, WebhookTls, WebhookTlsConfig, ca::CaMaterial, is_conflict, parse_cert, secret_str,
    tls_error,
};
use crate::error::{Error, Result};

fn issue_serving(
    config: &WebhookTlsConfig,
    ca: &CaMaterial,
    now: OffsetDateTime,
) -> Result<(String, String)> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(tls_error)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(tls_error)?;
    let key = generate_workload_key().map_err(tls_error)?;
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
            .unwrap_or_else(|| WEBHOOK_NAME.to_string()),
    );
    params.distinguished_name = dn;
    for name in &config.dns_names {
        params.subject_alt_names.push(SanType::DnsName(
            name.clone()
                .try_into()
                .map_err(|_| Error::WebhookTls(format!("DNS name {name:?} is not valid")))?,
        ));
    }
    for ip in &config.ip_addresses {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer).map_err(tls_error)?;
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

pub(super) async fn ensure_serving(
    secrets: &Api<Secret>,
    config: &WebhookTlsConfig,
    ca: &CaMaterial,
    now: OffsetDateTime,
) -> Result<WebhookTls> {
    let what = || {
        format!(
            "keep the serving Secret {}/{}",
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
            && let (Some(cert_pem), Some(key_pem)) = (
                secret_str(secret, TLS_CERT_KEY),
                secret_str(secret, TLS_PRIVATE_KEY_KEY),
            )
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
            (TLS_CERT_KEY.to_string(), ByteString(cert.into_bytes())),
            (
                TLS_PRIVATE_KEY_KEY.to_string(),
                ByteString(key.into_bytes()),
            ),
            (
                CA_CERT_KEY.to_string(),
                ByteString(ca.bundle().into_bytes()),
            ),
        ]);
        let mut secret = Secret {
            metadata: ObjectMeta {
                name: Some(config.serving_secret.clone()),
                namespace: Some(config.namespace.clone()),
                labels: Some([(MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string())].into()),
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
    Err(Error::WebhookTls(format!(
        "{}: too many concurrent changes",
        what()
    )))
}
