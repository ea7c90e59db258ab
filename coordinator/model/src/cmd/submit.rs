//! `SubmitBuild`: records a build from its staged parts and its last part,
//! then makes its root jobs ready. (`StageSubmit` is in `staging`.)

use crate::log::{Response, SubmittedJob};
use crate::records::{Build, BuildHeader, BuildJob, JobState};
use crate::state::Model;

/// What `submit` requires of a job list (the leader builds it so; a
/// command that breaks it is refused, not applied): a count that fits the
/// job indices, every dependency before its dependent and not a Remote
/// Execution API action (which leaves no artifact to key on), and no
/// dependency given in a spec (they are filled in when the job is ready).
fn check_submitted(jobs: &[SubmittedJob]) -> Result<(), String> {
    if u32::try_from(jobs.len()).is_err() {
        return Err(format!("a submit of {} jobs is too big", jobs.len()));
    }
    for (i, job) in jobs.iter().enumerate() {
        if let Some(&dep) = job.deps.iter().find(|&&dep| dep as usize >= i) {
            return Err(format!(
                "job {i} of the submit depends on job {dep}, which does not come before it"
            ));
        }
        if let Some(&dep) = job
            .deps
            .iter()
            .find(|&&dep| jobs[dep as usize].spec.action.is_some())
        {
            return Err(format!(
                "job {i} of the submit depends on job {dep}, a Remote Execution API action"
            ));
        }
        if !job.spec.deps.is_empty() {
            return Err(format!(
                "job {i} of the submit names its dependencies in its spec, not by index"
            ));
        }
    }
    Ok(())
}

impl Model {
    pub(crate) fn submit(
        &mut self,
        index: u64,
        request_id: &str,
        staged_parts: u32,
        last_part: &[SubmittedJob],
        job_timeout_ms: u64,
    ) -> Response {
        if let Some(&build_id) = self.requests.get(request_id) {
            self.unstage(request_id);
            let job_count = self.builds.get(&build_id).map_or(0, |b| b.header.job_count);
            return Response::BuildSubmitted {
                build_id,
                job_count,
            };
        }
        let mut jobs = match self.take_staged(request_id, staged_parts) {
            Ok(jobs) => jobs,
            Err(part) => {
                return Response::Refused {
                    reason: format!(
                        "part {part} of submit {request_id:?} is not staged (dropped for newer submits); retry the submit"
                    ),
                    retry: true,
                };
            }
        };
        jobs.extend_from_slice(last_part);
        if let Err(reason) = check_submitted(&jobs) {
            return Response::Refused {
                reason,
                retry: false,
            };
        }
        // The leader saw every source stored when it planned the build; one
        // collected since is uploaded again by the retried submit.
        let gone = jobs
            .iter()
            .flat_map(|j| &j.spec.inputs)
            .find(|input| !self.blobs.contains_key(&input.digest.into()));
        if let Some(input) = gone {
            return Response::Refused {
                reason: format!(
                    "source {:?} (blob {}) is no longer stored; retry the submit",
                    input.path, input.digest
                ),
                retry: true,
            };
        }
        // Named by a build: used now.
        for input in jobs.iter().flat_map(|j| &j.spec.inputs) {
            if let Some(blob) = self.blobs.get_mut(&input.digest.into())
                && blob.last_used_ms != self.clock_ms
            {
                blob.last_used_ms = self.clock_ms;
                self.dirty.blobs.insert(input.digest.into());
            }
        }
        let build_id = index;
        let job_count = jobs.len() as u32;
        // The specs move into the build (each job's spec is most of its
        // memory). Extended, not collected: a collect would reuse the job
        // list's allocation, sized for the bigger `SubmittedJob`s.
        let mut build_jobs: Vec<BuildJob> = Vec::with_capacity(jobs.len());
        build_jobs.extend(jobs.into_iter().map(|j| BuildJob {
            spec: std::sync::Arc::new(j.spec),
            cache_key: j.cache_key,
            pending_deps: j.deps.len() as u32,
            deps: j.deps,
            dependents: Vec::new(),
            state: JobState::Waiting,
            output: None,
            artifact: None,
            path_ms: 0,
        }));
        let edges: Vec<(u32, u32)> = (0u32..)
            .zip(&build_jobs)
            .flat_map(|(i, job)| job.deps.iter().map(move |&dep| (dep, i)))
            .collect();
        for (dep, dependent) in edges {
            build_jobs[dep as usize].dependents.push(dependent);
        }
        let roots: Vec<(u64, u32)> = (0u32..)
            .zip(&build_jobs)
            .filter(|(_, job)| job.deps.is_empty())
            .map(|(i, _)| (build_id, i))
            .collect();
        let paths = self.critical_paths(&build_jobs);
        for (job, path_ms) in build_jobs.iter_mut().zip(paths) {
            job.path_ms = path_ms;
        }
        self.builds.insert(
            build_id,
            Build {
                header: BuildHeader {
                    request_id: request_id.to_string(),
                    created_ms: self.clock_ms,
                    job_count,
                    remaining: job_count,
                    failed: 0,
                    skipped: 0,
                    next_event_seq: 0,
                    finished: false,
                    job_timeout_ms,
                    event_bytes: 0,
                    finished_ms: 0,
                },
                jobs: build_jobs,
            },
        );
        self.requests.insert(request_id.to_string(), build_id);
        self.dirty.builds.insert(build_id);
        for i in 0..job_count {
            self.dirty.jobs.insert((build_id, i));
        }
        self.make_ready(roots);
        self.check_finished(build_id);
        Response::BuildSubmitted {
            build_id,
            job_count,
        }
    }
}
