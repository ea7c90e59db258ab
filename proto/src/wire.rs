//! The edge between generated gRPC types and our domain types: limits every
//! side agrees on, and conversions that validate once.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;

use crate::graph::{Cmd, GraphError, Template};
use crate::ids::{Digest, IdError, JobId};
use crate::v1;

/// Largest chunk of blob or artifact content in one message.
pub const MAX_BLOB_CHUNK_BYTES: usize = 1 << 20;

/// Largest gRPC message any distbuild server or client decodes. A graph of
/// ~20,000 jobs fits; larger graphs are refused with a clear error rather
/// than buffered without bound.
pub const MAX_MESSAGE_BYTES: usize = 32 << 20;

/// Captured stdout (and, separately, stderr) kept per job: beyond this the
/// worker keeps the head and notes the truncation.
pub const MAX_JOB_OUTPUT_BYTES: usize = 1 << 20;

/// Longest error message kept for a job (a worker's own words on why a
/// job could not run; it may quote a program name or path from the graph).
/// Longer ones are cut on a character boundary.
pub const MAX_JOB_ERROR_BYTES: usize = 4096;

/// Most artifacts a `Register` may list as held; a worker holding more
/// reports the rest as additions in its heartbeats. (Each listing is one
/// Raft entry: kept well under a few hundred KiB.)
pub const MAX_HELD_PER_REGISTER: usize = 10_000;

/// Most cache changes (added and dropped together) one `Heartbeat` may
/// carry; a worker with more sends them over several heartbeats.
pub const MAX_CACHE_CHANGES_PER_HEARTBEAT: usize = 10_000;

/// Most holders an assignment names for one dependency artifact (a worker
/// tries them in turn), and so most a report of lost inputs names as
/// tried for one artifact.
pub const MAX_HOLDERS_LISTED: usize = 16;

/// Most tried holders one report of lost inputs names in all: a worker
/// that lost more inputs reports as many as fit (the rest are found lost
/// on the next attempt).
pub const MAX_TRIED_HOLDERS_PER_REPORT: usize = 4096;

/// Metadata key naming the leader's address on an UNAVAILABLE answer from a
/// coordinator that is not the leader.
pub const LEADER_METADATA_KEY: &str = "distbuild-leader";

/// Metadata key of a RESOURCE_EXHAUSTED answer whose limit frees up by
/// itself: the milliseconds the caller should wait before trying again.
/// Without it the refusal is final.
pub const RETRY_AFTER_METADATA_KEY: &str = "distbuild-retry-after-ms";

/// How long opening one connection may take, on every side. A node cut off
/// by a partition drops the SYN instead of refusing it: without this bound
/// a caller would wait for the kernel's own timeout (minutes) before trying
/// another node.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Interval of HTTP/2 keepalive pings, sent even while no call is open: a
/// silently dead connection (a node lost in a partition, its packets
/// dropped) is noticed within interval + timeout, also while a stream waits
/// minutes between messages.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// How long a keepalive ping may go unanswered before the connection (and
/// every call on it) is declared dead (UNAVAILABLE).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest request ID (in bytes) the coordinators accept. Callers name each
/// state-changing call with one and reuse it on retry (see
/// `leader::RequestIds`).
pub const MAX_REQUEST_ID_CHARS: usize = 128;

/// What an address is for, which decides the ports it may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortUse {
    /// An address to dial: a port from 1 to 65535.
    Dial,
    /// An address to listen on: port 0 (any free port) too.
    Listen,
}

/// Why an address is not `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPortError {
    /// Nothing after a last `:`.
    #[error("no port")]
    NoPort,
    /// The port is not a decimal number in range.
    #[error("the port is not a number from {min} to 65535")]
    BadPort {
        /// The smallest port allowed (1 to dial, 0 to listen).
        min: u16,
    },
    /// What precedes the port is not a host.
    #[error("not a host name or IP address before the port")]
    BadHost,
}

/// Checks that `addr` is `HOST:PORT`: a host name (letters, digits, `-`,
/// `.`, `_`), an IPv4 address or a bracketed IPv6 address, then a decimal
/// port (from 1, or from 0 to listen on). No scheme, no path: what every
/// side accepts as a node's address.
pub fn check_host_port(addr: &str, port_use: PortUse) -> Result<(), HostPortError> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(HostPortError::NoPort);
    };
    let min = match port_use {
        PortUse::Dial => 1,
        PortUse::Listen => 0,
    };
    // Digits only: `u16::from_str` would also take a sign.
    let port_ok = !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p >= min);
    if !port_ok {
        return Err(HostPortError::BadPort { min });
    }
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    };
    if !host_ok {
        return Err(HostPortError::BadHost);
    }
    Ok(())
}

