//! Observability end to end: a real `sluice` process, real backends, a real OTLP/gRPC trace
//! receiver (opentelemetry-proto's TraceService on tonic), the Prometheus endpoint parsed
//! strictly, access log files, and the admin API.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;

// ---------------------------------------------------------------------------------------------
// Configuration

/// A CEC with one listener (stat prefix `obs`): `/flaky` retries 5xx twice, `/fail` goes to a
/// backend that always answers 503, `/api` to a healthy one, `/grpc.` to the healthy one with
/// grpc_stats; anything else has no route. `extra_hcm` is spliced into the connection manager.
fn cec(extra_hcm: &str) -> String {
    format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata:
  name: obs
  namespace: default
spec:
  backendServices:
    - {{name: api, namespace: default}}
    - {{name: flaky, namespace: default}}
    - {{name: failing, namespace: default}}
  resources:
    - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
      name: obs
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: obs
{extra_hcm}
                rds:
                  route_config_name: obs_route
                http_filters:
                  - name: envoy.filters.http.grpc_stats
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig
                      stats_for_all_methods: true
                      enable_upstream_stats: true
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
    - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
      name: obs_route
      virtual_hosts:
        - name: obs_vh
          domains: ["*"]
          routes:
            - name: flaky
              match: {{prefix: "/flaky"}}
              route:
                cluster: default/flaky
                retry_policy: {{retry_on: 5xx, num_retries: 2}}
            - name: fail
              match: {{prefix: "/fail"}}
              route: {{cluster: default/failing}}
            - name: api
              match: {{prefix: "/api"}}
              route: {{cluster: default/api}}
            - name: grpc
              match: {{prefix: "/grpc."}}
              route: {{cluster: default/api}}
    - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
      name: default/api
      connect_timeout: 2s
      type: EDS
    - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
      name: default/flaky
      connect_timeout: 2s
      type: EDS
    - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
      name: default/failing
      connect_timeout: 2s
      type: EDS
"#
    )
}

struct Backends {
    api: Backend,
    flaky: Backend,
    failing: Backend,
    /// `traceparent` of every request the flaky backend saw, in order.
    flaky_traceparents: Arc<Mutex<Vec<Option<String>>>>,
}

async fn backends() -> Backends {
    let api =
        Backend::start_with(
            "api",
            Arc::new(|req, _| {
                if req.uri().path().starts_with("/grpc.") { Reply::RespondAfterBody(grpc_ok()) } else { Reply::Echo }
            }),
        )
        .await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    // Fails its first request with 503, then echoes.
    let flaky = Backend::start_with(
        "flaky",
        Arc::new(move |req, n| {
            let tp = req.headers().get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_string);
            record.lock().unwrap().push(tp);
            if n == 1 { Reply::Respond(status(503)) } else { Reply::Echo }
        }),
    )
    .await;
    let failing = Backend::start_with("failing", Arc::new(|_, _| Reply::Respond(status(503)))).await;
    Backends { api, flaky, failing, flaky_traceparents: seen }
}

fn services(b: &Backends) -> String {
    [
        service_yaml("default", "api", &[b.api.addr]),
        service_yaml("default", "flaky", &[b.flaky.addr]),
        service_yaml("default", "failing", &[b.failing.addr]),
    ]
    .join("---\n")
}

/// A trailers-only style gRPC answer: one 2-byte message, `grpc-status: 0` in the headers.
fn grpc_ok() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(&[0, 0, 0, 0, 2, 8, 1])));
    r.headers_mut().insert("content-type", "application/grpc".parse().unwrap());
    r.headers_mut().insert("grpc-status", "0".parse().unwrap());
    r
}

const LISTENER: &str = "default/obs/obs";

