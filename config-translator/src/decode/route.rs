//! `envoy.config.route.v3.RouteConfiguration` and everything inside it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::Cx;
use super::common::*;
use crate::json::{Msg, Path, any};
use crate::model::*;

pub fn route_configuration(cx: &mut Cx, m: Msg, source: &str) -> Option<RouteConfig> {
    let raw_name = m.str(cx.sink, "name").unwrap_or_default();
    let name = cx.scope.qualify_forced(&raw_name);
    let mut virtual_hosts = Vec::new();
    for vh in m.msgs(cx.sink, "virtual_hosts", "VirtualHost") {
        if let Some(v) = virtual_host(cx, vh) {
            virtual_hosts.push(Arc::new(v));
        }
    }
    let request_headers = header_mutations(cx, &m, "request_headers_to_add", "request_headers_to_remove");
    let response_headers = header_mutations(cx, &m, "response_headers_to_add", "response_headers_to_remove");
    let mut internal_only_headers = Vec::new();
    for (v, p) in m.list(cx.sink, "internal_only_headers") {
        if let Some(n) = v.as_str().and_then(|s| header_name(cx, &p, s)) {
            internal_only_headers.push(n);
        }
    }
    let most_specific_header_mutations_wins = m.bool_or(cx.sink, "most_specific_header_mutations_wins", false);
    let ignore_port_in_host_matching = m.bool_or(cx.sink, "ignore_port_in_host_matching", false);
    m.skip("validate_clusters");
    m.skip("max_direct_response_body_size_bytes");
    m.skip("metadata");
    m.unsupported(cx.sink, "vhds", "on-demand virtual host discovery is not implemented");
    m.unsupported(cx.sink, "cluster_specifier_plugins", "cluster specifier plugins are not implemented");
    m.reject_unless_default(
        cx.sink,
        "typed_per_filter_config",
        "route-configuration-level filter configuration is not implemented",
    );
    m.reject_unless_default(
        cx.sink,
        "request_mirror_policies",
        "route-configuration-level mirroring is not implemented; set it on routes",
    );
    m.reject_unless_default(cx.sink, "ignore_path_parameters_in_path_matching", "not implemented");
    let path = m.path.clone();
    m.finish(cx.sink);

    let vhost_index = build_vhost_index(cx, &path, &virtual_hosts);
    Some(RouteConfig {
        name,
        source: source.to_string(),
        virtual_hosts,
        vhost_index,
        request_headers,
        response_headers,
        internal_only_headers,
        most_specific_header_mutations_wins,
        ignore_port_in_host_matching,
    })
}

/// Domains are unique across a route configuration (Envoy rejects duplicates).
fn build_vhost_index(cx: &mut Cx, path: &Path, vhosts: &[Arc<VirtualHost>]) -> VirtualHostIndex {
    let mut idx = VirtualHostIndex::default();
    let mut seen = std::collections::HashSet::new();
    for (i, vh) in vhosts.iter().enumerate() {
        for d in &vh.domains {
            let d = d.to_ascii_lowercase();
            if !seen.insert(d.clone()) {
                cx.sink.error(
                    path.field("virtual_hosts").index(i).as_str(),
                    format!("domain {d:?} appears in more than one virtual host"),
                );
                continue;
            }
            if d == "*" {
                idx.wildcard = Some(i);
            } else if let Some(suffix) = d.strip_prefix('*') {
                idx.suffixes.push((suffix.to_string(), i));
            } else if let Some(prefix) = d.strip_suffix('*') {
                idx.prefixes.push((prefix.to_string(), i));
            } else if d.contains('*') {
                cx.sink.error(
                    path.field("virtual_hosts").index(i).as_str(),
                    format!("domain {d:?}: a wildcard is only allowed at the start or the end"),
                );
            } else {
                idx.exact.insert(d, i);
            }
        }
    }
    // Longest wildcard first; ties keep configuration order (stable sort).
    idx.suffixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    idx.prefixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    idx
}

