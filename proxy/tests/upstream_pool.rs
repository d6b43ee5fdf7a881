//! Connection pools against real backends on 127.0.0.1: reuse, backends closing idle
//! connections, limits, timeouts, HTTP/2 multiplexing and circuit breakers.

mod upstream_support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use sluice_config::model::{CircuitBreakers, EndpointAddress, UpstreamProtocol};
use sluice_proxy::upstream::{ClusterRuntime, LbContext, OverflowKind, Pools, UpstreamError};
use upstream_support::*;

async fn send_ok(pools: &Pools, rt: &ClusterRuntime, authority: &str) -> http::HeaderMap {
    let host = rt.choose(&LbContext::default()).expect("a host");
    let resp = pools.send(rt, &host, get(authority, "/"), false).await.expect("response");
    let (status, headers, body) = read_body(resp).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!body.is_empty());
    headers
}

#[tokio::test]
async fn sequential_http1_requests_reuse_one_connection() {
    let (addr, backend) = backend(Proto::H1, Behaviour::default()).await;
    let (_m, rt) = runtime(cluster("seq", vec![endpoint(addr)]));
    let pools = Pools::new();
    for _ in 0..10 {
        let headers = send_ok(&pools, &rt, "seq.local").await;
        assert_eq!(header(&headers, "x-conn"), "1");
        assert_eq!(header(&headers, "x-version"), "HTTP/1.1");
    }
    assert_eq!(backend.accepted(), 1);
    assert_eq!(backend.requests(), 10);
    let stats = rt.stats();
    assert_eq!(stats.cx_total.load(Ordering::Relaxed), 1);
    assert_eq!(stats.cx_active.load(Ordering::Relaxed), 1);
    assert_eq!(stats.rq_total.load(Ordering::Relaxed), 10);
}

#[tokio::test]
async fn concurrent_http1_requests_open_connections_that_are_then_reused() {
    let (addr, backend) =
        backend(Proto::H1, Behaviour { delay: Duration::from_millis(100), ..Default::default() }).await;
    let (_m, rt) = runtime(cluster("conc", vec![endpoint(addr)]));
    let pools = Pools::new();
    let round = || async {
        let a = send_ok(&pools, &rt, "conc");
        let b = send_ok(&pools, &rt, "conc");
        let c = send_ok(&pools, &rt, "conc");
        tokio::join!(a, b, c);
    };
    round().await;
    assert_eq!(backend.accepted(), 3, "three requests in flight need three HTTP/1.1 connections");
    round().await;
    round().await;
    assert_eq!(backend.accepted(), 3, "later rounds reuse them");
    assert_eq!(backend.requests(), 9);
}

