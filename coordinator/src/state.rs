//! The coordinator's replicated state: builds, their jobs and events, the
//! executions in flight (one per cache key) with their leases, the result
//! cache, workers and what their caches hold, and the source blobs stored.
//!
//! [`Model`] is the whole state in memory; [`Model::apply`] is the
//! deterministic transition function openraft drives (time and IDs arrive in
//! the command or come from the log id, iteration is over ordered maps only).
//! Every change marks the records it touched; [`Model::flush`] writes exactly
//! those to the column families, so each log entry is one atomic batch, and
//! [`Model::load`] rebuilds the model from the column families after a
//! restart or a snapshot install. Build events are write-only here: they go
//! to the `events` table and are read from there by watchers.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::ControlFlow;

use distbuild_proto::{Digest, JobId, v1};
use distbuild_raft_store::{ApplyTxn, ReadState, StoreError};

mod staging;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
pub use staging::{MAX_STAGED_SUBMITS, MAX_SUBMIT_PARTS};

/// Finished builds kept (with their events) for late watchers; older ones
/// are dropped, oldest first.
pub const MAX_RETAINED_BUILDS: usize = 1000;

/// Column families of the coordinator's state.
pub const TABLES: &[&str] = &[
    T_BUILDS,
    T_JOBS,
    T_EVENTS,
    T_EXECUTIONS,
    T_RESULTS,
    T_WORKERS,
    T_HOLDINGS,
    T_BLOBS,
    T_META,
    crate::requests::T_REQUESTS,
    staging::T_STAGED,
];
const T_BUILDS: &str = "builds";
const T_JOBS: &str = "jobs";
pub(crate) const T_EVENTS: &str = "events";
const T_EXECUTIONS: &str = "executions";
const T_RESULTS: &str = "results";
const T_WORKERS: &str = "workers";
const T_HOLDINGS: &str = "holdings";
const T_BLOBS: &str = "blobs";
const T_META: &str = "meta";
const KEY_CLOCK: &[u8] = b"clock";

/// A command as the graph wrote it (templates as text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CmdText {
    Exec {
        argv: Vec<String>,
        environ: Vec<String>,
        working_directory: String,
    },
    Cat {
        template: String,
        output: String,
    },
}

impl CmdText {
    /// From the wire form; a command with neither kind becomes an exec with
    /// no program, which workers refuse.
    pub fn from_wire(cmd: v1::Command) -> Self {
        match cmd.kind {
            Some(v1::command::Kind::Cat(cat)) => CmdText::Cat {
                template: cat.template,
                output: cat.output,
            },
            Some(v1::command::Kind::Exec(exec)) => CmdText::Exec {
                argv: exec.argv,
                environ: exec.environ,
                working_directory: exec.working_directory,
            },
            None => CmdText::Exec {
                argv: Vec::new(),
                environ: Vec::new(),
                working_directory: String::new(),
            },
        }
    }

    /// The wire form.
    pub fn to_wire(&self) -> v1::Command {
        let kind = match self.clone() {
            CmdText::Exec {
                argv,
                environ,
                working_directory,
            } => v1::command::Kind::Exec(v1::ExecCommand {
                argv,
                environ,
                working_directory,
            }),
            CmdText::Cat { template, output } => {
                v1::command::Kind::Cat(v1::CatCommand { template, output })
            }
        };
        v1::Command { kind: Some(kind) }
    }
}

/// A source file a job reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRef {
    pub path: String,
    pub digest: Digest,
    pub size: u64,
}

/// A dependency as a job's templates name it, and the cache key whose
/// result is its output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DepRef {
    pub job_id: JobId,
    pub cache_key: Digest,
}

/// Everything a worker needs to run a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub job_id: JobId,
    pub name: String,
    pub cmds: Vec<CmdText>,
    pub inputs: Vec<InputRef>,
    pub deps: Vec<DepRef>,
}

/// One job of a submitted build; the leader validated the graph, ordered
/// the jobs so that dependencies come first, and computed the cache keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmittedJob {
    pub cache_key: Digest,
    /// Indices of its dependencies in the build's job list, each smaller
    /// than its own.
    pub deps: Vec<u32>,
    pub spec: JobSpec,
}

/// How a run ended, as the worker reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Success {
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        artifact: Digest,
        artifact_size: u64,
    },
    Failure {
        exit_code: i32,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        /// Set when the job could not be run at all.
        error: Option<String>,
    },
    /// The job could not start: these dependency artifacts could be
    /// fetched from none of the holders tried (peer addresses, the ones
    /// the assignment named).
    LostInputs { lost: Vec<(Digest, Vec<String>)> },
}

/// A change to the state, proposed by the leader. `now_ms` is the leader's
/// clock when it proposed; the state's clock never goes backwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Part `part` of a submit's job list, kept until the `SubmitBuild`
    /// of the same request ID completes it (see `staging`).
    StageSubmit {
        request_id: String,
        part: u32,
        jobs: Vec<SubmittedJob>,
        now_ms: u64,
    },
    /// Cancels a build that has not finished.
    CancelBuild {
        build_id: u64,
        now_ms: u64,
    },
    /// Records a build: its jobs are the staged parts `0..staged_parts` of
    /// this request, then `jobs`.
    SubmitBuild {
        request_id: String,
        now_ms: u64,
        staged_parts: u32,
        jobs: Vec<SubmittedJob>,
    },
    RegisterWorker {
        worker_id: String,
        addr: String,
        slots: u32,
        held: Vec<Digest>,
        now_ms: u64,
    },
    /// Lease queued executions to a worker; each lease's token is derived
    /// from the entry's log index.
    Assign {
        worker_id: String,
        cache_keys: Vec<Digest>,
        lease_timeout_ms: u64,
        now_ms: u64,
    },
    Heartbeat {
        worker_id: String,
        tokens: Vec<u64>,
        added: Vec<Digest>,
        dropped: Vec<Digest>,
        lease_timeout_ms: u64,
        now_ms: u64,
    },
    Report {
        worker_id: String,
        token: u64,
        cache_key: Digest,
        outcome: Outcome,
        now_ms: u64,
    },
    /// Requeue (or give up on) every execution whose lease expired, and
    /// remove every worker not seen for `worker_timeout_ms` (its leases
    /// expire with it, its holdings are forgotten).
    ExpireLeases {
        now_ms: u64,
        max_attempts: u32,
        worker_timeout_ms: u64,
    },
    /// A new leader's first command: every lease runs at least one more
    /// lease period from `now_ms`, and every worker counts as seen at
    /// `now_ms`, so time the cluster spent without a leader (when no
    /// heartbeat could land) expires no healthy work and removes no worker.
    ExtendLeases {
        now_ms: u64,
        lease_timeout_ms: u64,
    },
    BlobStored {
        digest: Digest,
        size: u64,
    },
}

