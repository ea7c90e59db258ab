//! Local server mode, as Bazel's client does it: with no cluster configured,
//! `distbuild build` uses a background server of the workspace (one
//! coordinator and one worker in one process, `distbuild server`), finding
//! it through files in the workspace's output base or starting it.
//!
//! The output base is `$XDG_CACHE_HOME/distbuild/<user>/<hash of the
//! workspace's canonical path>/` (or `~/.cache/...`), or `--output-base`.
//! In it:
//! - `server.json`: the running server's pid, address, build identity and
//!   start time, written by the server once it serves, removed when it
//!   exits (a stale one names a dead pid or an address that does not
//!   answer);
//! - `lock`: held (flock) by the one client command using the server, with
//!   its pid inside; the server counts as idle while nobody holds it;
//! - `server.log`: the server's stderr; `coordinator/`, `cache/`: its state.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use distbuild_proto::tls::{Security, TlsFileError, TlsMaterial};
use serde::{Deserialize, Serialize};

pub use crate::args::DEFAULT_MAX_IDLE_SECS;

/// Test-only: the build identity to present instead of the binary's own
/// (tests use it to stand for another version).
pub const TEST_BUILD_ID_ENV: &str = "DISTBUILD_TEST_BUILD_ID";
/// How long a client waits for a server it started to serve.
pub const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client waits for a server it asked to stop to exit.
pub const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of the server's log quoted when it fails to start.
const LOG_TAIL_LINES: usize = 20;

/// Why local server mode cannot go ahead. The message is one line; a
/// server that failed to start is followed by its log's tail
/// ([`LocalError::quotes_log`]).
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// `--output-base` cannot be made absolute.
    #[error("--output-base {}: {problem}", path.display())]
    OutputBaseFlag {
        /// The flag's value.
        path: PathBuf,
        /// Why.
        problem: std::io::Error,
    },
    /// There is no cache directory to put the output base in.
    #[error("neither XDG_CACHE_HOME nor HOME is set: pass --output-base")]
    NoCacheDir,
    /// The workspace (`--source-dir`) cannot be found.
    #[error("workspace {}: {problem}", path.display())]
    Workspace {
        /// The directory given.
        path: PathBuf,
        /// Why.
        problem: std::io::Error,
    },
    /// Another command holds the output base's lock.
    #[error("Another command (pid {holder}) is running. Waiting for it to complete...")]
    Locked {
        /// The holder's pid as its lock file says, or `?`.
        holder: String,
    },
    /// A file of the output base could not be used.
    #[error("{action} {}: {problem}", path.display())]
    File {
        /// What was being done ("open", "lock", "create the output base").
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        problem: std::io::Error,
    },
    /// The output base belongs to another user.
    #[error("output base {} belongs to uid {owner}, not to this user (uid {me}): pass --output-base", path.display())]
    NotOwned {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's uid.
        me: u32,
    },
    /// This program's executable cannot be found (to start the server).
    #[error("find this executable: {0}")]
    NoExecutable(std::io::Error),
    /// The server process could not be started.
    #[error("start the local server: {0}")]
    Spawn(std::io::Error),
    /// The server exited before it served.
    #[error("the local server exited at start ({status}); its log {} ends: (below)", log.display())]
    ExitedAtStart {
        /// How it exited.
        status: std::process::ExitStatus,
        /// Its log.
        log: PathBuf,
    },
    /// The server did not serve in time.
    #[error("the local server did not start within {SERVER_START_TIMEOUT:?}; its log {} ends: (below)", log.display())]
    StartTimeout {
        /// Its log.
        log: PathBuf,
    },
}

impl LocalError {
    /// Whether the message points to the server log, whose tail is then
    /// printed below it.
    pub fn quotes_log(&self) -> bool {
        matches!(
            self,
            LocalError::ExitedAtStart { .. } | LocalError::StartTimeout { .. }
        )
    }
}

