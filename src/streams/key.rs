//! [`KeyWatch`]: one key of a KV bucket as it changes, through the bucket's [`Hub`] — no
//! JetStream consumer of its own, however many watch.
//!
//! The hand-over is the one of [`super::Subscription`]: the live receiver is taken from the hub
//! *before* the key's stored value is read, so every later change reaches the receiver; a
//! change at or below the revision already covered is skipped. A bucket keeping one revision
//! per key (`history: 1`) holds nothing older than the current value, so "the gap" of a resume
//! is at most that value: it is sent when it is newer than the resume point. A watcher that
//! falls behind the hub's ring reads the key's value again instead of being cut off: only the
//! newest value of one key matters to it.

use std::sync::Arc;

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::{Batch, Hub, Slot, StreamedEvent};

/// Changes queued per watcher between its task and its connection.
const QUEUE: usize = 16;
/// A watcher whose queue stays full this long is ended.
const STUCK_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// A running watch of one key.
pub struct KeyWatch {
    /// The key's value when the watch opened, if it has one.
    pub current: Option<Arc<StreamedEvent>>,
    /// Every later change of the key, in revision order, none at or below `current`'s (or the
    /// resume point's) revision.
    pub changes: mpsc::Receiver<Arc<StreamedEvent>>,
}

impl KeyWatch {
    /// Watches `subject` (one key of the bucket `hub` follows) for changes after revision
    /// `after`. The task holds `slot` while it runs and ends when `changes` is dropped, the
    /// hub closes, or `stop` fires.
    pub async fn open(
        hub: &Hub,
        subject: String,
        after: u64,
        slot: Slot,
        stop: CancellationToken,
    ) -> Result<Self, async_nats::Error> {
        let live = hub.subscribe().await?;
        let current = last_value(hub, &subject).await?;
        let covered = current.as_ref().map_or(after, |c| c.seq.max(after));
        let (sender, changes) = mpsc::channel(QUEUE);
        let task = Task {
            hub: hub.clone(),
            subject,
            sender,
            covered,
        };
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                () = stop.cancelled() => {}
                () = task.run(live) => {}
            }
        });
        Ok(Self { current, changes })
    }
}

struct Task {
    hub: Hub,
    subject: String,
    sender: mpsc::Sender<Arc<StreamedEvent>>,
    /// The highest revision covered: changes at or below it are not sent.
    covered: u64,
}

impl Task {
    async fn run(mut self, mut live: broadcast::Receiver<Arc<Batch>>) {
        loop {
            let received = tokio::select! {
                () = self.sender.closed() => return,
                received = live.recv() => received,
            };
            let change = match received {
                // The key's newest change in the batch, if it changed.
                Ok(batch) => match batch
                    .events
                    .iter()
                    .rev()
                    .find(|e| e.subject.as_str() == self.subject)
                {
                    Some(event) => event.clone(),
                    None => continue,
                },
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Other keys crowded the ring: this key's newest value is all that counts.
                    match last_value(&self.hub, &self.subject).await {
                        Ok(Some(value)) => value,
                        Ok(None) => continue,
                        Err(err) => {
                            tracing::warn!(error = %err, "key watch cannot read the key again; ending");
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if change.seq <= self.covered {
                continue;
            }
            self.covered = change.seq;
            // A connection that takes nothing for that long is ended, as in a subscription.
            match tokio::time::timeout(STUCK_AFTER, self.sender.send(change)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return,
            }
        }
    }
}

/// The stored value of `subject` with its revision; `None` when it has none (never written, or
/// deleted).
async fn last_value(
    hub: &Hub,
    subject: &str,
) -> Result<Option<Arc<StreamedEvent>>, async_nats::Error> {
    match hub.events().get_last_raw_message_by_subject(subject).await {
        Ok(message) if message.payload.is_empty() => Ok(None),
        Ok(message) => {
            Ok(
                StreamedEvent::decode(message.sequence, message.subject, message.payload)
                    .map(Arc::new),
            )
        }
        Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(err) => Err(err.into()),
    }
}
