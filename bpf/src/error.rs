//! Errors of the fast path.

use std::{io, net::SocketAddr, path::PathBuf};

/// Why the fast path could not start or could not apply an update.
#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    /// The host lacks something the fast path needs: a capability, a kernel feature, a cgroup2
    /// hierarchy. `Mode::Auto` logs this and runs without the fast path.
    #[error("eBPF fast path unavailable: {0}")]
    Unsupported(String),

    /// The configuration itself is wrong (fails in every mode).
    #[error("invalid fast-path configuration: {0}")]
    Config(String),

    /// A Service redirect that cannot be installed.
    #[error("invalid redirect {vip} -> {to}: {reason}")]
    InvalidRedirect { vip: SocketAddr, to: SocketAddr, reason: &'static str },

    /// The embedded BPF object could not be parsed or its maps could not be created.
    #[error("loading the BPF object failed: {0}")]
    Object(#[source] Box<aya::EbpfError>),

    /// A BPF program could not be loaded (verifier) or attached.
    #[error("BPF program {program}: {action} failed: {summary}")]
    Program {
        program: &'static str,
        action: &'static str,
        /// The specific reason, e.g. the last lines of the verifier log.
        summary: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    /// A map operation failed.
    #[error("BPF map {map}: {op} failed: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },

    /// A file under /proc or the cgroup hierarchy could not be read.
    #[error("{what} ({path}): {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl FastPathError {
    /// True when the error comes from the environment rather than from the configuration, so
    /// `Mode::Auto` may carry on without the fast path.
    pub fn is_environmental(&self) -> bool {
        !matches!(self, FastPathError::Config(_) | FastPathError::InvalidRedirect { .. })
    }

    pub(crate) fn program(program: &'static str, action: &'static str, source: aya::programs::ProgramError) -> Self {
        let summary = summarize_program_error(&source);
        FastPathError::Program { program, action, summary, source: Box::new(source) }
    }

    pub(crate) fn map(map: &'static str, op: &'static str, source: aya::maps::MapError) -> Self {
        FastPathError::Map { map, op, source: Box::new(source) }
    }
}

/// A verifier log runs to hundreds of lines; its last lines name the rejected instruction or
/// helper (e.g. "unknown func bpf_get_netns_cookie#122"), which is what an operator needs.
fn summarize_program_error(err: &aya::programs::ProgramError) -> String {
    match err {
        aya::programs::ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().map(str::trim).filter(|l| !l.is_empty()).rev().take(3).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            if tail.is_empty() {
                format!("BPF_PROG_LOAD: {io_error}")
            } else {
                format!("BPF_PROG_LOAD: {io_error}; verifier: {}", tail.join(" | "))
            }
        }
        other => other.to_string(),
    }
}
