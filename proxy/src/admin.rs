//! Envoy-style admin API on localhost, the health endpoint (`/healthz`, like cilium-envoy's
//! port 9878) and the Prometheus endpoint (`/metrics`, like port 9964).
//!
//! These run on the control thread, never on a worker, so a slow scrape cannot delay traffic.

use std::convert::Infallible;
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

fn handle(state: &AdminState, surface: Surface, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    match (surface, path) {
        (Surface::Health, "/healthz") | (Surface::Admin, "/ready") | (Surface::Admin, "/healthz") => {
            if state.is_ready() {
                text(StatusCode::OK, "LIVE\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING\n")
            }
        }
        (Surface::Metrics, "/metrics") | (Surface::Admin, "/stats/prometheus") | (Surface::Admin, "/metrics") => {
            let mut r = text(StatusCode::OK, state.shared.stats.render(&state.shared));
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4"));
            r
        }
        (Surface::Admin, "/server_info") => json_response(&json!({
            "version": env!("CARGO_PKG_VERSION"),
            "state": if state.is_ready() { "LIVE" } else { "PRE_INITIALIZING" },
            "hostname": state.shared.hostname,
            "uptime_current_epoch": state.started.elapsed().map(|d| format!("{}s", d.as_secs())).unwrap_or_default(),
            "command_line_options": std::env::args().collect::<Vec<_>>(),
        })),
        (Surface::Admin, "/config_dump") => {
            let snap = state.shared.hub.load();
            let last = state.last_reload.lock().ok().and_then(|l| l.clone()).map(|o| format!("{o:?}"));
            json_response(&json!({
                "generation": state.shared.hub.generation(),
                "last_reload": last,
                "snapshot": &*snap,
                "listeners_bound": state.shared.listener_status.snapshot().into_iter().map(|(a, s)| (a.to_string(), s)).collect::<std::collections::BTreeMap<_, _>>(),
                "certificates": state.shared.certs.status(),
            }))
        }
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
        (Surface::Admin, "/logging") if req.method() == Method::POST => {
            let level = query.split('&').find_map(|kv| kv.strip_prefix("level="));
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
        (Surface::Admin, "/") => text(
            StatusCode::OK,
            "sluice admin\n  /ready /server_info /config_dump /listeners /stats/prometheus\n  POST /logging?level=  POST /quitquitquit\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
