//! A task's durable state: [`Submission`] (what was stored before the 202) and [`TaskRecord`]
//! (one per task in the `acc_tasks` bucket, written only by the acting dispatcher). Every state
//! change is a method here, pure and unit-tested; the dispatcher stores the result with
//! compare-and-set and only then acts on it.
//!
//! States: `queued` → `dispatched` (an attempt leased to an agent) → `running` (the agent said
//! so; the lease is extended) → `succeeded`; a failed or expired attempt → `retrying` (waiting
//! out a backoff) → `queued`, or `dead_lettered` once the attempt budget is spent; `cancelled`
//! from any live state. `succeeded`, `dead_lettered` and `cancelled` are terminal.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::spec::TaskSpec;
use crate::domain::{AgentId, TaskId};

/// A submission as stored on `acc.tasks.submitted.<task_id>` (stream `ACC_TASK_SUBMISSIONS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submission {
    pub task_id: TaskId,
    #[serde(flatten)]
    pub spec: TaskSpec,
    /// The authenticated caller that submitted it.
    pub submitted_by: AgentId,
    pub submitted_at: DateTime<Utc>,
    /// Digest of the spec and the submitter: a resubmission with the same id and another body
    /// has another digest (409 `TASK_ID_CONFLICT`).
    pub digest: String,
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Queued,
    Dispatched,
    Running,
    Retrying,
    Succeeded,
    DeadLettered,
    Cancelled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 7] = [
        Self::Queued,
        Self::Dispatched,
        Self::Running,
        Self::Retrying,
        Self::Succeeded,
        Self::DeadLettered,
        Self::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::DeadLettered | Self::Cancelled)
    }

    /// The wire name, e.g. `dead_lettered`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Dispatched => "dispatched",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::DeadLettered => "dead_lettered",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

/// How an attempt ended (`running` while it is live).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Running,
    Succeeded,
    Failed,
    Expired,
    Cancelled,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Expired,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }
}

/// One attempt: which agent held the task, when, and how it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1-based, counted over the task's whole life (a replay continues the count).
    pub attempt: u32,
    pub agent_id: AgentId,
    pub started_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

/// Who replayed a dead-lettered task, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replay {
    pub by: AgentId,
    pub at: DateTime<Utc>,
}

/// A task in the `acc_tasks` bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub task_id: TaskId,
    #[serde(flatten)]
    pub spec: TaskSpec,
    pub submitted_by: AgentId,
    pub submitted_at: DateTime<Utc>,
    /// The submission's sequence in its stream: the order tasks of a priority are served in
    /// after a rebuild.
    pub seq: u64,
    /// When it went back in the queue after a backoff or a replay (absent: it waits since
    /// `submitted_at`): what aging counts from, and its place among its tenant's tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<DateTime<Utc>>,
    pub status: TaskStatus,
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// Attempts made before the last replay: the budget counts only those after it.
    #[serde(default)]
    pub budget_from: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    /// Why the task was dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_lettered_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replays: Vec<Replay>,
}

