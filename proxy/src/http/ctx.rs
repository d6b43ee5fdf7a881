//! Per-connection and per-request context carried through the request path in request
//! extensions, so each layer reads what earlier layers decided without re-parsing.

use std::net::SocketAddr;
use std::sync::Arc;
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
}
