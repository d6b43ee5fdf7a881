//! Envoy's request matchers: strings, headers, query parameters, gRPC content type, paths.
//!
//! Verified against Envoy's sources:
//! - `source/common/http/header_utility.cc` (`matchHeaders`, `getAllOfHeaderAsString`):
//!   a missing header never matches (even inverted) unless `treat_missing_header_as_empty`,
//!   except `present_match`, which is `(present == wanted) != invert_match`; `range_match` is
//!   `start <= v < end` on the value parsed with `absl::SimpleAtoi` (surrounding ASCII
//!   whitespace and a sign allowed).
//! - A header present several times: Envoy 1.40 matches each value on its own and the matcher
//!   holds when any value matches (`invert_match` then negates that: no value may match) —
//!   the runtime guard `envoy.reloadable_features.match_headers_individually`, on by default;
//!   earlier releases matched the values joined with `,`. Envoy's header map keeps some
//!   headers as one entry, appending repeats with `,` as they arrive (its "inline" headers:
//!   `user-agent`, `x-forwarded-for`, `content-type`, `authorization`, ...), and its HTTP/2
//!   codec rejoins `cookie` crumbs with `; `; those are matched joined. [`COALESCED`] lists
//!   them; the list was checked header by header against Envoy 1.40.0.
//! - `source/common/http/utility.cc` (`QueryParamsMulti::parseQueryString`): query parameters
//!   are split on `&` and the first `=`, **not** percent-decoded, and only the first value of a
//!   repeated name is matched.
//! - `source/common/common/matchers.cc` (`PathMatcher::match`): path matchers compare the path
//!   without query and fragment.
//! - `source/common/grpc/common.cc` (`hasGrpcContentType`): `application/grpc` exactly or
//!   followed by `+` (so `application/grpc-web` is not gRPC).

use std::borrow::Cow;

use http::HeaderMap;
use sluice_config::model::{
    HeaderMatchSpec, HeaderMatcher, PathMatch, QueryParameterMatcher, StringMatchKind, StringMatcher,
};

use super::RequestView;

/// Envoy's `StringMatcher`. Unlike [`StringMatcher::matches`] in the model this never
/// allocates: `contains` with `ignore_case` slides a case-insensitive window instead of
/// lower-casing both strings. `ignore_case` has no effect on `safe_regex`, as in Envoy.
pub fn string_matches(m: &StringMatcher, value: &str) -> bool {
    let v = value.as_bytes();
    match &m.kind {
        StringMatchKind::Exact(s) => {
            if m.ignore_case {
                v.eq_ignore_ascii_case(s.as_bytes())
            } else {
                value == s
            }
        }
        StringMatchKind::Prefix(s) => starts_with(v, s.as_bytes(), !m.ignore_case),
        StringMatchKind::Suffix(s) => {
            let s = s.as_bytes();
            v.len() >= s.len() && eq_bytes(&v[v.len() - s.len()..], s, !m.ignore_case)
        }
        StringMatchKind::Contains(s) => {
            if m.ignore_case {
                contains_ignore_ascii_case(v, s.as_bytes())
            } else {
                value.contains(s.as_str())
            }
        }
        StringMatchKind::SafeRegex(p) => p.full_match(value),
    }
}

fn eq_bytes(a: &[u8], b: &[u8], case_sensitive: bool) -> bool {
    if case_sensitive { a == b } else { a.eq_ignore_ascii_case(b) }
}

pub(crate) fn starts_with(hay: &[u8], prefix: &[u8], case_sensitive: bool) -> bool {
    hay.len() >= prefix.len() && eq_bytes(&hay[..prefix.len()], prefix, case_sensitive)
}

