//! `envoy.config.cluster.v3.Cluster` and `envoy.config.endpoint.v3.ClusterLoadAssignment`.

use std::sync::Arc;
use std::time::Duration;

use super::Cx;
use super::common::*;
use super::tls::{TransportSocket, transport_socket};
use crate::json::{Msg, any};
use crate::model::*;

/// Sluice's circuit-breaker defaults for clusters that set none.
///
/// Cilium fills in 1024 connections / requests / pending requests and 128 retries, and its
/// users run into `503 overflow` with WebSockets and long-lived streams (cilium#21814,
/// #43532). Sluice's limits are sized for a node proxy instead, and retry amplification is
/// bounded by a retry budget (20 % of active requests, at least 3 concurrent retries — Envoy's
/// budget defaults) rather than by a small absolute number.
pub fn default_circuit_breakers() -> CircuitBreakers {
    CircuitBreakers {
        max_connections: 16_384,
        max_pending_requests: 16_384,
        max_requests: 16_384,
        max_retries: 1_024,
        retry_budget: Some(RetryBudget { budget_percent: 20.0, min_retry_concurrency: 3 }),
        explicit: false,
    }
}

/// Decodes a cluster. The flag says whether the cluster chose its upstream protocol itself
/// (Cilium fills one in for CECs that redirect Services when it did not).
pub fn cluster(cx: &mut Cx, m: Msg, source: &str) -> Option<(Cluster, bool)> {
    let raw = m.str(cx.sink, "name").unwrap_or_default();
    let name = cx.scope.qualify(&raw);
    let type_path = m.path.field("type");
    let ty = m
        .enumeration(
            cx.sink,
            "type",
            &[("STATIC", 0u8), ("STRICT_DNS", 1), ("LOGICAL_DNS", 2), ("EDS", 3), ("ORIGINAL_DST", 4)],
        )
        .unwrap_or(0);
    m.unsupported(
        cx.sink,
        "cluster_type",
        "custom cluster types (aggregate, dynamic_forward_proxy, ...) are not implemented",
    );
    let mut service_name = None;
    if let Some(eds) = m.msg(cx.sink, "eds_cluster_config", "EdsClusterConfig") {
        // The EDS config source is always the control plane that gave us the CEC.
        eds.skip("eds_config");
        service_name = eds.str(cx.sink, "service_name").filter(|s| !s.is_empty());
        eds.finish(cx.sink);
    }
    let connect_timeout = match m.duration(cx.sink, "connect_timeout") {
        Some(d) if !d.is_zero() => d,
        Some(_) => {
            cx.sink.error(m.path.field("connect_timeout").as_str(), "connect_timeout must be greater than zero");
            Duration::from_secs(5)
        }
        None => Duration::from_secs(5),
    };
    let per_connection_buffer_limit_bytes = m.u32(cx.sink, "per_connection_buffer_limit_bytes").unwrap_or(1024 * 1024);
    let lb_path = m.path.field("lb_policy");
    let lb = m
        .enumeration(
            cx.sink,
            "lb_policy",
            &[
                ("ROUND_ROBIN", 0u8),
                ("LEAST_REQUEST", 1),
                ("RING_HASH", 2),
                ("RANDOM", 3),
                ("MAGLEV", 5),
                ("CLUSTER_PROVIDED", 6),
                ("LOAD_BALANCING_POLICY_CONFIG", 7),
            ],
        )
        .unwrap_or(0);
    let mut lb_policy = match lb {
        1 => LbPolicy::LeastRequest { choice_count: 2 },
        2 => LbPolicy::RingHash { minimum_ring_size: 1024, maximum_ring_size: 8 * 1024 * 1024 },
        3 => LbPolicy::Random,
        5 => LbPolicy::Maglev { table_size: 65537 },
        6 => LbPolicy::ClusterProvided,
        7 => {
            cx.sink.error(lb_path.as_str(), "load_balancing_policy is not implemented; use lb_policy");
            LbPolicy::RoundRobin
        }
        _ => LbPolicy::RoundRobin,
    };
    if let Some(lr) = m.msg(cx.sink, "least_request_lb_config", "LeastRequestLbConfig") {
        if let LbPolicy::LeastRequest { choice_count } = &mut lb_policy {
            *choice_count = lr.u32(cx.sink, "choice_count").unwrap_or(2).max(2);
        }
        lr.ignore(cx.sink, "active_request_bias", "requests are weighted equally");
        lr.skip("slow_start_config");
        lr.finish(cx.sink);
    }
    if let Some(rh) = m.msg(cx.sink, "ring_hash_lb_config", "RingHashLbConfig") {
        if let LbPolicy::RingHash { minimum_ring_size, maximum_ring_size } = &mut lb_policy {
            *minimum_ring_size = rh.u64(cx.sink, "minimum_ring_size").unwrap_or(1024);
            *maximum_ring_size = rh.u64(cx.sink, "maximum_ring_size").unwrap_or(8 * 1024 * 1024);
        }
        rh.skip("hash_function");
        rh.finish(cx.sink);
    }
    if let Some(mg) = m.msg(cx.sink, "maglev_lb_config", "MaglevLbConfig") {
        if let LbPolicy::Maglev { table_size } = &mut lb_policy {
            *table_size = mg.u64(cx.sink, "table_size").unwrap_or(65537);
        }
        mg.finish(cx.sink);
    }
    let mut original_dst_header = None;
    if let Some(od) = m.msg(cx.sink, "original_dst_lb_config", "OriginalDstLbConfig") {
        if od.bool_or(cx.sink, "use_http_header", false) {
            original_dst_header = Some(
                od.str(cx.sink, "http_header_name")
                    .unwrap_or_else(|| "x-envoy-original-dst-host".into())
                    .to_ascii_lowercase(),
            );
        } else {
            od.skip("http_header_name");
        }
        od.unsupported(cx.sink, "upstream_port_override", "not implemented");
        od.unsupported(cx.sink, "metadata_key", "not implemented");
        od.finish(cx.sink);
    }

    let mut endpoints = Vec::new();
    if let Some(cla) = m.msg(cx.sink, "load_assignment", "ClusterLoadAssignment") {
        let (_, eps) = load_assignment(cx, cla, ty == 1 || ty == 2);
        endpoints = eps;
    }
    let discovery = match ty {
        0 => Discovery::Static,
        1 => Discovery::StrictDns,
        2 => Discovery::LogicalDns,
        3 => Discovery::Eds { service_name: service_name.clone().unwrap_or_else(|| name.clone()) },
        _ => Discovery::OriginalDst { http_header_name: original_dst_header },
    };
    if service_name.is_some() && ty != 3 {
        cx.sink.warning(type_path.as_str(), "eds_cluster_config is ignored: the cluster type is not EDS");
    }
    if matches!(discovery, Discovery::OriginalDst { .. }) != (lb_policy == LbPolicy::ClusterProvided) {
        if matches!(discovery, Discovery::OriginalDst { .. }) {
            // Envoy requires CLUSTER_PROVIDED for ORIGINAL_DST; we simply treat it as such.
            lb_policy = LbPolicy::ClusterProvided;
        } else {
            cx.sink.error(lb_path.as_str(), "CLUSTER_PROVIDED is only valid for ORIGINAL_DST clusters");
        }
    }
    if matches!(discovery, Discovery::LogicalDns) && endpoints.len() > 1 {
        cx.sink.error(m.path.field("load_assignment").as_str(), "a LOGICAL_DNS cluster takes exactly one endpoint");
    }

    let circuit_breakers = m
        .msg(cx.sink, "circuit_breakers", "CircuitBreakers")
        .map(|c| circuit_breakers(cx, c))
        .unwrap_or_else(default_circuit_breakers);
    let outlier_detection = m.msg(cx.sink, "outlier_detection", "OutlierDetection").map(|o| outlier_detection(cx, o));

    let mut proto = ProtocolOptions::default();
    // Deprecated cluster-level protocol options: present means "use this protocol".
    if let Some(h2) = m.msg(cx.sink, "http2_protocol_options", "Http2ProtocolOptions") {
        proto.protocol = Some(UpstreamProtocol::Http2);
        proto.http2 = http2_options(cx, h2);
    }
    if let Some(h1) = m.msg(cx.sink, "http_protocol_options", "Http1ProtocolOptions") {
        http1_options(cx, h1);
    }
    if let Some(c) = m.msg(cx.sink, "common_http_protocol_options", "HttpProtocolOptions") {
        common_http_options(cx, c, &mut proto);
    }
    if m.has("protocol_selection") {
        let sel = m.enumeration(
            cx.sink,
            "protocol_selection",
            &[("USE_CONFIGURED_PROTOCOL", false), ("USE_DOWNSTREAM_PROTOCOL", true)],
        );
        if sel == Some(true) {
            proto.protocol =
                Some(UpstreamProtocol::UseDownstream { h2: proto.protocol == Some(UpstreamProtocol::Http2) });
        }
    }
    if let Some(u) = m.msg(cx.sink, "upstream_http_protocol_options", "UpstreamHttpProtocolOptions") {
        upstream_http_options(cx, u, &mut proto);
    }
    if let Some((v, path)) = m.take("typed_extension_protocol_options") {
        match v.as_object() {
            Some(map) => {
                for (k, cfg) in map {
                    let p = path.key(k);
                    let Some((ty, val, vp)) = any(cx.sink, &p, cfg) else {
                        continue;
                    };
                    if ty == "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" {
                        if let Some(hm) = Msg::new(cx.sink, "HttpProtocolOptions", vp, val) {
                            http_protocol_options(cx, hm, &mut proto);
                        }
                    } else {
                        cx.sink.error(p.as_str(), format!("unsupported protocol options {ty}"));
                    }
                }
            }
            None => cx.sink.error(path.as_str(), "expected a map of extension name to options"),
        }
    }
    if m.has("max_requests_per_connection") {
        proto.max_requests_per_connection = m.u32(cx.sink, "max_requests_per_connection").filter(|n| *n > 0);
    }

    let mut tls = None;
    if let Some(ts) = m.msg(cx.sink, "transport_socket", "TransportSocket")
        && let Some(TransportSocket::Upstream(t)) = transport_socket(cx, ts, false)
    {
        tls = Some(Arc::new(t));
    }
    m.unsupported(cx.sink, "transport_socket_matches", "not implemented");

    let dns_lookup_family = m
        .enumeration(
            cx.sink,
            "dns_lookup_family",
            &[
                ("AUTO", DnsLookupFamily::Auto),
                ("V4_ONLY", DnsLookupFamily::V4Only),
                ("V6_ONLY", DnsLookupFamily::V6Only),
                ("V4_PREFERRED", DnsLookupFamily::V4Preferred),
                ("ALL", DnsLookupFamily::All),
            ],
        )
        .unwrap_or(DnsLookupFamily::Auto);
    let dns_refresh_rate = m.duration(cx.sink, "dns_refresh_rate").unwrap_or(Duration::from_secs(5));
    m.skip("respect_dns_ttl");
    m.skip("dns_jitter");
    m.ignore(cx.sink, "dns_resolvers", "the system resolver is used");
    m.ignore(cx.sink, "dns_resolution_config", "the system resolver is used");
    m.ignore(cx.sink, "typed_dns_resolver_config", "the system resolver is used");
    m.skip("use_tcp_for_dns_lookups");
    m.skip("wait_for_warm_on_init");
    let mut healthy_panic_threshold = 0.5;
    let mut close_connections_on_host_set_change = false;
    if let Some(c) = m.msg(cx.sink, "common_lb_config", "CommonLbConfig") {
        if let Some(p) = percent(cx, &c, "healthy_panic_threshold") {
            healthy_panic_threshold = p;
        }
        close_connections_on_host_set_change = c.bool_or(cx.sink, "close_connections_on_host_set_change", false);
        c.unsupported(cx.sink, "zone_aware_lb_config", "zone-aware routing is not implemented");
        c.unsupported(cx.sink, "locality_weighted_lb_config", "locality weights are not implemented");
        c.skip("update_merge_window");
        c.skip("ignore_new_hosts_until_first_hc");
        c.unsupported(cx.sink, "consistent_hashing_lb_config", "not implemented");
        c.skip("override_host_status");
        c.finish(cx.sink);
    }
    m.unsupported(cx.sink, "health_checks", "active health checking is not implemented (outlier detection is)");
    m.unsupported(cx.sink, "lb_subset_config", "subset load balancing is not implemented");
    m.unsupported(cx.sink, "load_balancing_policy", "typed load balancing policies are not implemented; use lb_policy");
    m.unsupported(cx.sink, "upstream_bind_config", "binding upstream sockets is not implemented");
    m.unsupported(cx.sink, "filters", "upstream network filters are not implemented");
    m.unsupported(cx.sink, "cluster_type", "custom cluster types are not implemented");
    m.ignore(
        cx.sink,
        "upstream_connection_options",
        "upstream TCP keepalive settings are not configurable; Sluice enables keepalive",
    );
    m.skip("metadata");
    m.skip("alt_stat_name");
    m.skip("track_cluster_stats");
    m.skip("track_timeout_budgets");
    m.skip("cleanup_interval");
    m.skip("preconnect_policy");
    m.skip("connection_pool_per_downstream_connection");
    m.skip("ignore_health_on_host_removal");
    m.finish(cx.sink);

    if name.is_empty() {
        cx.sink.error("", "cluster without a name");
        return None;
    }
    let explicit_protocol = proto.protocol.is_some();
    let (http2, protocol) = (proto.http2.clone(), proto.protocol.unwrap_or(UpstreamProtocol::Http1));
    Some((
        Cluster {
            name,
            source: source.to_string(),
            discovery,
            connect_timeout,
            lb_policy,
            endpoints,
            circuit_breakers,
            outlier_detection,
            protocol,
            http2,
            idle_timeout: proto.idle_timeout.unwrap_or(Some(Duration::from_secs(3600))),
            max_requests_per_connection: proto.max_requests_per_connection,
            max_connection_duration: proto.max_connection_duration,
            tls,
            dns_lookup_family,
            dns_refresh_rate,
            per_connection_buffer_limit_bytes,
            healthy_panic_threshold,
            close_connections_on_host_set_change,
        },
        explicit_protocol,
    ))
}

