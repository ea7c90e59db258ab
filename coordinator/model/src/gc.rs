//! Garbage collection, through the log. The leader proposes
//! `CollectGarbage` now and then with its limits; applying it drops, on
//! every replica alike:
//! - source blobs no build in flight needs (no job of an unfinished build,
//!   no execution, no staged submit names them) that were last used longer
//!   than the retention period ago, then, while the stored blobs pass their
//!   byte bound, the least recently used of those not needed and not used
//!   in the last [`RECENT_BLOB_MS`] (or the retention, if shorter): a
//!   client uploads its sources before it submits, so a blob just
//!   uploaded is about to be needed;
//! - cached results no build in flight needs, least recently used first
//!   (uses recorded to within [`RESULT_USE_RESOLUTION_MS`]), while they
//!   pass their count or byte bound;
//! - Remote Execution API action results whose blobs are gone, then the
//!   oldest while they pass the same count or byte bound (counted apart).
//!
//! What a build in flight needs is never dropped, so collection never
//! breaks one (a result still named by a job is kept, as is its output).
//! Each replica deletes the files of blobs the state no longer records on
//! its own (`coordinator::blobs`). Finished builds and their events are
//! retired as builds finish (`builds`), worker holdings are bounded as
//! workers report them (`index`).

use std::collections::BTreeSet;

use crate::log::{Collected, GcLimits};
use crate::records::CachedResult;
use crate::state::Model;
use distbuild_proto::{BlobKey, Digest};

/// Blobs used this recently are not taken for the byte bound (only the
/// retention drops them).
pub const RECENT_BLOB_MS: u64 = 10 * 60 * 1000;

/// A cached result's use is recorded (its row rewritten) only when its
/// last recorded use is at least this old: the byte and count bounds drop
/// results least recently used first, and an order true to ten minutes
/// serves a cache that keeps results for days. Recording every use made a
/// fully cached rebuild of 100,000 jobs rewrite 100,000 result rows (each
/// with its spec) in the submit's entry, a third of what it wrote.
pub const RESULT_USE_RESOLUTION_MS: u64 = 10 * 60 * 1000;

/// Whether a use at `now_ms` of a result last used at `last_used_ms` is
/// recorded (see [`RESULT_USE_RESOLUTION_MS`]).
pub(crate) fn records_use(last_used_ms: u64, now_ms: u64) -> bool {
    last_used_ms.saturating_add(RESULT_USE_RESOLUTION_MS) <= now_ms
}

/// What keeping `result` costs, as `CachedResult::bytes` records it.
pub(crate) fn result_bytes(result: &CachedResult) -> u64 {
    let record = postcard::experimental::serialized_size(result).unwrap_or(0) as u64;
    record + result.output.map_or(0, |o| o.bytes)
}

/// How recent a use protects a blob from the byte bound.
fn recent_ms(limits: &GcLimits) -> u64 {
    RECENT_BLOB_MS.min(limits.blob_retention_ms)
}

impl Model {
    /// Source blobs some build in flight needs: the inputs of every job of
    /// an unfinished build, of every execution, and of every staged part.
    pub fn blobs_in_use(&self) -> BTreeSet<BlobKey> {
        let builds = self
            .builds
            .values()
            .filter(|b| !b.header.finished)
            .flat_map(|b| b.jobs.iter().map(|j| &*j.spec));
        let executions = self.executions.values().map(|e| &*e.spec);
        let staged = self
            .staged
            .values()
            .flat_map(|s| s.parts.values().flatten().map(|j| &j.spec));
        builds
            .chain(executions)
            .chain(staged)
            .flat_map(|spec| spec.inputs.iter().map(|i| BlobKey::from(i.digest)))
            .collect()
    }

