//! The peer rules in force: read from the file the controller keeps current (a key of the trust
//! bundle ConfigMap), validated as a whole, resolved against the proxy's listeners, and swapped
//! in for every new handshake while the proxy runs. A file that does not validate is refused
//! (logged once per content) and the rules in use are kept; before the first valid file the
//! proxy admits no one and dials nothing.
//!
//! Connections already spliced are kept when the rules change: a peer is judged at its handshake,
//! as with certificates, and `limits.idleTimeoutSecs` bounds how long an idle one lives on.

use std::{path::PathBuf, sync::Arc};

use arc_swap::ArcSwapOption;
use rolemesh_profile::proxy_config::{PeerPattern, PeerRules, ProxyConfig};
use rustls_pki_types::ServerName;
use tracing::{error, info, warn};

use crate::{ProxyError, state::Shared, upstream_server_name};

/// The rules in force, shared by the verifiers and the outbound listeners; `None` until loaded.
pub type RulesHandle = Arc<ArcSwapOption<ActiveRules>>;

/// Peer rules resolved against the proxy's listeners, by listener index.
#[derive(Debug)]
pub struct ActiveRules {
    pub policy: String,
    pub generation: i64,
    /// `config.inbound[i]` admits `inbound[i]`; empty when the rules do not name the mapping.
    pub inbound: Vec<Vec<PeerPattern>>,
    /// Where `config.outbound[i]` dials; `None` when the rules do not name the mapping.
    pub outbound: Vec<Option<Arc<Upstream>>>,
    /// Mappings the rules name that this proxy does not run (they need a restart).
    pub not_running: Vec<String>,
}

/// One outbound mapping's upstream and whom it must be.
#[derive(Debug)]
pub struct Upstream {
    pub address: String,
    pub server_name: ServerName<'static>,
    pub expect: Vec<PeerPattern>,
}

impl ActiveRules {
    /// Parses, validates and resolves the content of a rules file.
    pub fn parse(text: &[u8], config: &ProxyConfig) -> Result<Self, ProxyError> {
        let invalid = |e: String| ProxyError::ParseRules(e);
        let text = std::str::from_utf8(text).map_err(|e| invalid(format!("not UTF-8: {e}")))?;
        let rules = PeerRules::from_json(text).map_err(|e| invalid(e.to_string()))?;
        let inbound = config
            .inbound
            .iter()
            .map(|l| rules.allow(&l.name).map(<[_]>::to_vec).unwrap_or_default())
            .collect();
        let outbound = config
            .outbound
            .iter()
            .map(|l| {
                rules
                    .outbound(&l.name)
                    .map(|o| {
                        let server_name = upstream_server_name(&o.upstream)
                            .map_err(|e| invalid(format!("outbound {}: {e}", o.name)))?;
                        Ok(Arc::new(Upstream {
                            address: o.upstream.clone(),
                            server_name,
                            expect: o.expect.clone(),
                        }))
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>, ProxyError>>()?;
        let running = |name: &str| {
            config.inbound.iter().any(|l| l.name == name)
                || config.outbound.iter().any(|l| l.name == name)
        };
        let not_running = rules
            .inbound
            .iter()
            .map(|m| &m.name)
            .chain(rules.outbound.iter().map(|m| &m.name))
            .filter(|name| !running(name))
            .cloned()
            .collect();
        Ok(Self {
            policy: rules.policy,
            generation: rules.generation,
            inbound,
            outbound,
            not_running,
        })
    }
}

/// Follows the rules file: each new content is judged once, taken into use if valid.
pub struct RulesReloader {
    path: PathBuf,
    last_seen: Option<Vec<u8>>,
    read_error_logged: bool,
}

impl RulesReloader {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            last_seen: None,
            read_error_logged: false,
        }
    }

    pub fn poll(&mut self, shared: &Shared) {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(error) => {
                if !self.read_error_logged {
                    let in_use = shared.rules.load().as_ref().map(|r| r.generation);
                    warn!(%error, path = %self.path.display(), generation_in_use = ?in_use, "cannot read the peer rules; keeping the rules in use (none: no peer is admitted)");
                    self.read_error_logged = true;
                }
                return;
            }
        };
        self.read_error_logged = false;
        if self.last_seen.as_deref() == Some(text.as_slice()) {
            return;
        }
        let result = ActiveRules::parse(&text, &shared.config);
        self.last_seen = Some(text);
        match result {
            Ok(rules) => {
                info!(policy = %rules.policy, generation = rules.generation, "peer rules loaded");
                if !rules.not_running.is_empty() {
                    warn!(
                        policy = %rules.policy,
                        generation = rules.generation,
                        mappings = ?rules.not_running,
                        "the policy has mappings this proxy does not run; they take effect when the pod is re-created"
                    );
                }
                shared.metrics.rules_reload(true);
                shared.metrics.set_policy_generation(rules.generation);
                shared.use_rules(rules);
            }
            Err(error) => {
                shared.metrics.rules_reload(false);
                let in_use = shared.rules.load().as_ref().map(|r| r.generation);
                error!(%error, path = %self.path.display(), generation_in_use = ?in_use, "peer rules refused; keeping the rules in use");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ProxyConfig {
        ProxyConfig::from_json(
            r#"{"trustDomain":"rolemesh.test",
                "inbound":[{"name":"http","port":8443,"appPort":8080},{"name":"grpc","port":9443,"appPort":9090}],
                "outbound":[{"name":"db","localPort":5432},{"name":"cache","localPort":6379}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn rules_resolve_by_mapping_name_and_unnamed_listeners_admit_no_one() {
        let rules = br#"{"policy":"web","generation":7,
            "inbound":[{"name":"http","allow":["arn:aws:iam::111122223333:role/frontend"]},{"name":"new","allow":[]}],
            "outbound":[{"name":"db","upstream":"db.shop.svc:5432","expect":["spiffe://rolemesh.test/ns/shop/sa/db"]}]}"#;
        let active = ActiveRules::parse(rules, &config()).unwrap();
        assert_eq!((active.policy.as_str(), active.generation), ("web", 7));
        assert_eq!(active.inbound[0].len(), 1);
        assert!(active.inbound[1].is_empty(), "grpc is not named: no one");
        assert_eq!(
            active.outbound[0].as_ref().map(|u| u.address.as_str()),
            Some("db.shop.svc:5432")
        );
        assert!(active.outbound[1].is_none(), "cache is not named: no dial");
        assert_eq!(active.not_running, ["new"]);
    }

    #[test]
    fn a_bad_file_says_what_is_wrong() {
        for (text, words) in [
            (&b"{"[..], "not valid peer rules"),
            (&b"\xff"[..], "not UTF-8"),
            (
                br#"{"policy":"web","generation":1,"inbound":[{"name":"http","allow":["arn:aws:iam::*:role/x"]}]}"#,
                "account field",
            ),
            (
                br#"{"policy":"web","generation":1,"outbound":[{"name":"db","upstream":"not a host:5432","expect":["spiffe://x/y"]}]}"#,
                "outbound db",
            ),
        ] {
            let error = ActiveRules::parse(text, &config()).unwrap_err().to_string();
            assert!(error.contains(words), "{error}");
        }
    }
}
