//! Serving one downstream HTTP connection: HTTP/1.1 and HTTP/2 on the same port (prior
//! knowledge h2c is detected from the connection preface), with the connection manager's
//! limits, and graceful shutdown when the listener drains.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use sluice_config::model::{CodecType, HttpConnectionManager};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::ctx::ConnInfo;
use crate::runtime::Worker;

pub async fn serve<I>(
    worker: Arc<Worker>,
    conn: Arc<ConnInfo>,
    hcm: Arc<HttpConnectionManager>,
    io: I,
    mut drain: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Counts the connection (`downstream_cx_*`) while it lives, and hands every request the
    // connection's observer, through which the connection manager reports the exchange.
    let observer = super::conn_manager::ObsHandle(worker.shared.stats.connection(&hcm));
    let stack = super::stack::build(worker.clone(), conn.clone(), hcm.clone());
    let svc = TowerToHyperService::new(tower::ServiceExt::map_request(
        stack,
        move |mut req: http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(observer.clone());
            req
        },
    ));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // h2 over TLS is chosen by ALPN; in cleartext by the preface (prior knowledge).
    // ALPN decides over TLS, as in Envoy: `h2` is HTTP/2, `http/1.1` is HTTP/1.
    let codec = match conn.tls.as_ref().and_then(|t| t.alpn.as_deref()) {
        Some(b"h2") => CodecType::Http2,
        Some(b"http/1.1") => CodecType::Http1,
        _ => hcm.codec_type,
    };
    builder = match codec {
        CodecType::Http1 => builder.http1_only(),
        CodecType::Http2 => builder.http2_only(),
        CodecType::Auto => builder,
    };
    let header_bytes = (hcm.max_request_headers_kb as usize) * 1024;
    {
        let mut h1 = builder.http1();
        h1.timer(TokioTimer::new())
            .keep_alive(true)
            .max_buf_size(header_bytes.max(8192) + 1024)
            .max_headers(hcm.max_headers_count as usize)
            // Envoy answers 100-continue itself unless told to proxy it.
            .half_close(false);
        if let Some(t) = hcm.request_headers_timeout {
            h1.header_read_timeout(t);
        }
    }
    {
        let mut h2 = builder.http2();
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(hcm.http2.max_concurrent_streams)
            .initial_stream_window_size(hcm.http2.initial_stream_window_size)
            .initial_connection_window_size(hcm.http2.initial_connection_window_size)
            .max_header_list_size(header_bytes as u32)
            .enable_connect_protocol();
    }
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(connection);
    let max_duration = hcm.max_connection_duration.map(|d| tokio::time::Instant::now() + d);
    let drain_timeout = hcm.drain_timeout;
    let idle_timeout = hcm.idle_timeout;
    let activity = conn.activity.clone();
    let idle = async move {
        match idle_timeout {
            Some(t) => activity.idle_for(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        res = connection.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(peer = %conn.remote, "connection ended: {e}");
            }
            return;
        }
        _ = drain.wait_for(|d| *d) => {}
        _ = sleep_until(max_duration) => {}
        // `idle_timeout`: no stream for that long; HTTP/2 clients get a GOAWAY.
        _ = idle => {}
    }
    // Graceful: HTTP/1 closes after the current response, HTTP/2 sends GOAWAY and lets open
    // streams finish, within the drain timeout.
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(drain_timeout.max(Duration::from_millis(100)), connection).await;
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
