//! Sandboxes kept per slot: the worker side of `distbuild sandbox-init`
//! (see [`crate::sandbox::init`]). A job directory `<root>/<slot>/<job>`
//! runs its commands in its slot's sandbox, started on the slot's first
//! command with `<root>/<slot>` as its one writable directory and kept
//! for the jobs after it; a slot runs one job at a time, so its sandbox
//! serves one command at a time. A command dropped before it ends (its
//! job timed out, its lease was revoked) takes the whole sandbox with it
//! — bubblewrap is killed, and with it every process in the namespace —
//! and so does a command after which the init could not clean up; the
//! slot's next command starts a new one. If a sandbox cannot be started
//! at all, the worker says so once and goes back to one bubblewrap per
//! command.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, Interest};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::child::{CappedBuffer, die_with_the_worker, read_capped};
use crate::cgroup::{GroupLimits, JobGroup, JobLimiter, LimitEvents, LimitsHit};
use crate::sandbox::wire::{self, HELLO, Outcome, REPLY_BYTES, Reply, Spawn};
use crate::sandbox::{KeptPerSlot, Sandbox};

/// How long a new sandbox may take to greet.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The most slots kept (a worker has one per job it runs at once).
const MAX_SLOTS: usize = 1024;

/// What a kept sandbox's own processes take of its cgroup besides the
/// job's limits: bubblewrap outside the namespace, bubblewrap's init and
/// ours inside; their memory.
const SANDBOX_OVERHEAD: GroupLimits = GroupLimits {
    processes: 3,
    memory_bytes: 32 << 20,
};

/// One slot's sandbox: bubblewrap (killed when this drops) running the
/// init, the socket to it, and the cgroup every process of it is in (its
/// commands inherit it: no cgroup made or joined per command), with its
/// event counters as the last command left them.
#[derive(Debug)]
struct Kept {
    bwrap: tokio::process::Child,
    socket: tokio::net::UnixStream,
    group: Option<(JobGroup, LimitEvents)>,
}

impl Drop for Kept {
    fn drop(&mut self) {
        let _ = self.bwrap.start_kill();
        // Removing the group waits for its processes to be gone.
        if let Some((group, _)) = self.group.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || drop(group))),
                Err(_) => drop(group),
            }
        }
    }
}

type Slot = Arc<Mutex<Option<Kept>>>;

/// The kept sandboxes, one per slot directory.
#[derive(Debug)]
pub(super) struct SlotSandboxes {
    sandbox: Arc<Sandbox>,
    kept: KeptPerSlot,
    groups: Option<Arc<JobLimiter>>,
    slots: std::sync::Mutex<HashMap<PathBuf, Slot>>,
    unusable: AtomicBool,
}

/// What a command left: its status, the heads of its output, and the
/// cgroup limits it ran into (with the limits), if there are cgroups.
pub(super) type Ran = (
    ExitStatus,
    CappedBuffer,
    CappedBuffer,
    Option<(LimitsHit, GroupLimits)>,
);

/// Holds a slot's sandbox while its command runs; dropped before the
/// command's end, it kills the sandbox.
struct Running {
    held: Option<OwnedMutexGuard<Option<Kept>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut held) = self.held.take() {
            *held = None;
        }
    }
}

impl SlotSandboxes {
    pub(super) fn new(
        sandbox: Arc<Sandbox>,
        kept: KeptPerSlot,
        groups: Option<Arc<JobLimiter>>,
    ) -> Self {
        Self {
            sandbox,
            kept,
            groups,
            slots: std::sync::Mutex::new(HashMap::new()),
            unusable: AtomicBool::new(false),
        }
    }

    /// The slot directory of `job_dir` when it is one of the kept ones'
    /// and they work here.
    pub(super) fn slot_of(&self, job_dir: &Path) -> Option<PathBuf> {
        if self.unusable.load(Ordering::Relaxed) {
            return None;
        }
        let slot = job_dir.parent()?;
        (slot.parent()? == self.kept.root).then(|| slot.to_path_buf())
    }

