//! A real C project on distbuild against `ninja -j<CPUs>` running the same
//! commands on the same machine: a small "compression tool" made of the
//! zlib, bzip2 and lz4 sources the `libz-sys`, `bzip2-sys` and `lz4-sys`
//! crates bundle (all three in Cargo.lock, so `cargo fetch` brings them).
//!
//! The graph (33 jobs): 27 compiles (`cc -O2 -c`, one per file: zlib's
//! 15 .c files, bzip2's 7 library files, lz4's 5 in `lib/`), one
//! `ar rcs` archive per library (3, each depending on its compiles), the
//! test program's compile (`roundtrip.c`, which round-trips a line through
//! each library), its link against the three archives, and a job running
//! it and printing `OK`. Each compile's inputs are its .c file and every
//! header of its library (lz4hc.c also `#include`s lz4.c). The compiles are
//! uneven: on the 2-core development VM (best of three, outside any
//! sandbox) lz4hc.c takes 1.83 s and lz4.c 1.66 s, against a median of
//! 0.10 s (the test program's compile, each archive, the link and the run
//! take under 0.04 s each); of the 7.69 s of work, lz4hc.c is 24% and the two
//! together 45%. ninja gets the graph in its natural order (libraries as
//! above, files by name, each library's archive after its compiles, then
//! the test program); ninja 1.11 starts ready edges in manifest order, so
//! both slow files start last. Simulated with these times, that order
//! takes 4.13 s on 2 slots where longest-path-first takes 3.85 s (the
//! bound: 7.69 s / 2), and 2.79 s against 1.94 s on 4 slots: on two cores
//! the order is worth 7%, on more it decides.
//!
//! Each round (the configurations taking turns, who goes first
//! alternating, so the machine's noise falls on both):
//! - cold: every compile and the link get `-DBENCH_ROUND=<n>`, each
//!   archive `ar-round-<n>` as its shell's `$0` and the run a comment, so
//!   every cache key is new (the objects come out the same in every round,
//!   and a job is keyed by its dependencies' outputs) while job names stay
//!   the same; distbuild builds, ninja builds from clean;
//! - header touched: a comment line is appended to zlib's `zconf.h`
//!   (included by all of zlib and by the test program: the most compiles
//!   one header reaches, 16 of 27, 19 jobs with the archive, link and
//!   run); ninja reruns those 19 edges; distbuild reruns the 16 compiles,
//!   which give the same objects as before (a comment compiles to
//!   nothing), so the archive, link and run are answered from the cache
//!   (early cutoff: a job's cache key is made of its dependencies'
//!   outputs) along with the other 14 jobs;
//! - cached: distbuild again, nothing changed.
//!
//! After the header is touched a third configuration also runs, the
//! floor: the same 16 compile commands distbuild reruns, started straight
//! from this process (no shell, sandbox, cache or scheduler), as many at a
//! time as there are CPUs, longest first by the times the previous floor
//! run measured (the first one, before the rounds, learns them). It is
//! what any executor must spend on the work the header change leaves,
//! so distbuild / floor is distbuild's own cost and ninja / floor what
//! ninja spends beyond the compiles (its reruns of the archive, link
//! and run). The three configurations take turns going first.
//!
//! A warm-up round (not counted) comes first, so the coordinator has seen
//! every job name. A second cluster, of three coordinators, runs beside
//! the first from the start (idle but for its heartbeats while the others
//! build): after its own warm-up it builds each round's cold build too,
//! taking turns with the one-coordinator cold build and ninja's, so its
//! ratio to one coordinator compares builds of the same few seconds.
//! Every distbuild build must succeed and run
//! exactly the jobs it should (the rest cached), and where the test
//! program ran it must have printed OK; every ninja build must run as many
//! edges as distbuild ran jobs, and leave OK in its result file.
//!
//! `cargo bench --bench cproject` (BENCH_ROUNDS overrides the 3 rounds).
//! Under `cargo test --all-targets` it is a smoke test: one round of zlib
//! alone (15 compiles, archive, test program) on one coordinator, without
//! the warm-up (BENCH_COORDINATORS=3 adds the three-coordinator build);
//! ninja, when installed.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{BuildRun, Cluster, HaCluster, finish_build, id};

