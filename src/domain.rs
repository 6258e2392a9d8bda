//! Validated domain types: what an agent sent, after it was parsed and found valid, plus the
//! records the workers keep. Parse, don't validate: the door turns JSON into these types once, and
//! everything past the door (the bus, the workers) sees only valid values.
//!
//! Ids that become NATS subject tokens or KV keys ([`AgentId`], [`TaskId`]) are limited to
//! `[A-Za-z0-9_-]`, so `.`, `*`, `>` and whitespace can never inject a subject.
//!
//! Durations have one syntax everywhere ([`parse_duration`]): settings, alert rules, silences.

pub mod rfc3339;

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Why a field was refused. Displays as `field: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for FieldError {}

/// Longest agent or task id, in bytes (ASCII).
pub const MAX_ID_LEN: usize = 128;

fn parse_token(raw: &str) -> Result<(), String> {
    if raw.is_empty() {
        return Err("must not be empty".into());
    }
    if raw.len() > MAX_ID_LEN {
        return Err(format!("must be at most {MAX_ID_LEN} bytes"));
    }
    if !raw
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err("may contain only letters, digits, '-' and '_'".into());
    }
    Ok(())
}

macro_rules! token_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn parse(raw: &str) -> Result<Self, String> {
                parse_token(raw).map(|()| Self(raw.to_owned()))
            }

            /// [`Self::parse`], keeping `raw` instead of copying it.
            pub fn parse_owned(raw: String) -> Result<Self, String> {
                parse_token(&raw).map(|()| Self(raw))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                Self::parse(&raw).map_err(serde::de::Error::custom)
            }
        }
    };
}

token_type!(
    /// An agent's id: safe as a subject token and a KV key.
    AgentId
);
token_type!(
    /// A task's id: safe as a subject token.
    TaskId
);

/// The descriptive part of an agent: what it calls itself, where it lives, what it can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentProfile {
    pub name: String,
    pub base_url: String,
    pub capabilities: Vec<String>,
    /// Most live task attempts the agent takes at once (`max_concurrent_tasks`, default 1).
    #[serde(default = "one_task")]
    pub max_concurrent_tasks: u32,
    /// How tasks reach the agent: it claims them (`pull`, the default) or the dispatcher sends
    /// them (`push`). Left out of the stored JSON when `pull`, so older records read the same.
    #[serde(default, skip_serializing_if = "Dispatch::is_pull")]
    pub dispatch: Dispatch,
    /// Where pushed tasks go (only with `dispatch: push`): `{base_url}/tasks` over HTTP, or the
    /// agent's own reply namespace on NATS (what the NATS door sets for agents registering on
    /// it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_over: Option<PushChannel>,
}

/// How an agent gets its tasks (`dispatch` of a registration).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dispatch {
    /// The agent claims tasks (`POST /orchestrator/tasks/claim`, `acc.in.task_claim`).
    #[default]
    Pull,
    /// The dispatcher delivers tasks to the agent.
    Push,
}

impl Dispatch {
    pub fn is_pull(&self) -> bool {
        *self == Self::Pull
    }
}

/// True when `base_url` starts with one of `prefixes` (`PUSH_ALLOWED_URLS`): the only URLs the
/// dispatcher may push tasks to. No prefix allows nothing.
pub fn push_allowed(prefixes: &[String], base_url: &str) -> bool {
    prefixes
        .iter()
        .any(|prefix| base_url.starts_with(prefix.as_str()))
}

/// Where the dispatcher pushes an agent's tasks (`push_over` of a registration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PushChannel {
    /// `POST {base_url}/tasks` (refused at registration unless `PUSH_ALLOWED_URLS` allows it).
    Http,
    /// A message on `acc.reply.<agent_id>.tasks.push`.
    Nats,
}

fn one_task() -> u32 {
    1
}

/// The most `max_concurrent_tasks` a registration may ask for.
pub const MAX_CONCURRENT_TASKS: u32 = 1024;

/// Longest agent `name`, in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// Most `capabilities` of a registration.
pub const MAX_CAPABILITIES: usize = 256;
/// Longest capability, in bytes.
pub const MAX_CAPABILITY_LEN: usize = 128;
/// Longest `base_url`, in bytes.
pub const MAX_BASE_URL_LEN: usize = 2048;

impl AgentProfile {
    /// Reads `name`, `base_url`, `capabilities`, `max_concurrent_tasks`, `dispatch` and
    /// `push_over` from a JSON object. Any other key is ignored. Whether a push URL is allowed
    /// is the caller's check ([`AgentProfile::push_url`]).
    pub fn parse(body: &Map<String, Value>) -> Result<Self, FieldError> {
        let name = required_string(body, "name", MAX_NAME_LEN)?;
        let base_url = required_string(body, "base_url", MAX_BASE_URL_LEN)?;
        if base_url.trim() != base_url || base_url.contains(char::is_whitespace) {
            return Err(FieldError::new("base_url", "must not contain whitespace"));
        }
        let url = url::Url::parse(&base_url)
            .map_err(|e| FieldError::new("base_url", format!("not a URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(FieldError::new(
                "base_url",
                "must be an http or https URL with a host",
            ));
        }
        let capabilities = match body.get("capabilities") {
            Some(Value::Array(items)) => items,
            Some(_) => {
                return Err(FieldError::new(
                    "capabilities",
                    "must be an array of strings",
                ));
            }
            None => return Err(FieldError::new("capabilities", "is required")),
        };
        if capabilities.len() > MAX_CAPABILITIES {
            return Err(FieldError::new(
                "capabilities",
                format!("at most {MAX_CAPABILITIES} entries"),
            ));
        }
        let capabilities = capabilities
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) if !s.trim().is_empty() && s.len() <= MAX_CAPABILITY_LEN => {
                    Ok(s.clone())
                }
                _ => Err(FieldError::new(
                    format!("capabilities[{i}]"),
                    format!("must be a non-empty string of at most {MAX_CAPABILITY_LEN} bytes"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let max_concurrent_tasks = match body.get("max_concurrent_tasks") {
            None | Some(Value::Null) => one_task(),
            Some(value) => value
                .as_u64()
                .filter(|n| (1..=u64::from(MAX_CONCURRENT_TASKS)).contains(n))
                .map(|n| n as u32)
                .ok_or_else(|| {
                    FieldError::new(
                        "max_concurrent_tasks",
                        format!("must be an integer from 1 to {MAX_CONCURRENT_TASKS}"),
                    )
                })?,
        };
        let dispatch = match body.get("dispatch") {
            None | Some(Value::Null) => Dispatch::Pull,
            Some(Value::String(s)) if s == "pull" => Dispatch::Pull,
            Some(Value::String(s)) if s == "push" => Dispatch::Push,
            Some(_) => {
                return Err(FieldError::new("dispatch", "must be \"pull\" or \"push\""));
            }
        };
        let push_over = match (dispatch, body.get("push_over")) {
            (Dispatch::Pull, _) => None,
            (Dispatch::Push, None | Some(Value::Null)) => Some(PushChannel::Http),
            (Dispatch::Push, Some(Value::String(s))) if s == "http" => Some(PushChannel::Http),
            (Dispatch::Push, Some(Value::String(s))) if s == "nats" => Some(PushChannel::Nats),
            (Dispatch::Push, Some(_)) => {
                return Err(FieldError::new("push_over", "must be \"http\" or \"nats\""));
            }
        };
        Ok(Self {
            name,
            base_url,
            capabilities,
            max_concurrent_tasks,
            dispatch,
            push_over,
        })
    }

    /// The URL the dispatcher would call: `base_url` when the agent asked for push over HTTP.
    pub fn push_url(&self) -> Option<&str> {
        (self.dispatch == Dispatch::Push && self.push_over == Some(PushChannel::Http))
            .then_some(self.base_url.as_str())
    }

    /// Where the dispatcher sends this agent's tasks; `None` when it claims them.
    pub fn push_channel(&self) -> Option<PushChannel> {
        match self.dispatch {
            Dispatch::Pull => None,
            Dispatch::Push => Some(self.push_over.unwrap_or(PushChannel::Http)),
        }
    }
}

/// What an agent may say about itself in a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportedStatus {
    Online,
    Degraded,
}

/// The registry's view of an agent's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    Online,
    Offline,
    Degraded,
}

impl From<ReportedStatus> for AgentStatus {
    fn from(status: ReportedStatus) -> Self {
        match status {
            ReportedStatus::Online => Self::Online,
            ReportedStatus::Degraded => Self::Degraded,
        }
    }
}

/// Where a registration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationOrigin {
    /// The agent registered itself.
    Agent,
    /// `REGISTERED_AGENTS` named it: known, but not yet seen.
    Config,
}

/// A registration as stored on the bus (`acc.agents.registered.<agent_id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    pub agent_id: AgentId,
    #[serde(flatten)]
    pub profile: AgentProfile,
    pub origin: RegistrationOrigin,
    /// Stamped by the server that accepted it.
    #[serde(serialize_with = "rfc3339::serialize")]
    pub received_at: DateTime<Utc>,
}

