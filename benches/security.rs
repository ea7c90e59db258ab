//! What TLS and the job sandbox cost per job: the build benchmark's
//! trivial jobs (`echo i > out`, one coordinator, one worker with a slot
//! per CPU) on four clusters — plain TCP without a sandbox, TLS without,
//! plain with the sandbox, TLS with — in rounds, each round's commands new
//! (nothing cached), the clusters taking turns so machine noise falls on
//! all of them. Prints each configuration's median time per job and its
//! ratio to the first.
//!
//! `cargo bench --bench security` (BENCH_JOBS overrides the 2,000 jobs,
//! BENCH_ROUNDS the 3 rounds). Under `cargo test --all-targets` it runs
//! 10 jobs once as a smoke test.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{Cluster, id};

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let jobs = env("BENCH_JOBS", if benchmarking { 2000 } else { 10 });
    let rounds = env("BENCH_ROUNDS", if benchmarking { 3 } else { 1 });
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as u32;

    let configs: [(&str, bool, &[&str]); 4] = [
        ("plain TCP, no sandbox", false, &["--sandbox", "none"]),
        ("TLS, no sandbox", true, &["--sandbox", "none"]),
        ("plain TCP, sandbox", false, &["--sandbox", "namespaces"]),
        ("TLS, sandbox", true, &["--sandbox", "namespaces"]),
    ];
    let clusters: Vec<Cluster> = configs
        .iter()
        .map(|(_, tls, worker_flags)| Cluster::start_full(1, cpus, &[], worker_flags, *tls))
        .collect();
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        for (which, cluster) in clusters.iter().enumerate() {
            let graph = json!({"Jobs": (0..jobs).map(|i| json!({
                "ID": id(&format!("job {i}")),
                "Name": format!("job {i}"),
                "Cmds": [{"Exec": ["/bin/sh", "-c", format!("echo {round} {i} > out")],
                          "WorkingDirectory": "{{.OutputDir}}"}],
            })).collect::<Vec<_>>()});
            let started = Instant::now();
            let run = cluster.build(&graph, &cluster.path("nosrc"), &[]);
            times[which].push(started.elapsed());
            assert_eq!(run.code, Some(0), "{}", run.describe());
            assert_eq!(
                run.events.iter().filter(|e| e["cached"] == false).count(),
                jobs,
                "every job ran"
            );
        }
    }
    let median = |list: &[Duration]| {
        let mut sorted = list.to_vec();
        sorted.sort();
        sorted[sorted.len() / 2]
    };
    let per_job_ms = |d: Duration| d.as_secs_f64() * 1000.0 / jobs as f64;
    let base = median(&times[0]);
    println!("security cost: {jobs} trivial jobs, 1 worker with {cpus} slots, median of {rounds}");
    for ((name, ..), list) in configs.iter().zip(&times) {
        let m = median(list);
        let all: Vec<String> = list
            .iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect();
        println!(
            "  {name:<24} {:>7.2} s  {:>6.2} ms/job  {:.2}x  (runs: {} s)",
            m.as_secs_f64(),
            per_job_ms(m),
            m.as_secs_f64() / base.as_secs_f64(),
            all.join(", ")
        );
    }
}
