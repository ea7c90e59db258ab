//! The worker runtime against an in-process fake coordinator: registration,
//! polling, running jobs with inputs and dependencies, reporting, leases
//! revoked by heartbeat, leader redirects, restart and shutdown.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use distbuild_proto::v1::{self, FetchRequest};
use distbuild_proto::wire::digest_to_wire;
use distbuild_proto::{Digest, artifact};
use distbuild_worker::cache::Cache;
use distbuild_worker::connect::{Connector, TcpConnector, peer_api_client};
use support::{
    DEP, FakeCoordinator, RunningWorker, WAIT, assignment, dies_soon, input, make_artifact,
    pid_alive, serve, serve_peer, sh, wait_for_file,
};
use tokio_util::sync::CancellationToken;

/// Downloads an artifact from a worker's peer server.
async fn download(addr: &str, digest: &Digest) -> Result<Vec<u8>, tonic::Status> {
    let channel = TcpConnector::default()
        .connect(addr)
        .await
        .expect("connect to the peer");
    let mut stream = peer_api_client(channel)
        .fetch_artifact(FetchRequest {
            digest: digest_to_wire(digest),
        })
        .await?
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.message().await? {
        data.extend_from_slice(&chunk.data);
    }
    Ok(data)
}

fn read_tree(artifact_bytes: &[u8], dest: &Path) -> Vec<(String, String)> {
    artifact::unpack(artifact_bytes, dest, 1 << 20).expect("unpack");
    let mut files: Vec<(String, String)> = std::fs::read_dir(dest)
        .expect("list")
        .map(|e| {
            let path = e.expect("entry").path();
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read_to_string(&path).expect("read"))
        })
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn runs_a_job_with_inputs_and_a_dependency_then_restarts_with_its_cache() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let stop_peer = CancellationToken::new();
    let peer_cache = Cache::open(&dir.path().join("peer"), 1 << 30).expect("peer cache");
    let (dep_digest, dep_size) = make_artifact(&peer_cache, dir.path(), &[("lib.txt", "lib\n")]);
    let peer_addr = serve_peer(peer_cache, stop_peer.clone()).await;

    let coordinator = serve(FakeCoordinator::default()).await;
    let source = b"hello\n";
    coordinator.fake.with(|s| {
        s.blobs.insert(Digest::of(source), source.to_vec());
        let mut job = assignment(
            41,
            vec![sh(&format!(
                "cat {{{{.SourceDir}}}}/dir/a.txt {{{{index .Deps \"{DEP}\"}}}}/lib.txt > {{{{.OutputDir}}}}/all.txt; echo done"
            ))],
        );
        job.inputs = vec![input("dir/a.txt", source)];
        job.deps = vec![v1::DepArtifact {
            job_id: DEP.into(),
            digest: digest_to_wire(&dep_digest),
            size: dep_size,
            // The first holder is gone: the worker must try the next.
            holders: vec!["127.0.0.1:1".into(), peer_addr.clone()],
        }];
        s.queue.push_back(job);
    });
    let cache_dir = dir.path().join("worker");
    let worker = RunningWorker::start(vec![coordinator.addr.to_string()], &cache_dir, 2).await;
    coordinator
        .fake
        .wait_until("a report", WAIT, |s| !s.reports.is_empty())
        .await;
    let report = coordinator.fake.with(|s| s.reports[0].clone());
    assert_eq!(report.error, "");
    assert_eq!(report.exit_code, 0);
    assert_eq!(report.lease_token, 41);
    assert_eq!(report.stdout, Bytes::from_static(b"done\n"));
    assert_eq!(report.cache_key, digest_to_wire(&Digest::of(b"key 41")));
    let artifact_digest = Digest::try_from(&report.artifact_digest[..]).expect("a digest");

    let registration = coordinator.fake.with(|s| s.registrations[0].clone());
    assert_eq!(registration.addr, worker.addr);
    assert_eq!(registration.slots, 2);
    assert_eq!(registration.worker_id.len(), 16);
    assert!(registration.held_artifacts.is_empty());
    coordinator
        .fake
        .wait_until("the fetched artifact in a heartbeat", WAIT, |s| {
            s.heartbeats
                .iter()
                .any(|h| h.added_artifacts.contains(&digest_to_wire(&dep_digest)))
        })
        .await;
    // Only the slots' directories are left, each with its spare: the
    // last job's directory, emptied.
    for slot in std::fs::read_dir(cache_dir.join("sandbox")).expect("list") {
        let slot = slot.expect("entry").path();
        assert!(
            slot.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("slot-")),
            "left behind: {}",
            slot.display()
        );
        for entry in std::fs::read_dir(&slot).expect("list") {
            let entry = entry.expect("entry").path();
            assert!(
                entry.ends_with(".spare"),
                "left behind: {}",
                entry.display()
            );
            for dir in std::fs::read_dir(&entry).expect("list") {
                let dir = dir.expect("entry").path();
                assert!(
                    std::fs::read_dir(&dir)
                        .expect("a directory")
                        .next()
                        .is_none(),
                    "not emptied: {}",
                    dir.display()
                );
            }
        }
    }

    // The worker serves what it built, and refuses what it lacks.
    let bytes = download(&worker.addr, &artifact_digest)
        .await
        .expect("download");
    assert_eq!(Digest::of(&bytes), artifact_digest);
    assert_eq!(
        read_tree(&bytes, &dir.path().join("unpacked")),
        vec![("all.txt".to_string(), "hello\nlib\n".to_string())]
    );
    let missing = download(&worker.addr, &Digest::of(b"nothing")).await;
    assert_eq!(missing.expect_err("absent").code(), tonic::Code::NotFound);
    let channel = TcpConnector::default()
        .connect(&worker.addr)
        .await
        .expect("connect");
    let bad = peer_api_client(channel)
        .fetch_artifact(FetchRequest {
            digest: Bytes::from_static(b"short"),
        })
        .await;
    assert_eq!(
        bad.expect_err("bad digest").code(),
        tonic::Code::InvalidArgument
    );

    worker.stop().await;
    stop_peer.cancel();

    // Restarted on the same cache: same ID, and it announces what it holds.
    let worker = RunningWorker::start(vec![coordinator.addr.to_string()], &cache_dir, 2).await;
    coordinator
        .fake
        .wait_until("a second registration", WAIT, |s| {
            s.registrations.len() == 2
        })
        .await;
    let again = coordinator.fake.with(|s| s.registrations[1].clone());
    assert_eq!(again.worker_id, registration.worker_id);
    for digest in [artifact_digest, dep_digest, Digest::of(source)] {
        assert!(
            again.held_artifacts.contains(&digest_to_wire(&digest)),
            "{digest} is announced"
        );
    }
    worker.stop().await;
}

