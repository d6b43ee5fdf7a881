//! The eBPF fast path through the real `sluice` binary: unmodified client processes connect to
//! a Service VIP, the connect is rewritten to Sluice's listener, the request goes through the
//! router (the backend sees the header the route adds), `getpeername` still says VIP, and the
//! bytes between client and Sluice are carried by sk_msg redirect.
//!
//! Needs root (BPF, cgroups, network namespaces); elsewhere every test prints
//! `*** SKIPPED <test>: <reason> ***`. Traffic stays on 127.0.0.0/8 or inside the two network
//! namespaces the pod test creates. See `tests/fastpath/mod.rs` for the layout.

mod common;
mod fastpath;

use std::net::SocketAddr;
use std::time::Duration;

use fastpath::*;
use serde_json::{Value, json};

/// A Sluice in this network namespace, serving `vip` through a route to a backend that this
/// test process runs (outside the attached cgroup).
struct SameNamespace {
    // Field order is drop order: Sluice goes before its cgroup, the backend last.
    sluice: SluiceProc,
    cg: TestCgroup,
    vip: SocketAddr,
    _backend: tokio::runtime::Runtime,
}

/// The backend behind the route.
enum Backend<'a> {
    /// The echo backend on an ephemeral loopback port.
    Echo,
    /// The echo backend on this address.
    EchoOn(&'a str),
    /// Accepts connections and never reads from them.
    Silent,
}

impl SameNamespace {
    /// The backend Service's endpoint is the backend's address.
    fn start(test: &str, tag: &str, vip: &str, kind: Backend<'_>) -> Option<SameNamespace> {
        let mount = environment(test, false)?;
        let cg = TestCgroup::new(&mount, tag).expect("creating the test cgroups");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let bind: SocketAddr = match kind {
            Backend::EchoOn(a) => a,
            Backend::Echo | Backend::Silent => "127.0.0.1:0",
        }
        .parse()
        .expect("backend address");
        let listener = rt.block_on(tokio::net::TcpListener::bind(bind)).expect("binding the backend");
        let backend = listener.local_addr().expect("backend address");
        match kind {
            Backend::Echo | Backend::EchoOn(_) => {
                rt.spawn(fastpath::child::serve(listener));
            }
            Backend::Silent => {
                rt.spawn(async move {
                    let mut held = Vec::new();
                    while let Ok((s, _)) = listener.accept().await {
                        held.push(s);
                    }
                });
            }
        }
        let vip: SocketAddr = vip.parse().expect("VIP");
        let layout = Layout { vip, listener: None, backend, name: "fastpath" };
        let sluice =
            match SluiceProc::start(&layout.files(), SluiceOpts { cgroup: &cg, netns: None, node_address: None }) {
                Ok(s) => s,
                Err(StartError::Unsupported(reason)) => return skip(test, reason),
            };
        sluice.listener(&layout.listener_name());
        let status = sluice.fast_path_status();
        assert_eq!(status["services"], 1, "the VIP is not in the Service table: {status}\n{}", sluice.log_tail());
        Some(SameNamespace { sluice, cg, vip, _backend: rt })
    }

    /// Runs a client role in `app/`; a client that could not even talk to Sluice fails the
    /// test with the fast path's state and Sluice's log.
    fn client(&self, spec: Value, deadline: Duration) -> Value {
        let r = run_client(Place::cgroup(&self.cg.app), spec, deadline);
        if r.get("error").is_some() {
            panic!(
                "client failed: {r}\nfast path: {}\nSluice's log:\n{}",
                self.sluice.fast_path_status(),
                self.sluice.log_tail()
            );
        }
        r
    }
}

/// Asserts a `get` result is a 200 from the backend, through the route, with the VIP as peer.
fn assert_routed(r: &Value, vip: SocketAddr) {
    assert!(r.get("error").is_none(), "client failed: {r}");
    let response = r["response"].as_str().unwrap_or("");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains(&format!("x-seen-route: {ROUTE_VALUE}")),
        "the backend did not see the route's header: {response}"
    );
    assert_eq!(r["peer"], vip.to_string(), "getpeername() must return the VIP");
}

/// Waits until every spliced socket has left the SOCKHASH and every original destination was
/// collected; returns the last status.
fn assert_drained(sluice: &SluiceProc) -> Value {
    let mut last = Value::Null;
    let drained = eventually(Duration::from_secs(5), || {
        last = sluice.fast_path_status();
        (last["sockhash_entries"] == 0 && last["pending_original_dsts"] == 0).then_some(())
    });
    assert!(drained.is_some(), "the fast path kept state after every connection closed: {last}");
    last
}

