//! Transitions of the replicated model, driven command by command.

use std::collections::{BTreeMap, BTreeSet};

use distbuild_proto::{Digest, JobId};

use super::*;
use crate::tables::{
    ReadTables, RowVisitor, StorageError, StoredEvent, T_HOLDINGS, T_REQUESTS, T_WORKERS, Tables,
    holding_key,
};

mod ahead;
mod batch;
mod cutoff;
mod drain;
mod golden;
mod schedule;
mod tally;

fn id(n: u8) -> JobId {
    JobId::from_bytes([n; 20])
}

fn key(n: u8) -> Digest {
    Digest::from_bytes([n; 20])
}

/// A job `n` with job key `key(n)` depending on the listed positions (its
/// cache key once ready: `Harness::k`).
fn job(n: u8, deps: &[u32]) -> SubmittedJob {
    SubmittedJob {
        cache_key: key(n),
        deps: deps.to_vec(),
        spec: JobSpec {
            job_id: id(n),
            name: format!("job{n}"),
            cmds: vec![CmdText::Cat {
                template: format!("{n}"),
                output: "{{.OutputDir}}/out".into(),
            }],
            inputs: Vec::new(),
            deps: Vec::new(),
            action: None,
        },
    }
}

fn graph(jobs: &[(u8, &[u32])]) -> Vec<SubmittedJob> {
    jobs.iter().map(|(n, deps)| job(*n, deps)).collect()
}

const LEASE_MS: u64 = 1000;

/// A worker timeout for tests where no worker dies.
const NO_DEATHS_MS: u64 = 1000 * LEASE_MS;

fn artifact(n: u8) -> Digest {
    Digest::from_bytes([100 + n; 20])
}

/// The column families in memory: what `flush` writes, `load` reads.
#[derive(Default)]
struct MemStore {
    tables: BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl ReadTables for MemStore {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.tables.get(table).and_then(|t| t.get(key)).cloned())
    }

    fn for_each_prefix(
        &self,
        table: &str,
        prefix: &[u8],
        f: &mut RowVisitor<'_>,
    ) -> Result<(), StorageError> {
        let Some(t) = self.tables.get(table) else {
            return Ok(());
        };
        for (k, v) in t.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) || f(k, v).is_break() {
                break;
            }
        }
        Ok(())
    }
}

impl Tables for MemStore {
    fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        assert!(TABLES.contains(&table), "unknown table {table}");
        self.tables
            .entry(table.to_string())
            .or_default()
            .insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn delete(&mut self, table: &str, key: &[u8]) -> Result<(), StorageError> {
        assert!(TABLES.contains(&table), "unknown table {table}");
        if let Some(t) = self.tables.get_mut(table) {
            t.remove(key);
        }
        Ok(())
    }
}

/// `loaded` (read back from the store) equals `live`, derived indexes
/// included.
fn assert_same(loaded: &Model, live: &Model) {
    assert_eq!(loaded.clock_ms, live.clock_ms, "clock");
    assert_eq!(
        loaded.builds.keys().collect::<Vec<_>>(),
        live.builds.keys().collect::<Vec<_>>(),
        "builds"
    );
    for (id, build) in &live.builds {
        assert_eq!(loaded.builds[id].header, build.header, "build {id}");
        assert_eq!(loaded.builds[id].jobs, build.jobs, "jobs of build {id}");
    }
    assert_eq!(loaded.requests, live.requests, "requests");
    assert_eq!(loaded.executions, live.executions, "executions");
    assert_eq!(loaded.queue, live.queue, "queue");
    assert_eq!(
        loaded.running_by_build, live.running_by_build,
        "running per build"
    );
    assert_eq!(loaded.durations, live.durations, "durations");
    assert_eq!(
        loaded.durations_by_age, live.durations_by_age,
        "durations by age"
    );
    assert_eq!(loaded.leases, live.leases, "leases");
    assert_eq!(loaded.blocked_on, live.blocked_on, "blocked_on");
    assert_eq!(loaded.results, live.results, "results");
    assert_eq!(
        format!("{:?}", loaded.workers),
        format!("{:?}", live.workers),
        "workers"
    );
    assert_eq!(loaded.held_by, live.held_by, "held_by");
    assert_eq!(loaded.blobs, live.blobs, "blobs");
    assert_eq!(loaded.action_results, live.action_results, "action results");
    assert_eq!(loaded.staged, live.staged, "staged submits");
}

/// Drives the model command by command. After every command it flushes to
/// a store, checks that loading the store gives the same model, and that
/// no job finished twice.
struct Harness {
    model: Model,
    store: MemStore,
    index: u64,
    now_ms: u64,
    /// Events applied and not yet taken.
    events: Vec<(u64, u64, Event)>,
    /// Jobs that reached a final state, by their events.
    finished: BTreeSet<(u64, u32)>,
}

impl Harness {
    fn new() -> Self {
        let mut h = Self {
            model: Model::default(),
            store: MemStore::default(),
            index: 0,
            now_ms: 1_000,
            events: Vec::new(),
            finished: BTreeSet::new(),
        };
        for w in ["a", "b"] {
            h.apply(Command::RegisterWorker {
                worker_id: w.into(),
                addr: format!("{w}:1"),
                slots: 2,
                ahead: 0,
                held: Vec::new(),
                properties: vec![("pool".into(), w.into())],
                now_ms: 1_000,
            });
        }
        h
    }

    fn apply(&mut self, command: Command) -> Response {
        self.index += 1;
        let response = self.model.apply(self.index, &command);
        for (build, _, event) in &self.model.dirty.events {
            if let Event::JobFinished { job, .. } | Event::JobSkipped { job, .. } = event {
                assert!(
                    self.finished.insert((*build, *job)),
                    "job {job} of build {build} finished twice: {event:?}"
                );
            }
        }
        self.events.extend(self.model.dirty.events.iter().cloned());
        if let Err(violation) = self.model.check_invariants() {
            panic!("after {command:?}: {violation}");
        }
        self.model.flush(&mut self.store).expect("flush");
        let loaded = Model::load(&self.store).expect("load");
        assert_same(&loaded, &self.model);
        response
    }

    /// The events applied since the last call.
    fn take_events(&mut self) -> Vec<(u64, u64, Event)> {
        std::mem::take(&mut self.events)
    }

    fn heartbeat(&mut self, worker: &str, tokens: &[u64]) -> Response {
        self.apply(Command::Heartbeat {
            worker_id: worker.into(),
            tokens: tokens.to_vec(),
            added: Vec::new(),
            dropped: Vec::new(),
            lease_timeout_ms: LEASE_MS,
            now_ms: self.now_ms,
        })
    }

    fn expire(&mut self, max_attempts: u32, worker_timeout_ms: u64) {
        self.apply(Command::ExpireLeases {
            now_ms: self.now_ms,
            max_attempts,
            worker_timeout_ms,
        });
    }

    fn pick(&self, worker: &str) -> Vec<Digest> {
        self.model
            .pick_for(worker, 4, self.now_ms, 50, LEASE_MS, &BTreeSet::new())
    }

    fn exec(&self, n: u8) -> &Execution {
        self.exec_of(self.k(n))
    }

    fn exec_of(&self, key: Digest) -> &Execution {
        self.model.execution(&key).expect("an execution")
    }

    /// The cache key of job `n` (ID `id(n)`): its job key `key(n)` until
    /// it is ready, then what its dependencies' outputs made it (in the
    /// newest build that has it ready).
    fn k(&self, n: u8) -> Digest {
        self.model
            .builds
            .values()
            .rev()
            .flat_map(|b| &b.jobs)
            .find(|j| j.spec.job_id == id(n) && j.state != JobState::Waiting)
            .map_or(key(n), |j| j.cache_key)
    }

    /// The error of the only `JobFinished` of `job` in `events`.
    fn error_of(events: &[(u64, u64, Event)], build: u64, job: u32) -> String {
        let errors: Vec<_> = events
            .iter()
            .filter_map(|(b, _, e)| match e {
                Event::JobFinished { job: j, error, .. } if *b == build && *j == job => {
                    Some(error.clone().expect("an error message"))
                }
                _ => None,
            })
            .collect();
        assert_eq!(errors.len(), 1, "{events:?}");
        errors[0].clone()
    }

    fn submit(&mut self, request: &str, jobs: Vec<SubmittedJob>) -> u64 {
        match self.apply(Command::SubmitBuild {
            job_timeout_ms: 60_000,
            request_id: request.into(),
            now_ms: self.now_ms,
            staged_parts: 0,
            jobs,
        }) {
            Response::BuildSubmitted { build_id, .. } => build_id,
            other => panic!("submit answered {other:?}"),
        }
    }

    fn assign(&mut self, worker: &str, keys: &[Digest]) -> Vec<Option<u64>> {
        match self.apply(Command::Assign {
            worker_id: worker.into(),
            cache_keys: keys.to_vec(),
            lease_timeout_ms: LEASE_MS,
            now_ms: self.now_ms,
        }) {
            Response::Assigned { tokens, .. } => tokens,
            other => panic!("assign answered {other:?}"),
        }
    }

    fn run_one(&mut self, worker: &str, k: Digest, outcome: Outcome) -> bool {
        let token = self.assign(worker, &[k])[0].expect("assigned");
        self.report(worker, token, k, outcome)
    }

    fn report(&mut self, worker: &str, token: u64, k: Digest, outcome: Outcome) -> bool {
        match self.apply(Command::Report {
            worker_id: worker.into(),
            token,
            cache_key: k,
            outcome,
            max_attempts: 3,
            queued_ms: 0,
            now_ms: self.now_ms,
        }) {
            Response::Reported { accepted } => accepted,
            other => panic!("report answered {other:?}"),
        }
    }

