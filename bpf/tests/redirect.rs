//! Transparent redirect, end to end: IPv4, IPv6 and v4-mapped VIPs, splice opt-in, loop guards
//! and a pod in its own network namespace. Real sockets, real cgroups, real BPF programs.
//!
//! Root only: each test skips with a loud reason when it cannot run here. See
//! `support/mod.rs` for the layout (per-test cgroup with `app/` and `proxy/`, a client
//! process in `app/`, a tokio relay standing in for Sluice in `proxy/`).

mod support;

use std::{net::SocketAddr, process::Command, sync::atomic::Ordering, time::Duration};

use sluice_bpf::{FastPath, Redirect};
use support::*;
use tokio::net::TcpListener;

const MIB: usize = 1024 * 1024;

/// Message sizes of the integrity checks: 1 B to 1 MiB, around page and segment boundaries.
const SIZES: &str = "1,7,100,1024,1500,4096,16384,65536,65537,200000,1048576";
const SIZES_COUNT: u64 = 11;
const SIZES_TOTAL: u64 = 1 + 7 + 100 + 1024 + 1500 + 4096 + 16384 + 65536 + 65537 + 200000 + 1048576;

fn echo_args(vip: SocketAddr, count: u64, sizes: &str) -> Vec<String> {
    vec![s("--addr"), s(vip), s("--count"), s(count), s("--sizes"), s(sizes)]
}

/// Waits for the SOCKHASH to drain (the kernel removes a socket when it closes) and checks
/// that every original destination was collected.
fn assert_maps_drained(fp: &FastPath) {
    assert!(
        eventually(Duration::from_secs(5), || fp.sockhash_len() == 0),
        "SOCKHASH still holds {} sockets after every connection closed",
        fp.sockhash_len()
    );
    let status = fp.status();
    assert_eq!(status.pending_original_dsts, 0, "uncollected ORIG_DST entries");
}