#[derive(Default)]
struct ProtocolOptions {
    protocol: Option<UpstreamProtocol>,
    http2: Http2Options,
    /// `Some(None)` = explicitly disabled.
    idle_timeout: Option<Option<Duration>>,
    max_requests_per_connection: Option<u32>,
    max_connection_duration: Option<Duration>,
}

/// `envoy.extensions.upstreams.http.v3.HttpProtocolOptions`.
fn http_protocol_options(cx: &mut Cx, m: Msg, proto: &mut ProtocolOptions) {
    if let Some(c) = m.msg(cx.sink, "common_http_protocol_options", "HttpProtocolOptions") {
        common_http_options(cx, c, proto);
    }
    if let Some(u) = m.msg(cx.sink, "upstream_http_protocol_options", "UpstreamHttpProtocolOptions") {
        upstream_http_options(cx, u, proto);
    }
    match m.oneof(cx.sink, &["explicit_http_config", "use_downstream_protocol_config", "auto_config"]) {
        Some("explicit_http_config") => {
            if let Some(e) = m.msg(cx.sink, "explicit_http_config", "ExplicitHttpConfig") {
                match e.oneof(cx.sink, &["http_protocol_options", "http2_protocol_options", "http3_protocol_options"]) {
                    Some("http2_protocol_options") => {
                        proto.protocol = Some(UpstreamProtocol::Http2);
                        if let Some(h2) = e.msg(cx.sink, "http2_protocol_options", "Http2ProtocolOptions") {
                            proto.http2 = http2_options(cx, h2);
                        }
                    }
                    Some("http3_protocol_options") => {
                        e.unsupported(cx.sink, "http3_protocol_options", "HTTP/3 upstreams are not implemented")
                    }
                    _ => {
                        proto.protocol = Some(UpstreamProtocol::Http1);
                        if let Some(h1) = e.msg(cx.sink, "http_protocol_options", "Http1ProtocolOptions") {
                            http1_options(cx, h1);
                        }
                    }
                }
                e.finish(cx.sink);
            }
        }
        Some("use_downstream_protocol_config") => {
            if let Some(d) = m.msg(cx.sink, "use_downstream_protocol_config", "UseDownstreamHttpConfig") {
                if let Some(h1) = d.msg(cx.sink, "http_protocol_options", "Http1ProtocolOptions") {
                    http1_options(cx, h1);
                }
                let h2 = d.msg(cx.sink, "http2_protocol_options", "Http2ProtocolOptions");
                let has_h2 = h2.is_some();
                if let Some(h2) = h2 {
                    proto.http2 = http2_options(cx, h2);
                }
                d.unsupported(cx.sink, "http3_protocol_options", "HTTP/3 upstreams are not implemented");
                d.finish(cx.sink);
                proto.protocol = Some(UpstreamProtocol::UseDownstream { h2: has_h2 });
            }
        }
        Some("auto_config") => {
            if let Some(a) = m.msg(cx.sink, "auto_config", "AutoHttpConfig") {
                if let Some(h1) = a.msg(cx.sink, "http_protocol_options", "Http1ProtocolOptions") {
                    http1_options(cx, h1);
                }
                if let Some(h2) = a.msg(cx.sink, "http2_protocol_options", "Http2ProtocolOptions") {
                    proto.http2 = http2_options(cx, h2);
                }
                a.unsupported(cx.sink, "http3_protocol_options", "HTTP/3 upstreams are not implemented");
                a.skip("alternate_protocols_cache_options");
                a.finish(cx.sink);
                proto.protocol = Some(UpstreamProtocol::Auto);
            }
        }
        _ => {}
    }
    for (v, p) in m.list(cx.sink, "http_filters") {
        let name = v.get("name").and_then(serde_json::Value::as_str).unwrap_or("");
        match name {
            "envoy.filters.http.upstream_codec" => {}
            "cilium.l7policy" => cx.sink.warning(
                p.as_str(),
                "ignored upstream filter cilium.l7policy: Cilium L7 policy is enforced by Cilium, not by Sluice",
            ),
            other => cx.sink.error(p.as_str(), format!("unsupported upstream HTTP filter {other}")),
        }
    }
    m.finish(cx.sink);
}

