//! Per-worker connection pools.
//!
//! Each worker thread owns one [`Pools`] and passes it to every request it serves. A pool per
//! (host, protocol, SNI) keeps that worker's connections to the host; connections are
//! created, driven and reused on the worker's own runtime, so no request ever waits for
//! another thread. `Pools` is `Clone + Send + Sync` because request futures must be `Send`;
//! its mutexes are only ever taken by the owning worker and are therefore uncontended.
//!
//! Per request, [`Pools::send`] costs: one `max_requests` compare-and-swap, an active-request
//! increment on the host, a map lookup under the worker's mutex, the pool's mutex to pop an
//! idle HTTP/1.1 connection (plus one non-blocking `recv(MSG_PEEK)` syscall to make sure the
//! backend did not close it) or to reserve an HTTP/2 stream, and the hyper exchange.

mod body;
mod connect;
mod host_pool;
mod io;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use rustls::pki_types::ServerName;
use sluice_config::model::UpstreamProtocol;

use crate::body::Body;
use crate::upstream::cluster::{ClusterCore, ClusterRuntime};
use crate::upstream::error::UpstreamError;
use crate::upstream::host::{Host, HostAddress};
use crate::upstream::stats::inc;

pub use body::UpstreamBody;
use body::{Lease, LeaseConn};
use host_pool::{Acquired, HostPool, Mode, TlsTarget};

/// (host identity, mode) -> pools by SNI (almost always exactly one).
type PoolMap = HashMap<(usize, Mode), Vec<Arc<HostPool>>>;

/// One worker's upstream connections. Create one per worker thread; cloning shares it.
#[derive(Clone, Default)]
pub struct Pools {
    map: Arc<Mutex<PoolMap>>,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pools = self.map.lock().map_or(0, |m| m.values().map(Vec::len).sum());
        f.debug_struct("Pools").field("pools", &pools).finish()
    }
}

/// Which protocol a request goes upstream with.
fn mode_for(protocol: UpstreamProtocol, tls: bool, downstream_h2: bool) -> Mode {
    match protocol {
        UpstreamProtocol::Http1 => Mode::H1,
        UpstreamProtocol::Http2 => Mode::H2,
        UpstreamProtocol::UseDownstream { h2 } => {
            if h2 && downstream_h2 {
                Mode::H2
            } else {
                Mode::H1
            }
        }
        UpstreamProtocol::Auto => {
            if tls {
                Mode::Auto
            } else {
                Mode::H1
            }
        }
    }
}

/// The request's authority: the URI's, else the `Host` header.
fn request_authority(req: &Request<Body>) -> Option<Authority> {
    if let Some(a) = req.uri().authority() {
        return Some(a.clone());
    }
    let host = req.headers().get(http::header::HOST)?;
    Authority::try_from(host.as_bytes()).ok()
}

/// The TLS server name: `sni` if configured, else the request host with `auto_sni`, else the
/// endpoint's hostname or address (then only used for verification; no SNI is sent unless
/// configured, as in Envoy).
fn server_name(core: &ClusterCore, host: &Host, authority: Option<&Authority>) -> Result<TlsTarget, UpstreamError> {
    let tls = core.config.tls.as_deref();
    let configured = tls.and_then(|t| t.sni.as_deref()).filter(|s| !s.is_empty());
    let auto = tls.is_some_and(|t| t.auto_sni) && configured.is_none();
    let fallback = || match host.address() {
        HostAddress::Dns { name, .. } => name.clone(),
        _ => host
            .hostname()
            .map(str::to_string)
            .unwrap_or_else(|| host.socket_addr().map(|a| a.ip().to_string()).unwrap_or_default()),
    };
    let (name, sni_key) = match (configured, auto, authority) {
        (Some(sni), _, _) => (sni.to_string(), None),
        (None, true, Some(a)) => (a.host().to_string(), Some(a.host().into())),
        _ => (fallback(), None),
    };
    let trimmed = name.trim_start_matches('[').trim_end_matches(']');
    let server_name = match trimmed.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(name.clone()).map_err(|e| UpstreamError::Tls {
            target: core.config.name.clone(),
            message: format!("invalid server name {name:?}: {e}"),
        })?,
    };
    Ok(TlsTarget { server_name, sni_key })
}

