//! The introspection cache: answers of the authorization server, keyed by a SHA-256 of the
//! token (the token itself is never kept past the request), with one call in flight per token.
//!
//! - **Positive entries** hold the [`Caller`] an active token stands for, fresh for
//!   min(`INTROSPECTION_CACHE_TTL`, time to the token's `exp`). Scopes are not checked here:
//!   a cached caller carries its scopes and every request checks them (the cache answers *who*,
//!   the route decides *may*). Past its freshness an entry may still be served, only when the
//!   server cannot be reached, for the stale-if-error window: never past `exp`, never for a
//!   caller holding an admin scope. Bounded by an entry cap: when full, expired entries are
//!   swept, and if none is, the answer is served uncached.
//! - **Negative entries** remember a refusal (inactive, wrong audience, …) for a short TTL, so
//!   a client retrying a bad token does not cost a call each time. Bounded by their own cap:
//!   entries are kept in insertion order, which is also their expiry order (one TTL for all), and
//!   the oldest goes first when full. So 100,000 distinct garbage tokens never hold more than the
//!   cap.
//! - **Single flight**: the first request for a token not in the cache starts the call; every
//!   other request for the same token awaits that one call's answer. A failed call is shared by
//!   the requests that waited on it, and not cached: the next request tries again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::{AuthError, Caller};

/// A token's cache key: its SHA-256. The token cannot be recovered from it.
pub type Key = [u8; 32];

pub fn key(token: &str) -> Key {
    Sha256::digest(token.as_bytes()).into()
}

/// What the authorization server's answer, or its absence, comes to.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Active, for this caller, fresh until `fresh_until`, never valid past `expires`.
    Active {
        caller: Caller,
        fresh_until: Instant,
        expires: Option<Instant>,
    },
    /// A definite refusal (inactive, wrong audience, unusable caller): 401, cached briefly.
    Refused(AuthError),
    /// No usable answer (down, slow, garbage): not cached.
    Unavailable,
}

/// Limits of the cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Most positive entries kept.
    pub max_entries: usize,
    /// How long a refusal is remembered.
    pub negative_ttl: Duration,
    /// Most refusals remembered.
    pub max_negative: usize,
    /// How long past its freshness a positive entry may be served while the server is
    /// unreachable; zero: never.
    pub stale_if_error: Duration,
}

struct Positive {
    caller: Caller,
    fresh_until: Instant,
    /// The token's `exp`, if it had one: nothing is served past it.
    expires: Option<Instant>,
}

impl Positive {
    /// Until when this entry may be kept at all (for stale use, or fresh).
    fn keep_until(&self, stale: Duration) -> Instant {
        let stale_until = if stale.is_zero() || self.caller.reads_all() {
            self.fresh_until
        } else {
            self.fresh_until + stale
        };
        match self.expires {
            Some(exp) => stale_until.min(exp),
            None => stale_until,
        }
    }
}

struct Negative {
    entries: HashMap<Key, (AuthError, Instant)>,
    /// Insertion order, with the insertion time to tell a re-inserted key from its old place.
    order: VecDeque<(Key, Instant)>,
}

/// A cache lookup.
pub enum Lookup {
    /// A fresh positive answer.
    Fresh(Caller),
    /// A remembered refusal.
    Refused(AuthError),
    /// Nothing fresh: introspect. `stale` is what may be served if that fails.
    Miss { stale: Option<Caller> },
}

/// The call in flight for one token, shared by every request that carries it.
pub type Flight = Arc<OnceCell<Verdict>>;

pub struct TokenCache {
    limits: CacheLimits,
    positive: Mutex<HashMap<Key, Positive>>,
    negative: Mutex<Negative>,
    flights: Mutex<HashMap<Key, Flight>>,
}

impl TokenCache {
    pub fn new(limits: CacheLimits) -> Self {
        Self {
            limits,
            positive: Mutex::new(HashMap::new()),
            negative: Mutex::new(Negative {
                entries: HashMap::new(),
                order: VecDeque::new(),
            }),
            flights: Mutex::new(HashMap::new()),
        }
    }

    pub fn lookup(&self, key: &Key, now: Instant) -> Lookup {
        {
            let mut positive = self.positive.lock().expect("cache lock");
            if let Some(entry) = positive.get(key) {
                if now < entry.fresh_until && entry.expires.is_none_or(|exp| now < exp) {
                    return Lookup::Fresh(entry.caller.clone());
                }
                if now < entry.keep_until(self.limits.stale_if_error) {
                    return Lookup::Miss {
                        stale: Some(entry.caller.clone()),
                    };
                }
                positive.remove(key);
            }
        }
        let negative = self.negative.lock().expect("cache lock");
        match negative.entries.get(key) {
            Some((err, at)) if now.duration_since(*at) < self.limits.negative_ttl => {
                Lookup::Refused(err.clone())
            }
            _ => Lookup::Miss { stale: None },
        }
    }

