//! `envoy.config.listener.v3.Listener`, its filter chains, and the two terminal network
//! filters Sluice implements: the HTTP connection manager and the TCP proxy.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::Cx;
use super::common::*;
use super::route::{route_configuration, upgrade_config};
use super::tls::{TransportSocket, transport_socket};
use crate::json::{Msg, Path, any};
use crate::model::*;

/// A decoded listener. `addresses` is empty when the CEC gives none (a port is allocated
/// later, when every listener is known).
pub struct ListenerDraft {
    pub listener: Listener,
    pub path: Path,
}

pub fn listener(cx: &mut Cx, m: Msg, source: &str) -> Option<ListenerDraft> {
    let path = m.path.clone();
    let raw = m.str(cx.sink, "name").unwrap_or_default();
    let name = cx.scope.qualify_forced(&raw);
    let mut addresses = Vec::new();
    if let Some((v, p)) = m.take("address") {
        let compat = v
            .pointer("/socket_address/ipv4_compat")
            .or_else(|| v.pointer("/socketAddress/ipv4Compat"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if let Some(am) = Msg::new(cx.sink, "Address", p.clone(), v)
            && let Some(sa) = socket_address(cx, am)
        {
            if sa.port() == 0 {
                cx.sink.error(p.as_str(), "a listener address needs a port (port_value)");
            }
            addresses.push(sa);
            // `[::]` with ipv4_compat also accepts IPv4; Sluice binds both explicitly.
            if compat && sa.ip().is_unspecified() && sa.is_ipv6() {
                addresses.push(std::net::SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), sa.port()));
            }
        }
    }
    for extra in m.msgs(cx.sink, "additional_addresses", "AdditionalAddress") {
        if let Some(a) = extra.msg(cx.sink, "address", "Address")
            && let Some(sa) = socket_address(cx, a)
        {
            addresses.push(sa);
        }
        extra.ignore(cx.sink, "socket_options", "socket options are not applied");
        extra.finish(cx.sink);
    }
    addresses.dedup();
    let internal = m.msg(cx.sink, "internal_listener", "InternalListenerConfig").map(|i| i.finish(cx.sink)).is_some();
    if internal && !addresses.is_empty() {
        cx.sink.error(path.as_str(), "an internal listener cannot have an address");
    }

    let mut proxy_protocol = false;
    let mut tls_inspector = false;
    for (v, p) in m.list(cx.sink, "listener_filters") {
        let Some(f) = Msg::new(cx.sink, "ListenerFilter", p.clone(), v) else {
            continue;
        };
        let fname = f.str(cx.sink, "name").unwrap_or_default();
        let typed = f.take("typed_config");
        f.skip("filter_disabled");
        f.finish(cx.sink);
        let ty = typed.and_then(|(v, p)| any(cx.sink, &p, v));
        let ty_name = ty.as_ref().map(|(t, _, _)| t.as_str()).unwrap_or("");
        match (fname.as_str(), ty_name) {
            (_, "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector")
            | ("envoy.filters.listener.tls_inspector", "") => {
                if let Some((_, val, vp)) = &ty
                    && let Some(ti) = Msg::new(cx.sink, "TlsInspector", vp.clone(), val)
                {
                    ti.skip("enable_ja3_fingerprinting");
                    ti.skip("enable_ja4_fingerprinting");
                    ti.skip("initial_read_buffer_size");
                    ti.finish(cx.sink);
                }
                tls_inspector = true;
            }
            (_, "envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol")
            | ("envoy.filters.listener.proxy_protocol", "") => {
                if let Some((_, val, vp)) = &ty
                    && let Some(pp) = Msg::new(cx.sink, "ProxyProtocol", vp.clone(), val)
                {
                    pp.unsupported(cx.sink, "rules", "TLV rules are not implemented");
                    pp.unsupported(cx.sink, "allow_requests_without_proxy_protocol", "not implemented");
                    pp.skip("pass_through_tlvs");
                    pp.skip("stat_prefix");
                    pp.reject_unless_default(cx.sink, "disallowed_versions", "not implemented");
                    pp.finish(cx.sink);
                }
                proxy_protocol = true;
            }
            (_, "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector")
            | ("envoy.filters.listener.http_inspector", "") => {
                // Sluice always detects HTTP/1 vs HTTP/2 itself.
            }
            (_, "envoy.extensions.filters.listener.original_dst.v3.OriginalDst")
            | ("envoy.filters.listener.original_dst", "") => {
                cx.sink.warning(p.as_str(), "original_dst listener filter: Sluice recovers the original destination from its fast path when enabled; ignored otherwise");
            }
            ("cilium.bpf_metadata", _) | (_, "cilium.BpfMetadata") => {
                cx.sink.warning(
                    p.as_str(),
                    "ignored cilium.bpf_metadata: Cilium's datapath metadata is not used by Sluice",
                );
            }
            (n, t) => {
                let what = if t.is_empty() { n } else { t };
                cx.sink.error(p.as_str(), format!("unsupported listener filter {what}"));
            }
        }
    }

    let tcp_keepalive = socket_options(cx, &m);
    let per_connection_buffer_limit_bytes = m.u32(cx.sink, "per_connection_buffer_limit_bytes").unwrap_or(1024 * 1024);

    let mut filter_chains = Vec::new();
    for (i, fc) in m.msgs(cx.sink, "filter_chains", "FilterChain").into_iter().enumerate() {
        if let Some(c) = filter_chain(cx, fc, &name, i, source) {
            filter_chains.push(c);
        }
    }
    let default_filter_chain = m
        .msg(cx.sink, "default_filter_chain", "FilterChain")
        .and_then(|fc| filter_chain(cx, fc, &name, usize::MAX, source));
    if filter_chains.is_empty() && default_filter_chain.is_none() && !cx.sink.has_errors() {
        // Cilium's parser tests contain listeners with no chains (only the redirect matters).
        cx.sink.warning(path.as_str(), "listener has no filter chains: connections to it are closed");
    }
    check_duplicate_matches(cx, &path, &filter_chains);

    m.skip("stat_prefix");
    m.skip("metadata");
    m.skip("traffic_direction");
    m.skip("drain_type");
    m.skip("enable_reuse_port");
    m.skip("reuse_port");
    m.skip("tcp_backlog_size");
    m.skip("connection_balance_config");
    m.skip("continue_on_listener_filters_timeout");
    m.skip("listener_filters_timeout");
    m.skip("max_connections_to_accept_per_socket_event");
    m.skip("ignore_global_conn_limit");
    m.skip("tcp_fast_open_queue_length");
    m.skip("enable_mptcp");
    m.skip("bind_to_port");
    m.ignore(cx.sink, "transparent", "transparent sockets are Cilium datapath specific");
    m.ignore(cx.sink, "freebind", "not applied");
    m.ignore(cx.sink, "use_original_dst", "not applied; see the fast path for original destinations");
    m.ignore(cx.sink, "access_log", "listener-level access logs are not implemented; use the connection manager's");
    m.unsupported(cx.sink, "udp_listener_config", "UDP listeners are not supported");
    m.unsupported(cx.sink, "api_listener", "API listeners are not supported");
    m.unsupported(
        cx.sink,
        "filter_chain_matcher",
        "the generic filter chain matcher is not implemented; use filter_chain_match",
    );
    m.finish(cx.sink);
    if name.is_empty() {
        cx.sink.error(path.as_str(), "listener without a name");
        return None;
    }
    Some(ListenerDraft {
        listener: Listener {
            name,
            source: source.to_string(),
            addresses,
            port_allocated: false,
            internal,
            proxy_protocol,
            tls_inspector,
            filter_chains,
            default_filter_chain,
            per_connection_buffer_limit_bytes,
            tcp_keepalive,
        },
        path,
    })
}

