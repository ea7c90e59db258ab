//! The client against an in-process fake coordinator: leader following,
//! uploads, the event stream resumed exactly once after breaks, output
//! downloads, and the exit codes for bad input, refusals and an
//! unreachable cluster.

mod support;

use std::path::Path;
use std::time::Duration;

use distbuild_client::{
    BuildArgs, ClusterStatusArgs, ConnectionArgs, connect::Connector, exit_code,
};
use distbuild_proto::v1::{
    BuildEvent, BuildFinished, JobFinished, JobSkipped, JobStarted, build_event::Event,
};
use distbuild_proto::{Digest, artifact};
use support::{Failure, Fake, Proxy, Server, WatchScript, dead_address};
use tonic::Code;

const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const F: &str = "ffffffffffffffffffffffffffffffffffffffff";

/// A two-job graph (b depends on a; b is the leaf) reading one source file.
fn write_graph(dir: &Path) -> std::path::PathBuf {
    let graph = format!(
        r#"{{"SourceFiles": {{"{F}": "src/a.txt"}}, "Jobs": [
          {{"ID": "{A}", "Name": "a", "Inputs": ["src/a.txt"], "Cmds": [{{"Exec": ["cat", "{{{{.SourceDir}}}}/src/a.txt"]}}]}},
          {{"ID": "{B}", "Name": "b", "Deps": ["{A}"], "Cmds": [{{"CatTemplate": "x", "CatOutput": "{{{{.OutputDir}}}}/out.txt"}}]}}]}}"#
    );
    let path = dir.join("graph.json");
    std::fs::write(&path, graph).expect("write graph");
    std::fs::create_dir_all(dir.join("src")).expect("mkdir");
    std::fs::write(dir.join("src/a.txt"), b"source a").expect("write source");
    path
}

fn args(dir: &Path, graph: &Path, coordinators: Vec<String>, timeout_secs: u64) -> BuildArgs {
    BuildArgs {
        graph: graph.to_path_buf(),
        source_dir: dir.to_path_buf(),
        output_dir: None,
        json: true,
        job_timeout: None,
        connection: ConnectionArgs {
            coordinators,
            timeout_secs,
            security: Default::default(),
        },
        output_base: None,
        digest_cache: false,
        block_for_lock: true,
        max_idle_secs: 60,
        sandbox_writable_paths: Vec::new(),
    }
}

/// The `--json` lines of a build's output.
fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

/// Each `--json` line as its event kind and the first letter of its job.
fn kinds(out: &str) -> Vec<String> {
    json_lines(out)
        .iter()
        .map(|l| {
            format!(
                "{}{}",
                l["event"].as_str().expect("event"),
                l["id"]
                    .as_str()
                    .map(|id| format!(" {}", &id[..1]))
                    .unwrap_or_default()
            )
        })
        .collect()
}

/// What [`two_job_events`] shows in `--json`, each line once.
const EVERY_EVENT_ONCE: [&str; 4] = [
    "build_started",
    "job_finished a",
    "job_finished b",
    "build_finished",
];

/// The events of the two-job graph building successfully: a started,
/// finished (seq 0, 1), b started, finished (2, 3), build finished (4).
fn two_job_events() -> Vec<BuildEvent> {
    vec![
        event(0, started(A, "a")),
        event(1, finished(A, "a", 0, Some((Digest::of(b"a"), 1)))),
        event(2, started(B, "b")),
        event(3, finished(B, "b", 0, Some((Digest::of(b"b"), 1)))),
        event(
            4,
            Event::BuildFinished(BuildFinished {
                ok: true,
                error: String::new(),
            }),
        ),
    ]
}

/// Upper bound on any one test's build: a client that hangs fails the test
/// instead of stalling the suite.
const TEST_BUILD_LIMIT: Duration = Duration::from_secs(30);

fn event(seq: u64, event: Event) -> BuildEvent {
    BuildEvent {
        seq,
        event: Some(event),
    }
}

fn finished(id: &str, name: &str, exit_code: i32, artifact: Option<(Digest, u64)>) -> Event {
    Event::JobFinished(JobFinished {
        job_id: id.into(),
        name: name.into(),
        exit_code,
        stdout: format!("{name} out\n").into_bytes().into(),
        artifact_digest: artifact
            .map(|(d, _)| d.as_bytes().to_vec().into())
            .unwrap_or_default(),
        artifact_size: artifact.map_or(0, |(_, s)| s),
        ..Default::default()
    })
}

