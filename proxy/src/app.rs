//! Process lifecycle: start the control plane, the workers and the admin servers; reload on
//! configuration changes; drain and exit on SIGTERM or `/quitquitquit`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sluice_certs::CertStore;
use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::control::{ControlOptions, ControlPlane, SnapshotHub};
use crate::metrics::{Stats, StatsOptions};
use crate::runtime::{DataPlaneHooks, ListenerStatus, NoHooks, Shared, start_workers};
use crate::upstream::ClusterManager;

/// Changes the log filter at runtime (`/logging?level=`).
pub type LogLevelSetter = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Where configuration comes from.
#[derive(Debug, Clone)]
pub enum Source {
    Files(PathBuf),
    Kubernetes,
}

/// Node-level settings (flags and environment).
pub struct Config {
    pub workers: usize,
    pub admin_address: SocketAddr,
    pub health_address: Option<SocketAddr>,
    pub metrics_address: Option<SocketAddr>,
    pub port_range: (u16, u16),
    pub node_name: Option<String>,
    pub node_labels: Option<BTreeMap<String, String>>,
    pub secrets_namespaces: Vec<String>,
    /// Changes the log filter at runtime (`/logging?level=`).
    pub set_log_level: Option<LogLevelSetter>,
    pub hooks: Option<Arc<dyn DataPlaneHooks>>,
    /// The eBPF fast path (`--fast-path`); `None` is off.
    pub fast_path: Option<sluice_bpf::FastPathConfig>,
    /// Node addresses pods reach Sluice on (`--fast-path-node-address`): VIPs served by
    /// wildcard or allocated listeners are rewritten to them, and allocated listeners bind them.
    pub fast_path_node_addresses: Vec<std::net::IpAddr>,
    /// OTLP tracing (`--otlp-endpoint`, `--otlp-protocol`, `--trace-sampling`, `OTEL_*`).
    pub tracing: crate::telemetry::TracingConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workers: 1,
            admin_address: "127.0.0.1:9879".parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9879))),
            health_address: None,
            metrics_address: None,
            port_range: (10000, 20000),
            node_name: None,
            node_labels: None,
            secrets_namespaces: vec!["cilium-secrets".into()],
            set_log_level: None,
            hooks: None,
            fast_path: None,
            fast_path_node_addresses: Vec::new(),
            tracing: crate::telemetry::TracingConfig::default(),
        }
    }
}

/// Runs until shutdown. Blocks the calling thread (it becomes the control thread).
pub fn run(source: Source, config: Config) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the control runtime")?;
    rt.block_on(run_async(source, config))
}

