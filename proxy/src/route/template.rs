//! Envoy's `%VARIABLE%` substitutions in header values (the substitution formatter as used by
//! `request_headers_to_add` & co., `source/common/router/header_parser.cc`, which creates it
//! with `omit_empty_values`: an unavailable value renders as the empty string, not `-`).
//!
//! - `%DOWNSTREAM_REMOTE_ADDRESS%` / `%DOWNSTREAM_LOCAL_ADDRESS%`: `ip:port`, `[v6]:port`;
//!   the `_WITHOUT_PORT` forms print the bare IP (no brackets); `%DOWNSTREAM_LOCAL_PORT%`.
//! - `%UPSTREAM_REMOTE_ADDRESS%`: empty until an upstream host is chosen (request headers are
//!   finalised before that, in Envoy as here).
//! - `%START_TIME%`: UTC, `YYYY-MM-DDTHH:MM:SS.mmmZ` (Envoy's default
//!   `%Y-%m-%dT%H:%M:%E3SZ`).
//! - `%REQ(name)%`: the first value of a request header; `%REQ(a?b)%` falls back to `b` when
//!   `a` is absent; `:authority`, `:path`, `:method`, `:scheme` come from the request line.
//! - `%PROTOCOL%`, `%HOSTNAME%`, `%REQUESTED_SERVER_NAME%`; Cilium's `%CILIUM_*%` placeholders
//!   are kept literally (Cilium's operator substitutes them before Envoy sees the config).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use sluice_config::model::{HeaderValueTemplate, TemplatePart};

/// The downstream request line, for `%REQ(:authority)%` and the like.
#[derive(Debug, Clone, Copy, Default)]
pub struct PseudoHeaders<'a> {
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub scheme: &'a str,
}

/// Everything a header value template can refer to.
#[derive(Debug, Clone, Copy)]
pub struct TemplateContext<'a> {
    pub downstream_remote: SocketAddr,
    pub downstream_local: SocketAddr,
    pub upstream_remote: Option<SocketAddr>,
    /// This node's host name (`%HOSTNAME%`).
    pub hostname: &'a str,
    /// `"HTTP/1.1"`, `"HTTP/2"` (`%PROTOCOL%`).
    pub protocol: &'a str,
    pub start_time: SystemTime,
    /// SNI of the downstream TLS connection.
    pub requested_server_name: Option<&'a str>,
    /// The downstream request's headers, for `%REQ(...)%` while mutating *response* headers.
    /// `None` while mutating request headers: `%REQ(...)%` then reads the map being mutated,
    /// in its state after this level's removals, as Envoy does.
    pub request_headers: Option<&'a HeaderMap>,
    pub request: PseudoHeaders<'a>,
}

impl<'a> TemplateContext<'a> {
    /// A context with the two addresses every connection has; the rest empty.
    pub fn new(downstream_remote: SocketAddr, downstream_local: SocketAddr) -> Self {
        TemplateContext {
            downstream_remote,
            downstream_local,
            upstream_remote: None,
            hostname: "",
            protocol: "",
            start_time: UNIX_EPOCH,
            requested_server_name: None,
            request_headers: None,
            request: PseudoHeaders::default(),
        }
    }
}

/// Renders a template. A template without variables is borrowed as is (the common case, and
/// allocation-free); otherwise one `String` is built.
///
/// `mutated` is the header map being modified; `%REQ(...)%` reads it when
/// `ctx.request_headers` is `None`.
pub fn render<'t>(t: &'t HeaderValueTemplate, ctx: &TemplateContext<'_>, mutated: &HeaderMap) -> Cow<'t, str> {
    if let Some(lit) = t.as_literal() {
        return Cow::Borrowed(lit);
    }
    let mut out = String::with_capacity(64);
    for part in &t.parts {
        // Writing into a String cannot fail; the results are ignored.
        match part {
            TemplatePart::Literal(s) | TemplatePart::Other(s) => out.push_str(s),
            TemplatePart::DownstreamRemoteAddress => {
                let _ = write!(out, "{}", ctx.downstream_remote);
            }
            TemplatePart::DownstreamRemoteAddressWithoutPort => {
                let _ = write!(out, "{}", ctx.downstream_remote.ip());
            }
            TemplatePart::DownstreamLocalAddress => {
                let _ = write!(out, "{}", ctx.downstream_local);
            }
            TemplatePart::DownstreamLocalAddressWithoutPort => {
                let _ = write!(out, "{}", ctx.downstream_local.ip());
            }
            TemplatePart::DownstreamLocalPort => {
                let _ = write!(out, "{}", ctx.downstream_local.port());
            }
            TemplatePart::UpstreamRemoteAddress => {
                if let Some(a) = ctx.upstream_remote {
                    let _ = write!(out, "{a}");
                }
            }
            TemplatePart::Hostname => out.push_str(ctx.hostname),
            TemplatePart::Protocol => out.push_str(ctx.protocol),
            TemplatePart::StartTime => write_start_time(&mut out, ctx.start_time),
            TemplatePart::RequestedServerName => out.push_str(ctx.requested_server_name.unwrap_or("")),
            TemplatePart::RequestHeader(spec) => {
                if let Some(v) = request_header(spec, ctx, ctx.request_headers.unwrap_or(mutated)) {
                    out.push_str(&v);
                }
            }
        }
    }
    Cow::Owned(out)
}

