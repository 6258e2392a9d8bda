//! The NATS door: the second way in, for agents that publish on NATS instead of calling HTTP.
//!
//! Agents publish the same JSON bodies as the HTTP calls on the inbound subjects
//! (`acc.in.register`, `acc.in.heartbeat`, `acc.in.task_result.<task_id>`, `acc.in.event`), with
//! the JWT in an `Authorization: Bearer …` header. The door's [`intake`] authenticates each
//! publish and stores it in `ACC_INBOUND` with a dedupe id scoped to its agent, then answers with
//! the PubAck, so a publish the intake acknowledged is kept even if the door stops right after
//! (with no door running, a publish gets "no responders"). The door is a durable consumer
//! on that stream that serves callers in turn (see [`Door::run`]; each message is handled and
//! settled by the shared [`crate::workers::process`]) and runs, per message, exactly
//! what the HTTP door runs: [`Authenticator::verify_header`], the scope check, then [`Admission::admit`] — same
//! validation, identity binding, stamping, verified subject and dedupe id. The answer is the JSON
//! body HTTP would return, sent on the caller's reply subject (`Acc-Reply-To`, which must lie in
//! the caller's own namespace `acc.reply.<agent_id>.>`) with the HTTP status in `Acc-Status`.
//!
//! A message admission refuses (a 4xx over HTTP) never reaches a verified subject: it is stored
//! on `acc.rejected.<CODE>` with the reason and the authenticated caller in headers, counted per
//! code (a [`Tally`]), and charged to the caller's token bucket. A caller whose bucket is
//! empty gets `RATE_LIMITED` (429) for every further message, without admission, until the bucket
//! refills (drop with record: the refused message is in `ACC_REJECTED`). Valid messages count
//! against the same per-agent rate as HTTP requests ([`AgentRate`], one bucket per agent shared
//! by both doors): over it, `RATE_LIMITED` with `Retry-After`, recorded the same way, so one
//! agent's flood is refused cheaply instead of queueing ahead of every other agent. A message in
//! admission holds one of its agent's slots in flight ([`AgentSlots`], shared with the HTTP door):
//! an agent holding all of them over HTTP gets `RATE_LIMITED` on the door too. A failure on our side
//! (a 5xx over HTTP: the bus did not acknowledge) is not the caller's fault: the message is left
//! to redelivery, and dead-lettered by the shared loop if it never succeeds.
//!
//! Tasks ride the same door: `acc.in.task_submit` and `acc.in.task_claim` carry the bodies of
//! `POST /orchestrator/tasks` and `POST /orchestrator/tasks/claim`, and a result on
//! `acc.in.task_result.<task_id>` for a task the orchestrator queued goes to the dispatcher, all
//! through [`Tasks`] as over HTTP. A claim's scope and body are checked in order like every
//! message; its `wait` is then served by a task of its own, which answers on the reply subject
//! when the dispatcher does, so the door goes on with the next message meanwhile (at most
//! [`MAX_WAITING_CLAIMS`] wait at once; past that, and for a claim without `Acc-Reply-To`, the
//! claim is answered at once as if `wait` were 0). A refusal the dispatcher gives a waiting
//! claim (e.g. `AGENT_NOT_FOUND`) is answered, not stored on `acc.rejected.*`.
//!
//! A registration with `"dispatch": "push"` on the door is stamped `push_over: nats`: the
//! dispatcher pushes that agent's tasks to `acc.reply.<agent_id>.tasks.push` (and cancels to
//! `acc.reply.<agent_id>.tasks.cancel`), never to its `base_url`.
//!
//! Every message is handled in a `door.admit` span.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::stream::Stream;
use async_nats::jetstream::{AckKind, Message};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::admission::{Admission, Call};
use crate::audit::{Audit, is_refused_credential};
use crate::auth::{Authenticator, Caller, EVENTS_SCOPE, REGISTER_SCOPE, SUBMIT_SCOPE, TASK_SCOPE};
use crate::bus::{PublishFailure, Publisher, subjects};
use crate::contract::bucket::{AgentRate, Buckets, retry_after_secs};
use crate::contract::slots::{AgentSlot, AgentSlots};
use crate::contract::{self, Code, Refusal, Tally};
use crate::tasks::Tasks;
use crate::workers::{self, HandleError, Handler, MAX_DELIVER};

