//! `kubectl rolemesh` as a kubectl plugin: first against objects the test writes itself, status
//! subresource included, so the plugin's contract (columns, JSON/YAML fields, annotations, exit
//! codes) is checked without a controller; then every subcommand against live objects and
//! certificates the real controller keeps.

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{
    ResourceExt,
    api::{Patch, PatchParams},
};
use rolemesh_crds::MTLSPolicy;
use rolemesh_e2e::*;
use rolemesh_testkit::{TestNamespace, cluster, in_namespace, install_crds, temp_dir};
use serde_json::json;

/// Runs `kubectl rolemesh ARGS` with the project's kubectl and the plugin on PATH; returns the
/// exit code, stdout and stderr.
fn kubectl_rolemesh(ns: &TestNamespace, args: &[&str]) -> Result<(i32, String, String)> {
    ns.env.kubectl_plugin(args)
}

const ROLE: &str = "arn:aws:iam::111122223333:role/web";

async fn policy_with_status(ns: &TestNamespace) -> Result<()> {
    let manifest = format!(
        "apiVersion: rolemesh.dev/v1alpha1\nkind: MTLSPolicy\nmetadata: {{name: p, namespace: {ns}}}\n\
         spec:\n  serviceAccounts: {{names: [web, api]}}\n",
        ns = ns.name
    );
    rolemesh_testkit::expect_success(
        "kubectl",
        &["apply"],
        &ns.env.kubectl_apply(&ns.name, &manifest)?,
    )?;
    ns.env
        .kubectl(&["create", "serviceaccount", "web", "-n", &ns.name])?;
    // What the controller would write; the plugin only reads it.
    let status = json!({ "status": {
        "coveredServiceAccounts": 2,
        "workloads": [
            { "serviceAccount": "web", "roleArn": ROLE, "spiffeId": format!("spiffe://plugin.test/ns/{}/sa/web", ns.name),
              "verified": true, "reason": "Issued", "secretName": "web-rolemesh-tls", "serial": "0a1b2c3d4e5f",
              "notBefore": "2030-01-01T00:00:00Z", "notAfter": "2030-01-02T00:00:00Z" },
            { "serviceAccount": "api", "verified": false, "reason": "MissingRoleAnnotation",
              "message": "annotate the ServiceAccount with eks.amazonaws.com/role-arn" }
        ],
        "pods": { "generations": [{ "generation": 1, "pods": 2 }], "staleCount": 1,
                  "stale": [{ "name": "web-7f9", "generation": 1, "reason": "PortsChanged" }] }
    }});
    ns.api::<MTLSPolicy>()
        .patch_status("p", &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_subcommands_and_exit_codes_on_hand_written_objects() -> Result<()> {
    let env = cluster().await?;
    install_crds(&env).await?;
    in_namespace("plugin-cli", |ns| async move {
        // Nothing there yet: "not found" is exit 3, for every subcommand that looks something up.
        for args in [
            vec!["status", "-n", ns.name.as_str()],
            vec!["trust-bundle", "-n", ns.name.as_str()],
            vec!["rotate", "p", "-n", ns.name.as_str()],
            vec!["inspect", "web-rolemesh-tls", "-n", ns.name.as_str()],
        ] {
            let (code, _, err) = kubectl_rolemesh(&ns, &args)?;
            ensure!(code == 3, "{args:?} on an empty namespace: exit {code} (want 3): {err}");
            ensure!(err.starts_with("error: "), "errors go to stderr, prefixed: {err}");
        }
        for args in [vec!["frobnicate"], vec!["status", "-o", "xml"], vec!["rotate"]] {
            let (code, _, _) = kubectl_rolemesh(&ns, &args)?;
            ensure!(code == 2, "{args:?} is a usage error: exit {code} (want 2)");
        }
        let (code, help, _) = kubectl_rolemesh(&ns, &["--help"])?;
        ensure!(code == 0 && help.contains("Exit codes"), "--help documents the exit codes:\n{help}");

        policy_with_status(&ns).await?;

        // status: a table per identity, and the same rows as JSON and YAML.
        let (code, table, err) = kubectl_rolemesh(&ns, &["status", "-n", &ns.name])?;
        ensure!(code == 0, "status: {err}");
        let header = table.lines().next().unwrap_or_default();
        for column in ["NAMESPACE", "POLICY", "SERVICEACCOUNT", "ROLE", "VERIFIED", "REASON", "SERIAL", "EXPIRES"] {
            ensure!(header.contains(column), "status table lacks {column}:\n{table}");
        }
        let web = table.lines().find(|l| l.contains(" web ")).context(table.clone())?;
        ensure!(web.contains(ROLE) && web.contains("true") && web.contains("0a1b2c3d4e5f") && web.contains("2030-01-02"), "{web}");
        let api = table.lines().find(|l| l.contains(" api ")).context(table.clone())?;
        ensure!(api.contains("false") && api.contains("MissingRoleAnnotation"), "{api}");

        // Stale pods (their ports changed since injection) follow the identities, and alone with --pods.
        let stale = table.lines().find(|l| l.contains("web-7f9")).context(table.clone())?;
        ensure!(table.contains("STALE POD") && stale.contains("PortsChanged") && stale.contains(" 1 "), "{table}");
        let (code, out, err) = kubectl_rolemesh(&ns, &["status", "-n", &ns.name, "--pods", "-o", "json"])?;
        let pods: serde_json::Value = serde_json::from_str(&out).context(format!("{out}{err}"))?;
        ensure!(code == 0 && pods.as_array().map(Vec::len) == Some(1), "{pods}");
        ensure!(pods[0]["pod"] == "web-7f9" && pods[0]["generation"] == 1 && pods[0]["reason"] == "PortsChanged", "{pods}");
        let (code, out, _) = kubectl_rolemesh(&ns, &["status", "-n", &ns.name, "-o", "json"])?;
        let rows: serde_json::Value = serde_json::from_str(&out).context(out.clone())?;
        ensure!(code == 0 && rows.as_array().map(Vec::len) == Some(2), "{rows}");
        let web = rows.as_array().into_iter().flatten().find(|r| r["serviceAccount"] == "web").context("web row")?;
        ensure!(web["roleArn"] == ROLE && web["verified"] == true && web["serial"] == "0a1b2c3d4e5f", "{web}");
        ensure!(web["spiffeId"] == format!("spiffe://plugin.test/ns/{}/sa/web", ns.name).as_str(), "{web}");
        let (code, yaml, _) = kubectl_rolemesh(&ns, &["status", "-n", &ns.name, "-o", "yaml"])?;
        ensure!(code == 0 && yaml.contains("serviceAccount: api") && yaml.contains("reason: MissingRoleAnnotation"), "{yaml}");
        let (code, all, _) = kubectl_rolemesh(&ns, &["status", "-A"])?;
        ensure!(code == 0 && all.contains(&ns.name), "status -A lists this namespace too:\n{all}");

        // rotate: an RFC 3339 timestamp annotation on the policy, or on one ServiceAccount.
        let (code, out, err) = kubectl_rolemesh(&ns, &["rotate", "p", "-n", &ns.name])?;
        ensure!(code == 0 && out.contains("rolemesh.dev/rotate"), "rotate: {out}{err}");
        let policy = ns.api::<MTLSPolicy>().get("p").await?;
        let stamp = policy.annotations().get("rolemesh.dev/rotate").cloned().context("policy annotation")?;
        ensure!(serde_json::from_value::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>(json!(stamp)).is_ok(), "not RFC 3339: {stamp}");
        let (code, _, err) = kubectl_rolemesh(&ns, &["rotate", "p", "-n", &ns.name, "--service-account", "web"])?;
        ensure!(code == 0, "rotate --service-account: {err}");
        let account = ns.api::<ServiceAccount>().get("web").await?;
        ensure!(account.annotations().contains_key("rolemesh.dev/rotate"), "ServiceAccount annotated");
        let (code, _, err) = kubectl_rolemesh(&ns, &["rotate", "p", "-n", &ns.name, "--service-account", "nobody"])?;
        ensure!(code == 3 && err.contains("nobody"), "missing ServiceAccount: exit {code}: {err}");

        // trust-bundle: prints ca.crt of the namespace's bundle exactly.
        let bundle = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let manifest = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: rolemesh-trust-bundle}}\ndata:\n  ca.crt: |\n    {}\n",
            bundle.trim_end().replace('\n', "\n    ")
        );
        rolemesh_testkit::expect_success("kubectl", &["apply"], &ns.env.kubectl_apply(&ns.name, &manifest)?)?;
        let (code, printed, err) = kubectl_rolemesh(&ns, &["trust-bundle", "-n", &ns.name])?;
        ensure!(code == 0 && printed == bundle, "trust-bundle printed {printed:?} ({err})");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_plugin_subcommand_against_live_objects() -> Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let env = cluster().await?;
    install_crds(&env).await?;
    in_namespace("plugin", |ns| async move {
        let authority = create_authority(&ns, local_authority_spec("plugin.test", "sts")).await?;
        let result = async {
            let role = ns
                .env
                .create_irsa_role(&unique("web"), &ns.name, "web")
                .await?;
            apply_service_account(&ns, "web", Some(&role)).await?;
            apply_policy(&ns, "p", json!({ "serviceAccounts": { "names": ["web"] } })).await?;
            let _controller = ControllerProcess::start(&ns, &authority, "replica-a", &[])?;
            let (_, first) = wait_for_secret(&ns, "web-rolemesh-tls", None).await?;
            wait_for_workload(&ns, "p", "web", |w| {
                w.serial.as_deref() == Some(first.serial_hex.as_str())
            })
            .await?;

            // status: a table and JSON with identity, role, verification, serial, expiry.
            let (code, table, err) = kubectl_rolemesh(&ns, &["status", "-n", &ns.name])?;
            ensure!(code == 0, "status failed: {err}");
            ensure!(
                table.contains("SERVICEACCOUNT")
                    && table.contains("web")
                    && table.contains(&role)
                    && table.contains(&first.serial_hex),
                "{table}"
            );
            let (_, json_out, _) =
                kubectl_rolemesh(&ns, &["status", "-n", &ns.name, "-o", "json"])?;
            let rows: serde_json::Value = serde_json::from_str(&json_out)?;
            ensure!(
                rows[0]["verified"] == true && rows[0]["roleArn"] == role.as_str(),
                "{rows}"
            );
            let (_, yaml_out, _) =
                kubectl_rolemesh(&ns, &["status", "-n", &ns.name, "-o", "yaml"])?;
            ensure!(yaml_out.contains("serviceAccount: web"), "{yaml_out}");

            // inspect: the Secret decodes and its chain verifies against the authority's bundle.
            let (code, inspected, err) = kubectl_rolemesh(
                &ns,
                &[
                    "inspect",
                    "web-rolemesh-tls",
                    "-n",
                    &ns.name,
                    "--authority",
                    &authority,
                ],
            )?;
            ensure!(code == 0, "inspect failed: {inspected}{err}");
            ensure!(
                inspected.contains(&format!("spiffe://plugin.test/ns/{}/sa/web", ns.name))
                    && inspected.contains(&format!(
                        "chain verifies against the trust bundle of MTLSAuthority {authority}"
                    )),
                "{inspected}"
            );
            // A certificate under a CA the tenant wrote into its own Secret's ca.crt and its own
            // namespace's trust bundle copy does not verify: those copies are not what inspect
            // trusts.
            let forged_ca_key = rcgen::KeyPair::generate()?;
            let mut forged_ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
            forged_ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let forged_ca_cert = forged_ca.self_signed(&forged_ca_key)?;
            let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new())?;
            leaf.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
                format!("spiffe://plugin.test/ns/{}/sa/admin", ns.name),
            )?)];
            leaf.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let forged_leaf = leaf.signed_by(
                &rcgen::KeyPair::generate()?,
                &rcgen::Issuer::from_params(&forged_ca, &forged_ca_key),
            )?;
            let secrets = kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(
                ns.client.clone(),
                &ns.name,
            );
            let forged_secret: k8s_openapi::api::core::v1::Secret =
                serde_json::from_value(json!({
                    "metadata": { "name": "admin-rolemesh-tls" },
                    "stringData": {
                        "tls.crt": forged_leaf.pem(),
                        "ca.crt": forged_ca_cert.pem(),
                    },
                }))?;
            secrets
                .create(&kube::api::PostParams::default(), &forged_secret)
                .await?;
            let copy = trust_bundle(&ns).await?;
            ns.env.kubectl(&[
                "patch",
                "configmap",
                "rolemesh-trust-bundle",
                "-n",
                &ns.name,
                "--type=merge",
                "-p",
                &json!({ "data": { "ca.crt": format!("{copy}{}", forged_ca_cert.pem()) } })
                    .to_string(),
            ])?;
            let (code, refused, err) = kubectl_rolemesh(
                &ns,
                &[
                    "inspect",
                    "admin-rolemesh-tls",
                    "-n",
                    &ns.name,
                    "--authority",
                    &authority,
                ],
            )?;
            ensure!(
                code == 1 && refused.contains("does not verify"),
                "a certificate under a tenant's own CA must not verify: exit {code}: {refused}{err}"
            );

            // trust-bundle: what the namespace's ConfigMap holds.
            let (code, bundle, _) = kubectl_rolemesh(&ns, &["trust-bundle", "-n", &ns.name])?;
            ensure!(
                code == 0 && bundle == trust_bundle(&ns).await?,
                "trust-bundle printed something else"
            );
            let dir = temp_dir("plugin");
            std::fs::write(
                dir.join("other-ca.pem"),
                rcgen::CertificateParams::new(vec!["x".into()])?
                    .self_signed(&rcgen::KeyPair::generate()?)?
                    .pem(),
            )?;
            let secret = kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(
                ns.client.clone(),
                &ns.name,
            )
            .get("web-rolemesh-tls")
            .await?;
            std::fs::write(dir.join("tls.crt"), field(&secret, "tls.crt"))?;
            let other = dir.join("other-ca.pem");
            let (code, refused, _) = kubectl_rolemesh(
                &ns,
                &[
                    "inspect",
                    "--file",
                    &dir.join("tls.crt").to_string_lossy(),
                    "--ca-file",
                    &other.to_string_lossy(),
                ],
            )?;
            ensure!(
                code == 1 && refused.contains("does not verify"),
                "a foreign bundle must fail the chain check: {code} {refused}"
            );
            let _ = std::fs::remove_dir_all(&dir);

            // rotate: the whole policy, then one ServiceAccount; each gives a new serial.
            let (code, out, err) = kubectl_rolemesh(&ns, &["rotate", "p", "-n", &ns.name])?;
            ensure!(code == 0, "rotate failed: {out}{err}");
            let (_, second) =
                wait_for_secret(&ns, "web-rolemesh-tls", Some(&first.serial_hex)).await?;
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
            let (code, _, err) = kubectl_rolemesh(
                &ns,
                &["rotate", "p", "-n", &ns.name, "--service-account", "web"],
            )?;
            ensure!(code == 0, "rotate --service-account failed: {err}");
            let (_, third) =
                wait_for_secret(&ns, "web-rolemesh-tls", Some(&second.serial_hex)).await?;

            // rotate --all -l SELECTOR --wait: every policy the selector picks, and back only
            // when the status shows the new serial; a selector that picks none is "not found".
            ns.env
                .kubectl(&["label", "mtlspolicy", "p", "-n", &ns.name, "team=payments"])?;
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
            let (code, out, err) = kubectl_rolemesh(
                &ns,
                &[
                    "rotate",
                    "--all",
                    "-l",
                    "team=payments",
                    "--wait",
                    "--timeout",
                    "2m",
                    "-n",
                    &ns.name,
                ],
            )?;
            ensure!(
                code == 0 && out.contains("new certificates issued after"),
                "rotate --all --wait: exit {code}: {out}{err}"
            );
            let status = ns
                .api::<MTLSPolicy>()
                .get("p")
                .await?
                .status
                .context("status")?;
            let serial = status
                .workloads
                .iter()
                .find(|w| w.service_account == "web")
                .and_then(|w| w.serial.clone());
            ensure!(
                serial.is_some() && serial.as_deref() != Some(third.serial_hex.as_str()),
                "--wait returned before the status showed a new serial: {serial:?}"
            );
            let (code, _, err) = kubectl_rolemesh(
                &ns,
                &["rotate", "--all", "-l", "team=nobody", "-n", &ns.name],
            )?;
            ensure!(
                code == 3 && err.contains("matching team=nobody"),
                "exit {code}: {err}"
            );
            let (code, _, _) = kubectl_rolemesh(&ns, &["rotate", "p", "--all"])?;
            ensure!(
                code == 2,
                "a policy name and --all is a usage error, got {code}"
            );

            // completion: a script for each shell that names the subcommands.
            for shell in ["bash", "zsh", "fish"] {
                let (code, script, err) = kubectl_rolemesh(&ns, &["completion", shell])?;
                ensure!(
                    code == 0
                        && script.contains("kubectl-rolemesh")
                        && script.contains("trust-bundle"),
                    "completion {shell}: exit {code}: {err}"
                );
            }
            // Help on every flag of every subcommand.
            for command in [
                "status",
                "rotate",
                "inspect",
                "trust-bundle",
                "ca",
                "revoke",
                "unblock",
                "check",
                "version",
                "identity",
                "can",
                "completion",
            ] {
                let (code, help, err) = kubectl_rolemesh(&ns, &[command, "--help"])?;
                ensure!(code == 0, "{command} --help: {err}");
                ensure!(
                    flags_without_help(&help).is_empty(),
                    "{command}: flags without help text: {:?}\n{help}",
                    flags_without_help(&help)
                );
            }

            // Scripts can tell "not found" from other errors.
            let (code, _, err) = kubectl_rolemesh(&ns, &["rotate", "missing", "-n", &ns.name])?;
            ensure!(code == 3 && err.contains("not found"), "exit {code}: {err}");
            let (code, _, _) = kubectl_rolemesh(&ns, &["frobnicate"])?;
            ensure!(code == 2, "usage errors exit 2, got {code}");
            Ok(())
        }
        .await;
        delete_authority(&ns, &authority).await;
        result
    })
    .await
}

