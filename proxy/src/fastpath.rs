//! The eBPF fast path as seen from the data plane: original destinations for redirected
//! connections, upstream sockets marked so they are never redirected back, and the Service
//! redirect table kept in step with each snapshot.
//!
//! Where a VIP is rewritten to matters. A client in Sluice's own network namespace can reach a
//! loopback listener, but `127.0.0.1` inside a pod is the pod's own loopback; the BPF programs
//! therefore honour a loopback target only for callers in Sluice's namespace. Pods need an
//! address of the node that Sluice listens on, which is what `rewrite_target` picks when the
//! listener offers one (see its rules).
//!
//! Two settings have no `sluice run` flag yet and are read from the environment by [`start`]:
//! - `SLUICE_FAST_PATH_SPLICE_CGROUPS`: cgroup2 directories (`:`-separated) whose processes
//!   opted in to sockmap splicing, added to [`FastPathConfig::splice_cgroups`];
//! - `SLUICE_FAST_PATH_NODE_ADDRESS`: this node's addresses (`,`-separated) that pods reach
//!   Sluice on, see [`Options::node_addresses`].

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use sluice_bpf::{FastPath, FastPathConfig, FastPathError, Redirect, Status, normalize};
use sluice_config::Snapshot;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::runtime::DataPlaneHooks;

/// Environment variable listing extra splice cgroups (`:`-separated directories).
pub const SPLICE_CGROUPS_ENV: &str = "SLUICE_FAST_PATH_SPLICE_CGROUPS";
/// Environment variable listing the node addresses pods reach Sluice on (`,`-separated).
pub const NODE_ADDRESS_ENV: &str = "SLUICE_FAST_PATH_NODE_ADDRESS";

/// Data-plane settings of the fast path that the BPF loader does not need.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Addresses of this node, at most one per family, that clients in other network
    /// namespaces (pods) can reach and that Sluice listens on: a VIP served by a listener bound
    /// to a wildcard address (`0.0.0.0:P`, `[::]:P`) is rewritten to `<node address>:P`.
    /// Without one, such a VIP is rewritten to loopback, which only clients in Sluice's own
    /// network namespace can use (pods then keep their original, unintercepted connect).
    pub node_addresses: Vec<IpAddr>,
}

impl Options {
    /// Reads [`NODE_ADDRESS_ENV`]. Unset or empty means no node address.
    pub fn from_env() -> Result<Options, FastPathError> {
        let node_addresses = match std::env::var(NODE_ADDRESS_ENV) {
            Ok(v) => parse_node_addresses(&v)?,
            Err(std::env::VarError::NotPresent) => Vec::new(),
            Err(e) => return Err(FastPathError::Config(format!("{NODE_ADDRESS_ENV}: {e}"))),
        };
        Ok(Options { node_addresses })
    }
}