pub mod intake;

/// The caller key of messages whose token did not verify: they share one bucket.
const ANONYMOUS: &str = "anonymous";
/// Longest reply subject the door publishes on.
const MAX_REPLY_SUBJECT: usize = 256;
/// Most claims over the door waiting for tasks at once.
pub const MAX_WAITING_CLAIMS: usize = 4096;

/// The NATS door's limit on rejections: a token bucket per caller.
#[derive(Debug, Clone)]
pub struct DoorSettings {
    /// Rejections a caller may cause in a burst.
    pub reject_burst: u32,
    /// One rejection is allowed again after this long.
    pub reject_interval: Duration,
    /// Largest accepted message body (`BODY_LIMIT`, as over HTTP).
    pub body_limit: usize,
}

/// The door's limit on rejections: one token bucket per caller (unauthenticated messages share
/// one, [`ANONYMOUS`]). A caller with no token left gets `RATE_LIMITED` without admission.
type RejectionLimiter = Buckets<str>;

/// The door role: admits inbound NATS messages with the HTTP door's admission.
pub struct Door {
    admission: Admission,
    verifier: Authenticator,
    publisher: Publisher,
    client: Client,
    body_limit: usize,
    limiter: RejectionLimiter,
    /// The per-agent rate, shared with the HTTP door: valid messages count against it too.
    agent_rate: Arc<AgentRate>,
    /// Requests in flight per agent, shared with the HTTP door: a message in admission holds
    /// one of its agent's slots, so an agent's HTTP requests and NATS messages in flight count
    /// together against `MAX_IN_FLIGHT_PER_AGENT`. `None`: no cap.
    agent_slots: Option<Arc<AgentSlots>>,
    tally: Arc<Tally>,
    tasks: Tasks,
    /// Permits for claims waiting in their own task.
    waiting_claims: Arc<tokio::sync::Semaphore>,
    /// Refused credentials go on the audit trail, as over HTTP.
    audit: Audit,
}

impl Door {
    pub fn new(
        admission: Admission,
        tasks: Tasks,
        verifier: Authenticator,
        publisher: Publisher,
        settings: &DoorSettings,
        agent_rate: Arc<AgentRate>,
        tally: Arc<Tally>,
    ) -> Self {
        let client = publisher.client().clone();
        Self {
            audit: Audit::new(publisher.clone()),
            tasks,
            admission,
            verifier,
            publisher,
            client,
            body_limit: settings.body_limit,
            limiter: Buckets::per_interval(settings.reject_interval, settings.reject_burst),
            agent_rate,
            agent_slots: None,
            tally,
            waiting_claims: Arc::new(tokio::sync::Semaphore::new(MAX_WAITING_CLAIMS)),
        }
    }

    /// Counts each message in admission against its agent's slots (shared with the HTTP door).
    pub fn with_agent_slots(mut self, slots: Arc<AgentSlots>) -> Self {
        self.agent_slots = Some(slots);
        self
    }

    /// One of `caller`'s slots while its message is admitted, or 429 when it holds them all.
    fn hold_slot(&self, caller: &Caller) -> Result<Option<AgentSlot>, Refusal> {
        self.agent_slots
            .as_ref()
            .map(|slots| slots.acquire(caller.agent_id.as_str()))
            .transpose()
    }

    /// Consumes `ACC_INBOUND` until `stop` fires, serving callers in turn: messages are pulled
    /// ahead of handling (up to [`WINDOW`]) into one queue per caller, and the door takes one
    /// message from each caller with messages waiting before it takes a second from any, so one
    /// agent's backlog does not delay another agent's answer. Each caller's own messages keep
    /// their order. The [`intake`] runs beside it, storing what agents publish. On `stop`, the
    /// intake takes no new publish and finishes those in hand, the message in hand is finished,
    /// and every message pulled but not handled is given back to the server at once (nak), for
    /// the next door to take.
    pub async fn run(self, inbound: Stream, stop: CancellationToken) -> anyhow::Result<()> {
        let consumer = durable_consumer(&inbound).await?;
        let door = Arc::new(self);
        let taking = tokio::spawn(intake::serve(
            door.clone(),
            intake::subscribe(&door).await?,
            stop.clone(),
        ));
        let queue = Arc::new(FairQueue::default());
        let pulling = tokio::spawn(pull_ahead(
            consumer,
            queue.clone(),
            door.verifier.clone(),
            stop.clone(),
        ));
        while let Some(message) = queue.next(&stop).await {
            workers::process(
                &door.publisher,
                subjects::INBOUND_STREAM,
                subjects::DOOR_CONSUMER,
                &*door,
                message,
            )
            .await;
        }
        let _ = pulling.await;
        let _ = taking.await;
        for message in queue.drain() {
            if let Err(err) = message.ack_with(AckKind::Nak(None)).await {
                tracing::warn!(error = %err, "cannot give a message back; it is redelivered after its ack wait");
            }
        }
        Ok(())
    }

