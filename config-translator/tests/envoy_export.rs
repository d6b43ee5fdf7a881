//! The Envoy bootstrap export, checked against real Envoy.
//!
//! * The helloworld 90/10 CEC (the shape of Cilium's traffic-shifting example) exports with
//!   Cilium's qualified names, Sluice's allocated listener address, static endpoints from the
//!   Services and EndpointSlices, and inline routes — and Envoy, started on that bootstrap,
//!   splits real traffic between two local backends and answers the direct-response and
//!   redirect routes.
//! * Hand-written CECs covering TLS with SDS secrets, TCP proxying, weighted clusters,
//!   mirrors, redirects and direct responses pass `envoy --mode validate`.
//! * Every CEC of Cilium's corpus (`../shared/corpus/cec`, read in place) that Sluice accepts
//!   exports to a bootstrap that passes `envoy --mode validate`.
//!
//! Tests that need `envoy` or `openssl` skip loudly when they are not installed.

use std::io::{self, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_config::envoy_export::{Dropped, ExportError, ExportOptions, envoy_bootstrap, envoy_export};
use sluice_config::model::SourceState;
use sluice_config::{DocKind, Document, Options, StoredDocument, Translation, parse_documents, translate};

// ---------------------------------------------------------------------------------------------
// Helpers

const ADMIN: &str = "127.0.0.1:19901";

fn export_opts() -> ExportOptions {
    ExportOptions { admin_address: ADMIN.parse().unwrap(), concurrency_hint: Some(1) }
}

fn parse(yaml: &str) -> Vec<Document> {
    parse_documents("test.yaml", yaml).unwrap()
}

/// Translates and asserts that every CEC was accepted (the export only covers accepted ones).
fn translate_all(docs: &[Document], opts: &Options) -> Translation {
    let t = translate(docs, opts);
    for s in &t.snapshot.sources {
        assert_eq!(s.state, SourceState::Accepted, "{} not accepted: {:#?}", s.name, t.snapshot.diagnostics);
    }
    t
}

fn named<'v>(list: &'v Value, name: &str) -> &'v Value {
    list.as_array()
        .and_then(|l| l.iter().find(|x| x["name"] == name))
        .unwrap_or_else(|| panic!("no {name:?} in {list:#}"))
}

/// The first filter chain's first network filter config of a listener.
fn first_filter(listener: &Value) -> &Value {
    &listener["filter_chains"][0]["filters"][0]["typed_config"]
}

/// A unique scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sluice-envoy-export-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write_json(&self, name: &str, v: &Value) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `envoy`, if it is installed.
fn envoy(test: &str) -> Option<PathBuf> {
    match Command::new("envoy").arg("--version").output() {
        Ok(o) if o.status.success() => Some(PathBuf::from("envoy")),
        _ => {
            eprintln!("SKIPPED {test}: `envoy` is not on PATH (install Envoy to compare against it)");
            None
        }
    }
}

/// `envoy --mode validate`: Ok, or the lines Envoy logged about the problem.
fn envoy_validate(envoy: &Path, config: &Path) -> Result<(), String> {
    let out = Command::new(envoy)
        .args(["--mode", "validate", "--log-level", "error", "-c"])
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run envoy: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("[critical]") || l.contains("[error]")).collect();
    Err(if lines.is_empty() { text } else { lines.join("\n") })
}

/// A self-signed P-256 certificate and key (PEM), made by `openssl` in `dir`.
fn self_signed(dir: &TempDir, test: &str) -> Option<(String, String)> {
    let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=test",
            "-days",
            "1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            Some((std::fs::read_to_string(&cert).unwrap(), std::fs::read_to_string(&key).unwrap()))
        }
        Ok(o) => panic!("openssl failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            eprintln!("SKIPPED {test}: cannot run `openssl` to make a test certificate: {e}");
            None
        }
    }
}

/// YAML block scalar body: `text` indented by `n` spaces.
fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

// ---------------------------------------------------------------------------------------------
// The helloworld 90/10 CEC

