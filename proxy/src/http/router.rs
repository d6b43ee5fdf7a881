//! The router layer: picks the virtual host and route, answers redirects, direct responses,
//! CORS preflights and "no route" itself, and for forwarded requests chooses the cluster,
//! applies the request header mutations and rewrites, and on the way back the response
//! header mutations. What to do with the request upstream is the inner service's job.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use sluice_config::model::{ClusterSpecifier, HttpFilter, Route, RouteAction};
use tower::{Layer, Service};

use super::ctx::{RequestCtx, Routed};
use super::local_reply::{LocalReason, LocalReply, local_reply};
use crate::body::{self, Body};
use crate::http::header_names::{
    X_ENVOY_ATTEMPT_COUNT, X_ENVOY_ORIGINAL_HOST, X_ENVOY_ORIGINAL_PATH, X_ENVOY_UPSTREAM_SERVICE_TIME,
};
use crate::route::{self, CorsDecision, PseudoHeaders, RequestView, Selection, TemplateContext};

#[derive(Clone, Default)]
pub struct RouterLayer;

impl<S> Layer<S> for RouterLayer {
    type Service = Router<S>;
    fn layer(&self, inner: S) -> Router<S> {
        Router { inner }
    }
}

#[derive(Clone)]
pub struct Router<S> {
    inner: S,
}

type BoxFut = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl<S> Service<Request<Body>> for Router<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFut;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> BoxFut {
        match route_request(req) {
            Decision::Reply(resp) => Box::pin(async move { Ok(resp) }),
            Decision::Forward(req, post) => {
                // A combinator rather than an `async` block: rustc cannot prove an async block
                // holding `S::Future` is `Send` for every lifetime (rust-lang/rust#64552).
                Box::pin(self.inner.call(req).map(move |r| {
                    let mut resp = r?;
                    post.apply(&mut resp);
                    Ok(resp)
                }))
            }
        }
    }
}

enum Decision {
    Reply(Response<Body>),
    Forward(Request<Body>, Box<PostProcess>),
}

/// Work left for the response of a forwarded request.
struct PostProcess {
    routed: Routed,
    ctx: RequestCtx,
    /// The downstream request's headers, kept only when a response header mutation may refer
    /// to them (`%REQ(...)%`): cloning every request's headers would cost more than routing.
    request_headers: Option<http::HeaderMap>,
    /// The request line as received, for `%REQ(:authority)%` and friends.
    method: http::Method,
    authority: Option<HeaderValue>,
    path: Option<http::uri::PathAndQuery>,
    cors_headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl PostProcess {
    fn apply(self, resp: &mut Response<Body>) {
        let PostProcess { routed, ctx, request_headers, method, authority, path, cors_headers } = self;
        let local = resp.extensions().get::<LocalReply>().is_some();
        let pseudo = PseudoHeaders {
            method: method.as_str(),
            authority: authority_str(authority.as_ref()),
            path: path_str(path.as_ref()),
            scheme: ctx.scheme,
        };
        let tctx = template_ctx(&ctx, request_headers.as_ref(), pseudo);
        route::apply_response_mutations(
            &routed.route_config,
            &routed.vhost,
            routed.route(),
            routed.weighted_cluster(),
            resp.headers_mut(),
            &tctx,
        );
        for (k, v) in cors_headers {
            resp.headers_mut().insert(k, v);
        }
        if !local && !suppress_envoy_headers(&ctx) {
            let ms = ctx.start.elapsed().as_millis();
            resp.headers_mut().insert(X_ENVOY_UPSTREAM_SERVICE_TIME, HeaderValue::from(ms as u64));
        }
    }
}

fn authority_str(v: Option<&HeaderValue>) -> &str {
    v.and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn path_str(p: Option<&http::uri::PathAndQuery>) -> &str {
    p.map(|p| p.as_str()).unwrap_or("/")
}

/// Whether any response header mutation on the route's path uses `%REQ(...)%`.
fn response_needs_request_headers(routed: &Routed) -> bool {
    use sluice_config::model::{HeaderMutations, TemplatePart};
    let uses = |m: &HeaderMutations| {
        m.add().iter().any(|a| a.value.parts.iter().any(|p| matches!(p, TemplatePart::RequestHeader(_))))
    };
    uses(&routed.route_config.response_headers)
        || uses(&routed.vhost.response_headers)
        || uses(&routed.route().response_headers)
        || routed.weighted_cluster().is_some_and(|w| uses(&w.response_headers))
}

fn suppress_envoy_headers(ctx: &RequestCtx) -> bool {
    ctx.hcm.http_filters.iter().any(|f| matches!(f, HttpFilter::Router { suppress_envoy_headers: true, .. }))
}

pub fn template_ctx<'a>(
    ctx: &'a RequestCtx,
    request_headers: Option<&'a http::HeaderMap>,
    request: PseudoHeaders<'a>,
) -> TemplateContext<'a> {
    let mut t = TemplateContext::new(ctx.client, ctx.conn.local);
    t.request = request;
    t.hostname = &ctx.hostname;
    t.protocol = ctx.protocol;
    t.start_time = ctx.start_time;
    t.requested_server_name = ctx.conn.tls.as_ref().and_then(|t| t.sni.as_deref());
    t.request_headers = request_headers;
    t
}

