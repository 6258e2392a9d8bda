//! [`Tasks`]: what a door does for the task routes, on any replica. A submission is parsed,
//! stored on `acc.tasks.submitted.<task_id>` and acknowledged; reads go to the `acc_tasks`
//! bucket; everything that changes a task (claim, callback, cancel, replay) is a request to the
//! acting dispatcher, which alone writes task records.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{Operation, Store};
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use bytes::Bytes;
use chrono::{SubsecRound as _, Utc};
use futures::TryStreamExt as _;
use serde_json::{Map, Value, json};

use super::backlog::BacklogView;
use super::record::{Submission, TaskRecord, TaskStatus};
use super::spec::{ClaimSpec, TaskSpec};
use super::wire::{
    CallbackRequest, CancelRequest, ClaimRequest, DispatchClient, Failure, ReplayRequest, Report,
};
use crate::admission::digest;
use crate::auth::{Caller, SUBMIT_SCOPE, TASK_SCOPE};
use crate::bus::{PublishFailure, Publisher, subjects};
use crate::contract::{Code, Refusal};
use crate::domain::{FieldError, TaskId};

/// The most tasks one list page holds, and the default.
pub const MAX_PAGE: usize = 500;
const DEFAULT_PAGE: usize = 100;
/// Longest `error.message` of a failed attempt, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// Filters of `GET /orchestrator/tasks`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<TaskStatus>,
    pub capability: Option<String>,
    pub tenant: Option<String>,
    pub limit: usize,
    /// Tasks after this id (ids in byte order).
    pub cursor: Option<String>,
}

impl ListFilter {
    /// Reads `status=&capability=&tenant=&limit=&cursor=`.
    pub fn parse(query: &str) -> Result<Self, FieldError> {
        let mut filter = Self {
            limit: DEFAULT_PAGE,
            ..Self::default()
        };
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match key.as_ref() {
                "status" => {
                    filter.status = Some(
                        TaskStatus::parse(&value)
                            .ok_or_else(|| FieldError::new("status", "is not a task state"))?,
                    );
                }
                "capability" => filter.capability = Some(value.into_owned()),
                "tenant" => filter.tenant = Some(value.into_owned()),
                "cursor" => filter.cursor = Some(value.into_owned()),
                "limit" => {
                    filter.limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_PAGE).contains(n))
                        .ok_or_else(|| {
                            FieldError::new("limit", format!("must be from 1 to {MAX_PAGE}"))
                        })?;
                }
                _ => {}
            }
        }
        Ok(filter)
    }

    fn admits(&self, record: &TaskRecord) -> bool {
        self.status.is_none_or(|s| s == record.status)
            && self
                .capability
                .as_ref()
                .is_none_or(|c| c == &record.spec.capability)
            && self
                .tenant
                .as_ref()
                .is_none_or(|t| t == &record.spec.tenant)
    }
}

/// The task routes' side of a door.
#[derive(Clone)]
pub struct Tasks {
    publisher: Publisher,
    submissions: Stream,
    records: Store,
    dispatch: DispatchClient,
    /// Bound on every read from the bus.
    timeout: Duration,
    /// Queued tasks per tenant, for `TASK_MAX_QUEUED_PER_TENANT` (shared by the clones).
    backlog: Arc<BacklogView>,
}

impl Tasks {
    pub fn new(
        publisher: Publisher,
        submissions: Stream,
        records: Store,
        timeout: Duration,
    ) -> Self {
        let dispatch = DispatchClient::new(publisher.client().clone(), timeout);
        let backlog = Arc::new(BacklogView::new(records.clone(), 0, timeout));
        Self {
            publisher,
            submissions,
            records,
            dispatch,
            timeout,
            backlog,
        }
    }

    /// Refuses submissions (429 `QUEUE_FULL`) for a tenant with `cap` tasks queued; 0 is no cap.
    pub fn with_queue_cap(mut self, cap: u32) -> Self {
        self.backlog = Arc::new(BacklogView::new(self.records.clone(), cap, self.timeout));
        self
    }

