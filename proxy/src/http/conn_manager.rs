//! The HTTP connection manager layer: what Envoy's HCM does to every request before routing
//! and to every response on the way out — client address detection (`x-forwarded-for`),
//! `x-forwarded-proto`, `x-request-id`, hop-by-hop header removal, path normalisation, host
//! port stripping, `server` and `via` headers — plus the request and stream timeouts.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use futures_util::FutureExt;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use sluice_config::model::{
    CidrRange, HeadersWithUnderscoresAction, HttpConnectionManager, NetworkFilter, PathWithEscapedSlashesAction,
    ServerHeaderTransformation,
};
use tower::{Layer, Service};

use super::ctx::{ConnInfo, RequestCtx};
use super::grpc_web::grpc_status;
use super::local_reply::{LocalReason, is_grpc, local_reply};
use super::stream_timers::{BeforeResponse, ClockedBody, StreamClock};
use crate::body::Body;
use crate::control::SnapshotHub;
use crate::http::header_names::{
    X_ENVOY_EXTERNAL_ADDRESS, X_ENVOY_INTERNAL, X_FORWARDED_CLIENT_CERT, X_FORWARDED_FOR, X_FORWARDED_PROTO,
    X_REQUEST_ID,
};

/// Hop-by-hop headers (RFC 9110 §7.6.1) a proxy must not forward.
/// Names, not strings: these lists are applied to every request, and a `&str` key is parsed
/// on each lookup.
pub const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
];

/// The connection manager configuration a connection uses: the one its filter chain had
/// at accept time, refreshed whenever a new snapshot changes it. Connections are never
/// drained for a configuration change: the next request simply sees the new routes.
pub struct ConnConfig {
    hub: Arc<SnapshotHub>,
    conn: Arc<ConnInfo>,
    current: ArcSwap<HttpConnectionManager>,
    generation: AtomicU64,
}

impl ConnConfig {
    pub fn new(hub: Arc<SnapshotHub>, conn: Arc<ConnInfo>, hcm: Arc<HttpConnectionManager>) -> Arc<Self> {
        let generation = AtomicU64::new(hub.generation());
        Arc::new(ConnConfig { hub, conn, current: ArcSwap::new(hcm), generation })
    }

    /// One atomic load when nothing changed.
    pub fn hcm(&self) -> Arc<HttpConnectionManager> {
        let g = self.hub.generation();
        if g != self.generation.load(Ordering::Acquire) {
            let snap = self.hub.load();
            let fresh = snap.listener(&self.conn.listener).and_then(|l| {
                l.filter_chains
                    .iter()
                    .chain(l.default_filter_chain.iter())
                    .find(|c| *c.name == *self.conn.chain)
                    .and_then(|c| match &c.filter {
                        NetworkFilter::HttpConnectionManager(h) => Some(h.clone()),
                        _ => None,
                    })
            });
            // A chain that disappeared keeps its last configuration until the listener
            // drains.
            if let Some(h) = fresh {
                self.current.store(h);
            }
            self.generation.store(g, Ordering::Release);
        }
        self.current.load_full()
    }
}

#[derive(Clone)]
pub struct ConnManagerLayer {
    config: Arc<ConnConfig>,
}

impl ConnManagerLayer {
    pub fn new(config: Arc<ConnConfig>) -> Self {
        ConnManagerLayer { config }
    }
}

impl<S> Layer<S> for ConnManagerLayer {
    type Service = ConnManager<S>;
    fn layer(&self, inner: S) -> ConnManager<S> {
        ConnManager { inner, config: self.config.clone() }
    }
}

#[derive(Clone)]
pub struct ConnManager<S> {
    inner: S,
    config: Arc<ConnConfig>,
}

impl<S> Service<Request<Body>> for ConnManager<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = std::convert::Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let observer = req.extensions_mut().remove::<ObsHandle>();
        let hcm = self.config.hcm();
        let conn = self.config.conn.clone();
        let grpc = is_grpc(req.headers());
        // The observation of this exchange: stats always, access logs and a server span when
        // configured. Reported when the response body has been sent.
        let exchange = observer.map(|o| Exchange::begin(o.0.bundle(&hcm), conn.clone()));
        let mut ctx = match prepare(&mut req, &conn, &hcm) {
            Ok(ctx) => ctx,
            Err(reason) => {
                let mut resp = local_reply(reason, grpc);
                finish_response(&mut resp, &hcm, None);
                if let Some(mut ex) = exchange {
                    ex.on_request(&mut req, None);
                    resp = ex.on_response(resp);
                }
                return Box::pin(async move { Ok(resp) });
            }
        };
        let exchange = exchange.map(|mut ex| {
            ex.on_request(&mut req, Some(&mut ctx));
            ex
        });
        let request_id =
            if hcm.always_set_request_id_in_response { req.headers().get(X_REQUEST_ID).cloned() } else { None };
        let request_timeout = hcm.request_timeout;
        let clock = ctx.clock.clone();
        if let Some(clock) = &clock
            && !http_body::Body::is_end_stream(req.body())
        {
            let inner = std::mem::replace(req.body_mut(), crate::body::empty());
            *req.body_mut() = ClockedBody::request(inner, clock.clone());
        }
        let active = conn.activity.stream();
        req.extensions_mut().insert(ctx);
        let fut = self.inner.call(req);
        // Combinators, not an `async` block: see the router layer for why.
        let response_clock = clock.clone();
        let finish = move |r: Result<Response<Body>, std::convert::Infallible>| {
            let mut resp = r?;
            finish_response(&mut resp, &hcm, request_id);
            // The stream stays active, and its timers run, until the response body is done.
            resp = resp.map(|b| ClockedBody::response(b, response_clock, active));
            if let Some(ex) = exchange {
                resp = ex.on_response(resp);
            }
            Ok(resp)
        };
        let timed = move |r: Result<Result<Response<Body>, std::convert::Infallible>, LocalReason>| match r {
            Ok(r) => r,
            Err(reason) => Ok(local_reply(reason, grpc)),
        };
        match (request_timeout, clock) {
            (Some(t), Some(clock)) => {
                Box::pin(tokio::time::timeout(t, BeforeResponse::new(fut, clock)).map(move |r| {
                    finish(match r {
                        Ok(r) => timed(r),
                        Err(_) => Ok(local_reply(LocalReason::RequestTimeout, grpc)),
                    })
                }))
            }
            (Some(t), None) => Box::pin(tokio::time::timeout(t, fut).map(move |r| match r {
                Ok(r) => finish(r),
                Err(_) => finish(Ok(local_reply(LocalReason::RequestTimeout, grpc))),
            })),
            (None, Some(clock)) => Box::pin(BeforeResponse::new(fut, clock).map(move |r| finish(timed(r)))),
            (None, None) => Box::pin(fut.map(finish)),
        }
    }
}

