//! Listeners: binding, accepting, and handing each connection to its filter chain.
//!
//! Every worker binds its own `SO_REUSEPORT` socket for each listener address, so the kernel
//! spreads connections across workers and a connection never leaves the thread that accepted
//! it. Each worker reconciles its sockets with every new snapshot: new addresses are bound,
//! vanished ones stop accepting and their connections drain. A listener whose address is
//! unchanged keeps its socket; its connections pick up the new configuration per request.

pub mod bind;
pub mod chain;
pub mod prefixed;
pub mod proxy_protocol;
pub mod tls_accept;
pub mod tls_peek;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_config::model::{Listener, NetworkFilter, Snapshot};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::http::ctx::ConnInfo;
use crate::runtime::Worker;
use prefixed::Prefixed;

/// How long a connection may take to send its ClientHello or PROXY header (Envoy's
/// `listener_filters_timeout` default).
const LISTENER_FILTER_TIMEOUT: Duration = Duration::from_secs(15);

struct Bound {
    /// The listener this address belongs to now (a snapshot may move an address).
    name: watch::Sender<Arc<str>>,
    /// Dropping it stops the accept loop; connections see `drain` flip.
    stop: watch::Sender<bool>,
}

/// One worker's listening sockets.
#[derive(Default)]
pub struct WorkerListeners {
    bound: HashMap<SocketAddr, Bound>,
}

impl WorkerListeners {
    /// Brings the sockets in line with `snapshot`.
    pub fn reconcile(&mut self, worker: &Arc<Worker>, snapshot: &Snapshot) {
        if worker.id == 0 {
            tls_accept::preload(worker, snapshot);
        }
        let mut want: HashMap<SocketAddr, Arc<str>> = HashMap::new();
        for l in snapshot.listeners.iter().filter(|l| !l.internal) {
            for a in &l.addresses {
                want.insert(*a, Arc::from(l.name.as_str()));
            }
        }
        self.bound.retain(|addr, b| {
            if want.contains_key(addr) {
                true
            } else {
                tracing::info!(worker = worker.id, %addr, "listener removed: draining");
                let _ = b.stop.send(true);
                false
            }
        });
        for (addr, name) in want {
            if let Some(b) = self.bound.get(&addr) {
                if **b.name.borrow() != *name {
                    let _ = b.name.send(name);
                }
                continue;
            }
            match bind::bind(addr) {
                Ok(std_listener) => match TcpListener::from_std(std_listener) {
                    Ok(l) => {
                        let (name_tx, name_rx) = watch::channel(name.clone());
                        let (stop_tx, stop_rx) = watch::channel(false);
                        tokio::spawn(accept_loop(worker.clone(), l, addr, name_rx, stop_rx));
                        self.bound.insert(addr, Bound { name: name_tx, stop: stop_tx });
                        worker.shared.listener_status.bound(addr, &name);
                        if worker.id == 0 {
                            tracing::info!(%addr, listener = %name, "listening");
                        }
                    }
                    Err(e) => worker.shared.listener_status.failed(addr, &name, &e.to_string()),
                },
                Err(e) => {
                    if worker.id == 0 {
                        tracing::error!(%addr, listener = %name, "cannot bind: {e}");
                    }
                    worker.shared.listener_status.failed(addr, &name, &e.to_string());
                }
            }
        }
    }

    /// Stops accepting everywhere; connections drain.
    pub fn drain_all(&mut self) {
        for (_, b) in self.bound.drain() {
            let _ = b.stop.send(true);
        }
    }
}

