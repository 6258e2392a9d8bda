//! Group commit: many concurrent requests, one JetStream write.
//!
//! With `fsync` durability the server fsyncs before every acknowledgement, so a bridge that
//! publishes message by message is capped by the disk (about 2,000 writes/s per stream here).
//! A [`GroupCommit`] is one task per stream that owns the writes to it. Requests queue on a
//! channel; whenever the task is free it takes everything waiting (up to `max_batch`) and writes
//! it in one go:
//!
//! - fewer than `min_batch` messages go out as ordinary publishes, awaited together: at low load
//!   a request costs one fsync and never waits for company;
//! - `min_batch` or more go out as one atomic batch (ADR-50, nats-server 2.12+, stream
//!   `allow_atomic`): the server stores them together and answers once, so one commit
//!   acknowledges them all. Message `i` of a batch of `n` whose ack says `seq` is at
//!   `seq - n + 1 + i`.
//!
//! Up to `in_flight` writes per stream are on their way at once (the server allows 50 open
//! batches per stream); while they are, new requests queue, so the busier the stream, the
//! bigger the next batch. No request waits for a timer.
//!
//! At low load nothing waits: a request that finds the queue empty and a write slot free is
//! written from its own task, as an ordinary publish, without waking the writer task or a task
//! spawned for the write. It holds one of the `in_flight` slots meanwhile, so the bound on
//! writes on their way is the same, and a request that finds company queues as above.
//!
//! Dedupe still holds per message. The server refuses a whole atomic batch when any of its
//! `Nats-Msg-Id`s is already stored or appears twice in it (error 10201), so repeats within a
//! batch are held back and sent after it as ordinary publishes (the server then answers them
//! `duplicate` with the first copy's sequence), as is a write conditional on its subject's last
//! sequence behind another write to that subject, and a batch the server refuses for any reason
//! is sent again message by message, so each request gets its own answer: its own ack, its own
//! `duplicate`, or its own error.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::time::Duration;
use tokio::sync::Semaphore;

use async_nats::connection::State;
use async_nats::jetstream;
use async_nats::jetstream::message::PublishMessage;
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::batch::{self, BatchError};
use super::{Ack, PublishFailure, classify};

pub use super::batch::SERVER_MAX_BATCH;

/// How a stream's writes are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSettings {
    /// Fewest waiting messages sent as one atomic batch; fewer go as ordinary publishes.
    pub min_batch: usize,
    /// Most messages in one write.
    pub max_batch: usize,
    /// Most writes per stream on their way at once.
    pub in_flight: usize,
    /// Most requests waiting for one stream; beyond it a request is refused at once (503)
    /// rather than queued without bound.
    pub queue: usize,
}

impl Default for GroupSettings {
    fn default() -> Self {
        Self {
            min_batch: 16,
            max_batch: SERVER_MAX_BATCH,
            in_flight: 4,
            queue: 16_384,
        }
    }
}

/// Counts of what a stream's writer did, for benchmarks and tests.
#[derive(Debug, Default)]
pub struct GroupCounts {
    /// Atomic batches the server committed.
    pub batches: AtomicU64,
    /// Messages acknowledged through those batches.
    pub batched_messages: AtomicU64,
    /// Messages sent as ordinary publishes (small groups, repeats, refused batches, and the
    /// direct writes below).
    pub single_messages: AtomicU64,
    /// Messages written from their request's own task, because nothing waited (low load).
    pub direct_messages: AtomicU64,
    /// Batches the server refused, whose messages were then sent one by one.
    pub refused_batches: AtomicU64,
}

/// One message waiting to be written, and where its answer goes.
struct Pending {
    subject: String,
    msg_id: String,
    payload: Bytes,
    headers: HeaderMap,
    answer: oneshot::Sender<Result<Ack, PublishFailure>>,
}

/// The writer of one stream. Cloning shares the writer.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Pending>,
    counts: Arc<GroupCounts>,
    writer: Arc<Writer>,
    /// The stream's write slots (`in_flight`), shared by the writer task and direct writes.
    slots: Arc<Semaphore>,
}

impl GroupCommit {
    /// Starts the writer task of `stream`. It ends when every clone is dropped.
    pub fn start(
        stream: &'static str,
        js: jetstream::Context,
        client: Client,
        timeout: Duration,
        settings: GroupSettings,
    ) -> Self {
        let (queue, receiver) = mpsc::channel(settings.queue.max(1));
        let counts = Arc::new(GroupCounts::default());
        let writer = Writer {
            stream,
            js,
            client,
            timeout,
            settings,
            counts: counts.clone(),
        };
        let writer = Arc::new(writer);
        let slots = Arc::new(Semaphore::new(settings.in_flight.max(1)));
        tokio::spawn(writer.clone().run(receiver, slots.clone()));
        Self {
            queue,
            counts,
            writer,
            slots,
        }
    }

