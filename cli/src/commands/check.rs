//! `check`: is rolemesh installable here (`--pre`), and is it working (the default), as
//! `linkerd check` and `cmctl check api` answer: each check with what it found, and for a failed
//! one, what to do. The exit code is 1 when any check fails.

use std::collections::BTreeSet;

use anyhow::Result;
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        coordination::v1::Lease,
        core::v1::{ConfigMap, Container, Pod, PodSpec},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, ObjectMeta, PostParams},
};
use rolemesh_crds::{
    MTLSAuthority, MTLSPolicy,
    names::{INJECT_LABEL, TRUST_BUNDLE_CONFIGMAP},
};
use serde::Serialize;

use crate::{Output, print, table};

/// The chart's `kubeVersion`.
const MIN_MINOR: u32 = 33;
const CRDS: [&str; 2] = ["mtlspolicies.rolemesh.dev", "mtlsauthorities.rolemesh.dev"];
const CONTROLLER_SELECTOR: &str =
    "app.kubernetes.io/name=rolemesh,app.kubernetes.io/component=controller";
/// More than this between this machine's clock and the API server's makes certificates look
/// not yet valid or expired to one side.
const MAX_CLOCK_SKEW_SECONDS: i64 = 30;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Only what an install needs (the API server reachable and recent enough, rolemesh's CRDs
    /// absent or rolemesh's): run before `helm install`.
    #[arg(long)]
    pre: bool,
    /// The MTLSAuthority the controller uses.
    #[arg(long, env = "ROLEMESH_AUTHORITY", default_value = "default")]
    authority: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Serialize)]
struct Check {
    check: &'static str,
    ok: bool,
    found: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn passed(check: &'static str, found: impl Into<String>) -> Check {
    Check {
        check,
        ok: true,
        found: found.into(),
        fix: None,
    }
}

fn failed(check: &'static str, found: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        check,
        ok: false,
        found: found.into(),
        fix: Some(fix.into()),
    }
}

/// Runs the checks and prints them; whether every one passed.
pub async fn check(client: Client, args: CheckArgs) -> Result<bool> {
    let mut checks = vec![api_server(&client).await];
    if checks[0].ok {
        if args.pre {
            checks.push(crds_before_install(&client).await);
        } else {
            checks.push(crds_served(&client).await);
            checks.push(controller_leader(&client).await);
            checks.push(webhook_reachable(&client).await);
            checks.push(clock(&client).await);
            checks.push(authority_ready(&client, &args.authority).await);
            checks.push(only_one_authority(&client, &args.authority).await);
            checks.push(trust_bundles(&client).await);
        }
    }
    let ok = checks.iter().all(|c| c.ok);
    if !matches!(args.output, Output::Table) {
        print(&checks, args.output)?;
        return Ok(ok);
    }
    let rows: Vec<Vec<String>> = checks
        .iter()
        .map(|c| {
            let found = match &c.fix {
                Some(fix) => format!("{} -> {fix}", c.found),
                None => c.found.clone(),
            };
            vec![
                if c.ok { "ok" } else { "FAIL" }.to_string(),
                c.check.to_string(),
                found,
            ]
        })
        .collect();
    table(&["", "CHECK", "FOUND"], &rows);
    Ok(ok)
}

async fn api_server(client: &Client) -> Check {
    const NAME: &str = "Kubernetes API server reachable, v1.33 or later";
    match client.apiserver_version().await {
        Err(error) => failed(
            NAME,
            format!("no answer: {error}"),
            "check --kubeconfig/--context, and that the cluster is up",
        ),
        Ok(info) => {
            let minor: u32 = info
                .minor
                .trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .unwrap_or(0);
            if info.major == "1" && minor >= MIN_MINOR {
                passed(NAME, info.git_version)
            } else {
                failed(
                    NAME,
                    info.git_version,
                    "rolemesh needs Kubernetes 1.33 or later (ValidatingAdmissionPolicy, CEL)",
                )
            }
        }
    }
}

async fn crds_before_install(client: &Client) -> Check {
    const NAME: &str = "rolemesh's CRDs absent, or installed by rolemesh";
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut foreign = Vec::new();
    for name in CRDS {
        match crds.get_opt(name).await {
            Ok(Some(crd)) if crd.spec.group != rolemesh_crds::GROUP => foreign.push(name),
            Ok(_) => {}
            Err(error) => {
                return failed(
                    NAME,
                    format!("cannot read CRD {name}: {error}"),
                    "installing needs cluster-admin; ask for it or for a user who has it",
                );
            }
        }
    }
    if foreign.is_empty() {
        passed(NAME, "no conflicting CRD")
    } else {
        failed(
            NAME,
            format!("{} exist with another group", foreign.join(", ")),
            "remove them before installing rolemesh",
        )
    }
}

