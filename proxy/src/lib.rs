//! # sluice-proxy
//!
//! The data plane. A connection flows listener → filter chain (→ TLS) → HTTP connection
//! manager → router → cluster → load balancer → connection pool, each stage in a module named
//! after it. Configuration arrives as immutable [`sluice_config::Snapshot`]s; runtime state
//! (pools, outlier detection, circuit breakers, counters) lives beside them and survives a
//! snapshot swap when its cluster is unchanged.

pub mod body;
pub mod route;
pub mod upstream;
