//! The connections a listener open to every pod holds (the webhook's, the proxy's admin port),
//! each under a deadline, and the cap on how many.
//!
//! A connection is *pending* from its accept until it has delivered a whole request, *busy* while
//! it is answered, and *idle* between requests. Pending has [`ConnectionLimits::request_timeout`]
//! (counted from the accept, or from the first byte of a request on a kept-alive connection),
//! idle has [`ConnectionLimits::idle_timeout`], busy has none (the handler bounds its own time).
//! At the cap, a new connection takes the slot of the oldest connection that is not busy: a
//! client that holds connections open without finishing requests can delay the requests that
//! matter (the API server's admission reviews, kubelet's probes) by no more than the moment it
//! takes to evict one, where waiting in the accept queue behind it would let it starve them.

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Notify,
    time::Instant,
};

/// The cap and the deadlines of one listener.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time for a whole request from its first byte (for a new connection, from the accept).
    pub request_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
}

const PENDING: u8 = 0;
const BUSY: u8 = 1;
const IDLE: u8 = 2;

/// Why a connection was closed by the listener rather than by its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// It had not delivered a whole request within the request timeout.
    RequestTimeout,
    /// It stayed idle beyond the idle timeout.
    IdleTimeout,
    /// A new connection took its slot at the cap.
    Evicted,
}

impl Closed {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RequestTimeout => "request_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::Evicted => "evicted",
        }
    }
}

/// All open connections.
pub struct Connections {
    limits: ConnectionLimits,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    open: usize,
    next_age: u64,
    /// Connections that are not busy, oldest first.
    evictable: BTreeMap<u64, Arc<Slot>>,
}

impl Connections {
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            table: Mutex::new(Table::default()),
        })
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // The table holds counts only; a panic elsewhere leaves it usable.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.table().open
    }

    /// A slot for a connection just accepted, evicting the oldest connection that is not busy
    /// when at the cap; `None` when every connection is busy (the new one is closed at once).
    /// The connection holds the [`Lease`] for as long as it is open.
    pub fn admit(self: &Arc<Self>) -> Option<Lease> {
        let mut table = self.table();
        if table.open >= self.limits.max_connections {
            let (_, victim) = table.evictable.pop_first()?;
            victim.age.store(u64::MAX, Ordering::Release);
            victim.evicted.store(true, Ordering::Release);
            victim.wake.notify_one();
            // The victim's slot passes to the newcomer: `open` stays as it is.
            victim.counted.store(false, Ordering::Release);
        } else {
            table.open += 1;
        }
        let age = table.next_age;
        table.next_age += 1;
        let slot = Arc::new(Slot {
            connections: self.clone(),
            phase: AtomicU8::new(PENDING),
            deadline: Mutex::new(Some(Instant::now() + self.limits.request_timeout)),
            age: AtomicU64::new(age),
            evicted: AtomicBool::new(false),
            counted: AtomicBool::new(true),
            gone: AtomicBool::new(false),
            wake: Notify::new(),
        });
        table.evictable.insert(age, slot.clone());
        Some(Lease(slot))
    }
}

/// A connection's hold on its slot, released when the connection ends.
pub struct Lease(Arc<Slot>);

impl Lease {
    pub fn slot(&self) -> &Arc<Slot> {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let slot = &self.0;
        let mut table = slot.connections.table();
        slot.gone.store(true, Ordering::Release);
        let age = slot.age.swap(u64::MAX, Ordering::AcqRel);
        if age != u64::MAX {
            table.evictable.remove(&age);
        }
        if slot.counted.swap(false, Ordering::AcqRel) {
            table.open = table.open.saturating_sub(1);
        }
    }
}

/// One connection's place among [`Connections`].
pub struct Slot {
    connections: Arc<Connections>,
    phase: AtomicU8,
    deadline: Mutex<Option<Instant>>,
    /// Key in the evictable table; `u64::MAX` while not in it.
    age: AtomicU64,
    evicted: AtomicBool,
    /// Whether this slot still counts among the open connections (an evicted one gave its
    /// count to the connection that evicted it).
    counted: AtomicBool,
    /// Set when the connection has ended, so that nothing puts it back in the table.
    gone: AtomicBool,
    wake: Notify,
}

impl Slot {
    fn set_deadline(&self, deadline: Option<Instant>) {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner) = deadline;
        self.wake.notify_one();
    }

    /// Plaintext arrived: on an idle connection, a new request has begun and must be complete
    /// within the request timeout.
    fn note_read(&self) {
        if self
            .phase
            .compare_exchange(IDLE, PENDING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.set_deadline(Some(
                Instant::now() + self.connections.limits.request_timeout,
            ));
        }
    }

    /// The connection has delivered a whole request: no deadline and no eviction until the
    /// returned guard is dropped, when it is idle.
    pub fn busy(self: &Arc<Self>) -> Busy {
        {
            let mut table = self.connections.table();
            let age = self.age.swap(u64::MAX, Ordering::AcqRel);
            if age != u64::MAX {
                table.evictable.remove(&age);
            }
            self.phase.store(BUSY, Ordering::Release);
        }
        self.set_deadline(None);
        Busy(self.clone())
    }

    /// Runs `connection` until it ends, its deadline passes or it is evicted.
    pub async fn watch<F: Future>(&self, connection: F) -> Result<F::Output, Closed> {
        let mut connection = std::pin::pin!(connection);
        loop {
            if self.evicted.load(Ordering::Acquire) {
                return Err(Closed::Evicted);
            }
            let deadline = *self.deadline.lock().unwrap_or_else(PoisonError::into_inner);
            let expiry = async {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                output = &mut connection => return Ok(output),
                () = expiry => {
                    // A deadline moved meanwhile is looked at again.
                    let current = *self.deadline.lock().unwrap_or_else(PoisonError::into_inner);
                    if current == deadline {
                        return Err(if self.phase.load(Ordering::Acquire) == IDLE {
                            Closed::IdleTimeout
                        } else {
                            Closed::RequestTimeout
                        });
                    }
                }
                () = self.wake.notified() => {}
            }
        }
    }
}

/// Held while a request is answered; see [`Slot::busy`].
pub struct Busy(Arc<Slot>);

impl Drop for Busy {
    fn drop(&mut self) {
        let slot = &self.0;
        {
            let mut table = slot.connections.table();
            if slot.evicted.load(Ordering::Acquire) || slot.gone.load(Ordering::Acquire) {
                return;
            }
            let age = table.next_age;
            table.next_age += 1;
            slot.age.store(age, Ordering::Release);
            table.evictable.insert(age, slot.clone());
            slot.phase.store(IDLE, Ordering::Release);
        }
        slot.set_deadline(Some(Instant::now() + slot.connections.limits.idle_timeout));
    }
}

/// A connection's stream, telling its [`Slot`] when a request begins.
pub struct Watched<S> {
    inner: S,
    slot: Arc<Slot>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, slot: Arc<Slot>) -> Self {
        Self { inner, slot }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.slot.note_read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
