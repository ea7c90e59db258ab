//! Elections: when a replica stands.
//!
//! Leaders are elected the standard Raft way (openraft's
//! `single-term-leader` mode): a voter grants one vote per term, so a term
//! has at most one leader. openraft 0.9 would time elections itself, but it
//! draws each node's election timeout once, at start, and checks it on a
//! tick of 1.5 heartbeat intervals (150 ms here, wider than the 100 ms
//! spread of the timeouts): candidates that split a vote then split it
//! again, round after round, in lockstep (the simulation found a cluster
//! that never elected). So openraft's own timer is off (`enable_elect:
//! false`) and this task times every election, checking every 10 ms:
//!
//! - A follower of a leader of the current term (its vote is committed)
//!   stands once nothing from that leader got through for the leader lease
//!   (the maximum election timeout: the other voters refuse a vote until
//!   their own lease ran out) plus 20 ms plus 60 ms per rank: the leader's
//!   followers (its other voters) take turns by node ID, rotated by the
//!   term, so the survivors of a dead leader do not stand together and
//!   split the vote (one stands after 320 ms of silence, the next 60 ms
//!   later if the first could not win). A live leader that is silent that
//!   long (a stalled machine) is replaced.
//! - Any other voter (a candidate whose round did not settle, a follower
//!   that voted, or saw a new term, but has no leader yet) stands a random
//!   50 to 250 ms after its vote last changed. Standing changes its own
//!   vote (a new term), so each try draws a new wait. The answers to a
//!   candidate's round adjust it ([`Verdict`]): a candidate that learns of
//!   a longer log than its own waits 300 ms more (it cannot win; openraft's
//!   own timer backs off likewise), and of two candidates that split a
//!   vote, the one with the better log (then the higher node ID) stands
//!   again 20 ms after its try, so the next term goes to it. (openraft does
//!   not move a voter to a term whose candidate it refused for a shorter
//!   log, so the better candidate needs that second try.)
//! - The only voter of its cluster stands at once.

use std::sync::Arc;
use std::time::Duration;

use openraft::{ServerState, Vote};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::ELECTION_TIMEOUT_MAX_MS;
use super::contact::Verdict;
use super::node::Node;

/// How often the replica looks at its state.
const CHECK_EVERY: Duration = Duration::from_millis(10);
/// A follower of a known leader stands this long after the leader lease
/// (so that a voter that heard the last heartbeat a moment later has its
/// lease run out before it is asked), plus one turn per follower ranked
/// before it (a turn leaves the one before time to win: its vote's fsync
/// and a round trip).
const FIRST_TURN: Duration = Duration::from_millis(20);
const TURN: Duration = Duration::from_millis(60);
/// Any other voter stands this long after its vote last changed. The
/// minimum leaves a vote round (one round trip and the voters' fsync of
/// their vote) time to settle.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_millis(250);
/// A candidate found [`Verdict::Behind`] waits this much longer (a leader
/// lease: time for the better candidate to win).
const BEHIND_BACKOFF: Duration = Duration::from_millis(300);
/// A candidate found [`Verdict::Ahead`] stands again this soon after its
/// last try (its answers arrive within a round trip).
const AHEAD_RETRY: Duration = Duration::from_millis(20);

/// Where a voter stands, as far as elections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Its vote is committed: a leader of its current term is known, and
    /// this is its `rank`th follower in this term's order (see [`rank`]).
    Following { rank: usize },
    /// No leader of its current term is known.
    Undecided,
    /// The only voter, not leading (nobody to wait for).
    Alone,
}

/// How long the replica waits before it stands: counted from the leader's
/// last message when [`Standing::Following`] (by rank), from the vote's last
/// change otherwise (drawn from the randomness seam, a new draw on every
/// call).
pub fn patience(standing: Standing) -> Duration {
    match standing {
        Standing::Following { rank } => {
            Duration::from_millis(ELECTION_TIMEOUT_MAX_MS) + FIRST_TURN + TURN * rank as u32
        }
        Standing::Undecided => {
            RETRY_MIN
                + distbuild_proto::rng::duration_up_to(
                    RETRY_MAX - RETRY_MIN - Duration::from_millis(1),
                )
        }
        Standing::Alone => Duration::ZERO,
    }
}

/// Where `node` comes among `leader`'s followers (the other voters, by
/// node ID) in `term`: the order rotates by one each term, so the first to
/// stand is not always the same node.
pub fn rank(node: u64, leader: u64, term: u64, voters: impl Iterator<Item = u64>) -> usize {
    let mut followers: Vec<u64> = voters.filter(|&id| id != leader).collect();
    followers.sort_unstable();
    followers.dedup();
    let Some(at) = followers.iter().position(|&id| id == node) else {
        return 0;
    };
    (at + (term % followers.len() as u64) as usize) % followers.len()
}

