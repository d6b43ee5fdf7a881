//! Cilium's own service-mesh examples, read in place from the corpus, served by a real
//! `sluice` process with local backends behind the Services they name.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn example(name: &str) -> Option<String> {
    let p: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/corpus/cec/cilium/examples/kubernetes/servicemesh/envoy")
        .join(name);
    match std::fs::read_to_string(&p) {
        Ok(s) => Some(s),
        Err(_) => {
            eprintln!("SKIPPED: {} is not present (the corpus lives next to the checkout)", p.display());
            None
        }
    }
}

fn backend_of(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["backend"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helloworld_90_10_split_retries_and_outlier_detection() {
    let Some(cec) = example("envoy-helloworld-v1-90-v2-10.yaml") else { return };
    // v1 fails every third request with 503: the route retries 5xx, so clients never see it.
    let v1 = Backend::start_with(
        "helloworld-v1",
        Arc::new(|_, n| if n % 3 == 0 { Reply::Respond(status(503)) } else { Reply::Echo }),
    )
    .await;
    let v2 = Backend::start("helloworld-v2").await;
    // Outlier detection: a second v2 endpoint that refuses connections is ejected after two
    // local-origin failures (consecutive_local_origin_failure: 2).
    let dead = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let services = [
        service_yaml("default", "helloworld", &[v1.addr]),
        service_yaml("default", "helloworld-v1", &[v1.addr]),
        service_yaml("default", "helloworld-v2", &[v2.addr, dead]),
    ]
    .join("---\n");
    let sluice = Sluice::start(&[("cec.yaml", &cec), ("services.yaml", &services)]);
    let addr = sluice.listener("default/envoy-lb-listener/envoy-lb-listener");
    let c = client(false);
    let (mut n1, mut n2) = (0, 0);
    let total = 2000;
    for _ in 0..total {
        let (st, _, body) = get(&c, &format!("http://{addr}/"), &[]).await;
        assert_eq!(
            st,
            200,
            "a retried 503 or the dead endpoint leaked to the client: {}",
            String::from_utf8_lossy(&body)
        );
        match backend_of(&body).as_str() {
            "helloworld-v1" => n1 += 1,
            "helloworld-v2" => n2 += 1,
            other => panic!("unexpected backend {other:?}"),
        }
    }
    // 10 % of 2000 = 200; the binomial standard deviation is ~13.4, so allow 4 sigma.
    println!("split over {total} requests: v1 {n1}, v2 {n2}");
    assert!((146..=254).contains(&n2), "v2 got {n2} of {total}");
    assert!(v1.hits() > n1, "v1 should have seen the retried attempts too");
    let dump = sluice.config_dump();
    assert_eq!(dump["snapshot"]["sources"][0]["state"], "accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_retries_a_slow_backend() {
    let Some(cec) = example("envoy-helloworld-v1-90-v2-10.yaml") else { return };
    // One v1 endpoint accepts and never answers; per_try_timeout (1 s) cuts each attempt on
    // it and the retry goes to the healthy endpoint.
    let v1 = Backend::start("helloworld-v1").await;
    let v2 = Backend::start("helloworld-v2").await;
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_addr = hang.local_addr().unwrap();
    // A backend that accepts and never answers.
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let services = [
        service_yaml("default", "helloworld", &[v1.addr]),
        service_yaml("default", "helloworld-v1", &[hang_addr, v1.addr]),
        service_yaml("default", "helloworld-v2", &[v2.addr]),
    ]
    .join("---\n");
    let cec = cec.replace("weight: 10\n", "weight: 0\n").replace("weight: 90\n", "weight: 100\n");
    let sluice = Sluice::start(&[("cec.yaml", &cec), ("services.yaml", &services)]);
    let addr = sluice.listener("default/envoy-lb-listener/envoy-lb-listener");
    let c = client(false);
    for _ in 0..4 {
        let t = Instant::now();
        let (st, _, body) = get(&c, &format!("http://{addr}/"), &[]).await;
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(backend_of(&body), "helloworld-v1");
        assert!(
            t.elapsed() < Duration::from_millis(2900),
            "per_try_timeout did not cut the hanging attempt: {:?}",
            t.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_management_50_50_and_regex_rewrite() {
    let Some(cec) = example("envoy-traffic-management-test.yaml") else { return };
    let b1 = Backend::start("echo-service-1").await;
    let b2 = Backend::start("echo-service-2").await;
    let services =
        [service_yaml("default", "echo-service-1", &[b1.addr]), service_yaml("default", "echo-service-2", &[b2.addr])]
            .join("---\n");
    let sluice = Sluice::start(&[("cec.yaml", &cec), ("services.yaml", &services)]);
    let addr = sluice.listener("/envoy-lb-listener/envoy-lb-listener");
    let c = client(false);
    let (mut n1, mut n2) = (0, 0);
    for _ in 0..1000 {
        let (st, _, body) = get(&c, &format!("http://{addr}/foo/bar?x=1"), &[]).await;
        assert_eq!(st, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        // `^/foo.*$` -> `/`: the whole path is replaced, the query kept.
        assert_eq!(v["path"], "/?x=1");
        match v["backend"].as_str().unwrap() {
            "echo-service-1" => n1 += 1,
            _ => n2 += 1,
        }
    }
    println!("50/50 over 1000: {n1} / {n2}");
    assert!((400..=600).contains(&n1), "{n1} / {n2}");
    // A path the regex does not match is forwarded unchanged.
    let (_, _, body) = get(&c, &format!("http://{addr}/other"), &[]).await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["path"], "/other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_overflow_is_503_with_x_envoy_overloaded() {
    let Some(cec) = example("envoy-circuit-breaker.yaml") else { return };
    // Each request holds its slot for 300 ms, so concurrent ones overflow max_requests: 2 /
    // max_pending_requests: 1.
    let b = Backend::start_with("echo-service", Arc::new(|_, _| Reply::Delay(Duration::from_millis(300)))).await;
    let services = service_yaml("default", "echo-service", &[b.addr]);
    let sluice = Sluice::start(&[("cec.yaml", &cec), ("services.yaml", &services)]);
    let addr = sluice.listener("/envoy-circuit-breaker/envoy-lb-listener");
    // One request first, so a pooled connection exists: later requests then queue for a
    // connection (pending) only beyond it, as in Envoy.
    let (st, _, _) = get(&client(false), &format!("http://{addr}/"), &[]).await;
    assert_eq!(st, 200);
    let mut tasks = Vec::new();
    for _ in 0..12 {
        tasks.push(tokio::spawn(async move {
            let c = client(false);
            get(&c, &format!("http://{addr}/"), &[]).await
        }));
    }
    let (mut ok, mut overflow) = (0, 0);
    for t in tasks {
        let (st, h, body) = t.await.unwrap();
        match st.as_u16() {
            200 => ok += 1,
            503 => {
                assert_eq!(h.get("x-envoy-overloaded").map(|v| v.to_str().unwrap()), Some("true"));
                assert!(String::from_utf8_lossy(&body).contains("overflow"), "{}", String::from_utf8_lossy(&body));
                overflow += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    println!("circuit breaker: {ok} ok, {overflow} overflowed");
    assert!(ok >= 2 && overflow >= 1, "{ok} ok, {overflow} overflow");
}
