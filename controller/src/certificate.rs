//! Workload certificates and their Secrets: issuing one, and deciding whether the one a Secret
//! holds is still good (whole, chained to the CA in force, the right identity, not due).

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::api::ObjectMeta;
use rcgen::{Issuer, KeyPair, PublicKeyData};
use rolemesh_crds::{
    IdentityVerification,
    names::{
        CA_CERT_KEY, ISSUED_FOR_POLICY_ROTATION, ISSUED_FOR_SA_ROTATION, MANAGED_BY_LABEL,
        MANAGED_BY_VALUE, POLICY_LABEL, SERVICE_ACCOUNT_LABEL, TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY,
        VERIFICATION_ANNOTATION, workload_secret_name,
    },
};
use rolemesh_profile::{
    CertificateInfo, CertificateProfile, IssuedCertificate, TrustStore, Usage, WorkloadIdentity,
    inspect::{TrustBundle, certificates_from_pem},
    inspect_certificate,
    profile::{BACKDATE, generate_workload_key},
    verify_chain_der,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;

use crate::{
    ca::{CaState, pem_of, sign_certificate},
    error::{Error, Result},
    identity::Refusal,
};

/// Issues a workload certificate for `identity`, naming `dns_names` too: a new key, one Sign
/// call.
pub async fn issue_certificate(
    ca: &CaState,
    identity: &WorkloadIdentity,
    dns_names: &[String],
    profile: &CertificateProfile,
) -> Result<IssuedCertificate> {
    let now = OffsetDateTime::now_utc();
    let key = generate_workload_key().map_err(|e| Error::BuildCertificate(e.to_string()))?;
    let params = profile
        .leaf_params(identity, dns_names, now)
        .map_err(|e| Error::BuildCertificate(e.to_string()))?;
    let ca_der = ca.ca_der.clone();
    let (leaf_der, key) = sign_certificate(&ca.signer, move |signing_key| {
        let issuer =
            Issuer::from_ca_cert_der(&CertificateDer::from(ca_der.as_slice()), signing_key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.der().to_vec(), key))
    })
    .await?;
    let info =
        inspect_certificate(&leaf_der).map_err(|e| Error::BuildCertificate(e.to_string()))?;
    // Checked with the peers' own rules: a certificate they would refuse is not written out.
    let issued = info.workload_identity().map_err(|e| {
        Error::BuildCertificate(format!(
            "the issued certificate is not a workload SVID: {e}"
        ))
    })?;
    if &issued != identity {
        return Err(Error::BuildCertificate(format!(
            "the issued certificate names {} with role {}, not {} with role {}",
            issued.spiffe_id, issued.role_arn, identity.spiffe_id, identity.role_arn
        )));
    }
    Ok(IssuedCertificate {
        chain_pem: format!("{}{}", pem_of(&leaf_der), ca.chain_pem),
        key_pem: key.serialize_pem(),
        serial_hex: info.serial_hex,
        not_before: info.not_before,
        not_after: info.not_after,
    })
}

/// Why a new certificate is issued; its string form is the `reason` label of the
/// `certificates_issued` metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IssueReason {
    /// The ServiceAccount has no certificate yet.
    New,
    /// The certificate names another SPIFFE ID or role than the ServiceAccount has now.
    IdentityChange,
    /// The Secret's certificate or key is broken, or does not chain to the CA in force.
    Repair,
    /// A `rolemesh.dev/rotate` annotation asked for new keys.
    Rotation,
    /// The certificate is due, or the policy's duration changed.
    Renewal,
    /// The Services that select the workload's pods changed, and with them its DNS names.
    ServiceNames,
    /// Another CA became Active: the certificate was signed by one that is Retiring.
    CaRotation,
    /// The certificate was revoked (`kubectl rolemesh revoke`).
    Revocation,
}

impl IssueReason {
    pub const ALL: &[IssueReason] = &[
        Self::New,
        Self::IdentityChange,
        Self::Repair,
        Self::Rotation,
        Self::Renewal,
        Self::ServiceNames,
        Self::CaRotation,
        Self::Revocation,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::IdentityChange => "identity-change",
            Self::Repair => "repair",
            Self::Rotation => "rotation",
            Self::Renewal => "renewal",
            Self::ServiceNames => "service-names",
            Self::CaRotation => "ca-rotation",
            Self::Revocation => "revocation",
        }
    }
}

