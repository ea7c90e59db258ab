//! The worker through coordinator failovers, against in-process fakes: lost
//! answers are retried with the same request ID, heartbeats that fail for a
//! while neither stop jobs nor stop for good, a coordinator that swallows
//! packets does not hang the worker, and dependencies that no holder can
//! serve are reported as lost.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use distbuild_proto::Digest;
use distbuild_proto::v1;
use distbuild_proto::wire::digest_to_wire;
use distbuild_worker::cache::Cache;
use support::{
    DEP, FakeCoordinator, RunningWorker, WAIT, assignment, dies_soon, make_artifact, pid_alive,
    serve, serve_peer, sh, wait_for_file,
};
use tokio_util::sync::CancellationToken;

/// The request IDs the coordinators accept: 1 to 128 characters.
fn assert_valid_request_id(id: &str) {
    assert!(!id.is_empty() && id.len() <= 128, "request ID {id:?}");
}

#[tokio::test]
async fn a_poll_whose_answer_was_lost_is_sent_again_with_its_request_id() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let coordinator = serve(FakeCoordinator::default()).await;
    coordinator.fake.with(|s| {
        // The first poll leases job 5, then its answer is lost. Only a
        // retry under the same ID learns of that lease; a fresh poll would
        // lease job 6 and leave 5 to expire unrun.
        s.lose_poll_answers = 1;
        s.queue.push_back(assignment(5, vec![sh("echo five")]));
        s.queue.push_back(assignment(6, vec![sh("echo six")]));
    });
    let worker =
        RunningWorker::start(vec![coordinator.addr.to_string()], &dir.path().join("w"), 1).await;
    coordinator
        .fake
        .wait_until("both reports", WAIT, |s| s.reports.len() == 2)
        .await;
    // A poll after the one that leased job 6 (answered: a fresh ID).
    coordinator
        .fake
        .wait_until("a poll after the second job", WAIT, |s| s.polls.len() >= 4)
        .await;
    let (polls, reports) = coordinator
        .fake
        .with(|s| (s.polls.clone(), s.reports.clone()));
    let tokens: Vec<u64> = reports.iter().map(|r| r.lease_token).collect();
    assert_eq!(tokens, [5, 6], "each leased job ran once");
    assert_eq!(reports[0].stdout, "five\n");

    for poll in &polls {
        assert_valid_request_id(&poll.request_id);
    }
    assert_eq!(
        polls[1].request_id, polls[0].request_id,
        "the poll whose answer was lost is sent again under its ID"
    );
    assert_eq!(polls[1].free_slots, polls[0].free_slots);
    let answered: Vec<&str> = polls[1..].iter().map(|p| p.request_id.as_str()).collect();
    let distinct: HashSet<&str> = answered.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        answered.len(),
        "after an answer every poll has a fresh ID: {answered:?}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_report_refused_unavailable_is_retried_with_its_request_id_across_coordinators() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let first = serve(FakeCoordinator::default()).await;
    let second = serve(FakeCoordinator::default()).await;
    // Each node refuses the report once as if no leader were known; the
    // worker moves from one to the other and back.
    first.fake.with(|s| {
        s.refuse_reports = 1;
        s.queue.push_back(assignment(3, vec![sh("echo three")]));
    });
    second.fake.with(|s| s.refuse_reports = 1);
    let worker = RunningWorker::start(
        vec![first.addr.to_string(), second.addr.to_string()],
        &dir.path().join("w"),
        1,
    )
    .await;
    let accepted = tokio::time::timeout(WAIT, async {
        loop {
            for node in [&first, &second] {
                if let Some(report) = node.fake.with(|s| s.reports.first().cloned()) {
                    return report;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the report is accepted somewhere");
    assert_eq!(accepted.lease_token, 3);
    assert_eq!(accepted.stdout, "three\n");
    assert_valid_request_id(&accepted.request_id);
    let attempts: Vec<v1::ReportResultRequest> = [&first, &second]
        .iter()
        .flat_map(|node| node.fake.with(|s| s.report_attempts.clone()))
        .collect();
    assert_eq!(attempts.len(), 3, "refused twice, then accepted");
    for attempt in &attempts {
        assert_eq!(
            attempt.request_id, accepted.request_id,
            "every attempt of one report carries its ID"
        );
    }

    // The next report is another call, with another ID.
    for node in [&first, &second] {
        node.fake
            .with(|s| s.queue.push_back(assignment(4, vec![sh("true")])));
    }
    let next = tokio::time::timeout(WAIT, async {
        loop {
            for node in [&first, &second] {
                let found = node
                    .fake
                    .with(|s| s.reports.iter().find(|r| r.lease_token == 4).cloned());
                if let Some(report) = found {
                    return report;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the second job is reported");
    assert_valid_request_id(&next.request_id);
    assert_ne!(next.request_id, accepted.request_id);
    worker.stop().await;
}

#[tokio::test]
async fn a_dependency_no_holder_can_serve_is_reported_as_lost() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let stop_peers = CancellationToken::new();
    // A live holder of the artifact that is not lost.
    let good_cache = Cache::open(&dir.path().join("good"), 1 << 30).expect("cache");
    let (kept, kept_size) = make_artifact(&good_cache, dir.path(), &[("kept.txt", "kept\n")]);
    let good_peer = serve_peer(good_cache, stop_peers.clone()).await;
    // A live peer that has evicted the lost artifact (answers NOT_FOUND).
    let empty_cache = Cache::open(&dir.path().join("empty"), 1 << 30).expect("cache");
    let empty_peer = serve_peer(empty_cache, stop_peers.clone()).await;
    let lost = Digest::of(b"an artifact nobody has any more");
    const OTHER_DEP: &str = "3333333333333333333333333333333333333333";

    let coordinator = serve(FakeCoordinator::default()).await;
    coordinator.fake.with(|s| {
        let mut job = assignment(11, vec![sh("echo must not run")]);
        job.deps = vec![
            v1::DepArtifact {
                job_id: DEP.into(),
                digest: digest_to_wire(&lost),
                size: 100,
                // A dead worker (connection refused) and one that dropped it.
                holders: vec!["127.0.0.1:1".into(), empty_peer.clone()],
            },
            v1::DepArtifact {
                job_id: OTHER_DEP.into(),
                digest: digest_to_wire(&kept),
                size: kept_size,
                holders: vec![good_peer.clone()],
            },
        ];
        s.queue.push_back(job);
    });
    let worker =
        RunningWorker::start(vec![coordinator.addr.to_string()], &dir.path().join("w"), 1).await;
    coordinator
        .fake
        .wait_until("a report", WAIT, |s| !s.reports.is_empty())
        .await;
    let report = coordinator.fake.with(|s| s.reports[0].clone());
    assert_eq!(report.lease_token, 11);
    assert_eq!(report.exit_code, -1);
    assert_eq!(
        report.lost_inputs,
        vec![v1::LostInput {
            digest: digest_to_wire(&lost),
            tried_holders: vec!["127.0.0.1:1".into(), empty_peer.clone()],
        }],
        "exactly the artifact no holder could serve, with the holders tried"
    );
    assert!(
        report.error.contains(&lost.to_string()) && report.error.contains("lost"),
        "the error names the artifact: {}",
        report.error
    );
    assert!(
        report.error.contains("127.0.0.1:1") && report.error.contains(&empty_peer),
        "and why each holder failed: {}",
        report.error
    );
    assert!(!report.error.contains('\n'), "one line: {}", report.error);
    assert!(report.stdout.is_empty(), "the job did not run");
    assert!(report.artifact_digest.is_empty());
    // The dependency that could be fetched is announced as held.
    coordinator
        .fake
        .wait_until("the fetched dependency in a heartbeat", WAIT, |s| {
            s.heartbeats
                .iter()
                .any(|h| h.added_artifacts.contains(&digest_to_wire(&kept)))
        })
        .await;
    worker.stop().await;
    stop_peers.cancel();
}

#[tokio::test]
async fn failing_heartbeats_are_retried_under_their_id_and_do_not_stop_jobs() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let pid_file = dir.path().join("pid");
    let go_file = dir.path().join("go");
    let coordinator = serve(FakeCoordinator::default()).await;
    coordinator.fake.with(|s| {
        s.queue.push_back(assignment(
            7,
            vec![sh(&format!(
                "echo $$ > {}; while [ ! -e {} ]; do sleep 0.02; done; echo finished",
                pid_file.display(),
                go_file.display()
            ))],
        ));
    });
    let worker =
        RunningWorker::start(vec![coordinator.addr.to_string()], &dir.path().join("w"), 1).await;
    wait_for_file(&pid_file).await;
    coordinator
        .fake
        .wait_until("the lease renewed", WAIT, |s| {
            s.heartbeats.iter().any(|h| h.lease_tokens == [7])
        })
        .await;

    // An election: no leader, for longer than the fake's lease period
    // (1 s). Retries back off 50 ms, 100 ms, ... so six take over 1.5 s.
    coordinator.fake.with(|s| s.refuse_heartbeats = true);
    coordinator
        .fake
        .wait_until("heartbeats refused for a while", WAIT, |s| {
            s.refused_heartbeats.len() >= 6
        })
        .await;
    assert!(pid_alive(&pid_file), "failing heartbeats do not stop a job");
    let answered_before = coordinator.fake.with(|s| {
        s.refuse_heartbeats = false;
        s.heartbeats.len()
    });
    coordinator
        .fake
        .wait_until("renewals again", WAIT, |s| {
            s.heartbeats.len() >= answered_before + 2
        })
        .await;
    let (refused, renewed) = coordinator.fake.with(|s| {
        (
            s.refused_heartbeats.clone(),
            s.heartbeats[answered_before..].to_vec(),
        )
    });
    for heartbeat in &refused {
        assert_eq!(heartbeat.lease_tokens, [7]);
        assert_valid_request_id(&heartbeat.request_id);
    }
    assert_eq!(
        refused[1].request_id, refused[0].request_id,
        "a refused heartbeat is retried under its ID"
    );
    assert_eq!(
        renewed[0].request_id,
        refused.last().expect("refused").request_id,
        "the retried heartbeat is the one answered once a leader is back"
    );
    assert_ne!(renewed[1].request_id, renewed[0].request_id);
    assert_eq!(renewed[1].lease_tokens, [7], "the lease is renewed again");
    assert!(pid_alive(&pid_file));

    std::fs::write(&go_file, "").expect("write the go file");
    coordinator
        .fake
        .wait_until("the report", WAIT, |s| !s.reports.is_empty())
        .await;
    let report = coordinator.fake.with(|s| s.reports[0].clone());
    assert_eq!(report.exit_code, 0, "{}", report.error);
    assert_eq!(report.stdout, "finished\n");
    worker.stop().await;
}

#[tokio::test]
async fn told_to_register_again_by_a_heartbeat_it_does_and_keeps_working() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let pid_file = dir.path().join("pid");
    let coordinator = serve(FakeCoordinator::default()).await;
    coordinator.fake.with(|s| {
        s.queue.push_back(assignment(
            21,
            vec![sh(&format!("echo $$ > {}; sleep 30", pid_file.display()))],
        ));
    });
    // No lease ahead: job 22 is leased only after the registration (one
    // held ahead while job 21 runs would be dropped with it).
    let worker = RunningWorker::start_with_ahead(
        vec![coordinator.addr.to_string()],
        &dir.path().join("w"),
        1,
        0,
    )
    .await;
    wait_for_file(&pid_file).await;
    // A new leader that does not know the worker: its leases are gone.
    coordinator.fake.with(|s| {
        s.reregister_next_heartbeat = true;
        s.queue.push_back(assignment(22, vec![sh("echo after")]));
    });
    coordinator
        .fake
        .wait_until("the next job's report", WAIT, |s| !s.reports.is_empty())
        .await;
    let (registrations, reports) = coordinator
        .fake
        .with(|s| (s.registrations.clone(), s.reports.clone()));
    assert_eq!(registrations.len(), 2, "registered again, once");
    assert_eq!(registrations[0].worker_id, registrations[1].worker_id);
    assert_ne!(
        registrations[0].request_id, registrations[1].request_id,
        "a new registration is a new call"
    );
    assert_eq!(reports.len(), 1, "the dropped lease's job is not reported");
    assert_eq!(reports[0].lease_token, 22);
    assert!(
        dies_soon(&pid_file).await,
        "the job whose lease was dropped is stopped"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_coordinator_that_swallows_packets_does_not_hang_the_worker() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    // Accepts connections (the kernel's backlog) but never answers: like a
    // node partitioned away whose packets are dropped.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let black_hole_addr = black_hole.local_addr().expect("addr").to_string();
    let coordinator = serve(FakeCoordinator::default()).await;
    coordinator
        .fake
        .with(|s| s.queue.push_back(assignment(31, vec![sh("echo through")])));
    let started = tokio::time::Instant::now();
    let worker = RunningWorker::start(
        vec![black_hole_addr, coordinator.addr.to_string()],
        &dir.path().join("w"),
        1,
    )
    .await;
    coordinator
        .fake
        .wait_until("a registration", WAIT, |s| !s.registrations.is_empty())
        .await;
    // Keepalive (1 s + 2 s) or the connect timeout gives up on the black
    // hole well before the 10 s deadline of a registration would.
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(8),
        "moved on to the next coordinator after {elapsed:?}"
    );
    coordinator
        .fake
        .wait_until("the report", WAIT, |s| !s.reports.is_empty())
        .await;
    assert_eq!(
        coordinator.fake.with(|s| s.reports[0].stdout.clone()),
        "through\n"
    );
    worker.stop().await;
    drop(black_hole);
}
