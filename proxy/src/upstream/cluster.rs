//! The runtime of one cluster: its live host set, load balancer, breakers, stats and outlier
//! state. Shared by all workers behind an `Arc`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::Instant;

use arc_swap::{ArcSwap, Guard};
use http::HeaderMap;
use sluice_config::model::{Cluster, Discovery, Endpoint, EndpointAddress, EndpointHealth};
use tokio::sync::watch;

use crate::upstream::breakers::Breakers;
use crate::upstream::host::{Host, HostAddress, HostSpec};
use crate::upstream::lb::{LbState, PickInput};
use crate::upstream::manager::UpstreamHooks;
use crate::upstream::outlier::{Clock, DetectorShared};
use crate::upstream::stats::{ClusterStats, inc};

/// ORIGINAL_DST hosts unused for this long are forgotten (Envoy's default `cleanup_interval`).
const ORIGINAL_DST_CLEANUP_SECS: u64 = 5;

/// The parts of a cluster that hosts and connection pools need a handle on.
pub(crate) struct ClusterCore {
    pub config: Arc<Cluster>,
    pub stats: Arc<ClusterStats>,
    pub breakers: Breakers,
    pub hooks: Arc<dyn UpstreamHooks>,
    pub outlier: DetectorShared,
    pub clock: Clock,
    /// Bumped when pooled connections must not be reused any more
    /// (`close_connections_on_host_set_change`).
    pub pool_generation: AtomicU64,
}

/// What the load balancer needs from the request.
#[derive(Debug, Clone, Copy)]
pub struct LbContext<'a> {
    /// The route's hash (see [`hash_key`](crate::upstream::hash_key)) for RING_HASH and MAGLEV.
    pub hash: Option<u64>,
    /// The downstream connection's original destination, for ORIGINAL_DST clusters.
    pub original_dst: Option<SocketAddr>,
    /// Request headers, for ORIGINAL_DST's `http_header_name`.
    pub headers: &'a HeaderMap,
    /// Hosts earlier attempts of this request went to; a retry prefers another one.
    pub tried: &'a [Arc<Host>],
}

static NO_HEADERS: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(HeaderMap::new);

impl Default for LbContext<'_> {
    fn default() -> Self {
        LbContext { hash: None, original_dst: None, headers: &NO_HEADERS, tried: &[] }
    }
}

struct OriginalDst {
    header: Option<http::HeaderName>,
    hosts: ArcSwap<HashMap<SocketAddr, Arc<Host>>>,
    insert: Mutex<()>,
}

pub struct ClusterRuntime {
    pub(crate) core: Arc<ClusterCore>,
    /// The endpoints the host set was last built from (DNS clusters resolve these).
    endpoints: ArcSwap<Vec<Endpoint>>,
    hosts: ArcSwap<Vec<Arc<Host>>>,
    lb: ArcSwap<LbState>,
    /// Serializes host-set updates, unejections and balancer rebuilds. Workers only
    /// `try_lock` it, and only when something changed.
    rebuild: Mutex<()>,
    original_dst: Option<OriginalDst>,
    ready: watch::Sender<bool>,
    resolver: Mutex<Option<tokio::task::AbortHandle>>,
}

