//! The native model: what the data plane consumes.
//!
//! Everything here is already validated and resolved: names are qualified the way Cilium
//! qualifies them, EDS clusters carry their endpoints, regexes are compiled, durations are
//! durations. The data plane never looks at Envoy JSON again. A [`Snapshot`] is immutable;
//! a config change produces a new one.
//!
//! Only `Serialize` is derived: `sluice translate` and `/config_dump` print the model, nothing
//! reads it back.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::diag::Diagnostic;

/// One complete, consistent configuration.
#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    /// Listeners, sorted by qualified name.
    pub listeners: Vec<Arc<Listener>>,
    /// Route configurations by qualified name (RDS and inline ones).
    pub route_configs: BTreeMap<String, Arc<RouteConfig>>,
    /// Clusters by (qualified) name.
    pub clusters: BTreeMap<String, Arc<Cluster>>,
    /// Endpoint assignments by EDS name: `ns/svc`, `ns/svc:port`, `ns/svc:*` computed from
    /// Services and EndpointSlices as Cilium's agent publishes them, plus the CECs' own
    /// ClusterLoadAssignment resources.
    pub endpoints: BTreeMap<String, Vec<Endpoint>>,
    /// Secrets by name (`ns/cec/name` for CEC-local ones, `ns/name` for Kubernetes Secrets).
    pub secrets: BTreeMap<String, Arc<Secret>>,
    /// Kubernetes Services whose traffic `spec.services` redirects to a listener.
    pub redirects: Vec<ServiceRedirect>,
    /// One entry per CEC/CCEC seen, accepted or not.
    pub sources: Vec<SourceReport>,
    /// Everything the translator had to say, errors and warnings.
    pub diagnostics: Vec<Diagnostic>,
}

