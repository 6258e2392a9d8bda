//! The audit trail over HTTP (admin): `GET /orchestrator/audit` lists records, oldest first,
//! with filters and a cursor; `refused_credential` records every refused credential (called
//! by the front middleware). (`/orchestrator/audit/stream` is in [`super::streams`].)

use std::net::IpAddr;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use axum::extract::{Query, State};
use axum::http::Method;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::Authenticated;
use super::{AppState, routes};
use crate::audit::{AuditEntry, is_refused_credential};
use crate::bus::subjects;
use crate::contract::{Code, Refusal};
use crate::telemetry::with_trace_id;

/// Records listed per page by default, and at most.
const DEFAULT_LIMIT: usize = 100;
pub(super) const MAX_LIMIT: usize = 1_000;
/// Records read from the stream per batch while a page fills.
const BATCH: usize = 500;

pub fn router() -> Router<AppState> {
    Router::new().route(routes::AUDIT.path, get(list))
}

/// `?kind=&actor=&action=&code=&limit=&cursor=`; `cursor` is the `next_cursor` of the page
/// before (a stream sequence).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    kind: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    code: Option<String>,
    limit: Option<usize>,
    cursor: Option<u64>,
}

impl ListQuery {
    fn accepts(&self, entry: &AuditEntry) -> bool {
        let kind = serde_json::to_value(entry.kind).unwrap_or(Value::Null);
        self.kind.as_deref().is_none_or(|k| kind == k)
            && self
                .actor
                .as_deref()
                .is_none_or(|a| entry.actor.as_deref() == Some(a))
            && self.action.as_deref().is_none_or(|a| entry.action == a)
            && self
                .code
                .as_deref()
                .is_none_or(|c| entry.code.as_deref() == Some(c))
    }
}

async fn list(
    State(state): State<AppState>,
    Authenticated(_): Authenticated,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, Refusal> {
    let Query(query) = query.map_err(|e| Refusal::invalid_payload(e.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(Refusal::invalid_payload(format!("limit: 1 to {MAX_LIMIT}")));
    }
    let stream = state
        .js
        .get_stream(subjects::AUDIT_STREAM)
        .await
        .map_err(Refusal::bus_unavailable)?;
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: subjects::AUDIT_ALL.to_owned(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: query.cursor.unwrap_or(1).max(1),
            },
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(10),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(Refusal::bus_unavailable)?;
    let mut records = Vec::new();
    let mut next_cursor = None;
    'pages: loop {
        let mut batch = consumer
            .fetch()
            .max_messages(BATCH)
            .messages()
            .await
            .map_err(Refusal::bus_unavailable)?;
        let mut got = 0;
        while let Some(message) = batch.next().await {
            let message = message.map_err(Refusal::bus_unavailable)?;
            got += 1;
            let info = message
                .info()
                .map_err(|e| Refusal::internal(e.to_string()))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            let Ok(entry) = serde_json::from_slice::<AuditEntry>(&message.payload) else {
                tracing::warn!(seq, "unreadable audit record; skipped");
                continue;
            };
            if query.accepts(&entry) {
                let mut record = serde_json::to_value(&entry).unwrap_or(Value::Null);
                record["seq"] = seq.into();
                records.push(record);
            }
            if records.len() == limit {
                next_cursor = (pending > 0).then_some(seq + 1);
                break 'pages;
            }
        }
        if got == 0 {
            break;
        }
    }
    let mut answer = json!({ "success": true, "count": records.len(), "records": records });
    if let Some(cursor) = next_cursor {
        answer["next_cursor"] = cursor.into();
    }
    Ok(Json(with_trace_id(answer)))
}

/// After each response (inside the request's span, so the record carries its trace id): a
/// refused credential is recorded with the source address, the route and the code. The route is
/// spelled out only for a refusal.
pub(super) fn refused_credential(
    state: &AppState,
    peer: Option<IpAddr>,
    route: Option<&str>,
    method: &Method,
    response: &Response,
) {
    if let Some(&code) = response.extensions().get::<Code>() {
        if is_refused_credential(code) {
            let route =
                route.map_or_else(|| "unmatched".to_owned(), |path| format!("{method} {path}"));
            state.audit.credential_refused(peer, &route, code);
        }
    }
}