/// The answer to a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    None,
    BuildSubmitted {
        build_id: u64,
        job_count: u32,
    },
    /// Whether a `CancelBuild` found the build running.
    Cancelled {
        cancelled: bool,
    },
    /// The command was refused, changing nothing: the one-line reason,
    /// and whether the same request may succeed when retried from the
    /// start.
    Refused {
        reason: String,
        retry: bool,
    },
    /// The requested keys and, per key, the lease token, or `None` if it
    /// was no longer queued (a retried poll gets this answer again, keys
    /// included, whatever it would pick now).
    Assigned {
        keys: Vec<Digest>,
        tokens: Vec<Option<u64>>,
    },
    Heartbeat {
        revoked: Vec<u64>,
        reregister: bool,
    },
    Reported {
        accepted: bool,
    },
    /// The leases an `ExpireLeases` ended.
    Expired {
        tokens: Vec<u64>,
    },
}

/// An event of a build, numbered from 0 in its build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    JobStarted {
        job: u32,
        worker_id: String,
    },
    JobFinished {
        job: u32,
        exit_code: i32,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        cached: bool,
        error: Option<String>,
        artifact: Option<(Digest, u64)>,
    },
    JobSkipped {
        job: u32,
        reason: String,
    },
    BuildFinished {
        ok: bool,
        error: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Some dependency has not finished.
    Waiting,
    /// Attached to the execution of its cache key.
    Queued,
    Succeeded,
    Failed,
    Skipped,
}

/// One job of a build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildJob {
    pub spec: JobSpec,
    pub cache_key: Digest,
    pub deps: Vec<u32>,
    pub dependents: Vec<u32>,
    pub pending_deps: u32,
    pub state: JobState,
}

/// A build's summary record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildHeader {
    pub request_id: String,
    pub created_ms: u64,
    pub job_count: u32,
    /// Jobs not yet in a final state.
    pub remaining: u32,
    pub failed: u32,
    pub skipped: u32,
    pub next_event_seq: u64,
    pub finished: bool,
}

#[derive(Debug, Clone)]
pub struct Build {
    pub header: BuildHeader,
    pub jobs: Vec<BuildJob>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecState {
    /// Waiting for a worker (in the queue).
    Queued { since_ms: u64 },
    /// Leased to a worker.
    Running {
        worker_id: String,
        token: u64,
        expires_ms: u64,
    },
    /// Some dependency's artifact was lost: waiting until the executions
    /// rebuilding these dependency cache keys (never empty; each has an
    /// execution) succeed. Neither queued nor leased.
    Blocked { on: BTreeSet<Digest> },
}

/// The one run of a cache key that the builds wanting it wait for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Execution {
    pub spec: JobSpec,
    pub state: ExecState,
    /// Leases that expired so far.
    pub attempts: u32,
    /// (build, job index) waiting for the result; empty for the rebuild
    /// of a lost artifact that no build has asked for again.
    pub waiters: Vec<(u64, u32)>,
}

/// A successful job's cached result (exit code 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub artifact: Digest,
    pub artifact_size: u64,
    /// What produced it: run again if every copy of the artifact is lost.
    pub spec: JobSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct WorkerRecord {
    addr: String,
    slots: u32,
    last_seen_ms: u64,
}

/// A registered worker.
#[derive(Debug, Clone, Default)]
pub struct Worker {
    pub addr: String,
    pub slots: u32,
    pub last_seen_ms: u64,
    /// Leases it holds now.
    pub running: u32,
    /// Artifacts its cache holds.
    pub held: BTreeSet<Digest>,
}

/// Records changed by the entry being applied.
#[derive(Default)]
struct Dirty {
    clock: bool,
    builds: BTreeSet<u64>,
    jobs: BTreeSet<(u64, u32)>,
    events: Vec<(u64, u64, Event)>,
    executions: BTreeSet<Digest>,
    results: BTreeSet<Digest>,
    workers: BTreeSet<String>,
    holdings: BTreeSet<(String, Digest)>,
    blobs: BTreeSet<Digest>,
    removed_builds: Vec<u64>,
    staged_parts: BTreeSet<(String, u32)>,
    unstaged: Vec<String>,
}

/// The coordinator's whole state.
#[derive(Default)]
pub struct Model {
    clock_ms: u64,
    builds: BTreeMap<u64, Build>,
    /// Submit request ID -> build ID (derived from the builds).
    requests: BTreeMap<String, u64>,
    executions: BTreeMap<Digest, Execution>,
    /// (queued since, cache key) of every queued execution (derived).
    queue: BTreeSet<(u64, Digest)>,
    /// Lease token -> cache key (derived).
    leases: BTreeMap<u64, Digest>,
    /// Dependency cache key being rebuilt -> executions blocked on it
    /// (derived from `ExecState::Blocked`).
    blocked_on: BTreeMap<Digest, BTreeSet<Digest>>,
    results: BTreeMap<Digest, CachedResult>,
    workers: BTreeMap<String, Worker>,
    /// Artifact -> workers holding it (derived from `Worker::held`).
    held_by: BTreeMap<Digest, BTreeSet<String>>,
    blobs: BTreeMap<Digest, u64>,
    /// Submits in parts, by request ID, until their last part arrives.
    staged: BTreeMap<String, staging::Staged>,
    dirty: Dirty,
    /// Injected bug, never persisted: see `node::InjectedBugs`.
    pub(crate) accept_expired_lease_results: bool,
}

