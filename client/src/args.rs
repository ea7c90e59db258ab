//! Command-line flags of `distbuild build` and the `distbuild cluster`
//! commands.

use std::path::PathBuf;
use std::time::Duration;

use distbuild_proto::tls::{Role, SecurityFlags, SecurityFlagsError};
use distbuild_proto::wire::{HostPortError, PortUse};

use crate::connect::Connector;

/// Environment variable naming the coordinators when `--coordinator` is not
/// given.
pub const COORDINATOR_ENV: &str = "DISTBUILD_COORDINATOR";

/// Default for `--timeout`: how long to keep trying to reach the cluster.
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;

/// Default `--max-idle-secs` of a local server: three hours, as Bazel's.
pub const DEFAULT_MAX_IDLE_SECS: u64 = 10_800;

/// Why flags cannot be used. The message is the one line to print (after
/// `error: `); every one of them means bad input.
#[derive(Debug, thiserror::Error)]
pub enum FlagError {
    /// Neither `--coordinator` nor the environment names one.
    #[error("no coordinator given: pass --coordinator HOST:PORT[,...] or set {COORDINATOR_ENV}")]
    NoCoordinator,
    /// A coordinator address no endpoint can be made of.
    #[error("bad coordinator address {addr:?}: {problem}")]
    BadCoordinator {
        /// The address as given.
        addr: String,
        /// Why it is not one.
        problem: tonic::transport::Error,
    },
    /// `--node-id` is not a node ID.
    #[error("bad --node-id {text:?}: expected a node ID, a whole number from 1")]
    BadNodeId {
        /// The value as given.
        text: String,
    },
    /// `--addr` is not `HOST:PORT`.
    #[error("bad --addr {addr:?}: {problem}; expected HOST:PORT (for example 10.0.0.4:7000)")]
    BadAddr {
        /// The value as given.
        addr: String,
        /// What is wrong with it.
        problem: HostPortError,
    },
}

/// How to reach the cluster; shared by every client command.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// Coordinator addresses (HOST:PORT), comma-separated; any of them will
    /// do, the client follows the leader.
    #[arg(
        long = "coordinator",
        value_name = "HOST:PORT[,...]",
        env = COORDINATOR_ENV,
        value_delimiter = ','
    )]
    pub coordinators: Vec<String>,

    /// How long to keep trying to reach the cluster, in seconds, before
    /// giving up (exit code 3).
    #[arg(long = "timeout", value_name = "SECS", default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout_secs: u64,

    /// TLS and authentication with the cluster, or `--insecure`.
    #[command(flatten)]
    pub security: SecurityFlags,
}

impl ConnectionArgs {
    /// The coordinator addresses, trimmed and checked (`HOST:PORT`, or a
    /// URL with a scheme).
    pub fn addresses(&self) -> Result<Vec<String>, FlagError> {
        let addrs: Vec<String> = self
            .coordinators
            .iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        if addrs.is_empty() {
            return Err(FlagError::NoCoordinator);
        }
        for addr in &addrs {
            distbuild_proto::net::endpoint(addr, None).map_err(|problem| {
                FlagError::BadCoordinator {
                    addr: addr.clone(),
                    problem,
                }
            })?;
        }
        Ok(addrs)
    }

    /// `--timeout` as a duration.
    pub fn patience(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// The connector the security flags ask for; its certificate must have
    /// one of `roles`.
    pub fn connector(&self, roles: &[Role]) -> Result<Connector, SecurityFlagsError> {
        Ok(Connector::secure(&self.security.load(roles)?))
    }
}

/// Flags of `distbuild build`.
#[derive(Debug, Clone, clap::Args)]
pub struct BuildArgs {
    /// The build graph (Go distbuild JSON format).
    #[arg(long, value_name = "FILE")]
    pub graph: PathBuf,

    /// Directory the graph's SourceFiles paths are relative to. Not needed
    /// (nor checked) when the graph lists no source files.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub source_dir: PathBuf,

    /// Download the output of every leaf job (one no other job depends on)
    /// to DIR/<job ID>/ once it succeeded.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,

    /// Print one JSON object per line on stdout instead of human output.
    #[arg(long)]
    pub json: bool,

