//! A candidate index over a virtual host's routes, so that a large route table is not
//! scanned route by route.
//!
//! Envoy evaluates routes in order, one by one: with 10,000 routes that scan (and, for regex
//! routes, one automaton per route) dominates the cost of a request. The index narrows the
//! scan to the routes that *can* match, keyed by what most route tables are made of:
//!
//! * the literal a route's path must start with: the `prefix`, the exact `path`, the
//!   `path_separated_prefix`, or the literal prefix of a `safe_regex` (`/re-7/[a-z]+` must
//!   start with `/re-7/`);
//! * for routes whose path says nothing (`prefix: /`), one exact header value they require
//!   (`x-tenant: tenant-7`, `:authority: a.example`);
//! * everything else is a candidate for every request.
//!
//! The index only proposes candidates, in route order: the router still evaluates every
//! condition of each candidate, so first-match semantics are untouched. A route belongs to
//! exactly one list, and every list is sorted, so the first candidate that matches is the
//! route a full scan would have chosen.
//!
//! Small tables (what Cilium's Ingress and Gateway API translators emit: tens of routes) are
//! scanned directly; the index is built only from [`RouteIndex::MIN_ROUTES`] routes up.

use std::collections::HashMap;

use regex_syntax::hir::literal::{ExtractKind, Extractor};

use crate::model::{HeaderMatchSpec, PathMatch, Route, StringMatchKind};

/// Route indices by the exact value of one header.
type ByValue = HashMap<Box<str>, Vec<u32>>;

#[derive(Default)]
pub struct RouteIndex {
    /// Route indices by the literal their path must start with.
    by_prefix: HashMap<Box<[u8]>, Vec<u32>>,
    /// The distinct lengths of the `by_prefix` keys, ascending: a path is looked up once per
    /// length, not once per byte.
    prefix_lens: Vec<usize>,
    /// Routes with no useful path literal that require one exact header value, by header
    /// name, then by value.
    by_header: Vec<(Box<str>, ByValue)>,
    /// Routes nothing narrows down.
    always: Vec<u32>,
    built: bool,
}

impl std::fmt::Debug for RouteIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteIndex")
            .field("built", &self.built)
            .field("prefixes", &self.by_prefix.len())
            .field("headers", &self.by_header.len())
            .field("always", &self.always.len())
            .finish()
    }
}

/// Where the index files one route.
enum Key {
    Prefix(Vec<u8>),
    Header(String, String),
    Always,
}

impl RouteIndex {
    /// Below this many routes a direct scan is as fast as the lookups.
    pub const MIN_ROUTES: usize = 32;

    pub fn build(routes: &[Route]) -> RouteIndex {
        let mut idx = RouteIndex::default();
        if routes.len() < Self::MIN_ROUTES || routes.len() > u32::MAX as usize {
            return idx;
        }
        idx.built = true;
        for (i, r) in routes.iter().enumerate() {
            let i = i as u32;
            match key_of(r) {
                Key::Prefix(p) => idx.by_prefix.entry(p.into_boxed_slice()).or_default().push(i),
                Key::Header(name, value) => {
                    let pos = match idx.by_header.iter().position(|(n, _)| **n == *name) {
                        Some(pos) => pos,
                        None => {
                            idx.by_header.push((name.into_boxed_str(), HashMap::new()));
                            idx.by_header.len() - 1
                        }
                    };
                    idx.by_header[pos].1.entry(value.into_boxed_str()).or_default().push(i);
                }
                Key::Always => idx.always.push(i),
            }
        }
        let mut lens: Vec<usize> = idx.by_prefix.keys().map(|k| k.len()).collect();
        lens.sort_unstable();
        lens.dedup();
        idx.prefix_lens = lens;
        idx
    }

    /// Whether the table is large enough to be indexed; otherwise scan every route.
    pub fn is_built(&self) -> bool {
        self.built
    }

    /// The candidate lists for a request: `path` is the path without its query; `header`
    /// gives the values of a request header (as the route matchers see them). Each list is
    /// sorted; together they hold every route that can match.
    pub fn candidates<'a>(
        &'a self,
        path: &[u8],
        mut header: impl FnMut(&str, &mut dyn FnMut(&str)),
        out: &mut Vec<&'a [u32]>,
    ) {
        out.clear();
        if !self.always.is_empty() {
            out.push(&self.always);
        }
        for &n in &self.prefix_lens {
            if n > path.len() {
                break;
            }
            if let Some(list) = self.by_prefix.get(&path[..n]) {
                out.push(list);
            }
        }
        for (name, values) in &self.by_header {
            header(name, &mut |v| {
                if let Some(list) = values.get(v) {
                    out.push(list);
                }
            });
        }
    }
}

/// The list a route is filed in: the most selective key it has.
fn key_of(r: &Route) -> Key {
    let m = &r.matcher;
    let literal: Option<Vec<u8>> = match &m.path {
        _ if !m.case_sensitive => None,
        PathMatch::Prefix(p) | PathMatch::Path(p) | PathMatch::PathSeparatedPrefix(p) => Some(p.as_bytes().to_vec()),
        PathMatch::SafeRegex(p) => regex_prefix(&p.source),
        PathMatch::Connect => None,
    };
    // `/` (or nothing) narrows nothing down: every path starts with it.
    if let Some(l) = literal.filter(|l| l.len() > 1) {
        return Key::Prefix(l);
    }
    for h in &m.headers {
        if let HeaderMatchSpec::String(s) = &h.spec
            && let StringMatchKind::Exact(v) = &s.kind
            && !s.ignore_case
            && !h.invert_match
            && !h.treat_missing_header_as_empty
        {
            return Key::Header(h.name.clone(), v.clone());
        }
    }
    Key::Always
}

/// The literal every full match of `source` starts with, from the regex's prefix literals.
fn regex_prefix(source: &str) -> Option<Vec<u8>> {
    let hir = regex_syntax::ParserBuilder::new().nest_limit(100).build().parse(source).ok()?;
    let seq = Extractor::new().kind(ExtractKind::Prefix).extract(&hir);
    seq.longest_common_prefix().map(<[u8]>::to_vec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_prefixes() {
        assert_eq!(regex_prefix("/re-7/[a-z]+/[0-9]+").as_deref(), Some(&b"/re-7/"[..]));
        assert_eq!(regex_prefix("/(api|app)/.*").as_deref(), Some(&b"/ap"[..]));
        assert_eq!(regex_prefix(".*").as_deref().unwrap_or_default(), b"");
        assert_eq!(regex_prefix("(?i)/abc").as_deref().unwrap_or_default(), b"/");
        assert_eq!(regex_prefix("/a|/b").as_deref(), Some(&b"/"[..]));
    }
}