fn contains_ignore_ascii_case(hay: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    if hay.len() < needle.len() {
        return false;
    }
    hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

/// What a header matcher compares for one header name.
pub(crate) enum Values<'r> {
    /// One value: a pseudo-header, a header sent once, or a repeated header Envoy keeps as one
    /// entry (joined).
    One(Cow<'r, str>),
    /// A header sent several times that Envoy keeps as separate entries: each value is matched
    /// on its own.
    Each(http::header::GetAll<'r, http::HeaderValue>),
}

/// The values a header matcher sees: pseudo-headers come from the request line; a repeated
/// header is either joined (the [`COALESCED`] headers, allocating) or matched value by value.
///
/// Sluice choice: `host` is treated as an alias of `:authority`. Envoy's codecs move the
/// HTTP/1.1 `Host` header into `:authority`, so Envoy never sees a `host` entry; treating both
/// names alike gives the same answer for HTTP/1.1 and HTTP/2.
pub(crate) fn header_values<'r>(req: &RequestView<'r>, name: &str) -> Option<Values<'r>> {
    if let Some(pseudo) = name.strip_prefix(':') {
        return match pseudo {
            "method" => Some(Values::One(Cow::Borrowed(req.method.as_str()))),
            "authority" => Some(Values::One(Cow::Borrowed(req.authority))),
            "path" => (!req.path.is_empty()).then_some(Values::One(Cow::Borrowed(req.path))),
            "scheme" => Some(Values::One(Cow::Borrowed(req.scheme))),
            _ => None,
        };
    }
    if name == "host" {
        return Some(Values::One(Cow::Borrowed(req.authority)));
    }
    let all = req.headers.get_all(name);
    let mut it = all.iter();
    match (it.next(), it.next()) {
        // Envoy's connection manager always sets x-forwarded-proto before routing.
        (None, _) if name == "x-forwarded-proto" && !req.scheme.is_empty() => {
            Some(Values::One(Cow::Borrowed(req.scheme)))
        }
        (None, _) => None,
        (Some(only), None) => Some(Values::One(lossy(only.as_bytes()))),
        (Some(_), Some(_)) if name == "cookie" => joined(req.headers, name, "; ").map(Values::One),
        (Some(_), Some(_)) if COALESCED.binary_search(&name).is_ok() => joined(req.headers, name, ",").map(Values::One),
        (Some(_), Some(_)) => Some(Values::Each(all)),
    }
}

/// Headers Envoy's request header map keeps as a single entry, appending a repeated value with
/// `,`: its built-in inline headers (`INLINE_REQ_HEADERS` and `INLINE_REQ_RESP_HEADERS` in
/// `envoy/http/header_map.h`) and the custom inline headers Envoy's extensions register
/// (`accept`, `authorization`, `origin`, ...), as observed in Envoy 1.40.0. Repeats of any
/// other header stay separate entries.
pub(crate) const COALESCED: &[&str] = &[
    "accept",
    "accept-encoding",
    "access-control-request-headers",
    "access-control-request-method",
    "authorization",
    "cache-control",
    "connection",
    "content-encoding",
    "content-length",
    "content-type",
    "expect",
    "grpc-accept-encoding",
    "grpc-timeout",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "keep-alive",
    "origin",
    "pragma",
    "proxy-connection",
    "proxy-status",
    "referer",
    "te",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "via",
    "x-client-trace-id",
    "x-envoy-attempt-count",
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-external-address",
    "x-envoy-force-trace",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-internal",
    "x-envoy-ip-tags",
    "x-envoy-max-retries",
    "x-envoy-original-host",
    "x-envoy-original-path",
    "x-envoy-original-url",
    "x-envoy-retriable-header-names",
    "x-envoy-retriable-status-codes",
    "x-envoy-retry-grpc-on",
    "x-envoy-retry-on",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-stream-duration-ms",
    "x-forwarded-client-cert",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-proto",
    "x-request-id",
];

/// All values of `name` joined with `separator`, borrowing when there is exactly one.
pub(crate) fn joined<'h>(headers: &'h HeaderMap, name: &str, separator: &str) -> Option<Cow<'h, str>> {
    let mut it = headers.get_all(name).iter();
    let first = it.next()?;
    let Some(second) = it.next() else {
        return Some(lossy(first.as_bytes()));
    };
    let mut out = String::with_capacity(first.len() + second.len() + 8);
    out.push_str(&lossy(first.as_bytes()));
    for v in std::iter::once(second).chain(it) {
        out.push_str(separator);
        out.push_str(&lossy(v.as_bytes()));
    }
    Some(Cow::Owned(out))
}

/// Header values are bytes and Envoy compares them as such. A value that is not UTF-8
/// (obs-text) is compared after lossy conversion; that differs from a byte comparison only for
/// a configured string containing U+FFFD itself.
fn lossy(b: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(b)
}