/// Applies the connection manager's request-side semantics. An `Err` is answered locally.
pub fn prepare(
    req: &mut Request<Body>,
    conn: &Arc<ConnInfo>,
    hcm: &Arc<HttpConnectionManager>,
) -> Result<RequestCtx, LocalReason> {
    let downstream_h2 = req.version() == http::Version::HTTP_2;
    let protocol = if downstream_h2 {
        "HTTP/2"
    } else if req.version() == http::Version::HTTP_10 {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    };
    let grpc = is_grpc(req.headers());

    // HTTP/1.1 needs a Host; HTTP/2 carries :authority in the URI. Keep both in step so the
    // rest of the path reads one place (the URI authority, mirrored in `host`).
    normalize_authority(req)?;

    // Hop-by-hop headers, including any named in `Connection`. An upgrade request keeps its
    // `Upgrade`/`Connection` pair; the upgrade layer decides whether to honour it.
    let upgrading = is_upgrade(req.headers());
    strip_hop_by_hop(req.headers_mut(), upgrading);

    headers_with_underscores(req, hcm.headers_with_underscores_action)?;

    // Client address and XFF. Repeated XFF lines count as one comma-joined value, as Envoy
    // keeps them.
    join_repeated(req.headers_mut(), &X_FORWARDED_FOR);
    let peer_ip = conn.remote.ip();
    let client_ip = client_address(req.headers(), peer_ip, hcm);
    let internal = is_internal(client_ip, &hcm.internal_address_cidrs);
    if hcm.use_remote_address && !hcm.skip_xff_append {
        append_xff(req.headers_mut(), peer_ip);
    }
    sanitize(req.headers_mut(), internal, hcm.use_remote_address && !internal, client_ip);

    // x-forwarded-proto: the edge (use_remote_address) sets it from the connection; behind a
    // trusted hop it is preserved when present.
    let conn_scheme = if conn.tls.is_some() { "https" } else { "http" };
    let scheme = match req.headers().get(X_FORWARDED_PROTO).and_then(|v| v.to_str().ok()) {
        Some(p) if !hcm.use_remote_address => {
            if p.eq_ignore_ascii_case("https") {
                "https"
            } else {
                "http"
            }
        }
        _ => {
            req.headers_mut().insert(X_FORWARDED_PROTO, HeaderValue::from_static(conn_scheme));
            conn_scheme
        }
    };

    // x-request-id.
    if hcm.generate_request_id {
        let present = req.headers().contains_key(X_REQUEST_ID);
        let external_edge = hcm.use_remote_address && !internal;
        if !present || (external_edge && !hcm.preserve_external_request_id) {
            req.headers_mut().insert(X_REQUEST_ID, new_request_id());
        }
    }

    normalize_path(req, hcm)?;
    strip_host_port(req, hcm, conn.local.port());

    if let Some(via) = &hcm.via
        && let Ok(v) = HeaderValue::from_str(via)
    {
        req.headers_mut().append(header::VIA, v);
    }

    Ok(RequestCtx {
        conn: conn.clone(),
        hcm: hcm.clone(),
        start: Instant::now(),
        start_time: SystemTime::now(),
        protocol,
        downstream_h2,
        grpc,
        scheme,
        internal,
        client: SocketAddr::new(client_ip, conn.remote.port()),
        hostname: hostname(),
        obs: None,
        clock: StreamClock::new(hcm.stream_idle_timeout, hcm.max_stream_duration),
    })
}

