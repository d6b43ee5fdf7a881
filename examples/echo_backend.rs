//! A small, fast HTTP backend used by the README demo, the end-to-end and differential tests,
//! and the load harness in `benches/`.
//!
//! One port serves HTTP/1.1 and h2c (prior knowledge), detected per connection, so the same
//! backend works behind any upstream protocol a proxy picks.
//!
//! Two modes:
//! * default: every response is `200` with a JSON description of the request as the backend saw
//!   it (method, path, host, headers, body size, protocol). Tests compare what a proxy forwarded
//!   by reading this JSON. Path segments act as directives (see [`Directives`]).
//! * `--fixed-body BYTES`: benchmark mode. Every response is `200` with the same static body, so
//!   the backend does as little work per request as possible and never becomes the bottleneck
//!   of the proxy being measured. The static body is itself a JSON object naming the backend
//!   (padded to the requested size) so harnesses can still check which backend answered.
//!
//! In both modes a request with `content-type: application/grpc*` gets a valid gRPC unary
//! response that echoes the request message, and `--fail-every N` turns every Nth request into
//! a failure (HTTP 503, or gRPC `UNAVAILABLE`) for retry and outlier-detection demos.
//!
//! Once every listener is bound it prints `listening on ADDR` (one line per address) to stdout:
//! tests and scripts wait for that line instead of polling the port.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket};

/// gRPC's default maximum message size; larger requests are refused like a real server would.
const GRPC_MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// Upper bound for `/delay/<ms>` so a typo cannot park a connection for days.
const MAX_DELAY_MS: u64 = 600_000;
/// Upper bound for `/stream/<n>`.
const MAX_STREAM_CHUNKS: usize = 1_000_000;
/// gRPC status codes used by the backend (see grpc/doc/statuscodes.md).
const GRPC_OK: u32 = 0;
const GRPC_RESOURCE_EXHAUSTED: u32 = 8;
const GRPC_INTERNAL: u32 = 13;
const GRPC_UNAVAILABLE: u32 = 14;

const X_BACKEND: HeaderName = HeaderName::from_static("x-backend");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// Request header that makes a gRPC request fail with the given `grpc-status` (trailers-only).
const X_ECHO_GRPC_STATUS: HeaderName = HeaderName::from_static("x-echo-grpc-status");

#[derive(Parser, Debug)]
#[command(name = "echo_backend", about = "HTTP/1.1 + h2c echo backend for Sluice tests, demos and benchmarks")]
struct Args {
    /// Address to listen on; repeat for several. Port 0 picks a free port (printed on stdout).
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:18080")]
    listen: Vec<SocketAddr>,
    /// Backend name, reported in the `x-backend` header and the JSON body.
    #[arg(long, default_value = "echo")]
    name: String,
    /// Worker threads, each with its own single-threaded runtime and SO_REUSEPORT listeners.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Benchmark mode: always answer 200 with a static body of this many bytes.
    #[arg(long, value_name = "BYTES")]
    fixed_body: Option<usize>,
    /// Answer every Nth request (counted across all threads) with 503.
    #[arg(long, value_name = "N")]
    fail_every: Option<NonZeroU64>,
}

/// Process-wide state. It lives for the whole process, so it is leaked once at startup and
/// every connection borrows it without reference counting.
struct Backend {
    name: String,
    name_header: HeaderValue,
    /// `Some` in `--fixed-body` mode.
    fixed_body: Option<Bytes>,
    fail_every: Option<NonZeroU64>,
    requests: AtomicU64,
}

impl Backend {
    /// True when this request is the Nth one and must fail (`--fail-every`).
    fn should_fail(&self) -> bool {
        match self.fail_every {
            None => false,
            Some(n) => (self.requests.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(n.get()),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let name_header = HeaderValue::from_str(&args.name)
        .with_context(|| format!("--name {:?} is not a valid header value", args.name))?;
    let fixed_body = args.fixed_body.map(|size| fixed_body(&args.name, size));
    let backend: &'static Backend = Box::leak(Box::new(Backend {
        name: args.name,
        name_header,
        fixed_body,
        fail_every: args.fail_every,
        requests: AtomicU64::new(0),
    }));

