//! Bounds: what a job or a caller sends cannot take the cluster down, and
//! text from outside is cut on character boundaries. Real processes on
//! loopback.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

/// Long enough for a failing build here; a hang is caught well before the
/// lease machinery would give up on its own (minutes).
const BUILD_TIMEOUT: Duration = Duration::from_secs(60);

/// A job whose program name is long and not ASCII fails at once with an
/// error that says why; the coordinator keeps serving. (The coordinator
/// used to cut the worker's error at byte 4096, inside a character, and
/// panic: the report never landed and the job ran again and again.)
#[test]
fn a_long_non_ascii_program_name_fails_its_job_at_once() {
    let cluster = HaCluster::start(1, 0, 1, 1);
    let program = format!("x{}", "é".repeat(3000));
    let graph = json!({"Jobs": [{
        "ID": id("long name"),
        "Name": "long name",
        "Cmds": [{"Exec": [program]}],
    }]});
    let run = finish_build_explained(cluster.spawn_build(&graph, &[]), BUILD_TIMEOUT, || {
        cluster.logs()
    });
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let job = run.finished(&id("long name"));
    let error = job["error"].as_str().expect("an error");
    // The cause is named after a shortened program name.
    assert!(
        error.starts_with("command 1: run \"xééé") && error.contains("(os error"),
        "{error}"
    );
    assert!(error.len() <= 4096, "{} bytes", error.len());
    // The coordinator still serves: a second build runs.
    let echo = json!({"Jobs": [sh_job("after", &[], &[], &["echo still here"])]});
    let run = finish_build(cluster.spawn_build(&echo, &[]), BUILD_TIMEOUT);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(run.finished(&id("after"))["stdout"], "still here\n");
}

/// A worker's report whose error is long and not ASCII is taken whatever
/// the worker cut (or did not): the coordinator cuts it on a character
/// boundary and answers, rather than panicking in the handler.
#[test]
fn the_coordinator_cuts_a_reported_error_on_a_character_boundary() {
    use distbuild_proto::Digest;
    use distbuild_proto::v1::ReportResultRequest;
    use distbuild_proto::v1::worker_api_client::WorkerApiClient;

    let cluster = HaCluster::start(1, 0, 0, 1);
    let addr = cluster.node_addr(cluster.wait_for_leader());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let answer = runtime.block_on(async {
        let mut client = WorkerApiClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let report = ReportResultRequest {
            worker_id: "w-unknown".into(),
            lease_token: 1,
            cache_key: Digest::of(b"no such job").as_bytes().to_vec().into(),
            exit_code: -1,
            error: format!("x{}", "é".repeat(3000)),
            request_id: "r1".into(),
            ..Default::default()
        };
        client.report_result(report).await
    });
    // Answered (not accepted: there is no such lease), not a call cut off
    // by a panicking handler (CANCELLED, the stream reset).
    let answer = answer.expect("an answer").into_inner();
    assert!(!answer.accepted);
    assert!(
        cluster.try_status().is_ok(),
        "the coordinator stopped serving"
    );
}

/// A job whose output is larger than its worker's whole cache fails at
/// once, naming both sizes, instead of being reported, evicted at once,
/// found lost by its dependent and run again without end.
#[test]
fn an_output_larger_than_the_cache_fails_its_job_naming_both_sizes() {
    let mut cluster = HaCluster::start(1, 0, 0, 1);
    cluster.add_worker_with(&["--cache-max-bytes", "1000000"]);
    cluster.wait_for_workers(1);
    let graph = json!({"Jobs": [
        sh_job("big", &[], &[], &["head -c 3000000 /dev/zero > {{.OutputDir}}/big"]),
        sh_job("reader", &[], &["big"], &[&format!("wc -c < {{{{index .Deps \"{}\"}}}}/big", id("big"))]),
    ]});
    let run = finish_build_explained(cluster.spawn_build(&graph, &[]), BUILD_TIMEOUT, || {
        cluster.logs()
    });
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let error = run.finished(&id("big"))["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("1000000 bytes") && error.contains("pack to 30"),
        "{error}"
    );
    assert!(
        !run.events.iter().any(|e| e["event"] == "job_finished"
            && e["id"] == id("reader")
            && e["exit_code"] == 0),
        "{}",
        run.describe()
    );
}

