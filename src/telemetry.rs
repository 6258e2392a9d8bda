//! Logs and traces. One `tracing` subscriber writes log lines (text, or JSON objects that carry
//! `trace_id` and `span_id`) and turns spans into OpenTelemetry spans. When
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans are batched and exported by OTLP (gRPC or
//! HTTP/protobuf); when it is not, spans still get W3C trace ids (so responses and logs can be
//! correlated) but nothing is recorded or exported.
//!
//! W3C trace context crosses every boundary through this module: [`extract`] reads it from HTTP
//! or NATS headers, [`inject`] writes it into the NATS headers of every message we publish.
//!
//! Secrets never reach a log line: the shared secret and NATS password are wrapped types that
//! print `***`, and no code logs a token.
//!
//! [`LogFormat`] is the one log setting this module owns; the filter is `EnvFilter` syntax.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, IsTerminal as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde_json::{Map, Value};
use tracing::Level;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with `trace_id` and `span_id`.
    Json,
}

/// Where and how spans are exported, from the standard OpenTelemetry variables.
#[derive(Debug, Clone, PartialEq)]
pub struct OtelConfig {
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`; `None`: no export.
    pub endpoint: Option<Endpoint>,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`: `grpc` or `http/protobuf` (the default, as the spec says).
    pub protocol: ExportProtocol,
    /// `OTEL_SERVICE_NAME` (default `auto-com-center`).
    pub service_name: String,
    /// `OTEL_RESOURCE_ATTRIBUTES`: `key=value,key=value`.
    pub resource_attributes: Vec<(String, String)>,
    /// `OTEL_TRACES_SAMPLER` with `OTEL_TRACES_SAMPLER_ARG`.
    pub sampler: SamplerConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: HTTP export appends `/v1/traces`.
    Base(String),
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: used as given.
    Traces(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportProtocol {
    Grpc,
    HttpProtobuf,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerConfig {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio(f64),
}

impl SamplerConfig {
    fn build(self) -> Sampler {
        match self {
            Self::AlwaysOn => Sampler::AlwaysOn,
            Self::AlwaysOff => Sampler::AlwaysOff,
            Self::TraceIdRatio(r) => Sampler::TraceIdRatioBased(r),
            Self::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            Self::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            Self::ParentBasedTraceIdRatio(r) => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(r)))
            }
        }
    }
}

/// An `OTEL_*` variable that could not be used. Start-up refuses rather than guessing.
#[derive(Debug, thiserror::Error)]
#[error("invalid {variable}: {message}")]
pub struct OtelConfigError {
    pub variable: &'static str,
    pub message: String,
}

impl OtelConfig {
    /// No export at all: the default when no endpoint is configured.
    pub fn disabled() -> Self {
        Self {
            endpoint: None,
            protocol: ExportProtocol::HttpProtobuf,
            service_name: "auto-com-center".into(),
            resource_attributes: Vec::new(),
            sampler: SamplerConfig::ParentBasedAlwaysOn,
        }
    }