fn common_http_options(cx: &mut Cx, c: Msg, proto: &mut ProtocolOptions) {
    if c.has("idle_timeout") {
        proto.idle_timeout = Some(c.duration(cx.sink, "idle_timeout").filter(|d| !d.is_zero()));
    }
    proto.max_connection_duration = c.duration(cx.sink, "max_connection_duration").filter(|d| !d.is_zero());
    if let Some(n) = c.u32(cx.sink, "max_requests_per_connection") {
        proto.max_requests_per_connection = Some(n).filter(|n| *n > 0);
    }
    c.skip("max_headers_count");
    c.skip("max_response_headers_kb");
    c.ignore(cx.sink, "max_stream_duration", "upstream stream duration limits are not implemented; use route timeouts");
    c.skip("headers_with_underscores_action");
    c.skip("max_requests_per_connection");
    c.finish(cx.sink);
}

fn upstream_http_options(cx: &mut Cx, u: Msg, _proto: &mut ProtocolOptions) {
    u.ignore(cx.sink, "auto_sni", "set `sni` in the UpstreamTlsContext instead");
    u.ignore(cx.sink, "auto_san_validation", "set SAN matchers in the validation context instead");
    u.skip("override_auto_sni_header");
    u.finish(cx.sink);
}

pub fn http2_options(cx: &mut Cx, m: Msg) -> Http2Options {
    let mut o = Http2Options::default();
    if let Some(n) = m.u32(cx.sink, "max_concurrent_streams") {
        o.max_concurrent_streams = n.max(1);
    }
    if let Some(n) = m.u32(cx.sink, "initial_stream_window_size") {
        o.initial_stream_window_size = n.clamp(65_535, 2_147_483_647);
    }
    if let Some(n) = m.u32(cx.sink, "initial_connection_window_size") {
        o.initial_connection_window_size = n.clamp(65_535, 2_147_483_647);
    }
    o.allow_connect = m.bool_or(cx.sink, "allow_connect", false);
    for f in [
        "hpack_table_size",
        "max_outbound_frames",
        "max_outbound_control_frames",
        "max_consecutive_inbound_frames_with_empty_payload",
        "max_inbound_priority_frames_per_stream",
        "max_inbound_window_update_frames_per_data_frame_sent",
        "stream_error_on_invalid_http_messaging",
        "override_stream_error_on_invalid_http_message",
        "connection_keepalive",
        "allow_metadata",
        "use_oghttp2_codec",
        "max_metadata_size",
        "enable_huffman_encoding",
    ] {
        m.skip(f);
    }
    m.unsupported(cx.sink, "custom_settings_parameters", "not implemented");
    m.finish(cx.sink);
    o
}