    /// The events since the last call, rendered short: `build:kind:job`.
    fn events(&mut self) -> Vec<String> {
        self.take_events()
            .into_iter()
            .map(|(build, _, e)| match e {
                Event::JobStarted { job, .. } => format!("{build}:start:{job}"),
                Event::JobFinished {
                    job,
                    exit_code,
                    cached,
                    ..
                } => format!(
                    "{build}:{}:{job}",
                    match (exit_code, cached) {
                        (0, true) => "cached".to_string(),
                        (0, false) => "ok".to_string(),
                        (code, _) => format!("exit{code}"),
                    }
                ),
                Event::JobSkipped { job, .. } => format!("{build}:skip:{job}"),
                Event::BuildFinished { ok, .. } => format!("{build}:done:{ok}"),
            })
            .collect()
    }
}

fn success(n: u8) -> Outcome {
    Outcome::Success {
        stdout: vec![n],
        stderr: Vec::new(),
        artifact: artifact(n),
        artifact_size: 10,
    }
}

fn failure(code: i32) -> Outcome {
    Outcome::Failure {
        exit_code: code,
        stdout: Vec::new(),
        stderr: b"boom".to_vec(),
        error: None,
    }
}

#[test]
fn remembered_answers_are_read_back_and_a_malformed_key_is_refused() {
    let mut model = Model::default();
    let mut requests = Requests::default();
    let mut store = MemStore::default();
    let register = Proposal {
        request_id: Some("register/w1/one".into()),
        command: Command::RegisterWorker {
            worker_id: "w1".into(),
            addr: "127.0.0.1:1".into(),
            slots: 1,
            ahead: 0,
            held: Vec::new(),
            properties: Vec::new(),
            now_ms: 5,
        },
    };
    let answer = requests.apply(&mut model, 1, &register);
    requests.flush(&mut store).expect("flush");
    let loaded = Requests::load(&store).expect("load");
    assert_eq!(loaded.answer("register/w1/one"), Some(answer));
    assert_eq!(loaded.answer("register/w1/two"), None);

    store
        .put(T_REQUESTS, b"register/w1/three", b"")
        .expect("put");
    let refused = Requests::load(&store)
        .err()
        .expect("a key that is no request key");
    assert!(
        matches!(&refused, StorageError::Corrupt(why) if why.contains("17 bytes")),
        "{refused}"
    );
}

#[test]
fn a_chain_runs_in_order_and_finishes() {
    let mut h = Harness::new();
    let b = h.submit("r1", graph(&[(1, &[]), (2, &[0])]));
    h.events();
    assert_eq!(
        h.model
            .pick_for("a", 4, h.now_ms, 50, LEASE_MS, &BTreeSet::new()),
        vec![h.k(1)]
    );
    assert!(h.run_one("a", h.k(1), success(1)));
    assert_eq!(h.events(), [format!("{b}:start:0"), format!("{b}:ok:0")]);
    assert!(h.run_one("a", h.k(2), success(2)));
    assert_eq!(
        h.events(),
        [
            format!("{b}:start:1"),
            format!("{b}:ok:1"),
            format!("{b}:done:true")
        ]
    );
}

#[test]
fn the_same_cache_key_runs_once_for_every_build_and_is_cached_after() {
    let mut h = Harness::new();
    let b1 = h.submit("r1", graph(&[(1, &[])]));
    let b2 = h.submit("r2", graph(&[(1, &[])]));
    h.events();
    // One execution serves both builds.
    assert_eq!(
        h.model
            .pick_for("a", 4, h.now_ms, 50, LEASE_MS, &BTreeSet::new()),
        vec![h.k(1)]
    );
    assert!(h.run_one("a", h.k(1), success(1)));
    let events = h.events();
    for b in [b1, b2] {
        assert!(events.contains(&format!("{b}:ok:0")), "{events:?}");
        assert!(events.contains(&format!("{b}:done:true")), "{events:?}");
    }
    assert!(!h.model.has_queued());
    // A later build is answered from the cache without running anything.
    let b3 = h.submit("r3", graph(&[(1, &[])]));
    assert_eq!(
        h.events(),
        [format!("{b3}:cached:0"), format!("{b3}:done:true")]
    );
    assert!(!h.model.has_queued());
    // A retried submit returns the first answer and records nothing.
    assert_eq!(h.submit("r3", graph(&[(1, &[])])), b3);
    assert!(h.events().is_empty());
}

#[test]
fn a_failure_skips_its_dependents_but_not_independent_jobs() {
    let mut h = Harness::new();
    // 1 <- 2 <- 3, and 4 on its own.
    let b = h.submit("r", graph(&[(1, &[]), (2, &[0]), (3, &[1]), (4, &[])]));
    h.events();
    assert!(h.run_one("a", h.k(1), failure(3)));
    assert_eq!(
        h.events(),
        [
            format!("{b}:start:0"),
            format!("{b}:exit3:0"),
            format!("{b}:skip:1"),
            format!("{b}:skip:2")
        ]
    );
    // Nothing of the failed chain is queued; the independent job is.
    assert_eq!(
        h.model
            .pick_for("a", 4, h.now_ms, 50, LEASE_MS, &BTreeSet::new()),
        vec![h.k(4)]
    );
    assert!(h.run_one("a", h.k(4), success(4)));
    assert_eq!(
        h.events(),
        [
            format!("{b}:start:3"),
            format!("{b}:ok:3"),
            format!("{b}:done:false")
        ]
    );
    // A failure is not cached: the same job runs again in a new build.
    h.submit("r2", graph(&[(1, &[])]));
    assert_eq!(
        h.model
            .pick_for("a", 4, h.now_ms, 50, LEASE_MS, &BTreeSet::new()),
        vec![h.k(1)]
    );
}

#[test]
fn an_expired_lease_requeues_and_its_late_result_is_refused() {
    let mut h = Harness::new();
    h.submit("r", graph(&[(1, &[])]));
    let token = h.assign("a", &[h.k(1)])[0].expect("assigned");
    // Renewed in time: nothing expires.
    h.now_ms += LEASE_MS - 1;
    let renewed = h.apply(Command::Heartbeat {
        worker_id: "a".into(),
        tokens: vec![token],
        added: Vec::new(),
        dropped: Vec::new(),
        lease_timeout_ms: LEASE_MS,
        now_ms: h.now_ms,
    });
    assert_eq!(
        renewed,
        Response::Heartbeat {
            revoked: Vec::new(),
            reregister: false
        }
    );
    h.now_ms += LEASE_MS - 1;
    assert!(!h.model.needs_expiry(h.now_ms, NO_DEATHS_MS));
    // Not renewed: it expires and the job is queued again.
    h.now_ms += 1;
    assert!(h.model.needs_expiry(h.now_ms, NO_DEATHS_MS));
    h.expire(3, NO_DEATHS_MS);
    assert_eq!(h.exec(1).attempts, 1);
    assert_eq!(
        h.model
            .pick_for("b", 4, h.now_ms, 50, LEASE_MS, &BTreeSet::new()),
        vec![h.k(1)]
    );
    // The old holder's result and renewal are refused.
    assert!(!h.report("a", token, h.k(1), success(1)));
    let late = h.apply(Command::Heartbeat {
        worker_id: "a".into(),
        tokens: vec![token],
        added: Vec::new(),
        dropped: Vec::new(),
        lease_timeout_ms: LEASE_MS,
        now_ms: h.now_ms,
    });
    assert_eq!(
        late,
        Response::Heartbeat {
            revoked: vec![token],
            reregister: false
        }
    );
    // The new lease's result is accepted.
    assert!(h.run_one("b", h.k(1), success(1)));
}

#[test]
fn a_job_whose_lease_keeps_expiring_fails_with_a_message() {
    let mut h = Harness::new();
    let b = h.submit("r", graph(&[(1, &[])]));
    for _ in 0..2 {
        h.assign("a", &[h.k(1)]);
        h.now_ms += LEASE_MS;
        h.expire(2, NO_DEATHS_MS);
    }
    let events = h.take_events();
    let Some((_, _, Event::JobFinished { error, .. })) = events
        .iter()
        .find(|(_, _, e)| matches!(e, Event::JobFinished { .. }))
    else {
        panic!("no finish in {events:?}");
    };
    let error = error.clone().expect("an error message");
    assert!(error.contains("gave up after 2 attempts"), "{error}");
    assert!(matches!(
        events.last(),
        Some((id, _, Event::BuildFinished { ok: false, .. })) if *id == b
    ));
    assert!(!h.model.has_queued());
}

#[test]
fn ready_jobs_wait_briefly_for_the_worker_holding_their_inputs() {
    let mut h = Harness::new();
    h.submit("r", graph(&[(1, &[]), (2, &[0])]));
    assert!(h.run_one("a", h.k(1), success(1)));
    // Worker b polls first: job 2's input lives on a, which has a free slot.
    assert!(
        h.model
            .pick_for("b", 4, h.now_ms, 50, LEASE_MS, &BTreeSet::new())
            .is_empty()
    );
    assert_eq!(
        h.model
            .pick_for("a", 4, h.now_ms, 50, LEASE_MS, &BTreeSet::new()),
        vec![h.k(2)]
    );
    // After the locality wait, anyone may take it.
    assert_eq!(
        h.model
            .pick_for("b", 4, h.now_ms + 50, 50, LEASE_MS, &BTreeSet::new()),
        vec![h.k(2)]
    );
    // Once b has fetched the input too, it no longer waits.
    h.apply(Command::Heartbeat {
        worker_id: "b".into(),
        tokens: Vec::new(),
        added: vec![Digest::from_bytes([101; 20])],
        dropped: Vec::new(),
        lease_timeout_ms: LEASE_MS,
        now_ms: h.now_ms,
    });
    assert_eq!(
        h.model
            .pick_for("b", 4, h.now_ms, 50, LEASE_MS, &BTreeSet::new()),
        vec![h.k(2)]
    );
}

