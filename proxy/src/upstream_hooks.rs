//! Connects the upstream module to the rest of the process: TLS client configurations from
//! the certificate store, and upstream sockets to the datapath hooks (the fast path marks
//! them so they are never redirected back to Sluice).

use std::sync::Arc;

use sluice_certs::CertStore;
use sluice_config::model::UpstreamTls;

use crate::runtime::DataPlaneHooks;
use crate::upstream::UpstreamHooks;

pub struct Hooks {
    pub certs: Arc<CertStore>,
    pub datapath: Arc<dyn DataPlaneHooks>,
}

impl UpstreamHooks for Hooks {
    fn tls_client_config(&self, tls: &UpstreamTls) -> Result<Arc<rustls::ClientConfig>, String> {
        self.certs.client_config(tls).map_err(|e| e.to_string())
    }

    fn on_upstream_socket(&self, fd: std::os::fd::BorrowedFd<'_>) {
        self.datapath.upstream_socket(fd);
    }
}
