//! `Location` construction for redirect actions and `require_tls`.
//!
//! Verified against `source/common/http/utility.cc` (`Utility::newUri`, `processRequestHost`,
//! `createSslRedirectPath`) and the router's direct-response path, which first rewrites
//! `:path` with the redirect's `prefix_rewrite` / `regex_rewrite`
//! (`RouteEntryImplBase::getPathRewrite` in `config_impl.cc`):
//! - scheme: `scheme_redirect` / `https_redirect`, else the request's scheme;
//! - host: `host_redirect` verbatim (any request port is dropped); otherwise the request host,
//!   minus its port when `port_redirect` is set, or when the scheme changes and the port is
//!   the old scheme's default (`:80` for http, `:443` for https);
//! - port: `port_redirect` appended as `:port`;
//! - path: `path_redirect` replaces the path; if it carries a `?` its query replaces the
//!   request's (and `strip_query` is ignored), otherwise the request's query is kept;
//!   `prefix_rewrite` replaces the matched prefix like the forwarding rewrite; `regex_rewrite`
//!   substitutes in the path without query; a path not starting with `/` gets one;
//! - `strip_query` drops the query unless it came from `path_redirect`.

use std::fmt::Write as _;

use http::{HeaderValue, StatusCode};
use sluice_config::model::{PathMatch, PathRedirect, Redirect, VirtualHost};

use super::RequestView;
use super::rewrite::{regex_rewrite, replace_matched_prefix};
use super::select::requires_tls_redirect;

/// Status and `Location` for a redirect action. `m` and `case_sensitive` are the matching
/// route's path specifier (for `prefix_rewrite`).
///
/// Envoy also applies the route's response header mutations to redirects; the caller does
/// that with [`super::apply_response_mutations`] (without a weighted cluster).
pub fn redirect_location(
    r: &Redirect,
    m: &PathMatch,
    case_sensitive: bool,
    req: &RequestView<'_>,
) -> (StatusCode, HeaderValue) {
    let status = StatusCode::from_u16(r.response_code)
        .ok()
        .filter(StatusCode::is_redirection)
        .unwrap_or(StatusCode::MOVED_PERMANENTLY);

    let scheme = r.scheme.as_deref().unwrap_or(req.scheme);
    let host = match &r.host {
        Some(h) if !h.is_empty() => h.as_str(),
        _ => request_host(req.authority, req.scheme, scheme, r.port.is_some()),
    };

    // The path after the redirect's own rewrite (the router rewrites :path before newUri).
    let rewritten;
    let mut query_from_config = false;
    let path: &str = match &r.path {
        PathRedirect::Path(p) if !p.is_empty() => {
            if p.contains('?') {
                query_from_config = true;
                p
            } else {
                let query = req.path.find('?').map_or("", |i| &req.path[i..]);
                rewritten = format!("{p}{query}");
                &rewritten
            }
        }
        PathRedirect::Prefix(p) if !p.is_empty() => match replace_matched_prefix(p, m, case_sensitive, req.path) {
            Some(s) => {
                rewritten = s;
                &rewritten
            }
            None => req.path,
        },
        PathRedirect::Regex(rr) => match regex_rewrite(rr, req.path) {
            Some(s) => {
                rewritten = s;
                &rewritten
            }
            None => req.path,
        },
        _ => req.path,
    };
    let path = if r.strip_query && !query_from_config {
        match path.find('?') {
            Some(i) => &path[..i],
            None => path,
        }
    } else {
        path
    };

    let mut out = String::with_capacity(scheme.len() + host.len() + path.len() + 10);
    out.push_str(scheme);
    out.push_str("://");
    out.push_str(host);
    if let Some(port) = r.port {
        // Writing into a String cannot fail.
        let _ = write!(out, ":{port}");
    }
    if !path.starts_with('/') {
        out.push('/');
    }
    out.push_str(path);
    (status, location_value(out))
}

/// The request host as it goes into a redirect (Envoy's `processRequestHost`): the port is
/// removed when a new port is configured, or when the scheme changes and the port is the
/// default port of the request's (forwarded) scheme.
fn request_host<'a>(authority: &'a str, request_scheme: &str, new_scheme: &str, new_port: bool) -> &'a str {
    let port_at = if authority.starts_with('[') { authority.rfind("]:").map(|i| i + 1) } else { authority.rfind(':') };
    let Some(i) = port_at else { return authority };
    let port = &authority[i..];
    let mut remove = new_port;
    if new_scheme != request_scheme {
        remove |= request_scheme.eq_ignore_ascii_case("https") && port == ":443";
        remove |= request_scheme.eq_ignore_ascii_case("http") && port == ":80";
    }
    if remove { &authority[..i] } else { authority }
}

