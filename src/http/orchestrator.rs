//! `/orchestrator/*`: the agent calls (register, heartbeat, task callback, event), the task
//! status read, and the admin agent list. Handlers are thin: extract, then admission does the
//! work and shapes the answer, the same for every door.

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use axum::extract::{Path, State, rejection::PathRejection};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::extract::{Authenticated, JsonObject, idempotency_key};
use crate::admission::Call;
use crate::auth::ADMIN_SCOPE;
use crate::bus::subjects;
use crate::domain::{TaskId, TaskResult};
use crate::telemetry::with_trace_id;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/orchestrator/register", post(register))
        .route("/orchestrator/heartbeat", post(heartbeat))
        .route(
            "/orchestrator/tasks/{task_id}/callback",
            post(task_callback),
        )
        .route("/orchestrator/tasks/{task_id}", get(task_status))
        .route("/orchestrator/events", post(event))
        .route("/orchestrator/agents", get(list_agents))
}

async fn register(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let key = idempotency_key(&headers);
    let answer = state.admission.admit(Call::Register, &caller, &body, key);
    Ok(Json(answer.await?))
}

async fn heartbeat(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let key = idempotency_key(&headers);
    let answer = state.admission.admit(Call::Heartbeat, &caller, &body, key);
    Ok(Json(answer.await?))
}

async fn task_callback(
    State(state): State<AppState>,
    task_id: Result<Path<String>, PathRejection>,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let Path(task_id) = task_id.map_err(|e| ApiError::InvalidPayload(format!("task_id: {e}")))?;
    let key = idempotency_key(&headers);
    let call = Call::TaskResult { task_id: &task_id };
    Ok(Json(
        state.admission.admit(call, &caller, &body, key).await?,
    ))
}

async fn event(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let answer = state.admission.admit(Call::Event, &caller, &body, None);
    Ok(Json(answer.await?))
}

/// The latest stored result of a task, for the agent that reported it or an admin.
async fn task_status(
    State(state): State<AppState>,
    task_id: Result<Path<String>, PathRejection>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Value>, ApiError> {
    let Path(task_id) = task_id.map_err(|e| ApiError::InvalidPayload(format!("task_id: {e}")))?;
    let task_id =
        TaskId::parse(&task_id).map_err(|e| ApiError::InvalidPayload(format!("task_id: {e}")))?;
    let subject = subjects::task_result(&task_id);
    let lookup = state.tasks.get_last_raw_message_by_subject(&subject);
    let message = match tokio::time::timeout(state.lookup_timeout, lookup).await {
        Ok(Ok(message)) => message,
        Ok(Err(err)) if err.kind() == LastRawMessageErrorKind::NoMessageFound => {
            return Err(ApiError::TaskNotFound);
        }
        Ok(Err(err)) => return Err(ApiError::BusUnavailable(err.to_string())),
        Err(_) => return Err(ApiError::BusUnavailable("task lookup timed out".into())),
    };
    let record: TaskResult = serde_json::from_slice(&message.payload)
        .map_err(|e| ApiError::Internal(format!("stored task result unreadable: {e}")))?;
    if record.reported_by != caller.agent_id && !caller.is_admin() {
        return Err(ApiError::Forbidden(
            "this task was reported by another agent".into(),
        ));
    }
    Ok(Json(with_trace_id(json!({
        "success": true,
        "task_id": record.task_id,
        "status": record.status,
        "result": record.result,
        "error": record.error,
        "trace_id": record.trace_id,
        "reported_by": record.reported_by,
        "received_at": record.received_at,
        "stream": subjects::TASKS_STREAM,
        "seq": message.sequence,
    }))))
}

async fn list_agents(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Value>, ApiError> {
    if !caller.is_admin() {
        return Err(ApiError::InsufficientScope(ADMIN_SCOPE));
    }
    let agents: Vec<Value> = state
        .admission
        .directory()
        .list()
        .into_iter()
        .map(|a| {
            json!({
                "agent_id": a.agent_id,
                "name": a.profile.name,
                "status": a.status,
                "last_seen": a.last_seen,
                "capabilities_count": a.profile.capabilities.len(),
                "base_url": a.profile.base_url,
                "registered_at": a.registered_at,
            })
        })
        .collect();
    Ok(Json(with_trace_id(json!({
        "success": true,
        "count": agents.len(),
        "agents": agents,
    }))))
}
