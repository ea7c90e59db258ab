//! `distbuild sandbox-init`: the process a slot's sandbox keeps running
//! between jobs, so that a job costs a fork and an exec inside namespaces
//! made once, not a new bubblewrap (about 3.5 ms a command here, against
//! 1 ms for the command itself).
//!
//! It runs inside bubblewrap (PID 2 of the sandbox's PID namespace, under
//! bubblewrap's own init), its stdin the socket to the worker. For each
//! request (see [`super::wire`]) it starts the command — a new session,
//! its descriptors, its directory; the rlimits and cgroup it inherits —
//! and waits for it; then it leaves the sandbox as the next job must find it: every
//! other process in the namespace killed (until none is left), `/tmp` and
//! `/dev/shm` emptied, System V IPC objects removed. Only then does it
//! reply, so the worker's pipes reach their end and the next command
//! starts clean. What it cannot clean, it says so in its reply and exits:
//! the worker starts a new sandbox for the slot's next command.
//!
//! It is not dumpable, so a job (the same user) cannot ptrace it or read
//! its memory to reach the jobs after it. A job can kill it: its command
//! then fails, and the slot gets a new sandbox.
//!
//! Single-threaded and without an async runtime.

use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, Write as _};
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::wire::{self, HELLO, Outcome, Reply, Spawn};

/// How long the init keeps killing what is left of a command before it
/// gives up on the sandbox.
const KILL_PATIENCE: Duration = Duration::from_secs(2);

/// Runs the init until the worker closes the socket; the process's exit
/// code.
pub fn main() -> u8 {
    // SAFETY: prctl with constant arguments. Not dumpable: processes of
    // the same user cannot ptrace this one or open its /proc memory.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // SAFETY: the worker starts this process with the socket as stdin;
    // nothing else in this process uses descriptor 0.
    let control = unsafe { OwnedFd::from_raw_fd(0) };
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        eprintln!("distbuild sandbox-init: {what}: {e}");
        1
    };
    let devnull = match fs::File::open("/dev/null") {
        Ok(file) => file,
        Err(e) => return fail("open /dev/null", &e),
    };
    let own_env: Vec<Vec<u8>> = std::env::vars_os()
        .map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes()].concat())
        .collect();
    // A job cannot mount here (it has no capabilities): the mount points
    // are read once.
    let mounts = match mount_points() {
        Ok(mounts) => mounts,
        Err(e) => return fail("read the mount points", &e),
    };
    let mut applied: Applied = None;
    if let Err(e) = write_all(control.as_fd(), &[HELLO]) {
        return fail("greet the worker", &e);
    }
    loop {
        let (spawn, fds) = match wire::receive(control.as_fd()) {
            Ok(Some(request)) => request,
            Ok(None) => return 0,
            Err(e) => return fail("read a request", &e),
        };
        let outcome = run(&spawn, fds, devnull.as_fd(), &own_env, &mut applied);
        let cleaned = clean_up(&mounts);
        if let Err(e) = &cleaned {
            eprintln!("distbuild sandbox-init: retiring this sandbox: {e}");
        }
        let reply = Reply {
            outcome,
            retire: cleaned.is_err(),
        };
        if let Err(e) = write_all(control.as_fd(), &reply.encode()) {
            return fail("reply", &e);
        }
        if reply.retire {
            return 0;
        }
    }
}

fn write_all(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: borrowed for this write; ManuallyDrop keeps it open.
    let mut file = std::mem::ManuallyDrop::new(unsafe { fs::File::from_raw_fd(fd.as_raw_fd()) });
    file.write_all(bytes)
}

fn c_string(bytes: &[u8]) -> Result<CString, i32> {
    CString::new(bytes).map_err(|_| libc::EINVAL)
}

/// Pointers to `strings`, null-terminated, for exec.
fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// The rlimits an init has set on itself for its commands to inherit
/// (address space, file size).
type Applied = Option<(u64, u64)>;

