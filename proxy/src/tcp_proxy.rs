//! `envoy.filters.network.tcp_proxy`: L4 proxying to a cluster (or weighted clusters), as
//! used for TLS passthrough selected by SNI, optionally tunnelled over HTTP CONNECT/POST, to
//! network hosts or to internal listeners.

use std::sync::Arc;
use std::time::Duration;

use sluice_config::model::{ClusterSpecifier, TcpProxy, TunnelingConfig, UpstreamProtocol};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::http::ctx::ConnInfo;
use crate::runtime::Worker;
use crate::upstream::{HostAddress, LbContext, Outcome};

pub async fn proxy<I>(
    worker: Arc<Worker>,
    conn: Arc<ConnInfo>,
    tp: Arc<TcpProxy>,
    mut io: I,
    mut drain: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cluster_name = match &tp.cluster {
        ClusterSpecifier::Cluster(c) => c.clone(),
        ClusterSpecifier::Weighted(w) => {
            match w.pick((rand::random::<u64>() % u64::from(w.total_weight.max(1))) as u32) {
                Some(c) => c.name.clone(),
                None => return,
            }
        }
        ClusterSpecifier::Header(_) => return,
    };
    let Some(cluster) = worker.shared.clusters.get(&cluster_name) else {
        tracing::debug!(cluster = %cluster_name, "tcp_proxy: unknown cluster");
        return;
    };
    let mut tried = Vec::new();
    let mut upstream: Option<(Box<dyn Io>, _)> = None;
    for _ in 0..tp.max_connect_attempts {
        let headers = http::HeaderMap::new();
        let Some(host) = cluster.choose(&LbContext {
            hash: None,
            original_dst: conn.original_dst.or(Some(conn.local)),
            tried: &tried,
            headers: &headers,
        }) else {
            break;
        };
        let Some(guard) = cluster.breakers().try_connection() else {
            tracing::debug!(cluster = %cluster_name, "tcp_proxy: connection overflow");
            return;
        };
        match open(&worker, &conn, host.address(), cluster.config().connect_timeout).await {
            Ok(s) => {
                host.record(Outcome::LocalOriginSuccess);
                upstream = Some((s, guard));
                break;
            }
            Err(e) => {
                tracing::debug!(host = ?host.address(), "tcp_proxy: connect failed: {e}");
                host.record(Outcome::LocalOriginFailure);
                tried.push(host);
            }
        }
    }
    let Some((up, guard)) = upstream else { return };
    let up = match &tp.tunneling {
        Some(t) => match tunnel(up, t, &conn, cluster.config().protocol).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(cluster = %cluster_name, "tcp_proxy: tunnel refused: {e}");
                return;
            }
        },
        None => up,
    };
    let upstream = Some((up, guard));
    let Some((mut up, _guard)) = upstream else { return };
    let idle = tp.idle_timeout;
    let copy = async {
        match idle {
            // The idle timeout resets on activity in either direction.
            Some(t) => copy_with_idle(&mut io, &mut up, t).await,
            // Large buffers: fewer, bigger writes (they cost less, and much less through the
            // sockmap fast path, than many small ones).
            None => tokio::io::copy_bidirectional_with_sizes(&mut io, &mut up, 64 * 1024, 64 * 1024).await.map(|_| ()),
        }
    };
    tokio::select! {
        r = copy => if let Err(e) = r { tracing::debug!("tcp_proxy: {e}") },
        // Raw TCP has no graceful close: a draining listener lets connections finish.
        _ = async { let _ = drain.wait_for(|d| *d).await; std::future::pending::<()>().await } => {}
    }
    let _ = up.shutdown().await;
}

