//! Locality: bytes transferred between workers for the same build with the
//! scheduler's locality preference on (the default 50 ms wait for a worker
//! holding a job's inputs) and off (`--locality-wait-ms 0`: any free worker
//! takes any ready job).
//!
//! The graph: independent chains; each step copies its predecessor's
//! artifact (several MiB) and appends to it. Four one-slot workers, more
//! than there are chains, so idle workers are always polling when a step
//! becomes ready: without locality they race the worker that holds the
//! input. Every dependency artifact fetched from another worker counts.
//!
//! `cargo bench --bench locality`. Under `cargo test --all-targets` it runs
//! a smaller graph as a smoke test.

#[path = "../tests/support/mod.rs"]
mod support;

use serde_json::{Value, json};
use support::{Cluster, id};

const WORKERS: usize = 4;

fn graph(chains: usize, length: usize, mib: usize, salt: &str) -> Value {
    let mut jobs = Vec::new();
    for c in 0..chains {
        for step in 0..length {
            let name = format!("{salt} chain {c} step {step}");
            let script = if step == 0 {
                format!(
                    "head -c {} /dev/zero | tr '\\0' '{c}' > {{{{.OutputDir}}}}/blob",
                    mib << 20
                )
            } else {
                let prev = id(&format!("{salt} chain {c} step {}", step - 1));
                format!(
                    "cp {{{{index .Deps \"{prev}\"}}}}/blob {{{{.OutputDir}}}}/blob && echo {step} >> {{{{.OutputDir}}}}/blob"
                )
            };
            let deps: Vec<String> = if step == 0 {
                Vec::new()
            } else {
                vec![id(&format!("{salt} chain {c} step {}", step - 1))]
            };
            jobs.push(json!({
                "ID": id(&name),
                "Name": name,
                "Deps": deps,
                "Cmds": [{"Exec": ["/bin/sh", "-c", script]}],
            }));
        }
    }
    json!({"Jobs": jobs})
}

/// Runs the graph on a fresh cluster; returns the bytes workers fetched
/// from each other, and the build's wall time.
fn measure(flags: &[&str], graph: &Value) -> (u64, std::time::Duration) {
    let cluster = Cluster::start_with(WORKERS, 1, flags);
    let started = std::time::Instant::now();
    let run = cluster.build(graph, &cluster.path("nosrc"), &[]);
    let elapsed = started.elapsed();
    assert_eq!(run.code, Some(0), "{}", run.describe());
    // Heartbeats carry the counters; wait until two in a row agree.
    let mut last = None;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let total: u64 = cluster.status()["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| w["peer_bytes_fetched_total"].as_u64().unwrap_or(0))
            .sum();
        if last == Some(total) {
            return (total, elapsed);
        }
        last = Some(total);
    }
}

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let (chains, length, artifact_mib) = if benchmarking { (2, 20, 4) } else { (2, 3, 1) };
    let g = graph(chains, length, artifact_mib, "locality");
    let (with, with_time) = measure(&[], &g);
    let (without, without_time) = measure(&["--locality-wait-ms", "0"], &g);
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "locality: {chains} chains of {length} steps, {artifact_mib} MiB artifacts, {WORKERS} one-slot workers"
    );
    println!(
        "  locality on  (50 ms wait): {:>8.1} MiB between workers, build {:.2} s",
        mib(with),
        with_time.as_secs_f64()
    );
    println!(
        "  locality off (0 ms wait):  {:>8.1} MiB between workers, build {:.2} s",
        mib(without),
        without_time.as_secs_f64()
    );
    if without > 0 {
        println!("  on/off: {:.2}x the bytes", with as f64 / without as f64);
    }
}
