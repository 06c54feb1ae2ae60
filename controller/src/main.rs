//! `rolemesh-controller`: flags and environment in, `rolemesh_controller::run` out.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use rolemesh_controller::{ControllerConfig, replica_identity, run};
use rolemesh_crds::names::WEBHOOK_NAME;
use rolemesh_profile::logging::{LogFormat, init_logging};

/// jemalloc gives the heap a burst of issuance freed back to the system after a few seconds;
/// glibc's malloc kept the burst's peak resident in the process.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Issues and rotates rolemesh workload certificates for the ServiceAccounts MTLSPolicies cover.
#[derive(Debug, Parser)]
#[command(name = "rolemesh-controller", version)]
struct Args {
    /// rolemesh's own namespace: local signer key, CA ConfigMap, leader lease, webhook Secrets.
    #[arg(long, env = "ROLEMESH_NAMESPACE", default_value = "rolemesh")]
    namespace: String,
    /// Name of the MTLSAuthority in force.
    #[arg(long, env = "ROLEMESH_AUTHORITY", default_value = "default")]
    authority: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "ROLEMESH_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Take part in leader election (only the leader issues).
    #[arg(long, env = "ROLEMESH_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the leader election Lease in --namespace.
    #[arg(
        long,
        env = "ROLEMESH_LEASE_NAME",
        default_value = "rolemesh-controller"
    )]
    lease_name: String,
    /// Certificates issued at once per policy.
    #[arg(long, env = "ROLEMESH_ISSUE_CONCURRENCY", default_value_t = 16)]
    issue_concurrency: usize,
    /// Webhook Service name: DNS names of the webhook serving certificate; empty to not manage
    /// the webhook's certificate at all.
    #[arg(
        long,
        env = "ROLEMESH_WEBHOOK_SERVICE",
        default_value = WEBHOOK_NAME
    )]
    webhook_service: String,
    /// MutatingWebhookConfiguration whose caBundle the controller keeps current.
    #[arg(
        long,
        env = "ROLEMESH_WEBHOOK_CONFIGURATION",
        default_value = WEBHOOK_NAME
    )]
    webhook_configuration: String,
    /// IP SANs of the webhook serving certificate (development mode with a webhook URL).
    #[arg(long, env = "ROLEMESH_WEBHOOK_IP", value_delimiter = ',')]
    webhook_ip: Vec<std::net::IpAddr>,
    /// Watch only this namespace (policies, ServiceAccounts, Secrets); all namespaces if unset.
    #[arg(long, env = "ROLEMESH_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// The cluster's DNS domain: certificates name each Service that selects a workload's pods
    /// as `<service>.<namespace>.svc.<domain>` too.
    #[arg(long, env = "ROLEMESH_CLUSTER_DOMAIN", default_value = rolemesh_controller::service_names::DEFAULT_CLUSTER_DOMAIN)]
    cluster_domain: String,
    /// Log format.
    #[arg(long, env = "ROLEMESH_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let args = Args::parse();
    init_logging(args.log_format);
    let client = kube::Client::try_default()
        .await
        .context("failed to connect to the Kubernetes API (kubeconfig or in-cluster)")?;
    let aws = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let webhook_tls = (!args.webhook_service.is_empty()).then(|| {
        let mut webhook = rolemesh_controller::webhook_tls::WebhookTlsConfig::for_service(
            &args.namespace,
            &args.webhook_service,
        );
        webhook.webhook_configuration =
            Some(args.webhook_configuration.clone()).filter(|c| !c.is_empty());
        webhook.ip_addresses = args.webhook_ip.clone();
        webhook
    });
    let config = ControllerConfig {
        namespace: args.namespace,
        authority: args.authority,
        metrics_listen: args.metrics_listen,
        leader_election: args.leader_election,
        lease_name: args.lease_name,
        identity: replica_identity(),
        issue_concurrency: args.issue_concurrency,
        watch_namespace: args.watch_namespace,
        webhook_tls,
        cluster_domain: args.cluster_domain,
    };
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => futures::future::pending::<()>().await } } => {}
        }
    };
    run(config, client, aws, shutdown).await?;
    Ok(())
}
