#![warn(missing_docs)]
//! The distbuild client: `distbuild build` (hash and upload sources, submit
//! a graph, stream its events, download the outputs), `distbuild cluster
//! status`, `distbuild cluster add-node` / `remove-node`, and
//! `distbuild reapi-proxy` ([`reapi_proxy`]: a TLS cluster for REAPI
//! clients that cannot do TLS, on loopback, for its own user only).
//!
//! Layout by concern: [`args`] (flags), [`connect`] (the one place that
//! opens a connection — the network seam), [`cluster`] (the client's side
//! of `distbuild_proto::leader`: retries, deadlines, following the
//! leader), [`digests`], [`sources`] and [`upload`] (source files), [`watch`] (the event
//! stream, resumed after a break), [`render`] (what the user sees),
//! [`download`] (leaf outputs), [`build`], [`status`] and [`membership`]
//! (the commands), [`local`] (local server mode). Depends only on
//! `distbuild-proto` among our crates.
//!
//! Layering: a module imports only modules before it in this list, never
//! one that imports it back: `exit_code`, `connect`, `args`, `render`,
//! `certs`, `digests`, `sources`, `cluster`, `upload`, `download`, `watch`, `local`,
//! `status`, `membership`, `reapi_proxy`, `build`.

pub mod args;
pub mod build;
pub mod certs;
pub mod cluster;
pub mod connect;
pub mod digests;
pub mod download;
pub mod drain;
pub mod exit_code;
pub mod local;
pub mod membership;
pub mod reapi_proxy;
pub mod render;
pub mod sources;
pub mod status;
pub mod upload;
pub mod watch;

pub use args::{
    AddNodeArgs, BuildArgs, ClusterStatusArgs, ConnectionArgs, DrainWorkerArgs, LocalArgs,
    RemoveNodeArgs,
};
pub use build::{build_cli, run_build};
pub use drain::{drain_worker_cli, run_drain_worker};
pub use local::{info_cli, shutdown_cli};
pub use membership::{add_node_cli, remove_node_cli, run_add_node, run_remove_node};
pub use status::{cluster_status_cli, run_cluster_status};