fn socket_options(cx: &mut Cx, m: &Msg) -> Option<TcpKeepalive> {
    let mut ka = TcpKeepalive::default();
    let mut enabled = false;
    for opt in m.msgs(cx.sink, "socket_options", "SocketOption") {
        opt.skip("description");
        opt.skip("state");
        opt.skip("type");
        let level = opt.i64(cx.sink, "level").unwrap_or(-1);
        let name = opt.i64(cx.sink, "name").unwrap_or(-1);
        let value = opt.i64(cx.sink, "int_value");
        let has_buf = opt.has("buf_value");
        opt.skip("buf_value");
        let path = opt.path.clone();
        opt.finish(cx.sink);
        let secs = |v: i64| Some(Duration::from_secs(v.max(1) as u64));
        match (level, name, value) {
            (1, 9, Some(v)) => enabled = v != 0,                 // SOL_SOCKET, SO_KEEPALIVE
            (6, 4, Some(v)) => ka.idle = secs(v),                // IPPROTO_TCP, TCP_KEEPIDLE
            (6, 5, Some(v)) => ka.interval = secs(v),            // TCP_KEEPINTVL
            (6, 6, Some(v)) => ka.count = Some(v.max(1) as u32), // TCP_KEEPCNT
            _ => {
                let what = if has_buf { "buffer-valued" } else { "integer" };
                cx.sink.warning(
                    path.as_str(),
                    format!(
                        "ignored {what} socket option level {level} name {name}: only TCP keepalive options are applied"
                    ),
                );
            }
        }
    }
    enabled.then_some(ka)
}

/// Envoy rejects listeners whose chains have identical matches.
fn check_duplicate_matches(cx: &mut Cx, path: &Path, chains: &[FilterChain]) {
    for (i, a) in chains.iter().enumerate() {
        for (j, b) in chains.iter().enumerate().skip(i + 1) {
            if a.matcher == b.matcher {
                cx.sink.error(
                    path.field("filter_chains").index(j).as_str(),
                    format!("filter chain has the same filter_chain_match as filter_chains[{i}]"),
                );
            }
        }
    }
}

