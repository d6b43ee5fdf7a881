//! Access logs from the connection manager's `access_log` (`envoy.access_loggers.stdout`,
//! `stderr` and `file`), with Envoy's format strings and `json_format` dictionaries.
//!
//! A line is formatted on the worker when the response body has been sent (so `%BYTES_SENT%`
//! and `%DURATION%` are final), then handed to the sink's writer thread through a bounded
//! queue. Writing never blocks a worker: when the queue is full (a stalled disk, a blocked
//! stdout pipe) the line is dropped and counted in `sluice_access_log_dropped`.
//!
//! Supported command operators: `%START_TIME%` (with an optional strftime format),
//! `%REQ(X?Y):N%` / `%REQUEST_HEADER%`, `%RESP()%` / `%RESPONSE_HEADER%`, `%TRAILER()%` /
//! `%RESPONSE_TRAILER%` (pseudo-headers `:method`, `:path`, `:authority`, `:scheme`),
//! `%RESPONSE_CODE%`, `%RESPONSE_CODE_DETAILS%`, `%RESPONSE_FLAGS%`, `%DURATION%`,
//! `%REQUEST_DURATION%`, `%RESPONSE_DURATION%`, `%RESPONSE_TX_DURATION%`, `%BYTES_RECEIVED%`,
//! `%BYTES_SENT%`, `%PROTOCOL%`, `%UPSTREAM_HOST%`, `%UPSTREAM_CLUSTER%`,
//! `%UPSTREAM_REQUEST_ATTEMPT_COUNT%`, `%DOWNSTREAM_REMOTE_ADDRESS%`,
//! `%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%`, `%DOWNSTREAM_LOCAL_ADDRESS%` (each also
//! `_WITHOUT_PORT`), `%ROUTE_NAME%`, `%REQUESTED_SERVER_NAME%`, `%HOSTNAME%`, `%TRACE_ID%`.
//! Request headers are the ones the connection manager forwards (after `x-request-id`,
//! `x-forwarded-for` and path normalisation), before route header mutations.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderName, HeaderValue};
use prometheus::IntCounter;
use sluice_config::model::{AccessLog, AccessLogFormat, AccessLogSink};

/// Envoy's default format.
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" \
%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \
%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \
\"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// Lines queued per sink before new ones are dropped.
const QUEUE_LINES: usize = 16 * 1024;

// -------------------------------------------------------------------------------------------
// Formats

/// Header lists the loggers of one connection manager need captured, so a request pays for
/// the headers its formats name and nothing else.
#[derive(Debug, Default, Clone)]
pub struct Captures {
    pub request: Vec<HeaderName>,
    pub response: Vec<HeaderName>,
    pub trailers: Vec<HeaderName>,
}

