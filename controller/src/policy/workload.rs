//! One ServiceAccount in one reconcile: check its identity, decide what its Secret needs
//! ([`assess`]), verify with STS and issue when a certificate is due, and say what happened.

use std::sync::Arc;

use k8s_openapi::{
    api::core::v1::{Pod, Secret, Service, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{ResourceExt, api::ObjectMeta, runtime::events::EventType};
use rolemesh_crds::{
    IdentityVerification, MTLSPolicy, WorkloadStatus,
    names::{ROTATE_ANNOTATION, workload_secret_name},
};
use rolemesh_profile::{
    CertificateInfo, CertificateProfile, IssuedCertificate, SpiffeId, WorkloadIdentity,
};
use time::OffsetDateTime;
use tracing::{info, warn};

use super::writes::{PolicyEvent, delete_workload_secret, publish, read_secret, write_secret};
use crate::{
    ca::CaState,
    certificate::{
        AfterRefusal, IssueReason, Need, RotationRequests, SecretContext, SecretOwner,
        after_refusal, assess, existing_pems, issue_certificate, secret_owner, workload_secret,
    },
    context::Context,
    identity::{Refusal, check_account, claimed_role, verify_with_sts},
    reverify::reverify_due,
    service_names::{MAX_SERVICES_PER_CERTIFICATE, ServiceNames, service_names},
    status::{Reason, from_time, to_time},
};

/// What one reconcile of a policy works with, the same for each of its ServiceAccounts.
pub struct PolicyRun<'a> {
    pub ctx: &'a Context,
    pub ca: &'a CaState,
    pub policy: &'a MTLSPolicy,
    pub owner: &'a OwnerReference,
    pub profile: &'a CertificateProfile,
    pub now: OffsetDateTime,
    /// The namespace's pods and Services (trimmed), for the workloads' DNS names.
    pub pods: &'a [Arc<Pod>],
    pub services: &'a [Arc<Service>],
}

/// What happened to one ServiceAccount in one reconcile.
pub struct Outcome {
    pub reason: Reason,
    pub status: WorkloadStatus,
    /// When the workload needs looking at again: its certificate's renewal, or when to see
    /// whether a taken Secret name is free.
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

/// The value of [`WorkloadStatus::verified_with`] for a role STS confirmed.
pub const VERIFIED_WITH_STS: &str = "sts";

/// Whether the policy's status, which only the controller writes, records that STS verified
/// the role of `service_account`'s certificate with serial `serial_hex`. Nothing the namespace's
/// users can write (the Secret, its annotations) takes part in this verdict.
pub fn recorded_as_verified(policy: &MTLSPolicy, service_account: &str, serial_hex: &str) -> bool {
    recorded_verification(policy, service_account, serial_hex).is_some()
}

/// When, by the policy's status, STS last confirmed the role of `service_account`'s certificate
/// with serial `serial_hex`, if the status records it as verified at all. A status written
/// before `verifiedAt` existed gives the Unix epoch: verified, and due again now.
pub fn recorded_verification(
    policy: &MTLSPolicy,
    service_account: &str,
    serial_hex: &str,
) -> Option<OffsetDateTime> {
    let status = policy.status.as_ref()?;
    let entry = status.workloads.iter().find(|w| {
        w.service_account == service_account
            && w.verified
            && w.verified_with.as_deref() == Some(VERIFIED_WITH_STS)
            && w.serial.as_deref() == Some(serial_hex)
    })?;
    Some(
        entry
            .verified_at
            .as_ref()
            .map_or(OffsetDateTime::UNIX_EPOCH, from_time),
    )
}

/// How often a workload whose Secret name a foreign Secret holds is looked at again. That Secret
/// has no rolemesh label, so its deletion reaches no watch; a look costs one GET and nothing
/// else.
pub const NAME_TAKEN_RECHECK: time::Duration = time::Duration::minutes(1);

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
    /// The names of the Services that select its pods, for its certificate.
    service_names: ServiceNames,
    run: &'a PolicyRun<'a>,
}

impl Claimant<'_> {
    /// The status entry of a good certificate; `verified_at` when STS last confirmed its role.
    fn issued(&self, validity: &Validity, verified_at: Option<OffsetDateTime>) -> Outcome {
        let verified = verified_at.is_some();
        let renewal = self.run.profile.renewal_time(
            validity.not_before,
            validity.not_after,
            &validity.serial,
        );
        // Under `sts` the workload is looked at again when its role is due to be asked about.
        let reverify =
            verified_at.map(|at| reverify_due(at, self.run.ca.reverify_interval, &validity.serial));
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
                verified_with: verified.then(|| VERIFIED_WITH_STS.to_string()),
                verified_at: verified_at.map(to_time),
                reason: reason.as_str().into(),
                message: (!verified).then(|| {
                    "identity verification is off (MTLSAuthority identityVerification: none): the role annotation was not checked with STS".to_string()
                }),
                secret_name: Some(self.secret_name.clone()),
                serial: Some(validity.serial_hex.clone()),
                not_before: Some(to_time(validity.not_before)),
                not_after: Some(to_time(validity.not_after)),
            },
            renew_at: Some(reverify.map_or(renewal, |at| at.min(renewal))),
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

    /// When STS last confirmed the role of the certificate with `serial_hex`, by the
    /// controller's own record (its memory, or the policy status it wrote), if it ever did.
    fn verified_before(&self, serial_hex: &str) -> Option<OffsetDateTime> {
        let here = self
            .run
            .ctx
            .verified_here(&self.namespace, &self.name, serial_hex);
        let recorded = recorded_verification(self.run.policy, &self.name, serial_hex);
        here.max(recorded)
    }

    /// Asks STS whether the ServiceAccount may assume its annotated role, and counts the answer.
    async fn verify(&self) -> Result<(), Refusal> {
        let ctx = self.run.ctx;
        let result = verify_with_sts(
            &ctx.client,
            &ctx.sts,
            &self.namespace,
            &self.name,
            &self.role,
        )
        .await;
        ctx.metrics.sts_verification(match &result {
            Ok(()) => "verified",
            Err(refusal) if refusal.is_transient() => "transient",
            Err(_) => "refused",
        });
        result
    }

    /// A certificate that is good. Under `sts` its role is verified with STS when this
    /// controller never did (it was issued under identityVerification `none`, or before the
    /// controller recorded its verdict in status) and again each `reverifyInterval`: the trust
    /// of a role can be taken away at any time, and a certificate cannot be revoked. A refusal
    /// deletes its Secret, as at issuance; a verification that passes signs nothing and writes
    /// no Secret, only the status' `verifiedAt`.
    async fn settled(&self, info: &CertificateInfo, refresh: bool) -> Outcome {
        let sts = self.run.ca.verification == IdentityVerification::Sts;
        let mut verified_at = None;
        if sts {
            let last = self.verified_before(&info.serial_hex);
            let due = last.map(|at| reverify_due(at, self.run.ca.reverify_interval, &info.serial));
            if due.is_none_or(|due| due <= self.run.now) {
                if last.is_some() {
                    info!(namespace = %self.namespace, service_account = %self.name, serial = %info.serial_hex, "re-verifying with STS that the ServiceAccount may still assume its role");
                } else {
                    info!(namespace = %self.namespace, service_account = %self.name, serial = %info.serial_hex, "verifying with STS the role of a certificate not verified by this controller");
                }
                if let Err(refusal) = self.verify().await {
                    return self.verification_failed(&refusal).await;
                }
                let at = OffsetDateTime::now_utc();
                self.run
                    .ctx
                    .remember_verified(&self.namespace, &self.name, &info.serial_hex, at);
                verified_at = Some(at);
            } else {
                verified_at = last;
            }
        }
        if refresh {
            return self.refresh_bundle(info, verified_at).await;
        }
        self.issued(&info.into(), verified_at)
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
    async fn refresh_bundle(
        &self,
        info: &CertificateInfo,
        verified_at: Option<OffsetDateTime>,
    ) -> Outcome {
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
        if let Err(error) = write_secret(ctx, &refreshed, self.existing.as_ref()).await {
            warn!(%error, namespace = %self.namespace, service_account = %self.name, "failed to refresh the trust bundle in a Secret");
            return self.failed(error.reason(), error.to_string(), true);
        }
        self.issued(&info.into(), verified_at)
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
                delete_workload_secret(
                    ctx,
                    &self.run.owner.uid,
                    namespace,
                    &self.secret_name,
                    self.existing.as_ref(),
                )
                .await;
                ctx.forget_verified(namespace, name);
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
        let (namespace, name) = (&self.namespace, &self.name);
        let sts = ca.verification == IdentityVerification::Sts;
        if sts && let Err(refusal) = self.verify().await {
            return self.verification_failed(&refusal).await;
        }
        let verified_at = OffsetDateTime::now_utc();
        let issued = match issue_certificate(
            ca,
            &self.identity,
            &self.service_names.dns_names,
            self.run.profile,
        )
        .await
        {
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
        if let Err(error) = write_secret(ctx, &secret, self.existing.as_ref()).await {
            warn!(%error, namespace = %namespace, service_account = %name, "failed to write the certificate Secret");
            ctx.metrics.certificate_failed(error.reason());
            return self.failed(error.reason(), error.to_string(), true);
        }
        info!(namespace = %namespace, service_account = %name, serial = %issued.serial_hex, reason = why.as_str(), detail = %detail, "issued a certificate");
        ctx.metrics.certificate_issued(why);
        let verified_at = sts.then_some(verified_at);
        if let Some(at) = verified_at {
            ctx.remember_verified(namespace, name, &issued.serial_hex, at);
        }
        let mut outcome = self.issued(&(&issued).into(), verified_at);
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
    if run.ca.verification == IdentityVerification::None {
        // What was verified before is not kept up: under `none` nothing is re-verified.
        ctx.forget_verified(&namespace, &name);
    }

    if let Some(secret) = &existing
        && let Some(outcome) = not_ours(run, &name, secret).await
    {
        return outcome;
    }

    let role = match claimed_role(service_account) {
        Ok(role) => role,
        Err(refusal) => {
            delete_workload_secret(
                ctx,
                &run.owner.uid,
                &namespace,
                &secret_name,
                existing.as_ref(),
            )
            .await;
            ctx.metrics.certificate_failed(refusal.reason());
            let message = refusal.message(&namespace, &name, None);
            return Outcome::failed(
                refusal.reason(),
                refused(&name, refusal.reason(), message, None),
                false,
            );
        }
    };
    // Before STS and the signer: a blocked ServiceAccount, or a role of an account the
    // authority does not allow, gets nothing, however honestly STS would confirm it, and
    // whatever the verification mode.
    let blocked = run.ca.blocked.contains(&(namespace.clone(), name.clone()));
    if let Err(refusal) = if blocked {
        Err(Refusal::Blocked)
    } else {
        check_account(&role, run.ca.allowed_accounts.as_ref())
    } {
        delete_workload_secret(
            ctx,
            &run.owner.uid,
            &namespace,
            &secret_name,
            existing.as_ref(),
        )
        .await;
        ctx.metrics.certificate_failed(refusal.reason());
        let message = refusal.message(&namespace, &name, Some(&role));
        warn!(namespace = %namespace, service_account = %name, role = %role, reason = %refusal.reason(), "blocked, or the role's AWS account is not allowed; no certificate issued");
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
    let service_names = service_names(
        &namespace,
        &name,
        run.pods,
        run.services,
        &ctx.cluster_domain,
    );
    if !service_names.left_out.is_empty() {
        warn!(namespace = %namespace, service_account = %name, left_out = ?service_names.left_out, max = MAX_SERVICES_PER_CERTIFICATE, "more Services select the workload's pods than a certificate names; the names of those that sort last are left out");
    }
    let mut claimant = Claimant {
        service_names,
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

    let assess_claimant = |claimant: &Claimant<'_>| {
        assess(
            claimant.existing.as_ref(),
            run.ca,
            &claimant.identity,
            &claimant.service_names.dns_names,
            run.profile,
            &claimant.rotation,
            run.now,
        )
    };
    let mut need = assess_claimant(&claimant);
    // The permit bounds what a burst holds at once, across policies: the lookup, STS, the key,
    // the signer and the write (see `Context::issuance`). Settled workloads need none.
    let _issuing = match need {
        Need::Issue { .. } => ctx.issuance.acquire().await.ok(),
        _ => None,
    };
    if claimant.existing.is_none() && matches!(need, Need::Issue { .. }) {
        // The cache holds only Secrets with rolemesh's label, so a Secret of that name without
        // it is looked up before any token, STS or signer work is spent on a write that must
        // not happen.
        match read_secret(ctx, &claimant.namespace, &claimant.secret_name).await {
            Ok(None) => {}
            Ok(Some(found)) => {
                if let Some(outcome) = not_ours(run, &claimant.name, &found).await {
                    return outcome;
                }
                // Ours, written moments ago by another replica: the watch has not shown it yet.
                claimant.existing = Some(found);
                need = assess_claimant(&claimant);
            }
            Err(error) => {
                warn!(%error, namespace = %claimant.namespace, service_account = %claimant.name, "failed to look up the certificate Secret");
                return claimant.failed(error.reason(), error.to_string(), true);
            }
        }
    }
    match need {
        Need::Nothing(info) => claimant.settled(&info, false).await,
        Need::RefreshBundle(info) => claimant.settled(&info, true).await,
        Need::Issue { reason, detail } => claimant.issue(reason, &detail).await,
    }
}

/// The outcome for a workload whose Secret name is held by a Secret this policy may not write,
/// or `None` when the Secret is this policy's.
async fn not_ours(run: &PolicyRun<'_>, service_account: &str, secret: &Secret) -> Option<Outcome> {
    let namespace = secret.namespace().unwrap_or_default();
    let secret_name = secret.name_any();
    let policy = run.policy.name_any();
    match secret_owner(secret, &run.owner.uid) {
        SecretOwner::ThisPolicy => None,
        SecretOwner::OtherPolicy(owner) => {
            let reason = Reason::SecretOwnedByAnotherPolicy;
            let message = if owner == policy {
                format!(
                    "Secret {namespace}/{secret_name} belongs to an earlier MTLSPolicy {owner} that was deleted; it is issued anew once garbage collection has removed it"
                )
            } else {
                format!(
                    "Secret {namespace}/{secret_name} belongs to MTLSPolicy {owner}; it is re-issued once that policy no longer covers {service_account}"
                )
            };
            Some(Outcome::failed(
                reason,
                refused(service_account, reason, message, None),
                false,
            ))
        }
        SecretOwner::Foreign(why) => {
            let reason = Reason::SecretNameTaken;
            let message = format!(
                "Secret {namespace}/{secret_name} holds the name of ServiceAccount {service_account}'s certificate Secret but is not one rolemesh created for MTLSPolicy {policy} and can write: {why}. rolemesh never overwrites it and issues no certificate for {service_account} while it is there. Rename or delete that Secret; the name is looked at again every {} s and the certificate is issued once it is free",
                NAME_TAKEN_RECHECK.whole_seconds()
            );
            run.ctx.metrics.certificate_failed(reason);
            let already_told = run.policy.status.as_ref().is_some_and(|s| {
                s.workloads
                    .iter()
                    .any(|w| w.service_account == service_account && w.reason == reason.as_str())
            });
            if !already_told {
                warn!(namespace = %namespace, service_account, secret = %secret_name, %why, "the certificate Secret's name is taken by a Secret rolemesh did not create; it is left alone and nothing is issued");
                let event = PolicyEvent {
                    type_: EventType::Warning,
                    reason: reason.as_str(),
                    action: "IssueCertificates",
                    note: &message,
                };
                publish(run.ctx, run.policy, event).await;
            }
            let mut outcome = Outcome::failed(
                reason,
                refused(service_account, reason, message, None),
                false,
            );
            outcome.renew_at = Some(run.now + NAME_TAKEN_RECHECK);
            Some(outcome)
        }
    }
}
