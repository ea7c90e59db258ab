//! The worker's run slots: at most `--slots` jobs (and Remote Execution
//! API actions) run their commands at once. Only the commands take a
//! slot: a job stages its inputs before it waits for one and packs and
//! stores its outputs after it gives it back, so a job held ahead is ready
//! to start the moment a slot frees, and a slot passes from one job's last
//! command straight to the next job's first.
//!
//! Each leased job takes a [`Ticket`] when it is leased (the leases of one
//! answer in the order the coordinators picked them) and slots go to
//! tickets in the coordinators' order (the longest expected path to the
//! end of its build first, then the earliest lease), whether or not the
//! job has finished staging: going by who finished staging first gave the
//! first slots to the short compiles (fewer inputs) and started the long
//! ones last.

use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};

use distbuild_proto::v1::Assignment;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The slots commands run in.
#[derive(Debug)]
pub struct RunSlots {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Slots no one holds. Never more than 0 while anyone waits.
    free: usize,
    waiting: BinaryHeap<Waiter>,
}

/// Where a job stands for a free slot: the greater goes first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Priority {
    /// The coordinators' expected time from its start to the end of its
    /// build along its longest chain of dependents: the longer, the
    /// sooner.
    pub path_ms: u64,
    /// Its lease's token (leases are numbered in the order they are
    /// granted): among equal paths, the earlier lease first.
    pub lease_token: u64,
}

impl Priority {
    /// An assignment's, as the coordinators ranked it.
    pub fn of(assignment: &Assignment) -> Self {
        Priority {
            path_ms: assignment.path_ms,
            lease_token: assignment.lease_token,
        }
    }
}

impl Ord for Priority {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.path_ms
            .cmp(&other.path_ms)
            .then(other.lease_token.cmp(&self.lease_token))
    }
}

impl PartialOrd for Priority {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Debug)]
struct Waiter {
    priority: Priority,
    wake: oneshot::Sender<Slot>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.priority == other.priority
    }
}

impl Eq for Waiter {}

impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.priority.cmp(&other.priority)
    }
}

/// One slot, held: dropping it hands it to the first waiter, or frees it.
/// A slot handed to a waiter that gave up (its job was revoked) before it
/// saw it is dropped with the channel, and so passed on.
#[derive(Debug)]
struct Slot {
    shared: Option<Arc<Shared>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            Shared::release(shared);
        }
    }
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("run slots lock poisoned")
    }

    fn release(shared: Arc<Shared>) {
        loop {
            // Popped and freed under one lock: a job that finds no slot
            // free is among the waiters before the lock is let go.
            let waiter = {
                let mut state = shared.state();
                match state.waiting.pop() {
                    Some(waiter) => waiter,
                    None => {
                        state.free += 1;
                        return;
                    }
                }
            };
            let slot = Slot {
                shared: Some(shared.clone()),
            };
            match waiter.wake.send(slot) {
                Ok(()) => return,
                // It gave up: the next one.
                Err(mut slot) => {
                    slot.shared = None;
                }
            }
        }
    }
}

/// A place in line for a slot, taken when the job is leased.
#[derive(Debug)]
pub struct Ticket {
    place: Place,
}

#[derive(Debug)]
enum Place {
    Granted(Slot),
    Waiting(oneshot::Receiver<Slot>),
}

impl Ticket {
    /// Waits until the ticket's slot is granted.
    pub async fn turn(self) -> Turn {
        let asked = Instant::now();
        let slot = match self.place {
            Place::Granted(slot) => slot,
            // The sender is only dropped after a send.
            Place::Waiting(granted) => granted.await.expect("a ticket is granted a slot"),
        };
        Turn {
            _slot: slot,
            queued_ms: u64::try_from(asked.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// A slot taken: held until dropped.
#[derive(Debug)]
pub struct Turn {
    _slot: Slot,
    /// How long the job waited for it once ready, in milliseconds.
    pub queued_ms: u64,
}

impl RunSlots {
    /// `slots` slots, all free.
    pub fn new(slots: usize) -> Self {
        RunSlots {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    free: slots,
                    waiting: BinaryHeap::new(),
                }),
            }),
        }
    }

