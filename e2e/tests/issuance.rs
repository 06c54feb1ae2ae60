//! Issuance on the local control plane and the local AWS endpoint: the real controller binary,
//! real STS verification of IRSA tokens, real KMS signing, certificates checked by parsing and
//! by `openssl verify`.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Event, Secret, ServiceAccount};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use rolemesh_crds::MTLSPolicy;
use rolemesh_e2e::*;
use rolemesh_profile::{
    ROLE_ARN_OID_DOTTED,
    inspect::{TrustBundle, certificates_from_pem, trust_bundle_from_pem},
};
use rolemesh_testkit::{TestNamespace, eventually};
use serde_json::json;
use time::OffsetDateTime;

/// Every field of the certificate profile, for a Secret the controller wrote.
fn assert_profile(
    secret: &Secret,
    namespace: &str,
    service_account: &str,
    role: &str,
    trust_domain: &str,
) -> Result<()> {
    let info = leaf_of(secret)?;
    ensure!(
        info.uri_sans
            == vec![format!(
                "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
            )],
        "URI SANs {:?}",
        info.uri_sans
    );
    ensure!(
        info.role_arn.as_deref() == Some(role),
        "role extension {:?}",
        info.role_arn
    );
    ensure!(
        !info.role_extension_malformed,
        "role extension malformed or critical"
    );
    ensure!(
        info.eku_server_auth && info.eku_client_auth,
        "EKU must be serverAuth+clientAuth"
    );
    ensure!(
        info.key_usage_digital_signature && info.key_usage_critical,
        "KeyUsage digitalSignature, critical"
    );
    ensure!(!info.is_ca, "a workload certificate must not be a CA");
    ensure!(
        info.serial.len() == 16 && info.serial[0] & 0x80 == 0,
        "serial must be a positive 128-bit number: {}",
        info.serial_hex
    );
    let now = OffsetDateTime::now_utc();
    ensure!(
        info.not_before < now - Duration::from_secs(60),
        "notBefore must be backdated: {}",
        info.not_before
    );
    let life = info.not_after - info.not_before;
    ensure!(
        life > time::Duration::hours(24) && life < time::Duration::hours(25),
        "default lifetime 24h (+ backdate): {life}"
    );
    ensure!(
        info.public_key_der.len() == 91,
        "ECDSA P-256 SubjectPublicKeyInfo is 91 bytes, got {}",
        info.public_key_der.len()
    );
    ensure!(secret.type_.as_deref() == Some("kubernetes.io/tls"));
    let key = field(secret, "tls.key");
    ensure!(
        key.starts_with("-----BEGIN PRIVATE KEY-----"),
        "tls.key must be PKCS#8 PEM"
    );
    let chain = certificates_from_pem(&field(secret, "tls.crt"))?;
    ensure!(
        chain.len() >= 2,
        "tls.crt must carry the leaf and the CA chain"
    );
    let labels = secret.metadata.labels.clone().unwrap_or_default();
    ensure!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str)
            == Some("rolemesh")
    );
    let owners = secret.metadata.owner_references.clone().unwrap_or_default();
    ensure!(
        owners.len() == 1 && owners[0].kind == "MTLSPolicy",
        "owned by its MTLSPolicy: {owners:?}"
    );
    // openssl shows the role extension under its OID.
    let _ = ROLE_ARN_OID_DOTTED;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_signer_issues_verified_certificates_and_restores_them() -> Result<()> {
    in_namespace_with_authority(
        "issue-local",
        local_authority_spec("mesh.test", "sts"),
        |ns, authority| async move {
            let role = ns
                .env
                .create_irsa_role(&unique("payments"), &ns.name, "payments")
                .await?;
            apply_service_account(&ns, "payments", Some(&role)).await?;
            apply_policy(
                &ns,
                "shop",
                json!({ "serviceAccounts": { "names": ["payments"] } }),
            )
            .await?;
            let controller = ControllerProcess::start(&ns, &authority, "replica-a", &[])?;

            // Issued, verified, every profile field, and accepted by openssl for both purposes.
            let (secret, info) = wait_for_secret(&ns, "payments-rolemesh-tls", None).await?;
            assert_profile(&secret, &ns.name, "payments", &role, "mesh.test")?;
            let bundle = trust_bundle(&ns).await?;
            ensure!(
                field(&secret, "ca.crt") == bundle,
                "ca.crt is the namespace's trust bundle"
            );
            openssl_verify(&secret, &bundle, "sslclient")?;
            openssl_verify(&secret, &bundle, "sslserver")?;
            let entry = wait_for_workload(&ns, "shop", "payments", |w| {
                w.serial.as_deref() == Some(info.serial_hex.as_str())
            })
            .await?;
            ensure!(entry.verified && entry.reason == "Issued", "{entry:?}");
            ensure!(entry.role_arn.as_deref() == Some(role.as_str()));
            let status = policy_status(&ns, "shop").await?;
            ensure!(status.covered_service_accounts == 1);
            ensure!(
                status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True"),
                "{:?}",
                status.conditions
            );
            let authority_status = Api::<rolemesh_crds::MTLSAuthority>::all(ns.client.clone())
                .get(&authority)
                .await?
                .status
                .unwrap_or_default();
            ensure!(
                authority_status.ca_fingerprint.is_some(),
                "authority status carries the CA fingerprint"
            );

            // Idempotent: nothing changes while nothing changes.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let again = leaf_of(
                &Api::<Secret>::namespaced(ns.client.clone(), &ns.name)
                    .get("payments-rolemesh-tls")
                    .await?,
            )?;
            ensure!(
                again.serial_hex == info.serial_hex,
                "a settled Secret must not be re-issued"
            );

            // A deleted Secret comes back.
            let secrets: Api<Secret> = ns.api();
            secrets
                .delete("payments-rolemesh-tls", &DeleteParams::default())
                .await?;
            let (restored, restored_info) =
                wait_for_secret(&ns, "payments-rolemesh-tls", Some(&info.serial_hex)).await?;
            openssl_verify(&restored, &bundle, "sslclient")?;

            // An edited Secret (a key that does not match) is repaired.
            let other_key =
                rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?.serialize_pem();
            let patch = json!({ "stringData": { "tls.key": other_key } });
            secrets
                .patch(
                    "payments-rolemesh-tls",
                    &PatchParams::default(),
                    &Patch::Merge(patch),
                )
                .await?;
            let (repaired, repaired_info) = wait_for_secret(
                &ns,
                "payments-rolemesh-tls",
                Some(&restored_info.serial_hex),
            )
            .await?;
            assert_profile(&repaired, &ns.name, "payments", &role, "mesh.test")?;

            // Rotation on demand, for the whole policy: new key, lastRotation, an Event.
            let old_key = field(&repaired, "tls.key");
            let policies: Api<MTLSPolicy> = ns.api();
            annotate(&policies, "shop", "rolemesh.dev/rotate", "r1").await?;
            let (rotated, rotated_info) = wait_for_secret(
                &ns,
                "payments-rolemesh-tls",
                Some(&repaired_info.serial_hex),
            )
            .await?;
            ensure!(
                field(&rotated, "tls.key") != old_key,
                "rotation must use a new key"
            );
            let status = eventually("lastRotation", WAIT, || async {
                let status = policy_status(&ns, "shop").await?;
                Ok(status
                    .last_rotation
                    .filter(|r| r.request == "r1")
                    .map(|r| r.service_accounts))
            })
            .await?;
            ensure!(status == vec!["payments".to_string()]);
            let events: Api<Event> = ns.api();
            eventually("a Rotated event", WAIT, || async {
                let list = events.list(&ListParams::default()).await?;
                Ok(list
                    .items
                    .iter()
                    .any(|e| e.reason.as_deref() == Some("Rotated"))
                    .then_some(()))
            })
            .await?;

            // Rotation of one ServiceAccount.
            let sas: Api<ServiceAccount> = ns.api();
            annotate(&sas, "payments", "rolemesh.dev/rotate", "sa-1").await?;
            let (_, sa_rotated) =
                wait_for_secret(&ns, "payments-rolemesh-tls", Some(&rotated_info.serial_hex))
                    .await?;

            // A changed role annotation re-verifies and re-issues with the new role.
            let new_role = ns
                .env
                .create_irsa_role(&unique("payments-v2"), &ns.name, "payments")
                .await?;
            apply_service_account(&ns, "payments", Some(&new_role)).await?;
            let (changed, _) =
                wait_for_secret(&ns, "payments-rolemesh-tls", Some(&sa_rotated.serial_hex)).await?;
            assert_profile(&changed, &ns.name, "payments", &new_role, "mesh.test")?;

            ensure!(
                controller
                    .metric("rolemesh_certificates_issued_total{reason=\"new\"}")
                    .await?
                    >= 1.0
            );
            drop(controller);
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_end_in_status_reasons_and_no_certificate() -> Result<()> {
    in_namespace_with_authority(
        "issue-refuse",
        local_authority_spec("mesh.test", "sts"),
        |ns, authority| async move {
            // A role whose trust policy trusts another ServiceAccount: STS refuses.
            let foreign = ns.env.create_irsa_role(&unique("foreign"), &ns.name, "someone-else").await?;
            apply_service_account(&ns, "untrusted", Some(&foreign)).await?;
            apply_service_account(&ns, "unannotated", None).await?;
            apply_service_account(&ns, "malformed", Some("arn:aws:iam::12:user/bob")).await?;
            let good = ns.env.create_irsa_role(&unique("good"), &ns.name, "good").await?;
            apply_service_account(&ns, "good", Some(&good)).await?;
            apply_policy(&ns, "p", json!({ "serviceAccounts": { "names": ["untrusted", "unannotated", "malformed", "missing", "good"] } })).await?;
            let _controller = ControllerProcess::start(&ns, &authority, "replica-a", &[])?;

            let untrusted = wait_for_workload(&ns, "p", "untrusted", |w| w.reason == "StsRefused").await?;
            let message = untrusted.message.unwrap_or_default();
            ensure!(message.contains(&format!("system:serviceaccount:{}:untrusted", ns.name)), "{message}");
            ensure!(!untrusted.verified && untrusted.serial.is_none());
            let unannotated = wait_for_workload(&ns, "p", "unannotated", |w| w.reason == "MissingRoleAnnotation").await?;
            ensure!(unannotated.message.unwrap_or_default().contains("eks.amazonaws.com/role-arn"));
            wait_for_workload(&ns, "p", "malformed", |w| w.reason == "InvalidRoleArn").await?;
            wait_for_workload(&ns, "p", "missing", |w| w.reason == "ServiceAccountNotFound").await?;
            wait_for_workload(&ns, "p", "good", |w| w.verified).await?;
            let secrets: Api<Secret> = ns.api();
            for name in ["untrusted", "unannotated", "malformed"] {
                ensure!(secrets.get_opt(&format!("{name}-rolemesh-tls")).await?.is_none(), "{name} must get no certificate");
            }
            let status = policy_status(&ns, "p").await?;
            let ready = status.conditions.iter().find(|c| c.type_ == "Ready").context("Ready condition")?;
            ensure!(ready.status == "False" && ready.message.contains("of 5"), "{ready:?}");
            let events: Api<Event> = ns.api();
            eventually("a StsRefused warning event", WAIT, || async {
                let list = events.list(&ListParams::default()).await?;
                Ok(list.items.iter().any(|e| e.reason.as_deref() == Some("StsRefused") && e.type_.as_deref() == Some("Warning")).then_some(()))
            })
            .await?;

            // Fixing the trust (a role that trusts it) issues without anything else touched.
            let fixed = ns.env.create_irsa_role(&unique("fixed"), &ns.name, "untrusted").await?;
            apply_service_account(&ns, "untrusted", Some(&fixed)).await?;
            wait_for_secret(&ns, "untrusted-rolemesh-tls", None).await?;

            // Removing a ServiceAccount from the policy removes its Secret; deleting the policy
            // removes the rest (garbage collection by owner).
            apply_policy(&ns, "p", json!({ "serviceAccounts": { "names": ["good"] } })).await?;
            eventually("the uncovered Secret to go", WAIT, || async {
                Ok(secrets.get_opt("untrusted-rolemesh-tls").await?.is_none().then_some(()))
            })
            .await?;
            Api::<MTLSPolicy>::namespaced(ns.client.clone(), &ns.name).delete("p", &DeleteParams::default()).await?;
            eventually("the policy's Secrets to be garbage-collected", WAIT, || async {
                Ok(secrets.get_opt("good-rolemesh-tls").await?.is_none().then_some(()))
            })
            .await?;
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_signer_issues_and_recovers_from_an_outage_without_touching_secrets() -> Result<()> {
    let env = control_plane().await?;
    let (key_arn, _key_id) = env.create_kms_key("rolemesh test CA").await?;
    let kms = aws_sdk_kms::Client::new(&env.aws_config().await);
    let spec = json!({
        "trustDomain": "kms.test",
        "signer": { "type": "kms", "kms": { "keyId": key_arn, "region": "us-east-1" } },
    });
    in_namespace_with_authority("issue-kms", spec, |ns, authority| async move {
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
        // KMS (only KMS: STS stays reachable) goes through a forwarder that can fail.
        let kms_endpoint = FaultyEndpoint::start(ns.env.aws_endpoint(), Throttled::Kms).await?;
        let controller = ControllerProcess::start_with_env(
            &ns,
            &authority,
            "replica-a",
            &[],
            &[("AWS_ENDPOINT_URL_KMS", &kms_endpoint.url)],
        )?;
        let (secret, info) = wait_for_secret(&ns, "orders-rolemesh-tls", None).await?;
        assert_profile(&secret, &ns.name, "orders", &role, "kms.test")?;
        let bundle = trust_bundle(&ns).await?;
        openssl_verify(&secret, &bundle, "sslclient")?;
        openssl_verify(&secret, &bundle, "sslserver")?;
        // The CA's public key is the KMS key's: the private key never left KMS.
        let public = kms
            .get_public_key()
            .key_id(&key_arn)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!(aws_sdk_kms::error::DisplayErrorContext(e).to_string()))?;
        let ca = certificates_from_pem(&bundle)?;
        let ca_info = rolemesh_profile::inspect_certificate(&ca[0])?;
        ensure!(
            Some(ca_info.public_key_der.as_slice()) == public.public_key().map(|b| b.as_ref()),
            "CA key is the KMS key"
        );
        // One Sign call for the CA, one per leaf.
        let calls = controller
            .metric("rolemesh_signer_sign_calls_total{signer=\"kms\"}")
            .await?;
        ensure!(
            calls == 2.0,
            "expected 2 KMS Sign calls (CA + one leaf), saw {calls}"
        );

        // KMS throttles every call while a rotation is requested: the Secret stays as it
        // is and valid, status says why.
        kms_endpoint.set_throttling(true);
        let policies: Api<MTLSPolicy> = ns.api();
        annotate(&policies, "p", "rolemesh.dev/rotate", "during-outage").await?;
        let failing =
            wait_for_workload(&ns, "p", "orders", |w| w.reason == "SignerThrottled").await?;
        ensure!(
            failing
                .message
                .unwrap_or_default()
                .contains("left as it is")
        );
        let secrets: Api<Secret> = ns.api();
        let untouched = secrets.get("orders-rolemesh-tls").await?;
        ensure!(
            leaf_of(&untouched)?.serial_hex == info.serial_hex,
            "the existing Secret must be untouched"
        );
        openssl_verify(&untouched, &bundle, "sslclient")?;
        ensure!(
            controller
                .metric("rolemesh_signer_sign_errors_total{signer=\"kms\",class=\"throttled\"}")
                .await?
                >= 1.0
        );

        // KMS is back: issuance resumes by itself.
        kms_endpoint.set_throttling(false);
        let (rotated, _) =
            wait_for_secret(&ns, "orders-rolemesh-tls", Some(&info.serial_hex)).await?;
        openssl_verify(&rotated, &bundle, "sslclient")?;
        wait_for_workload(&ns, "p", "orders", |w| w.reason == "Issued").await?;
        Ok(())
    })
    .await
}

/// Whole Secrets and no second issuance for one need, across a kill -9 in the middle of issuing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_issuance_leaves_every_secret_whole() -> Result<()> {
    in_namespace_with_authority(
        "issue-kill",
        local_authority_spec("kill.test", "none"),
        |ns, authority| async move {
            // Enough that one issuance at a time is still running when the first Secrets appear.
            const COUNT: usize = 150;
            for i in 0..COUNT {
                apply_service_account(&ns, &format!("sa-{i}"), Some(&format!("arn:aws:iam::111122223333:role/sa-{i}"))).await?;
            }
            apply_policy(&ns, "p", json!({ "serviceAccounts": { "names": (0..COUNT).map(|i| format!("sa-{i}")).collect::<Vec<_>>() } })).await?;
            let secrets: Api<Secret> = ns.api();
            let mut first = ControllerProcess::start(&ns, &authority, "replica-a", &["--issue-concurrency", "1"])?;
            eventually("the first Secrets", WAIT, || async {
                let n = secrets.list(&ListParams::default().labels("rolemesh.dev/policy=p")).await?.items.len();
                Ok((n >= 3).then_some(()))
            })
            .await?;
            first.kill();
            let before: Vec<Secret> = secrets.list(&ListParams::default().labels("rolemesh.dev/policy=p")).await?.items;
            ensure!(before.len() < COUNT, "the kill came too late to be mid-issuance");

            let second = ControllerProcess::start(&ns, &authority, "replica-b", &[])?;
            let all = eventually("every Secret", Duration::from_secs(120), || async {
                let list = secrets.list(&ListParams::default().labels("rolemesh.dev/policy=p")).await?.items;
                Ok((list.len() == COUNT).then_some(list))
            })
            .await?;
            let bundle = trust_bundle(&ns).await?;
            for secret in &all {
                let info = leaf_of(secret)?;
                let key = rcgen::KeyPair::from_pem(&field(secret, "tls.key"))?;
                use rcgen::PublicKeyData;
                ensure!(info.public_key_matches(&key.subject_public_key_info()), "key matches cert");
                openssl_verify(secret, &bundle, "sslclient")?;
            }
            // Secrets that existed at the kill were whole and were kept, not issued again.
            for old in &before {
                let now = all.iter().find(|s| s.metadata.name == old.metadata.name).context("secret vanished")?;
                ensure!(leaf_of(old)?.serial_hex == leaf_of(now)?.serial_hex, "{:?} was issued twice", old.metadata.name);
            }
            let issued = second.metric("rolemesh_certificates_issued_total{reason=\"new\"}").await?;
            ensure!(issued as usize == COUNT - before.len(), "the restarted controller issued {issued}, expected {}", COUNT - before.len());
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_replicas_only_the_leader_writes() -> Result<()> {
    in_namespace_with_authority(
        "issue-leader",
        local_authority_spec("leader.test", "none"),
        |ns, authority| async move {
            apply_service_account(&ns, "a", Some("arn:aws:iam::111122223333:role/a")).await?;
            apply_policy(
                &ns,
                "p",
                json!({ "serviceAccounts": { "names": ["a", "b"] } }),
            )
            .await?;
            let mut one = ControllerProcess::start(&ns, &authority, "replica-1", &[])?;
            wait_for_secret(&ns, "a-rolemesh-tls", None).await?;
            let two = ControllerProcess::start(&ns, &authority, "replica-2", &[])?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            ensure!(
                one.metric("rolemesh_leader").await? == 1.0,
                "replica-1 leads"
            );
            ensure!(
                two.metric("rolemesh_leader").await? == 0.0,
                "replica-2 waits"
            );
            apply_service_account(&ns, "b", Some("arn:aws:iam::111122223333:role/b")).await?;
            wait_for_secret(&ns, "b-rolemesh-tls", None).await?;
            ensure!(
                two.metric("rolemesh_signer_sign_calls_total{signer=\"local\"}")
                    .await?
                    == 0.0,
                "the follower must not sign"
            );
            ensure!(
                two.metric("rolemesh_certificates_issued_total{reason=\"new\"}")
                    .await?
                    == 0.0
            );

            // The leader dies without releasing the lease: the other takes over once it expires.
            one.kill();
            let secrets: Api<Secret> = ns.api();
            secrets
                .delete("a-rolemesh-tls", &DeleteParams::default())
                .await?;
            wait_for_secret(&ns, "a-rolemesh-tls", None).await?;
            ensure!(
                two.metric("rolemesh_leader").await? == 1.0,
                "replica-2 took over"
            );
            Ok(())
        },
    )
    .await
}

/// A CA the user brings (an intermediate under their offline root, for the signer's key):
/// `tls.crt` carries the chain, the trust bundle holds the intermediate (the issuing CA), the root
/// and the root's CRL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_supplied_intermediate_ca_signs_with_its_chain() -> Result<()> {
    use rolemesh_profile::profile::{DEFAULT_CA_DURATION, ca_params};
    // The signer's key (local signer, in the Secret the controller would otherwise create).
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    // The offline root, and the intermediate it signs for the signer's key.
    let now = OffsetDateTime::now_utc();
    let root_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut root_params = ca_params("user.test", DEFAULT_CA_DURATION * 2, now);
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params.distinguished_name = rcgen::DistinguishedName::new();
    root_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "offline root");
    let root = root_params.self_signed(&root_key)?;
    let root_issuer = rcgen::Issuer::from_params(&root_params, &root_key);
    let intermediate =
        ca_params("user.test", DEFAULT_CA_DURATION, now).signed_by(&ca_key, &root_issuer)?;
    // The root's CRL revokes an intermediate the user retired.
    let retired_params = ca_params("user.test", DEFAULT_CA_DURATION, now);
    let retired_serial = retired_params
        .serial_number
        .clone()
        .context("ca_params sets a serial")?;
    retired_params.signed_by(
        &rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        &root_issuer,
    )?;
    let root_crl = rolemesh_profile::profile::crl_params(
        vec![retired_serial],
        1,
        now,
        Duration::from_secs(7 * 86400),
    )
    .signed_by(&root_issuer)?;
    let spec = json!({
        "trustDomain": "user.test",
        "signer": { "type": "local", "local": { "secretName": "rolemesh-ca-key" } },
        "identityVerification": "none",
        "ca": { "certificate": intermediate.pem(), "chain": root.pem(), "crls": root_crl.pem()? },
    });
    in_namespace_with_authority("issue-userca", spec, |ns, authority| async move {
        let secrets: Api<Secret> = ns.api();
        secrets
            .create(
                &Default::default(),
                &serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": { "name": "rolemesh-ca-key" },
                    "stringData": { "tls.key": ca_key.serialize_pem() },
                }))?,
            )
            .await?;
        apply_service_account(&ns, "api", Some("arn:aws:iam::111122223333:role/api")).await?;
        apply_policy(&ns, "p", json!({ "serviceAccounts": { "names": ["api"] } })).await?;
        let _controller = ControllerProcess::start(&ns, &authority, "replica-a", &[])?;
        let (secret, _) = wait_for_secret(&ns, "api-rolemesh-tls", None).await?;
        let chain = certificates_from_pem(&field(&secret, "tls.crt"))?;
        ensure!(
            chain.len() == 3,
            "leaf + intermediate + root, got {}",
            chain.len()
        );
        ensure!(
            chain[1] == intermediate.der().to_vec(),
            "the intermediate follows the leaf"
        );
        let bundle = trust_bundle(&ns).await?;
        ensure!(
            trust_bundle_from_pem(&bundle)?
                == TrustBundle {
                    certificates: vec![intermediate.der().to_vec(), root.der().to_vec()],
                    crls: vec![root_crl.der().to_vec()],
                },
            "the bundle holds the issuing intermediate, the root and its CRL: {bundle}"
        );
        // The root anchors and only the intermediate issues: another intermediate under the
        // same root signs no identity the proxies accept.
        let trust = rolemesh_profile::TrustStore::from_pem(&bundle)?;
        ensure!(trust.anchors().len() == 1 && trust.issuer_count() == 1);
        ensure!(
            field(&secret, "ca.crt") == bundle,
            "the workload Secret's ca.crt is the bundle"
        );
        // openssl, as a client outside the mesh would use it, still reads the bundle.
        openssl_verify(&secret, &bundle, "sslclient")?;
        openssl_verify(&secret, &bundle, "sslserver")?;

        // A CRL that does not parse is refused with the reason, and nothing published changes.
        let authorities: Api<rolemesh_crds::MTLSAuthority> = Api::all(ns.client.clone());
        let garbage = "-----BEGIN X509 CRL-----\nAAECAwQF\n-----END X509 CRL-----\n";
        authorities
            .patch(
                &authority,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "ca": { "crls": garbage } } })),
            )
            .await?;
        let refused = eventually("the authority to refuse the CRL", WAIT, || async {
            let status = authorities
                .get(&authority)
                .await?
                .status
                .unwrap_or_default();
            Ok(status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready" && c.status == "False"))
        })
        .await?;
        ensure!(
            refused.reason == "CaCertificateUnusable"
                && refused.message.contains("ca.crls: CRL 1 does not parse"),
            "{refused:?}"
        );
        ensure!(
            trust_bundle(&ns).await? == bundle,
            "the published bundle must not change"
        );
        let status = wait_for_workload(&ns, "p", "api", |w| w.reason == "IssuedUnverified").await?;
        ensure!(
            !status.verified
                && status
                    .message
                    .unwrap_or_default()
                    .contains("identityVerification: none")
        );
        Ok(())
    })
    .await
}

