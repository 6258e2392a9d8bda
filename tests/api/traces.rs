//! One trace per message: a real OTLP/gRPC receiver in the test collects what the bridge exports,
//! and the tests check parent links from the client's span through the HTTP handler, the
//! JetStream publish and the registry worker, plus sampling, an unreachable collector, and JSON
//! logs carrying the same ids.
//!
//! Each test installs the process-wide subscriber, so these tests rely on nextest's one process
//! per test (scripts/test runs nextest).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use auto_com_center::telemetry::LogFormat;
use auto_com_center::telemetry::{
    self, Endpoint, ExportProtocol, OtelConfig, SamplerConfig, Telemetry,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

/// An OTLP trace collector: every exported span, as received.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    async fn start() -> (Self, SocketAddr) {
        let collector = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (collector, addr)
    }

    fn spans_of(&self, trace_id: &str) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| hex(&s.trace_id) == trace_id)
            .cloned()
            .collect()
    }

    fn count(&self) -> usize {
        self.spans.lock().unwrap().len()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.as_ref())
        .map(|v| match v {
            AnyValue::StringValue(s) => s.clone(),
            AnyValue::IntValue(i) => i.to_string(),
            AnyValue::BoolValue(b) => b.to_string(),
            AnyValue::DoubleValue(d) => d.to_string(),
            other => format!("{other:?}"),
        })
}

/// An attribute's value when it was exported as an int (and `None` for any other type).
fn int_attribute(span: &Span, key: &str) -> Option<i64> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| match v.value {
            Some(AnyValue::IntValue(i)) => Some(i),
            _ => None,
        })
}

/// Log lines written by the subscriber, kept for inspection.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    fn lines(&self) -> Vec<Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }
}

fn otel(addr: SocketAddr, sampler: SamplerConfig) -> OtelConfig {
    OtelConfig {
        endpoint: Some(Endpoint::Base(format!("http://{addr}"))),
        protocol: ExportProtocol::Grpc,
        service_name: "auto-com-center-test".into(),
        resource_attributes: vec![],
        sampler,
    }
}

fn install(config: &OtelConfig, logs: &Captured) -> Telemetry {
    telemetry::init_with_writer(LogFormat::Json, "info", config, logs.clone())
        .unwrap()
        .expect("the first subscriber of this test process")
}

/// Flushes and waits until `done` holds for the collected spans.
async fn collected<T>(telemetry: &Telemetry, what: &str, mut done: impl FnMut() -> Option<T>) -> T {
    eventually(Duration::from_secs(10), what, || {
        telemetry.flush();
        let found = done();
        async move { found }
    })
    .await
}

