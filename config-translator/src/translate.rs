//! From documents to a [`Snapshot`]: decode every CEC, check references across CECs,
//! resolve EDS from Services and EndpointSlices, allocate listener ports, and assemble.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use serde_json::Value;

use crate::decode::cluster::{cluster, load_assignment};
use crate::decode::listener::{ListenerDraft, listener};
use crate::decode::route::route_configuration;
use crate::decode::tls::secret;
use crate::decode::{Cx, Refs};
use crate::diag::{Diagnostic, Sink};
use crate::document::{DocKind, Document, StoredDocument};
use crate::json::{Msg, Path, any};
use crate::k8s::{self, EndpointSlice, K8sSecret, Service};
use crate::model::*;
use crate::qualify::Scope;

/// Translator inputs other than the documents.
#[derive(Debug, Clone)]
pub struct Options {
    /// Range for listeners without an address (Cilium: 10000–20000).
    pub port_range: (u16, u16),
    /// Ports handed out before, by qualified listener name, so they stay stable.
    pub previous_ports: BTreeMap<String, u16>,
    /// This node's labels, for `spec.nodeSelector`. `None` selects every CEC.
    pub node_labels: Option<BTreeMap<String, String>>,
    /// The last accepted version of each CEC, by source name. A CEC whose new version is
    /// rejected keeps serving its last good version.
    pub last_good: BTreeMap<String, StoredDocument>,
    /// Where Sluice's admin server listens; backs the `/envoy-admin` cluster Cilium's
    /// admin/metrics listener examples route to.
    pub admin_address: Option<SocketAddr>,
    /// Whether allocated listeners also bind `[::1]` (Cilium does unless IPv4 is off).
    pub ipv6: bool,
    /// Addresses of this node that clients in other network namespaces (pods redirected by
    /// the fast path) reach Sluice on: allocated listeners bind them too, on the same port.
    pub node_addresses: Vec<std::net::IpAddr>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            port_range: (10000, 20000),
            previous_ports: BTreeMap::new(),
            node_labels: None,
            last_good: BTreeMap::new(),
            admin_address: None,
            ipv6: true,
            node_addresses: Vec::new(),
        }
    }
}

/// The result: a snapshot, and the documents that were accepted (to become the next
/// `last_good`).
#[derive(Debug)]
pub struct Translation {
    pub snapshot: Snapshot,
    pub accepted: BTreeMap<String, StoredDocument>,
}

/// Everything one CEC contributed.
struct Cec {
    name: String,
    kind: SourceKind,
    origin: String,
    doc: StoredDocument,
    listeners: Vec<ListenerDraft>,
    route_configs: Vec<RouteConfig>,
    clusters: Vec<Cluster>,
    load_assignments: Vec<(String, Vec<Endpoint>)>,
    secrets: Vec<(String, Secret)>,
    /// (service key, port filter entries, listener to redirect to, path)
    services: Vec<(String, Vec<u16>, Option<String>, String)>,
    /// Clusters that did not choose an upstream protocol.
    default_protocol: Vec<String>,
    backend_services: Vec<(String, Vec<String>)>,
    /// Raw JSON of each named resource, for telling identical duplicates from conflicts.
    raw: HashMap<String, String>,
    refs: Refs,
    sink: Sink,
}

impl Cec {
    fn rejected(&self) -> bool {
        self.sink.has_errors()
    }
}

pub fn translate(docs: &[Document], opts: &Options) -> Translation {
    let first = pass(docs, opts, &BTreeMap::new());
    // A rejected CEC falls back to its last good version: run again with those documents
    // substituted, carrying the new versions' errors along so they are still reported.
    let mut fallbacks: BTreeMap<String, Vec<Diagnostic>> = BTreeMap::new();
    let mut previous: BTreeMap<usize, Document> = BTreeMap::new();
    for (i, doc) in docs.iter().enumerate() {
        let name = match doc.kind() {
            k @ (DocKind::CiliumEnvoyConfig | DocKind::CiliumClusterwideEnvoyConfig) => scope_of(doc, k).source_name(),
            _ => continue,
        };
        if fallbacks.contains_key(&name)
            || !first.snapshot.sources.iter().any(|s| s.name == name && matches!(s.state, SourceState::Rejected { .. }))
        {
            continue;
        }
        // A stored document is our own serialisation of a parsed one: it always parses.
        if let Some(prev) = opts.last_good.get(&name).filter(|p| !p.is(doc)).and_then(|p| p.document().ok()) {
            let errors = first.snapshot.diagnostics.iter().filter(|d| d.source == name).cloned().collect();
            fallbacks.insert(name, errors);
            previous.insert(i, prev);
        }
    }
    if fallbacks.is_empty() {
        return first;
    }
    let substituted: Vec<Document> =
        docs.iter().enumerate().map(|(i, d)| previous.remove(&i).unwrap_or_else(|| d.clone())).collect();
    pass(&substituted, opts, &fallbacks)
}