fn filter_chain(cx: &mut Cx, m: Msg, listener: &str, index: usize, source: &str) -> Option<FilterChain> {
    let name = m
        .str(cx.sink, "name")
        .unwrap_or_else(|| if index == usize::MAX { "default".to_string() } else { format!("chain-{index}") });
    let matcher = m
        .msg(cx.sink, "filter_chain_match", "FilterChainMatch")
        .map(|fm| filter_chain_match(cx, fm))
        .unwrap_or_default();
    let mut tls = None;
    if let Some(ts) = m.msg(cx.sink, "transport_socket", "TransportSocket")
        && let Some(TransportSocket::Downstream(t)) = transport_socket(cx, ts, true)
    {
        tls = Some(Arc::new(t));
    }
    m.skip("metadata");
    m.skip("transport_socket_connect_timeout");
    m.unsupported(cx.sink, "use_proxy_proto", "use the proxy_protocol listener filter");
    m.unsupported(cx.sink, "on_demand_configuration", "not implemented");
    let mut terminal: Option<NetworkFilter> = None;
    let filters = m.list(cx.sink, "filters");
    let n = filters.len();
    for (i, (v, p)) in filters.into_iter().enumerate() {
        let Some(f) = Msg::new(cx.sink, "Filter", p.clone(), v) else {
            continue;
        };
        let fname = f.str(cx.sink, "name").unwrap_or_default();
        let typed = f.take("typed_config");
        f.unsupported(cx.sink, "config_discovery", "filter config discovery is not implemented");
        f.finish(cx.sink);
        let Some((tv, tp)) = typed else {
            cx.sink.error(p.as_str(), format!("network filter {fname} without typed_config"));
            continue;
        };
        let Some((ty, val, vp)) = any(cx.sink, &tp, tv) else {
            continue;
        };
        match ty.as_str() {
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager" => {
                if let Some(hm) = Msg::new(cx.sink, "HttpConnectionManager", vp, val)
                    && let Some(hcm) = http_connection_manager(cx, hm, listener, &name, source)
                {
                    terminal = Some(NetworkFilter::HttpConnectionManager(Arc::new(hcm)));
                }
                if i + 1 != n {
                    cx.sink.error(p.as_str(), "the HTTP connection manager must be the last network filter");
                }
            }
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy" => {
                if let Some(tm) = Msg::new(cx.sink, "TcpProxy", vp, val)
                    && let Some(tp) = tcp_proxy(cx, tm)
                {
                    terminal = Some(NetworkFilter::TcpProxy(Arc::new(tp)));
                }
                if i + 1 != n {
                    cx.sink.error(p.as_str(), "the TCP proxy must be the last network filter");
                }
            }
            "cilium.NetworkFilter" => {
                cx.sink.warning(
                    p.as_str(),
                    "ignored cilium.network: Cilium's L4 policy filter; policy stays with Cilium's datapath",
                );
            }
            other => cx.sink.error(p.as_str(), format!("unsupported network filter {other}")),
        }
    }
    let path = m.path.clone();
    m.finish(cx.sink);
    let Some(filter) = terminal else {
        if !cx.sink.has_errors() {
            cx.sink.error(path.as_str(), "filter chain has no http_connection_manager or tcp_proxy filter");
        }
        return None;
    };
    if matches!(filter, NetworkFilter::TcpProxy(_))
        && tls.is_none()
        && matcher.transport_protocol.as_deref() == Some("tls")
    {
        // TLS passthrough: the chain matches on SNI and forwards the bytes untouched.
    }
    Some(FilterChain { name, matcher, tls, filter })
}

fn filter_chain_match(cx: &mut Cx, m: Msg) -> FilterChainMatch {
    let mut fm = FilterChainMatch::default();
    let port_path = m.path.field("destination_port");
    if let Some(p) = m.u32(cx.sink, "destination_port") {
        if p == 0 || p > 65535 {
            cx.sink.error(port_path.as_str(), format!("destination_port {p} is out of range"));
        } else {
            fm.destination_port = Some(p as u16);
        }
    }
    fm.prefix_ranges = cidr_ranges(cx, &m, "prefix_ranges");
    fm.source_prefix_ranges = cidr_ranges(cx, &m, "source_prefix_ranges");
    m.unsupported(cx.sink, "direct_source_prefix_ranges", "not implemented");
    for (v, p) in m.list(cx.sink, "source_ports") {
        match crate::json::parse_u64(cx.sink, &p, v) {
            Some(n @ 1..=65535) => fm.source_ports.push(n as u16),
            Some(n) => cx.sink.error(p.as_str(), format!("source port {n} is out of range")),
            None => {}
        }
    }
    if let Some(st) =
        m.enumeration(cx.sink, "source_type", &[("ANY", 0u8), ("SAME_IP_OR_LOOPBACK", 1), ("EXTERNAL", 2)])
        && st != 0
    {
        cx.sink.error(m.path.field("source_type").as_str(), "source_type matching is not implemented");
    }
    fm.server_names = m.strs(cx.sink, "server_names").into_iter().map(|s| s.to_ascii_lowercase()).collect();
    fm.transport_protocol = m.str(cx.sink, "transport_protocol").filter(|s| !s.is_empty());
    if let Some(tp) = &fm.transport_protocol
        && tp != "raw_buffer"
        && tp != "tls"
    {
        cx.sink.error(
            m.path.field("transport_protocol").as_str(),
            format!("unsupported transport_protocol {tp:?} (raw_buffer or tls)"),
        );
    }
    fm.application_protocols = m.strs(cx.sink, "application_protocols");
    m.skip("address_suffix");
    m.skip("suffix_len");
    m.finish(cx.sink);
    fm
}

