//! Kubernetes mode against a fake API server speaking the list/watch wire protocol: initial
//! sync, changes, relists after disconnects and 410 Gone, Events on rejected CECs, and node
//! labels for `spec.nodeSelector`.

mod support_kube;

use serde_json::{Value, json};
use sluice_config::model::SourceState;
use sluice_proxy::source::kubernetes::KubeOptions;
use support_kube::*;

/// Objects of a small cluster: a CEC in `shop` redirecting `front` to `api`, its Services
/// and EndpointSlice, an unrelated Service, a TLS and a token Secret, two nodes.
fn populate(api: &FakeApiServer) {
    api.apply(&CECS, cec("shop", "web", "front", "api"));
    api.apply(&SERVICES, service("shop", "front", 80));
    api.apply(&SERVICES, service("shop", "api", 8080));
    api.apply(&ENDPOINTSLICES, slice("shop", "api-abcde", "api", &["10.0.0.1"]));
    api.apply(&SERVICES, service("other", "unrelated", 80));
    api.apply(&ENDPOINTSLICES, slice("other", "unrelated-xyz", "unrelated", &["10.9.9.9"]));
    api.apply(&SECRETS, tls_secret("cilium-secrets", "shop-tls"));
    api.apply(&SECRETS, token_secret("cilium-secrets", "builder-token"));
    api.apply(&SECRETS, tls_secret("elsewhere", "not-watched"));
    api.apply(&NODES, node("node-a", json!({"kubernetes.io/hostname": "node-a", "role": "edge"})));
    api.apply(&NODES, node("node-b", json!({"kubernetes.io/hostname": "node-b", "role": "core"})));
}

const BASE: [&str; 5] = [
    "CiliumEnvoyConfig shop/web",
    "EndpointSlice shop/api-abcde",
    "Secret cilium-secrets/shop-tls",
    "Service shop/api",
    "Service shop/front",
];

fn accepted(u: &Update, source: &str) -> bool {
    u.snapshot.sources.iter().any(|s| s.name == source && s.state == SourceState::Accepted)
}

#[tokio::test]
async fn initial_sync_waits_for_every_kind_then_delivers_everything_once() {
    let api = FakeApiServer::start().await;
    populate(&api);
    api.hold_lists(&SECRETS);
    let h = Harness::start(api, options());

    // Everything but the Secrets has been listed and is being watched.
    for res in [&CECS, &CCECS, &SERVICES, &ENDPOINTSLICES, &NODES] {
        wait_for(&format!("a watch on {}", res.plural), || (h.api.watch_count(res) > 0).then_some(())).await;
    }
    h.assert_quiet("before the Secrets are listed").await;
    assert!(!h.ready(), "ready before the initial sync");

    h.api.release_lists();
    let first = h.wait_update(0, "the initial document set", |_| true).await;
    assert!(h.ready(), "not ready after the initial sync");
    assert_eq!(first.names(), BASE, "referenced objects and TLS secrets only");
    assert_eq!(first.node_labels.as_ref().and_then(|l| l.get("role")).map(String::as_str), Some("edge"));

    // CECs are handed over as the API server stores them, minus managed fields and the
    // last-applied copy.
    let doc = first.document("CiliumEnvoyConfig", "shop", "web").expect("the CEC document");
    assert_eq!(doc.value["apiVersion"], "cilium.io/v2");
    assert_eq!(doc.value["spec"], cec("shop", "web", "front", "api")["spec"]);
    assert_eq!(doc.value["metadata"]["annotations"], json!({"team": "web"}));
    assert!(doc.value["metadata"].get("managedFields").is_none());
    assert_eq!(first.document("Service", "shop", "api").expect("service").value["apiVersion"], "v1");

    assert!(accepted(&first, "shop/web"), "{:?}", first.snapshot.diagnostics);
    assert_eq!(endpoints(&first.snapshot, "shop/api"), ["10.0.0.1:8080"]);
    h.assert_quiet("after the initial sync").await;
}

