//! `version`: this plugin's version and the rolemesh controllers the cluster runs, as `linkerd
//! version` and `cmctl version` show client and server side by side.

use anyhow::{Context as _, Result};
use k8s_openapi::api::apps::v1::Deployment;
use kube::{Api, Client, ResourceExt, api::ListParams};
use serde::Serialize;

use crate::{Output, print, table};

/// The labels the chart puts on the controller's Deployment.
const CONTROLLER_SELECTOR: &str =
    "app.kubernetes.io/name=rolemesh,app.kubernetes.io/component=controller";
const VERSION_LABEL: &str = "app.kubernetes.io/version";

#[derive(Debug, clap::Args)]
pub struct VersionArgs {
    /// Print only this plugin's version; do not contact the cluster.
    #[arg(long)]
    client: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Versions {
    client: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    controllers: Option<Vec<Controller>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Controller {
    namespace: String,
    deployment: String,
    version: String,
    image: String,
    ready_replicas: i32,
}

impl VersionArgs {
    pub fn client_only(&self) -> bool {
        self.client
    }
}

/// Without a client (`--client`) only the plugin's version; a cluster without a controller is an
/// answer, not an error (the plugin also works before `helm install`).
pub async fn version(client: Option<Client>, args: VersionArgs) -> Result<()> {
    let mut versions = Versions {
        client: env!("CARGO_PKG_VERSION").to_string(),
        controllers: None,
    };
    if let Some(client) = client {
        let deployments: Api<Deployment> = Api::all(client);
        let found = deployments
            .list(&ListParams::default().labels(CONTROLLER_SELECTOR))
            .await
            .context("listing rolemesh controller Deployments (label app.kubernetes.io/component=controller)")?;
        versions.controllers = Some(
            found
                .items
                .iter()
                .map(|d| Controller {
                    namespace: d.namespace().unwrap_or_default(),
                    deployment: d.name_any(),
                    version: d.labels().get(VERSION_LABEL).cloned().unwrap_or_default(),
                    image: d
                        .spec
                        .as_ref()
                        .and_then(|s| s.template.spec.as_ref())
                        .and_then(|s| s.containers.first())
                        .and_then(|c| c.image.clone())
                        .unwrap_or_default(),
                    ready_replicas: d
                        .status
                        .as_ref()
                        .and_then(|s| s.ready_replicas)
                        .unwrap_or(0),
                })
                .collect(),
        );
    }
    if !matches!(args.output, Output::Table) {
        return print(&versions, args.output);
    }
    println!("Client: {}", versions.client);
    match &versions.controllers {
        None => {}
        Some(controllers) if controllers.is_empty() => {
            println!("Controller: none found (is the rolemesh chart installed?)");
        }
        Some(controllers) => {
            let rows: Vec<Vec<String>> = controllers
                .iter()
                .map(|c| {
                    vec![
                        c.namespace.clone(),
                        c.deployment.clone(),
                        c.version.clone(),
                        c.ready_replicas.to_string(),
                        c.image.clone(),
                    ]
                })
                .collect();
            table(
                &["NAMESPACE", "CONTROLLER", "VERSION", "READY", "IMAGE"],
                &rows,
            );
        }
    }
    Ok(())
}
