//! What a client asks for, parsed once at the door: a task submission ([`TaskSpec`], with its
//! retry [`Backoff`]) and a claim ([`ClaimSpec`]). Defaults are applied here, so the stored
//! submission says exactly what the dispatcher will do.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::domain::{
    AgentId, DurationError, FieldError, TaskId, optional_string, parse_duration, required_string,
};

use crate::domain::{MAX_CAPABILITIES, MAX_CAPABILITY_LEN};
/// Priorities run from 1 (first) to 5; 3 unless the submission says.
pub const PRIORITIES: std::ops::RangeInclusive<u8> = 1..=5;
pub const DEFAULT_PRIORITY: u8 = 3;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Shortest and longest lease of one attempt (`timeout`).
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Most attempts a submission may ask for (`max_attempts`).
pub const MAX_ATTEMPTS: u32 = 100;
/// The range of a backoff's `multiplier`.
pub const BACKOFF_MULTIPLIER: std::ops::RangeInclusive<f64> = 1.0..=10.0;
/// Most tasks one claim may take.
pub const MAX_CLAIM: u32 = 100;
/// Longest a claim may wait for a task.
pub const MAX_CLAIM_WAIT: Duration = Duration::from_secs(30);

/// How long a failed attempt waits before the task is queued again:
/// `min(max, initial × multiplier^(attempt−1))`, with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    pub initial_ms: u64,
    pub max_ms: u64,
    pub multiplier: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial_ms: 1_000,
            max_ms: 300_000,
            multiplier: 2.0,
        }
    }
}

impl Backoff {
    /// The longest wait after the `attempt`-th failure (1-based), before jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let ms = (self.initial_ms as f64) * self.multiplier.powi(exponent);
        Duration::from_millis(ms.min(self.max_ms as f64) as u64)
    }

    /// The wait after the `attempt`-th failure with full jitter: `jitter` in `[0, 1]` scales
    /// the ceiling.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        self.ceiling(attempt).mul_f64(jitter.clamp(0.0, 1.0))
    }

    fn parse(value: Option<&Value>) -> Result<Self, FieldError> {
        let body = match value {
            None | Some(Value::Null) => return Ok(Self::default()),
            Some(Value::Object(body)) => body,
            Some(_) => return Err(FieldError::new("backoff", "must be an object")),
        };
        let defaults = Self::default();
        let initial =
            duration_field(body, "initial", "backoff.initial")?.map_or(defaults.initial_ms, millis);
        let max = duration_field(body, "max", "backoff.max")?.map_or(defaults.max_ms, millis);
        let multiplier = match body.get("multiplier") {
            None | Some(Value::Null) => defaults.multiplier,
            Some(value) => value
                .as_f64()
                .filter(|m| BACKOFF_MULTIPLIER.contains(m))
                .ok_or_else(|| {
                    FieldError::new("backoff.multiplier", "must be a number from 1 to 10")
                })?,
        };
        if max < initial {
            return Err(FieldError::new(
                "backoff.max",
                "must not be shorter than backoff.initial",
            ));
        }
        Ok(Self {
            initial_ms: initial,
            max_ms: max,
            multiplier,
        })
    }
}

/// A task as submitted, with every default applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub capability: String,
    #[serde(default)]
    pub input: Value,
    pub priority: u8,
    pub tenant: String,
    /// One attempt's lease, extended by each `running` callback.
    pub timeout_ms: u64,
    pub max_attempts: u32,
    pub backoff: Backoff,
}