fn helloworld_yaml(v1_port: u16, v2_port: u16) -> String {
    let svc = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{clusterIP: {ip}, ports: [{{name: http, port: 5000, protocol: TCP}}]}}\n---\n"
        )
    };
    let slice = |name: &str, port: u16| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-x1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nendpoints: [{{addresses: [127.0.0.1], conditions: {{ready: true}}}}]\n\
             ports: [{{name: http, port: {port}, protocol: TCP}}]\n---\n"
        )
    };
    let mut y = String::new();
    y += &svc("helloworld", "10.96.0.10");
    y += &svc("helloworld-v1", "10.96.0.11");
    y += &svc("helloworld-v2", "10.96.0.12");
    y += &slice("helloworld-v1", v1_port);
    y += &slice("helloworld-v2", v2_port);
    y += r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata:
  name: envoy-lb-listener
  namespace: default
spec:
  services:
    - name: helloworld
      namespace: default
  backendServices:
    - name: helloworld-v1
      namespace: default
    - name: helloworld-v2
      namespace: default
  resources:
    - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
      name: envoy-lb-listener
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: envoy-lb-listener
                rds:
                  route_config_name: lb_route
                http_filters:
                  - name: envoy.filters.http.router
    - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
      name: lb_route
      virtual_hosts:
        - name: "lb_route"
          domains: [ "*" ]
          routes:
            - match: { path: "/direct" }
              direct_response: { status: 418, body: { inline_string: "short and stout" } }
            - match: { prefix: "/old" }
              redirect: { path_redirect: "/new", response_code: MOVED_PERMANENTLY }
            - match:
                prefix: "/"
              route:
                weighted_clusters:
                  clusters:
                    - name: "default/helloworld-v1"
                      weight: 90
                    - name: "default/helloworld-v2"
                      weight: 10
                retry_policy:
                  retry_on: 5xx
                  num_retries: 3
                  per_try_timeout: 1s
    - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
      name: "default/helloworld-v1"
      connect_timeout: 5s
      lb_policy: ROUND_ROBIN
      type: EDS
      outlier_detection:
        split_external_local_origin_errors: true
        consecutive_local_origin_failure: 2
    - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
      name: "default/helloworld-v2"
      connect_timeout: 3s
      lb_policy: ROUND_ROBIN
      type: EDS
      outlier_detection:
        split_external_local_origin_errors: true
        consecutive_local_origin_failure: 2
"#;
    y
}

