//! [`Hub`]: the one bus subscription per replica behind every stream of one kind (events,
//! agent status changes, alerts, the audit trail, task records).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Subject;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::stream::Stream;
use bytes::{BufMut as _, Bytes, BytesMut};
use futures::{FutureExt as _, StreamExt as _};
use serde::Deserialize;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

/// One stored event as subscribers see it.
#[derive(Debug)]
pub struct StreamedEvent {
    /// Its sequence in its stream (`ACC_EVENTS` for events, the revision for a bucket): the
    /// SSE `id`.
    pub seq: u64,
    /// The subject it was stored on: for a bucket's hub, which key changed.
    pub subject: Subject,
    /// Its `type`, for filters.
    pub kind: String,
    /// Its `source`, for filters.
    pub source: String,
    /// The stored JSON, sent as it is.
    pub payload: Bytes,
    /// Its SSE frame (`id:` and `data:` lines), rendered once here and shared by every
    /// subscriber that is sent it.
    pub frame: Bytes,
}

impl StreamedEvent {
    /// Reads what filters need from a stored message (`type` and `source`, empty when the
    /// message has none); `None` when it is not a JSON object.
    pub fn decode(seq: u64, subject: Subject, payload: Bytes) -> Option<Self> {
        #[derive(Deserialize)]
        struct Fields {
            #[serde(rename = "type", default)]
            kind: String,
            #[serde(default)]
            source: String,
        }
        let fields: Fields = serde_json::from_slice(&payload).ok()?;
        Some(Self {
            seq,
            subject,
            kind: fields.kind,
            source: fields.source,
            frame: render(seq, &payload),
            payload,
        })
    }
}

/// Events broadcast together: what followed each other within one batch window (or was
/// already waiting), at most [`MAX_BATCH`] of them, in sequence order, with their frames
/// joined once for the subscribers that are sent all of them.
#[derive(Debug)]
pub struct Batch {
    pub events: Vec<Arc<StreamedEvent>>,
    /// Every event's frame, in order.
    pub frames: Bytes,
}

impl Batch {
    fn new(events: Vec<Arc<StreamedEvent>>) -> Self {
        let frames = match events.as_slice() {
            [one] => one.frame.clone(),
            many => {
                let mut joined = BytesMut::with_capacity(many.iter().map(|e| e.frame.len()).sum());
                for event in many {
                    joined.put_slice(&event.frame);
                }
                joined.freeze()
            }
        };
        Self { events, frames }
    }
}

/// Most events in one broadcast: what the ring holds is at most this many times its length.
pub const MAX_BATCH: usize = 32;

/// The SSE frame of the message stored at `seq`: `id: <seq>`, one `data:` line per line of the
/// payload (stored JSON is one line; a pretty-printed one is split as SSE requires), a blank
/// line.
fn render(seq: u64, payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(payload.len() + 32);
    frame.put_slice(b"id: ");
    frame.put_slice(seq.to_string().as_bytes());
    frame.put_u8(b'\n');
    for line in payload.split(|b| *b == b'\n') {
        frame.put_slice(b"data: ");
        frame.put_slice(line.strip_suffix(b"\r").unwrap_or(line));
        frame.put_u8(b'\n');
    }
    frame.put_u8(b'\n');
    frame.freeze()
}

/// Follows one subject pattern of one stream with one ordered consumer and broadcasts each new
/// message. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    events: Stream,
    /// The subjects followed, e.g. `acc.events.*`.
    subject: &'static str,
    /// `None` once the hub has stopped: dropping the sender ends every receiver, so every
    /// open stream ends on shutdown without watching a stop signal of its own.
    sender: Mutex<Option<broadcast::Sender<Arc<Batch>>>>,
    /// How long the first event of a batch waits for others before the batch is broadcast.
    window: Duration,
    /// The first sequence the hub covers, once its consumer exists: every event from there on
    /// is broadcast, in order.
    covers_from: watch::Sender<Option<u64>>,
}

impl Hub {
    /// A hub over `subject` of `events` whose subscribers may fall `buffer` broadcasts
    /// behind, each gathering what arrives within `window` of its first event.
    pub fn new(events: Stream, subject: &'static str, buffer: usize, window: Duration) -> Self {
        let (sender, _) = broadcast::channel(buffer.max(1));
        Self {
            inner: Arc::new(Inner {
                events,
                subject,
                sender: Mutex::new(Some(sender)),
                window,
                covers_from: watch::Sender::new(None),
            }),
        }
    }

    /// The stream followed, for replays.
    pub fn events(&self) -> &Stream {
        &self.inner.events
    }

