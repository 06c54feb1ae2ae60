//! Finding the MTLSPolicy that covers a pod's ServiceAccount, the namespace's labels and the trust
//! domain. Served from reflector caches; before refusing a pod (or when a cache has not synced)
//! the API server is asked, so a policy created a moment before the pod is never missed.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::{
    Api, Client,
    api::{ListParams, PartialObjectMeta},
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use rolemesh_crds::{MTLSAuthority, MTLSPolicy, covering_policy};
use tracing::{debug, warn};

use crate::{
    error::{Error, Result},
    metrics::Metrics,
    selection::namespace_opted_in,
};

/// The webhook's view of the cluster.
#[derive(Clone)]
pub struct Lookups {
    client: Client,
    policies: Store<MTLSPolicy>,
    service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    authorities: Store<MTLSAuthority>,
    synced: Arc<[AtomicBool; 4]>,
    authority: String,
    fallback_trust_domain: Option<String>,
    metrics: Arc<Metrics>,
}

/// Objects per page of a cache's initial list (what is decoded at once).
const CACHE_LIST_PAGE: u32 = 50;

/// What the webhook reads of ServiceAccounts and namespaces: their labels.
fn labels_only<K>(object: &mut PartialObjectMeta<K>) {
    object.metadata.annotations = None;
    object.metadata.managed_fields = None;
    object.metadata.owner_references = None;
    object.metadata.finalizers = None;
}

const POLICIES: usize = 0;
const SERVICE_ACCOUNTS: usize = 1;
const NAMESPACES: usize = 2;
const AUTHORITIES: usize = 3;

impl Lookups {
    /// Starts the reflectors (as background tasks that retry with backoff) and returns at once;
    /// until a cache has synced every lookup it would serve goes to the API server.
    pub fn start(
        client: Client,
        authority: String,
        fallback_trust_domain: Option<String>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let synced: Arc<[AtomicBool; 4]> = Arc::new(Default::default());
        // ServiceAccounts and namespaces are everyone's and may carry large annotations: list them
        // a page at a time and keep only their labels, which is all the selectors read.
        let config = watcher::Config::default().page_size(CACHE_LIST_PAGE);
        let policies = spawn_reflector(
            watcher(Api::<MTLSPolicy>::all(client.clone()), config.clone()).modify(|policy| {
                policy.metadata.managed_fields = None;
                policy.metadata.annotations = None;
            }),
            synced.clone(),
            POLICIES,
        );
        let service_accounts = spawn_reflector(
            watcher(
                Api::<PartialObjectMeta<ServiceAccount>>::all(client.clone()),
                config.clone(),
            )
            .modify(labels_only),
            synced.clone(),
            SERVICE_ACCOUNTS,
        );
        let namespaces = spawn_reflector(
            watcher(
                Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
                config.clone(),
            )
            .modify(labels_only),
            synced.clone(),
            NAMESPACES,
        );
        let authorities = spawn_reflector(
            watcher(Api::<MTLSAuthority>::all(client.clone()), config),
            synced.clone(),
            AUTHORITIES,
        );
        Self {
            client,
            policies,
            service_accounts,
            namespaces,
            authorities,
            synced,
            authority,
            fallback_trust_domain,
            metrics,
        }
    }

