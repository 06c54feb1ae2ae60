//! Every name the controller, the webhook and the CLI share: labels, annotations, and the names
//! and keys of the Secrets and ConfigMaps one of them writes and another reads. Defined here once
//! so that a rename cannot leave one component looking for what another no longer writes.

/// Standard label on everything rolemesh writes (Secrets, ConfigMaps).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`] on what rolemesh writes.
pub const MANAGED_BY_VALUE: &str = "rolemesh";
/// Label selector of everything rolemesh manages.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=rolemesh";

/// On a workload Secret: the MTLSPolicy that owns it.
pub const POLICY_LABEL: &str = "rolemesh.dev/policy";
/// On a workload Secret: the ServiceAccount whose identity it holds.
pub const SERVICE_ACCOUNT_LABEL: &str = "rolemesh.dev/service-account";

/// Set to any new value on an MTLSPolicy (all its ServiceAccounts) or a ServiceAccount to
/// re-issue its certificates with new keys.
pub const ROTATE_ANNOTATION: &str = "rolemesh.dev/rotate";
/// On a workload Secret: the policy's [`ROTATE_ANNOTATION`] value it was issued for, so that a
/// new value is recognised as a request.
pub const ISSUED_FOR_POLICY_ROTATION: &str = "rolemesh.dev/issued-for-policy-rotate";
/// On a workload Secret: the ServiceAccount's [`ROTATE_ANNOTATION`] value it was issued for.
pub const ISSUED_FOR_SA_ROTATION: &str = "rolemesh.dev/issued-for-serviceaccount-rotate";
/// On a workload Secret: how the role was verified at issuance (`sts` or `none`), for people.
/// The controller never reads it: anyone who can edit the Secret can change it, so the verdict
/// shown in status comes from the controller's own record (`status.workloads[].verifiedWith`).
pub const VERIFICATION_ANNOTATION: &str = "rolemesh.dev/verification";

/// Label on pods and namespaces that opts in to injection (`enabled`) or a pod out (`disabled`).
pub const INJECT_LABEL: &str = "rolemesh.dev/inject";
/// [`INJECT_LABEL`] values that opt in, on a pod or a namespace: `enabled` (the vocabulary of
/// Istio's and Linkerd's labels), and `true`, which pods took before 0.1.0.
pub const INJECT_ENABLED: &[&str] = &["enabled", "true"];
/// [`INJECT_LABEL`] values that opt a pod out, whatever its namespace says.
pub const INJECT_DISABLED: &[&str] = &["disabled", "false"];
/// Annotation recording the policy and generation a pod was injected from: `<policy>@<generation>`.
pub const INJECTED_ANNOTATION: &str = "rolemesh.dev/injected";
/// Annotation recording the mappings and ports the pod's proxy was started with
/// ([`crate::MTLSPolicy::start_ports`]), so the controller can tell which pods need a restart.
pub const PROXY_PORTS_ANNOTATION: &str = "rolemesh.dev/proxy-ports";
/// Annotation recording the proxy image injected.
pub const PROXY_IMAGE_ANNOTATION: &str = "rolemesh.dev/proxy-image";
/// On a pod, `"true"`: also point `SSL_CERT_FILE` of its containers at the trust bundle. Opt-in,
/// because the bundle holds only rolemesh's CAs: OpenSSL-based stacks and rustls-native-certs then
/// trust nothing else, and the app's other HTTPS calls (AWS APIs among them) fail.
pub const SSL_CERT_FILE_ANNOTATION: &str = "rolemesh.dev/ssl-cert-file";

/// On a pod, the runtime threads of its proxy: `"auto"` (from the proxy container's CPU limit) or
/// a number; overrides the chart's `proxy.cores` for that pod.
pub const PROXY_CORES_ANNOTATION: &str = "rolemesh.dev/proxy-cores";

/// On a pod, `"false"`: leave the inbound mappings' app ports open to other pods (no netfilter
/// init container, no probe rewrite). Plain-text traffic then reaches the app without mTLS or the
/// allow list; for apps that must be reached directly (docs/security-model.md).
pub const PROTECT_APP_PORTS_ANNOTATION: &str = "rolemesh.dev/protect-app-ports";