/// What a workload needs done to its Secret.
#[derive(Debug)]
pub enum Need {
    /// The Secret is good as it is.
    Nothing(Box<CertificateInfo>),
    /// The certificate is good but `ca.crt` is not the bundle in force.
    RefreshBundle(Box<CertificateInfo>),
    /// A new certificate is needed, for `reason`; `detail` says what was found, for the log.
    Issue { reason: IssueReason, detail: String },
}

/// What is wrong with the certificate a Secret holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Defect {
    /// It is whole and valid but names another identity.
    WrongIdentity(String),
    /// It is broken or does not verify.
    Unusable(String),
    /// It was signed by a CA of the bundle that no longer signs.
    SignedByRetiringCa(String),
}

impl From<String> for Defect {
    fn from(why: String) -> Self {
        Self::Unusable(why)
    }
}

impl From<&str> for Defect {
    fn from(why: &str) -> Self {
        Self::Unusable(why.to_string())
    }
}

/// The value of [`VERIFICATION_ANNOTATION`]: how a role was verified at issuance.
pub fn verification_value(verification: IdentityVerification) -> &'static str {
    match verification {
        IdentityVerification::Sts => "sts",
        IdentityVerification::None => "none",
    }
}

fn secret_field<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.as_slice())
}

/// Checks the certificate a Secret holds: parsed with x509-parser (via the profile crate), the
/// chain verified with rustls-webpki against the CA in force, the key checked against the leaf.
pub fn check_certificate(
    secret: &Secret,
    ca: &CaState,
    identity: &WorkloadIdentity,
    now: OffsetDateTime,
) -> std::result::Result<CertificateInfo, Defect> {
    let chain_pem = secret_field(secret, TLS_CERT_KEY)
        .and_then(|b| std::str::from_utf8(b).ok())
        .ok_or("tls.crt is missing or not PEM")?;
    let key_pem = secret_field(secret, TLS_PRIVATE_KEY_KEY)
        .and_then(|b| std::str::from_utf8(b).ok())
        .ok_or("tls.key is missing or not PEM")?;
    let chain = certificates_from_pem(chain_pem).map_err(|e| format!("tls.crt: {e}"))?;
    let leaf = chain.first().ok_or("tls.crt holds no certificate")?;
    let info = inspect_certificate(leaf).map_err(|e| format!("tls.crt: {e}"))?;
    let key = KeyPair::from_pem(key_pem).map_err(|e| format!("tls.key: {e}"))?;
    if !info.public_key_matches(&key.subject_public_key_info()) {
        return Err("tls.key does not match the certificate in tls.crt".into());
    }
    let found = info
        .workload_identity()
        .map_err(|e| Defect::Unusable(e.to_string()))?;
    if &found != identity {
        return Err(Defect::WrongIdentity(format!(
            "the certificate names {} with role {}, expected {} with role {}",
            found.spiffe_id, found.role_arn, identity.spiffe_id, identity.role_arn
        )));
    }
    let trust = TrustStore::from_bundle(&TrustBundle {
        certificates: vec![ca.ca_der.clone()],
        crls: vec![],
    })
    .map_err(|e| format!("the CA certificate is unusable as a trust anchor: {e}"))?;
    let unix = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        now.unix_timestamp().max(0) as u64,
    ));
    if let Err(e) = verify_chain_der(&chain, &trust, Usage::ClientAuth, unix) {
        if let Some(retiring) = ca
            .cas
            .iter()
            .find(|other| other.fingerprint != ca.fingerprint && other.subject == info.issuer)
        {
            return Err(Defect::SignedByRetiringCa(format!(
                "signed by CA {} ({}), which is {}; CA {} signs now",
                retiring.fingerprint,
                retiring.subject,
                retiring.phase.as_str(),
                ca.fingerprint
            )));
        }
        return Err(format!("the certificate does not verify against the CA in force: {e}").into());
    }
    Ok(info)
}

