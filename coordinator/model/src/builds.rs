//! How a build progresses, whichever command moves it: events, jobs
//! becoming ready (served from the cache or attached to an execution),
//! finishing, failing, skipping dependents, and retiring old builds.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use distbuild_proto::{Digest, resolved_key};

use crate::log::{DepRef, Event, OutputRef};
use crate::records::{BuildJob, ExecState, Execution, JobState, Rank};
use crate::state::Model;

/// Finished builds kept (with their events) for late watchers; older ones
/// are dropped, oldest first.
pub const MAX_RETAINED_BUILDS: usize = 1000;
/// Bytes of finished builds' events (outputs included) kept; past it the
/// builds that finished first are dropped.
pub const MAX_RETAINED_EVENT_BYTES: u64 = 256 << 20;
/// A finished build is kept at least this long (state time) whatever the
/// bounds, so that its watchers can read its end.
pub const MIN_RETAINED_MS: u64 = 60_000;

impl Model {
    pub(crate) fn push_event(&mut self, build_id: u64, event: Event) {
        let build = self
            .builds
            .get_mut(&build_id)
            .expect("event for a live build");
        let seq = build.header.next_event_seq;
        build.header.next_event_seq += 1;
        build.header.event_bytes +=
            postcard::experimental::serialized_size(&event).unwrap_or(0) as u64;
        self.dirty.builds.insert(build_id);
        self.tally.event(&event);
        self.dirty.events.push((build_id, seq, event));
    }

    /// Job `job` of `build_id` finishes showing `output`: it keeps a
    /// reference to the row until its build is retired.
    pub(crate) fn finished_with_output(
        &mut self,
        build_id: u64,
        job: u32,
        output: Option<OutputRef>,
    ) {
        self.ref_output(output);
        self.job_mut(build_id, job).output = output;
    }

    pub(crate) fn job_mut(&mut self, build_id: u64, job: u32) -> &mut BuildJob {
        self.dirty.jobs.insert((build_id, job));
        &mut self
            .builds
            .get_mut(&build_id)
            .expect("job of a live build")
            .jobs[job as usize]
    }

    /// Gives ready job `job` of `build_id` its cache key and its spec the
    /// dependencies, from what they produced (the `cache_key` module of
    /// `distbuild-proto`): a dependency rebuilt into the same bytes leaves
    /// its dependents cached (early cutoff). Deterministic: a hash of the
    /// state.
    fn resolve(&mut self, build_id: u64, job: u32) {
        let build = &self.builds[&build_id];
        let this = &build.jobs[job as usize];
        if this.deps.is_empty() {
            return;
        }
        let deps: Vec<DepRef> = this
            .deps
            .iter()
            .map(|&d| {
                let dep = &build.jobs[d as usize];
                DepRef {
                    job_id: dep.spec.job_id,
                    cache_key: dep.cache_key,
                    // `submit` refuses a dependency on an action, the only
                    // job that succeeds without an artifact.
                    artifact: dep
                        .artifact
                        .expect("a succeeded dependency has an artifact"),
                }
            })
            .collect();
        let key = resolved_key(&this.cache_key, deps.iter().map(|d| &d.artifact));
        let this = self.job_mut(build_id, job);
        this.cache_key = key;
        // A waiting job's spec is its own (no execution or result shares
        // it yet): filled in place.
        Arc::make_mut(&mut this.spec).deps = deps;
    }

