//! Cilium's own examples from the shared corpus, read in place, through translator and router.

use std::path::PathBuf;
use std::sync::Arc;

use http::{HeaderMap, Method};
use sluice_config::model::{ClusterSpecifier, RouteAction, RouteConfig};
use sluice_config::{Options, parse_documents, translate};

use super::testutil::view;
use super::{Selection, pick_weighted, rewrite_path, select};

const EXAMPLES: &str = "../../shared/corpus/cec/cilium/examples/kubernetes/servicemesh/envoy";

/// The single route configuration of a corpus file, or `None` (with a loud note) when the
/// corpus is not next to the checkout.
fn corpus_route_config(file: &str) -> Option<Arc<RouteConfig>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(EXAMPLES).join(file);
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("SKIPPED: corpus file {} is not present next to the checkout", path.display());
        return None;
    };
    let docs = parse_documents(file, &text).expect("corpus file parses");
    let t = translate(&docs, &Options::default());
    let errors: Vec<_> = t.snapshot.diagnostics.iter().filter(|d| d.is_error()).map(ToString::to_string).collect();
    assert!(errors.is_empty(), "{file} rejected: {errors:#?}");
    let rc = t.snapshot.route_configs.into_values().next().expect("a route configuration");
    Some(rc)
}

#[test]
fn helloworld_90_10_split() {
    let Some(rc) = corpus_route_config("envoy-helloworld-v1-90-v2-10.yaml") else { return };
    let h = HeaderMap::new();
    let req = view(Method::GET, "/", "helloworld:5000", &h);
    let Some(Selection::Route { route, .. }) = select(&rc, &req) else { panic!("no route") };
    let RouteAction::Forward(fwd) = &route.action else { panic!("not forwarded") };
    let ClusterSpecifier::Weighted(w) = &fwd.cluster else { panic!("not weighted") };
    let mut v1 = 0;
    for sample in 0..1000u64 {
        let c = pick_weighted(w, sample).expect("a cluster");
        if c.name == "default/helloworld-v1" {
            v1 += 1;
        } else {
            assert_eq!(c.name, "default/helloworld-v2");
        }
    }
    assert_eq!(v1, 900, "exactly 90 % over whole cycles of the total weight");
}

#[test]
fn traffic_management_regex_rewrite() {
    let Some(rc) = corpus_route_config("envoy-traffic-management-test.yaml") else { return };
    let h = HeaderMap::new();
    let req = view(Method::GET, "/foo/bar?x=1", "echo:8080", &h);
    let Some(Selection::Route { route, .. }) = select(&rc, &req) else { panic!("no route") };
    let RouteAction::Forward(fwd) = &route.action else { panic!("not forwarded") };
    let m = &route.matcher;
    assert_eq!(rewrite_path(fwd, &m.path, m.case_sensitive, req.path).as_deref(), Some("/?x=1"));
    assert_eq!(rewrite_path(fwd, &m.path, m.case_sensitive, "/bar"), None);
    let ClusterSpecifier::Weighted(w) = &fwd.cluster else { panic!("not weighted") };
    let firsts =
        (0..100u64).filter(|s| pick_weighted(w, *s).is_some_and(|c| c.name == "default/echo-service-1")).count();
    assert_eq!(firsts, 50);
}