    /// Stores a verdict (an unavailable one is not stored).
    pub fn store(&self, key: Key, verdict: &Verdict, now: Instant) {
        match verdict {
            Verdict::Active {
                caller,
                fresh_until,
                expires,
            } => {
                let mut positive = self.positive.lock().expect("cache lock");
                if positive.len() >= self.limits.max_entries && !positive.contains_key(&key) {
                    let stale = self.limits.stale_if_error;
                    positive.retain(|_, entry| now < entry.keep_until(stale));
                    if positive.len() >= self.limits.max_entries {
                        return;
                    }
                }
                positive.insert(
                    key,
                    Positive {
                        caller: caller.clone(),
                        fresh_until: *fresh_until,
                        expires: *expires,
                    },
                );
                drop(positive);
                self.negative
                    .lock()
                    .expect("cache lock")
                    .entries
                    .remove(&key);
            }
            Verdict::Refused(err) => {
                if self.limits.max_negative == 0 || self.limits.negative_ttl.is_zero() {
                    return;
                }
                let mut negative = self.negative.lock().expect("cache lock");
                let ttl = self.limits.negative_ttl;
                // Oldest first: drop what expired, then what must go to make room.
                while let Some(&(old, at)) = negative.order.front() {
                    let expired = now.duration_since(at) >= ttl;
                    if !expired && negative.entries.len() < self.limits.max_negative {
                        break;
                    }
                    negative.order.pop_front();
                    if negative.entries.get(&old).is_some_and(|(_, t)| *t == at) {
                        negative.entries.remove(&old);
                    }
                }
                // Duplicates of a re-inserted key may linger in the order: bound it as well.
                while negative.order.len() >= 2 * self.limits.max_negative {
                    if let Some((old, at)) = negative.order.pop_front() {
                        if negative.entries.get(&old).is_some_and(|(_, t)| *t == at) {
                            negative.entries.remove(&old);
                        }
                    }
                }
                negative.entries.insert(key, (err.clone(), now));
                negative.order.push_back((key, now));
                drop(negative);
                self.positive.lock().expect("cache lock").remove(&key);
            }
            Verdict::Unavailable => {}
        }
    }

    /// The flight for `key`: the one in progress, or a new one. `None` when, meanwhile, an
    /// answer arrived in the cache (checked under the flights' lock, where a finished flight
    /// stores its answer before leaving, so no second call starts for a token just answered).
    pub fn flight(&self, key: &Key, now: Instant) -> Result<Flight, Lookup> {
        let mut flights = self.flights.lock().expect("flights lock");
        if let Some(flight) = flights.get(key) {
            return Ok(flight.clone());
        }
        match self.lookup(key, now) {
            found @ (Lookup::Fresh(_) | Lookup::Refused(_)) => Err(found),
            Lookup::Miss { .. } => {
                let flight = Flight::default();
                flights.insert(*key, flight.clone());
                Ok(flight)
            }
        }
    }

