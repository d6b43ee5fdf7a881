//! Why an upstream request failed, classified the way the router's retry policy and local
//! replies need it (`retry_on: connect-failure, reset, refused-stream`, 503 vs 504, overflow).

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::upstream::breakers::OverflowKind;

/// A shared error source; `Arc` so that one connect failure can be handed to every request that
/// was waiting for that connection.
pub type SharedSource = Arc<dyn StdError + Send + Sync>;

#[derive(thiserror::Error, Debug, Clone)]
pub enum UpstreamError {
    /// The TCP connect failed (refused, unreachable, ...).
    #[error("upstream connect error to {addr}: {source}")]
    ConnectFailure {
        addr: SocketAddr,
        #[source]
        source: SharedSource,
    },
    /// The TCP connect (and TLS handshake) did not finish within `connect_timeout`.
    #[error("upstream connect timeout to {addr} after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    /// The TLS handshake failed, or no client configuration could be built.
    #[error("upstream TLS error to {target}: {message}")]
    Tls { target: String, message: String },
    /// A DNS name of a LOGICAL_DNS host (or a name in a STATIC/EDS endpoint) did not resolve.
    #[error("upstream DNS resolution of {name} failed: {message}")]
    Dns { name: String, message: String },
    /// The connection or stream was reset or closed by the peer.
    #[error("upstream reset {}: {source}", if *before_response { "before response headers" } else { "after response headers" })]
    Reset {
        before_response: bool,
        #[source]
        source: SharedSource,
    },
    /// The HTTP/2 peer refused the stream (`REFUSED_STREAM`): safe to retry anywhere.
    #[error("upstream refused the stream")]
    RefusedStream,
    /// A circuit breaker is open.
    #[error("upstream overflow: {0}")]
    Overflow(OverflowKind),
    /// The upstream spoke invalid HTTP, or the request could not be encoded for it.
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    /// No host to send to.
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    /// A configuration Sluice does not implement for upstreams yet (e.g. internal addresses).
    #[error("unsupported upstream: {0}")]
    Unsupported(String),
}

impl UpstreamError {
    /// `retry_on: connect-failure`: no connection could be established.
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            UpstreamError::ConnectFailure { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Tls { .. }
                | UpstreamError::Dns { .. }
        )
    }

    /// `retry_on: reset`: the connection or stream broke after it was established. Connect
    /// failures count too, as in Envoy (a connect failure is reported as a reset reason).
    pub fn is_reset(&self) -> bool {
        matches!(self, UpstreamError::Reset { .. } | UpstreamError::RefusedStream) || self.is_connect_failure()
    }

    /// `retry_on: refused-stream`.
    pub fn is_refused_stream(&self) -> bool {
        matches!(self, UpstreamError::RefusedStream)
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamError::ConnectTimeout { .. })
    }

    pub fn is_overflow(&self) -> bool {
        matches!(self, UpstreamError::Overflow(_))
    }

    /// A failure that originates on the proxy's side of the upstream exchange (connect
    /// failure, timeout, reset) rather than in an HTTP response: what outlier detection calls
    /// local-origin errors.
    pub fn is_local_origin(&self) -> bool {
        self.is_connect_failure() || matches!(self, UpstreamError::Reset { .. } | UpstreamError::RefusedStream)
    }

    /// Envoy's reset reason string, as printed in local replies (`upstream connect error or
    /// disconnect/reset before headers. reset reason: ...`) and `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    pub fn reset_reason(&self) -> &'static str {
        match self {
            UpstreamError::ConnectFailure { .. } | UpstreamError::Dns { .. } => "connection failure",
            UpstreamError::ConnectTimeout { .. } => "connection timeout",
            UpstreamError::Tls { .. } => "connection failure, transport failure reason: TLS error",
            UpstreamError::Reset { .. } => "connection termination",
            UpstreamError::RefusedStream => "remote refused stream reset",
            UpstreamError::Overflow(_) => "overflow",
            UpstreamError::Protocol(_) => "protocol error",
            UpstreamError::NoHealthyUpstream | UpstreamError::Unsupported(_) => "local reset",
        }
    }

    pub(crate) fn reset(before_response: bool, source: impl StdError + Send + Sync + 'static) -> Self {
        UpstreamError::Reset { before_response, source: Arc::new(source) }
    }
}