    async fn admit_one(&self, message: &Message) -> Result<(), HandleError> {
        let headers = message.headers.as_ref();
        let inbound_seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let span = tracing::Span::current();

        let authorization = header(headers, "Authorization").map(str::as_bytes);
        let caller = self.verifier.verify_header(authorization).await;
        let caller_key = match &caller {
            Ok(caller) => {
                span.record("agent_id", caller.agent_id.as_str());
                caller.agent_id.to_string()
            }
            Err(_) => ANONYMOUS.to_owned(),
        };
        // Answers go only to the authenticated caller's own namespace; an unauthenticated
        // message cannot be attributed to anyone, so it is recorded but not answered.
        let requested_reply = header(headers, subjects::REPLY_TO);
        let reply = match (&caller, requested_reply) {
            (Ok(caller), Some(raw)) => reply_subject(caller, raw),
            _ => None,
        };

        let outcome = match (self.limiter.check(&caller_key), caller) {
            (Err(wait), _) => Err(Refusal::rate_limited(retry_after_secs(wait))
                .with_message("Too many rejected messages from this caller; retry later")),
            (Ok(()), Err(err)) => Err(Refusal::from(err)),
            (Ok(()), Ok(_)) if requested_reply.is_some() && reply.is_none() => {
                Err(Refusal::new(Code::InvalidReplyTo))
            }
            (Ok(()), Ok(caller)) => match self
                .agent_rate
                .admit(caller.agent_id.as_str())
                .and_then(|()| self.hold_slot(&caller))
            {
                Ok(_slot) => {
                    self.admit(message, &caller, inbound_seq, reply.as_deref())
                        .await
                }
                Err(refusal) => Err(refusal),
            },
        };
        match outcome {
            Ok(Some(answer)) => {
                self.tally.admit();
                span.record("code", "OK");
                self.answer(reply.as_deref(), 200, None, &answer).await;
                Ok(())
            }
            // A waiting claim: its own task answers.
            Ok(None) => {
                self.tally.admit();
                span.record("code", "OK");
                Ok(())
            }
            Err(refusal) if refusal.code().is_server_error() => Err(HandleError::transient_by(
                "admission failed on our side",
                refusal,
            )),
            Err(refusal) => {
                span.record("code", refusal.code().as_str());
                self.reject(message, inbound_seq, &caller_key, &refusal)
                    .await?;
                let body = refusal.body();
                self.answer(
                    reply.as_deref(),
                    refusal.status(),
                    refusal.retry_after(),
                    &body,
                )
                .await;
                Ok(())
            }
        }
    }