    /// Bytes of the source blobs the byte bound cannot take: those builds
    /// in flight need and those used recently (see [`RECENT_BLOB_MS`]).
    pub fn blob_bytes_kept(&self, limits: &GcLimits) -> u64 {
        let needed = self.blobs_in_use();
        let recent = recent_ms(limits);
        self.blobs
            .iter()
            .filter(|(d, b)| {
                needed.contains(d) || b.last_used_ms.saturating_add(recent) > self.clock_ms
            })
            .map(|(_, b)| b.size)
            .sum()
    }

    /// Bytes of all stored source blobs.
    pub fn blob_bytes(&self) -> u64 {
        self.blobs.values().map(|b| b.size).sum()
    }

    /// Cached results some build in flight needs: those of every job of an
    /// unfinished build and of every execution's dependencies.
    fn results_in_use(&self) -> BTreeSet<Digest> {
        let jobs = self
            .builds
            .values()
            .filter(|b| !b.header.finished)
            .flat_map(|b| b.jobs.iter().map(|j| j.cache_key));
        let deps = self
            .executions
            .values()
            .flat_map(|e| e.spec.deps.iter().map(|d| d.cache_key));
        jobs.chain(deps).collect()
    }

    pub(crate) fn collect_garbage(&mut self, limits: &GcLimits) -> Collected {
        let mut collected = Collected::default();
        let blobs_needed = self.blobs_in_use();
        // Least recently used first; the needed ones never.
        let mut candidates: Vec<(u64, BlobKey)> = self
            .blobs
            .iter()
            .filter(|(d, _)| !blobs_needed.contains(d))
            .map(|(d, b)| (b.last_used_ms, *d))
            .collect();
        candidates.sort_unstable();
        let mut stored = self.blob_bytes();
        let recent = recent_ms(limits);
        for (last_used_ms, digest) in candidates {
            let expired = last_used_ms.saturating_add(limits.blob_retention_ms) <= self.clock_ms;
            let old = last_used_ms.saturating_add(recent) <= self.clock_ms;
            if !expired && (stored <= limits.max_blob_bytes || !old) {
                // Oldest first: every later candidate is younger still.
                break;
            }
            let blob = self.blobs.remove(&digest).expect("a candidate is stored");
            self.dirty.blobs.insert(digest);
            stored -= blob.size;
            collected.blobs += 1;
            collected.blob_bytes += blob.size;
        }

        let results_needed = self.results_in_use();
        let mut candidates: Vec<(u64, Digest)> = self
            .results
            .iter()
            .filter(|(k, _)| !results_needed.contains(k))
            .map(|(k, r)| (r.last_used_ms, *k))
            .collect();
        candidates.sort_unstable();
        let mut count = self.results.len() as u64;
        let mut bytes: u64 = self.results.values().map(|r| r.bytes).sum();
        for (_, key) in candidates {
            if count <= limits.max_results && bytes <= limits.max_result_bytes {
                break;
            }
            bytes -= self.results[&key].bytes;
            count -= 1;
            self.forget_result(key);
            collected.results += 1;
        }

        // Action results, oldest first, past the same bounds as results
        // (counted on their own). A result whose blobs were collected is
        // useless: it goes first.
        let mut candidates: Vec<(bool, u64, (String, BlobKey))> = self
            .action_results
            .iter()
            .map(|(k, r)| {
                let whole = r
                    .blobs
                    .iter()
                    .all(|(blob, size)| self.blobs.get(blob).is_some_and(|b| b.size == *size));
                (whole, r.last_used_ms, k.clone())
            })
            .collect();
        candidates.sort_unstable();
        let mut count = self.action_results.len() as u64;
        let mut bytes: u64 = self
            .action_results
            .values()
            .map(|r| r.result.len() as u64)
            .sum();
        for (whole, _, key) in candidates {
            if whole && count <= limits.max_results && bytes <= limits.max_result_bytes {
                break;
            }
            let record = self.action_results.remove(&key).expect("a candidate");
            bytes -= record.result.len() as u64;
            count -= 1;
            self.dirty.action_results.insert(key);
            collected.action_results += 1;
        }
        collected
    }
}
