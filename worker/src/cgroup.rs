//! Per-job process and memory limits through the kernel's cgroup
//! controllers (`pids`, `memory`): the worker makes a group of its own
//! (`distbuild-worker-<pid>`) under the one it runs in, and each job
//! command a child group whose `pids.max` and memory limit are the job's;
//! the command's first process moves itself in before it execs, so
//! everything it starts is counted. When a limit stopped a fork or the
//! kernel killed the job for memory, the group's counters say so and the
//! job fails naming the limit. (Rlimits cannot do this: RLIMIT_NPROC
//! counts every process of the user and exempts root, RLIMIT_AS bounds
//! address space per process and fails allocations in ways each program
//! reports differently.) Both cgroup versions: v1's per-controller
//! hierarchies, or v2 where the worker's group may delegate them.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd as _, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A controller the limits use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Controller {
    Pids,
    Memory,
}

impl Controller {
    fn name(self) -> &'static str {
        match self {
            Controller::Pids => "pids",
            Controller::Memory => "memory",
        }
    }
}

/// The limits a job's group gets (0: that limit is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    /// Processes (and threads) at once.
    pub processes: u64,
    /// Bytes of memory (resident, page cache included), the job's
    /// processes together.
    pub memory_bytes: u64,
}

/// The worker's groups, one directory per hierarchy (one in v2, one per
/// controller in v1).
#[derive(Debug)]
pub struct JobLimiter {
    /// (controller, the worker's directory in its hierarchy, v2?).
    dirs: Vec<(Controller, PathBuf, bool)>,
    limits: GroupLimits,
    next: AtomicU64,
}

/// One command's groups: the process that writes to each `procs` joins
/// them.
#[derive(Debug)]
pub struct JobGroup {
    dirs: Vec<(Controller, PathBuf, bool)>,
    procs: Vec<fs::File>,
}

/// What a finished command ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitsHit {
    /// A fork was refused for the process limit.
    pub processes: bool,
    /// The kernel killed a process for the memory limit.
    pub memory: bool,
}

/// A group's event counters: forks refused, processes killed for memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitEvents {
    /// Forks refused for the process limit.
    pub processes: u64,
    /// Processes the kernel killed for the memory limit.
    pub memory: u64,
}

impl LimitEvents {
    /// The limits hit between `before` and these counters.
    pub fn since(self, before: LimitEvents) -> LimitsHit {
        LimitsHit {
            processes: self.processes > before.processes,
            memory: self.memory > before.memory,
        }
    }
}

/// This process's group of `controller`: its directory, and whether that
/// is cgroup v2.
fn own_group(controller: Controller) -> Result<(PathBuf, bool), String> {
    let cgroups = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("read /proc/self/cgroup: {e}"))?;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == controller.name()) {
            return Ok((
                Path::new("/sys/fs/cgroup")
                    .join(controller.name())
                    .join(path),
                false,
            ));
        }
        if controllers.is_empty() {
            let root = Path::new("/sys/fs/cgroup");
            let listed = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            if listed.split_whitespace().any(|c| c == controller.name()) {
                return Ok((root.join(path), true));
            }
        }
    }
    Err(format!("no {} cgroup controller", controller.name()))
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