#[tokio::test]
async fn a_failed_input_fetch_is_reported_as_not_run() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let coordinator = serve(FakeCoordinator::default()).await;
    coordinator.fake.with(|s| {
        // Served with the wrong content for its digest.
        s.blobs.insert(Digest::of(b"right"), b"wrong".to_vec());
        let mut bad_content = assignment(1, vec![sh("true")]);
        bad_content.inputs = vec![input("x.c", b"right")];
        let mut absent = assignment(2, vec![sh("true")]);
        absent.inputs = vec![input("y.c", b"nobody has this")];
        s.queue.extend([bad_content, absent]);
    });
    let worker =
        RunningWorker::start(vec![coordinator.addr.to_string()], &dir.path().join("w"), 2).await;
    coordinator
        .fake
        .wait_until("two reports", WAIT, |s| s.reports.len() == 2)
        .await;
    let mut reports = coordinator.fake.with(|s| s.reports.clone());
    reports.sort_by_key(|r| r.lease_token);
    for (report, (path, problem)) in reports.iter().zip([
        ("x.c", "does not match its digest"),
        ("y.c", "no such blob"),
    ]) {
        assert_eq!(report.exit_code, -1);
        assert!(
            report.error.contains(&format!("input {path:?}")),
            "{}",
            report.error
        );
        assert!(report.error.contains(problem), "{}", report.error);
        assert!(report.artifact_digest.is_empty());
    }
    worker.stop().await;
}

