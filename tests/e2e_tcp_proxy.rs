//! TCP proxy paths beyond TLS passthrough: tunnelling over HTTP CONNECT to a forward proxy
//! (the shape of Cilium's forward-proxy example), and internal listeners reached through
//! `envoy_internal_address` endpoints.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP echo server.
async fn echo_server() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// An HTTP/1.1 forward proxy that accepts CONNECT, records the target and the
/// Proxy-Authorization header, and splices the tunnel to `to` (whatever the target).
async fn connect_proxy(to: std::net::SocketAddr, seen: Arc<Mutex<Vec<(String, String)>>>) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |mut req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        if req.method() != Method::CONNECT {
                            let mut r = Response::new(Empty::<bytes::Bytes>::new());
                            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                            return Ok::<_, std::convert::Infallible>(r);
                        }
                        let auth = req
                            .headers()
                            .get("proxy-authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        seen.lock().unwrap().push((req.uri().to_string(), auth));
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let Ok(up) = on.await else { return };
                            let mut up = TokioIo::new(up);
                            let Ok(mut target) = tokio::net::TcpStream::connect(to).await else { return };
                            let _ = tokio::io::copy_bidirectional(&mut up, &mut target).await;
                        });
                        Ok(Response::new(Empty::new()))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_over_http_connect_to_a_forward_proxy() {
    let echo = echo_server().await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let proxy = connect_proxy(echo, seen.clone()).await;
    let port = free_port();
    let cec = format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumClusterwideEnvoyConfig
metadata: {{name: forward-proxy-redirect}}
spec:
  resources:
    - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
      name: forward-proxy-listener
      address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.tcp_proxy
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
                stat_prefix: tcp_stats
                cluster: forward-proxy-cluster
                tunneling_config:
                  hostname: "%DOWNSTREAM_LOCAL_ADDRESS%"
                  headers_to_add:
                    - header: {{key: Proxy-Authorization, value: Basic dXNlcjpzZWNyZXQ=}}
                      append_action: OVERWRITE_IF_EXISTS_OR_ADD
    - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
      name: forward-proxy-cluster
      connect_timeout: 5s
      type: STATIC
      load_assignment:
        cluster_name: forward-proxy-cluster
        endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}}}]}}]
"#,
        proxy.port()
    );
    let sluice = Sluice::start(&[("cec.yaml", &cec)]);
    let addr = sluice.listener("/forward-proxy-redirect/forward-proxy-listener");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let recv = r.read_to_end(&mut back);
    let ((), got) = tokio::join!(send, recv);
    got.unwrap();
    assert_eq!(back, payload, "bytes through the CONNECT tunnel");
    // One tunnel per downstream connection (the test support's readiness probe opened one too).
    let seen = seen.lock().unwrap().clone();
    let last = seen.last().expect("a CONNECT reached the forward proxy");
    assert_eq!(last.0, addr.to_string(), "the CONNECT target is %DOWNSTREAM_LOCAL_ADDRESS%");
    assert_eq!(last.1, "Basic dXNlcjpzZWNyZXQ=");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_into_an_internal_listener() {
    let backend = Backend::start("inner").await;
    let port = free_port();
    let cec = format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {{name: il, namespace: default}}
spec:
  backendServices: [{{name: inner}}]
  resources:
    - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
      name: outer
      address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.tcp_proxy
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
                stat_prefix: outer
                cluster: to-internal
    - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
      name: internal-http
      internal_listener: {{}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: internal
                route_config:
                  name: internal
                  virtual_hosts:
                    - name: internal
                      domains: ["*"]
                      routes:
                        - match: {{prefix: /}}
                          request_headers_to_add: [{{header: {{key: x-via-internal, value: "yes"}}}}]
                          route: {{cluster: default/inner}}
                http_filters: [{{name: envoy.filters.http.router}}]
    - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
      name: to-internal
      type: STATIC
      load_assignment:
        cluster_name: to-internal
        endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{envoy_internal_address: {{server_listener_name: internal-http}}}}}}}}]}}]
    - {{"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: default/inner, type: EDS}}
"#
    );
    let sluice = Sluice::start(&[("cec.yaml", &cec), ("svc.yaml", &service_yaml("default", "inner", &[backend.addr]))]);
    let addr = sluice.listener("default/il/outer");
    let c = client(false);
    for _ in 0..3 {
        let (st, _, body) = get(&c, &format!("http://{addr}/through"), &[]).await;
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["backend"], "inner");
        assert_eq!(v["headers"]["x-via-internal"], "yes", "the internal listener's route ran");
        assert_eq!(v["path"], "/through");
    }
}
