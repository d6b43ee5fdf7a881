//! Clusters end to end against real backends on 127.0.0.1: DNS discovery with `localhost`,
//! ORIGINAL_DST, and outlier detection driven the way the router drives it (choose, send,
//! record the outcome).

mod upstream_support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::StatusCode;
use sluice_config::model::{Discovery, DnsLookupFamily, EndpointAddress, OutlierDetection};
use sluice_proxy::upstream::{ClusterRuntime, HostAddress, LbContext, Outcome, Pools};
use upstream_support::*;

fn dns_endpoint(port: u16) -> sluice_config::model::Endpoint {
    let mut e = endpoint(SocketAddr::from(([127, 0, 0, 1], port)));
    e.address = EndpointAddress::Dns { host: "localhost".into(), port };
    e
}

/// What the router does for one attempt: pick, send, read, report. Returns the backend's
/// `x-conn`-independent identity: the port that answered, or `None` on error.
async fn attempt(pools: &Pools, rt: &ClusterRuntime) -> Option<u16> {
    let host = rt.choose(&LbContext::default())?;
    let port = host.socket_addr().map(|a| a.port());
    match pools.send(rt, &host, get("c.local", "/"), false).await {
        Ok(resp) => {
            host.record(Outcome::from_status(resp.status().as_u16()));
            read_body(resp).await;
            port
        }
        Err(e) => {
            if e.is_local_origin() {
                host.record(Outcome::LocalOriginFailure);
            }
            None
        }
    }
}

#[tokio::test]
async fn strict_dns_resolves_localhost() {
    let (addr, backend) = backend(Proto::H1, Behaviour::default()).await;
    let mut c = cluster("strict", vec![dns_endpoint(addr.port())]);
    c.discovery = Discovery::StrictDns;
    c.dns_lookup_family = DnsLookupFamily::V4Only;
    c.dns_refresh_rate = Duration::from_millis(200);
    let (_m, rt) = runtime(c);
    tokio::time::timeout(Duration::from_secs(10), rt.wait_ready()).await.expect("first resolution");
    let hosts = rt.hosts();
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].address(), &HostAddress::Socket(addr));
    assert_eq!(hosts[0].hostname(), Some("localhost"));
    assert_eq!(attempt(&Pools::new(), &rt).await, Some(addr.port()));
    assert_eq!(backend.requests(), 1);
    // Refreshes keep the same host (and its state).
    let first = hosts[0].clone();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rt.stats().update_success.load(Ordering::Relaxed) >= 2);
    assert!(std::sync::Arc::ptr_eq(&rt.hosts()[0], &first));
}

