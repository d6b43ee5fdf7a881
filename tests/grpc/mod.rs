//! A real tonic gRPC server and client for the `sluice.test.v1.Echo` service of `echo.proto`,
//! and a small gRPC-Web codec for hand-made browser-style requests.
//!
//! The messages are hand-written prost structs and the service plumbing is tonic's own
//! (`tonic::server::Grpc`, `tonic::client::Grpc`, `tonic_prost::ProstCodec`): what generated
//! code would contain, without protoc or a build script.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::uri::PathAndQuery;
use prost::Message;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

pub const SERVICE: &str = "sluice.test.v1.Echo";
pub const UNARY: &str = "/sluice.test.v1.Echo/Unary";
pub const SERVER_STREAM: &str = "/sluice.test.v1.Echo/ServerStream";
pub const CLIENT_STREAM: &str = "/sluice.test.v1.Echo/ClientStream";
pub const BIDI: &str = "/sluice.test.v1.Echo/Bidi";

/// Large enough for the multi-MiB messages of the tests (tonic's default is 4 MiB).
pub const MAX_MESSAGE: usize = 16 << 20;

#[derive(Clone, PartialEq, Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
    #[prost(uint32, tag = "3")]
    pub count: u32,
    #[prost(int32, tag = "4")]
    pub fail_code: i32,
    #[prost(uint64, tag = "5")]
    pub delay_ms: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
    #[prost(uint32, tag = "3")]
    pub index: u32,
    #[prost(map = "string, string", tag = "4")]
    pub headers: HashMap<String, String>,
    #[prost(string, tag = "5")]
    pub server: String,
}

impl EchoRequest {
    pub fn new(message: &str) -> Self {
        EchoRequest { message: message.to_string(), ..Default::default() }
    }
}

/// The status a request with `fail_code` ends with: a non-ASCII message (percent-encoded on
/// the wire) and custom trailer metadata, text and binary.
pub fn failure(req: &EchoRequest) -> Status {
    let mut md = MetadataMap::new();
    if let Ok(v) = MetadataValue::try_from(req.message.as_str()) {
        md.insert("x-echo-trailer", v);
    }
    md.insert_bin("x-echo-bin", MetadataValue::from_bytes(&[0, 1, 2, 0xfe, 0xff]));
    Status::with_metadata(Code::from_i32(req.fail_code), format!("failed: {} — 100% ✓", req.message), md)
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

/// Shared by the handlers of one backend.
struct State {
    name: String,
    calls: AtomicUsize,
    /// Opened by the test to let a gated server stream go on (see [`GATED`]).
    gate: tokio::sync::Notify,
}

/// A server stream whose message starts with this sends its first reply, then waits for
/// [`GrpcBackend::open_gate`] before the others: a proxy that buffered the response would
/// never deliver that first reply.
pub const GATED: &str = "gated";

fn seen_headers(md: &MetadataMap) -> HashMap<String, String> {
    md.clone()
        .into_headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("<binary>").to_string()))
        .collect()
}

async fn delay(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

struct Unary(Arc<State>);

impl tonic::server::UnaryService<EchoRequest> for Unary {
    type Response = EchoReply;
    type Future = BoxFuture<Result<Response<EchoReply>, Status>>;

    fn call(&mut self, request: Request<EchoRequest>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let headers = seen_headers(request.metadata());
            let req = request.into_inner();
            delay(req.delay_ms).await;
            if req.fail_code != 0 {
                return Err(failure(&req));
            }
            let mut resp = Response::new(EchoReply {
                message: req.message,
                payload: req.payload,
                index: 0,
                headers,
                server: state.name.clone(),
            });
            resp.metadata_mut().insert(
                "x-echo-server",
                MetadataValue::try_from(state.name.as_str()).map_err(|e| Status::internal(e.to_string()))?,
            );
            Ok(resp)
        })
    }
}

struct ServerStream(Arc<State>);

impl tonic::server::ServerStreamingService<EchoRequest> for ServerStream {
    type Response = EchoReply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<Result<Response<ReplyStream>, Status>>;

    fn call(&mut self, request: Request<EchoRequest>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let headers = seen_headers(request.metadata());
            let req = request.into_inner();
            delay(req.delay_ms).await;
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<EchoReply, Status>>(2);
            tokio::spawn(async move {
                for i in 0..req.count {
                    let reply = EchoReply {
                        message: format!("{} #{i}", req.message),
                        payload: req.payload.clone(),
                        index: i,
                        headers: if i == 0 { headers.clone() } else { HashMap::new() },
                        server: state.name.clone(),
                    };
                    if tx.send(Ok(reply)).await.is_err() {
                        return;
                    }
                    if i == 0 && req.message.starts_with(GATED) {
                        // The rest waits until the test has seen the first reply.
                        state.gate.notified().await;
                    }
                }
                if req.fail_code != 0 {
                    let _ = tx.send(Err(failure(&req))).await;
                }
            });
            let stream: ReplyStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
            Ok(Response::new(stream))
        })
    }
}

