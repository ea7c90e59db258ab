//! Append benchmark: entries per second and append latency (to durable) of
//! raft-store's log, beside the raw fdatasync rate of the same disk.
//!
//! `cargo bench -p distbuild-raft-store --bench append`
//! Environment: `BENCH_DIR` (default: cargo's target tmp dir, which is on the
//! disk the build uses), `BENCH_SCALE` (multiplies the operation counts).
//!
//! Scenarios, each measured in the same run on the same directory:
//! - fdatasync: write 128 bytes to a file and fdatasync it, in a loop (the
//!   ceiling for anything that makes each write durable before the next);
//! - append x1: one 1-entry append at a time, waiting until it is durable;
//! - append x64: one 64-entry append at a time, waiting until durable;
//! - pipelined x1: 1-entry appends with up to 64 in flight, as openraft
//!   issues them under load; the flusher's group commit shares fsyncs.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use openraft::storage::RaftLogStorageExt;
use openraft::{Entry, EntryPayload};
use support::{Command, TestConfig};

const ENTRY_PAYLOAD_BYTES: usize = 100;

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and
    // then every scenario runs briefly, as a smoke test of the benchmark.
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let scale: f64 = std::env::var("BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if benchmarking { 1.0 } else { 0.01 });
    let count = |n: f64| ((n * scale) as usize).max(10);
    let base = std::env::var_os("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&base).expect("create the bench directory");
    let dir = tempfile::TempDir::new_in(&base).expect("create a directory for the bench");
    println!(
        "directory: {} (same disk for every scenario)",
        dir.path().display()
    );
    println!(
        "{:<24} {:>10} {:>14} {:>12} {:>12}",
        "scenario", "ops", "entries/s", "p50", "p99"
    );

    let fsync = fdatasync_rate(dir.path(), count(2000.0));
    fsync.print("fdatasync (128 B write)");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime");
    runtime.block_on(async {
        let store_dir = dir.path().join("store");
        let (mut log, _sm) = support::open(&store_dir).expect("open the store");
        let mut next_index = 1u64;

        let single = sequential_appends(&mut log, &mut next_index, count(2000.0), 1).await;
        single.print("append x1 (sequential)");
        let batched = sequential_appends(&mut log, &mut next_index, count(300.0), 64).await;
        batched.print("append x64 (sequential)");
        let pipelined = pipelined_appends(&mut log, &mut next_index, count(20000.0), 64);
        pipelined.print("append x1 (64 in flight)");

        println!();
        println!(
            "ratios to fdatasync/s: append x1 {:.2}, append x64 {:.1}, pipelined x1 {:.1}",
            single.entries_per_sec / fsync.entries_per_sec,
            batched.entries_per_sec / fsync.entries_per_sec,
            pipelined.entries_per_sec / fsync.entries_per_sec,
        );
    });
}

struct Result {
    ops: usize,
    entries_per_sec: f64,
    p50: Duration,
    p99: Duration,
}

impl Result {
    fn new(entries: usize, elapsed: Duration, mut latencies: Vec<Duration>) -> Self {
        latencies.sort();
        let pick = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
        Self {
            ops: latencies.len(),
            entries_per_sec: entries as f64 / elapsed.as_secs_f64(),
            p50: pick(0.50),
            p99: pick(0.99),
        }
    }

    fn print(&self, name: &str) {
        println!(
            "{:<24} {:>10} {:>14.0} {:>12?} {:>12?}",
            name, self.ops, self.entries_per_sec, self.p50, self.p99
        );
    }
}

fn fdatasync_rate(dir: &Path, n: usize) -> Result {
    let mut file = std::fs::File::create(dir.join("fsync-probe")).expect("create the probe file");
    let payload = [0x5au8; 128];
    let mut latencies = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        file.write_all(&payload).expect("write");
        file.sync_data().expect("fdatasync");
        latencies.push(t.elapsed());
    }
    Result::new(n, start.elapsed(), latencies)
}

fn entry(index: u64) -> Entry<TestConfig> {
    Entry {
        log_id: support::log_id(1, index),
        payload: EntryPayload::Normal(Command::Put {
            key: index.to_be_bytes().to_vec(),
            value: vec![0xa5; ENTRY_PAYLOAD_BYTES],
        }),
    }
}

async fn sequential_appends(
    log: &mut distbuild_raft_store::LogStore<TestConfig>,
    next_index: &mut u64,
    n_appends: usize,
    batch: usize,
) -> Result {
    let mut latencies = Vec::with_capacity(n_appends);
    let start = Instant::now();
    for _ in 0..n_appends {
        let entries: Vec<_> = (0..batch as u64).map(|i| entry(*next_index + i)).collect();
        *next_index += batch as u64;
        let t = Instant::now();
        log.blocking_append(entries).await.expect("append");
        latencies.push(t.elapsed());
    }
    Result::new(n_appends * batch, start.elapsed(), latencies)
}

fn pipelined_appends(
    log: &mut distbuild_raft_store::LogStore<TestConfig>,
    next_index: &mut u64,
    n_appends: usize,
    max_in_flight: usize,
) -> Result {
    let (done_tx, done_rx) = mpsc::channel::<(Instant, std::io::Result<()>)>();
    let mut latencies = Vec::with_capacity(n_appends);
    let mut in_flight = 0usize;
    let start = Instant::now();
    let wait_one = |latencies: &mut Vec<Duration>| {
        let (issued, result) = done_rx.recv().expect("completion");
        result.expect("append durable");
        latencies.push(issued.elapsed());
    };
    for _ in 0..n_appends {
        if in_flight == max_in_flight {
            wait_one(&mut latencies);
            in_flight -= 1;
        }
        let issued = Instant::now();
        let tx = done_tx.clone();
        log.append_with_completion([entry(*next_index)], move |r| {
            let _ = tx.send((issued, r));
        })
        .expect("append");
        *next_index += 1;
        in_flight += 1;
    }
    while in_flight > 0 {
        wait_one(&mut latencies);
        in_flight -= 1;
    }
    Result::new(n_appends, start.elapsed(), latencies)
}
