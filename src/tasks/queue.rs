//! The dispatcher's in-memory queue of tasks waiting for an agent. It holds ids and the few
//! fields order needs; the records stay with the dispatcher, which rebuilds the queue from the
//! `acc_tasks` bucket when it takes over. Nothing else decides order: the dispatcher calls
//! [`TaskQueue::push`], [`TaskQueue::remove`] and [`TaskQueue::pop_for`].
//!
//! Order (DESIGN.md §6.1, docs/architecture.md "Scheduling"):
//! - **strict priority** between the five levels (1 first), with **aging**: a level whose oldest
//!   task has waited `k` whole [`QueueSettings::aging`] periods counts `k` levels higher, so
//!   nothing starves behind a steady stream of priority-1 work; ties go to the older task;
//! - within a level, **weighted round-robin across tenants** (deficit round-robin with a unit
//!   cost per task): the tenant at the front of the ring gets up to its weight
//!   ([`TenantWeights`], default 1) of claims, then goes to the back; a tenant with nothing
//!   queued leaves the ring and joins at the back when it queues again;
//! - within a tenant, first in, first out by `(queued_at, seq)`: when the task became queued
//!   (its submission, or the end of its backoff) and its submission's stream sequence.
//!
//! Layout: per capability, per level, one line per tenant plus one line of every task of the
//! level (whose head is the level's oldest, for aging). A claim looks at the heads of its
//! capabilities' five levels, sorts those few, and takes from the best level's ring: its cost
//! grows with the number of capabilities asked and tenants passed over, never with the backlog.
//! Removal (a cancel) leaves a tombstone, skipped when it reaches a head and swept when they
//! outnumber the live entries, so that too is O(1) amortized.
//!
//! The memory a claim touches does not grow with the backlog either, so that 100,000 queued
//! tasks cost a claim about what 1,000 do (docs/BENCHMARKS.md, "Scheduling"): the tasks sit in
//! numbered slots; a line entry is a small copy of the order key with the slot's number, and
//! whether it is live is one look at a dense array of tokens, not at the task; the index by id
//! holds slot numbers, with each task's hash kept beside it, so taking a task out of it compares
//! numbers, not ids; capability and tenant are shared with their lines, not copied per task.
//!
//! The order is a function of the stored fields only (`priority`, `tenant`, `queued_at`,
//! `seq`) and of the clock: a successor that pushes the same records, in any order, serves them
//! in the same order (insertion keeps each line sorted; the ring is rebuilt oldest tenant head
//! first, which is where the predecessor's rotation may differ by at most one turn).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hashbrown::HashTable;

use crate::domain::TaskId;

/// Priority levels, 1 (first) to 5.
pub const LEVELS: usize = 5;
/// How many entries of one tenant's line a claim looks at when the caller refuses the head (a
/// retry that should go to another agent): a bound, so a claim never walks a backlog.
const LOOK_PAST_REFUSED: usize = 8;
/// Tombstones are swept from a line once there are more of them than this and than live ones.
const SWEEP_AFTER: usize = 64;

/// Default of `TASK_PRIORITY_AGING`.
pub const DEFAULT_AGING: Duration = Duration::from_secs(30);

/// Claims per round-robin turn for each tenant (`TENANT_WEIGHTS=tenant=weight,...`); a tenant
/// not named has weight 1.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantWeights(Arc<HashMap<String, u32>>);

impl TenantWeights {
    /// Reads `a=3,b=2` (empty: every tenant weighs 1). Weights are 1 to 1000.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut weights = HashMap::new();
        for item in raw.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (tenant, weight) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not tenant=weight"))?;
            let weight: u32 = weight
                .trim()
                .parse()
                .ok()
                .filter(|w| (1..=1000).contains(w))
                .ok_or_else(|| format!("the weight of {tenant:?} must be from 1 to 1000"))?;
            let tenant = tenant.trim();
            if tenant.is_empty() {
                return Err(format!("{item:?} names no tenant"));
            }
            if weights.insert(tenant.to_owned(), weight).is_some() {
                return Err(format!("tenant {tenant:?} is named twice"));
            }
        }
        Ok(Self(Arc::new(weights)))
    }

    pub fn of(&self, tenant: &str) -> u32 {
        self.0.get(tenant).copied().unwrap_or(1)
    }
}

