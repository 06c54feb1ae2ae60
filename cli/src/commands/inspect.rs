//! `inspect`: decodes a certificate Secret or PEM file and checks its chain against the trust
//! bundle.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use rolemesh_crds::names::{CA_CERT_KEY, TLS_CERT_KEY};
use rolemesh_profile::{
    TrustStore, Usage, inspect::certificates_from_pem, inspect_certificate, verify_chain_der,
};
use serde::Serialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::trust_bundle::trust_bundle_pem;
use crate::{NotFound, Output, namespace_or_default, print};

/// The arguments of `inspect` (its help is on `Command`).
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Secret name (`<serviceaccount>-rolemesh-tls`).
    pub secret: Option<String>,
    #[arg(short, long)]
    namespace: Option<String>,
    #[arg(long, conflicts_with = "secret")]
    file: Option<std::path::PathBuf>,
    /// PEM trust bundle to verify against (default: the namespace's rolemesh-trust-bundle).
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
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
        namespace,
        file,
        ca_file,
        output,
    } = args;
    let (chain_pem, default_bundle) = match (&secret, &file) {
        (_, Some(path)) => (
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
            None,
        ),
        (Some(name), None) => {
            let client = client.context("a Kubernetes connection is needed to read a Secret")?;
            let namespace = namespace_or_default(&client, namespace).await;
            let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
            let found = api
                .get_opt(name)
                .await?
                .ok_or_else(|| NotFound(format!("Secret {namespace}/{name} not found")))?;
            let data = found.data.unwrap_or_default();
            let chain = field(&data, TLS_CERT_KEY)
                .with_context(|| format!("the Secret has no {TLS_CERT_KEY}"))?;
            let bundle = match field(&data, CA_CERT_KEY) {
                Some(b) => Some(b),
                None => trust_bundle_pem(&client, &namespace).await.ok(),
            };
            (chain, bundle)
        }
        (None, None) => bail!("give a Secret name or --file"),
    };
    let bundle = match &ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => default_bundle,
    };
    let chain = certificates_from_pem(&chain_pem)?;
    let info = inspect_certificate(chain.first().context("no PEM certificate found")?)?;
    let identity = info.workload_identity();
    let (chain_verified, verification) = match &bundle {
        Some(bundle) => match verify_chain(&chain, bundle) {
            Ok(()) => (true, "chain verifies against the trust bundle".to_string()),
            Err(e) => (false, format!("chain does not verify: {e}")),
        },
        None => (
            false,
            "no trust bundle to verify against (give --ca-file)".to_string(),
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