#[test]
fn slots_bound_assignments() {
    let mut h = Harness::new();
    h.submit("r", graph(&[(1, &[]), (2, &[]), (3, &[])]));
    let picks = h
        .model
        .pick_for("a", 10, h.now_ms, 50, LEASE_MS, &BTreeSet::new());
    assert_eq!(picks.len(), 2, "worker a has two slots");
    let tokens = h.assign("a", &[h.k(1), h.k(2), h.k(3)]);
    assert!(tokens[0].is_some() && tokens[1].is_some());
    assert_eq!(tokens[2], None, "a third lease exceeds the slots");
    assert!(
        h.model
            .pick_for("a", 10, h.now_ms, 50, LEASE_MS, &BTreeSet::new())
            .is_empty()
    );
}

#[test]
fn a_reregistering_worker_loses_its_leases() {
    let mut h = Harness::new();
    h.submit("r", graph(&[(1, &[])]));
    let token = h.assign("a", &[h.k(1)])[0].expect("assigned");
    h.apply(Command::RegisterWorker {
        worker_id: "a".into(),
        addr: "a:1".into(),
        slots: 2,
        ahead: 0,
        held: Vec::new(),
        properties: Vec::new(),
        now_ms: h.now_ms,
    });
    assert!(!h.report("a", token, h.k(1), success(1)));
    assert_eq!(
        h.model
            .pick_for("b", 4, h.now_ms, 50, LEASE_MS, &BTreeSet::new()),
        vec![h.k(1)]
    );
}

#[test]
fn an_empty_build_finishes_at_once() {
    let mut h = Harness::new();
    let b = h.submit("r", Vec::new());
    assert_eq!(h.events(), [format!("{b}:done:true")]);
}

#[test]
fn a_dead_worker_is_removed_with_its_holdings_and_leases() {
    let mut h = Harness::new();
    let b = h.submit("r", graph(&[(1, &[]), (2, &[])]));
    // a is last seen when it reports (at 1000), then leases job 2 at 1500:
    // the lease would run to 2500, but a dies at 2000.
    assert!(h.run_one("a", h.k(1), success(1)));
    h.now_ms += LEASE_MS / 2;
    let token = h.assign("a", &[h.k(2)])[0].expect("assigned");
    h.now_ms = 1_000 + LEASE_MS - 1;
    h.heartbeat("b", &[]);
    assert!(!h.model.needs_expiry(h.now_ms, LEASE_MS));
    h.now_ms += 1;
    h.heartbeat("b", &[]);
    assert!(h.model.needs_expiry(h.now_ms, LEASE_MS));
    h.events();
    h.expire(3, LEASE_MS);
    assert!(!h.model.workers().contains_key("a"));
    assert!(h.model.workers().contains_key("b"));
    assert!(!h.model.needs_expiry(h.now_ms, LEASE_MS));
    // Its holdings are gone, from memory and from the tables.
    assert!(h.model.holders(&artifact(1)).is_empty());
    assert_eq!(h.store.get(T_WORKERS, b"a").expect("get"), None);
    assert_eq!(
        h.store
            .get(T_HOLDINGS, &holding_key("a", &artifact(1)))
            .expect("get"),
        None
    );
    // Its lease expired with it, counting an attempt.
    assert_eq!(h.exec(2).attempts, 1);
    assert!(matches!(h.exec(2).state, ExecState::Queued { .. }));
    assert!(h.events().is_empty());
    // Its late heartbeat is told to register again, its result is refused.
    assert_eq!(
        h.heartbeat("a", &[token]),
        Response::Heartbeat {
            revoked: vec![token],
            reregister: true
        }
    );
    assert!(!h.report("a", token, h.k(2), success(2)));
    assert_eq!(h.pick("b"), vec![h.k(2)]);
    assert!(h.run_one("b", h.k(2), success(2)));
    assert_eq!(
        h.events(),
        [
            format!("{b}:start:1"),
            format!("{b}:ok:1"),
            format!("{b}:done:true")
        ]
    );
}

#[test]
fn a_dead_worker_s_lease_counts_toward_giving_up() {
    let mut h = Harness::new();
    let b = h.submit("r", graph(&[(1, &[])]));
    h.now_ms += LEASE_MS / 2;
    h.assign("a", &[h.k(1)]);
    h.now_ms += LEASE_MS / 2;
    h.heartbeat("b", &[]);
    h.expire(1, LEASE_MS);
    let events = h.take_events();
    let error = Harness::error_of(&events, b, 0);
    assert!(error.contains("gave up after 1 attempts"), "{error}");
    assert!(matches!(
        events.last(),
        Some((id, _, Event::BuildFinished { ok: false, .. })) if *id == b
    ));
    assert!(h.model.execution(&h.k(1)).is_none());
}

#[test]
fn extending_leases_also_refreshes_worker_liveness() {
    let mut h = Harness::new();
    h.submit("r", graph(&[(1, &[])]));
    let token = h.assign("a", &[h.k(1)])[0].expect("assigned");
    // No leader for ten lease periods: no heartbeat could land.
    h.now_ms += 10 * LEASE_MS;
    assert!(h.model.needs_expiry(h.now_ms, LEASE_MS));
    h.apply(Command::ExtendLeases {
        now_ms: h.now_ms,
        lease_timeout_ms: LEASE_MS,
    });
    for (id, worker) in h.model.workers() {
        assert_eq!(worker.last_seen_ms, h.now_ms, "worker {id}");
    }
    assert!(!h.model.needs_expiry(h.now_ms, LEASE_MS));
    h.expire(3, LEASE_MS);
    assert_eq!(h.model.workers().len(), 2, "nobody was removed");
    let ExecState::Running {
        worker_id,
        token: kept,
        expires_ms,
        ..
    } = &h.exec(1).state
    else {
        panic!("still running: {:?}", h.exec(1).state);
    };
    assert_eq!(
        (worker_id.as_str(), *kept, *expires_ms),
        ("a", token, h.now_ms + LEASE_MS)
    );
    assert_eq!(h.exec(1).attempts, 0);
    // Silent for a whole period after that, they are dead after all.
    h.now_ms += LEASE_MS;
    assert!(h.model.needs_expiry(h.now_ms, LEASE_MS));
    h.expire(3, LEASE_MS);
    assert!(h.model.workers().is_empty());
    assert_eq!(h.exec(1).attempts, 1);
}

/// Build `A <- B <- C (<- D)` with A and B run on worker a, which then
/// dies: both artifacts are lost and C is ready. Returns the build ID.
fn chain_whose_holder_died(h: &mut Harness, jobs: &[(u8, &[u32])]) -> u64 {
    let b = h.submit("r", graph(jobs));
    assert!(h.run_one("a", h.k(1), success(1)));
    assert!(h.run_one("a", h.k(2), success(2)));
    h.now_ms += LEASE_MS;
    h.heartbeat("b", &[]);
    h.expire(3, LEASE_MS);
    assert!(!h.model.workers().contains_key("a"));
    assert_eq!(
        h.events(),
        [
            format!("{b}:start:0"),
            format!("{b}:ok:0"),
            format!("{b}:start:1"),
            format!("{b}:ok:1")
        ]
    );
    b
}

/// Assigns C, then B, to b: each is blocked on its lost input, whose
/// rebuild is queued with no (build, job) waiting for it.
fn block_c_then_b(h: &mut Harness) {
    assert_eq!(h.pick("b"), vec![h.k(3)]);
    assert_eq!(h.assign("b", &[h.k(3)]), vec![None]);
    assert_eq!(
        h.exec(3).state,
        ExecState::Blocked {
            on: BTreeSet::from([h.k(2)])
        }
    );
    assert!(h.model.result(&h.k(2)).is_none(), "no longer servable");
    assert!(h.exec(2).waiters.is_empty());
    // The rebuild of B is next; C is never picked while blocked.
    assert_eq!(h.pick("b"), vec![h.k(2)]);
    assert_eq!(h.assign("b", &[h.k(2)]), vec![None]);
    assert_eq!(
        h.exec(2).state,
        ExecState::Blocked {
            on: BTreeSet::from([h.k(1)])
        }
    );
    assert!(h.model.result(&h.k(1)).is_none());
    assert_eq!(h.pick("b"), vec![h.k(1)]);
}

#[test]
fn lost_inputs_are_rebuilt_dependencies_first_and_finish_once_per_job() {
    let mut h = Harness::new();
    let b = chain_whose_holder_died(&mut h, &[(1, &[]), (2, &[0]), (3, &[1])]);
    block_c_then_b(&mut h);
    assert!(h.run_one("b", h.k(1), success(1)));
    assert_eq!(h.model.holders(&artifact(1)), ["b:1"]);
    assert!(h.model.result(&h.k(1)).is_some());
    assert_eq!(h.pick("b"), vec![h.k(2)], "B unblocked, C still blocked");
    assert!(h.run_one("b", h.k(2), success(2)));
    // The build's A and B finished before: the rebuilds add no event.
    assert!(h.events().is_empty());
    assert_eq!(h.pick("b"), vec![h.k(3)]);
    assert!(h.run_one("b", h.k(3), success(3)));
    assert_eq!(
        h.events(),
        [
            format!("{b}:start:2"),
            format!("{b}:ok:2"),
            format!("{b}:done:true")
        ]
    );
    assert!(h.model.blocked_on.is_empty());
    assert!(!h.model.has_queued());
}