/// How the queue orders tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSettings {
    /// A task waiting this long counts one level higher (per whole period); zero turns aging off.
    pub aging: Duration,
    pub weights: TenantWeights,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            aging: DEFAULT_AGING,
            weights: TenantWeights::default(),
        }
    }
}

/// A task waiting in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub task_id: TaskId,
    pub capability: String,
    /// 1 (first) to 5.
    pub priority: u8,
    pub tenant: String,
    /// Since when it waits: its submission, or the end of its last backoff.
    pub queued_at: DateTime<Utc>,
    /// Its submission's stream sequence: breaks ties of `queued_at`.
    pub seq: u64,
}

/// Place in a line: `queued_at` in milliseconds, then `seq`.
type Key = (i64, u64);

/// One entry of a line: live while its slot holds the same token.
#[derive(Debug, Clone, Copy)]
struct Entry {
    key: Key,
    token: u64,
    slot: u32,
}

/// A queued task as the queue keeps it.
#[derive(Debug)]
struct Queued {
    /// Of `task_id`, for the index (kept so that leaving the index needs no look at the id).
    hash: u64,
    task_id: TaskId,
    /// Shared with the capability's lines.
    capability: Arc<str>,
    /// Shared with the tenant's line.
    tenant: Arc<str>,
    priority: u8,
    queued_at: DateTime<Utc>,
    seq: u64,
}

/// The queued tasks in numbered slots, with each slot's token apart from the tasks: an entry is
/// live while its slot holds its token, and a slot that empties gets token 0, which no entry
/// has (tokens count from 1 and are never reused).
#[derive(Debug, Default)]
struct Slots {
    tokens: Vec<u64>,
    tasks: Vec<Option<Queued>>,
    free: Vec<u32>,
}

impl Slots {
    fn is_live(&self, entry: &Entry) -> bool {
        self.tokens[entry.slot as usize] == entry.token
    }

    fn task(&self, slot: u32) -> &Queued {
        self.tasks[slot as usize]
            .as_ref()
            .expect("an indexed slot holds a task")
    }

    /// Puts a task in a free slot; its number.
    fn put(&mut self, task: Queued, token: u64) -> u32 {
        match self.free.pop() {
            Some(slot) => {
                self.tokens[slot as usize] = token;
                self.tasks[slot as usize] = Some(task);
                slot
            }
            None => {
                let slot = u32::try_from(self.tasks.len()).expect("fewer than 2^32 queued tasks");
                self.tokens.push(token);
                self.tasks.push(Some(task));
                slot
            }
        }
    }

    /// Empties a slot: its entries become tombstones.
    fn take(&mut self, slot: u32) -> Queued {
        self.tokens[slot as usize] = 0;
        self.free.push(slot);
        self.tasks[slot as usize]
            .take()
            .expect("a live slot holds a task")
    }
}

/// Entries sorted by key, with tombstones of removed tasks among them.
#[derive(Debug, Default)]
struct Line {
    entries: VecDeque<Entry>,
    live: usize,
}

impl Line {
    /// Inserts in key order: at the back, unless clocks or a requeue put it earlier.
    fn insert(&mut self, entry: Entry) {
        let at = self
            .entries
            .iter()
            .rposition(|e| e.key <= entry.key)
            .map_or(0, |i| i + 1);
        self.entries.insert(at, entry);
        self.live += 1;
    }

    /// The first live entry, dropping tombstones in front of it.
    fn head(&mut self, slots: &Slots) -> Option<Entry> {
        while let Some(front) = self.entries.front() {
            if slots.is_live(front) {
                return Some(*front);
            }
            self.entries.pop_front();
        }
        None
    }