/// One translation of a fixed set of documents. `fallbacks` names CECs that are being served
/// from their previous version, with the diagnostics of the rejected new version.
fn pass(docs: &[Document], opts: &Options, fallbacks: &BTreeMap<String, Vec<Diagnostic>>) -> Translation {
    let mut diags: Vec<Diagnostic> = Vec::new();
    let mut services: BTreeMap<String, Service> = BTreeMap::new();
    let mut slices: Vec<EndpointSlice> = Vec::new();
    let mut k8s_secrets: BTreeMap<String, Secret> = BTreeMap::new();
    let mut cec_docs: Vec<(&Document, DocKind)> = Vec::new();

    for doc in docs {
        match doc.kind() {
            DocKind::Service => {
                let mut sink = Sink::new(format!("Service {}", doc_key(doc)));
                if let Some(s) = k8s::decode::<Service>(&mut sink, &doc.value) {
                    services.insert(s.key(), s);
                }
                diags.extend(sink.items);
            }
            DocKind::EndpointSlice => {
                let mut sink = Sink::new(format!("EndpointSlice {}", doc_key(doc)));
                if let Some(s) = k8s::decode::<EndpointSlice>(&mut sink, &doc.value) {
                    if s.service_key().is_none() {
                        sink.warning(
                            "metadata.labels",
                            "EndpointSlice without the kubernetes.io/service-name label is ignored",
                        );
                    }
                    slices.push(s);
                }
                diags.extend(sink.items);
            }
            DocKind::Secret => {
                let mut sink = Sink::new(format!("Secret {}", doc_key(doc)));
                if let Some(s) = k8s::decode::<K8sSecret>(&mut sink, &doc.value)
                    && let Some(secret) = s.to_secret(&mut sink)
                {
                    k8s_secrets.insert(s.key(), secret);
                }
                diags.extend(sink.items);
            }
            k @ (DocKind::CiliumEnvoyConfig | DocKind::CiliumClusterwideEnvoyConfig) => cec_docs.push((doc, k)),
            DocKind::Other => {}
        }
    }

    // Decode every CEC. A CEC name seen twice keeps the first and reports the second.
    let mut cecs: Vec<Cec> = Vec::new();
    let mut sources: Vec<SourceReport> = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for (doc, kind) in cec_docs {
        let scope = scope_of(doc, kind);
        let name = scope.source_name();
        if let Some(first) = seen.get(&name) {
            diags.push(Diagnostic::error(
                &name,
                "metadata.name",
                format!("{name} is defined twice ({first} and {}); the second is ignored", doc.origin),
            ));
            continue;
        }
        seen.insert(name.clone(), doc.origin.clone());
        let mut cec = decode_cec(doc, kind, &scope);
        if !doc.has_explicit_kind() {
            cec.sink.warning("", "document has no apiVersion/kind; read as a CiliumEnvoyConfig");
        }
        if let Some(labels) = &opts.node_labels
            && !node_selected(&doc.value, labels, &mut cec.sink)
        {
            diags.append(&mut cec.sink.items);
            sources.push(report(&cec, SourceState::NotSelected));
            continue;
        }
        cecs.push(cec);
    }
    cecs.sort_by(|a, b| a.name.cmp(&b.name));

    // Cross-CEC checks, to a fixed point: rejecting a CEC removes its clusters, which can
    // leave another CEC's routes dangling.
    let admin_cluster = opts.admin_address.map(admin_cluster);
    loop {
        let before = cecs.iter().filter(|c| c.rejected()).count();
        check_conflicts(&mut cecs);
        check_references(&mut cecs, &k8s_secrets, admin_cluster.is_some());
        if cecs.iter().filter(|c| c.rejected()).count() == before {
            break;
        }
    }

    assemble(cecs, sources, diags, services, slices, k8s_secrets, admin_cluster, opts, fallbacks)
}

