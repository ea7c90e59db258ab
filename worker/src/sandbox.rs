//! The job sandbox: every command of a job runs under bubblewrap (`bwrap`)
//! in its own mount, PID, IPC and UTS namespaces — and network namespace,
//! unless the worker allows the network — with the host's filesystem
//! read-only, a private `/tmp`, a minimal `/dev`, its own `/proc`, the
//! worker's directories (cache, other jobs, keys) hidden, and only the
//! job's own directory (and any `--sandbox-writable-path`) writable. When
//! the command's first process exits, bwrap's PID namespace ends and every
//! process the job started dies with it, a new session's included.
//! Resource limits (address space, file size) are set on the sandbox's
//! processes before bwrap runs (`process`).
//!
//! A worker keeps one sandbox per slot (see [`KeptPerSlot`]): its
//! namespaces are made once and its init ([`init`]) forks each command
//! inside, cleaning up between jobs, so a job does not pay for a new
//! bubblewrap.

pub mod init;
pub mod wire;

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};

/// Flags of `distbuild worker` for the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SandboxKind {
    /// Namespaces through bubblewrap (the default where `bwrap` works).
    #[default]
    Namespaces,
    /// No sandbox: jobs run as the worker in a plain directory (a warning
    /// is logged at start-up).
    None,
}

/// Per-job resource limits set as rlimits (0 = no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// Address space of each process of the job, in bytes (RLIMIT_AS):
    /// the memory bound where there is no memory cgroup.
    pub memory_bytes: u64,
    /// Largest file a job may write, in bytes (RLIMIT_FSIZE): a write past
    /// it fails and the process gets SIGXFSZ.
    pub file_bytes: u64,
}

/// The default limits: 16 GiB of memory, 4 GiB per file.
pub const DEFAULT_LIMITS: JobLimits = JobLimits {
    memory_bytes: 16 << 30,
    file_bytes: 4 << 30,
};

/// Processes a job command may run at once by default.
pub const DEFAULT_MAX_PROCESSES: u64 = 4096;

/// How a worker's jobs are confined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// The bubblewrap program.
    pub bwrap: PathBuf,
    /// Directories hidden behind an empty tmpfs (the worker's own: cache,
    /// sandboxes, state).
    pub hidden_dirs: Vec<PathBuf>,
    /// Files hidden behind an empty one (keys).
    pub hidden_files: Vec<PathBuf>,
    /// Paths jobs may write besides their own directory.
    pub writable: Vec<PathBuf>,
    /// Whether jobs keep the host's network.
    pub network: bool,
    /// Sandboxes kept per slot, if any (`None`: one bubblewrap per
    /// command).
    pub kept: Option<KeptPerSlot>,
}

/// Sandboxes kept per slot: the job directories `<root>/<slot>/<job>` of a
/// slot run in one sandbox, made on the slot's first command with
/// `<root>/<slot>` as its writable directory, whose init forks each
/// command and cleans up after each (see [`init`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptPerSlot {
    /// The init's command line (`distbuild sandbox-init`).
    pub init: Vec<OsString>,
    /// The directory whose subdirectories are the slots'.
    pub root: PathBuf,
}

/// The init's command line in this binary: `<this executable>
/// sandbox-init` (the worker runs as `distbuild`).
pub fn this_binary_as_init() -> io::Result<Vec<OsString>> {
    Ok(vec![
        std::env::current_exe()?.into_os_string(),
        "sandbox-init".into(),
    ])
}

/// Why the sandbox cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No `bwrap` on PATH.
    #[error(
        "--sandbox namespaces needs bubblewrap: install it (Debian: apt install bubblewrap), or pass --sandbox none to run jobs unconfined"
    )]
    NoBwrap,
    /// `bwrap` is there but cannot make namespaces here.
    #[error(
        "--sandbox namespaces: bubblewrap cannot create namespaces on this machine ({0}); pass --sandbox none to run jobs unconfined"
    )]
    Unusable(String),
    /// A `--sandbox-writable-path` is not an absolute, existing path.
    #[error("--sandbox-writable-path {}: {problem}", path.display())]
    BadWritablePath {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// Finds the file `program` names to execute, as the worker would find it
/// (a path with a `/`, against `cwd` if relative; else the first match in
/// `path`, the command's PATH), so that a missing program fails its job
/// with the same error confined as unconfined, not as an exit code of
/// bubblewrap's. The sandbox sees the host's files, so the worker's view
/// is the job's (but for `/tmp` and the hidden paths).
pub fn check_program(program: &OsStr, cwd: &Path, path: Option<&OsStr>) -> io::Result<PathBuf> {
    use std::os::unix::ffi::OsStrExt as _;
    let executable = |candidate: &Path| -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::metadata(candidate)?;
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            Ok(())
        } else {
            Err(io::Error::from(io::ErrorKind::PermissionDenied))
        }
    };
    if program.as_bytes().contains(&b'/') {
        let found = cwd.join(program);
        return executable(&found).map(|()| found);
    }
    let mut last = io::Error::from(io::ErrorKind::NotFound);
    for dir in std::env::split_paths(path.unwrap_or_default()) {
        let found = dir.join(program);
        match executable(&found) {
            Ok(()) => return Ok(found),
            Err(e) => last = e,
        }
    }
    Err(match last.kind() {
        // "not found" everywhere reads as the OS says it.
        io::ErrorKind::PermissionDenied => last,
        _ if last.raw_os_error().is_some() => last,
        _ => io::Error::from_raw_os_error(libc::ENOENT),
    })
}