#[test]
fn same_namespace_client_is_redirected_routed_and_spliced() {
    const TEST: &str = "same_namespace_client_is_redirected_routed_and_spliced";
    let _serial = serial();
    let Some(s) = SameNamespace::start(TEST, "same-ns", "127.96.7.10:80", Backend::Echo) else { return };
    let before = s.sluice.fast_path_status();
    assert_eq!(before["splice_cgroups"], 1);

    let r = s.client(json!({"role": "get", "vip": s.vip.to_string(), "path": "/same-ns"}), Duration::from_secs(20));
    assert_routed(&r, s.vip);
    assert!(r["local"].as_str().is_some_and(|l| l.starts_with("127.0.0.1:")), "{r}");

    let after = assert_drained(&s.sluice);
    let bytes = r["sent"].as_u64().unwrap() + r["received"].as_u64().unwrap();
    eprintln!("same namespace: {bytes} bytes exchanged; counters after: {}", after["stats"]);
    assert_eq!(delta(&before, &after, "connect4_rewrites"), 1);
    assert_eq!(delta(&before, &after, "orig_dst_recorded"), 1);
    assert_eq!(delta(&before, &after, "sockhash_inserts_client"), 1);
    assert_eq!(delta(&before, &after, "sockhash_inserts_proxy"), 1);
    assert!(delta(&before, &after, "getpeername_rewrites") >= 1);
    // Every byte of the request and of the response went by sk_msg redirect, none by TCP.
    assert_eq!(delta(&before, &after, "redirected_bytes"), bytes, "{after}");
    assert_eq!(delta(&before, &after, "passed_bytes"), 0, "{after}");

    // The counters Sluice logs when it stops agree.
    let at_exit = s.sluice.stop();
    assert_eq!(counter(&at_exit, "redirected_bytes"), counter(&after, "redirected_bytes"));
    drop(s.cg);
}

#[test]
fn pod_in_its_own_netns_reaches_sluice_on_the_node_address() {
    const TEST: &str = "pod_in_its_own_netns_reaches_sluice_on_the_node_address";
    let _serial = serial();
    let Some(mount) = environment(TEST, true) else { return };
    let cg = TestCgroup::new(&mount, "pod").expect("creating the test cgroups");
    let pair = NetnsPair::create().expect("creating the node and pod network namespaces");
    let node = Place { cgroup: None, netns: Some(&pair.node) };
    let backend = BackendProc::start(node, "127.0.0.1:0");
    let vip: SocketAddr = "127.96.7.20:80".parse().unwrap();
    let listen: SocketAddr = "0.0.0.0:15080".parse().unwrap();
    let layout = Layout { vip, listener: Some(listen), backend: backend.addr, name: "fastpath-pod" };
    let opts = SluiceOpts { cgroup: &cg, netns: Some(&pair.node), node_address: Some(pair.node_ip) };
    let sluice = match SluiceProc::start(&layout.files(), opts) {
        Ok(s) => s,
        Err(StartError::Unsupported(reason)) => {
            skip::<()>(TEST, reason);
            return;
        }
    };
    sluice.wait_listening(listen.port());
    // The VIP is rewritten to the node-side address Sluice listens on, not to loopback.
    let node_target = format!("{vip} -> {}:{}", pair.node_ip, listen.port());
    let tables = sluice.logged("fast path Service table updated");
    assert!(
        tables.iter().any(|t| t["table"].as_str().is_some_and(|s| s.contains(&node_target))),
        "no {node_target} in {tables:?}"
    );
    let before = sluice.fast_path_status();

    let pod = Place::cgroup(&cg.app).in_netns(&pair.pod);
    let r = run_client(pod, json!({"role": "get", "vip": vip.to_string(), "path": "/pod"}), Duration::from_secs(20));
    assert_routed(&r, vip);
    assert!(r["local"].as_str().is_some_and(|l| l.starts_with(&format!("{}:", pair.pod_ip))), "{r}");

    let after = assert_drained(&sluice);
    let bytes = r["sent"].as_u64().unwrap() + r["received"].as_u64().unwrap();
    eprintln!("pod: {bytes} bytes exchanged; counters after: {}", after["stats"]);
    assert_eq!(delta(&before, &after, "connect4_rewrites"), 1);
    assert_eq!(delta(&before, &after, "sockhash_inserts_client"), 1);
    assert_eq!(delta(&before, &after, "sockhash_inserts_proxy"), 1);
    assert_eq!(delta(&before, &after, "redirected_bytes"), bytes, "spliced across the namespaces: {after}");
    assert_eq!(delta(&before, &after, "passed_bytes"), 0, "{after}");
    drop(sluice);
    drop(backend);
    drop(pair);
    drop(cg);
}

