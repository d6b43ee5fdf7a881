//! Export of translated CECs as an Envoy v3 bootstrap.
//!
//! Differential tests and benchmarks run real Envoy on *the same* CiliumEnvoyConfigs Sluice
//! serves. Envoy cannot read a CEC, and Cilium's agent is not there to feed it over xDS, so
//! this module does the agent's part offline: it rewrites the accepted CECs' Envoy resources
//! the way `ParseResources` does (name qualification, config-source fill-ins, circuit-breaker
//! defaults, upstream protocol options), resolves what the agent would serve dynamically
//! (routes over RDS, endpoints over EDS, secrets over SDS) into static configuration, and
//! removes the Cilium extensions stock Envoy does not have. The result is a bootstrap that
//! makes Envoy behave as cilium-envoy would on a node where the agent pushed these CECs.
//!
//! The export works on the CEC JSON itself, not on Sluice's model, so that Envoy sees every
//! field the user wrote — including those Sluice ignores. Only what the agent computes (listener
//! ports, endpoints from Services/EndpointSlices, Kubernetes Secrets) comes from the
//! [`Translation`].
//!
//! Everything is normalised to snake_case first, so each rewrite looks for one spelling.
//! Map keys that are user data (filter names in `typed_per_filter_config`, cluster names in
//! `cluster_min_healthy_percentages`, metadata namespaces, `json_format` keys) are kept as
//! written.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde_json::{Map, Value, json};

use crate::document::{DocKind, Document};
use crate::json::snake_case;
use crate::model::{DataSource, Endpoint, EndpointAddress, EndpointHealth, Secret};
use crate::qualify::Scope;
use crate::translate::{ADMIN_CLUSTER, Translation};

/// What the bootstrap needs beyond the translation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// Envoy's admin listener, e.g. `127.0.0.1:19901`. Cilium's `/envoy-admin` cluster points
    /// here, as it points at the admin socket in cilium-envoy.
    pub admin_address: SocketAddr,
    /// Worker threads. A bootstrap cannot carry this (it is Envoy's `--concurrency` flag);
    /// [`ExportOptions::envoy_args`] turns it into arguments.
    pub concurrency_hint: Option<u32>,
}

impl ExportOptions {
    /// Command-line arguments that belong with the bootstrap (`--concurrency N`).
    pub fn envoy_args(&self) -> Vec<String> {
        match self.concurrency_hint {
            Some(n) => vec!["--concurrency".to_string(), n.to_string()],
            None => Vec::new(),
        }
    }
}

/// Why a translation cannot be exported faithfully. `cec` is the source (`namespace/name`, or
/// `/name` for a clusterwide config) and `path` the JSON path inside it, with keys in
/// snake_case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// Something Envoy would not accept, or that only cilium-envoy implements.
    #[error("{cec}: {path}: {message}")]
    Unsupported { cec: String, path: String, message: String },
    /// The JSON does not have the shape of the Envoy message it should be.
    #[error("{cec}: {path}: {message}")]
    Malformed { cec: String, path: String, message: String },
    /// A listener without an address for which the translation allocated no port.
    #[error("{cec}: {path}: listener {listener} has no address and the translation allocated none")]
    NoAddress { cec: String, path: String, listener: String },
    /// Two sources define one Envoy resource name differently.
    #[error("{kind} {name:?} is defined differently by {first} and {second}")]
    Conflict { kind: &'static str, name: String, first: String, second: String },
}

/// Builds the bootstrap. `docs` are the documents given to `translate` (their Kubernetes
/// Secrets become static secrets), `t` is its result. What Cilium or Envoy would refuse is
/// left out, as [`envoy_export`] describes.
pub fn envoy_bootstrap(docs: &[Document], t: &Translation, opts: &ExportOptions) -> Result<Value, ExportError> {
    envoy_export(docs, t, opts).map(|e| e.bootstrap)
}

/// The bootstrap and what was left out of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    pub bootstrap: Value,
    /// Resources cilium-envoy would not end up with although Sluice accepted them.
    pub dropped: Vec<Dropped>,
}

/// Something Sluice accepts but cilium-envoy would not run: a whole CEC that Cilium's agent
/// refuses (its protoc-gen-validate check), or one resource that Envoy NACKs (Envoy applies
/// the rest of an LDS/CDS update and rejects only the offending resource). Leaving it out is
/// what makes the export behave like cilium-envoy — and each entry is a place where Sluice
/// and Cilium differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// The CEC (`namespace/name`, `/name` for a clusterwide one).
    pub cec: String,
    /// JSON path of the offending field, keys in snake_case.
    pub path: String,
    /// What was left out: `CiliumEnvoyConfig <name>`, `listener <name>` or `cluster <name>`.
    pub what: String,
    pub reason: String,
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {} left out: {}", self.cec, self.path, self.what, self.reason)
    }
}

/// [`envoy_bootstrap`], with the list of what was left out.
pub fn envoy_export(docs: &[Document], t: &Translation, opts: &ExportOptions) -> Result<Export, ExportError> {
    let mut ex = Exporter::new(t);
    let mut listeners: Vec<(Scope, At, Map<String, Value>)> = Vec::new();
    let mut clusters: Vec<(Scope, At, Map<String, Value>, bool)> = Vec::new();

    // Routes, endpoint assignments and secrets first: listeners inline routes, clusters fold
    // in endpoints, and both need to know which secrets exist.
    for (source, stored) in &t.accepted {
        let scope = scope_of(source);
        let at = At::new(source, "spec.resources");
        let doc = stored.document().map_err(|e| at.malformed(format!("the accepted document does not parse: {e}")))?;
        let raw = match doc.value.pointer("/spec/resources") {
            Some(Value::Array(items)) => items.as_slice(),
            None | Some(Value::Null) => &[],
            Some(_) => return Err(at.malformed("expected a list of resources")),
        };
        let mut resources = Vec::with_capacity(raw.len());
        for (i, r) in raw.iter().enumerate() {
            let at = at.index(i);
            let Value::Object(mut body) = normalize(r, &at)? else {
                return Err(at.malformed("expected an object with \"@type\""));
            };
            let ty = match body.remove("@type") {
                Some(Value::String(t)) => short_type(&t).to_string(),
                _ => return Err(at.malformed("missing \"@type\"")),
            };
            resources.push((at, ty, body));
        }
        if let Some((path, reason)) = agent_rejects(&resources) {
            ex.dropped.push(Dropped { cec: source.clone(), path, what: format!("CiliumEnvoyConfig {source}"), reason });
            continue;
        }

        let mut has_proxied_listener = false;
        let mut own_clusters = Vec::new();
        for (at, ty, mut body) in resources {
            match ty.as_str() {
                LISTENER => {
                    has_proxied_listener |= !present(&body, "internal_listener");
                    listeners.push((scope.clone(), at, body));
                }
                ROUTE => {
                    let mut rc = Value::Object(body);
                    ex.route_config(&scope, &at, &mut rc)?;
                    let name = str_field(&rc, "name").unwrap_or_default().to_string();
                    insert(&mut ex.routes, "route configuration", name, source, rc)?;
                }
                CLUSTER => own_clusters.push((at, body)),
                CLA => {
                    let mut cla = Value::Object(body);
                    qualify_load_assignment(&scope, &at, &mut cla)?;
                    let name = str_field(&cla, "cluster_name").unwrap_or_default().to_string();
                    insert(&mut ex.load_assignments, "ClusterLoadAssignment", name, source, cla)?;
                }
                SECRET => {
                    let name = scope.qualify(str_field_of(&body, "name").unwrap_or_default());
                    body.insert("name".into(), Value::String(name.clone()));
                    insert(&mut ex.secrets, "secret", name, source, Value::Object(body))?;
                }
                other => return Err(at.unsupported(format!("resource type {other} is not one Cilium accepts"))),
            }
        }
        // Cilium adds its upstream L7 filter, and with it default upstream protocol options,
        // to every cluster of a CEC that injects its filters into at least one listener.
        let inject_upstream = injects_cilium_filters(&doc) && has_proxied_listener;
        clusters.extend(own_clusters.into_iter().map(|(at, body)| (scope.clone(), at, body, inject_upstream)));
    }

    // Kubernetes Secrets, as the agent's secret sync names them. A CEC secret of the same
    // name wins, as it does in the translation.
    for doc in docs.iter().filter(|d| d.kind() == DocKind::Secret) {
        let ns = if doc.namespace().is_empty() { "default" } else { doc.namespace() };
        let key = format!("{ns}/{}", doc.name());
        if ex.secrets.contains_key(&key) {
            continue;
        }
        if let Some(secret) = t.snapshot.secrets.get(&key) {
            let at = At::new(&format!("Secret {key}"), "data");
            let value = kubernetes_secret(&at, &key, secret)?;
            ex.secrets.insert(key, Owned { source: at.cec, value });
        }
    }

    for (scope, at, body, inject_upstream) in clusters {
        ex.cluster(&scope, &at, body, inject_upstream)?;
    }
    for (scope, at, body) in listeners {
        ex.listener(&scope, &at, body)?;
    }
    let dropped = std::mem::take(&mut ex.dropped);
    Ok(Export { bootstrap: ex.finish(opts), dropped })
}

