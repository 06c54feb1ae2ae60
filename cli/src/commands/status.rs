//! `status`: the identities of the ServiceAccounts MTLSPolicies cover, from the policies' status.

use anyhow::{Context as _, Result};
use kube::{Api, Client, ResourceExt, api::ListParams};
use rolemesh_crds::MTLSPolicy;
use serde::Serialize;

use crate::{NotFound, Output, namespace_or_default, print, table};

/// The arguments of `status` (its help is on `Command`).
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[arg(short, long)]
    namespace: Option<String>,
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
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
        namespace,
        all_namespaces: all,
        output,
    } = args;
    let api: Api<MTLSPolicy> = if all {
        Api::all(client.clone())
    } else {
        Api::namespaced(
            client.clone(),
            &namespace_or_default(&client, namespace).await,
        )
    };
    let policies = api
        .list(&ListParams::default())
        .await
        .context("listing MTLSPolicies (are rolemesh's CRDs installed?)")?;
    let mut rows = Vec::new();
    for policy in &policies.items {
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
    Ok(())
}