#[test]
fn helloworld_exports_qualified_static_inline_config() {
    let docs = parse(&helloworld_yaml(18081, 18082));
    let t = translate_all(&docs, &Options::default());
    let b = envoy_bootstrap(&docs, &t, &export_opts()).unwrap();
    let res = &b["static_resources"];

    // The listener: qualified with ForceNamespace, on the port Sluice allocated.
    let name = "default/envoy-lb-listener/envoy-lb-listener";
    let allocated = &t.snapshot.listener(name).unwrap().addresses;
    assert_eq!(allocated.len(), 2, "127.0.0.1 and [::1]");
    let port = allocated[0].port();
    assert!((10000..=20000).contains(&port));
    let l = named(&res["listeners"], name);
    assert_eq!(l["address"], json!({"socket_address": {"address": "127.0.0.1", "port_value": port}}));
    assert_eq!(
        l["additional_addresses"],
        json!([{"address": {"socket_address": {"address": "::1", "port_value": port}}}])
    );

    // RDS became an inline, qualified route configuration with RDS's cluster validation.
    let hcm = first_filter(l);
    assert!(hcm.get("rds").is_none(), "{hcm:#}");
    let rc = &hcm["route_config"];
    assert_eq!(rc["name"], "default/envoy-lb-listener/lb_route");
    assert_eq!(rc["validate_clusters"], false);
    let vh = &rc["virtual_hosts"][0];
    assert_eq!(vh["name"], "default/envoy-lb-listener/lb_route");
    let split = &vh["routes"][2]["route"]["weighted_clusters"]["clusters"];
    assert_eq!(
        split,
        &json!([{"name": "default/helloworld-v1", "weight": 90}, {"name": "default/helloworld-v2", "weight": 10}])
    );
    assert_eq!(vh["routes"][0]["direct_response"]["status"], 418);
    // The old-style router got its type.
    assert_eq!(
        hcm["http_filters"],
        json!([{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}])
    );

    // EDS clusters became static clusters with the EndpointSlices' backends, Cilium's circuit
    // breakers and the upstream protocol options Cilium adds when it injects its filters.
    for (cluster, backend_port) in [("default/helloworld-v1", 18081), ("default/helloworld-v2", 18082)] {
        let c = named(&res["clusters"], cluster);
        assert_eq!(c["type"], "STATIC");
        assert!(c.get("eds_cluster_config").is_none());
        assert_eq!(
            c["load_assignment"],
            json!({"cluster_name": cluster, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": backend_port}}}}]}]})
        );
        assert_eq!(
            c["circuit_breakers"],
            json!({"thresholds": [{"max_connections": 1024, "max_pending_requests": 1024, "max_requests": 1024, "max_retries": 128}]})
        );
        let hpo = &c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
        assert_eq!(hpo["use_downstream_protocol_config"], json!({"http2_protocol_options": {}}));
        assert!(hpo.get("http_filters").is_none(), "Cilium's upstream filters are not exported: {hpo:#}");
    }
    assert_eq!(res["clusters"].as_array().unwrap().len(), 2, "no bootstrap clusters are needed");
    assert_eq!(b["admin"]["address"]["socket_address"]["port_value"], 19901);
    assert_eq!(export_opts().envoy_args(), ["--concurrency", "1"]);
}

#[test]
fn camel_case_and_cilium_filters_are_normalised() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideEnvoyConfig
metadata:
  name: camel
spec:
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: camel
    listenerFilters:
    - name: cilium.bpf_metadata
      typedConfig: {"@type": type.googleapis.com/cilium.BpfMetadata, isL7lb: true}
    - name: envoy.filters.listener.tls_inspector
    filterChains:
    - filters:
      - name: cilium.network
        typedConfig: {"@type": type.googleapis.com/cilium.NetworkFilter}
      - name: envoy.filters.network.http_connection_manager
        typedConfig:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          statPrefix: camel
          accessLog:
          - name: envoy.access_loggers.stdout
            typedConfig:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
              logFormat:
                jsonFormat: {startTime: "%START_TIME%", upstreamHost: "%UPSTREAM_HOST%"}
          routeConfig:
            name: inline
            virtualHosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: backend}
          httpFilters:
          - name: cilium.l7policy
            typedConfig: {"@type": type.googleapis.com/cilium.L7Policy}
          - name: envoy.filters.http.router
            typedConfig: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: backend
    connectTimeout: 1s
    circuitBreakers:
      thresholds: [{maxConnections: 7}]
    loadAssignment:
      clusterName: backend
      endpoints:
      - lbEndpoints:
        - endpoint: {address: {socketAddress: {address: 127.0.0.1, portValue: 18083}}}
    metadata:
      filterMetadata:
        myNamespace: {someKey: kept}
"#;
    let docs = parse(yaml);
    let t = translate_all(&docs, &Options::default());
    let b = envoy_bootstrap(&docs, &t, &export_opts()).unwrap();
    let res = &b["static_resources"];
    let l = named(&res["listeners"], "/camel/camel");
    // Cilium's datapath filters are gone; the name-only TLS inspector got its type.
    assert_eq!(
        l["listener_filters"],
        json!([{"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}])
    );
    let filters = l["filter_chains"][0]["filters"].as_array().unwrap();
    assert_eq!(filters.len(), 1, "cilium.network is dropped: {filters:#?}");
    let hcm = &filters[0]["typed_config"];
    assert_eq!(hcm["stat_prefix"], "camel");
    let names: Vec<&str> =
        hcm["http_filters"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["envoy.filters.http.router"]);
    // json_format keys are user data, kept as written.
    assert_eq!(
        hcm["access_log"][0]["typed_config"]["log_format"]["json_format"],
        json!({"startTime": "%START_TIME%", "upstreamHost": "%UPSTREAM_HOST%"})
    );
    // Clusterwide qualification: `/cec/name`; the inline route is qualified too.
    assert_eq!(hcm["route_config"]["name"], "/camel/inline");
    assert_eq!(hcm["route_config"]["virtual_hosts"][0]["name"], "/camel/all");
    assert_eq!(hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"], "/camel/backend");
    assert!(hcm["route_config"].get("validate_clusters").is_none(), "inline routes keep Envoy's default");
    let c = named(&res["clusters"], "/camel/backend");
    assert_eq!(c["load_assignment"]["cluster_name"], "/camel/backend");
    assert_eq!(
        c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"],
        18083
    );
    // The CEC's own circuit breakers: no Cilium defaults merged in.
    assert_eq!(c["circuit_breakers"], json!({"thresholds": [{"max_connections": 7}]}));
    assert_eq!(c["metadata"]["filter_metadata"], json!({"myNamespace": {"someKey": "kept"}}));
    // No spec.services: Cilium injects no upstream protocol options.
    assert!(c.get("typed_extension_protocol_options").is_none(), "{c:#}");
}

#[test]
fn errors_name_the_source_and_path() {
    // A listener for which the translation has no address.
    let docs = parse(&helloworld_yaml(18081, 18082));
    let mut t = translate_all(&docs, &Options::default());
    t.snapshot.listeners.clear();
    let err = envoy_bootstrap(&docs, &t, &export_opts()).unwrap_err();
    assert_eq!(
        err,
        ExportError::NoAddress {
            cec: "default/envoy-lb-listener".into(),
            path: "spec.resources[0]".into(),
            listener: "default/envoy-lb-listener/envoy-lb-listener".into()
        }
    );

    // A Cilium-only transport socket (the translation would refuse it; the export must too).
    let wrapped = parse(
        r#"
apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {name: wrapped, namespace: ns1}
spec:
  resources:
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: c
    connectTimeout: 1s
    transportSocket:
      name: cilium.tls_wrapper
      typedConfig: {"@type": type.googleapis.com/cilium.UpstreamTlsWrapperContext}
"#,
    );
    let mut t = translate(&[], &Options::default());
    t.accepted.insert("ns1/wrapped".into(), StoredDocument::new(&wrapped[0]));
    let err = envoy_bootstrap(&wrapped, &t, &export_opts()).unwrap_err();
    match &err {
        ExportError::Unsupported { cec, path, message } => {
            assert_eq!(cec, "ns1/wrapped");
            assert_eq!(path, "spec.resources[0].transport_socket");
            assert!(message.contains("cilium.UpstreamTlsWrapperContext"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }

    // One global cluster name, two different definitions.
    let two = parse(
        r#"
apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {name: a, namespace: ns1}
spec:
  resources:
  - {"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: shared/c, connect_timeout: 1s}
---
apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {name: b, namespace: ns1}
spec:
  resources:
  - {"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: shared/c, connect_timeout: 2s}
"#,
    );
    let mut t = translate(&[], &Options::default());
    t.accepted.insert("ns1/a".into(), StoredDocument::new(&two[0]));
    t.accepted.insert("ns1/b".into(), StoredDocument::new(&two[1]));
    let err = envoy_bootstrap(&two, &t, &export_opts()).unwrap_err();
    assert_eq!(
        err,
        ExportError::Conflict {
            kind: "cluster",
            name: "shared/c".into(),
            first: "ns1/a".into(),
            second: "ns1/b".into()
        }
    );
    assert_eq!(err.to_string(), "cluster \"shared/c\" is defined differently by ns1/a and ns1/b");
}

#[test]
fn what_cilium_or_envoy_refuses_is_left_out_and_reported() {
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {name: lenient, namespace: ns1}
spec:
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: no-stat-prefix
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, cluster: ok}
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: no-chains
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: fine
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: fine, cluster: ok}
  - {"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: ok, connect_timeout: 1s}
  - {"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: not-eds, connect_timeout: 1s, eds_cluster_config: {service_name: ns1/svc:80}}
"#;
    let docs = parse(yaml);
    let t = translate_all(&docs, &Options::default());
    let e = envoy_export(&docs, &t, &export_opts()).unwrap();
    let dropped: Vec<(&str, &str, &str)> =
        e.dropped.iter().map(|d| (d.cec.as_str(), d.path.as_str(), d.what.as_str())).collect();
    assert_eq!(
        dropped,
        [
            // Envoy drops single resources Sluice only warns about.
            ("ns1/lenient", "spec.resources[4].eds_cluster_config", "cluster ns1/lenient/not-eds"),
            (
                "ns1/lenient",
                "spec.resources[0].filter_chains[0].filters[0].typed_config.stat_prefix",
                "listener ns1/lenient/no-stat-prefix"
            ),
            ("ns1/lenient", "spec.resources[1]", "listener ns1/lenient/no-chains"),
        ]
    );
    let res = &e.bootstrap["static_resources"];
    let names = |k: &str| -> Vec<String> {
        res[k].as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(names("listeners"), ["ns1/lenient/fine"]);
    assert_eq!(names("clusters"), ["ns1/lenient/ok"]);
    assert!(
        e.dropped[2].to_string().starts_with("ns1/lenient: spec.resources[1]: listener ns1/lenient/no-chains left out"),
        "{}",
        e.dropped[2]
    );
}

// ---------------------------------------------------------------------------------------------
// Real traffic through Envoy on the exported helloworld bootstrap

/// A local HTTP/1.1 server that answers every request with `body`.
struct Backend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Backend {
    fn start(body: &'static str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(resp.as_bytes());
                });
            }
        });
        Backend { addr, stop, accept: Some(accept) }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// An Envoy process, killed on drop.
struct EnvoyProcess {
    child: Child,
    log: PathBuf,
}

impl EnvoyProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for EnvoyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Response {
    status: u16,
    headers: String,
    body: String,
}

fn http_get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: helloworld\r\nconnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) =
        text.split_once("\r\n\r\n").ok_or_else(|| io::Error::other(format!("no header end in {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
    Ok(Response { status, headers: head.to_ascii_lowercase(), body: body.to_string() })
}

/// A port that is free on 127.0.0.1 (and, when `v6`, on [::1]) right now.
fn free_port(v6: bool) -> u16 {
    for _ in 0..50 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if !v6 || TcpListener::bind((Ipv6Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on both 127.0.0.1 and [::1]");
}

#[test]
fn envoy_serves_the_exported_helloworld_split() {
    let Some(envoy) = envoy("envoy_serves_the_exported_helloworld_split") else { return };
    let (v1, v2) = (Backend::start("v1"), Backend::start("v2"));
    let docs = parse(&helloworld_yaml(v1.addr.port(), v2.addr.port()));
    let ipv6 = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok();
    if !ipv6 {
        eprintln!("note: [::1] is not available; the listener binds 127.0.0.1 only");
    }
    let port = free_port(ipv6);
    let t = translate_all(&docs, &Options { port_range: (port, port), ipv6, ..Options::default() });
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port(false)).parse().unwrap();
    let opts = ExportOptions { admin_address: admin, concurrency_hint: Some(1) };
    let bootstrap = envoy_bootstrap(&docs, &t, &opts).unwrap();
    let dir = TempDir::new("serve");
    let config = dir.write_json("bootstrap.json", &bootstrap);
    let log = dir.0.join("envoy.log");
    let child = Command::new(&envoy)
        .arg("-c")
        .arg(&config)
        .args(["--disable-hot-restart", "--log-level", "warn", "--log-path"])
        .arg(&log)
        .args(opts.envoy_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut envoy = EnvoyProcess { child, log };
    let listener: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // Envoy is ready once the direct-response route answers.
    let deadline = Instant::now() + Duration::from_secs(20);
    let direct = loop {
        if let Ok(Some(status)) = envoy.child.try_wait() {
            panic!("envoy exited with {status}:\n{}", envoy.log());
        }
        match http_get(listener, "/direct") {
            Ok(r) => break r,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("envoy did not serve {listener} within 20 s ({e}):\n{}", envoy.log()),
        }
    };
    assert_eq!((direct.status, direct.body.as_str()), (418, "short and stout"));

    let redirect = http_get(listener, "/old/page").unwrap();
    assert_eq!(redirect.status, 301);
    assert!(redirect.headers.contains("location: http://helloworld/new"), "{}", redirect.headers);

    let (mut n1, mut n2) = (0, 0);
    for i in 0..200 {
        let r = http_get(listener, &format!("/hello/{i}")).unwrap();
        assert_eq!(r.status, 200, "{}\n{}", r.headers, r.body);
        match r.body.as_str() {
            "v1" => n1 += 1,
            "v2" => n2 += 1,
            other => panic!("unexpected body {other:?}"),
        }
    }
    println!("helloworld 90/10 through Envoy: v1 {n1}, v2 {n2} of 200");
    // P(no v2 in 200 draws at 10 %) < 1e-9; P(v2 >= v1) is smaller still.
    assert!(n2 > 0 && n1 > n2, "v1 {n1}, v2 {n2}");
}

// ---------------------------------------------------------------------------------------------
// Hand-written CECs through `envoy --mode validate`

fn feature_yaml(cert: &str, key: &str) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: server-cert, namespace: cilium-secrets}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}---\n",
        indent(cert, 4),
        indent(key, 4)
    );
    y += &format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {{name: tls-gateway, namespace: default}}
spec:
  resources:
  - "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
    name: client-ca
    validation_context:
      trusted_ca:
        inline_string: |
{ca}  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: https
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}
    filter_chains:
    - filter_chain_match: {{server_names: [secure.example.com], transport_protocol: tls}}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificate_sds_secret_configs: [{{name: cilium-secrets/server-cert}}]
            validation_context_sds_secret_config: {{name: client-ca}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: https
          rds: {{route_config_name: routes}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
    - filter_chain_match: {{server_names: [pending.example.com], transport_protocol: tls}}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificate_sds_secret_configs: [{{name: cilium-secrets/not-synced-yet}}]
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: pending
          rds: {{route_config_name: routes}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
    - filter_chain_match: {{transport_protocol: raw_buffer}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          route_config:
            name: to-https
            virtual_hosts:
            - name: redirect
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                redirect: {{https_redirect: true, response_code: PERMANENT_REDIRECT}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
    name: routes
    virtual_hosts:
    - name: secure
      domains: ["*"]
      routes:
      - match: {{path: /teapot}}
        direct_response: {{status: 418, body: {{inline_string: teapot}}}}
      - match: {{prefix: /moved}}
        redirect: {{host_redirect: other.example.com, prefix_rewrite: /new, response_code: FOUND}}
      - match: {{prefix: /}}
        route:
          cluster: backend
          request_mirror_policies:
          - cluster: shadow
            runtime_fraction: {{default_value: {{numerator: 50, denominator: HUNDRED}}}}
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: backend
    connect_timeout: 1s
    type: STATIC
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: backend.example.com
        common_tls_context:
          tls_certificate_sds_secret_configs: [{{name: cilium-secrets/server-cert}}]
          validation_context_sds_secret_config: {{name: client-ca}}
    load_assignment:
      cluster_name: backend
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 18443}}}}}}}}]}}]
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: shadow
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: shadow
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 18444}}}}}}}}]}}]
"#,
        ca = indent(cert, 10)
    );
    y += r#"---
apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {name: tcp, namespace: default}
spec:
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: split
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: split
          weighted_clusters:
            clusters: [{name: blue, weight: 1}, {name: green, weight: 3}]
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: single
    address: {socket_address: {address: 127.0.0.1, port_value: 18445}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: single
          cluster: blue
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: blue
    connect_timeout: 1s
    type: EDS
  - "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
    cluster_name: blue
    endpoints:
    - lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18446}}}}]
    - priority: 1
      lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18447}}}}]
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: green
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: green
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 18448}}}}]}]
"#;
    y
}

#[test]
fn handwritten_cecs_validate_in_envoy() {
    let test = "handwritten_cecs_validate_in_envoy";
    let dir = TempDir::new("features");
    let Some((cert, key)) = self_signed(&dir, test) else { return };
    let docs = parse(&feature_yaml(&cert, &key));
    let t = translate_all(&docs, &Options::default());
    let b = envoy_bootstrap(&docs, &t, &export_opts()).unwrap();
    let res = &b["static_resources"];

    // Secrets: the Kubernetes TLS Secret and the CEC's own (qualified), inline.
    let k8s = named(&res["secrets"], "cilium-secrets/server-cert");
    assert_eq!(k8s["tls_certificate"]["certificate_chain"]["inline_string"], cert.as_str());
    let ca = named(&res["secrets"], "default/tls-gateway/client-ca");
    assert_eq!(ca["validation_context"]["trusted_ca"]["inline_string"], cert.as_str());

    // Defined secrets are static references; the unknown one is asked for over SDS.
    let l = named(&res["listeners"], "default/tls-gateway/https");
    let chains = l["filter_chains"].as_array().unwrap();
    let tls = &chains[0]["transport_socket"]["typed_config"]["common_tls_context"];
    assert_eq!(tls["tls_certificate_sds_secret_configs"], json!([{"name": "cilium-secrets/server-cert"}]));
    assert_eq!(tls["validation_context_sds_secret_config"], json!({"name": "default/tls-gateway/client-ca"}));
    let pending =
        &chains[1]["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificate_sds_secret_configs"][0];
    assert_eq!(pending["name"], "cilium-secrets/not-synced-yet");
    assert_eq!(
        pending["sds_config"]["api_config_source"]["grpc_services"][0]["envoy_grpc"]["cluster_name"],
        "xds-grpc-cilium"
    );
    assert!(named(&res["clusters"], "xds-grpc-cilium")["load_assignment"]["endpoints"].as_array().unwrap().is_empty());

    // Mirrors and upstream TLS are qualified.
    let route = &first_filter(l)["route_config"]["virtual_hosts"][0]["routes"][2]["route"];
    assert_eq!(route["cluster"], "default/tls-gateway/backend");
    assert_eq!(route["request_mirror_policies"][0]["cluster"], "default/tls-gateway/shadow");
    let backend = named(&res["clusters"], "default/tls-gateway/backend");
    let up = &backend["transport_socket"]["typed_config"]["common_tls_context"];
    assert_eq!(up["validation_context_sds_secret_config"], json!({"name": "default/tls-gateway/client-ca"}));

    // TCP proxy: weighted clusters qualified; the EDS cluster folds in the CEC's own
    // ClusterLoadAssignment, priorities included.
    let split = first_filter(named(&res["listeners"], "default/tcp/split"));
    assert_eq!(
        split["weighted_clusters"]["clusters"],
        json!([{"name": "default/tcp/blue", "weight": 1}, {"name": "default/tcp/green", "weight": 3}])
    );
    let blue = named(&res["clusters"], "default/tcp/blue");
    assert_eq!(blue["type"], "STATIC");
    assert_eq!(blue["load_assignment"]["cluster_name"], "default/tcp/blue");
    assert_eq!(blue["load_assignment"]["endpoints"][1]["priority"], 1);
    assert_eq!(named(&res["listeners"], "default/tcp/single")["address"]["socket_address"]["port_value"], 18445);

    let Some(envoy) = envoy(test) else { return };
    let config = dir.write_json("features.json", &b);
    if let Err(e) = envoy_validate(&envoy, &config) {
        panic!(
            "envoy rejects the export of the hand-written CECs:\n{e}\n{}",
            serde_json::to_string_pretty(&b).unwrap()
        );
    }
    println!(
        "hand-written CECs (TLS+SDS, tcp_proxy, weighted clusters, mirrors, redirects, direct responses): envoy validate OK"
    );
}

