//! The registry worker: applies registrations and heartbeats to the agents KV bucket, sweeps
//! agents without heartbeats to `offline`, and publishes every status transition on the bus.
//!
//! Applying a message is idempotent and order-tolerant: each record remembers when its status was
//! set (`status_at`) and `last_seen` only moves forward, so a redelivered or late message changes
//! nothing it should not. Writes are compare-and-set on the KV revision, so several registry
//! replicas can share the durable consumer. A status change is first stored in the record as
//! `pending`, then published under a dedupe id derived from its cause, then cleared: it is
//! announced only once it really happened, and a crash in between is finished by the next writer.
//! With coalescing on, the clear is written by the flusher at its next tick, in a batch with the
//! due heartbeats, rather than as a round trip of its own after every announcement.
//!
//! Heartbeats are coalesced per agent: the registry keeps each active agent's record and KV
//! revision as it last wrote or read it, and a heartbeat that changes nothing but `last_seen` is
//! held, not written. The newest one held is written when the agent's window
//! (`heartbeat_coalesce`, counted from this replica's last write of the record) ends, by a
//! flusher that writes the due heartbeats of many agents as atomic batches: one server write (one
//! fsync in `fsync` mode) for up to 1,000 records, each compare-and-set against the revision
//! known here, with no read first. A batch refused because another replica wrote one of its
//! agents is written agent by agent, re-reading whichever record lost. A heartbeat that changes
//! the status is written at once. So an agent costs at most one KV write per window however
//! often it beats, and `last_seen` in the bucket trails the newest heartbeat by at most the
//! window. A held heartbeat is acknowledged when it is held: a registry that crashes loses at
//! most one window of `last_seen` freshness, which the agent's next heartbeat restores; one that
//! stops writes what it holds before it returns.
//!
//! A starting registry learns every stored record and its revision from one watch of the
//! bucket, so the first heartbeat of each agent after a start is held with no read; the stale
//! sweep takes the records the same way, one watch per sweep instead of a read per agent.
//!
//! [`RegistrySettings`] configures it: staleness, sweep interval, coalescing window,
//! pre-registered agents.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::kv::{CreateErrorKind, Operation, Store, UpdateErrorKind};
use async_nats::jetstream::stream::Stream;
use bytes::Bytes;
use chrono::{DateTime, SubsecRound as _, Utc};
use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use self::held::{Due, Held};
use super::{HandleError, Handler, MAX_DELIVER, consume};
use crate::bus::batch::{Record, SERVER_MAX_BATCH, write_records};
use crate::bus::unreadable::Unreadable;
use crate::bus::{Publisher, subjects};
use crate::domain::{
    AgentId, AgentProfile, AgentRecord, AgentStatus, Heartbeat, PendingChange, Registration,
    RegistrationOrigin, StatusChange,
};

/// How the registry judges staleness, and the agents it knows before any registers.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// An agent without a heartbeat for this long is marked offline.
    pub stale_after: Duration,
    /// How often the registry looks for stale agents.
    pub sweep_interval: Duration,
    /// Agents registered from the configuration.
    pub preregistered: BTreeMap<AgentId, AgentProfile>,
    /// Heartbeats of one agent within this window after a write are coalesced into one write;
    /// zero writes every heartbeat.
    pub heartbeat_coalesce: Duration,
}

/// Runs the registry until `stop` fires: consumes registrations and heartbeats, and sweeps.
pub async fn run(
    publisher: Publisher,
    agents_stream: Stream,
    bucket: Store,
    settings: RegistrySettings,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let consumer = durable_consumer(&agents_stream).await?;
    let registry = Registry {
        publisher: publisher.clone(),
        bucket,
        stale_after: settings.stale_after,
        held: Arc::new(Held::new(settings.heartbeat_coalesce, settings.stale_after)),
    };
    registry.learn_stored(LEARN_WITHIN).await;
    let sweeper = {
        let registry = registry.clone();
        let stop = stop.clone();
        let every = settings.sweep_interval;
        tokio::spawn(async move { registry.sweep_forever(every, stop).await })
    };
    let flusher = {
        let registry = registry.clone();
        let stop = stop.clone();
        tokio::spawn(async move { registry.flush_forever(stop).await })
    };
    consume(
        consumer,
        subjects::AGENTS_STREAM,
        subjects::REGISTRY_CONSUMER,
        publisher,
        stop,
        registry.clone(),
    )
    .await;
    let _ = sweeper.await;
    let _ = flusher.await;
    // Every held heartbeat was acknowledged: write them before going away.
    registry.flush(None).await;
    Ok(())
}

