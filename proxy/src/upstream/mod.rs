//! Upstream clusters: endpoints, load balancing, circuit breakers, outlier detection, pools.
//!
//! # Shape
//!
//! Cluster-wide state is shared by every worker; connections are not.
//!
//! - [`ClusterManager`] (one per process, behind an `Arc`) maps cluster names to
//!   [`ClusterRuntime`]s. Lookups are lock-free (an `ArcSwap` of a map); [`ClusterManager::update`]
//!   applies a new snapshot and keeps the runtime state (hosts, outlier state, breakers, stats)
//!   of clusters whose configuration did not change.
//! - A [`ClusterRuntime`] owns the live host set, the load balancer built over it, the
//!   [`Breakers`], the [`ClusterStats`] and, for DNS clusters, the resolver task. Everything on
//!   the request path is an atomic or an `ArcSwap` load: [`ClusterRuntime::choose`] takes no lock
//!   unless a host was ejected or returned since the last pick (then one worker rebuilds the
//!   balancer while the others keep using the previous one).
//! - A [`Host`] carries the per-endpoint counters every worker updates: active requests (for
//!   LEAST_REQUEST) and the outlier detector's consecutive-failure counters.
//! - [`Pools`] is **per worker**: each worker thread creates one and passes it to every
//!   request it serves. Connections are created on, driven by and reused from that worker's
//!   runtime only, so a request never wakes another thread. `Pools` is `Send + Sync` (futures
//!   must be `Send`), guarded by a mutex that only its own worker ever takes, i.e. uncontended.
//!
//! # Who counts what
//!
//! Every attempt is counted once, by whoever sees it:
//! - the router (or TCP proxy) holds the `max_requests` slot ([`Breakers::try_request`]) and
//!   `max_retries` ([`Breakers::try_retry`]), reports the attempt's result to outlier
//!   detection ([`Host::record`]: the response status, a local-origin failure, a timeout) and
//!   counts statuses, errors, timeouts and retries in [`ClusterStats`];
//! - [`Pools::send`] enforces `max_connections` and `max_pending_requests`, counts
//!   connections (`upstream_cx_*`) and `upstream_rq_total`, and keeps the host's
//!   active-request count (LEAST_REQUEST) until the response body ends.
//!
//! # Cross-thread costs on the request path
//!
//! [`ClusterManager::get`] and [`ClusterRuntime::choose`] are `ArcSwap` loads plus, for
//! round robin, one shared `fetch_add`; breakers, host counters and stats are relaxed
//! atomics shared by the workers (cache-line traffic, never a lock or a wakeup). Nothing
//! else is shared: connections and their pools stay on their worker.

mod breakers;
mod cluster;
mod dns;
mod error;
mod hash;
mod host;
mod lb;
mod manager;
mod outlier;
mod pool;
mod stats;

pub use breakers::{BreakerGuard, Breakers, OverflowKind};
pub use cluster::{ClusterRuntime, LbContext};
pub use error::UpstreamError;
pub use hash::{hash_key, xxhash64};
pub use host::{ActiveRequest, Host, HostAddress, Outcome};
pub use manager::{ClusterManager, NoHooks, UpstreamHooks};
pub use pool::{Pools, UpstreamBody};
pub use stats::{ClusterStats, StatKind};
