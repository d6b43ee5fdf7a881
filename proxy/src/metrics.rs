//! Statistics in Prometheus text format with Envoy's names and labels, and the per-request
//! observation hub (stats, access logs, traces) the request path reports to.
//!
//! # Names
//!
//! Envoy's Prometheus output is what dashboards and alerts query: counters keep their Envoy
//! name with no `_total` appended (`envoy_cluster_upstream_rq_retry`; a name that already
//! ends in `_total`, like `envoy_http_downstream_rq_total`, is Envoy's own), status classes
//! are a label (`envoy_cluster_upstream_rq_xx{envoy_response_code_class="5"}`), histograms
//! are in milliseconds. The `prometheus` crate (TiKV's, maintained) prints a family exactly
//! as it is registered; `prometheus-client` follows OpenMetrics and appends `_total` to every
//! counter, which would rename Envoy's stats, so it is not used.
//!
//! # Cost on the request path
//!
//! No label is hashed per request. Handles (a counter or histogram child is an `Arc` around
//! atomics) are resolved when a snapshot arrives: per connection manager ([`HcmObs`], found
//! by pointer and cached per connection), per route (created on first use, found by the
//! route's address) and per cluster ([`ClusterMetrics`], found by the address of the
//! cluster's stats). Cluster counters that the upstream module already keeps as atomics
//! ([`ClusterStats`](crate::upstream::ClusterStats)) are not counted twice: they are read
//! when Prometheus scrapes.
//!
//! # Families exported
//!
//! Envoy-named: `envoy_http_downstream_{rq_total,rq_xx,rq_time,rq_active,cx_active,cx_total}`
//! (label `envoy_http_conn_manager_prefix`); every `cluster.<name>.*` statistic of
//! [`ClusterStats::visit`](crate::upstream::ClusterStats::visit) as `envoy_cluster_*` (label
//! `envoy_cluster_name`; dots become underscores) plus `envoy_cluster_upstream_rq_time`;
//! `envoy.filters.http.grpc_stats` as `envoy_cluster_grpc_{total,success,failure,
//! request_message_count,response_message_count,upstream_rq_time}` (labels
//! `envoy_cluster_name`, `envoy_grpc_bridge_service`, `envoy_grpc_bridge_method`, as Envoy's
//! tag extractors name them; empty service and method unless `stats_for_all_methods`).
//! Sluice's own: `sluice_route_rq_total`/`sluice_route_rq_time` (labels
//! `envoy_http_conn_manager_prefix`, `virtual_host`, `route`), `sluice_fastpath_*` (always
//! exported; zero with `sluice_fastpath_enabled 0` when the fast path is off),
//! `sluice_tracing_spans_{exported,dropped}`, `sluice_access_log_{dropped,write_errors}`,
//! `sluice_config_{reloads,rejected_sources,diagnostics,generation}`,
//! `sluice_tls_handshake_failures`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use sluice_config::Snapshot;
use sluice_config::model::{HttpConnectionManager, HttpFilter, NetworkFilter, Route};

use crate::access_log::{AccessLogger, Captures, Writers};
use crate::control::ReloadOutcome;
use crate::fastpath::FastPathHooks;
use crate::runtime::Shared;
use crate::telemetry::{HcmTracer, SpanCounters, Telemetry, TracingConfig};
use crate::upstream::{ClusterManager, ClusterRuntime, StatKind};

/// Envoy's default histogram buckets, in milliseconds.
const BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// Distinct gRPC methods counted per cluster; the rest share `envoy_grpc_bridge_method="other"`
/// (method names come from clients, so they must not grow the label set without bound).
const MAX_GRPC_METHODS: usize = 500;

/// Identity hashing for pointer keys: the address already is a good hash.
#[derive(Default)]
pub struct PtrHasher(u64);

impl Hasher for PtrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_right(17);
    }
}

type PtrMap<V> = HashMap<usize, V, BuildHasherDefault<PtrHasher>>;

fn ptr<T>(a: &Arc<T>) -> usize {
    Arc::as_ptr(a) as usize
}