/// The metadata key that carries the cluster secret (coordinators to each
/// other, operators to membership changes).
pub const SECRET_METADATA_KEY: &str = "x-distbuild-cluster-secret";
/// Bounds on a cluster secret's length (bytes, after trimming its file).
pub const MIN_SECRET_BYTES: usize = 16;
pub const MAX_SECRET_BYTES: usize = 1024;

/// Most platform properties one worker may have.
pub const MAX_WORKER_PROPERTIES: usize = 64;
/// Longest property name and value, in characters.
pub const MAX_PROPERTY_NAME_CHARS: usize = 128;
pub const MAX_PROPERTY_VALUE_CHARS: usize = 256;

/// Why a worker's platform property is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PropertyProblem {
    #[error("{0:?} is not KEY=VALUE")]
    NoEquals(String),
    #[error("{0:?}: the name is empty")]
    EmptyName(String),
    #[error(
        "{0:?}: the name is over {MAX_PROPERTY_NAME_CHARS} characters or the value over {MAX_PROPERTY_VALUE_CHARS}"
    )]
    TooLong(String),
    #[error("{0:?}: a control character")]
    Control(String),
    #[error("{0} properties is over the limit of {MAX_WORKER_PROPERTIES}")]
    TooMany(usize),
}

/// A platform property from `KEY=VALUE` (the name up to the first `=`).
pub fn parse_property(text: &str) -> Result<(String, String), PropertyProblem> {
    let shown = || text.chars().take(80).collect::<String>();
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| PropertyProblem::NoEquals(shown()))?;
    if name.is_empty() {
        return Err(PropertyProblem::EmptyName(shown()));
    }
    if name.chars().count() > MAX_PROPERTY_NAME_CHARS
        || value.chars().count() > MAX_PROPERTY_VALUE_CHARS
    {
        return Err(PropertyProblem::TooLong(shown()));
    }
    if text.chars().any(char::is_control) {
        return Err(PropertyProblem::Control(shown()));
    }
    Ok((name.to_string(), value.to_string()))
}

/// A worker's properties from their `KEY=VALUE` texts: each checked,
/// bounded in number, sorted, exact repeats dropped.
pub fn parse_properties<S: AsRef<str>>(
    texts: &[S],
) -> Result<Vec<(String, String)>, PropertyProblem> {
    if texts.len() > MAX_WORKER_PROPERTIES {
        return Err(PropertyProblem::TooMany(texts.len()));
    }
    let mut properties = texts
        .iter()
        .map(|t| parse_property(t.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    properties.sort();
    properties.dedup();
    Ok(properties)
}

/// Why a cluster secret is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretProblem {
    /// Too short or too long.
    #[error("must be {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} characters, is {len}")]
    Length {
        /// Its length in bytes.
        len: usize,
    },
    /// A space, a control character or a byte beyond ASCII.
    #[error("must be printable ASCII without spaces")]
    NotPrintable,
}

/// Why a cluster secret file could not be used. The message is one line
/// naming the file.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file could not be read.
    #[error("read the cluster secret {}: {problem}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (shown in the message, which is printed alone).
        problem: std::io::Error,
    },
    /// Other users may read it: refused, as ssh refuses an open key.
    #[error(
        "cluster secret {} may be read by other users (mode {mode:04o}): make it private, chmod 600 {}",
        path.display(),
        path.display()
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Its content is not a valid secret.
    #[error("cluster secret {}: {problem}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: SecretProblem,
    },
}

/// Why a file holding a secret was not read.
#[derive(Debug)]
pub enum PrivateFileError {
    /// It could not be read.
    Read(std::io::Error),
    /// Group or others may read it (its permission bits).
    Exposed(u32),
}

/// Reads a file that holds a secret (a cluster secret, a private key):
/// refused, as ssh refuses an open key, when group or others may read it.
pub fn read_owner_only(path: &Path) -> Result<Vec<u8>, PrivateFileError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(PrivateFileError::Read)?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PrivateFileError::Exposed(mode));
    }
    std::fs::read(path).map_err(PrivateFileError::Read)
}

/// Reads a cluster secret file: its content with surrounding whitespace
/// trimmed, which must be 16 to 1024 printable ASCII characters (no
/// spaces). A file that group or others may read is refused.
pub fn read_cluster_secret(path: &Path) -> Result<String, SecretFileError> {
    let bytes = read_owner_only(path).map_err(|problem| match problem {
        PrivateFileError::Read(problem) => SecretFileError::Read {
            path: path.to_path_buf(),
            problem,
        },
        PrivateFileError::Exposed(mode) => SecretFileError::Exposed {
            path: path.to_path_buf(),
            mode,
        },
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let text = text.trim();
    check_cluster_secret(text).map_err(|problem| SecretFileError::Invalid {
        path: path.to_path_buf(),
        problem,
    })?;
    Ok(text.to_string())
}

/// Whether a secret shown equals the one expected, compared in time that
/// depends only on their lengths (for the cluster secret and the metrics
/// token).
pub fn same_secret(shown: &[u8], expected: &[u8]) -> bool {
    shown.len() == expected.len()
        && shown
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Whether `text` is a valid cluster secret; the error says why not.
pub fn check_cluster_secret(text: &str) -> Result<(), SecretProblem> {
    if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&text.len()) {
        return Err(SecretProblem::Length { len: text.len() });
    }
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SecretProblem::NotPrintable);
    }
    Ok(())
}

