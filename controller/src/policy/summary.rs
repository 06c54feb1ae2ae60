//! What one reconcile of a policy amounts to: the status (workload entries, the Ready and
//! Conflicted conditions), the Events to publish and when to look again. Pure: no API calls.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use rolemesh_crds::{MTLSPolicy, MTLSPolicyStatus, WorkloadStatus};
use time::OffsetDateTime;

use super::{
    select::Coverage,
    workload::{Outcome, refused},
};
use crate::{
    certificate::IssueReason,
    status::{CONFLICTED, READY, Reason, condition, keep_transition_time},
};

/// What one reconcile of a policy amounts to: its status, and what to tell and when to return.
pub(super) struct Summary {
    pub status: MTLSPolicyStatus,
    pub issued: usize,
    /// ServiceAccounts re-issued on a rotation request, sorted.
    pub rotated: Vec<String>,
    pub first_transient_failure: Option<WorkloadStatus>,
    pub transient: bool,
    pub renew_at: Option<OffsetDateTime>,
}

impl Summary {
    pub fn of(policy: &MTLSPolicy, coverage: &Coverage, outcomes: Vec<Outcome>) -> Self {
        let namespace = policy.namespace().unwrap_or_default();
        let mut entries: BTreeMap<String, (Reason, WorkloadStatus)> = BTreeMap::new();
        for overlap in &coverage.overlaps {
            let reason = Reason::CoveredByAnotherPolicy;
            let message = format!(
                "ServiceAccount {namespace}/{} is also covered by the older MTLSPolicy {}, which owns its identity; remove it from one of the two",
                overlap.service_account, overlap.covered_by
            );
            let status = refused(&overlap.service_account, reason, message, None);
            entries.insert(overlap.service_account.clone(), (reason, status));
        }
        for listed in &coverage.missing {
            let reason = Reason::ServiceAccountNotFound;
            let message = format!(
                "ServiceAccount {namespace}/{listed} does not exist; create it with the {} annotation",
                rolemesh_profile::ROLE_ARN_ANNOTATION
            );
            entries.insert(
                listed.clone(),
                (reason, refused(listed, reason, message, None)),
            );
        }

        let mut summary = Self {
            status: MTLSPolicyStatus::default(),
            issued: 0,
            rotated: Vec::new(),
            first_transient_failure: None,
            transient: false,
            renew_at: None,
        };
        for outcome in outcomes {
            summary.transient |= outcome.transient;
            if outcome.transient && summary.first_transient_failure.is_none() {
                summary.first_transient_failure = Some(outcome.status.clone());
            }
            if let Some(at) = outcome.renew_at {
                summary.renew_at = Some(summary.renew_at.map_or(at, |r| r.min(at)));
            }
            if let Some(why) = outcome.issued {
                summary.issued += 1;
                if why == IssueReason::Rotation {
                    summary.rotated.push(outcome.status.service_account.clone());
                }
            }
            entries.insert(
                outcome.status.service_account.clone(),
                (outcome.reason, outcome.status),
            );
        }
        summary.rotated.sort();

        let existing = policy.status.clone().unwrap_or_default();
        let generation = policy.metadata.generation;
        let now = OffsetDateTime::now_utc();
        let (ready, reason, message) = readiness(coverage.covered.len(), entries.values());
        let ready = condition(READY, ready, reason, message, generation, now);
        let conflicted = conflicted_condition(coverage, generation, now);
        let workloads: Vec<WorkloadStatus> = entries.into_values().map(|(_, s)| s).collect();
        summary.status = MTLSPolicyStatus {
            observed_generation: generation,
            conditions: vec![
                keep_transition_time(&existing.conditions, ready),
                keep_transition_time(&existing.conditions, conflicted),
            ],
            covered_service_accounts: i32::try_from(coverage.covered.len()).unwrap_or(i32::MAX),
            soonest_not_after: workloads
                .iter()
                .filter_map(|w| w.not_after.clone())
                .min_by_key(|t| t.0),
            workloads,
            last_rotation: None,
            // Filled in by the reconciler, which lists the pods.
            pods: None,
        };
        summary
    }
}

/// The Ready condition's status, reason and message from the workloads' entries.
pub(super) fn readiness<'a>(
    covered: usize,
    entries: impl ExactSizeIterator<Item = &'a (Reason, WorkloadStatus)>,
) -> (bool, Reason, String) {
    let total = entries.len();
    let failing: Vec<&(Reason, WorkloadStatus)> = entries
        .filter(|(reason, _)| !matches!(reason, Reason::Issued | Reason::IssuedUnverified))
        .collect();
    if covered == 0 && failing.is_empty() {
        return (
            false,
            Reason::NoServiceAccounts,
            "the policy covers no ServiceAccount".to_string(),
        );
    }
    let Some((reason, first)) = failing.first() else {
        return (
            true,
            Reason::CertificatesIssued,
            format!("{total} ServiceAccount(s) have valid certificates"),
        );
    };
    (
        false,
        *reason,
        format!(
            "{} of {total} ServiceAccount(s) have no valid certificate; {}: {}",
            failing.len(),
            first.service_account,
            first.message.clone().unwrap_or_default()
        ),
    )
}

/// The Conflicted condition: whether an older policy covers some of what this one selects, and
/// which.
pub(super) fn conflicted_condition(
    coverage: &Coverage,
    generation: Option<i64>,
    now: OffsetDateTime,
) -> Condition {
    let winners = coverage.overlapping_policies();
    if winners.is_empty() {
        return condition(
            CONFLICTED,
            false,
            Reason::NoOverlap,
            "no older MTLSPolicy covers a ServiceAccount this policy selects".into(),
            generation,
            now,
        );
    }
    let service_accounts: Vec<&str> = coverage
        .overlaps
        .iter()
        .map(|o| o.service_account.as_str())
        .collect();
    condition(
        CONFLICTED,
        true,
        Reason::OverlapsPolicy,
        format!(
            "the older MTLSPolicy {} covers ServiceAccount(s) {} that this policy also selects; they keep their identity from it until it no longer covers them",
            winners.join(", "),
            service_accounts.join(", ")
        ),
        generation,
        now,
    )
}