    /// A place in line: granted at once if a slot is free, else once the
    /// tickets before it in `priority` order have had theirs.
    pub fn ticket(&self, priority: Priority) -> Ticket {
        let mut state = self.shared.state();
        let place = if state.free > 0 {
            state.free -= 1;
            Place::Granted(Slot {
                shared: Some(self.shared.clone()),
            })
        } else {
            let (wake, granted) = oneshot::channel();
            state.waiting.push(Waiter { priority, wake });
            Place::Waiting(granted)
        };
        Ticket { place }
    }

    /// Slots free now.
    #[cfg(test)]
    pub(crate) fn free(&self) -> usize {
        self.shared.state().free
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::FutureExt as _;

    use super::*;

    fn priority(path_ms: u64, lease_token: u64) -> Priority {
        Priority {
            path_ms,
            lease_token,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_holds_its_slot_until_dropped_and_says_how_long_it_waited() {
        let slots = RunSlots::new(1);
        let first = slots.ticket(priority(0, 1)).turn().await;
        assert_eq!(first.queued_ms, 0);
        assert_eq!(slots.free(), 0);
        let second = async { slots.ticket(priority(0, 2)).turn().await.queued_ms };
        let release = async {
            tokio::time::sleep(Duration::from_millis(250)).await;
            drop(first);
        };
        let (waited, ()) = tokio::join!(second, release);
        assert_eq!(waited, 250);
        assert_eq!(slots.free(), 1, "the second turn gave its slot back");
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_longest_path_then_the_earliest_lease() {
        let slots = RunSlots::new(1);
        let held = slots.ticket(priority(0, 0)).turn().await;
        let order = Mutex::new(Vec::new());
        let wait = |name: &'static str, p: Priority| {
            let ticket = slots.ticket(p);
            let order = &order;
            async move {
                let turn = ticket.turn().await;
                order.lock().unwrap().push(name);
                tokio::task::yield_now().await;
                drop(turn);
            }
        };
        // In line in this order.
        let short = wait("short", priority(100, 1));
        let long_later = wait("long, leased later", priority(900, 5));
        let long = wait("long", priority(900, 3));
        let middle = wait("middle", priority(500, 2));
        drop(held);
        tokio::join!(short, long_later, long, middle);
        assert_eq!(
            *order.lock().unwrap(),
            ["long", "long, leased later", "middle", "short"]
        );
        assert_eq!(slots.free(), 1);
    }

    /// A job still staging its inputs keeps its place: a slot freed
    /// meanwhile is its, not that of a job behind it that is ready.
    #[tokio::test]
    async fn a_slot_goes_to_the_first_in_line_ready_or_not() {
        let slots = RunSlots::new(1);
        let held = slots.ticket(priority(0, 0)).turn().await;
        let first = slots.ticket(priority(900, 1));
        let mut ready_behind = Box::pin(slots.ticket(priority(100, 2)).turn());
        assert!(ready_behind.as_mut().now_or_never().is_none());
        drop(held);
        assert!(
            ready_behind.as_mut().now_or_never().is_none(),
            "not its turn"
        );
        let turn = first
            .turn()
            .now_or_never()
            .expect("granted while it staged");
        assert_eq!(turn.queued_ms, 0);
        drop(turn);
        assert!(ready_behind.as_mut().now_or_never().is_some());
    }

    #[tokio::test]
    async fn a_ticket_given_up_does_not_take_a_slot_with_it() {
        let slots = RunSlots::new(1);
        // Given up while in line: skipped.
        let held = slots.ticket(priority(0, 0)).turn().await;
        let gave_up = slots.ticket(priority(9, 1));
        drop(gave_up);
        drop(held);
        assert_eq!(slots.free(), 1);
        // Given up after its slot was granted, before it took its turn.
        let held = slots.ticket(priority(0, 0)).turn().await;
        let granted = slots.ticket(priority(9, 2));
        drop(held);
        assert_eq!(slots.free(), 0, "granted");
        drop(granted);
        assert_eq!(slots.free(), 1, "passed back when given up");
        // Granted at once, then given up.
        drop(slots.ticket(priority(0, 3)));
        assert_eq!(slots.free(), 1);
    }
}
