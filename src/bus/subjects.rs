//! The only place subject, stream, bucket and consumer names exist. `subjects/catalog.json` at the
//! repository root describes the same names for people and tools; a test keeps the two equal.

use crate::domain::{AgentId, TaskId};

/// Stream of registrations, heartbeats and status transitions.
pub const AGENTS_STREAM: &str = "ACC_AGENTS";
/// Stream of task results; the last message per task subject is the task's current state.
pub const TASKS_STREAM: &str = "ACC_TASKS";
/// Stream of task submissions: one message per task id for the life of the stream (at most one
/// message per subject, further ones refused), so the task id is the dedupe key.
pub const SUBMISSIONS_STREAM: &str = "ACC_TASK_SUBMISSIONS";
/// Stream of agent events.
pub const EVENTS_STREAM: &str = "ACC_EVENTS";
/// Stream of messages a worker gave up on, with the reason in headers.
pub const DEAD_LETTER_STREAM: &str = "ACC_DEAD_LETTER";
/// Stream of what agents publish on NATS, stored by the door's intake before the door admits it.
pub const INBOUND_STREAM: &str = "ACC_INBOUND";
/// Stream of inbound messages the door refused, with the reason and caller in headers.
pub const REJECTED_STREAM: &str = "ACC_REJECTED";

/// Stream of ingress window snapshots and fleet metrics (short retention).
pub const METRICS_STREAM: &str = "ACC_METRICS";
/// Stream of alert notifications, one message per notification sent.
pub const ALERTS_STREAM: &str = "ACC_ALERTS";
/// The audit trail: admin writes and refused credentials. Denies delete and purge.
pub const AUDIT_STREAM: &str = "ACC_AUDIT";

/// KV bucket holding one [`crate::domain::AgentRecord`] per agent.
pub const AGENTS_BUCKET: &str = "acc_agents";
/// KV bucket of the alerting worker: its lease, alert states, acknowledgements and silences.
pub const ALERTING_BUCKET: &str = "acc_alerting";
/// KV bucket of admission's per-agent accounting, shared by every replica: each agent's store
/// quota ([`store_quota_key`]).
pub const LIMITS_BUCKET: &str = "acc_limits";

/// The key in [`LIMITS_BUCKET`] holding what `agent` may still store (bytes and messages).
pub fn store_quota_key(agent: &AgentId) -> String {
    format!("quota.{agent}")
}

/// KV bucket of the task dispatcher: one task record per task (written only
/// by the acting dispatcher, compare-and-set on the revision) and its lease.
pub const TASKS_BUCKET: &str = "acc_tasks";
/// The dispatcher's lease key in [`TASKS_BUCKET`] (a `.` keeps it apart from every task id).
pub const DISPATCHER_LEASE_KEY: &str = "lease.dispatcher";
/// Queued tasks per tenant, as the acting dispatcher last counted them, in [`TASKS_BUCKET`]:
/// what the ingress checks `TASK_MAX_QUEUED_PER_TENANT` against.
pub const TENANT_BACKLOG_KEY: &str = "backlog.tenants";
/// The stream JetStream keeps [`TASKS_BUCKET`] in (`KV_<bucket>`), followed by the task streams.
pub const TASKS_BUCKET_STREAM: &str = "KV_acc_tasks";
/// Every task record in [`TASKS_BUCKET_STREAM`]: one token per task id, so the lease key (two
/// tokens) is not among them.
pub const TASK_RECORDS: &str = "$KV.acc_tasks.*";

/// Durable consumer of the dispatcher on [`SUBMISSIONS_STREAM`].
pub const DISPATCHER_CONSUMER: &str = "dispatcher";
/// Durable consumer of the registry worker on [`AGENTS_STREAM`].
pub const REGISTRY_CONSUMER: &str = "registry";
/// Durable consumer of the NATS door on [`INBOUND_STREAM`].
pub const DOOR_CONSUMER: &str = "door";