/// A number from a cgroup file's `key N` line.
fn counter(file: &Path, key: &str) -> u64 {
    fs::read_to_string(file)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

impl JobLimiter {
    /// Groups enforcing `limits` (those not 0), or why they cannot be
    /// enforced here.
    pub fn new(limits: GroupLimits) -> Result<Self, String> {
        let mut wanted = Vec::new();
        if limits.processes > 0 {
            wanted.push(Controller::Pids);
        }
        if limits.memory_bytes > 0 {
            wanted.push(Controller::Memory);
        }
        let me = format!("distbuild-worker-{}", std::process::id());
        let mut dirs: Vec<(Controller, PathBuf, bool)> = Vec::new();
        for controller in wanted {
            let (parent, v2) = own_group(controller)?;
            let dir = parent.join(&me);
            if !dirs.iter().any(|(_, d, _)| d == &dir) {
                remove_dead_workers_groups(&parent);
                let _ = fs::create_dir(&dir);
            }
            if v2 {
                let control = dir.join("cgroup.subtree_control");
                fs::write(&control, format!("+{}", controller.name()))
                    .map_err(|e| format!("{}: {e}", control.display()))?;
            }
            dirs.push((controller, dir, v2));
        }
        let limiter = Self {
            dirs,
            limits,
            next: AtomicU64::new(0),
        };
        // Proves a job group can be made and limited.
        drop(limiter.job().map_err(|e| e.to_string())?);
        Ok(limiter)
    }

    /// The limits.
    pub fn limits(&self) -> GroupLimits {
        self.limits
    }

    /// New groups for one command.
    pub fn job(&self) -> io::Result<JobGroup> {
        self.group(
            "job",
            GroupLimits {
                processes: 0,
                memory_bytes: 0,
            },
        )
    }

    /// New groups for a slot's kept sandbox, whose own processes
    /// (bubblewrap and its init) take `overhead` besides the job's limits;
    /// its commands' limits hit are told by [`JobGroup::events`] before
    /// and after each.
    pub fn slot(&self, overhead: GroupLimits) -> io::Result<JobGroup> {
        self.group("slot", overhead)
    }

    fn group(&self, kind: &str, overhead: GroupLimits) -> io::Result<JobGroup> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut group = JobGroup {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        let limits = GroupLimits {
            processes: self.limits.processes.saturating_add(overhead.processes),
            memory_bytes: self
                .limits
                .memory_bytes
                .saturating_add(overhead.memory_bytes),
        };
        for (controller, worker_dir, v2) in &self.dirs {
            let dir = worker_dir.join(format!("{kind}-{n}"));
            let in_dir = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", dir.display()));
            // v2: one directory for every controller.
            if !group.dirs.iter().any(|(_, d, _)| d == &dir) {
                fs::create_dir(&dir).map_err(in_dir)?;
                group.procs.push(
                    fs::OpenOptions::new()
                        .write(true)
                        .open(dir.join("cgroup.procs"))
                        .map_err(in_dir)?,
                );
            }
            match (controller, v2) {
                (Controller::Pids, _) => {
                    fs::write(dir.join("pids.max"), limits.processes.to_string())
                }
                (Controller::Memory, true) => {
                    fs::write(dir.join("memory.max"), limits.memory_bytes.to_string())
                        .and_then(|()| fs::write(dir.join("memory.swap.max"), "0").or(Ok(())))
                }
                (Controller::Memory, false) => fs::write(
                    dir.join("memory.limit_in_bytes"),
                    limits.memory_bytes.to_string(),
                ),
            }
            .map_err(in_dir)?;
            group.dirs.push((*controller, dir, *v2));
        }
        Ok(group)
    }
}

impl Drop for JobLimiter {
    fn drop(&mut self) {
        for (_, dir, _) in &self.dirs {
            let _ = fs::remove_dir(dir);
        }
    }
}

impl JobGroup {
    /// The descriptors the child writes "0" to, to join the groups before
    /// it execs.
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// What the group's command ran into (a group made for it).
    pub fn limits_hit(&self) -> LimitsHit {
        self.events().since(LimitEvents::default())
    }

    /// The group's event counters now.
    pub fn events(&self) -> LimitEvents {
        let mut events = LimitEvents::default();
        for (controller, dir, v2) in &self.dirs {
            match (controller, v2) {
                (Controller::Pids, _) => {
                    events.processes += counter(&dir.join("pids.events"), "max");
                }
                (Controller::Memory, true) => {
                    events.memory += counter(&dir.join("memory.events"), "oom_kill");
                }
                (Controller::Memory, false) => {
                    events.memory += counter(&dir.join("memory.oom_control"), "oom_kill");
                }
            }
        }
        events
    }
}

/// Joins the groups whose `cgroup.procs` are open as `fds`: for the
/// forked child, before exec (write is async-signal-safe).
pub fn join(fds: &[RawFd]) -> io::Result<()> {
    let me = b"0\n";
    for fd in fds {
        // SAFETY: writes a static buffer to an open descriptor.
        if unsafe { libc::write(*fd, me.as_ptr().cast(), me.len()) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Drop for JobGroup {
    fn drop(&mut self) {
        // Empty once the command's processes are gone (they are killed
        // before this drops; v2 kills whatever is left at once); a
        // straggler still exiting makes a group busy for a moment.
        for (_, dir, v2) in &self.dirs {
            if *v2 {
                let _ = fs::write(dir.join("cgroup.kill"), "1");
            }
            for attempt in 0..20 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                if attempt == 19 {
                    tracing::debug!(dir = %dir.display(), "job cgroup still busy; left behind");
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
}
