//! The rebuild of lost inputs. When an execution is about to be leased and
//! a dependency's output has no holder left, that output's result is
//! forgotten, its producer runs again (recursively, for whatever it lost in
//! turn), and the execution waits blocked until the rebuilds succeed; if a
//! rebuild fails, the jobs waiting on it fail naming the lost dependency.
//! A worker that could fetch an input from none of the holders it tried
//! reports `LostInputs`: only those copies are forgotten.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use distbuild_proto::Digest;

use crate::log::JobSpec;
use crate::records::{ExecState, Execution, Rank};
use crate::state::Model;

pub(crate) enum Inputs {
    /// Every one has a holder.
    Available,
    /// These dependency cache keys are being rebuilt.
    Rebuilding(BTreeSet<Digest>),
    /// This dependency's output is gone and cannot be had again, for this
    /// reason.
    Unrecoverable(Digest, &'static str),
}

/// Why a dependency whose rebuild ended without a result is unrecoverable.
const REBUILD_FAILED: &str = "its rebuild already failed";
/// Why one rebuilt into other bytes is: the execution's cache key was made
/// of the old ones, so its result would be filed under the wrong key.
const REBUILT_DIFFERENTLY: &str = "it was built again into different bytes (it is not deterministic), and this job's cache key was made of the old ones; build again";

impl Model {
    /// Whether the dependency artifacts of the queued execution of `key`
    /// (queued since `since_ms`) can be fetched. A dependency whose
    /// artifact no worker holds any more is rebuilt: its result is
    /// forgotten (new builds attach to the rebuild instead) and an
    /// execution of its cache key is made sure of, queued as early as this
    /// one so it does not wait behind younger work.
    pub(crate) fn check_inputs(&mut self, key: Digest, since_ms: u64) -> Inputs {
        let (timeout_ms, rank) = (self.executions[&key].timeout_ms, self.executions[&key].rank);
        let deps: BTreeMap<Digest, Digest> = self.executions[&key]
            .spec
            .deps
            .iter()
            .map(|d| (d.cache_key, d.artifact))
            .collect();
        // Its result was forgotten for a rebuild, and the rebuild ended
        // without one; or the rebuild gave other bytes. (Checked first: a
        // doomed execution starts no rebuilds.)
        for (dep, artifact) in &deps {
            match self.results.get(dep) {
                None if !self.executions.contains_key(dep) => {
                    return Inputs::Unrecoverable(*dep, REBUILD_FAILED);
                }
                Some(result) if result.artifact != *artifact => {
                    return Inputs::Unrecoverable(*dep, REBUILT_DIFFERENTLY);
                }
                _ => {}
            }
        }
        let mut on = BTreeSet::new();
        for dep in deps.into_keys() {
            match self.results.get(&dep) {
                Some(result) if self.is_held(&result.artifact) => {}
                Some(result) => {
                    let spec = result.spec.clone();
                    self.forget_result(dep);
                    if let std::collections::btree_map::Entry::Vacant(e) =
                        self.executions.entry(dep)
                    {
                        // It runs for the same build, just before the
                        // execution that needs it.
                        e.insert(Execution {
                            spec,
                            state: ExecState::Queued { since_ms },
                            attempts: 0,
                            waiters: Vec::new(),
                            timeout_ms,
                            rank: Rank {
                                path_ms: rank.path_ms.saturating_add(1),
                                ..rank
                            },
                        });
                        self.enqueue(dep, since_ms);
                        self.tally.lost_input_rebuilds += 1;
                    }
                    on.insert(dep);
                }
                // Already being rebuilt (checked above).
                None => {
                    on.insert(dep);
                }
            }
        }
        if on.is_empty() {
            Inputs::Available
        } else {
            Inputs::Rebuilding(on)
        }
    }

