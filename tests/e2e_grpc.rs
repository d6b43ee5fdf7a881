//! gRPC and gRPC-Web through a real `sluice` process: tonic clients and servers over h2c
//! (unary, server, client and bidi streaming; trailers and metadata; large messages; many
//! concurrent streams; deadlines; local replies), and hand-made gRPC-Web requests (binary and
//! base64 text) as browser libraries send them. The configuration is what Cilium's GRPCRoute
//! translation emits: `grpc_web`, `grpc_stats` and the router on the listener, and clusters with
//! `explicit_http_config: {http2_protocol_options: {}}`.

mod common;
mod grpc;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use grpc::*;
use http::{HeaderMap, Request as HttpRequest, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost::Message;
use tokio_stream::StreamExt;
use tonic::{Code, Request};

/// The listener with the gRPC filters, as `<namespace>/<cec>/<listener>`.
const LISTENER: &str = "default/grpc/grpc";
/// The same routes without `grpc_web` and `grpc_stats`.
const PLAIN_LISTENER: &str = "default/grpc/plain";

/// One CEC as Cilium's Gateway API translation writes it for a GRPCRoute, plus routes picked by
/// an `x-route` header for the deadline, protocol and failure cases. The listeners get explicit
/// addresses (as in Cilium's host-network mode) on ports free right now: allocated ports come
/// from a fixed range that overlaps the kernel's ephemeral ports, where a busy machine's
/// outgoing connections can take them first.
fn cec(ports: (u16, u16)) -> String {
    let route = |header: Option<&str>, cluster: &str, extra: &str| {
        let headers =
            header.map(|h| format!(", headers: [{{name: x-route, string_match: {{exact: {h}}}}}]")).unwrap_or_default();
        format!(
            "            - match: {{path_separated_prefix: /sluice.test.v1.Echo{headers}}}\n              route: {{cluster: \"{cluster}\"{extra}}}\n"
        )
    };
    let routes = [
        route(Some("capped"), "default:grpc-echo:80", ", max_stream_duration: {grpc_timeout_header_max: 0.3s}"),
        route(
            Some("offset"),
            "default:grpc-echo:80",
            ", max_stream_duration: {grpc_timeout_header_max: 0s, grpc_timeout_header_offset: 0.2s}",
        ),
        route(Some("downstream"), "default:grpc-echo-downstream:80", ""),
        route(Some("dead"), "default:grpc-dead:80", ""),
        route(Some("http"), "default:http-echo:80", ""),
        route(None, "default:grpc-echo:80", ", max_stream_duration: {max_stream_duration: 0s}"),
    ]
    .concat();
    let listener = |name: &str, port: u16, filters: &str| {
        format!(
            r#"    - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
      name: {name}
      address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
      filter_chains:
        - filter_chain_match: {{transport_protocol: raw_buffer}}
          filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: {name}
                rds: {{route_config_name: grpc-routes}}
                use_remote_address: true
                common_http_protocol_options: {{max_stream_duration: 0s}}
                stream_idle_timeout: 300s
                upgrade_configs: [{{upgrade_type: websocket}}]
                http_filters:
{filters}                  - name: envoy.filters.http.router
                    typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
        )
    };
    let grpc_filters = r#"                  - name: envoy.filters.http.grpc_web
                    typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb}
                  - name: envoy.filters.http.grpc_stats
                    typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig, emit_filter_state: true, enable_upstream_stats: true}
"#;
    let cluster = |name: &str, service: &str, protocol: &str| {
        format!(
            r#"    - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
      name: "{name}"
      type: EDS
      eds_cluster_config: {{service_name: "{service}"}}
      outlier_detection: {{split_external_local_origin_errors: true}}
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          common_http_protocol_options: {{idle_timeout: 60s}}
          {protocol}: {{http2_protocol_options: {{}}}}
"#
        )
    };
    format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {{name: grpc, namespace: default}}