fn http_connection_manager(
    cx: &mut Cx,
    m: Msg,
    listener: &str,
    chain: &str,
    source: &str,
) -> Option<HttpConnectionManager> {
    let stat_prefix = m.str(cx.sink, "stat_prefix").unwrap_or_default();
    let codec_type = m
        .enumeration(
            cx.sink,
            "codec_type",
            &[
                ("AUTO", CodecType::Auto),
                ("HTTP1", CodecType::Http1),
                ("HTTP2", CodecType::Http2),
                ("HTTP3", CodecType::Http2),
            ],
        )
        .unwrap_or(CodecType::Auto);
    let (route_config_name, route_config) = match m.oneof(cx.sink, &["rds", "route_config", "scoped_routes"]) {
        Some("rds") => {
            let r = m.msg(cx.sink, "rds", "Rds")?;
            r.skip("config_source");
            let path = r.path.field("route_config_name");
            let name = r.str(cx.sink, "route_config_name").unwrap_or_default();
            r.finish(cx.sink);
            if name.is_empty() {
                cx.sink.error(path.as_str(), "rds without route_config_name");
                return None;
            }
            (cx.scope.qualify_forced(&name), None)
        }
        Some("route_config") => {
            let rc = m.msg(cx.sink, "route_config", "RouteConfiguration")?;
            let rc = route_configuration(cx, rc, source)?;
            let name = if rc.name.is_empty() { format!("{listener}/{chain}/inline") } else { rc.name.clone() };
            (name, Some(Arc::new(rc)))
        }
        Some(other) => {
            m.unsupported(cx.sink, other, "scoped routes are not implemented");
            return None;
        }
        None => {
            cx.sink.error(m.path.as_str(), "HTTP connection manager needs `rds` or `route_config`");
            return None;
        }
    };
    let http_filters = http_filters(cx, &m);

    let mut h2 = Http2Options::default();
    if let Some(o) = m.msg(cx.sink, "http2_protocol_options", "Http2ProtocolOptions") {
        h2 = super::cluster::http2_options(cx, o);
    }
    let accept_http_10 = m
        .msg(cx.sink, "http_protocol_options", "Http1ProtocolOptions")
        .map(|o| super::cluster::http1_options(cx, o))
        .unwrap_or(false);
    m.unsupported(cx.sink, "http3_protocol_options", "HTTP/3 is not implemented");

    let mut idle_timeout = Some(Duration::from_secs(3600));
    let mut max_connection_duration = None;
    let mut max_stream_duration = None;
    let mut max_requests_per_connection = None;
    let mut headers_with_underscores_action = HeadersWithUnderscoresAction::Allow;
    let mut max_headers_count = 100;
    if let Some(c) = m.msg(cx.sink, "common_http_protocol_options", "HttpProtocolOptions") {
        if c.has("idle_timeout") {
            idle_timeout = c.duration(cx.sink, "idle_timeout").filter(|d| !d.is_zero());
        }
        max_connection_duration = c.duration(cx.sink, "max_connection_duration").filter(|d| !d.is_zero());
        max_stream_duration = c.duration(cx.sink, "max_stream_duration").filter(|d| !d.is_zero());
        max_requests_per_connection = c.u32(cx.sink, "max_requests_per_connection").filter(|n| *n > 0);
        if let Some(n) = c.u32(cx.sink, "max_headers_count") {
            max_headers_count = n.max(1);
        }
        if let Some(a) = c.enumeration(
            cx.sink,
            "headers_with_underscores_action",
            &[
                ("ALLOW", HeadersWithUnderscoresAction::Allow),
                ("REJECT_REQUEST", HeadersWithUnderscoresAction::RejectRequest),
                ("DROP_HEADER", HeadersWithUnderscoresAction::DropHeader),
            ],
        ) {
            headers_with_underscores_action = a;
        }
        c.skip("max_response_headers_kb");
        c.finish(cx.sink);
    }

    let use_remote_address = m.bool_or(cx.sink, "use_remote_address", false);
    let xff_num_trusted_hops = m.u32(cx.sink, "xff_num_trusted_hops").unwrap_or(0);
    let skip_xff_append = m.bool_or(cx.sink, "skip_xff_append", false);
    let mut internal_address_cidrs = Vec::new();
    if let Some(ia) = m.msg(cx.sink, "internal_address_config", "InternalAddressConfig") {
        ia.skip("unix_sockets");
        internal_address_cidrs = cidr_ranges(cx, &ia, "cidr_ranges");
        ia.finish(cx.sink);
    }
    let generate_request_id = m.bool_or(cx.sink, "generate_request_id", true);
    let preserve_external_request_id = m.bool_or(cx.sink, "preserve_external_request_id", false);
    let always_set_request_id_in_response = m.bool_or(cx.sink, "always_set_request_id_in_response", false);
    m.skip("request_id_extension");
    let stream_idle_timeout = timeout_field(cx, &m, "stream_idle_timeout", Some(Duration::from_secs(300)));
    let request_timeout = timeout_field(cx, &m, "request_timeout", None);
    let request_headers_timeout = timeout_field(cx, &m, "request_headers_timeout", None);
    let drain_timeout = m.duration(cx.sink, "drain_timeout").unwrap_or(Duration::from_secs(5));
    let delayed_close_timeout = m.duration(cx.sink, "delayed_close_timeout").unwrap_or(Duration::from_secs(1));
    let max_request_headers_kb = m.u32(cx.sink, "max_request_headers_kb").unwrap_or(60).clamp(1, 8192);
    let server_name = m.str(cx.sink, "server_name").unwrap_or_else(|| "envoy".to_string());
    let server_header_transformation = m
        .enumeration(
            cx.sink,
            "server_header_transformation",
            &[
                ("OVERWRITE", ServerHeaderTransformation::Overwrite),
                ("APPEND_IF_ABSENT", ServerHeaderTransformation::AppendIfAbsent),
                ("PASS_THROUGH", ServerHeaderTransformation::PassThrough),
            ],
        )
        .unwrap_or(ServerHeaderTransformation::Overwrite);
    let normalize_path = m.bool_or(cx.sink, "normalize_path", false);
    let merge_slashes = m.bool_or(cx.sink, "merge_slashes", false);
    let path_with_escaped_slashes_action = m
        .enumeration(
            cx.sink,
            "path_with_escaped_slashes_action",
            &[
                ("IMPLEMENTATION_SPECIFIC_DEFAULT", PathWithEscapedSlashesAction::KeepUnchanged),
                ("KEEP_UNCHANGED", PathWithEscapedSlashesAction::KeepUnchanged),
                ("REJECT_REQUEST", PathWithEscapedSlashesAction::RejectRequest),
                ("UNESCAPE_AND_REDIRECT", PathWithEscapedSlashesAction::UnescapeAndRedirect),
                ("UNESCAPE_AND_FORWARD", PathWithEscapedSlashesAction::UnescapeAndForward),
            ],
        )
        .unwrap_or(PathWithEscapedSlashesAction::KeepUnchanged);
    let strip_matching_host_port = m.bool_or(cx.sink, "strip_matching_host_port", false);
    let strip_any_host_port = m.bool_or(cx.sink, "strip_any_host_port", false);
    let mut upgrade_configs = Vec::new();
    for u in m.msgs(cx.sink, "upgrade_configs", "UpgradeConfig") {
        if let Some(uc) = upgrade_config(cx, u) {
            upgrade_configs.push(uc);
        }
    }
    let access_log = access_logs(cx, &m);
    let tracing = m.msg(cx.sink, "tracing", "Tracing").and_then(|t| tracing_config(cx, t));
    let via = m.str(cx.sink, "via").filter(|s| !s.is_empty());

    m.skip("stat_prefix");
    m.skip("generate_request_id");
    m.skip("add_user_agent");
    m.skip("proxy_status_config");
    m.skip("represent_ipv4_remote_address_as_ipv4_mapped_ipv6");
    m.skip("append_x_forwarded_port");
    m.skip("append_local_overload");
    m.skip("access_log_options");
    m.skip("local_reply_config_disabled");
    m.unsupported(cx.sink, "local_reply_config", "custom local replies are not implemented");
    m.unsupported(cx.sink, "forward_client_cert_details", "XFCC handling is not implemented");
    m.unsupported(cx.sink, "set_current_client_cert_details", "XFCC handling is not implemented");
    m.unsupported(cx.sink, "original_ip_detection_extensions", "custom client IP detection is not implemented");
    m.unsupported(cx.sink, "early_header_mutation_extensions", "early header mutations are not implemented");
    m.unsupported(cx.sink, "scheme_header_transformation", "not implemented");
    m.unsupported(cx.sink, "strip_trailing_host_dot", "not implemented");
    m.unsupported(cx.sink, "typed_header_validation_config", "not implemented");
    m.skip("user_agent");
    m.skip("server_header_transformation");
    m.finish(cx.sink);

    Some(HttpConnectionManager {
        stat_prefix,
        codec_type,
        route_config_name,
        route_config,
        http_filters,
        use_remote_address,
        xff_num_trusted_hops,
        skip_xff_append,
        internal_address_cidrs,
        generate_request_id,
        preserve_external_request_id,
        always_set_request_id_in_response,
        stream_idle_timeout,
        request_timeout,
        request_headers_timeout,
        idle_timeout,
        max_connection_duration,
        max_stream_duration,
        max_requests_per_connection,
        max_request_headers_kb,
        max_headers_count,
        headers_with_underscores_action,
        server_name,
        server_header_transformation,
        normalize_path,
        merge_slashes,
        path_with_escaped_slashes_action,
        strip_matching_host_port,
        strip_any_host_port,
        upgrade_configs,
        http2: h2,
        accept_http_10,
        access_log,
        tracing,
        drain_timeout,
        delayed_close_timeout,
        via,
    })
}

