//! What a replica takes from its surroundings: time, the network, and (for
//! simulations) an observer of every apply, the invariant check, and
//! injected bugs. Production passes [`Seams::production`].

use std::sync::Arc;

use distbuild_model::{Proposal, Response};
use distbuild_proto::net::SharedDialer;

/// The time source: leaders stamp it into commands. Tests and the simulation
/// pass their own.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch, by the wall clock (which may
    /// jump). Read at elections only: stamps run on tokio's monotonic
    /// clock in between (see `time`).
    fn now_ms(&self) -> u64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// Sees every command a replica applies, in log order, with its answer:
/// the simulation's checkers compare replicas and audit leases through it.
/// Each proposal of a batch is seen on its own, under the index it is
/// applied as (`distbuild_model::command_index`). Called inside `apply`,
/// after the entry's state was written; must not block.
pub trait ApplyObserver: Send + Sync + 'static {
    fn applied(&self, node_id: u64, index: u64, proposal: &Proposal, response: &Response);
}

/// Bugs a simulation switches on to prove that its checkers catch them.
/// No flag or file reaches them: only code that builds [`Seams`] by hand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InjectedBugs {
    /// Accept a result reported under a lease that already expired, while
    /// its job waits to run again.
    pub accept_expired_lease_results: bool,
    /// Apply a retried request again instead of answering it with the
    /// first answer (exactly-once under retry broken).
    pub forget_request_answers: bool,
    /// Stamp commands with the wall clock instead of the leader's
    /// monotonic time: leases timed by a clock that can jump.
    pub leases_timed_by_wall_clock: bool,
}

/// What a replica takes from its surroundings.
#[derive(Clone)]
pub struct Seams {
    pub clock: Arc<dyn Clock>,
    pub dialer: SharedDialer,
    pub observer: Option<Arc<dyn ApplyObserver>>,
    /// Recompute the model's derived indexes after every apply and stop
    /// (panic, naming what differs) if one disagrees: for tests and the
    /// simulation; it costs a scan of the whole state per entry.
    pub check_invariants: bool,
    pub bugs: InjectedBugs,
}

impl Seams {
    /// The system clock, TCP, no observer, no invariant check, no bugs.
    pub fn production() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            dialer: distbuild_proto::net::tcp(),
            observer: None,
            check_invariants: false,
            bugs: InjectedBugs::default(),
        }
    }
}
