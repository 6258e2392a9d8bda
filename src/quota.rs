//! The store quota: what each agent may store on the bus, in bytes (`AGENT_STORE_QUOTA`) and in
//! messages (`AGENT_STORE_MESSAGES`), held across every replica of the bridge.
//!
//! Each agent has two token buckets, full at first and refilled at their size per `period` (the
//! streams' max age), so over any period an agent stores at most twice its quota and one agent
//! never fills a stream. The buckets live on the bus, one key per agent in `acc_limits`
//! ([`subjects::store_quota_key`]), so N replicas do not give an agent N shares: an agent
//! alternating between replicas draws from one pool.
//!
//! Cheap on the hot path: a replica does not write the pool for every message. It reserves a
//! share of the agent's pool at a time (a 16th of each bucket, or what the message needs, or
//! what is left: never more than is there) with one compare-and-set on the key's revision, and
//! charges messages to that reservation in memory until it runs out. So an agent storing small
//! messages costs one bus round trip per 16th of its quota; a reservation is never given back
//! (what one replica holds unspent is not available at another until the pool refills), so the
//! agent is held to at most its quota across replicas, never more. Within a process, one agent's
//! draws are made one at a time, so a burst of concurrent requests makes one draw, not many. A
//! replica's first draw for an agent writes the key with no read first, on the condition that it
//! holds nothing yet (a new agent has none); when it exists, the refused write is followed by a
//! read.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

// aHash with keys drawn per process, as in `contract::bucket`.
use ahash::RandomState;
use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use serde::{Deserialize, Serialize};

use crate::bus::subjects;
use crate::contract::bucket::retry_after_secs;
use crate::contract::{Code, Refusal};
use crate::domain::AgentId;

/// A replica reserves at most this fraction of a pool at a time.
const SHARE: f64 = 1.0 / 16.0;
/// Compare-and-set attempts before a draw gives up (503): only replicas racing for one agent
/// conflict.
const MAX_ATTEMPTS: usize = 16;
const SHARDS: usize = 16;

/// What an agent's pool holds, as stored in its key.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Level {
    bytes: f64,
    messages: f64,
    /// When the levels were counted (Unix milliseconds): they refill from then.
    at_ms: i64,
}

/// What this replica reserved for one agent and has not spent yet.
#[derive(Debug, Default, Clone, Copy)]
struct Reserve {
    bytes: u64,
    messages: u64,
}

/// The per-agent store quota, shared by both doors and by every replica.
pub struct StoreQuota {
    store: kv::Store,
    bytes: f64,
    messages: f64,
    period: Duration,
    /// Bound on each read and write of the pool.
    timeout: Duration,
    reserves: Mutex<HashMap<String, Reserve, RandomState>>,
    /// One draw at a time per shard of agents.
    draws: Box<[tokio::sync::Mutex<()>]>,
    hasher: RandomState,
}

impl StoreQuota {
    /// `bytes` and `messages` per agent per `period`, kept in `store` (the `acc_limits` bucket).
    pub fn new(
        store: kv::Store,
        bytes: u64,
        messages: u64,
        period: Duration,
        timeout: Duration,
    ) -> Self {
        Self {
            store,
            bytes: bytes as f64,
            messages: messages.max(1) as f64,
            period: period.max(Duration::from_secs(1)),
            timeout,
            reserves: Mutex::default(),
            draws: (0..SHARDS).map(|_| tokio::sync::Mutex::new(())).collect(),
            hasher: RandomState::new(),
        }
    }

    /// Charges one message of `size` bytes to `agent`, or refuses with 429 `QUOTA_EXCEEDED` and
    /// when to retry (503 `BUS_UNAVAILABLE` when the pool cannot be read or written).
    pub async fn charge(&self, agent: &AgentId, size: usize) -> Result<(), Refusal> {
        let size = size as u64;
        if size as f64 > self.bytes {
            return Err(exceeded(self.period));
        }
        if self.spend(agent, size) {
            return Ok(());
        }
        let shard = self.hasher.hash_one(agent.as_str()) as usize % SHARDS;
        let _drawing = self.draws[shard].lock().await;
        // Another request of this agent may have drawn meanwhile.
        if self.spend(agent, size) {
            return Ok(());
        }
        // Boxed: the draw's reads and writes make a large future, and inline it would be moved
        // with every request's, though nearly all are spent from the reservation above.
        let (bytes, messages) = Box::pin(self.draw(agent, size)).await?;
        let mut reserves = self.reserves.lock().unwrap_or_else(|p| p.into_inner());
        let reserve = reserves.entry(agent.as_str().to_owned()).or_default();
        reserve.bytes += bytes - size;
        reserve.messages += messages - 1;
        Ok(())
    }