fn class_index(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

const CLASSES: [&str; 5] = ["1", "2", "3", "4", "5"];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What `Stats::new` needs.
pub struct StatsOptions {
    pub fast_path: Option<Arc<FastPathHooks>>,
    pub tracing: TracingConfig,
    pub clusters: Arc<ClusterManager>,
}

struct Families {
    ds_rq_total: IntCounterVec,
    ds_rq_xx: IntCounterVec,
    ds_rq_time: HistogramVec,
    ds_rq_active: IntGaugeVec,
    ds_cx_active: IntGaugeVec,
    ds_cx_total: IntCounterVec,
    us_rq_time: HistogramVec,
    route_rq: IntCounterVec,
    route_time: HistogramVec,
    grpc_total: IntCounterVec,
    grpc_success: IntCounterVec,
    grpc_failure: IntCounterVec,
    grpc_req_msgs: IntCounterVec,
    grpc_resp_msgs: IntCounterVec,
    grpc_time: HistogramVec,
    reloads: IntCounterVec,
    rejected: IntGauge,
    diagnostics: IntGaugeVec,
    generation: IntGauge,
    tls_failures: IntCounter,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> Result<C, prometheus::Error> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Families {
    fn new(r: &Registry) -> Result<Families, prometheus::Error> {
        let prefix = &["envoy_http_conn_manager_prefix"];
        let counter =
            |name: &str, help: &str, labels: &[&str]| register(r, IntCounterVec::new(Opts::new(name, help), labels)?);
        let gauge =
            |name: &str, help: &str, labels: &[&str]| register(r, IntGaugeVec::new(Opts::new(name, help), labels)?);
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            register(r, HistogramVec::new(HistogramOpts::new(name, help).buckets(BUCKETS_MS.to_vec()), labels)?)
        };
        let grpc = &["envoy_cluster_name", "envoy_grpc_bridge_service", "envoy_grpc_bridge_method"];
        Ok(Families {
            ds_rq_total: counter("envoy_http_downstream_rq_total", "Downstream requests.", prefix)?,
            ds_rq_xx: counter(
                "envoy_http_downstream_rq_xx",
                "Downstream responses by status class.",
                &["envoy_response_code_class", "envoy_http_conn_manager_prefix"],
            )?,
            ds_rq_time: histogram(
                "envoy_http_downstream_rq_time",
                "Downstream request duration (ms), until the response body was sent.",
                prefix,
            )?,
            ds_rq_active: gauge("envoy_http_downstream_rq_active", "Requests in progress.", prefix)?,
            ds_cx_active: gauge("envoy_http_downstream_cx_active", "Open downstream HTTP connections.", prefix)?,
            ds_cx_total: counter("envoy_http_downstream_cx_total", "Downstream HTTP connections.", prefix)?,
            us_rq_time: histogram(
                "envoy_cluster_upstream_rq_time",
                "Upstream request duration (ms) per attempt, until the response ended.",
                &["envoy_cluster_name"],
            )?,
            route_rq: counter(
                "sluice_route_rq_total",
                "Requests per route, by status class.",
                &["envoy_http_conn_manager_prefix", "virtual_host", "route", "envoy_response_code_class"],
            )?,
            route_time: histogram(
                "sluice_route_rq_time",
                "Request duration (ms) per route, until the response body was sent.",
                &["envoy_http_conn_manager_prefix", "virtual_host", "route"],
            )?,
            grpc_total: counter("envoy_cluster_grpc_total", "gRPC calls (grpc_stats).", grpc)?,
            grpc_success: counter("envoy_cluster_grpc_success", "gRPC calls with status OK.", grpc)?,
            grpc_failure: counter("envoy_cluster_grpc_failure", "gRPC calls with a status other than OK.", grpc)?,
            grpc_req_msgs: counter("envoy_cluster_grpc_request_message_count", "gRPC request messages.", grpc)?,
            grpc_resp_msgs: counter("envoy_cluster_grpc_response_message_count", "gRPC response messages.", grpc)?,
            grpc_time: histogram("envoy_cluster_grpc_upstream_rq_time", "gRPC call duration (ms) upstream.", grpc)?,
            reloads: counter("sluice_config_reloads", "Configuration reloads by result.", &["result"])?,
            rejected: register(
                r,
                IntGauge::new(
                    "sluice_config_rejected_sources",
                    "CECs refused by the last reload (or served from their previous version).",
                )?,
            )?,
            diagnostics: gauge(
                "sluice_config_diagnostics",
                "Translation diagnostics of the running configuration.",
                &["severity"],
            )?,
            generation: register(
                r,
                IntGauge::new("sluice_config_generation", "Generation of the running configuration.")?,
            )?,
            tls_failures: register(
                r,
                IntCounter::new("sluice_tls_handshake_failures", "Downstream TLS handshakes that failed.")?,
            )?,
        })
    }
}

/// Downstream statistics of one `stat_prefix`.
pub struct DownstreamStats {
    rq_total: IntCounter,
    rq_xx: [IntCounter; 5],
    rq_time: Histogram,
    rq_active: IntGauge,
    cx_active: IntGauge,
    cx_total: IntCounter,
}

/// Statistics of one route, created when it first serves a request.
pub struct RouteStats {
    rq_xx: [IntCounter; 5],
    rq_time: Histogram,
}

/// A route's statistics, created on first use. Labels are not kept here: a table of 10,000
/// routes would hold 20,000 strings for the few routes that ever see traffic.
struct RouteSlot {
    vhost: Arc<str>,
    index: u32,
    stats: OnceLock<Arc<RouteStats>>,
}

/// `envoy.filters.http.grpc_stats` settings of a connection manager.
#[derive(Debug, Clone, Copy)]
pub struct GrpcStatsMode {
    pub per_method: bool,
    pub upstream_time: bool,
}

/// Everything observed about the requests of one connection manager, resolved when the
/// snapshot arrives.
pub struct HcmObs {
    hcm: Arc<HttpConnectionManager>,
    pub downstream: DownstreamStats,
    routes: PtrMap<RouteSlot>,
    pub tracer: Option<HcmTracer>,
    pub loggers: Vec<AccessLogger>,
    pub captures: Captures,
    pub grpc_stats: Option<GrpcStatsMode>,
    families: Arc<FamiliesHandle>,
}

/// The route families, for routes created on first use.
struct FamiliesHandle {
    route_rq: IntCounterVec,
    route_time: HistogramVec,
    /// Label sets created so far (prefix, virtual host, route), for pruning.
    created: Mutex<HashSet<[String; 3]>>,
}

impl HcmObs {
    pub fn hcm(&self) -> &Arc<HttpConnectionManager> {
        &self.hcm
    }

    /// The statistics of a route of this connection manager.
    pub fn route_stats(&self, route: &Route) -> Option<Arc<RouteStats>> {
        let slot = self.routes.get(&(route as *const Route as usize))?;
        Some(
            slot.stats
                .get_or_init(|| {
                    let prefix = self.hcm.stat_prefix.as_str();
                    let vhost = &*slot.vhost;
                    let label = route_label(route, slot.index as usize);
                    if let Ok(mut c) = self.families.created.lock() {
                        c.insert([prefix.to_string(), vhost.to_string(), label.clone()]);
                    }
                    let labels =
                        |class: &str| self.families.route_rq.with_label_values(&[prefix, vhost, &label, class]);
                    Arc::new(RouteStats {
                        rq_xx: CLASSES.map(labels),
                        rq_time: self.families.route_time.with_label_values(&[prefix, vhost, &label]),
                    })
                })
                .clone(),
        )
    }

    pub fn request_started(&self) {
        self.downstream.rq_active.inc();
    }

    /// Counts a finished request: the listener's and the route's counters and histograms.
    /// `status` 0 (no response was sent: the client left first) has no status class.
    pub fn request_finished(&self, status: u16, duration: Duration, route: Option<&Route>) {
        let d = &self.downstream;
        d.rq_active.dec();
        d.rq_total.inc();
        let class = (status != 0).then(|| class_index(status));
        if let Some(c) = class {
            d.rq_xx[c].inc();
        }
        let t = ms(duration);
        d.rq_time.observe(t);
        if let Some(r) = route.and_then(|r| self.route_stats(r)) {
            if let Some(c) = class {
                r.rq_xx[c].inc();
            }
            r.rq_time.observe(t);
        }
    }
}

/// Counts a downstream HTTP connection while it is open.
pub struct ConnObserver {
    stats: Arc<Stats>,
    /// The connection manager bundle of the last request (a connection's configuration
    /// changes only on reloads).
    current: arc_swap::ArcSwapOption<HcmObs>,
    cx_active: IntGauge,
}

impl ConnObserver {
    /// The observation bundle for `hcm`: one load and a pointer comparison when unchanged.
    pub fn bundle(&self, hcm: &Arc<HttpConnectionManager>) -> Arc<HcmObs> {
        if let Some(b) = self.current.load_full()
            && Arc::ptr_eq(&b.hcm, hcm)
        {
            return b;
        }
        let b = self.stats.hcm(hcm);
        self.current.store(Some(b.clone()));
        b
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }
}

impl Drop for ConnObserver {
    fn drop(&mut self) {
        self.cx_active.dec();
    }
}

/// Per-cluster metrics the upstream module does not keep itself.
pub struct ClusterMetrics {
    name: Arc<str>,
    rq_time: Histogram,
    grpc: RwLock<HashMap<Box<str>, Arc<GrpcMethodStats>>>,
    families: Arc<GrpcFamilies>,
}

struct GrpcFamilies {
    total: IntCounterVec,
    success: IntCounterVec,
    failure: IntCounterVec,
    req_msgs: IntCounterVec,
    resp_msgs: IntCounterVec,
    time: HistogramVec,
}

/// `cluster.<name>.grpc.<service>.<method>.*`.
pub struct GrpcMethodStats {
    labels: [String; 3],
    pub total: IntCounter,
    pub success: IntCounter,
    pub failure: IntCounter,
    pub request_messages: IntCounter,
    pub response_messages: IntCounter,
    pub upstream_rq_time: Histogram,
}

impl ClusterMetrics {
    /// Records one upstream attempt's duration (`upstream_rq_time`).
    pub fn observe_rq_time(&self, d: Duration) {
        self.rq_time.observe(ms(d));
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The gRPC statistics of `path` (`/package.Service/Method`); `per_method` false counts
    /// every call of the cluster together.
    pub fn grpc(&self, path: &str, per_method: bool) -> Option<Arc<GrpcMethodStats>> {
        let key: &str = if per_method { path } else { "" };
        if let Some(s) = self.grpc.read().ok()?.get(key) {
            return Some(s.clone());
        }
        let mut map = self.grpc.write().ok()?;
        let (service, method) = if per_method {
            let p = path.strip_prefix('/').unwrap_or(path);
            p.split_once('/').unwrap_or((p, ""))
        } else {
            ("", "")
        };
        let (key, service, method) =
            if map.len() >= MAX_GRPC_METHODS { ("\u{0}other", "other", "other") } else { (key, service, method) };
        if let Some(s) = map.get(key) {
            return Some(s.clone());
        }
        let labels = [self.name.as_ref(), service, method];
        let f = &self.families;
        let s = Arc::new(GrpcMethodStats {
            labels: labels.map(str::to_string),
            total: f.total.with_label_values(&labels),
            success: f.success.with_label_values(&labels),
            failure: f.failure.with_label_values(&labels),
            request_messages: f.req_msgs.with_label_values(&labels),
            response_messages: f.resp_msgs.with_label_values(&labels),
            upstream_rq_time: f.time.with_label_values(&labels),
        });
        map.insert(Box::from(key), s.clone());
        Some(s)
    }
}

/// The observation hub: metrics, the tracer pipelines and the access log writers.
pub struct Stats {
    registry: Registry,
    f: Families,
    route_families: Arc<FamiliesHandle>,
    grpc_families: Arc<GrpcFamilies>,
    hcms: ArcSwap<PtrMap<Arc<HcmObs>>>,
    clusters: ArcSwap<PtrMap<Arc<ClusterMetrics>>>,
    telemetry: Option<Arc<Telemetry>>,
    access_logs: Writers,
    fast_path: Option<Arc<FastPathHooks>>,
    fast_path_status_cache: std::sync::Mutex<Option<(std::time::Instant, sluice_bpf::Status)>>,
}

impl Stats {
    /// Creates the registry and starts tracing. Runs on the control runtime (the trace
    /// exporters live there).
    pub fn new(opts: StatsOptions) -> anyhow::Result<Stats> {
        let registry = Registry::new();
        let f = Families::new(&registry)?;
        let spans_exported = register(
            &registry,
            IntCounter::new("sluice_tracing_spans_exported", "Spans accepted by the OTLP collector.")?,
        )?;
        let spans_dropped = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "sluice_tracing_spans_dropped",
                    "Spans dropped: the export queue was full, or the collector failed or timed out.",
                ),
                &["reason"],
            )?,
        )?;
        let al_dropped = register(
            &registry,
            IntCounter::new("sluice_access_log_dropped", "Access log lines dropped because the writer fell behind.")?,
        )?;
        let al_errors = register(
            &registry,
            IntCounter::new("sluice_access_log_write_errors", "Access log writes that failed (open or write).")?,
        )?;
        let counters = SpanCounters {
            exported: spans_exported,
            dropped_queue_full: spans_dropped.with_label_values(&["queue_full"]),
            dropped_export_failed: spans_dropped.with_label_values(&["export_failed"]),
        };
        let telemetry = Telemetry::start(&opts.tracing, counters, opts.clusters).map_err(anyhow::Error::msg)?;
        for result in ["success", "failure"] {
            f.reloads.with_label_values(&[result]);
        }
        for severity in ["error", "warning"] {
            f.diagnostics.with_label_values(&[severity]);
        }
        let route_families = Arc::new(FamiliesHandle {
            route_rq: f.route_rq.clone(),
            route_time: f.route_time.clone(),
            created: Mutex::new(HashSet::new()),
        });
        let grpc_families = Arc::new(GrpcFamilies {
            total: f.grpc_total.clone(),
            success: f.grpc_success.clone(),
            failure: f.grpc_failure.clone(),
            req_msgs: f.grpc_req_msgs.clone(),
            resp_msgs: f.grpc_resp_msgs.clone(),
            time: f.grpc_time.clone(),
        });
        Ok(Stats {
            registry,
            f,
            route_families,
            grpc_families,
            hcms: ArcSwap::from_pointee(PtrMap::default()),
            clusters: ArcSwap::from_pointee(PtrMap::default()),
            telemetry,
            access_logs: Writers::new(al_dropped, al_errors),
            fast_path: opts.fast_path,
            fast_path_status_cache: std::sync::Mutex::new(None),
        })
    }

    pub fn telemetry(&self) -> Option<&Arc<Telemetry>> {
        self.telemetry.as_ref()
    }

    pub fn record_reload(&self, outcome: &ReloadOutcome) {
        match outcome {
            ReloadOutcome::Applied { generation, errors, warnings, rejected } => {
                self.f.reloads.with_label_values(&["success"]).inc();
                self.f.rejected.set(rejected.len() as i64);
                self.f.diagnostics.with_label_values(&["error"]).set(*errors as i64);
                self.f.diagnostics.with_label_values(&["warning"]).set(*warnings as i64);
                self.f.generation.set(*generation as i64);
            }
            // Nothing was published: the gauges keep describing the running configuration.
            ReloadOutcome::Refused { .. } => self.f.reloads.with_label_values(&["failure"]).inc(),
        }
    }

    pub fn tls_handshake_failed(&self) {
        self.f.tls_failures.inc();
    }

    /// Resolves the observation bundles of a new snapshot before traffic sees it: handles per
    /// connection manager, tracer pipelines (started here, on the control thread), compiled
    /// access logs. Statistics of routes and clusters that are gone are removed.
    pub fn on_snapshot(&self, s: &Snapshot, clusters: &ClusterManager) {
        let mut map = PtrMap::default();
        for l in &s.listeners {
            for c in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
                if let NetworkFilter::HttpConnectionManager(h) = &c.filter {
                    map.entry(ptr(h)).or_insert_with(|| Arc::new(self.build_hcm(h, true)));
                }
            }
        }
        self.prune(clusters, &map);
        self.hcms.store(Arc::new(map));
        self.access_logs.retain_used();
    }

    /// Removes the series of clusters and routes that are gone, so a reload does not leave
    /// dead series behind for ever.
    fn prune(&self, clusters: &ClusterManager, hcms: &PtrMap<Arc<HcmObs>>) {
        let live = clusters.clusters();
        let live_ptrs: HashSet<usize> = live.values().map(|c| ptr(c.stats())).collect();
        let old = self.clusters.load_full();
        if old.keys().any(|k| !live_ptrs.contains(k)) {
            let kept: PtrMap<Arc<ClusterMetrics>> =
                old.iter().filter(|(k, _)| live_ptrs.contains(k)).map(|(k, v)| (*k, v.clone())).collect();
            for m in old.values().filter(|m| !live.contains_key(m.name.as_ref())) {
                let _ = self.f.us_rq_time.remove_label_values(&[&m.name]);
                if let Ok(g) = m.grpc.read() {
                    for s in g.values() {
                        let l: [&str; 3] = [&s.labels[0], &s.labels[1], &s.labels[2]];
                        let f = &self.grpc_families;
                        let _ = f.total.remove_label_values(&l);
                        let _ = f.success.remove_label_values(&l);
                        let _ = f.failure.remove_label_values(&l);
                        let _ = f.req_msgs.remove_label_values(&l);
                        let _ = f.resp_msgs.remove_label_values(&l);
                        let _ = f.time.remove_label_values(&l);
                    }
                }
            }
            self.clusters.store(Arc::new(kept));
        }
        let mut live_routes: HashSet<[String; 3]> = HashSet::new();
        for b in hcms.values() {
            for vh in b.hcm.route_config.iter().flat_map(|rc| &rc.virtual_hosts) {
                for (i, r) in vh.routes.iter().enumerate() {
                    live_routes.insert([b.hcm.stat_prefix.clone(), vh.name.clone(), route_label(r, i)]);
                }
            }
        }
        if let Ok(mut created) = self.route_families.created.lock() {
            created.retain(|[p, v, r]| {
                if live_routes.contains(&[p.clone(), v.clone(), r.clone()]) {
                    return true;
                }
                for class in CLASSES {
                    let _ = self.route_families.route_rq.remove_label_values(&[p, v, r, class]);
                }
                let _ = self.route_families.route_time.remove_label_values(&[p, v, r]);
                false
            });
        }
    }

    fn build_hcm(&self, h: &Arc<HttpConnectionManager>, create_pipelines: bool) -> HcmObs {
        let prefix = h.stat_prefix.as_str();
        let downstream = DownstreamStats {
            rq_total: self.f.ds_rq_total.with_label_values(&[prefix]),
            rq_xx: CLASSES.map(|c| self.f.ds_rq_xx.with_label_values(&[c, prefix])),
            rq_time: self.f.ds_rq_time.with_label_values(&[prefix]),
            rq_active: self.f.ds_rq_active.with_label_values(&[prefix]),
            cx_active: self.f.ds_cx_active.with_label_values(&[prefix]),
            cx_total: self.f.ds_cx_total.with_label_values(&[prefix]),
        };
        let mut routes = PtrMap::default();
        if let Some(rc) = &h.route_config {
            for vh in &rc.virtual_hosts {
                let vhost: Arc<str> = Arc::from(vh.name.as_str());
                for (i, r) in vh.routes.iter().enumerate() {
                    let slot = RouteSlot { vhost: vhost.clone(), index: i as u32, stats: OnceLock::new() };
                    routes.insert(r as *const Route as usize, slot);
                }
            }
        }
        let tracer = self.telemetry.as_ref().and_then(|t| t.hcm_tracer(h, create_pipelines));
        let mut captures = Captures::default();
        let loggers = self.access_logs.loggers(&h.access_log, &mut captures);
        let grpc_stats = h.http_filters.iter().find_map(|f| match f {
            HttpFilter::GrpcStats { stats_for_all_methods, enable_upstream_stats } => {
                Some(GrpcStatsMode { per_method: *stats_for_all_methods, upstream_time: *enable_upstream_stats })
            }
            _ => None,
        });
        HcmObs {
            hcm: h.clone(),
            downstream,
            routes,
            tracer,
            loggers,
            captures,
            grpc_stats,
            families: self.route_families.clone(),
        }
    }

    /// The bundle of a connection manager: resolved at the snapshot, or built now for one
    /// that is no longer current (a connection still draining on an old configuration; no
    /// new trace pipeline is started for it).
    pub fn hcm(&self, h: &Arc<HttpConnectionManager>) -> Arc<HcmObs> {
        if let Some(b) = self.hcms.load().get(&ptr(h)) {
            return b.clone();
        }
        Arc::new(self.build_hcm(h, false))
    }

    /// Starts observing a downstream HTTP connection (`downstream_cx_*`).
    pub fn connection(self: &Arc<Self>, hcm: &Arc<HttpConnectionManager>) -> Arc<ConnObserver> {
        let b = self.hcm(hcm);
        b.downstream.cx_total.inc();
        b.downstream.cx_active.inc();
        let cx_active = b.downstream.cx_active.clone();
        Arc::new(ConnObserver { stats: self.clone(), current: arc_swap::ArcSwapOption::new(Some(b)), cx_active })
    }

    /// The metrics of a cluster, created on its first request.
    pub fn cluster(&self, c: &ClusterRuntime) -> Arc<ClusterMetrics> {
        let key = ptr(c.stats());
        if let Some(m) = self.clusters.load().get(&key) {
            return m.clone();
        }
        let m = Arc::new(ClusterMetrics {
            name: Arc::from(c.name()),
            rq_time: self.f.us_rq_time.with_label_values(&[c.name()]),
            grpc: RwLock::new(HashMap::new()),
            families: self.grpc_families.clone(),
        });
        self.clusters.rcu(|map| {
            let mut map = PtrMap::clone(map);
            map.entry(key).or_insert_with(|| m.clone());
            map
        });
        m
    }

    /// Reopens access log files (`POST /reopen_logs`).
    pub fn reopen_access_logs(&self) {
        self.access_logs.reopen();
    }

    /// Flushes spans and access log lines; at shutdown, after the workers have drained.
    pub async fn shutdown(&self) {
        if let Some(t) = &self.telemetry {
            t.shutdown(Duration::from_secs(3)).await;
        }
        self.access_logs.flush(Duration::from_secs(2));
    }

    /// Every family, sorted by name.
    fn gather(&self, shared: &Shared) -> Vec<MetricFamily> {
        let mut families = self.registry.gather();
        families.extend(cluster_families(&shared.clusters));
        families.extend(self.fast_path_families());
        families.retain(|f| !f.get_metric().is_empty());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        families
    }

    /// The Prometheus text exposition (`/metrics`, `/stats/prometheus`).
    pub fn render(&self, shared: &Shared) -> String {
        let mut out = String::with_capacity(64 * 1024);
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&self.gather(shared), &mut out) {
            tracing::error!("cannot encode metrics: {e}");
        }
        out
    }

    /// Envoy's `/stats` text: `cluster.<name>.<stat>: <value>` and
    /// `http.<prefix>.<stat>: <value>` for Envoy's statistics, `name{labels}: value` for the
    /// others; histograms as `P50/P90/P99`, count and sum. `filter` keeps lines whose name
    /// contains it.
    pub fn render_plain(&self, shared: &Shared, filter: Option<&str>) -> String {
        let mut lines: BTreeMap<String, String> = BTreeMap::new();
        for f in self.gather(shared) {
            for m in f.get_metric() {
                let labels: Vec<(&str, &str)> = m.get_label().iter().map(|l| (l.name(), l.value())).collect();
                let name = plain_name(f.name(), &labels);
                let value = match f.get_field_type() {
                    MetricType::COUNTER => format!("{}", m.get_counter().get_value()),
                    MetricType::GAUGE => format!("{}", m.get_gauge().get_value()),
                    MetricType::HISTOGRAM => {
                        let h = m.get_histogram();
                        let q = |p: f64| quantile(h, p).map(|v| format!("{v}")).unwrap_or_else(|| "nan".into());
                        format!(
                            "P50({}) P90({}) P99({}) count({}) sum({})",
                            q(0.5),
                            q(0.9),
                            q(0.99),
                            h.get_sample_count(),
                            h.get_sample_sum()
                        )
                    }
                    _ => continue,
                };
                lines.insert(name, value);
            }
        }
        let mut out = String::new();
        for (k, v) in lines {
            if filter.is_none_or(|f| k.contains(f)) {
                let _ = writeln!(out, "{k}: {v}");
            }
        }
        out
    }

    /// The fast path's state for the admin API (walks the BPF maps).
    pub fn fast_path_status(&self) -> Option<sluice_bpf::Status> {
        self.fast_path.as_ref().map(|f| f.fast_path().status())
    }

    fn fast_path_families(&self) -> Vec<MetricFamily> {
        // Counting map entries walks the maps (a syscall per entry); a scrape reuses a count up
        // to 10 s old, the counters themselves are always current.
        let status = self.fast_path.as_ref().map(|f| {
            let mut cache = self.fast_path_status_cache.lock().unwrap_or_else(|e| e.into_inner());
            match &*cache {
                Some((at, s)) if at.elapsed() < std::time::Duration::from_secs(10) => {
                    let mut s = s.clone();
                    s.stats = f.fast_path().stats();
                    s
                }
                _ => {
                    let s = f.fast_path().status();
                    *cache = Some((std::time::Instant::now(), s.clone()));
                    s
                }
            }
        });
        let stats = status.as_ref().map(|s| s.stats).unwrap_or_default();
        let paused = status.as_ref().map(|s| s.paused_connections).unwrap_or(0) as f64;
        let entries = status.as_ref().map(|s| s.sockhash_entries).unwrap_or(0) as f64;
        let c = |name: &str, help: &str, v: u64| family(name, help, MetricType::COUNTER, vec![sample(&[], v as f64)]);
        vec![
            family(
                "sluice_fastpath_enabled",
                "1 when the eBPF fast path is attached.",
                MetricType::GAUGE,
                vec![sample(&[], if status.is_some() { 1.0 } else { 0.0 })],
            ),
            c(
                "sluice_fastpath_redirected_msgs",
                "Messages spliced socket to socket by the sockmap.",
                stats.redirected_msgs,
            ),
            c(
                "sluice_fastpath_redirected_bytes",
                "Bytes spliced socket to socket by the sockmap.",
                stats.redirected_bytes,
            ),
            c("sluice_fastpath_passed_msgs", "Messages of spliced sockets that went through TCP.", stats.passed_msgs),
            c("sluice_fastpath_passed_bytes", "Bytes of spliced sockets that went through TCP.", stats.passed_bytes),
            family(
                "sluice_fastpath_tainted_sockets",
                "Sockets taken off the fast path, by reason.",
                MetricType::COUNTER,
                vec![
                    sample(&[("reason", "no_peer")], stats.tainted_no_peer as f64),
                    sample(&[("reason", "paused")], stats.tainted_paused as f64),
                    sample(&[("reason", "credit")], stats.tainted_credit as f64),
                ],
            ),
            family(
                "sluice_fastpath_connect_rewrites",
                "Connects to a Service redirected to a Sluice listener.",
                MetricType::COUNTER,
                vec![
                    sample(&[("family", "ipv4")], stats.connect4_rewrites as f64),
                    sample(&[("family", "ipv6")], stats.connect6_rewrites as f64),
                ],
            ),
            c(
                "sluice_fastpath_sockhash_insert_failures",
                "Sockets the kernel refused to splice.",
                stats.sockhash_insert_failures,
            ),
            family(
                "sluice_fastpath_paused",
                "Connections whose splicing is paused (back-pressure).",
                MetricType::GAUGE,
                vec![sample(&[], paused)],
            ),
            family(
                "sluice_fastpath_sockhash_entries",
                "Sockets currently spliced.",
                MetricType::GAUGE,
                vec![sample(&[], entries)],
            ),
        ]
    }
}

