//! Proto3-JSON decoding with JSON paths and exhaustive field accounting.
//!
//! Envoy resources arrive as proto3 JSON written by hand (snake_case) or by Cilium's tools
//! (lowerCamelCase), sometimes mixed in one object. Rather than a serde type per Envoy
//! message, each decoder walks a [`Msg`]: it asks for the fields it understands and
//! explicitly ignores the ones that are safe to ignore. Whatever is left when the decoder
//! calls [`Msg::finish`] is a field Sluice does not implement, and becomes an error with its
//! exact JSON path. This is the single mechanism behind every "unsupported field" diagnostic.

use std::cell::Cell;
use std::fmt;
use std::time::Duration;

use serde_json::Value;

use crate::diag::Sink;

/// A JSON path such as `spec.resources[2].filter_chains[0]`, spelled the way the document
/// spells its keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Path(String);

impl Path {
    pub fn root(s: &str) -> Path {
        Path(s.to_string())
    }

    pub fn field(&self, key: &str) -> Path {
        if self.0.is_empty() { Path(key.to_string()) } else { Path(format!("{}.{key}", self.0)) }
    }

    pub fn index(&self, i: usize) -> Path {
        Path(format!("{}[{i}]", self.0))
    }

    /// A map key that is not an identifier (filter names contain dots).
    pub fn key(&self, key: &str) -> Path {
        Path(format!("{}[\"{key}\"]", self.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `filterChains` -> `filter_chains`. Keys that are already snake_case are unchanged.
pub fn snake_case(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

struct Field<'a> {
    key: &'a str,
    name: String,
    value: &'a Value,
    used: Cell<bool>,
}

/// One proto message being decoded.
pub struct Msg<'a> {
    /// Proto message name, for messages ("unsupported field `x` in Listener").
    pub ty: &'static str,
    pub path: Path,
    fields: Vec<Field<'a>>,
}

impl<'a> Msg<'a> {
    /// Wraps a JSON object. Reports an error and returns `None` if `value` is not an object,
    /// or if a field is spelled twice (`filter_chains` and `filterChains`).
    pub fn new(sink: &mut Sink, ty: &'static str, path: Path, value: &'a Value) -> Option<Msg<'a>> {
        let Some(obj) = value.as_object() else {
            sink.error(path.as_str(), format!("expected a {ty} object, found {}", kind(value)));
            return None;
        };
        let mut fields: Vec<Field<'a>> = Vec::with_capacity(obj.len());
        let mut ok = true;
        for (key, value) in obj {
            let name = snake_case(key);
            if let Some(prev) = fields.iter().find(|f| f.name == name) {
                sink.error(
                    path.field(key).as_str(),
                    format!("field `{name}` is given twice (as `{}` and `{key}`)", prev.key),
                );
                ok = false;
            }
            fields.push(Field { key, name, value, used: Cell::new(false) });
        }
        ok.then_some(Msg { ty, path, fields })
    }

    fn find(&self, name: &str) -> Option<&Field<'a>> {
        let f = self.fields.iter().find(|f| f.name == name)?;
        f.used.set(true);
        Some(f)
    }

    /// Whether the field is present (and not JSON `null`), without consuming it.
    pub fn has(&self, name: &str) -> bool {
        self.fields.iter().any(|f| f.name == name && !f.value.is_null())
    }

    /// The raw value of a field, consuming it. `null` counts as absent (proto3 JSON).
    pub fn take(&self, name: &str) -> Option<(&'a Value, Path)> {
        let f = self.find(name)?;
        if f.value.is_null() {
            return None;
        }
        Some((f.value, self.path.field(f.key)))
    }

    /// Marks a field as understood and deliberately unused, with a warning when present.
    pub fn ignore(&self, sink: &mut Sink, name: &str, why: &str) {
        if let Some((_, path)) = self.take(name) {
            sink.warning(path.as_str(), format!("ignored `{name}`: {why}"));
        }
    }

    /// Marks a field as understood and irrelevant to Sluice; no diagnostic.
    pub fn skip(&self, name: &str) {
        let _ = self.find(name);
    }

    /// A field that is only acceptable at its default value; anything else is an error.
    pub fn reject_unless_default(&self, sink: &mut Sink, name: &str, why: &str) {
        if let Some((v, path)) = self.take(name) {
            let is_default = match v {
                Value::Bool(b) => !b,
                Value::Number(n) => n.as_f64() == Some(0.0),
                Value::String(s) => s.is_empty(),
                Value::Array(a) => a.is_empty(),
                Value::Object(o) => o.is_empty(),
                Value::Null => true,
            };
            if !is_default {
                sink.error(path.as_str(), format!("unsupported `{name}`: {why}"));
            }
        }
    }

    /// Explicitly unsupported: an error when present, with a reason.
    pub fn unsupported(&self, sink: &mut Sink, name: &str, why: &str) {
        if let Some((_, path)) = self.take(name) {
            sink.error(path.as_str(), format!("unsupported `{name}`: {why}"));
        }
    }

    /// Reports every field no decoder asked for as an error: honouring a field we do not
    /// understand could change routing or security, so the resource is refused.
    pub fn finish(self, sink: &mut Sink) {
        for f in &self.fields {
            if !f.used.get() && f.key != "@type" {
                sink.error(
                    self.path.field(f.key).as_str(),
                    format!("unsupported field `{}` in {} (see docs/SUPPORTED.md)", f.name, self.ty),
                );
            }
        }
    }

    // --- typed accessors -----------------------------------------------------------------

    pub fn str(&self, sink: &mut Sink, name: &str) -> Option<String> {
        let (v, path) = self.take(name)?;
        match v {
            Value::String(s) => Some(s.clone()),
            other => {
                sink.error(path.as_str(), format!("expected a string, found {}", kind(other)));
                None
            }
        }
    }

    pub fn bool(&self, sink: &mut Sink, name: &str) -> Option<bool> {
        let (v, path) = self.take(name)?;
        parse_bool(sink, &path, v)
    }

    pub fn bool_or(&self, sink: &mut Sink, name: &str, default: bool) -> bool {
        self.bool(sink, name).unwrap_or(default)
    }

    pub fn u32(&self, sink: &mut Sink, name: &str) -> Option<u32> {
        let (v, path) = self.take(name)?;
        let n = parse_u64(sink, &path, v)?;
        match u32::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => {
                sink.error(path.as_str(), format!("{n} does not fit in 32 bits"));
                None
            }
        }
    }

