//! `DrainWorker` and `DeregisterWorker`: a worker leaving gracefully.
//! Draining, it is given no new work while its running jobs finish and
//! the outputs only it holds that builds in flight still need are copied
//! to other workers (the leader plans the copies: `Model::drain_plan`);
//! then it deregisters.

use crate::state::Model;

impl Model {
    /// Marks `worker_id` draining; false if it is not registered.
    pub(crate) fn drain_worker(&mut self, worker_id: &str) -> bool {
        let Some(worker) = self.workers.get_mut(worker_id) else {
            return false;
        };
        worker.draining = true;
        worker.last_seen_ms = self.clock_ms;
        self.dirty.workers.insert(worker_id.to_string());
        true
    }

    /// Removes `worker_id`: its leases go back to the queue without
    /// counting an attempt, its holdings are forgotten. False if it is not
    /// registered.
    pub(crate) fn deregister_worker(&mut self, worker_id: &str) -> bool {
        let Some(worker) = self.workers.get(worker_id) else {
            return false;
        };
        let held = worker.held.clone();
        for token in self.leases_of(worker_id) {
            self.release_lease(token);
        }
        for digest in held {
            self.drop_holding(worker_id, digest);
        }
        self.workers.remove(worker_id);
        self.dirty.workers.insert(worker_id.to_string());
        self.give_up_stranded_actions();
        true
    }
}
