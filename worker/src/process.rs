//! The process seam: how a job's `exec` command becomes a process. The
//! production runner uses tokio::process, each process in its own process
//! group so that a killed job takes its children with it; tests and
//! simulations may pass their own [`ProcessRunner`].

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use futures::future::BoxFuture;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::cgroup::{GroupLimits, JobGroup, JobLimiter};
use crate::sandbox::wire::Spawn;
use crate::sandbox::{JobLimits, Sandbox, check_program};

mod child;
mod slots;

use child::{CappedBuffer, die_with_the_worker, read_capped};

/// How long output is still read after a process exits (from whatever
/// escaped its process group and still holds the pipes).
pub const OUTPUT_DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// One process to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// The program (a path, or a name looked up in PATH).
    pub program: OsString,
    /// Arguments after the program name.
    pub args: Vec<OsString>,
    /// `None`: inherit the worker's environment. `Some`: exactly these
    /// variables and no others.
    pub env: Option<Vec<(OsString, OsString)>>,
    /// Working directory.
    pub cwd: PathBuf,
    /// The job's own directory: in a sandbox, the one place it may write.
    pub job_dir: PathBuf,
    /// Most bytes of stdout (and, separately, stderr) to keep; the rest is
    /// read and discarded.
    pub max_output_bytes: usize,
}

/// What a finished process left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessOutput {
    /// Its exit status; 128 + the signal number when a signal killed it.
    pub exit_code: i32,
    /// The head of its stdout, at most `max_output_bytes`.
    pub stdout: Vec<u8>,
    /// The head of its stderr, at most `max_output_bytes`.
    pub stderr: Vec<u8>,
    /// Whether stdout was longer than what was kept.
    pub stdout_truncated: bool,
    /// Whether stderr was longer than what was kept.
    pub stderr_truncated: bool,
    /// A job limit the process ran into, in words (its exit says so).
    pub limit_hit: Option<String>,
}

/// Runs processes. Dropping the future returned by `run` must kill the
/// process and everything it started.
pub trait ProcessRunner: Send + Sync + 'static {
    /// Runs `spec` to completion, stdin empty. An error means it could not
    /// be run at all (e.g. the program does not exist).
    fn run(&self, spec: ProcessSpec) -> BoxFuture<'_, io::Result<ProcessOutput>>;
}

/// Runs real processes with tokio::process: in a [`Sandbox`] when given,
/// under the job limits.
#[derive(Debug, Clone)]
pub struct TokioProcessRunner {
    sandbox: Option<std::sync::Arc<Sandbox>>,
    limits: JobLimits,
    groups: Option<std::sync::Arc<JobLimiter>>,
    slots: Option<std::sync::Arc<slots::SlotSandboxes>>,
}

impl Default for TokioProcessRunner {
    /// Unconfined, without limits (tests of the runner itself).
    fn default() -> Self {
        Self {
            sandbox: None,
            limits: JobLimits {
                memory_bytes: 0,
                file_bytes: 0,
            },
            groups: None,
            slots: None,
        }
    }
}

impl TokioProcessRunner {
    /// A runner confining every process in `sandbox` (if any) under the
    /// rlimits of `limits`, and each command in a group of `groups` (if
    /// any: the process and memory limits). A sandbox kept per slot
    /// (`Sandbox::kept_per_slot`) serves the job directories of its slots.
    pub fn new(sandbox: Option<Sandbox>, limits: JobLimits, groups: Option<JobLimiter>) -> Self {
        let sandbox = sandbox.map(std::sync::Arc::new);
        let groups = groups.map(std::sync::Arc::new);
        let slots = sandbox.as_ref().and_then(|sandbox| {
            let kept = sandbox.kept.clone()?;
            Some(std::sync::Arc::new(slots::SlotSandboxes::new(
                std::sync::Arc::clone(sandbox),
                kept,
                groups.clone(),
            )))
        });
        Self {
            sandbox,
            limits,
            groups,
            slots,
        }
    }
}

