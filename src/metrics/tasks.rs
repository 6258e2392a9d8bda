//! Task figures of this process's dispatcher, for `/metrics`: written by the dispatcher while it
//! acts, read at each scrape. Only the acting replica has figures (a standby shows none), so a
//! scrape of every replica gives one set.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// How attempts ended, the label values of `acc_task_attempts_total`.
pub const OUTCOMES: [&str; 4] = ["succeeded", "failed", "expired", "cancelled"];

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
