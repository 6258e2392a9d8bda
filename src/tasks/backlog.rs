//! Backpressure on submit: at most `TASK_MAX_QUEUED_PER_TENANT` queued tasks per tenant; over
//! it a submission is refused with 429 `QUEUE_FULL` and `Retry-After`, never dropped.
//!
//! A submission is stored on JetStream by whichever replica took the request, before the
//! dispatcher sees it, so no one place knows the exact count at submit time. Instead:
//! - the acting dispatcher counts queued tasks per tenant (its [`TaskQueue`]) and writes
//!   [`Backlog`] to the `backlog.tenants` key of `acc_tasks` when it changed, at most every
//!   [`PUBLISH_EVERY`], with `taken_in`: the highest submission sequence it has queued;
//! - each ingress replica ([`BacklogView`]) reads that key at most every [`REFRESH_EVERY`],
//!   and adds the submissions *it* stored since (sequence above `taken_in`), which the
//!   dispatcher had not counted yet.
//!
//! How loose this is, and why it is bounded: one replica alone sees its own submissions at once,
//! so it can pass the cap only by the submissions for the tenant that are checked concurrently
//! (its in-flight limit). With R replicas, a tenant can also get what the other R − 1 replicas
//! store for it in one publication's lag (≤ `PUBLISH_EVERY` + `REFRESH_EVERY` + the
//! dispatcher's take-in delay). A tenant's queue never grows past the cap by more than that,
//! and never without limit: each replica alone refuses past the cap.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::jetstream::kv::Store;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::queue::TaskQueue;
use crate::bus::subjects;
use crate::contract::{Code, Refusal};

/// Default of `TASK_MAX_QUEUED_PER_TENANT`.
pub const DEFAULT_MAX_QUEUED_PER_TENANT: u32 = 100_000;
/// The dispatcher writes changed counts at most this often.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(200);
/// An ingress rereads the counts at most this often.
pub const REFRESH_EVERY: Duration = Duration::from_millis(200);
/// What a refused submitter is told to wait.
const RETRY_AFTER_SECS: u32 = 1;
/// The most tenants [`Backlog`] names (those with the most queued): the value stays far below
/// the bus's max payload however many tenants there are.
const MAX_LISTED: usize = 1000;

/// The value of `backlog.tenants`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backlog {
    /// The highest submission sequence the dispatcher had queued when it counted.
    pub taken_in: u64,
    /// Queued tasks per tenant, for the [`MAX_LISTED`] tenants with the most.
    pub tenants: BTreeMap<String, usize>,
    /// The most any tenant not listed has queued (0 when every tenant with tasks is listed).
    #[serde(default)]
    pub others: usize,
}

impl Backlog {
    /// The counts of `per_tenant`, listing the tenants with the most.
    pub fn of(per_tenant: &HashMap<String, usize>, taken_in: u64) -> Self {
        let mut counts: Vec<(&String, usize)> = per_tenant.iter().map(|(t, n)| (t, *n)).collect();
        let mut others = 0;
        if counts.len() > MAX_LISTED {
            counts.sort_unstable_by_key(|(_, n)| std::cmp::Reverse(*n));
            others = counts[MAX_LISTED].1;
            counts.truncate(MAX_LISTED);
        }
        Self {
            taken_in,
            tenants: counts.into_iter().map(|(t, n)| (t.clone(), n)).collect(),
            others,
        }
    }

    /// What `tenant` had queued, at most.
    pub fn queued(&self, tenant: &str) -> usize {
        self.tenants.get(tenant).copied().unwrap_or(self.others)
    }
}

/// The dispatcher's side: counts what it has taken in and writes the counts when they change.
#[derive(Debug, Default)]
pub struct BacklogCounts {
    taken_in: u64,
    written: Option<Backlog>,
    next_at: Option<Instant>,
}

impl BacklogCounts {
    /// A submission with this stream sequence is in the queue (or past it).
    pub fn taken_in(&mut self, seq: u64) {
        self.taken_in = self.taken_in.max(seq);
    }

    /// Whether the counts last written are what `queue` holds now: nothing to publish.
    pub fn settled(&self, queue: &TaskQueue) -> bool {
        self.written
            .as_ref()
            .is_some_and(|written| *written == Backlog::of(queue.per_tenant(), self.taken_in))
    }