impl ProcessRunner for TokioProcessRunner {
    fn run(&self, mut spec: ProcessSpec) -> BoxFuture<'_, io::Result<ProcessOutput>> {
        if let Some(sandbox) = &self.sandbox {
            let path = match &spec.env {
                // As std's Command: the command's own PATH, else the
                // worker's.
                Some(env) => env
                    .iter()
                    .find(|(k, _)| k == "PATH")
                    .map(|(_, v)| v.clone())
                    .or_else(|| std::env::var_os("PATH")),
                None => std::env::var_os("PATH"),
            };
            let found = match check_program(&spec.program, &spec.cwd, path.as_deref()) {
                Ok(found) => found,
                Err(e) => return Box::pin(async move { Err(e) }),
            };
            let kept = self
                .slots
                .as_ref()
                .and_then(|slots| Some((slots, slots.slot_of(&spec.job_dir)?)));
            if let Some((slots, slot)) = kept {
                return Box::pin(async move {
                    let spawn = request(&spec, found, self.limits);
                    match slots.run(slot, &spawn, spec.max_output_bytes).await {
                        Some(ran) => {
                            let (status, out, err, hit) = ran?;
                            Ok(finish(status, out, err, self.limits, hit))
                        }
                        None => {
                            let spec = confined(sandbox, spec);
                            run_process(spec, self.limits, self.group()?).await
                        }
                    }
                });
            }
            spec = confined(sandbox, spec);
        }
        Box::pin(async move {
            let group = self.group()?;
            run_process(spec, self.limits, group).await
        })
    }
}

/// The request a slot's kept sandbox gets for `spec`, its program found
/// at `path`.
fn request(spec: &ProcessSpec, path: PathBuf, limits: JobLimits) -> Spawn {
    let bytes = |s: &std::ffi::OsStr| s.as_bytes().to_vec();
    let pair = |(k, v): &(OsString, OsString)| [k.as_bytes(), b"=", v.as_bytes()].concat();
    Spawn {
        path: path.into_os_string().into_vec(),
        argv: std::iter::once(spec.program.as_os_str())
            .chain(spec.args.iter().map(|a| a.as_os_str()))
            .map(bytes)
            .collect(),
        replace_env: spec.env.is_some(),
        env: spec.env.iter().flatten().map(pair).collect(),
        cwd: bytes(spec.cwd.as_os_str()),
        max_address_space: limits.memory_bytes,
        max_file_bytes: limits.file_bytes,
    }
}

/// `spec` run under a bubblewrap of its own.
fn confined(sandbox: &Sandbox, mut spec: ProcessSpec) -> ProcessSpec {
    let program = std::mem::take(&mut spec.program);
    let args = std::mem::take(&mut spec.args);
    (spec.program, spec.args) = sandbox.wrap(&spec.job_dir, &spec.cwd, program, args);
    spec
}

impl TokioProcessRunner {
    /// A new cgroup for one command, with its limits, when there are
    /// cgroups.
    fn group(&self) -> io::Result<Option<(JobGroup, GroupLimits)>> {
        let Some(groups) = &self.groups else {
            return Ok(None);
        };
        match groups.job() {
            Ok(group) => Ok(Some((group, groups.limits()))),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("make the job's cgroup: {e}"),
            )),
        }
    }
}

/// The exit code a shell would show: the status, or 128 + signal.
pub fn exit_code_of(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        // Neither exited nor signalled (cannot happen for a waited child).
        (None, None) => -1,
    }
}

