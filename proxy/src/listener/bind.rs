//! Socket setup for listeners and accepted connections.

use std::net::SocketAddr;

use sluice_config::model::TcpKeepalive;
use socket2::{Domain, Protocol, Socket, TcpKeepalive as SockKeepalive, Type};

/// Binds a listening socket every worker can bind again (`SO_REUSEPORT`), so the kernel
/// balances connections across workers. IPv6 sockets are v6-only: `[::]` and `0.0.0.0` on
/// one port are separate listeners, as in Envoy.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// TCP keepalive from the listener's socket options (Cilium's translators set it on every
/// listener).
pub fn apply_keepalive(stream: &tokio::net::TcpStream, ka: Option<&TcpKeepalive>) {
    let Some(ka) = ka else { return };
    let sock = socket2::SockRef::from(stream);
    let mut k = SockKeepalive::new();
    if let Some(t) = ka.idle {
        k = k.with_time(t);
    }
    if let Some(i) = ka.interval {
        k = k.with_interval(i);
    }
    if let Some(c) = ka.count {
        k = k.with_retries(c);
    }
    if let Err(e) = sock.set_tcp_keepalive(&k) {
        tracing::debug!("cannot set TCP keepalive: {e}");
    }
}