fn started(id: &str, name: &str) -> Event {
    Event::JobStarted(JobStarted {
        job_id: id.into(),
        name: name.into(),
        worker_id: "w".into(),
    })
}

#[tokio::test]
async fn a_build_follows_the_leader_resumes_its_stream_and_downloads_the_leaf() {
    let leader = Fake::default();
    let leader_server = Server::start(leader.clone()).await;
    let follower = Fake::default();
    follower.lock().redirect_to = Some(leader_server.addr.clone());
    let follower_server = Server::start(follower.clone()).await;

    // The leaf's artifact.
    let outputs = tempfile::tempdir().expect("tempdir");
    std::fs::write(outputs.path().join("out.txt"), b"x").expect("write");
    let mut tar = Vec::new();
    let (digest, size) = artifact::pack(outputs.path(), &mut tar).expect("pack");
    let unreachable_holder = dead_address().await;
    {
        let mut state = leader.lock();
        state.job_count = 2;
        state.artifacts.insert(digest, tar);
        state.holders = vec![unreachable_holder, leader_server.addr.clone()];
        state.events = vec![
            event(0, started(A, "a")),
            event(1, finished(A, "a", 0, Some((Digest::of(b"a"), 1)))),
            event(2, started(B, "b")),
            event(3, finished(B, "b", 0, Some((digest, size)))),
            event(
                4,
                Event::BuildFinished(BuildFinished {
                    ok: true,
                    error: String::new(),
                }),
            ),
        ];
        state.watch_scripts = [
            // Breaks with UNAVAILABLE after 0, 1, 2.
            WatchScript {
                resend: 0,
                take: Some(3),
                fail_with_status: true,
                ..Default::default()
            },
            // Resends 1 and 2, sends 3, then just ends.
            WatchScript {
                resend: 2,
                take: Some(1),
                fail_with_status: false,
                ..Default::default()
            },
        ]
        .into();
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let graph = write_graph(dir.path());
    let out_dir = dir.path().join("out");
    // An old output is replaced.
    std::fs::create_dir_all(out_dir.join(B)).expect("mkdir");
    std::fs::write(out_dir.join(B).join("stale"), b"old").expect("write");
    let mut build = args(dir.path(), &graph, vec![follower_server.addr.clone()], 10);
    build.output_dir = Some(out_dir.clone());
    let (console, out, err) = support::console();
    let code = distbuild_client::run_build(build, Connector::tcp(), console).await;
    assert_eq!(code, exit_code::OK, "stderr: {}", err.text());

    let lines = json_lines(&out.text());
    assert_eq!(kinds(&out.text()), EVERY_EVENT_ONCE);
    assert_eq!(lines[0]["build_id"], "7");
    assert_eq!(lines[2]["stdout"], "b out\n");

    {
        let state = leader.lock();
        assert_eq!(state.watch_from, vec![0, 3, 4], "resumed at the next event");
        assert_eq!(state.uploads, 1);
        assert_eq!(
            state.blobs.get(&Digest::of(b"source a")).map(Vec::as_slice),
            Some(&b"source a"[..])
        );
        assert_eq!(state.submits.len(), 1);
        let submit = &state.submits[0];
        assert_eq!(submit.sources.len(), 1);
        assert_eq!(submit.sources[0].path, "src/a.txt");
        assert_eq!(submit.sources[0].size, 8);
        assert_eq!(
            submit.graph_json,
            std::fs::read(&graph).expect("read graph")
        );
    }
    assert!(follower.lock().redirected >= 1);

    // Only the leaf is downloaded, and it replaced the old tree.
    assert_eq!(
        std::fs::read(out_dir.join(B).join("out.txt")).expect("downloaded"),
        b"x"
    );
    assert!(!out_dir.join(B).join("stale").exists());
    assert!(!out_dir.join(A).exists());

    follower_server.stop().await;
    leader_server.stop().await;
}

#[tokio::test]
async fn a_failed_job_exits_1_and_is_shown_in_human_output() {
    let fake = Fake::default();
    {
        let mut state = fake.lock();
        state.job_count = 2;
        state.events = vec![
            event(0, finished(A, "a", 2, None)),
            event(
                1,
                Event::JobSkipped(JobSkipped {
                    job_id: B.into(),
                    name: "b".into(),
                    reason: "dependency \"a\" failed".into(),
                }),
            ),
            event(
                2,
                Event::BuildFinished(BuildFinished {
                    ok: false,
                    error: "1 job failed".into(),
                }),
            ),
        ];
    }
    let server = Server::start(fake.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let graph = write_graph(dir.path());
    let mut build = args(dir.path(), &graph, vec![server.addr.clone()], 10);
    build.json = false;
    let (console, out, _err) = support::console();
    let code = distbuild_client::run_build(build, Connector::tcp(), console).await;
    assert_eq!(code, exit_code::BUILD_FAILED);
    let text = out.text();
    assert!(
        text.contains(&format!(
            "FAILED job \"a\" ({}): exit code 2\na out\n",
            &A[..12]
        )),
        "{text}"
    );
    assert!(text.contains("skipped job \"b\""), "{text}");
    assert!(
        text.lines()
            .last()
            .expect("summary")
            .starts_with("build 7: 2 jobs, 1 ran, 0 cached, 1 failed, 1 skipped in "),
        "{text}"
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_input_exits_2_before_anything_is_sent() {
    let fake = Fake::default();
    let server = Server::start(fake.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let graph = write_graph(dir.path());
    std::fs::remove_file(dir.path().join("src/a.txt")).expect("remove source");
    let (console, out, err) = support::console();
    let code = distbuild_client::run_build(
        args(dir.path(), &graph, vec![server.addr.clone()], 10),
        Connector::tcp(),
        console,
    )
    .await;
    assert_eq!(code, exit_code::BAD_INPUT);
    let err = err.text();
    assert!(err.starts_with("error: source file \"src/a.txt\""), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(out.text(), "");

    // A broken graph names the problem.
    std::fs::write(
        &graph,
        format!(r#"{{"Jobs": [{{"ID": "{A}", "Deps": ["{A}"]}}]}}"#),
    )
    .expect("write");
    let (console, _out, err) = support::console();
    let code = distbuild_client::run_build(
        args(dir.path(), &graph, vec![server.addr.clone()], 10),
        Connector::tcp(),
        console,
    )
    .await;
    assert_eq!(code, exit_code::BAD_INPUT);
    assert!(err.text().contains("depends on itself"), "{}", err.text());

    // No coordinator at all.
    let (console, _out, err) = support::console();
    let code = distbuild_client::run_build(
        args(dir.path(), &graph, vec![], 10),
        Connector::tcp(),
        console,
    )
    .await;
    assert_eq!(code, exit_code::BAD_INPUT);
    assert!(err.text().starts_with("error: no coordinator given"));

    let sent = {
        let state = fake.lock();
        (state.uploads, state.submits.len())
    };
    assert_eq!(sent, (0, 0));
    server.stop().await;
}

#[tokio::test]
async fn a_refused_submit_exits_2_with_the_coordinators_message() {
    let fake = Fake::default();
    fake.lock().submit_error = Some((
        Code::FailedPrecondition,
        "source \"src/a.txt\" was never uploaded".into(),
    ));
    let server = Server::start(fake.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let graph = write_graph(dir.path());
    let (console, _out, err) = support::console();
    let code = distbuild_client::run_build(
        args(dir.path(), &graph, vec![server.addr.clone()], 10),
        Connector::tcp(),
        console,
    )
    .await;
    assert_eq!(code, exit_code::BAD_INPUT);
    assert_eq!(
        err.text(),
        "error: submit the build: source \"src/a.txt\" was never uploaded\n"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_unreachable_cluster_exits_3_after_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let graph = write_graph(dir.path());
    let addrs = vec![dead_address().await, dead_address().await];
    let started = std::time::Instant::now();
    let (console, _out, err) = support::console();
    let code = distbuild_client::run_build(
        args(dir.path(), &graph, addrs, 1),
        Connector::tcp(),
        console,
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(code, exit_code::UNREACHABLE);
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    let err = err.text();
    assert!(
        err.starts_with("error: could not reach the cluster at "),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[tokio::test]
async fn cluster_status_follows_the_leader() {
    let leader = Fake::default();
    let leader_server = Server::start(leader).await;
    let follower = Fake::default();
    follower.lock().redirect_to = Some(leader_server.addr.clone());
    let follower_server = Server::start(follower).await;
    let (console, out, err) = support::console();
    let code = distbuild_client::run_cluster_status(
        ClusterStatusArgs {
            json: true,
            connection: ConnectionArgs {
                coordinators: vec![follower_server.addr.clone()],
                timeout_secs: 5,
                security: Default::default(),
            },
        },
        Connector::tcp(),
        console,
    )
    .await;
    assert_eq!(code, exit_code::OK, "{}", err.text());
    assert_eq!(
        out.text(),
        concat!(
            r#"{"leader":1,"members":[{"node_id":1,"addr":"leader:1","voter":true,"role":"leader","#,
            r#""term":2,"last_log_index":10,"applied_index":10,"lag":0,"error":null}],"#,
            r#""workers":[],"answered_by":1}"#,
            "\n"
        )
    );
    follower_server.stop().await;
    leader_server.stop().await;
}

#[tokio::test]
async fn a_stream_ended_by_a_leadership_loss_resumes_at_the_named_leader_from_the_next_event() {
    // The new leader knows every event; the old one sends three, then loses
    // its leadership and ends the stream naming the new leader.
    let new_leader = Fake::default();
    new_leader.lock().events = two_job_events();
    let new_leader_server = Server::start(new_leader.clone()).await;
    let old_leader = Fake::default();
    {
        let mut state = old_leader.lock();
        state.job_count = 2;
        state.events = two_job_events();
        state.watch_scripts = [WatchScript {
            take: Some(3),
            fail_with_status: true,
            leader: Some(new_leader_server.addr.clone()),
            ..Default::default()
        }]
        .into();
    }
    let old_leader_server = Server::start(old_leader.clone()).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let graph = write_graph(dir.path());
    // Only the old leader is configured: the new one is known only from
    // the stream's last word.
    let build = args(dir.path(), &graph, vec![old_leader_server.addr.clone()], 10);
    let (console, out, err) = support::console();
    let code = tokio::time::timeout(
        TEST_BUILD_LIMIT,
        distbuild_client::run_build(build, Connector::tcp(), console),
    )
    .await
    .expect("the build ends");
    assert_eq!(code, exit_code::OK, "stderr: {}", err.text());
    assert_eq!(kinds(&out.text()), EVERY_EVENT_ONCE);
    assert_eq!(old_leader.lock().watch_from, vec![0]);
    assert_eq!(
        new_leader.lock().watch_from,
        vec![3],
        "resumed at the named leader from the next event"
    );
    assert_eq!(old_leader.lock().submits.len(), 1);
    assert!(new_leader.lock().submits.is_empty());

    old_leader_server.stop().await;
    new_leader_server.stop().await;
}

/// A build whose stream, at the first node (behind a proxy), delivers two
/// events and then goes silent; `break_it` breaks the proxy once the client
/// has shown them. The stream must resume at the second node from seq 2.
/// Returns how long after the break the build finished.
async fn check_stream_resumes_after(break_it: impl AsyncFnOnce(Proxy)) -> Duration {
    let first = Fake::default();
    {
        let mut state = first.lock();
        state.job_count = 2;
        state.events = two_job_events();
        state.watch_scripts = [WatchScript {
            take: Some(2),
            hang: true,
            ..Default::default()
        }]
        .into();
    }
    let first_server = Server::start(first.clone()).await;
    let proxy = Proxy::start(first_server.addr.clone()).await;
    let second = Fake::default();
    second.lock().events = two_job_events();
    let second_server = Server::start(second.clone()).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let graph = write_graph(dir.path());
    let build = args(
        dir.path(),
        &graph,
        vec![proxy.addr.clone(), second_server.addr.clone()],
        10,
    );
    let (console, out, err) = support::console();
    let broken_at = std::sync::Mutex::new(None);
    let ((code, finished_at), ()) = tokio::time::timeout(TEST_BUILD_LIMIT, async {
        tokio::join!(
            async {
                let code = distbuild_client::run_build(build, Connector::tcp(), console).await;
                (code, std::time::Instant::now())
            },
            async {
                // build_started and job_finished a: the stream now hangs.
                while out.text().lines().count() < 2 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                *broken_at.lock().expect("lock") = Some(std::time::Instant::now());
                break_it(proxy).await;
            }
        )
    })
    .await
    .expect("the build ends");
    let recovery = finished_at.duration_since(
        broken_at
            .lock()
            .expect("lock")
            .expect("the stream was broken"),
    );
    assert_eq!(code, exit_code::OK, "stderr: {}", err.text());
    assert_eq!(kinds(&out.text()), EVERY_EVENT_ONCE);
    assert_eq!(first.lock().watch_from, vec![0]);
    assert_eq!(
        second.lock().watch_from,
        vec![2],
        "resumed from the next event"
    );
    first_server.stop().await;
    second_server.stop().await;
    recovery
}

#[tokio::test]
async fn a_stream_broken_by_a_crash_resumes_at_another_node() {
    let recovery = check_stream_resumes_after(async |proxy: Proxy| proxy.cut().await).await;
    assert!(recovery < Duration::from_secs(2), "{recovery:?}");
}

#[tokio::test]
async fn a_stream_cut_off_by_a_partition_is_noticed_by_keepalive_and_resumed() {
    let recovery = check_stream_resumes_after(async |proxy: Proxy| {
        proxy.blackhole();
        // Kept (silent) until the build is over.
        tokio::time::sleep(Duration::from_secs(8)).await;
        proxy.cut().await;
    })
    .await;
    // Keepalive: a ping a second, dead after two unanswered seconds.
    assert!(
        recovery < Duration::from_secs(8),
        "the silent stream was not noticed in time: {recovery:?}"
    );
}

/// Output is buffered while events keep coming, but what arrived is
/// written as soon as the stream waits (a job running): a watcher of
/// `--json` sees each line when it happens, not when the build ends.
#[tokio::test]
async fn lines_are_written_while_the_stream_waits() {
    let fake = Fake::default();
    {
        let mut state = fake.lock();
        state.job_count = 2;
        state.events = two_job_events();
        // Two events (a started and finished), then a long wait.
        state.watch_scripts = [WatchScript {
            take: Some(2),
            stall: Some(Duration::from_secs(5)),
            ..Default::default()
        }]
        .into();
    }
    let server = Server::start(fake.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let graph = write_graph(dir.path());
    let build = args(dir.path(), &graph, vec![server.addr.clone()], 30);
    let (console, out, err) = support::console();
    let watch_output = async {
        let waited = std::time::Instant::now();
        while kinds(&out.text()) != ["build_started", "job_finished a"] {
            assert!(
                waited.elapsed() < Duration::from_secs(3),
                "the lines before the wait were not written during it: {:?}",
                out.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(fake.lock().watch_from, vec![0], "still the first stream");
    };
    let (code, ()) = tokio::time::timeout(
        TEST_BUILD_LIMIT,
        futures::future::join(
            distbuild_client::run_build(build, Connector::tcp(), console),
            watch_output,
        ),
    )
    .await
    .expect("the build ends");
    assert_eq!(code, exit_code::OK, "stderr: {}", err.text());
    assert_eq!(kinds(&out.text()), EVERY_EVENT_ONCE);
    server.stop().await;
}

#[tokio::test]
async fn an_election_shorter_than_the_timeout_does_not_end_the_build() {
    let fake = Fake::default();
    {
        let mut state = fake.lock();
        state.job_count = 2;
        state.events = two_job_events();
        // The submit is applied, but its answer is lost in a failover.
        state
            .failures
            .insert("submit_build", [Failure::election()].into());
        // Two events, then the leader is lost and no node leads for 1.5 s.
        state.watch_scripts = [WatchScript {
            take: Some(2),
            fail_with_status: true,
            outage: Some(Duration::from_millis(1500)),
            ..Default::default()
        }]
        .into();
    }
    let server = Server::start(fake.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let graph = write_graph(dir.path());
    // The other configured coordinator is down for good.
    let build = args(
        dir.path(),
        &graph,
        vec![server.addr.clone(), dead_address().await],
        3,
    );
    let (console, out, err) = support::console();
    let started = std::time::Instant::now();
    let code = tokio::time::timeout(
        TEST_BUILD_LIMIT,
        distbuild_client::run_build(build, Connector::tcp(), console),
    )
    .await
    .expect("the build ends");
    assert_eq!(code, exit_code::OK, "stderr: {}", err.text());
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(kinds(&out.text()), EVERY_EVENT_ONCE);
    {
        let state = fake.lock();
        assert!(state.outage_answers >= 3, "{}", state.outage_answers);
        assert_eq!(state.watch_from, vec![0, 2]);
        // The retried submit carried the same request ID (the cluster
        // deduplicates it: the retry attaches to the same build).
        assert_eq!(state.submits.len(), 2);
        assert!(!state.submits[0].request_id.is_empty());
        assert_eq!(state.submits[0].request_id, state.submits[1].request_id);
    }
    server.stop().await;
}

#[tokio::test]
async fn leadership_changes_while_a_job_runs_do_not_add_up_to_the_timeout() {
    // Two events, then (while job b runs and sends nothing) the stream is
    // lost three times, 1.2 s apart. Each time the cluster answers at once,
    // so it is never unreachable, although no event arrives for longer than
    // --timeout.
    let fake = Fake::default();
    {
        let mut state = fake.lock();
        state.job_count = 2;
        state.events = two_job_events();
        let lost_while_running = WatchScript {
            take: Some(0),
            fail_with_status: true,
            stall: Some(Duration::from_millis(1200)),
            ..Default::default()
        };
        state.watch_scripts = [
            WatchScript {
                take: Some(2),
                fail_with_status: true,
                ..Default::default()
            },
            lost_while_running.clone(),
            lost_while_running.clone(),
            lost_while_running,
        ]
        .into();
    }
    let server = Server::start(fake.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let graph = write_graph(dir.path());
    let (console, out, err) = support::console();
    let code = tokio::time::timeout(
        TEST_BUILD_LIMIT,
        distbuild_client::run_build(
            args(dir.path(), &graph, vec![server.addr.clone()], 2),
            Connector::tcp(),
            console,
        ),
    )
    .await
    .expect("the build ends");
    assert_eq!(code, exit_code::OK, "stderr: {}", err.text());
    assert_eq!(kinds(&out.text()), EVERY_EVENT_ONCE);
    assert_eq!(fake.lock().watch_from, vec![0, 2, 2, 2, 2]);
    server.stop().await;
}

#[tokio::test]
async fn an_election_longer_than_the_timeout_exits_3() {
    let fake = Fake::default();
    fake.lock().outage_until = Some(std::time::Instant::now() + Duration::from_secs(60));
    let server = Server::start(fake.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let graph = write_graph(dir.path());
    let (console, _out, err) = support::console();
    let started = std::time::Instant::now();
    let code = distbuild_client::run_build(
        args(dir.path(), &graph, vec![server.addr.clone()], 1),
        Connector::tcp(),
        console,
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(code, exit_code::UNREACHABLE, "stderr: {}", err.text());
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    let err = err.text();
    assert!(
        err.starts_with("error: could not reach the cluster at ") && err.contains("election"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // Retried with backoff, not hammered: 50 ms doubling to 250 ms is about
    // five rounds in a second.
    let answers = fake.lock().outage_answers;
    assert!((3..=10).contains(&answers), "{answers}");
    server.stop().await;
}

#[tokio::test]
async fn an_upload_turned_away_by_a_follower_is_sent_to_the_leader() {
    let leader = Fake::default();
    {
        let mut state = leader.lock();
        state.job_count = 2;
        state.events = two_job_events();
    }
    let leader_server = Server::start(leader.clone()).await;
    // The follower answers lookups itself but turns the upload away before
    // reading it.
    let follower = Fake::default();
    follower.lock().failures.insert(
        "upload_blob",
        [Failure::not_leader(&leader_server.addr)].into(),
    );
    let follower_server = Server::start(follower.clone()).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let graph = write_graph(dir.path());
    // Several chunks: the refusal comes while the client is still sending.
    let source: Vec<u8> = (0..3 * (1 << 20) + 7).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("src/a.txt"), &source).expect("write source");
    let (console, out, err) = support::console();
    let code = tokio::time::timeout(
        TEST_BUILD_LIMIT,
        distbuild_client::run_build(
            args(dir.path(), &graph, vec![follower_server.addr.clone()], 10),
            Connector::tcp(),
            console,
        ),
    )
    .await
    .expect("the build ends");
    assert_eq!(code, exit_code::OK, "stderr: {}", err.text());
    assert_eq!(kinds(&out.text()), EVERY_EVENT_ONCE);
    assert_eq!(follower.lock().uploads, 0);
    {
        let state = leader.lock();
        assert_eq!(state.uploads, 1);
        assert_eq!(
            state.blobs.get(&Digest::of(&source)).map(Vec::len),
            Some(source.len())
        );
        assert_eq!(state.submits.len(), 1);
    }
    follower_server.stop().await;
    leader_server.stop().await;
}
