//! One upstream endpoint of a cluster, shared by all workers.
//!
//! A `Host` keeps its identity (and so its outlier state, active-request count and pooled
//! connections) for as long as its address stays in the cluster: an EDS or DNS update that
//! keeps the address reuses the same `Arc<Host>` and only updates weight, health and priority.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use sluice_config::model::EndpointHealth;

use crate::upstream::cluster::ClusterCore;
use crate::upstream::outlier::HostMonitor;

/// What the outlier detector is told about one exchange with a host.
///
/// Envoy's model: HTTP statuses are "external origin" results; connect failures, timeouts and
/// resets are "local origin" results. Unless `split_external_local_origin_errors` is set,
/// local-origin failures are counted as the HTTP code Envoy would have replied with (503 for a
/// connect failure or reset, 504 for a timeout).
///
/// The caller reports: [`Pools::send`](crate::upstream::Pools::send) records nothing, so that
/// every exchange is counted exactly once, by the router (statuses, errors, timeouts) or the
/// TCP proxy (connect results).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The host answered with this status. A response also proves the connection worked, so
    /// with split errors it resets the local-origin streak as Envoy's connect success does.
    Status(u16),
    /// A connection to the host was established.
    LocalOriginSuccess,
    /// A local-origin failure of unspecified kind (counted like a connect failure).
    LocalOriginFailure,
    /// The connection could not be established (refused, unreachable, TLS failure).
    ConnectFailed,
    /// The connection or stream was reset or closed before the exchange completed.
    Reset,
    /// The connect, the per-try timeout or the route timeout expired.
    Timeout,
}

impl Outcome {
    pub fn from_status(status: u16) -> Outcome {
        Outcome::Status(status)
    }
}

/// Where a host is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostAddress {
    Socket(SocketAddr),
    /// A name resolved when connecting (LOGICAL_DNS, or a name in a STATIC/EDS endpoint).
    Dns {
        name: String,
        port: u16,
    },
    /// `envoy_internal_address`: not supported for upstream connections yet.
    Internal(String),
}

impl fmt::Display for HostAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostAddress::Socket(a) => write!(f, "{a}"),
            HostAddress::Dns { name, port } => write!(f, "{name}:{port}"),
            HostAddress::Internal(l) => write!(f, "internal:{l}"),
        }
    }
}

/// The mutable attributes an endpoint update may change on a host.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HostSpec {
    pub address: HostAddress,
    pub hostname: Option<String>,
    pub weight: u32,
    pub health: EndpointHealth,
    pub priority: u32,
}

pub struct Host {
    pub(crate) core: Arc<ClusterCore>,
    address: HostAddress,
    hostname: Option<String>,
    /// The key placed on the hash ring / Maglev table: the address as text, as Envoy does.
    hash_key: String,
    weight: AtomicU32,
    health: AtomicU8,
    priority: AtomicU32,
    active_requests: AtomicU64,
    /// Latest resolution of a [`HostAddress::Dns`] address.
    resolved: ArcSwapOption<SocketAddr>,
    removed: AtomicBool,
    /// Seconds since the cluster's clock epoch when the host was last picked (ORIGINAL_DST
    /// hosts are forgotten when unused).
    last_used: AtomicU64,
    pub(crate) monitor: HostMonitor,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("cluster", &self.core.config.name)
            .field("address", &self.address)
            .field("weight", &self.weight())
            .field("health", &self.health())
            .field("priority", &self.priority())
            .field("active_requests", &self.active_requests())
            .field("ejected", &self.is_ejected())
            .finish()
    }
}

fn health_to_u8(h: EndpointHealth) -> u8 {
    match h {
        EndpointHealth::Unknown => 0,
        EndpointHealth::Healthy => 1,
        EndpointHealth::Unhealthy => 2,
        EndpointHealth::Draining => 3,
        EndpointHealth::Timeout => 4,
        EndpointHealth::Degraded => 5,
    }
}

fn health_from_u8(v: u8) -> EndpointHealth {
    match v {
        1 => EndpointHealth::Healthy,
        2 => EndpointHealth::Unhealthy,
        3 => EndpointHealth::Draining,
        4 => EndpointHealth::Timeout,
        5 => EndpointHealth::Degraded,
        _ => EndpointHealth::Unknown,
    }
}

