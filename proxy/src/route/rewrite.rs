//! Path and host rewrites of a forwarded request.
//!
//! Verified against `source/common/router/config_impl.cc`
//! (`currentUrlPathAfterRewriteWithMatchedPath`, `finalizeHostHeader`, the `*RouteEntryImpl`
//! classes) and `weighted_cluster_specifier.cc` (`WeightedClusterEntry`):
//! - `prefix_rewrite` replaces the *matched part* of the path: the configured prefix for
//!   `prefix` and `path_separated_prefix` routes, the configured path for `path` routes, and
//!   the whole path without query for `safe_regex` and `connect_matcher` routes. The rest of
//!   the path, query included, is kept. An empty `prefix_rewrite` means "no rewrite".
//! - `regex_rewrite` substitutes every match in the path without query and keeps the query.
//! - Host: the weighted cluster's `host_rewrite_literal` is applied first, then the route's
//!   literal / header / path-regex rewrite, which wins when it yields a non-empty value.
//!   `auto_host_rewrite` needs the chosen upstream host and is left to the caller.

use std::borrow::Cow;

use http::HeaderMap;
use sluice_config::model::{ForwardAction, HostRewrite, PathMatch, RegexRewrite, WeightedCluster};

use super::matching::starts_with;
use super::path_only;

/// The new `:path` after `prefix_rewrite` / `regex_rewrite`, or `None` when the route has no
/// rewrite or the rewrite leaves the path unchanged.
///
/// `m` and `case_sensitive` are the matching route's path specifier; `path` is the request's
/// `:path` as it was matched (with its query).
pub fn rewrite_path(action: &ForwardAction, m: &PathMatch, case_sensitive: bool, path: &str) -> Option<String> {
    let new = if let Some(prefix) = action.prefix_rewrite.as_deref().filter(|p| !p.is_empty()) {
        replace_matched_prefix(prefix, m, case_sensitive, path)?
    } else if let Some(rr) = &action.regex_rewrite {
        regex_rewrite(rr, path)?
    } else {
        return None;
    };
    (new != path).then_some(new)
}

/// `prefix_rewrite`: `rewrite` + the path after the matched part.
pub(crate) fn replace_matched_prefix(rewrite: &str, m: &PathMatch, case_sensitive: bool, path: &str) -> Option<String> {
    let matched = match m {
        PathMatch::Prefix(p) | PathMatch::PathSeparatedPrefix(p) | PathMatch::Path(p) => {
            // Envoy asserts this; a caller passing another path than the matched one gets
            // no rewrite rather than a mangled path.
            if !starts_with(path.as_bytes(), p.as_bytes(), case_sensitive) {
                return None;
            }
            p.len()
        }
        PathMatch::SafeRegex(_) | PathMatch::Connect => path_only(path).len(),
    };
    // `matched` is on a char boundary: it is the length of an ASCII-case-insensitively equal
    // prefix (same bytes up to ASCII case) or of `path_only`.
    let rest = path.get(matched..)?;
    let mut out = String::with_capacity(rewrite.len() + rest.len());
    out.push_str(rewrite);
    out.push_str(rest);
    Some(out)
}

/// `regex_rewrite`: substitute every match in the path without query, keep the query.
/// `None` when nothing matched.
pub(crate) fn regex_rewrite(rr: &RegexRewrite, path: &str) -> Option<String> {
    let just_path = path_only(path);
    match rr.pattern.find()?.replace_all(just_path, rr.substitution.as_str()) {
        Cow::Borrowed(_) => None,
        Cow::Owned(mut s) => {
            s.push_str(&path[just_path.len()..]);
            Some(s)
        }
    }
}

