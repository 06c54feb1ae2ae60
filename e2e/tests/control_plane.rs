//! The local control plane serves what rolemesh needs, and rolemesh's CRDs behave as a user sees
//! them through the real kubectl: descriptions, printer columns, and refusals of bad objects.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{DeleteParams, PostParams};
use rolemesh_testkit::{cluster, eventually, in_namespace, install_crds};

const VALID_POLICY: &str = r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata:
  name: payments
spec:
  serviceAccounts:
    names: [payments]
  inbound:
    - name: http
      port: 8443
      appPort: 8080
      allow:
        - arn:aws:iam::111122223333:role/frontend
        - spiffe://rolemesh.local/ns/shop/sa/*
  certificate:
    duration: 24h
    renewBefore: 8h
"#;

#[tokio::test]
async fn kubectl_explain_shows_field_descriptions() -> Result<()> {
    let env = cluster().await?;
    install_crds(&env).await?;
    let explained = env.explain("mtlspolicy.spec").await?;
    for text in [
        "Which ServiceAccounts in this namespace the policy covers",
        "inbound",
        "outbound",
        "Lifetime and renewal of the certificates",
    ] {
        ensure!(
            explained.contains(text),
            "explain lacks {text:?}:\n{explained}"
        );
    }
    // The reasons listed are the controller's own (crds/src/reasons.rs), not a hand-kept list.
    let explained = env.explain("mtlspolicy.status.workloads.reason").await?;
    for reason in rolemesh_crds::reasons::Reason::ALL {
        ensure!(
            explained.contains(reason.as_str()),
            "explain lacks reason {reason}:\n{explained}"
        );
    }
    let explained = env.explain("mtlsauthority.spec.signer.type").await?;
    ensure!(
        explained.contains("AWS KMS"),
        "explain signer.type:\n{explained}"
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_get_prints_policy_columns() -> Result<()> {
    let env = cluster().await?;
    install_crds(&env).await?;
    in_namespace("crd-columns", |ns| async move {
        let out = ns.env.kubectl_apply(&ns.name, VALID_POLICY)?;
        rolemesh_testkit::expect_success("kubectl", &["apply"], &out)?;
        let table = ns.env.kubectl(&["get", "mtlsp", "-n", &ns.name])?;
        let header = table.lines().next().unwrap_or_default();
        for column in ["NAME", "READY", "WORKLOADS", "SOONEST EXPIRY", "AGE"] {
            ensure!(
                header.contains(column),
                "column {column} missing in:\n{table}"
            );
        }
        ensure!(table.contains("payments"), "policy missing in:\n{table}");
        // As cert-manager's Certificate: the Ready condition's message, with -o wide.
        let wide = ns
            .env
            .kubectl(&["get", "mtlsp", "-n", &ns.name, "-o", "wide"])?;
        let header = wide.lines().next().unwrap_or_default();
        ensure!(
            header.contains("MESSAGE") && !table.contains("MESSAGE"),
            "MESSAGE must be a -o wide column:\n{table}\n{wide}"
        );
        Ok(())
    })
    .await
}

/// Each invalid object, the field its refusal must name, and words from the message.
const INVALID: &[(&str, &str, &str, &str)] = &[
    (
        "bad duration",
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata: {name: bad-duration}
spec:
  serviceAccounts: {names: [a]}
  certificate: {duration: "one day"}
"#,
        "spec.certificate.duration",
        "should match",
    ),
    (
        "renewBefore not shorter than duration",
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata: {name: renew-too-long}
spec:
  serviceAccounts: {names: [a]}
  certificate: {duration: 1h, renewBefore: 2h}
"#,
        "spec.certificate.renewBefore",
        "renewBefore must be shorter than certificate.duration",
    ),
    (
        "malformed role ARN",
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata: {name: bad-arn}
spec:
  serviceAccounts: {names: [a]}
  inbound:
    - {name: http, port: 8443, appPort: 8080, allow: ["arn:aws:iam::12345:user/bob"]}
"#,
        "spec.inbound[0].allow[0]",
        "should match",
    ),
    (
        "unknown signer",
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSAuthority
metadata: {name: bad-signer}
spec:
  trustDomain: rolemesh.local
  signer: {type: vault}
"#,
        "spec.signer.type",
        "Unsupported value: \"vault\"",
    ),
    (
        "kms signer without its settings",
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSAuthority
metadata: {name: kms-without-key}
spec:
  trustDomain: rolemesh.local
  signer: {type: kms}
"#,
        "spec.signer.kms",
        "signer.kms is required when signer.type is kms",
    ),
    (
        "two inbound mappings with one name",
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata: {name: inbound-name-twice}
spec:
  serviceAccounts: {names: [a]}
  inbound:
    - {name: http, port: 8443, appPort: 8080, allow: []}
    - {name: http, port: 8444, appPort: 8081, allow: []}
"#,
        "spec.inbound[1]",
        "Duplicate value",
    ),
    (
        "two inbound mappings on one port",
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata: {name: inbound-port-twice}
spec:
  serviceAccounts: {names: [a]}
  inbound:
    - {name: http, port: 8443, appPort: 8080, allow: []}
    - {name: grpc, port: 8443, appPort: 8081, allow: []}
"#,
        "spec.inbound",
        "two inbound mappings use one port",
    ),
    (
        "an outbound localPort that is an inbound port",
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata: {name: port-in-both}
spec:
  serviceAccounts: {names: [a]}
  inbound:
    - {name: http, port: 9000, appPort: 8080, allow: []}
  outbound:
    - {name: db, localPort: 9000, upstream: "db.shop.svc:5432", expect: ["spiffe://x/ns/a/sa/b"]}
"#,
        "spec.outbound",
        "an outbound localPort is also an inbound port",
    ),
    (
        "a mapping name in both lists",
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata: {name: name-in-both}
spec:
  serviceAccounts: {names: [a]}
  inbound:
    - {name: db, port: 8443, appPort: 8080, allow: []}
  outbound:
    - {name: db, localPort: 9000, upstream: "db.shop.svc:5432", expect: ["spiffe://x/ns/a/sa/b"]}
"#,
        "spec.outbound",
        "mapping names are unique across both lists",
    ),
    (
        "a CA lifetime beyond ten years",
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSAuthority
metadata: {name: ca-forever}
spec:
  trustDomain: rolemesh.local
  signer: {type: local, local: {secretName: x}}
  caDuration: 999999h
"#,
        "spec.caDuration",
        "caDuration must be between 10m and 87600h",
    ),
    (
        "policy covering nothing",
        r#"
apiVersion: rolemesh.dev/v1alpha1
kind: MTLSPolicy
metadata: {name: covers-nothing}
spec:
  serviceAccounts: {}
"#,
        "spec.serviceAccounts",
        "needs at least one of names or selector",
    ),
];

#[tokio::test]
async fn api_server_refuses_invalid_objects_naming_the_field() -> Result<()> {
    let env = cluster().await?;
    install_crds(&env).await?;
    in_namespace("crd-invalid", |ns| async move {
        for (what, manifest, field, words) in INVALID {
            let out = ns.env.kubectl_apply(&ns.name, manifest)?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            ensure!(
                !out.status.success(),
                "{what}: accepted, but must be refused"
            );
            ensure!(
                stderr.contains(field),
                "{what}: refusal does not name {field}:\n{stderr}"
            );
            ensure!(
                stderr.contains(words),
                "{what}: refusal lacks {words:?}:\n{stderr}"
            );
        }
        // The valid policy is accepted, so the refusals above are about the fields named.
        let out = ns.env.kubectl_apply(&ns.name, VALID_POLICY)?;
        rolemesh_testkit::expect_success("kubectl", &["apply"], &out)?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn token_request_mints_sts_audience_tokens() -> Result<()> {
    in_namespace("tokenrequest", |ns| async move {
        let token = ns
            .service_account_token("workload", "sts.amazonaws.com")
            .await?;
        let payload = token.split('.').nth(1).context("token is not a JWT")?;
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?,
        )?;
        ensure!(
            claims["aud"] == serde_json::json!(["sts.amazonaws.com"]),
            "aud: {claims}"
        );
        let subject = format!("system:serviceaccount:{}:workload", ns.name);
        ensure!(claims["sub"] == subject.as_str(), "sub: {claims}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn garbage_collector_deletes_owned_objects() -> Result<()> {
    in_namespace("gc", |ns| async move {
        let maps = ns.api::<ConfigMap>();
        let secrets = ns.api::<Secret>();
        let mut owner = ConfigMap::default();
        owner.metadata.name = Some("owner".into());
        let owner = maps.create(&PostParams::default(), &owner).await?;
        let mut owned = Secret::default();
        owned.metadata.name = Some("owned".into());
        owned.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: "owner".into(),
                uid: owner.metadata.uid.clone().context("owner has no uid")?,
                ..Default::default()
            },
        ]);
        secrets.create(&PostParams::default(), &owned).await?;
        maps.delete("owner", &DeleteParams::background()).await?;
        eventually(
            "the owned Secret to be collected",
            Duration::from_secs(60),
            || async { Ok(secrets.get_opt("owned").await?.is_none().then_some(())) },
        )
        .await
    })
    .await
}
