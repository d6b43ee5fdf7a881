//! Test support for Kubernetes mode: a small fake API server speaking the real list/watch
//! wire protocol, and a harness that runs the controller against it.
//!
//! The fake server follows the API server where kube-rs can tell the difference:
//!
//! * LIST answers `{kind: XList, metadata: {resourceVersion}, items}`; items of built-in
//!   kinds carry no `apiVersion`/`kind`, as the real server's typed lists do.
//! * WATCH (`?watch=true&resourceVersion=N`) streams newline-delimited JSON events
//!   (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`, `ERROR`) over a chunked response. A watch
//!   resumed from a version older than the retained history gets an in-stream `ERROR` with
//!   a 410 `Expired` Status, exactly as the real server answers "too old resource version".
//!   With `allowWatchBookmarks=true` every watch starts with a bookmark at the current
//!   version, after replaying the events the client missed.
//! * One global resourceVersion counter, bumped by every write.
//! * POST/PATCH create and merge-patch objects (kube's event recorder uses them); created
//!   objects get a uid, a resourceVersion and a creationTimestamp.
//! * Field selectors `metadata.name` and `metadata.namespace`; anything else is refused with
//!   400, as is a label selector (the controller uses none).
//!
//! Tests drive it: [`FakeApiServer::apply`] / [`FakeApiServer::delete`] write objects,
//! [`FakeApiServer::disconnect_watches`] drops every watch connection,
//! [`FakeApiServer::expire_history`] makes every resumed watch fail with 410 Gone so that
//! clients relist, and [`FakeApiServer::hold_lists`] delays LIST answers of one resource.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sluice_config::{Document, Options, Snapshot};
use sluice_proxy::source::kubernetes::{self, KubeOptions};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// A resource the fake server serves.
#[derive(Debug, PartialEq, Eq)]
pub struct Res {
    /// `/api/v1` or `/apis/<group>/<version>`.
    pub prefix: &'static str,
    pub api_version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
}

impl Res {
    fn builtin(&self) -> bool {
        !self.api_version.starts_with("cilium.io/")
    }
}

pub const SERVICES: Res =
    Res { prefix: "/api/v1", api_version: "v1", kind: "Service", plural: "services", namespaced: true };
pub const SECRETS: Res =
    Res { prefix: "/api/v1", api_version: "v1", kind: "Secret", plural: "secrets", namespaced: true };
pub const NODES: Res = Res { prefix: "/api/v1", api_version: "v1", kind: "Node", plural: "nodes", namespaced: false };
pub const CORE_EVENTS: Res =
    Res { prefix: "/api/v1", api_version: "v1", kind: "Event", plural: "events", namespaced: true };
pub const ENDPOINTSLICES: Res = Res {
    prefix: "/apis/discovery.k8s.io/v1",
    api_version: "discovery.k8s.io/v1",
    kind: "EndpointSlice",
    plural: "endpointslices",
    namespaced: true,
};
pub const EVENTS: Res = Res {
    prefix: "/apis/events.k8s.io/v1",
    api_version: "events.k8s.io/v1",
    kind: "Event",
    plural: "events",
    namespaced: true,
};
pub const CECS: Res = Res {
    prefix: "/apis/cilium.io/v2",
    api_version: "cilium.io/v2",
    kind: "CiliumEnvoyConfig",
    plural: "ciliumenvoyconfigs",
    namespaced: true,
};
pub const CCECS: Res = Res {
    prefix: "/apis/cilium.io/v2",
    api_version: "cilium.io/v2",
    kind: "CiliumClusterwideEnvoyConfig",
    plural: "ciliumclusterwideenvoyconfigs",
    namespaced: false,
};

const ALL: [&Res; 8] = [&SERVICES, &SECRETS, &NODES, &CORE_EVENTS, &ENDPOINTSLICES, &EVENTS, &CECS, &CCECS];

fn res_index(r: &Res) -> usize {
    ALL.iter().position(|x| *x == r).unwrap_or(usize::MAX)
}

type Key = (usize, String, String);
type Chunk = Result<Frame<Bytes>, std::io::Error>;

struct Watch {
    res: usize,
    namespace: Option<String>,
    name: Option<String>,
    tx: mpsc::UnboundedSender<Chunk>,
}