impl TaskRecord {
    /// A task just taken from its submission: queued, no attempt yet.
    pub fn queued(submission: Submission, seq: u64) -> Self {
        Self {
            task_id: submission.task_id,
            spec: submission.spec,
            submitted_by: submission.submitted_by,
            submitted_at: submission.submitted_at,
            seq,
            queued_at: None,
            status: TaskStatus::Queued,
            attempts: Vec::new(),
            budget_from: 0,
            lease_expires_at: None,
            next_attempt_at: None,
            result: None,
            error: None,
            reason: None,
            dead_lettered_at: None,
            finished_at: None,
            replays: Vec::new(),
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.status.is_terminal()
    }

    /// The attempt an agent holds right now, if any.
    pub fn live_attempt(&self) -> Option<&Attempt> {
        matches!(self.status, TaskStatus::Dispatched | TaskStatus::Running)
            .then(|| self.attempts.last())
            .flatten()
            .filter(|a| a.outcome == Outcome::Running)
    }

    /// Attempts counted against `max_attempts`.
    pub fn attempts_used(&self) -> u32 {
        self.attempts.len() as u32 - self.budget_from
    }

    /// True when `agent` held an attempt of this task that failed or expired.
    pub fn failed_by(&self, agent: &AgentId) -> bool {
        self.attempts.iter().any(|a| {
            &a.agent_id == agent && matches!(a.outcome, Outcome::Failed | Outcome::Expired)
        })
    }

    /// True when `agent` held any attempt of this task.
    pub fn held_by(&self, agent: &AgentId) -> bool {
        self.attempts.iter().any(|a| &a.agent_id == agent)
    }

    /// Leases a new attempt to `agent`; returns its number.
    pub fn start_attempt(&mut self, agent: &AgentId, now: DateTime<Utc>) -> u32 {
        let attempt = self.attempts.len() as u32 + 1;
        self.attempts.push(Attempt {
            attempt,
            agent_id: agent.clone(),
            started_at: now,
            ended_at: None,
            outcome: Outcome::Running,
            error: None,
        });
        self.status = TaskStatus::Dispatched;
        self.lease_expires_at = Some(now + self.timeout());
        self.next_attempt_at = None;
        attempt
    }

    /// The agent says it is working on it: the lease runs for another timeout from now.
    pub fn mark_running(&mut self, now: DateTime<Utc>) {
        self.status = TaskStatus::Running;
        self.lease_expires_at = Some(now + self.timeout());
    }

    /// The live attempt succeeded with `result`.
    pub fn succeed(&mut self, result: Option<Value>, now: DateTime<Utc>) {
        self.end_attempt(Outcome::Succeeded, None, now);
        self.status = TaskStatus::Succeeded;
        self.result = result;
        self.error = None;
        self.finished_at = Some(now);
    }

    /// The live attempt failed (or expired, `outcome`), with `error`. A retryable failure with
    /// budget left waits out the backoff (`jitter` in `[0, 1]`, full jitter); otherwise the
    /// task is dead-lettered with the reason.
    pub fn fail(
        &mut self,
        outcome: Outcome,
        error: Value,
        retryable: bool,
        jitter: f64,
        now: DateTime<Utc>,
    ) {
        self.end_attempt(outcome, Some(error.clone()), now);
        self.error = Some(error.clone());
        let used = self.attempts_used();
        let message = error["message"].as_str().unwrap_or("").to_owned();
        if !retryable {
            self.dead_letter(
                format!("attempt {used} failed and is not retryable: {message}"),
                now,
            );
        } else if used >= self.spec.max_attempts {
            self.dead_letter(
                format!(
                    "all {} attempts failed; the last one: {message}",
                    self.spec.max_attempts
                ),
                now,
            );
        } else {
            let delay = self.spec.backoff.delay(used, jitter);
            self.status = TaskStatus::Retrying;
            self.next_attempt_at =
                Some(now + chrono::Duration::from_std(delay).unwrap_or_default());
        }
    }

    /// The backoff is over: back in the queue, waiting since the backoff ended.
    pub fn requeue(&mut self) {
        self.status = TaskStatus::Queued;
        self.queued_at = self.next_attempt_at.take().or(self.queued_at);
    }

    /// Since when the task waits in the queue: its submission, or its last requeue.
    pub fn waiting_since(&self) -> DateTime<Utc> {
        self.queued_at.unwrap_or(self.submitted_at)
    }

    /// Cancelled by its submitter or an admin; a live attempt ends as `cancelled`.
    pub fn cancel(&mut self, now: DateTime<Utc>) {
        if self.live_attempt().is_some() {
            self.end_attempt(Outcome::Cancelled, None, now);
        }
        self.status = TaskStatus::Cancelled;
        self.next_attempt_at = None;
        self.finished_at = Some(now);
    }

    /// Queued again from the dead-letter queue, with a fresh attempt budget; the history stays.
    pub fn replay(&mut self, by: &AgentId, now: DateTime<Utc>) {
        self.budget_from = self.attempts.len() as u32;
        self.status = TaskStatus::Queued;
        self.queued_at = Some(now);
        self.reason = None;
        self.error = None;
        self.dead_lettered_at = None;
        self.finished_at = None;
        self.replays.push(Replay {
            by: by.clone(),
            at: now,
        });
    }

    /// The §6.1 shape of `GET /orchestrator/tasks/{id}` (without `success`).
    pub fn view(&self) -> Value {
        let mut view = json!({
            "task_id": self.task_id,
            "status": self.status.as_str(),
            "capability": self.spec.capability,
            "input": self.spec.input,
            "priority": self.spec.priority,
            "tenant": self.spec.tenant,
            "submitted_by": self.submitted_by,
            "submitted_at": self.submitted_at,
            "attempt": self.attempts.len(),
            "max_attempts": self.spec.max_attempts,
            "attempts": self.attempts,
        });
        let optional = [
            ("result", self.result.clone()),
            ("error", self.error.clone()),
            ("reason", self.reason.clone().map(Value::from)),
            ("next_attempt_at", self.next_attempt_at.map(|t| json!(t))),
            ("lease_expires_at", self.lease_expires_at.map(|t| json!(t))),
            ("dead_lettered_at", self.dead_lettered_at.map(|t| json!(t))),
            ("finished_at", self.finished_at.map(|t| json!(t))),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                view[key] = value;
            }
        }
        view
    }

