//! The policy reconciler's pure decisions as tables: what a policy covers (the one coverage
//! rule), its certificate settings, its Ready and Conflicted conditions, and when it runs again.
//! Over 400 lines only because each table lists its rows in full.
#![allow(
    clippy::type_complexity,
    reason = "a table row is a tuple with one column per input and the expected result"
)]

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::core::v1::ServiceAccount, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp,
};
use kube::{ResourceExt, runtime::controller::Action};
use rolemesh_crds::{MTLSPolicy, WorkloadStatus};
use serde_json::json;
use time::OffsetDateTime;

use super::{
    next_reconcile, peer_rules_of,
    select::{Coverage, Overlap, policies_for_service_account, profile_of},
    summary::{conflicted_condition, readiness},
    transient_backoff,
};
use crate::status::Reason;

fn policy(name: &str, created: i64, service_accounts: serde_json::Value) -> Arc<MTLSPolicy> {
    let mut policy: MTLSPolicy = serde_json::from_value(json!({
        "apiVersion": "rolemesh.dev/v1alpha1", "kind": "MTLSPolicy",
        "metadata": { "name": name, "namespace": "shop" },
        "spec": { "serviceAccounts": service_accounts },
    }))
    .expect("policy fixture");
    policy.metadata.creation_timestamp =
        Some(Time(Timestamp::from_second(created).expect("timestamp")));
    Arc::new(policy)
}

fn with_certificate(certificate: serde_json::Value) -> MTLSPolicy {
    serde_json::from_value(json!({
        "apiVersion": "rolemesh.dev/v1alpha1", "kind": "MTLSPolicy",
        "metadata": { "name": "p", "namespace": "shop" },
        "spec": { "serviceAccounts": { "names": ["web"] }, "certificate": certificate },
    }))
    .expect("policy fixture")
}

fn service_account(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Arc<ServiceAccount> {
    let mut sa = ServiceAccount::default();
    sa.metadata.namespace = Some(namespace.into());
    sa.metadata.name = Some(name.into());
    sa.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    );
    Arc::new(sa)
}

fn names(sas: &[Arc<ServiceAccount>]) -> Vec<String> {
    sas.iter().map(|sa| sa.name_any()).collect()
}

#[test]
fn coverage() {
    let web = service_account("shop", "web", &[("tier", "front")]);
    let api = service_account("shop", "api", &[("tier", "front")]);
    let db = service_account("shop", "db", &[("tier", "back")]);
    let elsewhere = service_account("bank", "web", &[("tier", "front")]);
    let accounts = vec![web, api, db, elsewhere];
    let front = json!({ "selector": { "matchLabels": { "tier": "front" } } });
    let old_front = policy("old-front", 10, front.clone());
    let new_front = policy("new-front", 20, front.clone());
    let twin_front = policy("a-twin", 20, front);
    let web_by_name = policy("web", 5, json!({ "names": ["web", "ghost"] }));
    let db_by_name = policy("db", 30, json!({ "names": ["db"] }));

    // (case, the policy, all policies, covered, overlaps (ServiceAccount, covered by), missing)
    let rows: Vec<(
        &str,
        &Arc<MTLSPolicy>,
        Vec<Arc<MTLSPolicy>>,
        Vec<&str>,
        Vec<(&str, &str)>,
        Vec<&str>,
    )> = vec![
        (
            "alone: selects in its namespace only",
            &old_front,
            vec![old_front.clone()],
            vec!["web", "api"],
            vec![],
            vec![],
        ),
        (
            "older of two overlapping covers",
            &old_front,
            vec![old_front.clone(), new_front.clone()],
            vec!["web", "api"],
            vec![],
            vec![],
        ),
        (
            "newer of two overlapping is told who covers",
            &new_front,
            vec![old_front.clone(), new_front.clone()],
            vec![],
            vec![("web", "old-front"), ("api", "old-front")],
            vec![],
        ),
        (
            "same age: the first name covers",
            &twin_front,
            vec![new_front.clone(), twin_front.clone()],
            vec!["web", "api"],
            vec![],
            vec![],
        ),
        (
            "same age: the later name loses",
            &new_front,
            vec![new_front.clone(), twin_front.clone()],
            vec![],
            vec![("web", "a-twin"), ("api", "a-twin")],
            vec![],
        ),
        (
            "an older name list takes one of a selector's",
            &old_front,
            vec![old_front.clone(), web_by_name.clone()],
            vec!["api"],
            vec![("web", "web")],
            vec![],
        ),
        (
            "a listed name that does not exist is missing",
            &web_by_name,
            vec![web_by_name.clone()],
            vec!["web"],
            vec![],
            vec!["ghost"],
        ),
        (
            "disjoint policies do not overlap",
            &db_by_name,
            vec![old_front.clone(), db_by_name.clone()],
            vec!["db"],
            vec![],
            vec![],
        ),
    ];
    for (case, this, all, covered, overlaps, missing) in rows {
        let coverage = Coverage::of(this, &all, &accounts);
        assert_eq!(names(&coverage.covered), covered, "{case}: covered");
        let expected: Vec<Overlap> = overlaps
            .iter()
            .map(|(sa, by)| Overlap {
                service_account: sa.to_string(),
                covered_by: by.to_string(),
            })
            .collect();
        assert_eq!(coverage.overlaps, expected, "{case}: overlaps");
        assert_eq!(coverage.missing, missing, "{case}: missing");
    }
}

