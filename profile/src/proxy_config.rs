//! The proxy's configuration, in two parts with one definition for every side:
//!
//! - [`ProxyConfig`], written by the webhook into the pod at admission and read by the proxy at
//!   start: what needs a restart to change (mapping names and ports, trust domain, admin port,
//!   limits, rewritten app probes). It holds no peer rules, so an admission answer reveals none.
//! - [`PeerRules`], written by the controller per policy into the namespace's trust bundle
//!   ConfigMap (key [`policy_rules_key`]) and mounted into the proxy alone as [`RULES_FILE`]:
//!   who may connect in, whom to dial and expect out. The proxy reloads it while it runs.

use std::{collections::BTreeSet, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::ProfileError;

/// Environment variable through which the webhook hands the proxy its configuration (JSON).
pub const CONFIG_ENV: &str = "ROLEMESH_PROXY_CONFIG";
/// Where the workload's certificate Secret is mounted in the proxy container.
pub const DEFAULT_IDENTITY_DIR: &str = "/var/run/rolemesh/identity";
/// Where the trust bundle ConfigMap is mounted in every container.
pub const DEFAULT_TRUST_DIR: &str = "/var/run/rolemesh/trust";
/// Where the policy's peer rules are mounted in the proxy container.
pub const DEFAULT_RULES_DIR: &str = "/var/run/rolemesh/rules";
/// File name of the peer rules in [`DEFAULT_RULES_DIR`].
pub const RULES_FILE: &str = "rules.json";
/// Prefix of a policy's peer rules key in the trust bundle ConfigMap; see [`policy_rules_key`].
pub const RULES_KEY_PREFIX: &str = "policy.";
/// Suffix of a policy's peer rules key in the trust bundle ConfigMap.
pub const RULES_KEY_SUFFIX: &str = ".json";
/// The longest policy name whose rules key fits a ConfigMap key (253 characters).
pub const MAX_RULES_POLICY_NAME: usize = 253 - RULES_KEY_PREFIX.len() - RULES_KEY_SUFFIX.len();

/// Key of policy `policy`'s [`PeerRules`] in the trust bundle ConfigMap, or `None` when the name
/// is too long for a ConfigMap key (more than [`MAX_RULES_POLICY_NAME`] characters).
pub fn policy_rules_key(policy: &str) -> Option<String> {
    (policy.len() <= MAX_RULES_POLICY_NAME)
        .then(|| format!("{RULES_KEY_PREFIX}{policy}{RULES_KEY_SUFFIX}"))
}

/// The field manager with which the controller server-side applies policy `policy`'s rules key:
/// one per policy, so that one policy's apply never removes another's key (policies of a
/// namespace are reconciled concurrently, and each must change its own key without carrying
/// possibly older copies of the others'). A digest of the name: field managers are limited to
/// 128 characters.
pub fn rules_field_manager(policy: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(policy.as_bytes());
    format!("rolemesh-controller-rules-{}", hex::encode(&digest[..8]))
}

/// Environment variable of the proxy's runtime size ([`CoresSetting`]).
pub const CORES_ENV: &str = "ROLEMESH_PROXY_CORES";

/// The proxy's runtime threads, `--cores` / [`CORES_ENV`]: `auto` (sized from the container's CPU
/// limit) or a fixed number. The chart's `proxy.cores` and the pod annotation
/// `rolemesh.dev/proxy-cores` reach the proxy as this variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoresSetting {
    Auto,
    Fixed(std::num::NonZeroUsize),
}

impl std::str::FromStr for CoresSetting {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let value = value.trim();
        if value.is_empty() || value.eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        value
            .parse::<std::num::NonZeroUsize>()
            .map(Self::Fixed)
            .map_err(|_| {
                format!(
                    "cores must be \"auto\" or a whole number of threads from 1 up, not {value:?}"
                )
            })
    }
}

impl std::fmt::Display for CoresSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(threads) => write!(f, "{threads}"),
        }
    }
}

/// The proxy's plain-HTTP admin port (health, readiness, metrics).
pub const DEFAULT_ADMIN_PORT: u16 = 15021;
/// Admin path prefix of the app probes kubelet sends through the proxy:
/// `/app-health/<container>/<kind>` (see [`AppProbe`]).
pub const APP_HEALTH_PREFIX: &str = "/app-health/";

