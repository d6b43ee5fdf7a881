//! Forwarding a routed request upstream: the route's timeouts (including `grpc-timeout`),
//! retries with back-off and a retry budget, request mirroring, and one attempt per upstream
//! host chosen by the cluster's load balancer behind its circuit breakers. Every attempt's
//! outcome feeds outlier detection.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use opentelemetry::KeyValue;
use sluice_config::model::{ForwardAction, HttpFilter, RouteAction};
use tokio::time::Instant;
use tower::Service;

use super::ctx::{RequestCtx, Routed};
use super::local_reply::{LocalReason, local_reply};
use super::replay::ReplayBody;
use super::retry::{self, Attempt};
use crate::body::{self, Body};
use crate::http::header_names::{GRPC_TIMEOUT, X_ENVOY_ATTEMPT_COUNT, X_ENVOY_EXPECTED_RQ_TIMEOUT_MS};
use crate::metrics::ClusterMetrics;
use crate::runtime::Worker;
use crate::upstream::{LbContext, Outcome, UpstreamError};

/// Bound on a request body kept for retries and mirrors (Envoy's default per-connection
/// buffer limit). Larger bodies stream once and are not retried.
const REPLAY_LIMIT: usize = 1024 * 1024;

#[derive(Clone)]
pub struct Forward {
    worker: Arc<Worker>,
}

impl Forward {
    pub fn new(worker: Arc<Worker>) -> Self {
        Forward { worker }
    }
}

type BoxFut = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl Service<Request<Body>> for Forward {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFut;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> BoxFut {
        let worker = self.worker.clone();
        Box::pin(async move { Ok(forward(worker, req).await) })
    }
}