/// A digest field from the wire that is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct DigestFieldError {
    /// The field, as the caller named it.
    pub field: String,
    /// What is wrong with its bytes.
    pub problem: IdError,
}

/// A 20-byte digest from the wire; `what` names the field in the error.
pub fn digest_from_wire(bytes: &[u8], what: &str) -> Result<Digest, DigestFieldError> {
    Digest::try_from(bytes).map_err(|problem| DigestFieldError {
        field: what.to_string(),
        problem,
    })
}

/// A digest for the wire.
pub fn digest_to_wire(digest: &Digest) -> Bytes {
    Bytes::copy_from_slice(digest.as_bytes())
}

/// A command for the wire: templates travel as the text the graph wrote.
pub fn command_to_wire(cmd: &Cmd) -> v1::Command {
    let text = |t: &Template| t.text.clone();
    let kind = match cmd {
        Cmd::Exec {
            argv,
            environ,
            working_directory,
        } => v1::command::Kind::Exec(v1::ExecCommand {
            argv: argv.iter().map(text).collect(),
            environ: environ.iter().map(text).collect(),
            working_directory: working_directory.as_ref().map(text).unwrap_or_default(),
        }),
        Cmd::Cat { template, output } => v1::command::Kind::Cat(v1::CatCommand {
            template: text(template),
            output: text(output),
        }),
    };
    v1::Command { kind: Some(kind) }
}

