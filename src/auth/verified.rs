//! HS256 tokens already verified, remembered so that an agent's next request with the same
//! token skips the signature check and the decoding of its header and claims (most of the cost
//! of authenticating a request: about 48,000 instructions, as much as the rest of the hot path).
//!
//! - **Only what verified** is remembered: a token enters after the full check (signature,
//!   algorithm, `aud`, `crit`, lifetime) passed, so garbage tokens cannot fill it.
//! - **Keyed by the token itself**, compared byte for byte, in a map hashed by aHash with
//!   per-process random keys (so nobody can aim tokens at one bucket; SipHash, the standard
//!   library's, cost about 800 instructions on a 200-byte token, per request). A digest would
//!   spare the token's bytes but costs as much as a third of the check it saves (a SHA-256 of a
//!   200-byte token is about 18,000 instructions); and a process that holds the shared secret
//!   reveals nothing more by holding tokens signed with it. The introspection cache, whose
//!   tokens are the authorization server's, keys by a SHA-256 ([`super::cache`]).
//! - **Time is checked on every use**: `exp` and `nbf` with the leeway, and the lifetime bound,
//!   exactly as on the first check; an entry found expired is dropped.
//! - **Bounded** by [`MAX_ENTRIES`]: when full, expired entries are swept, and if none is, the
//!   token is served uncached (verified in full each time) until room frees up.

use std::collections::HashMap;
use std::sync::Mutex;

use ahash::RandomState;

use super::{AuthError, Caller};

/// Most verified tokens remembered (a token and about 100 bytes each).
pub const MAX_ENTRIES: usize = 10_000;

/// What a verified token stood for, with the claims its later uses are checked against.
#[derive(Debug, Clone)]
pub struct Verified {
    pub caller: Caller,
    pub exp: u64,
    pub nbf: Option<u64>,
    pub iat: Option<u64>,
}

/// The verified tokens of one verifier.
#[derive(Debug)]
pub struct VerifiedTokens {
    max_entries: usize,
    entries: Mutex<HashMap<Box<str>, Verified, RandomState>>,
}

impl VerifiedTokens {
    pub fn new(max_entries: usize) -> Self {
        Self {
            max_entries,
            entries: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Verified, RandomState>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The remembered verification of `token`, if any; `check` decides whether it still holds at
    /// this moment, and an entry it refuses as expired is dropped.
    pub fn lookup(
        &self,
        token: &str,
        check: impl FnOnce(&Verified) -> Result<(), AuthError>,
    ) -> Option<Result<Caller, AuthError>> {
        let mut entries = self.lock();
        let verified = entries.get(token)?;
        Some(match check(verified) {
            Ok(()) => Ok(verified.caller.clone()),
            Err(err) => {
                if matches!(err, AuthError::Expired) {
                    entries.remove(token);
                }
                Err(err)
            }
        })
    }

    /// Remembers a token that verified; `live` tells which entries are still unexpired when
    /// room must be made.
    pub fn store(&self, token: &str, verified: Verified, live: impl Fn(&Verified) -> bool) {
        let mut entries = self.lock();
        if entries.len() >= self.max_entries && !entries.contains_key(token) {
            entries.retain(|_, entry| live(entry));
            if entries.len() >= self.max_entries {
                return;
            }
        }
        entries.insert(token.into(), verified);
    }

    /// Tokens remembered now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