    /// One entry became a tombstone (its slot was emptied).
    fn kill(&mut self, slots: &Slots) {
        self.live -= 1;
        let dead = self.entries.len() - self.live;
        if dead > SWEEP_AFTER && dead > self.live {
            self.entries.retain(|e| slots.is_live(e));
        }
    }
}

/// One priority level of one capability.
#[derive(Debug, Default)]
struct Level {
    /// Every task of the level: its head is the oldest, which ages the level; `all.live` is the
    /// level's depth.
    all: Line,
    /// One line per tenant; a tenant is in `ring` exactly when it has a line here.
    tenants: HashMap<Arc<str>, Line>,
    /// Round-robin order of the tenants; the front one's turn is running.
    ring: VecDeque<Arc<str>>,
    /// Claims the front tenant has had in its turn.
    served: u32,
}

#[derive(Debug, Default)]
pub struct TaskQueue {
    settings: QueueSettings,
    lines: HashMap<Arc<str>, [Level; LEVELS]>,
    slots: Slots,
    /// Slot numbers by task id, hashed with `hasher`.
    index: HashTable<u32>,
    hasher: RandomState,
    tokens: u64,
    /// Queued tasks per tenant (what `TASK_MAX_QUEUED_PER_TENANT` caps).
    per_tenant: HashMap<String, usize>,
}

impl TaskQueue {
    pub fn new(settings: QueueSettings) -> Self {
        Self {
            settings,
            ..Self::default()
        }
    }

    /// Adds a task in its place; a task already queued keeps its place.
    pub fn push(&mut self, task: Waiting) {
        let hash = self.hasher.hash_one(&task.task_id);
        let slots = &self.slots;
        if self
            .index
            .find(hash, |&slot| slots.task(slot).task_id == task.task_id)
            .is_some()
        {
            return;
        }
        self.tokens += 1;
        let token = self.tokens;
        let key = (task.queued_at.timestamp_millis(), task.seq);
        let capability = match self.lines.get_key_value(task.capability.as_str()) {
            Some((shared, _)) => Arc::clone(shared),
            None => {
                let shared: Arc<str> = Arc::from(task.capability.as_str());
                self.lines.insert(Arc::clone(&shared), Default::default());
                shared
            }
        };
        let level = &mut self
            .lines
            .get_mut(&capability)
            .expect("the capability's lines exist")[level_of(task.priority)];
        let tenant = match level.tenants.get_key_value(task.tenant.as_str()) {
            Some((shared, _)) => Arc::clone(shared),
            None => {
                let shared: Arc<str> = Arc::from(task.tenant.as_str());
                level.tenants.insert(Arc::clone(&shared), Line::default());
                level.ring.push_back(Arc::clone(&shared));
                shared
            }
        };
        match self.per_tenant.get_mut(task.tenant.as_str()) {
            Some(count) => *count += 1,
            None => {
                self.per_tenant.insert(task.tenant, 1);
            }
        }
        let slot = self.slots.put(
            Queued {
                hash,
                task_id: task.task_id,
                capability,
                tenant: Arc::clone(&tenant),
                priority: task.priority,
                queued_at: task.queued_at,
                seq: task.seq,
            },
            token,
        );
        let entry = Entry { key, token, slot };
        level.all.insert(entry);
        level
            .tenants
            .get_mut(&tenant)
            .expect("the tenant's line exists")
            .insert(entry);
        let slots = &self.slots;
        self.index
            .insert_unique(hash, slot, |&slot| slots.task(slot).hash);
    }

