//! The messages between the worker and a slot's sandbox init (`distbuild
//! sandbox-init`, see [`super::init`]) over their Unix socket: the worker
//! sends one [`Spawn`] at a time, with the descriptors the command gets
//! (stdout, stderr) passed as `SCM_RIGHTS`; the init answers with one [`Reply`] once the command and
//! everything it started are gone. The init greets once, a single
//! [`HELLO`] byte, when it is ready.

use std::io::{self, IoSlice, IoSliceMut, Read as _};
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// The byte an init sends when it is ready for its first command.
pub const HELLO: u8 = 0x5a;

/// The largest request: a command's arguments and environment are bounded
/// well below this where the graph is validated.
pub const MAX_REQUEST_BYTES: usize = 64 << 20;

/// The most descriptors a request is read with (it carries two: stdout
/// and stderr; more are refused).
pub const MAX_FDS: usize = 8;

/// One command to run.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Spawn {
    /// The program's path (resolved by the worker: absolute, or relative
    /// to `cwd`).
    #[prost(bytes = "vec", tag = "1")]
    pub path: Vec<u8>,
    /// The arguments, the program's name first.
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub argv: Vec<Vec<u8>>,
    /// Whether `env` is the whole environment (else the init's own, the
    /// worker's, is passed on).
    #[prost(bool, tag = "3")]
    pub replace_env: bool,
    /// `NAME=value` entries.
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub env: Vec<Vec<u8>>,
    /// The working directory.
    #[prost(bytes = "vec", tag = "5")]
    pub cwd: Vec<u8>,
    /// RLIMIT_AS of the command's processes (0: none); the same for every
    /// command of an init.
    #[prost(uint64, tag = "6")]
    pub max_address_space: u64,
    /// RLIMIT_FSIZE of the command's processes (0: none); the same for
    /// every command of an init.
    #[prost(uint64, tag = "7")]
    pub max_file_bytes: u64,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It ran; its wait status (as `waitpid` gives it).
    Exited(i32),
    /// It could not be started: the errno of the step that failed (a bad
    /// descriptor, its rlimits, its directory, exec).
    NotStarted(i32),
}

/// The init's answer to a [`Spawn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// How the command ended.
    pub outcome: Outcome,
    /// The init could not leave the sandbox as it found it (a process
    /// that would not die, a file in /tmp it could not remove): it exits
    /// after this reply, and the slot's next command gets a new sandbox.
    pub retire: bool,
}

/// The size of an encoded [`Reply`].
pub const REPLY_BYTES: usize = 9;

impl Reply {
    /// The reply's bytes: kind, value (little-endian), retire.
    pub fn encode(self) -> [u8; REPLY_BYTES] {
        let (kind, value) = match self.outcome {
            Outcome::Exited(status) => (1u8, status),
            Outcome::NotStarted(errno) => (2u8, errno),
        };
        let mut out = [0u8; REPLY_BYTES];
        out[0] = kind;
        out[1..5].copy_from_slice(&value.to_le_bytes());
        out[5] = u8::from(self.retire);
        out
    }

    /// Reads a reply's bytes.
    pub fn decode(bytes: [u8; REPLY_BYTES]) -> io::Result<Reply> {
        let value = i32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let outcome = match bytes[0] {
            1 => Outcome::Exited(value),
            2 => Outcome::NotStarted(value),
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("sandbox init replied with unknown kind {other}"),
                ));
            }
        };
        Ok(Reply {
            outcome,
            retire: bytes[5] != 0,
        })
    }
}

/// A request's bytes: its length (u32, little-endian), then the message.
pub fn frame(spawn: &Spawn) -> io::Result<Vec<u8>> {
    use prost::Message as _;
    let len = spawn.encoded_len();
    if len > MAX_REQUEST_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the command takes {len} bytes, more than the sandbox's {MAX_REQUEST_BYTES}"),
        ));
    }
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    spawn.encode(&mut out).map_err(io::Error::other)?;
    Ok(out)
}

