//! Loading, attaching and driving the fast-path programs.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    hash::Hash,
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, SkStorage, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkMsg, SockOps, cgroup_sock_addr::CgroupSockAddrLinkId, sk_msg::SkMsgLinkId,
        sock_ops::SockOpsLinkId,
    },
};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::{
    FastPathConfig, FastPathError, Mode, Redirect,
    abi::{self, Config, ListenKey, OrigDst, SKF_BYPASS, SkState, SockKey, SvcKey, SvcTarget, encode_ip},
    object,
    stats::{Counter, Stats},
    system,
};

const PROG_MSG: &str = "sluice_msg";
const PROG_SOCKOPS: &str = "sluice_sockops";
/// cgroup sock_addr programs in attach order: getpeername before connect, so that every socket
/// connect rewrites already has its getpeername answered; connect last of all, so that every
/// socket it rewrites is also seen by sockops.
const SOCK_ADDR_PROGS: [(&str, &str); 4] = [
    ("sluice_getpeername4", "cgroup/getpeername4"),
    ("sluice_getpeername6", "cgroup/getpeername6"),
    ("sluice_connect4", "cgroup/connect4"),
    ("sluice_connect6", "cgroup/connect6"),
];

/// A running fast path. Dropping it detaches every program.
///
/// All methods take `&self` and are safe to call from any thread; each map update is one or a
/// few `bpf()` syscalls.
pub struct FastPath {
    ebpf: Ebpf,
    /// In attach order; detached in reverse order on drop.
    links: Vec<Link>,
    services: Mutex<Table<SvcKey, SvcTarget>>,
    listeners: Mutex<Table<ListenKey, u32>>,
    splice: Mutex<Table<u64, u32>>,
    orig_dst: Mutex<BpfHashMap<MapData, SockKey, OrigDst>>,
    paused: Mutex<BpfHashMap<MapData, SockKey, u32>>,
    skstate: Mutex<SkStorage<MapData, SkState>>,
    socks: SockHash<MapData, SockKey>,
    stats: PerCpuArray<MapData, u64>,
    pause_calls: AtomicU64,
    info: Info,
}

#[derive(Clone, Debug)]
struct Info {
    mode: Mode,
    cgroup: PathBuf,
    self_cgroup: PathBuf,
    self_cgroup_id: u64,
    netns_cookie: u64,
    pause_threshold_bytes: usize,
}

/// A program attached by [`FastPath`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AttachedProgram {
    /// Function name in `sluice.bpf.c`.
    pub name: &'static str,
    /// Section (attach point) of the program.
    pub attach: &'static str,
    /// What it is attached to: a cgroup directory, or the SOCKHASH for sk_msg.
    pub target: String,
}

/// State of the fast path for the admin endpoint.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub mode: Mode,
    /// cgroup2 directory the programs are attached to.
    pub cgroup: PathBuf,
    /// Sluice's own cgroup (loop guard).
    pub self_cgroup: PathBuf,
    pub self_cgroup_id: u64,
    /// Network namespace of Sluice's listeners.
    pub netns_cookie: u64,
    pub programs: Vec<AttachedProgram>,
    /// Entries in SERVICES (VIP:port redirects).
    pub services: usize,
    /// Entries in LISTENERS.
    pub listeners: usize,
    /// Entries in SPLICE_CGROUPS.
    pub splice_cgroups: usize,
    /// Sockets currently in the SOCKHASH (both ends of every spliced connection).
    pub sockhash_entries: usize,
    /// Original destinations recorded but not yet collected by [`FastPath::original_dst`].
    pub pending_original_dsts: usize,
    /// Connections currently paused.
    pub paused_connections: usize,
    pub pause_threshold_bytes: usize,
    /// `set_paused(.., true)` calls since start.
    pub pause_calls: u64,
    pub stats: Stats,
}

