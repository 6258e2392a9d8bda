//! Admission: the one path every agent message takes onto the bus. Given an authenticated
//! [`Caller`] and the JSON the agent sent, it validates the payload into a domain type, binds the
//! identity to the token, stamps the server-owned fields, derives a dedupe id, publishes onto the
//! verified subject and returns only once JetStream acknowledged the write.
//!
//! Both doors call it: the HTTP door (`http`) and the NATS door (`door`). What it refuses is a
//! [`Refusal`], which each door renders its own way.

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, SubsecRound as _, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use crate::auth::Caller;
use crate::bus::{Ack, PublishFailure, Publisher, expect_subject_empty, subjects};
use crate::contract::{Code, Refusal};
use crate::directory::Directory;
use crate::domain::{
    AgentId, AgentProfile, Event, FieldError, Heartbeat, Registration, RegistrationOrigin,
    ReportedStatus, TaskId, TaskResult, optional_string, required_str, required_string, rfc3339,
    take_string,
};
use crate::telemetry::current_trace_id;

pub use crate::quota::StoreQuota;

/// What the caller gets back after an admitted write.
#[derive(Debug, Clone, Serialize)]
pub struct Receipt<T> {
    pub id: T,
    pub received_at: DateTime<Utc>,
    pub ack: Ack,
}

/// The success body of an admitted call, the same from every door: `success`, what was
/// stored (`agent_id`, `task_id` or `event_id`; a heartbeat's `timestamp`), where (`stream`,
/// `seq`, `duplicate`), a `message`, and the request's `trace_id`.
///
/// A struct rather than a JSON map built per request (a map, its keys and values allocated,
/// then walked to write the answer): the fields are in alphabetical order, the order in which
/// serde_json writes a map's keys, so the answer's bytes are those of the map it replaced.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
    pub duplicate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    pub message: &'static str,
    pub seq: u64,
    pub stream: String,
    pub success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "rfc3339::serialize_option"
    )]
    pub timestamp: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl Answer {
    /// A success answer saying `message` about the stored `ack`, with the current trace id.
    fn new(message: &'static str, ack: Ack) -> Self {
        Self {
            agent_id: None,
            duplicate: ack.duplicate,
            event_id: None,
            message,
            seq: ack.seq,
            stream: ack.stream,
            success: true,
            task_id: None,
            timestamp: None,
            trace_id: current_trace_id(),
        }
    }
}

/// Longest event `type`, in bytes.
pub const MAX_TYPE_LEN: usize = 256;
/// Longest `trace_id` an agent may send, in bytes.
pub const MAX_TRACE_ID_LEN: usize = 128;
/// Longest task result `status`, in bytes.
pub const MAX_STATUS_LEN: usize = 64;
/// Longest `event_id` (and event `source`), in bytes.
pub const MAX_KEY_LEN: usize = 128;
/// Largest heartbeat `details`, as JSON: a status note, not a store.
pub const MAX_DETAILS_BYTES: usize = 4096;
/// The refusal of a task another agent reported, on a read or a report alike.
pub const FOREIGN_TASK: &str = "this task was reported by another agent";

/// One of the four agent calls, whichever door it came through.
#[derive(Debug, Clone, Copy)]
pub enum Call<'a> {
    Register,
    Heartbeat,
    /// `stored`: what [`Admission::stored_result`] read for the task, when the door read it
    /// side by side with its own look-up (whether the orchestrator queued the task); `None`
    /// reads it here.
    TaskResult {
        task_id: &'a str,
        stored: Option<&'a Result<StoredResult, Refusal>>,
    },
    Event,
}

/// The latest result the tasks stream holds for a task, as the first-report rule reads it.
#[derive(Debug, Clone)]
pub enum StoredResult {
    /// None: the task is nobody's yet.
    Nothing,
    /// One, stored at `seq`, reported by `owner` (`None`: unreadable, so nobody's to overwrite).
    Reported { owner: Option<AgentId>, seq: u64 },
}

#[derive(Clone)]
pub struct Admission {
    publisher: Publisher,
    directory: Directory,
    /// Per-agent stored bytes and messages; `None` (tests, the fuzz harness) stores without a
    /// quota.
    quota: Option<Arc<StoreQuota>>,
    /// `PUSH_ALLOWED_URLS`: a registration asking for push over HTTP must have its `base_url`
    /// under one of these.
    push_allowed: Arc<[String]>,
}

impl Admission {
    pub fn new(publisher: Publisher, directory: Directory) -> Self {
        Self {
            publisher,
            directory,
            quota: None,
            push_allowed: Arc::from(Vec::new()),
        }
    }