    /// Takes a task out of the queue (cancelled, or taken by another path); true if it was in.
    pub fn remove(&mut self, task_id: &TaskId) -> bool {
        let hash = self.hasher.hash_one(task_id);
        let slots = &self.slots;
        let Ok(found) = self
            .index
            .find_entry(hash, |&slot| slots.task(slot).task_id == *task_id)
        else {
            return false;
        };
        let (slot, _) = found.remove();
        let task = self.slots.take(slot);
        if let Some(levels) = self.lines.get_mut(&task.capability) {
            let level = &mut levels[level_of(task.priority)];
            level.all.kill(&self.slots);
            if let Some(line) = level.tenants.get_mut(&task.tenant) {
                line.kill(&self.slots);
            }
            if levels.iter().all(|l| l.all.live == 0) {
                self.lines.remove(&task.capability);
            }
        }
        self.forget(&task.tenant);
        true
    }

    /// [`TaskQueue::pop_for_at`] now.
    pub fn pop_for(
        &mut self,
        capabilities: &[String],
        accept: impl FnMut(&TaskId) -> bool,
    ) -> Option<Waiting> {
        self.pop_for_at(capabilities, Utc::now(), accept)
    }

    /// The next task, in queue order at `now`, of any of `capabilities` that `accept` takes (the
    /// dispatcher refuses, for example, a retry to an agent that failed it when another agent
    /// could take it), removed from the queue.
    pub fn pop_for_at(
        &mut self,
        capabilities: &[String],
        now: DateTime<Utc>,
        mut accept: impl FnMut(&TaskId) -> bool,
    ) -> Option<Waiting> {
        let aging_ms = i64::try_from(self.settings.aging.as_millis()).unwrap_or(i64::MAX);
        let now_ms = now.timestamp_millis();
        // The heads of the asked capabilities' levels: at most 5 per capability.
        let mut candidates: Vec<(i64, Key, usize, usize)> = Vec::new();
        for (c, capability) in capabilities.iter().enumerate() {
            if capabilities[..c].contains(capability) {
                continue;
            }
            let Some(levels) = self.lines.get_mut(capability.as_str()) else {
                continue;
            };
            for (l, level) in levels.iter_mut().enumerate() {
                let Some(head) = level.all.head(&self.slots) else {
                    continue;
                };
                let waited = (now_ms - head.key.0).max(0);
                let promoted = if aging_ms > 0 { waited / aging_ms } else { 0 };
                candidates.push((l as i64 - promoted, head.key, c, l));
            }
        }
        candidates.sort_unstable();
        candidates
            .into_iter()
            .find_map(|(_, _, c, l)| self.take(&capabilities[c], l, &mut accept))
    }

    /// The round-robin pick of one level: the first tenant from the ring's front whose line
    /// holds a task `accept` takes (looking at most [`LOOK_PAST_REFUSED`] deep).
    fn take(
        &mut self,
        capability: &str,
        level: usize,
        accept: &mut impl FnMut(&TaskId) -> bool,
    ) -> Option<Waiting> {
        let levels = self.lines.get_mut(capability)?;
        let lvl = &mut levels[level];
        let slots = &self.slots;
        let mut chosen = None;
        let mut turn = 0;
        while turn < lvl.ring.len() {
            let line = lvl
                .tenants
                .get_mut(&lvl.ring[turn])
                .expect("a tenant in the ring has a line");
            if line.head(slots).is_none() {
                lvl.tenants.remove(&lvl.ring[turn]);
                lvl.ring.remove(turn);
                if turn == 0 {
                    lvl.served = 0;
                }
                continue;
            }
            let found = line
                .entries
                .iter()
                .take(LOOK_PAST_REFUSED)
                .position(|e| slots.is_live(e) && accept(&slots.task(e.slot).task_id));
            if let Some(position) = found {
                chosen = Some((turn, position));
                break;
            }
            turn += 1;
        }
        let (turn, position) = chosen?;
        let tenant = Arc::clone(&lvl.ring[turn]);
        let line = lvl.tenants.get_mut(&tenant).expect("chosen from a line");
        let entry = line.entries.remove(position).expect("chosen entry");
        line.live -= 1;
        let emptied = line.live == 0;
        if emptied {
            lvl.tenants.remove(&tenant);
            lvl.ring.remove(turn);
        }
        if turn == 0 {
            lvl.served += 1;
            if emptied {
                lvl.served = 0;
            } else if lvl.served >= self.settings.weights.of(&tenant) {
                lvl.served = 0;
                lvl.ring.rotate_left(1);
            }
        }
        let task = self.slots.take(entry.slot);
        self.index
            .find_entry(task.hash, |&slot| slot == entry.slot)
            .expect("a live slot is indexed")
            .remove();
        lvl.all.kill(&self.slots);
        if levels.iter().all(|l| l.all.live == 0) {
            self.lines.remove(capability);
        }
        self.forget(&tenant);
        Some(Waiting {
            task_id: task.task_id,
            capability: capability.to_owned(),
            priority: task.priority,
            tenant: tenant.as_ref().to_owned(),
            queued_at: task.queued_at,
            seq: task.seq,
        })
    }