#[test]
fn a_service_account_change_reconciles_the_policies_that_may_cover_it() {
    let by_name = policy("by-name", 1, json!({ "names": ["web"] }));
    let other_name = policy("other-name", 1, json!({ "names": ["db"] }));
    let by_label = policy(
        "by-label",
        1,
        json!({ "selector": { "matchLabels": { "tier": "front" } } }),
    );
    let all = vec![by_name, other_name, by_label];
    // (case, ServiceAccount, policies to reconcile)
    let rows = vec![
        (
            "named and selected",
            service_account("shop", "web", &[("tier", "front")]),
            vec!["by-name", "by-label"],
        ),
        // Its labels no longer match, but its Secret may have to go.
        (
            "no longer selected",
            service_account("shop", "web", &[]),
            vec!["by-name", "by-label"],
        ),
        (
            "other namespace",
            service_account("bank", "web", &[("tier", "front")]),
            vec![],
        ),
    ];
    for (case, sa, expected) in rows {
        let refs = policies_for_service_account(&all, &sa);
        let got: Vec<&str> = refs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(got, expected, "{case}");
    }
}

#[test]
fn profile_of_reads_the_certificate_settings() {
    let hours = |h: u64| Duration::from_secs(h * 3600);
    // (case, certificate settings, Ok((duration, renewBefore)) or Err(what the error names))
    let rows: Vec<(
        &str,
        serde_json::Value,
        Result<(Duration, Option<Duration>), &str>,
    )> = vec![
        ("defaults", json!({}), Ok((hours(24), None))),
        (
            "duration",
            json!({ "duration": "48h" }),
            Ok((hours(48), None)),
        ),
        (
            "renewBefore",
            json!({ "renewBefore": "2h" }),
            Ok((hours(24), Some(hours(2)))),
        ),
        (
            "both",
            json!({ "duration": "90m", "renewBefore": "30m" }),
            Ok((Duration::from_secs(5400), Some(Duration::from_secs(1800)))),
        ),
        (
            "renewBefore as long as duration",
            json!({ "duration": "1h", "renewBefore": "1h" }),
            Err("renewBefore must be shorter"),
        ),
        (
            "renewBefore past the default",
            json!({ "renewBefore": "30h" }),
            Err("renewBefore must be shorter"),
        ),
        (
            "bad duration",
            json!({ "duration": "a day" }),
            Err("certificate.duration"),
        ),
        (
            "bad renewBefore",
            json!({ "renewBefore": "soon" }),
            Err("certificate.renewBefore"),
        ),
        (
            "the longest lifetime",
            json!({ "duration": "720h" }),
            Ok((hours(720), None)),
        ),
        (
            "longer than 30 days (stored before the schema capped it)",
            json!({ "duration": "2160h" }),
            Err("between 10m and 720h"),
        ),
        (
            "shorter than 10m",
            json!({ "duration": "5m" }),
            Err("between 10m and 720h"),
        ),
    ];
    for (case, settings, expected) in rows {
        let got = profile_of(&with_certificate(settings));
        match (got, expected) {
            (Ok(profile), Ok((duration, renew_before))) => {
                assert_eq!(
                    (profile.duration, profile.renew_before),
                    (duration, renew_before),
                    "{case}"
                )
            }
            (Err(error), Err(names)) => {
                assert_eq!(error.reason(), Reason::InvalidPolicy, "{case}");
                assert!(error.to_string().contains(names), "{case}: {error}");
            }
            (got, expected) => panic!("{case}: got {got:?}, expected {expected:?}"),
        }
    }
}