/// An unmodified client connects to a VIP: the connect lands on the relay, getpeername says
/// VIP, the relay recovers the VIP, and every byte (1 B .. 1 MiB, both directions) travels by
/// sk_msg redirect. Then, with splicing switched off for the client's cgroup, the redirect
/// still works but nothing is spliced.
#[test]
fn ipv4_vip_is_redirected_spliced_and_intact() {
    const TEST: &str = "ipv4_vip_is_redirected_spliced_and_intact";
    let _serial = serial();
    let Some(mount) = environment(TEST) else { return };
    let cg = TestCgroup::new(&mount, "v4").expect("creating test cgroups");
    // Credit above the largest message, so no socket falls back to TCP: exact byte counts.
    let Some(fp) = start_fastpath(TEST, &cg, &[&cg.app], 4 * MIB) else { return };
    let rt = runtime();
    rt.block_on(async {
        let direct = spawn_direct("127.96.0.10", 80).await;
        let vip = direct.addr;
        let backend = spawn_echo_backend("127.0.0.1:0".parse().unwrap()).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_addr = listener.local_addr().unwrap();
        fp.set_listeners(&[relay_addr]).unwrap();
        fp.set_services(&[Redirect::new(vip, relay_addr)]).unwrap();
        let relay = spawn_relay(fp.clone(), listener, backend, RelayOpts::default());

        // Spliced.
        let before = fp.stats();
        let app = cg.app.clone();
        let args = echo_args(vip, SIZES_COUNT, SIZES);
        let r =
            tokio::task::spawn_blocking(move || run_echo_client(Launch::Cgroup(&app), &args, Duration::from_secs(30)))
                .await
                .unwrap();
        r.assert_all_ok(SIZES_COUNT, "spliced echo");
        assert_eq!(r.peers, vec![vip.to_string()], "getpeername must return the VIP");
        let d = fp.stats().since(&before);
        eprintln!("spliced: {d:?}");
        assert_eq!(relay.accepted.load(Ordering::Relaxed), SIZES_COUNT);
        assert_eq!(
            relay.orig_counts().get(&vip.to_string()).copied(),
            Some(SIZES_COUNT),
            "original_dst must return the VIP: {:?}",
            relay.orig_counts()
        );
        assert_eq!(direct.accepted.load(Ordering::Relaxed), 0, "a connect escaped the rewrite");
        assert_eq!(d.connect4_rewrites, SIZES_COUNT);
        assert_eq!(d.getpeername_rewrites, SIZES_COUNT);
        assert_eq!(d.orig_dst_recorded, SIZES_COUNT);
        assert_eq!(d.sockhash_inserts_client, SIZES_COUNT);
        assert_eq!(d.sockhash_inserts_proxy, SIZES_COUNT);
        assert_eq!(d.redirected_bytes, 2 * SIZES_TOTAL, "both directions redirected");
        assert_eq!(d.passed_msgs, 0, "no spliced message may go through TCP");
        assert_eq!(d.tainted_sockets(), 0);
        assert_maps_drained(&fp);

        // Not opted in: redirected, but not spliced.
        fp.set_splice_cgroups(&[]).unwrap();
        let before = fp.stats();
        let app = cg.app.clone();
        let args = echo_args(vip, 3, "1,65536,1048576");
        let r =
            tokio::task::spawn_blocking(move || run_echo_client(Launch::Cgroup(&app), &args, Duration::from_secs(30)))
                .await
                .unwrap();
        r.assert_all_ok(3, "unspliced echo");
        assert_eq!(r.peers, vec![vip.to_string()]);
        let d = fp.stats().since(&before);
        eprintln!("unspliced: {d:?}");
        assert_eq!(d.connect4_rewrites, 3);
        assert_eq!(d.orig_dst_recorded, 3);
        assert_eq!(d.sockhash_inserts_client + d.sockhash_inserts_proxy, 0);
        assert_eq!(d.redirected_bytes, 0);
        assert_eq!(relay.errors.load(Ordering::Relaxed), 0, "{:?}", relay.first_error);
        assert_maps_drained(&fp);

        let status = fp.status();
        let json = serde_json::to_value(&status).expect("status serialises");
        eprintln!("status: {json}");
        let attached: Vec<&str> = status.programs.iter().map(|p| p.attach).collect();
        assert_eq!(
            attached,
            ["sk_msg", "sockops", "cgroup/getpeername4", "cgroup/getpeername6", "cgroup/connect4", "cgroup/connect6"],
            "attach order"
        );
        assert_eq!((status.services, status.listeners, status.splice_cgroups), (1, 1, 0));
        assert_eq!(json["mode"], "on");
    });
    // Stop the relay (it holds the fast path), then drop the fast path: the programs must be
    // detached, so the same client connect now reaches the VIP itself.
    drop(rt);
    let fp = std::sync::Arc::try_unwrap(fp).unwrap_or_else(|_| panic!("fast path still shared"));
    drop(fp);
    let rt = runtime();
    rt.block_on(async {
        let direct = spawn_direct("127.96.0.10", 80).await;
        let app = cg.app.clone();
        let args = echo_args(direct.addr, 1, "0");
        let r =
            tokio::task::spawn_blocking(move || run_echo_client(Launch::Cgroup(&app), &args, Duration::from_secs(20)))
                .await
                .unwrap();
        r.assert_all_ok(1, "connect after the fast path was dropped");
        assert!(
            eventually(Duration::from_secs(2), || direct.accepted.load(Ordering::Relaxed) == 1),
            "after drop, a VIP connect must no longer be redirected"
        );
    });
}