impl TaskSpec {
    /// Reads a submission body: `{task_id?, capability, input?, priority?, tenant?, timeout?,
    /// max_attempts?, backoff?}`. Returns the task id the body named, if any.
    pub fn parse(
        body: &Map<String, Value>,
        caller: &AgentId,
    ) -> Result<(Option<TaskId>, Self), FieldError> {
        let task_id = optional_string(body, "task_id", 128)?
            .map(|raw| TaskId::parse(&raw).map_err(|reason| FieldError::new("task_id", reason)))
            .transpose()?;
        let capability = required_string(body, "capability", MAX_CAPABILITY_LEN)?;
        let input = body.get("input").cloned().unwrap_or(Value::Null);
        let priority = match body.get("priority") {
            None | Some(Value::Null) => DEFAULT_PRIORITY,
            Some(value) => value
                .as_u64()
                .and_then(|p| u8::try_from(p).ok())
                .filter(|p| PRIORITIES.contains(p))
                .ok_or_else(|| FieldError::new("priority", "must be an integer from 1 to 5"))?,
        };
        let tenant = match optional_string(body, "tenant", 128)? {
            None => caller.as_str().to_owned(),
            Some(raw) => AgentId::parse(&raw)
                .map_err(|reason| FieldError::new("tenant", reason))?
                .as_str()
                .to_owned(),
        };
        let timeout = duration_field(body, "timeout", "timeout")?.unwrap_or(DEFAULT_TIMEOUT);
        if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&timeout) {
            return Err(FieldError::new("timeout", "must be from 100ms to 24h"));
        }
        let max_attempts = match body.get("max_attempts") {
            None | Some(Value::Null) => DEFAULT_MAX_ATTEMPTS,
            Some(value) => value
                .as_u64()
                .filter(|n| (1..=u64::from(MAX_ATTEMPTS)).contains(n))
                .map(|n| n as u32)
                .ok_or_else(|| {
                    FieldError::new(
                        "max_attempts",
                        format!("must be an integer from 1 to {MAX_ATTEMPTS}"),
                    )
                })?,
        };
        let backoff = Backoff::parse(body.get("backoff"))?;
        Ok((
            task_id,
            Self {
                capability,
                input,
                priority,
                tenant,
                timeout_ms: millis(timeout),
                max_attempts,
                backoff,
            },
        ))
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// A claim: `{capabilities?, max?: 1–100, wait?: "0s"–"30s"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimSpec {
    /// Only these of the agent's capabilities; all of them when absent.
    pub capabilities: Option<Vec<String>>,
    pub max: u32,
    pub wait: Duration,
}