/// `route` label: the route's name, or `#<index>` in its virtual host when it has none.
fn route_label(r: &Route, index: usize) -> String {
    if r.name.is_empty() { format!("#{index}") } else { r.name.clone() }
}

/// One series of a family built at scrape time: its labels and value.
type SampleValue = (Vec<(String, String)>, f64);

fn sample(labels: &[(&str, &str)], v: f64) -> SampleValue {
    (labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), v)
}

fn family(name: &str, help: &str, ty: MetricType, samples: Vec<SampleValue>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(ty);
    let metrics = samples
        .into_iter()
        .map(|(labels, v)| {
            let pairs = labels
                .into_iter()
                .map(|(k, v)| {
                    let mut p = proto::LabelPair::default();
                    p.set_name(k);
                    p.set_value(v);
                    p
                })
                .collect();
            let mut m = proto::Metric::from_label(pairs);
            match ty {
                MetricType::GAUGE => {
                    let mut g = proto::Gauge::default();
                    g.set_value(v);
                    m.set_gauge(g);
                }
                _ => {
                    let mut c = proto::Counter::default();
                    c.set_value(v);
                    m.set_counter(c);
                }
            }
            m
        })
        .collect();
    f.set_metric(metrics);
    f
}

/// Reads every cluster's atomic counters (`ClusterStats::visit`) into Envoy's families.
fn cluster_families(clusters: &ClusterManager) -> Vec<MetricFamily> {
    let all = clusters.clusters();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut fams: BTreeMap<String, (MetricType, Vec<SampleValue>)> = BTreeMap::new();
    for name in names {
        let Some(c) = all.get(name) else { continue };
        c.stats().visit(|stat, value, kind| {
            let ty = match kind {
                StatKind::Counter => MetricType::COUNTER,
                StatKind::Gauge => MetricType::GAUGE,
            };
            let mut labels = Vec::with_capacity(2);
            let family = match stat.strip_prefix("upstream_rq_").and_then(|s| s.strip_suffix("xx")) {
                Some(class) if class.len() == 1 && class.as_bytes()[0].is_ascii_digit() => {
                    labels.push(("envoy_response_code_class".to_string(), class.to_string()));
                    "envoy_cluster_upstream_rq_xx".to_string()
                }
                _ => format!("envoy_cluster_{}", stat.replace('.', "_")),
            };
            labels.push(("envoy_cluster_name".to_string(), name.clone()));
            fams.entry(family).or_insert_with(|| (ty, Vec::new())).1.push((labels, value as f64));
        });
    }
    fams.into_iter()
        .map(|(name, (ty, samples))| family(&name, &format!("Envoy cluster statistic {name}."), ty, samples))
        .collect()
}