/// A `[::1]` VIP reaches an IPv6 relay; a v4-mapped VIP from a dual-stack socket reaches the
/// IPv4 relay. getpeername returns the address the client used; original_dst the normalised
/// VIP; everything is spliced.
#[test]
fn ipv6_and_v4_mapped_vips() {
    const TEST: &str = "ipv6_and_v4_mapped_vips";
    let _serial = serial();
    let Some(mount) = environment(TEST) else { return };
    let cg = TestCgroup::new(&mount, "v6").expect("creating test cgroups");
    let Some(fp) = start_fastpath(TEST, &cg, &[&cg.app], 4 * MIB) else { return };
    let rt = runtime();
    rt.block_on(async {
        let direct6 = spawn_direct("::1", 0).await;
        let direct4 = spawn_direct("127.96.1.10", 80).await;
        let direct_ds = spawn_direct("127.96.1.11", 80).await;
        let (vip6, vip4, vip_ds) = (direct6.addr, direct4.addr, direct_ds.addr);
        let mapped: SocketAddr = format!("[::ffff:127.96.1.10]:{}", vip4.port()).parse().unwrap();
        let backend = spawn_echo_backend("127.0.0.1:0".parse().unwrap()).await;
        let l6 = TcpListener::bind("[::1]:0").await.unwrap();
        let l4 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        // A dual-stack wildcard listener, registered as `[::]:P`: its IPv4 connections arrive
        // as v4-mapped sockets and must still be recognised and spliced.
        let lds = TcpListener::bind("[::]:0").await.unwrap();
        let (relay6_addr, relay4_addr) = (l6.local_addr().unwrap(), l4.local_addr().unwrap());
        let ds_port = lds.local_addr().unwrap().port();
        let relay_ds_target: SocketAddr = format!("127.0.0.1:{ds_port}").parse().unwrap();
        fp.set_listeners(&[relay6_addr, relay4_addr, lds.local_addr().unwrap()]).unwrap();
        fp.set_services(&[
            Redirect::new(vip6, relay6_addr),
            Redirect::new(vip4, relay4_addr),
            Redirect::new(vip_ds, relay_ds_target),
        ])
        .unwrap();
        let relay6 = spawn_relay(fp.clone(), l6, backend, RelayOpts::default());
        let relay4 = spawn_relay(fp.clone(), l4, backend, RelayOpts::default());
        let relay_ds = spawn_relay(fp.clone(), lds, backend, RelayOpts::default());

        // Dual-stack listener first (IPv4 client, counted as connect4).
        let before = fp.stats();
        let app = cg.app.clone();
        let args = echo_args(vip_ds, 3, "1,65536,1048576");
        let r =
            tokio::task::spawn_blocking(move || run_echo_client(Launch::Cgroup(&app), &args, Duration::from_secs(30)))
                .await
                .unwrap();
        r.assert_all_ok(3, "echo via a dual-stack listener");
        assert_eq!(relay_ds.orig_counts().get(&vip_ds.to_string()).copied(), Some(3), "{:?}", relay_ds.orig_counts());
        let d = fp.stats().since(&before);
        eprintln!("dual-stack listener: {d:?}");
        assert_eq!((d.sockhash_inserts_client, d.sockhash_inserts_proxy), (3, 3));
        assert_eq!(d.redirected_bytes, 2 * (1 + 65536 + 1048576));
        assert_eq!(d.passed_msgs, 0);

        let before = fp.stats();
        for (addr, relay) in [(vip6, &relay6), (mapped, &relay4)] {
            let app = cg.app.clone();
            let args = echo_args(addr, SIZES_COUNT, SIZES);
            let r = tokio::task::spawn_blocking(move || {
                run_echo_client(Launch::Cgroup(&app), &args, Duration::from_secs(30))
            })
            .await
            .unwrap();
            r.assert_all_ok(SIZES_COUNT, &format!("echo via {addr}"));
            assert_eq!(r.peers, vec![addr.to_string()], "getpeername via {addr}");
            let expected = sluice_bpf::normalize(addr).to_string();
            assert_eq!(
                relay.orig_counts().get(&expected).copied(),
                Some(SIZES_COUNT),
                "original_dst via {addr}: {:?}",
                relay.orig_counts()
            );
        }
        let d = fp.stats().since(&before);
        eprintln!("ipv6 + v4-mapped: {d:?}");
        assert_eq!(d.connect6_rewrites, 2 * SIZES_COUNT);
        assert_eq!(d.connect4_rewrites, 0);
        assert_eq!(d.getpeername_rewrites, 2 * SIZES_COUNT);
        assert_eq!(d.sockhash_inserts_client, 2 * SIZES_COUNT);
        assert_eq!(d.sockhash_inserts_proxy, 2 * SIZES_COUNT);
        assert_eq!(d.redirected_bytes, 4 * SIZES_TOTAL);
        assert_eq!(d.passed_msgs, 0);
        assert_eq!(direct6.accepted.load(Ordering::Relaxed), 0);
        assert_eq!(direct4.accepted.load(Ordering::Relaxed), 0);
        assert_maps_drained(&fp);
    });
    drop(rt);
    drop(fp);
}

