//! [`Subscription`]: one subscriber's events — a reset when needed, the stored gap, then live
//! events — handed over without a gap or a duplicate.
//!
//! The hand-over: the subscriber's live receiver is taken from the [`Hub`] *before* the
//! stream's last sequence `L` is read. Every event stored after that read is broadcast after
//! the receiver existed, so the receiver sees it; the replay covers everything up to `L`; live
//! events at or below the last sequence already sent are skipped.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::{Filter, Hub, Slot, StreamedEvent};

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

/// What a subscriber is sent.
#[derive(Debug, Clone)]
pub enum Item {
    /// The resume point is older than the stream holds; the replay starts at `first_seq`.
    Reset {
        first_seq: u64,
    },
    Event(Arc<StreamedEvent>),
    /// The subscriber fell too far behind; its stream ends here (it resumes by its last id).
    Overflow,
}

/// Items queued per subscriber between its task and its connection.
const QUEUE: usize = 64;
/// A subscriber whose queue stays full this long is ended.
pub(super) const STUCK_AFTER: Duration = Duration::from_secs(30);
/// Messages asked for per replay batch.
const REPLAY_BATCH: usize = 1_000;

/// A running subscription: items arrive on [`Subscription::items`].
pub struct Subscription {
    pub items: mpsc::Receiver<Item>,
}

impl Subscription {
    /// Starts one subscriber's task. It holds `slot` while it runs, and ends when the receiver
    /// is dropped (the client went away), the subscriber overflows, or `stop` fires.
    pub async fn open(
        hub: &Hub,
        start: Start,
        filter: Filter,
        slot: Slot,
        stop: CancellationToken,
    ) -> Result<Self, async_nats::Error> {
        let live = hub.subscribe().await;
        let state = hub.events().get_info().await?.state;
        let (first, last) = (state.first_sequence, state.last_sequence);
        let (sender, items) = mpsc::channel(QUEUE);
        let task = Task {
            hub: hub.clone(),
            filter,
            sender,
            sent: last,
        };
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                () = stop.cancelled() => {}
                () = task.run(start, first, last, live) => {}
            }
        });
        Ok(Self { items })
    }
}

struct Task {
    hub: Hub,
    filter: Filter,
    sender: mpsc::Sender<Item>,
    /// The last sequence covered: live events at or below it are not sent again.
    sent: u64,
}

impl Task {
    async fn run(
        mut self,
        start: Start,
        first: u64,
        last: u64,
        mut live: broadcast::Receiver<Arc<StreamedEvent>>,
    ) {
        let replay_from = match start {
            Start::New => None,
            Start::After(seq) => Some(DeliverPolicy::ByStartSequence {
                start_sequence: seq.saturating_add(1),
            }),
            Start::At(seq) => Some(DeliverPolicy::ByStartSequence {
                start_sequence: seq.max(1),
            }),
            Start::Since(time) => Some(DeliverPolicy::ByStartTime {
                start_time: to_offset(time),
            }),
        };
        if let Some(mut policy) = replay_from {
            if let DeliverPolicy::ByStartSequence { start_sequence } = policy {
                if start_sequence < first {
                    if !self.send(Item::Reset { first_seq: first }).await {
                        return;
                    }
                    policy = DeliverPolicy::ByStartSequence {
                        start_sequence: first,
                    };
                }
                if start_sequence > last {
                    // Nothing stored to replay; sequences up to the resume point are covered.
                    self.sent = self.sent.max(start_sequence - 1);
                    policy = DeliverPolicy::New;
                }
            }
            if policy != DeliverPolicy::New {
                match self.replay(policy, last).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(err) => {
                        tracing::warn!(error = %err, "event replay failed; ending the stream");
                        return;
                    }
                }
            }
        }
        loop {
            let received = tokio::select! {
                // The connection is gone (its queue's receiver dropped): free the slot now, not
                // at the next event.
                () = self.sender.closed() => return,
                received = live.recv() => received,
            };
            let event = match received {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::info!(missed, "event subscriber fell behind; ending its stream");
                    self.send(Item::Overflow).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if event.seq <= self.sent {
                continue;
            }
            self.sent = event.seq;
            if self.filter.accepts(&event.kind, &event.source)
                && !self.send(Item::Event(event)).await
            {
                return;
            }
        }
    }

    /// Sends the stored events from `policy` up to `last`. False when the client went away.
    async fn replay(
        &mut self,
        policy: DeliverPolicy,
        last: u64,
    ) -> Result<bool, async_nats::Error> {
        let consumer = self
            .hub
            .events()
            .create_consumer(pull::Config {
                filter_subject: self.hub.subject().to_owned(),
                deliver_policy: policy,
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(10),
                memory_storage: true,
                ..Default::default()
            })
            .await?;
        loop {
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
                if seq > last {
                    // Live events take over from here.
                    return Ok(true);
                }
                self.sent = seq;
                let Some(event) =
                    StreamedEvent::decode(seq, message.subject.clone(), message.payload.clone())
                else {
                    continue;
                };
                if self.filter.accepts(&event.kind, &event.source)
                    && !self.send(Item::Event(Arc::new(event))).await
                {
                    return Ok(false);
                }
                if seq == last {
                    return Ok(true);
                }
            }
            if got == 0 {
                return Ok(true);
            }
        }
    }

    /// Queues `item` for the connection. False when the client went away, or has not taken
    /// anything for [`STUCK_AFTER`] with its queue full: then the subscription ends and frees
    /// its slot, whatever the connection does.
    async fn send(&self, item: Item) -> bool {
        match tokio::time::timeout(STUCK_AFTER, self.sender.send(item)).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                tracing::info!(
                    "event subscriber took nothing for {STUCK_AFTER:?}; ending its stream"
                );
                false
            }
        }
    }
}

/// The same instant in the `time` crate's type, which async-nats takes.
fn to_offset(at: DateTime<Utc>) -> time::OffsetDateTime {
    let nanos = at.timestamp_nanos_opt().unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}
