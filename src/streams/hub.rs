//! [`Hub`]: the one bus subscription per replica behind every stream of one kind (events,
//! agent status changes, alerts, the audit trail, task records).

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Subject;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::stream::Stream;
use bytes::{BufMut as _, Bytes, BytesMut};
use futures::{FutureExt as _, StreamExt as _};
use serde::Deserialize;
use tokio::sync::{Notify, broadcast, watch};
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
/// joined once for the subscribers that are sent all of them. A batch without events is a
/// keep-alive tick.
#[derive(Debug)]
pub struct Batch {
    pub events: Vec<Arc<StreamedEvent>>,
    /// Every event's frame, in order.
    pub frames: Bytes,
    /// The events cut into runs of one `type` and `source` each, in order: a subscriber's
    /// filter decides once per run, not once per event, and a run it takes is one slice of
    /// `frames`.
    pub runs: Vec<Run>,
}

/// Consecutive events of a [`Batch`] with the same `type` and `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Its events: `events[events]`.
    pub events: Range<usize>,
    /// Their frames: `frames[bytes]`.
    pub bytes: Range<usize>,
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
        let mut runs: Vec<Run> = Vec::new();
        let mut at = 0;
        for (i, event) in events.iter().enumerate() {
            let bytes = at..at + event.frame.len();
            at = bytes.end;
            match runs.last_mut() {
                Some(run)
                    if events[run.events.start].kind == event.kind
                        && events[run.events.start].source == event.source =>
                {
                    run.events.end = i + 1;
                    run.bytes.end = bytes.end;
                }
                _ => runs.push(Run {
                    events: i..i + 1,
                    bytes,
                }),
            }
        }
        Self {
            events,
            frames,
            runs,
        }
    }

    /// A batch without events: the keep-alive tick.
    pub fn is_tick(&self) -> bool {
        self.events.is_empty()
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

/// How long a hub keeps its consumer with nobody subscribed before it drops it.
pub const IDLE_AFTER: Duration = Duration::from_secs(3);
/// How often a following hub looks whether anybody is still subscribed.
const IDLE_CHECK: Duration = Duration::from_millis(500);
/// How long a subscriber waits for a hub that follows nothing to follow its stream again.
const FOLLOW_WAIT: Duration = Duration::from_secs(5);

/// Why a hub hands out no receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HubUnavailable {
    /// The hub has stopped (shutdown).
    #[error("the event hub has stopped")]
    Stopped,
    /// The hub could not follow its stream within [`FOLLOW_WAIT`] (the bus is unreachable).
    #[error("the event hub cannot follow its stream")]
    NotFollowing,
}

/// Follows one subject pattern of one stream with one ordered consumer, while anybody is
/// subscribed, and broadcasts each new message; a keep-alive tick to every subscriber every
/// keep-alive interval. Cheap to clone.
///
/// With nobody subscribed for [`IDLE_AFTER`] the hub deletes its consumer, so an idle replica
/// costs the bus nothing; the next subscriber has it create one again, from the stream's next
/// sequence at that moment. That is all a new subscriber needs: it reads the stream's last
/// sequence only after it holds its receiver (see [`super::Subscription`]), and replays up to
/// there from the stream itself.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    events: Stream,
    /// The subjects followed, e.g. `acc.events.*`.
    subject: &'static str,
    /// `None` once the hub has stopped: dropping the sender ends every receiver, so every
    /// open stream ends on shutdown without watching a stop signal of its own. Its lock also
    /// orders a subscriber's receiver against the hub's decision to go idle.
    sender: Mutex<Option<broadcast::Sender<Arc<Batch>>>>,
    /// How long the first event of a batch waits for others before the batch is broadcast.
    window: Duration,
    /// How often a keep-alive tick (a batch without events) is broadcast.
    keepalive: Duration,
    /// Whether every event stored from now on will be broadcast: set once the consumer
    /// exists, cleared (under `sender`'s lock, with no receiver left) when the hub goes idle.
    following: watch::Sender<bool>,
    /// Wakes an idle hub: somebody wants to subscribe.
    wanted: Notify,
}

/// How one consumer's run ended without an error.
enum Followed {
    /// Nobody was subscribed for [`IDLE_AFTER`]: the consumer is gone.
    Idle,
    /// The consumer's messages ended.
    Ended,
}

