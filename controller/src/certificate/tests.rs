//! [`assess`] as a table, the way cert-manager tests its reissue policy chain: each row a Secret
//! (made by our own issuance code, then altered), the rotation requests and the time, and the
//! decision expected.
#![allow(
    clippy::type_complexity,
    reason = "a table row is a tuple with one column per input and the expected result"
)]

use std::{sync::Arc, time::Duration};

use k8s_openapi::ByteString;
use rcgen::KeyPair;
use rolemesh_crds::IdentityVerification;
use rolemesh_profile::{
    CertificateProfile, SpiffeId, WorkloadIdentity,
    profile::{ca_params, generate_workload_key},
};
use time::OffsetDateTime;

use super::*;
use crate::{ca::CaState, metrics::Metrics, signer::LocalSigner};

const ROLE: &str = "arn:aws:iam::111122223333:role/web";

fn test_ca(trust_domain: &str) -> CaState {
    let key = generate_workload_key().expect("CA key");
    let cert = ca_params(
        trust_domain,
        Duration::from_secs(365 * 24 * 3600),
        OffsetDateTime::now_utc(),
    )
    .self_signed(&key)
    .expect("CA certificate");
    let signer = LocalSigner::from_pem(&key.serialize_pem(), "test key".into(), Metrics::new())
        .expect("signer");
    let ca_der = cert.der().to_vec();
    let pem = crate::ca::pem_of(&ca_der);
    CaState {
        signer: Arc::new(signer),
        fingerprint: "test".into(),
        not_after: OffsetDateTime::now_utc() + time::Duration::days(365),
        ca_der,
        chain_pem: pem.clone(),
        bundle_pem: pem,
        trust_domain: trust_domain.into(),
        verification: IdentityVerification::Sts,
        allowed_accounts: None,
        reverify_interval: crate::reverify::DEFAULT_REVERIFY_INTERVAL,
        generation: Some(1),
        refused: Vec::new(),
        cas: Vec::new(),
        last_rotate_request: None,
        last_prepare_request: None,
        next_look: crate::ca::CA_RECHECK,
        revoked: Default::default(),
        blocked: Default::default(),
        ignored: Vec::new(),
    }
}

fn identity(service_account: &str, role: &str) -> WorkloadIdentity {
    let id = SpiffeId::new("mesh.test", "shop", service_account).expect("SPIFFE ID");
    WorkloadIdentity::new(id, role).expect("identity")
}

async fn secret(
    ca: &CaState,
    identity: &WorkloadIdentity,
    profile: &CertificateProfile,
    rotation: &RotationRequests,
) -> Secret {
    let issued = issue_certificate(ca, identity, &[], profile)
        .await
        .expect("issue");
    let context = SecretContext {
        namespace: "shop",
        service_account: "web",
        policy_name: "web",
        owner: OwnerReference::default(),
        rotation,
        verification: ca.verification,
    };
    workload_secret(&context, &issued.chain_pem, &issued.key_pem, &ca.bundle_pem)
}

fn set(secret: &mut Secret, key: &str, value: Option<&str>) {
    let data = secret.data.get_or_insert_with(Default::default);
    match value {
        Some(v) => data.insert(key.to_string(), ByteString(v.as_bytes().to_vec())),
        None => data.remove(key),
    };
}

/// The decision, reduced to what the table compares.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Nothing,
    RefreshBundle,
    Issue(IssueReason),
}

