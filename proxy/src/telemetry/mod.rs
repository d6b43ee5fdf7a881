//! Distributed tracing: one server span per request and one client span per upstream attempt,
//! exported over OTLP (gRPC or HTTP/protobuf).
//!
//! # Where the configuration comes from
//!
//! - The node: `--otlp-endpoint`/`OTEL_EXPORTER_OTLP_ENDPOINT`, `--otlp-protocol`,
//!   `--trace-sampling`/`OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`. With an endpoint, every connection manager
//!   traces with the node's sampling ratio.
//! - A CEC's connection-manager `tracing` block (`envoy.tracers.opentelemetry`): its
//!   `random_sampling` (times `overall_sampling`) applies to that listener's requests, its
//!   custom tags are added to its server spans, and its provider's collector cluster and
//!   `service_name`, when given, decide where its spans go.
//!
//! # Cost
//!
//! A connection manager without tracing pays one `Option` check per request. With tracing,
//! the sampling decision is made once per request, before any span exists: an unsampled
//! request allocates nothing and its trace headers pass through untouched. Spans are built
//! directly with the OpenTelemetry API on the SDK tracer, not through `tracing-opentelemetry`:
//! that bridge would put every request through the `tracing` subscriber registry and tie the
//! span to a lexical scope, while a server span here ends when the response body has been
//! sent, long after the handler returned.
//!
//! Export never runs on a worker: see [`export`].

pub mod export;
pub mod propagation;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use sluice_config::model::HttpConnectionManager;

pub use export::{BatchConfig, Destination, OtlpProtocol, SpanCounters};

use crate::upstream::ClusterManager;

/// Node-level tracing settings (flags and `OTEL_*` variables).
#[derive(Debug, Clone)]
pub struct TracingConfig {
    /// OTLP collector URL; `None` leaves tracing to CECs that name a collector cluster.
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpProtocol,
    /// Ratio of new traces sampled, in [0, 1]. `None`: from `OTEL_TRACES_SAMPLER`, else 1.
    pub sampling: Option<f64>,
    /// `service.name`; `None`: `OTEL_SERVICE_NAME`, else "sluice".
    pub service_name: Option<String>,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig { otlp_endpoint: None, otlp_protocol: OtlpProtocol::Grpc, sampling: None, service_name: None }
    }
}

/// The node's sampling ratio: the flag, else `OTEL_TRACES_SAMPLER` (`always_on`,
/// `always_off`, `traceidratio`, `parentbased_*`; the ratio from `OTEL_TRACES_SAMPLER_ARG`).
/// Parent-based behaviour is built in: a caller's decision is always honoured.
fn node_ratio(flag: Option<f64>) -> f64 {
    if let Some(r) = flag {
        return r.clamp(0.0, 1.0);
    }
    let arg = || std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().and_then(|v| v.trim().parse::<f64>().ok());
    match std::env::var("OTEL_TRACES_SAMPLER").as_deref().map(str::trim) {
        Ok("always_off") | Ok("parentbased_always_off") => 0.0,
        Ok("traceidratio") | Ok("parentbased_traceidratio") => arg().unwrap_or(1.0).clamp(0.0, 1.0),
        _ => 1.0,
    }
}

/// One export pipeline: a tracer whose finished spans go to one destination with one
/// `service.name`.
pub struct Pipeline {
    tracer: SdkTracer,
    _provider: SdkTracerProvider,
    pub destination: Destination,
    pub service_name: String,
}

impl Pipeline {
    fn start_span(&self, name: String, kind: SpanKind, parent: &Context, attrs: Vec<KeyValue>) -> Span {
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, parent);
        Span { inner: Box::new(span) }
    }
}

/// Tracing for the node: the pipelines and what every connection manager uses.
pub struct Telemetry {
    node: Option<Arc<Pipeline>>,
    node_ratio: f64,
    node_protocol: OtlpProtocol,
    node_endpoint: Option<String>,
    service_name: String,
    batch: BatchConfig,
    counters: SpanCounters,
    clusters: Arc<ClusterManager>,
    pipelines: Mutex<HashMap<(Destination, String), Arc<Pipeline>>>,
    tasks: Mutex<Vec<export::ExportTask>>,
}