/// A job that leaves a 5,000-level directory tree behind (deeper than any
/// path may be long) neither kills its worker nor stops it from taking the
/// next job; one that leaves such a tree in its outputs fails, saying why.
#[test]
fn deep_trees_left_by_jobs_neither_kill_the_worker_nor_pack() {
    let cluster = HaCluster::start(1, 0, 1, 1);
    // Each step relative to the last (a shell's `cd` gives up once the
    // whole path passes PATH_MAX); perl is in every Debian (perl-base).
    let nest = r#"perl -e 'for (1..5000) { mkdir "d" or die "mkdir: $!"; chdir "d" or die "chdir: $!" }' && echo nested"#;
    let scratch = json!({"Jobs": [sh_job("deep scratch", &[], &[], &[nest])]});
    let run = finish_build_explained(cluster.spawn_build(&scratch, &[]), BUILD_TIMEOUT, || {
        cluster.logs()
    });
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(run.finished(&id("deep scratch"))["stdout"], "nested\n");

    let in_outputs = format!("cd {{{{.OutputDir}}}} && {nest}");
    let outputs = json!({"Jobs": [sh_job("deep outputs", &[], &[], &[&in_outputs])]});
    let run = finish_build_explained(cluster.spawn_build(&outputs, &[]), BUILD_TIMEOUT, || {
        cluster.logs()
    });
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let error = run.finished(&id("deep outputs"))["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("nest deeper than 256 levels"), "{error}");

    // The same worker takes the next job, and its sandboxes are gone.
    let after = json!({"Jobs": [sh_job("after", &[], &[], &["echo still here"])]});
    let run = finish_build(cluster.spawn_build(&after, &[]), BUILD_TIMEOUT);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let sandboxes = job_dirs_left(&cluster.path("worker0/sandbox"));
    assert!(sandboxes.is_empty(), "left behind: {sandboxes:?}");
}

/// A worker killed while a job had nested a tree deeper than any path may
/// be long starts again on the same cache directory, clearing the tree.
#[test]
fn a_worker_restarts_over_whatever_a_killed_job_left_in_its_sandbox() {
    let mut cluster = Cluster::start(1, 1);
    let nested = cluster.path("nested");
    let script = format!(
        r#"perl -e 'for (1..5000) {{ mkdir "d" or die; chdir "d" or die }}' && touch {} && sleep 120"#,
        nested.display()
    );
    let graph = json!({"Jobs": [sh_job("nests and waits", &[], &[], &[&script])]});
    let mut build = cluster.spawn_build(&graph, &[]);
    let deadline = std::time::Instant::now() + BUILD_TIMEOUT;
    while !nested.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the job never nested its tree"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.workers[0].kill();
    // Same cache directory (worker0): start-up clears its sandboxes.
    cluster.start_worker(0, 1);
    let _ = build.kill();
    let _ = build.wait();
    let sandboxes = job_dirs_left(&cluster.path("worker0/sandbox"));
    assert!(sandboxes.is_empty(), "left behind: {sandboxes:?}");
}

/// A watch that starts past a build's events is refused at once (it used
/// to wait forever, re-reading the build on every apply); one from the
/// start ends after the build's last event.
#[test]
fn a_watch_past_a_build_s_events_is_refused_and_one_from_the_start_ends() {
    use distbuild_proto::v1::WatchBuildRequest;
    use distbuild_proto::v1::client_api_client::ClientApiClient;

    let cluster = HaCluster::start(1, 0, 1, 1);
    let graph = json!({"Jobs": [sh_job("one", &[], &[], &["echo one"])]});
    let run = finish_build(cluster.spawn_build(&graph, &[]), BUILD_TIMEOUT);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let build_id: u64 = run.events[0]["build_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("the build's ID");
    let addr = cluster.node_addr(cluster.wait_for_leader());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let client = ClientApiClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let watch = |from_seq| {
            let mut client = client.clone();
            async move {
                let answer = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.watch_build(WatchBuildRequest { build_id, from_seq }),
                )
                .await
                .expect("an answer, not a wait");
                match answer {
                    Err(status) => Err(status),
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        let mut events = 0u64;
                        loop {
                            let next =
                                tokio::time::timeout(Duration::from_secs(10), stream.message())
                                    .await
                                    .expect("the stream ends after the last event");
                            match next.expect("events") {
                                Some(_) => events += 1,
                                None => return Ok(events),
                            }
                        }
                    }
                }
            }
        };
        let all = watch(0).await.expect("the whole build");
        assert!(all >= 2, "{all} events");
        for from_seq in [all, 1_000_000] {
            let status = watch(from_seq).await.expect_err("past the end");
            assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
            assert!(status.message().contains("past the end"), "{status:?}");
        }
    });
}

