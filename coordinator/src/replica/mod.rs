//! One coordinator replica: the openraft node over raft-store running the
//! model, and everything that is Raft's business around it — transport
//! (`network` out, `transport` in), elections (`detector`, `contact`),
//! leadership (checking and confirming it, extending and expiring leases:
//! `leadership`), membership changes and cluster status (`membership`),
//! and the quorum storage of source blobs (`replication`). The API layer
//! calls [`Node`]'s methods and gets [`ReplicaError`]s back; it never
//! reaches into openraft.

mod app;
mod batch;
mod config;
mod contact;
mod detector;
mod error;
mod leadership;
mod membership;
mod metrics;
pub mod network;
mod node;
mod replication;
mod runtime;
mod seams;
mod sweep;
mod time;
mod transport;
mod types;

pub use self::config::{
    Bootstrap, ELECTION_TIMEOUT_MAX_MS, ELECTION_TIMEOUT_MIN_MS, HEARTBEAT_INTERVAL_MS,
    LEADER_SILENCE, LEADER_WAIT, LEADERSHIP_FRESH_MS, Tuning,
};
pub use self::detector::drive_elections;
pub use self::error::{ReplicaError, Result};
pub use self::leadership::{collect_garbage, expire_leases, leader_duties};
pub use self::membership::{MemberAnswer, Unanswered};
pub use self::node::{Node, WorkerStats};
pub use self::seams::{ApplyObserver, Clock, InjectedBugs, Seams, SystemClock};
pub use self::sweep::sweep_blobs;
pub use self::types::{TypeConfig, role_name};
