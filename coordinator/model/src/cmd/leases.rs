//! `ExtendLeases` (a new leader's first command) and `ExpireLeases`.

use std::collections::BTreeSet;

use distbuild_proto::Digest;

use crate::records::ExecState;
use crate::state::Model;

impl Model {
    pub(crate) fn extend_leases(&mut self, lease_timeout_ms: u64) {
        for (id, worker) in self.workers.iter_mut() {
            if worker.last_seen_ms < self.clock_ms {
                worker.last_seen_ms = self.clock_ms;
                self.dirty.workers.insert(id.clone());
            }
        }
        let until = self.clock_ms + lease_timeout_ms;
        for key in self.leases.values() {
            let exec = self.executions.get_mut(key).expect("leased execution");
            if let ExecState::Running { expires_ms, .. } = &mut exec.state
                && *expires_ms < until
            {
                *expires_ms = until;
                self.dirty.executions.insert(*key);
            }
        }
    }

    /// Returns the tokens of the leases that expired.
    pub(crate) fn expire_leases(&mut self, max_attempts: u32, worker_timeout_ms: u64) -> Vec<u64> {
        let dead: BTreeSet<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.last_seen_ms.saturating_add(worker_timeout_ms) <= self.clock_ms)
            .map(|(id, _)| id.clone())
            .collect();
        // A dead worker's leases expire with it, renewed or not.
        let expired: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, key)| {
                matches!(&self.executions[*key].state,
                    ExecState::Running { expires_ms, worker_id, .. }
                        if *expires_ms <= self.clock_ms || dead.contains(worker_id))
            })
            .map(|(token, _)| *token)
            .collect();
        for &token in &expired {
            let key = self.leases[&token];
            let worker = match &self.executions[&key].state {
                ExecState::Running { worker_id, .. } => worker_id.clone(),
                _ => unreachable!("leases index running executions"),
            };
            self.release_lease(token);
            self.tally.lease_expiries += 1;
            let exec = self.executions.get_mut(&key).expect("released above");
            exec.attempts += 1;
            if exec.attempts < max_attempts {
                self.tally.retries += 1;
                continue;
            }
            let attempts = exec.attempts;
            self.give_up(
                key,
                format!(
                    "gave up after {attempts} attempts: the last one's lease expired (on worker {worker}, which stopped renewing it)"
                ),
                format!(
                    "its rebuild gave up after {attempts} attempts (the last one's lease expired)"
                ),
            );
        }
        let removed = !dead.is_empty();
        for id in dead {
            let held = self.workers[&id].held.clone();
            for digest in held {
                self.drop_holding(&id, digest);
            }
            self.workers.remove(&id);
            self.dirty.workers.insert(id);
        }
        if removed {
            self.give_up_stranded_actions();
        }
        expired
    }

    /// Gives up the queued Remote Execution API actions that ask for a
    /// platform no registered worker offers any more: they would wait
    /// forever (Execute refuses such an action up front; this is for the
    /// worker that left after it was queued).
    pub(crate) fn give_up_stranded_actions(&mut self) {
        let stranded: Vec<(Digest, String)> = self
            .queue
            .keys()
            .filter_map(|key| {
                let exec = &self.executions[key];
                let action = exec.spec.action.as_ref()?;
                if action.platform.is_empty() || self.workers.values().any(|w| exec.runs_on(w)) {
                    return None;
                }
                let platform = action
                    .platform
                    .iter()
                    .map(|(name, value)| format!("{name}={value}"))
                    .collect::<Vec<_>>()
                    .join(",");
                Some((*key, platform))
            })
            .collect();
        for (key, platform) in stranded {
            self.give_up(
                key,
                format!("no worker with platform {platform} is left to run it"),
                format!("its rebuild needs platform {platform}, which no worker has"),
            );
        }
    }
}