fn doc_key(doc: &Document) -> String {
    let ns = doc.namespace();
    if ns.is_empty() { doc.name().to_string() } else { format!("{ns}/{}", doc.name()) }
}

fn scope_of(doc: &Document, kind: DocKind) -> Scope {
    let namespace = match kind {
        DocKind::CiliumClusterwideEnvoyConfig => String::new(),
        _ => {
            let ns = doc.namespace();
            if ns.is_empty() { "default".to_string() } else { ns.to_string() }
        }
    };
    Scope { namespace, name: doc.name().to_string() }
}

fn report(cec: &Cec, state: SourceState) -> SourceReport {
    SourceReport {
        kind: cec.kind.clone(),
        name: cec.name.clone(),
        origin: cec.origin.clone(),
        state,
        listeners: cec.listeners.iter().map(|l| l.listener.name.clone()).collect(),
        route_configs: cec.route_configs.iter().map(|r| r.name.clone()).collect(),
        clusters: cec.clusters.iter().map(|c| c.name.clone()).collect(),
        secrets: cec.secrets.iter().map(|(n, _)| n.clone()).collect(),
    }
}

/// `spec.nodeSelector` against this node's labels (matchLabels and matchExpressions).
fn node_selected(v: &Value, labels: &BTreeMap<String, String>, sink: &mut Sink) -> bool {
    let Some(sel) = v.pointer("/spec/nodeSelector") else {
        return true;
    };
    if sel.is_null() {
        return true;
    }
    if let Some(ml) = sel.get("matchLabels").and_then(Value::as_object) {
        for (k, want) in ml {
            if labels.get(k).map(String::as_str) != want.as_str() {
                return false;
            }
        }
    }
    if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
        for (i, e) in exprs.iter().enumerate() {
            let key = e.get("key").and_then(Value::as_str).unwrap_or("");
            let op = e.get("operator").and_then(Value::as_str).unwrap_or("");
            let values: Vec<&str> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let have = labels.get(key).map(String::as_str);
            let ok = match op {
                "In" => have.is_some_and(|h| values.contains(&h)),
                "NotIn" => !have.is_some_and(|h| values.contains(&h)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                other => {
                    sink.warning(
                        &format!("spec.nodeSelector.matchExpressions[{i}].operator"),
                        format!("invalid operator {other:?}: the CEC is skipped, as Cilium does"),
                    );
                    false
                }
            };
            if !ok {
                return false;
            }
        }
    }
    true
}

const LISTENER: &str = "envoy.config.listener.v3.Listener";
const ROUTE: &str = "envoy.config.route.v3.RouteConfiguration";
const CLUSTER: &str = "envoy.config.cluster.v3.Cluster";
const CLA: &str = "envoy.config.endpoint.v3.ClusterLoadAssignment";
const SECRET: &str = "envoy.extensions.transport_sockets.tls.v3.Secret";