/// One library of the project, as a crate in the cargo registry bundles it.
struct Library {
    /// Its directory in the scratch source dir, and in job names.
    name: &'static str,
    /// The crate bundling it, and the sources' directory inside the crate.
    krate: &'static str,
    subdir: &'static str,
    /// The files compiled, sorted.
    sources: &'static [&'static str],
    /// Every header of the library: inputs of each of its compiles.
    headers: &'static [&'static str],
    /// (source, file it `#include`s that is not a header).
    includes: &'static [(&'static str, &'static str)],
    flags: &'static [&'static str],
    archive: &'static str,
    /// What the test program includes.
    public: &'static [&'static str],
    /// The macro that makes the test program round-trip through it.
    define: &'static str,
}

const ZLIB: Library = Library {
    name: "zlib",
    krate: "libz-sys",
    subdir: "src/zlib",
    sources: &[
        "adler32.c",
        "compress.c",
        "crc32.c",
        "deflate.c",
        "gzclose.c",
        "gzlib.c",
        "gzread.c",
        "gzwrite.c",
        "infback.c",
        "inffast.c",
        "inflate.c",
        "inftrees.c",
        "trees.c",
        "uncompr.c",
        "zutil.c",
    ],
    headers: &[
        "crc32.h",
        "deflate.h",
        "gzguts.h",
        "inffast.h",
        "inffixed.h",
        "inflate.h",
        "inftrees.h",
        "trees.h",
        "zconf.h",
        "zlib.h",
        "zutil.h",
    ],
    includes: &[],
    flags: &["-DHAVE_UNISTD_H"],
    archive: "libz.a",
    public: &["zlib.h", "zconf.h"],
    define: "WITH_ZLIB",
};

const BZIP2: Library = Library {
    name: "bzip2",
    krate: "bzip2-sys",
    subdir: "bzip2-1.0.8",
    sources: &[
        "blocksort.c",
        "bzlib.c",
        "compress.c",
        "crctable.c",
        "decompress.c",
        "huffman.c",
        "randtable.c",
    ],
    headers: &["bzlib.h", "bzlib_private.h"],
    includes: &[],
    flags: &[],
    archive: "libbz2.a",
    public: &["bzlib.h"],
    define: "WITH_BZIP2",
};

const LZ4: Library = Library {
    name: "lz4",
    krate: "lz4-sys",
    subdir: "liblz4/lib",
    sources: &["lz4.c", "lz4file.c", "lz4frame.c", "lz4hc.c", "xxhash.c"],
    headers: &[
        "lz4.h",
        "lz4file.h",
        "lz4frame.h",
        "lz4frame_static.h",
        "lz4hc.h",
        "xxhash.h",
    ],
    includes: &[("lz4hc.c", "lz4.c")],
    flags: &[],
    archive: "liblz4.a",
    public: &["lz4.h", "lz4hc.h"],
    define: "WITH_LZ4",
};

/// The header touched between the cold and the incremental builds
/// (zlib is in every configuration).
const TOUCHED: &str = "zlib/zconf.h";

const ROUNDTRIP: &str = r#"#include <stdio.h>
#include <string.h>
#ifdef WITH_ZLIB
#include "zlib.h"
#endif
#ifdef WITH_BZIP2
#include "bzlib.h"
#endif
#ifdef WITH_LZ4
#include "lz4.h"
#include "lz4hc.h"
#endif

static char text[] = "distbuild builds zlib, bzip2 and lz4 and round-trips this line through each";

static int same(const char *library, const char *out, long len) {
  if (len == (long)strlen(text) && memcmp(out, text, len) == 0) return 1;
  printf("%s: the round trip failed\n", library);
  return 0;
}

int main(void) {
  char packed[1024], unpacked[1024];
  int ok = 1;
#ifdef WITH_ZLIB
  {
    uLongf packed_len = sizeof packed, unpacked_len = sizeof unpacked;
    int good = compress((Bytef *)packed, &packed_len, (const Bytef *)text, strlen(text)) == Z_OK
      && uncompress((Bytef *)unpacked, &unpacked_len, (const Bytef *)packed, packed_len) == Z_OK;
    ok &= same("zlib", unpacked, good ? (long)unpacked_len : -1);
  }
#endif
#ifdef WITH_BZIP2
  {
    unsigned int packed_len = sizeof packed, unpacked_len = sizeof unpacked;
    int good = BZ2_bzBuffToBuffCompress(packed, &packed_len, text, strlen(text), 9, 0, 0) == BZ_OK
      && BZ2_bzBuffToBuffDecompress(unpacked, &unpacked_len, packed, packed_len, 0, 0) == BZ_OK;
    ok &= same("bzip2", unpacked, good ? (long)unpacked_len : -1);
  }
#endif
#ifdef WITH_LZ4
  {
    int packed_len = LZ4_compress_HC(text, packed, strlen(text), sizeof packed, LZ4HC_CLEVEL_MAX);
    int unpacked_len = packed_len > 0 ? LZ4_decompress_safe(packed, unpacked, packed_len, sizeof unpacked) : -1;
    ok &= same("lz4", unpacked, unpacked_len);
  }
#endif
  if (!ok) return 1;
  puts("OK");
  return 0;
}
"#;

