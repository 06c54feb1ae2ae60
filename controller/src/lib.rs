//! rolemesh's controller: turns every ServiceAccount an MTLSPolicy covers into a verified IAM-role
//! identity with a certificate Secret signed by a CA whose key stays in KMS (or, for
//! development, in a Secret), keeps the trust bundles current and rotates on request; and keeps
//! the webhook's serving certificate current.

pub mod authority;
pub mod ca;
pub mod certificate;
pub mod context;
pub mod error;
pub mod identity;
pub mod leader;
pub mod metrics;
pub mod policy;
pub mod reverify;
pub mod rotation;
pub mod service_names;
pub mod signer;
pub mod status;
pub mod webhook_tls;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::{StreamExt, TryStreamExt, future};
use k8s_openapi::api::core::v1::{Pod, Secret, Service, ServiceAccount};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        Controller, Predicate, WatchStreamExt,
        events::{Recorder, Reporter},
        predicates, reflector, watcher,
    },
};
use rolemesh_crds::{
    MTLSPolicy,
    names::{MANAGED_SELECTOR, ROTATE_ANNOTATION},
};
use rolemesh_profile::ROLE_ARN_ANNOTATION;
use tokio::sync::{mpsc, watch};
use tracing::info;

pub use crate::error::{Error, Result};
use crate::{
    authority::maintain_ca,
    context::{Caches, Context, WriteShadow},
    leader::LeaseConfig,
    metrics::Metrics,
    policy::select::policies_for_service_account,
    webhook_tls::WebhookTlsConfig,
};

/// The controller's name in Events and its field manager in server-side applies.
pub const CONTROLLER_NAME: &str = "rolemesh-controller";

/// Everything `run` needs, from flags or environment.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// rolemesh's own namespace (local signer key, CA ConfigMap, lease).
    pub namespace: String,
    /// Name of the MTLSAuthority in force.
    pub authority: String,
    pub metrics_listen: SocketAddr,
    pub leader_election: bool,
    pub lease_name: String,
    /// This replica's name in the lease.
    pub identity: String,
    pub issue_concurrency: usize,
    /// Only this namespace's policies, ServiceAccounts and Secrets, when set.
    pub watch_namespace: Option<String>,
    /// The webhook's serving certificate and caBundle to keep current; `None` leaves them alone.
    pub webhook_tls: Option<WebhookTlsConfig>,
    /// The cluster's DNS domain (`cluster.local` unless the cluster was set up otherwise).
    pub cluster_domain: String,
}

/// Objects per page of a cache's initial list: ServiceAccounts live in every namespace and any
/// tenant may make them large (annotations up to 256 KiB), so a page is what is decoded at once.
const CACHE_LIST_PAGE: u32 = 50;
/// What `kubectl apply` keeps of an object in an annotation: a second copy of its spec.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// The longest role annotation worth keeping: IAM ARNs are at most 2,048 characters, so anything
/// longer is refused as invalid whatever follows (cut at a character boundary).
const MAX_ROLE_ANNOTATION: usize = 4_096;

