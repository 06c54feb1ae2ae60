//! `rotate`: asks the controller for new keys by setting the rotate annotation.

use anyhow::Result;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use rolemesh_crds::{MTLSPolicy, names::ROTATE_ANNOTATION};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::NotFound;

/// The arguments of `rotate` (its help is on `Command`).
#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    /// MTLSPolicy name.
    policy: String,
    /// Rotate only this ServiceAccount.
    #[arg(long)]
    service_account: Option<String>,
}

pub async fn rotate(client: Client, args: RotateArgs) -> Result<()> {
    let RotateArgs {
        policy,
        service_account,
    } = args;
    let namespace = client.default_namespace().to_string();
    let policies: Api<MTLSPolicy> = Api::namespaced(client.clone(), &namespace);
    let found = policies
        .get_opt(&policy)
        .await?
        .ok_or_else(|| NotFound(format!("MTLSPolicy {namespace}/{policy} not found")))?;
    let value = OffsetDateTime::now_utc().format(&Rfc3339)?;
    let patch = Patch::Merge(
        serde_json::json!({ "metadata": { "annotations": { ROTATE_ANNOTATION: value } } }),
    );
    match service_account {
        None => {
            policies
                .patch(&policy, &PatchParams::default(), &patch)
                .await?;
            let count = found.status.map(|s| s.workloads.len()).unwrap_or(0);
            println!(
                "rotation requested for MTLSPolicy {namespace}/{policy} ({count} ServiceAccount(s)): {ROTATE_ANNOTATION}={value}"
            );
        }
        Some(sa) => {
            let accounts: Api<ServiceAccount> = Api::namespaced(client, &namespace);
            accounts
                .get_opt(&sa)
                .await?
                .ok_or_else(|| NotFound(format!("ServiceAccount {namespace}/{sa} not found")))?;
            accounts.patch(&sa, &PatchParams::default(), &patch).await?;
            println!(
                "rotation requested for ServiceAccount {namespace}/{sa}: {ROTATE_ANNOTATION}={value}"
            );
        }
    }
    Ok(())
}
