//! The eBPF fast path as seen from the data plane: original destinations for redirected
//! connections, upstream sockets marked so they are never redirected back, and the Service
//! redirect table kept in step with each snapshot.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use sluice_bpf::{FastPath, FastPathConfig, Redirect};
use sluice_config::Snapshot;

use crate::runtime::DataPlaneHooks;

pub struct FastPathHooks {
    fp: FastPath,
}

/// Starts the fast path. `Ok(None)` when it is off, or when `auto` found the kernel or the
/// privileges lacking (the reason is logged).
pub fn start(cfg: FastPathConfig) -> Result<Option<Arc<FastPathHooks>>, sluice_bpf::FastPathError> {
    Ok(FastPath::start(cfg)?.map(|fp| Arc::new(FastPathHooks { fp })))
}

impl FastPathHooks {
    pub fn fast_path(&self) -> &FastPath {
        &self.fp
    }

    /// Rewrites connects to the Services that CECs redirect to the listener that serves them,
    /// and tells the kernel which addresses are Sluice's listeners.
    pub fn on_snapshot(&self, s: &Snapshot) {
        let mut redirects = Vec::new();
        for r in &s.redirects {
            for vip in &r.frontends {
                let to = match vip.ip() {
                    IpAddr::V4(_) => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), r.proxy_port),
                    IpAddr::V6(_) => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), r.proxy_port),
                };
                redirects.push(Redirect::new(*vip, to));
            }
        }
        if let Err(e) = self.fp.set_services(&redirects) {
            tracing::error!("fast path: cannot update the Service table: {e}");
        }
        let listeners: Vec<SocketAddr> = s.listeners.iter().flat_map(|l| l.addresses.iter().copied()).collect();
        if let Err(e) = self.fp.set_listeners(&listeners) {
            tracing::error!("fast path: cannot update the listener table: {e}");
        }
    }
}

impl DataPlaneHooks for FastPathHooks {
    fn original_destination(&self, peer: SocketAddr, local: SocketAddr) -> Option<SocketAddr> {
        self.fp.original_dst(peer, local)
    }

    fn upstream_socket(&self, fd: std::os::fd::BorrowedFd<'_>) {
        if let Err(e) = self.fp.bypass(fd) {
            tracing::debug!("fast path: cannot mark an upstream socket: {e}");
        }
    }
}
