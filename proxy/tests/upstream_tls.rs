//! Upstream TLS against tokio-rustls backends on 127.0.0.1: ALPN protocol selection, SNI and
//! certificate verification. Certificates are made with the `openssl` command at test time;
//! the tests skip loudly if it is missing.

mod upstream_support;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use sluice_config::model::{TlsParams, UpstreamProtocol, UpstreamTls};
use sluice_proxy::upstream::{LbContext, Pools, UpstreamError};
use upstream_support::*;

fn tls(sni: Option<&str>, auto_sni: bool) -> UpstreamTls {
    UpstreamTls {
        sni: sni.map(str::to_string),
        certificates: Vec::new(),
        validation: None,
        alpn: Vec::new(),
        params: TlsParams::default(),
        auto_sni,
        auto_san_validation: false,
    }
}

#[tokio::test]
async fn auto_protocol_negotiates_h2_over_tls_and_multiplexes() {
    let Some(certs) = make_certs() else { return };
    let (addr, backend) = tls_backend(&certs, &[b"h2", b"http/1.1"]).await;
    let mut c = cluster("tls-auto", vec![endpoint(addr)]);
    c.protocol = UpstreamProtocol::Auto;
    c.tls = Some(Arc::new(tls(Some("localhost"), false)));
    let (_m, rt) = runtime_with(c, Arc::new(TrustTestCa::new(&certs)));
    let pools = Pools::new();
    let requests = (0..10).map(|_| async {
        let host = rt.choose(&LbContext::default()).unwrap();
        let resp = pools.send(&rt, &host, get("localhost", "/"), false).await.expect("TLS request");
        let (status, headers, _) = read_body(resp).await;
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "x-alpn"), "h2");
        assert_eq!(header(&headers, "x-version"), "HTTP/2.0");
        assert_eq!(header(&headers, "x-authority"), "localhost");
    });
    futures_util::future::join_all(requests).await;
    assert_eq!(backend.accepted(), 1, "one h2 connection for all requests");
    assert!(backend.max_in_flight() > 1);
}

#[tokio::test]
async fn auto_protocol_uses_http11_when_the_backend_only_offers_it() {
    let Some(certs) = make_certs() else { return };
    let (addr, backend) = tls_backend(&certs, &[b"http/1.1"]).await;
    let mut c = cluster("tls-h1", vec![endpoint(addr)]);
    c.protocol = UpstreamProtocol::Auto;
    c.tls = Some(Arc::new(tls(Some("localhost"), false)));
    let (_m, rt) = runtime_with(c, Arc::new(TrustTestCa::new(&certs)));
    let pools = Pools::new();
    for _ in 0..3 {
        let host = rt.choose(&LbContext::default()).unwrap();
        let resp = pools.send(&rt, &host, get("localhost", "/"), false).await.expect("TLS request");
        let (_, headers, _) = read_body(resp).await;
        assert_eq!(header(&headers, "x-alpn"), "http/1.1");
        assert_eq!(header(&headers, "x-version"), "HTTP/1.1");
    }
    assert_eq!(backend.accepted(), 1, "the TLS connection is pooled and reused");
}

#[tokio::test]
async fn explicit_http2_sends_h2_alpn() {
    let Some(certs) = make_certs() else { return };
    let (addr, _backend) = tls_backend(&certs, &[b"http/1.1", b"h2"]).await;
    let mut c = cluster("tls-h2", vec![endpoint(addr)]);
    c.protocol = UpstreamProtocol::Http2;
    c.tls = Some(Arc::new(tls(Some("localhost"), false)));
    let (_m, rt) = runtime_with(c, Arc::new(TrustTestCa::new(&certs)));
    let host = rt.choose(&LbContext::default()).unwrap();
    let resp = Pools::new().send(&rt, &host, get("localhost", "/"), false).await.expect("TLS request");
    assert_eq!(header(resp.headers(), "x-alpn"), "h2");
    assert_eq!(header(resp.headers(), "x-version"), "HTTP/2.0");
}

#[tokio::test]
async fn auto_sni_uses_the_request_host() {
    let Some(certs) = make_certs() else { return };
    let (addr, _backend) = tls_backend(&certs, &[b"http/1.1"]).await;
    let mut c = cluster("tls-auto-sni", vec![endpoint(addr)]);
    c.tls = Some(Arc::new(tls(None, true)));
    let (_m, rt) = runtime_with(c, Arc::new(TrustTestCa::new(&certs)));
    let pools = Pools::new();
    let host = rt.choose(&LbContext::default()).unwrap();
    // The certificate is for localhost: a request for localhost verifies ...
    let resp = pools.send(&rt, &host, get(&format!("localhost:{}", addr.port()), "/"), false).await.expect("TLS");
    read_body(resp).await;
    // ... one for another host name is checked against that name and fails.
    let err = pools.send(&rt, &host, get("other.example", "/"), false).await.expect_err("name mismatch");
    assert!(matches!(err, UpstreamError::Tls { .. }), "{err:?}");
    assert!(err.is_connect_failure());
    assert_eq!(rt.stats().cx_connect_fail.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn untrusted_certificate_is_a_tls_error() {
    let Some(certs) = make_certs() else { return };
    let Some(other) = make_certs() else { return };
    let (addr, _backend) = tls_backend(&certs, &[b"http/1.1"]).await;
    let mut c = cluster("tls-untrusted", vec![endpoint(addr)]);
    c.tls = Some(Arc::new(tls(Some("localhost"), false)));
    let (_m, rt) = runtime_with(c, Arc::new(TrustTestCa::new(&other)));
    let host = rt.choose(&LbContext::default()).unwrap();
    let err = Pools::new().send(&rt, &host, get("localhost", "/"), false).await.expect_err("untrusted");
    assert!(matches!(err, UpstreamError::Tls { .. }), "{err:?}");
}

#[tokio::test]
async fn tls_cluster_without_tls_support_fails_clearly() {
    let (addr, _backend) = backend(Proto::H1, Behaviour::default()).await;
    let mut c = cluster("tls-no-hooks", vec![endpoint(addr)]);
    c.tls = Some(Arc::new(tls(Some("localhost"), false)));
    let (_m, rt) = runtime(c);
    let host = rt.choose(&LbContext::default()).unwrap();
    let err = Pools::new().send(&rt, &host, get("localhost", "/"), false).await.expect_err("no TLS");
    assert!(matches!(err, UpstreamError::Tls { .. }), "{err:?}");
    assert_eq!(rt.stats().cx_total.load(Ordering::Relaxed), 0, "no connection was attempted");
}
