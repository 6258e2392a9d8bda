//! Load limits of the HTTP door, all cheap on the hot path:
//!
//! - a token bucket per agent ([`Limits::admit_agent`], an [`AgentRate`] shared with the NATS
//!   door): an agent over its rate gets 429 `RATE_LIMITED` with `Retry-After`, and other agents
//!   do not notice;
//! - a token bucket of failed authentications per source address ([`Limits::auth_blocked`],
//!   [`Limits::auth_failed`]): an address that keeps presenting bad tokens gets 429 for every
//!   further bad one, while a token that verifies is still served;
//! - a global cap on requests in flight ([`Limits::hold_in_flight`]): past it, requests are
//!   refused at once with 503 `OVERLOADED` instead of queueing without bound (memory stays flat
//!   when the bus is slow);
//! - a cap per agent within it ([`SlotCell`], an [`AgentSlots`] shared with the NATS door): a
//!   request whose token verified takes one of its agent's slots before any of its body is
//!   read and holds it until answered; past `MAX_IN_FLIGHT_PER_AGENT`, 429 `RATE_LIMITED` at
//!   once, so one agent never holds the slots other agents need.
//!
//! Every refusal that tells a client to come back later (429, 503) is counted by code
//! ([`Limits::refusals`], shown by `/health`), so a full stream or a shedding door is visible at once.
//!
//! The buckets are [`crate::contract::bucket::Buckets`], shared with the NATS door.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::contract::bucket::{AgentRate, Buckets, retry_after_secs};
use crate::contract::slots::{AgentSlot, AgentSlots};
use crate::contract::{Code, Refusal, RefusalCounts};

/// The HTTP door's load limits.
#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// Sustained requests per second per agent; `None` disables the per-agent limit.
    pub per_agent_rate: Option<f64>,
    /// Requests an agent may send in a burst above its rate.
    pub per_agent_burst: u32,
    /// Failed authentications a source address may cause in a burst.
    pub auth_failure_burst: u32,
    /// One more failed authentication is allowed per this interval.
    pub auth_failure_interval: Duration,
    /// Requests handled at once; more are refused with 503 `OVERLOADED`.
    pub max_in_flight: usize,
    /// Requests one agent may have in flight at once (both doors); more are refused 429.
    pub max_in_flight_per_agent: usize,
    /// Bounds on every connection: header and body read timeouts, connections per address.
    pub connections: super::server::ConnectionLimits,
}

impl LimitSettings {
    /// The per-agent rate these settings describe, for both doors.
    pub fn agent_rate(&self) -> AgentRate {
        AgentRate::new(self.per_agent_rate, self.per_agent_burst)
    }

    /// The per-agent cap on requests in flight, for both doors.
    pub fn agent_slots(&self) -> AgentSlots {
        AgentSlots::new(self.max_in_flight_per_agent)
    }
}

/// The limiters of one HTTP door.
pub struct Limits {
    per_agent: Arc<AgentRate>,
    auth_failures: Buckets<IpAddr>,
    in_flight: Arc<Semaphore>,
    /// Requests in flight per agent, shared with the NATS door.
    agent_slots: Arc<AgentSlots>,
    /// Refusals answered so far, by code.
    pub refusals: RefusalCounts,
}

/// The answers that mean "not now", shown by `/health`: the operator's signal that the bus is
/// down or full, or that the door is shedding or limiting.
const NOT_NOW: [Code; 5] = [
    Code::BusUnavailable,
    Code::StreamFull,
    Code::Overloaded,
    Code::RateLimited,
    Code::QuotaExceeded,
];