impl Host {
    pub(crate) fn new(core: Arc<ClusterCore>, spec: HostSpec) -> Arc<Host> {
        let hash_key = spec.address.to_string();
        let resolved = match spec.address {
            HostAddress::Socket(a) => ArcSwapOption::from_pointee(a),
            _ => ArcSwapOption::empty(),
        };
        Arc::new(Host {
            core,
            hash_key,
            hostname: spec.hostname,
            weight: AtomicU32::new(spec.weight.max(1)),
            health: AtomicU8::new(health_to_u8(spec.health)),
            priority: AtomicU32::new(spec.priority),
            active_requests: AtomicU64::new(0),
            resolved,
            removed: AtomicBool::new(false),
            last_used: AtomicU64::new(0),
            monitor: HostMonitor::default(),
            address: spec.address,
        })
    }

    /// Applies an endpoint update to a host that stays in the cluster.
    pub(crate) fn update(&self, spec: &HostSpec) {
        self.weight.store(spec.weight.max(1), Ordering::Relaxed);
        self.health.store(health_to_u8(spec.health), Ordering::Relaxed);
        self.priority.store(spec.priority, Ordering::Relaxed);
    }

    pub fn address(&self) -> &HostAddress {
        &self.address
    }

    /// The socket address to connect to: the configured one, or the latest resolution of a DNS
    /// name (`None` until the first one).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.resolved.load().as_deref().copied()
    }

    pub(crate) fn set_resolved(&self, addr: SocketAddr) {
        if self.socket_addr() != Some(addr) {
            self.resolved.store(Some(Arc::new(addr)));
        }
    }

    /// `endpoint.hostname` (or the DNS name of a STRICT_DNS host), for `auto_host_rewrite`.
    pub fn hostname(&self) -> Option<&str> {
        self.hostname.as_deref()
    }

    pub fn cluster_name(&self) -> &str {
        &self.core.config.name
    }

    pub(crate) fn hash_key(&self) -> &str {
        &self.hash_key
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn health(&self) -> EndpointHealth {
        health_from_u8(self.health.load(Ordering::Relaxed))
    }

    pub fn priority(&self) -> u32 {
        self.priority.load(Ordering::Relaxed)
    }

    /// Requests in flight to this host from all workers (LEAST_REQUEST's input).
    pub fn active_requests(&self) -> u64 {
        self.active_requests.load(Ordering::Relaxed)
    }

    /// Counts a request as active until the returned guard is dropped.
    pub fn start_request(self: &Arc<Self>) -> ActiveRequest {
        self.active_requests.fetch_add(1, Ordering::Relaxed);
        ActiveRequest { host: self.clone() }
    }

    /// True while outlier detection has this host ejected.
    pub fn is_ejected(&self) -> bool {
        self.monitor.is_ejected()
    }

    /// How many times outlier detection ejected this host.
    pub fn ejections(&self) -> u64 {
        self.monitor.num_ejections()
    }

    /// True once the host left its cluster (or the cluster was removed): its pooled
    /// connections are closed instead of being reused.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    pub(crate) fn mark_removed(&self) {
        self.removed.store(true, Ordering::Relaxed);
    }

    pub(crate) fn touch(&self, now_secs: u64) {
        if self.last_used.load(Ordering::Relaxed) != now_secs {
            self.last_used.store(now_secs, Ordering::Relaxed);
        }
    }

    pub(crate) fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    /// Reports the outcome of an exchange to outlier detection.
    pub fn record(&self, outcome: Outcome) {
        self.record_at(outcome, Instant::now());
    }

    pub(crate) fn record_at(&self, outcome: Outcome, now: Instant) {
        if let Some(od) = &self.core.config.outlier_detection {
            self.monitor.record(od, &self.core, outcome, self.core.clock.nanos(now));
        }
    }

    /// True when the host takes part in load balancing outside panic mode.
    pub(crate) fn is_healthy(&self) -> bool {
        matches!(self.health(), EndpointHealth::Unknown | EndpointHealth::Healthy | EndpointHealth::Degraded)
            && !self.is_ejected()
    }

    /// Draining hosts get no new requests even in panic mode, as in Envoy.
    pub(crate) fn is_excluded(&self) -> bool {
        self.health() == EndpointHealth::Draining
    }
}

/// A request in flight to a host; see [`Host::start_request`].
#[derive(Debug)]
pub struct ActiveRequest {
    host: Arc<Host>,
}

impl ActiveRequest {
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.host.active_requests.fetch_sub(1, Ordering::Relaxed);
    }
}
