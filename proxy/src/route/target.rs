//! Which upstream cluster a forwarded request goes to, and which clusters get a mirrored copy.
//!
//! - `cluster`: that cluster. `weighted_clusters`: [`pick_weighted`]. `cluster_header`: the
//!   first value of the header; a missing or non-text value names no cluster, which Envoy
//!   answers with `cluster_not_found_response_code` (503) — `RouteEntryImplBase::
//!   pickClusterViaClusterHeader` in `source/common/router/config_impl.cc`.
//! - `request_mirror_policies`: each policy mirrors when its fraction hits the request's random
//!   value (`FilterUtility::shouldShadow` in `source/common/router/router.cc` uses the stream's
//!   stable random value, the same as for route selection).

use http::HeaderMap;
use sluice_config::model::{ClusterSpecifier, ForwardAction, WeightedCluster};

use super::per_million;
use super::weighted::pick_weighted;

/// The chosen cluster: its name, and the weighted cluster entry when the route splits traffic
/// (its header mutations and `host_rewrite_literal` apply to this request).
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub cluster: &'a str,
    pub weighted: Option<&'a WeightedCluster>,
}

/// The cluster for this request, or `None` when the route names none (a `cluster_header`
/// that is absent, empty or not text; a weighted split whose weights sum to 0).
pub fn choose_cluster<'a>(spec: &'a ClusterSpecifier, headers: &'a HeaderMap, random: u64) -> Option<Target<'a>> {
    match spec {
        ClusterSpecifier::Cluster(name) => Some(Target { cluster: name, weighted: None }),
        ClusterSpecifier::Weighted(w) => {
            pick_weighted(w, random).map(|c| Target { cluster: c.name.as_str(), weighted: Some(c) })
        }
        ClusterSpecifier::Header(name) => headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(|cluster| Target { cluster, weighted: None }),
    }
}

/// The clusters that receive a shadow copy of this request.
pub fn mirror_clusters(action: &ForwardAction, random: u64) -> impl Iterator<Item = &str> {
    let sample = per_million(random);
    action.request_mirror_policies.iter().filter(move |m| m.fraction.hit(sample)).map(|m| m.cluster.as_str())
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use serde_json::json;
    use sluice_config::model::RouteAction;

    use super::*;
    use crate::route::testutil::route_config;

    fn with_action<R>(action: serde_json::Value, f: impl FnOnce(&ForwardAction) -> R) -> R {
        let rc = route_config(json!({"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": action}]}]}));
        let RouteAction::Forward(a) = &rc.virtual_hosts[0].routes[0].action else { panic!("forward expected") };
        f(a)
    }

    #[test]
    fn single_weighted_and_header_clusters() {
        let h = HeaderMap::new();
        with_action(json!({"cluster": "/a"}), |a| {
            let t = choose_cluster(&a.cluster, &h, 7).unwrap();
            assert_eq!((t.cluster, t.weighted.is_none()), ("/a", true));
        });
        with_action(
            json!({"weighted_clusters": {"clusters": [{"name": "/a", "weight": 90}, {"name": "/b", "weight": 10}]}}),
            |a| {
                assert_eq!(choose_cluster(&a.cluster, &h, 89).unwrap().cluster, "/a");
                let t = choose_cluster(&a.cluster, &h, 90).unwrap();
                assert_eq!(t.cluster, "/b");
                assert_eq!(t.weighted.map(|w| w.weight), Some(10));
            },
        );
        with_action(json!({"cluster_header": "x-cluster"}), |a| {
            let mut h = HeaderMap::new();
            assert!(choose_cluster(&a.cluster, &h, 0).is_none(), "absent header names no cluster");
            h.insert("x-cluster", HeaderValue::from_static(""));
            assert!(choose_cluster(&a.cluster, &h, 0).is_none());
            h.insert("x-cluster", HeaderValue::from_static("/c"));
            h.append("x-cluster", HeaderValue::from_static("/b"));
            assert_eq!(choose_cluster(&a.cluster, &h, 0).unwrap().cluster, "/c", "first value");
        });
    }

    #[test]
    fn mirrors_follow_their_fraction() {
        let action = json!({"cluster": "/a", "request_mirror_policies": [
            {"cluster": "/b"},
            {"cluster": "/c", "runtime_fraction": {"default_value": {"numerator": 10, "denominator": "HUNDRED"}}}
        ]});
        with_action(action, |a| {
            assert_eq!(mirror_clusters(a, 99_999).collect::<Vec<_>>(), ["/b", "/c"]);
            assert_eq!(mirror_clusters(a, 100_000).collect::<Vec<_>>(), ["/b"]);
        });
        with_action(json!({"cluster": "/a"}), |a| assert_eq!(mirror_clusters(a, 0).count(), 0));
    }
}
