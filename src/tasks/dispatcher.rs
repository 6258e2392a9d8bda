//! The dispatcher role: one acting replica at a time (the [`Lease`] `lease.dispatcher` in the
//! `acc_tasks` bucket) owns every task that is not finished.
//!
//! While acting it
//! - takes submissions in from `ACC_TASK_SUBMISSIONS` (durable consumer `dispatcher`): a
//!   record is created in `acc_tasks` (create-only, so a redelivery changes nothing) and the
//!   task is queued; the message is acknowledged only after that write;
//! - answers the ingress's requests on `acc.dispatch.*` (claim, callback, cancel, replay); a
//!   claim with nothing to take waits, up to its `wait`, for a task to arrive;
//! - expires leases and ends backoffs on a short tick;
//! - pushes queued tasks to agents registered with `"dispatch": "push"` ([`super::push`]):
//!   the task is leased exactly as for a claim, then sent by a spawned task whose outcome comes
//!   back into the loop (a failed push fails the attempt).
//!
//! Every change is computed on a copy of the record, written with compare-and-set on the
//! revision it read, and only then applied in memory and answered: what an agent is told is
//! stored. Changes are planned and written in turns ([`Turn`]); the next turn is planned and
//! sent while earlier ones are still being stored, a task having at most one write in flight.
//! A turn of 16 writes or more is stored as one atomic batch per 1,000 records
//! ([`crate::bus::batch`]: one server write and one fsync for all of them, each record still
//! compare-and-set on its revision); a batch the server refuses (one stale revision refuses it
//! all) is written record by record, so each change gets its own answer.
//! A submission taken while a claim waits is created `dispatched` with its first attempt, in
//! one write instead of two. What is in memory (the records of unfinished tasks, the [`TaskQueue`], live attempts
//! per agent, the timers) is rebuilt from the bucket whenever a replica takes the lease, so a
//! successor resumes without losing a task or giving one twice; and also when a write failed and
//! the record could not be read back (the bus went away mid-change), so no task is forgotten. Past the lease's local
//! deadline nothing is written ([`Lease::acting`]).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::kv::{Operation, Store};
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use async_nats::{Client, Subject};
use bytes::Bytes;
use chrono::{DateTime, SubsecRound as _, Utc};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{StreamExt as _, TryStreamExt as _};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::TaskSettings;
use super::backlog::BacklogCounts;
use super::push::{PushOutcome, PushSettings, Pusher};
use super::queue::{TaskQueue, Waiting};
use super::record::{Outcome, Submission, TaskRecord, TaskStatus};
use super::wire::{Answer, CallbackRequest, CancelRequest, ClaimRequest, ReplayRequest, Report};
use crate::bus::batch::{self, BatchError, Record, SERVER_MAX_BATCH};
use crate::bus::{Publisher, subjects};
use crate::contract::{Code, Refusal};
use crate::directory::Directory;
use crate::domain::{AgentId, AgentRecord, AgentStatus, TaskId};
use crate::lease::Lease;
use crate::metrics::tasks::{
    BatchOutcome, OUTCOMES, SNAPSHOT_KEY, SNAPSHOT_REFRESH, TaskGauges, TaskSnapshot,
};

/// How often leases, backoffs and waiting claims are looked at.
const TICK: Duration = Duration::from_millis(20);
/// How long the server waits for the dispatcher to acknowledge a submission before another
/// delivery (a successor taking over gets unacknowledged submissions again after this).
const SUBMISSION_ACK_WAIT: Duration = Duration::from_secs(5);
/// How often waiting claims are looked at again when nothing else happened.
const RESERVE_WAITERS_EVERY: Duration = Duration::from_millis(100);
/// How often the queue depth shown on `/metrics` is recounted.
const FIGURES_EVERY: Duration = Duration::from_secs(1);
/// When a write of an expiry or a requeue fails, it is tried again after this long.
const RETRY_WRITE_AFTER: chrono::Duration = chrono::Duration::milliseconds(500);