/// Envoy's dotted name for a sample, or `name{labels}` for Sluice's own families.
fn plain_name(family: &str, labels: &[(&str, &str)]) -> String {
    let get = |k: &str| labels.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
    let rest_labels = |skip: &[&str]| {
        let rest: Vec<String> =
            labels.iter().filter(|(k, _)| !skip.contains(k)).map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        if rest.is_empty() { String::new() } else { format!("{{{}}}", rest.join(",")) }
    };
    if let (Some(stat), Some(cluster)) = (family.strip_prefix("envoy_cluster_"), get("envoy_cluster_name")) {
        if let Some(grpc_stat) = stat.strip_prefix("grpc_") {
            let svc = get("envoy_grpc_bridge_service").unwrap_or("");
            let method = get("envoy_grpc_bridge_method").unwrap_or("");
            return if svc.is_empty() {
                format!("cluster.{cluster}.grpc.{grpc_stat}")
            } else {
                format!("cluster.{cluster}.grpc.{svc}.{method}.{grpc_stat}")
            };
        }
        let stat = match (stat, get("envoy_response_code_class")) {
            ("upstream_rq_xx", Some(c)) => format!("upstream_rq_{c}xx"),
            (s, _) => {
                s.strip_prefix("outlier_detection_").map(|o| format!("outlier_detection.{o}")).unwrap_or(s.into())
            }
        };
        return format!("cluster.{cluster}.{stat}");
    }
    if let (Some(stat), Some(prefix)) = (family.strip_prefix("envoy_http_"), get("envoy_http_conn_manager_prefix")) {
        let stat = match (stat, get("envoy_response_code_class")) {
            ("downstream_rq_xx", Some(c)) => format!("downstream_rq_{c}xx"),
            (s, _) => s.to_string(),
        };
        return format!("http.{prefix}.{stat}");
    }
    format!("{family}{}", rest_labels(&[]))
}