/// Decides what a workload's Secret needs; `dns_names` are the names its certificate should carry
/// (sorted, as [`crate::service_names::service_names`] gives them).
pub fn assess(
    secret: Option<&Secret>,
    ca: &CaState,
    identity: &WorkloadIdentity,
    dns_names: &[String],
    profile: &CertificateProfile,
    rotation: &RotationRequests,
    now: OffsetDateTime,
) -> Need {
    let Some(secret) = secret else {
        return issue(IssueReason::New, "no certificate yet");
    };
    let info = match check_certificate(secret, ca, identity, now) {
        Ok(info) => info,
        Err(Defect::WrongIdentity(why)) => return issue(IssueReason::IdentityChange, why),
        Err(Defect::Unusable(why)) => return issue(IssueReason::Repair, why),
        Err(Defect::SignedByRetiringCa(why)) => return issue(IssueReason::CaRotation, why),
    };
    if ca.revoked.contains_key(&info.serial_hex) {
        return issue(
            IssueReason::Revocation,
            format!("its certificate {} was revoked", info.serial_hex),
        );
    }
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    if annotations.get(ISSUED_FOR_POLICY_ROTATION) != rotation.policy.as_ref()
        || annotations.get(ISSUED_FOR_SA_ROTATION) != rotation.service_account.as_ref()
    {
        return issue(IssueReason::Rotation, "rotation requested");
    }
    let life = info.not_after - info.not_before;
    let wanted = time::Duration::try_from(profile.duration).unwrap_or(life);
    // A changed duration in the policy applies at once, not only at the next renewal.
    if (life - wanted - time::Duration::try_from(BACKDATE).unwrap_or_default()).abs()
        > time::Duration::minutes(1)
    {
        return issue(
            IssueReason::Renewal,
            "the policy's certificate duration changed",
        );
    }
    if now >= profile.renewal_time(info.not_before, info.not_after, &info.serial) {
        return issue(IssueReason::Renewal, "due for renewal");
    }
    let mut names = info.dns_names.clone();
    names.sort();
    if names != dns_names {
        return issue(
            IssueReason::ServiceNames,
            format!(
                "the certificate names {names:?}, the Services that select its pods {dns_names:?}"
            ),
        );
    }
    if secret_field(secret, CA_CERT_KEY) != Some(ca.bundle_pem.as_bytes()) {
        return Need::RefreshBundle(Box::new(info));
    }
    Need::Nothing(Box::new(info))
}

/// Whose a Secret with a workload Secret's name is, as far as the reconciler of one policy may act
/// on it.
#[derive(Debug, PartialEq, Eq)]
pub enum SecretOwner {
    /// rolemesh wrote it for this policy: it may be re-issued, refreshed or deleted.
    ThisPolicy,
    /// rolemesh wrote it for the named MTLSPolicy.
    OtherPolicy(String),
    /// rolemesh did not write it, or cannot write it (said why, for the status message): it is
    /// never overwritten nor deleted, and nothing is issued for it.
    Foreign(String),
}

/// The type of every workload Secret rolemesh writes.
pub const WORKLOAD_SECRET_TYPE: &str = "kubernetes.io/tls";

/// The controller owner reference of a Secret rolemesh wrote for an MTLSPolicy: it carries the
/// managed-by label *and* names an MTLSPolicy as its controller. Anyone who can create Secrets
/// can set a label; the reference names the policy object's uid, and a Secret that names it as
/// its controller is garbage-collected with that policy.
fn written_for_policy(secret: &Secret) -> std::result::Result<&OwnerReference, &'static str> {
    let managed = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .map(String::as_str)
        == Some(MANAGED_BY_VALUE);
    if !managed {
        return Err("it lacks the label app.kubernetes.io/managed-by=rolemesh");
    }
    secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
        .filter(|r| r.kind == "MTLSPolicy" && r.api_version.starts_with("rolemesh.dev/"))
        .ok_or("it has no controller owner reference to an MTLSPolicy")
}

/// Decides [`SecretOwner`] for the policy with uid `policy_uid`. A Secret written for this policy
/// that still cannot be written as a workload Secret (retyped, or made immutable) counts as
/// foreign: a write would fail on every retry, after a token, STS and a Sign each time.
pub fn secret_owner(secret: &Secret, policy_uid: &str) -> SecretOwner {
    let controller = match written_for_policy(secret) {
        Ok(controller) => controller,
        Err(why) => return SecretOwner::Foreign(why.into()),
    };
    if controller.uid != policy_uid {
        return SecretOwner::OtherPolicy(controller.name.clone());
    }
    let type_ = secret.type_.as_deref().unwrap_or("Opaque");
    if type_ != WORKLOAD_SECRET_TYPE {
        return SecretOwner::Foreign(format!(
            "it is of type {type_}, not {WORKLOAD_SECRET_TYPE}, and a Secret's type cannot be changed"
        ));
    }
    if secret.immutable == Some(true) {
        return SecretOwner::Foreign("it is immutable".into());
    }
    SecretOwner::ThisPolicy
}

