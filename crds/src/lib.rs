//! rolemesh's Kubernetes API (`rolemesh.dev/v1alpha1`).
//!
//! The doc comments on these types become the CRD descriptions that `kubectl explain` shows, and
//! the schema attributes become the validation the API server applies; `crdgen` writes the YAML
//! into the Helm chart and a test fails if the committed YAML differs from what these types make.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

mod coverage;
pub mod names;
pub mod reasons;
mod rules;

pub use coverage::{coverage_order, covering_policy};
/// The proxy configuration's own type, so the API and the proxy cannot disagree on the names.
pub use rolemesh_profile::proxy_config::CallerIdentity;

pub const GROUP: &str = "rolemesh.dev";
pub const VERSION: &str = "v1alpha1";

/// Go-style duration as the API server's CEL `duration()` understands it, e.g. `24h`, `90m`, `1h30m`.
const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$";
/// An IAM role ARN in any AWS partition, with an optional path.
pub const ROLE_ARN_PATTERN: &str =
    r"^arn:aws(-cn|-us-gov|-iso|-iso-b)?:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}$";
/// A peer identity: an IAM role ARN or a SPIFFE ID, where `*` matches any run of characters in
/// a role's path and name or in a SPIFFE ID. A role's partition and account are written out.
const PEER_PATTERN: &str = r"^(arn:aws(-cn|-us-gov|-iso|-iso-b)?:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/*-]{1,512}|spiffe://[a-z0-9.*-]+(/[A-Za-z0-9._*-]+)*)$";
/// CEL on each `allow`/`expect` item, so that the refusal of a wildcard partition or account
/// (which [`PEER_PATTERN`] refuses too, with a message that only quotes the regex) says which
/// field and what to write. In a valid pattern no `*` touches a `:` (roles and SPIFFE IDs hold
/// none after the scheme), so `:*` or `*:` means a wildcard partition or account, e.g.
/// `arn:aws:iam::*:role/x`. Two substring searches and no `matches()`: the API server refuses a
/// CRD whose rules could cost too much on a policy of 64 mappings of 256 patterns each, and a
/// third search or a regex per item already would.
const PEER_ACCOUNT_RULE: &str = "!self.contains(':*') && !self.contains('*:')";
const PEER_ACCOUNT_MESSAGE: &str = "the partition and account fields of an IAM role pattern must be written out, e.g. arn:aws:iam::111122223333:role/frontend: a wildcard there would admit a role of the same name in any AWS account, and anyone can create one that trusts this cluster's ServiceAccounts; list one pattern per account (* may stand in the role's path and name only)";
/// A 12-digit AWS account ID.
const ACCOUNT_RULE: &str = "self.matches('^[0-9]{12}$')";
const ACCOUNT_MESSAGE: &str = "allowedAccounts: each entry must be a 12-digit AWS account ID such as '111122223333' (quote it in YAML so it stays a string; keep leading zeros)";
/// A SPIFFE trust domain: lowercase DNS-like name.
const TRUST_DOMAIN_PATTERN: &str = r"^[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?$";
/// `host:port` for an outbound upstream.
const UPSTREAM_PATTERN: &str = r"^[A-Za-z0-9.-]{1,253}:[0-9]{1,5}$";
/// A Kubernetes object name (DNS-1123 subdomain).
const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$";

/// An MTLSPolicy gives the ServiceAccounts it covers an mTLS identity bound to their IAM role and
/// says which peers they accept connections from and which upstreams they call.
///
/// For each covered ServiceAccount the controller verifies the IRSA role annotation, keeps a
/// `kubernetes.io/tls` Secret with a short-lived certificate, and renews it before it expires.
/// Pods of those ServiceAccounts that opt in to injection get the rolemesh proxy, configured from
/// this policy's `inbound` and `outbound` mappings.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "rolemesh.dev",
    version = "v1alpha1",
    kind = "MTLSPolicy",
    plural = "mtlspolicies",
    singular = "mtlspolicy",
    shortname = "mtlsp",
    namespaced,
    status = "MTLSPolicyStatus",
    category = "rolemesh",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Workloads","type":"integer","description":"ServiceAccounts covered","jsonPath":".status.coveredServiceAccounts"}"#,
    printcolumn = r#"{"name":"Soonest Expiry","type":"string","description":"notAfter of the certificate that expires first","jsonPath":".status.soonestNotAfter"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"description":"The Ready condition's message","jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.inbound) || !has(self.outbound) || self.inbound.all(i, !self.outbound.exists(o, o.name == i.name))").message("an inbound and an outbound mapping have one name: mapping names are unique across both lists").field_path(".outbound"))]