/// Response-side semantics: `server`, `x-request-id`, `via`, and hop-by-hop removal.
pub fn finish_response(resp: &mut Response<Body>, hcm: &HttpConnectionManager, request_id: Option<HeaderValue>) {
    let upgrading = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(resp.headers_mut(), upgrading);
    match hcm.server_header_transformation {
        ServerHeaderTransformation::Overwrite => {
            if let Ok(v) = HeaderValue::from_str(&hcm.server_name) {
                resp.headers_mut().insert(header::SERVER, v);
            }
        }
        ServerHeaderTransformation::AppendIfAbsent => {
            if !resp.headers().contains_key(header::SERVER)
                && let Ok(v) = HeaderValue::from_str(&hcm.server_name)
            {
                resp.headers_mut().insert(header::SERVER, v);
            }
        }
        ServerHeaderTransformation::PassThrough => {}
    }
    if let Some(id) = request_id {
        resp.headers_mut().insert(X_REQUEST_ID, id);
    }
    if let Some(via) = &hcm.via
        && let Ok(v) = HeaderValue::from_str(via)
    {
        resp.headers_mut().append(header::VIA, v);
    }
}

pub fn is_upgrade(h: &http::HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

pub fn strip_hop_by_hop(h: &mut http::HeaderMap, keep_upgrade: bool) {
    // Headers nominated by `Connection` are hop-by-hop too.
    let nominated: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in nominated {
        h.remove(n);
    }
    for name in HOP_BY_HOP {
        if keep_upgrade && (name == header::CONNECTION || name == header::UPGRADE) {
            continue;
        }
        if name == header::TE {
            // `te: trailers` is end-to-end for gRPC over HTTP/2; anything else is dropped.
            if let Some(v) = h.get(header::TE)
                && v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")))
            {
                h.insert(header::TE, HeaderValue::from_static("trailers"));
                continue;
            }
        }
        h.remove(name);
    }
}

fn normalize_authority(req: &mut Request<Body>) -> Result<(), LocalReason> {
    // The common case, an origin-form target with one readable Host header, is already
    // normal: leave it alone rather than copy the header onto itself.
    let single_host = {
        let mut hosts = req.headers().get_all(header::HOST).iter();
        matches!((hosts.next().map(|v| v.to_str().is_ok()), hosts.next()), (Some(true), None))
    };
    if req.uri().authority().is_none() && single_host {
        return Ok(());
    }
    let authority = match (req.uri().authority(), req.headers().get(header::HOST).and_then(|v| v.to_str().ok())) {
        (Some(a), _) => a.as_str(),
        (None, Some(h)) => h,
        (None, None) => {
            if req.version() == http::Version::HTTP_10 {
                ""
            } else {
                return Err(LocalReason::BadRequest);
            }
        }
    };
    if !authority.is_empty() {
        let v = HeaderValue::from_str(authority).map_err(|_| LocalReason::BadRequest)?;
        req.headers_mut().insert(header::HOST, v);
    }
    // The URI keeps only the path and query from here on; upstream URIs are built later.
    if req.uri().authority().is_some() || req.uri().scheme().is_some() {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = None;
        parts.authority = None;
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| LocalReason::BadRequest)?;
    }
    Ok(())
}

fn headers_with_underscores(req: &mut Request<Body>, action: HeadersWithUnderscoresAction) -> Result<(), LocalReason> {
    if action == HeadersWithUnderscoresAction::Allow {
        return Ok(());
    }
    let bad: Vec<HeaderName> = req.headers().keys().filter(|k| k.as_str().contains('_')).cloned().collect();
    if bad.is_empty() {
        return Ok(());
    }
    if action == HeadersWithUnderscoresAction::RejectRequest {
        return Err(LocalReason::BadRequest);
    }
    for k in bad {
        req.headers_mut().remove(k);
    }
    Ok(())
}

/// Envoy's control headers, removed from requests that are not internal
/// (`ConnectionManagerUtility::cleanInternalHeaders`): a client must not steer retries or
/// timeouts.
const CONTROL_HEADERS: [HeaderName; 15] = [
    HeaderName::from_static("x-envoy-retry-on"),
    HeaderName::from_static("x-envoy-retry-grpc-on"),
    HeaderName::from_static("x-envoy-max-retries"),
    HeaderName::from_static("x-envoy-retriable-status-codes"),
    HeaderName::from_static("x-envoy-retriable-header-names"),
    HeaderName::from_static("x-envoy-upstream-rq-timeout-ms"),
    HeaderName::from_static("x-envoy-upstream-rq-per-try-timeout-ms"),
    HeaderName::from_static("x-envoy-upstream-rq-timeout-alt-response"),
    HeaderName::from_static("x-envoy-expected-rq-timeout-ms"),
    HeaderName::from_static("x-envoy-upstream-alt-stat-name"),
    HeaderName::from_static("x-envoy-upstream-stream-duration-ms"),
    HeaderName::from_static("x-envoy-force-trace"),
    HeaderName::from_static("x-envoy-ip-tags"),
    HeaderName::from_static("x-envoy-original-url"),
    HeaderName::from_static("x-envoy-hedge-on-per-try-timeout"),
];

/// Removed as well on edge requests (`use_remote_address` and not internal).
const EDGE_HEADERS: [HeaderName; 5] = [
    HeaderName::from_static("x-envoy-decorator-operation"),
    HeaderName::from_static("x-envoy-downstream-service-cluster"),
    HeaderName::from_static("x-envoy-downstream-service-node"),
    HeaderName::from_static("x-envoy-original-path"),
    HeaderName::from_static("x-envoy-original-host"),
];

