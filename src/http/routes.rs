//! The route table, once: every route the HTTP door serves, its path as axum matches it, the
//! endpoint whose figures it feeds, and the scope a caller needs ([`Access`]). The routers take
//! their paths from here; span names, figures and scopes are looked up here (the scope by the
//! `Authenticated` extractor, on every request, cached token or not). docs/api.md's table of
//! scopes is checked against this one.

use std::sync::LazyLock;

use axum::http::Method;

use crate::auth::{
    ADMIN_READ_SCOPE, ADMIN_SCOPE, Caller, EVENTS_READ_SCOPE, EVENTS_SCOPE, REGISTER_SCOPE,
    SUBMIT_SCOPE, TASK_SCOPE,
};
use crate::stats::Endpoint;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a token (health, metrics).
    Public,
    /// A caller holding one of these scopes; [`ADMIN_SCOPE`] includes every scope. A refusal
    /// names the first.
    AnyOf(&'static [&'static str]),
}

impl Access {
    /// The scope `caller` lacks for this route, if it lacks one.
    pub fn missing(self, caller: &Caller) -> Option<&'static str> {
        match self {
            Access::Public => None,
            Access::AnyOf(scopes) => caller.lacks_all(scopes),
        }
    }
}

/// One method on one path.
#[derive(Debug, Clone)]
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    /// The endpoint whose latency and error figures this route feeds, if any.
    pub endpoint: Option<Endpoint>,
    /// The scope a caller needs. A route that does not say needs [`ADMIN_SCOPE`] (fail closed).
    pub access: Access,
}

const fn route(method: Method, path: &'static str, endpoint: Option<Endpoint>) -> Route {
    Route {
        method,
        path,
        endpoint,
        access: Access::AnyOf(&[ADMIN_SCOPE]),
    }
}

impl Route {
    /// The route needs one of `scopes`.
    const fn needs(mut self, scopes: &'static [&'static str]) -> Route {
        self.access = Access::AnyOf(scopes);
        self
    }

    /// The route needs no token.
    const fn public(mut self) -> Route {
        self.access = Access::Public;
        self
    }

    /// An operator read: [`ADMIN_READ_SCOPE`] (or [`ADMIN_SCOPE`]).
    const fn admin_read(self) -> Route {
        self.needs(&[ADMIN_READ_SCOPE])
    }
}

pub const REGISTER: Route = route(
    Method::POST,
    "/orchestrator/register",
    Some(Endpoint::Register),
)
.needs(&[REGISTER_SCOPE]);
pub const HEARTBEAT: Route = route(
    Method::POST,
    "/orchestrator/heartbeat",
    Some(Endpoint::Heartbeat),
)
.needs(&[REGISTER_SCOPE]);
pub const TASK_CALLBACK: Route = route(
    Method::POST,
    "/orchestrator/tasks/{task_id}/callback",
    Some(Endpoint::TaskCallback),
)
.needs(&[TASK_SCOPE]);
pub const TASK_STATUS: Route = route(
    Method::GET,
    "/orchestrator/tasks/{task_id}",
    Some(Endpoint::TaskStatus),
)
.needs(&[TASK_SCOPE, SUBMIT_SCOPE, ADMIN_READ_SCOPE]);
pub const TASK_SUBMIT: Route =
    route(Method::POST, "/orchestrator/tasks", None).needs(&[SUBMIT_SCOPE]);
pub const TASK_LIST: Route =
    route(Method::GET, "/orchestrator/tasks", None).needs(&[SUBMIT_SCOPE, ADMIN_READ_SCOPE]);
pub const TASK_CLAIM: Route =
    route(Method::POST, "/orchestrator/tasks/claim", None).needs(&[TASK_SCOPE]);
pub const TASK_CANCEL: Route = route(Method::POST, "/orchestrator/tasks/{task_id}/cancel", None)
    .needs(&[SUBMIT_SCOPE, ADMIN_SCOPE]);
pub const DLQ: Route = route(Method::GET, "/orchestrator/dlq", None).admin_read();
pub const DLQ_REPLAY: Route = route(Method::POST, "/orchestrator/dlq/{task_id}/replay", None);
pub const EVENTS: Route =
    route(Method::POST, "/orchestrator/events", Some(Endpoint::Events)).needs(&[EVENTS_SCOPE]);