    /// Whether every cache has synced once.
    pub fn synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::Acquire))
    }

    fn is_synced(&self, which: usize) -> bool {
        self.synced[which].load(Ordering::Acquire)
    }

    /// Whether namespace `namespace` opts its pods in. The cache answers yes at once; a no is
    /// read again from the API server, because a namespace labelled a moment ago may not have
    /// reached the cache yet, and an opted-in pod must never be admitted without its proxy.
    pub async fn namespace_opted_in(&self, namespace: &str) -> Result<bool> {
        if let Some(ns) = self.namespaces.get(&ObjectRef::new(namespace))
            && namespace_opted_in(ns.metadata.labels.as_ref())
        {
            return Ok(true);
        }
        let api = Api::<Namespace>::all(self.client.clone());
        let found = api
            .get_metadata_opt(namespace)
            .await
            .map_err(Error::kube(format!("reading namespace {namespace}")))?;
        Ok(found.is_some_and(|ns| namespace_opted_in(ns.metadata.labels.as_ref())))
    }

    async fn service_account_labels(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<BTreeMap<String, String>> {
        if let Some(sa) = self
            .service_accounts
            .get(&ObjectRef::new(name).within(namespace))
        {
            return Ok(sa.metadata.labels.clone().unwrap_or_default());
        }
        let api = Api::<ServiceAccount>::namespaced(self.client.clone(), namespace);
        let found = api
            .get_metadata_opt(name)
            .await
            .map_err(Error::kube(format!(
                "reading ServiceAccount {namespace}/{name}"
            )))?;
        Ok(found.and_then(|sa| sa.metadata.labels).unwrap_or_default())
    }

    /// The MTLSPolicy covering `service_account` (by the one coverage rule, the controller's),
    /// or the refusal that says none does.
    pub async fn covering_policy(
        &self,
        namespace: &str,
        service_account: &str,
        pod: &str,
    ) -> Result<Arc<MTLSPolicy>> {
        if self.is_synced(POLICIES) {
            let cached = self
                .policies
                .state_filter(|p| p.metadata.namespace.as_deref() == Some(namespace));
            let covering = self
                .filter_covering(cached, namespace, service_account)
                .await?;
            if !covering.is_empty() {
                self.metrics.lookup("cache");
                return self.covering(covering, namespace, service_account, pod);
            }
            debug!(
                namespace,
                service_account, "no covering policy in cache; asking the API server"
            );
        }
        self.metrics.lookup("api");
        let listed = Api::<MTLSPolicy>::namespaced(self.client.clone(), namespace)
            .list(&ListParams::default())
            .await
            .map_err(Error::kube(format!("listing MTLSPolicies in {namespace}")))?;
        let listed = listed.items.into_iter().map(Arc::new).collect();
        let covering = self
            .filter_covering(listed, namespace, service_account)
            .await?;
        self.covering(covering, namespace, service_account, pod)
    }

    async fn filter_covering(
        &self,
        candidates: Vec<Arc<MTLSPolicy>>,
        namespace: &str,
        service_account: &str,
    ) -> Result<Vec<Arc<MTLSPolicy>>> {
        let mut labels = None;
        let mut covering = Vec::new();
        for policy in candidates {
            let covers = match policy.selects(namespace, service_account, labels.as_ref()) {
                Some(decided) => decided,
                None => {
                    let fetched = self
                        .service_account_labels(namespace, service_account)
                        .await?;
                    let decided = policy.selects(namespace, service_account, Some(&fetched));
                    labels = Some(fetched);
                    decided.unwrap_or(false)
                }
            };
            if covers {
                covering.push(policy);
            }
        }
        Ok(covering)
    }

    fn covering(
        &self,
        selecting: Vec<Arc<MTLSPolicy>>,
        namespace: &str,
        service_account: &str,
        pod: &str,
    ) -> Result<Arc<MTLSPolicy>> {
        covering_policy(selecting).ok_or_else(|| Error::NotCovered {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            pod: pod.to_string(),
        })
    }

    /// The trust domain of the configured MTLSAuthority, else the fallback flag.
    pub async fn trust_domain(&self) -> Result<String> {
        if let Some(authority) = self.authorities.get(&ObjectRef::new(&self.authority)) {
            return Ok(authority.spec.trust_domain.clone());
        }
        if !self.is_synced(AUTHORITIES) {
            let api = Api::<MTLSAuthority>::all(self.client.clone());
            let found = api
                .get_opt(&self.authority)
                .await
                .map_err(Error::kube(format!(
                    "reading MTLSAuthority {}",
                    self.authority
                )))?;
            if let Some(authority) = found {
                return Ok(authority.spec.trust_domain);
            }
        }
        self.fallback_trust_domain
            .clone()
            .ok_or_else(|| Error::NoTrustDomain {
                authority: self.authority.clone(),
            })
    }
}

fn spawn_reflector<K, S>(stream: S, synced: Arc<[AtomicBool; 4]>, which: usize) -> Store<K>
where
    K: kube::Resource + Clone + Send + Sync + std::fmt::Debug + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let (reader, writer) = reflector::store();
    let ready = reader.clone();
    tokio::spawn(async move {
        if ready.wait_until_ready().await.is_ok() {
            synced[which].store(true, Ordering::Release);
        }
    });
    let stream = reflector::reflector(writer, stream.default_backoff());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(error) = event {
                warn!(%error, kind = %K::kind(&K::DynamicType::default()), "watch failed; retrying");
            }
        }
    });
    reader
}