/// `%REQ(a?b)%`: the first candidate that is present.
fn request_header<'h>(spec: &str, ctx: &TemplateContext<'h>, headers: &'h HeaderMap) -> Option<Cow<'h, str>> {
    spec.split('?').find_map(|name| {
        let pseudo = match name {
            ":authority" => Some(ctx.request.authority),
            ":path" => Some(ctx.request.path),
            ":method" => Some(ctx.request.method),
            ":scheme" => Some(ctx.request.scheme),
            _ if name.starts_with(':') => Some(""),
            _ => None,
        };
        if let Some(p) = pseudo {
            return (!p.is_empty()).then_some(Cow::Borrowed(p));
        }
        match headers.get(name) {
            Some(v) => Some(String::from_utf8_lossy(v.as_bytes())),
            // `host` is `:authority` in Envoy; see `matching::header_values`.
            None if name == "host" && !ctx.request.authority.is_empty() => Some(Cow::Borrowed(ctx.request.authority)),
            None => None,
        }
    })
}

/// `2024-02-29T23:59:59.123Z`.
fn write_start_time(out: &mut String, t: SystemTime) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        since.subsec_millis()
    );
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::HeaderValue;

    use super::*;

    fn t(parts: Vec<TemplatePart>) -> HeaderValueTemplate {
        HeaderValueTemplate { parts }
    }

    fn ctx() -> TemplateContext<'static> {
        let mut c = TemplateContext::new("10.0.0.1:5555".parse().unwrap(), "[fd00::2]:8080".parse().unwrap());
        c.hostname = "node-1";
        c.protocol = "HTTP/2";
        c.requested_server_name = Some("sni.example");
        c.request = PseudoHeaders { method: "GET", authority: "a.example", path: "/p?q", scheme: "https" };
        c
    }

    #[test]
    fn literal_templates_are_borrowed() {
        let lit = HeaderValueTemplate::literal("plain");
        assert!(matches!(render(&lit, &ctx(), &HeaderMap::new()), Cow::Borrowed("plain")));
        assert!(matches!(render(&t(vec![]), &ctx(), &HeaderMap::new()), Cow::Borrowed("")));
    }

    #[test]
    fn connection_variables() {
        let h = HeaderMap::new();
        let r = |p: TemplatePart| render(&t(vec![p]), &ctx(), &h).into_owned();
        assert_eq!(r(TemplatePart::DownstreamRemoteAddress), "10.0.0.1:5555");
        assert_eq!(r(TemplatePart::DownstreamRemoteAddressWithoutPort), "10.0.0.1");
        assert_eq!(r(TemplatePart::DownstreamLocalAddress), "[fd00::2]:8080");
        assert_eq!(r(TemplatePart::DownstreamLocalAddressWithoutPort), "fd00::2");
        assert_eq!(r(TemplatePart::DownstreamLocalPort), "8080");
        assert_eq!(r(TemplatePart::UpstreamRemoteAddress), "", "no upstream yet");
        assert_eq!(r(TemplatePart::Hostname), "node-1");
        assert_eq!(r(TemplatePart::Protocol), "HTTP/2");
        assert_eq!(r(TemplatePart::RequestedServerName), "sni.example");
        assert_eq!(r(TemplatePart::Other("%CILIUM_GATEWAY_NAME%".into())), "%CILIUM_GATEWAY_NAME%");
        let mut c = ctx();
        c.upstream_remote = Some("10.1.2.3:80".parse().unwrap());
        c.requested_server_name = None;
        assert_eq!(render(&t(vec![TemplatePart::UpstreamRemoteAddress]), &c, &h), "10.1.2.3:80");
        assert_eq!(render(&t(vec![TemplatePart::RequestedServerName]), &c, &h), "");
    }

    #[test]
    fn mixed_literals_and_variables() {
        let tpl = t(vec![
            TemplatePart::Literal("for=".into()),
            TemplatePart::DownstreamRemoteAddressWithoutPort,
            TemplatePart::Literal(";proto=".into()),
            TemplatePart::RequestHeader(":scheme".into()),
        ]);
        assert_eq!(render(&tpl, &ctx(), &HeaderMap::new()), "for=10.0.0.1;proto=https");
    }

    #[test]
    fn request_headers_with_fallback_and_pseudo_headers() {
        let mut h = HeaderMap::new();
        h.append("x-b", HeaderValue::from_static("b1"));
        h.append("x-b", HeaderValue::from_static("b2"));
        let r = |spec: &str, c: &TemplateContext<'_>, h: &HeaderMap| {
            render(&t(vec![TemplatePart::RequestHeader(spec.into())]), c, h).into_owned()
        };
        let c = ctx();
        assert_eq!(r("x-b", &c, &h), "b1", "first value only");
        assert_eq!(r("x-a?x-b", &c, &h), "b1");
        assert_eq!(r("x-a", &c, &h), "");
        assert_eq!(r(":authority", &c, &h), "a.example");
        assert_eq!(r(":path", &c, &h), "/p?q");
        assert_eq!(r(":method", &c, &h), "GET");
        assert_eq!(r("host", &c, &h), "a.example");
        assert_eq!(r(":protocol?x-b", &c, &h), "b1");
        // On the response path the request's headers are read, not the mutated map.
        let mut req = HeaderMap::new();
        req.insert("x-b", HeaderValue::from_static("from-request"));
        let mut c2 = ctx();
        c2.request_headers = Some(&req);
        assert_eq!(r("x-b", &c2, &h), "from-request");
    }

    #[test]
    fn start_time_format() {
        let h = HeaderMap::new();
        let tpl = t(vec![TemplatePart::StartTime]);
        let at = |secs: u64, millis: u64| {
            let mut c = ctx();
            c.start_time = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis);
            render(&tpl, &c, &h).into_owned()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.007Z");
        assert_eq!(at(1_709_251_199, 999), "2024-02-29T23:59:59.999Z");
        assert_eq!(at(4_102_444_800, 0), "2100-01-01T00:00:00.000Z");
    }
}
