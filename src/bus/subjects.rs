//! The only place subject, stream, bucket and consumer names exist. `subjects/catalog.json` at the
//! repository root describes the same names for people and tools; a test keeps the two equal.

use crate::domain::{AgentId, TaskId};

/// Stream of registrations, heartbeats and status transitions.
pub const AGENTS_STREAM: &str = "ACC_AGENTS";
/// Stream of task results; the last message per task subject is the task's current state.
pub const TASKS_STREAM: &str = "ACC_TASKS";
/// Stream of agent events.
pub const EVENTS_STREAM: &str = "ACC_EVENTS";
/// Stream of messages a worker gave up on, with the reason in headers.
pub const DEAD_LETTER_STREAM: &str = "ACC_DEAD_LETTER";

/// KV bucket holding one [`crate::domain::AgentRecord`] per agent.
pub const AGENTS_BUCKET: &str = "acc_agents";

/// Durable consumer of the registry worker on [`AGENTS_STREAM`].
pub const REGISTRY_CONSUMER: &str = "registry";

pub const REGISTRATIONS: &str = "acc.agents.registered.*";
pub const HEARTBEATS: &str = "acc.agents.heartbeat.*";
pub const STATUS_CHANGES: &str = "acc.agents.status.*";
pub const TASK_RESULTS: &str = "acc.tasks.result.*";
pub const EVENTS: &str = "acc.events.*";
pub const DEAD_LETTERS: &str = "acc.dead_letter.>";

/// Header carrying the reason a message was dead-lettered.
pub const DEAD_LETTER_REASON: &str = "Acc-Dead-Letter-Reason";
/// Header carrying the subject a dead letter was first published on.
pub const DEAD_LETTER_SUBJECT: &str = "Acc-Dead-Letter-Subject";
/// Header carrying the stream sequence a dead letter had in its first stream.
pub const DEAD_LETTER_SEQUENCE: &str = "Acc-Dead-Letter-Sequence";

pub fn registration(agent: &AgentId) -> String {
    format!("acc.agents.registered.{agent}")
}

pub fn heartbeat(agent: &AgentId) -> String {
    format!("acc.agents.heartbeat.{agent}")
}

pub fn status_change(agent: &AgentId) -> String {
    format!("acc.agents.status.{agent}")
}

pub fn task_result(task: &TaskId) -> String {
    format!("acc.tasks.result.{task}")
}

pub fn event(agent: &AgentId) -> String {
    format!("acc.events.{agent}")
}

pub fn dead_letter(stream: &str, consumer: &str) -> String {
    format!("acc.dead_letter.{stream}.{consumer}")
}

/// One row of the catalog: a subject pattern, the stream that stores it, and its JSON Schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubjectSpec {
    pub subject: &'static str,
    pub stream: &'static str,
    /// File name under `subjects/schemas/`; `None` when the payload is opaque (dead letters
    /// carry the original bytes).
    pub schema: Option<&'static str>,
}

/// Every subject the bridge publishes, with its stream.
pub const CATALOG: &[SubjectSpec] = &[
    SubjectSpec {
        subject: REGISTRATIONS,
        stream: AGENTS_STREAM,
        schema: Some("registration.json"),
    },
    SubjectSpec {
        subject: HEARTBEATS,
        stream: AGENTS_STREAM,
        schema: Some("heartbeat.json"),
    },
    SubjectSpec {
        subject: STATUS_CHANGES,
        stream: AGENTS_STREAM,
        schema: Some("status_change.json"),
    },
    SubjectSpec {
        subject: TASK_RESULTS,
        stream: TASKS_STREAM,
        schema: Some("task_result.json"),
    },
    SubjectSpec {
        subject: EVENTS,
        stream: EVENTS_STREAM,
        schema: Some("event.json"),
    },
    SubjectSpec {
        subject: DEAD_LETTERS,
        stream: DEAD_LETTER_STREAM,
        schema: None,
    },
];

/// The subjects a stream stores, taken from [`CATALOG`].
pub fn subjects_of(stream: &str) -> Vec<String> {
    CATALOG
        .iter()
        .filter(|spec| spec.stream == stream)
        .map(|spec| spec.subject.to_owned())
        .collect()
}
