//! distbuild worker: takes jobs from the coordinator, runs them in sandbox
//! directories, keeps their outputs in a content-addressed cache (`cache`)
//! and serves them to peers (`peer`). The artifact format lives in
//! `distbuild_proto::artifact`, shared with the client.
//!
//! Modules by concern: `cli` (flags), `runtime` (register, poll,
//! heartbeat, report), `job` (one job in its sandbox), `action` (one
//! Remote Execution API v2 action: its input root materialized from the
//! CAS, its outputs uploaded and described by an `ActionResult`), `process` (the
//! process-spawning seam), `sandbox` (bubblewrap around each command),
//! `cgroup` (the per-job process limit), `connect` (the network seam for outgoing
//! connections), `coordinator` (the WorkerApi client, leader following),
//! `fetch` (blobs and artifacts into the cache), `turns` (the run slots
//! a job's commands wait for), `peer` (the PeerApi server), `metrics` (what `/metrics` shows), `health` (what
//! `grpc.health.v1` answers).
//!
//! Through coordinator failovers: every call to the coordinators has a
//! deadline and carries a request ID that its retries reuse (applied once);
//! the worker retries, rotating through the coordinator addresses with
//! bounded backoff, and never gives up on the cluster; failing heartbeats
//! never stop a job. A dependency artifact that none of its holders can
//! serve is reported as lost (`lost_inputs`), not as the job's failure.
//!
//! Invariants: never touches Raft; depends only on `proto` among our crates.

#![warn(missing_docs)]

pub mod action;
pub mod cache;
pub mod cgroup;
pub mod cli;
pub mod connect;
pub mod coordinator;
pub mod fetch;
pub mod job;
pub mod jobdir;
pub mod metrics;
pub mod peer;
pub mod process;
pub mod runtime;
pub mod sandbox;
pub mod tree;
pub mod turns;

pub use cli::{WorkerArgs, run_cli};
pub use runtime::{WorkerConfig, run};