impl Telemetry {
    /// Starts the node pipeline (when an endpoint is configured). Runs on the control runtime.
    /// `None` when `OTEL_SDK_DISABLED=true`.
    pub fn start(
        cfg: &TracingConfig,
        counters: SpanCounters,
        clusters: Arc<ClusterManager>,
    ) -> Result<Option<Arc<Telemetry>>, String> {
        if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            tracing::info!(target: "sluice::tracing", "OTEL_SDK_DISABLED=true: tracing is off");
            return Ok(None);
        }
        let service_name = cfg
            .service_name
            .clone()
            .or_else(|| std::env::var("OTEL_SERVICE_NAME").ok().filter(|s| !s.trim().is_empty()))
            .unwrap_or_else(|| "sluice".to_string());
        let t = Telemetry {
            node: None,
            node_ratio: node_ratio(cfg.sampling),
            node_protocol: cfg.otlp_protocol,
            node_endpoint: cfg.otlp_endpoint.clone().filter(|e| !e.trim().is_empty()),
            service_name,
            batch: BatchConfig::from_env(),
            counters,
            clusters,
            pipelines: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
        };
        let node = match &t.node_endpoint {
            Some(url) => {
                let dest = Destination::Endpoint { url: url.clone(), protocol: t.node_protocol };
                let p = t.pipeline(&dest, &t.service_name)?;
                tracing::info!(
                    target: "sluice::tracing",
                    "tracing to {dest}, service.name {:?}, sampling {}",
                    t.service_name,
                    t.node_ratio
                );
                Some(p)
            }
            None => None,
        };
        Ok(Some(Arc::new(Telemetry { node, ..t })))
    }

    /// The pipeline for a destination and service name, started on first use.
    fn pipeline(&self, dest: &Destination, service: &str) -> Result<Arc<Pipeline>, String> {
        let key = (dest.clone(), service.to_string());
        let mut pipelines = self.pipelines.lock().map_err(|_| "tracing pipelines lock poisoned".to_string())?;
        if let Some(p) = pipelines.get(&key) {
            return Ok(p.clone());
        }
        let resource = Resource::builder()
            .with_service_name(service.to_string())
            .with_attributes([KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))])
            .build();
        let (processor, task) =
            export::start(dest, resource.clone(), self.batch, self.counters.clone(), self.clusters.clone())?;
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            // Sampling is decided before a span is built (see `HcmTracer::start_server`).
            .with_sampler(Sampler::AlwaysOn)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("sluice");
        let p = Arc::new(Pipeline {
            tracer,
            _provider: provider,
            destination: dest.clone(),
            service_name: service.to_string(),
        });
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.push(task);
        }
        pipelines.insert(key, p.clone());
        Ok(p)
    }

    /// What a connection manager traces with, or `None` when it does not trace. `create`
    /// starts a pipeline a CEC asks for (control thread only); without it only existing
    /// pipelines are used.
    pub fn hcm_tracer(&self, hcm: &HttpConnectionManager, create: bool) -> Option<HcmTracer> {
        let lookup = |dest: Destination, service: &str| -> Option<Arc<Pipeline>> {
            if create {
                match self.pipeline(&dest, service) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        tracing::error!(target: "sluice::tracing", "listener {}: {e}", hcm.stat_prefix);
                        None
                    }
                }
            } else {
                self.pipelines.lock().ok()?.get(&(dest, service.to_string())).cloned()
            }
        };
        match &hcm.tracing {
            None => {
                let node = self.node.clone()?;
                Some(HcmTracer { pipeline: node, ratio: self.node_ratio, tags: Arc::from(Vec::new()) })
            }
            Some(t) => {
                let service = t.service_name.clone().unwrap_or_else(|| self.service_name.clone());
                let pipeline = match (&t.collector_cluster, &self.node_endpoint) {
                    (Some(c), _) => lookup(Destination::Cluster(c.clone()), &service)?,
                    (None, Some(url)) => {
                        lookup(Destination::Endpoint { url: url.clone(), protocol: self.node_protocol }, &service)?
                    }
                    (None, None) => return None,
                };
                let tags: Vec<KeyValue> =
                    t.custom_tags.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())).collect();
                Some(HcmTracer {
                    pipeline,
                    ratio: (t.random_sampling * t.overall_sampling).clamp(0.0, 1.0),
                    tags: Arc::from(tags),
                })
            }
        }
    }

    /// Exports what is queued, within `within`. Called once, at shutdown.
    pub async fn shutdown(&self, within: Duration) {
        let tasks: Vec<_> = self.tasks.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
        let flushes = tasks.into_iter().map(|mut t| async move { t.flush_and_stop(within).await });
        futures_util::future::join_all(flushes).await;
    }
}