    pub fn u64(&self, sink: &mut Sink, name: &str) -> Option<u64> {
        let (v, path) = self.take(name)?;
        parse_u64(sink, &path, v)
    }

    pub fn i64(&self, sink: &mut Sink, name: &str) -> Option<i64> {
        let (v, path) = self.take(name)?;
        parse_i64(sink, &path, v)
    }

    pub fn f64(&self, sink: &mut Sink, name: &str) -> Option<f64> {
        let (v, path) = self.take(name)?;
        parse_f64(sink, &path, v)
    }

    pub fn duration(&self, sink: &mut Sink, name: &str) -> Option<Duration> {
        let (v, path) = self.take(name)?;
        parse_duration(sink, &path, v)
    }

    pub fn msg(&self, sink: &mut Sink, name: &str, ty: &'static str) -> Option<Msg<'a>> {
        let (v, path) = self.take(name)?;
        Msg::new(sink, ty, path, v)
    }

    /// Elements of a repeated field. A non-array is an error (and yields nothing).
    pub fn list(&self, sink: &mut Sink, name: &str) -> Vec<(&'a Value, Path)> {
        let Some((v, path)) = self.take(name) else {
            return Vec::new();
        };
        match v {
            Value::Array(items) => items.iter().enumerate().map(|(i, v)| (v, path.index(i))).collect(),
            other => {
                sink.error(path.as_str(), format!("expected a list, found {}", kind(other)));
                Vec::new()
            }
        }
    }

    pub fn msgs(&self, sink: &mut Sink, name: &str, ty: &'static str) -> Vec<Msg<'a>> {
        self.list(sink, name).into_iter().filter_map(|(v, p)| Msg::new(sink, ty, p, v)).collect()
    }

    pub fn strs(&self, sink: &mut Sink, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (v, path) in self.list(sink, name) {
            match v {
                Value::String(s) => out.push(s.clone()),
                other => sink.error(path.as_str(), format!("expected a string, found {}", kind(other))),
            }
        }
        out
    }

    /// An enum given by name (or number, as proto3 JSON allows).
    pub fn enumeration<T: Copy>(&self, sink: &mut Sink, name: &str, values: &[(&str, T)]) -> Option<T> {
        let (v, path) = self.take(name)?;
        parse_enum(sink, &path, v, values)
    }

    /// Which one of a `oneof` group is set. More than one is an error.
    pub fn oneof(&self, sink: &mut Sink, names: &[&'static str]) -> Option<&'static str> {
        let set: Vec<&'static str> = names.iter().copied().filter(|n| self.has(n)).collect();
        if set.len() > 1 {
            sink.error(
                self.path.as_str(),
                format!("only one of {} may be set, found {}", names.join(", "), set.join(" and ")),
            );
        }
        set.first().copied()
    }

    /// The `@type` of an `Any`, without the `type.googleapis.com/` prefix.
    pub fn type_name(&self) -> Option<&'a str> {
        let f = self.fields.iter().find(|f| f.key == "@type")?;
        f.value.as_str().map(|t| t.rsplit('/').next().unwrap_or(t))
    }
}

/// Unwraps an `Any`: returns the message name and the object, following `TypedStruct`
/// (`udpa.type.v1.TypedStruct` / `xds.type.v3.TypedStruct`) to the message it wraps.
pub fn any<'a>(sink: &mut Sink, path: &Path, v: &'a Value) -> Option<(String, &'a Value, Path)> {
    let Some(obj) = v.as_object() else {
        sink.error(path.as_str(), format!("expected an object with \"@type\", found {}", kind(v)));
        return None;
    };
    let Some(t) = obj.get("@type").and_then(Value::as_str) else {
        sink.error(path.as_str(), "missing \"@type\"");
        return None;
    };
    let name = t.rsplit('/').next().unwrap_or(t).to_string();
    if name == "udpa.type.v1.TypedStruct" || name == "xds.type.v3.TypedStruct" {
        let url = obj.get("type_url").or_else(|| obj.get("typeUrl")).and_then(Value::as_str);
        let Some(url) = url else {
            sink.error(path.as_str(), "TypedStruct without type_url");
            return None;
        };
        let inner = url.rsplit('/').next().unwrap_or(url).to_string();
        let value_path = path.field("value");
        return match obj.get("value") {
            Some(value) => Some((inner, value, value_path)),
            None => Some((inner, &*EMPTY_OBJECT, value_path)),
        };
    }
    Some((name, v, path.clone()))
}

static EMPTY_OBJECT: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| Value::Object(Default::default()));

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Wrapper types (`UInt32Value` etc.) are plain numbers in proto3 JSON, but some hand-written
/// configs spell them `{value: n}`; accept both.
fn unwrap_wrapper(v: &Value) -> &Value {
    match v {
        Value::Object(o) if o.len() == 1 && o.contains_key("value") => &o["value"],
        other => other,
    }
}

pub fn parse_bool(sink: &mut Sink, path: &Path, v: &Value) -> Option<bool> {
    match unwrap_wrapper(v) {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s == "true" => Some(true),
        Value::String(s) if s == "false" => Some(false),
        other => {
            sink.error(path.as_str(), format!("expected a boolean, found {}", kind(other)));
            None
        }
    }
}

/// int64/uint64 are strings in proto3 JSON; numbers are accepted too.
pub fn parse_u64(sink: &mut Sink, path: &Path, v: &Value) -> Option<u64> {
    let v = unwrap_wrapper(v);
    let parsed = match v {
        Value::Number(n) => {
            n.as_u64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64))
        }
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    if parsed.is_none() {
        sink.error(path.as_str(), format!("expected a non-negative integer, found {}", describe(v)));
    }
    parsed
}

