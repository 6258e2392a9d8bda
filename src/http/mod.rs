//! The HTTP door: the router, shared state, per-endpoint figures, and JSON errors for every
//! failure including unknown routes, wrong methods and panics.

pub mod error;
pub mod extract;
pub mod health;
pub mod orchestrator;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Client;
use async_nats::jetstream::{self, stream::Stream};
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::Uri;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower_http::catch_panic::CatchPanicLayer;

use crate::admission::Admission;
use crate::auth::Verifier;
use crate::stats::{Endpoint, Stats};
use error::ApiError;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub admission: Admission,
    pub verifier: Verifier,
    pub stats: Arc<Stats>,
    /// The task results stream, for `GET /orchestrator/tasks/{id}`.
    pub tasks: Stream,
    pub client: Client,
    pub js: jetstream::Context,
    pub body_limit: usize,
    /// Bound on reads from the bus made while answering a request.
    pub lookup_timeout: Duration,
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
        .merge(health::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(CatchPanicLayer::custom(
            |_panic: Box<dyn std::any::Any + Send>| {
                ApiError::Internal("handler panicked".into()).into_response()
            },
        ))
        .with_state(state)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_owned())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Records latency and status of the routes we keep figures for.
async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|path| endpoint_of(path.as_str()));
    let started = Instant::now();
    let response = next.run(request).await;
    if let Some(endpoint) = endpoint {
        state
            .stats
            .record(endpoint, response.status().as_u16(), started.elapsed());
    }
    response
}

fn endpoint_of(path: &str) -> Option<Endpoint> {
    Some(match path {
        "/orchestrator/register" => Endpoint::Register,
        "/orchestrator/heartbeat" => Endpoint::Heartbeat,
        "/orchestrator/tasks/{task_id}/callback" => Endpoint::TaskCallback,
        "/orchestrator/tasks/{task_id}" => Endpoint::TaskStatus,
        "/orchestrator/events" => Endpoint::Events,
        "/orchestrator/agents" => Endpoint::Agents,
        _ => return None,
    })
}