fn decode_cec(doc: &Document, kind: DocKind, scope: &Scope) -> Cec {
    let source = scope.source_name();
    let mut sink = Sink::new(source.clone());
    let mut out = Cec {
        name: source.clone(),
        kind: if kind == DocKind::CiliumClusterwideEnvoyConfig {
            SourceKind::CiliumClusterwideEnvoyConfig
        } else {
            SourceKind::CiliumEnvoyConfig
        },
        origin: doc.origin.clone(),
        doc: StoredDocument::new(doc),
        listeners: Vec::new(),
        route_configs: Vec::new(),
        clusters: Vec::new(),
        load_assignments: Vec::new(),
        secrets: Vec::new(),
        services: Vec::new(),
        default_protocol: Vec::new(),
        backend_services: Vec::new(),
        raw: HashMap::new(),
        refs: Refs::default(),
        sink: Sink::new(source.clone()),
    };
    if scope.name.is_empty() {
        sink.error("metadata.name", "missing metadata.name");
    }
    if let Some(api) = doc.value.get("apiVersion").and_then(Value::as_str)
        && api != "cilium.io/v2"
        && api != "cilium.io/v2alpha1"
    {
        sink.error("apiVersion", format!("unsupported apiVersion {api:?} (cilium.io/v2 or cilium.io/v2alpha1)"));
    }
    let Some(spec_v) = doc.value.get("spec") else {
        sink.error("spec", "missing spec");
        out.sink = sink;
        return out;
    };
    let Some(spec) = Msg::new(&mut sink, "CiliumEnvoyConfigSpec", Path::root("spec"), spec_v) else {
        out.sink = sink;
        return out;
    };
    let mut cx = Cx { sink: &mut sink, scope, refs: Refs::default() };

    // spec.services: redirected Services. In a CEC the namespace is the CEC's own
    // (Cilium's documented behaviour); in a CCEC it defaults to "default".
    for s in spec.msgs(cx.sink, "services", "ServiceListener") {
        let path = s.path.to_string();
        let name = s.str(cx.sink, "name").unwrap_or_default();
        let ns_given = s.str(cx.sink, "namespace");
        let ns = if scope.namespace.is_empty() {
            ns_given.unwrap_or_else(|| "default".into())
        } else {
            scope.namespace.clone()
        };
        let mut ports = Vec::new();
        for (v, p) in s.list(cx.sink, "ports") {
            match crate::json::parse_u64(cx.sink, &p, v) {
                Some(n @ 1..=65535) => ports.push(n as u16),
                Some(n) => cx.sink.error(p.as_str(), format!("port {n} is out of range")),
                None => {}
            }
        }
        let listener = s.str(cx.sink, "listener").filter(|l| !l.is_empty()).map(|l| scope.qualify_forced(&l));
        s.skip("cec");
        s.finish(cx.sink);
        if name.is_empty() {
            cx.sink.error(&path, "service without a name");
            continue;
        }
        out.services.push((format!("{ns}/{name}"), ports, listener, path));
    }
    for s in spec.msgs(cx.sink, "backend_services", "Service") {
        let name = s.str(cx.sink, "name").unwrap_or_default();
        let ns = s
            .str(cx.sink, "namespace")
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| if scope.namespace.is_empty() { "default".into() } else { scope.namespace.clone() });
        let mut filter = Vec::new();
        for (v, p) in s.list(cx.sink, "number") {
            match v {
                Value::String(x) => filter.push(x.clone()),
                Value::Number(n) => filter.push(n.to_string()),
                other => cx
                    .sink
                    .error(p.as_str(), format!("expected a port name or number, found {}", crate::json::kind(other))),
            }
        }
        let path = s.path.to_string();
        s.finish(cx.sink);
        if name.is_empty() {
            cx.sink.error(&path, "backend service without a name");
            continue;
        }
        out.backend_services.push((format!("{ns}/{name}"), filter));
    }
    spec.skip("node_selector");
    spec.ignore(cx.sink, "version_info", "not part of the CiliumEnvoyConfig schema");

    let resources = spec.list(cx.sink, "resources");
    let mut names: HashMap<(&'static str, String), String> = HashMap::new();
    for (v, path) in resources {
        let Some((ty, val, vpath)) = any(cx.sink, &path, v) else {
            continue;
        };
        let (kind, name) = match ty.as_str() {
            LISTENER => {
                let Some(m) = Msg::new(cx.sink, "Listener", vpath, val) else {
                    continue;
                };
                let Some(l) = listener(&mut cx, m, &source) else {
                    continue;
                };
                let n = l.listener.name.clone();
                out.listeners.push(l);
                ("listener", n)
            }
            ROUTE => {
                let Some(m) = Msg::new(cx.sink, "RouteConfiguration", vpath, val) else {
                    continue;
                };
                let Some(r) = route_configuration(&mut cx, m, &source) else {
                    continue;
                };
                if r.name.is_empty() {
                    cx.sink.error(path.as_str(), "route configuration without a name");
                    continue;
                }
                let n = r.name.clone();
                out.route_configs.push(r);
                ("route configuration", n)
            }
            CLUSTER => {
                let Some(m) = Msg::new(cx.sink, "Cluster", vpath, val) else {
                    continue;
                };
                let Some((c, explicit_protocol)) = cluster(&mut cx, m, &source) else {
                    continue;
                };
                if !explicit_protocol {
                    out.default_protocol.push(c.name.clone());
                }
                let n = c.name.clone();
                out.clusters.push(c);
                ("cluster", n)
            }
            CLA => {
                let Some(m) = Msg::new(cx.sink, "ClusterLoadAssignment", vpath, val) else {
                    continue;
                };
                let (n, eps) = load_assignment(&mut cx, m, false);
                if n.is_empty() {
                    cx.sink.error(path.as_str(), "ClusterLoadAssignment without a cluster_name");
                    continue;
                }
                out.load_assignments.push((n.clone(), eps));
                ("endpoint assignment", n)
            }
            SECRET => {
                let Some(m) = Msg::new(cx.sink, "Secret", vpath, val) else {
                    continue;
                };
                let Some((n, s)) = secret(&mut cx, m) else {
                    continue;
                };
                out.secrets.push((n.clone(), s));
                ("secret", n)
            }
            other => {
                cx.sink.error(path.as_str(), format!("unsupported resource type {other} (allowed: Listener, RouteConfiguration, Cluster, ClusterLoadAssignment, Secret)"));
                continue;
            }
        };
        if let Some(prev) = names.insert((kind, name.clone()), path.to_string()) {
            cx.sink.error(path.as_str(), format!("duplicate {kind} name {name:?} (also at {prev})"));
        }
        // Compact text, not a clone of the tree: a 10,000-route configuration is ~30 MiB as a
        // tree and ~2 MiB as text, and text is all the conflict check compares.
        out.raw.insert(format!("{kind}:{name}"), v.to_string());
    }
    spec.finish(cx.sink);
    out.refs = cx.refs;

    // Cilium injects its filters, and with them an upstream protocol for clusters that set
    // none, into CECs that redirect Services (or carry the inject annotation):
    // `use_downstream_protocol_config{http2}`, or `auto_config` for TLS clusters.
    let inject = doc
        .value
        .pointer("/metadata/annotations/cec.cilium.io~1inject-cilium-filters")
        .and_then(Value::as_str)
        .map(|v| v == "true")
        .unwrap_or(!out.services.is_empty());
    if inject && out.listeners.iter().any(|l| !l.listener.internal) {
        for c in &mut out.clusters {
            if out.default_protocol.contains(&c.name) {
                c.protocol =
                    if c.tls.is_some() { UpstreamProtocol::Auto } else { UpstreamProtocol::UseDownstream { h2: true } };
            }
        }
    }

    // An internal listener reference must name an internal listener of this CEC.
    for (l, p) in &out.refs.internal_listeners {
        if !out.listeners.iter().any(|d| &d.listener.name == l && d.listener.internal) {
            sink.error(p, format!("{l:?} is not an internal listener of this CEC"));
        }
    }
    // A redirect to a listener this CEC does not define redirects nothing (as in Cilium).
    for (svc, _, l, p) in &out.services {
        if let Some(l) = l
            && !out.listeners.iter().any(|d| &d.listener.name == l)
        {
            sink.warning(
                &format!("{p}.listener"),
                format!("listener {l:?} is not defined in this CEC; Service {svc} is not redirected"),
            );
        }
    }
    out.sink = sink;
    out
}