pub fn parse_i64(sink: &mut Sink, path: &Path, v: &Value) -> Option<i64> {
    let v = unwrap_wrapper(v);
    let parsed = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    if parsed.is_none() {
        sink.error(path.as_str(), format!("expected an integer, found {}", describe(v)));
    }
    parsed
}

pub fn parse_f64(sink: &mut Sink, path: &Path, v: &Value) -> Option<f64> {
    let v = unwrap_wrapper(v);
    let parsed = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    if parsed.is_none() {
        sink.error(path.as_str(), format!("expected a number, found {}", describe(v)));
    }
    parsed
}

/// `google.protobuf.Duration`: `"5s"`, `"0.25s"`, `"1.000340012s"`, `"-1s"` is invalid here.
pub fn parse_duration(sink: &mut Sink, path: &Path, v: &Value) -> Option<Duration> {
    let parsed = match v {
        Value::String(s) => duration_from_str(s),
        // A bare number is not proto3 JSON, but YAML authors write `timeout: 5`; Envoy would
        // reject it. Be precise about why.
        _ => None,
    };
    if parsed.is_none() {
        sink.error(path.as_str(), format!("expected a duration such as \"5s\" or \"0.25s\", found {}", describe(v)));
    }
    parsed
}

pub fn duration_from_str(s: &str) -> Option<Duration> {
    let num = s.trim().strip_suffix('s')?;
    if num.is_empty() || num.starts_with('-') || num.starts_with('+') {
        return None;
    }
    let (secs, frac) = match num.split_once('.') {
        Some((a, b)) => (a, b),
        None => (num, ""),
    };
    if !secs.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 9 {
        return None;
    }
    let secs: u64 = if secs.is_empty() { 0 } else { secs.parse().ok()? };
    let nanos: u32 = if frac.is_empty() { 0 } else { format!("{frac:0<9}").parse().ok()? };
    // Envoy caps durations at 315,576,000,000 s (10,000 years).
    if secs > 315_576_000_000 {
        return None;
    }
    Some(Duration::new(secs, nanos))
}

