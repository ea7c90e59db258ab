//! The worker's main loops: register with the coordinators, long-poll for
//! work while a slot is free, run each assignment as a task, heartbeat
//! (renewing leases, reporting cache changes, stopping revoked jobs) and
//! report results. Serves the peer API on the caller's listener.
//!
//! Through failovers: every call carries a request ID ([`RequestIds`], from
//! `distbuild_proto::leader`) that its retries reuse, so the coordinators
//! apply it once and answer a retry with the first answer. Registration, polls and heartbeats retry until
//! the cluster answers (a worker never gives up on it); a result report
//! retries for a few lease periods. Failing heartbeats never stop a job:
//! only a lease the coordinators revoke, or a registration they forgot,
//! does.

mod drain;
mod slot;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use distbuild_proto::Digest;
use distbuild_proto::leader::RequestIds;
use distbuild_proto::v1::peer_api_server::PeerApiServer;
use distbuild_proto::v1::{
    Assignment, HeartbeatRequest, LostInput, PollWorkRequest, RegisterRequest, ReportResultRequest,
};
use distbuild_proto::wire::{
    KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_CACHE_CHANGES_PER_HEARTBEAT, MAX_HELD_PER_REGISTER,
    MAX_HOLDERS_LISTED, MAX_MESSAGE_BYTES, MAX_TRIED_HOLDERS_PER_REPORT, digest_to_wire,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::action::{ActionOutcome, ActionSpec, run_action};
use crate::cache::Cache;
use crate::connect::{SharedConnector, TcpConnector};
use crate::coordinator::{Backoff, CoordinatorClient, Persistence};
use crate::job::{JobEnv, JobOutcome, JobSpec, run_job};
use crate::peer::PeerService;
use crate::process::{ProcessRunner, TokioProcessRunner};
use crate::tree::remove_tree;
use crate::turns::{Priority, RunSlots, Ticket};
use distbuild_proto::auth::Access;
use distbuild_proto::tls::{Role, Security};
use tonic::service::interceptor::InterceptedService;

/// Default cache bound: 10 GiB.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 10 << 30;
/// How long a `PollWork` long poll waits on the coordinator.
pub const DEFAULT_POLL_WAIT_MS: u64 = 2000;
/// Margin added to a long poll's wait for its deadline.
pub const POLL_DEADLINE_MARGIN: Duration = Duration::from_secs(5);
/// Most cache changes waiting for a heartbeat; beyond it new ones are
/// forgotten (stale holder lists cost peers a retry, nothing more).
pub const MAX_PENDING_CHANGES: usize = 100_000;
/// A result report is retried (through failovers) for this many lease
/// periods, then given up (the lease expires and the job runs again).
pub const REPORT_RETRY_LEASE_PERIODS: u32 = 3;
/// The shortest time a result report is retried, however short the lease.
pub const MIN_REPORT_RETRY_WINDOW: Duration = Duration::from_secs(10);
/// Heartbeat interval used until the coordinator names one, and the bounds
/// any interval it names is clamped to.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);
/// Lease period assumed until the coordinator names one.
pub const DEFAULT_LEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds of one heartbeat attempt's deadline (otherwise the interval): an
/// attempt stuck on a node that cannot commit moves on to the next node
/// well within the lease period.
const MIN_HEARTBEAT_DEADLINE: Duration = Duration::from_millis(500);
const MAX_HEARTBEAT_DEADLINE: Duration = Duration::from_secs(2);
/// A poll answered faster than this with nothing is followed by a pause,
/// so a coordinator that does not wait cannot make the worker spin.
const MIN_EMPTY_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Everything the worker runs with. The seams (connector, process runner)
/// are fields so tests and simulations can pass their own.
#[derive(Clone)]
pub struct WorkerConfig {
    /// Coordinator addresses (`HOST:PORT`), tried in order.
    pub coordinators: Vec<String>,
    /// The peer address announced to coordinators; `None`: the listener's.
    pub advertise_addr: Option<String>,
    /// Holds the cache, the sandboxes, and the worker ID.
    pub cache_dir: PathBuf,
    /// Jobs run at once (at least 1).
    pub slots: usize,
    /// Leases held beyond `slots` (at most `slots`; `None`: as many as
    /// `slots`), each started as a slot frees: the slot does not wait for
    /// its report's round trip.
    pub jobs_ahead: Option<usize>,
    /// Bound on the cache's size.
    pub cache_max_bytes: u64,
    /// How long each long poll waits on the coordinator.
    pub poll_wait_ms: u64,
    /// Dials coordinators and peers.
    pub connector: SharedConnector,
    /// How the peer server admits connections and callers (workers and
    /// clients).
    pub access: Access,
    /// The worker's ID when its certificate names it (a worker may act
    /// only as the ID its certificate names); `None`: the ID kept in the
    /// cache directory.
    pub worker_id: Option<String>,
    /// Runs job processes.
    pub runner: Arc<dyn ProcessRunner>,
    /// Platform properties (name, value) matched against what Remote
    /// Execution API actions ask for.
    pub properties: Vec<(String, String)>,
    /// Where the worker counts what `/metrics` shows.
    pub metrics: Arc<crate::metrics::WorkerMetrics>,
    /// Cancelled to drain: take no new work, finish, hand off, leave
    /// (`distbuild worker` cancels it on SIGTERM).
    pub drain: CancellationToken,
    /// How long a drain may take before running jobs are stopped and
    /// handed back.
    pub drain_timeout: Duration,
}

impl WorkerConfig {
    /// Defaults for everything but the coordinators and the cache
    /// directory: one slot per CPU, a 10 GiB cache, TCP and real processes.
    pub fn new(coordinators: Vec<String>, cache_dir: PathBuf) -> Self {
        Self {
            coordinators,
            advertise_addr: None,
            cache_dir,
            slots: default_slots(),
            jobs_ahead: None,
            properties: Vec::new(),
            cache_max_bytes: DEFAULT_CACHE_MAX_BYTES,
            poll_wait_ms: DEFAULT_POLL_WAIT_MS,
            connector: Arc::new(TcpConnector::default()),
            access: Access::for_security(&Security::Insecure),
            worker_id: None,
            runner: Arc::new(TokioProcessRunner::default()),
            metrics: Arc::default(),
            drain: CancellationToken::new(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

/// Outputs of draining workers copied at once (see `drain`).
pub const MAX_COPIES_AT_ONCE: usize = 4;

/// How long a drain may take by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a worker with its cache in `cache_dir` makes its jobs'
/// directories: `slot-<n>/<lease>/` for each slot's job.
pub fn sandbox_root(cache_dir: &Path) -> PathBuf {
    cache_dir.join("sandbox")
}

/// One slot per CPU.
pub fn default_slots() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Lost inputs as a report names them: as many as fit the coordinators'
/// bound on tried holders (the rest are found lost again on the next
/// attempt), and always at least one.
fn lost_inputs_to_wire(lost: &[(Digest, Vec<String>)]) -> Vec<LostInput> {
    let mut named = 0;
    let mut wire = Vec::new();
    for (digest, tried) in lost {
        let tried: Vec<String> = tried.iter().take(MAX_HOLDERS_LISTED).cloned().collect();
        named += tried.len();
        if !wire.is_empty() && named > MAX_TRIED_HOLDERS_PER_REPORT {
            break;
        }
        wire.push(LostInput {
            digest: digest_to_wire(digest),
            tried_holders: tried,
        });
    }
    wire
}

/// Cache additions and removals not yet told to the coordinator: digest ->
/// present. The latest change of a digest wins.
#[derive(Default)]
struct CacheChanges {
    pending: BTreeMap<Digest, bool>,
}

impl CacheChanges {
    fn record(&mut self, digest: Digest, present: bool) {
        if self.pending.len() >= MAX_PENDING_CHANGES && !self.pending.contains_key(&digest) {
            return;
        }
        self.pending.insert(digest, present);
    }

    /// Up to `MAX_CACHE_CHANGES_PER_HEARTBEAT` changes, removed from the pending.
    fn take_batch(&mut self) -> Vec<(Digest, bool)> {
        let batch: Vec<(Digest, bool)> = self
            .pending
            .iter()
            .take(MAX_CACHE_CHANGES_PER_HEARTBEAT)
            .map(|(d, p)| (*d, *p))
            .collect();
        for (digest, _) in &batch {
            self.pending.remove(digest);
        }
        batch
    }

    /// Puts back a batch that was not delivered; changes made since win.
    fn restore(&mut self, batch: Vec<(Digest, bool)>) {
        for (digest, present) in batch {
            if !self.pending.contains_key(&digest) {
                self.record(digest, present);
            }
        }
    }
}

/// A job this worker is running.
struct RunningJob {
    cancel: CancellationToken,
    /// Its run ended and its result is on its way: a revocation no longer
    /// stops it (see [`Worker::report`]).
    reporting: bool,
}

struct Worker {
    worker_id: String,
    peer_addr: String,
    slots: usize,
    /// Leases held beyond `slots` (see [`WorkerConfig::jobs_ahead`]).
    jobs_ahead: usize,
    /// Platform properties, "KEY=VALUE", sent at registration.
    properties: Vec<String>,
    poll_wait_ms: u64,
    sandbox_root: PathBuf,
    slot_numbers: slot::SlotNumbers,
    env: JobEnv,
    coordinator: Arc<CoordinatorClient>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Leases it may take: one per slot and one per job held ahead.
    free_slots: Arc<Semaphore>,
    /// The slots leased jobs' commands run in.
    run_slots: RunSlots,
    jobs: Arc<Mutex<BTreeMap<u64, RunningJob>>>,
    changes: Mutex<CacheChanges>,
    request_ids: RequestIds,
    heartbeat_interval_ms: AtomicU64,
    lease_timeout_ms: AtomicU64,
    /// Serialises registrations; counts them, so a caller that asked for
    /// one while another was under way does not register twice.
    registrations: tokio::sync::Mutex<u64>,
    metrics: Arc<crate::metrics::WorkerMetrics>,
    /// Cancelled once the worker drains (see `drain`).
    draining: CancellationToken,
    /// The last heartbeat answer said this draining worker may leave.
    may_leave: std::sync::atomic::AtomicBool,
    /// The leader knows this worker drains (its `Drain` was answered).
    told_draining: std::sync::atomic::AtomicBool,
    /// A heartbeat answer since said the leader does not (a registration
    /// ended the drain on its side): tell it again.
    drain_forgotten: std::sync::atomic::AtomicBool,
    /// Copies for draining workers being fetched.
    copies: Mutex<std::collections::BTreeSet<Digest>>,
    copy_slots: Semaphore,
}

impl Worker {
    fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.load(Ordering::Relaxed))
    }

    fn lease_timeout(&self) -> Duration {
        Duration::from_millis(self.lease_timeout_ms.load(Ordering::Relaxed))
    }

    /// Jobs running now.
    fn running(&self) -> usize {
        self.jobs.lock().expect("jobs lock poisoned").len()
    }

    /// Counts a job or action about to be reported, assigned at
    /// `assigned`.
    fn count_report(&self, request: &ReportResultRequest, assigned: tokio::time::Instant) {
        let outcome = if !request.lost_inputs.is_empty() {
            "lost_inputs"
        } else if request.exit_code == 0 && request.error.is_empty() {
            "succeeded"
        } else {
            "failed"
        };
        self.metrics.job_reported(outcome, assigned.elapsed());
    }

    /// Sleeps `delay` unless shutting down; false when shutting down.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = self.shutdown.cancelled() => false,
        }
    }

    /// Registers, retrying until it succeeds or the worker shuts down
    /// (false). `seen` is the registration count the caller saw before
    /// deciding to register; if another registration happened since, it
    /// stands.
    async fn register(&self, seen: u64) -> bool {
        let mut count = self.registrations.lock().await;
        if *count != seen {
            return true;
        }
        // The full list supersedes pending changes: clear them first, so a
        // change made after the listing stays pending.
        self.changes
            .lock()
            .expect("changes lock poisoned")
            .pending
            .clear();
        let _ = self.env.cache.take_evicted();
        // What does not fit in the registration is reported as additions
        // by the next heartbeats (as many as the pending changes hold).
        let mut held = self
            .env
            .cache
            .digests(MAX_HELD_PER_REGISTER + MAX_PENDING_CHANGES);
        let rest = held.split_off(held.len().min(MAX_HELD_PER_REGISTER));
        // One registration, however many times it is sent: applied twice
        // (the first answer lost), it would drop leases given in between.
        let request = RegisterRequest {
            worker_id: self.worker_id.clone(),
            addr: self.peer_addr.clone(),
            slots: u32::try_from(self.slots).unwrap_or(u32::MAX),
            ahead: u32::try_from(self.jobs_ahead).unwrap_or(u32::MAX),
            held_artifacts: held.iter().map(digest_to_wire).collect(),
            request_id: self.request_ids.next("register"),
            properties: self.properties.clone(),
        };
        let mut backoff = Backoff::new();
        loop {
            let result = tokio::select! {
                result = self.coordinator.register(request.clone(), Persistence::UntilAnswered) => result,
                () = self.shutdown.cancelled() => return false,
                // Leaving before it could register: nothing to hand off.
                () = self.draining.cancelled() => return false,
            };
            match result {
                Ok(response) => {
                    let interval = if response.heartbeat_interval_ms == 0 {
                        DEFAULT_HEARTBEAT_INTERVAL
                    } else {
                        Duration::from_millis(response.heartbeat_interval_ms)
                            .clamp(MIN_HEARTBEAT_INTERVAL, MAX_HEARTBEAT_INTERVAL)
                    };
                    self.heartbeat_interval_ms
                        .store(interval.as_millis() as u64, Ordering::Relaxed);
                    let lease_timeout = if response.lease_timeout_ms == 0 {
                        DEFAULT_LEASE_TIMEOUT
                    } else {
                        Duration::from_millis(response.lease_timeout_ms)
                    };
                    self.lease_timeout_ms
                        .store(lease_timeout.as_millis() as u64, Ordering::Relaxed);
                    *count += 1;
                    {
                        let mut changes = self.changes.lock().expect("changes lock poisoned");
                        for digest in &rest {
                            // A change made since the listing wins.
                            if !changes.pending.contains_key(digest) {
                                changes.record(*digest, true);
                            }
                        }
                    }
                    tracing::info!(
                        held = held.len(),
                        reported_later = rest.len(),
                        lease_timeout_ms = response.lease_timeout_ms,
                        heartbeat_interval_ms = interval.as_millis() as u64,
                        "registered"
                    );
                    return true;
                }
                Err(e) => {
                    // Refused (retryable failures were retried by the
                    // client): try again, slower, in case it was transient.
                    tracing::warn!(error = %e, "registration refused; retrying");
                    if !self.pause(backoff.next_delay()).await {
                        return false;
                    }
                }
            }
        }
    }

    async fn registration_count(&self) -> u64 {
        *self.registrations.lock().await
    }

    /// Long-polls for work while a slot is free, until shutdown.
    ///
    /// A poll that got no answer (a deadline, a broken connection, a node
    /// that lost its leadership) may still have leased jobs: it is sent
    /// again as it was, same request ID and free slots, until some
    /// coordinator answers it, so the answer names those leases rather than
    /// new ones. Only an answered poll is followed by a fresh one.
    async fn poll_loop(self: &Arc<Self>) {
        // The poll in flight: its message, the slots it offered, and the
        // registration count seen when it was made.
        let mut unanswered: Option<(PollWorkRequest, Vec<OwnedSemaphorePermit>, u64)> = None;
        let mut backoff = Backoff::new();
        loop {
            // Draining: no new poll (one in flight is answered, and its jobs
            // run: the leader gives a draining worker nothing new).
            if self.draining.is_cancelled() && unanswered.is_none() {
                return;
            }
            let (request, mut permits, seen) = match unanswered.take() {
                Some(poll) => poll,
                None => {
                    let first = tokio::select! {
                        permit = self.free_slots.clone().acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => return,
                        },
                        () = self.shutdown.cancelled() => return,
                        () = self.draining.cancelled() => return,
                    };
                    let mut permits = vec![first];
                    while let Ok(permit) = self.free_slots.clone().try_acquire_owned() {
                        permits.push(permit);
                    }
                    let seen = self.registration_count().await;
                    let request = PollWorkRequest {
                        worker_id: self.worker_id.clone(),
                        free_slots: u32::try_from(permits.len()).unwrap_or(u32::MAX),
                        wait_ms: self.poll_wait_ms,
                        request_id: self.request_ids.next("poll"),
                    };
                    (request, permits, seen)
                }
            };
            let deadline = Duration::from_millis(self.poll_wait_ms) + POLL_DEADLINE_MARGIN;
            let started = tokio::time::Instant::now();
            let result = tokio::select! {
                result = self.coordinator.poll_work(request.clone(), deadline, Persistence::UntilAnswered) => result,
                () = self.shutdown.cancelled() => return,
            };
            let response = match result {
                Ok(response) => {
                    backoff = Backoff::new();
                    response
                }
                Err(e) => {
                    // Refused: the client retried whatever was worth it. Still
                    // the same poll next time: nothing says it was not applied.
                    tracing::warn!(error = %e, "polling for work refused; retrying");
                    let delay = backoff.next_delay();
                    unanswered = Some((request, permits, seen));
                    if !self.pause(delay).await {
                        return;
                    }
                    continue;
                }
            };
            if response.reregister && !self.register(seen).await {
                return;
            }
            let got_work = !response.assignments.is_empty();
            for assignment in response.assignments {
                match permits.pop() {
                    Some(permit) => self.start_job(assignment, self.slot_numbers.lease(permit)),
                    None => tracing::warn!(
                        lease_token = assignment.lease_token,
                        job_id = %assignment.job_id,
                        "more assignments than free slots; leaving this one to expire"
                    ),
                }
            }
            drop(permits);
            if !got_work
                && started.elapsed() < MIN_EMPTY_POLL_INTERVAL
                && !self.pause(MIN_EMPTY_POLL_INTERVAL).await
            {
                return;
            }
        }
    }

    fn start_job(self: &Arc<Self>, assignment: Assignment, slot: slot::SlotLease) {
        let cancel = self.shutdown.child_token();
        let token = assignment.lease_token;
        {
            let mut jobs = self.jobs.lock().expect("jobs lock poisoned");
            if jobs.contains_key(&token) {
                tracing::warn!(lease_token = token, "lease already running here; ignored");
                return;
            }
            jobs.insert(
                token,
                RunningJob {
                    cancel: cancel.clone(),
                    reporting: false,
                },
            );
        }
        // In line for a run slot from the moment it is leased, in the order
        // of its answer's leases.
        let ticket = self.run_slots.ticket(Priority::of(&assignment));
        // The worker's span (a job started by its predecessor's report
        // is started in it too): job spans never nest, however many jobs
        // a slot runs one after another.
        let outer = tracing::Span::current();
        let span = tracing::info_span!(
            parent: &outer,
            "job",
            build_id = assignment.build_id,
            job_id = %assignment.job_id,
            name = %assignment.name,
            lease_token = token,
        );
        let worker = Arc::clone(self);
        self.tracker.spawn(async move {
            let next = worker
                .run_assignment(assignment, ticket, &slot.dir(&worker.sandbox_root), &cancel)
                .instrument(span)
                .await;
            worker
                .jobs
                .lock()
                .expect("jobs lock poisoned")
                .remove(&token);
            // The report leased the slot to the next job: it runs in the
            // same slot.
            let _in_worker = outer.enter();
            let mut next = next.into_iter();
            match next.next() {
                Some(assignment) => worker.start_job(assignment, slot),
                None => drop(slot),
            }
            for extra in next {
                tracing::warn!(
                    lease_token = extra.lease_token,
                    job_id = %extra.job_id,
                    "more assignments than free slots; leaving this one to expire"
                );
            }
        });
    }

    /// Runs `work` (a job or an action in `sandbox`; its commands wait for
    /// a run slot, see `turns`) until it ends or `cancel` fires (`None`),
    /// then removes the sandbox either way.
    async fn run_in_sandbox<T>(
        &self,
        sandbox: &Path,
        cancel: &CancellationToken,
        work: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let outcome = tokio::select! {
            outcome = work => Some(outcome),
            () = cancel.cancelled() => None,
        };
        let removal = distbuild_proto::blocking::run({
            let sandbox = sandbox.to_path_buf();
            let root = self.sandbox_root.clone();
            let cache = self.env.cache.clone();
            move || recycle_or_move_aside(&sandbox, &root, &cache)
        })
        .await;
        if let Err(e) = removal {
            tracing::warn!(sandbox = %sandbox.display(), error = %e, "cannot remove a sandbox");
        }
        outcome
    }

    /// Runs a Remote Execution API action and reports it: the encoded
    /// `ActionResult` when its command ran, else exit code -1 and a
    /// one-line error.
    async fn run_remote_action(
        &self,
        assignment: Assignment,
        ticket: Ticket,
        slot_dir: &Path,
        cancel: &CancellationToken,
    ) -> Vec<Assignment> {
        let assigned = tokio::time::Instant::now();
        let token = assignment.lease_token;
        let outcome = match ActionSpec::from_wire(&assignment) {
            Err(error) => {
                tracing::warn!(%error, "assignment refused");
                ActionOutcome {
                    exit_code: crate::job::EXIT_CODE_NOT_RUN,
                    error: format!("invalid assignment: {error}"),
                    ..ActionOutcome::default()
                }
            }
            Ok(spec) => {
                tracing::debug!(
                    instance_name = %spec.instance_name,
                    action = %spec.action,
                    "action started"
                );
                let sandbox = slot_dir.join(token.to_string());
                let work = run_action(&self.env, &spec, &sandbox, &self.worker_id, ticket);
                let Some(ran) = self.run_in_sandbox(&sandbox, cancel, work).await else {
                    tracing::debug!("action stopped (lease revoked or worker shutting down)");
                    return Vec::new();
                };
                ran
            }
        };
        log_run_end("action", outcome.exit_code, &outcome.error);
        let request = ReportResultRequest {
            worker_id: self.worker_id.clone(),
            lease_token: token,
            cache_key: assignment.cache_key.clone(),
            exit_code: outcome.exit_code,
            stdout: outcome.stdout.into(),
            stderr: outcome.stderr.into(),
            error: outcome.error,
            artifact_digest: Default::default(),
            artifact_size: 0,
            request_id: self.request_ids.next("report"),
            lost_inputs: Vec::new(),
            action_result: outcome.action_result.unwrap_or_default().into(),
            take_next: !self.shutdown.is_cancelled() && !self.draining.is_cancelled(),
            queued_ms: outcome.queued_ms,
        };
        self.count_report(&request, assigned);
        self.report(request, cancel).await
    }

    /// Runs `assignment` and reports it; the next jobs the report leased
    /// to its slot.
    async fn run_assignment(
        &self,
        assignment: Assignment,
        ticket: Ticket,
        slot_dir: &Path,
        cancel: &CancellationToken,
    ) -> Vec<Assignment> {
        // A Remote Execution API action: its own runner and report.
        if assignment.action.is_some() {
            return self
                .run_remote_action(assignment, ticket, slot_dir, cancel)
                .await;
        }
        let assigned = tokio::time::Instant::now();
        let token = assignment.lease_token;
        let outcome = match JobSpec::from_wire(&assignment) {
            Err(error) => {
                tracing::warn!(%error, "assignment refused");
                JobOutcome {
                    exit_code: crate::job::EXIT_CODE_NOT_RUN,
                    error: format!("invalid assignment: {error}"),
                    ..JobOutcome::default()
                }
            }
            Ok(spec) => {
                tracing::debug!("job started");
                let sandbox = slot_dir.join(token.to_string());
                let outcome = self
                    .run_in_sandbox(
                        &sandbox,
                        cancel,
                        run_job(&self.env, &spec, &sandbox, ticket),
                    )
                    .await;
                let Some(outcome) = outcome else {
                    tracing::debug!("job stopped (lease revoked or worker shutting down)");
                    return Vec::new();
                };
                let mut changes = self.changes.lock().expect("changes lock poisoned");
                for digest in &outcome.fetched_artifacts {
                    changes.record(*digest, true);
                }
                outcome
            }
        };
        log_run_end("job", outcome.exit_code, &outcome.error);
        let (artifact_digest, artifact_size) = match outcome.artifact {
            Some((digest, size)) => (digest_to_wire(&digest), size),
            None => (Default::default(), 0),
        };
        let request = ReportResultRequest {
            worker_id: self.worker_id.clone(),
            lease_token: token,
            cache_key: assignment.cache_key.clone(),
            exit_code: outcome.exit_code,
            stdout: outcome.stdout.into(),
            stderr: outcome.stderr.into(),
            error: outcome.error,
            artifact_digest,
            artifact_size,
            request_id: self.request_ids.next("report"),
            lost_inputs: lost_inputs_to_wire(&outcome.lost_inputs),
            action_result: Default::default(),
            take_next: !self.shutdown.is_cancelled() && !self.draining.is_cancelled(),
            queued_ms: outcome.queued_ms,
        };
        self.count_report(&request, assigned);
        self.report(request, cancel).await
    }

    /// Delivers a result: sent again (same request ID) through failovers
    /// until some coordinator answers, for [`REPORT_RETRY_LEASE_PERIODS`]
    /// lease periods at most; stops early when the worker shuts down or
    /// its drain times out. The job stays among the running ones
    /// meanwhile, so heartbeats keep its lease alive. A revocation does
    /// not stop it: a heartbeat answered after the report was applied and
    /// before its answer arrived revokes the lease the report ended, and
    /// that answer leases the slot its next job, which would otherwise wait
    /// out its lease unseen (a refused report costs one answer). Returns
    /// the jobs the report leased to the slot it frees.
    async fn report(
        &self,
        request: ReportResultRequest,
        cancel: &CancellationToken,
    ) -> Vec<Assignment> {
        if let Some(job) = self
            .jobs
            .lock()
            .expect("jobs lock poisoned")
            .get_mut(&request.lease_token)
        {
            job.reporting = true;
        }
        let window =
            (self.lease_timeout() * REPORT_RETRY_LEASE_PERIODS).max(MIN_REPORT_RETRY_WINDOW);
        let persistence = Persistence::Until(tokio::time::Instant::now() + window);
        let result = tokio::select! {
            result = self.coordinator.report_result(request, persistence) => result,
            () = cancel.cancelled() => return Vec::new(),
        };
        match result {
            Ok(response) => {
                if response.accepted {
                    tracing::debug!("result accepted");
                } else {
                    tracing::info!("result refused: the lease is no longer ours");
                }
                response.assignments
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    retried_for_ms = window.as_millis() as u64,
                    "giving up reporting the result; the lease will expire"
                );
                Vec::new()
            }
        }
    }

    /// Heartbeats every interval until shutdown.
    async fn heartbeat_loop(self: &Arc<Self>) {
        loop {
            if !self.pause(self.heartbeat_interval()).await {
                return;
            }
            self.heartbeat().await;
        }
    }

    async fn heartbeat(self: &Arc<Self>) {
        let seen = self.registration_count().await;
        let lease_tokens: Vec<u64> = {
            let jobs = self.jobs.lock().expect("jobs lock poisoned");
            let mut tokens: Vec<u64> = jobs.keys().copied().collect();
            tokens.sort_unstable();
            tokens
        };
        let batch = {
            let mut changes = self.changes.lock().expect("changes lock poisoned");
            for digest in self.env.cache.take_evicted() {
                changes.record(digest, false);
            }
            changes.take_batch()
        };
        let (added, dropped): (Vec<_>, Vec<_>) = batch.iter().partition(|(_, present)| *present);
        let request = HeartbeatRequest {
            worker_id: self.worker_id.clone(),
            lease_tokens,
            added_artifacts: added.iter().map(|(d, _)| digest_to_wire(d)).collect(),
            dropped_artifacts: dropped.iter().map(|(d, _)| digest_to_wire(d)).collect(),
            peer_bytes_fetched_total: self.env.peer_bytes_fetched.load(Ordering::Relaxed),
            cache_bytes: self.env.cache.total_bytes(),
            request_id: self.request_ids.next("heartbeat"),
        };
        let deadline = self
            .heartbeat_interval()
            .clamp(MIN_HEARTBEAT_DEADLINE, MAX_HEARTBEAT_DEADLINE);
        // Retried promptly (next node, short backoff) until answered: the
        // leases must be renewed well within their period. Jobs keep running
        // meanwhile; a lease that did expire is revoked by the answer.
        let result = tokio::select! {
            result = self.coordinator.heartbeat(request, deadline, Persistence::UntilAnswered) => result,
            () = self.shutdown.cancelled() => return,
        };
        match result {
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat refused");
                self.changes
                    .lock()
                    .expect("changes lock poisoned")
                    .restore(batch);
            }
            Ok(response) => {
                if !response.revoked_tokens.is_empty() {
                    let jobs = self.jobs.lock().expect("jobs lock poisoned");
                    for token in &response.revoked_tokens {
                        match jobs.get(token) {
                            Some(job) if job.reporting => tracing::debug!(
                                lease_token = token,
                                "lease revoked while its result is reported; the report's answer decides"
                            ),
                            Some(job) => {
                                tracing::info!(
                                    lease_token = token,
                                    "lease revoked; stopping its job"
                                );
                                job.cancel.cancel();
                            }
                            None => {}
                        }
                    }
                }
                if response.draining && !self.draining.is_cancelled() {
                    tracing::info!("drained by an operator");
                    self.draining.cancel();
                }
                if !response.draining && self.told_draining.swap(false, Ordering::Relaxed) {
                    self.drain_forgotten.store(true, Ordering::Relaxed);
                }
                self.may_leave.store(response.may_leave, Ordering::Relaxed);
                if !response.replicate.is_empty() && !self.draining.is_cancelled() {
                    self.copy_for_draining(response.replicate);
                }
                if response.reregister {
                    self.register(seen).await;
                }
            }
        }
    }
}

