//! The worker's run slots: at most `--slots` jobs (and Remote Execution
//! API actions) run their commands at once. Only the commands take a
//! slot: a job stages its inputs before it waits for one and packs and
//! stores its outputs after it gives it back, so a job held ahead is ready
//! to start the moment a slot frees, and a slot passes from one job's last
//! command straight to the next job's first.

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// The slots commands run in.
#[derive(Debug)]
pub struct RunSlots {
    permits: Semaphore,
}

/// A slot taken: held until dropped.
#[derive(Debug)]
pub struct Turn<'a> {
    _permit: Option<SemaphorePermit<'a>>,
    /// How long the job waited for it, in milliseconds.
    pub queued_ms: u64,
}

impl RunSlots {
    /// `slots` slots, all free.
    pub fn new(slots: usize) -> Self {
        RunSlots {
            permits: Semaphore::new(slots),
        }
    }

    /// Waits for a free slot.
    pub async fn turn(&self) -> Turn<'_> {
        let asked = Instant::now();
        // Never closed: a slot is always there to wait for.
        let permit = self.permits.acquire().await.ok();
        Turn {
            _permit: permit,
            queued_ms: u64::try_from(asked.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Slots free now.
    pub fn free(&self) -> usize {
        self.permits.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_turn_holds_its_slot_until_dropped_and_says_how_long_it_waited() {
        let slots = RunSlots::new(1);
        let first = slots.turn().await;
        assert_eq!(first.queued_ms, 0);
        assert_eq!(slots.free(), 0);
        let second = async {
            let turn = slots.turn().await;
            turn.queued_ms
        };
        let release = async {
            tokio::time::sleep(Duration::from_millis(250)).await;
            drop(first);
        };
        let (waited, ()) = tokio::join!(second, release);
        assert_eq!(waited, 250);
        assert_eq!(slots.free(), 1, "the second turn gave its slot back");
    }
}