impl Hub {
    /// A hub over `subject` of `events` whose subscribers may fall `buffer` broadcasts
    /// behind, each gathering what arrives within `window` of its first event, with a
    /// keep-alive tick every `keepalive`.
    pub fn new(
        events: Stream,
        subject: &'static str,
        buffer: usize,
        window: Duration,
        keepalive: Duration,
    ) -> Self {
        let (sender, _) = broadcast::channel(buffer.max(1));
        Self {
            inner: Arc::new(Inner {
                events,
                subject,
                sender: Mutex::new(Some(sender)),
                window,
                keepalive,
                following: watch::Sender::new(false),
                wanted: Notify::new(),
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
    /// stream (so that every event stored after this call reaches the receiver). An idle hub
    /// is woken to follow it again; it has [`FOLLOW_WAIT`] to do so.
    pub async fn subscribe(&self) -> Result<broadcast::Receiver<Arc<Batch>>, HubUnavailable> {
        let mut following = self.inner.following.subscribe();
        let wait = async {
            loop {
                {
                    let sender = self.sender();
                    let sender = sender.as_ref().ok_or(HubUnavailable::Stopped)?;
                    if *following.borrow_and_update() {
                        return Ok(sender.subscribe());
                    }
                }
                self.inner.wanted.notify_one();
                following
                    .changed()
                    .await
                    .map_err(|_| HubUnavailable::Stopped)?;
            }
        };
        tokio::time::timeout(FOLLOW_WAIT, wait)
            .await
            .unwrap_or(Err(HubUnavailable::NotFollowing))
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

    /// Follows the stream while anybody is subscribed, until `stop` fires, re-creating its
    /// consumer after any interruption from the next sequence it has not broadcast; ticks the
    /// subscribers' keep-alive meanwhile. Then closes, which ends every receiver.
    pub async fn run(self, stop: CancellationToken) {
        tokio::join!(self.follow_while_wanted(&stop), self.tick(&stop));
        self.sender().take();
    }

    /// One keep-alive tick (a batch without events) every interval, to whoever is subscribed:
    /// one timer per hub instead of one per stream.
    async fn tick(&self, stop: &CancellationToken) {
        let every = self.inner.keepalive.max(Duration::from_millis(1));
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let sender = self.sender();
            if let Some(sender) = sender.as_ref().filter(|s| s.receiver_count() > 0) {
                drop(sender.send(Arc::new(Batch::new(Vec::new()))));
            }
        }
    }

    async fn follow_while_wanted(&self, stop: &CancellationToken) {
        // Where to resume after an interruption while subscribers stay; `None` while idle.
        let mut next: Option<u64> = None;
        // Whether to wait for a subscriber first (not when retrying for one that waits).
        let mut wait = true;
        loop {
            if wait && !*self.inner.following.borrow() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = self.inner.wanted.notified() => {}
                }
            }
            wait = true;
            let followed = tokio::select! {
                () = stop.cancelled() => return,
                followed = self.follow(&mut next) => followed,
            };
            match followed {
                Ok(Followed::Idle) => {
                    next = None;
                    continue;
                }
                Ok(Followed::Ended) => {}
                Err(err) => tracing::warn!(error = %err, "event hub interrupted; following again"),
            }
            if self.went_idle(None) {
                // Nobody holds a receiver: the next follow starts afresh, now if somebody waits
                // in `subscribe` (each holds a receiver of `following`), else for the next one.
                next = None;
                if self.inner.following.receiver_count() == 0 {
                    continue;
                }
            }
            wait = false;
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// Whether the hub stops following: nobody is subscribed (since `since` is at least
    /// [`IDLE_AFTER`] ago, when given). Decided under the sender's lock, so a subscriber
    /// either holds its receiver before (and the hub follows on) or waits for the hub after.
    fn went_idle(&self, since: Option<&mut Option<tokio::time::Instant>>) -> bool {
        let sender = self.sender();
        if sender.as_ref().is_some_and(|s| s.receiver_count() > 0) {
            if let Some(since) = since {
                *since = None;
            }
            return false;
        }
        if let Some(since) = since {
            let idle = *since.get_or_insert_with(tokio::time::Instant::now);
            if idle.elapsed() < IDLE_AFTER {
                return false;
            }
        }
        self.inner.following.send_replace(false);
        true
    }

    /// One consumer from `next` (or the stream's next sequence), relayed until it ends, fails,
    /// or nobody is subscribed; then deleted.
    async fn follow(&self, next: &mut Option<u64>) -> Result<Followed, async_nats::Error> {
        let start = match *next {
            Some(seq) => seq,
            None => self.inner.events.get_info().await?.state.last_sequence + 1,
        };
        // Its own name, so the hub can delete it (and what the ordered consumer re-creates as
        // `<name>_<n>`) rather than leave it to the server's inactivity timeout.
        let name = format!("acc_hub_{:016x}", rand::random::<u64>());
        let consumer = self
            .inner
            .events
            .create_consumer(pull::OrderedConfig {
                name: Some(name.clone()),
                filter_subject: self.inner.subject.to_owned(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await?;
        let relayed = match consumer.messages().await {
            Ok(mut messages) => {
                *next = Some(start);
                self.inner.following.send_replace(true);
                self.relay(&mut messages, next).await
            }
            Err(err) => Err(err.into()),
        };
        self.delete_consumers(&name).await;
        relayed
    }

    /// Deletes the consumer `name` and what the ordered consumer re-created of it; best effort
    /// (the server's inactivity timeout removes whatever is left).
    async fn delete_consumers(&self, name: &str) {
        let again = format!("{name}_");
        let Ok(names) = tokio::time::timeout(Duration::from_secs(2), async {
            self.inner
                .events
                .consumer_names()
                .filter_map(|n| async move { n.ok() })
                .filter(|n| futures::future::ready(n == name || n.starts_with(&again)))
                .collect::<Vec<_>>()
                .await
        })
        .await
        else {
            return;
        };
        for consumer in names {
            if let Err(err) = self.inner.events.delete_consumer(&consumer).await {
                tracing::debug!(error = %err, consumer, "event hub could not delete its consumer");
            }
        }
    }

    /// Broadcasts what `messages` deliver, in batches, until they end or fail, or nobody is
    /// subscribed for [`IDLE_AFTER`].
    async fn relay(
        &self,
        messages: &mut pull::Ordered,
        next: &mut Option<u64>,
    ) -> Result<Followed, async_nats::Error> {
        let mut batch: Vec<Arc<StreamedEvent>> = Vec::with_capacity(MAX_BATCH);
        let mut due = tokio::time::Instant::now();
        let mut checks = tokio::time::interval(IDLE_CHECK);
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut idle_since = None;
        loop {
            // The first event of a batch is awaited for as long as it takes (with a look at
            // whether anybody still listens now and then); the others for what is left of the
            // window, or, with no window, only if already there.
            let message = if batch.is_empty() {
                tokio::select! {
                    biased;
                    message = messages.next() => match message {
                        Some(message) => message,
                        None => return Ok(Followed::Ended),
                    },
                    _ = checks.tick() => {
                        if self.went_idle(Some(&mut idle_since)) {
                            return Ok(Followed::Idle);
                        }
                        continue;
                    }
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
                        return Ok(Followed::Ended);
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

    #[test]
    fn a_batch_cuts_its_events_into_runs_of_one_type_and_source() {
        let events = vec![
            event(1, r#"{"type":"a","source":"s"}"#),
            event(2, r#"{"type":"a","source":"s"}"#),
            event(3, r#"{"type":"b","source":"s"}"#),
            event(4, r#"{"type":"b","source":"t"}"#),
            event(5, r#"{"type":"b","source":"t"}"#),
        ];
        let batch = Batch::new(events.clone());
        let runs: Vec<_> = batch.runs.iter().map(|r| r.events.clone()).collect();
        assert_eq!(runs, [0..2, 2..3, 3..5]);
        for run in &batch.runs {
            let frames: Vec<u8> = events[run.events.clone()]
                .iter()
                .flat_map(|e| e.frame.iter().copied())
                .collect();
            assert_eq!(&batch.frames[run.bytes.clone()], frames.as_slice());
        }
        assert!(Batch::new(Vec::new()).is_tick());
    }
}