    /// `POST /orchestrator/tasks`: stores the submission and answers the 202 body. The same id
    /// with the same body is a duplicate, with another body 409 `TASK_ID_CONFLICT`.
    pub async fn submit(
        &self,
        caller: &Caller,
        body: &Map<String, Value>,
    ) -> Result<Value, Refusal> {
        if !caller.allows(SUBMIT_SCOPE) {
            return Err(Refusal::insufficient_scope(SUBMIT_SCOPE));
        }
        let (task_id, spec) = TaskSpec::parse(body, &caller.agent_id)?;
        let task_id = task_id.unwrap_or_else(generated_id);
        if let Err(full) = self.backlog.check(&spec.tenant).await {
            // A retry of a submission already stored is answered as before, full or not.
            if self.submission(&task_id).await?.is_none() {
                return Err(full);
            }
        }
        let tenant = spec.tenant.clone();
        let digest = digest(&(&spec, &caller.agent_id));
        let submission = Submission {
            task_id: task_id.clone(),
            spec,
            submitted_by: caller.agent_id.clone(),
            submitted_at: Utc::now().trunc_subsecs(3),
            digest: digest.clone(),
        };
        let subject = subjects::task_submission(&task_id);
        let payload = Bytes::from(serde_json::to_vec(&submission).expect("submissions serialize"));
        let msg_id = format!("submit:{task_id}:{digest}");
        let (stream, seq, duplicate) = match self
            .publisher
            .publish(subject, &msg_id, payload, None)
            .await
        {
            Ok(ack) => (ack.stream, ack.seq, ack.duplicate),
            // The subject already holds a submission (older than the duplicate window, or
            // with another body): the stream refuses a second one. Compare digests.
            Err(failure @ (PublishFailure::StreamFull(_) | PublishFailure::Rejected(_))) => {
                let Some((stored, seq)) = self.submission(&task_id).await? else {
                    return Err(failure.into());
                };
                if stored.digest != digest {
                    return Err(Refusal::new(Code::TaskIdConflict)
                        .with_details(format!("task_id {task_id} is taken")));
                }
                (subjects::SUBMISSIONS_STREAM.to_owned(), seq, true)
            }
            Err(failure) => return Err(failure.into()),
        };
        if !duplicate {
            self.backlog.stored(&tenant, seq);
        }
        tracing::info!(%task_id, agent_id = %caller.agent_id, seq, duplicate, "task submitted");
        Ok(json!({
            "success": true,
            "task_id": task_id,
            "status": "queued",
            "stream": stream,
            "seq": seq,
            "duplicate": duplicate,
        }))
    }

    /// The stored submission of `task_id` and its sequence, if the task was ever submitted.
    pub async fn submission(&self, task_id: &TaskId) -> Result<Option<(Submission, u64)>, Refusal> {
        let subject = subjects::task_submission(task_id);
        let lookup = self.submissions.get_last_raw_message_by_subject(&subject);
        match tokio::time::timeout(self.timeout, lookup).await {
            Ok(Ok(message)) => {
                let submission =
                    serde_json::from_slice(&message.payload).map_err(Refusal::internal)?;
                Ok(Some((submission, message.sequence)))
            }
            Ok(Err(err)) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Ok(Err(err)) => Err(Refusal::bus_unavailable(err)),
            Err(_) => Err(Refusal::bus_unavailable("submission lookup timed out")),
        }
    }

    /// The task as the bucket holds it; a submission the dispatcher has not taken in yet reads
    /// as queued. `None` when the orchestrator never queued the task.
    pub async fn find(&self, task_id: &TaskId) -> Result<Option<TaskRecord>, Refusal> {
        if let Some(record) = self.record(task_id.as_str()).await? {
            return Ok(Some(record));
        }
        Ok(self
            .submission(task_id)
            .await?
            .map(|(submission, seq)| TaskRecord::queued(submission, seq)))
    }

    /// `GET /orchestrator/tasks/{id}`: the submitter, an agent that held an attempt, or admin.
    pub async fn view(&self, caller: &Caller, record: &TaskRecord) -> Result<Value, Refusal> {
        if !(caller.reads_all()
            || record.submitted_by == caller.agent_id
            || record.held_by(&caller.agent_id))
        {
            return Err(Refusal::new(Code::Forbidden)
                .with_message("this task belongs to another submitter"));
        }
        let mut view = record.view();
        view["success"] = true.into();
        Ok(view)
    }