fn timeout_field(cx: &mut Cx, m: &Msg, name: &str, default: Option<Duration>) -> Option<Duration> {
    if !m.has(name) {
        m.skip(name);
        return default;
    }
    m.duration(cx.sink, name).filter(|d| !d.is_zero())
}

const ROUTER: &str = "envoy.extensions.filters.http.router.v3.Router";

fn http_filters(cx: &mut Cx, m: &Msg) -> Vec<HttpFilter> {
    let mut out = Vec::new();
    let list = m.list(cx.sink, "http_filters");
    let n = list.len();
    for (i, (v, p)) in list.into_iter().enumerate() {
        let Some(f) = Msg::new(cx.sink, "HttpFilter", p.clone(), v) else {
            continue;
        };
        let name = f.str(cx.sink, "name").unwrap_or_default();
        let typed = f.take("typed_config");
        let optional = f.bool_or(cx.sink, "is_optional", false);
        let disabled = f.bool_or(cx.sink, "disabled", false);
        f.unsupported(cx.sink, "config_discovery", "filter config discovery is not implemented");
        f.finish(cx.sink);
        if disabled {
            // Disabled by default and enabled per route: Sluice has no per-route enabling.
            cx.sink.warning(p.as_str(), format!("HTTP filter {name} is disabled by default and is skipped"));
            continue;
        }
        let decoded = typed.and_then(|(tv, tp)| any(cx.sink, &tp, tv));
        // Old CECs name the router without a typed_config.
        let ty = match &decoded {
            Some((t, _, _)) => t.clone(),
            None if matches!(name.as_str(), "envoy.filters.http.router" | "envoy.router") => ROUTER.to_string(),
            None => String::new(),
        };
        let body = decoded.as_ref().and_then(|(t, val, vp)| Msg::new(cx.sink, leak_ty(t), vp.clone(), val));
        let filter = match ty.as_str() {
            ROUTER => {
                let (mut suppress, mut child_span) = (false, false);
                if let Some(b) = body {
                    suppress = b.bool_or(cx.sink, "suppress_envoy_headers", false);
                    child_span = b.bool_or(cx.sink, "start_child_span", false);
                    b.skip("dynamic_stats");
                    b.skip("upstream_log");
                    b.skip("upstream_log_options");
                    b.skip("respect_expected_rq_timeout");
                    b.skip("suppress_grpc_request_failure_code_stats");
                    b.skip("strict_check_headers");
                    b.skip("upstream_http_filters");
                    b.finish(cx.sink);
                }
                if i + 1 != n {
                    cx.sink.error(p.as_str(), "the router must be the last HTTP filter");
                }
                Some(HttpFilter::Router { suppress_envoy_headers: suppress, start_child_span: child_span })
            }
            "envoy.extensions.filters.http.grpc_web.v3.GrpcWeb" => {
                if let Some(b) = body {
                    b.skip("cors");
                    b.finish(cx.sink);
                }
                Some(HttpFilter::GrpcWeb)
            }
            "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig" => {
                let (mut all, mut upstream) = (true, false);
                if let Some(b) = body {
                    b.skip("emit_filter_state");
                    upstream = b.bool_or(cx.sink, "enable_upstream_stats", false);
                    if b.has("stats_for_all_methods") {
                        all = b.bool_or(cx.sink, "stats_for_all_methods", true);
                    }
                    b.ignore(
                        cx.sink,
                        "individual_method_stats_allowlist",
                        "per-method allowlists are not implemented; all methods are counted",
                    );
                    b.skip("replace_dots_in_grpc_service_name");
                    b.finish(cx.sink);
                }
                Some(HttpFilter::GrpcStats { stats_for_all_methods: all, enable_upstream_stats: upstream })
            }
            "envoy.extensions.filters.http.cors.v3.Cors" => {
                if let Some(b) = body {
                    b.finish(cx.sink);
                }
                Some(HttpFilter::Cors)
            }
            "envoy.extensions.filters.http.health_check.v3.HealthCheck" => body.map(|b| {
                let pass_through_mode = b.bool_or(cx.sink, "pass_through_mode", false);
                let headers = header_matchers(cx, &b, "headers");
                let mut pct = std::collections::BTreeMap::new();
                if let Some((v, path)) = b.take("cluster_min_healthy_percentages")
                    && let Some(map) = v.as_object()
                {
                    for (k, val) in map {
                        let c = cx.scope.qualify(k);
                        let pv = val.get("value").unwrap_or(val);
                        if let Some(f) = crate::json::parse_f64(cx.sink, &path.key(k), pv) {
                            cx.refs.clusters.push((c.clone(), path.key(k).to_string()));
                            pct.insert(c, f);
                        }
                    }
                }
                b.ignore(cx.sink, "cache_time", "health responses are not cached");
                b.finish(cx.sink);
                HttpFilter::HealthCheck(HealthCheckFilter {
                    pass_through_mode,
                    headers,
                    cluster_min_healthy_percentages: pct,
                })
            }),
            "cilium.L7Policy" => {
                if let Some(b) = body {
                    b.skip("access_log_path");
                    b.skip("denied_403_body");
                    b.finish(cx.sink);
                }
                cx.sink.warning(
                    p.as_str(),
                    "ignored cilium.l7policy: Cilium L7 policy is enforced by Cilium, not by Sluice",
                );
                None
            }
            other => {
                if let Some(b) = body {
                    // Consume silently: the filter itself is what we report.
                    drop(b);
                }
                let what = if other.is_empty() { name.clone() } else { format!("{name} ({other})") };
                if optional {
                    cx.sink.warning(p.as_str(), format!("skipped optional HTTP filter {what}: not implemented"));
                } else {
                    cx.sink.error(
                        p.as_str(),
                        format!(
                            "unsupported HTTP filter {}",
                            if name.is_empty() { other.to_string() } else { name.clone() }
                        ),
                    );
                }
                None
            }
        };
        if let Some(f) = filter {
            out.push(f);
        }
    }
    if !out.iter().any(|f| matches!(f, HttpFilter::Router { .. })) && !cx.sink.has_errors() {
        cx.sink.error(
            m.path.field("http_filters").as_str(),
            "the HTTP filter chain has no router (envoy.filters.http.router)",
        );
    }
    out
}