#[tokio::test]
async fn a_revoked_job_is_killed_and_not_reported_and_frees_its_slot() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let pid_file = dir.path().join("pid");
    let coordinator = serve(FakeCoordinator::default()).await;
    coordinator.fake.with(|s| {
        s.queue.push_back(assignment(
            7,
            vec![sh(&format!("echo $$ > {}; sleep 30", pid_file.display()))],
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
    assert!(pid_alive(&pid_file));
    coordinator.fake.with(|s| {
        s.revoke.insert(7);
        s.queue.push_back(assignment(8, vec![sh("echo next")]));
    });
    // One slot: the next job runs only once the revoked one is gone.
    coordinator
        .fake
        .wait_until("the next job's report", WAIT, |s| !s.reports.is_empty())
        .await;
    assert!(
        dies_soon(&pid_file).await,
        "the revoked job's process is killed"
    );
    let reports = coordinator.fake.with(|s| s.reports.clone());
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].lease_token, 8);
    worker.stop().await;
}

/// A heartbeat answered while a report is on its way revokes the reported
/// lease (the coordinators took the result, so the lease is no longer
/// current). The report must still be answered: its answer leases the
/// slot's next job, which would otherwise wait out its lease unseen.
#[tokio::test]
async fn a_lease_revoked_while_its_result_is_reported_keeps_the_report_and_its_next_job() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let coordinator = serve(FakeCoordinator::default()).await;
    coordinator.fake.with(|s| {
        s.queue.push_back(assignment(7, vec![sh("echo first")]));
        s.next_for_report
            .push_back(assignment(8, vec![sh("echo next")]));
        s.revoke_reported = true;
        // Several heartbeats (every 100 ms) come and go meanwhile.
        s.report_answer_delay = Some(Duration::from_millis(600));
    });
    let worker =
        RunningWorker::start(vec![coordinator.addr.to_string()], &dir.path().join("w"), 1).await;
    coordinator
        .fake
        .wait_until("the first report", WAIT, |s| !s.reports.is_empty())
        .await;
    coordinator
        .fake
        .wait_until("a heartbeat listing the reported lease", WAIT, |s| {
            s.reports.len() > 1 || s.heartbeats.iter().any(|h| h.lease_tokens.contains(&7))
        })
        .await;
    coordinator
        .fake
        .wait_until("the next job's report", WAIT, |s| {
            s.reports.iter().any(|r| r.lease_token == 8)
        })
        .await;
    worker.stop().await;
}

/// With one slot and one lease ahead, the worker takes two jobs in one
/// poll, runs them one after the other, and reports how long the second
/// waited for the slot (not part of its run).
#[tokio::test]
async fn a_job_held_ahead_waits_for_the_slot_and_reports_its_wait() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let coordinator = serve(FakeCoordinator::default()).await;
    coordinator.fake.with(|s| {
        s.queue
            .push_back(assignment(7, vec![sh("sleep 0.5; echo first")]));
        s.queue.push_back(assignment(8, vec![sh("echo second")]));
    });
    let worker = RunningWorker::start_with_ahead(
        vec![coordinator.addr.to_string()],
        &dir.path().join("w"),
        1,
        1,
    )
    .await;
    coordinator
        .fake
        .wait_until("both reports", WAIT, |s| s.reports.len() == 2)
        .await;
    let (registration, first_poll, reports) = coordinator.fake.with(|s| {
        (
            s.registrations[0].clone(),
            s.polls[0].clone(),
            s.reports.clone(),
        )
    });
    assert_eq!((registration.slots, registration.ahead), (1, 1));
    assert_eq!(first_poll.free_slots, 2, "one slot and one lease ahead");
    assert_eq!(
        reports.iter().map(|r| r.lease_token).collect::<Vec<_>>(),
        [7, 8],
        "one at a time"
    );
    assert!(reports[0].queued_ms < 400, "{}", reports[0].queued_ms);
    assert!(
        reports[1].queued_ms >= 400,
        "the second waited for the first: {} ms",
        reports[1].queued_ms
    );
    worker.stop().await;
}

#[tokio::test]
async fn follows_the_leader_past_an_unreachable_address() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let leader = serve(FakeCoordinator::default()).await;
    let follower = serve(FakeCoordinator::default()).await;
    follower
        .fake
        .with(|s| s.leader = Some(leader.addr.to_string()));
    leader.fake.with(|s| {
        s.queue.push_back(assignment(3, vec![sh("echo hi")]));
        s.reregister_next_poll = true;
    });
    let worker = RunningWorker::start(
        vec!["127.0.0.1:1".into(), follower.addr.to_string()],
        &dir.path().join("w"),
        1,
    )
    .await;
    leader
        .fake
        .wait_until("a report at the leader", WAIT, |s| !s.reports.is_empty())
        .await;
    assert_eq!(leader.fake.with(|s| s.reports[0].stdout.clone()), "hi\n");
    // Told to register again by its first poll, it did.
    assert!(leader.fake.with(|s| s.registrations.len()) >= 2);
    assert!(
        follower
            .fake
            .with(|s| s.registrations.is_empty() && s.reports.is_empty())
    );
    worker.stop().await;
}