async fn forward(worker: Arc<Worker>, req: Request<Body>) -> Response<Body> {
    let (Some(ctx), Some(routed)) =
        (req.extensions().get::<RequestCtx>().cloned(), req.extensions().get::<Routed>().cloned())
    else {
        return local_reply(LocalReason::NoRoute, false);
    };
    let route = routed.route();
    let RouteAction::Forward(action) = &route.action else {
        return local_reply(LocalReason::NoRoute, ctx.grpc);
    };
    let obs = ctx.obs.clone();
    if let Some(o) = &obs {
        o.upstream(|u| u.cluster = Some(routed.cluster.clone()));
    }
    let Some(cluster) = worker.shared.clusters.get(&routed.cluster) else {
        return local_reply(LocalReason::NoCluster, ctx.grpc);
    };
    let metrics = worker.shared.stats.cluster(&cluster);
    if let Some(o) = &obs {
        o.upstream(|u| u.metrics = Some(metrics.clone()));
    }
    let trace = obs.as_ref().and_then(|o| o.trace.as_ref());
    let retry_policy = action.retry_policy.clone().or_else(|| routed.vhost.retry_policy.clone());
    // The headers, not `ctx.grpc`: a gRPC-Web request is gRPC once transcoded (Envoy's router
    // also classifies the headers it receives), so `grpc-timeout` applies to it too.
    let global_timeout = effective_timeout(action, req.headers(), super::local_reply::is_grpc(req.headers()));
    let forward_start = Instant::now();
    let deadline = global_timeout.map(|t| forward_start + t);
    let per_try = retry_policy.as_ref().and_then(|p| p.per_try_timeout);

    let (mut parts, body) = req.into_parts();
    parts.extensions = http::Extensions::new();
    let suppress =
        ctx.hcm.http_filters.iter().any(|f| matches!(f, HttpFilter::Router { suppress_envoy_headers: true, .. }));
    // A request without a body (most GETs) needs no replay machinery: every attempt sends an
    // empty body, and the upstream sees no `content-length: 0` Envoy would not send either.
    let bodiless = http_body::Body::is_end_stream(&body);
    // Envoy's HTTP/1 codec announces an empty body on methods that normally carry one
    // (`HeaderUtility::requestShouldHaveNoBody`); some servers answer 411 otherwise.
    if bodiless
        && !matches!(parts.method, Method::GET | Method::HEAD | Method::DELETE | Method::TRACE | Method::CONNECT)
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
        && upstream_is_h1(cluster.config().protocol, ctx.downstream_h2)
    {
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    }
    let wants_replay = !bodiless
        && (retry_policy.as_ref().is_some_and(|p| p.num_retries > 0) || !action.request_mirror_policies.is_empty());
    // Without retries or mirrors the body streams once, untouched.
    let mut once: Option<Body> = None;
    let replay = if wants_replay {
        Some(ReplayBody::new(body, REPLAY_LIMIT))
    } else {
        once = Some(body);
        None
    };

    spawn_mirrors(&worker, &ctx, action, &parts, replay.as_ref());

    let hash = crate::upstream::hash_key(&action.hash_policy, &parts.uri, &parts.headers, Some(ctx.client.ip()));
    let mut tried: Vec<Arc<crate::upstream::Host>> = Vec::new();
    let max_attempts = 1 + retry_policy.as_ref().map(|p| p.num_retries).unwrap_or(0);
    let mut attempt_no = 0u32;
    let mut last: Option<Response<Body>> = None;

    loop {
        attempt_no += 1;
        let Some(host) = cluster.choose(&LbContext {
            hash,
            original_dst: ctx.conn.original_dst,
            tried: &tried,
            headers: &parts.headers,
        }) else {
            cluster.stats().no_healthy_upstream();
            return last.unwrap_or_else(|| local_reply(LocalReason::NoHealthyUpstream, ctx.grpc));
        };
        let _retry_guard = if attempt_no > 1 {
            match cluster.breakers().try_retry() {
                Some(g) => Some(g),
                None => return last.unwrap_or_else(|| local_reply(LocalReason::Overflow, ctx.grpc)),
            }
        } else {
            None
        };
        let Some(req_guard) = cluster.breakers().try_request() else {
            return local_reply(LocalReason::Overflow, ctx.grpc);
        };
        let attempt_body = match &replay {
            Some(r) => r.clone().into_body(),
            None => once.take().filter(|_| !bodiless).unwrap_or_else(body::empty),
        };
        // The last attempt takes the request head; earlier ones send a copy, kept for a retry.
        // Most requests have one attempt, and cloning a header map costs several allocations.
        let head = if attempt_no == max_attempts {
            std::mem::replace(&mut parts, Request::new(()).into_parts().0)
        } else {
            clone_parts(&parts)
        };
        let mut req = Request::from_parts(head, attempt_body);
        // The time this attempt has: the per-try timeout, capped by what is left of the
        // route timeout (Envoy's `setTimeoutHeaders`).
        if !suppress {
            // Whole elapsed milliseconds, as Envoy counts them: the first attempt announces the
            // full route timeout.
            let left = global_timeout.map(|g| {
                let elapsed_ms = if attempt_no == 1 { 0 } else { forward_start.elapsed().as_millis() as u64 };
                Duration::from_millis((g.as_millis() as u64).saturating_sub(elapsed_ms))
            });
            let expected = match (per_try, left) {
                (Some(p), Some(g)) => Some(p.min(g)),
                (p, g) => p.or(g),
            };
            if let Some(t) = expected {
                req.headers_mut().insert(X_ENVOY_EXPECTED_RQ_TIMEOUT_MS, HeaderValue::from(t.as_millis() as u64));
            }
        }
        if attempt_no > 1 && routed.vhost.include_request_attempt_count {
            req.headers_mut().insert(X_ENVOY_ATTEMPT_COUNT, HeaderValue::from(attempt_no));
        }
        // One client span per attempt, so retries show in the trace; the upstream joins it.
        let mut span = trace.map(|t| {
            let s = t.client_span(
                req.method().as_str().to_string(),
                client_span_attributes(&req, &cluster, &host, attempt_no),
            );
            crate::telemetry::propagation::inject(req.headers_mut(), &s.context());
            s
        });
        if let Some(o) = &obs {
            o.upstream(|u| {
                u.host = host.socket_addr();
                u.attempts = attempt_no;
            });
        }
        let attempt_start = Instant::now();
        let send = worker.pools.send(&cluster, &host, req, ctx.downstream_h2);
        let try_deadline = match (per_try.map(|p| Instant::now() + p), deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let result = match try_deadline {
            Some(d) => match tokio::time::timeout_at(d, send).await {
                Ok(r) => Attempt::from_result(r),
                Err(_) => Attempt::Timeout {
                    global: deadline.is_some_and(|g| g <= Instant::now() + Duration::from_millis(1)),
                },
            },
            None => Attempt::from_result(send.await),
        };
        tried.push(host.clone());
        // Outlier detection and stats.
        match &result {
            Attempt::Response(r) => {
                host.record(Outcome::from_status(r.status().as_u16()));
                cluster.stats().record_status(r.status().as_u16());
                if let Some(s) = span.as_mut() {
                    s.set(KeyValue::new("http.response.status_code", i64::from(r.status().as_u16())));
                    s.set(KeyValue::new("network.protocol.version", protocol_version(r.version())));
                    if r.status().is_server_error() {
                        s.set(KeyValue::new("error.type", r.status().as_u16().to_string()));
                        s.error("");
                    }
                }
            }
            Attempt::Error(e) => {
                if e.is_local_origin() {
                    host.record(Outcome::LocalOriginFailure);
                }
                cluster.stats().record_error(e);
                if let Some(s) = span.as_mut() {
                    s.set(KeyValue::new("error.type", error_type(e)));
                    s.error("upstream request failed");
                }
            }
            Attempt::Timeout { .. } => {
                host.record(Outcome::LocalOriginFailure);
                cluster.stats().record_timeout();
                if let Some(s) = span.as_mut() {
                    s.set(KeyValue::new("error.type", "timeout"));
                    s.error("upstream request timeout");
                }
            }
        }
        let can_retry = attempt_no < max_attempts
            && (bodiless || replay.as_ref().is_some_and(|r| r.is_replayable()))
            && retry_policy
                .as_ref()
                .is_some_and(|p| retry::request_allowed(p, &parts.headers) && retry::should_retry(p, &result))
            && !matches!(result, Attempt::Timeout { global: true });
        if can_retry {
            cluster.stats().record_retry();
            // A retried attempt ends here; so does its span.
            if matches!(result, Attempt::Response(_)) {
                metrics.observe_rq_time(attempt_start.elapsed());
            }
            if let Some(s) = span.take() {
                s.end();
            }
            if let Attempt::Response(r) = result {
                // Keep the response in case the retry cannot happen (budget, no host).
                last = Some(r.map(body::boxed));
            }
            drop(req_guard);
            let policy = retry_policy.as_ref().map(Arc::as_ref);
            let backoff = retry::backoff(policy, attempt_no);
            let wake = Instant::now() + backoff;
            if deadline.is_some_and(|d| d <= wake) {
                return local_reply(LocalReason::UpstreamTimeout, ctx.grpc);
            }
            tokio::time::sleep_until(wake).await;
            continue;
        }
        return match result {
            Attempt::Response(r) => {
                if let Some(o) = &obs {
                    o.upstream(|u| u.response_start = Some(std::time::Instant::now()));
                }
                let done = AttemptDone { start: attempt_start, metrics: metrics.clone(), span };
                let mut resp = r.map(|b| body::boxed(GuardedBody { inner: b, _guard: req_guard, done: Some(done) }));
                if routed.vhost.include_attempt_count_in_response {
                    resp.headers_mut().insert(X_ENVOY_ATTEMPT_COUNT, HeaderValue::from(attempt_no));
                }
                resp
            }
            Attempt::Error(e) => error_reply(&e, ctx.grpc),
            Attempt::Timeout { .. } => local_reply(LocalReason::UpstreamTimeout, ctx.grpc),
        };
    }
}

/// A client span's attributes (OpenTelemetry's HTTP client conventions, plus Envoy's
/// `upstream_cluster`/`upstream_address` tags and the attempt number).
fn client_span_attributes(
    req: &Request<Body>,
    cluster: &crate::upstream::ClusterRuntime,
    host: &crate::upstream::Host,
    attempt: u32,
) -> Vec<KeyValue> {
    let addr = host.socket_addr();
    let mut a = vec![
        KeyValue::new("http.request.method", req.method().as_str().to_string()),
        KeyValue::new("url.path", req.uri().path().to_string()),
        KeyValue::new("upstream_cluster", cluster.name().to_string()),
        KeyValue::new("sluice.attempt", i64::from(attempt)),
    ];
    if let Some(addr) = addr {
        a.push(KeyValue::new("server.address", addr.ip().to_string()));
        a.push(KeyValue::new("server.port", i64::from(addr.port())));
        a.push(KeyValue::new("network.peer.address", addr.ip().to_string()));
        a.push(KeyValue::new("upstream_address", addr.to_string()));
    } else if let Some(name) = host.hostname() {
        a.push(KeyValue::new("server.address", name.to_string()));
    }
    if attempt > 1 {
        a.push(KeyValue::new("http.request.resend_count", i64::from(attempt - 1)));
    }
    a
}

fn protocol_version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_10 => "1.0",
        _ => "1.1",
    }
}

