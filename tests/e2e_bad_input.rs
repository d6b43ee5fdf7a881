//! Bad input and stuck peers, over real sockets: malformed and oversized requests get Envoy's
//! error statuses, invalid HTTP/2 frames end only their connection, backends that stall or
//! reset mid-response do not wedge anything, and the stream and connection timers fire. After
//! each, the proxy keeps serving.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Backend, Reply, Sluice, client, get, service_yaml};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LISTENER: &str = "default/bad/bad";

fn cec() -> String {
    r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata:
  name: bad
  namespace: default
spec:
  backendServices:
    - {name: api, namespace: default}
    - {name: slow, namespace: default}
    - {name: raw, namespace: default}
  resources:
    - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
      name: bad
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: bad
                max_request_headers_kb: 8
                stream_idle_timeout: 1s
                common_http_protocol_options:
                  max_headers_count: 20
                  idle_timeout: 1s
                rds: {route_config_name: bad_route}
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
    - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
      name: bad_route
      virtual_hosts:
        - name: bad_vh
          domains: ["*"]
          routes:
            - match: {prefix: "/slow-no-idle"}
              route: {cluster: default/slow, idle_timeout: 0s}
            - match: {prefix: "/slow-capped"}
              route: {cluster: default/slow, idle_timeout: 0s, max_stream_duration: {max_stream_duration: 1s}}
            - match: {prefix: "/slow"}
              route: {cluster: default/slow}
            - match: {prefix: "/raw"}
              route: {cluster: default/raw}
            - match: {prefix: "/"}
              route: {cluster: default/api}
    - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
      name: default/api
      connect_timeout: 2s
      type: EDS
    - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
      name: default/slow
      connect_timeout: 2s
      type: EDS
    - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
      name: default/raw
      connect_timeout: 2s
      type: EDS
"#
    .to_string()
}

/// A backend speaking raw HTTP/1.1: `/raw/stall` sends headers and half the body, then goes
/// quiet; `/raw/reset` sends headers and part of the body, then closes.
async fn raw_backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&got).to_string();
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789").await;
                if head.starts_with("GET /raw/stall") {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
                // /raw/reset: drop the connection with 90 bytes owed.
            });
        }
    });
    addr
}

struct Setup {
    sluice: Sluice,
    addr: SocketAddr,
    api: Backend,
}

async fn setup() -> Setup {
    let api = Backend::start("api").await;
    let slow = Backend::start_with("slow", Arc::new(|_, _| Reply::Delay(Duration::from_secs(3)))).await;
    let raw = raw_backend().await;
    let services = [
        service_yaml("default", "api", &[api.addr]),
        service_yaml("default", "slow", &[slow.addr]),
        service_yaml("default", "raw", &[raw]),
    ]
    .join("---\n");
    let sluice = Sluice::start(&[("cec.yaml", &cec()), ("services.yaml", &services)]);
    let addr = sluice.listener(LISTENER);
    // Keep the slow backend alive for the whole test.
    std::mem::forget(slow);
    Setup { sluice, addr, api }
}

/// Sends raw bytes on a new connection and returns everything the proxy answers until it
/// closes the connection (or 5 s pass).
fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

fn status_line(resp: &str) -> &str {
    resp.lines().next().unwrap_or("")
}