/// What `assign` found of a queued execution's dependency artifacts.
enum Inputs {
    /// Every one has a holder.
    Available,
    /// These dependency cache keys are being rebuilt.
    Rebuilding(BTreeSet<Digest>),
    /// This dependency's output is gone and its rebuild failed.
    Unrecoverable(Digest),
}

/// Leases per `Assign` entry: token = log index × this + position.
pub const MAX_ASSIGN_BATCH: u64 = 1024;

fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(|source| StoreError::Encode { what, source })
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|source| StoreError::Decode { what, source })
}

/// What `submit` requires of a job list (the leader builds it so; a
/// command that breaks it is refused, not applied): a count that fits the
/// job indices, and every dependency before its dependent.
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
    }
    Ok(())
}

fn build_key(build: u64) -> [u8; 8] {
    build.to_be_bytes()
}

fn job_key(build: u64, job: u32) -> Vec<u8> {
    let mut key = build.to_be_bytes().to_vec();
    key.extend_from_slice(&job.to_be_bytes());
    key
}

/// Key of event `seq` of `build` in the `events` table.
pub fn event_key(build: u64, seq: u64) -> Vec<u8> {
    let mut key = build.to_be_bytes().to_vec();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Decodes an `events` table value.
pub fn decode_event(bytes: &[u8]) -> Result<Event, StoreError> {
    decode("build event", bytes)
}

fn holding_key(worker: &str, digest: &Digest) -> Vec<u8> {
    let mut key = worker.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(digest.as_bytes());
    key
}

fn scan(
    state: &dyn ReadState,
    table: &str,
    prefix: &[u8],
    mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut failure = None;
    state.for_each_prefix(table, prefix, &mut |k, v| match f(k, v) {
        Ok(()) => ControlFlow::Continue(()),
        Err(e) => {
            failure = Some(e);
            ControlFlow::Break(())
        }
    })?;
    failure.map_or(Ok(()), Err)
}

/// Where [`Model::flush`] writes: the entry's transaction (the tests write
/// to a map, to check that [`Model::load`] reads back the same model).
pub(crate) trait Tables: ReadState {
    fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    fn delete(&mut self, table: &str, key: &[u8]) -> Result<(), StoreError>;
}

impl Tables for ApplyTxn<'_> {
    fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        ApplyTxn::put(self, table, key, value)
    }

    fn delete(&mut self, table: &str, key: &[u8]) -> Result<(), StoreError> {
        ApplyTxn::delete(self, table, key)
    }
}

fn digest_of_key(what: &'static str, bytes: &[u8]) -> Result<Digest, StoreError> {
    Digest::try_from(bytes).map_err(|e| StoreError::Config(format!("{what} key: {e}")))
}

impl Model {
    /// Rebuilds the model from the column families.
    pub fn load(state: &dyn ReadState) -> Result<Self, StoreError> {
        let mut model = Model::default();
        if let Some(bytes) = state.get(T_META, KEY_CLOCK)? {
            model.clock_ms = decode("clock", &bytes)?;
        }
        scan(state, T_BUILDS, &[], |k, v| {
            let id = u64::from_be_bytes(
                k.try_into()
                    .map_err(|_| StoreError::Config("build key length".into()))?,
            );
            let header: BuildHeader = decode("build header", v)?;
            model.requests.insert(header.request_id.clone(), id);
            model.builds.insert(
                id,
                Build {
                    header,
                    jobs: Vec::new(),
                },
            );
            Ok(())
        })?;
        for (id, build) in model.builds.iter_mut() {
            scan(state, T_JOBS, &build_key(*id), |_, v| {
                build.jobs.push(decode("build job", v)?);
                Ok(())
            })?;
            assert_eq!(
                build.jobs.len(),
                build.header.job_count as usize,
                "build {id}: stored jobs match its header"
            );
        }
        scan(state, T_EXECUTIONS, &[], |k, v| {
            let key = digest_of_key("execution", k)?;
            let exec: Execution = decode("execution", v)?;
            model.executions.insert(key, exec);
            Ok(())
        })?;
        scan(state, T_RESULTS, &[], |k, v| {
            model
                .results
                .insert(digest_of_key("result", k)?, decode("result", v)?);
            Ok(())
        })?;
        scan(state, T_WORKERS, &[], |k, v| {
            let id = String::from_utf8_lossy(k).into_owned();
            let record: WorkerRecord = decode("worker", v)?;
            model.workers.insert(
                id,
                Worker {
                    addr: record.addr,
                    slots: record.slots,
                    last_seen_ms: record.last_seen_ms,
                    ..Worker::default()
                },
            );
            Ok(())
        })?;
        scan(state, T_HOLDINGS, &[], |k, _| {
            let split = k
                .iter()
                .position(|b| *b == 0)
                .ok_or_else(|| StoreError::Config("holding key without separator".into()))?;
            let worker = String::from_utf8_lossy(&k[..split]).into_owned();
            let digest = digest_of_key("holding", &k[split + 1..])?;
            if let Some(w) = model.workers.get_mut(&worker) {
                w.held.insert(digest);
            }
            model.held_by.entry(digest).or_default().insert(worker);
            Ok(())
        })?;
        scan(state, T_BLOBS, &[], |k, v| {
            model
                .blobs
                .insert(digest_of_key("blob", k)?, decode("blob size", v)?);
            Ok(())
        })?;
        model.load_staged(state)?;
        // Derived indexes.
        for (key, exec) in &model.executions {
            match &exec.state {
                ExecState::Queued { since_ms } => {
                    model.queue.insert((*since_ms, *key));
                }
                ExecState::Running {
                    worker_id, token, ..
                } => {
                    model.leases.insert(*token, *key);
                    if let Some(w) = model.workers.get_mut(worker_id) {
                        w.running += 1;
                    }
                }
                ExecState::Blocked { on } => {
                    assert!(!on.is_empty(), "execution {key} is blocked on something");
                    for dep in on {
                        model.blocked_on.entry(*dep).or_default().insert(*key);
                    }
                }
            }
        }
        for (dep, blocked) in &model.blocked_on {
            assert!(
                model.executions.contains_key(dep),
                "{dep}, which blocks {blocked:?}, is being rebuilt"
            );
        }
        Ok(model)
    }

