//! Operator routes for alerts (scope `orchestrator.admin`):
//!
//! - `GET /orchestrator/alerts`: active (pending, firing) and recent (resolved) alerts.
//! - `POST /orchestrator/alerts/{id}/ack`: acknowledge; stops escalation of this episode.
//! - `POST /orchestrator/silences` `{matchers:{label:value}, duration:"1h", comment?}`,
//!   `GET /orchestrator/silences`, `DELETE /orchestrator/silences/{id}` (expires it now).
//!
//! Alert states are written by the acting alerting replica; acknowledgements and silences are
//! written here, and read by that replica on its next evaluation.

use std::collections::BTreeMap;

use axum::extract::{Path, State, rejection::PathRejection};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde_json::{Value, json};

use super::extract::{Authenticated, JsonObject};
use super::{AppState, routes};
use crate::alerting::engine::{Ack, Phase, Silence};
use crate::alerting::store::{self, ACK_PREFIX, SILENCE_PREFIX, StoreError};
use crate::auth::{ADMIN_SCOPE, Caller};
use crate::contract::{Code, Refusal};
use crate::domain::parse_duration;
use crate::telemetry::with_trace_id;

/// Most matchers a silence may carry, and the longest label name or value.
pub(super) const MAX_MATCHERS: usize = 8;
pub(super) const MAX_LABEL_BYTES: usize = 256;
/// Longest silence `comment`, in bytes.
pub(super) const MAX_COMMENT_BYTES: usize = 1024;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(routes::ALERTS.path, get(list_alerts))
        .route(routes::ALERT_ACK.path, post(ack))
        .route(routes::SILENCES.path, get(list_silences))
        .route(routes::SILENCE_CREATE.path, post(create_silence))
        .route(routes::SILENCE_EXPIRE.path, delete(expire_silence))
}

/// 403 `INSUFFICIENT_SCOPE` unless the caller is an admin: the writes check it again (the
/// extractor checked the route table's scope already); the reads need only the table's
/// orchestrator.admin.read.
pub(super) fn admin(caller: &Caller) -> Result<(), Refusal> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(Refusal::insufficient_scope(ADMIN_SCOPE))
    }
}

impl From<StoreError> for Refusal {
    fn from(err: StoreError) -> Self {
        Refusal::bus_unavailable(err)
    }
}

async fn list_alerts(
    State(state): State<AppState>,
    Authenticated(_): Authenticated,
) -> Result<Json<Value>, Refusal> {
    let mut alerts = store::alerts(&state.alerting).await?;
    let acks = store::acks(&state.alerting).await?;
    alerts.sort_by_key(|a| std::cmp::Reverse(a.active_since));
    let view = |alert: &crate::alerting::engine::AlertState| {
        let mut value = serde_json::to_value(alert).unwrap_or(Value::Null);
        let ack = acks
            .get(&alert.id)
            .filter(|ack| ack.acked_at >= alert.active_since);
        value["acknowledged"] = serde_json::to_value(ack).unwrap_or(Value::Null);
        value
    };
    let active: Vec<Value> = alerts
        .iter()
        .filter(|a| a.phase != Phase::Resolved)
        .map(view)
        .collect();
    let recent: Vec<Value> = alerts
        .iter()
        .filter(|a| a.phase == Phase::Resolved)
        .map(view)
        .collect();
    Ok(Json(with_trace_id(json!({
        "success": true,
        "active": active,
        "recent": recent,
    }))))
}

