//! The bodies of a gRPC-Web exchange, transcoded one chunk at a time as the peer reads them:
//! nothing is read ahead, so HTTP/2 flow control and hyper's backpressure reach the other side
//! unchanged, and a 1 MiB message is never held whole.
//!
//! - [`TextRequestBody`]: `application/grpc-web-text` requests, base64 in, gRPC frames out;
//!   [`UnsizedBody`]: binary ones, unchanged but without a length.
//! - [`WebResponseBody`]: gRPC frames out as gRPC-Web (binary or base64), with the HTTP/2
//!   trailers turned into a final length-prefixed frame flagged `0x80`.
//! - [`ObservedBody`]: plain gRPC responses, passed through untouched; only the `grpc-status`
//!   of the trailers is noted for `grpc_stats`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::GrpcCall;
use super::base64::{self, DecodeError, Decoder, SegmentEncoder};
use crate::body::{Body, BoxError};

/// The flag of a gRPC-Web trailer frame (the MSB of the frame's first byte).
pub const TRAILER_FLAG: u8 = 0x80;

/// Length of a gRPC frame header: one flag byte and a big-endian u32 length.
const FRAME_HEADER: usize = 5;

#[derive(Debug, thiserror::Error)]
#[error("bad gRPC-Web request: invalid base64 data: {0}")]
pub struct InvalidBase64(#[from] DecodeError);

/// Set when a text-mode request body turned out not to be base64, so the response side can
/// answer 400 as Envoy does instead of reporting the upstream reset this causes.
#[derive(Debug, Default)]
pub struct DecodeFailure(AtomicBool);

impl DecodeFailure {
    pub fn failed(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// An `application/grpc-web-text` request body, decoded to the gRPC frames inside.
pub struct TextRequestBody {
    inner: Body,
    decoder: Decoder,
    failure: Arc<DecodeFailure>,
    done: bool,
}

impl TextRequestBody {
    pub fn new(inner: Body, failure: Arc<DecodeFailure>) -> Self {
        TextRequestBody { inner, decoder: Decoder::default(), failure, done: false }
    }

    fn fail(&mut self, e: DecodeError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        self.failure.set();
        Poll::Ready(Some(Err(Box::new(InvalidBase64(e)))))
    }
}

impl HttpBody for TextRequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => {
                    this.done = true;
                    if let Err(e) = this.decoder.finish() {
                        return this.fail(e);
                    }
                    return Poll::Ready(None);
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Some(Ok(frame)) => frame,
            };
            match frame.into_data() {
                Ok(text) => {
                    let mut out = BytesMut::new();
                    if let Err(e) = this.decoder.push(&text, &mut out) {
                        return this.fail(e);
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
                    }
                }
                // gRPC-Web requests carry no trailers; pass any through unchanged.
                Err(other) => {
                    if let Err(e) = this.decoder.finish() {
                        return this.fail(e);
                    }
                    return Poll::Ready(Some(Ok(other)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.inner.is_end_stream() && self.decoder.is_empty())
    }
}

/// A binary gRPC-Web request body on its way upstream: unchanged, except that its length is
/// not announced. Envoy drops `content-length` from gRPC-Web requests; without this, hyper
/// would put it back from the body's exact size.
pub struct UnsizedBody {
    inner: Body,
}

impl UnsizedBody {
    pub fn new(inner: Body) -> Self {
        UnsizedBody { inner }
    }
}

impl HttpBody for UnsizedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

/// Splits a stream of gRPC frames at frame boundaries and base64-encodes each frame as its
/// own padded segment, as Envoy does, without waiting for a frame to be complete.
#[derive(Debug, Default)]
struct FrameEncoder {
    header: [u8; FRAME_HEADER],
    header_len: usize,
    /// Payload bytes of the current frame still to come (once its header is complete).
    remaining: usize,
    segment: SegmentEncoder,
}

impl FrameEncoder {
    fn push(&mut self, mut data: &[u8], out: &mut BytesMut) {
        out.reserve(data.len().div_ceil(3) * 4 + 8);
        while !data.is_empty() {
            if self.header_len < FRAME_HEADER {
                let n = (FRAME_HEADER - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
                self.segment.push(&data[..n], out);
                self.header_len += n;
                data = &data[n..];
                if self.header_len == FRAME_HEADER {
                    let len = [self.header[1], self.header[2], self.header[3], self.header[4]];
                    self.remaining = u32::from_be_bytes(len) as usize;
                    if self.remaining == 0 {
                        self.end_frame(out);
                    }
                }
            } else {
                let n = self.remaining.min(data.len());
                self.segment.push(&data[..n], out);
                self.remaining -= n;
                data = &data[n..];
                if self.remaining == 0 {
                    self.end_frame(out);
                }
            }
        }
    }

    fn end_frame(&mut self, out: &mut BytesMut) {
        self.segment.finish(out);
        self.header_len = 0;
        self.remaining = 0;
    }

    /// Whether nothing of a frame is pending.
    fn is_idle(&self) -> bool {
        self.header_len == 0
    }
}

/// Builds the gRPC-Web trailer frame: `0x80`, a big-endian length, then `name:value\r\n`
/// per trailer (several lines for a repeated name), in the order received.
pub fn trailer_frame(trailers: &HeaderMap) -> BytesMut {
    let len: usize = trailers.iter().map(|(k, v)| k.as_str().len() + v.len() + 3).sum();
    let mut out = BytesMut::with_capacity(FRAME_HEADER + len);
    out.put_u8(TRAILER_FLAG);
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    for (name, value) in trailers {
        out.put_slice(name.as_str().as_bytes());
        out.put_u8(b':');
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out
}

/// A gRPC response body on its way to a gRPC-Web client.
pub struct WebResponseBody {
    inner: Body,
    /// `Some` for text mode (`application/grpc-web-text`).
    text: Option<FrameEncoder>,
    call: Option<GrpcCall>,
    done: bool,
}

impl WebResponseBody {
    pub fn new(inner: Body, text: bool, call: Option<GrpcCall>) -> Self {
        WebResponseBody { inner, text: text.then(FrameEncoder::default), call, done: false }
    }

    /// What ends the body: the trailer frame, after whatever of a frame was still pending.
    fn finish(&mut self, trailers: Option<&HeaderMap>) -> Bytes {
        self.done = true;
        let mut out = BytesMut::new();
        if let Some(enc) = &mut self.text {
            // Only an upstream that broke a frame leaves anything pending.
            enc.end_frame(&mut out);
        }
        if let Some(t) = trailers {
            if let Some(call) = &self.call {
                call.record(t);
            }
            let frame = trailer_frame(t);
            match self.text {
                Some(_) => base64::encode_into(&frame, &mut out),
                None => out.unsplit(frame),
            }
        }
        out.freeze()
    }
}

impl HttpBody for WebResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => {
                    let tail = this.finish(None);
                    return Poll::Ready((!tail.is_empty()).then(|| Ok(Frame::data(tail))));
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Some(Ok(frame)) => frame,
            };
            match frame.into_data() {
                Ok(data) => match &mut this.text {
                    None => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Some(enc) => {
                        let mut out = BytesMut::new();
                        enc.push(&data, &mut out);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
                        }
                    }
                },
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let tail = this.finish(Some(&trailers));
                        return Poll::Ready(Some(Ok(Frame::data(tail))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.inner.is_end_stream() && self.text.as_ref().is_none_or(FrameEncoder::is_idle))
    }

    // The length changes (base64, the trailer frame): unknown, so HTTP/1.1 uses chunked.
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A gRPC response body passed through untouched, noting the `grpc-status` of its trailers.
pub struct ObservedBody {
    inner: Body,
    call: GrpcCall,
}

impl ObservedBody {
    pub fn new(inner: Body, call: GrpcCall) -> Self {
        ObservedBody { inner, call }
    }
}

impl HttpBody for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(t) = f.trailers_ref()
        {
            this.call.record(t);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    /// A body that yields the given frames one poll at a time.
    fn body_of(frames: Vec<Frame<Bytes>>) -> Body {
        let stream = futures_util::stream::iter(frames.into_iter().map(Ok::<_, BoxError>));
        crate::body::boxed(StreamBody::new(stream))
    }

    fn grpc_frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8];
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn b64(data: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        base64::encode_into(data, &mut out);
        out.to_vec()
    }

    async fn collect(body: impl HttpBody<Data = Bytes, Error = BoxError>) -> (Vec<u8>, Option<HeaderMap>) {
        let c = body.collect().await.expect("body");
        let trailers = c.trailers().cloned();
        (c.to_bytes().to_vec(), trailers)
    }

    fn trailers(status: &str) -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_str(status).unwrap());
        t.insert("grpc-message", HeaderValue::from_static("it%20broke"));
        t.append("x-meta", HeaderValue::from_static("a"));
        t.append("x-meta", HeaderValue::from_static("b"));
        t
    }

    #[tokio::test]
    async fn binary_response_appends_the_trailer_frame() {
        let m1 = grpc_frame(b"hello");
        let body = body_of(vec![
            Frame::data(Bytes::copy_from_slice(&m1[..3])),
            Frame::data(Bytes::copy_from_slice(&m1[3..])),
            Frame::trailers(trailers("13")),
        ]);
        let call = GrpcCall::from_path("/pkg.Svc/Do", true).unwrap();
        let (bytes, t) = collect(WebResponseBody::new(body, false, Some(call.clone()))).await;
        assert!(t.is_none(), "trailers must move into the body");
        let text = "grpc-status:13\r\ngrpc-message:it%20broke\r\nx-meta:a\r\nx-meta:b\r\n";
        let mut expected = m1.clone();
        expected.push(0x80);
        expected.extend_from_slice(&(text.len() as u32).to_be_bytes());
        expected.extend_from_slice(text.as_bytes());
        assert_eq!(bytes, expected);
        assert_eq!(call.status(), Some(13));
    }

    #[tokio::test]
    async fn text_response_encodes_each_frame_separately() {
        let (m1, m2) = (grpc_frame(b"a"), grpc_frame(&[7u8; 1000]));
        let mut all = m1.clone();
        all.extend_from_slice(&m2);
        // Chunks cut across frame headers and payloads.
        let chunks: Vec<Frame<Bytes>> = all.chunks(7).map(|c| Frame::data(Bytes::copy_from_slice(c))).collect();
        let mut frames = chunks;
        frames.push(Frame::trailers(trailers("0")));
        let (bytes, _) = collect(WebResponseBody::new(body_of(frames), true, None)).await;
        let mut expected = b64(&m1);
        expected.extend(b64(&m2));
        expected.extend(b64(&trailer_frame(&trailers("0"))));
        assert_eq!(String::from_utf8(bytes).unwrap(), String::from_utf8(expected).unwrap());
    }

    #[tokio::test]
    async fn empty_frames_and_no_trailers() {
        let m = grpc_frame(b"");
        let (bytes, _) =
            collect(WebResponseBody::new(body_of(vec![Frame::data(Bytes::from(m.clone()))]), true, None)).await;
        assert_eq!(bytes, b64(&m));
    }

    #[tokio::test]
    async fn text_request_decodes_across_chunks() {
        let m = grpc_frame(b"request payload");
        let text = b64(&m);
        let chunks = text.chunks(3).map(|c| Frame::data(Bytes::copy_from_slice(c))).collect();
        let failure = Arc::new(DecodeFailure::default());
        let (bytes, _) = collect(TextRequestBody::new(body_of(chunks), failure.clone())).await;
        assert_eq!(bytes, m);
        assert!(!failure.failed());
    }

    #[tokio::test]
    async fn text_request_rejects_bad_base64() {
        for bad in [&b"AAAAA"[..], b"AA!A"] {
            let failure = Arc::new(DecodeFailure::default());
            let body = TextRequestBody::new(body_of(vec![Frame::data(Bytes::copy_from_slice(bad))]), failure.clone());
            assert!(body.collect().await.is_err());
            assert!(failure.failed());
        }
    }

    #[tokio::test]
    async fn observed_body_is_untouched() {
        let call = GrpcCall::from_path("/pkg.Svc/Do", false).unwrap();
        let body = body_of(vec![Frame::data(Bytes::from_static(b"xyz")), Frame::trailers(trailers("5"))]);
        let (bytes, t) = collect(ObservedBody::new(body, call.clone())).await;
        assert_eq!(bytes, b"xyz");
        assert_eq!(t.unwrap()["grpc-status"], "5");
        assert_eq!(call.status(), Some(5));
    }
}
