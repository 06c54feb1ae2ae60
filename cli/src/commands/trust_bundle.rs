//! `trust-bundle`: the CA certificates a namespace's workloads trust.

use anyhow::Result;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};
use rolemesh_crds::names::{TRUST_BUNDLE_CONFIGMAP, TRUST_BUNDLE_KEY};

use crate::NotFound;

/// Prints the bundle of the client's namespace (`-n`, else the context's).
pub async fn trust_bundle(client: Client) -> Result<()> {
    let namespace = client.default_namespace().to_string();
    print!("{}", trust_bundle_pem(&client, &namespace).await?);
    Ok(())
}

pub async fn trust_bundle_pem(client: &Client, namespace: &str) -> Result<String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    api.get_opt(TRUST_BUNDLE_CONFIGMAP)
        .await?
        .and_then(|cm| cm.data)
        .and_then(|d| d.get(TRUST_BUNDLE_KEY).cloned())
        .ok_or_else(|| NotFound(format!("no trust bundle in namespace {namespace} (ConfigMap {TRUST_BUNDLE_CONFIGMAP}); is an MTLSPolicy there?")).into())
}
