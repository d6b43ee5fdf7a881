//! `request_headers_to_add/remove` and `response_headers_to_add/remove` at the weighted
//! cluster, route, virtual host and route configuration levels.
//!
//! Verified against `source/common/router/header_parser.cc` (`HeaderParser::evaluateHeaders`),
//! `config_impl.cc` (`getHeaderParsers`, `finalizeRequestHeaders`) and
//! `weighted_cluster_specifier.cc` (`WeightedClusterEntry::finalizeRequestHeaders`):
//! - Within one level: removals first; then every value is rendered and every
//!   `append_action` condition checked against the headers as they are after the removals
//!   (none of this level's additions are visible yet); then all overwrites are applied, then
//!   all appends. An empty rendered value is skipped unless `keep_empty_value`.
//! - `APPEND_IF_EXISTS_OR_ADD` appends another value; `ADD_IF_ABSENT` adds only when absent;
//!   `OVERWRITE_IF_EXISTS_OR_ADD` replaces all values (or adds); `OVERWRITE_IF_EXISTS` replaces
//!   only an existing header.
//! - Across levels "the later evaluated level wins": the weighted cluster's mutations always
//!   run first, then route → virtual host → route configuration, or route configuration →
//!   virtual host → route with `most_specific_header_mutations_wins`. Note that the weighted
//!   cluster level runs first even in the latter mode (it is evaluated before its parent
//!   route entry in Envoy), so a route-level overwrite beats it in both modes.

use bytes::Bytes;
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use sluice_config::model::{AppendAction, HeaderMutations, Route, RouteConfig, VirtualHost, WeightedCluster};

use super::template::{TemplateContext, render};