pub const REGISTRATIONS: &str = "acc.agents.registered.*";
pub const HEARTBEATS: &str = "acc.agents.heartbeat.*";
pub const STATUS_CHANGES: &str = "acc.agents.status.*";
pub const TASK_RESULTS: &str = "acc.tasks.result.*";
pub const EVENTS: &str = "acc.events.*";
/// `acc.tasks.submitted.<task_id>`: a submitted task, stored before its 202.
pub const TASK_SUBMISSIONS: &str = "acc.tasks.submitted.*";
/// `acc.tasks.replayed.<task_id>`: who replayed a dead-lettered task, and when.
pub const TASK_REPLAYS: &str = "acc.tasks.replayed.*";
pub const DEAD_LETTERS: &str = "acc.dead_letter.>";
/// `acc.metrics.snapshot.<instance>`: one ingress replica's window snapshot.
pub const METRIC_SNAPSHOTS: &str = "acc.metrics.snapshot.*";
/// The fleet figures the metrics worker merges.
pub const FLEET_METRICS: &str = "acc.metrics.fleet";
/// `acc.alerts.<route>`: alert notifications; the route is `warning`, `critical` or `escalation`.
pub const ALERTS: &str = "acc.alerts.*";
/// `acc.audit.admin`: an admin write; `acc.audit.credential`: a refused credential.
pub const AUDIT_ADMIN: &str = "acc.audit.admin";
pub const AUDIT_CREDENTIAL: &str = "acc.audit.credential";
/// Every audit subject.
pub const AUDIT_ALL: &str = "acc.audit.*";

/// Inbound subjects: agents publish the HTTP calls' JSON bodies here, with the JWT in an
/// `Authorization: Bearer …` header. Nothing past the door reads them except the door.
pub const INBOUND_REGISTER: &str = "acc.in.register";
pub const INBOUND_HEARTBEAT: &str = "acc.in.heartbeat";
pub const INBOUND_TASK_RESULTS: &str = "acc.in.task_result.*";
pub const INBOUND_EVENT: &str = "acc.in.event";
/// A task submission over NATS (the body of `POST /orchestrator/tasks`).
pub const INBOUND_TASK_SUBMIT: &str = "acc.in.task_submit";
/// A claim over NATS (the body of `POST /orchestrator/tasks/claim`; long-polls up to `wait`).
pub const INBOUND_TASK_CLAIM: &str = "acc.in.task_claim";
/// Every inbound subject: what agent NATS users may publish on.
pub const INBOUND_ALL: &str = "acc.in.>";
/// Prefix of `acc.in.task_result.<task_id>`.
pub const INBOUND_TASK_RESULT_PREFIX: &str = "acc.in.task_result.";
/// What [`INBOUND_STREAM`] listens on: the door's intake stores an agent's `acc.in.<rest>` on
/// `acc.inbound.<rest>`, and the stream keeps it as `acc.in.<rest>` again (a subject transform),
/// so the door reads the subject the agent published on. Agents cannot publish here: their
/// accounts import only [`INBOUND_ALL`], which the intake serves.
pub const INBOUND_CAPTURE: &str = "acc.inbound.>";

/// `acc.inbound.<rest>` for an inbound subject `acc.in.<rest>`; `None` for any other subject.
pub fn inbound_capture(subject: &str) -> Option<String> {
    let rest = subject.strip_prefix("acc.in.")?;
    (!rest.is_empty()).then(|| format!("acc.inbound.{rest}"))
}
pub const REJECTIONS: &str = "acc.rejected.*";

/// Requests to the acting dispatcher (core NATS request/reply, not stored): the ingress asks,
/// the dispatcher answers on the request's reply inbox.
pub const DISPATCH_CLAIM: &str = "acc.dispatch.claim";
pub const DISPATCH_CALLBACK: &str = "acc.dispatch.callback";
pub const DISPATCH_CANCEL: &str = "acc.dispatch.cancel";
pub const DISPATCH_REPLAY: &str = "acc.dispatch.replay";
/// Every dispatcher request subject: what the acting dispatcher subscribes to.
pub const DISPATCH_ALL: &str = "acc.dispatch.*";

/// Root of the reply namespaces: agent `X` receives the door's answers (and its own JetStream
/// acknowledgements, as its inbox prefix) under `acc.reply.X.>`, and nothing else.
pub const REPLY_ROOT: &str = "acc.reply";

/// Header naming where the door should answer an inbound message; must be inside the caller's
/// reply namespace ([`reply_namespace`]).
pub const REPLY_TO: &str = "Acc-Reply-To";
/// Header of a door answer carrying the HTTP-equivalent status.
pub const REPLY_STATUS: &str = "Acc-Status";
/// Header of an inbound message carrying the client's idempotency key (as the HTTP header).
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
/// Headers of a rejection record: the error code, HTTP-equivalent status, the reason, the
/// authenticated caller (absent when the token did not verify), and where the message came from.
pub const REJECTED_CODE: &str = "Acc-Rejected-Code";
pub const REJECTED_STATUS: &str = "Acc-Rejected-Status";
pub const REJECTED_REASON: &str = "Acc-Rejected-Reason";
pub const REJECTED_CALLER: &str = "Acc-Rejected-Caller";
pub const REJECTED_SUBJECT: &str = "Acc-Rejected-Subject";
pub const REJECTED_SEQUENCE: &str = "Acc-Rejected-Sequence";

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

