//! The log's format: what the leader proposes ([`Proposal`], a
//! [`Command`] inside), what applying it answers ([`Response`]), and the
//! [`Event`]s a build's watchers read. Every replica writes these bytes
//! (postcard) to its log and tables, so they are an interface between
//! versions: `tests/golden.rs` pins them, and a deliberate change bumps the
//! store's format number.

use distbuild_proto::{BlobKey, Digest, JobId, graph, v1};
use serde::{Deserialize, Serialize};

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

    /// A parsed graph's command, its templates' texts moved (the same as
    /// its wire form's).
    pub fn from_graph(cmd: graph::Cmd) -> Self {
        let texts = |templates: Vec<graph::Template>| -> Vec<String> {
            templates.into_iter().map(|t| t.text).collect()
        };
        match cmd {
            graph::Cmd::Exec {
                argv,
                environ,
                working_directory,
            } => CmdText::Exec {
                argv: texts(argv),
                environ: texts(environ),
                working_directory: working_directory.map(|t| t.text).unwrap_or_default(),
            },
            graph::Cmd::Cat { template, output } => CmdText::Cat {
                template: template.text,
                output: output.text,
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

/// A dependency as a job's templates name it, the cache key whose result
/// is its output, and that output's artifact (part of the job's own cache
/// key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DepRef {
    pub job_id: JobId,
    pub cache_key: Digest,
    pub artifact: Digest,
}

/// A Remote Execution API action a job runs instead of commands: the
/// worker reads the Action, its Command and input root from the CAS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteAction {
    pub instance_name: String,
    /// The Action message's digest (its function is every digest's).
    pub action: BlobKey,
    pub action_size: u64,
    /// The result is not kept in the action cache.
    pub do_not_cache: bool,
    /// Platform properties (name, value), sorted: only a worker that has
    /// every one of them runs it.
    pub platform: Vec<(String, String)>,
}

impl RemoteAction {
    /// Whether a worker with these (sorted) properties may run it.
    pub fn runs_on(&self, properties: &[(String, String)]) -> bool {
        self.platform
            .iter()
            .all(|wanted| properties.binary_search(wanted).is_ok())
    }
}

/// Everything a worker needs to run a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub job_id: JobId,
    pub name: String,
    pub cmds: Vec<CmdText>,
    pub inputs: Vec<InputRef>,
    /// Filled in when the job becomes ready (a submitted job gives its
    /// dependencies as indices, see `SubmittedJob`).
    pub deps: Vec<DepRef>,
    /// Set for a Remote Execution API action (then `cmds`, `inputs` and
    /// `deps` are empty). Boxed: most jobs have none, and unboxed it
    /// would be nearly half of every spec (encoded the same either way).
    pub action: Option<Box<RemoteAction>>,
}

/// One job of a submitted build; the leader validated the graph, ordered
/// the jobs so that dependencies come first, and computed the job keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmittedJob {
    /// Its job key (`distbuild_proto::job_key`): its cache key once its
    /// dependencies' outputs are known, see `Model::resolve`.
    pub cache_key: Digest,
    /// Indices of its dependencies in the build's job list, each smaller
    /// than its own.
    pub deps: Vec<u32>,
    pub spec: JobSpec,
}

/// A stored output as events, jobs and results name it: its row in the
/// `outputs` table, and its size (what retaining it costs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OutputRef {
    pub id: u64,
    pub bytes: u64,
}

/// The limits a `CollectGarbage` applies (the leader's flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcLimits {
    /// A blob no build needs is dropped once unused this long.
    pub blob_retention_ms: u64,
    /// Bytes of source blobs kept, at most (those builds in flight need are
    /// kept whatever their size).
    pub max_blob_bytes: u64,
    /// Cached results kept, at most.
    pub max_results: u64,
    /// Bytes of cached results (records and outputs) kept, at most.
    pub max_result_bytes: u64,
}

/// What one collection dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collected {
    pub blobs: u32,
    pub blob_bytes: u64,
    pub results: u32,
    /// Remote Execution API action results dropped.
    pub action_results: u32,
}