pub fn parse_enum<T: Copy>(sink: &mut Sink, path: &Path, v: &Value, values: &[(&str, T)]) -> Option<T> {
    match v {
        Value::String(s) => {
            if let Some((_, t)) = values.iter().find(|(n, _)| *n == s) {
                return Some(*t);
            }
        }
        Value::Number(n) => {
            if let Some(i) = n.as_u64()
                && let Some((_, t)) = values.get(i as usize)
            {
                return Some(*t);
            }
        }
        _ => {}
    }
    let names: Vec<&str> = values.iter().map(|(n, _)| *n).collect();
    sink.error(path.as_str(), format!("unsupported value {}; supported: {}", describe(v), names.join(", ")));
    None
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => kind(other).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn snake_case_conversion() {
        assert_eq!(snake_case("filterChains"), "filter_chains");
        assert_eq!(snake_case("filter_chains"), "filter_chains");
        assert_eq!(snake_case("http2ProtocolOptions"), "http2_protocol_options");
        assert_eq!(snake_case("xffNumTrustedHops"), "xff_num_trusted_hops");
    }

    #[test]
    fn durations() {
        assert_eq!(duration_from_str("5s"), Some(Duration::from_secs(5)));
        assert_eq!(duration_from_str("0.25s"), Some(Duration::from_millis(250)));
        assert_eq!(duration_from_str("1.000000001s"), Some(Duration::new(1, 1)));
        assert_eq!(duration_from_str("0s"), Some(Duration::ZERO));
        assert_eq!(duration_from_str(".5s"), Some(Duration::from_millis(500)));
        assert_eq!(duration_from_str("5"), None);
        assert_eq!(duration_from_str("-1s"), None);
        assert_eq!(duration_from_str("5ms"), None);
        assert_eq!(duration_from_str("1.0000000001s"), None);
    }

    #[test]
    fn mixed_spellings_and_leftovers() {
        let v = json!({"filterChains": [], "stat_prefix": "x", "bogusField": 1});
        let mut sink = Sink::new("default/lb");
        let m = Msg::new(&mut sink, "Listener", Path::root("spec.resources[0]"), &v).unwrap();
        assert!(m.take("filter_chains").is_some());
        m.skip("stat_prefix");
        m.finish(&mut sink);
        assert_eq!(sink.items.len(), 1);
        assert_eq!(sink.items[0].path, "spec.resources[0].bogusField");
        assert!(sink.items[0].message.contains("bogus_field"), "{}", sink.items[0].message);
    }

    #[test]
    fn duplicate_spelling_is_an_error() {
        let v = json!({"filterChains": [], "filter_chains": []});
        let mut sink = Sink::new("x");
        assert!(Msg::new(&mut sink, "Listener", Path::root(""), &v).is_none());
        assert!(sink.has_errors());
    }

    #[test]
    fn numbers_wrappers_and_int64_strings() {
        let v = json!({"a": 5, "b": "7", "c": {"value": 9}, "d": "x", "e": 1.5});
        let mut sink = Sink::new("x");
        let m = Msg::new(&mut sink, "T", Path::root(""), &v).unwrap();
        assert_eq!(m.u32(&mut sink, "a"), Some(5));
        assert_eq!(m.u32(&mut sink, "b"), Some(7));
        assert_eq!(m.u32(&mut sink, "c"), Some(9));
        assert!(!sink.has_errors());
        assert_eq!(m.u32(&mut sink, "d"), None);
        assert_eq!(m.u32(&mut sink, "e"), None);
        assert_eq!(sink.items.len(), 2);
    }

    #[test]
    fn enums_by_name_or_number() {
        #[derive(Clone, Copy, PartialEq, Debug)]
        enum E {
            A,
            B,
        }
        let vals = [("A", E::A), ("B", E::B)];
        let v = json!({"x": "B", "y": 0, "z": "C"});
        let mut sink = Sink::new("x");
        let m = Msg::new(&mut sink, "T", Path::root(""), &v).unwrap();
        assert_eq!(m.enumeration(&mut sink, "x", &vals), Some(E::B));
        assert_eq!(m.enumeration(&mut sink, "y", &vals), Some(E::A));
        assert_eq!(m.enumeration(&mut sink, "z", &vals), None);
        assert!(sink.items[0].message.contains("supported: A, B"));
    }

    #[test]
    fn typed_struct_is_unwrapped() {
        let v = json!({"@type": "type.googleapis.com/xds.type.v3.TypedStruct", "type_url": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router", "value": {}});
        let mut sink = Sink::new("x");
        let (name, _, _) = any(&mut sink, &Path::root("p"), &v).unwrap();
        assert_eq!(name, "envoy.extensions.filters.http.router.v3.Router");
    }
}