/// `problem` doing `action` on `path`, as a [`LocalError`].
fn file_error(action: &'static str, path: PathBuf) -> impl FnOnce(std::io::Error) -> LocalError {
    move |problem| LocalError::File {
        action,
        path,
        problem,
    }
}

/// What `server.json` says about the running server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// The server's process ID.
    pub pid: u32,
    /// The coordinator's address (HOST:PORT).
    pub addr: String,
    /// The binary's build identity (see [`build_identity`]).
    pub build_id: String,
    /// The crate version, for `distbuild info`.
    pub version: String,
    /// The canonical workspace path.
    pub workspace: PathBuf,
    /// Unix time the server started serving, in milliseconds.
    pub started_unix_ms: u64,
    /// The paths its jobs may write besides their own directories.
    #[serde(default)]
    pub sandbox_writable_paths: Vec<PathBuf>,
}

/// The files of one output base.
#[derive(Debug, Clone)]
pub struct OutputBase {
    /// The output base directory (absolute).
    pub dir: PathBuf,
}

impl OutputBase {
    /// The output base of `workspace` (a canonical path) for this user:
    /// `override_dir` if given, else under the user's cache directory.
    pub fn for_workspace(
        workspace: &Path,
        override_dir: Option<&Path>,
    ) -> Result<Self, LocalError> {
        if let Some(dir) = override_dir {
            return Ok(Self {
                dir: std::path::absolute(dir).map_err(|problem| LocalError::OutputBaseFlag {
                    path: dir.to_path_buf(),
                    problem,
                })?,
            });
        }
        let cache = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
                Some(home) => PathBuf::from(home).join(".cache"),
                None => return Err(LocalError::NoCacheDir),
            },
        };
        let user = std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty() && !u.contains('/'))
            .unwrap_or_else(|| // SAFETY: getuid cannot fail and touches no memory.
            unsafe { libc::getuid() }.to_string());
        use sha1::Digest as _;
        let hash = hex::encode(sha1::Sha1::digest(workspace.as_os_str().as_encoded_bytes()));
        Ok(Self {
            dir: cache.join("distbuild").join(user).join(&hash[..32]),
        })
    }

    /// Creates the output base if missing and makes it private to this
    /// user (0700): it holds the server's keys, so only its owner can
    /// call the server. One owned by another user is refused.
    pub fn ensure_private(&self) -> Result<(), LocalError> {
        use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(file_error("create the output base", self.dir.clone()))?;
        let meta = std::fs::metadata(&self.dir)
            .map_err(file_error("inspect the output base", self.dir.clone()))?;
        // SAFETY: getuid cannot fail and touches no memory.
        let me = unsafe { libc::getuid() };
        if meta.uid() != me {
            return Err(LocalError::NotOwned {
                path: self.dir.clone(),
                owner: meta.uid(),
                me,
            });
        }
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
                .map_err(file_error("make the output base private", self.dir.clone()))?;
        }
        Ok(())
    }

    /// `tls/`: the server's CA, its parts' certificates and the client's,
    /// made fresh at every server start.
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    /// `server.json`: the running server's [`ServerInfo`].
    pub fn info_path(&self) -> PathBuf {
        self.dir.join("server.json")
    }

    /// `server.log`: the server's stderr.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// `lock`: held by the client command using the server.
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join("lock")
    }

    /// The server's info file, if present and readable.
    pub fn read_info(&self) -> Option<ServerInfo> {
        let bytes = std::fs::read(self.info_path()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Writes the info file atomically (a temporary file renamed over it).
    pub fn write_info(&self, info: &ServerInfo) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("server.json.{}", std::process::id()));
        std::fs::write(
            &tmp,
            serde_json::to_vec(info).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, self.info_path())
    }

    /// Removes the info file if it still names process `pid`.
    pub fn remove_info_of(&self, pid: u32) {
        if self.read_info().is_some_and(|info| info.pid == pid) {
            let _ = std::fs::remove_file(self.info_path());
        }
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

/// This binary's build identity: its version and its executable file's
/// size, modification time and inode, so a rebuilt or reinstalled binary
/// differs from the one a running server was started from.
/// [`TEST_BUILD_ID_ENV`] overrides it (tests only).
pub fn build_identity() -> String {
    if let Some(id) = std::env::var(TEST_BUILD_ID_ENV)
        .ok()
        .filter(|v| !v.is_empty())
    {
        return id;
    }
    use std::os::unix::fs::MetadataExt;
    let file = std::env::current_exe()
        .and_then(std::fs::metadata)
        .map(|m| {
            format!(
                "{:x}-{:x}.{:x}-{:x}",
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.ino()
            )
        })
        .unwrap_or_else(|_| "unknown".to_string());
    format!("{}+{file}", env!("CARGO_PKG_VERSION"))
}

/// Whether process `pid` is alive and is a distbuild server of this
/// output base.
pub fn is_our_server(pid: u32, base: &OutputBase) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let dir = base.dir.as_os_str().as_encoded_bytes();
    args.windows(2)
        .any(|w| w[0] == b"--output-base" && w[1] == dir)
}

