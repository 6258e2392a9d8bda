//! Live subscriptions to stored events: one bus subscription per replica, fanned out to many
//! HTTP subscribers, each able to resume exactly where it left off.
//!
//! - [`Hub`]: one ordered JetStream consumer on `ACC_EVENTS` per replica while anybody is
//!   subscribed (none when idle), broadcasting every new event with its stream sequence and its
//!   SSE frame (rendered once) into a bounded ring, and a keep-alive tick for all of its streams.
//!   A subscriber that falls more than the ring's length behind is cut off (it resumes by its
//!   last id); it never slows the bus or the other subscribers, and memory stays bounded by the
//!   ring.
//! - [`Subscription`]: what one subscriber gets, as its response body — an optional `reset` (its
//!   resume point is older than the stream still holds), the stored gap replayed from the
//!   stream, then the live events, with no duplicate and no loss at the hand-over; polled by
//!   its connection, with no task of its own. Ids are stream sequences, so a
//!   resume works whichever replica serves it.
//! - [`KeyWatch`]: one key of a KV bucket (a task record) as it changes, through the bucket's
//!   hub: its current value, then each later revision; the revision is the SSE `id`.
//! - [`Filter`]: `type` patterns (exact, or NATS-style `*`/`>` over dot-separated tokens) and
//!   `source`.
//! - [`Slots`]: the caps on concurrent streams, per caller and in total.

mod filter;
mod hub;
mod key;
mod slots;
mod subscription;

pub use filter::{Filter, MAX_PATTERNS, TypePattern};
pub use hub::{Batch, Hub, HubUnavailable, IDLE_AFTER, MAX_BATCH, Run, StreamedEvent};
pub use key::KeyWatch;
pub use slots::{Slot, Slots, SlotsFull};
pub use subscription::{Start, Subscription};

use std::time::Duration;

/// Settings of the event streams.
#[derive(Debug, Clone)]
pub struct StreamsSettings {
    /// A comment is sent this often on an idle stream, so proxies keep it open.
    pub keepalive: Duration,
    /// Broadcasts (each of at most [`MAX_BATCH`] events) a subscriber may fall behind the
    /// newest before it is cut off.
    pub buffer: usize,
    /// How long a hub gathers events after the first before it broadcasts them together:
    /// fewer, larger writes per subscriber for at most this much added latency. Zero: each
    /// event is broadcast at once (with any already waiting behind it).
    pub batch_window: Duration,
    /// Concurrent streams in all, on this replica.
    pub max_streams: usize,
    /// Concurrent streams one caller may hold.
    pub max_streams_per_caller: usize,
}