/// A heartbeat as stored on the bus (`acc.agents.heartbeat.<agent_id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub agent_id: AgentId,
    pub status: ReportedStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
    #[serde(serialize_with = "rfc3339::serialize")]
    pub received_at: DateTime<Utc>,
}

/// A task result as stored on the bus (`acc.tasks.result.<task_id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task_id: TaskId,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The authenticated agent that reported it.
    pub reported_by: AgentId,
    #[serde(serialize_with = "rfc3339::serialize")]
    pub received_at: DateTime<Utc>,
}

/// An event as stored on the bus (`acc.events.<agent_id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub source: AgentId,
    pub data: Value,
    #[serde(serialize_with = "rfc3339::serialize")]
    pub time: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The authenticated agent that emitted it.
    pub emitted_by: AgentId,
    #[serde(serialize_with = "rfc3339::serialize")]
    pub received_at: DateTime<Utc>,
}

/// A status transition, published by the registry (`acc.agents.status.<agent_id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusChange {
    pub agent_id: AgentId,
    /// `None` when the agent was not known before.
    pub from: Option<AgentStatus>,
    pub to: AgentStatus,
    pub at: DateTime<Utc>,
    pub reason: String,
}

/// One agent in the agents KV bucket: the registry's materialised view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub agent_id: AgentId,
    #[serde(flatten)]
    pub profile: AgentProfile,
    pub registered_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub status: AgentStatus,
    /// When `status` was last set; older messages arriving late do not overwrite it.
    pub status_at: DateTime<Utc>,
    /// A status change written with this record but not yet confirmed published. Whoever next
    /// touches the record publishes it (under its dedupe id) and clears it, so a change is
    /// announced only after it is stored, and at least once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingChange>,
}