// ---------------------------------------------------------------------------------------------
// The corpus

fn corpus_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/cec");
    dir.is_dir().then_some(dir)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(p);
        }
    }
}

#[test]
fn every_accepted_corpus_cec_validates_in_envoy() {
    let test = "every_accepted_corpus_cec_validates_in_envoy";
    let Some(corpus) = corpus_dir() else {
        eprintln!("SKIPPED {test}: ../shared/corpus/cec is not present next to the checkout");
        return;
    };
    let Some(envoy) = envoy(test) else { return };
    let mut files = Vec::new();
    walk(&corpus, &mut files);
    let dir = TempDir::new("corpus");

    // Each CEC with the non-CEC documents of its file, as the corpus acceptance test does.
    let mut jobs: Vec<(String, PathBuf)> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut dropped: Vec<Dropped> = Vec::new();
    let (mut total, mut accepted) = (0usize, 0usize);
    for file in &files {
        let rel = file.strip_prefix(&corpus).unwrap().display().to_string();
        let Ok(docs) = parse_documents(&rel, &std::fs::read_to_string(file).unwrap()) else { continue };
        let (cecs, others): (Vec<&Document>, Vec<&Document>) = docs
            .iter()
            .partition(|d| matches!(d.kind(), DocKind::CiliumEnvoyConfig | DocKind::CiliumClusterwideEnvoyConfig));
        for cec in cecs {
            total += 1;
            let mut input: Vec<Document> = others.iter().map(|d| (*d).clone()).collect();
            input.push(cec.clone());
            let opts = Options { admin_address: Some("127.0.0.1:9879".parse().unwrap()), ..Options::default() };
            let t = translate(&input, &opts);
            if t.snapshot.sources.first().map(|s| &s.state) != Some(&SourceState::Accepted) {
                continue;
            }
            accepted += 1;
            let label = format!("{rel} ({})", t.snapshot.sources[0].name);
            match envoy_export(&input, &t, &export_opts()) {
                Ok(e) => {
                    dropped.extend(e.dropped);
                    jobs.push((label, dir.write_json(&format!("{}.json", jobs.len()), &e.bootstrap)));
                }
                Err(e) => failures.push(format!("{label}: export failed: {e}")),
            }
        }
    }

    // Validation is one Envoy process per bootstrap; two at a time on a two-core machine.
    let queue = Mutex::new(jobs.iter());
    let results: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let validated = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                loop {
                    let next = queue.lock().unwrap().next();
                    let Some((label, path)) = next else { break };
                    match envoy_validate(&envoy, path) {
                        Ok(()) => {
                            validated.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => results
                            .lock()
                            .unwrap()
                            .push(format!("{label}: envoy rejects the export:\n    {}", e.replace('\n', "\n    "))),
                    }
                }
            });
        }
    });
    failures.extend(results.into_inner().unwrap());
    let validated = validated.into_inner();
    println!(
        "corpus: {total} CEC/CCEC documents, {accepted} accepted by Sluice, {} exported, {validated} pass `envoy --mode validate` ({:.1} s)",
        jobs.len(),
        started.elapsed().as_secs_f64()
    );
    println!("left out because Cilium's agent or Envoy refuses them although Sluice accepts them ({}):", dropped.len());
    for d in &dropped {
        println!("  {d}");
    }
    for f in &failures {
        println!("  FAIL {f}");
    }
    assert!(accepted > 0, "no corpus CEC was accepted");
    assert!(
        failures.is_empty(),
        "{} of {accepted} accepted corpus CECs do not validate in Envoy:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
