//! A workspace of many source files, against ninja: what a build costs
//! when nothing or one file changed. 20,000 files of 8 KiB (160 MB, 40
//! directories), 200 jobs each reading 100 of them (`echo <i> > out`: the
//! build is all checking, no work). One coordinator, one worker with a
//! slot per CPU.
//!
//! Three configurations take turns in each round (each going first in
//! every third round): distbuild with its digest cache (the default: a
//! source whose stat is unchanged is not read), distbuild with
//! `--digest-cache=false` (every source read and hashed), and ninja
//! (`ninja -j<CPUs>` on the same commands, each edge's 100 files as
//! implicit inputs: it stats them). Each round times
//! - a build with nothing changed (distbuild: every job cached; ninja:
//!   nothing to do);
//! - a build after one source file is edited (a line appended to the
//!   round's file just before each configuration's build, so each reruns
//!   one job).
//!
//! The client's time is timed, from its start to its exit; the first
//! (cold) builds are not counted.
//!
//! `cargo bench --bench sources` (BENCH_ROUNDS overrides the 5 rounds,
//! BENCH_FILES the 20,000 files). Under `cargo test --all-targets` it is
//! a smoke test: 400 files, 4 jobs, one round.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};
use support::{BuildRun, Cluster, build_command, id};

/// Files per job; each file is one job's input.
const FILES_PER_JOB: usize = 100;
/// Bytes per source file.
const FILE_BYTES: usize = 8 << 10;
/// As the jobs a build must run: any number (not checked).
const ANY: usize = usize::MAX;

fn file(i: usize) -> String {
    format!("d{}/f{i}.c", i / 500)
}

fn write_sources(src: &Path, files: usize) {
    for i in 0..files {
        let path = src.join(file(i));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        let line = format!("int x{i};\n");
        let body = line.repeat(FILE_BYTES / line.len() + 1);
        std::fs::write(path, &body.as_bytes()[..FILE_BYTES]).expect("write a source");
    }
}

fn graph(files: usize) -> Value {
    let sources: serde_json::Map<String, Value> = (0..files)
        .map(|i| (id(&format!("file {i}")), json!(file(i))))
        .collect();
    let jobs: Vec<Value> = (0..files / FILES_PER_JOB)
        .map(|j| {
            json!({
                "ID": id(&format!("job {j}")),
                "Name": format!("job {j}"),
                "Inputs": (j * FILES_PER_JOB..(j + 1) * FILES_PER_JOB).map(file).collect::<Vec<_>>(),
                "Cmds": [{"Exec": ["/bin/sh", "-c", format!("echo {j} > out")],
                          "WorkingDirectory": "{{.OutputDir}}"}],
            })
        })
        .collect();
    json!({"SourceFiles": sources, "Jobs": jobs})
}

fn ninja_manifest(files: usize, src: &Path) -> String {
    let mut manifest = String::from("rule sh\n  command = echo $n > $out\n");
    for j in 0..files / FILES_PER_JOB {
        let inputs: Vec<String> = (j * FILES_PER_JOB..(j + 1) * FILES_PER_JOB)
            .map(|i| format!("{}/{}", src.display(), file(i)))
            .collect();
        manifest += &format!("build out/{j}: sh | {}\n  n = {j}\n", inputs.join(" "));
    }
    manifest
}

/// Appends a line to source file `i`: one job's input changes.
fn edit(src: &Path, i: usize, tag: &str) {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(src.join(file(i)))
        .expect("open a source");
    writeln!(f, "/* {tag} */").expect("append");
}

