//! The scheduling order: the longest expected path first, expected
//! durations learned from earlier runs, slots shared across builds.

use super::*;
use crate::durations::{DEFAULT_EXPECTED_MS, MAX_DURATIONS, duration_key};

/// Job `n` named `name` (what its expected duration is learned by).
fn named(n: u8, name: &str, deps: &[u32]) -> SubmittedJob {
    let mut job = job(n, deps);
    job.spec.name = name.into();
    job
}

/// The positions in `build`'s job list of the executions `keys` run.
fn positions(h: &Harness, keys: &[Digest]) -> Vec<u32> {
    keys.iter().map(|k| h.exec_of(*k).rank.order).collect()
}

#[test]
fn the_longest_path_to_the_end_goes_first_ties_in_graph_order() {
    let mut h = Harness::new();
    // Jobs 0 and 1 end the build; job 2 heads a chain of three (2, 3, 4);
    // job 5 heads a chain of two.
    let shape: &[(u8, &[u32])] = &[
        (1, &[]),
        (2, &[]),
        (3, &[]),
        (4, &[2]),
        (5, &[3]),
        (6, &[]),
        (7, &[5]),
    ];
    h.submit("r1", graph(shape));
    let jobs = &h.model.build(h.index).expect("built").jobs;
    let paths: Vec<u64> = jobs.iter().map(|j| j.path_ms).collect();
    let d = DEFAULT_EXPECTED_MS;
    assert_eq!(paths, vec![d, d, 3 * d, 2 * d, d, 2 * d, d]);
    // Worker "a" has two slots: the chain of three, then the chain of two.
    assert_eq!(h.pick("a"), vec![h.k(3), h.k(6)]);
    // With one slot at a time, the rest in order: longest path, then the
    // graph's order among equals.
    let mut order = Vec::new();
    loop {
        let picked = h
            .model
            .pick_for("a", 1, h.now_ms, 50, LEASE_MS, &BTreeSet::new());
        let Some(&k) = picked.first() else { break };
        let token = h.assign("a", &[k])[0].expect("assigned");
        order.push(k);
        assert!(h.report("a", token, k, success(1)));
    }
    // 3 then its dependent 4 (path 2d) ties with 6 and comes before it by
    // order; 6's dependent 7 ties with 1, 2 and 5 and comes after them.
    assert_eq!(
        order,
        vec![h.k(3), h.k(4), h.k(6), h.k(1), h.k(2), h.k(5), h.k(7)]
    );
}

#[test]
fn expected_durations_come_from_earlier_runs_of_the_same_name() {
    let mut h = Harness::new();
    let first = vec![named(1, "cc quick.c", &[]), named(2, "cc slow.c", &[])];
    let b1 = h.submit("r1", first);
    // Unknown durations tie: the graph's order.
    assert_eq!(h.pick("a"), vec![h.k(1), h.k(2)]);
    let tokens = h.assign("a", &[h.k(1), h.k(2)]);
    h.now_ms += 20;
    assert!(h.report("a", tokens[0].unwrap(), h.k(1), success(1)));
    h.now_ms += 4_980;
    assert!(h.report("a", tokens[1].unwrap(), h.k(2), success(2)));
    let quick = duration_key(&h.model.build(b1).unwrap().jobs[0].spec).unwrap();
    assert_eq!(h.model.durations[&quick].expected_ms, 20);

    // The same names with new commands (new cache keys): the slow one
    // goes first now, though it comes second in the graph.
    let b2 = h.submit(
        "r2",
        vec![named(3, "cc quick.c", &[]), named(4, "cc slow.c", &[])],
    );
    let jobs = &h.model.build(b2).expect("built").jobs;
    assert_eq!(
        jobs.iter().map(|j| j.path_ms).collect::<Vec<_>>(),
        vec![20, 5_000]
    );
    assert_eq!(
        h.model
            .pick_for("a", 1, h.now_ms, 50, LEASE_MS, &BTreeSet::new()),
        vec![h.k(4)]
    );

    // A later run moves the expectation a quarter of the way.
    let token = h.assign("a", &[h.k(4)])[0].unwrap();
    h.now_ms += 1_000;
    assert!(h.report("a", token, h.k(4), success(4)));
    let slow = duration_key(&h.model.build(b1).unwrap().jobs[1].spec).unwrap();
    assert_eq!(
        h.model.durations[&slow].expected_ms,
        (3 * 5_000 + 1_000) / 4
    );
}

