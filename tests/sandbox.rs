//! The job sandbox (bubblewrap namespaces), tried from inside real jobs on
//! a real worker: nothing outside the job's directory (and the test's
//! writable directory) can be written, the worker's cache and other jobs'
//! directories are not there, the network is not there, and nothing the
//! job started survives it. The same jobs on a worker with `--sandbox
//! none` show each of these checks can fail.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::*;

/// A directory outside /tmp (the sandbox's /tmp is private) and outside
/// the cluster's directory (which tests may write): jobs must not write
/// here.
struct Outside(PathBuf);

impl Outside {
    fn new() -> Outside {
        let dir = PathBuf::from(format!(
            "/var/tmp/distbuild-sandbox-test-{}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&dir).expect("mkdir");
        Outside(dir)
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The probes, as one graph: each job reports what it could do in its
/// stdout.
fn probes(outside: &Outside, worker_dir: &str, port: u16, sleeper: &str) -> serde_json::Value {
    let target = outside.0.join("escaped");
    graph(
        &[],
        vec![
            sh_job(
                "write outside",
                &[],
                &[],
                &[&format!(
                    "echo x > {} 2>&1 && echo WROTE || echo REFUSED",
                    target.display()
                )],
            ),
            sh_job(
                "read the cache",
                &[],
                &[],
                &[&format!(
                    "ls -A {worker_dir} | tr '\\n' ' '; echo; cat {worker_dir}/worker-id >/dev/null 2>&1 && echo GOT-ID || echo NO-ID"
                )],
            ),
            // Two jobs at once (two slots): each lists the sandboxes.
            sh_job(
                "peer a",
                &[],
                &[],
                &[&format!(
                    "echo a > {{{{.OutputDir}}}}/mine; sleep 1; ls {worker_dir}/sandbox | wc -l"
                )],
            ),
            sh_job(
                "peer b",
                &[],
                &[],
                &[&format!(
                    "echo b > {{{{.OutputDir}}}}/mine; sleep 1; ls {worker_dir}/sandbox | wc -l"
                )],
            ),
            sh_job(
                "network",
                &[],
                &[],
                &[&format!(
                    "bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' 2>/dev/null && echo CONNECTED || echo NO-NETWORK"
                )],
            ),
            sh_job(
                "leave a process",
                &[],
                &[],
                &[&format!(
                    "setsid sh -c 'sleep {sleeper}' >/dev/null 2>&1 & nohup sleep {sleeper} >/dev/null 2>&1 & sleep 0.5; echo LEFT"
                )],
            ),
        ],
    )
}

/// Builds `graph`, which must fail (exit 1); the run and the error of its
/// job `job`.
fn failed_build(cluster: &Cluster, graph: &serde_json::Value, job: &str) -> (BuildRun, String) {
    let run = cluster.build(graph, cluster.dir.path(), &["--timeout", "60"]);
    assert_eq!(run.code, Some(1), "{}\n{}", run.describe(), cluster.logs());
    let error = run.finished(&id(job))["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (run, error)
}

/// A number unlikely to repeat.
fn unique() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

/// What a job printed, trimmed.
fn said(run: &BuildRun, job: &str) -> String {
    run.finished(&id(job))["stdout"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn sleepers(sleeper: &str) -> usize {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &format!("sleep {sleeper}")])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn kill_sleepers(sleeper: &str) {
    let _ = std::process::Command::new("pkill")
        .args(["-f", &format!("sleep {sleeper}")])
        .status();
}

#[test]
fn a_job_can_write_only_its_own_directory_and_sees_no_cache_no_peers_no_network_and_leaves_nothing()
{
    for sandboxed in [true, false] {
        let flags: &[&str] = if sandboxed {
            &[]
        } else {
            &["--sandbox", "none"]
        };
        let cluster = Cluster::start_full(1, 2, &[], flags, false);
        let outside = Outside::new();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let sleeper = format!("{}.{}", 900 + unique() % 99, std::process::id());
        let worker_dir = cluster.path("worker0").display().to_string();
        let graph = probes(&outside, &worker_dir, port, &sleeper);
        let run = cluster.build(&graph, cluster.dir.path(), &["--timeout", "60"]);
        assert_eq!(run.code, Some(0), "{}\n{}", run.describe(), cluster.logs());
        std::thread::sleep(Duration::from_millis(500));
        let connected = listener.accept().is_ok();
        let escaped = outside.0.join("escaped").exists();
        let left = sleepers(&sleeper);
        kill_sleepers(&sleeper);
        let cache_listing = said(&run, "read the cache");
        let peers = [said(&run, "peer a"), said(&run, "peer b")];
        if sandboxed {
            assert_eq!(said(&run, "write outside"), "REFUSED");
            assert!(!escaped, "a sandboxed job wrote outside its directory");
            // Only the mount point of its own directory is there.
            assert_eq!(cache_listing, "sandbox \nNO-ID", "{}", run.describe());
            assert_eq!(
                peers,
                ["1".to_string(), "1".to_string()],
                "{}",
                run.describe()
            );
            assert_eq!(said(&run, "network"), "NO-NETWORK");
            assert!(!connected, "a sandboxed job reached the host's network");
            assert_eq!(left, 0, "a sandboxed job's processes outlived it");
        } else {
            // The same probes succeed unconfined: each check above can fail.
            assert_eq!(said(&run, "write outside"), "WROTE", "{}", run.describe());
            assert!(escaped);
            assert!(cache_listing.ends_with("GOT-ID"), "{cache_listing}");
            assert!(
                peers.iter().any(|p| p != "1"),
                "the peers never saw each other: {peers:?}"
            );
            assert_eq!(said(&run, "network"), "CONNECTED");
            assert!(connected);
            assert!(left > 0, "nothing was left behind unconfined");
            assert!(
                cluster
                    .logs()
                    .contains("--sandbox none: jobs run unconfined"),
                "no warning at start-up"
            );
        }
    }
}

#[test]
fn a_job_past_its_file_size_limit_fails_saying_so() {
    let cluster = Cluster::start_full(1, 1, &[], &["--job-max-file-bytes", "1000000"], false);
    let graph = graph(
        &[],
        vec![sh_job(
            "big",
            &[],
            &[],
            &["head -c 2000000 /dev/zero > {{.OutputDir}}/big"],
        )],
    );
    let run = cluster.build(&graph, cluster.dir.path(), &["--timeout", "60"]);
    assert_eq!(run.code, Some(1), "{}\n{}", run.describe(), cluster.logs());
    let finished = run.finished(&id("big"));
    let error = finished["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("file-size limit of 1000000 bytes (--job-max-file-bytes)"),
        "{}",
        run.describe()
    );
}

#[test]
fn a_job_past_its_process_limit_fails_saying_so() {
    let cluster = Cluster::start_full(1, 1, &[], &["--job-max-processes", "20"], false);
    if cluster.logs().contains("cannot be enforced here") {
        panic!(
            "no pids cgroup controller on this machine:\n{}",
            cluster.logs()
        );
    }
    let graph = graph(
        &[],
        vec![sh_job(
            "many",
            &[],
            &[],
            &["for i in $(seq 40); do sleep 3 & done; wait"],
        )],
    );
    let (run, error) = failed_build(&cluster, &graph, "many");
    assert!(
        error.contains("the job may run at most 20 processes at once (--job-max-processes)"),
        "{}",
        run.describe()
    );
    // Within the limit, the same kind of job runs.
    let graph = graph_of_few();
    let run = cluster.build(&graph, cluster.dir.path(), &["--timeout", "60"]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    // A later failure in the same slot is its own, not the limit's.
    let graph = graph_of_one("fails", "exit 3");
    let run = cluster.build(&graph, cluster.dir.path(), &["--timeout", "60"]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let finished = run.finished(&id("fails"));
    assert_eq!(finished["exit_code"], 3, "{}", run.describe());
    assert!(finished["error"].is_null(), "{}", run.describe());
}

fn graph_of_few() -> serde_json::Value {
    graph(
        &[],
        vec![sh_job(
            "few",
            &[],
            &[],
            &["for i in $(seq 5); do sleep 0.2 & done; wait"],
        )],
    )
}

#[test]
fn a_job_past_its_memory_limit_is_killed_saying_so() {
    let cluster = Cluster::start_full(1, 1, &[], &["--job-max-memory", "100000000"], false);
    if cluster.logs().contains("per-job cgroups unavailable") {
        panic!(
            "no memory cgroup controller on this machine:\n{}",
            cluster.logs()
        );
    }
    // tail keeps the last ten lines; /dev/zero has no line ends, so it
    // holds everything it reads.
    let graph = graph(
        &[],
        vec![sh_job(
            "hungry",
            &[],
            &[],
            &["head -c 400000000 /dev/zero | tail > /dev/null"],
        )],
    );
    let (run, error) = failed_build(&cluster, &graph, "hungry");
    assert!(
        error.contains(
            "killed for memory, the job may use at most 100000000 bytes (--job-max-memory)"
        ),
        "{}",
        run.describe()
    );
}

/// The first line of what `job` printed that starts with `key`, without
/// it.
fn said_after(run: &BuildRun, job: &str, key: &str) -> String {
    said(run, job)
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Jobs one after another in a slot run in the slot's kept sandbox (the
/// same `distbuild sandbox-init` forks both), and the second finds nothing
/// the first left: no files in /tmp or /dev/shm, no System V shared
/// memory, no process. A job timed out takes the sandbox with it, and the
/// slot's next job gets a new one. Unconfined, the second job sees what
/// the first left: each check can fail.
#[test]
fn jobs_in_one_slot_share_its_sandbox_but_nothing_a_job_left() {
    for sandboxed in [true, false] {
        let flags: &[&str] = if sandboxed {
            &[]
        } else {
            &["--sandbox", "none"]
        };
        let cluster = Cluster::start_full(1, 1, &[], flags, false);
        let mark = format!("distbuild-mark-{}-{}", std::process::id(), unique());
        let sleeper = format!("{}.{}", 900 + unique() % 99, std::process::id());
        let parent = "echo parent $(tr '\\0' ' ' < /proc/$PPID/cmdline)";
        let leave = format!(
            "echo a > /tmp/{mark}; echo a > /dev/shm/{mark}; echo shm $(ipcmk -M 4096 | tr -dc 0-9); setsid sleep {sleeper} >/dev/null 2>&1 & sleep 0.5; {parent}"
        );
        let look = format!(
            "echo files $(ls /tmp/{mark} /dev/shm/{mark} 2>/dev/null | wc -l); echo segments $(ipcs -m | grep -c '^0x'); echo sleepers $(pgrep -f '^sleep {sleeper}$' | wc -l); {parent}"
        );
        let graph = graph(
            &[],
            vec![
                sh_job("first", &[], &[], &[&leave]),
                sh_job("second", &[], &["first"], &[&look]),
            ],
        );
        let run = cluster.build(&graph, cluster.dir.path(), &["--timeout", "60"]);
        // What the unconfined run left on this machine goes first.
        kill_sleepers(&sleeper);
        let _ = std::fs::remove_file(format!("/tmp/{mark}"));
        let _ = std::fs::remove_file(format!("/dev/shm/{mark}"));
        let segment = said_after(&run, "first", "shm");
        if !sandboxed && !segment.is_empty() {
            let _ = std::process::Command::new("ipcrm")
                .args(["-m", &segment])
                .status();
        }
        assert_eq!(run.code, Some(0), "{}\n{}", run.describe(), cluster.logs());
        let count = |key| {
            said_after(&run, "second", key)
                .parse::<u32>()
                .unwrap_or_else(|_| panic!("no {key} count: {}", run.describe()))
        };
        let parents = [
            said_after(&run, "first", "parent"),
            said_after(&run, "second", "parent"),
        ];
        if sandboxed {
            assert_eq!(count("files "), 0, "{}", run.describe());
            assert_eq!(count("segments "), 0, "{}", run.describe());
            assert_eq!(count("sleepers "), 0, "{}", run.describe());
            assert!(
                parents[0].ends_with("sandbox-init") && parents[0] == parents[1],
                "not one kept sandbox: {parents:?}\n{}",
                cluster.logs()
            );
            assert!(!segment.is_empty(), "{}", run.describe());
            // A job timed out kills its slot's sandbox; the next job gets
            // a new one.
            let graph = graph_of_one("slow", "sleep 30");
            let run = cluster.build(
                &graph,
                cluster.dir.path(),
                &["--timeout", "60", "--job-timeout", "1"],
            );
            assert_eq!(run.code, Some(1), "{}", run.describe());
            let graph = graph_of_one("after", &format!("echo fine; {parent}"));
            let run = cluster.build(&graph, cluster.dir.path(), &["--timeout", "60"]);
            assert_eq!(run.code, Some(0), "{}", run.describe());
            assert!(
                said_after(&run, "after", "parent").ends_with("sandbox-init"),
                "{}",
                run.describe()
            );
        } else {
            assert_eq!(count("files "), 2, "{}", run.describe());
            assert!(count("segments ") >= 1, "{}", run.describe());
            assert_eq!(count("sleepers "), 1, "{}", run.describe());
        }
    }
}

fn graph_of_one(name: &str, script: &str) -> serde_json::Value {
    graph(&[], vec![sh_job(name, &[], &[], &[script])])
}

/// A worker whose binary lies under /tmp (where its sandboxes have a /tmp
/// of their own) still keeps its slots' sandboxes: the init's program is
/// bound into them at its own path.
#[test]
fn a_worker_binary_under_tmp_still_keeps_its_slots_sandboxes() {
    let mut cluster = Cluster::start_full(0, 1, &[], &[], false);
    let bin_dir = tempfile::Builder::new()
        .prefix("distbuild-bin")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let copy = bin_dir.path().join("distbuild");
    // A second name for the binary (a copy where a link cannot be made):
    // the worker runs by the name it was started with.
    let binary = env!("CARGO_BIN_EXE_distbuild");
    if std::fs::hard_link(binary, &copy).is_err() {
        std::fs::copy(binary, &copy).expect("copy the binary");
    }
    let mut command = std::process::Command::new(&copy);
    command
        .args(["worker", "--coordinator", &cluster.coordinator_addr()])
        .args(["--listen", "127.0.0.1:0", "--slots", "1"])
        .arg("--cache-dir")
        .arg(cluster.path("worker0"))
        .args(security_flags(None, "worker", "worker0"));
    let log = cluster.path("worker0.log");
    cluster.workers.push(Server::start_command(command, log));
    cluster.wait_for_workers(1);
    let graph = graph_of_one("where", "echo parent $(tr '\\0' ' ' < /proc/$PPID/cmdline)");
    let run = cluster.build(&graph, cluster.dir.path(), &["--timeout", "60"]);
    assert_eq!(run.code, Some(0), "{}\n{}", run.describe(), cluster.logs());
    assert_eq!(
        said_after(&run, "where", "parent"),
        format!("{} sandbox-init", copy.display()),
        "{}",
        cluster.logs()
    );
}

/// A job that kills every process it may signal (`kill -9 -1`) takes down
/// its slot's sandbox init: the job fails saying its sandbox ended, and
/// the slot's next job gets a new sandbox. (Only ever run sandboxed: as
/// root, unconfined, it would kill the machine's processes.)
#[test]
fn a_job_that_kills_its_sandbox_fails_and_the_slot_recovers() {
    let cluster = Cluster::start_full(1, 1, &[], &[], false);
    let graph = graph_of_one("killer", "kill -9 -1; sleep 0.5; echo survived");
    let (run, error) = failed_build(&cluster, &graph, "killer");
    assert!(
        error.contains("the job's sandbox ended while the command ran"),
        "{}",
        run.describe()
    );
    let graph = graph_of_one(
        "after",
        "echo fine; echo parent $(tr '\\0' ' ' < /proc/$PPID/cmdline)",
    );
    let run = cluster.build(&graph, cluster.dir.path(), &["--timeout", "60"]);
    assert_eq!(run.code, Some(0), "{}\n{}", run.describe(), cluster.logs());
    assert!(
        said_after(&run, "after", "parent").ends_with("sandbox-init"),
        "{}",
        run.describe()
    );
}
