//! What the two ways of running a command share: reading its output
//! capped, and tying its life to the worker's.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes read from a pipe: the head up to a bound, and whether there was
/// more.
#[derive(Default)]
pub(super) struct CappedBuffer {
    pub(super) kept: Vec<u8>,
    pub(super) truncated: bool,
}

pub(super) async fn read_capped(
    pipe: Option<impl AsyncRead + Unpin>,
    max_bytes: usize,
    into: &mut CappedBuffer,
) -> io::Result<()> {
    let Some(mut pipe) = pipe else {
        return Ok(());
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = pipe.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let room = max_bytes.saturating_sub(into.kept.len());
        if n > room {
            into.truncated = true;
        }
        into.kept.extend_from_slice(&buf[..n.min(room)]);
    }
}

/// A job's process is killed when the worker dies (even by SIGKILL): a
/// dead worker's jobs run again elsewhere, and a survivor would run twice
/// and could write where the rerun writes. (Linux: the parent-death signal
/// fires when the spawning thread exits; jobs are spawned from the
/// runtime's long-lived worker threads.)
pub(super) fn die_with_the_worker(command: &mut tokio::process::Command) {
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the forked child before exec and
        // calls only async-signal-safe functions (prctl, getppid).
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The worker died between fork and prctl.
                if libc::getppid() != parent {
                    return Err(io::Error::other("the worker exited"));
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}