async fn ack(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Value>, Refusal> {
    admin(&caller)?;
    let Ok(Path(id)) = id else {
        return Err(Refusal::new(Code::AlertNotFound));
    };
    if !store::valid_id(&id) {
        return Err(Refusal::new(Code::AlertNotFound));
    }
    let Some(alert) = store::alert(&state.alerting, &id).await? else {
        return Err(Refusal::new(Code::AlertNotFound));
    };
    let ack = Ack {
        alert_id: alert.id.clone(),
        acked_by: caller.agent_id.to_string(),
        acked_at: Utc::now(),
    };
    state
        .audit
        .admin_write(&caller.agent_id, "alert.ack", &id)
        .await?;
    store::put(&state.alerting, format!("{ACK_PREFIX}{id}"), &ack).await?;
    Ok(Json(with_trace_id(json!({
        "success": true,
        "alert_id": id,
        "acknowledged": ack,
        "message": "Alert acknowledged",
    }))))
}

async fn list_silences(
    State(state): State<AppState>,
    Authenticated(_): Authenticated,
) -> Result<Json<Value>, Refusal> {
    let mut silences = store::silences(&state.alerting).await?;
    silences.sort_by_key(|s| std::cmp::Reverse(s.starts_at));
    let now = Utc::now();
    let view: Vec<Value> = silences
        .iter()
        .map(|s| {
            let mut value = serde_json::to_value(s).unwrap_or(Value::Null);
            value["active"] = s.active(now).into();
            value
        })
        .collect();
    Ok(Json(with_trace_id(json!({
        "success": true,
        "count": view.len(),
        "silences": view,
    }))))
}

async fn create_silence(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, Refusal> {
    admin(&caller)?;
    let Some(Value::Object(raw)) = body.get("matchers") else {
        return Err(Refusal::invalid_payload(
            "matchers: required, an object of label: value",
        ));
    };
    if raw.is_empty() || raw.len() > MAX_MATCHERS {
        return Err(Refusal::invalid_payload(format!(
            "matchers: 1 to {MAX_MATCHERS} labels"
        )));
    }
    let mut matchers = BTreeMap::new();
    for (label, value) in raw {
        let Value::String(value) = value else {
            return Err(Refusal::invalid_payload(format!(
                "matchers.{label}: must be a string"
            )));
        };
        if label.is_empty() || label.len() > MAX_LABEL_BYTES || value.len() > MAX_LABEL_BYTES {
            return Err(Refusal::invalid_payload(format!(
                "matchers: labels and values of 1 to {MAX_LABEL_BYTES} bytes"
            )));
        }
        matchers.insert(label.clone(), value.clone());
    }
    let duration = match body.get("duration") {
        Some(Value::String(raw)) => {
            parse_duration(raw).map_err(|e| Refusal::invalid_payload(format!("duration: {e}")))?
        }
        _ => {
            return Err(Refusal::invalid_payload(
                "duration: required, like \"30m\" or \"2h\"",
            ));
        }
    };
    let comment = match body.get("comment") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(c)) if c.len() <= MAX_COMMENT_BYTES => c.clone(),
        Some(_) => {
            return Err(Refusal::invalid_payload(format!(
                "comment: a string of at most {MAX_COMMENT_BYTES} bytes"
            )));
        }
    };
    let now = Utc::now();
    let ends_at = chrono::Duration::from_std(duration)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .ok_or_else(|| Refusal::invalid_payload("duration: too long"))?;
    let silence = Silence {
        id: format!("{:016x}", rand::random::<u64>()),
        matchers,
        starts_at: now,
        ends_at,
        created_by: caller.agent_id.to_string(),
        comment,
    };
    state
        .audit
        .admin_write(&caller.agent_id, "silence.create", &silence.id)
        .await?;
    store::put(
        &state.alerting,
        format!("{SILENCE_PREFIX}{}", silence.id),
        &silence,
    )
    .await?;
    Ok(Json(with_trace_id(json!({
        "success": true,
        "silence": silence,
        "message": "Silence created",
    }))))
}

async fn expire_silence(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Value>, Refusal> {
    admin(&caller)?;
    let Ok(Path(id)) = id else {
        return Err(Refusal::new(Code::SilenceNotFound));
    };
    if !store::valid_id(&id) {
        return Err(Refusal::new(Code::SilenceNotFound));
    }
    let Some(mut silence) = store::silence(&state.alerting, &id).await? else {
        return Err(Refusal::new(Code::SilenceNotFound));
    };
    let now = Utc::now();
    if silence.ends_at > now {
        silence.ends_at = now;
        state
            .audit
            .admin_write(&caller.agent_id, "silence.expire", &id)
            .await?;
        store::put(&state.alerting, format!("{SILENCE_PREFIX}{id}"), &silence).await?;
    }
    Ok(Json(with_trace_id(json!({
        "success": true,
        "silence": silence,
        "message": "Silence expired",
    }))))
}
