//! The crate's one error type. Variants that describe a pod the webhook refuses carry the message
//! the person running `kubectl apply` reads, so they say what is wrong and what to do.

use std::{sync::Arc, time::Duration};

/// Everything that can go wrong in the webhook.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "rolemesh cannot inject pod {pod:?}: no MTLSPolicy in namespace {namespace:?} covers \
         ServiceAccount {service_account:?}. Create an MTLSPolicy in namespace {namespace:?} that \
         lists {service_account:?} in spec.serviceAccounts.names (or selects it with \
         spec.serviceAccounts.selector), or label the pod rolemesh.dev/inject=disabled to run it \
         outside the mesh"
    )]
    NotCovered {
        namespace: String,
        service_account: String,
        pod: String,
    },

    #[error(
        "rolemesh cannot inject this pod: it defines {kind} {name:?} itself ({why}), and rolemesh \
         reserves that name for what it injects; remove or rename the {kind} (a pod cannot bring \
         its own rolemesh proxy, identity volume or trust volume, whatever its annotations say)"
    )]
    NameConflict {
        kind: &'static str,
        name: String,
        why: String,
    },

    #[error(
        "rolemesh cannot inject this pod: the {kind} probe of container {container:?} checks port \
         {port}, which the pod's network rules close to everything but the pod itself, and a \
         {probe} probe cannot be sent through the proxy's admin port; use an httpGet (HTTP) or \
         tcpSocket probe, or exec, or annotate the pod rolemesh.dev/protect-app-ports: \"false\" \
         (docs/security-model.md: the app port is then open to every pod)"
    )]
    ProbeNotRewritable {
        container: String,
        kind: &'static str,
        port: u16,
        probe: &'static str,
    },

    #[error(
        "rolemesh cannot inject this pod: its annotation {annotation}: {value:?} is not valid: \
         {why}; fix or remove the annotation"
    )]
    BadAnnotation {
        annotation: &'static str,
        value: String,
        why: String,
    },

    #[error(
        "rolemesh cannot inject this pod: it uses the node's network (spec.hostNetwork: true), \
         where the proxy's listeners would bind the node's ports and its outbound listeners would \
         be open to every process on the node; run it without hostNetwork, or label it \
         rolemesh.dev/inject=disabled to keep it outside the mesh"
    )]
    HostNetwork,

    #[error(
        "rolemesh cannot inject this pod: container {container:?} already mounts something at \
         {path}, where rolemesh mounts the trust bundle; move that mount"
    )]
    MountConflict { container: String, path: String },

    #[error(
        "rolemesh cannot inject this pod: MTLSPolicy {policy:?} cannot configure the proxy: {reason}"
    )]
    InvalidPolicy { policy: String, reason: String },

    #[error(
        "rolemesh cannot inject this pod: MTLSAuthority {authority:?} does not exist and the webhook \
         has no --trust-domain to fall back on; create the MTLSAuthority"
    )]
    NoTrustDomain { authority: String },

    #[error(
        "rolemesh refuses this pod: {0}. No real pod comes close to that limit; check what \
         generated the pod"
    )]
    PodTooLarge(String),

    #[error(
        "rolemesh's webhook is overloaded: {0}; retry, and if it persists look for a client \
         flooding the webhook (its metrics count refused connections and requests)"
    )]
    Overloaded(String),

    #[error("invalid webhook limits: {0}")]
    BadLimits(String),

    #[error("invalid admission request: {0}")]
    BadRequest(String),

    #[error("Kubernetes API error while {action}: {source}")]
    Kube {
        action: String,
        /// Shared: one request may answer several coalesced lookups.
        #[source]
        source: Arc<kube::Error>,
    },

    #[error(
        "rolemesh could not check {what} with the Kubernetes API: the webhook's budget of API \
         reads for lookups its caches cannot answer is spent (more of them than a cluster makes); \
         retry in a moment"
    )]
    ApiBudgetSpent { what: String },

    #[error("rolemesh could not decide within {0:?} (Kubernetes API too slow); retry")]
    Timeout(Duration),

    #[error("TLS: {0}")]
    Tls(String),

    #[error("identity profile: {0}")]
    Profile(#[from] rolemesh_profile::ProfileError),

    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }

    /// Whether the error is a verdict about the pod (a refusal the user must act on) rather than
    /// a failure of the webhook itself.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::NotCovered { .. }
                | Self::NameConflict { .. }
                | Self::ProbeNotRewritable { .. }
                | Self::HostNetwork
                | Self::BadAnnotation { .. }
                | Self::MountConflict { .. }
                | Self::InvalidPolicy { .. }
                | Self::NoTrustDomain { .. }
                | Self::PodTooLarge(_)
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