    let reuse_port = args.threads > 1;
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut workers = Vec::with_capacity(usize::from(args.threads));
    // The first worker binds the requested addresses; the others bind the *resolved* ones, so
    // `--listen 127.0.0.1:0 --threads 4` gives four listeners sharing one port.
    let mut addrs = args.listen;
    for index in 0..args.threads {
        workers.push(spawn_worker(index, addrs.clone(), reuse_port, backend, ready_tx.clone())?);
        addrs = ready_rx.recv().context("worker thread exited before binding")?.map_err(|e| anyhow!(e))?;
    }
    let mut stdout = std::io::stdout().lock();
    for addr in &addrs {
        writeln!(stdout, "listening on {addr}").context("writing to stdout")?;
    }
    stdout.flush().context("flushing stdout")?;
    drop(stdout);

    for worker in workers {
        match worker.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => bail!("a worker thread panicked"),
        }
    }
    Ok(())
}

/// The static `--fixed-body` payload: a JSON object naming the backend, padded with spaces to
/// exactly `size` bytes when it fits, so a harness can still verify which backend answered.
fn fixed_body(name: &str, size: usize) -> Bytes {
    let json = serde_json::json!({ "backend": name, "fixed_body": size }).to_string();
    let mut body = if json.len() < size {
        let mut body = json.into_bytes();
        body.resize(size - 1, b' ');
        body.push(b'\n');
        body
    } else {
        vec![b'x'; size]
    };
    body.shrink_to_fit();
    Bytes::from_static(Box::leak(body.into_boxed_slice()))
}

fn spawn_worker(
    index: u16,
    addrs: Vec<SocketAddr>,
    reuse_port: bool,
    backend: &'static Backend,
    ready: mpsc::Sender<Result<Vec<SocketAddr>, String>>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    std::thread::Builder::new()
        .name(format!("echo-worker-{index}"))
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building the tokio runtime")?;
            runtime.block_on(async move {
                let mut listeners = Vec::with_capacity(addrs.len());
                for addr in &addrs {
                    match bind(*addr, reuse_port) {
                        Ok(listener) => listeners.push(listener),
                        Err(e) => {
                            let _ = ready.send(Err(format!("{e:#}")));
                            return Err(e);
                        }
                    }
                }
                let bound: Result<Vec<SocketAddr>, _> = listeners.iter().map(TcpListener::local_addr).collect();
                let bound = bound.context("reading the bound address")?;
                // The receiver only disappears if main already failed; nothing left to tell.
                let _ = ready.send(Ok(bound));
                let mut accept_loops = tokio::task::JoinSet::new();
                for listener in listeners {
                    accept_loops.spawn(accept_loop(listener, backend));
                }
                while accept_loops.join_next().await.is_some() {}
                Ok(())
            })
        })
        .context("spawning a worker thread")
}

fn bind(addr: SocketAddr, reuse_port: bool) -> anyhow::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.context("creating a socket")?;
    socket.set_reuseaddr(true).context("SO_REUSEADDR")?;
    if reuse_port {
        socket.set_reuseport(true).context("SO_REUSEPORT")?;
    }
    socket.bind(addr).with_context(|| format!("binding {addr}"))?;
    socket.listen(1024).with_context(|| format!("listening on {addr}"))
}