    /// Runs admission on an authenticated message: the body checks of the HTTP extractor, then
    /// [`Admission::admit`]. `None` when a task of its own answers later (a waiting claim).
    async fn admit(
        &self,
        message: &Message,
        caller: &Caller,
        inbound_seq: u64,
        reply: Option<&str>,
    ) -> Result<Option<Value>, Refusal> {
        let headers = message.headers.as_ref();
        // The subject's scope, on every message, as the HTTP door checks a route's.
        if let Some(scope) = scopes_of(&message.subject).and_then(|s| caller.lacks_all(s)) {
            return Err(Refusal::insufficient_scope(scope));
        }
        // A result's stored-result read is made side by side with the look-up of whether the
        // orchestrator queued its task, as over HTTP.
        let mut call = call_of(&message.subject);
        let stored;
        let task_answer = match call {
            Some(Call::TaskResult { task_id, .. }) => {
                let (answer, read) = tokio::join!(
                    self.task_call(message, caller, reply),
                    self.admission.stored_result(task_id),
                );
                stored = read;
                if let Some(Call::TaskResult { stored: slot, .. }) = &mut call {
                    *slot = Some(&stored);
                }
                answer
            }
            _ => self.task_call(message, caller, reply).await,
        };
        if let Some(answer) = task_answer? {
            return Ok(answer);
        }
        let Some(call) = call else {
            return Err(Refusal::new(Code::NotFound)
                .with_message(format!("No route for {}", message.subject)));
        };
        let mut body = contract::json_object(&message.payload, self.body_limit)?;
        if matches!(call, Call::Register) && body.get("dispatch") == Some(&Value::from("push")) {
            body.insert("push_over".into(), "nats".into());
        }
        // A header that is not text is passed on as an empty key, refused by admission as over
        // HTTP. Without an `Idempotency-Key`, the agent's `Nats-Msg-Id` is the key (the intake
        // passes it on as `Idempotency-Key`): admission scopes every key to the authenticated
        // agent. A heartbeat with neither gets its key from its place in the inbound stream, so
        // a redelivery after a door crash is the same heartbeat, not a second one.
        let sent_key = header(headers, subjects::IDEMPOTENCY_KEY);
        let derived;
        let key = match (call, sent_key) {
            (_, Some(key)) => Some(key),
            (Call::Heartbeat, None) => {
                derived = format!("nats-in-{inbound_seq}");
                Some(derived.as_str())
            }
            (_, None) => None,
        };
        let answer = self.admission.admit(call, caller, body, key).await?;
        Ok(Some(
            serde_json::to_value(answer).expect("answers serialize"),
        ))
    }

    /// The task calls: a submission, a claim, or a result for a task the orchestrator queued.
    /// `None` for every other message; `Some(None)` for a claim that waits in its own task.
    async fn task_call(
        &self,
        message: &Message,
        caller: &Caller,
        reply: Option<&str>,
    ) -> Result<Option<Option<Value>>, Refusal> {
        let subject = message.subject.as_str();
        let task_result = subject.strip_prefix(subjects::INBOUND_TASK_RESULT_PREFIX);
        if subject != subjects::INBOUND_TASK_SUBMIT
            && subject != subjects::INBOUND_TASK_CLAIM
            && task_result.is_none()
        {
            return Ok(None);
        }
        let mut body = contract::json_object(&message.payload, self.body_limit)?;
        match task_result {
            Some(task_id) => Ok(self.tasks.callback(caller, task_id, &body).await?.map(Some)),
            None if subject == subjects::INBOUND_TASK_SUBMIT => self
                .tasks
                .submit(caller, &body)
                .await
                .map(|a| Some(Some(a))),
            None => self.claim(caller, &mut body, reply).await.map(Some),
        }
    }

    /// A claim: one that may wait, with somewhere to answer and a free permit, is handed to a
    /// task of its own (`None`); any other is answered at once as with `wait: 0`.
    async fn claim(
        &self,
        caller: &Caller,
        body: &mut serde_json::Map<String, Value>,
        reply: Option<&str>,
    ) -> Result<Option<Value>, Refusal> {
        let mut request = self.tasks.claim_request(caller, body)?;
        let permit = match reply {
            Some(_) if request.wait_ms > 0 => self.waiting_claims.clone().try_acquire_owned().ok(),
            _ => None,
        };
        let (Some(permit), Some(reply)) = (permit, reply) else {
            request.wait_ms = 0;
            return self.tasks.ask_claim(&request).await.map(Some);
        };
        let (tasks, client, reply) = (self.tasks.clone(), self.client.clone(), reply.to_owned());
        tokio::spawn(
            async move {
                let _permit = permit;
                let (status, retry_after, body) = match tasks.ask_claim(&request).await {
                    Ok(answer) => (200, None, answer),
                    Err(refusal) => (refusal.status(), refusal.retry_after(), refusal.body()),
                };
                send_answer(&client, &reply, status, retry_after, &body).await;
            }
            .in_current_span(),
        );
        Ok(None)
    }

    /// Stores the refused message on `acc.rejected.<code>` with the reason, counts it and
    /// charges the caller. A full rejected stream must not stop the door: the rejection is then
    /// only counted and logged.
    async fn reject(
        &self,
        message: &Message,
        inbound_seq: u64,
        caller_key: &str,
        refusal: &Refusal,
    ) -> Result<(), HandleError> {
        self.record_rejection(
            &message.subject,
            message.payload.clone(),
            Some(inbound_seq),
            caller_key,
            refusal,
        )
        .await
    }

