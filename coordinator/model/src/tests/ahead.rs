//! Leases held ahead: a worker may hold `ahead` leases beyond its slots,
//! but only while no other live worker has a free slot, and a job's time
//! waiting on its worker for a slot is not part of its learned duration.

use super::*;
use crate::durations::duration_key;

/// Registers `worker` with `slots` slots and `ahead` leases ahead.
fn register(h: &mut Harness, worker: &str, slots: u32, ahead: u32) {
    h.apply(Command::RegisterWorker {
        worker_id: worker.into(),
        addr: format!("{worker}:1"),
        slots,
        ahead,
        held: Vec::new(),
        properties: Vec::new(),
        now_ms: h.now_ms,
    });
}

#[test]
fn a_worker_holds_jobs_ahead_only_while_no_other_worker_has_a_free_slot() {
    let mut h = Harness::new();
    register(&mut h, "a", 2, 1);
    let jobs: Vec<(u8, &[u32])> = (1..=8).map(|n| (n, &[][..])).collect();
    h.submit("build", graph(&jobs));

    // b (two slots) is free: a gets its two slots and nothing ahead.
    assert_eq!(h.pick("a").len(), 2);
    let picks = h.pick("a");
    let tokens = h.assign("a", &picks);
    assert!(tokens.iter().all(Option::is_some));
    assert!(h.pick("a").is_empty(), "b has free slots: nothing ahead");

    // b's slots taken: a may now take one lease ahead, not two.
    let picks = h.pick("b");
    assert_eq!(picks.len(), 2);
    h.assign("b", &picks);
    let ahead = h.pick("a");
    assert_eq!(ahead.len(), 1, "one lease ahead of a's two slots");
    assert!(h.assign("a", &ahead)[0].is_some());
    assert!(h.pick("a").is_empty());
    let beyond = h
        .model
        .pick_for("b", 4, h.now_ms, 50, LEASE_MS, &BTreeSet::new());
    assert!(
        beyond.is_empty(),
        "b takes nothing ahead: it registered none"
    );
    let refused = h.assign("a", &[h.k(8)]);
    assert_eq!(refused, vec![None], "beyond slots and ahead");

    // The busy-slot gauge counts what runs, not what waits ahead.
    assert_eq!(h.model.gauges().busy_slots, 4);

    // A report frees a slot of a: the slot's next job comes with it.
    let token = tokens[0].expect("leased");
    let first = h.model.executions.iter().find_map(|(k, e)| {
        matches!(&e.state, ExecState::Running { token: t, .. } if *t == token).then_some(*k)
    });
    let first = first.expect("running");
    let after = h
        .model
        .pick_after_report("a", token, h.now_ms, 50, LEASE_MS, &BTreeSet::new());
    assert_eq!(after.len(), 1);
    assert!(h.report("a", token, first, success(1)));
}

#[test]
fn a_job_held_ahead_learns_its_duration_without_its_wait() {
    let mut h = Harness::new();
    let b = h.submit("build", graph(&[(1, &[])]));
    let token = h.assign("a", &[h.k(1)])[0].expect("leased");
    h.now_ms += 1_500;
    // Leased 1,500 ms ago; it waited 1,200 of them for a slot.
    let k = h.k(1);
    let accepted = h.apply(Command::Report {
        worker_id: "a".into(),
        token,
        cache_key: k,
        outcome: success(1),
        max_attempts: 3,
        queued_ms: 1_200,
        now_ms: h.now_ms,
    });
    assert_eq!(accepted, Response::Reported { accepted: true });
    let kind = duration_key(&h.model.build(b).expect("kept").jobs[0].spec).expect("named");
    assert_eq!(h.model.durations[&kind].expected_ms, 300);
}