/// A connection manager's tracing: its pipeline, sampling ratio and custom tags.
#[derive(Clone)]
pub struct HcmTracer {
    pipeline: Arc<Pipeline>,
    ratio: f64,
    tags: Arc<[KeyValue]>,
}

impl HcmTracer {
    /// Decides whether this request is traced: the caller's decision when it made one,
    /// otherwise the ratio. Only a sampled request gets a span (and pays for the attributes,
    /// which `attrs` builds only then).
    pub fn start_server(
        &self,
        headers: &http::HeaderMap,
        name: String,
        attrs: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<(Span, TraceCtx)> {
        let incoming = propagation::extract(headers);
        let sampled = match incoming.sampled {
            Some(s) => s,
            None => self.ratio >= 1.0 || (self.ratio > 0.0 && rand::random::<f64>() < self.ratio),
        };
        if !sampled {
            return None;
        }
        let parent = match incoming.parent {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => Context::new(),
        };
        let mut attributes = attrs();
        attributes.extend(self.tags.iter().cloned());
        let span = self.pipeline.start_span(name, SpanKind::Server, &parent, attributes);
        let ctx = TraceCtx { pipeline: self.pipeline.clone(), server: span.context() };
        Some((span, ctx))
    }
}

/// A sampled request's trace, for the spans of its upstream attempts.
#[derive(Clone)]
pub struct TraceCtx {
    pipeline: Arc<Pipeline>,
    server: SpanContext,
}

impl TraceCtx {
    /// A client span, child of the request's server span.
    pub fn client_span(&self, name: String, attrs: Vec<KeyValue>) -> Span {
        let parent = Context::new().with_remote_span_context(self.server.clone());
        self.pipeline.start_span(name, SpanKind::Client, &parent, attrs)
    }

    pub fn trace_id(&self) -> opentelemetry::trace::TraceId {
        self.server.trace_id()
    }
}

/// A recording span; it ends when [`Span::end`] is called or it is dropped.
///
/// Boxed: request futures hold an `Option<Span>` for every request, traced or not, and the
/// SDK's span is ~300 bytes that every untraced request would carry and move.
pub struct Span {
    inner: Box<opentelemetry_sdk::trace::Span>,
}

impl Span {
    pub fn context(&self) -> SpanContext {
        self.inner.span_context().clone()
    }

    pub fn set(&mut self, kv: KeyValue) {
        self.inner.set_attribute(kv);
    }

    pub fn rename(&mut self, name: String) {
        self.inner.update_name(name);
    }

    pub fn error(&mut self, description: &'static str) {
        self.inner.set_status(Status::error(description));
    }

    pub fn end(mut self) {
        self.inner.end();
    }

    pub fn end_at(mut self, at: SystemTime) {
        self.inner.end_with_timestamp(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_from_flag_is_clamped() {
        assert_eq!(node_ratio(Some(2.0)), 1.0);
        assert_eq!(node_ratio(Some(-1.0)), 0.0);
        assert_eq!(node_ratio(Some(0.25)), 0.25);
    }
}