#[tokio::test]
async fn changes_arrive_as_new_document_sets() {
    let api = FakeApiServer::start().await;
    populate(&api);
    let h = Harness::start(api, options());
    h.wait_update(0, "the initial document set", |_| true).await;

    // Add a CEC.
    let n = h.update_count();
    h.api.apply(&CECS, cec("shop", "admin", "front", "api"));
    let u = h.wait_update(n, "the added CEC", |u| u.document("CiliumEnvoyConfig", "shop", "admin").is_some()).await;
    assert!(accepted(&u, "shop/admin"));

    // Change it: its backend moves to a new Service, which now gets included.
    let n = h.update_count();
    h.api.apply(&SERVICES, service("shop", "api-v2", 8080));
    h.api.apply(&ENDPOINTSLICES, slice("shop", "api-v2-1", "api-v2", &["10.0.1.1"]));
    h.api.apply(&CECS, cec("shop", "admin", "front", "api-v2"));
    let u = h.wait_update(n, "the changed CEC", |u| u.document("Service", "shop", "api-v2").is_some()).await;
    assert_eq!(endpoints(&u.snapshot, "shop/api-v2"), ["10.0.1.1:8080"]);

    // Delete it.
    let n = h.update_count();
    h.api.delete(&CECS, "shop", "admin");
    let u = h.wait_update(n, "the deleted CEC", |u| u.document("CiliumEnvoyConfig", "shop", "admin").is_none()).await;
    assert_eq!(u.names(), BASE);

    // Scale the EndpointSlice up, in a burst of writes: one rebuild per debounce window,
    // not one per write.
    let n = h.update_count();
    let mut addrs: Vec<String> = Vec::new();
    for i in 1..=20 {
        addrs.push(format!("10.0.0.{i}"));
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        h.api.apply(&ENDPOINTSLICES, slice("shop", "api-abcde", "api", &refs));
    }
    let u = h.wait_update(n, "the scaled EndpointSlice", |u| endpoints(&u.snapshot, "shop/api").len() == 20).await;
    assert!(u.names() == BASE);
    let rebuilds = h.update_count() - n;
    assert!(rebuilds < 20, "{rebuilds} rebuilds for a burst of 20 writes: not debounced");

    // Churn on objects no CEC refers to, and a Node update that does not touch labels,
    // cause no rebuild.
    h.api.apply(&ENDPOINTSLICES, slice("other", "unrelated-xyz", "unrelated", &["10.9.9.8"]));
    h.api.apply(&SERVICES, service("other", "unrelated", 81));
    let mut a = node("node-a", json!({"kubernetes.io/hostname": "node-a", "role": "edge"}));
    a["status"]["conditions"][0]["lastHeartbeatTime"] = json!("2025-01-01T00:01:00Z");
    h.api.apply(&NODES, a);
    h.api.apply(&NODES, node("node-b", json!({"role": "changed"})));
    h.assert_quiet("irrelevant changes").await;
}

