//! Finding the MTLSPolicy that covers a pod's ServiceAccount, the namespace's labels and the trust
//! domain. Served from reflector caches; before refusing a pod (or when a cache has not synced)
//! the API server is asked, so a policy created a moment before the pod is never missed. Those
//! reads are bounded ([`crate::fallback`]): concurrent ones for one key share a request, and all
//! of them together spend from one budget; past it the caches answer, and where the cache's answer
//! would admit a pod without its proxy the pod is refused instead (retried by its controller).

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
    fallback::{API_READS_BURST, API_READS_PER_SECOND, Budget, Coalesce, Ran},
    metrics::Metrics,
    selection::namespace_opted_in,
};

/// Why a read of the API server gave no answer; shared by coalesced lookups.
#[derive(Clone, Debug)]
enum ReadFailed {
    /// The budget was spent: the caches answer.
    Throttled,
    Kube(Arc<kube::Error>),
}

type Read<T> = std::result::Result<T, ReadFailed>;

/// The bounded reads of the API server, one coalescing map per kind of lookup.
#[derive(Default)]
struct Fallbacks {
    namespaces: Coalesce<Read<Option<BTreeMap<String, String>>>>,
    policies: Coalesce<Read<Arc<Vec<Arc<MTLSPolicy>>>>>,
    service_accounts: Coalesce<Read<Option<BTreeMap<String, String>>>>,
    authority: Coalesce<Read<Option<String>>>,
}

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
    budget: Arc<Budget>,
    fallbacks: Arc<Fallbacks>,
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
            budget: Arc::new(Budget::new(API_READS_PER_SECOND, API_READS_BURST)),
            fallbacks: Arc::new(Fallbacks::default()),
        }
    }

    /// Runs `request` against the API server for `key` if no lookup of the same key is in flight
    /// (else shares its answer) and the budget has a token (else [`ReadFailed::Throttled`]).
    /// Counted by how it was answered.
    async fn read<T, F, Fut>(&self, coalesce: &Coalesce<Read<T>>, key: &str, request: F) -> Read<T>
    where
        T: Clone,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, kube::Error>>,
    {
        let budget = self.budget.clone();
        let (answer, ran) = coalesce
            .run(key, || async move {
                if !budget.try_take() {
                    return Err(ReadFailed::Throttled);
                }
                request().await.map_err(|e| ReadFailed::Kube(Arc::new(e)))
            })
            .await;
        let source = match (&answer, ran) {
            (Err(ReadFailed::Throttled), _) => "throttled",
            (_, Ran::Shared) => "coalesced",
            (_, Ran::Itself) => "api",
        };
        self.metrics.lookup(source);
        answer
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
    /// reached the cache yet, and an opted-in pod must never be admitted without its proxy. For
    /// the same reason a no that cannot be read again (budget spent) refuses the pod.
    pub async fn namespace_opted_in(&self, namespace: &str) -> Result<bool> {
        if let Some(ns) = self.namespaces.get(&ObjectRef::new(namespace))
            && namespace_opted_in(ns.metadata.labels.as_ref())
        {
            return Ok(true);
        }
        let api = Api::<Namespace>::all(self.client.clone());
        let read = self
            .read(&self.fallbacks.namespaces, namespace, || async move {
                Ok(api
                    .get_metadata_opt(namespace)
                    .await?
                    .and_then(|ns| ns.metadata.labels))
            })
            .await;
        match read {
            Ok(labels) => Ok(namespace_opted_in(labels.as_ref())),
            Err(ReadFailed::Throttled) => Err(Error::ApiBudgetSpent {
                what: format!("whether namespace {namespace} opts its pods in"),
            }),
            Err(ReadFailed::Kube(source)) => Err(Error::Kube {
                action: format!("reading namespace {namespace}"),
                source,
            }),
        }
    }

    /// The ServiceAccount's labels; past the budget, none (so a selector does not select it, and
    /// the pod is refused rather than injected under the wrong policy).
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
        let key = format!("{namespace}/{name}");
        let read = self
            .read(&self.fallbacks.service_accounts, &key, || async move {
                Ok(api
                    .get_metadata_opt(name)
                    .await?
                    .and_then(|sa| sa.metadata.labels))
            })
            .await;
        match read {
            Ok(labels) => Ok(labels.unwrap_or_default()),
            Err(ReadFailed::Throttled) => Ok(BTreeMap::new()),
            Err(ReadFailed::Kube(source)) => Err(Error::Kube {
                action: format!("reading ServiceAccount {namespace}/{name}"),
                source,
            }),
        }
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
        let api = Api::<MTLSPolicy>::namespaced(self.client.clone(), namespace);
        let read = self
            .read(&self.fallbacks.policies, namespace, || async move {
                let listed = api.list(&ListParams::default()).await?;
                Ok(Arc::new(
                    listed.items.into_iter().map(Arc::new).collect::<Vec<_>>(),
                ))
            })
            .await;
        let listed = match read {
            Ok(listed) => listed.as_ref().clone(),
            // Past the budget the cache's answer stands: none covers the pod, so it is refused.
            Err(ReadFailed::Throttled) if self.is_synced(POLICIES) => Vec::new(),
            Err(ReadFailed::Throttled) => {
                return Err(Error::ApiBudgetSpent {
                    what: format!("which MTLSPolicy in {namespace} covers {service_account}"),
                });
            }
            Err(ReadFailed::Kube(source)) => {
                return Err(Error::Kube {
                    action: format!("listing MTLSPolicies in {namespace}"),
                    source,
                });
            }
        };
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
            let name = self.authority.as_str();
            let read = self
                .read(&self.fallbacks.authority, name, || async move {
                    Ok(api.get_opt(name).await?.map(|a| a.spec.trust_domain))
                })
                .await;
            match read {
                Ok(Some(trust_domain)) => return Ok(trust_domain),
                Ok(None) => {}
                Err(ReadFailed::Throttled) => {
                    return Err(Error::ApiBudgetSpent {
                        what: format!("the trust domain of MTLSAuthority {name}"),
                    });
                }
                Err(ReadFailed::Kube(source)) => {
                    return Err(Error::Kube {
                        action: format!("reading MTLSAuthority {name}"),
                        source,
                    });
                }
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