#[test]
fn a_failed_rebuild_fails_the_jobs_blocked_on_it_naming_the_lost_dependency() {
    let mut h = Harness::new();
    // A <- B <- C <- D.
    let b = chain_whose_holder_died(&mut h, &[(1, &[]), (2, &[0]), (3, &[1]), (4, &[2])]);
    block_c_then_b(&mut h);
    let token = h.assign("b", &[h.k(1)])[0].expect("assigned");
    assert!(h.report("b", token, h.k(1), failure(3)));
    let events = h.take_events();
    // B's rebuild, blocked on A, fails with it; C, blocked on B, fails
    // naming B; D is skipped. A and B get no second event.
    let error = Harness::error_of(&events, b, 2);
    assert!(
        error.contains("dependency \"job2\"") && error.contains("lost and could not be rebuilt"),
        "{error}"
    );
    let rendered: Vec<_> = events
        .iter()
        .map(|(_, _, e)| match e {
            Event::JobFinished { job, exit_code, .. } => format!("exit{exit_code}:{job}"),
            Event::JobSkipped { job, .. } => format!("skip:{job}"),
            Event::BuildFinished { ok, .. } => format!("done:{ok}"),
            Event::JobStarted { job, .. } => format!("start:{job}"),
        })
        .collect();
    assert_eq!(rendered, ["exit-1:2", "skip:3", "done:false"]);
    for n in 1..=4 {
        assert!(h.model.execution(&h.k(n)).is_none(), "execution {n} left");
    }
    assert!(h.model.blocked_on.is_empty());
    assert!(!h.model.has_queued());
}

#[test]
fn a_rebuild_that_gives_up_fails_the_jobs_blocked_on_it() {
    let mut h = Harness::new();
    let b = chain_whose_holder_died(&mut h, &[(1, &[]), (2, &[0]), (3, &[1])]);
    block_c_then_b(&mut h);
    // A's rebuild is leased to b, which keeps heartbeating without renewing
    // the lease.
    h.assign("b", &[h.k(1)]);
    h.now_ms += LEASE_MS;
    h.heartbeat("b", &[]);
    h.expire(1, LEASE_MS);
    let error = Harness::error_of(&h.take_events(), b, 2);
    assert!(
        error.contains("dependency \"job2\"") && error.contains("could not be rebuilt"),
        "{error}"
    );
    assert!(h.model.execution(&h.k(2)).is_none());
    assert!(h.model.execution(&h.k(3)).is_none());
}

#[test]
fn a_job_needing_an_output_whose_rebuild_failed_fails_when_assigned() {
    let mut h = Harness::new();
    // A <- B and A <- C: B is assigned first and blocks on A's rebuild,
    // which fails while C is still queued.
    let b = h.submit("r", graph(&[(1, &[]), (2, &[0]), (3, &[0])]));
    assert!(h.run_one("a", h.k(1), success(1)));
    h.now_ms += LEASE_MS;
    h.heartbeat("b", &[]);
    h.expire(3, LEASE_MS);
    assert_eq!(h.assign("b", &[h.k(2)]), vec![None]);
    let token = h.assign("b", &[h.k(1)])[0].expect("assigned");
    assert!(h.report("b", token, h.k(1), failure(3)));
    let error = Harness::error_of(&h.take_events(), b, 1);
    assert!(error.contains("dependency \"job1\""), "{error}");
    // C's input has neither a result nor a rebuild any more.
    assert_eq!(h.pick("b"), vec![h.k(3)]);
    assert_eq!(h.assign("b", &[h.k(3)]), vec![None]);
    let events = h.take_events();
    let error = Harness::error_of(&events, b, 2);
    assert!(
        error.contains("dependency \"job1\"") && error.contains("could not be rebuilt"),
        "{error}"
    );
    assert!(matches!(
        events.last(),
        Some((id, _, Event::BuildFinished { ok: false, .. })) if *id == b
    ));
    assert!(h.model.execution(&h.k(1)).is_none(), "no rebuild started");
    assert!(!h.model.has_queued());
}

#[test]
fn lost_inputs_requeue_as_an_attempt_and_lead_to_a_rebuild() {
    let mut h = Harness::new();
    // A <- B, and E on its own.
    let b = h.submit("r", graph(&[(1, &[]), (2, &[0]), (5, &[])]));
    assert!(h.run_one("a", h.k(1), success(1)));
    assert!(h.run_one("a", h.k(5), success(5)));
    let token = h.assign("b", &[h.k(2)])[0].expect("assigned");
    h.events();
    let lost = Outcome::LostInputs {
        lost: vec![
            (artifact(1), vec!["a:1".to_string()]),
            (artifact(5), vec!["a:1".to_string()]),
        ],
    };
    assert!(h.report("b", token, h.k(2), lost.clone()));
    assert_eq!(h.exec(2).attempts, 1);
    assert!(matches!(h.exec(2).state, ExecState::Queued { .. }));
    assert_eq!(h.model.workers()["b"].running, 0);
    // The holding of B's input that b tried is dropped, though a is
    // alive; E's artifact is no input of B: the report cannot make it lost.
    assert!(h.model.holders(&artifact(1)).is_empty());
    assert_eq!(h.model.holders(&artifact(5)), ["a:1"]);
    // The same report again holds a stale lease: refused.
    assert!(!h.report("b", token, h.k(2), lost));
    // The next assignment rebuilds A first.
    assert_eq!(h.assign("b", &[h.k(2)]), vec![None]);
    assert_eq!(
        h.exec(2).state,
        ExecState::Blocked {
            on: BTreeSet::from([h.k(1)])
        }
    );
    assert!(h.run_one("b", h.k(1), success(1)));
    assert!(h.run_one("b", h.k(2), success(2)));
    assert_eq!(
        h.events(),
        [
            format!("{b}:start:1"),
            format!("{b}:ok:1"),
            format!("{b}:done:true")
        ]
    );
}

#[test]
fn a_build_submitted_during_a_rebuild_attaches_to_it() {
    let mut h = Harness::new();
    let b1 = h.submit("r1", graph(&[(1, &[]), (2, &[0])]));
    assert!(h.run_one("a", h.k(1), success(1)));
    h.now_ms += LEASE_MS;
    h.heartbeat("b", &[]);
    h.expire(3, LEASE_MS);
    assert_eq!(h.assign("b", &[h.k(2)]), vec![None]);
    h.events();
    // A is being rebuilt: the new build's A waits for that run instead of
    // being answered from the cache.
    let b2 = h.submit("r2", graph(&[(1, &[]), (2, &[0])]));
    assert!(h.events().is_empty());
    assert_eq!(h.exec(1).waiters, [(b2, 0)]);
    assert!(h.run_one("b", h.k(1), success(1)));
    assert_eq!(h.events(), [format!("{b2}:start:0"), format!("{b2}:ok:0")]);
    // Its B joins the one execution of B, unblocked now.
    assert_eq!(h.exec(2).waiters, [(b1, 1), (b2, 1)]);
    assert!(h.run_one("b", h.k(2), success(2)));
    assert_eq!(
        h.events(),
        [
            format!("{b1}:start:1"),
            format!("{b2}:start:1"),
            format!("{b1}:ok:1"),
            format!("{b2}:ok:1"),
            format!("{b1}:done:true"),
            format!("{b2}:done:true")
        ]
    );
}

#[test]
fn a_lost_leaf_output_is_built_again_not_answered_from_the_cache() {
    let mut h = Harness::new();
    // A <- B, both run on a, which dies.
    h.submit("r1", graph(&[(1, &[]), (2, &[0])]));
    assert!(h.run_one("a", h.k(1), success(1)));
    assert!(h.run_one("a", h.k(2), success(2)));
    h.now_ms += LEASE_MS;
    h.heartbeat("b", &[]);
    h.expire(3, LEASE_MS);
    h.events();
    // A new build with the same graph: A is no leaf (only B needs it, and
    // only if B runs), so it is answered from the cache; B's output is what
    // the client downloads, so B runs again.
    let b2 = h.submit("r2", graph(&[(1, &[]), (2, &[0])]));
    assert_eq!(h.events(), [format!("{b2}:cached:0")]);
    assert_eq!(h.pick("b"), vec![h.k(2)]);
    // Running it needs A, whose output is lost too.
    assert_eq!(h.assign("b", &[h.k(2)]), vec![None]);
    assert!(h.run_one("b", h.k(1), success(1)));
    assert!(h.run_one("b", h.k(2), success(2)));
    assert_eq!(
        h.events(),
        [
            format!("{b2}:start:1"),
            format!("{b2}:ok:1"),
            format!("{b2}:done:true")
        ]
    );
}

impl Harness {
    fn stage(&mut self, request: &str, part: u32, jobs: Vec<SubmittedJob>) -> Response {
        self.stage_sized(request, part, jobs, 1_000)
    }

    fn stage_sized(
        &mut self,
        request: &str,
        part: u32,
        jobs: Vec<SubmittedJob>,
        total_bytes: u64,
    ) -> Response {
        self.apply(Command::StageSubmit {
            request_id: request.into(),
            part,
            jobs,
            total_bytes,
            now_ms: self.now_ms,
        })
    }

    fn submit_last(
        &mut self,
        request: &str,
        staged_parts: u32,
        jobs: Vec<SubmittedJob>,
    ) -> Response {
        self.apply(Command::SubmitBuild {
            job_timeout_ms: 60_000,
            request_id: request.into(),
            now_ms: self.now_ms,
            staged_parts,
            jobs,
        })
    }
}

