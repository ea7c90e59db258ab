//! Read-only answers about the state, for the services (outside apply).

use std::collections::BTreeMap;

use distbuild_proto::{BlobKey, Digest};

use crate::records::{Build, CachedResult, ExecState, Execution, Worker};
use crate::state::Model;

impl Model {
    /// The state's clock: the latest leader time applied.
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    pub fn build(&self, id: u64) -> Option<&Build> {
        self.builds.get(&id)
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
