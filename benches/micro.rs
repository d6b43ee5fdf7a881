//! Criterion micro-benchmarks of the per-request work that does not touch a socket:
//! route matching with 1, 100 and 10,000 routes (prefix, exact, regex and header matchers),
//! header mutation, weighted cluster selection, and the translation of Cilium's corpus.
//!
//! `cargo bench --bench micro` (results in target/criterion; summary in benches/RESULTS.md).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use sluice_config::{Document, Options, Snapshot, parse_documents, translate};
use sluice_proxy::route::{self, RequestView, TemplateContext};

/// A CEC with `n` routes cycling through exact path, prefix, header and regex matchers (the
/// shape of benches/gen_routes.py); the route that matches is the 10th from the end.
fn routes_cec(n: usize) -> String {
    let mut routes = String::new();
    for i in 0..n {
        if i + 10 == n {
            routes.push_str(
                "        - match: {prefix: /bench/target, headers: [{name: x-bench-route, string_match: {exact: target}}]}\n          route: {cluster: c}\n",
            );
            continue;
        }
        let m = match i % 4 {
            0 => format!("{{path: /api/v1/resource-{i}}}"),
            1 => format!("{{prefix: /svc-{i}/}}"),
            2 => format!("{{prefix: /, headers: [{{name: x-tenant, string_match: {{exact: tenant-{i}}}}}]}}"),
            _ => format!("{{safe_regex: {{regex: \"/re-{i}/[a-z]+/[0-9]+\"}}}}"),
        };
        routes.push_str(&format!("        - match: {m}\n          direct_response: {{status: 418}}\n"));
    }
    format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {{name: bench, namespace: default}}
spec:
  resources:
  - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
    name: routes
    virtual_hosts:
    - name: vh
      domains: ["*"]
      request_headers_to_add:
      - header: {{key: x-vh, value: "%DOWNSTREAM_REMOTE_ADDRESS%"}}
      routes:
{routes}        - match: {{prefix: /}}
          route:
            cluster: c
            weighted_clusters:
              clusters: [{{name: c, weight: 90}}, {{name: c2, weight: 10}}]
  - {{"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: c, type: STATIC}}
  - {{"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster, name: c2, type: STATIC}}
"#
    )
    .replace("            cluster: c\n            weighted_clusters", "            weighted_clusters")
}

fn snapshot(n: usize) -> Snapshot {
    let docs = parse_documents("bench.yaml", &routes_cec(n)).expect("yaml");
    let t = translate(&docs, &Options::default());
    assert!(!t.snapshot.has_errors(), "{:#?}", t.snapshot.diagnostics);
    t.snapshot
}

fn route_matching(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_matching");
    g.measurement_time(Duration::from_secs(3));
    let mut headers = HeaderMap::new();
    headers.insert("x-bench-route", HeaderValue::from_static("target"));
    headers.insert("user-agent", HeaderValue::from_static("bench"));
    for n in [1usize, 100, 10_000] {
        let s = snapshot(n.max(11));
        let rc = s.route_configs.values().next().expect("route config").clone();
        let method = Method::GET;
        let view = RequestView {
            method: &method,
            path: "/bench/target?x=1",
            authority: "example.com",
            scheme: "http",
            headers: &headers,
            peer_certificate_presented: false,
            random: 42,
        };
        assert!(matches!(route::select(&rc, &view), Some(route::Selection::Route { .. })));
        g.bench_function(format!("{n}_routes"), |b| {
            b.iter(|| black_box(route::select(&rc, black_box(&view)).is_some()))
        });
    }
    g.finish();
}

fn header_mutation(c: &mut Criterion) {
    let s = snapshot(11);
    let rc = s.route_configs.values().next().expect("route config").clone();
    let vh = rc.virtual_hosts[0].clone();
    let route = vh.routes.last().expect("route");
    let ctx = TemplateContext::new("10.0.0.1:4321".parse().unwrap(), "10.0.0.2:80".parse().unwrap());
    let mut base = HeaderMap::new();
    base.insert("host", HeaderValue::from_static("example.com"));
    base.insert("user-agent", HeaderValue::from_static("bench"));
    c.bench_function("header_mutation/request_levels", |b| {
        b.iter(|| {
            let mut h = base.clone();
            route::apply_request_mutations(&rc, &vh, route, None, &mut h, &ctx);
            black_box(h.len())
        })
    });
}

fn weighted_selection(c: &mut Criterion) {
    let s = snapshot(11);
    let rc = s.route_configs.values().next().expect("route config").clone();
    let route = rc.virtual_hosts[0].routes.last().expect("route");
    let sluice_config::model::RouteAction::Forward(a) = &route.action else { panic!("forward route") };
    let sluice_config::model::ClusterSpecifier::Weighted(w) = &a.cluster else { panic!("weighted") };
    let mut r: u64 = 0x9e37_79b9_7f4a_7c15;
    c.bench_function("weighted_selection/90_10", |b| {
        b.iter(|| {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            black_box(route::pick_weighted(w, r).map(|c| c.weight))
        })
    });
}

fn corpus_files() -> Option<Vec<PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus/cec");
    if !dir.is_dir() {
        eprintln!("SKIPPED translation/corpus: {} is not present", dir.display());
        return None;
    }
    let mut out = Vec::new();
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
                out.push(p);
            }
        }
    }
    Some(out)
}

fn translation(c: &mut Criterion) {
    let Some(files) = corpus_files() else { return };
    // Each corpus file is translated on its own, as `sluice check` would.
    let sets: Vec<Vec<Document>> = files
        .iter()
        .filter_map(|f| {
            std::fs::read_to_string(f).ok().and_then(|t| parse_documents(&f.display().to_string(), &t).ok())
        })
        .filter(|d| !d.is_empty())
        .collect();
    let mut g = c.benchmark_group("translation");
    g.sample_size(10);
    g.bench_function("corpus", |b| {
        b.iter(|| {
            let mut n = 0;
            for docs in &sets {
                n += translate(docs, &Options::default()).snapshot.listeners.len();
            }
            black_box(n)
        })
    });
    let big = parse_documents("routes.yaml", &routes_cec(10_000)).expect("yaml");
    g.bench_function("10k_routes", |b| {
        b.iter(|| black_box(translate(&big, &Options::default()).snapshot.route_configs.len()))
    });
    g.finish();
}

criterion_group!(benches, route_matching, header_mutation, weighted_selection, translation);
criterion_main!(benches);
