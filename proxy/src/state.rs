//! State shared by every task of one proxy, and the readiness handle the admin port reads.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering},
};

use arc_swap::ArcSwapOption;
use rolemesh_profile::proxy_config::ProxyConfig;
use rustls::crypto::CryptoProvider;
use tokio::sync::Semaphore;

use crate::{
    material::TlsConfigs,
    metrics::Metrics,
    rules::{ActiveRules, RulesHandle},
};

/// State shared by every task of one proxy.
pub struct Shared {
    pub config: ProxyConfig,
    pub provider: Arc<CryptoProvider>,
    /// The TLS configurations in use; `None` until a certificate set has been loaded.
    tls: ArcSwapOption<TlsConfigs>,
    /// The peer rules in force; `None` until a rules file has been loaded.
    pub rules: RulesHandle,
    pub metrics: Arc<Metrics>,
    pub readiness: Readiness,
    /// Bounds the inbound handshakes in flight.
    pub handshakes: Arc<Semaphore>,
    active: AtomicUsize,
}

impl Shared {
    pub fn new(config: ProxyConfig, provider: Arc<CryptoProvider>, metrics: Arc<Metrics>) -> Self {
        Self {
            handshakes: Arc::new(Semaphore::new(
                config.limits.max_concurrent_handshakes.max(1),
            )),
            config,
            provider,
            tls: ArcSwapOption::empty(),
            rules: Arc::new(ArcSwapOption::empty()),
            metrics,
            readiness: Readiness::default(),
            active: AtomicUsize::new(0),
        }
    }

    /// The configurations every new handshake uses from now on.
    pub fn use_tls(&self, configs: TlsConfigs) {
        self.tls.store(Some(Arc::new(configs)));
        self.readiness.set_loaded();
    }

    /// The rules every new handshake (and every new outbound dial) uses from now on.
    pub fn use_rules(&self, rules: ActiveRules) {
        self.readiness.set_rules(rules.generation);
        self.rules.store(Some(Arc::new(rules)));
    }

    /// Something picked from the configurations in use, if any are loaded; the configurations
    /// themselves are not held, so a reload frees the old set once its connections are gone.
    pub fn with_tls<T>(&self, pick: impl FnOnce(&TlsConfigs) -> T) -> Option<T> {
        self.tls.load().as_deref().map(pick)
    }

    /// Connections accepted and not yet closed.
    pub fn open_connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Counts a connection as open until dropped, so shutdown can wait for it.
pub struct ActiveGuard<'a>(&'a Shared);

impl<'a> ActiveGuard<'a> {
    pub fn new(shared: &'a Shared) -> Self {
        shared.active.fetch_add(1, Ordering::Relaxed);
        Self(shared)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether the proxy takes traffic: a certificate set and peer rules are loaded and it is not
/// draining. Cloned
/// into the admin server, which needs nothing else of the proxy's state.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<ReadinessState>);

#[derive(Debug, Default)]
struct ReadinessState {
    loaded: AtomicBool,
    draining: AtomicBool,
    /// Generation of the peer rules in force; meaningful once `rules_loaded`.
    rules_generation: AtomicI64,
    rules_loaded: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.0.loaded.load(Ordering::Relaxed)
            && self.0.rules_loaded.load(Ordering::Relaxed)
            && !self.0.draining.load(Ordering::Relaxed)
    }

    /// The generation of the policy whose peer rules are in force, if any are.
    pub fn rules_generation(&self) -> Option<i64> {
        self.0
            .rules_loaded
            .load(Ordering::Acquire)
            .then(|| self.0.rules_generation.load(Ordering::Relaxed))
    }

    fn set_rules(&self, generation: i64) {
        self.0.rules_generation.store(generation, Ordering::Relaxed);
        self.0.rules_loaded.store(true, Ordering::Release);
    }

    fn set_loaded(&self) {
        self.0.loaded.store(true, Ordering::Relaxed);
    }

    /// From now on the proxy reports not ready, so that traffic moves elsewhere while it drains.
    pub fn set_draining(&self) {
        self.0.draining.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_loaded_until_draining() {
        let readiness = Readiness::default();
        assert!(!readiness.is_ready());
        readiness.set_loaded();
        let seen_by_admin = readiness.clone();
        assert!(!seen_by_admin.is_ready(), "no peer rules yet");
        assert_eq!(seen_by_admin.rules_generation(), None);
        readiness.set_rules(3);
        assert!(seen_by_admin.is_ready());
        assert_eq!(seen_by_admin.rules_generation(), Some(3));
        readiness.set_draining();
        assert!(!seen_by_admin.is_ready());
    }
}
