//! The crate's one error type. Variants that describe a pod the webhook refuses carry the message
//! the person running `kubectl apply` reads, so they say what is wrong and what to do.

use std::time::Duration;

/// Everything that can go wrong in the webhook.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "rolemesh cannot inject pod {pod:?}: no MTLSPolicy in namespace {namespace:?} covers \
         ServiceAccount {service_account:?}. Create an MTLSPolicy in namespace {namespace:?} that \
         lists {service_account:?} in spec.serviceAccounts.names (or selects it with \
         spec.serviceAccounts.selector), or label the pod rolemesh.dev/inject=\"false\" to run it \
         outside the mesh"
    )]
    NotCovered {
        namespace: String,
        service_account: String,
        pod: String,
    },

    #[error(
        "rolemesh cannot inject this pod: it already has {kind} {name:?}, a name rolemesh reserves \
         for what it injects, but no rolemesh.dev/injected annotation; rename the {kind}"
    )]
    NameConflict { kind: &'static str, name: String },

    #[error(
        "rolemesh cannot inject this pod: it uses the node's network (spec.hostNetwork: true), \
         where the proxy's listeners would bind the node's ports and its outbound listeners would \
         be open to every process on the node; run it without hostNetwork, or label it \
         rolemesh.dev/inject=\"false\" to keep it outside the mesh"
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

    #[error("invalid admission request: {0}")]
    BadRequest(String),

    #[error("Kubernetes API error while {action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },

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
    pub(crate) fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let action = action.into();
        move |source| Self::Kube { action, source }
    }

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
                | Self::HostNetwork
                | Self::MountConflict { .. }
                | Self::InvalidPolicy { .. }
                | Self::NoTrustDomain { .. }
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