fn virtual_host(cx: &mut Cx, m: Msg) -> Option<VirtualHost> {
    let raw_name = m.str(cx.sink, "name").unwrap_or_default();
    let name = cx.scope.qualify_forced(&raw_name);
    let domains = m.strs(cx.sink, "domains");
    if domains.is_empty() {
        cx.sink.error(m.path.as_str(), "virtual host without domains");
    }
    let mut routes = Vec::new();
    for (i, r) in m.msgs(cx.sink, "routes", "Route").into_iter().enumerate() {
        if let Some(route) = route(cx, r, &name, i) {
            routes.push(route);
        }
    }
    let request_headers = header_mutations(cx, &m, "request_headers_to_add", "request_headers_to_remove");
    let response_headers = header_mutations(cx, &m, "response_headers_to_add", "response_headers_to_remove");
    let retry_policy = m.msg(cx.sink, "retry_policy", "RetryPolicy").and_then(|r| retry_policy(cx, r)).map(Arc::new);
    let require_tls = m
        .enumeration(
            cx.sink,
            "require_tls",
            &[("NONE", RequireTls::None), ("EXTERNAL_ONLY", RequireTls::ExternalOnly), ("ALL", RequireTls::All)],
        )
        .unwrap_or(RequireTls::None);
    let include_request_attempt_count = m.bool_or(cx.sink, "include_request_attempt_count", false);
    let include_attempt_count_in_response = m.bool_or(cx.sink, "include_attempt_count_in_response", false);
    let (cors, _disabled) = per_filter_configs(cx, &m);
    m.unsupported(cx.sink, "cors", "the deprecated `cors` field is not supported; use typed_per_filter_config");
    m.unsupported(cx.sink, "rate_limits", "rate limiting is not implemented");
    m.unsupported(cx.sink, "hedge_policy", "request hedging is not implemented");
    m.reject_unless_default(
        cx.sink,
        "request_mirror_policies",
        "virtual-host-level mirroring is not implemented; set it on routes",
    );
    m.ignore(cx.sink, "virtual_clusters", "virtual cluster statistics are not implemented");
    m.skip("metadata");
    m.skip("per_request_buffer_limit_bytes");
    m.finish(cx.sink);
    let index = RouteIndex::build(&routes);
    Some(VirtualHost {
        name,
        domains,
        index,
        routes,
        request_headers,
        response_headers,
        retry_policy,
        require_tls,
        cors,
        include_request_attempt_count,
        include_attempt_count_in_response,
    })
}

/// `typed_per_filter_config`: CORS policies and `FilterConfig{disabled}` entries.
fn per_filter_configs(cx: &mut Cx, m: &Msg) -> (Option<Arc<CorsPolicy>>, Vec<String>) {
    let mut cors = None;
    let mut disabled = Vec::new();
    let Some((v, path)) = m.take("typed_per_filter_config") else {
        return (None, disabled);
    };
    let Some(obj) = v.as_object() else {
        cx.sink.error(path.as_str(), "expected a map of filter name to config");
        return (None, disabled);
    };
    for (filter, cfg) in obj {
        let p = path.key(filter);
        let Some((ty, val, vp)) = any(cx.sink, &p, cfg) else {
            continue;
        };
        match ty.as_str() {
            "envoy.extensions.filters.http.cors.v3.CorsPolicy" => {
                if let Some(msg) = Msg::new(cx.sink, "CorsPolicy", vp, val) {
                    cors = cors_policy(cx, msg).map(Arc::new);
                }
            }
            "envoy.config.route.v3.FilterConfig" => {
                if let Some(msg) = Msg::new(cx.sink, "FilterConfig", vp, val) {
                    let off = msg.bool_or(cx.sink, "disabled", false);
                    msg.skip("is_optional");
                    msg.unsupported(cx.sink, "config", "per-route filter configuration is not implemented");
                    msg.finish(cx.sink);
                    if off {
                        disabled.push(filter.clone());
                    }
                }
            }
            // Only meaningful with the ext_authz filter, which Sluice refuses; a route that
            // merely disables it is harmless.
            "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute" => {
                if let Some(msg) = Msg::new(cx.sink, "ExtAuthzPerRoute", vp, val) {
                    if msg.bool_or(cx.sink, "disabled", false) {
                        disabled.push(filter.clone());
                    }
                    msg.finish(cx.sink);
                }
            }
            other => {
                cx.sink.error(p.as_str(), format!("unsupported per-route configuration {other} for filter {filter}"))
            }
        }
    }
    (cors, disabled)
}

fn cors_policy(cx: &mut Cx, m: Msg) -> Option<CorsPolicy> {
    let mut allow_origin = Vec::new();
    for sm in m.msgs(cx.sink, "allow_origin_string_match", "StringMatcher") {
        if let Some(s) = string_matcher(cx, sm) {
            allow_origin.push(s);
        }
    }
    let filter_enabled =
        m.msg(cx.sink, "filter_enabled", "RuntimeFractionalPercent").and_then(|f| runtime_fraction(cx, f));
    m.unsupported(cx.sink, "shadow_enabled", "CORS shadow mode is not implemented");
    let p = CorsPolicy {
        allow_origin,
        allow_methods: m.str(cx.sink, "allow_methods"),
        allow_headers: m.str(cx.sink, "allow_headers"),
        expose_headers: m.str(cx.sink, "expose_headers"),
        max_age: m.str(cx.sink, "max_age"),
        allow_credentials: m.bool_or(cx.sink, "allow_credentials", false),
        allow_private_network_access: m.bool_or(cx.sink, "allow_private_network_access", false),
        forward_not_matching_preflights: m.bool_or(cx.sink, "forward_not_matching_preflights", true),
        filter_enabled,
    };
    m.finish(cx.sink);
    Some(p)
}

