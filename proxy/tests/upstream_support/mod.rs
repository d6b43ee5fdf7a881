//! Shared helpers for the `upstream_*` integration tests: cluster configurations and real
//! backends on 127.0.0.1 (hyper HTTP/1.1 and HTTP/2 servers, a raw TCP server that closes
//! connections on purpose, TLS with certificates made by the `openssl` tool).

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_config::Snapshot;
use sluice_config::model::{
    CircuitBreakers, Cluster, Discovery, DnsLookupFamily, Endpoint, EndpointAddress, EndpointHealth, Http2Options,
    LbPolicy, OutlierDetection, UpstreamProtocol,
};
use sluice_proxy::body::{self, Body};
use sluice_proxy::upstream::{ClusterManager, ClusterRuntime, NoHooks, UpstreamBody, UpstreamHooks};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint {
        address: EndpointAddress::Socket(addr),
        weight: 1,
        health: EndpointHealth::Healthy,
        priority: 0,
        hostname: None,
    }
}

pub fn cluster(name: &str, endpoints: Vec<Endpoint>) -> Cluster {
    Cluster {
        name: name.to_string(),
        source: "test/upstream".into(),
        discovery: Discovery::Static,
        connect_timeout: Duration::from_secs(2),
        lb_policy: LbPolicy::RoundRobin,
        endpoints,
        circuit_breakers: CircuitBreakers {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
            explicit: false,
        },
        outlier_detection: None,
        protocol: UpstreamProtocol::Http1,
        http2: Http2Options::default(),
        idle_timeout: None,
        max_requests_per_connection: None,
        max_connection_duration: None,
        tls: None,
        dns_lookup_family: DnsLookupFamily::V4Only,
        dns_refresh_rate: Duration::from_secs(5),
        per_connection_buffer_limit_bytes: 1 << 20,
        healthy_panic_threshold: 50.0,
        close_connections_on_host_set_change: false,
    }
}

pub fn outlier_detection() -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx: 5,
        consecutive_gateway_failure: 5,
        consecutive_local_origin_failure: 5,
        enforcing_consecutive_5xx: 100,
        enforcing_consecutive_gateway_failure: 0,
        enforcing_consecutive_local_origin_failure: 100,
        split_external_local_origin_errors: false,
        interval: Duration::from_secs(10),
        base_ejection_time: Duration::from_secs(30),
        max_ejection_time: Duration::from_secs(300),
        max_ejection_percent: 100,
        success_rate_minimum_hosts: 5,
    }
}

pub fn snapshot(clusters: Vec<Cluster>) -> Snapshot {
    Snapshot { clusters: clusters.into_iter().map(|c| (c.name.clone(), Arc::new(c))).collect(), ..Default::default() }
}

/// A manager holding `cluster`, and its runtime.
pub fn runtime_with(cluster: Cluster, hooks: Arc<dyn UpstreamHooks>) -> (Arc<ClusterManager>, Arc<ClusterRuntime>) {
    let name = cluster.name.clone();
    let manager = ClusterManager::new(hooks);
    manager.update(&snapshot(vec![cluster]));
    let rt = manager.get(&name).expect("cluster installed");
    (manager, rt)
}

pub fn runtime(cluster: Cluster) -> (Arc<ClusterManager>, Arc<ClusterRuntime>) {
    runtime_with(cluster, Arc::new(NoHooks))
}

pub fn get(authority: &str, path: &str) -> Request<Body> {
    Request::builder().uri(path).header(http::header::HOST, authority).body(body::empty()).expect("valid request")
}

pub async fn read_body(resp: Response<UpstreamBody>) -> (StatusCode, http::HeaderMap, Bytes) {
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (parts.status, parts.headers, bytes)
}

/// Counters of a test backend.
#[derive(Default)]
pub struct Counters {
    pub accepted: AtomicUsize,
    pub closed: AtomicUsize,
    pub requests: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    /// Signalled whenever a connection closes.
    pub closed_signal: Notify,
    /// Signalled whenever a request arrives.
    pub request_signal: Notify,
}

impl Counters {
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `n` connections were closed.
    pub async fn wait_closed(&self, n: usize, limit: Duration) -> bool {
        tokio::time::timeout(limit, async {
            loop {
                let signal = self.closed_signal.notified();
                if self.closed() >= n {
                    return;
                }
                signal.await;
            }
        })
        .await
        .is_ok()
    }

    /// Waits (bounded) until `n` requests arrived.
    pub async fn wait_requests(&self, n: usize, limit: Duration) -> bool {
        tokio::time::timeout(limit, async {
            loop {
                let signal = self.request_signal.notified();
                if self.requests() >= n {
                    return;
                }
                signal.await;
            }
        })
        .await
        .is_ok()
    }
}

