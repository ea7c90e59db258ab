//! The model's state in memory: the primary records, the indexes derived
//! from them, the records the entry being applied changed (`Dirty`, what
//! `storage` writes), and the state's clock.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use distbuild_proto::{BlobKey, Digest};

use crate::log::Event;
use crate::records::{
    ActionResultRecord, BlobRecord, Build, CachedResult, DurationRecord, Execution, Rank, Staged,
    Worker,
};

/// The workers holding one artifact, sorted. Usually one or two: a sorted
/// vector, where a `BTreeSet` would allocate a node for eleven (one per
/// artifact, so per job).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Holders(Vec<String>);

impl Holders {
    /// Adds `worker`; false if it was there.
    pub(crate) fn insert(&mut self, worker: &str) -> bool {
        match self.0.binary_search_by(|w| w.as_str().cmp(worker)) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, worker.to_string());
                true
            }
        }
    }

    /// Removes `worker`; false if it was not there.
    pub(crate) fn remove(&mut self, worker: &str) -> bool {
        match self.0.binary_search_by(|w| w.as_str().cmp(worker)) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn iter(&self) -> std::slice::Iter<'_, String> {
        self.0.iter()
    }
}

impl<'a> IntoIterator for &'a Holders {
    type Item = &'a String;
    type IntoIter = std::slice::Iter<'a, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// The queued executions, per build, most urgent first: longest expected
/// path to the end of the build first, then the build's own order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Queue {
    pub(crate) by_build: BTreeMap<u64, BTreeSet<(Reverse<u64>, u32, Digest)>>,
}

impl Queue {
    pub(crate) fn insert(&mut self, rank: Rank, key: Digest) {
        self.by_build.entry(rank.build).or_default().insert((
            Reverse(rank.path_ms),
            rank.order,
            key,
        ));
    }

    pub(crate) fn remove(&mut self, rank: Rank, key: Digest) {
        if let Some(queued) = self.by_build.get_mut(&rank.build) {
            queued.remove(&(Reverse(rank.path_ms), rank.order, key));
            if queued.is_empty() {
                self.by_build.remove(&rank.build);
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.by_build.is_empty()
    }

    /// Every entry as (build, path, order, key), for comparisons.
    pub(crate) fn entries(&self) -> BTreeSet<(u64, u64, u32, Digest)> {
        self.by_build
            .iter()
            .flat_map(|(build, queued)| {
                queued
                    .iter()
                    .map(move |(Reverse(path), order, key)| (*build, *path, *order, *key))
            })
            .collect()
    }

    /// Every queued cache key, build by build, most urgent first.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &Digest> {
        self.by_build.values().flatten().map(|(_, _, key)| key)
    }
}

/// Records changed by the entry being applied.
#[derive(Default)]
pub(crate) struct Dirty {
    pub(crate) clock: bool,
    pub(crate) builds: BTreeSet<u64>,
    pub(crate) jobs: BTreeSet<(u64, u32)>,
    pub(crate) events: Vec<(u64, u64, Event)>,
    pub(crate) executions: BTreeSet<Digest>,
    pub(crate) durations: BTreeSet<Digest>,
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
    /// Every queued execution by its rank (derived).
    pub(crate) queue: Queue,
    /// Build -> its executions leased now (by `Rank::build`; derived).
    pub(crate) running_by_build: BTreeMap<u64, u32>,
    /// Expected durations by `durations::duration_key`, bounded.
    pub(crate) durations: BTreeMap<Digest, DurationRecord>,
    /// (last run, key) of every expected duration (derived).
    pub(crate) durations_by_age: BTreeSet<(u64, Digest)>,
    /// Lease token -> cache key (derived).
    pub(crate) leases: BTreeMap<u64, Digest>,
    /// Dependency cache key being rebuilt -> executions blocked on it
    /// (derived from `ExecState::Blocked`).
    pub(crate) blocked_on: BTreeMap<Digest, BTreeSet<Digest>>,
    pub(crate) results: BTreeMap<Digest, CachedResult>,
    pub(crate) workers: BTreeMap<String, Worker>,
    /// Artifact -> workers holding it (derived from `Worker::held`).
    pub(crate) held_by: BTreeMap<Digest, Holders>,
    pub(crate) blobs: BTreeMap<BlobKey, BlobRecord>,
    /// Remote Execution API action results by (instance name, action).
    pub(crate) action_results: BTreeMap<(String, BlobKey), ActionResultRecord>,
    /// Submits in parts, by request ID, until their last part arrives.
    pub(crate) staged: BTreeMap<String, Staged>,
    /// Output row -> jobs and results naming it (derived from the jobs'
    /// and results' `output`).
    pub(crate) output_refs: BTreeMap<u64, u32>,
    pub(crate) dirty: Dirty,
    /// What the command being applied did, for metrics (never persisted).
    pub(crate) tally: crate::tally::Tally,
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
            running_by_build: self.running_by_build.clone(),
            durations: self.durations.clone(),
            durations_by_age: self.durations_by_age.clone(),
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
            tally: Default::default(),
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
