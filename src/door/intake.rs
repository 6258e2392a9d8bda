//! The door's intake: where an agent's publish on an inbound subject (`acc.in.>`) arrives, before
//! anything stores it.
//!
//! JetStream dedupes on `Nats-Msg-Id` per stream, over one window shared by every publisher, and
//! it does so before any of our code runs: had agents published straight into `ACC_INBOUND`, one
//! agent could send another's id first and have the other's message dropped as a duplicate. So
//! agents' publishes do not land in JetStream. The intake is a core-NATS queue-group subscription
//! ([`INTAKE_QUEUE`]) on the inbound subjects in the bridge's account (which the agents' accounts
//! import as a service), and per message it:
//!
//! 1. authenticates the caller from the `Authorization` header, with the verification the door
//!    uses (cached for introspected tokens);
//! 2. refuses a message whose token does not verify: counted, recorded on `acc.rejected.<CODE>`
//!    without its body, and answered with a JetStream-shaped error, so it never reaches the stream
//!    (an introspection server we cannot reach is our failure: answered 503, not recorded);
//! 3. stores the message in `ACC_INBOUND` on `acc.inbound.<…>` (the stream keeps it as the
//!    `acc.in.<…>` the agent published on) with a dedupe id scoped to the authenticated agent,
//!    [`scoped_msg_id`]. The agent's own `Nats-*` headers never reach JetStream; its `Nats-Msg-Id`
//!    travels on as `Idempotency-Key` when it sent none, so the door dedupes on it as before;
//! 4. answers the NATS reply subject with the PubAck JetStream would have sent,
//!    `{"stream":"ACC_INBOUND","seq":N}` (with `"duplicate":true` for a retry), or an error.
//!
//! The reply subject of an agent in its own account is the server's mapping back into that
//! account (`_R_.…`), so the answer lands nowhere in the bridge's subject space; the intake
//! answers only on such subjects and on inboxes ([`answerable`]), as a second fence for a
//! publisher inside the bridge's account.
//!
//! **Order.** One agent's messages are stored in the order the intake received them, even when
//! the agent publishes many without waiting for each PubAck, while other agents' messages go on
//! beside them. Each message has a place in its agent's [`Lanes`] as it arrives: its own
//! task may verify its token and await its PubAck side by side with the others, but it sends its
//! publish only once the message before it in the lane has sent its own (or has been refused),
//! and the bus stores what one connection sends in the order sent
//! ([`crate::bus::Publisher::send_in_order`]). A JWT is verified the moment its message arrives
//! (no waiting: it is local), so its lane is the authenticated agent's, whichever of its tokens
//! it carries; a message refused there takes no place in any lane. A token to be introspected is
//! only known once the authorization server answers, so its lane is the token's: its messages
//! keep their order among themselves, and a slow answer holds up only them (the introspection
//! cache asks once per token, so they wait for the same answer anyway). Nothing orders the
//! messages of one agent that carry different opaque tokens at the same moment, nor across
//! intakes: with several door processes in the queue group, NATS hands one connection's
//! messages to any of them, so only a publisher that waits for each PubAck keeps its order
//! across replicas.

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::Arc;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::sync::oneshot::error::TryRecvError;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::{ANONYMOUS, Door, header};
use crate::auth::{AuthError, Caller};
use crate::bus::{Unacked, subjects};
use crate::contract::Refusal;
use crate::contract::bucket::retry_after_secs;

/// The queue group every door's intake joins: each inbound message goes to one of them.
pub const INTAKE_QUEUE: &str = "door-intake";
/// Most messages in hand at once (waiting for their turn or their PubAck); past that the intake
/// reads no further.
pub const MAX_PENDING: usize = 1024;

/// Subscribes to the inbound subjects in the intake's queue group. Done before the door
/// consumes, so that a publish made once the door is up has someone to answer it.
pub async fn subscribe(door: &Door) -> anyhow::Result<async_nats::Subscriber> {
    use anyhow::Context as _;
    door.client
        .queue_subscribe(subjects::INBOUND_ALL, INTAKE_QUEUE.to_owned())
        .await
        .context("subscribing the door's intake to the inbound subjects")
}

