//! Command-line flags of `distbuild build` and `distbuild cluster status`.

use std::path::PathBuf;
use std::time::Duration;

use crate::connect;

/// Environment variable naming the coordinators when `--coordinator` is not
/// given.
pub const COORDINATOR_ENV: &str = "DISTBUILD_COORDINATOR";

/// Default for `--timeout`: how long to keep trying to reach the cluster.
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;

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
}

impl ConnectionArgs {
    /// The coordinator addresses, trimmed and checked; the error is the
    /// one-line message to print (without `error: `).
    pub fn addresses(&self) -> Result<Vec<String>, String> {
        let addrs: Vec<String> = self
            .coordinators
            .iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        if addrs.is_empty() {
            return Err(format!(
                "no coordinator given: pass --coordinator HOST:PORT[,...] or set {COORDINATOR_ENV}"
            ));
        }
        for addr in &addrs {
            connect::endpoint(addr)
                .map_err(|e| format!("bad coordinator address {addr:?}: {e}"))?;
        }
        Ok(addrs)
    }

    /// `--timeout` as a duration.
    pub fn patience(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
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

    /// Where the cluster is.
    #[command(flatten)]
    pub connection: ConnectionArgs,
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
    fn missing_or_bad_coordinators_are_reported() {
        let none = ConnectionArgs {
            coordinators: vec![],
            timeout_secs: 1,
        };
        assert!(
            none.addresses()
                .expect_err("none")
                .contains(COORDINATOR_ENV)
        );
        let bad = ConnectionArgs {
            coordinators: vec!["not an address".into()],
            timeout_secs: 1,
        };
        assert!(
            bad.addresses()
                .expect_err("bad")
                .contains("bad coordinator address")
        );
    }
}