fn route(cx: &mut Cx, m: Msg, vhost: &str, index: usize) -> Option<Route> {
    let name = m.str(cx.sink, "name").filter(|n| !n.is_empty()).unwrap_or_else(|| format!("{vhost}/{index}"));
    let matcher = m.msg(cx.sink, "match", "RouteMatch").and_then(|mm| route_match(cx, mm));
    if !m.has("match") {
        cx.sink.error(m.path.as_str(), "route without `match`");
    }
    let action =
        match m.oneof(cx.sink, &["route", "redirect", "direct_response", "filter_action", "non_forwarding_action"]) {
            Some("route") => m
                .msg(cx.sink, "route", "RouteAction")
                .and_then(|a| forward_action(cx, a))
                .map(|a| RouteAction::Forward(Box::new(a))),
            Some("redirect") => m
                .msg(cx.sink, "redirect", "RedirectAction")
                .and_then(|a| redirect_action(cx, a))
                .map(|r| RouteAction::Redirect(Box::new(r))),
            Some("direct_response") => m
                .msg(cx.sink, "direct_response", "DirectResponseAction")
                .and_then(|a| direct_response(cx, a))
                .map(|d| RouteAction::DirectResponse(Box::new(d))),
            Some(other) => {
                m.unsupported(cx.sink, other, "only route, redirect and direct_response actions are implemented");
                None
            }
            None => {
                cx.sink.error(m.path.as_str(), "route without an action (route, redirect or direct_response)");
                None
            }
        };
    let request_headers = header_mutations(cx, &m, "request_headers_to_add", "request_headers_to_remove");
    let response_headers = header_mutations(cx, &m, "response_headers_to_add", "response_headers_to_remove");
    let (cors, disabled_filters) = per_filter_configs(cx, &m);
    let decorator_operation = m.msg(cx.sink, "decorator", "Decorator").and_then(|d| {
        let op = d.str(cx.sink, "operation");
        d.skip("propagate");
        d.finish(cx.sink);
        op
    });
    m.skip("metadata");
    m.skip("stat_prefix");
    m.ignore(
        cx.sink,
        "tracing",
        "per-route tracing overrides are not implemented; the connection manager's tracing applies",
    );
    m.skip("per_request_buffer_limit_bytes");
    m.unsupported(cx.sink, "request_headers_to_add_before_route", "not implemented");
    m.finish(cx.sink);
    Some(Route {
        name,
        matcher: matcher?,
        action: action?,
        request_headers,
        response_headers,
        cors,
        disabled_filters,
        decorator_operation,
    })
}

