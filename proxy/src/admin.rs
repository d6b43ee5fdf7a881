//! Envoy-style admin API on localhost, the health endpoint (`/healthz`, like cilium-envoy's
//! port 9878) and the Prometheus endpoint (`/metrics`, like port 9964).
//!
//! Admin: `GET /ready`, `/server_info`, `/config_dump` (the effective native configuration,
//! its source CECs and the diagnostics), `/listeners`, `/clusters[?format=json]` (hosts,
//! health, outlier ejections, circuit-breaker limits), `/stats[?filter=X&format=json]`
//! (Envoy's dotted names), `/stats/prometheus`; `POST /logging?level=`, `/reopen_logs`,
//! `/quitquitquit` (stop accepting, drain, exit).
//!
//! These run on the control thread, never on a worker, so a slow scrape cannot delay traffic.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use sluice_config::model::EndpointHealth;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::LogLevelSetter;
use crate::control::ReloadOutcome;
use crate::runtime::Shared;

/// Which endpoints a listening port offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    Admin,
    Health,
    Metrics,
}

pub struct AdminState {
    pub shared: Arc<Shared>,
    ready: AtomicBool,
    shutdown: watch::Sender<bool>,
    set_log_level: Option<LogLevelSetter>,
    last_reload: Mutex<Option<ReloadOutcome>>,
    started: std::time::SystemTime,
}

impl AdminState {
    pub fn new(shared: Arc<Shared>, shutdown: watch::Sender<bool>, set_log_level: Option<LogLevelSetter>) -> Self {
        AdminState {
            shared,
            ready: AtomicBool::new(false),
            shutdown,
            set_log_level,
            last_reload: Mutex::new(None),
            started: std::time::SystemTime::now(),
        }
    }

