//! `revoke` and `unblock`: annotations on the MTLSAuthority that the controller turns into a CRL
//! (signed through the signer, published in every trust bundle) and a re-issued certificate, or
//! into no certificate at all for a blocked ServiceAccount.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use rolemesh_crds::{
    MTLSAuthority, MTLSPolicy, WorkloadStatus,
    names::{BLOCKED_ANNOTATION, REVOKE_ANNOTATION_PREFIX},
};
use serde_json::{Map, Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::NotFound;

#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// Revoke the certificate this ServiceAccount holds now.
    #[arg(long, conflicts_with = "serial", required_unless_present = "serial")]
    service_account: Option<String>,
    /// Revoke the certificate with this serial (hex, as `kubectl rolemesh status` shows it).
    #[arg(long)]
    serial: Option<String>,
    /// With --serial of a certificate no MTLSPolicy status names any more: its notAfter (RFC
    /// 3339), until when the CRL lists it.
    #[arg(long, requires = "serial")]
    not_after: Option<String>,
    /// Also block the ServiceAccount: no new certificate until `kubectl rolemesh unblock`.
    #[arg(long, requires = "service_account")]
    block: bool,
    /// Wait until the authority lists the serial as revoked (and, unless blocked, the workload
    /// holds a new certificate).
    #[arg(long)]
    wait: bool,
    /// The MTLSAuthority.
    #[arg(long, default_value = "default")]
    authority: String,
}

#[derive(Debug, clap::Args)]
pub struct UnblockArgs {
    /// The ServiceAccount to issue certificates for again.
    #[arg(long)]
    service_account: String,
    /// The MTLSAuthority.
    #[arg(long, default_value = "default")]
    authority: String,
}

/// The workload status entry naming `serial`, with its namespace, in any MTLSPolicy.
async fn find_serial(client: &Client, serial: &str) -> Result<Option<(String, WorkloadStatus)>> {
    let policies: Api<MTLSPolicy> = Api::all(client.clone());
    for policy in policies.list(&Default::default()).await? {
        let namespace = policy.metadata.namespace.clone().unwrap_or_default();
        for workload in policy.status.map(|s| s.workloads).unwrap_or_default() {
            if workload.serial.as_deref() == Some(serial) {
                return Ok(Some((namespace, workload)));
            }
        }
    }
    Ok(None)
}

/// The workload status entry of ServiceAccount `namespace/name`.
async fn find_service_account(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<WorkloadStatus>> {
    let policies: Api<MTLSPolicy> = Api::namespaced(client.clone(), namespace);
    Ok(policies
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .flat_map(|p| p.status.map(|s| s.workloads).unwrap_or_default())
        .find(|w| w.service_account == name && w.serial.is_some()))
}

fn blocked_list(authority: &MTLSAuthority) -> Vec<String> {
    authority
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(BLOCKED_ANNOTATION))
        .map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Revoke annotations whose certificate has expired: dropped with the next write, as the
/// controller no longer lists them.
fn expired_revocations(authority: &MTLSAuthority, now: OffsetDateTime) -> Vec<String> {
    authority
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(key, value)| {
            key.starts_with(REVOKE_ANNOTATION_PREFIX)
                && OffsetDateTime::parse(value, &Rfc3339).is_ok_and(|t| t <= now)
        })
        .map(|(key, _)| key.clone())
        .collect()
}