/// On the MTLSAuthority, any new value: rotate the CA in stages (prepare a new CA, activate it once
/// every trust bundle has reached the pods, retire the old one once nothing it signed is in use).
/// `kubectl rolemesh ca rotate` sets it; the value handled last is `status.lastRotateRequest`.
pub const CA_ROTATE_ANNOTATION: &str = "rolemesh.dev/ca-rotate";
/// On the MTLSAuthority, any new value: prepare a new CA (into every bundle, not signing) and
/// wait for [`CA_ACTIVATE_ANNOTATION`]; handled last: `status.lastPrepareRequest`.
pub const CA_PREPARE_ANNOTATION: &str = "rolemesh.dev/ca-prepare";
/// On the MTLSAuthority, the fingerprint of a prepared CA: activate it once its bundle has
/// reached the pods.
pub const CA_ACTIVATE_ANNOTATION: &str = "rolemesh.dev/ca-activate";
/// On the MTLSAuthority, the fingerprint of a CA to drop now: every certificate it signed is
/// re-issued under the active CA (a new one first when it is the active CA), then it leaves every
/// bundle without waiting for kubelet.
pub const CA_RETIRE_ANNOTATION: &str = "rolemesh.dev/ca-retire";

/// Prefix of an MTLSAuthority annotation that revokes one workload certificate:
/// `revoke.rolemesh.dev/<serial, lowercase hex>: <the certificate's notAfter, RFC 3339>`. The
/// controller lists the serial in a CRL it signs through the signer, published in every trust
/// bundle until that notAfter, and re-issues the workload. `kubectl rolemesh revoke` sets it.
pub const REVOKE_ANNOTATION_PREFIX: &str = "revoke.rolemesh.dev/";
/// On the MTLSAuthority: ServiceAccounts that get no certificate, as comma-separated
/// `<namespace>/<name>`; their Secrets are deleted (status reason `Blocked`). On the authority,
/// not the ServiceAccount, so that the namespace's users cannot lift it.
/// `kubectl rolemesh revoke --block` and `kubectl rolemesh unblock` edit it.
pub const BLOCKED_ANNOTATION: &str = "rolemesh.dev/blocked-service-accounts";

/// Suffix of a workload certificate Secret's name; see [`workload_secret_name`].
const WORKLOAD_SECRET_SUFFIX: &str = "-rolemesh-tls";

/// Name of the `kubernetes.io/tls` Secret holding a ServiceAccount's certificate (keys
/// [`TLS_CERT_KEY`], [`TLS_PRIVATE_KEY_KEY`], [`CA_CERT_KEY`]).
pub fn workload_secret_name(service_account: &str) -> String {
    format!("{service_account}{WORKLOAD_SECRET_SUFFIX}")
}

/// The keys of a workload Secret and of the trust bundle ConfigMap are the file names the proxy
/// reads once kubelet mounts them, so they are defined once, next to the proxy configuration.
pub use rolemesh_profile::proxy_config::{CA_CERT_KEY, TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY};

/// Each policy's peer rules are a key of the trust bundle ConfigMap (mounted into the proxy
/// alone), so the controller writes no other ConfigMap than it already does.
pub use rolemesh_profile::proxy_config::{policy_rules_key, rules_field_manager};

/// The trust bundle ConfigMap the controller keeps in every namespace a policy covers.
pub const TRUST_BUNDLE_CONFIGMAP: &str = "rolemesh-trust-bundle";
/// Key of the CA certificates (and CRLs) in the trust bundle ConfigMap, and the file name in the
/// pods' mount.
pub const TRUST_BUNDLE_KEY: &str = CA_CERT_KEY;

/// Secret (in rolemesh's namespace) holding the webhook's serving certificate, written by the
/// controller and read by the webhook.
pub const WEBHOOK_SERVING_SECRET: &str = "rolemesh-webhook-tls";
/// Secret (in rolemesh's namespace) holding the CA that signs the webhook's serving certificate.
pub const WEBHOOK_CA_SECRET: &str = "rolemesh-webhook-ca";
/// The MutatingWebhookConfiguration the chart installs, and the webhook Service's name.
pub const WEBHOOK_NAME: &str = "rolemesh-webhook";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_managed_selector_selects_the_managed_label() {
        assert_eq!(
            MANAGED_SELECTOR,
            format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")
        );
    }

    #[test]
    fn a_workload_secret_is_named_after_its_service_account() {
        assert_eq!(workload_secret_name("web"), "web-rolemesh-tls");
    }
}