/// The check of Cilium's agent that the translation does not make: protoc-gen-validate on
/// each Listener, whose embedded `Address` needs a port. A failure rejects the whole CEC.
fn agent_rejects(resources: &[(At, String, Map<String, Value>)]) -> Option<(String, String)> {
    for (at, ty, body) in resources {
        if ty != LISTENER {
            continue;
        }
        let mut addresses: Vec<(At, &Value)> =
            body.get("address").map(|a| (at.field("address"), a)).into_iter().collect();
        let extra = body.get("additional_addresses").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
        for (i, e) in extra.iter().enumerate() {
            if let Some(a) = e.get("address") {
                addresses.push((at.field("additional_addresses").index(i).field("address"), a));
            }
        }
        for (aat, a) in addresses {
            if let Some(sa) = a.get("socket_address")
                && sa.get("port_value").is_none_or(Value::is_null)
                && sa.get("named_port").is_none_or(Value::is_null)
            {
                return Some((
                    aat.field("socket_address").path,
                    "the listener address has no port (Cilium's agent refuses the CEC)".into(),
                ));
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Type names

const LISTENER: &str = "envoy.config.listener.v3.Listener";
const ROUTE: &str = "envoy.config.route.v3.RouteConfiguration";
const CLUSTER: &str = "envoy.config.cluster.v3.Cluster";
const CLA: &str = "envoy.config.endpoint.v3.ClusterLoadAssignment";
const SECRET: &str = "envoy.extensions.transport_sockets.tls.v3.Secret";
const HCM: &str = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY: &str = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const DOWNSTREAM_TLS: &str = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const UPSTREAM_TLS: &str = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const QUIC_UPSTREAM: &str = "envoy.extensions.transport_sockets.quic.v3.QuicUpstreamTransport";
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const ROUTER: &str = "envoy.extensions.filters.http.router.v3.Router";
const HEALTH_CHECK: &str = "envoy.extensions.filters.http.health_check.v3.HealthCheck";
const EXT_AUTHZ: &str = "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";
const UPSTREAM_CODEC: &str = "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec";

/// Cilium's extensions that a stock Envoy does not have but whose job is Cilium's datapath
/// and policy, not the traffic the differential tests look at: dropped.
const CILIUM_BPF_METADATA: (&str, &str) = ("cilium.bpf_metadata", "cilium.BpfMetadata");
const CILIUM_NETWORK: (&str, &str) = ("cilium.network", "cilium.NetworkFilter");
const CILIUM_L7POLICY: (&str, &str) = ("cilium.l7policy", "cilium.L7Policy");

/// The bootstrap cluster through which cilium-envoy talks to the agent. The export uses it
/// only for secrets that nobody defines: Envoy then asks for them over SDS, as cilium-envoy
/// asks the agent, and gets no answer.
const XDS_CLUSTER: &str = "xds-grpc-cilium";

/// How long a listener waits for such a secret before it starts without it. Cilium waits
/// 30 s (`proxy-initial-fetch-timeout`), per listener; a static bootstrap holds back *every*
/// listener until its secrets arrive, so the export waits briefly instead.
const MISSING_SECRET_FETCH_TIMEOUT: &str = "0.5s";

/// cilium-envoy's connect timeout for its bootstrap clusters (`envoy.connectTimeoutSeconds`).
const BOOTSTRAP_CONNECT_TIMEOUT: &str = "2s";

/// The agent's defaults for clusters without `circuit_breakers` (`proxy-max-concurrent-retries`,
/// `proxy-cluster-max-{connections,requests,pending-requests}`).
fn cilium_circuit_breakers() -> Value {
    json!({"thresholds": [{
        "max_connections": 1024,
        "max_pending_requests": 1024,
        "max_requests": 1024,
        "max_retries": 128
    }]})
}

fn type_url(name: &str) -> String {
    format!("type.googleapis.com/{name}")
}

/// `type.googleapis.com/envoy.config.listener.v3.Listener` -> `envoy.config.listener.v3.Listener`.
fn short_type(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

// ---------------------------------------------------------------------------------------------
// Paths and errors

/// Where in which source a value is, for errors.
#[derive(Debug, Clone)]
struct At {
    cec: String,
    path: String,
}

impl At {
    fn new(cec: &str, path: &str) -> At {
        At { cec: cec.to_string(), path: path.to_string() }
    }

    fn field(&self, key: &str) -> At {
        At { cec: self.cec.clone(), path: format!("{}.{key}", self.path) }
    }

    fn index(&self, i: usize) -> At {
        At { cec: self.cec.clone(), path: format!("{}[{i}]", self.path) }
    }

    fn key(&self, key: &str) -> At {
        At { cec: self.cec.clone(), path: format!("{}[{key:?}]", self.path) }
    }

    fn unsupported(&self, message: impl Into<String>) -> ExportError {
        ExportError::Unsupported { cec: self.cec.clone(), path: self.path.clone(), message: message.into() }
    }

    fn malformed(&self, message: impl Into<String>) -> ExportError {
        ExportError::Malformed { cec: self.cec.clone(), path: self.path.clone(), message: message.into() }
    }
}

// ---------------------------------------------------------------------------------------------
// snake_case normalisation

/// How a field's value is normalised.
enum FieldKind {
    /// An Envoy message (or a list of them, or a scalar): keys are field names.
    Message,
    /// `map<string, Message>`: the keys are user data, the values messages.
    MapOfMessages,
    /// User data throughout (`google.protobuf.Struct`): copied as written.
    Verbatim,
}

fn field_kind(name: &str) -> FieldKind {
    match name {
        "typed_per_filter_config"
        | "typed_extension_protocol_options"
        | "typed_filter_metadata"
        | "cluster_min_healthy_percentages"
        | "source_codes"
        | "policies" => FieldKind::MapOfMessages,
        "filter_metadata" | "json_format" | "per_filter_config" | "extension_protocol_options" => FieldKind::Verbatim,
        _ => FieldKind::Message,
    }
}

/// Rewrites every field name to snake_case, leaving user-data keys alone, and unwraps
/// `TypedStruct`s into the plain `Any` they stand for, so the rewrites below see one shape.
fn normalize(v: &Value, at: &At) -> Result<Value, ExportError> {
    match v {
        Value::Object(obj) => {
            if let Some(Value::String(t)) = obj.get("@type") {
                let t = short_type(t);
                if t == "udpa.type.v1.TypedStruct" || t == "xds.type.v3.TypedStruct" {
                    return unwrap_typed_struct(obj, at);
                }
                // Well-known types (`Struct`, wrappers) carry their payload in `value`.
                if t.starts_with("google.protobuf.") {
                    return Ok(v.clone());
                }
            }
            let mut out = Map::with_capacity(obj.len());
            for (key, value) in obj {
                if key == "@type" {
                    out.insert(key.clone(), value.clone());
                    continue;
                }
                let name = snake_case(key);
                let fat = at.field(&name);
                let nv = match field_kind(&name) {
                    FieldKind::Verbatim => value.clone(),
                    FieldKind::MapOfMessages => match value {
                        Value::Object(map) => {
                            let mut m = Map::with_capacity(map.len());
                            for (k, item) in map {
                                m.insert(k.clone(), normalize(item, &fat.key(k))?);
                            }
                            Value::Object(m)
                        }
                        other => normalize(other, &fat)?,
                    },
                    FieldKind::Message => normalize(value, &fat)?,
                };
                if out.insert(name.clone(), nv).is_some() {
                    return Err(fat.malformed(format!("field `{name}` is given twice, in two spellings")));
                }
            }
            Ok(Value::Object(out))
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| normalize(item, &at.index(i)))
            .collect::<Result<_, _>>()
            .map(Value::Array),
        scalar => Ok(scalar.clone()),
    }
}

/// `{"@type": TypedStruct, "type_url": T, "value": {...}}` -> `{"@type": T, ...}`: Envoy reads
/// both the same way for a compiled-in message type.
fn unwrap_typed_struct(obj: &Map<String, Value>, at: &At) -> Result<Value, ExportError> {
    let url = match obj.get("type_url").or_else(|| obj.get("typeUrl")) {
        Some(Value::String(u)) => u.clone(),
        _ => return Err(at.malformed("TypedStruct without type_url")),
    };
    let inner = match obj.get("value") {
        Some(v @ Value::Object(_)) => normalize(v, &at.field("value"))?,
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(_) => return Err(at.field("value").malformed("expected an object")),
    };
    let Value::Object(mut m) = inner else {
        return Err(at.field("value").malformed("expected an object"));
    };
    let url = if url.contains('/') { url } else { type_url(&url) };
    m.insert("@type".into(), Value::String(url));
    Ok(Value::Object(m))
}

// ---------------------------------------------------------------------------------------------
// Small JSON helpers (on normalised values)

fn present(m: &Map<String, Value>, key: &str) -> bool {
    m.get(key).is_some_and(|v| !v.is_null())
}

fn str_field<'v>(v: &'v Value, key: &str) -> Option<&'v str> {
    v.get(key).and_then(Value::as_str)
}

fn str_field_of<'v>(m: &'v Map<String, Value>, key: &str) -> Option<&'v str> {
    m.get(key).and_then(Value::as_str)
}

/// The message name in an `Any` (`typed_config`), if any.
fn any_type(v: Option<&Value>) -> Option<&str> {
    v.and_then(|v| v.get("@type")).and_then(Value::as_str).map(short_type)
}

fn object_mut<'v>(v: &'v mut Value, at: &At) -> Result<&'v mut Map<String, Value>, ExportError> {
    v.as_object_mut().ok_or_else(|| at.malformed("expected an object"))
}

