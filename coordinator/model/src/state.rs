//! The model's state in memory: the primary records, the indexes derived
//! from them, the records the entry being applied changed (`Dirty`, what
//! `storage` writes), and the state's clock.

use std::collections::{BTreeMap, BTreeSet};

use distbuild_proto::{BlobKey, Digest};

use crate::log::Event;
use crate::records::{
    ActionResultRecord, BlobRecord, Build, CachedResult, Execution, Staged, Worker,
};

/// Records changed by the entry being applied.
#[derive(Default)]
pub(crate) struct Dirty {
    pub(crate) clock: bool,
    pub(crate) builds: BTreeSet<u64>,
    pub(crate) jobs: BTreeSet<(u64, u32)>,
    pub(crate) events: Vec<(u64, u64, Event)>,
    pub(crate) executions: BTreeSet<Digest>,
    pub(crate) results: BTreeSet<Digest>,
    pub(crate) workers: BTreeSet<String>,
    pub(crate) holdings: BTreeSet<(String, Digest)>,
    pub(crate) blobs: BTreeSet<BlobKey>,
    pub(crate) action_results: BTreeSet<(String, BlobKey)>,
    pub(crate) removed_builds: Vec<u64>,
    pub(crate) staged_parts: BTreeSet<(String, u32)>,
    pub(crate) unstaged: Vec<String>,
    /// Outputs recorded by this entry (written if still referenced).
    pub(crate) new_outputs: Vec<(u64, crate::records::JobOutput)>,
    /// Outputs nothing references any more.
    pub(crate) dropped_outputs: BTreeSet<u64>,
}

/// The coordinator's whole state.
#[derive(Default)]
pub struct Model {
    pub(crate) clock_ms: u64,
    pub(crate) builds: BTreeMap<u64, Build>,
    /// Submit request ID -> build ID (derived from the builds).
    pub(crate) requests: BTreeMap<String, u64>,
    pub(crate) executions: BTreeMap<Digest, Execution>,
    /// (queued since, cache key) of every queued execution (derived).
    pub(crate) queue: BTreeSet<(u64, Digest)>,
    /// Lease token -> cache key (derived).
    pub(crate) leases: BTreeMap<u64, Digest>,
    /// Dependency cache key being rebuilt -> executions blocked on it
    /// (derived from `ExecState::Blocked`).
    pub(crate) blocked_on: BTreeMap<Digest, BTreeSet<Digest>>,
    pub(crate) results: BTreeMap<Digest, CachedResult>,
    pub(crate) workers: BTreeMap<String, Worker>,
    /// Artifact -> workers holding it (derived from `Worker::held`).
    pub(crate) held_by: BTreeMap<Digest, BTreeSet<String>>,
    pub(crate) blobs: BTreeMap<BlobKey, BlobRecord>,
    /// Remote Execution API action results by (instance name, action).
    pub(crate) action_results: BTreeMap<(String, BlobKey), ActionResultRecord>,
    /// Submits in parts, by request ID, until their last part arrives.
    pub(crate) staged: BTreeMap<String, Staged>,
    /// Output row -> jobs and results naming it (derived from the jobs'
    /// and results' `output`).
    pub(crate) output_refs: BTreeMap<u64, u32>,
    pub(crate) dirty: Dirty,
    /// Injected bug (simulation only), never persisted: see
    /// [`Model::inject_accept_expired_lease_results`].
    pub(crate) accept_expired_lease_results: bool,
}

impl Model {
    /// A copy of the whole state (tests break copies on purpose).
    #[cfg(test)]
    pub(crate) fn clone_for_test(&self) -> Model {
        Model {
            clock_ms: self.clock_ms,
            builds: self.builds.clone(),
            requests: self.requests.clone(),
            executions: self.executions.clone(),
            queue: self.queue.clone(),
            leases: self.leases.clone(),
            blocked_on: self.blocked_on.clone(),
            results: self.results.clone(),
            workers: self.workers.clone(),
            held_by: self.held_by.clone(),
            blobs: self.blobs.clone(),
            action_results: self.action_results.clone(),
            staged: self.staged.clone(),
            output_refs: self.output_refs.clone(),
            dirty: Dirty::default(),
            accept_expired_lease_results: false,
        }
    }

    /// Injected bug, for a simulation to prove its checkers catch it: take
    /// a success reported under a lease that already expired. Never set in
    /// production; not persisted.
    pub fn inject_accept_expired_lease_results(&mut self, on: bool) {
        self.accept_expired_lease_results = on;
    }

    pub(crate) fn tick(&mut self, now_ms: u64) {
        if now_ms > self.clock_ms {
            self.clock_ms = now_ms;
            self.dirty.clock = true;
        }
    }
}