/// Opens (creating) the output base's lock file, keeping its content.
fn open_lock_file(base: &OutputBase) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(base.lock_path())
}

/// The exclusive lock of an output base, held for one client command.
pub struct ClientLock {
    _file: File,
}

/// Takes the output base's lock: at once if free; else, if `block`,
/// after saying once on `err` who holds it and waiting; else fails
/// ([`LocalError::Locked`], with that message).
pub fn lock_output_base(
    base: &OutputBase,
    block: bool,
    err: &mut dyn Write,
) -> Result<ClientLock, LocalError> {
    base.ensure_private()?;
    let mut file = open_lock_file(base).map_err(file_error("open", base.lock_path()))?;
    // The server tests the lock for idleness by taking it for an instant:
    // a lock found taken is tried again briefly before it counts as held.
    let mut tried = file.try_lock();
    for _ in 0..5 {
        if !matches!(tried, Err(std::fs::TryLockError::WouldBlock)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        tried = file.try_lock();
    }
    match tried {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() { "?" } else { holder };
            let locked = LocalError::Locked {
                holder: holder.to_string(),
            };
            if !block {
                return Err(locked);
            }
            let _ = writeln!(err, "{locked}");
            file.lock().map_err(file_error("lock", base.lock_path()))?;
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(file_error("lock", base.lock_path())(e));
        }
    }
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(file, "{}", std::process::id());
    let _ = file.flush();
    Ok(ClientLock { _file: file })
}

/// Whether nobody holds the output base's lock (the server's idleness
/// test; it takes and drops the lock at once).
pub fn lock_is_free(base: &OutputBase) -> bool {
    let Ok(file) = open_lock_file(base) else {
        return false;
    };
    match file.try_lock() {
        Ok(()) => {
            let _ = file.unlock();
            true
        }
        Err(_) => false,
    }
}

/// How a client reaches the server of `base`, starting (or replacing) it
/// as needed.
pub struct ServerOptions<'a> {
    /// The canonical workspace path.
    pub workspace: &'a Path,
    /// `--max-idle-secs` of a server started now.
    pub max_idle_secs: u64,
    /// The paths the server's jobs may write besides their own
    /// directories (absolute): a server with others is restarted, as
    /// Bazel restarts its server for other startup options.
    pub sandbox_writable_paths: &'a [PathBuf],
}

