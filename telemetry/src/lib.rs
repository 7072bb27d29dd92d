//! Logs and traces for `cache-node` and `cache-agent`.
//!
//! [`init`] installs one `tracing` subscriber: log lines on stderr (text or JSON, under a
//! filter), and, when the standard `OTEL_*` variables ask for it, every span of the
//! project's own crates exported over OTLP/gRPC through `tracing-opentelemetry`. The
//! [`propagation`] module carries the W3C trace context (`traceparent`) in gRPC metadata,
//! so that one load is one trace across the agent, the node and its peers, and
//! [`metrics_http`] serves Prometheus metrics on `--metrics-listen`.

pub mod metrics_http;
pub mod propagation;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// For people: one line per event, coloured on a terminal.
    #[default]
    Text,
    /// For machines: one JSON object per line.
    Json,
}

/// What [`init`] installs.
#[derive(Clone, Debug)]
pub struct Options {
    /// `service.name` of exported spans unless `OTEL_SERVICE_NAME` (or `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES`) says otherwise.
    pub service: &'static str,
    /// The log filter, already checked by [`parse_filter`].
    pub filter: String,
    pub format: LogFormat,
    /// Whether log lines name their module (the node's do; the agent's CLI lines do not).
    pub targets: bool,
}

/// The standard variables the exporter honours (read by the OpenTelemetry SDK and its
/// OTLP exporter, or here).
pub const VARIABLES: &[&str] = &[
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_TRACES_EXPORTER",
    "OTEL_SDK_DISABLED",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_EXPORT_TIMEOUT",
];

/// Spans exported over OTLP: those of the project's crates, at info and above, whatever
/// the log filter (a node logging warnings only still traces its loads).
const TRACED: &str = "cache_node=info,cache_agent=info,modelcache=info";

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks a log filter: every directive is a level, or `TARGET=LEVEL` (a bare word that is
/// not a level, like a misspelt one, is refused instead of silently filtering a target).
pub fn parse_filter(s: &str) -> Result<String, String> {
    for directive in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{directive:?} is not a level ({}) or TARGET=LEVEL",
                LEVELS.join(", ")
            ));
        }
    }
    EnvFilter::try_new(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("{s:?}: {e}"))
}

/// The filter from `RUST_LOG`, checked, when it is set.
pub fn filter_from_env() -> Option<Result<String, String>> {
    let value = std::env::var("RUST_LOG").ok()?;
    Some(parse_filter(&value).map_err(|e| format!("RUST_LOG: {e}")))
}

/// Whether the standard variables ask for spans to be exported: an OTLP endpoint is set
/// (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), the SDK is not
/// disabled (`OTEL_SDK_DISABLED`) and `OTEL_TRACES_EXPORTER` is not `none`.
pub fn export_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let is = |name: &str, value: &str| {
        std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
    };
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !is("OTEL_SDK_DISABLED", "true")
        && !is("OTEL_TRACES_EXPORTER", "none")
}

/// The installed subscriber's exporter; [`Telemetry::shutdown`] sends the spans not yet
/// exported.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the subscriber. Must run inside the Tokio runtime the exporter's gRPC channel
/// is to use. An exporter that cannot be built is an error (a malformed endpoint).
pub fn init(options: Options) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_new(&options.filter).map_err(|e| e.to_string())?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(options.targets);
    let logs = match options.format {
        LogFormat::Json => logs.json().boxed(),
        LogFormat::Text => logs.with_ansi(ansi).boxed(),
    }
    .with_filter(filter);
    let provider = if export_requested() {
        Some(provider(options.service)?)
    } else {
        None
    };
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(options.service))
            .with_filter(EnvFilter::new(TRACED))
    });
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
    }
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still queued (within a few seconds) and stops the exporter.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The batch processor's thread hands exports to this runtime: block elsewhere.
        let ended = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = ended {
            eprintln!("exporting the last spans: {e}");
        }
    }
}

fn provider(service: &'static str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| {
            let endpoint = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT"))
                .unwrap_or_default();
            format!("cannot export spans to {endpoint:?} (OTEL_EXPORTER_OTLP_*): {e}")
        })?;
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let resource = if named {
        Resource::builder().build()
    } else {
        Resource::builder().with_service_name(service).build()
    };
    let exporter = OnRuntime {
        inner: Arc::new(exporter),
        runtime: tokio::runtime::Handle::try_current()
            .map_err(|_| "tracing must start inside the Tokio runtime".to_owned())?,
    };
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build())
}

/// A span exporter whose exports run on the process's Tokio runtime: the SDK's batch
/// processor calls it from a thread of its own, where the gRPC channel (hyper, Tokio
/// timers) cannot run.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: Arc<E>,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let task = self.runtime.spawn(async move { inner.export(batch).await });
        async move {
            task.await
                .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string())))
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called once, before the first export, while this is the only reference.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}
