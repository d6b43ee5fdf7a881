//! Kubernetes mode end to end: the real `sluice run --kubernetes` binary against the fake API
//! server of `proxy/tests/support_kube` (reached through a KUBECONFIG), under continuous HTTP
//! load. CECs are added, changed, broken and deleted and an EndpointSlice is scaled while four
//! client loops keep requesting two listeners nobody touches (one of them routed to the
//! scaled Service): those loops must not see a single failure, and every change must show up
//! in what Sluice answers. Everything listens on and connects to 127.0.0.0/8.

mod common;
#[path = "../proxy/tests/support_kube/mod.rs"]
mod support_kube;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Backend;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use support_kube::{CECS, ENDPOINTSLICES, EVENTS, FakeApiServer, SERVICES};

/// Namespace of every object.
const NS: &str = "shop";
/// `reportingInstance` of Sluice's Events (`POD_NAME`).
const POD: &str = "sluice-e2e";
/// Backends allowed to answer the two loaded listeners.
const STABLE: &[&str] = &["stable"];
const CANARY: &[&str] = &["a1", "a2"];

// ---------------------------------------------------------------------------------------------
// Objects

fn service(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "type": "ClusterIP",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    })
}

/// The EndpointSlice of Service `svc`: ready endpoints at `ips`, all on `port`.
fn slice(svc: &str, ips: &[&str], port: u16) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{svc}-1"), "namespace": NS,
                     "labels": {"kubernetes.io/service-name": svc,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}]
    })
}

fn router() -> Value {
    json!({"name": "envoy.filters.http.router",
           "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
}

/// An HTTP filter Sluice refuses (Lua is not implemented).
fn lua() -> Value {
    json!({"name": "envoy.filters.http.lua",
           "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                            "default_source_code": {"inline_string": "function envoy_on_request(h) end"}}})
}

fn to_service(prefix: &str, svc: &str) -> Value {
    json!({"match": {"prefix": prefix}, "route": {"cluster": format!("{NS}/{svc}")}})
}

fn direct(prefix: &str, body: &str) -> Value {
    json!({"match": {"prefix": prefix}, "direct_response": {"status": 200, "body": {"inline_string": body}}})
}

fn regex_to_service(regex: &str, svc: &str) -> Value {
    json!({"match": {"safe_regex": {"regex": regex}}, "route": {"cluster": format!("{NS}/{svc}")}})
}

/// A CEC `shop/<name>`: one HTTP listener `<name>` on 127.0.0.1:`port` with `filters`, its
/// route configuration `<name>` with `routes`, and an EDS cluster `shop/<svc>` per backend
/// Service.
fn cec(name: &str, port: u16, filters: &[Value], routes: &[Value], backends: &[&str]) -> Value {
    let mut resources = vec![
        json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": name,
                    "rds": {"route_config_name": name},
                    "http_filters": filters
                }
            }]}]
        }),
        json!({
            "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            "name": name,
            "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]
        }),
    ];
    for svc in backends {
        resources.push(json!({
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": format!("{NS}/{svc}"), "connect_timeout": "2s", "lb_policy": "ROUND_ROBIN", "type": "EDS"
        }));
    }
    let backend_services: Vec<Value> = backends.iter().map(|s| json!({"name": s, "namespace": NS})).collect();
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumEnvoyConfig",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"backendServices": backend_services, "resources": resources}
    })
}

/// Events posted about CEC `shop/<name>`.
fn events_on(api: &FakeApiServer, name: &str) -> Vec<Value> {
    api.objects(&EVENTS)
        .into_iter()
        .filter(|e| e["regarding"]["kind"] == "CiliumEnvoyConfig" && e["regarding"]["name"] == name)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// HTTP

struct Answer {
    status: u16,
    /// `x-backend` of the backend that answered; empty for Sluice's own responses.
    backend: String,
    body: Bytes,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn describe(&self) -> String {
        format!("{} from {:?}: {:?}", self.status, self.backend, self.text())
    }
}

/// One GET, bounded to 5 s; every error is returned as text.
async fn fetch<C>(c: &Client<C, Full<Bytes>>, url: &str) -> Result<Answer, String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let req = Request::get(url).body(Full::new(Bytes::new())).expect("request");
    let exchange = async {
        let resp = c.request(req).await.map_err(|e| format!("{e:?}"))?;
        let status = resp.status().as_u16();
        let backend = resp.headers().get("x-backend").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = resp.into_body().collect().await.map_err(|e| format!("body: {e:?}"))?.to_bytes();
        Ok(Answer { status, backend, body })
    };
    tokio::time::timeout(Duration::from_secs(5), exchange).await.map_err(|_| format!("GET {url}: no answer in 5 s"))?
}

