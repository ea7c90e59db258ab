//! End to end: a real coordinator, real workers and the client CLI on
//! loopback, running build graphs.

mod support;

use std::path::Path;

use serde_json::json;
use support::{Cluster, graph, id, sh_job};

fn write(dir: &Path, rel: &str, content: &str) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, content).expect("write source");
}

/// Lines of a file outside the sandbox that jobs append to (how tests see
/// what really ran).
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_single_echo_job_streams_its_output() {
    let cluster = Cluster::start(1, 2);
    let g = graph(&[], vec![sh_job("echo", &[], &[], &["echo hello"])]);
    let run = cluster.build(&g, &cluster.path("nosrc"), &[]);
    assert_eq!(run.code, Some(0), "{}\n{}", run.describe(), cluster.logs());
    assert_eq!(
        run.kinds(),
        ["build_started", "job_finished", "build_finished"]
    );
    let job = run.finished(&id("echo"));
    assert_eq!(job["stdout"], "hello\n");
    assert_eq!(job["exit_code"], 0);
    assert_eq!(job["cached"], false);
    assert_eq!(job["error"], json!(null));
    assert_eq!(
        run.events[2],
        json!({"event": "build_finished", "ok": true, "error": null})
    );
}

#[test]
fn a_second_build_is_served_from_the_cache_and_a_source_change_reruns() {
    let cluster = Cluster::start(2, 2);
    let src = cluster.path("src");
    write(&src, "a.txt", "one\n");
    let ran = cluster.path("ran.log");
    let script = format!(
        "echo ran >> {}; cat {{{{.SourceDir}}}}/a.txt > {{{{.OutputDir}}}}/copy",
        ran.display()
    );
    let g = graph(
        &["a.txt"],
        vec![sh_job("copy", &["a.txt"], &[], &[&script])],
    );

    let first = cluster.build(&g, &src, &[]);
    assert_eq!(first.code, Some(0), "{}", first.describe());
    assert_eq!(first.finished(&id("copy"))["cached"], false);
    assert_eq!(lines(&ran).len(), 1);

    let second = cluster.build(&g, &src, &[]);
    assert_eq!(second.code, Some(0), "{}", second.describe());
    assert_eq!(second.finished(&id("copy"))["cached"], true);
    assert_eq!(lines(&ran).len(), 1, "a cached job must not run again");

    write(&src, "a.txt", "two\n");
    let third = cluster.build(&g, &src, &[]);
    assert_eq!(third.code, Some(0), "{}", third.describe());
    assert_eq!(third.finished(&id("copy"))["cached"], false);
    assert_eq!(lines(&ran).len(), 2, "a changed source re-runs the job");
}

/// The digest cache: once its sources have settled, a build reads none
/// whose stat is unchanged; one edited in place (same size) is read again
/// and its new content built; `--digest-cache=false` reads them all. The
/// cache is a private file in the output base.
#[test]
fn unchanged_sources_are_not_read_again_and_an_edited_one_is() {
    let cluster = Cluster::start(1, 2);
    let src = cluster.path("src");
    write(&src, "a.txt", "one\n");
    write(&src, "sub/b.txt", "bee\n");
    let g = graph(
        &["a.txt", "sub/b.txt"],
        vec![sh_job(
            "cat",
            &["a.txt", "sub/b.txt"],
            &[],
            &["cat {{.SourceDir}}/a.txt {{.SourceDir}}/sub/b.txt"],
        )],
    );
    let graph_path = cluster.path("graph.json");
    std::fs::write(&graph_path, g.to_string()).expect("write graph");
    let base = cluster.path("output-base");
    let build = |extra: &[&str]| {
        let mut args = vec![
            "--log-format",
            "json",
            "--output-base",
            base.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        let out = support::build_command(&graph_path, &src, &cluster.coordinator_addr(), &args)
            .args(cluster.client_flags())
            .env("DISTBUILD_LOG", "distbuild_client=debug")
            .output()
            .expect("run distbuild build");
        let run = support::BuildRun::from(out);
        assert_eq!(run.code, Some(0), "{}", run.describe());
        let read = run
            .stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["message"] == "hashed sources")
            .unwrap_or_else(|| panic!("no hashing logged: {}", run.stderr))["read"]
            .clone();
        (run, read)
    };
    // Files changed within the last two seconds are not remembered.
    std::thread::sleep(
        distbuild_client::digests::RACY_WINDOW + std::time::Duration::from_millis(500),
    );

    let (first, read) = build(&[]);
    assert_eq!(read, 2, "a first build reads every source");
    assert_eq!(first.finished(&id("cat"))["stdout"], "one\nbee\n");
    let cache = base.join("digests");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&cache)
        .expect("the cache file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the digest cache is its owner's only");

    let (second, read) = build(&[]);
    assert_eq!(read, 0, "unchanged sources are not read");
    assert_eq!(second.finished(&id("cat"))["cached"], true);

    // Same size, same second: the change time still moves.
    write(&src, "a.txt", "two\n");
    let (third, read) = build(&[]);
    assert_eq!(read, 1, "the edited source is read again");
    assert_eq!(third.finished(&id("cat"))["cached"], false);
    assert_eq!(third.finished(&id("cat"))["stdout"], "two\nbee\n");

    let (_, read) = build(&["--digest-cache=false"]);
    assert_eq!(read, 2, "without the cache every source is read");
}

