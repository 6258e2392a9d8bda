//! The task routes of DESIGN.md §6.1 (the callback and the status read live with the Gate-1
//! routes in `orchestrator`): submit, list, claim, cancel, and the dead-letter queue. Thin
//! handlers: extract, check the scope, let [`crate::tasks::Tasks`] do the work.

use axum::extract::{Path, RawQuery, State, rejection::PathRejection};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::Value;

use super::admin::admin;
use super::extract::{Authenticated, JsonObject};
use super::{AppState, routes};
use crate::contract::Refusal;
use crate::tasks::ListFilter;
use crate::telemetry::with_trace_id;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(routes::TASK_SUBMIT.path, post(submit).get(list))
        .route(routes::TASK_CLAIM.path, post(claim))
        .route(routes::TASK_CANCEL.path, post(cancel))
        .route(routes::DLQ.path, get(dead_letters))
        .route(routes::DLQ_REPLAY.path, post(replay))
}

type Answer = Result<Json<Value>, Refusal>;

/// 202: the task is stored; the dispatcher queues it.
async fn submit(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    JsonObject(body): JsonObject,
) -> Result<(StatusCode, Json<Value>), Refusal> {
    let answer = state.task_api.submit(&caller, &body).await?;
    Ok((StatusCode::ACCEPTED, Json(with_trace_id(answer))))
}

async fn list(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    RawQuery(query): RawQuery,
) -> Answer {
    let filter = ListFilter::parse(query.as_deref().unwrap_or(""))?;
    Ok(Json(with_trace_id(
        state.task_api.list(&caller, &filter).await?,
    )))
}

async fn claim(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    JsonObject(body): JsonObject,
) -> Answer {
    Ok(Json(with_trace_id(
        state.task_api.claim(&caller, &body).await?,
    )))
}

async fn cancel(
    State(state): State<AppState>,
    task_id: Result<Path<String>, PathRejection>,
    Authenticated(caller): Authenticated,
) -> Answer {
    let task_id = path(task_id)?;
    if caller.is_admin() {
        state
            .audit
            .admin_write(&caller.agent_id, "task.cancel", &task_id)
            .await?;
    }
    Ok(Json(with_trace_id(
        state.task_api.cancel(&caller, &task_id).await?,
    )))
}

async fn dead_letters(
    State(state): State<AppState>,
    Authenticated(_): Authenticated,
    RawQuery(query): RawQuery,
) -> Answer {
    let filter = ListFilter::parse(query.as_deref().unwrap_or(""))?;
    Ok(Json(with_trace_id(
        state.task_api.dead_letters(&filter).await?,
    )))
}

async fn replay(
    State(state): State<AppState>,
    task_id: Result<Path<String>, PathRejection>,
    Authenticated(caller): Authenticated,
) -> Answer {
    admin(&caller)?;
    let task_id = path(task_id)?;
    state
        .audit
        .admin_write(&caller.agent_id, "dlq.replay", &task_id)
        .await?;
    Ok(Json(with_trace_id(
        state.task_api.replay(&caller, &task_id).await?,
    )))
}

fn path(task_id: Result<Path<String>, PathRejection>) -> Result<String, Refusal> {
    task_id
        .map(|Path(id)| id)
        .map_err(|e| Refusal::invalid_payload(format!("task_id: {e}")))
}
