//! `/orchestrator/*`: the agent calls (register, heartbeat, task callback, event), the task
//! status read, and the admin agent list. The callback and the status read of a task the
//! orchestrator queued go to [`crate::tasks`]; those of any other task id stay Gate 1's. Handlers are thin: extract, then admission does the
//! work and shapes the answer, the same for every door.

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use axum::extract::{Path, State, rejection::PathRejection};
use axum::http::HeaderMap;
use axum::response::{IntoResponse as _, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::extract::{Authenticated, JsonObject, idempotency_key};
use super::{AppState, routes};
use crate::admission::{Answer, Call};
use crate::bus::subjects;
use crate::contract::{Code, Refusal};
use crate::domain::{TaskId, TaskResult};
use crate::telemetry::with_trace_id;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(routes::REGISTER.path, post(register))
        .route(routes::HEARTBEAT.path, post(heartbeat))
        .route(routes::TASK_CALLBACK.path, post(task_callback))
        .route(routes::TASK_STATUS.path, get(task_status))
        .route(routes::EVENTS.path, post(event))
        .route(routes::AGENTS.path, get(list_agents))
}

async fn register(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    JsonObject(body): JsonObject,
) -> Result<Json<Answer>, Refusal> {
    let key = idempotency_key(&headers);
    let answer = state.admission.admit(Call::Register, &caller, body, key);
    Ok(Json(answer.await?))
}

async fn heartbeat(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    JsonObject(body): JsonObject,
) -> Result<Json<Answer>, Refusal> {
    let key = idempotency_key(&headers);
    let answer = state.admission.admit(Call::Heartbeat, &caller, body, key);
    Ok(Json(answer.await?))
}

async fn task_callback(
    State(state): State<AppState>,
    task_id: Result<Path<String>, PathRejection>,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    JsonObject(body): JsonObject,
) -> Result<Response, Refusal> {
    let Path(task_id) = task_id.map_err(|e| Refusal::invalid_payload(format!("task_id: {e}")))?;
    // A task the orchestrator queued goes to the dispatcher; any other keeps Gate 1's path,
    // whose stored-result read is made side by side with the look-up of the submission.
    let (queued, stored) = tokio::join!(
        state.task_api.callback(&caller, &task_id, &body),
        state.admission.stored_result(&task_id),
    );
    if let Some(answer) = queued? {
        return Ok(Json(with_trace_id(answer)).into_response());
    }
    let key = idempotency_key(&headers);
    let call = Call::TaskResult {
        task_id: &task_id,
        stored: Some(&stored),
    };
    let answer = state.admission.admit(call, &caller, body, key).await?;
    Ok(Json(answer).into_response())
}

async fn event(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    JsonObject(body): JsonObject,
) -> Result<Json<Answer>, Refusal> {
    let answer = state.admission.admit(Call::Event, &caller, body, None);
    Ok(Json(answer.await?))
}

/// The latest stored result of a task, for the agent that reported it or an admin.
async fn task_status(
    State(state): State<AppState>,
    task_id: Result<Path<String>, PathRejection>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Value>, Refusal> {
    let Path(task_id) = task_id.map_err(|e| Refusal::invalid_payload(format!("task_id: {e}")))?;
    let task_id =
        TaskId::parse(&task_id).map_err(|e| Refusal::invalid_payload(format!("task_id: {e}")))?;
    if let Some(record) = state.task_api.find(&task_id).await? {
        return Ok(Json(with_trace_id(
            state.task_api.view(&caller, &record).await?,
        )));
    }
    let subject = subjects::task_result(&task_id);
    let lookup = state.tasks.get_last_raw_message_by_subject(&subject);
    let message = match tokio::time::timeout(state.lookup_timeout, lookup).await {
        Ok(Ok(message)) => message,
        Ok(Err(err)) if err.kind() == LastRawMessageErrorKind::NoMessageFound => {
            return Err(Refusal::new(Code::TaskNotFound));
        }
        Ok(Err(err)) => return Err(Refusal::bus_unavailable(err)),
        Err(_) => return Err(Refusal::bus_unavailable("task lookup timed out")),
    };
    let record: TaskResult = serde_json::from_slice(&message.payload).map_err(Refusal::internal)?;
    if record.reported_by != caller.agent_id && !caller.reads_all() {
        return Err(Refusal::new(Code::Forbidden).with_message(crate::admission::FOREIGN_TASK));
    }
    Ok(Json(with_trace_id(json!({
        "success": true,
        "task_id": record.task_id,
        "status": record.status,
        "result": record.result,
        "error": record.error,
        // `trace_id` is this answer's own trace, as in every answer; the reporter's stays here.
        "reported_trace_id": record.trace_id,
        "reported_by": record.reported_by,
        "received_at": record.received_at,
        "stream": subjects::TASKS_STREAM,
        "seq": message.sequence,
    }))))
}

/// Needs orchestrator.admin.read, checked by the extractor from the route table.
async fn list_agents(
    State(state): State<AppState>,
    Authenticated(_): Authenticated,
) -> Result<Json<Value>, Refusal> {
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
                "capabilities": a.profile.capabilities,
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