fn route_match(cx: &mut Cx, m: Msg) -> Option<RouteMatch> {
    let case_sensitive = m.bool_or(cx.sink, "case_sensitive", true);
    let path = match m.oneof(
        cx.sink,
        &["prefix", "path", "safe_regex", "connect_matcher", "path_separated_prefix", "path_match_policy"],
    ) {
        Some("prefix") => PathMatch::Prefix(m.str(cx.sink, "prefix")?),
        Some("path") => PathMatch::Path(m.str(cx.sink, "path")?),
        Some("safe_regex") => {
            let r = m.msg(cx.sink, "safe_regex", "RegexMatcher")?;
            PathMatch::SafeRegex(Box::new(regex_matcher(cx, r)?))
        }
        Some("connect_matcher") => {
            m.skip("connect_matcher");
            PathMatch::Connect
        }
        Some("path_separated_prefix") => {
            let p = m.str(cx.sink, "path_separated_prefix")?;
            let path = m.path.field("path_separated_prefix");
            // Envoy: must start with '/', must not end with '/', no '?' or '#'.
            if !p.starts_with('/') || (p.len() > 1 && p.ends_with('/')) || p.contains(['?', '#']) {
                cx.sink.error(
                    path.as_str(),
                    format!(
                        "invalid path_separated_prefix {p:?}: must start with '/', not end with '/', and carry no query"
                    ),
                );
                return None;
            }
            PathMatch::PathSeparatedPrefix(p)
        }
        Some(other) => {
            m.unsupported(cx.sink, other, "path match policies (URI templates) are not implemented");
            return None;
        }
        None => {
            cx.sink.error(
                m.path.as_str(),
                "route match without a path specifier (prefix, path, safe_regex, path_separated_prefix)",
            );
            return None;
        }
    };
    let headers = header_matchers(cx, &m, "headers");
    let mut query_parameters = Vec::new();
    for q in m.msgs(cx.sink, "query_parameters", "QueryParameterMatcher") {
        let name = q.str(cx.sink, "name").unwrap_or_default();
        let string_match = match q.oneof(cx.sink, &["string_match", "present_match"]) {
            Some("string_match") => q.msg(cx.sink, "string_match", "StringMatcher").and_then(|s| string_matcher(cx, s)),
            Some("present_match") => {
                if q.bool(cx.sink, "present_match") == Some(false) {
                    cx.sink.error(q.path.as_str(), "present_match: false is not meaningful");
                }
                None
            }
            _ => None,
        };
        if name.is_empty() {
            cx.sink.error(q.path.as_str(), "query parameter matcher without a name");
        }
        q.finish(cx.sink);
        query_parameters.push(QueryParameterMatcher { name, string_match });
    }
    let grpc = m.msg(cx.sink, "grpc", "GrpcRouteMatchOptions").map(|g| g.finish(cx.sink)).is_some();
    let runtime_fraction =
        m.msg(cx.sink, "runtime_fraction", "RuntimeFractionalPercent").and_then(|f| runtime_fraction(cx, f));
    let tls_presented = m.msg(cx.sink, "tls_context", "TlsContextMatchOptions").and_then(|t| {
        let presented = t.bool(cx.sink, "presented");
        t.unsupported(cx.sink, "validated", "matching on client certificate validation is not implemented");
        t.finish(cx.sink);
        presented
    });
    m.unsupported(cx.sink, "dynamic_metadata", "dynamic metadata matching is not implemented");
    m.unsupported(cx.sink, "filter_state", "filter state matching is not implemented");
    m.finish(cx.sink);
    Some(RouteMatch { path, case_sensitive, headers, query_parameters, grpc, runtime_fraction, tls_presented })
}

