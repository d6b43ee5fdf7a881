//! The processes the fast-path tests place in other cgroups and network namespaces: this test
//! binary started again on its `fastpath_child` entry point, with a JSON role in
//! [`super::CHILD_ENV`]. Clients are ordinary programs that know nothing of the fast path: they
//! connect to a Service VIP with tokio (non-blocking sockets, as spliced workloads must use)
//! and print one result line, `CHILD-RESULT {json}`.
//!
//! Their sockets read until `EAGAIN` ([`Conn`]). tokio's own `TcpStream` takes a short read
//! for an empty socket, which a spliced socket whose peer fell back to TCP contradicts; with
//! it, the integrity run stalled in about one run in ten (see
//! `sluice_proxy::fastpath::FastPathStream`).
//!
//! Roles:
//! - `backend {bind}`: an HTTP/1.1 + h2c server that answers every request with its body,
//!   unchanged, and the route's header in `x-seen-route`; prints `LISTENING <addr>` and serves
//!   until its stdin closes.
//! - `get {vip, path}`: one raw HTTP/1.1 request with `connection: close` on one connection;
//!   reports the peer and local addresses, the exact bytes sent and received, and the response.
//! - `integrity {vip, sizes, seed}`: every size as a POST body, echoed back and compared byte
//!   by byte: over HTTP/1.1 keep-alive (ascending sizes, then on a second connection the
//!   largest first) and as concurrent h2 streams of one connection.
//! - `churn {vip, count, concurrency, sizes, seed, stall_ms}`: `count` connections, one POST
//!   each, `concurrency` at a time; counts stalls (no answer within `stall_ms`), corrupt
//!   echoes and errors.
//! - `flood {vip, cap}`: one POST whose body never ends, written as fast as the socket takes
//!   it; reports how much was written before a write blocked for a second (or `cap` bytes).
//! - `download {vip, size, pause_ms}`: GET of `size` bytes (the backend's `/bytes/<n>`), the
//!   response read from `pause_ms` on; reports whether the whole body arrived within 10 s.

use std::convert::Infallible;
use std::io::BufRead;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use sluice_proxy::fastpath::FastPathStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const RESULT_PREFIX: &str = "CHILD-RESULT ";
pub const LISTENING_PREFIX: &str = "LISTENING ";

/// Runs the role described by `spec` and exits the process.
pub fn run(spec: &str) -> ! {
    let spec: Value = serde_json::from_str(spec).expect("child spec is JSON");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let result = rt.block_on(async {
        match spec["role"].as_str() {
            Some("backend") => backend(&spec).await,
            Some("get") => get(&spec).await,
            Some("integrity") => integrity(&spec).await,
            Some("churn") => churn(&spec).await,
            Some("flood") => flood(&spec).await,
            Some("download") => download(&spec).await,
            other => panic!("unknown child role {other:?}"),
        }
    });
    println!("{RESULT_PREFIX}{result}");
    std::process::exit(0)
}

fn addr(spec: &Value, key: &str) -> SocketAddr {
    spec[key].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("spec has no address {key}: {spec}"))
}

fn sizes(spec: &Value) -> Vec<usize> {
    spec["sizes"].as_array().expect("sizes").iter().filter_map(Value::as_u64).map(|n| n as usize).collect()
}