pub fn http1_options(cx: &mut Cx, m: Msg) -> bool {
    let accept_http_10 = m.bool_or(cx.sink, "accept_http_10", false);
    m.skip("default_host_for_http_10");
    m.skip("allow_absolute_url");
    m.unsupported(cx.sink, "header_key_format", "header case preservation is not implemented");
    m.skip("enable_trailers");
    m.skip("allow_chunked_length");
    m.skip("override_stream_error_on_invalid_http_message");
    m.skip("send_fully_qualified_url");
    m.skip("use_balsa_parser");
    m.skip("allow_custom_methods");
    m.skip("ignore_http_11_upgrade");
    m.finish(cx.sink);
    accept_http_10
}

fn circuit_breakers(cx: &mut Cx, m: Msg) -> CircuitBreakers {
    // Envoy's defaults for a cluster that sets `circuit_breakers`: 1024/1024/1024 and 3 retries.
    let mut cb = CircuitBreakers {
        max_connections: 1024,
        max_pending_requests: 1024,
        max_requests: 1024,
        max_retries: 3,
        retry_budget: None,
        explicit: true,
    };
    for t in m.msgs(cx.sink, "thresholds", "Thresholds") {
        let prio = t.enumeration(cx.sink, "priority", &[("DEFAULT", 0u8), ("HIGH", 1)]).unwrap_or(0);
        if prio != 0 {
            // Sluice has one priority; HIGH thresholds never apply.
            t.skip("max_connections");
            t.skip("max_pending_requests");
            t.skip("max_requests");
            t.skip("max_retries");
            t.skip("retry_budget");
            t.skip("track_remaining");
            t.skip("max_connection_pools");
            cx.sink.warning(t.path.as_str(), "HIGH priority thresholds are ignored: Sluice routes have one priority");
            t.finish(cx.sink);
            continue;
        }
        if let Some(n) = t.u32(cx.sink, "max_connections") {
            cb.max_connections = n;
        }
        if let Some(n) = t.u32(cx.sink, "max_pending_requests") {
            cb.max_pending_requests = n;
        }
        if let Some(n) = t.u32(cx.sink, "max_requests") {
            cb.max_requests = n;
        }
        if let Some(n) = t.u32(cx.sink, "max_retries") {
            cb.max_retries = n;
        }
        if let Some(b) = t.msg(cx.sink, "retry_budget", "RetryBudget") {
            let budget_percent = percent(cx, &b, "budget_percent").map(|p| p * 100.0).unwrap_or(20.0);
            let min_retry_concurrency = b.u32(cx.sink, "min_retry_concurrency").unwrap_or(3);
            b.finish(cx.sink);
            cb.retry_budget = Some(RetryBudget { budget_percent, min_retry_concurrency });
        }
        t.skip("track_remaining");
        t.skip("max_connection_pools");
        t.finish(cx.sink);
    }
    m.unsupported(cx.sink, "per_host_thresholds", "per-host circuit breakers are not implemented");
    m.finish(cx.sink);
    cb
}

