use std::time::Duration;

use crate::status::Reason;

/// Why a signing call failed, as operators act on it: wait (throttled, unavailable, network), fix
/// IAM (denied), or fix the key (disabled).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SignFailure {
    Throttled,
    Denied,
    KeyDisabled,
    Unavailable,
    Network,
    Other,
}

impl SignFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Throttled => "throttled",
            Self::Denied => "denied",
            Self::KeyDisabled => "key_disabled",
            Self::Unavailable => "unavailable",
            Self::Network => "network",
            Self::Other => "other",
        }
    }

    /// The status reason shown for a policy whose issuance failed this way.
    pub fn reason(self) -> Reason {
        match self {
            Self::Throttled => Reason::SignerThrottled,
            Self::Denied => Reason::SignerAccessDenied,
            Self::KeyDisabled => Reason::SignerKeyDisabled,
            Self::Unavailable => Reason::SignerUnavailable,
            Self::Network => Reason::SignerUnreachable,
            Self::Other => Reason::SignerFailed,
        }
    }
}

/// Every failure of the controller library, named after the action that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to sign with {signer}: {class} ({message})", class = .failure.as_str())]
    Sign {
        signer: String,
        failure: SignFailure,
        message: String,
    },
    #[error("failed to read the public key of {signer}: {message}")]
    SignerPublicKey { signer: String, message: String },
    #[error(
        "KMS key {key_id} is not an ECC_NIST_P256 SIGN_VERIFY key ({found}); create one with --key-spec ECC_NIST_P256 --key-usage SIGN_VERIFY"
    )]
    UnsuitableKmsKey { key_id: String, found: String },
    #[error("failed to load the local signing key from Secret {namespace}/{name}: {message}")]
    LocalKey {
        namespace: String,
        name: String,
        message: String,
    },
    #[error("failed to build a certificate: {0}")]
    BuildCertificate(String),
    #[error("the CA certificate in MTLSAuthority {authority} is unusable: {message}")]
    UserCa { authority: String, message: String },
    #[error("MTLSAuthority {name} not found; create it (see deploy/examples/authority.yaml)")]
    AuthorityMissing { name: String },
    #[error("MTLSAuthority {name} is invalid: {message}")]
    AuthorityInvalid { name: String, message: String },
    #[error("failed to {action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("invalid certificate settings in MTLSPolicy: {0}")]
    InvalidPolicy(String),
    #[error("lost the leader lease {lease}: {message}")]
    LostLease { lease: String, message: String },
    #[error(
        "failed to fill the Secret and ServiceAccount caches: their watches stopped (the controller is shutting down)"
    )]
    CachesNotFilled,
    #[error("failed to maintain the webhook's TLS material: {0}")]
    WebhookTls(String),
    #[error("failed to serve metrics on {address}: {source}")]
    ServeMetrics {
        address: String,
        source: std::io::Error,
    },
}

impl Error {
    pub fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let action = action.into();
        move |source| Self::Kube { action, source }
    }

    /// The reason label used in metrics and status for this error.
    pub fn reason(&self) -> Reason {
        match self {
            Self::Sign { failure, .. } => failure.reason(),
            Self::SignerPublicKey { .. } | Self::UnsuitableKmsKey { .. } => Reason::SignerUnusable,
            Self::LocalKey { .. } => Reason::LocalKeyUnusable,
            Self::BuildCertificate(_) => Reason::BuildFailed,
            Self::UserCa { .. } => Reason::CaCertificateUnusable,
            Self::AuthorityMissing { .. } => Reason::AuthorityMissing,
            Self::AuthorityInvalid { .. } => Reason::AuthorityInvalid,
            Self::Kube { .. } => Reason::KubernetesApiError,
            Self::InvalidPolicy(_) => Reason::InvalidPolicy,
            Self::LostLease { .. } => Reason::LostLease,
            Self::ServeMetrics { .. } => Reason::ServeMetrics,
            Self::CachesNotFilled => Reason::CachesNotFilled,
            Self::WebhookTls(_) => Reason::WebhookTlsFailed,
        }
    }

    /// How long to wait before retrying after this error.
    pub fn backoff(&self) -> Duration {
        match self {
            Self::Sign {
                failure: SignFailure::Throttled,
                ..
            } => Duration::from_secs(5),
            Self::Sign { .. } | Self::Kube { .. } => Duration::from_secs(10),
            _ => Duration::from_secs(30),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
