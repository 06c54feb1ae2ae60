//! rolemesh's sidecar proxy. Inbound: a TLS 1.3 listener per mapping that admits only peers whose
//! certificate chains to the trust bundle, follows the rolemesh profile and matches the mapping's
//! allow list, spliced to the app on 127.0.0.1. Outbound: a plain listener on 127.0.0.1 per
//! mapping that dials its upstream over mTLS and checks the upstream's identity. Certificates are
//! reloaded from the mounted Secret without dropping connections; health and Prometheus metrics
//! are served on a separate plain-HTTP admin port.

pub mod admin;
pub mod material;
pub mod metrics;
pub mod proxy;
pub mod splice;
pub mod verify;

use std::path::{Path, PathBuf};

pub use proxy::run;
use rolemesh_profile::proxy_config::ProxyConfig;

/// Everything that can stop the proxy or refuse a reload, named after the action that failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("failed to read the configuration file {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    ParseConfig(String),
    #[error(
        "no configuration: pass --config-file or set {}",
        rolemesh_profile::proxy_config::CONFIG_ENV
    )]
    MissingConfig,
    #[error("failed to bind {what} on {address}: {source}")]
    Bind {
        what: String,
        address: String,
        source: std::io::Error,
    },
    #[error("failed to read {path}: {source}")]
    ReadMaterial {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refused the certificate set: {0}")]
    ValidateMaterial(String),
    #[error("failed to build the TLS configuration: {0}")]
    BuildTls(String),
}

/// Reads the configuration from a file, or else from the JSON in `inline` (the value of
/// `ROLEMESH_PROXY_CONFIG`), and validates it.
pub fn load_config(file: Option<&Path>, inline: Option<&str>) -> Result<ProxyConfig, ProxyError> {
    let text = match (file, inline) {
        (Some(path), _) => {
            std::fs::read_to_string(path).map_err(|source| ProxyError::ReadConfig {
                path: path.to_path_buf(),
                source,
            })?
        }
        (None, Some(json)) => json.to_string(),
        (None, None) => return Err(ProxyError::MissingConfig),
    };
    let config =
        ProxyConfig::from_json(&text).map_err(|e| ProxyError::ParseConfig(e.to_string()))?;
    for listener in &config.outbound {
        proxy::upstream_server_name(&listener.upstream)
            .map_err(|e| ProxyError::ParseConfig(format!("outbound {}: {e}", listener.name)))?;
    }
    Ok(config)
}