    /// `GET /orchestrator/tasks`: every task for an admin, a submitter's own otherwise.
    pub async fn list(&self, caller: &Caller, filter: &ListFilter) -> Result<Value, Refusal> {
        let own = (!caller.reads_all()).then_some(&caller.agent_id);
        let (records, next) = self
            .page(filter, |record| {
                own.is_none_or(|me| &record.submitted_by == me)
            })
            .await?;
        Ok(page_body(
            records.iter().map(TaskRecord::view).collect(),
            next,
        ))
    }

    /// `GET /orchestrator/dlq` (admin): dead-lettered tasks, browsed, never consumed.
    pub async fn dead_letters(&self, filter: &ListFilter) -> Result<Value, Refusal> {
        let filter = ListFilter {
            status: Some(TaskStatus::DeadLettered),
            ..filter.clone()
        };
        let (records, next) = self.page(&filter, |_| true).await?;
        let tasks = records.iter().map(TaskRecord::dead_letter_view).collect();
        Ok(page_body(tasks, next))
    }

    /// `POST /orchestrator/tasks/claim`.
    pub async fn claim(
        &self,
        caller: &Caller,
        body: &Map<String, Value>,
    ) -> Result<Value, Refusal> {
        let request = self.claim_request(caller, body)?;
        self.ask_claim(&request).await
    }

