//! [`Subscription`]: one subscriber's SSE body — a reset when needed, the stored gap, then live
//! events — handed over without a gap or a duplicate, and with no task of its own.
//!
//! The hand-over: the subscriber's live receiver is taken from the [`Hub`] *before* the
//! stream's last sequence `L` is read. Every event stored after that read is broadcast after
//! the receiver existed, so the receiver sees it; the replay covers everything up to `L`; live
//! events at or below the last sequence covered are skipped.
//!
//! What one delivery costs: the hub renders each event's SSE frame once per replica
//! ([`StreamedEvent::frame`]). A subscription is the body of its HTTP response, polled by its
//! connection's task when the hub's broadcast wakes it: it takes every frame already waiting in
//! the ring and hands the connection one chunk — the shared frame itself when one is waiting,
//! or the waiting frames copied into one buffer, so a subscriber that fell a little behind
//! catches up in one write. No relay task, no queue, no JSON work per subscriber. The filter
//! decides once per run of one `type` and `source` in a batch ([`super::Run`]), not once per
//! event. No timer per subscriber either: the keep-alive comment is sent at the hub's tick
//! (a batch without events, one timer per hub) when nothing was written since the tick
//! before.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use bytes::{BufMut as _, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio_util::sync::ReusableBoxFuture;

use super::{Batch, Filter, Hub, MAX_BATCH, Slot, StreamedEvent};

/// Where a subscriber starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Only events stored from now on.
    New,
    /// After this sequence (`Last-Event-ID`).
    After(u64),
    /// At this sequence (`from_seq`).
    At(u64),
    /// At the first event stored at or after this time (`since`).
    Since(DateTime<Utc>),
}

/// Messages asked for per replay batch; each batch is one chunk.
const REPLAY_BATCH: usize = 1_000;
/// Frames coalesced into one chunk stop growing past this many bytes.
const MAX_CHUNK: usize = 256 * 1024;
/// The comment sent at a keep-alive tick on a stream that wrote nothing since the tick before.
const KEEPALIVE: &[u8] = b":\n\n";
/// The last frame of a subscriber that fell more than the hub's ring behind.
const OVERFLOW: &[u8] =
    b"event: overflow\ndata: {\"reason\":\"the subscriber fell behind; resume with Last-Event-ID\"}\n\n";

type Receiver = broadcast::Receiver<Arc<Batch>>;
type Received = (Result<Arc<Batch>, RecvError>, Receiver);

/// One subscriber's stream of SSE chunks: the body of its response. It holds its slot until
/// the connection drops it; it ends after an overflow, when the hub stops (shutdown), or when
/// a replay fails.
pub struct Subscription {
    /// The live receiver, waiting for the hub's next broadcast.
    live: ReusableBoxFuture<'static, Received>,
    /// The reset and the stored gap, while they last.
    replay: Option<BoxStream<'static, Result<Bytes, ()>>>,
    filter: Filter,
    /// The last sequence covered: live events at or below it are not sent again.
    sent: u64,
    /// Whether a frame was written since the last keep-alive tick.
    wrote: bool,
    ended: bool,
    _slot: Slot,
}

impl Subscription {
    /// Opens one subscriber's stream from `start`; keep-alive comments come with the hub's
    /// ticks.
    pub async fn open(
        hub: &Hub,
        start: Start,
        filter: Filter,
        slot: Slot,
    ) -> Result<Self, async_nats::Error> {
        let live = hub.subscribe().await?;
        let state = hub.events().get_info().await?.state;
        let (first, last) = (state.first_sequence, state.last_sequence);
        let mut sent = last;
        let mut reset = None;
        let policy = match start {
            Start::New => DeliverPolicy::New,
            Start::Since(time) => DeliverPolicy::ByStartTime {
                start_time: to_offset(time),
            },
            Start::After(_) | Start::At(_) => {
                let mut from = match start {
                    Start::After(seq) => seq.saturating_add(1),
                    Start::At(seq) => seq.max(1),
                    _ => unreachable!("matched above"),
                };
                if from < first {
                    reset = Some(first);
                    from = first;
                }
                if from > last {
                    // Nothing stored to replay; sequences up to the resume point are covered.
                    sent = sent.max(from - 1);
                    DeliverPolicy::New
                } else {
                    DeliverPolicy::ByStartSequence {
                        start_sequence: from,
                    }
                }
            }
        };
        let replay = (reset.is_some() || policy != DeliverPolicy::New).then(|| {
            Replay {
                hub: hub.clone(),
                filter: filter.clone(),
                policy,
                last,
                reset,
                consumer: None,
                finished: policy == DeliverPolicy::New,
            }
            .into_stream()
        });
        Ok(Self {
            live: ReusableBoxFuture::new(recv(live)),
            replay,
            filter,
            sent,
            wrote: false,
            ended: false,
            _slot: slot,
        })
    }

