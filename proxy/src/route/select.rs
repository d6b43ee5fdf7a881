//! Virtual host and route selection (Envoy's `RouteMatcher::findVirtualHost` and
//! `VirtualHostImpl::getRouteFromEntries` in `source/common/router/config_impl.cc`).
//!
//! - Domains: exact, then the longest `*.suffix`, then the longest `prefix*`, then `*`; a
//!   wildcard must match at least one character; comparison is case-insensitive and includes
//!   the port unless `ignore_port_in_host_matching` (port found like `HeaderUtility::getPortStart`:
//!   the last `:` not inside `[...]`).
//! - `require_tls` is checked after the virtual host is chosen and before any route, against
//!   the effective `x-forwarded-proto`; `EXTERNAL_ONLY` exempts `x-envoy-internal: true`.
//! - Routes are first-match in configuration order. A request without `:path` only considers
//!   `connect_matcher` routes.

use std::sync::Arc;

use http::HeaderValue;
use sluice_config::model::{PathMatch, RequireTls, Route, RouteConfig, VirtualHost};

use super::matching::{header_matches, is_grpc, path_matches, query_matches};
use super::redirect::require_tls_location;
use super::{RequestView, per_million};
use crate::http::header_names::X_ENVOY_INTERNAL;

/// The outcome of routing a request that found a virtual host.
#[derive(Debug)]
pub enum Selection<'a> {
    /// Forward, redirect or answer directly according to `route.action`.
    Route { vhost: &'a Arc<VirtualHost>, route: &'a Route },
    /// The virtual host's `require_tls` refuses plain HTTP: answer `301` with this `Location`
    /// (Envoy's `SslRedirectRoute`).
    RequireTls { vhost: &'a Arc<VirtualHost>, location: HeaderValue },
}

/// Virtual host, then `require_tls`, then the first matching route. `None` is Envoy's 404
/// (`NR`): no virtual host for the authority, or no route in it.
pub fn select<'a>(rc: &'a RouteConfig, req: &RequestView<'_>) -> Option<Selection<'a>> {
    let vhost = select_vhost(rc, req.authority)?;
    if let Some(location) = require_tls_location(vhost, req) {
        return Some(Selection::RequireTls { vhost, location });
    }
    let route = select_route(vhost, req)?;
    Some(Selection::Route { vhost, route })
}

/// The virtual host for an `:authority`, honouring `ignore_port_in_host_matching`.
pub fn select_vhost<'a>(rc: &'a RouteConfig, authority: &str) -> Option<&'a Arc<VirtualHost>> {
    let host = if rc.ignore_port_in_host_matching { strip_port(authority) } else { authority };
    rc.select_vhost(host)
}

/// `host:port` -> `host` with Envoy's rule (`HeaderUtility::getPortStart`): the text after the
/// last `:` is the port unless that `:` sits inside an IPv6 literal's brackets.
pub(crate) fn strip_port(host: &str) -> &str {
    match port_start(host) {
        Some(i) => &host[..i],
        None => host,
    }
}

fn port_start(host: &str) -> Option<usize> {
    let colon = host.rfind(':')?;
    match host.rfind(']') {
        Some(bracket) if bracket > colon => None,
        _ => Some(colon),
    }
}

/// The first route of `vhost` whose match conditions all hold.
///
/// Small tables are scanned like Envoy's, with the query-less path computed once; each route
/// rejects on its path specifier first (a byte comparison) before touching headers, and header
/// and query lookups borrow. Large tables ask the virtual host's [`RouteIndex`] for the
/// routes that can match and evaluate only those, still in route order.
///
/// [`RouteIndex`]: sluice_config::model::RouteIndex
pub fn select_route<'a>(vhost: &'a VirtualHost, req: &RequestView<'_>) -> Option<&'a Route> {
    // Computed once for all routes: the path matchers never look at the query.
    let path_only = req.path_only();
    if !vhost.index.is_built() || req.path.is_empty() {
        return vhost.routes.iter().find(|r| matches_with(r, req, path_only));
    }
    // One small allocation, only for tables large enough to be indexed.
    let mut lists: Vec<&[u32]> = Vec::with_capacity(8);
    vhost.index.candidates(path_only.as_bytes(), |name, f| each_header_value(req, name, f), &mut lists);
    first_match(vhost, req, path_only, &mut lists)
}