const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_registration_from_http_through_nats_to_the_registry() {
    let (collector, addr) = Collector::start().await;
    let logs = Captured::default();
    let telemetry = install(&otel(addr, SamplerConfig::ParentBasedAlwaysOn), &logs);
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;

    let response = app
        .http
        .post(app.url("/orchestrator/register"))
        .bearer_auth(token("agent-1"))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .json(&registration("agent-1"))
        .send()
        .await
        .unwrap();
    let traceparent = response.headers()["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        traceparent.starts_with(&format!("00-{CLIENT_TRACE}-")),
        "{traceparent}"
    );
    let (status, body) = read(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["trace_id"], CLIENT_TRACE);

    // The registry applies it and announces the transition, all in the same trace.
    let spans = collected(
        &telemetry,
        "server, publish, process and status spans",
        || {
            let spans = collector.spans_of(CLIENT_TRACE);
            let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
            [
                "POST /orchestrator/register",
                "send acc.agents.registered",
                "process acc.agents.registered",
                "send acc.agents.status",
            ]
            .iter()
            .all(|n| names.contains(n))
            .then_some(spans)
        },
    )
    .await;
    let by_name: HashMap<&str, &Span> = spans.iter().map(|s| (s.name.as_str(), s)).collect();
    let server = by_name["POST /orchestrator/register"];
    let publish = by_name["send acc.agents.registered"];
    let process = by_name["process acc.agents.registered"];
    let status = by_name["send acc.agents.status"];
    assert_eq!(
        hex(&server.parent_span_id),
        CLIENT_SPAN,
        "the handler continues the client's span"
    );
    assert_eq!(server.parent_span_id.len(), 8);
    assert_eq!(
        publish.parent_span_id, server.span_id,
        "publish is a child of the handler"
    );
    assert_eq!(
        process.parent_span_id, publish.span_id,
        "the worker continues the publish"
    );
    assert_eq!(
        status.parent_span_id, process.span_id,
        "the transition carries the context on"
    );
    assert_eq!(
        traceparent,
        format!("00-{CLIENT_TRACE}-{}-01", hex(&server.span_id))
    );

    // Semantic conventions: the status code is an int; the server span has the URL's parts.
    assert_eq!(
        int_attribute(server, "http.response.status_code"),
        Some(200)
    );
    assert_eq!(
        attribute(server, "url.path").as_deref(),
        Some("/orchestrator/register")
    );
    assert_eq!(attribute(server, "url.scheme").as_deref(), Some("http"));
    assert_eq!(
        attribute(publish, "messaging.system").as_deref(),
        Some("nats")
    );
    assert_eq!(
        attribute(publish, "messaging.destination.name").as_deref(),
        Some("acc.agents.registered.agent-1")
    );
    assert_eq!(
        attribute(publish, "messaging.nats.stream_sequence").as_deref(),
        Some("1")
    );
    assert_eq!(
        attribute(process, "messaging.system").as_deref(),
        Some("nats")
    );
    assert_eq!(
        attribute(process, "messaging.consumer.group.name").as_deref(),
        Some("registry")
    );
    assert_eq!(
        attribute(process, "messaging.nats.stream_sequence").as_deref(),
        Some("1")
    );
    assert_eq!(
        attribute(process, "messaging.nats.redelivery_count").as_deref(),
        Some("0")
    );
    assert!(
        attribute(process, "messaging.message.id").is_some_and(|id| id.starts_with("reg:agent-1:"))
    );

    // The stored message carries the context in its NATS headers.
    let stream = app.js.get_stream("ACC_AGENTS").await.unwrap();
    let stored = stream.get_raw_message(1).await.unwrap();
    let header = stored.headers.get("traceparent").unwrap().as_str();
    assert_eq!(
        header,
        format!("00-{CLIENT_TRACE}-{}-01", hex(&publish.span_id))
    );

    // JSON logs written inside those spans carry the same ids.
    let lines = logs.lines();
    let registered = lines
        .iter()
        .find(|l| l["message"] == "agent registered")
        .expect("the registration was logged");
    assert_eq!(registered["trace_id"], CLIENT_TRACE);
    assert_eq!(registered["span_id"], hex(&server.span_id));
    let changed = lines
        .iter()
        .find(|l| l["message"] == "agent status changed")
        .expect("the transition was logged");
    assert_eq!(changed["trace_id"], CLIENT_TRACE);
    for line in &lines {
        let text = line.to_string();
        assert!(
            !text.contains(SECRET),
            "a log line carries the secret: {text}"
        );
        assert!(
            !text.contains(&token("agent-1")[..40]),
            "a log line carries a token: {text}"
        );
    }
    app.stop().await;
    telemetry.shutdown();
}

