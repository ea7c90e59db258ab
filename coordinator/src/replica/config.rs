//! How a replica is configured: the scheduler's and leases' tunables, how
//! it finds its cluster, and the Raft timing every replica runs with.

use std::collections::BTreeMap;
use std::time::Duration;

/// Tunables of the scheduler and leases.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// A lease not renewed for this long expires.
    pub lease_timeout_ms: u64,
    /// How often workers renew.
    pub heartbeat_interval_ms: u64,
    /// How long a ready job waits for a worker holding its inputs.
    pub locality_wait_ms: u64,
    /// Lease expiries after which a job fails.
    pub max_attempts: u32,
    /// Time limit of a job whose build asks for none.
    pub default_job_timeout_ms: u64,
    /// The longest time limit a build may ask for.
    pub max_job_timeout_ms: u64,
    /// How often the leader collects garbage.
    pub gc_interval_ms: u64,
    /// How old an unrecorded blob file must be before it is deleted.
    pub blob_sweep_grace_ms: u64,
    /// What a collection keeps.
    pub gc: distbuild_model::GcLimits,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            lease_timeout_ms: 10_000,
            heartbeat_interval_ms: 2_000,
            locality_wait_ms: 50,
            max_attempts: 3,
            default_job_timeout_ms: 3_600_000,
            max_job_timeout_ms: 86_400_000,
            gc_interval_ms: 60_000,
            blob_sweep_grace_ms: 3_600_000,
            gc: distbuild_model::GcLimits {
                blob_retention_ms: 3 * 86_400_000,
                max_blob_bytes: 20 << 30,
                max_results: 200_000,
                max_result_bytes: 1 << 30,
            },
        }
    }
}

/// How a replica finds its cluster when its data dir is pristine (a
/// restarted replica ignores this: its log knows the cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// A cluster of one: this node.
    Single,
    /// The initial voters by node ID (this node among them); every one of
    /// them initializes with the same list, which is safe in Raft: the
    /// membership entry they write is identical.
    Initial(BTreeMap<u64, String>),
    /// Wait to be added by the leader (`cluster add-node`).
    Join,
}

/// The Raft timing every replica runs with. A leader sends a heartbeat
/// every 100 ms; its followers stand in turns after 320 ms without one (the
/// next 60 ms later), so a dead leader is replaced in about a third of a
/// second while a heartbeat may be late by a few intervals on a busy
/// machine without unseating a live one. Every election is timed by
/// `detector` (openraft's own timer is off); openraft
/// uses the maximum election timeout as the leader lease (a voter refuses
/// to vote while its lease of the last leader holds). openraft 0.9 also
/// uses the heartbeat interval as the deadline of every append: 100 ms
/// leaves room for a batch's transfer (at most 1 MiB, see raft-store) and
/// the follower's fsync.
pub const HEARTBEAT_INTERVAL_MS: u64 = 100;
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 200;
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 300;
/// A leader serves only while a quorum confirmed its leadership this
/// recently; an isolated leader stops serving (clients and workers move
/// to the majority's new leader) instead of answering from a stale state.
pub const LEADERSHIP_FRESH_MS: u64 = 1_000;

/// How long a request waits on a node for an election to settle before
/// it is told to retry.
pub const LEADER_WAIT: Duration = Duration::from_secs(2);

/// A follower that has not heard from its leader for this long (one and a
/// half heartbeats) doubts it: instead of sending a caller to a leader that
/// may be dead (which the caller would find refusing connections, and come
/// back, until an election names another), it holds the request, within
/// [`LEADER_WAIT`], until the leader is heard again or an election ends.
pub const LEADER_SILENCE: Duration = Duration::from_millis(HEARTBEAT_INTERVAL_MS * 3 / 2);
