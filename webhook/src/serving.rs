//! The webhook's serving certificate, as the webhook sees it: the controller issues and renews it
//! into a Secret (see the controller's `webhook_tls`), and [`follow_serving_secret`] loads each new
//! version into the [`ServingCertResolver`], which every TLS handshake asks. The webhook never
//! writes the Secret.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use rolemesh_crds::names::{TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY};
use rustls::{
    crypto::aws_lc_rs,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tracing::{info, warn};

use crate::{
    error::{Error, Result},
    metrics::Metrics,
};

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

    /// Serves `key` from the next handshake on.
    pub fn set(&self, key: CertifiedKey, serial_hex: String) {
        self.current.store(Arc::new(key));
        self.serial.store(Arc::new(serial_hex));
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

/// Loads the serving certificate from Secret `namespace/name` (written by the controller) and
/// keeps loading new versions; the webhook never writes it.
pub async fn follow_serving_secret(
    client: Client,
    namespace: String,
    name: String,
    resolver: Arc<ServingCertResolver>,
    metrics: Arc<Metrics>,
    loaded: Arc<std::sync::atomic::AtomicBool>,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let mut last_version = String::new();
    loop {
        match api.get_opt(&name).await {
            Ok(Some(secret)) => {
                let version = secret.metadata.resource_version.clone().unwrap_or_default();
                if version != last_version {
                    let field = |key: &str| {
                        secret
                            .data
                            .as_ref()
                            .and_then(|d| d.get(key))
                            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                    };
                    match (field(TLS_CERT_KEY), field(TLS_PRIVATE_KEY_KEY)) {
                        (Some(cert), Some(key)) => match certified_key(&cert, &key) {
                            Ok(certified) => {
                                let serial =
                                    rolemesh_profile::inspect::certificates_from_pem(&cert)
                                        .ok()
                                        .and_then(|c| c.into_iter().next())
                                        .and_then(|der| {
                                            rolemesh_profile::inspect_certificate(&der).ok()
                                        })
                                        .map(|info| {
                                            metrics.serving_cert_loaded(
                                                info.not_after.unix_timestamp(),
                                            );
                                            info.serial_hex
                                        })
                                        .unwrap_or_default();
                                resolver.set(certified, serial.clone());
                                loaded.store(true, std::sync::atomic::Ordering::Release);
                                last_version = version;
                                info!(serial = %serial, "serving certificate loaded");
                            }
                            Err(error) => {
                                warn!(%error, secret = %name, "the serving certificate Secret is unusable; keeping the current one")
                            }
                        },
                        _ => {
                            warn!(secret = %name, "the serving certificate Secret lacks tls.crt or tls.key")
                        }
                    }
                }
            }
            Ok(None) => {
                warn!(namespace = %namespace, secret = %name, "waiting for the controller to write the serving certificate Secret")
            }
            Err(error) => warn!(%error, "failed to read the serving certificate Secret"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