/// A job over its time limit (the build's `--job-timeout`, or the
/// coordinator's default) is killed with its processes and fails once,
/// saying so; a limit over the coordinator's maximum is refused.
#[test]
fn a_job_over_its_time_limit_is_killed_and_fails_without_a_retry() {
    let cluster = Cluster::start_with(
        1,
        1,
        &["--default-job-timeout", "1", "--max-job-timeout", "5"],
    );
    let ran = cluster.path("ran.log");
    let script = format!("echo ran >> {}; sleep 1000000", ran.display());
    let graph = json!({"Jobs": [sh_job("sleeps", &[], &[], &[&script])]});

    for (extra, limit) in [(&[][..], "1 s"), (&["--job-timeout", "2"][..], "2 s")] {
        let _ = std::fs::remove_file(&ran);
        let started = std::time::Instant::now();
        let run = finish_build_explained(cluster.spawn_build(&graph, extra), BUILD_TIMEOUT, || {
            cluster.logs()
        });
        assert_eq!(run.code, Some(1), "{}", run.describe());
        let error = run.finished(&id("sleeps"))["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_eq!(
            error,
            format!("timed out after {limit}: its processes were killed")
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
        let runs = std::fs::read_to_string(&ran).unwrap_or_default();
        assert_eq!(runs.lines().count(), 1, "ran once, not retried: {runs:?}");
    }

    let run = finish_build(
        cluster.spawn_build(&graph, &["--job-timeout", "6"]),
        BUILD_TIMEOUT,
    );
    assert_eq!(run.code, Some(2), "{}", run.describe());
    assert!(
        run.stderr.contains(
            "a job timeout of 6 s is more than this cluster allows (--max-job-timeout 5 s)"
        ),
        "{}",
        run.describe()
    );
}

/// Two hundred jobs with one command (one cache key, so one run), each
/// printing 1 MiB to stdout and 1 MiB to stderr: the output is stored once
/// and every job's event names it, so the coordinator's memory and disk
/// stay small. (Each waiter's event used to carry its own copy: 1.3 GB of
/// peak RSS here, and hundreds of MB on disk, on every replica.)
#[test]
fn an_output_shown_by_two_hundred_jobs_is_stored_once() {
    use std::io::BufRead as _;

    const JOBS: usize = 200;
    const MIB: usize = 1 << 20;
    let cluster = HaCluster::start(1, 0, 1, 4);
    let script =
        format!("head -c {MIB} /dev/zero | tr '\\0' o; head -c {MIB} /dev/zero | tr '\\0' e >&2");
    let jobs: Vec<_> = (0..JOBS)
        .map(|i| sh_job(&format!("loud {i}"), &[], &[], &[&script]))
        .collect();
    let mut child = cluster
        .build_command(&json!({ "Jobs": jobs }), &[])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the build");
    // 400 MiB of events: read a line at a time, and look for the outputs
    // in the text (parsing each big line would take longer than the build).
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let shows = |line: &str, field: &str, byte: char| {
            let key = format!("\"{field}\":\"");
            line.find(&key).is_some_and(|at| {
                let value = &line[at + key.len()..];
                value.len() > MIB
                    && value.as_bytes()[MIB] == b'"'
                    && value[..MIB].bytes().all(|b| b == byte as u8)
            })
        };
        let mut whole = 0;
        let mut finished_ok = None;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.expect("a line");
            if line.len() > MIB {
                whole += usize::from(shows(&line, "stdout", 'o') && shows(&line, "stderr", 'e'));
                continue;
            }
            let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            if event["event"] == "build_finished" {
                finished_ok = event["ok"].as_bool();
            }
        }
        (whole, finished_ok)
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let mut client_peak = 0;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll the build") {
            break status;
        }
        // The client's too: it keeps nothing of an event it has printed.
        if let Some(peak) = try_peak_rss_bytes(child.id()) {
            client_peak = client_peak.max(peak);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the build did not finish\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (whole, finished_ok) = reader.join().expect("reader");
    assert!(status.success(), "{status:?}\n{}", cluster.logs());
    assert_eq!(finished_ok, Some(true));
    assert_eq!(whole, JOBS, "every job shows its whole output");

    let pid = cluster.coordinators[0]
        .as_ref()
        .expect("running")
        .child
        .id();
    let peak = peak_rss_bytes(pid);
    let disk = disk_bytes(&cluster.path("coordinator1"));
    eprintln!(
        "coordinator peak RSS {} MiB, data dir {} MiB; client peak RSS {} MiB",
        peak >> 20,
        disk >> 20,
        client_peak >> 20
    );
    assert!(peak < 256 << 20, "peak RSS {} MiB", peak >> 20);
    assert!(disk < 64 << 20, "data dir {} MiB", disk >> 20);
    assert!(
        client_peak < 256 << 20,
        "client peak RSS {} MiB",
        client_peak >> 20
    );
}

