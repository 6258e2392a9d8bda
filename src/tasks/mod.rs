//! Tasks: clients submit work for a capability, the orchestrator stores and queues it, and
//! leases it to one agent at a time as an attempt, retrying with backoff until it succeeds or is
//! dead-lettered (DESIGN.md §6.1).
//!
//! - [`spec`]: the submission and claim bodies, parsed with their defaults.
//! - [`record`]: the stored submission and the task record, with every state change.
//! - [`queue`]: the dispatcher's queue (priority with aging, round-robin across tenants).
//! - [`backlog`]: queued tasks per tenant, and the submit-time cap on them.
//! - [`api`]: what a door does for the task routes, on any replica ([`Tasks`]).
//! - [`wire`]: the requests the ingress sends the acting dispatcher, and its answers.
//! - [`dispatcher`]: the role that owns unfinished tasks (one acting replica).
//! - [`push`]: delivery to agents registered with `"dispatch": "push"` (HTTP or NATS).
//!
//! On the bus: `ACC_TASK_SUBMISSIONS` (one message per task id, `acc.tasks.submitted.<id>`),
//! the `acc_tasks` bucket (one record per task, and the dispatcher lease), replays recorded on
//! `acc.tasks.replayed.<id>`, and core request/reply on `acc.dispatch.*`.

pub mod api;
pub mod backlog;
pub mod dispatcher;
pub mod push;
pub mod queue;
pub mod record;
pub mod spec;
pub mod wire;

use std::time::Duration;

pub use api::{ListFilter, Tasks};
pub use record::{Attempt, Outcome, Submission, TaskRecord, TaskStatus};

/// The dispatcher role's settings.
#[derive(Debug, Clone)]
pub struct TaskSettings {
    /// Lifetime of the dispatcher lease: a successor takes over within it.
    pub lease_ttl: Duration,
    /// Bound on each read and write the dispatcher makes on the bus.
    pub write_timeout: Duration,
    /// How the queue orders tasks (`TASK_PRIORITY_AGING`, `TENANT_WEIGHTS`).
    pub queue: queue::QueueSettings,
    /// `TASK_MAX_QUEUED_PER_TENANT`: queued tasks a tenant may have before a submission is
    /// refused (429 `QUEUE_FULL`); 0 is no cap.
    pub max_queued_per_tenant: u32,
}