    fn forget(&mut self, tenant: &str) {
        if let Some(n) = self.per_tenant.get_mut(tenant) {
            *n -= 1;
            if *n == 0 {
                self.per_tenant.remove(tenant);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Queued tasks per capability and priority, for `/metrics`.
    pub fn depth(&self) -> BTreeMap<(String, u8), usize> {
        let mut depth = BTreeMap::new();
        for (capability, levels) in &self.lines {
            for (l, level) in levels.iter().enumerate() {
                if level.all.live > 0 {
                    depth.insert(
                        (capability.as_ref().to_owned(), l as u8 + 1),
                        level.all.live,
                    );
                }
            }
        }
        depth
    }

    pub fn per_tenant(&self) -> &HashMap<String, usize> {
        &self.per_tenant
    }
}

fn level_of(priority: u8) -> usize {
    usize::from(priority.clamp(1, LEVELS as u8) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    fn task(id: &str, capability: &str, priority: u8, tenant: &str, secs: i64) -> Waiting {
        Waiting {
            task_id: TaskId::parse(id).unwrap(),
            capability: capability.into(),
            priority,
            tenant: tenant.into(),
            queued_at: at(secs),
            seq: secs.unsigned_abs(),
        }
    }

    fn waiting(id: &str, capability: &str, priority: u8) -> Waiting {
        task(id, capability, priority, "t", 0)
    }

    fn caps(list: &[&str]) -> Vec<String> {
        list.iter().map(|c| (*c).to_owned()).collect()
    }

    fn drain(queue: &mut TaskQueue, caps: &[String], now: DateTime<Utc>) -> Vec<String> {
        std::iter::from_fn(|| queue.pop_for_at(caps, now, |_| true))
            .map(|w| w.task_id.as_str().to_owned())
            .collect()
    }

    #[test]
    fn tasks_leave_by_priority_then_in_arrival_order_for_the_asked_capabilities() {
        let mut queue = TaskQueue::new(QueueSettings::default());
        queue.push(task("a", "x", 3, "t", 1));
        queue.push(task("b", "y", 1, "t", 2));
        queue.push(task("c", "x", 1, "t", 3));
        queue.push(task("d", "x", 3, "t", 4));
        queue.push(task("a", "x", 3, "t", 5));
        assert_eq!(queue.len(), 4);
        let now = at(5);
        assert_eq!(drain(&mut queue, &caps(&["x"]), now), ["c", "a", "d"]);
        assert_eq!(drain(&mut queue, &caps(&["z"]), now), Vec::<String>::new());
        assert_eq!(drain(&mut queue, &caps(&["x", "y"]), now), ["b"]);
        assert!(queue.is_empty());
        assert!(queue.depth().is_empty() && queue.per_tenant().is_empty());
    }

    #[test]
    fn a_task_the_caller_refuses_stays_queued_for_another() {
        let mut queue = TaskQueue::new(QueueSettings::default());
        queue.push(waiting("a", "x", 1));
        queue.push(waiting("b", "x", 2));
        let taken = queue
            .pop_for(&caps(&["x"]), |id| id.as_str() != "a")
            .unwrap();
        assert_eq!(taken.task_id.as_str(), "b");
        assert_eq!(queue.depth().get(&("x".into(), 1)), Some(&1));
        assert!(queue.remove(&TaskId::parse("a").unwrap()));
        assert!(!queue.remove(&TaskId::parse("a").unwrap()));
        assert!(queue.pop_for(&caps(&["x"]), |_| true).is_none());
    }

    #[test]
    fn a_refused_head_lets_the_next_task_of_the_same_tenant_through() {
        let mut queue = TaskQueue::new(QueueSettings::default());
        queue.push(task("a", "x", 3, "t", 1));
        queue.push(task("b", "x", 3, "t", 2));
        let taken = queue.pop_for_at(&caps(&["x"]), at(2), |id| id.as_str() != "a");
        assert_eq!(taken.unwrap().task_id.as_str(), "b");
        assert_eq!(drain(&mut queue, &caps(&["x"]), at(2)), ["a"]);
    }

    #[test]
    fn a_level_whose_oldest_task_waited_k_aging_periods_counts_k_levels_higher() {
        let settings = QueueSettings {
            aging: Duration::from_secs(10),
            ..QueueSettings::default()
        };
        let mut queue = TaskQueue::new(settings);
        queue.push(task("old5", "x", 5, "t", 0));
        queue.push(task("p3", "x", 3, "t", 30));
        queue.push(task("p1", "x", 1, "t", 35));
        // At 35 s: the priority 5 waited 3 whole periods and counts as 2; p3 (5 s) as 3.
        let first = queue.pop_for_at(&caps(&["x"]), at(35), |_| true).unwrap();
        assert_eq!(first.task_id.as_str(), "p1");
        let second = queue.pop_for_at(&caps(&["x"]), at(35), |_| true).unwrap();
        assert_eq!(second.task_id.as_str(), "old5");
        // At 40 s p3 waited one period and counts as 2: a fresh priority 1 still goes first.
        queue.push(task("p1b", "x", 1, "t", 40));
        assert_eq!(drain(&mut queue, &caps(&["x"]), at(40)), ["p1b", "p3"]);
        // Equal effective levels: the older task first.
        queue.push(task("q5", "x", 5, "t", 0));
        queue.push(task("q1", "x", 1, "t", 40));
        assert_eq!(drain(&mut queue, &caps(&["x"]), at(40)), ["q5", "q1"]);
    }

    #[test]
    fn zero_aging_is_strict_priority() {
        let settings = QueueSettings {
            aging: Duration::ZERO,
            ..QueueSettings::default()
        };
        let mut queue = TaskQueue::new(settings);
        queue.push(task("p5", "x", 5, "t", 0));
        queue.push(task("p4", "x", 4, "t", 1000));
        assert_eq!(drain(&mut queue, &caps(&["x"]), at(100_000)), ["p4", "p5"]);
    }

    #[test]
    fn tenants_of_a_level_take_turns_whatever_their_backlogs() {
        let mut queue = TaskQueue::new(QueueSettings::default());
        for i in 0..100 {
            queue.push(task(&format!("a{i}"), "x", 3, "a", i));
        }
        queue.push(task("b0", "x", 3, "b", 200));
        queue.push(task("b1", "x", 3, "b", 201));
        queue.push(task("c0", "x", 3, "c", 202));
        let order = drain(&mut queue, &caps(&["x"]), at(300));
        assert_eq!(&order[..7], ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]);
        assert_eq!(order.len(), 103);
    }

    #[test]
    fn a_tenant_gets_its_weight_of_claims_per_turn() {
        let settings = QueueSettings {
            weights: TenantWeights::parse("a=3, b=1").unwrap(),
            ..QueueSettings::default()
        };
        let mut queue = TaskQueue::new(settings);
        for i in 0..6 {
            queue.push(task(&format!("a{i}"), "x", 3, "a", i));
            queue.push(task(&format!("b{i}"), "x", 3, "b", i));
        }
        let order = drain(&mut queue, &caps(&["x"]), at(10));
        assert_eq!(
            &order[..8],
            ["a0", "a1", "a2", "b0", "a3", "a4", "a5", "b1"]
        );
    }

    #[test]
    fn weights_are_read_from_tenant_equals_weight_pairs() {
        let weights = TenantWeights::parse("a=3,b=1").unwrap();
        assert_eq!(
            (weights.of("a"), weights.of("b"), weights.of("z")),
            (3, 1, 1)
        );
        assert_eq!(TenantWeights::parse("").unwrap(), TenantWeights::default());
        for bad in ["a", "a=0", "a=x", "=2", "a=1,a=2", "a=1001"] {
            assert!(TenantWeights::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pushing_the_same_tasks_in_another_order_gives_the_same_order() {
        let tasks: Vec<Waiting> = (0..40)
            .map(|i| {
                let tenant = ["a", "b", "c"][i % 3];
                let priority = [1, 3, 5][(i / 3) % 3];
                task(&format!("t{i}"), "x", priority, tenant, i as i64)
            })
            .collect();
        let mut forward = TaskQueue::new(QueueSettings::default());
        let mut backward = TaskQueue::new(QueueSettings::default());
        tasks.iter().cloned().for_each(|t| forward.push(t));
        tasks.iter().rev().cloned().for_each(|t| backward.push(t));
        // Within each tenant line the order is the same; the ring starts at the oldest head
        // when the tasks come oldest first (as a rebuild pushes them).
        let caps = caps(&["x"]);
        let mut f = drain(&mut forward, &caps, at(40));
        let mut b = drain(&mut backward, &caps, at(40));
        let per_tenant = |order: &mut Vec<String>, tenant: usize| {
            order
                .iter()
                .filter(|id| id[1..].parse::<usize>().unwrap() % 3 == tenant)
                .cloned()
                .collect::<Vec<_>>()
        };
        for tenant in 0..3 {
            assert_eq!(per_tenant(&mut f, tenant), per_tenant(&mut b, tenant));
        }
        f.sort();
        b.sort();
        assert_eq!(f, b);
    }

    #[test]
    fn removed_tasks_are_skipped_and_swept() {
        let mut queue = TaskQueue::new(QueueSettings::default());
        for i in 0..1000 {
            queue.push(task(&format!("t{i}"), "x", 3, "a", i));
        }
        for i in 0..999 {
            assert!(queue.remove(&TaskId::parse(&format!("t{i}")).unwrap()));
        }
        let level = &queue.lines["x"][2];
        assert!(level.all.entries.len() <= 2 * SWEEP_AFTER + 2);
        assert_eq!(drain(&mut queue, &caps(&["x"]), at(2000)), ["t999"]);
        assert!(queue.lines.is_empty());
    }

    #[test]
    fn a_cancelled_tasks_slot_reused_by_a_later_task_does_not_bring_it_back() {
        let mut queue = TaskQueue::new(QueueSettings::default());
        queue.push(task("old", "x", 3, "a", 1));
        queue.push(task("mid", "x", 3, "a", 2));
        assert!(queue.remove(&TaskId::parse("old").unwrap()));
        // "new" takes the emptied slot; the old entry, ahead of "mid", stays a tombstone.
        queue.push(task("new", "x", 3, "a", 3));
        assert_eq!(drain(&mut queue, &caps(&["x"]), at(3)), ["mid", "new"]);
        assert!(queue.is_empty() && queue.per_tenant().is_empty());
    }

    #[test]
    fn a_task_requeued_earlier_than_the_tail_goes_in_its_place() {
        let mut queue = TaskQueue::new(QueueSettings::default());
        queue.push(task("late", "x", 3, "a", 10));
        queue.push(task("early", "x", 3, "a", 5));
        assert_eq!(drain(&mut queue, &caps(&["x"]), at(20)), ["early", "late"]);
    }
}