/// Adapts a request to the connection's protocol: origin-form URI and `Host` for HTTP/1.1;
/// scheme and authority in the URI (no `Host`) for HTTP/2.
fn prepare(req: Request<Body>, h2: bool, tls: bool) -> Result<Request<Body>, UpstreamError> {
    let (mut parts, body) = req.into_parts();
    if parts.method == Method::CONNECT {
        parts.version = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
        return Ok(Request::from_parts(parts, body));
    }
    if h2 {
        if parts.uri.scheme().is_none() || parts.uri.authority().is_none() {
            let authority = match parts.uri.authority() {
                Some(a) => a.clone(),
                None => parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| Authority::try_from(h.as_bytes()).ok())
                    .ok_or_else(|| UpstreamError::Protocol("request has no authority for HTTP/2".into()))?,
            };
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
            uri.authority = Some(authority);
            if uri.path_and_query.is_none() {
                uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
            }
            parts.uri = Uri::from_parts(uri).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        }
        parts.headers.remove(http::header::HOST);
        parts.version = Version::HTTP_2;
    } else {
        if let Some(authority) = parts.uri.authority() {
            if !parts.headers.contains_key(http::header::HOST)
                && let Ok(value) = HeaderValue::from_str(authority.as_str())
            {
                parts.headers.insert(http::header::HOST, value);
            }
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            parts.uri = Uri::try_from(path).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        }
        parts.version = Version::HTTP_11;
    }
    Ok(Request::from_parts(parts, body))
}

/// Maps a hyper error to the router's categories.
fn classify(error: hyper::Error) -> UpstreamError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>()
            && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return UpstreamError::RefusedStream;
        }
        source = e.source();
    }
    if error.is_parse() || error.is_parse_status() || error.is_user() {
        return UpstreamError::Protocol(error.to_string());
    }
    UpstreamError::reset(true, error)
}

/// Whether an HTTP/1.1 connection may carry another request after this response.
fn keep_alive(response: &Response<Incoming>) -> bool {
    let connection = response.headers().get_all(http::header::CONNECTION);
    let has = |token: &str| {
        connection.iter().any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
    };
    match response.version() {
        Version::HTTP_10 => has("keep-alive"),
        _ => !has("close"),
    }
}

impl Pools {
    pub fn new() -> Self {
        Pools::default()
    }

