//! Admission: the one path every agent message takes onto the bus. Given an authenticated
//! [`Caller`] and the JSON the agent sent, it validates the payload into a domain type, binds the
//! identity to the token, stamps the server-owned fields, derives a dedupe id, publishes onto the
//! verified subject and returns only once JetStream acknowledged the write.
//!
//! Both doors call it: the HTTP door (`http`) and the NATS door (`door`). What it refuses is a
//! [`Refusal`], which each door renders its own way.

use async_nats::jetstream::kv::{self, CreateErrorKind};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, SubsecRound as _, Utc};
use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};

use crate::auth::Caller;
use crate::bus::{Ack, Publisher, subjects};
use crate::contract::{Code, Refusal};
use crate::directory::Directory;
use crate::domain::{
    AgentId, AgentProfile, Event, FieldError, Heartbeat, Registration, RegistrationOrigin,
    ReportedStatus, TaskId, TaskResult, optional_string, required_string,
};
use crate::telemetry::with_trace_id;

pub use crate::quota::StoreQuota;

/// What the caller gets back after an admitted write.
#[derive(Debug, Clone, Serialize)]
pub struct Receipt<T> {
    pub id: T,
    pub received_at: DateTime<Utc>,
    pub ack: Ack,
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
    TaskResult { task_id: &'a str },
    Event,
}

#[derive(Clone)]
pub struct Admission {
    publisher: Publisher,
    directory: Directory,
    /// Per-agent stored bytes and messages; `None` (tests, the fuzz harness) stores without a
    /// quota.
    quota: Option<Arc<StoreQuota>>,
    /// The `acc_limits` bucket, where the first reporter of a task is bound to it; `None` (the
    /// fuzz harness) checks the stored result only.
    owners: Option<kv::Store>,
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
            owners: None,
            push_allowed: Arc::from(Vec::new()),
        }
    }

    /// Charges what each agent stores to `quota` (shared by both doors).
    pub fn with_quota(mut self, quota: Arc<StoreQuota>) -> Self {
        self.quota = Some(quota);
        self
    }

    /// Binds each task the orchestrator never queued to its first reporter in `owners` (the
    /// `acc_limits` bucket), atomically across replicas.
    pub fn with_task_owners(mut self, owners: kv::Store) -> Self {
        self.owners = Some(owners);
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
    /// plus where the message was stored.
    pub async fn admit(
        &self,
        call: Call<'_>,
        caller: &Caller,
        body: &Map<String, Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Value, Refusal> {
        let answer = match call {
            Call::Register => {
                let receipt = self.register(caller, body, idempotency_key).await?;
                tracing::info!(agent_id = %receipt.id, seq = receipt.ack.seq, duplicate = receipt.ack.duplicate, "agent registered");
                json!({
                    "success": true,
                    "agent_id": receipt.id,
                    "message": "Agent registered successfully",
                    "stream": receipt.ack.stream,
                    "seq": receipt.ack.seq,
                    "duplicate": receipt.ack.duplicate,
                })
            }
            Call::Heartbeat => {
                let receipt = self.heartbeat(caller, body, idempotency_key).await?;
                json!({
                    "success": true,
                    "message": "Heartbeat received",
                    "timestamp": receipt.received_at,
                    "agent_id": receipt.id,
                    "stream": receipt.ack.stream,
                    "seq": receipt.ack.seq,
                    "duplicate": receipt.ack.duplicate,
                })
            }
            Call::TaskResult { task_id } => {
                let receipt = self
                    .task_result(caller, task_id, body, idempotency_key)
                    .await?;
                tracing::info!(task_id = %receipt.id, agent_id = %caller.agent_id, seq = receipt.ack.seq, "task result stored");
                json!({
                    "success": true,
                    "task_id": receipt.id,
                    "message": "Result received",
                    "stream": receipt.ack.stream,
                    "seq": receipt.ack.seq,
                    "duplicate": receipt.ack.duplicate,
                })
            }
            Call::Event => {
                let receipt = self.event(caller, body).await?;
                json!({
                    "success": true,
                    "event_id": receipt.id,
                    "message": "Event received",
                    "stream": receipt.ack.stream,
                    "seq": receipt.ack.seq,
                    "duplicate": receipt.ack.duplicate,
                })
            }
        };
        Ok(with_trace_id(answer))
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
        self.bind_task(caller, &task_id).await?;
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
        let ack = self
            .publish(
                &caller.agent_id,
                subjects::task_result(&task_id),
                &msg_id,
                &record,
            )
            .await?;
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
        body: &Map<String, Value>,
    ) -> Result<Receipt<String>, Refusal> {
        let event_id = required_string(body, "event_id", MAX_KEY_LEN)?;
        if !is_visible_ascii(&event_id) {
            return Err(FieldError::new("event_id", "must be visible ASCII without spaces").into());
        }
        let kind = required_string(body, "type", MAX_TYPE_LEN)?;
        let source = required_string(body, "source", MAX_KEY_LEN)?;
        let source = AgentId::parse(&source).map_err(|reason| FieldError::new("source", reason))?;
        let data = match body.get("data") {
            Some(data) => data.clone(),
            None => return Err(FieldError::new("data", "is required").into()),
        };
        let time = required_string(body, "time", 64)?;
        let time = DateTime::parse_from_rfc3339(&time)
            .map_err(|_| FieldError::new("time", "must be an RFC 3339 timestamp"))?
            .with_timezone(&Utc);
        let trace_id = optional_string(body, "trace_id", MAX_TRACE_ID_LEN)?;
        record_trace_id(trace_id.as_deref());
        bind(caller, &source)?;
        let now = now();
        let msg_id = format!("event:{}:{event_id}", caller.agent_id);
        let event = Event {
            event_id: event_id.clone(),
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
            id: event_id,
            received_at: now,
            ack,
        })
    }

    /// A task the orchestrator never queued belongs to the agent that first reported it: a
    /// report from another agent is refused exactly as its read of that task is (403
    /// `FORBIDDEN`, nothing of the task in the answer) and nothing is stored, so no agent can
    /// overwrite another's result. A record that cannot be read is nobody's to overwrite.
    ///
    /// The first report binds: before a never-seen id is stored, its reporter creates the
    /// task's key in `acc_limits` ([`subjects::task_owner_key`]), which the server makes once
    /// and refuses to make again, so of agents reporting a new id at the same moment, on any
    /// replicas, exactly one is bound and every other is refused as above.
    async fn bind_task(&self, caller: &Caller, task_id: &TaskId) -> Result<(), Refusal> {
        if self.publisher.client().connection_state() != async_nats::connection::State::Connected {
            return Err(Refusal::bus_unavailable("not connected"));
        }
        let stream = self
            .publisher
            .jetstream()
            .get_stream_no_info(subjects::TASKS_STREAM)
            .await
            .map_err(Refusal::internal)?;
        let subject = subjects::task_result(task_id);
        let lookup = stream.get_last_raw_message_by_subject(&subject);
        let message = match tokio::time::timeout(self.publisher.timeout(), lookup).await {
            Ok(Ok(message)) => message,
            Ok(Err(err)) if err.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return self.bind_first(caller, task_id).await;
            }
            Ok(Err(err)) => return Err(Refusal::bus_unavailable(err)),
            Err(_) => return Err(Refusal::bus_unavailable("task lookup timed out")),
        };
        let owner = serde_json::from_slice::<TaskResult>(&message.payload)
            .map(|record| record.reported_by)
            .ok();
        if owner.as_ref() == Some(&caller.agent_id) {
            return Ok(());
        }
        if owner.is_none() {
            tracing::warn!(task_id = %task_id, seq = message.sequence, "unreadable task result; refusing to overwrite it");
        }
        Err(Refusal::new(Code::Forbidden).with_message(FOREIGN_TASK))
    }

    /// Binds a task with no stored result to `caller`, unless another agent was bound first.
    async fn bind_first(&self, caller: &Caller, task_id: &TaskId) -> Result<(), Refusal> {
        let Some(owners) = &self.owners else {
            return Ok(());
        };
        let key = subjects::task_owner_key(task_id);
        let timeout = self.publisher.timeout();
        let created = tokio::time::timeout(
            timeout,
            owners.create(&key, caller.agent_id.to_string().into()),
        )
        .await
        .map_err(|_| Refusal::bus_unavailable("task owner write timed out"))?;
        match created {
            Ok(_) => return Ok(()),
            Err(err) if err.kind() == CreateErrorKind::AlreadyExists => {}
            Err(err) => return Err(Refusal::bus_unavailable(err)),
        }
        // Bound before: by this agent (a retry, or its earlier report not stored) or another.
        let owner = tokio::time::timeout(timeout, owners.get(&key))
            .await
            .map_err(|_| Refusal::bus_unavailable("task owner read timed out"))?
            .map_err(Refusal::bus_unavailable)?;
        if owner.as_deref() == Some(caller.agent_id.as_str().as_bytes()) {
            return Ok(());
        }
        Err(Refusal::new(Code::Forbidden).with_message(FOREIGN_TASK))
    }

    /// Stores `message` for `agent`, charged to its quota.
    async fn publish<T: Serialize>(
        &self,
        agent: &AgentId,
        subject: String,
        msg_id: &str,
        message: &T,
    ) -> Result<Ack, Refusal> {
        let payload = Bytes::from(serde_json::to_vec(message).expect("domain types serialize"));
        if let Some(quota) = &self.quota {
            quota.charge(agent, payload.len()).await?;
        }
        Ok(self
            .publisher
            .publish(subject, msg_id, payload, None)
            .await?)
    }
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