/// A coordinator streams at most 16 watchers of one build: the next is
/// refused with RESOURCE_EXHAUSTED and a retry hint, and admitted once a
/// watcher goes away.
#[test]
fn watchers_of_one_build_are_bounded_and_a_freed_place_is_taken_again() {
    use distbuild_proto::v1::client_api_client::ClientApiClient;
    use distbuild_proto::v1::{CancelBuildRequest, SubmitBuildRequest, WatchBuildRequest};

    const PER_BUILD: usize = 16;
    let cluster = HaCluster::start(1, 0, 1, 1);
    let addr = cluster.node_addr(cluster.wait_for_leader());
    let graph = json!({"Jobs": [sh_job("slow", &[], &[], &["sleep 60"])]});
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = ClientApiClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let build_id = client
            .submit_build(SubmitBuildRequest {
                request_id: "watched".into(),
                graph_json: graph.to_string().into_bytes().into(),
                ..Default::default()
            })
            .await
            .expect("submitted")
            .into_inner()
            .build_id;
        let watch = || {
            let mut client = client.clone();
            async move {
                client
                    .watch_build(WatchBuildRequest {
                        build_id,
                        from_seq: 0,
                    })
                    .await
            }
        };
        let mut streams = Vec::new();
        for _ in 0..PER_BUILD {
            streams.push(watch().await.expect("admitted").into_inner());
        }
        let refused = watch().await.expect_err("one too many");
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        assert!(
            refused.message().contains("16 watchers"),
            "{}",
            refused.message()
        );
        assert!(
            refused.metadata().get("distbuild-retry-after-ms").is_some(),
            "a hint to retry: {refused:?}"
        );
        // A watcher that goes away frees its place.
        drop(streams.pop());
        let admitted = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match watch().await {
                    Ok(stream) => return stream,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await
        .expect("the freed place is taken");
        streams.push(admitted.into_inner());
        // Each stream still works: cancelling ends them all at the build's
        // last event.
        client
            .cancel_build(CancelBuildRequest { build_id })
            .await
            .expect("cancelled");
        for mut stream in streams {
            let mut last = None;
            while let Some(event) = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("events, then the end")
                .expect("no error")
            {
                last = Some(event);
            }
            assert!(
                matches!(
                    last.and_then(|e| e.event),
                    Some(distbuild_proto::v1::build_event::Event::BuildFinished(_))
                ),
                "each stream ends with the build"
            );
        }
    });
}

