//! The runtime shape: N worker threads, each a current-thread tokio runtime with its own
//! listening sockets and upstream pools (a connection and its pool never change threads, as
//! in Envoy and nginx: a cross-core wakeup costs more than the proxy's work per request), and
//! one control thread for configuration, admin, metrics and export.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::Serialize;
use sluice_certs::CertStore;
use tokio::sync::watch;

use crate::control::SnapshotHub;
use crate::listener::WorkerListeners;
use crate::metrics::Stats;
use crate::upstream::{ClusterManager, Pools};

/// Integration points for the eBPF fast path (or any other datapath).
pub trait DataPlaneHooks: Send + Sync {
    /// The destination a connection had before a connect redirect (a Service VIP).
    fn original_destination(&self, _peer: SocketAddr, _local: SocketAddr) -> Option<SocketAddr> {
        None
    }
    /// Called with every upstream socket before it connects.
    fn upstream_socket(&self, _fd: std::os::fd::BorrowedFd<'_>) {}
}

/// No datapath integration.
pub struct NoHooks;
impl DataPlaneHooks for NoHooks {}

/// Per-address bind results, for the admin API and readiness.
#[derive(Default)]
pub struct ListenerStatus {
    inner: Mutex<BTreeMap<SocketAddr, ListenerState>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListenerState {
    pub listener: String,
    pub bound: bool,
    pub error: Option<String>,
}

impl ListenerStatus {
    pub fn bound(&self, addr: SocketAddr, name: &str) {
        if let Ok(mut m) = self.inner.lock() {
            m.insert(addr, ListenerState { listener: name.to_string(), bound: true, error: None });
        }
    }

    pub fn failed(&self, addr: SocketAddr, name: &str, error: &str) {
        if let Ok(mut m) = self.inner.lock() {
            m.insert(addr, ListenerState { listener: name.to_string(), bound: false, error: Some(error.to_string()) });
        }
    }

    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        if let Ok(mut m) = self.inner.lock() {
            m.retain(|a, _| keep(a));
        }
    }

    pub fn snapshot(&self) -> BTreeMap<SocketAddr, ListenerState> {
        self.inner.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// State shared by all workers.
pub struct Shared {
    pub hub: Arc<SnapshotHub>,
    pub clusters: Arc<ClusterManager>,
    pub certs: Arc<CertStore>,
    pub stats: Arc<Stats>,
    pub hooks: Arc<dyn DataPlaneHooks>,
    pub listener_status: ListenerStatus,
    pub hostname: String,
    /// Flips to true on shutdown: workers stop accepting and drain.
    pub shutdown: watch::Receiver<bool>,
}

/// One worker thread's state.
pub struct Worker {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub pools: Pools,
    /// Open downstream connections on this worker.
    pub connections: std::sync::atomic::AtomicUsize,
}

/// Counts a downstream connection for as long as it lives.
pub struct ConnGuard(Arc<Worker>);

impl ConnGuard {
    pub fn new(w: &Arc<Worker>) -> ConnGuard {
        w.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ConnGuard(w.clone())
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Starts `n` worker threads. Each returns when shutdown is signalled and its connections
/// have drained (or the drain deadline passed).
pub fn start_workers(shared: Arc<Shared>, n: usize) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut handles = Vec::with_capacity(n);
    for id in 0..n {
        let shared = shared.clone();
        let h = std::thread::Builder::new().name(format!("sluice-worker-{id}")).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(worker = id, "cannot start runtime: {e}");
                    return;
                }
            };
            let worker = Worker { id, shared, pools: Pools::new(), connections: Default::default() };
            rt.block_on(worker_main(Arc::new(worker)));
        })?;
        handles.push(h);
    }
    Ok(handles)
}

async fn worker_main(worker: Arc<Worker>) {
    let mut changes = worker.shared.hub.subscribe();
    let mut shutdown = worker.shared.shutdown.clone();
    let mut listeners = WorkerListeners::default();
    loop {
        let snapshot = worker.shared.hub.load();
        listeners.reconcile(&worker, &snapshot);
        tokio::select! {
            r = changes.changed() => if r.is_err() { break },
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
    listeners.drain_all();
    // Connections finish their in-flight requests; stop when they are gone or the drain
    // window has passed.
    let deadline = tokio::time::Instant::now() + drain_deadline(&worker);
    while worker.connections.load(std::sync::atomic::Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn drain_deadline(worker: &Worker) -> std::time::Duration {
    let snap = worker.shared.hub.load();
    snap.listeners
        .iter()
        .flat_map(|l| l.filter_chains.iter())
        .filter_map(|c| match &c.filter {
            sluice_config::model::NetworkFilter::HttpConnectionManager(h) => Some(h.drain_timeout),
            _ => None,
        })
        .max()
        .unwrap_or(std::time::Duration::from_secs(5))
        .min(std::time::Duration::from_secs(30))
}
