//! The edge between generated gRPC types and our domain types: limits every
//! side agrees on, and conversions that validate once.

use std::collections::HashSet;

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

/// Metadata key naming the leader's address on an UNAVAILABLE answer from a
/// coordinator that is not the leader.
pub const LEADER_METADATA_KEY: &str = "distbuild-leader";

/// The metadata key that carries the cluster secret (coordinators to each
/// other, operators to membership changes).
pub const SECRET_METADATA_KEY: &str = "x-distbuild-cluster-secret";
/// Bounds on a cluster secret's length (bytes, after trimming its file).
pub const MIN_SECRET_BYTES: usize = 16;
pub const MAX_SECRET_BYTES: usize = 1024;

/// Reads a cluster secret file: its content with surrounding whitespace
/// trimmed, which must be 16 to 1024 printable ASCII characters (no
/// spaces). The error is one line naming the file.
pub fn read_cluster_secret(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("read the cluster secret {}: {e}", path.display()))?;
    let text = text.trim();
    check_cluster_secret(text).map_err(|p| format!("cluster secret {}: {p}", path.display()))?;
    Ok(text.to_string())
}

/// Whether `text` is a valid cluster secret; the error says why not.
pub fn check_cluster_secret(text: &str) -> Result<(), String> {
    if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&text.len()) {
        return Err(format!(
            "must be {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} characters, is {}",
            text.len()
        ));
    }
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces".to_string());
    }
    Ok(())
}

/// A 20-byte digest from the wire; `what` names the field in the error.
pub fn digest_from_wire(bytes: &[u8], what: &str) -> Result<Digest, String> {
    Digest::try_from(bytes).map_err(|e: IdError| format!("{what}: {e}"))
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
    fn digests_need_twenty_bytes() {
        assert!(digest_from_wire(&[0u8; 20], "d").is_ok());
        let err = digest_from_wire(&[0u8; 19], "cache_key").expect_err("short");
        assert_eq!(
            err,
            "cache_key: 19 bytes where a 20-byte digest was expected"
        );
    }
}