#[tokio::test]
async fn shutdown_kills_running_jobs_and_returns() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let pid_file: PathBuf = dir.path().join("pid");
    let coordinator = serve(FakeCoordinator::default()).await;
    coordinator.fake.with(|s| {
        s.queue.push_back(assignment(
            9,
            vec![sh(&format!(
                "sleep 30 & echo $! > {}; wait",
                pid_file.display()
            ))],
        ));
    });
    let worker =
        RunningWorker::start(vec![coordinator.addr.to_string()], &dir.path().join("w"), 1).await;
    wait_for_file(&pid_file).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(pid_alive(&pid_file));
    let started = tokio::time::Instant::now();
    worker.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(dies_soon(&pid_file).await, "the job's child is killed too");
    assert!(coordinator.fake.with(|s| s.reports.is_empty()));
}

#[tokio::test]
async fn one_worker_per_cache_directory() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let coordinator = serve(FakeCoordinator::default()).await;
    let cache_dir = dir.path().join("w");
    let first = RunningWorker::start(vec![coordinator.addr.to_string()], &cache_dir, 1).await;
    coordinator
        .fake
        .wait_until("registration", WAIT, |s| !s.registrations.is_empty())
        .await;
    let second = RunningWorker::start(vec![coordinator.addr.to_string()], &cache_dir, 1).await;
    let err = tokio::time::timeout(WAIT, second.handle)
        .await
        .expect("fails at once")
        .expect("no panic")
        .expect_err("the directory is taken");
    assert!(
        err.to_string().contains("in use by another worker"),
        "{err}"
    );
    first.stop().await;
}

#[tokio::test]
async fn a_drained_worker_polls_no_more_finishes_its_job_and_deregisters() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let gate = dir.path().join("gate");
    let coordinator = serve(FakeCoordinator::default()).await;
    coordinator.fake.with(|s| {
        s.queue.push_back(assignment(
            7,
            vec![sh(&format!(
                "while [ ! -e {} ]; do sleep 0.02; done; echo ok > {{{{.OutputDir}}}}/x",
                gate.display()
            ))],
        ));
    });
    let worker =
        RunningWorker::start(vec![coordinator.addr.to_string()], &dir.path().join("w"), 2).await;
    coordinator
        .fake
        .wait_until("the job leased", WAIT, |s| s.queue.is_empty())
        .await;
    worker.drain.cancel();
    coordinator
        .fake
        .wait_until("the drain told", WAIT, |s| !s.drained.is_empty())
        .await;
    let polls = coordinator.fake.with(|s| s.polls.len());
    // Its job still runs: it has not left.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(coordinator.fake.with(|s| s.deregistered.is_empty()));
    std::fs::write(&gate, "").expect("open the gate");
    coordinator
        .fake
        .wait_until("deregistered", WAIT, |s| !s.deregistered.is_empty())
        .await;
    tokio::time::timeout(WAIT, worker.handle)
        .await
        .expect("the worker stops by itself")
        .expect("no panic")
        .expect("the worker ran without error");
    coordinator.fake.with(|s| {
        assert_eq!(s.reports.len(), 1, "its job finished and reported");
        assert_eq!(s.reports[0].exit_code, 0);
        assert!(
            !s.reports[0].take_next,
            "a draining worker takes no next job"
        );
        assert!(s.polls.len() <= polls + 1, "at most the poll in flight");
        assert_eq!(s.deregistered.len(), 1);
    });
}

#[tokio::test]
async fn a_worker_drained_by_an_operator_leaves_on_its_heartbeat() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let coordinator = serve(FakeCoordinator::default()).await;
    let worker =
        RunningWorker::start(vec![coordinator.addr.to_string()], &dir.path().join("w"), 1).await;
    coordinator
        .fake
        .wait_until("registered", WAIT, |s| !s.heartbeats.is_empty())
        .await;
    let id = coordinator.fake.with(|s| {
        let id = s.heartbeats[0].worker_id.clone();
        s.drained.push(id.clone());
        id
    });
    tokio::time::timeout(WAIT, worker.handle)
        .await
        .expect("the worker stops by itself")
        .expect("no panic")
        .expect("the worker ran without error");
    assert_eq!(coordinator.fake.with(|s| s.deregistered.clone()), vec![id]);
}