/// A hundred builds of 1.5 MB job lists submitted at once all go through:
/// staging is bounded in bytes and admits a submit whole, so submits in
/// progress never push each other out. (It used to keep 16 submits by
/// count, evicting the oldest: most of these failed.)
#[test]
fn a_hundred_concurrent_large_submits_all_succeed() {
    const BUILDS: usize = 100;
    const JOBS: usize = 15;
    let cluster = HaCluster::start(1, 0, 1, 4);
    // Fifteen jobs of 100 KB each (templates, no processes): 1.5 MB per
    // build, about six staged parts. Every build lists the same jobs, so
    // each runs once and the rest are answered from the cache.
    let jobs: Vec<_> = (0..JOBS)
        .map(|i| {
            let name = format!("big {i}");
            json!({
                "ID": id(&name),
                "Name": name,
                "Cmds": [{
                    "CatTemplate": format!("{i}{}", "x".repeat(100_000)),
                    "CatOutput": "{{.OutputDir}}/out",
                }],
            })
        })
        .collect();
    let graph = json!({ "Jobs": jobs });
    let builds: Vec<_> = (0..BUILDS)
        .map(|_| DrainedChild::new(cluster.spawn_build(&graph, &[])))
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(420);
    let mut failed = Vec::new();
    for mut build in builds {
        while build.child.try_wait().expect("poll").is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the builds did not finish\n{}",
                cluster.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let run = build.finish();
        if run.code != Some(0) {
            failed.push(run.describe());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {BUILDS} builds failed; the first:\n{}",
        failed.len(),
        failed[0]
    );
}

/// Files under `dir/blobs/objects` (a coordinator's stored source blobs).
fn stored_blob_files(coordinator_dir: &std::path::Path) -> usize {
    std::fs::read_dir(coordinator_dir.join("blobs/objects"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Source blobs no build needs are collected after their retention (the
/// record through the log, the file on disk), a later build that needs one
/// uploads it again, and an upload that cannot fit beside what builds in
/// flight need is refused with RESOURCE_EXHAUSTED (exit code 2).
#[test]
fn unused_sources_are_collected_and_an_upload_that_cannot_fit_is_refused() {
    let cluster = Cluster::start_with(
        1,
        2,
        &[
            "--blob-retention",
            "1",
            "--gc-interval-ms",
            "200",
            "--max-blob-bytes",
            "100000",
            "--blob-sweep-grace",
            "1",
        ],
    );
    let src = cluster.path("src");
    std::fs::create_dir_all(&src).expect("src");
    std::fs::write(src.join("a.txt"), "version one\n").expect("write");
    let g = graph(
        &["a.txt"],
        vec![sh_job(
            "copy",
            &["a.txt"],
            &[],
            &["cat {{.SourceDir}}/a.txt > {{.OutputDir}}/copy"],
        )],
    );
    let first = cluster.build(&g, &src, &[]);
    assert_eq!(first.code, Some(0), "{}", first.describe());
    let data = cluster.path("coordinator");
    assert_eq!(stored_blob_files(&data), 1);
    // Unused for its retention (1 s), it goes: record and file.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stored_blob_files(&data) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the blob was not collected\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // (The sweep deletes only the files of blobs the state no longer
    // records: the record went first.)
    // The same source again: uploaded again, and the job's result still
    // answers it.
    let second = cluster.build(&g, &src, &[]);
    assert_eq!(second.code, Some(0), "{}", second.describe());
    assert_eq!(stored_blob_files(&data), 1);

    // Bigger than the whole store: refused, saying why.
    std::fs::write(src.join("big.bin"), vec![b'x'; 200_000]).expect("write");
    let big = graph(
        &["big.bin"],
        vec![sh_job(
            "wc",
            &["big.bin"],
            &[],
            &["wc -c < {{.SourceDir}}/big.bin"],
        )],
    );
    let refused = cluster.build(&big, &src, &[]);
    assert_eq!(refused.code, Some(2), "{}", refused.describe());
    assert!(
        refused.stderr.contains("does not fit") && refused.stderr.contains("--max-blob-bytes"),
        "{}",
        refused.describe()
    );
    // The coordinator keeps serving.
    let third = cluster.build(&g, &src, &[]);
    assert_eq!(third.code, Some(0), "{}", third.describe());
}

/// One caller cannot fill the log: a worker sending state-changing calls
/// past its rate bound (5,000 polls at once here; the bound is 1,000 a
/// second, bursts of 2,000) is refused with RESOURCE_EXHAUSTED and a retry
/// hint, while another caller is served.
#[test]
fn a_caller_past_its_rate_bound_is_refused_and_others_are_served() {
    use distbuild_proto::v1::worker_api_client::WorkerApiClient;
    use distbuild_proto::v1::{HeartbeatRequest, PollWorkRequest};

    let cluster = HaCluster::start(1, 0, 0, 1);
    let addr = cluster.node_addr(cluster.wait_for_leader());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let client = WorkerApiClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let flood = (0..5_000).map(|n| {
            let mut client = client.clone();
            let request = PollWorkRequest {
                worker_id: "flooder".into(),
                free_slots: 1,
                wait_ms: 0,
                request_id: format!("flooder-poll-{n}"),
            };
            async move { client.poll_work(request).await }
        });
        // 64 at a time: what one connection carries at once.
        use futures::StreamExt as _;
        let answers: Vec<_> = futures::stream::iter(flood)
            .buffer_unordered(64)
            .collect()
            .await;
        let refused: Vec<_> = answers
            .iter()
            .filter_map(|a| a.as_ref().err())
            .filter(|status| status.code() == tonic::Code::ResourceExhausted)
            .collect();
        assert!(
            refused.len() >= 1_000,
            "{} of 5,000 calls refused",
            refused.len()
        );
        for status in &refused {
            assert!(
                status.metadata().get("distbuild-retry-after-ms").is_some(),
                "{status:?}"
            );
        }
        let mut client = client.clone();
        client
            .heartbeat(HeartbeatRequest {
                worker_id: "bystander".into(),
                request_id: "bystander-hb-1".into(),
                ..Default::default()
            })
            .await
            .expect("another caller is served");
    });
}