#[tokio::test]
async fn relists_after_disconnects_and_410_never_hand_on_a_partial_set() {
    let api = FakeApiServer::start().await;
    populate(&api);
    let h = Harness::start(api, options());
    h.wait_update(0, "the initial document set", |_| true).await;
    let watched = [&CECS, &CCECS, &SERVICES, &ENDPOINTSLICES, &SECRETS, &NODES];

    // An abrupt disconnect: the watches resume from their last resourceVersion and get
    // what was written meanwhile, without relisting.
    let lists: Vec<usize> = watched.iter().map(|r| h.api.list_count(r)).collect();
    h.api.disconnect_watches(true);
    let n = h.update_count();
    h.api.apply(&ENDPOINTSLICES, slice("shop", "api-abcde", "api", &["10.0.0.1", "10.0.0.2"]));
    let u = h
        .wait_update(n, "the change made during the disconnect", |u| endpoints(&u.snapshot, "shop/api").len() == 2)
        .await;
    assert_eq!(u.names(), BASE);
    assert_eq!(lists, watched.iter().map(|r| h.api.list_count(r)).collect::<Vec<_>>(), "resumed watches relisted");

    // A clean end of stream (the server's watch timeout), then a bookmark: resumes too.
    h.api.disconnect_watches(false);
    for res in watched {
        wait_for(&format!("the {} watch to resume", res.plural), || (h.api.watch_count(res) > 0).then_some(())).await;
    }
    h.api.bookmark();

    // Compaction: every resumed watch gets 410 Gone and relists. Changes made before the
    // relist show up; the document set is complete in every update.
    let n = h.update_count();
    let lists: Vec<usize> = watched.iter().map(|r| h.api.list_count(r)).collect();
    h.api.expire_history();
    h.api.apply(&CECS, cec("shop", "web", "front", "api-v2"));
    h.api.apply(&SERVICES, service("shop", "api-v2", 8080));
    h.api.apply(&ENDPOINTSLICES, slice("shop", "api-v2-1", "api-v2", &["10.0.1.1"]));
    for (res, before) in watched.iter().zip(lists) {
        wait_for(&format!("a relist of {}", res.plural), || (h.api.list_count(res) > before).then_some(())).await;
    }
    // The three changes arrive on three watches, possibly in separate updates: wait for the
    // one that has them all, then check it is exactly the full set.
    let u = h
        .wait_update(n, "the relisted state", |u| {
            endpoints(&u.snapshot, "shop/api-v2") == ["10.0.1.1:8080"]
                && u.names().iter().any(|n| n == "Service shop/api-v2")
        })
        .await;
    assert_eq!(
        u.names(),
        [
            "CiliumEnvoyConfig shop/web",
            "EndpointSlice shop/api-v2-1",
            "Secret cilium-secrets/shop-tls",
            "Service shop/api-v2",
            "Service shop/front",
        ]
    );
    h.assert_quiet("after the relist").await;
    for u in h.updates() {
        assert!(u.document("CiliumEnvoyConfig", "shop", "web").is_some(), "partial set: {:?}", u.names());
        assert!(u.document("Secret", "cilium-secrets", "shop-tls").is_some(), "partial set: {:?}", u.names());
        assert!(u.node_labels.as_ref().is_some_and(|l| !l.is_empty()), "node labels lost");
    }

    // While one kind's relist is still in flight, changes to other kinds are handed on with
    // that kind's previous state, not with an empty one.
    h.api.hold_lists(&SECRETS);
    let secret_lists = h.api.list_count(&SECRETS);
    h.api.expire_history();
    let n = h.update_count();
    h.api.apply(&ENDPOINTSLICES, slice("shop", "api-v2-1", "api-v2", &["10.0.1.2"]));
    let u = h
        .wait_update(n, "a change during a relist", |u| endpoints(&u.snapshot, "shop/api-v2") == ["10.0.1.2:8080"])
        .await;
    assert_eq!(h.api.list_count(&SECRETS), secret_lists, "the Secrets relist is still held");
    assert!(u.document("Secret", "cilium-secrets", "shop-tls").is_some(), "Secrets lost during their relist");
    h.api.release_lists();
    wait_for("the Secrets relist", || (h.api.list_count(&SECRETS) > secret_lists).then_some(())).await;

    // A relist that finds nothing new hands nothing on.
    let n = h.update_count();
    let lists: Vec<usize> = watched.iter().map(|r| h.api.list_count(r)).collect();
    h.api.expire_history();
    for (res, before) in watched.iter().zip(lists) {
        wait_for(&format!("a relist of {}", res.plural), || (h.api.list_count(res) > before).then_some(())).await;
    }
    h.assert_quiet("a relist without changes").await;
    assert_eq!(h.update_count(), n);
}

