//! `RegisterWorker`: a worker (re)starting, with what its cache holds.

use std::collections::BTreeSet;

use distbuild_proto::Digest;

use crate::state::Model;

impl Model {
    pub(crate) fn register(
        &mut self,
        worker_id: &str,
        addr: &str,
        slots: u32,
        ahead: u32,
        held: &[Digest],
        properties: &[(String, String)],
    ) {
        // A worker that registers has just started: nothing of its earlier
        // life is running any more.
        for token in self.leases_of(worker_id) {
            self.release_lease(token);
        }
        let old_held = self
            .workers
            .get(worker_id)
            .map(|w| w.held.clone())
            .unwrap_or_default();
        let new_held: BTreeSet<Digest> = held.iter().copied().collect();
        for digest in old_held.difference(&new_held) {
            self.drop_holding(worker_id, *digest);
        }
        let worker = self.workers.entry(worker_id.to_string()).or_default();
        // A worker back with other properties may leave queued actions
        // that only it could run with none to run them (checked below).
        let properties_changed = worker.properties != properties;
        worker.addr = addr.to_string();
        worker.slots = slots;
        worker.ahead = ahead;
        worker.properties = properties.to_vec();
        worker.last_seen_ms = self.clock_ms;
        // A worker that starts again takes work again (one still leaving
        // says so again).
        worker.draining = false;
        self.dirty.workers.insert(worker_id.to_string());
        for digest in new_held {
            self.add_listed_holding(worker_id, digest);
        }
        if properties_changed {
            self.give_up_stranded_actions();
        }
    }
}