/// Early cutoff: a job is keyed by what its dependencies produced, so a
/// dependency that runs again (its source changed) but writes the same
/// bytes leaves its dependents cached.
#[test]
fn a_dependency_rebuilt_into_the_same_output_leaves_its_dependent_cached() {
    let cluster = Cluster::start(1, 2);
    let src = cluster.path("src");
    let ran = cluster.path("ran.log");
    let strip = format!(
        "echo strip >> {}; grep -v '^#' {{{{.SourceDir}}}}/a.txt > {{{{.OutputDir}}}}/code",
        ran.display()
    );
    let count = format!(
        "echo count >> {}; wc -l < {{{{index .Deps \"{}\"}}}}/code > {{{{.OutputDir}}}}/lines",
        ran.display(),
        id("strip")
    );
    let g = graph(
        &["a.txt"],
        vec![
            sh_job("strip", &["a.txt"], &[], &[&strip]),
            sh_job("count", &[], &["strip"], &[&count]),
        ],
    );
    let build = |content: &str| {
        write(&src, "a.txt", content);
        let run = cluster.build(&g, &src, &[]);
        assert_eq!(run.code, Some(0), "{}\n{}", run.describe(), cluster.logs());
        let cached = |job: &str| run.finished(&id(job))["cached"].as_bool();
        (cached("strip"), cached("count"))
    };
    assert_eq!(build("one\n# first\n"), (Some(false), Some(false)));
    assert_eq!(lines(&ran), ["strip", "count"]);
    // Only a comment changed: strip runs, its output is the same.
    assert_eq!(build("one\n# second\n"), (Some(false), Some(true)));
    assert_eq!(lines(&ran), ["strip", "count", "strip"]);
    // The code changed: both run.
    assert_eq!(build("one\ntwo\n# second\n"), (Some(false), Some(false)));
    assert_eq!(lines(&ran), ["strip", "count", "strip", "strip", "count"]);
}