    /// [`Door::reject`] of a message on `subject` with `payload`, at `inbound_seq` in
    /// `ACC_INBOUND` (`None`: the intake refused it, so it was never stored there).
    async fn record_rejection(
        &self,
        subject: &str,
        payload: Bytes,
        inbound_seq: Option<u64>,
        caller_key: &str,
        refusal: &Refusal,
    ) -> Result<(), HandleError> {
        let reason = refusal.reason();
        let mut headers = HeaderMap::new();
        let code = refusal.code();
        headers.insert(subjects::REJECTED_CODE, code.as_str());
        headers.insert(
            subjects::REJECTED_STATUS,
            code.status().to_string().as_str(),
        );
        headers.insert(subjects::REJECTED_REASON, truncate(&reason, 512));
        if caller_key != ANONYMOUS {
            headers.insert(subjects::REJECTED_CALLER, caller_key);
        }
        headers.insert(subjects::REJECTED_SUBJECT, subject);
        if let Some(seq) = inbound_seq {
            headers.insert(subjects::REJECTED_SEQUENCE, seq.to_string().as_str());
        }
        // A caller over its rate or quota is recorded without its body: a flood (with or without
        // a token) costs `ACC_REJECTED` a few hundred bytes a message, not its payloads.
        let payload = match code {
            Code::RateLimited | Code::QuotaExceeded => Bytes::new(),
            _ => payload,
        };
        // Redelivered, a stored message is recorded once; the intake's refusals are all distinct.
        let msg_id = match inbound_seq {
            Some(seq) => format!("rejected:{seq}"),
            None => format!("rejected:intake:{:032x}", rand::random::<u128>()),
        };
        let stored = self
            .publisher
            .publish(
                subjects::rejected(code.as_str()),
                &msg_id,
                payload,
                Some(headers),
            )
            .await;
        match stored {
            Ok(_) => {}
            Err(err @ (PublishFailure::StreamFull(_) | PublishFailure::TooLarge)) => {
                tracing::error!(error = %err, "cannot store the rejection; counting it only");
            }
            Err(err) => return Err(HandleError::transient_by("storing rejection", err)),
        }
        if code != Code::RateLimited {
            let _ = self.limiter.take(caller_key);
        }
        // Bounded like the rejections: a caller out of tokens gets `RATE_LIMITED`, not recorded.
        if is_refused_credential(code) {
            let actor = (caller_key != ANONYMOUS).then_some(caller_key);
            let action = format!("NATS {}", inbound_pattern(subject));
            self.audit.door_credential_refused(actor, &action, code);
        }
        let count = self.tally.refused.count(code);
        tracing::warn!(
            code = code.as_str(),
            caller = caller_key,
            subject,
            inbound_seq,
            count,
            reason = %reason,
            "inbound message rejected"
        );
        Ok(())
    }

    /// Publishes the answer on `reply` (when there is one): the JSON body with `Acc-Status`,
    /// and `Retry-After` when the caller should come back later. Best effort: the message is
    /// already handled, a lost answer only costs the caller a retry.
    async fn answer(
        &self,
        reply: Option<&str>,
        status: u16,
        retry_after: Option<u32>,
        body: &Value,
    ) {
        let Some(reply) = reply else { return };
        send_answer(&self.client, reply, status, retry_after, body).await;
    }
}

/// Publishes a door answer on `reply`: the JSON body, `Acc-Status`, and `Retry-After` when set.
async fn send_answer(
    client: &Client,
    reply: &str,
    status: u16,
    retry_after: Option<u32>,
    body: &Value,
) {
    let mut headers = HeaderMap::new();
    headers.insert(subjects::REPLY_STATUS, status.to_string().as_str());
    if let Some(secs) = retry_after {
        headers.insert("Retry-After", secs.to_string().as_str());
    }
    let payload = Bytes::from(serde_json::to_vec(body).expect("JSON values serialize"));
    if let Err(err) = client
        .publish_with_headers(reply.to_owned(), headers, payload)
        .await
    {
        tracing::warn!(error = %err, "cannot send the door's answer");
    }
}