impl Limits {
    /// The "not now" counts and the refusals before admission as JSON for `/health`, e.g.
    /// `{"stream_full": 1, "invalid_token": 20, ...}`.
    pub fn refusals_json(&self) -> serde_json::Value {
        Code::ALL
            .iter()
            .filter(|code| NOT_NOW.contains(code) || code.is_before_admission())
            .map(|&code| {
                (
                    code.as_str().to_ascii_lowercase(),
                    self.refusals.get(code).into(),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

impl Limits {
    /// `per_agent` is the rate and `agent_slots` the cap on requests in flight shared with the
    /// NATS door ([`LimitSettings::agent_rate`], [`LimitSettings::agent_slots`]).
    pub fn new(
        settings: &LimitSettings,
        per_agent: Arc<AgentRate>,
        agent_slots: Arc<AgentSlots>,
    ) -> Self {
        Self {
            per_agent,
            auth_failures: Buckets::per_interval(
                settings.auth_failure_interval,
                settings.auth_failure_burst,
            ),
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
            agent_slots,
            refusals: RefusalCounts::default(),
        }
    }

    /// Takes one request from `agent`'s bucket, or says how long to wait.
    pub fn admit_agent(&self, agent: &str) -> Result<(), Refusal> {
        self.per_agent.admit(agent)
    }

    /// Refuses an address that has used up its failed authentications.
    pub fn auth_blocked(&self, addr: IpAddr) -> Result<(), Refusal> {
        self.auth_failures
            .check(&addr)
            .map_err(|wait| Refusal::rate_limited(retry_after_secs(wait)))
    }

    /// Counts one failed authentication from `addr`.
    pub fn auth_failed(&self, addr: IpAddr) {
        let _ = self.auth_failures.take(&addr);
    }
}

/// The agent slot a request holds: empty until its token verified, then filled once (by
/// whichever of `observe` and the extractor verified it first), and emptied by
/// [`InFlight::release`] when the request is answered. A clone shares the slot.
#[derive(Clone, Default)]
pub struct SlotCell(Arc<Mutex<Option<AgentSlot>>>);

impl SlotCell {
    /// Takes one of `agent`'s slots for this request, unless it holds one already; refuses 429
    /// `RATE_LIMITED` when the agent holds all of its own.
    pub fn hold(&self, limits: &Limits, agent: &str) -> Result<(), Refusal> {
        let mut cell = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if cell.is_none() {
            *cell = Some(limits.agent_slots.acquire(agent)?);
        }
        Ok(())
    }

    fn release(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// What a request holds while it is handled: one in-flight permit and the cell for its agent
/// slot ([`SlotCell`]), or nothing for a health probe, which is not counted against the cap so
/// that an overloaded door still answers it. Taken by [`Limits::hold_in_flight`], given back
/// by [`InFlight::release`].
pub struct InFlight(Option<(OwnedSemaphorePermit, SlotCell)>);

impl InFlight {
    /// The request's agent slot cell, none for a health probe.
    pub fn slot(&self) -> Option<SlotCell> {
        self.0.as_ref().map(|(_, slot)| slot.clone())
    }

    /// Gives back the permit and the agent slot the request took, and counts the refusal the
    /// response carries, if any (health probes are not counted).
    pub fn release(self, limits: &Limits, response: &Response) {
        if let Some((permit, slot)) = self.0 {
            slot.release();
            drop(permit);
            if let Some(code) = response.extensions().get::<Code>() {
                limits.refusals.count(*code);
            }
        }
    }
}

impl Limits {
    /// One in-flight permit for `request` (and an empty agent slot cell in its extensions, for
    /// whichever of the front middleware and the extractor verifies its token first), or `None`
    /// when the door is at `MAX_IN_FLIGHT`: answer [`Limits::overloaded`].
    pub fn hold_in_flight(&self, request: &mut Request) -> Option<InFlight> {
        if request.uri().path().starts_with("/health") {
            return Some(InFlight(None));
        }
        let permit = self.in_flight.clone().try_acquire_owned().ok()?;
        let slot = SlotCell::default();
        request.extensions_mut().insert(slot.clone());
        Some(InFlight(Some((permit, slot))))
    }

    /// 503 `OVERLOADED`, counted.
    pub fn overloaded(&self) -> Response {
        self.refusals.count(Code::Overloaded);
        Refusal::new(Code::Overloaded).into_response()
    }
}
