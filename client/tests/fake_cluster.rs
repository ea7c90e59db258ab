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
use support::{Fake, Server, WatchScript, dead_address};
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
        connection: ConnectionArgs {
            coordinators,
            timeout_secs,
        },
    }
}

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
            },
            // Resends 1 and 2, sends 3, then just ends.
            WatchScript {
                resend: 2,
                take: Some(1),
                fail_with_status: false,
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

    let lines: Vec<serde_json::Value> = out
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let kinds: Vec<String> = lines
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
        .collect();
    assert_eq!(
        kinds,
        [
            "build_started",
            "job_finished a",
            "job_finished b",
            "build_finished"
        ]
    );
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
            },
        },
        Connector::tcp(),
        console,
    )
    .await;
    assert_eq!(code, exit_code::OK, "{}", err.text());
    assert_eq!(
        out.text(),
        "{\"leader\":1,\"members\":[{\"node_id\":1,\"addr\":\"leader:1\"}],\"workers\":[]}\n"
    );
    follower_server.stop().await;
    leader_server.stop().await;
}