/// Logs how a job or action (`what`) ended: each run at debug; one that
/// could not run at all (not a command exiting non-zero: that is the
/// build's business) at warn.
fn log_run_end(what: &str, exit_code: i32, error: &str) {
    if exit_code == crate::job::EXIT_CODE_NOT_RUN || !error.is_empty() {
        tracing::warn!(exit_code, error, "{what} could not run");
    } else {
        tracing::debug!(exit_code, "{what} finished");
    }
}

/// Keeps `<cache-dir>/lock` locked while it lives: one worker per cache
/// directory.
struct DirLock {
    _file: fs::File,
}

fn lock_cache_dir(dir: &Path) -> anyhow::Result<DirLock> {
    let path = dir.join("lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            anyhow::bail!(
                "cache directory {} is in use by another worker",
                dir.display()
            );
        }
        return Err(e).with_context(|| format!("lock {}", path.display()));
    }
    Ok(DirLock { _file: file })
}

/// Prefix of a sandbox directory moved aside because it could not be
/// removed at start-up.
const LEFT_BEHIND_PREFIX: &str = "sandbox-left-behind-";

/// Empties the sandbox directory of what jobs of an earlier run left. What
/// cannot be removed is moved aside (and reported) rather than keeping the
/// worker from starting; what was moved aside before is tried again.
/// Empties a job's directory into its slot's spare (`jobdir`), or removes
/// it; one that can be neither is moved out of its slot's directory (the
/// next job in the slot, in the slot's kept sandbox, could see it), beside
/// `root`, where the next start removes it.
fn recycle_or_move_aside(sandbox: &Path, root: &Path, cache: &Cache) -> io::Result<()> {
    let recycled = crate::jobdir::recycle(sandbox, &mut |file| cache.donate(file));
    let error = match recycled.or_else(|_| remove_tree(sandbox)) {
        Ok(()) => return Ok(()),
        Err(error) => error,
    };
    let aside = move_aside(sandbox, root).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{error}; and it cannot be moved aside: {e}"),
        )
    })?;
    tracing::warn!(%error, moved_to = %aside.display(), "cannot remove a job's directory; moved it aside");
    Ok(())
}

