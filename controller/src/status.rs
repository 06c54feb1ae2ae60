//! What the controller says in status: the reasons (one enum, whose names are the strings
//! shown), the conditions, and the one conversion to the API's timestamps.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use time::OffsetDateTime;

pub use rolemesh_crds::reasons::Reason;

/// Condition type saying whether the policy's certificates are all valid.
pub const READY: &str = "Ready";
/// Condition type saying whether the policy selects ServiceAccounts an older policy covers.
pub const CONFLICTED: &str = "Conflicted";
/// Condition type of an MTLSAuthority saying whether `allowedAccounts` restricts the roles it
/// certifies to named AWS accounts (False: any account).
pub const ACCOUNTS_RESTRICTED: &str = "AccountsRestricted";

/// The API's timestamp for `t`. The controller computes with `time` (the profile crate's
/// certificates do); the API types want `jiff`, converted here only.
pub fn to_time(t: OffsetDateTime) -> Time {
    Time(Timestamp::from_second(t.unix_timestamp()).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// The instant a status time names, to the second; the Unix epoch when it is out of range.
pub fn from_time(t: &Time) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t.0.as_second()).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A condition as wanted now; see [`keep_transition_time`].
pub fn condition(
    type_: &str,
    status: bool,
    reason: Reason,
    message: String,
    generation: Option<i64>,
    now: OffsetDateTime,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.as_str().into(),
        message,
        observed_generation: generation,
        last_transition_time: to_time(now),
    }
}

/// Conditions keep their lastTransitionTime while their status does not change.
pub fn keep_transition_time(existing: &[Condition], mut wanted: Condition) -> Condition {
    if let Some(old) = existing.iter().find(|c| c.type_ == wanted.type_)
        && old.status == wanted.status
    {
        wanted.last_transition_time = old.last_transition_time.clone();
    }
    wanted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(second).expect("timestamp")
    }

    #[test]
    fn transition_time() {
        let was_ready = condition(
            READY,
            true,
            Reason::CertificatesIssued,
            "old".into(),
            Some(1),
            at(100),
        );
        let was_conflicted = condition(
            CONFLICTED,
            true,
            Reason::OverlapsPolicy,
            "old".into(),
            Some(1),
            at(100),
        );
        // (case, existing, wanted, expected lastTransitionTime)
        let rows: Vec<(&str, Vec<Condition>, Condition, i64)> = vec![
            (
                "new condition",
                vec![],
                condition(
                    READY,
                    true,
                    Reason::CertificatesIssued,
                    "m".into(),
                    Some(2),
                    at(200),
                ),
                200,
            ),
            (
                "same status: kept",
                vec![was_ready.clone()],
                condition(
                    READY,
                    true,
                    Reason::CertificatesIssued,
                    "m".into(),
                    Some(2),
                    at(200),
                ),
                100,
            ),
            (
                "same status, new reason and message: kept",
                vec![was_ready.clone()],
                condition(
                    READY,
                    true,
                    Reason::Issued,
                    "other".into(),
                    Some(2),
                    at(200),
                ),
                100,
            ),
            (
                "status flips: now",
                vec![was_ready.clone()],
                condition(
                    READY,
                    false,
                    Reason::CaNotReady,
                    "m".into(),
                    Some(2),
                    at(200),
                ),
                200,
            ),
            (
                "another type with the same status does not count",
                vec![was_conflicted.clone()],
                condition(
                    READY,
                    true,
                    Reason::CertificatesIssued,
                    "m".into(),
                    Some(2),
                    at(200),
                ),
                200,
            ),
            (
                "the matching type among several",
                vec![was_conflicted, was_ready],
                condition(
                    READY,
                    true,
                    Reason::CertificatesIssued,
                    "m".into(),
                    Some(2),
                    at(200),
                ),
                100,
            ),
        ];
        for (case, existing, wanted, expected) in rows {
            let kept = keep_transition_time(&existing, wanted.clone());
            assert_eq!(kept.last_transition_time, to_time(at(expected)), "{case}");
            // Everything but the time is what was wanted.
            assert_eq!(
                Condition {
                    last_transition_time: wanted.last_transition_time.clone(),
                    ..kept
                },
                wanted,
                "{case}"
            );
        }
    }

    #[test]
    fn reasons_are_their_names_and_described() {
        assert_eq!(
            Reason::CoveredByAnotherPolicy.as_str(),
            "CoveredByAnotherPolicy"
        );
        assert_eq!(
            Reason::Issued.description(),
            "A certificate was issued after STS verified the role."
        );
        for reason in Reason::ALL {
            assert!(!reason.description().is_empty(), "{reason}");
        }
        let mut names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len());
    }
}