fn local(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

async fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A raw HTTP/1.1 request with a fresh connection; returns (status, body).
fn raw(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

// ---------------------------------------------------------------------------------------------
// A strict Prometheus text-format parser

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Default)]
struct Scrape {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

fn valid_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

/// Parses the text exposition format 0.0.4, failing on anything malformed: unknown comment
/// forms, a sample before its family's TYPE, bad names, bad escapes, duplicate series,
/// unparsable values.
fn parse_prometheus(text: &str) -> Scrape {
    let mut scrape = Scrape::default();
    let mut seen = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let ctx = || format!("line {}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap_or("");
            let name = parts.next().unwrap_or_else(|| panic!("{}", ctx()));
            assert!(valid_name(name), "bad family name, {}", ctx());
            match kind {
                "HELP" => {}
                "TYPE" => {
                    let ty = parts.next().unwrap_or_else(|| panic!("{}", ctx()));
                    assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty), "{}", ctx());
                    assert!(scrape.types.insert(name.to_string(), ty.to_string()).is_none(), "TYPE twice, {}", ctx());
                }
                _ => panic!("unknown comment, {}", ctx()),
            }
            continue;
        }
        assert!(!line.starts_with('#'), "{}", ctx());
        let (name_end, labels, rest) = match line.find('{') {
            Some(open) => {
                let mut labels = BTreeMap::new();
                let b = line.as_bytes();
                let mut i = open + 1;
                loop {
                    if b[i] == b'}' {
                        i += 1;
                        break;
                    }
                    let eq = line[i..].find('=').unwrap_or_else(|| panic!("{}", ctx())) + i;
                    let key = &line[i..eq];
                    assert!(valid_name(key), "bad label name, {}", ctx());
                    assert_eq!(b[eq + 1], b'"', "{}", ctx());
                    let mut j = eq + 2;
                    let mut value = String::new();
                    loop {
                        match b[j] {
                            b'\\' => {
                                value.push(match b[j + 1] {
                                    b'\\' => '\\',
                                    b'"' => '"',
                                    b'n' => '\n',
                                    _ => panic!("bad escape, {}", ctx()),
                                });
                                j += 2;
                            }
                            b'"' => break,
                            _ => {
                                let ch = line[j..].chars().next().unwrap();
                                value.push(ch);
                                j += ch.len_utf8();
                            }
                        }
                    }
                    assert!(labels.insert(key.to_string(), value).is_none(), "label twice, {}", ctx());
                    i = j + 1;
                    if b[i] == b',' {
                        i += 1;
                    }
                }
                (open, labels, &line[i..])
            }
            None => {
                let sp = line.find(' ').unwrap_or_else(|| panic!("{}", ctx()));
                (sp, BTreeMap::new(), &line[sp..])
            }
        };
        let name = &line[..name_end];
        assert!(valid_name(name), "bad sample name, {}", ctx());
        let mut fields = rest.split_whitespace();
        let v = fields.next().unwrap_or_else(|| panic!("{}", ctx()));
        let value = match v {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| panic!("bad value, {}", ctx())),
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().unwrap_or_else(|_| panic!("bad timestamp, {}", ctx()));
        }
        assert!(fields.next().is_none(), "{}", ctx());
        // The family is declared before its samples.
        let family = scrape.types.get(name).map(|_| name.to_string()).or_else(|| {
            ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                (scrape.types.get(base).map(String::as_str) == Some("histogram")).then(|| base.to_string())
            })
        });
        assert!(family.is_some(), "sample without a TYPE, {}", ctx());
        assert!(seen.insert((name.to_string(), labels.clone())), "duplicate series, {}", ctx());
        scrape.samples.push(Sample { name: name.to_string(), labels, value });
    }
    scrape
}

impl Scrape {
    /// The value of the one series of `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let hits: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v)))
            .collect();
        assert!(hits.len() <= 1, "{name} {labels:?} matches {} series", hits.len());
        hits.first().map(|s| s.value)
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or_else(|| {
            let family: Vec<&Sample> = self.samples.iter().filter(|s| s.name == name).collect();
            panic!("no series {name} {labels:?}; the family has {family:#?}")
        })
    }

    fn names(&self) -> BTreeSet<&str> {
        self.samples.iter().map(|s| s.name.as_str()).collect()
    }
}

fn scrape(addr: SocketAddr, path: &str) -> Scrape {
    let (status, body) = blocking_get(addr, path).expect("scrape");
    assert_eq!(status, 200, "{body}");
    parse_prometheus(&body)
}