#[derive(Default)]
struct State {
    rv: u64,
    uid: u64,
    objects: BTreeMap<Key, Value>,
    /// (resourceVersion, key, event type, object) of every write still retained.
    history: Vec<(u64, Key, &'static str, Value)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    expired_before: u64,
    watches: Vec<Watch>,
    lists: BTreeMap<usize, usize>,
    held: BTreeSet<usize>,
}

/// The fake API server. Dropping it stops accepting connections.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    release: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApiServer {
    pub async fn start() -> FakeApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State { rv: 1, ..Default::default() }));
        let (release, _) = watch::channel(0u64);
        let (st, rel) = (state.clone(), release.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (st, rel) = (st.clone(), rel.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(st.clone(), rel.subscribe(), req));
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        FakeApiServer { addr, state, release, task }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// A kube client for this server (plain HTTP, no credentials).
    pub fn client(&self) -> kube::Client {
        let url: http::Uri = format!("http://{}", self.addr).parse().expect("server url");
        kube::Client::try_from(kube::Config::new(url)).expect("kube client")
    }

    /// Writes a kubeconfig for this server to `path`, for code that builds its own client
    /// (`KUBECONFIG=path`).
    pub fn write_kubeconfig(&self, path: &std::path::Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: fake\n  user: {{}}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n",
            self.addr
        );
        std::fs::write(path, text).expect("write kubeconfig");
    }

    /// Creates or replaces an object (by `metadata.namespace`/`metadata.name`); returns the
    /// new resourceVersion. Watchers get ADDED or MODIFIED.
    pub fn apply(&self, res: &Res, mut obj: Value) -> u64 {
        let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("").to_string();
        let name = obj.pointer("/metadata/name").and_then(Value::as_str).expect("metadata.name").to_string();
        assert_eq!(res.namespaced, !ns.is_empty(), "{} {name}: namespace does not fit the scope", res.kind);
        let mut st = self.lock();
        let key = (res_index(res), ns, name);
        let uid = match st.objects.get(&key).and_then(|o| o.pointer("/metadata/uid")).cloned() {
            Some(uid) => uid,
            None => {
                st.uid += 1;
                json!(format!("00000000-0000-4000-8000-{:012}", st.uid))
            }
        };
        obj["apiVersion"] = json!(res.api_version);
        obj["kind"] = json!(res.kind);
        obj["metadata"]["uid"] = uid;
        let event = if st.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        st.write(key, event, obj)
    }

    /// Deletes an object; watchers get DELETED with its last state.
    pub fn delete(&self, res: &Res, namespace: &str, name: &str) {
        let mut st = self.lock();
        let key = (res_index(res), namespace.to_string(), name.to_string());
        let obj =
            st.objects.get(&key).cloned().unwrap_or_else(|| panic!("{} {namespace}/{name} does not exist", res.kind));
        st.write(key, "DELETED", obj);
    }

    /// Objects of one resource, as stored.
    pub fn objects(&self, res: &Res) -> Vec<Value> {
        let idx = res_index(res);
        self.lock().objects.iter().filter(|((r, _, _), _)| *r == idx).map(|(_, v)| v.clone()).collect()
    }

    /// LIST requests answered for a resource so far.
    pub fn list_count(&self, res: &Res) -> usize {
        self.lock().lists.get(&res_index(res)).copied().unwrap_or(0)
    }

    /// Open watch streams of a resource.
    pub fn watch_count(&self, res: &Res) -> usize {
        let idx = res_index(res);
        let mut st = self.lock();
        st.watches.retain(|w| !w.tx.is_closed());
        st.watches.iter().filter(|w| w.res == idx).count()
    }

    /// Drops every watch connection: cleanly (end of stream, as at the server's watch
    /// timeout) or abruptly (connection reset mid-stream).
    pub fn disconnect_watches(&self, abrupt: bool) {
        let mut st = self.lock();
        for w in st.watches.drain(..) {
            if abrupt {
                let _ = w.tx.send(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset")));
            }
        }
    }

    /// Simulates an etcd compaction: the history is dropped, every open watch is cut, and
    /// a watch resumed from any version seen so far is answered with 410 Gone.
    pub fn expire_history(&self) {
        let mut st = self.lock();
        st.rv += 1;
        st.expired_before = st.rv;
        st.history.clear();
        st.watches.clear();
    }

    /// Sends a BOOKMARK with the current resourceVersion on every open watch.
    pub fn bookmark(&self) {
        let mut st = self.lock();
        let rv = st.rv;
        st.watches.retain(|w| w.tx.send(Ok(Frame::data(bookmark_line(ALL[w.res], rv)))).is_ok());
    }

    /// Holds LIST answers for `res` until [`FakeApiServer::release_lists`].
    pub fn hold_lists(&self, res: &Res) {
        self.lock().held.insert(res_index(res));
    }

    pub fn release_lists(&self) {
        self.lock().held.clear();
        self.release.send_modify(|g| *g += 1);
    }
}