#[test]
fn a_job_the_cache_answers_adds_nothing_to_the_paths_through_it() {
    let mut h = Harness::new();
    let shape: &[(u8, &[u32])] = &[(1, &[]), (2, &[0]), (3, &[])];
    h.submit("r1", graph(&shape[..1]));
    assert!(h.run_one("a", h.k(1), success(1)));
    h.submit("r2", graph(shape));
    let jobs = &h.model.build(h.index).expect("built").jobs;
    let d = DEFAULT_EXPECTED_MS;
    assert_eq!(
        jobs.iter().map(|j| j.path_ms).collect::<Vec<_>>(),
        vec![d, d, d]
    );
}

#[test]
fn a_small_build_gets_its_share_of_slots_beside_a_big_one_queued_first() {
    let mut h = Harness::new();
    let big: Vec<(u8, &[u32])> = (1..=20).map(|n| (n, &[][..])).collect();
    let big_build = h.submit("big", graph(&big));
    let small: &[(u8, &[u32])] = &[(101, &[]), (102, &[])];
    let small_build = h.submit("small", graph(small));
    // Two workers of two slots: each build gets two.
    let picked = h.pick("a");
    assert_eq!(picked, vec![h.k(1), h.k(101)]);
    h.assign("a", &picked);
    let picked = h.pick("b");
    assert_eq!(picked, vec![h.k(2), h.k(102)]);
    h.assign("b", &picked);
    assert_eq!(h.model.running_by_build[&big_build], 2);
    assert_eq!(h.model.running_by_build[&small_build], 2);
    assert_eq!(positions(&h, &[h.k(1), h.k(2)]), vec![0, 1]);
}

#[test]
fn a_build_with_fewer_leases_gets_the_next_slot() {
    let mut h = Harness::new();
    let first: Vec<(u8, &[u32])> = (1..=6).map(|n| (n, &[][..])).collect();
    h.submit("first", graph(&first));
    // The first build holds three of four slots before the second comes.
    let taken = h
        .model
        .pick_for("a", 2, h.now_ms, 50, LEASE_MS, &BTreeSet::new());
    h.assign("a", &taken);
    let taken = h
        .model
        .pick_for("b", 1, h.now_ms, 50, LEASE_MS, &BTreeSet::new());
    h.assign("b", &taken);
    let second: Vec<(u8, &[u32])> = (11..=16).map(|n| (n, &[][..])).collect();
    h.submit("second", graph(&second));
    assert_eq!(h.pick("b"), vec![h.k(11)]);
}

/// Two picks at once (two slots reporting together) get different
/// executions: a pick passes over those picked for an assignment still
/// in flight, in its place in the order.
#[test]
fn a_pick_passes_over_executions_already_picked_in_flight() {
    let mut h = Harness::new();
    let jobs: Vec<(u8, &[u32])> = (1..=4).map(|n| (n, &[][..])).collect();
    h.submit("build", graph(&jobs));
    let first = h
        .model
        .pick_for("a", 1, h.now_ms, 50, LEASE_MS, &BTreeSet::new());
    assert_eq!(first, vec![h.k(1)]);
    let in_flight: BTreeSet<Digest> = first.iter().copied().collect();
    assert_eq!(
        h.model.pick_for("a", 2, h.now_ms, 50, LEASE_MS, &in_flight),
        vec![h.k(2), h.k(3)]
    );
    h.assign("a", &first);
    let running = h.model.executions[&h.k(1)].state.clone();
    assert!(matches!(running, ExecState::Running { .. }), "{running:?}");
}

#[test]
fn expected_durations_are_bounded_forgetting_the_least_recently_run() {
    let mut model = Model::default();
    for i in 0..=MAX_DURATIONS as u64 {
        model.clock_ms = 1_000 + i;
        let mut bytes = [0u8; 20];
        bytes[..8].copy_from_slice(&i.to_be_bytes());
        model.record_duration(Some(Digest::from_bytes(bytes)), 10);
    }
    assert_eq!(model.durations.len(), MAX_DURATIONS);
    assert!(!model.durations.contains_key(&Digest::from_bytes([0; 20])));
    model.check_invariants().expect("indexes in step");
}