/// `require_tls`: the `Location` of the `301` to HTTPS, or `None` when the request may pass.
/// Envoy keeps the authority as it is, port included (`createSslRedirectPath`).
pub fn require_tls_location(vhost: &VirtualHost, req: &RequestView<'_>) -> Option<HeaderValue> {
    if !requires_tls_redirect(vhost, req) {
        return None;
    }
    let mut out = String::with_capacity(8 + req.authority.len() + req.path.len());
    out.push_str("https://");
    out.push_str(req.authority);
    out.push_str(req.path);
    Some(location_value(out))
}

/// Envoy adds a `Location` to *direct responses* with status 201 or 3xx: the request's own URL
/// (the router calls `newUri` without a redirect configuration). `None` for other statuses or a
/// request without a path.
pub fn direct_response_location(status: u16, req: &RequestView<'_>) -> Option<HeaderValue> {
    if !(status == 201 || (300..400).contains(&status)) || req.path.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(req.scheme.len() + 4 + req.authority.len() + req.path.len());
    out.push_str(req.scheme);
    out.push_str("://");
    out.push_str(req.authority);
    if !req.path.starts_with('/') {
        out.push('/');
    }
    out.push_str(req.path);
    Some(location_value(out))
}

/// A header value from a URL built out of request data and configuration. Request data is
/// already a valid header value; configuration strings (hosts) are not validated as such by
/// the translator, so bytes a header value cannot carry are percent-encoded instead of
/// failing the response.
pub(crate) fn location_value(s: String) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let valid = |b: u8| b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80;
    let bytes = if s.bytes().all(valid) {
        s.into_bytes()
    } else {
        let mut enc = Vec::with_capacity(s.len() + 8);
        for b in s.bytes() {
            if valid(b) {
                enc.push(b);
            } else {
                enc.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
            }
        }
        enc
    };
    // Every byte is now valid in a header value, so this cannot fail; "/" keeps the
    // signature infallible without a panic path.
    HeaderValue::from_maybe_shared(bytes::Bytes::from(bytes)).unwrap_or_else(|_| HeaderValue::from_static("/"))
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, Method};
    use serde_json::{Value, json};
    use sluice_config::model::RouteAction;

    use super::*;
    use crate::route::testutil::{route_config, view};

    /// Translates a redirect route and runs it on `authority` + `path` with `scheme`.
    fn redirect(m: Value, r: Value, scheme: &str, authority: &str, path: &str) -> (u16, String) {
        let rc = route_config(json!({"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"],
            "routes": [{"match": m, "redirect": r}]}]}));
        let route = &rc.virtual_hosts[0].routes[0];
        let RouteAction::Redirect(rd) = &route.action else { panic!("not a redirect") };
        let h = HeaderMap::new();
        let mut req = view(Method::GET, path, authority, &h);
        req.scheme = scheme;
        let (status, loc) = redirect_location(rd, &route.matcher.path, route.matcher.case_sensitive, &req);
        (status.as_u16(), loc.to_str().unwrap().to_string())
    }

    fn any() -> Value {
        json!({"prefix": "/"})
    }

    #[test]
    fn https_redirect_strips_the_default_http_port_only() {
        let r = json!({"https_redirect": true});
        assert_eq!(redirect(any(), r.clone(), "http", "a.example", "/p?q"), (301, "https://a.example/p?q".into()));
        assert_eq!(redirect(any(), r.clone(), "http", "a.example:80", "/p").1, "https://a.example/p");
        assert_eq!(redirect(any(), r.clone(), "http", "a.example:8080", "/p").1, "https://a.example:8080/p");
        assert_eq!(redirect(any(), r.clone(), "http", "[::1]:80", "/p").1, "https://[::1]/p");
        // Same scheme: the port stays even if it is the default one.
        assert_eq!(redirect(any(), r, "https", "a.example:443", "/p").1, "https://a.example:443/p");
        let r = json!({"scheme_redirect": "http"});
        assert_eq!(redirect(any(), r, "https", "a.example:443", "/p").1, "http://a.example/p");
    }

    #[test]
    fn host_and_port_redirects() {
        assert_eq!(
            redirect(any(), json!({"host_redirect": "b.example"}), "http", "a.example:8080", "/p").1,
            "http://b.example/p"
        );
        assert_eq!(
            redirect(any(), json!({"port_redirect": 8443}), "http", "a.example:8080", "/p").1,
            "http://a.example:8443/p"
        );
        assert_eq!(
            redirect(any(), json!({"port_redirect": 8443}), "http", "[::1]:8080", "/p").1,
            "http://[::1]:8443/p"
        );
        assert_eq!(
            redirect(
                any(),
                json!({"host_redirect": "b.example", "port_redirect": 9000, "scheme_redirect": "https"}),
                "http",
                "a.example",
                "/p?x"
            )
            .1,
            "https://b.example:9000/p?x"
        );
    }

    #[test]
    fn path_redirect_and_queries() {
        assert_eq!(redirect(any(), json!({"path_redirect": "/new"}), "http", "h", "/old?a=1").1, "http://h/new?a=1");
        assert_eq!(
            redirect(any(), json!({"path_redirect": "/new?b=2"}), "http", "h", "/old?a=1").1,
            "http://h/new?b=2"
        );
        assert_eq!(
            redirect(any(), json!({"path_redirect": "/new", "strip_query": true}), "http", "h", "/old?a=1").1,
            "http://h/new"
        );
        // A query in path_redirect survives strip_query.
        assert_eq!(
            redirect(any(), json!({"path_redirect": "/new?b=2", "strip_query": true}), "http", "h", "/old?a=1").1,
            "http://h/new?b=2"
        );
        assert_eq!(redirect(any(), json!({"strip_query": true}), "http", "h", "/keep?a=1").1, "http://h/keep");
        assert_eq!(redirect(any(), json!({"path_redirect": "relative"}), "http", "h", "/x").1, "http://h/relative");
    }

    #[test]
    fn prefix_and_regex_rewrites_in_redirects() {
        assert_eq!(
            redirect(json!({"prefix": "/old"}), json!({"prefix_rewrite": "/new"}), "http", "h", "/old/x?q=1").1,
            "http://h/new/x?q=1"
        );
        assert_eq!(
            redirect(
                json!({"path_separated_prefix": "/old"}),
                json!({"prefix_rewrite": "/new", "strip_query": true}),
                "http",
                "h",
                "/old/x?q=1"
            )
            .1,
            "http://h/new/x"
        );
        assert_eq!(
            redirect(json!({"path": "/exact"}), json!({"prefix_rewrite": "/e2"}), "http", "h", "/exact?z").1,
            "http://h/e2?z"
        );
        assert_eq!(
            redirect(
                json!({"prefix": "/"}),
                json!({"regex_rewrite": {"pattern": {"regex": "^/a/(.*)$"}, "substitution": "/b/\\1"}}),
                "http",
                "h",
                "/a/c?d"
            )
            .1,
            "http://h/b/c?d"
        );
        // Gateway API ReplacePrefixMatch "/" on prefix "/prefix": Envoy yields "//x" unless the
        // translator uses the trailing-slash form; the redirect keeps Envoy's behaviour.
        assert_eq!(
            redirect(json!({"prefix": "/prefix"}), json!({"prefix_rewrite": "/"}), "http", "h", "/prefix/x").1,
            "http://h//x"
        );
    }

    #[test]
    fn response_codes() {
        for (name, code) in [
            ("MOVED_PERMANENTLY", 301),
            ("FOUND", 302),
            ("SEE_OTHER", 303),
            ("TEMPORARY_REDIRECT", 307),
            ("PERMANENT_REDIRECT", 308),
        ] {
            assert_eq!(redirect(any(), json!({"response_code": name}), "http", "h", "/").0, code);
        }
    }

    #[test]
    fn direct_responses_with_201_or_3xx_point_at_the_request() {
        let h = HeaderMap::new();
        let req = view(Method::POST, "/items?x=1", "h.example:8080", &h);
        assert_eq!(direct_response_location(201, &req).unwrap(), "http://h.example:8080/items?x=1");
        assert_eq!(direct_response_location(302, &req).unwrap(), "http://h.example:8080/items?x=1");
        assert!(direct_response_location(200, &req).is_none());
        assert!(direct_response_location(404, &req).is_none());
        assert!(direct_response_location(301, &view(Method::CONNECT, "", "h:443", &h)).is_none());
    }

    #[test]
    fn location_value_encodes_control_characters() {
        assert_eq!(location_value("http://a\u{1}b/".into()), "http://a%01b/");
        assert_eq!(location_value("http://a/b".into()), "http://a/b");
    }
}