    /// A claim's checks (scope, body), before anything waits: what the NATS door refuses at
    /// once, and then hands to [`Tasks::ask_claim`] in a task of its own.
    pub fn claim_request(
        &self,
        caller: &Caller,
        body: &Map<String, Value>,
    ) -> Result<ClaimRequest, Refusal> {
        if !caller.allows(TASK_SCOPE) {
            return Err(Refusal::insufficient_scope(TASK_SCOPE));
        }
        let claim = ClaimSpec::parse(body)?;
        Ok(ClaimRequest {
            agent_id: caller.agent_id.clone(),
            capabilities: claim.capabilities,
            max: claim.max,
            wait_ms: u64::try_from(claim.wait.as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// Asks the dispatcher for a checked claim; waits up to its `wait` for tasks.
    pub async fn ask_claim(&self, request: &ClaimRequest) -> Result<Value, Refusal> {
        let wait = Duration::from_millis(request.wait_ms);
        self.dispatch
            .ask(subjects::DISPATCH_CLAIM, request, wait)
            .await
    }

    /// A callback for a task the orchestrator queued; `None` when it never queued `task_id`
    /// (the Gate-1 path then stores the result as before).
    pub async fn callback(
        &self,
        caller: &Caller,
        task_id: &str,
        body: &Map<String, Value>,
    ) -> Result<Option<Value>, Refusal> {
        let Ok(task_id) = TaskId::parse(task_id) else {
            return Ok(None);
        };
        if self.submission(&task_id).await?.is_none() {
            return Ok(None);
        }
        if !caller.allows(TASK_SCOPE) {
            return Err(Refusal::insufficient_scope(TASK_SCOPE));
        }
        let request = CallbackRequest {
            task_id,
            agent_id: caller.agent_id.clone(),
            report: parse_report(body)?,
        };
        let answer = self
            .dispatch
            .ask(subjects::DISPATCH_CALLBACK, &request, Duration::ZERO)
            .await?;
        Ok(Some(answer))
    }

    /// `POST /orchestrator/tasks/{id}/cancel`: the submitter or an admin.
    pub async fn cancel(&self, caller: &Caller, task_id: &str) -> Result<Value, Refusal> {
        let task_id = parse_task_id(task_id)?;
        let request = CancelRequest {
            task_id,
            caller: caller.agent_id.clone(),
            admin: caller.is_admin(),
        };
        self.dispatch
            .ask(subjects::DISPATCH_CANCEL, &request, Duration::ZERO)
            .await
    }

    /// `POST /orchestrator/dlq/{id}/replay` (admin).
    pub async fn replay(&self, caller: &Caller, task_id: &str) -> Result<Value, Refusal> {
        let request = ReplayRequest {
            task_id: parse_task_id(task_id)?,
            by: caller.agent_id.clone(),
        };
        self.dispatch
            .ask(subjects::DISPATCH_REPLAY, &request, Duration::ZERO)
            .await
    }

    async fn record(&self, key: &str) -> Result<Option<TaskRecord>, Refusal> {
        let entry = tokio::time::timeout(self.timeout, self.records.entry(key))
            .await
            .map_err(|_| Refusal::bus_unavailable("task lookup timed out"))?
            .map_err(Refusal::bus_unavailable)?;
        match entry {
            Some(entry) if entry.operation == Operation::Put => {
                serde_json::from_slice(&entry.value)
                    .map(Some)
                    .map_err(Refusal::internal)
            }
            _ => Ok(None),
        }
    }

    /// One page of records that pass `filter` and `visible`, in id order, and the cursor of
    /// the next page. Reads every key of the bucket: fine for thousands of tasks, not millions
    /// (an index is for the streams issue).
    async fn page(
        &self,
        filter: &ListFilter,
        visible: impl Fn(&TaskRecord) -> bool,
    ) -> Result<(Vec<TaskRecord>, Option<String>), Refusal> {
        let keys = async {
            match self.records.keys().await {
                Ok(keys) => keys
                    .try_collect::<Vec<String>>()
                    .await
                    .map_err(Refusal::bus_unavailable),
                Err(err) => Err(Refusal::bus_unavailable(err)),
            }
        };
        let mut keys = tokio::time::timeout(self.timeout, keys)
            .await
            .map_err(|_| Refusal::bus_unavailable("task listing timed out"))??;
        keys.retain(|key| TaskId::parse(key).is_ok());
        keys.sort();
        let mut page = Vec::new();
        let after = filter.cursor.as_deref().unwrap_or("");
        for key in keys.iter().filter(|key| key.as_str() > after) {
            let Some(record) = self.record(key).await? else {
                continue;
            };
            if !(filter.admits(&record) && visible(&record)) {
                continue;
            }
            if page.len() == filter.limit {
                let last: &TaskRecord = page.last().expect("limit is at least 1");
                return Ok((page.clone(), Some(last.task_id.as_str().to_owned())));
            }
            page.push(record);
        }
        Ok((page, None))
    }
}

/// `{success, count, tasks, next_cursor?}`.
fn page_body(tasks: Vec<Value>, next: Option<String>) -> Value {
    let mut body = json!({ "success": true, "count": tasks.len(), "tasks": tasks });
    if let Some(next) = next {
        body["next_cursor"] = next.into();
    }
    body
}

/// A callback body for an orchestrator task: `{status: "running"|"succeeded"|"failed",
/// result?, error?: {message, retryable?}, progress?}`.
fn parse_report(body: &Map<String, Value>) -> Result<Report, FieldError> {
    let status = crate::domain::required_string(body, "status", 64)?;
    let present = |key: &str| body.get(key).filter(|v| !v.is_null()).cloned();
    match status.as_str() {
        "running" => Ok(Report::Running {
            progress: present("progress"),
        }),
        "succeeded" => Ok(Report::Succeeded {
            result: present("result"),
        }),
        "failed" => {
            let error = match body.get("error") {
                Some(Value::Object(error)) => error,
                Some(Value::String(message)) => {
                    return Ok(Report::Failed {
                        error: Failure {
                            message: bounded(message),
                            retryable: true,
                        },
                    });
                }
                _ => {
                    return Err(FieldError::new(
                        "error",
                        "is required for a failed task: {message, retryable?}",
                    ));
                }
            };
            let message = crate::domain::required_string(error, "message", MAX_ERROR_MESSAGE)
                .map_err(|e| FieldError::new("error.message", e.reason))?;
            let retryable = match error.get("retryable") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(FieldError::new("error.retryable", "must be a boolean")),
            };
            Ok(Report::Failed {
                error: Failure { message, retryable },
            })
        }
        _ => Err(FieldError::new(
            "status",
            "must be \"running\", \"succeeded\" or \"failed\" for a task the orchestrator queued",
        )),
    }
}

fn bounded(message: &str) -> String {
    let mut end = message.len().min(MAX_ERROR_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_owned()
}

fn parse_task_id(raw: &str) -> Result<TaskId, Refusal> {
    TaskId::parse(raw).map_err(|reason| FieldError::new("task_id", reason).into())
}

/// A fresh task id: 128 random bits in hex.
fn generated_id() -> TaskId {
    let bits: u128 = rand::random();
    TaskId::parse(&format!("{bits:032x}")).expect("hex is a valid id")
}
