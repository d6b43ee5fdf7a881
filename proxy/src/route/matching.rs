//! Envoy's request matchers: strings, headers, query parameters, gRPC content type, paths.
//!
//! Verified against Envoy's sources:
//! - `source/common/http/header_utility.cc` (`matchHeaders`, `getAllOfHeaderAsString`):
//!   a header present several times is matched as its values joined with `,`; a missing
//!   header never matches (even inverted) unless `treat_missing_header_as_empty`, except
//!   `present_match`, which is `(present == wanted) != invert_match`; `range_match` is
//!   `start <= v < end` on the value parsed with `absl::SimpleAtoi` (surrounding ASCII
//!   whitespace and a sign allowed).
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

/// The value a header matcher sees: pseudo-headers come from the request line, a repeated
/// header is joined with `,` (Envoy's `getAllOfHeaderAsString`; the only allocating case).
///
/// Sluice choice: `host` is treated as an alias of `:authority`. Envoy's codecs move the
/// HTTP/1.1 `Host` header into `:authority`, so Envoy never sees a `host` entry; treating both
/// names alike gives the same answer for HTTP/1.1 and HTTP/2.
pub(crate) fn header_value<'r>(req: &RequestView<'r>, name: &str) -> Option<Cow<'r, str>> {
    if let Some(pseudo) = name.strip_prefix(':') {
        return match pseudo {
            "method" => Some(Cow::Borrowed(req.method.as_str())),
            "authority" => Some(Cow::Borrowed(req.authority)),
            "path" => (!req.path.is_empty()).then_some(Cow::Borrowed(req.path)),
            "scheme" => Some(Cow::Borrowed(req.scheme)),
            _ => None,
        };
    }
    if name == "host" {
        return Some(Cow::Borrowed(req.authority));
    }
    match joined(req.headers, name) {
        Some(v) => Some(v),
        // Envoy's connection manager always sets x-forwarded-proto before routing.
        None if name == "x-forwarded-proto" && !req.scheme.is_empty() => Some(Cow::Borrowed(req.scheme)),
        None => None,
    }
}

/// All values of `name` joined with `,`, borrowing when there is exactly one.
pub(crate) fn joined<'h>(headers: &'h HeaderMap, name: &str) -> Option<Cow<'h, str>> {
    let mut it = headers.get_all(name).iter();
    let first = it.next()?;
    let Some(second) = it.next() else {
        return Some(lossy(first.as_bytes()));
    };
    let mut out = String::with_capacity(first.len() + second.len() + 8);
    out.push_str(&lossy(first.as_bytes()));
    for v in std::iter::once(second).chain(it) {
        out.push(',');
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
    let value = header_value(req, &m.name);
    match &m.spec {
        HeaderMatchSpec::Present(want) => (value.is_some() == *want) != m.invert_match,
        HeaderMatchSpec::String(s) => value_matches(m, value, |v| string_matches(s, v)),
        HeaderMatchSpec::Range { start, end } => {
            value_matches(m, value, |v| parse_int(v).is_some_and(|n| *start <= n && n < *end))
        }
    }
}

/// A value matcher: a missing header fails, inverted or not, unless it is treated as empty.
fn value_matches(m: &HeaderMatcher, value: Option<Cow<'_, str>>, f: impl FnOnce(&str) -> bool) -> bool {
    let matched = match value {
        Some(v) => f(&v),
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
        let re = sm(StringMatchKind::SafeRegex(Pattern::new("a+b").unwrap()), true);
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
        let re = string(StringMatchKind::SafeRegex(Pattern::new("[a-z]+-(eu|us)").unwrap()));
        assert!(header_matches(&hm("x-env", re.clone(), false, false), &req));
        assert!(!header_matches(&hm("x-env", re, true, false), &req));
    }

    #[test]
    fn repeated_headers_are_joined_with_commas() {
        let mut h = HeaderMap::new();
        h.append("x-tag", HeaderValue::from_static("a"));
        h.append("x-tag", HeaderValue::from_static("b"));
        let req = view(Method::GET, "/", "h", &h);
        assert!(header_matches(&hm("x-tag", exact("a,b"), false, false), &req));
        assert!(!header_matches(&hm("x-tag", exact("a"), false, false), &req));
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
        let re = PathMatch::SafeRegex(Pattern::new("/v[0-9]+/.*").unwrap());
        assert!(check(&re, true, "/v1/users"));
        assert!(!check(&re, true, "/x/v1/users"));
        assert!(!check(&PathMatch::Connect, true, "/"));
        let c = view(Method::CONNECT, "", "h:443", &h);
        assert!(path_matches(&PathMatch::Connect, true, &c, ""));
    }
}