fn outlier_detection(cx: &mut Cx, m: Msg) -> OutlierDetection {
    let mut o = OutlierDetection {
        consecutive_5xx: m.u32(cx.sink, "consecutive_5xx").unwrap_or(5),
        consecutive_gateway_failure: m.u32(cx.sink, "consecutive_gateway_failure").unwrap_or(5),
        consecutive_local_origin_failure: m.u32(cx.sink, "consecutive_local_origin_failure").unwrap_or(5),
        enforcing_consecutive_5xx: m.u32(cx.sink, "enforcing_consecutive_5xx").unwrap_or(100).min(100),
        enforcing_consecutive_gateway_failure: m
            .u32(cx.sink, "enforcing_consecutive_gateway_failure")
            .unwrap_or(0)
            .min(100),
        enforcing_consecutive_local_origin_failure: m
            .u32(cx.sink, "enforcing_consecutive_local_origin_failure")
            .unwrap_or(100)
            .min(100),
        split_external_local_origin_errors: m.bool_or(cx.sink, "split_external_local_origin_errors", false),
        interval: m.duration(cx.sink, "interval").unwrap_or(Duration::from_secs(10)),
        base_ejection_time: m.duration(cx.sink, "base_ejection_time").unwrap_or(Duration::from_secs(30)),
        max_ejection_time: m.duration(cx.sink, "max_ejection_time").unwrap_or(Duration::from_secs(300)),
        max_ejection_percent: m.u32(cx.sink, "max_ejection_percent").unwrap_or(10).min(100),
        success_rate_minimum_hosts: m.u32(cx.sink, "success_rate_minimum_hosts").unwrap_or(5),
    };
    if o.max_ejection_time < o.base_ejection_time {
        o.max_ejection_time = o.base_ejection_time;
    }
    for f in [
        "success_rate_request_volume",
        "success_rate_stdev_factor",
        "enforcing_success_rate",
        "enforcing_local_origin_success_rate",
        "failure_percentage_threshold",
        "enforcing_failure_percentage",
        "enforcing_failure_percentage_local_origin",
        "failure_percentage_minimum_hosts",
        "failure_percentage_request_volume",
    ] {
        m.ignore(
            cx.sink,
            f,
            "success-rate and failure-percentage ejection are not implemented; consecutive-error ejection is",
        );
    }
    m.skip("max_ejection_time_jitter");
    m.skip("successful_active_health_check_uneject_host");
    m.skip("always_eject_one_host");
    m.unsupported(cx.sink, "monitors", "outlier detection monitors are not implemented");
    m.unsupported(cx.sink, "detect_degraded_hosts", "not implemented");
    m.finish(cx.sink);
    o
}

