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
    repo_root().join("charts/rolemesh").to_string_lossy().into_owned()
}

fn helm(env: &ClusterEnv, args: &[&str]) -> Result<std::process::Output> {
    env.run("helm", args, None)
}

/// Confines the webhook registration to one namespace, so that this release's Fail-policy
/// webhook (pointing at nothing) never meets other tests' pods.
fn confined(namespace: &str) -> String {
    format!(r#"webhook.namespaceSelectorExtra=[{{"key":"kubernetes.io/metadata.name","operator":"In","values":["{namespace}-none"]}}]"#)
}

async fn allowed(env: &ClusterEnv, user: &str, verb: &str, group: &str, resource: &str, namespace: Option<&str>, name: Option<&str>) -> Result<bool> {
    let client = env.client().await?;
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_string()),
            groups: Some(vec!["system:serviceaccounts".into(), "system:authenticated".into()]),
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
    let answer = Api::<SubjectAccessReview>::all(client).create(&PostParams::default(), &review).await?;
    Ok(answer.status.map(|s| s.allowed).unwrap_or(false))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_lint_is_clean_and_the_rendered_chart_passes_a_server_side_dry_run() -> Result<()> {
    let env = cluster().await?;
    install_crds(&env).await?;
    let lint = helm(&env, &["lint", "--strict", &chart()])?;
    let out = String::from_utf8_lossy(&lint.stdout);
    ensure!(lint.status.success() && !out.contains("[WARNING]") && !out.contains("[ERROR]"), "helm lint:\n{out}");
    in_namespace("chart-dry", |ns| async move {
        let rendered = helm(&ns.env, &["template", "rolemesh", &chart(), "-n", &ns.name, "--kube-version", "1.34.4",
            "--set", "authority.create=true", "--set", "serviceMonitor.enabled=false", "--set", "crds.keep=true"])?;
        let manifests = rolemesh_tests::expect_success("helm", &["template"], &rendered)?;
        ensure!(manifests.contains("helm.sh/resource-policy: keep"), "crds.keep keeps the CRDs on uninstall");
        for kind in ["Deployment", "Service", "PodDisruptionBudget", "MutatingWebhookConfiguration", "ClusterRole", "Role", "ServiceAccount", "MTLSAuthority", "CustomResourceDefinition"] {
            ensure!(manifests.contains(&format!("kind: {kind}\n")), "the chart renders a {kind}");
        }
        ensure!(manifests.contains("failurePolicy: Fail") && manifests.contains("sideEffects: None") && manifests.contains("reinvocationPolicy: IfNeeded"));
        let dry = ns.env.run("kubectl", &["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"], Some(&manifests))?;
        let text = format!("{}{}", String::from_utf8_lossy(&dry.stdout), String::from_utf8_lossy(&dry.stderr));
        ensure!(dry.status.success(), "server-side dry run refused the chart:\n{text}");
        ensure!(text.matches("(server dry run)").count() >= 15, "every object went through the dry run:\n{text}");
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
