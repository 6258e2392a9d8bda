//! `GET /openapi.json`: an OpenAPI 3.1 document built from the route table ([`routes::ALL`])
//! and the refusal codes ([`Code::ALL`]), so a new route or code appears in it without editing
//! this file. The same document is committed as `docs/openapi.json`; a test fails when the two
//! disagree (regenerate with `UPDATE_OPENAPI=1 cargo nextest run -E 'test(/^openapi::/)'`).
//!
//! What it states: every path and method, its path and query parameters, which routes need a
//! bearer token, every request body with every rule its parser checks ([`bodies`], shared with
//! the AsyncAPI document), the success body of each route (the members a client relies on;
//! more may follow), and the error envelope every refusal uses (with every code, and the status
//! each code is answered with). docs/api.md says what the fields mean.

use axum::Json;
use axum::Router;
use axum::routing::get;
use serde_json::{Map, Value, json};

use super::{AppState, routes};
use crate::bodies;
use crate::contract::Code;

pub fn router() -> Router<AppState> {
    Router::new().route(routes::OPENAPI.path, get(|| async { Json(document()) }))
}

/// Routes that take no token.
fn open(route: &routes::Route) -> bool {
    route.path == "/health"
        || route.path.starts_with("/health/")
        || route.path == routes::METRICS.path
        || route.path == routes::OPENAPI.path
}

/// `POST /orchestrator/tasks/{task_id}/cancel` → `postOrchestratorTasksTaskIdCancel`.
fn operation_id(route: &routes::Route) -> String {
    let mut id = route.method.as_str().to_ascii_lowercase();
    for word in route
        .path
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            id.push(first.to_ascii_uppercase());
            id.extend(chars);
        }
    }
    id
}

/// The statuses a refusal can have, each with the codes answered with it.
fn error_statuses() -> std::collections::BTreeMap<u16, Vec<&'static str>> {
    let mut by_status = std::collections::BTreeMap::<u16, Vec<&'static str>>::new();
    for code in Code::ALL {
        by_status
            .entry(code.status())
            .or_default()
            .push(code.as_str());
    }
    by_status
}

/// What one operation takes and answers, beyond what every operation shares.
struct Operation {
    /// The request body's component name (under `#/components/schemas`), for a JSON body.
    body: Option<&'static str>,
    /// Query parameters: name, schema, description.
    query: Vec<(&'static str, Value, &'static str)>,
    /// Success answers: status, media type, schema.
    answers: Vec<(u16, &'static str, Value)>,
}

const JSON: &str = "application/json";

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// An answer body: `{success: true, ...}` with `members` required.
fn success(members: &[&str], properties: Value) -> Value {
    let mut required = vec!["success"];
    required.extend_from_slice(members);
    let mut properties = properties;
    properties["success"] = json!({"const": true});
    json!({"type": "object", "required": required, "properties": properties})
}

/// Where an admitted write was stored: the members every 200 of an agent call carries.
fn stored_at(id: &str, extra: Value) -> Value {
    let mut properties = json!({
        "stream": {"type": "string"},
        "seq": {"type": "integer", "minimum": 1},
        "duplicate": {"type": "boolean", "description": "The dedupe id was seen within the window: stored once."},
        "message": {"type": "string"},
        "trace_id": {"type": "string"},
    });
    properties[id] = json!({"type": "string", "minLength": 1});
    if let Value::Object(extra) = extra {
        for (key, value) in extra {
            properties[key] = value;
        }
    }
    success(&[id, "stream", "seq", "duplicate"], properties)
}

fn list_of(member: &str) -> Value {
    let mut properties = json!({"count": {"type": "integer", "minimum": 0}});
    properties[member] = json!({"type": "array", "items": {"type": "object"}});
    success(&[member], properties)
}

fn task_answer() -> Value {
    success(
        &["task_id", "status"],
        json!({
            "task_id": {"type": "string", "pattern": bodies::id_pattern()},
            "status": {"type": "string"},
        }),
    )
}

fn health() -> Value {
    json!({
        "type": "object",
        "required": ["status", "timestamp", "uptime", "agents", "orchestrator"],
        "properties": {
            "status": {"enum": ["healthy", "degraded"]},
            "timestamp": {"type": "string", "format": "date-time"},
            "uptime": {"type": "number", "minimum": 0},
            "agents": {"type": "object", "required": ["total", "online", "offline"]},
            "orchestrator": {"type": "object"},
        }
    })
}

fn text(media: &'static str) -> Vec<(u16, &'static str, Value)> {
    vec![(200, media, json!({"type": "string"}))]
}

/// A stream of Server-Sent Events: each event's `id` (a stream sequence), `event` and `data`
/// (JSON text).
fn events() -> Vec<(u16, &'static str, Value)> {
    vec![(
        200,
        "text/event-stream",
        json!({
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "event": {"type": "string"},
                "data": {"type": "string"},
            }
        }),
    )]
}