/// The elements of an optional repeated field, for rewriting in place.
fn list_mut<'v>(m: &'v mut Map<String, Value>, key: &str, at: &At) -> Result<&'v mut [Value], ExportError> {
    match m.get_mut(key) {
        None | Some(Value::Null) => Ok(&mut []),
        Some(Value::Array(items)) => Ok(items.as_mut_slice()),
        Some(_) => Err(at.field(key).malformed("expected a list")),
    }
}

/// Qualifies a string field in place (when present and non-empty) and returns the new value.
fn qualify_field(
    m: &mut Map<String, Value>,
    key: &str,
    at: &At,
    q: impl Fn(&str) -> String,
) -> Result<Option<String>, ExportError> {
    match m.get_mut(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => {
            *s = q(s);
            Ok(Some(s.clone()))
        }
        Some(_) => Err(at.field(key).malformed("expected a string")),
    }
}

fn socket_address(a: SocketAddr) -> Value {
    json!({"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}})
}

/// Whether Cilium injects its filters for this CEC: the `cec.cilium.io/inject-cilium-filters`
/// annotation (Go `strconv.ParseBool`), else whether `spec.services` is non-empty.
fn injects_cilium_filters(doc: &Document) -> bool {
    let annotation = doc
        .value
        .pointer("/metadata/annotations/cec.cilium.io~1inject-cilium-filters")
        .and_then(Value::as_str)
        .and_then(|s| match s {
            "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
            "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
            _ => None,
        });
    annotation
        .unwrap_or_else(|| doc.value.pointer("/spec/services").and_then(Value::as_array).is_some_and(|s| !s.is_empty()))
}

/// `ns/name` (or `/name` for a CCEC), as the translation keys its accepted documents.
fn scope_of(source: &str) -> Scope {
    let (namespace, name) = source.split_once('/').unwrap_or(("", source));
    Scope { namespace: namespace.to_string(), name: name.to_string() }
}

// ---------------------------------------------------------------------------------------------
// The exporter

/// A resource and the source that defined it first.
#[derive(Debug)]
struct Owned {
    source: String,
    value: Value,
}

fn insert(
    map: &mut BTreeMap<String, Owned>,
    kind: &'static str,
    name: String,
    source: &str,
    value: Value,
) -> Result<(), ExportError> {
    match map.get(&name) {
        // Cilium shares identical definitions between CECs.
        Some(prev) if prev.value == value => Ok(()),
        Some(prev) => Err(ExportError::Conflict { kind, name, first: prev.source.clone(), second: source.to_string() }),
        None => {
            map.insert(name, Owned { source: source.to_string(), value });
            Ok(())
        }
    }
}

struct Exporter<'a> {
    t: &'a Translation,
    routes: BTreeMap<String, Owned>,
    load_assignments: BTreeMap<String, Owned>,
    secrets: BTreeMap<String, Owned>,
    clusters: BTreeMap<String, Owned>,
    listeners: BTreeMap<String, Owned>,
    /// Every cluster a route, TCP proxy or filter refers to (qualified).
    cluster_refs: BTreeSet<String>,
    /// Some SDS reference names a secret nobody defines.
    needs_xds_cluster: bool,
    dropped: Vec<Dropped>,
}

impl<'a> Exporter<'a> {
    fn new(t: &'a Translation) -> Self {
        Exporter {
            t,
            routes: BTreeMap::new(),
            load_assignments: BTreeMap::new(),
            secrets: BTreeMap::new(),
            clusters: BTreeMap::new(),
            listeners: BTreeMap::new(),
            cluster_refs: BTreeSet::new(),
            needs_xds_cluster: false,
            dropped: Vec::new(),
        }
    }

    // --- routes ------------------------------------------------------------------------------

    /// `qualifyRouteConfigurationResourceNames`: route configuration and virtual host names
    /// with ForceNamespace, the clusters of route actions plainly.
    fn route_config(&mut self, scope: &Scope, at: &At, rc: &mut Value) -> Result<(), ExportError> {
        let rc = object_mut(rc, at)?;
        qualify_field(rc, "name", at, |n| scope.qualify_forced(n))?;
        let vat = at.field("virtual_hosts");
        for (i, vh) in list_mut(rc, "virtual_hosts", at)?.iter_mut().enumerate() {
            let vat = vat.index(i);
            let vh = object_mut(vh, &vat)?;
            qualify_field(vh, "name", &vat, |n| scope.qualify_forced(n))?;
            let rat = vat.field("routes");
            for (j, route) in list_mut(vh, "routes", &vat)?.iter_mut().enumerate() {
                let rat = rat.index(j);
                let route = object_mut(route, &rat)?;
                let Some(action) = route.get_mut("route") else { continue };
                let aat = rat.field("route");
                let action = object_mut(action, &aat)?;
                if let Some(c) = qualify_field(action, "cluster", &aat, |n| scope.qualify(n))? {
                    self.cluster_refs.insert(c);
                }
                if let Some(wc) = action.get_mut("weighted_clusters") {
                    let wat = aat.field("weighted_clusters");
                    let wc = object_mut(wc, &wat)?;
                    let cat = wat.field("clusters");
                    for (k, c) in list_mut(wc, "clusters", &wat)?.iter_mut().enumerate() {
                        let cat = cat.index(k);
                        if let Some(c) = qualify_field(object_mut(c, &cat)?, "name", &cat, |n| scope.qualify(n))? {
                            self.cluster_refs.insert(c);
                        }
                    }
                }
                let mat = aat.field("request_mirror_policies");
                for (k, mp) in list_mut(action, "request_mirror_policies", &aat)?.iter_mut().enumerate() {
                    let mat = mat.index(k);
                    if let Some(c) = qualify_field(object_mut(mp, &mat)?, "cluster", &mat, |n| scope.qualify(n))? {
                        self.cluster_refs.insert(c);
                    }
                }
            }
        }
        Ok(())
    }

    // --- clusters ----------------------------------------------------------------------------

    fn cluster(
        &mut self,
        scope: &Scope,
        at: &At,
        mut c: Map<String, Value>,
        inject_upstream: bool,
    ) -> Result<(), ExportError> {
        let name = qualify_field(&mut c, "name", at, |n| scope.qualify(n))?.unwrap_or_default();
        if let Some(ts) = c.get_mut("transport_socket") {
            self.transport_socket(scope, &at.field("transport_socket"), ts, false)?;
        }

        let is_eds = matches!(c.get("type"), Some(Value::String(t)) if t == "EDS")
            || c.get("type").and_then(Value::as_u64) == Some(3);
        if is_eds {
            // What the agent would serve over EDS, inline: the CEC's own ClusterLoadAssignment of
            // that name, else the Service backends the translation resolved.
            let service = c
                .get("eds_cluster_config")
                .and_then(|e| e.get("service_name"))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map_or_else(|| name.clone(), str::to_string);
            c.remove("eds_cluster_config");
            c.insert("type".into(), Value::String("STATIC".into()));
            let la = self.eds_assignment(&service, &name);
            c.insert("load_assignment".into(), la);
        } else {
            if present(&c, "eds_cluster_config") {
                // Envoy NACKs the cluster; the agent's validation does not catch it.
                self.dropped.push(Dropped {
                    cec: at.cec.clone(),
                    path: at.field("eds_cluster_config").path,
                    what: format!("cluster {name}"),
                    reason: "Envoy refuses eds_cluster_config in a cluster whose type is not EDS".into(),
                });
                return Ok(());
            }
            if let Some(la) = c.get_mut("load_assignment") {
                qualify_load_assignment(scope, &at.field("load_assignment"), la)?;
            }
        }

        if !present(&c, "circuit_breakers") {
            c.insert("circuit_breakers".into(), cilium_circuit_breakers());
        }
        self.protocol_options(at, &mut c, inject_upstream)?;
        insert(&mut self.clusters, "cluster", name, &at.cec, Value::Object(c))
    }

    /// The upstream `HttpProtocolOptions`: Cilium's injected defaults, minus its L7 filter.
    fn protocol_options(
        &mut self,
        at: &At,
        c: &mut Map<String, Value>,
        inject_upstream: bool,
    ) -> Result<(), ExportError> {
        let oat = at.field("typed_extension_protocol_options");
        if inject_upstream {
            let alpn = matches!(
                any_type(c.get("transport_socket").and_then(|t| t.get("typed_config"))),
                Some(UPSTREAM_TLS | QUIC_UPSTREAM)
            );
            let opts = c.entry("typed_extension_protocol_options").or_insert_with(|| Value::Object(Map::new()));
            let opts = object_mut(opts, &oat)?;
            let hpo =
                opts.entry(HTTP_PROTOCOL_OPTIONS).or_insert_with(|| json!({"@type": type_url(HTTP_PROTOCOL_OPTIONS)}));
            let hpo = object_mut(hpo, &oat.key(HTTP_PROTOCOL_OPTIONS))?;
            if !["explicit_http_config", "use_downstream_protocol_config", "auto_config"]
                .iter()
                .any(|k| present(hpo, k))
            {
                if alpn {
                    hpo.insert("auto_config".into(), json!({}));
                } else {
                    hpo.insert("use_downstream_protocol_config".into(), json!({"http2_protocol_options": {}}));
                }
            }
        }
        let Some(opts) = c.get_mut("typed_extension_protocol_options") else { return Ok(()) };
        let Some(hpo) = object_mut(opts, &oat)?.get_mut(HTTP_PROTOCOL_OPTIONS) else { return Ok(()) };
        let hat = oat.key(HTTP_PROTOCOL_OPTIONS);
        strip_upstream_filters(object_mut(hpo, &hat)?, "http_filters", &hat)
    }

    fn eds_assignment(&self, service: &str, cluster: &str) -> Value {
        if let Some(cla) = self.load_assignments.get(service) {
            return cla.value.clone();
        }
        let t = self.t;
        let endpoints = t
            .snapshot
            .endpoints
            .get(service)
            .or_else(|| t.snapshot.clusters.get(cluster).map(|c| &c.endpoints))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        load_assignment_json(service, endpoints)
    }

    // --- listeners ---------------------------------------------------------------------------

    fn listener(&mut self, scope: &Scope, at: &At, mut l: Map<String, Value>) -> Result<(), ExportError> {
        let name = qualify_field(&mut l, "name", at, |n| scope.qualify_forced(n))?.unwrap_or_default();
        if !present(&l, "address") && !present(&l, "internal_listener") {
            let addresses = self.t.snapshot.listener(&name).map(|s| s.addresses.as_slice()).unwrap_or(&[]);
            let Some((first, rest)) = addresses.split_first() else {
                return Err(ExportError::NoAddress { cec: at.cec.clone(), path: at.path.clone(), listener: name });
            };
            l.insert("address".into(), socket_address(*first));
            if !rest.is_empty() {
                let extra: Vec<Value> = rest.iter().map(|a| json!({"address": socket_address(*a)})).collect();
                l.insert("additional_addresses".into(), Value::Array(extra));
            }
        }

        if let Some(Value::Array(filters)) = l.get_mut("listener_filters") {
            let fat = at.field("listener_filters");
            let mut kept = Vec::with_capacity(filters.len());
            for (i, f) in std::mem::take(filters).into_iter().enumerate() {
                let fat = fat.index(i);
                let (fname, ty) = filter_identity(&f);
                if fname == CILIUM_BPF_METADATA.0 || ty == Some(CILIUM_BPF_METADATA.1) {
                    continue;
                }
                kept.push(with_named_typed_config(f, &fat, LISTENER_FILTERS_BY_NAME)?);
            }
            *filters = kept;
        }

        let cat = at.field("filter_chains");
        for (i, fc) in list_mut(&mut l, "filter_chains", at)?.iter_mut().enumerate() {
            self.filter_chain(scope, &cat.index(i), fc)?;
        }
        if let Some(fc) = l.get_mut("default_filter_chain").filter(|v| !v.is_null()) {
            self.filter_chain(scope, &at.field("default_filter_chain"), fc)?;
        }
        if let Some((path, reason)) = self.envoy_rejects_listener(at, &l) {
            self.dropped.push(Dropped { cec: at.cec.clone(), path, what: format!("listener {name}"), reason });
            return Ok(());
        }
        insert(&mut self.listeners, "listener", name, &at.cec, Value::Object(l))
    }

    /// Checks Envoy makes on a listener that neither Cilium's agent nor the translation makes.
    /// Envoy NACKs such a listener and keeps serving the others.
    fn envoy_rejects_listener(&self, at: &At, l: &Map<String, Value>) -> Option<(String, String)> {
        let chains: Vec<(At, &Value)> = l
            .get("filter_chains")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, fc)| (at.field("filter_chains").index(i), fc))
            .chain(
                l.get("default_filter_chain").filter(|v| !v.is_null()).map(|fc| (at.field("default_filter_chain"), fc)),
            )
            .collect();
        if chains.is_empty() {
            return Some((at.path.clone(), "Envoy refuses a listener without filter chains".into()));
        }
        for (cat, fc) in chains {
            for (i, f) in fc.get("filters").and_then(Value::as_array).into_iter().flatten().enumerate() {
                let tat = cat.field("filters").index(i).field("typed_config");
                let cfg = f.get("typed_config");
                let what = match any_type(cfg) {
                    Some(HCM) => "HttpConnectionManager",
                    Some(TCP_PROXY) => "TcpProxy",
                    _ => continue,
                };
                if cfg.and_then(|c| str_field(c, "stat_prefix")).is_none_or(str::is_empty) {
                    return Some((tat.field("stat_prefix").path, format!("Envoy requires {what}.stat_prefix")));
                }
                // Inline route tables check their clusters (RDS-inlined ones do not).
                let Some(rc) = cfg.and_then(|c| c.get("route_config")) else { continue };
                if rc.get("validate_clusters").and_then(Value::as_bool) == Some(false) {
                    continue;
                }
                for c in route_clusters(rc) {
                    if c != ADMIN_CLUSTER && !self.clusters.contains_key(c) {
                        return Some((
                            tat.field("route_config").path,
                            format!("Envoy refuses an inline route table naming cluster {c:?}, which is not defined"),
                        ));
                    }
                }
            }
        }
        None
    }

    fn filter_chain(&mut self, scope: &Scope, at: &At, fc: &mut Value) -> Result<(), ExportError> {
        let fc = object_mut(fc, at)?;
        if let Some(ts) = fc.get_mut("transport_socket").filter(|v| !v.is_null()) {
            self.transport_socket(scope, &at.field("transport_socket"), ts, true)?;
        }
        let Some(Value::Array(filters)) = fc.get_mut("filters") else { return Ok(()) };
        let fat = at.field("filters");
        let mut kept = Vec::with_capacity(filters.len());
        for (i, mut f) in std::mem::take(filters).into_iter().enumerate() {
            let fat = fat.index(i);
            let (fname, ty) = filter_identity(&f);
            if fname == CILIUM_NETWORK.0 || ty == Some(CILIUM_NETWORK.1) {
                continue;
            }
            let ty = ty.map(str::to_string);
            let tat = fat.field("typed_config");
            match ty.as_deref() {
                Some(HCM) => {
                    if let Some(h) = f.get_mut("typed_config") {
                        self.http_connection_manager(scope, &tat, h)?;
                    }
                }
                Some(TCP_PROXY) => {
                    if let Some(tp) = f.get_mut("typed_config") {
                        self.tcp_proxy(scope, &tat, tp)?;
                    }
                }
                Some(t) if t.starts_with("cilium.") => {
                    return Err(fat.unsupported(format!("network filter {t} exists only in cilium-envoy")));
                }
                _ => {}
            }
            kept.push(f);
        }
        *filters = kept;
        Ok(())
    }

    fn http_connection_manager(&mut self, scope: &Scope, at: &At, h: &mut Value) -> Result<(), ExportError> {
        let h = object_mut(h, at)?;
        if let Some(rds) = h.remove("rds").filter(|v| !v.is_null()) {
            // What RDS would deliver, inline. RDS tables do not validate their clusters;
            // inline ones do by default, so keep RDS's behaviour explicitly.
            let name = scope.qualify_forced(str_field(&rds, "route_config_name").unwrap_or_default());
            let mut rc = match self.routes.get(&name) {
                Some(r) => r.value.clone(),
                None => json!({"name": name}),
            };
            if let Some(m) = rc.as_object_mut()
                && !m.contains_key("validate_clusters")
            {
                m.insert("validate_clusters".into(), Value::Bool(false));
            }
            h.insert("route_config".into(), rc);
        } else if let Some(rc) = h.get_mut("route_config").filter(|v| !v.is_null()) {
            self.route_config(scope, &at.field("route_config"), rc)?;
        }
        if let Some(Value::Array(filters)) = h.get_mut("http_filters") {
            let fat = at.field("http_filters");
            let mut kept = Vec::with_capacity(filters.len());
            for (i, f) in std::mem::take(filters).into_iter().enumerate() {
                if let Some(f) = self.http_filter(scope, &fat.index(i), f)? {
                    kept.push(f);
                }
            }
            *filters = kept;
        }
        Ok(())
    }

    /// One downstream HTTP filter: dropped (Cilium's policy filter), completed (a router
    /// without `typed_config`), or with its cluster references qualified (`qualifyHttpFilters`).
    fn http_filter(&mut self, scope: &Scope, at: &At, f: Value) -> Result<Option<Value>, ExportError> {
        let (fname, ty) = filter_identity(&f);
        if fname == CILIUM_L7POLICY.0 || ty == Some(CILIUM_L7POLICY.1) {
            return Ok(None);
        }
        let ty = ty.map(str::to_string);
        let mut f = with_named_typed_config(f, at, HTTP_FILTERS_BY_NAME)?;
        let tat = at.field("typed_config");
        let Some(cfg) = f.get_mut("typed_config").and_then(Value::as_object_mut) else {
            return Ok(Some(f));
        };
        match ty.as_deref() {
            Some(ROUTER) => strip_upstream_filters(cfg, "upstream_http_filters", &tat)?,
            Some(HEALTH_CHECK) => {
                if let Some(Value::Object(pcts)) = cfg.get_mut("cluster_min_healthy_percentages") {
                    let qualified: Map<String, Value> =
                        std::mem::take(pcts).into_iter().map(|(k, v)| (scope.qualify(&k), v)).collect();
                    self.cluster_refs.extend(qualified.keys().cloned());
                    *pcts = qualified;
                }
            }
            Some(EXT_AUTHZ) => {
                let gat = tat.field("grpc_service").field("envoy_grpc");
                if let Some(g) = cfg.get_mut("grpc_service").and_then(|g| g.get_mut("envoy_grpc"))
                    && let Some(c) = qualify_field(object_mut(g, &gat)?, "cluster_name", &gat, |n| scope.qualify(n))?
                {
                    self.cluster_refs.insert(c);
                }
                let sat = tat.field("http_service").field("server_uri");
                if let Some(s) = cfg.get_mut("http_service").and_then(|h| h.get_mut("server_uri"))
                    && let Some(c) = qualify_field(object_mut(s, &sat)?, "cluster", &sat, |n| scope.qualify(n))?
                {
                    self.cluster_refs.insert(c);
                }
            }
            Some(t) if t.starts_with("cilium.") => {
                return Err(at.unsupported(format!("HTTP filter {t} exists only in cilium-envoy")));
            }
            _ => {}
        }
        Ok(Some(f))
    }

    /// `qualifyTcpProxyResourceNames`.
    fn tcp_proxy(&mut self, scope: &Scope, at: &At, tp: &mut Value) -> Result<(), ExportError> {
        let tp = object_mut(tp, at)?;
        if let Some(c) = qualify_field(tp, "cluster", at, |n| scope.qualify(n))? {
            self.cluster_refs.insert(c);
        }
        if let Some(wc) = tp.get_mut("weighted_clusters").filter(|v| !v.is_null()) {
            let wat = at.field("weighted_clusters");
            let wc = object_mut(wc, &wat)?;
            let cat = wat.field("clusters");
            for (i, c) in list_mut(wc, "clusters", &wat)?.iter_mut().enumerate() {
                let cat = cat.index(i);
                if let Some(c) = qualify_field(object_mut(c, &cat)?, "name", &cat, |n| scope.qualify(n))? {
                    self.cluster_refs.insert(c);
                }
            }
        }
        Ok(())
    }

    // --- TLS ---------------------------------------------------------------------------------

    /// `fillInTransportSocketXDS`: SDS secret names in TLS contexts.
    fn transport_socket(
        &mut self,
        scope: &Scope,
        at: &At,
        ts: &mut Value,
        downstream: bool,
    ) -> Result<(), ExportError> {
        let ty = any_type(ts.get("typed_config")).map(str::to_string);
        let tat = at.field("typed_config");
        let Some(ctx) = ts.get_mut("typed_config") else { return Ok(()) };
        match ty.as_deref() {
            Some(DOWNSTREAM_TLS) if downstream => {
                let ctx = object_mut(ctx, &tat)?;
                if let Some(c) = ctx.get_mut("common_tls_context") {
                    self.common_tls_context(scope, &tat.field("common_tls_context"), c)?;
                }
                if let Some(r) = ctx.get_mut("session_ticket_keys_sds_secret_config") {
                    self.sds_ref(scope, &tat.field("session_ticket_keys_sds_secret_config"), r)?;
                }
            }
            Some(UPSTREAM_TLS) if !downstream => {
                if let Some(c) = object_mut(ctx, &tat)?.get_mut("common_tls_context") {
                    self.common_tls_context(scope, &tat.field("common_tls_context"), c)?;
                }
            }
            Some(t) if t.starts_with("cilium.") => {
                return Err(at.unsupported(format!("transport socket {t} exists only in cilium-envoy")));
            }
            _ => {}
        }
        Ok(())
    }

    fn common_tls_context(&mut self, scope: &Scope, at: &At, c: &mut Value) -> Result<(), ExportError> {
        let c = object_mut(c, at)?;
        let cat = at.field("tls_certificate_sds_secret_configs");
        for (i, r) in list_mut(c, "tls_certificate_sds_secret_configs", at)?.iter_mut().enumerate() {
            self.sds_ref(scope, &cat.index(i), r)?;
        }
        if let Some(r) = c.get_mut("validation_context_sds_secret_config") {
            self.sds_ref(scope, &at.field("validation_context_sds_secret_config"), r)?;
        }
        if let Some(r) =
            c.get_mut("combined_validation_context").and_then(|v| v.get_mut("validation_context_sds_secret_config"))
        {
            self.sds_ref(
                scope,
                &at.field("combined_validation_context").field("validation_context_sds_secret_config"),
                r,
            )?;
        }
        Ok(())
    }

    /// An `SdsSecretConfig`: the name qualified; a secret the agent would serve becomes a
    /// reference to the static secret, or an SDS request nobody answers if it does not exist.
    /// A config source the user points elsewhere (a file) is kept.
    fn sds_ref(&mut self, scope: &Scope, at: &At, r: &mut Value) -> Result<(), ExportError> {
        let r = object_mut(r, at)?;
        let name = qualify_field(r, "name", at, |n| scope.qualify(n))?.unwrap_or_default();
        let from_agent = match r.get("sds_config") {
            None | Some(Value::Null) => true,
            Some(cs) => cs.get("ads").is_some() || cs.get("api_config_source").is_some(),
        };
        if from_agent {
            if self.secrets.contains_key(&name) {
                r.remove("sds_config");
            } else {
                r.insert("sds_config".into(), missing_secret_source());
                self.needs_xds_cluster = true;
            }
        }
        Ok(())
    }

    // --- assembly ----------------------------------------------------------------------------

    fn finish(mut self, opts: &ExportOptions) -> Value {
        if self.cluster_refs.contains(ADMIN_CLUSTER) && !self.clusters.contains_key(ADMIN_CLUSTER) {
            let c = json!({
                "name": ADMIN_CLUSTER,
                "type": "STATIC",
                "connect_timeout": BOOTSTRAP_CONNECT_TIMEOUT,
                "load_assignment": {
                    "cluster_name": ADMIN_CLUSTER,
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(opts.admin_address)}}]}]
                }
            });
            self.clusters.insert(ADMIN_CLUSTER.to_string(), Owned { source: "bootstrap".into(), value: c });
        }
        if self.needs_xds_cluster && !self.clusters.contains_key(XDS_CLUSTER) {
            let c = json!({
                "name": XDS_CLUSTER,
                "type": "STATIC",
                "connect_timeout": BOOTSTRAP_CONNECT_TIMEOUT,
                "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": []},
                "typed_extension_protocol_options": {
                    HTTP_PROTOCOL_OPTIONS: {
                        "@type": type_url(HTTP_PROTOCOL_OPTIONS),
                        "explicit_http_config": {"http2_protocol_options": {}}
                    }
                }
            });
            self.clusters.insert(XDS_CLUSTER.to_string(), Owned { source: "bootstrap".into(), value: c });
        }
        let values = |m: BTreeMap<String, Owned>| Value::Array(m.into_values().map(|o| o.value).collect());
        json!({
            // cilium-envoy's node identity (the agent parses `host~IP~id~domain`).
            "node": {"id": "host~127.0.0.1~no-id~localdomain", "cluster": "ingress-cluster"},
            "admin": {"address": socket_address(opts.admin_address)},
            "static_resources": {
                "listeners": values(self.listeners),
                "clusters": values(self.clusters),
                "secrets": values(self.secrets),
            },
            "layered_runtime": {"layers": [{"name": "static_layer_0", "static_layer": {}}]},
            // Internal listeners need this; cilium-envoy's bootstrap always has it.
            "bootstrap_extensions": [{
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": {"@type": type_url("envoy.extensions.bootstrap.internal_listener.v3.InternalListener")}
            }],
            // cilium-envoy's global connection limit (`envoy.maxGlobalDownstreamConnections`).
            "overload_manager": {"resource_monitors": [{
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": type_url("envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"),
                    "max_active_downstream_connections": 50000
                }
            }]}
        })
    }
}

