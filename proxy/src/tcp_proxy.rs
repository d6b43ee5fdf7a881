//! `envoy.filters.network.tcp_proxy`: L4 proxying to a cluster (or weighted clusters), as
//! used for TLS passthrough selected by SNI, optionally tunnelled over HTTP CONNECT/POST.

use std::sync::Arc;
use std::time::Duration;

use sluice_config::model::{ClusterSpecifier, TcpProxy};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::http::ctx::ConnInfo;
use crate::runtime::Worker;
use crate::upstream::{LbContext, Outcome};

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
    let mut upstream = None;
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
        let Some(addr) = host.socket_addr() else { break };
        let Some(guard) = cluster.breakers().try_connection() else {
            tracing::debug!(cluster = %cluster_name, "tcp_proxy: connection overflow");
            return;
        };
        match connect(&worker, addr, cluster.config().connect_timeout).await {
            Ok(s) => {
                host.record(Outcome::LocalOriginSuccess);
                upstream = Some((s, guard));
                break;
            }
            Err(e) => {
                tracing::debug!(%addr, "tcp_proxy: connect failed: {e}");
                host.record(Outcome::LocalOriginFailure);
                tried.push(host);
            }
        }
    }
    let Some((mut up, _guard)) = upstream else { return };
    let idle = tp.idle_timeout;
    let copy = async {
        match idle {
            // The idle timeout resets on activity in either direction.
            Some(t) => copy_with_idle(&mut io, &mut up, t).await,
            None => tokio::io::copy_bidirectional(&mut io, &mut up).await.map(|_| ()),
        }
    };
    tokio::select! {
        r = copy => if let Err(e) = r { tracing::debug!("tcp_proxy: {e}") },
        // Raw TCP has no graceful close: a draining listener lets connections finish.
        _ = async { let _ = drain.wait_for(|d| *d).await; std::future::pending::<()>().await } => {}
    }
    let _ = up.shutdown().await;
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
    let mut abuf = vec![0u8; 16 * 1024];
    let mut bbuf = vec![0u8; 16 * 1024];
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
