//! The `sluice` command: CLI wiring only. Everything it runs lives in the workspace crates.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use sluice_config::model::SourceState;
use sluice_config::{Options, Severity, translate};
use sluice_proxy::source::file;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A pure-Rust L7 proxy configured by CiliumEnvoyConfig",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(Box<RunArgs>),
    /// Translate CECs and print the diagnostics; exits 1 if any CEC is rejected or a file is unreadable.
    Check {
        /// A file or a directory of YAML/JSON documents.
        path: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Translate CECs and print the native model as JSON.
    Translate {
        path: PathBuf,
        /// Print an Envoy v3 bootstrap for the same configuration instead (for side-by-side tests).
        #[arg(long)]
        envoy_bootstrap: bool,
        /// Envoy's admin address in the bootstrap.
        #[arg(long, default_value = "127.0.0.1:19901", requires = "envoy_bootstrap")]
        envoy_admin_address: SocketAddr,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(clap::Args)]
struct RunArgs {
    /// File or directory of CEC/CCEC, Service, EndpointSlice and Secret documents (file mode), watched for changes.
    #[arg(long, required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    config: Option<PathBuf>,
    /// Watch the Kubernetes API (in-cluster config or KUBECONFIG) instead of files.
    #[arg(long)]
    kubernetes: bool,
    /// Worker threads, each with its own event loop (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Envoy-style admin API (keep it on localhost).
    #[arg(long, default_value = "127.0.0.1:9879")]
    admin_address: SocketAddr,
    /// Health endpoint (`GET /healthz`), like cilium-envoy's [default: 127.0.0.1:9878].
    #[arg(long)]
    health_address: Option<SocketAddr>,
    /// Prometheus endpoint (`GET /metrics`), like cilium-envoy's [default: 0.0.0.0:9964].
    #[arg(long)]
    metrics_address: Option<SocketAddr>,
    /// Do not open the default health and metrics endpoints (tests and benchmarks); an
    /// explicit --health-address or --metrics-address still applies.
    #[arg(long)]
    no_health_metrics: bool,
    /// Range for listeners without an address, as `MIN-MAX`.
    #[arg(long, default_value = "10000-20000", value_parser = parse_range)]
    proxy_port_range: (u16, u16),
    /// This node's name (Kubernetes mode).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// This node's labels for `spec.nodeSelector` in file mode, as `k=v,k2=v2`.
    #[arg(long, value_parser = parse_labels)]
    node_labels: Option<BTreeMap<String, String>>,
    /// Namespaces whose Secrets are synced (Kubernetes mode).
    #[arg(long = "secrets-namespace", default_value = "cilium-secrets")]
    secrets_namespaces: Vec<String>,
    /// The eBPF fast path: auto enables what the kernel and privileges allow.
    #[arg(long, default_value = "off", value_parser = ["auto", "on", "off"])]
    fast_path: String,
    /// cgroup2 directory the fast path attaches to.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    fast_path_cgroup: PathBuf,
    /// cgroup2 directories whose connections are spliced (sockmap); connect redirects apply
    /// to every attached cgroup, splicing only to these opted-in workloads.
    #[arg(long = "fast-path-splice-cgroup", env = "SLUICE_FAST_PATH_SPLICE_CGROUPS", value_delimiter = ':')]
    fast_path_splice_cgroups: Vec<PathBuf>,
    /// Node addresses (at most one per family) pods reach Sluice on.
    #[arg(long = "fast-path-node-address", env = "SLUICE_FAST_PATH_NODE_ADDRESS", value_delimiter = ',')]
    fast_path_node_addresses: Vec<std::net::IpAddr>,
    /// OTLP collector endpoint, e.g. http://collector:4317 (also
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then OTEL_EXPORTER_OTLP_ENDPOINT). Without one,
    /// only CECs whose tracing block names a collector cluster are traced.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// OTLP protocol (also OTEL_EXPORTER_OTLP_PROTOCOL).
    #[arg(long, default_value = "grpc", env = "OTEL_EXPORTER_OTLP_PROTOCOL", value_parser = ["grpc", "http/protobuf"])]
    otlp_protocol: String,
    /// Ratio of new traces sampled, in [0, 1] (also OTEL_TRACES_SAMPLER_ARG; without either,
    /// OTEL_TRACES_SAMPLER decides, else 1). A caller's sampling decision is always honoured.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", value_parser = parse_ratio)]
    trace_sampling: Option<f64>,
    /// Log filter, e.g. `info` or `sluice=debug`.
    #[arg(long, default_value = "info", env = "SLUICE_LOG")]
    log_level: String,
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or("expected MIN-MAX, e.g. 10000-20000")?;
    let a: u16 = a.trim().parse().map_err(|_| format!("{a:?} is not a port"))?;
    let b: u16 = b.trim().parse().map_err(|_| format!("{b:?} is not a port"))?;
    if a == 0 || a > b {
        return Err("the range must be non-empty and start above 0".into());
    }
    Ok((a, b))
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(0.0..=1.0).contains(&r) {
        return Err("the sampling ratio must be between 0 and 1".into());
    }
    Ok(r)
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    s.split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{kv:?} is not k=v"))
        })
        .collect()
}