    /// The execution of `key` (removed by the caller) cannot run: its
    /// dependency `dep` lost its output and no rebuild produced it again
    /// (`why`). Its waiting jobs fail naming the dependency, and so,
    /// transitively, do the executions blocked on it.
    pub(crate) fn fail_for_lost_dependency(
        &mut self,
        key: Digest,
        exec: Execution,
        dep: Digest,
        why: &str,
    ) {
        let mut work = VecDeque::from([(key, exec, dep, why.to_string())]);
        while let Some((key, exec, dep, why)) = work.pop_front() {
            if let ExecState::Blocked { on } = &exec.state {
                for other in on {
                    self.unindex_blocked(*other, key);
                }
            }
            for &(build_id, job) in &exec.waiters {
                let error = format!(
                    "the output of dependency {} was lost and could not be rebuilt: {why}",
                    self.dependency_name(build_id, job, &exec.spec, dep)
                );
                self.fail_job(build_id, job, -1, None, Some(error));
            }
            self.finish_builds_of(&exec.waiters);
            for blocked in self.blocked_on.remove(&key).unwrap_or_default() {
                let next = self
                    .executions
                    .remove(&blocked)
                    .expect("blocked executions are indexed");
                self.dirty.executions.insert(blocked);
                work.push_back((
                    blocked,
                    next,
                    key,
                    "its rebuild needed a lost output that could not be rebuilt".to_string(),
                ));
            }
        }
    }

    /// Fails every execution blocked on the execution of `key`, which
    /// ended without a result (`why`).
    pub(crate) fn fail_blocked_on(&mut self, key: Digest, why: &str) {
        for blocked in self.blocked_on.remove(&key).unwrap_or_default() {
            let exec = self
                .executions
                .remove(&blocked)
                .expect("blocked executions are indexed");
            self.dirty.executions.insert(blocked);
            self.fail_for_lost_dependency(blocked, exec, key, why);
        }
    }

    /// Queues again the executions that were blocked only on the rebuild
    /// of `key`, which just succeeded.
    pub(crate) fn unblock(&mut self, key: Digest) {
        for blocked in self.blocked_on.remove(&key).unwrap_or_default() {
            let exec = self
                .executions
                .get_mut(&blocked)
                .expect("blocked executions are indexed");
            let ExecState::Blocked { on } = &mut exec.state else {
                unreachable!("blocked_on indexes blocked executions");
            };
            on.remove(&key);
            let unblocked = on.is_empty();
            self.dirty.executions.insert(blocked);
            if unblocked {
                self.enqueue(blocked, self.clock_ms);
            }
        }
    }

    /// How job `job` of `build_id` (running `spec`) names its dependency
    /// of cache key `dep`.
    pub(crate) fn dependency_name(
        &self,
        build_id: u64,
        job: u32,
        spec: &JobSpec,
        dep: Digest,
    ) -> String {
        let build = &self.builds[&build_id];
        build.jobs[job as usize]
            .deps
            .iter()
            .map(|&d| &build.jobs[d as usize])
            .find(|d| d.cache_key == dep)
            .map(|d| format!("{:?} ({})", d.spec.name, d.spec.job_id))
            .or_else(|| {
                spec.deps
                    .iter()
                    .find(|d| d.cache_key == dep)
                    .map(|d| d.job_id.to_string())
            })
            .unwrap_or_else(|| format!("of cache key {dep}"))
    }

    /// Requeues the execution of `key` and forgets the copies of its
    /// dependency artifacts that the holders tried could not serve; an
    /// artifact left without a holder is rebuilt when the execution is
    /// leased again. Returns whether any artifact reported lost is one of
    /// its inputs (the caller counts the attempt).
    pub(crate) fn lost_inputs(
        &mut self,
        token: u64,
        key: &Digest,
        lost: &[(Digest, Vec<String>)],
    ) -> bool {
        let inputs: BTreeSet<Digest> = self.executions[key]
            .spec
            .deps
            .iter()
            .filter_map(|d| self.results.get(&d.cache_key))
            .map(|r| r.artifact)
            .collect();
        self.release_lease(token);
        let mut any_input = false;
        for (artifact, tried) in lost {
            if !inputs.contains(artifact) {
                continue;
            }
            any_input = true;
            let holders = self.held_by.get(artifact).cloned().unwrap_or_default();
            for holder in &holders {
                // A holder that registered its copy after the assignment
                // named the holders was not tried: its copy stays.
                let was_tried = self
                    .workers
                    .get(holder)
                    .is_some_and(|w| tried.contains(&w.addr));
                if was_tried {
                    self.drop_holding(holder, *artifact);
                }
            }
        }
        any_input
    }
}