    pub fn counts(&self) -> &GroupCounts {
        &self.counts
    }

    /// Queues one message and waits for its own answer.
    pub async fn publish(
        &self,
        subject: String,
        msg_id: &str,
        payload: Bytes,
        headers: HeaderMap,
    ) -> Result<Ack, PublishFailure> {
        let (answer, answered) = oneshot::channel();
        let pending = Pending {
            subject,
            msg_id: msg_id.to_owned(),
            payload,
            headers,
            answer,
        };
        // Nothing waiting and a slot free: write it here, with no task woken to do it.
        if self.queue.capacity() == self.queue.max_capacity() {
            if let Ok(slot) = self.slots.try_acquire() {
                self.counts.direct_messages.fetch_add(1, Ordering::Relaxed);
                // Boxed: a write's future is large, and inline it would be moved with every
                // request's (the queued path never holds it).
                Box::pin(self.writer.write(vec![pending])).await;
                drop(slot);
                return answered.await.unwrap_or_else(|_| {
                    Err(PublishFailure::unavailable("the write was abandoned"))
                });
            }
        }
        self.queue.try_send(pending).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => {
                PublishFailure::unavailable("too many writes waiting for the bus")
            }
            mpsc::error::TrySendError::Closed(_) => {
                PublishFailure::unavailable("the stream writer has stopped")
            }
        })?;
        answered
            .await
            .unwrap_or_else(|_| Err(PublishFailure::unavailable("the write was abandoned")))
    }
}

struct Writer {
    stream: &'static str,
    js: jetstream::Context,
    client: Client,
    timeout: Duration,
    settings: GroupSettings,
    counts: Arc<GroupCounts>,
}

impl Writer {
    async fn run(self: Arc<Self>, mut receiver: mpsc::Receiver<Pending>, slots: Arc<Semaphore>) {
        let max = self.settings.max_batch.clamp(1, SERVER_MAX_BATCH);
        loop {
            // Take what waits only once a write slot is free: meanwhile the group grows.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let mut group = Vec::with_capacity(max);
            if receiver.recv_many(&mut group, max).await == 0 {
                break;
            }
            // A request that gave up (timed out, client gone) needs no write.
            group.retain(|p| !p.answer.is_closed());
            if group.is_empty() {
                continue;
            }
            let writer = self.clone();
            tokio::spawn(async move {
                writer.write(group).await;
                drop(slot);
            });
        }
        tracing::debug!(stream = self.stream, "stream writer stopped");
    }

    async fn write(&self, group: Vec<Pending>) {
        if self.client.connection_state() != State::Connected {
            for p in group {
                let _ = p
                    .answer
                    .send(Err(PublishFailure::unavailable("not connected")));
            }
            return;
        }
        if group.len() < self.settings.min_batch.max(2) {
            return self.singles(group).await;
        }
        let (batch, repeats) = split_repeats(group);
        let batch = match self.atomic(batch).await {
            Ok(()) => Vec::new(),
            Err(refused) => refused,
        };
        let mut rest = batch;
        rest.extend(repeats);
        if !rest.is_empty() {
            self.singles(rest).await;
        }
    }

    /// Ordinary publishes, all sent before any ack is awaited. One deadline covers the whole
    /// group, so a dead server holds the write slot for one timeout, not one per message.
    async fn singles(&self, group: Vec<Pending>) {
        self.counts
            .single_messages
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut waiting = Vec::with_capacity(group.len());
        for p in group {
            let message = PublishMessage::build()
                .payload(p.payload)
                .headers(p.headers)
                .message_id(p.msg_id);
            let sent = tokio::time::timeout_at(deadline, self.js.send_publish(p.subject, message))
                .await
                .map_err(|_| PublishFailure::unavailable("no acknowledgement in time"))
                .and_then(|sent| sent.map_err(classify));
            waiting.push((p.answer, sent));
        }
        for (answer, sent) in waiting {
            let result = match sent {
                Ok(ack) => super::ack_by(ack, deadline).await,
                Err(failure) => Err(failure),
            };
            let _ = answer.send(result);
        }
    }

