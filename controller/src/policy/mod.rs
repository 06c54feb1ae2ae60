//! The MTLSPolicy reconciler: for every ServiceAccount a policy covers, a verified identity and a
//! valid certificate Secret; the namespace's trust bundle; status by server-side apply.
//!
//! [`select`] decides what the policy covers, [`workload`] what each ServiceAccount needs,
//! `summary` sums the outcomes up into the status, [`writes`] talks to the API server; this
//! module puts them together.

pub mod pods;
pub mod select;
mod summary;
pub mod workload;
pub mod writes;

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{
    Resource, ResourceExt,
    runtime::{controller::Action, events::EventType},
};
use rolemesh_crds::{
    MTLSPolicy, MTLSPolicyStatus, RotationRecord,
    names::{POLICY_LABEL, ROTATE_ANNOTATION, SERVICE_ACCOUNT_LABEL, policy_rules_key},
};
use time::OffsetDateTime;
use tracing::warn;

use self::{
    select::{Coverage, profile_of},
    summary::Summary,
    workload::{Outcome, PolicyRun, reconcile_service_account},
    writes::{
        PolicyEvent, apply_last_rotation, apply_peer_rules, apply_status, apply_trust_bundle,
        delete_workload_secret, publish,
    },
};
use crate::{
    context::Context,
    error::{Error, Result},
    status::{READY, Reason, condition, keep_transition_time, to_time},
};

/// Reconciles one MTLSPolicy. Idempotent: a second run with nothing changed writes nothing.
pub async fn reconcile(policy: Arc<MTLSPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_policy(&policy, &ctx).await;
    ctx.metrics.reconciled(
        if result.is_ok() { "ok" } else { "error" },
        started.elapsed().as_secs_f64(),
    );
    result
}

/// Logs, counts and backs off.
pub fn error_policy(policy: Arc<MTLSPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(%error, namespace = %policy.namespace().unwrap_or_default(), policy = %policy.name_any(), reason = %error.reason(), "reconcile failed");
    ctx.metrics.certificate_failed(error.reason());
    Action::requeue(error.backoff())
}

/// The status of a policy that cannot be worked on at all: only its Ready condition changes.
async fn not_ready(
    ctx: &Context,
    policy: &MTLSPolicy,
    reason: Reason,
    message: String,
) -> Result<()> {
    let existing = policy.status.clone().unwrap_or_default();
    let generation = policy.metadata.generation;
    let wanted = condition(
        READY,
        false,
        reason,
        message,
        generation,
        OffsetDateTime::now_utc(),
    );
    let status = MTLSPolicyStatus {
        observed_generation: generation,
        conditions: vec![keep_transition_time(&existing.conditions, wanted)],
        ..existing
    };
    apply_status(ctx, policy, status).await
}

