//! Bounded admission. ractor mailboxes are unbounded, so every queue in front of
//! an actor gets a counter that callers reserve before sending: when it is at
//! capacity the caller answers 503 at once instead of letting the queue grow.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub struct Admission {
    in_use: AtomicUsize,
    capacity: usize,
}

impl Admission {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0);
        Admission { in_use: AtomicUsize::new(0), capacity }
    }

    /// Takes one slot if one is free.
    pub fn try_acquire(&self) -> bool {
        let previous = self.in_use.fetch_add(1, Ordering::AcqRel);
        if previous >= self.capacity {
            self.in_use.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Takes one slot even past capacity: for work that must not be refused
    /// (an auction's own end), still counted so the gauge tells the truth.
    pub fn acquire_unconditionally(&self) {
        self.in_use.fetch_add(1, Ordering::AcqRel);
    }

    pub fn release(&self, slots: usize) {
        let previous = self.in_use.fetch_sub(slots, Ordering::AcqRel);
        debug_assert!(previous >= slots, "released more slots than were taken");
    }

    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Acquire)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_capacity_and_frees_on_release() {
        let admission = Admission::new(2);
        assert!(admission.try_acquire());
        assert!(admission.try_acquire());
        assert!(!admission.try_acquire());
        assert_eq!(admission.in_use(), 2);
        admission.release(1);
        assert!(admission.try_acquire());
        admission.acquire_unconditionally();
        assert_eq!(admission.in_use(), 3);
    }
}