    /// Jobs whose dependencies all succeeded: served from the cache, or
    /// attached to the execution of their cache key.
    pub(crate) fn make_ready(&mut self, jobs: Vec<(u64, u32)>) {
        let mut ready: VecDeque<(u64, u32)> = jobs.into();
        while let Some((build_id, job)) = ready.pop_front() {
            self.resolve(build_id, job);
            let (key, spec, path_ms, leaf) = {
                let j = self.job_mut(build_id, job);
                debug_assert_eq!(j.state, JobState::Waiting);
                (
                    j.cache_key,
                    j.spec.clone(),
                    j.path_ms,
                    j.dependents.is_empty(),
                )
            };
            // One lookup of the result: every job of a cached rebuild
            // comes here, and the table has as many rows as jobs.
            let mut unheld = false;
            let cached = match self.results.get_mut(&key) {
                // The client downloads a leaf's output: a result whose
                // artifact nobody holds cannot answer it, so it is built
                // again. (Other jobs' lost outputs are rebuilt only when a
                // dependent is about to run, see `assign`.)
                Some(result)
                    if leaf && !crate::index::is_held_in(&self.held_by, &result.artifact) =>
                {
                    unheld = true;
                    None
                }
                Some(result) => {
                    if crate::gc::records_use(result.last_used_ms, self.clock_ms) {
                        result.last_used_ms = self.clock_ms;
                        self.dirty.results.insert(key);
                    }
                    Some((result.output, result.artifact, result.artifact_size))
                }
                None => None,
            };
            if unheld {
                self.forget_result(key);
            }
            if let Some((output, artifact, artifact_size)) = cached {
                let cached = true;
                ready.extend(self.succeed_job(
                    build_id,
                    job,
                    output,
                    Some((artifact, artifact_size)),
                    cached,
                ));
                continue;
            }
            self.job_mut(build_id, job).state = JobState::Queued;
            self.tally.cache_misses += 1;
            self.dirty.executions.insert(key);
            let timeout_ms = self.builds[&build_id].header.job_timeout_ms;
            match self.executions.get_mut(&key) {
                Some(exec) => {
                    exec.waiters.push((build_id, job));
                    // A later run (a retry) gets the longest limit asked.
                    exec.timeout_ms = exec.timeout_ms.max(timeout_ms);
                    if let ExecState::Running { worker_id, .. } = &exec.state {
                        let worker_id = worker_id.clone();
                        self.push_event(build_id, Event::JobStarted { job, worker_id });
                    }
                }
                None => {
                    let since_ms = self.clock_ms;
                    self.executions.insert(
                        key,
                        Execution {
                            spec,
                            state: ExecState::Queued { since_ms },
                            attempts: 0,
                            waiters: vec![(build_id, job)],
                            timeout_ms,
                            rank: Rank {
                                build: build_id,
                                path_ms,
                                order: job,
                            },
                        },
                    );
                    self.enqueue(key, since_ms);
                }
            }
        }
    }

    /// Records that a job reached a final state; returns the dependents that
    /// became ready (when it succeeded).
    pub(crate) fn job_done(&mut self, build_id: u64, job: u32) -> Vec<(u64, u32)> {
        let build = self.builds.get_mut(&build_id).expect("live build");
        build.header.remaining -= 1;
        self.dirty.builds.insert(build_id);
        let succeeded = build.jobs[job as usize].state == JobState::Succeeded;
        let mut ready = Vec::new();
        if succeeded {
            for dependent in build.jobs[job as usize].dependents.clone() {
                let d = &mut build.jobs[dependent as usize];
                d.pending_deps -= 1;
                self.dirty.jobs.insert((build_id, dependent));
                if d.pending_deps == 0 && d.state == JobState::Waiting {
                    ready.push((build_id, dependent));
                }
            }
        }
        ready
    }

    /// Skips every job that (transitively) depends on the failed `job`.
    pub(crate) fn skip_dependents(&mut self, build_id: u64, job: u32) {
        let mut work: VecDeque<u32> = VecDeque::from([job]);
        while let Some(cause) = work.pop_front() {
            let build = self.builds.get(&build_id).expect("live build");
            let cause_job = &build.jobs[cause as usize];
            let verb = if cause_job.state == JobState::Failed {
                "failed"
            } else {
                "was skipped"
            };
            let reason = format!(
                "dependency {:?} ({}) {verb}",
                cause_job.spec.name, cause_job.spec.job_id
            );
            for dependent in cause_job.dependents.clone() {
                let state = self.builds[&build_id].jobs[dependent as usize].state;
                if state != JobState::Waiting {
                    continue;
                }
                self.skip_job(build_id, dependent, reason.clone());
                work.push_back(dependent);
            }
        }
    }

    /// Marks `job` skipped for `reason` (a final state) and reports it.
    pub(crate) fn skip_job(&mut self, build_id: u64, job: u32, reason: String) {
        self.job_mut(build_id, job).state = JobState::Skipped;
        self.builds
            .get_mut(&build_id)
            .expect("live build")
            .header
            .skipped += 1;
        self.push_event(build_id, Event::JobSkipped { job, reason });
        self.job_done(build_id, job);
    }