/// Whether the reconciler of the policy with uid `policy_uid` may delete the Secret: rolemesh
/// wrote it for that policy, whatever became of its type since.
pub fn deletable_by(secret: &Secret, policy_uid: &str) -> bool {
    written_for_policy(secret).is_ok_and(|controller| controller.uid == policy_uid)
}

/// What a failed verification does to the Secret a workload already has.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterRefusal {
    /// STS did not decide (throttled, unavailable, unreachable) or no token could be had: the
    /// Secret stays, untouched, and verification is retried with backoff. The certificate it
    /// holds, when still valid for the workload's identity, keeps being reported.
    Keep(Option<Box<CertificateInfo>>),
    /// The role can no longer be proven (STS said no, the role is not the one assumed, its
    /// account is not allowed): the old certificate claims what is not true, so the Secret goes.
    Delete,
}

/// Decides [`AfterRefusal`]: a transient refusal never costs a workload its certificate.
pub fn after_refusal(
    refusal: &Refusal,
    secret: Option<&Secret>,
    ca: &CaState,
    identity: &WorkloadIdentity,
    now: OffsetDateTime,
) -> AfterRefusal {
    if !refusal.is_transient() {
        return AfterRefusal::Delete;
    }
    AfterRefusal::Keep(
        secret
            .and_then(|s| check_certificate(s, ca, identity, now).ok())
            .map(Box::new),
    )
}

fn issue(reason: IssueReason, detail: impl Into<String>) -> Need {
    Need::Issue {
        reason,
        detail: detail.into(),
    }
}

/// The `rolemesh.dev/rotate` values in force for one workload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RotationRequests {
    pub policy: Option<String>,
    pub service_account: Option<String>,
}

/// What goes into a workload Secret besides the certificate.
pub struct SecretContext<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub policy_name: &'a str,
    pub owner: OwnerReference,
    pub rotation: &'a RotationRequests,
    pub verification: IdentityVerification,
}

/// The whole Secret for a workload; written in one request, so it is never half-written.
pub fn workload_secret(
    context: &SecretContext<'_>,
    chain_pem: &str,
    key_pem: &str,
    bundle_pem: &str,
) -> Secret {
    let mut annotations = BTreeMap::from([(
        VERIFICATION_ANNOTATION.to_string(),
        verification_value(context.verification).to_string(),
    )]);
    if let Some(value) = &context.rotation.policy {
        annotations.insert(ISSUED_FOR_POLICY_ROTATION.into(), value.clone());
    }
    if let Some(value) = &context.rotation.service_account {
        annotations.insert(ISSUED_FOR_SA_ROTATION.into(), value.clone());
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(workload_secret_name(context.service_account)),
            namespace: Some(context.namespace.to_string()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
                (POLICY_LABEL.to_string(), context.policy_name.to_string()),
                (
                    SERVICE_ACCOUNT_LABEL.to_string(),
                    context.service_account.to_string(),
                ),
            ])),
            annotations: Some(annotations),
            owner_references: Some(vec![context.owner.clone()]),
            ..Default::default()
        },
        type_: Some(WORKLOAD_SECRET_TYPE.into()),
        data: Some(BTreeMap::from([
            (
                TLS_CERT_KEY.to_string(),
                ByteString(chain_pem.as_bytes().to_vec()),
            ),
            (
                TLS_PRIVATE_KEY_KEY.to_string(),
                ByteString(key_pem.as_bytes().to_vec()),
            ),
            (
                CA_CERT_KEY.to_string(),
                ByteString(bundle_pem.as_bytes().to_vec()),
            ),
        ])),
        ..Default::default()
    }
}

/// The PEM fields of an existing Secret, to re-write it with a new `ca.crt` only.
pub fn existing_pems(secret: &Secret) -> Option<(String, String)> {
    let get = |key| secret_field(secret, key).and_then(|b| String::from_utf8(b.to_vec()).ok());
    Some((get(TLS_CERT_KEY)?, get(TLS_PRIVATE_KEY_KEY)?))
}

#[cfg(test)]
mod tests;
