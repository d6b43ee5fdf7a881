//! Protocol upgrades (`upgrade_configs`, e.g. WebSocket): the request goes upstream on a
//! dedicated HTTP/1.1 connection; on `101 Switching Protocols` both sides are upgraded and
//! bytes are copied in both directions until either side closes.
//!
//! An upgrade the connection manager (or the route) does not enable is refused with 403, as
//! Envoy does; the route can enable or disable an upgrade type the HCM sets.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use sluice_config::model::RouteAction;
use tower::{Layer, Service};

use super::conn_manager::is_upgrade;
use super::ctx::{RequestCtx, Routed};
use super::local_reply::{LocalReason, local_reply, reply};
use crate::body::{self, Body};
use crate::runtime::Worker;
use crate::upstream::LbContext;

#[derive(Clone)]
pub struct UpgradeLayer {
    worker: Arc<Worker>,
}

impl UpgradeLayer {
    pub fn new(worker: Arc<Worker>) -> Self {
        UpgradeLayer { worker }
    }
}

impl<S> Layer<S> for UpgradeLayer {
    type Service = Upgrade<S>;
    fn layer(&self, inner: S) -> Upgrade<S> {
        Upgrade { inner, worker: self.worker.clone() }
    }
}

#[derive(Clone)]
pub struct Upgrade<S> {
    inner: S,
    worker: Arc<Worker>,
}

type BoxFut = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl<S> Service<Request<Body>> for Upgrade<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = BoxFut>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFut;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> BoxFut {
        // The common case costs one header lookup.
        if !req.headers().contains_key(header::UPGRADE) || !is_upgrade(req.headers()) {
            return self.inner.call(req);
        }
        let worker = self.worker.clone();
        Box::pin(async move { Ok(upgrade(worker, req).await) })
    }
}

/// Whether `kind` is enabled for this route: a route-level entry wins over the HCM's.
fn allowed(ctx: &RequestCtx, routed: &Routed, kind: &str) -> bool {
    if let RouteAction::Forward(a) = &routed.route().action
        && let Some(u) = a.upgrade_configs.iter().find(|u| u.upgrade_type.eq_ignore_ascii_case(kind))
    {
        return u.enabled;
    }
    ctx.hcm.upgrade_enabled(kind)
}

async fn upgrade(worker: Arc<Worker>, mut req: Request<Body>) -> Response<Body> {
    let (Some(ctx), Some(routed)) =
        (req.extensions().get::<RequestCtx>().cloned(), req.extensions().get::<Routed>().cloned())
    else {
        return local_reply(LocalReason::NoRoute, false);
    };
    let kind = req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    if !allowed(&ctx, &routed, &kind) {
        return reply(LocalReason::Forbidden, StatusCode::FORBIDDEN, "upgrade failed", false);
    }
    let Some(cluster) = worker.shared.clusters.get(&routed.cluster) else {
        return local_reply(LocalReason::NoCluster, false);
    };
    let headers = req.headers().clone();
    let Some(host) =
        cluster.choose(&LbContext { hash: None, original_dst: ctx.conn.original_dst, tried: &[], headers: &headers })
    else {
        return local_reply(LocalReason::NoHealthyUpstream, false);
    };
    let Some(addr) = host.socket_addr() else {
        return local_reply(LocalReason::NoHealthyUpstream, false);
    };
    let Some(guard) = cluster.breakers().try_connection() else {
        return local_reply(LocalReason::Overflow, false);
    };
    let downstream = hyper::upgrade::on(&mut req);
    let tcp = match crate::tcp_proxy::connect(&worker, addr, cluster.config().connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%addr, "upgrade: connect failed: {e}");
            host.record(crate::upstream::Outcome::ConnectFailed);
            return local_reply(LocalReason::ConnectFailure, false);
        }
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
        Ok(x) => x,
        Err(_) => return local_reply(LocalReason::UpstreamReset, false),
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let (mut parts, body) = req.into_parts();
    parts.extensions = http::Extensions::new();
    parts.version = http::Version::HTTP_11;
    let upstream_req = Request::from_parts(parts, body);
    let mut resp = match sender.send_request(upstream_req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%addr, "upgrade: upstream request failed: {e}");
            return local_reply(LocalReason::UpstreamReset, false);
        }
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return resp.map(body::boxed);
    }
    let upstream = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        let _guard = guard;
        let (Ok(down), Ok(up)) = (downstream.await, upstream.await) else { return };
        let mut down = TokioIo::new(down);
        let mut up = TokioIo::new(up);
        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
            tracing::debug!("upgraded connection ended: {e}");
        }
    });
    let (parts, _) = resp.into_parts();
    Response::from_parts(parts, body::empty())
}
