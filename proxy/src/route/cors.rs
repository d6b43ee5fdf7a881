//! `envoy.filters.http.cors` with the route's and the virtual host's `CorsPolicy`.
//!
//! Verified against `source/extensions/filters/http/cors/cors_filter.cc`:
//! - The policies are the route's, then the virtual host's; each setting is taken from the
//!   first policy that sets it. Whether the filter is on (`filter_enabled`) is decided by the
//!   first policy alone.
//! - A request without a non-empty `Origin` is not a CORS request. The origin is allowed when
//!   an `allow_origin_string_match` matcher matches it, or matches `*`.
//! - A preflight is `OPTIONS` with `Origin` and a non-empty `Access-Control-Request-Method`.
//!   It is answered locally with **200** (not 204) unless the origin is not allowed and
//!   `forward_not_matching_preflights` (default true), in which case it is forwarded untouched.
//!   The answer carries `Access-Control-Allow-Origin` (only for an allowed origin),
//!   `-Allow-Credentials: true`, `-Allow-Methods` and `-Allow-Headers` (`*` echoes the request's
//!   `Access-Control-Request-Method` / `-Headers`), `-Max-Age`, and
//!   `-Allow-Private-Network: true` when allowed and requested. The filter's own
//!   `encodeHeaders` then runs on that answer too, so for an allowed origin it also carries
//!   `-Expose-Headers` (observed with Envoy 1.40.0; `decodeHeaders` alone does not set it).
//! - Any other request from an allowed origin is forwarded and its response gets
//!   `Access-Control-Allow-Origin: <origin>`, `-Allow-Credentials: true` (if set) and
//!   `-Expose-Headers` (if set), overwriting what the upstream sent.
//!
//! Sluice choice, forced by the model: `allow_credentials`, `allow_private_network_access` and
//! `forward_not_matching_preflights` are plain booleans there, so "not set" cannot be told
//! from the default. A route policy's `true` (`false` for `forward_not_matching_preflights`)
//! decides; otherwise the virtual host policy's value applies. This differs from Envoy only
//! when a route explicitly sets the default value to override a virtual host.

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use sluice_config::model::{CorsPolicy, StringMatcher};

use super::matching::string_matches;
use super::{RequestView, per_million};
use crate::http::header_names::ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK;

/// What the CORS filter does with a request.
#[derive(Debug)]
pub enum CorsDecision {
    /// No policy, filter disabled, or no `Origin`: the filter does nothing.
    NotCors,
    /// A preflight answered locally; send this response (no body) instead of routing.
    Preflight(Response<()>),
    /// Forward the request; set these headers on its response (empty when the origin is not
    /// allowed).
    Forward { response_headers: Vec<(HeaderName, HeaderValue)> },
}

/// The route's and virtual host's policies, merged field by field like Envoy.
struct Policies<'a> {
    route: Option<&'a CorsPolicy>,
    vhost: Option<&'a CorsPolicy>,
}

impl<'a> Policies<'a> {
    fn iter(&self) -> impl Iterator<Item = &'a CorsPolicy> {
        self.route.into_iter().chain(self.vhost)
    }

    fn string(&self, f: impl Fn(&'a CorsPolicy) -> &'a Option<String>) -> Option<&'a str> {
        self.iter().find_map(|p| f(p).as_deref().filter(|s| !s.is_empty()))
    }

    fn allow_origins(&self) -> &'a [StringMatcher] {
        self.iter().map(|p| p.allow_origin.as_slice()).find(|o| !o.is_empty()).unwrap_or(&[])
    }

    fn allow_credentials(&self) -> bool {
        self.iter().any(|p| p.allow_credentials)
    }

    fn allow_private_network_access(&self) -> bool {
        self.iter().any(|p| p.allow_private_network_access)
    }

    fn forward_not_matching_preflights(&self) -> bool {
        self.iter().all(|p| p.forward_not_matching_preflights)
    }

    fn enabled(&self, random: u64) -> bool {
        self.iter().next().is_some_and(|p| p.filter_enabled.is_none_or(|f| f.hit(per_million(random))))
    }
}