async fn crds_served(client: &Client) -> Check {
    const NAME: &str = "CRDs established";
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut missing = Vec::new();
    for name in CRDS {
        let established = crds.get_opt(name).await.ok().flatten().is_some_and(|crd| {
            crd.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        if !established {
            missing.push(name);
        }
    }
    if missing.is_empty() {
        passed(NAME, CRDS.join(", "))
    } else {
        failed(
            NAME,
            format!("not served: {}", missing.join(", ")),
            "install the chart (helm install applies its crds/) or kubectl apply -f deploy/crds.yaml",
        )
    }
}

/// The controller Deployments' Leases: one held, renewed within its duration, by a Ready pod.
async fn controller_leader(client: &Client) -> Check {
    const NAME: &str = "controller leader present";
    let deployments: Api<Deployment> = Api::all(client.clone());
    let found = match deployments
        .list(&ListParams::default().labels(CONTROLLER_SELECTOR))
        .await
    {
        Ok(found) => found.items,
        Err(error) => {
            return failed(
                NAME,
                format!("cannot list Deployments: {error}"),
                "needs list on deployments",
            );
        }
    };
    let Some(deployment) = found.first() else {
        return failed(
            NAME,
            "no rolemesh controller Deployment",
            "install the chart: helm install rolemesh charts/rolemesh -n rolemesh --create-namespace",
        );
    };
    let namespace = deployment.namespace().unwrap_or_default();
    // The chart names the Lease after the Deployment (ROLEMESH_LEASE_NAME).
    let lease_name = deployment.name_any();
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let lease = match leases.get_opt(&lease_name).await {
        Ok(Some(lease)) => lease,
        Ok(None) => {
            return failed(
                NAME,
                format!("no Lease {namespace}/{lease_name}: no replica has led yet"),
                format!("kubectl logs -n {namespace} deploy/{lease_name}"),
            );
        }
        Err(error) => {
            return failed(
                NAME,
                format!("cannot read Lease: {error}"),
                "needs get on leases",
            );
        }
    };
    let spec = lease.spec.unwrap_or_default();
    let holder = spec.holder_identity.unwrap_or_default();
    let renewed = spec.renew_time.map(|t| t.0);
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    let fresh = renewed.is_some_and(|t| Timestamp::now().as_second() - t.as_second() <= duration);
    if holder.is_empty() || !fresh {
        return failed(
            NAME,
            format!(
                "Lease {namespace}/{lease_name} held by {holder:?}, not renewed within {duration}s"
            ),
            format!(
                "kubectl get pods -n {namespace} -l app.kubernetes.io/component=controller; kubectl logs -n {namespace} deploy/{lease_name}"
            ),
        );
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let ready = pods
        .get_opt(&holder)
        .await
        .ok()
        .flatten()
        .is_some_and(|pod| {
            pod.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
    if ready {
        passed(
            NAME,
            format!("{namespace}/{holder} holds Lease {lease_name}"),
        )
    } else {
        failed(
            NAME,
            format!("the Lease holder {namespace}/{holder} is not a Ready pod"),
            format!("kubectl describe pod -n {namespace} {holder}"),
        )
    }
}

/// A dry-run create of an opted-in pod in the namespace of `-n`: the API server calls the webhook
/// for it (sideEffects None), and nothing is stored.
async fn webhook_reachable(client: &Client) -> Check {
    const NAME: &str = "webhook reachable through the API server";
    let namespace = client.default_namespace().to_string();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let pod = Pod {
        metadata: ObjectMeta {
            generate_name: Some("rolemesh-check-".into()),
            labels: Some([(INJECT_LABEL.to_string(), "enabled".to_string())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "check".into(),
                image: Some("rolemesh.invalid/check:dry-run".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    match pods
        .create(
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &pod,
        )
        .await
    {
        Ok(created) => {
            let injected = created
                .spec
                .map(|s| s.containers.len() + s.init_containers.map_or(0, |c| c.len()))
                .unwrap_or(0)
                > 1;
            if injected {
                passed(NAME, format!("a dry-run pod in {namespace} was injected"))
            } else {
                failed(
                    NAME,
                    format!(
                        "a dry-run pod in {namespace} labelled {INJECT_LABEL}=enabled was not sent to the webhook"
                    ),
                    "run check with -n set to an application namespace (not kube-system or rolemesh's own), and check the MutatingWebhookConfiguration",
                )
            }
        }
        // The webhook's own refusal (nothing covers the check pod) is an answer: it is up.
        Err(kube::Error::Api(status)) if status.message.contains("rolemesh cannot inject") => {
            passed(
                NAME,
                format!("the webhook answered for a dry-run pod in {namespace}"),
            )
        }
        Err(kube::Error::Api(status)) if status.message.contains("failed calling webhook") => {
            failed(
                NAME,
                status.message,
                "kubectl get pods,endpoints -n <rolemesh namespace> -l app.kubernetes.io/component=webhook: pods that opt in cannot be created until a replica answers",
            )
        }
        Err(error) => failed(
            NAME,
            format!("the dry-run pod create failed: {error}"),
            "check needs create on pods in the namespace of -n",
        ),
    }
}

/// The API server's clock, from the creationTimestamp it gives a dry-run ConfigMap.
async fn clock(client: &Client) -> Check {
    const NAME: &str = "clocks agree (this machine, API server)";
    let maps: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let probe = ConfigMap {
        metadata: ObjectMeta {
            generate_name: Some("rolemesh-check-".into()),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    };
    let before = Timestamp::now().as_second();
    match maps
        .create(
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &probe,
        )
        .await
    {
        Ok(created) => {
            let after = Timestamp::now().as_second();
            let Some(server) = created.metadata.creation_timestamp.map(|t| t.0.as_second()) else {
                return failed(
                    NAME,
                    "no creationTimestamp on the dry-run answer",
                    "report this",
                );
            };
            // The server's second lies between the two local readings unless the clocks differ.
            let skew = if server < before - 1 {
                before - server
            } else if server > after + 1 {
                server - after
            } else {
                0
            };
            if skew <= MAX_CLOCK_SKEW_SECONDS {
                passed(NAME, format!("skew {skew}s"))
            } else {
                failed(
                    NAME,
                    format!("this machine and the API server differ by {skew}s"),
                    "synchronise clocks (chrony, NTP): certificates valid for one side look expired or not yet valid to the other",
                )
            }
        }
        Err(error) => failed(
            NAME,
            format!("dry-run ConfigMap create failed: {error}"),
            "needs create on configmaps in the namespace of -n",
        ),
    }
}

async fn authority_ready(client: &Client, name: &str) -> Check {
    const NAME: &str = "MTLSAuthority Ready";
    let authorities: Api<MTLSAuthority> = Api::all(client.clone());
    match authorities.get_opt(name).await {
        Ok(Some(authority)) => {
            let ready = authority
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
            match ready {
                Some(c) if c.status == "True" => passed(NAME, format!("{name}: {}", c.reason)),
                Some(c) => failed(
                    NAME,
                    format!("{name}: {} ({})", c.reason, c.message),
                    "docs/operations.md, \"Troubleshooting by message\"",
                ),
                None => failed(
                    NAME,
                    format!("{name} has no Ready condition yet"),
                    "is the controller running? see the leader check",
                ),
            }
        }
        Ok(None) => failed(
            NAME,
            format!("no MTLSAuthority {name}"),
            "create it (the chart does with authority.create=true); docs/install-eks.md",
        ),
        Err(error) => failed(
            NAME,
            format!("cannot read MTLSAuthority {name}: {error}"),
            "needs get on mtlsauthorities",
        ),
    }
}

/// The controller uses one MTLSAuthority (its --authority, `default` in the chart); any other is
/// ignored, and without this check nothing would say so.
async fn only_one_authority(client: &Client, name: &str) -> Check {
    const NAME: &str = "no MTLSAuthority ignored";
    let authorities: Api<MTLSAuthority> = Api::all(client.clone());
    match authorities.list(&ListParams::default()).await {
        Err(error) => failed(
            NAME,
            format!("cannot list MTLSAuthorities: {error}"),
            "needs list on mtlsauthorities",
        ),
        Ok(list) => {
            let ignored: Vec<String> = list
                .items
                .iter()
                .map(|a| a.name_any())
                .filter(|n| n != name)
                .collect();
            if ignored.is_empty() {
                passed(NAME, format!("only {name}"))
            } else {
                failed(
                    NAME,
                    format!(
                        "{} exist(s) beside {name}, which the controller uses; they sign nothing",
                        ignored.join(", ")
                    ),
                    format!(
                        "move what they say into MTLSAuthority {name} and delete them (or check with --authority NAME)"
                    ),
                )
            }
        }
    }
}

/// Each namespace with an MTLSPolicy has its trust bundle ConfigMap.
async fn trust_bundles(client: &Client) -> Check {
    const NAME: &str = "trust bundles present";
    let policies: Api<MTLSPolicy> = Api::all(client.clone());
    let namespaces: BTreeSet<String> = match policies.list(&ListParams::default()).await {
        Ok(list) => list.items.iter().filter_map(|p| p.namespace()).collect(),
        Err(error) => {
            return failed(
                NAME,
                format!("cannot list MTLSPolicies: {error}"),
                "needs list on mtlspolicies",
            );
        }
    };
    let mut missing = Vec::new();
    for namespace in &namespaces {
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        if !matches!(maps.get_opt(TRUST_BUNDLE_CONFIGMAP).await, Ok(Some(_))) {
            missing.push(namespace.as_str());
        }
    }
    if missing.is_empty() {
        passed(
            NAME,
            format!("{} namespace(s) with an MTLSPolicy", namespaces.len()),
        )
    } else {
        failed(
            NAME,
            format!("no {TRUST_BUNDLE_CONFIGMAP} in {}", missing.join(", ")),
            "the controller writes them: see the leader and MTLSAuthority checks",
        )
    }
}
