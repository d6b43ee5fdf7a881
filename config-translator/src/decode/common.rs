//! Small Envoy messages shared by the bigger decoders: matchers, header mutations, data
//! sources, addresses, percentages.

use std::net::{IpAddr, SocketAddr};

use serde_json::Value;

use super::Cx;
use crate::json::{Msg, Path, kind, parse_u64};
use crate::model::*;

/// `envoy.type.matcher.v3.StringMatcher`.
pub fn string_matcher(cx: &mut Cx, m: Msg) -> Option<StringMatcher> {
    let ignore_case = m.bool_or(cx.sink, "ignore_case", false);
    let which = m.oneof(cx.sink, &["exact", "prefix", "suffix", "contains", "safe_regex"]);
    let kind = match which {
        Some("exact") => StringMatchKind::Exact(m.str(cx.sink, "exact").unwrap_or_default()),
        Some("prefix") => StringMatchKind::Prefix(nonempty(cx, &m, "prefix")?),
        Some("suffix") => StringMatchKind::Suffix(nonempty(cx, &m, "suffix")?),
        Some("contains") => StringMatchKind::Contains(nonempty(cx, &m, "contains")?),
        Some("safe_regex") => {
            let r = m.msg(cx.sink, "safe_regex", "RegexMatcher")?;
            StringMatchKind::SafeRegex(Box::new(regex_matcher(cx, r)?))
        }
        _ => {
            // An empty StringMatcher matches only the empty string in Envoy (exact "").
            if m.has("custom") {
                m.unsupported(cx.sink, "custom", "custom string matchers are not implemented");
                m.finish(cx.sink);
                return None;
            }
            StringMatchKind::Exact(String::new())
        }
    };
    m.finish(cx.sink);
    Some(StringMatcher { kind, ignore_case })
}

fn nonempty(cx: &mut Cx, m: &Msg, name: &str) -> Option<String> {
    let s = m.str(cx.sink, name)?;
    if s.is_empty() {
        cx.sink.error(m.path.field(name).as_str(), format!("`{name}` must not be empty"));
        return None;
    }
    Some(s)
}

/// `envoy.type.matcher.v3.RegexMatcher` (`google_re2` is the only engine and is accepted).
pub fn regex_matcher(cx: &mut Cx, m: Msg) -> Option<Pattern> {
    m.skip("google_re2");
    let path = m.path.field("regex");
    let re = m.str(cx.sink, "regex");
    m.finish(cx.sink);
    let re = re?;
    compile(cx, &path, &re)
}

pub fn compile(cx: &mut Cx, path: &Path, re: &str) -> Option<Pattern> {
    match Pattern::new(re) {
        Ok(p) => Some(p),
        Err(e) => {
            let msg = e.to_string();
            let first = msg.lines().last().unwrap_or(&msg).trim().to_string();
            cx.sink.error(path.as_str(), format!("invalid regex {re:?}: {first}"));
            None
        }
    }
}

/// `envoy.config.route.v3.HeaderMatcher`.
pub fn header_matcher(cx: &mut Cx, m: Msg) -> Option<HeaderMatcher> {
    let name = m.str(cx.sink, "name").unwrap_or_default().to_ascii_lowercase();
    if name.is_empty() {
        cx.sink.error(m.path.as_str(), "header matcher without a name");
    }
    let invert_match = m.bool_or(cx.sink, "invert_match", false);
    let treat_missing_header_as_empty = m.bool_or(cx.sink, "treat_missing_header_as_empty", false);
    let which = m.oneof(
        cx.sink,
        &[
            "exact_match",
            "safe_regex_match",
            "range_match",
            "present_match",
            "prefix_match",
            "suffix_match",
            "contains_match",
            "string_match",
        ],
    );
    let sm = |kind| HeaderMatchSpec::String(StringMatcher { kind, ignore_case: false });
    let spec = match which {
        Some("exact_match") => sm(StringMatchKind::Exact(m.str(cx.sink, "exact_match")?)),
        Some("prefix_match") => sm(StringMatchKind::Prefix(m.str(cx.sink, "prefix_match")?)),
        Some("suffix_match") => sm(StringMatchKind::Suffix(m.str(cx.sink, "suffix_match")?)),
        Some("contains_match") => sm(StringMatchKind::Contains(m.str(cx.sink, "contains_match")?)),
        Some("safe_regex_match") => {
            let r = m.msg(cx.sink, "safe_regex_match", "RegexMatcher")?;
            sm(StringMatchKind::SafeRegex(Box::new(regex_matcher(cx, r)?)))
        }
        Some("present_match") => HeaderMatchSpec::Present(m.bool(cx.sink, "present_match")?),
        Some("string_match") => {
            let s = m.msg(cx.sink, "string_match", "StringMatcher")?;
            HeaderMatchSpec::String(string_matcher(cx, s)?)
        }
        Some("range_match") => {
            let r = m.msg(cx.sink, "range_match", "Int64Range")?;
            let start = r.i64(cx.sink, "start").unwrap_or(0);
            let end = r.i64(cx.sink, "end").unwrap_or(0);
            r.finish(cx.sink);
            HeaderMatchSpec::Range { start, end }
        }
        // No match specifier: the header must be present.
        _ => HeaderMatchSpec::Present(true),
    };
    m.finish(cx.sink);
    Some(HeaderMatcher { name, spec, invert_match, treat_missing_header_as_empty })
}