/// A `ClusterLoadAssignment` (standalone, or a cluster's `load_assignment`). DNS names are
/// allowed only for DNS clusters. Returns the qualified cluster name and the endpoints.
pub fn load_assignment(cx: &mut Cx, m: Msg, dns: bool) -> (String, Vec<Endpoint>) {
    let raw = m.str(cx.sink, "cluster_name").unwrap_or_default();
    let name = cx.scope.qualify(&raw);
    let mut out = Vec::new();
    for loc in m.msgs(cx.sink, "endpoints", "LocalityLbEndpoints") {
        loc.skip("locality");
        loc.skip("metadata");
        loc.skip("load_balancing_weight");
        loc.skip("proximity");
        let priority = loc.u32(cx.sink, "priority").unwrap_or(0);
        if priority > 0 {
            cx.sink.warning(
                loc.path.field("priority").as_str(),
                "endpoint priorities are flattened: all endpoints share one priority",
            );
        }
        for lb in loc.msgs(cx.sink, "lb_endpoints", "LbEndpoint") {
            let weight = lb.u32(cx.sink, "load_balancing_weight").unwrap_or(1).max(1);
            let health = lb
                .enumeration(
                    cx.sink,
                    "health_status",
                    &[
                        ("UNKNOWN", EndpointHealth::Unknown),
                        ("HEALTHY", EndpointHealth::Healthy),
                        ("UNHEALTHY", EndpointHealth::Unhealthy),
                        ("DRAINING", EndpointHealth::Draining),
                        ("TIMEOUT", EndpointHealth::Timeout),
                        ("DEGRADED", EndpointHealth::Degraded),
                    ],
                )
                .unwrap_or(EndpointHealth::Unknown);
            lb.skip("metadata");
            lb.unsupported(cx.sink, "endpoint_name", "named endpoints (LEDS) are not implemented");
            if let Some(ep) = lb.msg(cx.sink, "endpoint", "Endpoint") {
                let hostname = ep.str(cx.sink, "hostname");
                ep.skip("health_check_config");
                ep.ignore(cx.sink, "additional_addresses", "only the first address of an endpoint is used");
                if let Some(a) = ep.msg(cx.sink, "address", "Address") {
                    if let Some(address) = endpoint_address(cx, a, dns) {
                        out.push(Endpoint { address, weight, health, priority, hostname });
                    }
                } else {
                    cx.sink.error(ep.path.as_str(), "endpoint without an address");
                }
                ep.finish(cx.sink);
            }
            lb.finish(cx.sink);
        }
        loc.finish(cx.sink);
    }
    m.ignore(cx.sink, "named_endpoints", "named endpoints are not implemented");
    if let Some(p) = m.msg(cx.sink, "policy", "Policy") {
        p.ignore(cx.sink, "overprovisioning_factor", "priorities are flattened");
        p.ignore(cx.sink, "drop_overloads", "drop overloads are not implemented");
        p.skip("endpoint_stale_after");
        p.skip("weighted_priority_health");
        p.finish(cx.sink);
    }
    m.finish(cx.sink);
    (name, out)
}