/// Moves `path` beside the sandbox directory `root`, under a name the
/// next start removes (`LEFT_BEHIND_PREFIX`); its new path.
fn move_aside(path: &Path, root: &Path) -> io::Result<PathBuf> {
    let aside = root.with_file_name(format!(
        "{LEFT_BEHIND_PREFIX}{:016x}",
        distbuild_proto::rng::next_u64()
    ));
    fs::rename(path, &aside)?;
    Ok(aside)
}

fn clear_sandboxes(root: &Path) -> io::Result<()> {
    if let Some(parent) = root.parent() {
        for entry in fs::read_dir(parent)?.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(LEFT_BEHIND_PREFIX)
                && let Err(error) = remove_tree(&entry.path())
            {
                tracing::warn!(%error, path = %entry.path().display(), "still cannot remove an old sandbox");
            }
        }
    }
    if let Err(error) = remove_tree(root) {
        let aside = move_aside(root, root)?;
        tracing::warn!(
            %error,
            moved_to = %aside.display(),
            "cannot remove what earlier jobs left in the sandbox directory; moved it aside"
        );
    }
    fs::create_dir_all(root)
}

/// The worker's ID: read from `<cache-dir>/worker-id`, or generated (16
/// random hex characters) and kept there.
pub fn load_or_create_worker_id(cache_dir: &Path) -> anyhow::Result<String> {
    let path = cache_dir.join("worker-id");
    match fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(id.to_ascii_lowercase());
            }
            tracing::warn!(path = %path.display(), "worker ID file is malformed; choosing a new ID");
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    }
    let id = format!("{:016x}", distbuild_proto::rng::next_u64());
    let mut temp = tempfile::NamedTempFile::new_in(cache_dir)
        .with_context(|| format!("create a file in {}", cache_dir.display()))?;
    writeln!(temp, "{id}").with_context(|| format!("write {}", path.display()))?;
    temp.as_file()
        .sync_all()
        .with_context(|| format!("write {}", path.display()))?;
    temp.persist(&path)
        .with_context(|| format!("write {}", path.display()))?;
    Ok(id)
}