#[x_kube(validation = Rule::new("!has(self.inbound) || !has(self.outbound) || self.inbound.all(i, !self.outbound.exists(o, o.localPort == i.port))").message("an outbound localPort is also an inbound port: the proxy listens on each once").field_path(".outbound"))]
pub struct MTLSPolicySpec {
    /// Which ServiceAccounts in this namespace the policy covers. A ServiceAccount is covered if
    /// it is named in `names` or matches `selector`. When several policies select one
    /// ServiceAccount, the oldest (then the first by name) covers it; the others show the
    /// condition `Conflicted` naming that policy.
    pub service_accounts: ServiceAccountSelector,

    /// Inbound mappings: for each, the proxy terminates mTLS on `port` and forwards plain TCP to
    /// the application on 127.0.0.1:`appPort`, admitting only the peers listed in `allow`, and
    /// tells the application who the peer is as `callerIdentity` says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, b.port == a.port))").message("two inbound mappings use one port: each needs a port of its own"))]
    pub inbound: Vec<InboundMapping>,

    /// Outbound mappings: for each, the proxy listens in plain TCP on 127.0.0.1:`localPort` and
    /// dials `upstream` over mTLS, requiring the upstream to present one of `expect`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, b.localPort == a.localPort))").message("two outbound mappings use one localPort: each needs a port of its own"))]
    pub outbound: Vec<OutboundMapping>,

    /// Lifetime and renewal of the certificates issued for the covered ServiceAccounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateSettings>,
}

/// Selects ServiceAccounts in the policy's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("size(self.names) > 0 || has(self.selector)").message("serviceAccounts needs at least one of names or selector").reason(kube::core::Reason::FieldValueRequired))]
pub struct ServiceAccountSelector {
    /// ServiceAccount names covered by this policy.
    #[serde(default)]
    #[schemars(length(max = 256), inner(regex(pattern = NAME_PATTERN), length(max = 253)))]
    pub names: Vec<String>,

    /// Label selector: every ServiceAccount in the namespace whose labels match is covered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// One inbound port of the proxy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct InboundMapping {
    /// Name of the mapping, used in metrics and logs.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"),
        length(max = 63)
    )]
    pub name: String,

    /// Port on which the proxy accepts mTLS connections from peers.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,

    /// Port of the application on 127.0.0.1 that accepted connections are forwarded to.
    #[schemars(range(min = 1, max = 65535))]
    pub app_port: u16,

    /// Peer identities allowed to connect: IAM role ARNs
    /// (`arn:aws:iam::111122223333:role/frontend`) or SPIFFE IDs
    /// (`spiffe://rolemesh.local/ns/shop/sa/frontend`); `*` matches any run of characters.
    /// An empty list admits no one. The partition and account of a role pattern are always
    /// written out (`*` only in the role's path and name), and a role pattern matches the whole
    /// role ARN, path included: `role/app` does not match `role/prod/app`; `role/prod/*` does.
    #[serde(default)]
    #[schemars(schema_with = "allow_schema")]
    pub allow: Vec<String>,

    /// How the application learns which peer is connected. `l4` (default): it does not; it sees
    /// a plain TCP connection from 127.0.0.1. `proxyProtocolV2`: each connection to the
    /// application starts with a PROXY protocol v2 header whose source address is the peer's,
    /// with TLVs PP2_TYPE_SSL (0x20: TLS version and cipher, client certificate verified), 0xE0
    /// (the peer's SPIFFE ID) and 0xE1 (the peer's IAM role ARN); the application must expect
    /// the header. `http`: for HTTP/1.1 and HTTP/2 (h2c, prior knowledge, e.g. gRPC)
    /// applications; the proxy forwards each request with the headers
    /// `x-rolemesh-peer-spiffe-id` and `x-rolemesh-peer-role-arn`, and removes any copies the
    /// peer sent; upgrade requests (WebSocket) are refused. A change reaches a pod only when it
    /// is re-created.
    #[serde(default, skip_serializing_if = "CallerIdentity::is_l4")]
    pub caller_identity: CallerIdentity,
}