fn decision(need: Need) -> Decision {
    match need {
        Need::Nothing(_) => Decision::Nothing,
        Need::RefreshBundle(_) => Decision::RefreshBundle,
        Need::Issue { reason, .. } => Decision::Issue(reason),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn assess_decides_what_a_secret_needs() {
    let ca = test_ca("mesh.test");
    let other_ca = test_ca("mesh.test");
    let web = identity("web", ROLE);
    let profile = CertificateProfile::default();
    let none = RotationRequests::default();
    let good = secret(&ca, &web, &profile, &none).await;
    let now = OffsetDateTime::now_utc();

    let stale_bundle = {
        let mut s = good.clone();
        set(&mut s, CA_CERT_KEY, Some("an older bundle"));
        s
    };
    let no_key = {
        let mut s = good.clone();
        set(&mut s, TLS_PRIVATE_KEY_KEY, None);
        s
    };
    let foreign_key = {
        let mut s = good.clone();
        let key = KeyPair::generate().expect("key").serialize_pem();
        set(&mut s, TLS_PRIVATE_KEY_KEY, Some(&key));
        s
    };
    let not_pem = {
        let mut s = good.clone();
        set(&mut s, TLS_CERT_KEY, Some("not a certificate"));
        s
    };
    let other_signer = secret(&other_ca, &web, &profile, &none).await;
    let other_role = secret(
        &ca,
        &identity("web", "arn:aws:iam::111122223333:role/db"),
        &profile,
        &none,
    )
    .await;
    let policy_rotation = RotationRequests {
        policy: Some("2026-01-01".into()),
        service_account: None,
    };
    let sa_rotation = RotationRequests {
        policy: None,
        service_account: Some("now".into()),
    };
    let rotated = secret(&ca, &web, &profile, &policy_rotation).await;
    let short = CertificateProfile {
        duration: Duration::from_secs(3600),
        renew_before: None,
    };
    let due = now + time::Duration::hours(20);
    let long_before_due = now + time::Duration::hours(1);

    // (case, Secret, profile, rotation requests, now, expected decision)
    let rows: Vec<(
        &str,
        Option<&Secret>,
        &CertificateProfile,
        &RotationRequests,
        OffsetDateTime,
        Decision,
    )> = vec![
        (
            "no Secret",
            None,
            &profile,
            &none,
            now,
            Decision::Issue(IssueReason::New),
        ),
        ("good", Some(&good), &profile, &none, now, Decision::Nothing),
        (
            "good, an hour on",
            Some(&good),
            &profile,
            &none,
            long_before_due,
            Decision::Nothing,
        ),
        (
            "stale ca.crt",
            Some(&stale_bundle),
            &profile,
            &none,
            now,
            Decision::RefreshBundle,
        ),
        (
            "tls.key missing",
            Some(&no_key),
            &profile,
            &none,
            now,
            Decision::Issue(IssueReason::Repair),
        ),
        (
            "tls.key of another certificate",
            Some(&foreign_key),
            &profile,
            &none,
            now,
            Decision::Issue(IssueReason::Repair),
        ),
        (
            "tls.crt not PEM",
            Some(&not_pem),
            &profile,
            &none,
            now,
            Decision::Issue(IssueReason::Repair),
        ),
        (
            "signed by another CA",
            Some(&other_signer),
            &profile,
            &none,
            now,
            Decision::Issue(IssueReason::Repair),
        ),
        (
            "names another role",
            Some(&other_role),
            &profile,
            &none,
            now,
            Decision::Issue(IssueReason::IdentityChange),
        ),
        (
            "policy asks to rotate",
            Some(&good),
            &profile,
            &policy_rotation,
            now,
            Decision::Issue(IssueReason::Rotation),
        ),
        (
            "ServiceAccount asks to rotate",
            Some(&good),
            &profile,
            &sa_rotation,
            now,
            Decision::Issue(IssueReason::Rotation),
        ),
        (
            "rotation already done",
            Some(&rotated),
            &profile,
            &policy_rotation,
            now,
            Decision::Nothing,
        ),
        (
            "rotation request withdrawn",
            Some(&rotated),
            &profile,
            &none,
            now,
            Decision::Issue(IssueReason::Rotation),
        ),
        (
            "policy duration changed",
            Some(&good),
            &short,
            &none,
            now,
            Decision::Issue(IssueReason::Renewal),
        ),
        (
            "due for renewal",
            Some(&good),
            &profile,
            &none,
            due,
            Decision::Issue(IssueReason::Renewal),
        ),
        // Identity is checked before everything that follows it: a wrong identity is re-issued
        // as such even when a rotation is also pending.
        (
            "wrong role and rotation",
            Some(&other_role),
            &profile,
            &policy_rotation,
            now,
            Decision::Issue(IssueReason::IdentityChange),
        ),
    ];
    for (case, secret, profile, rotation, at, expected) in rows {
        let need = assess(secret, &ca, &web, &[], profile, rotation, at);
        assert_eq!(decision(need), expected, "{case}");
    }
}

#[test]
fn issue_reasons_are_the_metric_labels() {
    let labels: Vec<&str> = IssueReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        labels,
        [
            "new",
            "identity-change",
            "repair",
            "rotation",
            "renewal",
            "service-names",
            "ca-rotation",
            "revocation"
        ]
    );
}

/// A certificate names the Services that select its workload: a change of them re-issues it, and
/// one issued with them is good as it is.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_of_service_names_reissues() {
    let ca = test_ca("mesh.test");
    let web = identity("web", ROLE);
    let profile = CertificateProfile::default();
    let none = RotationRequests::default();
    let now = OffsetDateTime::now_utc();
    let names: Vec<String> = [
        "web",
        "web.shop",
        "web.shop.svc",
        "web.shop.svc.cluster.local",
    ]
    .map(String::from)
    .to_vec();
    let without = secret(&ca, &web, &profile, &none).await;
    assert!(matches!(
        assess(Some(&without), &ca, &web, &names, &profile, &none, now),
        Need::Issue {
            reason: IssueReason::ServiceNames,
            ..
        }
    ));
    let issued = issue_certificate(&ca, &web, &names, &profile)
        .await
        .expect("issue");
    let info = rolemesh_profile::inspect_certificate(
        &rolemesh_profile::inspect::certificates_from_pem(&issued.chain_pem).expect("PEM")[0],
    )
    .expect("parse");
    let mut found = info.dns_names.clone();
    found.sort();
    assert_eq!(found, names);
    let context = SecretContext {
        namespace: "shop",
        service_account: "web",
        policy_name: "web",
        owner: OwnerReference::default(),
        rotation: &none,
        verification: ca.verification,
    };
    let with = workload_secret(&context, &issued.chain_pem, &issued.key_pem, &ca.bundle_pem);
    assert!(matches!(
        assess(Some(&with), &ca, &web, &names, &profile, &none, now),
        Need::Nothing(_)
    ));
    // A Service gone: the names go with it.
    assert!(matches!(
        assess(Some(&with), &ca, &web, &[], &profile, &none, now),
        Need::Issue {
            reason: IssueReason::ServiceNames,
            ..
        }
    ));
}