/// The version of `krate` in the workspace's Cargo.lock.
fn locked_version(krate: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock");
    let lock = std::fs::read_to_string(&path).expect("read Cargo.lock");
    let mut lines = lock.lines();
    let wanted = format!("name = \"{krate}\"");
    while let Some(line) = lines.next() {
        if line == wanted {
            let version = lines
                .next()
                .and_then(|l| l.strip_prefix("version = \""))
                .and_then(|v| v.strip_suffix('"'));
            return version
                .unwrap_or_else(|| panic!("no version after {wanted} in Cargo.lock"))
                .to_string();
        }
    }
    panic!("{krate} is not in Cargo.lock")
}

/// Where the cargo registry unpacked `krate` at its locked version.
fn crate_dir(krate: &str) -> PathBuf {
    let version = locked_version(krate);
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cargo"));
    let registry = home.join("registry/src");
    let mut indexes: Vec<PathBuf> = std::fs::read_dir(&registry)
        .unwrap_or_else(|e| panic!("the cargo registry {}: {e}", registry.display()))
        .flatten()
        .map(|index| index.path())
        .collect();
    indexes.sort();
    indexes
        .into_iter()
        .map(|index| index.join(format!("{krate}-{version}")))
        .find(|dir| dir.is_dir())
        .unwrap_or_else(|| {
            panic!(
                "{krate} {version} is not under {}: `cargo fetch --locked` brings it",
                registry.display()
            )
        })
}

/// Copies the project's sources into `src`.
fn write_sources(libraries: &[&Library], src: &Path) {
    for library in libraries {
        let from = crate_dir(library.krate).join(library.subdir);
        let to = src.join(library.name);
        std::fs::create_dir_all(&to).expect("mkdir");
        for file in library.sources.iter().chain(library.headers) {
            std::fs::copy(from.join(file), to.join(file))
                .unwrap_or_else(|e| panic!("copy {}: {e}", from.join(file).display()));
        }
    }
    std::fs::write(src.join("roundtrip.c"), ROUNDTRIP).expect("write roundtrip.c");
}

/// Relative paths of the test program's inputs.
fn roundtrip_inputs(libraries: &[&Library]) -> Vec<String> {
    let mut inputs = vec!["roundtrip.c".to_string()];
    for library in libraries {
        inputs.extend(
            library
                .public
                .iter()
                .map(|h| format!("{}/{h}", library.name)),
        );
    }
    inputs
}

/// Relative paths of the inputs of `library`'s compile of `source`.
fn compile_inputs(library: &Library, source: &str) -> Vec<String> {
    let mut inputs = vec![format!("{}/{source}", library.name)];
    for (from, included) in library.includes {
        if *from == source {
            inputs.push(format!("{}/{included}", library.name));
        }
    }
    inputs.extend(
        library
            .headers
            .iter()
            .map(|h| format!("{}/{h}", library.name)),
    );
    inputs
}

fn object(source: &str) -> String {
    format!("{}.o", source.trim_end_matches(".c"))
}

fn compile_name(library: &Library, source: &str) -> String {
    format!("cc {}/{source}", library.name)
}

fn archive_name(library: &Library) -> String {
    format!("ar {}/{}", library.name, library.archive)
}

const TEST_COMPILE: &str = "cc roundtrip.c";
const LINK: &str = "link roundtrip";
const RUN: &str = "run roundtrip";

/// `cc`'s flags for `library`'s compiles in round `round`.
fn library_flags(library: &Library, round: &str) -> Vec<String> {
    let mut flags = vec!["-O2".to_string()];
    flags.extend(library.flags.iter().map(|f| f.to_string()));
    flags.push(format!("-DBENCH_ROUND={round}"));
    flags
}