fn task_filters() -> Vec<(&'static str, Value, &'static str)> {
    let states: Vec<&str> = crate::tasks::TaskStatus::ALL
        .iter()
        .map(|s| s.as_str())
        .collect();
    vec![
        (
            "status",
            json!({"enum": states}),
            "Only tasks in this state.",
        ),
        (
            "capability",
            json!({"type": "string"}),
            "Only tasks for this capability.",
        ),
        (
            "tenant",
            json!({"type": "string"}),
            "Only this tenant's tasks.",
        ),
        (
            "limit",
            json!({"type": "integer", "minimum": 1, "maximum": crate::tasks::api::MAX_PAGE, "default": 100}),
            "Most tasks in the page.",
        ),
        (
            "cursor",
            json!({"type": "string"}),
            "The next_cursor of the page before.",
        ),
    ]
}

fn stream_filters() -> Vec<(&'static str, Value, &'static str)> {
    vec![
        (
            "type",
            json!({"type": "array", "maxItems": crate::streams::MAX_PATTERNS, "items": {"type": "string", "minLength": 1}}),
            "Event types, exact or NATS-style `*`/`>` over dot-separated tokens (repeatable).",
        ),
        (
            "source",
            json!({"type": "string"}),
            "Only events of this source.",
        ),
        (
            "from_seq",
            json!({"type": "integer", "minimum": 1}),
            "Replay from this stream sequence.",
        ),
        (
            "since",
            json!({"type": "string", "format": "date-time"}),
            "Replay from this time (RFC 3339).",
        ),
    ]
}