/// The new `:authority`, or `None` to keep it (also when the route uses
/// `auto_host_rewrite`, which the caller resolves once the upstream host is known).
///
/// `headers` and `path` are the request's as the router sees them after the request header
/// mutations (Envoy applies the mutations before the host rewrite), and before the path
/// rewrite.
pub fn rewrite_host<'a>(
    action: &'a ForwardAction,
    wc: Option<&'a WeightedCluster>,
    headers: &'a HeaderMap,
    path: &str,
) -> Option<Cow<'a, str>> {
    let route_host = match &action.host_rewrite {
        Some(HostRewrite::Literal(h)) => Some(Cow::Borrowed(h.as_str())),
        Some(HostRewrite::Header(name)) => {
            // Only the first value of an untrusted header is used.
            headers.get(name.as_str()).and_then(|v| v.to_str().ok()).map(Cow::Borrowed)
        }
        Some(HostRewrite::PathRegex(rr)) => {
            let just_path = path_only(path);
            rr.pattern.find().map(|re| Cow::Owned(re.replace_all(just_path, rr.substitution.as_str()).into_owned()))
        }
        Some(HostRewrite::Auto) | None => None,
    };
    route_host
        .filter(|h| !h.is_empty())
        .or_else(|| wc.and_then(|c| c.host_rewrite_literal.as_deref()).filter(|h| !h.is_empty()).map(Cow::Borrowed))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use serde_json::{Value, json};
    use sluice_config::model::{ClusterSpecifier, Pattern, RouteAction};

    use super::*;
    use crate::route::testutil::route_config;

    /// Translates one route (`match` + `route` JSON) and runs `f` on its action and matcher.
    fn with_route(m: Value, action: Value, f: impl FnOnce(&ForwardAction, &PathMatch, bool)) {
        let rc = route_config(json!({"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"],
            "routes": [{"match": m, "route": action}]}]}));
        let route = &rc.virtual_hosts[0].routes[0];
        let RouteAction::Forward(fwd) = &route.action else { panic!("not a forward action") };
        f(fwd, &route.matcher.path, route.matcher.case_sensitive);
    }

    fn rw(m: Value, action: Value, path: &str) -> Option<String> {
        let mut out = None;
        with_route(m, action, |a, pm, cs| out = rewrite_path(a, pm, cs, path));
        out
    }

    #[test]
    fn prefix_rewrite_replaces_the_matched_prefix_and_keeps_the_query() {
        let a = json!({"cluster": "/a", "prefix_rewrite": "/v2"});
        assert_eq!(rw(json!({"prefix": "/v1"}), a.clone(), "/v1/users?x=1").as_deref(), Some("/v2/users?x=1"));
        // Envoy's documented trailing-slash pitfall: prefix "/prefix" + rewrite "/" on
        // "/prefix/etc" gives "//etc".
        let a = json!({"cluster": "/a", "prefix_rewrite": "/"});
        assert_eq!(rw(json!({"prefix": "/prefix"}), a.clone(), "/prefix/etc").as_deref(), Some("//etc"));
        assert_eq!(rw(json!({"prefix": "/prefix/"}), a.clone(), "/prefix/etc").as_deref(), Some("/etc"));
        assert_eq!(rw(json!({"prefix": "/"}), a, "/same"), None, "unchanged path");
    }

    #[test]
    fn prefix_rewrite_case_insensitive_match() {
        let a = json!({"cluster": "/a", "prefix_rewrite": "/new"});
        assert_eq!(
            rw(json!({"prefix": "/old", "case_sensitive": false}), a.clone(), "/OLD/x").as_deref(),
            Some("/new/x")
        );
        assert_eq!(rw(json!({"prefix": "/old"}), a, "/OLD/x"), None, "not the matched path");
    }

    #[test]
    fn prefix_rewrite_for_path_separated_prefix_exact_and_regex() {
        let a = json!({"cluster": "/a", "prefix_rewrite": "/in"});
        assert_eq!(rw(json!({"path_separated_prefix": "/svc"}), a.clone(), "/svc/m?q").as_deref(), Some("/in/m?q"));
        assert_eq!(rw(json!({"path_separated_prefix": "/svc"}), a.clone(), "/svc").as_deref(), Some("/in"));
        assert_eq!(rw(json!({"path": "/exact"}), a.clone(), "/exact?q=1").as_deref(), Some("/in?q=1"));
        // safe_regex: the whole path (without query) is the matched part.
        assert_eq!(rw(json!({"safe_regex": {"regex": "/r/.*"}}), a, "/r/a/b?q=1").as_deref(), Some("/in?q=1"));
    }

    #[test]
    fn empty_prefix_rewrite_is_no_rewrite() {
        assert_eq!(rw(json!({"prefix": "/a"}), json!({"cluster": "/a", "prefix_rewrite": ""}), "/a/b"), None);
    }

    #[test]
    fn regex_rewrite_substitutes_every_match_and_keeps_the_query() {
        // Cilium's traffic-management example.
        let a = json!({"cluster": "/a", "regex_rewrite": {"pattern": {"google_re2": {}, "regex": "^/foo.*$"}, "substitution": "/"}});
        assert_eq!(rw(json!({"prefix": "/"}), a.clone(), "/foo/bar?x=1").as_deref(), Some("/?x=1"));
        assert_eq!(rw(json!({"prefix": "/"}), a, "/other"), None);
        // Gateway API prefix replacement with capture groups.
        let a = json!({"cluster": "/a", "regex_rewrite": {"pattern": {"regex": "^/prefix(/?)(.*)"}, "substitution": "/\\2"}});
        assert_eq!(rw(json!({"prefix": "/prefix"}), a.clone(), "/prefix/one/two").as_deref(), Some("/one/two"));
        assert_eq!(rw(json!({"prefix": "/prefix"}), a, "/prefix").as_deref(), Some("/"));
        // Every non-overlapping match, like RE2::GlobalReplace.
        let a = json!({"cluster": "/a", "regex_rewrite": {"pattern": {"regex": "o"}, "substitution": "0"}});
        assert_eq!(rw(json!({"prefix": "/"}), a, "/foo/boo?o=o").as_deref(), Some("/f00/b00?o=o"));
    }

    fn action(host_rewrite: Option<HostRewrite>) -> ForwardAction {
        ForwardAction {
            cluster: ClusterSpecifier::Cluster("/a".into()),
            prefix_rewrite: None,
            regex_rewrite: None,
            host_rewrite,
            timeout: None,
            idle_timeout: None,
            retry_policy: None,
            request_mirror_policies: vec![],
            hash_policy: vec![],
            max_stream_duration: None,
            grpc_timeout_header_max: None,
            grpc_timeout_header_offset: None,
            upgrade_configs: vec![],
        }
    }

    fn wc(host: Option<&str>) -> WeightedCluster {
        WeightedCluster {
            name: "/a".into(),
            weight: 1,
            request_headers: Default::default(),
            response_headers: Default::default(),
            host_rewrite_literal: host.map(str::to_string),
        }
    }

    #[test]
    fn host_rewrite_variants() {
        let mut h = HeaderMap::new();
        h.append("x-host", HeaderValue::from_static("first.example"));
        h.append("x-host", HeaderValue::from_static("second.example"));
        h.insert("x-empty", HeaderValue::from_static(""));
        let lit = action(Some(HostRewrite::Literal("lit.example".into())));
        assert_eq!(rewrite_host(&lit, None, &h, "/").as_deref(), Some("lit.example"));
        let hdr = action(Some(HostRewrite::Header("x-host".into())));
        assert_eq!(rewrite_host(&hdr, None, &h, "/").as_deref(), Some("first.example"));
        let missing = action(Some(HostRewrite::Header("x-none".into())));
        assert_eq!(rewrite_host(&missing, None, &h, "/"), None);
        let empty = action(Some(HostRewrite::Header("x-empty".into())));
        assert_eq!(rewrite_host(&empty, None, &h, "/"), None);
        let re = action(Some(HostRewrite::PathRegex(RegexRewrite {
            pattern: Pattern::new("^/([^/]+)/.*$").unwrap(),
            substitution: "${1}.svc".into(),
        })));
        assert_eq!(rewrite_host(&re, None, &h, "/tenant/x?q=/a/").as_deref(), Some("tenant.svc"));
        assert_eq!(rewrite_host(&action(Some(HostRewrite::Auto)), None, &h, "/"), None);
        assert_eq!(rewrite_host(&action(None), None, &h, "/"), None);
    }

    #[test]
    fn weighted_cluster_host_literal_loses_to_a_route_rewrite() {
        let h = HeaderMap::new();
        let c = wc(Some("wc.example"));
        assert_eq!(rewrite_host(&action(None), Some(&c), &h, "/").as_deref(), Some("wc.example"));
        let lit = action(Some(HostRewrite::Literal("route.example".into())));
        assert_eq!(rewrite_host(&lit, Some(&c), &h, "/").as_deref(), Some("route.example"));
        // A header rewrite that yields nothing leaves the cluster's literal in place.
        let hdr = action(Some(HostRewrite::Header("x-none".into())));
        assert_eq!(rewrite_host(&hdr, Some(&c), &h, "/").as_deref(), Some("wc.example"));
        assert_eq!(rewrite_host(&action(None), Some(&wc(None)), &h, "/"), None);
    }
}