/// The clusters a route table's actions name (already qualified).
fn route_clusters(rc: &Value) -> Vec<&str> {
    let mut out = Vec::new();
    let actions = rc
        .get("virtual_hosts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|vh| vh.get("routes").and_then(Value::as_array).into_iter().flatten())
        .filter_map(|r| r.get("route"));
    for a in actions {
        out.extend(str_field(a, "cluster"));
        let weighted = a.get("weighted_clusters").and_then(|w| w.get("clusters")).and_then(Value::as_array);
        out.extend(weighted.into_iter().flatten().filter_map(|c| str_field(c, "name")));
        let mirrors = a.get("request_mirror_policies").and_then(Value::as_array);
        out.extend(mirrors.into_iter().flatten().filter_map(|m| str_field(m, "cluster")));
    }
    out
}

/// A filter's `name` and the message type of its `typed_config`.
fn filter_identity(f: &Value) -> (&str, Option<&str>) {
    (str_field(f, "name").unwrap_or(""), any_type(f.get("typed_config")))
}

/// Filters old CECs name without a `typed_config`; current Envoy needs the type.
const HTTP_FILTERS_BY_NAME: &[(&str, &str)] = &[("envoy.filters.http.router", ROUTER), ("envoy.router", ROUTER)];

const LISTENER_FILTERS_BY_NAME: &[(&str, &str)] = &[
    ("envoy.filters.listener.tls_inspector", "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"),
    ("envoy.filters.listener.proxy_protocol", "envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol"),
    ("envoy.filters.listener.http_inspector", "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"),
    ("envoy.filters.listener.original_dst", "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"),
];

/// Adds the `typed_config` a filter named only by its well-known name stands for.
fn with_named_typed_config(mut f: Value, at: &At, known: &[(&str, &str)]) -> Result<Value, ExportError> {
    let m = object_mut(&mut f, at)?;
    if !present(m, "typed_config") && !present(m, "config_discovery") {
        let name = str_field_of(m, "name").unwrap_or("");
        if let Some((_, ty)) = known.iter().find(|(n, _)| *n == name) {
            m.insert("typed_config".into(), json!({"@type": type_url(ty)}));
        }
    }
    Ok(f)
}

/// Upstream HTTP filters (cluster `HttpProtocolOptions.http_filters`, router
/// `upstream_http_filters`) without Cilium's L7 policy filter. A list left with nothing but
/// the codec is removed: Envoy's default upstream chain is exactly the codec.
fn strip_upstream_filters(m: &mut Map<String, Value>, key: &str, at: &At) -> Result<(), ExportError> {
    let Some(Value::Array(filters)) = m.get_mut(key) else { return Ok(()) };
    let lat = at.field(key);
    let mut kept = Vec::with_capacity(filters.len());
    for (i, f) in std::mem::take(filters).into_iter().enumerate() {
        let (fname, ty) = filter_identity(&f);
        if fname == CILIUM_L7POLICY.0 || ty == Some(CILIUM_L7POLICY.1) {
            continue;
        }
        if let Some(t) =
            ty.filter(|t| t.starts_with("cilium.")).or_else(|| Some(fname).filter(|n| n.starts_with("cilium.")))
        {
            return Err(lat.index(i).unsupported(format!("upstream HTTP filter {t} exists only in cilium-envoy")));
        }
        kept.push(f);
    }
    let only_codec = kept.iter().all(|f| {
        let (fname, ty) = filter_identity(f);
        fname == "envoy.filters.http.upstream_codec" || ty == Some(UPSTREAM_CODEC)
    });
    if only_codec {
        m.remove(key);
    } else {
        *filters = kept;
    }
    Ok(())
}

/// `qualifyEDSEndpoints`: the assignment's name and internal listener addresses.
fn qualify_load_assignment(scope: &Scope, at: &At, la: &mut Value) -> Result<(), ExportError> {
    let la = object_mut(la, at)?;
    qualify_field(la, "cluster_name", at, |n| scope.qualify(n))?;
    let lat = at.field("endpoints");
    for (i, loc) in list_mut(la, "endpoints", at)?.iter_mut().enumerate() {
        let lat = lat.index(i);
        let eat = lat.field("lb_endpoints");
        for (j, lb) in list_mut(object_mut(loc, &lat)?, "lb_endpoints", &lat)?.iter_mut().enumerate() {
            let eat = eat.index(j);
            let Some(ep) = lb.get_mut("endpoint") else { continue };
            let pat = eat.field("endpoint");
            let ep = object_mut(ep, &pat)?;
            if let Some(a) = ep.get_mut("address") {
                qualify_internal_address(scope, &pat.field("address"), a)?;
            }
            let aat = pat.field("additional_addresses");
            for (k, extra) in list_mut(ep, "additional_addresses", &pat)?.iter_mut().enumerate() {
                if let Some(a) = extra.get_mut("address") {
                    qualify_internal_address(scope, &aat.index(k).field("address"), a)?;
                }
            }
        }
    }
    Ok(())
}

fn qualify_internal_address(scope: &Scope, at: &At, a: &mut Value) -> Result<(), ExportError> {
    if let Some(ia) = a.get_mut("envoy_internal_address") {
        let iat = at.field("envoy_internal_address");
        qualify_field(object_mut(ia, &iat)?, "server_listener_name", &iat, |n| scope.qualify(n))?;
    }
    Ok(())
}

/// The config source for a secret nobody defines: SDS from cilium-envoy's agent cluster.
fn missing_secret_source() -> Value {
    json!({
        "resource_api_version": "V3",
        "initial_fetch_timeout": MISSING_SECRET_FETCH_TIMEOUT,
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "set_node_on_first_message_only": true,
            "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}]
        }
    })
}