pub fn header_matchers(cx: &mut Cx, m: &Msg, field: &str) -> Vec<HeaderMatcher> {
    m.msgs(cx.sink, field, "HeaderMatcher").into_iter().filter_map(|h| header_matcher(cx, h)).collect()
}

/// `request_headers_to_add` & co. (`HeaderValueOption`) plus the matching `_to_remove` list.
pub fn header_mutations(cx: &mut Cx, m: &Msg, add_field: &str, remove_field: &str) -> HeaderMutations {
    let mut add = Vec::new();
    for opt in m.msgs(cx.sink, add_field, "HeaderValueOption") {
        if let Some(a) = header_value_option(cx, opt) {
            add.push(a);
        }
    }
    let mut remove = Vec::new();
    for (v, path) in m.list(cx.sink, remove_field) {
        match v.as_str() {
            Some(name) => {
                if let Some(n) = header_name(cx, &path, name) {
                    remove.push(n);
                }
            }
            None => cx.sink.error(path.as_str(), format!("expected a header name, found {}", kind(v))),
        }
    }
    HeaderMutations::new(add, remove)
}

pub fn header_value_option(cx: &mut Cx, opt: Msg) -> Option<HeaderAdd> {
    let header = opt.msg(cx.sink, "header", "HeaderValue");
    let append = opt.bool(cx.sink, "append");
    let action = opt.enumeration(
        cx.sink,
        "append_action",
        &[
            ("APPEND_IF_EXISTS_OR_ADD", AppendAction::AppendIfExistsOrAdd),
            ("ADD_IF_ABSENT", AppendAction::AddIfAbsent),
            ("OVERWRITE_IF_EXISTS_OR_ADD", AppendAction::OverwriteIfExistsOrAdd),
            ("OVERWRITE_IF_EXISTS", AppendAction::OverwriteIfExists),
        ],
    );
    if append.is_some() && opt.has("append_action") {
        cx.sink.error(opt.path.as_str(), "`append` and `append_action` are mutually exclusive");
    }
    // The deprecated `append` defaults to true (append) in HeaderValueOption.
    let action = action.unwrap_or(if append == Some(false) {
        AppendAction::OverwriteIfExistsOrAdd
    } else {
        AppendAction::AppendIfExistsOrAdd
    });
    let keep_empty_value = opt.bool_or(cx.sink, "keep_empty_value", false);
    opt.finish(cx.sink);
    let header = header?;
    let key_path = header.path.field("key");
    let key = header.str(cx.sink, "key").unwrap_or_default();
    let value = match header.oneof(cx.sink, &["value", "raw_value"]) {
        Some("raw_value") => {
            let (v, p) = header.take("raw_value")?;
            let b = v.as_str().and_then(crate::k8s::base64_decode);
            match b.and_then(|b| String::from_utf8(b).ok()) {
                Some(s) => s,
                None => {
                    cx.sink.error(p.as_str(), "raw_value must be base64-encoded UTF-8");
                    return None;
                }
            }
        }
        _ => header.str(cx.sink, "value").unwrap_or_default(),
    };
    let vpath = header.path.field("value");
    header.finish(cx.sink);
    let name = header_name(cx, &key_path, &key)?;
    if name.starts_with(':') || name == "host" {
        // Envoy refuses to modify pseudo-headers and Host through header mutations.
        cx.sink.error(key_path.as_str(), format!("header `{key}` cannot be modified by header mutations"));
        return None;
    }
    let value = header_template(cx, &vpath, &value)?;
    Some(HeaderAdd { name, value, action, keep_empty_value })
}