impl std::fmt::Debug for ClusterRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterRuntime")
            .field("name", &self.core.config.name)
            .field("hosts", &self.hosts.load().len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

pub(crate) fn spec_from_endpoint(e: &Endpoint) -> HostSpec {
    let address = match &e.address {
        EndpointAddress::Socket(a) => HostAddress::Socket(*a),
        EndpointAddress::Dns { host, port } => HostAddress::Dns { name: host.clone(), port: *port },
        EndpointAddress::Internal(l) => HostAddress::Internal(l.clone()),
    };
    HostSpec { address, hostname: e.hostname.clone(), weight: e.weight, health: e.health, priority: e.priority }
}

impl ClusterRuntime {
    /// A runtime for `config`. STATIC, EDS and ORIGINAL_DST clusters are ready at once; DNS
    /// clusters become ready after their first resolution, which the
    /// [`ClusterManager`](crate::upstream::ClusterManager) starts.
    pub(crate) fn new(config: Arc<Cluster>, hooks: Arc<dyn UpstreamHooks>) -> Arc<ClusterRuntime> {
        let stats = Arc::new(ClusterStats::default());
        let core = Arc::new(ClusterCore {
            breakers: Breakers::new(config.circuit_breakers.clone(), stats.clone()),
            stats,
            hooks,
            outlier: DetectorShared::default(),
            clock: Clock::new(),
            pool_generation: AtomicU64::new(0),
            config: config.clone(),
        });
        let original_dst = match &config.discovery {
            Discovery::OriginalDst { http_header_name } => Some(OriginalDst {
                header: http_header_name
                    .as_deref()
                    .and_then(|h| http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok()),
                hosts: ArcSwap::from_pointee(HashMap::new()),
                insert: Mutex::new(()),
            }),
            _ => None,
        };
        let dns = matches!(config.discovery, Discovery::StrictDns | Discovery::LogicalDns);
        let rt = Arc::new(ClusterRuntime {
            core,
            endpoints: ArcSwap::from_pointee(config.endpoints.clone()),
            hosts: ArcSwap::from_pointee(Vec::new()),
            lb: ArcSwap::from_pointee(LbState::empty()),
            rebuild: Mutex::new(()),
            original_dst,
            ready: watch::Sender::new(!dns),
            resolver: Mutex::new(None),
        });
        match config.discovery {
            Discovery::Static | Discovery::Eds { .. } => {
                rt.set_hosts(config.endpoints.iter().map(spec_from_endpoint).collect());
            }
            Discovery::LogicalDns => {
                // One host whose address is re-resolved in the background; its identity (and
                // pooled connections) survive address changes, as in Envoy.
                if let Some(first) = config.endpoints.first() {
                    let mut spec = spec_from_endpoint(first);
                    if let HostAddress::Dns { name, .. } = &spec.address {
                        spec.hostname.get_or_insert_with(|| name.clone());
                    }
                    rt.set_hosts(vec![spec]);
                }
            }
            Discovery::StrictDns | Discovery::OriginalDst { .. } => rt.set_hosts(Vec::new()),
        }
        rt
    }

    /// The configuration this runtime was built from. When an update changed only the
    /// endpoints, the runtime keeps this configuration and its state; the live hosts are
    /// [`hosts`](Self::hosts).
    pub fn config(&self) -> &Arc<Cluster> {
        &self.core.config
    }

    pub fn name(&self) -> &str {
        &self.core.config.name
    }

    pub fn breakers(&self) -> &Breakers {
        &self.core.breakers
    }

    pub fn stats(&self) -> &Arc<ClusterStats> {
        &self.core.stats
    }

    /// The current host set (for ORIGINAL_DST: the hosts seen recently).
    pub fn hosts(&self) -> Arc<Vec<Arc<Host>>> {
        match &self.original_dst {
            Some(od) => Arc::new(od.hosts.load().values().cloned().collect()),
            None => self.hosts.load_full(),
        }
    }

    pub(crate) fn endpoints(&self) -> Arc<Vec<Endpoint>> {
        self.endpoints.load_full()
    }

    /// True once the cluster has its initial hosts (DNS clusters: after the first resolution).
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until [`is_ready`](Self::is_ready). Envoy holds listeners until clusters warm up;
    /// callers that want the same can await this with a deadline.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we wait.
        let _ = rx.wait_for(|ready| *ready).await;
    }

    pub(crate) fn mark_ready(&self) {
        self.ready.send_if_modified(|r| !std::mem::replace(r, true));
    }

    pub(crate) fn set_resolver(&self, handle: Option<tokio::task::AbortHandle>) {
        if let Some(old) = std::mem::replace(&mut *lock(&self.resolver), handle) {
            old.abort();
        }
    }

    /// Chooses a host for a request, or `None` when the cluster has no usable host (the caller
    /// counts that with [`ClusterStats::no_healthy_upstream`]).
    pub fn choose(&self, ctx: &LbContext<'_>) -> Option<Arc<Host>> {
        self.choose_at(ctx, Instant::now())
    }

    pub(crate) fn choose_at(&self, ctx: &LbContext<'_>, now: Instant) -> Option<Arc<Host>> {
        if let Some(od) = &self.original_dst {
            return self.original_dst_host(od, ctx, now);
        }
        let lb = self.current_lb(now);
        lb.pick(&PickInput { hash: ctx.hash, tried: ctx.tried }, &self.core.stats)
    }

    /// The balancer to pick from, after returning hosts whose ejection ended and rebuilding
    /// if ejections or membership changed since it was built.
    fn current_lb(&self, now: Instant) -> Guard<Arc<LbState>> {
        let shared = &self.core.outlier;
        if shared.ejected.load(Ordering::Relaxed) > 0 {
            let now = self.core.clock.nanos(now);
            if now >= shared.next_unejection.load(Ordering::Acquire) {
                self.uneject_due(now);
            }
        }
        let lb = self.lb.load();
        if lb.epoch == shared.epoch.load(Ordering::Acquire) {
            return lb;
        }
        // Another worker may be rebuilding: keep using the previous balancer meanwhile.
        let Some(_guard) = try_lock(&self.rebuild) else { return lb };
        self.rebuild_locked();
        self.lb.load()
    }

    fn rebuild_locked(&self) {
        let epoch = self.core.outlier.epoch.load(Ordering::Acquire);
        let hosts = self.hosts.load();
        let config = &self.core.config;
        let state = LbState::build(&config.lb_policy, &hosts, config.healthy_panic_threshold, epoch, &self.core.stats);
        self.lb.store(Arc::new(state));
    }

    fn uneject_due(&self, now: u64) {
        let Some(_guard) = try_lock(&self.rebuild) else { return };
        let hosts = self.all_hosts();
        let mut any = false;
        for host in hosts.iter() {
            any |= host.monitor.try_uneject(now);
        }
        self.recount_ejections(&hosts);
        if any {
            tracing::info!(cluster = %self.core.config.name, "outlier detection returned hosts to service");
            self.core.outlier.epoch.fetch_add(1, Ordering::AcqRel);
            self.rebuild_locked();
        }
    }

    fn all_hosts(&self) -> Vec<Arc<Host>> {
        let mut hosts: Vec<Arc<Host>> = self.hosts.load().iter().cloned().collect();
        if let Some(od) = &self.original_dst {
            hosts.extend(od.hosts.load().values().cloned());
        }
        hosts
    }

    /// Recomputes the ejected count and the next unejection time from the hosts themselves
    /// (the authoritative state), under the rebuild lock.
    fn recount_ejections(&self, hosts: &[Arc<Host>]) {
        let mut ejected = 0u64;
        let mut next = u64::MAX;
        for host in hosts {
            let until = host.monitor.ejected_until();
            if until != 0 {
                ejected += 1;
                next = next.min(until);
            }
        }
        let shared = &self.core.outlier;
        shared.ejected.store(ejected, Ordering::Release);
        shared.next_unejection.store(next, Ordering::Release);
        self.core.stats.ejections_active.store(ejected, Ordering::Relaxed);
    }

    /// Replaces the endpoints (EDS/STATIC update, or a DNS cluster's new name list).
    pub(crate) fn set_endpoints(&self, endpoints: &[Endpoint]) {
        self.endpoints.store(Arc::new(endpoints.to_vec()));
        if matches!(self.core.config.discovery, Discovery::Static | Discovery::Eds { .. }) {
            self.set_hosts(endpoints.iter().map(spec_from_endpoint).collect());
        }
    }

    /// Installs a new host set. Hosts whose address is already present keep their identity
    /// and state; the others are created, and the missing ones retired.
    pub(crate) fn set_hosts(&self, specs: Vec<HostSpec>) {
        let _guard = lock(&self.rebuild);
        let old = self.hosts.load_full();
        let mut by_address: HashMap<&HostAddress, &Arc<Host>> = old.iter().map(|h| (h.address(), h)).collect();
        let mut seen = HashSet::new();
        let mut hosts = Vec::with_capacity(specs.len());
        let mut added = false;
        for spec in specs {
            if !seen.insert(spec.address.clone()) {
                continue;
            }
            match by_address.remove(&spec.address) {
                Some(host) => {
                    host.update(&spec);
                    hosts.push(host.clone());
                }
                None => {
                    added = true;
                    hosts.push(Host::new(self.core.clone(), spec));
                }
            }
        }
        let removed = !by_address.is_empty();
        for host in by_address.values() {
            host.mark_removed();
            host.monitor.clear();
        }
        let core = &self.core;
        core.outlier.total_hosts.store(hosts.len() as u64, Ordering::Relaxed);
        self.recount_ejections(&hosts);
        self.hosts.store(Arc::new(hosts));
        if added || removed {
            inc(&core.stats.membership_change);
            if core.config.close_connections_on_host_set_change {
                core.pool_generation.fetch_add(1, Ordering::AcqRel);
            }
        }
        core.outlier.epoch.fetch_add(1, Ordering::AcqRel);
        self.rebuild_locked();
    }

    /// Called when the cluster leaves the configuration (or is replaced): its hosts stop
    /// being pooled and its resolver stops.
    pub(crate) fn retire(&self) {
        self.set_resolver(None);
        for host in self.all_hosts() {
            host.mark_removed();
        }
    }

    fn original_dst_host(&self, od: &OriginalDst, ctx: &LbContext<'_>, now: Instant) -> Option<Arc<Host>> {
        let from_header = || {
            let value = ctx.headers.get(od.header.as_ref()?)?;
            value.to_str().ok()?.trim().parse::<SocketAddr>().ok()
        };
        let addr = from_header().or(ctx.original_dst)?;
        let now_secs = self.core.clock.nanos(now) / 1_000_000_000;
        if let Some(host) = od.hosts.load().get(&addr) {
            host.touch(now_secs);
            return Some(host.clone());
        }
        let _guard = lock(&od.insert);
        let current = od.hosts.load_full();
        if let Some(host) = current.get(&addr) {
            host.touch(now_secs);
            return Some(host.clone());
        }
        let mut hosts = HashMap::with_capacity(current.len() + 1);
        for (a, host) in current.iter() {
            let fresh = now_secs.saturating_sub(host.last_used()) < ORIGINAL_DST_CLEANUP_SECS;
            if fresh || host.active_requests() > 0 {
                hosts.insert(*a, host.clone());
            } else {
                host.mark_removed();
            }
        }
        let spec = HostSpec {
            address: HostAddress::Socket(addr),
            hostname: None,
            weight: 1,
            health: EndpointHealth::Healthy,
            priority: 0,
        };
        let host = Host::new(self.core.clone(), spec);
        host.touch(now_secs);
        hosts.insert(addr, host.clone());
        self.core.outlier.total_hosts.store(hosts.len() as u64, Ordering::Relaxed);
        self.core.stats.membership_total.store(hosts.len() as u64, Ordering::Relaxed);
        od.hosts.store(Arc::new(hosts));
        Some(host)
    }
}