fn forward_action(cx: &mut Cx, m: Msg) -> Option<ForwardAction> {
    let cluster = match m.oneof(
        cx.sink,
        &[
            "cluster",
            "cluster_header",
            "weighted_clusters",
            "cluster_specifier_plugin",
            "inline_cluster_specifier_plugin",
        ],
    ) {
        Some("cluster") => {
            let path = m.path.field("cluster");
            let c = cx.scope.qualify(&m.str(cx.sink, "cluster")?);
            cx.refs.clusters.push((c.clone(), path.to_string()));
            ClusterSpecifier::Cluster(c)
        }
        Some("cluster_header") => {
            let path = m.path.field("cluster_header");
            let h = m.str(cx.sink, "cluster_header")?;
            ClusterSpecifier::Header(header_name(cx, &path, &h)?)
        }
        Some("weighted_clusters") => {
            let w = m.msg(cx.sink, "weighted_clusters", "WeightedCluster")?;
            ClusterSpecifier::Weighted(weighted_clusters(cx, w)?)
        }
        Some(other) => {
            m.unsupported(cx.sink, other, "cluster specifier plugins are not implemented");
            return None;
        }
        None => {
            cx.sink.error(
                m.path.as_str(),
                "route action without a cluster (cluster, cluster_header or weighted_clusters)",
            );
            return None;
        }
    };
    m.reject_unless_default(cx.sink, "cluster_not_found_response_code", "only the default (503) is implemented");
    m.unsupported(cx.sink, "metadata_match", "subset load balancing is not implemented");
    let prefix_rewrite = m.str(cx.sink, "prefix_rewrite");
    let rewrite = m.msg(cx.sink, "regex_rewrite", "RegexMatchAndSubstitute").and_then(|r| regex_rewrite(cx, r));
    if prefix_rewrite.is_some() && rewrite.is_some() {
        cx.sink.error(m.path.as_str(), "prefix_rewrite and regex_rewrite are mutually exclusive");
    }
    m.unsupported(cx.sink, "path_rewrite_policy", "URI template rewrites are not implemented");
    let host_rewrite = match m.oneof(
        cx.sink,
        &["host_rewrite_literal", "auto_host_rewrite", "host_rewrite_header", "host_rewrite_path_regex"],
    ) {
        Some("host_rewrite_literal") => m.str(cx.sink, "host_rewrite_literal").map(HostRewrite::Literal),
        Some("auto_host_rewrite") => m.bool(cx.sink, "auto_host_rewrite").filter(|b| *b).map(|_| HostRewrite::Auto),
        Some("host_rewrite_header") => {
            let path = m.path.field("host_rewrite_header");
            m.str(cx.sink, "host_rewrite_header").and_then(|h| header_name(cx, &path, &h)).map(HostRewrite::Header)
        }
        Some("host_rewrite_path_regex") => m
            .msg(cx.sink, "host_rewrite_path_regex", "RegexMatchAndSubstitute")
            .and_then(|r| regex_rewrite(cx, r))
            .map(HostRewrite::PathRegex),
        _ => None,
    };
    m.unsupported(cx.sink, "append_x_forwarded_host", "not implemented");
    let timeout = duration_or_default(cx, &m, "timeout", Some(Duration::from_secs(15)));
    // `0s` is kept: it turns off the connection manager's stream idle timeout for this route.
    let idle_timeout = m.duration(cx.sink, "idle_timeout");
    let retry_policy = m.msg(cx.sink, "retry_policy", "RetryPolicy").and_then(|r| retry_policy(cx, r)).map(Arc::new);
    m.unsupported(cx.sink, "retry_policy_typed_config", "not implemented");
    let mut request_mirror_policies = Vec::new();
    for mp in m.msgs(cx.sink, "request_mirror_policies", "RequestMirrorPolicy") {
        let path = mp.path.field("cluster");
        let cluster = mp.str(cx.sink, "cluster").map(|c| cx.scope.qualify(&c));
        let fraction = mp
            .msg(cx.sink, "runtime_fraction", "RuntimeFractionalPercent")
            .and_then(|f| runtime_fraction(cx, f))
            .unwrap_or(Fraction::ALL);
        mp.ignore(cx.sink, "trace_sampled", "mirrored requests inherit the sampling decision");
        mp.unsupported(cx.sink, "cluster_header", "mirroring to a cluster named by a header is not implemented");
        mp.skip("disable_shadow_host_suffix_append");
        mp.finish(cx.sink);
        if let Some(cluster) = cluster {
            cx.refs.clusters.push((cluster.clone(), path.to_string()));
            request_mirror_policies.push(MirrorPolicy { cluster, fraction });
        }
    }
    m.skip("priority");
    m.unsupported(cx.sink, "rate_limits", "rate limiting is not implemented");
    m.skip("include_vh_rate_limits");
    let mut hash_policy = Vec::new();
    for hp in m.msgs(cx.sink, "hash_policy", "HashPolicy") {
        if let Some(h) = hash_policy_entry(cx, hp) {
            hash_policy.push(h);
        }
    }
    m.unsupported(cx.sink, "cors", "the deprecated `cors` field is not supported; use typed_per_filter_config");
    let max_grpc_timeout = m.duration(cx.sink, "max_grpc_timeout");
    let grpc_timeout_offset = m.duration(cx.sink, "grpc_timeout_offset");
    let mut upgrade_configs = Vec::new();
    for u in m.msgs(cx.sink, "upgrade_configs", "UpgradeConfig") {
        if let Some(uc) = upgrade_config(cx, u) {
            upgrade_configs.push(uc);
        }
    }
    m.unsupported(cx.sink, "internal_redirect_policy", "internal redirects are not implemented");
    m.unsupported(cx.sink, "internal_redirect_action", "internal redirects are not implemented");
    m.unsupported(cx.sink, "max_internal_redirects", "internal redirects are not implemented");
    m.unsupported(cx.sink, "hedge_policy", "request hedging is not implemented");
    let mut max_stream_duration = None;
    let mut grpc_timeout_header_max = max_grpc_timeout;
    let mut grpc_timeout_header_offset = grpc_timeout_offset;
    if let Some(msd) = m.msg(cx.sink, "max_stream_duration", "MaxStreamDuration") {
        // `0s` is kept: it turns off the connection manager's limit for this route.
        max_stream_duration = msd.duration(cx.sink, "max_stream_duration");
        if let Some(d) = msd.duration(cx.sink, "grpc_timeout_header_max") {
            grpc_timeout_header_max = Some(d);
        }
        if let Some(d) = msd.duration(cx.sink, "grpc_timeout_header_offset") {
            grpc_timeout_header_offset = Some(d);
        }
        msd.finish(cx.sink);
    }
    m.unsupported(cx.sink, "early_data_policy", "not implemented");
    m.finish(cx.sink);
    Some(ForwardAction {
        cluster,
        prefix_rewrite,
        regex_rewrite: rewrite,
        host_rewrite,
        timeout,
        idle_timeout,
        retry_policy,
        request_mirror_policies,
        hash_policy,
        max_stream_duration,
        grpc_timeout_header_max,
        grpc_timeout_header_offset,
        upgrade_configs,
    })
}

