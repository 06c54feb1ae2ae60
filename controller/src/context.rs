//! What every reconcile shares: clients, the CA in force, the caches, and what this process
//! wrote that the caches may not show yet.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use k8s_openapi::api::core::v1::{Pod, Secret, Service, ServiceAccount};
use kube::{
    Client,
    runtime::{
        events::Recorder,
        reflector::{ObjectRef, Store},
    },
};
use rolemesh_crds::MTLSPolicy;
use time::OffsetDateTime;

use crate::{ca::CaState, metrics::Metrics, status::Reason};

/// How long a write of ours stands in for the watch's copy before the watch must have caught up.
const WRITE_SHADOW: Duration = Duration::from_secs(30);

/// The reflector caches the reconcilers read.
#[derive(Clone)]
pub struct Caches {
    /// Only the Secrets rolemesh manages.
    pub secrets: Store<Secret>,
    /// Our writes of those Secrets that the watch has not delivered yet.
    pub written: WriteShadow,
    pub service_accounts: Store<ServiceAccount>,
    pub policies: Store<MTLSPolicy>,
    /// Pods and Services trimmed to labels, ServiceAccount and selector
    /// ([`crate::service_names`]): which Services name which workload.
    pub pods: Store<Pod>,
    pub services: Store<Service>,
}

/// Secrets written by this process that the watch may not have delivered yet, so that a
/// reconcile racing the watch does not issue a second certificate for the same need.
///
/// The Secret watch drops each entry as soon as it delivers that write ([`Self::caught_up`]), so
/// the shadow holds only the watch's lag worth of Secrets. Dropping them only when a reconcile
/// next looked (as before) kept every Secret of a burst twice, once here and once in the cache,
/// and the heap of that peak stayed with the process after the burst.
#[derive(Clone, Default)]
pub struct WriteShadow(Arc<Mutex<ShadowEntries>>);

/// Per Secret (namespace, name): our write and when it was made.
type ShadowEntries = HashMap<(String, String), (Secret, Instant)>;

fn resource_version(secret: &Secret) -> Option<u64> {
    secret
        .metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse::<u64>().ok())
}

impl WriteShadow {
    /// The watch delivered `seen` (the cache holds it now): a write of ours it includes needs no
    /// stand-in any more.
    pub fn caught_up(&self, seen: &Secret) {
        let (Some(namespace), Some(name)) = (&seen.metadata.namespace, &seen.metadata.name) else {
            return;
        };
        let Ok(mut written) = self.0.lock() else {
            return;
        };
        let key = (namespace.clone(), name.clone());
        if written
            .get(&key)
            .is_some_and(|(ours, _)| resource_version(seen) >= resource_version(ours))
        {
            written.remove(&key);
        }
    }
}

/// A trust bundle ConfigMap as this process last wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedBundle {
    pub bundle: String,
    pub resource_version: Option<String>,
}

/// Shared state of the reconcilers.
pub struct Context {
    pub client: Client,
    pub sts: aws_sdk_sts::Client,
    pub ca: ArcSwapOption<CaState>,
    /// Why there is no CA, when there is none.
    pub ca_error: Mutex<Option<(Reason, String)>>,
    pub caches: Caches,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// How many certificates one reconcile issues at once.
    pub issue_concurrency: usize,
    /// Issuances in flight across every reconcile: as many as `issue_concurrency`. Policies are
    /// reconciled concurrently, so without it a burst over N policies would hold N times that
    /// many key pairs, CSRs and request bodies at once, and the peak heap would grow with N.
    pub issuance: tokio::sync::Semaphore,
    /// The cluster's DNS domain, for the `<service>.<namespace>.svc.<domain>` SAN.
    pub cluster_domain: String,
    /// The trust bundle last applied per namespace, to skip no-op writes, and the
    /// resourceVersion that write left, to tell a repair of someone else's edit from a no-op.
    bundles: Mutex<HashMap<String, AppliedBundle>>,
    /// The peer rules last written per (namespace, ConfigMap key), to skip no-op writes.
    rules: Mutex<HashMap<(String, String), String>>,
    /// Per policy (namespace, name): how many reconciles in a row ended with a transient
    /// failure, for the backoff of the next one.
    transient_streaks: Mutex<HashMap<(String, String), u32>>,
    /// Per workload (namespace, ServiceAccount): the serial of the certificate whose role this
    /// process verified with STS, and when STS last confirmed it. The policy status records the
    /// same, but the cached policy may not show our last status write yet.
    verified: Mutex<HashMap<(String, String), (String, OffsetDateTime)>>,
}