/// The address of a running server of this build identity for `base`:
/// the one found, or a new one started in the background (a server of
/// another identity is stopped first).
pub async fn ensure_server(
    base: &OutputBase,
    options: &ServerOptions<'_>,
    err: &mut dyn Write,
) -> Result<ServerInfo, LocalError> {
    let identity = build_identity();
    if let Some(info) = base.read_info() {
        if !is_our_server(info.pid, base) {
            // Stale: its process is gone.
            let _ = std::fs::remove_file(base.info_path());
        } else if !answers(&info.addr).await {
            // Alive but not answering: it holds the state directory, so it
            // is stopped before another starts.
            let _ = writeln!(
                err,
                "The server (pid {}) does not answer; restarting it.",
                info.pid
            );
            stop_server(base, &info).await?;
        } else if info.build_id != identity {
            let _ = writeln!(
                err,
                "The server (pid {}) is another version; restarting it.",
                info.pid
            );
            stop_server(base, &info).await?;
        } else if info.sandbox_writable_paths != options.sandbox_writable_paths {
            let _ = writeln!(
                err,
                "The server (pid {}) runs with other --sandbox-writable-path; restarting it.",
                info.pid
            );
            stop_server(base, &info).await?;
        } else {
            return Ok(info);
        }
    }
    start_server(base, options, &identity).await
}

