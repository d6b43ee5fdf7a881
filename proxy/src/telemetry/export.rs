//! Getting finished spans to a collector without ever slowing a request.
//!
//! A worker hands a finished span to [`BoundedProcessor::on_end`], which only does a
//! non-blocking `try_send` into a bounded queue: when the queue is full (the collector is
//! slow or down and earlier batches are still pending) the span is dropped and counted. An
//! export task on the control runtime drains the queue in batches and calls the OTLP exporter;
//! a failed or timed-out export drops (and counts) its batch. No retry: a collector that
//! cannot keep up would only make the backlog older.
//!
//! Why not the SDK's `BatchSpanProcessor`: it exports from its own thread with a blocking
//! executor (the tonic and hyper exporters need a tokio runtime, which the control runtime
//! already is), and it does not expose how many spans it dropped, which is the one number an
//! operator needs (`sluice_tracing_spans_dropped`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _, SpanProcessor};
use prometheus::IntCounter;
use sluice_config::model::UpstreamProtocol;
use tokio::sync::{mpsc, oneshot};

use crate::upstream::{ClusterManager, LbContext};

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

impl std::str::FromStr for OtlpProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpc" => Ok(OtlpProtocol::Grpc),
            "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
            other => Err(format!("unsupported OTLP protocol {other:?} (grpc or http/protobuf)")),
        }
    }
}

/// Batching and queueing limits, from the standard `OTEL_BSP_*` variables.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Spans waiting for export; beyond this they are dropped (`OTEL_BSP_MAX_QUEUE_SIZE`).
    pub max_queue: usize,
    /// Spans per export call (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`).
    pub max_batch: usize,
    /// How long a partial batch waits for more spans (`OTEL_BSP_SCHEDULE_DELAY`, ms).
    /// 1 s rather than the specification's 5 s: traces show up while the user still looks.
    pub delay: Duration,
    /// Bound on one export call (`OTEL_BSP_EXPORT_TIMEOUT`, ms).
    pub export_timeout: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_queue: 2048,
            max_batch: 512,
            delay: Duration::from_millis(1000),
            export_timeout: Duration::from_secs(10),
        }
    }
}

impl BatchConfig {
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<u64>().ok());
        let d = BatchConfig::default();
        let max_queue = var("OTEL_BSP_MAX_QUEUE_SIZE").map(|v| v as usize).filter(|v| *v > 0).unwrap_or(d.max_queue);
        BatchConfig {
            max_queue,
            max_batch: var("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
                .map(|v| v as usize)
                .filter(|v| *v > 0)
                .unwrap_or(d.max_batch)
                .min(max_queue),
            delay: var("OTEL_BSP_SCHEDULE_DELAY").map(Duration::from_millis).unwrap_or(d.delay),
            export_timeout: var("OTEL_BSP_EXPORT_TIMEOUT")
                .filter(|v| *v > 0)
                .map(Duration::from_millis)
                .unwrap_or(d.export_timeout),
        }
    }
}

/// The export counters (`sluice_tracing_spans_exported`, `sluice_tracing_spans_dropped`).
#[derive(Clone)]
pub struct SpanCounters {
    pub exported: IntCounter,
    pub dropped_queue_full: IntCounter,
    pub dropped_export_failed: IntCounter,
}

/// Where a pipeline's spans go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    /// A collector URL from the node's flags or `OTEL_*` variables.
    Endpoint { url: String, protocol: OtlpProtocol },
    /// A cluster named by a CEC's `envoy.tracers.opentelemetry` provider; gRPC when the
    /// cluster speaks HTTP/2, else OTLP/HTTP on `/v1/traces`.
    Cluster(String),
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Endpoint { url, protocol } => write!(f, "{url} ({protocol:?})"),
            Destination::Cluster(c) => write!(f, "cluster {c}"),
        }
    }
}