/// A diamond and a chain: dependencies cross the part boundaries below.
fn five_jobs() -> Vec<SubmittedJob> {
    graph(&[(1, &[]), (2, &[0]), (3, &[0]), (4, &[1, 2]), (5, &[3])])
}

#[test]
fn a_build_submitted_in_parts_is_the_build_submitted_whole() {
    let mut whole = Harness::new();
    let b1 = whole.submit("r1", five_jobs());

    let mut parts = Harness::new();
    let jobs = five_jobs();
    assert_eq!(parts.stage("r1", 0, jobs[..2].to_vec()), Response::None);
    // Parts may arrive in any order; the final command orders them.
    assert_eq!(parts.stage("r1", 1, jobs[2..4].to_vec()), Response::None);
    assert_eq!(parts.model.staged_submits(), 1);
    assert!(
        parts.model.build(parts.index).is_none(),
        "nothing built yet"
    );
    let answer = parts.submit_last("r1", 2, jobs[4..].to_vec());
    let Response::BuildSubmitted {
        build_id: b2,
        job_count: 5,
    } = answer
    else {
        panic!("submit answered {answer:?}");
    };
    assert_eq!(parts.model.staged_submits(), 0, "staging is dropped");
    assert_eq!(
        whole.model.build(b1).expect("built").jobs,
        parts.model.build(b2).expect("built").jobs
    );
    assert_eq!(whole.model.queue.keys().count(), 1);
    assert_eq!(
        whole.model.queue.keys().collect::<Vec<_>>(),
        parts.model.queue.keys().collect::<Vec<_>>()
    );

    // A retry of the whole submit (parts again, then the last) is answered
    // with the same build and stages nothing.
    assert_eq!(parts.stage("r1", 0, jobs[..2].to_vec()), Response::None);
    assert_eq!(parts.model.staged_submits(), 0);
    assert_eq!(
        parts.submit_last("r1", 2, jobs[4..].to_vec()),
        Response::BuildSubmitted {
            build_id: b2,
            job_count: 5
        }
    );
}

#[test]
fn a_submit_missing_a_part_is_refused_for_retry_and_changes_nothing() {
    let mut h = Harness::new();
    let jobs = five_jobs();
    h.stage("r1", 0, jobs[..2].to_vec());
    let builds = h.model.builds.len();
    match h.submit_last("r1", 2, jobs[4..].to_vec()) {
        Response::Refused {
            reason,
            retry: true,
        } => assert!(reason.contains("part 1"), "{reason}"),
        other => panic!("answered {other:?}"),
    }
    assert_eq!(h.model.builds.len(), builds);
    assert!(h.model.requests.is_empty());
    assert!(h.model.queue.is_empty());
    // Retried from the start, it goes through.
    h.stage("r1", 0, jobs[..2].to_vec());
    h.stage("r1", 1, jobs[2..4].to_vec());
    assert!(matches!(
        h.submit_last("r1", 2, jobs[4..].to_vec()),
        Response::BuildSubmitted { job_count: 5, .. }
    ));
}

#[test]
fn staging_is_bounded_in_bytes_and_submits_in_progress_are_never_evicted() {
    let mut h = Harness::new();
    let jobs = five_jobs();
    let quarter = MAX_STAGED_BYTES / 4;
    for i in 0..4 {
        h.now_ms += 1;
        assert_eq!(
            h.stage_sized(&format!("r{i}"), 0, jobs[..1].to_vec(), quarter),
            Response::None
        );
    }
    // Full: a new submit is refused as busy, and the others keep their
    // room (their next parts and their final commands go through).
    h.now_ms += 1;
    let refused = h.stage_sized("newest", 0, jobs[..1].to_vec(), 1);
    assert!(
        matches!(&refused, Response::Busy { reason } if reason.contains("staging is full")),
        "{refused:?}"
    );
    assert_eq!(h.model.staged_submits(), 4);
    assert_eq!(
        h.stage_sized("r0", 1, jobs[1..2].to_vec(), quarter),
        Response::None
    );
    assert!(matches!(
        h.submit_last("r0", 2, jobs[2..].to_vec()),
        Response::BuildSubmitted { job_count: 5, .. }
    ));
    // Its room is free again.
    assert_eq!(
        h.stage_sized("newest", 0, jobs[..1].to_vec(), quarter),
        Response::None
    );
    // A submit whose parts stopped coming gives way once abandoned.
    h.now_ms += STAGED_ABANDONED_MS;
    assert_eq!(
        h.stage_sized("later", 0, jobs[..1].to_vec(), quarter),
        Response::None
    );
    assert!(matches!(
        h.submit_last("r1", 1, graph(&[(9, &[])])),
        Response::Refused { retry: true, .. }
    ));
    // Bigger than the whole area, or out of range: refused for good.
    assert!(matches!(
        h.stage_sized("huge", 0, jobs[..1].to_vec(), MAX_STAGED_BYTES + 1),
        Response::Refused { retry: false, .. }
    ));
    assert!(matches!(
        h.stage("r2", MAX_SUBMIT_PARTS, jobs[..1].to_vec()),
        Response::Refused { retry: false, .. }
    ));
}

#[test]
fn a_malformed_job_list_is_refused_not_applied() {
    let mut h = Harness::new();
    // Job 0 depends on job 1, which comes after it.
    let mut after = graph(&[(1, &[]), (2, &[])]);
    after[0].deps = vec![1];
    // Job 1 depends on an action, which leaves no artifact to key on.
    let on_action = vec![action_job(1, "a", false), job(2, &[0])];
    // Job 1 names its dependency in its spec rather than by index.
    let mut in_spec = graph(&[(1, &[]), (2, &[0])]);
    in_spec[1].spec.deps = vec![DepRef {
        job_id: id(1),
        cache_key: key(1),
        artifact: artifact(1),
    }];
    let cases = [
        (
            after,
            "job 0 of the submit depends on job 1, which does not come before it",
        ),
        (
            on_action,
            "job 1 of the submit depends on job 0, a Remote Execution API action",
        ),
        (
            in_spec,
            "job 1 of the submit names its dependencies in its spec",
        ),
    ];
    for (jobs, expected) in cases {
        match h.submit_last("bad", 0, jobs) {
            Response::Refused {
                reason,
                retry: false,
            } => assert!(reason.contains(expected), "{reason}"),
            other => panic!("answered {other:?}"),
        }
    }
    assert!(h.model.builds.is_empty());
    assert!(h.model.requests.is_empty());
    assert!(h.model.queue.is_empty());
    // Its request ID is not taken: a correct submit under it applies.
    assert!(matches!(
        h.submit_last("bad", 0, graph(&[(1, &[])])),
        Response::BuildSubmitted { job_count: 1, .. }
    ));
}

#[test]
fn lost_inputs_keep_the_copies_of_holders_not_tried() {
    let mut h = Harness::new();
    let b = h.submit("r", graph(&[(1, &[]), (2, &[0])]));
    assert!(h.run_one("a", h.k(1), success(1)));
    let token = h.assign("b", &[h.k(2)])[0].expect("assigned");
    // After the assignment named a, worker c registers with a copy.
    h.apply(Command::RegisterWorker {
        worker_id: "c".into(),
        addr: "c:1".into(),
        slots: 1,
        ahead: 0,
        held: vec![artifact(1)],
        properties: Vec::new(),
        now_ms: h.now_ms,
    });
    let lost = Outcome::LostInputs {
        lost: vec![(artifact(1), vec!["a:1".to_string()])],
    };
    assert!(h.report("b", token, h.k(2), lost));
    assert_eq!(h.model.holders(&artifact(1)), ["c:1"], "c was not tried");
    // Nothing to rebuild: the job is leased again at once, fetching from c.
    let token = h.assign("b", &[h.k(2)])[0].expect("leased again, not blocked");
    h.events();
    assert!(h.report("b", token, h.k(2), success(2)));
    assert_eq!(h.events(), [format!("{b}:ok:1"), format!("{b}:done:true")]);
    assert!(h.model.result(&h.k(1)).is_some());
}

/// A run whose inputs cannot be fetched counts as an attempt: when every
/// run loses them, the job fails at the attempt limit, saying why, instead
/// of rebuilding and losing without end.
#[test]
fn runs_that_keep_losing_their_inputs_give_up_at_the_attempt_limit() {
    let mut h = Harness::new();
    let b = h.submit("r", graph(&[(1, &[]), (2, &[0]), (3, &[1])]));
    assert!(h.run_one("a", h.k(1), success(1)));
    h.events();
    for attempt in 1..=3u32 {
        // Past the wait for a worker holding the inputs.
        h.now_ms += 100;
        // A holder that lies: a has the copy, b cannot fetch it.
        h.apply(Command::Heartbeat {
            worker_id: "a".into(),
            tokens: Vec::new(),
            added: vec![artifact(1)],
            dropped: Vec::new(),
            lease_timeout_ms: LEASE_MS,
            now_ms: h.now_ms,
        });
        let token = loop {
            // Rebuilt first when no copy is left.
            match h.pick("b").first() {
                Some(k) if *k == h.k(1) => assert!(h.run_one("b", h.k(1), success(1))),
                Some(_) => break h.assign("b", &[h.k(2)])[0].expect("assigned"),
                None => panic!("nothing to run"),
            }
        };
        let lost = Outcome::LostInputs {
            lost: vec![(artifact(1), vec!["a:1".to_string()])],
        };
        assert!(h.report("b", token, h.k(2), lost));
        if attempt < 3 {
            assert_eq!(h.exec(2).attempts, attempt);
        }
    }
    assert!(h.model.execution(&h.k(2)).is_none(), "given up");
    let events = h.take_events();
    let error = Harness::error_of(&events, b, 1);
    assert!(
        error.contains("gave up after 3 attempts") && error.contains(&artifact(1).to_string()),
        "{error}"
    );
    assert!(
        events
            .iter()
            .any(|(id, _, e)| *id == b && matches!(e, Event::JobSkipped { job: 2, .. })),
        "its dependent is skipped: {events:?}"
    );
}