/// Runs the dispatcher role until `stop`.
pub async fn run(
    publisher: Publisher,
    directory: Directory,
    settings: TaskSettings,
    figures: Arc<TaskGauges>,
    push: Arc<PushSettings>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let js = publisher.jetstream().clone();
    let kv = js
        .get_key_value(subjects::TASKS_BUCKET)
        .await
        .context("opening the tasks bucket")?;
    let submissions = js
        .get_stream(subjects::SUBMISSIONS_STREAM)
        .await
        .context("opening the submissions stream")?;
    let consumer: PullConsumer = submissions
        .get_or_create_consumer(
            subjects::DISPATCHER_CONSUMER,
            consumer::pull::Config {
                durable_name: Some(subjects::DISPATCHER_CONSUMER.to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: SUBMISSION_ACK_WAIT,
                ..Default::default()
            },
        )
        .await
        .context("creating the dispatcher consumer")?;
    let lease = Lease::new(
        kv.clone(),
        subjects::DISPATCHER_LEASE_KEY,
        "dispatcher",
        crate::metrics::instance_id(),
        settings.lease_ttl,
    );
    let mut dispatcher = Dispatcher {
        kv,
        submissions,
        directory,
        client: publisher.client().clone(),
        publisher,
        lease,
        write_timeout: settings.write_timeout,
        queue_settings: settings.queue.clone(),
        state: State::default(),
        figures,
        push,
        pusher: None,
        stored_figures: None,
        out_of_step: false,
        flights: std::sync::Mutex::default(),
    };
    let renew_every = settings.lease_ttl / 3;
    loop {
        // Standing by: try for the lease every third of its TTL, or as soon as the holder's
        // lease runs out.
        loop {
            if dispatcher.lease.acquire().await {
                break;
            }
            let wait = dispatcher.lease.standby_wait(renew_every);
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
        }
        if let Err(err) = dispatcher.rebuild().await {
            tracing::warn!(error = %err, "dispatcher: cannot rebuild from the bucket; retrying");
            tokio::time::sleep(renew_every).await;
            continue;
        }
        let acting = dispatcher
            .act(&consumer, renew_every, &stop)
            .await
            .context("dispatcher");
        match acting {
            Ok(Stopped::Stop) => {
                dispatcher.lease.release().await;
                return Ok(());
            }
            Ok(Stopped::LeaseLost) => {}
            Err(err) => {
                tracing::warn!(error = ?err, "dispatcher interrupted; standing by");
                tokio::time::sleep(renew_every).await;
            }
        }
        dispatcher.stand_down();
    }
}

enum Stopped {
    Stop,
    LeaseLost,
}

/// A record and the bucket revision it was read at.
#[derive(Debug, Clone)]
struct Held {
    record: TaskRecord,
    revision: u64,
}

/// A claim waiting for a task.
struct Waiter {
    reply: Subject,
    request: ClaimRequest,
    deadline: tokio::time::Instant,
}

/// What the acting dispatcher holds in memory, all of it rebuilt on takeover.
#[derive(Default)]
struct State {
    /// Every unfinished task.
    tasks: HashMap<TaskId, Held>,
    queue: TaskQueue,
    /// Live attempts per agent.
    live: HashMap<AgentId, u32>,
    /// Lease expiries and backoff ends; an entry whose task moved on is skipped when due.
    timers: BinaryHeap<Reverse<(DateTime<Utc>, TaskId)>>,
    waiters: Vec<Waiter>,
    /// Queued tasks per tenant, written for the ingress's `TASK_MAX_QUEUED_PER_TENANT` check.
    backlog: BacklogCounts,
    /// Tasks with a write in flight.
    busy: HashSet<TaskId>,
    /// Attempts per agent with their write in flight, not yet in `live` (its free slots).
    reserved: HashMap<AgentId, u32>,
    /// Messages about a busy task (or that came while [`FLIGHTS_MAX`] turns were in flight),
    /// planned again when a turn lands.
    deferred: Vec<Item>,
}

struct Dispatcher {
    kv: Store,
    submissions: Stream,
    directory: Directory,
    client: Client,
    publisher: Publisher,
    lease: Lease,
    write_timeout: Duration,
    /// Order of the queue (aging, tenant weights), applied on every rebuild.
    queue_settings: super::queue::QueueSettings,
    state: State,
    /// What `/metrics` shows while this replica acts.
    figures: Arc<TaskGauges>,
    push: Arc<PushSettings>,
    /// Sends tasks to push agents while acting (a fresh one, and channel, each time).
    pusher: Option<Pusher>,
    /// The last snapshot stored for the alerting role, and when.
    stored_figures: Option<(tokio::time::Instant, TaskSnapshot)>,
    /// A write failed and the record could not be read back (the bus went away): memory no
    /// longer holds that task, so the loop stops acting and rebuilds from the bucket.
    out_of_step: bool,
    /// The turns whose writes are in flight. (Behind a mutex only so the dispatcher stays
    /// `Sync`; it is reached through `get_mut`, never locked.)
    flights: std::sync::Mutex<Flights>,
}

impl Dispatcher {
    /// Serves until `stop` or until the lease is lost.
    async fn act(
        &mut self,
        consumer: &PullConsumer,
        renew_every: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<Stopped> {
        let mut requests = self
            .client
            .subscribe(subjects::DISPATCH_ALL)
            .await
            .context("subscribing to dispatcher requests")?;
        let mut incoming = consumer.messages().await.context("following submissions")?;
        // The tick runs every TICK while it has work to move on, and otherwise sleeps until
        // the next thing due (see `Dispatcher::quiet_until`): an idle dispatcher wakes about
        // once a second, not 50 times.
        let tick = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(tick);
        let mut ticked_at = tokio::time::Instant::now();
        let mut renew_at = tokio::time::Instant::now() + renew_every;
        let mut figures_at = tokio::time::Instant::now();
        let mut waiters_at = tokio::time::Instant::now();
        let (pusher, mut pushed) = Pusher::new(self.push.clone(), self.client.clone());
        self.pusher = Some(pusher);
        tracing::info!(
            queued = self.state.queue.len(),
            unfinished = self.state.tasks.len(),
            "dispatcher acting"
        );
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    let _ = requests.unsubscribe().await;
                    self.land_all().await;
                    self.answer_waiters_unavailable().await;
                    return Ok(Stopped::Stop);
                }
                Some(flight) = self.flights_mut().next(), if self.in_flight() > 0 => {
                    self.land(flight).await;
                }
                Some(message) = requests.next(), if self.in_flight() < FLIGHTS_MAX => {
                    let mut items = vec![Item::Request(message)];
                    drain(&mut items, &mut requests, &mut incoming);
                    self.run_turns(items).await;
                }
                Some(outcome) = pushed.recv() => self.pushed(outcome).await,
                next = incoming.next(), if self.in_flight() < FLIGHTS_MAX => match next {
                    Some(Ok(message)) => {
                        let mut items = vec![Item::Submission(Box::new(message))];
                        drain(&mut items, &mut requests, &mut incoming);
                        self.run_turns(items).await;
                    }
                    Some(Err(err)) => tracing::debug!(error = %err, "submissions: pull interrupted"),
                    None => anyhow::bail!("the submissions consumer ended"),
                },
                () = &mut tick => {
                    ticked_at = tokio::time::Instant::now();
                    if self.out_of_step {
                        let _ = requests.unsubscribe().await;
                        self.land_all().await;
                        self.answer_waiters_unavailable().await;
                        anyhow::bail!("a task record could not be read back after a failed write; rebuilding from the bucket");
                    }
                    if tokio::time::Instant::now() >= renew_at {
                        renew_at = tokio::time::Instant::now() + renew_every;
                        if !self.lease.acquire().await {
                            let _ = requests.unsubscribe().await;
                            self.land_all().await;
                            self.answer_waiters_unavailable().await;
                            return Ok(Stopped::LeaseLost);
                        }
                    }
                    self.fire_timers().await;
                    if self.lease.acting() {
                        let state = &mut self.state;
                        state.backlog.publish(&self.kv, &state.queue, self.write_timeout).await;
                    }
                    self.expire_waiters().await;
                    if tokio::time::Instant::now() >= waiters_at {
                        // Waiting claims are also looked at again now and then: an agent the
                        // view did not know yet, or one whose status changed.
                        waiters_at = tokio::time::Instant::now() + RESERVE_WAITERS_EVERY;
                        self.run_turns(Vec::new()).await;
                    }
                    if tokio::time::Instant::now() >= figures_at {
                        figures_at = tokio::time::Instant::now() + FIGURES_EVERY;
                        let queued = self.state.queue.depth();
                        self.figures.update(|figures| figures.queued = queued);
                        self.store_figures().await;
                    }
                }
            }
            let next = ticked_at + TICK;
            let next = match self.quiet_until(renew_at.min(figures_at)) {
                Some(until) => until.max(next),
                None => next,
            };
            if tick.deadline() != next {
                tick.as_mut().reset(next);
            }
        }
    }

    /// When the tick has nothing to move on before `due` but the timers, the earlier of `due`
    /// and the first timer: `None` while it has (tasks queued, claims waiting, messages
    /// deferred, counts not written yet, a rebuild to start), and it runs every [`TICK`].
    fn quiet_until(&self, due: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let state = &self.state;
        if self.out_of_step
            || !state.queue.is_empty()
            || !state.waiters.is_empty()
            || !state.deferred.is_empty()
            || !state.backlog.settled(&state.queue)
        {
            return None;
        }
        let Some(Reverse((at, _))) = state.timers.peek() else {
            return Some(due);
        };
        // Timers are wall-clock times to the millisecond: 1 ms more, so the tick finds it due.
        let wait = (*at - now()).to_std().unwrap_or_default() + Duration::from_millis(1);
        Some(due.min(tokio::time::Instant::now() + wait))
    }

    /// Forgets everything held in memory (the lease is gone; a successor rebuilds it).
    fn stand_down(&mut self) {
        self.state = State::default();
        self.out_of_step = false;
        self.flights = std::sync::Mutex::default();
        self.pusher = None;
        self.stored_figures = None;
        self.figures.clear();
    }

    /// Loads every unfinished task from the bucket.
    async fn rebuild(&mut self) -> anyhow::Result<()> {
        self.state = State::default();
        self.state.queue = TaskQueue::new(self.queue_settings.clone());
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .context("listing task records")?
            .try_collect()
            .await
            .context("listing task records")?;
        let mut unfinished = Vec::new();
        let mut dead_lettered = 0;
        for key in keys.iter().filter(|key| TaskId::parse(key).is_ok()) {
            let Some(entry) = self.kv.entry(key).await.context("reading a task record")? else {
                continue;
            };
            if entry.operation != Operation::Put {
                continue;
            }
            match serde_json::from_slice::<TaskRecord>(&entry.value) {
                Ok(record) if !record.is_terminal() => unfinished.push(Held {
                    record,
                    revision: entry.revision,
                }),
                Ok(record) => {
                    dead_lettered += u64::from(record.status == TaskStatus::DeadLettered);
                }
                Err(err) => tracing::warn!(task_id = %key, error = %err, "unreadable task record"),
            }
        }
        // Oldest first, as they were queued: the queue's lines and tenant ring come out as the
        // predecessor's were.
        unfinished.sort_by_key(|held| (held.record.waiting_since(), held.record.seq));
        for held in unfinished {
            self.index(None, &held.record);
            self.state.tasks.insert(held.record.task_id.clone(), held);
        }
        self.figures.clear();
        self.figures
            .update(|figures| figures.dead_lettered = dead_lettered);
        Ok(())
    }

    /// A submission whose record is stored: counted for the backlog and acknowledged.
    async fn taken_in(&mut self, message: Box<async_nats::jetstream::Message>, seq: u64) {
        self.state.backlog.taken_in(seq);
        if let Err(err) = message.ack().await {
            tracing::debug!(error = %err, "submission ack failed; it will come again");
        }
    }

    /// The record of a submission: the one in memory or the bucket, or a new queued one.
    async fn admit(&mut self, submission: Submission, seq: u64) -> Result<Held, Refusal> {
        if let Some(held) = self.state.tasks.get(&submission.task_id) {
            return Ok(held.clone());
        }
        // Create-only: a record already there (a redelivery, a takeover) makes this fail, and
        // the record is then read instead — one round trip for a new task.
        let record = TaskRecord::queued(submission, seq);
        self.fence()?;
        let value = encode(&record);
        let created = tokio::time::timeout(
            self.write_timeout,
            self.kv.create(record.task_id.as_str(), value),
        )
        .await
        .map_err(|_| Refusal::bus_unavailable("task record write timed out"))?;
        match created {
            Ok(revision) => {
                tracing::info!(task_id = %record.task_id, capability = %record.spec.capability, "task queued");
                let held = Held { record, revision };
                self.apply(held.clone());
                Ok(held)
            }
            // Someone wrote it meanwhile: read what is there.
            Err(err) => self
                .read(&record.task_id)
                .await?
                .ok_or_else(|| Refusal::bus_unavailable(err)),
        }
    }

    /// The record of `task_id`, from memory, the bucket, or (not taken in yet) its submission.
    async fn lookup(&mut self, task_id: &TaskId) -> Result<Held, Refusal> {
        if let Some(held) = self.state.tasks.get(task_id) {
            return Ok(held.clone());
        }
        if let Some(held) = self.read(task_id).await? {
            return Ok(held);
        }
        let subject = subjects::task_submission(task_id);
        let lookup = self.submissions.get_last_raw_message_by_subject(&subject);
        let message = match tokio::time::timeout(self.write_timeout, lookup).await {
            Ok(Ok(message)) => message,
            Ok(Err(err)) if err.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Err(Refusal::new(Code::TaskNotFound).with_message("No task with this id"));
            }
            Ok(Err(err)) => return Err(Refusal::bus_unavailable(err)),
            Err(_) => return Err(Refusal::bus_unavailable("submission lookup timed out")),
        };
        let submission = serde_json::from_slice(&message.payload).map_err(Refusal::internal)?;
        self.admit(submission, message.sequence).await
    }

    /// Reads a record from the bucket; an unfinished one not in memory is taken in.
    async fn read(&mut self, task_id: &TaskId) -> Result<Option<Held>, Refusal> {
        let entry = tokio::time::timeout(self.write_timeout, self.kv.entry(task_id.as_str()))
            .await
            .map_err(|_| Refusal::bus_unavailable("task record read timed out"))?
            .map_err(Refusal::bus_unavailable)?;
        let Some(entry) = entry.filter(|e| e.operation == Operation::Put) else {
            return Ok(None);
        };
        let record: TaskRecord = serde_json::from_slice(&entry.value).map_err(Refusal::internal)?;
        let held = Held {
            record,
            revision: entry.revision,
        };
        if !held.record.is_terminal() {
            self.apply(held.clone());
        }
        Ok(Some(held))
    }

    /// Writes `next` over the record read at `revision`, then applies it in memory.
    async fn commit(&mut self, next: TaskRecord, revision: u64) -> Result<u64, Refusal> {
        self.fence()?;
        let key = next.task_id.clone();
        let write = self.kv.update(key.as_str(), encode(&next), revision);
        let written = tokio::time::timeout(self.write_timeout, write)
            .await
            .map_err(|_| Refusal::bus_unavailable("task record write timed out"))?;
        match written {
            Ok(revision) => {
                self.apply(Held {
                    record: next,
                    revision,
                });
                Ok(revision)
            }
            Err(err) => {
                // Another writer, or a lost answer to our own write: believe the bucket.
                tracing::warn!(task_id = %key, error = %err, "task record changed under the dispatcher; reloading");
                if let Some(current) = self.state.tasks.remove(&key) {
                    self.unindex(&current.record);
                }
                if self.read(&key).await.is_err() {
                    // Forgotten here and not read back: without a rebuild the task would
                    // wait, queued or leased, until another replica took over.
                    self.out_of_step = true;
                }
                Err(Refusal::bus_unavailable(err))
            }
        }
    }

    /// Puts a stored record in memory, replacing (and un-indexing) the one it supersedes.
    fn apply(&mut self, held: Held) {
        let old = self.state.tasks.remove(&held.record.task_id);
        if let Some(old) = &old {
            self.count(Some(&old.record), &held.record);
        }
        self.index(old.as_ref().map(|h| &h.record), &held.record);
        if !held.record.is_terminal() {
            self.state.tasks.insert(held.record.task_id.clone(), held);
        }
    }

    /// Moves the derived state (queue, live counts, timers) from `old` to `new`.
    fn index(&mut self, old: Option<&TaskRecord>, new: &TaskRecord) {
        if let Some(old) = old {
            self.unindex(old);
        }
        let state = &mut self.state;
        if new.status == TaskStatus::Queued {
            state.queue.push(waiting_of(new));
        }
        if let Some(attempt) = new.live_attempt() {
            *state.live.entry(attempt.agent_id.clone()).or_default() += 1;
        }
        for at in [new.lease_expires_at, new.next_attempt_at]
            .into_iter()
            .flatten()
        {
            state.timers.push(Reverse((at, new.task_id.clone())));
        }
    }

    /// Counts, for `/metrics`, how `old` became `new`: an attempt that ended, a lease that ran
    /// out, a task that entered the dead-letter queue. (Replays leave it in `replay`, as
    /// finished records are not held in memory.)
    /// `old` is `None` for a record created with its first attempt.
    fn count(&self, old: Option<&TaskRecord>, new: &TaskRecord) {
        let ended = old.is_some_and(|o| o.live_attempt().is_some()) && new.live_attempt().is_none();
        let outcome = new.attempts.last().map(|a| a.outcome);
        let dead = old.is_some_and(|o| o.status != TaskStatus::DeadLettered)
            && new.status == TaskStatus::DeadLettered;
        // Submit → dispatched, for the first attempt only (a retry's wait is its backoff).
        let first_dispatch = (old.is_none_or(|o| o.attempts.is_empty()) && new.attempts.len() == 1)
            .then(|| {
                (new.attempts[0].started_at - new.submitted_at)
                    .to_std()
                    .ok()
            })
            .flatten();
        self.figures.update(|figures| {
            if let Some(latency) = first_dispatch {
                figures.dispatch_latency.observe(latency);
            }
            if dead {
                figures.dead_lettered_now();
            }
            if let (true, Some(outcome)) = (ended, outcome) {
                if let Some(index) = OUTCOMES.iter().position(|o| *o == outcome.as_str()) {
                    figures.attempts[index] += 1;
                }
                figures.leases_expired += u64::from(outcome == Outcome::Expired);
            }
            figures.dead_lettered += u64::from(dead);
        });
    }

    fn unindex(&mut self, old: &TaskRecord) {
        let state = &mut self.state;
        if old.status == TaskStatus::Queued {
            state.queue.remove(&old.task_id);
        }
        if let Some(attempt) = old.live_attempt() {
            if let Some(count) = state.live.get_mut(&attempt.agent_id) {
                *count = count.saturating_sub(1);
            }
        }
    }

    fn fence(&self) -> Result<(), Refusal> {
        if self.lease.acting() {
            Ok(())
        } else {
            Err(Refusal::bus_unavailable("the dispatcher lease is not held"))
        }
    }

    async fn answer(&self, reply: Subject, answer: Result<Value, Refusal>) {
        let bytes = Answer::from_result(answer).to_bytes();
        if let Err(err) = self.client.publish(reply, bytes).await {
            tracing::debug!(error = %err, "dispatcher answer not sent");
        }
    }

    /// The capabilities `agent` may take tasks of now: those it registered (and asked for);
    /// none while offline; while degraded only those no online agent has.
    fn claimable(&self, agent: &AgentRecord, asked: Option<&[String]>) -> Vec<String> {
        let registered = agent
            .profile
            .capabilities
            .iter()
            .filter(|c| asked.is_none_or(|asked| asked.contains(c)));
        match agent.status {
            AgentStatus::Online => registered.cloned().collect(),
            AgentStatus::Offline => Vec::new(),
            AgentStatus::Degraded => registered
                .filter(|c| {
                    !self.directory.any(|other| {
                        other.status == AgentStatus::Online
                            && other.profile.capabilities.contains(c)
                    })
                })
                .cloned()
                .collect(),
        }
    }

    /// Claims whose `wait` is over get an empty list.
    async fn expire_waiters(&mut self) {
        let now = tokio::time::Instant::now();
        if self.state.waiters.iter().all(|w| w.deadline > now) {
            return;
        }
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.state.waiters)
            .into_iter()
            .partition(|w| w.deadline <= now);
        self.state.waiters = waiting;
        for waiter in due {
            self.answer(waiter.reply, Ok(claimed(Vec::new()))).await;
        }
    }

    /// Also answers the requests still waiting behind a busy task, and gives their
    /// submissions back at once (they stay on the stream for the successor).
    async fn answer_waiters_unavailable(&mut self) {
        for waiter in std::mem::take(&mut self.state.waiters) {
            let refusal = Refusal::bus_unavailable("the dispatcher is stopping");
            self.answer(waiter.reply, Err(refusal)).await;
        }
        for item in std::mem::take(&mut self.state.deferred) {
            match item {
                Item::Request(message) => {
                    if let Some(reply) = message.reply {
                        let refusal = Refusal::bus_unavailable("the dispatcher is stopping");
                        self.answer(reply, Err(refusal)).await;
                    }
                }
                Item::Submission(message) => {
                    let _ = message
                        .ack_with(async_nats::jetstream::AckKind::Nak(None))
                        .await;
                }
            }
        }
    }

    /// Expired leases become failed attempts; finished backoffs go back in the queue.
    async fn fire_timers(&mut self) {
        let now = now();
        let mut changed = false;
        // Due while a write of the task is in flight: looked at again once it landed.
        let mut postponed = Vec::new();
        while let Some(Reverse((at, _))) = self.state.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, task_id))) = self.state.timers.pop() else {
                break;
            };
            if self.state.busy.contains(&task_id) {
                postponed.push(Reverse((now + RETRY_WRITE_AFTER, task_id)));
                continue;
            }
            let Some(held) = self.state.tasks.get(&task_id).cloned() else {
                continue;
            };
            let mut next = held.record.clone();
            match next.status {
                TaskStatus::Dispatched | TaskStatus::Running
                    if next.lease_expires_at.is_some_and(|lease| lease <= now) =>
                {
                    let agent = next.live_attempt().map(|a| a.agent_id.clone());
                    let error =
                        json!({"message": "lease expired: no callback within the task's timeout"});
                    next.fail(Outcome::Expired, error, true, rand::random(), now);
                    tracing::info!(%task_id, agent_id = ?agent.as_ref().map(AgentId::as_str), status = next.status.as_str(), "lease expired");
                }
                TaskStatus::Retrying if next.next_attempt_at.is_some_and(|t| t <= now) => {
                    next.requeue();
                }
                _ => continue,
            }
            match self.commit(next, held.revision).await {
                Ok(_) => changed = true,
                Err(_) => self
                    .state
                    .timers
                    .push(Reverse((at.max(now) + RETRY_WRITE_AFTER, task_id))),
            }
        }
        self.state.timers.extend(postponed);
        if changed {
            self.run_turns(Vec::new()).await;
        }
    }

    async fn cancel(&mut self, request: CancelRequest) -> Result<Value, Refusal> {
        let held = self.lookup(&request.task_id).await?;
        if !request.admin && held.record.submitted_by != request.caller {
            return Err(Refusal::new(Code::Forbidden)
                .with_message("only the submitter or an admin may cancel this task"));
        }
        if held.record.is_terminal() {
            return Err(Refusal::new(Code::TaskFinished)
                .with_details(format!("the task is {}", held.record.status.as_str())));
        }
        let holder = held.record.live_attempt().map(|a| a.agent_id.clone());
        let mut next = held.record.clone();
        next.cancel(now());
        self.commit(next, held.revision).await?;
        if let Some(holder) = holder {
            self.tell_cancelled(&holder, &request.task_id);
        }
        tracing::info!(task_id = %request.task_id, by = %request.caller, "task cancelled");
        Ok(json!({"success": true, "task_id": request.task_id, "status": "cancelled"}))
    }

    /// Queues a dead-lettered task again with a fresh attempt budget, and records who did.
    async fn replay(&mut self, request: ReplayRequest) -> Result<Value, Refusal> {
        let held = self.lookup(&request.task_id).await?;
        if held.record.status != TaskStatus::DeadLettered {
            return Err(Refusal::new(Code::TaskNotDeadLettered)
                .with_details(format!("the task is {}", held.record.status.as_str())));
        }
        let mut next = held.record.clone();
        let now = now();
        next.replay(&request.by, now);
        let replays = next.replays.len();
        let attempts_before = next.attempts.len();
        self.commit(next, held.revision).await?;
        self.figures
            .update(|figures| figures.dead_lettered = figures.dead_lettered.saturating_sub(1));
        tracing::info!(task_id = %request.task_id, replayed_by = %request.by, attempts_before, "dead-lettered task replayed");
        let record = json!({
            "task_id": request.task_id,
            "replayed_by": request.by,
            "replayed_at": now,
            "attempts_before": attempts_before,
        });
        let msg_id = format!("replay:{}:{replays}", request.task_id);
        let payload = Bytes::from(record.to_string());
        let subject = subjects::task_replay(&request.task_id);
        if let Err(err) = self
            .publisher
            .publish(subject, &msg_id, payload, None)
            .await
        {
            tracing::error!(task_id = %request.task_id, error = %err, "replay done but its record not published");
        }
        Ok(json!({"success": true, "task_id": request.task_id, "status": "queued"}))
    }
}