spec:
  backendServices:
    - {{name: grpc-echo, namespace: default, number: ["80"]}}
    - {{name: grpc-dead, namespace: default, number: ["80"]}}
    - {{name: http-echo, namespace: default, number: ["80"]}}
  resources:
{grpc_listener}{plain_listener}    - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
      name: grpc-routes
      virtual_hosts:
        - name: grpc
          domains: ["*"]
          routes:
{routes}{c1}{c2}{c3}{c4}"#,
        grpc_listener = listener("grpc", ports.0, grpc_filters),
        plain_listener = listener("plain", ports.1, ""),
        c1 = cluster("default:grpc-echo:80", "default/grpc-echo:80", "explicit_http_config"),
        c2 = cluster("default:grpc-echo-downstream:80", "default/grpc-echo:80", "use_downstream_protocol_config"),
        c3 = cluster("default:grpc-dead:80", "default/grpc-dead:80", "explicit_http_config"),
        c4 = cluster("default:http-echo:80", "default/http-echo:80", "explicit_http_config"),
    )
}

/// A running Sluice with the gRPC backend (and a plain HTTP echo backend) behind it.
struct Setup {
    sluice: Sluice,
    backend: GrpcBackend,
    _http: Backend,
    addr: SocketAddr,
}

impl Setup {
    async fn start() -> Setup {
        let backend = GrpcBackend::start("grpc-echo-1").await;
        let http = Backend::start("http-echo").await;
        let services = [
            service_yaml("default", "grpc-echo", &[backend.addr]),
            service_yaml("default", "grpc-dead", &[]),
            service_yaml("default", "http-echo", &[http.addr]),
        ]
        .join("---\n");
        let sluice = Sluice::start(&[("cec.yaml", &cec((free_port(), free_port()))), ("services.yaml", &services)]);
        let addr = bound(&sluice, LISTENER).await;
        Setup { sluice, backend, _http: http, addr }
    }

    async fn client(&self) -> EchoClient {
        EchoClient::connect(self.addr).await
    }
}

/// A listener's address once it accepts connections: `/listeners` shows the configuration,
/// and the workers bind their sockets a moment later.
async fn bound(sluice: &Sluice, name: &str) -> SocketAddr {
    let addr = sluice.listener(name);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "listener {name} never accepted a connection on {addr}: {}",
            sluice.config_dump()["listeners_bound"]
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    addr
}

fn routed<T>(msg: T, route: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert("x-route", route.parse().expect("metadata value"));
    req
}