    /// Time limit of each job, in seconds: a job still running after it is
    /// killed (with every process it started) and fails, not retried.
    /// Without it the cluster's --default-job-timeout applies.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub job_timeout: Option<u64>,

    /// Where the cluster is. Without a coordinator (flag or environment)
    /// the build runs on the workspace's local server.
    #[command(flatten)]
    pub connection: ConnectionArgs,

    /// The directory of the workspace's state: the digest cache, and in
    /// local server mode the server's (default: under
    /// $XDG_CACHE_HOME/distbuild/, per user and workspace).
    #[arg(long, value_name = "DIR")]
    pub output_base: Option<PathBuf>,

    /// Remember each source file's digest with its stat in the output
    /// base, so the next build reads only the files that changed
    /// (`--digest-cache=false`: hash every source file every build).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub digest_cache: bool,

    /// Local server mode: wait while another command uses the server
    /// (`--block-for-lock=false` fails at once, exit code 4).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub block_for_lock: bool,

    /// Local server mode: a server started by this command exits after
    /// this many seconds without a command using it.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_MAX_IDLE_SECS)]
    pub max_idle_secs: u64,

    /// Local server mode: a path the server's jobs may write besides their
    /// own directories (repeatable, as Bazel's --sandbox_writable_path);
    /// a server running with others is restarted. A cluster's workers take
    /// theirs from their own flags.
    #[arg(long = "sandbox-writable-path", value_name = "DIR")]
    pub sandbox_writable_paths: Vec<PathBuf>,
}

/// Flags of `distbuild info` and `distbuild shutdown`: which workspace's
/// local server.
#[derive(Debug, Clone, clap::Args)]
pub struct LocalArgs {
    /// The workspace (its canonical path picks the server).
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub source_dir: PathBuf,

    /// The server's state directory, if not the default one.
    #[arg(long, value_name = "DIR")]
    pub output_base: Option<PathBuf>,
}

/// Flags of `distbuild cluster status`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterStatusArgs {
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Where the cluster is.
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

/// Flags of `distbuild cluster add-node`.
#[derive(Debug, Clone, clap::Args)]
pub struct AddNodeArgs {
    /// The new coordinator's node ID (1 or more), as it was started with.
    // A string, checked by the command: every bad value (`0`, `-1`, `x`)
    // gets the same one-line error before anything is sent.
    #[arg(long = "node-id", value_name = "N", allow_hyphen_values = true)]
    pub node_id: String,

    /// Where the other coordinators reach the new one (HOST:PORT, its
    /// --listen address).
    #[arg(long, value_name = "HOST:PORT", allow_hyphen_values = true)]
    pub addr: String,

    /// The cluster secret's file, when the coordinators require one
    /// (their --cluster-secret-file).
    #[arg(long, value_name = "FILE")]
    pub cluster_secret_file: Option<std::path::PathBuf>,

    /// Where the cluster is.
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

/// Flags of `distbuild cluster drain-worker`.
#[derive(Debug, Clone, clap::Args)]
pub struct DrainWorkerArgs {
    /// The worker to drain (its ID, as `cluster status` lists it).
    #[arg(value_name = "WORKER_ID")]
    pub worker_id: String,

    /// Return once the worker was told, not once it left.
    #[arg(long)]
    pub no_wait: bool,

    /// How long to wait for the worker to leave, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub wait_timeout: u64,

    /// Where the cluster is.
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

/// Flags of `distbuild cluster remove-node`.
#[derive(Debug, Clone, clap::Args)]
pub struct RemoveNodeArgs {
    /// The coordinator to remove from the voters.
    // A string for the same reason as in `AddNodeArgs`.
    #[arg(long = "node-id", value_name = "N", allow_hyphen_values = true)]
    pub node_id: String,

    /// Remove it even when the voters left that are up would not be a
    /// quorum (the cluster then stops accepting writes until enough of
    /// them are back).
    #[arg(long)]
    pub force: bool,

    /// The cluster secret's file, when the coordinators require one
    /// (their --cluster-secret-file).
    #[arg(long, value_name = "FILE")]
    pub cluster_secret_file: Option<std::path::PathBuf>,

