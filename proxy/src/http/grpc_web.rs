//! `envoy.filters.http.grpc_web` (gRPC-Web from browsers to gRPC upstream and back) and the
//! request-side half of `envoy.filters.http.grpc_stats`.
//!
//! Cilium's Ingress and Gateway translators put both filters on every listener, so this layer
//! sits between the connection manager and the router. It behaves like Envoy's
//! `grpc_web_filter.cc`:
//!
//! - A request is gRPC-Web when its `content-type` is exactly `application/grpc-web`,
//!   `application/grpc-web+proto`, `application/grpc-web-text` or
//!   `application/grpc-web-text+proto`. It goes upstream as `application/grpc` with
//!   `te: trailers`, `grpc-accept-encoding: identity,deflate,gzip` unless the client sent
//!   one, and no `content-length` (it counted the gRPC-Web body). Other headers, custom
//!   metadata and `x-grpc-web` included, pass unchanged. A text-mode body is base64-decoded
//!   as it streams; invalid base64 is answered with 400 `Bad gRPC-web request, invalid
//!   base64 data.` when no response has started yet.
//! - The response is text mode when the request's `accept` is `application/grpc-web-text` or
//!   `application/grpc-web-text+proto` (as in Envoy, the request's own encoding does not
//!   decide). Its `content-type` becomes `application/grpc-web(-text)+proto` and
//!   `content-length` goes. Message frames pass through (base64-encoded per frame in text
//!   mode); the HTTP/2 trailers become a final frame flagged `0x80` holding
//!   `name:value\r\n` lines. A trailers-only response keeps `grpc-status` in its headers.
//! - A response that is not gRPC (say a 503 with a text body, from the upstream or a local
//!   reply) keeps its HTTP status and gets `grpc-status` mapped from it and `grpc-message`
//!   from the first 16 KiB of its body (percent-encoded), with an empty body. A body-less
//!   one only gets the new `content-type`, as in Envoy; gRPC-Web clients then map the HTTP
//!   status. Local replies are plain HTTP for gRPC-Web requests because the connection
//!   manager classifies requests before this layer runs, exactly as Envoy's does.
//!
//! Choices where Sluice differs or simplifies:
//! - The filter is on when the connection manager lists it. Disabling it per route
//!   (`typed_per_filter_config` with `FilterConfig{disabled: true}`) is ignored: the route
//!   is only known after this layer, and Cilium never emits such a route.
//! - CORS preflights for browsers are the CORS filter's business (in the router); this layer
//!   adds no `access-control-*` headers, like Envoy's filter.
//! - Base64 groups may be padded anywhere, so independently padded segments sent back to back
//!   decode; Envoy accepts padding only at the end of each chunk it decodes.
//!
//! The only cost for requests that are neither gRPC nor gRPC-Web is one `content-type`
//! lookup and a prefix comparison.

mod base64;
mod body;
mod call;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use futures_util::future::Either;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use sluice_config::model::{HttpConnectionManager, HttpFilter};
use tower::{Layer, Service};

use body::{DecodeFailure, ObservedBody, TextRequestBody, UnsizedBody, WebResponseBody};
pub use call::{GrpcCall, grpc_status};

use super::ctx::RequestCtx;
use super::local_reply::{self, LocalReason};
use crate::body::{self as bodies, Body};
use crate::http::header_names::{GRPC_ACCEPT_ENCODING, GRPC_MESSAGE, GRPC_STATUS};

const GRPC: &str = "application/grpc";
const GRPC_WEB: &str = "application/grpc-web";
const GRPC_WEB_PROTO: &str = "application/grpc-web+proto";
const GRPC_WEB_TEXT: &str = "application/grpc-web-text";
const GRPC_WEB_TEXT_PROTO: &str = "application/grpc-web-text+proto";

/// Envoy's `grpc-accept-encoding` for gRPC-Web requests that name none.
const DEFAULT_ACCEPT_ENCODING: &str = "identity,deflate,gzip";

/// How much of a non-gRPC response body becomes `grpc-message` (Envoy's
/// `MAX_BUFFERED_PLAINTEXT_LENGTH`).
const MAX_MESSAGE_BODY: usize = 16 * 1024;

/// Envoy's reply to a text-mode request that is not base64.
const INVALID_BASE64: &str = "Bad gRPC-web request, invalid base64 data.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Grpc,
    Web { text: bool },
}