async fn reconcile_policy(policy: &MTLSPolicy, ctx: &Context) -> Result<Action> {
    let namespace = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    if policy.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }

    let Some(ca) = ctx.ca.load_full() else {
        let (reason, message) = ctx
            .ca_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_else(|| (Reason::CaNotReady, "the CA is not established yet".into()));
        not_ready(ctx, policy, reason, message).await?;
        return Ok(Action::requeue(Duration::from_secs(10)));
    };

    let profile = match profile_of(policy) {
        Ok(profile) => profile,
        Err(error) => {
            not_ready(ctx, policy, error.reason(), error.to_string()).await?;
            return Ok(Action::await_change());
        }
    };

    // The peer rules the proxies read; a policy whose rules they would refuse is not ready, and
    // the rules in force stay those of the last valid generation.
    let rules = match peer_rules_of(policy) {
        Ok(rules) => rules,
        Err(error) => {
            not_ready(ctx, policy, error.reason(), error.to_string()).await?;
            return Ok(Action::await_change());
        }
    };

    let owner = policy
        .controller_owner_ref(&())
        .ok_or_else(|| Error::InvalidPolicy("the policy has no uid yet".into()))?;
    let service_accounts: Vec<Arc<ServiceAccount>> = ctx
        .caches
        .service_accounts
        .state()
        .into_iter()
        .filter(|sa| sa.namespace().as_deref() == Some(namespace.as_str()))
        .collect();
    let coverage = Coverage::of(policy, &ctx.caches.policies.state(), &service_accounts);

    let in_namespace = |ns: Option<String>| ns.as_deref() == Some(namespace.as_str());
    let pods: Vec<_> = ctx
        .caches
        .pods
        .state()
        .into_iter()
        .filter(|p| in_namespace(p.namespace()))
        .collect();
    let services: Vec<_> = ctx
        .caches
        .services
        .state()
        .into_iter()
        .filter(|s| in_namespace(s.namespace()))
        .collect();
    let now = OffsetDateTime::now_utc();
    let run = PolicyRun {
        ctx,
        ca: ca.as_ref(),
        policy,
        owner: &owner,
        profile: &profile,
        now,
        pods: &pods,
        services: &services,
    };
    let run = &run;
    let outcomes: Vec<Outcome> = stream::iter(coverage.covered.iter().cloned())
        .map(|sa| async move { reconcile_service_account(run, &sa).await })
        .buffer_unordered(ctx.issue_concurrency.max(1))
        .collect()
        .await;

    // Secrets of ServiceAccounts this policy no longer covers go.
    let covered_names: BTreeSet<String> = coverage.covered.iter().map(|sa| sa.name_any()).collect();
    for secret in ctx.caches.secrets.state() {
        let labels = secret.labels();
        if secret.namespace().as_deref() == Some(namespace.as_str())
            && labels.get(POLICY_LABEL) == Some(&name)
            && labels
                .get(SERVICE_ACCOUNT_LABEL)
                .is_some_and(|sa| !covered_names.contains(sa))
        {
            delete_workload_secret(
                ctx,
                &owner.uid,
                &namespace,
                &secret.name_any(),
                Some(&secret),
            )
            .await;
        }
    }

    if !coverage.covered.is_empty() {
        let (key, json) = &rules;
        apply_peer_rules(ctx, &namespace, &name, key, json).await?;
        apply_trust_bundle(ctx, &namespace, &ca.bundle_pem).await?;
    }

    let summary = Summary::of(policy, &coverage, outcomes);
    if let Some(failure) = &summary.first_transient_failure {
        // One event per reconcile, not per ServiceAccount: an outage must not flood the API.
        let event = PolicyEvent {
            type_: EventType::Warning,
            reason: &failure.reason,
            action: "IssueCertificates",
            note: failure.message.as_deref().unwrap_or_default(),
        };
        publish(ctx, policy, event).await;
    }
    if summary.issued > 0 {
        let note = format!("issued {} certificate(s)", summary.issued);
        let event = PolicyEvent {
            type_: EventType::Normal,
            reason: Reason::Issued.as_str(),
            action: "IssueCertificates",
            note: &note,
        };
        publish(ctx, policy, event).await;
    }
    let mut last_rotation = None;
    if !summary.rotated.is_empty() {
        let request =
            annotation(policy, ROTATE_ANNOTATION).unwrap_or_else(|| "serviceaccount".into());
        let note = format!(
            "re-issued with new keys on request {request}: {}",
            summary.rotated.join(", ")
        );
        let event = PolicyEvent {
            type_: EventType::Normal,
            reason: "Rotated",
            action: "RotateCertificates",
            note: &note,
        };
        publish(ctx, policy, event).await;
        last_rotation = Some(RotationRecord {
            time: to_time(now),
            request,
            service_accounts: summary.rotated.clone(),
        });
    }

    let mut renew_at = summary.renew_at;
    let streak = ctx.transient_streak(&namespace, &name, summary.transient);
    let mut status = summary.status;
    status.pods = match pods::list_pods(ctx, &namespace).await {
        Ok(listed) => Some(pods::pods_status(policy, &listed)),
        Err(error) => {
            // The pods' report is worth a warning, never the reconcile: keep the last one.
            warn!(%error, namespace = %namespace, policy = %name, "cannot list the namespace's pods; the status keeps its last report of stale pods");
            policy.status.as_ref().and_then(|s| s.pods.clone())
        }
    };
    // Pods are not watched: while some are stale, look again soon, so that the report follows a
    // rollout that replaces them.
    if status.pods.as_ref().is_some_and(|p| p.stale_count > 0) {
        let soon = OffsetDateTime::now_utc() + STALE_POD_RECHECK;
        renew_at = Some(renew_at.map_or(soon, |at| at.min(soon)));
    }
    apply_status(ctx, policy, status).await?;
    if let Some(record) = last_rotation {
        apply_last_rotation(ctx, policy, record).await?;
    }
    Ok(next_reconcile(
        streak,
        rand::random::<f64>(),
        renew_at,
        OffsetDateTime::now_utc(),
    ))
}