impl FastPath {
    /// Starts the fast path as `cfg.mode` says.
    ///
    /// - `Mode::Off`: `Ok(None)`, nothing touched.
    /// - `Mode::On`: the fast path or an error naming what is missing.
    /// - `Mode::Auto`: like `On`, but when the host lacks a capability or kernel feature the
    ///   reason is logged (`tracing::warn!`) and `Ok(None)` returned. Configuration errors
    ///   (e.g. a splice cgroup that is not a cgroup2 directory) are errors in every mode.
    ///
    /// Sluice's own cgroup (the loop guard) and network namespace (where its listeners live)
    /// are taken from the calling thread, so call this from the process and namespace that
    /// will accept the redirected connections.
    pub fn start(cfg: FastPathConfig) -> Result<Option<FastPath>, FastPathError> {
        match cfg.mode {
            Mode::Off => {
                info!("eBPF fast path off");
                Ok(None)
            }
            Mode::On => Self::start_enabled(cfg).map(Some),
            Mode::Auto => match Self::start_enabled(cfg) {
                Ok(fp) => Ok(Some(fp)),
                Err(err) if err.is_environmental() => {
                    warn!(reason = %err, "eBPF fast path disabled (--fast-path auto)");
                    Ok(None)
                }
                Err(err) => Err(err),
            },
        }
    }

