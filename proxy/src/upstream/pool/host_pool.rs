//! The connections one worker holds to one host (for one protocol and SNI).
//!
//! HTTP/1.1 connections are either lent to a request or idle in a LIFO stack (the most
//! recently used is reused first, so surplus connections age out through the idle timeout).
//! HTTP/2 connections stay in a list and are shared by concurrent requests up to the stream
//! limit. Only the owning worker touches a `HostPool`, so its mutex is never contended.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};

use crate::body::Body;
use crate::upstream::breakers::{BreakerGuard, OverflowKind};
use crate::upstream::cluster::ClusterCore;
use crate::upstream::error::UpstreamError;
use crate::upstream::host::Host;
use crate::upstream::pool::body::StreamSlot;
use crate::upstream::pool::connect;
use crate::upstream::pool::io::{PeerState, peer_state};
use crate::upstream::stats::{dec, inc};

/// Envoy's default upstream idle timeout.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// How often an idle pool checks whether its host left the cluster (its idle connections are
/// then closed).
const LIVENESS_CHECK: Duration = Duration::from_secs(5);

/// How long a finished HTTP/1.1 exchange may take to make its connection ready again before
/// the connection is given up (only when the request body is still being written after the
/// response ended).
const READY_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Mode {
    H1,
    H2,
    /// TLS with ALPN `h2,http/1.1`: the protocol is whatever the handshake settles on.
    Auto,
}

/// Accounts for one upstream connection (connecting or open): the `max_connections` slot,
/// `upstream_cx_active` and the pool's own count. Released when the connection is dropped.
pub(crate) struct ConnSlot {
    core: Arc<ClusterCore>,
    _breaker: BreakerGuard,
    pool: Weak<HostPool>,
}

impl ConnSlot {
    fn new(pool: &Arc<HostPool>, breaker: BreakerGuard) -> ConnSlot {
        debug_assert_eq!(breaker.kind(), OverflowKind::Connections);
        inc(&pool.core.stats.cx_total);
        inc(&pool.core.stats.cx_active);
        pool.open.fetch_add(1, Ordering::AcqRel);
        ConnSlot { core: pool.core.clone(), _breaker: breaker, pool: Arc::downgrade(pool) }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        dec(&self.core.stats.cx_active);
        if let Some(pool) = self.pool.upgrade() {
            pool.open.fetch_sub(1, Ordering::AcqRel);
            // A request waiting for a connection slot may now open one.
            pool.wake_one();
        }
    }
}

pub(crate) struct H1Conn {
    pub sender: http1::SendRequest<Body>,
    pub tcp: Arc<TcpStream>,
    pub created: Instant,
    pub requests: u32,
    pub generation: u64,
    pub _slot: ConnSlot,
}

pub(crate) struct H2Conn {
    pub sender: http2::SendRequest<Body>,
    pub created: Instant,
    pub generation: u64,
    /// Streams in flight on this connection.
    pub active: AtomicU32,
    /// Streams ever opened on this connection.
    pub total: AtomicU32,
    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS, updated by the connection's driver.
    pub peer_max_streams: Arc<AtomicUsize>,
    /// Instant (as nanos since the pool's creation) the last stream ended.
    pub idle_since: AtomicU64,
    pub _slot: ConnSlot,
}

struct IdleH1 {
    conn: H1Conn,
    since: Instant,
}

/// Where TLS connections of this pool go.
#[derive(Clone)]
pub(crate) struct TlsTarget {
    pub server_name: ServerName<'static>,
    /// The SNI this pool was keyed by (`auto_sni`), or `None` when it is fixed per cluster.
    pub sni_key: Option<Box<str>>,
}

/// The outcome of an HTTP/2 connect that other requests may be waiting for.
type ConnectResult = Option<Result<(), UpstreamError>>;

#[derive(Default)]
struct PoolState {
    idle: Vec<IdleH1>,
    h2: Vec<Arc<H2Conn>>,
    /// A shared connect in progress (HTTP/2, or ALPN not yet known); concurrent requests
    /// wait for it instead of opening their own connection.
    h2_connecting: Option<watch::Receiver<ConnectResult>>,
    /// With `Mode::Auto`: whether the last handshake chose h2.
    learned_h2: Option<bool>,
    /// The hooks' TLS configuration and our copy with ALPN set.
    tls_cache: Option<(Arc<ClientConfig>, Arc<ClientConfig>)>,
}