    /// Reads the standard variables through `lookup` (`std::env::var` in production).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, OtelConfigError> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut config = Self::disabled();
        config.endpoint = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .map(Endpoint::Traces)
            .or_else(|| get("OTEL_EXPORTER_OTLP_ENDPOINT").map(Endpoint::Base));
        config.protocol = match get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| get("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
        {
            None | Some("http/protobuf") => ExportProtocol::HttpProtobuf,
            Some("grpc") => ExportProtocol::Grpc,
            Some(other) => {
                return Err(OtelConfigError {
                    variable: "OTEL_EXPORTER_OTLP_PROTOCOL",
                    message: format!("{other:?}: use grpc or http/protobuf"),
                });
            }
        };
        if let Some(name) = get("OTEL_SERVICE_NAME") {
            config.service_name = name;
        }
        if let Some(attributes) = get("OTEL_RESOURCE_ATTRIBUTES") {
            for pair in attributes.split(',').filter(|p| !p.trim().is_empty()) {
                let (key, value) = pair.split_once('=').ok_or_else(|| OtelConfigError {
                    variable: "OTEL_RESOURCE_ATTRIBUTES",
                    message: format!("{pair:?} is not key=value"),
                })?;
                config
                    .resource_attributes
                    .push((key.trim().to_owned(), value.trim().to_owned()));
            }
        }
        let ratio = || -> Result<f64, OtelConfigError> {
            match get("OTEL_TRACES_SAMPLER_ARG") {
                None => Ok(1.0),
                Some(arg) => arg
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| OtelConfigError {
                        variable: "OTEL_TRACES_SAMPLER_ARG",
                        message: format!("{arg:?} is not a ratio between 0 and 1"),
                    }),
            }
        };
        if let Some(sampler) = get("OTEL_TRACES_SAMPLER") {
            config.sampler = match sampler.as_str() {
                "always_on" => SamplerConfig::AlwaysOn,
                "always_off" => SamplerConfig::AlwaysOff,
                "traceidratio" => SamplerConfig::TraceIdRatio(ratio()?),
                "parentbased_always_on" => SamplerConfig::ParentBasedAlwaysOn,
                "parentbased_always_off" => SamplerConfig::ParentBasedAlwaysOff,
                "parentbased_traceidratio" => SamplerConfig::ParentBasedTraceIdRatio(ratio()?),
                other => {
                    return Err(OtelConfigError {
                        variable: "OTEL_TRACES_SAMPLER",
                        message: format!(
                            "{other:?}: use always_on, always_off, traceidratio, \
                             parentbased_always_on, parentbased_always_off or \
                             parentbased_traceidratio"
                        ),
                    });
                }
            };
        }
        Ok(config)
    }

    pub fn from_env() -> Result<Self, OtelConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The URL to hand the exporter: a signal-specific endpoint verbatim; for HTTP, the general
    /// endpoint plus `/v1/traces`, as the OTLP specification says.
    fn export_url(&self) -> Option<String> {
        Some(match (self.endpoint.as_ref()?, self.protocol) {
            (Endpoint::Traces(url), _) | (Endpoint::Base(url), ExportProtocol::Grpc) => url.clone(),
            (Endpoint::Base(url), ExportProtocol::HttpProtobuf) => {
                format!("{}/v1/traces", url.trim_end_matches('/'))
            }
        })
    }
}

/// The installed telemetry. Keep it alive; [`Telemetry::shutdown`] flushes pending spans.
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Telemetry {
    /// Exports every finished span now (tests and shutdown).
    pub fn flush(&self) {
        if self.exporting {
            let _ = self.provider.force_flush();
        }
    }

    /// Flushes and stops the exporter. Bounded: an unreachable collector cannot hold up exit.
    pub fn shutdown(self) {
        if self.exporting {
            let provider = self.provider;
            let done = std::thread::spawn(move || {
                let _ = provider.shutdown_with_timeout(Duration::from_secs(5));
            });
            let _ = done.join();
        }
    }
}

/// Installs the global subscriber writing to stderr. Returns `None` if one was already installed.
/// Text lines are coloured only when stderr is a terminal and `NO_COLOR` is not set.
pub fn init(
    format: LogFormat,
    filter: &str,
    otel: &OtelConfig,
) -> Result<Option<Telemetry>, anyhow::Error> {
    let ansi = colour_logs(io::stderr().is_terminal(), std::env::var_os("NO_COLOR"));
    install(format, filter, otel, io::stderr, ansi)
}

/// [`init`] with another destination for log lines (tests capture them), never coloured.
pub fn init_with_writer<W>(
    format: LogFormat,
    filter: &str,
    otel: &OtelConfig,
    writer: W,
) -> Result<Option<Telemetry>, anyhow::Error>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    install(format, filter, otel, writer, false)
}