/// One outbound port of the proxy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct OutboundMapping {
    /// Name of the mapping, used in metrics and logs.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"),
        length(max = 63)
    )]
    pub name: String,

    /// Port on 127.0.0.1 where the application connects in plain TCP.
    #[schemars(range(min = 1, max = 65535))]
    pub local_port: u16,

    /// The upstream to dial over mTLS, as `host:port` (for example `payments.shop.svc:8443`).
    #[schemars(regex(pattern = UPSTREAM_PATTERN), length(max = 260))]
    pub upstream: String,

    /// Identities the upstream must present (IAM role ARNs or SPIFFE IDs, `*` patterns allowed
    /// as in `inbound[].allow`: never in a role's partition or account).
    #[schemars(schema_with = "expect_schema")]
    pub expect: Vec<String>,
}

/// Certificate lifetime settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(has(self.renewBefore) ? self.renewBefore : '0s') < duration(has(self.duration) ? self.duration : '24h')").message("certificate.renewBefore must be shorter than certificate.duration (duration defaults to 24h)").field_path(".renewBefore"))]
pub struct CertificateSettings {
    /// How long each certificate is valid, as a Go duration (`24h`, `90m`). Default `24h`;
    /// between 10m and 720h (30 days): a certificate cannot be revoked, so its lifetime bounds
    /// how long a stolen key stays usable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('10m') && duration(self) <= duration('720h')").message("certificate.duration must be between 10m and 720h"))]
    pub duration: Option<String>,

    /// How long before expiry a certificate is renewed, as a Go duration. Default: one third of
    /// `duration`, with jitter so that certificates issued together do not renew together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    pub renew_before: Option<String>,
}

/// Observed state of an MTLSPolicy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MTLSPolicyStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready is True when every covered ServiceAccount has a valid certificate. Conflicted is
    /// True when an older policy covers some of the ServiceAccounts this one selects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub conditions: Vec<Condition>,

    /// Number of ServiceAccounts this policy covers.
    #[serde(default)]
    pub covered_service_accounts: i32,

    /// notAfter of the certificate that expires first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soonest_not_after: Option<Time>,

    /// One entry per covered ServiceAccount.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<WorkloadStatus>,

    /// The last rotation requested through the `rolemesh.dev/rotate` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation: Option<RotationRecord>,

    /// The pods injected from this policy: which generation each was injected from, and those
    /// whose proxy runs mappings or ports other than the current generation's. Peer rules
    /// (`allow`, `expect`, `upstream`) reach running pods without a restart; mappings and ports
    /// only when a pod is re-created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodsStatus>,
}

/// The pods injected from a policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodsStatus {
    /// How many pods were injected from each generation of the policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub generations: Vec<GenerationPods>,

    /// How many pods run a start configuration (mappings, ports, callerIdentity) other than the
    /// current generation's; re-create them (`kubectl rollout restart`) to apply it.
    #[serde(default)]
    pub stale_count: i32,

    /// The stale pods, at most 100 (by name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub stale: Vec<StalePod>,
}

/// Pods injected from one generation of a policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GenerationPods {
    /// The policy's `metadata.generation` the pods were injected from.
    pub generation: i64,
    /// How many pods.
    pub pods: i32,
}

/// A pod whose proxy runs an older start configuration than the policy's current generation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StalePod {
    /// The pod's name.
    pub name: String,
    /// The generation it was injected from.
    pub generation: i64,
    /// `PortsChanged` (its mappings, ports or callerIdentity differ from the current
    /// generation's) or
    /// `InjectedBeforeLiveRules` (its proxy has its peer rules in its environment and gets no
    /// policy edit at all).
    pub reason: String,
}