#[test]
fn sources_in_subdirectories_and_separate_stdout_stderr() {
    let cluster = Cluster::start(1, 1);
    let src = cluster.path("src");
    write(&src, "pkg/sub/a.c", "int a;\n");
    write(&src, "b.txt", "bee\n");
    // The source dir holds exactly the inputs.
    let script = "cat {{.SourceDir}}/pkg/sub/a.c; echo err >&2; cd {{.SourceDir}} && find . -type f | sort >&2";
    let g = graph(
        &["pkg/sub/a.c", "b.txt"],
        vec![sh_job("sub", &["pkg/sub/a.c"], &[], &[script])],
    );
    let run = cluster.build(&g, &src, &[]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let job = run.finished(&id("sub"));
    assert_eq!(job["stdout"], "int a;\n");
    assert_eq!(job["stderr"], "err\n./pkg/sub/a.c\n");
}

#[test]
fn a_dependency_output_is_read_through_its_template() {
    let cluster = Cluster::start(2, 1);
    let producer = sh_job("producer", &[], &[], &["echo made > {{.OutputDir}}/thing"]);
    let consumer = json!({
        "ID": id("consumer"),
        "Name": "consumer",
        "Deps": [id("producer")],
        "Cmds": [{"Exec": ["cat", format!("{{{{index .Deps \"{}\"}}}}/thing", id("producer"))]}],
    });
    let g = graph(&[], vec![consumer, producer]);
    let run = cluster.build(&g, &cluster.path("nosrc"), &[]);
    assert_eq!(run.code, Some(0), "{}\n{}", run.describe(), cluster.logs());
    assert_eq!(run.finished(&id("consumer"))["stdout"], "made\n");
    // The dependency finished first.
    let order: Vec<&str> = run
        .events
        .iter()
        .filter(|e| e["event"] == "job_finished")
        .map(|e| e["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(order, ["producer", "consumer"]);
}

#[test]
fn a_failure_skips_dependents_and_exits_1() {
    let cluster = Cluster::start(1, 2);
    let ran = cluster.path("ran.log");
    let mark = |name: &str| format!("echo {name} >> {}", ran.display());
    let g = graph(
        &[],
        vec![
            sh_job("bad", &[], &[], &["echo oops >&2; exit 3"]),
            sh_job("child", &[], &["bad"], &[&mark("child")]),
            sh_job("grandchild", &[], &["child"], &[&mark("grandchild")]),
            sh_job("independent", &[], &[], &[&mark("independent")]),
        ],
    );
    let run = cluster.build(&g, &cluster.path("nosrc"), &[]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let bad = run.finished(&id("bad"));
    assert_eq!(bad["exit_code"], 3);
    assert_eq!(bad["stderr"], "oops\n");
    let skipped: Vec<&str> = run
        .events
        .iter()
        .filter(|e| e["event"] == "job_skipped")
        .map(|e| e["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(skipped, ["child", "grandchild"]);
    assert_eq!(lines(&ran), ["independent"], "skipped jobs never run");
    let last = run.events.last().expect("events");
    assert_eq!(last["event"], "build_finished");
    assert_eq!(last["ok"], false);
}

#[test]
fn three_builds_sharing_a_dependency_run_in_parallel_on_three_workers() {
    let cluster = Cluster::start(3, 1);
    let times = cluster.path("times.log");
    let shared_ran = cluster.path("shared.log");
    // Each leaf records when it started and ended (ms since the epoch).
    let leaf = |name: &str| {
        sh_job(
            name,
            &[],
            &["shared"],
            &[&format!(
                "s=$(date +%s%3N); sleep 1; e=$(date +%s%3N); echo \"{name} $s $e\" >> {}",
                times.display()
            )],
        )
    };
    let shared = sh_job(
        "shared",
        &[],
        &[],
        &[&format!(
            "echo x >> {}; echo shared > {{{{.OutputDir}}}}/s",
            shared_ran.display()
        )],
    );
    let builds: Vec<_> = ["leaf1", "leaf2", "leaf3"]
        .iter()
        .map(|name| graph(&[], vec![shared.clone(), leaf(name)]))
        .collect();
    let runs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = builds
            .iter()
            .map(|g| s.spawn(|| cluster.build(g, &cluster.path("nosrc"), &[])))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("build thread"))
            .collect()
    });
    for run in &runs {
        assert_eq!(run.code, Some(0), "{}", run.describe());
    }
    assert_eq!(
        lines(&shared_ran).len(),
        1,
        "the shared dependency ran once"
    );
    let spans: Vec<(u64, u64)> = lines(&times)
        .iter()
        .map(|l| {
            let parts: Vec<&str> = l.split(' ').collect();
            (
                parts[1].parse().expect("start"),
                parts[2].parse().expect("end"),
            )
        })
        .collect();
    assert_eq!(spans.len(), 3);
    // In parallel: every leaf started before any other ended.
    let latest_start = spans.iter().map(|s| s.0).max().expect("spans");
    let earliest_end = spans.iter().map(|s| s.1).min().expect("spans");
    assert!(
        latest_start < earliest_end,
        "leaves ran one after another: {spans:?}"
    );
}

#[test]
fn leaf_outputs_are_downloaded_with_their_modes() {
    let cluster = Cluster::start(2, 1);
    let lib = sh_job("lib", &[], &[], &["echo lib > {{.OutputDir}}/lib.a"]);
    let bin = json!({
        "ID": id("bin"),
        "Name": "bin",
        "Deps": [id("lib")],
        "Cmds": [
            {"Exec": ["/bin/sh", "-c", format!("mkdir -p {{{{.OutputDir}}}}/bin && cp {{{{index .Deps \"{}\"}}}}/lib.a {{{{.OutputDir}}}}/bin/tool && chmod 755 {{{{.OutputDir}}}}/bin/tool", id("lib"))]}
        ],
    });
    let g = graph(&[], vec![lib, bin]);
    let out = cluster.path("out");
    let run = cluster.build(
        &g,
        &cluster.path("nosrc"),
        &["--output-dir", out.to_str().expect("utf-8")],
    );
    assert_eq!(run.code, Some(0), "{}\n{}", run.describe(), cluster.logs());
    let tool = out.join(id("bin")).join("bin/tool");
    assert_eq!(std::fs::read_to_string(&tool).expect("downloaded"), "lib\n");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&tool).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    // Only leaves are downloaded.
    assert!(!out.join(id("lib")).exists());
}

#[test]
fn a_coordinator_restart_between_builds_keeps_the_cache() {
    let mut cluster = Cluster::start(1, 1);
    let ran = cluster.path("ran.log");
    let g = graph(
        &[],
        vec![sh_job(
            "once",
            &[],
            &[],
            &[&format!("echo ran >> {}; echo out", ran.display())],
        )],
    );
    let first = cluster.build(&g, &cluster.path("nosrc"), &[]);
    assert_eq!(first.code, Some(0), "{}", first.describe());

    cluster.coordinator.as_mut().expect("running").kill();
    cluster.start_coordinator();
    let second = cluster.build(&g, &cluster.path("nosrc"), &[]);
    assert_eq!(
        second.code,
        Some(0),
        "{}\n{}",
        second.describe(),
        cluster.logs()
    );
    let job = second.finished(&id("once"));
    assert_eq!(job["cached"], true);
    assert_eq!(job["stdout"], "out\n");
    assert_eq!(lines(&ran).len(), 1);
}

#[test]
fn cluster_status_lists_the_leader_and_workers() {
    let cluster = Cluster::start(2, 3);
    let status = cluster.status();
    assert_eq!(status["leader"], 1);
    let workers = status["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2);
    for w in workers {
        assert_eq!(w["slots"], 3);
        assert_eq!(w["running"], 0);
        assert!(
            w["addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:"))
        );
    }
}

#[test]
fn a_job_whose_worker_dies_runs_again_elsewhere() {
    // Leases expire after 3 s in test clusters (see support).
    let mut cluster = Cluster::start(2, 1);
    let starts = cluster.path("starts.log");
    let g = graph(
        &[],
        vec![sh_job(
            "slow",
            &[],
            &[],
            &[&format!(
                "echo start >> {}; sleep 2; echo done",
                starts.display()
            )],
        )],
    );
    let build = {
        let graph_path = cluster.path("slow.json");
        std::fs::write(&graph_path, g.to_string()).expect("write graph");
        support::distbuild()
            .args(["build", "--json", "--graph"])
            .arg(&graph_path)
            .args(["--coordinator", &cluster.coordinator_addr()])
            .args(cluster.client_flags())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the build")
    };
    // Wait for the job to start, then kill the worker running it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let busy = loop {
        let status = cluster.status();
        let busy = status["workers"]
            .as_array()
            .and_then(|ws| ws.iter().find(|w| w["running"] == 1))
            .and_then(|w| w["addr"].as_str().map(str::to_string));
        if let (Some(addr), true) = (busy, lines(&starts).len() == 1) {
            break addr;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job never started: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let victim = cluster
        .workers
        .iter_mut()
        .find(|w| w.addr == busy)
        .expect("the busy worker is ours");
    victim.kill();

    let run = support::BuildRun::from(build.wait_with_output().expect("build finishes"));
    assert_eq!(run.code, Some(0), "{}\n{}", run.describe(), cluster.logs());
    assert_eq!(run.finished(&id("slow"))["stdout"], "done\n");
    assert_eq!(
        lines(&starts).len(),
        2,
        "it ran again on the surviving worker"
    );
}