#[tokio::test]
async fn a_rejected_cec_gets_one_event_and_the_others_keep_serving() {
    let api = FakeApiServer::start().await;
    populate(&api);
    let mut bad = cec("shop", "bad", "front", "api");
    bad["spec"]["resources"][0] = listener("bad-listener", "bad-route", &[unsupported_filter(), router()]);
    api.apply(&CECS, bad.clone());
    api.apply(&CCECS, ccec("bad-global", "kubernetes", &[unsupported_filter(), router()]));
    let h = Harness::start(api, options());

    let u = h.wait_update(0, "the initial document set", |_| true).await;
    assert!(accepted(&u, "shop/web"), "the good CEC is served: {:?}", u.snapshot.diagnostics);
    assert!(u.snapshot.listener("shop/web/web-listener").is_some());
    let rejected = |name: &str| {
        u.snapshot.sources.iter().any(|s| s.name == name && matches!(s.state, SourceState::Rejected { .. }))
    };
    assert!(rejected("shop/bad") && rejected("/bad-global"));
    // What `sluice check` prints for the bad CEC.
    let expected = u
        .snapshot
        .diagnostics
        .iter()
        .find(|d| d.is_error() && d.source == "shop/bad")
        .expect("an error on shop/bad")
        .to_string();
    assert!(expected.contains("spec.resources[0]") && expected.contains("http_filters[0]"), "{expected}");

    let events = wait_for("two Events", || {
        let e = h.api.objects(&EVENTS);
        (e.len() >= 2).then_some(e)
    })
    .await;
    let on = |kind: &str, name: &str| -> Vec<Value> {
        events.iter().filter(|e| e["regarding"]["kind"] == kind && e["regarding"]["name"] == name).cloned().collect()
    };
    let cec_events = on("CiliumEnvoyConfig", "bad");
    assert_eq!(cec_events.len(), 1, "{events:#?}");
    let e = &cec_events[0];
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["reason"], "TranslationFailed");
    assert_eq!(e["note"], expected.as_str());
    assert_eq!(e["metadata"]["namespace"], "shop");
    assert_eq!(e["regarding"]["apiVersion"], "cilium.io/v2");
    assert_eq!(e["regarding"]["namespace"], "shop");
    assert_eq!(
        e["regarding"]["uid"],
        h.api.objects(&CECS).iter().find(|o| o["metadata"]["name"] == "bad").unwrap()["metadata"]["uid"]
    );
    assert_eq!(e["reportingController"], "sluice");
    assert_eq!(e["reportingInstance"], "sluice-test");
    // The cluster-scoped CCEC's Event lives in "default".
    let ccec_events = on("CiliumClusterwideEnvoyConfig", "bad-global");
    assert_eq!(ccec_events.len(), 1, "{events:#?}");
    assert_eq!(ccec_events[0]["metadata"]["namespace"], "default");
    assert!(ccec_events[0]["regarding"].get("namespace").is_none_or(Value::is_null));
    assert!(ccec_events[0]["note"].as_str().is_some_and(|n| n.starts_with("error: /bad-global: ")));

    // Rebuilds and relists repeat the same diagnostics: no new Events.
    let n = h.update_count();
    h.api.apply(&ENDPOINTSLICES, slice("shop", "api-abcde", "api", &["10.0.0.7"]));
    h.wait_update(n, "the scaled slice", |u| endpoints(&u.snapshot, "shop/api") == ["10.0.0.7:8080"]).await;
    let lists = h.api.list_count(&CECS);
    h.api.expire_history();
    wait_for("a relist of the CECs", || (h.api.list_count(&CECS) > lists).then_some(())).await;
    h.assert_quiet("the relist").await;
    assert_eq!(h.api.objects(&EVENTS).len(), 2);

    // Fixed, the CEC is served; broken again, it gets a new Event.
    let n = h.update_count();
    h.api.apply(&CECS, cec("shop", "bad", "front", "api"));
    h.wait_update(n, "the fixed CEC", |u| accepted(u, "shop/bad")).await;
    let n = h.update_count();
    h.api.apply(&CECS, bad);
    let u = h
        .wait_update(n, "the broken CEC", |u| {
            u.snapshot
                .sources
                .iter()
                .any(|s| s.name == "shop/bad" && matches!(s.state, SourceState::PreviousVersion { .. }))
        })
        .await;
    assert!(u.snapshot.listener("shop/bad/bad-listener").is_some(), "the previous version keeps serving");
    let events = wait_for("a third Event", || {
        let e = h.api.objects(&EVENTS);
        (e.len() >= 3).then_some(e)
    })
    .await;
    let newest = events
        .iter()
        .filter(|e| e["regarding"]["name"] == "bad")
        .max_by_key(|e| e["metadata"]["resourceVersion"].as_str().and_then(|v| v.parse::<u64>().ok()))
        .expect("Events on shop/bad");
    assert_eq!(newest["note"], format!("{expected} (the previous version keeps serving)"));
}