    /// Spends one message of `size` from this replica's reservation, if it holds enough.
    fn spend(&self, agent: &AgentId, size: u64) -> bool {
        let mut reserves = self.reserves.lock().unwrap_or_else(|p| p.into_inner());
        match reserves.get_mut(agent.as_str()) {
            Some(reserve) if reserve.bytes >= size && reserve.messages >= 1 => {
                reserve.bytes -= size;
                reserve.messages -= 1;
                true
            }
            _ => false,
        }
    }

    /// Reserves at least `size` bytes and one message from `agent`'s pool on the bus (up to a
    /// share of each), or refuses when the pool holds less.
    async fn draw(&self, agent: &AgentId, size: u64) -> Result<(u64, u64), Refusal> {
        let key = subjects::store_quota_key(agent);
        // An agent this replica never drew for is most likely new: its first draw writes the
        // full pool less the draw on the condition that the key holds nothing yet, with no read
        // first. A refusal (the pool exists: another replica, or this one before a restart)
        // reads it, as after any lost race. Only the first draw per agent is made blind, whether
        // it succeeds or not: an agent refused for its quota is read, not guessed, from then on.
        let mut unread = {
            let mut reserves = self.reserves.lock().unwrap_or_else(|p| p.into_inner());
            let first = !reserves.contains_key(agent.as_str());
            if first {
                reserves.insert(agent.as_str().to_owned(), Reserve::default());
            }
            first
        };
        for _ in 0..MAX_ATTEMPTS {
            let blind = std::mem::take(&mut unread);
            let entry = if blind {
                None
            } else {
                tokio::time::timeout(self.timeout, self.store.entry(key.as_str()))
                    .await
                    .map_err(|_| Refusal::bus_unavailable("store quota read timed out"))?
                    .map_err(Refusal::bus_unavailable)?
            };
            let now_ms = chrono::Utc::now().timestamp_millis();
            let full = Level {
                bytes: self.bytes,
                messages: self.messages,
                at_ms: now_ms,
            };
            let (level, revision) = match &entry {
                Some(entry) if entry.operation == Operation::Put => (
                    serde_json::from_slice::<Level>(&entry.value)
                        .map(|level| self.refill(level, now_ms))
                        .unwrap_or(full),
                    Some(entry.revision),
                ),
                Some(entry) => (full, Some(entry.revision)),
                // Revision 0: written only if the key holds nothing at all (not even a delete
                // marker, which the read after the refusal finds).
                None if blind => (full, Some(0)),
                None => (full, None),
            };
            let need = size as f64;
            if level.bytes < need {
                return Err(exceeded(self.wait(need - level.bytes, self.bytes)));
            }
            if level.messages < 1.0 {
                return Err(exceeded(self.wait(1.0 - level.messages, self.messages)));
            }
            let bytes = (self.bytes * SHARE).min(level.bytes).max(need).floor() as u64;
            let messages = (self.messages * SHARE).min(level.messages).max(1.0).floor() as u64;
            let left = Level {
                bytes: level.bytes - bytes as f64,
                messages: level.messages - messages as f64,
                at_ms: now_ms,
            };
            let value = serde_json::to_vec(&left).expect("levels serialize").into();
            let written = match revision {
                Some(revision) => self
                    .store
                    .update(key.as_str(), value, revision)
                    .await
                    .map(|_| ())
                    .map_err(|err| {
                        (err.kind() != UpdateErrorKind::WrongLastRevision)
                            .then(|| Refusal::bus_unavailable(err))
                    }),
                None => self
                    .store
                    .create(key.as_str(), value)
                    .await
                    .map(|_| ())
                    .map_err(|err| {
                        (err.kind() != CreateErrorKind::AlreadyExists)
                            .then(|| Refusal::bus_unavailable(err))
                    }),
            };
            match written {
                Ok(()) => return Ok((bytes, messages)),
                // Another replica drew first: read the pool again.
                Err(None) => continue,
                Err(Some(refusal)) => return Err(refusal),
            }
        }
        Err(Refusal::bus_unavailable(
            "store quota contended by other replicas",
        ))
    }

    /// `level` refilled up to `now_ms`, each bucket at its size per period.
    fn refill(&self, level: Level, now_ms: i64) -> Level {
        let elapsed = (now_ms - level.at_ms).max(0) as f64 / 1000.0;
        let per_sec = elapsed / self.period.as_secs_f64();
        Level {
            bytes: (level.bytes + per_sec * self.bytes).min(self.bytes),
            messages: (level.messages + per_sec * self.messages).min(self.messages),
            at_ms: now_ms,
        }
    }

    /// How long a bucket of `size` per period takes to refill `missing`.
    fn wait(&self, missing: f64, size: f64) -> Duration {
        Duration::from_secs_f64(missing / size * self.period.as_secs_f64())
    }
}

fn exceeded(wait: Duration) -> Refusal {
    Refusal::new(Code::QuotaExceeded).with_retry_after(retry_after_secs(wait))
}
