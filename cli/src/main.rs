//! `kubectl-rolemesh`: status, rotate, inspect and trust-bundle for rolemesh identities.
//! Exit codes: 0 ok, 1 error, 2 usage, 3 not found or not ready.
#![forbid(unsafe_code)]

use std::{collections::BTreeMap, process::ExitCode};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use rolemesh_crds::MTLSPolicy;
use rolemesh_profile::{inspect::certificates_from_pem, inspect_certificate};
use serde::Serialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

const ROTATE_ANNOTATION: &str = "rolemesh.dev/rotate";
const TRUST_BUNDLE: &str = "rolemesh-trust-bundle";

/// Exit code for an object that does not exist or is not ready.
const NOT_FOUND: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-rolemesh",
    version,
    about = "rolemesh identities from kubectl: status, rotate, inspect, trust-bundle",
    after_help = "Exit codes: 0 success, 1 error, 2 usage error, 3 not found or not ready."
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Identities of the ServiceAccounts MTLSPolicies cover: role, verified, serial, expiry.
    Status {
        #[arg(short, long)]
        namespace: Option<String>,
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Re-issue now with new keys: every ServiceAccount of a policy, or one.
    Rotate {
        /// MTLSPolicy name.
        policy: String,
        #[arg(short, long)]
        namespace: Option<String>,
        /// Rotate only this ServiceAccount.
        #[arg(long)]
        service_account: Option<String>,
    },
    /// Decode a certificate Secret (NAME) or a PEM file (--file): SPIFFE ID, role, serial,
    /// validity, and whether its chain verifies against the trust bundle.
    Inspect {
        /// Secret name (`<serviceaccount>-rolemesh-tls`).
        secret: Option<String>,
        #[arg(short, long)]
        namespace: Option<String>,
        #[arg(long, conflicts_with = "secret")]
        file: Option<std::path::PathBuf>,
        /// PEM trust bundle to verify against (default: the namespace's rolemesh-trust-bundle).
        #[arg(long)]
        ca_file: Option<std::path::PathBuf>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Print the trust bundle in force in a namespace.
    TrustBundle {
        #[arg(short, long)]
        namespace: Option<String>,
    },
}

#[derive(Debug)]
struct NotFound(String);
impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for NotFound {}

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

fn print<T: Serialize>(value: &T, output: Output) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(value)?),
        // Each command prints its own table.
        Output::Table => {}
    }
    Ok(())
}

fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("   ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(headers.iter().map(|h| h.to_string()).collect()));
    for row in rows {
        println!("{}", line(row.clone()));
    }
}

async fn namespace_or_default(client: &Client, namespace: Option<String>) -> String {
    namespace.unwrap_or_else(|| client.default_namespace().to_string())
}

async fn status(
    client: Client,
    namespace: Option<String>,
    all: bool,
    output: Output,
) -> Result<()> {
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

async fn rotate(
    client: Client,
    policy: String,
    namespace: Option<String>,
    service_account: Option<String>,
) -> Result<()> {
    let namespace = namespace_or_default(&client, namespace).await;
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

fn field(data: &BTreeMap<String, k8s_openapi::ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

async fn trust_bundle_pem(client: &Client, namespace: &str) -> Result<String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    api.get_opt(TRUST_BUNDLE)
        .await?
        .and_then(|cm| cm.data)
        .and_then(|d| d.get("ca.crt").cloned())
        .ok_or_else(|| NotFound(format!("no trust bundle in namespace {namespace} (ConfigMap {TRUST_BUNDLE}); is an MTLSPolicy there?")).into())
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

fn verify_chain(chain: &[Vec<u8>], bundle_pem: &str) -> Result<()> {
    use rustls_pki_types::{CertificateDer, UnixTime};
    let anchors_der = certificates_from_pem(bundle_pem)?;
    let anchors = anchors_der
        .iter()
        .map(|d| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(d.as_slice()))
                .map(|a| a.to_owned())
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("the trust bundle holds an unusable certificate: {e:?}"))?;
    let leaf = CertificateDer::from(chain.first().context("no certificate")?.as_slice());
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let end_entity = webpki::EndEntityCert::try_from(&leaf).map_err(|e| anyhow!("{e:?}"))?;
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

async fn inspect(
    client: Option<Client>,
    secret: Option<String>,
    namespace: Option<String>,
    file: Option<std::path::PathBuf>,
    ca_file: Option<std::path::PathBuf>,
    output: Output,
) -> Result<bool> {
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
            let chain = field(&data, "tls.crt").context("the Secret has no tls.crt")?;
            let bundle = match field(&data, "ca.crt") {
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

async fn run(args: Args) -> Result<bool> {
    match args.command {
        Command::Status {
            namespace,
            all_namespaces,
            output,
        } => status(
            Client::try_default().await?,
            namespace,
            all_namespaces,
            output,
        )
        .await
        .map(|_| true),
        Command::Rotate {
            policy,
            namespace,
            service_account,
        } => rotate(
            Client::try_default().await?,
            policy,
            namespace,
            service_account,
        )
        .await
        .map(|_| true),
        Command::Inspect {
            secret,
            namespace,
            file,
            ca_file,
            output,
        } => {
            let client = if secret.is_some() {
                Some(Client::try_default().await?)
            } else {
                None
            };
            inspect(client, secret, namespace, file, ca_file, output).await
        }
        Command::TrustBundle { namespace } => {
            let client = Client::try_default().await?;
            let namespace = namespace_or_default(&client, namespace).await;
            print!("{}", trust_bundle_pem(&client, &namespace).await?);
            Ok(true)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) if error.downcast_ref::<NotFound>().is_some() => {
            eprintln!("error: {error}");
            ExitCode::from(NOT_FOUND)
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}