/// How long a starting registry spends learning the stored records before it consumes; past
/// it, the agents not learnt yet are read on their first heartbeat, as before.
const LEARN_WITHIN: Duration = Duration::from_secs(10);

/// The registry's durable consumer: the whole agents stream, explicit ack, bounded redelivery.
/// It takes the status changes too (acknowledged untouched) rather than filtering on the two
/// subjects it applies: a consumer with several filter subjects makes the server look for the
/// next message per filter over every agent's subject, which cost more than the registry's own
/// work per heartbeat (docs/BENCHMARKS.md, "Heartbeats per registry replica"). A durable left
/// by an older version with filters is updated in place: the server keeps its position.
/// Retry delays come from the worker's naks; a `backoff` list here would replace `ack_wait`
/// with its first entry and redeliver messages still waiting in the pull buffer.
pub async fn durable_consumer(stream: &Stream) -> anyhow::Result<PullConsumer> {
    stream
        .create_consumer(pull::Config {
            durable_name: Some(subjects::REGISTRY_CONSUMER.to_owned()),
            description: Some("applies registrations and heartbeats to the agents KV".into()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(10),
            max_deliver: MAX_DELIVER,
            max_ack_pending: 1_000,
            ..Default::default()
        })
        .await
        .context("creating the registry consumer")
}

/// Publishes a registration for each agent in `REGISTERED_AGENTS` whose configured profile the
/// bucket does not already hold. Runs before any role serves, in every process, so a configured
/// agent's first heartbeat is never refused; the dedupe id makes the replicas' copies one.
pub async fn preregister(
    publisher: &Publisher,
    bucket: &Store,
    agents: &BTreeMap<AgentId, AgentProfile>,
) -> anyhow::Result<()> {
    for (agent, profile) in agents {
        let current = bucket
            .get(agent.as_str())
            .await
            .with_context(|| format!("reading agent {agent}"))?
            .and_then(|value| serde_json::from_slice::<AgentRecord>(&value).ok());
        if current.is_some_and(|record| &record.profile == profile) {
            continue;
        }
        let registration = Registration {
            agent_id: agent.clone(),
            profile: profile.clone(),
            origin: RegistrationOrigin::Config,
            received_at: Utc::now().trunc_subsecs(3),
        };
        let digest = Sha256::digest(serde_json::to_vec(profile).expect("profiles serialize"));
        let payload = Bytes::from(serde_json::to_vec(&registration).expect("serializes"));
        publisher
            .publish(
                subjects::registration(agent),
                &format!("prereg:{agent}:{}", hex::encode(&digest[..16])),
                payload,
                None,
            )
            .await
            .with_context(|| format!("pre-registering agent {agent}"))?;
        tracing::info!(agent_id = %agent, "pre-registered agent from REGISTERED_AGENTS");
    }
    Ok(())
}

mod held;

#[derive(Clone)]
struct Registry {
    publisher: Publisher,
    bucket: Store,
    stale_after: Duration,
    held: Arc<Held>,
}

/// A record and the transition that produced it, if any.
type Outcome = (AgentRecord, Option<(Option<AgentStatus>, &'static str)>);

impl Handler for Registry {
    async fn handle(&self, message: &Message) -> Result<(), HandleError> {
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let subject = message.subject.as_str();
        if subjects::matches(subjects::REGISTRATIONS, subject) {
            let registration: Registration = parse(&message.payload)?;
            let agent = registration.agent_id.clone();
            let known = self.held.knows(&agent);
            if let Some(held) = self.held.forget(&agent) {
                self.write_heartbeat(&held, &held_id(&held)).await?;
            }
            // An agent this replica does not know is, in the common case, new (the records
            // stored at start were learnt, and every record written here is known until it has
            // been idle for the stale threshold): its record is written with no read first, on
            // the condition that the key holds nothing; a refusal (the record exists after all:
            // written by another replica, forgotten here, or not learnt) is followed by a read,
            // as any lost race, which costs one round trip more than reading first would.
            let unknown = if known || self.held.window.is_zero() {
                Unknown::Read
            } else {
                Unknown::Create
            };
            self.apply(
                &agent,
                &format!("status:{agent}:{seq}"),
                unknown,
                |current| Ok(on_registration(current, &registration)),
            )
            .await
            .map(drop)
        } else if subjects::matches(subjects::HEARTBEATS, subject) {
            let heartbeat: Heartbeat = parse(&message.payload)?;
            let agent = &heartbeat.agent_id;
            if self.held.hold(&heartbeat, Instant::now()) {
                return Ok(());
            }
            if !self.held.window.is_zero() && !self.held.knows(agent) {
                // Read the record once (an agent not registered yet is retried), then hold.
                if let Some(Loaded {
                    record: Some(record),
                    revision: Some(revision),
                }) = self.load_settled(agent).await?
                {
                    self.held.known_at(&record, revision, false, Instant::now());
                    if self.held.hold(&heartbeat, Instant::now()) {
                        return Ok(());
                    }
                }
            }
            self.write_heartbeat(&heartbeat, &format!("status:{agent}:{seq}"))
                .await
        } else if subjects::matches(subjects::STATUS_CHANGES, subject) {
            Ok(()) // the registry's own announcements: nothing to apply
        } else {
            Err(HandleError::permanent_by(
                "registry does not handle this subject",
                subject.to_owned(),
            ))
        }
    }
}

/// What the first attempt of [`Registry::apply`] assumes of an agent this replica knows no
/// record of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unknown {
    /// Nothing: read the record.
    Read,
    /// That it has none: write it on that condition, and read it only if the bucket refuses.
    Create,
}

/// A record as read from the bucket, with the revision to compare-and-set against.
struct Loaded {
    record: Option<AgentRecord>,
    revision: Option<u64>,
}

impl Registry {
    /// Learns every stored record and its revision from one watch of the bucket (its latest
    /// value per key), so that an agent's first heartbeat after a start is held against it with
    /// no read. Records with a change still to announce are left to the first message about
    /// the agent, which finishes it; unreadable ones are skipped and counted. Gives up quietly
    /// after `within` (the rest are read on demand) or when the bucket cannot be watched.
    async fn learn_stored(&self, within: Duration) {
        if self.held.window.is_zero() {
            return;
        }
        match tokio::time::timeout(within, self.stored_records()).await {
            Ok(Ok(stored)) => {
                let now = Instant::now();
                let mut learnt = 0_usize;
                for (record, revision) in stored {
                    if record.pending.is_none() {
                        self.held.known_at(&record, revision, false, now);
                        learnt += 1;
                    }
                }
                tracing::info!(records = learnt, "registry learnt the stored agent records");
            }
            Ok(Err(err)) => tracing::warn!(
                error = %crate::telemetry::error_chain(&err),
                "cannot learn the stored agent records; reading each on its first heartbeat"
            ),
            Err(_) => tracing::warn!(
                within = ?within,
                "learning the stored agent records took too long; reading the rest on demand"
            ),
        }
    }

    /// Every readable agent record in the bucket with its revision, from one watch of the
    /// latest value per key (one request, not a read per key). Unreadable records are skipped
    /// and counted; deleted keys are left out.
    async fn stored_records(&self) -> Result<Vec<(AgentRecord, u64)>, HandleError> {
        // `Store::status` answers from the info cached when the bucket was opened: ask afresh.
        let stored = self
            .bucket
            .stream
            .clone()
            .info()
            .await
            .map_err(|e| HandleError::transient_by("reading the agents bucket's state", e))?
            .state
            .messages;
        let mut records = Vec::new();
        if stored == 0 {
            return Ok(records); // a watch of an empty bucket would only wait
        }
        let mut watch = self
            .bucket
            .watch_with_history(">")
            .await
            .map_err(|e| HandleError::transient_by("watching the agents bucket", e))?;
        while let Some(entry) = watch.next().await {
            let entry =
                entry.map_err(|e| HandleError::transient_by("reading the agents watch", e))?;
            if entry.operation == Operation::Put {
                match serde_json::from_slice::<AgentRecord>(&entry.value) {
                    Ok(record) if record.agent_id.as_str() == entry.key => {
                        records.push((record, entry.revision));
                    }
                    Ok(_) => UNREADABLE.skip(
                        &entry.key,
                        &std::io::Error::other("the record names another agent"),
                    ),
                    Err(err) => UNREADABLE.skip(&entry.key, &err),
                }
            }
            if entry.delta == 0 {
                break;
            }
        }
        Ok(records)
    }

    /// Applies `heartbeat` to the agent's record at once.
    async fn write_heartbeat(
        &self,
        heartbeat: &Heartbeat,
        transition_id: &str,
    ) -> Result<(), HandleError> {
        self.apply(
            &heartbeat.agent_id,
            transition_id,
            Unknown::Read,
            |current| on_heartbeat(current, heartbeat),
        )
        .await
    }

    /// Writes held heartbeats whose window has ended, until `stop` fires. While none is held
    /// it sleeps until one is, rather than ticking.
    async fn flush_forever(&self, stop: CancellationToken) {
        if self.held.window.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(self.held.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.flush(Some(Instant::now())).await;
            if !self.held.holds_any() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = self.held.held() => {}
                }
                tick.reset();
            }
        }
    }

    /// Writes the held heartbeats that are due (all of them with `None`). Those that leave the
    /// status as it is go out as atomic batches, many agents' records per server write (one
    /// fsync in `fsync` mode), each record compare-and-set against the revision known here. A
    /// batch the server refuses (another replica wrote one of its agents, or the bucket takes no
    /// batches) is written agent by agent, each read afresh. One that cannot be written now is
    /// held again for the next tick.
    async fn flush(&self, now: Option<Instant>) {
        let mut one_by_one = Vec::new();
        let mut clears = Vec::new();
        let mut batch = Vec::new();
        for due in self.held.due(now) {
            let Some(heartbeat) = &due.heartbeat else {
                let next = due.record.clone();
                batch.push((due, next));
                continue;
            };
            match on_heartbeat(Some(&due.record), heartbeat) {
                Ok((next, None)) if next == due.record && !due.clear => {}
                Ok((next, None)) => batch.push((due, next)),
                // A status change is written with its own announcement, from the cleared copy.
                _ => one_by_one.push(heartbeat.clone()),
            }
        }
        for chunk in batch.chunks(SERVER_MAX_BATCH) {
            if let Err(err) = self.write_batch(chunk).await {
                tracing::debug!(
                    error = %crate::telemetry::error_chain(&err),
                    records = chunk.len(),
                    "batch of heartbeats not written; writing them one by one"
                );
                for (due, _) in chunk {
                    match &due.heartbeat {
                        Some(heartbeat) => one_by_one.push(heartbeat.clone()),
                        None => clears.push(due.clone()),
                    }
                }
            }
        }
        futures::stream::iter(clears)
            .for_each_concurrent(FLUSH_CONCURRENCY, |due| async move {
                self.write_clear(&due, now.is_some()).await;
            })
            .await;
        futures::stream::iter(one_by_one)
            .for_each_concurrent(FLUSH_CONCURRENCY, |heartbeat| async move {
                // A revision known here that lost is read afresh after one failed compare.
                if let Err(err) = self.write_heartbeat(&heartbeat, &held_id(&heartbeat)).await {
                    tracing::warn!(
                        agent_id = %heartbeat.agent_id,
                        error = %crate::telemetry::error_chain(&err),
                        "writing a coalesced heartbeat failed; will retry"
                    );
                    if now.is_some() {
                        self.held.hold_again(heartbeat);
                    }
                }
            })
            .await;
    }

    /// Writes the cleared copy of a record whose announced change is still marked in the bucket,
    /// on its own. Lost to another writer, it is left to that writer (which settles a marked
    /// record before changing it) and forgotten here; a failure is retried at the next tick
    /// (`again`).
    async fn write_clear(&self, due: &Due, again: bool) {
        let agent = &due.record.agent_id;
        match self.store(agent, &due.record, Some(due.revision)).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                if let Some(held) = self.held.forget_unless_newer(agent, due.revision)
                    && let Err(err) = self.write_heartbeat(&held, &held_id(&held)).await
                {
                    // Acknowledged already: its agent's next heartbeat restores `last_seen`.
                    tracing::warn!(
                        agent_id = %agent,
                        error = %crate::telemetry::error_chain(&err),
                        "writing a coalesced heartbeat failed"
                    );
                }
            }
            Err(err) => {
                tracing::warn!(
                    agent_id = %agent,
                    error = %crate::telemetry::error_chain(&err),
                    "clearing an announced status change failed; will retry"
                );
                if again {
                    self.held.clear_again(agent, due.revision);
                }
            }
        }
    }

    /// Stores the records of `batch` as one atomic batch: all, each at the revision after the
    /// one it was computed from, or none.
    async fn write_batch(&self, batch: &[(Due, AgentRecord)]) -> Result<(), HandleError> {
        let records: Vec<Record> = batch
            .iter()
            .map(|(due, next)| Record {
                key: next.agent_id.as_str().to_owned(),
                value: Bytes::from(serde_json::to_vec(next).expect("records serialize")),
                revision: Some(due.revision),
            })
            .collect();
        let client = self.publisher.client();
        let revisions = write_records(client, &self.bucket, &records, self.publisher.timeout())
            .await
            .map_err(|e| HandleError::transient_by("writing a batch of records", e))?;
        let now = Instant::now();
        for ((_, next), revision) in batch.iter().zip(revisions) {
            self.held.known_at(next, revision, true, now);
        }
        Ok(())
    }

    /// Compute, compare-and-set, then announce; retried when another writer wins. The first
    /// attempt uses the record known here, if any, with no read (for an agent not known here,
    /// as `unknown` says); the others read it afresh.
    async fn apply<F>(
        &self,
        agent: &AgentId,
        transition_id: &str,
        unknown: Unknown,
        compute: F,
    ) -> Result<(), HandleError>
    where
        F: Fn(Option<&AgentRecord>) -> Result<Outcome, HandleError> + Send + Sync,
    {
        let mut known = match self.held.known(agent) {
            Some((record, revision)) => Some(Loaded {
                record: Some(record),
                revision: Some(revision),
            }),
            // Revision 0: written only if the key holds nothing at all, refused (with no read
            // by the client, unlike `create`) when it holds a record or a delete marker.
            None if unknown == Unknown::Create => Some(Loaded {
                record: None,
                revision: Some(0),
            }),
            None => None,
        };
        for _ in 0..10 {
            let loaded = match known.take() {
                Some(loaded) => loaded,
                None => match self.load_settled(agent).await? {
                    Some(loaded) => loaded,
                    None => continue,
                },
            };
            let (mut next, transition) = compute(loaded.record.as_ref())?;
            if loaded.record.as_ref() == Some(&next) {
                return Ok(());
            }
            if let Some((from, reason)) = transition {
                next.pending = Some(pending_change(&next, from, reason, transition_id));
            }
            if let Some(revision) = self.store(agent, &next, loaded.revision).await? {
                if next.pending.is_some() {
                    self.announce(agent, next, revision).await?;
                }
                return Ok(());
            }
        }
        Err(HandleError::transient(
            "lost the compare-and-set race 10 times",
        ))
    }

    async fn load(&self, agent: &AgentId) -> Result<Loaded, HandleError> {
        let entry = self
            .bucket
            .entry(agent.as_str())
            .await
            .map_err(|e| HandleError::transient_by("reading agent record", e))?;
        match entry {
            Some(entry) if entry.operation == Operation::Put => {
                let record = serde_json::from_slice(&entry.value)
                    .map_err(|e| HandleError::permanent_by("stored agent record unreadable", e))?;
                Ok(Loaded {
                    record: Some(record),
                    revision: Some(entry.revision),
                })
            }
            Some(entry) => Ok(Loaded {
                record: None,
                revision: Some(entry.revision),
            }),
            None => Ok(Loaded {
                record: None,
                revision: None,
            }),
        }
    }

    /// Loads the record and first finishes any change a previous writer stored but may not have
    /// published. `None` means another writer changed the record meanwhile: load again.
    async fn load_settled(&self, agent: &AgentId) -> Result<Option<Loaded>, HandleError> {
        let loaded = self.load(agent).await?;
        match (loaded.record, loaded.revision) {
            (Some(record), Some(revision)) if record.pending.is_some() => Ok(self
                .announce(agent, record, revision)
                .await?
                .map(|(record, revision)| Loaded {
                    record: Some(record),
                    revision: Some(revision),
                })),
            (record, revision) => Ok(Some(Loaded { record, revision })),
        }
    }

    /// Writes `record` if the key is still at `revision`; returns the new revision, or `None`
    /// when someone else wrote first.
    async fn store(
        &self,
        agent: &AgentId,
        record: &AgentRecord,
        revision: Option<u64>,
    ) -> Result<Option<u64>, HandleError> {
        let value = Bytes::from(serde_json::to_vec(record).expect("records serialize"));
        let stored = match revision {
            Some(revision) => match self.bucket.update(agent.as_str(), value, revision).await {
                Ok(revision) => Some(revision),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => None,
                Err(e) => return Err(HandleError::transient_by("writing agent record", e)),
            },
            None => match self.bucket.create(agent.as_str(), value).await {
                Ok(revision) => Some(revision),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => None,
                Err(e) => return Err(HandleError::transient_by("writing agent record", e)),
            },
        };
        // A record with a change still to announce is cleared by a write right after this one.
        if let Some(revision) = stored
            && record.pending.is_none()
        {
            self.held.known_at(record, revision, true, Instant::now());
        }
        Ok(stored)
    }

    /// Publishes the record's pending change under its dedupe id, then clears it: with
    /// coalescing on, by handing the cleared copy to the flusher ([`Held::clear_later`]), which
    /// writes it at its next tick; otherwise at once. Returns the cleared record and the revision
    /// to write over (still the marked one when the clear is left to the flusher), or `None` if
    /// another writer got there first.
    async fn announce(
        &self,
        agent: &AgentId,
        mut record: AgentRecord,
        revision: u64,
    ) -> Result<Option<(AgentRecord, u64)>, HandleError> {
        let Some(pending) = record.pending.take() else {
            return Ok(Some((record, revision)));
        };
        let payload = Bytes::from(serde_json::to_vec(&pending.change).expect("serializes"));
        self.publisher
            .publish(subjects::status_change(agent), &pending.id, payload, None)
            .await
            .map_err(|e| HandleError::transient_by("publishing status change", e))?;
        tracing::info!(
            agent_id = %agent,
            from = ?pending.change.from,
            to = ?pending.change.to,
            reason = %pending.change.reason,
            "agent status changed"
        );
        if !self.held.window.is_zero() {
            self.held.clear_later(&record, revision, Instant::now());
            return Ok(Some((record, revision)));
        }
        Ok(self
            .store(agent, &record, Some(revision))
            .await?
            .map(|revision| (record, revision)))
    }

    async fn sweep_forever(&self, every: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(err) = self.sweep(Utc::now()).await {
                tracing::warn!(error = %err, "stale-agent sweep failed; will retry");
            }
        }
    }

    /// Marks every agent whose last heartbeat is older than the threshold as offline. A record
    /// that cannot be read (or written) is skipped, counted and logged once: one bad record never
    /// stops the sweep for the other agents.
    async fn sweep(&self, now: DateTime<Utc>) -> anyhow::Result<()> {
        let stale_after = chrono::Duration::from_std(self.stale_after)?;
        for (record, revision) in self.stored_records().await? {
            let agent = record.agent_id.clone();
            match self.sweep_one(record, revision, now, stale_after).await {
                Ok(()) => {}
                Err(err @ HandleError::Permanent { .. }) => UNREADABLE.skip(agent.as_str(), &err),
                Err(err) => tracing::warn!(
                    agent_id = %agent,
                    error = %crate::telemetry::error_chain(&err),
                    "stale-agent sweep skipped an agent; will retry next sweep"
                ),
            }
        }
        Ok(())
    }

    /// Marks the agent of `record` (stored at `revision`) offline when its last heartbeat is
    /// older than `stale_after`. A record with a change still to announce is read again and
    /// finished first.
    async fn sweep_one(
        &self,
        record: AgentRecord,
        revision: u64,
        now: DateTime<Utc>,
        stale_after: chrono::Duration,
    ) -> Result<(), HandleError> {
        let agent = &record.agent_id.clone();
        let (record, revision) = if record.pending.is_some() {
            let Some(Loaded {
                record: Some(record),
                revision,
            }) = self.load_settled(agent).await?
            else {
                return Ok(());
            };
            (record, revision)
        } else {
            (record, Some(revision))
        };
        if record.status == AgentStatus::Offline || now - record.last_seen <= stale_after {
            return Ok(());
        }
        // A heartbeat held here is newer than the stored last_seen: the agent is not stale.
        if let Some(held) = self.held.forget(agent) {
            return self.write_heartbeat(&held, &held_id(&held)).await;
        }
        let mut next = AgentRecord {
            status: AgentStatus::Offline,
            // The decision rests on `last_seen`: any heartbeat received after it wins.
            status_at: record.last_seen,
            ..record.clone()
        };
        let id = format!(
            "status:{agent}:offline:{}",
            record.last_seen.timestamp_millis()
        );
        next.pending = Some(pending_change(&next, Some(record.status), "stale", &id));
        // A lost race means a heartbeat just arrived: the agent is not stale after all.
        if let Some(revision) = self.store(agent, &next, revision).await? {
            self.announce(agent, next, revision).await?;
        }
        Ok(())
    }
}

