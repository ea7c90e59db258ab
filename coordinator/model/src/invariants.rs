//! The derived indexes, recomputed from the primary maps and compared.
//!
//! The model keeps several indexes beside its primary records so that
//! `apply` never scans everything: the queue, the lease table, the
//! executions blocked on each rebuild, the holders of each artifact, each
//! worker's running count, the submit request IDs, and each build's
//! counters, dependents and pending dependencies, and the references to
//! each stored output. Each transition updates
//! them by hand; [`Model::check_invariants`] recomputes every one of them
//! from the records they derive from and names what differs. Tests and the
//! simulation run it after every apply.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use distbuild_proto::Digest;

use crate::records::{ExecState, JobState};
use crate::state::{Holders, Model};

/// Derived indexes that disagree with the records they derive from, one
/// line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the model's derived state disagrees with its records:\n{}", .0.join("\n"))]
pub struct InvariantViolation(pub Vec<String>);

/// Items shown of a difference.
const SHOWN: usize = 5;

/// Compares a kept index with the one recomputed, noting what differs.
fn compare<K: Ord + Debug, V: PartialEq + Debug>(
    what: &str,
    kept: &BTreeMap<K, V>,
    derived: &BTreeMap<K, V>,
    out: &mut Vec<String>,
) {
    let mut diffs = Vec::new();
    for (k, v) in kept {
        match derived.get(k) {
            None => diffs.push(format!("{k:?} is indexed but derives from nothing")),
            Some(d) if d != v => diffs.push(format!("{k:?} is indexed as {v:?}, derives {d:?}")),
            Some(_) => {}
        }
    }
    for (k, d) in derived {
        if !kept.contains_key(k) {
            diffs.push(format!("{k:?} ({d:?}) derives but is not indexed"));
        }
    }
    if !diffs.is_empty() {
        let more = diffs.len().saturating_sub(SHOWN);
        diffs.truncate(SHOWN);
        let tail = if more > 0 {
            format!("; and {more} more")
        } else {
            String::new()
        };
        out.push(format!("{what}: {}{tail}", diffs.join("; ")));
    }
}

fn as_map<K: Ord + Clone>(set: &BTreeSet<K>) -> BTreeMap<K, ()> {
    set.iter().map(|k| (k.clone(), ())).collect()
}

impl Model {
    /// How many jobs and results name each output row.
    pub(crate) fn derived_output_refs(&self) -> BTreeMap<u64, u32> {
        let mut refs: BTreeMap<u64, u32> = BTreeMap::new();
        let jobs = self.builds.values().flat_map(|b| &b.jobs).map(|j| j.output);
        let results = self.results.values().map(|r| r.output);
        for output in jobs.chain(results).flatten() {
            *refs.entry(output.id).or_default() += 1;
        }
        refs
    }

    /// Recomputes every derived index from the primary records and
    /// compares; Err names each difference.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let mut out = Vec::new();

        let requests: BTreeMap<String, u64> = self
            .builds
            .iter()
            .map(|(id, b)| (b.header.request_id.clone(), *id))
            .collect();
        compare("submit request IDs", &self.requests, &requests, &mut out);

