#![warn(missing_docs)]
//! The distbuild client: `distbuild build` (hash and upload sources, submit
//! a graph, stream its events, download the outputs), `distbuild cluster
//! status`, and `distbuild cluster add-node` / `remove-node`.
//!
//! Layout by concern: [`args`] (flags), [`connect`] (the one place that
//! opens a connection — the network seam), [`cluster`] (retries, deadlines,
//! following the leader), [`sources`] and [`upload`] (source files),
//! [`watch`] (the event stream, resumed after a break), [`render`] (what the
//! user sees), [`download`] (leaf outputs), [`build`], [`status`] and
//! [`membership`] (the commands). Depends only on `distbuild-proto` among
//! our crates.

pub mod args;
pub mod build;
pub mod cluster;
pub mod connect;
pub mod download;
pub mod local;
pub mod membership;
pub mod render;
pub mod sources;
pub mod status;
pub mod upload;
pub mod watch;

pub use args::{
    AddNodeArgs, BuildArgs, ClusterStatusArgs, ConnectionArgs, LocalArgs, RemoveNodeArgs,
};
pub use build::{build_cli, run_build};
pub use local::{info_cli, shutdown_cli};
pub use membership::{add_node_cli, remove_node_cli, run_add_node, run_remove_node};
pub use status::{cluster_status_cli, run_cluster_status};

/// Process exit codes of the client commands.
pub mod exit_code {
    /// Every job succeeded (or the command did what it was asked).
    pub const OK: i32 = 0;
    /// A job failed or was skipped, or the build did not finish ok.
    pub const BUILD_FAILED: i32 = 1;
    /// Bad input: flags, graph, source files, or a request the cluster
    /// refused as invalid.
    pub const BAD_INPUT: i32 = 2;
    /// The cluster could not be reached within `--timeout`.
    pub const UNREACHABLE: i32 = 3;
    /// Another command holds the local server's lock and
    /// `--block-for-lock=false` was given.
    pub const LOCKED: i32 = 4;
    /// Interrupted (Ctrl-C) after the build was submitted: it was
    /// cancelled on the cluster.
    pub const INTERRUPTED: i32 = 130;
}