    fn start_enabled(cfg: FastPathConfig) -> Result<FastPath, FastPathError> {
        let credit = i64::try_from(cfg.pause_threshold_bytes).ok().filter(|c| *c > 0).ok_or_else(|| {
            FastPathError::Config(format!(
                "pause_threshold_bytes must be between 1 and {}, got {}",
                i64::MAX,
                cfg.pause_threshold_bytes
            ))
        })?;
        system::preflight(&cfg.cgroup)?;
        let self_cgroup = system::own_cgroup_dir()?;
        let self_cgroup_id = system::cgroup_id(&self_cgroup)
            .map_err(|e| FastPathError::Unsupported(format!("cannot identify Sluice's own cgroup: {e}")))?;
        let netns_cookie = system::netns_cookie()?;
        let splice_ids = cgroup_ids(&cfg.splice_cgroups)?;
        let cgroup_dir = File::open(&cfg.cgroup).map_err(|source| FastPathError::Io {
            what: "cgroup directory to attach to",
            path: cfg.cgroup.clone(),
            source,
        })?;

        let mut ebpf = Ebpf::load(object::bytes()).map_err(|e| FastPathError::Object(Box::new(e)))?;
        let mut config: Array<MapData, Config> = take_map(&mut ebpf, "CONFIG")?;
        config
            .set(0, Config { self_cgroup_id, netns_cookie, credit_bytes: credit }, 0)
            .map_err(|e| FastPathError::map("CONFIG", "set", e))?;
        let mut splice = Table::new("SPLICE_CGROUPS", take_map(&mut ebpf, "SPLICE_CGROUPS")?);
        splice.replace(splice_ids.into_iter().map(|id| (id, 1)).collect())?;
        let services = Table::new("SERVICES", take_map(&mut ebpf, "SERVICES")?);
        let listeners = Table::new("LISTENERS", take_map(&mut ebpf, "LISTENERS")?);
        let orig_dst = take_map(&mut ebpf, "ORIG_DST")?;
        let paused = take_map(&mut ebpf, "PAUSED")?;
        let skstate = take_map(&mut ebpf, "SKSTATE")?;
        let socks: SockHash<MapData, SockKey> = take_map(&mut ebpf, "SOCKS")?;
        let stats = take_map(&mut ebpf, "STATS")?;

        // Attach order: sk_msg to the SOCKHASH, sockops, getpeername, connect last. On error
        // `ebpf` is dropped, which detaches whatever was attached so far.
        let mut links = Vec::with_capacity(2 + SOCK_ADDR_PROGS.len());
        {
            let prog: &mut SkMsg = program(&mut ebpf, PROG_MSG)?;
            prog.load().map_err(|e| FastPathError::program(PROG_MSG, "load", e))?;
            let id = prog.attach(socks.fd()).map_err(|e| FastPathError::program(PROG_MSG, "attach to SOCKS", e))?;
            links.push(Link::Msg(id));
        }
        {
            let prog: &mut SockOps = program(&mut ebpf, PROG_SOCKOPS)?;
            prog.load().map_err(|e| FastPathError::program(PROG_SOCKOPS, "load", e))?;
            let id = prog
                .attach(cgroup_dir.as_fd(), CgroupAttachMode::Single)
                .map_err(|e| FastPathError::program(PROG_SOCKOPS, "attach to the cgroup", e))?;
            links.push(Link::SockOps(id));
        }
        for (name, _) in SOCK_ADDR_PROGS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|e| FastPathError::program(name, "load", e))?;
            let id = prog
                .attach(cgroup_dir.as_fd(), CgroupAttachMode::Single)
                .map_err(|e| FastPathError::program(name, "attach to the cgroup", e))?;
            links.push(Link::SockAddr(name, id));
        }

        let info = Info {
            mode: cfg.mode,
            cgroup: cfg.cgroup,
            self_cgroup,
            self_cgroup_id,
            netns_cookie,
            pause_threshold_bytes: cfg.pause_threshold_bytes,
        };
        info!(
            cgroup = %info.cgroup.display(),
            self_cgroup = %info.self_cgroup.display(),
            self_cgroup_id,
            netns_cookie,
            "eBPF fast path attached"
        );
        Ok(FastPath {
            ebpf,
            links,
            services: Mutex::new(services),
            listeners: Mutex::new(listeners),
            splice: Mutex::new(splice),
            orig_dst: Mutex::new(orig_dst),
            paused: Mutex::new(paused),
            skstate: Mutex::new(skstate),
            socks,
            stats,
            pause_calls: AtomicU64::new(0),
            info,
        })
    }

    /// Replaces the VIP table: after this call exactly `entries` are redirected.
    ///
    /// Entries are validated first (nothing is changed if one is invalid); new and changed
    /// entries are written before stale ones are removed, so a VIP present in both the old and
    /// the new table is never briefly unredirected.
    pub fn set_services(&self, entries: &[Redirect]) -> Result<(), FastPathError> {
        let mut desired = HashMap::with_capacity(entries.len());
        for r in entries {
            let (key, target) = svc_entry(r)?;
            if let Some(prev) = desired.insert(key, target)
                && prev != target
            {
                return Err(FastPathError::InvalidRedirect {
                    vip: r.vip,
                    to: r.to,
                    reason: "the same VIP is listed with two different targets",
                });
            }
        }
        lock(&self.services).replace(desired)
    }

    /// Replaces the set of proxy listener addresses (in Sluice's network namespace). Only
    /// connections accepted on one of them are spliced. An unspecified address (`0.0.0.0:P`,
    /// `[::]:P`) covers every local address on that port; `[::]:P` also covers IPv4.
    pub fn set_listeners(&self, addrs: &[SocketAddr]) -> Result<(), FastPathError> {
        let desired = addrs
            .iter()
            .map(|addr| {
                let (ip, family) = encode_ip(addr.ip());
                let key = ListenKey { netns: self.info.netns_cookie, ip, port: addr.port(), family, _pad: 0 };
                (key, 1)
            })
            .collect();
        lock(&self.listeners).replace(desired)
    }

    /// Replaces the cgroups whose processes opted in to sockmap splicing.
    pub fn set_splice_cgroups(&self, dirs: &[PathBuf]) -> Result<(), FastPathError> {
        let ids = cgroup_ids(dirs)?;
        lock(&self.splice).replace(ids.into_iter().map(|id| (id, 1)).collect())
    }

    /// The destination a client originally connected to (the VIP), for a connection accepted
    /// with `peer` (remote) and `local` addresses. Removes the entry: call it once per accepted
    /// connection. `None` when the connection was not redirected by the fast path.
    pub fn original_dst(&self, peer: SocketAddr, local: SocketAddr) -> Option<SocketAddr> {
        let key = SockKey::accepted(peer, local)?;
        let mut map = lock(&self.orig_dst);
        let value = match map.get(&key, 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return None,
            Err(err) => {
                debug!(%peer, %local, error = %err, "ORIG_DST lookup failed");
                return None;
            }
        };
        if let Err(err) = map.remove(&key)
            && !matches!(err, MapError::KeyNotFound)
        {
            debug!(%peer, %local, error = %err, "ORIG_DST removal failed");
        }
        value.addr()
    }

    /// Marks a socket Sluice created for an upstream connection so that connect4/6 never
    /// rewrites it, even if it dials a VIP. Call before `connect()`. This is the second loop
    /// guard; the first is Sluice's cgroup id, which covers every socket of the process.
    pub fn bypass(&self, fd: BorrowedFd<'_>) -> Result<(), FastPathError> {
        let state = SkState { flags: SKF_BYPASS, ..SkState::default() };
        lock(&self.skstate).insert(&fd, state, 0).map_err(|e| FastPathError::map("SKSTATE", "insert (bypass)", e))
    }

    /// Backpressure for the client -> Sluice direction of an accepted connection.
    ///
    /// The redirect path has no flow control: a client writing into a spliced connection never
    /// blocks, and the bytes queue in kernel memory until Sluice reads them. The data plane
    /// calls `set_paused(.., true)` when its backlog on the connection exceeds
    /// [`FastPath::pause_threshold`] (i.e. before it stops reading); the client's next message
    /// then goes through TCP, and so does the rest of that connection, so TCP flow control
    /// applies. `false` clears the flag (useful only if the client has not written since).
    pub fn set_paused(&self, peer: SocketAddr, local: SocketAddr, paused: bool) -> Result<(), FastPathError> {
        let Some(key) = SockKey::accepted(peer, local) else {
            return Err(FastPathError::Config(format!(
                "set_paused: {peer} and {local} are of different address families"
            )));
        };
        let mut map = lock(&self.paused);
        if paused {
            self.pause_calls.fetch_add(1, Ordering::Relaxed);
            map.insert(key, 1, 0).map_err(|e| FastPathError::map("PAUSED", "insert", e))
        } else {
            match map.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(FastPathError::map("PAUSED", "remove", e)),
            }
        }
    }

    /// The per-connection, per-direction bound on bytes queued by the redirect path.
    pub fn pause_threshold(&self) -> usize {
        self.info.pause_threshold_bytes
    }

    /// Counters summed over CPUs. A counter that cannot be read counts as 0 (and is logged).
    pub fn stats(&self) -> Stats {
        Stats::from_fn(|counter: Counter| match self.stats.get(&(counter as u32), 0) {
            Ok(per_cpu) => per_cpu.iter().copied().fold(0u64, u64::wrapping_add),
            Err(err) => {
                debug!(?counter, error = %err, "reading STATS failed");
                0
            }
        })
    }

    /// Number of sockets in the SOCKHASH. Walks the map (one syscall per entry).
    pub fn sockhash_len(&self) -> usize {
        self.socks.keys().filter(Result::is_ok).count()
    }

    /// State for the admin endpoint. Walks SOCKHASH, ORIG_DST and PAUSED to count entries.
    pub fn status(&self) -> Status {
        let programs = self.links.iter().map(|link| link.describe(&self.info.cgroup)).collect();
        Status {
            mode: self.info.mode,
            cgroup: self.info.cgroup.clone(),
            self_cgroup: self.info.self_cgroup.clone(),
            self_cgroup_id: self.info.self_cgroup_id,
            netns_cookie: self.info.netns_cookie,
            programs,
            services: lock(&self.services).installed.len(),
            listeners: lock(&self.listeners).installed.len(),
            splice_cgroups: lock(&self.splice).installed.len(),
            sockhash_entries: self.sockhash_len(),
            pending_original_dsts: count_keys(&lock(&self.orig_dst)),
            paused_connections: count_keys(&lock(&self.paused)),
            pause_threshold_bytes: self.info.pause_threshold_bytes,
            pause_calls: self.pause_calls.load(Ordering::Relaxed),
            stats: self.stats(),
        }
    }
}

