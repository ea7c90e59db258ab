//! Transitions of the replicated model, driven command by command.

use super::*;

fn id(n: u8) -> JobId {
    JobId::from_bytes([n; 20])
}

fn key(n: u8) -> Digest {
    Digest::from_bytes([n; 20])
}

/// A job `n` with cache key `key(n)` depending on the listed positions.
fn job(n: u8, deps: &[u32], all: &[(u8, &[u32])]) -> SubmittedJob {
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
            deps: deps
                .iter()
                .map(|&d| DepRef {
                    job_id: id(all[d as usize].0),
                    cache_key: key(all[d as usize].0),
                })
                .collect(),
        },
    }
}

fn graph(jobs: &[(u8, &[u32])]) -> Vec<SubmittedJob> {
    jobs.iter().map(|(n, deps)| job(*n, deps, jobs)).collect()
}

const LEASE_MS: u64 = 1000;

struct Harness {
    model: Model,
    index: u64,
    now_ms: u64,
}

impl Harness {
    fn new() -> Self {
        let mut h = Self {
            model: Model::default(),
            index: 0,
            now_ms: 1_000,
        };
        for w in ["a", "b"] {
            h.apply(Command::RegisterWorker {
                worker_id: w.into(),
                addr: format!("{w}:1"),
                slots: 2,
                held: Vec::new(),
                now_ms: 1_000,
            });
        }
        h
    }

    fn apply(&mut self, command: Command) -> Response {
        self.index += 1;
        self.model.apply(self.index, &command)
    }

    fn submit(&mut self, request: &str, jobs: Vec<SubmittedJob>) -> u64 {
        match self.apply(Command::SubmitBuild {
            request_id: request.into(),
            now_ms: self.now_ms,
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
            Response::Assigned { tokens } => tokens,
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
            now_ms: self.now_ms,
        }) {
            Response::Reported { accepted } => accepted,
            other => panic!("report answered {other:?}"),
        }
    }

    /// The events since the last call, rendered short: `build:kind:job`.
    fn events(&mut self) -> Vec<String> {
        self.model
            .take_events()
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
        artifact: Digest::from_bytes([100 + n; 20]),
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
fn a_chain_runs_in_order_and_finishes() {
    let mut h = Harness::new();
    let b = h.submit("r1", graph(&[(1, &[]), (2, &[0])]));
    h.events();
    assert_eq!(
        h.model.pick_for("a", 4, h.now_ms, 50, LEASE_MS),
        vec![key(1)]
    );
    assert!(h.run_one("a", key(1), success(1)));
    assert_eq!(h.events(), [format!("{b}:start:0"), format!("{b}:ok:0")]);
    assert!(h.run_one("a", key(2), success(2)));
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
        h.model.pick_for("a", 4, h.now_ms, 50, LEASE_MS),
        vec![key(1)]
    );
    assert!(h.run_one("a", key(1), success(1)));
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
    assert!(h.run_one("a", key(1), failure(3)));
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
        h.model.pick_for("a", 4, h.now_ms, 50, LEASE_MS),
        vec![key(4)]
    );
    assert!(h.run_one("a", key(4), success(4)));
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
        h.model.pick_for("a", 4, h.now_ms, 50, LEASE_MS),
        vec![key(1)]
    );
}

#[test]
fn an_expired_lease_requeues_and_its_late_result_is_refused() {
    let mut h = Harness::new();
    h.submit("r", graph(&[(1, &[])]));
    let token = h.assign("a", &[key(1)])[0].expect("assigned");
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
    assert!(!h.model.has_expired_lease(h.now_ms));
    // Not renewed: it expires and the job is queued again.
    h.now_ms += 1;
    assert!(h.model.has_expired_lease(h.now_ms));
    h.apply(Command::ExpireLeases {
        now_ms: h.now_ms,
        max_attempts: 3,
    });
    assert_eq!(
        h.model.pick_for("b", 4, h.now_ms, 50, LEASE_MS),
        vec![key(1)]
    );
    // The old holder's result and renewal are refused.
    assert!(!h.report("a", token, key(1), success(1)));
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
    assert!(h.run_one("b", key(1), success(1)));
}

#[test]
fn a_job_whose_lease_keeps_expiring_fails_with_a_message() {
    let mut h = Harness::new();
    let b = h.submit("r", graph(&[(1, &[])]));
    for _ in 0..2 {
        h.assign("a", &[key(1)]);
        h.now_ms += LEASE_MS;
        h.apply(Command::ExpireLeases {
            now_ms: h.now_ms,
            max_attempts: 2,
        });
    }
    let events = h.model.take_events();
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
    assert!(h.run_one("a", key(1), success(1)));
    // Worker b polls first: job 2's input lives on a, which has a free slot.
    assert!(h.model.pick_for("b", 4, h.now_ms, 50, LEASE_MS).is_empty());
    assert_eq!(
        h.model.pick_for("a", 4, h.now_ms, 50, LEASE_MS),
        vec![key(2)]
    );
    // After the locality wait, anyone may take it.
    assert_eq!(
        h.model.pick_for("b", 4, h.now_ms + 50, 50, LEASE_MS),
        vec![key(2)]
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
        h.model.pick_for("b", 4, h.now_ms, 50, LEASE_MS),
        vec![key(2)]
    );
}

#[test]
fn slots_bound_assignments() {
    let mut h = Harness::new();
    h.submit("r", graph(&[(1, &[]), (2, &[]), (3, &[])]));
    let picks = h.model.pick_for("a", 10, h.now_ms, 50, LEASE_MS);
    assert_eq!(picks.len(), 2, "worker a has two slots");
    let tokens = h.assign("a", &[key(1), key(2), key(3)]);
    assert!(tokens[0].is_some() && tokens[1].is_some());
    assert_eq!(tokens[2], None, "a third lease exceeds the slots");
    assert!(h.model.pick_for("a", 10, h.now_ms, 50, LEASE_MS).is_empty());
}

#[test]
fn a_reregistering_worker_loses_its_leases() {
    let mut h = Harness::new();
    h.submit("r", graph(&[(1, &[])]));
    let token = h.assign("a", &[key(1)])[0].expect("assigned");
    h.apply(Command::RegisterWorker {
        worker_id: "a".into(),
        addr: "a:1".into(),
        slots: 2,
        held: Vec::new(),
        now_ms: h.now_ms,
    });
    assert!(!h.report("a", token, key(1), success(1)));
    assert_eq!(
        h.model.pick_for("b", 4, h.now_ms, 50, LEASE_MS),
        vec![key(1)]
    );
}

#[test]
fn an_empty_build_finishes_at_once() {
    let mut h = Harness::new();
    let b = h.submit("r", Vec::new());
    assert_eq!(h.events(), [format!("{b}:done:true")]);
}
