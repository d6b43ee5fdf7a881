//! Request routing: virtual host and route selection, path and host rewrites, redirects,
//! weighted cluster choice, header mutations and CORS — the parts of Envoy's router and
//! `envoy.filters.http.cors` that decide *what* happens to a request, kept free of I/O so the
//! connection manager and the router layer can call them per request and tests can pin
//! Envoy's behaviour down case by case.
//!
//! Everything here works on the already-validated [`sluice_config::model`] and borrows the
//! request through [`RequestView`]. The matching path ([`select()`]) does not allocate except
//! where Envoy's semantics force a copy (joining a header that appears several times, or
//! lower-casing an upper-case `:authority` for the domain lookup).
//!
//! Module map:
//! - [`matching`]: string, header, query-parameter and path matchers;
//! - [`select`](mod@select): virtual host + first matching route, `require_tls`;
//! - [`rewrite`]: `prefix_rewrite`, `regex_rewrite`, host rewrites;
//! - [`redirect`]: `Location` construction for redirect actions and `require_tls`;
//! - [`weighted`]: weighted cluster choice;
//! - [`target`]: the cluster a request goes to (single, weighted, `cluster_header`) and its mirrors;
//! - [`template`]: Envoy's `%VAR%` header value formatters;
//! - [`mutation`]: `*_headers_to_add/remove` with `append_action` and level precedence;
//! - [`cors`](mod@cors): preflight answers and response headers of the CORS filter.

use http::{HeaderMap, Method};

pub mod cors;
pub mod matching;
pub mod mutation;
pub mod redirect;
pub mod rewrite;
pub mod select;
pub mod target;
pub mod template;
pub mod weighted;

#[cfg(test)]
mod corpus_tests;
#[cfg(test)]
mod testutil;

pub use cors::{CorsDecision, cors};
pub use mutation::{apply, apply_request_mutations, apply_response_mutations};
pub use redirect::{direct_response_location, redirect_location, require_tls_location};
pub use rewrite::{rewrite_host, rewrite_path};
pub use select::{Selection, route_matches, select, select_route, select_vhost};
pub use target::{Target, choose_cluster, mirror_clusters};
pub use template::{PseudoHeaders, TemplateContext};
pub use weighted::pick_weighted;

/// What the router needs to know about a request, borrowed from it.
///
/// Built by the connection manager after its own normalisation (path normalisation, port
/// stripping, `x-forwarded-proto`), exactly the state Envoy's router sees.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// `:path` including the query string, as received after normalisation. Empty for a
    /// request without a path (an HTTP/1.1 `CONNECT host:port`), which only `connect_matcher`
    /// routes can match, as in Envoy.
    pub path: &'a str,
    /// `:authority` (HTTP/2) or `Host` (HTTP/1.1).
    pub authority: &'a str,
    /// `"http"` or `"https"`: the effective `x-forwarded-proto`. Envoy's connection manager sets
    /// that header before routing, so header matchers on `x-forwarded-proto` fall back to this
    /// value when the map does not carry the header.
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
    /// The downstream peer presented a TLS client certificate (`tls_context.presented`).
    pub peer_certificate_presented: bool,
    /// A uniformly distributed value drawn once per request. Envoy uses one such value (the
    /// stream id) for the route `runtime_fraction` *and* the weighted cluster choice; callers
    /// should pass the same value to [`pick_weighted`] to reproduce that coupling.
    pub random: u64,
}

impl<'a> RequestView<'a> {
    /// The path without query string and fragment: what Envoy's path matchers compare
    /// (`PathUtil::removeQueryAndFragment`).
    pub fn path_only(&self) -> &'a str {
        path_only(self.path)
    }
}

/// `/a/b?x#y` -> `/a/b`.
pub(crate) fn path_only(path: &str) -> &str {
    match path.find(['?', '#']) {
        Some(i) => &path[..i],
        None => path,
    }
}

/// `samples` in [0, 1_000_000) for [`sluice_config::model::Fraction::hit`], from any uniform
/// `u64` (Envoy: `random_value % denominator < numerator`).
pub(crate) fn per_million(random: u64) -> u32 {
    // The remainder is below 1_000_000, so it always fits.
    (random % 1_000_000) as u32
}
