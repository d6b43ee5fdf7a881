//! Kubernetes mode: documents from the API server, watched with kube-runtime reflectors.
//!
//! # Design
//!
//! Kubernetes mode feeds the translator exactly what file mode feeds it: a complete set of
//! [`Document`]s (CECs, CCECs, Services, EndpointSlices, Secrets). Nothing here interprets
//! Envoy configuration or applies Cilium's backend rules; the translator does, so both modes
//! produce the same snapshot from the same objects.
//!
//! * **Stores, not event handlers.** One kube-runtime watcher per kind (one per namespace for
//!   Secrets, which RBAC grants only there) feeds a reflector store. Events only say *that*
//!   something changed; the document set is always rebuilt from the stores. A lost or
//!   repeated event therefore cannot leave the configuration half-updated, and every rebuild
//!   is a complete, self-consistent view.
//! * **Debounce.** The first relevant change opens a window of [`KubeOptions::debounce`];
//!   everything that arrives inside it is folded into one rebuild. A rollout that touches
//!   twenty EndpointSlices causes one translation, not twenty. The window is fixed (not
//!   extended by later events), so a constantly busy cluster still gets an update every
//!   window.
//! * **Atomic relists.** When a watch cannot resume (410 Gone after a compaction, a
//!   disconnect longer than the API server's watch cache), kube-runtime relists. The store
//!   buffers the relisted objects and swaps them in only when the list is complete
//!   (`InitDone`); until then it keeps serving the previous state. Rebuilds only ever read
//!   stores, so a relist never produces an empty or partial document set. A relist that
//!   changes nothing produces the same documents, and an unchanged set is not handed on.
//! * **Readiness.** `sink` is first called once every watcher has completed its initial
//!   list. [`KubeOptions::ready`] turns true after that call, never before.
//! * **Only what matters.** Services and EndpointSlices are handed to the translator only
//!   when some CEC or CCEC names their Service (`spec.services`, `spec.backendServices`), and
//!   a change to any other Service or EndpointSlice does not cause a rebuild: on a large
//!   cluster endpoint churn elsewhere would otherwise retranslate continuously. Node updates
//!   cause a rebuild only when the node's labels change (kubelet updates its Node often).
//! * **Events where users look.** CECs have no status. A CEC or CCEC the translator rejects
//!   (or serves from its previous version) gets a Kubernetes Event of type Warning, reason
//!   `TranslationFailed`, whose note is the diagnostic exactly as `sluice check` prints it
//!   (`error: namespace/name: json.path: message`). Each distinct message is published once
//!   per object; it is published again only after the object was accepted (or deleted) in
//!   between. Events of a namespaced CEC go to its namespace; a CCEC is cluster-scoped and,
//!   as kube's `Recorder` does for cluster-scoped objects, its Events go to `default`.
//!
//! # Node labels
//!
//! `spec.nodeSelector` is matched against this node's labels. With
//! [`KubeOptions::node_name`] set, the controller watches that Node (field selector
//! `metadata.name=NODE_NAME`) and passes its labels to `sink` along with the documents; the
//! caller hands them to the translator (`sluice_config::Options::node_labels`). Without a
//! node name the labels are `None`, which selects every CEC. A named node that does not
//! exist has no labels (`Some` of an empty map), so only CECs without a selector apply.

mod documents;
mod events;
mod watch;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use sluice_config::{Document, Snapshot, StoredDocument};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use self::documents::Built;
use self::watch::{Notice, What};