/// Takes inbound messages until `stop`, then stops taking new ones and finishes those waiting
/// for their PubAck.
pub async fn serve(door: Arc<Door>, mut inbound: async_nats::Subscriber, stop: CancellationToken) {
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING));
    let mut lanes = Lanes::default();
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => break,
            message = inbound.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let Ok(permit) = pending.clone().acquire_owned().await else {
            break;
        };
        let authorization = header(message.headers.as_ref(), "Authorization").map(str::as_bytes);
        let verdict = door.verifier.verify_header_now(authorization);
        // Its place in line: behind the agent's earlier messages (a JWT that verified), or the
        // token's (a token to introspect). A refused token is stored nowhere, so waits for none.
        let turn = match &verdict {
            Some(Ok(caller)) => Some(lanes.turn(Lane::Agent(caller.agent_id.as_str()))),
            Some(Err(_)) => None,
            None => Some(lanes.turn(Lane::Token(authorization.unwrap_or_default()))),
        };
        let door = door.clone();
        tokio::spawn(async move {
            let _permit = permit;
            door.take(message, verdict, turn).await;
        });
    }
    let _ = inbound.unsubscribe().await;
    let _ = pending.acquire_many(MAX_PENDING as u32).await;
}

/// What orders a message behind others.
#[derive(Hash)]
enum Lane<'a> {
    /// An authenticated agent's messages.
    Agent(&'a str),
    /// The messages carrying one `Authorization` value that is still to be verified.
    Token(&'a [u8]),
}

/// The lanes of the messages in hand: for each lane, a signal that fires once its latest
/// message has been sent to the bus or will not be. Lanes are keyed by a hash (never a token);
/// two lanes that share a hash only order more than needed. A lane whose last message is done is
/// dropped now and then, so there are never many more lanes than [`MAX_PENDING`] messages.
#[derive(Default)]
struct Lanes {
    hasher: std::hash::RandomState,
    last: HashMap<u64, oneshot::Receiver<()>>,
}

impl Lanes {
    /// The next place in `lane`: behind its latest message, if that is not done yet.
    fn turn(&mut self, lane: Lane<'_>) -> Turn {
        if self.last.len() >= 2 * MAX_PENDING {
            // Each lane not done has a message holding one of the MAX_PENDING permits.
            self.last
                .retain(|_, done| matches!(done.try_recv(), Err(TryRecvError::Empty)));
        }
        let (sent, done) = oneshot::channel();
        let before = self.last.insert(self.hasher.hash_one(lane), done);
        Turn {
            before,
            _sent: sent,
        }
    }
}

/// A message's place in its lane. Dropping it tells the next message its turn has come, so a
/// message is done however its task ends.
struct Turn {
    before: Option<oneshot::Receiver<()>>,
    _sent: oneshot::Sender<()>,
}

impl Turn {
    /// Waits until the message before this one is done (sent or refused, which it is only once
    /// the one before it is done, and so on).
    async fn wait(&mut self) {
        if let Some(before) = self.before.as_mut() {
            // Fired or dropped: either way the message before is done.
            let _ = before.await;
            self.before = None;
        }
    }

    /// This message is done: the next one in the lane may go.
    fn pass(self) {}
}

impl Door {
    /// Authenticates one inbound message (`verdict`: its token's verdict when it was reached on
    /// arrival, else it is verified here), stores it with its scoped dedupe id once its `turn`
    /// comes, and answers.
    async fn take(
        &self,
        message: async_nats::Message,
        verdict: Option<Result<Caller, AuthError>>,
        turn: Option<Turn>,
    ) {
        let headers = message.headers.as_ref();
        let span = tracing::info_span!(
            "door.intake",
            subject = %message.subject,
            agent_id = tracing::field::Empty,
            code = tracing::field::Empty,
        );
        if let Some(headers) = headers {
            let _ = span.set_parent(crate::telemetry::extract(headers));
        }
        let answer = async {
            let verified = async {
                match verdict {
                    Some(verdict) => verdict,
                    None => {
                        let authorization = header(headers, "Authorization").map(str::as_bytes);
                        self.verifier.verify_header(authorization).await
                    }
                }
            };
            let mut turn = turn;
            let waiting = async {
                if let Some(turn) = turn.as_mut() {
                    turn.wait().await;
                }
            };
            let (verified, ()) = tokio::join!(verified, waiting);
            match verified {
                Ok(caller) => {
                    tracing::Span::current().record("agent_id", caller.agent_id.as_str());
                    let sent = self.capture(&message, &caller).await;
                    if let Some(turn) = turn {
                        turn.pass();
                    }
                    Ok(sent?.acked().await?)
                }
                Err(err) => {
                    if let Some(turn) = turn {
                        turn.pass();
                    }
                    Err(self
                        .refuse_unauthenticated(&message, Refusal::from(err))
                        .await)
                }
            }
        }
        .instrument(span.clone())
        .await;
        let (status, retry_after, body) = match answer {
            Ok(ack) => {
                let mut answer = json!({"stream": ack.stream, "seq": ack.seq});
                if ack.duplicate {
                    answer["duplicate"] = true.into();
                }
                (200, None, answer)
            }
            Err(refusal) => {
                span.record("code", refusal.code().as_str());
                let body = jetstream_error(&refusal);
                (refusal.status(), refusal.retry_after(), body)
            }
        };
        let Some(reply) = message.reply.as_ref().filter(|r| answerable(r)) else {
            return;
        };
        let mut headers = HeaderMap::new();
        headers.insert(subjects::REPLY_STATUS, status.to_string().as_str());
        if let Some(secs) = retry_after {
            headers.insert("Retry-After", secs.to_string().as_str());
        }
        let payload = Bytes::from(serde_json::to_vec(&body).expect("JSON values serialize"));
        if let Err(err) = self
            .client
            .publish_with_headers(reply.clone(), headers, payload)
            .await
        {
            tracing::warn!(error = %err, "cannot answer an inbound publish");
        }
    }

    /// Sends an authenticated message to `ACC_INBOUND`; its acknowledgement is still to come.
    async fn capture(
        &self,
        message: &async_nats::Message,
        caller: &Caller,
    ) -> Result<Unacked, Refusal> {
        let sent = message.headers.as_ref();
        let agents_id = header(sent, async_nats::header::NATS_MESSAGE_ID.as_ref());
        let mut headers = HeaderMap::new();
        for (name, values) in sent.into_iter().flat_map(HeaderMap::iter) {
            let name: &str = name.as_ref();
            // `Nats-*` headers are JetStream's instructions (dedupe id, expectations, TTL,
            // rollup): only the intake gives those.
            if name.len() >= 5 && name[..5].eq_ignore_ascii_case("nats-") {
                continue;
            }
            for value in values {
                headers.append(name, value.as_str());
            }
        }
        if let (Some(id), None) = (agents_id, header(sent, subjects::IDEMPOTENCY_KEY)) {
            headers.insert(subjects::IDEMPOTENCY_KEY, id);
        }
        let subject = subjects::inbound_capture(&message.subject).ok_or_else(|| {
            Refusal::new(crate::contract::Code::NotFound)
                .with_message(format!("No route for {}", message.subject))
        })?;
        let msg_id = scoped_msg_id(caller, agents_id);
        Ok(self
            .publisher
            .send_in_order(subject, &msg_id, message.payload.clone(), Some(headers))
            .await?)
    }

    /// A message whose token did not verify: counted and recorded without its body (charged to
    /// the anonymous caller's bucket of rejections, past which it is `RATE_LIMITED`), never
    /// stored in `ACC_INBOUND`. A token we could not check (introspection unreachable) is our
    /// failure, answered as such and not recorded.
    async fn refuse_unauthenticated(
        &self,
        message: &async_nats::Message,
        refusal: Refusal,
    ) -> Refusal {
        if refusal.code().is_server_error() {
            return refusal;
        }
        let refusal = match self.limiter.check(ANONYMOUS) {
            Ok(()) => refusal,
            Err(wait) => Refusal::rate_limited(retry_after_secs(wait))
                .with_message("Too many rejected messages from this caller; retry later"),
        };
        if let Err(err) = self
            .record_rejection(&message.subject, Bytes::new(), None, ANONYMOUS, &refusal)
            .await
        {
            tracing::warn!(error = %err, "cannot record an unauthenticated publish");
        }
        refusal
    }
}

/// The dedupe id an inbound message is stored with: the agent's `Nats-Msg-Id` behind its agent
/// id and `:` (which no agent id contains), so an id dedupes only among that agent's own
/// messages. A message without one gets a random id behind `/`, which dedupes with nothing.
pub fn scoped_msg_id(caller: &Caller, agents_id: Option<&str>) -> String {
    match agents_id {
        Some(id) => format!("{}:{id}", caller.agent_id),
        None => format!("{}/{:032x}", caller.agent_id, rand::random::<u128>()),
    }
}

/// True for the reply subjects the intake answers on: the server's mapping back into an
/// importing account (`_R_.…`) and inboxes (`_INBOX.…`, an agent's `acc.reply.<agent_id>.…`).
/// Nothing a stream stores starts so.
pub fn answerable(reply: &Subject) -> bool {
    let reply = reply.as_str();
    ["_R_.", "_INBOX.", "acc.reply."]
        .iter()
        .any(|prefix| reply.starts_with(prefix))
}

/// A refusal in the shape of JetStream's own error answer, which NATS clients read as a failed
/// publish: `{"error":{"code":<status>,"err_code":0,"description":"<CODE>: <reason>"}}`.
fn jetstream_error(refusal: &Refusal) -> Value {
    json!({ "error": {
        "code": refusal.status(),
        "err_code": 0,
        "description": format!("{}: {}", refusal.code().as_str(), refusal.reason()),
    }})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_message_waits_only_for_the_one_before_it_in_its_own_lane() {
        let mut lanes = Lanes::default();
        let first = lanes.turn(Lane::Agent("agent-a"));
        let mut second = lanes.turn(Lane::Agent("agent-a"));
        let mut other = lanes.turn(Lane::Agent("agent-b"));
        let mut token = lanes.turn(Lane::Token(b"Bearer opaque"));
        let soon = std::time::Duration::from_millis(20);
        assert!(tokio::time::timeout(soon, other.wait()).await.is_ok());
        assert!(tokio::time::timeout(soon, token.wait()).await.is_ok());
        assert!(tokio::time::timeout(soon, second.wait()).await.is_err());
        // A wait given up on keeps the place: waiting again still waits for the first.
        assert!(tokio::time::timeout(soon, second.wait()).await.is_err());
        first.pass();
        assert!(tokio::time::timeout(soon, second.wait()).await.is_ok());
    }

    #[test]
    fn lanes_whose_messages_are_done_are_forgotten() {
        let mut lanes = Lanes::default();
        for i in 0..5 * MAX_PENDING {
            lanes.turn(Lane::Agent(&format!("agent-{i}"))).pass();
            assert!(lanes.last.len() <= 2 * MAX_PENDING, "{}", lanes.last.len());
        }
        // A lane whose message is still in hand is kept.
        let held = lanes.turn(Lane::Agent("held"));
        for i in 0..3 * MAX_PENDING {
            lanes.turn(Lane::Agent(&format!("later-{i}"))).pass();
        }
        let mut next = lanes.turn(Lane::Agent("held"));
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut waiting = std::pin::pin!(next.wait());
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        held.pass();
        assert!(waiting.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn the_intake_answers_only_mapped_replies_and_inboxes() {
        for ok in ["_R_.abc.def", "_INBOX.x", "acc.reply.agent-a.x"] {
            assert!(answerable(&Subject::from(ok)), "{ok}");
        }
        for bad in [
            "$KV.acc_agents.agent-b",
            "acc.tasks.result.t-1",
            "acc.events.agent-b",
            "$JS.API.STREAM.DELETE.ACC_EVENTS",
            "acc.in.event",
        ] {
            assert!(!answerable(&Subject::from(bad)), "{bad}");
        }
    }
}