pub fn task_submission(task: &TaskId) -> String {
    format!("acc.tasks.submitted.{task}")
}

/// The subject of `task`'s record in [`TASKS_BUCKET_STREAM`].
pub fn task_record(task: &TaskId) -> String {
    format!("$KV.{TASKS_BUCKET}.{task}")
}

pub fn task_replay(task: &TaskId) -> String {
    format!("acc.tasks.replayed.{task}")
}

pub fn event(agent: &AgentId) -> String {
    // Not `format!`: one per stored event.
    ["acc.events.", agent.as_str()].concat()
}

pub fn metric_snapshot(instance: &str) -> String {
    format!("acc.metrics.snapshot.{instance}")
}

/// `route` is one of `warning`, `critical`, `escalation` (fixed names, never user input).
pub fn alert(route: &str) -> String {
    format!("acc.alerts.{route}")
}

pub fn dead_letter(stream: &str, consumer: &str) -> String {
    format!("acc.dead_letter.{stream}.{consumer}")
}

/// `acc.rejected.<code>`: where a rejection with error code `code` (e.g. `INVALID_TOKEN`) is kept.
pub fn rejected(code: &str) -> String {
    format!("acc.rejected.{code}")
}

/// `acc.reply.<agent_id>`: the prefix of every subject agent `agent` may receive answers on.
pub fn reply_namespace(agent: &AgentId) -> String {
    format!("{REPLY_ROOT}.{agent}")
}

/// `acc.reply.<agent_id>.tasks.push`: where a push agent registered on the NATS door receives
/// its tasks (core NATS, inside its reply namespace).
pub fn pushed_tasks(agent: &AgentId) -> String {
    format!("{REPLY_ROOT}.{agent}.tasks.push")
}

/// `acc.reply.<agent_id>.tasks.cancel`: where such an agent is told a task it holds was
/// cancelled.
pub fn cancelled_tasks(agent: &AgentId) -> String {
    format!("{REPLY_ROOT}.{agent}.tasks.cancel")
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
        subject: TASK_SUBMISSIONS,
        stream: SUBMISSIONS_STREAM,
        schema: Some("task_submission.json"),
    },
    SubjectSpec {
        subject: TASK_REPLAYS,
        stream: TASKS_STREAM,
        schema: Some("task_replay.json"),
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
    SubjectSpec {
        subject: INBOUND_REGISTER,
        stream: INBOUND_STREAM,
        schema: None,
    },
    SubjectSpec {
        subject: INBOUND_HEARTBEAT,
        stream: INBOUND_STREAM,
        schema: None,
    },
    SubjectSpec {
        subject: INBOUND_TASK_RESULTS,
        stream: INBOUND_STREAM,
        schema: None,
    },
    SubjectSpec {
        subject: INBOUND_EVENT,
        stream: INBOUND_STREAM,
        schema: None,
    },
    SubjectSpec {
        subject: INBOUND_TASK_SUBMIT,
        stream: INBOUND_STREAM,
        schema: None,
    },
    SubjectSpec {
        subject: INBOUND_TASK_CLAIM,
        stream: INBOUND_STREAM,
        schema: None,
    },
    SubjectSpec {
        subject: REJECTIONS,
        stream: REJECTED_STREAM,
        schema: None,
    },
    SubjectSpec {
        subject: METRIC_SNAPSHOTS,
        stream: METRICS_STREAM,
        schema: Some("metrics_snapshot.json"),
    },
    SubjectSpec {
        subject: FLEET_METRICS,
        stream: METRICS_STREAM,
        schema: Some("fleet_metrics.json"),
    },
    SubjectSpec {
        subject: ALERTS,
        stream: ALERTS_STREAM,
        schema: Some("alert_notification.json"),
    },
    SubjectSpec {
        subject: AUDIT_ADMIN,
        stream: AUDIT_STREAM,
        schema: Some("audit_entry.json"),
    },
    SubjectSpec {
        subject: AUDIT_CREDENTIAL,
        stream: AUDIT_STREAM,
        schema: Some("audit_entry.json"),
    },
];

