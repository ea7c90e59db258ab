//! Build throughput: a graph of trivial jobs on a local cluster (one
//! coordinator, one worker with a slot per CPU), against `ninja -j<CPUs>`
//! running the same commands on the same machine; then a fully cached
//! rebuild of the same graph; then the same cold build on a cluster of
//! three coordinators (every command replicated to a quorum).
//!
//! It also prints the coordinator's memory: its peak resident size during
//! the cold build over the idle size it started with, per job, and its
//! peak during the cached rebuild over the size it started that with (the
//! finished cold build and its results), per job.
//!
//! `cargo bench --bench build` (BENCH_JOBS overrides the 2,000 jobs;
//! BENCH_THREE=0 skips the three-coordinator build, BENCH_NINJA=0 ninja).
//! Under `cargo test --all-targets` it runs 20 jobs as a smoke test.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{BuildRun, Cluster, HaCluster, build_command, id, peak_rss_bytes, status_bytes};

/// Runs `command` (a `distbuild build`): the client process's time from
/// start to exit, then its run. The graph file is written before and the
/// client's event lines are parsed after, so neither, the harness's work,
/// is timed.
fn timed(mut command: Command) -> (Duration, BuildRun) {
    let started = Instant::now();
    let out = command.output().expect("run distbuild build");
    let elapsed = started.elapsed();
    (elapsed, BuildRun::from(out))
}

fn command(i: usize) -> String {
    format!("echo {i} > out")
}

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let jobs: usize = std::env::var("BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benchmarking { 2000 } else { 20 });
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());

    let cluster = Cluster::start(1, cpus as u32);
    let graph = json!({"Jobs": (0..jobs).map(|i| json!({
        "ID": id(&format!("bench job {i}")),
        "Name": format!("job {i}"),
        "Cmds": [{"Exec": ["/bin/sh", "-c", command(i)], "WorkingDirectory": "{{.OutputDir}}"}],
    })).collect::<Vec<_>>()});

    let graph_path = cluster.path("graph.json");
    std::fs::write(&graph_path, graph.to_string()).expect("write the graph");
    let client = || {
        let mut command = build_command(
            &graph_path,
            &cluster.path("nosrc"),
            &cluster.coordinator_addr(),
            &[],
        );
        command.args(cluster.client_flags());
        command
    };
    let coordinator_pid = cluster.coordinator.as_ref().expect("running").child.id();
    let idle_rss = status_bytes(coordinator_pid, "VmRSS").expect("coordinator alive");
    let (cold, run) = timed(client());
    let peak_rss = peak_rss_bytes(coordinator_pid);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(
        run.events.iter().filter(|e| e["cached"] == false).count(),
        jobs
    );

    // The cached rebuild's own peak, over what the coordinator holds when
    // it starts (the finished cold build, its results): `5` in
    // `clear_refs` resets the process's peak resident size to its current.
    let before_cached_rss = status_bytes(coordinator_pid, "VmRSS").expect("coordinator alive");
    let reset = std::fs::write(format!("/proc/{coordinator_pid}/clear_refs"), "5").is_ok();
    let (cached, run) = timed(client());
    let cached_peak_rss = reset.then(|| peak_rss_bytes(coordinator_pid));
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(
        run.events.iter().filter(|e| e["cached"] == true).count(),
        jobs
    );

    drop(cluster);
    let enabled = |name: &str| std::env::var(name).map_or(true, |v| v != "0");
    let replicated = enabled("BENCH_THREE").then(|| {
        let three = HaCluster::start(3, 0, 1, cpus as u32);
        let (replicated, run) = timed(three.build_command(&graph, &[]));
        assert_eq!(run.code, Some(0), "{}", run.describe());
        replicated
    });

    let rate = |d: Duration| jobs as f64 / d.as_secs_f64();
    println!("build: {jobs} trivial jobs, 1 worker with {cpus} slots");
    println!(
        "  distbuild cold:   {:>8.2} s  {:>8.0} jobs/s",
        cold.as_secs_f64(),
        rate(cold)
    );
    println!(
        "  distbuild cached: {:>8.2} s  {:>8.0} jobs/s",
        cached.as_secs_f64(),
        rate(cached)
    );
    println!(
        "  per job (cold):   {:>8.2} ms",
        cold.as_secs_f64() * 1000.0 / jobs as f64
    );
    println!(
        "  coordinator:      {:>8.1} MiB peak resident, {:.2} KiB per job over the idle {:.1} MiB",
        peak_rss as f64 / (1 << 20) as f64,
        peak_rss.saturating_sub(idle_rss) as f64 / 1024.0 / jobs as f64,
        idle_rss as f64 / (1 << 20) as f64
    );
    match cached_peak_rss {
        Some(peak) => println!(
            "  cached rebuild:   {:>8.1} MiB peak resident, {:.2} KiB per job over the {:.1} MiB it started at",
            peak as f64 / (1 << 20) as f64,
            peak.saturating_sub(before_cached_rss) as f64 / 1024.0 / jobs as f64,
            before_cached_rss as f64 / (1 << 20) as f64
        ),
        None => println!("  cached rebuild:   peak not measured (no /proc/PID/clear_refs)"),
    }
    if let Some(replicated) = replicated {
        println!(
            "  3 coordinators:   {:>8.2} s  {:>8.0} jobs/s  ({:.2}x the time of 1 coordinator)",
            replicated.as_secs_f64(),
            rate(replicated),
            replicated.as_secs_f64() / cold.as_secs_f64()
        );
    }
    if !enabled("BENCH_NINJA") {
        return;
    }
    let scratch = tempfile::tempdir().expect("tempdir");
    match ninja(jobs, cpus, &scratch.path().join("ninja")) {
        Some(ninja) => println!(
            "  ninja -j{cpus}:        {:>8.2} s  {:>8.0} jobs/s  (distbuild cold / ninja: {:.2}x the time)",
            ninja.as_secs_f64(),
            rate(ninja),
            cold.as_secs_f64() / ninja.as_secs_f64()
        ),
        None => println!("  ninja: not installed (scripts/run.sh installs ninja-build)"),
    }
}

/// Runs the same commands under ninja, each in its own directory; None if
/// ninja is missing.
fn ninja(jobs: usize, cpus: usize, dir: &std::path::Path) -> Option<Duration> {
    Command::new("ninja").arg("--version").output().ok()?;
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut file =
        String::from("rule run\n  command = mkdir -p $dir && cd $dir && /bin/sh -c '$cmd'\n\n");
    for i in 0..jobs {
        file += &format!(
            "build j{i}/out: run\n  dir = j{i}\n  cmd = {}\n",
            command(i)
        );
    }
    std::fs::write(dir.join("build.ninja"), file).expect("write build.ninja");
    let started = Instant::now();
    let status = Command::new("ninja")
        .arg(format!("-j{cpus}"))
        .arg("--quiet")
        .current_dir(dir)
        .status()
        .expect("run ninja");
    let elapsed = started.elapsed();
    assert!(status.success(), "ninja failed");
    Some(elapsed)
}