/// The same name defined by two CECs: identical definitions are fine (Cilium shares them),
/// different ones reject the CEC that comes later in name order.
fn check_conflicts(cecs: &mut [Cec]) {
    let mut owners: HashMap<String, (usize, String)> = HashMap::new();
    let mut addr_owner: HashMap<SocketAddr, (usize, String)> = HashMap::new();
    for i in 0..cecs.len() {
        if cecs[i].rejected() {
            continue;
        }
        let mut errs = Vec::new();
        let mut keys: Vec<(&String, &String)> = cecs[i].raw.iter().collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        for (key, raw) in keys {
            if let Some((j, other)) = owners.get(key) {
                if other != raw {
                    errs.push(format!(
                        "{} is also defined, differently, by {}",
                        key.replacen(':', " ", 1),
                        cecs[*j].name
                    ));
                }
            } else {
                owners.insert(key.clone(), (i, raw.clone()));
            }
        }
        for l in &cecs[i].listeners {
            for a in &l.listener.addresses {
                if let Some((j, name)) = addr_owner.get(a) {
                    if *j != i || name != &l.listener.name {
                        errs.push(format!(
                            "listener {} binds {a}, which listener {name} of {} already binds",
                            l.listener.name, cecs[*j].name
                        ));
                    }
                } else {
                    addr_owner.insert(*a, (i, l.listener.name.clone()));
                }
            }
        }
        for e in errs {
            cecs[i].sink.error("", e);
        }
    }
}