fn route_request(mut req: Request<Body>) -> Decision {
    let Some(ctx) = req.extensions().get::<RequestCtx>().cloned() else {
        return Decision::Reply(local_reply(LocalReason::NoRoute, false));
    };
    let grpc = ctx.grpc;
    let Some(rc) = ctx.hcm.route_config.clone() else {
        return Decision::Reply(local_reply(LocalReason::NoRoute, grpc));
    };
    let random: u64 = rand::random();
    // The request line as received, kept for response templates: clones of the header value
    // and the path share their buffers (no copy per request).
    let authority_value = req.headers().get(header::HOST).cloned();
    let path_value = req.uri().path_and_query().cloned();
    let authority = authority_str(authority_value.as_ref());
    let path = path_str(path_value.as_ref());
    let method = req.method().clone();
    let (vhost, route_index, cors_decision) = {
        let view = RequestView {
            method: req.method(),
            path,
            authority,
            scheme: ctx.scheme,
            headers: req.headers(),
            peer_certificate_presented: ctx.conn.tls.as_ref().is_some_and(|t| t.peer_certificate),
            random,
        };
        let selection = route::select(&rc, &view);
        let (vhost, route) = match selection {
            None => return Decision::Reply(local_reply(LocalReason::NoRoute, grpc)),
            Some(Selection::RequireTls { location, .. }) => {
                let mut r = Response::new(body::empty());
                *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
                r.headers_mut().insert(header::LOCATION, location);
                r.extensions_mut().insert(LocalReply(LocalReason::Configured));
                return Decision::Reply(r);
            }
            Some(Selection::Route { vhost, route }) => (vhost, route),
        };
        let route_index = index_of(&vhost.routes, route);
        // Route identity for per-route statistics, access logs and the server span.
        if let Some(obs) = &ctx.obs {
            obs.set_route(vhost, route_index);
        }
        let cors_enabled = ctx.hcm.http_filters.iter().any(|f| matches!(f, HttpFilter::Cors))
            && !route.disabled_filters.iter().any(|f| f == "envoy.filters.http.cors");
        let decision = if cors_enabled {
            route::cors(route.cors.as_deref(), vhost.cors.as_deref(), &view)
        } else {
            CorsDecision::NotCors
        };
        // Redirects and direct responses are answered here, with the route's response
        // header mutations.
        let local = match &route.action {
            RouteAction::Redirect(r) => {
                let (status, location) =
                    route::redirect_location(r, &route.matcher.path, route.matcher.case_sensitive, &view);
                let mut resp = Response::new(body::empty());
                *resp.status_mut() = status;
                resp.headers_mut().insert(header::LOCATION, location);
                Some(resp)
            }
            RouteAction::DirectResponse(d) => {
                let mut resp = match &d.body {
                    Some(b) => {
                        let mut r = Response::new(body::full(b.clone()));
                        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                        r
                    }
                    None => Response::new(body::empty()),
                };
                *resp.status_mut() = StatusCode::from_u16(d.status).unwrap_or(StatusCode::OK);
                if let Some(loc) = route::direct_response_location(d.status, &view) {
                    resp.headers_mut().insert(header::LOCATION, loc);
                }
                Some(resp)
            }
            RouteAction::Forward(_) => None,
        };
        if let Some(mut resp) = local {
            resp.extensions_mut().insert(LocalReply(LocalReason::Configured));
            let pseudo = PseudoHeaders { method: view.method.as_str(), authority, path, scheme: ctx.scheme };
            let tctx = template_ctx(&ctx, Some(req.headers()), pseudo);
            route::apply_response_mutations(&rc, vhost, route, None, resp.headers_mut(), &tctx);
            return Decision::Reply(resp);
        }
        (vhost.clone(), route_index, decision)
    };
    let cors_headers = match cors_decision {
        CorsDecision::Preflight(p) => {
            let (parts, ()) = p.into_parts();
            let mut r = Response::from_parts(parts, body::empty());
            r.extensions_mut().insert(LocalReply(LocalReason::Configured));
            return Decision::Reply(r);
        }
        CorsDecision::Forward { response_headers } => response_headers,
        CorsDecision::NotCors => Vec::new(),
    };
    let route = &vhost.routes[route_index];
    let RouteAction::Forward(action) = &route.action else {
        return Decision::Reply(local_reply(LocalReason::NoRoute, grpc));
    };
    // The route's stream timers replace the connection manager's.
    if let Some(clock) = &ctx.clock {
        if let Some(t) = action.idle_timeout {
            clock.set_idle(t);
        }
        if let Some(t) = action.max_stream_duration {
            clock.set_max(t);
        }
    }

    // Cluster choice: weighted (with the same random value as runtime_fraction, as Envoy
    // does), named by a header, or fixed.
    let (cluster, weighted_index): (Arc<str>, Option<usize>) = match &action.cluster {
        ClusterSpecifier::Cluster(c) => (Arc::from(c.as_str()), None),
        ClusterSpecifier::Weighted(w) => match route::pick_weighted(w, random) {
            Some(wc) => {
                let i = w.clusters.iter().position(|c| std::ptr::eq(c, wc));
                (Arc::from(wc.name.as_str()), i)
            }
            None => return Decision::Reply(local_reply(LocalReason::NoCluster, grpc)),
        },
        ClusterSpecifier::Header(h) => match req.headers().get(h.as_str()).and_then(|v| v.to_str().ok()) {
            Some(c) if !c.is_empty() => (Arc::from(c), None),
            _ => return Decision::Reply(local_reply(LocalReason::NoCluster, grpc)),
        },
    };
    let routed = Routed { route_config: rc.clone(), vhost: vhost.clone(), route_index, cluster, weighted_index };

    // Request header mutations, then the host rewrite (which sees the mutated headers), then
    // the path rewrite.
    let request_headers = response_needs_request_headers(&routed).then(|| req.headers().clone());
    {
        let pseudo = PseudoHeaders { method: method.as_str(), authority, path, scheme: ctx.scheme };
        let tctx = template_ctx(&ctx, None, pseudo);
        route::apply_request_mutations(&rc, &vhost, route, routed.weighted_cluster(), req.headers_mut(), &tctx);
    }
    // Host rewrites: the weighted cluster's literal first, then the route's, which Envoy
    // records in `x-envoy-original-host` (unless Envoy headers are suppressed).
    if let Some(h) = routed.weighted_cluster().and_then(|w| w.host_rewrite_literal.as_deref()).filter(|h| !h.is_empty())
        && let Ok(v) = HeaderValue::from_str(h)
    {
        req.headers_mut().insert(header::HOST, v);
    }
    if let Some(host) = route::rewrite_host(action, None, req.headers(), path)
        && let Ok(v) = HeaderValue::from_str(&host)
        && let Some(before) = req.headers_mut().insert(header::HOST, v)
        && !suppress_envoy_headers(&ctx)
    {
        req.headers_mut().insert(X_ENVOY_ORIGINAL_HOST, before);
    }
    if let Some(new_path) = route::rewrite_path(action, &route.matcher.path, route.matcher.case_sensitive, path)
        && let Ok(uri) = Uri::try_from(new_path.as_str())
    {
        if let Ok(v) = HeaderValue::from_str(path) {
            req.headers_mut().insert(X_ENVOY_ORIGINAL_PATH, v);
        }
        *req.uri_mut() = uri;
    }
    if vhost.include_request_attempt_count {
        req.headers_mut().insert(X_ENVOY_ATTEMPT_COUNT, HeaderValue::from_static("1"));
    }
    req.extensions_mut().insert(routed.clone());
    Decision::Forward(
        req,
        Box::new(PostProcess {
            routed,
            ctx,
            request_headers,
            method,
            authority: authority_value,
            path: path_value,
            cors_headers,
        }),
    )
}

/// The index of `route` in `routes`, from its address: a large table is not scanned again
/// after the route index found the route.
fn index_of(routes: &[Route], route: &Route) -> usize {
    let size = std::mem::size_of::<Route>().max(1);
    let offset = (route as *const Route as usize).wrapping_sub(routes.as_ptr() as usize) / size;
    match routes.get(offset) {
        Some(r) if std::ptr::eq(r, route) => offset,
        _ => routes.iter().position(|r| std::ptr::eq(r, route)).unwrap_or(0),
    }
}
