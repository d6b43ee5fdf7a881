//! Test helpers: route configurations go through the real translator, so the tests exercise
//! the model exactly as the data plane receives it.

use std::sync::Arc;

use http::{HeaderMap, Method};
use serde_json::{Value, json};
use sluice_config::model::RouteConfig;
use sluice_config::{Options, parse_documents, translate};

use super::RequestView;

/// Translates one `RouteConfiguration` (Envoy v3 JSON, without `@type`) inside a
/// CiliumClusterwideEnvoyConfig that also defines the STATIC clusters `/a`, `/b` and `/c`.
/// Panics with the translator's diagnostics if anything is rejected.
pub fn route_config(mut rc: Value) -> Arc<RouteConfig> {
    rc["@type"] = json!("type.googleapis.com/envoy.config.route.v3.RouteConfiguration");
    let cluster = |name: &str| {
        json!({
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}}
            ]}]}
        })
    };
    let doc = json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideEnvoyConfig",
        "metadata": {"name": "route-test"},
        "spec": {"resources": [rc, cluster("/a"), cluster("/b"), cluster("/c")]}
    });
    let docs = parse_documents("route-test.json", &doc.to_string()).expect("test document parses");
    let t = translate(&docs, &Options::default());
    let errors: Vec<String> =
        t.snapshot.diagnostics.iter().filter(|d| d.is_error()).map(|d| format!("{}: {}", d.path, d.message)).collect();
    assert!(errors.is_empty(), "translation failed: {errors:#?}");
    let mut configs = t.snapshot.route_configs.into_values();
    let out = configs.next().expect("one route configuration");
    assert!(configs.next().is_none(), "exactly one route configuration expected");
    out
}

/// A plain-HTTP request view with `random = 0` and no client certificate.
pub fn view<'a>(method: Method, path: &'a str, authority: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
    // Methods are a handful of well-known values; leaking one per test call keeps the view's
    // borrow simple without a guard type.
    let method: &'static Method = Box::leak(Box::new(method));
    RequestView { method, path, authority, scheme: "http", headers, peer_certificate_presented: false, random: 0 }
}