fn check_references(cecs: &mut [Cec], k8s_secrets: &BTreeMap<String, Secret>, admin: bool) {
    let clusters: BTreeSet<String> = cecs
        .iter()
        .filter(|c| !c.rejected())
        .flat_map(|c| c.clusters.iter().map(|cl| cl.name.clone()))
        .chain(admin.then(|| ADMIN_CLUSTER.to_string()))
        .collect();
    let secrets: BTreeSet<String> = cecs
        .iter()
        .filter(|c| !c.rejected())
        .flat_map(|c| c.secrets.iter().map(|(n, _)| n.clone()))
        .chain(k8s_secrets.keys().cloned())
        .collect();
    for cec in cecs.iter_mut() {
        if cec.rejected() {
            continue;
        }
        let mut errs = Vec::new();
        let mut warns = Vec::new();
        for (c, p) in &cec.refs.clusters {
            if !clusters.contains(c) {
                let bare = crate::qualify::parse_qualified_name(c).2;
                let msg = if BOOTSTRAP_CLUSTERS.contains(&bare) {
                    format!(
                        "undefined cluster {c:?}: {bare:?} names a bootstrap cluster of cilium-envoy, but bare names are qualified to the CEC; write \"/{bare}\"{}",
                        if bare == "envoy-admin" { "" } else { " (only /envoy-admin exists in Sluice)" }
                    )
                } else {
                    format!("undefined cluster {c:?}: no accepted CEC defines it")
                };
                errs.push((p.clone(), msg));
            }
        }
        for (s, p) in &cec.refs.secrets {
            if !secrets.contains(s) {
                warns.push((p.clone(), format!("secret {s:?} is not known yet; TLS using it fails until it arrives")));
            }
        }
        for (p, m) in errs {
            cec.sink.error(&p, m);
        }
        for (p, m) in warns {
            if !cec.sink.items.iter().any(|d| d.path == p) {
                cec.sink.warning(&p, m);
            }
        }
    }
}

pub const ADMIN_CLUSTER: &str = "/envoy-admin";

/// Static clusters of cilium-envoy's bootstrap, which old examples name without the
/// leading slash.
const BOOTSTRAP_CLUSTERS: &[&str] = &[
    "envoy-admin",
    "ingress-cluster",
    "egress-cluster",
    "ingress-cluster-tls",
    "egress-cluster-tls",
    "xds-grpc-cilium",
];

/// The static cluster behind Cilium's `/envoy-admin` (the proxy's own admin API).
fn admin_cluster(addr: SocketAddr) -> Cluster {
    Cluster {
        name: ADMIN_CLUSTER.to_string(),
        source: "builtin".to_string(),
        discovery: Discovery::Static,
        connect_timeout: std::time::Duration::from_secs(1),
        lb_policy: LbPolicy::RoundRobin,
        endpoints: vec![Endpoint {
            address: EndpointAddress::Socket(addr),
            weight: 1,
            health: EndpointHealth::Healthy,
            priority: 0,
            hostname: None,
        }],
        circuit_breakers: crate::decode::cluster::default_circuit_breakers(),
        outlier_detection: None,
        protocol: UpstreamProtocol::Http1,
        http2: Http2Options::default(),
        idle_timeout: Some(std::time::Duration::from_secs(60)),
        max_requests_per_connection: None,
        max_connection_duration: None,
        tls: None,
        dns_lookup_family: DnsLookupFamily::Auto,
        dns_refresh_rate: std::time::Duration::from_secs(5),
        per_connection_buffer_limit_bytes: 1024 * 1024,
        healthy_panic_threshold: 0.5,
        close_connections_on_host_set_change: false,
    }
}

/// Cilium's stable port allocation: hash the qualified name into the range, then probe.
fn allocate_port(name: &str, range: (u16, u16), used: &BTreeSet<u16>, previous: &BTreeMap<String, u16>) -> Option<u16> {
    let (lo, hi) = (range.0.min(range.1), range.0.max(range.1));
    if let Some(&p) = previous.get(name)
        && (lo..=hi).contains(&p)
        && !used.contains(&p)
    {
        return Some(p);
    }
    let span = u32::from(hi - lo) + 1;
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (0..span).map(|i| lo + ((h.wrapping_add(i)) % span) as u16).find(|p| !used.contains(p))
}