/// True when `agent` should get this task: it has not failed it, or no other online agent with
/// the capability that has not failed it could take it instead.
fn prefers(directory: &Directory, record: &TaskRecord, agent: &AgentId) -> bool {
    !record.failed_by(agent)
        || !directory.any(|other| {
            &other.agent_id != agent
                && other.status == AgentStatus::Online
                && other.profile.capabilities.contains(&record.spec.capability)
                && !record.failed_by(&other.agent_id)
        })
}

/// A callback from an agent that does not hold the live attempt: the holder of the final
/// attempt repeating its final report gets `duplicate: true`; a report on a cancelled attempt
/// is `TASK_FINISHED`; anything else `STALE_ATTEMPT`.
fn repeated(
    record: &TaskRecord,
    revision: u64,
    request: &CallbackRequest,
) -> Result<Value, Refusal> {
    let last = record
        .attempts
        .last()
        .filter(|a| a.agent_id == request.agent_id && record.is_terminal());
    if let Some(last) = last {
        let same = match (&request.report, last.outcome) {
            (Report::Succeeded { result }, Outcome::Succeeded) => result == &record.result,
            (Report::Failed { error }, Outcome::Failed) => last
                .error
                .as_ref()
                .is_some_and(|e| e["message"] == error.message.as_str()),
            _ => false,
        };
        if same {
            return Ok(callback_answer(record, revision, true));
        }
        if last.outcome == Outcome::Cancelled {
            return Err(Refusal::new(Code::TaskFinished).with_details("the task was cancelled"));
        }
    }
    Err(Refusal::new(Code::StaleAttempt))
}