    /// Charges what each agent stores to `quota` (shared by both doors).
    pub fn with_quota(mut self, quota: Arc<StoreQuota>) -> Self {
        self.quota = Some(quota);
        self
    }

    /// Allows push registrations whose `base_url` starts with one of `prefixes`.
    pub fn with_push_allowed(mut self, prefixes: &[String]) -> Self {
        self.push_allowed = Arc::from(prefixes.to_vec());
        self
    }

    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Admits one call and returns the success body every door answers with: the plan's body
    /// plus where the message was stored. Takes the body, so that an event moves its fields
    /// into the stored message instead of copying them.
    pub async fn admit(
        &self,
        call: Call<'_>,
        caller: &Caller,
        body: Map<String, Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Answer, Refusal> {
        let answer = match call {
            Call::Register => {
                let receipt = self.register(caller, &body, idempotency_key).await?;
                tracing::info!(agent_id = %receipt.id, seq = receipt.ack.seq, duplicate = receipt.ack.duplicate, "agent registered");
                Answer {
                    agent_id: Some(receipt.id),
                    ..Answer::new("Agent registered successfully", receipt.ack)
                }
            }
            Call::Heartbeat => {
                let receipt = self.heartbeat(caller, &body, idempotency_key).await?;
                Answer {
                    agent_id: Some(receipt.id),
                    timestamp: Some(receipt.received_at),
                    ..Answer::new("Heartbeat received", receipt.ack)
                }
            }
            Call::TaskResult { task_id, stored } => {
                // Boxed: a report's checks and conditional writes make the largest future of
                // the four, and inline it would be moved with every call's, events included.
                let receipt =
                    Box::pin(self.task_result(caller, task_id, &body, idempotency_key, stored))
                        .await?;
                tracing::info!(task_id = %receipt.id, agent_id = %caller.agent_id, seq = receipt.ack.seq, "task result stored");
                Answer {
                    task_id: Some(receipt.id),
                    ..Answer::new("Result received", receipt.ack)
                }
            }
            Call::Event => {
                let receipt = self.event(caller, body).await?;
                Answer {
                    event_id: Some(receipt.id),
                    ..Answer::new("Event received", receipt.ack)
                }
            }
        };
        Ok(answer)
    }

    /// `register`: `{agent_id, name, base_url, capabilities[]}`.
    pub async fn register(
        &self,
        caller: &Caller,
        body: &Map<String, Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Receipt<AgentId>, Refusal> {
        let agent_id = parse_agent_id(body)?;
        let profile = AgentProfile::parse(body)?;
        bind(caller, &agent_id)?;
        if let Some(url) = profile.push_url() {
            if !crate::domain::push_allowed(&self.push_allowed, url) {
                return Err(Refusal::new(Code::PushUrlNotAllowed).with_details(
                    "dispatch \"push\" needs a base_url under one of PUSH_ALLOWED_URLS; register without it to claim tasks instead",
                ));
            }
        }
        let now = now();
        let msg_id = dedupe_id("reg", &agent_id, idempotency_key, || digest(&profile))?;
        let registration = Registration {
            agent_id: agent_id.clone(),
            profile,
            origin: RegistrationOrigin::Agent,
            received_at: now,
        };
        let ack = self
            .publish(
                &agent_id,
                subjects::registration(&agent_id),
                &msg_id,
                &registration,
            )
            .await?;
        Ok(Receipt {
            id: agent_id,
            received_at: now,
            ack,
        })
    }

    /// `heartbeat`: `{agent_id, status?: "online"|"degraded", details?}`.
    pub async fn heartbeat(
        &self,
        caller: &Caller,
        body: &Map<String, Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Receipt<AgentId>, Refusal> {
        let agent_id = match body.get("agent_id") {
            None | Some(Value::Null) => return Err(Refusal::new(Code::MissingAgentId)),
            Some(Value::String(s)) if s.is_empty() => {
                return Err(Refusal::new(Code::MissingAgentId));
            }
            Some(_) => parse_agent_id(body)?,
        };
        let status = match body.get("status") {
            None | Some(Value::Null) => ReportedStatus::Online,
            Some(Value::String(s)) if s == "online" => ReportedStatus::Online,
            Some(Value::String(s)) if s == "degraded" => ReportedStatus::Degraded,
            Some(_) => {
                return Err(FieldError::new("status", "must be \"online\" or \"degraded\"").into());
            }
        };
        let details = body.get("details").filter(|v| !v.is_null()).cloned();
        if let Some(details) = &details {
            let size = serde_json::to_vec(details).map_or(usize::MAX, |b| b.len());
            if size > MAX_DETAILS_BYTES {
                return Err(FieldError::new(
                    "details",
                    format!("is {size} bytes as JSON; at most {MAX_DETAILS_BYTES}"),
                )
                .into());
            }
        }
        bind(caller, &agent_id)?;
        if !self.directory.is_known(&agent_id).await? {
            return Err(Refusal::new(Code::AgentNotFound));
        }
        let now = now();
        let msg_id = dedupe_id("hb", &agent_id, idempotency_key, || {
            // Without a key, repeats of the same heartbeat within one second are one heartbeat;
            // a change of status or details is a new one.
            format!("{}:{}", now.timestamp(), digest(&(status, &details)))
        })?;
        let heartbeat = Heartbeat {
            agent_id: agent_id.clone(),
            status,
            details,
            received_at: now,
        };
        let ack = self
            .publish(
                &agent_id,
                subjects::heartbeat(&agent_id),
                &msg_id,
                &heartbeat,
            )
            .await?;
        Ok(Receipt {
            id: agent_id,
            received_at: now,
            ack,
        })
    }

    /// `tasks/{task_id}/callback`: `{status, result?, error?, trace_id?}`.
    pub async fn task_result(
        &self,
        caller: &Caller,
        task_id: &str,
        body: &Map<String, Value>,
        idempotency_key: Option<&str>,
        stored: Option<&Result<StoredResult, Refusal>>,
    ) -> Result<Receipt<TaskId>, Refusal> {
        let task_id =
            TaskId::parse(task_id).map_err(|reason| FieldError::new("task_id", reason))?;
        if let Some(named) = body.get("task_id").filter(|v| !v.is_null()) {
            if named.as_str() != Some(task_id.as_str()) {
                return Err(
                    FieldError::new("task_id", "differs from the task id in the path").into(),
                );
            }
        }
        if let Some(named) = body.get("agent_id").filter(|v| !v.is_null()) {
            bind(
                caller,
                &parse_agent_id(body).map_err(|_| mismatch(caller, named))?,
            )?;
        }
        let status = required_string(body, "status", MAX_STATUS_LEN)?;
        if !status
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(
                FieldError::new("status", "may contain only letters, digits, '-' and '_'").into(),
            );
        }
        let result = body.get("result").filter(|v| !v.is_null()).cloned();
        let error = body.get("error").filter(|v| !v.is_null()).cloned();
        let trace_id = optional_string(body, "trace_id", MAX_TRACE_ID_LEN)?;
        record_trace_id(trace_id.as_deref());
        let stored = match stored {
            Some(stored) => stored.clone()?,
            None => self.stored_result(task_id.as_str()).await?,
        };
        let unreported = bind_task(caller, &task_id, &stored)?;
        let now = now();
        let msg_id = dedupe_id("task", &caller.agent_id, idempotency_key, || {
            format!("{task_id}:{}", digest(&(&status, &result, &error)))
        })?;
        let record = TaskResult {
            task_id: task_id.clone(),
            status,
            result,
            error,
            trace_id,
            reported_by: caller.agent_id.clone(),
            received_at: now,
        };
        let subject = subjects::task_result(&task_id);
        // Charged before the write, as every message is: a first report that loses a race
        // (refused below after its write was) has paid for one message it did not store.
        let payload = self.charged(&caller.agent_id, &record).await?;
        let condition = unreported.then(expect_subject_empty);
        let written = self
            .publisher
            .publish(subject.clone(), &msg_id, payload.clone(), condition)
            .await;
        let ack = match written {
            // Another report was stored since the read: it binds, as if it had been read.
            Err(PublishFailure::Conflict(_)) => {
                let stored = self.stored_result(task_id.as_str()).await?;
                if bind_task(caller, &task_id, &stored)? {
                    return Err(Refusal::bus_unavailable(
                        "the task's stored result changed while this one was written",
                    ));
                }
                self.publisher
                    .publish(subject, &msg_id, payload, None)
                    .await?
            }
            written => written?,
        };
        Ok(Receipt {
            id: task_id,
            received_at: now,
            ack,
        })
    }

    /// `events`: `{event_id, type, source, data, time, trace_id?}`. `event_id` is the dedupe
    /// id, scoped to the emitting agent so one agent cannot suppress another's events.
    pub async fn event(
        &self,
        caller: &Caller,
        mut body: Map<String, Value>,
    ) -> Result<Receipt<String>, Refusal> {
        // The body is the event's own: its strings and `data` are moved into the event, not
        // copied.
        let event_id = take_string(&mut body, "event_id", MAX_KEY_LEN)?;
        if !is_visible_ascii(&event_id) {
            return Err(FieldError::new("event_id", "must be visible ASCII without spaces").into());
        }
        let kind = take_string(&mut body, "type", MAX_TYPE_LEN)?;
        let source = take_string(&mut body, "source", MAX_KEY_LEN)?;
        let source =
            AgentId::parse_owned(source).map_err(|reason| FieldError::new("source", reason))?;
        let Some(data) = body.get_mut("data").map(Value::take) else {
            return Err(FieldError::new("data", "is required").into());
        };
        let time = required_str(&body, "time", 64)?;
        let time = DateTime::parse_from_rfc3339(time)
            .map_err(|_| FieldError::new("time", "must be an RFC 3339 timestamp"))?
            .with_timezone(&Utc);
        let trace_id = optional_string(&body, "trace_id", MAX_TRACE_ID_LEN)?;
        record_trace_id(trace_id.as_deref());
        bind(caller, &source)?;
        let now = now();
        let msg_id = ["event:", caller.agent_id.as_str(), ":", &event_id].concat();
        let event = Event {
            event_id,
            kind,
            source,
            data,
            time,
            trace_id,
            emitted_by: caller.agent_id.clone(),
            received_at: now,
        };
        let ack = self
            .publish(
                &caller.agent_id,
                subjects::event(&caller.agent_id),
                &msg_id,
                &event,
            )
            .await?;
        Ok(Receipt {
            id: event.event_id,
            received_at: now,
            ack,
        })
    }

    /// The latest stored result of `task_id`, one read of the tasks stream. A door that must
    /// also ask whether the orchestrator queued the task makes both reads at once, and hands
    /// this one over in [`Call::TaskResult`]: a callback then waits for one round trip to the
    /// server before its writes, not two.
    pub async fn stored_result(&self, task_id: &str) -> Result<StoredResult, Refusal> {
        if self.publisher.client().connection_state() != async_nats::connection::State::Connected {
            return Err(Refusal::bus_unavailable("not connected"));
        }
        let task_id =
            TaskId::parse(task_id).map_err(|reason| FieldError::new("task_id", reason))?;
        let stream = self
            .publisher
            .jetstream()
            .get_stream_no_info(subjects::TASKS_STREAM)
            .await
            .map_err(Refusal::internal)?;
        let subject = subjects::task_result(&task_id);
        let lookup = stream.get_last_raw_message_by_subject(&subject);
        let message = match tokio::time::timeout(self.publisher.timeout(), lookup).await {
            Ok(Ok(message)) => message,
            Ok(Err(err)) if err.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Ok(StoredResult::Nothing);
            }
            Ok(Err(err)) => return Err(Refusal::bus_unavailable(err)),
            Err(_) => return Err(Refusal::bus_unavailable("task lookup timed out")),
        };
        let owner = serde_json::from_slice::<TaskResult>(&message.payload)
            .map(|record| record.reported_by)
            .ok();
        Ok(StoredResult::Reported {
            owner,
            seq: message.sequence,
        })
    }

    /// Stores `message` for `agent`, charged to its quota.
    async fn publish<T: Serialize>(
        &self,
        agent: &AgentId,
        subject: String,
        msg_id: &str,
        message: &T,
    ) -> Result<Ack, Refusal> {
        let payload = self.charged(agent, message).await?;
        Ok(self
            .publisher
            .publish(subject, msg_id, payload, None)
            .await?)
    }

    /// `message` encoded, once charged to `agent`'s quota.
    async fn charged<T: Serialize>(&self, agent: &AgentId, message: &T) -> Result<Bytes, Refusal> {
        let payload = Bytes::from(serde_json::to_vec(message).expect("domain types serialize"));
        if let Some(quota) = &self.quota {
            quota.charge(agent, payload.len()).await?;
        }
        Ok(payload)
    }
}

/// A task the orchestrator never queued belongs to the agent that first reported it: a report
/// from another agent is refused exactly as its read of that task is (403 `FORBIDDEN`, nothing
/// of the task in the answer) and nothing is stored, so no agent can overwrite another's
/// result. A record that cannot be read is nobody's to overwrite.
///
/// True when nothing is stored for the task yet, so this report would be its first. The first
/// report binds: it is written on the condition that the task's subject still holds nothing
/// ([`expect_subject_empty`]), which the server checks as it stores, so of agents reporting a
/// new id at the same moment, on any replicas, exactly one is stored; each of the others reads
/// the stored result again and is refused as above.
fn bind_task(caller: &Caller, task_id: &TaskId, stored: &StoredResult) -> Result<bool, Refusal> {
    let (owner, seq) = match stored {
        StoredResult::Nothing => return Ok(true),
        StoredResult::Reported { owner, seq } => (owner, *seq),
    };
    if owner.as_ref() == Some(&caller.agent_id) {
        return Ok(false);
    }
    if owner.is_none() {
        tracing::warn!(task_id = %task_id, seq, "unreadable task result; refusing to overwrite it");
    }
    Err(Refusal::new(Code::Forbidden).with_message(FOREIGN_TASK))
}

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

/// Makes the caller's own `trace_id` searchable (`acc.trace_id`) on the request's span.
fn record_trace_id(trace_id: Option<&str>) {
    if let Some(trace_id) = trace_id {
        tracing::Span::current().record("acc.trace_id", trace_id);
    }
}

fn parse_agent_id(body: &Map<String, Value>) -> Result<AgentId, FieldError> {
    let raw = required_string(body, "agent_id", MAX_KEY_LEN)?;
    AgentId::parse(&raw).map_err(|reason| FieldError::new("agent_id", reason))
}

fn mismatch(caller: &Caller, claimed: &Value) -> Refusal {
    identity_mismatch(caller, &claimed.to_string())
}

/// The token speaks for one agent; the body must not name another.
fn bind(caller: &Caller, claimed: &AgentId) -> Result<(), Refusal> {
    if &caller.agent_id == claimed {
        Ok(())
    } else {
        Err(identity_mismatch(caller, claimed.as_str()))
    }
}

/// 403 `IDENTITY_MISMATCH` naming both agents.
fn identity_mismatch(caller: &Caller, claimed: &str) -> Refusal {
    Refusal::new(Code::IdentityMismatch).with_message(format!(
        "token is for agent {:?} but the request is for {claimed:?}",
        caller.agent_id.as_str()
    ))
}

fn is_visible_ascii(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

/// The dedupe id: the client's `Idempotency-Key` when it sent one, else one derived from the
/// content so that a retry of the same request maps to the same id.
fn dedupe_id(
    kind: &str,
    agent: &AgentId,
    idempotency_key: Option<&str>,
    derive: impl FnOnce() -> String,
) -> Result<String, Refusal> {
    match idempotency_key {
        Some(key) if key.is_empty() || key.len() > MAX_KEY_LEN || !is_visible_ascii(key) => {
            Err(Refusal::new(Code::InvalidIdempotencyKey))
        }
        Some(key) => Ok(format!("{kind}:{agent}:key:{key}")),
        None => Ok(format!("{kind}:{agent}:{}", derive())),
    }
}

/// A short, stable digest of some JSON-serializable content (dedupe ids, task conflicts).
pub fn digest<T: Serialize>(content: &T) -> String {
    let bytes = serde_json::to_vec(content).expect("serializable");
    let hash = Sha256::digest(&bytes);
    hex::encode(&hash[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ack() -> Ack {
        Ack {
            stream: subjects::EVENTS_STREAM.to_owned(),
            seq: 42,
            duplicate: true,
        }
    }

    /// Byte for byte: clients (and the tests) compare answers.
    #[test]
    fn answers_are_written_as_the_json_maps_they_replaced() {
        let at = DateTime::parse_from_rfc3339("2026-12-03T08:53:46.120Z")
            .unwrap()
            .with_timezone(&Utc);
        let agent = AgentId::parse("agent-1").unwrap();
        let cases = [
            (
                Answer {
                    event_id: Some("e-1".into()),
                    ..Answer::new("Event received", ack())
                },
                json!({"success": true, "event_id": "e-1", "message": "Event received"}),
            ),
            (
                Answer {
                    agent_id: Some(agent.clone()),
                    timestamp: Some(at),
                    ..Answer::new("Heartbeat received", ack())
                },
                json!({"success": true, "message": "Heartbeat received", "timestamp": at,
                       "agent_id": agent}),
            ),
            (
                Answer {
                    task_id: Some(TaskId::parse("t-1").unwrap()),
                    ..Answer::new("Result received", ack())
                },
                json!({"success": true, "task_id": "t-1", "message": "Result received"}),
            ),
        ];
        for (mut answer, mut expected) in cases {
            for trace_id in [None, Some("4bf92f3577b34da6a3ce929d0e0e4736")] {
                answer.trace_id = trace_id.map(str::to_owned);
                expected["stream"] = subjects::EVENTS_STREAM.into();
                expected["seq"] = 42.into();
                expected["duplicate"] = true.into();
                if let Some(trace_id) = trace_id {
                    expected["trace_id"] = trace_id.into();
                }
                assert_eq!(
                    serde_json::to_string(&answer).unwrap(),
                    serde_json::to_string(&expected).unwrap()
                );
            }
        }
    }
}