fn entry(service_account: &str, reason: Reason, message: &str) -> (Reason, WorkloadStatus) {
    (
        reason,
        WorkloadStatus {
            service_account: service_account.into(),
            reason: reason.as_str().into(),
            message: (!message.is_empty()).then(|| message.to_string()),
            ..Default::default()
        },
    )
}

#[test]
fn readiness_sums_up_the_workloads() {
    let issued = entry("web", Reason::Issued, "");
    let unverified = entry("api", Reason::IssuedUnverified, "verification is off");
    let refused = entry("db", Reason::StsRefused, "STS said no");
    let covered_elsewhere = entry("old", Reason::CoveredByAnotherPolicy, "older policy");
    // (case, covered count, entries, expected (ready, reason, message))
    let rows: Vec<(
        &str,
        usize,
        Vec<(Reason, WorkloadStatus)>,
        (bool, Reason, &str),
    )> = vec![
        (
            "nothing covered",
            0,
            vec![],
            (
                false,
                Reason::NoServiceAccounts,
                "the policy covers no ServiceAccount",
            ),
        ),
        (
            "all issued",
            2,
            vec![issued.clone(), unverified.clone()],
            (
                true,
                Reason::CertificatesIssued,
                "2 ServiceAccount(s) have valid certificates",
            ),
        ),
        (
            "one refused: its reason and message",
            3,
            vec![issued.clone(), refused.clone(), unverified],
            (
                false,
                Reason::StsRefused,
                "1 of 3 ServiceAccount(s) have no valid certificate; db: STS said no",
            ),
        ),
        (
            "covering nothing because of an overlap is not ready",
            0,
            vec![covered_elsewhere.clone()],
            (
                false,
                Reason::CoveredByAnotherPolicy,
                "1 of 1 ServiceAccount(s) have no valid certificate; old: older policy",
            ),
        ),
        (
            "the first failing entry names the reason",
            1,
            vec![covered_elsewhere, issued, refused],
            (
                false,
                Reason::CoveredByAnotherPolicy,
                "2 of 3 ServiceAccount(s) have no valid certificate; old: older policy",
            ),
        ),
    ];
    for (case, covered, entries, (ready, reason, message)) in rows {
        let got = readiness(covered, entries.iter());
        assert_eq!(got, (ready, reason, message.to_string()), "{case}");
    }
}

#[test]
fn conflicted_names_the_covering_policies() {
    let now = OffsetDateTime::UNIX_EPOCH;
    let overlap = |sa: &str, by: &str| Overlap {
        service_account: sa.into(),
        covered_by: by.into(),
    };
    // (case, overlaps, expected (status, reason), words the message must hold)
    let rows: Vec<(&str, Vec<Overlap>, (&str, &str), Vec<&str>)> = vec![
        ("no overlap", vec![], ("False", "NoOverlap"), vec![]),
        (
            "one",
            vec![overlap("web", "old")],
            ("True", "OverlapsPolicy"),
            vec!["MTLSPolicy old", "web"],
        ),
        (
            "two policies, each named once",
            vec![
                overlap("web", "old"),
                overlap("api", "older"),
                overlap("db", "old"),
            ],
            ("True", "OverlapsPolicy"),
            vec!["MTLSPolicy old, older", "web, api, db"],
        ),
    ];
    for (case, overlaps, (status, reason), words) in rows {
        let coverage = Coverage {
            overlaps,
            ..Default::default()
        };
        let condition = conflicted_condition(&coverage, Some(4), now);
        assert_eq!(condition.type_, "Conflicted", "{case}");
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            (status, reason),
            "{case}"
        );
        assert_eq!(condition.observed_generation, Some(4), "{case}");
        for word in words {
            assert!(
                condition.message.contains(word),
                "{case}: {}",
                condition.message
            );
        }
    }
}