// ---------------------------------------------------------------------------------------------
// From the model: endpoints and Kubernetes Secrets

/// A `ClusterLoadAssignment` as the agent publishes it: one locality per priority, no weights
/// unless an endpoint has one.
fn load_assignment_json(name: &str, endpoints: &[Endpoint]) -> Value {
    let mut by_priority: BTreeMap<u32, Vec<Value>> = BTreeMap::new();
    for e in endpoints {
        let address = match &e.address {
            EndpointAddress::Socket(a) => socket_address(*a),
            EndpointAddress::Dns { host, port } => json!({"socket_address": {"address": host, "port_value": port}}),
            EndpointAddress::Internal(l) => json!({"envoy_internal_address": {"server_listener_name": l}}),
        };
        let mut endpoint = Map::new();
        endpoint.insert("address".into(), address);
        if let Some(h) = &e.hostname {
            endpoint.insert("hostname".into(), Value::String(h.clone()));
        }
        let mut lb = Map::new();
        lb.insert("endpoint".into(), Value::Object(endpoint));
        if e.weight != 1 {
            lb.insert("load_balancing_weight".into(), json!(e.weight));
        }
        let health = match e.health {
            EndpointHealth::Unknown => None,
            EndpointHealth::Healthy => Some("HEALTHY"),
            EndpointHealth::Unhealthy => Some("UNHEALTHY"),
            EndpointHealth::Draining => Some("DRAINING"),
            EndpointHealth::Timeout => Some("TIMEOUT"),
            EndpointHealth::Degraded => Some("DEGRADED"),
        };
        if let Some(h) = health {
            lb.insert("health_status".into(), json!(h));
        }
        by_priority.entry(e.priority).or_default().push(Value::Object(lb));
    }
    let localities: Vec<Value> = by_priority
        .into_iter()
        .map(|(p, lbs)| if p == 0 { json!({"lb_endpoints": lbs}) } else { json!({"priority": p, "lb_endpoints": lbs}) })
        .collect();
    json!({"cluster_name": name, "endpoints": localities})
}

