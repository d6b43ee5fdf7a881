//! Trace context propagation: W3C `traceparent`/`tracestate` (extract and inject) and B3
//! (extract, single `b3` header and the multi-header `x-b3-*` form).
//!
//! Hand-written rather than through `opentelemetry`'s `TextMapPropagator`s: those go through
//! `Extractor`/`Injector` trait objects, allocate a `Context` per call and do not speak B3
//! without another crate; here extraction is a couple of header lookups and no allocation
//! unless a trace context is present.

use std::str::FromStr;

use crate::http::header_names::{
    B3, TRACEPARENT, TRACESTATE, X_B3_PARENTSPANID, X_B3_SAMPLED, X_B3_SPANID, X_B3_TRACEID,
};
use http::HeaderMap;
use http::header::HeaderValue;
use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

/// What the incoming request says about its trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// The caller's span, when the request carries a valid trace context.
    pub parent: Option<SpanContext>,
    /// The caller's sampling decision: `Some(true|false)` when it made one, `None` when it
    /// deferred (B3 without a sampled flag, or no trace context at all).
    pub sampled: Option<bool>,
}

impl Incoming {
    pub const NONE: Incoming = Incoming { parent: None, sampled: None };
}

/// Reads the trace context of a request: W3C first, then B3.
pub fn extract(headers: &HeaderMap) -> Incoming {
    if let Some(tp) = headers.get(TRACEPARENT) {
        // An invalid traceparent is ignored (W3C: restart the trace), and so is B3 then:
        // a caller that sent W3C headers meant them.
        return match parse_traceparent(tp.as_bytes()) {
            Some((trace_id, span_id, flags)) => {
                let state = headers
                    .get(TRACESTATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| TraceState::from_str(s).ok())
                    .unwrap_or_default();
                let sc = SpanContext::new(trace_id, span_id, flags, true, state);
                Incoming { parent: Some(sc), sampled: Some(flags.is_sampled()) }
            }
            None => Incoming::NONE,
        };
    }
    if let Some(b3) = headers.get(B3) {
        return parse_b3_single(b3.as_bytes()).unwrap_or(Incoming::NONE);
    }
    if headers.contains_key(X_B3_TRACEID) || headers.contains_key(X_B3_SAMPLED) {
        return parse_b3_multi(headers).unwrap_or(Incoming::NONE);
    }
    Incoming::NONE
}