/// Identity and certificate of one covered ServiceAccount.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadStatus {
    /// The ServiceAccount's name.
    pub service_account: String,
    /// The IAM role ARN from the ServiceAccount's `eks.amazonaws.com/role-arn` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    /// SPIFFE ID in the certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// Whether the role was verified with STS (false when verification is off or failed).
    pub verified: bool,
    /// How this controller verified the role of the certificate `serial` names: `sts` once STS
    /// confirmed it. Absent when it was not verified (identityVerification `none`, or a
    /// certificate issued before `sts` was switched on): under `sts` such a certificate is
    /// verified with STS before `verified` says true, and its Secret is deleted if STS refuses.
    /// The controller takes this verdict only from its own status, never from the Secret, which
    /// the namespace's users can edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_with: Option<String>,
    /// When STS last confirmed the role of the certificate `serial` names. The controller asks
    /// again every `reverifyInterval` of its MTLSAuthority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<Time>,
    // The description lists every reason the controller writes (reasons.rs).
    #[schemars(schema_with = "workload_reason_schema")]
    pub reason: String,
    /// What happened and what to do about it, for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The Secret holding the certificate and key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Serial number of the current certificate, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Start of the current certificate's validity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Time>,
    /// End of the current certificate's validity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Time>,
}

/// A rotation on demand.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RotationRecord {
    /// When the rotation was carried out.
    pub time: Time,
    /// The annotation value that requested it.
    pub request: String,
    /// The ServiceAccounts whose certificates were re-issued.
    #[serde(default)]
    pub service_accounts: Vec<String>,
}

/// An MTLSAuthority is the certificate authority that signs workload certificates: the SPIFFE
/// trust domain, where the signing key lives (AWS KMS or a local Secret), and how workload
/// identities are verified. The controller uses the MTLSAuthority named in its configuration
/// (`default` unless told otherwise).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "rolemesh.dev",
    version = "v1alpha1",
    kind = "MTLSAuthority",
    plural = "mtlsauthorities",
    singular = "mtlsauthority",
    shortname = "mtlsa",
    status = "MTLSAuthorityStatus",
    category = "rolemesh",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Trust Domain","type":"string","jsonPath":".spec.trustDomain"}"#,
    printcolumn = r#"{"name":"Signer","type":"string","jsonPath":".spec.signer.type"}"#,
    printcolumn = r#"{"name":"CA Expiry","type":"string","jsonPath":".status.caNotAfter"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"description":"The Ready condition's message","jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MTLSAuthoritySpec {
    /// SPIFFE trust domain of issued identities: certificates carry
    /// `spiffe://<trustDomain>/ns/<namespace>/sa/<serviceaccount>`.
    /// Fixed once set: running proxies hold the trust domain in their configuration, so a change
    /// would make every peer's identity foreign to them. To move to another trust domain, install
    /// a second authority's mesh beside it (docs/rotation.md#changing-the-trust-domain).
    #[schemars(regex(pattern = TRUST_DOMAIN_PATTERN), length(max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("trustDomain cannot be changed: running proxies would refuse every identity of the new trust domain; see docs/rotation.md#changing-the-trust-domain"))]
    pub trust_domain: String,

    /// Where the CA's private key lives and how it signs.
    pub signer: SignerSpec,

    /// A CA certificate the user brings, e.g. an intermediate issued by an offline root for the
    /// signer's key. When absent the controller self-signs a CA certificate through the signer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaCertificateSource>,

    /// How a ServiceAccount's IRSA role annotation is verified before a certificate is issued.
    /// `sts` (default): the controller requests a token for the ServiceAccount and calls
    /// sts:AssumeRoleWithWebIdentity; only if STS accepts and returns the same role is a
    /// certificate issued. `none`: the annotation is trusted as written (for clusters without
    /// IRSA); every status entry then says it is unverified.
    #[serde(default)]
    pub identity_verification: IdentityVerification,

    /// The AWS accounts whose IAM roles may be certified, as 12-digit account IDs (quote them in
    /// YAML). The cluster's OIDC issuer is public: any AWS account can register it as an
    /// identity provider and create a role, named like one of ours, that trusts one of this
    /// cluster's ServiceAccounts, and STS then confirms that role honestly. A ServiceAccount
    /// whose annotated role is in an account not listed gets no certificate and its Secret is
    /// deleted (reason `AccountNotAllowed`); neither STS nor the signer is called for it. When
    /// absent, roles of every account are certified, as before this field existed, and the
    /// condition `AccountsRestricted` is False with reason `AnyAccountAllowed`: set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "allowed_accounts_schema")]
    pub allowed_accounts: Option<Vec<String>>,

    /// Lifetime of a CA certificate the controller self-signs, as a Go duration between 10m and
    /// 87600h (ten years). Default 8760h. The CA is renewed (a staged rotation) when a third of
    /// its life is left; see docs/rotation.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('10m') && duration(self) <= duration('87600h')").message("caDuration must be between 10m and 87600h"))]
    pub ca_duration: Option<String>,

    /// How often, under identityVerification `sts`, the controller asks STS again whether each
    /// ServiceAccount may still assume its role, as a Go duration between 1m and 24h. Default
    /// 1h, spread by ±10% per certificate. When the role no longer trusts the ServiceAccount its
    /// Secret is deleted; a re-verification that passes signs nothing and writes no Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1m') && duration(self) <= duration('24h')").message("reverifyInterval must be between 1m and 24h"))]
    pub reverify_interval: Option<String>,

    /// How long kubelet may take to bring a changed ConfigMap or Secret into running pods, as a
    /// Go duration between 10s and 1h. Default 2m: kubelet re-syncs each pod's volumes every
    /// `syncFrequency` (1m by default) with up to half of that again as jitter. A CA rotation
    /// waits this long twice: after every trust bundle holds the new CA, before it signs; and
    /// after every certificate has been re-issued under it, before the old CA leaves the bundles.
    /// Raise it on nodes with a longer syncFrequency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('10s') && duration(self) <= duration('1h')").message("bundlePropagation must be between 10s and 1h"))]
    pub bundle_propagation: Option<String>,
}