/// Settings of the Kubernetes source.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// This node's name (`NODE_NAME` from the downward API). Its labels are matched against
    /// `spec.nodeSelector`; `None` selects every CEC.
    pub node_name: Option<String>,
    /// Namespaces whose Secrets are watched (one watcher each: RBAC grants only these).
    pub secrets_namespaces: Vec<String>,
    /// How long a burst of changes is collected before the documents are rebuilt.
    pub debounce: Duration,
    /// Publish Kubernetes Events on CECs/CCECs that fail translation.
    pub events: bool,
    /// `reportingInstance` of published Events: the pod name (`POD_NAME` from the downward
    /// API). Defaults to the node name.
    pub reporting_instance: Option<String>,
    /// Turns true after the first call of `sink`, i.e. after the initial sync of every
    /// watched kind. Never turns false again: a lost watch keeps serving the last state.
    pub ready: Arc<AtomicBool>,
    /// Counters for metrics.
    pub counters: Arc<KubeCounters>,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            node_name: None,
            secrets_namespaces: vec!["cilium-secrets".into()],
            debounce: Duration::from_millis(100),
            events: true,
            reporting_instance: None,
            ready: Arc::new(AtomicBool::new(false)),
            counters: Arc::new(KubeCounters::default()),
        }
    }
}

/// What the controller did, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct KubeCounters {
    /// Document sets handed to `sink`.
    pub updates: AtomicU64,
    /// Errors reported by watchers (each is retried with backoff).
    pub watch_errors: AtomicU64,
    /// Kubernetes Events published about rejected CECs/CCECs.
    pub events_published: AtomicU64,
    /// Events that could not be published (after retries).
    pub events_failed: AtomicU64,
}

/// Builds a client from the in-cluster service account, or from `KUBECONFIG` /
/// `~/.kube/config` outside a cluster.
///
/// Installs rustls' ring provider (the proxy's) as the process default first. kube's
/// rustls stack builds its TLS config from the process default and installs one itself only
/// with its aws-lc-rs feature; rustls' own fallback works only while exactly one provider
/// is compiled in, so a dependency that pulls in aws-lc-rs later would otherwise turn into
/// a panic at start-up.
pub async fn client() -> Result<kube::Client> {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
    kube::Client::try_default()
        .await
        .context("cannot configure the Kubernetes client (no in-cluster service account and no usable KUBECONFIG)")
}

/// Watches the API server and calls `sink` with the complete document set and this node's
/// labels after the initial sync and after every debounced burst of relevant changes.
///
/// `sink` translates and publishes (typically `ControlPlane::apply` with the labels set
/// as `node_labels`) and returns the resulting snapshot, whose per-CEC reports drive the
/// Events. It runs on this task; it should not block for long.
///
/// Runs until the future is dropped (which stops every watcher). Watch errors are retried
/// with kube-runtime's backoff and never end it; it only returns an error if every watcher
/// task has stopped, which does not happen in normal operation.
pub async fn run<F>(client: kube::Client, opts: KubeOptions, mut sink: F) -> Result<()>
where
    F: FnMut(Vec<Document>, Option<NodeLabels>) -> Arc<Snapshot> + Send + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Dropping the set (when this future is dropped) aborts every watcher and the publisher.
    let mut tasks = JoinSet::new();
    let stores = watch::start(&client, &opts, tx, &mut tasks);
    let mut reporter = opts.events.then(|| {
        let instance = opts.reporting_instance.clone().or_else(|| opts.node_name.clone());
        events::EventReporter::spawn(client.clone(), instance, opts.counters.clone(), &mut tasks)
    });
    let mut state = SyncState::new(stores.watcher_count());
    tracing::info!(
        target: "sluice::kubernetes",
        node = opts.node_name.as_deref().unwrap_or("<none>"),
        secrets_namespaces = ?opts.secrets_namespaces,
        "watching CiliumEnvoyConfigs, CiliumClusterwideEnvoyConfigs, Services, EndpointSlices, Secrets and the Node"
    );

    loop {
        let notice = rx.recv().await.context("every Kubernetes watcher stopped")?;
        state.absorb(notice, &stores);
        if !state.due() {
            continue;
        }
        // Collect the rest of the burst.
        let deadline = Instant::now() + opts.debounce;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(n)) => state.absorb(n, &stores),
                Ok(None) => anyhow::bail!("every Kubernetes watcher stopped"),
                Err(_) => break,
            }
        }

        let mut built = documents::build(&stores);
        let initial = !state.initial_done;
        let unchanged = state.accept(&mut built);
        if built.node_missing != state.node_missing {
            // Logged on the transition only: every rebuild would otherwise repeat it.
            let node = opts.node_name.as_deref().unwrap_or("");
            if built.node_missing {
                tracing::warn!(
                    target: "sluice::kubernetes",
                    node,
                    "this node's Node object does not exist; CECs with a spec.nodeSelector do not apply"
                );
            } else {
                tracing::info!(target: "sluice::kubernetes", node, "this node's Node object exists again");
            }
            state.node_missing = built.node_missing;
        }
        if unchanged {
            tracing::debug!(target: "sluice::kubernetes", "resync produced the same documents; nothing to apply");
            continue;
        }
        let count = built.documents.len();
        let snapshot = sink(built.documents, built.node_labels);
        opts.counters.updates.fetch_add(1, Ordering::Relaxed);
        if initial {
            opts.ready.store(true, Ordering::Release);
            tracing::info!(target: "sluice::kubernetes", documents = count, "initial sync complete");
        } else {
            tracing::debug!(target: "sluice::kubernetes", documents = count, "documents rebuilt");
        }
        if let Some(r) = reporter.as_mut() {
            r.report(&snapshot, &built.references);
        }
    }
}