/// Envoy's request sanitising (`mutateRequestHeaders`): a client never decides whether it is
/// internal, never steers Envoy through control headers unless internal, and never supplies
/// `x-forwarded-client-cert` (Envoy's default `forward_client_cert_details: SANITIZE`; the
/// translator refuses the other modes).
fn sanitize(h: &mut http::HeaderMap, internal: bool, edge: bool, client: IpAddr) {
    h.remove(X_ENVOY_INTERNAL);
    h.remove(X_FORWARDED_CLIENT_CERT);
    if internal {
        h.insert(X_ENVOY_INTERNAL, HeaderValue::from_static("true"));
        return;
    }
    for name in CONTROL_HEADERS {
        h.remove(name);
    }
    if edge {
        for name in EDGE_HEADERS {
            h.remove(name);
        }
        if let Ok(v) = HeaderValue::from_str(&sluice_config::model::canonical_ip(client).to_string()) {
            h.insert(X_ENVOY_EXTERNAL_ADDRESS, v);
        }
    }
}

/// Folds repeated lines of a header into one comma-joined value.
fn join_repeated(h: &mut http::HeaderMap, name: &HeaderName) {
    let mut values = h.get_all(name).iter();
    let (Some(_), Some(_)) = (values.next(), values.next()) else { return };
    let joined: Vec<&str> = h.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
    if let Ok(v) = HeaderValue::from_str(&joined.join(",")) {
        h.insert(name.clone(), v);
    }
}

/// The client address: the peer with `use_remote_address`, otherwise the XFF entry
/// `xff_num_trusted_hops` from the right (falling back to the peer).
fn client_address(h: &http::HeaderMap, peer: IpAddr, hcm: &HttpConnectionManager) -> IpAddr {
    let xff: Vec<IpAddr> = h
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    if hcm.use_remote_address {
        if hcm.xff_num_trusted_hops == 0 || xff.is_empty() {
            return peer;
        }
        // With trusted hops at the edge, Envoy counts the peer as the first hop.
        let n = hcm.xff_num_trusted_hops as usize;
        return xff.len().checked_sub(n).map(|i| xff[i]).unwrap_or(peer);
    }
    let n = hcm.xff_num_trusted_hops as usize + 1;
    xff.len().checked_sub(n).map(|i| xff[i]).unwrap_or(peer)
}

fn append_xff(h: &mut http::HeaderMap, ip: IpAddr) {
    let ip = sluice_config::model::canonical_ip(ip);
    let new = match h.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev},{ip}"),
        _ => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&new) {
        h.remove(X_FORWARDED_FOR);
        h.insert(X_FORWARDED_FOR, v);
    }
}

/// Envoy's default: loopback, RFC 1918 and link-local are internal only when listed in
/// `internal_address_config` (Envoy >= 1.33 defaults to none).
fn is_internal(ip: IpAddr, cidrs: &[CidrRange]) -> bool {
    cidrs.iter().any(|c| c.contains(ip))
}

/// The node's host name, read once.
fn hostname() -> Arc<str> {
    static NAME: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| Arc::from(s.trim()))
            .unwrap_or_else(|_| Arc::from("localhost"))
    })
    .clone()
}

