//! Requests in flight per agent: a count per agent, capped, shared by both doors of a process.
//!
//! `MAX_IN_FLIGHT` bounds what a process handles at once for everyone together; this cap
//! (`MAX_IN_FLIGHT_PER_AGENT`) bounds one agent's share of it, so an agent holding its requests
//! open (slow bodies, a slow bus, many concurrent calls) holds at most its own slots and never
//! makes another agent's request wait or be shed. Past the cap a request is refused at once with
//! 429 `RATE_LIMITED` and `Retry-After: 1`: the agent itself sent too much at once, and backing
//! off is what it should do, as for its rate.
//!
//! A slot is held by an [`AgentSlot`] and given back when it is dropped. Counts live in a few
//! mutex-guarded shards keyed by a hash, like [`super::bucket::Buckets`]. An agent's entry
//! stays when its count falls to 0, so a request of an agent seen before allocates nothing (its
//! slot shares the entry's name); past a soft cap per shard, entries with nothing in flight are
//! forgotten, so memory is bounded by the agents with requests open plus that cap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

// aHash with keys drawn per process, as in `super::bucket`.
use ahash::RandomState;

use super::Refusal;

const SHARDS: usize = 16;
/// Above this many agents a shard forgets those with nothing in flight.
const SHARD_SOFT_CAP: usize = 4096;

/// The message of a refusal past the cap.
pub const TOO_MANY_IN_FLIGHT: &str =
    "This agent has too many requests in flight; wait for an answer before sending more";

/// Requests in flight by agent; the name is shared with the agent's [`AgentSlot`]s.
type Shard = Mutex<HashMap<Arc<str>, usize, RandomState>>;

/// Requests in flight per agent, at most `cap` each.
pub struct AgentSlots {
    cap: usize,
    shards: Box<[Shard]>,
    hasher: RandomState,
}

/// One agent's slot, given back on drop.
pub struct AgentSlot {
    slots: Arc<AgentSlots>,
    agent: Arc<str>,
}

impl AgentSlots {
    /// At most `cap` (at least 1) requests in flight per agent.
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    fn shard(&self, agent: &str) -> &Shard {
        &self.shards[self.hasher.hash_one(agent) as usize % SHARDS]
    }

    /// Takes one of `agent`'s slots, or refuses with 429 `RATE_LIMITED` when it holds them all.
    pub fn acquire(self: &Arc<Self>, agent: &str) -> Result<AgentSlot, Refusal> {
        let mut shard = self.shard(agent).lock().unwrap_or_else(|p| p.into_inner());
        let name = match shard.get_key_value(agent) {
            Some((_, &held)) if held >= self.cap => {
                return Err(Refusal::rate_limited(1).with_message(TOO_MANY_IN_FLIGHT));
            }
            Some((name, _)) => name.clone(),
            None => {
                if shard.len() >= SHARD_SOFT_CAP {
                    shard.retain(|_, held| *held > 0);
                }
                let name: Arc<str> = Arc::from(agent);
                shard.insert(name.clone(), 0);
                name
            }
        };
        *shard.get_mut(agent).expect("present") += 1;
        Ok(AgentSlot {
            slots: self.clone(),
            agent: name,
        })
    }

    /// Slots `agent` holds now.
    pub fn held(&self, agent: &str) -> usize {
        let shard = self.shard(agent).lock().unwrap_or_else(|p| p.into_inner());
        shard.get(agent).copied().unwrap_or(0)
    }
}

impl Drop for AgentSlot {
    fn drop(&mut self) {
        let mut shard = self
            .slots
            .shard(&self.agent)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(held) = shard.get_mut(&*self.agent) {
            *held -= 1;
        }
    }
}

impl std::fmt::Debug for AgentSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSlot")
            .field("agent", &self.agent)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Code;

    #[test]
    fn an_agent_holds_at_most_its_cap_and_others_are_not_affected() {
        let slots = Arc::new(AgentSlots::new(2));
        let a1 = slots.acquire("a").unwrap();
        let _a2 = slots.acquire("a").unwrap();
        let refused = slots.acquire("a").unwrap_err();
        assert_eq!(refused.code(), Code::RateLimited);
        assert_eq!(refused.retry_after(), Some(1));
        // Another agent has its own slots.
        let _b = slots.acquire("b").unwrap();
        assert_eq!(slots.held("b"), 1);
        // A slot given back can be taken again.
        drop(a1);
        let _a3 = slots.acquire("a").unwrap();
        drop((_a2, _a3));
        assert_eq!(slots.held("a"), 0);
    }

    #[test]
    fn a_shard_past_its_soft_cap_forgets_agents_with_nothing_in_flight() {
        let slots = Arc::new(AgentSlots::new(1));
        let busy = slots.acquire("busy").unwrap();
        // Enough idle agents to fill every shard past its cap.
        for i in 0..SHARDS * SHARD_SOFT_CAP * 2 {
            drop(slots.acquire(&format!("idle-{i}")).unwrap());
        }
        let entries: usize = slots.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(entries <= SHARDS * SHARD_SOFT_CAP, "{entries} entries kept");
        // An agent with a request open keeps its count through the sweeps.
        assert_eq!(slots.held("busy"), 1);
        assert!(slots.acquire("busy").is_err());
        drop(busy);
        assert!(slots.acquire("busy").is_ok());
    }
}
