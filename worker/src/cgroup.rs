//! The per-job process limit, through the kernel's pids controller: the
//! worker makes a cgroup of its own (`distbuild-worker-<pid>`) under the
//! one it runs in, and each job command a child group in it whose
//! `pids.max` is the limit; the command's first process moves itself in
//! before it execs, so everything it starts is counted. When the limit
//! stopped a fork, `pids.events` says so and the job fails naming the
//! limit. (RLIMIT_NPROC cannot do this: it counts every process of the
//! user, and root is exempt.) Both cgroup versions: v1's `pids` hierarchy,
//! or v2 where the worker's group may delegate the controller.

use std::fs;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd as _, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The worker's group of job groups.
#[derive(Debug)]
pub struct ProcessLimit {
    dir: PathBuf,
    max: u64,
    next: AtomicU64,
}

/// One command's group: the process that writes to `procs` joins it.
#[derive(Debug)]
pub struct JobGroup {
    dir: PathBuf,
    procs: fs::File,
}

/// Where this process's pids controller is: its group's directory.
fn own_pids_group() -> Result<PathBuf, String> {
    let cgroups = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("read /proc/self/cgroup: {e}"))?;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "pids") {
            return Ok(Path::new("/sys/fs/cgroup/pids").join(path));
        }
        if controllers.is_empty() {
            let root = Path::new("/sys/fs/cgroup");
            let listed = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            if listed.split_whitespace().any(|c| c == "pids") {
                return Ok(root.join(path));
            }
        }
    }
    Err("no pids controller (cgroup v1 pids hierarchy or v2 with pids)".to_string())
}

/// Removes the groups of workers that died without removing theirs (a
/// SIGKILL): empty once their processes are gone.
fn remove_dead_workers_groups(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("distbuild-worker-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(jobs) = fs::read_dir(entry.path()) {
            for job in jobs.flatten() {
                if job.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = fs::remove_dir(job.path());
                }
            }
        }
        let _ = fs::remove_dir(entry.path());
    }
}

impl ProcessLimit {
    /// A worker group allowing `max` processes per job command, or why
    /// there cannot be one here.
    pub fn new(max: u64) -> Result<Self, String> {
        let parent = own_pids_group()?;
        remove_dead_workers_groups(&parent);
        let dir = parent.join(format!("distbuild-worker-{}", std::process::id()));
        let _ = fs::create_dir(&dir);
        // v2 delegates the controller to children explicitly; v1 has no
        // such file.
        let control = dir.join("cgroup.subtree_control");
        if control.exists() {
            fs::write(&control, "+pids").map_err(|e| format!("{}: {e}", control.display()))?;
        }
        let limit = Self {
            dir,
            max,
            next: AtomicU64::new(0),
        };
        // Proves a job group can be made and limited.
        drop(limit.job().map_err(|e| e.to_string())?);
        Ok(limit)
    }

    /// A new group for one command.
    pub fn job(&self) -> io::Result<JobGroup> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(format!("job-{n}"));
        fs::create_dir(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        let group = JobGroup {
            procs: fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))?,
            dir,
        };
        fs::write(group.dir.join("pids.max"), self.max.to_string())?;
        Ok(group)
    }

    /// The limit.
    pub fn max(&self) -> u64 {
        self.max
    }
}

impl Drop for ProcessLimit {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.dir);
    }
}

impl JobGroup {
    /// The descriptor the child writes "0" to, to join the group before
    /// it execs.
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// Whether the limit refused a fork.
    pub fn limit_was_hit(&self) -> bool {
        fs::read_to_string(self.dir.join("pids.events"))
            .ok()
            .and_then(|events| {
                events
                    .lines()
                    .find_map(|l| l.strip_prefix("max "))
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
            .is_some_and(|n| n > 0)
    }
}

/// Joins the group whose `cgroup.procs` is open as `fd`: for the forked
/// child, before exec (write is async-signal-safe).
pub fn join(fd: RawFd) -> io::Result<()> {
    let me = b"0\n";
    // SAFETY: writes a static buffer to an open descriptor.
    if unsafe { libc::write(fd, me.as_ptr().cast(), me.len()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for JobGroup {
    fn drop(&mut self) {
        let _ = self.procs.flush();
        // Empty once the command's processes are gone (they are killed
        // before this drops); a straggler still exiting makes it busy for
        // a moment.
        for _ in 0..20 {
            if fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        tracing::debug!(dir = %self.dir.display(), "job cgroup still busy; left behind");
    }
}