/// A GET on a fresh connection (so that no pooled connection of an earlier configuration
/// answers).
async fn probe(url: &str) -> Result<Answer, String> {
    fetch(&common::client(false), url).await
}

/// Polls `check` every 20 ms until it returns `Ok`, for at most `limit`; panics with the last
/// `Err` (what was seen instead) when time runs out.
async fn eventually<T>(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {limit:?} waiting for {what}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The process

/// A running `sluice run --kubernetes`, its log kept in a file and printed when the test fails
/// (or always, with `SLUICE_TEST_LOG` set to a log filter).
struct KubeSluice {
    child: Mutex<Child>,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl KubeSluice {
    fn start(api: &FakeApiServer, admin_port: u16) -> KubeSluice {
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        let log = std::fs::File::create(dir.path().join("sluice.log")).expect("log file");
        let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.args(["run", "--kubernetes", "--workers", "1", "--no-health-metrics"])
            .args(["--admin-address", &admin.to_string(), "--secrets-namespace", "cilium-secrets"])
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAME", POD)
            .env("SLUICE_LOG", std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "info".into()))
            // Only the kubeconfig: no in-cluster config, no node (so no Node watch), no proxy.
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env_remove("NODE_NAME")
            .env("NO_PROXY", "127.0.0.1")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log);
        for v in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"] {
            cmd.env_remove(v);
        }
        let child = cmd.spawn().expect("spawn sluice");
        KubeSluice { child: Mutex::new(child), admin, dir }
    }

    fn assert_running(&self) {
        let status = self.child.lock().unwrap_or_else(|e| e.into_inner()).try_wait().expect("try_wait");
        assert!(status.is_none(), "sluice exited: {status:?}");
    }

    /// `/ready` answers 200 once the initial sync is done (the first document set applied).
    async fn wait_ready(&self) {
        let c = common::client(false);
        eventually("sluice's /ready", Duration::from_secs(15), async || {
            self.assert_running();
            let a = fetch(&c, &format!("http://{}/ready", self.admin)).await?;
            if a.status == 200 { Ok(()) } else { Err(a.describe()) }
        })
        .await;
    }

    async fn config_dump(&self) -> Value {
        let a = probe(&format!("http://{}/config_dump", self.admin)).await.expect("GET /config_dump");
        assert_eq!(a.status, 200, "/config_dump: {}", a.describe());
        serde_json::from_slice(&a.body).expect("config_dump json")
    }

    /// The `state` of a source (`shop/<name>`) in the running snapshot, `None` if absent.
    async fn source_state(&self, name: &str) -> Option<String> {
        let dump = self.config_dump().await;
        dump["snapshot"]["sources"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == name)
            .map(|s| s["state"].as_str().unwrap_or("?").to_string())
    }
}