/// Validates an HTTP header name (token characters) and lower-cases it.
pub fn header_name(cx: &mut Cx, path: &Path, name: &str) -> Option<String> {
    let body = name.strip_prefix(':').unwrap_or(name);
    let ok = !body.is_empty() && body.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !ok {
        cx.sink.error(path.as_str(), format!("invalid header name {name:?}"));
        return None;
    }
    Some(name.to_ascii_lowercase())
}

/// Parses Envoy's `%VARIABLE%` substitutions in header values. `%%` is a literal `%`.
pub fn header_template(cx: &mut Cx, path: &Path, s: &str) -> Option<HeaderValueTemplate> {
    if s.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        cx.sink.error(path.as_str(), "header values must not contain CR, LF or NUL");
        return None;
    }
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        lit.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('%') {
            lit.push('%');
            rest = stripped;
            continue;
        }
        let Some(end) = after.find('%') else {
            cx.sink.error(path.as_str(), format!("unterminated %VARIABLE% in {s:?}"));
            return None;
        };
        let var = &after[..end];
        let part = match var {
            "DOWNSTREAM_REMOTE_ADDRESS" => TemplatePart::DownstreamRemoteAddress,
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => TemplatePart::DownstreamRemoteAddressWithoutPort,
            "DOWNSTREAM_LOCAL_ADDRESS" => TemplatePart::DownstreamLocalAddress,
            "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => TemplatePart::DownstreamLocalAddressWithoutPort,
            "DOWNSTREAM_LOCAL_PORT" => TemplatePart::DownstreamLocalPort,
            "UPSTREAM_REMOTE_ADDRESS" => TemplatePart::UpstreamRemoteAddress,
            "HOSTNAME" => TemplatePart::Hostname,
            "PROTOCOL" => TemplatePart::Protocol,
            "START_TIME" => TemplatePart::StartTime,
            "REQUESTED_SERVER_NAME" => TemplatePart::RequestedServerName,
            v if v.starts_with("REQ(") && v.ends_with(')') => {
                TemplatePart::RequestHeader(v[4..v.len() - 1].to_ascii_lowercase())
            }
            v if v.starts_with("CILIUM_") => TemplatePart::Other(format!("%{v}%")),
            v => {
                cx.sink.error(path.as_str(), format!("unsupported header variable %{v}%"));
                return None;
            }
        };
        if !lit.is_empty() {
            parts.push(TemplatePart::Literal(std::mem::take(&mut lit)));
        }
        parts.push(part);
        rest = &after[end + 1..];
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        parts.push(TemplatePart::Literal(lit));
    }
    Some(HeaderValueTemplate { parts })
}

/// `envoy.config.core.v3.DataSource`.
pub fn data_source(cx: &mut Cx, m: Msg) -> Option<DataSource> {
    let which = m.oneof(cx.sink, &["filename", "inline_bytes", "inline_string", "environment_variable"]);
    m.skip("watched_directory");
    let out = match which {
        Some("filename") => m.str(cx.sink, "filename").map(DataSource::Filename),
        Some("inline_string") => m.str(cx.sink, "inline_string").map(|s| DataSource::Inline(s.into_bytes())),
        Some("inline_bytes") => {
            let (v, p) = m.take("inline_bytes")?;
            match v.as_str().and_then(crate::k8s::base64_decode) {
                Some(b) => Some(DataSource::Inline(b)),
                None => {
                    cx.sink.error(p.as_str(), "inline_bytes must be base64");
                    None
                }
            }
        }
        Some("environment_variable") => m.str(cx.sink, "environment_variable").map(DataSource::EnvironmentVariable),
        _ => {
            cx.sink.error(m.path.as_str(), "empty data source (set filename, inline_string or inline_bytes)");
            None
        }
    };
    m.finish(cx.sink);
    out
}

