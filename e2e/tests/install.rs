//! The user's first command: `helm install` exactly as charts/rolemesh/README.md shows it, on a
//! cluster that has never seen rolemesh (no CRDs applied beforehand), with the values file that
//! docs/development.md adds for the local cluster (rolemesh's images built here, the local AWS
//! endpoint). The controller and webhook then run as the chart's pods: Ready, one leader, the
//! CA in KMS; `helm upgrade` rolls them; `helm uninstall` removes them and leaves the CRDs.
//!
//! `make test` runs this file first, right after starting a fresh cluster. Run on its own against
//! a cluster where other tests already applied the CRDs, it deletes them first so that the
//! cluster is again what a new user has (cargo runs test files one after another, so no other
//! test of the suite is using them meanwhile).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::{
    api::{apps::v1::Deployment, core::v1::Namespace},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{Api, api::DeleteParams};
use rolemesh_crds::MTLSAuthority;
use rolemesh_testkit::{ClusterEnv, eventually, expect_success, node_ready, repo_root};

const CRDS: [&str; 2] = ["mtlspolicies.rolemesh.dev", "mtlsauthorities.rolemesh.dev"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_helm_install_works_on_a_cluster_without_rolemesh_crds() -> Result<()> {
    let env = node_ready().await?;
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
    let values = env.chart_values()?;
    // charts/rolemesh/README.md, with the local AWS endpoint's key and region, and the local
    // cluster's values file (docs/development.md).
    let install = [
        "install",
        "rolemesh",
        chart.to_str().context("chart path")?,
        "--namespace",
        "rolemesh",
        "--create-namespace",
        "-f",
        values.to_str().context("values path")?,
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
    let started = Instant::now();
    rollout(&env, &["rolemesh-controller", "rolemesh-webhook"])
        .context("the chart's pods become Ready")?;
    println!(
        "controller and webhook pods Ready {:.1}s after helm install returned",
        started.elapsed().as_secs_f64()
    );
    let leader = leader(&env).await?;
    let controllers = pod_names(&env, "controller")?;
    ensure!(
        controllers.len() == 2 && controllers.contains(&leader),
        "the leader {leader:?} is one of the two controller pods {controllers:?}"
    );
    // The controller in its pod reached KMS: the authority is Ready with a CA the key signed.
    eventually(
        "MTLSAuthority default Ready",
        Duration::from_secs(60),
        || async {
            let authority = Api::<MTLSAuthority>::all(client.clone())
                .get("default")
                .await?;
            let status = authority.status.unwrap_or_default();
            let ready = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            Ok((ready && status.ca_fingerprint.is_some()).then_some(()))
        },
    )
    .await?;
    // The API server reaches the webhook through its Service, trusting it by the caBundle the
    // controller keeps: the webhook's own refusal of an opted-in pod that no policy covers comes
    // back (not "failed calling webhook").
    let answer = eventually(
        "the webhook's answer through its Service",
        Duration::from_secs(60),
        || async {
            let answer = dry_run_opted_in_pod(&env)?;
            Ok(answer
                .contains("no MTLSPolicy in namespace")
                .then_some(answer))
        },
    )
    .await?;
    ensure!(
        answer.contains("denied the request"),
        "the webhook refused the uncovered pod: {answer}"
    );

    // helm upgrade with a changed value rolls the Deployment and the new pods carry it.
    let upgrade = [
        "upgrade",
        "rolemesh",
        chart.to_str().context("chart path")?,
        "--namespace",
        "rolemesh",
        "--reuse-values",
        "--set",
        "controller.issueConcurrency=4",
    ];
    expect_success("helm", &upgrade, &env.run("helm", &upgrade, None)?)?;
    rollout(&env, &["rolemesh-controller"]).context("the upgraded controller rolls out")?;
    // The old pods take their grace period to go after the rollout completes.
    eventually(
        "only upgraded controller pods",
        Duration::from_secs(90),
        || async {
            let concurrency = env.kubectl(&[
                "get",
                "pods",
                "-n",
                "rolemesh",
                "-l",
                "app.kubernetes.io/component=controller",
                "-o",
                r#"jsonpath={range .items[*]}{.spec.containers[0].env[?(@.name=="ROLEMESH_ISSUE_CONCURRENCY")].value}{" "}{end}"#,
            ])?;
            Ok((concurrency.split_whitespace().collect::<Vec<_>>() == ["4", "4"]).then_some(()))
        },
    )
    .await?;

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
    eventually("the chart's pods gone", Duration::from_secs(60), || async {
        let left = env.kubectl(&["get", "pods", "-n", "rolemesh", "-o", "name"])?;
        Ok(left.trim().is_empty().then_some(()))
    })
    .await?;
    Api::<Namespace>::all(client)
        .delete("rolemesh", &DeleteParams::default())
        .await?;
    Ok(())
}

/// `kubectl rollout status` of the release's Deployments.
fn rollout(env: &ClusterEnv, deployments: &[&str]) -> Result<()> {
    for name in deployments {
        env.kubectl(&[
            "rollout",
            "status",
            &format!("deployment/{name}"),
            "-n",
            "rolemesh",
            "--timeout=180s",
        ])?;
    }
    Ok(())
}

fn pod_names(env: &ClusterEnv, component: &str) -> Result<Vec<String>> {
    let names = env.kubectl(&[
        "get",
        "pods",
        "-n",
        "rolemesh",
        "-l",
        &format!("app.kubernetes.io/component={component}"),
        "--field-selector",
        "status.phase=Running",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])?;
    Ok(names.split_whitespace().map(String::from).collect())
}

/// The holder of the controllers' leader Lease, once one holds it.
async fn leader(env: &ClusterEnv) -> Result<String> {
    let leases: Api<Lease> = Api::namespaced(env.client().await?, "rolemesh");
    eventually("a controller leader", Duration::from_secs(60), || async {
        let lease = leases.get_opt("rolemesh-controller").await?;
        Ok(lease
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty()))
    })
    .await
}

/// A server-side dry run of a pod that opts in, in a namespace no policy covers: the API server
/// sends it to the webhook through the Service. Returns kubectl's output (the webhook's refusal,
/// or why the API server could not call it).
fn dry_run_opted_in_pod(env: &ClusterEnv) -> Result<String> {
    let pod = r#"{"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "probe", "namespace": "default", "labels": {"rolemesh.dev/inject": "enabled"}},
        "spec": {"containers": [{"name": "app", "image": "rolemesh.local/busybox:1.35.0"}]}}"#;
    let args = ["create", "--dry-run=server", "-o", "yaml", "-f", "-"];
    let output = env.run("kubectl", &args, Some(pod))?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}