    /// One atomic batch. On success every request has its answer; when the server refuses the
    /// batch, its messages come back to be sent one by one.
    async fn atomic(&self, batch: Vec<Pending>) -> Result<(), Vec<Pending>> {
        let started = std::time::Instant::now();
        let messages: Vec<_> = batch
            .iter()
            .map(|p| {
                let mut headers = p.headers.clone();
                headers.insert("Nats-Msg-Id", p.msg_id.as_str());
                batch::Message {
                    subject: p.subject.clone(),
                    headers,
                    payload: p.payload.clone(),
                }
            })
            .collect();
        let committed = match batch::commit(&self.client, messages, self.timeout).await {
            Ok(committed) => committed,
            Err(BatchError::NotStored { code, description }) => {
                tracing::debug!(
                    stream = self.stream,
                    code,
                    %description,
                    messages = batch.len(),
                    "atomic batch refused, sending its messages one by one"
                );
                self.counts.refused_batches.fetch_add(1, Ordering::Relaxed);
                return Err(batch);
            }
            // Unknown outcome: the batch may or may not be stored. Each request gets a 503 and
            // its client's retry, with the same dedupe id, finds out.
            Err(err @ BatchError::Unknown { .. }) => {
                return Err(fail_all(
                    batch,
                    PublishFailure::unavailable_by("atomic batch not acknowledged", err),
                ));
            }
        };
        tracing::trace!(
            stream = self.stream,
            messages = batch.len(),
            took_us = started.elapsed().as_micros() as u64,
            "atomic batch committed"
        );
        self.counts.batches.fetch_add(1, Ordering::Relaxed);
        self.counts
            .batched_messages
            .fetch_add(committed.count, Ordering::Relaxed);
        for (i, p) in batch.into_iter().enumerate() {
            let _ = p.answer.send(Ok(Ack {
                stream: committed.stream.clone(),
                seq: committed.seq(i),
                duplicate: false,
            }));
        }
        Ok(())
    }
}

/// Answers every request of a batch with 503. Returns nothing to resend.
fn fail_all(batch: Vec<Pending>, failure: PublishFailure) -> Vec<Pending> {
    for p in batch {
        let _ = p.answer.send(Err(failure.clone()));
    }
    Vec::new()
}

/// Separates later copies of a dedupe id from the first copy, keeping order, and a write
/// conditional on its subject's last sequence ([`super::expect_subject_empty`]) from an earlier
/// write to that subject in the group: in one batch the server would refuse the whole batch
/// for it, sent after the batch it gets its own answer.
fn split_repeats(group: Vec<Pending>) -> (Vec<Pending>, Vec<Pending>) {
    let mut seen = HashSet::with_capacity(group.len());
    let mut subjects = HashSet::with_capacity(group.len());
    let (mut first, mut repeats) = (Vec::with_capacity(group.len()), Vec::new());
    for p in group {
        let new_subject = subjects.insert(p.subject.clone());
        let held_back = !new_subject && super::is_conditional(&p.headers);
        if !held_back && seen.insert(p.msg_id.clone()) {
            first.push(p);
        } else {
            repeats.push(p);
        }
    }
    (first, repeats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(id: &str) -> Pending {
        Pending {
            subject: "acc.events.a".into(),
            msg_id: id.into(),
            payload: Bytes::new(),
            headers: HeaderMap::new(),
            answer: oneshot::channel().0,
        }
    }

    #[test]
    fn repeats_of_a_dedupe_id_are_held_back_in_order() {
        let group = ["a", "b", "a", "c", "b", "a"]
            .map(pending)
            .into_iter()
            .collect();
        let (first, repeats) = split_repeats(group);
        let ids = |v: &[Pending]| v.iter().map(|p| p.msg_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&first), ["a", "b", "c"]);
        assert_eq!(ids(&repeats), ["a", "b", "a"]);
    }

    #[test]
    fn a_conditional_write_after_another_to_its_subject_is_held_back() {
        let at = |subject: &str, id: &str, conditional: bool| Pending {
            subject: subject.into(),
            headers: if conditional {
                crate::bus::expect_subject_empty()
            } else {
                HeaderMap::new()
            },
            ..pending(id)
        };
        let group = vec![
            at("acc.tasks.result.t1", "a", true),
            at("acc.tasks.result.t2", "b", false),
            at("acc.tasks.result.t1", "c", true),
            at("acc.tasks.result.t2", "d", true),
            at("acc.tasks.result.t1", "e", false),
        ];
        let (first, held) = split_repeats(group);
        let ids = |v: &[Pending]| v.iter().map(|p| p.msg_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&first), ["a", "b", "e"]);
        assert_eq!(ids(&held), ["c", "d"]);
    }

    #[test]
    fn subjects_find_their_stream() {
        use crate::bus::subjects::{self, stream_of};
        assert_eq!(stream_of("acc.events.a-1"), Some(subjects::EVENTS_STREAM));
        assert_eq!(
            stream_of("acc.agents.heartbeat.a"),
            Some(subjects::AGENTS_STREAM)
        );
        assert_eq!(
            stream_of("acc.tasks.result.t"),
            Some(subjects::TASKS_STREAM)
        );
        assert_eq!(
            stream_of("acc.dead_letter.x.y"),
            Some(subjects::DEAD_LETTER_STREAM)
        );
        assert_eq!(stream_of("acc.events.a.b"), None);
        assert_eq!(stream_of("acc.events"), None);
        assert_eq!(stream_of("other.events.a"), None);
    }
}