impl Drop for FastPath {
    /// Detaches connect first (no new redirects), sk_msg last. Sockets already in the SOCKHASH
    /// keep the sk_msg program until they close, so live spliced connections are not broken.
    fn drop(&mut self) {
        while let Some(link) = self.links.pop() {
            let program = link.name();
            if let Err(err) = link.detach(&mut self.ebpf) {
                warn!(program, error = %err, "detaching a fast-path program failed");
            }
        }
        info!("eBPF fast path detached");
    }
}

// The data plane shares one FastPath between its worker threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<FastPath>();
};

/// A map mirrored in user space, so that a snapshot can replace its content with the
/// minimum of writes.
struct Table<K, V> {
    name: &'static str,
    map: BpfHashMap<MapData, K, V>,
    installed: HashMap<K, V>,
}

impl<K: Pod + Eq + Hash, V: Pod + PartialEq> Table<K, V> {
    fn new(name: &'static str, map: BpfHashMap<MapData, K, V>) -> Self {
        Table { name, map, installed: HashMap::new() }
    }

    fn replace(&mut self, desired: HashMap<K, V>) -> Result<(), FastPathError> {
        for (key, value) in &desired {
            if self.installed.get(key) != Some(value) {
                self.map.insert(key, value, 0).map_err(|e| FastPathError::map(self.name, "insert", e))?;
                self.installed.insert(*key, *value);
            }
        }
        let stale: Vec<K> = self.installed.keys().filter(|k| !desired.contains_key(k)).copied().collect();
        for key in stale {
            match self.map.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {
                    self.installed.remove(&key);
                }
                Err(e) => return Err(FastPathError::map(self.name, "remove", e)),
            }
        }
        Ok(())
    }
}

