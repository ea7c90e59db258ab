//! A replica's Prometheus metrics: Raft (from openraft's metrics and the
//! log store), the scheduler (counted from each applied command's
//! `Tally`, so every replica counts what it applied, the leader and
//! followers alike), proposals, and the state's sizes (read at each
//! scrape). The gRPC families are `distbuild_ops::grpc`'s, registered in
//! the same registry.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use distbuild_model::{Collected, Gauges, Response, RunEnd, Tally};
use distbuild_ops::grpc::GrpcMetrics;
use openraft::RaftMetrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::types::role_name;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Role {
    role: &'static str,
}

const ROLES: [&str; 5] = ["leader", "follower", "candidate", "learner", "shutdown"];

/// Every family a replica serves on `/metrics`.
pub struct ReplicaMetrics {
    registry: Registry,
    pub(crate) grpc: GrpcMetrics,
    /// The log store's committed index, once the store is open.
    committed: std::sync::OnceLock<Arc<AtomicU64>>,

    // Raft.
    term: Gauge,
    role: Family<Role, Gauge>,
    leader: Gauge,
    leader_changes: Counter,
    last_log_index: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    apply_lag: Gauge,
    proposal_seconds: Histogram,
    proposals_per_entry: Histogram,

    // The scheduler, from each applied command.
    executions_started: Counter,
    executions_finished: Family<Outcome, Counter>,
    queue_wait_seconds: Histogram,
    execution_seconds: Histogram,
    lease_expiries: Counter,
    retries: Counter,
    lost_input_rebuilds: Counter,
    result_cache_lookups: Family<Outcome, Counter>,
    jobs_finished: Family<Outcome, Counter>,
    builds_finished: Family<Outcome, Counter>,
    collected: Family<Kind, Counter>,
    collected_bytes: Counter,

