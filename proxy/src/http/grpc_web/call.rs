//! What `envoy.filters.http.grpc_stats` counts per call: the service and method named by the
//! `:path`, and the `grpc-status` the call ended with.
//!
//! The gRPC layer puts a [`GrpcCall`] into the request extensions (and the response
//! extensions) of every gRPC and gRPC-Web request when the connection manager has the
//! `grpc_stats` filter. The status is filled in while the response streams: from the headers
//! of a trailers-only response, or from the trailers. A consumer keeps a clone and reads
//! [`GrpcCall::status`] once the response body has ended.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::http::header_names::GRPC_STATUS;
use http::HeaderMap;

/// No `grpc-status` seen (yet).
const UNKNOWN: u32 = u32::MAX;

#[derive(Debug, Clone)]
pub struct GrpcCall {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `service/method`, without the leading slash.
    name: Box<str>,
    /// Index of the `/` between service and method in `name`.
    split: usize,
    web: bool,
    status: AtomicU32,
}

impl GrpcCall {
    /// The call named by a request path `/package.Service/Method` (query ignored), as Envoy
    /// resolves it: exactly two non-empty segments, otherwise the call is not counted.
    pub fn from_path(path: &str, web: bool) -> Option<GrpcCall> {
        let path = path.split('?').next().unwrap_or(path);
        let mut parts = path.split('/').filter(|s| !s.is_empty());
        let (service, method) = (parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let name = format!("{service}/{method}").into_boxed_str();
        Some(GrpcCall { inner: Arc::new(Inner { name, split: service.len(), web, status: AtomicU32::new(UNKNOWN) }) })
    }

    /// The fully qualified service, e.g. `helloworld.Greeter`.
    pub fn service(&self) -> &str {
        &self.inner.name[..self.inner.split]
    }

    /// The method, e.g. `SayHello`.
    pub fn method(&self) -> &str {
        &self.inner.name[self.inner.split + 1..]
    }

    /// Whether the call arrived as gRPC-Web (and was transcoded).
    pub fn is_web(&self) -> bool {
        self.inner.web
    }

    /// The call's `grpc-status` once the response carried one.
    pub fn status(&self) -> Option<u32> {
        match self.inner.status.load(Ordering::Acquire) {
            UNKNOWN => None,
            s => Some(s),
        }
    }

    /// Notes the `grpc-status` of response headers (trailers-only) or trailers, if present.
    pub(crate) fn record(&self, headers: &HeaderMap) {
        if let Some(s) = grpc_status(headers) {
            self.inner.status.store(s, Ordering::Release);
        }
    }
}

/// The `grpc-status` of a header or trailer map.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.trim().parse().ok().filter(|&s| s != UNKNOWN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_paths() {
        let c = GrpcCall::from_path("/helloworld.Greeter/SayHello", false).unwrap();
        assert_eq!((c.service(), c.method(), c.is_web()), ("helloworld.Greeter", "SayHello", false));
        let c = GrpcCall::from_path("/a.B/C?x=1", true).unwrap();
        assert_eq!((c.service(), c.method(), c.is_web()), ("a.B", "C", true));
        assert!(GrpcCall::from_path("/only", false).is_none());
        assert!(GrpcCall::from_path("/a/b/c", false).is_none());
        assert!(GrpcCall::from_path("/", false).is_none());
    }

    #[test]
    fn status_is_recorded_once_seen() {
        let c = GrpcCall::from_path("/s.S/m", false).unwrap();
        let shared = c.clone();
        assert_eq!(c.status(), None);
        let mut h = HeaderMap::new();
        c.record(&h);
        assert_eq!(shared.status(), None);
        h.insert("grpc-status", http::HeaderValue::from_static("14"));
        c.record(&h);
        assert_eq!(shared.status(), Some(14));
        h.insert("grpc-status", http::HeaderValue::from_static("nope"));
        assert_eq!(grpc_status(&h), None);
    }
}