enum Link {
    Msg(SkMsgLinkId),
    SockOps(SockOpsLinkId),
    SockAddr(&'static str, CgroupSockAddrLinkId),
}

impl Link {
    fn name(&self) -> &'static str {
        match self {
            Link::Msg(_) => PROG_MSG,
            Link::SockOps(_) => PROG_SOCKOPS,
            Link::SockAddr(name, _) => name,
        }
    }

    fn describe(&self, cgroup: &Path) -> AttachedProgram {
        let cgroup = cgroup.display().to_string();
        match self {
            Link::Msg(_) => AttachedProgram { name: PROG_MSG, attach: "sk_msg", target: "SOCKS".to_string() },
            Link::SockOps(_) => AttachedProgram { name: PROG_SOCKOPS, attach: "sockops", target: cgroup },
            Link::SockAddr(name, _) => AttachedProgram {
                name,
                attach: SOCK_ADDR_PROGS.iter().find(|(n, _)| n == name).map_or("cgroup", |(_, section)| section),
                target: cgroup,
            },
        }
    }

    fn detach(self, ebpf: &mut Ebpf) -> Result<(), FastPathError> {
        let name = self.name();
        let result = match self {
            Link::Msg(id) => program::<SkMsg>(ebpf, name)?.detach(id),
            Link::SockOps(id) => program::<SockOps>(ebpf, name)?.detach(id),
            Link::SockAddr(_, id) => program::<CgroupSockAddr>(ebpf, name)?.detach(id),
        };
        result.map_err(|e| FastPathError::program(name, "detach", e))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave a map half-written in a way that
    // matters (each write is one syscall), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, FastPathError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map =
        ebpf.take_map(name).ok_or_else(|| FastPathError::Unsupported(format!("the BPF object has no map {name}")))?;
    M::try_from(map).map_err(|e| FastPathError::map(name, "open", e))
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, FastPathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| FastPathError::Unsupported(format!("the BPF object has no program {name}")))?;
    prog.try_into().map_err(|e| FastPathError::program(name, "find", e))
}