/// Runs a worker until `shutdown` is cancelled: serves `PeerApi` on
/// `listener`, registers with the coordinators, runs what they assign.
/// On shutdown it stops polling, kills running jobs and returns once every
/// task has finished. Prints `worker <id> listening on <addr>` to stderr
/// once serving.
pub async fn run(
    config: WorkerConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let local_addr = listener
        .local_addr()
        .context("learn the listener's address")?;
    // No Nagle on accepted connections (see the coordinator's server).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    match config.access.tls.clone() {
        Some(acceptor) => {
            let incoming = distbuild_proto::accept::tls(incoming, acceptor);
            run_incoming(config, local_addr, incoming, shutdown).await
        }
        None => run_incoming(config, local_addr, incoming, shutdown).await,
    }
}

/// [`run`] on any stream of accepted connections, `local_addr` being where
/// they arrive: the listener seam (a simulation passes its sockets).
pub async fn run_incoming<I, IO, IE>(
    config: WorkerConfig,
    local_addr: std::net::SocketAddr,
    incoming: I,
    shutdown: CancellationToken,
) -> anyhow::Result<()>
where
    I: futures::Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    anyhow::ensure!(config.slots > 0, "slots must be at least 1");
    let jobs_ahead = config.jobs_ahead.unwrap_or(config.slots);
    anyhow::ensure!(
        jobs_ahead <= config.slots,
        "jobs ahead must be at most the slots"
    );
    anyhow::ensure!(
        !config.coordinators.is_empty(),
        "at least one coordinator address is needed"
    );
    let cache_dir = config.cache_dir.clone();
    fs::create_dir_all(&cache_dir)
        .with_context(|| format!("create cache directory {}", cache_dir.display()))?;
    let _lock = lock_cache_dir(&cache_dir)?;
    let worker_id = match &config.worker_id {
        Some(id) => id.clone(),
        None => load_or_create_worker_id(&cache_dir)?,
    };
    let cache = {
        let (dir, max) = (cache_dir.clone(), config.cache_max_bytes);
        distbuild_proto::blocking::run(move || Cache::open(&dir, max))
            .await
            .with_context(|| format!("open the cache in {}", cache_dir.display()))?
    };
    let sandbox_root = sandbox_root(&cache_dir);
    {
        let root = sandbox_root.clone();
        distbuild_proto::blocking::run(move || clear_sandboxes(&root))
            .await
            .with_context(|| format!("clear {}", sandbox_root.display()))?;
    }
    let peer_addr = config
        .advertise_addr
        .clone()
        .unwrap_or_else(|| local_addr.to_string());

    let tracker = TaskTracker::new();
    let worker_span = tracing::info_span!("worker", worker_id = %worker_id);
    let service = PeerService::new(cache.clone(), tracker.clone(), shutdown.clone());
    let (health_reporter, health) = distbuild_ops::health::health_reporter();
    let (reflection, reflection_alpha) = distbuild_ops::health::reflection();
    let anyone = |what| config.access.authorize(what, &Role::ALL);
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(config.metrics.grpc.layer())
        .add_service(InterceptedService::new(health, anyone("health checks")))
        .add_service(InterceptedService::new(
            reflection,
            anyone("gRPC reflection"),
        ))
        .add_service(InterceptedService::new(
            reflection_alpha,
            anyone("gRPC reflection"),
        ))
        .add_service(InterceptedService::new(
            PeerApiServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            config
                .access
                .authorize("the peer API", &[Role::Worker, Role::Client]),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    let server = tracker.spawn({
        let shutdown = shutdown.clone();
        async move {
            let result = server.await;
            if result.is_err() {
                // Without its server the worker cannot serve its artifacts.
                shutdown.cancel();
            }
            result
        }
        .instrument(worker_span.clone())
    });
    eprintln!("worker {worker_id} listening on {local_addr}");

    let coordinator = Arc::new(CoordinatorClient::new(
        config.coordinators.clone(),
        config.connector.clone(),
    ));
    let request_ids = RequestIds::new(&worker_id);
    let worker = Arc::new(Worker {
        worker_id,
        peer_addr,
        slots: config.slots,
        jobs_ahead,
        properties: config
            .properties
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect(),
        poll_wait_ms: config.poll_wait_ms,
        sandbox_root,
        slot_numbers: slot::SlotNumbers::new(config.slots + jobs_ahead),
        env: JobEnv {
            cache,
            coordinator: coordinator.clone(),
            connector: config.connector.clone(),
            runner: config.runner.clone(),
            peer_bytes_fetched: Default::default(),
            coordinator_bytes_fetched: Default::default(),
        },
        run_slots: RunSlots::new(config.slots),
        coordinator,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
        free_slots: Arc::new(Semaphore::new(config.slots + jobs_ahead)),
        jobs: Arc::default(),
        changes: Mutex::new(CacheChanges::default()),
        request_ids,
        heartbeat_interval_ms: AtomicU64::new(DEFAULT_HEARTBEAT_INTERVAL.as_millis() as u64),
        lease_timeout_ms: AtomicU64::new(DEFAULT_LEASE_TIMEOUT.as_millis() as u64),
        registrations: tokio::sync::Mutex::new(0),
        metrics: config.metrics.clone(),
        draining: config.drain.clone(),
        may_leave: Default::default(),
        told_draining: Default::default(),
        drain_forgotten: Default::default(),
        copies: Mutex::default(),
        copy_slots: Semaphore::new(MAX_COPIES_AT_ONCE),
    });
    worker.metrics.attach(crate::metrics::Live {
        cache: worker.env.cache.clone(),
        slots: worker.slots,
        running: {
            let jobs = Arc::clone(&worker.jobs);
            Box::new(move || jobs.lock().expect("jobs lock poisoned").len())
        },
        peer_bytes: worker.env.peer_bytes_fetched.clone(),
        coordinator_bytes: worker.env.coordinator_bytes_fetched.clone(),
    });

    // Health: the peer API serves from the start; the whole worker ("")
    // once registered and taking work, until it stops.
    use distbuild_ops::health::ServingStatus;
    let peer_api = distbuild_proto::v1::peer_api_server::SERVICE_NAME;
    health_reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health_reporter
        .set_service_status(peer_api, ServingStatus::Serving)
        .await;
    async {
        if worker.register(0).await {
            health_reporter
                .set_service_status("", ServingStatus::Serving)
                .await;
            let heartbeats = Arc::clone(&worker);
            worker
                .tracker
                .spawn(async move { heartbeats.heartbeat_loop().await }.in_current_span());
            worker
                .tracker
                .spawn(Arc::clone(&worker).tell_when_draining().in_current_span());
            worker.poll_loop().await;
            if worker.draining.is_cancelled() && !worker.shutdown.is_cancelled() {
                health_reporter
                    .set_service_status("", ServingStatus::NotServing)
                    .await;
                worker.drain_and_leave(config.drain_timeout).await;
            }
        }
    }
    .instrument(worker_span)
    .await;

    // Polling stops only on shutdown; make sure everything else stops too.
    for service in ["", peer_api] {
        health_reporter
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("serve the peer API")),
        Err(e) => Err(anyhow::Error::new(e).context("peer API server task")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_changes_keep_the_latest_and_survive_a_failed_heartbeat() {
        let (a, b, c) = (Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"c"));
        let mut changes = CacheChanges::default();
        changes.record(a, true);
        changes.record(a, false); // fetched, then evicted: dropped wins
        changes.record(b, true);
        let mut batch = changes.take_batch();
        batch.sort();
        let mut expected = vec![(a, false), (b, true)];
        expected.sort();
        assert_eq!(batch, expected);
        assert!(changes.take_batch().is_empty());
        // While the heartbeat was failing, b was evicted and c fetched.
        changes.record(b, false);
        changes.record(c, true);
        changes.restore(batch);
        let mut pending: Vec<_> = changes.pending.iter().map(|(d, p)| (*d, *p)).collect();
        pending.sort();
        let mut expected = vec![(a, false), (b, false), (c, true)];
        expected.sort();
        assert_eq!(
            pending, expected,
            "newer changes win over the restored batch"
        );
    }

    #[test]
    fn worker_id_is_stable_and_repaired() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let id = load_or_create_worker_id(dir.path()).expect("created");
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(load_or_create_worker_id(dir.path()).expect("read"), id);
        fs::write(dir.path().join("worker-id"), "garbage").expect("write");
        let fresh = load_or_create_worker_id(dir.path()).expect("replaced");
        assert_ne!(fresh, "garbage");
        assert_eq!(fresh.len(), 16);
    }
}