    pub(crate) fn check_finished(&mut self, build_id: u64) {
        let header = &self.builds[&build_id].header;
        if header.finished || header.remaining > 0 {
            return;
        }
        let ok = header.failed == 0 && header.skipped == 0;
        let error = (!ok).then(|| {
            format!(
                "{} of {} jobs failed, {} skipped",
                header.failed, header.job_count, header.skipped
            )
        });
        self.builds
            .get_mut(&build_id)
            .expect("live build")
            .header
            .finished = true;
        self.push_event(build_id, Event::BuildFinished { ok, error });
        self.finish_retention(build_id);
    }

    /// Build `build_id` just finished: what keeping it costs is final (its
    /// events, and each output its jobs show, counted once), and finished
    /// builds past the bounds are retired, those that finished first
    /// first, but none that finished less than [`MIN_RETAINED_MS`] ago
    /// (their watchers may still be reading).
    pub(crate) fn finish_retention(&mut self, build_id: u64) {
        let now = self.clock_ms;
        let build = self.builds.get_mut(&build_id).expect("live build");
        build.header.finished_ms = now;
        let outputs: BTreeMap<u64, u64> = build
            .jobs
            .iter()
            .filter_map(|j| j.output)
            .map(|o| (o.id, o.bytes))
            .collect();
        build.header.event_bytes += outputs.values().sum::<u64>();
        self.dirty.builds.insert(build_id);
        self.retire_old_builds();
    }

    fn retire_old_builds(&mut self) {
        let mut finished_bytes: u64 = self
            .builds
            .values()
            .filter(|b| b.header.finished)
            .map(|b| b.header.event_bytes)
            .sum();
        let mut retirable: Vec<(u64, u64)> = self
            .builds
            .iter()
            .filter(|(_, b)| {
                b.header.finished
                    && b.header.finished_ms.saturating_add(MIN_RETAINED_MS) <= self.clock_ms
            })
            .map(|(id, b)| (b.header.finished_ms, *id))
            .collect();
        retirable.sort_unstable();
        for (_, oldest) in retirable {
            if self.builds.len() <= MAX_RETAINED_BUILDS
                && finished_bytes <= MAX_RETAINED_EVENT_BYTES
            {
                return;
            }
            let build = self.builds.remove(&oldest).expect("found above");
            finished_bytes -= build.header.event_bytes;
            for job in &build.jobs {
                self.unref_output(job.output);
            }
            self.requests.remove(&build.header.request_id);
            self.dirty.removed_builds.push(oldest);
        }
    }

    /// Finishes `job` of `build_id` with exit code 0, showing `output` and
    /// `artifact`; returns the dependents that became ready.
    pub(crate) fn succeed_job(
        &mut self,
        build_id: u64,
        job: u32,
        output: Option<OutputRef>,
        artifact: Option<(Digest, u64)>,
        cached: bool,
    ) -> Vec<(u64, u32)> {
        self.finished_with_output(build_id, job, output);
        let this = self.job_mut(build_id, job);
        this.state = JobState::Succeeded;
        this.artifact = artifact.map(|(digest, _)| digest);
        self.push_event(
            build_id,
            Event::JobFinished {
                job,
                exit_code: 0,
                output,
                cached,
                error: None,
                artifact,
            },
        );
        self.job_done(build_id, job)
    }

    pub(crate) fn fail_job(
        &mut self,
        build_id: u64,
        job: u32,
        exit_code: i32,
        output: Option<OutputRef>,
        error: Option<String>,
    ) {
        self.finished_with_output(build_id, job, output);
        self.job_mut(build_id, job).state = JobState::Failed;
        self.builds
            .get_mut(&build_id)
            .expect("live build")
            .header
            .failed += 1;
        self.push_event(
            build_id,
            Event::JobFinished {
                job,
                exit_code,
                output,
                cached: false,
                error,
                artifact: None,
            },
        );
        self.job_done(build_id, job);
        self.skip_dependents(build_id, job);
    }

    pub(crate) fn finish_builds_of(&mut self, waiters: &[(u64, u32)]) {
        let builds: BTreeSet<u64> = waiters.iter().map(|(b, _)| *b).collect();
        for build_id in builds {
            if self.builds.contains_key(&build_id) {
                self.check_finished(build_id);
            }
        }
    }
}