#[test]
fn next_reconcile_follows_the_first_renewal() {
    let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(1000);
    let secs = |s: u64| Action::requeue(Duration::from_secs(s));
    // (case, reconciles in a row with a transient failure, first renewal, expected)
    let rows = vec![
        (
            "transient failure: soon",
            1,
            Some(now + time::Duration::hours(2)),
            secs(5),
        ),
        (
            "third transient failure in a row: backed off",
            3,
            Some(now + time::Duration::hours(2)),
            secs(20),
        ),
        (
            "renewal in ten minutes",
            0,
            Some(now + time::Duration::minutes(10)),
            secs(600),
        ),
        (
            "renewal overdue: a second",
            0,
            Some(now - time::Duration::minutes(10)),
            secs(1),
        ),
        (
            "renewal far off: an hour",
            0,
            Some(now + time::Duration::days(3)),
            secs(3600),
        ),
        ("nothing issued: an hour", 0, None, secs(3600)),
    ];
    for (case, streak, renew_at, expected) in rows {
        // Jitter 0.5 is the middle of the spread: no change.
        assert_eq!(
            next_reconcile(streak, 0.5, renew_at, now),
            expected,
            "{case}"
        );
    }
}

/// Transient failures are retried with exponential backoff, capped, jittered.
#[test]
fn transient_failures_back_off() {
    // (reconciles in a row with a transient failure, jitter, expected wait in milliseconds)
    let rows = [
        (1, 0.5, 5_000),
        (2, 0.5, 10_000),
        (3, 0.5, 20_000),
        (4, 0.5, 40_000),
        (5, 0.5, 80_000),
        (6, 0.5, 120_000),
        (50, 0.5, 120_000),
        (u32::MAX, 0.5, 120_000),
        (1, 0.0, 4_000),
        (1, 0.999_999, 6_000),
        (6, 0.0, 96_000),
        (6, 7.0, 144_000),
    ];
    for (streak, jitter, millis) in rows {
        let wait = transient_backoff(streak, jitter).as_millis();
        assert!(
            wait.abs_diff(millis) <= 1,
            "streak {streak}, jitter {jitter}: {wait} ms, expected {millis}"
        );
    }
}

/// The verdict "verified" comes from the status the controller wrote, for the serial it was
/// given for: an entry of another certificate, one written before the controller recorded how it
/// verified (when status took the verdict from the Secret's annotation), or one that says
/// not verified, leaves the certificate to be verified with STS.
#[test]
fn only_the_controllers_own_record_makes_a_certificate_verified() {
    use super::workload::{VERIFIED_WITH_STS, recorded_as_verified};

    let entry =
        |service_account: &str, verified: bool, with: Option<&str>, serial: &str| WorkloadStatus {
            service_account: service_account.into(),
            verified,
            verified_with: with.map(String::from),
            serial: Some(serial.into()),
            reason: "Issued".into(),
            ..Default::default()
        };
    let sts = Some(VERIFIED_WITH_STS);
    // (case, the status entries, verified for web's certificate "aa01")
    let rows: Vec<(&str, Vec<WorkloadStatus>, bool)> = vec![
        (
            "verified with STS, this certificate",
            vec![entry("web", true, sts, "aa01")],
            true,
        ),
        ("no status yet", vec![], false),
        (
            "verified with STS, an earlier certificate",
            vec![entry("web", true, sts, "ffff")],
            false,
        ),
        (
            "another ServiceAccount's entry",
            vec![entry("api", true, sts, "aa01")],
            false,
        ),
        (
            "verified: true without verifiedWith (read from the Secret's annotation once)",
            vec![entry("web", true, None, "aa01")],
            false,
        ),
        (
            "issued unverified",
            vec![entry("web", false, None, "aa01")],
            false,
        ),
        (
            "verifiedWith another value",
            vec![entry("web", true, Some("none"), "aa01")],
            false,
        ),
    ];
    for (case, workloads, verified) in rows {
        let mut policy = with_certificate(json!({}));
        policy.status = Some(rolemesh_crds::MTLSPolicyStatus {
            workloads,
            ..Default::default()
        });
        assert_eq!(
            recorded_as_verified(&policy, "web", "aa01"),
            verified,
            "{case}"
        );
    }
}

