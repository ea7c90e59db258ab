//! Soak: 200 builds in a row on one local cluster (one coordinator, one
//! worker), each uploading a fresh 1 MiB source and producing a fresh
//! 1 MiB output, with the source retention set short (1 s, collection every
//! 250 ms). The coordinator's disk use (its whole data dir: Raft log,
//! state, blobs) and resident memory are sampled after builds 50, 100 and
//! 200: with collection they stay flat after the retention window instead
//! of growing with every build.
//!
//! `cargo bench --bench soak` (BENCH_BUILDS overrides the 200,
//! BENCH_RETENTION_SECS the retention). Under
//! `cargo test --all-targets` it runs 6 builds as a smoke test.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use support::{Cluster, disk_bytes, graph, sh_job, status_bytes};

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let builds: usize = std::env::var("BENCH_BUILDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benchmarking { 200 } else { 6 });
    let checkpoints: Vec<usize> = [builds / 4, builds / 2, builds].into();
    // BENCH_RETENTION_SECS=1000000 runs the same builds without collection
    // (the comparison the README quotes).
    let retention = std::env::var("BENCH_RETENTION_SECS").unwrap_or_else(|_| "1".into());
    let cluster = Cluster::start_with(
        1,
        2,
        &[
            "--blob-retention",
            &retention,
            "--gc-interval-ms",
            "250",
            "--blob-sweep-grace",
            "1",
        ],
    );
    let pid = cluster.coordinator.as_ref().expect("running").child.id();
    let data = cluster.path("coordinator");
    let src = cluster.path("src");
    std::fs::create_dir_all(&src).expect("src dir");

    let started = Instant::now();
    let mut samples = Vec::new();
    for n in 1..=builds {
        // 1 MiB that no earlier build had: a fresh blob, a fresh output.
        let line = format!("build {n:08}\n");
        let content = line.repeat((1 << 20) / line.len());
        std::fs::write(src.join("input.txt"), content).expect("write the source");
        let g = graph(
            &["input.txt"],
            vec![sh_job(
                &format!("copy {n}"),
                &["input.txt"],
                &[],
                &["cat {{.SourceDir}}/input.txt > {{.OutputDir}}/copy"],
            )],
        );
        let run = cluster.build(&g, &src, &[]);
        assert_eq!(run.code, Some(0), "build {n}: {}", run.describe());
        if checkpoints.contains(&n) {
            let rss = status_bytes(pid, "VmRSS").expect("the coordinator runs");
            samples.push((n, started.elapsed(), disk_bytes(&data), rss));
        }
    }

    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "soak: {builds} builds, each a fresh 1 MiB source and output; retention {retention} s"
    );
    println!("  after build   elapsed    coordinator disk   coordinator RSS");
    for (n, elapsed, disk, rss) in &samples {
        println!(
            "  {n:>11} {:>9.1} s {:>14.1} MiB {:>13.1} MiB",
            elapsed.as_secs_f64(),
            mib(*disk),
            mib(*rss)
        );
    }
    println!("  (without collection the sources alone would be {builds} MiB on the coordinator)");
}
