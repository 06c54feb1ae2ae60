//! Every reason the controller shows in status, defined once: the controller writes them, and
//! the CRD's description of a workload's `reason` lists them (so `kubectl explain` shows the
//! names the controller really writes).

macro_rules! reasons {
    ($($(#[doc = $doc:literal])+ $variant:ident,)+) => {
        /// Every reason the controller shows in a condition or a workload's status entry, and
        /// counts in metrics. The string form is the variant's name.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[doc = $doc])+ $variant,)+
        }

        impl Reason {
            /// All reasons, for documentation.
            pub const ALL: &[Reason] = &[$(Reason::$variant,)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => stringify!($variant),)+
                }
            }

            /// What the reason means, for a person.
            pub fn description(self) -> &'static str {
                match self {
                    $(Reason::$variant => concat!($($doc),+).trim_ascii(),)+
                }
            }
        }
    };
}

reasons! {
    /// A certificate was issued after STS verified the role.
    Issued,
    /// A certificate was issued without verifying the role (identityVerification: none).
    IssuedUnverified,
    /// Every covered ServiceAccount has a valid certificate.
    CertificatesIssued,
    /// The policy covers no ServiceAccount.
    NoServiceAccounts,
    /// A listed ServiceAccount does not exist.
    ServiceAccountNotFound,
    /// An older MTLSPolicy also selects the ServiceAccount and covers it.
    CoveredByAnotherPolicy,
    /// The policy selects ServiceAccounts an older MTLSPolicy covers.
    OverlapsPolicy,
    /// No older MTLSPolicy covers a ServiceAccount this policy selects.
    NoOverlap,
    /// The certificate Secret's name is taken by a Secret of another policy.
    SecretOwnedByAnotherPolicy,
    /// A Secret that rolemesh did not create for this policy has the certificate Secret's name
    /// (no rolemesh label and owner reference to the policy, or not an editable
    /// `kubernetes.io/tls` Secret): it is never overwritten, no token, STS or signer call is made
    /// for it, and the name is looked at again every few minutes. Rename or delete that Secret.
    SecretNameTaken,
    /// The certificate Secret lost its PEM fields.
    SecretUnreadable,
    /// The ServiceAccount's SPIFFE ID or role cannot be put in a certificate.
    InvalidIdentity,
    /// The ServiceAccount has no IRSA role annotation.
    MissingRoleAnnotation,
    /// The IRSA role annotation is not an IAM role ARN.
    InvalidRoleArn,
    /// A token for the ServiceAccount could not be requested to verify its role.
    TokenRequestFailed,
    /// The annotated role is in an AWS account that the MTLSAuthority's `allowedAccounts` does
    /// not list: no certificate, the Secret is deleted, and neither STS nor the signer is called.
    AccountNotAllowed,
    /// STS refused to assume the role with the ServiceAccount's token (an error code that says
    /// no, e.g. AccessDenied, InvalidIdentityToken): the Secret is deleted.
    StsRefused,
    /// STS answered but could not decide now (Throttling, IDPCommunicationError, InternalFailure,
    /// a 5xx): transient, the existing certificate is kept and verification is retried with
    /// backoff.
    StsUnavailable,
    /// STS could not be reached to verify the role (network, timeout): transient, the existing
    /// certificate is kept and verification is retried with backoff.
    StsUnreachable,
    /// STS assumed a role other than the annotated one.
    RoleMismatch,
    /// The MTLSAuthority's `rolemesh.dev/blocked-service-accounts` names the ServiceAccount
    /// (`kubectl rolemesh revoke --block`): no certificate, the Secret is deleted, until
    /// `kubectl rolemesh unblock`.
    Blocked,
    /// A `revoke.rolemesh.dev/<serial>` annotation of the MTLSAuthority is malformed and was
    /// ignored (a Warning Event on the authority says which and why).
    RevocationIgnored,
    /// The CA is not established yet.
    CaNotReady,
    /// The CA is established and signs.
    CaReady,
    /// The MTLSAuthority lists the AWS accounts whose roles may be certified.
    AccountsRestricted,
    /// The MTLSAuthority has no `allowedAccounts`: roles of any AWS account are certified,
    /// including a stranger's role that trusts this cluster's public OIDC issuer.
    AnyAccountAllowed,
    /// ConfigMap `rolemesh-ca` held a certificate that is not a CA rolemesh made, the
    /// MTLSAuthority names or its status records; it was left out of the trust bundle (an Event
    /// on the MTLSAuthority names its SHA-256 fingerprint).
    ForeignCertificateRefused,
    /// The signer throttled a signing call.
    SignerThrottled,
    /// The signer refused a signing call (IAM).
    SignerAccessDenied,
    /// The signer's key is disabled.
    SignerKeyDisabled,
    /// The signer is unavailable.
    SignerUnavailable,
    /// The signer could not be reached.
    SignerUnreachable,
    /// A signing call failed otherwise.
    SignerFailed,
    /// The signer's key cannot be used as the CA key.
    SignerUnusable,
    /// The local signing key Secret is unusable.
    LocalKeyUnusable,
    /// A certificate could not be built.
    BuildFailed,
    /// The CA certificate given in the MTLSAuthority is unusable.
    CaCertificateUnusable,
    /// The configured MTLSAuthority does not exist.
    AuthorityMissing,
    /// The MTLSAuthority is invalid.
    AuthorityInvalid,
    /// A Kubernetes API call failed.
    KubernetesApiError,
    /// The policy's certificate settings are invalid.
    InvalidPolicy,
    /// The controller lost its leader lease.
    LostLease,
    /// The metrics listener failed.
    ServeMetrics,
    /// The controller's caches could not be filled.
    CachesNotFilled,
    /// The webhook's serving certificate or caBundle could not be maintained.
    WebhookTlsFailed,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