/// Whether log lines get ANSI colours: only on a terminal, and never when `NO_COLOR` is set to
/// anything but the empty string (<https://no-color.org>).
fn colour_logs(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

fn install<W>(
    format: LogFormat,
    filter: &str,
    otel: &OtelConfig,
    writer: W,
    ansi: bool,
) -> Result<Option<Telemetry>, anyhow::Error>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let mut resource = Resource::builder_empty().with_service_name(otel.service_name.clone());
    for (key, value) in &otel.resource_attributes {
        resource = resource.with_attribute(KeyValue::new(key.clone(), value.clone()));
    }
    let mut builder = SdkTracerProvider::builder().with_resource(resource.build());
    let exporting = match otel.export_url() {
        Some(url) => {
            let exporter = match otel.protocol {
                ExportProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(url)
                    .with_timeout(Duration::from_secs(5))
                    .build()?,
                ExportProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary)
                    .with_endpoint(url)
                    .with_timeout(Duration::from_secs(5))
                    .build()?,
            };
            builder = builder
                .with_batch_exporter(exporter)
                .with_sampler(otel.sampler.build());
            true
        }
        // Nothing leaves the process, so nothing is recorded; ids are still assigned.
        None => {
            builder = builder.with_sampler(Sampler::AlwaysOff);
            false
        }
    };
    let provider = builder.build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let tracer = provider.tracer("auto-com-center");

    let filter = without_payloads(
        EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info")),
        filter,
    );
    // Only our own spans become OpenTelemetry spans, whatever LOG_LEVEL says: the HTTP, gRPC
    // and NATS libraries' internals (including the exporter's own requests) stay out of traces.
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        // Busy/idle time costs two clock reads per enter and exit of every span; not needed.
        .with_tracked_inactivity(false)
        // Nothing here reads OpenTelemetry's own current context (`Context::current`): trace
        // context is taken from the tracing span (`span.context()`), and a span's parent is the
        // current tracing span. Attaching the context on every enter and detaching it on every
        // exit (several times per request, once per poll) bought nothing.
        .with_context_activation(false)
        .with_target(false)
        .with_filter(Targets::new().with_target("auto_com_center", Level::INFO));
    let fmt_layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .event_format(JsonLines)
            .boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(otel_layer)
        .with(fmt_layer.with_filter(filter))
        .try_init()
        .is_ok();
    if installed {
        EXPORTING.store(exporting, Ordering::Relaxed);
    }
    Ok(installed.then_some(Telemetry {
        provider,
        exporting,
    }))
}

/// Whether the installed subscriber exports spans (an OTLP endpoint is configured).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans leave this process. When they do not, a span is there only for its trace id
/// (answers, `traceparent` headers, NATS headers, log lines), and the hot path's spans leave
/// out their OpenTelemetry attributes and names: each would be built (an allocation or two)
/// and dropped unread, on every request. JSON log lines carry a span's name and ids only, so
/// they read the same either way; text log lines show fewer span fields.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Log lines as JSON objects: time, level, target, the event's fields, the current span's name,
/// and `trace_id`/`span_id` whenever the line is written inside a span.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("target".into(), event.metadata().target().into());
        event.record(&mut JsonFields(&mut line));
        if let Some(span) = ctx.lookup_current() {
            line.insert("span".into(), span.name().into());
            let context = tracing::Span::current().context();
            let span_context = context.span().span_context().clone();
            if span_context.is_valid() {
                line.insert(
                    "trace_id".into(),
                    span_context.trace_id().to_string().into(),
                );
                line.insert("span_id".into(), span_context.span_id().to_string().into());
            }
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

struct JsonFields<'a>(&'a mut Map<String, Value>);

impl Visit for JsonFields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
}

/// Reads W3C trace context from any header-like map.
pub fn extract(headers: &impl HeaderSource) -> Context {
    TraceContextPropagator::new().extract(&ExtractFrom(headers))
}