/// The fingerprints of the certificates of `pem`, in order.
fn fingerprints_of(pem: &str) -> Result<Vec<String>> {
    Ok(certificates_from_pem(pem)?
        .iter()
        .map(|der| rolemesh_profile::inspect::sha256_hex(der))
        .collect())
}

async fn authority_cas(
    ns: &TestNamespace,
    authority: &str,
) -> Result<Vec<rolemesh_crds::CaStatus>> {
    let authorities: Api<rolemesh_crds::MTLSAuthority> = Api::all(ns.client.clone());
    Ok(authorities
        .get(authority)
        .await?
        .status
        .map(|s| s.cas)
        .unwrap_or_default())
}

/// The trust domain is fixed at the API, with the way to migrate in the refusal. A new signer
/// key (here: another local Secret) makes a new CA that signs at once; the old one stays in the
/// bundle, Retiring, while what it signed is re-issued, and leaves `bundlePropagation` after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_signer_key_reissues_and_the_old_ca_retires_after_its_certificates() -> Result<()> {
    let mut spec = local_authority_spec("one.test", "none");
    spec["bundlePropagation"] = json!("10s");
    in_namespace_with_authority("issue-carotate", spec, |ns, authority| async move {
        apply_service_account(&ns, "api", Some("arn:aws:iam::111122223333:role/api")).await?;
        apply_policy(&ns, "p", json!({ "serviceAccounts": { "names": ["api"] } })).await?;
        let _controller = ControllerProcess::start(&ns, &authority, "replica-a", &[])?;
        let (_, first) = wait_for_secret(&ns, "api-rolemesh-tls", None).await?;
        let authorities: Api<rolemesh_crds::MTLSAuthority> = Api::all(ns.client.clone());

        let refused = authorities
            .patch(
                &authority,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "trustDomain": "two.test" } })),
            )
            .await;
        let message = format!("{:?}", refused.err().context("a trust domain change is refused")?);
        ensure!(
            message.contains("trustDomain cannot be changed")
                && message.contains("docs/rotation.md#changing-the-trust-domain"),
            "{message}"
        );

        authorities
            .patch(
                &authority,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({ "spec": { "signer": { "local": { "secretName": "rolemesh-ca-key-2" } } } }),
                ),
            )
            .await?;
        let (secret, second) =
            wait_for_secret(&ns, "api-rolemesh-tls", Some(&first.serial_hex)).await?;
        ensure!(second.issuer != first.issuer, "signed by the new CA: {}", second.issuer);
        let bundle_now = || trust_bundle(&ns);
        // Retiring for 10 s after the Secret was replaced: both CAs in the bundle meanwhile.
        let both = bundle_now().await?;
        ensure!(
            fingerprints_of(&both)?.len() == 2,
            "the old CA stays while retiring: {:?}",
            authority_cas(&ns, &authority).await?
        );
        openssl_verify(&secret, &both, "sslclient")?;
        let cas = authority_cas(&ns, &authority).await?;
        ensure!(
            cas.iter().map(|ca| ca.phase).collect::<Vec<_>>()
                == vec![rolemesh_crds::CaPhase::Active, rolemesh_crds::CaPhase::Retiring],
            "{cas:?}"
        );
        let active = cas[0].fingerprint.clone();
        eventually("the old CA gone from the bundle", WAIT, || async {
            Ok((fingerprints_of(&bundle_now().await?)? == vec![active.clone()]).then_some(()))
        })
        .await?;
        let cas = authority_cas(&ns, &authority).await?;
        ensure!(cas.len() == 1 && cas[0].fingerprint == active, "{cas:?}");
        Ok(())
    })
    .await
}