/// Everything the proxy needs to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// Peers must present SPIFFE IDs in this trust domain.
    pub trust_domain: String,
    /// Directory holding `tls.crt` (leaf + chain) and `tls.key`, as kubelet mounts a Secret.
    #[serde(default = "default_identity_dir")]
    pub identity_dir: PathBuf,
    /// PEM file of the CA certificates in force.
    #[serde(default = "default_trust_bundle")]
    pub trust_bundle: PathBuf,
    /// JSON file of the [`PeerRules`] in force, reloaded when it changes. Until a valid one is
    /// read the proxy admits no peer, dials no upstream and reports not ready.
    #[serde(default = "default_rules_file")]
    pub rules_file: PathBuf,
    #[serde(default = "default_admin_port")]
    pub admin_port: u16,
    /// Address the admin server binds (all interfaces so kubelet can probe it).
    #[serde(default = "default_admin_address")]
    pub admin_address: String,
    #[serde(default)]
    pub inbound: Vec<InboundListener>,
    #[serde(default)]
    pub outbound: Vec<OutboundListener>,
    #[serde(default)]
    pub limits: Limits,
    /// The app's own kubelet probes aimed at inbound app ports, which the pod's netfilter rules
    /// close to everything but loopback: kubelet asks the admin port instead, and the proxy asks
    /// the app on 127.0.0.1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub app_probes: Vec<AppProbe>,
}

/// One rewritten kubelet probe: kubelet GETs `/app-health/<container>/<kind>` on the admin port and
/// the proxy runs the original check against 127.0.0.1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppProbe {
    pub container: String,
    /// `liveness`, `readiness` or `startup`.
    pub kind: String,
    pub port: u16,
    /// The HTTP request the original probe made; absent for a TCP probe (a connect is the check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<AppHttpProbe>,
    /// The original probe's timeout.
    pub timeout_secs: u32,
}

/// What an `httpGet` probe sends: path and headers (kubelet's `Host` override included).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppHttpProbe {
    pub path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
}

impl AppProbe {
    /// The admin path kubelet is pointed at for this probe.
    pub fn admin_path(&self) -> String {
        format!("{APP_HEALTH_PREFIX}{}/{}", self.container, self.kind)
    }
}

/// mTLS in, plain TCP to the app on 127.0.0.1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundListener {
    pub name: String,
    /// mTLS port the proxy listens on (all interfaces).
    pub port: u16,
    /// The application's port on 127.0.0.1.
    pub app_port: u16,
    /// How the app learns who the peer is. Left out of the JSON when `l4`, so that the
    /// configuration of a pod that does not opt in reads as it did before the field existed.
    #[serde(default, skip_serializing_if = "CallerIdentity::is_l4")]
    pub caller_identity: CallerIdentity,
}

/// How an inbound mapping tells the app who the verified peer is.
///
/// `l4` (default): nothing; the app sees a plain TCP connection from 127.0.0.1.
/// `proxyProtocolV2`: each connection to the app starts with a PROXY protocol v2 header whose
/// source is the peer's address and whose TLVs carry the TLS details (PP2_TYPE_SSL, 0x20), the
/// peer's SPIFFE ID (0xE0) and its IAM role ARN (0xE1).
/// `http`: the proxy serves HTTP/1.1 and HTTP/2 (h2c) itself and forwards each request to the
/// app with the headers `x-rolemesh-peer-spiffe-id` and `x-rolemesh-peer-role-arn`, removing
/// any copies the peer sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum CallerIdentity {
    // Variants carry no doc comments: with them schemars writes a `oneOf` per variant, which the
    // CRD's structural schema refuses; the enum's own doc says what each means.
    #[default]
    L4,
    ProxyProtocolV2,
    Http,
}

impl CallerIdentity {
    pub fn is_l4(&self) -> bool {
        *self == Self::L4
    }

    /// The name the API and the configuration use.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::L4 => "l4",
            Self::ProxyProtocolV2 => "proxyProtocolV2",
            Self::Http => "http",
        }
    }
}