/// The backend closes each connection shortly after answering (keep-alive timeout, pod
/// restart). The next request must not fail on the dead pooled connection.
#[tokio::test]
async fn backend_closing_an_idle_connection_causes_no_error() {
    let (addr, backend) = closing_backend(Duration::from_millis(20)).await;
    let (_m, rt) = runtime(cluster("fin", vec![endpoint(addr)]));
    let pools = Pools::new();
    for i in 1..=5 {
        let headers = send_ok(&pools, &rt, "fin").await;
        assert_eq!(header(&headers, "x-conn"), i.to_string());
        assert!(backend.wait_closed(i, Duration::from_secs(5)).await, "backend closed connection {i}");
        // Give the FIN time to arrive, as it would between two requests in real traffic.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(backend.accepted(), 5);
}

/// The backend sends its FIN shortly after the response, while this worker is busy (blocked
/// here), so hyper has not read the FIN when the next request checks the connection out: the
/// pool's socket check must catch it. This is Cilium's "503 after a pod restart" (#33880).
#[tokio::test]
async fn fin_not_yet_seen_by_hyper_is_detected_before_reuse() {
    let (addr, backend) = closing_backend_on_thread(Duration::from_millis(5));
    let (_m, rt) = runtime(cluster("fin-race", vec![endpoint(addr)]));
    let pools = Pools::new();
    for i in 1..=5 {
        let host = rt.choose(&LbContext::default()).expect("host");
        let resp = pools.send(&rt, &host, get("fin-race", "/"), false).await;
        let resp = resp.unwrap_or_else(|e| panic!("request {i} failed on a connection the backend closed: {e}"));
        let (status, headers, body) = read_body(resp).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
        assert_eq!(header(&headers, "x-conn"), i.to_string());
        // Block the runtime: the FIN arrives, nobody reads it.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(backend.closed(), i, "the backend closed the connection meanwhile");
    }
    assert_eq!(backend.accepted(), 5);
    assert_eq!(rt.stats().cx_closed_before_reuse.load(Ordering::Relaxed), 4);
    assert_eq!(rt.stats().rq_reuse_retry.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn max_requests_per_connection_rotates_connections() {
    let (addr, backend) = backend(Proto::H1, Behaviour::default()).await;
    let mut c = cluster("rotate", vec![endpoint(addr)]);
    c.max_requests_per_connection = Some(3);
    let (_m, rt) = runtime(c);
    let pools = Pools::new();
    let mut conns = Vec::new();
    for _ in 0..7 {
        conns.push(header(&send_ok(&pools, &rt, "rotate").await, "x-conn"));
    }
    assert_eq!(conns, ["1", "1", "1", "2", "2", "2", "3"]);
    assert_eq!(rt.stats().cx_max_requests.load(Ordering::Relaxed), 2);
    assert!(backend.wait_closed(2, Duration::from_secs(5)).await, "retired connections are closed");
}

#[tokio::test]
async fn idle_timeout_closes_idle_connections() {
    let (addr, backend) = backend(Proto::H1, Behaviour::default()).await;
    let mut c = cluster("idle", vec![endpoint(addr)]);
    c.idle_timeout = Some(Duration::from_millis(200));
    let (_m, rt) = runtime(c);
    let pools = Pools::new();
    assert_eq!(header(&send_ok(&pools, &rt, "idle").await, "x-conn"), "1");
    assert!(backend.wait_closed(1, Duration::from_secs(5)).await, "the idle connection was closed by the pool");
    assert_eq!(rt.stats().cx_idle_timeout.load(Ordering::Relaxed), 1);
    assert_eq!(rt.stats().cx_active.load(Ordering::Relaxed), 0);
    assert_eq!(header(&send_ok(&pools, &rt, "idle").await, "x-conn"), "2");
}

#[tokio::test]
async fn a_response_body_dropped_early_closes_the_http1_connection() {
    let (addr, backend) = backend(Proto::H1, Behaviour { body_len: 1 << 20, ..Default::default() }).await;
    let (_m, rt) = runtime(cluster("drop", vec![endpoint(addr)]));
    let pools = Pools::new();
    let host = rt.choose(&LbContext::default()).unwrap();
    let resp = pools.send(&rt, &host, get("drop", "/"), false).await.unwrap();
    assert_eq!(host.active_requests(), 1, "the exchange is active until the body ends");
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a frame").expect("data");
    assert!(first.is_data());
    drop(body);
    assert_eq!(host.active_requests(), 0);
    assert!(backend.wait_closed(1, Duration::from_secs(5)).await, "unread remainder: connection closed, not pooled");
    let resp = pools.send(&rt, &host, get("drop", "/"), false).await.unwrap();
    assert_eq!(header(resp.headers(), "x-conn"), "2");
    let (_, _, bytes) = read_body(resp).await;
    assert_eq!(bytes.len(), 1 << 20);
    assert_eq!(host.active_requests(), 0);
}

#[tokio::test]
async fn request_bodies_are_sent() {
    let (addr, backend) = backend(Proto::H1, Behaviour::default()).await;
    let (_m, rt) = runtime(cluster("post", vec![endpoint(addr)]));
    let pools = Pools::new();
    let host = rt.choose(&LbContext::default()).unwrap();
    for _ in 0..3 {
        let req =
            http::Request::builder().method("POST").uri("http://post.local/upload").body(payload(100_000)).unwrap();
        let resp = pools.send(&rt, &host, req, false).await.unwrap();
        let (status, headers, _) = read_body(resp).await;
        assert_eq!(status, StatusCode::OK);
        // The absolute-form URI was turned into origin-form plus a Host header.
        assert_eq!(header(&headers, "x-authority"), "post.local");
    }
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn connection_refused_is_a_connect_failure() {
    let addr = refused_addr();
    let (_m, rt) = runtime(cluster("refused", vec![endpoint(addr)]));
    let pools = Pools::new();
    let host = rt.choose(&LbContext::default()).unwrap();
    let err = pools.send(&rt, &host, get("refused", "/"), false).await.expect_err("nothing listens");
    assert!(matches!(err, UpstreamError::ConnectFailure { .. }), "{err:?}");
    assert!(err.is_connect_failure() && err.is_local_origin() && err.is_reset());
    assert_eq!(err.reset_reason(), "connection failure");
    let stats = rt.stats();
    assert_eq!(stats.cx_connect_fail.load(Ordering::Relaxed), 1);
    assert_eq!(stats.cx_active.load(Ordering::Relaxed), 0);
    assert_eq!(rt.breakers().connections(), 0, "the connection slot was returned");
    assert_eq!(rt.breakers().pending_requests(), 0);
    assert_eq!(host.active_requests(), 0);
}

/// A listener whose accept queue is full drops new SYNs, so connects hang: the connect
/// timeout must fire. Everything stays on 127.0.0.1.
#[tokio::test]
async fn connect_timeout_against_a_full_accept_queue() {
    let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    // Fill the accept queue (backlog 0 still admits one or two connections).
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    let probe = tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await;
    if probe.is_ok() {
        eprintln!(
            "SKIPPING connect-timeout test: this kernel accepts connections beyond a full backlog \
             (no SYN drop on 127.0.0.1), so no blackhole can be made locally"
        );
        return;
    }
    let mut c = cluster("blackhole", vec![endpoint(addr)]);
    c.connect_timeout = Duration::from_millis(250);
    let (_m, rt) = runtime(c);
    let pools = Pools::new();
    let host = rt.choose(&LbContext::default()).unwrap();
    let err = pools.send(&rt, &host, get("blackhole", "/"), false).await.expect_err("connect hangs");
    assert!(matches!(err, UpstreamError::ConnectTimeout { .. }), "{err:?}");
    assert!(err.is_connect_failure() && err.is_timeout());
    assert_eq!(rt.stats().cx_connect_timeout.load(Ordering::Relaxed), 1);
    drop(fillers);
}

#[tokio::test]
async fn h2c_multiplexes_concurrent_requests_on_one_connection() {
    let (addr, backend) =
        backend(Proto::H2, Behaviour { delay: Duration::from_millis(100), ..Default::default() }).await;
    let mut c = cluster("h2c", vec![endpoint(addr)]);
    c.protocol = UpstreamProtocol::Http2;
    let (_m, rt) = runtime(c);
    let pools = Pools::new();
    let requests = (0..20).map(|_| async {
        let headers = send_ok(&pools, &rt, "h2c.local").await;
        assert_eq!(header(&headers, "x-version"), "HTTP/2.0");
        assert_eq!(header(&headers, "x-authority"), "h2c.local");
    });
    futures_util::future::join_all(requests).await;
    assert_eq!(backend.accepted(), 1, "one HTTP/2 connection carries every request");
    assert!(backend.max_in_flight() > 1, "the requests were concurrent on it");
    assert_eq!(backend.requests(), 20);
    // And it is reused afterwards.
    send_ok(&pools, &rt, "h2c.local").await;
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn h2_stream_limit_opens_more_connections() {
    let (addr, backend) =
        backend(Proto::H2, Behaviour { delay: Duration::from_millis(100), ..Default::default() }).await;
    let mut c = cluster("h2-limit", vec![endpoint(addr)]);
    c.protocol = UpstreamProtocol::Http2;
    c.http2.max_concurrent_streams = 2;
    let (_m, rt) = runtime(c);
    let pools = Pools::new();
    // Warm up one connection so that later requests find it.
    send_ok(&pools, &rt, "h2").await;
    futures_util::future::join_all((0..6).map(|_| send_ok(&pools, &rt, "h2"))).await;
    assert_eq!(backend.accepted(), 3, "six concurrent streams at two per connection");
    assert!(backend.max_in_flight() <= 6);
}

#[tokio::test]
async fn use_downstream_protocol_follows_the_request() {
    let (addr, backend) = backend(Proto::Auto, Behaviour::default()).await;
    let mut c = cluster("downstream", vec![endpoint(addr)]);
    c.protocol = UpstreamProtocol::UseDownstream { h2: true };
    let (_m, rt) = runtime(c);
    let pools = Pools::new();
    let host = rt.choose(&LbContext::default()).unwrap();
    for (downstream_h2, expected) in [(true, "HTTP/2.0"), (false, "HTTP/1.1"), (true, "HTTP/2.0")] {
        let mut req = get("ds.local", "/");
        if downstream_h2 {
            *req.version_mut() = http::Version::HTTP_2;
        }
        let resp = pools.send(&rt, &host, req, downstream_h2).await.unwrap();
        assert_eq!(header(resp.headers(), "x-version"), expected);
        read_body(resp).await;
    }
    assert_eq!(backend.accepted(), 2, "one connection per protocol, each reused");

    // Without http2_protocol_options the cluster is HTTP/1.1 only.
    let mut c = cluster("downstream-h1", vec![endpoint(addr)]);
    c.protocol = UpstreamProtocol::UseDownstream { h2: false };
    let (_m2, rt2) = runtime(c);
    let host = rt2.choose(&LbContext::default()).unwrap();
    let resp = pools.send(&rt2, &host, get("ds.local", "/"), true).await.unwrap();
    assert_eq!(header(resp.headers(), "x-version"), "HTTP/1.1");
}

#[tokio::test]
async fn pending_requests_wait_for_a_connection_then_overflow() {
    let (addr, backend) =
        backend(Proto::H1, Behaviour { delay: Duration::from_millis(300), ..Default::default() }).await;
    let mut c = cluster("breakers", vec![endpoint(addr)]);
    c.circuit_breakers = CircuitBreakers { max_connections: 1, max_pending_requests: 1, ..c.circuit_breakers.clone() };
    let (_m, rt) = runtime(c);
    let pools = Pools::new();
    let host = rt.choose(&LbContext::default()).unwrap();
    let first = async {
        let resp = pools.send(&rt, &host, get("cb", "/1"), false).await.expect("first request");
        // The connection is free again once the body has been read.
        read_body(resp).await.0
    };
    let later = async {
        // Once the first request occupies the only connection ...
        assert!(backend.wait_requests(1, Duration::from_secs(5)).await);
        // ... the second waits for it (pending) and the third finds the pending queue full.
        let second = pools.send(&rt, &host, get("cb", "/2"), false);
        let third = async {
            tokio::task::yield_now().await;
            pools.send(&rt, &host, get("cb", "/3"), false).await
        };
        tokio::join!(second, third)
    };
    let (first, (second, third)) = tokio::join!(first, later);
    assert_eq!(first, StatusCode::OK);
    let third = third.expect_err("pending queue full");
    assert!(matches!(third, UpstreamError::Overflow(OverflowKind::Pending)), "{third:?}");
    let second = second.expect("second request served after the first");
    assert_eq!(header(second.headers(), "x-conn"), "1", "on the same connection");
    read_body(second).await;
    assert_eq!(backend.accepted(), 1);
    assert_eq!(rt.stats().rq_pending_overflow.load(Ordering::Relaxed), 1);
    assert_eq!(rt.stats().cx_overflow.load(Ordering::Relaxed), 2);
    assert_eq!(rt.breakers().pending_requests(), 0);
}

#[tokio::test]
async fn internal_addresses_are_unsupported() {
    let mut c = cluster("internal", vec![]);
    let mut e = endpoint(refused_addr());
    e.address = EndpointAddress::Internal("ns/cec/listener".into());
    c.endpoints = vec![e];
    let (_m, rt) = runtime(c);
    let host = rt.choose(&LbContext::default()).expect("the host exists");
    let err = Pools::new().send(&rt, &host, get("i", "/"), false).await.expect_err("unsupported");
    assert!(matches!(err, UpstreamError::Unsupported(_)), "{err:?}");
}

/// When a cluster disappears from the configuration, its pooled connections are closed.
#[tokio::test]
async fn removing_a_cluster_closes_its_idle_connections() {
    let (addr, backend) = backend(Proto::H1, Behaviour::default()).await;
    let (manager, rt) = runtime(cluster("gone", vec![endpoint(addr)]));
    let pools = Pools::new();
    send_ok(&pools, &rt, "gone").await;
    // Let the pool settle (its sweeper runs once) before the cluster goes away.
    tokio::time::sleep(Duration::from_millis(50)).await;
    manager.update(&snapshot(vec![]));
    assert!(manager.get("gone").is_none());
    assert!(backend.wait_closed(1, Duration::from_secs(10)).await, "idle connection closed after removal");
    assert!(rt.hosts().iter().all(|h| h.is_removed()));
}

/// An HTTP/2 backend that refuses every stream with REFUSED_STREAM (what a server does when
/// it is shutting down or over its stream limit): retriable anywhere, so it has its own kind.
#[tokio::test]
async fn refused_streams_are_classified() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((socket, _)) = listener.accept().await else { return };
        let Ok(mut conn) = h2::server::handshake(socket).await else { return };
        while let Some(Ok((_req, mut respond))) = conn.accept().await {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
        }
    });
    let mut c = cluster("refuse", vec![endpoint(addr)]);
    c.protocol = UpstreamProtocol::Http2;
    let (_m, rt) = runtime(c);
    let host = rt.choose(&LbContext::default()).unwrap();
    let err = Pools::new().send(&rt, &host, get("refuse", "/"), false).await.expect_err("refused");
    assert!(err.is_refused_stream(), "{err:?}");
    assert_eq!(err.reset_reason(), "remote refused stream reset");
}

#[tokio::test]
async fn max_connection_duration_retires_old_connections() {
    let (addr, backend) = backend(Proto::H1, Behaviour::default()).await;
    let mut c = cluster("duration", vec![endpoint(addr)]);
    c.max_connection_duration = Some(Duration::from_millis(100));
    let (_m, rt) = runtime(c);
    let pools = Pools::new();
    assert_eq!(header(&send_ok(&pools, &rt, "d").await, "x-conn"), "1");
    assert_eq!(header(&send_ok(&pools, &rt, "d").await, "x-conn"), "1");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(header(&send_ok(&pools, &rt, "d").await, "x-conn"), "2");
    assert_eq!(rt.stats().cx_max_duration_reached.load(Ordering::Relaxed), 1);
    assert_eq!(backend.accepted(), 2);
}

#[tokio::test]
async fn host_set_change_closes_connections_when_configured() {
    let (other, _other_backend) = backend(Proto::H1, Behaviour::default()).await;
    let (addr, backend) = backend(Proto::H1, Behaviour::default()).await;
    let mut c = cluster("hsc", vec![endpoint(addr)]);
    c.close_connections_on_host_set_change = true;
    let (manager, rt) = runtime(c);
    let pools = Pools::new();
    send_ok(&pools, &rt, "h").await;
    // EDS adds a host: the cluster runtime stays, the pooled connection does not.
    let mut c2 = cluster("hsc", vec![endpoint(addr), endpoint(other)]);
    c2.close_connections_on_host_set_change = true;
    manager.update(&snapshot(vec![c2]));
    assert!(std::sync::Arc::ptr_eq(&rt, &manager.get("hsc").unwrap()));
    let host = rt.hosts().iter().find(|h| h.socket_addr() == Some(addr)).unwrap().clone();
    let resp = pools.send(&rt, &host, get("h", "/"), false).await.unwrap();
    assert_eq!(header(resp.headers(), "x-conn"), "2");
    read_body(resp).await;
    assert!(backend.wait_closed(1, Duration::from_secs(10)).await, "the old connection is closed");
}