struct ClientStream(Arc<State>);

impl tonic::server::ClientStreamingService<EchoRequest> for ClientStream {
    type Response = EchoReply;
    type Future = BoxFuture<Result<Response<EchoReply>, Status>>;

    fn call(&mut self, request: Request<Streaming<EchoRequest>>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let headers = seen_headers(request.metadata());
            let mut stream = request.into_inner();
            let (mut messages, mut payload, mut n) = (Vec::new(), Vec::new(), 0u32);
            while let Some(req) = stream.message().await? {
                n += 1;
                if req.fail_code != 0 {
                    return Err(failure(&req));
                }
                messages.push(req.message);
                payload.extend_from_slice(&req.payload);
            }
            Ok(Response::new(EchoReply {
                message: messages.join(","),
                payload,
                index: n,
                headers,
                server: state.name.clone(),
            }))
        })
    }
}

struct Bidi(Arc<State>);

impl tonic::server::StreamingService<EchoRequest> for Bidi {
    type Response = EchoReply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<Result<Response<ReplyStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<EchoRequest>>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let headers = seen_headers(request.metadata());
            let mut inbound = request.into_inner();
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<EchoReply, Status>>(4);
            tokio::spawn(async move {
                let mut i = 0u32;
                loop {
                    let req = match inbound.message().await {
                        Ok(Some(req)) => req,
                        Ok(None) => break,
                        Err(status) => {
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                    };
                    delay(req.delay_ms).await;
                    if req.fail_code != 0 {
                        let _ = tx.send(Err(failure(&req))).await;
                        break;
                    }
                    let reply = EchoReply {
                        message: req.message,
                        payload: req.payload,
                        index: i,
                        headers: if i == 0 { headers.clone() } else { HashMap::new() },
                        server: state.name.clone(),
                    };
                    if tx.send(Ok(reply)).await.is_err() {
                        break;
                    }
                    i += 1;
                }
            });
            let stream: ReplyStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
            Ok(Response::new(stream))
        })
    }
}

/// The `Echo` service as tonic's generated server would dispatch it.
#[derive(Clone)]
struct EchoService(Arc<State>);

fn grpc() -> tonic::server::Grpc<ProstCodec<EchoReply, EchoRequest>> {
    tonic::server::Grpc::new(ProstCodec::default())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

impl tower::Service<http::Request<tonic::body::Body>> for EchoService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let state = self.0.clone();
        state.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let resp = match req.uri().path() {
                UNARY => grpc().unary(Unary(state), req).await,
                SERVER_STREAM => grpc().server_streaming(ServerStream(state), req).await,
                CLIENT_STREAM => grpc().client_streaming(ClientStream(state), req).await,
                BIDI => grpc().streaming(Bidi(state), req).await,
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok(resp)
        })
    }
}

/// A tonic server for `Echo` on 127.0.0.1 (HTTP/2 cleartext, as gRPC servers run in a
/// cluster), stopped on drop.
pub struct GrpcBackend {
    pub addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl GrpcBackend {
    pub async fn start(name: &str) -> GrpcBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind grpc backend");
        let addr = listener.local_addr().expect("local addr");
        let state =
            Arc::new(State { name: name.to_string(), calls: AtomicUsize::new(0), gate: tokio::sync::Notify::new() });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let svc = EchoService(state.clone());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            if let Err(e) =
                tonic::transport::Server::builder().serve_with_incoming_shutdown(svc, incoming, shutdown).await
            {
                eprintln!("grpc backend stopped: {e}");
            }
        });
        GrpcBackend { addr, state, shutdown: Some(tx) }
    }

    /// Lets a gated server stream send the rest of its replies.
    pub fn open_gate(&self) {
        self.state.gate.notify_one();
    }

    /// Calls that reached this backend.
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A tonic client for `Echo` over one HTTP/2 connection (h2c, prior knowledge).
#[derive(Clone)]
pub struct EchoClient {
    grpc: tonic::client::Grpc<Channel>,
}

fn codec() -> ProstCodec<EchoRequest, EchoReply> {
    ProstCodec::default()
}

impl EchoClient {
    pub async fn connect(addr: SocketAddr) -> EchoClient {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to sluice");
        let grpc = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        EchoClient { grpc }
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.grpc.ready().await.map_err(|e| Status::unavailable(format!("channel not ready: {e}")))
    }

