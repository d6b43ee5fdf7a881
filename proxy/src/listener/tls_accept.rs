//! Downstream TLS termination for a filter chain with a `DownstreamTlsContext`.
//!
//! The rustls server configuration comes from the certificate store, which keeps it live:
//! certificates, CAs and ticket keys are read per handshake, so a rotation applies to the
//! next handshake and never touches an established connection.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

use sluice_config::model::{DownstreamTls, Snapshot};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;

use super::tls_peek::ClientHello;
use crate::http::ctx::TlsInfo;
use crate::runtime::Worker;

/// Builds the TLS configuration of every terminating chain of a new snapshot.
///
/// A context that cannot be served (a missing file, an expired certificate, a key that does
/// not match) is reported here, once per snapshot and at error level, and lands in the
/// certificate status of the admin endpoint; connections to that chain are then closed with
/// only a debug line each. Building early also keeps that work out of the first handshake.
pub fn preload(worker: &Worker, snapshot: &Snapshot) {
    for listener in &snapshot.listeners {
        for chain in listener.filter_chains.iter().chain(listener.default_filter_chain.iter()) {
            let Some(tls) = &chain.tls else { continue };
            if let Err(e) = worker.shared.certs.server_config(tls) {
                tracing::error!(
                    listener = %listener.name,
                    chain = %chain.name,
                    "TLS context cannot be served, its connections will be closed: {e}"
                );
            }
        }
    }
}

/// Performs the server handshake on `io` (the peeked ClientHello is still in front of it).
///
/// `None` when there is no TLS connection (the caller closes it). Failures are logged at debug
/// level, so that scanners and misbehaving clients cannot flood the log, and counted.
pub async fn accept<IO>(
    worker: &Worker,
    tls: &DownstreamTls,
    hello: &ClientHello,
    io: IO,
    peer: SocketAddr,
    chain: &str,
    timeout: Duration,
) -> Option<(TlsStream<IO>, TlsInfo)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let context = negotiable_alpn(tls, &hello.alpn);
    let config = match worker.shared.certs.server_config(&context) {
        Ok(c) => c,
        Err(e) => {
            // `preload` logged this at error level for the snapshot; each load attempt
            // refreshes the certificate status, so a fixed file is picked up here.
            tracing::debug!(%peer, %chain, "TLS unavailable: {e}");
            worker.shared.stats.tls_handshake_failed();
            return None;
        }
    };
    let stream = match tokio::time::timeout(timeout, tokio_rustls::TlsAcceptor::from(config).accept(io)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, %chain, "TLS handshake failed: {e}");
            worker.shared.stats.tls_handshake_failed();
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, %chain, "TLS handshake timed out");
            worker.shared.stats.tls_handshake_failed();
            return None;
        }
    };
    let (_, session) = stream.get_ref();
    let info = TlsInfo {
        sni: hello.server_name.clone(),
        alpn: session.alpn_protocol().map(<[u8]>::to_vec),
        peer_certificate: session.peer_certificates().is_some_and(|c| !c.is_empty()),
    };
    Some((stream, info))
}

/// The context to handshake with, given the ALPN protocols the client offered.
///
/// rustls aborts a handshake (`no_application_protocol`) when the client offers ALPN and
/// none of its protocols is configured; BoringSSL, and so Envoy, carries on without ALPN.
/// Clients that offer only something else (`acme-tls/1`, a gRPC-only `h2` client against an
/// `http/1.1` listener, custom protocols) must keep working after a move from Envoy, so such a
/// client gets the same context without ALPN: the HTTP codec then falls back to detecting the
/// protocol from the first bytes, as Envoy does without a negotiated protocol.
pub fn negotiable_alpn<'a>(tls: &'a DownstreamTls, offered: &[String]) -> Cow<'a, DownstreamTls> {
    if tls.alpn.is_empty() || offered.is_empty() || offered.iter().any(|p| tls.alpn.contains(p)) {
        Cow::Borrowed(tls)
    } else {
        Cow::Owned(DownstreamTls { alpn: Vec::new(), ..tls.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_config::model::{CertificateRef, DataSource, TlsCertificate, TlsParams};

    fn context(alpn: &[&str]) -> DownstreamTls {
        DownstreamTls {
            certificates: vec![CertificateRef::Inline(TlsCertificate {
                certificate_chain: DataSource::Filename("/c".into()),
                private_key: DataSource::Filename("/k".into()),
            })],
            alpn: alpn.iter().map(|s| s.to_string()).collect(),
            params: TlsParams::default(),
            require_client_certificate: false,
            validation: None,
            session_ticket_keys: None,
            disable_stateless_session_resumption: false,
            disable_stateful_session_resumption: false,
        }
    }

    fn offered(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn keeps_alpn_when_the_client_shares_a_protocol_or_offers_none() {
        let tls = context(&["h2", "http/1.1"]);
        assert!(matches!(negotiable_alpn(&tls, &offered(&["http/1.1"])), Cow::Borrowed(_)));
        assert!(matches!(negotiable_alpn(&tls, &offered(&["spdy/3", "h2"])), Cow::Borrowed(_)));
        assert!(matches!(negotiable_alpn(&tls, &[]), Cow::Borrowed(_)));
    }

    #[test]
    fn drops_alpn_when_nothing_overlaps() {
        let tls = context(&["h2", "http/1.1"]);
        let chosen = negotiable_alpn(&tls, &offered(&["acme-tls/1"]));
        assert!(chosen.alpn.is_empty());
        assert_eq!(chosen.certificates, tls.certificates);
        // A context without ALPN has nothing to drop.
        let plain = context(&[]);
        assert!(matches!(negotiable_alpn(&plain, &offered(&["x"])), Cow::Borrowed(_)));
    }
}