/// `traceparent: 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`. Later versions may
/// append fields after another `-`; version `ff` is invalid, and so are all-zero ids.
pub fn parse_traceparent(v: &[u8]) -> Option<(TraceId, SpanId, TraceFlags)> {
    if v.len() < 55 {
        return None;
    }
    let version = hex_u8(&v[0..2])?;
    if version == 0xff || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    if (version == 0 && v.len() != 55) || (version > 0 && v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace_id = TraceId::from_bytes(hex_array::<16>(&v[3..35])?);
    let span_id = SpanId::from_bytes(hex_array::<8>(&v[36..52])?);
    let flags = TraceFlags::new(hex_u8(&v[53..55])? & 0x01);
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    Some((trace_id, span_id, flags))
}

/// `b3: {trace id}-{span id}[-{sampling}[-{parent span id}]]`, or a bare sampling state
/// (`0`, `1`, `d`).
fn parse_b3_single(v: &[u8]) -> Option<Incoming> {
    let s = std::str::from_utf8(v).ok()?.trim();
    if let Some(sampled) = b3_sampling(s) {
        return Some(Incoming { parent: None, sampled: Some(sampled) });
    }
    let mut parts = s.split('-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = b3_span_id(parts.next()?)?;
    let sampled = match parts.next() {
        Some(p) => Some(b3_sampling(p)?),
        None => None,
    };
    // The parent span id, when present, must be well formed; it is not otherwise used.
    if let Some(p) = parts.next() {
        b3_span_id(p)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(b3_context(trace_id, span_id, sampled))
}

fn parse_b3_multi(h: &HeaderMap) -> Option<Incoming> {
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let debug = text("x-b3-flags") == Some("1");
    let sampled = match text("x-b3-sampled") {
        _ if debug => Some(true),
        Some("1") | Some("true") => Some(true),
        Some("0") | Some("false") => Some(false),
        Some(_) => return None,
        None => None,
    };
    let (Some(t), Some(s)) = (text("x-b3-traceid"), text("x-b3-spanid")) else {
        return Some(Incoming { parent: None, sampled });
    };
    Some(b3_context(b3_trace_id(t)?, b3_span_id(s)?, sampled))
}

fn b3_context(trace_id: TraceId, span_id: SpanId, sampled: Option<bool>) -> Incoming {
    let flags = if sampled == Some(true) { TraceFlags::SAMPLED } else { TraceFlags::default() };
    let sc = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    Incoming { parent: Some(sc), sampled }
}

fn b3_sampling(s: &str) -> Option<bool> {
    match s {
        "1" | "d" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// B3 trace ids are 16 or 32 hex digits; 64-bit ids are left-padded with zeros.
fn b3_trace_id(s: &str) -> Option<TraceId> {
    let id = match s.len() {
        32 => TraceId::from_bytes(hex_array::<16>(s.as_bytes())?),
        16 => {
            let low = hex_array::<8>(s.as_bytes())?;
            let mut b = [0u8; 16];
            b[8..].copy_from_slice(&low);
            TraceId::from_bytes(b)
        }
        _ => return None,
    };
    (id != TraceId::INVALID).then_some(id)
}

fn b3_span_id(s: &str) -> Option<SpanId> {
    if s.len() != 16 {
        return None;
    }
    let id = SpanId::from_bytes(hex_array::<8>(s.as_bytes())?);
    (id != SpanId::INVALID).then_some(id)
}

/// Lowercase hex only, as W3C requires (B3 ids are lowercase too).
fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_u8(s: &[u8]) -> Option<u8> {
    Some(hex_digit(s[0])? << 4 | hex_digit(s[1])?)
}

fn hex_array<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = hex_u8(&s[2 * i..2 * i + 2])?;
    }
    Some(out)
}

/// The `traceparent` value for a span: version 00, always lowercase.
pub fn traceparent(sc: &SpanContext) -> HeaderValue {
    let mut buf = [0u8; 55];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut put = |at: usize, bytes: &[u8]| {
        for (i, b) in bytes.iter().enumerate() {
            buf[at + 2 * i] = HEX[(b >> 4) as usize];
            buf[at + 2 * i + 1] = HEX[(b & 0x0f) as usize];
        }
    };
    put(0, &[0]);
    put(3, &sc.trace_id().to_bytes());
    put(36, &sc.span_id().to_bytes());
    put(53, &[sc.trace_flags().to_u8()]);
    buf[2] = b'-';
    buf[35] = b'-';
    buf[52] = b'-';
    // 55 ASCII characters from the table above: always a valid header value.
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Makes `sc` the upstream request's parent: `traceparent` and `tracestate` are set, and
/// B3 headers the caller sent are rewritten to name the same span, so an upstream that reads
/// B3 joins the trace below this hop rather than beside it.
pub fn inject(headers: &mut HeaderMap, sc: &SpanContext) {
    headers.insert(TRACEPARENT, traceparent(sc));
    let state = sc.trace_state().header();
    match HeaderValue::from_str(&state) {
        Ok(v) if !state.is_empty() => {
            headers.insert(TRACESTATE, v);
        }
        _ => {
            headers.remove(TRACESTATE);
        }
    }
    let sampled = if sc.is_sampled() { "1" } else { "0" };
    if headers.contains_key(B3)
        && let Ok(v) = HeaderValue::from_str(&format!("{}-{}-{sampled}", sc.trace_id(), sc.span_id()))
    {
        headers.insert(B3, v);
    }
    if headers.contains_key(X_B3_TRACEID) {
        if let Ok(v) = HeaderValue::from_str(&sc.trace_id().to_string()) {
            headers.insert(X_B3_TRACEID, v);
        }
        if let Ok(v) = HeaderValue::from_str(&sc.span_id().to_string()) {
            headers.insert(X_B3_SPANID, v);
        }
        headers.remove(X_B3_PARENTSPANID);
        headers.insert(X_B3_SAMPLED, HeaderValue::from_static(if sc.is_sampled() { "1" } else { "0" }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn w3c_round_trip() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let got = extract(&h(&[("traceparent", tp), ("tracestate", "congo=t61rcWkgMzE")]));
        let sc = got.parent.expect("parent");
        assert_eq!(got.sampled, Some(true));
        assert_eq!(sc.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert!(sc.is_remote());
        assert_eq!(traceparent(&sc), tp);
        let mut out = HeaderMap::new();
        inject(&mut out, &sc);
        assert_eq!(out["traceparent"], tp);
        assert_eq!(out["tracestate"], "congo=t61rcWkgMzE");
    }

    #[test]
    fn w3c_rejects_malformed() {
        for bad in [
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00+0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad}");
        }
        // A future version may carry more fields.
        assert!(parse_traceparent(b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-xyz").is_some());
        // An invalid traceparent disables B3 too.
        let got = extract(&h(&[("traceparent", "garbage"), ("b3", "1")]));
        assert_eq!(got, Incoming::NONE);
    }

    #[test]
    fn unsampled_parent_is_kept() {
        let got = extract(&h(&[("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")]));
        assert_eq!(got.sampled, Some(false));
        assert!(!got.parent.unwrap().is_sampled());
    }

    #[test]
    fn b3_single() {
        let got = extract(&h(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90")]));
        let sc = got.parent.unwrap();
        assert_eq!(got.sampled, Some(true));
        assert_eq!(sc.trace_id().to_string(), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(sc.span_id().to_string(), "e457b5a2e4d86bd1");
        // 64-bit trace ids are padded; a missing sampling state defers the decision.
        let got = extract(&h(&[("b3", "64fe8b2a57d3eff7-e457b5a2e4d86bd1")]));
        assert_eq!(got.parent.unwrap().trace_id().to_string(), "000000000000000064fe8b2a57d3eff7");
        assert_eq!(got.sampled, None);
        assert_eq!(extract(&h(&[("b3", "0")])), Incoming { parent: None, sampled: Some(false) });
        assert_eq!(extract(&h(&[("b3", "d")])).sampled, Some(true));
        assert_eq!(extract(&h(&[("b3", "64fe8b2a57d3eff7-e457b5a2e4d86bd1-x")])), Incoming::NONE);
    }

    #[test]
    fn b3_multi() {
        let got = extract(&h(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "0"),
        ]));
        assert_eq!(got.sampled, Some(false));
        assert_eq!(got.parent.unwrap().span_id().to_string(), "e457b5a2e4d86bd1");
        let got = extract(&h(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-flags", "1"),
        ]));
        assert_eq!(got.sampled, Some(true));
    }

    #[test]
    fn inject_rewrites_b3() {
        let sc = SpanContext::new(
            TraceId::from_bytes([1; 16]),
            SpanId::from_bytes([2; 8]),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let mut m = h(&[
            ("b3", "x"),
            ("x-b3-traceid", "x"),
            ("x-b3-spanid", "x"),
            ("x-b3-parentspanid", "x"),
            ("tracestate", "stale=1"),
        ]);
        inject(&mut m, &sc);
        assert_eq!(m["b3"], "01010101010101010101010101010101-0202020202020202-1");
        assert_eq!(m["x-b3-spanid"], "0202020202020202");
        assert!(!m.contains_key("x-b3-parentspanid"));
        assert!(!m.contains_key("tracestate"));
    }
}
