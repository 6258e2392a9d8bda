//! Streams as Server-Sent Events: `GET /orchestrator/events/stream` (scope
//! `orchestrator.events.read`, or admin); `GET /orchestrator/agents/stream` (agent status
//! changes), `GET /orchestrator/alerts/stream` (alert notifications) and
//! `GET /orchestrator/audit/stream` (the audit trail), admin only. What follows is said of
//! events and holds for every stream, each with the sequences of its own stream.
//!
//! `GET /orchestrator/tasks/{task_id}/stream` is the odd one: one task's record (as
//! `GET /orchestrator/tasks/{task_id}` shows it, for whoever may read that) at each change, `id:`
//! the record's revision in the `acc_tasks` bucket, ending after a terminal state. It is fed by
//! the replica's one hub over the bucket, not a consumer per subscriber.
//!
//! For events: `id:` is the event's `ACC_EVENTS` sequence and `data:`
//! the stored JSON. Filters: `type` (repeatable; exact or `*`/`>` patterns) and `source`. Resume
//! with `Last-Event-ID` or `?from_seq=N`, or start at `?since=<RFC 3339>`; with none, only new
//! events. A resume point older than the stream holds is answered `event: reset` with
//! `{"first_seq": N}` first. A subscriber that falls `SSE_BUFFER` broadcasts behind gets
//! `event: overflow` and its stream ends; it resumes by its last id. The body of an event
//! stream is its [`Subscription`]: frames rendered once by the hub, written as they come.

use std::convert::Infallible;

use axum::Router;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State, rejection::PathRejection};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::Stream;
use tokio_util::sync::CancellationToken;

use super::extract::Authenticated;
use super::{AppState, routes};
use crate::auth::{ADMIN_READ_SCOPE, ADMIN_SCOPE, Caller, EVENTS_READ_SCOPE};
use crate::bus::subjects;
use crate::contract::{Code, Refusal};
use crate::domain::TaskId;
use crate::streams::{
    Filter, Hub, KeyWatch, MAX_PATTERNS, Slot, Slots, SlotsFull, Start, StreamedEvent,
    StreamsSettings, Subscription, TypePattern,
};
use crate::tasks::TaskRecord;

/// What the stream routes need: the replica's hubs, the slots, the settings, and the stop
/// signal that ends every stream on shutdown.
pub struct Live {
    pub events: Hub,
    pub agents: Hub,
    pub alerts: Hub,
    pub audit: Hub,
    /// Over the `acc_tasks` bucket's task records, for the task streams.
    pub tasks: Hub,
    pub slots: Slots,
    pub settings: StreamsSettings,
    pub stop: CancellationToken,
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route(routes::EVENTS_STREAM.path, stream_route(Kind::Events))
        .route(routes::AGENTS_STREAM.path, stream_route(Kind::Agents))
        .route(routes::ALERTS_STREAM.path, stream_route(Kind::Alerts))
        .route(routes::AUDIT_STREAM.path, stream_route(Kind::Audit))
        .route(routes::TASK_STREAM.path, get(task_stream))
}

fn may_read_events(caller: &Caller) -> Result<(), Refusal> {
    if caller.has_scope(EVENTS_READ_SCOPE) || caller.has_scope(ADMIN_SCOPE) {
        Ok(())
    } else {
        Err(Refusal::insufficient_scope(EVENTS_READ_SCOPE))
    }
}

/// Which hub a stream route serves, and who may open it.
#[derive(Clone, Copy)]
enum Kind {
    Events,
    Agents,
    Alerts,
    Audit,
}

impl Kind {
    fn hub(self, live: &Live) -> &Hub {
        match self {
            Kind::Events => &live.events,
            Kind::Agents => &live.agents,
            Kind::Alerts => &live.alerts,
            Kind::Audit => &live.audit,
        }
    }

    fn allows(self, caller: &Caller) -> Result<(), Refusal> {
        match self {
            Kind::Events => may_read_events(caller),
            Kind::Agents | Kind::Alerts | Kind::Audit => admin(caller),
        }
    }
}

/// The GET route of one kind of stream.
fn stream_route(kind: Kind) -> MethodRouter<AppState> {
    get(
        move |State(state): State<AppState>,
              Authenticated(caller): Authenticated,
              headers: HeaderMap,
              RawQuery(query): RawQuery| async move {
            kind.allows(&caller)?;
            let hub = kind.hub(&state.live);
            serve(&state, &caller, hub, &headers, query.as_deref()).await
        },
    )
}

fn admin(caller: &Caller) -> Result<(), Refusal> {
    if caller.reads_all() {
        Ok(())
    } else {
        Err(Refusal::insufficient_scope(ADMIN_READ_SCOPE))
    }
}

/// Opens one stream of `hub` for `caller`: its slot, its resume point and filter, its task.
async fn serve(
    state: &AppState,
    caller: &Caller,
    hub: &Hub,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Response, Refusal> {
    let (start, filter) = parse_request(headers, query.unwrap_or(""))?;
    let live = &state.live;
    let slot = take_slot(live, caller)?;
    let subscription = Subscription::open(hub, start, filter, slot)
        .await
        .map_err(|err| Refusal::bus_unavailable(err.to_string()))?;
    Ok(sse_response(subscription))
}

/// A `text/event-stream` response whose body is `chunks`, written as they come.
fn sse_response(
    chunks: impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(chunks),
    )
        .into_response()
}

