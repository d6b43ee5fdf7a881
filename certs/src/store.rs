//! [`CertStore`]: the live TLS material shared by the data plane.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use sluice_config::model::{
    CertificateRef, DownstreamTls, Secret, SessionTickets, TlsParams, UpstreamTls, ValidationRef,
};

use crate::cert::LoadedCert;
use crate::error::CertError;
use crate::slot::{Material, Registry, Reload, Slot};
use crate::source::Inputs;
use crate::status::{MaterialStatus, ReloadCounters, StoreStatus};
use crate::tickets::TicketKeys;
use crate::validation::LoadedValidation;
use crate::watch::DirWatcher;
use crate::{client, server};

/// Tuning of a [`CertStore`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Watch the files material was loaded from and reload on change.
    pub watch_files: bool,
    /// Quiet period after a file event before reloading.
    pub debounce: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { watch_files: true, debounce: Duration::from_millis(100) }
    }
}

/// The live certificate store. Cheap to clone (a handle); all clones share the material.
///
/// Material (certificates, CAs, ticket keys) is loaded when a TLS configuration first needs
/// it, kept current from files (watched) and from secret updates ([`update_secrets`]), and
/// read by the TLS configurations on every handshake. A rejected update leaves the previous
/// material serving.
///
/// [`update_secrets`]: CertStore::update_secrets
#[derive(Clone)]
pub struct CertStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").field("counters", &self.counters()).finish_non_exhaustive()
    }
}

impl Default for CertStore {
    fn default() -> Self {
        CertStore::new()
    }
}

pub(crate) struct Inner {
    me: Weak<Inner>,
    options: StoreOptions,
    /// The unrestricted ring provider: key loading and signature verification.
    pub(crate) provider: Arc<CryptoProvider>,
    secrets: ArcSwap<BTreeMap<String, Arc<Secret>>>,
    certs: Registry<LoadedCert>,
    validations: Registry<LoadedValidation>,
    tickets: Registry<TicketKeys>,
    watcher: Mutex<Option<DirWatcher>>,
    watcher_failed: AtomicBool,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    /// Incremented by every `update_secrets` (one per config snapshot).
    generation: AtomicU64,
    server_cache: Mutex<ConfigCache<DownstreamTls, ServerConfig>>,
    client_cache: Mutex<ConfigCache<UpstreamTls, ClientConfig>>,
    /// Material whose first load failed, by (kind, name). There is no slot (nothing good to
    /// serve), so without this the admin status would not show why a chain refuses its
    /// connections. Cleared with each snapshot; the data plane's next use records it again.
    failed_loads: Mutex<BTreeMap<(&'static str, String), MaterialStatus>>,
}

impl CertStore {
    pub fn new() -> CertStore {
        CertStore::with_options(StoreOptions::default())
    }

