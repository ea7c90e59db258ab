//! The scheduling policy: which queued executions a polling worker gets.

use std::collections::BTreeMap;

use distbuild_proto::Digest;

use crate::state::Model;

impl Model {
    /// Queued executions for `worker_id`, up to `max`, oldest first, with
    /// locality: an execution whose dependency artifacts another live
    /// worker with a free slot holds more of than this one is left for that
    /// worker until it has waited `locality_wait_ms`.
    pub fn pick_for(
        &self,
        worker_id: &str,
        max: usize,
        now_ms: u64,
        locality_wait_ms: u64,
        alive_ms: u64,
    ) -> Vec<Digest> {
        let Some(me) = self.workers.get(worker_id) else {
            return Vec::new();
        };
        let free = (me.slots.saturating_sub(me.running) as usize).min(max);
        let mut picks = Vec::new();
        for (since_ms, key) in &self.queue {
            if picks.len() >= free {
                break;
            }
            let exec = &self.executions[key];
            if !exec.runs_on(me) {
                continue;
            }
            let mut bytes_by_worker: BTreeMap<&str, u64> = BTreeMap::new();
            for dep in &exec.spec.deps {
                if let Some(result) = self.results.get(&dep.cache_key) {
                    for holder in self.held_by.get(&result.artifact).into_iter().flatten() {
                        *bytes_by_worker.entry(holder.as_str()).or_default() +=
                            result.artifact_size.max(1);
                    }
                }
            }
            let mine = bytes_by_worker.get(worker_id).copied().unwrap_or(0);
            let better_elsewhere = bytes_by_worker.iter().any(|(w, bytes)| {
                *bytes > mine
                    && *w != worker_id
                    && self.workers.get(*w).is_some_and(|other| {
                        other.running < other.slots
                            && now_ms.saturating_sub(other.last_seen_ms) < alive_ms
                    })
            });
            if !better_elsewhere || now_ms.saturating_sub(*since_ms) >= locality_wait_ms {
                picks.push(*key);
            }
        }
        picks
    }

    /// Whether any execution is queued.
    pub fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }
}