    /// Applies one committed command; `index` is its log index.
    pub fn apply(&mut self, index: u64, command: &Command) -> Response {
        match command {
            Command::StageSubmit {
                request_id,
                part,
                jobs,
                now_ms,
            } => {
                self.tick(*now_ms);
                match self.stage(request_id, *part, jobs) {
                    Ok(()) => Response::None,
                    Err(reason) => Response::Refused {
                        reason,
                        retry: false,
                    },
                }
            }
            Command::CancelBuild { build_id, now_ms } => {
                self.tick(*now_ms);
                Response::Cancelled {
                    cancelled: self.cancel_build(*build_id),
                }
            }
            Command::SubmitBuild {
                request_id,
                now_ms,
                staged_parts,
                jobs,
            } => {
                self.tick(*now_ms);
                self.submit(index, request_id, *staged_parts, jobs)
            }
            Command::RegisterWorker {
                worker_id,
                addr,
                slots,
                held,
                now_ms,
            } => {
                self.tick(*now_ms);
                self.register(worker_id, addr, *slots, held);
                Response::None
            }
            Command::Assign {
                worker_id,
                cache_keys,
                lease_timeout_ms,
                now_ms,
            } => {
                self.tick(*now_ms);
                self.assign(index, worker_id, cache_keys, *lease_timeout_ms)
            }
            Command::Heartbeat {
                worker_id,
                tokens,
                added,
                dropped,
                lease_timeout_ms,
                now_ms,
            } => {
                self.tick(*now_ms);
                self.heartbeat(worker_id, tokens, added, dropped, *lease_timeout_ms)
            }
            Command::Report {
                worker_id,
                token,
                cache_key,
                outcome,
                now_ms,
            } => {
                self.tick(*now_ms);
                let accepted = self.report(worker_id, *token, cache_key, outcome);
                Response::Reported { accepted }
            }
            Command::ExpireLeases {
                now_ms,
                max_attempts,
                worker_timeout_ms,
            } => {
                self.tick(*now_ms);
                let tokens = self.expire_leases(*max_attempts, *worker_timeout_ms);
                Response::Expired { tokens }
            }
            Command::ExtendLeases {
                now_ms,
                lease_timeout_ms,
            } => {
                self.tick(*now_ms);
                self.extend_leases(*lease_timeout_ms);
                Response::None
            }
            Command::BlobStored { digest, size } => {
                if self.blobs.insert(*digest, *size).is_none() {
                    self.dirty.blobs.insert(*digest);
                }
                Response::None
            }
        }
    }

    fn tick(&mut self, now_ms: u64) {
        if now_ms > self.clock_ms {
            self.clock_ms = now_ms;
            self.dirty.clock = true;
        }
    }