impl Context {
    pub fn new(
        client: Client,
        sts: aws_sdk_sts::Client,
        caches: Caches,
        metrics: Metrics,
        recorder: Recorder,
        issue_concurrency: usize,
        cluster_domain: String,
    ) -> Self {
        Self {
            client,
            sts,
            ca: ArcSwapOption::empty(),
            ca_error: Mutex::new(None),
            caches,
            metrics,
            recorder,
            issue_concurrency,
            issuance: tokio::sync::Semaphore::new(issue_concurrency.max(1)),
            cluster_domain,
            bundles: Mutex::new(HashMap::new()),
            rules: Mutex::new(HashMap::new()),
            transient_streaks: Mutex::new(HashMap::new()),
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// Records how a reconcile of policy `namespace/name` ended and returns how many in a row
    /// have now ended with a transient failure (0 after one without).
    pub fn transient_streak(&self, namespace: &str, name: &str, transient: bool) -> u32 {
        let Ok(mut streaks) = self.transient_streaks.lock() else {
            return u32::from(transient);
        };
        let key = (namespace.to_string(), name.to_string());
        if !transient {
            streaks.remove(&key);
            return 0;
        }
        let streak = streaks.entry(key).or_insert(0);
        *streak = streak.saturating_add(1);
        *streak
    }

    /// The Secret as this process last knows it: the cache's copy, or our own write while the
    /// watch has not delivered it yet.
    pub fn effective_secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        let cached = self
            .caches
            .secrets
            .get(&ObjectRef::new(name).within(namespace))
            .map(|s| (*s).clone());
        let key = (namespace.to_string(), name.to_string());
        let mut written = self.caches.written.0.lock().ok()?;
        let Some((ours, at)) = written.get(&key) else {
            return cached;
        };
        match &cached {
            Some(seen) if resource_version(seen) >= resource_version(ours) => {
                written.remove(&key);
                cached
            }
            // The watch has not caught up with our write yet.
            _ if at.elapsed() < WRITE_SHADOW => Some(ours.clone()),
            _ => {
                written.remove(&key);
                cached
            }
        }
    }

    pub fn remember_written(&self, secret: Secret) {
        if let (Some(ns), Some(name), Ok(mut written)) = (
            secret.metadata.namespace.clone(),
            secret.metadata.name.clone(),
            self.caches.written.0.lock(),
        ) {
            // Entries are normally dropped when the watch catches up; this bounds the rest.
            if written.len() >= 1024 {
                written.retain(|_, (_, at)| at.elapsed() < WRITE_SHADOW);
            }
            written.insert((ns, name), (secret, Instant::now()));
        }
    }

    pub fn forget_written(&self, namespace: &str, name: &str) {
        if let Ok(mut written) = self.caches.written.0.lock() {
            written.remove(&(namespace.to_string(), name.to_string()));
        }
    }

    /// Records that STS verified, `at`, the role of the certificate with `serial` of the workload.
    pub fn remember_verified(
        &self,
        namespace: &str,
        service_account: &str,
        serial: &str,
        at: OffsetDateTime,
    ) {
        if let Ok(mut verified) = self.verified.lock() {
            verified.insert(
                (namespace.to_string(), service_account.to_string()),
                (serial.to_string(), at),
            );
        }
    }

    /// When this process last verified the role of the workload's certificate with `serial`,
    /// if it did.
    pub fn verified_here(
        &self,
        namespace: &str,
        service_account: &str,
        serial: &str,
    ) -> Option<OffsetDateTime> {
        let verified = self.verified.lock().ok()?;
        verified
            .get(&(namespace.to_string(), service_account.to_string()))
            .filter(|(s, _)| s == serial)
            .map(|(_, at)| *at)
    }

    pub fn forget_verified(&self, namespace: &str, service_account: &str) {
        if let Ok(mut verified) = self.verified.lock() {
            verified.remove(&(namespace.to_string(), service_account.to_string()));
        }
    }

    /// Whether `bundle` is what was last applied to `namespace`'s trust bundle.
    pub fn bundle_applied(&self, namespace: &str, bundle: &str) -> bool {
        self.bundles
            .lock()
            .ok()
            .is_some_and(|b| b.get(namespace).is_some_and(|a| a.bundle == bundle))
    }

    /// The trust bundle this process last applied in `namespace`.
    pub fn applied_bundle(&self, namespace: &str) -> Option<String> {
        self.bundles
            .lock()
            .ok()
            .and_then(|b| b.get(namespace).map(|a| a.bundle.clone()))
    }

    pub fn remember_bundle(&self, namespace: &str, applied: AppliedBundle) {
        if let Ok(mut bundles) = self.bundles.lock() {
            bundles.insert(namespace.to_string(), applied);
        }
    }

    pub fn forget_bundle(&self, namespace: &str) {
        if let Ok(mut bundles) = self.bundles.lock() {
            bundles.remove(namespace);
        }
    }

    /// Every namespace this process wrote a trust bundle to, with what it wrote.
    pub fn applied_bundles(&self) -> Vec<(String, AppliedBundle)> {
        self.bundles
            .lock()
            .map(|b| b.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Whether `rules` is what was last written to `namespace`'s trust bundle under `key`.
    pub fn rules_applied(&self, namespace: &str, key: &str, rules: &str) -> bool {
        self.rules.lock().ok().is_some_and(|r| {
            r.get(&(namespace.to_string(), key.to_string()))
                .map(String::as_str)
                == Some(rules)
        })
    }

    pub fn remember_rules(&self, namespace: &str, key: &str, rules: &str) {
        if let Ok(mut written) = self.rules.lock() {
            written.insert((namespace.to_string(), key.to_string()), rules.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;

    use super::*;

    fn secret(name: &str, version: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                name: Some(name.into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_watch_drops_a_shadow_once_it_delivers_that_write_or_a_later_one() {
        let shadow = WriteShadow::default();
        let remember = |s: Secret| {
            let key = (
                s.metadata.namespace.clone().unwrap(),
                s.metadata.name.clone().unwrap(),
            );
            shadow.0.lock().unwrap().insert(key, (s, Instant::now()));
        };
        remember(secret("a-rolemesh-tls", "20"));
        remember(secret("b-rolemesh-tls", "20"));
        remember(secret("c-rolemesh-tls", "20"));
        shadow.caught_up(&secret("a-rolemesh-tls", "19"));
        shadow.caught_up(&secret("b-rolemesh-tls", "20"));
        shadow.caught_up(&secret("c-rolemesh-tls", "31"));
        shadow.caught_up(&secret("unrelated", "40"));
        let left: Vec<String> = shadow
            .0
            .lock()
            .unwrap()
            .keys()
            .map(|(_, name)| name.clone())
            .collect();
        assert_eq!(
            left,
            ["a-rolemesh-tls"],
            "an older version leaves our write standing"
        );
    }
}