/// `cc`'s flags for the test program's compile, include paths aside.
fn roundtrip_flags(libraries: &[&Library], round: &str) -> Vec<String> {
    let mut flags = vec!["-O2".to_string(), format!("-DBENCH_ROUND={round}")];
    flags.extend(libraries.iter().map(|l| format!("-D{}", l.define)));
    flags
}

fn dep(name: &str) -> String {
    format!("{{{{index .Deps \"{}\"}}}}", id(name))
}

/// The project as a distbuild graph, compiles flagged for round `round`.
fn graph(libraries: &[&Library], round: &str) -> Value {
    let mut sources = Vec::new();
    let mut jobs = Vec::new();
    let job = |name: &str, inputs: &[String], deps: &[String], exec: Vec<String>| {
        json!({
            "ID": id(name),
            "Name": name,
            "Inputs": inputs,
            "Deps": deps.iter().map(|d| id(d)).collect::<Vec<_>>(),
            "Cmds": [{"Exec": exec, "WorkingDirectory": "{{.OutputDir}}"}],
        })
    };
    for library in libraries {
        for file in library.sources.iter().chain(library.headers) {
            sources.push(format!("{}/{file}", library.name));
        }
        for source in library.sources {
            let mut exec = vec!["/usr/bin/cc".to_string()];
            exec.extend(library_flags(library, round));
            exec.extend([
                "-c".to_string(),
                format!("{{{{.SourceDir}}}}/{}/{source}", library.name),
                "-o".to_string(),
                format!("{{{{.OutputDir}}}}/{}", object(source)),
            ]);
            let name = compile_name(library, source);
            jobs.push(job(&name, &compile_inputs(library, source), &[], exec));
        }
        let compiles: Vec<String> = library
            .sources
            .iter()
            .map(|s| compile_name(library, s))
            .collect();
        // Through sh, as ninja runs it, with the round as `$0`: objects
        // that come out the same in every round would otherwise leave the
        // archive cached in a cold build.
        let mut exec = vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            "exec /usr/bin/ar rcs \"$@\"".to_string(),
            format!("ar-round-{round}"),
            format!("{{{{.OutputDir}}}}/{}", library.archive),
        ];
        exec.extend(
            library
                .sources
                .iter()
                .map(|s| format!("{}/{}", dep(&compile_name(library, s)), object(s))),
        );
        jobs.push(job(&archive_name(library), &[], &compiles, exec));
    }
    sources.push("roundtrip.c".to_string());

    let mut exec = vec!["/usr/bin/cc".to_string()];
    exec.extend(roundtrip_flags(libraries, round));
    exec.extend(
        libraries
            .iter()
            .map(|l| format!("-I{{{{.SourceDir}}}}/{}", l.name)),
    );
    exec.extend([
        "-c".to_string(),
        "{{.SourceDir}}/roundtrip.c".to_string(),
        "-o".to_string(),
        "{{.OutputDir}}/roundtrip.o".to_string(),
    ]);
    jobs.push(job(TEST_COMPILE, &roundtrip_inputs(libraries), &[], exec));

    // The round's define means nothing to a link; it makes the link's
    // key new in a cold build, as the compiles' are.
    let mut exec = vec![
        "/usr/bin/cc".to_string(),
        format!("-DBENCH_ROUND={round}"),
        "-o".to_string(),
        "{{.OutputDir}}/roundtrip".to_string(),
        format!("{}/roundtrip.o", dep(TEST_COMPILE)),
    ];
    exec.extend(
        libraries
            .iter()
            .map(|l| format!("{}/{}", dep(&archive_name(l)), l.archive)),
    );
    let mut link_deps = vec![TEST_COMPILE.to_string()];
    link_deps.extend(libraries.iter().map(|l| archive_name(l)));
    jobs.push(job(LINK, &[], &link_deps, exec));

    let script = format!(
        "{}/roundtrip > {{{{.OutputDir}}}}/result.txt && cat {{{{.OutputDir}}}}/result.txt # round {round}",
        dep(LINK)
    );
    jobs.push(job(
        RUN,
        &[],
        &[LINK.to_string()],
        vec!["/bin/sh".into(), "-c".into(), script],
    ));

    let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
    support::graph(&sources, jobs)
}

