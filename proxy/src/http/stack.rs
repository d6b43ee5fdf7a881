//! The request path of one connection, as a stack of tower layers (outermost first):
//!
//! 1. [`conn_manager`](super::conn_manager): Envoy's HCM semantics and request timeouts;
//! 2. [`grpc_web`](super::grpc_web): gRPC-Web <-> gRPC when the filter is configured;
//! 3. [`router`](super::router): route selection, local replies, header mutations, rewrites;
//! 4. [`upgrade`](super::upgrade): WebSocket and other upgrades on a dedicated connection;
//! 5. [`forward`](super::forward): timeouts, retries, mirrors, load balancing, pools.

use std::sync::Arc;

use sluice_config::model::HttpConnectionManager;
use tower::ServiceBuilder;

use super::conn_manager::{ConnConfig, ConnManagerLayer};
use super::ctx::ConnInfo;
use super::forward::Forward;
use super::router::RouterLayer;
use super::upgrade::UpgradeLayer;
use crate::runtime::Worker;

pub fn build(
    worker: Arc<Worker>,
    conn: Arc<ConnInfo>,
    hcm: Arc<HttpConnectionManager>,
) -> impl tower::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<crate::body::Body>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    let config = ConnConfig::new(worker.shared.hub.clone(), conn, hcm);
    ServiceBuilder::new()
        .map_request(|req: http::Request<hyper::body::Incoming>| req.map(crate::body::boxed))
        .layer(ConnManagerLayer::new(config))
        .layer(super::grpc_web::GrpcWebLayer)
        .layer(RouterLayer)
        .layer(UpgradeLayer::new(worker.clone()))
        .service(Forward::new(worker))
}
