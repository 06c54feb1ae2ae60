//! Forged or borrowed identities, on the local control plane and the local AWS endpoint: wildcard accounts refused by
//! the API server, roles of accounts outside `allowedAccounts` given nothing, and an STS throttle
//! during a rotation that keeps the Secret (docs/security-model.md names these tests).

use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use rolemesh_crds::{MTLSAuthority, MTLSPolicy};
use rolemesh_e2e::*;
use rolemesh_testkit::in_namespace;
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