/// Message names for diagnostics must be `'static`; the handful we see are interned here.
fn leak_ty(t: &str) -> &'static str {
    match t.rsplit('.').next().unwrap_or("") {
        "Router" => "Router",
        "GrpcWeb" => "GrpcWeb",
        "FilterConfig" => "grpc_stats.FilterConfig",
        "Cors" => "Cors",
        "HealthCheck" => "HealthCheck",
        "L7Policy" => "cilium.L7Policy",
        _ => "HttpFilter",
    }
}

fn access_logs(cx: &mut Cx, m: &Msg) -> Vec<AccessLog> {
    let mut out = Vec::new();
    for al in m.msgs(cx.sink, "access_log", "AccessLog") {
        al.skip("name");
        al.unsupported(cx.sink, "filter", "access log filters are not implemented");
        let typed = al.take("typed_config");
        let path = al.path.clone();
        al.finish(cx.sink);
        let Some((v, p)) = typed else {
            cx.sink.error(path.as_str(), "access log without typed_config");
            continue;
        };
        let Some((ty, val, vp)) = any(cx.sink, &p, v) else {
            continue;
        };
        let (sink, tyname) = match ty.as_str() {
            "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog" => {
                (Some(AccessLogSink::Stdout), "StdoutAccessLog")
            }
            "envoy.extensions.access_loggers.stream.v3.StderrAccessLog" => {
                (Some(AccessLogSink::Stderr), "StderrAccessLog")
            }
            "envoy.extensions.access_loggers.file.v3.FileAccessLog" => (None, "FileAccessLog"),
            other => {
                cx.sink.warning(
                    path.as_str(),
                    format!("skipped access log {other}: only stdout, stderr and file loggers are implemented"),
                );
                continue;
            }
        };
        let Some(body) = Msg::new(cx.sink, tyname, vp, val) else {
            continue;
        };
        let sink = match sink {
            Some(s) => s,
            None => match body.str(cx.sink, "path") {
                Some(p) => AccessLogSink::File(p),
                None => {
                    cx.sink.error(body.path.as_str(), "file access log without a path");
                    body.finish(cx.sink);
                    continue;
                }
            },
        };
        let mut format = AccessLogFormat::Default;
        if let Some(s) = body.str(cx.sink, "format") {
            format = AccessLogFormat::Text(s);
        }
        if let Some((v, p)) = body.take("json_format") {
            match v.as_object() {
                Some(o) => format = AccessLogFormat::Json(o.clone()),
                None => cx.sink.error(p.as_str(), "json_format must be an object"),
            }
        }
        if let Some(lf) = body.msg(cx.sink, "log_format", "SubstitutionFormatString") {
            if let Some(s) = lf.str(cx.sink, "text_format") {
                format = AccessLogFormat::Text(s);
            }
            if let Some(src) = lf.msg(cx.sink, "text_format_source", "DataSource")
                && let Some(DataSource::Inline(b)) = data_source(cx, src)
            {
                format = AccessLogFormat::Text(String::from_utf8_lossy(&b).into_owned());
            }
            if let Some((v, p)) = lf.take("json_format") {
                match v.as_object() {
                    Some(o) => format = AccessLogFormat::Json(o.clone()),
                    None => cx.sink.error(p.as_str(), "json_format must be an object"),
                }
            }
            lf.skip("omit_empty_values");
            lf.skip("content_type");
            lf.skip("json_format_options");
            lf.ignore(cx.sink, "formatters", "formatter extensions are not implemented");
            lf.finish(cx.sink);
        }
        body.finish(cx.sink);
        out.push(AccessLog { sink, format });
    }
    out
}