#[tokio::test]
async fn logical_dns_connects_to_the_resolved_address() {
    let (addr, backend) = backend(Proto::H1, Behaviour::default()).await;
    let mut c = cluster("logical", vec![dns_endpoint(addr.port())]);
    c.discovery = Discovery::LogicalDns;
    let (_m, rt) = runtime(c);
    tokio::time::timeout(Duration::from_secs(10), rt.wait_ready()).await.expect("first resolution");
    let host = rt.choose(&LbContext::default()).unwrap();
    assert_eq!(host.address(), &HostAddress::Dns { name: "localhost".into(), port: addr.port() });
    assert_eq!(host.socket_addr(), Some(addr));
    assert_eq!(attempt(&Pools::new(), &rt).await, Some(addr.port()));
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn original_dst_sends_to_the_original_destination() {
    let (a, backend_a) = backend(Proto::H1, Behaviour::default()).await;
    let (b, backend_b) = backend(Proto::H1, Behaviour::default()).await;
    let mut c = cluster("orig", vec![]);
    c.discovery = Discovery::OriginalDst { http_header_name: None };
    let (_m, rt) = runtime(c);
    let pools = Pools::new();
    for dst in [a, b, a] {
        let host = rt.choose(&LbContext { original_dst: Some(dst), ..Default::default() }).unwrap();
        let resp = pools.send(&rt, &host, get("orig", "/"), false).await.unwrap();
        assert_eq!(read_body(resp).await.0, StatusCode::OK);
    }
    assert_eq!((backend_a.requests(), backend_b.requests()), (2, 1));
    assert_eq!(backend_a.accepted(), 1, "the host (and its pool) is reused for the same destination");
}

fn failing_cluster(good: SocketAddr, bad: SocketAddr, od: OutlierDetection) -> sluice_config::model::Cluster {
    let mut c = cluster("outlier", vec![endpoint(good), endpoint(bad)]);
    c.outlier_detection = Some(od);
    c
}

#[tokio::test]
async fn consecutive_5xx_ejects_the_failing_backend_then_it_returns() {
    let (good, good_backend) = backend(Proto::H1, Behaviour::default()).await;
    let (bad, bad_backend) =
        backend(Proto::H1, Behaviour { status: StatusCode::SERVICE_UNAVAILABLE, ..Default::default() }).await;
    let od =
        OutlierDetection { consecutive_5xx: 3, base_ejection_time: Duration::from_millis(300), ..outlier_detection() };
    let (_m, rt) = runtime(failing_cluster(good, bad, od));
    let pools = Pools::new();
    for _ in 0..30 {
        attempt(&pools, &rt).await;
    }
    // Round robin alternates, so the bad backend got three 503s in a row and was ejected.
    assert_eq!(bad_backend.requests(), 3);
    assert_eq!(good_backend.requests(), 27);
    assert_eq!(rt.stats().ejections_enforced_consecutive_5xx.load(Ordering::Relaxed), 1);
    assert_eq!(rt.stats().ejections_active.load(Ordering::Relaxed), 1);
    // After base_ejection_time it is back in rotation.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..4 {
        attempt(&pools, &rt).await;
    }
    assert_eq!(bad_backend.requests(), 5);
    assert_eq!(rt.stats().ejections_active.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn connect_failures_eject_with_split_local_origin_errors() {
    let (good, good_backend) = backend(Proto::H1, Behaviour::default()).await;
    let refused = refused_addr();
    let od = OutlierDetection {
        split_external_local_origin_errors: true,
        consecutive_local_origin_failure: 2,
        ..outlier_detection()
    };
    let (_m, rt) = runtime(failing_cluster(good, refused, od));
    let pools = Pools::new();
    let mut failures = 0;
    for _ in 0..20 {
        if attempt(&pools, &rt).await.is_none() {
            failures += 1;
        }
    }
    assert_eq!(failures, 2, "two connect failures, then the host is ejected");
    assert_eq!(good_backend.requests(), 18);
    assert_eq!(rt.stats().ejections_enforced_consecutive_local_origin_failure.load(Ordering::Relaxed), 1);
    assert_eq!(rt.stats().cx_connect_fail.load(Ordering::Relaxed), 2);
    let ejected: Vec<_> = rt.hosts().iter().filter(|h| h.is_ejected()).map(|h| h.socket_addr()).collect();
    assert_eq!(ejected, vec![Some(refused)]);
}

#[tokio::test]
async fn least_request_counts_requests_in_flight() {
    let (slow, _slow_backend) =
        backend(Proto::H1, Behaviour { delay: Duration::from_millis(300), ..Default::default() }).await;
    let mut c = cluster("lr", vec![endpoint(slow)]);
    c.lb_policy = sluice_config::model::LbPolicy::LeastRequest { choice_count: 2 };
    let (_m, rt) = runtime(c);
    let pools = Pools::new();
    let host = rt.choose(&LbContext::default()).unwrap();
    let in_flight = async {
        let r = pools.send(&rt, &host, get("lr", "/"), false).await.unwrap();
        read_body(r).await
    };
    let observer = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        host.active_requests()
    };
    let (_, seen) = tokio::join!(in_flight, observer);
    assert_eq!(seen, 1, "active while the request is in flight");
    assert_eq!(host.active_requests(), 0, "released when the response body ended");
}