/// Classifies a request by its `content-type`, as Envoy's filters do: gRPC is
/// `application/grpc` or `application/grpc+<subtype>`; gRPC-Web is one of four exact values.
fn classify(headers: &HeaderMap) -> Option<Kind> {
    let rest = headers.get(header::CONTENT_TYPE)?.as_bytes().strip_prefix(GRPC.as_bytes())?;
    match rest {
        b"" | [b'+', ..] => Some(Kind::Grpc),
        b"-web" | b"-web+proto" => Some(Kind::Web { text: false }),
        b"-web-text" | b"-web-text+proto" => Some(Kind::Web { text: true }),
        _ => None,
    }
}

/// (`grpc_web` configured, `grpc_stats` configured).
fn filters(hcm: &HttpConnectionManager) -> (bool, bool) {
    hcm.http_filters.iter().fold((false, false), |(web, stats), f| match f {
        HttpFilter::GrpcWeb => (true, stats),
        HttpFilter::GrpcStats { .. } => (web, true),
        _ => (web, stats),
    })
}

#[derive(Clone, Default)]
pub struct GrpcWebLayer;

impl<S> Layer<S> for GrpcWebLayer {
    type Service = GrpcWeb<S>;
    fn layer(&self, inner: S) -> GrpcWeb<S> {
        GrpcWeb { inner }
    }
}

#[derive(Clone)]
pub struct GrpcWeb<S> {
    inner: S,
}

type BoxFut = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl<S> Service<Request<Body>> for GrpcWeb<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    /// Unboxed for everything but gRPC-Web and counted gRPC calls.
    type Future = Either<S::Future, BoxFut>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let Some(kind) = classify(req.headers()) else {
            return Either::Left(self.inner.call(req));
        };
        let (web_filter, stats_filter) =
            req.extensions().get::<RequestCtx>().map_or((false, false), |c| filters(&c.hcm));
        let web = match kind {
            Kind::Web { text } if web_filter => Some(text),
            // Without the filter, gRPC-Web is just another HTTP request (and not gRPC for
            // grpc_stats either).
            Kind::Web { .. } => return Either::Left(self.inner.call(req)),
            Kind::Grpc => None,
        };
        let call = if stats_filter { GrpcCall::from_path(req.uri().path(), web.is_some()) } else { None };
        if let Some(c) = &call {
            req.extensions_mut().insert(c.clone());
        }
        match (web, call) {
            (None, None) => Either::Left(self.inner.call(req)),
            (None, Some(call)) => Either::Right(Box::pin(self.inner.call(req).map(move |r| Ok(observe(r?, call))))),
            (Some(text_request), call) => {
                let exchange = WebExchange::start(&mut req, text_request);
                // A combinator feeding an async block that holds only our own state: an async
                // block holding `S::Future` is not provably `Send` (rust-lang/rust#64552).
                Either::Right(Box::pin(self.inner.call(req).then(move |r| exchange.finish(r, call))))
            }
        }
    }
}

/// A gRPC response for `grpc_stats`: the call's status comes from the headers of a
/// trailers-only response, or from the trailers as they pass.
fn observe(resp: Response<Body>, call: GrpcCall) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    call.record(&parts.headers);
    parts.extensions.insert(call.clone());
    let body = if http_body::Body::is_end_stream(&body) { body } else { bodies::boxed(ObservedBody::new(body, call)) };
    Response::from_parts(parts, body)
}

/// The state of one gRPC-Web exchange between its request and its response.
struct WebExchange {
    text_response: bool,
    /// Set for text-mode requests.
    decode_failure: Option<Arc<DecodeFailure>>,
}

