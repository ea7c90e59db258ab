//! A follower stands for election soon after its leader falls silent.
//!
//! openraft 0.9 lets a follower stand only after its leader lease (the
//! maximum election timeout) plus a random election timeout, checked on a
//! tick of 1.5 heartbeat intervals: 500 to 750 ms of silence here, and the
//! random spread (100 ms) is narrower than the tick (150 ms), so the two
//! survivors of a three-node cluster often stand in the same tick, split
//! the vote, and try again a round later (over a second in all). The
//! lease cannot be shortened alone (openraft ties it to the election
//! timeout, and the heartbeat interval, which is also every append's
//! deadline, must stay below that).
//!
//! So each follower watches for itself: every append or snapshot its
//! leader gets through is contact; once the leader lease has passed without
//! any, plus a stagger that differs per node and per term (320 to 470 ms
//! of silence), it asks openraft to elect now. The other voters grant the
//! vote only once their own lease of the old leader ran out (openraft
//! checks that). A live leader that stays silent that long (a stalled
//! machine) is replaced as openraft's own timer would replace it 180 ms
//! later. openraft's timer stays as the backstop (after restarts, when no
//! leader is known, for candidates).

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use openraft::ServerState;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::node::{ELECTION_TIMEOUT_MAX_MS, ELECTION_TIMEOUT_MIN_MS, Node};

/// How often a follower looks at its leader's silence.
const CHECK_EVERY: Duration = Duration::from_millis(10);
/// Staggers between followers: one stands this much after the lease at
/// most (and at least the minimum, so a follower that heard the last
/// heartbeat a moment later has its lease run out before it is asked).
const STAGGER_MIN_MS: u64 = 20;
const STAGGER_MAX_MS: u64 = 170;

/// When this node last heard from a leader (an append or a snapshot it
/// accepted).
#[derive(Debug)]
pub struct Contact(Mutex<Instant>);

impl Default for Contact {
    fn default() -> Self {
        Self(Mutex::new(Instant::now()))
    }
}

impl Contact {
    /// Notes that a leader's message, received at `at`, was accepted.
    pub fn heard(&self, at: Instant) {
        let mut last = self.0.lock().expect("contact lock poisoned");
        *last = (*last).max(at);
    }

    fn last(&self) -> Instant {
        *self.0.lock().expect("contact lock poisoned")
    }
}

/// How long after the lease `node_id` stands in `term`: the same on every
/// run (no random source), different between nodes and between terms.
pub fn stagger(node_id: u64, term: u64) -> Duration {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (node_id, term).hash(&mut hasher);
    let spread = STAGGER_MAX_MS - STAGGER_MIN_MS;
    Duration::from_millis(STAGGER_MIN_MS + hasher.finish() % spread)
}

/// Silence after which `node_id`, following in `term`, stands.
pub fn patience(node_id: u64, term: u64) -> Duration {
    Duration::from_millis(ELECTION_TIMEOUT_MAX_MS) + stagger(node_id, term)
}

/// Runs on every node until `shutdown`: while it follows a known leader as
/// a voter, triggers an election once the leader was silent for
/// [`patience`].
pub async fn stand_when_leader_silent(node: Arc<Node>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_stood: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (following, term) = {
            let metrics = node.raft.metrics();
            let m = metrics.borrow();
            let voter = m
                .membership_config
                .membership()
                .voter_ids()
                .any(|id| id == node.node_id);
            let following = m.state == ServerState::Follower
                && voter
                && m.current_leader.is_some_and(|l| l != node.node_id);
            (following, m.current_term)
        };
        if !following {
            continue;
        }
        let silent = node.contact.last().elapsed();
        if silent < patience(node.node_id, term) {
            continue;
        }
        // One try per election round: openraft's own timer takes over if
        // this one does not settle.
        if last_stood
            .is_some_and(|at| at.elapsed() < Duration::from_millis(ELECTION_TIMEOUT_MIN_MS))
        {
            continue;
        }
        last_stood = Some(Instant::now());
        tracing::info!(
            "coordinator {}: no word from the leader of term {term} for {} ms; standing for election",
            node.node_id,
            silent.as_millis()
        );
        if let Err(e) = node.raft.trigger().elect().await {
            tracing::warn!("trigger an election: {e}");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staggers_differ_between_nodes_and_terms_and_stay_in_range() {
        let mut seen = std::collections::BTreeSet::new();
        for node in 1..=5 {
            for term in 1..=20 {
                let s = stagger(node, term);
                assert!(s >= Duration::from_millis(STAGGER_MIN_MS));
                assert!(s < Duration::from_millis(STAGGER_MAX_MS));
                assert_eq!(s, stagger(node, term), "the same on every call");
                seen.insert(s);
            }
        }
        assert!(seen.len() > 50, "only {} distinct staggers", seen.len());
        // Below openraft's own earliest try (lease + minimum timeout).
        assert!(
            patience(1, 1)
                < Duration::from_millis(ELECTION_TIMEOUT_MAX_MS + ELECTION_TIMEOUT_MIN_MS)
        );
    }
}