impl Handler for Door {
    fn handle(&self, message: &Message) -> impl Future<Output = Result<(), HandleError>> + Send {
        let span = tracing::info_span!(
            "door.admit",
            subject = %message.subject,
            agent_id = tracing::field::Empty,
            code = tracing::field::Empty,
        );
        self.admit_one(message).instrument(span)
    }
}

/// Messages pulled per request by [`pull_ahead`].
const PULL_BATCH: usize = 256;
/// How long one pull request waits for messages before it ends on its own.
const PULL_WAIT: Duration = Duration::from_millis(500);
/// Messages the door holds pulled but not yet handled (the consumer's `max_ack_pending`): the
/// backlog it can see past to serve callers in turn. Handled at a millisecond or two each, the
/// last of a full window is still well inside the ack wait.
pub const WINDOW: i64 = 10_000;

/// Pulls inbound messages into `queue`, keyed by caller (the agent whose token verifies, or
/// [`ANONYMOUS`]), until `stop`; the pull request in progress is read to its end so that no
/// request is left at the server to deliver into a connection nobody reads.
async fn pull_ahead(
    consumer: PullConsumer,
    queue: Arc<FairQueue<Message>>,
    verifier: Authenticator,
    stop: CancellationToken,
) {
    use futures::StreamExt as _;
    while !stop.is_cancelled() {
        let batch = consumer
            .batch()
            .max_messages(PULL_BATCH)
            .expires(PULL_WAIT)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(err) => {
                tracing::warn!(error = %err, "door cannot pull; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let grace = PULL_WAIT * 2;
        let mut deadline = tokio::time::Instant::now() + grace;
        while let Ok(Some(next)) = tokio::time::timeout_at(deadline, batch.next()).await {
            deadline = tokio::time::Instant::now() + grace;
            match next {
                Ok(message) => {
                    let authorization = header(message.headers.as_ref(), "Authorization");
                    // Verified (cached, for an introspected token) to key the caller's queue.
                    let caller = match verifier
                        .verify_header(authorization.map(str::as_bytes))
                        .await
                    {
                        Ok(caller) => caller.agent_id.to_string(),
                        Err(_) => ANONYMOUS.to_owned(),
                    };
                    queue.push(caller, message);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "door pull interrupted");
                    break;
                }
            }
        }
    }
}

/// One FIFO queue per caller, served in turn: [`FairQueue::pop`] takes the oldest message of
/// the caller whose turn it is, then puts that caller at the back of the line if it has more.
struct FairQueue<T> {
    inner: std::sync::Mutex<Queues<T>>,
    ready: tokio::sync::Notify,
}

struct Queues<T> {
    by_caller: HashMap<String, VecDeque<T>>,
    /// Callers with messages waiting, in the order they are served.
    turns: VecDeque<String>,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self {
            inner: std::sync::Mutex::new(Queues {
                by_caller: HashMap::new(),
                turns: VecDeque::new(),
            }),
            ready: tokio::sync::Notify::new(),
        }
    }
}

impl<T> FairQueue<T> {
    fn push(&self, caller: String, item: T) {
        let mut queues = self.inner.lock().expect("never poisoned");
        let Queues { by_caller, turns } = &mut *queues;
        let queue = by_caller.entry(caller).or_insert_with_key(|caller| {
            turns.push_back(caller.clone());
            VecDeque::new()
        });
        queue.push_back(item);
        drop(queues);
        self.ready.notify_one();
    }

    fn pop(&self) -> Option<T> {
        let mut queues = self.inner.lock().expect("never poisoned");
        let caller = queues.turns.pop_front()?;
        let queue = queues.by_caller.get_mut(&caller)?;
        let item = queue.pop_front();
        if queue.is_empty() {
            queues.by_caller.remove(&caller);
        } else {
            queues.turns.push_back(caller);
        }
        item
    }

    /// The next message to handle, waiting for one; `None` once `stop` fires.
    async fn next(&self, stop: &CancellationToken) -> Option<T> {
        loop {
            if stop.is_cancelled() {
                return None;
            }
            if let Some(item) = self.pop() {
                return Some(item);
            }
            tokio::select! {
                () = stop.cancelled() => return None,
                () = self.ready.notified() => {}
            }
        }
    }