pub const AGENTS: Route =
    route(Method::GET, "/orchestrator/agents", Some(Endpoint::Agents)).admin_read();
pub const EVENTS_STREAM: Route =
    route(Method::GET, "/orchestrator/events/stream", None).needs(&[EVENTS_READ_SCOPE]);
pub const TASK_STREAM: Route = route(Method::GET, "/orchestrator/tasks/{task_id}/stream", None)
    .needs(&[TASK_SCOPE, SUBMIT_SCOPE, ADMIN_READ_SCOPE]);
pub const AGENTS_STREAM: Route =
    route(Method::GET, "/orchestrator/agents/stream", None).admin_read();
pub const ALERTS_STREAM: Route =
    route(Method::GET, "/orchestrator/alerts/stream", None).admin_read();
pub const AUDIT: Route = route(Method::GET, "/orchestrator/audit", None).admin_read();
pub const AUDIT_STREAM: Route = route(Method::GET, "/orchestrator/audit/stream", None).admin_read();
pub const HEALTH: Route = route(Method::GET, "/health", None).public();
pub const HEALTH_LIVE: Route = route(Method::GET, "/health/live", None).public();
pub const HEALTH_READY: Route = route(Method::GET, "/health/ready", None).public();
pub const METRICS: Route = route(Method::GET, "/metrics", None).public();
pub const OPENAPI: Route = route(Method::GET, "/openapi.json", None).public();
pub const ALERTS: Route = route(Method::GET, "/orchestrator/alerts", None).admin_read();
pub const ALERT_ACK: Route = route(Method::POST, "/orchestrator/alerts/{id}/ack", None);
pub const SILENCES: Route = route(Method::GET, "/orchestrator/silences", None).admin_read();
pub const SILENCE_CREATE: Route = route(Method::POST, "/orchestrator/silences", None);
pub const SILENCE_EXPIRE: Route = route(Method::DELETE, "/orchestrator/silences/{id}", None);
pub const CONSOLE: Route = route(Method::GET, "/console", None).public();
pub const CONSOLE_SCRIPT: Route = route(Method::GET, "/console/app.js", None).public();
pub const CONSOLE_STYLE: Route = route(Method::GET, "/console/app.css", None).public();

/// Every route, for lookups.
pub static ALL: [Route; 31] = [
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

/// The scope a matched route needs; a route not in the table needs [`ADMIN_SCOPE`].
pub fn access_of(method: &Method, path: &str) -> Access {
    find(method, path).map_or(Access::AnyOf(&[ADMIN_SCOPE]), |(route, _)| route.access)
}

/// The endpoint whose figures a matched path feeds, whatever the method.
pub fn endpoint_of(path: &str) -> Option<Endpoint> {
    ALL.iter().find(|r| r.path == path).and_then(|r| r.endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scopes cell of docs/api.md's Scopes table for `route`, as written.
    fn documented(docs: &str, route: &Route) -> Option<String> {
        let start = format!("| `{} {}` | ", route.method, route.path);
        docs.lines()
            .find_map(|line| line.strip_prefix(start.as_str()))
            .map(|rest| rest.trim_end_matches('|').trim().to_owned())
    }

    #[test]
    fn the_api_docs_scope_table_matches_the_route_table() {
        let api = include_str!("../../docs/api.md");
        let docs = &api[api
            .find("\n## Scopes")
            .expect("docs/api.md has a Scopes section")..];
        for route in ALL.iter() {
            let want = match route.access {
                Access::Public => "none (no token)".to_owned(),
                Access::AnyOf(scopes) => scopes
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            assert_eq!(
                documented(docs, route).as_deref(),
                Some(want.as_str()),
                "docs/api.md, Scopes: {} {}",
                route.method,
                route.path
            );
        }
    }

    #[test]
    fn admin_reads_take_the_read_scope_and_admin_writes_the_admin_scope() {
        for route in ALL.iter() {
            let Access::AnyOf(scopes) = route.access else {
                continue;
            };
            if scopes.contains(&ADMIN_READ_SCOPE) {
                assert_eq!(route.method, Method::GET, "{}", route.path);
            }
            if scopes == [ADMIN_SCOPE] {
                assert_ne!(route.method, Method::GET, "{}", route.path);
            }
        }
    }

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