impl Drop for KubeSluice {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
        if std::thread::panicking() || std::env::var_os("SLUICE_TEST_LOG").is_some() {
            let log = std::fs::read_to_string(self.dir.path().join("sluice.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- sluice log (last 80 lines) ---");
            for l in &lines[lines.len().saturating_sub(80)..] {
                eprintln!("{l}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Load

/// An `HttpConnector` that counts the connections it opens.
#[derive(Clone)]
struct CountingConnector {
    inner: HttpConnector,
    opened: Arc<AtomicUsize>,
}

impl tower::Service<http::Uri> for CountingConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        self.opened.fetch_add(1, Ordering::Relaxed);
        let connecting = self.inner.call(uri);
        Box::pin(async move { connecting.await.map_err(Into::into) })
    }
}

/// The load's client: HTTP/1.1 keep-alive or h2c, counting its connections, and strict:
/// hyper's default of silently resending a request whose pooled connection was closed
/// before it could be sent is off, so a connection Sluice drops is a failed request.
fn load_client(h2: bool, opened: Arc<AtomicUsize>) -> Client<CountingConnector, Full<Bytes>> {
    let mut b = Client::builder(TokioExecutor::new());
    b.http2_only(h2).retry_canceled_requests(false);
    b.build(CountingConnector { inner: HttpConnector::new(), opened })
}

/// What one client loop saw.
#[derive(Default)]
struct Load {
    ok: AtomicUsize,
    /// Connections the loop's client opened (1 if Sluice never closed one).
    connections: Arc<AtomicUsize>,
    failed: AtomicUsize,
    /// The first few failures, for the assertion message.
    failures: Mutex<Vec<String>>,
    /// When each backend answered first, and how often.
    first_seen: Mutex<BTreeMap<String, Instant>>,
    hits: Mutex<BTreeMap<String, usize>>,
}

impl Load {
    fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    fn first_seen(&self, backend: &str) -> Option<Instant> {
        self.first_seen.lock().unwrap_or_else(|e| e.into_inner()).get(backend).copied()
    }
}

/// A loop of GETs on `url` with one client (HTTP/1.1 keep-alive or h2c), until `stop` or
/// 40 s. An answer other than 200 from one of `expected` is a failure.
fn spawn_load(
    name: &'static str,
    url: String,
    h2: bool,
    expected: &'static [&'static str],
    stop: Arc<AtomicBool>,
) -> (Arc<Load>, tokio::task::JoinHandle<()>) {
    let load = Arc::new(Load::default());
    let l = load.clone();
    let task = tokio::spawn(async move {
        let c = load_client(h2, l.connections.clone());
        let deadline = Instant::now() + Duration::from_secs(40);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let failure = match fetch(&c, &url).await {
                Ok(a) if a.status == 200 && expected.contains(&a.backend.as_str()) => {
                    let now = Instant::now();
                    l.first_seen.lock().unwrap_or_else(|e| e.into_inner()).entry(a.backend.clone()).or_insert(now);
                    *l.hits.lock().unwrap_or_else(|e| e.into_inner()).entry(a.backend).or_default() += 1;
                    l.ok.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Ok(a) => Some(a.describe()),
                Err(e) => Some(e),
            };
            if let Some(f) = failure {
                l.failed.fetch_add(1, Ordering::Relaxed);
                {
                    let mut v = l.failures.lock().unwrap_or_else(|e| e.into_inner());
                    if v.len() < 10 {
                        v.push(format!("{name}: {f}"));
                    }
                }
                // No busy loop if Sluice is gone.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    (load, task)
}

/// Waits until every loop has had `n` more successful requests.
async fn wait_progress(loads: &[(&str, Arc<Load>)], n: usize, after: &str) {
    let base: Vec<usize> = loads.iter().map(|(_, l)| l.ok()).collect();
    eventually(
        &format!("{n} more successful requests on every load loop after {after}"),
        Duration::from_secs(5),
        async || {
            let behind: Vec<String> = loads
                .iter()
                .zip(&base)
                .filter(|((_, l), b)| l.ok() < *b + n)
                .map(|((name, l), b)| format!("{name}: {} of {n}", l.ok() - b))
                .collect();
            if behind.is_empty() { Ok(()) } else { Err(behind.join(", ")) }
        },
    )
    .await;
}

/// `n` distinct ports that are free on 127.0.0.1, from 32000-32767: below the kernel's
/// ephemeral range (32768+), so no outgoing connection takes one before Sluice binds it, and
/// above the ranges `common::Sluice` gives other instances for allocated listeners (which
/// bind with SO_REUSEPORT and would silently share a port).
fn free_ports(n: usize) -> Vec<u16> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let start = (std::process::id().wrapping_mul(7919) ^ nanos) % 768;
    let ports: Vec<u16> = (0..768u32)
        .map(|i| 32000 + ((start + i) % 768) as u16)
        .filter(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .take(n)
        .collect();
    assert_eq!(ports.len(), n, "fewer than {n} free ports in 32000-32767 on 127.0.0.1");
    ports
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cec_and_endpoint_changes_apply_under_load_without_failing_untouched_routes() {
    let started = Instant::now();

    // Backends. `a` scales from a1 (127.0.0.1:P) to a1 + a2 (127.0.0.2:P): one EndpointSlice,
    // one port, a second address.
    let stable = Backend::start("stable").await;
    let a1 = Backend::start("a1").await;
    let a2_addr = SocketAddr::new([127, 0, 0, 2].into(), a1.addr.port());
    let a2 = Backend::start_on(a2_addr, "a2", Arc::new(|_, _| common::Reply::Echo)).await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let [admin_port, stable_port, canary_port, dynamic_port, broken_port] = free_ports(5)[..] else { unreachable!() };

    // The cluster before Sluice starts: two CECs, their Services and EndpointSlices, and the
    // Services the CEC added later will use.
    let api = FakeApiServer::start().await;
    for (svc, backend) in [("stable", &stable), ("a", &a1), ("b", &b), ("c", &c)] {
        api.apply(&SERVICES, service(svc));
        api.apply(&ENDPOINTSLICES, slice(svc, &["127.0.0.1"], backend.addr.port()));
    }
    api.apply(&CECS, cec("stable", stable_port, &[router()], &[to_service("/", "stable")], &["stable"]));
    api.apply(&CECS, cec("canary", canary_port, &[router()], &[to_service("/", "a")], &["a"]));

    let sluice = KubeSluice::start(&api, admin_port);
    sluice.wait_ready().await;
    for (port, backend) in [(stable_port, "stable"), (canary_port, "a1")] {
        eventually(&format!("127.0.0.1:{port} to answer from {backend}"), Duration::from_secs(5), async || {
            let a = probe(&format!("http://127.0.0.1:{port}/warmup")).await?;
            if a.status == 200 && a.backend == backend { Ok(()) } else { Err(a.describe()) }
        })
        .await;
    }

    // Continuous load on the two listeners no change touches.
    let stop = Arc::new(AtomicBool::new(false));
    let stable_url = format!("http://127.0.0.1:{stable_port}/stable");
    let canary_url = format!("http://127.0.0.1:{canary_port}/canary");
    let mut loads: Vec<(&str, Arc<Load>)> = Vec::new();
    let mut tasks = Vec::new();
    for (name, url, h2, expected) in [
        ("stable h1", &stable_url, false, STABLE),
        ("stable h2c", &stable_url, true, STABLE),
        ("canary h1", &canary_url, false, CANARY),
        ("canary h2c", &canary_url, true, CANARY),
    ] {
        let (load, task) = spawn_load(name, url.clone(), h2, expected, stop.clone());
        loads.push((name, load));
        tasks.push(task);
    }
    wait_progress(&loads, 20, "the start").await;

    // 1. Adding a CEC: its listener and routes serve.
    let dynamic_url = |path: &str| format!("http://127.0.0.1:{dynamic_port}{path}");
    let v1 = cec("dynamic", dynamic_port, &[router()], &[direct("/dr", "v1"), to_service("/", "b")], &["b"]);
    api.apply(&CECS, v1);
    eventually("the added CEC to serve", Duration::from_secs(5), async || {
        let dr = probe(&dynamic_url("/dr")).await?;
        let x = probe(&dynamic_url("/x")).await?;
        if dr.status == 200 && dr.text() == "v1" && x.status == 200 && x.backend == "b" {
            Ok(())
        } else {
            Err(format!("/dr: {}; /x: {}", dr.describe(), x.describe()))
        }
    })
    .await;

    // 2. Changing it: a new direct response body, and its route moves to another cluster.
    let v2 = cec("dynamic", dynamic_port, &[router()], &[direct("/dr", "v2"), to_service("/", "c")], &["c"]);
    api.apply(&CECS, v2);
    eventually("the changed CEC to take effect", Duration::from_secs(5), async || {
        let dr = probe(&dynamic_url("/dr")).await?;
        let x = probe(&dynamic_url("/x")).await?;
        if dr.text() == "v2" && x.status == 200 && x.backend == "c" {
            Ok(())
        } else {
            Err(format!("/dr: {}; /x: {}", dr.describe(), x.describe()))
        }
    })
    .await;
    for _ in 0..10 {
        let x = probe(&dynamic_url("/x")).await.expect("GET /x");
        assert_eq!((x.status, x.backend.as_str()), (200, "c"), "the changed route: {}", x.describe());
    }

    // 3. Breaking it (an invalid regex): an Event on the CEC, and its previous version keeps
    // serving.
    let bad = cec(
        "dynamic",
        dynamic_port,
        &[router()],
        &[regex_to_service("/(unclosed", "c"), direct("/dr", "v3"), to_service("/", "c")],
        &["c"],
    );
    api.apply(&CECS, bad);
    let event = eventually("an Event on the broken CEC shop/dynamic", Duration::from_secs(5), async || {
        let events = events_on(&api, "dynamic");
        events.first().cloned().ok_or_else(|| format!("Events: {:#?}", api.objects(&EVENTS)))
    })
    .await;
    let note = event["note"].as_str().unwrap_or("");
    println!("Event: {note}");
    assert!(
        note.starts_with("error: shop/dynamic: ")
            && note.contains("regex")
            && note.ends_with("(the previous version keeps serving)"),
        "{event:#}"
    );
    assert_eq!(
        (event["type"].as_str(), event["reason"].as_str()),
        (Some("Warning"), Some("TranslationFailed")),
        "{event:#}"
    );
    assert_eq!(sluice.source_state("shop/dynamic").await.as_deref(), Some("previous_version"));
    for _ in 0..10 {
        let dr = probe(&dynamic_url("/dr")).await.expect("GET /dr");
        assert_eq!((dr.status, dr.text().as_str()), (200, "v2"), "the previous version of shop/dynamic must serve");
    }

    // 4. A new CEC with an unsupported HTTP filter: rejected, an Event, nothing of it served.
    api.apply(&CECS, cec("broken", broken_port, &[lua(), router()], &[to_service("/", "stable")], &["stable"]));
    let event = eventually("an Event on the rejected CEC shop/broken", Duration::from_secs(5), async || {
        let events = events_on(&api, "broken");
        events.first().cloned().ok_or_else(|| format!("Events: {:#?}", api.objects(&EVENTS)))
    })
    .await;
    let note = event["note"].as_str().unwrap_or("");
    println!("Event: {note}");
    assert!(note.starts_with("error: shop/broken: ") && note.contains("http_filters[0]"), "{event:#}");
    assert_eq!(event["type"], "Warning", "{event:#}");
    assert_eq!(event["reason"], "TranslationFailed", "{event:#}");
    assert_eq!(event["metadata"]["namespace"], NS, "{event:#}");
    assert_eq!(event["regarding"]["apiVersion"], "cilium.io/v2", "{event:#}");
    assert_eq!(event["regarding"]["namespace"], NS, "{event:#}");
    assert_eq!(event["reportingController"], "sluice", "{event:#}");
    assert_eq!(event["reportingInstance"], POD, "{event:#}");
    assert_eq!(sluice.source_state("shop/broken").await.as_deref(), Some("rejected"));
    let broken_addr = SocketAddr::from(([127, 0, 0, 1], broken_port));
    assert!(
        tokio::net::TcpStream::connect(broken_addr).await.is_err(),
        "the rejected CEC's listener {broken_addr} accepts"
    );
    let dr = probe(&dynamic_url("/dr")).await.expect("GET /dr");
    assert_eq!(dr.text(), "v2", "shop/dynamic still serves its previous version");

    // 5. Scaling the EndpointSlice of `a`: the canary load reaches a2 within a second.
    assert_eq!(a2.hits(), 0, "a2 got requests before it was an endpoint");
    let scaled = Instant::now();
    api.apply(&ENDPOINTSLICES, slice("a", &["127.0.0.1", "127.0.0.2"], a1.addr.port()));
    let canary = [loads[2].1.clone(), loads[3].1.clone()];
    let reached = eventually("the canary load to reach a2", Duration::from_secs(5), async || {
        canary.iter().filter_map(|l| l.first_seen("a2")).min().ok_or_else(|| format!("a2 hits: {}", a2.hits()))
    })
    .await;
    let took = reached.saturating_duration_since(scaled);
    println!("the scaled EndpointSlice took effect after {took:?}");
    assert!(took < Duration::from_secs(1), "the second endpoint got traffic only after {took:?}");

    // 6. Deleting a CEC closes its listener.
    let a1_hits = a1.hits();
    api.delete(&CECS, NS, "dynamic");
    let dynamic_addr = SocketAddr::from(([127, 0, 0, 1], dynamic_port));
    eventually("the deleted CEC's listener to close", Duration::from_secs(5), async || {
        match tokio::net::TcpStream::connect(dynamic_addr).await {
            Err(_) => Ok(()),
            Ok(_) => Err(format!("{dynamic_addr} still accepts")),
        }
    })
    .await;
    assert_eq!(sluice.source_state("shop/dynamic").await, None, "the deleted CEC is still in the snapshot");

    // The untouched listeners kept serving through all of it, and still do; the canary's
    // traffic goes to both endpoints now.
    wait_progress(&loads, 20, "the last change").await;
    assert!(a1.hits() > a1_hits, "a1 no longer gets traffic after the scale-up");
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("load loop");
    }
    sluice.assert_running();

    // No Event was repeated by the rebuilds that followed (scale-up, deletion).
    assert_eq!(events_on(&api, "broken").len(), 1, "{:#?}", api.objects(&EVENTS));

    let mut failures = Vec::new();
    let mut total = 0;
    for (name, load) in &loads {
        let hits = load.hits.lock().unwrap_or_else(|e| e.into_inner()).clone();
        println!(
            "{name}: {} ok, {} failed, {} connection(s), by backend {hits:?}",
            load.ok(),
            load.failed.load(Ordering::Relaxed),
            load.connections.load(Ordering::Relaxed)
        );
        total += load.ok();
        failures.extend(load.failures.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned());
    }
    let failed: usize = loads.iter().map(|(_, l)| l.failed.load(Ordering::Relaxed)).sum();
    assert_eq!(failed, 0, "requests to untouched routes failed; first failures: {failures:#?}");
    // Nor was a connection to them closed: each loop used the one it opened first.
    for (name, load) in &loads {
        assert_eq!(
            load.connections.load(Ordering::Relaxed),
            1,
            "{name}: Sluice closed a connection to an untouched listener"
        );
    }
    println!("{total} requests in {:?}", started.elapsed());
}
