//! [`Unreadable`]: what a loop over stored records does with one it cannot decode. It skips it,
//! counts it and logs it once (per key), so one bad record never stops the loop for the others
//! and never floods the log on every pass.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Keys remembered as already logged; past this, further keys are counted but not logged.
const MAX_LOGGED_KEYS: usize = 1024;

/// Skipped records of one kind (agent records, alerting entries, …): a count, and the keys
/// already logged.
#[derive(Debug)]
pub struct Unreadable {
    what: &'static str,
    skipped: AtomicU64,
    logged: Mutex<BTreeSet<String>>,
}

impl Unreadable {
    /// `what` names the records in the log, e.g. `"agent record"`.
    pub const fn new(what: &'static str) -> Self {
        Self {
            what,
            skipped: AtomicU64::new(0),
            logged: Mutex::new(BTreeSet::new()),
        }
    }

    /// Records that the record under `key` could not be read because of `error`: counts it, and
    /// logs it at `warn` the first time this key is skipped.
    pub fn skip(&self, key: &str, error: &dyn std::error::Error) {
        let skipped = self.skipped.fetch_add(1, Ordering::Relaxed) + 1;
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged.len() < MAX_LOGGED_KEYS && logged.insert(key.to_owned()) {
            tracing::warn!(
                key,
                what = self.what,
                skipped,
                error = %crate::telemetry::error_chain(error),
                "skipping an unreadable stored record (logged once per key)"
            );
        }
    }

    /// Records skipped since start.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_skip_is_counted_and_each_key_remembered_once() {
        let unreadable = Unreadable::new("test record");
        let err = serde_json::from_slice::<u8>(b"x").unwrap_err();
        unreadable.skip("a", &err);
        unreadable.skip("a", &err);
        unreadable.skip("b", &err);
        assert_eq!(unreadable.skipped(), 3);
        assert_eq!(unreadable.logged.lock().unwrap().len(), 2);
    }
}
