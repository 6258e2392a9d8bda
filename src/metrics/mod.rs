//! Metrics: what each ingress measures and publishes, what the metrics worker merges, and how
//! both are shown to Prometheus.
//!
//! - [`snapshot`]: the window snapshot an ingress publishes, the fleet snapshot, the merge.
//! - [`worker`]: the metrics role — merges every replica's latest snapshot, adds bus figures,
//!   publishes the fleet snapshot.
//! - [`FleetView`]: the latest fleet snapshot as seen by an ingress (for `/metrics`, `/health`).
//! - [`prometheus`], [`process`]: the `/metrics` text and the process figures.

pub mod process;
pub mod prometheus;
pub mod snapshot;
pub mod worker;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::Client;
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::bus::{Publisher, subjects};
use crate::stats::Stats;
use snapshot::{FleetSnapshot, IngressSnapshot};

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
        if let Err(err) = publisher.publish(subject.clone(), &id, payload, None).await {
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
                    let age = chrono::Utc::now() - snapshot.generated_at;
                    if age.to_std().is_ok_and(|age| age <= self.max_age) {
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
