//! `GET /health` (the plan's body, real figures), `/health/live` and `/health/ready`.
//!
//! `/health` is `degraded` (503) when p95 latency of register or heartbeat exceeds 120 ms, when
//! their server-side error rate exceeds 1 % (the plan's rules, over the stats window), or when the
//! bus is disconnected. The figures are the fleet's (every ingress replica merged by the
//! metrics worker) while a fresh fleet snapshot is known, else this replica's own; `source`
//! in the body says which.

use async_nats::connection::State as ConnectionState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use serde_json::{Value, json};

use super::AppState;
use crate::bus::provision;
use crate::stats::Endpoint;
use crate::telemetry::with_trace_id;

/// p95 above this (ms) makes `/health` degraded (the plan's CRITICAL latency).
pub const DEGRADED_P95_MS: f64 = 120.0;
/// Server-side error rate above this makes `/health` degraded (the plan's CRITICAL rate).
pub const DEGRADED_ERROR_RATE: f64 = 0.01;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
}

async fn health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let fleet = state.fleet.latest();
    let figures = |endpoint: Endpoint| -> (f64, f64) {
        let from_fleet = fleet
            .as_ref()
            .and_then(|f| f.endpoints.get(endpoint.name()))
            .map(|f| (f.p95_ms, f.error_rate));
        from_fleet.unwrap_or_else(|| {
            let own = state.stats.figures(endpoint);
            (own.p95_ms, own.error_rate())
        })
    };
    let (register_p95, register_errors) = figures(Endpoint::Register);
    let (heartbeat_p95, heartbeat_errors) = figures(Endpoint::Heartbeat);
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
            "source": if fleet.is_some() { "fleet" } else { "replica" },
        },
        "bus": { "connected": connected },
        "refusals": state.limits.refusals.to_json(),
    }));
    if let Some(door) = &state.door {
        body["door"] = json!({ "admitted": door.admitted(), "rejected": door.rejections() });
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