/// The request and answers of `route`.
fn operation(route: &routes::Route) -> Operation {
    use routes::*;
    let key = (route.method.clone(), route.path);
    let is = |r: &Route| key == (r.method.clone(), r.path);
    let mut op = Operation {
        body: None,
        query: Vec::new(),
        answers: vec![(200, JSON, success(&[], json!({})))],
    };
    if is(&REGISTER) {
        op.body = Some("Register");
        op.answers = vec![(200, JSON, stored_at("agent_id", json!({})))];
    } else if is(&HEARTBEAT) {
        op.body = Some("Heartbeat");
        op.answers = vec![(
            200,
            JSON,
            stored_at(
                "agent_id",
                json!({"timestamp": {"type": "string", "format": "date-time"}}),
            ),
        )];
    } else if is(&TASK_CALLBACK) {
        op.body = Some("TaskCallback");
        op.answers = vec![(
            200,
            JSON,
            success(&["task_id"], json!({"task_id": {"type": "string"}})),
        )];
    } else if is(&EVENTS) {
        op.body = Some("Event");
        op.answers = vec![(200, JSON, stored_at("event_id", json!({})))];
    } else if is(&TASK_SUBMIT) {
        op.body = Some("TaskSubmit");
        op.answers = vec![(
            202,
            JSON,
            stored_at("task_id", json!({"status": {"const": "queued"}})),
        )];
    } else if is(&TASK_CLAIM) {
        op.body = Some("TaskClaim");
        op.answers = vec![(200, JSON, list_of("tasks"))];
    } else if is(&SILENCE_CREATE) {
        op.body = Some("Silence");
        op.answers = vec![(
            200,
            JSON,
            success(&["silence"], json!({"silence": {"type": "object"}})),
        )];
    } else if is(&TASK_STATUS) || is(&TASK_CANCEL) || is(&DLQ_REPLAY) {
        op.answers = vec![(200, JSON, task_answer())];
    } else if is(&TASK_LIST) || is(&DLQ) {
        op.query = task_filters();
        op.answers = vec![(200, JSON, list_of("tasks"))];
    } else if is(&AGENTS) {
        op.answers = vec![(200, JSON, list_of("agents"))];
    } else if is(&SILENCES) {
        op.answers = vec![(200, JSON, list_of("silences"))];
    } else if is(&AUDIT) {
        op.query = vec![
            (
                "kind",
                json!({"enum": ["admin", "credential"]}),
                "Only entries of this kind.",
            ),
            (
                "actor",
                json!({"type": "string"}),
                "Only this actor's entries.",
            ),
            ("action", json!({"type": "string"}), "Only this action."),
            (
                "code",
                json!({"type": "string"}),
                "Only refusals with this code.",
            ),
            (
                "limit",
                json!({"type": "integer", "minimum": 1, "maximum": super::audit::MAX_LIMIT, "default": 100}),
                "Most entries in the page.",
            ),
            (
                "cursor",
                json!({"type": "integer", "minimum": 0}),
                "The next_cursor of the page before.",
            ),
        ];
        op.answers = vec![(200, JSON, list_of("records"))];
    } else if is(&EVENTS_STREAM) {
        op.query = stream_filters();
        op.answers = events();
    } else if is(&TASK_STREAM) || is(&AGENTS_STREAM) || is(&ALERTS_STREAM) || is(&AUDIT_STREAM) {
        op.answers = events();
    } else if is(&HEALTH) {
        op.answers = vec![(200, JSON, health()), (503, JSON, health())];
    } else if is(&HEALTH_LIVE) {
        op.answers = vec![(
            200,
            JSON,
            json!({"type": "object", "required": ["status"], "properties": {"status": {"const": "live"}}}),
        )];
    } else if is(&HEALTH_READY) {
        let ready = json!({"type": "object", "required": ["status"], "properties": {"status": {"enum": ["ready", "not_ready"]}}});
        op.answers = vec![(200, JSON, ready.clone()), (503, JSON, ready)];
    } else if is(&METRICS) {
        op.answers = text("text/plain");
    } else if is(&OPENAPI) {
        op.answers = vec![(
            200,
            JSON,
            json!({"type": "object", "required": ["openapi", "paths"]}),
        )];
    } else if is(&CONSOLE) {
        op.answers = text("text/html");
    } else if is(&CONSOLE_SCRIPT) {
        op.answers = text("text/javascript");
    } else if is(&CONSOLE_STYLE) {
        op.answers = text("text/css");
    }
    op
}