#[test]
fn the_status_gives_when_sts_last_confirmed_a_role() {
    use super::workload::{VERIFIED_WITH_STS, recorded_verification};

    let at = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("time");
    let entry = |verified_at: Option<time::OffsetDateTime>| WorkloadStatus {
        service_account: "web".into(),
        verified: true,
        verified_with: Some(VERIFIED_WITH_STS.into()),
        verified_at: verified_at.map(crate::status::to_time),
        serial: Some("aa01".into()),
        reason: "Issued".into(),
        ..Default::default()
    };
    let policy_with = |workloads: Vec<WorkloadStatus>| {
        let mut policy = with_certificate(json!({}));
        policy.status = Some(rolemesh_crds::MTLSPolicyStatus {
            workloads,
            ..Default::default()
        });
        policy
    };
    assert_eq!(
        recorded_verification(&policy_with(vec![entry(Some(at))]), "web", "aa01"),
        Some(at)
    );
    // Verified before the time was recorded: due again at once rather than never.
    assert_eq!(
        recorded_verification(&policy_with(vec![entry(None)]), "web", "aa01"),
        Some(time::OffsetDateTime::UNIX_EPOCH)
    );
    assert_eq!(
        recorded_verification(&policy_with(vec![entry(Some(at))]), "web", "ffff"),
        None
    );
}

/// The rules the controller writes for the proxies: the policy's key of the trust bundle and the
/// JSON the proxy parses; a policy whose rules the proxy would refuse gets a clear error instead.
#[test]
fn peer_rules_are_written_under_the_policy_key_as_the_proxy_reads_them() {
    let mut policy: MTLSPolicy = serde_json::from_value(json!({
        "apiVersion": "rolemesh.dev/v1alpha1", "kind": "MTLSPolicy",
        "metadata": { "name": "web", "namespace": "shop", "generation": 5 },
        "spec": {
            "serviceAccounts": { "names": ["web"] },
            "inbound": [{ "name": "http", "port": 8443, "appPort": 8080,
                          "allow": ["arn:aws:iam::111122223333:role/frontend"] }],
        },
    }))
    .expect("policy fixture");
    let (key, json) = peer_rules_of(&policy).expect("valid rules");
    assert_eq!(key, "policy.web.json");
    let rules =
        rolemesh_profile::proxy_config::PeerRules::from_json(&json).expect("proxy reads it");
    assert_eq!((rules.policy.as_str(), rules.generation), ("web", 5));
    assert_eq!(rules.allow("http").map(<[_]>::len), Some(1));

    policy.spec.inbound[0].allow = vec!["arn:aws:iam::*:role/frontend".into()];
    let error = peer_rules_of(&policy).unwrap_err();
    assert_eq!(error.reason(), Reason::InvalidPolicy);
    assert!(error.to_string().contains("account field"), "{error}");

    // Each policy's key has its own field manager, within the API server's 128 characters.
    let managers: std::collections::BTreeSet<_> = ["web", "api", &"p".repeat(241)]
        .into_iter()
        .map(rolemesh_crds::names::rules_field_manager)
        .collect();
    assert_eq!(managers.len(), 3);
    assert!(managers.iter().all(|m| m.len() <= 128));

    policy.metadata.name = Some("p".repeat(300));
    let error = peer_rules_of(&policy).unwrap_err().to_string();
    assert!(error.contains("too long"), "{error}");
}