/// What the leader proposes for a lease whose assignment it could not
/// write (a dependency's result dropped in between): the lease is handed
/// back, no attempt counted, no copy forgotten.
#[test]
fn a_lease_handed_back_requeues_without_an_attempt() {
    let mut h = Harness::new();
    h.submit("r", graph(&[(1, &[]), (2, &[0])]));
    assert!(h.run_one("a", h.k(1), success(1)));
    let token = h.assign("b", &[h.k(2)])[0].expect("assigned");
    let back = Outcome::LostInputs { lost: Vec::new() };
    assert!(h.report("b", token, h.k(2), back));
    assert_eq!(h.exec(2).attempts, 0);
    assert!(matches!(h.exec(2).state, ExecState::Queued { .. }));
    assert_eq!(h.model.workers()["b"].running, 0);
    assert_eq!(h.model.holders(&artifact(1)), ["a:1"]);
    assert!(h.assign("b", &[h.k(2)])[0].is_some(), "leased again");
}

#[test]
fn cancelling_a_build_skips_its_open_jobs_and_stops_runs_nobody_else_needs() {
    let mut h = Harness::new();
    // Build 1: A (running) <- B, and C; build 2 wants C too.
    let b1 = h.submit("r1", graph(&[(1, &[]), (2, &[0]), (3, &[])]));
    let b2 = h.submit("r2", graph(&[(3, &[])]));
    let token_a = h.assign("a", &[h.k(1)])[0].expect("A leased");
    h.events();
    assert_eq!(
        h.apply(Command::CancelBuild {
            build_id: b1,
            now_ms: h.now_ms
        }),
        Response::Cancelled { cancelled: true }
    );
    assert_eq!(
        h.events(),
        [
            format!("{b1}:skip:0"),
            format!("{b1}:skip:1"),
            format!("{b1}:skip:2"),
            format!("{b1}:done:false"),
        ]
    );
    // A's run is stopped: its lease is revoked at the next heartbeat, and
    // a late result is refused. C still runs for build 2.
    assert!(h.model.execution(&h.k(1)).is_none());
    assert_eq!(
        h.heartbeat("a", &[token_a]),
        Response::Heartbeat {
            revoked: vec![token_a],
            reregister: false
        }
    );
    assert!(!h.report("a", token_a, h.k(1), success(1)));
    assert_eq!(h.model.workers()["a"].running, 0);
    assert_eq!(h.exec(3).waiters, vec![(b2, 0)]);
    assert!(h.run_one("b", h.k(3), success(3)));
    assert_eq!(
        h.events(),
        [
            format!("{b2}:start:0"),
            format!("{b2}:ok:0"),
            format!("{b2}:done:true")
        ]
    );
    // Cancelling again, or a finished build, changes nothing.
    for build_id in [b1, b2] {
        assert_eq!(
            h.apply(Command::CancelBuild {
                build_id,
                now_ms: h.now_ms
            }),
            Response::Cancelled { cancelled: false }
        );
    }
    assert!(h.events().is_empty());
}

/// The invariant check is shown to fail: each derived index, broken on
/// purpose after a run that leaves something in it, is named.
#[test]
fn the_invariant_check_names_a_broken_index() {
    let mut h = Harness::new();
    let jobs = graph(&[(1, &[]), (2, &[0]), (3, &[])]);
    h.submit("r", jobs);
    let token = h.assign("a", &[h.k(1)])[0].expect("leased");
    h.model
        .check_invariants()
        .expect("consistent before breaking it");

    let check = |model: &Model, what: &str| {
        let violation = model
            .check_invariants()
            .expect_err("a broken index is found");
        let text = violation.to_string();
        assert!(text.contains(what), "{what} is named in: {text}");
    };
    let mut broken = h.model.clone_for_test();
    broken.queue = Default::default();
    check(&broken, "queue");
    let mut broken = h.model.clone_for_test();
    broken.leases.remove(&token);
    check(&broken, "leases");
    let mut broken = h.model.clone_for_test();
    broken.workers.get_mut("a").expect("worker a").running += 1;
    check(&broken, "running counts");
    let mut broken = h.model.clone_for_test();
    broken.held_by.entry(artifact(9)).or_default().insert("b");
    check(&broken, "held_by");
    let mut broken = h.model.clone_for_test();
    broken.requests.insert("ghost".into(), 99);
    check(&broken, "submit request IDs");
    let mut broken = h.model.clone_for_test();
    let build = broken.builds.values_mut().next().expect("a build");
    build.header.remaining += 1;
    check(&broken, "remaining");
    let mut broken = h.model.clone_for_test();
    let build = broken.builds.values_mut().next().expect("a build");
    build.jobs[0].dependents.clear();
    check(&broken, "dependents");
}

/// Rows of `outputs` in the store.
fn stored_outputs(store: &MemStore) -> BTreeMap<Vec<u8>, Vec<u8>> {
    store
        .tables
        .get(crate::tables::T_OUTPUTS)
        .cloned()
        .unwrap_or_default()
}

#[test]
fn an_output_is_stored_once_for_every_job_that_shows_it_and_goes_with_the_last() {
    let mut h = Harness::new();
    // Fifty builds wait for the one execution of key 1.
    let builds: Vec<u64> = (0..50)
        .map(|i| h.submit(&format!("r{i}"), graph(&[(1, &[])])))
        .collect();
    let big = Outcome::Success {
        stdout: vec![b'o'; 100_000],
        stderr: vec![b'e'; 100_000],
        artifact: artifact(1),
        artifact_size: 10,
    };
    let dirty_bytes = |h: &Harness| -> usize {
        h.model
            .dirty
            .events
            .iter()
            .map(|(_, _, e)| postcard::to_stdvec(e).expect("encode").len())
            .sum()
    };
    let token = h.assign("a", &[h.k(1)])[0].expect("assigned");
    h.index += 1;
    let report_index = h.index;
    h.model.apply(
        report_index,
        &Command::Report {
            worker_id: "a".into(),
            token,
            cache_key: h.k(1),
            outcome: big,
            max_attempts: 3,
            queued_ms: 0,
            now_ms: h.now_ms,
        },
    );
    // What the entry writes for fifty events is small: they name the row.
    assert!(dirty_bytes(&h) < 50 * 200, "{} bytes", dirty_bytes(&h));
    h.model.flush(&mut h.store).expect("flush");
    let rows = stored_outputs(&h.store);
    assert_eq!(rows.len(), 1, "one row for fifty jobs");
    let output = crate::tables::read_output(&h.store, report_index)
        .expect("read")
        .expect("stored");
    assert_eq!(
        (output.stdout.len(), output.stderr.len()),
        (100_000, 100_000)
    );
    // Each job's event resolves to it.
    for &b in &builds {
        let events = crate::tables::read_events(&h.store, b, 0, 10, 1 << 30).expect("read");
        let finished = events
            .iter()
            .find(|e| matches!(e.event, Event::JobFinished { .. }))
            .expect("finished");
        assert_eq!(finished.output.as_ref(), Some(&output));
    }
    // A cached answer names the same row.
    let cached = h.submit("late", graph(&[(1, &[])]));
    let events = crate::tables::read_events(&h.store, cached, 0, 10, 1 << 30).expect("read");
    assert_eq!(events[0].output.as_ref(), Some(&output));
    assert_eq!(stored_outputs(&h.store).len(), 1);
    // A page is bounded in bytes: past the first event, what fits.
    let page = crate::tables::read_events(&h.store, builds[0], 0, 10, 1_000).expect("read");
    assert!(
        matches!(
            page[..],
            [StoredEvent {
                event: Event::JobStarted { .. },
                ..
            }]
        ),
        "{page:?}"
    );
    let page = crate::tables::read_events(&h.store, builds[0], 1, 10, 1_000).expect("read");
    assert_eq!(
        page.len(),
        1,
        "a page's first event is read whatever its size"
    );
    assert!(page[0].output.is_some());
    // The row goes when nothing names it: the result forgotten, every build
    // that shows it retired.
    h.model.forget_result(h.k(1));
    h.model.flush(&mut h.store).expect("flush");
    assert_eq!(stored_outputs(&h.store).len(), 1, "builds still show it");
    h.now_ms += MIN_RETAINED_MS;
    for i in 0..MAX_RETAINED_BUILDS {
        h.submit(&format!("filler{i}"), Vec::new());
    }
    assert!(
        stored_outputs(&h.store).is_empty(),
        "retired with its builds"
    );
    h.model.check_invariants().expect("invariants");
}

fn collect(h: &mut Harness, limits: GcLimits) -> Collected {
    match h.apply(Command::CollectGarbage {
        now_ms: h.now_ms,
        limits,
    }) {
        Response::Collected(c) => c,
        other => panic!("collect answered {other:?}"),
    }
}

const KEEP_ALL: GcLimits = GcLimits {
    blob_retention_ms: u64::MAX,
    max_blob_bytes: u64::MAX,
    max_results: u64::MAX,
    max_result_bytes: u64::MAX,
};

