//! A slot: one of the worker's permits to run a job, and the slot's
//! number, naming its directory (`<sandbox root>/slot-<n>/`), where its
//! jobs' directories are made one after another and which its kept
//! sandbox (`sandbox::KeptPerSlot`) may write.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedSemaphorePermit;

/// The numbers of the slots free now.
#[derive(Debug, Clone)]
pub(super) struct SlotNumbers {
    free: Arc<Mutex<Vec<usize>>>,
    slots: usize,
}

/// A slot in use: its permit and its number, both given back on drop.
#[derive(Debug)]
pub(super) struct SlotLease {
    number: usize,
    free: Arc<Mutex<Vec<usize>>>,
    // Dropped after the number is back: a job holding the next permit
    // always finds a free number.
    _permit: OwnedSemaphorePermit,
}

impl SlotNumbers {
    /// Numbers 0..slots, one per permit of the worker's semaphore.
    pub(super) fn new(slots: usize) -> Self {
        Self {
            free: Arc::new(Mutex::new((0..slots).rev().collect())),
            slots,
        }
    }

    /// The slot a permit stands for.
    pub(super) fn lease(&self, permit: OwnedSemaphorePermit) -> SlotLease {
        let number = self
            .free
            .lock()
            .expect("slot numbers lock poisoned")
            .pop()
            // Cannot happen (a number per permit); a shared extra slot
            // would still be correct, its jobs taking turns.
            .unwrap_or(self.slots);
        SlotLease {
            number,
            free: Arc::clone(&self.free),
            _permit: permit,
        }
    }
}

impl SlotLease {
    /// The slot's directory under `root`.
    pub(super) fn dir(&self, root: &Path) -> PathBuf {
        root.join(format!("slot-{}", self.number))
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        self.free
            .lock()
            .expect("slot numbers lock poisoned")
            .push(self.number);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_at_once_have_distinct_slots_and_numbers_come_back() {
        let semaphore = Arc::new(tokio::sync::Semaphore::new(2));
        let numbers = SlotNumbers::new(2);
        let root = Path::new("/r");
        let a = numbers.lease(semaphore.clone().try_acquire_owned().expect("permit"));
        let b = numbers.lease(semaphore.clone().try_acquire_owned().expect("permit"));
        assert_ne!(a.dir(root), b.dir(root));
        assert!(semaphore.clone().try_acquire_owned().is_err());
        let freed = a.dir(root);
        drop(a);
        let c = numbers.lease(semaphore.clone().try_acquire_owned().expect("permit"));
        assert_eq!(c.dir(root), freed);
        assert_eq!(b.dir(root).parent(), Some(root));
    }
}