/// Sends what is left of `frame` from `sent` on, with `fds` on its first
/// byte (when `sent` is 0): one `sendmsg`, returning the bytes it took.
/// The caller repeats it (for a non-blocking socket, when writable) until
/// the whole frame is sent.
pub fn send_part(socket: RawFd, frame: &[u8], sent: usize, fds: &[RawFd]) -> io::Result<usize> {
    let iov = [IoSlice::new(&frame[sent..])];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if sent == 0 && !fds.is_empty() {
        &rights
    } else {
        &[]
    };
    sendmsg::<()>(socket, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).map_err(io::Error::from)
}

/// Reads one request from the blocking `socket`: `None` at end of stream
/// (the worker is gone or done with this sandbox).
pub fn receive(socket: BorrowedFd<'_>) -> io::Result<Option<(Spawn, Vec<OwnedFd>)>> {
    use prost::Message as _;
    let mut header = [0u8; 4];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (got, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut header)];
        let message = match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(message) => message,
        };
        let mut fds = Vec::new();
        for cmsg in message.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: the kernel just installed these descriptors in
                // this process; nothing else owns them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if message.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a request carried too many descriptors",
            ));
        }
        break (message.bytes, fds);
    };
    if got == 0 {
        return Ok(None);
    }
    // SAFETY: the descriptor is borrowed for the reads below only; the
    // ManuallyDrop keeps the File from closing it.
    let mut stream =
        std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(socket.as_raw_fd()) });
    stream.read_exact(&mut header[got..])?;
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_REQUEST_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a request of {len} bytes, more than {MAX_REQUEST_BYTES}"),
        ));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    let spawn = Spawn::decode(body.as_slice())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some((spawn, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::fd::AsFd as _;

    #[test]
    fn a_request_and_its_descriptors_arrive_whole() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        let spawn = Spawn {
            path: b"/bin/sh".to_vec(),
            argv: vec![b"sh".to_vec(), b"-c".to_vec(), vec![b'x'; 300_000]],
            replace_env: true,
            env: vec![b"PATH=/bin".to_vec()],
            cwd: b"/tmp".to_vec(),
            max_address_space: 1 << 30,
            max_file_bytes: 0,
        };
        let frame = frame(&spawn).expect("frame");
        let (mut reader, writer) = std::os::unix::net::UnixStream::pair().expect("pair");
        let sender = std::thread::spawn(move || {
            let mut sent = 0;
            while sent < frame.len() {
                sent +=
                    send_part(ours.as_raw_fd(), &frame, sent, &[writer.as_raw_fd()]).expect("send");
            }
        });
        let (got, fds) = receive(theirs.as_fd())
            .expect("receive")
            .expect("a request");
        sender.join().expect("sender");
        assert_eq!(got, spawn);
        assert_eq!(fds.len(), 1);
        // The descriptor received is the socket written to above.
        let mut passed = std::os::unix::net::UnixStream::from(fds.into_iter().next().unwrap());
        passed
            .write_all(b"!")
            .expect("write through the passed descriptor");
        let mut seen = [0u8; 1];
        reader.read_exact(&mut seen).expect("read");
        assert_eq!(&seen, b"!");
    }

    #[test]
    fn end_of_stream_is_no_request_and_replies_round_trip() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        drop(ours);
        assert!(receive(theirs.as_fd()).expect("receive").is_none());
        for reply in [
            Reply {
                outcome: Outcome::Exited(9),
                retire: false,
            },
            Reply {
                outcome: Outcome::NotStarted(libc::ENOENT),
                retire: true,
            },
        ] {
            assert_eq!(Reply::decode(reply.encode()).expect("decode"), reply);
        }
        let mut bad = [0u8; REPLY_BYTES];
        bad[0] = 7;
        assert!(Reply::decode(bad).is_err());
    }
}