impl Drop for ClusterRuntime {
    fn drop(&mut self) {
        self.retire();
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Cluster configurations for unit tests.

    use std::time::Duration;

    use sluice_config::model::{
        CircuitBreakers, DnsLookupFamily, Http2Options, LbPolicy, OutlierDetection, UpstreamProtocol,
    };

    use super::*;
    use crate::upstream::manager::NoHooks;

    pub(crate) fn endpoint(port: u16, weight: u32) -> Endpoint {
        Endpoint {
            address: EndpointAddress::Socket(SocketAddr::from(([127, 0, 0, 1], port))),
            weight,
            health: EndpointHealth::Healthy,
            priority: 0,
            hostname: None,
        }
    }

    pub(crate) fn outlier() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 5,
            consecutive_local_origin_failure: 5,
            enforcing_consecutive_5xx: 100,
            enforcing_consecutive_gateway_failure: 0,
            enforcing_consecutive_local_origin_failure: 100,
            split_external_local_origin_errors: false,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            success_rate_minimum_hosts: 5,
        }
    }

    pub(crate) fn cluster(lb_policy: LbPolicy, endpoints: Vec<Endpoint>) -> Cluster {
        Cluster {
            name: "test".into(),
            source: "ns/cec".into(),
            discovery: Discovery::Static,
            connect_timeout: Duration::from_secs(1),
            lb_policy,
            endpoints,
            circuit_breakers: CircuitBreakers {
                max_connections: 1024,
                max_pending_requests: 1024,
                max_requests: 1024,
                max_retries: 3,
                retry_budget: None,
                explicit: false,
            },
            outlier_detection: None,
            protocol: UpstreamProtocol::Http1,
            http2: Http2Options::default(),
            idle_timeout: None,
            max_requests_per_connection: None,
            max_connection_duration: None,
            tls: None,
            dns_lookup_family: DnsLookupFamily::V4Only,
            dns_refresh_rate: Duration::from_secs(5),
            per_connection_buffer_limit_bytes: 1 << 20,
            healthy_panic_threshold: 50.0,
            close_connections_on_host_set_change: false,
        }
    }

    pub(crate) fn runtime(c: Cluster) -> Arc<ClusterRuntime> {
        ClusterRuntime::new(Arc::new(c), Arc::new(NoHooks))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sluice_config::model::LbPolicy;

    use super::testing::*;
    use super::*;
    use crate::upstream::host::Outcome;

    fn port_of(h: &Host) -> u16 {
        h.socket_addr().map_or(0, |a| a.port())
    }

    fn pick_ports(rt: &ClusterRuntime, n: usize, now: Instant) -> Vec<u16> {
        (0..n).map(|_| rt.choose_at(&LbContext::default(), now).map_or(0, |h| port_of(&h))).collect()
    }

    fn count(ports: &[u16], port: u16) -> usize {
        ports.iter().filter(|&&p| p == port).count()
    }

    #[test]
    fn round_robin_weights_are_exact_over_a_cycle() {
        let rt = runtime(cluster(LbPolicy::RoundRobin, vec![endpoint(1, 1), endpoint(2, 2), endpoint(3, 5)]));
        let now = Instant::now();
        // Any window of one full cycle (8 picks), whatever the random start.
        for _ in 0..3 {
            let ports = pick_ports(&rt, 8, now);
            assert_eq!((count(&ports, 1), count(&ports, 2), count(&ports, 3)), (1, 2, 5), "{ports:?}");
        }
    }

    #[test]
    fn least_request_prefers_the_idle_host() {
        let rt = runtime(cluster(LbPolicy::LeastRequest { choice_count: 2 }, vec![endpoint(1, 1), endpoint(2, 1)]));
        let hosts = rt.hosts();
        let busy = hosts.iter().find(|h| port_of(h) == 1).unwrap().clone();
        let _in_flight: Vec<_> = (0..5).map(|_| busy.start_request()).collect();
        let ports = pick_ports(&rt, 400, Instant::now());
        // Host 1 wins only when both random choices land on it (~1/4 of the time).
        let to_busy = count(&ports, 1);
        assert!(to_busy < 160, "busy host got {to_busy} of 400");
        assert!(count(&ports, 2) > 240);
        // With choice_count 5 the busy host is almost never chosen: the chance is 1/32.
        let rt5 = runtime(cluster(LbPolicy::LeastRequest { choice_count: 5 }, vec![endpoint(1, 1), endpoint(2, 1)]));
        let busy5 = rt5.hosts().iter().find(|h| port_of(h) == 1).unwrap().clone();
        let _g: Vec<_> = (0..3).map(|_| busy5.start_request()).collect();
        assert!(count(&pick_ports(&rt5, 400, Instant::now()), 1) < 40);
    }

    #[test]
    fn random_respects_weights() {
        let rt = runtime(cluster(LbPolicy::Random, vec![endpoint(1, 1), endpoint(2, 3)]));
        let ports = pick_ports(&rt, 20_000, Instant::now());
        let share = count(&ports, 2) as f64 / ports.len() as f64;
        // Expected 0.75; the standard deviation is 0.003.
        assert!((0.73..0.77).contains(&share), "{share}");
    }

    #[test]
    fn ring_hash_is_sticky_per_hash_and_random_without_one() {
        let policy = LbPolicy::RingHash { minimum_ring_size: 1024, maximum_ring_size: 8_388_608 };
        let rt = runtime(cluster(policy, (1..=5).map(|p| endpoint(p, 1)).collect()));
        let now = Instant::now();
        for key in 0..50u64 {
            let ctx = LbContext { hash: Some(crate::upstream::xxhash64(&key.to_le_bytes(), 0)), ..Default::default() };
            let first = rt.choose_at(&ctx, now).unwrap();
            for _ in 0..5 {
                assert!(Arc::ptr_eq(&first, &rt.choose_at(&ctx, now).unwrap()));
            }
        }
        let ports = pick_ports(&rt, 500, now);
        assert!((1..=5).all(|p| count(&ports, p) > 0), "no hash: spread over all hosts");
    }

    #[test]
    fn retries_prefer_an_untried_host() {
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::Random,
            LbPolicy::LeastRequest { choice_count: 2 },
            LbPolicy::RingHash { minimum_ring_size: 64, maximum_ring_size: 1024 },
            LbPolicy::Maglev { table_size: 65537 },
        ] {
            let rt = runtime(cluster(policy.clone(), vec![endpoint(1, 1), endpoint(2, 1)]));
            let now = Instant::now();
            for hash in [None, Some(42u64)] {
                let first = rt.choose_at(&LbContext { hash, ..Default::default() }, now).unwrap();
                for _ in 0..20 {
                    let tried = [first.clone()];
                    let ctx = LbContext { hash, tried: &tried, ..Default::default() };
                    let other = rt.choose_at(&ctx, now).unwrap();
                    assert!(!Arc::ptr_eq(&first, &other), "{policy:?} picked the tried host again");
                }
            }
        }
    }

    #[test]
    fn lower_priority_takes_over_when_the_first_is_unhealthy() {
        let mut p0 = endpoint(1, 1);
        p0.health = EndpointHealth::Unhealthy;
        let mut p1 = endpoint(2, 1);
        p1.priority = 1;
        let mut c = cluster(LbPolicy::RoundRobin, vec![p0, p1]);
        c.healthy_panic_threshold = 50.0;
        let rt = runtime(c);
        assert_eq!(count(&pick_ports(&rt, 50, Instant::now()), 2), 50);
    }

    #[test]
    fn draining_hosts_get_nothing() {
        let mut d = endpoint(1, 1);
        d.health = EndpointHealth::Draining;
        let rt = runtime(cluster(LbPolicy::RoundRobin, vec![d, endpoint(2, 1)]));
        assert_eq!(count(&pick_ports(&rt, 20, Instant::now()), 2), 20);
        assert_eq!(rt.stats().membership_total.load(Ordering::Relaxed), 2);
        assert_eq!(rt.stats().membership_healthy.load(Ordering::Relaxed), 1);
    }

    fn with_outlier(n: u16, od: sluice_config::model::OutlierDetection) -> Arc<ClusterRuntime> {
        let mut c = cluster(LbPolicy::RoundRobin, (1..=n).map(|p| endpoint(p, 1)).collect());
        c.outlier_detection = Some(od);
        runtime(c)
    }

    fn host(rt: &ClusterRuntime, port: u16) -> Arc<Host> {
        rt.hosts().iter().find(|h| port_of(h) == port).unwrap().clone()
    }

    #[test]
    fn consecutive_5xx_ejects_and_time_returns_the_host() {
        let od = sluice_config::model::OutlierDetection { consecutive_5xx: 3, max_ejection_percent: 100, ..outlier() };
        let rt = with_outlier(3, od);
        let h1 = host(&rt, 1);
        let t0 = Instant::now();
        h1.record_at(Outcome::Status(500), t0);
        h1.record_at(Outcome::Status(503), t0);
        assert!(!h1.is_ejected());
        h1.record_at(Outcome::Status(200), t0);
        // The success reset the count: two more are not enough.
        h1.record_at(Outcome::Status(500), t0);
        h1.record_at(Outcome::Status(500), t0);
        assert!(!h1.is_ejected());
        h1.record_at(Outcome::Status(500), t0);
        assert!(h1.is_ejected());
        let stats = rt.stats();
        assert_eq!(stats.ejections_enforced_total.load(Ordering::Relaxed), 1);
        assert_eq!(stats.ejections_active.load(Ordering::Relaxed), 1);
        assert_eq!(count(&pick_ports(&rt, 30, t0), 1), 0, "ejected host gets no traffic");
        // Still ejected just before base_ejection_time (30 s) ...
        assert_eq!(count(&pick_ports(&rt, 30, t0 + Duration::from_secs(29)), 1), 0);
        // ... and back afterwards.
        let ports = pick_ports(&rt, 30, t0 + Duration::from_secs(31));
        assert_eq!(count(&ports, 1), 10);
        assert!(!h1.is_ejected());
        assert_eq!(stats.ejections_active.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn ejection_time_grows_with_each_ejection_and_is_capped() {
        let od = sluice_config::model::OutlierDetection {
            consecutive_5xx: 1,
            max_ejection_percent: 100,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(25),
            interval: Duration::from_secs(3600),
            ..outlier()
        };
        let rt = with_outlier(2, od);
        let h = host(&rt, 1);
        let mut t = Instant::now();
        for expected in [10u64, 20, 25, 25] {
            h.record_at(Outcome::Status(500), t);
            assert!(h.is_ejected());
            let before = t + Duration::from_secs(expected) - Duration::from_millis(1);
            rt.choose_at(&LbContext::default(), before);
            assert!(h.is_ejected(), "still ejected just before {expected}s");
            t += Duration::from_secs(expected);
            rt.choose_at(&LbContext::default(), t);
            assert!(!h.is_ejected(), "back after {expected}s");
        }
        assert_eq!(h.ejections(), 4);
    }

    #[test]
    fn backoff_decays_while_the_host_is_in_service() {
        let od = sluice_config::model::OutlierDetection {
            consecutive_5xx: 1,
            max_ejection_percent: 100,
            base_ejection_time: Duration::from_secs(10),
            interval: Duration::from_secs(10),
            ..outlier()
        };
        let rt = with_outlier(2, od);
        let h = host(&rt, 1);
        let t0 = Instant::now();
        h.record_at(Outcome::Status(500), t0);
        rt.choose_at(&LbContext::default(), t0 + Duration::from_secs(10));
        assert!(!h.is_ejected());
        // A long healthy stretch (many intervals) decays the multiplier back to 1.
        let t1 = t0 + Duration::from_secs(500);
        h.record_at(Outcome::Status(500), t1);
        rt.choose_at(&LbContext::default(), t1 + Duration::from_secs(10));
        assert!(!h.is_ejected(), "ejected for base time again, not twice as long");
    }

    #[test]
    fn gateway_failures_respect_enforcement() {
        // enforcing_consecutive_gateway_failure defaults to 0: detected, not ejected.
        let od = sluice_config::model::OutlierDetection {
            consecutive_5xx: 100,
            consecutive_gateway_failure: 2,
            max_ejection_percent: 100,
            ..outlier()
        };
        let rt = with_outlier(2, od.clone());
        let h = host(&rt, 1);
        let t = Instant::now();
        for _ in 0..2 {
            h.record_at(Outcome::Status(502), t);
        }
        assert!(!h.is_ejected());
        assert_eq!(rt.stats().ejections_detected_consecutive_gateway_failure.load(Ordering::Relaxed), 1);
        let rt = with_outlier(
            2,
            sluice_config::model::OutlierDetection { enforcing_consecutive_gateway_failure: 100, ..od },
        );
        let h = host(&rt, 1);
        h.record_at(Outcome::Status(503), t);
        // A 500 is a 5xx but not a gateway error: it breaks the gateway streak.
        h.record_at(Outcome::Status(500), t);
        h.record_at(Outcome::Status(504), t);
        assert!(!h.is_ejected());
        h.record_at(Outcome::Status(504), t);
        assert!(h.is_ejected());
        assert_eq!(rt.stats().ejections_enforced_consecutive_gateway_failure.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn local_origin_failures_with_and_without_split() {
        let t = Instant::now();
        // Not split: connect failures count as 503s toward consecutive_5xx.
        let od = sluice_config::model::OutlierDetection {
            consecutive_5xx: 3,
            consecutive_local_origin_failure: 100,
            max_ejection_percent: 100,
            ..outlier()
        };
        let rt = with_outlier(2, od.clone());
        let h = host(&rt, 1);
        h.record_at(Outcome::ConnectFailed, t);
        h.record_at(Outcome::Reset, t);
        h.record_at(Outcome::Timeout, t);
        assert!(h.is_ejected());

        // Split: they count only toward consecutive_local_origin_failure; a successful
        // connect or any response resets that streak, and HTTP errors do not extend it.
        let od = sluice_config::model::OutlierDetection {
            split_external_local_origin_errors: true,
            consecutive_local_origin_failure: 2,
            ..od
        };
        let rt = with_outlier(2, od);
        let h = host(&rt, 1);
        h.record_at(Outcome::ConnectFailed, t);
        h.record_at(Outcome::LocalOriginSuccess, t);
        h.record_at(Outcome::ConnectFailed, t);
        h.record_at(Outcome::Status(500), t);
        h.record_at(Outcome::Status(500), t);
        h.record_at(Outcome::Timeout, t);
        assert!(!h.is_ejected(), "two 5xx are below consecutive_5xx and the responses reset the local streak");
        h.record_at(Outcome::LocalOriginFailure, t);
        assert!(h.is_ejected());
        assert_eq!(rt.stats().ejections_enforced_consecutive_local_origin_failure.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn max_ejection_percent_but_always_one() {
        let od = sluice_config::model::OutlierDetection { consecutive_5xx: 1, max_ejection_percent: 10, ..outlier() };
        let rt = with_outlier(4, od);
        let t = Instant::now();
        let (h1, h2) = (host(&rt, 1), host(&rt, 2));
        h1.record_at(Outcome::Status(500), t);
        assert!(h1.is_ejected(), "10% of 4 hosts is 0.4, but one host can always be ejected");
        h2.record_at(Outcome::Status(500), t);
        assert!(!h2.is_ejected());
        assert_eq!(rt.stats().ejections_overflow.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn panic_threshold() {
        let od = sluice_config::model::OutlierDetection { consecutive_5xx: 1, max_ejection_percent: 100, ..outlier() };
        let t = Instant::now();
        // 1 of 3 ejected: 66% healthy >= 50%: the ejected host gets nothing.
        let rt = with_outlier(3, od.clone());
        host(&rt, 1).record_at(Outcome::Status(500), t);
        assert_eq!(count(&pick_ports(&rt, 30, t), 1), 0);
        // 2 of 3 ejected: 33% < 50%: panic, all three share the traffic.
        host(&rt, 2).record_at(Outcome::Status(500), t);
        let ports = pick_ports(&rt, 30, t);
        assert!((1..=3).all(|p| count(&ports, p) == 10), "{ports:?}");
        assert!(rt.stats().lb_healthy_panic.load(Ordering::Relaxed) >= 30);
        // A single host that is ejected still gets the traffic (panic) ...
        let rt = with_outlier(1, od.clone());
        host(&rt, 1).record_at(Outcome::Status(500), t);
        assert_eq!(count(&pick_ports(&rt, 5, t), 1), 5);
        // ... unless panic mode is disabled.
        let mut c = cluster(LbPolicy::RoundRobin, vec![endpoint(1, 1)]);
        c.outlier_detection = Some(od);
        c.healthy_panic_threshold = 0.0;
        let rt = runtime(c);
        host(&rt, 1).record_at(Outcome::Status(500), t);
        assert!(rt.choose_at(&LbContext::default(), t).is_none());
    }

    #[test]
    fn endpoint_update_keeps_host_state() {
        let od = sluice_config::model::OutlierDetection { consecutive_5xx: 1, max_ejection_percent: 100, ..outlier() };
        let rt = with_outlier(2, od);
        let t = Instant::now();
        let h1 = host(&rt, 1);
        h1.record_at(Outcome::Status(500), t);
        let _active = host(&rt, 2).start_request();
        rt.set_endpoints(&[endpoint(1, 3), endpoint(2, 1), endpoint(3, 1)]);
        let again = host(&rt, 1);
        assert!(Arc::ptr_eq(&h1, &again), "same address, same host");
        assert!(again.is_ejected());
        assert_eq!(again.weight(), 3);
        assert_eq!(host(&rt, 2).active_requests(), 1);
        // Removing the ejected host clears its ejection from the cluster's count.
        rt.set_endpoints(&[endpoint(2, 1), endpoint(3, 1)]);
        assert!(h1.is_removed());
        assert_eq!(rt.stats().ejections_active.load(Ordering::Relaxed), 0);
        assert_eq!(count(&pick_ports(&rt, 10, t), 1), 0);
    }

    #[test]
    fn original_dst_hosts_come_from_context_or_header() {
        let mut c = cluster(LbPolicy::ClusterProvided, vec![]);
        c.discovery = Discovery::OriginalDst { http_header_name: Some("x-envoy-original-dst-host".into()) };
        let rt = runtime(c);
        let t = Instant::now();
        assert!(rt.choose_at(&LbContext::default(), t).is_none());
        let dst: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let a = rt.choose_at(&LbContext { original_dst: Some(dst), ..Default::default() }, t).unwrap();
        assert_eq!(a.socket_addr(), Some(dst));
        let b = rt.choose_at(&LbContext { original_dst: Some(dst), ..Default::default() }, t).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "hosts are cached");
        let mut headers = HeaderMap::new();
        headers.insert("x-envoy-original-dst-host", "127.0.0.2:5000".parse().unwrap());
        let ctx = LbContext { original_dst: Some(dst), headers: &headers, ..Default::default() };
        assert_eq!(rt.choose_at(&ctx, t).unwrap().socket_addr(), Some("127.0.0.2:5000".parse().unwrap()));
        // Unused hosts are forgotten once a new one is added after the cleanup interval.
        let later = t + Duration::from_secs(ORIGINAL_DST_CLEANUP_SECS + 1);
        let other: SocketAddr = "127.0.0.3:6000".parse().unwrap();
        rt.choose_at(&LbContext { original_dst: Some(other), ..Default::default() }, later).unwrap();
        assert_eq!(rt.hosts().len(), 1);
        assert!(a.is_removed());
    }
}