/// Asserts a failed call carries what `grpc::failure` put in it.
fn assert_failure(status: &tonic::Status, code: Code, message: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(status.message(), format!("failed: {message} — 100% ✓"));
    assert_eq!(status.metadata().get("x-echo-trailer").and_then(|v| v.to_str().ok()), Some(message));
    let bin = status.metadata().get_bin("x-echo-bin").and_then(|v| v.to_bytes().ok());
    assert_eq!(bin.as_deref(), Some(&[0u8, 1, 2, 0xfe, 0xff][..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_with_metadata_trailers_and_errors_over_both_upstream_protocols() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    // The cluster Cilium emits for GRPCRoutes (explicit HTTP/2), and the default one
    // (use_downstream_protocol_config), which follows the h2c client.
    for route in ["explicit", "downstream"] {
        let mut req = routed(EchoRequest { payload: vec![1, 2, 3], ..EchoRequest::new("hello") }, route);
        req.metadata_mut().insert("x-custom", "custom-value".parse().unwrap());
        req.metadata_mut().insert_bin("x-custom-bin", tonic::metadata::MetadataValue::from_bytes(b"\x00\xff"));
        let resp = c.unary(req).await.unwrap_or_else(|e| panic!("{route}: {e:?}"));
        assert_eq!(resp.metadata().get("x-echo-server").and_then(|v| v.to_str().ok()), Some("grpc-echo-1"));
        let reply = resp.into_inner();
        assert_eq!((reply.message.as_str(), reply.payload.as_slice()), ("hello", &[1u8, 2, 3][..]));
        let h = &reply.headers;
        assert_eq!(h.get("x-custom").map(String::as_str), Some("custom-value"), "{route}: {h:?}");
        assert_eq!(h.get("x-custom-bin").map(String::as_str), Some("AP8"), "binary metadata reached the server");
        assert_eq!(h.get("content-type").map(String::as_str), Some("application/grpc"));
        assert_eq!(h.get("te").map(String::as_str), Some("trailers"));
        assert!(h.contains_key("x-request-id") && h.contains_key("x-forwarded-for"), "{h:?}");

        // A non-OK status from the server, with a non-ASCII message and trailer metadata.
        let req = routed(EchoRequest { fail_code: Code::NotFound as i32, ..EchoRequest::new("nope") }, route);
        let status = c.unary(req).await.expect_err("the server fails this call");
        assert_failure(&status, Code::NotFound, "nope");
    }
    // A method the server does not have: its UNIMPLEMENTED comes through as is.
    let status = c.call_path("/sluice.test.v1.Echo/Missing", Request::new(EchoRequest::new("x"))).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert_eq!(status.message(), "no such method");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streaming_with_trailers() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let req = EchoRequest { count: 50, payload: vec![7; 10_000], ..EchoRequest::new("s") };
    let resp = c.server_stream(Request::new(req)).await.expect("server stream");
    let (replies, status, _) = drain(resp.into_inner()).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    assert_eq!(replies.len(), 50);
    for (i, r) in replies.iter().enumerate() {
        assert_eq!((r.index as usize, r.message.clone(), r.payload.len()), (i, format!("s #{i}"), 10_000));
    }

    // Replies, then a failure in the trailers.
    let req = EchoRequest { count: 3, fail_code: Code::ResourceExhausted as i32, ..EchoRequest::new("late") };
    let resp = c.server_stream(Request::new(req)).await.expect("server stream");
    let (replies, status, _) = drain(resp.into_inner()).await;
    assert_eq!(replies.len(), 3);
    assert_failure(&status, Code::ResourceExhausted, "late");

    // Each reply is delivered as it is produced: the server holds back the rest until the
    // client has seen the first one.
    let req = EchoRequest { count: 3, ..EchoRequest::new(GATED) };
    let mut stream = c.server_stream(Request::new(req)).await.expect("gated stream").into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
    let first = first.expect("the first reply was held back by the proxy").expect("message").expect("some");
    assert_eq!(first.index, 0);
    s.backend.open_gate();
    let (rest, status, _) = drain(stream).await;
    assert_eq!((rest.len(), status.code()), (2, Code::Ok));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_streaming() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let msgs: Vec<EchoRequest> =
        (0..100).map(|i| EchoRequest { payload: vec![i as u8; 100], ..EchoRequest::new(&i.to_string()) }).collect();
    let expected_payload: Vec<u8> = msgs.iter().flat_map(|m| m.payload.clone()).collect();
    let reply = c.client_stream(Request::new(tokio_stream::iter(msgs))).await.expect("client stream").into_inner();
    assert_eq!(reply.index, 100);
    assert_eq!(reply.message, (0..100).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
    assert_eq!(reply.payload, expected_payload);

    // The server gives up mid-stream with an error.
    let msgs =
        vec![EchoRequest::new("a"), EchoRequest { fail_code: Code::InvalidArgument as i32, ..EchoRequest::new("b") }];
    let status = c.client_stream(Request::new(tokio_stream::iter(msgs))).await.expect_err("server fails");
    assert_failure(&status, Code::InvalidArgument, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_streaming_ping_pong() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    // Each request is sent only after the previous reply arrived: any buffering of either
    // direction in the proxy stalls the exchange.
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(1);
    tx.send(EchoRequest::new("ping 0")).await.unwrap();
    let resp = c.bidi(Request::new(tokio_stream::wrappers::ReceiverStream::new(rx))).await.expect("bidi");
    let mut replies = resp.into_inner();
    for i in 0..20u32 {
        let r = tokio::time::timeout(Duration::from_secs(5), replies.message())
            .await
            .unwrap_or_else(|_| panic!("reply {i} never came: a direction is buffered"))
            .expect("reply")
            .expect("stream open");
        assert_eq!((r.index, r.message.as_str()), (i, format!("ping {i}").as_str()));
        if i < 19 {
            tx.send(EchoRequest::new(&format!("ping {}", i + 1))).await.unwrap();
        }
    }
    // End with a server-side error carried in the trailers.
    tx.send(EchoRequest { fail_code: Code::Aborted as i32, ..EchoRequest::new("bye") }).await.unwrap();
    let (rest, status, _) = drain(replies).await;
    assert!(rest.is_empty());
    assert_failure(&status, Code::Aborted, "bye");

    // A client that half-closes: the server's stream ends OK.
    let msgs = (0..5).map(|i| EchoRequest::new(&format!("m{i}")));
    let resp = c.bidi(Request::new(tokio_stream::iter(msgs))).await.expect("bidi");
    let (replies, status, trailers) = drain(resp.into_inner()).await;
    assert_eq!((replies.len(), status.code()), (5, Code::Ok));
    assert!(trailers.is_some(), "the OK status arrives in trailers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_in_every_direction() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i| (i % 251) as u8).collect();
    let reply =
        c.unary(Request::new(EchoRequest { payload: big.clone(), ..EchoRequest::new("big") })).await.expect("unary");
    assert!(reply.get_ref().payload == big, "3 MiB unary payload corrupted");

    let part: Vec<u8> = (0..1536 * 1024).map(|i| (i % 13) as u8).collect();
    let msgs = vec![EchoRequest { payload: part.clone(), ..EchoRequest::new("p") }; 4];
    let reply = c.client_stream(Request::new(tokio_stream::iter(msgs))).await.expect("client stream").into_inner();
    assert_eq!(reply.payload.len(), 4 * part.len());
    assert!(reply.payload.chunks(part.len()).all(|c| c == part.as_slice()));

    let req = EchoRequest { count: 3, payload: vec![0xab; 2 * 1024 * 1024], ..EchoRequest::new("down") };
    let (replies, status, _) = drain(c.server_stream(Request::new(req)).await.expect("stream").into_inner()).await;
    assert_eq!(status.code(), Code::Ok);
    assert_eq!(replies.iter().map(|r| r.payload.len()).collect::<Vec<_>>(), vec![2 * 1024 * 1024; 3]);

    let msgs = vec![EchoRequest { payload: part.clone(), ..EchoRequest::new("b") }; 2];
    let (replies, status, _) =
        drain(c.bidi(Request::new(tokio_stream::iter(msgs))).await.expect("bidi").into_inner()).await;
    assert_eq!(status.code(), Code::Ok);
    assert!(replies.len() == 2 && replies.iter().all(|r| r.payload == part));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_streams() {
    let s = Setup::start().await;
    let mut tasks = tokio::task::JoinSet::new();
    // Three client connections, each multiplexing many calls over one HTTP/2 connection.
    for conn in 0..3 {
        let c = s.client().await;
        for i in 0..100 {
            let mut c = c.clone();
            tasks.spawn(async move {
                let msg = format!("{conn}-{i}");
                if i % 10 == 0 {
                    let req = EchoRequest { count: 20, payload: vec![i as u8; 1000], ..EchoRequest::new(&msg) };
                    let (replies, status, _) = drain(c.server_stream(Request::new(req)).await?.into_inner()).await;
                    assert_eq!((replies.len(), status.code()), (20, Code::Ok));
                    assert!(replies.iter().all(|r| r.payload == vec![i as u8; 1000]));
                } else {
                    let reply = c.unary(Request::new(EchoRequest::new(&msg))).await?.into_inner();
                    assert_eq!(reply.message, msg);
                }
                Ok::<_, tonic::Status>(())
            });
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done = 0;
    while let Some(r) = tokio::time::timeout_at(deadline.into(), tasks.join_next()).await.expect("calls finish in time")
    {
        r.expect("task").expect("call");
        done += 1;
    }
    assert_eq!(done, 300);
    assert!(s.backend.calls() >= 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_from_grpc_timeout_and_the_route() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let slow = || EchoRequest { delay_ms: 3000, ..EchoRequest::new("slow") };

    // grpc_timeout_header_max caps the client's 10 s deadline at 300 ms.
    let mut req = routed(slow(), "capped");
    req.set_timeout(Duration::from_secs(10));
    let t = Instant::now();
    let status = c.unary(req).await.expect_err("capped by the route");
    assert_eq!((status.code(), status.message()), (Code::Unavailable, "upstream request timeout"), "{status:?}");
    assert!(t.elapsed() < Duration::from_millis(2500), "took {:?}", t.elapsed());

    // Without a grpc-timeout header the maximum applies on its own.
    let t = Instant::now();
    let status = c.unary(routed(slow(), "capped")).await.expect_err("capped by the route");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(t.elapsed() < Duration::from_millis(2500));

    // No maximum: the client's deadline, less the 200 ms offset, so the proxy (not the
    // server's own 1 s deadline) ends the call.
    let mut req = routed(slow(), "offset");
    req.set_timeout(Duration::from_secs(1));
    let status = c.unary(req).await.expect_err("client deadline");
    assert_eq!((status.code(), status.message()), (Code::Unavailable, "upstream request timeout"), "{status:?}");

    // A deadline that leaves enough time: the server sees the client's header and the
    // proxy's expected timeout.
    let mut req = routed(EchoRequest::new("quick"), "offset");
    req.set_timeout(Duration::from_secs(5));
    let reply = c.unary(req).await.expect("in time").into_inner();
    assert_eq!(reply.headers.get("grpc-timeout").map(String::as_str), Some("5000000u"));
    assert_eq!(reply.headers.get("x-envoy-expected-rq-timeout-ms").map(String::as_str), Some("4800"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replies_are_trailers_only() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let status = c.call_path("/other.Service/Method", Request::new(EchoRequest::new("x"))).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "no route: {status:?}");
    let status = c.unary(routed(EchoRequest::new("x"), "dead")).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::Unavailable, "no healthy upstream"));

    // On the wire: HTTP 200, the status in the headers, and nothing else.
    let h2 = client(true);
    for (path, route, code) in [("/other.Service/Method", "", "12"), (UNARY, "dead", "14")] {
        let req = HttpRequest::post(format!("http://{}{path}", s.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-route", route)
            .body(Full::new(Bytes::from(grpc_frame(&EchoRequest::new("x")))))
            .unwrap();
        let resp = h2.request(req).await.expect("request");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        assert_eq!(resp.headers()["grpc-status"], code);
        let body = resp.into_body().collect().await.expect("body");
        assert!(body.trailers().is_none());
        assert!(body.to_bytes().is_empty());
    }
}

// ---- gRPC-Web ----

type WebClient = Client<HttpConnector, UnsyncBoxBody<Bytes, std::convert::Infallible>>;

fn web_client(h2: bool) -> WebClient {
    let mut b = Client::builder(TokioExecutor::new());
    b.http2_only(h2);
    b.build_http()
}

fn grpc_frame(msg: &impl Message) -> Vec<u8> {
    web_frame(msg)
}

/// A browser-style gRPC-Web call; the body is sent in the given pieces, a little apart, so the
/// proxy sees the cuts.
async fn web_call(
    c: &WebClient,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    pieces: Vec<Bytes>,
) -> (StatusCode, HeaderMap, Bytes) {
    let stream = tokio_stream::iter(pieces).then(|p| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(p))
    });
    let mut b = HttpRequest::post(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(UnsyncBoxBody::new(StreamBody::new(stream))).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), c.request(req)).await.expect("in time").expect("request");
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("body");
    assert!(collected.trailers().is_none(), "gRPC-Web responses carry their trailers in the body");
    (parts.status, parts.headers, collected.to_bytes())
}

/// gRPC's percent-decoding of `grpc-message`.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn cut(data: &[u8], size: usize) -> Vec<Bytes> {
    data.chunks(size).map(Bytes::copy_from_slice).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_binary_unary_and_server_streaming() {
    let s = Setup::start().await;
    for h2 in [false, true] {
        let c = web_client(h2);
        let body = grpc_frame(&EchoRequest { payload: vec![9; 300], ..EchoRequest::new("web") });
        let len = body.len().to_string();
        let headers = [
            ("content-type", "application/grpc-web+proto"),
            ("content-length", len.as_str()),
            ("x-grpc-web", "1"),
            ("x-user-agent", "grpc-web-javascript/0.1"),
            ("x-custom", "meta"),
            ("accept", "application/grpc-web+proto"),
        ];
        let (status, h, bytes) = web_call(&c, s.addr, UNARY, &headers, cut(&body, 7)).await;
        assert_eq!(status, 200);
        assert_eq!(h["content-type"], "application/grpc-web+proto");
        assert!(!h.contains_key("content-length") || h2, "HTTP/1.1 responses are chunked");
        assert_eq!(h["x-echo-server"], "grpc-echo-1", "response metadata stays in the headers");
        let web = parse_web_body(&bytes).unwrap_or_else(|e| panic!("h2={h2}: {e}: {bytes:?}"));
        assert_eq!(web.messages.len(), 1);
        let reply = &web.messages[0];
        assert_eq!((reply.message.as_str(), reply.payload.len()), ("web", 300));
        assert_eq!((web.trailer_frames, web.trailer("grpc-status")), (1, Some("0")));
        // What the gRPC server saw.
        let seen = &reply.headers;
        assert_eq!(seen.get("content-type").map(String::as_str), Some("application/grpc"));
        assert_eq!(seen.get("te").map(String::as_str), Some("trailers"));
        assert_eq!(seen.get("grpc-accept-encoding").map(String::as_str), Some("identity,deflate,gzip"));
        assert!(!seen.contains_key("content-length"), "{seen:?}");
        assert_eq!(seen.get("x-grpc-web").map(String::as_str), Some("1"));
        assert_eq!(seen.get("x-custom").map(String::as_str), Some("meta"));

        // Server streaming.
        let body = grpc_frame(&EchoRequest { count: 5, payload: vec![1; 50], ..EchoRequest::new("many") });
        let headers = [("content-type", "application/grpc-web"), ("x-grpc-web", "1")];
        let (status, h, bytes) = web_call(&c, s.addr, SERVER_STREAM, &headers, vec![Bytes::from(body)]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(h["content-type"], "application/grpc-web+proto");
        let web = parse_web_body(&bytes).expect("gRPC-Web body");
        let indices: Vec<u32> = web.messages.iter().map(|m| m.index).collect();
        assert_eq!(indices, vec![0, 1, 2, 3, 4]);
        assert_eq!(web.trailer("grpc-status"), Some("0"));

        // A failure after two messages: the status and trailer metadata in the trailer frame.
        let body =
            grpc_frame(&EchoRequest { count: 2, fail_code: Code::PermissionDenied as i32, ..EchoRequest::new("no") });
        let (_, _, bytes) = web_call(&c, s.addr, SERVER_STREAM, &headers, vec![Bytes::from(body)]).await;
        let web = parse_web_body(&bytes).expect("gRPC-Web body");
        assert_eq!(web.messages.len(), 2);
        assert_eq!(web.trailer("grpc-status"), Some("7"));
        let message = web.trailer("grpc-message").map(percent_decode);
        assert_eq!(message.as_deref(), Some("failed: no — 100% ✓"));
        assert_eq!(web.trailer("x-echo-trailer"), Some("no"));
        assert_eq!(web.trailer("x-echo-bin"), Some("AAEC/v8"));

        // A unary failure is trailers-only upstream: the status stays in the headers.
        let body = grpc_frame(&EchoRequest { fail_code: Code::NotFound as i32, ..EchoRequest::new("gone") });
        let (status, h, bytes) = web_call(&c, s.addr, UNARY, &headers, vec![Bytes::from(body)]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(h["grpc-status"], "5");
        assert_eq!(h["content-type"], "application/grpc-web+proto");
        assert_eq!(h["x-echo-trailer"], "gone");
        assert!(bytes.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_text_mode() {
    let s = Setup::start().await;
    let c = web_client(false);
    let text_headers =
        [("content-type", "application/grpc-web-text"), ("accept", "application/grpc-web-text"), ("x-grpc-web", "1")];
    // Unary, the base64 body cut at odd places.
    let payload: Vec<u8> = (0..=255).collect();
    let body = encode_web_text(&grpc_frame(&EchoRequest { payload: payload.clone(), ..EchoRequest::new("text") }));
    let (status, h, bytes) = web_call(&c, s.addr, UNARY, &text_headers, cut(body.as_bytes(), 5)).await;
    assert_eq!(status, 200);
    assert_eq!(h["content-type"], "application/grpc-web-text+proto");
    let web = parse_web_body(&decode_web_text(&bytes).expect("base64 response")).expect("gRPC-Web body");
    assert_eq!(web.messages.len(), 1);
    assert_eq!((web.messages[0].message.as_str(), &web.messages[0].payload), ("text", &payload));
    assert_eq!(web.trailer("grpc-status"), Some("0"));

    // Two independently padded segments in one body (one message sent as two writes).
    let frame = grpc_frame(&EchoRequest::new("segments"));
    let body = format!("{}{}", encode_web_text(&frame[..4]), encode_web_text(&frame[4..]));
    let (status, _, bytes) = web_call(&c, s.addr, UNARY, &text_headers, vec![Bytes::from(body)]).await;
    assert_eq!(status, 200);
    let web = parse_web_body(&decode_web_text(&bytes).unwrap()).unwrap();
    assert_eq!(web.messages[0].message, "segments");

    // Server streaming with large messages: each frame is its own padded segment.
    let req = EchoRequest { count: 2, payload: vec![0x5a; 1536 * 1024 + 1], ..EchoRequest::new("big") };
    let body = encode_web_text(&grpc_frame(&req));
    let (status, _, bytes) = web_call(&c, s.addr, SERVER_STREAM, &text_headers, vec![Bytes::from(body)]).await;
    assert_eq!(status, 200);
    let web = parse_web_body(&decode_web_text(&bytes).expect("segment-wise base64")).expect("body");
    assert_eq!(web.messages.iter().map(|m| m.payload.len()).collect::<Vec<_>>(), vec![1536 * 1024 + 1; 2]);
    assert_eq!(web.trailer("grpc-status"), Some("0"));

    // Text request, binary response (the response follows `accept`, as in Envoy).
    let body = encode_web_text(&grpc_frame(&EchoRequest::new("mixed")));
    let headers = [("content-type", "application/grpc-web-text+proto")];
    let (_, h, bytes) = web_call(&c, s.addr, UNARY, &headers, vec![Bytes::from(body)]).await;
    assert_eq!(h["content-type"], "application/grpc-web+proto");
    assert_eq!(parse_web_body(&bytes).unwrap().messages[0].message, "mixed");

    // Not base64: 400, reported the gRPC-Web way.
    let (status, h, bytes) = web_call(&c, s.addr, UNARY, &text_headers, vec![Bytes::from_static(b"AAAA*AAA")]).await;
    assert_eq!(status, 400);
    assert_eq!(h["grpc-status"], "13");
    assert_eq!(h["grpc-message"], "Bad gRPC-web request, invalid base64 data.");
    assert!(bytes.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_text_streams_frame_by_frame() {
    let s = Setup::start().await;
    let c = web_client(true);
    let body = encode_web_text(&grpc_frame(&EchoRequest { count: 3, ..EchoRequest::new(GATED) }));
    let req = HttpRequest::post(format!("http://{}{SERVER_STREAM}", s.addr))
        .header("content-type", "application/grpc-web-text")
        .header("accept", "application/grpc-web-text")
        .body(UnsyncBoxBody::new(Full::new(Bytes::from(body))))
        .unwrap();
    let resp = c.request(req).await.expect("request");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // The first message arrives while the server still holds back the others.
    let mut text = Vec::new();
    let mut frames = FrameReader::default();
    let first = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let frame = body.frame().await.expect("more body").expect("body frame");
            if let Ok(d) = frame.into_data() {
                text.extend_from_slice(&d);
                let whole = text.len() / 4 * 4;
                frames.push(&decode_web_text(&text[..whole]).expect("base64"));
                text.drain(..whole);
                if let Some(f) = frames.next_frame() {
                    return f;
                }
            }
        }
    })
    .await
    .expect("the first message was held back by the proxy");
    assert_eq!(first.0, 0);
    assert_eq!(EchoReply::decode(first.1).expect("reply").index, 0);
    s.backend.open_gate();
    let rest = body.collect().await.expect("rest").to_bytes();
    text.extend_from_slice(&rest);
    frames.push(&decode_web_text(&text).expect("base64"));
    let mut flags = Vec::new();
    while let Some((f, _)) = frames.next_frame() {
        flags.push(f);
    }
    assert_eq!(flags, vec![0, 0, 0x80]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_local_replies_and_non_grpc_upstreams() {
    let s = Setup::start().await;
    let c = web_client(false);
    let body = || vec![Bytes::from(grpc_frame(&EchoRequest::new("x")))];
    let web = ("content-type", "application/grpc-web+proto");

    // No route: Envoy's body-less 404, with the gRPC-Web content type.
    let (status, h, bytes) = web_call(&c, s.addr, "/other.Service/Method", &[web], body()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(h["content-type"], "application/grpc-web+proto");
    assert!(bytes.is_empty());

    // No healthy upstream: the text reply becomes grpc-status 14 and grpc-message.
    let (status, h, bytes) = web_call(&c, s.addr, UNARY, &[web, ("x-route", "dead")], body()).await;
    assert_eq!(status, 503);
    assert_eq!(h["grpc-status"], "14");
    assert_eq!(h["grpc-message"], "no healthy upstream");
    assert!(bytes.is_empty());

    // An upstream that is not gRPC at all (a JSON echo): grpc-status UNKNOWN and its body as
    // the message. The echo shows what went upstream.
    let (status, h, bytes) = web_call(&c, s.addr, UNARY, &[web, ("x-route", "http")], body()).await;
    assert_eq!(status, 200);
    assert_eq!(h["grpc-status"], "2");
    assert!(bytes.is_empty());
    let message = h["grpc-message"].to_str().unwrap().to_string();
    assert!(message.contains(r#""backend":"http-echo""#), "{message}");
    assert!(message.contains(r#""content-type":"application/grpc""#), "{message}");
    assert!(message.contains(r#""version":"HTTP/2.0""#), "{message}");

    // The router treats the transcoded request as gRPC: `grpc-timeout` and the route's
    // maximum apply, and the timeout reply is reported the gRPC-Web way.
    let slow = || vec![Bytes::from(grpc_frame(&EchoRequest { delay_ms: 3000, ..EchoRequest::new("slow") }))];
    let t = Instant::now();
    let (status, h, _) =
        web_call(&c, s.addr, UNARY, &[web, ("x-route", "capped"), ("grpc-timeout", "10S")], slow()).await;
    assert_eq!(status, 504, "{h:?}");
    assert_eq!(h["grpc-status"], "14");
    assert_eq!(h["grpc-message"], "upstream request timeout");
    assert!(t.elapsed() < Duration::from_millis(2500), "took {:?}", t.elapsed());

    // Without the grpc_web filter the request goes upstream untouched.
    let plain = bound(&s.sluice, PLAIN_LISTENER).await;
    let (status, h, bytes) = web_call(&c, plain, UNARY, &[web, ("x-route", "http")], body()).await;
    assert_eq!(status, 200);
    assert_eq!(h["content-type"], "application/json");
    let seen: serde_json::Value = serde_json::from_slice(&bytes).expect("echo JSON");
    assert_eq!(seen["headers"]["content-type"], "application/grpc-web+proto");
    assert!(seen["headers"].get("te").is_none());
}