/// One `HeaderMatcher` against the request (Envoy's `HeaderUtility::matchHeaders`).
pub fn header_matches(m: &HeaderMatcher, req: &RequestView<'_>) -> bool {
    let values = header_values(req, &m.name);
    match &m.spec {
        HeaderMatchSpec::Present(want) => (values.is_some() == *want) != m.invert_match,
        HeaderMatchSpec::String(s) => value_matches(m, values, |v| string_matches(s, v)),
        HeaderMatchSpec::Range { start, end } => {
            value_matches(m, values, |v| parse_int(v).is_some_and(|n| *start <= n && n < *end))
        }
    }
}

/// A value matcher: a missing header fails, inverted or not, unless it is treated as empty;
/// separate values match when any of them does, and `invert_match` negates the outcome.
fn value_matches(m: &HeaderMatcher, values: Option<Values<'_>>, f: impl Fn(&str) -> bool) -> bool {
    let matched = match values {
        Some(Values::One(v)) => f(&v),
        Some(Values::Each(all)) => all.iter().any(|v| f(&lossy(v.as_bytes()))),
        None if m.treat_missing_header_as_empty => f(""),
        None => return false,
    };
    matched != m.invert_match
}

/// `absl::SimpleAtoi` for `int64`: optional surrounding ASCII whitespace, optional sign.
fn parse_int(s: &str) -> Option<i64> {
    s.trim_ascii().parse::<i64>().ok()
}

/// Every query parameter matcher against the query string of `path` (first `?` on).
pub fn query_matches(matchers: &[QueryParameterMatcher], path: &str) -> bool {
    if matchers.is_empty() {
        return true;
    }
    let query = path.find('?').map(|i| &path[i + 1..]).unwrap_or("");
    matchers.iter().all(|m| match first_query_value(query, &m.name) {
        None => false,
        Some(v) => m.string_match.as_ref().is_none_or(|s| string_matches(s, v)),
    })
}

/// The first value of `name` in a raw query string: `a=1&b&a=2` gives `a` -> `1`, `b` -> `""`.
/// No percent-decoding, as in Envoy's route matching.
pub(crate) fn first_query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|param| match param.split_once('=') {
        Some((k, v)) => (k == name).then_some(v),
        None => (param == name).then_some(""),
    })
}

/// `grpc: {}`: `content-type` is `application/grpc` or `application/grpc+...`.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    headers.get(http::header::CONTENT_TYPE).is_some_and(|ct| {
        let ct = ct.as_bytes();
        ct.starts_with(GRPC) && (ct.len() == GRPC.len() || ct[GRPC.len()] == b'+')
    })
}

