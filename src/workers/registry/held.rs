//! The registry's coalescing state: per agent, the record as this replica last wrote or read it
//! (with its KV revision, so that the next write is a compare-and-set against it with no read
//! first), when this replica last wrote it, and the newest heartbeat held since.
//!
//! The window is measured per agent from its last write: however many heartbeats an agent sends,
//! it costs at most one write per window, so the write rate is bounded by agents ÷ window, not by
//! heartbeats. A held heartbeat is due when its agent's window ends, or at the next tick when that
//! ended already; the flusher writes the due ones of many agents together.
//!
//! The flusher also writes the records whose announced status change is still marked `pending`
//! in the bucket ([`Held::clear_later`]): clearing the mark is due at the next tick, with or
//! without a heartbeat, so it shares a batch with the others instead of costing a round trip of
//! its own.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::domain::{AgentId, AgentRecord, AgentStatus, Heartbeat};

pub(super) struct Held {
    pub(super) window: Duration,
    /// An agent neither heartbeating nor written for this long is forgotten.
    keep_for: Duration,
    agents: Mutex<HashMap<AgentId, Slot>>,
    /// Poked when a heartbeat is held, for a flusher waiting while nothing is.
    held: tokio::sync::Notify,
    /// Whether heartbeats were still held after the last [`Held::due`].
    holding: AtomicBool,
}

struct Slot {
    /// The record as of `revision`, as this replica last stored or read it. Another replica may
    /// have written since: a compare-and-set against it then fails, and the record is read again.
    record: AgentRecord,
    revision: u64,
    /// When this replica last wrote the record; `None` when it only read it.
    written_at: Option<Instant>,
    /// When a heartbeat of the agent was last seen or the record last stored.
    touched_at: Instant,
    /// The newest heartbeat not in `record` yet.
    newest: Option<Heartbeat>,
    /// The bucket still holds `record` at `revision` with its status change marked `pending`
    /// (announced since): `record` is the cleared copy, to be written at the next tick.
    unwritten: bool,
}

/// What the flusher writes for one agent: its held heartbeat whose window is over, or its
/// announced change to clear, or both, against the record and revision known here.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Due {
    pub(super) heartbeat: Option<Heartbeat>,
    pub(super) record: AgentRecord,
    pub(super) revision: u64,
    /// `record` must be written even if the heartbeat changes nothing: the bucket holds it
    /// with its announced change still marked `pending`.
    pub(super) clear: bool,
}

impl Held {
    pub(super) fn new(window: Duration, keep_for: Duration) -> Self {
        Self {
            window,
            keep_for: keep_for.max(2 * window),
            agents: Mutex::new(HashMap::new()),
            held: tokio::sync::Notify::new(),
            holding: AtomicBool::new(false),
        }
    }

    /// Waits until a heartbeat is held (at once if one was held since the last wait).
    pub(super) async fn held(&self) {
        self.held.notified().await;
    }

    /// Whether heartbeats were still held after the last [`Held::due`]; one held since then has
    /// poked [`Held::held`].
    pub(super) fn holds_any(&self) -> bool {
        self.holding.load(Ordering::Relaxed)
    }