/// A transient verification failure (STS throttled during a renewal, say)
/// keeps the Secret and reports the certificate it holds while valid; a refusal deletes it.
#[tokio::test(flavor = "multi_thread")]
async fn a_transient_verification_failure_keeps_a_valid_certificate() {
    use crate::identity::{Refusal, sts_error_refusal};

    let ca = test_ca("mesh.test");
    let web = identity("web", ROLE);
    let profile = CertificateProfile::default();
    let none = RotationRequests::default();
    let good = secret(&ca, &web, &profile, &none).await;
    let serial = check_certificate(&good, &ca, &web, OffsetDateTime::now_utc())
        .expect("a valid certificate")
        .serial_hex;
    // Renewal is due: this is when verification runs and STS may throttle.
    let due = OffsetDateTime::now_utc() + time::Duration::hours(20);
    assert!(matches!(
        assess(Some(&good), &ca, &web, &[], &profile, &none, due),
        Need::Issue {
            reason: IssueReason::Renewal,
            ..
        }
    ));
    let expired = OffsetDateTime::now_utc() + time::Duration::hours(25);

    let throttled = sts_error_refusal(Some("Throttling"), Some("Rate exceeded"), 400);
    let idp_down = sts_error_refusal(Some("IDPCommunicationError"), None, 400);
    let internal = sts_error_refusal(Some("InternalFailure"), None, 500);
    let unreachable = Refusal::StsUnreachable("dispatch failure: timed out".into());
    let no_token = Refusal::TokenRequestFailed("the API server is restarting".into());
    let denied = sts_error_refusal(Some("AccessDenied"), Some("Not authorized"), 403);
    let bad_token = sts_error_refusal(Some("InvalidIdentityToken"), None, 400);
    let mismatch = Refusal::RoleMismatch {
        assumed: "arn:aws:sts::111122223333:assumed-role/db/s".into(),
    };
    let stranger = Refusal::AccountNotAllowed {
        account: "999988887777".into(),
    };

    for transient in [&throttled, &idp_down, &internal, &unreachable, &no_token] {
        match after_refusal(transient, Some(&good), &ca, &web, due) {
            AfterRefusal::Keep(Some(info)) => assert_eq!(info.serial_hex, serial, "{transient:?}"),
            other => panic!("{transient:?}: {other:?}, expected the certificate kept"),
        }
        // Kept even once it is no longer valid: the Secret is never deleted for a transient
        // failure, only no longer reported as a valid certificate.
        assert_eq!(
            after_refusal(transient, Some(&good), &ca, &web, expired),
            AfterRefusal::Keep(None),
            "{transient:?}"
        );
        assert_eq!(
            after_refusal(transient, None, &ca, &web, due),
            AfterRefusal::Keep(None),
            "{transient:?}"
        );
    }
    for refused in [&denied, &bad_token, &mismatch, &stranger] {
        assert_eq!(
            after_refusal(refused, Some(&good), &ca, &web, due),
            AfterRefusal::Delete,
            "{refused:?}"
        );
    }
}