fn error_type(e: &UpstreamError) -> &'static str {
    if e.is_overflow() {
        "overflow"
    } else if e.is_connect_failure() {
        "connect_failure"
    } else if e.is_timeout() {
        "timeout"
    } else {
        "reset"
    }
}

/// Whether a request goes upstream over HTTP/1 (before ALPN for `auto`, which is HTTP/1 in
/// cleartext).
fn upstream_is_h1(p: sluice_config::model::UpstreamProtocol, downstream_h2: bool) -> bool {
    use sluice_config::model::UpstreamProtocol;
    match p {
        UpstreamProtocol::Http1 | UpstreamProtocol::Auto => true,
        UpstreamProtocol::Http2 => false,
        UpstreamProtocol::UseDownstream { h2 } => !(h2 && downstream_h2),
    }
}

fn clone_parts(p: &http::request::Parts) -> http::request::Parts {
    let mut b = Request::builder().method(p.method.clone()).uri(p.uri.clone()).version(p.version);
    if let Some(h) = b.headers_mut() {
        *h = p.headers.clone();
    }
    let (parts, ()) = b.body(()).map(|r| r.into_parts()).unwrap_or_else(|_| Request::new(()).into_parts());
    parts
}

fn error_reply(e: &UpstreamError, grpc: bool) -> Response<Body> {
    let reason = if e.is_overflow() {
        LocalReason::Overflow
    } else if e.is_connect_failure() {
        LocalReason::ConnectFailure
    } else if e.is_timeout() {
        LocalReason::UpstreamTimeout
    } else if matches!(e, UpstreamError::NoHealthyUpstream) {
        LocalReason::NoHealthyUpstream
    } else {
        LocalReason::UpstreamReset
    };
    local_reply(reason, grpc)
}