/// Where a CA is in its life; see `MTLSAuthorityStatus.cas`.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord,
)]
pub enum CaPhase {
    /// In every trust bundle, signing nothing yet.
    Prepared,
    /// Signs every new workload certificate.
    Active,
    /// Signs nothing; stays in the bundles while a certificate it signed may still be in use.
    Retiring,
}

impl CaPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            CaPhase::Prepared => "Prepared",
            CaPhase::Active => "Active",
            CaPhase::Retiring => "Retiring",
        }
    }
}

/// One CA certificate of the authority and its phase.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CaStatus {
    /// SHA-256 fingerprint of the CA certificate, hex.
    pub fingerprint: String,
    pub phase: CaPhase,
    /// The certificate's subject, as in `openssl x509 -subject`.
    pub subject: String,
    pub not_after: Time,
    /// When it entered this phase.
    pub since: Time,
    /// Prepared: when every trust bundle first held it. Retiring: when no certificate it signed
    /// was left in a workload Secret. The next phase follows `spec.bundlePropagation` later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_at: Option<Time>,
    /// Prepared: activate it once settled (a staged rotation or the automatic renewal), rather
    /// than waiting for `kubectl rolemesh ca activate`.
    #[serde(default)]
    pub auto_activate: bool,
}

/// The CA signing backend.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type == 'kms' ? has(self.kms) : true").message("signer.kms is required when signer.type is kms").field_path(".kms"))]
#[x_kube(validation = Rule::new("self.type == 'local' ? has(self.local) : true").message("signer.local is required when signer.type is local").field_path(".local"))]
pub struct SignerSpec {
    /// Which backend signs: `kms` (AWS KMS, the key never leaves KMS) or `local` (a key in a
    /// Secret, for development and clusters without AWS).
    #[serde(rename = "type")]
    pub signer_type: SignerType,

    /// AWS KMS settings, required when type is `kms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms: Option<KmsSigner>,

    /// Local signer settings, required when type is `local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalSigner>,
}

/// Signer backend kind.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum SignerType {
    Kms,
    #[default]
    Local,
}

/// An AWS KMS asymmetric signing key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct KmsSigner {
    /// Key ID, key ARN, alias name (`alias/rolemesh-ca`) or alias ARN of an `ECC_NIST_P256`
    /// `SIGN_VERIFY` key.
    #[schemars(length(min = 1, max = 2048))]
    pub key_id: String,
    /// AWS region of the key, e.g. `eu-west-1`.
    #[schemars(regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"), length(max = 32))]
    pub region: String,
}

/// A CA key held in a Secret in rolemesh's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LocalSigner {
    /// Name of the Secret (in rolemesh's namespace) holding the PKCS#8 key under `tls.key`.
    /// Created with a new ECDSA P-256 key if absent.
    #[schemars(regex(pattern = NAME_PATTERN), length(max = 253))]
    pub secret_name: String,
}

