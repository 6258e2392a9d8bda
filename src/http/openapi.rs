//! `GET /openapi.json`: an OpenAPI 3.1 document built from the route table ([`routes::ALL`])
//! and the refusal codes ([`Code::ALL`]), so a new route or code appears in it without editing
//! this file. The same document is committed as `docs/openapi.json`; a test fails when the two
//! disagree (regenerate with `UPDATE_OPENAPI=1 cargo nextest run -E 'test(/^openapi::/)'`).
//!
//! What it states today: every path and method, its path parameters, which routes need a
//! bearer token, and the error envelope every refusal uses (with every code, and the status each
//! code is answered with). Request and success bodies are described in docs/api.md.

use axum::Json;
use axum::Router;
use axum::routing::get;
use serde_json::{Map, Value, json};

use super::{AppState, routes};
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

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for route in routes::ALL.iter() {
        let parameters: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| {
                json!({
                    "name": name, "in": "path", "required": true,
                    "schema": {"type": "string", "minLength": 1}
                })
            })
            .collect();
        let mut responses = Map::new();
        responses.insert(
            "2XX".into(),
            json!({"description": "Success; the body is described in docs/api.md."}),
        );
        for (status, codes) in error_statuses() {
            responses.insert(
                status.to_string(),
                json!({
                    "description": format!("Refused: {}", codes.join(", ")),
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
                }),
            );
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
        if route.method == axum::http::Method::POST {
            operation["requestBody"] = json!({
                "required": false,
                "content": {"application/json": {"schema": {}}}
            });
        }
        let item = paths
            .entry(route.path.to_owned())
            .or_insert_with(|| json!({}));
        item[route.method.as_str().to_ascii_lowercase()] = operation;
    }
    let codes: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "auto-com-center",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The HTTP door of the message-bus bridge. Generated from the route table."
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "schemas": {
                "Error": {
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
                }
            }
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
