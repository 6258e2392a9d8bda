//! Task figures of this process's dispatcher, for `/metrics`: written by the dispatcher while it
//! acts, read at each scrape. Only the acting replica has figures (a standby shows none), so a
//! scrape of every replica gives one set.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How attempts ended, the label values of `acc_task_attempts_total`.
pub const OUTCOMES: [&str; 4] = ["succeeded", "failed", "expired", "cancelled"];

/// How the dispatcher's atomic batches of task records ended, the label values of
/// `acc_task_record_batches_total`.
pub const BATCH_OUTCOMES: [&str; 3] = ["committed", "refused", "unknown"];

/// How one atomic batch of task records ended; its index in [`BATCH_OUTCOMES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    Committed = 0,
    Refused = 1,
    Unknown = 2,
}

/// What the dispatcher reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFigures {
    /// Queued tasks by capability and priority.
    pub queued: BTreeMap<(String, u8), usize>,
    /// Tasks in the dead-letter queue.
    pub dead_lettered: u64,
    /// Attempts ended since this replica started acting, by outcome (indexed as [`OUTCOMES`]).
    pub attempts: [u64; 4],
    /// Leases that ran out since this replica started acting.
    pub leases_expired: u64,
    /// Atomic batches of task records sent since this replica started acting, by how they
    /// ended (indexed as [`BATCH_OUTCOMES`]). A refused one was written record by record.
    pub record_batches: [u64; 3],
    /// Task records stored through committed batches since this replica started acting.
    pub batched_records: u64,
    /// Submit → first dispatch, of tasks dispatched since this replica started acting.
    pub dispatch_latency: Histogram,
    /// Tasks that entered the dead-letter queue since this replica started acting.
    pub dead_lettered_total: u64,
    /// When each of the last [`RECENT_WINDOW`]'s dead-letterings happened (the alert rule
    /// "DLQ growing" counts them).
    pub recent_dead_letters: VecDeque<Instant>,
    /// Queued tasks of capabilities no online agent has, by capability (the alert rule "queued
    /// tasks and no online agent" watches it).
    pub unserved: BTreeMap<String, usize>,
}

/// How far back "recently dead-lettered" looks.
pub const RECENT_WINDOW: Duration = Duration::from_secs(600);

impl TaskFigures {
    /// One more task dead-lettered now.
    pub fn dead_lettered_now(&mut self) {
        self.dead_lettered_total += 1;
        self.recent_dead_letters.push_back(Instant::now());
        self.forget_old();
    }

    /// One more batch of task records ended `outcome`, storing `stored` records.
    pub fn batch_ended(&mut self, outcome: BatchOutcome, stored: usize) {
        self.record_batches[outcome as usize] += 1;
        self.batched_records += stored as u64;
    }

    /// Dead-letterings within [`RECENT_WINDOW`].
    pub fn recently_dead_lettered(&mut self) -> u64 {
        self.forget_old();
        self.recent_dead_letters.len() as u64
    }

    fn forget_old(&mut self) {
        while self
            .recent_dead_letters
            .front()
            .is_some_and(|at| at.elapsed() > RECENT_WINDOW)
        {
            self.recent_dead_letters.pop_front();
        }
    }

    /// What the alerting role reads (from the tasks bucket, key [`SNAPSHOT_KEY`]).
    pub fn snapshot(&mut self, at: DateTime<Utc>) -> TaskSnapshot {
        TaskSnapshot {
            at,
            dead_lettered: self.dead_lettered,
            dead_lettered_recently: self.recently_dead_lettered(),
            unserved: self.unserved.clone(),
        }
    }
}

/// The key in the tasks bucket where the acting dispatcher keeps its [`TaskSnapshot`] (a `.`
/// keeps it apart from every task id).
pub const SNAPSHOT_KEY: &str = "figures.dispatcher";

/// The dispatcher's figures the alerting role needs, stored while it acts (at most once a
/// second, and at least every [`SNAPSHOT_REFRESH`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSnapshot {
    /// When the dispatcher wrote it: older than [`SNAPSHOT_STALE`] is no data.
    pub at: DateTime<Utc>,
    /// Tasks in the dead-letter queue.
    pub dead_lettered: u64,
    /// Tasks dead-lettered within [`RECENT_WINDOW`] (while this dispatcher acted).
    pub dead_lettered_recently: u64,
    /// Queued tasks of capabilities no online agent has.
    pub unserved: BTreeMap<String, usize>,
}

/// An unchanged snapshot is written again after this long, so its age tells a live dispatcher.
pub const SNAPSHOT_REFRESH: Duration = Duration::from_secs(10);
/// A snapshot older than this is not believed (the dispatcher is gone).
pub const SNAPSHOT_STALE: Duration = Duration::from_secs(30);

/// Upper bounds of the dispatch latency buckets, in seconds (`+Inf` is implied).
pub const LATENCY_BOUNDS: [f64; 15] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A latency histogram with Prometheus' cumulative buckets ([`LATENCY_BOUNDS`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Observations at or under each bound (not cumulative; rendering sums them).
    pub buckets: [u64; LATENCY_BOUNDS.len()],
    pub count: u64,
    /// Sum of the observations, in microseconds (integers keep the figures `Eq`).
    pub sum_micros: u64,
}

impl Histogram {
    pub fn observe(&mut self, latency: Duration) {
        let secs = latency.as_secs_f64();
        if let Some(index) = LATENCY_BOUNDS.iter().position(|bound| secs <= *bound) {
            self.buckets[index] += 1;
        }
        self.count += 1;
        self.sum_micros = self
            .sum_micros
            .saturating_add(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }
}

/// The figures, shared between the dispatcher and the `/metrics` handler.
#[derive(Debug, Default)]
pub struct TaskGauges {
    figures: Mutex<Option<TaskFigures>>,
}

impl TaskGauges {
    /// The latest figures; `None` while this process's dispatcher does not act.
    pub fn latest(&self) -> Option<TaskFigures> {
        self.figures.lock().expect("not poisoned").clone()
    }

    /// Changes the figures (starting from empty ones when this replica has just begun acting).
    pub fn update(&self, change: impl FnOnce(&mut TaskFigures)) {
        let mut figures = self.figures.lock().expect("not poisoned");
        change(figures.get_or_insert_with(TaskFigures::default));
    }

    /// This replica stopped acting: it reports nothing.
    pub fn clear(&self) {
        *self.figures.lock().expect("not poisoned") = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latency_lands_in_the_first_bucket_that_holds_it() {
        let mut histogram = Histogram::default();
        histogram.observe(Duration::from_micros(800));
        histogram.observe(Duration::from_millis(15));
        histogram.observe(Duration::from_secs(120));
        assert_eq!(histogram.buckets[0], 1);
        assert_eq!(histogram.buckets[4], 1);
        assert_eq!(histogram.buckets.iter().sum::<u64>(), 2);
        assert_eq!(histogram.count, 3);
        assert_eq!(histogram.sum_micros, 800 + 15_000 + 120_000_000);
    }
}
