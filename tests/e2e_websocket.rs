//! WebSocket upgrades through Sluice (`upgrade_configs: [{upgrade_type: websocket}]`), with a
//! real tokio-tungstenite server and client; refused with 403 when not enabled.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn cec(upgrades: &str) -> String {
    format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {{name: ws, namespace: default}}
spec:
  backendServices: [{{name: ws}}]
  resources:
    - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
      name: ws
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: ws
                {upgrades}
                route_config:
                  name: ws
                  virtual_hosts: [{{name: ws, domains: ["*"], routes: [{{match: {{prefix: /}}, route: {{cluster: default/ws}}}}]}}]
                http_filters: [{{name: envoy.filters.http.router}}]
    - {{"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: default/ws, type: EDS}}
"#
    )
}

/// A WebSocket echo server.
async fn ws_backend() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else { return };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() || m.is_binary() {
                        if ws.send(m).await.is_err() {
                            break;
                        }
                    } else if m.is_close() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_sluice() {
    let backend = ws_backend().await;
    let sluice = Sluice::start(&[
        ("cec.yaml", &cec("upgrade_configs: [{upgrade_type: websocket}]")),
        ("svc.yaml", &service_yaml("default", "ws", &[backend])),
    ]);
    let addr = sluice.listener("default/ws/ws");
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/chat"))
        .await
        .expect("websocket handshake through sluice");
    assert_eq!(resp.status(), 101);
    for i in 0..50 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let got = ws.next().await.unwrap().unwrap();
        assert_eq!(got.into_text().unwrap().as_str(), text);
    }
    let big = vec![7u8; 1 << 20];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let got = ws.next().await.unwrap().unwrap();
    assert_eq!(got.into_data().len(), big.len());
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_refused_when_not_enabled() {
    let backend = ws_backend().await;
    let sluice = Sluice::start(&[("cec.yaml", &cec("")), ("svc.yaml", &service_yaml("default", "ws", &[backend]))]);
    let addr = sluice.listener("default/ws/ws");
    let err = tokio_tungstenite::connect_async(format!("ws://{addr}/chat")).await.expect_err("upgrade must be refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 403),
        other => panic!("unexpected error {other}"),
    }
}
