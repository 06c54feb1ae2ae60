//! One ServiceAccount in one reconcile: check its identity, decide what its Secret needs
//! ([`assess`]), verify with STS and issue when a certificate is due, and say what happened.

use k8s_openapi::{
    api::core::v1::{Secret, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{ResourceExt, api::ObjectMeta, runtime::events::EventType};
use rolemesh_crds::{
    IdentityVerification, MTLSPolicy, WorkloadStatus,
    names::{POLICY_LABEL, ROTATE_ANNOTATION, VERIFICATION_ANNOTATION, workload_secret_name},
};
use rolemesh_profile::{
    CertificateInfo, CertificateProfile, IssuedCertificate, SpiffeId, WorkloadIdentity,
};
use time::OffsetDateTime;
use tracing::{info, warn};

use super::writes::{PolicyEvent, delete_workload_secret, publish, write_secret};
use crate::{
    ca::CaState,
    certificate::{
        AfterRefusal, IssueReason, Need, RotationRequests, SecretContext, after_refusal, assess,
        existing_pems, issue_certificate, verification_value, workload_secret,
    },
    context::Context,
    identity::{Refusal, check_account, claimed_role, verify_with_sts},
    status::{Reason, to_time},
};

/// What one reconcile of a policy works with, the same for each of its ServiceAccounts.
pub struct PolicyRun<'a> {
    pub ctx: &'a Context,
    pub ca: &'a CaState,
    pub policy: &'a MTLSPolicy,
    pub owner: &'a OwnerReference,
    pub profile: &'a CertificateProfile,
    pub now: OffsetDateTime,
}

/// What happened to one ServiceAccount in one reconcile.
pub struct Outcome {
    pub reason: Reason,
    pub status: WorkloadStatus,
    pub renew_at: Option<OffsetDateTime>,
    pub issued: Option<IssueReason>,
    /// A failure that clears by itself (signer or STS unreachable): retry soon.
    pub transient: bool,
}

impl Outcome {
    fn failed(reason: Reason, status: WorkloadStatus, transient: bool) -> Self {
        Self {
            reason,
            status,
            renew_at: None,
            issued: None,
            transient,
        }
    }
}

/// The status entry of a ServiceAccount that has no valid certificate.
pub fn refused(
    service_account: &str,
    reason: Reason,
    message: String,
    role: Option<String>,
) -> WorkloadStatus {
    WorkloadStatus {
        service_account: service_account.to_string(),
        role_arn: role,
        verified: false,
        reason: reason.as_str().to_string(),
        message: Some(message),
        ..Default::default()
    }
}

/// The facts of a certificate that its status entry and renewal time need.
struct Validity {
    serial: Vec<u8>,
    serial_hex: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl From<&CertificateInfo> for Validity {
    fn from(info: &CertificateInfo) -> Self {
        Self {
            serial: info.serial.clone(),
            serial_hex: info.serial_hex.clone(),
            not_before: info.not_before,
            not_after: info.not_after,
        }
    }
}

impl From<&IssuedCertificate> for Validity {
    fn from(issued: &IssuedCertificate) -> Self {
        Self {
            serial: hex::decode(&issued.serial_hex).unwrap_or_default(),
            serial_hex: issued.serial_hex.clone(),
            not_before: issued.not_before,
            not_after: issued.not_after,
        }
    }
}

fn annotation(meta: &ObjectMeta, key: &str) -> Option<String> {
    meta.annotations.as_ref().and_then(|a| a.get(key)).cloned()
}

/// Who the ServiceAccount is, once its role annotation and SPIFFE ID check out.
struct Claimant<'a> {
    namespace: String,
    name: String,
    secret_name: String,
    existing: Option<Secret>,
    role: String,
    identity: WorkloadIdentity,
    rotation: RotationRequests,
    run: &'a PolicyRun<'a>,
}

impl Claimant<'_> {
    /// The status entry of a good certificate; `verified_by` is how its role was verified.
    fn issued(&self, validity: &Validity, verified_by: Option<&str>) -> Outcome {
        let verified = verified_by == Some(verification_value(IdentityVerification::Sts));
        let reason = if verified {
            Reason::Issued
        } else {
            Reason::IssuedUnverified
        };
        Outcome {
            reason,
            status: WorkloadStatus {
                service_account: self.name.clone(),
                role_arn: Some(self.role.clone()),
                spiffe_id: Some(self.identity.spiffe_id.to_string()),
                verified,
                reason: reason.as_str().into(),
                message: (!verified).then(|| {
                    "identity verification is off (MTLSAuthority identityVerification: none): the role annotation was not checked with STS".to_string()
                }),
                secret_name: Some(self.secret_name.clone()),
                serial: Some(validity.serial_hex.clone()),
                not_before: Some(to_time(validity.not_before)),
                not_after: Some(to_time(validity.not_after)),
            },
            renew_at: Some(self.run.profile.renewal_time(
                validity.not_before,
                validity.not_after,
                &validity.serial,
            )),
            issued: None,
            transient: false,
        }
    }

    fn failed(&self, reason: Reason, message: String, transient: bool) -> Outcome {
        Outcome::failed(
            reason,
            refused(&self.name, reason, message, Some(self.role.clone())),
            transient,
        )
    }

    fn recorded_verification(&self) -> Option<String> {
        self.existing
            .as_ref()
            .and_then(|s| annotation(&s.metadata, VERIFICATION_ANNOTATION))
    }

    fn secret_context(&self) -> SecretContext<'_> {
        SecretContext {
            namespace: &self.namespace,
            service_account: &self.name,
            policy_name: self.run.policy.metadata.name.as_deref().unwrap_or_default(),
            owner: self.run.owner.clone(),
            rotation: &self.rotation,
            verification: self.run.ca.verification,
        }
    }

    /// Re-writes the Secret with the trust bundle in force, keeping its certificate.
    async fn refresh_bundle(&self, info: &CertificateInfo) -> Outcome {
        let ctx = self.run.ctx;
        let Some((chain, key)) = self.existing.as_ref().and_then(existing_pems) else {
            return self.failed(
                Reason::SecretUnreadable,
                "the Secret lost its PEM fields".into(),
                true,
            );
        };
        let mut refreshed = workload_secret(
            &self.secret_context(),
            &chain,
            &key,
            &self.run.ca.bundle_pem,
        );
        // Keep the recorded verification and rotation state: only ca.crt changes.
        refreshed.metadata.annotations = self
            .existing
            .as_ref()
            .and_then(|s| s.metadata.annotations.clone());
        if let Err(error) = write_secret(ctx, &refreshed, true).await {
            warn!(%error, namespace = %self.namespace, service_account = %self.name, "failed to refresh the trust bundle in a Secret");
            return self.failed(error.reason(), error.to_string(), true);
        }
        self.issued(&info.into(), self.recorded_verification().as_deref())
    }

    /// The outcome of a verification that did not succeed: a refusal deletes the Secret, a
    /// transient failure keeps it (and keeps reporting its certificate while it is valid) and
    /// is retried with backoff (see `next_reconcile`).
    async fn verification_failed(&self, refusal: &Refusal) -> Outcome {
        let ctx = self.run.ctx;
        let (namespace, name, role) = (&self.namespace, &self.name, &self.role);
        let reason = refusal.reason();
        let message = refusal.message(namespace, name, Some(role));
        ctx.metrics.certificate_failed(reason);
        let decision = after_refusal(
            refusal,
            self.existing.as_ref(),
            self.run.ca,
            &self.identity,
            self.run.now,
        );
        match decision {
            AfterRefusal::Delete => {
                warn!(namespace = %namespace, service_account = %name, %reason, "identity not verified; no certificate issued and the Secret is deleted");
                // The old certificate claims a role the ServiceAccount can no longer prove.
                delete_workload_secret(ctx, namespace, &self.secret_name, self.existing.as_ref())
                    .await;
                let event = PolicyEvent {
                    type_: EventType::Warning,
                    reason: reason.as_str(),
                    action: "VerifyIdentity",
                    note: &message,
                };
                publish(ctx, self.run.policy, event).await;
                self.failed(reason, message, false)
            }
            AfterRefusal::Keep(valid) => {
                // No Event per ServiceAccount: the reconcile publishes one for its first
                // transient failure, so an STS outage does not flood the API server.
                warn!(namespace = %namespace, service_account = %name, %reason, kept_valid_certificate = valid.is_some(), "identity not verified for now; the Secret is kept and verification retried");
                let mut outcome = self.failed(reason, message, true);
                outcome.status.secret_name =
                    self.existing.as_ref().map(|_| self.secret_name.clone());
                if let Some(info) = valid {
                    outcome.status.spiffe_id = Some(self.identity.spiffe_id.to_string());
                    outcome.status.serial = Some(info.serial_hex.clone());
                    outcome.status.not_before = Some(to_time(info.not_before));
                    outcome.status.not_after = Some(to_time(info.not_after));
                }
                outcome
            }
        }
    }

    /// Verifies the role (when the authority says so) and issues a new certificate.
    async fn issue(&self, why: IssueReason, detail: &str) -> Outcome {
        let (ctx, ca) = (self.run.ctx, self.run.ca);
        let (namespace, name, role) = (&self.namespace, &self.name, &self.role);
        if ca.verification == IdentityVerification::Sts
            && let Err(refusal) =
                verify_with_sts(&ctx.client, &ctx.sts, namespace, name, role).await
        {
            return self.verification_failed(&refusal).await;
        }
        let issued = match issue_certificate(ca, &self.identity, self.run.profile).await {
            Ok(issued) => issued,
            Err(error) => {
                warn!(%error, namespace = %namespace, service_account = %name, "failed to issue a certificate");
                ctx.metrics.certificate_failed(error.reason());
                // Keep the previous status facts visible: the old Secret is untouched.
                let mut outcome = self.failed(
                    error.reason(),
                    format!(
                        "{error}; the existing Secret (if any) is left as it is and issuance is retried"
                    ),
                    true,
                );
                outcome.status.secret_name =
                    self.existing.as_ref().map(|_| self.secret_name.clone());
                return outcome;
            }
        };
        let secret = workload_secret(
            &self.secret_context(),
            &issued.chain_pem,
            &issued.key_pem,
            &ca.bundle_pem,
        );
        if let Err(error) = write_secret(ctx, &secret, self.existing.is_some()).await {
            warn!(%error, namespace = %namespace, service_account = %name, "failed to write the certificate Secret");
            ctx.metrics.certificate_failed(error.reason());
            return self.failed(error.reason(), error.to_string(), true);
        }
        info!(namespace = %namespace, service_account = %name, serial = %issued.serial_hex, reason = why.as_str(), detail = %detail, "issued a certificate");
        ctx.metrics.certificate_issued(why);
        let mut outcome = self.issued(&(&issued).into(), Some(verification_value(ca.verification)));
        outcome.issued = Some(why);
        outcome
    }
}