    pub fn with_options(options: StoreOptions) -> CertStore {
        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            options,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            secrets: ArcSwap::from_pointee(BTreeMap::new()),
            certs: Registry::default(),
            validations: Registry::default(),
            tickets: Registry::default(),
            watcher: Mutex::new(None),
            watcher_failed: AtomicBool::new(false),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            server_cache: Mutex::new(ConfigCache::default()),
            client_cache: Mutex::new(ConfigCache::default()),
            failed_loads: Mutex::new(BTreeMap::new()),
        });
        CertStore { inner }
    }

    /// Installs the secrets of a new config snapshot (`Snapshot::secrets`: SDS secrets of the
    /// CECs and Kubernetes TLS Secrets). Call it *before* building the snapshot's TLS configs.
    ///
    /// Material depending on a secret that changed is reloaded; a reload that fails is logged
    /// and counted, and the previous material keeps serving. Cached configs that were not
    /// requested during the previous snapshot are dropped.
    pub fn update_secrets(&self, secrets: &BTreeMap<String, Arc<Secret>>) {
        let inner = &self.inner;
        let old = inner.secrets.swap(Arc::new(secrets.clone()));
        let changed: BTreeSet<String> = old
            .keys()
            .chain(secrets.keys())
            .filter(|name| match (old.get(*name), secrets.get(*name)) {
                (Some(a), Some(b)) => !Arc::ptr_eq(a, b) && a != b,
                _ => true,
            })
            .cloned()
            .collect();

        let generation = inner.generation.fetch_add(1, Ordering::AcqRel);
        lock(&inner.failed_loads).clear();
        lock(&inner.server_cache).prune(generation);
        lock(&inner.client_cache).prune(generation);

        if !changed.is_empty() {
            inner.reload_where(|inputs| inputs.secrets.iter().any(|s| changed.contains(s)));
        }
        inner.refresh_watches();
    }

    /// The rustls server configuration for a downstream TLS context (a filter chain's
    /// `transport_socket`).
    ///
    /// The configuration is live: its certificate resolver, client-certificate verifier and
    /// ticket keys read the store on every handshake, so rotations apply to new handshakes
    /// without a new configuration, and established connections are never touched. Identical
    /// contexts share one configuration (and so one session cache) across snapshots.
    ///
    /// Intended to be called when a snapshot's filter chains are built; calling it per
    /// accepted connection also works (a hash and an equality check when cached).
    pub fn server_config(&self, tls: &DownstreamTls) -> Result<Arc<ServerConfig>, CertError> {
        let inner = &self.inner;
        let generation = inner.generation.load(Ordering::Acquire);
        let hash = hash_downstream(tls);
        let mut cache = lock(&inner.server_cache);
        let previous = match cache.lookup(hash, tls, generation) {
            Lookup::Fresh(config) => return Ok(config),
            Lookup::Stale(config) => Some(config),
            Lookup::Missing => None,
        };
        let (config, deps) = server::build(inner, tls, previous.as_deref())?;
        cache.insert(hash, tls.clone(), config.clone(), deps, generation);
        Ok(config)
    }

    /// The rustls client configuration for an upstream TLS context (a cluster's
    /// `transport_socket`). Live in the same way as [`server_config`](Self::server_config).
    ///
    /// Without a validation context the server certificate is **not verified**, exactly as
    /// in Envoy; a warning is logged when such a configuration is built.
    pub fn client_config(&self, tls: &UpstreamTls) -> Result<Arc<ClientConfig>, CertError> {
        let inner = &self.inner;
        let generation = inner.generation.load(Ordering::Acquire);
        let hash = hash_upstream(tls);
        let mut cache = lock(&inner.client_cache);
        match cache.lookup(hash, tls, generation) {
            Lookup::Fresh(config) | Lookup::Stale(config) => return Ok(config),
            Lookup::Missing => {}
        }
        let config = client::build(inner, tls)?;
        cache.insert(hash, tls.clone(), config.clone(), Vec::new(), generation);
        Ok(config)
    }

    /// The server name to connect with for an upstream context: `sni` if set, else the
    /// request's host (`host`, port stripped) — which is what `auto_sni` sends and what
    /// `auto_san_validation` checks. When neither `sni` nor `auto_sni` is set, the client
    /// configuration does not send SNI at all (as Envoy) and this name is not checked.
    pub fn server_name(&self, tls: &UpstreamTls, host: &str) -> Result<ServerName<'static>, CertError> {
        client::server_name(tls, host)
    }

    /// Re-reads every file-backed piece of material now (e.g. on SIGHUP, or where file
    /// watching is unavailable). Unchanged files are not counted as reloads.
    pub fn reload_files(&self) {
        self.inner.reload_where(|inputs| !inputs.files.is_empty());
    }

    pub fn counters(&self) -> ReloadCounters {
        ReloadCounters {
            reloads_ok: self.inner.reloads_ok.load(Ordering::Relaxed),
            reloads_failed: self.inner.reloads_failed.load(Ordering::Relaxed),
        }
    }

    /// Everything loaded, for the admin endpoint.
    pub fn status(&self) -> StoreStatus {
        let inner = &self.inner;
        let mut material = Vec::new();
        collect_status(&inner.certs, &mut material);
        collect_status(&inner.validations, &mut material);
        collect_status(&inner.tickets, &mut material);
        material.extend(lock(&inner.failed_loads).values().cloned());
        material.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        let watched_directories = lock(&inner.watcher)
            .as_ref()
            .map(|w| w.watched().map(|d| d.display().to_string()).collect())
            .unwrap_or_default();
        StoreStatus { counters: self.counters(), watched_directories, material }
    }
}

