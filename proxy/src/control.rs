//! The control plane: documents in, snapshots out.
//!
//! Every source (files, Kubernetes) hands its complete document set to [`ControlPlane::apply`],
//! which translates it, keeps the last good version of every CEC, keeps allocated ports
//! stable, and publishes the result through the [`SnapshotHub`]. A reload that cannot be
//! read at all (a YAML syntax error) publishes nothing: the running configuration stays.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use sluice_config::model::SourceState;
use sluice_config::{Diagnostic, Document, Options, Snapshot, StoredDocument, translate};
use tokio::sync::watch;

/// The current snapshot, readable with one atomic load, plus a change notification.
pub struct SnapshotHub {
    current: ArcSwap<Snapshot>,
    generation: AtomicU64,
    tx: watch::Sender<u64>,
}

impl SnapshotHub {
    pub fn new() -> Arc<SnapshotHub> {
        let (tx, _) = watch::channel(0);
        Arc::new(SnapshotHub { current: ArcSwap::from_pointee(Snapshot::default()), generation: AtomicU64::new(0), tx })
    }

    /// The snapshot now. Requests already routed keep the one they loaded.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Cheap check for "has anything changed since generation g".
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    pub fn publish(&self, snapshot: Arc<Snapshot>) -> u64 {
        self.current.store(snapshot);
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.tx.send_replace(g);
        g
    }
}

/// Translation allocates and frees a lot (a large CEC is parsed into a JSON tree, decoded,
/// and dropped). glibc keeps freed memory in its arenas, so without this the process would
/// stay at its translation peak; returning it keeps the resident size close to what the
/// running configuration needs.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Node-level settings for translation.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    pub port_range: (u16, u16),
    pub node_labels: Option<BTreeMap<String, String>>,
    pub admin_address: Option<SocketAddr>,
    /// Node addresses allocated listeners also bind (for pods redirected by the fast path).
    pub node_addresses: Vec<std::net::IpAddr>,
}

/// What one reload did, for logs, metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new snapshot was published. `rejected` lists CECs that were refused (or are
    /// served from their previous version).
    Applied { generation: u64, errors: usize, warnings: usize, rejected: Vec<String> },
    /// Nothing was published; the previous snapshot keeps serving.
    Refused { errors: Vec<String> },
}

/// A step that must see each snapshot before traffic does.
type SnapshotStep = Box<dyn Fn(&Snapshot) + Send + Sync>;

pub struct ControlPlane {
    opts: ControlOptions,
    hub: Arc<SnapshotHub>,
    last_good: BTreeMap<String, StoredDocument>,
    ports: BTreeMap<String, u16>,
    /// The problems the last reload logged, so a reload logs only new ones.
    reported: std::collections::HashSet<String>,
    /// Called with each snapshot before it is published (cluster state, certificates).
    prepare: Vec<SnapshotStep>,
}

impl ControlPlane {
    pub fn new(opts: ControlOptions, hub: Arc<SnapshotHub>) -> ControlPlane {
        ControlPlane {
            opts,
            hub,
            last_good: BTreeMap::new(),
            ports: BTreeMap::new(),
            reported: Default::default(),
            prepare: Vec::new(),
        }
    }

    /// Registers a step that must see each snapshot before traffic does.
    pub fn on_snapshot(&mut self, f: impl Fn(&Snapshot) + Send + Sync + 'static) {
        self.prepare.push(Box::new(f));
    }

    pub fn hub(&self) -> &Arc<SnapshotHub> {
        &self.hub
    }

    /// This node's labels, for `spec.nodeSelector` (Kubernetes mode learns them from the API).
    pub fn set_node_labels(&mut self, labels: Option<BTreeMap<String, String>>) {
        self.opts.node_labels = labels;
    }

    /// Translates a complete document set and publishes it. `read_errors` are documents
    /// that could not be read or parsed: they refuse the whole reload, because applying the
    /// rest would silently drop whatever the unreadable file held.
    pub fn apply(&mut self, docs: Vec<Document>, read_errors: &[Diagnostic]) -> ReloadOutcome {
        if !read_errors.is_empty() {
            for e in read_errors {
                tracing::error!(target: "sluice::config", "{e}; keeping the running configuration");
            }
            return ReloadOutcome::Refused { errors: read_errors.iter().map(ToString::to_string).collect() };
        }
        let opts = Options {
            port_range: self.opts.port_range,
            previous_ports: self.ports.clone(),
            node_labels: self.opts.node_labels.clone(),
            last_good: self.last_good.clone(),
            admin_address: self.opts.admin_address,
            ipv6: true,
            node_addresses: self.opts.node_addresses.clone(),
        };
        let t = translate(&docs, &opts);
        // The parsed documents are the largest thing a reload allocates; let them go before
        // the freed memory is returned below.
        drop(docs);
        let snapshot = t.snapshot;
        let mut errors = 0;
        let mut warnings = 0;
        // A problem is logged when it appears, not again on every reload that still has it
        // (in Kubernetes mode, endpoint churn elsewhere rebuilds every few hundred ms).
        let mut reported = std::collections::HashSet::new();
        let mut report = |level: tracing::Level, line: String| {
            if !self.reported.contains(&line) {
                match level {
                    tracing::Level::ERROR => tracing::error!(target: "sluice::config", "{line}"),
                    _ => tracing::warn!(target: "sluice::config", "{line}"),
                }
            }
            reported.insert(line);
        };
        for d in &snapshot.diagnostics {
            if d.is_error() {
                errors += 1;
                report(tracing::Level::ERROR, d.to_string());
            } else {
                warnings += 1;
                report(tracing::Level::WARN, d.to_string());
            }
        }
        let mut rejected = Vec::new();
        for s in &snapshot.sources {
            match &s.state {
                SourceState::Rejected { reason } => {
                    report(tracing::Level::ERROR, format!("{}: rejected: {reason}", s.name));
                    rejected.push(s.name.clone());
                }
                SourceState::PreviousVersion { reason } => {
                    report(
                        tracing::Level::ERROR,
                        format!("{}: new version rejected ({reason}); previous version keeps serving", s.name),
                    );
                    rejected.push(s.name.clone());
                }
                _ => {}
            }
        }
        self.reported = reported;
        for l in &snapshot.listeners {
            if l.port_allocated
                && let Some(p) = l.port()
            {
                if self.ports.get(&l.name) != Some(&p) {
                    tracing::info!(target: "sluice::config", "listener {} gets port {p} from the proxy port range", l.name);
                }
                self.ports.insert(l.name.clone(), p);
            }
        }
        self.last_good = t.accepted;
        for f in &self.prepare {
            f(&snapshot);
        }
        let generation = self.hub.publish(Arc::new(snapshot));
        release_freed_memory();
        tracing::info!(target: "sluice::config", generation, errors, warnings, "configuration applied");
        ReloadOutcome::Applied { generation, errors, warnings, rejected }
    }
}