/// Sluice's own upstream connect to a VIP must reach the VIP, not Sluice again. Checked for
/// each guard on its own: the cgroup id (relay without bypass flag), the bypass flag (relay
/// with it; and a socket from another cgroup), plus a control from that other cgroup without
/// the flag, which is redirected.
#[test]
fn sluice_upstream_connects_to_a_vip_are_not_looped_back() {
    const TEST: &str = "sluice_upstream_connects_to_a_vip_are_not_looped_back";
    let _serial = serial();
    let Some(mount) = environment(TEST) else { return };
    let mut cg = TestCgroup::new(&mount, "loop").expect("creating test cgroups");
    let other = cg.child("other").expect("creating a third cgroup");
    let Some(fp) = start_fastpath(TEST, &cg, &[&cg.app], MIB) else { return };
    let rt = runtime();
    rt.block_on(async {
        let direct = spawn_direct("127.96.2.10", 80).await;
        let vip = direct.addr;
        // The relay's upstream is the VIP itself: a redirect would bring it back to the relay.
        let mut relays = Vec::new();
        for bypass in [false, true] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let opts = RelayOpts { bypass, ..RelayOpts::default() };
            relays.push((addr, bypass, spawn_relay(fp.clone(), listener, vip, opts)));
        }
        fp.set_listeners(&relays.iter().map(|r| r.0).collect::<Vec<_>>()).unwrap();

        for (relay_addr, bypass, log) in &relays {
            fp.set_services(&[Redirect::new(vip, *relay_addr)]).unwrap();
            let before = fp.stats();
            let direct_before = direct.accepted.load(Ordering::Relaxed);
            let app = cg.app.clone();
            // A zero-byte exchange: the client connects, half-closes and waits for EOF.
            let args = echo_args(vip, 1, "0");
            let r = tokio::task::spawn_blocking(move || {
                run_echo_client(Launch::Cgroup(&app), &args, Duration::from_secs(20))
            })
            .await
            .unwrap();
            r.assert_all_ok(1, "client through the relay");
            let d = fp.stats().since(&before);
            eprintln!("relay bypass={bypass}: {d:?}");
            assert_eq!(log.accepted.load(Ordering::Relaxed), 1, "the relay's upstream connect looped back");
            assert!(
                eventually(Duration::from_secs(2), || direct.accepted.load(Ordering::Relaxed) == direct_before + 1),
                "the relay's upstream connect did not reach the VIP"
            );
            assert_eq!(d.connect4_rewrites, 1, "only the client's connect is rewritten");
            if *bypass {
                assert_eq!((d.skipped_bypass, d.skipped_self_cgroup), (1, 0));
            } else {
                assert_eq!((d.skipped_bypass, d.skipped_self_cgroup), (0, 1));
            }
        }

        // Outside Sluice's cgroup only the bypass flag protects a socket.
        let (relay_addr, _, log) = &relays[1];
        fp.set_services(&[Redirect::new(vip, *relay_addr)]).unwrap();
        enter(&other).expect("moving to the other cgroup");
        let before = fp.stats();
        let direct_before = direct.accepted.load(Ordering::Relaxed);
        let relay_before = log.accepted.load(Ordering::Relaxed);
        let flagged = connect_bypassed(&fp, vip).await.expect("bypassed connect");
        assert_eq!(flagged.peer_addr().unwrap(), vip);
        let plain = tokio::net::TcpStream::connect(vip).await.expect("plain connect");
        enter(&cg.proxy).expect("moving back to the proxy cgroup");
        assert_eq!(plain.peer_addr().unwrap(), vip, "getpeername hides the redirect");
        // The VIP sees the flagged connect plus the relay's (bypassed) upstream connect made
        // for the control; the relay sees the control only.
        assert!(
            eventually(Duration::from_secs(2), || {
                direct.accepted.load(Ordering::Relaxed) == direct_before + 2
                    && log.accepted.load(Ordering::Relaxed) == relay_before + 1
            }),
            "bypassed connect must reach the VIP, the control the relay (VIP +{}, relay +{})",
            direct.accepted.load(Ordering::Relaxed) - direct_before,
            log.accepted.load(Ordering::Relaxed) - relay_before
        );
        let d = fp.stats().since(&before);
        eprintln!("other cgroup: {d:?}");
        // Bypass is checked before the cgroup id: the flagged socket and the relay's upstream.
        assert_eq!((d.skipped_bypass, d.skipped_self_cgroup), (2, 0));
        assert_eq!(d.connect4_rewrites, 1, "the control connect is redirected");
        drop((flagged, plain));
    });
    drop(rt);
    drop(fp);
}

