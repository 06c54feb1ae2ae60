//! What bounds the webhook's reads of the API server. Anyone who reaches the webhook's endpoint can
//! send it reviews, and a review its caches cannot answer (a namespace, policy or ServiceAccount
//! they do not hold) would otherwise cost one API request each: a stranger could turn the webhook
//! into an amplifier of LISTs against the API server. So the reads are coalesced (concurrent
//! lookups of one key share one request) and spent from one token bucket for the whole process;
//! past the budget, the caches answer.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::sync::OnceCell;

/// API reads per second the webhook spends on lookups its caches cannot answer.
pub const API_READS_PER_SECOND: f64 = 5.0;
/// Reads that may be spent at once after a quiet period (a burst of new pods in a new namespace).
pub const API_READS_BURST: f64 = 10.0;

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
pub struct Budget {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Budget {
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&self) -> bool {
        self.try_take_at(Instant::now())
    }

    fn try_take_at(&self, now: Instant) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        let (tokens, last) = *state;
        let elapsed = now.saturating_duration_since(last).as_secs_f64();
        let tokens = (tokens + elapsed * self.rate).min(self.burst);
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            true
        } else {
            *state = (tokens, now);
            false
        }
    }
}

/// Concurrent lookups of one key share one request: the first runs it, the others wait for its
/// result. The key is forgotten as soon as the request ends, so the map holds only lookups in
/// flight (a stranger's made-up names cannot grow it).
pub struct Coalesce<T> {
    inflight: Mutex<HashMap<String, Arc<OnceCell<T>>>>,
}

impl<T> Default for Coalesce<T> {
    fn default() -> Self {
        Self {
            inflight: Mutex::new(HashMap::new()),
        }
    }
}

/// Whether a lookup ran the request itself or shared another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ran {
    Itself,
    Shared,
}

impl<T: Clone> Coalesce<T> {
    /// The result of `request` for `key`, run once for all concurrent callers.
    pub async fn run<F, Fut>(&self, key: &str, request: F) -> (T, Ran)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let (cell, first) = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match inflight.get(key) {
                Some(cell) => (cell.clone(), false),
                None => {
                    let cell = Arc::new(OnceCell::new());
                    inflight.insert(key.to_string(), cell.clone());
                    (cell, true)
                }
            }
        };
        // Forgets the key when this caller leaves, also when its future is dropped (the decision
        // timed out), so the map never keeps a lookup nobody runs.
        let _forget = Forget {
            inflight: &self.inflight,
            key,
            cell: cell.clone(),
            first,
        };
        let mut ran = Ran::Shared;
        let value = cell
            .get_or_init(|| {
                ran = Ran::Itself;
                request()
            })
            .await
            .clone();
        (value, ran)
    }

    /// Lookups in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.lock().map(|m| m.len()).unwrap_or_default()
    }
}

struct Forget<'a, T> {
    inflight: &'a Mutex<HashMap<String, Arc<OnceCell<T>>>>,
    key: &'a str,
    cell: Arc<OnceCell<T>>,
    first: bool,
}

impl<T> Drop for Forget<'_, T> {
    fn drop(&mut self) {
        if !(self.first || self.cell.initialized()) {
            return;
        }
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if inflight
            .get(self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cell))
        {
            inflight.remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use super::*;

    #[test]
    fn the_budget_allows_a_burst_then_its_rate() {
        let budget = Budget::new(5.0, 10.0);
        let start = Instant::now();
        let taken = (0..100).filter(|_| budget.try_take_at(start)).count();
        assert_eq!(taken, 10, "the burst, then nothing at the same instant");
        let later = start + Duration::from_secs(2);
        let taken = (0..100).filter(|_| budget.try_take_at(later)).count();
        assert_eq!(taken, 10, "5 a second for 2 seconds");
        let much_later = later + Duration::from_secs(3600);
        let taken = (0..100).filter(|_| budget.try_take_at(much_later)).count();
        assert_eq!(taken, 10, "never more than the burst saved up");
    }

    #[tokio::test]
    async fn concurrent_lookups_of_one_key_share_one_request() {
        let coalesce = Arc::new(Coalesce::<usize>::default());
        let requests = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (coalesce, requests, gate) = (coalesce.clone(), requests.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                coalesce
                    .run("shop", || async move {
                        gate.notified().await;
                        requests.fetch_add(1, Ordering::SeqCst) + 100
                    })
                    .await
            }));
        }
        // Let every task reach the cell, then release the one request.
        while coalesce.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        gate.notify_waiters();
        gate.notify_one();
        let mut shared = 0;
        for task in tasks {
            let (value, ran) = task.await.unwrap();
            assert_eq!(value, 100);
            shared += usize::from(ran == Ran::Shared);
        }
        assert_eq!(requests.load(Ordering::SeqCst), 1);
        assert_eq!(shared, 49);
        assert_eq!(coalesce.in_flight(), 0, "nothing kept once done");
        // A later lookup asks again.
        let (value, ran) = coalesce.run("shop", || async { 7 }).await;
        assert_eq!((value, ran), (7, Ran::Itself));
    }
}
