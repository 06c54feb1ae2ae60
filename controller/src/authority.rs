//! The MTLSAuthority reconciler: keeps the CA in force ([`crate::ca`]) current in the shared
//! context, and the authority's status saying whether it is.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
    runtime::{
        Predicate, WatchStreamExt,
        events::{Event, EventType},
        predicates, watcher,
    },
};
use std::collections::BTreeSet;

use kube::ResourceExt;
use rolemesh_crds::{
    CaStatus, MTLSAuthority, MTLSAuthorityStatus, RevokedCertificate,
    names::{POLICY_LABEL, TLS_CERT_KEY},
};
use rolemesh_profile::{
    inspect::{certificates_from_pem, sha256_hex},
    inspect_certificate,
};
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    ControllerConfig,
    ca::{CA_CONFIGMAP, CaState, RefusedCertificate, establish_ca},
    context::Context,
    error::{Error, Result},
    policy::writes::FIELD_MANAGER,
    rotation::Observed,
    status::{ACCOUNTS_RESTRICTED, READY, Reason, condition, keep_transition_time, to_time},
};

/// The first wait after a failure; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(2);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// The status an authority should show for the outcome of establishing its CA.
fn authority_status(
    authority: &MTLSAuthority,
    result: &Result<Arc<CaState>>,
    now: OffsetDateTime,
) -> MTLSAuthorityStatus {
    let existing = authority.status.clone().unwrap_or_default();
    let generation = authority.metadata.generation;
    let wanted = match result {
        Ok(ca) => condition(
            READY,
            true,
            Reason::CaReady,
            format!(
                "CA {} signs through {}",
                ca.fingerprint,
                ca.signer.describe()
            ),
            generation,
            now,
        ),
        Err(error) => condition(
            READY,
            false,
            error.reason(),
            error.to_string(),
            generation,
            now,
        ),
    };
    MTLSAuthorityStatus {
        observed_generation: generation,
        conditions: vec![
            keep_transition_time(&existing.conditions, wanted),
            keep_transition_time(
                &existing.conditions,
                accounts_condition(authority, generation, now),
            ),
        ],
        ca_fingerprint: match result {
            Ok(ca) => Some(ca.fingerprint.clone()),
            Err(_) => existing.ca_fingerprint,
        },
        ca_not_after: match result {
            Ok(ca) => Some(to_time(ca.not_after)),
            Err(_) => existing.ca_not_after,
        },
        trust_bundle: match result {
            Ok(ca) => Some(ca.bundle_pem.clone()),
            Err(_) => existing.trust_bundle.clone(),
        },
        cas: match result {
            Ok(ca) => ca.cas.clone(),
            Err(_) => existing.cas.clone(),
        },
        last_rotate_request: match result {
            Ok(ca) => ca.last_rotate_request.clone(),
            Err(_) => existing.last_rotate_request.clone(),
        },
        last_prepare_request: match result {
            Ok(ca) => ca.last_prepare_request.clone(),
            Err(_) => existing.last_prepare_request.clone(),
        },
        revoked: match result {
            Ok(ca) => ca
                .revoked
                .iter()
                .map(|(serial, not_after)| RevokedCertificate {
                    serial: serial.clone(),
                    not_after: to_time(*not_after),
                })
                .collect(),
            Err(_) => existing.revoked,
        },
    }
}

/// Whether `allowedAccounts` restricts the roles certified to named AWS accounts. False is a
/// warning, not a failure: it is how authorities created before the field keep working.
fn accounts_condition(
    authority: &MTLSAuthority,
    generation: Option<i64>,
    now: OffsetDateTime,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    match &authority.spec.allowed_accounts {
        Some(accounts) => condition(
            ACCOUNTS_RESTRICTED,
            true,
            Reason::AccountsRestricted,
            format!(
                "only roles of AWS account(s) {} are certified",
                accounts.join(", ")
            ),
            generation,
            now,
        ),
        None => condition(
            ACCOUNTS_RESTRICTED,
            false,
            Reason::AnyAccountAllowed,
            "spec.allowedAccounts is not set, so roles of any AWS account are certified: anyone can create a role in their own account that trusts this cluster's public OIDC issuer and a ServiceAccount here, and allow/expect patterns naming only a role's name cannot tell it apart; set spec.allowedAccounts to your accounts".into(),
            generation,
            now,
        ),
    }
}

