//! A worker leaving gracefully: drained (no new work), its unique outputs
//! that builds need planned for copying, then deregistered.

use super::*;

fn drain(h: &mut Harness, worker: &str) -> Response {
    h.apply(Command::DrainWorker {
        worker_id: worker.into(),
        now_ms: h.now_ms,
    })
}

fn deregister(h: &mut Harness, worker: &str) -> Response {
    h.apply(Command::DeregisterWorker {
        worker_id: worker.into(),
        now_ms: h.now_ms,
    })
}

#[test]
fn a_draining_worker_gets_no_new_work_but_finishes_what_it_runs() {
    let mut h = Harness::new();
    h.submit("r", graph(&[(1, &[]), (2, &[]), (3, &[])]));
    let token = h.assign("a", &[h.k(1)])[0].expect("leased");
    assert_eq!(drain(&mut h, "a"), Response::Worker { found: true });
    assert!(h.pick("a").is_empty(), "no work for a draining worker");
    assert_eq!(h.assign("a", &[h.k(2)]), vec![None], "nor by an assign");
    assert!(!h.pick("b").is_empty(), "others still get work");
    // Its running job's result counts.
    assert!(h.report("a", token, h.k(1), success(1)));
    assert_eq!(drain(&mut h, "nobody"), Response::Worker { found: false });
}

#[test]
fn the_plan_lists_what_only_draining_workers_hold_and_builds_need() {
    let mut h = Harness::new();
    h.submit("r", graph(&[(1, &[]), (2, &[0]), (3, &[])]));
    assert!(h.run_one("a", h.k(1), success(1)));
    assert!(h.run_one("b", h.k(3), success(3)));
    assert!(h.model.drain_plan(60_000, 10).is_empty(), "nobody drains");
    drain(&mut h, "a");
    let plan = h.model.drain_plan(60_000, 10);
    assert_eq!(plan.len(), 1);
    assert_eq!(plan["a"], vec![(artifact(1), 10)]);
    // Once b holds a copy, a holds nothing only it has.
    h.apply(Command::Heartbeat {
        worker_id: "b".into(),
        tokens: Vec::new(),
        added: vec![artifact(1)],
        dropped: Vec::new(),
        lease_timeout_ms: LEASE_MS,
        now_ms: h.now_ms,
    });
    assert_eq!(h.model.drain_plan(60_000, 10)["a"], Vec::new());
}

#[test]
fn a_finished_build_stops_needing_outputs_after_the_grace() {
    let mut h = Harness::new();
    h.submit("r", graph(&[(1, &[])]));
    assert!(h.run_one("a", h.k(1), success(1)));
    drain(&mut h, "a");
    assert_eq!(
        h.model.drain_plan(60_000, 10)["a"].len(),
        1,
        "its client may still download"
    );
    h.now_ms += 60_000;
    h.heartbeat("b", &[]);
    assert!(h.model.drain_plan(60_000, 10)["a"].is_empty());
}

#[test]
fn deregistering_hands_leases_back_without_an_attempt_and_forgets_holdings() {
    let mut h = Harness::new();
    h.submit("r", graph(&[(1, &[]), (2, &[])]));
    assert!(h.run_one("a", h.k(1), success(1)));
    h.assign("a", &[h.k(2)])[0].expect("leased");
    drain(&mut h, "a");
    assert_eq!(deregister(&mut h, "a"), Response::Worker { found: true });
    assert!(!h.model.workers().contains_key("a"));
    assert!(h.model.holders(&artifact(1)).is_empty());
    assert_eq!(h.exec(2).attempts, 0, "handed back, not lost");
    assert_eq!(h.pick("b"), vec![h.k(2)]);
    assert_eq!(deregister(&mut h, "a"), Response::Worker { found: false });
}

#[test]
fn registering_again_ends_a_drain() {
    let mut h = Harness::new();
    drain(&mut h, "a");
    assert!(h.model.workers()["a"].draining);
    h.apply(Command::RegisterWorker {
        worker_id: "a".into(),
        addr: "a:1".into(),
        slots: 2,
        ahead: 0,
        held: Vec::new(),
        properties: vec![("pool".into(), "a".into())],
        now_ms: h.now_ms,
    });
    assert!(!h.model.workers()["a"].draining);
}