/// Request body `id` of a run: a hash of each position, so that a reordered, lost or
/// duplicated chunk shows up as a mismatch at a known offset.
pub fn body(seed: u64, id: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|o| ((o ^ (id << 40) ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8).collect()
}

/// `None` when equal, else a description of the first difference.
fn compare(sent: &[u8], got: &[u8]) -> Option<String> {
    if sent == got {
        return None;
    }
    let first = sent.iter().zip(got).position(|(a, b)| a != b).unwrap_or(sent.len().min(got.len()));
    Some(format!("sent {} bytes, got {} back, first difference at offset {first}", sent.len(), got.len()))
}

/// A client connection that reads and writes until the socket says `EAGAIN`.
type Conn = FastPathStream;

/// Connects to `vip`, retrying while nothing listens yet (Sluice binds its listeners right
/// after it applies the configuration).
async fn connect(vip: SocketAddr) -> std::io::Result<Conn> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(vip).await {
            Ok(s) => return Ok(FastPathStream::new(s, true)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// backend

pub async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let seen = req.headers().get(super::ROUTE_HEADER).cloned().unwrap_or_else(|| HeaderValue::from_static("none"));
    if let Some(n) = req.uri().path().strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok()) {
        let mut r = Response::new(Full::new(Bytes::from(body(3, 3, n))));
        r.headers_mut().insert("x-seen-route", seen);
        return Ok(r);
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let mut r = Response::new(Full::new(body));
    r.headers_mut().insert("x-seen-route", seen);
    Ok(r)
}

/// Serves [`echo`] on `listener` (HTTP/1.1 and h2c) until the task is dropped.
pub async fn serve(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(echo))
                .await;
        });
    }
}

async fn backend(spec: &Value) -> Value {
    let bind = addr(spec, "bind");
    let listener = TcpListener::bind(bind).await.expect("binding the backend");
    let local = listener.local_addr().expect("backend address");
    println!("{LISTENING_PREFIX}{local}");
    // Serve until the parent closes our stdin (or kills us).
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        for _ in std::io::stdin().lock().lines() {}
        let _ = tx.send(());
    });
    tokio::select! {
        _ = serve(listener) => {}
        _ = rx => {}
    }
    json!({"served": local.to_string()})
}

// ---------------------------------------------------------------------------------------------
// get

async fn get(spec: &Value) -> Value {
    let vip = addr(spec, "vip");
    let path = spec["path"].as_str().unwrap_or("/");
    let result = async {
        let mut s = connect(vip).await?;
        let peer = s.get_ref().peer_addr()?;
        let local = s.get_ref().local_addr()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nhost: web\r\nuser-agent: plain-client\r\nconnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut response))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no complete response within 10 s"))??;
        Ok::<_, std::io::Error>(json!({
            "peer": peer.to_string(),
            "local": local.to_string(),
            "sent": request.len(),
            "received": response.len(),
            "response": String::from_utf8_lossy(&response),
        }))
    }
    .await;
    result.unwrap_or_else(|e| json!({"error": e.to_string()}))
}

// ---------------------------------------------------------------------------------------------
// integrity

async fn post(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    path: &str,
    data: Vec<u8>,
) -> Result<Vec<u8>, String> {
    sender.ready().await.map_err(|e| format!("connection lost: {e}"))?;
    let req =
        Request::post(path).header("host", "web").body(Full::new(Bytes::from(data))).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| format!("request failed: {e}"))?;
    check_route(resp).await
}