/// One request subject of the dispatcher, with the JSON Schema of the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestSpec {
    pub subject: &'static str,
    /// File name under `subjects/schemas/`.
    pub schema: &'static str,
}

/// Every request subject (core NATS, not stored), listed under `requests` in the catalog file.
pub const REQUESTS: &[RequestSpec] = &[
    RequestSpec {
        subject: DISPATCH_CLAIM,
        schema: "dispatch_claim.json",
    },
    RequestSpec {
        subject: DISPATCH_CALLBACK,
        schema: "dispatch_callback.json",
    },
    RequestSpec {
        subject: DISPATCH_CANCEL,
        schema: "dispatch_cancel.json",
    },
    RequestSpec {
        subject: DISPATCH_REPLAY,
        schema: "dispatch_replay.json",
    },
];

/// The stream that stores a concrete subject, per [`CATALOG`].
pub fn stream_of(subject: &str) -> Option<&'static str> {
    CATALOG
        .iter()
        .find(|spec| matches(spec.subject, subject))
        .map(|spec| spec.stream)
}

/// True when concrete `subject` falls under `pattern` (one of the patterns above), by NATS
/// wildcard rules: `*` is one token, a final `>` one or more. Lets a consumer of several
/// patterns tell its messages apart without spelling any subject itself.
///
/// Every publish asks it of the catalog's patterns in turn, so it compares bytes: a `.` is one
/// byte in UTF-8, and splitting bytes skips the character searcher a `str` split runs per token.
pub fn matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.as_bytes().split(|&b| b == b'.');
    for want in pattern.as_bytes().split(|&b| b == b'.') {
        match (want, tokens.next()) {
            (b">", Some(_)) => return true,
            (b"*", Some(_)) => {}
            (want, Some(got)) if want == got => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

/// The low-cardinality name of a concrete subject, for span names: the [`CATALOG`] pattern it
/// falls under without its wildcard tokens. A subject the catalog names exactly stays whole
/// (`acc.in.register`, `acc.metrics.fleet`); an id in the last token is dropped
/// (`acc.agents.registered.agent-1` → `acc.agents.registered`). A subject outside the catalog is
/// returned as it is.
pub fn family(subject: &str) -> &str {
    let Some(spec) = CATALOG.iter().find(|spec| matches(spec.subject, subject)) else {
        return subject;
    };
    // The pattern's literal prefix has the same length in the subject.
    let literal = spec
        .subject
        .split('.')
        .take_while(|token| !matches!(*token, "*" | ">"))
        .map(|token| token.len() + 1)
        .sum::<usize>();
    match literal.checked_sub(1) {
        Some(len) if len < subject.len() => &subject[..len],
        _ => subject,
    }
}

/// The subjects a stream stores, taken from [`CATALOG`].
pub fn subjects_of(stream: &str) -> Vec<String> {
    CATALOG
        .iter()
        .filter(|spec| spec.stream == stream)
        .map(|spec| spec.subject.to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{INBOUND_ALL, INBOUND_CAPTURE, family, inbound_capture, matches};

    #[test]
    fn an_inbound_subject_is_captured_under_the_streams_own_subjects() {
        for subject in ["acc.in.event", "acc.in.task_result.t-1"] {
            let captured = inbound_capture(subject).unwrap();
            assert!(matches(INBOUND_CAPTURE, &captured), "{captured}");
            assert!(!matches(INBOUND_ALL, &captured), "{captured}");
            assert_eq!(captured.replacen("acc.inbound.", "acc.in.", 1), subject);
        }
        assert_eq!(inbound_capture("acc.in."), None);
        assert_eq!(inbound_capture("acc.events.agent-1"), None);
    }

    #[test]
    fn span_names_keep_every_literal_token_and_drop_only_ids() {
        for (subject, name) in [
            ("acc.in.register", "acc.in.register"),
            ("acc.in.task_result.task-9", "acc.in.task_result"),
            ("acc.metrics.fleet", "acc.metrics.fleet"),
            ("acc.metrics.snapshot.ingress-1", "acc.metrics.snapshot"),
            ("acc.agents.registered.agent-1", "acc.agents.registered"),
            ("acc.events.agent-1", "acc.events"),
            ("acc.dead_letter.ACC_AGENTS.registry", "acc.dead_letter"),
            ("somewhere.else", "somewhere.else"),
        ] {
            assert_eq!(family(subject), name, "{subject}");
        }
    }
}