/// The span processor of one pipeline: a non-blocking hand-off into a bounded queue.
#[derive(Debug)]
pub struct BoundedProcessor {
    tx: mpsc::Sender<SpanData>,
    dropped: IntCounter,
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The running export task of a pipeline.
pub struct ExportTask {
    stop: Option<oneshot::Sender<oneshot::Sender<()>>>,
}

impl ExportTask {
    /// Asks the task to export what is queued and stop; waits at most `within`.
    pub async fn flush_and_stop(&mut self, within: Duration) {
        let Some(stop) = self.stop.take() else { return };
        let (done_tx, done_rx) = oneshot::channel();
        if stop.send(done_tx).is_ok() {
            let _ = tokio::time::timeout(within, done_rx).await;
        }
    }
}

/// Starts the processor/exporter pair of a pipeline. Must run on the control runtime: the
/// export task and the exporters' connections live there, never on a worker.
pub fn start(
    destination: &Destination,
    resource: Resource,
    batch: BatchConfig,
    counters: SpanCounters,
    clusters: Arc<ClusterManager>,
) -> Result<(BoundedProcessor, ExportTask), String> {
    let exporter = match destination {
        Destination::Endpoint { url, protocol } => {
            let mut e = build_exporter(url, *protocol, batch.export_timeout)?;
            e.set_resource(&resource);
            Exporter::Direct(e)
        }
        Destination::Cluster(name) => Exporter::Cluster(ClusterExporter {
            clusters,
            name: name.clone(),
            resource,
            timeout: batch.export_timeout,
            current: None,
        }),
    };
    let (tx, rx) = mpsc::channel(batch.max_queue);
    let (stop_tx, stop_rx) = oneshot::channel();
    let label = destination.to_string();
    tokio::spawn(export_loop(rx, stop_rx, exporter, batch, counters.clone(), label));
    Ok((BoundedProcessor { tx, dropped: counters.dropped_queue_full }, ExportTask { stop: Some(stop_tx) }))
}

/// An OTLP exporter for a URL. For OTLP/HTTP a bare `scheme://host:port` gets the
/// specification's `/v1/traces` path (as `OTEL_EXPORTER_OTLP_ENDPOINT` would).
pub fn build_exporter(
    url: &str,
    protocol: OtlpProtocol,
    timeout: Duration,
) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let built = match protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(url.to_string())
            .with_timeout(timeout)
            .build(),
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(http_traces_url(url))
            .with_timeout(timeout)
            .build(),
    };
    built.map_err(|e| format!("cannot build the OTLP exporter for {url}: {e}"))
}

/// `http://host:4318` -> `http://host:4318/v1/traces`; a URL with a path is kept.
pub fn http_traces_url(url: &str) -> String {
    let trimmed = url.trim_end_matches('/');
    let after_scheme = trimmed.split_once("://").map(|(_, rest)| rest).unwrap_or(trimmed);
    if after_scheme.contains('/') { trimmed.to_string() } else { format!("{trimmed}/v1/traces") }
}

enum Exporter {
    Direct(opentelemetry_otlp::SpanExporter),
    Cluster(ClusterExporter),
}

impl Exporter {
    async fn export(&mut self, batch: Vec<SpanData>) -> Result<(), String> {
        match self {
            Exporter::Direct(e) => e.export(batch).await.map_err(|e| e.to_string()),
            Exporter::Cluster(c) => c.export(batch).await,
        }
    }
}

/// Exports to one host of a cluster, chosen by the cluster's load balancer at each batch;
/// the exporter (and its connection) is kept while the host stays the same.
struct ClusterExporter {
    clusters: Arc<ClusterManager>,
    name: String,
    resource: Resource,
    timeout: Duration,
    current: Option<(SocketAddr, opentelemetry_otlp::SpanExporter)>,
}