    /// Everything still queued, in no particular order.
    fn drain(&self) -> Vec<T> {
        let mut queues = self.inner.lock().expect("never poisoned");
        queues.turns.clear();
        queues.by_caller.drain().flat_map(|(_, q)| q).collect()
    }
}

/// The door's durable consumer: every inbound subject, from the first message still stored (so
/// messages published while no door ran are admitted), explicit ack, bounded redelivery.
pub async fn durable_consumer(stream: &Stream) -> anyhow::Result<PullConsumer> {
    stream
        .create_consumer(pull::Config {
            durable_name: Some(subjects::DOOR_CONSUMER.to_owned()),
            description: Some("admits what agents publish on NATS".into()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            // Pulled messages wait their caller's turn (see `WINDOW`) before they are handled.
            ack_wait: Duration::from_secs(60),
            max_deliver: MAX_DELIVER,
            max_ack_pending: WINDOW,
            ..Default::default()
        })
        .await
        .context("creating the door consumer")
}

/// The NATS door's scope table: the scopes (any of them; `orchestrator.admin` includes all) a
/// caller needs to publish on an inbound subject, as the HTTP route of the same call needs.
/// `None` for a subject that is no call (refused `NOT_FOUND`).
pub fn scopes_of(subject: &str) -> Option<&'static [&'static str]> {
    match subject {
        subjects::INBOUND_REGISTER | subjects::INBOUND_HEARTBEAT => Some(&[REGISTER_SCOPE]),
        subjects::INBOUND_EVENT => Some(&[EVENTS_SCOPE]),
        subjects::INBOUND_TASK_SUBMIT => Some(&[SUBMIT_SCOPE]),
        subjects::INBOUND_TASK_CLAIM => Some(&[TASK_SCOPE]),
        _ if subject.starts_with(subjects::INBOUND_TASK_RESULT_PREFIX) => Some(&[TASK_SCOPE]),
        _ => None,
    }
}

/// The call an inbound subject stands for.
fn call_of(subject: &str) -> Option<Call<'_>> {
    match subject {
        subjects::INBOUND_REGISTER => Some(Call::Register),
        subjects::INBOUND_HEARTBEAT => Some(Call::Heartbeat),
        subjects::INBOUND_EVENT => Some(Call::Event),
        _ => subject
            .strip_prefix(subjects::INBOUND_TASK_RESULT_PREFIX)
            .map(|task_id| Call::TaskResult {
                task_id,
                stored: None,
            }),
    }
}

/// The inbound subject pattern `subject` falls under (its task id, say, left out), for the
/// audit trail.
fn inbound_pattern(subject: &str) -> &'static str {
    [
        subjects::INBOUND_REGISTER,
        subjects::INBOUND_HEARTBEAT,
        subjects::INBOUND_EVENT,
        subjects::INBOUND_TASK_SUBMIT,
        subjects::INBOUND_TASK_CLAIM,
        subjects::INBOUND_TASK_RESULTS,
    ]
    .into_iter()
    .find(|pattern| subjects::matches(pattern, subject))
    .unwrap_or(subjects::INBOUND_ALL)
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|v| v.as_str())
}