/// A command from the wire, its templates parsed again; `deps` are the IDs
/// `{{index .Deps ...}}` may name. `job` labels errors.
pub fn command_from_wire(
    job: &str,
    cmd: &v1::Command,
    deps: &HashSet<JobId>,
) -> Result<Cmd, GraphError> {
    let parse = |text: &str| Template::parse(job, text, deps);
    match &cmd.kind {
        Some(v1::command::Kind::Exec(exec)) => {
            if exec.argv.is_empty() {
                return Err(GraphError::BadCommand {
                    job: job.to_string(),
                    index: 0,
                    problem: "exec with no program".to_string(),
                });
            }
            Ok(Cmd::Exec {
                argv: exec
                    .argv
                    .iter()
                    .map(|a| parse(a))
                    .collect::<Result<_, _>>()?,
                environ: exec
                    .environ
                    .iter()
                    .map(|e| parse(e))
                    .collect::<Result<_, _>>()?,
                working_directory: if exec.working_directory.is_empty() {
                    None
                } else {
                    Some(parse(&exec.working_directory)?)
                },
            })
        }
        Some(v1::command::Kind::Cat(cat)) => Ok(Cmd::Cat {
            template: parse(&cat.template)?,
            output: parse(&cat.output)?,
        }),
        None => Err(GraphError::BadCommand {
            job: job.to_string(),
            index: 0,
            problem: "neither exec nor cat".to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn properties_are_key_value_checked_sorted_and_bounded() {
        use super::{PropertyProblem, parse_properties, parse_property};
        assert_eq!(
            parse_property("OSFamily=Linux"),
            Ok(("OSFamily".into(), "Linux".into()))
        );
        assert_eq!(parse_property("k=a=b"), Ok(("k".into(), "a=b".into())));
        assert_eq!(
            parse_property("empty="),
            Ok(("empty".into(), String::new()))
        );
        let problems = [
            ("novalue", "\"novalue\" is not KEY=VALUE"),
            ("=x", "\"=x\": the name is empty"),
            ("k=a\nb", "\"k=a\\nb\": a control character"),
        ];
        for (text, says) in problems {
            assert_eq!(
                parse_property(text).expect_err(text).to_string(),
                says,
                "{text}"
            );
        }
        assert!(matches!(
            parse_property(&format!("k={}", "v".repeat(257))),
            Err(PropertyProblem::TooLong(_))
        ));
        assert_eq!(
            parse_properties(&["pool=b", "os=linux", "pool=b"]),
            Ok(vec![
                ("os".into(), "linux".into()),
                ("pool".into(), "b".into())
            ])
        );
        let many: Vec<String> = (0..65).map(|i| format!("k{i}=v")).collect();
        assert_eq!(parse_properties(&many), Err(PropertyProblem::TooMany(65)));
    }

    use super::*;
    use crate::graph::BuildGraph;

    #[test]
    fn commands_survive_the_wire() {
        let dep = "1111111111111111111111111111111111111111";
        let json = format!(
            r#"{{"Jobs": [
              {{"ID": "{dep}", "Cmds": [{{"CatTemplate": "x", "CatOutput": "{{{{.OutputDir}}}}/x"}}]}},
              {{"ID": "2222222222222222222222222222222222222222", "Deps": ["{dep}"],
                "Cmds": [{{"Exec": ["cat", "{{{{index .Deps \"{dep}\"}}}}/x"], "Environ": ["A=B"],
                          "WorkingDirectory": "{{{{.SourceDir}}}}"}},
                         {{"CatTemplate": "t", "CatOutput": "{{{{.OutputDir}}}}/y"}}]}}]}}"#
        );
        let graph = BuildGraph::from_json(json.as_bytes()).expect("valid graph");
        let job = &graph.jobs[1];
        let deps: HashSet<JobId> = job.deps.iter().copied().collect();
        for cmd in &job.cmds {
            let back = command_from_wire("j", &command_to_wire(cmd), &deps).expect("parses");
            assert_eq!(&back, cmd);
        }
        // A dependency the job does not declare is refused.
        let err = command_from_wire("j", &command_to_wire(&job.cmds[0]), &HashSet::new())
            .expect_err("undeclared dep");
        assert!(err.to_string().contains("not among"), "{err}");
    }

    #[test]
    fn host_port_addresses_are_checked() {
        use HostPortError::*;
        use PortUse::*;
        let bad_port = |min| Err(BadPort { min });
        let cases: &[(&str, PortUse, Result<(), HostPortError>)] = &[
            ("10.0.0.4:7000", Dial, Ok(())),
            ("coord-4.example.com:7000", Dial, Ok(())),
            ("under_score:1", Dial, Ok(())),
            ("[::1]:7000", Dial, Ok(())),
            ("10.0.0.4:65535", Dial, Ok(())),
            ("10.0.0.4", Dial, Err(NoPort)),
            ("", Dial, Err(NoPort)),
            ("10.0.0.4:", Dial, bad_port(1)),
            ("10.0.0.4:0", Dial, bad_port(1)),
            ("10.0.0.4:0", Listen, Ok(())),
            ("[::]:0", Listen, Ok(())),
            ("10.0.0.4:70000", Dial, bad_port(1)),
            ("10.0.0.4:70000", Listen, bad_port(0)),
            ("10.0.0.4:+70", Dial, bad_port(1)),
            (":7000", Dial, Err(BadHost)),
            ("http://10.0.0.4:7000", Dial, Err(BadHost)),
            ("a b:7000", Dial, Err(BadHost)),
            ("::1:7000", Dial, Err(BadHost)),
            ("[not v6]:7000", Dial, Err(BadHost)),
        ];
        for (addr, port_use, want) in cases {
            assert_eq!(
                &check_host_port(addr, *port_use),
                want,
                "{addr:?} {port_use:?}"
            );
        }
        assert_eq!(
            BadPort { min: 1 }.to_string(),
            "the port is not a number from 1 to 65535"
        );
    }

    #[test]
    fn secrets_are_checked_and_files_named() {
        assert_eq!(
            check_cluster_secret("short"),
            Err(SecretProblem::Length { len: 5 })
        );
        assert_eq!(
            check_cluster_secret("has a space in it, long enough"),
            Err(SecretProblem::NotPrintable)
        );
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "  0123456789abcdef-secret\n").expect("write");
        // Readable by others (the umask's 0644): refused, naming the fix.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = read_cluster_secret(&path).expect_err("exposed");
        assert_eq!(
            err.to_string(),
            format!(
                "cluster secret {} may be read by other users (mode 0644): make it private, chmod 600 {}",
                path.display(),
                path.display()
            )
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            read_cluster_secret(&path).expect("valid"),
            "0123456789abcdef-secret"
        );
        std::fs::write(&path, "short").expect("write");
        let err = read_cluster_secret(&path).expect_err("short");
        assert_eq!(
            err.to_string(),
            format!(
                "cluster secret {}: must be 16 to 1024 characters, is 5",
                path.display()
            )
        );
        let missing = dir.path().join("missing");
        let err = read_cluster_secret(&missing).expect_err("missing");
        assert!(
            err.to_string()
                .starts_with(&format!("read the cluster secret {}: ", missing.display())),
            "{err}"
        );
    }

    #[test]
    fn digests_need_twenty_bytes() {
        assert!(digest_from_wire(&[0u8; 20], "d").is_ok());
        let err = digest_from_wire(&[0u8; 19], "cache_key").expect_err("short");
        assert_eq!(
            err.to_string(),
            "cache_key: 19 bytes where a 20-byte digest was expected"
        );
    }
}