/// `envoy.config.core.v3.CidrRange`.
pub fn cidr_range(cx: &mut Cx, m: Msg) -> Option<CidrRange> {
    let addr = m.str(cx.sink, "address_prefix").unwrap_or_default();
    let len_path = m.path.field("prefix_len");
    let len = m.u32(cx.sink, "prefix_len").unwrap_or(0);
    let path = m.path.clone();
    m.finish(cx.sink);
    let address: IpAddr = match addr.parse() {
        Ok(a) => a,
        Err(_) => {
            cx.sink.error(path.field("address_prefix").as_str(), format!("invalid IP address {addr:?}"));
            return None;
        }
    };
    let max = if address.is_ipv4() { 32 } else { 128 };
    if len > max {
        cx.sink.error(len_path.as_str(), format!("prefix length {len} is longer than {max}"));
        return None;
    }
    Some(CidrRange { address, prefix_len: len as u8 })
}

pub fn cidr_ranges(cx: &mut Cx, m: &Msg, field: &str) -> Vec<CidrRange> {
    m.msgs(cx.sink, field, "CidrRange").into_iter().filter_map(|c| cidr_range(cx, c)).collect()
}

/// `envoy.type.v3.FractionalPercent`.
pub fn fractional_percent(cx: &mut Cx, m: Msg) -> Option<Fraction> {
    let num = u64::from(m.u32(cx.sink, "numerator").unwrap_or(0));
    let denom = m
        .enumeration(cx.sink, "denominator", &[("HUNDRED", 100u64), ("TEN_THOUSAND", 10_000), ("MILLION", 1_000_000)])
        .unwrap_or(100);
    m.finish(cx.sink);
    let per_million = (num.min(denom) * (1_000_000 / denom)) as u32;
    Some(Fraction { per_million })
}

/// `envoy.config.core.v3.RuntimeFractionalPercent`: Sluice has no runtime layer, so the
/// default value is the value.
pub fn runtime_fraction(cx: &mut Cx, m: Msg) -> Option<Fraction> {
    m.ignore(cx.sink, "runtime_key", "Sluice has no runtime layer; default_value applies");
    let f = match m.msg(cx.sink, "default_value", "FractionalPercent") {
        Some(d) => fractional_percent(cx, d),
        None => Some(Fraction { per_million: 0 }),
    };
    m.finish(cx.sink);
    f
}

/// `envoy.type.v3.Percent` (`{value: 12.5}`) as a fraction of 1.
pub fn percent(cx: &mut Cx, m: &Msg, field: &str) -> Option<f64> {
    let (v, path) = m.take(field)?;
    let value = match v {
        Value::Object(o) => o.get("value").cloned().unwrap_or(Value::from(0)),
        other => other.clone(),
    };
    let p = crate::json::parse_f64(cx.sink, &path, &value)?;
    if !(0.0..=100.0).contains(&p) {
        cx.sink.error(path.as_str(), format!("percentage {p} is outside 0..100"));
        return None;
    }
    Some(p / 100.0)
}

/// `envoy.config.core.v3.Address` with a `socket_address`. Returns `None` (with a
/// diagnostic) for pipes and internal addresses where they are not allowed.
pub fn socket_address(cx: &mut Cx, m: Msg) -> Option<SocketAddr> {
    let which = m.oneof(cx.sink, &["socket_address", "pipe", "envoy_internal_address"]);
    let out = match which {
        Some("socket_address") => {
            let sa = m.msg(cx.sink, "socket_address", "SocketAddress")?;
            let r = socket_address_inner(cx, sa);
            r.and_then(|(host, port)| match host.parse::<IpAddr>() {
                Ok(ip) => Some(SocketAddr::new(ip, port)),
                Err(_) => {
                    cx.sink.error(
                        m.path.as_str(),
                        format!("{host:?} is not an IP address (listeners and STATIC endpoints need IPs)"),
                    );
                    None
                }
            })
        }
        Some(other) => {
            cx.sink.error(m.path.field(other).as_str(), format!("unsupported address type `{other}` here"));
            None
        }
        None => {
            cx.sink.error(m.path.as_str(), "address without socket_address");
            None
        }
    };
    m.finish(cx.sink);
    out
}

