//! Establishing an upstream connection: resolve (DNS hosts), TCP connect, TLS handshake with
//! ALPN, HTTP/1.1 or HTTP/2 handshake, and the task that drives the connection on the
//! current (worker) runtime.
//!
//! `connect_timeout` bounds the TCP connect and the TLS handshake together.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;

use crate::body::Body;
use crate::upstream::dns;
use crate::upstream::error::UpstreamError;
use crate::upstream::host::{Host, HostAddress};
use crate::upstream::pool::host_pool::{ConnSlot, H1Conn, H2Conn, HostPool, Mode};
use crate::upstream::pool::io::{self, SharedTcp};
use crate::upstream::stats::inc;

pub(crate) enum NewConn {
    H1(H1Conn),
    H2(Arc<H2Conn>),
}

pub(crate) async fn establish(
    pool: &HostPool,
    host: &Arc<Host>,
    tls_config: Option<Arc<ClientConfig>>,
    slot: ConnSlot,
    generation: u64,
) -> Result<NewConn, UpstreamError> {
    let core = &pool.core;
    let stats = &core.stats;
    let timeout = core.config.connect_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let addr = match (host.address(), host.socket_addr()) {
        (_, Some(addr)) => addr,
        (HostAddress::Dns { name, port }, None) => {
            let resolved = tokio::time::timeout_at(deadline, dns::resolve(name, *port, core.config.dns_lookup_family))
                .await
                .unwrap_or_else(|_| Err("resolution timed out".into()));
            match resolved.as_deref() {
                Ok([first, ..]) => {
                    host.set_resolved(*first);
                    *first
                }
                Ok([]) | Err(_) => {
                    inc(&stats.cx_connect_fail);
                    let message = resolved.err().unwrap_or_else(|| "no address".into());
                    return Err(UpstreamError::Dns { name: name.clone(), message });
                }
            }
        }
        (other, None) => return Err(UpstreamError::Unsupported(format!("upstream address {other}"))),
    };

    let tcp = match tokio::time::timeout_at(deadline, io::connect(addr, core.hooks.as_ref())).await {
        Ok(Ok(tcp)) => Arc::new(tcp),
        Ok(Err(e)) => {
            inc(&stats.cx_connect_fail);
            return Err(UpstreamError::ConnectFailure { addr, source: Arc::new(e) });
        }
        Err(_) => {
            inc(&stats.cx_connect_timeout);
            return Err(UpstreamError::ConnectTimeout { addr, timeout });
        }
    };
    let shared = SharedTcp(tcp.clone());
    let conn = Established { tcp, created: Instant::now(), generation, slot };

    match (tls_config, &pool.tls) {
        (Some(config), Some(target)) => {
            let connector = TlsConnector::from(config);
            let handshake = connector.connect(target.server_name.clone(), shared);
            let stream = match tokio::time::timeout_at(deadline, handshake).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    inc(&stats.cx_connect_fail);
                    return Err(UpstreamError::Tls { target: addr.to_string(), message: e.to_string() });
                }
                Err(_) => {
                    inc(&stats.cx_connect_timeout);
                    return Err(UpstreamError::ConnectTimeout { addr, timeout });
                }
            };
            let negotiated_h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let h2 = match pool.mode {
                Mode::H1 => false,
                Mode::H2 => true,
                Mode::Auto => negotiated_h2,
            };
            handshake_http(pool, stream, h2, conn).await
        }
        _ => handshake_http(pool, shared, pool.mode == Mode::H2, conn).await,
    }
}

struct Established {
    tcp: Arc<tokio::net::TcpStream>,
    created: Instant,
    generation: u64,
    slot: ConnSlot,
}

async fn handshake_http<T>(pool: &HostPool, io: T, h2: bool, conn: Established) -> Result<NewConn, UpstreamError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let fail = |e: hyper::Error| UpstreamError::reset(true, e);
    let cluster = pool.core.config.name.clone();
    if h2 {
        let options = &pool.core.config.http2;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .initial_stream_window_size(options.initial_stream_window_size)
            .initial_connection_window_size(options.initial_connection_window_size)
            .adaptive_window(false);
        let (sender, connection) = builder.handshake::<_, Body>(TokioIo::new(io)).await.map_err(fail)?;
        let peer_max_streams = Arc::new(AtomicUsize::new(usize::MAX));
        let peer = peer_max_streams.clone();
        tokio::spawn(async move {
            let mut connection = Box::pin(connection);
            let result = std::future::poll_fn(|cx| {
                let polled = connection.as_mut().poll(cx);
                peer.store(connection.current_max_send_streams(), Ordering::Relaxed);
                polled
            })
            .await;
            if let Err(error) = result {
                tracing::debug!(%cluster, %error, "upstream HTTP/2 connection ended with an error");
            }
        });
        Ok(NewConn::H2(Arc::new(H2Conn {
            sender,
            created: conn.created,
            generation: conn.generation,
            active: AtomicU32::new(0),
            total: AtomicU32::new(0),
            peer_max_streams,
            idle_since: AtomicU64::new(0),
            _slot: conn.slot,
        })))
    } else {
        let (sender, connection) = http1::Builder::new().handshake::<_, Body>(TokioIo::new(io)).await.map_err(fail)?;
        tokio::spawn(async move {
            // `with_upgrades` lets a 101 response hand the connection to the caller
            // (WebSocket); the pool never reuses such a connection.
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%cluster, %error, "upstream HTTP/1.1 connection ended with an error");
            }
        });
        Ok(NewConn::H1(H1Conn {
            sender,
            tcp: conn.tcp,
            created: conn.created,
            requests: 0,
            generation: conn.generation,
            _slot: conn.slot,
        }))
    }
}