    /// Runs `spawn` in the sandbox of `slot`, keeping at most
    /// `max_output_bytes` of each output stream. `None`: kept sandboxes do
    /// not work here, run it another way.
    pub(super) async fn run(
        &self,
        slot: PathBuf,
        spawn: &Spawn,
        max_output_bytes: usize,
    ) -> Option<io::Result<Ran>> {
        let entry = {
            let mut slots = self.slots.lock().expect("slots lock poisoned");
            if slots.len() >= MAX_SLOTS && !slots.contains_key(&slot) {
                return None;
            }
            Arc::clone(slots.entry(slot.clone()).or_default())
        };
        let mut held = entry.lock_owned().await;
        let frame = match wire::frame(spawn) {
            Ok(frame) => frame,
            Err(e) => return Some(Err(e)),
        };
        let pipes = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from);
        let ((out_read, out_write), (err_read, err_write)) = match (pipes(), pipes()) {
            (Ok(out), Ok(err)) => (out, err),
            (Err(e), _) | (_, Err(e)) => return Some(Err(e)),
        };
        let fds = [out_write.as_raw_fd(), err_write.as_raw_fd()];
        // A sandbox found dead (a job killed its init) is replaced once.
        let mut tries = 0;
        loop {
            if held.is_none() {
                match self.start(&slot).await {
                    Ok(kept) => *held = Some(kept),
                    Err(e) => {
                        if !self.unusable.swap(true, Ordering::Relaxed) {
                            tracing::warn!(
                                error = %e,
                                "a sandbox kept per slot could not start; jobs run under one bubblewrap per command"
                            );
                        }
                        return None;
                    }
                }
            }
            let kept = held.as_ref().expect("started above");
            match send(&kept.socket, &frame, &fds).await {
                Ok(()) => break,
                Err(e) => {
                    *held = None;
                    tries += 1;
                    if tries == 2 {
                        return Some(Err(io::Error::new(
                            e.kind(),
                            format!("send the command to its sandbox: {e}"),
                        )));
                    }
                }
            }
        }
        drop((out_write, err_write));
        let mut running = Running { held: Some(held) };
        let result = self
            .wait(&mut running, max_output_bytes, out_read, err_read)
            .await;
        let held = running.held.as_mut().expect("held until here");
        let result = result.map(|(status, out, err, retire)| {
            let kept = held.as_mut().expect("not dropped while held");
            // What the group counted since the last command is this one's.
            let hit =
                kept.group
                    .as_mut()
                    .zip(self.groups.as_ref())
                    .map(|((group, seen), groups)| {
                        let now = group.events();
                        let hit = now.since(*seen);
                        *seen = now;
                        (hit, groups.limits())
                    });
            ((status, out, err, hit), retire)
        });
        match &result {
            Ok((_, retire)) if !retire => {}
            // The init said it cannot clean up, or it is gone.
            _ => **held = None,
        }
        drop(running.held.take());
        Some(result.map(|(ran, _)| ran))
    }

    /// Reads the command's output until the init replies; the command's
    /// status and output, and whether the sandbox retires.
    async fn wait(
        &self,
        running: &mut Running,
        max_output_bytes: usize,
        out_read: OwnedFd,
        err_read: OwnedFd,
    ) -> io::Result<(ExitStatus, CappedBuffer, CappedBuffer, bool)> {
        let kept = running
            .held
            .as_mut()
            .and_then(|held| held.as_mut())
            .expect("a running command's sandbox");
        let stdout = tokio::net::unix::pipe::Receiver::from_owned_fd(out_read)?;
        let stderr = tokio::net::unix::pipe::Receiver::from_owned_fd(err_read)?;
        let mut out = CappedBuffer::default();
        let mut err = CappedBuffer::default();
        let mut reply = [0u8; REPLY_BYTES];
        // The init replies once every process of the command is gone, so
        // the pipes end too.
        let (replied, read_out, read_err) = tokio::join!(
            kept.socket.read_exact(&mut reply),
            read_capped(Some(stdout), max_output_bytes, &mut out),
            read_capped(Some(stderr), max_output_bytes, &mut err),
        );
        if let Err(e) = replied {
            return Err(io::Error::new(
                e.kind(),
                format!("the job's sandbox ended while the command ran ({e})"),
            ));
        }
        read_out?;
        read_err?;
        let reply = Reply::decode(reply)?;
        match reply.outcome {
            Outcome::Exited(status) => Ok((ExitStatus::from_raw(status), out, err, reply.retire)),
            Outcome::NotStarted(errno) => Err(io::Error::from_raw_os_error(errno)),
        }
    }

    /// Starts the sandbox of `slot` in a cgroup of its own (when there are
    /// cgroups) and waits for its init's greeting.
    async fn start(&self, slot: &Path) -> io::Result<Kept> {
        let group =
            match &self.groups {
                Some(groups) => Some(groups.slot(SANDBOX_OVERHEAD).map_err(|e| {
                    io::Error::new(e.kind(), format!("make the slot's cgroup: {e}"))
                })?),
                None => None,
            };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let (program, args) = self.sandbox.wrap_init(slot, &self.kept.init);
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .process_group(0);
        die_with_the_worker(&mut command);
        if let Some(group) = &group {
            let fds = group.procs_fds();
            // SAFETY: runs in the forked child before exec; `join` only
            // writes to open descriptors.
            unsafe {
                command.pre_exec(move || crate::cgroup::join(&fds));
            }
        }
        let bwrap = command.spawn()?;
        drop(command);
        ours.set_nonblocking(true)?;
        let mut socket = tokio::net::UnixStream::from_std(ours)?;
        let mut hello = [0u8; 1];
        match tokio::time::timeout(START_TIMEOUT, socket.read_exact(&mut hello)).await {
            Ok(Ok(_)) if hello[0] == HELLO => Ok(Kept {
                bwrap,
                socket,
                group: group.map(|group| {
                    let events = group.events();
                    (group, events)
                }),
            }),
            Ok(Ok(_)) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the sandbox's init greeted wrongly",
            )),
            Ok(Err(e)) => Err(io::Error::new(
                e.kind(),
                format!(
                    "the sandbox's init ({:?}) did not start: {e}",
                    self.kept.init
                ),
            )),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the sandbox's init did not start within {START_TIMEOUT:?}"),
            )),
        }
    }
}

/// Sends `frame` with `fds` on its first byte.
async fn send(socket: &tokio::net::UnixStream, frame: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut sent = 0;
    while sent < frame.len() {
        sent += socket
            .async_io(Interest::WRITABLE, || {
                wire::send_part(socket.as_raw_fd(), frame, sent, fds)
            })
            .await?;
    }
    Ok(())
}
