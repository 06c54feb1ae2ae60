//! The user's first command: `helm install` exactly as charts/rolemesh/README.md shows it, on a
//! cluster that has never seen rolemesh (no CRDs applied beforehand), then `helm uninstall`.
//!
//! `make test` runs this file first, right after starting a fresh cluster. Run on its own against
//! a cluster where other tests already applied the CRDs, it deletes them first so that the
//! cluster is again what a new user has (cargo runs test files one after another, so no other
//! test of the suite is using them meanwhile).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::{
    api::{apps::v1::Deployment, core::v1::Namespace},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{Api, api::DeleteParams};
use rolemesh_crds::MTLSAuthority;
use rolemesh_testkit::{cluster, eventually, expect_success, repo_root};

const CRDS: [&str; 2] = ["mtlspolicies.rolemesh.dev", "mtlsauthorities.rolemesh.dev"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_helm_install_works_on_a_cluster_without_rolemesh_crds() -> Result<()> {
    let env = cluster().await?;
    let client = env.client().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in CRDS {
        if crds.get_opt(name).await?.is_some() {
            crds.delete(name, &DeleteParams::default()).await?;
        }
    }
    eventually("no rolemesh CRD left", Duration::from_secs(60), || {
        let crds = crds.clone();
        async move {
            for name in CRDS {
                if crds.get_opt(name).await?.is_some() {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        }
    })
    .await?;

    let (key_arn, _) = env.create_kms_key("rolemesh CA (install test)").await?;
    let chart = repo_root().join("charts/rolemesh");
    let key_value = format!("authority.signer.kms.keyId={key_arn}");
    // charts/rolemesh/README.md, with the local AWS endpoint's key and region.
    let install = [
        "install",
        "rolemesh",
        chart.to_str().context("chart path")?,
        "--namespace",
        "rolemesh",
        "--create-namespace",
        "--set-string",
        r"controller.serviceAccount.annotations.eks\.amazonaws\.com/role-arn=arn:aws:iam::111122223333:role/rolemesh-controller",
        "--set",
        "authority.create=true",
        "--set",
        "authority.trustDomain=prod.example.com",
        "--set",
        "authority.signer.type=kms",
        "--set",
        &key_value,
        "--set",
        "authority.signer.kms.region=us-east-1",
    ];
    let output = env.run("helm", &install, None)?;
    expect_success("helm", &install, &output)
        .context("the documented helm install on a cluster without rolemesh CRDs")?;

    for name in CRDS {
        let crd = crds.get(name).await?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        ensure!(established, "helm installed CRD {name} and it is served");
    }
    let authority = Api::<MTLSAuthority>::all(client.clone())
        .get("default")
        .await
        .context("the chart created MTLSAuthority default")?;
    ensure!(
        authority.spec.trust_domain == "prod.example.com",
        "the authority carries the values given: {:?}",
        authority.spec.trust_domain
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "rolemesh");
    for name in ["rolemesh-controller", "rolemesh-webhook"] {
        ensure!(
            deployments.get_opt(name).await?.is_some(),
            "the release created Deployment {name}"
        );
    }

    let uninstall = ["uninstall", "rolemesh", "--namespace", "rolemesh", "--wait"];
    expect_success("helm", &uninstall, &env.run("helm", &uninstall, None)?)?;
    ensure!(
        Api::<MTLSAuthority>::all(client.clone())
            .get_opt("default")
            .await?
            .is_none(),
        "uninstall removed the chart's MTLSAuthority"
    );
    for name in CRDS {
        ensure!(
            crds.get_opt(name).await?.is_some(),
            "helm never deletes CRDs from a chart's crds/ directory: {name} stays"
        );
    }
    Api::<Namespace>::all(client)
        .delete("rolemesh", &DeleteParams::default())
        .await?;
    Ok(())
}
