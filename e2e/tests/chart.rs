//! The Helm chart with the real helm and the real API server: lint, server-side dry run of the
//! rendered manifests, install / upgrade / uninstall, RBAC checked with SubjectAccessReview, and
//! a bad value refused by the schema.

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    apps::v1::Deployment,
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    core::v1::{Service, ServiceAccount},
    policy::v1::PodDisruptionBudget,
    rbac::v1::ClusterRole,
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use rolemesh_testkit::{ClusterEnv, cluster, in_namespace, install_crds, repo_root};

fn chart() -> String {
    repo_root()
        .join("charts/rolemesh")
        .to_string_lossy()
        .into_owned()
}

fn helm(env: &ClusterEnv, args: &[&str]) -> Result<std::process::Output> {
    env.run("helm", args, None)
}

/// `helm template` of the chart for the local cluster's Kubernetes version, each of `sets` a
/// `--set`; the manifests.
fn template(
    env: &ClusterEnv,
    release: &str,
    namespace: &str,
    sets: &[&str],
    extra: &[&str],
) -> Result<String> {
    let chart = chart();
    let mut args = vec![
        "template",
        release,
        &chart,
        "-n",
        namespace,
        "--kube-version",
        "1.34.4",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    args.extend_from_slice(extra);
    rolemesh_testkit::expect_success("helm", &["template"], &helm(env, &args)?)
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
        let manifests = template(
            &ns.env,
            &release,
            &ns.name,
            &[
                "authority.create=true",
                "authority.trustDomain=lint.example.com",
                "authority.signer.kms.keyId=arn:aws:kms:us-east-1:111122223333:key/lint",
                "authority.signer.kms.region=us-east-1",
                "serviceMonitor.enabled=false",
            ],
            &["--include-crds"],
        )?;
        for kind in [
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "MutatingWebhookConfiguration",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
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
        // The Prometheus Operator's objects (their CRDs are not on this cluster, so they are
        // checked as rendered): the labels kube-prometheus-stack selects on, and the proxies'
        // admin port by the name the webhook gives it.
        let monitors = template(
            &ns.env,
            &release,
            &ns.name,
            &[
                "serviceMonitor.enabled=true",
                "serviceMonitor.labels.release=kps",
                "podMonitor.enabled=true",
                "podMonitor.labels.release=kps",
            ],
            &[],
        )?;
        for kind in ["ServiceMonitor", "PodMonitor"] {
            let object = monitors
                .split("\n---")
                .find(|doc| doc.contains(&format!("kind: {kind}\n")))
                .with_context(|| format!("no {kind} rendered"))?;
            ensure!(
                object.contains("release: kps"),
                "{kind} carries its labels:\n{object}"
            );
        }
        ensure!(
            monitors.contains("port: rm-admin"),
            "the PodMonitor scrapes the proxies' admin port"
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

/// rolemesh as a subchart (dependency) of a parent chart that sets `global` values, as umbrella
/// charts do: the schema accepts them (helm/helm#10392), `global.priorityClassName` reaches the
/// pods, and the parent's rendering passes a server-side dry run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_works_as_a_subchart_of_a_parent_that_sets_globals() -> Result<()> {
    let env = cluster().await?;
    install_crds(&env).await?;
    in_namespace("chart-sub", |ns| async move {
        let parent = rolemesh_testkit::temp_dir("parent-chart");
        std::fs::create_dir_all(parent.join("charts"))?;
        std::fs::write(
            parent.join("Chart.yaml"),
            "apiVersion: v2\nname: platform\nversion: 1.0.0\ndependencies:\n  - name: rolemesh\n    version: \">=0.1.0-0\"\n",
        )?;
        std::fs::write(
            parent.join("values.yaml"),
            "global:\n  priorityClassName: system-cluster-critical\n  imageRegistry: registry.example.com\n\
             rolemesh:\n  authority:\n    create: true\n    trustDomain: platform.example.com\n    \
             signer: {type: kms, kms: {keyId: \"arn:aws:kms:eu-west-1:111122223333:key/platform\", region: eu-west-1}}\n",
        )?;
        let status = std::process::Command::new("cp")
            .args(["-r", &chart()])
            .arg(parent.join("charts/rolemesh"))
            .status()?;
        ensure!(status.success(), "copying the chart into the parent's charts/");
        let parent_dir = parent.to_str().context("parent path")?;
        let lint = helm(&ns.env, &["lint", "--strict", parent_dir])?;
        ensure!(
            lint.status.success(),
            "helm lint of the parent:\n{}{}",
            String::from_utf8_lossy(&lint.stdout),
            String::from_utf8_lossy(&lint.stderr)
        );
        let release = format!("rm{}", &ns.name[ns.name.len() - 8..]);
        let rendered = helm(
            &ns.env,
            &["template", &release, parent_dir, "-n", &ns.name, "--kube-version", "1.34.4"],
        )?;
        let manifests = rolemesh_testkit::expect_success("helm", &["template"], &rendered)?;
        ensure!(
            manifests.matches("priorityClassName: \"system-cluster-critical\"").count() == 2,
            "global.priorityClassName reaches the controller and the webhook:\n{manifests}"
        );
        let dry = ns.env.run(
            "kubectl",
            &["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"],
            Some(&manifests),
        )?;
        ensure!(
            dry.status.success(),
            "server-side dry run of the parent's rendering:\n{}",
            String::from_utf8_lossy(&dry.stderr)
        );
        std::fs::remove_dir_all(&parent)?;
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
        // The CRDs already exist (applied by the suite, not by helm): helm skips the chart's crds/.
        let install = helm(&ns.env, &["install", &release, &chart(), "-n", &ns.name,
            "--set", "webhook.url=https://127.0.0.1:1/mutate-pod", "--set-json", &confine,
            "--set-string", r"controller.serviceAccount.annotations.eks\.amazonaws\.com/role-arn=arn:aws:iam::111122223333:role/rolemesh-controller"])?;
        rolemesh_testkit::expect_success("helm", &["install"], &install)?;
        let deployments: Api<Deployment> = ns.api();
        let controller = format!("{release}-rolemesh-controller");
        ensure!(deployments.get(&controller).await?.spec.and_then(|s| s.replicas) == Some(2), "2 controller replicas");
        ensure!(deployments.get_opt(&format!("{release}-rolemesh-webhook")).await?.is_some());
        let notes = String::from_utf8_lossy(&install.stdout);
        ensure!(notes.contains("kubectl rolemesh status"), "NOTES tell the next step:\n{notes}");
        ensure!(notes.contains("Development mode"), "NOTES say the webhook URL is in use:\n{notes}");

        // Every object, with the values given.
        let accounts: Api<ServiceAccount> = ns.api();
        let controller_account = accounts.get(&controller).await?;
        ensure!(
            controller_account.metadata.annotations.unwrap_or_default().get("eks.amazonaws.com/role-arn").map(String::as_str)
                == Some("arn:aws:iam::111122223333:role/rolemesh-controller"),
            "the controller's ServiceAccount carries the IRSA annotation from values"
        );
        ensure!(accounts.get_opt(&format!("{release}-rolemesh-webhook")).await?.is_some());
        ensure!(ns.api::<Service>().get_opt(&format!("{release}-rolemesh-webhook")).await?.is_some(), "webhook Service");
        ensure!(ns.api::<PodDisruptionBudget>().get_opt(&format!("{release}-rolemesh-webhook")).await?.is_some(), "webhook PDB");
        let webhook_pod = deployments.get(&format!("{release}-rolemesh-webhook")).await?.spec.context("spec")?.template.spec.context("pod spec")?;
        let hardened = webhook_pod.containers[0].security_context.clone().context("securityContext")?;
        ensure!(
            hardened.run_as_non_root == Some(true) && hardened.read_only_root_filesystem == Some(true)
                && hardened.allow_privilege_escalation == Some(false),
            "hardened securityContext by default"
        );
        let configs: Api<MutatingWebhookConfiguration> = Api::all(ns.client.clone());
        let webhook_name = format!("{release}-rolemesh-webhook");
        let config = configs.get(&webhook_name).await?;
        let hooks = config.webhooks.clone().unwrap_or_default();
        ensure!(hooks.len() == 2, "one webhook per opt-in route (pod label, namespace label)");
        for hook in &hooks {
            ensure!(hook.client_config.url.as_deref() == Some("https://127.0.0.1:1/mutate-pod") && hook.client_config.service.is_none(), "development mode uses the URL");
            ensure!(hook.failure_policy.as_deref() == Some("Fail") && hook.side_effects == "None" && hook.reinvocation_policy.as_deref() == Some("IfNeeded"));
            ensure!(hook.timeout_seconds.is_some_and(|t| t <= 10) && hook.admission_review_versions == ["v1"]);
            let excluded = hook.namespace_selector.as_ref().and_then(|s| s.match_expressions.clone()).unwrap_or_default();
            ensure!(
                excluded.iter().any(|e| e.operator == "NotIn"
                    && e.values.as_ref().is_some_and(|v| v.contains(&"kube-system".to_string()) && v.contains(&ns.name))),
                "kube-system and the release namespace are never sent to the webhook"
            );
        }

        // The controller owns the caBundle: helm upgrade must not reset it.
        let ca_patch = serde_json::json!({"webhooks": [
            {"name": hooks[0].name, "clientConfig": {"caBundle": "Y2EtZnJvbS1jb250cm9sbGVy"}},
            {"name": hooks[1].name, "clientConfig": {"caBundle": "Y2EtZnJvbS1jb250cm9sbGVy"}}]});
        configs.patch(&webhook_name, &PatchParams::default(), &Patch::Strategic(&ca_patch)).await?;

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
        for (verb, group, resource) in [("create", "", "pods"), ("patch", "", "pods"), ("impersonate", "", "serviceaccounts"), ("escalate", "rbac.authorization.k8s.io", "roles"), ("bind", "rbac.authorization.k8s.io", "clusterroles"), ("create", "", "serviceaccounts/token")] {
            ensure!(!allowed(env, &webhook_sa, verb, group, resource, Some("default"), None).await?, "webhook must not {verb} {resource}");
        }
        // What the design requires and docs/security-model.md justifies: RBAC cannot select Secrets
        // by label, so the controller may list Secrets in any namespace (it only ever watches
        // app.kubernetes.io/managed-by=rolemesh). Asserted so a change here is a conscious one.
        ensure!(allowed(env, &controller_sa, "list", "", "secrets", Some("kube-system"), None).await?, "controller lists Secrets cluster-wide (documented)");
        ensure!(!allowed(env, &controller_sa, "patch", "", "serviceaccounts", Some("default"), None).await?, "controller never edits ServiceAccounts (their role annotation)");
        ensure!(!allowed(env, &controller_sa, "update", "rolemesh.dev", "mtlspolicies", Some("default"), None).await?, "controller never rewrites a policy's spec");
        // Pods and Services: listed and watched (pods for the stale-pod report and, with Services,
        // for the DNS names of certificates); never read one by one or changed.
        for resource in ["pods", "services"] {
            for verb in ["list", "watch"] {
                ensure!(allowed(env, &controller_sa, verb, "", resource, Some("default"), None).await?, "controller may {verb} {resource}");
            }
            for verb in ["get", "create", "patch", "delete"] {
                ensure!(!allowed(env, &controller_sa, verb, "", resource, Some("default"), None).await?, "controller must not {verb} {resource}");
            }
        }

        // Upgrade with a changed value.
        let upgrade = helm(&ns.env, &["upgrade", &release, &chart(), "-n", &ns.name, "--reuse-values", "--set", "controller.replicas=1"])?;
        rolemesh_testkit::expect_success("helm", &["upgrade"], &upgrade)?;
        ensure!(deployments.get(&controller).await?.spec.and_then(|s| s.replicas) == Some(1), "upgrade applied");
        for hook in configs.get(&webhook_name).await?.webhooks.unwrap_or_default() {
            ensure!(
                hook.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) == Some(b"ca-from-controller".as_slice()),
                "helm upgrade kept the caBundle the controller wrote ({})",
                hook.name
            );
        }

        // A bad value is refused by the schema, naming it.
        let bad = helm(&ns.env, &["upgrade", &release, &chart(), "-n", &ns.name, "--reuse-values", "--set", "logFormat=xml"])?;
        let stderr = String::from_utf8_lossy(&bad.stderr);
        ensure!(!bad.status.success() && stderr.contains("logFormat"), "schema must refuse logFormat=xml:\n{stderr}");
        let bad = helm(&ns.env, &["upgrade", &release, &chart(), "-n", &ns.name, "--reuse-values", "--set", "webhook.timeoutSeconds=90"])?;
        ensure!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("timeoutSeconds"));

        let bad = helm(&ns.env, &["upgrade", &release, &chart(), "-n", &ns.name, "--reuse-values", "--set", "authority.create=true", "--set", "authority.signer.type=kms"])?;
        let stderr = String::from_utf8_lossy(&bad.stderr);
        ensure!(!bad.status.success() && stderr.contains("/authority/signer/kms/keyId"), "a KMS authority without a key is refused:\n{stderr}");
        // No trust domain is a default: the chart asks for one, saying why.
        let bad = helm(&ns.env, &["upgrade", &release, &chart(), "-n", &ns.name, "--reuse-values", "--set", "authority.create=true", "--set", "authority.signer.type=local"])?;
        let stderr = String::from_utf8_lossy(&bad.stderr);
        ensure!(!bad.status.success() && stderr.contains("authority.trustDomain is required"), "an authority without a trust domain is refused:\n{stderr}");

        // Uninstall removes everything it created.
        rolemesh_testkit::expect_success("helm", &["uninstall"], &helm(&ns.env, &["uninstall", &release, "-n", &ns.name, "--wait"])?)?;
        ensure!(deployments.get_opt(&controller).await?.is_none(), "deployment removed");
        let roles: Api<ClusterRole> = Api::all(ns.client.clone());
        ensure!(roles.get_opt(&format!("{release}-rolemesh-controller")).await?.is_none(), "cluster role removed");
        ensure!(configs.get_opt(&format!("{release}-rolemesh-webhook")).await?.is_none(), "webhook configuration removed");
        ensure!(roles.get_opt(&format!("{release}-rolemesh-webhook")).await?.is_none(), "webhook cluster role removed");
        ensure!(accounts.get_opt(&controller).await?.is_none(), "ServiceAccounts removed");
        ensure!(ns.api::<Service>().get_opt(&webhook_name).await?.is_none(), "Service removed");
        ensure!(ns.api::<PodDisruptionBudget>().get_opt(&webhook_name).await?.is_none(), "PDB removed");
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
        "docs/reference.md lacks (run `make docs`):\n{}",
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
