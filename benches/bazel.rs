//! Bazel (Debian's 4.2.3) building a real C project — zlib, as the
//! `libz-sys` crate in the cargo registry bundles it: 15 compiles, the
//! archive, a small round-trip program linked against it and a genrule
//! running it, optimized (`-c opt`) — locally (`--jobs=2`, linux-sandbox) against remotely on
//! distbuild (`--remote_executor`, one worker with a slot per CPU) with one
//! coordinator and with three. Each round builds with a new
//! `--copt` and `--host_copt` of `-DBENCH_ROUND=<n>`, so every action is new ("cold"), then
//! `bazel clean` and the same build again ("cached": remote cache hits,
//! or local disk cache hits for the local build with `--disk_cache`). The
//! configurations take turns within a round so machine noise falls on all
//! of them; prints medians and ratios to the local cold build.
//!
//! `cargo bench --bench bazel` (BENCH_ROUNDS overrides the 3 rounds).
//! Under `cargo test --all-targets` it runs one round of the remote
//! configuration on one coordinator as a smoke test.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::{Cluster, HaCluster};

/// zlib's sources in the cargo registry (a dependency of the workspace,
/// so present wherever it builds).
fn zlib_sources() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cargo"));
    let registry = home.join("registry/src");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&registry)
        .expect("the cargo registry")
        .flatten()
        .flat_map(|index| {
            std::fs::read_dir(index.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|crate_dir| crate_dir.path().join("src/zlib"))
        .filter(|zlib| {
            zlib.join("deflate.c").exists()
                && zlib
                    .parent()
                    .and_then(|p| p.parent())
                    .and_then(|p| p.file_name())
                    .is_some_and(|n| n.to_string_lossy().starts_with("libz-sys-"))
        })
        .collect();
    found.sort();
    found.pop().expect("libz-sys's zlib in the cargo registry")
}

const ROUNDTRIP: &str = r#"#include <stdio.h>
#include <string.h>
#include "zlib.h"
int main(void) {
  const char *text = "distbuild builds zlib with Bazel, remotely and locally";
  unsigned char packed[256], unpacked[256];
  uLongf packed_len = sizeof packed, unpacked_len = sizeof unpacked;
  if (compress(packed, &packed_len, (const Bytef *)text, strlen(text)) != Z_OK) return 1;
  if (uncompress(unpacked, &unpacked_len, packed, packed_len) != Z_OK) return 2;
  printf("%.*s\n", (int)unpacked_len, unpacked);
  return 0;
}
"#;

/// A workspace building zlib and running the round-trip program.
fn workspace(dir: &Path) {
    let zlib = zlib_sources();
    std::fs::create_dir_all(dir.join("zlib")).expect("mkdir");
    let mut sources = Vec::new();
    let mut headers = Vec::new();
    for entry in std::fs::read_dir(&zlib).expect("zlib").flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".c") || name.ends_with(".h") {
            std::fs::copy(entry.path(), dir.join("zlib").join(&name)).expect("copy");
            if name.ends_with(".c") {
                sources.push(name);
            } else if name != "zlib.h" && name != "zconf.h" {
                headers.push(name);
            }
        }
    }
    sources.sort();
    headers.sort();
    let quoted = |names: &[String]| {
        names
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    std::fs::write(dir.join("WORKSPACE"), "workspace(name = \"bench\")\n").expect("write");
    std::fs::write(
        dir.join("zlib/BUILD"),
        format!(
            r#"cc_library(
    name = "zlib",
    srcs = [{}, {}],
    hdrs = ["zlib.h", "zconf.h"],
    copts = ["-DHAVE_UNISTD_H", "-w"],
    includes = ["."],
    visibility = ["//visibility:public"],
)
"#,
            quoted(&sources),
            quoted(&headers)
        ),
    )
    .expect("write");
    std::fs::write(dir.join("roundtrip.c"), ROUNDTRIP).expect("write");
    std::fs::write(
        dir.join("BUILD"),
        r#"cc_binary(name = "roundtrip", srcs = ["roundtrip.c"], deps = ["//zlib"])
genrule(
    name = "check",
    outs = ["check.txt"],
    tools = [":roundtrip"],
    cmd = "$(location :roundtrip) > $@",
)
"#,
    )
    .expect("write");
}

