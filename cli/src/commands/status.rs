//! `status`: the identities of the ServiceAccounts MTLSPolicies cover, and the pods that run an
//! older start configuration (mappings, ports) than their policy's, from the policies' status.

use anyhow::{Context as _, Result};
use kube::{Api, Client, ResourceExt, api::ListParams};
use rolemesh_crds::MTLSPolicy;
use serde::Serialize;

use crate::{NotFound, Output, print, table};

/// The arguments of `status` (its help is on `Command`).
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The policies of every namespace, as kubectl's -A.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
    /// List the stale pods (ports or mappings changed since they were injected; re-create them)
    /// instead of the identities.
    #[arg(long)]
    pods: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PodRow {
    namespace: String,
    policy: String,
    pod: String,
    generation: i64,
    current_generation: i64,
    reason: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    namespace: String,
    policy: String,
    service_account: String,
    role_arn: Option<String>,
    spiffe_id: Option<String>,
    verified: bool,
    reason: String,
    secret_name: Option<String>,
    serial: Option<String>,
    not_before: Option<String>,
    not_after: Option<String>,
    message: Option<String>,
}

pub async fn status(client: Client, args: StatusArgs) -> Result<()> {
    let StatusArgs {
        all_namespaces: all,
        output,
        pods,
    } = args;
    let api: Api<MTLSPolicy> = if all {
        Api::all(client.clone())
    } else {
        Api::default_namespaced(client.clone())
    };
    let policies = api
        .list(&ListParams::default())
        .await
        .context("listing MTLSPolicies (are rolemesh's CRDs installed?)")?;
    let mut rows = Vec::new();
    let mut stale = Vec::new();
    let mut unlisted = 0;
    for policy in &policies.items {
        let report = policy.status.as_ref().and_then(|s| s.pods.as_ref());
        for pod in report.map(|p| p.stale.as_slice()).unwrap_or_default() {
            stale.push(PodRow {
                namespace: policy.namespace().unwrap_or_default(),
                policy: policy.name_any(),
                pod: pod.name.clone(),
                generation: pod.generation,
                current_generation: policy.metadata.generation.unwrap_or(0),
                reason: pod.reason.clone(),
            });
        }
        unlisted += report.map_or(0, |p| {
            usize::try_from(p.stale_count)
                .unwrap_or_default()
                .saturating_sub(p.stale.len())
        });
        for workload in policy
            .status
            .as_ref()
            .map(|s| s.workloads.clone())
            .unwrap_or_default()
        {
            rows.push(Row {
                namespace: policy.namespace().unwrap_or_default(),
                policy: policy.name_any(),
                service_account: workload.service_account,
                role_arn: workload.role_arn,
                spiffe_id: workload.spiffe_id,
                verified: workload.verified,
                reason: workload.reason,
                secret_name: workload.secret_name,
                serial: workload.serial,
                not_before: workload.not_before.map(|t| t.0.to_string()),
                not_after: workload.not_after.map(|t| t.0.to_string()),
                message: workload.message,
            });
        }
    }
    if policies.items.is_empty() {
        return Err(NotFound("no MTLSPolicy found".into()).into());
    }
    if pods {
        match output {
            Output::Table => stale_table(&stale, unlisted),
            other => print(&stale, other)?,
        }
        return Ok(());
    }
    match output {
        Output::Table => table(
            &[
                "NAMESPACE",
                "POLICY",
                "SERVICEACCOUNT",
                "ROLE",
                "VERIFIED",
                "REASON",
                "SERIAL",
                "EXPIRES",
            ],
            &rows
                .iter()
                .map(|r| {
                    vec![
                        r.namespace.clone(),
                        r.policy.clone(),
                        r.service_account.clone(),
                        r.role_arn.clone().unwrap_or_else(|| "-".into()),
                        r.verified.to_string(),
                        r.reason.clone(),
                        r.serial.clone().unwrap_or_else(|| "-".into()),
                        r.not_after.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
        other => print(&rows, other)?,
    }
    if matches!(output, Output::Table) && !stale.is_empty() {
        println!();
        stale_table(&stale, unlisted);
    }
    Ok(())
}

/// The stale pods, and what to do about them.
fn stale_table(stale: &[PodRow], unlisted: usize) {
    if stale.is_empty() {
        println!("No stale pods: every injected pod runs its policy's current mappings and ports.");
        return;
    }
    table(
        &[
            "NAMESPACE",
            "POLICY",
            "STALE POD",
            "INJECTED AT",
            "CURRENT",
            "REASON",
        ],
        &stale
            .iter()
            .map(|r| {
                vec![
                    r.namespace.clone(),
                    r.policy.clone(),
                    r.pod.clone(),
                    r.generation.to_string(),
                    r.current_generation.to_string(),
                    r.reason.clone(),
                ]
            })
            .collect::<Vec<_>>(),
    );
    if unlisted > 0 {
        println!("... and {unlisted} more (the status lists at most 100 per policy)");
    }
    println!(
        "Re-create stale pods to apply their policy (kubectl rollout restart): PortsChanged pods get \
         peer rule edits live but keep their old mappings and ports, InjectedBeforeLiveRules pods \
         get no policy edit at all."
    );
}
