//! `Report`: a worker's result under its lease.

use distbuild_proto::Digest;

use crate::durations::duration_key;
use crate::gc::result_bytes;
use crate::log::Outcome;
use crate::records::{CachedResult, ExecState, JobOutput};
use crate::state::Model;
use crate::tally::RunEnd;

/// A `Report` command's fields.
pub(crate) struct Reported<'a> {
    pub worker_id: &'a str,
    pub token: u64,
    pub key: &'a Digest,
    pub outcome: &'a Outcome,
    pub max_attempts: u32,
    /// How long the job waited on its worker for a slot.
    pub queued_ms: u64,
}

impl Model {
    pub(crate) fn report(&mut self, index: u64, reported: &Reported<'_>) -> bool {
        let Reported {
            worker_id,
            token,
            key,
            outcome,
            max_attempts,
            queued_ms,
        } = *reported;
        let current = self.leases.get(&token) == Some(key)
            && matches!(
                self.executions.get(key).map(|e| &e.state),
                Some(ExecState::Running { worker_id: w, token: t, .. }) if w == worker_id && *t == token
            );
        if !current {
            // Injected bug (simulation only): a success reported under an
            // expired lease is taken while its job waits to run again, or
            // runs again under a newer lease (which is dropped).
            if !self.accept_expired_lease_results || !matches!(outcome, Outcome::Success { .. }) {
                return false;
            }
            let Some(exec) = self.executions.get(key) else {
                return false;
            };
            let rank = exec.rank;
            match exec.state.clone() {
                ExecState::Queued { .. } => {
                    self.queue.remove(rank, *key);
                }
                ExecState::Running {
                    worker_id: holder,
                    token: newer,
                    ..
                } => {
                    self.leases.remove(&newer);
                    self.lease_ended(&holder, rank.build);
                    self.dirty.workers.insert(holder);
                }
                _ => return false,
            }
        } else {
            if let Outcome::LostInputs { lost } = outcome {
                // An empty list is the leader handing back a lease it
                // could not describe: no run was tried.
                if let Some(ExecState::Running { started_ms, .. }) =
                    self.executions.get(key).map(|e| &e.state)
                    && !lost.is_empty()
                {
                    let ran_ms = self
                        .clock_ms
                        .saturating_sub(*started_ms)
                        .saturating_sub(queued_ms);
                    self.tally.runs.push((RunEnd::LostInputs, ran_ms));
                }
                let counts = self.lost_inputs(token, key, lost);
                if let Some(w) = self.workers.get_mut(worker_id) {
                    w.last_seen_ms = self.clock_ms;
                    self.dirty.workers.insert(worker_id.to_string());
                }
                // A run that could not fetch its inputs is an attempt (an
                // empty list is the leader handing back a lease it could
                // not describe: no run was tried; digests that are not its
                // inputs are a confused report, not a failed fetch).
                if counts {
                    self.count_lost_inputs_attempt(*key, lost, max_attempts);
                }
                return true;
            }
            self.leases.remove(&token);
            let exec = &self.executions[key];
            if let ExecState::Running { started_ms, .. } = exec.state {
                // A job held ahead waited on its worker for a slot: not
                // part of its run, nor of what its kind is expected to take.
                let ran_ms = self
                    .clock_ms
                    .saturating_sub(started_ms)
                    .saturating_sub(queued_ms);
                let end = match outcome {
                    Outcome::Success { .. } | Outcome::Executed { exit_code: 0, .. } => {
                        RunEnd::Success
                    }
                    _ => RunEnd::Failure,
                };
                self.tally.runs.push((end, ran_ms));
                let build = exec.rank.build;
                let kind = duration_key(&exec.spec);
                self.record_duration(kind, ran_ms);
                self.lease_ended(worker_id, build);
            }
            if let Some(w) = self.workers.get_mut(worker_id) {
                w.last_seen_ms = self.clock_ms;
                self.dirty.workers.insert(worker_id.to_string());
            }
        }
        let exec = self.executions.remove(key).expect("checked above");
        self.dirty.executions.insert(*key);
        // A worker that knows nothing of Remote Execution API actions
        // (older than they are) ran none of it: its "success" is no result
        // and must not be cached as one.
        if exec.spec.action.is_some() && matches!(outcome, Outcome::Success { .. }) {
            let output = None;
            for &(build_id, job) in &exec.waiters {
                self.fail_job(
                    build_id,
                    job,
                    -1,
                    output,
                    Some("the worker does not run Remote Execution API actions".into()),
                );
            }
            self.finish_builds_of(&exec.waiters);
            return true;
        }
        match outcome {
            Outcome::Success {
                stdout,
                stderr,
                artifact,
                artifact_size,
            } => {
                let output = self.new_output(index, stdout, stderr);
                self.ref_output(output);
                let mut result = CachedResult {
                    output,
                    bytes: 0,
                    last_used_ms: self.clock_ms,
                    artifact: *artifact,
                    artifact_size: *artifact_size,
                    spec: exec.spec.clone(),
                };
                result.bytes = result_bytes(&result);
                let replaced = self.results.insert(*key, result);
                self.unref_output(replaced.and_then(|r| r.output));
                self.dirty.results.insert(*key);
                self.add_holding(worker_id, *artifact);
                self.unblock(*key);
                let mut ready = Vec::new();
                for &(build_id, job) in &exec.waiters {
                    let artifact = Some((*artifact, *artifact_size));
                    ready.extend(self.succeed_job(build_id, job, output, artifact, false));
                }
                self.make_ready(ready);
            }
            Outcome::LostInputs { .. } => unreachable!("handled above"),
            Outcome::Executed {
                exit_code,
                stdout,
                stderr,
                result,
                blobs,
            } => {
                let output = self.new_output_with(
                    index,
                    JobOutput {
                        stdout: stdout.clone(),
                        stderr: stderr.clone(),
                        action_result: result.clone(),
                    },
                );
                let Some(action) = &exec.spec.action else {
                    // A worker confused about what it ran: not a result.
                    let why = "the worker reported an action result for a job that is not a Remote Execution API action";
                    for &(build_id, job) in &exec.waiters {
                        self.fail_job(build_id, job, *exit_code, output, Some(why.into()));
                    }
                    self.fail_blocked_on(*key, &format!("its rebuild failed: {why}"));
                    self.finish_builds_of(&exec.waiters);
                    return true;
                };
                // Every blob it names was stored (and recorded) before the
                // report; one collected since makes the result unservable,
                // so it is not cached (its caller still gets it).
                let stored = blobs.iter().all(|(blob, size)| {
                    *size == 0 || self.blobs.get(blob).is_some_and(|b| b.size == *size)
                });
                if *exit_code == 0 && !action.do_not_cache && stored {
                    self.action_result_stored(&action.instance_name, action.action, result, blobs);
                }
                if *exit_code == 0 {
                    let mut ready = Vec::new();
                    for &(build_id, job) in &exec.waiters {
                        ready.extend(self.succeed_job(build_id, job, output, None, false));
                    }
                    self.make_ready(ready);
                } else {
                    for &(build_id, job) in &exec.waiters {
                        self.fail_job(build_id, job, *exit_code, output, None);
                    }
                }
            }
            Outcome::Failure {
                exit_code,
                stdout,
                stderr,
                error,
            } => {
                let output = self.new_output(index, stdout, stderr);
                for &(build_id, job) in &exec.waiters {
                    self.fail_job(build_id, job, *exit_code, output, error.clone());
                }
                let why = match error {
                    Some(error) => format!("its rebuild failed: {error}"),
                    None => format!("its rebuild exited with code {exit_code}"),
                };
                self.fail_blocked_on(*key, &why);
            }
        }
        self.finish_builds_of(&exec.waiters);
        true
    }
}
