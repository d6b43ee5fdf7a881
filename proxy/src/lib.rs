//! # sluice-proxy
//!
//! The data plane. A connection flows listener → filter chain (→ TLS) → HTTP connection
//! manager → router → cluster → load balancer → connection pool, each stage in a module named
//! after it. Configuration arrives as immutable [`sluice_config::Snapshot`]s; runtime state
//! (pools, outlier detection, circuit breakers, counters) lives beside them and survives a
//! snapshot swap when its cluster is unchanged.
//!
//! - [`app`]: process lifecycle (control thread, workers, admin, reloads, drain);
//! - [`control`]: documents → snapshots, last-good handling, the snapshot hub;
//! - [`source`]: configuration sources (files);
//! - [`runtime`]: worker threads and shared state;
//! - [`listener`]: binding, accepting, PROXY protocol, TLS inspection, filter chain choice;
//! - [`http`]: the connection manager and the request path (router, retries, timeouts);
//! - [`route`]: matching, rewrites, redirects, header mutations, CORS;
//! - [`upstream`]: clusters, load balancers, circuit breakers, outlier detection, pools;
//! - [`tcp_proxy`]: L4 proxying (TLS passthrough);
//! - [`admin`], [`metrics`]: the admin API, health and Prometheus endpoints;
//! - [`telemetry`], [`access_log`]: OTLP tracing and access logs.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod body;
pub mod control;
pub mod fastpath;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod route;
pub mod runtime;
pub mod source;
pub mod tcp_proxy;
pub mod telemetry;
pub mod upstream;
pub mod upstream_hooks;

pub use app::{Config, Source, run};
