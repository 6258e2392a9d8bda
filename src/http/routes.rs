//! The route table, once: every route the HTTP door serves, its path as axum matches it, and
//! the endpoint whose figures it feeds. The routers take their paths from here; span names and
//! figures are looked up here.

use std::sync::LazyLock;

use axum::http::Method;

use crate::stats::Endpoint;

/// One method on one path.
#[derive(Debug, Clone)]
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    /// The endpoint whose latency and error figures this route feeds, if any.
    pub endpoint: Option<Endpoint>,
}

const fn route(method: Method, path: &'static str, endpoint: Option<Endpoint>) -> Route {
    Route {
        method,
        path,
        endpoint,
    }
}

pub const REGISTER: Route = route(
    Method::POST,
    "/orchestrator/register",
    Some(Endpoint::Register),
);
pub const HEARTBEAT: Route = route(
    Method::POST,
    "/orchestrator/heartbeat",
    Some(Endpoint::Heartbeat),
);
pub const TASK_CALLBACK: Route = route(
    Method::POST,
    "/orchestrator/tasks/{task_id}/callback",
    Some(Endpoint::TaskCallback),
);
pub const TASK_STATUS: Route = route(
    Method::GET,
    "/orchestrator/tasks/{task_id}",
    Some(Endpoint::TaskStatus),
);
pub const TASK_SUBMIT: Route = route(Method::POST, "/orchestrator/tasks", None);
pub const TASK_LIST: Route = route(Method::GET, "/orchestrator/tasks", None);
pub const TASK_CLAIM: Route = route(Method::POST, "/orchestrator/tasks/claim", None);
pub const TASK_CANCEL: Route = route(Method::POST, "/orchestrator/tasks/{task_id}/cancel", None);
pub const DLQ: Route = route(Method::GET, "/orchestrator/dlq", None);
pub const DLQ_REPLAY: Route = route(Method::POST, "/orchestrator/dlq/{task_id}/replay", None);
pub const EVENTS: Route = route(Method::POST, "/orchestrator/events", Some(Endpoint::Events));
pub const AGENTS: Route = route(Method::GET, "/orchestrator/agents", Some(Endpoint::Agents));
pub const EVENTS_STREAM: Route = route(Method::GET, "/orchestrator/events/stream", None);
pub const TASK_STREAM: Route = route(Method::GET, "/orchestrator/tasks/{task_id}/stream", None);
pub const AGENTS_STREAM: Route = route(Method::GET, "/orchestrator/agents/stream", None);
pub const ALERTS_STREAM: Route = route(Method::GET, "/orchestrator/alerts/stream", None);
pub const AUDIT: Route = route(Method::GET, "/orchestrator/audit", None);
pub const AUDIT_STREAM: Route = route(Method::GET, "/orchestrator/audit/stream", None);
pub const HEALTH: Route = route(Method::GET, "/health", None);
pub const HEALTH_LIVE: Route = route(Method::GET, "/health/live", None);
pub const HEALTH_READY: Route = route(Method::GET, "/health/ready", None);
pub const METRICS: Route = route(Method::GET, "/metrics", None);
pub const OPENAPI: Route = route(Method::GET, "/openapi.json", None);
pub const ALERTS: Route = route(Method::GET, "/orchestrator/alerts", None);
pub const ALERT_ACK: Route = route(Method::POST, "/orchestrator/alerts/{id}/ack", None);
pub const SILENCES: Route = route(Method::GET, "/orchestrator/silences", None);
pub const SILENCE_CREATE: Route = route(Method::POST, "/orchestrator/silences", None);
pub const SILENCE_EXPIRE: Route = route(Method::DELETE, "/orchestrator/silences/{id}", None);
pub const CONSOLE: Route = route(Method::GET, "/console", None);
pub const CONSOLE_SLASH: Route = route(Method::GET, "/console/", None);
pub const CONSOLE_SCRIPT: Route = route(Method::GET, "/console/app.js", None);
pub const CONSOLE_STYLE: Route = route(Method::GET, "/console/app.css", None);

/// Every route, for lookups.
pub static ALL: [Route; 32] = [
    REGISTER,
    HEARTBEAT,
    TASK_CALLBACK,
    TASK_STATUS,
    TASK_SUBMIT,
    TASK_LIST,
    TASK_CLAIM,
    TASK_CANCEL,
    DLQ,
    DLQ_REPLAY,
    EVENTS,
    EVENTS_STREAM,
    AGENTS_STREAM,
    ALERTS_STREAM,
    AUDIT,
    AUDIT_STREAM,
    AGENTS,
    HEALTH,
    HEALTH_LIVE,
    HEALTH_READY,
    METRICS,
    OPENAPI,
    ALERTS,
    ALERT_ACK,
    SILENCES,
    SILENCE_CREATE,
    SILENCE_EXPIRE,
    CONSOLE,
    CONSOLE_SLASH,
    CONSOLE_SCRIPT,
    CONSOLE_STYLE,
    TASK_STREAM,
];

/// `"POST /orchestrator/register"` and so on, built once, parallel to [`ALL`].
static SPAN_NAMES: LazyLock<Vec<String>> = LazyLock::new(|| {
    ALL.iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
});

/// The route a request matched, by method and matched path.
pub fn find(method: &Method, path: &str) -> Option<(&'static Route, &'static str)> {
    let index = ALL
        .iter()
        .position(|r| r.method == method && r.path == path)?;
    Some((&ALL[index], SPAN_NAMES[index].as_str()))
}

/// The endpoint whose figures a matched path feeds, whatever the method.
pub fn endpoint_of(path: &str) -> Option<Endpoint> {
    ALL.iter().find(|r| r.path == path).and_then(|r| r.endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_listed_once_and_finds_its_span_name() {
        for (i, a) in ALL.iter().enumerate() {
            for b in &ALL[i + 1..] {
                assert!(
                    a.method != b.method || a.path != b.path,
                    "{} {} twice",
                    a.method,
                    a.path
                );
            }
            let (found, name) = find(&a.method, a.path).unwrap();
            assert_eq!(found.path, a.path);
            assert_eq!(name, format!("{} {}", a.method, a.path));
        }
        assert!(find(&Method::PUT, REGISTER.path).is_none());
        assert_eq!(endpoint_of(REGISTER.path), Some(Endpoint::Register));
        assert_eq!(endpoint_of(HEALTH.path), None);
    }
}