/// Agents by registry status: what `/health` shows and the fleet snapshot carries
/// (`bus.agents`), both with this JSON shape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCounts {
    pub total: u64,
    pub online: u64,
    pub offline: u64,
    pub degraded: u64,
}

impl AgentCounts {
    /// Counts `records` by status.
    pub fn tally<'a>(records: impl IntoIterator<Item = &'a AgentRecord>) -> Self {
        records
            .into_iter()
            .fold(Self::default(), |mut counts, record| {
                counts.total += 1;
                match record.status {
                    AgentStatus::Online => counts.online += 1,
                    AgentStatus::Offline => counts.offline += 1,
                    AgentStatus::Degraded => counts.degraded += 1,
                }
                counts
            })
    }
}

/// A status change waiting to be published, with its dedupe id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingChange {
    pub id: String,
    pub change: StatusChange,
}

/// Reads a required, non-blank string of bounded length.
pub fn required_string(
    body: &Map<String, Value>,
    field: &str,
    max_len: usize,
) -> Result<String, FieldError> {
    required_str(body, field, max_len).map(str::to_owned)
}

/// [`required_string`], borrowed from `body`, for a string only read.
pub fn required_str<'a>(
    body: &'a Map<String, Value>,
    field: &str,
    max_len: usize,
) -> Result<&'a str, FieldError> {
    match body.get(field) {
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err(FieldError::new(field, "must not be empty"))
        }
        Some(Value::String(s)) if s.len() > max_len => Err(FieldError::new(
            field,
            format!("must be at most {max_len} bytes"),
        )),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Null) | None => Err(FieldError::new(field, "is required")),
        Some(_) => Err(FieldError::new(field, "must be a string")),
    }
}

/// [`required_string`], moved out of `body` rather than copied (an empty string is left in
/// its place: cheaper than taking the entry out of the map).
pub fn take_string(
    body: &mut Map<String, Value>,
    field: &str,
    max_len: usize,
) -> Result<String, FieldError> {
    required_str(body, field, max_len)?;
    match body.get_mut(field) {
        Some(Value::String(s)) => Ok(std::mem::take(s)),
        _ => unreachable!("{field} was found a string just above"),
    }
}