    pub async fn unary(&mut self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.call_path(UNARY, req).await
    }

    /// A unary call to any path (to reach routes and methods that do not exist).
    pub async fn call_path(&mut self, path: &str, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.ready().await?;
        let path = PathAndQuery::try_from(path).map_err(|e| Status::internal(e.to_string()))?;
        self.grpc.unary(req, path, codec()).await
    }

    pub async fn server_stream(&mut self, req: Request<EchoRequest>) -> Result<Response<Streaming<EchoReply>>, Status> {
        self.ready().await?;
        self.grpc.server_streaming(req, PathAndQuery::from_static(SERVER_STREAM), codec()).await
    }

    pub async fn client_stream<S>(&mut self, req: Request<S>) -> Result<Response<EchoReply>, Status>
    where
        S: Stream<Item = EchoRequest> + Send + 'static,
    {
        self.ready().await?;
        self.grpc.client_streaming(req, PathAndQuery::from_static(CLIENT_STREAM), codec()).await
    }

    pub async fn bidi<S>(&mut self, req: Request<S>) -> Result<Response<Streaming<EchoReply>>, Status>
    where
        S: Stream<Item = EchoRequest> + Send + 'static,
    {
        self.ready().await?;
        self.grpc.streaming(req, PathAndQuery::from_static(BIDI), codec()).await
    }
}

/// Drains a reply stream; returns the replies and the final status (OK included).
pub async fn drain(mut stream: Streaming<EchoReply>) -> (Vec<EchoReply>, Status, Option<MetadataMap>) {
    let mut replies = Vec::new();
    loop {
        match stream.next().await {
            Some(Ok(r)) => replies.push(r),
            Some(Err(status)) => return (replies, status, None),
            None => {
                let trailers = stream.trailers().await.ok().flatten();
                return (replies, Status::ok(""), trailers);
            }
        }
    }
}

// ---- gRPC-Web, by hand, as a browser library frames it ----

/// One length-prefixed message frame.
pub fn web_frame(msg: &impl Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// A decoded gRPC-Web response body: the messages, and the trailer frame's lines.
#[derive(Debug, Default)]
pub struct WebBody {
    pub messages: Vec<EchoReply>,
    pub trailers: Vec<(String, String)>,
    pub trailer_frames: usize,
}

impl WebBody {
    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Parses a binary gRPC-Web body: message frames, then one frame flagged 0x80.
pub fn parse_web_body(mut body: &[u8]) -> Result<WebBody, String> {
    let mut out = WebBody::default();
    while !body.is_empty() {
        if body.len() < 5 {
            return Err(format!("truncated frame header: {} bytes", body.len()));
        }
        let flags = body[0];
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        body = &body[5..];
        if body.len() < len {
            return Err(format!("truncated frame: {len} announced, {} left", body.len()));
        }
        let (payload, rest) = body.split_at(len);
        body = rest;
        if out.trailer_frames > 0 {
            return Err("data after the trailer frame".into());
        }
        if flags & 0x80 != 0 {
            out.trailer_frames += 1;
            let text = std::str::from_utf8(payload).map_err(|e| format!("trailers not UTF-8: {e}"))?;
            for line in text.split("\r\n").filter(|l| !l.is_empty()) {
                let (k, v) = line.split_once(':').ok_or_else(|| format!("bad trailer line {line:?}"))?;
                out.trailers.push((k.to_string(), v.trim_start().to_string()));
            }
        } else {
            out.messages.push(EchoReply::decode(payload).map_err(|e| format!("bad message: {e}"))?);
        }
    }
    Ok(out)
}

/// Decodes a text-mode body: base64 segments, each padded (decoded group by group).
pub fn decode_web_text(body: &[u8]) -> Result<Vec<u8>, String> {
    use base64::Engine;
    if !body.len().is_multiple_of(4) {
        return Err(format!("text body of {} bytes is not whole base64 groups", body.len()));
    }
    let mut out = Vec::new();
    for group in body.chunks(4) {
        let bytes = base64::engine::general_purpose::STANDARD.decode(group).map_err(|e| format!("bad base64: {e}"))?;
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

pub fn encode_web_text(body: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(body)
}

/// Splits a byte stream into gRPC frames for incremental readers.
pub struct FrameReader {
    buf: BytesMut,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader { buf: BytesMut::new() }
    }
}

impl FrameReader {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.put_slice(data);
    }

    /// The next complete frame: (flags, payload).
    pub fn next_frame(&mut self) -> Option<(u8, Bytes)> {
        if self.buf.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if self.buf.len() < 5 + len {
            return None;
        }
        let flags = self.buf[0];
        self.buf.advance(5);
        Some((flags, self.buf.split_to(len).freeze()))
    }
}