#[test]
fn messages_from_1_byte_to_1_mib_survive_h1_and_h2() {
    const TEST: &str = "messages_from_1_byte_to_1_mib_survive_h1_and_h2";
    const SIZES: [u64; 15] =
        [1, 2, 7, 100, 1024, 1500, 4096, 16383, 16384, 65535, 65536, 65537, 200_000, 524_288, 1_048_576];
    let _serial = serial();
    let Some(s) = SameNamespace::start(TEST, "integrity", "127.96.7.30:80", Backend::Echo) else { return };
    let before = s.sluice.fast_path_status();
    let r = s.client(
        json!({"role": "integrity", "vip": s.vip.to_string(), "sizes": SIZES, "seed": 7}),
        Duration::from_secs(40),
    );
    eprintln!("integrity: {r}");
    assert_eq!(r["h1_bad"], json!([]), "HTTP/1.1 echoes differ");
    assert_eq!(r["h2_bad"], json!([]), "h2 echoes differ");
    assert_eq!(r["h1_ok"], 2 * SIZES.len() as u64);
    assert_eq!(r["h2_ok"], SIZES.len() as u64);
    assert_eq!(r["peers"], json!(vec![s.vip.to_string(); 3]));
    let after = assert_drained(&s.sluice);
    eprintln!("integrity: counters {}", after["stats"]);
    assert_eq!(delta(&before, &after, "sockhash_inserts_client"), 3);
    assert_eq!(delta(&before, &after, "sockhash_inserts_proxy"), 3);
    // Messages above the per-connection credit (1 MiB) leave the redirect path for TCP by
    // design; everything before them was redirected.
    assert!(delta(&before, &after, "redirected_bytes") > SIZES[..12].iter().sum::<u64>() * 2, "{after}");
}

#[test]
fn ten_thousand_connections_through_sluice_leave_nothing_behind() {
    const TEST: &str = "ten_thousand_connections_through_sluice_leave_nothing_behind";
    const CONNS: u64 = 10_000;
    let _serial = serial();
    let Some(s) = SameNamespace::start(TEST, "churn", "127.96.7.50:80", Backend::Echo) else { return };
    let before = s.sluice.fast_path_status();
    let r = s.client(
        json!({
            "role": "churn",
            "vip": s.vip.to_string(),
            "count": CONNS,
            "concurrency": 32,
            "sizes": [1, 64, 512, 1500, 4096, 9000, 16384, 65536, 100, 2048],
            "seed": 11,
            "stall_ms": 5000,
        }),
        Duration::from_secs(60),
    );
    eprintln!("churn: {r}");
    assert_eq!(
        (&r["ok"], &r["stalls"], &r["corrupt"], &r["errors"], &r["not_vip"]),
        (&json!(CONNS), &json!(0), &json!(0), &json!(0), &json!(0)),
        "ok/stalls/corrupt/errors/not-VIP peers; first error: {}; fast path before: {before}; Sluice's log:\n{}",
        r["first_error"],
        s.sluice.log_tail()
    );
    let after = assert_drained(&s.sluice);
    eprintln!("churn: counters {}", after["stats"]);
    assert_eq!(delta(&before, &after, "connect4_rewrites"), CONNS);
    assert_eq!(delta(&before, &after, "orig_dst_recorded"), CONNS);
    assert_eq!(delta(&before, &after, "sockhash_inserts_client"), CONNS);
    assert_eq!(delta(&before, &after, "sockhash_inserts_proxy"), CONNS);
    assert_eq!(delta(&before, &after, "sockhash_insert_failures"), 0);
    assert_eq!(delta(&before, &after, "passive_unpaired"), 0);
    // Every message fits the credit (the largest is 64 KiB): all of them were redirected.
    assert!(delta(&before, &after, "redirected_bytes") > 0);
    assert_eq!(delta(&before, &after, "passed_bytes"), 0, "{after}");
}

