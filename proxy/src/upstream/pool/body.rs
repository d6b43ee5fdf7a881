//! The response body handed to the router: hyper's body plus the lease on the connection.
//!
//! The lease ends when the body does. On a clean end of stream an HTTP/1.1 connection goes
//! back to the pool and an HTTP/2 stream slot is freed; if the body is dropped early or fails,
//! the HTTP/1.1 connection is closed (its remaining bytes are unknown) and the HTTP/2 stream
//! is reset by hyper. The host's active-request count is held until then too, so
//! LEAST_REQUEST sees the whole exchange.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;

use crate::upstream::host::ActiveRequest;
use crate::upstream::pool::host_pool::{H1Conn, H2Conn, HostPool};

pub(crate) enum LeaseConn {
    H1 {
        conn: H1Conn,
        pool: Arc<HostPool>,
    },
    /// Dropping the slot frees the stream.
    H2(#[allow(dead_code)] StreamSlot),
    /// Upgraded (101) or CONNECT tunnels: the connection left HTTP and is never pooled.
    None,
}

/// One reserved stream on a shared HTTP/2 connection; freed on drop.
pub(crate) struct StreamSlot {
    pub pool: Arc<HostPool>,
    pub conn: Arc<H2Conn>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.pool.release_h2_stream(&self.conn);
    }
}

/// A request's claim on its connection and breaker slots.
pub(crate) struct Lease {
    pub conn: LeaseConn,
    /// Whether an HTTP/1.1 connection may be reused after a clean end (keep-alive).
    pub reusable: bool,
    pub clean: bool,
    pub _active: ActiveRequest,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let LeaseConn::H1 { conn, pool } = std::mem::replace(&mut self.conn, LeaseConn::None)
            && self.clean
            && self.reusable
        {
            pool.release_h1(conn);
        }
    }
}

/// The body of an upstream response. Implements [`http_body::Body`] with hyper's data and
/// errors; box it into [`crate::body::Body`] to forward it.
pub struct UpstreamBody {
    /// `None` for [`UpstreamBody::empty`].
    inner: Option<Incoming>,
    lease: Option<Lease>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").field("inner", &self.inner).field("leased", &self.lease.is_some()).finish()
    }
}

impl UpstreamBody {
    pub(crate) fn new(inner: Incoming, mut lease: Lease) -> Self {
        if inner.is_end_stream() {
            // Nothing to read (HEAD, 204, 304, content-length: 0): the exchange is over now,
            // and the router may never poll this body.
            lease.clean = true;
            drop(lease);
            return UpstreamBody { inner: Some(inner), lease: None };
        }
        UpstreamBody { inner: Some(inner), lease: Some(lease) }
    }

    /// A body without data and without a connection, for synthetic responses and tests.
    pub fn empty() -> Self {
        UpstreamBody { inner: None, lease: None }
    }

    fn finish(&mut self, clean: bool) {
        if let Some(mut lease) = self.lease.take() {
            lease.clean = clean;
        }
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        let frame = ready!(Pin::new(&mut *inner).poll_frame(cx));
        match &frame {
            None => this.finish(true),
            Some(Err(_)) => this.finish(false),
            Some(Ok(_)) => {
                if inner.is_end_stream() {
                    this.finish(true);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}