/// How a run ended, as the worker reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    // Outputs: the same bytes as a plain byte vector's encoding, decoded
    // in one copy (see `JobOutput`).
    Success {
        #[serde(with = "serde_bytes")]
        stdout: Vec<u8>,
        #[serde(with = "serde_bytes")]
        stderr: Vec<u8>,
        artifact: Digest,
        artifact_size: u64,
    },
    Failure {
        exit_code: i32,
        #[serde(with = "serde_bytes")]
        stdout: Vec<u8>,
        #[serde(with = "serde_bytes")]
        stderr: Vec<u8>,
        /// Set when the job could not be run at all.
        error: Option<String>,
    },
    /// The job could not start: these dependency artifacts could be
    /// fetched from none of the holders tried (peer addresses, the ones
    /// the assignment named).
    LostInputs { lost: Vec<(Digest, Vec<String>)> },
    /// A Remote Execution API action's command ran, whatever its exit
    /// code: `result` is the encoded `ActionResult`, `blobs` the CAS blobs
    /// it names (stored before the report). Its job succeeds when the exit
    /// code is 0; the result is cached unless the action says not to.
    Executed {
        exit_code: i32,
        #[serde(with = "serde_bytes")]
        stdout: Vec<u8>,
        #[serde(with = "serde_bytes")]
        stderr: Vec<u8>,
        #[serde(with = "serde_bytes")]
        result: Vec<u8>,
        blobs: Vec<(BlobKey, u64)>,
    },
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
        /// The encoded size of all the submit's staged parts: the room
        /// the submit is admitted with when its first part arrives.
        total_bytes: u64,
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
        /// Time limit of each of its jobs' runs (the leader resolved the
        /// caller's request against its defaults and bounds).
        job_timeout_ms: u64,
    },
    RegisterWorker {
        worker_id: String,
        addr: String,
        slots: u32,
        /// Leases it may hold beyond its slots, each started as a slot
        /// frees (see [`crate::records::Worker::ahead`]).
        ahead: u32,
        held: Vec<Digest>,
        /// Its platform properties (name, value), sorted.
        properties: Vec<(String, String)>,
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
        /// Runs an execution may have whose inputs could not be fetched
        /// (like lease expiries, each counts as an attempt) before its jobs
        /// fail.
        max_attempts: u32,
        /// How long the job waited on the worker for a slot after its
        /// lease was granted (a lease held ahead): not part of its run.
        queued_ms: u64,
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
        digest: BlobKey,
        size: u64,
    },
    /// Stores a Remote Execution API action's result under (instance
    /// name, action digest), replacing any before it.
    ActionResultStored {
        instance_name: String,
        action: BlobKey,
        #[serde(with = "serde_bytes")]
        result: Vec<u8>,
        blobs: Vec<(BlobKey, u64)>,
        now_ms: u64,
    },
    /// Records that recorded blobs and action results were used now (a
    /// Remote Execution API client found them, or was served them), so
    /// collection takes the least recently used; unknown ones are skipped.
    Used {
        blobs: Vec<BlobKey>,
        action_results: Vec<(String, BlobKey)>,
        now_ms: u64,
    },
    /// Drops what no build in flight needs beyond the limits (see `gc`).
    CollectGarbage {
        now_ms: u64,
        limits: GcLimits,
    },
    /// Proposals of concurrent callers carried by one entry, applied in
    /// order as if each were its own entry (see [`Proposal::parts`]); at
    /// most [`MAX_BATCH`], none a batch itself.
    Batch {
        proposals: Vec<Proposal>,
    },
    /// The worker is leaving: it is given no new work (its leases run
    /// on) until it deregisters, or registers again.
    DrainWorker {
        worker_id: String,
        now_ms: u64,
    },
    /// The worker left: its leases are handed back (queued again, no
    /// attempt counted: they were not lost) and its holdings forgotten.
    DeregisterWorker {
        worker_id: String,
        now_ms: u64,
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
    /// Refused for now, changing nothing: a bound is reached that frees up
    /// as work in progress completes (the staging area is full); the same
    /// request may succeed later.
    Busy {
        reason: String,
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
    /// What a `CollectGarbage` dropped.
    Collected(Collected),
    /// A `Batch`'s answers, one per proposal in order.
    Batch {
        responses: Vec<Response>,
    },
    /// Whether the worker a `DrainWorker` or `DeregisterWorker` named was
    /// registered.
    Worker {
        found: bool,
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
        /// Its captured stdout and stderr, stored once per run (a row of
        /// the `outputs` table; none when both were empty).
        output: Option<OutputRef>,
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

impl Command {
    /// The leader's clock stamped into the command, if it carries one.
    pub fn now_ms(&self) -> Option<u64> {
        match self {
            Command::StageSubmit { now_ms, .. }
            | Command::CancelBuild { now_ms, .. }
            | Command::SubmitBuild { now_ms, .. }
            | Command::RegisterWorker { now_ms, .. }
            | Command::Assign { now_ms, .. }
            | Command::Heartbeat { now_ms, .. }
            | Command::Report { now_ms, .. }
            | Command::ExpireLeases { now_ms, .. }
            | Command::ExtendLeases { now_ms, .. }
            | Command::ActionResultStored { now_ms, .. }
            | Command::Used { now_ms, .. }
            | Command::CollectGarbage { now_ms, .. }
            | Command::DrainWorker { now_ms, .. }
            | Command::DeregisterWorker { now_ms, .. } => Some(*now_ms),
            Command::BlobStored { .. } | Command::Batch { .. } => None,
        }
    }
}

/// What the log carries: a command, and the ID of the request that asked
/// for it when a retry of that request must not apply it twice (see
/// the `requests` module).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub request_id: Option<String>,
    pub command: Command,
}

impl Proposal {
    /// A command nobody retries by ID (the leader's own, or one that is
    /// idempotent by itself).
    pub fn once(command: Command) -> Self {
        Self {
            request_id: None,
            command,
        }
    }

    /// What the entry at `log_index` applies, in order, each with the
    /// index it is applied as ([`command_index`]): a batch's proposals,
    /// else the proposal itself. None for a batch over [`MAX_BATCH`]
    /// (nothing of it is applied).
    pub fn parts(&self, log_index: u64) -> Option<Vec<(u64, &Proposal)>> {
        match &self.command {
            Command::Batch { proposals } if proposals.len() > MAX_BATCH => None,
            Command::Batch { proposals } => Some(
                proposals
                    .iter()
                    .enumerate()
                    .map(|(position, p)| (command_index(log_index, position), p))
                    .collect(),
            ),
            _ => Some(vec![(command_index(log_index, 0), self)]),
        }
    }
}

/// Proposals one entry carries, at most.
pub const MAX_BATCH: usize = 64;

/// The index the proposal at `position` of the entry at `log_index` is
/// applied as: every ID derived from an index (build IDs, lease tokens,
/// output rows) stays unique and grows with the log, batched or not.
pub fn command_index(log_index: u64, position: usize) -> u64 {
    debug_assert!(position < MAX_BATCH);
    log_index * MAX_BATCH as u64 + position as u64
}
