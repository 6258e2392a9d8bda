//! Load limits of the HTTP door, all cheap on the hot path:
//!
//! - a token bucket per agent ([`Limits::admit_agent`]): an agent over its rate gets 429
//!   `RATE_LIMITED` with `Retry-After`, and other agents do not notice;
//! - a token bucket of failed authentications per source address ([`Limits::auth_blocked`],
//!   [`Limits::auth_failed`]): an address that keeps presenting bad tokens is answered 429 before
//!   its tokens are even looked at;
//! - a global cap on requests in flight ([`shed`]): past it, requests are refused at once with 503
//!   `OVERLOADED` instead of queueing without bound (memory stays flat when the bus is slow).
//!
//! Every refusal that tells a client to come back later (429, 503) is counted by code
//! ([`Refusals`], shown by `/health`), so a full stream or a shedding door is visible at once.
//!
//! Buckets live in a few mutex-guarded shards keyed by a hash, so concurrent requests of different
//! agents rarely contend, a lookup of a known key allocates nothing, and each critical section is a
//! hash-map lookup and a few float operations.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::AppState;
use super::error::{ApiError, RefusalCode};

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
}

/// The limiters of one HTTP door.
pub struct Limits {
    per_agent: Option<Buckets<Box<str>>>,
    auth_failures: Buckets<IpAddr>,
    in_flight: Arc<Semaphore>,
    /// Refusals answered so far, by code.
    pub refusals: Refusals,
}

/// Counts of the answers that mean "not now": the operator's signal that the bus is down or
/// full, or that the door is shedding or limiting.
#[derive(Debug, Default)]
pub struct Refusals {
    pub bus_unavailable: AtomicU64,
    pub stream_full: AtomicU64,
    pub overloaded: AtomicU64,
    pub rate_limited: AtomicU64,
    pub shutting_down: AtomicU64,
}

impl Refusals {
    fn count(&self, code: &str) {
        let counter = match code {
            "BUS_UNAVAILABLE" => &self.bus_unavailable,
            "STREAM_FULL" => &self.stream_full,
            "OVERLOADED" => &self.overloaded,
            "RATE_LIMITED" => &self.rate_limited,
            "SHUTTING_DOWN" => &self.shutting_down,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts as JSON, for `/health`.
    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "bus_unavailable": get(&self.bus_unavailable),
            "stream_full": get(&self.stream_full),
            "overloaded": get(&self.overloaded),
            "rate_limited": get(&self.rate_limited),
            "shutting_down": get(&self.shutting_down),
        })
    }
}

impl Limits {
    pub fn new(settings: &LimitSettings) -> Self {
        Self {
            per_agent: settings
                .per_agent_rate
                .map(|rate| Buckets::new(rate, f64::from(settings.per_agent_burst))),
            auth_failures: Buckets::new(
                1.0 / settings.auth_failure_interval.as_secs_f64(),
                f64::from(settings.auth_failure_burst),
            ),
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
            refusals: Refusals::default(),
        }
    }

    /// Takes one request from `agent`'s bucket, or says how long to wait.
    pub fn admit_agent(&self, agent: &str) -> Result<(), ApiError> {
        match &self.per_agent {
            None => Ok(()),
            Some(buckets) => buckets
                .take_str(agent)
                .map_err(|wait| ApiError::RateLimited(retry_after_secs(wait))),
        }
    }

    /// Refuses an address that has used up its failed authentications.
    pub fn auth_blocked(&self, addr: IpAddr) -> Result<(), ApiError> {
        self.auth_failures
            .check(&addr)
            .map_err(|wait| ApiError::RateLimited(retry_after_secs(wait)))
    }

    /// Counts one failed authentication from `addr`.
    pub fn auth_failed(&self, addr: IpAddr) {
        let _ = self.auth_failures.take(&addr);
    }
}

/// Whole seconds, rounded up, at least 1: what `Retry-After` can say.
fn retry_after_secs(wait: Duration) -> u32 {
    (wait.as_secs_f64().ceil() as u32).max(1)
}

/// Middleware: holds one in-flight permit for the whole request, or refuses at once with 503
/// `OVERLOADED`; counts refusals by code. Health probes are not counted against the cap, so an
/// overloaded door still answers them.
pub async fn shed(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if request.uri().path().starts_with("/health") {
        return next.run(request).await;
    }
    let response = match state.limits.in_flight.clone().try_acquire_owned() {
        Ok(permit) => {
            let response = next.run(request).await;
            drop(permit);
            response
        }
        Err(_) => ApiError::Overloaded.into_response(),
    };
    if let Some(RefusalCode(code)) = response.extensions().get::<RefusalCode>() {
        state.limits.refusals.count(code);
    }
    response
}