fn parse_node_addresses(list: &str) -> Result<Vec<IpAddr>, FastPathError> {
    let ips = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            item.parse::<IpAddr>()
                .map_err(|_| FastPathError::Config(format!("{NODE_ADDRESS_ENV}: {item:?} is not an IP address")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    validate_node_addresses(&ips)
}

/// Normalises (v4-mapped to IPv4) and checks node addresses: each must be an address a pod
/// can reach, and a family can have only one (the rewrite target must be unambiguous).
fn validate_node_addresses(ips: &[IpAddr]) -> Result<Vec<IpAddr>, FastPathError> {
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in ips {
        let ip = normalize(SocketAddr::new(*ip, 1)).ip();
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
            return Err(FastPathError::Config(format!(
                "fast-path node address {ip} cannot be reached from pods (unspecified, loopback or multicast)"
            )));
        }
        if out.iter().any(|o| o.is_ipv4() == ip.is_ipv4()) {
            return Err(FastPathError::Config(format!(
                "more than one {} fast-path node address",
                if ip.is_ipv4() { "IPv4" } else { "IPv6" }
            )));
        }
        out.push(ip);
    }
    Ok(out)
}

/// Reads [`SPLICE_CGROUPS_ENV`]. Unset or empty means none.
fn splice_cgroups_from_env() -> Result<Vec<PathBuf>, FastPathError> {
    match std::env::var(SPLICE_CGROUPS_ENV) {
        Ok(v) => Ok(v.split(':').map(str::trim).filter(|s| !s.is_empty()).map(PathBuf::from).collect()),
        Err(std::env::VarError::NotPresent) => Ok(Vec::new()),
        Err(e) => Err(FastPathError::Config(format!("{SPLICE_CGROUPS_ENV}: {e}"))),
    }
}

/// The running fast path, plus what the data plane needs to drive it.
pub struct FastPathHooks {
    fp: FastPath,
    opts: Options,
    /// The Service table last installed, to log changes rather than every snapshot.
    installed: Mutex<Vec<Redirect>>,
}

/// Starts the fast path, with the settings that have no flag yet taken from the environment
/// (see the module documentation). `Ok(None)` when it is off, or when `auto` found the kernel
/// or the privileges lacking (the reason is logged).
pub fn start(mut cfg: FastPathConfig) -> Result<Option<Arc<FastPathHooks>>, FastPathError> {
    if cfg.mode == sluice_bpf::Mode::Off {
        return start_with(cfg, Options::default());
    }
    for dir in splice_cgroups_from_env()? {
        if !cfg.splice_cgroups.contains(&dir) {
            cfg.splice_cgroups.push(dir);
        }
    }
    start_with(cfg, Options::from_env()?)
}

/// Starts the fast path with explicit data-plane options (validated here).
pub fn start_with(cfg: FastPathConfig, opts: Options) -> Result<Option<Arc<FastPathHooks>>, FastPathError> {
    let opts = Options { node_addresses: validate_node_addresses(&opts.node_addresses)? };
    let splice = cfg.splice_cgroups.clone();
    let Some(fp) = FastPath::start(cfg)? else { return Ok(None) };
    tracing::info!(
        splice_cgroups = ?splice,
        node_addresses = ?opts.node_addresses,
        "eBPF fast path ready"
    );
    Ok(Some(Arc::new(FastPathHooks { fp, opts, installed: Mutex::new(Vec::new()) })))
}

impl FastPathHooks {
    pub fn fast_path(&self) -> &FastPath {
        &self.fp
    }

    /// State and counters, for the admin endpoint and metrics.
    pub fn status(&self) -> Status {
        self.fp.status()
    }

    /// Backpressure for the client -> Sluice direction of an accepted connection: call with
    /// `true` when the data plane's backlog on the connection passes
    /// [`FastPath::pause_threshold`] (before it stops reading), `false` once it drained.
    /// The client's next message then goes through TCP, which has flow control; the BPF
    /// programs' own credit bound applies whether or not this is called.
    pub fn set_downstream_paused(&self, peer: SocketAddr, local: SocketAddr, paused: bool) {
        if let Err(e) = self.fp.set_paused(peer, local, paused) {
            tracing::debug!(%peer, %local, "fast path: cannot update the pause flag: {e}");
        }
    }

    /// Rewrites connects to the Services that CECs redirect to the listener that serves them,
    /// and tells the kernel which addresses are Sluice's listeners.
    pub fn on_snapshot(&self, s: &Snapshot) {
        let listeners: HashMap<&str, &[SocketAddr]> =
            s.listeners.iter().map(|l| (l.name.as_str(), l.addresses.as_slice())).collect();
        let wanted = s.redirects.iter().flat_map(|r| {
            let addrs = listeners.get(r.listener.as_str()).copied().unwrap_or(&[]);
            r.frontends.iter().map(move |vip| Wanted { service: &r.service, listener: &r.listener, vip: *vip, addrs })
        });
        let (redirects, problems) = service_table(wanted, &self.opts.node_addresses);
        for p in &problems {
            tracing::warn!("fast path: {p}");
        }
        match self.fp.set_services(&redirects) {
            Ok(()) => self.log_table(redirects),
            Err(e) => tracing::error!("fast path: cannot update the Service table: {e}"),
        }
        let addrs: Vec<SocketAddr> = s.listeners.iter().flat_map(|l| l.addresses.iter().copied()).collect();
        if let Err(e) = self.fp.set_listeners(&addrs) {
            tracing::error!("fast path: cannot update the listener table: {e}");
        }
        // The full status walks the SOCKHASH and two more maps (a syscall per entry): only
        // when someone asked for it.
        if tracing::enabled!(tracing::Level::DEBUG) {
            match serde_json::to_string(&self.fp.status()) {
                Ok(status) => tracing::debug!(status = %status, "fast path status"),
                Err(e) => tracing::debug!("fast path status cannot be serialised: {e}"),
            }
        }
    }

    fn log_table(&self, redirects: Vec<Redirect>) {
        let mut installed = self.installed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if *installed == redirects {
            return;
        }
        let table: Vec<String> = redirects.iter().map(|r| format!("{} -> {}", r.vip, r.to)).collect();
        tracing::info!(redirects = redirects.len(), table = ?table, "fast path Service table updated");
        *installed = redirects;
    }
}

impl Drop for FastPathHooks {
    /// The counters since start, once, on the way out: what the fast path carried over the
    /// process's life, for the logs of a run (benchmarks, incident timelines).
    fn drop(&mut self) {
        match serde_json::to_string(&self.fp.stats()) {
            Ok(stats) => tracing::info!(stats = %stats, "eBPF fast path counters at shutdown"),
            Err(e) => tracing::warn!("fast path counters cannot be serialised: {e}"),
        }
    }
}

impl DataPlaneHooks for FastPathHooks {
    fn original_destination(&self, peer: SocketAddr, local: SocketAddr) -> Option<SocketAddr> {
        self.fp.original_dst(peer, local)
    }

    fn upstream_socket(&self, fd: std::os::fd::BorrowedFd<'_>) {
        if let Err(e) = self.fp.bypass(fd) {
            tracing::debug!("fast path: cannot mark an upstream socket: {e}");
        }
    }
}

/// An accepted connection that may be spliced, read and written until the socket says
/// `EAGAIN`.
///
/// tokio's `TcpStream` treats a short read (or write) as proof that the socket is drained and
/// waits for the next edge-triggered epoll event. A spliced socket breaks that rule. Once its
/// peer has fallen back to TCP (taint: credit exhausted, PAUSED), the socket holds data in two
/// queues, and `tcp_bpf_recvmsg` serves them one per call: first the redirected messages, then
/// the TCP receive queue. The read that drains the redirected messages is short, while TCP
/// bytes that arrived earlier (their epoll edge already consumed) are still queued. If the
/// peer then sends nothing more, for example because those bytes filled the receive window,
/// tokio never reads again and the connection stalls. The end-to-end integrity test hit this
/// on about one run in ten before clients read this way.
///
/// With `drain` set, a read or write clears readiness only on `WouldBlock`: at most one extra
/// `recv` per read burst. Without it, the stream behaves exactly like `TcpStream`, so the
/// data plane can use one type for every connection.
#[derive(Debug)]
pub struct FastPathStream {
    inner: TcpStream,
    drain: bool,
}

impl FastPathStream {
    /// `drain`: the connection may be spliced (the fast path redirected it).
    pub fn new(inner: TcpStream, drain: bool) -> Self {
        FastPathStream { inner, drain }
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }

    pub fn into_inner(self) -> TcpStream {
        self.inner
    }
}

impl AsyncRead for FastPathStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.drain {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            // `try_read` clears readiness only when the socket answers WouldBlock.
            match this.inner.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for FastPathStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.drain {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        loop {
            ready!(this.inner.poll_write_ready(cx))?;
            match this.inner.try_write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.drain {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        loop {
            ready!(this.inner.poll_write_ready(cx))?;
            match this.inner.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// One VIP a CEC redirects, with the addresses of the listener it goes to.
struct Wanted<'a> {
    service: &'a str,
    listener: &'a str,
    vip: SocketAddr,
    addrs: &'a [SocketAddr],
}

/// The Service table for a snapshot: one redirect per VIP, plus a description of every VIP
/// left out. A problem with one VIP never keeps the others from being installed (the loader
/// refuses the whole table if one entry is invalid). When two CECs redirect the same VIP, the
/// first one (in snapshot order) wins, as the translator orders CECs deterministically.
fn service_table<'a>(wanted: impl Iterator<Item = Wanted<'a>>, node: &[IpAddr]) -> (Vec<Redirect>, Vec<String>) {
    let mut out: Vec<Redirect> = Vec::new();
    let mut problems = Vec::new();
    for w in wanted {
        let vip = normalize(w.vip);
        if vip.port() == 0 || vip.ip().is_unspecified() {
            problems.push(format!("Service {}: frontend {vip} cannot be redirected", w.service));
            continue;
        }
        let to = match rewrite_target(vip, w.addrs, node) {
            Ok(to) => to,
            Err(why) => {
                problems
                    .push(format!("Service {} ({vip}) is not redirected to listener {}: {why}", w.service, w.listener));
                continue;
            }
        };
        if to == vip {
            problems.push(format!(
                "Service {} ({vip}) is not redirected: it is the address of listener {} itself",
                w.service, w.listener
            ));
            continue;
        }
        match out.iter().find(|r| r.vip == vip) {
            Some(first) if first.to != to => problems.push(format!(
                "Service {} ({vip}) is redirected to {} already; listener {} ({to}) is ignored for it",
                w.service, first.to, w.listener
            )),
            Some(_) => {}
            None => out.push(Redirect::new(vip, to)),
        }
    }
    (out, problems)
}

/// Where connects to `vip` are rewritten, given the addresses of the listener that serves it
/// (Sluice binds IPv6 listeners v6-only, so only addresses of the VIP's family count):
///
/// 1. a specified, non-loopback address of the listener: reachable from pods when it is a node
///    address, and from Sluice's own namespace in any case;
/// 2. a wildcard address (`0.0.0.0:P`, `[::]:P`): the node address of that family if one is
///    configured, else loopback;
/// 3. a loopback address: only clients in Sluice's own network namespace are redirected (the
///    BPF programs leave other callers' connects alone).
///
/// `vip` must be normalised (a v4-mapped address is IPv4).
fn rewrite_target(vip: SocketAddr, addrs: &[SocketAddr], node: &[IpAddr]) -> Result<SocketAddr, &'static str> {
    let same_family: Vec<SocketAddr> =
        addrs.iter().map(|a| normalize(*a)).filter(|a| a.is_ipv4() == vip.is_ipv4() && a.port() != 0).collect();
    if let Some(a) = same_family.iter().find(|a| !a.ip().is_unspecified() && !a.ip().is_loopback()) {
        return Ok(*a);
    }
    if let Some(a) = same_family.iter().find(|a| a.ip().is_unspecified()) {
        let ip = node.iter().find(|n| n.is_ipv4() == vip.is_ipv4()).copied().unwrap_or(if vip.is_ipv4() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        });
        return Ok(SocketAddr::new(ip, a.port()));
    }
    if let Some(a) = same_family.iter().find(|a| a.ip().is_loopback()) {
        return Ok(*a);
    }
    Err(if vip.is_ipv4() { "the listener has no IPv4 address" } else { "the listener has no IPv6 address" })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_listeners_get_loopback_targets_of_the_vips_family() {
        let addrs = [a("127.0.0.1:10001"), a("[::1]:10001")];
        assert_eq!(rewrite_target(a("127.96.0.10:80"), &addrs, &[]), Ok(a("127.0.0.1:10001")));
        assert_eq!(rewrite_target(a("[fd00::10]:80"), &addrs, &[]), Ok(a("[::1]:10001")));
        // A node address does not make a loopback-only listener reachable from pods.
        assert_eq!(rewrite_target(a("127.96.0.10:80"), &addrs, &[ip("10.0.0.5")]), Ok(a("127.0.0.1:10001")));
    }

    #[test]
    fn a_specified_listener_address_is_used_as_is() {
        let addrs = [a("127.0.0.1:10001"), a("169.254.78.1:15001")];
        assert_eq!(rewrite_target(a("127.96.0.10:80"), &addrs, &[ip("10.0.0.5")]), Ok(a("169.254.78.1:15001")));
    }

    #[test]
    fn wildcard_listeners_are_rewritten_to_the_node_address_of_the_family() {
        let addrs = [a("0.0.0.0:15001"), a("[::]:15002")];
        let node = [ip("169.254.78.1"), ip("fd00::1")];
        assert_eq!(rewrite_target(a("127.96.0.10:80"), &addrs, &node), Ok(a("169.254.78.1:15001")));
        assert_eq!(rewrite_target(a("[fd00::10]:80"), &addrs, &node), Ok(a("[fd00::1]:15002")));
        // No node address: loopback, which serves Sluice's own namespace only.
        assert_eq!(rewrite_target(a("127.96.0.10:80"), &addrs, &[]), Ok(a("127.0.0.1:15001")));
        assert_eq!(rewrite_target(a("[fd00::10]:80"), &addrs, &node[..1]), Ok(a("[::1]:15002")));
    }

    #[test]
    fn a_vip_of_a_family_the_listener_lacks_is_not_redirected() {
        assert!(rewrite_target(a("[fd00::10]:80"), &[a("0.0.0.0:15001")], &[]).is_err());
        assert!(rewrite_target(a("127.96.0.10:80"), &[a("[::]:15001")], &[]).is_err());
        assert!(rewrite_target(a("127.96.0.10:80"), &[], &[]).is_err());
    }

    fn wanted<'a>(service: &'a str, listener: &'a str, vip: &str, addrs: &'a [SocketAddr]) -> Wanted<'a> {
        Wanted { service, listener, vip: a(vip), addrs }
    }

    #[test]
    fn one_bad_frontend_does_not_keep_the_others_out() {
        let l1 = [a("127.0.0.1:10001")];
        let l2 = [a("127.0.0.1:10002")];
        let v6_only = [a("[::1]:10003")];
        let (table, problems) = service_table(
            [
                wanted("default/a", "l1", "127.96.0.10:80", &l1),
                // The same VIP again, to another listener: the first one wins.
                wanted("default/b", "l2", "127.96.0.10:80", &l2),
                // The same VIP to the same target: no duplicate, no complaint.
                wanted("default/a", "l1", "[::ffff:127.96.0.10]:80", &l1),
                wanted("default/c", "l3", "127.96.0.11:80", &v6_only),
                wanted("default/d", "l1", "127.0.0.1:10001", &l1),
                wanted("default/e", "l2", "127.96.0.12:443", &l2),
            ]
            .into_iter(),
            &[],
        );
        assert_eq!(
            table,
            vec![
                Redirect::new(a("127.96.0.10:80"), a("127.0.0.1:10001")),
                Redirect::new(a("127.96.0.12:443"), a("127.0.0.1:10002")),
            ]
        );
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(problems[0].contains("default/b") && problems[0].contains("already"), "{}", problems[0]);
        assert!(problems[1].contains("no IPv4 address"), "{}", problems[1]);
        assert!(problems[2].contains("listener l1 itself"), "{}", problems[2]);
    }

    /// Both modes carry a stream intact, with reads shorter than the buffer and writes larger
    /// than the socket buffers (real loopback sockets).
    #[tokio::test]
    async fn fast_path_stream_reads_and_writes_in_both_modes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for drain in [false, true] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let client = tokio::spawn(async move {
                let mut s = FastPathStream::new(TcpStream::connect(addr).await.unwrap(), drain);
                let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
                s.write_all(&data).await.unwrap();
                // Three bytes go in whole as soon as the socket is writable at all.
                let n = s.write_vectored(&[io::IoSlice::new(b"ab"), io::IoSlice::new(b"c")]).await.unwrap();
                assert_eq!(n, 3);
                s.shutdown().await.unwrap();
                let mut back = String::new();
                s.read_to_string(&mut back).await.unwrap();
                back
            });
            let (accepted, _) = listener.accept().await.unwrap();
            let mut server = FastPathStream::new(accepted, drain);
            let mut got = Vec::new();
            let mut buf = vec![0u8; 70_000];
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got.len(), 4_000_003, "drain = {drain}");
            assert!(got[..4_000_000].iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
            assert_eq!(&got[4_000_000..], b"abc");
            server.write_all(b"done").await.unwrap();
            drop(server);
            assert_eq!(client.await.unwrap(), "done");
        }
    }

    #[test]
    fn node_addresses_are_validated() {
        assert_eq!(parse_node_addresses("").unwrap(), Vec::<IpAddr>::new());
        assert_eq!(parse_node_addresses("169.254.78.1, fd00::1").unwrap(), vec![ip("169.254.78.1"), ip("fd00::1")]);
        assert_eq!(parse_node_addresses("::ffff:10.0.0.5").unwrap(), vec![ip("10.0.0.5")]);
        for bad in ["nope", "127.0.0.1", "0.0.0.0", "::1", "10.0.0.1,10.0.0.2", "224.0.0.1"] {
            assert!(parse_node_addresses(bad).is_err(), "{bad} accepted");
        }
    }
}
