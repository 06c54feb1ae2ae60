//! The Helm chart with the real helm and the real API server: lint, server-side dry run of the
//! rendered manifests, install / upgrade / uninstall, RBAC checked with SubjectAccessReview, and
//! a bad value refused by the schema.

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::{
    apps::v1::Deployment,
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    rbac::v1::ClusterRole,
};
use kube::{Api, api::PostParams};
use rolemesh_tests::{ClusterEnv, cluster, in_namespace, install_crds, repo_root};

fn chart() -> String {
    repo_root()
        .join("charts/rolemesh")
        .to_string_lossy()
        .into_owned()
}

fn helm(env: &ClusterEnv, args: &[&str]) -> Result<std::process::Output> {
    env.run("helm", args, None)
}

/// Confines the webhook registration to one namespace, so that this release's Fail-policy
/// webhook (pointing at nothing) never meets other tests' pods.
fn confined(namespace: &str) -> String {
    format!(
        r#"webhook.namespaceSelectorExtra=[{{"key":"kubernetes.io/metadata.name","operator":"In","values":["{namespace}-none"]}}]"#
    )
}

async fn allowed(
    env: &ClusterEnv,
    user: &str,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> Result<bool> {
    let client = env.client().await?;
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_string()),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.split('/').next().unwrap_or(resource).into()),
                subresource: resource.split('/').nth(1).map(String::from),
                namespace: namespace.map(String::from),
                name: name.map(String::from),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client)
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.map(|s| s.allowed).unwrap_or(false))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_lint_is_clean_and_the_rendered_chart_passes_a_server_side_dry_run() -> Result<()> {
    let env = cluster().await?;
    install_crds(&env).await?;
    let lint = helm(&env, &["lint", "--strict", &chart()])?;
    let out = String::from_utf8_lossy(&lint.stdout);
    ensure!(
        lint.status.success() && !out.contains("[WARNING]") && !out.contains("[ERROR]"),
        "helm lint:\n{out}"
    );
    in_namespace("chart-dry", |ns| async move {
        // A release name of its own: cluster-scoped objects (ClusterRoles, the webhook
        // configuration) of a real `rolemesh` release may exist and must not be merged with.
        let release = format!("rm{}", &ns.name[ns.name.len() - 8..]);
        let rendered = helm(
            &ns.env,
            &[
                "template",
                &release,
                &chart(),
                "-n",
                &ns.name,
                "--kube-version",
                "1.34.4",
                "--set",
                "authority.create=true",
                "--set",
                "serviceMonitor.enabled=false",
                "--set",
                "crds.keep=true",
            ],
        )?;
        let manifests = rolemesh_tests::expect_success("helm", &["template"], &rendered)?;
        ensure!(
            manifests.contains("helm.sh/resource-policy: keep"),
            "crds.keep keeps the CRDs on uninstall"
        );
        for kind in [
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "MutatingWebhookConfiguration",
            "ClusterRole",
            "Role",
            "ServiceAccount",
            "MTLSAuthority",
            "CustomResourceDefinition",
        ] {
            ensure!(
                manifests.contains(&format!("kind: {kind}\n")),
                "the chart renders a {kind}"
            );
        }
        ensure!(
            manifests.contains("failurePolicy: Fail")
                && manifests.contains("sideEffects: None")
                && manifests.contains("reinvocationPolicy: IfNeeded")
        );
        let dry = ns.env.run(
            "kubectl",
            &["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"],
            Some(&manifests),
        )?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&dry.stdout),
            String::from_utf8_lossy(&dry.stderr)
        );
        ensure!(
            dry.status.success(),
            "server-side dry run refused the chart:\n{text}"
        );
        ensure!(
            text.matches("(server dry run)").count() >= 15,
            "every object went through the dry run:\n{text}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_upgrade_uninstall_and_least_privilege() -> Result<()> {
    let env = cluster().await?;
    install_crds(&env).await?;
    in_namespace("chart", |ns| async move {
        let release = format!("rm{}", &ns.name[ns.name.len() - 8..]);
        let confine = confined(&ns.name);
        // The CRDs already exist (installed by the suite, not by helm), so this release leaves them out.
        let install = helm(&ns.env, &["install", &release, &chart(), "-n", &ns.name, "--set", "crds.enabled=false",
            "--set", "webhook.url=https://127.0.0.1:1/mutate-pod", "--set-json", &confine])?;
        rolemesh_tests::expect_success("helm", &["install"], &install)?;
        let deployments: Api<Deployment> = ns.api();
        let controller = format!("{release}-rolemesh-controller");
        ensure!(deployments.get(&controller).await?.spec.and_then(|s| s.replicas) == Some(2), "2 controller replicas");
        ensure!(deployments.get_opt(&format!("{release}-rolemesh-webhook")).await?.is_some());
        let notes = String::from_utf8_lossy(&install.stdout);
        ensure!(notes.contains("kubectl rolemesh status"), "NOTES tell the next step:\n{notes}");

        // Least privilege, asked of the API server.
        let controller_sa = format!("system:serviceaccount:{}:{release}-rolemesh-controller", ns.name);
        let webhook_sa = format!("system:serviceaccount:{}:{release}-rolemesh-webhook", ns.name);
        let env = &ns.env;
        ensure!(allowed(env, &controller_sa, "create", "", "serviceaccounts/token", Some("default"), Some("x")).await?, "controller mints verification tokens");
        ensure!(allowed(env, &controller_sa, "patch", "rolemesh.dev", "mtlspolicies/status", Some("default"), None).await?);
        ensure!(allowed(env, &controller_sa, "create", "", "secrets", Some("default"), None).await?);
        ensure!(allowed(env, &controller_sa, "update", "coordination.k8s.io", "leases", Some(&ns.name), None).await?);
        ensure!(!allowed(env, &controller_sa, "update", "coordination.k8s.io", "leases", Some("default"), None).await?, "leases only in its namespace");
        ensure!(allowed(env, &controller_sa, "patch", "admissionregistration.k8s.io", "mutatingwebhookconfigurations", None, Some(&format!("{release}-rolemesh-webhook"))).await?);
        ensure!(!allowed(env, &controller_sa, "patch", "admissionregistration.k8s.io", "mutatingwebhookconfigurations", None, Some("someone-else")).await?, "no other webhook configuration");
        for (verb, group, resource) in [("create", "", "pods"), ("impersonate", "", "users"), ("escalate", "rbac.authorization.k8s.io", "clusterroles"), ("bind", "rbac.authorization.k8s.io", "clusterroles"), ("delete", "rolemesh.dev", "mtlspolicies")] {
            ensure!(!allowed(env, &controller_sa, verb, group, resource, Some("default"), None).await?, "controller must not {verb} {resource}");
        }
        ensure!(allowed(env, &webhook_sa, "get", "", "secrets", Some(&ns.name), Some("rolemesh-webhook-tls")).await?, "webhook reads its serving certificate");
        ensure!(!allowed(env, &webhook_sa, "get", "", "secrets", Some(&ns.name), Some("rolemesh-ca-key")).await?, "but not the CA key");
        ensure!(!allowed(env, &webhook_sa, "list", "", "secrets", Some("default"), None).await?, "nor Secrets elsewhere");
        ensure!(!allowed(env, &webhook_sa, "update", "rolemesh.dev", "mtlspolicies", Some("default"), None).await?, "the webhook only reads");

        // Upgrade with a changed value.
        let upgrade = helm(&ns.env, &["upgrade", &release, &chart(), "-n", &ns.name, "--reuse-values", "--set", "controller.replicas=1"])?;
        rolemesh_tests::expect_success("helm", &["upgrade"], &upgrade)?;
        ensure!(deployments.get(&controller).await?.spec.and_then(|s| s.replicas) == Some(1), "upgrade applied");

        // A bad value is refused by the schema, naming it.
        let bad = helm(&ns.env, &["upgrade", &release, &chart(), "-n", &ns.name, "--reuse-values", "--set", "logFormat=xml"])?;
        let stderr = String::from_utf8_lossy(&bad.stderr);
        ensure!(!bad.status.success() && stderr.contains("logFormat"), "schema must refuse logFormat=xml:\n{stderr}");
        let bad = helm(&ns.env, &["upgrade", &release, &chart(), "-n", &ns.name, "--reuse-values", "--set", "webhook.timeoutSeconds=90"])?;
        ensure!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("timeoutSeconds"));

        // Uninstall removes everything it created.
        rolemesh_tests::expect_success("helm", &["uninstall"], &helm(&ns.env, &["uninstall", &release, "-n", &ns.name, "--wait"])?)?;
        ensure!(deployments.get_opt(&controller).await?.is_none(), "deployment removed");
        let roles: Api<ClusterRole> = Api::all(ns.client.clone());
        ensure!(roles.get_opt(&format!("{release}-rolemesh-controller")).await?.is_none(), "cluster role removed");
        let configs: Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> = Api::all(ns.client.clone());
        ensure!(configs.get_opt(&format!("{release}-rolemesh-webhook")).await?.is_none(), "webhook configuration removed");
        let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> = Api::all(ns.client.clone());
        ensure!(crds.get_opt("mtlspolicies.rolemesh.dev").await?.is_some(), "the CRDs stay");
        Ok(())
    })
    .await
    .context("chart install test")
}