fn count_keys<K: Pod, V: Pod>(map: &BpfHashMap<MapData, K, V>) -> usize {
    map.keys().filter(Result::is_ok).count()
}

fn cgroup_ids(dirs: &[PathBuf]) -> Result<HashSet<u64>, FastPathError> {
    dirs.iter().map(|d| system::cgroup_id(d)).collect()
}

/// Validates a redirect and encodes it as a SERVICES entry.
fn svc_entry(r: &Redirect) -> Result<(SvcKey, SvcTarget), FastPathError> {
    let invalid = |reason| FastPathError::InvalidRedirect { vip: r.vip, to: r.to, reason };
    let vip = abi::normalize(r.vip);
    let to = abi::normalize(r.to);
    if vip.port() == 0 || to.port() == 0 {
        return Err(invalid("ports must be non-zero"));
    }
    if vip.ip().is_unspecified() || to.ip().is_unspecified() {
        return Err(invalid("addresses must be specified"));
    }
    if vip == to {
        return Err(invalid("a VIP cannot be redirected to itself"));
    }
    let (vip_ip, vip_family) = encode_ip(vip.ip());
    let (to_ip, to_family) = encode_ip(to.ip());
    if vip_family != to_family {
        return Err(invalid("the VIP and its target must be of the same address family"));
    }
    Ok((
        SvcKey { ip: vip_ip, port: vip.port(), family: vip_family },
        SvcTarget { ip: to_ip, port: to.port(), family: to_family },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs as any user: a cgroup that does not exist is a missing host feature, whatever else
    /// the host lacks (capabilities, kernel).
    #[test]
    fn modes_decide_what_a_missing_feature_means() {
        let cfg = |mode| FastPathConfig {
            mode,
            cgroup: PathBuf::from("/nonexistent/sluice-cgroup"),
            splice_cgroups: Vec::new(),
            pause_threshold_bytes: crate::DEFAULT_PAUSE_THRESHOLD_BYTES,
        };
        assert!(matches!(FastPath::start(cfg(Mode::Off)), Ok(None)));
        assert!(matches!(FastPath::start(cfg(Mode::Auto)), Ok(None)));
        match FastPath::start(cfg(Mode::On)) {
            Err(err @ FastPathError::Unsupported(_)) => assert!(err.is_environmental()),
            Err(other) => panic!("expected Unsupported, got {other}"),
            Ok(_) => panic!("attached to a cgroup that does not exist"),
        }
        // A configuration error is an error even in auto mode.
        let bad = FastPathConfig { pause_threshold_bytes: 0, ..cfg(Mode::Auto) };
        assert!(matches!(FastPath::start(bad), Err(FastPathError::Config(_))));
    }

    fn redirect(vip: &str, to: &str) -> Redirect {
        Redirect::new(vip.parse().unwrap(), to.parse().unwrap())
    }

    #[test]
    fn redirects_are_validated() {
        assert!(svc_entry(&redirect("127.96.0.10:80", "127.0.0.1:15001")).is_ok());
        assert!(svc_entry(&redirect("[::1]:8080", "[::1]:15001")).is_ok());
        // v4-mapped is IPv4.
        let (k, t) = svc_entry(&redirect("[::ffff:127.96.0.10]:80", "127.0.0.1:15001")).unwrap();
        assert_eq!((k.family, t.family), (abi::AF_INET, abi::AF_INET));
        for (vip, to) in [
            ("127.96.0.10:80", "[::1]:15001"),
            ("127.96.0.10:0", "127.0.0.1:15001"),
            ("127.96.0.10:80", "0.0.0.0:15001"),
            ("127.0.0.1:15001", "[::ffff:127.0.0.1]:15001"),
        ] {
            let err = svc_entry(&redirect(vip, to)).unwrap_err();
            assert!(!err.is_environmental(), "{vip} -> {to}: {err}");
        }
    }
}
