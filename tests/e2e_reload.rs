//! File mode: configuration edits take effect quickly, without failing a single request, and
//! a broken edit leaves the running configuration in place and is reported.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

fn cec(weights: (u32, u32), extra_route: bool, regex: &str) -> String {
    let extra = if extra_route {
        "            - match: {prefix: /new}\n              direct_response: {status: 200, body: {inline_string: fresh}}\n"
    } else {
        ""
    };
    format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {{name: split, namespace: default}}
spec:
  backendServices: [{{name: a}}, {{name: b}}]
  resources:
    - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
      name: split
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: split
                rds: {{route_config_name: split}}
                http_filters: [{{name: envoy.filters.http.router}}]
    - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
      name: split
      virtual_hosts:
        - name: split
          domains: ["*"]
          routes:
{extra}            - match: {{safe_regex: {{regex: "{regex}"}}}}
              route:
                weighted_clusters:
                  clusters:
                    - {{name: default/a, weight: {}}}
                    - {{name: default/b, weight: {}}}
    - {{"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: default/a, type: EDS}}
    - {{"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: default/b, type: EDS}}
"#,
        weights.0, weights.1
    )
}

fn backend(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["backend"].as_str().map(String::from))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_apply_within_a_second_without_failed_requests() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let services = [service_yaml("default", "a", &[a.addr]), service_yaml("default", "b", &[b.addr])].join("---\n");
    let sluice = Sluice::start(&[("cec.yaml", &cec((100, 0), false, "/.*")), ("services.yaml", &services)]);
    let addr = sluice.listener("default/split/split");

    // Continuous load: keep-alive HTTP/1.1, h2c, and a new connection per request.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(AtomicUsize::new(0));
    let last_b = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let mut tasks = Vec::new();
    for mode in 0..3 {
        let (stop, failures, total, last_b) = (stop.clone(), failures.clone(), total.clone(), last_b.clone());
        tasks.push(tokio::spawn(async move {
            let keep = client(mode == 1);
            while !stop.load(Ordering::Relaxed) {
                let c = if mode == 2 { client(false) } else { keep.clone() };
                let (st, _, body) = get(&c, &format!("http://{addr}/x"), &[]).await;
                total.fetch_add(1, Ordering::Relaxed);
                if st != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                } else if backend(&body) == "b" {
                    let mut l = last_b.lock().unwrap();
                    if l.is_none() {
                        *l = Some(Instant::now());
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(last_b.lock().unwrap().is_none(), "b must get nothing before the edit");

    // Edit 1: all traffic to b, and a new route.
    let edited = Instant::now();
    sluice.write("cec.yaml", &cec((0, 100), true, "/.*"));
    let deadline = Instant::now() + Duration::from_secs(3);
    while last_b.lock().unwrap().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = last_b.lock().unwrap().map(|t| t.duration_since(edited));
    println!("weight change took effect after {took:?}");
    assert!(took.is_some_and(|t| t < Duration::from_secs(1)), "the weight change took {took:?}");
    let (st, _, body) = get(&client(false), &format!("http://{addr}/new"), &[]).await;
    assert_eq!((st.as_u16(), &body[..]), (200, &b"fresh"[..]), "the added route");

    // Edit 2: broken (invalid regex). The previous version keeps serving, and it is reported.
    let gen_before = sluice.generation();
    sluice.write("cec.yaml", &cec((50, 50), true, "/(unclosed"));
    let deadline = Instant::now() + Duration::from_secs(3);
    while sluice.generation() == gen_before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dump = sluice.config_dump();
    let source = &dump["snapshot"]["sources"][0];
    assert_eq!(source["state"], "previous_version", "{source}");
    let diags = dump["snapshot"]["diagnostics"].to_string();
    assert!(diags.contains("invalid regex"), "{diags}");
    for _ in 0..50 {
        let (st, _, body) = get(&client(false), &format!("http://{addr}/x"), &[]).await;
        assert_eq!(st, 200);
        assert_eq!(backend(&body), "b", "the last good version (100 % to b) must keep serving");
    }

    // Edit 3: a YAML syntax error refuses the whole reload.
    sluice.write("cec.yaml", "apiVersion: cilium.io/v2\nkind: [unclosed\n");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (st, _, body) = get(&client(false), &format!("http://{addr}/x"), &[]).await;
    assert_eq!((st.as_u16(), backend(&body)), (200, "b".to_string()));
    assert!(
        sluice.config_dump()["last_reload"].as_str().unwrap_or("").contains("Refused"),
        "{}",
        sluice.config_dump()["last_reload"]
    );

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (f, n) = (failures.load(Ordering::Relaxed), total.load(Ordering::Relaxed));
    println!("{n} requests during the edits, {f} failed");
    assert!(n > 100, "load generator too slow: {n}");
    assert_eq!(f, 0, "requests failed during reloads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_appear_and_disappear_with_the_config() {
    let a = Backend::start("a").await;
    let services = service_yaml("default", "a", &[a.addr]);
    let sluice = Sluice::start(&[("services.yaml", &services)]);
    assert!(sluice.config_dump()["snapshot"]["listeners"].as_array().unwrap().is_empty());
    sluice.write("cec.yaml", &cec((100, 0), false, "/.*").replace("default/b, weight: 0", "default/a, weight: 0"));
    let addr = sluice.listener("default/split/split");
    let (st, _, _) = get(&client(false), &format!("http://{addr}/x"), &[]).await;
    assert_eq!(st, 200);
    // Removing the CEC closes the listener.
    std::fs::remove_file(sluice.path().join("cec.yaml")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "listener {addr} still accepts after its CEC was removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