/// The vote (and standing) this replica is waiting under, since when, and
/// for how long.
struct Round {
    vote: Vote<u64>,
    standing: Standing,
    since: Instant,
    patience: Duration,
}

/// Runs on every node until `shutdown`: stands for election as the module
/// documentation says.
pub async fn drive_elections(node: Arc<Node>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut round: Option<Round> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (state, vote, standing) = {
            let metrics = node.raft.metrics();
            let m = metrics.borrow();
            let membership = m.membership_config.membership();
            let voter = membership.voter_ids().any(|id| id == node.node_id);
            let alone = voter && membership.voter_ids().count() == 1;
            let standing = if !voter {
                None
            } else if alone && m.state == ServerState::Follower {
                Some(Standing::Alone)
            } else if m.vote.is_committed() {
                let leader = m.vote.leader_id().voted_for().unwrap_or(node.node_id);
                let term = m.vote.leader_id().term;
                let rank = rank(node.node_id, leader, term, membership.voter_ids());
                Some(Standing::Following { rank })
            } else {
                Some(Standing::Undecided)
            };
            (m.state, m.vote, standing)
        };
        let Some(standing) = standing.filter(|_| state != ServerState::Leader) else {
            round = None;
            continue;
        };
        let now = Instant::now();
        let round = match &mut round {
            Some(r) if r.vote == vote && r.standing == standing => r,
            slot => slot.insert(Round {
                vote,
                standing,
                since: now,
                patience: patience(standing),
            }),
        };
        let quiet_since = match standing {
            Standing::Following { .. } => round.since.max(node.contact.last()),
            Standing::Undecided | Standing::Alone => round.since,
        };
        let quiet = now - quiet_since;
        let wait = match (standing, node.contact.verdict(vote.leader_id().term)) {
            (Standing::Undecided, Some(Verdict::Behind)) => round.patience + BEHIND_BACKOFF,
            (Standing::Undecided, Some(Verdict::Ahead)) => round.patience.min(AHEAD_RETRY),
            _ => round.patience,
        };
        if quiet < wait {
            continue;
        }
        // The next try (if this one changes nothing) waits afresh.
        round.since = now;
        round.patience = patience(Standing::Undecided);
        match standing {
            Standing::Following { .. } => tracing::info!(
                "coordinator {}: no word from the leader of term {} for {} ms; standing for election",
                node.node_id,
                vote.leader_id().term,
                quiet.as_millis()
            ),
            Standing::Undecided | Standing::Alone => tracing::info!(
                "coordinator {}: no leader in term {} after {} ms; standing for election",
                node.node_id,
                vote.leader_id().term,
                quiet.as_millis()
            ),
        }
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
    fn followers_take_distinct_turns_that_rotate_with_the_term() {
        for voters in [vec![1, 2, 3], vec![1, 2, 3, 4, 5]] {
            let mut first_to_stand = std::collections::BTreeSet::new();
            for term in 1..=10 {
                for leader in voters.iter().copied() {
                    let mut ranks: Vec<usize> = voters
                        .iter()
                        .filter(|&&id| id != leader)
                        .map(|&id| rank(id, leader, term, voters.iter().copied()))
                        .collect();
                    ranks.sort_unstable();
                    let expected: Vec<usize> = (0..voters.len() - 1).collect();
                    assert_eq!(
                        ranks, expected,
                        "voters {voters:?}, leader {leader}, term {term}"
                    );
                    let first = voters.iter().copied().find(|&id| {
                        id != leader && rank(id, leader, term, voters.iter().copied()) == 0
                    });
                    first_to_stand.insert(first.expect("someone is first"));
                }
            }
            assert_eq!(
                first_to_stand.len(),
                voters.len(),
                "every voter is sometimes first"
            );
        }
        let lease = Duration::from_millis(ELECTION_TIMEOUT_MAX_MS);
        assert_eq!(
            patience(Standing::Following { rank: 0 }),
            lease + FIRST_TURN
        );
        assert_eq!(
            patience(Standing::Following { rank: 2 }),
            lease + FIRST_TURN + 2 * TURN
        );
    }

    #[test]
    fn each_undecided_wait_is_a_new_draw_within_its_range() {
        distbuild_proto::rng::seed_this_thread(7);
        let draws: Vec<Duration> = (0..200).map(|_| patience(Standing::Undecided)).collect();
        for d in &draws {
            assert!(
                *d >= RETRY_MIN && *d < RETRY_MAX,
                "{d:?} not in {RETRY_MIN:?}..{RETRY_MAX:?}"
            );
        }
        let distinct: std::collections::BTreeSet<_> = draws.iter().collect();
        assert!(
            distinct.len() > 100,
            "only {} distinct waits",
            distinct.len()
        );
        assert_eq!(patience(Standing::Alone), Duration::ZERO);
    }
}