/// The key of the policy's peer rules in the trust bundle ConfigMap and their JSON.
fn peer_rules_of(policy: &MTLSPolicy) -> Result<(String, String)> {
    let name = policy.name_any();
    let key = policy_rules_key(&name).ok_or_else(|| {
        Error::InvalidPolicy(format!(
            "the policy's name is longer than {} characters, too long for the key of its peer rules in ConfigMap {}; rename the policy",
            rolemesh_profile::proxy_config::MAX_RULES_POLICY_NAME,
            rolemesh_crds::names::TRUST_BUNDLE_CONFIGMAP
        ))
    })?;
    let rules = policy
        .peer_rules()
        .map_err(|e| Error::InvalidPolicy(format!("its peer rules are invalid: {e}")))?;
    Ok((key, rules.to_json()))
}

fn annotation(policy: &MTLSPolicy, key: &str) -> Option<String> {
    policy.annotations().get(key).cloned()
}

/// How often a policy with stale pods lists its pods again.
const STALE_POD_RECHECK: time::Duration = time::Duration::seconds(60);

/// The first wait after a transient failure (STS throttled or unreachable, the signer down); it
/// doubles with each further reconcile that fails so, up to [`TRANSIENT_MAX_BACKOFF`].
const TRANSIENT_FIRST_BACKOFF: Duration = Duration::from_secs(5);
/// Short enough that a certificate kept through an outage is renewed soon after it ends (the
/// shortest lifetime, 10m, leaves over 3 minutes to renew), long enough not to feed a throttle.
const TRANSIENT_MAX_BACKOFF: Duration = Duration::from_secs(120);

/// The wait after the `streak`-th reconcile in a row that ended with a transient failure:
/// exponential, capped, and spread by ±20% with `jitter` (in [0, 1)) so that policies failing
/// together (an STS outage) do not retry together.
pub(crate) fn transient_backoff(streak: u32, jitter: f64) -> Duration {
    let doublings = streak.saturating_sub(1).min(16);
    let base = TRANSIENT_FIRST_BACKOFF
        .saturating_mul(1 << doublings)
        .min(TRANSIENT_MAX_BACKOFF);
    base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
}

/// When to look at the policy again: after a transient failure with backoff (`streak` is how
/// many reconciles in a row had one, 0 for none), else when the first certificate is due, at
/// the latest in an hour.
fn next_reconcile(
    streak: u32,
    jitter: f64,
    renew_at: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Action {
    if streak > 0 {
        return Action::requeue(transient_backoff(streak, jitter));
    }
    match renew_at {
        Some(at) => {
            let wait = (at - now).max(time::Duration::seconds(1));
            Action::requeue(
                Duration::try_from(wait)
                    .unwrap_or(Duration::from_secs(1))
                    .min(Duration::from_secs(3600)),
            )
        }
        None => Action::requeue(Duration::from_secs(3600)),
    }
}

#[cfg(test)]
mod tests;
