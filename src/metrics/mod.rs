//! Metrics: what each ingress measures and publishes, what the metrics worker merges, and how
//! both are shown to Prometheus.
//!
//! - [`snapshot`]: the window snapshot an ingress publishes, the fleet snapshot, the merge.
//! - [`worker`]: the metrics role — merges every replica's latest snapshot, adds bus figures,
//!   publishes the fleet snapshot.
//! - [`FleetView`]: the latest fleet snapshot as seen by an ingress (for `/metrics`, `/health`).
//! - [`prometheus`], [`process`]: the `/metrics` text and the process figures.
//! - [`tasks`]: the acting dispatcher's task figures.
//! - [`MetricsSettings`]: how often snapshots are taken, over which window.

pub mod process;
pub mod prometheus;
pub mod snapshot;
pub mod tasks;
pub mod worker;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::Client;
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::bus::{Publisher, subjects};
use crate::stats::Stats;
use crate::telemetry;
use snapshot::{FleetSnapshot, IngressSnapshot};

/// Ingress snapshots and the metrics worker.
#[derive(Debug, Clone)]
pub struct MetricsSettings {
    /// How often each ingress publishes its snapshot, and the worker merges them.
    pub snapshot_interval: Duration,
    /// Sliding window of the latency and error figures.
    pub window: Duration,
    /// `/metrics` names each offline agent (`acc_agent_offline_last_seen_timestamp_seconds`).
    pub agent_ids: bool,
}

/// A fleet or replica snapshot older than this many intervals is ignored: its producer is gone.
pub const STALE_AFTER_INTERVALS: u32 = 3;

/// A random id for this process's snapshots, safe as a subject token.
pub fn instance_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Publishes this ingress's window snapshot every `interval` until `stop`.
pub async fn publish_snapshots(
    publisher: Publisher,
    stats: Arc<Stats>,
    instance: String,
    interval: Duration,
    stop: CancellationToken,
) {
    let subject = subjects::metric_snapshot(&instance);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        n += 1;
        let snapshot = IngressSnapshot::take(&instance, &stats);
        let payload = match serde_json::to_vec(&snapshot) {
            Ok(payload) => Bytes::from(payload),
            Err(err) => {
                tracing::error!(error = %err, "cannot encode the metrics snapshot");
                continue;
            }
        };
        let id = format!("snap:{instance}:{n}");
        let published = publisher
            .publish(subject.clone(), &id, payload, None)
            .instrument(telemetry::routine_span("metrics snapshot"))
            .await;
        if let Err(err) = published {
            tracing::warn!(error = %err, "cannot publish the metrics snapshot; next interval");
        }
    }
}

/// The latest fleet snapshot an ingress has seen, kept while it is fresh.
pub struct FleetView {
    latest: RwLock<Option<(Instant, Arc<FleetSnapshot>)>>,
    max_age: Duration,
}

impl FleetView {
    /// Snapshots older than `max_age` (since received) are not served.
    pub fn new(max_age: Duration) -> Self {
        Self {
            latest: RwLock::new(None),
            max_age,
        }
    }

    /// The latest snapshot, when fresh.
    pub fn latest(&self) -> Option<Arc<FleetSnapshot>> {
        let guard = self.latest.read().expect("not poisoned");
        guard
            .as_ref()
            .filter(|(at, _)| at.elapsed() <= self.max_age)
            .map(|(_, snapshot)| snapshot.clone())
    }

    fn set(&self, snapshot: FleetSnapshot) {
        *self.latest.write().expect("not poisoned") = Some((Instant::now(), Arc::new(snapshot)));
    }

    /// Reads the stored latest fleet snapshot, then follows new ones until `stop`.
    pub async fn follow(
        self: Arc<Self>,
        client: Client,
        js: jetstream::Context,
        stop: CancellationToken,
    ) {
        let mut subscription = loop {
            match client.subscribe(subjects::FLEET_METRICS).await {
                Ok(subscription) => break subscription,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot follow fleet metrics; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        if let Ok(stream) = js.get_stream(subjects::METRICS_STREAM).await {
            if let Ok(message) = stream
                .get_last_raw_message_by_subject(subjects::FLEET_METRICS)
                .await
            {
                if let Ok(snapshot) = serde_json::from_slice::<FleetSnapshot>(&message.payload) {
                    if stored_age(&message) <= self.max_age {
                        self.set(snapshot);
                    }
                }
            }
        }
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return,
                message = subscription.next() => message,
            };
            let Some(message) = message else { return };
            match serde_json::from_slice::<FleetSnapshot>(&message.payload) {
                Ok(snapshot) => self.set(snapshot),
                Err(err) => tracing::warn!(error = %err, "unreadable fleet snapshot"),
            }
        }
    }
}

/// How long ago the bus stored `message`, by the server-assigned timestamp rather than one the
/// producer wrote into the payload: a producer with a clock ahead (or a bogus timestamp) cannot
/// make an old message look fresh. A stamp ahead of our clock by more than [`MAX_SKEW`] counts
/// as stale (`Duration::MAX`).
pub fn stored_age(message: &async_nats::jetstream::message::StreamMessage) -> Duration {
    let nanos = message.time.unix_timestamp_nanos();
    let stored = chrono::DateTime::from_timestamp_nanos(
        nanos.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64,
    );
    age_since(chrono::Utc::now(), stored)
}

/// Clock disagreement between this process and the NATS server tolerated in [`stored_age`].
pub const MAX_SKEW: Duration = Duration::from_secs(5);

/// `now - then`, with a `then` more than [`MAX_SKEW`] in the future treated as stale.
pub fn age_since(
    now: chrono::DateTime<chrono::Utc>,
    then: chrono::DateTime<chrono::Utc>,
) -> Duration {
    match (now - then).to_std() {
        Ok(age) => age,
        Err(_) if (then - now).to_std().is_ok_and(|ahead| ahead <= MAX_SKEW) => Duration::ZERO,
        Err(_) => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_freshness_treats_a_future_timestamp_as_stale() {
        let now = chrono::Utc::now();
        assert_eq!(
            age_since(now, now - chrono::Duration::seconds(3)),
            Duration::from_secs(3)
        );
        assert_eq!(
            age_since(now, now + chrono::Duration::seconds(2)),
            Duration::ZERO
        );
        assert_eq!(
            age_since(now, now + chrono::Duration::hours(1)),
            Duration::MAX
        );
    }
}