/// Collects every field path below `node` (an OpenAPI v3 schema) as `spec.inbound[].port`.
fn field_paths(node: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    if let Some(properties) = node.get("properties").and_then(|p| p.as_object()) {
        for (name, child) in properties {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            if matches!(path.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            out.push(path.clone());
            field_paths(child, &path, out);
            if let Some(items) = child.get("items") {
                field_paths(items, &format!("{path}[]"), out);
            }
        }
    }
}

/// docs/reference.md is generated from the CRDs; this keeps it from falling behind them.
#[test]
fn docs_reference_names_every_crd_field() -> Result<()> {
    let reference = std::fs::read_to_string(repo_root().join("docs/reference.md"))?;
    let mut missing = Vec::new();
    let mut checked = 0;
    for crd in rolemesh_crds::crds() {
        let kind = crd.spec.names.kind.clone();
        ensure!(
            reference.contains(&format!("## {kind}")),
            "docs/reference.md has no section for {kind}"
        );
        for version in &crd.spec.versions {
            let schema = serde_json::to_value(
                version
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref()),
            )?;
            let mut paths = Vec::new();
            field_paths(&schema, "", &mut paths);
            for path in paths {
                checked += 1;
                if !reference.contains(&format!("`{path}`")) {
                    missing.push(format!("{kind} {path}"));
                }
            }
        }
    }
    ensure!(checked > 40, "only {checked} fields found in the CRDs");
    ensure!(
        missing.is_empty(),
        "docs/reference.md lacks (run `python3 docs/gen_reference.py > docs/reference.md`):\n{}",
        missing.join("\n")
    );
    Ok(())
}