impl ClusterExporter {
    async fn export(&mut self, batch: Vec<SpanData>) -> Result<(), String> {
        let cluster = self
            .clusters
            .get(&self.name)
            .ok_or_else(|| format!("collector cluster {} is not configured", self.name))?;
        let headers = http::HeaderMap::new();
        let host = cluster
            .choose(&LbContext { hash: None, original_dst: None, tried: &[], headers: &headers })
            .ok_or_else(|| format!("collector cluster {} has no healthy host", self.name))?;
        let addr = host.socket_addr().ok_or_else(|| format!("collector cluster {}: host not resolved", self.name))?;
        if self.current.as_ref().map(|(a, _)| *a) != Some(addr) {
            let protocol = match cluster.config().protocol {
                UpstreamProtocol::Http2 => OtlpProtocol::Grpc,
                _ => OtlpProtocol::HttpProtobuf,
            };
            let mut e = build_exporter(&format!("http://{addr}"), protocol, self.timeout)?;
            e.set_resource(&self.resource);
            self.current = Some((addr, e));
        }
        match &self.current {
            Some((_, e)) => e.export(batch).await.map_err(|e| e.to_string()),
            None => Err("no exporter".into()),
        }
    }
}

async fn export_loop(
    mut rx: mpsc::Receiver<SpanData>,
    mut stop: oneshot::Receiver<oneshot::Sender<()>>,
    mut exporter: Exporter,
    cfg: BatchConfig,
    counters: SpanCounters,
    label: String,
) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(cfg.max_batch);
    let mut failures_logged = 0u32;
    let done = loop {
        // Wait for the first span of a batch, then at most `delay` for the rest.
        tokio::select! {
            n = rx.recv_many(&mut batch, cfg.max_batch) => if n == 0 { break None },
            done = &mut stop => break done.ok(),
        }
        let deadline = tokio::time::Instant::now() + cfg.delay;
        let mut stopped = None;
        while batch.len() < cfg.max_batch {
            let room = cfg.max_batch - batch.len();
            tokio::select! {
                n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                _ = tokio::time::sleep_until(deadline) => break,
                done = &mut stop => { stopped = Some(done.ok()); break }
            }
        }
        export_batch(&mut exporter, &mut batch, &cfg, &counters, &label, &mut failures_logged).await;
        if let Some(done) = stopped {
            break done;
        }
    };
    // Shutdown: whatever is queued gets one last chance.
    rx.close();
    while let Ok(s) = rx.try_recv() {
        batch.push(s);
        if batch.len() == cfg.max_batch {
            export_batch(&mut exporter, &mut batch, &cfg, &counters, &label, &mut failures_logged).await;
        }
    }
    export_batch(&mut exporter, &mut batch, &cfg, &counters, &label, &mut failures_logged).await;
    if let Some(done) = done {
        let _ = done.send(());
    }
}

async fn export_batch(
    exporter: &mut Exporter,
    batch: &mut Vec<SpanData>,
    cfg: &BatchConfig,
    counters: &SpanCounters,
    label: &str,
    failures_logged: &mut u32,
) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len() as u64;
    let spans = std::mem::replace(batch, Vec::with_capacity(cfg.max_batch));
    let result = match tokio::time::timeout(cfg.export_timeout, exporter.export(spans)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", cfg.export_timeout)),
    };
    match result {
        Ok(()) => {
            counters.exported.inc_by(n);
            *failures_logged = 0;
        }
        Err(e) => {
            counters.dropped_export_failed.inc_by(n);
            // One line per outage, not one per batch.
            if *failures_logged == 0 {
                tracing::warn!(target: "sluice::tracing", "span export to {label} failed, dropping spans until it recovers: {e}");
            }
            *failures_logged = failures_logged.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_path() {
        assert_eq!(http_traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(http_traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(http_traces_url("https://c/otlp/v1/traces"), "https://c/otlp/v1/traces");
    }

    #[test]
    fn protocols() {
        assert_eq!("grpc".parse::<OtlpProtocol>(), Ok(OtlpProtocol::Grpc));
        assert_eq!("http/protobuf".parse::<OtlpProtocol>(), Ok(OtlpProtocol::HttpProtobuf));
        assert!("http/json".parse::<OtlpProtocol>().is_err());
    }
}