impl ClaimSpec {
    pub fn parse(body: &Map<String, Value>) -> Result<Self, FieldError> {
        let capabilities = match body.get("capabilities") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) if items.len() <= MAX_CAPABILITIES => Some(
                items
                    .iter()
                    .map(|item| match item {
                        Value::String(s)
                            if !s.trim().is_empty() && s.len() <= MAX_CAPABILITY_LEN =>
                        {
                            Ok(s.clone())
                        }
                        _ => Err(FieldError::new(
                            "capabilities",
                            "must hold non-empty strings of at most 128 bytes",
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(_) => {
                return Err(FieldError::new(
                    "capabilities",
                    format!("must be an array of at most {MAX_CAPABILITIES} strings"),
                ));
            }
        };
        let max = match body.get("max") {
            None | Some(Value::Null) => 1,
            Some(value) => value
                .as_u64()
                .filter(|n| (1..=u64::from(MAX_CLAIM)).contains(n))
                .map(|n| n as u32)
                .ok_or_else(|| {
                    FieldError::new("max", format!("must be an integer from 1 to {MAX_CLAIM}"))
                })?,
        };
        let wait = match body.get("wait") {
            None | Some(Value::Null) => Duration::ZERO,
            Some(Value::String(raw)) => match parse_duration(raw) {
                Ok(wait) => wait,
                Err(DurationError::Zero) => Duration::ZERO,
                Err(err) => return Err(FieldError::new("wait", err.to_string())),
            },
            Some(_) => return Err(FieldError::new("wait", "must be a duration like \"10s\"")),
        };
        if wait > MAX_CLAIM_WAIT {
            return Err(FieldError::new("wait", "must be at most 30s"));
        }
        Ok(Self {
            capabilities,
            max,
            wait,
        })
    }
}

fn duration_field(
    body: &Map<String, Value>,
    key: &str,
    field: &str,
) -> Result<Option<Duration>, FieldError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(raw)) => parse_duration(raw)
            .map(Some)
            .map_err(|err| FieldError::new(field, err.to_string())),
        Some(_) => Err(FieldError::new(
            field,
            "must be a duration like \"500ms\", \"90s\", \"5m\"",
        )),
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn caller() -> AgentId {
        AgentId::parse("client-1").unwrap()
    }

    #[test]
    fn a_bare_submission_gets_the_documented_defaults() {
        let body = json!({"capability": "summarize"});
        let (id, spec) = TaskSpec::parse(body.as_object().unwrap(), &caller()).unwrap();
        assert_eq!(id, None);
        assert_eq!(spec.priority, 3);
        assert_eq!(spec.tenant, "client-1");
        assert_eq!(spec.timeout(), Duration::from_secs(60));
        assert_eq!(spec.max_attempts, 5);
        assert_eq!(spec.backoff, Backoff::default());
        assert_eq!(spec.input, Value::Null);
    }

    #[test]
    fn out_of_range_fields_are_refused_by_name() {
        let cases = [
            (json!({}), "capability"),
            (json!({"capability": "c", "priority": 0}), "priority"),
            (json!({"capability": "c", "priority": 6}), "priority"),
            (json!({"capability": "c", "timeout": "soon"}), "timeout"),
            (json!({"capability": "c", "timeout": "10ms"}), "timeout"),
            (
                json!({"capability": "c", "max_attempts": 0}),
                "max_attempts",
            ),
            (json!({"capability": "c", "task_id": "a.b"}), "task_id"),
            (json!({"capability": "c", "tenant": "a b"}), "tenant"),
            (
                json!({"capability": "c", "backoff": {"initial": "5s", "max": "1s"}}),
                "backoff.max",
            ),
            (
                json!({"capability": "c", "backoff": {"multiplier": 0.5}}),
                "backoff.multiplier",
            ),
        ];
        for (body, field) in cases {
            let err = TaskSpec::parse(body.as_object().unwrap(), &caller()).unwrap_err();
            assert_eq!(err.field, field, "{body}");
        }
    }

    #[test]
    fn the_backoff_grows_by_the_multiplier_up_to_its_maximum() {
        let backoff = Backoff {
            initial_ms: 100,
            max_ms: 1_000,
            multiplier: 3.0,
        };
        assert_eq!(backoff.ceiling(1), Duration::from_millis(100));
        assert_eq!(backoff.ceiling(2), Duration::from_millis(300));
        assert_eq!(backoff.ceiling(3), Duration::from_millis(900));
        assert_eq!(backoff.ceiling(4), Duration::from_millis(1_000));
        assert_eq!(backoff.ceiling(500), Duration::from_millis(1_000));
        assert_eq!(backoff.delay(2, 0.5), Duration::from_millis(150));
        assert_eq!(backoff.delay(2, 7.0), Duration::from_millis(300));
    }

    #[test]
    fn a_claim_waits_from_zero_to_thirty_seconds() {
        let parse = |body: Value| ClaimSpec::parse(body.as_object().unwrap());
        let claim = parse(json!({})).unwrap();
        assert_eq!((claim.max, claim.wait), (1, Duration::ZERO));
        assert_eq!(parse(json!({"wait": "0s"})).unwrap().wait, Duration::ZERO);
        assert_eq!(
            parse(json!({"wait": "2s", "max": 100})).unwrap().wait,
            Duration::from_secs(2)
        );
        assert_eq!(parse(json!({"wait": "31s"})).unwrap_err().field, "wait");
        assert_eq!(parse(json!({"max": 101})).unwrap_err().field, "max");
        assert_eq!(
            parse(json!({"capabilities": "x"})).unwrap_err().field,
            "capabilities"
        );
    }
}