/// `POST /orchestrator/silences`, from the parser's constants (`admin::create_silence`).
fn silence() -> Value {
    use super::admin::{MAX_COMMENT_BYTES, MAX_LABEL_BYTES, MAX_MATCHERS};
    json!({
        "type": "object",
        "description": "A silence: alerts whose labels equal every matcher are not notified until it ends.",
        "required": ["matchers", "duration"],
        "properties": {
            "matchers": {
                "type": "object",
                "minProperties": 1,
                "maxProperties": MAX_MATCHERS,
                "propertyNames": {"minLength": 1, "maxLength": MAX_LABEL_BYTES},
                "additionalProperties": {"type": "string", "maxLength": MAX_LABEL_BYTES},
                "description": format!("1 to {MAX_MATCHERS} label: value pairs; names and values of at most {MAX_LABEL_BYTES} bytes."),
            },
            "duration": {
                "type": "string", "minLength": 1, "maxLength": 64, "pattern": bodies::DURATION_PATTERN,
                "examples": ["30m", "2h"], "description": "How long it lasts from now.",
            },
            "comment": {
                "anyOf": [{"type": "string", "maxLength": MAX_COMMENT_BYTES}, {"type": "null"}],
                "description": format!("At most {MAX_COMMENT_BYTES} bytes."),
            },
        }
    })
}

fn content(media: &str, schema: Value) -> Value {
    let mut content = Map::new();
    content.insert(media.to_owned(), json!({"schema": schema}));
    Value::Object(content)
}

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for route in routes::ALL.iter() {
        let op = operation(route);
        let mut parameters: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| {
                // A task id is an id (`domain::TaskId`); alert and silence ids are 16 lowercase
                // hex digits (`alerting::store::valid_id`).
                let schema = match name {
                    "task_id" => json!({"type": "string", "pattern": bodies::id_pattern()}),
                    _ => json!({"type": "string", "pattern": "^[0-9a-f]{16}$"}),
                };
                json!({"name": name, "in": "path", "required": true, "schema": schema})
            })
            .collect();
        for (name, schema, description) in op.query {
            let mut parameter = json!({
                "name": name, "in": "query", "required": false,
                "schema": schema, "description": description,
            });
            if parameter["schema"]["type"] == "array" {
                parameter["explode"] = json!(true);
            }
            parameters.push(parameter);
        }
        let mut responses = Map::new();
        for (status, codes) in error_statuses() {
            responses.insert(
                status.to_string(),
                json!({
                    "description": format!("Refused: {}", codes.join(", ")),
                    "content": content(JSON, schema_ref("Error")),
                }),
            );
        }
        for (status, media, schema) in op.answers {
            let entry = responses
                .entry(status.to_string())
                .or_insert_with(|| json!({"description": "Success", "content": {}}));
            if status >= 400 {
                // The route answers this status with its own body as well as the envelope.
                entry["description"] = json!(format!(
                    "{}; or this route's own answer",
                    entry["description"].as_str().unwrap_or("")
                ));
                let error = entry["content"][JSON]["schema"].take();
                entry["content"][media] = json!({"schema": {"anyOf": [schema, error]}});
            } else {
                entry["content"][media] = json!({"schema": schema});
            }
        }
        let mut operation = json!({
            "operationId": operation_id(route),
            "responses": responses,
        });
        if !parameters.is_empty() {
            operation["parameters"] = parameters.into();
        }
        if open(route) {
            operation["security"] = json!([]);
        }
        if let Some(body) = op.body {
            operation["requestBody"] = json!({
                "required": true,
                "content": content(JSON, schema_ref(body)),
            });
        }
        let item = paths
            .entry(route.path.to_owned())
            .or_insert_with(|| json!({}));
        item[route.method.as_str().to_ascii_lowercase()] = operation;
    }
    let codes: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
    let mut schemas = bodies::all();
    schemas.insert("Silence".into(), silence());
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["success", "error"],
            "properties": {
                "success": {"const": false},
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"enum": codes},
                        "message": {"type": "string"},
                        "details": {}
                    }
                }
            }
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "auto-com-center",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The HTTP door of the message-bus bridge. Generated from the route table, the parsers' constants and the stored messages' schemas (subjects/schemas/)."
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "schemas": schemas,
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn operation_ids_are_unique_and_readable() {
        let ids: Vec<String> = super::routes::ALL.iter().map(super::operation_id).collect();
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "{ids:?}");
        assert!(ids.contains(&"postOrchestratorTasksTaskIdCancel".to_owned()));
    }
}