    /// Writes the counts if they changed and the last write is [`PUBLISH_EVERY`] old.
    pub async fn publish(&mut self, kv: &Store, queue: &TaskQueue, timeout: Duration) {
        let now = Instant::now();
        if self.next_at.is_some_and(|at| now < at) {
            return;
        }
        self.next_at = Some(now + PUBLISH_EVERY);
        let backlog = Backlog::of(queue.per_tenant(), self.taken_in);
        if self.written.as_ref() == Some(&backlog) {
            return;
        }
        let value = Bytes::from(serde_json::to_vec(&backlog).expect("counts serialize"));
        match tokio::time::timeout(timeout, kv.put(subjects::TENANT_BACKLOG_KEY, value)).await {
            Ok(Ok(_)) => self.written = Some(backlog),
            Ok(Err(err)) => tracing::debug!(error = %err, "tenant backlog not written"),
            Err(_) => tracing::debug!("tenant backlog write timed out"),
        }
    }
}

/// An ingress replica's view of the counts, for checking the cap before a submission.
#[derive(Debug)]
pub struct BacklogView {
    kv: Store,
    /// `TASK_MAX_QUEUED_PER_TENANT`; 0 is no cap.
    cap: u32,
    timeout: Duration,
    /// Held only for map updates, never across a read from the bus.
    state: std::sync::Mutex<ViewState>,
    /// Held by the one submission that rereads the counts; the others go on with the last.
    refreshing: Mutex<()>,
}

#[derive(Debug, Default)]
struct ViewState {
    backlog: Backlog,
    read_at: Option<Instant>,
    /// Sequences of submissions this replica stored, per tenant, not yet in `backlog`.
    own: HashMap<String, Vec<u64>>,
}

impl BacklogView {
    pub fn new(kv: Store, cap: u32, timeout: Duration) -> Self {
        Self {
            kv,
            cap,
            timeout,
            state: std::sync::Mutex::new(ViewState::default()),
            refreshing: Mutex::new(()),
        }
    }

    /// Refuses with 429 `QUEUE_FULL` when `tenant` has the cap's worth of tasks queued.
    pub async fn check(&self, tenant: &str) -> Result<(), Refusal> {
        if self.cap == 0 {
            return Ok(());
        }
        let stale = {
            let state = self.state.lock().expect("not poisoned");
            state.read_at.is_none_or(|at| at.elapsed() >= REFRESH_EVERY)
        };
        if stale {
            if let Ok(_refreshing) = self.refreshing.try_lock() {
                let backlog = self.read().await;
                let mut state = self.state.lock().expect("not poisoned");
                state.read_at = Some(Instant::now());
                if let Some(backlog) = backlog {
                    let taken_in = backlog.taken_in;
                    state.backlog = backlog;
                    state.own.retain(|_, seqs| {
                        seqs.retain(|seq| *seq > taken_in);
                        !seqs.is_empty()
                    });
                }
            }
        }
        let state = self.state.lock().expect("not poisoned");
        let counted = state.backlog.queued(tenant);
        let own = state.own.get(tenant).map_or(0, Vec::len);
        let queued = counted + own;
        if queued >= self.cap as usize {
            return Err(Refusal::new(Code::QueueFull)
                .with_details(format!(
                    "tenant {tenant} has {queued} queued tasks; the cap is {}",
                    self.cap
                ))
                .with_retry_after(RETRY_AFTER_SECS));
        }
        Ok(())
    }

    /// This replica stored a new submission for `tenant` at `seq`.
    pub fn stored(&self, tenant: &str, seq: u64) {
        if self.cap == 0 {
            return;
        }
        let mut state = self.state.lock().expect("not poisoned");
        if seq > state.backlog.taken_in {
            state.own.entry(tenant.to_owned()).or_default().push(seq);
        }
    }

    async fn read(&self) -> Option<Backlog> {
        let entry = tokio::time::timeout(self.timeout, self.kv.get(subjects::TENANT_BACKLOG_KEY));
        match entry.await {
            Ok(Ok(Some(value))) => serde_json::from_slice(&value).ok(),
            Ok(Ok(None)) => None,
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "tenant backlog not read; using the last one");
                None
            }
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_listed_tenants_the_others_count_as_the_largest_left_out() {
        let mut per_tenant: HashMap<String, usize> = (0..MAX_LISTED + 5)
            .map(|n| (format!("t{n}"), n + 1))
            .collect();
        per_tenant.insert("big".into(), 10_000);
        let backlog = Backlog::of(&per_tenant, 7);
        assert_eq!(backlog.tenants.len(), MAX_LISTED);
        assert_eq!(backlog.queued("big"), 10_000);
        // Listed: the 999 largest of t0..t1004 and "big"; left out: t0..t5 (1 to 6 queued).
        assert_eq!(backlog.others, 6);
        assert_eq!(backlog.queued("t0"), 6);
        assert_eq!(backlog.queued("nobody"), 6);
        let few = Backlog::of(&HashMap::from([("a".to_owned(), 2)]), 1);
        assert_eq!((few.queued("a"), few.queued("b")), (2, 0));
    }
}
