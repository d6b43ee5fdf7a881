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

/// Route indices grouped by key. Every group is a sorted run of one shared array, so a key
/// costs one map slot and no allocation of its own (a 10,000-route table has ~10,000 keys).
struct Groups<K> {
    /// Key -> (start, len) in `ids`.
    runs: HashMap<K, (u32, u32)>,
    ids: Box<[u32]>,
}

impl<K: std::hash::Hash + Eq + Ord> Groups<K> {
    /// `pairs` in route order; a stable sort by key keeps each group in route order.
    fn new(mut pairs: Vec<(K, u32)>) -> Groups<K> {
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut runs: HashMap<K, (u32, u32)> = HashMap::new();
        let mut ids = Vec::with_capacity(pairs.len());
        for (at, (key, id)) in pairs.into_iter().enumerate() {
            ids.push(id);
            // Indices fit in u32: the index is only built for tables of at most u32::MAX routes.
            runs.entry(key).or_insert((at as u32, 0)).1 += 1;
        }
        runs.shrink_to_fit();
        Groups { runs, ids: ids.into_boxed_slice() }
    }

    fn get<Q>(&self, key: &Q) -> Option<&[u32]>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let &(start, len) = self.runs.get(key)?;
        self.ids.get(start as usize..(start + len) as usize)
    }

    fn keys(&self) -> impl Iterator<Item = &K> {
        self.runs.keys()
    }
}

impl<K> Default for Groups<K> {
    fn default() -> Self {
        Groups { runs: HashMap::new(), ids: Box::default() }
    }
}

#[derive(Default)]
pub struct RouteIndex {
    /// Route indices by the literal their path must start with.
    by_prefix: Groups<Box<[u8]>>,
    /// The distinct lengths of the `by_prefix` keys, ascending: a path is looked up once per
    /// length, not once per byte.
    prefix_lens: Vec<usize>,
    /// Routes with no useful path literal that require one exact header value, by header
    /// name, then by value.
    by_header: Vec<(Box<str>, Groups<Box<str>>)>,
    /// Routes nothing narrows down.
    always: Vec<u32>,
    built: bool,
}

impl std::fmt::Debug for RouteIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteIndex")
            .field("built", &self.built)
            .field("prefixes", &self.by_prefix.runs.len())
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
        let mut prefixes = Vec::new();
        // (header name, (value, route) pairs), in first-seen order of the names.
        type ByName = Vec<(Box<str>, Vec<(Box<str>, u32)>)>;
        let mut headers: ByName = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            let i = i as u32;
            match key_of(r) {
                Key::Prefix(p) => prefixes.push((p.into_boxed_slice(), i)),
                Key::Header(name, value) => {
                    let pos = match headers.iter().position(|(n, _)| **n == *name) {
                        Some(pos) => pos,
                        None => {
                            headers.push((name.into_boxed_str(), Vec::new()));
                            headers.len() - 1
                        }
                    };
                    headers[pos].1.push((value.into_boxed_str(), i));
                }
                Key::Always => idx.always.push(i),
            }
        }
        idx.by_prefix = Groups::new(prefixes);
        idx.by_header = headers.into_iter().map(|(name, pairs)| (name, Groups::new(pairs))).collect();
        idx.always.shrink_to_fit();
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