    /// Takes every frame waiting in the ring, starting with `received`: the chunk to write
    /// (if any frame passed the filter), and whether the stream ends after it.
    fn take_waiting(
        &mut self,
        mut received: Result<Arc<Batch>, RecvError>,
        live: &mut Receiver,
    ) -> (Option<Bytes>, bool) {
        let mut chunk = Chunk::default();
        loop {
            match received {
                Ok(batch) => self.take_batch(&batch, &mut chunk),
                Err(RecvError::Lagged(missed)) => {
                    tracing::info!(missed, "event subscriber fell behind; ending its stream");
                    chunk.push(&Bytes::from_static(OVERFLOW));
                    return (chunk.finish(), true);
                }
                Err(RecvError::Closed) => return (chunk.finish(), true),
            }
            if chunk.len() >= MAX_CHUNK {
                return (chunk.finish(), false);
            }
            received = match live.try_recv() {
                Ok(event) => Ok(event),
                Err(TryRecvError::Empty) => return (chunk.finish(), false),
                Err(TryRecvError::Lagged(missed)) => Err(RecvError::Lagged(missed)),
                Err(TryRecvError::Closed) => Err(RecvError::Closed),
            };
        }
    }

    /// What of `batch` this subscriber is sent, into `chunk`: the batch's joined frames as
    /// they are when it takes every event, else the runs it takes, each one slice of them; a
    /// comment at a keep-alive tick when nothing was written since the tick before.
    fn take_batch(&mut self, batch: &Batch, chunk: &mut Chunk) {
        if batch.is_tick() {
            if !std::mem::take(&mut self.wrote) && chunk.len() == 0 {
                chunk.push(&Bytes::from_static(KEEPALIVE));
            }
            return;
        }
        let (Some(first), Some(last)) = (batch.events.first(), batch.events.last()) else {
            return;
        };
        if first.seq <= self.sent {
            // Only at the hand-over from the replay: part of the batch is already sent.
            for event in &batch.events {
                if event.seq > self.sent {
                    self.sent = event.seq;
                    if self.filter.accepts(&event.kind, &event.source) {
                        self.wrote = true;
                        chunk.push(&event.frame);
                    }
                }
            }
            return;
        }
        self.sent = last.seq;
        // A batch holds at most MAX_BATCH events, so at most as many runs.
        let runs = &batch.runs[..batch.runs.len().min(MAX_BATCH)];
        let mut taken = [false; MAX_BATCH];
        for (run, taken) in runs.iter().zip(&mut taken) {
            let event = &batch.events[run.events.start];
            *taken = self.filter.accepts(&event.kind, &event.source);
        }
        let taken = &taken[..runs.len()];
        if taken.iter().all(|t| *t) {
            self.wrote = true;
            chunk.push(&batch.frames);
            return;
        }
        for (run, _) in runs.iter().zip(taken).filter(|(_, t)| **t) {
            self.wrote = true;
            chunk.push(&batch.frames.slice(run.bytes.clone()));
        }
    }
}

impl futures::Stream for Subscription {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(replay) = &mut this.replay {
            match replay.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.wrote = true;
                    return Poll::Ready(Some(Ok(chunk)));
                }
                // The gap is sent: live events take over.
                Poll::Ready(None) => this.replay = None,
                Poll::Ready(Some(Err(()))) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        // Until a frame passes the filter, or the receiver waits (and so will wake this body).
        while let Poll::Ready((received, mut live)) = this.live.poll(cx) {
            let (chunk, ends) = this.take_waiting(received, &mut live);
            if ends {
                this.ended = true;
                return Poll::Ready(chunk.map(Ok));
            }
            this.live.set(recv(live));
            if let Some(chunk) = chunk {
                return Poll::Ready(Some(Ok(chunk)));
            }
        }
        Poll::Pending
    }
}

