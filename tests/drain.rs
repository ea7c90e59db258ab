//! Draining workers, with real processes: SIGTERM to a worker under a
//! running build, and `distbuild cluster drain-worker`. Jobs append their
//! names to a log outside every sandbox, so the tests can tell how often
//! each ran: a drained worker loses nothing and runs nothing twice.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::*;

const BUILD_TIMEOUT: Duration = Duration::from_secs(120);

/// The worker ID a worker's log says it serves as.
fn worker_id_of(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("worker ")?;
            Some(rest.split_once(" listening on ")?.0.to_string())
        })
        .expect("a worker's start line")
}

/// Waits for worker `index` to exit by itself within `timeout`.
fn wait_exit(cluster: &mut HaCluster, index: usize, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let child = &mut cluster.workers[index].as_mut().expect("running").child;
        if let Some(status) = child.try_wait().expect("poll the worker") {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker did not leave within {timeout:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_drains_a_worker_under_a_running_build_losing_and_rerunning_nothing() {
    let mut cluster = HaCluster::start(1, 0, 2, 2);
    let log = cluster.path("ran.log");
    let gate = cluster.path("gate");
    let gate2 = cluster.path("gate2");
    // Eight outputs spread over both workers; a job that waits for the
    // gate (the drained worker runs it: its drain waits for it); a job
    // after it that waits for the second gate, opened once the drained
    // worker has left; and a join that needs every output, so it runs
    // after the drained worker left, with only the copies it made.
    let mut jobs = Vec::new();
    let mut names = Vec::new();
    for i in 0..8 {
        let name = format!("a{i}");
        jobs.push(sh_job(
            &name,
            &[],
            &[],
            &[&format!(
                "sleep 0.2; echo {name} >> {log}; echo {name} > {{{{.OutputDir}}}}/x",
                log = log.display()
            )],
        ));
        names.push(name);
    }
    jobs.push(sh_job(
        "wait",
        &[],
        &[],
        &[&format!(
            "echo wait-start >> {log}; while [ ! -e {gate} ]; do sleep 0.05; done; echo wait >> {log}; echo w > {{{{.OutputDir}}}}/x",
            log = log.display(),
            gate = gate.display()
        )],
    ));
    jobs.push(sh_job(
        "late",
        &[],
        &["wait"],
        &[&format!(
            "while [ ! -e {gate2} ]; do sleep 0.05; done; echo late >> {log}; echo l > {{{{.OutputDir}}}}/x",
            log = log.display(),
            gate2 = gate2.display()
        )],
    ));
    let reads: Vec<String> = names
        .iter()
        .map(|n| format!("cat {{{{index .Deps \"{}\"}}}}/x", id(n)))
        .collect();
    let mut deps: Vec<&str> = names.iter().map(String::as_str).collect();
    deps.extend(["wait", "late"]);
    jobs.push(sh_job(
        "join",
        &[],
        &deps,
        &[&format!(
            "{} > {{{{.OutputDir}}}}/all && echo join >> {}",
            reads.join(" && "),
            log.display()
        )],
    ));
    let build = cluster.spawn_build(&graph(&[], jobs), &["--timeout", "90"]);
    // Every output made, and the waiting job running.
    wait_for_lines(&log, 9, BUILD_TIMEOUT);
    // Drain the worker running the waiting job: it must finish it first.
    let (_, page) = cluster.http_get(1, "/status.json");
    let page: Value = serde_json::from_str(&page).expect("status JSON");
    let running_on = page["builds"][0]["running"]
        .as_array()
        .and_then(|r| r.iter().find(|j| j["job"] == "wait"))
        .and_then(|j| j["worker"].as_str())
        .unwrap_or_else(|| panic!("the waiting job is not running: {page}"))
        .to_string();
    let index = (0..2)
        .find(|i| worker_id_of(&cluster.path(&format!("worker{i}.log"))) == running_on)
        .expect("the worker running the waiting job");
    let pid = cluster.workers[index].as_ref().expect("running").child.id();
    // SAFETY: signals a child process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    // Its job waits for the gate: it drains meanwhile, and says so.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = cluster.status();
        let draining = status["workers"].as_array().is_some_and(|w| {
            w.iter()
                .any(|w| w["id"] == running_on.as_str() && w["draining"] == true)
        });
        if draining {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never draining: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(&gate, "").expect("open the gate");
    let status = wait_exit(&mut cluster, index, Duration::from_secs(60));
    assert!(
        status.success(),
        "the drained worker exited {status:?}\n{}",
        cluster.logs()
    );
    let worker_log =
        std::fs::read_to_string(cluster.path(&format!("worker{index}.log"))).unwrap_or_default();
    assert!(
        worker_log.contains("drained and deregistered"),
        "{worker_log}"
    );
    std::fs::write(&gate2, "").expect("open the second gate");

    let run = finish_build_explained(build, BUILD_TIMEOUT, || cluster.logs());
    assert_eq!(run.code, Some(0), "{}\n{}", run.describe(), cluster.logs());
    // Each job ran once: nothing was lost with the worker, nothing rerun.
    let mut expected: Vec<String> = names.clone();
    expected.extend(["wait-start", "wait", "late", "join"].map(String::from));
    let mut ran = read_lines(&log);
    ran.sort();
    expected.sort();
    assert_eq!(ran, expected, "{}", cluster.logs());
    // It left the cluster.
    let status = cluster.status();
    assert_eq!(
        status["workers"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
}

#[test]
fn cluster_drain_worker_drains_one_remotely() {
    let mut cluster = HaCluster::start(1, 0, 2, 1);
    let log = cluster.path("ran.log");
    let graph = sleep_chains(2, 2, "0.1", &log);
    let run = finish_build_explained(cluster.spawn_build(&graph, &[]), BUILD_TIMEOUT, || {
        cluster.logs()
    });
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let id0 = worker_id_of(&cluster.path("worker0.log"));

    let drain = |id: &str| {
        distbuild()
            .args([
                "cluster",
                "drain-worker",
                id,
                "--wait-timeout",
                "60",
                "--coordinator",
            ])
            .arg(cluster.all_addrs())
            .args(cluster.client_flags())
            .output()
            .expect("run drain-worker")
    };
    let out = drain("no-such-worker");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not registered"),
        "{out:?}"
    );
    let out = drain(&id0);
    assert!(out.status.success(), "{out:?}\n{}", cluster.logs());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("worker {id0} left")));
    let status = wait_exit(&mut cluster, 0, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    // The other worker still builds; the outputs the drained one held for
    // the finished build were forgotten with it, not lost to a build.
    let log2 = cluster.path("ran2.log");
    let run = finish_build_explained(
        cluster.spawn_build(&sleep_chains(1, 2, "0", &log2), &[]),
        BUILD_TIMEOUT,
        || cluster.logs(),
    );
    assert_eq!(run.code, Some(0), "{}", run.describe());
}