fn callback_answer(record: &TaskRecord, revision: u64, duplicate: bool) -> Value {
    json!({
        "success": true,
        "task_id": record.task_id,
        "message": "Result received",
        "status": record.status.as_str(),
        "attempt": record.attempts.len(),
        "lease_expires_at": record.lease_expires_at,
        "stream": format!("KV_{}", subjects::TASKS_BUCKET),
        "seq": revision,
        "duplicate": duplicate,
    })
}

fn claimed(tasks: Vec<Value>) -> Value {
    json!({"success": true, "tasks": tasks})
}

fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(payload).map_err(Refusal::internal)
}

fn encode(record: &TaskRecord) -> Bytes {
    Bytes::from(serde_json::to_vec(record).expect("records serialize"))
}

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

/// The figures the alerting role reads, kept in the tasks bucket.
impl Dispatcher {
    /// Counts queued tasks of capabilities no online agent has, and stores the snapshot for
    /// the alerting role when it changed (or has not been written for a while).
    async fn store_figures(&mut self) {
        let mut unserved: BTreeMap<String, usize> = BTreeMap::new();
        for ((capability, _), count) in self.state.queue.depth() {
            let served = self.directory.any(|agent| {
                agent.status == AgentStatus::Online
                    && agent.profile.capabilities.contains(&capability)
            });
            if !served {
                *unserved.entry(capability).or_default() += count;
            }
        }
        let mut snapshot = None;
        self.figures.update(|figures| {
            figures.unserved = unserved;
            snapshot = Some(figures.snapshot(now()));
        });
        let Some(snapshot) = snapshot else { return };
        let due = self.stored_figures.as_ref().is_none_or(|(at, last)| {
            at.elapsed() >= SNAPSHOT_REFRESH
                || (
                    last.dead_lettered,
                    last.dead_lettered_recently,
                    &last.unserved,
                ) != (
                    snapshot.dead_lettered,
                    snapshot.dead_lettered_recently,
                    &snapshot.unserved,
                )
        });
        if !due || self.fence().is_err() {
            return;
        }
        let value = Bytes::from(serde_json::to_vec(&snapshot).expect("snapshots serialize"));
        let put = self.kv.put(SNAPSHOT_KEY, value);
        match tokio::time::timeout(self.write_timeout, put).await {
            Ok(Ok(_)) => self.stored_figures = Some((tokio::time::Instant::now(), snapshot)),
            Ok(Err(err)) => tracing::debug!(error = %err, "task figures not stored"),
            Err(_) => tracing::debug!("task figures not stored in time"),
        }
    }
}