#[test]
fn a_fast_client_cannot_queue_unbounded_memory_behind_a_slow_upstream() {
    const TEST: &str = "a_fast_client_cannot_queue_unbounded_memory_behind_a_slow_upstream";
    let _serial = serial();
    // The upstream accepts and never reads, so Sluice soon stops reading the client. The
    // redirect path has no flow control of its own: without the BPF credit bound (and PAUSED)
    // a spliced client could push hundreds of MiB into Sluice's socket in a fraction of a
    // second. With it, the client falls back to TCP after a bounded amount and blocks.
    let Some(s) = SameNamespace::start(TEST, "backpressure", "127.96.7.60:80", Backend::Silent) else { return };
    let before = s.sluice.fast_path_status();
    let cap: u64 = 512 << 20;
    let r = s.client(json!({"role": "flood", "vip": s.vip.to_string(), "cap": cap}), Duration::from_secs(40));
    let after = s.sluice.fast_path_status();
    eprintln!("backpressure: {r}; counters {}", after["stats"]);
    assert!(r.get("error").is_none(), "{r}");
    assert_eq!(r["peer"], s.vip.to_string());
    assert_eq!(r["blocked"], true, "the client was never slowed down: {r}");
    // What may legitimately be in flight: the credit, Sluice's read buffer, and the socket
    // buffers on both legs at their autotuning maximum.
    let bound = 2 * (tcp_buffer_max("tcp_rmem") + tcp_buffer_max("tcp_wmem")) + (16 << 20);
    let written = r["written"].as_u64().unwrap();
    assert!(written < bound, "{written} bytes went in before the client blocked (bound {bound})");
    assert!(
        delta(&before, &after, "tainted_credit") + delta(&before, &after, "tainted_paused") >= 1,
        "the client was not moved to TCP: {after}"
    );
    assert!(delta(&before, &after, "redirected_bytes") > 0);
}

/// A download larger than the credit: Sluice's side of the connection falls back to TCP
/// half-way, so the client's socket holds redirected and TCP bytes at once. The client reads
/// nothing for a while, so the TCP part fills its receive window first. This is the situation
/// in which a reader that takes a short read for an empty socket stalls (see
/// `sluice_proxy::fastpath::FastPathStream`); the client here reads until `EAGAIN`.
#[test]
fn a_download_past_the_credit_completes_when_sluice_falls_back_to_tcp() {
    const TEST: &str = "a_download_past_the_credit_completes_when_sluice_falls_back_to_tcp";
    const SIZE: u64 = 4 << 20;
    let _serial = serial();
    let Some(s) = SameNamespace::start(TEST, "download", "127.96.7.70:80", Backend::Echo) else { return };
    let before = s.sluice.fast_path_status();
    let r = s.client(
        json!({"role": "download", "vip": s.vip.to_string(), "size": SIZE, "pause_ms": 300}),
        Duration::from_secs(30),
    );
    let after = s.sluice.fast_path_status();
    eprintln!("download: {r}; counters {}", after["stats"]);
    assert_eq!(r["stalled"], false, "the download stalled: {r}");
    assert_eq!(r["received"], SIZE, "{r}");
    assert_eq!(delta(&before, &after, "tainted_credit"), 1, "Sluice's side should fall back to TCP once: {after}");
    assert!(delta(&before, &after, "redirected_bytes") > 0 && delta(&before, &after, "passed_bytes") > 0, "{after}");
}

/// `net.ipv4.<name>[2]`: the largest buffer TCP autotuning gives a socket.
fn tcp_buffer_max(name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
        .unwrap_or(8 << 20)
}

#[test]
fn sluice_does_not_loop_when_a_cluster_endpoint_is_a_vip() {
    const TEST: &str = "sluice_does_not_loop_when_a_cluster_endpoint_is_a_vip";
    let _serial = serial();
    // The backend Service's endpoint is the frontend VIP itself, and the real backend listens
    // on it. Sluice's upstream connect must reach that backend; redirected, it would come back
    // to Sluice and loop.
    let vip = "127.96.7.40:80";
    let Some(s) = SameNamespace::start(TEST, "loop", vip, Backend::EchoOn(vip)) else { return };
    let before = s.sluice.fast_path_status();
    let r = s.client(json!({"role": "get", "vip": vip, "path": "/loop"}), Duration::from_secs(20));
    assert_routed(&r, s.vip);
    let after = assert_drained(&s.sluice);
    eprintln!("loop guard: counters {}", after["stats"]);
    assert_eq!(delta(&before, &after, "connect4_rewrites"), 1, "only the client's connect is rewritten");
    assert!(
        delta(&before, &after, "skipped_bypass") + delta(&before, &after, "skipped_self_cgroup") >= 1,
        "Sluice's upstream connect to the VIP was not recognised: {after}"
    );
}

/// Entry point of the client and backend processes the tests above start (this binary run
/// again with a role in the environment; see `tests/fastpath/child.rs`).
#[test]
#[ignore = "entry point of the processes the fast-path tests start; does nothing on its own"]
fn fastpath_child() {
    match std::env::var(CHILD_ENV) {
        Ok(spec) => fastpath::child::run(&spec),
        Err(_) => eprintln!("fastpath_child only runs as a process started by the fast-path tests"),
    }
}