/// The docs justify each broad RBAC rule, explain the common failure reasons by name, and give
/// the AWS permissions the install needs.
#[test]
fn docs_cover_the_chart_rbac_and_runbook() -> Result<()> {
    let read = |p: &str| std::fs::read_to_string(repo_root().join(p));
    let security = read("docs/security-model.md")?;
    for must in [
        "serviceaccounts/token",
        "secrets",
        "configmaps",
        "mutatingwebhookconfigurations",
        "leases",
        "RBAC cannot restrict by label",
    ] {
        ensure!(
            security.contains(must),
            "docs/security-model.md must justify the {must} rule"
        );
    }
    let runbook = read("docs/operations.md")?;
    for reason in [
        "MissingRoleAnnotation",
        "StsRefused",
        "RoleMismatch",
        "SignerAccessDenied",
        "SignerThrottled",
        "SignerUnavailable",
        "AuthorityMissing",
    ] {
        ensure!(
            runbook.contains(reason),
            "docs/operations.md must explain {reason}"
        );
    }
    let install = read("docs/install-eks.md")?;
    for must in [
        "ECC_NIST_P256",
        "kms:Sign",
        "kms:GetPublicKey",
        "sts:AssumeRoleWithWebIdentity",
        "eks.amazonaws.com/role-arn",
    ] {
        ensure!(
            install.contains(must),
            "docs/install-eks.md must mention {must}"
        );
    }
    Ok(())
}