async fn write_authority_status(
    client: &Client,
    authority: &MTLSAuthority,
    result: &Result<Arc<CaState>>,
) -> Result<()> {
    let status = authority_status(authority, result, OffsetDateTime::now_utc());
    if authority.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let name = authority.metadata.name.clone().unwrap_or_default();
    let api: Api<MTLSAuthority> = Api::all(client.clone());
    let body = json!({
        "apiVersion": MTLSAuthority::api_version(&()),
        "kind": MTLSAuthority::kind(&()),
        "status": status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map_err(Error::kube(format!(
        "write the status of MTLSAuthority {name}"
    )))?;
    Ok(())
}

/// Where one pass over the authority leaves the reconcilers.
struct Pass<'a> {
    client: &'a Client,
    config: &'a ControllerConfig,
    aws: &'a aws_config::SdkConfig,
    ctx: &'a Context,
    /// Told when the policies must be reconciled again (the CA or bundle changed).
    trigger: &'a mpsc::Sender<()>,
}

impl Pass<'_> {
    /// Establishes the CA, hands it (or why there is none) to the policy reconciler, and writes
    /// the authority's status. Returns when to look again if a CA is in force; an error is a
    /// failed status write.
    async fn run(&self) -> Result<Option<Duration>> {
        let name = &self.config.authority;
        let api: Api<MTLSAuthority> = Api::all(self.client.clone());
        let (authority, outcome) = match api.get_opt(name).await {
            Ok(Some(authority)) => {
                let result = establish_ca(
                    self.client,
                    &self.config.namespace,
                    &authority,
                    self.aws,
                    &self.ctx.metrics,
                    &ClusterView::new(self.ctx),
                )
                .await
                .map(Arc::new);
                (Some(authority), result)
            }
            Ok(None) => (None, Err(Error::AuthorityMissing { name: name.clone() })),
            Err(source) => (
                None,
                Err(Error::Kube {
                    action: format!("read MTLSAuthority {name}"),
                    source,
                }),
            ),
        };
        let in_force = match &outcome {
            Ok(ca) => {
                if let Some(authority) = &authority {
                    self.report_refused(authority, &ca.refused).await;
                    self.report_phases(authority, &ca.cas).await;
                    self.report_ignored(authority, &ca.ignored).await;
                }
                self.publish(ca.clone());
                Some(ca.next_look)
            }
            Err(error) => {
                warn!(%error, authority = %name, "cannot establish the CA; existing Secrets are left as they are");
                let first_failure = self.ctx.ca.load().is_none();
                if let Ok(mut e) = self.ctx.ca_error.lock() {
                    *e = Some((error.reason(), error.to_string()));
                }
                if first_failure {
                    let _ = self.trigger.try_send(());
                }
                None
            }
        };
        if let Some(authority) = &authority {
            write_authority_status(self.client, authority, &outcome).await?;
        }
        Ok(in_force)
    }

    /// Says once, in the log and as an Event on the authority, which certificates of ConfigMap
    /// `rolemesh-ca` were left out of the bundle (the ConfigMap is rewritten without them, so
    /// the next pass finds none unless someone plants them again).
    async fn report_refused(&self, authority: &MTLSAuthority, refused: &[RefusedCertificate]) {
        if refused.is_empty() {
            return;
        }
        for certificate in refused {
            warn!(
                fingerprint = %certificate.fingerprint,
                subject = %certificate.subject,
                namespace = %self.config.namespace,
                configmap = CA_CONFIGMAP,
                "left a certificate out of the trust bundle: it is not a CA rolemesh made, the authority names or the authority's status records"
            );
        }
        let fingerprints: Vec<&str> = refused.iter().map(|c| c.fingerprint.as_str()).collect();
        let note = format!(
            "left {} certificate(s) of ConfigMap {}/{CA_CONFIGMAP} out of the trust bundle, not being CAs rolemesh made or the authority names (SHA-256 {}); name a CA to trust in spec.ca",
            refused.len(),
            self.config.namespace,
            fingerprints.join(", ")
        );
        self.publish_event(
            authority,
            EventType::Warning,
            Reason::ForeignCertificateRefused.as_str().to_string(),
            note,
            "PublishTrustBundle",
        )
        .await;
    }

    /// Publishes an Event on the authority; a failure to publish is logged, never fatal.
    async fn publish_event(
        &self,
        authority: &MTLSAuthority,
        type_: EventType,
        reason: String,
        note: String,
        action: &str,
    ) {
        let event = Event {
            type_,
            reason,
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        if let Err(error) = self
            .ctx
            .recorder
            .publish(&event, &authority.object_ref(&()))
            .await
        {
            warn!(%error, "failed to publish an event");
        }
    }

    /// Says once per change, in the log and as a Warning Event, which requests on the authority
    /// were not carried out.
    async fn report_ignored(&self, authority: &MTLSAuthority, ignored: &[String]) {
        let before = self.ctx.ca.load_full();
        if before.as_ref().is_some_and(|ca| ca.ignored == ignored) {
            return;
        }
        for why in ignored {
            warn!(reason = %Reason::RevocationIgnored, %why, "a request on the MTLSAuthority was not carried out");
            self.publish_event(
                authority,
                EventType::Warning,
                Reason::RevocationIgnored.as_str().to_string(),
                why.clone(),
                "RevokeCertificate",
            )
            .await;
        }
    }

    /// Says each phase change as an Event on the authority and in the log.
    async fn report_phases(&self, authority: &MTLSAuthority, cas: &[CaStatus]) {
        let before = authority
            .status
            .as_ref()
            .map(|s| s.cas.clone())
            .unwrap_or_default();
        let phase_in = |list: &[CaStatus], fingerprint: &str| {
            list.iter()
                .find(|ca| ca.fingerprint == fingerprint)
                .map(|ca| ca.phase)
        };
        let mut notes = Vec::new();
        for ca in cas {
            if phase_in(&before, &ca.fingerprint) != Some(ca.phase) {
                notes.push((
                    format!("Ca{}", ca.phase.as_str()),
                    format!(
                        "CA {} ({}) is {}",
                        ca.fingerprint,
                        ca.subject,
                        ca.phase.as_str()
                    ),
                ));
            }
        }
        for ca in &before {
            if phase_in(cas, &ca.fingerprint).is_none() {
                notes.push((
                    "CaRetired".to_string(),
                    format!(
                        "CA {} ({}) left every trust bundle",
                        ca.fingerprint, ca.subject
                    ),
                ));
            }
        }
        for (reason, note) in notes {
            info!(%reason, %note, "CA phase changed");
            self.publish_event(authority, EventType::Normal, reason, note, "RotateCA")
                .await;
        }
    }

    fn publish(&self, ca: Arc<CaState>) {
        let current = self.ctx.ca.load_full();
        let changed = current.as_ref().is_none_or(|c| {
            c.fingerprint != ca.fingerprint
                || c.bundle_pem != ca.bundle_pem
                || c.trust_domain != ca.trust_domain
                || c.verification != ca.verification
                || c.generation != ca.generation
                || c.revoked != ca.revoked
                || c.blocked != ca.blocked
        });
        if let Ok(mut e) = self.ctx.ca_error.lock() {
            *e = None;
        }
        if changed {
            info!(fingerprint = %ca.fingerprint, signer = %ca.signer.describe(), trust_domain = %ca.trust_domain, "CA in force");
            match &ca.allowed_accounts {
                Some(accounts) => {
                    info!(allowed_accounts = ?accounts, "certifying roles of the allowed AWS accounts only")
                }
                None => warn!(
                    reason = %Reason::AnyAccountAllowed,
                    "the MTLSAuthority sets no allowedAccounts: roles of any AWS account are certified; set spec.allowedAccounts"
                ),
            }
            self.ctx.ca.store(Some(ca));
            let _ = self.trigger.try_send(());
        }
    }
}

/// What the reconcilers' caches and this process's writes show about each CA.
struct ClusterView<'a> {
    ctx: &'a Context,
    now: OffsetDateTime,
}