async fn recv(mut live: Receiver) -> Received {
    let received = live.recv().await;
    (received, live)
}

/// Frames gathered into one chunk: the first frame alone is shared as it is; more are copied
/// into one buffer.
#[derive(Default)]
struct Chunk {
    first: Option<Bytes>,
    joined: BytesMut,
}

impl Chunk {
    fn push(&mut self, frame: &Bytes) {
        if self.first.is_none() && self.joined.is_empty() {
            self.first = Some(frame.clone());
            return;
        }
        if let Some(first) = self.first.take() {
            self.joined.reserve(first.len() + frame.len() * 8);
            self.joined.put_slice(&first);
        }
        self.joined.put_slice(frame);
    }

    fn len(&self) -> usize {
        self.first.as_ref().map_or(self.joined.len(), Bytes::len)
    }

    fn finish(self) -> Option<Bytes> {
        match self.first {
            Some(first) => Some(first),
            None if self.joined.is_empty() => None,
            None => Some(self.joined.freeze()),
        }
    }
}

/// The reset and the stored gap up to the last sequence at the hand-over, one chunk per batch.
struct Replay {
    hub: Hub,
    filter: Filter,
    policy: DeliverPolicy,
    /// The stream's last sequence when the live receiver was taken.
    last: u64,
    reset: Option<u64>,
    consumer: Option<PullConsumer>,
    finished: bool,
}

impl Replay {
    fn into_stream(self) -> BoxStream<'static, Result<Bytes, ()>> {
        futures::stream::unfold(self, |mut replay| async move {
            match replay.next_chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), replay)),
                Ok(None) => None,
                Err(err) => {
                    tracing::warn!(error = %err, "event replay failed; ending the stream");
                    replay.finished = true;
                    Some((Err(()), replay))
                }
            }
        })
        .boxed()
    }

    /// The next chunk of the gap; `None` once it is all sent.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, async_nats::Error> {
        let mut chunk = Chunk::default();
        if let Some(first_seq) = self.reset.take() {
            chunk.push(&Bytes::from(format!(
                "event: reset\ndata: {{\"first_seq\":{first_seq}}}\n\n"
            )));
        }
        while !self.finished && chunk.len() == 0 {
            self.batch(&mut chunk).await?;
        }
        Ok(chunk.finish())
    }

    /// One batch of stored messages into `chunk`.
    async fn batch(&mut self, chunk: &mut Chunk) -> Result<(), async_nats::Error> {
        let consumer = match &self.consumer {
            Some(consumer) => consumer,
            None => self.consumer.insert(
                self.hub
                    .events()
                    .create_consumer(pull::Config {
                        filter_subject: self.hub.subject().to_owned(),
                        deliver_policy: self.policy,
                        ack_policy: AckPolicy::None,
                        inactive_threshold: Duration::from_secs(10),
                        memory_storage: true,
                        ..Default::default()
                    })
                    .await?,
            ),
        };
        let mut batch = consumer
            .fetch()
            .max_messages(REPLAY_BATCH)
            .messages()
            .await?;
        let mut got = 0;
        while let Some(message) = batch.next().await {
            let message = message?;
            got += 1;
            let seq = message.info()?.stream_sequence;
            if seq > self.last {
                // Live events take over from here.
                self.finished = true;
                return Ok(());
            }
            let event =
                StreamedEvent::decode(seq, message.subject.clone(), message.payload.clone());
            if let Some(event) = event.filter(|e| self.filter.accepts(&e.kind, &e.source)) {
                chunk.push(&event.frame);
            }
            if seq == self.last {
                self.finished = true;
                return Ok(());
            }
        }
        if got == 0 {
            self.finished = true;
        }
        Ok(())
    }
}

/// The same instant in the `time` crate's type, which async-nats takes.
fn to_offset(at: DateTime<Utc>) -> time::OffsetDateTime {
    let nanos = at.timestamp_nanos_opt().unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}