/// kubectl's connection flags, as kubectl hands them to a plugin: `--kubeconfig` and `--context`
/// pick the cluster (the kubeconfig's current context here points at nothing), the context's
/// namespace is the default one, `-n` overrides it, `--as` impersonates, and `version` prints
/// the plugin's version with the controllers the cluster runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flags_pick_the_context_namespace_and_user_as_kubectl_does() -> Result<()> {
    let env = cluster().await?;
    install_crds(&env).await?;
    in_namespace("plugin-ctx", |ns| async move {
        policy_with_status(&ns).await?;
        // A kubeconfig with two contexts: the current one at a port nothing listens on, and
        // `local` (the test cluster, this namespace as its default).
        let dir = temp_dir("plugin-ctx");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::copy(ns.env.kubeconfig(), &kubeconfig)?;
        let path = kubeconfig.to_str().context("kubeconfig path")?;
        let config = |args: &[&str]| {
            let mut all = vec!["--kubeconfig", path, "config"];
            all.extend_from_slice(args);
            ns.env.kubectl(&all)
        };
        let cluster = config(&["view", "--minify", "-o", "jsonpath={.clusters[0].name}"])?;
        let user = config(&["view", "--minify", "-o", "jsonpath={.users[0].name}"])?;
        config(&["set-cluster", "nowhere", "--server=https://127.0.0.1:1", "--insecure-skip-tls-verify=true"])?;
        config(&["set-context", "nowhere", "--cluster=nowhere", &format!("--user={user}")])?;
        config(&["set-context", "local", &format!("--cluster={cluster}"), &format!("--user={user}"), &format!("--namespace={}", ns.name)])?;
        config(&["use-context", "nowhere"])?;

        let (code, _, err) = kubectl_rolemesh(&ns, &["status", "--kubeconfig", path])?;
        ensure!(code == 1, "the current context points at nothing: exit {code}: {err}");
        // Flags before and after the subcommand, as kubectl users write them.
        for args in [
            vec!["status", "--kubeconfig", path, "--context", "local"],
            vec!["--kubeconfig", path, "--context", "local", "status"],
        ] {
            let (code, table, err) = kubectl_rolemesh(&ns, &args)?;
            ensure!(
                code == 0 && table.contains("web") && table.contains(ROLE),
                "{args:?}: the context's namespace holds policy p: exit {code}\n{table}{err}"
            );
        }
        let (code, _, err) = kubectl_rolemesh(
            &ns,
            &["status", "--kubeconfig", path, "--context", "local", "-n", "default"],
        )?;
        ensure!(code == 3, "-n overrides the context's namespace (no policy in default): exit {code}: {err}");
        // Impersonation: a ServiceAccount with no RBAC may not list policies.
        let nobody = format!("system:serviceaccount:{}:nobody", ns.name);
        let (code, _, err) = kubectl_rolemesh(
            &ns,
            &["status", "--kubeconfig", path, "--context", "local", "--as", &nobody],
        )?;
        ensure!(
            code == 1 && err.contains("forbidden") && err.contains(&nobody),
            "--as {nobody}: the API server must refuse that user: exit {code}: {err}"
        );

        let (code, out, err) = kubectl_rolemesh(&ns, &["version", "--client", "-o", "json"])?;
        let parsed: serde_json::Value = serde_json::from_str(&out).with_context(|| format!("{out}{err}"))?;
        ensure!(
            code == 0 && parsed["client"] == env!("CARGO_PKG_VERSION") && parsed.get("controllers").is_none(),
            "version --client: exit {code}: {out}{err}"
        );
        let (code, out, err) = kubectl_rolemesh(&ns, &["version", "--kubeconfig", path])?;
        ensure!(code == 1, "version asks the cluster (the current context points at nothing): exit {code}: {out}{err}");
        let (code, out, err) = kubectl_rolemesh(&ns, &["version", "--kubeconfig", path, "--context", "local", "-o", "json"])?;
        let parsed: serde_json::Value = serde_json::from_str(&out).with_context(|| format!("{out}{err}"))?;
        ensure!(
            code == 0 && parsed["controllers"].is_array(),
            "version lists the cluster's controllers: exit {code}: {out}{err}"
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    })
    .await
}

/// The flags of a `--help` text that have no help of their own: clap writes it after the flag on
/// the same line, or (when some help is long) on the indented lines below; `[default: ...]`
/// alone is not help.
fn flags_without_help(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let mut missing = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let text = line.trim_start();
        if !text.starts_with('-') {
            continue;
        }
        let indent = line.len() - text.len();
        let after: Vec<&str> = text
            .split("  ")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let inline = after.get(1).is_some_and(|h| !h.starts_with('['));
        let below = lines.get(i + 1).is_some_and(|next| {
            let next_text = next.trim_start();
            next.len() - next_text.len() > indent
                && !next_text.is_empty()
                && !next_text.starts_with('[')
        });
        if !inline && !below {
            missing.push(text.to_string());
        }
    }
    missing
}
