//! The set of cluster runtimes, updated from configuration snapshots.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use sluice_config::Snapshot;
use sluice_config::model::{Cluster, Discovery, UpstreamTls};
use tokio::runtime::Handle;

use crate::upstream::cluster::ClusterRuntime;
use crate::upstream::dns;

/// What the upstream side needs from the rest of the proxy.
pub trait UpstreamHooks: Send + Sync {
    /// The rustls client configuration for a cluster's `UpstreamTlsContext`. Called for every
    /// new TLS connection, so an implementation that caches and rotates certificates is picked
    /// up without touching the pools. If the returned configuration has no ALPN protocols,
    /// the pool sets them from the cluster's upstream protocol.
    fn tls_client_config(&self, tls: &UpstreamTls) -> Result<Arc<rustls::ClientConfig>, String>;

    /// Called with every upstream socket before it connects (the eBPF fast path marks it so
    /// that its traffic is never redirected back into the proxy).
    fn on_upstream_socket(&self, _fd: BorrowedFd<'_>) {}
}

/// Hooks for a proxy without upstream TLS: TLS clusters fail to connect with a clear error.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl UpstreamHooks for NoHooks {
    fn tls_client_config(&self, _tls: &UpstreamTls) -> Result<Arc<rustls::ClientConfig>, String> {
        Err("upstream TLS is not available in this process".to_string())
    }
}

/// All cluster runtimes, shared by every worker.
pub struct ClusterManager {
    hooks: Arc<dyn UpstreamHooks>,
    clusters: ArcSwap<HashMap<String, Arc<ClusterRuntime>>>,
    update: Mutex<()>,
    /// Where DNS resolution tasks run (the control-plane runtime, never a worker).
    runtime: Option<Handle>,
}

impl std::fmt::Debug for ClusterManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterManager").field("clusters", &self.clusters.load().len()).finish()
    }
}

impl ClusterManager {
    /// A manager whose DNS resolvers run on the tokio runtime current at this call (if any;
    /// otherwise on the one current at each [`update`](Self::update)).
    pub fn new(hooks: Arc<dyn UpstreamHooks>) -> Arc<Self> {
        Self::with_runtime(hooks, Handle::try_current().ok())
    }

    /// A manager whose DNS resolvers run on `runtime`.
    pub fn with_runtime(hooks: Arc<dyn UpstreamHooks>, runtime: Option<Handle>) -> Arc<Self> {
        Arc::new(ClusterManager {
            hooks,
            clusters: ArcSwap::from_pointee(HashMap::new()),
            update: Mutex::new(()),
            runtime,
        })
    }

    /// The runtime of cluster `name`: one lock-free map lookup.
    pub fn get(&self, name: &str) -> Option<Arc<ClusterRuntime>> {
        self.clusters.load().get(name).cloned()
    }

    /// Every cluster, for stats export and the admin interface.
    pub fn clusters(&self) -> Arc<HashMap<String, Arc<ClusterRuntime>>> {
        self.clusters.load_full()
    }

    /// Applies a snapshot:
    /// - a cluster whose configuration is unchanged keeps its runtime (hosts, outlier state,
    ///   breakers, stats, pooled connections);
    /// - when only its endpoints changed (EDS), the runtime stays and hosts present before and
    ///   after keep their outlier and active-request state;
    /// - any other change builds a new runtime; the old one is retired (its pooled connections
    ///   are closed once idle, requests in flight finish).
    /// - clusters absent from the snapshot are retired the same way.
    pub fn update(&self, snapshot: &Snapshot) {
        let _serial = self.update.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.clusters.load_full();
        let mut next = HashMap::with_capacity(snapshot.clusters.len());
        for (name, config) in &snapshot.clusters {
            let runtime = match old.get(name) {
                Some(rt) if Arc::ptr_eq(rt.config(), config) => rt.clone(),
                Some(rt) if same_except_endpoints(rt.config(), config) => {
                    if *rt.endpoints() != config.endpoints {
                        rt.set_endpoints(&config.endpoints);
                        if matches!(config.discovery, Discovery::StrictDns | Discovery::LogicalDns) {
                            self.start_resolver(rt);
                        }
                    }
                    rt.clone()
                }
                _ => {
                    let rt = ClusterRuntime::new(config.clone(), self.hooks.clone());
                    if matches!(config.discovery, Discovery::StrictDns | Discovery::LogicalDns) {
                        self.start_resolver(&rt);
                    }
                    rt
                }
            };
            next.insert(name.clone(), runtime);
        }
        self.clusters.store(Arc::new(next));
        let current = self.clusters.load();
        for (name, rt) in old.iter() {
            if !current.get(name).is_some_and(|now| Arc::ptr_eq(now, rt)) {
                rt.retire();
            }
        }
    }

    fn start_resolver(&self, rt: &Arc<ClusterRuntime>) {
        let handle = Handle::try_current().ok().or_else(|| self.runtime.clone());
        match handle {
            Some(handle) => rt.set_resolver(Some(dns::spawn(rt, &handle))),
            None => tracing::error!(
                cluster = %rt.name(),
                "DNS cluster configured outside a tokio runtime: its names will not be resolved"
            ),
        }
    }
}