/// A CA certificate provided by the user.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CaCertificateSource {
    /// PEM CA certificate whose public key is the signer's key.
    #[schemars(length(min = 1, max = 65536))]
    pub certificate: String,
    /// PEM certificates from the CA's issuer up to and including the root; issued workload
    /// certificates carry them in `tls.crt`, and the trust bundle holds them with the CA, which
    /// it publishes as the only CA that may sign workload certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262144))]
    pub chain: Option<String>,
    /// PEM certificate revocation lists (`X509 CRL`) from the CA's issuers, e.g. the offline
    /// root's CRL that revokes a retired intermediate. Published with the trust bundle; proxies
    /// refuse every peer whose chain holds a certificate they list. A CRL whose issuer is not in
    /// `chain` has no effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262144))]
    pub crls: Option<String>,
}

/// Identity verification mode.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum IdentityVerification {
    #[default]
    Sts,
    None,
}

/// Observed state of an MTLSAuthority.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MTLSAuthorityStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready is True when the signer works and the CA certificate is valid.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// SHA-256 fingerprint of the CA certificate in use, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_fingerprint: Option<String>,
    /// notAfter of the CA certificate in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_not_after: Option<Time>,
    /// The trust bundle in force, PEM: the CA certificates rolemesh issues with or has issued
    /// with and that are still valid (with the chain the authority names above them), then the
    /// CRLs. Every `rolemesh-trust-bundle` ConfigMap holds exactly this. Only the controller
    /// writes it: an earlier CA stays trusted because it is recorded here (or is self-signed by
    /// the signer's key), never because a ConfigMap lists it, and `kubectl rolemesh inspect`
    /// verifies against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle: Option<String>,
    /// Every CA certificate of the bundle with its phase: at most one Prepared and one Active;
    /// Retiring ones until nothing they signed is in use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cas: Vec<CaStatus>,
    /// The last `rolemesh.dev/ca-rotate` value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotate_request: Option<String>,
    /// The last `rolemesh.dev/ca-prepare` value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_prepare_request: Option<String>,
    /// The workload certificates revoked (`revoke.rolemesh.dev/<serial>` annotations) that have
    /// not expired: every trust bundle holds a CRL listing them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<RevokedCertificate>,
}

/// A revoked workload certificate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RevokedCertificate {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Until when the CRLs list it (the certificate's notAfter).
    pub not_after: Time,
}

fn workload_reason_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let names: Vec<&str> = reasons::Reason::ALL.iter().map(|r| r.as_str()).collect();
    let description = format!(
        "Machine-readable reason for the current state, one of: {}. docs/operations.md says \
         what each means and what to do.",
        names.join(", ")
    );
    // A JSON object is always a valid schema; the fallback is never taken.
    schemars::Schema::try_from(serde_json::json!({"type": "string", "description": description}))
        .unwrap_or_default()
}

/// A list of strings, each checked by `pattern` and the CEL `rules` (rule, message).
fn string_list_schema(
    min_items: Option<u32>,
    max_items: u32,
    max_length: u32,
    pattern: Option<&str>,
    rules: &[(&str, &str)],
) -> schemars::Schema {
    let rules: Vec<serde_json::Value> = rules
        .iter()
        .map(|(rule, message)| serde_json::json!({ "rule": rule, "message": message }))
        .collect();
    let mut schema = serde_json::json!({
        "type": "array",
        "maxItems": max_items,
        "items": {
            "type": "string",
            "maxLength": max_length,
            "x-kubernetes-validations": rules,
        },
    });
    if let Some(pattern) = pattern {
        schema["items"]["pattern"] = pattern.into();
    }
    if let Some(min) = min_items {
        schema["minItems"] = min.into();
    }
    // A JSON object is always a valid schema; the fallback is never taken.
    schemars::Schema::try_from(schema).unwrap_or_default()
}

fn allow_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    string_list_schema(
        None,
        256,
        600,
        Some(PEER_PATTERN),
        &[(PEER_ACCOUNT_RULE, PEER_ACCOUNT_MESSAGE)],
    )
}

fn expect_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    string_list_schema(
        Some(1),
        256,
        600,
        Some(PEER_PATTERN),
        &[(PEER_ACCOUNT_RULE, PEER_ACCOUNT_MESSAGE)],
    )
}

