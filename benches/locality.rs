//! Locality: bytes transferred between workers for the same build with the
//! scheduler's locality preference on (the default 50 ms wait for a worker
//! holding a job's inputs) and off (`--locality-wait-ms 0`: any free worker
//! takes any ready job).
//!
//! The graph: `PRODUCERS` jobs each write a `PRODUCER_MIB` MiB artifact;
//! each has `CONSUMERS` dependents that read it. Four workers, one slot
//! each. Every dependency artifact fetched from another worker counts.
//!
//! `cargo bench --bench locality`. Under `cargo test --all-targets` it runs
//! a smaller graph as a smoke test.

#[path = "../tests/support/mod.rs"]
mod support;

use serde_json::{Value, json};
use support::{Cluster, id};

const WORKERS: usize = 4;

fn graph(producers: usize, consumers: usize, mib: usize, salt: &str) -> Value {
    let mut jobs = Vec::new();
    for p in 0..producers {
        let producer = format!("{salt} producer {p}");
        jobs.push(json!({
            "ID": id(&producer),
            "Name": producer,
            "Cmds": [{"Exec": ["/bin/sh", "-c",
                format!("head -c {} /dev/zero | tr '\\0' '{p}' > {{{{.OutputDir}}}}/blob", mib << 20)]}],
        }));
        for c in 0..consumers {
            let consumer = format!("{salt} consumer {p}.{c}");
            jobs.push(json!({
                "ID": id(&consumer),
                "Name": consumer,
                "Deps": [id(&producer)],
                "Cmds": [{"Exec": ["/bin/sh", "-c",
                    format!("wc -c < {{{{index .Deps \"{}\"}}}}/blob > {{{{.OutputDir}}}}/n", id(&producer))]}],
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
    let (producers, consumers, artifact_mib) = if benchmarking { (16, 4, 4) } else { (2, 2, 1) };
    let g = graph(producers, consumers, artifact_mib, "locality");
    let (with, with_time) = measure(&[], &g);
    let (without, without_time) = measure(&["--locality-wait-ms", "0"], &g);
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "locality: {producers} producers x {consumers} consumers, {artifact_mib} MiB artifacts, {WORKERS} one-slot workers"
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