fn new_request_id() -> HeaderValue {
    let b: [u8; 16] = rand::random();
    let mut s = [0u8; 36];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut j = 0;
    for (i, byte) in b.iter().enumerate() {
        // UUID v4: version and variant bits.
        let byte = match i {
            6 => (byte & 0x0f) | 0x40,
            8 => (byte & 0x3f) | 0x80,
            _ => *byte,
        };
        if matches!(i, 4 | 6 | 8 | 10) {
            s[j] = b'-';
            j += 1;
        }
        s[j] = HEX[(byte >> 4) as usize];
        s[j + 1] = HEX[(byte & 0xf) as usize];
        j += 2;
    }
    // 36 ASCII hex/dash characters are always a valid header value.
    HeaderValue::from_bytes(&s).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// `normalize_path` (RFC 3986 dot-segment removal, percent-decoding of unreserved
/// characters), `merge_slashes`, and `path_with_escaped_slashes_action`.
fn normalize_path(req: &mut Request<Body>, hcm: &HttpConnectionManager) -> Result<(), LocalReason> {
    if req.method() == http::Method::CONNECT {
        return Ok(());
    }
    let Some(pq) = req.uri().path_and_query() else { return Ok(()) };
    let path = pq.path();
    let query = pq.query();
    if !path.starts_with('/') && path != "*" {
        return Err(LocalReason::BadRequest);
    }
    let escaped = path.contains("%2F") || path.contains("%2f") || path.contains("%5C") || path.contains("%5c");
    let mut new = None;
    if escaped {
        match hcm.path_with_escaped_slashes_action {
            PathWithEscapedSlashesAction::RejectRequest => return Err(LocalReason::BadRequest),
            PathWithEscapedSlashesAction::UnescapeAndForward | PathWithEscapedSlashesAction::UnescapeAndRedirect => {
                new = Some(path.replace("%2F", "/").replace("%2f", "/").replace("%5C", "\\").replace("%5c", "\\"));
            }
            PathWithEscapedSlashesAction::KeepUnchanged => {}
        }
    }
    if hcm.normalize_path {
        let p = new.as_deref().unwrap_or(path);
        new = Some(remove_dot_segments(&decode_unreserved(p)));
    }
    if hcm.merge_slashes {
        let p = new.as_deref().unwrap_or(path);
        if p.contains("//") {
            let mut out = String::with_capacity(p.len());
            let mut prev = '\0';
            for c in p.chars() {
                if !(c == '/' && prev == '/') {
                    out.push(c);
                }
                prev = c;
            }
            new = Some(out);
        }
    }
    if let Some(p) = new
        && p != path
    {
        let full = match query {
            Some(q) => format!("{p}?{q}"),
            None => p,
        };
        *req.uri_mut() = Uri::try_from(full).map_err(|_| LocalReason::BadRequest)?;
    }
    Ok(())
}

fn decode_unreserved(p: &str) -> String {
    let b = p.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            let c = h * 16 + l;
            if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                out.push(c);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn remove_dot_segments(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let trailing = p.ends_with('/') || p.ends_with("/.") || p.ends_with("/..");
    for seg in p.split('/').skip(1) {
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(p.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() || (trailing && !s.ends_with('/')) {
        s.push('/');
    }
    s
}

fn strip_host_port(req: &mut Request<Body>, hcm: &HttpConnectionManager, listener_port: u16) {
    if !hcm.strip_any_host_port && !hcm.strip_matching_host_port {
        return;
    }
    let Some(host) = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()) else { return };
    let Some(stripped) = sluice_config::model::strip_port(host) else { return };
    let port = &host[stripped.len() + 1..];
    if (hcm.strip_any_host_port || port.parse::<u16>().ok() == Some(listener_port))
        && let Ok(v) = HeaderValue::from_str(stripped)
    {
        req.headers_mut().insert(header::HOST, v);
    }
}

// ---------------------------------------------------------------------------------------------
// Observation: what every exchange reports once its response body has been sent.

/// The connection's observer, put in each request's extensions by the server (which knows
/// the worker's shared state) and taken out here.
#[derive(Clone)]
pub struct ObsHandle(pub Arc<crate::metrics::ConnObserver>);

/// Why a response was generated locally, in Envoy's `%RESPONSE_CODE_DETAILS%` words.
fn details(reason: Option<LocalReason>) -> &'static str {
    match reason {
        None => "via_upstream",
        Some(LocalReason::NoRoute) => "route_not_found",
        Some(LocalReason::NoCluster) => "cluster_not_found",
        Some(LocalReason::NoHealthyUpstream) => "no_healthy_upstream",
        Some(LocalReason::Overflow) => "upstream_reset_before_response_started{overflow}",
        Some(LocalReason::UpstreamTimeout) => "upstream_response_timeout",
        Some(LocalReason::ConnectFailure) => "upstream_reset_before_response_started{connection_failure}",
        Some(LocalReason::UpstreamReset) => "upstream_reset_before_response_started{connection_termination}",
        Some(LocalReason::BadRequest) => "invalid_request",
        Some(LocalReason::StreamIdleTimeout) => "stream_idle_timeout",
        Some(LocalReason::RequestTimeout) => "request_overall_timeout",
        Some(LocalReason::MaxStreamDuration) => "downstream_duration_timeout",
        Some(LocalReason::Configured) => "direct_response",
        Some(LocalReason::PayloadTooLarge) => "request_payload_too_large",
        Some(LocalReason::Forbidden) => "forbidden",
    }
}

/// Request facts an access log may print, captured only when the connection manager has
/// access logs, and only the headers their formats name.
struct LogCapture {
    method: http::Method,
    path: String,
    authority: Option<String>,
    scheme: &'static str,
    request: Vec<Option<HeaderValue>>,
    response: Vec<Option<HeaderValue>>,
    trailers: Vec<Option<HeaderValue>>,
    protocol: &'static str,
    client: SocketAddr,
}

/// One request/response exchange being observed.
struct Exchange {
    bundle: Arc<crate::metrics::HcmObs>,
    conn: Arc<ConnInfo>,
    start: Instant,
    start_time: SystemTime,
    rec: Arc<super::ctx::RequestObs>,
    method: http::Method,
    span: Option<crate::telemetry::Span>,
    log: Option<Box<LogCapture>>,
    /// The request path, when `grpc_stats` counts this gRPC call.
    grpc_path: Option<String>,
    status: u16,
    reason: Option<LocalReason>,
    bytes_sent: u64,
    grpc_status: Option<u32>,
    response_frames: Option<GrpcFrames>,
    reported: bool,
}

/// An exchange dropped before it was reported (the client went away before the response,
/// or the request timed out in an inner layer) is still counted and logged, with no status.
impl Drop for Exchange {
    fn drop(&mut self) {
        if !self.reported {
            self.report(false, false);
        }
    }
}

impl Exchange {
    fn begin(bundle: Arc<crate::metrics::HcmObs>, conn: Arc<ConnInfo>) -> Exchange {
        bundle.request_started();
        Exchange {
            bundle,
            conn,
            start: Instant::now(),
            start_time: SystemTime::now(),
            rec: Arc::default(),
            method: http::Method::GET,
            span: None,
            log: None,
            grpc_path: None,
            status: 0,
            reason: None,
            bytes_sent: 0,
            grpc_status: None,
            response_frames: None,
            reported: false,
        }
    }

    /// After the connection manager has prepared the request (`ctx` is `None` when it was
    /// refused): decide sampling and start the server span, capture what access logs need,
    /// and count the request body.
    fn on_request(&mut self, req: &mut Request<Body>, ctx: Option<&mut RequestCtx>) {
        self.method = req.method().clone();
        let grpc = ctx.as_ref().is_some_and(|c| c.grpc);
        let trace = match (&self.bundle.tracer, &ctx) {
            (Some(t), Some(c)) => {
                let name = req.method().as_str().to_string();
                t.start_server(req.headers(), name, || server_span_attributes(req, c)).map(|(span, trace)| {
                    self.span = Some(span);
                    trace
                })
            }
            _ => None,
        };
        self.rec = Arc::new(super::ctx::RequestObs::new(trace));
        if !self.bundle.loggers.is_empty() {
            let c = &self.bundle.captures;
            let h = req.headers();
            self.log = Some(Box::new(LogCapture {
                method: req.method().clone(),
                path: req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string(),
                authority: h.get(header::HOST).and_then(|v| v.to_str().ok()).map(str::to_string),
                scheme: ctx.as_ref().map(|c| c.scheme).unwrap_or(if self.conn.tls.is_some() {
                    "https"
                } else {
                    "http"
                }),
                request: c.request.iter().map(|n| h.get(n).cloned()).collect(),
                response: Vec::new(),
                trailers: Vec::new(),
                protocol: ctx.as_ref().map(|c| c.protocol).unwrap_or(match req.version() {
                    http::Version::HTTP_2 => "HTTP/2",
                    http::Version::HTTP_10 => "HTTP/1.0",
                    _ => "HTTP/1.1",
                }),
                client: ctx.as_ref().map(|c| c.client).unwrap_or(self.conn.remote),
            }));
        }
        if grpc && self.bundle.grpc_stats.is_some() {
            self.grpc_path = Some(req.uri().path().to_string());
            self.response_frames = Some(GrpcFrames::default());
        }
        let body_counted = self.log.is_some() || self.grpc_path.is_some();
        if http_body::Body::is_end_stream(req.body()) {
            self.rec.request_complete();
        } else if body_counted {
            let inner = std::mem::replace(req.body_mut(), crate::body::empty());
            let frames = self.grpc_path.as_ref().map(|_| GrpcFrames::default());
            self.rec.request_body_open();
            *req.body_mut() = crate::body::boxed(RequestBody { inner, rec: self.rec.clone(), frames });
        }
        if let Some(c) = ctx {
            c.obs = Some(self.rec.clone());
        }
    }

    /// The response is leaving: record what its head says; the exchange is reported when
    /// its body ends.
    fn on_response(mut self, resp: Response<Body>) -> Response<Body> {
        self.status = resp.status().as_u16();
        self.reason = resp.extensions().get::<super::local_reply::LocalReply>().map(|l| l.0);
        if let Some(log) = &mut self.log {
            let h = resp.headers();
            log.response = self.bundle.captures.response.iter().map(|n| h.get(n).cloned()).collect();
        }
        if self.grpc_path.is_some() {
            self.grpc_status = grpc_status(resp.headers());
        }
        // No body to wait for (HEAD: hyper never polls it, it only drops it).
        if http_body::Body::is_end_stream(resp.body()) || self.method == http::Method::HEAD {
            let rec = self.rec.clone();
            let mut ex = self;
            rec.report_when_request_ends(move || ex.report(true, false));
            return resp;
        }
        resp.map(|b| crate::body::boxed(ResponseBody { inner: b, exchange: Some(Box::new(self)) }))
    }

    /// Reports the exchange (once): statistics, access logs, the server span.
    fn report(&mut self, completed: bool, errored: bool) {
        if std::mem::replace(&mut self.reported, true) {
            return;
        }
        let duration = self.start.elapsed();
        let up = self.rec.upstream_record();
        let route = self.rec.route();
        let status = self.status;
        self.bundle.request_finished(status, duration, route.map(|(_, r)| r));
        let flags = match (self.reason, completed, errored) {
            (Some(r), _, _) if !r.flag().is_empty() => r.flag(),
            (_, _, true) => "UR",
            (_, false, _) => "DC",
            _ => "",
        };
        if let (Some(path), Some(mode), Some(metrics)) = (&self.grpc_path, self.bundle.grpc_stats, &up.metrics)
            && let Some(g) = metrics.grpc(path, mode.per_method)
        {
            g.total.inc();
            // No grpc-status at all is a failure (a proxy or a broken server answered).
            if self.grpc_status == Some(0) {
                g.success.inc()
            } else {
                g.failure.inc()
            }
            g.request_messages.inc_by(self.rec.request_messages());
            g.response_messages.inc_by(self.response_frames.as_ref().map(|f| f.count).unwrap_or(0));
            if mode.upstream_time {
                g.upstream_rq_time.observe(duration.as_secs_f64() * 1000.0);
            }
        }
        let route_name = route.map(|(_, r)| r.name.as_str()).filter(|n| !n.is_empty());
        if let Some(log) = &self.log {
            let host = hostname();
            let entry = crate::access_log::Entry {
                start_time: self.start_time,
                duration,
                request_duration: self.rec.request_end().map(|t| t.saturating_duration_since(self.start)),
                response_duration: up.response_start.map(|t| t.saturating_duration_since(self.start)),
                method: log.method.as_str(),
                path: &log.path,
                authority: log.authority.as_deref(),
                scheme: log.scheme,
                request_headers: &log.request,
                response_headers: &log.response,
                trailers: &log.trailers,
                status,
                details: details(self.reason),
                flags,
                bytes_received: self.rec.bytes_received(),
                bytes_sent: self.bytes_sent,
                protocol: log.protocol,
                upstream_host: up.host,
                upstream_cluster: up.cluster.as_deref(),
                attempts: up.attempts,
                remote: log.client,
                direct_remote: self.conn.remote,
                local: self.conn.local,
                route_name,
                sni: self.conn.tls.as_ref().and_then(|t| t.sni.as_deref()),
                hostname: &host,
                trace_id: self.rec.trace.as_ref().map(|t| t.trace_id().to_string()),
            };
            for l in &self.bundle.loggers {
                l.log(&entry);
            }
        }
        if let Some(mut span) = self.span.take() {
            use opentelemetry::KeyValue;
            span.set(KeyValue::new("http.response.status_code", i64::from(status)));
            if let Some((vh, r)) = route {
                let label = if r.name.is_empty() { vh.name.clone() } else { r.name.clone() };
                span.rename(format!("{} {label}", self.method));
                span.set(KeyValue::new("http.route", label));
                span.set(KeyValue::new("sluice.virtual_host", vh.name.clone()));
            }
            if let Some(c) = &up.cluster {
                span.set(KeyValue::new("upstream_cluster", c.to_string()));
            }
            if let Some(h) = up.host {
                span.set(KeyValue::new("upstream_address", h.to_string()));
            }
            if up.attempts > 0 {
                span.set(KeyValue::new("sluice.upstream.attempts", i64::from(up.attempts)));
                span.set(KeyValue::new("sluice.upstream.retries", i64::from(up.attempts - 1)));
            }
            span.set(KeyValue::new("http.response.body.size", self.bytes_sent as i64));
            if !flags.is_empty() {
                span.set(KeyValue::new("response_flags", flags));
            }
            if status >= 500 || !completed {
                span.set(KeyValue::new("error.type", if completed { status.to_string() } else { flags.to_string() }));
                span.error("");
            }
            span.end();
        }
    }
}

/// The server span's attributes at the start of a sampled request (OpenTelemetry's HTTP
/// semantic conventions, plus Envoy's `guid:x-request-id` and `component` tags).
fn server_span_attributes(req: &Request<Body>, ctx: &RequestCtx) -> Vec<opentelemetry::KeyValue> {
    use opentelemetry::KeyValue;
    let h = req.headers();
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let server_address = sluice_config::model::strip_port(host).unwrap_or(host);
    let mut a = vec![
        KeyValue::new("http.request.method", req.method().as_str().to_string()),
        KeyValue::new("url.path", req.uri().path().to_string()),
        KeyValue::new("url.scheme", ctx.scheme),
        KeyValue::new("server.address", server_address.to_string()),
        KeyValue::new("server.port", i64::from(ctx.conn.local.port())),
        KeyValue::new(
            "network.protocol.version",
            match req.version() {
                http::Version::HTTP_2 => "2",
                http::Version::HTTP_10 => "1.0",
                _ => "1.1",
            },
        ),
        KeyValue::new("client.address", ctx.client.ip().to_string()),
        KeyValue::new("network.peer.address", ctx.conn.remote.ip().to_string()),
        KeyValue::new("network.peer.port", i64::from(ctx.conn.remote.port())),
        KeyValue::new("sluice.listener", ctx.conn.listener.to_string()),
        KeyValue::new("component", "proxy"),
    ];
    if let Some(q) = req.uri().query() {
        a.push(KeyValue::new("url.query", q.to_string()));
    }
    if let Some(ua) = h.get(header::USER_AGENT).and_then(|v| v.to_str().ok()) {
        a.push(KeyValue::new("user_agent.original", ua.to_string()));
    }
    if let Some(id) = h.get(X_REQUEST_ID).and_then(|v| v.to_str().ok()) {
        a.push(KeyValue::new("guid:x-request-id", id.to_string()));
    }
    a
}

/// Counts gRPC messages in a body: each is a 5-byte prefix (flag, big-endian length) and
/// the message, and either may be split across data frames.
#[derive(Debug, Default, Clone)]
pub struct GrpcFrames {
    /// Message bytes still to skip.
    remaining: u64,
    prefix: [u8; 5],
    have: usize,
    pub count: u64,
}

impl GrpcFrames {
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining as usize).min(data.len());
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                self.count += 1;
                self.have = 0;
                self.remaining =
                    u64::from(u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]));
            }
        }
    }
}