/// `raw` when it is a plain subject inside `caller`'s reply namespace, else `None`.
fn reply_subject(caller: &Caller, raw: &str) -> Option<String> {
    let namespace = subjects::reply_namespace(&caller.agent_id);
    let rest = raw.strip_prefix(namespace.as_str())?.strip_prefix('.')?;
    let plain = rest.split('.').all(|token| {
        !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
    });
    (plain && raw.len() <= MAX_REPLY_SUBJECT).then(|| raw.to_owned())
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth;
    use crate::auth::{AuthSettings, Secret};
    use crate::domain::AgentId;

    fn caller(agent: &str) -> Caller {
        let secret = Secret::new("0123456789abcdef0123456789abcdef");
        let token = auth::mint(
            &secret,
            &AgentId::parse(agent).unwrap(),
            "",
            Duration::from_secs(60),
        );
        let settings = AuthSettings {
            mode: auth::AuthMode::Jwt,
            secret: None,
            introspection: None,
            require_scopes: false,
            leeway: Duration::from_secs(1),
            max_token_bytes: 8192,
            max_lifetime: Duration::from_secs(3600),
        };
        auth::Verifier::new(&secret, &settings)
            .verify(&token)
            .unwrap()
    }

    #[test]
    fn answers_go_only_inside_the_callers_own_reply_namespace() {
        let a = caller("agent-a");
        assert_eq!(
            reply_subject(&a, "acc.reply.agent-a.x1").as_deref(),
            Some("acc.reply.agent-a.x1")
        );
        assert!(reply_subject(&a, "acc.reply.agent-a.x.y").is_some());
        for bad in [
            "acc.reply.agent-b.x1",
            "acc.reply.agent-a",
            "acc.reply.agent-a.",
            "acc.reply.agent-ab.x",
            "acc.reply.agent-a.*",
            "acc.reply.agent-a.>",
            "acc.reply.agent-a..x",
            "acc.reply.agent-a.a b",
            "acc.events.agent-a",
            "acc.agents.registered.agent-a",
        ] {
            assert!(reply_subject(&a, bad).is_none(), "{bad}");
        }
        let long = format!("acc.reply.agent-a.{}", "x".repeat(300));
        assert!(reply_subject(&a, &long).is_none());
    }

    #[test]
    fn an_inbound_dedupe_id_is_scoped_to_its_agent() {
        let (a, b) = (caller("agent-a"), caller("agent-b"));
        let id = intake::scoped_msg_id(&a, Some("b-1"));
        assert_eq!(id, "agent-a:b-1");
        assert_ne!(id, intake::scoped_msg_id(&b, Some("b-1")));
        // A message without an id dedupes with nothing, not even another such message.
        let (x, y) = (
            intake::scoped_msg_id(&a, None),
            intake::scoped_msg_id(&a, None),
        );
        assert_ne!(x, y);
        assert!(x.starts_with("agent-a/"), "{x}");
    }

    #[test]
    fn the_nats_docs_scope_table_matches_the_doors() {
        let docs = include_str!("../docs/nats.md");
        for (documented, subject) in [
            ("acc.in.register", subjects::INBOUND_REGISTER),
            ("acc.in.heartbeat", subjects::INBOUND_HEARTBEAT),
            ("acc.in.event", subjects::INBOUND_EVENT),
            ("acc.in.task_result.<task_id>", "acc.in.task_result.t-1"),
            ("acc.in.task_submit", subjects::INBOUND_TASK_SUBMIT),
            ("acc.in.task_claim", subjects::INBOUND_TASK_CLAIM),
        ] {
            let want: Vec<String> = scopes_of(subject)
                .unwrap()
                .iter()
                .map(|s| format!("`{s}`"))
                .collect();
            let line = format!("| `{documented}` | {} |", want.join(", "));
            assert!(docs.contains(&line), "docs/nats.md lacks {line}");
        }
        assert!(scopes_of("acc.in.other").is_none());
    }

    #[test]
    fn inbound_subjects_map_to_calls() {
        assert!(matches!(call_of("acc.in.register"), Some(Call::Register)));
        assert!(matches!(call_of("acc.in.heartbeat"), Some(Call::Heartbeat)));
        assert!(matches!(call_of("acc.in.event"), Some(Call::Event)));
        assert!(matches!(
            call_of("acc.in.task_result.t-1"),
            Some(Call::TaskResult {
                task_id: "t-1",
                stored: None
            })
        ));
        assert!(call_of("acc.in.other").is_none());
    }

    #[test]
    fn callers_are_served_in_turn_and_each_callers_messages_in_order() {
        let queue = FairQueue::default();
        for i in 0..5 {
            queue.push("flooder".into(), format!("f{i}"));
        }
        queue.push("quiet".into(), "q0".to_owned());
        queue.push("quiet".into(), "q1".to_owned());
        queue.push(ANONYMOUS.into(), "x0".to_owned());
        let order: Vec<String> = std::iter::from_fn(|| queue.pop()).collect();
        assert_eq!(order, ["f0", "q0", "x0", "f1", "q1", "f2", "f3", "f4"]);
        assert!(queue.drain().is_empty());
    }

    #[test]
    fn audit_records_name_the_inbound_pattern_not_the_task_id() {
        assert_eq!(inbound_pattern("acc.in.heartbeat"), "acc.in.heartbeat");
        assert_eq!(
            inbound_pattern("acc.in.task_result.secret-ish-id"),
            "acc.in.task_result.*"
        );
        assert_eq!(inbound_pattern("acc.in.whatever.else"), "acc.in.>");
    }
}