/// Finds `bwrap` on PATH.
pub fn find_bwrap() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("bwrap"))
        .find(|candidate| candidate.is_file())
}

impl Sandbox {
    /// A sandbox hiding `hidden` (directories and files; one that does not
    /// exist has nothing to hide) and letting jobs write `writable` too;
    /// checks the writable paths and that bubblewrap works here (it runs
    /// `true` inside once).
    pub fn new(
        hidden: Vec<PathBuf>,
        writable: Vec<PathBuf>,
        network: bool,
    ) -> Result<Self, SandboxError> {
        for path in &writable {
            let problem = if !path.is_absolute() {
                Some("must be absolute".to_string())
            } else {
                std::fs::metadata(path)
                    .err()
                    .map(|e| format!("cannot be used: {e}"))
            };
            if let Some(problem) = problem {
                return Err(SandboxError::BadWritablePath {
                    path: path.clone(),
                    problem,
                });
            }
        }
        let bwrap = find_bwrap().ok_or(SandboxError::NoBwrap)?;
        let (hidden_dirs, hidden_files) = hidden
            .into_iter()
            .filter(|path| path.exists())
            .partition(|path| path.is_dir());
        let sandbox = Self {
            bwrap,
            hidden_dirs,
            hidden_files,
            writable,
            network,
            kept: None,
        };
        let probe_dir = std::env::temp_dir();
        let (program, args) = sandbox.wrap(&probe_dir, &probe_dir, "true".into(), Vec::new());
        let probe = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .output()
            .map_err(|e| SandboxError::Unusable(e.to_string()))?;
        if !probe.status.success() {
            let said = String::from_utf8_lossy(&probe.stderr);
            return Err(SandboxError::Unusable(distbuild_proto::net::one_line(
                &said,
            )));
        }
        Ok(sandbox)
    }

    /// Keeps a sandbox per slot of `root` (see [`KeptPerSlot`]), its init
    /// started as `init`.
    /// An empty `init` keeps none.
    pub fn kept_per_slot(mut self, init: Vec<OsString>, root: PathBuf) -> Self {
        self.kept = (!init.is_empty()).then_some(KeptPerSlot { init, root });
        self
    }

    /// The program and arguments that run `program args` confined, with
    /// `job_dir` writable and `cwd` as working directory.
    pub fn wrap(
        &self,
        job_dir: &Path,
        cwd: &Path,
        program: OsString,
        args: Vec<OsString>,
    ) -> (OsString, Vec<OsString>) {
        self.confine(job_dir, None, cwd, program, args)
    }

    /// The command line of a slot's kept sandbox: its init (`init`, the
    /// program and its arguments) confined as [`Sandbox::wrap`] confines
    /// a command, with `slot` writable, and the init's program bound
    /// read-only at its own path, so that it is there even when it lies
    /// under the sandbox's private `/tmp` or a hidden directory.
    pub fn wrap_init(&self, slot: &Path, init: &[OsString]) -> (OsString, Vec<OsString>) {
        let (program, args) = init.split_first().expect("an init command line");
        self.confine(
            slot,
            Some(Path::new(program)),
            slot,
            program.clone(),
            args.to_vec(),
        )
    }

    fn confine(
        &self,
        job_dir: &Path,
        read_only: Option<&Path>,
        cwd: &Path,
        program: OsString,
        args: Vec<OsString>,
    ) -> (OsString, Vec<OsString>) {
        let mut out: Vec<OsString> = Vec::with_capacity(args.len() + 40);
        let mut push = |items: &[&std::ffi::OsStr]| {
            out.extend(items.iter().map(|s| s.to_os_string()));
        };
        push(&[
            "--die-with-parent".as_ref(),
            "--new-session".as_ref(),
            "--unshare-pid".as_ref(),
            "--unshare-ipc".as_ref(),
            "--unshare-uts".as_ref(),
        ]);
        if !self.network {
            push(&["--unshare-net".as_ref()]);
        }
        push(&[
            "--ro-bind".as_ref(),
            "/".as_ref(),
            "/".as_ref(),
            "--dev".as_ref(),
            "/dev".as_ref(),
            "--proc".as_ref(),
            "/proc".as_ref(),
            "--tmpfs".as_ref(),
            "/tmp".as_ref(),
        ]);
        // Writable paths first, hidden ones over them (a worker's cache
        // may lie inside a writable path), the job's own directory last.
        for path in &self.writable {
            push(&["--bind".as_ref(), path.as_os_str(), path.as_os_str()]);
        }
        for dir in &self.hidden_dirs {
            push(&["--tmpfs".as_ref(), dir.as_os_str()]);
        }
        for file in &self.hidden_files {
            push(&["--ro-bind".as_ref(), "/dev/null".as_ref(), file.as_os_str()]);
        }
        if let Some(path) = read_only {
            push(&["--ro-bind".as_ref(), path.as_os_str(), path.as_os_str()]);
        }
        push(&[
            "--bind".as_ref(),
            job_dir.as_os_str(),
            job_dir.as_os_str(),
            "--chdir".as_ref(),
            cwd.as_os_str(),
            "--".as_ref(),
            program.as_os_str(),
        ]);
        out.extend(args);
        (self.bwrap.clone().into_os_string(), out)
    }
}
