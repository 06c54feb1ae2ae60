//! `kubectl-rolemesh`: status, rotate, inspect and trust-bundle for rolemesh identities.
//! Exit codes: 0 ok, 1 error, 2 usage, 3 not found or not ready.

mod commands;
mod connection;

use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::commands::{
    ca::{CaArgs, ca},
    can::{CanArgs, can},
    check::{CheckArgs, check},
    inspect::{IdentityArgs, InspectArgs, identity, inspect},
    revoke::{RevokeArgs, UnblockArgs, revoke, unblock},
    rotate::{RotateArgs, rotate},
    status::{StatusArgs, status},
    trust_bundle::trust_bundle,
    version::{VersionArgs, version},
};
use crate::connection::Connection;

/// Exit code for an object that does not exist or is not ready.
const NOT_FOUND: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-rolemesh",
    version,
    about = "rolemesh from kubectl: status, rotate, inspect, trust-bundle, ca, revoke, check, version",
    after_help = "Exit codes: 0 success, 1 error, 2 usage error, 3 not found or not ready."
)]
struct Args {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Identities of the ServiceAccounts MTLSPolicies cover: role, verified, serial, expiry; and
    /// pods that need a restart to run their policy's current mappings and ports (--pods).
    Status(StatusArgs),
    /// Re-issue now with new keys: every ServiceAccount of a policy, one of them, or every policy
    /// a selector picks (--all -l); --wait until the new certificates are issued.
    Rotate(RotateArgs),
    /// Decode a certificate Secret (NAME) or a PEM file (--file): SPIFFE ID, role, serial,
    /// validity, and whether its chain verifies against the trust bundle.
    Inspect(InspectArgs),
    /// The identity a pod's proxy serves (from the certificate Secret it mounts): SPIFFE ID,
    /// role, serial, validity, and whether its chain verifies.
    Identity(IdentityArgs),
    /// Would a connection from a pod or ServiceAccount to a Service be allowed, and by which
    /// rule: the server's inbound `allow`, and the client's outbound `expect` if it has a mapping.
    Can(CanArgs),
    /// Print the trust bundle in force in a namespace.
    TrustBundle,
    /// The CAs and their phases (status), and their staged rotation: rotate, prepare, activate,
    /// retire.
    Ca(CaArgs),
    /// Revoke a workload certificate (the one a ServiceAccount holds, or by serial): listed in a
    /// CRL in every trust bundle, and the workload re-issued; --block keeps it without one.
    Revoke(RevokeArgs),
    /// Lift a `revoke --block`: the ServiceAccount gets a certificate again.
    Unblock(UnblockArgs),
    /// Is rolemesh installable (--pre) or working: CRDs served, a controller leader, the webhook
    /// reachable through the API server, clocks, the MTLSAuthority Ready, trust bundles present.
    Check(CheckArgs),
    /// This plugin's version and the version of each rolemesh controller in the cluster.
    Version(VersionArgs),
    /// Print a shell completion script for kubectl-rolemesh, e.g.
    /// `source <(kubectl-rolemesh completion bash)`.
    Completion {
        /// The shell: bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug)]
pub struct NotFound(String);
impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for NotFound {}

pub fn print<T: Serialize>(value: &T, output: Output) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", yaml_serde::to_string(value)?),
        // Each command prints its own table.
        Output::Table => {}
    }
    Ok(())
}

pub fn table(headers: &[&str], rows: &[Vec<String>]) {
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

async fn run(args: Args) -> Result<bool> {
    let connection = args.connection;
    match args.command {
        Command::Status(args) => status(connection.client().await?, args).await.map(|_| true),
        Command::Rotate(args) => rotate(connection.client().await?, args).await.map(|_| true),
        Command::Inspect(args) => {
            // A Secret is read from the cluster, and so is the trust bundle unless --ca-file.
            let client = if args.secret.is_some() || args.ca_file.is_none() {
                Some(connection.client().await?)
            } else {
                None
            };
            inspect(client, args).await
        }
        Command::Revoke(args) => revoke(connection.client().await?, args).await.map(|_| true),
        Command::Unblock(args) => unblock(connection.client().await?, args)
            .await
            .map(|_| true),
        Command::Ca(args) => ca(connection.client().await?, args).await.map(|_| true),
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Args::command(),
                "kubectl-rolemesh",
                &mut std::io::stdout(),
            );
            Ok(true)
        }
        Command::Identity(args) => identity(connection.client().await?, args).await,
        Command::Can(args) => can(connection.client().await?, args).await,
        Command::Check(args) => check(connection.client().await?, args).await,
        Command::Version(args) => {
            // The client's version is printed even where no cluster is configured.
            let client = if args.client_only() {
                None
            } else {
                Some(connection.client().await?)
            };
            version(client, args).await.map(|_| true)
        }
        Command::TrustBundle => trust_bundle(connection.client().await?).await.map(|_| true),
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
