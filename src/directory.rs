//! The replica's read model of the agents KV bucket: a watcher keeps an in-memory copy that
//! `GET /orchestrator/agents`, `/health`, the heartbeat existence check, the dispatcher and the
//! metrics and alerting roles' fleet figures read without a round trip. The registry worker is
//! the only writer of the bucket; this side only reads.
//!
//! The copy trails the bucket by the time a KV update takes to arrive (milliseconds). Where that
//! matters — a heartbeat right after its registration — [`Directory::is_known`] falls back to the
//! registration stream, which already holds every acknowledged registration.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::kv::{Operation, Store};
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::bus::subjects;
use crate::bus::unreadable::Unreadable;
use crate::domain::{AgentCounts, AgentId, AgentRecord};

/// Agent records the directory's watch could not read.
static UNREADABLE: Unreadable = Unreadable::new("agent record");

/// The existence check could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The registration stream did not answer within the lookup timeout.
    #[error("agent lookup timed out")]
    TimedOut,
    /// The registration stream answered with an error.
    #[error("agent lookup failed")]
    Failed(#[source] async_nats::jetstream::stream::LastRawMessageError),
}

#[derive(Clone)]
pub struct Directory {
    agents: Arc<RwLock<HashMap<AgentId, AgentRecord>>>,
    /// Set while the view follows the bucket and has caught up with it (every stored record
    /// read, or the bucket found empty); cleared when its watch ends, until the next one has
    /// caught up.
    synced: Arc<AtomicBool>,
    registrations: Stream,
    lookup_timeout: Duration,
}

impl Directory {
    pub fn new(registrations: Stream, lookup_timeout: Duration) -> Self {
        Self {
            agents: Arc::default(),
            synced: Arc::default(),
            registrations,
            lookup_timeout,
        }
    }

    /// Every agent, sorted by id.
    pub fn list(&self) -> Vec<AgentRecord> {
        let agents = self.agents.read().expect("not poisoned");
        let mut list: Vec<_> = agents.values().cloned().collect();
        list.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        list
    }

    /// Every agent, sorted by id, while the view follows the bucket and has caught up with it;
    /// `None` otherwise, when an empty or stale view would misreport the fleet (the metrics and
    /// alerting roles then read the bucket themselves).
    pub fn list_synced(&self) -> Option<Vec<AgentRecord>> {
        self.synced.load(Ordering::Acquire).then(|| self.list())
    }

    /// One agent's record, as the view holds it.
    pub fn get(&self, agent: &AgentId) -> Option<AgentRecord> {
        self.agents
            .read()
            .expect("not poisoned")
            .get(agent)
            .cloned()
    }

    /// True when some agent in the view satisfies `predicate` (the dispatcher asks whether an
    /// online agent can take a capability).
    pub fn any(&self, predicate: impl Fn(&AgentRecord) -> bool) -> bool {
        self.agents
            .read()
            .expect("not poisoned")
            .values()
            .any(predicate)
    }

    /// Agent counts by status, for `/health`.
    pub fn counts(&self) -> AgentCounts {
        AgentCounts::tally(self.agents.read().expect("not poisoned").values())
    }

    /// True when the agent is registered: in the view, or (read-your-writes) with a stored
    /// registration the view has not caught up with yet.
    pub async fn is_known(&self, agent: &AgentId) -> Result<bool, LookupError> {
        if self
            .agents
            .read()
            .expect("not poisoned")
            .contains_key(agent)
        {
            return Ok(true);
        }
        let subject = subjects::registration(agent);
        let lookup = self.registrations.get_last_raw_message_by_subject(&subject);
        match tokio::time::timeout(self.lookup_timeout, lookup).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(err)) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Ok(Err(err)) => Err(LookupError::Failed(err)),
            Err(_) => Err(LookupError::TimedOut),
        }
    }

    /// Follows the bucket until `stop` fires, re-watching from scratch after any interruption,
    /// including a reconnection of `client` (the watch would otherwise notice only after its
    /// idle heartbeats went missing, seconds later).
    pub async fn follow(self, bucket: Store, client: Client, stop: CancellationToken) {
        let statistics = client.statistics();
        loop {
            // Counted before the watch is made: a reconnection from here on ends this watch.
            let connects = statistics.connects.load(Ordering::Relaxed);
            let watch = tokio::select! {
                () = stop.cancelled() => return,
                watch = bucket.watch_with_history(">") => watch,
            };
            match watch {
                Ok(mut entries) => {
                    let mut fresh: Option<HashMap<AgentId, AgentRecord>> = Some(HashMap::new());
                    // A watch of an empty bucket delivers nothing until the first write: it is
                    // caught up at once. Asked after the watch exists, so a write in between
                    // arrives through it.
                    let mut stream = bucket.stream.clone();
                    let empty = tokio::select! {
                        () = stop.cancelled() => return,
                        info = stream.info() => info.is_ok_and(|info| info.state.messages == 0),
                    };
                    if empty {
                        fresh = None;
                        self.agents.write().expect("not poisoned").clear();
                        self.synced.store(true, Ordering::Release);
                    }
                    let reconnected = crate::bus::reconnected(&client, connects);
                    tokio::pin!(reconnected);
                    loop {
                        let next = tokio::select! {
                            () = stop.cancelled() => return,
                            next = entries.next() => next,
                            () = &mut reconnected => break,
                        };
                        let entry = match next {
                            Some(Ok(entry)) => entry,
                            Some(Err(err)) => {
                                tracing::warn!(error = %err, "agents watch interrupted");
                                break;
                            }
                            None => break,
                        };
                        // While replaying history, build a fresh map so deleted agents vanish.
                        let mut live = self.agents.write().expect("not poisoned");
                        let target = fresh.as_mut().unwrap_or(&mut live);
                        // A key that names no agent is skipped, but may still end the replay.
                        if let Ok(agent) = AgentId::parse(&entry.key) {
                            match entry.operation {
                                Operation::Put => match serde_json::from_slice(&entry.value) {
                                    Ok(record) => {
                                        target.insert(agent, record);
                                    }
                                    Err(err) => UNREADABLE.skip(&entry.key, &err),
                                },
                                Operation::Delete | Operation::Purge => {
                                    target.remove(&agent);
                                }
                            }
                        }
                        if entry.delta == 0 {
                            if let Some(map) = fresh.take() {
                                *live = map;
                                self.synced.store(true, Ordering::Release);
                            }
                        }
                    }
                }
                Err(err) => tracing::warn!(error = %err, "cannot watch the agents bucket"),
            }
            // No longer following: the doors go on serving the last view (and `is_known` falls
            // back to the stream), but the fleet figures read the bucket until the next watch
            // has caught up, so a view that stopped following is never reported as the fleet.
            self.synced.store(false, Ordering::Release);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}
