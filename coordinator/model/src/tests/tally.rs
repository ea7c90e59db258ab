//! The tally of each applied command: what the replica's metrics count.

use super::*;
use crate::{RunEnd, Tally};

#[test]
fn each_command_tallies_what_it_did_and_only_that() {
    let mut h = Harness::new();
    // Job 0 fails, job 1 (after 0) is skipped, job 2 succeeds.
    let b = h.submit("r1", graph(&[(1, &[]), (2, &[0]), (3, &[])]));
    assert_eq!(
        *h.model.tally(),
        Tally {
            cache_misses: 2,
            ..Tally::default()
        },
        "two jobs needed executions"
    );
    h.now_ms += 30;
    let tokens = h.assign("a", &[h.k(1), h.k(3)]);
    assert_eq!(h.model.tally().queue_waits_ms, vec![30, 30]);
    h.now_ms += 200;
    assert!(h.report("a", tokens[0].unwrap(), h.k(1), failure(2)));
    assert_eq!(
        *h.model.tally(),
        Tally {
            runs: vec![(RunEnd::Failure, 200)],
            jobs_failed: 1,
            jobs_skipped: 1,
            ..Tally::default()
        }
    );
    h.now_ms += 100;
    assert!(h.report("a", tokens[1].unwrap(), h.k(3), success(3)));
    assert_eq!(
        *h.model.tally(),
        Tally {
            runs: vec![(RunEnd::Success, 300)],
            jobs_succeeded: 1,
            builds_failed: 1,
            ..Tally::default()
        },
        "build {b} finished with a failure"
    );

    // The same successful job again is a cache hit, and its build succeeds.
    h.submit("r2", graph(&[(3, &[])]));
    assert_eq!(
        *h.model.tally(),
        Tally {
            cache_hits: 1,
            builds_succeeded: 1,
            ..Tally::default()
        }
    );
}

#[test]
fn expiries_retries_and_rebuilds_are_tallied() {
    let mut h = Harness::new();
    h.submit("r", graph(&[(1, &[])]));
    h.assign("a", &[h.k(1)]);
    h.now_ms += LEASE_MS;
    h.expire(2, NO_DEATHS_MS);
    assert_eq!(
        *h.model.tally(),
        Tally {
            lease_expiries: 1,
            retries: 1,
            ..Tally::default()
        }
    );
    h.assign("b", &[h.k(1)]);
    h.now_ms += LEASE_MS;
    h.expire(2, NO_DEATHS_MS);
    assert_eq!(
        *h.model.tally(),
        Tally {
            lease_expiries: 1,
            jobs_failed: 1,
            builds_failed: 1,
            ..Tally::default()
        },
        "the second expiry gives up: no retry"
    );
}

#[test]
fn a_lost_input_is_tallied_as_a_run_ended_and_a_rebuild() {
    let mut h = Harness::new();
    h.submit("r", graph(&[(1, &[]), (2, &[0])]));
    assert!(h.run_one("a", h.k(1), success(1)));
    // Worker a dies; its copy of job 0's output is forgotten.
    h.apply(Command::Heartbeat {
        worker_id: "b".into(),
        tokens: Vec::new(),
        added: Vec::new(),
        dropped: Vec::new(),
        lease_timeout_ms: LEASE_MS,
        now_ms: h.now_ms + 10_000,
    });
    h.now_ms += 10_000;
    h.expire(3, 5_000);
    // Job 1 is leased: its input must be rebuilt first.
    let tokens = h.assign("b", &[h.k(2)]);
    assert_eq!(tokens, vec![None]);
    assert_eq!(h.model.tally().lost_input_rebuilds, 1);
}
