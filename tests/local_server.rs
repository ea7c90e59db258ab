//! Local server mode: `distbuild build` with no cluster configured finds or
//! starts the workspace's background server, with a temporary HOME.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::distbuild;

/// A temporary HOME and workspaces in it; stops every server at the end.
struct Home {
    dir: tempfile::TempDir,
    workspaces: Vec<PathBuf>,
}

impl Home {
    fn new() -> Home {
        Home {
            dir: tempfile::tempdir().expect("tempdir"),
            workspaces: Vec::new(),
        }
    }

    /// A workspace holding the example C project.
    fn workspace(&mut self, name: &str) -> PathBuf {
        let ws = self.dir.path().join(name);
        std::fs::create_dir_all(&ws).expect("mkdir");
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello-c");
        for entry in std::fs::read_dir(&example).expect("example") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), ws.join(entry.file_name())).expect("copy");
        }
        self.workspaces.push(ws.clone());
        ws
    }

    /// `distbuild args...` in `ws` with this HOME and no cluster set.
    fn command(&self, ws: &Path, args: &[&str]) -> Command {
        let mut command = distbuild();
        command
            .args(args)
            .current_dir(ws)
            .env("HOME", self.dir.path().join("home"))
            .env_remove("XDG_CACHE_HOME")
            .env_remove("DISTBUILD_COORDINATOR")
            .env_remove(TEST_BUILD_ID_ENV)
            .stdin(Stdio::null());
        command
    }

    fn run(&self, ws: &Path, args: &[&str]) -> Output {
        self.command(ws, args).output().expect("run distbuild")
    }

    fn build(&self, ws: &Path, extra: &[&str]) -> Output {
        let mut args = vec!["build", "--json", "--graph", "graph.json"];
        args.extend_from_slice(extra);
        self.run(ws, &args)
    }

    /// `distbuild info` as key -> value.
    fn info(&self, ws: &Path) -> std::collections::BTreeMap<String, String> {
        let out = self.run(ws, &["info"]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn server_pid(&self, ws: &Path) -> Option<u32> {
        self.info(ws)
            .get("server_pid")
            .map(|p| p.parse().expect("pid"))
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        for ws in &self.workspaces {
            let _ = self.run(ws, &["shutdown"]);
        }
    }
}

/// The build identity a client presents instead of its own (test-only).
const TEST_BUILD_ID_ENV: &str = "DISTBUILD_TEST_BUILD_ID";

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The build's `job_finished` events' `cached` flags.
fn cached_flags(out: &Output) -> Vec<bool> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "job_finished")
        .map(|e| e["cached"].as_bool().expect("cached flag"))
        .collect()
}

/// Whether `pid` is a live process (not gone, not a zombie waiting for a
/// parent that will not reap it).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "waited too long for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_build_starts_the_server_and_the_next_one_reuses_it_fully_cached() {
    let mut home = Home::new();
    let ws = home.workspace("hello");
    assert_eq!(home.server_pid(&ws), None);

    let first = home.build(&ws, &[]);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    assert_eq!(cached_flags(&first), [false; 4]);
    let pid = home.server_pid(&ws).expect("a server runs");
    assert!(alive(pid));
    // `ps` tells servers apart by workspace.
    // The kernel keeps 15 bytes of a process name (`ps -e`); the full name
    // is its argv[0] (`ps -f`, `ps aux`).
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).expect("comm");
    assert_eq!(comm.trim(), "distbuild(hello");
    let args = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let argv0 = args.split(|b| *b == 0).next().unwrap_or_default();
    assert_eq!(String::from_utf8_lossy(argv0), "distbuild(hello)");
    let info = home.info(&ws);
    assert!(
        info["output_base"].contains("/.cache/distbuild/"),
        "{info:?}"
    );
    assert!(info["server_address"].starts_with("127.0.0.1:"), "{info:?}");

    let second = home.build(&ws, &[]);
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
    assert_eq!(cached_flags(&second), [true; 4], "fully cached");
    assert_eq!(home.server_pid(&ws), Some(pid), "the same server");

    // Shut down: nothing left running; the cache outlives the server.
    let out = home.run(&ws, &["shutdown"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!alive(pid), "the server exited");
    assert_eq!(home.server_pid(&ws), None);
    let third = home.build(&ws, &[]);
    assert_eq!(third.status.code(), Some(0), "{}", text(&third));
    assert_eq!(cached_flags(&third), [true; 4], "cached after a restart");
    assert_ne!(home.server_pid(&ws), Some(pid), "a new server");
}