    /// How often held heartbeats are looked at: a slice of the window, so that a held one is
    /// written no later than the window's end.
    pub(super) fn tick(&self) -> Duration {
        (self.window / 8).max(Duration::from_millis(5))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AgentId, Slot>> {
        self.agents.lock().expect("coalescing state poisoned")
    }

    /// Keeps `heartbeat` for the flusher if the agent's record is known here and the heartbeat
    /// leaves its status as it is. False: the caller writes it now (after reading the record,
    /// when it is not known).
    pub(super) fn hold(&self, heartbeat: &Heartbeat, now: Instant) -> bool {
        if self.window.is_zero() {
            return false;
        }
        let mut agents = self.lock();
        let Some(slot) = agents.get_mut(&heartbeat.agent_id) else {
            return false;
        };
        let at = heartbeat.received_at;
        if at >= slot.record.status_at && AgentStatus::from(heartbeat.status) != slot.record.status
        {
            return false;
        }
        slot.touched_at = now;
        if at <= slot.record.last_seen {
            return true; // moves neither `last_seen` nor the status
        }
        match &slot.newest {
            None => {
                slot.newest = Some(heartbeat.clone());
                self.held.notify_one();
            }
            Some(newest) if at >= newest.received_at => slot.newest = Some(heartbeat.clone()),
            Some(_) => {}
        }
        true
    }

    /// Whether this replica knows a record of `agent` (without copying it, unlike [`Held::known`]).
    pub(super) fn knows(&self, agent: &AgentId) -> bool {
        self.lock().contains_key(agent)
    }

    /// The record and revision known for `agent`, to compare-and-set against without a read.
    pub(super) fn known(&self, agent: &AgentId) -> Option<(AgentRecord, u64)> {
        let agents = self.lock();
        agents
            .get(agent)
            .map(|slot| (slot.record.clone(), slot.revision))
    }

    /// Notes that `record` is stored at `revision`: written by this replica (`wrote`), or read.
    /// A held heartbeat the record already covers is dropped.
    pub(super) fn known_at(&self, record: &AgentRecord, revision: u64, wrote: bool, now: Instant) {
        if self.window.is_zero() {
            return;
        }
        let mut agents = self.lock();
        let slot = agents
            .entry(record.agent_id.clone())
            .or_insert_with(|| Slot {
                record: record.clone(),
                revision,
                written_at: None,
                touched_at: now,
                newest: None,
                unwritten: false,
            });
        if revision < slot.revision {
            return; // an older read finishing late
        }
        if revision > slot.revision {
            slot.unwritten = false; // whoever wrote past it settled the change
        }
        slot.record = record.clone();
        slot.revision = revision;
        slot.touched_at = now;
        if wrote {
            slot.written_at = Some(now);
        }
        if slot
            .newest
            .as_ref()
            .is_some_and(|n| n.received_at <= record.last_seen)
        {
            slot.newest = None;
        }
    }

    /// Notes that the bucket holds `record` at `revision` with an announced status change still
    /// marked `pending`, `record` being the copy without it: the flusher writes that copy at its
    /// next tick (with the agent's held heartbeat, if any), as a compare-and-set against
    /// `revision`, in a batch with the other due records. Until then the record is known here as
    /// cleared; a registry that stops first leaves the mark, which the next writer of the agent
    /// finishes (publishing the change again under the same dedupe id).
    pub(super) fn clear_later(&self, record: &AgentRecord, revision: u64, now: Instant) {
        self.known_at(record, revision, true, now);
        let mut agents = self.lock();
        if let Some(slot) = agents.get_mut(&record.agent_id)
            && slot.revision == revision
        {
            slot.unwritten = true;
            self.holding.store(true, Ordering::Relaxed);
            self.held.notify_one();
        }
    }

    /// Marks the clear of `agent`'s record at `revision` due again after a failed write, unless
    /// the record was written past it meanwhile.
    pub(super) fn clear_again(&self, agent: &AgentId, revision: u64) {
        let mut agents = self.lock();
        if let Some(slot) = agents.get_mut(agent)
            && slot.revision == revision
        {
            slot.unwritten = true;
            self.held.notify_one();
        }
    }

    /// Holds `heartbeat` again after a failed write, unless a newer one is held already.
    pub(super) fn hold_again(&self, heartbeat: Heartbeat) {
        let mut agents = self.lock();
        if let Some(slot) = agents.get_mut(&heartbeat.agent_id)
            && slot
                .newest
                .as_ref()
                .is_none_or(|n| n.received_at < heartbeat.received_at)
        {
            slot.newest = Some(heartbeat);
            self.held.notify_one();
        }
    }

    /// Forgets what this replica knows of `agent` (its record was written elsewhere, or for
    /// another reason), handing back a held heartbeat, which must still be written. A clear
    /// still to write is dropped: the next read of the record finds the mark and finishes it.
    pub(super) fn forget(&self, agent: &AgentId) -> Option<Heartbeat> {
        self.lock().remove(agent).and_then(|slot| slot.newest)
    }

    /// [`Self::forget`] after a write at `revision` was refused, unless this replica knows a
    /// newer revision already: then its own later write explains the refusal, and what that
    /// slot holds (a clear still to write, a heartbeat) stays to be written.
    pub(super) fn forget_unless_newer(&self, agent: &AgentId, revision: u64) -> Option<Heartbeat> {
        let mut agents = self.lock();
        if agents
            .get(agent)
            .is_some_and(|slot| slot.revision > revision)
        {
            return None;
        }
        agents.remove(agent).and_then(|slot| slot.newest)
    }

    /// Takes the held heartbeats whose window ends before the next tick and every clear still
    /// to write (all of them when `now` is `None`), and forgets agents untouched for `keep_for`.
    pub(super) fn due(&self, now: Option<Instant>) -> Vec<Due> {
        let mut agents = self.lock();
        let take = |slot: &mut Slot, window_over: bool| {
            // A record written anyway takes the held heartbeat along, window over or not.
            let clear = std::mem::take(&mut slot.unwritten);
            let heartbeat = if window_over || clear {
                slot.newest.take()
            } else {
                None
            };
            (heartbeat.is_some() || clear).then(|| Due {
                heartbeat,
                record: slot.record.clone(),
                revision: slot.revision,
                clear,
            })
        };
        let Some(now) = now else {
            return agents
                .values_mut()
                .filter_map(|slot| take(slot, true))
                .collect();
        };
        let mut due = Vec::new();
        let mut holding = false;
        agents.retain(|_, slot| {
            let window_over = slot.written_at.is_none_or(|written| {
                now.saturating_duration_since(written) + self.tick() >= self.window
            });
            if let Some(one) = take(slot, window_over) {
                due.push(one);
            }
            holding |= slot.newest.is_some();
            slot.newest.is_some() || now.saturating_duration_since(slot.touched_at) < self.keep_for
        });
        self.holding.store(holding, Ordering::Relaxed);
        due
    }
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;

    use super::*;
    use crate::domain::ReportedStatus;

    fn record(last_seen: i64, status: AgentStatus) -> AgentRecord {
        let at = DateTime::from_timestamp(last_seen, 0).unwrap();
        AgentRecord {
            agent_id: AgentId::parse("a").unwrap(),
            profile: super::super::tests::profile(),
            registered_at: at,
            last_seen: at,
            status,
            status_at: at,
            pending: None,
        }
    }

    fn beat(at: i64) -> Heartbeat {
        Heartbeat {
            agent_id: AgentId::parse("a").unwrap(),
            status: ReportedStatus::Online,
            details: None,
            received_at: DateTime::from_timestamp(at, 0).unwrap(),
        }
    }

    fn heartbeats(due: Vec<Due>) -> Vec<Heartbeat> {
        due.into_iter().filter_map(|d| d.heartbeat).collect()
    }

    #[test]
    fn heartbeats_are_held_against_the_known_record_and_the_newest_is_due_when_the_window_ends() {
        let held = Held::new(Duration::from_secs(1), Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(!held.hold(&beat(2), t0), "record unknown: read it first");
        held.known_at(&record(1, AgentStatus::Online), 7, true, t0);
        assert!(held.hold(&beat(3), t0));
        assert!(held.hold(&beat(2), t0));
        assert!(held.due(Some(t0 + Duration::from_millis(300))).is_empty());
        let due = held.due(Some(t0 + Duration::from_millis(900)));
        assert_eq!(
            due,
            [Due {
                heartbeat: Some(beat(3)),
                record: record(1, AgentStatus::Online),
                revision: 7,
                clear: false,
            }],
            "due before the window ends, the newest only, against the known revision"
        );
        assert!(held.hold(&beat(4), t0 + Duration::from_millis(1500)));
        assert_eq!(
            heartbeats(held.due(Some(t0 + Duration::from_millis(1500)))),
            [beat(4)],
            "the window is over: due at the next tick"
        );
    }

    #[test]
    fn a_record_only_read_opens_no_window() {
        let held = Held::new(Duration::from_secs(1), Duration::from_secs(60));
        let t0 = Instant::now();
        held.known_at(&record(1, AgentStatus::Online), 7, false, t0);
        assert!(held.hold(&beat(2), t0));
        assert_eq!(heartbeats(held.due(Some(t0))), [beat(2)]);
    }

    #[test]
    fn a_status_change_is_never_held_and_zero_holds_nothing() {
        let held = Held::new(Duration::from_secs(1), Duration::from_secs(60));
        let t0 = Instant::now();
        held.known_at(&record(1, AgentStatus::Offline), 7, true, t0);
        assert!(!held.hold(&beat(2), t0), "offline to online");
        let off = Held::new(Duration::ZERO, Duration::from_secs(60));
        off.known_at(&record(1, AgentStatus::Online), 7, true, t0);
        assert!(!off.hold(&beat(2), t0));
    }

    #[test]
    fn a_write_covering_the_held_heartbeat_drops_it_and_a_stale_read_changes_nothing() {
        let held = Held::new(Duration::from_secs(1), Duration::from_secs(60));
        let t0 = Instant::now();
        held.known_at(&record(1, AgentStatus::Online), 7, true, t0);
        assert!(held.hold(&beat(3), t0));
        held.known_at(&record(2, AgentStatus::Online), 6, false, t0);
        assert_eq!(
            held.known(&beat(1).agent_id),
            Some((record(1, AgentStatus::Online), 7))
        );
        held.known_at(&record(3, AgentStatus::Online), 8, true, t0);
        assert!(held.due(None).is_empty(), "revision 8 holds the heartbeat");
    }

    #[test]
    fn forgetting_an_agent_hands_back_its_held_heartbeat_and_idle_agents_are_forgotten() {
        let held = Held::new(Duration::from_secs(1), Duration::from_secs(10));
        let t0 = Instant::now();
        held.known_at(&record(1, AgentStatus::Online), 7, true, t0);
        assert!(held.hold(&beat(2), t0));
        let agent = AgentId::parse("a").unwrap();
        assert_eq!(held.forget(&agent), Some(beat(2)));
        assert_eq!(held.forget(&agent), None);
        assert!(!held.hold(&beat(3), t0), "forgotten: read it again");
        held.known_at(&record(1, AgentStatus::Online), 7, true, t0);
        assert!(held.due(Some(t0 + Duration::from_secs(9))).is_empty());
        assert!(held.known(&agent).is_some(), "touched 9 s ago: kept");
        assert!(held.knows(&agent));
        assert!(held.due(Some(t0 + Duration::from_secs(11))).is_empty());
        assert_eq!(held.known(&agent), None, "untouched for 11 s: forgotten");
        assert!(!held.knows(&agent));
    }

    #[test]
    fn a_clear_is_due_at_the_next_tick_with_the_held_heartbeat_and_a_later_write_settles_it() {
        let held = Held::new(Duration::from_secs(1), Duration::from_secs(60));
        let t0 = Instant::now();
        let agent = AgentId::parse("a").unwrap();
        held.clear_later(&record(1, AgentStatus::Online), 7, t0);
        assert!(held.holds_any(), "the flusher must not sleep on it");
        assert!(held.hold(&beat(2), t0));
        assert_eq!(
            held.due(Some(t0)),
            [Due {
                heartbeat: Some(beat(2)),
                record: record(1, AgentStatus::Online),
                revision: 7,
                clear: true,
            }],
            "due at once, window or not, with the heartbeat held against it"
        );
        assert!(held.due(Some(t0)).is_empty(), "taken once");
        held.clear_again(&agent, 7);
        assert_eq!(held.due(None).len(), 1, "a failed write is due again");
        held.clear_later(&record(1, AgentStatus::Online), 8, t0);
        held.known_at(&record(2, AgentStatus::Online), 9, true, t0);
        assert!(
            held.due(None).is_empty(),
            "revision 9 was written from the cleared copy: nothing left to clear"
        );
        held.clear_again(&agent, 8);
        assert!(held.due(None).is_empty(), "written past: not due again");
    }
    #[test]
    fn a_refused_clear_forgets_the_agent_only_when_no_newer_revision_is_known() {
        let held = Held::new(Duration::from_secs(1), Duration::from_secs(60));
        let t0 = Instant::now();
        let agent = AgentId::parse("a").unwrap();
        // The clear at 7 is on its way when this replica writes revision 8 with a new mark.
        held.clear_later(&record(1, AgentStatus::Online), 7, t0);
        assert_eq!(held.due(Some(t0)).len(), 1);
        held.clear_later(&record(2, AgentStatus::Online), 8, t0);
        assert_eq!(held.forget_unless_newer(&agent, 7), None);
        let due = held.due(Some(t0));
        assert_eq!(due.len(), 1, "the clear of revision 8 is still to write");
        assert_eq!((due[0].revision, due[0].clear), (8, true));
        // Written elsewhere past 8: forgotten, its held heartbeat handed back to be written.
        assert!(held.hold(&beat(3), t0));
        assert_eq!(held.forget_unless_newer(&agent, 8), Some(beat(3)));
        assert!(!held.knows(&agent));
    }
}
