//! [`Slots`]: how many streams are open, per caller and in total, with a guard that frees its
//! slot when the stream ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Why a stream could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SlotsFull {
    /// The caller holds its maximum of streams.
    #[error("this caller already holds its maximum of streams")]
    Caller,
    /// The replica holds its maximum of streams.
    #[error("this replica already holds its maximum of streams")]
    Total,
}

/// The open streams of one replica.
#[derive(Clone)]
pub struct Slots {
    inner: Arc<Inner>,
}

struct Inner {
    max_total: usize,
    max_per_caller: usize,
    open: Mutex<(usize, HashMap<String, usize>)>,
}

impl Slots {
    pub fn new(max_total: usize, max_per_caller: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                max_total,
                max_per_caller,
                open: Mutex::default(),
            }),
        }
    }

    /// Takes a slot for `caller`, held until the returned guard drops.
    pub fn take(&self, caller: &str) -> Result<Slot, SlotsFull> {
        let mut open = self.inner.open.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_caller) = &mut *open;
        if *total >= self.inner.max_total {
            return Err(SlotsFull::Total);
        }
        let held = per_caller.entry(caller.to_owned()).or_default();
        if *held >= self.inner.max_per_caller {
            return Err(SlotsFull::Caller);
        }
        *held += 1;
        *total += 1;
        Ok(Slot {
            slots: self.clone(),
            caller: caller.to_owned(),
        })
    }

    /// Streams open right now.
    pub fn open(&self) -> usize {
        self.inner.open.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

/// One open stream; its slot is freed on drop.
pub struct Slot {
    slots: Slots,
    caller: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .slots
            .inner
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (total, per_caller) = &mut *open;
        *total -= 1;
        if let Some(held) = per_caller.get_mut(&self.caller) {
            *held -= 1;
            if *held == 0 {
                per_caller.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_caller_and_in_total_and_freed_on_drop() {
        let slots = Slots::new(3, 2);
        let a1 = slots.take("a").unwrap();
        let _a2 = slots.take("a").unwrap();
        assert_eq!(slots.take("a").err(), Some(SlotsFull::Caller));
        let _b1 = slots.take("b").unwrap();
        assert_eq!(slots.take("c").err(), Some(SlotsFull::Total));
        drop(a1);
        assert_eq!(slots.open(), 2);
        slots.take("c").unwrap();
    }
}