fn collect_status<M: Material>(registry: &Registry<M>, out: &mut Vec<crate::MaterialStatus>) {
    for slot in registry.live() {
        let last_error = slot.last_error();
        let mut entries = slot.current().status(&slot.name, &M::source(&slot.spec));
        for entry in &mut entries {
            entry.last_error.clone_from(&last_error);
        }
        out.extend(entries);
    }
}

impl Inner {
    pub(crate) fn cert_slot(&self, spec: &CertificateRef) -> Result<Arc<Slot<LoadedCert>>, CertError> {
        self.slot(&self.certs, spec)
    }

    pub(crate) fn validation_slot(&self, spec: &ValidationRef) -> Result<Arc<Slot<LoadedValidation>>, CertError> {
        self.slot(&self.validations, spec)
    }

    pub(crate) fn ticket_slot(&self, spec: &SessionTickets) -> Result<Arc<Slot<TicketKeys>>, CertError> {
        self.slot(&self.tickets, spec)
    }

    fn slot<M: Material>(&self, registry: &Registry<M>, spec: &M::Spec) -> Result<Arc<Slot<M>>, CertError> {
        let secrets = self.secrets.load();
        let (slot, created) = match registry.get_or_load(spec, &secrets, &self.provider) {
            Ok(found) => found,
            Err(error) => {
                let name = M::name(spec);
                lock(&self.failed_loads).insert(
                    (M::KIND, name.clone()),
                    MaterialStatus {
                        kind: M::KIND,
                        name,
                        source: M::source(spec),
                        subject: None,
                        sans: Vec::new(),
                        not_after: None,
                        last_error: Some(error.to_string()),
                    },
                );
                return Err(error);
            }
        };
        if created {
            tracing::info!(kind = M::KIND, name = %slot.name, "loaded TLS material");
            lock(&self.failed_loads).remove(&(M::KIND, slot.name.clone()));
            self.watch(&slot.inputs());
        }
        Ok(slot)
    }

    /// Called by the watcher thread with the directories that saw events.
    pub(crate) fn reload_dirs(&self, dirs: &[PathBuf]) {
        self.reload_where(|inputs| inputs.depends_on_dir(dirs));
    }

    fn reload_where(&self, wanted: impl Fn(&Inputs) -> bool) {
        self.reload_kind(&self.certs, &wanted);
        self.reload_kind(&self.validations, &wanted);
        self.reload_kind(&self.tickets, &wanted);
    }

