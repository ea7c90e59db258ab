//! The attempt limit. Every run that ended without an answer counts: a
//! lease that expired (`ExpireLeases`) and a run whose dependency inputs
//! could be fetched from none of their holders (`Report` of lost inputs).
//! At the limit the execution is given up: its waiting jobs fail saying
//! how many attempts were made and why the last one ended, and so do the
//! executions blocked on it.

use distbuild_proto::Digest;

use crate::records::ExecState;
use crate::state::Model;

impl Model {
    /// Counts one more attempt of the queued execution of `key`, whose run
    /// could not fetch the dependency artifacts `lost`; gives it up at
    /// `max_attempts`.
    pub(crate) fn count_lost_inputs_attempt(
        &mut self,
        key: Digest,
        lost: &[(Digest, Vec<String>)],
        max_attempts: u32,
    ) {
        let Some(exec) = self.executions.get_mut(&key) else {
            return;
        };
        exec.attempts += 1;
        if exec.attempts < max_attempts {
            self.tally.retries += 1;
            return;
        }
        let attempts = exec.attempts;
        let (artifact, tried) = &lost[0];
        let tried = if tried.is_empty() {
            "no holder was left to try".to_string()
        } else {
            format!("tried {}", tried.join(", "))
        };
        self.give_up(
            key,
            format!(
                "gave up after {attempts} attempts: the last could not fetch its input {artifact} ({tried})"
            ),
            format!("its rebuild gave up after {attempts} attempts (its inputs could not be fetched)"),
        );
    }

    /// Ends the queued execution of `key` without a result: its waiting
    /// jobs fail with `error`, the executions blocked on it fail naming
    /// `why_for_blocked`.
    pub(crate) fn give_up(&mut self, key: Digest, error: String, why_for_blocked: String) {
        let exec = self
            .executions
            .remove(&key)
            .expect("an execution to give up");
        self.dirty.executions.insert(key);
        match exec.state {
            ExecState::Queued { .. } => {
                self.queue.remove(exec.rank, key);
            }
            _ => unreachable!("only a queued execution is given up"),
        }
        for &(build_id, job) in &exec.waiters {
            self.fail_job(build_id, job, -1, None, Some(error.clone()));
        }
        self.finish_builds_of(&exec.waiters);
        self.fail_blocked_on(key, &why_for_blocked);
    }
}