fn tracing_config(cx: &mut Cx, m: Msg) -> Option<Tracing> {
    let mut t = Tracing {
        collector_cluster: None,
        service_name: None,
        random_sampling: 1.0,
        client_sampling: 1.0,
        overall_sampling: 1.0,
        spawn_upstream_span: m.bool_or(cx.sink, "spawn_upstream_span", false),
        custom_tags: Vec::new(),
    };
    if let Some(p) = percent(cx, &m, "random_sampling") {
        t.random_sampling = p;
    }
    if let Some(p) = percent(cx, &m, "client_sampling") {
        t.client_sampling = p;
    }
    if let Some(p) = percent(cx, &m, "overall_sampling") {
        t.overall_sampling = p;
    }
    for tag in m.msgs(cx.sink, "custom_tags", "CustomTag") {
        let name = tag.str(cx.sink, "tag").unwrap_or_default();
        if let Some(l) = tag.msg(cx.sink, "literal", "Literal") {
            let v = l.str(cx.sink, "value").unwrap_or_default();
            l.finish(cx.sink);
            t.custom_tags.push((name, v));
        }
        tag.ignore(cx.sink, "request_header", "only literal custom tags are implemented");
        tag.ignore(cx.sink, "environment", "only literal custom tags are implemented");
        tag.ignore(cx.sink, "metadata", "only literal custom tags are implemented");
        tag.finish(cx.sink);
    }
    m.skip("verbose");
    m.skip("max_path_tag_length");
    m.skip("operation");
    if let Some(p) = m.msg(cx.sink, "provider", "Tracing.Http") {
        let name = p.str(cx.sink, "name").unwrap_or_default();
        let typed = p.take("typed_config");
        let ppath = p.path.clone();
        p.finish(cx.sink);
        match typed.and_then(|(v, tp)| any(cx.sink, &tp, v)) {
            Some((ty, val, vp)) if ty == "envoy.config.trace.v3.OpenTelemetryConfig" => {
                let o = Msg::new(cx.sink, "OpenTelemetryConfig", vp, val)?;
                if let Some(g) = o.msg(cx.sink, "grpc_service", "GrpcService") {
                    if let Some(e) = g.msg(cx.sink, "envoy_grpc", "EnvoyGrpc") {
                        let c = e.str(cx.sink, "cluster_name").unwrap_or_default();
                        e.skip("authority");
                        e.finish(cx.sink);
                        // Not qualified by Cilium: users write the full cluster name.
                        cx.refs.clusters.push((c.clone(), g.path.field("envoy_grpc").to_string()));
                        t.collector_cluster = Some(c);
                    }
                    g.skip("timeout");
                    g.ignore(cx.sink, "initial_metadata", "not sent");
                    g.unsupported(cx.sink, "google_grpc", "use envoy_grpc with a cluster");
                    g.finish(cx.sink);
                }
                if let Some(h) = o.msg(cx.sink, "http_service", "HttpService") {
                    if let Some(u) = h.msg(cx.sink, "http_uri", "HttpUri") {
                        u.skip("uri");
                        u.skip("timeout");
                        let c = u.str(cx.sink, "cluster").unwrap_or_default();
                        cx.refs.clusters.push((c.clone(), u.path.field("cluster").to_string()));
                        t.collector_cluster = Some(c);
                        u.finish(cx.sink);
                    }
                    h.ignore(cx.sink, "request_headers_to_add", "not sent");
                    h.finish(cx.sink);
                }
                t.service_name = o.str(cx.sink, "service_name").filter(|s| !s.is_empty());
                o.ignore(cx.sink, "resource_detectors", "the node-level resource is used");
                o.ignore(cx.sink, "sampler", "the node-level sampler and random_sampling are used");
                o.skip("max_cache_size");
                o.finish(cx.sink);
            }
            Some((ty, _, _)) => cx
                .sink
                .error(ppath.as_str(), format!("unsupported tracer {ty} ({name}); only envoy.tracers.opentelemetry")),
            None => cx.sink.error(ppath.as_str(), format!("tracer {name} without typed_config")),
        }
    }
    m.finish(cx.sink);
    Some(t)
}