/// Any byte stream the TCP proxy can splice: a socket, an internal listener's in-memory
/// stream, or an HTTP tunnel.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Opens a byte stream to an upstream host.
async fn open(
    worker: &Arc<Worker>,
    conn: &ConnInfo,
    addr: &HostAddress,
    timeout: Duration,
) -> std::io::Result<Box<dyn Io>> {
    match addr {
        HostAddress::Socket(a) => Ok(Box::new(connect(worker, *a, timeout).await?)),
        HostAddress::Dns { name, port } => {
            let a = tokio::net::lookup_host((name.as_str(), *port))
                .await?
                .next()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{name} has no address")))?;
            Ok(Box::new(connect(worker, a, timeout).await?))
        }
        HostAddress::Internal(listener) => {
            let (client, server) = tokio::io::duplex(64 * 1024);
            if crate::listener::serve_internal(worker, listener, server, conn) {
                Ok(Box::new(client))
            } else {
                Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("no internal listener {listener}")))
            }
        }
    }
}

/// `tunneling_config`: wraps the stream in an HTTP CONNECT (or POST) tunnel, over HTTP/2 when
/// the cluster speaks it and HTTP/1.1 otherwise, as Envoy does.
async fn tunnel(
    io: Box<dyn Io>,
    t: &TunnelingConfig,
    conn: &ConnInfo,
    protocol: UpstreamProtocol,
) -> Result<Box<dyn Io>, String> {
    use crate::route::{TemplateContext, template::render};
    let local = conn.original_dst.unwrap_or(conn.local);
    let ctx = TemplateContext::new(conn.remote, local);
    let empty = http::HeaderMap::new();
    let authority = render(&t.hostname, &ctx, &empty).into_owned();
    let method = if t.use_post { http::Method::POST } else { http::Method::CONNECT };
    let mut req = http::Request::builder().method(method.clone());
    req = if t.use_post { req.uri(format!("http://{authority}/")) } else { req.uri(authority.as_str()) };
    let mut req = req.body(http_body_util::Empty::<bytes::Bytes>::new()).map_err(|e| e.to_string())?;
    if let Ok(v) = http::HeaderValue::from_str(&authority) {
        req.headers_mut().insert(http::header::HOST, v);
    }
    crate::route::apply(
        &sluice_config::model::HeaderMutations::new(t.headers_to_add.clone(), vec![]),
        req.headers_mut(),
        &ctx,
    );
    let h2 = matches!(protocol, UpstreamProtocol::Http2);
    let resp = if h2 {
        let (mut sender, c) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(io),
        )
        .await
        .map_err(|e| e.to_string())?;
        tokio::spawn(c);
        sender.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut sender, c) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await.map_err(|e| e.to_string())?;
        tokio::spawn(c.with_upgrades());
        sender.send_request(req).await.map_err(|e| e.to_string())?
    };
    if !resp.status().is_success() {
        return Err(format!("the tunnel endpoint answered {}", resp.status()));
    }
    let upgraded = hyper::upgrade::on(resp).await.map_err(|e| e.to_string())?;
    Ok(Box::new(hyper_util::rt::TokioIo::new(upgraded)))
}

pub async fn connect(worker: &Worker, addr: std::net::SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let sock = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    {
        use std::os::fd::AsFd;
        worker.shared.hooks.upstream_socket(sock.as_fd());
    }
    sock.set_nodelay(true)?;
    match tokio::time::timeout(timeout, sock.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout")),
    }
}

async fn copy_with_idle<A, B>(a: &mut A, b: &mut B, idle: Duration) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let mut abuf = vec![0u8; 64 * 1024];
    let mut bbuf = vec![0u8; 64 * 1024];
    let (mut a_open, mut b_open) = (true, true);
    while a_open || b_open {
        tokio::select! {
            r = ar.read(&mut abuf), if a_open => {
                let n = r?;
                if n == 0 { a_open = false; bw.shutdown().await?; } else { bw.write_all(&abuf[..n]).await?; }
            }
            r = br.read(&mut bbuf), if b_open => {
                let n = r?;
                if n == 0 { b_open = false; aw.shutdown().await?; } else { aw.write_all(&bbuf[..n]).await?; }
            }
            _ = tokio::time::sleep(idle) => return Ok(()),
        }
    }
    Ok(())
}