async fn run_async(source: Source, config: Config) -> Result<()> {
    let hub = SnapshotHub::new();
    let certs = Arc::new(CertStore::new());
    let fast_path = match config.fast_path.clone() {
        Some(cfg) => crate::fastpath::start_with(
            cfg,
            crate::fastpath::Options { node_addresses: config.fast_path_node_addresses.clone() },
        )
        .context("the eBPF fast path could not start")?,
        None => None,
    };
    let hooks: Arc<dyn DataPlaneHooks> = match (&config.hooks, &fast_path) {
        (Some(h), _) => h.clone(),
        (None, Some(fp)) => fp.clone(),
        (None, None) => Arc::new(NoHooks),
    };
    let clusters =
        ClusterManager::new(Arc::new(crate::upstream_hooks::Hooks { certs: certs.clone(), datapath: hooks.clone() }));
    // Metrics, tracing and access logs. Built here, on the control runtime, where the trace
    // exporters run.
    let stats = Arc::new(
        Stats::new(StatsOptions {
            fast_path: fast_path.clone(),
            tracing: config.tracing.clone(),
            clusters: clusters.clone(),
        })
        .context("cannot set up metrics and tracing")?,
    );
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let mut control = ControlPlane::new(
        ControlOptions {
            port_range: config.port_range,
            node_labels: config.node_labels.clone(),
            admin_address: Some(config.admin_address),
            // Only with the fast path: pods reach allocated listeners on the node address.
            node_addresses: if fast_path.is_some() { config.fast_path_node_addresses.clone() } else { Vec::new() },
        },
        hub.clone(),
    );
    {
        let certs = certs.clone();
        let clusters = clusters.clone();
        control.on_snapshot(move |s| {
            certs.update_secrets(&s.secrets);
            clusters.update(s);
        });
    }
    if let Some(fp) = fast_path.clone() {
        control.on_snapshot(move |s| fp.on_snapshot(s));
    }
    {
        // After the clusters: per-cluster and per-listener handles see the new clusters.
        let stats = stats.clone();
        let clusters = clusters.clone();
        control.on_snapshot(move |s| stats.on_snapshot(s, &clusters));
    }

    let shared = Arc::new(Shared {
        hub: hub.clone(),
        clusters: clusters.clone(),
        certs: certs.clone(),
        stats: stats.clone(),
        hooks,
        listener_status: ListenerStatus::default(),
        hostname: hostname(),
        shutdown: shutdown_rx.clone(),
    });

    let admin_state = Arc::new(AdminState::new(shared.clone(), shutdown_tx.clone(), config.set_log_level.clone()));
    let admin_listener = tokio::net::TcpListener::bind(config.admin_address)
        .await
        .with_context(|| format!("cannot bind the admin address {}", config.admin_address))?;
    tokio::spawn(admin::serve(admin_listener, admin_state.clone(), admin::Surface::Admin));
    if let Some(addr) = config.health_address {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind the health address {addr}"))?;
        tokio::spawn(admin::serve(l, admin_state.clone(), admin::Surface::Health));
    }
    if let Some(addr) = config.metrics_address {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind the metrics address {addr}"))?;
        tokio::spawn(admin::serve(l, admin_state.clone(), admin::Surface::Metrics));
    }

    let workers = start_workers(shared.clone(), config.workers.max(1)).context("cannot start worker threads")?;

    // Configuration source.
    let mut source_task = match source {
        Source::Files(path) => {
            let (docs, errors) = crate::source::file::load(&path);
            let outcome = control.apply(docs, &errors);
            if matches!(outcome, crate::control::ReloadOutcome::Refused { .. }) {
                tracing::error!("the initial configuration could not be read; serving nothing until it is fixed");
            }
            admin_state.record_reload(&outcome);
            admin_state.set_ready();
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            let watcher = crate::source::file::watch(&path, Duration::from_millis(150), tx)
                .with_context(|| format!("cannot watch {}", path.display()))?;
            let admin_state = admin_state.clone();
            tokio::spawn(async move {
                let _watcher = watcher;
                while rx.recv().await.is_some() {
                    let (docs, errors) = crate::source::file::load(&path);
                    let outcome = control.apply(docs, &errors);
                    admin_state.record_reload(&outcome);
                }
            })
        }
        Source::Kubernetes => {
            use crate::source::kubernetes::{self, KubeOptions};
            let client = kubernetes::client()
                .await
                .context("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG)")?;
            let opts = KubeOptions {
                node_name: config.node_name.clone(),
                secrets_namespaces: config.secrets_namespaces.clone(),
                reporting_instance: std::env::var("POD_NAME").ok(),
                ..Default::default()
            };
            let admin_state = admin_state.clone();
            tokio::spawn(async move {
                let r = kubernetes::run(client, opts, move |docs, labels| {
                    control.set_node_labels(labels);
                    let outcome = control.apply(docs, &[]);
                    admin_state.record_reload(&outcome);
                    // The first call marks the end of the initial sync.
                    admin_state.set_ready();
                    control.hub().load()
                })
                .await;
                if let Err(e) = r {
                    tracing::error!("Kubernetes source stopped: {e:#}");
                }
            })
        }
    };

    let mut shutdown = shutdown_rx.clone();
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("signal received: draining"),
        _ = shutdown.wait_for(|s| *s) => tracing::info!("shutdown requested: draining"),
        _ = &mut source_task => tracing::error!("configuration source stopped"),
    }
    let _ = shutdown_tx.send(true);
    for w in workers {
        let _ = tokio::task::spawn_blocking(move || w.join()).await;
    }
    // The last requests' spans and access log lines.
    stats.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