/// Writes `span`'s W3C trace context into NATS headers: `traceparent`, and `tracestate` when
/// the trace carries vendor state (an empty one is left out, as W3C Trace Context allows).
///
/// Written here rather than by [`TraceContextPropagator`], which formats through `format!` and
/// sets an empty `tracestate` on every message; the `traceparent` is the same.
pub fn inject(span: &tracing::Span, headers: &mut async_nats::HeaderMap) {
    let context = span.context();
    let span_ref = context.span();
    write_trace_context(span_ref.span_context(), headers);
}

/// [`inject`] for a child of `parent` that is not made as a span: its trace id, flags and
/// state, under a fresh span id. For a message published while nothing is exported (see
/// [`exporting`]): a producer span would be built only for these headers, and a consumer
/// continues the same trace from either.
pub fn inject_child(parent: &tracing::Span, headers: &mut async_nats::HeaderMap) {
    let context = parent.context();
    let span_ref = context.span();
    let parent = span_ref.span_context();
    if !parent.is_valid() {
        return;
    }
    let child = SpanContext::new(
        parent.trace_id(),
        SpanId::from(rand::random::<u64>().max(1)),
        parent.trace_flags(),
        false,
        parent.trace_state().clone(),
    );
    write_trace_context(&child, headers);
}

fn write_trace_context(span_context: &SpanContext, headers: &mut async_nats::HeaderMap) {
    if !span_context.is_valid() {
        return;
    }
    let flags = (span_context.trace_flags() & TraceFlags::SAMPLED).to_u8();
    headers.insert("traceparent", w3c_traceparent(span_context, flags).as_str());
    let state = span_context.trace_state().header();
    if !state.is_empty() {
        headers.insert("tracestate", state.as_str());
    }
}

/// `00-<trace id>-<span id>-<flags>` in lowercase hex, the W3C `traceparent` of `span_context`.
fn w3c_traceparent(span_context: &SpanContext, flags: u8) -> String {
    let mut traceparent = String::with_capacity(55);
    traceparent.push_str("00-");
    push_hex(&mut traceparent, &span_context.trace_id().to_bytes());
    traceparent.push('-');
    push_hex(&mut traceparent, &span_context.span_id().to_bytes());
    traceparent.push('-');
    push_hex(&mut traceparent, &[flags]);
    traceparent
}

/// Appends `bytes` as lowercase hex, two digits each: what `{:032x}` writes for a trace id,
/// without the formatting machinery, on every request.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
}

/// True when `context` carries a valid remote parent (a `traceparent` was sent).
pub fn has_remote_parent(context: &Context) -> bool {
    context.span().span_context().is_valid()
}

/// A parent context whose trace id is `trace_id` (32 lowercase hex, not all zero), for a caller
/// that names its trace in the body instead of sending `traceparent`.
pub fn parent_from_trace_id(trace_id: &str) -> Option<Context> {
    if trace_id.len() != 32
        || !trace_id
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    if trace_id == TraceId::INVALID {
        return None;
    }
    let span_id = SpanId::from(rand::random::<u64>().max(1));
    let parent = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    Some(Context::new().with_remote_span_context(parent))
}

/// A parent context for routine work nobody asked to trace (a `/metrics` scrape, a periodic
/// metrics snapshot): a fresh trace marked not sampled, so the parent-based samplers (the
/// default) record none of it, nor anything under it on the bus. `always_on` still records it.
pub fn routine_parent() -> Context {
    let trace_id = TraceId::from(rand::random::<u128>().max(1));
    let span_id = SpanId::from(rand::random::<u64>().max(1));
    let parent = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::default(),
        true,
        TraceState::default(),
    );
    Context::new().with_remote_span_context(parent)
}

/// A span for routine periodic work, under a [`routine_parent`].
pub fn routine_span(name: &'static str) -> tracing::Span {
    let span = tracing::info_span!("routine", otel.name = name);
    let _ = span.set_parent(routine_parent());
    span
}

