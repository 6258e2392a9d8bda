//! The token bucket, the one mechanism behind every rate the doors enforce: requests per agent,
//! failed authentications per address, the NATS door's rejections per caller.
//!
//! Buckets live in a few mutex-guarded shards keyed by a hash, so concurrent callers rarely
//! contend, a lookup of a known key allocates nothing, and each critical section is a hash-map
//! lookup and a few float operations. Past a soft cap per shard, buckets that have refilled
//! (idle keys) are forgotten, so many distinct callers cannot grow memory without bound.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

// aHash with keys drawn per process: as hard as SipHash to aim keys at one bucket with, at a
// fraction of its cost on the two look-ups each request makes.
use ahash::RandomState;

const SHARDS: usize = 16;
/// Above this many keys a shard forgets buckets that have refilled.
pub const SHARD_SOFT_CAP: usize = 4096;

struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// One shard: buckets by owned key.
type Shard<K> = Mutex<HashMap<K, Bucket, RandomState>>;

/// Token buckets keyed by `Q` (stored as its owned form: `str` keys are kept as `String`),
/// refilled by `rate` tokens per second up to `burst`. A key seen for the first time has a full
/// bucket.
pub struct Buckets<Q: ?Sized + ToOwned> {
    shards: Box<[Shard<Q::Owned>]>,
    hasher: RandomState,
    rate: f64,
    burst: f64,
}

impl<Q> Buckets<Q>
where
    Q: ?Sized + Hash + Eq + ToOwned,
    Q::Owned: Hash + Eq + Borrow<Q>,
{
    /// `rate` tokens per second, at most `burst` (at least 1) held.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            rate,
            burst: burst.max(1.0),
        }
    }

    /// One token per `interval`, at most `burst` held.
    pub fn per_interval(interval: Duration, burst: u32) -> Self {
        Self::new(1.0 / interval.as_secs_f64(), f64::from(burst))
    }

    fn shard(&self, key: &Q) -> &Shard<Q::Owned> {
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

    /// Takes a token for `key`, or says how long until one is there. Allocates only for a key
    /// seen for the first time.
    pub fn take(&self, key: &Q) -> Result<(), Duration> {
        self.take_n(key, 1.0)
    }

    /// Takes `n` tokens for `key` (a byte quota charges a message's size), or says how long
    /// until they are there; more than the burst is never granted.
    pub fn take_n(&self, key: &Q, n: f64) -> Result<(), Duration> {
        if n > self.burst {
            return Err(Duration::from_secs_f64(self.burst / self.rate));
        }
        let now = Instant::now();
        let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = shard.get_mut(key) {
            let tokens = self.refill(bucket, now);
            if tokens >= n {
                bucket.tokens -= n;
                return Ok(());
            }
            return Err(Duration::from_secs_f64(((n - tokens) / self.rate).max(0.0)));
        }
        if shard.len() >= SHARD_SOFT_CAP {
            let (rate, burst) = (self.rate, self.burst);
            shard.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * rate < burst
            });
        }
        shard.insert(
            key.to_owned(),
            Bucket {
                tokens: self.burst - n,
                updated: now,
            },
        );
        Ok(())
    }

    /// Whether `key` has a token left, without taking it.
    pub fn check(&self, key: &Q) -> Result<(), Duration> {
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

    /// Keys held, over all shards.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The per-agent request rate both doors apply: one bucket per agent, shared by the HTTP door
/// and the NATS door of a process, so an agent cannot double its rate by using both.
pub struct AgentRate(Option<Buckets<str>>);

impl AgentRate {
    /// `rate` requests per second per agent with bursts of `burst`; `None` disables the limit.
    pub fn new(rate: Option<f64>, burst: u32) -> Self {
        Self(rate.map(|rate| Buckets::new(rate, f64::from(burst))))
    }

    /// Takes one request from `agent`'s bucket, or refuses with 429 `RATE_LIMITED` and how long
    /// to wait.
    pub fn admit(&self, agent: &str) -> Result<(), super::Refusal> {
        match &self.0 {
            None => Ok(()),
            Some(buckets) => buckets
                .take(agent)
                .map_err(|wait| super::Refusal::rate_limited(retry_after_secs(wait))),
        }
    }
}

/// Whole seconds, rounded up, at least 1: what `Retry-After` can say.
pub fn retry_after_secs(wait: Duration) -> u32 {
    (wait.as_secs_f64().ceil() as u32).max(1)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refuses_with_the_wait() {
        let buckets = Buckets::<str>::new(10.0, 5.0);
        for _ in 0..5 {
            buckets.take("a").unwrap();
        }
        let wait = buckets.take("a").unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // Another key has its own bucket.
        buckets.take("b").unwrap();
        std::thread::sleep(Duration::from_millis(120));
        buckets.take("a").unwrap();
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
        let total = buckets.len();
        assert!(
            total <= SHARD_SOFT_CAP * SHARDS + SHARDS,
            "{total} keys kept"
        );
    }

    #[test]
    fn a_caller_runs_out_of_tokens_and_earns_them_back() {
        let buckets = Buckets::<str>::per_interval(Duration::from_millis(50), 2);
        buckets.check("a").unwrap();
        buckets.take("a").unwrap();
        buckets.check("a").unwrap();
        buckets.take("a").unwrap();
        assert!(buckets.check("a").is_err(), "burst of 2 spent");
        assert!(buckets.check("b").is_ok(), "buckets are per caller");
        std::thread::sleep(Duration::from_millis(60));
        assert!(buckets.check("a").is_ok(), "one token earned back");
    }

    #[test]
    fn retry_after_is_whole_seconds_at_least_one() {
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
    }
}