/// `kubectl rolemesh ca rotate --wait`, as docs/rotation.md shows it: the new CA is in the
/// namespace's bundle for `bundlePropagation` before it signs the workload's certificate, and
/// the old CA leaves the bundle once the certificate is re-issued; the command returns then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_ca_rotation_publishes_the_new_ca_before_it_signs() -> Result<()> {
    let mut spec = local_authority_spec("staged.test", "none");
    spec["bundlePropagation"] = json!("10s");
    in_namespace_with_authority("issue-castaged", spec, |ns, authority| async move {
        apply_service_account(&ns, "api", Some("arn:aws:iam::111122223333:role/api")).await?;
        apply_policy(&ns, "p", json!({ "serviceAccounts": { "names": ["api"] } })).await?;
        let _controller = ControllerProcess::start(&ns, &authority, "replica-a", &[])?;
        let (_, first) = wait_for_secret(&ns, "api-rolemesh-tls", None).await?;
        let old = eventually("the active CA in the status", WAIT, || async {
            Ok(authority_cas(&ns, &authority)
                .await?
                .first()
                .map(|ca| ca.fingerprint.clone()))
        })
        .await?;
        let (code, table, err) =
            ns.env
                .kubectl_plugin(&["ca", "status", "--authority", &authority])?;
        ensure!(code == 0 && table.contains("Active") && table.contains(&old[..16]), "{table}{err}");

        let env = ns.env.clone();
        let name = authority.clone();
        let rotation = tokio::task::spawn_blocking(move || {
            env.kubectl_plugin(&["ca", "rotate", "--wait", "--authority", &name, "--timeout", "3m"])
        });
        let secrets: Api<Secret> = ns.api();
        let started = std::time::Instant::now();
        let (mut bundle_held_new, mut secret_signed_new) = (None, None);
        while !rotation.is_finished() {
            let bundle = trust_bundle(&ns).await?;
            if bundle_held_new.is_none() && fingerprints_of(&bundle)?.iter().any(|f| f != &old) {
                bundle_held_new = Some(started.elapsed());
            }
            let leaf = leaf_of(&secrets.get("api-rolemesh-tls").await?)?;
            if secret_signed_new.is_none() && leaf.issuer != first.issuer {
                secret_signed_new = Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let (code, out, err) = rotation.await??;
        ensure!(code == 0, "ca rotate --wait failed:\n{out}{err}");
        for stage in ["prepared", "active", "retired", "rotation done"] {
            ensure!(out.contains(stage), "the output names the stage {stage}:\n{out}");
        }
        let (published, signed) = (
            bundle_held_new.context("the new CA never reached the namespace's bundle")?,
            secret_signed_new.context("the Secret was never re-issued under the new CA")?,
        );
        ensure!(
            signed >= published + Duration::from_secs(9),
            "the new CA signed {:.1} s after it reached the bundle, before bundlePropagation (10 s)",
            (signed - published).as_secs_f64()
        );
        let cas = authority_cas(&ns, &authority).await?;
        ensure!(
            cas.len() == 1 && cas[0].fingerprint != old && cas[0].phase == rolemesh_crds::CaPhase::Active,
            "{cas:?}"
        );
        let bundle = trust_bundle(&ns).await?;
        ensure!(fingerprints_of(&bundle)? == vec![cas[0].fingerprint.clone()]);
        openssl_verify(&secrets.get("api-rolemesh-tls").await?, &bundle, "sslclient")?;
        let events: Api<Event> = Api::all(ns.client.clone());
        let reasons: Vec<String> = events
            .list(&ListParams::default().fields(&format!("involvedObject.name={authority}")))
            .await?
            .items
            .into_iter()
            .filter_map(|e| e.reason)
            .collect();
        for reason in ["CaPrepared", "CaActive", "CaRetiring", "CaRetired"] {
            ensure!(reasons.iter().any(|r| r == reason), "Event {reason}: {reasons:?}");
        }
        println!("{out}");
        Ok(())
    })
    .await
}

/// `kubectl rolemesh revoke --service-account api --wait`, as docs/rotation.md shows it: the
/// serial goes into a CRL in the namespace's trust bundle, signed through the signer (one Sign
/// call besides the re-issued certificate), which `openssl verify -crl_check` reads: the revoked
/// certificate is refused, its replacement accepted. `--block` deletes the Secret (reason
/// `Blocked`) until `kubectl rolemesh unblock`; a malformed revoke annotation is ignored with a
/// Warning Event that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_lists_the_certificate_in_a_crl_and_reissues() -> Result<()> {
    in_namespace_with_authority(
        "issue-revoke",
        local_authority_spec("revoke.test", "none"),
        |ns, authority| async move {
            apply_service_account(&ns, "api", Some("arn:aws:iam::111122223333:role/api")).await?;
            apply_policy(&ns, "p", json!({ "serviceAccounts": { "names": ["api"] } })).await?;
            let controller = ControllerProcess::start(&ns, &authority, "replica-a", &[])?;
            let (revoked, first) = wait_for_secret(&ns, "api-rolemesh-tls", None).await?;
            wait_for_workload(&ns, "p", "api", |w| {
                w.serial.as_deref() == Some(&first.serial_hex)
            })
            .await?;
            let sign_calls = "rolemesh_signer_sign_calls_total{signer=\"local\"}";
            let signs_before = controller.metric(sign_calls).await?;

            let (code, out, err) = ns.env.kubectl_plugin(&[
                "revoke",
                "-n",
                &ns.name,
                "--service-account",
                "api",
                "--wait",
                "--authority",
                &authority,
            ])?;
            ensure!(
                code == 0 && out.contains(&first.serial_hex),
                "revoke: {out}{err}"
            );
            println!(
                "$ kubectl rolemesh revoke -n {} --service-account api --wait\n{out}",
                ns.name
            );
            let (secret, second) =
                wait_for_secret(&ns, "api-rolemesh-tls", Some(&first.serial_hex)).await?;
            let bundle = eventually("a CRL in the namespace's bundle", WAIT, || async {
                let bundle = trust_bundle(&ns).await?;
                Ok(bundle.contains("X509 CRL").then_some(bundle))
            })
            .await?;
            let crls = trust_bundle_from_pem(&bundle)?.crls;
            ensure!(crls.len() == 1, "one CRL, of the one CA: {}", crls.len());
            let crl = rolemesh_profile::inspect::inspect_crl(&crls[0])?;
            ensure!(crl.serials == vec![first.serial_hex.clone()], "{crl:?}");
            ensure!(
                crl.issuer == first.issuer,
                "issued by the leaf's CA: {crl:?}"
            );
            let refusal = openssl_verify_crl(&revoked, &bundle, "sslclient")
                .err()
                .context("openssl verify -crl_check accepted the revoked certificate")?;
            ensure!(refusal.to_string().contains("revoked"), "{refusal:#}");
            openssl_verify_crl(&secret, &bundle, "sslclient")?;
            ensure!(second.serial_hex != first.serial_hex);
            let signs = controller.metric(sign_calls).await? - signs_before;
            ensure!(
                signs == 2.0,
                "one Sign for the certificate, one for the CRL: {signs}"
            );

            // Blocked: the Secret goes and stays gone until unblocked.
            let (code, out, err) = ns.env.kubectl_plugin(&[
                "revoke",
                "-n",
                &ns.name,
                "--service-account",
                "api",
                "--block",
                "--wait",
                "--authority",
                &authority,
            ])?;
            ensure!(code == 0, "revoke --block: {out}{err}");
            let secrets: Api<Secret> = ns.api();
            ensure!(
                secrets.get_opt("api-rolemesh-tls").await?.is_none(),
                "the Secret is deleted"
            );
            wait_for_workload(&ns, "p", "api", |w| w.reason == "Blocked").await?;
            let (code, out, err) = ns.env.kubectl_plugin(&[
                "unblock",
                "-n",
                &ns.name,
                "--service-account",
                "api",
                "--authority",
                &authority,
            ])?;
            ensure!(code == 0, "unblock: {out}{err}");
            let (_, third) = wait_for_secret(&ns, "api-rolemesh-tls", None).await?;
            ensure!(third.serial_hex != second.serial_hex);

            // A malformed request is ignored, with the reason in an Event.
            let authorities: Api<rolemesh_crds::MTLSAuthority> = Api::all(ns.client.clone());
            authorities
                .patch(
                    &authority,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "metadata": { "annotations": {
                        "revoke.rolemesh.dev/zz": "tomorrow"
                    } } })),
                )
                .await?;
            let events: Api<Event> = Api::all(ns.client.clone());
            eventually("a RevocationIgnored Event", WAIT, || async {
                Ok(events
                    .list(
                        &ListParams::default().fields(&format!("involvedObject.name={authority}")),
                    )
                    .await?
                    .items
                    .iter()
                    .any(|e| {
                        e.reason.as_deref() == Some("RevocationIgnored")
                            && e.message
                                .as_deref()
                                .is_some_and(|m| m.contains("revoke.rolemesh.dev/zz"))
                    })
                    .then_some(()))
            })
            .await?;
            Ok(())
        },
    )
    .await
}

