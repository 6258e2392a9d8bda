//! [`RefusalCounts`]: how many refusals of each [`Code`] a door answered since start, and
//! [`Tally`]: that and the messages a door admitted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Code;

/// One counter per code; counting is one relaxed atomic add.
#[derive(Debug)]
pub struct RefusalCounts {
    counts: Box<[AtomicU64]>,
}

impl Default for RefusalCounts {
    fn default() -> Self {
        Self {
            counts: Code::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl RefusalCounts {
    /// Counts one refusal and returns the new count for its code.
    pub fn count(&self, code: Code) -> u64 {
        self.counts[code as usize].fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn get(&self, code: Code) -> u64 {
        self.counts[code as usize].load(Ordering::Relaxed)
    }

    /// The codes counted at least once, by wire name, e.g. `{"INVALID_TOKEN": 3}`.
    pub fn nonzero(&self) -> BTreeMap<&'static str, u64> {
        Code::ALL
            .iter()
            .map(|&code| (code.as_str(), self.get(code)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// What a door did since start: messages admitted onto a verified subject (duplicates
/// included), and refusals by code.
#[derive(Debug, Default)]
pub struct Tally {
    admitted: AtomicU64,
    pub refused: RefusalCounts,
}

impl Tally {
    /// Counts one admitted message.
    pub fn admit(&self) {
        self.admitted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_kept_per_code() {
        let counts = RefusalCounts::default();
        assert_eq!(counts.count(Code::RateLimited), 1);
        assert_eq!(counts.count(Code::RateLimited), 2);
        counts.count(Code::InvalidToken);
        assert_eq!(counts.get(Code::StreamFull), 0);
        let shown: Vec<_> = counts.nonzero().into_iter().collect();
        assert_eq!(shown, [("INVALID_TOKEN", 1), ("RATE_LIMITED", 2)]);
    }
}
