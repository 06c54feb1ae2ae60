//! kubectl's connection flags. kubectl hands a plugin every flag written after the plugin's name
//! and none of its own, so `kubectl rolemesh status --context prod -n shop` works only if the
//! plugin reads them as kubectl does: the same names, the same kubeconfig rules.

use std::path::PathBuf;

use anyhow::{Context, Result};
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

#[derive(Clone, Debug, Default, clap::Args)]
#[command(next_help_heading = "Connection (kubectl's flags)")]
pub struct Connection {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then the
    /// in-cluster configuration), as kubectl's --kubeconfig.
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current-context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The kubeconfig cluster to use, overriding the context's.
    #[arg(long, global = true, value_name = "NAME")]
    pub cluster: Option<String>,
    /// The kubeconfig user to use, overriding the context's.
    #[arg(long, global = true, value_name = "NAME")]
    pub user: Option<String>,
    /// The namespace to work in (default: the context's namespace, else `default`).
    #[arg(short, long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// A user to impersonate (your identity needs the `impersonate` verb), as kubectl's --as.
    #[arg(long = "as", global = true, value_name = "USER")]
    pub as_user: Option<String>,
    /// A group to impersonate; repeat for several, as kubectl's --as-group.
    #[arg(long = "as-group", global = true, value_name = "GROUP")]
    pub as_group: Vec<String>,
}

impl Connection {
    /// A client for the cluster these flags name, its default namespace the one they name.
    pub async fn client(&self) -> Result<Client> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            cluster: self.cluster.clone(),
            user: self.user.clone(),
        };
        let named =
            options.context.is_some() || options.cluster.is_some() || options.user.is_some();
        let mut config = match &self.kubeconfig {
            Some(path) => {
                let file = Kubeconfig::read_from(path)
                    .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
                Config::from_custom_kubeconfig(file, &options)
                    .await
                    .with_context(|| format!("using the kubeconfig {}", path.display()))?
            }
            // A context, cluster or user named on the command line can only come from a
            // kubeconfig; without one, the in-cluster configuration is a fallback too.
            None if named => Config::from_kubeconfig(&options)
                .await
                .context("using the kubeconfig ($KUBECONFIG or ~/.kube/config)")?,
            None => Config::infer().await.context(
                "finding a cluster: no kubeconfig ($KUBECONFIG, ~/.kube/config) and not in a pod",
            )?,
        };
        if let Some(namespace) = &self.namespace {
            config.default_namespace = namespace.clone();
        }
        if let Some(user) = &self.as_user {
            config.auth_info.impersonate = Some(user.clone());
        }
        if !self.as_group.is_empty() {
            config.auth_info.impersonate_groups = Some(self.as_group.clone());
        }
        Client::try_from(config).context("building the Kubernetes client")
    }
}
