//! Changes that keep a record and its derived indexes in step: an
//! artifact's holders (`Worker::held` and `held_by`), a result forgotten,
//! a lease ended (the lease table, the queue, the worker's running count),
//! an execution's waiters and blocks. Every transition changes those
//! records through here; `invariants` checks they stayed in step.

use std::collections::BTreeMap;

use distbuild_proto::Digest;

use crate::records::ExecState;
use crate::state::{Holders, Model};

/// Artifacts a worker's registrations and heartbeats may have recorded as
/// held by it: past it, what it lists is not recorded (its peers cannot be
/// sent to those copies; a job needing one finds another or rebuilds it).
/// What it reports having just built is always recorded: a successful
/// result needs a holder.
pub const MAX_HOLDINGS_PER_WORKER: usize = 200_000;

impl Model {
    /// Records a copy `worker_id` says it holds, within the bound.
    pub(crate) fn add_listed_holding(&mut self, worker_id: &str, digest: Digest) {
        if self
            .workers
            .get(worker_id)
            .is_some_and(|w| w.held.len() < MAX_HOLDINGS_PER_WORKER)
        {
            self.add_holding(worker_id, digest);
        }
    }

    pub(crate) fn add_holding(&mut self, worker_id: &str, digest: Digest) {
        let Some(worker) = self.workers.get_mut(worker_id) else {
            return;
        };
        if worker.held.insert(digest) {
            self.held_by.entry(digest).or_default().insert(worker_id);
            self.dirty.holdings.insert((worker_id.to_string(), digest));
        }
    }

    pub(crate) fn drop_holding(&mut self, worker_id: &str, digest: Digest) {
        if let Some(worker) = self.workers.get_mut(worker_id) {
            worker.held.remove(&digest);
        }
        if let Some(holders) = self.held_by.get_mut(&digest) {
            holders.remove(worker_id);
            if holders.is_empty() {
                self.held_by.remove(&digest);
            }
        }
        self.dirty.holdings.insert((worker_id.to_string(), digest));
    }

    /// Whether some live worker holds `artifact`.
    pub(crate) fn is_held(&self, artifact: &Digest) -> bool {
        is_held_in(&self.held_by, artifact)
    }

    /// Takes `waiter` off the execution of `key`; drops the execution if
    /// nothing needs it any more.
    pub(crate) fn leave_execution(&mut self, key: Digest, waiter: (u64, u32)) {
        let Some(exec) = self.executions.get_mut(&key) else {
            return;
        };
        exec.waiters.retain(|w| *w != waiter);
        self.dirty.executions.insert(key);
        if !exec.waiters.is_empty() || self.blocked_on.contains_key(&key) {
            return;
        }
        let exec = self.executions.remove(&key).expect("found above");
        match exec.state {
            ExecState::Queued { .. } => {
                self.queue.remove(exec.rank, key);
            }
            ExecState::Running {
                worker_id, token, ..
            } => {
                self.leases.remove(&token);
                self.lease_ended(&worker_id, exec.rank.build);
            }
            ExecState::Blocked { on } => {
                for dep in on {
                    self.unindex_blocked(dep, key);
                }
            }
        }
    }

    /// Ends the lease `token`: its execution is queued again.
    /// The tokens of `worker_id`'s leases.
    pub(crate) fn leases_of(&self, worker_id: &str) -> Vec<u64> {
        self.leases
            .iter()
            .filter(|(_, key)| {
                matches!(&self.executions[*key].state,
                    ExecState::Running { worker_id: w, .. } if w == worker_id)
            })
            .map(|(token, _)| *token)
            .collect()
    }

    pub(crate) fn release_lease(&mut self, token: u64) {
        let key = self.leases.remove(&token).expect("a current lease");
        let exec = &self.executions[&key];
        if let ExecState::Running { worker_id, .. } = &exec.state {
            let (worker_id, build) = (worker_id.clone(), exec.rank.build);
            self.lease_ended(&worker_id, build);
        }
        self.enqueue(key, self.clock_ms);
    }

    /// Puts the execution of `key` (not queued, not leased) in the queue
    /// by its rank, as queued since `since_ms`.
    pub(crate) fn enqueue(&mut self, key: Digest, since_ms: u64) {
        let exec = self
            .executions
            .get_mut(&key)
            .expect("an execution to queue");
        exec.state = ExecState::Queued { since_ms };
        self.queue.insert(exec.rank, key);
        self.dirty.executions.insert(key);
    }

    /// A lease of `worker_id` for build `build` began: the counts the
    /// scheduler shares slots by.
    pub(crate) fn lease_started(&mut self, worker_id: &str, build: u64) {
        if let Some(w) = self.workers.get_mut(worker_id) {
            w.running += 1;
        }
        *self.running_by_build.entry(build).or_default() += 1;
    }

    /// A lease of `worker_id` for build `build` ended (its worker may be
    /// gone already).
    pub(crate) fn lease_ended(&mut self, worker_id: &str, build: u64) {
        if let Some(w) = self.workers.get_mut(worker_id) {
            w.running -= 1;
        }
        if let Some(n) = self.running_by_build.get_mut(&build) {
            *n -= 1;
            if *n == 0 {
                self.running_by_build.remove(&build);
            }
        }
    }

    pub(crate) fn forget_result(&mut self, key: Digest) {
        let forgotten = self.results.remove(&key);
        self.unref_output(forgotten.and_then(|r| r.output));
        self.dirty.results.insert(key);
    }

    pub(crate) fn unindex_blocked(&mut self, dep: Digest, blocked: Digest) {
        if let Some(set) = self.blocked_on.get_mut(&dep) {
            set.remove(&blocked);
            if set.is_empty() {
                self.blocked_on.remove(&dep);
            }
        }
    }
}

/// Whether some live worker holds `artifact`, by the holders index alone
/// (for a caller holding another part of the model mutably).
pub(crate) fn is_held_in(held_by: &BTreeMap<Digest, Holders>, artifact: &Digest) -> bool {
    held_by.get(artifact).is_some_and(|h| !h.is_empty())
}