/// The dedupe id of a status change caused by a held heartbeat, which has no stream sequence of
/// its own any more: its receive time tells it apart from the agent's other heartbeats.
fn held_id(heartbeat: &Heartbeat) -> String {
    format!(
        "status:{}:held:{}",
        heartbeat.agent_id,
        heartbeat.received_at.timestamp_micros()
    )
}

/// Coalesced heartbeats the flusher writes at once when it writes them one by one.
const FLUSH_CONCURRENCY: usize = 32;

/// Agent records the registry could not read, over every sweep.
static UNREADABLE: Unreadable = Unreadable::new("agent record");

fn pending_change(
    record: &AgentRecord,
    from: Option<AgentStatus>,
    reason: &str,
    id: &str,
) -> PendingChange {
    PendingChange {
        id: id.to_owned(),
        change: StatusChange {
            agent_id: record.agent_id.clone(),
            from,
            to: record.status,
            at: record.status_at,
            reason: reason.to_owned(),
        },
    }
}

fn parse<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, HandleError> {
    serde_json::from_slice(payload).map_err(|e| HandleError::permanent_by("unreadable payload", e))
}

fn on_registration(current: Option<&AgentRecord>, registration: &Registration) -> Outcome {
    let at = registration.received_at;
    let Some(current) = current else {
        let (status, reason) = match registration.origin {
            RegistrationOrigin::Agent => (AgentStatus::Online, "registered"),
            RegistrationOrigin::Config => (AgentStatus::Offline, "pre-registered"),
        };
        let record = AgentRecord {
            agent_id: registration.agent_id.clone(),
            profile: registration.profile.clone(),
            registered_at: at,
            last_seen: at,
            status,
            status_at: at,
            pending: None,
        };
        return (record, Some((None, reason)));
    };
    let mut next = current.clone();
    match registration.origin {
        // Configuration describes an agent; it says nothing about whether it is up.
        RegistrationOrigin::Config => next.profile = registration.profile.clone(),
        RegistrationOrigin::Agent => {
            if at >= current.registered_at {
                next.profile = registration.profile.clone();
                next.registered_at = at;
            }
            next.last_seen = next.last_seen.max(at);
            if at >= current.status_at {
                next.status = AgentStatus::Online;
                next.status_at = at;
            }
        }
    }
    let transition =
        (next.status != current.status).then_some((Some(current.status), "registered"));
    (next, transition)
}