/// Every job name of the graph.
fn all_jobs(libraries: &[&Library]) -> Vec<String> {
    let mut names = Vec::new();
    for library in libraries {
        names.extend(library.sources.iter().map(|s| compile_name(library, s)));
        names.push(archive_name(library));
    }
    names.extend([TEST_COMPILE, LINK, RUN].map(String::from));
    names
}

/// The compiles that run again after [`TOUCHED`] changes: all distbuild
/// runs, since the objects come out the same.
fn recompiled_jobs(libraries: &[&Library]) -> Vec<String> {
    let mut names = touched_jobs(libraries);
    names.retain(|n| n.starts_with("cc "));
    names
}

/// The jobs that depend on [`TOUCHED`]: all ninja runs again.
fn touched_jobs(libraries: &[&Library]) -> Vec<String> {
    let (dir, header) = TOUCHED.split_once('/').expect("dir/header");
    let mut names = Vec::new();
    for library in libraries.iter().filter(|l| l.name == dir) {
        assert!(library.headers.contains(&header));
        names.extend(library.sources.iter().map(|s| compile_name(library, s)));
        names.push(archive_name(library));
    }
    if roundtrip_inputs(libraries).iter().any(|i| i == TOUCHED) {
        names.push(TEST_COMPILE.to_string());
    }
    names.extend([LINK, RUN].map(String::from));
    names
}

/// The same commands as a build.ninja, in the graph's order, reading the
/// sources in `src` and writing under `out/`.
fn ninja_manifest(libraries: &[&Library], round: &str, src: &Path) -> String {
    let src = src.display();
    let mut file = String::from(
        "rule cc\n  command = /usr/bin/cc $flags -c $in -o $out\n\
         rule ar\n  command = rm -f $out && /usr/bin/ar rcs $out $in\n\
         rule link\n  command = /usr/bin/cc $flags -o $out $in\n\
         rule run\n  command = $in > $out && cat $out\n\n",
    );
    for library in libraries {
        for source in library.sources {
            let implicit: Vec<String> = compile_inputs(library, source)[1..]
                .iter()
                .map(|i| format!("{src}/{i}"))
                .collect();
            file += &format!(
                "build out/{}/{}: cc {src}/{}/{source} | {}\n  flags = {}\n",
                library.name,
                object(source),
                library.name,
                implicit.join(" "),
                library_flags(library, round).join(" ")
            );
        }
        let objects: Vec<String> = library
            .sources
            .iter()
            .map(|s| format!("out/{}/{}", library.name, object(s)))
            .collect();
        file += &format!(
            "build out/{}/{}: ar {}\n",
            library.name,
            library.archive,
            objects.join(" ")
        );
    }
    let implicit: Vec<String> = roundtrip_inputs(libraries)[1..]
        .iter()
        .map(|i| format!("{src}/{i}"))
        .collect();
    let mut flags = roundtrip_flags(libraries, round);
    flags.extend(libraries.iter().map(|l| format!("-I{src}/{}", l.name)));
    file += &format!(
        "build out/roundtrip.o: cc {src}/roundtrip.c | {}\n  flags = {}\n",
        implicit.join(" "),
        flags.join(" ")
    );
    let archives: Vec<String> = libraries
        .iter()
        .map(|l| format!("out/{}/{}", l.name, l.archive))
        .collect();
    file += &format!(
        "build out/roundtrip: link out/roundtrip.o {}\n  flags = -DBENCH_ROUND={round}\n",
        archives.join(" ")
    );
    file += "build out/result.txt: run out/roundtrip\n";
    file
}