impl<'a> ClusterView<'a> {
    fn new(ctx: &'a Context) -> Self {
        Self {
            ctx,
            now: OffsetDateTime::now_utc(),
        }
    }
}

impl Observed for ClusterView<'_> {
    /// Every namespace a policy covers holds the trust bundle this process applied there; the
    /// process forgets what it applied when it restarts or loses the lease, so a new leader
    /// waits until it has written every bundle itself.
    fn in_every_bundle(&self, ca: &CaStatus) -> bool {
        let namespaces: BTreeSet<String> = self
            .ctx
            .caches
            .policies
            .state()
            .iter()
            .filter_map(|policy| policy.metadata.namespace.clone())
            .collect();
        namespaces.iter().all(|namespace| {
            self.ctx.applied_bundle(namespace).is_some_and(|bundle| {
                certificates_from_pem(&bundle)
                    .map(|ders| ders.iter().any(|der| sha256_hex(der) == ca.fingerprint))
                    .unwrap_or(false)
            })
        })
    }

    /// Workload Secrets whose certificate names the CA as issuer and has not expired. The
    /// subject is the CA's own (each CA rolemesh makes has a subject of its own).
    fn certificates_signed(&self, ca: &CaStatus) -> usize {
        self.ctx
            .caches
            .secrets
            .state()
            .iter()
            .filter(|secret| secret.labels().contains_key(POLICY_LABEL))
            .filter_map(|secret| {
                let pem = secret.data.as_ref()?.get(TLS_CERT_KEY)?;
                let ders = certificates_from_pem(std::str::from_utf8(&pem.0).ok()?).ok()?;
                inspect_certificate(ders.first()?).ok()
            })
            .filter(|leaf| leaf.issuer == ca.subject && leaf.not_after > self.now)
            .count()
    }
}