impl std::fmt::Display for CallerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Plain TCP in on 127.0.0.1, mTLS out to the upstream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundListener {
    pub name: String,
    pub local_port: u16,
}

/// The peer rules of one policy generation: the part of the proxy's configuration that changes
/// without a restart. Mappings are matched to the proxy's listeners by name; a listener the rules
/// do not name admits no one (inbound) or refuses the app's connections (outbound), and rules for
/// a mapping the proxy does not run wait for a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerRules {
    /// The MTLSPolicy these rules come from.
    pub policy: String,
    /// Its `metadata.generation`.
    pub generation: i64,
    #[serde(default)]
    pub inbound: Vec<InboundRules>,
    #[serde(default)]
    pub outbound: Vec<OutboundRules>,
}

/// Whom one inbound mapping admits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundRules {
    pub name: String,
    /// Peers admitted; empty admits no one.
    pub allow: Vec<PeerPattern>,
}

/// Where one outbound mapping dials and whom it expects there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundRules {
    pub name: String,
    /// `host:port` of the upstream's mTLS port.
    pub upstream: String,
    /// Identities the upstream must present (at least one).
    pub expect: Vec<PeerPattern>,
}

impl PeerRules {
    /// Parses and validates the JSON of a rules file.
    pub fn from_json(text: &str) -> Result<Self, ProfileError> {
        let rules: Self = serde_json::from_str(text)
            .map_err(|e| ProfileError::InvalidProxyConfig(format!("not valid peer rules: {e}")))?;
        rules.validate()?;
        Ok(rules)
    }

    pub fn to_json(&self) -> String {
        // Serialising plain structs of strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks what the types cannot: names unique, patterns valid, upstreams `host:port`, at
    /// least one expected identity per upstream.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let bad = |msg: String| Err(ProfileError::InvalidProxyConfig(msg));
        let mut names = BTreeSet::new();
        for mapping in &self.inbound {
            if !names.insert(mapping.name.as_str()) {
                return bad(format!("mapping name {} is used twice", mapping.name));
            }
            for pattern in &mapping.allow {
                pattern.validate()?;
            }
        }
        for mapping in &self.outbound {
            if !names.insert(mapping.name.as_str()) {
                return bad(format!("mapping name {} is used twice", mapping.name));
            }
            if mapping.expect.is_empty() {
                return bad(format!(
                    "outbound {}: expect lists no identity",
                    mapping.name
                ));
            }
            if mapping
                .upstream
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return bad(format!(
                    "outbound {}: upstream must be host:port",
                    mapping.name
                ));
            }
            for pattern in &mapping.expect {
                pattern.validate()?;
            }
        }
        Ok(())
    }

    /// The allow list of inbound mapping `name`; `None` when the rules do not name it.
    pub fn allow(&self, name: &str) -> Option<&[PeerPattern]> {
        self.inbound
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.allow.as_slice())
    }

    /// The rules of outbound mapping `name`, if the rules name it.
    pub fn outbound(&self, name: &str) -> Option<&OutboundRules> {
        self.outbound.iter().find(|m| m.name == name)
    }
}

/// Connection limits protecting the proxy from slow or hostile peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    pub handshake_timeout_ms: u64,
    pub max_concurrent_handshakes: usize,
    pub idle_timeout_secs: u64,
    pub drain_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout_ms: 5_000,
            max_concurrent_handshakes: 256,
            idle_timeout_secs: 3_600,
            drain_timeout_secs: 20,
        }
    }
}

/// Key of the certificate chain (leaf first) in a `kubernetes.io/tls` Secret, and so the file the
/// proxy reads it from in its identity directory.
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Key of the PKCS#8 private key in a `kubernetes.io/tls` Secret (a file in the identity directory).
pub const TLS_PRIVATE_KEY_KEY: &str = "tls.key";
/// Key of the CA certificates to trust, in a workload Secret, the trust bundle ConfigMap and the
/// webhook's Secrets (a file in the trust directory).
pub const CA_CERT_KEY: &str = "ca.crt";