/// Keeps of a ServiceAccount what the controller reads (labels for selectors, the IRSA role and
/// rotate annotations), so the cache is bounded by the number of ServiceAccounts, not by what
/// their owners write into them.
fn trim_service_account(sa: &mut ServiceAccount) {
    sa.managed_fields_mut().clear();
    sa.secrets = None;
    sa.image_pull_secrets = None;
    if let Some(annotations) = sa.metadata.annotations.as_mut() {
        annotations.retain(|key, _| key == ROLE_ARN_ANNOTATION || key == ROTATE_ANNOTATION);
        for value in annotations.values_mut() {
            if value.len() > MAX_ROLE_ANNOTATION {
                let mut end = MAX_ROLE_ANNOTATION;
                while !value.is_char_boundary(end) {
                    end -= 1;
                }
                value.truncate(end);
            }
        }
    }
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until it fails, loses the lease, or is asked to stop.
pub async fn run(
    config: ControllerConfig,
    client: Client,
    aws: aws_config::SdkConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let metrics = Metrics::new();
    let metrics_server = tokio::spawn(metrics::serve(config.metrics_listen, metrics.clone()));

    let lease = LeaseConfig {
        namespace: config.namespace.clone(),
        name: config.lease_name.clone(),
        identity: config.identity.clone(),
        duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(3),
    };

    // Only Secrets rolemesh manages are watched and cached, and without their managedFields.
    let written = WriteShadow::default();
    let (secrets, secret_writer) = reflector::store::<Secret>();
    let secret_stream = watcher(
        scoped::<Secret>(&client, config.watch_namespace.as_deref()),
        watcher::Config::default().labels(MANAGED_SELECTOR),
    )
    .default_backoff()
    .modify(|secret| {
        secret.managed_fields_mut().clear();
    })
    .reflect(secret_writer)
    .touched_objects()
    .inspect_ok({
        let written = written.clone();
        move |secret| written.caught_up(secret)
    });
    let (service_accounts, sa_writer) = reflector::store::<ServiceAccount>();
    let sa_stream = watcher(
        scoped::<ServiceAccount>(&client, config.watch_namespace.as_deref()),
        watcher::Config::default().page_size(CACHE_LIST_PAGE),
    )
    .default_backoff()
    .modify(trim_service_account)
    .reflect(sa_writer)
    .touched_objects();
    // Pods and Services, trimmed to what says which Services select which workload: a pod's
    // labels (and whether it is going away) and ServiceAccount, a Service's selector. A reconcile
    // follows a pod only when those change, not its status.
    let (pods, pod_writer) = reflector::store::<Pod>();
    let pod_stream = watcher(
        scoped::<Pod>(&client, config.watch_namespace.as_deref()),
        watcher::Config::default().page_size(CACHE_LIST_PAGE),
    )
    .default_backoff()
    .modify(service_names::trim_pod)
    .reflect(pod_writer)
    .touched_objects()
    .predicate_filter(service_names::selection_facts, Default::default());
    let (services, service_writer) = reflector::store::<Service>();
    let service_stream = watcher(
        scoped::<Service>(&client, config.watch_namespace.as_deref()),
        watcher::Config::default().page_size(CACHE_LIST_PAGE),
    )
    .default_backoff()
    .modify(service_names::trim_service)
    .reflect(service_writer)
    .touched_objects();
    let (policies, policy_writer) = reflector::store::<MTLSPolicy>();
    let policy_stream = watcher(
        scoped::<MTLSPolicy>(&client, config.watch_namespace.as_deref()),
        watcher::Config::default().page_size(CACHE_LIST_PAGE),
    )
    .default_backoff()
    .modify(|policy| {
        policy.managed_fields_mut().clear();
        policy.annotations_mut().remove(LAST_APPLIED_ANNOTATION);
    })
    .reflect(policy_writer)
    .applied_objects()
    // Status writes (our own) do not trigger; spec and annotation (rotate) changes do.
    .predicate_filter(
        predicates::generation.combine(predicates::annotations),
        Default::default(),
    );

    let sts = aws_sdk_sts::Client::new(&aws);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: CONTROLLER_NAME.into(),
            instance: Some(config.identity.clone()),
        },
    );
    let caches = Caches {
        secrets: secrets.clone(),
        written,
        service_accounts: service_accounts.clone(),
        policies: policies.clone(),
        pods: pods.clone(),
        services: services.clone(),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        sts,
        caches,
        metrics.clone(),
        recorder,
        config.issue_concurrency,
        config.cluster_domain.clone(),
    ));

    {
        // Weak: the metrics live in the context, which must not keep itself alive.
        let ctx = Arc::downgrade(&ctx);
        metrics.set_snapshot_source(move || {
            ctx.upgrade()
                .map(|ctx| cache_snapshot(&ctx))
                .unwrap_or_default()
        });
    }
    if config.leader_election {
        metrics.set_ready(true);
        leader::acquire(&client, &lease).await;
    }
    metrics.set_leader(true);

    let (ca_trigger, ca_changes) = mpsc::channel::<()>(1);
    let webhook_task = config
        .webhook_tls
        .clone()
        .map(|webhook| tokio::spawn(webhook_tls::maintain_webhook_tls(client.clone(), webhook)));
    let ca_task = tokio::spawn(maintain_ca(
        client.clone(),
        config.clone(),
        aws.clone(),
        ctx.clone(),
        ca_trigger,
    ));
    let bundle_task = tokio::spawn(policy::writes::maintain_trust_bundles(ctx.clone()));

    let mapper_policies = policies.clone();
    let (pod_policies, service_policies) = (policies.clone(), policies.clone());
    // One task waits for both caches and tells every reconcile through a watch channel. The
    // stores' own `wait_until_ready` wakes only the last of several concurrent waiters (it polls
    // one oneshot receiver from many tasks), which left all but one of the policies that arrived
    // before the caches had filled waiting for ever.
    let (caches_filled, caches_ready) = watch::channel(false);
    let caches_task = tokio::spawn({
        let (secrets, service_accounts, metrics) =
            (secrets.clone(), service_accounts.clone(), metrics.clone());
        let (pods, services) = (pods.clone(), services.clone());
        async move {
            let filled = secrets.wait_until_ready().await.is_ok()
                && service_accounts.wait_until_ready().await.is_ok()
                && pods.wait_until_ready().await.is_ok()
                && services.wait_until_ready().await.is_ok();
            if filled {
                metrics.set_ready(true);
                let _ = caches_filled.send(true);
            }
        }
    });
    let controller = Controller::for_stream(policy_stream, policies)
        .owns_stream(secret_stream)
        .watches_stream(sa_stream, move |sa| {
            policies_for_service_account(&mapper_policies.state(), &sa)
        })
        // A Service's names go into the certificates of the workloads it selects: every policy of
        // its namespace looks again when a Service or the labels of a pod change.
        .watches_stream(pod_stream, move |pod| {
            policies_in_namespace(&pod_policies.state(), pod.namespace().as_deref())
        })
        .watches_stream(service_stream, move |service| {
            policies_in_namespace(&service_policies.state(), service.namespace().as_deref())
        })
        .reconcile_all_on(tokio_stream_from(ca_changes))
        .run(
            move |policy, ctx: Arc<Context>| {
                let mut caches_ready = caches_ready.clone();
                async move {
                    // Deciding with half-filled caches would issue certificates that exist already.
                    if caches_ready.wait_for(|filled| *filled).await.is_err() {
                        return Err(Error::CachesNotFilled);
                    }
                    policy::reconcile(policy, ctx).await
                }
            },
            policy::error_policy,
            ctx,
        )
        .for_each(|_| future::ready(()));

    let lease_lost = async {
        if config.leader_election {
            leader::hold(&client, &lease).await
        } else {
            future::pending().await
        }
    };
    let result = tokio::select! {
        _ = controller => Ok(()),
        error = lease_lost => Err(error),
        served = metrics_server => match served {
            Ok(Err(error)) => Err(error),
            _ => Ok(()),
        },
        _ = shutdown => {
            info!("shutting down");
            Ok(())
        }
    };
    ca_task.abort();
    bundle_task.abort();
    caches_task.abort();
    if let Some(task) = webhook_task {
        task.abort();
    }
    metrics.set_leader(false);
    if config.leader_election && !matches!(result, Err(Error::LostLease { .. })) {
        leader::release(&client, &lease).await;
    }
    result
}