async fn accept_loop(listener: TcpListener, backend: &'static Backend) {
    let builder: &'static auto::Builder<TokioExecutor> = Box::leak(Box::new(auto::Builder::new(TokioExecutor::new())));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Typically EMFILE under a connection flood: back off instead of spinning.
                eprintln!("echo_backend: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Small responses must not wait for Nagle; latency figures depend on it.
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(backend, req));
            // Errors here are clients going away mid-connection; nothing to do about them.
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn handle(backend: &'static Backend, req: Request<Incoming>) -> Result<Response<EchoBody>, Infallible> {
    if is_grpc(req.headers()) {
        return Ok(grpc_unary(backend, req).await);
    }
    if let Some(body) = &backend.fixed_body {
        return Ok(fixed_response(backend, req, body).await);
    }
    Ok(echo_response(backend, req).await)
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// `--fixed-body` mode: the cheapest valid response. The request body, if any, is drained so
/// HTTP/1.1 connections stay reusable.
async fn fixed_response(backend: &'static Backend, req: Request<Incoming>, body: &Bytes) -> Response<EchoBody> {
    if !req.body().is_end_stream() {
        let _ = count_body(req.into_body()).await;
    }
    let status = if backend.should_fail() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let mut response = Response::new(EchoBody::Full(Some(body.clone())));
    *response.status_mut() = status;
    response.headers_mut().insert(X_BACKEND, backend.name_header.clone());
    response
}

/// Directives carried by path segments, wherever they appear in the path, so they survive a
/// proxy's prefix rewrite: `/status/<code>`, `/delay/<ms>`, `/stream/<n>`, `/echo` and
/// `/headers` (which applies `?set=name:value` query parameters). They combine, e.g.
/// `/api/delay/50/status/503`.
#[derive(Debug, Default)]
struct Directives {
    status: Option<StatusCode>,
    delay: Option<Duration>,
    stream: Option<usize>,
    echo: bool,
    set_headers: Vec<(HeaderName, HeaderValue)>,
}

impl Directives {
    fn parse(path: &str, query: Option<&str>) -> Result<Self, String> {
        let mut directives = Directives::default();
        let mut apply_set = false;
        let mut segments = path.split('/').filter(|s| !s.is_empty()).peekable();
        while let Some(segment) = segments.next() {
            // A keyword followed by something that is not a number is an ordinary path segment.
            let number = segments.peek().and_then(|next| next.parse::<u64>().ok());
            match (segment, number) {
                ("status", Some(code)) => {
                    segments.next();
                    let status = u16::try_from(code)
                        .ok()
                        .and_then(|c| StatusCode::from_u16(c).ok())
                        .filter(|s| !s.is_informational())
                        .ok_or_else(|| format!("/status/{code}: not a final HTTP status"))?;
                    directives.status = Some(status);
                }
                ("delay", Some(ms)) => {
                    segments.next();
                    if ms > MAX_DELAY_MS {
                        return Err(format!("/delay/{ms}: at most {MAX_DELAY_MS} ms"));
                    }
                    directives.delay = Some(Duration::from_millis(ms));
                }
                ("stream", Some(n)) => {
                    segments.next();
                    let n = usize::try_from(n)
                        .ok()
                        .filter(|n| *n <= MAX_STREAM_CHUNKS)
                        .ok_or_else(|| format!("/stream/{n}: at most {MAX_STREAM_CHUNKS}"))?;
                    directives.stream = Some(n);
                }
                ("echo", _) => directives.echo = true,
                ("headers", _) => apply_set = true,
                _ => {}
            }
        }
        if apply_set {
            for pair in query.unwrap_or_default().split('&') {
                let Some(spec) = pair.strip_prefix("set=") else {
                    continue;
                };
                let spec = percent_decode(spec)?;
                let (name, value) = spec.split_once(':').ok_or_else(|| format!("set={spec}: expected name:value"))?;
                let name = HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|e| format!("set={spec}: bad header name: {e}"))?;
                let value = HeaderValue::from_str(value.trim_start())
                    .map_err(|e| format!("set={spec}: bad header value: {e}"))?;
                directives.set_headers.push((name, value));
            }
        }
        Ok(directives)
    }
}

/// Decodes `%XX` escapes (and nothing else: `+` stays `+`).
fn percent_decode(input: &str) -> Result<String, String> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{input}: bad percent escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{input}: not UTF-8 once decoded"))
}

/// Default mode: a JSON description of the request, shaped by the path directives.
async fn echo_response(backend: &'static Backend, req: Request<Incoming>) -> Response<EchoBody> {
    let directives = match Directives::parse(req.uri().path(), req.uri().query()) {
        Ok(d) => d,
        Err(message) => return error_response(backend, StatusCode::BAD_REQUEST, &message),
    };
    if directives.echo {
        if let Some(delay) = directives.delay {
            tokio::time::sleep(delay).await;
        }
        return echo_body(backend, req, &directives);
    }

    let (parts, body) = req.into_parts();
    let body_bytes = match count_body(body).await {
        Ok(n) => n,
        Err(e) => {
            let message = format!("reading the request body: {e}");
            return error_response(backend, StatusCode::BAD_REQUEST, &message);
        }
    };
    if let Some(delay) = directives.delay {
        tokio::time::sleep(delay).await;
    }
    let status = if backend.should_fail() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        directives.status.unwrap_or(StatusCode::OK)
    };

    let (body, content_type) = if let Some(chunks) = directives.stream {
        let body = EchoBody::Chunks { next: 0, total: chunks, name: &backend.name };
        (body, "application/x-ndjson")
    } else if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        (EchoBody::Full(None), "application/json")
    } else {
        let json = describe_request(backend, &parts, body_bytes);
        (EchoBody::Full(Some(Bytes::from(json))), "application/json")
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(X_BACKEND, backend.name_header.clone());
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    for (name, value) in directives.set_headers {
        headers.append(name, value);
    }
    response
}

