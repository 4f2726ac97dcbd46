//! Logs and traces. Logs always go to stderr (text or JSON). Traces go to an OpenTelemetry
//! collector over OTLP/gRPC only when the standard `OTEL_*` environment says where
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), unless
//! `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. The SDK itself reads the rest:
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_BSP_*`,
//! `OTEL_EXPORTER_OTLP_(TRACES_)HEADERS` and `_TIMEOUT`.
//!
//! Spans (names are fixed; chat and message ids are attributes, never part of a name):
//! `Reply` / `SubmitReply` (the call, continuing the caller's W3C `traceparent`), `queue_wait`
//! (accepted or re-queued until sent), `feishu.reply` (one per attempt: attempt number, HTTP
//! status, Feishu code, log id, outcome), `feishu.token` (a token fetch), `redis.decide` (a
//! cluster quota decision), `reply_job` (an async job run by a replica that did not take its
//! submit: after a restart or a takeover).

mod fields;

pub use fields::EscapedFields;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The service name when `OTEL_SERVICE_NAME` (or `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES`) does not give one.
pub const DEFAULT_SERVICE_NAME: &str = "feishu-reply-gateway";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Whether spans are exported (set once, by [`Telemetry::init`]): skips trace lookups when not.
static TRACES_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The trace id of `span` when traces are exported and it is sampled (a metric exemplar).
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    if !TRACES_ON.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| sc.trace_id().to_string())
}

/// The installed logging and tracing; [`Telemetry::shutdown`] sends the spans still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Whether this environment asks for traces (see the module doc).
pub fn traces_configured(env: impl Fn(&str) -> Option<String>) -> bool {
    let set = |k: &str| env(k).is_some_and(|v| !v.trim().is_empty());
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let no_exporter =
        env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    !disabled
        && !no_exporter
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

impl Telemetry {
    /// Installs the global subscriber: logs (filtered by `RUST_LOG`, default `info`) and, when
    /// `traces` and the environment asks for them, the OTLP exporter. Must run inside the tokio
    /// runtime (the exporter's gRPC channel lives there). A collector that cannot be set up
    /// is logged and the gateway runs without traces.
    pub fn init(format: LogFormat, traces: bool) -> Self {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let fmt = match format {
            // Values a caller chose are escaped (`fields`): no forged lines or escapes.
            LogFormat::Text => fmt.fmt_fields(EscapedFields).boxed(),
            LogFormat::Json => fmt.json().boxed(),
        };
        let (provider, error) = if traces && traces_configured(|k| std::env::var(k).ok()) {
            match build_provider() {
                Ok(p) => (Some(p), None),
                Err(e) => (None, Some(e)),
            }
        } else {
            (None, None)
        };
        // Our own spans only: the HTTP/2, gRPC and Redis crates' spans would bury them.
        let otel = provider.as_ref().map(|p| {
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer(DEFAULT_SERVICE_NAME))
                .with_filter(
                    tracing_subscriber::filter::Targets::new()
                        .with_target(env!("CARGO_CRATE_NAME"), tracing::Level::INFO),
                )
        });
        tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .with(otel)
            .init();
        if provider.is_some() {
            TRACES_ON.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!("OpenTelemetry traces on (OTLP/gRPC, from the OTEL_* environment)");
        }
        if let Some(e) = error {
            tracing::error!(error = %e, "cannot set up the OTLP trace exporter; running without traces");
        }
        Telemetry { provider }
    }

    /// Whether spans are exported.
    pub fn traces_on(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is buffered and stops the exporter (at exit).
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "flushing traces at exit failed");
        }
    }
}

fn build_provider() -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| e.to_string())?;
    let named = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let mut resource = opentelemetry_sdk::Resource::builder();
    let attrs_name = std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
        v.split(',')
            .any(|kv| kv.trim().starts_with("service.name="))
    });
    if !named("OTEL_SERVICE_NAME") && !attrs_name {
        resource = resource.with_service_name(DEFAULT_SERVICE_NAME);
    }
    // The sampler comes from OTEL_TRACES_SAMPLER (default: parent-based, always on).
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Makes `span` continue the trace of the W3C `traceparent` (and `tracestate`) in a call's
/// gRPC metadata. Without one, or with traces off, `span` starts its own trace.
pub fn continue_trace(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    if metadata.get("traceparent").is_some() {
        set_parent(span, &Metadata(metadata));
    }
}

/// The W3C `traceparent` of `span` when it is being traced (stored with an async job, so the
/// replica that runs it continues the caller's trace); `None` with traces off.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut headers = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut headers);
    headers.remove("traceparent")
}

/// Makes `span` a child of the span `traceparent` names (see [`traceparent`]).
pub fn continue_from(span: &tracing::Span, traceparent: &str) {
    let headers =
        std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    set_parent(span, &headers);
}

fn set_parent(span: &tracing::Span, carrier: &dyn Extractor) {
    let cx = TraceContextPropagator::new().extract(carrier);
    // Fails only when no OpenTelemetry layer is installed: nothing to continue then.
    let _ = span.set_parent(cx);
}

struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn traces_are_off_unless_an_endpoint_is_given_and_not_disabled() {
        assert!(!traces_configured(env(&[])));
        assert!(!traces_configured(env(&[("OTEL_SERVICE_NAME", "x")])));
        assert!(!traces_configured(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            " "
        )])));
        assert!(traces_configured(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://c:4317"
        )])));
        assert!(traces_configured(env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4317"
        )])));
        assert!(!traces_configured(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ])));
        assert!(!traces_configured(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ])));
    }

    #[test]
    fn the_traceparent_is_read_from_grpc_metadata() {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let cx = TraceContextPropagator::new().extract(&Metadata(&md));
        use opentelemetry::trace::TraceContextExt;
        let sc = cx.span().span_context().clone();
        assert!(sc.is_remote());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
    }
}