/// The W3C `traceparent` of `span`, when it has a valid context.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_ref = context.span();
    let span_context = span_ref.span_context();
    span_context
        .is_valid()
        .then(|| w3c_traceparent(span_context, span_context.trace_flags().to_u8()))
}

/// The trace id of the current span, for response bodies. Only the trace id is formatted:
/// every answer asks for it, and the `traceparent` is made once, by the HTTP door.
pub fn current_trace_id() -> Option<String> {
    let context = tracing::Span::current().context();
    let span_ref = context.span();
    let span_context = span_ref.span_context();
    span_context.is_valid().then(|| {
        let mut trace_id = String::with_capacity(32);
        push_hex(&mut trace_id, &span_context.trace_id().to_bytes());
        trace_id
    })
}

/// An internal cause kept for the log. Shared, so that one failure (a refused batch, say) can be
/// the cause of many refusals.
pub type Cause = std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>;

/// async-nats logs every JetStream API request and response at `debug`, and those carry
/// agents' message payloads (base64 in stored-message reads). Our own logs give sizes and ids,
/// never bodies; so when `raw` turns on `debug` or `trace` without naming `async_nats` itself,
/// that crate logs at `info` at most.
fn without_payloads(filter: EnvFilter, raw: &str) -> EnvFilter {
    let verbose = filter
        .max_level_hint()
        .is_some_and(|level| level > tracing::level_filters::LevelFilter::INFO);
    if verbose && !raw.contains("async_nats") {
        filter.add_directive("async_nats=info".parse().expect("a valid directive"))
    } else {
        filter
    }
}

/// An error and every cause under it on one line (`a: b: c`), for logs: causes are kept as
/// sources, not flattened into strings, and printed here.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// Adds the trace id of the current span to a JSON answer, so a caller can find its request.
pub fn with_trace_id(mut answer: Value) -> Value {
    if let Some(trace_id) = current_trace_id() {
        answer["trace_id"] = trace_id.into();
    }
    answer
}

/// Anything headers can be read from: HTTP headers and NATS headers.
pub trait HeaderSource {
    fn header(&self, name: &str) -> Option<&str>;
    fn header_names(&self) -> Vec<&str>;
}

impl HeaderSource for axum::http::HeaderMap {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }
    fn header_names(&self) -> Vec<&str> {
        self.keys().map(|k| k.as_str()).collect()
    }
}

impl HeaderSource for async_nats::HeaderMap {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).map(|v| v.as_str())
    }
    fn header_names(&self) -> Vec<&str> {
        self.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

impl HeaderSource for BTreeMap<String, String> {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
    fn header_names(&self) -> Vec<&str> {
        self.keys().map(String::as_str).collect()
    }
}

struct ExtractFrom<'a, H: HeaderSource>(&'a H);