impl Captures {
    fn index(list: &mut Vec<HeaderName>, name: HeaderName) -> usize {
        match list.iter().position(|n| *n == name) {
            Some(i) => i,
            None => {
                list.push(name);
                list.len() - 1
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty() && self.trailers.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pseudo {
    Method,
    Path,
    Authority,
    Scheme,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderSel {
    Pseudo(Pseudo),
    /// Index into the matching [`Captures`] list.
    Captured(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Request,
    Response,
    Trailer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    StartTime(Option<String>),
    Header { source: Source, main: HeaderSel, alt: Option<HeaderSel>, max: Option<usize> },
    ResponseCode,
    ResponseCodeDetails,
    ResponseFlags,
    Duration,
    RequestDuration,
    ResponseDuration,
    ResponseTxDuration,
    BytesReceived,
    BytesSent,
    Protocol,
    UpstreamHost,
    UpstreamCluster,
    AttemptCount,
    Address { which: Addr, port: bool },
    RouteName,
    RequestedServerName,
    Hostname,
    TraceId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Addr {
    Remote,
    DirectRemote,
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Op(Op),
}

/// A compiled text format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextFormat {
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum JsonNode {
    Object(Vec<(String, JsonNode)>),
    /// A non-string value in the dictionary, copied as is.
    Value(serde_json::Value),
    /// A string with command operators. One operator alone keeps its type (a number for
    /// `%RESPONSE_CODE%`, `null` when unset); anything else renders as a string.
    Format(TextFormat),
}

/// A compiled access log format.
#[derive(Debug, Clone)]
pub struct Format(FormatKind);

#[derive(Debug, Clone)]
enum FormatKind {
    Text(TextFormat),
    Json(Vec<(String, JsonNode)>),
}

impl Format {
    pub fn compile(f: &AccessLogFormat, captures: &mut Captures) -> Format {
        Format(match f {
            AccessLogFormat::Default => FormatKind::Text(TextFormat::compile(DEFAULT_FORMAT, captures)),
            AccessLogFormat::Text(s) => FormatKind::Text(TextFormat::compile(s, captures)),
            AccessLogFormat::Json(map) => FormatKind::Json(compile_object(map, captures)),
        })
    }

    pub fn text(f: TextFormat) -> Format {
        Format(FormatKind::Text(f))
    }
}

fn compile_object(
    map: &serde_json::Map<String, serde_json::Value>,
    captures: &mut Captures,
) -> Vec<(String, JsonNode)> {
    map.iter()
        .map(|(k, v)| {
            let node = match v {
                serde_json::Value::String(s) => JsonNode::Format(TextFormat::compile(s, captures)),
                serde_json::Value::Object(o) => JsonNode::Object(compile_object(o, captures)),
                other => JsonNode::Value(other.clone()),
            };
            (k.clone(), node)
        })
        .collect()
}

impl TextFormat {
    /// Parses a format string. A `%` that does not start a well-formed command operator is
    /// kept as text; an unknown operator is kept as text too, with a warning.
    pub fn compile(s: &str, captures: &mut Captures) -> TextFormat {
        let mut parts: Vec<Part> = Vec::new();
        let mut literal = String::new();
        let mut rest = s;
        while let Some(i) = rest.find('%') {
            literal.push_str(&rest[..i]);
            rest = &rest[i..];
            match parse_command(rest) {
                Some((name, arg, max, len)) => {
                    let text = &rest[..len];
                    match build_op(name, arg, max, captures) {
                        Some(op) => {
                            if !literal.is_empty() {
                                parts.push(Part::Literal(std::mem::take(&mut literal)));
                            }
                            parts.push(Part::Op(op));
                        }
                        None => {
                            tracing::warn!(target: "sluice::access_log", "unsupported access log operator {text}; printed as is");
                            literal.push_str(text);
                        }
                    }
                    rest = &rest[len..];
                }
                None => {
                    literal.push('%');
                    rest = &rest[1..];
                }
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        TextFormat { parts }
    }

    fn single_op(&self) -> Option<&Op> {
        match self.parts.as_slice() {
            [Part::Op(op)] => Some(op),
            _ => None,
        }
    }
}

/// `%NAME%`, `%NAME(arg)%`, `%NAME(arg):N%`: returns (name, arg, max length, bytes used).
fn parse_command(s: &str) -> Option<(&str, Option<&str>, Option<usize>, usize)> {
    let b = s.as_bytes();
    let mut i = 1;
    while i < b.len() && (b[i].is_ascii_uppercase() || b[i] == b'_' || b[i].is_ascii_digit()) {
        i += 1;
    }
    if i == 1 {
        return None;
    }
    let name = &s[1..i];
    let mut arg = None;
    if i < b.len() && b[i] == b'(' {
        let close = s[i..].find(')')? + i;
        arg = Some(&s[i + 1..close]);
        i = close + 1;
    }
    let mut max = None;
    if i < b.len() && b[i] == b':' {
        let start = i + 1;
        let mut j = start;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        if j == start {
            return None;
        }
        max = s[start..j].parse().ok();
        i = j;
    }
    if i < b.len() && b[i] == b'%' { Some((name, arg, max, i + 1)) } else { None }
}

fn header_sel(name: &str, source: Source, captures: &mut Captures) -> Option<HeaderSel> {
    let lower = name.trim().to_ascii_lowercase();
    let pseudo = match lower.as_str() {
        ":method" => Some(Pseudo::Method),
        ":path" => Some(Pseudo::Path),
        ":authority" | "host" => Some(Pseudo::Authority),
        ":scheme" => Some(Pseudo::Scheme),
        _ => None,
    };
    if let (Some(p), Source::Request) = (pseudo, source) {
        return Some(HeaderSel::Pseudo(p));
    }
    let h = HeaderName::from_bytes(lower.as_bytes()).ok()?;
    let list = match source {
        Source::Request => &mut captures.request,
        Source::Response => &mut captures.response,
        Source::Trailer => &mut captures.trailers,
    };
    Some(HeaderSel::Captured(Captures::index(list, h)))
}

fn build_op(name: &str, arg: Option<&str>, max: Option<usize>, captures: &mut Captures) -> Option<Op> {
    let header = |source: Source, captures: &mut Captures| -> Option<Op> {
        let arg = arg?;
        let (main, alt) = match arg.split_once('?') {
            Some((a, b)) => (a, Some(b)),
            None => (arg, None),
        };
        let main = header_sel(main, source, captures)?;
        let alt = match alt {
            Some(a) => Some(header_sel(a, source, captures)?),
            None => None,
        };
        Some(Op::Header { source, main, alt, max })
    };
    let addr = |which, port| Some(Op::Address { which, port });
    match name {
        "START_TIME" => Some(Op::StartTime(arg.map(str::to_string).filter(|s| !s.is_empty()))),
        "REQ" | "REQUEST_HEADER" => header(Source::Request, captures),
        "RESP" | "RESPONSE_HEADER" => header(Source::Response, captures),
        "TRAILER" | "RESPONSE_TRAILER" => header(Source::Trailer, captures),
        "RESPONSE_CODE" => Some(Op::ResponseCode),
        "RESPONSE_CODE_DETAILS" => Some(Op::ResponseCodeDetails),
        "RESPONSE_FLAGS" => Some(Op::ResponseFlags),
        "DURATION" => Some(Op::Duration),
        "REQUEST_DURATION" => Some(Op::RequestDuration),
        "RESPONSE_DURATION" => Some(Op::ResponseDuration),
        "RESPONSE_TX_DURATION" => Some(Op::ResponseTxDuration),
        "BYTES_RECEIVED" => Some(Op::BytesReceived),
        "BYTES_SENT" => Some(Op::BytesSent),
        "PROTOCOL" => Some(Op::Protocol),
        "UPSTREAM_HOST" => Some(Op::UpstreamHost),
        "UPSTREAM_CLUSTER" => Some(Op::UpstreamCluster),
        "UPSTREAM_REQUEST_ATTEMPT_COUNT" => Some(Op::AttemptCount),
        "DOWNSTREAM_REMOTE_ADDRESS" => addr(Addr::Remote, true),
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => addr(Addr::Remote, false),
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => addr(Addr::DirectRemote, true),
        "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => addr(Addr::DirectRemote, false),
        "DOWNSTREAM_LOCAL_ADDRESS" => addr(Addr::Local, true),
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => addr(Addr::Local, false),
        "ROUTE_NAME" => Some(Op::RouteName),
        "REQUESTED_SERVER_NAME" => Some(Op::RequestedServerName),
        "HOSTNAME" => Some(Op::Hostname),
        "TRACE_ID" => Some(Op::TraceId),
        _ => None,
    }
}

// -------------------------------------------------------------------------------------------
// Entries

/// Everything a format may print about one request, borrowed from the request's record.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub start_time: SystemTime,
    pub duration: Duration,
    /// Until the last byte of the request body was received.
    pub request_duration: Option<Duration>,
    /// Until the first byte of the upstream response.
    pub response_duration: Option<Duration>,
    pub method: &'a str,
    pub path: &'a str,
    pub authority: Option<&'a str>,
    pub scheme: &'a str,
    /// Values of [`Captures::request`], in order.
    pub request_headers: &'a [Option<HeaderValue>],
    pub response_headers: &'a [Option<HeaderValue>],
    pub trailers: &'a [Option<HeaderValue>],
    /// 0 when no response was sent.
    pub status: u16,
    pub details: &'a str,
    pub flags: &'a str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub protocol: &'a str,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<&'a str>,
    pub attempts: u32,
    pub remote: SocketAddr,
    pub direct_remote: SocketAddr,
    pub local: SocketAddr,
    pub route_name: Option<&'a str>,
    pub sni: Option<&'a str>,
    pub hostname: &'a str,
    pub trace_id: Option<String>,
}

enum Val<'a> {
    None,
    Str(std::borrow::Cow<'a, str>),
    Num(u64),
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl Entry<'_> {
    fn value(&self, op: &Op) -> Val<'_> {
        use std::borrow::Cow;
        let opt_str = |s: Option<&str>| match s {
            Some(s) if !s.is_empty() => Val::Str(Cow::Owned(s.to_string())),
            _ => Val::None,
        };
        match op {
            Op::StartTime(fmt) => Val::Str(Cow::Owned(format_time(self.start_time, fmt.as_deref()))),
            Op::Header { source, main, alt, max } => {
                let v = self.header(*source, *main).or_else(|| alt.and_then(|a| self.header(*source, a)));
                match v {
                    Some(s) => {
                        let s = match max {
                            Some(n) if s.chars().count() > *n => Cow::Owned(s.chars().take(*n).collect()),
                            _ => s,
                        };
                        Val::Str(s)
                    }
                    None => Val::None,
                }
            }
            Op::ResponseCode => Val::Num(u64::from(self.status)),
            Op::ResponseCodeDetails => opt_str(Some(self.details)),
            Op::ResponseFlags => opt_str(Some(self.flags)),
            Op::Duration => Val::Num(ms(self.duration)),
            Op::RequestDuration => self.request_duration.map(|d| Val::Num(ms(d))).unwrap_or(Val::None),
            Op::ResponseDuration => self.response_duration.map(|d| Val::Num(ms(d))).unwrap_or(Val::None),
            Op::ResponseTxDuration => {
                self.response_duration.map(|d| Val::Num(ms(self.duration.saturating_sub(d)))).unwrap_or(Val::None)
            }
            Op::BytesReceived => Val::Num(self.bytes_received),
            Op::BytesSent => Val::Num(self.bytes_sent),
            Op::Protocol => Val::Str(Cow::Borrowed(self.protocol)),
            Op::UpstreamHost => self.upstream_host.map(|a| Val::Str(Cow::Owned(a.to_string()))).unwrap_or(Val::None),
            Op::UpstreamCluster => opt_str(self.upstream_cluster),
            Op::AttemptCount => {
                if self.attempts == 0 {
                    Val::None
                } else {
                    Val::Num(u64::from(self.attempts))
                }
            }
            Op::Address { which, port } => {
                let a = match which {
                    Addr::Remote => self.remote,
                    Addr::DirectRemote => self.direct_remote,
                    Addr::Local => self.local,
                };
                let ip = sluice_config::model::canonical_ip(a.ip());
                Val::Str(Cow::Owned(if *port { SocketAddr::new(ip, a.port()).to_string() } else { ip.to_string() }))
            }
            Op::RouteName => opt_str(self.route_name),
            Op::RequestedServerName => opt_str(self.sni),
            Op::Hostname => Val::Str(Cow::Borrowed(self.hostname)),
            Op::TraceId => opt_str(self.trace_id.as_deref()),
        }
    }

    fn header(&self, source: Source, sel: HeaderSel) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        match sel {
            HeaderSel::Pseudo(p) => match p {
                Pseudo::Method => Some(Cow::Borrowed(self.method)),
                Pseudo::Path => Some(Cow::Borrowed(self.path)),
                Pseudo::Authority => self.authority.map(Cow::Borrowed),
                Pseudo::Scheme => Some(Cow::Borrowed(self.scheme)),
            },
            HeaderSel::Captured(i) => {
                let list = match source {
                    Source::Request => self.request_headers,
                    Source::Response => self.response_headers,
                    Source::Trailer => self.trailers,
                };
                let v = list.get(i)?.as_ref()?;
                Some(String::from_utf8_lossy(v.as_bytes()))
            }
        }
    }

    fn render_text(&self, f: &TextFormat, out: &mut String) {
        for p in &f.parts {
            match p {
                Part::Literal(s) => out.push_str(s),
                Part::Op(op) => match self.value(op) {
                    Val::None => out.push('-'),
                    Val::Str(s) => out.push_str(&s),
                    Val::Num(n) => {
                        let _ = write!(out, "{n}");
                    }
                },
            }
        }
    }

    fn render_json(&self, nodes: &[(String, JsonNode)]) -> serde_json::Value {
        let mut map = serde_json::Map::with_capacity(nodes.len());
        for (k, node) in nodes {
            let v = match node {
                JsonNode::Object(o) => self.render_json(o),
                JsonNode::Value(v) => v.clone(),
                JsonNode::Format(f) => match f.single_op() {
                    Some(op) => match self.value(op) {
                        Val::None => serde_json::Value::Null,
                        Val::Str(s) => serde_json::Value::String(s.into_owned()),
                        Val::Num(n) => serde_json::Value::from(n),
                    },
                    None => {
                        let mut s = String::new();
                        self.render_text(f, &mut s);
                        serde_json::Value::String(s)
                    }
                },
            };
            map.insert(k.clone(), v);
        }
        serde_json::Value::Object(map)
    }

    /// The line for `format`; JSON lines end with a newline, text lines as the format says.
    pub fn render(&self, format: &Format) -> String {
        match &format.0 {
            FormatKind::Text(f) => {
                let mut s = String::with_capacity(256);
                self.render_text(f, &mut s);
                s
            }
            FormatKind::Json(nodes) => {
                let mut s = self.render_json(nodes).to_string();
                s.push('\n');
                s
            }
        }
    }
}

// -------------------------------------------------------------------------------------------
// Time

/// Days since 1970-01-01 -> (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// UTC time: Envoy's default `2016-04-15T20:17:00.310Z`, or a strftime-style format with
/// `%Y %m %d %H %M %S %y %j %a %b %e %T %F %z %Z %s %%` and `%f`/`%Nf`/`%ENS` for fractions.
pub fn format_time(t: SystemTime, fmt: Option<&str>) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let nanos = since.subsec_nanos();
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s) = (sod / 3600, (sod % 3600) / 60, sod % 60);
    let Some(fmt) = fmt else {
        return format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z", nanos / 1_000_000);
    };
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let frac = |n: u32| {
        let n = n.clamp(1, 9);
        let v = nanos / 10u32.pow(9 - n);
        format!("{v:0width$}", width = n as usize)
    };
    let mut out = String::with_capacity(fmt.len() + 16);
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            break;
        };
        match spec {
            'Y' => {
                let _ = write!(out, "{y:04}");
            }
            'y' => {
                let _ = write!(out, "{:02}", y.rem_euclid(100));
            }
            'm' => {
                let _ = write!(out, "{mo:02}");
            }
            'd' => {
                let _ = write!(out, "{d:02}");
            }
            'e' => {
                let _ = write!(out, "{d:2}");
            }
            'H' => {
                let _ = write!(out, "{h:02}");
            }
            'M' => {
                let _ = write!(out, "{mi:02}");
            }
            'S' => {
                let _ = write!(out, "{s:02}");
            }
            'T' => {
                let _ = write!(out, "{h:02}:{mi:02}:{s:02}");
            }
            'F' => {
                let _ = write!(out, "{y:04}-{mo:02}-{d:02}");
            }
            'j' => {
                let jan1 = days_from_civil(y, 1, 1);
                let _ = write!(out, "{:03}", days - jan1 + 1);
            }
            'a' => out.push_str(DAYS[days.rem_euclid(7) as usize]),
            'b' => out.push_str(MONTHS[(mo - 1) as usize]),
            'z' => out.push_str("+0000"),
            'Z' => out.push_str("UTC"),
            's' => {
                let _ = write!(out, "{secs}");
            }
            'f' => out.push_str(&frac(9)),
            '%' => out.push('%'),
            n @ '1'..='9' if chars.peek() == Some(&'f') => {
                chars.next();
                out.push_str(&frac(n as u32 - '0' as u32));
            }
            'E' => {
                // %E3S: seconds with 3 decimals, Envoy's extension.
                let digits = chars.next_if(char::is_ascii_digit);
                if chars.next_if_eq(&'S').is_some() {
                    let _ = write!(out, "{s:02}");
                    if let Some(n) = digits {
                        out.push('.');
                        out.push_str(&frac(n as u32 - '0' as u32));
                    }
                } else {
                    out.push_str("%E");
                    if let Some(n) = digits {
                        out.push(n);
                    }
                }
            }
            other => {
                out.push('%');
                out.push(other);
            }
        }
    }
    out
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// -------------------------------------------------------------------------------------------
// Sinks

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SinkKey {
    Stdout,
    Stderr,
    File(PathBuf),
}

enum Msg {
    Line(String),
    /// Write everything queued, then acknowledge.
    Flush(SyncSender<()>),
}

/// One sink's queue; its thread writes.
pub struct Writer {
    tx: SyncSender<Msg>,
    dropped: IntCounter,
    reopen: Arc<AtomicBool>,
}

impl Writer {
    fn send(&self, line: String) {
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// The writer threads, one per sink (stdout, stderr, each file), shared by every logger
/// that names the sink and kept across configuration changes.
pub struct Writers {
    sinks: Mutex<HashMap<SinkKey, Arc<Writer>>>,
    dropped: IntCounter,
    write_errors: IntCounter,
}

impl Writers {
    pub fn new(dropped: IntCounter, write_errors: IntCounter) -> Writers {
        Writers { sinks: Mutex::new(HashMap::new()), dropped, write_errors }
    }

    fn writer(&self, sink: &AccessLogSink) -> Option<Arc<Writer>> {
        let key = match sink {
            AccessLogSink::Stdout => SinkKey::Stdout,
            AccessLogSink::Stderr => SinkKey::Stderr,
            AccessLogSink::File(p) => SinkKey::File(PathBuf::from(p)),
        };
        let mut sinks = self.sinks.lock().ok()?;
        if let Some(w) = sinks.get(&key) {
            return Some(w.clone());
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_LINES);
        let reopen = Arc::new(AtomicBool::new(false));
        let thread_key = key.clone();
        let errors = self.write_errors.clone();
        let flag = reopen.clone();
        let spawned = std::thread::Builder::new()
            .name("sluice-access-log".into())
            .spawn(move || write_loop(thread_key, rx, flag, errors));
        if let Err(e) = spawned {
            tracing::error!(target: "sluice::access_log", "cannot start the access log writer: {e}");
            return None;
        }
        let w = Arc::new(Writer { tx, dropped: self.dropped.clone(), reopen });
        sinks.insert(key, w.clone());
        Some(w)
    }

    /// Compiles a connection manager's access logs. `captures` collects the headers their
    /// formats need.
    pub fn loggers(&self, logs: &[AccessLog], captures: &mut Captures) -> Vec<AccessLogger> {
        logs.iter()
            .filter_map(|l| {
                let writer = self.writer(&l.sink)?;
                Some(AccessLogger { format: Format::compile(&l.format, captures), writer })
            })
            .collect()
    }

    /// Stops the writers no logger uses any more (their threads exit once drained).
    pub fn retain_used(&self) {
        if let Ok(mut sinks) = self.sinks.lock() {
            sinks.retain(|_, w| Arc::strong_count(w) > 1);
        }
    }

    /// Reopens the files (after log rotation, `POST /reopen_logs`).
    pub fn reopen(&self) {
        if let Ok(sinks) = self.sinks.lock() {
            for w in sinks.values() {
                w.reopen.store(true, Ordering::Release);
            }
        }
    }

    /// Writes out what is queued, waiting at most `within` per sink. For shutdown.
    pub fn flush(&self, within: Duration) {
        let writers: Vec<Arc<Writer>> = self.sinks.lock().map(|s| s.values().cloned().collect()).unwrap_or_default();
        for w in writers {
            let (ack_tx, ack_rx) = std::sync::mpsc::sync_channel(1);
            if w.tx.try_send(Msg::Flush(ack_tx)).is_ok() {
                let _ = ack_rx.recv_timeout(within);
            }
        }
    }
}

/// One configured access log.
pub struct AccessLogger {
    format: Format,
    writer: Arc<Writer>,
}

impl AccessLogger {
    pub fn log(&self, entry: &Entry<'_>) {
        self.writer.send(entry.render(&self.format));
    }
}

fn open(key: &SinkKey) -> std::io::Result<Box<dyn std::io::Write>> {
    Ok(match key {
        SinkKey::Stdout => Box::new(std::io::stdout()),
        SinkKey::Stderr => Box::new(std::io::stderr()),
        SinkKey::File(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
    })
}

fn write_loop(key: SinkKey, rx: Receiver<Msg>, reopen: Arc<AtomicBool>, errors: IntCounter) {
    let mut out: Option<Box<dyn std::io::Write>> = None;
    let mut last_open_attempt: Option<std::time::Instant> = None;
    let mut buf = String::with_capacity(64 * 1024);
    while let Ok(first) = rx.recv() {
        let mut acks = Vec::new();
        let mut push = |m: Msg, buf: &mut String| match m {
            Msg::Line(l) => buf.push_str(&l),
            Msg::Flush(a) => acks.push(a),
        };
        push(first, &mut buf);
        // Batch what else is queued into one write.
        while buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(m) => push(m, &mut buf),
                Err(_) => break,
            }
        }
        if reopen.swap(false, Ordering::AcqRel) && matches!(key, SinkKey::File(_)) {
            out = None;
            last_open_attempt = None;
        }
        if out.is_none() && last_open_attempt.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_open_attempt = Some(std::time::Instant::now());
            match open(&key) {
                Ok(w) => out = Some(w),
                Err(e) => tracing::error!(target: "sluice::access_log", "cannot open access log {key:?}: {e}"),
            }
        }
        if !buf.is_empty() {
            let ok = match out.as_mut() {
                Some(w) => w.write_all(buf.as_bytes()).and_then(|()| w.flush()).is_ok(),
                None => false,
            };
            if !ok {
                errors.inc();
                // Reopen on the next batch: the file may have been removed or the disk freed.
                out = None;
            }
            buf.clear();
        }
        for a in acks {
            let _ = a.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(req: &'a [Option<HeaderValue>], resp: &'a [Option<HeaderValue>]) -> Entry<'a> {
        Entry {
            start_time: UNIX_EPOCH + Duration::from_millis(1_460_751_420_310),
            duration: Duration::from_millis(226),
            request_duration: Some(Duration::from_millis(3)),
            response_duration: Some(Duration::from_millis(200)),
            method: "POST",
            path: "/api/v1/locations",
            authority: Some("locations"),
            scheme: "http",
            request_headers: req,
            response_headers: resp,
            trailers: &[],
            status: 204,
            details: "via_upstream",
            flags: "",
            bytes_received: 154,
            bytes_sent: 0,
            protocol: "HTTP/2",
            upstream_host: Some("10.0.2.1:80".parse().unwrap()),
            upstream_cluster: Some("default/locations"),
            attempts: 1,
            remote: "10.0.35.28:5555".parse().unwrap(),
            direct_remote: "10.0.35.1:4444".parse().unwrap(),
            local: "10.0.0.9:8080".parse().unwrap(),
            route_name: None,
            sni: None,
            hostname: "node-1",
            trace_id: None,
        }
    }

    fn value_for(c: &Captures, name: &str, v: &'static str) -> Vec<Option<HeaderValue>> {
        c.request.iter().map(|n| (n == name).then(|| HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn default_format_matches_envoy() {
        let mut c = Captures::default();
        let f = Format::compile(&AccessLogFormat::Default, &mut c);
        let names: Vec<&str> = c.request.iter().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-envoy-original-path", "x-forwarded-for", "user-agent", "x-request-id"]);
        assert_eq!(c.response[0], "x-envoy-upstream-service-time");
        let mut req: Vec<Option<HeaderValue>> = vec![None; c.request.len()];
        req[1] = Some(HeaderValue::from_static("10.0.35.28"));
        req[2] = Some(HeaderValue::from_static("nsq2http"));
        req[3] = Some(HeaderValue::from_static("cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2"));
        let resp = vec![Some(HeaderValue::from_static("100"))];
        let line = entry(&req, &resp).render(&f);
        assert_eq!(
            line,
            "[2016-04-15T20:17:00.310Z] \"POST /api/v1/locations HTTP/2\" 204 - 154 0 226 100 \"10.0.35.28\" \
             \"nsq2http\" \"cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2\" \"locations\" \"10.0.2.1:80\"\n"
        );
    }

    #[test]
    fn alternatives_truncation_and_unknowns() {
        let mut c = Captures::default();
        let f =
            TextFormat::compile("%REQ(X-MISSING?:PATH):4% %REQ(x-a):2% 100% %NOPE% %START_TIME(%Y/%j %s.%3f)%", &mut c);
        let req = value_for(&c, "x-a", "abcdef");
        let line = entry(&req, &[]).render(&Format::text(f));
        assert_eq!(line, "/api ab 100% %NOPE% 2016/106 1460751420.310");
    }

    #[test]
    fn json_keeps_types() {
        let mut c = Captures::default();
        let map = serde_json::json!({
            "code": "%RESPONSE_CODE%",
            "flags": "%RESPONSE_FLAGS%",
            "route": "%ROUTE_NAME%",
            "line": "%REQ(:METHOD)% %REQ(:PATH)%",
            "nested": {"bytes": "%BYTES_RECEIVED%", "up": "%UPSTREAM_HOST%"},
            "fixed": 7,
            "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"
        });
        let f = Format::compile(&AccessLogFormat::Json(map.as_object().unwrap().clone()), &mut c);
        let line = entry(&[], &[]).render(&f);
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["code"], 204);
        assert_eq!(v["flags"], serde_json::Value::Null);
        assert_eq!(v["route"], serde_json::Value::Null);
        assert_eq!(v["line"], "POST /api/v1/locations");
        assert_eq!(v["nested"]["bytes"], 154);
        assert_eq!(v["nested"]["up"], "10.0.2.1:80");
        assert_eq!(v["fixed"], 7);
        assert_eq!(v["client"], "10.0.35.28");
    }

    #[test]
    fn calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        assert_eq!(civil_from_days(days_from_civil(2000, 12, 31)), (2000, 12, 31));
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29T00:00:00Z, a Tuesday
        assert_eq!(format_time(t, Some("%a %b %e %T %F %z %E3S")), "Tue Feb 29 00:00:00 2000-02-29 +0000 00.000");
    }

    #[test]
    fn command_parsing() {
        assert_eq!(parse_command("%REQ(a?b):10% x"), Some(("REQ", Some("a?b"), Some(10), 13)));
        assert_eq!(parse_command("%DURATION%"), Some(("DURATION", None, None, 10)));
        assert_eq!(parse_command("% DURATION%"), None);
        assert_eq!(parse_command("%REQ(a%"), None);
        assert_eq!(parse_command("%REQ(a):%"), None);
    }
}