/// Reads an optional string of bounded length; `null` counts as absent.
pub fn optional_string(
    body: &Map<String, Value>,
    field: &str,
    max_len: usize,
) -> Result<Option<String>, FieldError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => required_string(body, field, max_len).map(Some),
    }
}

/// Why a duration was refused. Displays as a sentence fit to follow the field's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not a number of seconds, nor a duration humantime reads.
    #[error("{raw:?} is not a duration like 500ms, 90s, 5m ({reason})")]
    Malformed {
        /// The text as given, trimmed.
        raw: String,
        /// What the parser objected to.
        reason: String,
    },
    /// A duration of zero, which no setting or request means.
    #[error("must be greater than zero")]
    Zero,
}

/// Parses a positive duration: `500ms`, `90s`, `5m`, `7d`, `1h 30m`; a bare number is seconds.
pub fn parse_duration(raw: &str) -> Result<Duration, DurationError> {
    let raw = raw.trim();
    let value = match raw.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(raw).map_err(|e| DurationError::Malformed {
            raw: raw.to_owned(),
            reason: e.to_string(),
        })?,
    };
    if value.is_zero() {
        return Err(DurationError::Zero);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations_parse_and_zero_is_refused() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 90 "), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("0s"), Err(DurationError::Zero));
        assert_eq!(parse_duration("0"), Err(DurationError::Zero));
        let err = parse_duration("soon").unwrap_err().to_string();
        assert!(
            err.starts_with("\"soon\" is not a duration like 500ms, 90s, 5m ("),
            "{err}"
        );
    }

    #[test]
    fn ids_that_could_inject_a_subject_are_refused() {
        for bad in ["a.b", "a*", "a>", "a b", "", "a\tb", "ä", &"x".repeat(129)] {
            assert!(AgentId::parse(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["agent-1", "student_pilot", "A9"] {
            assert!(AgentId::parse(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn agent_counts_tally_records_by_status_in_the_wire_shape() {
        let record = |id: &str, status| AgentRecord {
            agent_id: AgentId::parse(id).unwrap(),
            profile: AgentProfile {
                name: id.into(),
                base_url: "https://x.example".into(),
                capabilities: vec![],
                max_concurrent_tasks: 1,
                dispatch: Dispatch::Pull,
                push_over: None,
            },
            registered_at: DateTime::UNIX_EPOCH,
            last_seen: DateTime::UNIX_EPOCH,
            status,
            status_at: DateTime::UNIX_EPOCH,
            pending: None,
        };
        let records = [
            record("a", AgentStatus::Online),
            record("b", AgentStatus::Offline),
            record("c", AgentStatus::Online),
            record("d", AgentStatus::Degraded),
        ];
        let counts = AgentCounts::tally(&records);
        assert_eq!(
            serde_json::to_value(counts).unwrap(),
            json!({"total": 4, "online": 2, "offline": 1, "degraded": 1})
        );
        assert_eq!(AgentCounts::tally([]), AgentCounts::default());
    }

    #[test]
    fn profiles_need_every_field_with_the_right_type() {
        let ok = json!({"name": "n", "base_url": "https://x.example", "capabilities": ["a"]});
        assert!(AgentProfile::parse(ok.as_object().unwrap()).is_ok());
        let cases = [
            (json!({"base_url": "https://x", "capabilities": []}), "name"),
            (json!({"name": "n", "capabilities": []}), "base_url"),
            (
                json!({"name": "n", "base_url": "ftp://x", "capabilities": []}),
                "base_url",
            ),
            (
                json!({"name": "n", "base_url": "https://x"}),
                "capabilities",
            ),
            (
                json!({"name": "n", "base_url": "https://x", "capabilities": "a"}),
                "capabilities",
            ),
            (
                json!({"name": "n", "base_url": "https://x", "capabilities": [1]}),
                "capabilities[0]",
            ),
            (
                json!({"name": 5, "base_url": "https://x", "capabilities": []}),
                "name",
            ),
        ];
        for (body, field) in cases {
            let err = AgentProfile::parse(body.as_object().unwrap()).unwrap_err();
            assert_eq!(err.field, field, "{body}");
        }
    }
}