fn allowed_accounts_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = string_list_schema(None, 1000, 12, None, &[(ACCOUNT_RULE, ACCOUNT_MESSAGE)]);
    // Duplicates are refused; an empty list would certify nothing and is surely a mistake for
    // "any account", which is written by leaving the field out.
    schema.insert("x-kubernetes-list-type".into(), "set".into());
    schema.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([{
            "rule": "size(self) > 0",
            "message": "allowedAccounts must list at least one 12-digit AWS account ID; leave the field out to certify roles of any account (not recommended)",
        }]),
    );
    schema
}

/// All CRDs, in the order they are written.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![MTLSAuthority::crd(), MTLSPolicy::crd()]
}

/// Plain manifests, for `kubectl apply -f deploy/crds.yaml`.
pub const PLAIN_CRDS_PATH: &str = "deploy/crds.yaml";
/// The Helm chart's CRDs, in the chart's `crds/` directory: `helm install` creates them before it
/// renders the templates (so the chart's own `MTLSAuthority` maps on a cluster that has never
/// seen rolemesh), and neither `helm upgrade` nor `helm uninstall` touches them (see the chart's
/// README for upgrades).
pub const CHART_CRDS_PATH: &str = "charts/rolemesh/crds/rolemesh.dev.yaml";

const HEADER: &str = "# Generated from crds/src/lib.rs by `make crds`; do not edit by hand.\n";

/// The CRDs as one multi-document YAML file.
pub fn crds_yaml() -> Result<String, yaml_serde::Error> {
    let mut out = String::from(HEADER);
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&yaml_serde::to_string(&crd)?);
    }
    Ok(out)
}