    fn submit(
        &mut self,
        index: u64,
        request_id: &str,
        staged_parts: u32,
        last_part: &[SubmittedJob],
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
        let jobs = &jobs[..];
        let build_id = index;
        let job_count = jobs.len() as u32;
        let mut build_jobs: Vec<BuildJob> = jobs
            .iter()
            .map(|j| BuildJob {
                spec: j.spec.clone(),
                cache_key: j.cache_key,
                deps: j.deps.clone(),
                dependents: Vec::new(),
                pending_deps: j.deps.len() as u32,
                state: JobState::Waiting,
            })
            .collect();
        for (i, job) in jobs.iter().enumerate() {
            for &dep in &job.deps {
                build_jobs[dep as usize].dependents.push(i as u32);
            }
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
                },
                jobs: build_jobs,
            },
        );
        self.requests.insert(request_id.to_string(), build_id);
        self.dirty.builds.insert(build_id);
        for i in 0..job_count {
            self.dirty.jobs.insert((build_id, i));
        }
        let roots: Vec<(u64, u32)> = (0..job_count)
            .filter(|&i| jobs[i as usize].deps.is_empty())
            .map(|i| (build_id, i))
            .collect();
        self.make_ready(roots);
        self.check_finished(build_id);
        Response::BuildSubmitted {
            build_id,
            job_count,
        }
    }

    fn push_event(&mut self, build_id: u64, event: Event) {
        let build = self
            .builds
            .get_mut(&build_id)
            .expect("event for a live build");
        let seq = build.header.next_event_seq;
        build.header.next_event_seq += 1;
        self.dirty.builds.insert(build_id);
        self.dirty.events.push((build_id, seq, event));
    }

    fn job_mut(&mut self, build_id: u64, job: u32) -> &mut BuildJob {
        self.dirty.jobs.insert((build_id, job));
        &mut self
            .builds
            .get_mut(&build_id)
            .expect("job of a live build")
            .jobs[job as usize]
    }

    /// Jobs whose dependencies all succeeded: served from the cache, or
    /// attached to the execution of their cache key.
    fn make_ready(&mut self, jobs: Vec<(u64, u32)>) {
        let mut ready: VecDeque<(u64, u32)> = jobs.into();
        while let Some((build_id, job)) = ready.pop_front() {
            let (key, spec) = {
                let j = self.job_mut(build_id, job);
                debug_assert_eq!(j.state, JobState::Waiting);
                (j.cache_key, j.spec.clone())
            };
            let leaf = self.builds[&build_id].jobs[job as usize]
                .dependents
                .is_empty();
            if leaf
                && self
                    .results
                    .get(&key)
                    .is_some_and(|r| !self.is_held(&r.artifact))
            {
                // The client downloads a leaf's output: a result whose
                // artifact nobody holds cannot answer it, so it is built
                // again. (Other jobs' lost outputs are rebuilt only when a
                // dependent is about to run, see `assign`.)
                self.forget_result(key);
            }
            if let Some(result) = self.results.get(&key).cloned() {
                self.job_mut(build_id, job).state = JobState::Succeeded;
                self.push_event(
                    build_id,
                    Event::JobFinished {
                        job,
                        exit_code: 0,
                        stdout: result.stdout,
                        stderr: result.stderr,
                        cached: true,
                        error: None,
                        artifact: Some((result.artifact, result.artifact_size)),
                    },
                );
                ready.extend(self.job_done(build_id, job));
                continue;
            }
            self.job_mut(build_id, job).state = JobState::Queued;
            self.dirty.executions.insert(key);
            match self.executions.get_mut(&key) {
                Some(exec) => {
                    exec.waiters.push((build_id, job));
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
                        },
                    );
                    self.queue.insert((since_ms, key));
                }
            }
        }
    }

    /// Records that a job reached a final state; returns the dependents that
    /// became ready (when it succeeded).
    fn job_done(&mut self, build_id: u64, job: u32) -> Vec<(u64, u32)> {
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
    fn skip_dependents(&mut self, build_id: u64, job: u32) {
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
    fn skip_job(&mut self, build_id: u64, job: u32, reason: String) {
        self.job_mut(build_id, job).state = JobState::Skipped;
        self.builds
            .get_mut(&build_id)
            .expect("live build")
            .header
            .skipped += 1;
        self.push_event(build_id, Event::JobSkipped { job, reason });
        self.job_done(build_id, job);
    }

    fn check_finished(&mut self, build_id: u64) {
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
        self.retire_old_builds();
    }

    /// Cancels build `build_id`: every job not in a final state is skipped,
    /// leaves the execution of its cache key, and an execution no build
    /// waits for any more (and no other execution is blocked on) is
    /// dropped: its lease, if any, is revoked, so the worker's next
    /// heartbeat stops the job. False if the build was not running.
    fn cancel_build(&mut self, build_id: u64) -> bool {
        let Some(build) = self.builds.get(&build_id) else {
            return false;
        };
        if build.header.finished {
            return false;
        }
        let open: Vec<(u32, JobState, Digest)> = (0u32..)
            .zip(&build.jobs)
            .filter(|(_, j)| matches!(j.state, JobState::Waiting | JobState::Queued))
            .map(|(i, j)| (i, j.state, j.cache_key))
            .collect();
        for (job, state, key) in open {
            if state == JobState::Queued {
                self.leave_execution(key, (build_id, job));
            }
            self.skip_job(build_id, job, "the build was cancelled".to_string());
        }
        let header = &mut self.builds.get_mut(&build_id).expect("live build").header;
        header.finished = true;
        self.dirty.builds.insert(build_id);
        self.push_event(
            build_id,
            Event::BuildFinished {
                ok: false,
                error: Some("the build was cancelled".to_string()),
            },
        );
        self.retire_old_builds();
        true
    }

    /// Takes `waiter` off the execution of `key`; drops the execution if
    /// nothing needs it any more.
    fn leave_execution(&mut self, key: Digest, waiter: (u64, u32)) {
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
            ExecState::Queued { since_ms } => {
                self.queue.remove(&(since_ms, key));
            }
            ExecState::Running {
                worker_id, token, ..
            } => {
                self.leases.remove(&token);
                if let Some(w) = self.workers.get_mut(&worker_id) {
                    w.running -= 1;
                }
            }
            ExecState::Blocked { on } => {
                for dep in on {
                    self.unindex_blocked(dep, key);
                }
            }
        }
    }

    fn retire_old_builds(&mut self) {
        while self.builds.len() > MAX_RETAINED_BUILDS {
            let Some(oldest) = self
                .builds
                .iter()
                .find(|(_, b)| b.header.finished)
                .map(|(id, _)| *id)
            else {
                return;
            };
            let build = self.builds.remove(&oldest).expect("found above");
            self.requests.remove(&build.header.request_id);
            self.dirty.removed_builds.push(oldest);
        }
    }

    fn register(&mut self, worker_id: &str, addr: &str, slots: u32, held: &[Digest]) {
        // A worker that registers has just started: nothing of its earlier
        // life is running any more.
        let stale: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, key)| {
                matches!(&self.executions[*key].state,
                    ExecState::Running { worker_id: w, .. } if w == worker_id)
            })
            .map(|(token, _)| *token)
            .collect();
        for token in stale {
            self.release_lease(token);
        }
        let old_held = self
            .workers
            .get(worker_id)
            .map(|w| w.held.clone())
            .unwrap_or_default();
        let new_held: BTreeSet<Digest> = held.iter().copied().collect();
        for digest in old_held.difference(&new_held) {
            self.drop_holding(worker_id, *digest);
        }
        let worker = self.workers.entry(worker_id.to_string()).or_default();
        worker.addr = addr.to_string();
        worker.slots = slots;
        worker.last_seen_ms = self.clock_ms;
        self.dirty.workers.insert(worker_id.to_string());
        for digest in new_held {
            self.add_holding(worker_id, digest);
        }
    }

    fn add_holding(&mut self, worker_id: &str, digest: Digest) {
        let Some(worker) = self.workers.get_mut(worker_id) else {
            return;
        };
        if worker.held.insert(digest) {
            self.held_by
                .entry(digest)
                .or_default()
                .insert(worker_id.to_string());
            self.dirty.holdings.insert((worker_id.to_string(), digest));
        }
    }

    fn drop_holding(&mut self, worker_id: &str, digest: Digest) {
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

    /// Ends the lease `token`: its execution is queued again.
    fn release_lease(&mut self, token: u64) {
        let key = self.leases.remove(&token).expect("a current lease");
        let exec = self.executions.get_mut(&key).expect("leased execution");
        if let ExecState::Running { worker_id, .. } = &exec.state
            && let Some(w) = self.workers.get_mut(worker_id)
        {
            w.running -= 1;
        }
        exec.state = ExecState::Queued {
            since_ms: self.clock_ms,
        };
        self.queue.insert((self.clock_ms, key));
        self.dirty.executions.insert(key);
    }

    fn assign(
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
            let free = self
                .workers
                .get(worker_id)
                .is_some_and(|w| w.running < w.slots);
            let since = match self.executions.get(key).map(|e| &e.state) {
                Some(ExecState::Queued { since_ms }) if free => *since_ms,
                _ => {
                    tokens.push(None);
                    continue;
                }
            };
            self.queue.remove(&(since, *key));
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
                Inputs::Unrecoverable(dep) => {
                    let exec = self.executions.remove(key).expect("checked above");
                    self.dirty.executions.insert(*key);
                    self.fail_for_lost_dependency(*key, exec, dep, "its rebuild already failed");
                    tokens.push(None);
                    continue;
                }
            }
            let exec = self.executions.get_mut(key).expect("checked above");
            exec.state = ExecState::Running {
                worker_id: worker_id.to_string(),
                token,
                expires_ms: self.clock_ms + lease_timeout_ms,
            };
            let waiters = exec.waiters.clone();
            self.leases.insert(token, *key);
            self.workers.get_mut(worker_id).expect("checked").running += 1;
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

    /// Whether some live worker holds `artifact`.
    fn is_held(&self, artifact: &Digest) -> bool {
        self.held_by.get(artifact).is_some_and(|h| !h.is_empty())
    }

    fn forget_result(&mut self, key: Digest) {
        self.results.remove(&key);
        self.dirty.results.insert(key);
    }

    /// Whether the dependency artifacts of the queued execution of `key`
    /// (queued since `since_ms`) can be fetched. A dependency whose
    /// artifact no worker holds any more is rebuilt: its result is
    /// forgotten (new builds attach to the rebuild instead) and an
    /// execution of its cache key is made sure of, queued as early as this
    /// one so it does not wait behind younger work.
    fn check_inputs(&mut self, key: Digest, since_ms: u64) -> Inputs {
        let deps: BTreeSet<Digest> = self.executions[&key]
            .spec
            .deps
            .iter()
            .map(|d| d.cache_key)
            .collect();
        // Its result was forgotten for a rebuild, and the rebuild ended
        // without one. (Checked first: a doomed execution starts no
        // rebuilds.)
        if let Some(dep) = deps
            .iter()
            .find(|d| !self.results.contains_key(d) && !self.executions.contains_key(d))
        {
            return Inputs::Unrecoverable(*dep);
        }
        let mut on = BTreeSet::new();
        for dep in deps {
            match self.results.get(&dep) {
                Some(result) if self.is_held(&result.artifact) => {}
                Some(result) => {
                    let spec = result.spec.clone();
                    self.forget_result(dep);
                    if let std::collections::btree_map::Entry::Vacant(e) =
                        self.executions.entry(dep)
                    {
                        e.insert(Execution {
                            spec,
                            state: ExecState::Queued { since_ms },
                            attempts: 0,
                            waiters: Vec::new(),
                        });
                        self.queue.insert((since_ms, dep));
                        self.dirty.executions.insert(dep);
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
    fn fail_for_lost_dependency(&mut self, key: Digest, exec: Execution, dep: Digest, why: &str) {
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
                self.fail_job(build_id, job, -1, Vec::new(), Vec::new(), Some(error));
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
    fn fail_blocked_on(&mut self, key: Digest, why: &str) {
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
    fn unblock(&mut self, key: Digest) {
        for blocked in self.blocked_on.remove(&key).unwrap_or_default() {
            let exec = self
                .executions
                .get_mut(&blocked)
                .expect("blocked executions are indexed");
            let ExecState::Blocked { on } = &mut exec.state else {
                unreachable!("blocked_on indexes blocked executions");
            };
            on.remove(&key);
            if on.is_empty() {
                exec.state = ExecState::Queued {
                    since_ms: self.clock_ms,
                };
                self.queue.insert((self.clock_ms, blocked));
            }
            self.dirty.executions.insert(blocked);
        }
    }

    fn unindex_blocked(&mut self, dep: Digest, blocked: Digest) {
        if let Some(set) = self.blocked_on.get_mut(&dep) {
            set.remove(&blocked);
            if set.is_empty() {
                self.blocked_on.remove(&dep);
            }
        }
    }

    /// How job `job` of `build_id` (running `spec`) names its dependency
    /// of cache key `dep`.
    fn dependency_name(&self, build_id: u64, job: u32, spec: &JobSpec, dep: Digest) -> String {
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

    fn heartbeat(
        &mut self,
        worker_id: &str,
        tokens: &[u64],
        added: &[Digest],
        dropped: &[Digest],
        lease_timeout_ms: u64,
    ) -> Response {
        let Some(worker) = self.workers.get_mut(worker_id) else {
            return Response::Heartbeat {
                revoked: tokens.to_vec(),
                reregister: true,
            };
        };
        worker.last_seen_ms = self.clock_ms;
        self.dirty.workers.insert(worker_id.to_string());
        let mut revoked = Vec::new();
        for token in tokens {
            let current = self.leases.get(token).and_then(|key| {
                let exec = self.executions.get_mut(key)?;
                match &mut exec.state {
                    ExecState::Running {
                        worker_id: w,
                        expires_ms,
                        ..
                    } if w == worker_id => {
                        *expires_ms = self.clock_ms + lease_timeout_ms;
                        Some(*key)
                    }
                    _ => None,
                }
            });
            match current {
                Some(key) => {
                    self.dirty.executions.insert(key);
                }
                None => revoked.push(*token),
            }
        }
        for digest in added {
            self.add_holding(worker_id, *digest);
        }
        for digest in dropped {
            self.drop_holding(worker_id, *digest);
        }
        Response::Heartbeat {
            revoked,
            reregister: false,
        }
    }

    fn report(&mut self, worker_id: &str, token: u64, key: &Digest, outcome: &Outcome) -> bool {
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
            match self.executions.get(key).map(|e| e.state.clone()) {
                Some(ExecState::Queued { since_ms }) => {
                    self.queue.remove(&(since_ms, *key));
                }
                Some(ExecState::Running {
                    worker_id: holder,
                    token: newer,
                    ..
                }) => {
                    self.leases.remove(&newer);
                    if let Some(w) = self.workers.get_mut(&holder) {
                        w.running -= 1;
                        self.dirty.workers.insert(holder);
                    }
                }
                _ => return false,
            }
        } else {
            if let Outcome::LostInputs { lost } = outcome {
                self.lost_inputs(token, key, lost);
                if let Some(w) = self.workers.get_mut(worker_id) {
                    w.last_seen_ms = self.clock_ms;
                    self.dirty.workers.insert(worker_id.to_string());
                }
                return true;
            }
            self.leases.remove(&token);
            if let Some(w) = self.workers.get_mut(worker_id) {
                w.running -= 1;
                w.last_seen_ms = self.clock_ms;
                self.dirty.workers.insert(worker_id.to_string());
            }
        }
        let exec = self.executions.remove(key).expect("checked above");
        self.dirty.executions.insert(*key);
        match outcome {
            Outcome::Success {
                stdout,
                stderr,
                artifact,
                artifact_size,
            } => {
                self.results.insert(
                    *key,
                    CachedResult {
                        stdout: stdout.clone(),
                        stderr: stderr.clone(),
                        artifact: *artifact,
                        artifact_size: *artifact_size,
                        spec: exec.spec.clone(),
                    },
                );
                self.dirty.results.insert(*key);
                self.add_holding(worker_id, *artifact);
                self.unblock(*key);
                let mut ready = Vec::new();
                for &(build_id, job) in &exec.waiters {
                    self.job_mut(build_id, job).state = JobState::Succeeded;
                    self.push_event(
                        build_id,
                        Event::JobFinished {
                            job,
                            exit_code: 0,
                            stdout: stdout.clone(),
                            stderr: stderr.clone(),
                            cached: false,
                            error: None,
                            artifact: Some((*artifact, *artifact_size)),
                        },
                    );
                    ready.extend(self.job_done(build_id, job));
                }
                self.make_ready(ready);
            }
            Outcome::LostInputs { .. } => unreachable!("handled above"),
            Outcome::Failure {
                exit_code,
                stdout,
                stderr,
                error,
            } => {
                for &(build_id, job) in &exec.waiters {
                    self.fail_job(
                        build_id,
                        job,
                        *exit_code,
                        stdout.clone(),
                        stderr.clone(),
                        error.clone(),
                    );
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

    /// The current lease `token` of `key` could not start: none of the
    /// holders named for these dependency artifacts served them. The
    /// execution is queued again without counting an attempt (the run
    /// never began), and no worker counts as holding them any more, so
    /// the next assignment rebuilds them. Artifacts that are not this
    /// execution's inputs are ignored: a report cannot make others lost.
    /// Requeues the execution of `key` (no attempt counted) and forgets the
    /// copies of its dependency artifacts that the holders tried could not
    /// serve; an artifact left without a holder is rebuilt when the
    /// execution is leased again.
    fn lost_inputs(&mut self, token: u64, key: &Digest, lost: &[(Digest, Vec<String>)]) {
        let inputs: BTreeSet<Digest> = self.executions[key]
            .spec
            .deps
            .iter()
            .filter_map(|d| self.results.get(&d.cache_key))
            .map(|r| r.artifact)
            .collect();
        self.release_lease(token);
        for (artifact, tried) in lost {
            if !inputs.contains(artifact) {
                continue;
            }
            for holder in self.held_by.get(artifact).cloned().unwrap_or_default() {
                // A holder that registered its copy after the assignment
                // named the holders was not tried: its copy stays.
                let was_tried = self
                    .workers
                    .get(&holder)
                    .is_some_and(|w| tried.contains(&w.addr));
                if was_tried {
                    self.drop_holding(&holder, *artifact);
                }
            }
        }
    }

    fn fail_job(
        &mut self,
        build_id: u64,
        job: u32,
        exit_code: i32,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        error: Option<String>,
    ) {
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
                stdout,
                stderr,
                cached: false,
                error,
                artifact: None,
            },
        );
        self.job_done(build_id, job);
        self.skip_dependents(build_id, job);
    }

    fn finish_builds_of(&mut self, waiters: &[(u64, u32)]) {
        let builds: BTreeSet<u64> = waiters.iter().map(|(b, _)| *b).collect();
        for build_id in builds {
            if self.builds.contains_key(&build_id) {
                self.check_finished(build_id);
            }
        }
    }

    fn extend_leases(&mut self, lease_timeout_ms: u64) {
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
    fn expire_leases(&mut self, max_attempts: u32, worker_timeout_ms: u64) -> Vec<u64> {
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
            let exec = self.executions.get_mut(&key).expect("released above");
            exec.attempts += 1;
            if exec.attempts < max_attempts {
                continue;
            }
            let since = match exec.state {
                ExecState::Queued { since_ms } => since_ms,
                _ => unreachable!("released above"),
            };
            let exec = self.executions.remove(&key).expect("present");
            self.queue.remove(&(since, key));
            let error = format!(
                "gave up after {} attempts: the lease expired each time (last on worker {worker}, which stopped renewing it)",
                exec.attempts
            );
            for &(build_id, job) in &exec.waiters {
                self.fail_job(
                    build_id,
                    job,
                    -1,
                    Vec::new(),
                    Vec::new(),
                    Some(error.clone()),
                );
            }
            self.finish_builds_of(&exec.waiters);
            self.fail_blocked_on(
                key,
                &format!(
                    "its rebuild gave up after {} attempts (the lease expired each time)",
                    exec.attempts
                ),
            );
        }
        for id in dead {
            let held = self.workers[&id].held.clone();
            for digest in held {
                self.drop_holding(&id, digest);
            }
            self.workers.remove(&id);
            self.dirty.workers.insert(id);
        }
        expired
    }

    /// Writes every record the applied entry changed, and forgets the marks.
    pub fn flush(&mut self, txn: &mut ApplyTxn<'_>) -> Result<(), StoreError> {
        self.flush_to(txn)
    }

    pub(crate) fn flush_to(&mut self, txn: &mut impl Tables) -> Result<(), StoreError> {
        let dirty = std::mem::take(&mut self.dirty);
        if dirty.clock {
            txn.put(T_META, KEY_CLOCK, &encode("clock", &self.clock_ms)?)?;
        }
        for build_id in dirty.removed_builds {
            txn.delete(T_BUILDS, &build_key(build_id))?;
            for table in [T_JOBS, T_EVENTS] {
                let mut keys = Vec::new();
                scan(&*txn, table, &build_key(build_id), |k, _| {
                    keys.push(k.to_vec());
                    Ok(())
                })?;
                for key in keys {
                    txn.delete(table, &key)?;
                }
            }
        }
        for build_id in dirty.builds {
            if let Some(build) = self.builds.get(&build_id) {
                txn.put(
                    T_BUILDS,
                    &build_key(build_id),
                    &encode("build header", &build.header)?,
                )?;
            }
        }
        for (build_id, job) in dirty.jobs {
            if let Some(build) = self.builds.get(&build_id) {
                txn.put(
                    T_JOBS,
                    &job_key(build_id, job),
                    &encode("build job", &build.jobs[job as usize])?,
                )?;
            }
        }
        for (build_id, seq, event) in dirty.events {
            if self.builds.contains_key(&build_id) {
                txn.put(
                    T_EVENTS,
                    &event_key(build_id, seq),
                    &encode("build event", &event)?,
                )?;
            }
        }
        for key in dirty.executions {
            match self.executions.get(&key) {
                Some(exec) => txn.put(T_EXECUTIONS, key.as_bytes(), &encode("execution", exec)?)?,
                None => txn.delete(T_EXECUTIONS, key.as_bytes())?,
            }
        }
        for key in dirty.results {
            match self.results.get(&key) {
                Some(result) => txn.put(T_RESULTS, key.as_bytes(), &encode("result", result)?)?,
                None => txn.delete(T_RESULTS, key.as_bytes())?,
            }
        }
        for id in dirty.workers {
            match self.workers.get(&id) {
                Some(w) => txn.put(
                    T_WORKERS,
                    id.as_bytes(),
                    &encode(
                        "worker",
                        &WorkerRecord {
                            addr: w.addr.clone(),
                            slots: w.slots,
                            last_seen_ms: w.last_seen_ms,
                        },
                    )?,
                )?,
                None => txn.delete(T_WORKERS, id.as_bytes())?,
            }
        }
        for (worker, digest) in dirty.holdings {
            let key = holding_key(&worker, &digest);
            let held = self
                .workers
                .get(&worker)
                .is_some_and(|w| w.held.contains(&digest));
            if held {
                txn.put(T_HOLDINGS, &key, &[])?;
            } else {
                txn.delete(T_HOLDINGS, &key)?;
            }
        }
        for digest in dirty.blobs {
            if let Some(size) = self.blobs.get(&digest) {
                txn.put(T_BLOBS, digest.as_bytes(), &encode("blob size", size)?)?;
            }
        }
        self.flush_staged(txn, dirty.unstaged, dirty.staged_parts)?;
        Ok(())
    }

    // ---- Queries (outside apply) ----

    /// The state's clock: the latest leader time applied.
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    pub fn build(&self, id: u64) -> Option<&Build> {
        self.builds.get(&id)
    }

    pub fn build_for_request(&self, request_id: &str) -> Option<u64> {
        self.requests.get(request_id).copied()
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blobs.contains_key(digest)
    }

    /// Every recorded source blob with its size.
    pub fn blobs(&self) -> Vec<(Digest, u64)> {
        self.blobs.iter().map(|(d, s)| (*d, *s)).collect()
    }

    pub fn blob_size(&self, digest: &Digest) -> Option<u64> {
        self.blobs.get(digest).copied()
    }

    pub fn workers(&self) -> &BTreeMap<String, Worker> {
        &self.workers
    }

    pub fn execution(&self, key: &Digest) -> Option<&Execution> {
        self.executions.get(key)
    }

    pub fn result(&self, key: &Digest) -> Option<&CachedResult> {
        self.results.get(key)
    }

    /// Peer addresses of the workers holding `artifact`.
    pub fn holders(&self, artifact: &Digest) -> Vec<String> {
        self.held_by
            .get(artifact)
            .into_iter()
            .flatten()
            .filter_map(|w| self.workers.get(w).map(|w| w.addr.clone()))
            .collect()
    }

    /// Whether an `ExpireLeases` at `now_ms` would change anything: some
    /// lease expired, or some worker was not seen for `worker_timeout_ms`.
    pub fn needs_expiry(&self, now_ms: u64, worker_timeout_ms: u64) -> bool {
        let lease_expired = self.leases.values().any(|key| {
            matches!(&self.executions[key].state,
                ExecState::Running { expires_ms, .. } if *expires_ms <= now_ms)
        });
        lease_expired
            || self
                .workers
                .values()
                .any(|w| w.last_seen_ms.saturating_add(worker_timeout_ms) <= now_ms)
    }

    /// Queued executions for `worker_id`, up to `max`, oldest first, with
    /// locality: an execution whose dependency artifacts another live
    /// worker with a free slot holds more of than this one is left for that
    /// worker until it has waited `locality_wait_ms`.
    pub fn pick_for(
        &self,
        worker_id: &str,
        max: usize,
        now_ms: u64,
        locality_wait_ms: u64,
        alive_ms: u64,
    ) -> Vec<Digest> {
        let Some(me) = self.workers.get(worker_id) else {
            return Vec::new();
        };
        let free = (me.slots.saturating_sub(me.running) as usize).min(max);
        let mut picks = Vec::new();
        for (since_ms, key) in &self.queue {
            if picks.len() >= free {
                break;
            }
            let exec = &self.executions[key];
            let mut bytes_by_worker: BTreeMap<&str, u64> = BTreeMap::new();
            for dep in &exec.spec.deps {
                if let Some(result) = self.results.get(&dep.cache_key) {
                    for holder in self.held_by.get(&result.artifact).into_iter().flatten() {
                        *bytes_by_worker.entry(holder.as_str()).or_default() +=
                            result.artifact_size.max(1);
                    }
                }
            }
            let mine = bytes_by_worker.get(worker_id).copied().unwrap_or(0);
            let better_elsewhere = bytes_by_worker.iter().any(|(w, bytes)| {
                *bytes > mine
                    && *w != worker_id
                    && self.workers.get(*w).is_some_and(|other| {
                        other.running < other.slots
                            && now_ms.saturating_sub(other.last_seen_ms) < alive_ms
                    })
            });
            if !better_elsewhere || now_ms.saturating_sub(*since_ms) >= locality_wait_ms {
                picks.push(*key);
            }
        }
        picks
    }

    /// Whether any execution is queued.
    pub fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests;