/// Starts `spawn` and waits for it. The command inherits the init's
/// rlimits (set here when they change: a worker's are the same for every
/// command) and its cgroup (the slot's), and is started with
/// `posix_spawn` (a vfork: no copy of the init's page tables).
fn run(
    spawn: &Spawn,
    fds: Vec<OwnedFd>,
    devnull: BorrowedFd<'_>,
    own_env: &[Vec<u8>],
    applied: &mut Applied,
) -> Outcome {
    let prepared = (|| {
        // Exactly stdout and stderr.
        if fds.len() != 2 {
            return Err(libc::EBADF);
        }
        let path = c_string(&spawn.path)?;
        let argv = spawn
            .argv
            .iter()
            .map(|a| c_string(a))
            .collect::<Result<Vec<_>, _>>()?;
        let env = if spawn.replace_env {
            &spawn.env[..]
        } else {
            own_env
        };
        let env = env
            .iter()
            .map(|e| c_string(e))
            .collect::<Result<Vec<_>, _>>()?;
        let cwd = c_string(&spawn.cwd)?;
        Ok((path, argv, env, cwd))
    })();
    let (path, argv, env, cwd) = match prepared {
        Ok(prepared) => prepared,
        Err(errno) => return Outcome::NotStarted(errno),
    };
    let limits = (spawn.max_address_space, spawn.max_file_bytes);
    if *applied != Some(limits) {
        for (resource, value) in [(libc::RLIMIT_AS, limits.0), (libc::RLIMIT_FSIZE, limits.1)] {
            let value = if value == 0 {
                libc::RLIM_INFINITY
            } else {
                value as libc::rlim_t
            };
            let limit = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            // SAFETY: setrlimit reads the struct.
            if unsafe { libc::setrlimit(resource, &limit) } != 0 {
                return Outcome::NotStarted(io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        *applied = Some(limits);
    }
    let argv_ptrs = pointers(&argv);
    let env_ptrs = pointers(&env);
    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer is to memory that lives until posix_spawn
    // returns (the argument and environment vectors are null-terminated);
    // the attribute and action objects are initialised before use and
    // destroyed after.
    let spawned = unsafe {
        let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        libc::posix_spawn_file_actions_init(&mut actions);
        libc::posix_spawnattr_init(&mut attr);
        let mut steps = [
            libc::posix_spawn_file_actions_adddup2(&mut actions, devnull.as_raw_fd(), 0),
            libc::posix_spawn_file_actions_adddup2(&mut actions, fds[0].as_raw_fd(), 1),
            libc::posix_spawn_file_actions_adddup2(&mut actions, fds[1].as_raw_fd(), 2),
            libc::posix_spawn_file_actions_addchdir_np(&mut actions, cwd.as_ptr()),
            0,
            0,
            0,
        ];
        // Rust's runtime ignores SIGPIPE; commands expect the default. A
        // new session, as bubblewrap's --new-session gives (no terminal).
        let mut none: libc::sigset_t = std::mem::zeroed();
        let mut pipe: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigemptyset(&mut pipe);
        libc::sigaddset(&mut pipe, libc::SIGPIPE);
        steps[4] = libc::posix_spawnattr_setsigmask(&mut attr, &none);
        steps[5] = libc::posix_spawnattr_setsigdefault(&mut attr, &pipe);
        steps[6] = libc::posix_spawnattr_setflags(
            &mut attr,
            libc::POSIX_SPAWN_SETSID
                | (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF) as libc::c_short,
        );
        let result = match steps.iter().find(|rc| **rc != 0) {
            Some(rc) => *rc,
            None => libc::posix_spawn(
                &mut pid,
                path.as_ptr(),
                &actions,
                &attr,
                argv_ptrs.as_ptr().cast(),
                env_ptrs.as_ptr().cast(),
            ),
        };
        libc::posix_spawn_file_actions_destroy(&mut actions);
        libc::posix_spawnattr_destroy(&mut attr);
        result
    };
    drop(fds);
    if spawned != 0 {
        return Outcome::NotStarted(spawned);
    }
    Outcome::Exited(wait_for(pid))
}

/// Waits for `pid`; its wait status.
fn wait_for(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waits for a child of this process.
        let got = unsafe { libc::waitpid(pid, &mut status, 0) };
        if got == pid {
            return status;
        }
        if got < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // Not our child any more (cannot happen): a plain failure.
            return 1 << 8;
        }
    }
}

/// Leaves the sandbox as a new one: no other process, empty `/tmp` and
/// `/dev/shm` (but for the mount points bubblewrap made in them: a job or
/// cache directory under the host's `/tmp` is bound at its own path, in
/// the sandbox's `/tmp`), no System V IPC objects.
fn clean_up(mounts: &[PathBuf]) -> Result<(), String> {
    kill_the_rest()?;
    for dir in ["/tmp", "/dev/shm"] {
        empty(Path::new(dir), mounts)?;
    }
    remove_ipc_objects()
}

/// The mount points of this namespace.
fn mount_points() -> Result<Vec<PathBuf>, String> {
    let text = fs::read("/proc/self/mountinfo").map_err(|e| format!("read mountinfo: {e}"))?;
    Ok(text
        .split(|b| *b == b'\n')
        .filter_map(|line| line.split(|b| *b == b' ').nth(4))
        .map(|field| PathBuf::from(OsStr::from_bytes(&unescape(field))))
        .collect())
}

/// A mountinfo field with its octal escapes (`\040` for a space) undone.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// The PIDs in this namespace other than its init (1) and this process.
fn others() -> Result<Vec<i32>, String> {
    let me = std::process::id() as i32;
    let entries = fs::read_dir("/proc").map_err(|e| format!("list /proc: {e}"))?;
    Ok(entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != 1 && *pid != me)
        .collect())
}