/// Host and port of a `SocketAddress`; the host may be a DNS name.
pub fn socket_address_inner(cx: &mut Cx, sa: Msg) -> Option<(String, u16)> {
    let host = sa.str(cx.sink, "address").unwrap_or_default();
    let port_path = sa.path.field("port_value");
    let port = match sa.take("port_value") {
        Some((v, p)) => parse_u64(cx.sink, &p, v),
        None => Some(0),
    };
    sa.skip("ipv4_compat");
    let proto = sa.enumeration(cx.sink, "protocol", &[("TCP", true), ("UDP", false)]);
    if proto == Some(false) {
        cx.sink.error(sa.path.field("protocol").as_str(), "UDP is not supported");
    }
    sa.unsupported(cx.sink, "named_port", "named ports are not supported");
    sa.unsupported(cx.sink, "resolver_name", "custom resolvers are not supported");
    sa.skip("network_namespace_filepath");
    sa.finish(cx.sink);
    let port = port?;
    if port > 65535 {
        cx.sink.error(port_path.as_str(), format!("port {port} is out of range"));
        return None;
    }
    if host.is_empty() {
        cx.sink.error(port_path.as_str(), "socket address without an address");
        return None;
    }
    Some((host, port as u16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diag::Sink;
    use crate::qualify::Scope;
    use serde_json::json;

    fn with_cx<T>(f: impl FnOnce(&mut Cx) -> T) -> (T, Sink) {
        let mut sink = Sink::new("t/t");
        let scope = Scope { namespace: "t".into(), name: "t".into() };
        let mut cx = Cx { sink: &mut sink, scope: &scope, refs: Default::default() };
        let r = f(&mut cx);
        (r, sink)
    }

    #[test]
    fn templates() {
        let (t, sink) =
            with_cx(|cx| header_template(cx, &Path::root("p"), "a-%DOWNSTREAM_REMOTE_ADDRESS%-%%-%REQ(X-Foo)%"));
        assert!(!sink.has_errors());
        assert_eq!(
            t.unwrap().parts,
            vec![
                TemplatePart::Literal("a-".into()),
                TemplatePart::DownstreamRemoteAddress,
                TemplatePart::Literal("-%-".into()),
                TemplatePart::RequestHeader("x-foo".into()),
            ]
        );
        let (t, sink) = with_cx(|cx| header_template(cx, &Path::root("p"), "%NOPE%"));
        assert!(t.is_none());
        assert!(sink.items[0].message.contains("%NOPE%"));
    }

    #[test]
    fn header_value_options() {
        let v = json!({"header": {"key": "X-A", "value": "1"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"});
        let (h, sink) = with_cx(|cx| {
            let m = Msg::new(cx.sink, "HeaderValueOption", Path::root("h"), &v).unwrap();
            header_value_option(cx, m)
        });
        assert!(!sink.has_errors(), "{:?}", sink.items);
        let h = h.unwrap();
        assert_eq!(h.name, "x-a");
        assert_eq!(h.action, AppendAction::OverwriteIfExistsOrAdd);
        let v = json!({"header": {"key": "bad header", "value": "1"}});
        let (h, sink) = with_cx(|cx| {
            let m = Msg::new(cx.sink, "HeaderValueOption", Path::root("h"), &v).unwrap();
            header_value_option(cx, m)
        });
        assert!(h.is_none() && sink.has_errors());
    }

    #[test]
    fn invalid_regex_reports_path() {
        let v = json!({"safe_regex": {"regex": "(unclosed"}});
        let (m, sink) = with_cx(|cx| {
            let m = Msg::new(cx.sink, "StringMatcher", Path::root("m"), &v).unwrap();
            string_matcher(cx, m)
        });
        assert!(m.is_none());
        assert_eq!(sink.items[0].path, "m.safe_regex.regex");
        assert!(sink.items[0].message.starts_with("invalid regex"), "{}", sink.items[0].message);
    }

    #[test]
    fn fractions() {
        let v = json!({"numerator": 25});
        let (f, _) = with_cx(|cx| {
            let m = Msg::new(cx.sink, "F", Path::root(""), &v).unwrap();
            fractional_percent(cx, m)
        });
        assert_eq!(f.unwrap().per_million, 250_000);
        let v = json!({"numerator": 5, "denominator": "TEN_THOUSAND"});
        let (f, _) = with_cx(|cx| {
            let m = Msg::new(cx.sink, "F", Path::root(""), &v).unwrap();
            fractional_percent(cx, m)
        });
        assert_eq!(f.unwrap().per_million, 500);
    }
}