/// A duration where `0s` disables the timer (returns `None`) and absence gives the default.
fn duration_or_default(cx: &mut Cx, m: &Msg, name: &str, default: Option<Duration>) -> Option<Duration> {
    if !m.has(name) {
        m.skip(name);
        return default;
    }
    m.duration(cx.sink, name).filter(|d| !d.is_zero())
}

pub fn upgrade_config(cx: &mut Cx, u: Msg) -> Option<UpgradeConfig> {
    let upgrade_type = u.str(cx.sink, "upgrade_type").unwrap_or_default();
    let enabled = u.bool_or(cx.sink, "enabled", true);
    let mut connect_allow_post = false;
    if let Some(c) = u.msg(cx.sink, "connect_config", "ConnectConfig") {
        connect_allow_post = c.bool_or(cx.sink, "allow_post", false);
        c.unsupported(cx.sink, "proxy_protocol_config", "PROXY protocol on CONNECT upstreams is not implemented");
        c.finish(cx.sink);
    }
    u.skip("filters");
    u.finish(cx.sink);
    if upgrade_type.is_empty() {
        return None;
    }
    Some(UpgradeConfig { upgrade_type: upgrade_type.to_ascii_lowercase(), enabled, connect_allow_post })
}

fn weighted_clusters(cx: &mut Cx, m: Msg) -> Option<WeightedClusters> {
    let mut clusters = Vec::new();
    for c in m.msgs(cx.sink, "clusters", "ClusterWeight") {
        let path = c.path.field("name");
        let name = match c.str(cx.sink, "name") {
            Some(n) if !n.is_empty() => cx.scope.qualify(&n),
            _ => {
                c.unsupported(cx.sink, "cluster_header", "weighted clusters named by a header are not implemented");
                cx.sink.error(c.path.as_str(), "weighted cluster without a name");
                c.finish(cx.sink);
                continue;
            }
        };
        cx.refs.clusters.push((name.clone(), path.to_string()));
        let weight = c.u32(cx.sink, "weight").unwrap_or(0);
        let request_headers = header_mutations(cx, &c, "request_headers_to_add", "request_headers_to_remove");
        let response_headers = header_mutations(cx, &c, "response_headers_to_add", "response_headers_to_remove");
        let host_rewrite_literal = c.str(cx.sink, "host_rewrite_literal");
        c.unsupported(cx.sink, "metadata_match", "subset load balancing is not implemented");
        c.reject_unless_default(
            cx.sink,
            "typed_per_filter_config",
            "per-cluster filter configuration is not implemented",
        );
        c.finish(cx.sink);
        clusters.push(WeightedCluster { name, weight, request_headers, response_headers, host_rewrite_literal });
    }
    let sum: u64 = clusters.iter().map(|c| u64::from(c.weight)).sum();
    let total_path = m.path.field("total_weight");
    let total = m.u32(cx.sink, "total_weight");
    m.skip("runtime_key_prefix");
    m.unsupported(cx.sink, "header_name", "weighted cluster selection by header is not implemented");
    m.skip("random_value_specifier");
    m.finish(cx.sink);
    if clusters.is_empty() {
        cx.sink.error(m_path_str(&total_path), "weighted_clusters without clusters");
        return None;
    }
    if sum == 0 {
        cx.sink.error(m_path_str(&total_path), "the weights of weighted_clusters sum to 0");
        return None;
    }
    if sum > u64::from(u32::MAX) {
        cx.sink.error(m_path_str(&total_path), "the weights of weighted_clusters overflow 32 bits");
        return None;
    }
    if let Some(t) = total
        && t != 0
        && u64::from(t) != sum
    {
        cx.sink.error(total_path.as_str(), format!("total_weight is {t} but the cluster weights sum to {sum}"));
        return None;
    }
    Some(WeightedClusters { clusters, total_weight: sum as u32 })
}

fn m_path_str(total_path: &Path) -> &str {
    // The parent of `...total_weight`.
    let s = total_path.as_str();
    s.strip_suffix(".total_weight").unwrap_or(s)
}

pub fn regex_rewrite(cx: &mut Cx, m: Msg) -> Option<RegexRewrite> {
    let pattern = m.msg(cx.sink, "pattern", "RegexMatcher").and_then(|p| regex_matcher(cx, p));
    let substitution = m.str(cx.sink, "substitution").unwrap_or_default();
    m.finish(cx.sink);
    Some(RegexRewrite { pattern: pattern?, substitution: convert_substitution(&substitution) })
}

/// RE2's `\1` backreferences become the regex crate's `${1}`; a literal `$` is escaped.
fn convert_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.peek().copied() {
                Some(d) if d.is_ascii_digit() => {
                    chars.next();
                    out.push_str(&format!("${{{d}}}"));
                }
                Some('\\') => {
                    chars.next();
                    out.push('\\');
                }
                _ => out.push('\\'),
            },
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

