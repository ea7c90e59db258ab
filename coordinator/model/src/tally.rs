//! What applying one command did, counted for the replica's metrics:
//! executions leased and how long they waited, runs ended and how long
//! they ran, expiries, retries, rebuilds, result cache answers, jobs and
//! builds finished.
//!
//! Deterministic like the rest of `apply` (durations come from the state's
//! clock), never persisted and never read by the model itself: `apply`
//! starts each command with an empty tally and the replica reads it after
//! (`Model::tally`), so it holds at most one command's worth.

use serde::{Deserialize, Serialize};

use crate::log::Event;
use crate::state::Model;

/// How a run reported under its current lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RunEnd {
    /// Exit code 0 (a Remote Execution API action's command included).
    Success,
    /// A non-zero exit code, or the job could not be run.
    Failure,
    /// Its dependency inputs could not be fetched: it runs again.
    LostInputs,
}

impl RunEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            RunEnd::Success => "success",
            RunEnd::Failure => "failure",
            RunEnd::LostInputs => "lost_inputs",
        }
    }
}

/// Counts of one applied command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Per execution leased: how long it waited in the queue (ms).
    pub queue_waits_ms: Vec<u64>,
    /// Per run reported under its current lease: how it ended and how long
    /// it held the lease (ms).
    pub runs: Vec<(RunEnd, u64)>,
    /// Leases that expired (not renewed, or their worker was lost).
    pub lease_expiries: u64,
    /// Executions queued again for another attempt after a lease expiry or
    /// inputs that could not be fetched.
    pub retries: u64,
    /// Executions queued again to rebuild an output no worker holds.
    pub lost_input_rebuilds: u64,
    /// Jobs the result cache answered.
    pub cache_hits: u64,
    /// Jobs that needed an execution (new, or one already in flight).
    pub cache_misses: u64,
    /// Jobs that succeeded by running (cached ones are `cache_hits`).
    pub jobs_succeeded: u64,
    pub jobs_failed: u64,
    pub jobs_skipped: u64,
    pub builds_succeeded: u64,
    /// Builds that finished with failed or skipped jobs, or cancelled.
    pub builds_failed: u64,
}

impl Tally {
    /// Counts what `event` says happened.
    pub(crate) fn event(&mut self, event: &Event) {
        match event {
            Event::JobStarted { .. } => {}
            Event::JobFinished {
                exit_code,
                error,
                cached,
                ..
            } => {
                if *cached {
                    self.cache_hits += 1;
                } else if *exit_code == 0 && error.is_none() {
                    self.jobs_succeeded += 1;
                } else {
                    self.jobs_failed += 1;
                }
            }
            Event::JobSkipped { .. } => self.jobs_skipped += 1,
            Event::BuildFinished { ok: true, .. } => self.builds_succeeded += 1,
            Event::BuildFinished { ok: false, .. } => self.builds_failed += 1,
        }
    }
}

impl Model {
    /// What the last applied command did (see the module's comment).
    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// Takes what the last applied command did, leaving an empty tally (so
    /// a request the request table answers without applying counts
    /// nothing).
    pub fn take_tally(&mut self) -> Tally {
        std::mem::take(&mut self.tally)
    }
}