/// Whether a coordinator answers at `addr` (a TCP connection within a
/// second).
async fn answers(addr: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

async fn start_server(
    base: &OutputBase,
    options: &ServerOptions<'_>,
    identity: &str,
) -> Result<ServerInfo, LocalError> {
    let exe = std::env::current_exe().map_err(LocalError::NoExecutable)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(base.log_path())
        .map_err(file_error("open", base.log_path()))?;
    let log_err = log
        .try_clone()
        .map_err(file_error("open", base.log_path()))?;
    let name = options
        .workspace
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".to_string());
    let mut command = std::process::Command::new(exe);
    use std::os::unix::process::CommandExt;
    command
        .arg0(format!("distbuild({name})"))
        .arg("server")
        .arg("--output-base")
        .arg(&base.dir)
        .arg("--workspace")
        .arg(options.workspace)
        .arg("--max-idle-secs")
        .arg(options.max_idle_secs.to_string())
        .args(options.sandbox_writable_paths.iter().flat_map(|p| {
            [
                std::ffi::OsStr::new("--sandbox-writable-path"),
                p.as_os_str(),
            ]
        }))
        .env(TEST_BUILD_ID_ENV, identity)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // SAFETY: setsid is async-signal-safe; it detaches the server from the
    // client's terminal and process group (no SIGHUP, no Ctrl-C).
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(LocalError::Spawn)?;
    let pid = child.id();
    let deadline = Instant::now() + SERVER_START_TIMEOUT;
    loop {
        if let Some(info) = base.read_info()
            && info.pid == pid
            && answers(&info.addr).await
        {
            // Not waited for: the server outlives this process (init adopts
            // it).
            drop(child);
            return Ok(info);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(LocalError::ExitedAtStart {
                status,
                log: base.log_path(),
            });
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(LocalError::StartTimeout {
                log: base.log_path(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asks the server of `info` to stop (SIGTERM) and waits for it to exit.
pub async fn stop_server(base: &OutputBase, info: &ServerInfo) -> Result<(), LocalError> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pid = Pid::from_raw(info.pid as i32);
    if kill(pid, Signal::SIGTERM).is_err() {
        base.remove_info_of(info.pid);
        return Ok(());
    }
    let deadline = Instant::now() + SERVER_STOP_TIMEOUT;
    while is_our_server(info.pid, base) {
        if Instant::now() > deadline {
            let _ = kill(pid, Signal::SIGKILL);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    base.remove_info_of(info.pid);
    Ok(())
}

/// The workspace (canonical `--source-dir`) and its output base.
fn workspace_and_base(
    source_dir: &Path,
    output_base: Option<&Path>,
) -> Result<(PathBuf, OutputBase), LocalError> {
    let workspace = std::fs::canonicalize(source_dir).map_err(|problem| LocalError::Workspace {
        path: source_dir.to_path_buf(),
        problem,
    })?;
    let base = OutputBase::for_workspace(&workspace, output_base)?;
    Ok((workspace, base))
}

/// What a local build needs: the lock of its output base (held until
/// dropped) and the server to build on.
pub struct LocalServer {
    /// The output base's lock, held for this command.
    pub lock: ClientLock,
    /// The server to build on.
    pub info: ServerInfo,
    /// Its output base.
    pub base: OutputBase,
}

impl LocalServer {
    /// How to call the server: with the client certificate it made in the
    /// output base.
    pub fn security(&self) -> Result<Security, TlsFileError> {
        let files = crate::certs::local_client_files(&self.base.tls_dir());
        Ok(Security::Tls(TlsMaterial::load(&files)?))
    }
}

/// Prints a local-mode failure: the one-line error, then the server log's
/// tail when the message points to it. Returns `code`.
pub fn fail(err: &mut dyn Write, code: i32, error: &LocalError, base: Option<&OutputBase>) -> i32 {
    crate::render::print_error(err, code, error);
    if let (true, Some(base)) = (error.quotes_log(), base) {
        for line in base.log_tail().lines() {
            let _ = writeln!(err, "    {line}");
        }
    }
    code
}

/// Locks the output base of the workspace at `source_dir` and finds or
/// starts its server; on failure prints the error and returns the exit
/// code (4 when the lock is held and `block` is false).
pub async fn prepare(
    source_dir: &Path,
    output_base: Option<&Path>,
    block: bool,
    max_idle_secs: u64,
    sandbox_writable_paths: &[PathBuf],
    err: &mut dyn Write,
) -> Result<LocalServer, i32> {
    use crate::exit_code;
    let (workspace, base) = workspace_and_base(source_dir, output_base)
        .map_err(|error| fail(err, exit_code::BAD_INPUT, &error, None))?;
    let lock = lock_output_base(&base, block, err)
        .map_err(|error| fail(err, exit_code::LOCKED, &error, None))?;
    let writable: Vec<PathBuf> = sandbox_writable_paths
        .iter()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
        .collect();
    let options = ServerOptions {
        workspace: &workspace,
        max_idle_secs,
        sandbox_writable_paths: &writable,
    };
    let info = ensure_server(&base, &options, err)
        .await
        .map_err(|error| fail(err, exit_code::UNREACHABLE, &error, Some(&base)))?;
    Ok(LocalServer { lock, info, base })
}

/// `distbuild info`: the output base, and the server's pid, address,
/// version and uptime (or that none runs).
pub async fn info_cli(args: crate::args::LocalArgs) -> i32 {
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let (workspace, base) = match workspace_and_base(&args.source_dir, args.output_base.as_deref())
    {
        Ok(found) => found,
        Err(error) => return fail(&mut err, crate::exit_code::BAD_INPUT, &error, None),
    };
    let _ = writeln!(out, "workspace: {}", workspace.display());
    let _ = writeln!(out, "output_base: {}", base.dir.display());
    match base.read_info().filter(|i| is_our_server(i.pid, &base)) {
        Some(info) => {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let _ = writeln!(out, "server_pid: {}", info.pid);
            let _ = writeln!(out, "server_address: {}", info.addr);
            let _ = writeln!(out, "server_version: {} ({})", info.version, info.build_id);
            let _ = writeln!(
                out,
                "server_uptime: {} s",
                now_ms.saturating_sub(info.started_unix_ms) / 1000
            );
        }
        None => {
            let _ = writeln!(out, "server: not running");
        }
    }
    crate::exit_code::OK
}

/// `distbuild shutdown`: stops the workspace's server, if one runs, and
/// waits for it to exit.
pub async fn shutdown_cli(args: crate::args::LocalArgs) -> i32 {
    let mut err = std::io::stderr();
    let (_, base) = match workspace_and_base(&args.source_dir, args.output_base.as_deref()) {
        Ok(found) => found,
        Err(error) => return fail(&mut err, crate::exit_code::BAD_INPUT, &error, None),
    };
    let Some(info) = base.read_info() else {
        return crate::exit_code::OK;
    };
    if !is_our_server(info.pid, &base) {
        let _ = std::fs::remove_file(base.info_path());
        return crate::exit_code::OK;
    }
    match stop_server(&base, &info).await {
        Ok(()) => crate::exit_code::OK,
        Err(error) => fail(&mut err, crate::exit_code::UNREACHABLE, &error, None),
    }
}