impl State {
    fn write(&mut self, key: Key, event: &'static str, mut obj: Value) -> u64 {
        self.rv += 1;
        let rv = self.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if obj.pointer("/metadata/creationTimestamp").is_none() {
            obj["metadata"]["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
        }
        if event == "DELETED" {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key.clone(), obj.clone());
        }
        let line = event_line(event, &obj);
        self.watches.retain(|w| !w.matches(&key) || w.tx.send(Ok(Frame::data(line.clone()))).is_ok());
        self.history.push((rv, key, event, obj));
        rv
    }
}

impl Watch {
    fn matches(&self, key: &Key) -> bool {
        key.0 == self.res
            && self.namespace.as_ref().is_none_or(|ns| *ns == key.1)
            && self.name.as_ref().is_none_or(|n| *n == key.2)
    }
}

fn event_line(event: &str, obj: &Value) -> Bytes {
    let mut s = json!({"type": event, "object": obj}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn bookmark_line(res: &Res, rv: u64) -> Bytes {
    event_line(
        "BOOKMARK",
        &json!({"kind": res.kind, "apiVersion": res.api_version, "metadata": {"resourceVersion": rv.to_string()}}),
    )
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

type Body = BoxBody<Bytes, std::io::Error>;

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let body = Full::new(Bytes::from(v.to_string())).map_err(|never: Infallible| match never {}).boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = code;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

fn error_response(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &status(code, reason, message),
    )
}

/// The parsed request target.
struct Target {
    res: usize,
    namespace: Option<String>,
    name: Option<String>,
    query: BTreeMap<String, String>,
}

fn parse_target(uri: &http::Uri) -> Option<Target> {
    let path = uri.path();
    let query = uri.query().map(parse_query).unwrap_or_default();
    for (idx, res) in ALL.iter().enumerate() {
        let Some(rest) = path.strip_prefix(res.prefix) else { continue };
        let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let (namespace, segs) = match segs.as_slice() {
            ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some(ns.to_string()), tail.to_vec()),
            _ => (None, segs),
        };
        let (plural, name) = match segs.as_slice() {
            [p] => (*p, None),
            [p, n] => (*p, Some(n.to_string())),
            _ => continue,
        };
        if plural != res.plural || (namespace.is_some() && !res.namespaced) {
            continue;
        }
        return Some(Target { res: idx, namespace, name, query });
    }
    None
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            Some((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `metadata.name=x,metadata.namespace=y` → (namespace, name); other fields are refused.
fn field_selector(q: &BTreeMap<String, String>) -> Result<(Option<String>, Option<String>), String> {
    let (mut ns, mut name) = (None, None);
    if let Some(sel) = q.get("fieldSelector") {
        for term in sel.split(',').filter(|t| !t.is_empty()) {
            match term.split_once('=') {
                Some(("metadata.name", v)) => name = Some(v.trim_start_matches('=').to_string()),
                Some(("metadata.namespace", v)) => ns = Some(v.trim_start_matches('=').to_string()),
                _ => return Err(format!("field label not supported: {term}")),
            }
        }
    }
    Ok((ns, name))
}

fn lock(s: &Mutex<State>) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

async fn handle(
    state: Arc<Mutex<State>>,
    mut release: watch::Receiver<u64>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if std::env::var_os("FAKE_API_TRACE").is_some() {
        eprintln!("fake-api: {} {}", req.method(), req.uri());
    }
    let Some(t) = parse_target(req.uri()) else {
        return Ok(error_response(
            404,
            "NotFound",
            &format!("the server could not find the requested resource ({})", req.uri()),
        ));
    };
    if t.query.contains_key("labelSelector") {
        return Ok(error_response(400, "BadRequest", "label selectors are not supported by this fake"));
    }
    let (sel_ns, sel_name) = match field_selector(&t.query) {
        Ok(s) => s,
        Err(e) => return Ok(error_response(400, "BadRequest", &e)),
    };
    let res = ALL[t.res];
    let namespace = t.namespace.clone().or(sel_ns);
    let method = req.method().clone();
    match (method, &t.name) {
        (Method::GET, None) if matches!(t.query.get("watch").map(String::as_str), Some("true" | "1")) => {
            Ok(start_watch(&mut lock(&state), &t, namespace, sel_name))
        }
        (Method::GET, None) => {
            while lock(&state).held.contains(&t.res) {
                if release.changed().await.is_err() {
                    break;
                }
            }
            let mut st = lock(&state);
            *st.lists.entry(t.res).or_default() += 1;
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|((r, ns, n), _)| {
                    *r == t.res
                        && namespace.as_ref().is_none_or(|x| x == ns)
                        && sel_name.as_ref().is_none_or(|x| x == n)
                })
                .map(|(_, v)| {
                    let mut v = v.clone();
                    if res.builtin()
                        && let Some(m) = v.as_object_mut()
                    {
                        m.remove("apiVersion");
                        m.remove("kind");
                    }
                    v
                })
                .collect();
            Ok(json_response(
                StatusCode::OK,
                &json!({"kind": format!("{}List", res.kind), "apiVersion": res.api_version,
                        "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            ))
        }
        (Method::GET, Some(name)) => {
            let st = lock(&state);
            let key = (t.res, namespace.unwrap_or_default(), name.clone());
            Ok(match st.objects.get(&key) {
                Some(o) => json_response(StatusCode::OK, o),
                None => error_response(404, "NotFound", &format!("{} \"{name}\" not found", res.plural)),
            })
        }
        (Method::POST, None) => {
            let Some(mut obj) = read_json(req).await else {
                return Ok(error_response(400, "BadRequest", "body is not a JSON object"));
            };
            let ns = t.namespace.clone().unwrap_or_default();
            let Some(name) = obj.pointer("/metadata/name").and_then(Value::as_str).map(str::to_string) else {
                return Ok(error_response(422, "Invalid", "metadata.name: Required value"));
            };
            if res.namespaced {
                obj["metadata"]["namespace"] = json!(ns);
            }
            let mut st = lock(&state);
            let key = (t.res, ns, name.clone());
            if st.objects.contains_key(&key) {
                return Ok(error_response(409, "AlreadyExists", &format!("{} \"{name}\" already exists", res.plural)));
            }
            st.uid += 1;
            obj["metadata"]["uid"] = json!(format!("00000000-0000-4000-9000-{:012}", st.uid));
            obj["apiVersion"] = json!(res.api_version);
            obj["kind"] = json!(res.kind);
            st.write(key.clone(), "ADDED", obj);
            let stored = st.objects.get(&key).cloned().unwrap_or_default();
            Ok(json_response(StatusCode::CREATED, &stored))
        }
        (Method::PATCH, Some(name)) => {
            let Some(patch) = read_json(req).await else {
                return Ok(error_response(400, "BadRequest", "body is not a JSON object"));
            };
            let mut st = lock(&state);
            let key = (t.res, t.namespace.clone().unwrap_or_default(), name.clone());
            let Some(mut obj) = st.objects.get(&key).cloned() else {
                return Ok(error_response(404, "NotFound", &format!("{} \"{name}\" not found", res.plural)));
            };
            merge_patch(&mut obj, &patch);
            st.write(key.clone(), "MODIFIED", obj);
            let stored = st.objects.get(&key).cloned().unwrap_or_default();
            Ok(json_response(StatusCode::OK, &stored))
        }
        _ => Ok(error_response(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
    }
}

fn start_watch(st: &mut State, t: &Target, namespace: Option<String>, name: Option<String>) -> Response<Body> {
    let (tx, rx) = mpsc::unbounded_channel::<Chunk>();
    let res = ALL[t.res];
    let watch = Watch { res: t.res, namespace, name, tx };
    let from = t.query.get("resourceVersion").map(String::as_str).unwrap_or("");
    match from {
        // "Any version": synthetic ADDED events for the current state.
        "" | "0" => {
            for (key, obj) in &st.objects {
                if watch.matches(key) {
                    let _ = watch.tx.send(Ok(Frame::data(event_line("ADDED", obj))));
                }
            }
        }
        v => {
            let Ok(from) = v.parse::<u64>() else {
                return error_response(400, "BadRequest", &format!("invalid resourceVersion {v:?}"));
            };
            if from < st.expired_before {
                let line = event_line(
                    "ERROR",
                    &status(410, "Expired", &format!("too old resource version: {from} ({})", st.expired_before)),
                );
                let _ = watch.tx.send(Ok(Frame::data(line)));
                return stream_response(rx);
            }
            for (rv, key, event, obj) in &st.history {
                if *rv > from && watch.matches(key) {
                    let _ = watch.tx.send(Ok(Frame::data(event_line(event, obj))));
                }
            }
        }
    }
    if matches!(t.query.get("allowWatchBookmarks").map(String::as_str), Some("true" | "1")) {
        let _ = watch.tx.send(Ok(Frame::data(bookmark_line(res, st.rv))));
    }
    st.watches.push(watch);
    stream_response(rx)
}

fn stream_response(rx: mpsc::UnboundedReceiver<Chunk>) -> Response<Body> {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

async fn read_json(req: Request<Incoming>) -> Option<Value> {
    let body = req.into_body().collect().await.ok()?.to_bytes();
    let v: Value = serde_json::from_slice(&body).ok()?;
    v.is_object().then_some(v)
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Some(t) = target.as_object_mut() {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The controller under test

/// One call of the controller's sink.
#[derive(Clone)]
pub struct Update {
    pub documents: Vec<Document>,
    pub node_labels: Option<BTreeMap<String, String>>,
    pub snapshot: Arc<Snapshot>,
}

impl Update {
    /// `Kind namespace/name` of every document, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .documents
            .iter()
            .map(|d| {
                let kind = d.value.get("kind").and_then(Value::as_str).unwrap_or("?");
                let ns = d.namespace();
                if ns.is_empty() { format!("{kind} {}", d.name()) } else { format!("{kind} {ns}/{}", d.name()) }
            })
            .collect();
        v.sort();
        v
    }

    pub fn document(&self, kind: &str, namespace: &str, name: &str) -> Option<&Document> {
        self.documents.iter().find(|d| {
            d.value.get("kind").and_then(Value::as_str) == Some(kind) && d.namespace() == namespace && d.name() == name
        })
    }
}

/// The controller running against a fake server, with every sink call recorded.
pub struct Harness {
    pub api: FakeApiServer,
    pub opts: KubeOptions,
    updates: Arc<Mutex<Vec<Update>>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Harness {
    /// Starts the controller. Its sink translates for real (carrying last-good versions and
    /// allocated ports from call to call, as the control plane does) and records the call.
    pub fn start(api: FakeApiServer, opts: KubeOptions) -> Harness {
        let updates: Arc<Mutex<Vec<Update>>> = Arc::default();
        let rec = updates.clone();
        let mut translator = Options::default();
        let sink = move |documents: Vec<Document>, node_labels: Option<BTreeMap<String, String>>| {
            translator.node_labels = node_labels.clone();
            let t = sluice_config::translate(&documents, &translator);
            translator.last_good = t.accepted;
            for l in &t.snapshot.listeners {
                if l.port_allocated
                    && let Some(p) = l.port()
                {
                    translator.previous_ports.insert(l.name.clone(), p);
                }
            }
            let snapshot = Arc::new(t.snapshot);
            rec.lock().unwrap_or_else(|e| e.into_inner()).push(Update {
                documents,
                node_labels,
                snapshot: snapshot.clone(),
            });
            snapshot
        };
        let task = tokio::spawn(kubernetes::run(api.client(), opts.clone(), sink));
        Harness { api, opts, updates, task }
    }

    pub fn updates(&self) -> Vec<Update> {
        self.updates.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn update_count(&self) -> usize {
        self.updates.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn last(&self) -> Option<Update> {
        self.updates.lock().unwrap_or_else(|e| e.into_inner()).last().cloned()
    }

    pub fn ready(&self) -> bool {
        self.opts.ready.load(Ordering::Acquire)
    }

    /// Waits for an update after the first `after` ones that satisfies `f`.
    pub async fn wait_update(&self, after: usize, what: &str, f: impl Fn(&Update) -> bool) -> Update {
        let found = wait_for(what, || self.updates().into_iter().skip(after).find(|u| f(u))).await;
        assert!(!self.task.is_finished(), "the controller stopped");
        found
    }

    /// Asserts that no update arrives for a while: several debounce windows, long enough
    /// for the controller to have acted on anything already sent.
    pub async fn assert_quiet(&self, what: &str) {
        let before = self.update_count();
        tokio::time::sleep(self.opts.debounce * 4 + Duration::from_millis(200)).await;
        let after = self.updates();
        assert_eq!(
            after.len(),
            before,
            "{what}: unexpected update(s): {:?}",
            after.iter().skip(before).map(Update::names).collect::<Vec<_>>()
        );
    }
}

/// Polls `f` every 10 ms until it returns `Some`, for at most 10 s.
pub async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Controller options for tests: node `node-a`, secrets in `cilium-secrets`, short debounce.
pub fn options() -> KubeOptions {
    KubeOptions {
        node_name: Some("node-a".into()),
        secrets_namespaces: vec!["cilium-secrets".into()],
        debounce: Duration::from_millis(50),
        events: true,
        reporting_instance: Some("sluice-test".into()),
        ..KubeOptions::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Objects

/// A CEC whose listener routes to the EDS cluster `<ns>/<backend>`, redirecting Service
/// `<ns>/<front>`.
pub fn cec(ns: &str, name: &str, front: &str, backend: &str) -> Value {
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumEnvoyConfig",
        "metadata": {"name": name, "namespace": ns,
                     "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "team": "web"}},
        "spec": {
            "services": [{"name": front, "namespace": ns}],
            "backendServices": [{"name": backend, "namespace": ns}],
            "resources": [
                listener(&format!("{name}-listener"), &format!("{name}-route"), &[router()]),
                route(&format!("{name}-route"), &format!("{ns}/{backend}")),
                cluster(&format!("{ns}/{backend}")),
            ]
        }
    })
}

/// A CCEC with one listener and route to the EDS cluster `default/<backend>`.
pub fn ccec(name: &str, backend: &str, filters: &[Value]) -> Value {
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideEnvoyConfig",
        "metadata": {"name": name},
        "spec": {
            "backendServices": [{"name": backend, "namespace": "default"}],
            "resources": [
                listener(&format!("{name}-listener"), &format!("{name}-route"), filters),
                route(&format!("{name}-route"), &format!("default/{backend}")),
                cluster(&format!("default/{backend}")),
            ]
        }
    })
}

pub fn listener(name: &str, route: &str, filters: &[Value]) -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": name,
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "rds": {"route_config_name": route},
                "http_filters": filters
            }
        }]}]
    })
}

pub fn router() -> Value {
    json!({"name": "envoy.filters.http.router",
           "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
}

/// An HTTP filter the translator refuses (Lua is not implemented).
pub fn unsupported_filter() -> Value {
    json!({"name": "envoy.filters.http.lua",
           "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                            "default_source_code": {"inline_string": "function envoy_on_request(h) end"}}})
}

pub fn route(name: &str, cluster: &str) -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": name,
        "virtual_hosts": [{"name": name, "domains": ["*"],
                           "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]
    })
}

pub fn cluster(name: &str) -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name, "connect_timeout": "5s", "lb_policy": "ROUND_ROBIN", "type": "EDS"
    })
}

pub fn service(ns: &str, name: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "type": "ClusterIP",
                 "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}]}
    })
}

/// An EndpointSlice of Service `<ns>/<svc>` with ready endpoints at `addrs`, port 8080.
pub fn slice(ns: &str, name: &str, svc: &str, addrs: &[&str]) -> Value {
    let endpoints: Vec<Value> = addrs
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true, "serving": true, "terminating": false}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"kubernetes.io/service-name": svc, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

pub fn tls_secret(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": ns},
        // "cert" and "key": the controller does not parse them, the translator keeps bytes.
        "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5"}
    })
}

pub fn token_secret(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
        "metadata": {"name": name, "namespace": ns},
        "data": {"token": "dG9rZW4="}
    })
}

pub fn node(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}
    })
}

/// Endpoint addresses of an EDS name in a snapshot, as strings.
pub fn endpoints(s: &Snapshot, eds: &str) -> Vec<String> {
    s.endpoints.get(eds).map(|eps| eps.iter().map(|e| e.address.to_string()).collect()).unwrap_or_default()
}