impl WebExchange {
    /// Turns the gRPC-Web request into a gRPC request.
    fn start(req: &mut Request<Body>, text_request: bool) -> WebExchange {
        let h = req.headers_mut();
        // It counted the gRPC-Web body, which is not what goes upstream.
        h.remove(header::CONTENT_LENGTH);
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(GRPC));
        let text_response = h.get(header::ACCEPT).is_some_and(|a| a == GRPC_WEB_TEXT || a == GRPC_WEB_TEXT_PROTO);
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        if !h.contains_key(GRPC_ACCEPT_ENCODING) {
            h.insert(GRPC_ACCEPT_ENCODING, HeaderValue::from_static(DEFAULT_ACCEPT_ENCODING));
        }
        let body = std::mem::replace(req.body_mut(), bodies::empty());
        let (body, decode_failure) = if text_request {
            let failure = Arc::new(DecodeFailure::default());
            (bodies::boxed(TextRequestBody::new(body, failure.clone())), Some(failure))
        } else {
            (bodies::boxed(UnsizedBody::new(body)), None)
        };
        *req.body_mut() = body;
        WebExchange { text_response, decode_failure }
    }

    async fn finish(
        self,
        r: Result<Response<Body>, Infallible>,
        call: Option<GrpcCall>,
    ) -> Result<Response<Body>, Infallible> {
        let mut resp = r?;
        if self.decode_failure.as_ref().is_some_and(|f| f.failed()) {
            // The upstream saw a broken request (and usually a reset): say what went wrong.
            resp = local_reply::reply(LocalReason::BadRequest, StatusCode::BAD_REQUEST, INVALID_BASE64, false);
        }
        Ok(web_response(resp, self.text_response, call).await)
    }
}

/// Turns the response to a gRPC-Web request into a gRPC-Web response.
async fn web_response(resp: Response<Body>, text: bool, call: Option<GrpcCall>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    let end_stream = http_body::Body::is_end_stream(&body);
    if let Some(c) = &call {
        c.record(&parts.headers);
        parts.extensions.insert(c.clone());
    }
    let transform = !is_grpc_response(&parts, end_stream) && !is_grpc_web_response(&parts);
    parts.headers.remove(header::CONTENT_LENGTH);
    let content_type = if text { GRPC_WEB_TEXT_PROTO } else { GRPC_WEB_PROTO };
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if end_stream {
        return Response::from_parts(parts, body);
    }
    if transform {
        let message = leading_bytes(body, MAX_MESSAGE_BODY).await;
        let status = local_reply::grpc_status_for(parts.status);
        parts.headers.insert(GRPC_STATUS, HeaderValue::from(status));
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&message)) {
            parts.headers.insert(GRPC_MESSAGE, v);
        }
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
        return Response::from_parts(parts, bodies::empty());
    }
    Response::from_parts(parts, bodies::boxed(WebResponseBody::new(body, text, call)))
}

/// Envoy's `Grpc::Common::isGrpcResponseHeaders`: a trailers-only response with a
/// `grpc-status`, or a 200 with a gRPC `content-type`.
fn is_grpc_response(parts: &http::response::Parts, end_stream: bool) -> bool {
    if end_stream {
        return parts.headers.contains_key(GRPC_STATUS);
    }
    parts.status == StatusCode::OK && matches!(classify(&parts.headers), Some(Kind::Grpc))
}

/// A 200 whose upstream already speaks gRPC-Web (binary, proto-encoded): passed through.
fn is_grpc_web_response(parts: &http::response::Parts) -> bool {
    if parts.status != StatusCode::OK {
        return false;
    }
    let Some(ct) = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let media = ct.split(';').next().unwrap_or("").trim_end();
    media.eq_ignore_ascii_case(GRPC_WEB_PROTO) || media.eq_ignore_ascii_case(GRPC_WEB)
}

/// The first `limit` bytes of a body. Reading stops there (dropping the rest resets the
/// upstream stream) or at an error.
async fn leading_bytes(mut body: Body, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < limit {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let take = (limit - out.len()).min(data.len());
                    out.extend_from_slice(&data[..take]);
                }
            }
            Some(Err(_)) | None => break,
        }
    }
    out
}