/// Kills a process group when dropped, unless disarmed.
struct GroupKiller {
    pgid: Option<i32>,
}

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // ESRCH (the group is already gone) is the usual, fine answer.
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sets the job limits on the process about to exec (inherited by all it
/// starts). RLIMIT_AS bounds memory, RLIMIT_FSIZE the bytes of any file.
fn apply_limits(command: &mut tokio::process::Command, limits: JobLimits) {
    let set = |resource, value: u64| -> io::Result<()> {
        if value == 0 {
            return Ok(());
        }
        let limit = libc::rlimit {
            rlim_cur: value as libc::rlim_t,
            rlim_max: value as libc::rlim_t,
        };
        // SAFETY: setrlimit reads the struct and is async-signal-safe.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec and calls
    // only setrlimit.
    unsafe {
        command.pre_exec(move || {
            set(libc::RLIMIT_AS, limits.memory_bytes)?;
            set(libc::RLIMIT_FSIZE, limits.file_bytes)?;
            Ok(())
        });
    }
}

async fn run_process(
    spec: ProcessSpec,
    limits: JobLimits,
    group: Option<(JobGroup, GroupLimits)>,
) -> io::Result<ProcessOutput> {
    let mut command = tokio::process::Command::new(&spec.program);
    command
        .args(&spec.args)
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own group, so the whole tree can be killed at once.
        .process_group(0);
    if let Some(env) = &spec.env {
        command.env_clear();
        command.envs(env.iter().map(|(k, v)| (k, v)));
    }
    die_with_the_worker(&mut command);
    apply_limits(&mut command, limits);
    if let Some((group, _)) = &group {
        let fds = group.procs_fds();
        // SAFETY: runs in the forked child before exec; `join` only
        // writes to open descriptors.
        unsafe {
            command.pre_exec(move || crate::cgroup::join(&fds));
        }
    }
    let mut child = command.spawn()?;
    let mut killer = GroupKiller {
        pgid: child.id().and_then(|pid| i32::try_from(pid).ok()),
    };
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut out = CappedBuffer::default();
    let mut err = CappedBuffer::default();
    let status;
    {
        let reads = async {
            let (a, b) = tokio::join!(
                read_capped(stdout, spec.max_output_bytes, &mut out),
                read_capped(stderr, spec.max_output_bytes, &mut err)
            );
            a.and(b)
        };
        tokio::pin!(reads);
        let mut reads_done = false;
        status = tokio::select! {
            status = child.wait() => status?,
            read = &mut reads => {
                read?;
                reads_done = true;
                child.wait().await?
            }
        };
        // Whatever the process left running in its group dies with it
        // (the group outlives its leader while members remain, so the ID
        // still names this group), and the pipes close.
        killer.kill();
        if !reads_done {
            // On timeout something outside the group holds the pipes: keep
            // what was read.
            if let Ok(read) = tokio::time::timeout(OUTPUT_DRAIN_AFTER_EXIT, &mut reads).await {
                read?;
            }
        }
    }
    // The counters are read only when the command failed.
    let hit = (!status.success())
        .then(|| {
            group
                .as_ref()
                .map(|(group, set)| (group.limits_hit(), *set))
        })
        .flatten();
    Ok(finish(status, out, err, limits, hit))
}

/// What a process left: its exit code, the heads of its output, and the
/// job limit it ran into, if any.
fn finish(
    status: ExitStatus,
    out: CappedBuffer,
    err: CappedBuffer,
    limits: JobLimits,
    group: Option<(crate::cgroup::LimitsHit, GroupLimits)>,
) -> ProcessOutput {
    let exit_code = exit_code_of(status);
    // SIGXFSZ ends a process that wrote past RLIMIT_FSIZE; a shell or
    // bwrap in between passes it on as 128 + the signal.
    let mut limit_hit = (limits.file_bytes > 0 && exit_code == 128 + libc::SIGXFSZ).then(|| {
        format!(
            "killed by SIGXFSZ: a file grew past the job file-size limit of {} bytes (--job-max-file-bytes)",
            limits.file_bytes
        )
    });
    if let Some((hit, set)) = group
        && exit_code != 0
    {
        if hit.memory {
            limit_hit = Some(format!(
                "exit code {exit_code}: killed for memory, the job may use at most {} bytes (--job-max-memory)",
                set.memory_bytes
            ));
        } else if hit.processes {
            limit_hit = Some(format!(
                "exit code {exit_code} after a fork was refused: the job may run at most {} processes at once (--job-max-processes)",
                set.processes
            ));
        }
    }
    ProcessOutput {
        exit_code,
        limit_hit,
        stdout: out.kept,
        stderr: err.kept,
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::DEFAULT_LIMITS;

    fn sh(script: &str, max_output_bytes: usize) -> ProcessSpec {
        ProcessSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: None,
            cwd: std::env::temp_dir(),
            job_dir: std::env::temp_dir(),
            max_output_bytes,
        }
    }

    #[tokio::test]
    async fn captures_output_and_exit_codes() {
        let runner = TokioProcessRunner::default();
        let cases: &[(&str, i32, &[u8], &[u8])] = &[
            ("echo out; echo err >&2", 0, b"out\n", b"err\n"),
            ("exit 3", 3, b"", b""),
            ("kill -TERM $$", 128 + 15, b"", b""),
        ];
        for (script, code, stdout, stderr) in cases {
            let output = runner.run(sh(script, 1024)).await.expect("runs");
            assert_eq!(output.exit_code, *code, "{script}");
            assert_eq!(output.stdout, *stdout, "{script}");
            assert_eq!(output.stderr, *stderr, "{script}");
        }
    }

    #[tokio::test]
    async fn keeps_the_head_of_long_output() {
        let output = TokioProcessRunner::default()
            .run(sh("yes | head -c 100000", 10))
            .await
            .expect("runs");
        assert_eq!(output.stdout, b"y\ny\ny\ny\ny\n");
        assert!(output.stdout_truncated && !output.stderr_truncated);
    }

    #[tokio::test]
    async fn background_children_do_not_hold_the_job() {
        let started = std::time::Instant::now();
        let output = TokioProcessRunner::default()
            .run(sh("sleep 30 & echo done", 1024))
            .await
            .expect("runs");
        assert_eq!(output.stdout, b"done\n");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_missing_program_is_an_error() {
        let mut spec = sh("", 10);
        spec.program = "/nonexistent/program".into();
        let err = TokioProcessRunner::default()
            .run(spec)
            .await
            .expect_err("no program");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn a_kept_sandbox_that_cannot_start_gives_way_to_one_bubblewrap_per_command() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let root = dir.path().join("sandbox");
        let job_dir = root.join("slot-0").join("7");
        std::fs::create_dir_all(&job_dir).expect("mkdir");
        // An init that exits at once never greets.
        let sandbox = Sandbox::new(Vec::new(), Vec::new(), false)
            .expect("bubblewrap works here")
            .kept_per_slot(vec!["/bin/false".into()], root);
        let runner = TokioProcessRunner::new(Some(sandbox), DEFAULT_LIMITS, None);
        let slots = runner.slots.clone().expect("kept per slot");
        assert_eq!(
            slots.slot_of(&job_dir),
            Some(dir.path().join("sandbox/slot-0"))
        );
        let mut spec = sh("echo confined; test -w / || echo read-only", 1024);
        spec.job_dir = job_dir.clone();
        spec.cwd = job_dir.clone();
        for _ in 0..2 {
            let output = runner.run(spec.clone()).await.expect("runs");
            assert_eq!(output.stdout, b"confined\nread-only\n");
            assert_eq!(slots.slot_of(&job_dir), None, "kept sandboxes still tried");
        }
    }

    #[tokio::test]
    async fn dropping_the_run_kills_the_process_group() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let marker = dir.path().join("survived");
        let script = format!("(sleep 1; touch {}) & sleep 30", marker.display());
        let runner = TokioProcessRunner::default();
        let run = runner.run(sh(&script, 10));
        let _ = tokio::time::timeout(Duration::from_millis(300), run).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!marker.exists(), "the job's child outlived the job");
    }
}