#[test]
fn two_workspaces_get_two_servers_and_another_version_is_replaced() {
    let mut home = Home::new();
    let (a, b) = (home.workspace("a"), home.workspace("b"));
    for ws in [&a, &b] {
        let out = home.build(ws, &[]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    let (pa, pb) = (
        home.server_pid(&a).expect("a's server"),
        home.server_pid(&b).expect("b's server"),
    );
    assert_ne!(pa, pb);
    assert_ne!(home.info(&a)["output_base"], home.info(&b)["output_base"]);

    // A client of another build identity stops a's server and starts its
    // own.
    let out = home
        .command(&a, &["build", "--json", "--graph", "graph.json"])
        .env(TEST_BUILD_ID_ENV, "another-version")
        .output()
        .expect("build");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another version"),
        "{}",
        text(&out)
    );
    let restarted = home.server_pid(&a).expect("a server");
    assert_ne!(restarted, pa);
    assert!(!alive(pa), "the old server exited");
    assert!(home.info(&a)["server_version"].contains("another-version"));
    assert_eq!(home.server_pid(&b), Some(pb), "b's server untouched");
}

#[test]
fn a_second_command_waits_for_the_lock_or_fails_fast() {
    let mut home = Home::new();
    let ws = home.workspace("locked");
    let out = home.build(&ws, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // Another command holds the lock (this test stands for it).
    let base = PathBuf::from(&home.info(&ws)["output_base"]);
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(base.join("lock"))
        .expect("open the lock");
    lock.lock().expect("take the lock");
    std::fs::write(base.join("lock"), "4242").expect("write the holder");

    let out = home.build(&ws, &["--block-for-lock=false"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        "error: Another command (pid 4242) is running. Waiting for it to complete..."
    );

    let mut waiting = home
        .command(&ws, &["build", "--json", "--graph", "graph.json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stderr = waiting.stderr.take().expect("stderr");
    let said = std::thread::spawn(move || {
        use std::io::Read;
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        waiting.try_wait().expect("poll").is_none(),
        "it waits for the lock"
    );
    lock.unlock().expect("release the lock");
    let status = waiting.wait().expect("wait");
    let said = said.join().expect("stderr");
    assert_eq!(status.code(), Some(0), "{said}");
    assert!(
        said.contains("Another command (pid 4242) is running. Waiting for it to complete..."),
        "{said}"
    );
}

#[test]
fn an_idle_server_exits_on_its_own() {
    let mut home = Home::new();
    let ws = home.workspace("idle");
    let out = home.build(&ws, &["--max-idle-secs", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let pid = home.server_pid(&ws).expect("a server");
    wait_until("the idle server to exit", Duration::from_secs(30), || {
        !alive(pid)
    });
    assert_eq!(home.server_pid(&ws), None, "its info file is gone");
}

#[test]
fn ctrl_c_cancels_the_build_on_the_server_and_the_next_build_works() {
    let mut home = Home::new();
    let ws = home.workspace("interrupted");
    let marks = home.dir.path().join("marks");
    std::fs::create_dir_all(&marks).expect("mkdir");
    // The job runs in its own PID namespace: it is found by a sleep no
    // other process runs.
    let sleep = format!("60.{}", std::process::id());
    let long = serde_json::json!({"Jobs": [{
        "ID": support::id("long job"),
        "Name": "long job",
        "Cmds": [{"Exec": ["/bin/sh", "-c", format!(
            "echo started > {m}/pid; sleep {sleep}; touch {m}/finished",
            m = marks.display()
        )]}],
    }]});
    std::fs::write(ws.join("long.json"), long.to_string()).expect("write graph");
    let marks_flag = marks.display().to_string();
    let build = home
        .command(
            &ws,
            &[
                "build",
                "--json",
                "--graph",
                "long.json",
                "--sandbox-writable-path",
                &marks_flag,
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_until("the job to start", Duration::from_secs(60), || {
        std::fs::read_to_string(marks.join("pid")).is_ok_and(|p| !p.trim().is_empty())
    });
    let job_alive = || {
        std::process::Command::new("pgrep")
            .args(["-f", &format!("sleep {sleep}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(job_alive(), "the job's sleep is not running");
    let server = home.server_pid(&ws).expect("a server");
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    assert_eq!(
        unsafe { libc::kill(build.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    let out = support::DrainedChild::new(build).finish();
    assert_eq!(out.code, Some(130), "{}", out.describe());
    assert!(out.stderr.contains("cancelled"), "{}", out.describe());
    // The job is stopped on the server (the worker's next heartbeat), the
    // server stays up.
    wait_until("the job to be killed", Duration::from_secs(20), || {
        !job_alive()
    });
    assert!(!marks.join("finished").exists());
    assert_eq!(home.server_pid(&ws), Some(server));
    let next = home.build(&ws, &["--sandbox-writable-path", &marks_flag]);
    assert_eq!(next.status.code(), Some(0), "{}", text(&next));
    assert_eq!(home.server_pid(&ws), Some(server));
}

#[test]
fn a_server_that_cannot_start_is_reported_with_its_log() {
    let mut home = Home::new();
    let ws = home.workspace("broken");
    // The coordinator's state directory is a file: the server cannot open
    // its store and exits.
    let base = home.dir.path().join("base");
    std::fs::create_dir_all(&base).expect("mkdir");
    std::fs::write(base.join("coordinator"), "not a directory").expect("write");
    let out = home.build(&ws, &["--output-base", base.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut lines = stderr.lines();
    let first = lines.next().unwrap_or_default();
    assert!(
        first.starts_with("error: the local server exited at start"),
        "{stderr}"
    );
    assert!(first.contains("server.log"), "{stderr}");
    // Then the log's tail, which says what went wrong.
    let tail: Vec<&str> = lines.collect();
    assert!(
        tail.iter().any(|l| l.contains("coordinator")),
        "the log tail names the problem: {stderr}"
    );
    assert!(
        !std::fs::exists(base.join("server.json")).unwrap_or(true),
        "no server left behind"
    );
}