fn bazel(root: &Path, workspace: &Path, args: &[String]) -> Output {
    Command::new("bazel")
        .arg(format!("--output_user_root={}", root.display()))
        .args(args)
        .current_dir(workspace)
        .output()
        .expect("run bazel")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// One configuration: its own workspace, output root and flags.
struct Config {
    name: &'static str,
    root: PathBuf,
    workspace: PathBuf,
    flags: Vec<String>,
    cold: Vec<Duration>,
    cached: Vec<Duration>,
}

impl Config {
    fn new(name: &'static str, dir: &Path, flags: Vec<String>) -> Config {
        let workspace = dir.join(format!("ws-{}", name.replace(' ', "-")));
        self::workspace(&workspace);
        Config {
            name,
            root: dir.join(format!("root-{}", name.replace(' ', "-"))),
            workspace,
            flags,
            cold: Vec::new(),
            cached: Vec::new(),
        }
    }

    /// Builds `//:check` for round `round`; its time.
    fn build(&self, round: usize) -> Duration {
        let mut args = vec![
            "build".to_string(),
            "--jobs=2".to_string(),
            "--compilation_mode=opt".to_string(),
        ];
        args.extend(self.flags.iter().cloned());
        // The genrule's tool is built for the exec platform, which takes
        // --host_copt, not --copt.
        args.push(format!("--copt=-DBENCH_ROUND={round}"));
        args.push(format!("--host_copt=-DBENCH_ROUND={round}"));
        args.push("//:check".into());
        let started = Instant::now();
        let out = bazel(&self.root, &self.workspace, &args);
        let took = started.elapsed();
        assert!(out.status.success(), "{}: {}", self.name, text(&out));
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            for line in text(&out)
                .lines()
                .filter(|l| l.contains("processes:") || l.contains("Elapsed"))
            {
                println!("  {} round {round}: {line}", self.name);
            }
        }
        let check = std::fs::read_to_string(self.workspace.join("bazel-bin/check.txt"))
            .expect("the genrule's output");
        assert_eq!(
            check,
            "distbuild builds zlib with Bazel, remotely and locally\n"
        );
        took
    }

    fn round(&mut self, round: usize) {
        let clean = bazel(&self.root, &self.workspace, &["clean".to_string()]);
        assert!(clean.status.success(), "{}", text(&clean));
        self.cold.push(self.build(round));
        let clean = bazel(&self.root, &self.workspace, &["clean".to_string()]);
        assert!(clean.status.success(), "{}", text(&clean));
        self.cached.push(self.build(round));
    }
}

impl Drop for Config {
    fn drop(&mut self) {
        let _ = bazel(&self.root, &self.workspace, &["shutdown".to_string()]);
    }
}

fn median(list: &[Duration]) -> Duration {
    let mut sorted = list.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benchmarking { 3 } else { 1 });
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as u32;
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/bazel/offline-rules.sh");
    let out = Command::new("bash")
        .arg(&rules)
        .arg(dir.path().join("rules"))
        .output()
        .expect("offline-rules.sh");
    assert!(out.status.success(), "{}", text(&out));
    let offline: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let with = |extra: &[String]| {
        let mut flags = offline.clone();
        flags.extend(extra.iter().cloned());
        flags
    };

    let one = Cluster::start(1, cpus);
    let remote = |addr: String| {
        vec![
            format!("--remote_executor=grpc://{addr}"),
            "--remote_local_fallback=false".to_string(),
        ]
    };
    let mut configs = Vec::new();
    let mut three = None;
    if benchmarking {
        configs.push(Config::new(
            "local",
            dir.path(),
            with(&[
                "--spawn_strategy=linux-sandbox".to_string(),
                format!("--disk_cache={}", dir.path().join("disk-cache").display()),
            ]),
        ));
    }
    configs.push(Config::new(
        "remote 1 coordinator",
        dir.path(),
        with(&remote(one.coordinator_addr())),
    ));
    if benchmarking {
        let cluster = HaCluster::start(3, 0, 1, cpus);
        let leader = cluster.wait_for_leader();
        // Through a follower, as a client that knows nothing of leaders.
        let follower = (1..=3).find(|id| *id != leader).expect("a follower");
        configs.push(Config::new(
            "remote 3 coordinators",
            dir.path(),
            with(&remote(cluster.node_addr(follower))),
        ));
        three = Some(cluster);
    }
    // A first build per configuration warms Bazel's server and its
    // toolchain detection; it is not counted.
    for config in &mut configs {
        config.build(usize::MAX);
    }
    for round in 0..rounds {
        for config in &mut configs {
            config.round(round);
        }
    }
    let base = median(&configs[0].cold);
    println!(
        "bazel zlib: //:check (15 compiles, archive, link, genrule), -c opt, --jobs=2, one worker with {cpus} slots, median of {rounds}"
    );
    for config in &configs {
        let runs = |list: &[Duration]| {
            list.iter()
                .map(|d| format!("{:.2}", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "  {:<22} cold {:>6.2} s {:.2}x  cached {:>6.2} s {:.2}x  (cold: {} s; cached: {} s)",
            config.name,
            median(&config.cold).as_secs_f64(),
            median(&config.cold).as_secs_f64() / base.as_secs_f64(),
            median(&config.cached).as_secs_f64(),
            median(&config.cached).as_secs_f64() / base.as_secs_f64(),
            runs(&config.cold),
            runs(&config.cached),
        );
    }
    drop(configs);
    drop(three);
}
