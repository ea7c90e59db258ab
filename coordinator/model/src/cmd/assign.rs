//! `Assign`: leases queued executions to a worker.

use distbuild_proto::Digest;

use crate::log::{Event, Response};
use crate::rebuild::Inputs;
use crate::records::{ExecState, Execution};
use crate::state::Model;

pub const MAX_ASSIGN_BATCH: u64 = 1024;

impl Model {
    pub(crate) fn assign(
        &mut self,
        index: u64,
        worker_id: &str,
        keys: &[Digest],
        lease_timeout_ms: u64,
    ) -> Response {
        assert!(
            keys.len() as u64 <= MAX_ASSIGN_BATCH,
            "assign batch bounded"
        );
        let mut tokens = Vec::with_capacity(keys.len());
        for (position, key) in keys.iter().enumerate() {
            let token = index * MAX_ASSIGN_BATCH + position as u64;
            let worker = self.workers.get(worker_id);
            let free =
                worker.is_some_and(|w| w.running < w.slots.saturating_add(w.ahead) && !w.draining);
            let (since, rank) = match self.executions.get(key) {
                Some(
                    exec @ Execution {
                        state: ExecState::Queued { since_ms },
                        ..
                    },
                ) if free && worker.is_some_and(|w| exec.runs_on(w)) => (*since_ms, exec.rank),
                _ => {
                    tokens.push(None);
                    continue;
                }
            };
            self.queue.remove(rank, *key);
            match self.check_inputs(*key, since) {
                Inputs::Available => {}
                Inputs::Rebuilding(on) => {
                    for dep in &on {
                        self.blocked_on.entry(*dep).or_default().insert(*key);
                    }
                    let exec = self.executions.get_mut(key).expect("checked above");
                    exec.state = ExecState::Blocked { on };
                    self.dirty.executions.insert(*key);
                    tokens.push(None);
                    continue;
                }
                Inputs::Unrecoverable(dep, why) => {
                    let exec = self.executions.remove(key).expect("checked above");
                    self.dirty.executions.insert(*key);
                    self.fail_for_lost_dependency(*key, exec, dep, why);
                    tokens.push(None);
                    continue;
                }
            }
            let exec = self.executions.get_mut(key).expect("checked above");
            exec.state = ExecState::Running {
                worker_id: worker_id.to_string(),
                token,
                expires_ms: self.clock_ms + lease_timeout_ms,
                started_ms: self.clock_ms,
            };
            let waiters = exec.waiters.clone();
            self.leases.insert(token, *key);
            self.tally
                .queue_waits_ms
                .push(self.clock_ms.saturating_sub(since));
            self.lease_started(worker_id, rank.build);
            self.dirty.executions.insert(*key);
            for (build_id, job) in waiters {
                self.push_event(
                    build_id,
                    Event::JobStarted {
                        job,
                        worker_id: worker_id.to_string(),
                    },
                );
            }
            tokens.push(Some(token));
        }
        Response::Assigned {
            keys: keys.to_vec(),
            tokens,
        }
    }
}