/// Runs `ninja -j<cpus>` in `dir`: its time and how many edges it ran.
fn run_ninja(dir: &Path, cpus: usize) -> (Duration, usize) {
    let started = Instant::now();
    let out = Command::new("ninja")
        .arg(format!("-j{cpus}"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run ninja");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ninja failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not on a terminal, ninja prints "[done/total] command" per edge.
    let edges = stdout
        .lines()
        .filter_map(|l| {
            l.strip_prefix('[')?
                .split_once('/')?
                .0
                .parse::<usize>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    let result = std::fs::read_to_string(dir.join("out/result.txt")).expect("ninja's result");
    assert_eq!(result, "OK\n", "ninja's test program");
    (took, edges)
}

/// Checks a finished distbuild build: it succeeded, reported every job
/// once, ran exactly `ran` (the rest cached), and, if the test program
/// ran, it printed OK.
fn check(run: &BuildRun, all: &[String], ran: &[String], what: &str, logs: &dyn Fn() -> String) {
    assert_eq!(run.code, Some(0), "{what}: {}\n{}", run.describe(), logs());
    let finished: Vec<&Value> = run
        .events
        .iter()
        .filter(|e| e["event"] == "job_finished")
        .collect();
    let mut reported: Vec<String> = finished
        .iter()
        .map(|e| e["name"].as_str().unwrap_or("?").to_string())
        .collect();
    reported.sort();
    let mut expected = all.to_vec();
    expected.sort();
    assert_eq!(reported, expected, "{what}: {}", run.describe());
    for event in &finished {
        assert_eq!(event["error"], Value::Null, "{what}: {event}");
        assert_eq!(event["exit_code"], 0, "{what}: {event}");
    }
    let mut ran_now: Vec<String> = finished
        .iter()
        .filter(|e| e["cached"] == false)
        .map(|e| e["name"].as_str().unwrap_or("?").to_string())
        .collect();
    ran_now.sort();
    let mut expected = ran.to_vec();
    expected.sort();
    assert_eq!(ran_now, expected, "{what}: the jobs that ran");
    if ran.iter().any(|r| r == RUN) {
        assert_eq!(run.finished(&id(RUN))["stdout"], "OK\n", "{what}");
    }
}

/// One command of the floor: the job it comes from and its program and
/// arguments, to run in its own directory.
struct FloorCommand {
    name: String,
    argv: Vec<String>,
    dir: PathBuf,
}

/// The commands of the jobs named in `names`, as `graph` has them, with
/// the source directory `src` and each job's output directory a fresh one
/// under `out` (also its working directory, as in the graph).
fn floor_commands(graph: &Value, names: &[String], src: &Path, out: &Path) -> Vec<FloorCommand> {
    let _ = std::fs::remove_dir_all(out);
    let mut commands = Vec::new();
    for job in graph["Jobs"].as_array().expect("jobs") {
        let name = job["Name"].as_str().expect("name");
        if !names.iter().any(|n| n == name) {
            continue;
        }
        let cmds = job["Cmds"].as_array().expect("cmds");
        assert_eq!(cmds.len(), 1, "{name}: one command");
        assert_eq!(cmds[0]["WorkingDirectory"], "{{.OutputDir}}", "{name}");
        let dir = out.join(commands.len().to_string());
        std::fs::create_dir_all(&dir).expect("mkdir");
        let argv = cmds[0]["Exec"]
            .as_array()
            .expect("exec")
            .iter()
            .map(|a| {
                let arg = a.as_str().expect("argument");
                assert!(
                    !arg.contains("{{index"),
                    "{name}: a floor command has no dependencies"
                );
                arg.replace("{{.SourceDir}}", &src.display().to_string())
                    .replace("{{.OutputDir}}", &dir.display().to_string())
            })
            .collect();
        commands.push(FloorCommand {
            name: name.to_string(),
            argv,
            dir,
        });
    }
    assert_eq!(
        commands.len(),
        names.len(),
        "every floor job is in the graph"
    );
    commands
}

/// Runs `commands` `slots` at a time, longest first by `expected` (the
/// unknown first, in the order given), each program started directly:
/// the time they take with no executor in the way. Records each
/// command's time in `expected` for the next run.
fn run_floor(
    mut commands: Vec<FloorCommand>,
    slots: usize,
    expected: &mut std::collections::HashMap<String, Duration>,
) -> Duration {
    commands.sort_by_key(|c| {
        std::cmp::Reverse(expected.get(&c.name).copied().unwrap_or(Duration::MAX))
    });
    let queue = std::sync::Mutex::new(commands.into_iter());
    let took = std::sync::Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..slots {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().expect("queue").next();
                    let Some(command) = next else { break };
                    let began = Instant::now();
                    let status = Command::new(&command.argv[0])
                        .args(&command.argv[1..])
                        .current_dir(&command.dir)
                        .stdin(Stdio::null())
                        .status()
                        .expect("start a floor command");
                    assert!(status.success(), "floor: {} failed: {status}", command.name);
                    took.lock()
                        .expect("took")
                        .push((command.name, began.elapsed()));
                }
            });
        }
    });
    let elapsed = started.elapsed();
    expected.extend(took.into_inner().expect("took"));
    elapsed
}