/// A node's labels, as `spec.nodeSelector` sees them.
pub type NodeLabels = BTreeMap<String, String>;

/// What the loop knows between rebuilds.
struct SyncState {
    /// Per watcher: has it completed its initial list?
    synced: Vec<bool>,
    /// A change that the next rebuild must include.
    pending: bool,
    /// The first document set has been handed on.
    initial_done: bool,
    /// Services (`namespace/name`) named by some CEC, as of the last rebuild.
    interest: std::collections::BTreeSet<String>,
    /// Services and EndpointSlices included in the last rebuild.
    included: std::collections::BTreeSet<documents::ObjectId>,
    /// The last document set (kept compact) and labels handed on, to skip identical resyncs.
    last: Option<(Vec<StoredDocument>, Option<NodeLabels>)>,
    /// The named Node did not exist at the last rebuild.
    node_missing: bool,
}

impl SyncState {
    fn new(watchers: usize) -> SyncState {
        SyncState {
            synced: vec![false; watchers],
            pending: false,
            initial_done: false,
            interest: Default::default(),
            included: Default::default(),
            last: None,
            node_missing: false,
        }
    }

    /// Every watcher has listed once, and there is something to hand on.
    fn due(&self) -> bool {
        self.synced.iter().all(|s| *s) && (self.pending || !self.initial_done)
    }

    fn absorb(&mut self, notice: Notice, stores: &watch::Stores) {
        match notice.what {
            What::Synced => {
                if let Some(s) = self.synced.get_mut(notice.watcher) {
                    *s = true;
                }
                // A relist may have changed anything of this kind. An unchanged result is
                // caught by comparing the rebuilt documents.
                self.pending |= match notice.kind {
                    watch::Kind::Node => self.labels_changed(stores),
                    _ => true,
                };
            }
            What::Touched { object, service } => {
                self.pending |= match notice.kind {
                    watch::Kind::Service | watch::Kind::EndpointSlice => {
                        !self.initial_done
                            || service.as_ref().is_some_and(|s| self.interest.contains(s))
                            || self.included.contains(&object)
                    }
                    watch::Kind::Node => self.labels_changed(stores),
                    _ => true,
                };
            }
        }
    }

    fn labels_changed(&self, stores: &watch::Stores) -> bool {
        let Some((_, last_labels)) = &self.last else { return true };
        &documents::node_labels(stores).0 != last_labels
    }

    /// Records a rebuild (taking what only the loop needs); returns whether it equals the
    /// last one handed on.
    fn accept(&mut self, built: &mut Built) -> bool {
        self.pending = false;
        self.interest = std::mem::take(&mut built.interest);
        self.included = std::mem::take(&mut built.included);
        let documents: Vec<StoredDocument> = built.documents.iter().map(StoredDocument::new).collect();
        let unchanged = self.last.as_ref().is_some_and(|(d, l)| *d == documents && *l == built.node_labels);
        if !unchanged {
            self.last = Some((documents, built.node_labels.clone()));
        }
        self.initial_done = true;
        unchanged
    }
}