fn default_identity_dir() -> PathBuf {
    PathBuf::from(DEFAULT_IDENTITY_DIR)
}
fn default_trust_bundle() -> PathBuf {
    PathBuf::from(DEFAULT_TRUST_DIR).join(CA_CERT_KEY)
}
fn default_rules_file() -> PathBuf {
    PathBuf::from(DEFAULT_RULES_DIR).join(RULES_FILE)
}
fn default_admin_port() -> u16 {
    DEFAULT_ADMIN_PORT
}
fn default_admin_address() -> String {
    "0.0.0.0".to_string()
}

impl ProxyConfig {
    /// Parses and validates a JSON configuration.
    pub fn from_json(text: &str) -> Result<Self, ProfileError> {
        let config: Self = serde_json::from_str(text)
            .map_err(|e| ProfileError::InvalidProxyConfig(format!("not valid JSON config: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_json(&self) -> String {
        // Serialising plain structs of strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks what the types cannot: ports distinct and non-zero, names unique, probes sound.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let bad = |msg: String| Err(ProfileError::InvalidProxyConfig(msg));
        if self.trust_domain.is_empty() {
            return bad("trustDomain is empty".into());
        }
        let mut ports = BTreeSet::from([self.admin_port]);
        let mut names = BTreeSet::new();
        for listener in &self.inbound {
            if listener.port == 0 || listener.app_port == 0 {
                return bad(format!("inbound {}: ports must be 1-65535", listener.name));
            }
            if !ports.insert(listener.port) {
                return bad(format!(
                    "inbound {}: port {} is used twice",
                    listener.name, listener.port
                ));
            }
            if !names.insert(listener.name.as_str()) {
                return bad(format!("mapping name {} is used twice", listener.name));
            }
        }
        for listener in &self.outbound {
            if listener.local_port == 0 {
                return bad(format!(
                    "outbound {}: localPort must be 1-65535",
                    listener.name
                ));
            }
            if !ports.insert(listener.local_port) {
                return bad(format!(
                    "outbound {}: port {} is used twice",
                    listener.name, listener.local_port
                ));
            }
            if !names.insert(listener.name.as_str()) {
                return bad(format!("mapping name {} is used twice", listener.name));
            }
        }
        let app_ports: BTreeSet<u16> = self.inbound.iter().map(|l| l.app_port).collect();
        let mut probes = BTreeSet::new();
        for probe in &self.app_probes {
            let what = format!("app probe {}/{}", probe.container, probe.kind);
            if !matches!(probe.kind.as_str(), "liveness" | "readiness" | "startup") {
                return bad(format!(
                    "{what}: kind must be liveness, readiness or startup"
                ));
            }
            // The container name is a path segment of the admin URL.
            if probe.container.is_empty() || probe.container.contains('/') {
                return bad(format!("{what}: container must be a container name"));
            }
            // Only ports the netfilter rules close are probed through the proxy: anything else
            // would make the admin port a way to reach other loopback services.
            if !app_ports.contains(&probe.port) {
                return bad(format!(
                    "{what}: port {} is not an inbound appPort",
                    probe.port
                ));
            }
            if let Some(http) = &probe.http
                && !http.path.starts_with('/')
            {
                return bad(format!("{what}: path must start with /"));
            }
            if !probes.insert((probe.container.as_str(), probe.kind.as_str())) {
                return bad(format!("{what} is listed twice"));
            }
        }
        Ok(())
    }

    /// The rewritten probe kubelet reaches at `path` on the admin port, if any.
    pub fn app_probe(&self, path: &str) -> Option<&AppProbe> {
        let rest = path.strip_prefix(APP_HEALTH_PREFIX)?;
        let (container, kind) = rest.split_once('/')?;
        self.app_probes
            .iter()
            .find(|p| p.container == container && p.kind == kind)
    }
}

/// A peer identity pattern: an IAM role ARN or a SPIFFE ID, where `*` matches any run of
/// characters (including none, and including `/`).
///
/// A role pattern is matched against the whole role ARN the peer's certificate carries, exactly
/// as it was annotated on the peer's ServiceAccount, path included: `role/app` matches only the
/// role `app` without a path, `role/prod/app` only `app` under the path `/prod/`, `role/prod/*`
/// every role under `/prod/` (and deeper), `role/*app` any role whose path and name end in `app`.
/// The partition and account are always written out: the cluster's OIDC issuer is public, so a
/// stranger's AWS account can hold a role named like ours that trusts a ServiceAccount, and only
/// the account tells the two apart (docs/security-model.md).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PeerPattern(pub String);

/// The partitions a role pattern may name, as [`crate::validate_role_arn`] admits them.
const PARTITIONS: &[&str] = &["aws", "aws-cn", "aws-us-gov", "aws-iso", "aws-iso-b"];

impl PeerPattern {
    pub fn new(pattern: &str) -> Result<Self, ProfileError> {
        let pattern = Self(pattern.to_string());
        pattern.validate()?;
        Ok(pattern)
    }

    /// Refuses what cannot be a peer pattern, and role patterns whose partition or account is
    /// not written out: a wildcard there would admit roles of AWS accounts nobody here controls.
    fn validate(&self) -> Result<(), ProfileError> {
        let invalid = |why: String| {
            Err(ProfileError::InvalidProxyConfig(format!(
                "peer pattern {:?}: {why}",
                self.0
            )))
        };
        if self.0.starts_with("spiffe://") {
            return Ok(());
        }
        let Some(rest) = self.0.strip_prefix("arn:") else {
            return invalid(
                "must be an IAM role ARN (arn:...) or a SPIFFE ID (spiffe://...)".to_string(),
            );
        };
        let fields: Vec<&str> = rest.splitn(5, ':').collect();
        let [partition, service, region, account, resource] = fields.as_slice() else {
            return invalid(
                "must have the shape arn:<partition>:iam::<12-digit account>:role/<name>"
                    .to_string(),
            );
        };
        if !PARTITIONS.contains(partition) {
            return invalid(format!(
                "the partition field must be one of {} written out, not {partition:?}; wildcards are not allowed there",
                PARTITIONS.join(", ")
            ));
        }
        if *service != "iam" || !region.is_empty() {
            return invalid(
                "must have the shape arn:<partition>:iam::<12-digit account>:role/<name>"
                    .to_string(),
            );
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return invalid(format!(
                "the account field must be a 12-digit AWS account ID, not {account:?}; wildcards are not allowed there (a role of the same name in another AWS account can trust this cluster's ServiceAccounts): list one pattern per account"
            ));
        }
        let name_ok = resource.strip_prefix("role/").is_some_and(|name| {
            !name.is_empty()
                && name.len() <= 512
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_/*-".contains(&b))
        });
        if !name_ok {
            return invalid(
                "after the account must come role/<path/><name> (letters, digits, +=,.@_/- and *)"
                    .to_string(),
            );
        }
        Ok(())
    }

    /// Whether a peer with this SPIFFE ID and role matches: a role pattern against the whole
    /// role ARN (path included), a SPIFFE pattern against the whole SPIFFE ID.
    pub fn matches(&self, spiffe_id: &str, role_arn: &str) -> bool {
        let subject = if self.0.starts_with("arn:") {
            role_arn
        } else {
            spiffe_id
        };
        glob_match(self.0.as_bytes(), subject.as_bytes())
    }
}

/// `*` matches any run of bytes; everything else matches itself. Iterative with backtracking to
/// the last star, so it is linear in practice and never recursive.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    #[test]
    fn cores_settings_parse_and_bad_ones_say_what_is_allowed() {
        assert_eq!("7".parse::<CoresSetting>().unwrap().to_string(), "7");
        assert_eq!("auto".parse::<CoresSetting>(), Ok(CoresSetting::Auto));
        assert_eq!("".parse::<CoresSetting>(), Ok(CoresSetting::Auto));
        assert_eq!(
            "3".parse::<CoresSetting>(),
            Ok(CoresSetting::Fixed(std::num::NonZeroUsize::new(3).unwrap()))
        );
        for bad in ["0", "-1", "1.5", "two"] {
            let error = bad.parse::<CoresSetting>().unwrap_err();
            assert!(error.contains("\"auto\"") && error.contains(bad), "{error}");
        }
    }

    use super::*;

    const ID: &str = "spiffe://rolemesh.local/ns/shop/sa/frontend";
    const ROLE: &str = "arn:aws:iam::111122223333:role/frontend";

    #[test]
    fn patterns_match_roles_and_spiffe_ids() {
        let yes = [
            ROLE,
            "arn:aws:iam::111122223333:role/*",
            ID,
            "spiffe://rolemesh.local/ns/shop/sa/*",
            "spiffe://rolemesh.local/*",
        ];
        for p in yes {
            assert!(PeerPattern::new(p).unwrap().matches(ID, ROLE), "{p}");
        }
        let no = [
            "arn:aws:iam::111122223333:role/backend",
            "arn:aws:iam::999999999999:role/*",
            "spiffe://rolemesh.local/ns/other/sa/*",
            "spiffe://other.domain/*",
            "arn:aws:iam::111122223333:role/front",
        ];
        for p in no {
            assert!(!PeerPattern::new(p).unwrap().matches(ID, ROLE), "{p}");
        }
        assert!(PeerPattern::new("frontend").is_err());
    }

    /// A role of the same name in a stranger's AWS account must never match,
    /// so neither the partition nor the account may be a wildcard, in a pattern the webhook
    /// builds (`PeerPattern::new`) or one the proxy reads from its configuration.
    #[test]
    fn wildcards_in_partition_or_account_are_refused() {
        // (pattern, words the refusal must contain)
        let rows = [
            ("arn:aws:iam::*:role/frontend", "account field"),
            ("arn:aws:iam::1111*:role/frontend", "account field"),
            ("arn:aws:iam::11112222333*:role/frontend", "account field"),
            ("arn:aws:iam::*3333:role/frontend", "account field"),
            ("arn:aws:iam:::role/frontend", "account field"),
            ("arn:aws:iam::1111222233334:role/frontend", "account field"),
            ("arn:*:iam::111122223333:role/frontend", "partition field"),
            (
                "arn:aws*:iam::111122223333:role/frontend",
                "partition field",
            ),
            (
                "arn:aws-*:iam::111122223333:role/frontend",
                "partition field",
            ),
            ("arn:*", "shape"),
            ("arn:aws:iam::*", "shape"),
            ("arn:aws:*:111122223333:role/frontend", "shape"),
            ("arn:aws:iam:*:111122223333:role/frontend", "shape"),
            ("arn:aws:iam::111122223333:*", "role/"),
            ("arn:aws:iam::111122223333:user/bob", "role/"),
            ("arn:aws:iam::111122223333:role/", "role/"),
            ("arn:aws:sts::111122223333:assumed-role/frontend/s", "shape"),
            ("frontend", "IAM role ARN"),
        ];
        for (pattern, words) in rows {
            let error = PeerPattern::new(pattern).expect_err(pattern).to_string();
            assert!(error.contains(words), "{pattern}: {error}");
        }
        // The same refusal when the proxy reads its peer rules.
        let json = r#"{"policy":"p","generation":1,"inbound":[{"name":"http","allow":["arn:aws:iam::*:role/frontend"]}]}"#;
        let error = PeerRules::from_json(json).unwrap_err().to_string();
        assert!(error.contains("account field"), "{error}");
        let json = r#"{"policy":"p","generation":1,"outbound":[{"name":"db","upstream":"db:5432","expect":["arn:aws*:iam::111122223333:role/db"]}]}"#;
        let error = PeerRules::from_json(json).unwrap_err().to_string();
        assert!(error.contains("partition field"), "{error}");
        // Every partition written out, and wildcards in the role's path and name, stay valid.
        for pattern in [
            "arn:aws:iam::111122223333:role/*",
            "arn:aws-cn:iam::111122223333:role/frontend",
            "arn:aws-us-gov:iam::111122223333:role/prod/*",
            "arn:aws-iso:iam::111122223333:role/*-frontend",
            "arn:aws-iso-b:iam::111122223333:role/a/b/c",
        ] {
            PeerPattern::new(pattern).expect(pattern);
        }
    }

    /// A role pattern is matched against the whole role ARN in the
    /// certificate, path included; `*` crosses `/`.
    #[test]
    fn role_patterns_match_the_whole_arn_with_its_path() {
        let plain = "arn:aws:iam::111122223333:role/app";
        let prod = "arn:aws:iam::111122223333:role/prod/app";
        let deep = "arn:aws:iam::111122223333:role/prod/eu/app";
        let stranger = "arn:aws:iam::999999999999:role/prod/app";
        // (pattern, matches plain, prod, deep, stranger)
        let rows = [
            (
                "arn:aws:iam::111122223333:role/app",
                [true, false, false, false],
            ),
            (
                "arn:aws:iam::111122223333:role/prod/app",
                [false, true, false, false],
            ),
            (
                "arn:aws:iam::111122223333:role/prod/*",
                [false, true, true, false],
            ),
            (
                "arn:aws:iam::111122223333:role/*/app",
                [false, true, true, false],
            ),
            (
                "arn:aws:iam::111122223333:role/*app",
                [true, true, true, false],
            ),
            (
                "arn:aws:iam::111122223333:role/*",
                [true, true, true, false],
            ),
            (
                "arn:aws:iam::111122223333:role/prod/ap",
                [false, false, false, false],
            ),
            (
                "arn:aws:iam::999999999999:role/prod/app",
                [false, false, false, true],
            ),
        ];
        for (pattern, expected) in rows {
            let pattern = PeerPattern::new(pattern).expect("valid pattern");
            let got = [plain, prod, deep, stranger].map(|role| pattern.matches(ID, role));
            assert_eq!(got, expected, "{}", pattern.0);
        }
    }

    #[test]
    fn config_round_trips_and_validates() {
        let config = ProxyConfig {
            trust_domain: "rolemesh.local".into(),
            identity_dir: default_identity_dir(),
            trust_bundle: default_trust_bundle(),
            rules_file: default_rules_file(),
            admin_port: DEFAULT_ADMIN_PORT,
            admin_address: default_admin_address(),
            inbound: vec![InboundListener {
                name: "http".into(),
                port: 8443,
                app_port: 8080,
                caller_identity: CallerIdentity::L4,
            }],
            outbound: vec![OutboundListener {
                name: "payments".into(),
                local_port: 9000,
            }],
            limits: Limits::default(),
            app_probes: vec![AppProbe {
                container: "app".into(),
                kind: "readiness".into(),
                port: 8080,
                http: Some(AppHttpProbe {
                    path: "/healthz".into(),
                    headers: vec![("Host".into(), "app.local".into())],
                }),
                timeout_secs: 1,
            }],
        };
        let parsed = ProxyConfig::from_json(&config.to_json()).unwrap();
        assert_eq!(parsed, config);
        assert_eq!(
            parsed.app_probe("/app-health/app/readiness"),
            Some(&config.app_probes[0])
        );
        assert_eq!(parsed.app_probe("/app-health/app/liveness"), None);
        assert_eq!(parsed.app_probe("/ready"), None);

        // The admin port must not become a way to reach loopback ports the rules do not close.
        let mut elsewhere = config.clone();
        elsewhere.app_probes[0].port = 22;
        let err = elsewhere.validate().unwrap_err().to_string();
        assert!(err.contains("port 22 is not an inbound appPort"), "{err}");
        let mut odd = config.clone();
        odd.app_probes[0].kind = "whenever".into();
        assert!(odd.validate().is_err());
        let mut twice = config.clone();
        twice.app_probes.push(twice.app_probes[0].clone());
        assert!(
            twice
                .validate()
                .unwrap_err()
                .to_string()
                .contains("listed twice")
        );

        let mut clash = config.clone();
        clash.outbound[0].local_port = 8443;
        assert!(
            clash
                .validate()
                .unwrap_err()
                .to_string()
                .contains("used twice")
        );
        let err = ProxyConfig::from_json(r#"{"trustDomain":"x","inbund":[]}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    /// `l4` is the default and is left out of the JSON (configurations written before the field
    /// existed read the same); the other modes round-trip under their API names.
    #[test]
    fn caller_identity_defaults_to_l4_and_is_written_only_when_not() {
        let listener: InboundListener =
            serde_json::from_str(r#"{"name":"web","port":8443,"appPort":8080}"#).unwrap();
        assert_eq!(listener.caller_identity, CallerIdentity::L4);
        assert!(
            !serde_json::to_string(&listener)
                .unwrap()
                .contains("callerIdentity")
        );
        for (mode, name) in [
            (CallerIdentity::ProxyProtocolV2, "proxyProtocolV2"),
            (CallerIdentity::Http, "http"),
        ] {
            let with = InboundListener {
                caller_identity: mode,
                ..listener.clone()
            };
            let json = serde_json::to_string(&with).unwrap();
            assert!(
                json.contains(&format!(r#""callerIdentity":"{name}""#)),
                "{json}"
            );
            assert_eq!(mode.as_str(), name);
            let back: InboundListener = serde_json::from_str(&json).unwrap();
            assert_eq!(back, with);
        }
        assert!(
            serde_json::from_str::<InboundListener>(
                r#"{"name":"web","port":8443,"appPort":8080,"callerIdentity":"tcp"}"#
            )
            .is_err()
        );
    }

    fn rules() -> PeerRules {
        PeerRules {
            policy: "shop".into(),
            generation: 3,
            inbound: vec![InboundRules {
                name: "http".into(),
                allow: vec![PeerPattern::new(ROLE).unwrap()],
            }],
            outbound: vec![OutboundRules {
                name: "payments".into(),
                upstream: "payments.shop.svc:8443".into(),
                expect: vec![
                    PeerPattern::new("spiffe://rolemesh.local/ns/shop/sa/payments").unwrap(),
                ],
            }],
        }
    }

    #[test]
    fn peer_rules_round_trip_and_validate() {
        let rules = rules();
        let parsed = PeerRules::from_json(&rules.to_json()).unwrap();
        assert_eq!(parsed, rules);
        assert_eq!(parsed.allow("http").map(<[_]>::len), Some(1));
        assert_eq!(parsed.allow("payments"), None);
        assert_eq!(
            parsed.outbound("payments").map(|o| o.upstream.as_str()),
            Some("payments.shop.svc:8443")
        );

        let mut no_expect = rules.clone();
        no_expect.outbound[0].expect.clear();
        let err = no_expect.validate().unwrap_err().to_string();
        assert!(err.contains("expect lists no identity"), "{err}");
        let mut no_port = rules.clone();
        no_port.outbound[0].upstream = "payments.shop.svc".into();
        let err = no_port.validate().unwrap_err().to_string();
        assert!(err.contains("upstream must be host:port"), "{err}");
        let mut twice = rules.clone();
        twice.outbound[0].name = "http".into();
        let err = twice.validate().unwrap_err().to_string();
        assert!(err.contains("used twice"), "{err}");
        let err = PeerRules::from_json(r#"{"policy":"p"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("generation"), "{err}");
        let err = PeerRules::from_json(r#"{"policy":"p","generation":1,"inbund":[]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    /// The configuration the webhook writes into the pod holds no peer rules: an admission
    /// answer must not tell its caller whom a namespace admits or dials.
    #[test]
    fn the_start_configuration_refuses_peer_rules() {
        for json in [
            r#"{"trustDomain":"x","inbound":[{"name":"http","port":8443,"appPort":8080,"allow":[]}]}"#,
            r#"{"trustDomain":"x","outbound":[{"name":"db","localPort":9000,"upstream":"db:5432"}]}"#,
            r#"{"trustDomain":"x","outbound":[{"name":"db","localPort":9000,"expect":[]}]}"#,
        ] {
            let err = ProxyConfig::from_json(json).unwrap_err().to_string();
            assert!(err.contains("unknown field"), "{json}: {err}");
        }
    }

    #[test]
    fn rules_keys_fit_a_configmap_key() {
        assert_eq!(policy_rules_key("web").as_deref(), Some("policy.web.json"));
        let longest = "a".repeat(MAX_RULES_POLICY_NAME);
        assert_eq!(policy_rules_key(&longest).map(|k| k.len()), Some(253));
        assert_eq!(policy_rules_key(&format!("{longest}a")), None);
    }
}