const DEFAULT_HEALTH: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9878);
const DEFAULT_METRICS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9964);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Check { path, format } => check(&path, format),
        Command::Translate { path, envoy_bootstrap, envoy_admin_address } => {
            translate_cmd(&path, envoy_bootstrap, envoy_admin_address).map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let set_log_level = init_logging(&args.log_level, &args.log_format)?;
    let source = match (&args.config, args.kubernetes) {
        (Some(path), false) => sluice_proxy::Source::Files(path.clone()),
        (None, true) => sluice_proxy::Source::Kubernetes,
        _ => bail!("give exactly one of --config PATH and --kubernetes"),
    };
    let workers = args.workers.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let config = sluice_proxy::Config {
        workers,
        admin_address: args.admin_address,
        health_address: args.health_address.or((!args.no_health_metrics).then_some(DEFAULT_HEALTH)),
        metrics_address: args.metrics_address.or((!args.no_health_metrics).then_some(DEFAULT_METRICS)),
        port_range: args.proxy_port_range,
        node_name: args.node_name,
        node_labels: args.node_labels,
        secrets_namespaces: args.secrets_namespaces,
        set_log_level: Some(set_log_level),
        hooks: None,
        fast_path: match args.fast_path.as_str() {
            "off" => None,
            mode => Some(sluice_bpf::FastPathConfig {
                mode: mode.parse().map_err(|e| anyhow::anyhow!("--fast-path: {e}"))?,
                cgroup: args.fast_path_cgroup.clone(),
                splice_cgroups: args.fast_path_splice_cgroups.clone(),
                ..Default::default()
            }),
        },
        fast_path_node_addresses: args.fast_path_node_addresses.clone(),
        tracing: sluice_proxy::telemetry::TracingConfig {
            // The flag, else the traces endpoint, else the generic one (which gets `/v1/traces`
            // appended for http/protobuf).
            otlp_endpoint: args.otlp_endpoint.clone().or_else(|| {
                ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
                    .iter()
                    .find_map(|v| std::env::var(v).ok().filter(|e| !e.trim().is_empty()))
            }),
            otlp_protocol: args.otlp_protocol.parse().map_err(|e: String| anyhow::anyhow!("--otlp-protocol: {e}"))?,
            sampling: args.trace_sampling,
            service_name: None,
        },
    };
    sluice_proxy::run(source, config)?;
    Ok(ExitCode::SUCCESS)
}

type SetLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Logs to stderr; the filter can be changed at runtime through the admin API.
fn init_logging(level: &str, format: &str) -> Result<SetLevel> {
    use tracing_subscriber::{EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt};
    let filter = EnvFilter::try_new(quiet_peers(level)).with_context(|| format!("invalid log filter {level:?}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(true);
    let registry = Registry::default().with(filter);
    if format == "json" {
        registry.with(fmt.json()).try_init().ok();
    } else {
        registry.with(fmt).try_init().ok();
    }
    Ok(Arc::new(move |l: &str| {
        let f = EnvFilter::try_new(quiet_peers(l)).map_err(|e| format!("invalid log level {l:?}: {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())
    }))
}

/// rustls warns about what peers do (an IP address as SNI, an unknown alert) on every
/// handshake: a client could flood the log. Those go to errors-only unless the filter names
/// rustls itself.
fn quiet_peers(filter: &str) -> String {
    if filter.contains("rustls") { filter.to_string() } else { format!("{filter},rustls=error") }
}

fn check(path: &std::path::Path, format: Format) -> Result<ExitCode> {
    if !path.exists() {
        bail!("{}: no such file or directory", path.display());
    }
    let (docs, read_errors) = file::load(path);
    let t = translate(&docs, &Options::default());
    let s = &t.snapshot;
    let rejected = s.sources.iter().filter(|r| matches!(r.state, SourceState::Rejected { .. })).count();
    let failed = !read_errors.is_empty() || rejected > 0 || s.has_errors();
    match format {
        Format::Json => {
            let out = serde_json::json!({
                "ok": !failed,
                "read_errors": read_errors,
                "diagnostics": s.diagnostics,
                "sources": s.sources,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Format::Text => {
            for e in &read_errors {
                println!("{e}");
            }
            for d in s.diagnostics.iter().filter(|d| d.severity == Severity::Error) {
                println!("{d}");
            }
            for d in s.diagnostics.iter().filter(|d| d.severity == Severity::Warning) {
                println!("{d}");
            }
            for r in &s.sources {
                let state = match &r.state {
                    SourceState::Accepted => "accepted".to_string(),
                    SourceState::Rejected { .. } => "REJECTED".to_string(),
                    SourceState::PreviousVersion { .. } => "rejected (previous version serving)".to_string(),
                    SourceState::NotSelected => "not selected by nodeSelector".to_string(),
                };
                println!(
                    "{}: {state} ({} listeners, {} route configurations, {} clusters, {} secrets)",
                    r.name,
                    r.listeners.len(),
                    r.route_configs.len(),
                    r.clusters.len(),
                    r.secrets.len()
                );
            }
            for l in &s.listeners {
                let addrs: Vec<String> = l.addresses.iter().map(ToString::to_string).collect();
                println!(
                    "  listener {} on {}",
                    l.name,
                    if addrs.is_empty() { "(internal)".into() } else { addrs.join(", ") }
                );
            }
            let errors = s.diagnostics.iter().filter(|d| d.is_error()).count() + read_errors.len();
            let warnings = s.diagnostics.len() - (errors - read_errors.len());
            println!(
                "{} CECs accepted, {rejected} rejected; {errors} errors, {warnings} warnings",
                s.sources.len() - rejected
            );
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn translate_cmd(path: &std::path::Path, envoy: bool, envoy_admin: SocketAddr) -> Result<()> {
    if !path.exists() {
        bail!("{}: no such file or directory", path.display());
    }
    let (docs, read_errors) = file::load(path);
    if let Some(e) = read_errors.first() {
        bail!("{e}");
    }
    let t = translate(&docs, &Options::default());
    for d in t.snapshot.diagnostics.iter().filter(|d| d.is_error()) {
        eprintln!("{d}");
    }
    let out = if envoy {
        let opts = sluice_config::envoy_export::ExportOptions { admin_address: envoy_admin, concurrency_hint: None };
        sluice_config::envoy_export::envoy_bootstrap(&docs, &t, &opts)
            .context("cannot express this configuration as an Envoy bootstrap")?
    } else {
        serde_json::to_value(&t.snapshot)?
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