/// Every generated file, as (path relative to the repository root, content).
pub fn generated_files() -> Result<Vec<(&'static str, String)>, yaml_serde::Error> {
    Ok(vec![
        (PLAIN_CRDS_PATH, crds_yaml()?),
        (CHART_CRDS_PATH, crds_yaml()?),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema of `field` in the first CRD whose kind is `kind`, found by walking properties.
    fn schema_at(kind: &str, path: &[&str]) -> serde_json::Value {
        let crd = crds()
            .into_iter()
            .find(|c| c.spec.names.kind == kind)
            .expect("CRD");
        let mut node =
            serde_json::to_value(&crd.spec.versions[0].schema).expect("schema")["openAPIV3Schema"]
                .clone();
        for step in path {
            node = if *step == "[]" {
                node["items"].clone()
            } else {
                node["properties"][*step].clone()
            };
        }
        node
    }

    /// A mirror of [`PEER_ACCOUNT_RULE`] in Rust, for the table below; the rule's text is
    /// checked to be exactly what this mirrors, and e2e/tests/security.rs checks the API server.
    fn peer_account_rule(pattern: &str) -> bool {
        !pattern.contains(":*") && !pattern.contains("*:")
    }

    /// No wildcard in a role pattern's partition or account at the API, with
    /// a CEL message that names the fields and says what to write.
    #[test]
    fn peer_patterns_refuse_wildcard_partitions_and_accounts() {
        assert_eq!(
            PEER_ACCOUNT_RULE,
            "!self.contains(':*') && !self.contains('*:')"
        );
        let regex = regex::Regex::new(PEER_PATTERN).expect("PEER_PATTERN compiles");
        // (pattern, the regex admits it, the CEL rule admits it)
        let rows = [
            ("arn:aws:iam::111122223333:role/frontend", true, true),
            ("arn:aws:iam::111122223333:role/prod/*", true, true),
            ("arn:aws:iam::111122223333:role/*-web", true, true),
            ("arn:aws-us-gov:iam::111122223333:role/a/b", true, true),
            ("spiffe://rolemesh.local/ns/shop/sa/*", true, true),
            ("spiffe://*.example/ns/a/sa/b", true, true),
            ("arn:aws:iam::*:role/frontend", false, false),
            ("arn:aws:iam::11112222333*:role/frontend", false, false),
            ("arn:aws:iam::*11122223333:role/frontend", false, false),
            ("arn:aws:iam::1111*2222333:role/frontend", false, true),
            ("arn:*:iam::111122223333:role/frontend", false, false),
            ("arn:aws*:iam::111122223333:role/frontend", false, false),
            ("arn:aws:iam::12345:user/bob", false, true),
        ];
        for (pattern, by_regex, by_rule) in rows {
            assert_eq!(regex.is_match(pattern), by_regex, "regex on {pattern}");
            assert_eq!(peer_account_rule(pattern), by_rule, "rule on {pattern}");
        }
        for path in [
            &["spec", "inbound", "[]", "allow", "[]"][..],
            &["spec", "outbound", "[]", "expect", "[]"][..],
        ] {
            let items = schema_at("MTLSPolicy", path);
            assert_eq!(items["pattern"], PEER_PATTERN, "{path:?}");
            assert_eq!(items["maxLength"], 600, "{path:?}");
            let rule = &items["x-kubernetes-validations"][0];
            assert_eq!(rule["rule"], PEER_ACCOUNT_RULE, "{path:?}");
            let message = rule["message"].as_str().expect("message");
            for words in [
                "partition and account fields",
                "arn:aws:iam::111122223333:role/",
            ] {
                assert!(message.contains(words), "{message}");
            }
        }
        // The lists keep their bounds (the rule's cost is estimated from them).
        assert_eq!(
            schema_at("MTLSPolicy", &["spec", "inbound", "[]", "allow"])["maxItems"],
            256
        );
        let expect = schema_at("MTLSPolicy", &["spec", "outbound", "[]", "expect"]);
        assert_eq!(
            (expect["minItems"].clone(), expect["maxItems"].clone()),
            (1.into(), 256.into())
        );
    }

    /// `callerIdentity` is an optional enum of the proxy configuration's own names, `l4` when
    /// absent, and absent again when written back as `l4`.
    #[test]
    fn caller_identity_is_an_optional_enum_defaulting_to_l4() {
        let field = schema_at("MTLSPolicy", &["spec", "inbound", "[]", "callerIdentity"]);
        assert_eq!(field["type"], "string");
        assert_eq!(
            field["enum"],
            serde_json::json!(["l4", "proxyProtocolV2", "http"])
        );
        let description = field["description"].as_str().expect("description");
        for words in ["0xE0", "0xE1", "x-rolemesh-peer-role-arn", "re-created"] {
            assert!(description.contains(words), "{words}: {description}");
        }
        let item = schema_at("MTLSPolicy", &["spec", "inbound", "[]"]);
        assert!(
            !item["required"]
                .as_array()
                .expect("required")
                .contains(&"callerIdentity".into())
        );
        let mapping: InboundMapping =
            serde_json::from_value(serde_json::json!({"name": "a", "port": 1, "appPort": 2}))
                .expect("mapping");
        assert_eq!(mapping.caller_identity, CallerIdentity::L4);
        assert!(
            !serde_json::to_string(&mapping)
                .expect("json")
                .contains("callerIdentity")
        );
    }

    /// `allowedAccounts` is optional, a set of 12-digit account IDs checked
    /// by CEL, never empty.
    #[test]
    fn allowed_accounts_are_twelve_digit_ids() {
        let field = schema_at("MTLSAuthority", &["spec", "allowedAccounts"]);
        assert_eq!(field["type"], "array");
        assert_eq!(field["x-kubernetes-list-type"], "set");
        assert_eq!(
            field["x-kubernetes-validations"][0]["rule"],
            "size(self) > 0"
        );
        assert_eq!(field["items"]["maxLength"], 12);
        assert_eq!(
            field["items"]["x-kubernetes-validations"][0]["rule"],
            ACCOUNT_RULE
        );
        let description = field["description"].as_str().expect("description");
        let description = description.split_whitespace().collect::<Vec<_>>().join(" ");
        for words in ["OIDC issuer is public", "AccountNotAllowed", "When absent"] {
            assert!(description.contains(words), "{words}: {description}");
        }
        let spec = schema_at("MTLSAuthority", &["spec"]);
        let required: Vec<&str> = spec["required"]
            .as_array()
            .expect("required")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(!required.contains(&"allowedAccounts"), "{required:?}");
        // The field round-trips, and absent stays absent (any account, with a warning).
        let spec: MTLSAuthoritySpec = serde_json::from_value(serde_json::json!({
            "trustDomain": "t", "signer": {"type": "local", "local": {"secretName": "k"}},
        }))
        .expect("spec");
        assert_eq!(spec.allowed_accounts, None);
        assert!(
            !serde_json::to_string(&spec)
                .expect("json")
                .contains("allowedAccounts")
        );
    }
}