fn median(list: &mut [f64]) -> f64 {
    list.sort_by(f64::total_cmp);
    list[list.len() / 2]
}

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let env = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rounds = env("BENCH_ROUNDS", if benchmarking { 5 } else { 1 });
    let files = env("BENCH_FILES", if benchmarking { 20_000 } else { 400 });
    let jobs = files / FILES_PER_JOB;
    assert!(jobs > 0, "BENCH_FILES is at least {FILES_PER_JOB}");
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());

    let cluster = Cluster::start(1, cpus as u32);
    let src = cluster.path("src");
    write_sources(&src, files);
    let graph_path = cluster.path("graph.json");
    std::fs::write(&graph_path, graph(files).to_string()).expect("write the graph");
    let base = cluster.path("output-base");
    let distbuild = |cache: bool, ran: usize, what: &str| -> f64 {
        let flag = format!("--digest-cache={cache}");
        let args = [
            "--output-base",
            base.to_str().expect("utf-8"),
            flag.as_str(),
        ];
        let mut command: Command =
            build_command(&graph_path, &src, &cluster.coordinator_addr(), &args);
        command.args(cluster.client_flags());
        let started = Instant::now();
        let out = command.output().expect("run distbuild build");
        let took = started.elapsed().as_secs_f64();
        let run = BuildRun::from(out);
        assert_eq!(run.code, Some(0), "{what}: {}", run.describe());
        let finished: Vec<&Value> = run
            .events
            .iter()
            .filter(|e| e["event"] == "job_finished")
            .collect();
        assert_eq!(finished.len(), jobs, "{what}: every job reported");
        let rerun = finished.iter().filter(|e| e["cached"] == false).count();
        if ran != ANY {
            assert_eq!(rerun, ran, "{what}: jobs run");
        }
        took
    };
    let ninja_dir = cluster.path("ninja");
    std::fs::create_dir_all(&ninja_dir).expect("mkdir");
    std::fs::write(ninja_dir.join("build.ninja"), ninja_manifest(files, &src))
        .expect("write build.ninja");
    let have_ninja = Command::new("ninja").arg("--version").output().is_ok();
    let ninja = |ran: usize, what: &str| -> Option<f64> {
        if !have_ninja {
            return None;
        }
        let started = Instant::now();
        let out = Command::new("ninja")
            .args(["-j", &cpus.to_string()])
            .current_dir(&ninja_dir)
            .output()
            .expect("run ninja");
        let took = started.elapsed().as_secs_f64();
        assert!(out.status.success(), "{what}: ninja failed: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let edges = text.lines().filter(|l| l.starts_with('[')).count();
        if ran != ANY {
            assert_eq!(edges, ran, "{what}: ninja's edges run: {text}");
        }
        Some(took)
    };

    // Cold builds, not counted; the second distbuild build remembers the
    // sources, settled by then (the cache keeps only files whose times
    // are two seconds old when hashed).
    distbuild(true, jobs, "cold");
    ninja(jobs, "ninja cold");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    distbuild(true, 0, "warm-up");

    // [nothing changed, one file edited] × [cache, no cache, ninja].
    let mut times: [[Vec<f64>; 3]; 2] = Default::default();
    for round in 0..rounds {
        for (change, table) in times.iter_mut().enumerate() {
            for turn in 0..3 {
                let config = (round + turn) % 3;
                let edits = usize::from(change == 1);
                if change == 1 {
                    // The same file for each: one job's input, whoever built last.
                    let i = (round * 7919 + 13) % files;
                    edit(&src, i, &format!("round {round} configuration {config}"));
                }
                let what = format!("round {round}, change {change}, configuration {config}");
                let took = match config {
                    0 => Some(distbuild(true, edits, &what)),
                    1 => Some(distbuild(false, edits, &what)),
                    _ => ninja(edits, &what),
                };
                if let Some(took) = took {
                    table[config].push(took);
                }
            }
        }
        // Whoever built before the last edit has not seen it: both catch
        // up, untimed, so the next round starts with nothing changed.
        distbuild(true, ANY, "catching up");
        ninja(ANY, "ninja catching up");
    }

    println!(
        "sources: {files} files of {FILE_BYTES} bytes, {jobs} jobs of {FILES_PER_JOB} inputs, \
         one worker with {cpus} slots against ninja -j{cpus}; medians of {rounds} rounds"
    );
    for (change, table) in times.iter_mut().enumerate() {
        let what = ["nothing changed", "one file edited"][change];
        let cached = median(&mut table[0]);
        let hashed = median(&mut table[1]);
        let ninja = (!table[2].is_empty()).then(|| median(&mut table[2]));
        let against = |t: f64| ninja.map_or("-".to_string(), |n| format!("{:.2}x", t / n));
        println!(
            "  {what:<16} digest cache {:>7.1} ms ({} ninja)   every file hashed {:>7.1} ms ({} ninja)   ninja {}   cache / no cache {:.2}x",
            cached * 1e3,
            against(cached),
            hashed * 1e3,
            against(hashed),
            ninja.map_or("-".to_string(), |n| format!("{:.1} ms", n * 1e3)),
            cached / hashed
        );
    }
}