fn policies_in_namespace(
    policies: &[Arc<MTLSPolicy>],
    namespace: Option<&str>,
) -> Vec<kube::runtime::reflector::ObjectRef<MTLSPolicy>> {
    policies
        .iter()
        .filter(|p| p.namespace().as_deref() == namespace)
        .map(|p| kube::runtime::reflector::ObjectRef::from_obj(p.as_ref()))
        .collect()
}

fn tokio_stream_from(
    mut receiver: mpsc::Receiver<()>,
) -> impl futures::Stream<Item = ()> + Send + 'static {
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

/// The name this replica uses in the lease: the pod name when set, else host and process id.
pub fn replica_identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    })
}

/// The per-workload and per-CA gauges as the caches show them now.
fn cache_snapshot(ctx: &Context) -> metrics::CacheSnapshot {
    use status::Reason;
    let workloads = ctx
        .caches
        .policies
        .state()
        .iter()
        .flat_map(|policy| {
            let namespace = policy.namespace().unwrap_or_default();
            let name = policy.name_any();
            policy
                .status
                .iter()
                .flat_map(|status| status.workloads.iter())
                .map(move |workload| metrics::WorkloadGauge {
                    namespace: namespace.clone(),
                    policy: name.clone(),
                    service_account: workload.service_account.clone(),
                    not_after: workload.not_after.as_ref().map(|t| t.0.as_second()),
                    ready: workload.reason == Reason::Issued.as_str()
                        || workload.reason == Reason::IssuedUnverified.as_str(),
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let cas = ctx
        .ca
        .load()
        .as_ref()
        .map(|ca| {
            ca.cas
                .iter()
                .map(|record| metrics::CaGauge {
                    fingerprint: record.fingerprint.clone(),
                    phase: record.phase.as_str(),
                    not_after: record.not_after.0.as_second(),
                })
                .collect()
        })
        .unwrap_or_default();
    metrics::CacheSnapshot { workloads, cas }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn cached_service_accounts_keep_only_what_the_controller_reads() {
        let mut sa: ServiceAccount = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "app", "namespace": "shop",
                "labels": {"team": "a"},
                "annotations": {
                    "eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/app",
                    "rolemesh.dev/rotate": "2026-12-02T00:00:00Z",
                    "kubectl.kubernetes.io/last-applied-configuration": "x".repeat(250 * 1024),
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            },
            "secrets": [{"name": "app-token"}],
        }))
        .unwrap();
        trim_service_account(&mut sa);
        let annotations = sa.metadata.annotations.clone().unwrap();
        assert_eq!(
            annotations.keys().collect::<Vec<_>>(),
            ["eks.amazonaws.com/role-arn", "rolemesh.dev/rotate"]
        );
        assert_eq!(sa.metadata.labels.unwrap()["team"], "a");
        assert!(sa.metadata.managed_fields.unwrap_or_default().is_empty());
        assert!(sa.secrets.is_none());

        // A role annotation too long to be an ARN stays too long to be one, at a bounded size.
        let mut huge: ServiceAccount = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "huge", "annotations": {"eks.amazonaws.com/role-arn": format!("arn:{}", "é".repeat(200_000))}},
        }))
        .unwrap();
        trim_service_account(&mut huge);
        let kept = &huge.metadata.annotations.unwrap()["eks.amazonaws.com/role-arn"];
        assert!(
            kept.len() <= MAX_ROLE_ANNOTATION && kept.len() > 2048,
            "{}",
            kept.len()
        );
    }
}
