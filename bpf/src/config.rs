//! What the fast path is asked to do.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr};

use serde::Serialize;

use crate::system;

/// `sluice run --fast-path auto|on|off`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Enable what privileges and the kernel allow; otherwise log the specific reason and run
    /// without the fast path.
    #[default]
    Auto,
    /// The fast path is required: failing to start it is an error.
    On,
    /// Never touch BPF.
    Off,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Mode::Auto),
            "on" => Ok(Mode::On),
            "off" => Ok(Mode::Off),
            other => Err(format!("unknown fast-path mode {other:?} (expected auto, on or off)")),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::On => "on",
            Mode::Off => "off",
        })
    }
}

/// Start-up configuration of the fast path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FastPathConfig {
    pub mode: Mode,
    /// cgroup2 directory the programs attach to. Every process below it has its VIP connects
    /// rewritten. Sluice's own listeners must be below it too: an accepted socket belongs to
    /// its listener's cgroup, and only sockets of an attached cgroup run the sockops program
    /// that splices them. Defaults to the cgroup2 mount point.
    pub cgroup: PathBuf,
    /// cgroup2 directories whose processes (and their descendants) opted in to sockmap
    /// splicing. Splicing is opt-in because a *blocking* `read()` on a spliced socket can fail
    /// with EAGAIN (a kernel behaviour of `tcp_bpf_recvmsg`); non-blocking runtimes are
    /// unaffected. Replaceable later with [`crate::FastPath::set_splice_cgroups`].
    pub splice_cgroups: Vec<PathBuf>,
    /// Bound on the bytes the redirect path may queue per connection and direction. The data
    /// plane pauses a connection (see [`crate::FastPath::set_paused`]) when its backlog passes
    /// it, and the BPF programs never let a socket redirect more than this many bytes without
    /// its peer answering. See [`crate::FastPath::pause_threshold`]. One `sendmsg` can form a
    /// message of a few hundred KiB, and a message larger than the remaining credit falls back
    /// to TCP, so values well below 1 MiB make large writes leave the fast path early.
    pub pause_threshold_bytes: usize,
}

/// Envoy's default per-connection buffer limit, which the data plane mirrors.
pub const DEFAULT_PAUSE_THRESHOLD_BYTES: usize = 1024 * 1024;

impl Default for FastPathConfig {
    fn default() -> Self {
        FastPathConfig {
            mode: Mode::Auto,
            cgroup: system::cgroup2_mount().unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup")),
            splice_cgroups: Vec::new(),
            pause_threshold_bytes: DEFAULT_PAUSE_THRESHOLD_BYTES,
        }
    }
}

/// One Service redirect: connects to `vip` are rewritten to the proxy listener `to`.
///
/// `vip` and `to` must be of the same family (v4-mapped IPv6 counts as IPv4). An IPv4 VIP is
/// also redirected for dual-stack (`AF_INET6`) clients, to `::ffff:<to>`. In Kubernetes mode
/// `to` must be an address of the node that pods can reach (not loopback): a loopback target is
/// only honoured for clients in Sluice's own network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Redirect {
    pub vip: SocketAddr,
    pub to: SocketAddr,
}

impl Redirect {
    pub fn new(vip: SocketAddr, to: SocketAddr) -> Self {
        Redirect { vip, to }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_parses_and_prints() {
        for mode in [Mode::Auto, Mode::On, Mode::Off] {
            assert_eq!(mode.to_string().parse::<Mode>(), Ok(mode));
        }
        assert!("yes".parse::<Mode>().is_err());
        assert_eq!(serde_json::to_string(&Mode::On).unwrap(), "\"on\"");
    }
}