fn hash_policy_entry(cx: &mut Cx, m: Msg) -> Option<HashPolicy> {
    let terminal = m.bool_or(cx.sink, "terminal", false);
    let out = match m.oneof(cx.sink, &["header", "cookie", "connection_properties", "query_parameter", "filter_state"])
    {
        Some("header") => {
            let h = m.msg(cx.sink, "header", "Header")?;
            let path = h.path.field("header_name");
            let name = h.str(cx.sink, "header_name").and_then(|n| header_name(cx, &path, &n));
            h.unsupported(cx.sink, "regex_rewrite", "not implemented");
            h.finish(cx.sink);
            name.map(|name| HashPolicy::Header { name, terminal })
        }
        Some("cookie") => {
            let c = m.msg(cx.sink, "cookie", "Cookie")?;
            let name = c.str(cx.sink, "name");
            c.unsupported(cx.sink, "ttl", "generating affinity cookies is not implemented");
            c.skip("path");
            c.finish(cx.sink);
            name.map(|name| HashPolicy::Cookie { name, terminal })
        }
        Some("connection_properties") => {
            let c = m.msg(cx.sink, "connection_properties", "ConnectionProperties")?;
            let src = c.bool_or(cx.sink, "source_ip", false);
            c.finish(cx.sink);
            src.then_some(HashPolicy::SourceIp { terminal })
        }
        Some("query_parameter") => {
            let q = m.msg(cx.sink, "query_parameter", "QueryParameter")?;
            let name = q.str(cx.sink, "name");
            q.finish(cx.sink);
            name.map(|name| HashPolicy::QueryParameter { name, terminal })
        }
        Some(other) => {
            m.unsupported(cx.sink, other, "not implemented");
            None
        }
        None => None,
    };
    m.finish(cx.sink);
    out
}

pub fn retry_policy(cx: &mut Cx, m: Msg) -> Option<RetryPolicy> {
    let mut retry_on = RetryOn::default();
    let on_path = m.path.field("retry_on");
    if let Some(s) = m.str(cx.sink, "retry_on") {
        for cond in s.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            let f = match cond {
                "5xx" => &mut retry_on.five_xx,
                "gateway-error" => &mut retry_on.gateway_error,
                "reset" => &mut retry_on.reset,
                "reset-before-request" => &mut retry_on.reset_before_request,
                "connect-failure" => &mut retry_on.connect_failure,
                "envoy-ratelimited" => &mut retry_on.envoy_ratelimited,
                "retriable-4xx" => &mut retry_on.retriable_4xx,
                "refused-stream" => &mut retry_on.refused_stream,
                "retriable-status-codes" => &mut retry_on.retriable_status_codes,
                "retriable-headers" => &mut retry_on.retriable_headers,
                "http3-post-connect-failure" => &mut retry_on.http3_post_connect_failure,
                "cancelled" => &mut retry_on.grpc_cancelled,
                "deadline-exceeded" => &mut retry_on.grpc_deadline_exceeded,
                "resource-exhausted" => &mut retry_on.grpc_resource_exhausted,
                "unavailable" => &mut retry_on.grpc_unavailable,
                "internal" => &mut retry_on.grpc_internal,
                other => {
                    cx.sink.error(on_path.as_str(), format!("unknown retry_on condition {other:?}"));
                    continue;
                }
            };
            *f = true;
        }
    }
    let num_retries = m.u32(cx.sink, "num_retries").unwrap_or(1);
    let per_try_timeout = m.duration(cx.sink, "per_try_timeout").filter(|d| !d.is_zero());
    let per_try_idle_timeout = m.duration(cx.sink, "per_try_idle_timeout").filter(|d| !d.is_zero());
    let mut retriable_status_codes = Vec::new();
    for (v, p) in m.list(cx.sink, "retriable_status_codes") {
        match crate::json::parse_u64(cx.sink, &p, v) {
            Some(c @ 100..=599) => retriable_status_codes.push(c as u16),
            Some(c) => cx.sink.error(p.as_str(), format!("{c} is not an HTTP status code")),
            None => {}
        }
    }
    let (mut back_off_base, mut back_off_max) = (Duration::from_millis(25), Duration::from_millis(250));
    if let Some(b) = m.msg(cx.sink, "retry_back_off", "RetryBackOff") {
        let base_path = b.path.field("base_interval");
        if let Some(base) = b.duration(cx.sink, "base_interval") {
            if base.is_zero() {
                cx.sink.error(base_path.as_str(), "base_interval must be greater than zero");
            }
            back_off_base = base;
            back_off_max = base * 10;
        }
        if let Some(max) = b.duration(cx.sink, "max_interval") {
            if max < back_off_base {
                cx.sink
                    .error(b.path.field("max_interval").as_str(), "max_interval must not be less than base_interval");
            }
            back_off_max = max;
        }
        b.finish(cx.sink);
    }
    let retriable_headers = header_matchers(cx, &m, "retriable_headers");
    let retriable_request_headers = header_matchers(cx, &m, "retriable_request_headers");
    let host_selection_retry_max_attempts = m.u64(cx.sink, "host_selection_retry_max_attempts").unwrap_or(1) as u32;
    for (v, p) in m.list(cx.sink, "retry_host_predicate") {
        let name = v.get("name").and_then(Value::as_str).unwrap_or("");
        if name != "envoy.retry_host_predicates.previous_hosts" {
            cx.sink.error(p.as_str(), format!("unsupported retry host predicate {name:?} (only previous_hosts)"));
        }
    }
    m.unsupported(cx.sink, "retry_priority", "retry priorities are not implemented");
    m.unsupported(cx.sink, "rate_limited_retry_back_off", "not implemented");
    m.unsupported(cx.sink, "retry_options_predicates", "not implemented");
    m.finish(cx.sink);
    Some(RetryPolicy {
        retry_on,
        num_retries,
        per_try_timeout,
        per_try_idle_timeout,
        retriable_status_codes,
        back_off_base,
        back_off_max,
        retriable_headers,
        retriable_request_headers,
        host_selection_retry_max_attempts,
    })
}