fn tcp_proxy(cx: &mut Cx, m: Msg) -> Option<TcpProxy> {
    let stat_prefix = m.str(cx.sink, "stat_prefix").unwrap_or_default();
    let cluster = match m.oneof(cx.sink, &["cluster", "weighted_clusters"]) {
        Some("cluster") => {
            let path = m.path.field("cluster");
            let c = cx.scope.qualify(&m.str(cx.sink, "cluster")?);
            cx.refs.clusters.push((c.clone(), path.to_string()));
            ClusterSpecifier::Cluster(c)
        }
        Some("weighted_clusters") => {
            let w = m.msg(cx.sink, "weighted_clusters", "WeightedCluster")?;
            let mut clusters = Vec::new();
            for c in w.msgs(cx.sink, "clusters", "ClusterWeight") {
                let path = c.path.field("name");
                let name = cx.scope.qualify(&c.str(cx.sink, "name").unwrap_or_default());
                let weight = c.u32(cx.sink, "weight").unwrap_or(0);
                c.unsupported(cx.sink, "metadata_match", "not implemented");
                c.finish(cx.sink);
                cx.refs.clusters.push((name.clone(), path.to_string()));
                clusters.push(WeightedCluster {
                    name,
                    weight,
                    request_headers: HeaderMutations::default(),
                    response_headers: HeaderMutations::default(),
                    host_rewrite_literal: None,
                });
            }
            w.finish(cx.sink);
            let total: u64 = clusters.iter().map(|c| u64::from(c.weight)).sum();
            if clusters.is_empty() || total == 0 || total > u64::from(u32::MAX) {
                cx.sink.error(m.path.field("weighted_clusters").as_str(), "weighted clusters need positive weights");
                return None;
            }
            ClusterSpecifier::Weighted(WeightedClusters { clusters, total_weight: total as u32 })
        }
        _ => {
            cx.sink.error(m.path.as_str(), "tcp_proxy needs `cluster` or `weighted_clusters`");
            return None;
        }
    };
    let idle_timeout = timeout_field(cx, &m, "idle_timeout", Some(Duration::from_secs(3600)));
    let max_connect_attempts = m.u32(cx.sink, "max_connect_attempts").unwrap_or(1).max(1);
    let tunneling = m.msg(cx.sink, "tunneling_config", "TunnelingConfig").and_then(|t| {
        let hpath = t.path.field("hostname");
        let hostname = t.str(cx.sink, "hostname").unwrap_or_default();
        let use_post = t.bool_or(cx.sink, "use_post", false);
        let mut headers_to_add = Vec::new();
        for h in t.msgs(cx.sink, "headers_to_add", "HeaderValueOption") {
            if let Some(a) = header_value_option(cx, h) {
                headers_to_add.push(a);
            }
        }
        t.skip("propagate_response_headers");
        t.skip("propagate_response_trailers");
        t.skip("post_path");
        t.skip("request_id_extension");
        t.finish(cx.sink);
        let hostname = header_template(cx, &hpath, &hostname)?;
        Some(TunnelingConfig { hostname, use_post, headers_to_add })
    });
    let access_log = access_logs(cx, &m);
    m.skip("access_log_options");
    m.skip("access_log_flush_interval");
    m.skip("flush_access_log_on_connected");
    m.skip("max_downstream_connection_duration");
    m.ignore(
        cx.sink,
        "hash_policy",
        "hash-based selection for TCP is not implemented; the cluster's lb_policy applies",
    );
    m.unsupported(cx.sink, "metadata_match", "subset load balancing is not implemented");
    m.unsupported(cx.sink, "on_demand", "not implemented");
    m.skip("upstream_connect_mode");
    m.skip("backoff_options");
    m.finish(cx.sink);
    Some(TcpProxy { stat_prefix, cluster, idle_timeout, max_connect_attempts, tunneling, access_log })
}
