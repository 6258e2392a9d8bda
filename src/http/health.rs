//! `GET /health` (the plan's body, real figures), `/health/live` and `/health/ready`.
//!
//! `/health` is `degraded` (503) when p95 latency of register or heartbeat exceeds 120 ms, when
//! their server-side error rate exceeds 1 % (the plan's rules, over the stats window), or when the
//! bus is disconnected. The status judges this replica's own figures only, so that a load
//! balancer pulls a slow replica rather than all of them at once; while a fresh fleet snapshot
//! is known (every ingress merged by the metrics worker), its figures are added under `fleet`
//! for information.

use async_nats::connection::State as ConnectionState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use serde_json::{Value, json};

use super::{AppState, routes};
use crate::bus::provision;
use crate::stats::Endpoint;
use crate::telemetry::with_trace_id;

/// p95 above this (ms) makes `/health` degraded (the plan's CRITICAL latency).
pub const DEGRADED_P95_MS: f64 = 120.0;
/// Server-side error rate above this makes `/health` degraded (the plan's CRITICAL rate).
pub const DEGRADED_ERROR_RATE: f64 = 0.01;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(routes::HEALTH.path, get(health))
        .route(routes::HEALTH_LIVE.path, get(live))
        .route(routes::HEALTH_READY.path, get(ready))
}

async fn health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    // The status code judges this replica only: a load balancer pulls the replica that answers
    // 503, so a fleet-wide figure must not make every replica degraded at once.
    let own = |endpoint: Endpoint| -> (f64, f64) {
        let own = state.stats.figures(endpoint);
        (own.p95_ms, own.error_rate())
    };
    let (register_p95, register_errors) = own(Endpoint::Register);
    let (heartbeat_p95, heartbeat_errors) = own(Endpoint::Heartbeat);
    let connected = state.client.connection_state() == ConnectionState::Connected;
    let degraded = !connected
        || [
            (register_p95, register_errors),
            (heartbeat_p95, heartbeat_errors),
        ]
        .iter()
        .any(|(p95, errors)| *p95 > DEGRADED_P95_MS || *errors > DEGRADED_ERROR_RATE);
    let agents = state.admission.directory().counts();
    let mut body = with_trace_id(json!({
        "status": if degraded { "degraded" } else { "healthy" },
        "timestamp": Utc::now(),
        "uptime": state.stats.uptime().as_secs_f64(),
        "agents": agents,
        "orchestrator": {
            "p95_latency_register": register_p95,
            "p95_latency_heartbeat": heartbeat_p95,
            "error_rate_register": register_errors,
            "error_rate_heartbeat": heartbeat_errors,
            "source": "replica",
        },
        "bus": { "connected": connected },
        "refusals": state.limits.refusals_json(),
    }));
    // The fleet's figures (every ingress merged by the metrics worker), for information only.
    if let Some(fleet) = state.fleet.latest() {
        let figures = |endpoint: Endpoint| {
            fleet
                .endpoints
                .get(endpoint.name())
                .map(|f| (f.p95_ms, f.error_rate))
        };
        let (register, heartbeat) = (figures(Endpoint::Register), figures(Endpoint::Heartbeat));
        body["fleet"] = json!({
            "generated_at": fleet.generated_at,
            "p95_latency_register": register.map(|f| f.0),
            "p95_latency_heartbeat": heartbeat.map(|f| f.0),
            "error_rate_register": register.map(|f| f.1),
            "error_rate_heartbeat": heartbeat.map(|f| f.1),
        });
    }
    if let Some(door) = &state.door {
        body["door"] = json!({ "admitted": door.admitted(), "rejected": door.refused.nonzero() });
    }
    let status = if degraded {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body))
}

async fn live() -> Json<Value> {
    Json(json!({ "status": "live" }))
}

/// Ready when NATS is connected and every stream and bucket exists.
async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let connected = state.client.connection_state() == ConnectionState::Connected;
    let streams = connected
        && tokio::time::timeout(state.lookup_timeout, provision::present(&state.js))
            .await
            .unwrap_or(false);
    let ready = connected && streams;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if ready { "ready" } else { "not_ready" },
            "nats_connected": connected,
            "streams_present": streams,
        })),
    )
}