    /// Ends `flight` for `key`: stores its verdict, then lets the next request start anew.
    pub fn land(&self, key: &Key, flight: &Flight, now: Instant) {
        if let Some(verdict) = flight.get() {
            self.store(*key, verdict, now);
        }
        let mut flights = self.flights.lock().expect("flights lock");
        if flights.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            flights.remove(key);
        }
    }

    /// Entries held: (positive, negative, in flight).
    pub fn len(&self) -> (usize, usize, usize) {
        (
            self.positive.lock().expect("cache lock").len(),
            self.negative.lock().expect("cache lock").entries.len(),
            self.flights.lock().expect("flights lock").len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scopes;
    use crate::domain::AgentId;

    fn limits() -> CacheLimits {
        CacheLimits {
            max_entries: 1_000,
            negative_ttl: Duration::from_secs(5),
            max_negative: 1_000,
            stale_if_error: Duration::from_secs(30),
        }
    }

    fn active(agent: &str, scope: &str, now: Instant, fresh: u64, exp: Option<u64>) -> Verdict {
        Verdict::Active {
            caller: Caller::new(AgentId::parse(agent).unwrap(), Scopes::parse(scope)),
            fresh_until: now + Duration::from_secs(fresh),
            expires: exp.map(|s| now + Duration::from_secs(s)),
        }
    }

    #[test]
    fn the_negative_cache_stays_under_its_cap_with_100_000_distinct_garbage_tokens() {
        let cache = TokenCache::new(limits());
        let now = Instant::now();
        for i in 0..100_000 {
            let key = key(&format!("garbage-{i}"));
            cache.store(
                key,
                &Verdict::Refused(AuthError::Invalid("inactive".into())),
                now,
            );
            let (_, negative, _) = cache.len();
            assert!(negative <= 1_000, "{negative} entries after {i} tokens");
        }
        let order = cache.negative.lock().unwrap().order.len();
        assert!(order <= 2_000, "{order}");
        // The newest are remembered, the oldest were let go.
        assert!(matches!(
            cache.lookup(&key("garbage-99999"), now),
            Lookup::Refused(_)
        ));
        assert!(matches!(
            cache.lookup(&key("garbage-0"), now),
            Lookup::Miss { stale: None }
        ));
    }

    #[test]
    fn a_refusal_is_forgotten_after_its_ttl() {
        let cache = TokenCache::new(limits());
        let now = Instant::now();
        let k = key("bad");
        cache.store(k, &Verdict::Refused(AuthError::Invalid("x".into())), now);
        assert!(matches!(cache.lookup(&k, now), Lookup::Refused(_)));
        let later = now + Duration::from_secs(6);
        assert!(matches!(
            cache.lookup(&k, later),
            Lookup::Miss { stale: None }
        ));
    }

    #[test]
    fn a_positive_entry_is_fresh_until_its_ttl_and_never_past_exp() {
        let cache = TokenCache::new(limits());
        let now = Instant::now();
        let k = key("good");
        cache.store(
            k,
            &active("agent-1", "orchestrator.register", now, 60, Some(10)),
            now,
        );
        assert!(matches!(cache.lookup(&k, now), Lookup::Fresh(_)));
        // Past exp: neither fresh nor stale.
        let after_exp = now + Duration::from_secs(11);
        assert!(matches!(
            cache.lookup(&k, after_exp),
            Lookup::Miss { stale: None }
        ));
    }

    #[test]
    fn stale_if_error_serves_agents_within_the_window_and_never_admins() {
        let cache = TokenCache::new(limits());
        let now = Instant::now();
        let (agent, admin, reader) = (key("agent"), key("admin"), key("reader"));
        cache.store(
            agent,
            &active("agent-1", "orchestrator.register", now, 10, None),
            now,
        );
        cache.store(
            admin,
            &active("op", "orchestrator.admin", now, 10, None),
            now,
        );
        cache.store(
            reader,
            &active("op", "orchestrator.admin.read", now, 10, None),
            now,
        );
        let stale_time = now + Duration::from_secs(20);
        assert!(matches!(
            cache.lookup(&agent, stale_time),
            Lookup::Miss { stale: Some(_) }
        ));
        assert!(matches!(
            cache.lookup(&admin, stale_time),
            Lookup::Miss { stale: None }
        ));
        assert!(matches!(
            cache.lookup(&reader, stale_time),
            Lookup::Miss { stale: None }
        ));
        let past_window = now + Duration::from_secs(41);
        assert!(matches!(
            cache.lookup(&agent, past_window),
            Lookup::Miss { stale: None }
        ));
    }

    #[test]
    fn a_cached_caller_keeps_its_scopes_for_the_route_to_check() {
        let cache = TokenCache::new(limits());
        let now = Instant::now();
        let k = key("t");
        cache.store(
            k,
            &active("agent-1", "orchestrator.register", now, 60, None),
            now,
        );
        let Lookup::Fresh(caller) = cache.lookup(&k, now) else {
            panic!("fresh")
        };
        assert!(caller.allows("orchestrator.register"));
        assert!(!caller.allows("orchestrator.admin.read"));
        assert!(!caller.reads_all());
    }

    #[test]
    fn the_positive_cache_is_bounded() {
        let cache = TokenCache::new(CacheLimits {
            max_entries: 10,
            ..limits()
        });
        let now = Instant::now();
        for i in 0..100 {
            cache.store(key(&i.to_string()), &active("a", "", now, 60, None), now);
        }
        assert_eq!(cache.len().0, 10);
    }

    #[test]
    fn one_flight_per_token_until_it_lands() {
        let cache = TokenCache::new(limits());
        let now = Instant::now();
        let k = key("t");
        let first = cache.flight(&k, now).ok().unwrap();
        let second = cache.flight(&k, now).ok().unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        first.set(active("a", "", now, 60, None)).unwrap();
        cache.land(&k, &first, now);
        assert!(matches!(cache.flight(&k, now), Err(Lookup::Fresh(_))));
        assert_eq!(cache.len().2, 0);
    }
}