/// Push delivery: the dispatcher's side of [`super::push`].
impl Dispatcher {
    /// A push came back: a failed one fails its attempt (retryable), if that attempt is still
    /// the live one. A delivered one needs nothing: the agent calls back.
    async fn pushed(&mut self, outcome: PushOutcome) {
        let Some(reason) = outcome.failure else {
            return;
        };
        if self.state.busy.contains(&outcome.task_id) {
            // A callback or an expiry of it is being stored: that decides the attempt.
            return;
        }
        let Some(held) = self.state.tasks.get(&outcome.task_id).cloned() else {
            return;
        };
        let still_live = held
            .record
            .live_attempt()
            .is_some_and(|a| a.agent_id == outcome.agent_id && a.attempt == outcome.attempt);
        if !still_live {
            return;
        }
        let mut next = held.record.clone();
        let error = json!({"message": reason, "retryable": true});
        next.fail(Outcome::Failed, error, true, rand::random(), now());
        match self.commit(next, held.revision).await {
            Ok(_) => {
                tracing::info!(task_id = %outcome.task_id, agent_id = %outcome.agent_id, attempt = outcome.attempt, "pushed attempt failed");
                self.run_turns(Vec::new()).await;
            }
            Err(refusal) => {
                // The lease still ends the attempt if this write never lands.
                tracing::warn!(task_id = %outcome.task_id, error = %refusal, "failed push not stored; the lease will expire");
            }
        }
    }

    /// Tells a push agent that held `task_id` it was cancelled (best effort).
    fn tell_cancelled(&self, holder: &AgentId, task_id: &TaskId) {
        let (Some(pusher), Some(agent)) = (&self.pusher, self.directory.get(holder)) else {
            return;
        };
        pusher.tell_cancelled(&agent, task_id);
    }
}

/// The most messages one turn takes in before their writes go out together.
const TURN_MAX: usize = 512;
/// The fewest writes in a turn that go out as an atomic batch; fewer go record by record (at low
/// load a turn holds a write or two, and a single write needs no batch headers or commit).
const BATCH_MIN: usize = 16;
/// The most turns whose writes are in flight at once. While they are, the loop plans and sends
/// the next turn; past this many it lets messages gather into larger turns instead.
const FLIGHTS_MAX: usize = 4;

/// Something the loop took in, handled in a [`Turn`].
enum Item {
    Submission(Box<async_nats::jetstream::Message>),
    Request(async_nats::Message),
}

/// Adds to `items` what the two inputs hold already, without waiting, up to [`TURN_MAX`].
fn drain(
    items: &mut Vec<Item>,
    requests: &mut async_nats::Subscriber,
    incoming: &mut consumer::pull::Stream,
) {
    use futures::FutureExt as _;
    while items.len() < TURN_MAX {
        let before = items.len();
        if let Some(Some(message)) = requests.next().now_or_never() {
            items.push(Item::Request(message));
        }
        if let Some(Some(Ok(message))) = incoming.next().now_or_never() {
            items.push(Item::Submission(Box::new(message)));
        }
        if items.len() == before {
            break;
        }
    }
}

/// One turn of the dispatcher: the changes of many messages, planned in memory and sent to the
/// bucket together; their acknowledgements come back as a [`Flight`]. Up to [`FLIGHTS_MAX`]
/// turns are in flight at once. A task has at most one write in flight ([`State::busy`]); a
/// later message about it waits in [`State::deferred`] until that write landed, so the writes
/// of one task are made in the order their messages came.
#[derive(Default)]
struct Turn {
    writes: Vec<Write>,
    claims: Vec<PlannedClaim>,
    /// Submissions taken in this turn whose record is not planned yet: a claim of the same
    /// turn may take one, and its record is then created `dispatched` in one write.
    fresh: HashMap<TaskId, Fresh>,
}

/// A submission of this turn, queued in memory until the turn is sent.
struct Fresh {
    record: TaskRecord,
    message: Box<async_nats::jetstream::Message>,
    seq: u64,
}

/// The turns in flight, each yielding its [`Flight`] when all its writes came back.
type Flights = FuturesUnordered<BoxFuture<'static, Flight>>;

/// A turn's writes once acknowledged (or not): applied and answered by [`Dispatcher::land`].
struct Flight {
    writes: Vec<Write>,
    claims: Vec<PlannedClaim>,
    results: Vec<Written>,
}

/// A record change to store with its follow-up.
struct Write {
    next: TaskRecord,
    /// The revision it replaces (compare-and-set), or `None` to create it.
    revision: Option<u64>,
    then: Then,
}

