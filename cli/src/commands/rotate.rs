//! `rotate`: asks the controller for new keys by setting the rotate annotation, on one policy,
//! one ServiceAccount, or every policy of the namespace that a label selector picks; `--wait`
//! follows the policies' status until every certificate asked for has a new serial.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use rolemesh_crds::{MTLSPolicy, names::ROTATE_ANNOTATION};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::NotFound;

const POLL: Duration = Duration::from_secs(2);

/// The arguments of `rotate` (its help is on `Command`).
#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    /// MTLSPolicy name (or --all).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    policy: Option<String>,
    /// Every MTLSPolicy of the namespace (with -l, those the selector picks).
    #[arg(long)]
    all: bool,
    /// With --all: a label selector on the policies, as kubectl's -l (e.g. `team=payments`).
    #[arg(short = 'l', long, requires = "all")]
    selector: Option<String>,
    /// Rotate only this ServiceAccount of the policy.
    #[arg(long, conflicts_with = "all")]
    service_account: Option<String>,
    /// Wait until the controller has issued every certificate asked for (a new serial in the
    /// policy's status). Running pods take them when kubelet next syncs their volumes, up to
    /// about 90 s later.
    #[arg(long)]
    wait: bool,
    /// With --wait: how long to wait, e.g. 90s, 5m.
    #[arg(long, default_value = "5m", value_parser = parse_timeout)]
    timeout: Duration,
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    rolemesh_profile::parse_duration(text).map_err(|e| e.to_string())
}

/// The serials a policy's status shows, by ServiceAccount.
fn serials(policy: &MTLSPolicy) -> BTreeMap<String, Option<String>> {
    policy
        .status
        .iter()
        .flat_map(|s| s.workloads.iter())
        .map(|w| (w.service_account.clone(), w.serial.clone()))
        .collect()
}

pub async fn rotate(client: Client, args: RotateArgs) -> Result<()> {
    let namespace = client.default_namespace().to_string();
    let policies: Api<MTLSPolicy> = Api::namespaced(client.clone(), &namespace);
    let targets: Vec<MTLSPolicy> = match &args.policy {
        Some(name) => vec![
            policies
                .get_opt(name)
                .await?
                .ok_or_else(|| NotFound(format!("MTLSPolicy {namespace}/{name} not found")))?,
        ],
        None => {
            let mut params = ListParams::default();
            if let Some(selector) = &args.selector {
                params = params.labels(selector);
            }
            let found = policies.list(&params).await?.items;
            if found.is_empty() {
                let which = args
                    .selector
                    .as_deref()
                    .map(|s| format!(" matching {s}"))
                    .unwrap_or_default();
                return Err(
                    NotFound(format!("no MTLSPolicy in namespace {namespace}{which}")).into(),
                );
            }
            found
        }
    };
    let value = OffsetDateTime::now_utc().format(&Rfc3339)?;
    let patch = Patch::Merge(
        serde_json::json!({ "metadata": { "annotations": { ROTATE_ANNOTATION: value } } }),
    );
    // What --wait waits for: the serial each asked-for ServiceAccount had.
    let mut pending: Vec<(String, BTreeMap<String, Option<String>>)> = Vec::new();
    for policy in &targets {
        let name = policy.name_any();
        let mut before = serials(policy);
        match &args.service_account {
            None => {
                policies
                    .patch(&name, &PatchParams::default(), &patch)
                    .await?;
                println!(
                    "rotation requested for MTLSPolicy {namespace}/{name} ({} ServiceAccount(s)): {ROTATE_ANNOTATION}={value}",
                    before.len()
                );
            }
            Some(sa) => {
                let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
                accounts.get_opt(sa).await?.ok_or_else(|| {
                    NotFound(format!("ServiceAccount {namespace}/{sa} not found"))
                })?;
                accounts.patch(sa, &PatchParams::default(), &patch).await?;
                println!(
                    "rotation requested for ServiceAccount {namespace}/{sa}: {ROTATE_ANNOTATION}={value}"
                );
                before.retain(|account, _| account == sa);
            }
        }
        // A ServiceAccount without a certificate (its status says why) gets none by rotating.
        before.retain(|_, serial| serial.is_some());
        pending.push((name, before));
    }
    if args.wait {
        wait_for_new_serials(&policies, &namespace, pending, args.timeout).await?;
    }
    Ok(())
}

async fn wait_for_new_serials(
    policies: &Api<MTLSPolicy>,
    namespace: &str,
    mut pending: Vec<(String, BTreeMap<String, Option<String>>)>,
    timeout: Duration,
) -> Result<()> {
    let started = Instant::now();
    loop {
        let mut still = Vec::new();
        for (name, before) in pending {
            let now = match policies.get_opt(&name).await? {
                Some(policy) => serials(&policy),
                None => bail!("MTLSPolicy {namespace}/{name} was deleted while waiting"),
            };
            let waiting: BTreeMap<String, Option<String>> = before
                .into_iter()
                .filter(|(account, serial)| match now.get(account) {
                    Some(Some(current)) => Some(current) == serial.as_ref(),
                    _ => true,
                })
                .collect();
            if waiting.is_empty() {
                println!(
                    "MTLSPolicy {namespace}/{name}: new certificates issued after {:.1}s",
                    started.elapsed().as_secs_f64()
                );
            } else {
                still.push((name, waiting));
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        if started.elapsed() > timeout {
            let left: Vec<String> = still
                .iter()
                .flat_map(|(policy, accounts)| {
                    accounts.keys().map(move |a| format!("{policy}/{a}"))
                })
                .collect();
            bail!(
                "timed out after {}s; still waiting for a new certificate for {} (kubectl rolemesh status -n {namespace} says why)",
                timeout.as_secs(),
                left.join(", ")
            );
        }
        pending = still;
        tokio::time::sleep(POLL).await;
    }
}