/// Runs the CORS filter for a routed request. Call it only when the connection manager has
/// the CORS filter; pass the matched route's and virtual host's policies.
pub fn cors(route: Option<&CorsPolicy>, vhost: Option<&CorsPolicy>, req: &RequestView<'_>) -> CorsDecision {
    let policies = Policies { route, vhost };
    if !policies.enabled(req.random) {
        return CorsDecision::NotCors;
    }
    let Some(origin) = req.headers.get(header::ORIGIN).filter(|o| !o.is_empty()) else {
        return CorsDecision::NotCors;
    };
    let origin_str = String::from_utf8_lossy(origin.as_bytes());
    let allowed = policies.allow_origins().iter().any(|m| string_matches(m, "*") || string_matches(m, &origin_str));

    let request_method = req.headers.get(header::ACCESS_CONTROL_REQUEST_METHOD).filter(|v| !v.is_empty());
    let preflight = *req.method == Method::OPTIONS && request_method.is_some();
    if !preflight {
        return CorsDecision::Forward { response_headers: actual_response_headers(&policies, allowed, origin) };
    }
    if !allowed && policies.forward_not_matching_preflights() {
        return CorsDecision::Forward { response_headers: Vec::new() };
    }

    let mut resp = Response::new(());
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    if allowed {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    }
    if policies.allow_credentials() {
        h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
    if let Some(methods) = policies.string(|p| &p.allow_methods) {
        let value = if methods == "*" { request_method.cloned() } else { config_value(methods) };
        if let Some(v) = value {
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
        }
    }
    if let Some(headers) = policies.string(|p| &p.allow_headers) {
        let value = if headers == "*" {
            // Envoy echoes the request's list, setting an empty value when there is none.
            Some(
                req.headers
                    .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                    .cloned()
                    .unwrap_or(HeaderValue::from_static("")),
            )
        } else {
            config_value(headers)
        };
        if let Some(v) = value {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
    }
    if let Some(v) = policies.string(|p| &p.max_age).and_then(config_value) {
        h.insert(header::ACCESS_CONTROL_MAX_AGE, v);
    }
    if policies.allow_private_network_access()
        && req.headers.get(ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK).is_some_and(|v| v.as_bytes() == b"true")
    {
        h.insert(HeaderName::from_static("access-control-allow-private-network"), HeaderValue::from_static("true"));
    }
    // Envoy's encodeHeaders on its own local answer: Allow-Origin and Allow-Credentials are
    // already there; Expose-Headers is added for an allowed origin.
    if allowed && let Some(v) = policies.string(|p| &p.expose_headers).and_then(config_value) {
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
    }
    CorsDecision::Preflight(resp)
}

fn actual_response_headers(p: &Policies<'_>, allowed: bool, origin: &HeaderValue) -> Vec<(HeaderName, HeaderValue)> {
    if !allowed {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(3);
    out.push((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone()));
    if p.allow_credentials() {
        out.push((header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true")));
    }
    if let Some(v) = p.string(|p| &p.expose_headers).and_then(config_value) {
        out.push((header::ACCESS_CONTROL_EXPOSE_HEADERS, v));
    }
    out
}

/// A policy string as a header value; a value a header cannot carry is left out.
fn config_value(s: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(s).ok()
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;
    use serde_json::{Value, json};

    use super::*;
    use crate::route::testutil::{route_config, view};

    /// Translates a route with `route_cors` and a vhost with `vhost_cors` (either may be null)
    /// and runs the filter on the request.
    fn decide(route_cors: Value, vhost_cors: Value, method: Method, headers: &[(&str, &str)]) -> CorsDecision {
        let tpfc = |c: &Value| {
            if c.is_null() {
                json!({})
            } else {
                let mut c = c.clone();
                c["@type"] = json!("type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy");
                json!({"envoy.filters.http.cors": c})
            }
        };
        let rc = route_config(json!({"name": "rc", "virtual_hosts": [{
            "name": "v", "domains": ["*"], "typed_per_filter_config": tpfc(&vhost_cors),
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "/a"}, "typed_per_filter_config": tpfc(&route_cors)}]
        }]}));
        let vh = &rc.virtual_hosts[0];
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        cors(vh.routes[0].cors.as_deref(), vh.cors.as_deref(), &view(method, "/", "h", &h))
    }

    fn policy() -> Value {
        json!({
            "allow_origin_string_match": [{"exact": "https://app.example"}, {"safe_regex": {"regex": "https://.*\\.trusted\\.example"}}],
            "allow_methods": "GET, POST",
            "allow_headers": "x-custom",
            "expose_headers": "x-exposed",
            "max_age": "600",
            "allow_credentials": true
        })
    }

    fn header(resp: &Response<()>, name: &str) -> Option<String> {
        resp.headers().get(name).map(|v| v.to_str().unwrap().to_string())
    }

    fn forward_headers(d: &CorsDecision) -> Vec<(String, String)> {
        match d {
            CorsDecision::Forward { response_headers } => {
                response_headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string())).collect()
            }
            other => panic!("expected Forward, got {other:?}"),
        }
    }

    const PREFLIGHT: &[(&str, &str)] = &[
        ("origin", "https://app.example"),
        ("access-control-request-method", "PUT"),
        ("access-control-request-headers", "x-a, x-b"),
    ];

    #[test]
    fn preflight_from_an_allowed_origin_is_answered_with_200() {
        let CorsDecision::Preflight(resp) = decide(policy(), Value::Null, Method::OPTIONS, PREFLIGHT) else {
            panic!("expected a preflight answer");
        };
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "access-control-allow-origin").as_deref(), Some("https://app.example"));
        assert_eq!(header(&resp, "access-control-allow-credentials").as_deref(), Some("true"));
        assert_eq!(header(&resp, "access-control-allow-methods").as_deref(), Some("GET, POST"));
        assert_eq!(header(&resp, "access-control-allow-headers").as_deref(), Some("x-custom"));
        assert_eq!(header(&resp, "access-control-max-age").as_deref(), Some("600"));
        // Envoy's CORS filter encodes its own preflight answer like any response.
        assert_eq!(header(&resp, "access-control-expose-headers").as_deref(), Some("x-exposed"));
    }

    #[test]
    fn wildcard_methods_and_headers_echo_the_request() {
        let p = json!({"allow_origin_string_match": [{"exact": "*"}], "allow_methods": "*", "allow_headers": "*"});
        let CorsDecision::Preflight(resp) = decide(p, Value::Null, Method::OPTIONS, PREFLIGHT) else {
            panic!("expected a preflight answer");
        };
        assert_eq!(
            header(&resp, "access-control-allow-origin").as_deref(),
            Some("https://app.example"),
            "`*` allows any origin"
        );
        assert_eq!(header(&resp, "access-control-allow-methods").as_deref(), Some("PUT"));
        assert_eq!(header(&resp, "access-control-allow-headers").as_deref(), Some("x-a, x-b"));
        assert_eq!(header(&resp, "access-control-allow-credentials"), None);
    }

    #[test]
    fn preflight_from_a_foreign_origin() {
        let foreign = &[("origin", "https://evil.example"), ("access-control-request-method", "GET")];
        // Default: forwarded untouched.
        assert!(forward_headers(&decide(policy(), Value::Null, Method::OPTIONS, foreign)).is_empty());
        // Cilium's translators set forward_not_matching_preflights: false — answered locally
        // without Allow-Origin.
        let mut p = policy();
        p["forward_not_matching_preflights"] = json!(false);
        let CorsDecision::Preflight(resp) = decide(p, Value::Null, Method::OPTIONS, foreign) else {
            panic!("expected a local answer");
        };
        assert_eq!(header(&resp, "access-control-allow-origin"), None);
        assert_eq!(header(&resp, "access-control-allow-methods").as_deref(), Some("GET, POST"));
        assert_eq!(header(&resp, "access-control-expose-headers"), None, "only for an allowed origin");
    }

    #[test]
    fn actual_requests_get_response_headers_only_for_allowed_origins() {
        let ok =
            forward_headers(&decide(policy(), Value::Null, Method::GET, &[("origin", "https://x.trusted.example")]));
        assert_eq!(
            ok,
            [
                ("access-control-allow-origin".to_string(), "https://x.trusted.example".to_string()),
                ("access-control-allow-credentials".into(), "true".into()),
                ("access-control-expose-headers".into(), "x-exposed".into()),
            ]
        );
        assert!(
            forward_headers(&decide(policy(), Value::Null, Method::GET, &[("origin", "https://nope.example")]))
                .is_empty()
        );
        // OPTIONS without Access-Control-Request-Method is an actual request.
        assert_eq!(
            forward_headers(&decide(policy(), Value::Null, Method::OPTIONS, &[("origin", "https://app.example")]))
                .len(),
            3
        );
    }

    #[test]
    fn not_cors_without_origin_or_policy() {
        assert!(matches!(decide(policy(), Value::Null, Method::GET, &[]), CorsDecision::NotCors));
        assert!(matches!(decide(policy(), Value::Null, Method::GET, &[("origin", "")]), CorsDecision::NotCors));
        assert!(matches!(
            decide(Value::Null, Value::Null, Method::GET, &[("origin", "https://app.example")]),
            CorsDecision::NotCors
        ));
    }

    #[test]
    fn filter_enabled_zero_disables_the_filter() {
        let mut p = policy();
        p["filter_enabled"] = json!({"default_value": {"numerator": 0}});
        assert!(matches!(decide(p, Value::Null, Method::OPTIONS, PREFLIGHT), CorsDecision::NotCors));
    }

    #[test]
    fn route_policy_fields_fall_back_to_the_virtual_host() {
        let route = json!({"allow_methods": "DELETE"});
        let vhost = policy();
        let CorsDecision::Preflight(resp) = decide(route, vhost, Method::OPTIONS, PREFLIGHT) else {
            panic!("expected a preflight answer");
        };
        assert_eq!(header(&resp, "access-control-allow-methods").as_deref(), Some("DELETE"), "route wins");
        assert_eq!(
            header(&resp, "access-control-allow-origin").as_deref(),
            Some("https://app.example"),
            "origins from the vhost"
        );
        assert_eq!(header(&resp, "access-control-max-age").as_deref(), Some("600"));
        assert_eq!(header(&resp, "access-control-allow-credentials").as_deref(), Some("true"));
    }

    #[test]
    fn private_network_access() {
        let mut p = policy();
        p["allow_private_network_access"] = json!(true);
        let mut req = PREFLIGHT.to_vec();
        req.push(("access-control-request-private-network", "true"));
        let CorsDecision::Preflight(resp) = decide(p.clone(), Value::Null, Method::OPTIONS, &req) else {
            panic!("expected a preflight answer");
        };
        assert_eq!(header(&resp, "access-control-allow-private-network").as_deref(), Some("true"));
        let CorsDecision::Preflight(resp) = decide(p, Value::Null, Method::OPTIONS, PREFLIGHT) else {
            panic!("expected a preflight answer");
        };
        assert_eq!(header(&resp, "access-control-allow-private-network"), None, "not requested");
    }
}