/// Merges the sorted candidate lists, lowest route index first, and returns the first
/// candidate whose conditions all hold.
fn first_match<'a>(
    vhost: &'a VirtualHost,
    req: &RequestView<'_>,
    path_only: &str,
    lists: &mut [&[u32]],
) -> Option<&'a Route> {
    loop {
        let (which, &i) =
            lists.iter().enumerate().filter_map(|(k, l)| l.first().map(|i| (k, i))).min_by_key(|&(_, i)| *i)?;
        lists[which] = &lists[which][1..];
        let r = vhost.routes.get(i as usize)?;
        if matches_with(r, req, path_only) {
            return Some(r);
        }
    }
}

/// Calls `f` with each value of a request header, as the header matchers see them.
fn each_header_value(req: &RequestView<'_>, name: &str, f: &mut dyn FnMut(&str)) {
    match super::matching::header_values(req, name) {
        Some(super::matching::Values::One(v)) => f(&v),
        Some(super::matching::Values::Each(all)) => {
            for v in all.iter() {
                f(&String::from_utf8_lossy(v.as_bytes()))
            }
        }
        None => {}
    }
}

/// Whether one route matches the request (all of its conditions).
pub fn route_matches(route: &Route, req: &RequestView<'_>) -> bool {
    matches_with(route, req, req.path_only())
}

fn matches_with(route: &Route, req: &RequestView<'_>, path_only: &str) -> bool {
    let m = &route.matcher;
    // Envoy skips every non-CONNECT route for a request without :path.
    if req.path.is_empty() && !matches!(m.path, PathMatch::Connect) {
        return false;
    }
    // Cheapest and most selective first; Envoy evaluates the same conditions, and none has a
    // side effect, so the order does not change the result.
    path_matches(&m.path, m.case_sensitive, req, path_only) && matches_except_path(route, req)
}

/// Every condition of a route but its path specifier.
fn matches_except_path(route: &Route, req: &RequestView<'_>) -> bool {
    let m = &route.matcher;
    m.runtime_fraction.is_none_or(|f| f.hit(per_million(req.random)))
        && (!m.grpc || is_grpc(req.headers))
        && m.headers.iter().all(|h| header_matches(h, req))
        && query_matches(&m.query_parameters, req.path)
        && m.tls_presented.is_none_or(|want| want == req.peer_certificate_presented)
}