impl Snapshot {
    pub fn listener(&self, name: &str) -> Option<&Arc<Listener>> {
        self.listeners.iter().find(|l| l.name == name)
    }

    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// Where a resource came from: the CEC's `namespace/name` (a CCEC has an empty namespace, so
/// `/name`), as used in diagnostics and `/config_dump`.
pub type SourceName = String;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    CiliumEnvoyConfig,
    CiliumClusterwideEnvoyConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum SourceState {
    Accepted,
    /// Rejected because of at least one error diagnostic; nothing of it is in the snapshot.
    Rejected {
        reason: String,
    },
    /// The new version is rejected; the last accepted version of the CEC keeps serving.
    PreviousVersion {
        reason: String,
    },
    /// `spec.nodeSelector` does not select this node.
    NotSelected,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    pub kind: SourceKind,
    pub name: SourceName,
    pub origin: String,
    #[serde(flatten)]
    pub state: SourceState,
    pub listeners: Vec<String>,
    pub route_configs: Vec<String>,
    pub clusters: Vec<String>,
    pub secrets: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Listeners

#[derive(Debug, Serialize)]
pub struct Listener {
    pub name: String,
    pub source: SourceName,
    /// Addresses to bind. For a listener without an address these are `127.0.0.1:P` and
    /// `[::1]:P` with P allocated from the proxy port range, as Cilium does.
    pub addresses: Vec<SocketAddr>,
    /// True when the port came from the proxy port range rather than the CEC.
    pub port_allocated: bool,
    /// `internal_listener: {}`: reachable only through `envoy_internal_address` endpoints.
    pub internal: bool,
    /// `envoy.filters.listener.proxy_protocol` is configured.
    pub proxy_protocol: bool,
    /// `envoy.filters.listener.tls_inspector` is configured (SNI/ALPN are read before a chain
    /// is chosen). Sluice always peeks when a chain needs it; this is informational.
    pub tls_inspector: bool,
    pub filter_chains: Vec<FilterChain>,
    pub default_filter_chain: Option<FilterChain>,
    pub per_connection_buffer_limit_bytes: u32,
    /// TCP keepalive for accepted connections, from the well-known `socket_options`
    /// (SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT) Cilium's translators emit.
    pub tcp_keepalive: Option<TcpKeepalive>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TcpKeepalive {
    pub idle: Option<Duration>,
    pub interval: Option<Duration>,
    pub count: Option<u32>,
}

impl Listener {
    pub fn port(&self) -> Option<u16> {
        self.addresses.first().map(|a| a.port())
    }
}

#[derive(Debug, Serialize)]
pub struct FilterChain {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: FilterChainMatch,
    /// `transport_socket` with a `DownstreamTlsContext`: terminate TLS before the filters.
    pub tls: Option<Arc<DownstreamTls>>,
    pub filter: NetworkFilter,
}

/// Envoy's `filter_chain_match`. Empty fields match anything. Selection follows Envoy's order
/// of precedence: destination port, server name (exact before wildcard), transport protocol,
/// application protocols, then source.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct FilterChainMatch {
    pub destination_port: Option<u16>,
    pub prefix_ranges: Vec<CidrRange>,
    /// Lower-cased; `*.example.com` is a wildcard.
    pub server_names: Vec<String>,
    /// `raw_buffer` or `tls`.
    pub transport_protocol: Option<String>,
    pub application_protocols: Vec<String>,
    pub source_prefix_ranges: Vec<CidrRange>,
    pub source_ports: Vec<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CidrRange {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl CidrRange {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        match (canonical_ip(self.address), ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let len = u32::from(self.prefix_len.min(32));
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let len = u32::from(self.prefix_len.min(128));
                let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses compare as IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkFilter {
    HttpConnectionManager(Arc<HttpConnectionManager>),
    TcpProxy(Arc<TcpProxy>),
}

// ---------------------------------------------------------------------------------------------
// HTTP connection manager

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CodecType {
    Auto,
    Http1,
    Http2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServerHeaderTransformation {
    Overwrite,
    AppendIfAbsent,
    PassThrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HeadersWithUnderscoresAction {
    Allow,
    RejectRequest,
    DropHeader,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathWithEscapedSlashesAction {
    KeepUnchanged,
    RejectRequest,
    UnescapeAndRedirect,
    UnescapeAndForward,
}

#[derive(Debug, Serialize)]
pub struct HttpConnectionManager {
    pub stat_prefix: String,
    pub codec_type: CodecType,
    /// Name of the route configuration (RDS name, or the synthetic name of an inline one).
    pub route_config_name: String,
    /// The resolved route configuration; `None` if RDS names a configuration that does not
    /// exist (every request then gets a 404, as in Envoy once RDS times out).
    #[serde(skip)]
    pub route_config: Option<Arc<RouteConfig>>,
    pub http_filters: Vec<HttpFilter>,
    pub use_remote_address: bool,
    pub xff_num_trusted_hops: u32,
    pub skip_xff_append: bool,
    /// `internal_address_config.cidr_ranges`; empty means Envoy's default (RFC1918 + loopback
    /// are *not* internal unless listed, since Envoy 1.33).
    pub internal_address_cidrs: Vec<CidrRange>,
    pub generate_request_id: bool,
    pub preserve_external_request_id: bool,
    pub always_set_request_id_in_response: bool,
    /// `None` disables the timer (Envoy: `0s`).
    pub stream_idle_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
    pub request_headers_timeout: Option<Duration>,
    /// Connection idle timeout (`common_http_protocol_options.idle_timeout`).
    pub idle_timeout: Option<Duration>,
    pub max_connection_duration: Option<Duration>,
    pub max_stream_duration: Option<Duration>,
    pub max_requests_per_connection: Option<u32>,
    pub max_request_headers_kb: u32,
    pub max_headers_count: u32,
    pub headers_with_underscores_action: HeadersWithUnderscoresAction,
    pub server_name: String,
    pub server_header_transformation: ServerHeaderTransformation,
    pub normalize_path: bool,
    pub merge_slashes: bool,
    pub path_with_escaped_slashes_action: PathWithEscapedSlashesAction,
    pub strip_matching_host_port: bool,
    pub strip_any_host_port: bool,
    /// HCM-level upgrades (`upgrade_configs`), e.g. `websocket`.
    pub upgrade_configs: Vec<UpgradeConfig>,
    pub http2: Http2Options,
    pub accept_http_10: bool,
    pub access_log: Vec<AccessLog>,
    pub tracing: Option<Tracing>,
    pub drain_timeout: Duration,
    pub delayed_close_timeout: Duration,
    pub via: Option<String>,
}

impl HttpConnectionManager {
    pub fn grpc_web(&self) -> bool {
        self.http_filters.iter().any(|f| matches!(f, HttpFilter::GrpcWeb))
    }

    pub fn upgrade_enabled(&self, upgrade: &str) -> bool {
        self.upgrade_configs.iter().any(|u| u.enabled && u.upgrade_type.eq_ignore_ascii_case(upgrade))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct UpgradeConfig {
    pub upgrade_type: String,
    pub enabled: bool,
    /// Route-level CONNECT: `connect_config.allow_post`.
    pub connect_allow_post: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Http2Options {
    pub max_concurrent_streams: u32,
    pub initial_stream_window_size: u32,
    pub initial_connection_window_size: u32,
    pub allow_connect: bool,
}

impl Default for Http2Options {
    fn default() -> Self {
        // Envoy's defaults.
        Http2Options {
            max_concurrent_streams: 2_147_483_647,
            initial_stream_window_size: 268_435_456,
            initial_connection_window_size: 268_435_456,
            allow_connect: false,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case", tag = "name")]
pub enum HttpFilter {
    /// `envoy.filters.http.router`, always last.
    Router { suppress_envoy_headers: bool, start_child_span: bool },
    /// `envoy.filters.http.grpc_web`: gRPC-Web <-> gRPC.
    GrpcWeb,
    /// `envoy.filters.http.grpc_stats`: per-method gRPC counters.
    GrpcStats { stats_for_all_methods: bool, enable_upstream_stats: bool },
    /// `envoy.filters.http.cors`; policies come from `typed_per_filter_config`.
    Cors,
    /// `envoy.filters.http.health_check`.
    HealthCheck(HealthCheckFilter),
}

#[derive(Debug, Serialize)]
pub struct HealthCheckFilter {
    pub pass_through_mode: bool,
    pub headers: Vec<HeaderMatcher>,
    /// Cluster name -> minimum healthy percentage.
    pub cluster_min_healthy_percentages: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AccessLog {
    pub sink: AccessLogSink,
    pub format: AccessLogFormat,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogSink {
    Stdout,
    Stderr,
    File(String),
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    /// Envoy's default text format.
    Default,
    Text(String),
    /// `json_format`: key -> format string (nested objects flattened by the logger).
    Json(serde_json::Map<String, serde_json::Value>),
}

#[derive(Debug, Clone, Serialize)]
pub struct Tracing {
    /// The cluster of the OTLP collector (`envoy.tracers.opentelemetry` `grpc_service`).
    pub collector_cluster: Option<String>,
    pub service_name: Option<String>,
    /// Fraction in [0, 1] (`random_sampling`).
    pub random_sampling: f64,
    pub client_sampling: f64,
    pub overall_sampling: f64,
    pub spawn_upstream_span: bool,
    pub custom_tags: Vec<(String, String)>,
}

// ---------------------------------------------------------------------------------------------
// TCP proxy

#[derive(Debug, Serialize)]
pub struct TcpProxy {
    pub stat_prefix: String,
    pub cluster: ClusterSpecifier,
    pub idle_timeout: Option<Duration>,
    pub max_connect_attempts: u32,
    pub tunneling: Option<TunnelingConfig>,
    pub access_log: Vec<AccessLog>,
}

#[derive(Debug, Serialize)]
pub struct TunnelingConfig {
    pub hostname: HeaderValueTemplate,
    pub use_post: bool,
    pub headers_to_add: Vec<HeaderAdd>,
}

// ---------------------------------------------------------------------------------------------
// Routes

#[derive(Debug, Serialize)]
pub struct RouteConfig {
    pub name: String,
    pub source: SourceName,
    pub virtual_hosts: Vec<Arc<VirtualHost>>,
    #[serde(skip)]
    pub vhost_index: VirtualHostIndex,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    pub internal_only_headers: Vec<HeaderName>,
    pub most_specific_header_mutations_wins: bool,
    /// Match virtual host domains against the host without its port.
    pub ignore_port_in_host_matching: bool,
}

impl RouteConfig {
    /// Envoy's virtual host selection for a `:authority`/`Host` value.
    pub fn select_vhost(&self, host: &str) -> Option<&Arc<VirtualHost>> {
        self.vhost_index.select(host).map(|i| &self.virtual_hosts[i])
    }
}

/// Precompiled domain lookup with Envoy's precedence: exact, then the longest `*.suffix`
/// (the wildcard must match at least one character), then the longest `prefix*`, then `*`.
/// Matching is case-insensitive and, as in Envoy, includes the port when the host carries one
/// (Cilium's translators emit `[host, "host:*"]` for that reason). Port stripping, where
/// configured, is the connection manager's job before the lookup.
#[derive(Debug, Default)]
pub struct VirtualHostIndex {
    pub(crate) exact: std::collections::HashMap<String, usize>,
    /// (suffix after the `*`, index), longest first.
    pub(crate) suffixes: Vec<(String, usize)>,
    /// (prefix before the `*`, index), longest first.
    pub(crate) prefixes: Vec<(String, usize)>,
    pub(crate) wildcard: Option<usize>,
}

impl VirtualHostIndex {
    pub fn select(&self, host: &str) -> Option<usize> {
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        if let Some(&i) = self.exact.get(host) {
            return Some(i);
        }
        for (suffix, i) in &self.suffixes {
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                return Some(*i);
            }
        }
        for (prefix, i) in &self.prefixes {
            if host.len() > prefix.len() && host.starts_with(prefix.as_str()) {
                return Some(*i);
            }
        }
        self.wildcard
    }
}

/// `host:port` -> `host`; handles `[v6]:port`. Returns `None` when there is no port.
pub fn strip_port(host: &str) -> Option<&str> {
    if let Some(rest) = host.strip_prefix('[') {
        let end = rest.find(']')?;
        let after = &rest[end + 1..];
        if after.starts_with(':') {
            return Some(&host[..end + 2]);
        }
        return None;
    }
    let (h, p) = host.rsplit_once(':')?;
    if h.contains(':') || p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(h)
}

#[derive(Debug, Serialize)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    pub retry_policy: Option<Arc<RetryPolicy>>,
    pub require_tls: RequireTls,
    pub cors: Option<Arc<CorsPolicy>>,
    pub include_request_attempt_count: bool,
    pub include_attempt_count_in_response: bool,
    /// Candidate lookup for large route tables.
    #[serde(skip)]
    pub index: RouteIndex,
}

pub use crate::route_index::RouteIndex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RequireTls {
    None,
    ExternalOnly,
    All,
}

#[derive(Debug, Serialize)]
pub struct Route {
    /// Route name, or `<vhost>/<index>` when the CEC leaves it empty (for stats and logs).
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    pub action: RouteAction,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    pub cors: Option<Arc<CorsPolicy>>,
    /// `typed_per_filter_config` disabling filters on this route (e.g. grpc_web).
    pub disabled_filters: Vec<String>,
    pub decorator_operation: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub case_sensitive: bool,
    pub headers: Vec<HeaderMatcher>,
    pub query_parameters: Vec<QueryParameterMatcher>,
    /// `grpc: {}`: only requests with `content-type: application/grpc*`.
    pub grpc: bool,
    /// `runtime_fraction`: the route matches this fraction of requests.
    pub runtime_fraction: Option<Fraction>,
    /// `tls_context.presented`/`validated` requirements.
    pub tls_presented: Option<bool>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    Prefix(String),
    Path(String),
    /// Matches the whole path (without the query). Boxed to keep every route small.
    SafeRegex(Box<Pattern>),
    /// `/foo` matches `/foo`, `/foo/...`, `/foo?...`, not `/foobar`.
    PathSeparatedPrefix(String),
    /// `connect_matcher`: CONNECT requests only.
    Connect,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeaderMatcher {
    /// Lower-case header name; pseudo-headers (`:method`, `:authority`, `:path`, `:scheme`)
    /// are kept with their colon.
    pub name: String,
    pub spec: HeaderMatchSpec,
    pub invert_match: bool,
    pub treat_missing_header_as_empty: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderMatchSpec {
    /// `present_match: true/false`.
    Present(bool),
    String(StringMatcher),
    /// `range_match`: `start <= value < end`.
    Range {
        start: i64,
        end: i64,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct QueryParameterMatcher {
    pub name: String,
    /// `None` is `present_match: true`.
    pub string_match: Option<StringMatcher>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StringMatcher {
    pub kind: StringMatchKind,
    pub ignore_case: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatchKind {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    /// Boxed: a compiled pattern is large and most matchers are plain strings.
    SafeRegex(Box<Pattern>),
}

impl StringMatcher {
    pub fn matches(&self, value: &str) -> bool {
        match &self.kind {
            StringMatchKind::Exact(s) => {
                if self.ignore_case {
                    value.eq_ignore_ascii_case(s)
                } else {
                    value == s
                }
            }
            StringMatchKind::Prefix(s) => {
                value.len() >= s.len()
                    && if self.ignore_case {
                        value.as_bytes()[..s.len()].eq_ignore_ascii_case(s.as_bytes())
                    } else {
                        value.as_bytes().starts_with(s.as_bytes())
                    }
            }
            StringMatchKind::Suffix(s) => {
                value.len() >= s.len()
                    && if self.ignore_case {
                        value.as_bytes()[value.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
                    } else {
                        value.as_bytes().ends_with(s.as_bytes())
                    }
            }
            StringMatchKind::Contains(s) => {
                if self.ignore_case {
                    value.to_ascii_lowercase().contains(&s.to_ascii_lowercase())
                } else {
                    value.contains(s.as_str())
                }
            }
            // Envoy ignores `ignore_case` for regexes; so do we.
            StringMatchKind::SafeRegex(p) => p.full_match(value),
        }
    }
}

/// An RE2-compatible regex, validated at translation and compiled on first use.
///
/// Compilation is deferred because a route table can hold thousands of regexes, most of which
/// the route index never proposes for a given path (see [`RouteIndex`]): compiling each into
/// its own automaton up front cost about 20 KiB per regex and dominated the memory of large
/// configurations.
#[derive(Clone)]
pub struct Pattern {
    pub source: String,
    full: std::sync::OnceLock<Option<regex::Regex>>,
    find: std::sync::OnceLock<Option<regex::Regex>>,
}

/// A 1 MiB compiled-size cap keeps a hostile CEC from exhausting memory; Envoy has a similar
/// "max program size" guard.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl Pattern {
    /// Validates the syntax (RE2 subset: no backreferences or look-around).
    pub fn new(source: &str) -> Result<Pattern, String> {
        regex_syntax::ParserBuilder::new().nest_limit(100).build().parse(source).map_err(|e| e.to_string())?;
        Ok(Pattern { source: source.to_string(), full: std::sync::OnceLock::new(), find: std::sync::OnceLock::new() })
    }

    /// `None` only when the regex exceeds the compiled-size limit (the syntax was checked at
    /// translation); such a regex matches nothing.
    fn compile(src: &str) -> Option<regex::Regex> {
        regex::RegexBuilder::new(src).size_limit(REGEX_SIZE_LIMIT).build().ok()
    }

    /// `^(?:source)$`, for full-match uses.
    pub fn full(&self) -> Option<&regex::Regex> {
        self.full.get_or_init(|| Pattern::compile(&format!("^(?:{})$", self.source))).as_ref()
    }

    /// The unanchored regex, for rewrites that substitute every match.
    pub fn find(&self) -> Option<&regex::Regex> {
        self.find.get_or_init(|| Pattern::compile(&self.source)).as_ref()
    }

    pub fn full_match(&self, s: &str) -> bool {
        self.full().is_some_and(|r| r.is_match(s))
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.source)
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

/// `FractionalPercent`, normalised to parts per million.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Fraction {
    pub per_million: u32,
}

impl Fraction {
    pub const ALL: Fraction = Fraction { per_million: 1_000_000 };

    /// `sample` is uniform in [0, 1_000_000).
    pub fn hit(&self, sample: u32) -> bool {
        sample < self.per_million
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteAction {
    Forward(Box<ForwardAction>),
    // Boxed: a large table is mostly these, and the enum is as large as its largest variant.
    Redirect(Box<Redirect>),
    DirectResponse(Box<DirectResponse>),
}

#[derive(Debug, Serialize)]
pub struct ForwardAction {
    pub cluster: ClusterSpecifier,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<RegexRewrite>,
    pub host_rewrite: Option<HostRewrite>,
    /// Whole-request timeout; `None` disables it. Envoy's default is 15 s.
    pub timeout: Option<Duration>,
    /// Replaces the connection manager's `stream_idle_timeout`; `Some(0)` turns it off.
    pub idle_timeout: Option<Duration>,
    pub retry_policy: Option<Arc<RetryPolicy>>,
    pub request_mirror_policies: Vec<MirrorPolicy>,
    pub hash_policy: Vec<HashPolicy>,
    /// Replaces the connection manager's `max_stream_duration`; `Some(0)` turns it off.
    pub max_stream_duration: Option<Duration>,
    /// Cap for the `grpc-timeout` header; `Some(0)` means "no cap", `None` ignores the header.
    pub grpc_timeout_header_max: Option<Duration>,
    pub grpc_timeout_header_offset: Option<Duration>,
    pub upgrade_configs: Vec<UpgradeConfig>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterSpecifier {
    Cluster(String),
    Weighted(WeightedClusters),
    /// `cluster_header`: the cluster is named by a request header.
    Header(String),
}

impl ClusterSpecifier {
    /// Every cluster name this specifier can route to.
    pub fn cluster_names(&self) -> Vec<&str> {
        match self {
            ClusterSpecifier::Cluster(c) => vec![c.as_str()],
            ClusterSpecifier::Weighted(w) => w.clusters.iter().map(|c| c.name.as_str()).collect(),
            ClusterSpecifier::Header(_) => vec![],
        }
    }
}

#[derive(Debug, Serialize)]
pub struct WeightedClusters {
    pub clusters: Vec<WeightedCluster>,
    /// Sum of weights (or the explicit `total_weight`).
    pub total_weight: u32,
}

impl WeightedClusters {
    /// Picks a cluster for `sample` uniform in `[0, total_weight)`, as Envoy does: walk the
    /// cumulative weights in configuration order.
    pub fn pick(&self, sample: u32) -> Option<&WeightedCluster> {
        let mut acc = 0u64;
        for c in &self.clusters {
            acc += u64::from(c.weight);
            if u64::from(sample) < acc {
                return Some(c);
            }
        }
        None
    }
}

#[derive(Debug, Serialize)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    pub host_rewrite_literal: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RegexRewrite {
    pub pattern: Pattern,
    /// Substitution with `\1`-style backreferences already converted to `${1}`.
    pub substitution: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostRewrite {
    Literal(String),
    /// `auto_host_rewrite`: the upstream host's hostname/address.
    Auto,
    Header(String),
    PathRegex(RegexRewrite),
}

#[derive(Debug, Serialize)]
pub struct MirrorPolicy {
    pub cluster: String,
    pub fraction: Fraction,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashPolicy {
    Header { name: String, terminal: bool },
    Cookie { name: String, terminal: bool },
    SourceIp { terminal: bool },
    QueryParameter { name: String, terminal: bool },
}

#[derive(Debug, Serialize)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: PathRedirect,
    pub response_code: u16,
    pub strip_query: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathRedirect {
    Keep,
    /// `path_redirect`: replaces the path (and the query, if it carries one).
    Path(String),
    /// `prefix_rewrite`: replaces the matched prefix.
    Prefix(String),
    Regex(RegexRewrite),
}

#[derive(Debug, Serialize)]
pub struct DirectResponse {
    pub status: u16,
    #[serde(serialize_with = "ser_opt_bytes")]
    pub body: Option<bytes::Bytes>,
}

fn ser_opt_bytes<S: Serializer>(b: &Option<bytes::Bytes>, s: S) -> Result<S::Ok, S::Error> {
    match b {
        Some(b) => s.serialize_str(&String::from_utf8_lossy(b)),
        None => s.serialize_none(),
    }
}

// ---------------------------------------------------------------------------------------------
// Header mutation

/// Lower-case header name, validated as an HTTP token.
pub type HeaderName = String;

/// Headers to add and remove at one level (route config, virtual host, route, weighted
/// cluster). Most levels have none, and a large route table carries two per route, so the
/// lists live behind one pointer that is null when both are empty (8 bytes instead of 48).
#[derive(Debug, Clone, Default)]
pub struct HeaderMutations(Option<Box<MutationLists>>);

#[derive(Debug, Clone, Default, Serialize)]
struct MutationLists {
    add: Vec<HeaderAdd>,
    remove: Vec<HeaderName>,
}

impl HeaderMutations {
    pub fn new(add: Vec<HeaderAdd>, remove: Vec<HeaderName>) -> HeaderMutations {
        if add.is_empty() && remove.is_empty() {
            return HeaderMutations(None);
        }
        HeaderMutations(Some(Box::new(MutationLists { add, remove })))
    }

    pub fn add(&self) -> &[HeaderAdd] {
        self.0.as_ref().map_or(&[], |m| &m.add)
    }

    pub fn remove(&self) -> &[HeaderName] {
        self.0.as_ref().map_or(&[], |m| &m.remove)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

impl Serialize for HeaderMutations {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(m) => m.serialize(s),
            None => MutationLists::default().serialize(s),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HeaderAdd {
    pub name: HeaderName,
    pub value: HeaderValueTemplate,
    pub action: AppendAction,
    pub keep_empty_value: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

/// A header value with Envoy's `%VAR%` substitutions parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeaderValueTemplate {
    pub parts: Vec<TemplatePart>,
}

impl HeaderValueTemplate {
    pub fn literal(s: &str) -> Self {
        HeaderValueTemplate { parts: vec![TemplatePart::Literal(s.to_string())] }
    }

    /// The value when it has no variables.
    pub fn as_literal(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [] => Some(""),
            [TemplatePart::Literal(s)] => Some(s),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplatePart {
    Literal(String),
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamLocalAddress,
    DownstreamLocalAddressWithoutPort,
    DownstreamLocalPort,
    UpstreamRemoteAddress,
    Hostname,
    Protocol,
    StartTime,
    RequestedServerName,
    /// `%REQ(name)%`
    RequestHeader(String),
    /// `%CILIUM_GATEWAY_NAME%` etc. are substituted by Cilium's operator; we keep them literal.
    Other(String),
}

// ---------------------------------------------------------------------------------------------
// Retries and CORS

#[derive(Debug, Serialize)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub per_try_idle_timeout: Option<Duration>,
    pub retriable_status_codes: Vec<u16>,
    pub back_off_base: Duration,
    pub back_off_max: Duration,
    pub retriable_headers: Vec<HeaderMatcher>,
    pub retriable_request_headers: Vec<HeaderMatcher>,
    pub host_selection_retry_max_attempts: u32,
}

/// The set of `retry_on` conditions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub reset_before_request: bool,
    pub connect_failure: bool,
    pub envoy_ratelimited: bool,
    pub retriable_4xx: bool,
    pub refused_stream: bool,
    pub retriable_status_codes: bool,
    pub retriable_headers: bool,
    pub http3_post_connect_failure: bool,
    pub grpc_cancelled: bool,
    pub grpc_deadline_exceeded: bool,
    pub grpc_resource_exhausted: bool,
    pub grpc_unavailable: bool,
    pub grpc_internal: bool,
}

#[derive(Debug, Serialize)]
pub struct CorsPolicy {
    pub allow_origin: Vec<StringMatcher>,
    pub allow_methods: Option<String>,
    pub allow_headers: Option<String>,
    pub expose_headers: Option<String>,
    pub max_age: Option<String>,
    pub allow_credentials: bool,
    pub allow_private_network_access: bool,
    pub forward_not_matching_preflights: bool,
    pub filter_enabled: Option<Fraction>,
}

// ---------------------------------------------------------------------------------------------
// Clusters

#[derive(Debug, Serialize)]
pub struct Cluster {
    pub name: String,
    pub source: SourceName,
    pub discovery: Discovery,
    pub connect_timeout: Duration,
    pub lb_policy: LbPolicy,
    /// Resolved endpoints (STATIC/EDS: addresses; DNS: host names resolved at runtime).
    pub endpoints: Vec<Endpoint>,
    pub circuit_breakers: CircuitBreakers,
    pub outlier_detection: Option<OutlierDetection>,
    pub protocol: UpstreamProtocol,
    pub http2: Http2Options,
    pub idle_timeout: Option<Duration>,
    pub max_requests_per_connection: Option<u32>,
    pub max_connection_duration: Option<Duration>,
    pub tls: Option<Arc<UpstreamTls>>,
    pub dns_lookup_family: DnsLookupFamily,
    pub dns_refresh_rate: Duration,
    pub per_connection_buffer_limit_bytes: u32,
    pub healthy_panic_threshold: f64,
    pub close_connections_on_host_set_change: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Discovery {
    Static,
    /// EDS: `service_name` is the ClusterLoadAssignment the endpoints come from.
    Eds {
        service_name: String,
    },
    StrictDns,
    LogicalDns,
    /// Connect to the downstream connection's original destination (or a header).
    OriginalDst {
        http_header_name: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Endpoint {
    pub address: EndpointAddress,
    pub weight: u32,
    pub health: EndpointHealth,
    pub priority: u32,
    /// `endpoint.hostname`, used by `auto_host_rewrite`.
    pub hostname: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointAddress {
    Socket(SocketAddr),
    /// A DNS name, resolved by STRICT_DNS/LOGICAL_DNS clusters.
    Dns {
        host: String,
        port: u16,
    },
    /// `envoy_internal_address.server_listener_name` (qualified).
    Internal(String),
}

impl fmt::Display for EndpointAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointAddress::Socket(a) => write!(f, "{a}"),
            EndpointAddress::Dns { host, port } => write!(f, "{host}:{port}"),
            EndpointAddress::Internal(l) => write!(f, "internal:{l}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EndpointHealth {
    Unknown,
    Healthy,
    Unhealthy,
    Draining,
    Timeout,
    Degraded,
}

impl EndpointHealth {
    pub fn is_usable(self) -> bool {
        matches!(self, EndpointHealth::Unknown | EndpointHealth::Healthy | EndpointHealth::Degraded)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest { choice_count: u32 },
    Random,
    RingHash { minimum_ring_size: u64, maximum_ring_size: u64 },
    Maglev { table_size: u64 },
    ClusterProvided,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CircuitBreakers {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
    pub retry_budget: Option<RetryBudget>,
    /// True when the CEC set them; false for Sluice's defaults.
    pub explicit: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryBudget {
    pub budget_percent: f64,
    pub min_retry_concurrency: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutlierDetection {
    pub consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub consecutive_local_origin_failure: u32,
    pub enforcing_consecutive_5xx: u32,
    pub enforcing_consecutive_gateway_failure: u32,
    pub enforcing_consecutive_local_origin_failure: u32,
    pub split_external_local_origin_errors: bool,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub success_rate_minimum_hosts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// Same protocol as the downstream request (`use_downstream_protocol_config`); `h2` says
    /// whether h2 is allowed at all (an absent `http2_protocol_options` means h1 only).
    UseDownstream {
        h2: bool,
    },
    /// `auto_config`: ALPN with TLS, else HTTP/1.1.
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DnsLookupFamily {
    Auto,
    V4Only,
    V6Only,
    V4Preferred,
    All,
}

// ---------------------------------------------------------------------------------------------
// TLS and secrets

/// Bytes from a file (read by the certs crate, and watched), inline, or an environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    Filename(String),
    #[serde(serialize_with = "ser_redacted")]
    Inline(Vec<u8>),
    EnvironmentVariable(String),
}

fn ser_redacted<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("[{} bytes]", b.len()))
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Secret {
    TlsCertificate(TlsCertificate),
    ValidationContext(ValidationContext),
    SessionTicketKeys(Vec<DataSource>),
    Generic(DataSource),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct TlsCertificate {
    pub certificate_chain: DataSource,
    pub private_key: DataSource,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ValidationContext {
    pub trusted_ca: Option<DataSource>,
    pub match_subject_alt_names: Vec<SanMatcher>,
    pub crl: Option<DataSource>,
    pub allow_expired_certificate: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SanMatcher {
    pub san_type: SanType,
    #[serde(serialize_with = "ser_string_matcher")]
    pub matcher: StringMatcherCmp,
}

/// A [`StringMatcher`] that can be compared (for snapshot diffing).
#[derive(Debug, Clone)]
pub struct StringMatcherCmp(pub StringMatcher);

impl PartialEq for StringMatcherCmp {
    fn eq(&self, other: &Self) -> bool {
        format!("{:?}", self.0) == format!("{:?}", other.0)
    }
}

fn ser_string_matcher<S: Serializer>(m: &StringMatcherCmp, s: S) -> Result<S::Ok, S::Error> {
    m.0.serialize(s)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SanType {
    Dns,
    Uri,
    Email,
    IpAddress,
}

/// A certificate named in a TLS context: inline/file, or a reference to a [`Secret`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertificateRef {
    Inline(TlsCertificate),
    Sds(String),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValidationRef {
    Inline(ValidationContext),
    Sds(String),
    /// `combined_validation_context`: the SDS secret's CA plus inline matchers.
    Combined {
        default: ValidationContext,
        sds: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum TlsVersion {
    #[serde(rename = "TLSv1_0")]
    V1_0,
    #[serde(rename = "TLSv1_1")]
    V1_1,
    #[serde(rename = "TLSv1_2")]
    V1_2,
    #[serde(rename = "TLSv1_3")]
    V1_3,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TlsParams {
    /// Effective range after mapping to what rustls supports (TLS 1.2 and 1.3).
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
    /// Cipher suites in OpenSSL/BoringSSL spelling, already checked against rustls's list.
    pub cipher_suites: Vec<String>,
    pub ecdh_curves: Vec<String>,
}

impl Default for TlsParams {
    fn default() -> Self {
        TlsParams {
            min_version: TlsVersion::V1_2,
            max_version: TlsVersion::V1_3,
            cipher_suites: Vec::new(),
            ecdh_curves: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DownstreamTls {
    pub certificates: Vec<CertificateRef>,
    /// ALPN protocols, with Cilium's `"h2,http/1.1"` single-string form already split.
    pub alpn: Vec<String>,
    pub params: TlsParams,
    pub require_client_certificate: bool,
    pub validation: Option<ValidationRef>,
    pub session_ticket_keys: Option<SessionTickets>,
    pub disable_stateless_session_resumption: bool,
    pub disable_stateful_session_resumption: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionTickets {
    Inline(Vec<DataSource>),
    Sds(String),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpstreamTls {
    pub sni: Option<String>,
    pub certificates: Vec<CertificateRef>,
    pub validation: Option<ValidationRef>,
    pub alpn: Vec<String>,
    pub params: TlsParams,
    pub auto_sni: bool,
    pub auto_san_validation: bool,
}

// ---------------------------------------------------------------------------------------------
// Service redirects (what the eBPF fast path and Cilium's datapath redirect)

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceRedirect {
    /// `namespace/name` of the Kubernetes Service.
    pub service: String,
    pub source: SourceName,
    /// Frontend ports redirected; empty = all ports of the Service.
    pub ports: Vec<u16>,
    /// Qualified name of the listener the traffic goes to.
    pub listener: String,
    pub proxy_port: u16,
    /// The Service's cluster IPs and ports, if the Service object is known.
    pub frontends: Vec<SocketAddr>,
}