        let mut queue = crate::state::Queue::default();
        let mut running_by_build: BTreeMap<u64, u32> = BTreeMap::new();
        let mut leases = BTreeMap::new();
        let mut blocked_on: BTreeMap<Digest, BTreeSet<Digest>> = BTreeMap::new();
        let mut running: BTreeMap<String, u32> = BTreeMap::new();
        for (key, exec) in &self.executions {
            match &exec.state {
                ExecState::Queued { .. } => {
                    queue.insert(exec.rank, *key);
                }
                ExecState::Running {
                    worker_id, token, ..
                } => {
                    leases.insert(*token, *key);
                    *running_by_build.entry(exec.rank.build).or_default() += 1;
                    if self.workers.contains_key(worker_id) {
                        *running.entry(worker_id.clone()).or_default() += 1;
                    }
                }
                ExecState::Blocked { on } => {
                    if on.is_empty() {
                        out.push(format!("execution {key} is blocked on nothing"));
                    }
                    for dep in on {
                        blocked_on.entry(*dep).or_default().insert(*key);
                    }
                }
            }
        }
        compare(
            "queue",
            &as_map(&self.queue.entries()),
            &as_map(&queue.entries()),
            &mut out,
        );
        if self.queue.by_build.values().any(|q| q.is_empty()) {
            out.push("the queue keeps a build with nothing queued".into());
        }
        compare(
            "running per build",
            &self.running_by_build,
            &running_by_build,
            &mut out,
        );
        let durations_by_age: BTreeSet<(u64, Digest)> = self
            .durations
            .iter()
            .map(|(key, d)| (d.last_run_ms, *key))
            .collect();
        compare(
            "durations by age",
            &as_map(&self.durations_by_age),
            &as_map(&durations_by_age),
            &mut out,
        );
        if self.durations.len() > crate::durations::MAX_DURATIONS {
            out.push(format!(
                "{} expected durations kept, over the bound",
                self.durations.len()
            ));
        }
        compare("leases", &self.leases, &leases, &mut out);
        compare("blocked_on", &self.blocked_on, &blocked_on, &mut out);
        for dep in blocked_on.keys() {
            if !self.executions.contains_key(dep) {
                out.push(format!("{dep} blocks executions but has no execution"));
            }
        }

        let kept_running: BTreeMap<String, u32> = self
            .workers
            .iter()
            .filter(|(_, w)| w.running > 0)
            .map(|(id, w)| (id.clone(), w.running))
            .collect();
        compare("workers' running counts", &kept_running, &running, &mut out);

        let mut held_by: BTreeMap<Digest, Holders> = BTreeMap::new();
        for (id, worker) in &self.workers {
            for digest in &worker.held {
                held_by.entry(*digest).or_default().insert(id);
            }
        }
        compare("held_by", &self.held_by, &held_by, &mut out);

        for (id, build) in &self.builds {
            let header = &build.header;
            let count = |state: JobState| build.jobs.iter().filter(|j| j.state == state).count();
            let open = count(JobState::Waiting) + count(JobState::Queued);
            let counters = [
                ("job_count", header.job_count as usize, build.jobs.len()),
                ("remaining", header.remaining as usize, open),
                ("failed", header.failed as usize, count(JobState::Failed)),
                ("skipped", header.skipped as usize, count(JobState::Skipped)),
            ];
            for (name, kept, derived) in counters {
                if kept != derived {
                    out.push(format!(
                        "build {id}: {name} is {kept}, its jobs say {derived}"
                    ));
                }
            }
            if header.finished && open > 0 {
                out.push(format!("build {id} is finished with {open} jobs open"));
            }
            let mut dependents: Vec<Vec<u32>> = vec![Vec::new(); build.jobs.len()];
            for (i, job) in build.jobs.iter().enumerate() {
                for &dep in &job.deps {
                    match dependents.get_mut(dep as usize) {
                        Some(d) => d.push(i as u32),
                        None => out.push(format!("build {id}: job {i} depends on no job {dep}")),
                    }
                }
            }
            for (i, job) in build.jobs.iter().enumerate() {
                if job.dependents != dependents[i] {
                    out.push(format!(
                        "build {id}: job {i} lists dependents {:?}, its dependents' deps say {:?}",
                        job.dependents, dependents[i]
                    ));
                }
                let pending = job
                    .deps
                    .iter()
                    .filter(|&&d| {
                        build
                            .jobs
                            .get(d as usize)
                            .is_some_and(|d| d.state != JobState::Succeeded)
                    })
                    .count();
                if job.pending_deps as usize != pending {
                    out.push(format!(
                        "build {id}: job {i} waits for {} dependencies, {pending} have not succeeded",
                        job.pending_deps
                    ));
                }
            }
        }
        compare(
            "output references",
            &self.output_refs,
            &self.derived_output_refs(),
            &mut out,
        );
        if out.is_empty() {
            Ok(())
        } else {
            Err(InvariantViolation(out))
        }
    }
}