/// `/echo`: the request body streams straight back, so backpressure and trailers pass through.
fn echo_body(backend: &'static Backend, req: Request<Incoming>, directives: &Directives) -> Response<EchoBody> {
    let status = if backend.should_fail() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        directives.status.unwrap_or(StatusCode::OK)
    };
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    let mut response = Response::new(EchoBody::Echo(req.into_body()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(X_BACKEND, backend.name_header.clone());
    headers.insert(CONTENT_TYPE, content_type);
    for (name, value) in &directives.set_headers {
        headers.append(name.clone(), value.clone());
    }
    response
}

fn describe_request(backend: &Backend, parts: &http::request::Parts, body_bytes: u64) -> Vec<u8> {
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let mut values = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect::<Vec<_>>();
        let value = if values.len() == 1 { values.swap_remove(0) } else { serde_json::Value::Array(values) };
        headers.insert(name.as_str().to_owned(), value);
    }
    // HTTP/2 carries the host in `:authority`, which hyper exposes through the URI.
    let host = parts
        .headers
        .get(HOST)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .or_else(|| parts.uri.authority().map(|a| a.as_str().to_owned()));
    let path = parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let description = serde_json::json!({
        "backend": backend.name,
        "method": parts.method.as_str(),
        "path": path,
        "host": host,
        "headers": headers,
        "body_bytes": body_bytes,
        "protocol": protocol_name(parts.version),
    });
    let mut json = description.to_string().into_bytes();
    json.push(b'\n');
    json
}

fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

fn error_response(backend: &Backend, status: StatusCode, message: &str) -> Response<EchoBody> {
    let json = serde_json::json!({ "backend": backend.name, "error": message }).to_string();
    let mut response = Response::new(EchoBody::Full(Some(Bytes::from(json))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(X_BACKEND, backend.name_header.clone());
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Reads a body to the end and returns its length; trailers are ignored.
async fn count_body(mut body: Incoming) -> Result<u64, hyper::Error> {
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            total += data.len() as u64;
        }
    }
    Ok(total)
}

/// A gRPC unary call: the request message(s) are echoed back with `grpc-status: 0` trailers.
/// `x-echo-grpc-status: N` makes the call fail with status N instead (trailers-only response),
/// and `--fail-every` fails with `UNAVAILABLE`, the status gRPC retry policies key on.
async fn grpc_unary(backend: &'static Backend, req: Request<Incoming>) -> Response<EchoBody> {
    let forced_status =
        req.headers().get(X_ECHO_GRPC_STATUS).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u32>().ok());
    let body = match read_grpc_body(req.into_body()).await {
        Ok(body) => body,
        Err((status, message)) => return grpc_trailers_only(backend, status, message),
    };
    if backend.should_fail() {
        return grpc_trailers_only(backend, GRPC_UNAVAILABLE, "--fail-every");
    }
    if let Some(status) = forced_status.filter(|s| *s != GRPC_OK) {
        return grpc_trailers_only(backend, status, "x-echo-grpc-status");
    }
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert(GRPC_STATUS, HeaderValue::from(GRPC_OK));
    let mut response = Response::new(EchoBody::Grpc { data: Some(body), trailers: Some(trailers) });
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(X_BACKEND, backend.name_header.clone());
    response
}

/// Reads a length-prefixed gRPC request body and checks its framing.
async fn read_grpc_body(mut body: Incoming) -> Result<Bytes, (u32, &'static str)> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| (GRPC_INTERNAL, "request body failed"))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > GRPC_MAX_MESSAGE + 5 {
                return Err((GRPC_RESOURCE_EXHAUSTED, "request message too large"));
            }
            buf.extend_from_slice(&data);
        }
    }
    let mut rest = &buf[..];
    while !rest.is_empty() {
        let Some(header) = rest.get(..5) else {
            return Err((GRPC_INTERNAL, "truncated gRPC message header"));
        };
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        rest = rest.get(5 + len..).ok_or((GRPC_INTERNAL, "truncated gRPC message"))?;
    }
    Ok(buf.freeze())
}