    /// The shape of one entry of `GET /orchestrator/dlq`.
    pub fn dead_letter_view(&self) -> Value {
        json!({
            "task_id": self.task_id,
            "capability": self.spec.capability,
            "tenant": self.spec.tenant,
            "reason": self.reason,
            "attempts": self.attempts,
            "dead_lettered_at": self.dead_lettered_at,
        })
    }

    fn timeout(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.spec.timeout()).unwrap_or_default()
    }

    fn end_attempt(&mut self, outcome: Outcome, error: Option<Value>, now: DateTime<Utc>) {
        if let Some(attempt) = self.attempts.last_mut() {
            attempt.outcome = outcome;
            attempt.ended_at = Some(now);
            attempt.error = error;
        }
        self.lease_expires_at = None;
    }

    fn dead_letter(&mut self, reason: String, now: DateTime<Utc>) {
        self.status = TaskStatus::DeadLettered;
        self.reason = Some(reason);
        self.dead_lettered_at = Some(now);
        self.finished_at = Some(now);
        self.next_attempt_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::spec::Backoff;

    fn record(max_attempts: u32) -> TaskRecord {
        let spec = TaskSpec {
            capability: "c".into(),
            input: Value::Null,
            priority: 3,
            tenant: "t".into(),
            timeout_ms: 1_000,
            max_attempts,
            backoff: Backoff {
                initial_ms: 100,
                max_ms: 1_000,
                multiplier: 2.0,
            },
        };
        TaskRecord::queued(
            Submission {
                task_id: TaskId::parse("t1").unwrap(),
                spec,
                submitted_by: AgentId::parse("client").unwrap(),
                submitted_at: DateTime::UNIX_EPOCH,
                digest: "d".into(),
            },
            1,
        )
    }

    fn agent(id: &str) -> AgentId {
        AgentId::parse(id).unwrap()
    }

    #[test]
    fn a_failed_attempt_waits_at_most_its_backoff_then_the_budget_dead_letters() {
        let now = DateTime::UNIX_EPOCH;
        let mut task = record(2);
        assert_eq!(task.start_attempt(&agent("a"), now), 1);
        assert_eq!(task.live_attempt().unwrap().agent_id, agent("a"));
        task.fail(Outcome::Failed, json!({"message": "boom"}), true, 1.0, now);
        assert_eq!(task.status, TaskStatus::Retrying);
        assert_eq!(
            task.next_attempt_at,
            Some(now + chrono::Duration::milliseconds(100))
        );
        assert!(task.live_attempt().is_none());
        assert!(task.failed_by(&agent("a")));
        assert_eq!(task.waiting_since(), task.submitted_at);
        task.requeue();
        // Back in the queue, waiting since the backoff ended (what aging counts from).
        assert_eq!(
            task.waiting_since(),
            now + chrono::Duration::milliseconds(100)
        );
        assert_eq!(task.next_attempt_at, None);
        task.start_attempt(&agent("b"), now);
        task.fail(
            Outcome::Expired,
            json!({"message": "silent"}),
            true,
            1.0,
            now,
        );
        assert_eq!(task.status, TaskStatus::DeadLettered);
        assert_eq!(task.attempts.len(), 2);
        assert!(task.reason.as_deref().unwrap().contains("all 2 attempts"));
        task.replay(&agent("operator"), now);
        assert_eq!((task.status, task.attempts_used()), (TaskStatus::Queued, 0));
        assert_eq!(task.start_attempt(&agent("b"), now), 3);
    }

    #[test]
    fn a_failure_that_is_not_retryable_dead_letters_at_once() {
        let now = DateTime::UNIX_EPOCH;
        let mut task = record(5);
        task.start_attempt(&agent("a"), now);
        task.fail(
            Outcome::Failed,
            json!({"message": "bad input"}),
            false,
            1.0,
            now,
        );
        assert_eq!(task.status, TaskStatus::DeadLettered);
        assert!(task.reason.as_deref().unwrap().contains("not retryable"));
    }

    #[test]
    fn a_cancelled_live_attempt_ends_cancelled_and_the_task_is_terminal() {
        let now = DateTime::UNIX_EPOCH;
        let mut task = record(5);
        task.start_attempt(&agent("a"), now);
        task.mark_running(now);
        task.cancel(now);
        assert!(task.is_terminal());
        assert_eq!(task.attempts[0].outcome, Outcome::Cancelled);
        assert!(task.live_attempt().is_none());
        for status in TaskStatus::ALL {
            assert_eq!(TaskStatus::parse(status.as_str()), Some(status));
        }
    }
}