async fn accept_loop(
    worker: Arc<Worker>,
    l: TcpListener,
    addr: SocketAddr,
    name: watch::Receiver<Arc<str>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            r = l.accept() => match r {
                Ok((stream, peer)) => {
                    let listener_name = name.borrow().clone();
                    let drain = stop.clone();
                    let w = worker.clone();
                    tokio::spawn(async move {
                        handle(w, stream, peer, listener_name, drain).await;
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%addr, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// A connection from accept to its network filter.
async fn handle(
    worker: Arc<Worker>,
    stream: TcpStream,
    peer: SocketAddr,
    listener_name: Arc<str>,
    drain: watch::Receiver<bool>,
) {
    let _guard = crate::runtime::ConnGuard::new(&worker);
    let snapshot = worker.shared.hub.load();
    let Some(listener) = snapshot.listener(&listener_name).cloned() else { return };
    let _ = stream.set_nodelay(true);
    bind::apply_keepalive(&stream, listener.tcp_keepalive.as_ref());
    let Ok(mut local) = stream.local_addr() else { return };
    let mut remote = peer;
    let mut prefix: Vec<u8> = Vec::new();
    let mut stream = stream;

    if listener.proxy_protocol {
        match proxy_protocol::read_header(&mut stream, LISTENER_FILTER_TIMEOUT).await {
            Ok((addrs, rest)) => {
                if let Some((src, dst)) = addrs {
                    remote = src;
                    local = dst;
                }
                prefix = rest;
            }
            Err(e) => {
                tracing::debug!(%peer, "PROXY protocol: {e}");
                return;
            }
        }
    }
    let original_dst = worker.shared.hooks.original_destination(remote, local);
    // A redirected connection may be spliced by the fast path: read it until EAGAIN, because
    // the kernel can return a short read while bytes still wait on the TCP queue.
    let mut stream = crate::fastpath::FastPathStream::new(stream, original_dst.is_some());

    let mut hello = tls_peek::ClientHello::default();
    if chain::needs_tls_inspection(&listener) {
        let mut io = Prefixed::new(std::mem::take(&mut prefix), &mut stream);
        let mut buf = Vec::new();
        match tls_peek::peek(&mut io, &mut buf, LISTENER_FILTER_TIMEOUT).await {
            Ok(h) => hello = h,
            Err(e) => {
                tracing::debug!(%peer, "listener filter: {e}");
                return;
            }
        }
        prefix = buf;
    }
    let input = chain::ChainInput {
        destination_port: original_dst.map(|a| a.port()).unwrap_or(local.port()),
        destination_ip: Some(original_dst.map(|a| a.ip()).unwrap_or(local.ip())),
        server_name: hello.server_name.as_deref(),
        transport_protocol: if hello.tls { "tls" } else { "raw_buffer" },
        application_protocols: &hello.alpn,
        source_ip: Some(remote.ip()),
        source_port: remote.port(),
    };
    let Some(chain) = chain::select(&listener, &input) else {
        tracing::debug!(%peer, listener = %listener.name, "no filter chain matches; closing");
        return;
    };
    let chain_name: Arc<str> = Arc::from(chain.name.as_str());
    let io = Prefixed::new(prefix, stream);

    match &chain.tls {
        Some(tls) => {
            let Some((tls_stream, info)) =
                tls_accept::accept(&worker, tls, &hello, io, peer, &chain.name, LISTENER_FILTER_TIMEOUT).await
            else {
                return;
            };
            let conn = Arc::new(ConnInfo {
                remote,
                local,
                original_dst,
                tls: Some(info),
                listener: listener_name,
                chain: chain_name,
                activity: Arc::default(),
            });
            dispatch(worker, &listener, &chain.filter, conn, tls_stream, drain).await;
        }
        None => {
            let conn = Arc::new(ConnInfo {
                remote,
                local,
                original_dst,
                tls: None,
                listener: listener_name,
                chain: chain_name,
                activity: Arc::default(),
            });
            dispatch(worker, &listener, &chain.filter, conn, io, drain).await;
        }
    }
}

/// Serves a connection to an internal listener (`internal_listener: {}`), reached through an
/// `envoy_internal_address` endpoint: an in-memory stream goes through the listener's filter
/// chain as a plaintext connection would. Returns `false` if no such internal listener exists.
pub fn serve_internal(worker: &Arc<Worker>, name: &str, io: tokio::io::DuplexStream, origin: &ConnInfo) -> bool {
    let snapshot = worker.shared.hub.load();
    let Some(listener) = snapshot.listener(name).filter(|l| l.internal).cloned() else { return false };
    let input = chain::ChainInput { transport_protocol: "raw_buffer", ..Default::default() };
    let Some(chain) = chain::select(&listener, &input) else { return false };
    let conn = Arc::new(ConnInfo {
        remote: origin.remote,
        local: origin.local,
        original_dst: origin.original_dst,
        tls: None,
        listener: Arc::from(name),
        chain: Arc::from(chain.name.as_str()),
        activity: Arc::default(),
    });
    let filter = match &chain.filter {
        NetworkFilter::HttpConnectionManager(h) => NetworkFilter::HttpConnectionManager(h.clone()),
        NetworkFilter::TcpProxy(t) => NetworkFilter::TcpProxy(t.clone()),
    };
    let worker = worker.clone();
    // Internal connections live as long as the connection that opened them; they never drain
    // on their own.
    let (_never, drain) = watch::channel(false);
    let fut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = Box::pin(async move {
        let _keep = _never;
        dispatch(worker, &listener, &filter, conn, io, drain).await;
    });
    tokio::spawn(fut);
    true
}

async fn dispatch<I>(
    worker: Arc<Worker>,
    _listener: &Arc<Listener>,
    filter: &NetworkFilter,
    conn: Arc<ConnInfo>,
    io: I,
    drain: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match filter {
        NetworkFilter::HttpConnectionManager(hcm) => {
            crate::http::server::serve(worker, conn, hcm.clone(), io, drain).await
        }
        NetworkFilter::TcpProxy(tp) => crate::tcp_proxy::proxy(worker, conn, tp.clone(), io, drain).await,
    }
}