fn on_heartbeat(
    current: Option<&AgentRecord>,
    heartbeat: &Heartbeat,
) -> Result<Outcome, HandleError> {
    let Some(current) = current else {
        // The ingress saw the registration in the stream; this worker has not applied it yet.
        return Err(HandleError::transient(format!(
            "agent {} not in the registry yet",
            heartbeat.agent_id
        )));
    };
    let at = heartbeat.received_at;
    let mut next = current.clone();
    next.last_seen = next.last_seen.max(at);
    if at >= current.status_at {
        next.status = heartbeat.status.into();
        next.status_at = at;
    }
    let transition = (next.status != current.status).then_some((Some(current.status), "heartbeat"));
    Ok((next, transition))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AgentProfile, ReportedStatus};

    /// Agent `a`'s profile, for the registry's unit tests.
    pub(super) fn profile() -> AgentProfile {
        AgentProfile {
            name: "A".into(),
            base_url: "https://a.example".into(),
            capabilities: vec![],
            max_concurrent_tasks: 1,
            dispatch: crate::domain::Dispatch::Pull,
            push_over: None,
        }
    }

    fn registration(at: i64) -> Registration {
        Registration {
            agent_id: AgentId::parse("a").unwrap(),
            profile: profile(),
            origin: RegistrationOrigin::Agent,
            received_at: DateTime::from_timestamp(at, 0).unwrap(),
        }
    }

    fn heartbeat(at: i64, status: ReportedStatus) -> Heartbeat {
        Heartbeat {
            agent_id: AgentId::parse("a").unwrap(),
            status,
            details: None,
            received_at: DateTime::from_timestamp(at, 0).unwrap(),
        }
    }

    #[test]
    fn applying_a_message_twice_changes_nothing_the_second_time() {
        let (first, t) = on_registration(None, &registration(10));
        assert_eq!(t, Some((None, "registered")));
        let (again, t) = on_registration(Some(&first), &registration(10));
        assert_eq!(again, first);
        assert_eq!(t, None);
        let (beat, _) =
            on_heartbeat(Some(&first), &heartbeat(20, ReportedStatus::Degraded)).unwrap();
        let (beat_again, t) =
            on_heartbeat(Some(&beat), &heartbeat(20, ReportedStatus::Degraded)).unwrap();
        assert_eq!(beat_again, beat);
        assert_eq!(t, None);
    }

    #[test]
    fn a_late_heartbeat_neither_rewinds_last_seen_nor_overrides_a_newer_status() {
        let (record, _) = on_registration(None, &registration(10));
        let (degraded, t) =
            on_heartbeat(Some(&record), &heartbeat(30, ReportedStatus::Degraded)).unwrap();
        assert_eq!(t, Some((Some(AgentStatus::Online), "heartbeat")));
        let (late, t) =
            on_heartbeat(Some(&degraded), &heartbeat(20, ReportedStatus::Online)).unwrap();
        assert_eq!(late.status, AgentStatus::Degraded);
        assert_eq!(late.last_seen, degraded.last_seen);
        assert_eq!(t, None);
    }

    #[test]
    fn a_heartbeat_before_its_registration_is_retried() {
        assert!(matches!(
            on_heartbeat(None, &heartbeat(1, ReportedStatus::Online)),
            Err(HandleError::Transient { .. })
        ));
    }
}
