//! Only one alerting replica acts at a time: the holder of the `lease` key in the alerting
//! bucket. The holder renews it (compare-and-set on the key's revision) well within its TTL;
//! another replica takes it once it has expired, also by compare-and-set, so two replicas
//! racing for it cannot both win. A replica stopping gracefully releases it at once.
//!
//! Expiry compares wall clocks of the replicas: keep them in sync (NTP), and keep the TTL well
//! above the skew.

use std::time::Duration;

use async_nats::jetstream::kv::{Operation, Store};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The key of the lease in the alerting bucket.
pub const KEY: &str = "lease";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub holder: String,
    pub expires_at: DateTime<Utc>,
}

/// This replica's view of the lease.
pub struct Lease {
    kv: Store,
    holder: String,
    ttl: Duration,
    held: bool,
}

impl Lease {
    pub fn new(kv: Store, holder: String, ttl: Duration) -> Self {
        Self {
            kv,
            holder,
            ttl,
            held: false,
        }
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Takes or renews the lease; true while this replica holds it.
    pub async fn acquire(&mut self) -> bool {
        let held = self.try_acquire().await.unwrap_or_else(|err| {
            tracing::warn!(error = %err, "alerting lease: cannot reach the bucket");
            false
        });
        if held != self.held {
            if held {
                tracing::info!(holder = %self.holder, "alerting lease taken: this replica acts");
            } else {
                tracing::info!(holder = %self.holder, "alerting lease lost: this replica stands by");
            }
        }
        self.held = held;
        held
    }

    async fn try_acquire(&self) -> Result<bool, async_nats::Error> {
        let now = Utc::now();
        let record = LeaseRecord {
            holder: self.holder.clone(),
            expires_at: now + chrono::Duration::from_std(self.ttl).unwrap_or_default(),
        };
        let value = Bytes::from(serde_json::to_vec(&record)?);
        let entry = self.kv.entry(KEY).await?;
        let current = entry
            .as_ref()
            .filter(|e| e.operation == Operation::Put)
            .and_then(|e| serde_json::from_slice::<LeaseRecord>(&e.value).ok());
        match (entry, current) {
            (None, _) => Ok(self.kv.create(KEY, value).await.is_ok()),
            (Some(_), Some(current))
                if current.holder != self.holder && current.expires_at > now =>
            {
                Ok(false)
            }
            (Some(entry), _) => Ok(self.kv.update(KEY, value, entry.revision).await.is_ok()),
        }
    }

    /// Gives the lease up (graceful stop), so a standby takes over without waiting for the TTL.
    pub async fn release(&mut self) {
        if !self.held {
            return;
        }
        self.held = false;
        let Ok(Some(entry)) = self.kv.entry(KEY).await else {
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
                let _ = self.kv.update(KEY, value.into(), entry.revision).await;
            }
        }
    }
}
