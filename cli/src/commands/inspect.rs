//! `inspect`: decodes a certificate Secret or PEM file and checks its chain against the trust
//! bundle in force: the one the controller records in the MTLSAuthority's status, CRLs included.
//! Not the Secret's `ca.crt` nor the namespace's `rolemesh-trust-bundle`: whoever may edit
//! Secrets or ConfigMaps in the namespace can write those, and a check against them would pass
//! a certificate under a CA they added.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{Api, Client};
use rolemesh_crds::{
    MTLSAuthority,
    names::{INJECTED_ANNOTATION, TLS_CERT_KEY, workload_secret_name},
};
use rolemesh_profile::{
    TrustStore, Usage, inspect::certificates_from_pem, inspect_certificate, verify_chain_der,
};
use serde::Serialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{NotFound, Output, print};

/// The arguments of `inspect` (its help is on `Command`).
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Secret name (`<serviceaccount>-rolemesh-tls`).
    pub secret: Option<String>,
    /// A PEM file to decode instead of a Secret (the certificate first, then its chain).
    #[arg(long, conflicts_with = "secret")]
    file: Option<std::path::PathBuf>,
    /// PEM trust bundle to verify against instead of the MTLSAuthority's.
    #[arg(long)]
    pub ca_file: Option<std::path::PathBuf>,
    /// The MTLSAuthority whose trust bundle (status.trustBundle, with its CRLs) the chain is
    /// verified against.
    #[arg(long, default_value = "default", env = "ROLEMESH_AUTHORITY")]
    authority: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
}

/// The arguments of `identity` (its help is on `Command`).
#[derive(Debug, clap::Args)]
pub struct IdentityArgs {
    /// The pod (in the namespace of -n).
    pod: String,
    /// The MTLSAuthority whose trust bundle the chain is verified against.
    #[arg(long, default_value = "default", env = "ROLEMESH_AUTHORITY")]
    authority: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
}

/// The identity a pod's proxy serves: the certificate Secret its injected proxy mounts, decoded
/// and verified as `inspect` does.
pub async fn identity(client: Client, args: IdentityArgs) -> Result<bool> {
    let namespace = client.default_namespace().to_string();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pod = pods
        .get_opt(&args.pod)
        .await?
        .ok_or_else(|| NotFound(format!("pod {namespace}/{} not found", args.pod)))?;
    let injected = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
    let spec = pod.spec.unwrap_or_default();
    let account = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    let expected = workload_secret_name(&account);
    // The Secret the proxy really mounts, not the one the name rule predicts.
    let mounted = spec
        .volumes
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| v.secret.and_then(|s| s.secret_name))
        .find(|name| *name == expected);
    let secret = match (injected, mounted) {
        (true, Some(secret)) => secret,
        (false, _) => {
            return Err(NotFound(format!(
                "pod {namespace}/{} has no rolemesh proxy (no {INJECTED_ANNOTATION} annotation): it was created before injection was enabled for it, or is not opted in",
                args.pod
            ))
            .into());
        }
        (true, None) => bail!(
            "pod {namespace}/{} is injected but mounts no Secret {expected} of its ServiceAccount {account}",
            args.pod
        ),
    };
    if matches!(args.output, Output::Table) {
        println!(
            "pod:          {namespace}/{} (ServiceAccount {account})",
            args.pod
        );
        println!("Secret:       {secret} (mounted by its proxy)");
    }
    inspect(
        Some(client),
        InspectArgs {
            secret: Some(secret),
            file: None,
            ca_file: None,
            authority: args.authority,
            output: args.output,
        },
    )
    .await
}