/// The path specifier of a route. `path_only` is the request path without query and fragment.
///
/// `path_separated_prefix` follows `PathSeparatedPrefixRouteEntryImpl::matches`: the prefix
/// must match and be followed by `/` or the end of the path.
pub fn path_matches(m: &PathMatch, case_sensitive: bool, req: &RequestView<'_>, path_only: &str) -> bool {
    let p = path_only.as_bytes();
    match m {
        PathMatch::Prefix(prefix) => starts_with(p, prefix.as_bytes(), case_sensitive),
        PathMatch::Path(exact) => eq_bytes(p, exact.as_bytes(), case_sensitive),
        PathMatch::SafeRegex(re) => re.full_match(path_only),
        PathMatch::PathSeparatedPrefix(prefix) => {
            let n = prefix.len();
            starts_with(p, prefix.as_bytes(), case_sensitive) && (p.len() == n || p[n] == b'/')
        }
        PathMatch::Connect => req.method == http::Method::CONNECT,
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderValue, Method};
    use sluice_config::model::Pattern;

    use super::*;
    use crate::route::testutil::view;

    fn sm(kind: StringMatchKind, ignore_case: bool) -> StringMatcher {
        StringMatcher { kind, ignore_case }
    }

    fn hm(name: &str, spec: HeaderMatchSpec, invert: bool, missing_empty: bool) -> HeaderMatcher {
        HeaderMatcher { name: name.into(), spec, invert_match: invert, treat_missing_header_as_empty: missing_empty }
    }

    fn exact(s: &str) -> HeaderMatchSpec {
        HeaderMatchSpec::String(sm(StringMatchKind::Exact(s.into()), false))
    }

    #[test]
    fn string_matcher_kinds() {
        let cases: &[(StringMatchKind, bool, &str, bool)] = &[
            (StringMatchKind::Exact("Foo".into()), false, "Foo", true),
            (StringMatchKind::Exact("Foo".into()), false, "foo", false),
            (StringMatchKind::Exact("Foo".into()), true, "fOO", true),
            (StringMatchKind::Exact("".into()), false, "", true),
            (StringMatchKind::Exact("".into()), false, "x", false),
            (StringMatchKind::Prefix("/Api".into()), false, "/Api/v1", true),
            (StringMatchKind::Prefix("/Api".into()), false, "/api/v1", false),
            (StringMatchKind::Prefix("/Api".into()), true, "/aPI/v1", true),
            (StringMatchKind::Prefix("/Api".into()), true, "/A", false),
            (StringMatchKind::Suffix(".JPG".into()), false, "a.JPG", true),
            (StringMatchKind::Suffix(".JPG".into()), false, "a.jpg", false),
            (StringMatchKind::Suffix(".JPG".into()), true, "a.jpg", true),
            (StringMatchKind::Suffix(".JPG".into()), true, "JPG", false),
            (StringMatchKind::Contains("Mid".into()), false, "aMidb", true),
            (StringMatchKind::Contains("Mid".into()), false, "amidb", false),
            (StringMatchKind::Contains("Mid".into()), true, "aMIDb", true),
            (StringMatchKind::Contains("Mid".into()), true, "aMIb", false),
            (StringMatchKind::Contains("Mid".into()), true, "Mi", false),
        ];
        for (kind, ic, value, want) in cases {
            assert_eq!(string_matches(&sm(kind.clone(), *ic), value), *want, "{kind:?} ic={ic} {value:?}");
        }
    }

    #[test]
    fn regex_is_a_full_match_and_ignores_ignore_case() {
        let re = sm(StringMatchKind::SafeRegex(Box::new(Pattern::new("a+b").unwrap())), true);
        assert!(string_matches(&re, "aab"));
        assert!(!string_matches(&re, "xaab"), "must be anchored");
        assert!(!string_matches(&re, "AAB"), "ignore_case does not apply to regexes");
    }

    #[test]
    fn contains_ignore_case_is_ascii_only_and_handles_multibyte_text() {
        let m = sm(StringMatchKind::Contains("é".into()), true);
        assert!(string_matches(&m, "café"));
        assert!(!string_matches(&m, "CAFÉ"), "non-ASCII letters are not folded (absl is ASCII-only)");
    }

    #[test]
    fn header_exact_prefix_suffix_contains_regex() {
        let mut h = HeaderMap::new();
        h.insert("x-env", HeaderValue::from_static("staging-eu"));
        let req = view(Method::GET, "/", "h", &h);
        let string = |k| HeaderMatchSpec::String(sm(k, false));
        assert!(header_matches(&hm("x-env", exact("staging-eu"), false, false), &req));
        assert!(!header_matches(&hm("x-env", exact("staging"), false, false), &req));
        assert!(header_matches(&hm("x-env", string(StringMatchKind::Prefix("stag".into())), false, false), &req));
        assert!(header_matches(&hm("x-env", string(StringMatchKind::Suffix("-eu".into())), false, false), &req));
        assert!(header_matches(&hm("x-env", string(StringMatchKind::Contains("ing-".into())), false, false), &req));
        let re = string(StringMatchKind::SafeRegex(Box::new(Pattern::new("[a-z]+-(eu|us)").unwrap())));
        assert!(header_matches(&hm("x-env", re.clone(), false, false), &req));
        assert!(!header_matches(&hm("x-env", re, true, false), &req));
    }

    #[test]
    fn repeated_headers_match_value_by_value() {
        // Envoy 1.40 (`match_headers_individually`): any value may match; the joined string
        // is not what is compared.
        let mut h = HeaderMap::new();
        for v in ["a", "b", "c"] {
            h.append("x-tag", HeaderValue::from_static(v));
        }
        let req = view(Method::GET, "/", "h", &h);
        let string = |k| HeaderMatchSpec::String(sm(k, false));
        assert!(header_matches(&hm("x-tag", exact("b"), false, false), &req));
        assert!(header_matches(&hm("x-tag", exact("c"), false, false), &req));
        assert!(!header_matches(&hm("x-tag", exact("a,b,c"), false, false), &req));
        assert!(!header_matches(&hm("x-tag", string(StringMatchKind::Contains(",".into())), false, false), &req));
        // Inverted: true only when no value matches.
        assert!(!header_matches(&hm("x-tag", exact("b"), true, false), &req));
        assert!(header_matches(&hm("x-tag", exact("d"), true, false), &req));
        // Ranges too: one parsable value in range is enough.
        let mut n = HeaderMap::new();
        n.append("x-n", HeaderValue::from_static("x"));
        n.append("x-n", HeaderValue::from_static("5"));
        let req = view(Method::GET, "/", "h", &n);
        assert!(header_matches(&hm("x-n", HeaderMatchSpec::Range { start: 1, end: 10 }, false, false), &req));
    }

    #[test]
    fn a_single_value_with_commas_is_not_split() {
        let mut h = HeaderMap::new();
        h.insert("x-tag", HeaderValue::from_static("a,b"));
        let req = view(Method::GET, "/", "h", &h);
        assert!(header_matches(&hm("x-tag", exact("a,b"), false, false), &req));
        assert!(!header_matches(&hm("x-tag", exact("a"), false, false), &req));
    }

    #[test]
    fn headers_envoy_keeps_as_one_entry_are_joined() {
        let mut h = HeaderMap::new();
        for (k, v) in [("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2"), ("user-agent", "a")] {
            h.append(k, HeaderValue::from_static(v));
        }
        h.append("user-agent", HeaderValue::from_static("b"));
        h.append("cookie", HeaderValue::from_static("a=1"));
        h.append("cookie", HeaderValue::from_static("b=2"));
        let req = view(Method::GET, "/", "h", &h);
        assert!(header_matches(&hm("x-forwarded-for", exact("1.1.1.1,2.2.2.2"), false, false), &req));
        assert!(!header_matches(&hm("x-forwarded-for", exact("2.2.2.2"), false, false), &req));
        assert!(header_matches(&hm("user-agent", exact("a,b"), false, false), &req));
        // HTTP/2 cookie crumbs are rejoined with "; " by Envoy's codec.
        assert!(header_matches(&hm("cookie", exact("a=1; b=2"), false, false), &req));
        assert!(COALESCED.windows(2).all(|w| w[0] < w[1]), "kept sorted, without duplicates");
    }

    #[test]
    fn missing_header_semantics() {
        let h = HeaderMap::new();
        let req = view(Method::GET, "/", "h", &h);
        // A value matcher never matches a missing header, inverted or not.
        assert!(!header_matches(&hm("x-a", exact("v"), false, false), &req));
        assert!(!header_matches(&hm("x-a", exact("v"), true, false), &req));
        // treat_missing_header_as_empty: the value is "", then invert applies.
        assert!(header_matches(&hm("x-a", exact(""), false, true), &req));
        assert!(!header_matches(&hm("x-a", exact("v"), false, true), &req));
        assert!(header_matches(&hm("x-a", exact("v"), true, true), &req));
    }

    #[test]
    fn present_match_with_and_without_invert() {
        let mut h = HeaderMap::new();
        h.insert("x-here", HeaderValue::from_static(""));
        let req = view(Method::GET, "/", "h", &h);
        let p = |name, want, inv| header_matches(&hm(name, HeaderMatchSpec::Present(want), inv, false), &req);
        assert!(p("x-here", true, false));
        assert!(!p("x-here", false, false));
        assert!(!p("x-here", true, true));
        assert!(p("x-here", false, true));
        assert!(!p("x-gone", true, false));
        assert!(p("x-gone", false, false));
        assert!(p("x-gone", true, true));
        assert!(!p("x-gone", false, true));
    }

    #[test]
    fn range_match_is_half_open_and_parses_like_simple_atoi() {
        let range = HeaderMatchSpec::Range { start: -10, end: 10 };
        for (v, want) in
            [("-10", true), ("9", true), ("10", false), (" 5 ", true), ("+3", true), ("5x", false), ("", false)]
        {
            let mut h = HeaderMap::new();
            h.insert("x-n", HeaderValue::from_str(v).unwrap());
            let req = view(Method::GET, "/", "h", &h);
            assert_eq!(header_matches(&hm("x-n", range.clone(), false, false), &req), want, "{v:?}");
            assert_eq!(header_matches(&hm("x-n", range.clone(), true, false), &req), !want, "inverted {v:?}");
        }
    }

    #[test]
    fn pseudo_headers_come_from_the_request_line() {
        let h = HeaderMap::new();
        let req = view(Method::POST, "/p?q=1", "example.com:8080", &h);
        assert!(header_matches(&hm(":method", exact("POST"), false, false), &req));
        assert!(!header_matches(&hm(":method", exact("GET"), false, false), &req));
        assert!(header_matches(&hm(":authority", exact("example.com:8080"), false, false), &req));
        assert!(header_matches(&hm("host", exact("example.com:8080"), false, false), &req));
        assert!(header_matches(&hm(":path", exact("/p?q=1"), false, false), &req));
        assert!(header_matches(&hm(":scheme", exact("http"), false, false), &req));
        assert!(!header_matches(&hm(":protocol", HeaderMatchSpec::Present(true), false, false), &req));
    }

    #[test]
    fn x_forwarded_proto_falls_back_to_the_scheme() {
        let h = HeaderMap::new();
        let mut req = view(Method::GET, "/", "h", &h);
        req.scheme = "https";
        // Cilium's redirect-loop guard: not (xfp == https, ignore case).
        let guard = hm(
            "x-forwarded-proto",
            HeaderMatchSpec::String(sm(StringMatchKind::Exact("HTTPS".into()), true)),
            true,
            false,
        );
        assert!(!header_matches(&guard, &req));
        req.scheme = "http";
        assert!(header_matches(&guard, &req));
    }

    #[test]
    fn query_parameters_first_value_no_decoding() {
        let qp = |name: &str, m: Option<StringMatchKind>| QueryParameterMatcher {
            name: name.into(),
            string_match: m.map(|k| sm(k, false)),
        };
        let path = "/s?a=1&flag&a=2&enc=%41&e=";
        assert!(query_matches(&[qp("a", Some(StringMatchKind::Exact("1".into())))], path));
        assert!(
            !query_matches(&[qp("a", Some(StringMatchKind::Exact("2".into())))], path),
            "only the first value counts"
        );
        assert!(query_matches(&[qp("flag", None)], path));
        assert!(query_matches(&[qp("flag", Some(StringMatchKind::Exact("".into())))], path));
        assert!(query_matches(&[qp("e", Some(StringMatchKind::Exact("".into())))], path));
        assert!(query_matches(&[qp("enc", Some(StringMatchKind::Exact("%41".into())))], path));
        assert!(!query_matches(&[qp("enc", Some(StringMatchKind::Exact("A".into())))], path), "values are not decoded");
        assert!(!query_matches(&[qp("missing", None)], path));
        assert!(!query_matches(&[qp("a", None), qp("missing", None)], path), "all must match");
        assert!(!query_matches(&[qp("a", None)], "/s"), "no query string");
        assert!(query_matches(&[], "/s"));
    }

    #[test]
    fn grpc_content_type() {
        for (ct, want) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/grpc-web", false),
            ("application/grpc-web+proto", false),
            ("application/json", false),
            ("Application/grpc", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_grpc(&h), want, "{ct}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn path_specifiers() {
        let h = HeaderMap::new();
        let req = view(Method::GET, "/", "h", &h);
        let check = |m: &PathMatch, cs: bool, p: &str| path_matches(m, cs, &req, p);
        let prefix = PathMatch::Prefix("/api".into());
        assert!(check(&prefix, true, "/api"));
        assert!(check(&prefix, true, "/apiary"));
        assert!(!check(&prefix, true, "/API/x"));
        assert!(check(&prefix, false, "/API/x"));
        assert!(!check(&prefix, true, "/ap"));
        let exact = PathMatch::Path("/exact".into());
        assert!(check(&exact, true, "/exact"));
        assert!(!check(&exact, true, "/exact/"));
        assert!(check(&exact, false, "/EXACT"));
        let sep = PathMatch::PathSeparatedPrefix("/foo".into());
        assert!(check(&sep, true, "/foo"));
        assert!(check(&sep, true, "/foo/"));
        assert!(check(&sep, true, "/foo/bar"));
        assert!(!check(&sep, true, "/foobar"));
        assert!(!check(&sep, true, "/FOO/bar"));
        assert!(check(&sep, false, "/FOO/bar"));
        assert!(!check(&sep, true, "/fo"));
        let re = PathMatch::SafeRegex(Box::new(Pattern::new("/v[0-9]+/.*").unwrap()));
        assert!(check(&re, true, "/v1/users"));
        assert!(!check(&re, true, "/x/v1/users"));
        assert!(!check(&PathMatch::Connect, true, "/"));
        let c = view(Method::CONNECT, "", "h:443", &h);
        assert!(path_matches(&PathMatch::Connect, true, &c, ""));
    }
}
