//! Test support: a real `sluice` process on a temporary config directory, real backends, and
//! small clients. Everything listens on 127.0.0.1.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The first of `len` consecutive free ports for a Sluice instance's `--proxy-port-range`.
///
/// Each instance needs its own block: listeners bind with SO_REUSEPORT, so two instances on the
/// same ports would silently split each other's traffic. Blocks lie below the kernel's
/// ephemeral range, so outgoing connections of other tests never take them, and a
/// process-wide counter keeps parallel tests of one binary apart before either has bound.
pub fn proxy_port_block(len: u16) -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768);
    let (lo, hi) = (3000u16, ephemeral.clamp(3000 + 2 * len, 32768));
    let blocks = usize::from((hi - lo) / len);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let seed = (std::process::id() as usize).wrapping_mul(31).wrapping_add(nanos as usize);
    for _ in 0..blocks {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let first = lo + ((seed.wrapping_add(n.wrapping_mul(7919)) % blocks) as u16) * len;
        // A port someone listens on (with or without SO_REUSEPORT) refuses a plain bind.
        if (first..first + len).all(|p| StdListener::bind(("127.0.0.1", p)).is_ok()) {
            return first;
        }
    }
    panic!("no {len} consecutive free ports between {lo} and {hi}");
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A running `sluice run --config DIR`.
pub struct Sluice {
    child: Child,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Sluice {
    /// Writes `files` into a fresh directory and starts Sluice on it with one worker.
    pub fn start(files: &[(&str, &str)]) -> Sluice {
        Sluice::start_with(files, &[])
    }

    pub fn start_with(files: &[(&str, &str)], extra: &[&str]) -> Sluice {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).expect("write config");
        }
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let lo = proxy_port_block(20);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.args(["run", "--config"])
            .arg(dir.path())
            .args(["--workers", "1", "--no-health-metrics", "--admin-address", &admin.to_string()])
            .args(["--proxy-port-range", &format!("{lo}-{}", lo + 19)])
            .args(extra)
            .env("SLUICE_LOG", std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(if std::env::var("SLUICE_TEST_LOG").is_ok() { Stdio::inherit() } else { Stdio::null() });
        let child = cmd.spawn().expect("spawn sluice");
        let s = Sluice { child, admin, dir };
        s.wait_ready();
        s
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(body) = blocking_get(self.admin, "/ready")
                && body.0 == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("sluice did not become ready");
    }

    /// Replaces a config file (atomically, by rename, like editors and Kubernetes do).
    pub fn write(&self, name: &str, content: &str) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).expect("write");
        std::fs::rename(&tmp, self.dir.path().join(name)).expect("rename");
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn admin_get(&self, path: &str) -> (u16, String) {
        blocking_get(self.admin, path).expect("admin request")
    }

    /// The first IPv4 address of a listener, by qualified name.
    pub fn listener(&self, name: &str) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, body) = self.admin_get("/listeners");
            let v: serde_json::Value = serde_json::from_str(&body).expect("listeners json");
            if let Some(addr) = v.as_array().into_iter().flatten().find(|l| l["name"] == name).and_then(|l| {
                l["addresses"]
                    .as_array()
                    .and_then(|a| a.iter().filter_map(|x| x.as_str()).find(|x| !x.starts_with('[')))
            }) {
                // Listed is not yet bound: wait until the workers accept on it.
                let addr: SocketAddr = addr.parse().expect("address");
                while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                    assert!(Instant::now() < deadline, "listener {name} at {addr} never accepted");
                    std::thread::sleep(Duration::from_millis(10));
                }
                return addr;
            }
            assert!(Instant::now() < deadline, "listener {name} not found in {body}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn config_dump(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_get("/config_dump").1).expect("config_dump json")
    }

    pub fn generation(&self) -> u64 {
        self.config_dump()["generation"].as_u64().unwrap_or(0)
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET with a fresh connection; returns (status, body).
pub fn blocking_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// What a backend saw, as JSON in its response body.
pub type Seen = serde_json::Value;

/// A real hyper backend (HTTP/1.1 and h2c) that answers with JSON describing the request.
/// `behaviour` may override the response per request.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub hits: Arc<AtomicUsize>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

/// What a backend does with its n-th request (1-based).
pub enum Reply {
    /// Answer with the JSON echo.
    Echo,
    Respond(Response<Full<Bytes>>),
    /// Read the whole request body first, as a real (gRPC) server does, then answer.
    RespondAfterBody(Response<Full<Bytes>>),
    /// Wait, then echo.
    Delay(Duration),
}

pub type Behaviour = Arc<dyn Fn(&Request<Incoming>, usize) -> Reply + Send + Sync>;

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Backend::start_with(name, Arc::new(|_, _| Reply::Echo)).await
    }

    pub async fn start_with(name: &str, behaviour: Behaviour) -> Backend {
        Backend::start_on("127.0.0.1:0".parse().unwrap(), name, behaviour).await
    }

    pub async fn start_on(addr: SocketAddr, name: &str, behaviour: Behaviour) -> Backend {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind backend");
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let name_s = name.to_string();
        let h = hits.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    r = listener.accept() => {
                        let Ok((stream, peer)) = r else { continue };
                        let name = name_s.clone();
                        let hits = h.clone();
                        let behaviour = behaviour.clone();
                        tokio::spawn(async move {
                            let svc = service_fn(move |req: Request<Incoming>| {
                                let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
                                let name = name.clone();
                                let behaviour = behaviour.clone();
                                let reply = behaviour(&req, n);
                                async move {
                                    match reply {
                                        Reply::Respond(r) => return Ok::<_, Infallible>(r),
                                        Reply::RespondAfterBody(r) => {
                                            let _ = req.into_body().collect().await;
                                            return Ok(r);
                                        }
                                        Reply::Delay(d) => tokio::time::sleep(d).await,
                                        Reply::Echo => {}
                                    }
                                    Ok(echo(&name, peer, req).await)
                                }
                            });
                            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                }
            }
        });
        Backend { addr, name: name.to_string(), hits, shutdown: Some(tx) }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

async fn echo(name: &str, peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut headers = BTreeMap::new();
    for (k, v) in req.headers() {
        headers.insert(k.as_str().to_string(), v.to_str().unwrap_or("").to_string());
    }
    let method = req.method().to_string();
    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let version = format!("{:?}", req.version());
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let v = serde_json::json!({
        "backend": name,
        "method": method,
        "path": path,
        "headers": headers,
        "version": version,
        "body_bytes": body.len(),
        "peer": peer.to_string(),
    });
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    r.headers_mut().insert("content-type", "application/json".parse().unwrap());
    r.headers_mut().insert("x-backend", name.parse().unwrap());
    r
}

pub fn status(code: u16) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(b"")));
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r
}

/// HTTP/1.1 client with keep-alive (one connection reused) or h2c prior knowledge.
pub fn client(
    h2: bool,
) -> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    let mut b = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
    b.http2_only(h2);
    b.build_http()
}

pub async fn get(
    c: &hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = c.request(b.body(Full::new(Bytes::new())).unwrap()).await.expect("request");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    (parts.status, parts.headers, bytes)
}

/// Service + EndpointSlice manifests for a local backend.
pub fn service_yaml(ns: &str, name: &str, backends: &[SocketAddr]) -> String {
    let mut eps = String::new();
    for b in backends {
        eps.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{port}\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nendpoints:\n- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\nports:\n- name: http\n  port: {port}\n  protocol: TCP\n",
            ip = b.ip(),
            port = b.port()
        ));
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  clusterIP: 127.96.1.1\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n{eps}"
    )
}
