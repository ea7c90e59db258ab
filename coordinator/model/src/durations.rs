//! Expected durations: how long each kind of job ran before, learned from
//! every run's lease-to-report time and replicated with the rest of the
//! state, so that every leader schedules the longest chains first.

use distbuild_proto::Digest;
use sha1::{Digest as _, Sha1};

use crate::log::JobSpec;
use crate::records::{BuildJob, DurationRecord};
use crate::state::Model;

/// Kinds of job remembered, at most; past it the least recently run are
/// forgotten.
pub const MAX_DURATIONS: usize = 100_000;
/// What a job of a kind never run is expected to take.
pub const DEFAULT_EXPECTED_MS: u64 = 1_000;
/// Bumped when the key's encoding changes.
const DURATION_KEY_VERSION: &[u8] = b"distbuild-duration-key-v1";

/// A job's kind, for its expected duration: its name when it has one (the
/// graph's name for what it builds, the same from one build to the next
/// while its commands' flags and its inputs change), else its commands. A
/// Remote Execution API action has none: its digest changes with any
/// input, and it is a build of one job, which needs no order.
pub fn duration_key(spec: &JobSpec) -> Option<Digest> {
    if spec.action.is_some() {
        return None;
    }
    let mut hash = Sha1::new();
    hash.update(DURATION_KEY_VERSION);
    if spec.name.is_empty() {
        hash.update(b"C");
        hash.update(postcard::to_allocvec(&spec.cmds).unwrap_or_default());
    } else {
        hash.update(b"N");
        hash.update(spec.name.as_bytes());
    }
    Some(Digest::from_bytes(hash.finalize().into()))
}

impl Model {
    /// What a run of `spec` is expected to take.
    pub(crate) fn expected_ms(&self, spec: &JobSpec) -> u64 {
        duration_key(spec)
            .and_then(|key| self.durations.get(&key))
            .map_or(DEFAULT_EXPECTED_MS, |d| d.expected_ms)
    }

    /// A run of kind `key` took `ran_ms`: the expectation moves a quarter of
    /// the way to it (the first run sets it), and the kind is the most
    /// recently run.
    pub(crate) fn record_duration(&mut self, key: Option<Digest>, ran_ms: u64) {
        let Some(key) = key else {
            return;
        };
        let now = self.clock_ms;
        let expected_ms = match self.durations.get(&key) {
            Some(old) => {
                self.durations_by_age.remove(&(old.last_run_ms, key));
                (old.expected_ms.saturating_mul(3).saturating_add(ran_ms)) / 4
            }
            None => ran_ms,
        };
        self.durations.insert(
            key,
            DurationRecord {
                expected_ms,
                last_run_ms: now,
            },
        );
        self.durations_by_age.insert((now, key));
        self.dirty.durations.insert(key);
        while self.durations.len() > MAX_DURATIONS {
            let (_, oldest) = self
                .durations_by_age
                .pop_first()
                .expect("indexed like durations");
            self.durations.remove(&oldest);
            self.dirty.durations.insert(oldest);
        }
    }

    /// Each job's `path_ms` for a build of `jobs` (dependencies first):
    /// its expected duration plus the longest `path_ms` among its
    /// dependents. A job the result cache answers now is expected to take
    /// no time. Linear in jobs and edges.
    pub(crate) fn critical_paths(&self, jobs: &[BuildJob]) -> Vec<u64> {
        let mut path = vec![0u64; jobs.len()];
        for (i, job) in jobs.iter().enumerate().rev() {
            let own = if self.results.contains_key(&job.cache_key) {
                0
            } else {
                self.expected_ms(&job.spec)
            };
            let after = job
                .dependents
                .iter()
                .map(|&d| path[d as usize])
                .max()
                .unwrap_or(0);
            path[i] = own.saturating_add(after);
        }
        path
    }
}