    // The state's sizes, read at each scrape.
    executions: Family<Kind, Gauge>,
    builds_running: Gauge,
    builds_retained: Gauge,
    cached_results: Gauge,
    cached_result_bytes: Gauge,
    blobs: Gauge,
    blob_bytes: Gauge,
    action_results: Gauge,
    workers: Gauge,
    worker_slots: Gauge,
    worker_busy_slots: Gauge,
    expected_durations: Gauge,
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

impl ReplicaMetrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("distbuild");
        let grpc = GrpcMetrics::register(&mut registry);
        let durations = || Histogram::new(distbuild_ops::duration_buckets());
        let m = Self {
            grpc,
            committed: std::sync::OnceLock::new(),
            term: Gauge::default(),
            role: Family::default(),
            leader: Gauge::default(),
            leader_changes: Counter::default(),
            last_log_index: Gauge::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            apply_lag: Gauge::default(),
            proposal_seconds: durations(),
            proposals_per_entry: Histogram::new(exponential_buckets(1.0, 2.0, 7)),
            executions_started: Counter::default(),
            executions_finished: Family::default(),
            queue_wait_seconds: durations(),
            execution_seconds: durations(),
            lease_expiries: Counter::default(),
            retries: Counter::default(),
            lost_input_rebuilds: Counter::default(),
            result_cache_lookups: Family::default(),
            jobs_finished: Family::default(),
            builds_finished: Family::default(),
            collected: Family::default(),
            collected_bytes: Counter::default(),
            executions: Family::default(),
            builds_running: Gauge::default(),
            builds_retained: Gauge::default(),
            cached_results: Gauge::default(),
            cached_result_bytes: Gauge::default(),
            blobs: Gauge::default(),
            blob_bytes: Gauge::default(),
            action_results: Gauge::default(),
            workers: Gauge::default(),
            worker_slots: Gauge::default(),
            worker_busy_slots: Gauge::default(),
            expected_durations: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "raft_term",
            "This replica's current Raft term",
            m.term.clone(),
        );
        r.register(
            "raft_role",
            "1 for this replica's current Raft role",
            m.role.clone(),
        );
        r.register(
            "raft_leader",
            "The node ID of the leader this replica knows (0: none)",
            m.leader.clone(),
        );
        r.register(
            "raft_leader_changes",
            "Times this replica saw a new leader",
            m.leader_changes.clone(),
        );
        r.register(
            "raft_last_log_index",
            "Index of the last entry in this replica's log",
            m.last_log_index.clone(),
        );
        r.register(
            "raft_commit_index",
            "Index of the last entry this replica knows is committed",
            m.commit_index.clone(),
        );
        r.register(
            "raft_applied_index",
            "Index of the last entry applied to this replica's state",
            m.applied_index.clone(),
        );
        r.register(
            "raft_apply_lag",
            "Entries committed but not yet applied here",
            m.apply_lag.clone(),
        );
        r.register(
            "raft_proposal_duration_seconds",
            "Time from a proposal to its answer, on the leader",
            m.proposal_seconds.clone(),
        );
        r.register(
            "raft_proposals_per_entry",
            "Proposals carried by each log entry the leader wrote",
            m.proposals_per_entry.clone(),
        );
        r.register(
            "executions_started",
            "Executions leased to a worker",
            m.executions_started.clone(),
        );
        r.register(
            "executions_finished",
            "Runs reported under their current lease, by outcome",
            m.executions_finished.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "Time an execution waited in the queue before its lease",
            m.queue_wait_seconds.clone(),
        );
        r.register(
            "execution_duration_seconds",
            "Time from an execution's lease to its report",
            m.execution_seconds.clone(),
        );
        r.register(
            "lease_expiries",
            "Leases that expired unrenewed or with their worker",
            m.lease_expiries.clone(),
        );
        r.register(
            "execution_retries",
            "Executions queued again for another attempt",
            m.retries.clone(),
        );
        r.register(
            "lost_input_rebuilds",
            "Executions queued again to rebuild an output no worker holds",
            m.lost_input_rebuilds.clone(),
        );
        r.register(
            "result_cache_lookups",
            "Jobs ready to run, by whether the result cache answered them (hit) or they needed an execution (miss)",
            m.result_cache_lookups.clone(),
        );
        r.register(
            "jobs_finished",
            "Jobs that reached a final state: succeeded (ran), cached, failed, skipped",
            m.jobs_finished.clone(),
        );
        r.register(
            "builds_finished",
            "Builds that finished, by result",
            m.builds_finished.clone(),
        );
        r.register(
            "gc_collected",
            "Records garbage collection dropped, by kind",
            m.collected.clone(),
        );
        r.register(
            "gc_collected_blob_bytes",
            "Bytes of blobs garbage collection dropped",
            m.collected_bytes.clone(),
        );
        r.register(
            "executions",
            "Executions now, by state: queued, running, blocked (on a rebuild)",
            m.executions.clone(),
        );
        r.register(
            "builds_running",
            "Builds not finished",
            m.builds_running.clone(),
        );
        r.register(
            "builds_retained",
            "Builds kept, running and finished",
            m.builds_retained.clone(),
        );
        r.register(
            "result_cache_entries",
            "Cached job results",
            m.cached_results.clone(),
        );
        r.register(
            "result_cache_bytes",
            "Bytes of cached job results (records and captured output)",
            m.cached_result_bytes.clone(),
        );
        r.register("blobs", "Blobs recorded (sources and CAS)", m.blobs.clone());
        r.register(
            "blob_bytes",
            "Bytes of blobs recorded",
            m.blob_bytes.clone(),
        );
        r.register(
            "action_results",
            "Remote Execution API action results stored",
            m.action_results.clone(),
        );
        r.register("workers", "Workers registered", m.workers.clone());
        r.register(
            "workers_slots",
            "Job slots of the registered workers",
            m.worker_slots.clone(),
        );
        r.register(
            "workers_busy_slots",
            "Job slots leased now",
            m.worker_busy_slots.clone(),
        );
        r.register(
            "expected_durations",
            "Kinds of job with a learned expected duration",
            m.expected_durations.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts what one applied command (a part of an entry) did.
    pub(crate) fn applied(&self, tally: &Tally, response: &Response) {
        for wait in &tally.queue_waits_ms {
            self.executions_started.inc();
            self.queue_wait_seconds.observe(seconds(*wait));
        }
        for (end, ran_ms) in &tally.runs {
            let outcome = match end {
                RunEnd::Success => "success",
                RunEnd::Failure => "failure",
                RunEnd::LostInputs => "lost_inputs",
            };
            self.executions_finished
                .get_or_create(&Outcome { outcome })
                .inc();
            self.execution_seconds.observe(seconds(*ran_ms));
        }
        self.lease_expiries.inc_by(tally.lease_expiries);
        self.retries.inc_by(tally.retries);
        self.lost_input_rebuilds.inc_by(tally.lost_input_rebuilds);
        let count = |family: &Family<Outcome, Counter>, outcome, n: u64| {
            if n > 0 {
                family.get_or_create(&Outcome { outcome }).inc_by(n);
            }
        };
        count(&self.result_cache_lookups, "hit", tally.cache_hits);
        count(&self.result_cache_lookups, "miss", tally.cache_misses);
        count(&self.jobs_finished, "succeeded", tally.jobs_succeeded);
        count(&self.jobs_finished, "cached", tally.cache_hits);
        count(&self.jobs_finished, "failed", tally.jobs_failed);
        count(&self.jobs_finished, "skipped", tally.jobs_skipped);
        count(&self.builds_finished, "succeeded", tally.builds_succeeded);
        count(&self.builds_finished, "failed", tally.builds_failed);
        if let Response::Collected(Collected {
            blobs,
            blob_bytes,
            results,
            action_results,
        }) = response
        {
            for (kind, n) in [
                ("blobs", *blobs),
                ("results", *results),
                ("action_results", *action_results),
            ] {
                if n > 0 {
                    self.collected
                        .get_or_create(&Kind { kind })
                        .inc_by(n.into());
                }
            }
            self.collected_bytes.inc_by(*blob_bytes);
        }
    }

    /// One entry the leader wrote, carrying `proposals`.
    pub(crate) fn entry_written(&self, proposals: usize) {
        self.proposals_per_entry.observe(proposals as f64);
    }

    /// A proposal answered `elapsed` after it was made.
    pub(crate) fn proposal_answered(&self, elapsed: std::time::Duration) {
        self.proposal_seconds.observe(elapsed.as_secs_f64());
    }

    /// Follows openraft's metrics: term, role, leader, indexes.
    pub(crate) fn raft_changed(
        &self,
        m: &RaftMetrics<u64, openraft::BasicNode>,
        last_leader: &mut Option<u64>,
    ) {
        self.term.set(m.current_term as i64);
        let role = role_name(m.state);
        for r in ROLES {
            self.role
                .get_or_create(&Role { role: r })
                .set(i64::from(r == role));
        }
        self.leader.set(m.current_leader.unwrap_or(0) as i64);
        if m.current_leader.is_some() && m.current_leader != *last_leader {
            self.leader_changes.inc();
            *last_leader = m.current_leader;
        }
        let last_log = m.last_log_index.unwrap_or(0);
        let applied = m.last_applied.map_or(0, |id| id.index);
        self.last_log_index.set(last_log as i64);
        self.applied_index.set(applied as i64);
        self.refresh_commit(applied);
    }

    /// Where the log store keeps its committed index.
    pub(crate) fn follow_commits(&self, committed: Arc<AtomicU64>) {
        let _ = self.committed.set(committed);
    }

    fn refresh_commit(&self, applied: u64) {
        let committed = self
            .committed
            .get()
            .map_or(0, |c| c.load(Ordering::Relaxed))
            .max(applied);
        self.commit_index.set(committed as i64);
        self.apply_lag.set(committed.saturating_sub(applied) as i64);
    }

    /// The metrics in Prometheus's text format, with the state's sizes
    /// `gauges` as of now.
    pub(crate) fn encode(&self, gauges: &Gauges) -> String {
        let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        for (kind, n) in [
            ("queued", gauges.queued),
            ("running", gauges.running),
            ("blocked", gauges.blocked),
        ] {
            self.executions.get_or_create(&Kind { kind }).set(as_i64(n));
        }
        self.builds_running.set(as_i64(gauges.builds_running));
        self.builds_retained.set(as_i64(gauges.builds_retained));
        self.cached_results.set(as_i64(gauges.cached_results));
        self.cached_result_bytes
            .set(as_i64(gauges.cached_result_bytes));
        self.blobs.set(as_i64(gauges.blobs));
        self.blob_bytes.set(as_i64(gauges.blob_bytes));
        self.action_results.set(as_i64(gauges.action_results));
        self.workers.set(as_i64(gauges.workers));
        self.worker_slots.set(as_i64(gauges.worker_slots));
        self.worker_busy_slots.set(as_i64(gauges.busy_slots));
        self.expected_durations
            .set(as_i64(gauges.expected_durations));
        self.refresh_commit(self.applied_index.get().max(0) as u64);
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
