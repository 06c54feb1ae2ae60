//! Which ServiceAccounts a policy covers, and with which certificate settings. Pure functions of
//! the policy and the caches' contents.

use std::{collections::BTreeSet, sync::Arc};

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{ResourceExt, runtime::reflector::ObjectRef};
use rolemesh_crds::{MTLSPolicy, covering_policy};
use rolemesh_profile::{CertificateProfile, MAX_DURATION, MIN_DURATION, parse_duration};

use crate::error::{Error, Result};

/// Whether `policy` names or selects `service_account`.
pub fn selects(policy: &MTLSPolicy, service_account: &ServiceAccount) -> bool {
    let namespace = service_account
        .metadata
        .namespace
        .as_deref()
        .unwrap_or_default();
    policy
        .selects(
            namespace,
            &service_account.name_any(),
            Some(service_account.labels()),
        )
        .unwrap_or(false)
}

/// The policies to reconcile when a ServiceAccount changes.
pub fn policies_for_service_account<'a>(
    policies: impl IntoIterator<Item = &'a Arc<MTLSPolicy>>,
    service_account: &ServiceAccount,
) -> Vec<ObjectRef<MTLSPolicy>> {
    policies
        .into_iter()
        .filter(|p| p.namespace() == service_account.namespace())
        // A ServiceAccount that a selector no longer matches still needs a reconcile (its Secret
        // must go), so every policy of the namespace with a selector runs.
        .filter(|p| selects(p, service_account) || p.spec.service_accounts.selector.is_some())
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// A ServiceAccount the policy selects but an older policy covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overlap {
    pub service_account: String,
    /// The policy that covers it.
    pub covered_by: String,
}

/// How the ServiceAccounts a policy selects divide.
#[derive(Debug, Default)]
pub struct Coverage {
    /// The ServiceAccounts this policy covers.
    pub covered: Vec<Arc<ServiceAccount>>,
    /// Those it selects but another policy covers.
    pub overlaps: Vec<Overlap>,
    /// Names listed in the policy that match no ServiceAccount.
    pub missing: Vec<String>,
}

impl Coverage {
    /// Divides the `service_accounts` of the policy's namespace by the one coverage rule, given
    /// `all_policies` (of any namespace).
    pub fn of(
        policy: &MTLSPolicy,
        all_policies: &[Arc<MTLSPolicy>],
        service_accounts: &[Arc<ServiceAccount>],
    ) -> Self {
        let mut coverage = Self::default();
        for sa in service_accounts.iter().filter(|sa| selects(policy, sa)) {
            let selecting = all_policies
                .iter()
                .map(Arc::as_ref)
                .filter(|p| selects(p, sa));
            match covering_policy(selecting) {
                Some(winner) if winner.name_any() != policy.name_any() => {
                    coverage.overlaps.push(Overlap {
                        service_account: sa.name_any(),
                        covered_by: winner.name_any(),
                    })
                }
                _ => coverage.covered.push(sa.clone()),
            }
        }
        let present: BTreeSet<String> = service_accounts
            .iter()
            .filter(|sa| sa.namespace() == policy.namespace())
            .map(|sa| sa.name_any())
            .collect();
        coverage.missing = policy
            .spec
            .service_accounts
            .names
            .iter()
            .filter(|n| !present.contains(*n))
            .cloned()
            .collect();
        coverage
    }

    /// The policies that cover what this one selects, sorted and once each.
    pub fn overlapping_policies(&self) -> Vec<&str> {
        let names: BTreeSet<&str> = self
            .overlaps
            .iter()
            .map(|o| o.covered_by.as_str())
            .collect();
        names.into_iter().collect()
    }
}

/// The certificate settings of a policy.
pub fn profile_of(policy: &MTLSPolicy) -> Result<CertificateProfile> {
    let mut profile = CertificateProfile::default();
    if let Some(settings) = &policy.spec.certificate {
        if let Some(duration) = &settings.duration {
            profile.duration = parse_duration(duration)
                .map_err(|e| Error::InvalidPolicy(format!("certificate.duration: {e}")))?;
            // The CRD schema says the same; this holds for policies stored before it did.
            if !(MIN_DURATION..=MAX_DURATION).contains(&profile.duration) {
                return Err(Error::InvalidPolicy(format!(
                    "certificate.duration {duration} is out of range: set it between 10m and 720h (30 days)"
                )));
            }
        }
        if let Some(before) = &settings.renew_before {
            let before = parse_duration(before)
                .map_err(|e| Error::InvalidPolicy(format!("certificate.renewBefore: {e}")))?;
            if before >= profile.duration {
                return Err(Error::InvalidPolicy(
                    "certificate.renewBefore must be shorter than certificate.duration".into(),
                ));
            }
            profile.renew_before = Some(before);
        }
    }
    Ok(profile)
}