/// Whose a Secret with a workload Secret's name is: only one rolemesh wrote for this policy
/// (its label and a controller owner reference to the policy's uid) may be written or deleted,
/// and one that cannot be written as a workload Secret is never tried.
#[tokio::test(flavor = "multi_thread")]
async fn only_a_secret_written_for_this_policy_is_ours() {
    const UID: &str = "0b8f3c52-policy-web";
    let ca = test_ca("mesh.test");
    let web = identity("web", ROLE);
    let owner = OwnerReference {
        api_version: "rolemesh.dev/v1alpha1".into(),
        kind: "MTLSPolicy".into(),
        name: "web".into(),
        uid: UID.into(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let issued = issue_certificate(&ca, &web, &[], &CertificateProfile::default())
        .await
        .expect("issue");
    let context = SecretContext {
        namespace: "shop",
        service_account: "web",
        policy_name: "web",
        owner: owner.clone(),
        rotation: &RotationRequests::default(),
        verification: ca.verification,
    };
    let ours = workload_secret(&context, &issued.chain_pem, &issued.key_pem, &ca.bundle_pem);
    let altered = |change: &dyn Fn(&mut Secret)| {
        let mut secret = ours.clone();
        change(&mut secret);
        secret
    };
    let foreign = |why: &str| SecretOwner::Foreign(why.into());

    // (case, the Secret, its owner for policy UID, deletable by policy UID)
    let rows: Vec<(&str, Secret, SecretOwner, bool)> = vec![
        (
            "written by rolemesh for this policy",
            ours.clone(),
            SecretOwner::ThisPolicy,
            true,
        ),
        (
            "written for another policy",
            altered(&|s| {
                s.metadata.owner_references = Some(vec![OwnerReference {
                    name: "other".into(),
                    uid: "uid-other".into(),
                    ..owner.clone()
                }])
            }),
            SecretOwner::OtherPolicy("other".into()),
            false,
        ),
        (
            "a tenant's copy with rolemesh's labels (policy label included) but no owner",
            altered(&|s| s.metadata.owner_references = None),
            foreign("it has no controller owner reference to an MTLSPolicy"),
            false,
        ),
        (
            "an owner reference to the policy that is not the controller",
            altered(&|s| {
                s.metadata.owner_references = Some(vec![OwnerReference {
                    controller: None,
                    ..owner.clone()
                }])
            }),
            foreign("it has no controller owner reference to an MTLSPolicy"),
            false,
        ),
        (
            "controlled by something that is not an MTLSPolicy, with the policy's uid",
            altered(&|s| {
                s.metadata.owner_references = Some(vec![OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "Deployment".into(),
                    ..owner.clone()
                }])
            }),
            foreign("it has no controller owner reference to an MTLSPolicy"),
            false,
        ),
        (
            "the owner reference without the managed-by label",
            altered(&|s| s.metadata.labels = None),
            foreign("it lacks the label app.kubernetes.io/managed-by=rolemesh"),
            false,
        ),
        (
            "a tenant's own Opaque Secret",
            altered(&|s| {
                s.metadata.labels = None;
                s.metadata.owner_references = None;
                s.type_ = Some("Opaque".into());
            }),
            foreign("it lacks the label app.kubernetes.io/managed-by=rolemesh"),
            false,
        ),
        (
            "ours in every marker but Opaque: a write could never succeed",
            altered(&|s| s.type_ = Some("Opaque".into())),
            foreign(
                "it is of type Opaque, not kubernetes.io/tls, and a Secret's type cannot be changed",
            ),
            true,
        ),
        (
            "ours but without a type (Opaque to the API server)",
            altered(&|s| s.type_ = None),
            foreign(
                "it is of type Opaque, not kubernetes.io/tls, and a Secret's type cannot be changed",
            ),
            true,
        ),
        (
            "ours but made immutable",
            altered(&|s| s.immutable = Some(true)),
            foreign("it is immutable"),
            true,
        ),
    ];
    for (case, secret, owner, deletable) in rows {
        assert_eq!(secret_owner(&secret, UID), owner, "{case}");
        assert_eq!(deletable_by(&secret, UID), deletable, "{case}: deletable");
    }
}
