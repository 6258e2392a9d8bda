//! The HTTP door: the router, shared state, per-endpoint figures, and JSON errors for every
//! failure including unknown routes, wrong methods and panics.

pub mod admin;
pub mod audit;
pub mod console;
pub mod error;
pub mod extract;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod orchestrator;
pub mod routes;
pub mod server;
pub mod streams;
pub mod tasks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use async_nats::jetstream::{self, stream::Stream};
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use opentelemetry::Context;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::admission::Admission;
use crate::auth::Authenticator;
use crate::contract::{self, Code, Refusal, Tally};
use crate::stats::Stats;
use crate::telemetry;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub admission: Admission,
    /// Verifies bearer tokens (JWT or introspection, by `AUTH_MODE`).
    pub verifier: Authenticator,
    pub stats: Arc<Stats>,
    /// The task results stream, for `GET /orchestrator/tasks/{id}`.
    pub tasks: Stream,
    pub client: Client,
    pub js: jetstream::Context,
    pub body_limit: usize,
    /// Bound on reads from the bus made while answering a request.
    pub lookup_timeout: Duration,
    /// The NATS door's counts, when this process runs the door.
    pub door: Option<Arc<Tally>>,
    /// The latest fleet figures from the metrics worker, for `/metrics` and `/health`.
    pub fleet: Arc<crate::metrics::FleetView>,
    /// The alerting bucket: alert states, acknowledgements, silences (admin routes).
    pub alerting: async_nats::jetstream::kv::Store,
    /// Rate limits and the in-flight cap.
    pub limits: limits::Limits,
    /// The event streams: this replica's hubs, the stream slots, the stop signal.
    pub live: streams::Live,
    /// The audit trail, for admin writes and refused credentials.
    pub audit: crate::audit::Audit,
    /// The task routes: submissions, reads, and requests to the acting dispatcher.
    pub task_api: crate::tasks::Tasks,
    /// This process's dispatcher figures, for `/metrics`.
    pub task_figures: Arc<crate::metrics::tasks::TaskGauges>,
    /// `/metrics` names each offline agent (`METRICS_AGENT_IDS`).
    pub metrics_agent_ids: bool,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(inner: Inner) -> Self {
        Self(Arc::new(inner))
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(orchestrator::router())
        .merge(tasks::router())
        .merge(health::router())
        .merge(metrics::router())
        .merge(openapi::router())
        .merge(admin::router())
        .merge(streams::router())
        .merge(audit::router())
        .merge(console::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // One layer of two, outermost first: the router boxes each route once for the whole
        // stack, where a layer each boxed it (and cloned the box on every request) each time.
        .layer(
            ServiceBuilder::new()
                .layer(CatchPanicLayer::custom(
                    |_panic: Box<dyn std::any::Any + Send>| {
                        Refusal::internal("handler panicked").into_response()
                    },
                ))
                // One middleware for the in-flight cap, the span and figures, and the audit
                // of refused credentials: one future and one boxed call per request, not three.
                .layer(middleware::from_fn_with_state(state.clone(), front)),
        )
        .with_state(state)
}

async fn not_found(uri: Uri) -> Refusal {
    error::route_not_found(uri.path())
}

async fn method_not_allowed() -> Refusal {
    Refusal::new(Code::MethodNotAllowed)
}

/// Wraps every request, in this order:
///
/// 1. the in-flight cap ([`limits::Limits::hold_in_flight`]): past it, 503 `OVERLOADED` at
///    once, with no span and no body read; health probes are not held to it;
/// 2. [`observe`]: the span, the body's `trace_id`, the figures;
/// 3. inside the span, the audit of a refused credential ([`audit::refused_credential`]), so
///    that its record carries the request's trace id.
///
/// Every "not now" and before-admission refusal is counted by code ([`limits::Limits`]).
async fn front(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let Some(held) = state.limits.hold_in_flight(&mut request) else {
        return state.limits.overloaded();
    };
    let response = observe(&state, request, held.slot(), next).await;
    held.release(&state.limits, &response);
    response
}

/// One server span continuing the caller's trace (from `traceparent`, or from a W3C
/// `trace_id` in the body when there is no header), a `traceparent` response header, and
/// latency figures for the routes we keep them for (refusals before admission are only
/// counted, see [`crate::stats::Stats::record_refused`]). `slot` is the agent slot the request
/// may hold ([`limits::SlotCell`]), none for a health probe.
async fn observe(
    state: &AppState,
    request: Request,
    slot: Option<limits::SlotCell>,
    next: Next,
) -> Response {
    let started = Instant::now();
    // `MatchedPath` is an `Arc<str>`: cloning it does not copy the route.
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map(MatchedPath::as_str);
    let endpoint = route.and_then(routes::endpoint_of);
    let method = request.method().clone();
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    // Not exported: only the span's trace id is used (see `telemetry::exporting`).
    let span = if !telemetry::exporting() {
        tracing::info_span!("http.request", acc.trace_id = tracing::field::Empty)
    } else {
        match route.and_then(|path| routes::find(&method, path)) {
            Some((_, name)) => tracing::info_span!(
                "http.request",
                otel.name = name,
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                http.request.method = method.as_str(),
                http.route = route.unwrap_or(""),
                url.path = request.uri().path(),
                url.scheme = "http",
                http.response.status_code = tracing::field::Empty,
                acc.trace_id = tracing::field::Empty,
            ),
            // Unknown routes and methods: rare, so the name may cost an allocation.
            None => tracing::info_span!(
                "http.request",
                otel.name = %format!("{method} {}", route.unwrap_or("unmatched")),
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                http.request.method = method.as_str(),
                url.path = %request.uri().path(),
                url.scheme = "http",
                http.response.status_code = tracing::field::Empty,
                acc.trace_id = tracing::field::Empty,
            ),
        }
    };
    let mut parent = telemetry::extract(request.headers());
    // A scrape is routine: traced only when the scraper sends its own sampled `traceparent`.
    if route == Some(routes::METRICS.path) && !telemetry::has_remote_parent(&parent) {
        parent = telemetry::routine_parent();
    }
    // The body is read here (for its `trace_id`) only once the headers passed: a declared size
    // over the limit is 413 at once, and a request whose token does not verify is left to the
    // handler's extractor, which refuses it from its headers without reading the body. So a
    // slow or oversized body from anyone without a valid token never holds a slot.
    let authorization = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    let (request, early) =
        if let Err(refusal) = extract::declared_within(request.headers(), state.body_limit) {
            (None, Some(refusal))
        } else if telemetry::has_remote_parent(&parent) || method != Method::POST {
            (Some(request), None)
        } else {
            // Verified once: the extractor takes this result instead of verifying again.
            let verified = state.verifier.verify_header(authorization).await;
            let valid = verified.is_ok();
            // A verified agent takes one of its slots before its body is read.
            let held = match (&verified, &slot) {
                (Ok(caller), Some(slot)) => slot.hold(&state.limits, caller.agent_id.as_str()),
                _ => Ok(()),
            };
            let mut request = request;
            request.extensions_mut().insert(extract::Verified(verified));
            if !valid {
                (Some(request), None)
            } else if let Err(refusal) = held {
                (None, Some(refusal))
            } else {
                match read_object(request, state.body_limit).await {
                    Ok((request, from_body)) => {
                        if let Some(from_body) = from_body {
                            parent = from_body;
                        }
                        (Some(request), None)
                    }
                    Err(refusal) => (None, Some(refusal)),
                }
            }
        };
    let _ = span.set_parent(parent);
    let mut response = async {
        let response = match (request, early) {
            (Some(request), _) => next.run(request).await,
            (None, Some(refusal)) => refusal.into_response(),
            (None, None) => unreachable!("either a request or a refusal"),
        };
        audit::refused_credential(state, peer, route, &method, &response);
        response
    }
    .instrument(span.clone())
    .await;
    let status = response.status();
    // An i64, so that it is exported as an int attribute (semantic conventions), not a string.
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    if let Some(traceparent) = telemetry::traceparent(&span) {
        if let Ok(value) = HeaderValue::from_str(&traceparent) {
            response.headers_mut().insert("traceparent", value);
        }
    }
    if let Some(endpoint) = endpoint {
        // Only admitted requests weigh on the plan's latency and error figures.
        match response.extensions().get::<Code>() {
            Some(code) if code.is_before_admission() => {
                state.stats.record_refused(endpoint, status.as_u16());
            }
            _ => state
                .stats
                .record(endpoint, status.as_u16(), started.elapsed()),
        }
    }
    response
}

/// Reads a POST body (up to the body limit) for its `trace_id` field, and hands the request
/// on with the same bytes and, when they are a JSON object, the object itself
/// ([`extract::Parsed`]), so that the handler's [`extract::JsonObject`] does not parse the body
/// again. Returns the parent the body's `trace_id` names, if it names a valid one. Only called
/// when no `traceparent` header was sent.
async fn read_object(
    request: Request,
    limit: usize,
) -> Result<(Request, Option<Context>), Refusal> {
    let (mut parts, body) = request.into_parts();
    let deadline = parts.extensions.get::<server::BodyDeadline>().copied();
    let bytes = extract::read_body(body, limit, deadline).await?;
    let mut parent = None;
    // Not an object: the handler's extractor reads the bytes again and refuses them itself.
    if let Ok(object) = contract::json_object(&bytes, limit) {
        parent = object
            .get("trace_id")
            .and_then(serde_json::Value::as_str)
            .and_then(telemetry::parent_from_trace_id);
        parts.extensions.insert(extract::Parsed(object));
    }
    Ok((Request::from_parts(parts, Body::from(bytes)), parent))
}
