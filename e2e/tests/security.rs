//! Forged or borrowed identities, on the local control plane and the local AWS endpoint:
//! wildcard accounts refused by the API server, roles of accounts outside `allowedAccounts` given
//! nothing, an STS throttle during a rotation that keeps the Secret, foreign CAs planted in a
//! trust bundle dropped or undone, certificates issued without verification verified when it is
//! switched on, a role's removed trust noticed within the re-verify interval, and Secrets
//! rolemesh did not create left alone (docs/security-model.md names these tests).

use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Event, Secret};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use rolemesh_crds::{MTLSAuthority, MTLSPolicy};
use rolemesh_e2e::*;
use rolemesh_profile::inspect::{certificates_from_pem, sha256_hex};
use rolemesh_testkit::{eventually, in_namespace};
use serde_json::json;

/// Each refused object, the field its refusal must name, and words from the message.
const REFUSED: &[(&str, &str, &str, &str)] = &[
    (
        "wildcard account in allow",
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata: {name: any-account}
spec:
  serviceAccounts: {names: [a]}
  inbound:
    - {name: http, port: 8443, appPort: 8080, allow: ["arn:aws:iam::*:role/frontend"]}
"#,
        "spec.inbound[0].allow[0]",
        "the partition and account fields of an IAM role pattern must be written out",
    ),
    (
        "wildcard account in expect",
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata: {name: any-account-out}
spec:
  serviceAccounts: {names: [a]}
  outbound:
    - {name: db, localPort: 9000, upstream: "db:5432", expect: ["arn:aws:iam::11112222333*:role/db"]}
"#,
        "spec.outbound[0].expect[0]",
        "the partition and account fields of an IAM role pattern must be written out",
    ),
    (
        "wildcard partition",
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata: {name: any-partition}
spec:
  serviceAccounts: {names: [a]}
  inbound:
    - {name: http, port: 8443, appPort: 8080, allow: ["arn:aws*:iam::111122223333:role/frontend"]}
"#,
        "spec.inbound[0].allow[0]",
        "partition and account fields",
    ),
    (
        "account that is not 12 digits",
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSAuthority
metadata: {name: short-account}
spec:
  trustDomain: rolemesh.local
  signer: {type: local, local: {secretName: k}}
  allowedAccounts: ["1111"]
"#,
        "spec.allowedAccounts[0]",
        "12-digit AWS account ID",
    ),
    (
        "empty allowedAccounts",
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSAuthority
metadata: {name: no-account}
spec:
  trustDomain: rolemesh.local
  signer: {type: local, local: {secretName: k}}
  allowedAccounts: []
"#,
        "spec.allowedAccounts",
        "leave the field out",
    ),
];