#[allow(clippy::too_many_arguments)]
fn assemble(
    cecs: Vec<Cec>,
    mut sources: Vec<SourceReport>,
    mut diags: Vec<Diagnostic>,
    services: BTreeMap<String, Service>,
    slices: Vec<EndpointSlice>,
    k8s_secrets: BTreeMap<String, Secret>,
    admin_cluster: Option<Cluster>,
    opts: &Options,
    fallbacks: &BTreeMap<String, Vec<Diagnostic>>,
) -> Translation {
    let mut snapshot = Snapshot::default();
    let mut accepted_docs = BTreeMap::new();
    let mut accepted: Vec<Cec> = Vec::new();
    let reason_of = |items: &[Diagnostic]| {
        items
            .iter()
            .find(|d| d.is_error())
            .map(|d| if d.path.is_empty() { d.message.clone() } else { format!("{}: {}", d.path, d.message) })
            .unwrap_or_default()
    };
    for cec in cecs {
        if cec.rejected() {
            sources.push(report(&cec, SourceState::Rejected { reason: reason_of(&cec.sink.items) }));
            if let Some(new_errors) = fallbacks.get(&cec.name) {
                diags.extend(new_errors.iter().cloned());
            }
            diags.extend(cec.sink.items);
            continue;
        }
        match fallbacks.get(&cec.name) {
            Some(new_errors) => {
                sources.push(report(&cec, SourceState::PreviousVersion { reason: reason_of(new_errors) }));
                diags.extend(new_errors.iter().cloned());
                diags.push(Diagnostic::warning(
                    cec.name.clone(),
                    "",
                    "the new version is rejected; the previous version keeps serving",
                ));
            }
            None => sources.push(report(&cec, SourceState::Accepted)),
        }
        accepted_docs.insert(cec.name.clone(), cec.doc.clone());
        accepted.push(cec);
    }

    // EDS: the port filter of a Service is the union over the accepted CECs naming it.
    let mut referenced: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for cec in &accepted {
        for (svc, ports, _, _) in &cec.services {
            referenced.entry(svc.clone()).or_default().extend(ports.iter().map(u16::to_string));
        }
        for (svc, filter) in &cec.backend_services {
            referenced.entry(svc.clone()).or_default().extend(filter.iter().cloned());
        }
    }
    let mut eds = k8s::load_assignments(&referenced, &services, &slices);
    for cec in &mut accepted {
        for (name, eps) in std::mem::take(&mut cec.load_assignments) {
            eds.insert(name, eps);
        }
    }

    // Listener ports.
    let mut used: BTreeSet<u16> = accepted
        .iter()
        .flat_map(|c| c.listeners.iter())
        .flat_map(|l| l.listener.addresses.iter().map(SocketAddr::port))
        .collect();
    let mut listener_names: Vec<(usize, usize)> = Vec::new();
    for (ci, cec) in accepted.iter().enumerate() {
        for li in 0..cec.listeners.len() {
            listener_names.push((ci, li));
        }
    }
    listener_names
        .sort_by(|a, b| accepted[a.0].listeners[a.1].listener.name.cmp(&accepted[b.0].listeners[b.1].listener.name));
    for (ci, li) in listener_names {
        let l = &mut accepted[ci].listeners[li].listener;
        if !l.addresses.is_empty() || l.internal {
            continue;
        }
        match allocate_port(&l.name, opts.port_range, &used, &opts.previous_ports) {
            Some(p) => {
                used.insert(p);
                l.addresses.push(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), p));
                if opts.ipv6 {
                    l.addresses.push(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), p));
                }
                for ip in &opts.node_addresses {
                    l.addresses.push(SocketAddr::new(*ip, p));
                }
                l.port_allocated = true;
            }
            None => diags.push(Diagnostic::error(
                l.source.clone(),
                "",
                format!("no free port in {}-{} for listener {}", opts.port_range.0, opts.port_range.1, l.name),
            )),
        }
    }

    // Redirects: spec.services -> the named listener, or the first (by qualified name) of
    // this CEC's listeners that has a port.
    for cec in &accepted {
        for (svc, ports, listener, _) in &cec.services {
            let target = match listener {
                Some(l) => cec.listeners.iter().find(|d| &d.listener.name == l),
                None => cec
                    .listeners
                    .iter()
                    .filter(|d| d.listener.port().is_some())
                    .min_by(|a, b| a.listener.name.cmp(&b.listener.name)),
            };
            let Some(t) = target.and_then(|t| t.listener.port().map(|p| (t, p))) else {
                cec.sink_warning(
                    &mut diags,
                    format!("service {svc} is not redirected: this CEC has no listener with a port"),
                );
                continue;
            };
            let frontends = services
                .get(svc)
                .map(|s| {
                    let mut f = Vec::new();
                    for ip in s.cluster_ips() {
                        for sp in &s.spec.ports {
                            if sp.protocol.as_deref().unwrap_or("TCP") == "TCP"
                                && (ports.is_empty() || ports.contains(&sp.port))
                            {
                                f.push(SocketAddr::new(ip, sp.port));
                            }
                        }
                    }
                    f
                })
                .unwrap_or_default();
            snapshot.redirects.push(ServiceRedirect {
                service: svc.clone(),
                source: cec.name.clone(),
                ports: ports.clone(),
                listener: t.0.listener.name.clone(),
                proxy_port: t.1,
                frontends,
            });
        }
    }

    // Clusters, with EDS endpoints resolved.
    let mut clusters: BTreeMap<String, Arc<Cluster>> = BTreeMap::new();
    if let Some(a) = admin_cluster {
        clusters.insert(a.name.clone(), Arc::new(a));
    }
    for cec in &mut accepted {
        for mut c in std::mem::take(&mut cec.clusters) {
            if let Discovery::Eds { service_name } = &c.discovery {
                match eds.get(service_name) {
                    Some(eps) => c.endpoints = eps.clone(),
                    None => {
                        let svc = service_name.split(':').next().unwrap_or(service_name);
                        let msg = if referenced.contains_key(svc) {
                            format!(
                                "cluster {}: no endpoints for EDS name {service_name:?} yet (Service or EndpointSlices not seen)",
                                c.name
                            )
                        } else if service_name.matches('/').count() == 1 {
                            format!(
                                "cluster {}: EDS name {service_name:?} refers to Service {svc}, which no CEC lists in spec.services or spec.backendServices, so it gets no endpoints",
                                c.name
                            )
                        } else {
                            format!("cluster {}: no ClusterLoadAssignment named {service_name:?}", c.name)
                        };
                        diags.push(Diagnostic::warning(cec.name.clone(), "", msg));
                    }
                }
            }
            clusters.insert(c.name.clone(), Arc::new(c));
        }
    }

    // Route configurations, then listeners with their RDS references resolved.
    let mut routes: BTreeMap<String, Arc<RouteConfig>> = BTreeMap::new();
    for cec in &mut accepted {
        for r in std::mem::take(&mut cec.route_configs) {
            routes.insert(r.name.clone(), Arc::new(r));
        }
    }
    let mut listeners = Vec::new();
    for cec in &mut accepted {
        for d in std::mem::take(&mut cec.listeners) {
            let mut l = d.listener;
            for chain in l.filter_chains.iter_mut().chain(l.default_filter_chain.iter_mut()) {
                if let NetworkFilter::HttpConnectionManager(hcm) = &mut chain.filter
                    && hcm.route_config.is_none()
                {
                    let found = routes.get(&hcm.route_config_name).cloned();
                    if found.is_none() {
                        diags.push(Diagnostic::warning(
                            cec.name.clone(),
                            d.path.as_str(),
                            format!(
                                "route configuration {:?} is not defined; requests on this listener get 404",
                                hcm.route_config_name
                            ),
                        ));
                    }
                    if let Some(h) = Arc::get_mut(hcm) {
                        h.route_config = found;
                    }
                }
            }
            listeners.push(Arc::new(l));
        }
        for (n, s) in std::mem::take(&mut cec.secrets) {
            snapshot.secrets.insert(n, Arc::new(s));
        }
        diags.extend(std::mem::take(&mut cec.sink.items));
    }
    for (n, s) in k8s_secrets {
        snapshot.secrets.entry(n).or_insert_with(|| Arc::new(s));
    }
    listeners.sort_by(|a, b| a.name.cmp(&b.name));
    snapshot.listeners = listeners;
    snapshot.route_configs = routes;
    snapshot.clusters = clusters;
    snapshot.endpoints = eds;
    sources.sort_by(|a, b| a.name.cmp(&b.name));
    snapshot.sources = sources;
    snapshot.diagnostics = diags;
    Translation { snapshot, accepted: accepted_docs }
}

impl Cec {
    fn sink_warning(&self, diags: &mut Vec<Diagnostic>, msg: String) {
        diags.push(Diagnostic::warning(self.name.clone(), "spec.services", msg));
    }
}
