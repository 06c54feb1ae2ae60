//! `ca`: the CAs of the MTLSAuthority and their phases, and the requests that move them
//! (annotations the controller acts on, as `rotate` does for workloads).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
};
use rolemesh_crds::{
    CaPhase, CaStatus, MTLSAuthority,
    names::{
        CA_ACTIVATE_ANNOTATION, CA_PREPARE_ANNOTATION, CA_RETIRE_ANNOTATION, CA_ROTATE_ANNOTATION,
        MANAGED_SELECTOR, TRUST_BUNDLE_CONFIGMAP, TRUST_BUNDLE_KEY,
    },
};
use rolemesh_profile::{
    inspect::{certificates_from_pem, sha256_hex},
    parse_duration,
};
use serde::Serialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{NotFound, Output, print, table};

/// How long kubelet is given by default (the controller's default of spec.bundlePropagation).
const DEFAULT_PROPAGATION: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_secs(2);

#[derive(Debug, clap::Args)]
pub struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
    /// The MTLSAuthority.
    #[arg(long, default_value = "default", global = true)]
    authority: String,
}

#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// Wait until the controller has done it, printing each stage as it ends.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, as a Go duration.
    #[arg(long, default_value = "30m")]
    timeout: String,
}

#[derive(Debug, clap::Subcommand)]
enum CaCommand {
    /// Every CA of the authority: phase, fingerprint, subject, expiry, and what it waits for.
    Status {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Rotate in stages: prepare a new CA (into every bundle), activate it once kubelet has
    /// brought the bundles into the pods, retire the old one once its certificates are replaced.
    Rotate(WaitArgs),
    /// Only the first stage: a new CA into every bundle, signing nothing until `ca activate`.
    Prepare(WaitArgs),
    /// Activate the prepared CA (FINGERPRINT or a unique prefix) once its bundles have reached
    /// the pods.
    Activate {
        fingerprint: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Drop a CA now (FINGERPRINT or a unique prefix), e.g. a compromised one: every certificate
    /// it signed is re-issued under the active CA (a new CA first when it is the active one),
    /// then it leaves every bundle without waiting for kubelet.
    Retire {
        fingerprint: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

pub async fn ca(client: Client, args: CaArgs) -> Result<()> {
    let authorities: Api<MTLSAuthority> = Api::all(client.clone());
    let authority = authorities.get_opt(&args.authority).await?.ok_or_else(|| {
        NotFound(format!(
            "MTLSAuthority {} not found; the chart creates it with authority.create=true",
            args.authority
        ))
    })?;
    let session = Session {
        client,
        authorities,
        name: args.authority.clone(),
    };
    match args.command {
        CaCommand::Status { output } => show_status(&authority, output),
        CaCommand::Rotate(wait) => {
            let token = now_token()?;
            let before = active(&authority).map(|ca| ca.fingerprint.clone());
            session.annotate(CA_ROTATE_ANNOTATION, &token).await?;
            println!(
                "CA rotation requested: {CA_ROTATE_ANNOTATION}={token} on MTLSAuthority {}",
                session.name
            );
            if wait.wait {
                session
                    .follow(timeout(&wait)?, |status, _| {
                        status.last_rotate_request.as_deref() == Some(token.as_str())
                            && !status.cas.iter().any(|ca| {
                                Some(&ca.fingerprint) == before.as_ref()
                                    || ca.phase == CaPhase::Prepared
                            })
                    })
                    .await?;
                if let Some(old) = &before {
                    session.wait_out_of_bundles(old, timeout(&wait)?).await?;
                }
                println!("rotation done");
            }
            Ok(())
        }
        CaCommand::Prepare(wait) => {
            let token = now_token()?;
            session.annotate(CA_PREPARE_ANNOTATION, &token).await?;
            println!("CA preparation requested: {CA_PREPARE_ANNOTATION}={token}");
            if wait.wait {
                session
                    .follow(timeout(&wait)?, |status, _| {
                        status.last_prepare_request.as_deref() == Some(token.as_str())
                            && status
                                .cas
                                .iter()
                                .any(|ca| ca.phase == CaPhase::Prepared && ca.settled_at.is_some())
                    })
                    .await?;
            }
            Ok(())
        }
        CaCommand::Activate { fingerprint, wait } => {
            let target = resolve(&authority, &fingerprint)?;
            if target.phase != CaPhase::Prepared {
                bail!(
                    "CA {} is {}, not Prepared: only a prepared CA can be activated (kubectl rolemesh ca prepare)",
                    target.fingerprint,
                    target.phase.as_str()
                );
            }
            session
                .annotate(CA_ACTIVATE_ANNOTATION, &target.fingerprint)
                .await?;
            println!(
                "activation requested for CA {}: it signs once its bundles have reached the pods",
                target.fingerprint
            );
            if wait.wait {
                let fingerprint = target.fingerprint.clone();
                session
                    .follow(timeout(&wait)?, |status, _| {
                        active_in(&status.cas).is_some_and(|ca| ca.fingerprint == fingerprint)
                    })
                    .await?;
            }
            Ok(())
        }
        CaCommand::Retire { fingerprint, wait } => {
            let target = resolve(&authority, &fingerprint)?;
            session
                .annotate(CA_RETIRE_ANNOTATION, &target.fingerprint)
                .await?;
            println!(
                "retirement requested for {} CA {}",
                target.phase.as_str(),
                target.fingerprint
            );
            if wait.wait {
                let fingerprint = target.fingerprint.clone();
                session
                    .follow(timeout(&wait)?, |status, _| {
                        !status.cas.iter().any(|ca| ca.fingerprint == fingerprint)
                            && active_in(&status.cas).is_some()
                    })
                    .await?;
                session
                    .wait_out_of_bundles(&fingerprint, timeout(&wait)?)
                    .await?;
                println!("CA {fingerprint} is in no trust bundle");
            }
            Ok(())
        }
    }
}

struct Session {
    client: Client,
    authorities: Api<MTLSAuthority>,
    name: String,
}

impl Session {
    async fn annotate(&self, key: &str, value: &str) -> Result<()> {
        let patch =
            Patch::Merge(serde_json::json!({ "metadata": { "annotations": { key: value } } }));
        self.authorities
            .patch(&self.name, &PatchParams::default(), &patch)
            .await
            .with_context(|| format!("annotating MTLSAuthority {} with {key}", self.name))?;
        Ok(())
    }

    /// Polls the authority's status until `done`, printing each phase change with the time it
    /// took since the one before.
    async fn follow(
        &self,
        timeout: Duration,
        done: impl Fn(&rolemesh_crds::MTLSAuthorityStatus, &[CaStatus]) -> bool,
    ) -> Result<()> {
        let started = Instant::now();
        let mut stage = Instant::now();
        let mut seen: Vec<(String, CaPhase)> = phases(
            &self
                .authorities
                .get(&self.name)
                .await?
                .status
                .unwrap_or_default()
                .cas,
        );
        loop {
            let status = self
                .authorities
                .get(&self.name)
                .await?
                .status
                .unwrap_or_default();
            let now = phases(&status.cas);
            for (fingerprint, phase) in &now {
                if !seen.contains(&(fingerprint.clone(), *phase)) {
                    println!(
                        "{:>8.1} s  CA {} {}",
                        stage.elapsed().as_secs_f64(),
                        short(fingerprint),
                        describe_phase(*phase)
                    );
                    stage = Instant::now();
                }
            }
            for (fingerprint, _) in &seen {
                if !now.iter().any(|(f, _)| f == fingerprint) {
                    println!(
                        "{:>8.1} s  CA {} retired: in no bundle the controller writes",
                        stage.elapsed().as_secs_f64(),
                        short(fingerprint)
                    );
                    stage = Instant::now();
                }
            }
            seen = now;
            if done(&status, &status.cas) {
                println!("{:>8.1} s  in all", started.elapsed().as_secs_f64());
                return Ok(());
            }
            if started.elapsed() > timeout {
                bail!(
                    "not done after {:?}; see kubectl rolemesh ca status and the controller's log",
                    timeout
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until no `rolemesh-trust-bundle` ConfigMap in the cluster holds the CA.
    async fn wait_out_of_bundles(&self, fingerprint: &str, timeout: Duration) -> Result<()> {
        let configmaps: Api<ConfigMap> = Api::all(self.client.clone());
        let started = Instant::now();
        loop {
            let list = configmaps
                .list(
                    &ListParams::default()
                        .labels(MANAGED_SELECTOR)
                        .fields(&format!("metadata.name={TRUST_BUNDLE_CONFIGMAP}")),
                )
                .await
                .context("listing the trust bundle ConfigMaps")?;
            let holding: Vec<String> = list
                .items
                .iter()
                .filter(|cm| {
                    cm.data
                        .as_ref()
                        .and_then(|d| d.get(TRUST_BUNDLE_KEY))
                        .and_then(|pem| certificates_from_pem(pem).ok())
                        .is_some_and(|ders| ders.iter().any(|der| sha256_hex(der) == fingerprint))
                })
                .filter_map(|cm| cm.metadata.namespace.clone())
                .collect();
            if holding.is_empty() {
                return Ok(());
            }
            if started.elapsed() > timeout {
                bail!(
                    "the trust bundles of namespace(s) {} still hold CA {fingerprint}",
                    holding.join(", ")
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

fn phases(cas: &[CaStatus]) -> Vec<(String, CaPhase)> {
    cas.iter()
        .map(|ca| (ca.fingerprint.clone(), ca.phase))
        .collect()
}

fn describe_phase(phase: CaPhase) -> &'static str {
    match phase {
        CaPhase::Prepared => "prepared: in every bundle, signing nothing",
        CaPhase::Active => "active: signs every new certificate",
        CaPhase::Retiring => "retiring: signs nothing, trusted until its certificates are replaced",
    }
}

fn now_token() -> Result<String> {
    Ok(OffsetDateTime::now_utc().format(&Rfc3339)?)
}

fn timeout(wait: &WaitArgs) -> Result<Duration> {
    parse_duration(&wait.timeout).with_context(|| format!("--timeout {}", wait.timeout))
}

fn short(fingerprint: &str) -> &str {
    fingerprint.get(..16).unwrap_or(fingerprint)
}

fn active_in(cas: &[CaStatus]) -> Option<&CaStatus> {
    cas.iter().find(|ca| ca.phase == CaPhase::Active)
}

fn active(authority: &MTLSAuthority) -> Option<&CaStatus> {
    authority.status.as_ref().and_then(|s| active_in(&s.cas))
}

/// The CA a fingerprint or a unique prefix of one (8 characters at least) names.
fn resolve<'a>(authority: &'a MTLSAuthority, fingerprint: &str) -> Result<&'a CaStatus> {
    let wanted = fingerprint.to_ascii_lowercase().replace(':', "");
    if wanted.len() < 8 {
        bail!(
            "give at least 8 characters of the fingerprint (kubectl rolemesh ca status shows them)"
        );
    }
    let cas = authority
        .status
        .as_ref()
        .map(|s| s.cas.as_slice())
        .unwrap_or_default();
    let matching: Vec<&CaStatus> = cas
        .iter()
        .filter(|ca| ca.fingerprint.starts_with(&wanted))
        .collect();
    match matching.as_slice() {
        [one] => Ok(one),
        [] => Err(NotFound(format!(
            "no CA of MTLSAuthority {} has a fingerprint starting {wanted}; kubectl rolemesh ca status lists them",
            authority.metadata.name.clone().unwrap_or_default()
        ))
        .into()),
        _ => bail!("{wanted} is the start of {} fingerprints: give more of it", matching.len()),
    }
}

/// One row of `ca status`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CaRow {
    phase: String,
    fingerprint: String,
    subject: String,
    not_after: String,
    since: String,
    next: String,
}

fn show_status(authority: &MTLSAuthority, output: Output) -> Result<()> {
    let propagation = authority
        .spec
        .bundle_propagation
        .as_deref()
        .and_then(|text| parse_duration(text).ok())
        .unwrap_or(DEFAULT_PROPAGATION);
    let cas = authority
        .status
        .as_ref()
        .map(|s| s.cas.clone())
        .unwrap_or_default();
    if cas.is_empty() {
        return Err(NotFound(format!(
            "MTLSAuthority {} records no CA yet; is the controller running? (kubectl get mtlsauthority {} -o yaml)",
            authority.metadata.name.clone().unwrap_or_default(),
            authority.metadata.name.clone().unwrap_or_default()
        ))
        .into());
    }
    let after = |at: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time| {
        OffsetDateTime::from_unix_timestamp(at.0.as_second() + propagation.as_secs() as i64)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_default()
    };
    let rows: Vec<CaRow> = cas
        .iter()
        .map(|ca| CaRow {
            phase: ca.phase.as_str().into(),
            fingerprint: ca.fingerprint.clone(),
            subject: ca.subject.clone(),
            not_after: ca.not_after.0.to_string(),
            since: ca.since.0.to_string(),
            next: match (ca.phase, &ca.settled_at) {
                (CaPhase::Active, _) => "signs".into(),
                (CaPhase::Prepared, None) => "waiting for every trust bundle to hold it".into(),
                (CaPhase::Prepared, Some(at)) if ca.auto_activate => {
                    format!("activates at {}", after(at))
                }
                (CaPhase::Prepared, Some(_)) => {
                    "in every bundle; waits for kubectl rolemesh ca activate".into()
                }
                (CaPhase::Retiring, None) => {
                    "waiting for its certificates to be re-issued or to expire".into()
                }
                (CaPhase::Retiring, Some(at)) => format!("leaves the bundles at {}", after(at)),
            },
        })
        .collect();
    match output {
        Output::Table => {
            table(
                &["PHASE", "FINGERPRINT", "NOT AFTER", "SINCE", "NEXT"],
                &rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.phase.clone(),
                            short(&r.fingerprint).to_string(),
                            r.not_after.clone(),
                            r.since.clone(),
                            r.next.clone(),
                        ]
                    })
                    .collect::<Vec<_>>(),
            );
            Ok(())
        }
        _ => print(&rows, output),
    }
}