/// How a hyper backend answers.
#[derive(Clone)]
pub struct Behaviour {
    pub status: StatusCode,
    pub delay: Duration,
    /// Body size in bytes (sent in 16 KiB chunks); 0 means the text "ok".
    pub body_len: usize,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour { status: StatusCode::OK, delay: Duration::ZERO, body_len: 0 }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Proto {
    H1,
    H2,
    /// HTTP/1.1 or h2c prior knowledge, detected per connection.
    Auto,
}

/// A hyper server on 127.0.0.1. Responses carry `x-conn` (the connection's index, from 1),
/// `x-version` (the request's HTTP version) and `x-authority` (host or :authority seen).
pub async fn backend(proto: Proto, behaviour: Behaviour) -> (SocketAddr, Arc<Counters>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let counters = Arc::new(Counters::default());
    let c = counters.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let conn_id = c.accepted.fetch_add(1, Ordering::SeqCst) + 1;
            let c = c.clone();
            let behaviour = behaviour.clone();
            tokio::spawn(async move {
                let counters = c.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    let c = counters.clone();
                    let b = behaviour.clone();
                    async move { Ok::<_, Infallible>(respond(req, conn_id, &c, &b).await) }
                });
                let io = TokioIo::new(stream);
                let _served = match proto {
                    Proto::H1 => hyper::server::conn::http1::Builder::new().serve_connection(io, service).await.is_ok(),
                    Proto::H2 => hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await
                        .is_ok(),
                    Proto::Auto => hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await
                        .is_ok(),
                };
                c.closed.fetch_add(1, Ordering::SeqCst);
                c.closed_signal.notify_waiters();
            });
        }
    });
    (addr, counters)
}

async fn respond(req: Request<Incoming>, conn_id: usize, c: &Counters, b: &Behaviour) -> Response<Body> {
    c.requests.fetch_add(1, Ordering::SeqCst);
    let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    c.max_in_flight.fetch_max(now, Ordering::SeqCst);
    c.request_signal.notify_waiters();
    let version = format!("{:?}", req.version());
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| req.headers().get("host").and_then(|h| h.to_str().ok()).map(str::to_string))
        .unwrap_or_default();
    let _ = req.into_body().collect().await;
    if !b.delay.is_zero() {
        tokio::time::sleep(b.delay).await;
    }
    c.in_flight.fetch_sub(1, Ordering::SeqCst);
    let body = if b.body_len == 0 {
        body::full("ok")
    } else {
        let chunks: Vec<Result<http_body::Frame<Bytes>, body::BoxError>> = (0..b.body_len.div_ceil(16384))
            .map(|i| {
                let len = (b.body_len - i * 16384).min(16384);
                Ok(http_body::Frame::data(Bytes::from(vec![b'x'; len])))
            })
            .collect();
        body::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(chunks)))
    };
    Response::builder()
        .status(b.status)
        .header("x-conn", conn_id.to_string())
        .header("x-version", version)
        .header("x-authority", authority)
        .body(body)
        .expect("valid response")
}

/// A raw HTTP/1.1 backend that answers every request with `200 ok` (keep-alive, no
/// `Connection: close`) and then, after `close_after`, closes the connection with a FIN:
/// what a backend with a short keep-alive timeout, or a restarting pod, does.
pub async fn closing_backend(close_after: Duration) -> (SocketAddr, Arc<Counters>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let counters = Arc::new(Counters::default());
    let c = counters.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let conn_id = c.accepted.fetch_add(1, Ordering::SeqCst) + 1;
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // One request per connection is all this backend serves.
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                if !buf.is_empty() {
                    c.requests.fetch_add(1, Ordering::SeqCst);
                    c.request_signal.notify_waiters();
                    let response = format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-conn: {conn_id}\r\n\r\nok");
                    let _ = stream.write_all(response.as_bytes()).await;
                    if !close_after.is_zero() {
                        tokio::time::sleep(close_after).await;
                    }
                }
                let _ = stream.shutdown().await;
                drop(stream);
                c.closed.fetch_add(1, Ordering::SeqCst);
                c.closed_signal.notify_waiters();
            });
        }
    });
    (addr, counters)
}

/// [`closing_backend`] on its own thread and runtime, so that it can close connections while
/// the test's runtime is blocked (and hyper cannot notice the FIN before the pool does).
pub fn closing_backend_on_thread(close_after: Duration) -> (SocketAddr, Arc<Counters>) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async move {
            let started = closing_backend(close_after).await;
            if tx.send(started).is_err() {
                return;
            }
            // Serve until the test process exits.
            std::future::pending::<()>().await;
        });
    });
    rx.recv().expect("backend thread started")
}

/// An address on 127.0.0.1 where nothing listens (connects are refused).
pub fn refused_addr() -> SocketAddr {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = socket.local_addr().expect("addr");
    drop(socket);
    addr
}