/// Keeps `ctx.ca` current: on every change of the MTLSAuthority and every few minutes (to roll
/// the CA before it expires). Policies are re-reconciled whenever the CA or bundle changes.
pub async fn maintain_ca(
    client: Client,
    config: ControllerConfig,
    aws: aws_config::SdkConfig,
    ctx: Arc<Context>,
    trigger: mpsc::Sender<()>,
) {
    let api: Api<MTLSAuthority> = Api::all(client.clone());
    let mut changes = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={}", config.authority)),
    )
    .default_backoff()
    .applied_objects()
    // Rotation requests are annotations, which leave the generation alone.
    .predicate_filter(
        predicates::generation.combine(predicates::annotations),
        Default::default(),
    )
    .boxed();
    let pass = Pass {
        client: &client,
        config: &config,
        aws: &aws,
        ctx: &ctx,
        trigger: &trigger,
    };
    let mut retry = FIRST_RETRY;
    loop {
        let wait = match pass.run().await {
            Ok(Some(next_look)) => {
                retry = FIRST_RETRY;
                next_look
            }
            Ok(None) => {
                retry = (retry * 2).min(MAX_RETRY);
                retry
            }
            Err(error) => {
                warn!(%error, authority = %config.authority, reason = %error.reason(), "failed to write the MTLSAuthority status");
                retry = (retry * 2).min(MAX_RETRY);
                retry
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = changes.next() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(
        conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    ) -> MTLSAuthority {
        let mut authority = MTLSAuthority::new("default", Default::default());
        authority.metadata.generation = Some(3);
        authority.status = Some(MTLSAuthorityStatus {
            observed_generation: Some(2),
            conditions,
            ca_fingerprint: Some("ab".into()),
            ca_not_after: Some(to_time(OffsetDateTime::UNIX_EPOCH)),
            trust_bundle: Some("recorded".into()),
            ..Default::default()
        });
        authority
    }

    /// Issue 15, item 1: the authority says whether roles are restricted to named accounts,
    /// and warns (False, AnyAccountAllowed) when they are not.
    #[test]
    fn the_status_says_whether_accounts_are_restricted() {
        let at = OffsetDateTime::from_unix_timestamp(50).expect("timestamp");
        let failed: Result<Arc<CaState>> = Err(Error::AuthorityMissing {
            name: "default".into(),
        });
        let mut open = authority(vec![]);
        open.spec.allowed_accounts = None;
        let mut restricted = authority(vec![]);
        restricted.spec.allowed_accounts = Some(vec!["111122223333".into(), "444455556666".into()]);
        // (case, authority, expected status, reason, words of the message)
        let rows = [
            (
                "absent",
                &open,
                "False",
                "AnyAccountAllowed",
                "set spec.allowedAccounts",
            ),
            (
                "listed",
                &restricted,
                "True",
                "AccountsRestricted",
                "111122223333, 444455556666",
            ),
        ];
        for (case, authority, status, reason, words) in rows {
            let conditions = authority_status(authority, &failed, at).conditions;
            let accounts = conditions
                .iter()
                .find(|c| c.type_ == ACCOUNTS_RESTRICTED)
                .expect("AccountsRestricted condition");
            assert_eq!(
                (accounts.status.as_str(), accounts.reason.as_str()),
                (status, reason),
                "{case}"
            );
            assert!(
                accounts.message.contains(words),
                "{case}: {}",
                accounts.message
            );
            // Ready still comes first, as kubectl's Ready column reads it.
            assert_eq!(conditions[0].type_, READY, "{case}");
        }
    }

    #[test]
    fn a_failure_keeps_the_last_ca_facts_and_says_why() {
        let at = |s| OffsetDateTime::from_unix_timestamp(s).expect("timestamp");
        let was_down = condition(
            READY,
            false,
            Reason::AuthorityInvalid,
            "x".into(),
            Some(2),
            at(10),
        );
        // (case, existing conditions, expected lastTransitionTime)
        let rows = vec![
            ("first failure", vec![], 50),
            ("still failing", vec![was_down], 10),
        ];
        for (case, conditions, expected) in rows {
            let failed: Result<Arc<CaState>> = Err(Error::AuthorityMissing {
                name: "default".into(),
            });
            let status = authority_status(&authority(conditions), &failed, at(50));
            assert_eq!(status.observed_generation, Some(3), "{case}");
            assert_eq!(status.ca_fingerprint.as_deref(), Some("ab"), "{case}");
            // A failure keeps the recorded bundle: it is what lets earlier CAs stay trusted.
            assert_eq!(status.trust_bundle.as_deref(), Some("recorded"), "{case}");
            assert_eq!(
                status.ca_not_after,
                Some(to_time(OffsetDateTime::UNIX_EPOCH)),
                "{case}"
            );
            let ready = &status.conditions[0];
            assert_eq!(
                (ready.status.as_str(), ready.reason.as_str()),
                ("False", "AuthorityMissing"),
                "{case}"
            );
            assert_eq!(ready.last_transition_time, to_time(at(expected)), "{case}");
        }
    }
}
