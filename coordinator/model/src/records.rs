//! The records the state is made of: builds with their jobs, executions in
//! flight, cached results, workers. Each is stored as it is (postcard) in
//! its table, except a worker, whose held artifacts are rows of their own.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use distbuild_proto::{BlobKey, Digest};
use serde::{Deserialize, Serialize};

use crate::log::{JobSpec, OutputRef, SubmittedJob};

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
    /// Shared with its execution and its cached result (encoded as the
    /// spec itself).
    pub spec: Arc<JobSpec>,
    /// Its job key while it waits for dependencies; its cache key from the
    /// moment it is ready.
    pub cache_key: Digest,
    pub deps: Vec<u32>,
    pub dependents: Vec<u32>,
    pub pending_deps: u32,
    pub state: JobState,
    /// The captured output its `JobFinished` event names (a row of the
    /// `outputs` table), if it finished with any.
    pub output: Option<OutputRef>,
    /// The artifact it succeeded with, which its dependents' cache keys
    /// are made of (none for a Remote Execution API action).
    pub artifact: Option<Digest>,
    /// Its priority: the expected time from its start to the end of its
    /// build along the longest chain of its dependents, itself included
    /// (see `durations`).
    pub path_ms: u64,
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
    /// Time limit of each run of its jobs.
    pub job_timeout_ms: u64,
    /// Bytes of its events, encoded, and of the outputs they show: what
    /// keeping it for late watchers costs.
    pub event_bytes: u64,
    /// The state's clock when it finished (0 while it runs).
    pub finished_ms: u64,
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
        /// The state's clock when the lease began: a run's duration, for
        /// the expected durations of later builds.
        started_ms: u64,
    },
    /// Some dependency's artifact was lost: waiting until the executions
    /// rebuilding these dependency cache keys (never empty; each has an
    /// execution) succeed. Neither queued nor leased.
    Blocked { on: BTreeSet<Digest> },
}

/// The one run of a cache key that the builds wanting it wait for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Execution {
    pub spec: Arc<JobSpec>,
    pub state: ExecState,
    /// Leases that expired so far.
    pub attempts: u32,
    /// (build, job index) waiting for the result; empty for the rebuild
    /// of a lost artifact that no build has asked for again.
    pub waiters: Vec<(u64, u32)>,
    /// Time limit of a run: the longest of its waiting builds' (a rebuild
    /// takes the limit of the execution that needed it).
    pub timeout_ms: u64,
    /// Where it stands in the queue.
    pub rank: Rank,
}

/// A queued execution's place: the build it runs for (the first that
/// asked for it; a rebuild takes the build of the execution that needed
/// it), the longest expected path from it to the end of that build, and
/// its position in the build's job list (dependencies first, roots in
/// the graph's order), which breaks ties.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Rank {
    pub build: u64,
    pub path_ms: u64,
    pub order: u32,
}

/// How long runs of one kind of job took (by `durations::duration_key`):
/// what the scheduler expects the next to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurationRecord {
    /// A moving average of its runs' durations (lease to report).
    pub expected_ms: u64,
    /// The state's clock at its latest run (the least recently run are
    /// forgotten first).
    pub last_run_ms: u64,
}

impl Execution {
    /// Whether `worker` may run it: a Remote Execution API action only on
    /// a worker with every platform property it asks for.
    pub fn runs_on(&self, worker: &Worker) -> bool {
        self.spec
            .action
            .as_ref()
            .is_none_or(|action| action.runs_on(&worker.properties))
    }
}

/// A successful job's cached result (exit code 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedResult {
    /// Its captured output (a row of the `outputs` table), if any.
    pub output: Option<OutputRef>,
    /// What keeping it costs: its record and its output, encoded.
    pub bytes: u64,
    /// The state's clock when it was made or last answered a job (the
    /// least recently used go first).
    pub last_used_ms: u64,
    pub artifact: Digest,
    pub artifact_size: u64,
    /// What produced it: run again if every copy of the artifact is lost.
    pub spec: Arc<JobSpec>,
}

/// A run's captured stdout and stderr: stored once, in the `outputs`
/// table under the log index of the report that brought it, and named by
/// every event and result that shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOutput {
    // Encoded as postcard encodes any byte vector (a length, then the
    // bytes), but decoded in one copy rather than byte by byte.
    #[serde(with = "serde_bytes")]
    pub stdout: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub stderr: Vec<u8>,
    /// A Remote Execution API run's encoded `ActionResult` (empty for
    /// other jobs): how the caller of `Execute` learns the result, cached
    /// or not.
    #[serde(with = "serde_bytes")]
    pub action_result: Vec<u8>,
}

impl JobOutput {
    pub fn len(&self) -> usize {
        self.stdout.len() + self.stderr.len() + self.action_result.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A stored source blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRecord {
    pub size: u64,
    /// The state's clock when it was last uploaded or named by a submitted
    /// build (the least recently used go first).
    pub last_used_ms: u64,
}

/// A Remote Execution API action's cached result, as a client stored it
/// (`UpdateActionResult`) or a run produced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionResultRecord {
    /// The encoded `ActionResult` message.
    #[serde(with = "serde_bytes")]
    pub result: Vec<u8>,
    /// The CAS blobs it names (outputs, trees, stdout, stderr) with their
    /// sizes: a result some of whose blobs are gone is not served.
    pub blobs: Vec<(BlobKey, u64)>,
    /// The state's clock when it was stored or last served (the least
    /// recently used go first).
    pub last_used_ms: u64,
}

/// A registered worker.
#[derive(Debug, Clone, Default)]
pub struct Worker {
    pub addr: String,
    /// Jobs it runs at once.
    pub slots: u32,
    /// Leases it may hold beyond `slots`: a job held ahead starts on the
    /// worker as soon as a slot frees, while the report of the job before
    /// it is still on its way. Given only while no other live worker has
    /// a free slot (see `schedule`).
    pub ahead: u32,
    pub last_seen_ms: u64,
    /// Leases it holds now (running, or held ahead).
    pub running: u32,
    /// Artifacts its cache holds.
    pub held: BTreeSet<Digest>,
    /// Its platform properties (name, value), sorted.
    pub properties: Vec<(String, String)>,
    /// Leaving: it takes no new work (`DrainWorker`) until it deregisters
    /// or registers again.
    pub draining: bool,
}

/// The parts of one submit staged so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Staged {
    /// The state's clock when its latest part was staged (an abandoned
    /// submit gives way to a new one).
    pub(crate) last_part_ms: u64,
    /// Its whole job list's size, encoded: the room it was admitted with.
    pub(crate) reserved_bytes: u64,
    pub(crate) parts: BTreeMap<u32, Vec<SubmittedJob>>,
}