fn grpc_trailers_only(backend: &Backend, status: u32, message: &str) -> Response<EchoBody> {
    let mut response = Response::new(EchoBody::Full(None));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(X_BACKEND, backend.name_header.clone());
    headers.insert(GRPC_STATUS, HeaderValue::from(status));
    if let Ok(message) = HeaderValue::from_str(message) {
        headers.insert(GRPC_MESSAGE, message);
    }
    response
}

/// Response bodies of the backend. One enum instead of a boxed body keeps the benchmark path
/// free of allocations and dynamic dispatch.
enum EchoBody {
    /// A single chunk (or none).
    Full(Option<Bytes>),
    /// A gRPC message followed by trailers.
    Grpc { data: Option<Bytes>, trailers: Option<HeaderMap> },
    /// `/stream/<n>`: n newline-delimited JSON chunks, each its own data frame.
    Chunks { next: usize, total: usize, name: &'static str },
    /// `/echo`: the request body itself.
    Echo(Incoming),
}

impl Body for EchoBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            EchoBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            EchoBody::Grpc { data, trailers } => {
                if let Some(data) = data.take() {
                    Poll::Ready(Some(Ok(Frame::data(data))))
                } else {
                    Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
                }
            }
            EchoBody::Chunks { next, total, name } => {
                if *next >= *total {
                    return Poll::Ready(None);
                }
                let mut line = String::with_capacity(48 + name.len());
                // Writing to a String cannot fail.
                let _ = writeln!(line, "{}", serde_json::json!({ "backend": name, "chunk": *next }));
                *next += 1;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(line)))))
            }
            EchoBody::Echo(incoming) => Pin::new(incoming).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            EchoBody::Full(data) => data.is_none(),
            EchoBody::Grpc { data, trailers } => data.is_none() && trailers.is_none(),
            EchoBody::Chunks { next, total, .. } => next >= total,
            EchoBody::Echo(incoming) => incoming.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            // Exact sizes let HTTP/1.1 use content-length instead of chunked encoding.
            EchoBody::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            EchoBody::Echo(incoming) => incoming.size_hint(),
            EchoBody::Grpc { .. } | EchoBody::Chunks { .. } => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_are_found_anywhere_in_the_path_and_combine() {
        let d = Directives::parse("/api/v1/delay/50/status/503", None).unwrap();
        assert_eq!(d.status, Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(d.delay, Some(Duration::from_millis(50)));
        assert!(!d.echo);
    }

    #[test]
    fn keywords_without_numbers_are_plain_segments() {
        let d = Directives::parse("/status/page/delay", None).unwrap();
        assert_eq!(d.status, None);
        assert_eq!(d.delay, None);
    }

    #[test]
    fn informational_and_out_of_range_statuses_are_rejected() {
        assert!(Directives::parse("/status/101", None).is_err());
        assert!(Directives::parse("/status/1000", None).is_err());
        assert!(Directives::parse("/delay/600001", None).is_err());
    }

    #[test]
    fn headers_directive_applies_percent_decoded_set_parameters() {
        let d = Directives::parse("/headers", Some("a=1&set=x-one:v%201&set=x-two:%3Aok")).unwrap();
        let set: Vec<_> = d.set_headers.iter().map(|(n, v)| (n.as_str(), v.to_str().unwrap())).collect();
        assert_eq!(set, vec![("x-one", "v 1"), ("x-two", ":ok")]);
        // Without the `headers` segment, `set=` is an ordinary query parameter.
        assert!(Directives::parse("/", Some("set=x:y")).unwrap().set_headers.is_empty());
        assert!(Directives::parse("/headers", Some("set=novalue")).is_err());
        assert!(Directives::parse("/headers", Some("set=x:%zz")).is_err());
    }

    #[test]
    fn fixed_body_is_padded_json_of_the_exact_size() {
        let body = fixed_body("bench-backend", 256);
        assert_eq!(body.len(), 256);
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed["backend"], "bench-backend");
        assert_eq!(fixed_body("bench-backend", 4).as_ref(), b"xxxx");
        assert!(fixed_body("n", 0).is_empty());
    }
}