/// A Kubernetes Secret as the agent's secret sync hands it to Envoy.
fn kubernetes_secret(at: &At, name: &str, s: &Secret) -> Result<Value, ExportError> {
    let body = match s {
        Secret::TlsCertificate(c) => json!({"tls_certificate": {
            "certificate_chain": data_source(&c.certificate_chain),
            "private_key": data_source(&c.private_key),
        }}),
        Secret::ValidationContext(v) => {
            if !v.match_subject_alt_names.is_empty() {
                return Err(at.unsupported(
                    "a validation context with subject-alt-name matchers does not come from a Kubernetes Secret",
                ));
            }
            let mut m = Map::new();
            if let Some(ca) = &v.trusted_ca {
                m.insert("trusted_ca".into(), data_source(ca));
            }
            if let Some(crl) = &v.crl {
                m.insert("crl".into(), data_source(crl));
            }
            if v.allow_expired_certificate {
                m.insert("allow_expired_certificate".into(), Value::Bool(true));
            }
            json!({"validation_context": m})
        }
        Secret::SessionTicketKeys(keys) => {
            json!({"session_ticket_keys": {"keys": keys.iter().map(data_source).collect::<Vec<_>>()}})
        }
        Secret::Generic(d) => json!({"generic_secret": {"secret": data_source(d)}}),
    };
    let mut body = body;
    if let Some(m) = body.as_object_mut() {
        m.insert("name".into(), Value::String(name.to_string()));
    }
    Ok(body)
}