fn redirect_action(cx: &mut Cx, m: Msg) -> Option<Redirect> {
    let scheme = match m.oneof(cx.sink, &["https_redirect", "scheme_redirect"]) {
        Some("https_redirect") => m.bool(cx.sink, "https_redirect").filter(|b| *b).map(|_| "https".to_string()),
        Some("scheme_redirect") => m.str(cx.sink, "scheme_redirect").map(|s| s.to_ascii_lowercase()),
        _ => None,
    };
    let host = m.str(cx.sink, "host_redirect");
    let port_path = m.path.field("port_redirect");
    let port = match m.u32(cx.sink, "port_redirect") {
        Some(0) | None => None,
        Some(p) if p <= 65535 => Some(p as u16),
        Some(p) => {
            cx.sink.error(port_path.as_str(), format!("port {p} is out of range"));
            None
        }
    };
    let path = match m.oneof(cx.sink, &["path_redirect", "prefix_rewrite", "regex_rewrite"]) {
        Some("path_redirect") => PathRedirect::Path(m.str(cx.sink, "path_redirect")?),
        Some("prefix_rewrite") => PathRedirect::Prefix(m.str(cx.sink, "prefix_rewrite")?),
        Some("regex_rewrite") => {
            let r = m.msg(cx.sink, "regex_rewrite", "RegexMatchAndSubstitute")?;
            PathRedirect::Regex(regex_rewrite(cx, r)?)
        }
        _ => PathRedirect::Keep,
    };
    let response_code = m
        .enumeration(
            cx.sink,
            "response_code",
            &[
                ("MOVED_PERMANENTLY", 301u16),
                ("FOUND", 302),
                ("SEE_OTHER", 303),
                ("TEMPORARY_REDIRECT", 307),
                ("PERMANENT_REDIRECT", 308),
            ],
        )
        .unwrap_or(301);
    let strip_query = m.bool_or(cx.sink, "strip_query", false);
    m.finish(cx.sink);
    Some(Redirect { scheme, host, port, path, response_code, strip_query })
}

fn direct_response(cx: &mut Cx, m: Msg) -> Option<DirectResponse> {
    let status_path = m.path.field("status");
    let status = m.u32(cx.sink, "status").unwrap_or(0);
    let body = match m.msg(cx.sink, "body", "DataSource").and_then(|d| data_source(cx, d)) {
        Some(DataSource::Inline(b)) => Some(bytes::Bytes::from(b)),
        Some(other) => {
            cx.sink.error(
                m.path.field("body").as_str(),
                format!("direct response bodies must be inline ({other:?} is not supported)"),
            );
            None
        }
        None => None,
    };
    m.unsupported(cx.sink, "body_format", "body formatting is not implemented");
    m.finish(cx.sink);
    if !(200..=599).contains(&status) {
        cx.sink.error(status_path.as_str(), format!("direct response status {status} must be within 200..599"));
        return None;
    }
    Some(DirectResponse { status: status as u16, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitution_conversion() {
        assert_eq!(convert_substitution("/\\2"), "/${2}");
        assert_eq!(convert_substitution("\\1/x\\\\y$"), "${1}/x\\y$$");
    }
}