/// The default: no OTLP endpoint, so nothing is exported and the hot path skips the spans'
/// OpenTelemetry work. The client's trace must still be continued everywhere it is visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_exporter_the_clients_trace_still_reaches_the_answer_the_nats_headers_and_the_logs()
{
    let logs = Captured::default();
    let telemetry = install(&OtelConfig::disabled(), &logs);
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;

    let response = app
        .http
        .post(app.url("/orchestrator/register"))
        .bearer_auth(token("agent-1"))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .json(&registration("agent-1"))
        .send()
        .await
        .unwrap();
    let answered = response.headers()["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    let (status, body) = read(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["trace_id"], CLIENT_TRACE);
    let answered_span = answered
        .strip_prefix(&format!("00-{CLIENT_TRACE}-"))
        .unwrap_or_else(|| panic!("the answer continues the client's trace: {answered}"))
        .to_owned();
    assert_ne!(
        &answered_span[..16],
        CLIENT_SPAN,
        "the handler has a span of its own"
    );

    // The stored message continues the trace with a span id of its own.
    let stream = app.js.get_stream("ACC_AGENTS").await.unwrap();
    let stored = stream.get_raw_message(1).await.unwrap();
    let header = stored
        .headers
        .get("traceparent")
        .expect("the stored message carries a traceparent")
        .as_str()
        .to_owned();
    let parts: Vec<&str> = header.split('-').collect();
    assert_eq!(parts.len(), 4, "{header}");
    assert_eq!((parts[0], parts[1]), ("00", CLIENT_TRACE), "{header}");
    assert_eq!(parts[2].len(), 16, "{header}");
    assert_ne!(parts[2], CLIENT_SPAN, "{header}");
    assert_ne!(parts[2], "0000000000000000", "{header}");

    // The worker's log lines name the same trace, and the handler's name the answered span.
    let lines = eventually(Duration::from_secs(10), "the transition logged", || {
        let lines = logs.lines();
        let found = lines
            .iter()
            .any(|l| l["message"] == "agent status changed")
            .then_some(lines);
        async move { found }
    })
    .await;
    let registered = lines
        .iter()
        .find(|l| l["message"] == "agent registered")
        .expect("the registration was logged");
    assert_eq!(registered["trace_id"], CLIENT_TRACE);
    assert_eq!(registered["span_id"].as_str(), Some(&answered_span[..16]));
    let changed = lines
        .iter()
        .find(|l| l["message"] == "agent status changed")
        .unwrap();
    assert_eq!(changed["trace_id"], CLIENT_TRACE);
    app.stop().await;
    telemetry.shutdown();
}

/// A refused credential is recorded inside the request's span (the HTTP door's front
/// middleware), so its audit record names the trace the client sent and the refusal continued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_credentials_audit_record_names_the_requests_trace() {
    let logs = Captured::default();
    let telemetry = install(&OtelConfig::disabled(), &logs);
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;

    let forged = "eyJhbGciOiJIUzI1NiJ9.eyJhZ2VudF9pZCI6Im1hbGxvcnkifQ.c2VjcmV0LXRva2VuLXZhbHVl";
    let response = app
        .http
        .get(app.url("/orchestrator/agents"))
        .bearer_auth(forged)
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let answered = response.headers()["traceparent"].to_str().unwrap();
    assert!(
        answered.starts_with(&format!("00-{CLIENT_TRACE}-")),
        "{answered}"
    );

    let body = eventually(Duration::from_secs(5), "the credential record", || async {
        let (status, body) = app
            .get("/orchestrator/audit?kind=credential", Some(&admin_token()))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (body["count"] == 1).then_some(body)
    })
    .await;
    let record = &body["records"][0];
    assert_eq!(record["code"], "INVALID_TOKEN", "{record}");
    assert_eq!(record["trace_id"], CLIENT_TRACE, "{record}");
    app.stop().await;
    telemetry.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_continues_the_clients_trace_and_every_answer_names_it() {
    let (collector, addr) = Collector::start().await;
    let telemetry = install(
        &otel(addr, SamplerConfig::ParentBasedAlwaysOn),
        &Captured::default(),
    );
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let response = app
        .http
        .post(app.url("/orchestrator/events"))
        .bearer_auth(token("agent-1"))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .json(&event("agent-1", "evt-traced"))
        .send()
        .await
        .unwrap();
    let (status, body) = read(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["trace_id"], CLIENT_TRACE);
    let spans = collected(&telemetry, "event spans", || {
        let spans = collector.spans_of(CLIENT_TRACE);
        (spans.len() >= 2).then_some(spans)
    })
    .await;
    let server = spans
        .iter()
        .find(|s| s.name == "POST /orchestrator/events")
        .unwrap();
    let publish = spans.iter().find(|s| s.name == "send acc.events").unwrap();
    assert_eq!(hex(&server.parent_span_id), CLIENT_SPAN);
    assert_eq!(publish.parent_span_id, server.span_id);

    // Errors carry the trace id too, in the body and the header.
    let response = app
        .http
        .post(app.url("/orchestrator/events"))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert!(
        response.headers()["traceparent"]
            .to_str()
            .unwrap()
            .contains(CLIENT_TRACE)
    );
    let (status, body) = read(response).await;
    assert_error(status, &body, 401, "MISSING_TOKEN");
    assert_eq!(body["trace_id"], CLIENT_TRACE);
    let (_, body) = app.get("/no/such/route", None).await;
    assert!(
        body["trace_id"].as_str().is_some_and(|t| t.len() == 32),
        "{body}"
    );
    let (_, body) = app.get("/health", None).await;
    assert!(
        body["trace_id"].as_str().is_some_and(|t| t.len() == 32),
        "{body}"
    );
    app.stop().await;
    telemetry.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trace_id_in_w3c_form_becomes_the_trace_id_and_any_other_is_searchable() {
    let (collector, addr) = Collector::start().await;
    let telemetry = install(
        &otel(addr, SamplerConfig::ParentBasedAlwaysOn),
        &Captured::default(),
    );
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let w3c = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut body = event("agent-1", "evt-w3c");
    body["trace_id"] = json!(w3c);
    let (status, answer) = app
        .post("/orchestrator/events", Some(&token("agent-1")), &body)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["trace_id"], w3c);
    collected(&telemetry, "spans in the body's trace", || {
        let spans = collector.spans_of(w3c);
        spans
            .iter()
            .any(|s| s.name == "POST /orchestrator/events")
            .then_some(())
    })
    .await;

    let mut body = event("agent-1", "evt-free");
    body["trace_id"] = json!("order-77");
    let (status, answer) = app
        .post("/orchestrator/events", Some(&token("agent-1")), &body)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let trace_id = answer["trace_id"].as_str().unwrap().to_owned();
    assert_ne!(trace_id, "order-77");
    let server = collected(&telemetry, "the span with acc.trace_id", || {
        collector
            .spans_of(&trace_id)
            .into_iter()
            .find(|s| s.name == "POST /orchestrator/events")
    })
    .await;
    assert_eq!(
        attribute(&server, "acc.trace_id").as_deref(),
        Some("order-77")
    );
    app.stop().await;
    telemetry.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_task_answers_its_own_trace_id_and_the_reported_one_beside_it() {
    let (_collector, addr) = Collector::start().await;
    let telemetry = install(
        &otel(addr, SamplerConfig::ParentBasedAlwaysOn),
        &Captured::default(),
    );
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let (status, answer) = app
        .post(
            "/orchestrator/tasks/task-traced/callback",
            Some(&token("agent-1")),
            &json!({"status": "succeeded", "trace_id": "job-7"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    let response = app
        .http
        .get(app.url("/orchestrator/tasks/task-traced"))
        .bearer_auth(token("agent-1"))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .send()
        .await
        .unwrap();
    let (status, read) = read(response).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["reported_trace_id"], "job-7", "{read}");
    assert_eq!(read["trace_id"], CLIENT_TRACE, "{read}");
    app.stop().await;
    telemetry.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scrapes_are_not_traced_unless_the_scraper_sends_a_trace() {
    let (collector, addr) = Collector::start().await;
    let telemetry = install(
        &otel(addr, SamplerConfig::ParentBasedAlwaysOn),
        &Captured::default(),
    );
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    for _ in 0..3 {
        app.metrics_text().await;
    }
    // A traced request after the scrapes: once its span is in, the scrapes' would be too.
    let (status, _) = app.get("/health", None).await;
    assert_eq!(status, StatusCode::OK);
    collected(&telemetry, "the /health span", || {
        let spans = collector.spans.lock().unwrap();
        spans.iter().any(|s| s.name == "GET /health").then_some(())
    })
    .await;
    let names: Vec<String> = collector
        .spans
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert!(!names.iter().any(|n| n == "GET /metrics"), "{names:?}");

    // A scraper that sends a sampled traceparent gets its trace.
    let response = app
        .http
        .get(app.url("/metrics"))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    collected(&telemetry, "the traced scrape", || {
        collector
            .spans_of(CLIENT_TRACE)
            .iter()
            .any(|s| s.name == "GET /metrics")
            .then_some(())
    })
    .await;
    app.stop().await;
    telemetry.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampling_ratio_of_zero_exports_nothing() {
    let (collector, addr) = Collector::start().await;
    let telemetry = install(
        &otel(addr, SamplerConfig::ParentBasedTraceIdRatio(0.0)),
        &Captured::default(),
    );
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    for i in 0..10 {
        let (status, answer) = app
            .post(
                "/orchestrator/events",
                Some(&token("agent-1")),
                &event("agent-1", &format!("e{i}")),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert!(
            answer["trace_id"].is_string(),
            "ids are assigned even when not sampled"
        );
    }
    app.register("agent-1").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    telemetry.flush();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(collector.count(), 0);
    app.stop().await;
    telemetry.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_never_slows_or_fails_a_request() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let telemetry = install(&otel(closed, SamplerConfig::AlwaysOn), &Captured::default());
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let mut slowest = Duration::ZERO;
    for i in 0..200 {
        let started = Instant::now();
        let (status, answer) = app
            .post(
                "/orchestrator/events",
                Some(&token("agent-1")),
                &event("agent-1", &format!("e{i}")),
            )
            .await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    assert!(
        slowest < Duration::from_millis(250),
        "slowest request took {slowest:?}"
    );
    app.stop().await;
    let started = Instant::now();
    telemetry.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "shutdown took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_in_an_agents_nats_headers_continues_through_the_nats_door() {
    let (collector, addr) = Collector::start().await;
    let telemetry = install(
        &otel(addr, SamplerConfig::ParentBasedAlwaysOn),
        &Captured::default(),
    );
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let agent = NatsAgent::connect(&nats.url(), "agent-1").await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "Authorization",
        format!("Bearer {}", token("agent-1")).as_str(),
    );
    headers.insert(
        "traceparent",
        format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01").as_str(),
    );
    agent
        .send(
            "acc.in.event",
            headers,
            serde_json::to_vec(&event("agent-1", "evt-door")).unwrap(),
        )
        .await;
    let spans = collected(&telemetry, "door spans in the agent's trace", || {
        let spans = collector.spans_of(CLIENT_TRACE);
        let has = |name: &str| spans.iter().any(|s| s.name == name);
        (has("door.intake")
            && has("send acc.inbound.event")
            && has("process acc.in.event")
            && has("send acc.events"))
        .then_some(spans)
    })
    .await;
    let named = |name: &str| spans.iter().find(|s| s.name == name).unwrap();
    let process = named("process acc.in.event");
    let publish = named("send acc.events");
    // The door's intake continues the agent's span, and the door continues from the intake's
    // store into ACC_INBOUND.
    assert_eq!(
        hex(&named("door.intake").parent_span_id),
        CLIENT_SPAN,
        "the intake continues the agent's span"
    );
    assert_eq!(
        process.parent_span_id,
        named("send acc.inbound.event").span_id,
        "the door continues from the intake's store"
    );
    // The verified publish descends from the door's processing span.
    let by_id: HashMap<Vec<u8>, &Span> = spans.iter().map(|s| (s.span_id.clone(), s)).collect();
    let mut ancestor = by_id.get(&publish.parent_span_id).copied();
    while let Some(span) = ancestor {
        if span.span_id == process.span_id {
            break;
        }
        ancestor = by_id.get(&span.parent_span_id).copied();
    }
    assert!(
        ancestor.is_some(),
        "send acc.events is not under process acc.in.event"
    );
    app.stop().await;
    telemetry.shutdown();
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf body.
async fn http_collector() -> (Collector, SocketAddr) {
    use axum::body::Bytes;
    use prost::Message as _;
    let collector = Collector::default();
    let spans = collector.spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let spans = spans.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut spans = spans.lock().unwrap();
                for resource in request.resource_spans {
                    for scope in resource.scope_spans {
                        spans.extend(scope.spans);
                    }
                }
                let answer = ExportTraceServiceResponse {
                    partial_success: None,
                };
                (
                    [("content-type", "application/x-protobuf")],
                    answer.encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (collector, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_http_protobuf_and_flushed_on_shutdown() {
    let (collector, addr) = http_collector().await;
    let config = OtelConfig {
        protocol: ExportProtocol::HttpProtobuf,
        ..otel(addr, SamplerConfig::ParentBasedAlwaysOn)
    };
    let telemetry = install(&config, &Captured::default());
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let response = app
        .http
        .post(app.url("/orchestrator/events"))
        .bearer_auth(token("agent-1"))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .json(&event("agent-1", "evt-http"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    app.stop().await;
    // No explicit flush: shutdown itself must deliver the batch.
    assert!(
        collector.spans_of(CLIENT_TRACE).is_empty(),
        "exported before the batch was due"
    );
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap();
    let names: Vec<String> = collector
        .spans_of(CLIENT_TRACE)
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert!(
        names.iter().any(|n| n == "POST /orchestrator/events"),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n == "send acc.events"), "{names:?}");
}