#[tokio::test]
async fn node_labels_drive_node_selectors() {
    let api = FakeApiServer::start().await;
    populate(&api);
    let mut edge_only = cec("shop", "edge-only", "front", "api");
    edge_only["spec"]["nodeSelector"] = json!({"matchLabels": {"role": "edge"}});
    api.apply(&CECS, edge_only);
    let h = Harness::start(api, options());

    let u = h.wait_update(0, "the initial document set", |_| true).await;
    assert_eq!(
        u.node_labels.as_ref().and_then(|l| l.get("kubernetes.io/hostname")).map(String::as_str),
        Some("node-a")
    );
    assert!(accepted(&u, "shop/edge-only"), "selected on an edge node");

    let n = h.update_count();
    h.api.apply(&NODES, node("node-a", json!({"kubernetes.io/hostname": "node-a", "role": "core"})));
    let u =
        h.wait_update(n, "the relabelled node", |u| u.node_labels.as_ref().is_some_and(|l| l["role"] == "core")).await;
    let state = u.snapshot.sources.iter().find(|s| s.name == "shop/edge-only").map(|s| s.state.clone());
    assert_eq!(state, Some(SourceState::NotSelected));
    assert!(u.snapshot.listener("shop/edge-only/edge-only-listener").is_none());
    assert!(accepted(&u, "shop/web"), "CECs without a selector still apply");

    // The Node disappears: no labels, so only CECs without a selector apply.
    let n = h.update_count();
    h.api.delete(&NODES, "", "node-a");
    let u = h.wait_update(n, "the deleted node", |u| u.node_labels.as_ref().is_some_and(|l| l.is_empty())).await;
    assert!(accepted(&u, "shop/web"));
}

#[tokio::test]
async fn without_a_node_name_every_cec_is_selected() {
    let api = FakeApiServer::start().await;
    populate(&api);
    let mut edge_only = cec("shop", "edge-only", "front", "api");
    edge_only["spec"]["nodeSelector"] = json!({"matchLabels": {"role": "nowhere"}});
    api.apply(&CECS, edge_only);
    let h = Harness::start(api, KubeOptions { node_name: None, ..options() });
    let u = h.wait_update(0, "the initial document set", |_| true).await;
    assert_eq!(u.node_labels, None);
    assert!(accepted(&u, "shop/edge-only"));
    assert_eq!(h.api.list_count(&NODES), 0, "nodes are not watched without a node name");
}

#[tokio::test]
async fn a_client_from_a_kubeconfig_reaches_the_server() {
    let api = FakeApiServer::start().await;
    populate(&api);
    let dir = std::env::temp_dir().join(format!("sluice-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("config");
    api.write_kubeconfig(&path);
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .expect("kubeconfig is usable");
    let client = kube::Client::try_from(config).expect("client");
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    let node = nodes.get("node-a").await.expect("GET node-a");
    assert_eq!(node.metadata.labels.unwrap_or_default().get("role").map(String::as_str), Some("edge"));
    let _ = std::fs::remove_dir_all(&dir);
}