#[test]
fn blobs_no_build_needs_go_after_their_retention_and_past_the_byte_bound_lru_first() {
    let mut h = Harness::new();
    let blob = |n: u8| Digest::from_bytes([200 + n; 20]);
    for n in 0..3 {
        h.apply(Command::BlobStored {
            digest: blob(n).into(),
            size: 100,
        });
        h.now_ms += 1_000;
        h.heartbeat("a", &[]);
    }
    // Blob 0 is an input of a build in flight.
    let mut jobs = graph(&[(1, &[])]);
    jobs[0].spec.inputs.push(InputRef {
        path: "src/a.c".into(),
        digest: blob(0),
        size: 100,
    });
    h.submit("r", jobs);
    // Blob 1, unused for 2 s, passes a retention of 1.5 s; blob 2 does not.
    let limits = GcLimits {
        blob_retention_ms: 1_500,
        ..KEEP_ALL
    };
    assert_eq!(collect(&mut h, limits).blobs, 1);
    assert!(!h.model.has_blob(&blob(1).into()));
    assert!(h.model.has_blob(&blob(0).into()) && h.model.has_blob(&blob(2).into()));
    // Over a byte bound of 50, a recently used blob still stays (a client
    // uploads before it submits)...
    let limits = GcLimits {
        max_blob_bytes: 50,
        ..KEEP_ALL
    };
    assert_eq!(collect(&mut h, limits).blobs, 0);
    assert_eq!(h.model.blob_bytes_kept(&limits), 200);
    // ... and once it is not recent, blob 2 goes; blob 0 stays, needed.
    h.now_ms += RECENT_BLOB_MS;
    h.heartbeat("a", &[]);
    assert_eq!(collect(&mut h, limits).blobs, 1);
    assert!(h.model.has_blob(&blob(0).into()));
    assert!(!h.model.has_blob(&blob(2).into()));
    assert_eq!(h.model.blob_bytes_kept(&limits), 100);
    // Done with it, blob 0 can go too.
    assert!(h.run_one("a", h.k(1), success(1)));
    assert_eq!(collect(&mut h, limits).blobs, 1);
    assert_eq!(h.model.blob_bytes(), 0);
    // A submit naming a collected blob is refused for a retry (which
    // uploads it again), changing nothing.
    let mut jobs = graph(&[(2, &[])]);
    jobs[0].spec.inputs.push(InputRef {
        path: "src/a.c".into(),
        digest: blob(0),
        size: 100,
    });
    let builds = h.model.builds.len();
    let refused = h.apply(Command::SubmitBuild {
        job_timeout_ms: 60_000,
        request_id: "late".into(),
        now_ms: h.now_ms,
        staged_parts: 0,
        jobs,
    });
    assert!(
        matches!(&refused, Response::Refused { retry: true, reason } if reason.contains("no longer stored")),
        "{refused:?}"
    );
    assert_eq!(h.model.builds.len(), builds);
}

#[test]
fn cached_results_are_bounded_least_recently_used_first_and_never_one_a_build_needs() {
    let mut h = Harness::new();
    h.submit("r1", graph(&[(1, &[]), (2, &[])]));
    assert!(h.run_one("a", h.k(1), success(1)));
    h.now_ms += 10;
    assert!(h.run_one("a", h.k(2), success(2)));
    // A build in flight needs key 3's result (job 4 waits on it).
    h.submit("r2", graph(&[(3, &[]), (4, &[0])]));
    h.now_ms += 10;
    assert!(h.run_one("a", h.k(3), success(3)));
    // Key 2 answers a new build at once: a use that recent is not
    // recorded (nor its row rewritten).
    let made = h.model.result(&h.k(2)).expect("cached").last_used_ms;
    h.now_ms += 10;
    h.submit("r3a", graph(&[(2, &[])]));
    assert_eq!(h.model.result(&h.k(2)).unwrap().last_used_ms, made);
    // Key 1 answers a new build later: used more recently than key 2.
    h.now_ms += crate::RESULT_USE_RESOLUTION_MS;
    h.submit("r3", graph(&[(1, &[])]));
    assert_eq!(h.model.result(&h.k(1)).unwrap().last_used_ms, h.now_ms);
    let limits = GcLimits {
        max_results: 2,
        ..KEEP_ALL
    };
    let collected = collect(&mut h, limits);
    // Key 2, the least recently used, goes; key 3 stays while its
    // dependent is in flight.
    assert_eq!(collected.results, 1, "{collected:?}");
    assert!(h.model.result(&h.k(3)).is_some() && h.model.result(&h.k(1)).is_some());
    assert!(h.model.result(&h.k(2)).is_none());
    let collected = collect(
        &mut h,
        GcLimits {
            max_results: 1,
            ..KEEP_ALL
        },
    );
    assert_eq!(collected.results, 1, "then key 1: {collected:?}");
    assert!(h.model.result(&h.k(3)).is_some() && h.model.result(&h.k(1)).is_none());
    // A build asking for an evicted result runs its job again. (Job 4
    // of r2, queued ten minutes ago beside the output it needs on
    // worker a, is no longer held back for a either.)
    h.submit("r4", graph(&[(2, &[])]));
    let picked = h.pick("b");
    assert!(picked.contains(&h.k(2)), "{picked:?}");
}

#[test]
fn finished_builds_are_retired_first_finished_first_and_never_within_a_minute() {
    let mut h = Harness::new();
    let slow = h.submit("slow", graph(&[(1, &[])]));
    let quick = h.submit("quick", Vec::new());
    // Past the count bound at once: nothing is retired within a minute.
    let fillers: Vec<u64> = (0..MAX_RETAINED_BUILDS)
        .map(|i| h.submit(&format!("filler{i}"), Vec::new()))
        .collect();
    assert_eq!(h.model.builds.len(), MAX_RETAINED_BUILDS + 2);
    // `slow`, the lowest ID, finishes last.
    h.now_ms += 10;
    assert!(h.run_one("a", h.k(1), success(1)));
    // A minute on, the next finish retires the first finished: `quick` and
    // the first fillers, not `slow`.
    h.now_ms += MIN_RETAINED_MS;
    let later = h.submit("later", Vec::new());
    assert_eq!(h.model.builds.len(), MAX_RETAINED_BUILDS);
    assert!(h.model.build(quick).is_none());
    assert!(h.model.build(fillers[0]).is_none() && h.model.build(fillers[1]).is_none());
    assert!(h.model.build(fillers[2]).is_some());
    assert!(
        h.model.build(slow).is_some(),
        "finished last of the old ones"
    );
    assert!(h.model.build(later).is_some(), "the newest stays");
}

#[test]
fn a_worker_at_its_holdings_bound_still_holds_what_it_just_built() {
    let mut h = Harness::new();
    let listed: Vec<Digest> = (0..crate::index::MAX_HOLDINGS_PER_WORKER as u32 + 10)
        .map(|i| {
            let mut bytes = [0u8; 20];
            bytes[..4].copy_from_slice(&i.to_be_bytes());
            bytes[19] = 0xee;
            Digest::from_bytes(bytes)
        })
        .collect();
    h.apply(Command::RegisterWorker {
        worker_id: "a".into(),
        addr: "a:1".into(),
        slots: 2,
        ahead: 0,
        held: listed,
        properties: Vec::new(),
        now_ms: h.now_ms,
    });
    let held = h.model.workers()["a"].held.len();
    assert_eq!(
        held,
        crate::index::MAX_HOLDINGS_PER_WORKER,
        "listed copies are bounded"
    );
    h.submit("r", graph(&[(1, &[])]));
    assert!(h.run_one("a", h.k(1), success(1)));
    assert_eq!(
        h.model.holders(&artifact(1)),
        ["a:1"],
        "its own result is held"
    );
}

#[test]
fn action_results_are_stored_replaced_and_collected_broken_first_then_oldest() {
    use distbuild_proto::{BlobKey, HashFunction};
    let mut h = Harness::new();
    let blob = HashFunction::Sha256.key_of(b"out");
    h.apply(Command::BlobStored {
        digest: blob,
        size: 3,
    });
    let action = |n: u8| BlobKey::Sha256([n; 32]);
    for n in 0..3u8 {
        h.now_ms += 1_000;
        h.apply(Command::ActionResultStored {
            instance_name: "main".into(),
            action: action(n),
            result: vec![n; 10],
            // Action 1 names a blob that was never stored.
            blobs: vec![if n == 1 {
                (BlobKey::Sha256([99; 32]), 5)
            } else {
                (blob, 3)
            }],
            now_ms: h.now_ms,
        });
    }
    // Stored again: replaced, not added.
    h.apply(Command::ActionResultStored {
        instance_name: "main".into(),
        action: action(2),
        result: vec![7; 4],
        blobs: vec![(blob, 3)],
        now_ms: h.now_ms,
    });
    assert_eq!(
        h.model
            .action_result("main", &action(2))
            .map(|r| r.result.clone()),
        Some(vec![7; 4])
    );
    assert!(
        h.model.action_result("other", &action(2)).is_none(),
        "instances apart"
    );
    let limits = GcLimits {
        blob_retention_ms: u64::MAX,
        max_blob_bytes: u64::MAX,
        max_results: 2,
        max_result_bytes: u64::MAX,
    };
    let Response::Collected(collected) = h.apply(Command::CollectGarbage {
        now_ms: h.now_ms,
        limits,
    }) else {
        panic!("collected")
    };
    assert_eq!(collected.action_results, 1);
    assert!(
        h.model.action_result("main", &action(1)).is_none(),
        "the broken one went"
    );
    let Response::Collected(collected) = h.apply(Command::CollectGarbage {
        now_ms: h.now_ms,
        limits: GcLimits {
            max_results: 1,
            ..limits
        },
    }) else {
        panic!("collected")
    };
    assert_eq!(collected.action_results, 1);
    assert!(
        h.model.action_result("main", &action(0)).is_none(),
        "the oldest went"
    );
    assert!(h.model.action_result("main", &action(2)).is_some());
}