    /// The subjects followed, for replays.
    pub fn subject(&self) -> &'static str {
        self.inner.subject
    }

    /// A receiver of every event the hub broadcasts from now on, once the hub follows the
    /// stream (so that every event stored after this call reaches the receiver); `None` once
    /// the hub has stopped.
    pub async fn subscribe(&self) -> Option<broadcast::Receiver<Arc<Batch>>> {
        let mut ready = self.inner.covers_from.subscribe();
        let _ = ready.wait_for(Option::is_some).await;
        self.sender().as_ref().map(broadcast::Sender::subscribe)
    }

    /// Subscribers right now.
    pub fn subscribers(&self) -> usize {
        self.sender()
            .as_ref()
            .map_or(0, broadcast::Sender::receiver_count)
    }

    fn sender(&self) -> std::sync::MutexGuard<'_, Option<broadcast::Sender<Arc<Batch>>>> {
        self.inner.sender.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows the stream until `stop` fires, re-creating its consumer after any interruption
    /// from the next sequence it has not broadcast; then closes, which ends every receiver.
    pub async fn run(self, stop: CancellationToken) {
        let mut next: Option<u64> = None;
        loop {
            let followed = tokio::select! {
                () = stop.cancelled() => break,
                followed = self.follow(&mut next) => followed,
            };
            if let Err(err) = followed {
                tracing::warn!(error = %err, "event hub interrupted; following again");
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
        self.sender().take();
    }

    async fn follow(&self, next: &mut Option<u64>) -> Result<(), async_nats::Error> {
        let start = match *next {
            Some(seq) => seq,
            None => self.inner.events.get_info().await?.state.last_sequence + 1,
        };
        let consumer = self
            .inner
            .events
            .create_consumer(pull::OrderedConfig {
                filter_subject: self.inner.subject.to_owned(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        *next = Some(start);
        self.inner.covers_from.send_replace(Some(start));
        let mut batch: Vec<Arc<StreamedEvent>> = Vec::with_capacity(MAX_BATCH);
        let mut due = tokio::time::Instant::now();
        loop {
            // The first event of a batch is awaited for as long as it takes; the others for
            // what is left of the window, or, with no window, only if already there.
            let message = if batch.is_empty() {
                match messages.next().await {
                    Some(message) => message,
                    None => return Ok(()),
                }
            } else {
                let more = if self.inner.window.is_zero() {
                    messages.next().now_or_never()
                } else {
                    tokio::time::timeout_at(due, messages.next()).await.ok()
                };
                match more {
                    Some(Some(message)) => message,
                    Some(None) => {
                        self.broadcast(&mut batch);
                        return Ok(());
                    }
                    None => {
                        self.broadcast(&mut batch);
                        continue;
                    }
                }
            };
            let message = match message {
                Ok(message) => message,
                Err(err) => {
                    self.broadcast(&mut batch);
                    return Err(err.into());
                }
            };
            let seq = message.info()?.stream_sequence;
            *next = Some(seq + 1);
            if message.payload.is_empty() {
                // A bucket's delete or purge marker: no value to stream.
                continue;
            }
            match StreamedEvent::decode(seq, message.subject.clone(), message.payload.clone()) {
                Some(event) => {
                    if batch.is_empty() {
                        due = tokio::time::Instant::now() + self.inner.window;
                    }
                    batch.push(Arc::new(event));
                }
                None => tracing::warn!(
                    seq,
                    subject = self.inner.subject,
                    "unreadable stored message; not streamed"
                ),
            }
            if batch.len() == MAX_BATCH {
                self.broadcast(&mut batch);
            }
        }
    }

    /// Broadcasts what `batch` gathered, if anything, and empties it.
    fn broadcast(&self, batch: &mut Vec<Arc<StreamedEvent>>) {
        if batch.is_empty() {
            return;
        }
        let events = std::mem::replace(batch, Vec::with_capacity(MAX_BATCH));
        if let Some(sender) = self.sender().as_ref() {
            // No receiver is not an error: nobody is subscribed right now.
            drop(sender.send(Arc::new(Batch::new(events))));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, payload: &'static str) -> Arc<StreamedEvent> {
        Arc::new(
            StreamedEvent::decode(seq, Subject::from("acc.events.x"), Bytes::from(payload))
                .unwrap(),
        )
    }

    #[test]
    fn a_frame_carries_the_sequence_and_one_data_line_per_payload_line() {
        let one = event(7, r#"{"type":"a.b","source":"s"}"#);
        assert_eq!(
            one.frame.as_ref(),
            b"id: 7\ndata: {\"type\":\"a.b\",\"source\":\"s\"}\n\n"
        );
        assert_eq!((one.kind.as_str(), one.source.as_str()), ("a.b", "s"));
        let pretty = event(8, "{\r\n  \"type\": \"a\"\n}");
        assert_eq!(
            pretty.frame.as_ref(),
            b"id: 8\ndata: {\ndata:   \"type\": \"a\"\ndata: }\n\n"
        );
    }

    #[test]
    fn a_batch_joins_its_frames_in_order_and_shares_a_single_one() {
        let (a, b) = (event(1, r#"{"type":"a"}"#), event(2, r#"{"type":"b"}"#));
        let single = Batch::new(vec![a.clone()]);
        assert_eq!(single.frames.as_ptr(), a.frame.as_ptr(), "not copied");
        let both = Batch::new(vec![a.clone(), b.clone()]);
        assert_eq!(both.frames, [a.frame.as_ref(), b.frame.as_ref()].concat());
    }
}