/// The proxy still answers a plain request.
async fn still_serving(addr: SocketAddr) {
    let (st, _, _) = get(&client(false), &format!("http://{addr}/healthy"), &[]).await;
    assert_eq!(st, 200, "the proxy stopped serving after bad input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_get_envoys_statuses() {
    let s = setup().await;
    let addr = s.addr;

    // Headers over max_request_headers_kb (8 KiB): 431.
    let big = format!("GET / HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n", "a".repeat(16 * 1024));
    let r = raw_exchange(addr, big.as_bytes());
    assert!(status_line(&r).starts_with("HTTP/1.1 431"), "oversized headers: {}", status_line(&r));

    // More headers than max_headers_count (20): 431.
    let mut many = String::from("GET / HTTP/1.1\r\nhost: a\r\n");
    for i in 0..40 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let r = raw_exchange(addr, many.as_bytes());
    assert!(status_line(&r).starts_with("HTTP/1.1 431"), "too many headers: {}", status_line(&r));

    // Garbage, a bad version, a bad header name, conflicting lengths: 400.
    for bad in [
        &b"\x16\x03\x01\x00\xa5garbage\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\nhost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\nbad header: v\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
        b"GET /\x7f HTTP/1.1\r\nhost: a\r\n\r\n",
    ] {
        let r = raw_exchange(addr, bad);
        assert!(
            status_line(&r).starts_with("HTTP/1.1 400"),
            "{:?} got {:?}",
            String::from_utf8_lossy(bad),
            status_line(&r)
        );
    }
    let before = s.api.hits();

    // Content-Length with chunked Transfer-Encoding (request smuggling): the upstream never
    // sees both framings, and never a request the client did not frame.
    let smuggle =
        b"POST /smuggle HTTP/1.1\r\nhost: a\r\ncontent-length: 6\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nX";
    let r = raw_exchange(addr, smuggle);
    let st = status_line(&r);
    if st.starts_with("HTTP/1.1 200") {
        // Forwarded with chunked framing only: the echo shows what the backend received.
        let body = &r[r.find("\r\n\r\n").unwrap() + 4..];
        assert!(!body.to_ascii_lowercase().contains("\"content-length\""), "both framings forwarded: {body}");
    } else {
        assert!(st.starts_with("HTTP/1.1 400"), "smuggling attempt got {st:?}");
    }
    assert!(s.api.hits() <= before + 1, "one framed request became several upstream requests");

    still_serving(addr).await;
    drop(s.sluice);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_http2_frames_end_only_that_connection() {
    let s = setup().await;
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    // SETTINGS (empty), then a DATA frame on stream 0: a connection error.
    c.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    c.write_all(&[0, 0, 4, 0, 0, 0, 0, 0, 0, b'o', b'o', b'p', b's']).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 1024];
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the connection was not closed after a protocol error");
    // Frames: 9-byte headers; find a GOAWAY (type 7) with PROTOCOL_ERROR (1).
    let mut i = 0;
    let mut goaway = None;
    while i + 9 <= got.len() {
        let len = u32::from_be_bytes([0, got[i], got[i + 1], got[i + 2]]) as usize;
        if got[i + 3] == 7 && i + 9 + 8 <= got.len() {
            goaway = Some(u32::from_be_bytes(got[i + 13..i + 17].try_into().unwrap()));
        }
        i += 9 + len;
    }
    assert_eq!(goaway, Some(1), "expected GOAWAY(PROTOCOL_ERROR) in {got:?}");

    // A well-behaved HTTP/2 client is unaffected.
    let (st, _, _) = get(&client(true), &format!("http://{}/after", s.addr), &[]).await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_and_resetting_backends_and_the_stream_timers() {
    let s = setup().await;
    let addr = s.addr;
    let c = client(false);

    // stream_idle_timeout (1 s) before the response: 408 "stream timeout", not the 3 s wait.
    let t = Instant::now();
    let (st, _, body) = get(&c, &format!("http://{addr}/slow"), &[]).await;
    assert_eq!((st.as_u16(), &body[..]), (408, &b"stream timeout"[..]));
    assert!(t.elapsed() < Duration::from_millis(2800), "took {:?}", t.elapsed());

    // The route turns the idle timer off: the slow answer arrives.
    let (st, _, _) = get(&c, &format!("http://{addr}/slow-no-idle"), &[]).await;
    assert_eq!(st, 200);

    // The route's max_stream_duration (1 s): 408 "downstream duration timeout".
    let t = Instant::now();
    let (st, _, body) = get(&c, &format!("http://{addr}/slow-capped"), &[]).await;
    assert_eq!((st.as_u16(), &body[..]), (408, &b"downstream duration timeout"[..]));
    assert!(t.elapsed() < Duration::from_millis(2800), "took {:?}", t.elapsed());

    // A backend that stalls mid-body: the response started, so the stream is cut after 1 s
    // of silence; the client sees an incomplete body, not a hang.
    let t = Instant::now();
    let resp = c.get(format!("http://{addr}/raw/stall").parse().unwrap()).await.expect("response head");
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await.expect("no hang");
    assert!(body.is_err(), "a stalled body must end in an error");
    assert!(t.elapsed() < Duration::from_secs(4), "took {:?}", t.elapsed());

    // A backend that closes mid-body: the client's body errors too.
    let resp = c.get(format!("http://{addr}/raw/reset").parse().unwrap()).await.expect("response head");
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await.expect("no hang");
    assert!(body.is_err(), "a truncated body must end in an error");

    still_serving(addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_idle_timeout() {
    let s = setup().await;
    let mut conn = TcpStream::connect(s.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(b"GET /one HTTP/1.1\r\nhost: a\r\n\r\n").unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = conn.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Let the rest of the response drain, then wait for the close (idle_timeout: 1 s).
    let t = Instant::now();
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) => panic!("the idle connection was not closed within 5 s: {e}"),
        }
    }
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(700), "closed too early: {waited:?}");
    assert!(waited < Duration::from_secs(4), "closed too late: {waited:?}");
    still_serving(s.addr).await;
}