    fn reload_kind<M: Material>(&self, registry: &Registry<M>, wanted: &impl Fn(&Inputs) -> bool) {
        for slot in registry.live() {
            if !wanted(&slot.inputs()) {
                continue;
            }
            let secrets = self.secrets.load();
            match slot.reload(&secrets, &self.provider) {
                Reload::Unchanged => {}
                Reload::Reloaded => {
                    self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(kind = M::KIND, name = %slot.name, "reloaded TLS material");
                    self.watch(&slot.inputs());
                }
                Reload::Failed(error) => {
                    self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        kind = M::KIND,
                        name = %slot.name,
                        %error,
                        "rejected new TLS material; the previous version keeps serving"
                    );
                }
            }
        }
    }

    fn watch(&self, inputs: &Inputs) {
        if !self.options.watch_files || inputs.files.is_empty() {
            return;
        }
        let mut guard = lock(&self.watcher);
        if guard.is_none() {
            if self.watcher_failed.load(Ordering::Relaxed) {
                return;
            }
            match DirWatcher::start(self.me.clone(), self.options.debounce) {
                Ok(w) => *guard = Some(w),
                Err(e) => {
                    self.watcher_failed.store(true, Ordering::Relaxed);
                    tracing::error!(
                        error = %e,
                        "cannot watch certificate files; rotations on disk need reload_files()"
                    );
                    return;
                }
            }
        }
        if let Some(watcher) = guard.as_mut() {
            for dir in inputs.watch_dirs() {
                watcher.ensure(&dir);
            }
        }
    }

    /// Drops watches no live material needs.
    fn refresh_watches(&self) {
        let mut keep = BTreeSet::new();
        for inputs in self
            .certs
            .live()
            .iter()
            .map(|s| s.inputs())
            .chain(self.validations.live().iter().map(|s| s.inputs()))
            .chain(self.tickets.live().iter().map(|s| s.inputs()))
        {
            keep.extend(inputs.watch_dirs());
        }
        if let Some(watcher) = lock(&self.watcher).as_mut() {
            watcher.retain(&keep);
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Config cache

/// A validation slot and the version a configuration was built from. The server config
/// copies the CA names into its CertificateRequest hints, so a CA change rebuilds it.
pub(crate) type Dep = (Arc<Slot<LoadedValidation>>, u64);

struct CacheEntry<K, C> {
    key: K,
    config: Arc<C>,
    deps: Vec<Dep>,
    used: u64,
}

struct ConfigCache<K, C> {
    buckets: HashMap<u64, Vec<CacheEntry<K, C>>>,
}

impl<K, C> Default for ConfigCache<K, C> {
    fn default() -> Self {
        ConfigCache { buckets: HashMap::new() }
    }
}

enum Lookup<C> {
    Fresh(Arc<C>),
    /// Same context, but material it snapshots has changed: rebuild, reusing session state.
    Stale(Arc<C>),
    Missing,
}

impl<K: PartialEq, C> ConfigCache<K, C> {
    fn lookup(&mut self, hash: u64, key: &K, generation: u64) -> Lookup<C> {
        let Some(entry) = self.buckets.get_mut(&hash).and_then(|b| b.iter_mut().find(|e| e.key == *key)) else {
            return Lookup::Missing;
        };
        entry.used = generation;
        if entry.deps.iter().all(|(slot, version)| slot.version() == *version) {
            Lookup::Fresh(entry.config.clone())
        } else {
            Lookup::Stale(entry.config.clone())
        }
    }

    fn insert(&mut self, hash: u64, key: K, config: Arc<C>, deps: Vec<Dep>, generation: u64) {
        let bucket = self.buckets.entry(hash).or_default();
        bucket.retain(|e| e.key != key);
        bucket.push(CacheEntry { key, config, deps, used: generation });
    }

    /// Drops entries not used since generation `min`.
    fn prune(&mut self, min: u64) {
        for bucket in self.buckets.values_mut() {
            bucket.retain(|e| e.used >= min);
        }
        self.buckets.retain(|_, b| !b.is_empty());
    }
}

/// A cheap discriminator over the fields that usually differ; equality decides.
fn hash_downstream(tls: &DownstreamTls) -> u64 {
    let mut h = DefaultHasher::new();
    hash_certs(&tls.certificates, &mut h);
    tls.alpn.hash(&mut h);
    hash_params(&tls.params, &mut h);
    (tls.require_client_certificate, tls.disable_stateless_session_resumption).hash(&mut h);
    tls.disable_stateful_session_resumption.hash(&mut h);
    h.finish()
}

fn hash_upstream(tls: &UpstreamTls) -> u64 {
    let mut h = DefaultHasher::new();
    hash_certs(&tls.certificates, &mut h);
    tls.sni.hash(&mut h);
    tls.alpn.hash(&mut h);
    hash_params(&tls.params, &mut h);
    (tls.auto_sni, tls.auto_san_validation).hash(&mut h);
    h.finish()
}

fn hash_certs(certs: &[CertificateRef], h: &mut DefaultHasher) {
    for c in certs {
        match c {
            CertificateRef::Inline(tc) => tc.hash(h),
            CertificateRef::Sds(name) => name.hash(h),
        }
    }
}

fn hash_params(p: &TlsParams, h: &mut DefaultHasher) {
    (p.min_version as u8, p.max_version as u8).hash(h);
    p.cipher_suites.hash(h);
    p.ecdh_curves.hash(h);
}