pub async fn revoke(client: Client, args: RevokeArgs) -> Result<()> {
    let authorities: Api<MTLSAuthority> = Api::all(client.clone());
    let authority = authorities
        .get_opt(&args.authority)
        .await?
        .ok_or_else(|| NotFound(format!("MTLSAuthority {} not found", args.authority)))?;
    let namespace = client.default_namespace().to_string();
    let (serial, not_after, who) = match (&args.service_account, &args.serial) {
        (Some(name), _) => {
            let workload = find_service_account(&client, &namespace, name)
                .await?
                .ok_or_else(|| {
                    NotFound(format!(
                        "no MTLSPolicy in namespace {namespace} shows a certificate for ServiceAccount {name} (kubectl rolemesh status -n {namespace})"
                    ))
                })?;
            let serial = workload.serial.clone().unwrap_or_default();
            let not_after = workload
                .not_after
                .map(|t| t.0.to_string())
                .context("the status shows no notAfter for the certificate")?;
            (serial, not_after, Some((namespace.clone(), name.clone())))
        }
        (None, Some(serial)) => {
            let serial = serial.to_ascii_lowercase().replace(':', "");
            match (find_serial(&client, &serial).await?, &args.not_after) {
                (_, Some(not_after)) => {
                    OffsetDateTime::parse(not_after, &Rfc3339).with_context(|| {
                        format!("--not-after {not_after} is not an RFC 3339 time")
                    })?;
                    (serial, not_after.clone(), None)
                }
                (Some((namespace, workload)), None) => {
                    let not_after = workload
                        .not_after
                        .map(|t| t.0.to_string())
                        .context("the status shows no notAfter for the certificate")?;
                    (
                        serial,
                        not_after,
                        Some((namespace, workload.service_account)),
                    )
                }
                (None, None) => {
                    return Err(NotFound(format!(
                        "no MTLSPolicy status names a certificate with serial {serial}; give its notAfter with --not-after"
                    ))
                    .into());
                }
            }
        }
        (None, None) => bail!("give --service-account or --serial"),
    };
    let now = OffsetDateTime::now_utc();
    let mut annotations = Map::new();
    for key in expired_revocations(&authority, now) {
        annotations.insert(key, Value::Null);
    }
    annotations.insert(
        format!("{REVOKE_ANNOTATION_PREFIX}{serial}"),
        Value::String(not_after.clone()),
    );
    if args.block
        && let Some((namespace, name)) = &who
    {
        let mut blocked = blocked_list(&authority);
        let entry = format!("{namespace}/{name}");
        if !blocked.contains(&entry) {
            blocked.push(entry);
        }
        annotations.insert(BLOCKED_ANNOTATION.into(), Value::String(blocked.join(",")));
    }
    authorities
        .patch(
            &args.authority,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": annotations } })),
        )
        .await
        .with_context(|| format!("annotating MTLSAuthority {}", args.authority))?;
    let whose = who
        .as_ref()
        .map(|(ns, name)| format!(" of ServiceAccount {ns}/{name}"))
        .unwrap_or_default();
    println!("revoked certificate {serial}{whose} (listed in the CRLs until {not_after})");
    if args.block {
        println!("blocked: no new certificate{whose} until kubectl rolemesh unblock");
    }
    if args.wait {
        wait_for_revocation(
            &client,
            &authorities,
            &args.authority,
            &serial,
            who.as_ref(),
            args.block,
        )
        .await?;
    }
    Ok(())
}

async fn wait_for_revocation(
    client: &Client,
    authorities: &Api<MTLSAuthority>,
    name: &str,
    serial: &str,
    who: Option<&(String, String)>,
    blocked: bool,
) -> Result<()> {
    let started = Instant::now();
    let timeout = Duration::from_secs(300);
    let mut listed = false;
    loop {
        if !listed {
            listed = authorities
                .get(name)
                .await?
                .status
                .is_some_and(|s| s.revoked.iter().any(|r| r.serial == serial));
            if listed {
                println!(
                    "{:>6.1} s  in the CRLs of every trust bundle the controller writes",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        let replaced = match who {
            None => true,
            Some((namespace, account)) => {
                let now = find_service_account(client, namespace, account).await?;
                if blocked {
                    now.is_none()
                } else {
                    now.and_then(|w| w.serial).is_some_and(|s| s != serial)
                }
            }
        };
        if listed && replaced {
            if who.is_some() {
                println!(
                    "{:>6.1} s  {}",
                    started.elapsed().as_secs_f64(),
                    if blocked {
                        "the Secret is deleted"
                    } else {
                        "re-issued with a new key"
                    }
                );
            }
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("not done after {timeout:?}; see kubectl get mtlsauthority {name} -o yaml");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub async fn unblock(client: Client, args: UnblockArgs) -> Result<()> {
    let authorities: Api<MTLSAuthority> = Api::all(client.clone());
    let authority = authorities
        .get_opt(&args.authority)
        .await?
        .ok_or_else(|| NotFound(format!("MTLSAuthority {} not found", args.authority)))?;
    let namespace = client.default_namespace().to_string();
    let entry = format!("{namespace}/{}", args.service_account);
    let mut blocked = blocked_list(&authority);
    if !blocked.contains(&entry) {
        return Err(NotFound(format!("ServiceAccount {entry} is not blocked")).into());
    }
    blocked.retain(|e| e != &entry);
    let value = if blocked.is_empty() {
        Value::Null
    } else {
        Value::String(blocked.join(","))
    };
    authorities
        .patch(
            &args.authority,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": { BLOCKED_ANNOTATION: value } } })),
        )
        .await
        .with_context(|| format!("annotating MTLSAuthority {}", args.authority))?;
    println!("unblocked ServiceAccount {entry}: it gets a certificate again");
    Ok(())
}