fn data_source(d: &DataSource) -> Value {
    match d {
        DataSource::Filename(f) => json!({"filename": f}),
        DataSource::EnvironmentVariable(v) => json!({"environment_variable": v}),
        DataSource::Inline(bytes) => match std::str::from_utf8(bytes) {
            Ok(s) => json!({"inline_string": s}),
            Err(_) => json!({"inline_bytes": base64_encode(bytes)}),
        },
    }
}

/// Standard base64 with padding (proto3 JSON `bytes`).
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(crate::k8s::base64_decode(encoded).as_deref(), Some(plain.as_bytes()));
        }
    }

    #[test]
    fn normalisation_keeps_user_data_keys() {
        let v = json!({
            "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            "virtualHosts": [{
                "typedPerFilterConfig": {"envoy.filters.http.cors": {"@type": "x", "allowOriginStringMatch": []}},
                "metadata": {"filterMetadata": {"myNs": {"someKey": "someValue"}}}
            }],
            "accessLog": [{"typedConfig": {"logFormat": {"jsonFormat": {"startTime": "%START_TIME%"}}}}],
            "healthCheck": {"clusterMinHealthyPercentages": {"myCluster": {"value": 50}}}
        });
        let n = normalize(&v, &At::new("default/x", "spec.resources[0]")).unwrap();
        assert_eq!(n["@type"], "type.googleapis.com/envoy.config.route.v3.RouteConfiguration");
        let vh = &n["virtual_hosts"][0];
        assert!(vh["typed_per_filter_config"]["envoy.filters.http.cors"]["allow_origin_string_match"].is_array());
        assert_eq!(vh["metadata"]["filter_metadata"]["myNs"]["someKey"], "someValue");
        assert_eq!(n["access_log"][0]["typed_config"]["log_format"]["json_format"]["startTime"], "%START_TIME%");
        assert_eq!(n["health_check"]["cluster_min_healthy_percentages"]["myCluster"]["value"], 50);
    }

    #[test]
    fn two_spellings_of_one_field_are_an_error() {
        let v = json!({"filterChains": [], "filter_chains": []});
        let err = normalize(&v, &At::new("default/x", "spec.resources[3]")).unwrap_err();
        assert!(
            matches!(&err, ExportError::Malformed { cec, path, .. } if cec == "default/x" && path == "spec.resources[3].filter_chains"),
            "{err}"
        );
    }

    #[test]
    fn typed_struct_becomes_a_plain_any() {
        let v = json!({"@type": "type.googleapis.com/udpa.type.v1.TypedStruct", "typeUrl": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router", "value": {"suppressEnvoyHeaders": true}});
        let n = normalize(&v, &At::new("x", "p")).unwrap();
        assert_eq!(
            n,
            json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router", "suppress_envoy_headers": true})
        );
    }

    #[test]
    fn upstream_filters_without_cilium_policy() {
        let at = At::new("x", "p");
        let mut m = json!({"http_filters": [
            {"name": "cilium.l7policy", "typed_config": {"@type": "type.googleapis.com/cilium.L7Policy"}},
            {"name": "envoy.filters.http.upstream_codec", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}}
        ]});
        strip_upstream_filters(m.as_object_mut().unwrap(), "http_filters", &at).unwrap();
        assert_eq!(m, json!({}));

        let mut m = json!({"http_filters": [
            {"name": "envoy.filters.http.header_mutation", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"}},
            {"name": "cilium.l7policy"},
            {"name": "envoy.filters.http.upstream_codec", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}}
        ]});
        strip_upstream_filters(m.as_object_mut().unwrap(), "http_filters", &at).unwrap();
        let names: Vec<&str> =
            m["http_filters"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["envoy.filters.http.header_mutation", "envoy.filters.http.upstream_codec"]);
    }
}