    /// Readiness turns true once the first configuration has been applied.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !*self.shutdown.borrow()
    }

    pub fn record_reload(&self, outcome: &ReloadOutcome) {
        self.shared.stats.record_reload(outcome);
        if let Ok(mut l) = self.last_reload.lock() {
            *l = Some(outcome.clone());
        }
    }
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>, surface: Surface) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, surface, req)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn json_response(v: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Envoy's `/clusters`: one `cluster::key::value` line per setting and per host, or JSON with
/// `?format=json`.
fn clusters(state: &AdminState, query: &str) -> Response<Full<Bytes>> {
    let all = state.shared.clusters.clusters();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    if query_param(query, "format") == Some("json") {
        let v: Vec<serde_json::Value> = names
            .iter()
            .filter_map(|n| all.get(*n))
            .map(|c| {
                let limits = c.breakers().limits();
                let hosts: Vec<serde_json::Value> = c
                    .hosts()
                    .iter()
                    .map(|h| {
                        json!({
                            "address": h.address().to_string(),
                            "hostname": h.hostname(),
                            "health": format!("{:?}", h.health()).to_lowercase(),
                            "ejected": h.is_ejected(),
                            "ejections": h.ejections(),
                            "active_requests": h.active_requests(),
                            "weight": h.weight(),
                            "priority": h.priority(),
                        })
                    })
                    .collect();
                json!({
                    "name": c.name(),
                    "ready": c.is_ready(),
                    "circuit_breakers": {
                        "max_connections": limits.max_connections,
                        "max_pending_requests": limits.max_pending_requests,
                        "max_requests": limits.max_requests,
                        "max_retries": limits.max_retries,
                    },
                    "active": {
                        "connections": c.breakers().connections(),
                        "pending_requests": c.breakers().pending_requests(),
                        "requests": c.breakers().active_requests(),
                        "retries": c.breakers().active_retries(),
                    },
                    "hosts": hosts,
                })
            })
            .collect();
        return json_response(&json!({ "cluster_statuses": v }));
    }
    let mut out = String::new();
    for n in names {
        let Some(c) = all.get(n) else { continue };
        let l = c.breakers().limits();
        let _ = writeln!(out, "{n}::default_priority::max_connections::{}", l.max_connections);
        let _ = writeln!(out, "{n}::default_priority::max_pending_requests::{}", l.max_pending_requests);
        let _ = writeln!(out, "{n}::default_priority::max_requests::{}", l.max_requests);
        let _ = writeln!(out, "{n}::default_priority::max_retries::{}", l.max_retries);
        let _ = writeln!(out, "{n}::added_via_api::true");
        for h in c.hosts().iter() {
            let a = h.address();
            let health = match (h.is_ejected(), h.health()) {
                (true, _) => "/failed_outlier_check".to_string(),
                (false, EndpointHealth::Healthy | EndpointHealth::Unknown) => "healthy".to_string(),
                (false, EndpointHealth::Degraded) => "/degraded_eds_health".to_string(),
                (false, other) => format!("/failed_eds_health({})", format!("{other:?}").to_lowercase()),
            };
            let _ = writeln!(out, "{n}::{a}::hostname::{}", h.hostname().unwrap_or(""));
            let _ = writeln!(out, "{n}::{a}::health_flags::{health}");
            let _ = writeln!(out, "{n}::{a}::weight::{}", h.weight());
            let _ = writeln!(out, "{n}::{a}::priority::{}", h.priority());
            let _ = writeln!(out, "{n}::{a}::rq_active::{}", h.active_requests());
            let _ = writeln!(out, "{n}::{a}::outlier_ejections::{}", h.ejections());
        }
    }
    text(StatusCode::OK, out)
}

fn handle(state: &AdminState, surface: Surface, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    match (surface, path) {
        (Surface::Health, "/healthz") | (Surface::Admin, "/ready") | (Surface::Admin, "/healthz") => {
            if state.is_ready() {
                text(StatusCode::OK, "LIVE\n")
            } else if *state.shutdown.borrow() {
                text(StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING\n")
            }
        }
        (Surface::Metrics, "/metrics") | (Surface::Admin, "/stats/prometheus") | (Surface::Admin, "/metrics") => {
            prometheus_text(state)
        }
        (Surface::Admin, "/stats") => match query_param(query, "format") {
            Some("prometheus") => prometheus_text(state),
            Some("json") => {
                let body = state.shared.stats.render_plain(&state.shared, query_param(query, "filter"));
                let stats: Vec<serde_json::Value> = body
                    .lines()
                    .filter_map(|l| l.split_once(": "))
                    .map(|(name, value)| match value.parse::<f64>() {
                        Ok(v) => json!({"name": name, "value": v}),
                        Err(_) => json!({"name": name, "histogram": value}),
                    })
                    .collect();
                json_response(&json!({ "stats": stats }))
            }
            _ => text(StatusCode::OK, state.shared.stats.render_plain(&state.shared, query_param(query, "filter"))),
        },
        (Surface::Admin, "/clusters") => clusters(state, query),
        (Surface::Admin, "/server_info") => {
            let uptime = state.started.elapsed().map(|d| d.as_secs()).unwrap_or(0);
            json_response(&json!({
                "version": env!("CARGO_PKG_VERSION"),
                "state": if state.is_ready() { "LIVE" } else if *state.shutdown.borrow() { "DRAINING" } else { "PRE_INITIALIZING" },
                "hostname": state.shared.hostname,
                "uptime_current_epoch": format!("{uptime}s"),
                "uptime_all_epochs": format!("{uptime}s"),
                "command_line_options": std::env::args().collect::<Vec<_>>(),
                "config_generation": state.shared.hub.generation(),
                "tracing": state.shared.stats.telemetry().is_some(),
            }))
        }
        (Surface::Admin, "/config_dump") => {
            let snap = state.shared.hub.load();
            let last = state.last_reload.lock().ok().and_then(|l| l.clone()).map(|o| format!("{o:?}"));
            json_response(&json!({
                "generation": state.shared.hub.generation(),
                "last_reload": last,
                "snapshot": &*snap,
                "listeners_bound": state.shared.listener_status.snapshot().into_iter().map(|(a, s)| (a.to_string(), s)).collect::<std::collections::BTreeMap<_, _>>(),
                "certificates": state.shared.certs.status(),
                "fast_path": state.shared.stats.fast_path_status(),
            }))
        }
        (Surface::Admin, "/fast_path") => json_response(&json!(state.shared.stats.fast_path_status())),
        (Surface::Admin, "/listeners") => {
            let snap = state.shared.hub.load();
            let v: Vec<_> = snap
                .listeners
                .iter()
                .map(|l| json!({"name": l.name, "addresses": l.addresses, "port_allocated": l.port_allocated, "source": l.source}))
                .collect();
            json_response(&json!(v))
        }
        (Surface::Admin, "/quitquitquit") if req.method() == Method::POST => {
            let _ = state.shutdown.send(true);
            text(StatusCode::OK, "OK\n")
        }
        (Surface::Admin, "/reopen_logs") if req.method() == Method::POST => {
            state.shared.stats.reopen_access_logs();
            text(StatusCode::OK, "OK\n")
        }
        (Surface::Admin, "/logging") if req.method() == Method::POST => {
            let level = query_param(query, "level");
            match (level, &state.set_log_level) {
                (Some(l), Some(set)) => match set(l) {
                    Ok(()) => text(StatusCode::OK, format!("log level set to {l}\n")),
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                },
                (None, _) => {
                    text(StatusCode::BAD_REQUEST, "usage: POST /logging?level=<trace|debug|info|warn|error>\n")
                }
                (_, None) => text(StatusCode::NOT_IMPLEMENTED, "log level changes are not available\n"),
            }
        }
        (Surface::Admin, "/quitquitquit" | "/reopen_logs" | "/logging") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n")
        }
        (Surface::Admin, "/") => text(
            StatusCode::OK,
            "sluice admin\n  GET  /ready /server_info /config_dump /listeners /clusters[?format=json]\n  GET  /stats[?filter=&format=json|prometheus] /stats/prometheus\n  POST /logging?level=  /reopen_logs  /quitquitquit\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn prometheus_text(state: &AdminState) -> Response<Full<Bytes>> {
    let mut r = text(StatusCode::OK, state.shared.stats.render(&state.shared));
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}