/// Certificates made with the `openssl` command: a CA and a `localhost` leaf it signed.
pub struct TestCerts {
    pub ca_der: Vec<u8>,
    pub leaf_der: Vec<u8>,
    pub leaf_key_der: Vec<u8>,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `None` (with a loud message) when the `openssl` tool is not available.
pub fn make_certs() -> Option<TestCerts> {
    let dir =
        std::env::temp_dir().join(format!("sluice-upstream-tls-{}-{}", std::process::id(), rand::random::<u64>()));
    std::fs::create_dir_all(&dir).ok()?;
    let dir = TempDir(dir);
    let d = |f: &str| dir.0.join(f).to_string_lossy().into_owned();
    let ext = d("leaf.ext");
    std::fs::write(&ext, "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n").ok()?;
    let steps: Vec<Vec<String>> = vec![
        vec![
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &d("ca.key"),
            "-out",
            &d("ca.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=sluice-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
        vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &d("leaf.key"),
            "-out",
            &d("leaf.csr"),
            "-subj",
            "/CN=localhost",
        ],
        vec![
            "x509",
            "-req",
            "-in",
            &d("leaf.csr"),
            "-CA",
            &d("ca.pem"),
            "-CAkey",
            &d("ca.key"),
            "-CAcreateserial",
            "-out",
            &d("leaf.pem"),
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
        vec!["x509", "-in", &d("ca.pem"), "-outform", "DER", "-out", &d("ca.der")],
        vec!["x509", "-in", &d("leaf.pem"), "-outform", "DER", "-out", &d("leaf.der")],
        vec!["pkcs8", "-topk8", "-nocrypt", "-in", &d("leaf.key"), "-outform", "DER", "-out", &d("leaf.key.der")],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect();
    for args in steps {
        match std::process::Command::new("openssl").args(&args).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                eprintln!(
                    "SKIPPING TLS TEST: `openssl {}` failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
                return None;
            }
            Err(e) => {
                eprintln!("SKIPPING TLS TEST: the `openssl` command is not available ({e}); install openssl to run it");
                return None;
            }
        }
    }
    Some(TestCerts {
        ca_der: std::fs::read(d("ca.der")).ok()?,
        leaf_der: std::fs::read(d("leaf.der")).ok()?,
        leaf_key_der: std::fs::read(d("leaf.key.der")).ok()?,
        _dir: dir,
    })
}

pub fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Upstream hooks that trust the test CA.
pub struct TrustTestCa {
    pub config: Arc<rustls::ClientConfig>,
}

impl TrustTestCa {
    pub fn new(certs: &TestCerts) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from(certs.ca_der.clone())).expect("CA");
        let config = rustls::ClientConfig::builder_with_provider(crypto())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        TrustTestCa { config: Arc::new(config) }
    }
}

impl UpstreamHooks for TrustTestCa {
    fn tls_client_config(&self, _tls: &sluice_config::model::UpstreamTls) -> Result<Arc<rustls::ClientConfig>, String> {
        Ok(self.config.clone())
    }
}

/// A TLS backend offering `alpn`; serves HTTP/2 or HTTP/1.1 by the negotiated protocol.
/// Responses carry `x-version` and `x-alpn`.
pub async fn tls_backend(certs: &TestCerts, alpn: &[&[u8]]) -> (SocketAddr, Arc<Counters>) {
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certs.leaf_key_der.clone().into());
    let chain = vec![rustls::pki_types::CertificateDer::from(certs.leaf_der.clone())];
    let mut config = rustls::ServerConfig::builder_with_provider(crypto())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server cert");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let counters = Arc::new(Counters::default());
    let c = counters.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let conn_id = c.accepted.fetch_add(1, Ordering::SeqCst) + 1;
            let c = c.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let alpn = tls.get_ref().1.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
                let h2 = alpn.as_deref() == Some("h2");
                let counters = c.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    let c = counters.clone();
                    let alpn = alpn.clone().unwrap_or_default();
                    async move {
                        let b = Behaviour { delay: Duration::from_millis(50), ..Default::default() };
                        let mut resp = respond(req, conn_id, &c, &b).await;
                        resp.headers_mut().insert("x-alpn", alpn.parse().expect("header"));
                        Ok::<_, Infallible>(resp)
                    }
                });
                let io = TokioIo::new(tls);
                let _ = if h2 {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, service).await
                } else {
                    hyper::server::conn::http1::Builder::new().serve_connection(io, service).await
                };
                c.closed.fetch_add(1, Ordering::SeqCst);
                c.closed_signal.notify_waiters();
            });
        }
    });
    (addr, counters)
}

pub fn header(headers: &http::HeaderMap, name: &str) -> String {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

/// A full body of `n` bytes, for requests with a payload.
pub fn payload(n: usize) -> Body {
    body::boxed(Full::new(Bytes::from(vec![b'p'; n])))
}