    /// Where the cluster is.
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

/// `--node-id` as a number.
pub fn parse_node_id(text: &str) -> Result<u64, FlagError> {
    match text.trim().parse::<u64>() {
        Ok(id) if id >= 1 => Ok(id),
        _ => Err(FlagError::BadNodeId {
            text: text.to_string(),
        }),
    }
}

/// Checks that `--addr` is `HOST:PORT` (a host name, an IPv4 address or a
/// bracketed IPv6 address, and a port from 1 to 65535), as
/// [`distbuild_proto::wire::check_host_port`] decides for every side.
pub fn check_host_port(addr: &str) -> Result<(), FlagError> {
    distbuild_proto::wire::check_host_port(addr, PortUse::Dial).map_err(|problem| {
        FlagError::BadAddr {
            addr: addr.to_string(),
            problem,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        build: BuildArgs,
    }

    #[test]
    fn flags_parse_with_defaults() {
        let cli = Cli::try_parse_from([
            "x",
            "--graph",
            "g.json",
            "--coordinator",
            "a:1, b:2",
            "--json",
        ])
        .expect("parses");
        let b = cli.build;
        assert_eq!(b.graph, PathBuf::from("g.json"));
        assert_eq!(b.source_dir, PathBuf::from("."));
        assert!(b.json && b.output_dir.is_none());
        assert_eq!(b.connection.timeout_secs, DEFAULT_TIMEOUT_SECS);
        assert_eq!(
            b.connection.addresses().expect("valid"),
            vec!["a:1".to_string(), "b:2".to_string()]
        );
    }

    #[test]
    fn help_lists_every_flag() {
        use clap::CommandFactory;
        let help = Cli::command().render_help().to_string();
        for flag in [
            "--graph",
            "--source-dir",
            "--output-dir",
            "--json",
            "--coordinator",
            "--timeout",
            COORDINATOR_ENV,
        ] {
            assert!(help.contains(flag), "{flag} missing from:\n{help}");
        }
        assert!(!help.contains("Where the cluster is"), "{help}");
    }

    #[test]
    fn node_ids_and_addresses_are_checked() {
        for (text, ok) in [
            ("1", Some(1)),
            ("42", Some(42)),
            ("0", None),
            ("-1", None),
            ("x", None),
            ("", None),
            ("18446744073709551616", None),
        ] {
            assert_eq!(parse_node_id(text).ok(), ok, "{text:?}");
        }
        for (addr, ok) in [
            ("10.0.0.4:7000", true),
            ("coord-4.example.com:7000", true),
            ("[::1]:7000", true),
            ("10.0.0.4", false),
            ("10.0.0.4:", false),
            ("10.0.0.4:0", false),
            ("10.0.0.4:70000", false),
            ("10.0.0.4:+70", false),
            (":7000", false),
            ("http://10.0.0.4:7000", false),
            ("a b:7000", false),
            ("::1:7000", false),
            ("[not v6]:7000", false),
        ] {
            assert_eq!(check_host_port(addr).is_ok(), ok, "{addr:?}");
        }
        let message = check_host_port("h").expect_err("no port").to_string();
        assert!(message.contains("expected HOST:PORT"), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn membership_flags_parse() {
        #[derive(Parser)]
        struct Remove {
            #[command(flatten)]
            args: RemoveNodeArgs,
        }
        let remove =
            Remove::try_parse_from(["x", "--coordinator", "a:1", "--node-id", "-1", "--force"])
                .expect("parses")
                .args;
        assert_eq!(remove.node_id, "-1");
        assert!(remove.force);
        let remove = Remove::try_parse_from(["x", "--coordinator", "a:1", "--node-id", "3"])
            .expect("parses")
            .args;
        assert!(!remove.force);
        assert!(Remove::try_parse_from(["x", "--coordinator", "a:1"]).is_err());
    }

    #[test]
    fn missing_or_bad_coordinators_are_reported() {
        let none = ConnectionArgs {
            coordinators: vec![],
            timeout_secs: 1,
            security: SecurityFlags::default(),
        };
        assert!(
            none.addresses()
                .expect_err("none")
                .to_string()
                .contains(COORDINATOR_ENV)
        );
        let bad = ConnectionArgs {
            coordinators: vec!["not an address".into()],
            timeout_secs: 1,
            security: SecurityFlags::default(),
        };
        assert!(
            bad.addresses()
                .expect_err("bad")
                .to_string()
                .contains("bad coordinator address")
        );
    }
}