impl<H: HeaderSource> Extractor for ExtractFrom<'_, H> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header(key)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.header_names()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<OtelConfig, OtelConfigError> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        OtelConfig::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn no_endpoint_means_no_export() {
        let c = config(&[]).unwrap();
        assert_eq!(c.endpoint, None);
        assert_eq!(c.export_url(), None);
    }

    #[test]
    fn the_standard_variables_are_read() {
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            ("OTEL_SERVICE_NAME", "bridge-a"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=test, team=ops",
            ),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ])
        .unwrap();
        assert_eq!(c.export_url().unwrap(), "http://collector:4318/v1/traces");
        assert_eq!(c.service_name, "bridge-a");
        assert_eq!(c.resource_attributes.len(), 2);
        assert_eq!(c.sampler, SamplerConfig::ParentBasedTraceIdRatio(0.25));
        let grpc = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://jaeger:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap();
        assert_eq!(grpc.export_url().unwrap(), "http://jaeger:4317");
        let signal =
            config(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4318/custom")]).unwrap();
        assert_eq!(signal.export_url().unwrap(), "http://c:4318/custom");
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let err = config(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "smoke-signals")]).unwrap_err();
        assert_eq!(err.variable, "OTEL_EXPORTER_OTLP_PROTOCOL");
        let err = config(&[("OTEL_TRACES_SAMPLER", "sometimes")]).unwrap_err();
        assert_eq!(err.variable, "OTEL_TRACES_SAMPLER");
        let err = config(&[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ])
        .unwrap_err();
        assert_eq!(err.variable, "OTEL_TRACES_SAMPLER_ARG");
    }

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(colour_logs(true, None));
        assert!(
            colour_logs(true, Some("".into())),
            "an empty NO_COLOR is unset"
        );
        assert!(!colour_logs(true, Some("1".into())));
        assert!(!colour_logs(false, None));
    }

    /// What the OpenTelemetry propagator writes for `span_context`, header by header.
    fn propagated(span_context: SpanContext) -> BTreeMap<String, String> {
        struct Into<'a>(&'a mut BTreeMap<String, String>);
        impl opentelemetry::propagation::Injector for Into<'_> {
            fn set(&mut self, key: &str, value: String) {
                self.0.insert(key.to_owned(), value);
            }
        }
        let mut headers = BTreeMap::new();
        let context = Context::new().with_remote_span_context(span_context);
        TraceContextPropagator::new().inject_context(&context, &mut Into(&mut headers));
        headers
    }

    #[test]
    fn the_traceparent_is_written_as_the_propagator_writes_it() {
        for (trace_id, span_id, flags) in [
            (1u128, 1u64, TraceFlags::SAMPLED),
            (
                0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
                0x00f0_67aa_0ba9_02b7,
                TraceFlags::default(),
            ),
            (u128::MAX, u64::MAX, TraceFlags::new(0xff)),
        ] {
            let span_context = SpanContext::new(
                TraceId::from(trace_id),
                SpanId::from(span_id),
                flags,
                true,
                TraceState::default(),
            );
            let sampled = (flags & TraceFlags::SAMPLED).to_u8();
            assert_eq!(
                Some(&w3c_traceparent(&span_context, sampled)),
                propagated(span_context.clone()).get("traceparent")
            );
            let mut trace_hex = String::new();
            push_hex(&mut trace_hex, &TraceId::from(trace_id).to_bytes());
            assert_eq!(trace_hex, TraceId::from(trace_id).to_string());
        }
    }

    #[test]
    fn a_child_written_without_a_span_carries_what_a_producer_span_would() {
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::AlwaysOff)
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("test"))
            .with_context_activation(false);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let server = tracing::info_span!("server");
            let _ = server
                .set_parent(parent_from_trace_id("4bf92f3577b34da6a3ce929d0e0e4736").unwrap());
            let _entered = server.enter();
            let (mut made, mut written) =
                (async_nats::HeaderMap::new(), async_nats::HeaderMap::new());
            inject(&tracing::info_span!("producer"), &mut made);
            inject_child(&tracing::Span::current(), &mut written);
            let made = made.get("traceparent").unwrap().as_str().to_owned();
            let written = written.get("traceparent").unwrap().as_str().to_owned();
            let server_id = traceparent(&server).unwrap()[36..52].to_owned();
            // `00-<trace id>-` and `-<flags>` as the producer span's; a span id of its own.
            assert_eq!(written[..36], made[..36]);
            assert!(written.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
            assert_eq!(written[52..], made[52..]);
            assert_ne!(written[36..52], server_id);
        });
        let mut outside = async_nats::HeaderMap::new();
        inject_child(&tracing::Span::none(), &mut outside);
        assert!(outside.get("traceparent").is_none());
    }

    #[test]
    fn only_w3c_trace_ids_become_parents() {
        assert!(parent_from_trace_id("4bf92f3577b34da6a3ce929d0e0e4736").is_some());
        for bad in [
            "trace-7",
            "4BF92F3577B34DA6A3CE929D0E0E4736",
            "00000000000000000000000000000000",
            "4bf92f3577b34da6a3ce929d0e0e473",
        ] {
            assert!(parent_from_trace_id(bad).is_none(), "{bad}");
        }
    }
}