/// What a write is for: done once it is stored, undone when it is not.
enum Then {
    /// A new task's record: the submission is acknowledged.
    Admit {
        message: Box<async_nats::jetstream::Message>,
        seq: u64,
    },
    /// An attempt leased for claim number `claim` of the turn; `admitted` when the record is
    /// created with it (a submission of the same turn), whose submission is then acknowledged.
    Claim {
        claim: usize,
        waiting: Waiting,
        attempt: u32,
        admitted: Option<(Box<async_nats::jetstream::Message>, u64)>,
    },
    /// A callback from the holder of the live attempt, answered on `reply`.
    Callback { reply: Subject, agent_id: AgentId },
}

/// How a write went.
enum Written {
    Stored(u64),
    Refused(String),
    TimedOut,
}

/// Stores the records of a turn, away from the loop: a turn of [`BATCH_MIN`] or more writes as
/// atomic batches (one server write, and one fsync, per up to [`SERVER_MAX_BATCH`] records),
/// a smaller one record by record, all sent at once.
struct RecordWriter {
    client: Client,
    kv: Store,
    limit: Duration,
    figures: Arc<TaskGauges>,
}

impl RecordWriter {
    /// Each record's outcome, in order. A batch the server refused (one stale revision refuses
    /// it all, and nothing of it is stored) is written again record by record, so each record
    /// gets its own answer; a batch with no answer in time is "timed out" for all its records,
    /// as a single write with none would be.
    async fn store(&self, records: &[Record]) -> Vec<Written> {
        if records.len() < BATCH_MIN {
            return self.one_by_one(records).await;
        }
        let chunks = records.chunks(SERVER_MAX_BATCH).map(|chunk| async move {
            match batch::write_records(&self.client, &self.kv, chunk, self.limit).await {
                Ok(revisions) => {
                    self.count(BatchOutcome::Committed, chunk.len());
                    revisions.into_iter().map(Written::Stored).collect()
                }
                Err(err @ BatchError::NotStored { .. }) => {
                    tracing::debug!(records = chunk.len(), error = %err, "batch of task records refused; writing them one by one");
                    self.count(BatchOutcome::Refused, 0);
                    self.one_by_one(chunk).await
                }
                Err(err @ BatchError::Unknown { .. }) => {
                    tracing::warn!(records = chunk.len(), error = %crate::telemetry::error_chain(&err), "batch of task records not acknowledged");
                    self.count(BatchOutcome::Unknown, 0);
                    chunk.iter().map(|_| Written::TimedOut).collect::<Vec<_>>()
                }
            }
        });
        futures::future::join_all(chunks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Each record on its own (create, or compare-and-set), all sent before any is awaited.
    async fn one_by_one(&self, records: &[Record]) -> Vec<Written> {
        let (kv, limit) = (&self.kv, self.limit);
        futures::future::join_all(records.iter().map(|record| async move {
            let (key, value) = (&record.key, record.value.clone());
            let written = match record.revision {
                None => tokio::time::timeout(limit, kv.create(key, value))
                    .await
                    .map(|r| r.map_err(|err| err.to_string())),
                Some(revision) => tokio::time::timeout(limit, kv.update(key, value, revision))
                    .await
                    .map(|r| r.map_err(|err| err.to_string())),
            };
            match written {
                Ok(Ok(revision)) => Written::Stored(revision),
                Ok(Err(err)) => Written::Refused(err),
                Err(_) => Written::TimedOut,
            }
        }))
        .await
    }

    fn count(&self, outcome: BatchOutcome, stored: usize) {
        self.figures
            .update(|figures| figures.batch_ended(outcome, stored));
    }
}

/// Who a claim planned in a turn is for.
enum ClaimFor {
    /// A claim request, or a waiting one (`deadline` set), answered on `reply`.
    Reply {
        reply: Subject,
        deadline: Option<tokio::time::Instant>,
    },
    /// A push agent: what it is leased is sent to it.
    Push(AgentRecord),
}

struct PlannedClaim {
    request: ClaimRequest,
    to: ClaimFor,
    /// What was leased, as the agent is told it, once stored.
    tasks: Vec<Value>,
    refusal: Option<Refusal>,
}

impl Dispatcher {
    /// Plans a turn for `items` (and for waiting claims and push agents) and sends its writes;
    /// with [`FLIGHTS_MAX`] turns in flight already, the items wait for one to land.
    async fn run_turns(&mut self, items: Vec<Item>) {
        if self.in_flight() >= FLIGHTS_MAX {
            self.state.deferred.extend(items);
            return;
        }
        let mut turn = Turn::default();
        // Submissions first, so that a claim of this turn (or one already waiting) can take
        // them; then the claims waiting longest; then the rest in the order they came.
        let (submissions, requests): (Vec<_>, Vec<_>) = items
            .into_iter()
            .partition(|item| matches!(item, Item::Submission(_)));
        let mut waiters_planned = false;
        for item in submissions.into_iter().chain(requests) {
            match item {
                Item::Submission(message) => self.plan_submission(&mut turn, message).await,
                Item::Request(message) => {
                    if !waiters_planned {
                        waiters_planned = true;
                        self.plan_waiters(&mut turn).await;
                    }
                    self.plan_request(&mut turn, message).await;
                }
            }
        }
        if !waiters_planned {
            self.plan_waiters(&mut turn).await;
        }
        self.plan_pushes(&mut turn).await;
        self.settle_fresh(&mut turn);
        if !turn.writes.is_empty() {
            self.launch(turn);
        }
    }

    /// The submissions of the turn no claim took get their record created `queued`; they
    /// leave the queue until it is stored.
    fn settle_fresh(&mut self, turn: &mut Turn) {
        for (task_id, fresh) in std::mem::take(&mut turn.fresh) {
            self.state.queue.remove(&task_id);
            self.state.busy.insert(task_id);
            turn.writes.push(Write {
                next: fresh.record,
                revision: None,
                then: Then::Admit {
                    message: fresh.message,
                    seq: fresh.seq,
                },
            });
        }
    }

    /// Sends the turn's writes, all at once; they come back through [`Dispatcher::flights`].
    fn launch(&mut self, turn: Turn) {
        let Turn { writes, claims, .. } = turn;
        let records: Vec<Record> = writes
            .iter()
            .map(|w| Record {
                key: w.next.task_id.as_str().to_owned(),
                value: encode(&w.next),
                revision: w.revision,
            })
            .collect();
        let writer = RecordWriter {
            client: self.client.clone(),
            kv: self.kv.clone(),
            limit: self.write_timeout,
            figures: self.figures.clone(),
        };
        self.flights_mut().push(Box::pin(async move {
            let results = writer.store(&records).await;
            Flight {
                writes,
                claims,
                results,
            }
        }));
    }

    /// A turn's writes came back: each stored one is applied in memory and answered, then the
    /// messages that waited for them are planned.
    async fn land(&mut self, flight: Flight) {
        self.apply_flight(flight).await;
        let deferred = std::mem::take(&mut self.state.deferred);
        self.run_turns(deferred).await;
    }

    /// Applies and answers each write of a turn, as it was stored or not.
    async fn apply_flight(&mut self, flight: Flight) {
        let Flight {
            writes,
            mut claims,
            results,
        } = flight;
        for (write, written) in writes.into_iter().zip(results) {
            self.state.busy.remove(&write.next.task_id);
            if let Then::Claim { claim, .. } = &write.then {
                let agent_id = &claims[*claim].request.agent_id;
                if let Some(count) = self.state.reserved.get_mut(agent_id) {
                    *count = count.saturating_sub(1);
                }
            }
            self.landed(write, written, &mut claims).await;
        }
        self.finish_claims(claims).await;
    }

    fn flights_mut(&mut self) -> &mut Flights {
        self.flights
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn in_flight(&mut self) -> usize {
        self.flights_mut().len()
    }

    /// Waits for every turn in flight and applies it (before standing down or stopping).
    async fn land_all(&mut self) {
        while let Some(flight) = self.flights_mut().next().await {
            self.apply_flight(flight).await;
        }
    }

    /// True when a message about `task_id` must wait: the task has a write in flight, or its
    /// submission is in this turn.
    fn is_busy(&self, turn: &Turn, task_id: &TaskId) -> bool {
        self.state.busy.contains(task_id) || turn.fresh.contains_key(task_id)
    }

    /// A submission: its record is created (create-only, so a redelivery changes nothing);
    /// meanwhile it is queued in memory for the claims of this turn.
    async fn plan_submission(
        &mut self,
        turn: &mut Turn,
        message: Box<async_nats::jetstream::Message>,
    ) {
        let seq = message.info().map(|info| info.stream_sequence).unwrap_or(0);
        let submission = match serde_json::from_slice::<Submission>(&message.payload) {
            Ok(submission) => submission,
            Err(err) => {
                tracing::warn!(subject = %message.subject, error = %err, "unreadable submission; skipped");
                let _ = message.ack_with(async_nats::jetstream::AckKind::Term).await;
                return;
            }
        };
        if self.is_busy(turn, &submission.task_id) {
            self.state.deferred.push(Item::Submission(message));
            return;
        }
        if self.state.tasks.contains_key(&submission.task_id) {
            self.taken_in(message, seq).await;
            return;
        }
        if let Err(refusal) = self.fence() {
            tracing::warn!(error = %refusal, "cannot store a task record; the submission will come again");
            return;
        }
        let record = TaskRecord::queued(submission, seq);
        self.state.queue.push(waiting_of(&record));
        turn.fresh.insert(
            record.task_id.clone(),
            Fresh {
                record,
                message,
                seq,
            },
        );
    }

    /// One request from the ingress. Cancel and replay (rare) are written at once; a message
    /// about a busy task waits ([`Dispatcher::is_busy`]).
    async fn plan_request(&mut self, turn: &mut Turn, message: async_nats::Message) {
        let Some(reply) = message.reply.clone() else {
            return;
        };
        let subject = message.subject.as_str();
        let answer = match subject {
            subjects::DISPATCH_CLAIM => match decode::<ClaimRequest>(&message.payload) {
                Ok(request) => {
                    let to = ClaimFor::Reply {
                        reply,
                        deadline: None,
                    };
                    self.plan_claim(turn, request, to).await;
                    return;
                }
                Err(refusal) => Err(refusal),
            },
            subjects::DISPATCH_CALLBACK => match decode::<CallbackRequest>(&message.payload) {
                Ok(request) if self.is_busy(turn, &request.task_id) => {
                    self.state.deferred.push(Item::Request(message));
                    return;
                }
                Ok(request) => match self.plan_callback(turn, request, reply.clone()).await {
                    Some(answer) => answer,
                    None => return,
                },
                Err(refusal) => Err(refusal),
            },
            subjects::DISPATCH_CANCEL => match decode::<CancelRequest>(&message.payload) {
                Ok(request) if self.is_busy(turn, &request.task_id) => {
                    self.state.deferred.push(Item::Request(message));
                    return;
                }
                Ok(request) => self.cancel(request).await,
                Err(refusal) => Err(refusal),
            },
            subjects::DISPATCH_REPLAY => match decode::<ReplayRequest>(&message.payload) {
                Ok(request) if self.is_busy(turn, &request.task_id) => {
                    self.state.deferred.push(Item::Request(message));
                    return;
                }
                Ok(request) => self.replay(request).await,
                Err(refusal) => Err(refusal),
            },
            other => Err(Refusal::internal(format!("no dispatcher request {other}"))),
        };
        self.answer(reply, answer).await;
    }

    /// A callback from the agent holding the live attempt plans its change; anything else is
    /// answered now: a duplicate of the final report, or refused with nothing stored.
    async fn plan_callback(
        &mut self,
        turn: &mut Turn,
        request: CallbackRequest,
        reply: Subject,
    ) -> Option<Result<Value, Refusal>> {
        let held = match self.lookup(&request.task_id).await {
            Ok(held) => held,
            Err(refusal) => return Some(Err(refusal)),
        };
        let record = &held.record;
        let holds = record
            .live_attempt()
            .is_some_and(|a| a.agent_id == request.agent_id);
        if !holds {
            return Some(repeated(record, held.revision, &request));
        }
        if let Err(refusal) = self.fence() {
            return Some(Err(refusal));
        }
        let mut next = record.clone();
        let now = now();
        match &request.report {
            Report::Running { .. } => next.mark_running(now),
            Report::Succeeded { result } => next.succeed(result.clone(), now),
            Report::Failed { error } => next.fail(
                Outcome::Failed,
                json!({"message": error.message, "retryable": error.retryable}),
                error.retryable,
                rand::random(),
                now,
            ),
        }
        self.state.busy.insert(next.task_id.clone());
        turn.writes.push(Write {
            next,
            revision: Some(held.revision),
            then: Then::Callback {
                reply,
                agent_id: request.agent_id,
            },
        });
        None
    }

    /// A claim: the tasks it leases are planned now and answered when their writes landed. A
    /// claim that gets nothing is answered now, or (with a `wait`) waits for a task to arrive.
    async fn plan_claim(&mut self, turn: &mut Turn, request: ClaimRequest, to: ClaimFor) {
        let claim = turn.claims.len();
        let planned = turn.writes.len();
        let refusal = match self.directory.get(&request.agent_id) {
            // Registered a moment ago, and the view has not caught up: nothing yet (a waiting
            // claim is looked at again). Never registered: 404.
            None => match self.directory.is_known(&request.agent_id).await {
                Ok(true) => None,
                Ok(false) => Some(Refusal::new(Code::AgentNotFound)),
                Err(err) => Some(Refusal::from(err)),
            },
            Some(agent) => self.plan_take(turn, claim, &agent, &request).err(),
        };
        let claim = PlannedClaim {
            request,
            to,
            tasks: Vec::new(),
            refusal,
        };
        if turn.writes.len() == planned {
            self.finish_claims(vec![claim]).await;
        } else {
            turn.claims.push(claim);
        }
    }

    /// Leases up to the claim's `max` tasks (and the agent's free slots) to `agent`.
    fn plan_take(
        &mut self,
        turn: &mut Turn,
        claim: usize,
        agent: &AgentRecord,
        request: &ClaimRequest,
    ) -> Result<(), Refusal> {
        let agent_id = &agent.agent_id;
        let capabilities = self.claimable(agent, request.capabilities.as_deref());
        if capabilities.is_empty() || self.state.queue.is_empty() {
            return Ok(());
        }
        self.fence()?;
        let live = self.state.live.get(agent_id).copied().unwrap_or(0)
            + self.state.reserved.get(agent_id).copied().unwrap_or(0);
        let slots = agent.profile.max_concurrent_tasks.saturating_sub(live);
        let mut taken = 0;
        while taken < request.max.min(slots) {
            let state = &mut self.state;
            let (fresh, directory) = (&turn.fresh, &self.directory);
            let popped = state.queue.pop_for(&capabilities, |task_id| {
                // A fresh task has had no attempt, so no agent failed it.
                fresh.contains_key(task_id)
                    || (!state.busy.contains(task_id)
                        && state
                            .tasks
                            .get(task_id)
                            .is_some_and(|held| prefers(directory, &held.record, agent_id)))
            });
            let Some(waiting) = popped else {
                break;
            };
            let (mut next, revision, admitted) = match turn.fresh.remove(&waiting.task_id) {
                Some(fresh) => (fresh.record, None, Some((fresh.message, fresh.seq))),
                None => match self.state.tasks.get(&waiting.task_id) {
                    Some(held) => (held.record.clone(), Some(held.revision), None),
                    None => continue,
                },
            };
            let attempt = next.start_attempt(agent_id, now());
            self.state.busy.insert(waiting.task_id.clone());
            *self.state.reserved.entry(agent_id.clone()).or_default() += 1;
            taken += 1;
            turn.writes.push(Write {
                next,
                revision,
                then: Then::Claim {
                    claim,
                    waiting,
                    attempt,
                    admitted,
                },
            });
        }
        Ok(())
    }

    /// Waiting claims get what is queued now.
    async fn plan_waiters(&mut self, turn: &mut Turn) {
        if self.state.waiters.is_empty() || self.state.queue.is_empty() {
            return;
        }
        for waiter in std::mem::take(&mut self.state.waiters) {
            let to = ClaimFor::Reply {
                reply: waiter.reply,
                deadline: Some(waiter.deadline),
            };
            self.plan_claim(turn, waiter.request, to).await;
        }
    }

    /// Push agents with free slots are leased queued tasks, by the same rules as a claim
    /// ([`Dispatcher::plan_take`]: online first, degraded only for capabilities no online agent
    /// has, `max_concurrent_tasks`, a retry away from an agent that failed it).
    async fn plan_pushes(&mut self, turn: &mut Turn) {
        if self.state.queue.is_empty()
            || self.pusher.is_none()
            || !self
                .directory
                .any(|agent| agent.profile.push_channel().is_some())
        {
            return;
        }
        for agent in self.directory.list() {
            if agent.profile.push_channel().is_none() {
                continue;
            }
            if self.state.queue.is_empty() {
                break;
            }
            let live = self.state.live.get(&agent.agent_id).copied().unwrap_or(0)
                + self
                    .state
                    .reserved
                    .get(&agent.agent_id)
                    .copied()
                    .unwrap_or(0);
            if live >= agent.profile.max_concurrent_tasks {
                continue;
            }
            let request = ClaimRequest {
                agent_id: agent.agent_id.clone(),
                capabilities: None,
                max: agent.profile.max_concurrent_tasks,
                wait_ms: 0,
            };
            self.plan_claim(turn, request, ClaimFor::Push(agent)).await;
        }
    }

    /// One write of a turn landed (or did not): what an agent is told is what was stored.
    async fn landed(&mut self, write: Write, written: Written, claims: &mut [PlannedClaim]) {
        let Write {
            next,
            revision,
            then,
        } = write;
        let task_id = next.task_id.clone();
        let timed_out = matches!(written, Written::TimedOut);
        let refusal = match written {
            Written::Stored(stored) => {
                match then {
                    Then::Admit { message, seq } => {
                        tracing::info!(%task_id, capability = %next.spec.capability, "task queued");
                        self.apply(Held {
                            record: next,
                            revision: stored,
                        });
                        self.taken_in(message, seq).await;
                    }
                    Then::Claim {
                        claim,
                        attempt,
                        admitted,
                        ..
                    } => {
                        let claim = &mut claims[claim];
                        tracing::info!(%task_id, agent_id = %claim.request.agent_id, attempt, "task dispatched");
                        claim.tasks.push(json!({
                            "task_id": next.task_id,
                            "capability": next.spec.capability,
                            "input": next.spec.input,
                            "attempt": attempt,
                            "lease_expires_at": next.lease_expires_at,
                            "priority": next.spec.priority,
                        }));
                        if admitted.is_some() {
                            self.count(None, &next);
                        }
                        self.apply(Held {
                            record: next,
                            revision: stored,
                        });
                        if let Some((message, seq)) = admitted {
                            self.taken_in(message, seq).await;
                        }
                    }
                    Then::Callback { reply, agent_id } => {
                        tracing::info!(%task_id, agent_id = %agent_id, status = next.status.as_str(), "task callback stored");
                        let answer = callback_answer(&next, stored, false);
                        self.apply(Held {
                            record: next,
                            revision: stored,
                        });
                        self.answer(reply, Ok(answer)).await;
                    }
                }
                return;
            }
            Written::Refused(err) => {
                if revision.is_some() {
                    // Another writer, or a lost answer to our own write: believe the bucket.
                    tracing::warn!(%task_id, error = %err, "task record changed under the dispatcher; reloading");
                    if let Some(current) = self.state.tasks.remove(&task_id) {
                        self.unindex(&current.record);
                    }
                    if self.read(&task_id).await.is_err() {
                        // Forgotten here and not read back: rebuild on the next tick (see
                        // `commit`).
                        self.out_of_step = true;
                    }
                }
                Refusal::bus_unavailable(err)
            }
            Written::TimedOut => Refusal::bus_unavailable("task record write timed out"),
        };
        // A create that failed: created meanwhile (a redelivery, a takeover), so read what is
        // there and acknowledge; or not stored, and the submission comes again.
        let admitted = match then {
            Then::Admit { message, seq } => Some((message, seq)),
            Then::Claim {
                claim,
                waiting,
                admitted,
                ..
            } => {
                // Not stored: back in the queue (reloaded above if it changed).
                if let Some(held) = self.state.tasks.get(&waiting.task_id) {
                    if held.record.status == TaskStatus::Queued {
                        self.state.queue.push(waiting);
                    }
                }
                claims[claim].refusal.get_or_insert(refusal.clone());
                admitted
            }
            Then::Callback { reply, .. } => {
                self.answer(reply, Err(refusal.clone())).await;
                None
            }
        };
        if let Some((message, seq)) = admitted {
            let read = if revision.is_none() && !timed_out {
                self.read(&task_id).await.ok().flatten()
            } else {
                None
            };
            if read.is_some() {
                self.taken_in(message, seq).await;
            } else {
                tracing::warn!(error = %refusal, "cannot store a task record; the submission will come again");
            }
        }
    }

    /// Answers the claims, sends push agents theirs, and puts back to wait the claims that got
    /// nothing and may wait.
    async fn finish_claims(&mut self, claims: Vec<PlannedClaim>) {
        for claim in claims {
            let PlannedClaim {
                request,
                to,
                tasks,
                refusal,
            } = claim;
            match to {
                ClaimFor::Push(agent) => {
                    if let Some(pusher) = &self.pusher {
                        for task in &tasks {
                            pusher.deliver(&agent, task);
                        }
                    }
                    if let (true, Some(refusal)) = (tasks.is_empty(), refusal) {
                        tracing::debug!(agent_id = %agent.agent_id, error = %refusal, "nothing pushed to this agent now");
                    }
                }
                ClaimFor::Reply { reply, deadline } => match (tasks.is_empty(), refusal) {
                    (false, _) => self.answer(reply, Ok(claimed(tasks))).await,
                    (true, Some(refusal)) => self.answer(reply, Err(refusal)).await,
                    (true, None) if request.wait_ms == 0 => {
                        self.answer(reply, Ok(claimed(Vec::new()))).await;
                    }
                    (true, None) => {
                        let deadline = deadline.unwrap_or_else(|| {
                            tokio::time::Instant::now() + Duration::from_millis(request.wait_ms)
                        });
                        self.state.waiters.push(Waiter {
                            reply,
                            request,
                            deadline,
                        });
                    }
                },
            }
        }
    }
}

/// How a queued record waits in the [`TaskQueue`].
fn waiting_of(record: &TaskRecord) -> Waiting {
    Waiting {
        task_id: record.task_id.clone(),
        capability: record.spec.capability.clone(),
        priority: record.spec.priority,
        tenant: record.spec.tenant.clone(),
        queued_at: record.waiting_since(),
        seq: record.seq,
    }
}