/// True when `a` and `b` differ at most in their endpoints (and where they came from). The
/// exhaustive destructuring makes this fail to compile when the model gains a field, so that
/// a new setting is never silently ignored on update.
fn same_except_endpoints(a: &Cluster, b: &Cluster) -> bool {
    let Cluster {
        name,
        source: _,
        discovery,
        connect_timeout,
        lb_policy,
        endpoints: _,
        circuit_breakers,
        outlier_detection,
        protocol,
        http2,
        idle_timeout,
        max_requests_per_connection,
        max_connection_duration,
        tls,
        dns_lookup_family,
        dns_refresh_rate,
        per_connection_buffer_limit_bytes,
        healthy_panic_threshold,
        close_connections_on_host_set_change,
    } = a;
    *name == b.name
        && *discovery == b.discovery
        && *connect_timeout == b.connect_timeout
        && *lb_policy == b.lb_policy
        && *circuit_breakers == b.circuit_breakers
        && *outlier_detection == b.outlier_detection
        && *protocol == b.protocol
        && http2.max_concurrent_streams == b.http2.max_concurrent_streams
        && http2.initial_stream_window_size == b.http2.initial_stream_window_size
        && http2.initial_connection_window_size == b.http2.initial_connection_window_size
        && http2.allow_connect == b.http2.allow_connect
        && *idle_timeout == b.idle_timeout
        && *max_requests_per_connection == b.max_requests_per_connection
        && *max_connection_duration == b.max_connection_duration
        && *tls == b.tls
        && *dns_lookup_family == b.dns_lookup_family
        && *dns_refresh_rate == b.dns_refresh_rate
        && *per_connection_buffer_limit_bytes == b.per_connection_buffer_limit_bytes
        && *healthy_panic_threshold == b.healthy_panic_threshold
        && *close_connections_on_host_set_change == b.close_connections_on_host_set_change
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use sluice_config::model::LbPolicy;

    use super::*;
    use crate::upstream::cluster::LbContext;
    use crate::upstream::cluster::testing::{cluster, endpoint, outlier};
    use crate::upstream::host::Outcome;

    fn snapshot(clusters: Vec<Cluster>) -> Snapshot {
        Snapshot {
            clusters: clusters.into_iter().map(|c| (c.name.clone(), Arc::new(c))).collect(),
            ..Default::default()
        }
    }

    fn named(name: &str, endpoints: Vec<sluice_config::model::Endpoint>) -> Cluster {
        let mut c = cluster(LbPolicy::RoundRobin, endpoints);
        c.name = name.into();
        c.outlier_detection =
            Some(sluice_config::model::OutlierDetection { consecutive_5xx: 1, max_ejection_percent: 100, ..outlier() });
        c
    }

    #[test]
    fn update_keeps_replaces_and_removes() {
        let m = ClusterManager::with_runtime(Arc::new(NoHooks), None);
        m.update(&snapshot(vec![named("a", vec![endpoint(1, 1), endpoint(2, 1)]), named("b", vec![endpoint(3, 1)])]));
        let a = m.get("a").unwrap();
        let b = m.get("b").unwrap();
        let h1 = a.hosts()[0].clone();
        h1.record_at(Outcome::Status(500), Instant::now());
        assert!(h1.is_ejected());

        // Same config, only endpoints changed (EDS): same runtime, same host, still ejected.
        let mut b2 = named("b", vec![endpoint(3, 1)]);
        b2.connect_timeout = std::time::Duration::from_secs(9);
        m.update(&snapshot(vec![named("a", vec![endpoint(1, 1), endpoint(2, 1), endpoint(4, 1)]), b2]));
        let a2 = m.get("a").unwrap();
        assert!(Arc::ptr_eq(&a, &a2));
        assert_eq!(a2.hosts().len(), 3);
        assert!(a2.hosts().iter().any(|h| Arc::ptr_eq(h, &h1) && h.is_ejected()));
        // A real config change: a new runtime, the old one retired.
        let b_new = m.get("b").unwrap();
        assert!(!Arc::ptr_eq(&b, &b_new));
        assert!(b.hosts()[0].is_removed());
        assert!(!b_new.hosts()[0].is_removed());

        // Removal.
        m.update(&snapshot(vec![named("a", vec![endpoint(1, 1)])]));
        assert!(m.get("b").is_none());
        assert!(b_new.hosts()[0].is_removed());
        let ctx = LbContext::default();
        assert!(Arc::ptr_eq(&m.get("a").unwrap().choose(&ctx).unwrap(), &h1), "panic mode: the only host");
    }

    #[test]
    fn same_config_arc_is_kept() {
        let m = ClusterManager::with_runtime(Arc::new(NoHooks), None);
        let snap = snapshot(vec![named("a", vec![endpoint(1, 1)])]);
        m.update(&snap);
        let a = m.get("a").unwrap();
        m.update(&snap);
        assert!(Arc::ptr_eq(&a, &m.get("a").unwrap()));
    }
}