/// Whether `require_tls` sends this request to HTTPS.
pub(crate) fn requires_tls_redirect(vhost: &VirtualHost, req: &RequestView<'_>) -> bool {
    match vhost.require_tls {
        RequireTls::None => false,
        RequireTls::All => req.scheme != "https",
        RequireTls::ExternalOnly => {
            req.scheme != "https" && req.headers.get(X_ENVOY_INTERNAL).is_none_or(|v| v.as_bytes() != b"true")
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, Method};
    use serde_json::json;

    use super::*;
    use crate::route::testutil::{route_config, view};

    /// The route index must pick exactly the route a plain first-match scan picks, for every
    /// kind of route it files (path literals, regex literals, exact headers, pseudo-headers)
    /// and every kind it cannot (case-insensitive, inverted, no literal at all).
    #[test]
    fn the_route_index_agrees_with_a_plain_scan() {
        let mut routes = Vec::new();
        for i in 0..80 {
            let m = match i % 10 {
                0 => json!({"safe_regex": {"regex": format!("/r{}/[a-z]+", i % 20)}}),
                1 => json!({"prefix": format!("/p{}", i % 7)}),
                2 => json!({"safe_regex": {"regex": format!("/(r{}|x)/.*", i % 5)},
                            "headers": [{"name": "x-h", "string_match": {"exact": "1"}}]}),
                3 => json!({"path": format!("/e{}", i % 13)}),
                4 => {
                    json!({"prefix": "/", "headers": [{"name": "x-tenant", "string_match": {"exact": format!("t{}", i % 9)}}]})
                }
                5 => {
                    json!({"prefix": "/", "headers": [{"name": ":authority", "string_match": {"exact": format!("h{}", i % 3)}}]})
                }
                6 => json!({"prefix": format!("/P{}", i % 7), "case_sensitive": false}),
                7 => {
                    json!({"prefix": "/", "headers": [{"name": "x-tenant", "string_match": {"exact": "t1"}, "invert_match": true},
                                                       {"name": "x-h", "present_match": true}]})
                }
                8 => {
                    json!({"path_separated_prefix": format!("/s{}", i % 4), "query_parameters": [{"name": "q", "present_match": true}]})
                }
                _ => {
                    json!({"safe_regex": {"regex": ".*/tail"}, "headers": [{"name": "x-tenant", "string_match": {"exact": "t2"}}]})
                }
            };
            routes.push(json!({"name": format!("r{i}"), "match": m, "direct_response": {"status": 200}}));
        }
        routes.push(json!({"name": "last", "match": {"prefix": "/e"}, "direct_response": {"status": 200}}));
        let rc =
            route_config(json!({"name": "rc", "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": routes}]}));
        let vh = &rc.virtual_hosts[0];
        assert!(vh.index.is_built(), "the index is built for 81 routes");
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.append(*n, v.parse().unwrap());
            }
            h
        };
        let header_sets = [
            headers(&[]),
            headers(&[("x-h", "1")]),
            headers(&[("x-tenant", "t4")]),
            headers(&[("x-tenant", "t1"), ("x-h", "0")]),
            headers(&[("x-tenant", "t0"), ("x-tenant", "t2")]),
            headers(&[("x-tenant", "t2")]),
            headers(&[("x-tenant", "t0"), ("x-h", "1")]),
        ];
        let paths = [
            "/r0/abc",
            "/r0/ABC",
            "/r4/x",
            "/x/anything",
            "/r3/q?z=1",
            "/p3",
            "/p3/deeper",
            "/P3/deeper",
            "/p6x",
            "/e7",
            "/e8",
            "/e12",
            "/nothing",
            "/r12/abc",
            "/s0",
            "/s0?q",
            "/s2/x?q=2",
            "/s20?q",
            "/a/tail",
            "/tail",
            "/",
            "",
            "/é/tail",
        ];
        let mut hits = std::collections::BTreeSet::new();
        for path in paths {
            for authority in ["h0", "h2", "other"] {
                for h in &header_sets {
                    let v = view(Method::GET, path, authority, h);
                    let indexed = select_route(vh, &v).map(|r| r.name.as_str());
                    let plain = vh.routes.iter().find(|r| route_matches(r, &v)).map(|r| r.name.as_str());
                    assert_eq!(indexed, plain, "{path} on {authority} with {h:?}");
                    hits.extend(plain);
                }
            }
        }
        // The requests reach routes of every kind, so the agreement is not vacuous.
        let kinds: std::collections::BTreeSet<usize> =
            hits.iter().filter_map(|n| n.strip_prefix('r')?.parse::<usize>().ok()).map(|i| i % 10).collect();
        assert_eq!(kinds.len(), 10, "route kinds reached: {kinds:?} (routes {hits:?})");
    }

    fn vhost_name<'a>(rc: &'a RouteConfig, authority: &str) -> Option<&'a str> {
        select_vhost(rc, authority).map(|v| v.name.as_str())
    }

    fn domains_config(ignore_port: bool) -> Arc<RouteConfig> {
        let vh = |name: &str, domains: serde_json::Value| {
            json!({"name": name, "domains": domains,
                   "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}]})
        };
        route_config(json!({
            "name": "rc",
            "ignore_port_in_host_matching": ignore_port,
            "virtual_hosts": [
                vh("exact", json!(["www.example.com", "www.example.com:8080"])),
                vh("suffix-short", json!(["*.com"])),
                vh("suffix-long", json!(["*.example.com"])),
                vh("suffix-dash", json!(["*-bar.example.com"])),
                vh("prefix-short", json!(["api.*"])),
                vh("prefix-long", json!(["api.example.*"])),
                vh("any", json!(["*"])),
            ]
        }))
    }

    #[test]
    fn domain_precedence() {
        let rc = domains_config(false);
        let name = |a| vhost_name(&rc, a).map(|n| n.rsplit('/').next().unwrap_or(n).to_string());
        assert_eq!(name("www.example.com").as_deref(), Some("exact"));
        assert_eq!(name("WWW.Example.COM").as_deref(), Some("exact"), "case-insensitive");
        // Suffix wildcards beat prefix wildcards, the longest first.
        assert_eq!(name("foo.example.com").as_deref(), Some("suffix-long"));
        assert_eq!(name("baz-bar.example.com").as_deref(), Some("suffix-dash"));
        assert_eq!(name("api.example.com").as_deref(), Some("suffix-long"), "*.suffix before prefix*");
        assert_eq!(name("other.com").as_deref(), Some("suffix-short"));
        assert_eq!(name("api.example.org").as_deref(), Some("prefix-long"));
        assert_eq!(name("api.other.org").as_deref(), Some("prefix-short"));
        // The wildcard must match at least one character.
        assert_eq!(name(".example.com").as_deref(), Some("suffix-short"));
        assert_eq!(name("-bar.example.com").as_deref(), Some("suffix-long"));
        assert_eq!(name("api.").as_deref(), Some("any"));
        assert_eq!(name("nothing.org").as_deref(), Some("any"));
        assert_eq!(name("").as_deref(), Some("any"));
    }

    #[test]
    fn ports_are_part_of_the_host_unless_ignored() {
        let rc = domains_config(false);
        let short = |a: &str| vhost_name(&rc, a).map(|n| n.rsplit('/').next().unwrap_or(n).to_string());
        assert_eq!(short("www.example.com:8080").as_deref(), Some("exact"));
        // Port 9090 is not listed, and the port is part of the compared string, so no
        // `*.com`-style suffix matches either: only `*` is left.
        assert_eq!(short("www.example.com:9090").as_deref(), Some("any"));
        let rc = domains_config(true);
        let short = |a: &str| vhost_name(&rc, a).map(|n| n.rsplit('/').next().unwrap_or(n).to_string());
        assert_eq!(short("www.example.com:9090").as_deref(), Some("exact"));
        assert_eq!(short("foo.example.com:1").as_deref(), Some("suffix-long"));
    }

    #[test]
    fn envoy_port_start_rule() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:443"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        // Envoy does not check that the port is numeric.
        assert_eq!(strip_port("a.b:x"), "a.b");
    }

    #[test]
    fn no_virtual_host_without_wildcard() {
        let rc = route_config(json!({"name": "rc", "virtual_hosts": [
            {"name": "only", "domains": ["a.example"], "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}
        ]}));
        let h = HeaderMap::new();
        assert!(select(&rc, &view(Method::GET, "/", "b.example", &h)).is_none());
        assert!(select(&rc, &view(Method::GET, "/", "a.example", &h)).is_some());
    }

    fn names(rc: &RouteConfig, req: &RequestView<'_>) -> Option<String> {
        match select(rc, req)? {
            Selection::Route { route, .. } => Some(route.name.clone()),
            Selection::RequireTls { .. } => Some("TLS".into()),
        }
    }

    #[test]
    fn first_match_wins_in_configuration_order() {
        let rc = route_config(json!({"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
            {"name": "broad", "match": {"prefix": "/"}, "route": {"cluster": "/a"}},
            {"name": "narrow", "match": {"prefix": "/api"}, "route": {"cluster": "/b"}},
        ]}]}));
        let h = HeaderMap::new();
        assert_eq!(names(&rc, &view(Method::GET, "/api/x", "h", &h)).as_deref(), Some("broad"));
    }

    #[test]
    fn every_condition_must_hold() {
        let rc = route_config(json!({"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
            {"name": "all", "match": {
                "prefix": "/p",
                "headers": [{"name": ":method", "string_match": {"exact": "POST"}},
                            {"name": "x-v", "present_match": true}],
                "query_parameters": [{"name": "q", "string_match": {"prefix": "ok"}}],
                "grpc": {}
             }, "route": {"cluster": "/a"}},
            {"name": "fallback", "match": {"prefix": "/"}, "route": {"cluster": "/b"}},
        ]}]}));
        let mut h = HeaderMap::new();
        h.insert("x-v", HeaderValue::from_static("1"));
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        let ok = view(Method::POST, "/p?q=okay", "h", &h);
        assert_eq!(names(&rc, &ok).as_deref(), Some("all"));
        assert_eq!(names(&rc, &view(Method::GET, "/p?q=okay", "h", &h)).as_deref(), Some("fallback"));
        assert_eq!(names(&rc, &view(Method::POST, "/p?q=nope", "h", &h)).as_deref(), Some("fallback"));
        assert_eq!(names(&rc, &view(Method::POST, "/x?q=okay", "h", &h)).as_deref(), Some("fallback"));
        let mut no_grpc = h.clone();
        no_grpc.insert("content-type", HeaderValue::from_static("application/grpc-web"));
        assert_eq!(names(&rc, &view(Method::POST, "/p?q=okay", "h", &no_grpc)).as_deref(), Some("fallback"));
        let mut no_hdr = h.clone();
        no_hdr.remove("x-v");
        assert_eq!(names(&rc, &view(Method::POST, "/p?q=okay", "h", &no_hdr)).as_deref(), Some("fallback"));
    }

    #[test]
    fn path_matchers_ignore_the_query_and_case_sensitive_applies() {
        let rc = route_config(json!({"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
            {"name": "exact", "match": {"path": "/Exact"}, "route": {"cluster": "/a"}},
            {"name": "exact-ci", "match": {"path": "/ci", "case_sensitive": false}, "route": {"cluster": "/a"}},
            {"name": "sep", "match": {"path_separated_prefix": "/sep"}, "route": {"cluster": "/a"}},
            {"name": "regex", "match": {"safe_regex": {"regex": "/re/[0-9]+"}}, "route": {"cluster": "/a"}},
            {"name": "prefix-ci", "match": {"prefix": "/Pre", "case_sensitive": false}, "route": {"cluster": "/a"}},
        ]}]}));
        let h = HeaderMap::new();
        let route = |p: &str| names(&rc, &view(Method::GET, p, "h", &h));
        assert_eq!(route("/Exact?x=1").as_deref(), Some("exact"));
        assert_eq!(route("/exact"), None);
        assert_eq!(route("/CI#frag").as_deref(), Some("exact-ci"));
        assert_eq!(route("/sep?x").as_deref(), Some("sep"));
        assert_eq!(route("/sep/a").as_deref(), Some("sep"));
        assert_eq!(route("/separate"), None);
        assert_eq!(route("/re/42?x=y").as_deref(), Some("regex"));
        assert_eq!(route("/re/42x"), None);
        assert_eq!(route("/pREfix").as_deref(), Some("prefix-ci"));
    }

    #[test]
    fn connect_and_pathless_requests() {
        let rc = route_config(json!({"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
            {"name": "any", "match": {"prefix": "/"}, "route": {"cluster": "/a"}},
            {"name": "connect", "match": {"connect_matcher": {}}, "route": {"cluster": "/b"}},
        ]}]}));
        let h = HeaderMap::new();
        assert_eq!(names(&rc, &view(Method::CONNECT, "", "h:443", &h)).as_deref(), Some("connect"));
        assert_eq!(names(&rc, &view(Method::GET, "/", "h", &h)).as_deref(), Some("any"));
    }

    #[test]
    fn runtime_fraction_uses_the_request_sample() {
        let rc = route_config(json!({"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
            {"name": "canary", "match": {"prefix": "/", "runtime_fraction": {"default_value": {"numerator": 25}}}, "route": {"cluster": "/a"}},
            {"name": "main", "match": {"prefix": "/"}, "route": {"cluster": "/b"}},
        ]}]}));
        let h = HeaderMap::new();
        let mut req = view(Method::GET, "/", "h", &h);
        for (random, want) in
            [(0u64, "canary"), (249_999, "canary"), (250_000, "main"), (999_999, "main"), (1_000_000, "canary")]
        {
            req.random = random;
            assert_eq!(names(&rc, &req).as_deref(), Some(want), "random {random}");
        }
    }

    #[test]
    fn tls_context_presented() {
        let rc = route_config(json!({"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
            {"name": "mtls", "match": {"prefix": "/", "tls_context": {"presented": true}}, "route": {"cluster": "/a"}},
            {"name": "plain", "match": {"prefix": "/", "tls_context": {"presented": false}}, "route": {"cluster": "/b"}},
        ]}]}));
        let h = HeaderMap::new();
        let mut req = view(Method::GET, "/", "h", &h);
        assert_eq!(names(&rc, &req).as_deref(), Some("plain"));
        req.peer_certificate_presented = true;
        assert_eq!(names(&rc, &req).as_deref(), Some("mtls"));
    }

    #[test]
    fn require_tls_all_and_external_only() {
        let rc = route_config(json!({"name": "rc", "virtual_hosts": [
            {"name": "all", "domains": ["all.example", "all.example:*"], "require_tls": "ALL",
             "routes": [{"name": "r1", "match": {"prefix": "/"}, "route": {"cluster": "/a"}}]},
            {"name": "ext", "domains": ["ext.example"], "require_tls": "EXTERNAL_ONLY",
             "routes": [{"name": "r2", "match": {"prefix": "/"}, "route": {"cluster": "/a"}}]},
        ]}));
        let h = HeaderMap::new();
        let mut req = view(Method::GET, "/x?y=1", "all.example:8080", &h);
        match select(&rc, &req) {
            Some(Selection::RequireTls { location, .. }) => {
                assert_eq!(location, "https://all.example:8080/x?y=1");
            }
            other => panic!("expected a TLS redirect, got {other:?}"),
        }
        req.scheme = "https";
        assert_eq!(names(&rc, &req).as_deref(), Some("r1"));
        let mut internal = HeaderMap::new();
        internal.insert("x-envoy-internal", HeaderValue::from_static("true"));
        assert_eq!(names(&rc, &view(Method::GET, "/", "ext.example", &internal)).as_deref(), Some("r2"));
        assert_eq!(names(&rc, &view(Method::GET, "/", "ext.example", &h)).as_deref(), Some("TLS"));
    }
}
