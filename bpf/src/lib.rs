//! Sluice eBPF fast path.
//!
//! Two things, both optional and both invisible to applications:
//!
//! 1. **Transparent redirect.** A `connect()` to a Service VIP from any process under the
//!    attached cgroup is rewritten to the Sluice listener serving that VIP. `getpeername()`
//!    still reports the VIP, and Sluice recovers it after `accept()` with
//!    [`FastPath::original_dst`].
//! 2. **Splicing.** For workloads that opted in ([`FastPathConfig::splice_cgroups`]), the
//!    bytes between the application and Sluice skip the TCP/IP stack: each message is moved
//!    by an `sk_msg` program straight into the peer socket's receive queue.
//!
//! Wiring in the data plane:
//! - at start-up: [`FastPath::start`] (from Sluice's own process and network namespace);
//! - on each configuration snapshot: [`FastPath::set_services`], [`FastPath::set_listeners`]
//!   and, in Kubernetes mode, [`FastPath::set_splice_cgroups`];
//! - after `accept()`: [`FastPath::original_dst`] with the accepted socket's (peer, local);
//! - before each upstream `connect()`: [`FastPath::bypass`] on the new socket;
//! - when a connection's backlog passes [`FastPath::pause_threshold`]:
//!   [`FastPath::set_paused`];
//! - admin/metrics: [`FastPath::stats`], [`FastPath::status`].
//!
//! Dropping the [`FastPath`] detaches every program. The design, the map layouts and the
//! kernel behaviours each rule answers are described in `bpf/README.md`.
//!
//! This is the only crate of the workspace with `unsafe` code: the `aya::Pod` impls of the
//! map structs and one `getsockopt` call.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod abi;
mod config;
mod error;
mod fastpath;
mod object;
mod stats;
mod system;

pub use abi::normalize;
pub use config::{DEFAULT_PAUSE_THRESHOLD_BYTES, FastPathConfig, Mode, Redirect};
pub use error::FastPathError;
pub use fastpath::{AttachedProgram, FastPath, Status};
pub use stats::Stats;
pub use system::{cgroup2_mount, own_cgroup_dir};