pub(crate) struct HostPool {
    pub core: Arc<ClusterCore>,
    pub host: Weak<Host>,
    pub mode: Mode,
    pub tls: Option<TlsTarget>,
    epoch: Instant,
    state: Mutex<PoolState>,
    /// Connections of this pool, connecting or open.
    open: AtomicU32,
    /// Requests acquiring a connection (notified when one frees up).
    waiters: AtomicU32,
    notify: Notify,
    sweeper: AtomicBool,
}

/// A connection lent to one request.
pub(crate) enum Acquired {
    H1 { conn: H1Conn, reused: bool },
    H2 { slot: StreamSlot, sender: http2::SendRequest<Body>, reused: bool },
}

impl Acquired {
    pub(crate) fn reused(&self) -> bool {
        match self {
            Acquired::H1 { reused, .. } | Acquired::H2 { reused, .. } => *reused,
        }
    }
}

fn lock(m: &Mutex<PoolState>) -> MutexGuard<'_, PoolState> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Decrements `waiters` when a request stops acquiring (also when it is cancelled).
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Clears `h2_connecting` if the connect is abandoned (its future dropped).
struct Connecting<'a> {
    pool: &'a HostPool,
    tx: Option<watch::Sender<ConnectResult>>,
}

impl Connecting<'_> {
    fn finish(mut self, result: Result<(), UpstreamError>) {
        if let Some(tx) = self.tx.take() {
            let mut state = lock(&self.pool.state);
            if state.h2_connecting.as_ref().is_some_and(|rx| rx.same_channel(&tx.subscribe())) {
                state.h2_connecting = None;
            }
            drop(state);
            tx.send_replace(Some(result));
        }
    }
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let mut state = lock(&self.pool.state);
            if state.h2_connecting.as_ref().is_some_and(|rx| rx.same_channel(&tx.subscribe())) {
                state.h2_connecting = None;
            }
            // Dropping `tx` wakes the waiters, who then connect themselves.
        }
    }
}

impl HostPool {
    pub(crate) fn new(core: Arc<ClusterCore>, host: &Arc<Host>, mode: Mode, tls: Option<TlsTarget>) -> Arc<HostPool> {
        Arc::new(HostPool {
            core,
            host: Arc::downgrade(host),
            mode,
            tls,
            epoch: Instant::now(),
            state: Mutex::new(PoolState::default()),
            open: AtomicU32::new(0),
            waiters: AtomicU32::new(0),
            notify: Notify::new(),
            sweeper: AtomicBool::new(false),
        })
    }