/// Linear interpolation inside the bucket holding quantile `q` (as Prometheus'
/// `histogram_quantile` does).
fn quantile(h: &proto::Histogram, q: f64) -> Option<f64> {
    let total = h.get_sample_count();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut prev_bound = 0.0;
    let mut prev_count = 0u64;
    for b in h.get_bucket() {
        let count = b.cumulative_count();
        if count as f64 >= rank {
            let in_bucket = (count - prev_count) as f64;
            let frac = if in_bucket > 0.0 { (rank - prev_count as f64) / in_bucket } else { 0.0 };
            return Some(prev_bound + (b.upper_bound() - prev_bound) * frac);
        }
        prev_bound = b.upper_bound();
        prev_count = count;
    }
    Some(prev_bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_follow_envoy() {
        assert_eq!(
            plain_name(
                "envoy_cluster_upstream_rq_xx",
                &[("envoy_response_code_class", "5"), ("envoy_cluster_name", "c")]
            ),
            "cluster.c.upstream_rq_5xx"
        );
        assert_eq!(
            plain_name("envoy_cluster_outlier_detection_ejections_active", &[("envoy_cluster_name", "c")]),
            "cluster.c.outlier_detection.ejections_active"
        );
        assert_eq!(
            plain_name(
                "envoy_http_downstream_rq_xx",
                &[("envoy_response_code_class", "2"), ("envoy_http_conn_manager_prefix", "l")]
            ),
            "http.l.downstream_rq_2xx"
        );
        assert_eq!(
            plain_name(
                "envoy_cluster_grpc_success",
                &[
                    ("envoy_cluster_name", "c"),
                    ("envoy_grpc_bridge_service", "pkg.S"),
                    ("envoy_grpc_bridge_method", "M")
                ]
            ),
            "cluster.c.grpc.pkg.S.M.success"
        );
        assert_eq!(
            plain_name("sluice_config_reloads", &[("result", "success")]),
            "sluice_config_reloads{result=\"success\"}"
        );
    }

    #[test]
    fn status_classes() {
        assert_eq!(class_index(200), 1);
        assert_eq!(class_index(503), 4);
        assert_eq!(class_index(99), 0);
        assert_eq!(class_index(700), 4);
    }

    #[test]
    fn quantiles_interpolate() {
        let r = Registry::new();
        let h = HistogramVec::new(HistogramOpts::new("t", "t").buckets(vec![10.0, 20.0]), &["a"]).unwrap();
        r.register(Box::new(h.clone())).unwrap();
        for v in [5.0, 15.0, 15.0, 15.0] {
            h.with_label_values(&["x"]).observe(v);
        }
        let fams = r.gather();
        let hist = fams[0].get_metric()[0].get_histogram();
        assert_eq!(quantile(hist, 0.25), Some(10.0));
        assert_eq!(quantile(hist, 1.0), Some(20.0));
    }
}