    fn pool_for(&self, core: &Arc<ClusterCore>, host: &Arc<Host>, mode: Mode, tls: Option<TlsTarget>) -> Arc<HostPool> {
        let key = (Arc::as_ptr(host) as usize, mode);
        let sni = tls.as_ref().and_then(|t| t.sni_key.as_deref());
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pool) = map
            .get(&key)
            .and_then(|pools| pools.iter().find(|p| p.tls.as_ref().and_then(|t| t.sni_key.as_deref()) == sni))
        {
            return pool.clone();
        }
        // A new pool: also forget the pools of hosts that are gone (their connections
        // were closed by the pools' sweepers). Holding a `Weak<Host>` keeps the host's
        // allocation, so a key cannot be reused by another host while its entry exists.
        map.retain(|_, pools| {
            pools.retain(|p| p.host_alive());
            !pools.is_empty()
        });
        let pool = HostPool::new(core.clone(), host, mode, tls);
        map.entry(key).or_default().push(pool.clone());
        pool
    }

    /// Sends `req` to `host` of `cluster` and returns the response once its headers arrive.
    ///
    /// - Protocol: from the cluster's `UpstreamProtocol`: HTTP/1.1, HTTP/2 (h2c with prior
    ///   knowledge, or h2 over TLS), `UseDownstream` (HTTP/2 only if `downstream_h2` and
    ///   allowed), `Auto` (ALPN over TLS, HTTP/1.1 in cleartext).
    /// - Connections: a pooled one when possible (HTTP/1.1 connections the backend closed are
    ///   detected and skipped), else a new one within `connect_timeout`, `max_connections`
    ///   and `max_pending_requests`. The caller holds the `max_requests` slot
    ///   ([`Breakers::try_request`](crate::upstream::Breakers::try_request)) for the attempt.
    /// - If a *reused* connection turns out to be closed before any byte of the request was
    ///   written, the request is sent once more on a fresh connection
    ///   (`upstream_rq_reuse_retry`). This is invisible to the caller.
    /// - Nothing is reported to outlier detection here: the caller records the response
    ///   status or the error ([`Host::record`]), exactly once per attempt.
    ///
    /// The returned body keeps the connection, and counts as an active request on the host
    /// (LEAST_REQUEST), until it ends or is dropped.
    pub async fn send(
        &self,
        cluster: &ClusterRuntime,
        host: &Arc<Host>,
        req: Request<Body>,
        downstream_h2: bool,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let core = &cluster.core;
        if let HostAddress::Internal(listener) = host.address() {
            return Err(UpstreamError::Unsupported(format!(
                "envoy_internal_address endpoints ({listener}) are not supported for upstream connections"
            )));
        }
        let active = host.start_request();
        let tls = core.config.tls.is_some();
        let mode = mode_for(core.config.protocol, tls, downstream_h2);
        let target = if tls { Some(server_name(core, host, request_authority(&req).as_ref())?) } else { None };
        let pool = self.pool_for(core, host, mode, target);
        inc(&core.stats.rq_total);

        let mut req = req;
        let mut fresh = false;
        loop {
            let acquired = pool.acquire(host, fresh).await?;
            let reused = acquired.reused();
            let (result, lease_conn) = match acquired {
                Acquired::H1 { mut conn, .. } => {
                    conn.requests += 1;
                    let sent = prepare(req, false, tls)?;
                    (conn.sender.try_send_request(sent).await, LeaseConn::H1 { conn, pool: pool.clone() })
                }
                Acquired::H2 { slot, mut sender, .. } => {
                    // On error the slot is dropped, which frees the reserved stream.
                    let sent = prepare(req, true, tls)?;
                    (sender.try_send_request(sent).await, LeaseConn::H2(slot))
                }
            };
            match result {
                Ok(response) => {
                    let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS;
                    let reusable = keep_alive(&response) && !upgraded;
                    let conn = if upgraded { LeaseConn::None } else { lease_conn };
                    let lease = Lease { conn, reusable, clean: false, _active: active };
                    let (parts, incoming) = response.into_parts();
                    return Ok(Response::from_parts(parts, UpstreamBody::new(incoming, lease)));
                }
                Err(mut error) => {
                    if let Some(unsent) = error.take_message()
                        && reused
                        && !fresh
                    {
                        tracing::debug!(cluster = %core.config.name, "pooled connection closed before the request was written; retrying on a new one");
                        inc(&core.stats.rq_reuse_retry);
                        drop(lease_conn);
                        req = unsent;
                        fresh = true;
                        continue;
                    }
                    drop(lease_conn);
                    return Err(classify(error.into_error()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use sluice_config::model::LbPolicy;

    use super::*;
    use crate::upstream::cluster::LbContext;
    use crate::upstream::cluster::testing::{cluster, endpoint, runtime};
    use crate::upstream::{ClusterManager, Host};

    fn is_send<T: Send>(_: &T) {}
    fn is_send_sync<T: Send + Sync>() {}

    /// Request futures are spawned on worker runtimes and bodies are boxed into `Body`
    /// (which needs `Send + Sync`): both must hold for the whole upstream API.
    #[test]
    fn futures_and_bodies_are_send() {
        is_send_sync::<UpstreamBody>();
        is_send_sync::<Pools>();
        is_send_sync::<ClusterRuntime>();
        is_send_sync::<ClusterManager>();
        is_send_sync::<Host>();
        let rt = runtime(cluster(LbPolicy::RoundRobin, vec![endpoint(1, 1)]));
        let host = rt.choose(&LbContext::default()).expect("host");
        let pools = Pools::new();
        let fut = pools.send(&rt, &host, Request::new(crate::body::empty()), false);
        is_send(&fut);
        drop(fut);
        crate::body::boxed(UpstreamBody::empty());
    }

    #[test]
    fn requests_are_adapted_to_the_protocol() {
        let absolute = Request::builder().uri("http://example.com:8080/a?b=1").body(crate::body::empty()).unwrap();
        let h1 = prepare(absolute, false, false).unwrap();
        assert_eq!(h1.uri(), "/a?b=1");
        assert_eq!(h1.headers()[http::header::HOST], "example.com:8080");
        assert_eq!(h1.version(), Version::HTTP_11);

        let origin = Request::builder()
            .uri("/x")
            .header(http::header::HOST, "svc.ns")
            .version(Version::HTTP_11)
            .body(crate::body::empty())
            .unwrap();
        let h2 = prepare(origin, true, true).unwrap();
        assert_eq!(h2.uri(), "https://svc.ns/x");
        assert!(!h2.headers().contains_key(http::header::HOST));
        assert_eq!(h2.version(), Version::HTTP_2);

        let no_authority = Request::builder().uri("/x").body(crate::body::empty()).unwrap();
        assert!(matches!(prepare(no_authority, true, false), Err(UpstreamError::Protocol(_))));
    }

    #[test]
    fn protocol_selection() {
        use UpstreamProtocol::*;
        assert_eq!(mode_for(Http1, true, true), Mode::H1);
        assert_eq!(mode_for(Http2, false, false), Mode::H2);
        assert_eq!(mode_for(UseDownstream { h2: true }, false, true), Mode::H2);
        assert_eq!(mode_for(UseDownstream { h2: true }, false, false), Mode::H1);
        assert_eq!(mode_for(UseDownstream { h2: false }, false, true), Mode::H1);
        assert_eq!(mode_for(Auto, true, false), Mode::Auto);
        assert_eq!(mode_for(Auto, false, true), Mode::H1);
    }
}