/// Brings one covered ServiceAccount's Secret to what it needs.
pub async fn reconcile_service_account(
    run: &PolicyRun<'_>,
    service_account: &ServiceAccount,
) -> Outcome {
    let ctx = run.ctx;
    let namespace = service_account.namespace().unwrap_or_default();
    let name = service_account.name_any();
    let secret_name = workload_secret_name(&name);
    let existing = ctx.effective_secret(&namespace, &secret_name);

    if let Some(secret) = &existing {
        let owner = secret.labels().get(POLICY_LABEL);
        if owner.map(String::as_str) != run.policy.metadata.name.as_deref() {
            let reason = Reason::SecretOwnedByAnotherPolicy;
            let message = format!(
                "Secret {namespace}/{secret_name} belongs to MTLSPolicy {}; it is re-issued once that policy no longer covers {name}",
                owner.cloned().unwrap_or_default()
            );
            return Outcome::failed(reason, refused(&name, reason, message, None), false);
        }
    }

    let role = match claimed_role(service_account) {
        Ok(role) => role,
        Err(refusal) => {
            delete_workload_secret(ctx, &namespace, &secret_name, existing.as_ref()).await;
            ctx.metrics.certificate_failed(refusal.reason());
            let message = refusal.message(&namespace, &name, None);
            return Outcome::failed(
                refusal.reason(),
                refused(&name, refusal.reason(), message, None),
                false,
            );
        }
    };
    // Before STS and the signer: a role of an account the authority does not allow gets
    // nothing, however honestly STS would confirm it, and whatever the verification mode.
    if let Err(refusal) = check_account(&role, run.ca.allowed_accounts.as_ref()) {
        delete_workload_secret(ctx, &namespace, &secret_name, existing.as_ref()).await;
        ctx.metrics.certificate_failed(refusal.reason());
        let message = refusal.message(&namespace, &name, Some(&role));
        warn!(namespace = %namespace, service_account = %name, role = %role, reason = %refusal.reason(), "the role's AWS account is not allowed; no certificate issued");
        let event = PolicyEvent {
            type_: EventType::Warning,
            reason: refusal.reason().as_str(),
            action: "VerifyIdentity",
            note: &message,
        };
        publish(ctx, run.policy, event).await;
        return Outcome::failed(
            refusal.reason(),
            refused(&name, refusal.reason(), message, Some(role)),
            false,
        );
    }
    let identity = match SpiffeId::new(&run.ca.trust_domain, &namespace, &name)
        .and_then(|id| WorkloadIdentity::new(id, &role))
    {
        Ok(identity) => identity,
        Err(e) => {
            let reason = Reason::InvalidIdentity;
            ctx.metrics.certificate_failed(reason);
            return Outcome::failed(
                reason,
                refused(&name, reason, e.to_string(), Some(role)),
                false,
            );
        }
    };
    let claimant = Claimant {
        rotation: RotationRequests {
            policy: annotation(&run.policy.metadata, ROTATE_ANNOTATION),
            service_account: annotation(&service_account.metadata, ROTATE_ANNOTATION),
        },
        namespace,
        name,
        secret_name,
        role,
        identity,
        run,
        existing,
    };

    match assess(
        claimant.existing.as_ref(),
        run.ca,
        &claimant.identity,
        run.profile,
        &claimant.rotation,
        run.now,
    ) {
        Need::Nothing(info) => claimant.issued(
            &info.as_ref().into(),
            claimant.recorded_verification().as_deref(),
        ),
        Need::RefreshBundle(info) => claimant.refresh_bundle(&info).await,
        Need::Issue { reason, detail } => claimant.issue(reason, &detail).await,
    }
}