#[test]
fn the_parser_is_strict() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{x=\"a\\\"b\"} 3\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 2\nh_count 1\n";
    let s = parse_prometheus(ok);
    assert_eq!(s.get("a_total", &[("x", "a\"b")]), 3.0);
    for bad in [
        "a 1\n",                                     // no TYPE
        "# TYPE a counter\na 1\na 2\n",              // duplicate series
        "# TYPE a counter\na{x=\"1} 1\n",            // unterminated
        "# TYPE a counter\na one\n",                 // value
        "# TYPE a counter\n# TYPE a counter\na 1\n", // TYPE twice
        "# TYPE a counter\na{1x=\"1\"} 1\n",         // label name
    ] {
        assert!(std::panic::catch_unwind(|| parse_prometheus(bad)).is_err(), "accepted {bad:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics

async fn send_mix(addr: SocketAddr) {
    let c = client(false);
    for _ in 0..7 {
        let (st, _, _) = get(&c, &format!("http://{addr}/api/x"), &[]).await;
        assert_eq!(st, 200);
    }
    for _ in 0..3 {
        let (st, _, _) = get(&c, &format!("http://{addr}/fail"), &[]).await;
        assert_eq!(st, 503);
    }
    for _ in 0..2 {
        let (st, _, _) = get(&c, &format!("http://{addr}/nothing-here"), &[]).await;
        assert_eq!(st, 404);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_request_mix_and_cover_the_dashboard() {
    let b = backends().await;
    let metrics_port = free_port();
    let health_port = free_port();
    let sluice = Sluice::start_with(
        &[("cec.yaml", &cec("")), ("services.yaml", &services(&b))],
        &["--metrics-address", &local(metrics_port), "--health-address", &local(health_port)],
    );
    let addr = sluice.listener(LISTENER);
    let metrics: SocketAddr = local(metrics_port).parse().unwrap();

    send_mix(addr).await;
    // One gRPC call through grpc_stats (h2c).
    let c = client(true);
    let req = Request::post(format!("http://{addr}/grpc.test.Greeter/SayHello"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 3, 10, 1, 120])))
        .unwrap();
    let resp = c.request(req).await.expect("grpc call");
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;

    // Exchanges are reported when their response body has been sent; give the last one a
    // moment.
    let s = wait_for("the request mix in /metrics", Duration::from_secs(5), || {
        let s = scrape(metrics, "/metrics");
        (s.value("envoy_http_downstream_rq_total", &[("envoy_http_conn_manager_prefix", "obs")]) == Some(13.0))
            .then_some(s)
    })
    .await;
    let prefix = [("envoy_http_conn_manager_prefix", "obs")];
    let class = |c: &'static str| [("envoy_http_conn_manager_prefix", "obs"), ("envoy_response_code_class", c)];
    assert_eq!(s.get("envoy_http_downstream_rq_xx", &class("2")), 8.0);
    assert_eq!(s.get("envoy_http_downstream_rq_xx", &class("5")), 3.0);
    assert_eq!(s.get("envoy_http_downstream_rq_xx", &class("4")), 2.0);
    assert_eq!(s.get("envoy_http_downstream_rq_time_count", &prefix), 13.0);
    assert_eq!(
        s.get("envoy_http_downstream_rq_time_bucket", &[("envoy_http_conn_manager_prefix", "obs"), ("le", "+Inf")]),
        13.0
    );
    assert_eq!(s.get("envoy_http_downstream_rq_active", &prefix), 0.0);
    assert!(s.get("envoy_http_downstream_cx_total", &prefix) >= 2.0);

    let api = [("envoy_cluster_name", "default/api")];
    let failing = [("envoy_cluster_name", "default/failing")];
    assert_eq!(s.get("envoy_cluster_upstream_rq_total", &api), 8.0);
    assert_eq!(s.get("envoy_cluster_upstream_rq_xx", &[api[0], ("envoy_response_code_class", "2")]), 8.0);
    assert_eq!(s.get("envoy_cluster_upstream_rq_total", &failing), 3.0);
    assert_eq!(s.get("envoy_cluster_upstream_rq_xx", &[failing[0], ("envoy_response_code_class", "5")]), 3.0);
    assert_eq!(s.get("envoy_cluster_upstream_rq_time_count", &api), 8.0);
    assert_eq!(s.get("envoy_cluster_upstream_rq_time_count", &failing), 3.0);
    assert_eq!(s.get("envoy_cluster_membership_total", &api), 1.0);
    assert_eq!(s.get("envoy_cluster_membership_healthy", &api), 1.0);
    assert_eq!(s.get("envoy_cluster_upstream_rq_retry", &api), 0.0);
    assert!(s.get("envoy_cluster_upstream_cx_total", &api) >= 1.0);

    let route = |r: &'static str| {
        [("envoy_http_conn_manager_prefix", "obs"), ("virtual_host", "default/obs/obs_vh"), ("route", r)]
    };
    assert_eq!(s.get("sluice_route_rq_time_count", &route("api")), 7.0);
    assert_eq!(s.get("sluice_route_rq_time_count", &route("fail")), 3.0);
    assert_eq!(s.get("sluice_route_rq_total", &[route("api")[2], ("envoy_response_code_class", "2")]), 7.0);
    assert_eq!(s.get("sluice_route_rq_total", &[route("fail")[2], ("envoy_response_code_class", "5")]), 3.0);

    let grpc = [
        ("envoy_cluster_name", "default/api"),
        ("envoy_grpc_bridge_service", "grpc.test.Greeter"),
        ("envoy_grpc_bridge_method", "SayHello"),
    ];
    assert_eq!(s.get("envoy_cluster_grpc_total", &grpc), 1.0);
    assert_eq!(s.get("envoy_cluster_grpc_success", &grpc), 1.0);
    assert_eq!(s.get("envoy_cluster_grpc_failure", &grpc), 0.0);
    assert_eq!(s.get("envoy_cluster_grpc_request_message_count", &grpc), 1.0);
    assert_eq!(s.get("envoy_cluster_grpc_response_message_count", &grpc), 1.0);
    assert_eq!(s.get("envoy_cluster_grpc_upstream_rq_time_count", &grpc), 1.0);

    assert_eq!(s.get("sluice_config_reloads", &[("result", "success")]), 1.0);
    assert_eq!(s.get("sluice_config_rejected_sources", &[]), 0.0);
    assert_eq!(s.get("sluice_config_diagnostics", &[("severity", "error")]), 0.0);
    // The fast path is off: its families are exported, at zero, and say so.
    assert_eq!(s.get("sluice_fastpath_enabled", &[]), 0.0);
    assert_eq!(s.get("sluice_fastpath_redirected_msgs", &[]), 0.0);
    assert_eq!(s.get("sluice_fastpath_paused", &[]), 0.0);
    // Tracing is off: nothing exported, nothing dropped.
    assert_eq!(s.get("sluice_tracing_spans_exported", &[]), 0.0);

    // Envoy's names: counters keep their name, no `_total` appended.
    assert_eq!(s.types.get("envoy_cluster_upstream_rq_retry").map(String::as_str), Some("counter"));
    assert_eq!(s.types.get("envoy_http_downstream_rq_total").map(String::as_str), Some("counter"));
    assert_eq!(s.types.get("envoy_cluster_upstream_rq_time").map(String::as_str), Some("histogram"));
    assert!(!s.names().iter().any(|n| n.ends_with("_total_total") || *n == "envoy_cluster_upstream_rq_retry_total"));

    // The admin API renders the same families.
    let admin = scrape(sluice.admin, "/stats/prometheus");
    assert_eq!(admin.types, s.types);

    // Every metric the Grafana dashboard queries is in this scrape.
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/sluice/tests/dashboard_metrics.py");
    match std::process::Command::new("python3").arg(&script).output() {
        Ok(out) if out.status.success() => {
            let names = String::from_utf8_lossy(&out.stdout).to_string();
            let wanted: Vec<&str> = names.lines().filter(|l| !l.is_empty()).collect();
            assert!(wanted.len() > 20, "the dashboard names too few metrics: {wanted:?}");
            let have = s.names();
            let missing: Vec<&&str> = wanted.iter().filter(|n| !have.contains(**n)).collect();
            assert!(missing.is_empty(), "the dashboard queries metrics Sluice does not export: {missing:?}");
        }
        Ok(out) => panic!("{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr)),
        Err(e) => eprintln!("SKIPPED the dashboard check: python3 is not available ({e})"),
    }

    // The health endpoint.
    let (st, body) = blocking_get(local(health_port).parse().unwrap(), "/healthz").unwrap();
    assert_eq!((st, body.as_str()), (200, "LIVE\n"));
}

// ---------------------------------------------------------------------------------------------
// Tracing

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(AnyValue::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push((service.clone(), s));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

async fn start_collector() -> (SocketAddr, Collector) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let c = Collector::default();
    let svc = TraceServiceServer::new(c.clone());
    tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(l);
        let _ = tonic::transport::Server::builder().serve_with_incoming(svc, incoming).await;
    });
    (addr, c)
}

fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a AnyValue> {
    s.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()).and_then(|v| v.value.as_ref())
}