/// Policies that exist when the controller starts are all reconciled, although each reconcile
/// first waits for the ServiceAccount cache, which fills last when there are many of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_waiting_for_the_caches_is_reconciled() -> Result<()> {
    in_namespace_with_authority(
        "issue-many",
        local_authority_spec("many.test", "none"),
        |ns, authority| async move {
            const POLICIES: usize = 6;
            const PER_POLICY: usize = 300;
            let api: Api<ServiceAccount> = ns.api();
            futures::stream::iter(0..POLICIES * PER_POLICY)
                .map(|i| {
                    let api = api.clone();
                    async move {
                        let sa: ServiceAccount = serde_json::from_value(json!({
                            "metadata": {
                                "name": format!("sa-{i}"),
                                "labels": { "group": format!("g{}", i / PER_POLICY) },
                                "annotations": { "eks.amazonaws.com/role-arn":
                                    format!("arn:aws:iam::111122223333:role/r{i}") },
                            },
                        }))?;
                        api.create(&Default::default(), &sa).await?;
                        anyhow::Ok(())
                    }
                })
                .buffer_unordered(32)
                .try_collect::<Vec<()>>()
                .await?;
            for p in 0..POLICIES {
                apply_policy(
                    &ns,
                    &format!("p{p}"),
                    json!({ "serviceAccounts": { "selector": { "matchLabels": { "group": format!("g{p}") } } } }),
                )
                .await?;
            }
            let controller = ControllerProcess::start(&ns, &authority, "many", &[])?;
            for p in 0..POLICIES {
                let name = format!("p{p}");
                eventually(&format!("MTLSPolicy {name} covering {PER_POLICY} ServiceAccounts"), Duration::from_secs(180), || async {
                    let status = policy_status(&ns, &name).await?;
                    let issued = status.workloads.iter().filter(|w| w.serial.is_some()).count();
                    Ok((issued == PER_POLICY).then_some(()))
                })
                .await
                .with_context(|| controller.log().lines().rev().take(5).collect::<Vec<_>>().join("\n"))?;
            }
            Ok(())
        },
    )
    .await
}