/// The request body, counted (`%BYTES_RECEIVED%`, `%REQUEST_DURATION%`, gRPC messages).
struct RequestBody {
    inner: Body,
    rec: Arc<super::ctx::RequestObs>,
    frames: Option<GrpcFrames>,
}

impl RequestBody {
    fn complete(&mut self) {
        self.rec.request_complete();
        self.rec.request_body_closed();
    }
}

impl Drop for RequestBody {
    /// The upstream may stop reading the request early (its server answered and reset the
    /// stream). What the client already sent has arrived all the same, as Envoy counts it:
    /// account for the frames that are already here, without waiting for more.
    fn drop(&mut self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for _ in 0..DRAIN_ON_DROP_FRAMES {
            if self.rec.request_end().is_some() {
                break;
            }
            match http_body::Body::poll_frame(Pin::new(&mut *self), &mut cx) {
                Poll::Ready(Some(Ok(_))) => {}
                _ => break,
            }
        }
        self.rec.request_body_closed();
    }
}

/// How many already-received request frames a dropped request body still accounts for.
const DRAIN_ON_DROP_FRAMES: usize = 16;

impl http_body::Body for RequestBody {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.rec.add_bytes_received(d.len() as u64);
                    // Counted as each message starts, not when the body ends: the response
                    // can finish (and the exchange be reported) before the upstream
                    // writer polls the request body to its end.
                    if let Some(fr) = self.frames.as_mut() {
                        let before = fr.count;
                        fr.feed(d);
                        let started = fr.count - before;
                        if started > 0 {
                            self.rec.add_request_messages(started);
                        }
                    }
                }
                if self.inner.is_end_stream() {
                    self.complete();
                }
            }
            Poll::Ready(None) => self.complete(),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The response body; the exchange is reported when it ends (or is dropped: the client went
/// away, or the stream failed).
struct ResponseBody {
    inner: Body,
    exchange: Option<Box<Exchange>>,
}

impl ResponseBody {
    fn finish(&mut self, completed: bool, errored: bool) {
        if let Some(mut ex) = self.exchange.take() {
            let rec = ex.rec.clone();
            rec.report_when_request_ends(move || ex.report(completed, errored));
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(ex) = self.exchange.as_mut() {
                    if let Some(d) = f.data_ref() {
                        ex.bytes_sent += d.len() as u64;
                        if let Some(fr) = ex.response_frames.as_mut() {
                            fr.feed(d);
                        }
                    } else if let Some(t) = f.trailers_ref() {
                        if ex.grpc_path.is_some() {
                            ex.grpc_status = grpc_status(t).or(ex.grpc_status);
                        }
                        if let Some(log) = ex.log.as_mut() {
                            log.trailers = ex.bundle.captures.trailers.iter().map(|n| t.get(n).cloned()).collect();
                        }
                    }
                }
                if self.inner.is_end_stream() {
                    self.finish(true, false);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(false, true),
            Poll::Ready(None) => self.finish(true, false),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.finish(false, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments() {
        assert_eq!(remove_dot_segments("/a/b/../c/./d"), "/a/c/d");
        assert_eq!(remove_dot_segments("/../../a"), "/a");
        assert_eq!(remove_dot_segments("/a/.."), "/");
        assert_eq!(remove_dot_segments("/a/b/"), "/a/b/");
        assert_eq!(decode_unreserved("/%61b%2Fc%7e"), "/ab%2Fc~");
        assert_eq!(decode_unreserved("/x%4"), "/x%4");
    }

    #[test]
    fn request_ids_are_uuid_v4() {
        let id = new_request_id();
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert_ne!(new_request_id(), id);
    }

    #[test]
    fn grpc_frames_across_chunks() {
        let mut f = GrpcFrames::default();
        // Two messages (3 and 0 bytes), split at awkward places.
        let wire = [0u8, 0, 0, 0, 3, b'a', b'b', b'c', 0, 0, 0, 0, 0];
        f.feed(&wire[..2]);
        f.feed(&wire[2..6]);
        f.feed(&wire[6..9]);
        f.feed(&wire[9..]);
        assert_eq!(f.count, 2);
        let mut g = GrpcFrames::default();
        g.feed(&wire);
        assert_eq!(g.count, 2);
    }

    #[test]
    fn authority_normalisation() {
        let req = |uri: &str, hosts: &[&str], version: http::Version| {
            let mut b = Request::builder().uri(uri).version(version);
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            b.body(crate::body::empty()).unwrap()
        };
        let hosts = |r: &Request<Body>| -> Vec<String> {
            r.headers().get_all(header::HOST).iter().map(|v| v.to_str().unwrap().to_string()).collect()
        };
        // Origin form with one Host: untouched.
        let mut r = req("/a?b=1", &["web.example"], http::Version::HTTP_11);
        normalize_authority(&mut r).unwrap();
        assert_eq!((hosts(&r), r.uri().to_string()), (vec!["web.example".to_string()], "/a?b=1".to_string()));
        // Absolute form (and HTTP/2's :authority): the URI's authority wins and the URI keeps
        // only its path and query.
        let mut r = req("http://api.example:8080/p?q", &["other"], http::Version::HTTP_11);
        normalize_authority(&mut r).unwrap();
        assert_eq!((hosts(&r), r.uri().to_string()), (vec!["api.example:8080".to_string()], "/p?q".to_string()));
        let mut r = req("http://api.example", &[], http::Version::HTTP_2);
        normalize_authority(&mut r).unwrap();
        assert_eq!((hosts(&r), r.uri().to_string()), (vec!["api.example".to_string()], "/".to_string()));
        // Repeated Host lines collapse to the first.
        let mut r = req("/", &["a.example", "b.example"], http::Version::HTTP_11);
        normalize_authority(&mut r).unwrap();
        assert_eq!(hosts(&r), vec!["a.example".to_string()]);
        // No authority at all: 400 on HTTP/1.1, allowed on HTTP/1.0.
        assert_eq!(
            normalize_authority(&mut req("/", &[], http::Version::HTTP_11)).unwrap_err(),
            LocalReason::BadRequest
        );
        let mut r = req("/", &[], http::Version::HTTP_10);
        normalize_authority(&mut r).unwrap();
        assert!(hosts(&r).is_empty());
    }

    #[test]
    fn hop_by_hop_removal() {
        let mut h = http::HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-foo"));
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers, deflate"));
        h.insert("x-bar", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("connection") && !h.contains_key("x-foo") && !h.contains_key("keep-alive"));
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-bar"], "2");
    }
}