fn attr_str<'a>(s: &'a Span, key: &str) -> &'a str {
    match attr(s, key) {
        Some(AnyValue::StringValue(v)) => v,
        other => panic!("span {:?}: attribute {key} is {other:?}", s.name),
    }
}

fn attr_int(s: &Span, key: &str) -> i64 {
    match attr(s, key) {
        Some(AnyValue::IntValue(v)) => *v,
        other => panic!("span {:?}: attribute {key} is {other:?}", s.name),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const STATUS_ERROR: i32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_follow_the_caller_and_show_every_retry() {
    let (collector_addr, collector) = start_collector().await;
    let b = backends().await;
    // A second listener whose CEC tracing block samples nothing on its own and tags its
    // spans: only a caller's sampled decision traces it.
    let tagged = cec(
        "                tracing:\n                  random_sampling: {value: 0}\n                  custom_tags:\n                    - tag: team\n                      literal: {value: payments}",
    )
    .replace("name: obs\n  namespace", "name: tagged\n  namespace")
    .replace("name: obs\n      filter_chains", "name: tagged\n      filter_chains")
    .replace("stat_prefix: obs", "stat_prefix: tagged");
    // The clusters are the first CEC's.
    let tagged = tagged[..tagged.find("    - \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster").unwrap()]
        .to_string();
    let sluice = Sluice::start_with(
        &[("cec.yaml", &cec("")), ("tagged.yaml", &tagged), ("services.yaml", &services(&b))],
        &["--otlp-endpoint", &format!("http://{collector_addr}"), "--trace-sampling", "1"],
    );
    let addr = sluice.listener(LISTENER);
    let c = client(false);

    // A traced caller: the server span joins its trace, below its span.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let tp = format!("00-{trace_id}-{caller_span}-01");
    let (st, _, body) =
        get(&c, &format!("http://{addr}/flaky/x?q=1"), &[("traceparent", &tp), ("user-agent", "obs-test")]).await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));

    let spans = wait_for("three spans of the traced request", Duration::from_secs(10), || {
        let all = collector.spans.lock().unwrap();
        let mine: Vec<(String, Span)> = all.iter().filter(|(_, s)| hex(&s.trace_id) == trace_id).cloned().collect();
        (mine.len() >= 3).then_some(mine)
    })
    .await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    assert!(
        spans.iter().all(|(svc, _)| svc == "sluice"),
        "service.name: {:?}",
        spans.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    let server = spans.iter().map(|(_, s)| s).find(|s| s.kind == SERVER).expect("a server span");
    assert_eq!(hex(&server.parent_span_id), caller_span, "the server span's parent is the caller's span");
    assert_eq!(server.name, "GET flaky");
    assert_eq!(attr_str(server, "http.request.method"), "GET");
    assert_eq!(attr_str(server, "url.path"), "/flaky/x");
    assert_eq!(attr_str(server, "url.query"), "q=1");
    assert_eq!(attr_str(server, "http.route"), "flaky");
    assert_eq!(attr_str(server, "upstream_cluster"), "default/flaky");
    assert_eq!(attr_str(server, "upstream_address"), b.flaky.addr.to_string());
    assert_eq!(attr_str(server, "network.protocol.version"), "1.1");
    assert_eq!(attr_str(server, "server.address"), "127.0.0.1");
    assert_eq!(attr_str(server, "user_agent.original"), "obs-test");
    assert_eq!(attr_int(server, "http.response.status_code"), 200);
    assert_eq!(attr_int(server, "sluice.upstream.retries"), 1);
    assert!(server.status.as_ref().is_none_or(|s| s.code != STATUS_ERROR));

    let mut attempts: Vec<&Span> = spans.iter().map(|(_, s)| s).filter(|s| s.kind == CLIENT).collect();
    attempts.sort_by_key(|s| attr_int(s, "sluice.attempt"));
    assert_eq!(attempts.len(), 2, "one client span per attempt");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a.parent_span_id, server.span_id, "attempt {} is a child of the server span", i + 1);
        assert_eq!(attr_int(a, "sluice.attempt"), i as i64 + 1);
        assert_eq!(attr_str(a, "upstream_cluster"), "default/flaky");
        assert_eq!(attr_str(a, "upstream_address"), b.flaky.addr.to_string());
        assert!(
            a.start_time_unix_nano >= server.start_time_unix_nano && a.end_time_unix_nano <= server.end_time_unix_nano
        );
    }
    assert_eq!(attr_int(attempts[0], "http.response.status_code"), 503);
    assert_eq!(attempts[0].status.as_ref().map(|s| s.code), Some(STATUS_ERROR));
    assert_eq!(attr_int(attempts[1], "http.response.status_code"), 200);
    assert_eq!(attr_int(attempts[1], "http.request.resend_count"), 1);
    assert!(attempts[0].end_time_unix_nano <= attempts[1].start_time_unix_nano, "attempts are sequential");

    // Each upstream attempt carried its own span as the parent.
    let seen = b.flaky_traceparents.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for (tp, a) in seen.iter().zip(&attempts) {
        assert_eq!(tp.as_deref(), Some(format!("00-{trace_id}-{}-01", hex(&a.span_id)).as_str()));
    }

    // B3 single header: extracted, and the trace continues.
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let (st, _, _) =
        get(&c, &format!("http://{addr}/api/b3"), &[("b3", &format!("{b3_trace}-e457b5a2e4d86bd1-1"))]).await;
    assert_eq!(st, 200);
    wait_for("the B3 trace", Duration::from_secs(10), || {
        let all = collector.spans.lock().unwrap();
        all.iter()
            .find(|(_, s)| {
                hex(&s.trace_id) == b3_trace && s.kind == SERVER && hex(&s.parent_span_id) == "e457b5a2e4d86bd1"
            })
            .map(|_| ())
    })
    .await;

    // An unsampled caller is not traced, and its traceparent reaches the upstream untouched.
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    let (st, _, body) = get(&c, &format!("http://{addr}/api/unsampled"), &[("traceparent", unsampled)]).await;
    assert_eq!(st, 200);
    let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echoed["headers"]["traceparent"], unsampled);

    // The tagged listener: random_sampling 0 keeps a request without context out of the
    // traces, a sampled caller's request is traced with the custom tag.
    let tagged_addr = sluice.listener("default/tagged/tagged");
    let (st, _, body) = get(&c, &format!("http://{tagged_addr}/api/no-context"), &[]).await;
    assert_eq!(st, 200);
    let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(echoed["headers"].get("traceparent").is_none(), "an unsampled request got a traceparent: {echoed}");
    let tagged_trace = "0af7651916cd43dd8448eb211c80319c";
    let (st, _, _) = get(
        &c,
        &format!("http://{tagged_addr}/api/with-context"),
        &[("traceparent", &format!("00-{tagged_trace}-b7ad6b7169203331-01"))],
    )
    .await;
    assert_eq!(st, 200);
    let tagged_server = wait_for("the tagged listener's span", Duration::from_secs(10), || {
        let all = collector.spans.lock().unwrap();
        all.iter().find(|(_, s)| hex(&s.trace_id) == tagged_trace && s.kind == SERVER).map(|(_, s)| s.clone())
    })
    .await;
    assert_eq!(attr_str(&tagged_server, "team"), "payments");
    // Give the exporter a batch interval, then check nothing of the unsampled requests came.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let all = collector.spans.lock().unwrap();
    assert!(!all.iter().any(|(_, s)| hex(&s.trace_id) == "11111111111111111111111111111111"));
    assert!(
        !all.iter()
            .any(|(_, s)| attr(s, "url.path").is_some_and(|v| *v == AnyValue::StringValue("/api/no-context".into())))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_succeed_and_spans_are_counted_as_dropped_when_the_collector_is_down() {
    let b = backends().await;
    let dead = free_port();
    let metrics_port = free_port();
    let sluice = Sluice::start_with(
        &[("cec.yaml", &cec("")), ("services.yaml", &services(&b))],
        &[
            "--otlp-endpoint",
            &format!("http://127.0.0.1:{dead}"),
            "--trace-sampling",
            "1",
            "--metrics-address",
            &local(metrics_port),
        ],
    );
    let addr = sluice.listener(LISTENER);
    let c = client(false);
    for i in 0..20 {
        let (st, _, _) = get(&c, &format!("http://{addr}/api/{i}"), &[]).await;
        assert_eq!(st, 200, "request {i} failed while the collector is down");
    }
    let metrics: SocketAddr = local(metrics_port).parse().unwrap();
    // 20 server spans and 20 client spans, every one dropped, none exported.
    let s = wait_for("40 dropped spans", Duration::from_secs(15), || {
        let s = scrape(metrics, "/metrics");
        let dropped = s.value("sluice_tracing_spans_dropped", &[("reason", "export_failed")]).unwrap_or(0.0)
            + s.value("sluice_tracing_spans_dropped", &[("reason", "queue_full")]).unwrap_or(0.0);
        (dropped >= 40.0).then_some(s)
    })
    .await;
    assert_eq!(s.get("sluice_tracing_spans_exported", &[]), 0.0);
    assert_eq!(
        s.get(
            "envoy_http_downstream_rq_xx",
            &[("envoy_http_conn_manager_prefix", "obs"), ("envoy_response_code_class", "2")]
        ),
        20.0
    );
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf `ExportTraceServiceRequest`.
async fn start_http_collector() -> (SocketAddr, Arc<Mutex<Vec<(String, Span)>>>) {
    use hyper::service::service_fn;
    use prost::Message;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let spans = Arc::new(Mutex::new(Vec::new()));
    let store = spans.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = l.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let store = store.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let ct =
                            req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let mut resp = Response::new(Full::new(Bytes::new()));
                        if path != "/v1/traces" || ct != "application/x-protobuf" {
                            *resp.status_mut() = http::StatusCode::NOT_FOUND;
                            return Ok::<_, std::convert::Infallible>(resp);
                        }
                        let Ok(export) = ExportTraceServiceRequest::decode(body) else {
                            *resp.status_mut() = http::StatusCode::BAD_REQUEST;
                            return Ok(resp);
                        };
                        for rs in export.resource_spans {
                            for ss in rs.scope_spans {
                                for sp in ss.spans {
                                    store.lock().unwrap().push(("".to_string(), sp));
                                }
                            }
                        }
                        resp.headers_mut().insert("content-type", "application/x-protobuf".parse().unwrap());
                        Ok(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_over_http_protobuf() {
    let (collector, spans) = start_http_collector().await;
    let b = backends().await;
    let sluice = Sluice::start_with(
        &[("cec.yaml", &cec("")), ("services.yaml", &services(&b))],
        &["--otlp-endpoint", &format!("http://{collector}"), "--otlp-protocol", "http/protobuf"],
    );
    let addr = sluice.listener(LISTENER);
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4736";
    let (st, _, _) = get(
        &client(false),
        &format!("http://{addr}/api/http"),
        &[("traceparent", &format!("00-{trace_id}-00f067aa0ba902b7-01"))],
    )
    .await;
    assert_eq!(st, 200);
    let got = wait_for("the spans over OTLP/HTTP", Duration::from_secs(10), || {
        let all = spans.lock().unwrap();
        let mine: Vec<Span> =
            all.iter().filter(|(_, s)| hex(&s.trace_id) == trace_id).map(|(_, s)| s.clone()).collect();
        (mine.len() >= 2).then_some(mine)
    })
    .await;
    assert_eq!(got.iter().filter(|s| s.kind == SERVER).count(), 1);
    assert_eq!(got.iter().filter(|s| s.kind == CLIENT).count(), 1);
}

/// A CEC whose tracing block names its own collector cluster (`envoy.tracers.opentelemetry`
/// with `envoy_grpc`) and `service_name`: its spans go there, with no node-level endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cec_tracing_provider_sends_to_its_collector_cluster() {
    let (collector_addr, collector) = start_collector().await;
    let b = backends().await;
    let tracing_block = r#"                tracing:
                  random_sampling: {value: 100}
                  provider:
                    name: envoy.tracers.opentelemetry
                    typed_config:
                      "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                      grpc_service:
                        envoy_grpc:
                          cluster_name: default/otel-collector
                      service_name: checkout"#;
    let collector_cluster = format!(
        r#"    - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
      name: default/otel-collector
      connect_timeout: 2s
      type: STATIC
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {{}}
      load_assignment:
        cluster_name: default/otel-collector
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {{address: 127.0.0.1, port_value: {port}}}
"#,
        port = collector_addr.port()
    );
    let config = cec(tracing_block) + &collector_cluster;
    let sluice = Sluice::start(&[("cec.yaml", &config), ("services.yaml", &services(&b))]);
    let dump = sluice.config_dump();
    assert_eq!(dump["snapshot"]["sources"][0]["state"], "accepted", "{:#}", dump["snapshot"]["diagnostics"]);
    let addr = sluice.listener(LISTENER);
    let (st, _, _) = get(&client(false), &format!("http://{addr}/api/cec-traced"), &[]).await;
    assert_eq!(st, 200);
    let (service, server) = wait_for("the span at the CEC's collector", Duration::from_secs(10), || {
        let all = collector.spans.lock().unwrap();
        all.iter().find(|(_, s)| s.kind == SERVER).cloned()
    })
    .await;
    assert_eq!(service, "checkout");
    assert_eq!(attr_str(&server, "url.path"), "/api/cec-traced");
    assert!(server.parent_span_id.is_empty(), "a new trace starts at Sluice");
}

// ---------------------------------------------------------------------------------------------
// Access logs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_logs_in_text_json_and_envoy_default_formats() {
    let b = backends().await;
    let logs = tempfile::tempdir().unwrap();
    let text_log = logs.path().join("text.log");
    let json_log = logs.path().join("json.log");
    let default_log = logs.path().join("default.log");
    let hcm = format!(
        r#"                access_log:
                  - name: envoy.access_loggers.file
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
                      path: {text}
                      log_format:
                        text_format_source:
                          inline_string: "%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_SENT% %UPSTREAM_CLUSTER% %ROUTE_NAME% %REQ(X-MISSING?USER-AGENT)% %PROTOCOL% %UPSTREAM_HOST% %UPSTREAM_REQUEST_ATTEMPT_COUNT% %REQ(X-TAG):3%\n"
                  - name: envoy.access_loggers.file
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
                      path: {json}
                      log_format:
                        json_format:
                          method: "%REQ(:METHOD)%"
                          path: "%REQ(:PATH)%"
                          code: "%RESPONSE_CODE%"
                          flags: "%RESPONSE_FLAGS%"
                          details: "%RESPONSE_CODE_DETAILS%"
                          sent: "%BYTES_SENT%"
                          received: "%BYTES_RECEIVED%"
                          duration: "%DURATION%"
                          upstream: "%UPSTREAM_HOST%"
                          route: "%ROUTE_NAME%"
                          line: "%REQ(:METHOD)% %RESPONSE_CODE%"
                          client:
                            address: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"
                  - name: envoy.access_loggers.file
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
                      path: {default}"#,
        text = text_log.display(),
        json = json_log.display(),
        default = default_log.display(),
    );
    let sluice = Sluice::start(&[("cec.yaml", &cec(&hcm)), ("services.yaml", &services(&b))]);
    let addr = sluice.listener(LISTENER);
    let c = client(false);
    let (st, _, api_body) =
        get(&c, &format!("http://{addr}/api/one"), &[("user-agent", "curl/8"), ("x-tag", "abcdef")]).await;
    assert_eq!(st, 200);
    let (st, _, _) = get(&c, &format!("http://{addr}/nothing"), &[("user-agent", "curl/8")]).await;
    assert_eq!(st, 404);
    // A POST with a body: BYTES_RECEIVED.
    let req = Request::post(format!("http://{addr}/api/upload"))
        .header("user-agent", "curl/8")
        .body(Full::new(Bytes::from(vec![b'x'; 1000])))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;

    let read = |p: &std::path::Path, n: usize| {
        let p = p.to_path_buf();
        move || {
            let s = std::fs::read_to_string(&p).ok()?;
            (s.lines().count() >= n).then(|| s.lines().map(str::to_string).collect::<Vec<_>>())
        }
    };
    let text = wait_for("3 text lines", Duration::from_secs(5), read(&text_log, 3)).await;
    let upstream = b.api.addr.to_string();
    assert_eq!(
        text[0],
        format!("GET /api/one 200 - {} default/api api curl/8 HTTP/1.1 {upstream} 1 abc", api_body.len())
    );
    assert_eq!(text[1], "GET /nothing 404 NR 0 - - curl/8 HTTP/1.1 - - -");

    let json = wait_for("3 json lines", Duration::from_secs(5), read(&json_log, 3)).await;
    let one: serde_json::Value = serde_json::from_str(&json[0]).unwrap();
    assert_eq!(one["method"], "GET");
    assert_eq!(one["path"], "/api/one");
    assert_eq!(one["code"], 200);
    assert_eq!(one["flags"], serde_json::Value::Null);
    assert_eq!(one["details"], "via_upstream");
    assert_eq!(one["sent"], api_body.len() as u64);
    assert_eq!(one["received"], 0);
    assert!(one["duration"].is_u64());
    assert_eq!(one["upstream"], upstream);
    assert_eq!(one["route"], "api");
    assert_eq!(one["line"], "GET 200");
    assert_eq!(one["client"]["address"], "127.0.0.1");
    let nr: serde_json::Value = serde_json::from_str(&json[1]).unwrap();
    assert_eq!(
        (nr["code"].as_u64(), nr["flags"].as_str(), nr["details"].as_str()),
        (Some(404), Some("NR"), Some("route_not_found"))
    );
    assert_eq!(nr["upstream"], serde_json::Value::Null);
    let post: serde_json::Value = serde_json::from_str(&json[2]).unwrap();
    assert_eq!(post["received"], 1000);
    assert_eq!(post["method"], "POST");

    // Envoy's default format.
    let default = wait_for("3 default lines", Duration::from_secs(5), read(&default_log, 3)).await;
    let line = &default[0];
    assert!(line.starts_with('[') && line.as_bytes()[24] == b'Z' && line.as_bytes()[25] == b']', "{line}");
    let rest = &line[27..];
    let expected_prefix = format!("\"GET /api/one HTTP/1.1\" 200 - 0 {} ", api_body.len());
    assert!(rest.starts_with(&expected_prefix), "{rest}");
    let id = request_id(line);
    assert_eq!(id.len(), 36, "x-request-id in {line}");
    assert!(rest.ends_with(&format!("\"curl/8\" \"{id}\" \"{addr}\" \"{upstream}\"")), "{rest}");
    assert!(default[1].contains("\"GET /nothing HTTP/1.1\" 404 NR 0 0 "), "{}", default[1]);
}

/// The `x-request-id` column of a default-format line.
fn request_id(line: &str) -> String {
    let fields: Vec<&str> = line.split('"').collect();
    // ... "xff" "ua" "id" "authority" "upstream"
    fields[fields.len() - 6].to_string()
}

// ---------------------------------------------------------------------------------------------
// Admin

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_and_quitquitquit_drains() {
    let b = backends().await;
    let slow = Backend::start_with("slow", Arc::new(|_, _| Reply::Delay(Duration::from_millis(800)))).await;
    let sluice = Sluice::start(&[("cec.yaml", &cec("")), ("services.yaml", &services(&b))]);
    let addr = sluice.listener(LISTENER);
    send_mix(addr).await;

    let (st, body) = sluice.admin_get("/ready");
    assert_eq!((st, body.as_str()), (200, "LIVE\n"));

    let (st, body) = sluice.admin_get("/server_info");
    assert_eq!(st, 200);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["state"], "LIVE");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert!(info["command_line_options"].as_array().is_some_and(|a| a.iter().any(|x| x == "--admin-address")));

    let (st, stats) = sluice.admin_get("/stats");
    assert_eq!(st, 200);
    assert!(stats.lines().any(|l| l == "cluster.default/api.upstream_rq_total: 7"), "{stats}");
    assert!(stats.lines().any(|l| l == "cluster.default/api.upstream_rq_2xx: 7"), "{stats}");
    assert!(stats.lines().any(|l| l == "http.obs.downstream_rq_4xx: 2"), "{stats}");
    assert!(stats.lines().any(|l| l.starts_with("cluster.default/api.upstream_rq_time: P50(")), "{stats}");
    let (_, filtered) = sluice.admin_get("/stats?filter=failing");
    assert!(!filtered.is_empty() && filtered.lines().all(|l| l.contains("failing")), "{filtered}");
    let (_, json) = sluice.admin_get("/stats?format=json");
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        json["stats"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "http.obs.downstream_rq_total" && s["value"] == 12.0)
    );

    let (st, clusters) = sluice.admin_get("/clusters");
    assert_eq!(st, 200);
    assert!(clusters.contains(&format!("default/api::{}::health_flags::healthy", b.api.addr)), "{clusters}");
    assert!(clusters.contains("default/api::default_priority::max_connections::"), "{clusters}");
    let (_, cj) = sluice.admin_get("/clusters?format=json");
    let cj: serde_json::Value = serde_json::from_str(&cj).unwrap();
    let api = cj["cluster_statuses"].as_array().unwrap().iter().find(|c| c["name"] == "default/api").unwrap();
    assert_eq!(api["hosts"][0]["address"], b.api.addr.to_string());
    assert_eq!(api["hosts"][0]["ejected"], false);

    let dump = sluice.config_dump();
    assert_eq!(dump["snapshot"]["sources"][0]["state"], "accepted");

    let (st, _) = raw(sluice.admin, "POST", "/logging?level=debug").unwrap();
    assert_eq!(st, 200);
    let (st, _) = raw(sluice.admin, "POST", "/logging?level=sluice=bogus").unwrap();
    assert_eq!(st, 400);
    let (st, _) = raw(sluice.admin, "GET", "/quitquitquit").unwrap();
    assert_eq!(st, 405, "quitquitquit needs POST");
    let (st, _) = raw(sluice.admin, "POST", "/reopen_logs").unwrap();
    assert_eq!(st, 200);

    // /quitquitquit drains: a request in flight completes, then the process exits.
    let with_slow = [
        service_yaml("default", "api", &[b.api.addr]),
        service_yaml("default", "flaky", &[b.flaky.addr]),
        service_yaml("default", "failing", &[b.failing.addr, slow.addr]),
    ]
    .join("---\n");
    sluice.write("services.yaml", &with_slow);
    wait_for("the slow backend to serve /fail", Duration::from_secs(5), || {
        let (_, body) = sluice.admin_get("/clusters");
        body.contains(&slow.addr.to_string()).then_some(())
    })
    .await;
    let in_flight = tokio::spawn(async move {
        let c = client(false);
        // Round robin over the failing and the slow endpoint: ask until the slow one answers.
        for _ in 0..4 {
            let (st, _, body) = get(&c, &format!("http://{addr}/fail"), &[]).await;
            if st == 200 {
                return String::from_utf8_lossy(&body).to_string();
            }
        }
        panic!("the slow backend never answered");
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (st, body) = raw(sluice.admin, "POST", "/quitquitquit").unwrap();
    assert_eq!((st, body.as_str()), (200, "OK\n"));
    let echoed = in_flight.await.expect("the in-flight request completed during the drain");
    assert!(echoed.contains("\"backend\":\"slow\""), "{echoed}");
    wait_for("the process to exit", Duration::from_secs(15), || {
        std::net::TcpStream::connect_timeout(&sluice.admin, Duration::from_millis(200)).is_err().then_some(())
    })
    .await;
}