fn endpoint_address(cx: &mut Cx, a: Msg, dns: bool) -> Option<EndpointAddress> {
    let out = match a.oneof(cx.sink, &["socket_address", "envoy_internal_address", "pipe"]) {
        Some("socket_address") => {
            let sa = a.msg(cx.sink, "socket_address", "SocketAddress")?;
            let path = sa.path.clone();
            let (host, port) = socket_address_inner(cx, sa)?;
            match host.parse::<std::net::IpAddr>() {
                Ok(ip) => Some(EndpointAddress::Socket(std::net::SocketAddr::new(ip, port))),
                Err(_) if dns => Some(EndpointAddress::Dns { host, port }),
                Err(_) => {
                    cx.sink.error(
                        path.as_str(),
                        format!("{host:?} is not an IP address; DNS names need a STRICT_DNS or LOGICAL_DNS cluster"),
                    );
                    None
                }
            }
        }
        Some("envoy_internal_address") => {
            let ia = a.msg(cx.sink, "envoy_internal_address", "EnvoyInternalAddress")?;
            let path = ia.path.field("server_listener_name");
            let listener = ia.str(cx.sink, "server_listener_name").map(|l| cx.scope.qualify(&l));
            ia.skip("endpoint_id");
            ia.finish(cx.sink);
            let listener = listener?;
            cx.refs.internal_listeners.push((listener.clone(), path.to_string()));
            Some(EndpointAddress::Internal(listener))
        }
        Some(other) => {
            a.unsupported(cx.sink, other, "unix pipes are not supported as endpoints");
            None
        }
        None => {
            cx.sink.error(a.path.as_str(), "endpoint address without socket_address");
            None
        }
    };
    a.finish(cx.sink);
    out
}