fn field(data: &BTreeMap<String, k8s_openapi::ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Inspection {
    spiffe_id: Option<String>,
    role_arn: Option<String>,
    serial: String,
    not_before: String,
    not_after: String,
    valid_now: bool,
    chain_length: usize,
    chain_verified: bool,
    verification: String,
}

/// The trust bundle in force, as the controller recorded it in the MTLSAuthority's status.
async fn authority_bundle(client: &Client, name: &str) -> Result<String> {
    let api: Api<MTLSAuthority> = Api::all(client.clone());
    let authority = api.get_opt(name).await.with_context(|| {
        format!("reading MTLSAuthority {name} for its trust bundle (or give --ca-file)")
    })?;
    let authority = authority.ok_or_else(|| {
        NotFound(format!(
            "MTLSAuthority {name} not found: name the one in force with --authority, or give --ca-file"
        ))
    })?;
    authority
        .status
        .and_then(|status| status.trust_bundle)
        .ok_or_else(|| {
            NotFound(format!(
                "MTLSAuthority {name} records no trust bundle in its status yet: is the controller running and the authority Ready?"
            ))
            .into()
        })
}

/// The proxies' own chain check (rustls-webpki, with the bundle's CRLs), so `inspect` agrees with
/// what a peer proxy would decide.
fn verify_chain(chain: &[Vec<u8>], bundle_pem: &str) -> Result<()> {
    let trust = TrustStore::from_pem(bundle_pem)?;
    verify_chain_der(
        chain,
        &trust,
        Usage::ClientAuth,
        rustls_pki_types::UnixTime::now(),
    )?;
    Ok(())
}

/// Whether the certificate is valid now and its chain verifies.
pub async fn inspect(client: Option<Client>, args: InspectArgs) -> Result<bool> {
    let InspectArgs {
        secret,
        file,
        ca_file,
        authority,
        output,
    } = args;
    let chain_pem = match (&secret, &file) {
        (_, Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        (Some(name), None) => {
            let client = client
                .as_ref()
                .context("a Kubernetes connection is needed to read a Secret")?;
            let namespace = client.default_namespace().to_string();
            let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
            let found = api
                .get_opt(name)
                .await?
                .ok_or_else(|| NotFound(format!("Secret {namespace}/{name} not found")))?;
            let data = found.data.unwrap_or_default();
            field(&data, TLS_CERT_KEY)
                .with_context(|| format!("the Secret has no {TLS_CERT_KEY}"))?
        }
        (None, None) => bail!("give a Secret name or --file"),
    };
    let bundle = match (&ca_file, &client) {
        (Some(path), _) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        (None, Some(client)) => authority_bundle(client, &authority).await?,
        (None, None) => bail!(
            "no trust bundle to verify against: give --ca-file, or a Kubernetes connection to read MTLSAuthority {authority}"
        ),
    };
    let chain = certificates_from_pem(&chain_pem)?;
    let info = inspect_certificate(chain.first().context("no PEM certificate found")?)?;
    let identity = info.workload_identity();
    let source = match &ca_file {
        Some(path) => path.display().to_string(),
        None => format!("MTLSAuthority {authority}"),
    };
    let (chain_verified, verification) = match verify_chain(&chain, &bundle) {
        Ok(()) => (
            true,
            format!("chain verifies against the trust bundle of {source}"),
        ),
        Err(e) => (
            false,
            format!("chain does not verify against the trust bundle of {source}: {e:#}"),
        ),
    };
    let report = Inspection {
        spiffe_id: identity
            .as_ref()
            .ok()
            .map(|i| i.spiffe_id.to_string())
            .or_else(|| info.uri_sans.first().cloned()),
        role_arn: info.role_arn.clone(),
        serial: info.serial_hex.clone(),
        not_before: info.not_before.format(&Rfc3339)?,
        not_after: info.not_after.format(&Rfc3339)?,
        valid_now: info.is_valid_at(OffsetDateTime::now_utc()),
        chain_length: chain.len(),
        chain_verified,
        verification,
    };
    match output {
        Output::Table => {
            println!(
                "SPIFFE ID:    {}",
                report.spiffe_id.as_deref().unwrap_or("-")
            );
            println!(
                "IAM role:     {}",
                report.role_arn.as_deref().unwrap_or("-")
            );
            println!("serial:       {}", report.serial);
            println!(
                "valid:        {} to {} ({})",
                report.not_before,
                report.not_after,
                if report.valid_now {
                    "valid now"
                } else {
                    "NOT valid now"
                }
            );
            println!(
                "chain:        {} certificate(s); {}",
                report.chain_length, report.verification
            );
            if let Err(e) = identity {
                println!("profile:      {e}");
            }
        }
        other => print(&report, other)?,
    }
    Ok(report.chain_verified && report.valid_now)
}
