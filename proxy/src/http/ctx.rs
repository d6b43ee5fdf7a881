//! Per-connection and per-request context carried through the request path in request
//! extensions, so each layer reads what earlier layers decided without re-parsing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use sluice_config::model::{HttpConnectionManager, Route, RouteConfig, VirtualHost, WeightedCluster};

/// Facts about the downstream connection, fixed at accept time.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Peer address (after the PROXY protocol, if any).
    pub remote: SocketAddr,
    /// Local address the connection arrived on (after the PROXY protocol, if any).
    pub local: SocketAddr,
    /// The destination before an eBPF connect redirect, when known: a Service VIP.
    pub original_dst: Option<SocketAddr>,
    pub tls: Option<TlsInfo>,
    pub listener: Arc<str>,
    pub chain: Arc<str>,
    /// Streams in flight, for the connection `idle_timeout`.
    pub activity: Arc<super::stream_timers::ConnActivity>,
}

#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    pub sni: Option<String>,
    pub alpn: Option<Vec<u8>>,
    pub peer_certificate: bool,
}

/// What routing decided for a request that goes upstream.
#[derive(Clone)]
pub struct Routed {
    pub route_config: Arc<RouteConfig>,
    pub vhost: Arc<VirtualHost>,
    /// Index of the route in `vhost.routes` (the route itself is borrowed from `vhost`).
    pub route_index: usize,
    /// The cluster chosen (after weighted selection or `cluster_header`).
    pub cluster: Arc<str>,
    /// Index into the weighted clusters, when the route splits traffic.
    pub weighted_index: Option<usize>,
}

impl Routed {
    pub fn route(&self) -> &Route {
        &self.vhost.routes[self.route_index]
    }

    pub fn weighted_cluster(&self) -> Option<&WeightedCluster> {
        let i = self.weighted_index?;
        match &self.route().action {
            sluice_config::model::RouteAction::Forward(f) => match &f.cluster {
                sluice_config::model::ClusterSpecifier::Weighted(w) => w.clusters.get(i),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Request-wide context, inserted by the connection manager layer.
#[derive(Clone)]
pub struct RequestCtx {
    pub conn: Arc<ConnInfo>,
    pub hcm: Arc<HttpConnectionManager>,
    pub start: Instant,
    pub start_time: SystemTime,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    /// The request arrived over HTTP/2 (matters for `use_downstream_protocol_config`).
    pub downstream_h2: bool,
    pub grpc: bool,
    /// x-forwarded-proto after the connection manager: "http" or "https".
    pub scheme: &'static str,
    /// Set when the request is from an internal address (`x-envoy-internal`).
    pub internal: bool,
    /// The effective client address (from XFF with trusted hops, or the peer).
    pub client: SocketAddr,
    /// This node's host name (`%HOSTNAME%`).
    pub hostname: Arc<str>,
    /// What the layers learn about this request for stats, access logs and traces; `None`
    /// when nothing observes the request.
    pub obs: Option<Arc<RequestObs>>,
    /// The stream's idle and duration timers, when configured (the router applies the
    /// route's overrides).
    pub clock: Option<Arc<super::stream_timers::StreamClock>>,
}

/// Facts about one request that later layers learn and the connection manager reports when
/// the response has been sent: the route (router), the upstream attempts (forward), the
/// request body size, and the trace its upstream attempts join.
#[derive(Default)]
pub struct RequestObs {
    route: OnceLock<(Arc<VirtualHost>, usize)>,
    upstream: Mutex<UpstreamRecord>,
    bytes_received: AtomicU64,
    request_messages: AtomicU64,
    request_end: OnceLock<Instant>,
    /// The report of an exchange whose response ended while its request body was still
    /// streaming; see [`RequestObs::report_when_request_ends`].
    report: Mutex<PendingReport>,
    /// The sampled request's trace; `None` when it is not traced.
    pub trace: Option<crate::telemetry::TraceCtx>,
}

/// Whether the request body is still streaming, and the report waiting for it to end.
#[derive(Default)]
struct PendingReport {
    body_open: bool,
    waiting: Option<Box<dyn FnOnce() + Send>>,
}

/// The upstream side of a request, as the last attempt left it.
#[derive(Clone, Default)]
pub struct UpstreamRecord {
    pub cluster: Option<Arc<str>>,
    pub host: Option<SocketAddr>,
    /// Attempts made (1 without retries).
    pub attempts: u32,
    /// When the response headers of the answering attempt arrived.
    pub response_start: Option<Instant>,
    /// The cluster's metrics (for gRPC statistics).
    pub metrics: Option<Arc<crate::metrics::ClusterMetrics>>,
}

impl RequestObs {
    pub fn new(trace: Option<crate::telemetry::TraceCtx>) -> Self {
        RequestObs { trace, ..Default::default() }
    }

    /// Records the route the router chose (once).
    pub fn set_route(&self, vhost: &Arc<VirtualHost>, route_index: usize) {
        let _ = self.route.set((vhost.clone(), route_index));
    }

    pub fn route(&self) -> Option<(&Arc<VirtualHost>, &Route)> {
        let (vh, i) = self.route.get()?;
        Some((vh, vh.routes.get(*i)?))
    }

    pub fn upstream(&self, f: impl FnOnce(&mut UpstreamRecord)) {
        if let Ok(mut u) = self.upstream.lock() {
            f(&mut u);
        }
    }

    pub fn upstream_record(&self) -> UpstreamRecord {
        self.upstream.lock().map(|u| u.clone()).unwrap_or_default()
    }

    pub fn add_bytes_received(&self, n: u64) {
        self.bytes_received.fetch_add(n, Ordering::Relaxed);
    }

    pub fn bytes_received(&self) -> u64 {
        self.bytes_received.load(Ordering::Relaxed)
    }

    /// gRPC messages in the request body (counted only for `grpc_stats`).
    pub fn add_request_messages(&self, n: u64) {
        self.request_messages.fetch_add(n, Ordering::Relaxed);
    }

    pub fn request_messages(&self) -> u64 {
        self.request_messages.load(Ordering::Relaxed)
    }

    /// The request body has been received in full.
    pub fn request_complete(&self) {
        let _ = self.request_end.set(Instant::now());
    }

    pub fn request_end(&self) -> Option<Instant> {
        self.request_end.get().copied()
    }

    /// The request body is streaming: reports wait for it (see below).
    pub fn request_body_open(&self) {
        if let Ok(mut p) = self.report.lock() {
            p.body_open = true;
        }
    }

    /// The request body ended or was dropped: a report that waited for it runs now.
    pub fn request_body_closed(&self) {
        let waiting = match self.report.lock() {
            Ok(mut p) => {
                p.body_open = false;
                p.waiting.take()
            }
            Err(_) => None,
        };
        if let Some(report) = waiting {
            report();
        }
    }

    /// Runs `report` now, or, while the request body is still streaming, when it ends.
    ///
    /// Envoy reports a stream (statistics, access log) when both directions are done. A
    /// server may answer before it has read the request, and the upstream writer may not
    /// have pulled the request body to its end when the response ends; reporting then would
    /// undercount what the request carried (bytes, gRPC messages).
    pub fn report_when_request_ends(&self, report: impl FnOnce() + Send + 'static) {
        if let Ok(mut p) = self.report.lock()
            && p.body_open
        {
            p.waiting = Some(Box::new(report));
            return;
        }
        report();
    }
}
