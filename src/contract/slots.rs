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
//! mutex-guarded shards keyed by a hash, like [`super::bucket::Buckets`]; an agent with nothing
//! in flight has no entry, so memory follows the agents with requests open, not every agent seen.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};

use super::Refusal;

const SHARDS: usize = 16;

/// The message of a refusal past the cap.
pub const TOO_MANY_IN_FLIGHT: &str =
    "This agent has too many requests in flight; wait for an answer before sending more";

/// Requests in flight per agent, at most `cap` each.
pub struct AgentSlots {
    cap: usize,
    shards: Box<[Mutex<HashMap<String, usize>>]>,
    hasher: RandomState,
}

/// One agent's slot, given back on drop.
pub struct AgentSlot {
    slots: Arc<AgentSlots>,
    agent: String,
}

impl AgentSlots {
    /// At most `cap` (at least 1) requests in flight per agent.
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    fn shard(&self, agent: &str) -> &Mutex<HashMap<String, usize>> {
        &self.shards[self.hasher.hash_one(agent) as usize % SHARDS]
    }

    /// Takes one of `agent`'s slots, or refuses with 429 `RATE_LIMITED` when it holds them all.
    pub fn acquire(self: &Arc<Self>, agent: &str) -> Result<AgentSlot, Refusal> {
        let mut shard = self.shard(agent).lock().unwrap_or_else(|p| p.into_inner());
        match shard.get_mut(agent) {
            Some(held) if *held >= self.cap => {
                return Err(Refusal::rate_limited(1).with_message(TOO_MANY_IN_FLIGHT));
            }
            Some(held) => *held += 1,
            None => {
                shard.insert(agent.to_owned(), 1);
            }
        }
        Ok(AgentSlot {
            slots: self.clone(),
            agent: agent.to_owned(),
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
        if let Some(held) = shard.get_mut(&self.agent) {
            *held -= 1;
            if *held == 0 {
                shard.remove(&self.agent);
            }
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
        // A slot given back can be taken again; an idle agent leaves no entry.
        drop(a1);
        let _a3 = slots.acquire("a").unwrap();
        drop((_a2, _a3));
        assert_eq!(slots.held("a"), 0);
        let shard = slots.shard("a").lock().unwrap();
        assert!(!shard.contains_key("a"));
    }
}