    /// True while the host is still part of its cluster.
    pub(crate) fn host_alive(&self) -> bool {
        self.host.upgrade().is_some_and(|h| !h.is_removed())
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX).max(1)
    }

    fn idle_timeout(&self) -> Option<Duration> {
        match self.core.config.idle_timeout {
            None => Some(DEFAULT_IDLE_TIMEOUT),
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
        }
    }

    fn max_requests(&self) -> Option<u32> {
        self.core.config.max_requests_per_connection.filter(|&n| n > 0)
    }

    fn too_old(&self, created: Instant, now: Instant) -> bool {
        self.core.config.max_connection_duration.is_some_and(|d| !d.is_zero() && now.duration_since(created) >= d)
    }

    fn generation(&self) -> u64 {
        self.core.pool_generation.load(Ordering::Acquire)
    }

    fn uses_h2(&self, state: &PoolState) -> bool {
        match self.mode {
            Mode::H1 => false,
            Mode::H2 => true,
            Mode::Auto => state.learned_h2 == Some(true),
        }
    }

    /// Whether concurrent requests should wait for a connect in progress rather than open
    /// their own: always for HTTP/2, and with ALPN until the first handshake said HTTP/1.1
    /// (as Envoy's mixed pool does).
    fn shares_connect(&self, state: &PoolState) -> bool {
        match self.mode {
            Mode::H1 => false,
            Mode::H2 => true,
            Mode::Auto => state.learned_h2 != Some(false),
        }
    }

    fn wake_one(&self) {
        if self.waiters.load(Ordering::Acquire) > 0 {
            self.notify.notify_one();
        }
    }

    /// The maximum streams per HTTP/2 connection: the cluster's limit and the peer's.
    fn stream_limit(&self, conn: &H2Conn) -> u64 {
        let configured = u64::from(self.core.config.http2.max_concurrent_streams.max(1));
        let peer = conn.peer_max_streams.load(Ordering::Relaxed) as u64;
        configured.min(peer.max(1))
    }

    /// Lends a connection: a pooled one if possible, else a new one (respecting
    /// `max_connections` and `max_pending_requests`). With `fresh`, pooled HTTP/1.1 and
    /// HTTP/2 connections are skipped.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        host: &Arc<Host>,
        mut fresh: bool,
    ) -> Result<Acquired, UpstreamError> {
        let breakers = &self.core.breakers;
        // Held from the moment the request has to wait for a connection (connecting, or
        // queued behind max_connections) until it gets one.
        let mut pending: Option<BreakerGuard> = None;
        // Counted as a waiter for the whole acquisition, so that a connection released
        // between a failed checkout and the wait below still calls `notify_one`; with nobody
        // waiting yet, that leaves a permit the wait then consumes (no lost wakeup, and no
        // registration with the `Notify` on the fast path).
        self.waiters.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiters);
        loop {
            let wait_for_h2 = {
                let mut state = lock(&self.state);
                if !fresh && let Some(acquired) = self.checkout(&mut state, Instant::now()) {
                    return Ok(acquired);
                }
                if self.shares_connect(&state) { state.h2_connecting.clone() } else { None }
            };
            if let Some(mut rx) = wait_for_h2 {
                self.take_pending(&mut pending)?;
                if let Ok(result) = rx.wait_for(Option::is_some).await
                    && let Some(Err(e)) = &*result
                {
                    return Err(e.clone());
                }
                // The new connection is as fresh as it gets.
                fresh = false;
                continue;
            }
            let slot = breakers.try_connection().or_else(|| {
                // Envoy: a pool without any connection may always open one, so that its
                // requests cannot starve behind other workers' or hosts' connections.
                (self.open.load(Ordering::Acquire) == 0).then(|| breakers.force_connection())
            });
            if let Some(slot) = slot {
                self.take_pending(&mut pending)?;
                // Boxed: connecting (TCP, TLS, HTTP/2 handshake) is the cold path and by far
                // the largest state; inline, every request would carry and move it.
                return Box::pin(self.connect_new(host, slot)).await;
            }
            self.take_pending(&mut pending)?;
            self.notify.notified().await;
        }
    }

    fn take_pending(&self, pending: &mut Option<BreakerGuard>) -> Result<(), UpstreamError> {
        if pending.is_none() {
            *pending = Some(self.core.breakers.try_pending().ok_or(UpstreamError::Overflow(OverflowKind::Pending))?);
        }
        Ok(())
    }

    /// A pooled connection that can take a request now, if any.
    fn checkout(self: &Arc<Self>, state: &mut PoolState, now: Instant) -> Option<Acquired> {
        let generation = self.generation();
        let stats = &self.core.stats;
        if self.uses_h2(state) {
            state.h2.retain(|c| {
                if c.sender.is_closed() || c.generation != generation {
                    return false;
                }
                if self.too_old(c.created, now) {
                    inc(&stats.cx_max_duration_reached);
                    return false;
                }
                true
            });
            let max_requests = self.max_requests();
            let index =
                state.h2.iter().position(|c| u64::from(c.active.load(Ordering::Relaxed)) < self.stream_limit(c))?;
            let conn = state.h2[index].clone();
            conn.active.fetch_add(1, Ordering::Relaxed);
            let total = conn.total.fetch_add(1, Ordering::Relaxed) + 1;
            if max_requests.is_some_and(|max| total >= max) {
                // Drain: streams in flight finish, no new ones.
                inc(&stats.cx_max_requests);
                state.h2.swap_remove(index);
            }
            let sender = conn.sender.clone();
            return Some(Acquired::H2 { slot: StreamSlot { pool: self.clone(), conn }, sender, reused: true });
        }
        let idle_timeout = self.idle_timeout();
        while let Some(IdleH1 { conn, since }) = state.idle.pop() {
            if conn.generation != generation {
                continue;
            }
            if idle_timeout.is_some_and(|t| now.duration_since(since) >= t) {
                inc(&stats.cx_idle_timeout);
                continue;
            }
            if self.too_old(conn.created, now) {
                inc(&stats.cx_max_duration_reached);
                continue;
            }
            if conn.sender.is_closed() || !conn.sender.is_ready() {
                inc(&stats.cx_closed_before_reuse);
                continue;
            }
            match peer_state(&conn.tcp) {
                PeerState::Quiet => return Some(Acquired::H1 { conn, reused: true }),
                state => {
                    tracing::debug!(cluster = %self.core.config.name, ?state, "pooled connection closed by the upstream; not reusing it");
                    inc(&stats.cx_closed_before_reuse);
                }
            }
        }
        None
    }

    async fn connect_new(self: &Arc<Self>, host: &Arc<Host>, breaker: BreakerGuard) -> Result<Acquired, UpstreamError> {
        let tls_config = match &self.tls {
            Some(_) => Some(self.client_config()?),
            None => None,
        };
        let slot = ConnSlot::new(self, breaker);
        let connecting = {
            let mut state = lock(&self.state);
            if self.shares_connect(&state) {
                let (tx, rx) = watch::channel(None);
                state.h2_connecting = Some(rx);
                Some(Connecting { pool: self, tx: Some(tx) })
            } else {
                None
            }
        };
        let generation = self.generation();
        match connect::establish(self, host, tls_config, slot, generation).await {
            Ok(connect::NewConn::H1(conn)) => {
                if self.mode == Mode::Auto {
                    lock(&self.state).learned_h2 = Some(false);
                }
                if let Some(c) = connecting {
                    c.finish(Ok(()));
                }
                Ok(Acquired::H1 { conn, reused: false })
            }
            Ok(connect::NewConn::H2(conn)) => {
                conn.active.fetch_add(1, Ordering::Relaxed);
                conn.total.fetch_add(1, Ordering::Relaxed);
                {
                    let mut state = lock(&self.state);
                    state.learned_h2 = Some(true);
                    if self.max_requests().is_some_and(|max| max <= 1) {
                        inc(&self.core.stats.cx_max_requests);
                    } else {
                        state.h2.push(conn.clone());
                    }
                }
                if let Some(c) = connecting {
                    c.finish(Ok(()));
                }
                let sender = conn.sender.clone();
                Ok(Acquired::H2 { slot: StreamSlot { pool: self.clone(), conn }, sender, reused: false })
            }
            Err(e) => {
                if let Some(c) = connecting {
                    c.finish(Err(e.clone()));
                }
                Err(e)
            }
        }
    }

    /// The TLS client configuration with ALPN for this pool's protocol (unless the cluster's
    /// TLS context names its own ALPN protocols).
    fn client_config(&self) -> Result<Arc<ClientConfig>, UpstreamError> {
        let Some(tls) = &self.core.config.tls else {
            return Err(UpstreamError::Tls { target: self.core.config.name.clone(), message: "no TLS context".into() });
        };
        let base = self
            .core
            .hooks
            .tls_client_config(tls)
            .map_err(|message| UpstreamError::Tls { target: self.core.config.name.clone(), message })?;
        if !base.alpn_protocols.is_empty() {
            return Ok(base);
        }
        let mut state = lock(&self.state);
        if let Some((source, derived)) = &state.tls_cache
            && Arc::ptr_eq(source, &base)
        {
            return Ok(derived.clone());
        }
        let alpn: &[&[u8]] = match self.mode {
            Mode::H1 => &[b"http/1.1"],
            Mode::H2 => &[b"h2"],
            Mode::Auto => &[b"h2", b"http/1.1"],
        };
        let mut config = (*base).clone();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let derived = Arc::new(config);
        state.tls_cache = Some((base, derived.clone()));
        Ok(derived)
    }

    /// Takes back an HTTP/1.1 connection whose exchange completed cleanly.
    pub(crate) fn release_h1(self: &Arc<Self>, conn: H1Conn) {
        let now = Instant::now();
        let stats = &self.core.stats;
        if !self.host_alive() || conn.generation != self.generation() || conn.sender.is_closed() {
            return;
        }
        if self.max_requests().is_some_and(|max| conn.requests >= max) {
            inc(&stats.cx_max_requests);
            return;
        }
        if self.too_old(conn.created, now) {
            inc(&stats.cx_max_duration_reached);
            return;
        }
        if conn.sender.is_ready() {
            self.push_idle(conn, now);
            return;
        }
        // The response ended before hyper made the connection ready again (another thread
        // drives it, or the request body is still being written): wait for that off the
        // request path.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let pool = self.clone();
        runtime.spawn(async move {
            let mut conn = conn;
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, conn.sender.ready()).await {
                pool.push_idle(conn, Instant::now());
            }
        });
    }

    fn push_idle(self: &Arc<Self>, conn: H1Conn, now: Instant) {
        lock(&self.state).idle.push(IdleH1 { conn, since: now });
        self.ensure_sweeper();
        self.wake_one();
    }

    /// Called when a stream of an HTTP/2 connection ends.
    pub(crate) fn release_h2_stream(self: &Arc<Self>, conn: &H2Conn) {
        if conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            conn.idle_since.store(self.nanos(Instant::now()), Ordering::Relaxed);
            self.ensure_sweeper();
        }
        self.wake_one();
    }

    /// Starts the task that closes connections idle longer than the idle timeout, and those of
    /// a host that left its cluster.
    fn ensure_sweeper(self: &Arc<Self>) {
        if self.sweeper.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.sweeper.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                let next = match weak.upgrade() {
                    Some(pool) => pool.sweep(Instant::now()),
                    None => return,
                };
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => return,
                }
            }
        });
    }

    /// Closes expired idle connections; returns when to look again, or `None` (and marks the
    /// sweeper stopped) when nothing is idle.
    fn sweep(&self, now: Instant) -> Option<Instant> {
        let stats = &self.core.stats;
        let mut state = lock(&self.state);
        let alive = self.host_alive();
        let generation = self.generation();
        let idle_timeout = self.idle_timeout();
        let expired = |since: Instant| idle_timeout.is_some_and(|t| now.duration_since(since) >= t);
        state.idle.retain(|i| {
            if !alive || i.conn.generation != generation || i.conn.sender.is_closed() {
                return false;
            }
            if expired(i.since) {
                inc(&stats.cx_idle_timeout);
                return false;
            }
            true
        });
        let now_nanos = self.nanos(now);
        state.h2.retain(|c| {
            if c.sender.is_closed() {
                return false;
            }
            let idle = c.active.load(Ordering::Relaxed) == 0;
            if idle && (!alive || c.generation != generation) {
                return false;
            }
            let idle_for = Duration::from_nanos(now_nanos.saturating_sub(c.idle_since.load(Ordering::Relaxed)));
            if idle && idle_timeout.is_some_and(|t| idle_for >= t) {
                inc(&stats.cx_idle_timeout);
                return false;
            }
            true
        });
        let mut next = now + LIVENESS_CHECK;
        let mut anything_idle = false;
        for i in &state.idle {
            anything_idle = true;
            if let Some(t) = idle_timeout {
                next = next.min(i.since + t);
            }
        }
        for c in &state.h2 {
            if c.active.load(Ordering::Relaxed) == 0 {
                anything_idle = true;
                if let Some(t) = idle_timeout {
                    let since = self.epoch + Duration::from_nanos(c.idle_since.load(Ordering::Relaxed));
                    next = next.min(since + t);
                }
            }
        }
        if !anything_idle {
            self.sweeper.store(false, Ordering::Release);
            return None;
        }
        Some(next.max(now + Duration::from_millis(1)))
    }
}