const SHARDS: usize = 16;
/// Above this many keys a shard forgets buckets that have refilled (idle keys), so that many
/// distinct callers cannot grow memory without bound.
const SHARD_SOFT_CAP: usize = 4096;

struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets keyed by `K`, in shards.
struct Buckets<K> {
    shards: Box<[Mutex<HashMap<K, Bucket>>]>,
    hasher: RandomState,
    rate: f64,
    burst: f64,
}

impl<K: Hash + Eq> Buckets<K> {
    fn new(rate: f64, burst: f64) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            rate,
            burst: burst.max(1.0),
        }
    }

    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> &Mutex<HashMap<K, Bucket>> {
        let index = self.hasher.hash_one(key) as usize % SHARDS;
        &self.shards[index]
    }

    /// Refills `bucket` up to now; returns the tokens it holds.
    fn refill(&self, bucket: &mut Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.updated = now;
        bucket.tokens
    }

    fn wait_for_one(&self, tokens: f64) -> Duration {
        Duration::from_secs_f64(((1.0 - tokens) / self.rate).max(0.0))
    }

    /// Takes a token for `key`, creating its (full) bucket on first sight.
    fn take(&self, key: &K) -> Result<(), Duration>
    where
        K: Clone,
    {
        let now = Instant::now();
        let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = shard.get_mut(key) {
            return self.take_from(bucket, now);
        }
        self.insert(&mut shard, key.clone(), now);
        Ok(())
    }

    /// Whether `key` has a token left, without taking it.
    fn check(&self, key: &K) -> Result<(), Duration> {
        let now = Instant::now();
        let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        match shard.get_mut(key) {
            Some(bucket) => {
                let tokens = self.refill(bucket, now);
                if tokens >= 1.0 {
                    Ok(())
                } else {
                    Err(self.wait_for_one(tokens))
                }
            }
            None => Ok(()),
        }
    }

    fn take_from(&self, bucket: &mut Bucket, now: Instant) -> Result<(), Duration> {
        let tokens = self.refill(bucket, now);
        if tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.wait_for_one(tokens))
        }
    }

    fn insert(&self, shard: &mut HashMap<K, Bucket>, key: K, now: Instant) {
        if shard.len() >= SHARD_SOFT_CAP {
            let (rate, burst) = (self.rate, self.burst);
            shard.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * rate < burst
            });
        }
        shard.insert(
            key,
            Bucket {
                tokens: self.burst - 1.0,
                updated: now,
            },
        );
    }
}

impl Buckets<Box<str>> {
    /// [`Self::take`] by `&str`: no allocation unless the key is new.
    fn take_str(&self, key: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = shard.get_mut(key) {
            return self.take_from(bucket, now);
        }
        self.insert(&mut shard, Box::from(key), now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refuses_with_the_wait() {
        let buckets = Buckets::<Box<str>>::new(10.0, 5.0);
        for _ in 0..5 {
            buckets.take_str("a").unwrap();
        }
        let wait = buckets.take_str("a").unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // Another key has its own bucket.
        buckets.take_str("b").unwrap();
        std::thread::sleep(Duration::from_millis(120));
        buckets.take_str("a").unwrap();
    }

    #[test]
    fn check_does_not_take() {
        let buckets = Buckets::<IpAddr>::new(0.001, 2.0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        buckets.check(&ip).unwrap();
        buckets.take(&ip).unwrap();
        buckets.check(&ip).unwrap();
        buckets.take(&ip).unwrap();
        assert!(buckets.check(&ip).is_err());
        assert!(buckets.check(&"10.0.0.2".parse().unwrap()).is_ok());
    }

    #[test]
    fn idle_keys_are_forgotten_past_the_soft_cap() {
        let buckets = Buckets::<u32>::new(1_000_000.0, 1.0);
        for key in 0..(SHARD_SOFT_CAP * SHARDS * 2) as u32 {
            let _ = buckets.take(&key);
        }
        let total: usize = buckets.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(
            total <= SHARD_SOFT_CAP * SHARDS + SHARDS,
            "{total} keys kept"
        );
    }

    #[test]
    fn retry_after_is_whole_seconds_at_least_one() {
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
    }
}
