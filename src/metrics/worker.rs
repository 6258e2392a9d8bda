//! The metrics worker: every `METRICS_SNAPSHOT_INTERVAL`, reads the latest snapshot of every
//! ingress replica from `ACC_METRICS` (last message per `acc.metrics.snapshot.<instance>`),
//! drops those older than three intervals (a stopped replica), merges the rest into fleet
//! figures, adds bus figures (streams, durable consumers, agents), and publishes the result on
//! `acc.metrics.fleet`.
//!
//! It holds no state of its own: each round starts from the bus, the agent counts from the
//! replica's view of the agents bucket ([`AgentRecords`]). Several replicas may run; the dedupe
//! id (the interval's number) makes their fleet snapshots of one interval a single message.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv::Store};
use bytes::Bytes;
use chrono::Utc;
use futures::{StreamExt as _, TryStreamExt as _};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::STALE_AFTER_INTERVALS;
use super::snapshot::{
    BusFigures, ConsumerFigures, FleetSnapshot, IngressSnapshot, OfflineAgent, StreamFigures, merge,
};
use crate::bus::unreadable::Unreadable;
use crate::bus::{Publisher, provision, subjects};
use crate::directory::Directory;
use crate::domain::{AgentCounts, AgentRecord, AgentStatus};
use crate::telemetry;

/// Runs the metrics role until `stop`.
pub async fn run(
    publisher: Publisher,
    agents: AgentRecords,
    interval: Duration,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let js = publisher.jetstream().clone();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        match fleet(&js, &agents, interval).await {
            Ok(snapshot) => {
                let slot = Utc::now().timestamp_millis() / interval.as_millis().max(1) as i64;
                let payload = Bytes::from(serde_json::to_vec(&snapshot).context("encoding")?);
                if let Err(err) = publisher
                    .publish(
                        subjects::FLEET_METRICS.to_owned(),
                        &format!("fleet:{slot}"),
                        payload,
                        None,
                    )
                    .instrument(telemetry::routine_span("fleet metrics"))
                    .await
                {
                    tracing::warn!(error = %err, "cannot publish fleet metrics; next interval");
                }
            }
            Err(err) => tracing::warn!(error = ?err, "cannot compute fleet metrics; next interval"),
        }
    }
}

/// One round: the fleet snapshot as of now.
pub async fn fleet(
    js: &jetstream::Context,
    agents: &AgentRecords,
    interval: Duration,
) -> anyhow::Result<FleetSnapshot> {
    let snapshots = replica_snapshots(js, interval * STALE_AFTER_INTERVALS).await?;
    let window_seconds = snapshots
        .iter()
        .map(|s| s.window_seconds)
        .fold(0.0, f64::max);
    Ok(FleetSnapshot {
        generated_at: Utc::now(),
        replicas: snapshots.len(),
        window_seconds,
        endpoints: merge(&snapshots),
        bus: bus_figures(js, agents).await?,
    })
}

/// A replica silent this long is gone for good: its snapshot subject is purged.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// The latest snapshot of every replica that published within `max_age`.
pub async fn replica_snapshots(
    js: &jetstream::Context,
    max_age: Duration,
) -> anyhow::Result<Vec<IngressSnapshot>> {
    let stream = js
        .get_stream(subjects::METRICS_STREAM)
        .await
        .context("opening the metrics stream")?;
    let subjects_seen: Vec<(String, usize)> = stream
        .info_with_subjects(subjects::METRIC_SNAPSHOTS)
        .await
        .context("listing snapshot subjects")?
        .try_collect()
        .await
        .context("listing snapshot subjects")?;
    let mut snapshots = Vec::new();
    for (subject, _) in subjects_seen {
        let Ok(message) = stream.get_last_raw_message_by_subject(&subject).await else {
            continue;
        };
        match serde_json::from_slice::<IngressSnapshot>(&message.payload) {
            Ok(snapshot) => {
                // The server's stamp, not the producer's `taken_at`.
                let age = super::stored_age(&message);
                if age <= max_age {
                    snapshots.push(snapshot);
                } else if age > FORGET_AFTER {
                    // Keeps the subject list (read every interval) to live replicas.
                    if let Err(err) = stream.purge().filter(&subject).await {
                        tracing::debug!(subject, error = %err, "cannot purge a stale snapshot");
                    }
                }
            }
            Err(err) => tracing::warn!(subject, error = %err, "unreadable metrics snapshot"),
        }
    }
    Ok(snapshots)
}