#[test]
fn a_blob_and_a_result_in_use_outlive_their_retention_and_unused_ones_do_not() {
    use distbuild_proto::{BlobKey, HashFunction};
    let mut h = Harness::new();
    let used = HashFunction::Sha256.key_of(b"used");
    let idle = HashFunction::Sha256.key_of(b"idle");
    for blob in [used, idle] {
        h.apply(Command::BlobStored {
            digest: blob,
            size: 4,
        });
    }
    h.apply(Command::ActionResultStored {
        instance_name: "main".into(),
        action: BlobKey::Sha256([1; 32]),
        result: vec![1],
        blobs: vec![(used, 4)],
        now_ms: h.now_ms,
    });
    h.now_ms += 50_000;
    h.apply(Command::Used {
        blobs: vec![used, BlobKey::Sha256([9; 32])],
        action_results: vec![("main".into(), BlobKey::Sha256([1; 32]))],
        now_ms: h.now_ms,
    });
    assert_eq!(
        h.model
            .action_result("main", &BlobKey::Sha256([1; 32]))
            .map(|r| r.last_used_ms),
        Some(h.now_ms)
    );
    h.now_ms += 50_000;
    let Response::Collected(collected) = h.apply(Command::CollectGarbage {
        now_ms: h.now_ms,
        limits: GcLimits {
            blob_retention_ms: 60_000,
            max_blob_bytes: u64::MAX,
            max_results: u64::MAX,
            max_result_bytes: u64::MAX,
        },
    }) else {
        panic!("collected")
    };
    assert_eq!(collected.blobs, 1, "the idle one");
    assert!(h.model.has_blob(&used) && !h.model.has_blob(&idle));
}

/// A job running Remote Execution API action `n` (SHA-256 digest `[n; 32]`)
/// that only a worker with `pool=<pool>` may run.
fn action_job(n: u8, pool: &str, do_not_cache: bool) -> SubmittedJob {
    SubmittedJob {
        cache_key: key(n),
        deps: Vec::new(),
        spec: JobSpec {
            job_id: id(n),
            name: format!("action {n}"),
            cmds: Vec::new(),
            inputs: Vec::new(),
            deps: Vec::new(),
            action: Some(Box::new(crate::RemoteAction {
                instance_name: "main".into(),
                action: distbuild_proto::BlobKey::Sha256([n; 32]),
                action_size: 100,
                do_not_cache,
                platform: vec![("pool".into(), pool.into())],
            })),
        },
    }
}

fn executed(exit_code: i32, blobs: Vec<(distbuild_proto::BlobKey, u64)>) -> Outcome {
    Outcome::Executed {
        exit_code,
        stdout: b"compiled".to_vec(),
        stderr: Vec::new(),
        result: vec![0x30, exit_code as u8],
        blobs,
    }
}

/// The `ActionResult` the `JobFinished` of `build`'s job 0 shows.
fn action_result_shown(h: &Harness, build: u64) -> Vec<u8> {
    let events = crate::tables::read_events(&h.store, build, 0, 100, 1 << 20).expect("read");
    let finished: Vec<_> = events
        .into_iter()
        .filter(|e| matches!(e.event, Event::JobFinished { .. }))
        .collect();
    assert_eq!(finished.len(), 1, "one JobFinished");
    finished[0]
        .output
        .as_ref()
        .expect("its output row")
        .action_result
        .clone()
}

#[test]
fn an_action_runs_once_for_every_caller_only_on_a_worker_with_its_platform_and_is_cached() {
    use distbuild_proto::HashFunction;
    let mut h = Harness::new();
    let out = HashFunction::Sha256.key_of(b"out");
    h.apply(Command::BlobStored {
        digest: out,
        size: 3,
    });
    let first = h.submit("op-1", vec![action_job(1, "b", false)]);
    let second = h.submit("op-2", vec![action_job(1, "b", false)]);
    assert_eq!(h.exec(1).waiters.len(), 2, "two callers, one execution");
    assert!(h.pick("a").is_empty(), "worker a lacks pool=b");
    assert_eq!(h.assign("a", &[h.k(1)]), [None], "nor may it be assigned");
    assert_eq!(h.pick("b"), [h.k(1)]);
    assert!(h.run_one("b", h.k(1), executed(0, vec![(out, 3)])));
    assert_eq!(
        h.events(),
        [
            format!("{first}:start:0"),
            format!("{second}:start:0"),
            format!("{first}:ok:0"),
            format!("{second}:ok:0"),
            format!("{first}:done:true"),
            format!("{second}:done:true"),
        ]
    );
    for build in [first, second] {
        assert_eq!(action_result_shown(&h, build), [0x30, 0]);
    }
    let cached = h
        .model
        .action_result("main", &distbuild_proto::BlobKey::Sha256([1; 32]))
        .expect("cached");
    assert_eq!(cached.result, [0x30, 0]);
    assert_eq!(cached.blobs, [(out, 3)]);
}

#[test]
fn a_failed_uncacheable_or_unstored_action_result_reaches_its_caller_but_not_the_cache() {
    use distbuild_proto::{BlobKey, HashFunction};
    let mut h = Harness::new();
    let out = HashFunction::Sha256.key_of(b"out");
    h.apply(Command::BlobStored {
        digest: out,
        size: 3,
    });
    let cases = [
        // (action, do_not_cache, exit code, blobs, ok)
        (1, false, 2, vec![(out, 3)], false),
        (2, true, 0, vec![(out, 3)], true),
        (
            3,
            false,
            0,
            vec![(HashFunction::Sha256.key_of(b"gone"), 4)],
            true,
        ),
        (4, false, 0, vec![(out, 4)], true),
    ];
    for (n, do_not_cache, exit_code, blobs, ok) in cases {
        let build = h.submit(&format!("op-{n}"), vec![action_job(n, "a", do_not_cache)]);
        assert!(h.run_one("a", key(n), executed(exit_code, blobs)));
        let events = h.events();
        assert_eq!(
            events.last(),
            Some(&format!("{build}:done:{ok}")),
            "action {n}: {events:?}"
        );
        assert_eq!(
            action_result_shown(&h, build),
            [0x30, exit_code as u8],
            "action {n}"
        );
        assert!(
            h.model
                .action_result("main", &BlobKey::Sha256([n; 32]))
                .is_none(),
            "action {n} is not cached"
        );
    }
}

#[test]
fn an_action_result_reported_for_a_plain_job_fails_it() {
    let mut h = Harness::new();
    let build = h.submit("b", graph(&[(1, &[])]));
    assert!(h.run_one("a", h.k(1), executed(0, Vec::new())));
    let events = h.take_events();
    assert!(
        Harness::error_of(&events, build, 0).contains("not a Remote Execution API action"),
        "{events:?}"
    );
    assert!(h.model.result(&h.k(1)).is_none(), "nothing cached");
}

#[test]
fn a_plain_success_reported_for_an_action_fails_it_and_caches_nothing() {
    let mut h = Harness::new();
    let build = h.submit("op", vec![action_job(1, "a", false)]);
    assert!(h.run_one("a", h.k(1), success(1)));
    let events = h.take_events();
    assert!(
        Harness::error_of(&events, build, 0).contains("does not run Remote Execution API actions"),
        "{events:?}"
    );
    assert!(h.model.result(&h.k(1)).is_none(), "not in the result cache");
    assert!(
        h.model.holders(&artifact(1)).is_empty(),
        "no artifact recorded"
    );
    // The next caller of the action runs it again.
    h.submit("op-2", vec![action_job(1, "a", false)]);
    assert_eq!(h.pick("a"), [h.k(1)]);
}

/// Build `stranded` (action 1, pool b) failed naming its platform, and
/// build `placeable` (action 2, pool a) still waits for worker a.
fn only_the_stranded_action_failed(h: &mut Harness, stranded: u64, placeable: u64) {
    let events = h.take_events();
    assert!(
        Harness::error_of(&events, stranded, 0).contains("no worker with platform pool=b"),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|(b, _, _)| *b == placeable),
        "the action worker a can run still waits: {events:?}"
    );
    assert_eq!(h.pick("a"), [h.k(2)]);
}

#[test]
fn a_queued_action_whose_platform_its_worker_no_longer_offers_fails_when_it_registers_again() {
    let mut h = Harness::new();
    let stranded = h.submit("op-1", vec![action_job(1, "b", false)]);
    let placeable = h.submit("op-2", vec![action_job(2, "a", false)]);
    // b starts again offering another pool; a's offer is unchanged.
    for (worker, pool) in [("a", "a"), ("b", "c")] {
        h.apply(Command::RegisterWorker {
            worker_id: worker.into(),
            addr: format!("{worker}:1"),
            slots: 2,
            ahead: 0,
            held: Vec::new(),
            properties: vec![("pool".into(), pool.into())],
            now_ms: h.now_ms,
        });
    }
    only_the_stranded_action_failed(&mut h, stranded, placeable);
}

#[test]
fn a_queued_action_whose_platform_left_with_its_worker_fails_instead_of_waiting_forever() {
    let mut h = Harness::new();
    let stranded = h.submit("op-1", vec![action_job(1, "b", false)]);
    let placeable = h.submit("op-2", vec![action_job(2, "a", false)]);
    // Worker b stops being seen; a keeps heartbeating.
    h.now_ms += 10_000;
    h.heartbeat("a", &[]);
    h.expire(3, 5_000);
    assert!(!h.model.workers().contains_key("b"), "b removed");
    only_the_stranded_action_failed(&mut h, stranded, placeable);
}