/// A stream slot for `caller`, or the refusal when it or the replica holds its maximum.
fn take_slot(live: &Live, caller: &Caller) -> Result<Slot, Refusal> {
    live.slots
        .take(caller.agent_id.as_str())
        .map_err(|full| match full {
            SlotsFull::Caller => Refusal::new(Code::TooManyStreams).with_retry_after(1),
            SlotsFull::Total => Refusal::new(Code::Overloaded),
        })
}

/// `GET /orchestrator/tasks/{task_id}/stream`. 404 and 403 as the task's GET; a resume after the
/// terminal state is 204 (nothing more will come: a browser's `EventSource` stops
/// reconnecting on a 204).
async fn task_stream(
    State(state): State<AppState>,
    task_id: Result<Path<String>, PathRejection>,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    let invalid = |e: String| Refusal::invalid_payload(format!("task_id: {e}"));
    let Path(raw) = task_id.map_err(|e| invalid(e.to_string()))?;
    let task_id = TaskId::parse(&raw).map_err(|e| invalid(e.to_string()))?;
    let record = state
        .task_api
        .find(&task_id)
        .await?
        .ok_or_else(|| Refusal::new(Code::TaskNotFound))?;
    state.task_api.view(&caller, &record).await?;
    let after = last_event_id(&headers)?.unwrap_or(0);
    let live = &state.live;
    let slot = take_slot(live, &caller)?;
    let watch = KeyWatch::open(
        &live.tasks,
        subjects::task_record(&task_id),
        after,
        slot,
        live.stop.clone(),
    )
    .await
    .map_err(|err| Refusal::bus_unavailable(err.to_string()))?;
    let first = match watch.current {
        Some(current) if current.seq > after => Some(current),
        Some(current) if decode_record(&current).is_some_and(|r| r.is_terminal()) => {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        _ => None,
    };
    Ok(Sse::new(task_events(first, watch.changes))
        .keep_alive(KeepAlive::new().interval(live.settings.keepalive))
        .into_response())
}

/// A stored task record; `None` (logged) when it does not read as one.
fn decode_record(stored: &StreamedEvent) -> Option<TaskRecord> {
    serde_json::from_slice(&stored.payload)
        .inspect_err(|err| {
            tracing::warn!(seq = stored.seq, error = %err, "unreadable task record; not streamed");
        })
        .ok()
}

/// The task's records as SSE events, `first` (if any) then each change, ending after the first
/// terminal one.
fn task_events(
    first: Option<Arc<StreamedEvent>>,
    changes: tokio::sync::mpsc::Receiver<Arc<StreamedEvent>>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(
        (first, changes, false),
        |(mut first, mut changes, ended)| async move {
            if ended {
                return None;
            }
            loop {
                let stored = match first.take() {
                    Some(stored) => stored,
                    None => changes.recv().await?,
                };
                let Some(record) = decode_record(&stored) else {
                    continue;
                };
                let event = Event::default()
                    .id(stored.seq.to_string())
                    .data(record.view().to_string());
                return Some((Ok(event), (None, changes, record.is_terminal())));
            }
        },
    )
}

/// The resume point and the filter, from `Last-Event-ID` and the query.
fn parse_request(headers: &HeaderMap, query: &str) -> Result<(Start, Filter), Refusal> {
    let mut filter = Filter::default();
    let mut start = Start::New;
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "type" => {
                if filter.types.len() == MAX_PATTERNS {
                    return Err(Refusal::invalid_payload(format!(
                        "type: at most {MAX_PATTERNS} patterns"
                    )));
                }
                filter.types.push(TypePattern::parse(&value)?);
            }
            "source" => filter.source = Some(value.into_owned()),
            "from_seq" => {
                let seq = value
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        Refusal::invalid_payload("from_seq: must be a stream sequence (1 or more)")
                    })?;
                start = Start::At(seq);
            }
            "since" => {
                let time = DateTime::parse_from_rfc3339(&value)
                    .map_err(|_| Refusal::invalid_payload("since: must be an RFC 3339 timestamp"))?
                    .with_timezone(&Utc);
                start = Start::Since(time);
            }
            other => {
                return Err(Refusal::invalid_payload(format!(
                    "{other}: unknown parameter (type, source, from_seq, since)"
                )));
            }
        }
    }
    // The browser's reconnect carries Last-Event-ID: it wins over the query it reconnects with.
    if let Some(seq) = last_event_id(headers)? {
        start = Start::After(seq);
    }
    Ok((start, filter))
}

/// The `Last-Event-ID` header, when there is one.
fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, Refusal> {
    let Some(raw) = headers.get("last-event-id") else {
        return Ok(None);
    };
    raw.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| {
            Refusal::invalid_payload("Last-Event-ID: must be the id of an event received")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_event_id_wins_over_the_query_and_bad_values_are_400() {
        let mut headers = HeaderMap::new();
        let (start, filter) =
            parse_request(&headers, "type=a.*&type=b&source=x&from_seq=5").unwrap();
        assert_eq!(start, Start::At(5));
        assert_eq!(filter.types.len(), 2);
        assert_eq!(filter.source.as_deref(), Some("x"));
        headers.insert("last-event-id", "42".parse().unwrap());
        let (start, _) = parse_request(&headers, "from_seq=5").unwrap();
        assert_eq!(start, Start::After(42));
        for bad in [
            "from_seq=0",
            "from_seq=x",
            "since=yesterday",
            "type=a..b",
            "colour=red",
        ] {
            let err = parse_request(&HeaderMap::new(), bad).unwrap_err();
            assert_eq!(err.code(), Code::InvalidPayload, "{bad}");
        }
        headers.insert("last-event-id", "nope".parse().unwrap());
        assert!(parse_request(&headers, "").is_err());
    }
}