/// Pod emulation: the client runs in its own network namespace ("pod") and cgroup; the relay
/// in another namespace ("node") reachable over a veth pair with link-local addresses. The
/// VIP is rewritten to the relay's node-side address, getpeername/original_dst return the VIP,
/// and the connection is spliced across the namespaces. A VIP whose target is a loopback
/// address is left alone for the pod (it would be the pod's own loopback).
#[test]
fn pod_in_its_own_netns_reaches_the_node_relay() {
    const TEST: &str = "pod_in_its_own_netns_reaches_the_node_relay";
    let _serial = serial();
    let Some(mount) = environment(TEST) else { return };
    if Command::new("ip").arg("-V").output().is_err() {
        skip::<()>(TEST, "the `ip` command (iproute2) is not installed");
        return;
    }
    let cg = TestCgroup::new(&mount, "pod").expect("creating test cgroups");
    let pair = NetnsPair::create().expect("creating the node/pod network namespaces");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_netns(&pair.node).expect("entering the node namespace");
                let Some(fp) = start_fastpath(TEST, &cg, &[&cg.app], 4 * MIB) else { return };
                let rt = runtime();
                rt.block_on(pod_scenario(&fp, &cg, &pair));
                drop(rt);
                drop(fp);
            })
            .join()
            .expect("pod scenario");
    });
    drop(pair);
}

async fn pod_scenario(fp: &std::sync::Arc<FastPath>, cg: &TestCgroup, pair: &NetnsPair) {
    let backend = spawn_echo_backend("127.0.0.1:0".parse().unwrap()).await;
    let node_listener = TcpListener::bind((pair.node_ip, 0)).await.unwrap();
    let node_addr = node_listener.local_addr().unwrap();
    let lo_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lo_addr = lo_listener.local_addr().unwrap();
    let vip: SocketAddr = "127.96.3.10:80".parse().unwrap();
    let vip_lo: SocketAddr = "127.96.3.11:80".parse().unwrap();
    fp.set_listeners(&[node_addr, lo_addr]).unwrap();
    fp.set_services(&[Redirect::new(vip, node_addr), Redirect::new(vip_lo, lo_addr)]).unwrap();
    let relay = spawn_relay(fp.clone(), node_listener, backend, RelayOpts::default());
    let relay_lo = spawn_relay(fp.clone(), lo_listener, backend, RelayOpts::default());

    let before = fp.stats();
    let (app, pod) = (cg.app.clone(), pair.pod.clone());
    let r = tokio::task::spawn_blocking(move || {
        run_echo_client(Launch::CgroupNetns(&app, &pod), &echo_args(vip, SIZES_COUNT, SIZES), Duration::from_secs(30))
    })
    .await
    .unwrap();
    r.assert_all_ok(SIZES_COUNT, "pod client");
    assert_eq!(r.peers, vec![vip.to_string()], "getpeername in the pod");
    assert_eq!(
        relay.orig_counts().get(&vip.to_string()).copied(),
        Some(SIZES_COUNT),
        "original_dst on the node: {:?}",
        relay.orig_counts()
    );
    let d = fp.stats().since(&before);
    eprintln!("pod: {d:?}");
    assert_eq!(d.connect4_rewrites, SIZES_COUNT);
    assert_eq!(d.sockhash_inserts_client, SIZES_COUNT);
    assert_eq!(d.sockhash_inserts_proxy, SIZES_COUNT);
    assert_eq!(d.redirected_bytes, 2 * SIZES_TOTAL, "spliced across namespaces");
    assert_eq!(d.passed_msgs, 0);
    assert_maps_drained(fp);

    // A loopback target means nothing from the pod: not rewritten, the connect is refused by
    // the pod's own loopback.
    let before = fp.stats();
    let (app, pod) = (cg.app.clone(), pair.pod.clone());
    let r = tokio::task::spawn_blocking(move || {
        run_echo_client(Launch::CgroupNetns(&app, &pod), &echo_args(vip_lo, 1, "1"), Duration::from_secs(20))
    })
    .await
    .unwrap();
    let d = fp.stats().since(&before);
    assert_eq!((r.ok, r.errors), (0, 1), "the connect must fail in the pod: {}", r.first_error);
    assert!(r.first_error.contains("refused"), "{}", r.first_error);
    assert_eq!(d.skipped_foreign_loopback, 1);
    assert_eq!(d.connect4_rewrites, 0);
    assert_eq!(relay_lo.accepted.load(Ordering::Relaxed), 0);
}