/// Envoy's `PercentEncoding::encode` for `grpc-message`: bytes outside `' '..='}'`, and `%`.
fn percent_encode(message: &[u8]) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message {
        if !(b' '..b'~').contains(&b) || b == b'%' {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(char::from(b));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::Full;

    use super::*;

    fn headers(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        h
    }

    #[test]
    fn classification_matches_envoy() {
        assert_eq!(classify(&headers("application/grpc")), Some(Kind::Grpc));
        assert_eq!(classify(&headers("application/grpc+proto")), Some(Kind::Grpc));
        assert_eq!(classify(&headers("application/grpc-web")), Some(Kind::Web { text: false }));
        assert_eq!(classify(&headers("application/grpc-web+proto")), Some(Kind::Web { text: false }));
        assert_eq!(classify(&headers("application/grpc-web-text")), Some(Kind::Web { text: true }));
        assert_eq!(classify(&headers("application/grpc-web-text+proto")), Some(Kind::Web { text: true }));
        for other in ["application/grpc-web+json", "application/grpcx", "application/json", "application/grpc-web; x=1"]
        {
            assert_eq!(classify(&headers(other)), None, "{other}");
        }
        assert_eq!(classify(&HeaderMap::new()), None);
    }

    #[test]
    fn request_is_rewritten_for_grpc() {
        let mut req = Request::builder()
            .uri("/pkg.Svc/M")
            .header("content-type", "application/grpc-web-text")
            .header("content-length", "12")
            .header("accept", "application/grpc-web-text")
            .header("x-grpc-web", "1")
            .header("x-custom", "kept")
            .body(bodies::full("AAAAAAE="))
            .unwrap();
        let ex = WebExchange::start(&mut req, true);
        let h = req.headers();
        assert_eq!(h["content-type"], "application/grpc");
        assert!(!h.contains_key("content-length"));
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["grpc-accept-encoding"], "identity,deflate,gzip");
        assert_eq!(
            (&h["x-grpc-web"], &h["x-custom"]),
            (&HeaderValue::from_static("1"), &HeaderValue::from_static("kept"))
        );
        assert!(ex.text_response && ex.decode_failure.is_some());

        let mut req = Request::builder()
            .header("content-type", "application/grpc-web+proto")
            .header("grpc-accept-encoding", "identity")
            .body(bodies::full("\0\0\0\0\0"))
            .unwrap();
        let ex = WebExchange::start(&mut req, false);
        assert_eq!(req.headers()["grpc-accept-encoding"], "identity");
        // hyper must not restore the length from the body.
        assert_eq!(http_body::Body::size_hint(req.body()).exact(), None);
        assert!(!ex.text_response && ex.decode_failure.is_none());
    }

    fn response(status: u16, ct: Option<&str>, body: Body) -> Response<Body> {
        let mut r = Response::new(body);
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        if let Some(ct) = ct {
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        }
        r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(3));
        r
    }

    #[tokio::test]
    async fn non_grpc_responses_become_status_headers() {
        let r =
            web_response(response(503, Some("text/plain"), bodies::full("no healthy upstream\n")), false, None).await;
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["content-type"], "application/grpc-web+proto");
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "no healthy upstream%0A");
        assert_eq!(r.headers()["content-length"], "0");
        assert!(r.into_body().collect().await.unwrap().to_bytes().is_empty());

        let big = vec![b'x'; MAX_MESSAGE_BODY * 2];
        let r = web_response(response(200, Some("text/html"), bodies::full(big)), true, None).await;
        assert_eq!(r.headers()["content-type"], "application/grpc-web-text+proto");
        assert_eq!(r.headers()["grpc-status"], "2");
        assert_eq!(r.headers()["grpc-message"].len(), MAX_MESSAGE_BODY);
    }

    #[tokio::test]
    async fn bodyless_and_trailers_only_responses_keep_their_headers() {
        let r = web_response(response(404, None, bodies::empty()), false, None).await;
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["content-type"], "application/grpc-web+proto");
        assert!(!r.headers().contains_key("grpc-status") && !r.headers().contains_key("content-length"));

        let call = GrpcCall::from_path("/a.B/C", true).unwrap();
        let mut only = response(200, Some("application/grpc"), bodies::empty());
        only.headers_mut().insert("grpc-status", HeaderValue::from_static("7"));
        let r = web_response(only, true, Some(call.clone())).await;
        assert_eq!(r.headers()["grpc-status"], "7");
        assert_eq!(r.headers()["content-type"], "application/grpc-web-text+proto");
        assert_eq!(call.status(), Some(7));
        assert!(r.extensions().get::<GrpcCall>().is_some());
    }

    #[tokio::test]
    async fn grpc_web_upstreams_pass_through() {
        let frame = Bytes::from_static(&[0, 0, 0, 0, 1, 42]);
        let body = bodies::boxed(Full::new(frame.clone()));
        let r = web_response(response(200, Some("application/grpc-web+proto; q=1"), body), false, None).await;
        assert!(!r.headers().contains_key("grpc-status"));
        assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), frame);
    }

    #[test]
    fn grpc_message_encoding() {
        assert_eq!(percent_encode(b"50% ~ok\xc3\xa9"), "50%25 %7Eok%C3%A9");
    }
}
