//! `kubectl rolemesh` (the plugin binary, found by kubectl on PATH) against live objects the
//! real controller keeps.

mod support;

use anyhow::{Result, ensure};
use rolemesh_tests::{cluster, in_namespace, install_crds};
use serde_json::json;
use support::*;

fn kubectl_rolemesh(
    ns: &rolemesh_tests::TestNamespace,
    args: &[&str],
) -> Result<(i32, String, String)> {
    ns.env.kubectl_plugin(args)
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

            // inspect: the Secret decodes and its chain verifies against the bundle.
            let (code, inspected, err) =
                kubectl_rolemesh(&ns, &["inspect", "web-rolemesh-tls", "-n", &ns.name])?;
            ensure!(code == 0, "inspect failed: {inspected}{err}");
            ensure!(
                inspected.contains(&format!("spiffe://plugin.test/ns/{}/sa/web", ns.name))
                    && inspected.contains("chain verifies"),
                "{inspected}"
            );

            // trust-bundle: what the namespace's ConfigMap holds.
            let (code, bundle, _) = kubectl_rolemesh(&ns, &["trust-bundle", "-n", &ns.name])?;
            ensure!(
                code == 0 && bundle == trust_bundle(&ns).await?,
                "trust-bundle printed something else"
            );
            let dir = std::env::temp_dir().join(unique("plugin"));
            std::fs::create_dir_all(&dir)?;
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
            wait_for_secret(&ns, "web-rolemesh-tls", Some(&second.serial_hex)).await?;

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