/// Appends a comment line to [`TOUCHED`] in `src`.
fn touch(src: &Path, round: &str) {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(src.join(TOUCHED))
        .expect("open the touched header");
    writeln!(file, "/* touched in round {round} */").expect("append");
}

fn median(list: &[f64]) -> f64 {
    let mut sorted = list.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// One round's times in seconds (ninja's None without ninja).
struct Round {
    cold: f64,
    ninja_cold: Option<f64>,
    /// The cold build on three coordinators (None without them).
    three_cold: Option<f64>,
    touched: f64,
    ninja_touched: Option<f64>,
    floor_touched: f64,
    cached: f64,
}

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benchmarking { 3 } else { 1 });
    let three_coordinators =
        benchmarking || std::env::var("BENCH_COORDINATORS").is_ok_and(|v| v == "3");
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let libraries: Vec<&Library> = if benchmarking {
        vec![&ZLIB, &BZIP2, &LZ4]
    } else {
        vec![&ZLIB]
    };
    let all = all_jobs(&libraries);
    let touched = touched_jobs(&libraries);
    let recompiled = recompiled_jobs(&libraries);
    let compiles: usize = libraries.iter().map(|l| l.sources.len()).sum();
    let names: Vec<&str> = libraries.iter().map(|l| l.name).collect();

    let scratch = tempfile::tempdir().expect("tempdir");
    let src = scratch.path().join("src");
    write_sources(&libraries, &src);
    let ninja_dir = scratch.path().join("ninja");
    std::fs::create_dir_all(&ninja_dir).expect("mkdir");
    let have_ninja = Command::new("ninja").arg("--version").output().is_ok();
    if !have_ninja {
        println!(
            "cproject: ninja is not installed (scripts/run.sh installs ninja-build); distbuild only"
        );
    }
    let ninja = |round: &str, expected: usize| -> f64 {
        std::fs::write(
            ninja_dir.join("build.ninja"),
            ninja_manifest(&libraries, round, &src),
        )
        .expect("write build.ninja");
        let (took, edges) = run_ninja(&ninja_dir, cpus);
        assert_eq!(edges, expected, "ninja ran {edges} edges, not {expected}");
        took.as_secs_f64()
    };
    let ninja_cold = |round: &str| -> f64 {
        let _ = std::fs::remove_dir_all(ninja_dir.join("out"));
        ninja(round, all.len())
    };

    let floor_out = scratch.path().join("floor");
    let mut floor_expected = std::collections::HashMap::new();
    let mut floor = |round: &str| -> f64 {
        let commands = floor_commands(&graph(&libraries, round), &recompiled, &src, &floor_out);
        run_floor(commands, cpus, &mut floor_expected).as_secs_f64()
    };

    let cluster = Cluster::start(1, cpus as u32);
    let logs = || cluster.logs();
    let distbuild = |round: &str, ran: &[String], what: &str| -> f64 {
        let graph = graph(&libraries, round);
        let started = Instant::now();
        let run = cluster.build(&graph, &src, &[]);
        let took = started.elapsed().as_secs_f64();
        check(&run, &all, ran, &format!("round {round}, {what}"), &logs);
        took
    };

    let three = three_coordinators.then(|| HaCluster::start(3, 0, 1, cpus as u32));
    let limit = Duration::from_secs(if benchmarking { 1800 } else { 300 });
    let three_cold = |round: &str| -> Option<f64> {
        let three = three.as_ref()?;
        let path = scratch.path().join(format!("graph-3-{round}.json"));
        std::fs::write(&path, graph(&libraries, round).to_string()).expect("write graph");
        let mut command = support::build_command(&path, &src, &three.all_addrs(), &[]);
        command
            .args(three.client_flags())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let run = finish_build(command.spawn().expect("spawn distbuild build"), limit);
        let took = started.elapsed().as_secs_f64();
        let what = format!("3 coordinators, round {round}, cold");
        check(&run, &all, &all, &what, &|| three.logs());
        Some(took)
    };

    if benchmarking {
        distbuild("warmup", &all, "warm-up");
        three_cold("warmup");
        if have_ninja {
            ninja_cold("warmup");
        }
    }
    // Learns the compiles' times, as distbuild's warm-up build did.
    floor("warmup");
    let mut results = Vec::new();
    for round in 0..rounds {
        let tag = round.to_string();
        let mut cold = 0.0;
        let mut ninja_cold_time = None;
        let mut three_cold_time = None;
        // As below: each configuration goes first in every third round.
        for turn in 0..3 {
            match (round + turn) % 3 {
                0 => cold = distbuild(&tag, &all, "cold"),
                1 if have_ninja => ninja_cold_time = Some(ninja_cold(&tag)),
                1 => {}
                _ => three_cold_time = three_cold(&tag),
            }
        }
        touch(&src, &tag);
        let mut ninja_touched = None;
        let mut touched_time = 0.0;
        let mut floor_touched = 0.0;
        // Each configuration goes first in every third round.
        for turn in 0..3 {
            match (round + turn) % 3 {
                0 => touched_time = distbuild(&tag, &recompiled, "header touched"),
                1 if have_ninja => ninja_touched = Some(ninja(&tag, touched.len())),
                1 => {}
                _ => floor_touched = floor(&tag),
            }
        }
        let cached = distbuild(&tag, &[], "cached");
        results.push(Round {
            cold,
            ninja_cold: ninja_cold_time,
            three_cold: three_cold_time,
            touched: touched_time,
            ninja_touched,
            floor_touched,
            cached,
        });
    }
    drop(cluster);
    drop(three);

    println!(
        "cproject: {} ({compiles} compiles, {} archive(s), test program compile, link, run: {} jobs), \
         one worker with {cpus} slots against ninja -j{cpus}; {TOUCHED} touched: ninja reruns {} jobs, \
         distbuild {} (the rest cut off)",
        names.join(", "),
        libraries.len(),
        all.len(),
        touched.len(),
        recompiled.len()
    );
    let secs = |t: Option<f64>| t.map_or("-".to_string(), |t| format!("{t:.2} s"));
    let ratio = |a: f64, b: Option<f64>| b.map_or("-".to_string(), |b| format!("{:.2}x", a / b));
    for (round, r) in results.iter().enumerate() {
        println!(
            "  round {round}: cold {:.2} s, ninja {} ({}), 3 coordinators {}; header touched {:.2} s, ninja {} ({}), floor {:.2} s; cached {:.2} s",
            r.cold,
            secs(r.ninja_cold),
            ratio(r.cold, r.ninja_cold),
            secs(r.three_cold),
            r.touched,
            secs(r.ninja_touched),
            ratio(r.touched, r.ninja_touched),
            r.floor_touched,
            r.cached
        );
    }
    let of = |f: &dyn Fn(&Round) -> Option<f64>| -> Option<f64> {
        let list: Option<Vec<f64>> = results.iter().map(f).collect();
        list.map(|l| median(&l))
    };
    let cold = of(&|r| Some(r.cold)).expect("rounds");
    println!("  median of {rounds} (ratios: median of each round's):");
    println!(
        "    distbuild cold:           {cold:>6.2} s   ninja {:>8}   distbuild / ninja {}",
        secs(of(&|r| r.ninja_cold)),
        of(&|r| Some(r.cold / r.ninja_cold?)).map_or("-".into(), |x| format!("{x:.2}x"))
    );
    println!(
        "    distbuild header touched: {:>6.2} s   ninja {:>8}   distbuild / ninja {}",
        of(&|r| Some(r.touched)).expect("rounds"),
        secs(of(&|r| r.ninja_touched)),
        of(&|r| Some(r.touched / r.ninja_touched?)).map_or("-".into(), |x| format!("{x:.2}x"))
    );
    println!(
        "    floor, header touched:    {:>6.2} s   distbuild / floor {:.2}x   ninja / floor {}   floor / ninja {}",
        of(&|r| Some(r.floor_touched)).expect("rounds"),
        of(&|r| Some(r.touched / r.floor_touched)).expect("rounds"),
        of(&|r| Some(r.ninja_touched? / r.floor_touched))
            .map_or("-".into(), |x| format!("{x:.2}x")),
        of(&|r| Some(r.floor_touched / r.ninja_touched?))
            .map_or("-".into(), |x| format!("{x:.2}x"))
    );
    println!(
        "    distbuild cached:         {:>6.2} s",
        of(&|r| Some(r.cached)).expect("rounds")
    );
    if let Some(three) = of(&|r| r.three_cold) {
        println!(
            "    3 coordinators, cold:     {three:>6.2} s   3 coordinators / 1 {:.2}x",
            of(&|r| Some(r.three_cold? / r.cold)).expect("three_cold")
        );
    }
}