async fn check_route(resp: Response<Incoming>) -> Result<Vec<u8>, String> {
    let status = resp.status();
    let seen = resp.headers().get("x-seen-route").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let bytes = resp.into_body().collect().await.map_err(|e| format!("response body: {e}"))?.to_bytes();
    if status != 200 {
        return Err(format!("status {status}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(200)])));
    }
    if seen != super::ROUTE_VALUE {
        return Err(format!("the backend saw {:?} in {}, not the route's value", seen, super::ROUTE_HEADER));
    }
    Ok(bytes.to_vec())
}

/// How long one request of the integrity run may take before it counts as a stall.
const STALL: Duration = Duration::from_secs(8);

/// HTTP/1.1 keep-alive: every size in `order` on one connection.
async fn h1_run(vip: SocketAddr, seed: u64, order: &[(u64, usize)], peers: &mut Vec<String>) -> (u64, Vec<String>) {
    let mut bad = Vec::new();
    let stream = match connect(vip).await {
        Ok(s) => s,
        Err(e) => return (0, vec![format!("connect: {e}")]),
    };
    peers.push(stream.get_ref().peer_addr().map(|p| p.to_string()).unwrap_or_default());
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(x) => x,
        Err(e) => return (0, vec![format!("handshake: {e}")]),
    };
    tokio::spawn(conn);
    let mut ok = 0;
    for &(id, size) in order {
        let data = body(seed, id, size);
        match tokio::time::timeout(STALL, post(&mut sender, &format!("/h1/{size}"), data.clone())).await {
            Ok(Ok(got)) => match compare(&data, &got) {
                None => ok += 1,
                Some(d) => bad.push(format!("h1 {size}: {d}")),
            },
            Ok(Err(e)) => bad.push(format!("h1 {size}: {e}")),
            Err(_) => {
                bad.push(format!("h1 {size}: stalled (no complete answer within {STALL:?})"));
                break;
            }
        }
    }
    (ok, bad)
}

async fn integrity(spec: &Value) -> Value {
    let vip = addr(spec, "vip");
    let seed = spec["seed"].as_u64().unwrap_or(1);
    let sizes = sizes(spec);
    let mut peers = Vec::new();
    let ascending: Vec<(u64, usize)> = sizes.iter().enumerate().map(|(i, s)| (i as u64, *s)).collect();
    let mut largest_first = ascending.clone();
    largest_first.sort_by_key(|(_, s)| std::cmp::Reverse(*s));
    let (ok1, bad1) = h1_run(vip, seed, &ascending, &mut peers).await;
    let (ok2, bad2) = h1_run(vip, seed ^ 0xff, &largest_first, &mut peers).await;

    // h2: every size as a concurrent stream of one connection.
    let mut h2_bad = Vec::new();
    let mut h2_ok = 0u64;
    match connect(vip).await {
        Err(e) => h2_bad.push(format!("h2 connect: {e}")),
        Ok(stream) => {
            peers.push(stream.get_ref().peer_addr().map(|p| p.to_string()).unwrap_or_default());
            match hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await {
                Err(e) => h2_bad.push(format!("h2 handshake: {e}")),
                Ok((sender, conn)) => {
                    tokio::spawn(conn);
                    let mut tasks = Vec::new();
                    for (id, size) in ascending.iter().copied() {
                        let mut sender = sender.clone();
                        tasks.push(tokio::spawn(async move {
                            tokio::time::timeout(STALL, async move {
                                let data = body(seed ^ 0x4832, id, size);
                                let req = Request::post(format!("/h2/{size}"))
                                    .header("host", "web")
                                    .body(Full::new(Bytes::from(data.clone())))
                                    .map_err(|e| e.to_string())?;
                                let resp = sender.send_request(req).await.map_err(|e| format!("h2 {size}: {e}"))?;
                                let got = check_route(resp).await.map_err(|e| format!("h2 {size}: {e}"))?;
                                match compare(&data, &got) {
                                    None => Ok(()),
                                    Some(d) => Err(format!("h2 {size}: {d}")),
                                }
                            })
                            .await
                            .unwrap_or_else(|_| {
                                Err(format!("h2 {size}: stalled (no complete answer within {STALL:?})"))
                            })
                        }));
                    }
                    for t in tasks {
                        match t.await {
                            Ok(Ok(())) => h2_ok += 1,
                            Ok(Err(e)) => h2_bad.push(e),
                            Err(e) => h2_bad.push(format!("h2 task: {e}")),
                        }
                    }
                }
            }
        }
    }
    json!({
        "h1_ok": ok1 + ok2,
        "h1_bad": bad1.into_iter().chain(bad2).collect::<Vec<_>>(),
        "h2_ok": h2_ok,
        "h2_bad": h2_bad,
        "peers": peers,
    })
}

// ---------------------------------------------------------------------------------------------
// churn

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    stalls: AtomicU64,
    corrupt: AtomicU64,
    errors: AtomicU64,
    not_vip: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Tally {
    fn error(&self, counter: &AtomicU64, e: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        first.get_or_insert(e);
    }
}

/// One connection of the churn: connect, POST, compare the echo, close.
async fn one(vip: SocketAddr, data: Vec<u8>, stall: Duration, tally: &Tally) {
    let exchange = async {
        let stream = TcpStream::connect(vip).await.map_err(|e| format!("connect: {e}"))?;
        if stream.peer_addr().ok() != Some(vip) {
            tally.not_vip.fetch_add(1, Ordering::Relaxed);
        }
        let stream = FastPathStream::new(stream, true);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let req = Request::post("/churn")
            .header("host", "web")
            .header("connection", "close")
            .body(Full::new(Bytes::from(data.clone())))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        check_route(resp).await
    };
    match tokio::time::timeout(stall, exchange).await {
        Err(_) => tally.error(&tally.stalls, format!("stall: no answer within {stall:?} ({} bytes)", data.len())),
        Ok(Err(e)) => tally.error(&tally.errors, e),
        Ok(Ok(got)) => match compare(&data, &got) {
            None => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            Some(d) => tally.error(&tally.corrupt, d),
        },
    }
}

async fn churn(spec: &Value) -> Value {
    let vip = addr(spec, "vip");
    let count = spec["count"].as_u64().unwrap_or(1);
    let concurrency = spec["concurrency"].as_u64().unwrap_or(1);
    let seed = spec["seed"].as_u64().unwrap_or(1);
    let stall = Duration::from_millis(spec["stall_ms"].as_u64().unwrap_or(5000));
    let sizes = Arc::new(sizes(spec));
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (tally, next, sizes) = (tally.clone(), next.clone(), sizes.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let data = body(seed, i, sizes[i as usize % sizes.len()]);
                one(vip, data, stall, &tally).await;
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let first_error = tally.first_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    json!({
        "ok": tally.ok.load(Ordering::Relaxed),
        "stalls": tally.stalls.load(Ordering::Relaxed),
        "corrupt": tally.corrupt.load(Ordering::Relaxed),
        "errors": tally.errors.load(Ordering::Relaxed),
        "not_vip": tally.not_vip.load(Ordering::Relaxed),
        "first_error": first_error,
        "seconds": start.elapsed().as_secs_f64(),
    })
}

// ---------------------------------------------------------------------------------------------
// flood

async fn flood(spec: &Value) -> Value {
    let vip = addr(spec, "vip");
    let cap = spec["cap"].as_u64().unwrap_or(256 << 20);
    let result = async {
        let mut s = connect(vip).await?;
        let head = format!("POST /flood HTTP/1.1\r\nhost: web\r\ncontent-length: {}\r\n\r\n", 1u64 << 40);
        s.write_all(head.as_bytes()).await?;
        let chunk = vec![0x5au8; 64 * 1024];
        let mut written = 0u64;
        let start = Instant::now();
        let mut blocked = false;
        while written < cap {
            match tokio::time::timeout(Duration::from_secs(1), s.write_all(&chunk)).await {
                Ok(r) => r?,
                Err(_) => {
                    blocked = true;
                    break;
                }
            }
            written += chunk.len() as u64;
        }
        Ok::<_, std::io::Error>(json!({
            "written": written,
            "blocked": blocked,
            "seconds": start.elapsed().as_secs_f64(),
            "peer": s.get_ref().peer_addr()?.to_string(),
        }))
    }
    .await;
    result.unwrap_or_else(|e| json!({"error": e.to_string()}))
}

// ---------------------------------------------------------------------------------------------
// download

async fn download(spec: &Value) -> Value {
    let vip = addr(spec, "vip");
    let size = spec["size"].as_u64().unwrap_or(1 << 20);
    let pause = Duration::from_millis(spec["pause_ms"].as_u64().unwrap_or(0));
    let result = async {
        let stream = connect(vip).await?;
        let fetch = async move {
            let req = Request::get(format!("/bytes/{size}")).header("host", "web").body(Full::new(Bytes::new()));
            let req = req.map_err(|e| e.to_string())?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            // hyper stops reading the body until it is polled: Sluice's bytes queue meanwhile.
            tokio::time::sleep(pause).await;
            check_route(resp).await.map(|b| b.len())
        };
        let (stalled, received, error) = match tokio::time::timeout(Duration::from_secs(10), fetch).await {
            Err(_) => (true, 0, None),
            Ok(Ok(n)) => (false, n, None),
            Ok(Err(e)) => (false, 0, Some(e)),
        };
        Ok::<_, std::io::Error>(json!({"received": received, "stalled": stalled, "fetch_error": error}))
    }
    .await;
    result.unwrap_or_else(|e| json!({"error": e.to_string()}))
}