/// The route timeout, or for gRPC requests with `max_stream_duration.grpc_timeout_header_max`
/// (or the legacy `max_grpc_timeout`) the client's `grpc-timeout`, capped by that maximum
/// (0 = no cap) and reduced by the offset.
pub fn effective_timeout(action: &ForwardAction, headers: &http::HeaderMap, grpc: bool) -> Option<Duration> {
    if grpc && let Some(max) = action.grpc_timeout_header_max {
        let header = headers.get(GRPC_TIMEOUT).and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        return match header {
            Some(t) => {
                let capped = if max.is_zero() { t } else { t.min(max) };
                let offset = action.grpc_timeout_header_offset.unwrap_or_default();
                Some(capped.saturating_sub(offset)).filter(|d| !d.is_zero()).or(Some(capped))
            }
            // No header: infinity, capped by the maximum.
            None => (!max.is_zero()).then_some(max),
        };
    }
    action.timeout
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(s: &str) -> Option<Duration> {
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (num, unit) = s.split_at(s.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Shadow requests: fire and forget, with `-shadow` appended to the host as Envoy does, sent
/// once the client has finished sending the body (so the mirror never slows the primary).
fn spawn_mirrors(
    worker: &Arc<Worker>,
    ctx: &RequestCtx,
    action: &ForwardAction,
    parts: &http::request::Parts,
    replay: Option<&ReplayBody>,
) {
    for m in &action.request_mirror_policies {
        let sample = (rand::random::<u64>() % 1_000_000) as u32;
        if !m.fraction.hit(sample) {
            continue;
        }
        let Some(cluster) = worker.shared.clusters.get(&m.cluster) else { continue };
        let mut p = clone_parts(parts);
        if let Some(host) = p.headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
            let shadow = match sluice_config::model::strip_port(host) {
                Some(h) => format!("{h}-shadow{}", &host[h.len()..]),
                None => format!("{host}-shadow"),
            };
            if let Ok(v) = HeaderValue::from_str(&shadow) {
                p.headers.insert(header::HOST, v);
            }
        }
        let body = replay.map(|r| r.clone().into_body()).unwrap_or_else(body::empty);
        let worker = worker.clone();
        let h2 = ctx.downstream_h2;
        let original_dst = ctx.conn.original_dst;
        tokio::spawn(async move {
            let Some(host) = cluster.choose(&LbContext { hash: None, original_dst, tried: &[], headers: &p.headers })
            else {
                return;
            };
            let Some(_g) = cluster.breakers().try_request() else { return };
            let req = Request::from_parts(p, body);
            match tokio::time::timeout(Duration::from_secs(30), worker.pools.send(&cluster, &host, req, h2)).await {
                Ok(Ok(resp)) => {
                    cluster.stats().record_status(resp.status().as_u16());
                    // Drain and discard the shadow response.
                    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                }
                Ok(Err(e)) => tracing::debug!(cluster = %cluster.config().name, "mirror request failed: {e}"),
                Err(_) => tracing::debug!(cluster = %cluster.config().name, "mirror request timed out"),
            }
        });
    }
}

/// The end of the answering attempt: its `upstream_rq_time` and its client span, recorded
/// when the response body ends.
struct AttemptDone {
    start: Instant,
    metrics: Arc<ClusterMetrics>,
    span: Option<crate::telemetry::Span>,
}

impl AttemptDone {
    fn finish(self, completed: bool) {
        self.metrics.observe_rq_time(self.start.elapsed());
        if let Some(mut s) = self.span {
            if !completed {
                s.set(KeyValue::new("error.type", "response_incomplete"));
                s.error("response body did not complete");
            }
            s.end();
        }
    }
}

/// Keeps the circuit-breaker slot (and the host's active-request count) until the response
/// body has been fully sent, as Envoy counts a request active until its stream ends; then
/// records the attempt's duration and ends its span.
struct GuardedBody<B, G> {
    inner: B,
    _guard: G,
    done: Option<AttemptDone>,
}

impl<B, G> Drop for GuardedBody<B, G> {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            d.finish(false);
        }
    }
}

impl<B: http_body::Body + Unpin, G: Unpin> http_body::Body for GuardedBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        let ended = match &r {
            Poll::Ready(None) => Some(true),
            Poll::Ready(Some(Err(_))) => Some(false),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => Some(true),
            _ => None,
        };
        if let Some(completed) = ended
            && let Some(d) = self.done.take()
        {
            d.finish(completed);
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