/// Kills every other process of the namespace (bubblewrap's init reaps
/// them), repeating while any is left: a process forking while it is
/// killed may add one.
fn kill_the_rest() -> Result<(), String> {
    let deadline = std::time::Instant::now() + KILL_PATIENCE;
    loop {
        let left = others()?;
        if left.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("{} processes survive SIGKILL", left.len()));
        }
        // SAFETY: kill(-1) signals every process of the namespace this
        // process may signal but itself and the namespace's init.
        unsafe { libc::kill(-1, libc::SIGKILL) };
        // Reap any of ours (the command's first process is reaped).
        // SAFETY: waitpid on any child, without blocking.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Removes everything in `dir`, keeping `dir` and the directories on the
/// way to any of `mounts` (whose contents are another file system's).
fn empty(dir: &Path, mounts: &[PathBuf]) -> Result<(), String> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("list {}: {e}", dir.display())),
    };
    for entry in entries {
        let path = entry
            .map_err(|e| format!("list {}: {e}", dir.display()))?
            .path();
        let real_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        if real_dir && mounts.iter().any(|m| m == &path) {
            continue;
        }
        if real_dir && mounts.iter().any(|m| m.starts_with(&path)) {
            empty(&path, mounts)?;
            continue;
        }
        crate::tree::remove_tree(&path).map_err(|e| format!("remove {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Removes the namespace's System V shared memory segments, semaphore
/// sets and message queues.
fn remove_ipc_objects() -> Result<(), String> {
    type Remove = fn(i32) -> i32;
    let kinds: [(&str, Remove); 3] = [
        // SAFETY (each): removes an IPC object by ID; a wrong ID fails.
        ("shm", |id| unsafe {
            libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut())
        }),
        ("sem", |id| unsafe { libc::semctl(id, 0, libc::IPC_RMID) }),
        ("msg", |id| unsafe {
            libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut())
        }),
    ];
    for (kind, remove) in kinds {
        let list = Path::new("/proc/sysvipc").join(kind);
        let Ok(text) = fs::read(&list) else {
            continue;
        };
        // A header line, then one line per object: key, then its ID.
        for line in OsStr::from_bytes(&text).to_string_lossy().lines().skip(1) {
            let Some(id) = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()) else {
                continue;
            };
            if remove(id) != 0 {
                return Err(format!(
                    "remove System V {kind} {id}: {}",
                    io::Error::last_os_error()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(br"/tmp/a\040b\\c"), b"/tmp/a b\\\\c".to_vec());
        assert_eq!(unescape(br"/x\0"), b"/x\\0".to_vec());
        assert_eq!(unescape(b"/plain"), b"/plain".to_vec());
    }

    #[test]
    fn emptying_keeps_mount_points_and_the_way_to_them() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let root = dir.path();
        let mount = root.join("outer/inner/slot");
        fs::create_dir_all(mount.join("job")).expect("mkdir");
        fs::write(mount.join("job/output"), b"kept").expect("write");
        fs::write(root.join("outer/left-by-a-job"), b"x").expect("write");
        fs::create_dir_all(root.join("other/deep")).expect("mkdir");
        std::os::unix::fs::symlink(&mount, root.join("link")).expect("symlink");
        empty(root, std::slice::from_ref(&mount)).expect("empty");
        assert_eq!(fs::read(mount.join("job/output")).expect("kept"), b"kept");
        let mut left: Vec<_> = fs::read_dir(root)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["outer"]);
        assert!(!root.join("outer/left-by-a-job").exists());
    }
}
