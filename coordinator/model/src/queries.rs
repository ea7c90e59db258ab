//! Read-only answers about the state, for the services (outside apply).

use std::collections::BTreeMap;

use distbuild_proto::{BlobKey, Digest};

use crate::records::{Build, CachedResult, ExecState, Execution, Worker};
use crate::state::Model;

/// Sizes of the state (see [`Model::gauges`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Executions waiting for a worker.
    pub queued: u64,
    /// Executions leased to a worker.
    pub running: u64,
    /// Executions waiting for a lost input's rebuild.
    pub blocked: u64,
    pub builds_running: u64,
    /// Builds kept, running and finished.
    pub builds_retained: u64,
    pub cached_results: u64,
    pub cached_result_bytes: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
    pub action_results: u64,
    pub workers: u64,
    pub worker_slots: u64,
    pub busy_slots: u64,
    pub expected_durations: u64,
}

impl Model {
    /// The state's clock: the latest leader time applied.
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    pub fn build(&self, id: u64) -> Option<&Build> {
        self.builds.get(&id)
    }

    /// Every build kept, by ID (oldest first).
    pub fn builds(&self) -> impl DoubleEndedIterator<Item = (&u64, &Build)> {
        self.builds.iter()
    }

    /// The executions leased now.
    pub fn running_executions(&self) -> impl Iterator<Item = &Execution> {
        self.leases
            .values()
            .filter_map(|key| self.executions.get(key))
    }

    pub fn build_for_request(&self, request_id: &str) -> Option<u64> {
        self.requests.get(request_id).copied()
    }

    /// The stored result of Remote Execution API action `action` in
    /// instance `instance_name`.
    pub fn action_result(
        &self,
        instance_name: &str,
        action: &BlobKey,
    ) -> Option<&crate::records::ActionResultRecord> {
        self.action_results
            .get(&(instance_name.to_string(), *action))
    }

    pub fn has_blob(&self, digest: &BlobKey) -> bool {
        self.blobs.contains_key(digest)
    }

    /// Every recorded source blob with its size.
    pub fn blobs(&self) -> Vec<(BlobKey, u64)> {
        self.blobs.iter().map(|(d, b)| (*d, b.size)).collect()
    }

    /// When recorded blob `digest` was last used.
    pub fn blob_last_used_ms(&self, digest: &BlobKey) -> Option<u64> {
        self.blobs.get(digest).map(|b| b.last_used_ms)
    }

    pub fn blob_size(&self, digest: &BlobKey) -> Option<u64> {
        self.blobs.get(digest).map(|b| b.size)
    }

    pub fn workers(&self) -> &BTreeMap<String, Worker> {
        &self.workers
    }

    pub fn execution(&self, key: &Digest) -> Option<&Execution> {
        self.executions.get(key)
    }

    pub fn result(&self, key: &Digest) -> Option<&CachedResult> {
        self.results.get(key)
    }

    /// Peer addresses of the workers holding `artifact`.
    pub fn holders(&self, artifact: &Digest) -> Vec<String> {
        self.held_by
            .get(artifact)
            .into_iter()
            .flatten()
            .filter_map(|w| self.workers.get(w).map(|w| w.addr.clone()))
            .collect()
    }

    /// What the draining workers still hold that nobody else does and a
    /// build needs: per draining worker, the artifacts (with sizes) of the
    /// succeeded jobs of every build running or finished within
    /// `recent_ms` (its client may still be downloading), held by no
    /// worker that is not draining; at most `max` per worker. Walks those
    /// builds' jobs: for the leader while a worker drains, not per command.
    pub fn drain_plan(&self, recent_ms: u64, max: usize) -> BTreeMap<String, Vec<(Digest, u64)>> {
        let mut plan: BTreeMap<String, Vec<(Digest, u64)>> = self
            .workers
            .iter()
            .filter(|(_, w)| w.draining)
            .map(|(id, _)| (id.clone(), Vec::new()))
            .collect();
        if plan.is_empty() {
            return plan;
        }
        let mut seen = std::collections::BTreeSet::new();
        let in_flight = self.builds.values().filter(|b| {
            !b.header.finished || b.header.finished_ms.saturating_add(recent_ms) > self.clock_ms
        });
        for build in in_flight {
            for job in &build.jobs {
                if job.state != crate::records::JobState::Succeeded {
                    continue;
                }
                let Some(result) = self.results.get(&job.cache_key) else {
                    continue;
                };
                if !seen.insert(result.artifact) {
                    continue;
                }
                let Some(holders) = self.held_by.get(&result.artifact) else {
                    continue;
                };
                let elsewhere = holders
                    .iter()
                    .any(|h| self.workers.get(h).is_some_and(|w| !w.draining));
                if elsewhere {
                    continue;
                }
                for holder in holders {
                    if let Some(list) = plan.get_mut(holder)
                        && list.len() < max
                    {
                        list.push((result.artifact, result.artifact_size));
                    }
                }
            }
        }
        plan
    }

    /// Sizes of the state now, for metrics. Walks the builds, results and
    /// blobs, so it is for a scrape, not for every command.
    pub fn gauges(&self) -> Gauges {
        Gauges {
            queued: self.queue.by_build.values().map(|q| q.len() as u64).sum(),
            running: self.leases.len() as u64,
            blocked: self.blocked_on.values().map(|b| b.len() as u64).sum(),
            builds_running: self.builds.values().filter(|b| !b.header.finished).count() as u64,
            builds_retained: self.builds.len() as u64,
            cached_results: self.results.len() as u64,
            cached_result_bytes: self.results.values().map(|r| r.bytes).sum(),
            blobs: self.blobs.len() as u64,
            blob_bytes: self.blobs.values().map(|b| b.size).sum(),
            action_results: self.action_results.len() as u64,
            workers: self.workers.len() as u64,
            worker_slots: self.workers.values().map(|w| u64::from(w.slots)).sum(),
            // Leases held ahead wait for a slot: they keep none busy.
            busy_slots: self
                .workers
                .values()
                .map(|w| u64::from(w.running.min(w.slots)))
                .sum(),
            expected_durations: self.durations.len() as u64,
        }
    }

    /// Whether an `ExpireLeases` at `now_ms` would change anything: some
    /// lease expired, or some worker was not seen for `worker_timeout_ms`.
    pub fn needs_expiry(&self, now_ms: u64, worker_timeout_ms: u64) -> bool {
        let lease_expired = self.leases.values().any(|key| {
            matches!(&self.executions[key].state,
                ExecState::Running { expires_ms, .. } if *expires_ms <= now_ms)
        });
        lease_expired
            || self
                .workers
                .values()
                .any(|w| w.last_seen_ms.saturating_add(worker_timeout_ms) <= now_ms)
    }
}