#[tokio::test]
async fn api_server_refuses_wildcard_accounts_naming_the_field() -> Result<()> {
    let env = control_plane().await?;
    let explained = env.explain("mtlsauthority.spec.allowedAccounts").await?;
    ensure!(
        explained.contains("OIDC issuer is public") && explained.contains("AccountNotAllowed"),
        "explain allowedAccounts:\n{explained}"
    );
    in_namespace("sec-refuse", |ns| async move {
        for (what, manifest, field, words) in REFUSED {
            let out = ns.env.kubectl_apply(&ns.name, manifest)?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            ensure!(!out.status.success(), "{what}: accepted, must be refused");
            ensure!(
                stderr.contains(field),
                "{what}: refusal does not name {field}:\n{stderr}"
            );
            ensure!(
                stderr.contains(words),
                "{what}: refusal lacks {words:?}:\n{stderr}"
            );
        }
        // Wildcards in the role's path and name stay allowed.
        let out = ns.env.kubectl_apply(
            &ns.name,
            r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata: {name: role-wildcards}
spec:
  serviceAccounts: {names: [a]}
  inbound:
    - {name: http, port: 8443, appPort: 8080, allow: ["arn:aws:iam::111122223333:role/prod/*", "arn:aws:iam::111122223333:role/*-web"]}
"#,
        )?;
        rolemesh_testkit::expect_success("kubectl", &["apply"], &out)?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_outside_allowed_accounts_gets_no_certificate() -> Result<()> {
    let mut spec = local_authority_spec("accounts.test", "sts");
    // Not the local AWS endpoint's account (123456789012), in which the roles are created.
    spec["allowedAccounts"] = json!(["111122223333"]);
    in_namespace_with_authority("sec-accounts", spec, |ns, authority| async move {
        // A role whose trust policy does trust the ServiceAccount: STS would confirm it.
        let role = ns
            .env
            .create_irsa_role(&unique("elsewhere"), &ns.name, "web")
            .await?;
        let account = role.split(':').nth(4).unwrap_or_default().to_string();
        apply_service_account(&ns, "web", Some(&role)).await?;
        apply_policy(&ns, "p", json!({ "serviceAccounts": { "names": ["web"] } })).await?;
        let controller = ControllerProcess::start(&ns, &authority, "replica-a", &[])?;

        let refused =
            wait_for_workload(&ns, "p", "web", |w| w.reason == "AccountNotAllowed").await?;
        let message = refused.message.unwrap_or_default();
        ensure!(
            message.contains(&account) && message.contains("allowedAccounts"),
            "{message}"
        );
        ensure!(!refused.verified && refused.serial.is_none());
        let secrets: Api<Secret> = ns.api();
        ensure!(
            secrets.get_opt("web-rolemesh-tls").await?.is_none(),
            "a role outside allowedAccounts must get no Secret"
        );
        let authorities: Api<MTLSAuthority> = Api::all(ns.client.clone());
        let restricted = authorities
            .get(&authority)
            .await?
            .status
            .unwrap_or_default()
            .conditions
            .into_iter()
            .find(|c| c.type_ == "AccountsRestricted");
        ensure!(
            restricted
                .as_ref()
                .is_some_and(|c| c.status == "True" && c.message.contains("111122223333")),
            "{restricted:?}"
        );
        // No Sign call was spent on it: the only one is the CA's.
        let signs = controller
            .metric("rolemesh_signer_sign_calls_total{signer=\"local\"}")
            .await?;
        ensure!(
            signs <= 1.0,
            "expected at most the CA's Sign call, saw {signs}"
        );

        // The account is allowed: the same ServiceAccount is verified and issued.
        let patch = json!({ "spec": { "allowedAccounts": ["111122223333", account] } });
        authorities
            .patch(&authority, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        wait_for_workload(&ns, "p", "web", |w| w.reason == "Issued" && w.verified).await?;
        wait_for_secret(&ns, "web-rolemesh-tls", None).await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_throttling_during_a_rotation_keeps_the_secret() -> Result<()> {
    in_namespace_with_authority(
        "sec-throttle",
        local_authority_spec("throttle.test", "sts"),
        |ns, authority| async move {
            let role = ns
                .env
                .create_irsa_role(&unique("orders"), &ns.name, "orders")
                .await?;
            apply_service_account(&ns, "orders", Some(&role)).await?;
            apply_policy(
                &ns,
                "p",
                json!({ "serviceAccounts": { "names": ["orders"] } }),
            )
            .await?;
            // STS (only STS) goes through a forwarder that can throttle.
            let sts = FaultyEndpoint::start(ns.env.aws_endpoint(), Throttled::Sts).await?;
            let _controller = ControllerProcess::start_with_env(
                &ns,
                &authority,
                "replica-a",
                &[],
                &[("AWS_ENDPOINT_URL_STS", &sts.url)],
            )?;
            let (_, info) = wait_for_secret(&ns, "orders-rolemesh-tls", None).await?;
            wait_for_workload(&ns, "p", "orders", |w| w.reason == "Issued" && w.verified).await?;

            // STS throttles while a rotation is requested: a transient reason in status, the
            // Secret unchanged and still reported.
            sts.set_throttling(true);
            let policies: Api<MTLSPolicy> = ns.api();
            annotate(&policies, "p", "rolemesh.dev/rotate", "during-throttling").await?;
            let throttled =
                wait_for_workload(&ns, "p", "orders", |w| w.reason == "StsUnavailable").await?;
            let message = throttled.message.clone().unwrap_or_default();
            ensure!(
                message.contains("Throttling") && message.contains("kept"),
                "{message}"
            );
            ensure!(
                throttled.serial.as_deref() == Some(info.serial_hex.as_str()),
                "the kept certificate is still reported: {throttled:?}"
            );
            let secrets: Api<Secret> = ns.api();
            // Over several backed-off retries (5 s, 10 s, ...) the Secret is neither deleted
            // nor rewritten.
            tokio::time::sleep(Duration::from_secs(20)).await;
            let kept = secrets.get_opt("orders-rolemesh-tls").await?;
            ensure!(
                kept.as_ref()
                    .map(leaf_of)
                    .transpose()?
                    .is_some_and(|leaf| leaf.serial_hex == info.serial_hex),
                "the Secret must be kept as it was during the throttling"
            );

            // The throttle clears: the rotation goes through by itself.
            sts.set_throttling(false);
            wait_for_secret(&ns, "orders-rolemesh-tls", Some(&info.serial_hex)).await?;
            wait_for_workload(&ns, "p", "orders", |w| w.reason == "Issued" && w.verified).await?;
            Ok(())
        },
    )
    .await
}

/// A self-signed CA nobody at rolemesh made, as PEM, and its SHA-256 fingerprint.
fn foreign_ca() -> Result<(String, String)> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "planted");
    let cert = params.self_signed(&rcgen::KeyPair::generate()?)?;
    Ok((cert.pem(), sha256_hex(cert.der())))
}

fn fingerprints(pem: &str) -> Result<Vec<String>> {
    Ok(certificates_from_pem(pem)?
        .iter()
        .map(|der| sha256_hex(der))
        .collect())
}

fn data_of(configmap: Option<ConfigMap>, key: &str) -> Option<String> {
    configmap
        .and_then(|cm| cm.data)
        .and_then(|d| d.get(key).cloned())
}

/// Where a trust bundle is published, and what each place holds now (empty when absent).
async fn published_bundles(
    ns: &rolemesh_testkit::TestNamespace,
    authority: &str,
) -> Result<Vec<(&'static str, String)>> {
    let configmaps: Api<ConfigMap> = ns.api();
    let authorities: Api<MTLSAuthority> = Api::all(ns.client.clone());
    Ok(vec![
        (
            "rolemesh-ca bundle.crt",
            data_of(configmaps.get_opt("rolemesh-ca").await?, "bundle.crt").unwrap_or_default(),
        ),
        (
            "the tenant's rolemesh-trust-bundle",
            data_of(configmaps.get_opt("rolemesh-trust-bundle").await?, "ca.crt")
                .unwrap_or_default(),
        ),
        (
            "the authority's status.trustBundle",
            authorities
                .get(authority)
                .await?
                .status
                .and_then(|s| s.trust_bundle)
                .unwrap_or_default(),
        ),
    ])
}

/// Waits until every place a bundle is published holds exactly the certificates `want`.
async fn wait_for_bundles(
    ns: &rolemesh_testkit::TestNamespace,
    authority: &str,
    want: &[String],
    timeout: Duration,
) -> Result<()> {
    let outcome = eventually("every bundle holding our CAs only", timeout, || async {
        let mut all = true;
        for (_, pem) in published_bundles(ns, authority).await? {
            all &= fingerprints(&pem).is_ok_and(|found| found == want);
        }
        Ok(all.then_some(()))
    })
    .await;
    if outcome.is_err() {
        let now: Vec<(&str, Vec<String>)> = published_bundles(ns, authority)
            .await?
            .into_iter()
            .map(|(what, pem)| (what, fingerprints(&pem).unwrap_or_default()))
            .collect();
        anyhow::bail!("want exactly {want:?} everywhere, found {now:?}");
    }
    Ok(())
}

/// A write to ConfigMap rolemesh-ca (rolemesh's namespace) adds no trust anchor: the planted CA
/// is in no bundle after the controller's next pass, the ConfigMap is rewritten without it, and
/// an Event on the authority names its fingerprint. A tenant's edit of its own
/// rolemesh-trust-bundle is undone within the repair interval (60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_cas_planted_in_trust_bundles_are_dropped_and_undone() -> Result<()> {
    in_namespace_with_authority(
        "sec-bundle",
        local_authority_spec("bundle.test", "none"),
        |ns, authority| async move {
            apply_service_account(&ns, "web", Some("arn:aws:iam::111122223333:role/web")).await?;
            apply_policy(&ns, "p", json!({ "serviceAccounts": { "names": ["web"] } })).await?;
            let mut first = ControllerProcess::start(&ns, &authority, "replica-a", &[])?;
            let authorities: Api<MTLSAuthority> = Api::all(ns.client.clone());
            let recorded = eventually("the authority's status.trustBundle", WAIT, || async {
                Ok(authorities
                    .get(&authority)
                    .await?
                    .status
                    .and_then(|s| s.trust_bundle))
            })
            .await?;
            let ours = fingerprints(&recorded)?;
            // Another rolemesh installed in the cluster may also write the tenant's bundle
            // first; ours is restored within the repair interval.
            wait_for_bundles(&ns, &authority, &ours, Duration::from_secs(90)).await?;

            // Planted in rolemesh-ca while the controller is down; it starts again (its next pass).
            first.kill();
            let (planted, planted_fingerprint) = foreign_ca()?;
            let configmaps: Api<ConfigMap> = ns.api();
            let mut ca = configmaps.get("rolemesh-ca").await?;
            let stored = data_of(Some(ca.clone()), "bundle.crt").unwrap_or_default();
            ca.data
                .get_or_insert_default()
                .insert("bundle.crt".into(), format!("{stored}{planted}"));
            configmaps
                .replace("rolemesh-ca", &PostParams::default(), &ca)
                .await?;
            let controller = ControllerProcess::start(&ns, &authority, "replica-b", &[])?;

            // What the next pass publishes, everywhere: the CAs published before, nothing else.
            wait_for_bundles(&ns, &authority, &ours, WAIT).await?;
            let events: Api<Event> = Api::all(ns.client.clone());
            eventually("an Event naming the planted CA", WAIT, || async {
                let list = events
                    .list(
                        &ListParams::default().fields(&format!("involvedObject.name={authority}")),
                    )
                    .await?;
                Ok(list
                    .items
                    .iter()
                    .any(|e| {
                        e.reason.as_deref() == Some("ForeignCertificateRefused")
                            && e.message
                                .as_deref()
                                .is_some_and(|m| m.contains(&planted_fingerprint))
                    })
                    .then_some(()))
            })
            .await?;
            ensure!(
                controller.log().contains(&planted_fingerprint),
                "the controller logs the refused fingerprint"
            );

            // A tenant adds its own CA to its namespace's copy: undone within the repair bound.
            let bundle = trust_bundle(&ns).await?;
            let edited = json!({ "data": { "ca.crt": format!("{bundle}{planted}") } });
            ns.env.kubectl(&[
                "patch",
                "configmap",
                "rolemesh-trust-bundle",
                "-n",
                &ns.name,
                "--type=merge",
                "-p",
                &edited.to_string(),
            ])?;
            ensure!(
                data_of(configmaps.get_opt("rolemesh-trust-bundle").await?, "ca.crt")
                    .is_some_and(|pem| pem.contains(planted.trim())),
                "the edit took"
            );
            let started = std::time::Instant::now();
            wait_for_bundles(&ns, &authority, &ours, Duration::from_secs(90)).await?;
            ensure!(
                started.elapsed() <= Duration::from_secs(75),
                "restored after {:?}, beyond the 60 s repair interval",
                started.elapsed()
            );
            let repaired = controller
                .metric("rolemesh_trust_bundles_repaired_total")
                .await?;
            ensure!(repaired >= 1.0, "repairs counted: {repaired}");
            Ok(())
        },
    )
    .await
}

/// A certificate issued under `identityVerification: none` is verified with STS once the
/// authority switches to `sts`: the one whose role does not trust its ServiceAccount loses its
/// Secret, the other is reported verified without a new Sign. Whatever the Secret's annotation
/// says, status takes its verdict only from what the controller verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_verification_on_re_verifies_certificates_issued_without_it() -> Result<()> {
    in_namespace_with_authority(
        "sec-switch",
        local_authority_spec("switch.test", "none"),
        |ns, authority| async move {
            let trusted = ns
                .env
                .create_irsa_role(&unique("trusted"), &ns.name, "trusted")
                .await?;
            // A role the ServiceAccount merely claims: its trust policy trusts someone else.
            let claimed = ns
                .env
                .create_irsa_role(&unique("claimed"), &ns.name, "someone-else")
                .await?;
            apply_service_account(&ns, "trusted", Some(&trusted)).await?;
            apply_service_account(&ns, "claimer", Some(&claimed)).await?;
            apply_policy(
                &ns,
                "p",
                json!({ "serviceAccounts": { "names": ["trusted", "claimer"] } }),
            )
            .await?;
            let controller = ControllerProcess::start(&ns, &authority, "replica-a", &[])?;
            let (_, trusted_info) = wait_for_secret(&ns, "trusted-rolemesh-tls", None).await?;
            wait_for_secret(&ns, "claimer-rolemesh-tls", None).await?;
            for sa in ["trusted", "claimer"] {
                wait_for_workload(&ns, "p", sa, |w| {
                    w.reason == "IssuedUnverified" && !w.verified && w.serial.is_some()
                })
                .await?;
            }

            // Whoever can edit Secrets in the namespace writes the annotation that once made
            // status say verified.
            let secrets: Api<Secret> = ns.api();
            annotate(
                &secrets,
                "claimer-rolemesh-tls",
                "rolemesh.dev/verification",
                "sts",
            )
            .await?;
            tokio::time::sleep(Duration::from_secs(5)).await;
            let entry = wait_for_workload(&ns, "p", "claimer", |_| true).await?;
            ensure!(
                !entry.verified && entry.verified_with.is_none(),
                "a Secret annotation must not make status say verified: {entry:?}"
            );

            let authorities: Api<MTLSAuthority> = Api::all(ns.client.clone());
            let patch = json!({ "spec": { "identityVerification": "sts" } });
            authorities
                .patch(&authority, &PatchParams::default(), &Patch::Merge(patch))
                .await?;

            let refused =
                wait_for_workload(&ns, "p", "claimer", |w| w.reason == "StsRefused").await?;
            ensure!(!refused.verified && refused.serial.is_none(), "{refused:?}");
            eventually(
                "the unverifiable certificate's Secret to go",
                WAIT,
                || async {
                    Ok(secrets
                        .get_opt("claimer-rolemesh-tls")
                        .await?
                        .is_none()
                        .then_some(()))
                },
            )
            .await?;
            let verified =
                wait_for_workload(&ns, "p", "trusted", |w| w.reason == "Issued" && w.verified)
                    .await?;
            ensure!(
                verified.verified_with.as_deref() == Some("sts")
                    && verified.serial.as_deref() == Some(trusted_info.serial_hex.as_str()),
                "verified in place, not re-issued: {verified:?}"
            );
            let kept = secrets.get("trusted-rolemesh-tls").await?;
            ensure!(leaf_of(&kept)?.serial_hex == trusted_info.serial_hex);

            // The CA's Sign and the two issuances under `none`: verifying cost no Sign.
            let signs = controller
                .metric("rolemesh_signer_sign_calls_total{signer=\"local\"}")
                .await?;
            ensure!(signs <= 3.0, "expected 3 Sign calls at most, saw {signs}");
            let confirmed = controller
                .metric("rolemesh_sts_verifications_total{result=\"verified\"}")
                .await?;
            ensure!(
                confirmed == 1.0,
                "one STS confirmation, for trusted: {confirmed}"
            );
            Ok(())
        },
    )
    .await
}

/// A role whose trust policy stops trusting its ServiceAccount costs the workload its Secret
/// within `reverifyInterval` (plus its 10% spread and a reconcile), not at the next renewal;
/// a workload whose role still trusts it is re-verified in place: new `verifiedAt`, same
/// certificate, no Sign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_trust_ends_the_identity_within_the_reverify_interval() -> Result<()> {
    let mut spec = local_authority_spec("reverify.test", "sts");
    spec["reverifyInterval"] = json!("1m");
    in_namespace_with_authority("sec-reverify", spec, |ns, authority| async move {
        let kept_role = unique("kept");
        let dropped_role = unique("dropped");
        let kept = ns.env.create_irsa_role(&kept_role, &ns.name, "kept").await?;
        let dropped = ns
            .env
            .create_irsa_role(&dropped_role, &ns.name, "dropped")
            .await?;
        apply_service_account(&ns, "kept", Some(&kept)).await?;
        apply_service_account(&ns, "dropped", Some(&dropped)).await?;
        apply_policy(
            &ns,
            "p",
            json!({ "serviceAccounts": { "names": ["kept", "dropped"] } }),
        )
        .await?;
        let controller = ControllerProcess::start(&ns, &authority, "replica-a", &[])?;
        let (_, kept_info) = wait_for_secret(&ns, "kept-rolemesh-tls", None).await?;
        wait_for_secret(&ns, "dropped-rolemesh-tls", None).await?;
        let first = wait_for_workload(&ns, "p", "kept", |w| {
            w.reason == "Issued" && w.verified && w.verified_at.is_some()
        })
        .await?;
        wait_for_workload(&ns, "p", "dropped", |w| w.reason == "Issued" && w.verified).await?;
        let signs_after_issuance = controller
            .metric("rolemesh_signer_sign_calls_total{signer=\"local\"}")
            .await?;

        // The annotation stays; the role's trust goes.
        ns.env
            .set_irsa_trust(&dropped_role, &ns.name, "someone-else")
            .await?;
        let secrets: Api<Secret> = ns.api();
        // 1m + 10% spread, plus a reconcile and the watch.
        let bound = Duration::from_secs(66 + 30);
        eventually("the Secret of the untrusted workload to go", bound, || async {
            Ok(secrets
                .get_opt("dropped-rolemesh-tls")
                .await?
                .is_none()
                .then_some(()))
        })
        .await?;
        let refused = wait_for_workload(&ns, "p", "dropped", |w| w.reason == "StsRefused").await?;
        ensure!(!refused.verified && refused.serial.is_none(), "{refused:?}");

        let again = wait_for_workload(&ns, "p", "kept", |w| {
            w.verified && w.verified_at.as_ref().map(|t| t.0) > first.verified_at.as_ref().map(|t| t.0)
        })
        .await?;
        ensure!(
            again.serial.as_deref() == Some(kept_info.serial_hex.as_str()),
            "re-verified in place, not re-issued: {again:?}"
        );
        let secret = secrets.get("kept-rolemesh-tls").await?;
        ensure!(leaf_of(&secret)?.serial_hex == kept_info.serial_hex);
        let signs = controller
            .metric("rolemesh_signer_sign_calls_total{signer=\"local\"}")
            .await?;
        ensure!(
            signs == signs_after_issuance,
            "re-verification must not sign: {signs_after_issuance} Sign calls after issuance, {signs} now"
        );
        let confirmed = controller
            .metric("rolemesh_sts_verifications_total{result=\"verified\"}")
            .await?;
        ensure!(
            confirmed >= 3.0,
            "two issuances and at least one re-verification confirmed by STS: {confirmed}"
        );
        Ok(())
    })
    .await
}

/// A Secret that rolemesh did not create with a workload Secret's name is never written, and
/// costs no token, STS call or Sign: an Opaque one (which a write could never change into a TLS
/// Secret), a TLS one of the tenant's own, and one that copies rolemesh's labels. The status
/// says which Secret is in the way and what to do; once it is gone the certificate is issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_rolemesh_did_not_create_is_left_alone() -> Result<()> {
    in_namespace_with_authority(
        "sec-taken",
        local_authority_spec("taken.test", "sts"),
        |ns, authority| async move {
            let names = ["web", "opaque", "tenant-tls", "forged"];
            for name in names {
                let role = ns
                    .env
                    .create_irsa_role(&unique(name), &ns.name, name)
                    .await?;
                apply_service_account(&ns, name, Some(&role)).await?;
            }
            let tenant = rcgen::generate_simple_self_signed(vec!["tenant.example".to_string()])?;
            let (cert_pem, key_pem) = (tenant.cert.pem(), tenant.signing_key.serialize_pem());
            let foreign: Vec<serde_json::Value> = vec![
                json!({
                    "metadata": { "name": "opaque-rolemesh-tls" },
                    "type": "Opaque",
                    "stringData": { "password": "the tenant's" },
                }),
                json!({
                    "metadata": { "name": "tenant-tls-rolemesh-tls" },
                    "type": "kubernetes.io/tls",
                    "stringData": { "tls.crt": cert_pem, "tls.key": key_pem },
                }),
                json!({
                    "metadata": {
                        "name": "forged-rolemesh-tls",
                        "labels": {
                            "app.kubernetes.io/managed-by": "rolemesh",
                            "rolemesh.dev/policy": "p",
                            "rolemesh.dev/service-account": "forged",
                        },
                    },
                    "type": "kubernetes.io/tls",
                    "stringData": { "tls.crt": cert_pem, "tls.key": key_pem },
                }),
            ];
            let secrets: Api<Secret> = ns.api();
            let mut created = Vec::new();
            for body in foreign {
                let secret: Secret = serde_json::from_value(body)?;
                created.push(secrets.create(&PostParams::default(), &secret).await?);
            }
            apply_policy(&ns, "p", json!({ "serviceAccounts": { "names": names } })).await?;
            let controller = ControllerProcess::start(&ns, &authority, "replica-a", &[])?;

            wait_for_workload(&ns, "p", "web", |w| w.reason == "Issued" && w.verified).await?;
            for secret in &created {
                let name = secret.metadata.name.clone().unwrap_or_default();
                let sa = name.trim_end_matches("-rolemesh-tls");
                let entry =
                    wait_for_workload(&ns, "p", sa, |w| w.reason == "SecretNameTaken").await?;
                let message = entry.message.unwrap_or_default();
                ensure!(
                    message.contains(&format!("{}/{name}", ns.name))
                        && message.contains("Rename or delete"),
                    "{message}"
                );
                ensure!(!entry.verified && entry.serial.is_none());
            }
            // Longer than several retries of a transient failure (5 s, 10 s): nothing is tried.
            tokio::time::sleep(Duration::from_secs(20)).await;
            for before in &created {
                let name = before.metadata.name.clone().unwrap_or_default();
                let now = secrets.get(&name).await?;
                ensure!(
                    now.metadata.resource_version == before.metadata.resource_version
                        && now.data == before.data
                        && now.metadata.owner_references.is_none(),
                    "{name} must be left as the tenant wrote it: {:?}",
                    now.metadata
                );
            }
            let signs = controller
                .metric("rolemesh_signer_sign_calls_total{signer=\"local\"}")
                .await?;
            ensure!(
                signs <= 2.0,
                "expected the CA's and web's Sign calls only, saw {signs}"
            );
            let verifications = controller
                .metric("rolemesh_sts_verifications_total{result=\"verified\"}")
                .await?;
            ensure!(
                verifications == 1.0,
                "STS asked for web only, saw {verifications}"
            );

            // Once the name is free the certificate is issued, though nothing rolemesh watches
            // changed.
            secrets
                .delete("opaque-rolemesh-tls", &DeleteParams::default())
                .await?;
            eventually(
                "a certificate once the name is free",
                Duration::from_secs(100),
                || async {
                    let secret = secrets.get_opt("opaque-rolemesh-tls").await?;
                    Ok(secret.filter(|s| s.type_.as_deref() == Some("kubernetes.io/tls")))
                },
            )
            .await?;
            wait_for_workload(&ns, "p", "opaque", |w| w.reason == "Issued" && w.verified).await?;
            Ok(())
        },
    )
    .await
}
