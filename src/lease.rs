//! Single-writer roles: only one replica of a role acts at a time, the holder of the role's
//! lease key in a KV bucket (the alerting worker: `lease` in `acc_alerting`; the task
//! dispatcher: `lease.dispatcher` in `acc_tasks`). The holder renews it (compare-and-set on the key's revision) well within its TTL;
//! another replica takes it once it has expired, also by compare-and-set, so two replicas
//! racing for it cannot both win. A replica stopping gracefully releases it at once.
//!
//! Expiry compares wall clocks of the replicas: keep them in sync (NTP), and keep the TTL well
//! above the skew.
//!
//! Fencing: the holder also keeps a local deadline on its monotonic clock — when its last
//! successful renewal *started*, plus the TTL, minus a margin ([`Fence`]). Past it (renewals
//! failing, the process stalled), [`Lease::acting`] is false and the worker sends and stores
//! nothing until a renewal succeeds, because another replica may have taken over by then.

use std::time::Duration;

use async_nats::jetstream::kv::{Operation, Store};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The key of the alerting worker's lease in the alerting bucket.
pub const KEY: &str = "lease";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub holder: String,
    pub expires_at: DateTime<Utc>,
}

/// The share of the TTL kept as a safety margin before the local deadline.
const MARGIN_DIVISOR: u32 = 4;

/// The local deadline of a held lease, on the monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fence {
    deadline: Option<tokio::time::Instant>,
}

impl Fence {
    /// A renewal that started at `started` succeeded.
    pub fn renewed(&mut self, started: tokio::time::Instant, ttl: Duration) {
        self.deadline = Some(started + ttl - ttl / MARGIN_DIVISOR);
    }

    pub fn lost(&mut self) {
        self.deadline = None;
    }

    /// True while the lease is surely still ours at `now`.
    pub fn allows(&self, now: tokio::time::Instant) -> bool {
        self.deadline.is_some_and(|deadline| now < deadline)
    }
}

/// This replica's view of the lease.
pub struct Lease {
    kv: Store,
    /// The key the lease lives under.
    key: &'static str,
    /// The role it elects, for the log (`alerting`, `dispatcher`).
    role: &'static str,
    holder: String,
    ttl: Duration,
    held: bool,
    fence: Fence,
    /// When another holder's lease runs out, as last read: a standby tries again then
    /// rather than at its next regular turn.
    others_expire: Option<DateTime<Utc>>,
}

impl Lease {
    /// The lease of `role` under `key` in `kv`, as seen by `holder`.
    pub fn new(
        kv: Store,
        key: &'static str,
        role: &'static str,
        holder: String,
        ttl: Duration,
    ) -> Self {
        Self {
            kv,
            key,
            role,
            holder,
            ttl,
            held: false,
            fence: Fence::default(),
            others_expire: None,
        }
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Takes or renews the lease; true while this replica holds it.
    pub async fn acquire(&mut self) -> bool {
        let started = tokio::time::Instant::now();
        let held = self.try_acquire().await.unwrap_or_else(|err| {
            tracing::warn!(role = self.role, error = %err, "lease: cannot reach the bucket");
            false
        });
        if held != self.held {
            if held {
                tracing::info!(role = self.role, holder = %self.holder, "lease taken: this replica acts");
            } else {
                tracing::info!(role = self.role, holder = %self.holder, "lease lost: this replica stands by");
            }
        }
        self.held = held;
        if held {
            self.fence.renewed(started, self.ttl);
        } else {
            self.fence.lost();
        }
        held
    }

    /// How long a standby waits before its next [`Lease::acquire`]: `every`, or less when
    /// the other holder's lease runs out sooner (so a successor takes over about one TTL
    /// after the holder's last renewal, not up to a further `every` later).
    pub fn standby_wait(&self, every: Duration) -> Duration {
        standby_wait(self.others_expire, Utc::now(), every)
    }

    /// True while this replica may act: it holds the lease and its local deadline has not
    /// passed. Checked before every send and store.
    pub fn acting(&self) -> bool {
        self.held && self.fence.allows(tokio::time::Instant::now())
    }

    async fn try_acquire(&mut self) -> Result<bool, async_nats::Error> {
        self.others_expire = None;
        let now = Utc::now();
        let record = LeaseRecord {
            holder: self.holder.clone(),
            expires_at: now + chrono::Duration::from_std(self.ttl).unwrap_or_default(),
        };
        let value = Bytes::from(serde_json::to_vec(&record)?);
        let entry = self.kv.entry(self.key).await?;
        let current = entry
            .as_ref()
            .filter(|e| e.operation == Operation::Put)
            .and_then(|e| serde_json::from_slice::<LeaseRecord>(&e.value).ok());
        match (entry, current) {
            (None, _) => Ok(self.kv.create(self.key, value).await.is_ok()),
            (Some(_), Some(current))
                if current.holder != self.holder && current.expires_at > now =>
            {
                self.others_expire = Some(current.expires_at);
                Ok(false)
            }
            (Some(entry), _) => Ok(self
                .kv
                .update(self.key, value, entry.revision)
                .await
                .is_ok()),
        }
    }

    /// Gives the lease up (graceful stop), so a standby takes over without waiting for the TTL.
    pub async fn release(&mut self) {
        if !self.held {
            return;
        }
        self.held = false;
        self.fence.lost();
        let Ok(Some(entry)) = self.kv.entry(self.key).await else {
            return;
        };
        let ours = serde_json::from_slice::<LeaseRecord>(&entry.value)
            .is_ok_and(|r| r.holder == self.holder);
        if ours {
            let released = LeaseRecord {
                holder: self.holder.clone(),
                expires_at: Utc::now(),
            };
            if let Ok(value) = serde_json::to_vec(&released) {
                let _ = self.kv.update(self.key, value.into(), entry.revision).await;
            }
        }
    }
}

/// The wait of [`Lease::standby_wait`] at `now`: just past the other holder's expiry (so the
/// compare with the record's clock has passed by then), at most `every`.
fn standby_wait(
    others_expire: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    every: Duration,
) -> Duration {
    let Some(expires) = others_expire else {
        return every;
    };
    let until = (expires - now).to_std().unwrap_or_default();
    (until + Duration::from_millis(20)).min(every)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_tries_again_just_after_the_holders_lease_runs_out() {
        let every = Duration::from_millis(666);
        let now = Utc::now();
        assert_eq!(standby_wait(None, now, every), every, "no holder seen");
        let soon = now + chrono::Duration::milliseconds(100);
        assert_eq!(
            standby_wait(Some(soon), now, every),
            Duration::from_millis(120)
        );
        let late = now + chrono::Duration::seconds(5);
        assert_eq!(
            standby_wait(Some(late), now, every),
            every,
            "never past a regular turn"
        );
        let past = now - chrono::Duration::seconds(1);
        assert_eq!(
            standby_wait(Some(past), now, every),
            Duration::from_millis(20)
        );
    }

    #[test]
    fn the_fence_closes_before_the_ttl_runs_out() {
        let ttl = Duration::from_secs(8);
        let start = tokio::time::Instant::now();
        let mut fence = Fence::default();
        assert!(!fence.allows(start), "never renewed");
        fence.renewed(start, ttl);
        assert!(fence.allows(start + Duration::from_secs(5)));
        assert!(
            !fence.allows(start + Duration::from_secs(6)),
            "past TTL minus the margin"
        );
        fence.renewed(start + Duration::from_secs(5), ttl);
        assert!(fence.allows(start + Duration::from_secs(10)));
        fence.lost();
        assert!(!fence.allows(start + Duration::from_secs(10)));
    }
}