/// Applies one level's mutations to `headers`.
///
/// Perf: removals and presence checks use `&str` lookups (no allocation); each added header
/// costs a `HeaderName` for names outside the standard table and a `HeaderValue` copy of
/// literal values, because the model stores names and values as `String`s. One small vector
/// holds the pending additions of a level.
pub fn apply(mutations: &HeaderMutations, headers: &mut HeaderMap, ctx: &TemplateContext<'_>) {
    for name in mutations.remove() {
        headers.remove(name.as_str());
    }
    if mutations.add().is_empty() {
        return;
    }
    // (name, value, overwrite)
    let mut pending: Vec<(HeaderName, HeaderValue, bool)> = Vec::with_capacity(mutations.add().len());
    for add in mutations.add() {
        let value = render(&add.value, ctx, headers);
        if value.is_empty() && !add.keep_empty_value {
            continue;
        }
        let present = headers.contains_key(add.name.as_str());
        let overwrite = match add.action {
            AppendAction::AppendIfExistsOrAdd => false,
            AppendAction::AddIfAbsent if present => continue,
            AppendAction::AddIfAbsent => false,
            AppendAction::OverwriteIfExists if !present => continue,
            AppendAction::OverwriteIfExists | AppendAction::OverwriteIfExistsOrAdd => true,
        };
        let Ok(name) = HeaderName::from_bytes(add.name.as_bytes()) else {
            // The translator validates names; nothing to add if one slipped through.
            tracing::debug!(header = %add.name, "skipping header mutation with an invalid name");
            continue;
        };
        let value = match value {
            std::borrow::Cow::Borrowed(s) => HeaderValue::from_str(s),
            std::borrow::Cow::Owned(s) => HeaderValue::from_maybe_shared(Bytes::from(s)),
        };
        match value {
            Ok(v) => pending.push((name, v, overwrite)),
            Err(_) => {
                tracing::debug!(header = %add.name, "skipping header mutation whose value is not a valid header value")
            }
        }
    }
    // Overwrites before appends, each group in configuration order (the sort is stable).
    pending.sort_by_key(|p| !p.2);
    for (name, value, overwrite) in pending {
        if overwrite {
            headers.insert(name, value);
        } else {
            headers.append(name, value);
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Request,
    Response,
}

fn of<'a>(m: (&'a HeaderMutations, &'a HeaderMutations), d: Direction) -> &'a HeaderMutations {
    match d {
        Direction::Request => m.0,
        Direction::Response => m.1,
    }
}

/// Applies the levels of one direction in Envoy's evaluation order (the last one wins).
fn apply_levels(
    rc: &RouteConfig,
    vh: &VirtualHost,
    route: &Route,
    wc: Option<&WeightedCluster>,
    d: Direction,
    headers: &mut HeaderMap,
    ctx: &TemplateContext<'_>,
) {
    let rc_m = of((&rc.request_headers, &rc.response_headers), d);
    let vh_m = of((&vh.request_headers, &vh.response_headers), d);
    let route_m = of((&route.request_headers, &route.response_headers), d);
    let (first, last) = if rc.most_specific_header_mutations_wins { (rc_m, route_m) } else { (route_m, rc_m) };
    let wc_m = wc.map(|c| of((&c.request_headers, &c.response_headers), d));
    for m in [wc_m, Some(first), Some(vh_m), Some(last)].into_iter().flatten() {
        if !m.is_empty() {
            apply(m, headers, ctx);
        }
    }
}

/// All request header mutations for a routed request, in Envoy's order and precedence.
/// `ctx.request_headers` should be `None` (`%REQ(...)%` reads the request being mutated).
pub fn apply_request_mutations(
    rc: &RouteConfig,
    vh: &VirtualHost,
    route: &Route,
    wc: Option<&WeightedCluster>,
    headers: &mut HeaderMap,
    ctx: &TemplateContext<'_>,
) {
    apply_levels(rc, vh, route, wc, Direction::Request, headers, ctx);
}

/// All response header mutations for a routed request (also for redirects and direct
/// responses, with `wc = None`). `ctx.request_headers` should carry the downstream request's
/// headers for `%REQ(...)%`.
pub fn apply_response_mutations(
    rc: &RouteConfig,
    vh: &VirtualHost,
    route: &Route,
    wc: Option<&WeightedCluster>,
    headers: &mut HeaderMap,
    ctx: &TemplateContext<'_>,
) {
    apply_levels(rc, vh, route, wc, Direction::Response, headers, ctx);
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use sluice_config::model::{ClusterSpecifier, HeaderAdd, HeaderValueTemplate, RouteAction, TemplatePart};

    use super::*;

    fn ctx() -> TemplateContext<'static> {
        TemplateContext::new("10.0.0.1:1234".parse().unwrap(), "10.0.0.2:80".parse().unwrap())
    }

    fn add(name: &str, value: &str, action: AppendAction) -> HeaderAdd {
        HeaderAdd { name: name.into(), value: HeaderValueTemplate::literal(value), action, keep_empty_value: false }
    }

    fn values(h: &HeaderMap, name: &str) -> Vec<String> {
        h.get_all(name).iter().map(|v| v.to_str().unwrap().to_string()).collect()
    }

    fn start() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("old1"));
        h.append("x-a", HeaderValue::from_static("old2"));
        h
    }

    #[test]
    fn each_append_action() {
        let run = |action| {
            let mut h = start();
            let m = HeaderMutations::new(vec![add("x-a", "new", action), add("x-b", "new", action)], vec![]);
            apply(&m, &mut h, &ctx());
            (values(&h, "x-a"), values(&h, "x-b"))
        };
        assert_eq!(
            run(AppendAction::AppendIfExistsOrAdd),
            (vec!["old1".into(), "old2".into(), "new".into()], vec!["new".into()])
        );
        assert_eq!(run(AppendAction::AddIfAbsent), (vec!["old1".into(), "old2".into()], vec!["new".into()]));
        assert_eq!(run(AppendAction::OverwriteIfExistsOrAdd), (vec!["new".into()], vec!["new".into()]));
        assert_eq!(run(AppendAction::OverwriteIfExists), (vec!["new".into()], vec![]));
    }

    #[test]
    fn removals_come_before_additions_in_a_level() {
        let mut h = start();
        let m = HeaderMutations::new(vec![add("x-a", "new", AppendAction::AddIfAbsent)], vec!["x-a".into()]);
        apply(&m, &mut h, &ctx());
        assert_eq!(values(&h, "x-a"), ["new"], "removed, then absent, so added");
    }

    #[test]
    fn conditions_and_values_see_the_headers_before_this_levels_additions() {
        let mut h = HeaderMap::new();
        let m = HeaderMutations::new(
            vec![add("x-n", "1", AppendAction::AppendIfExistsOrAdd), add("x-n", "2", AppendAction::AddIfAbsent)],
            vec![],
        );
        apply(&m, &mut h, &ctx());
        assert_eq!(values(&h, "x-n"), ["1", "2"], "x-n was absent when both were evaluated");

        // %REQ(x-src)% reads the value before this level overwrites it.
        let mut h = HeaderMap::new();
        h.insert("x-src", HeaderValue::from_static("before"));
        let copy = HeaderAdd {
            name: "x-copy".into(),
            value: HeaderValueTemplate { parts: vec![TemplatePart::RequestHeader("x-src".into())] },
            action: AppendAction::AppendIfExistsOrAdd,
            keep_empty_value: false,
        };
        let m = HeaderMutations::new(vec![add("x-src", "after", AppendAction::OverwriteIfExistsOrAdd), copy], vec![]);
        apply(&m, &mut h, &ctx());
        assert_eq!(values(&h, "x-src"), ["after"]);
        assert_eq!(values(&h, "x-copy"), ["before"]);
    }

    #[test]
    fn overwrites_are_applied_before_appends() {
        let mut h = start();
        let m = HeaderMutations::new(
            vec![
                add("x-a", "appended", AppendAction::AppendIfExistsOrAdd),
                add("x-a", "over", AppendAction::OverwriteIfExistsOrAdd),
            ],
            vec![],
        );
        apply(&m, &mut h, &ctx());
        assert_eq!(values(&h, "x-a"), ["over", "appended"]);
    }

    #[test]
    fn empty_values_need_keep_empty_value() {
        let mut h = start();
        let mut keep = add("x-keep", "", AppendAction::AppendIfExistsOrAdd);
        keep.keep_empty_value = true;
        let m = HeaderMutations::new(vec![add("x-a", "", AppendAction::OverwriteIfExistsOrAdd), keep], vec![]);
        apply(&m, &mut h, &ctx());
        assert_eq!(values(&h, "x-a"), ["old1", "old2"], "an empty overwrite is skipped, not a removal");
        assert_eq!(values(&h, "x-keep"), [""]);
        // A variable that renders empty is skipped the same way.
        let mut h = HeaderMap::new();
        let up = HeaderAdd {
            name: "x-up".into(),
            value: HeaderValueTemplate { parts: vec![TemplatePart::UpstreamRemoteAddress] },
            action: AppendAction::AppendIfExistsOrAdd,
            keep_empty_value: false,
        };
        apply(&HeaderMutations::new(vec![up], vec![]), &mut h, &ctx());
        assert!(!h.contains_key("x-up"));
    }

    #[test]
    fn invalid_values_are_skipped_not_panicking() {
        let mut h = HeaderMap::new();
        let m = HeaderMutations::new(vec![add("x-bad", "a\u{1}b", AppendAction::AppendIfExistsOrAdd)], vec![]);
        apply(&m, &mut h, &ctx());
        assert!(!h.contains_key("x-bad"));
    }

    // ---- level order, through the real translator --------------------------------------

    fn hv(key: &str, value: &str, action: &str) -> Value {
        json!({"header": {"key": key, "value": value}, "append_action": action})
    }

    /// Every level sets `x-level` with `action` and appends its name to `x-trail`.
    fn levels_config(most_specific: bool, action: &str) -> std::sync::Arc<RouteConfig> {
        let muts = |level: &str| json!([hv("x-level", level, action), hv("x-trail", level, "APPEND_IF_EXISTS_OR_ADD")]);
        crate::route::testutil::route_config(json!({
            "name": "rc",
            "most_specific_header_mutations_wins": most_specific,
            "request_headers_to_add": muts("rc"),
            "response_headers_to_add": muts("rc"),
            "virtual_hosts": [{
                "name": "v", "domains": ["*"],
                "request_headers_to_add": muts("vh"),
                "response_headers_to_add": muts("vh"),
                "routes": [{
                    "match": {"prefix": "/"},
                    "request_headers_to_add": muts("route"),
                    "response_headers_to_add": muts("route"),
                    "route": {"weighted_clusters": {"clusters": [{
                        "name": "/a", "weight": 1,
                        "request_headers_to_add": muts("wc"),
                        "response_headers_to_add": muts("wc")
                    }]}}
                }]
            }]
        }))
    }

    fn run_levels(most_specific: bool, action: &str, response: bool) -> (Vec<String>, Vec<String>) {
        let rc = levels_config(most_specific, action);
        let vh = &rc.virtual_hosts[0];
        let route = &vh.routes[0];
        let RouteAction::Forward(f) = &route.action else { panic!("forward expected") };
        let ClusterSpecifier::Weighted(w) = &f.cluster else { panic!("weighted expected") };
        let mut h = HeaderMap::new();
        let req = HeaderMap::new();
        let mut c = ctx();
        if response {
            c.request_headers = Some(&req);
            apply_response_mutations(&rc, vh, route, Some(&w.clusters[0]), &mut h, &c);
        } else {
            apply_request_mutations(&rc, vh, route, Some(&w.clusters[0]), &mut h, &c);
        }
        (values(&h, "x-level"), values(&h, "x-trail"))
    }

    #[test]
    fn default_order_lets_the_route_configuration_win() {
        for response in [false, true] {
            let (level, trail) = run_levels(false, "OVERWRITE_IF_EXISTS_OR_ADD", response);
            assert_eq!(level, ["rc"]);
            assert_eq!(trail, ["wc", "route", "vh", "rc"]);
            let (level, _) = run_levels(false, "ADD_IF_ABSENT", response);
            assert_eq!(level, ["wc"], "the first level to add wins with ADD_IF_ABSENT");
        }
    }

    #[test]
    fn most_specific_wins_reverses_the_parent_levels() {
        for response in [false, true] {
            let (level, trail) = run_levels(true, "OVERWRITE_IF_EXISTS_OR_ADD", response);
            assert_eq!(level, ["route"]);
            assert_eq!(trail, ["wc", "rc", "vh", "route"]);
        }
    }

    #[test]
    fn removals_at_a_later_level_undo_earlier_additions() {
        let cfg = |most_specific: bool| {
            crate::route::testutil::route_config(json!({
                "name": "rc",
                "most_specific_header_mutations_wins": most_specific,
                "request_headers_to_remove": ["x-gone"],
                "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [{
                    "match": {"prefix": "/"},
                    "request_headers_to_add": [hv("x-gone", "route", "APPEND_IF_EXISTS_OR_ADD")],
                    "route": {"cluster": "/a"}
                }]}]
            }))
        };
        for (most_specific, present) in [(false, false), (true, true)] {
            let rc = cfg(most_specific);
            let vh = &rc.virtual_hosts[0];
            let mut h = HeaderMap::new();
            apply_request_mutations(&rc, vh, &vh.routes[0], None, &mut h, &ctx());
            assert_eq!(h.contains_key("x-gone"), present, "most_specific={most_specific}");
        }
    }
}
