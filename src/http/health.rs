//! `GET /health` (the plan's body, real figures), `/health/live` and `/health/ready`.
//!
//! `/health` is `degraded` (503) when p95 latency of register or heartbeat exceeds 120 ms, when
//! their server-side error rate exceeds 1 % (the plan's rules, over the stats window), or when the
//! bus is disconnected.

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
    let register = state.stats.figures(Endpoint::Register);
    let heartbeat = state.stats.figures(Endpoint::Heartbeat);
    let connected = state.client.connection_state() == ConnectionState::Connected;
    let degraded = !connected
        || [register, heartbeat]
            .iter()
            .any(|f| f.p95_ms > DEGRADED_P95_MS || f.error_rate() > DEGRADED_ERROR_RATE);
    let agents = state.admission.directory().counts();
    let mut body = with_trace_id(json!({
        "status": if degraded { "degraded" } else { "healthy" },
        "timestamp": Utc::now(),
        "uptime": state.stats.uptime().as_secs_f64(),
        "agents": agents,
        "orchestrator": {
            "p95_latency_register": register.p95_ms,
            "p95_latency_heartbeat": heartbeat.p95_ms,
            "error_rate_register": register.error_rate(),
            "error_rate_heartbeat": heartbeat.error_rate(),
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