/// Streams, durable consumers and agents.
async fn bus_figures(js: &jetstream::Context, agents: &AgentRecords) -> anyhow::Result<BusFigures> {
    let mut figures = BusFigures::default();
    for name in provision::STREAMS {
        let Ok(mut stream) = js.get_stream(name).await else {
            continue;
        };
        let info = stream.info().await.context("stream info")?;
        figures.streams.insert(
            (*name).to_owned(),
            StreamFigures {
                messages: info.state.messages,
                bytes: info.state.bytes,
                max_bytes: info.config.max_bytes,
            },
        );
        let mut consumers = stream.consumers();
        while let Some(Ok(consumer)) = consumers.next().await {
            // Ordered (ephemeral) consumers come and go; only durable ones are worth a series.
            if consumer.config.durable_name.is_none() {
                continue;
            }
            figures.consumers.push(ConsumerFigures {
                stream: (*name).to_owned(),
                consumer: consumer.name,
                pending: consumer.num_pending,
                ack_pending: consumer.num_ack_pending as u64,
                redelivered: consumer.num_redelivered as u64,
            });
        }
    }
    let (counts, offline) = agent_figures(agents).await?;
    figures.agents = counts;
    figures.offline_agents = offline;
    Ok(figures)
}

/// Agent counts by status, and the offline agents with their last heartbeat.
pub async fn agent_figures(
    agents: &AgentRecords,
) -> anyhow::Result<(AgentCounts, Vec<OfflineAgent>)> {
    let records = agents.read().await?;
    let counts = AgentCounts::tally(&records);
    let offline = records
        .into_iter()
        .filter(|record| record.status == AgentStatus::Offline)
        .map(|record| OfflineAgent {
            agent_id: record.agent_id.to_string(),
            last_seen: record.last_seen,
        })
        .collect();
    Ok((counts, offline))
}

/// Agent records the fleet figures could not read.
static UNREADABLE: Unreadable = Unreadable::new("agent record");

/// Where the metrics and alerting roles read the agent records from: the replica's directory,
/// which follows the bucket, once it has caught up with it; until then the bucket itself, a read
/// per key (a round trip per agent, which every interval would otherwise pay for the whole
/// fleet).
#[derive(Clone)]
pub struct AgentRecords {
    pub directory: Directory,
    pub bucket: Store,
}

impl AgentRecords {
    /// Every agent record, sorted by id.
    pub async fn read(&self) -> anyhow::Result<Vec<AgentRecord>> {
        match self.directory.list_synced() {
            Some(records) => Ok(records),
            None => agent_records(&self.bucket).await,
        }
    }
}

/// Every agent record in the bucket (unreadable ones are skipped, counted and logged once).
pub async fn agent_records(agents: &Store) -> anyhow::Result<Vec<AgentRecord>> {
    let keys: Vec<String> = match agents.keys().await {
        Ok(keys) => keys.try_collect().await.context("listing agents")?,
        Err(err) => return Err(err).context("listing agents"),
    };
    let mut records = Vec::with_capacity(keys.len());
    for key in keys {
        if let Some(value) = agents.get(&key).await.context("reading an agent")? {
            match serde_json::from_slice::<AgentRecord>(&value) {
                Ok(record) => records.push(record),
                Err(err) => UNREADABLE.skip(&key, &err),
            }
        }
    }
    Ok(records)
}
