//! Leadership: whether this node may serve (it leads, a quorum confirmed
//! it within [`LEADERSHIP_FRESH_MS`], and it extended the leases of its
//! term), proposing through the log, and what only a leader does — extend
//! every lease on election, keep confirming its leadership, expire leases
//! and dead workers. (Elections themselves are `detector`'s.)

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use distbuild_model::{Command, Proposal, Response};
use openraft::ServerState;
use tokio_util::sync::CancellationToken;

use super::config::{HEARTBEAT_INTERVAL_MS, LEADER_SILENCE, LEADER_WAIT, LEADERSHIP_FRESH_MS};
use super::error::{ReplicaError, Result};
use super::node::Node;

fn just_elected() -> ReplicaError {
    ReplicaError::NotLeader {
        message: "this coordinator was just elected leader; retry".to_string(),
        leader: None,
    }
}

impl Node {
    /// Ok when this node leads, a quorum confirmed it recently, and it has
    /// extended the leases of its term: only then does it serve. Otherwise
    /// the answer a caller should get: UNAVAILABLE naming the leader when
    /// another node is known to lead.
    pub fn check_leader(&self) -> Result<()> {
        self.leadership().map_err(|(status, _)| status)
    }

    /// [`Node::check_leader`]'s answer, and on refusal whether waiting a
    /// moment may change it (an election running, this node just elected,
    /// or a leader silent for [`LEADER_SILENCE`]), as opposed to a redirect
    /// to a leader heard from lately or a leader cut off from its quorum,
    /// which the caller should act on at once.
    fn leadership(&self) -> std::result::Result<(), (ReplicaError, bool)> {
        let (state, term, leader, leader_addr) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let leader_addr = m.current_leader.and_then(|id| {
                m.membership_config
                    .membership()
                    .get_node(&id)
                    .map(|n| n.addr.clone())
            });
            (m.state, m.current_term, m.current_leader, leader_addr)
        };
        if state == ServerState::Leader {
            if self.leases_extended_in.load(Ordering::Acquire) != term {
                return Err((just_elected(), true));
            }
            let confirmed = *self.confirmed.lock().expect("confirmed lock poisoned");
            return match confirmed {
                Some((t, at)) if t == term => {
                    if at.elapsed() < Duration::from_millis(LEADERSHIP_FRESH_MS) {
                        Ok(())
                    } else {
                        Err((
                            ReplicaError::NotLeader {
                                message: "this coordinator cannot reach a quorum of its cluster; retry another".to_string(),
                                leader: None,
                            },
                            false,
                        ))
                    }
                }
                // Elected, not yet confirmed by a quorum: a moment away.
                _ => Err((just_elected(), true)),
            };
        }
        let message = match leader {
            Some(id) => format!("not the leader (coordinator {id} is)"),
            None => "not the leader, and no leader is elected yet; retry".to_string(),
        };
        let redirect = leader_addr.is_some();
        let leader_silent = self.contact.last().elapsed() >= LEADER_SILENCE;
        Err((
            ReplicaError::NotLeader {
                message,
                leader: leader_addr,
            },
            !redirect || leader_silent,
        ))
    }

    /// Like [`Node::check_leader`], but while no leader is known (an
    /// election), this node was just elected, or the leader has been silent
    /// for [`LEADER_SILENCE`] (it may be dead), waits up to [`LEADER_WAIT`]
    /// for that to settle, so a caller is redirected (or served) the moment
    /// the election ends instead of polling for it.
    pub async fn ready_leader(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let mut metrics = self.raft.metrics();
        loop {
            let err = match self.leadership() {
                Ok(()) => return Ok(()),
                Err((err, false)) => return Err(err),
                Err((err, true)) => err,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(err);
            }
            // Leadership settles through metrics (an election) or through
            // this leader's own duties (lease extension, confirmation).
            tokio::select! {
                changed = metrics.changed() => {
                    if changed.is_err() {
                        // Raft stopped: nothing will settle.
                        return Err(err);
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(HEARTBEAT_INTERVAL_MS / 2)) => {}
                () = self.shutdown.cancelled() => return Err(err),
            }
        }
    }

    /// Records that a quorum confirmed this node's leadership in `term`,
    /// as of `asked` (when the confirmation was requested).
    pub fn leadership_confirmed(&self, term: u64, asked: tokio::time::Instant) {
        *self.confirmed.lock().expect("confirmed lock poisoned") = Some((term, asked));
    }

    /// Records that this leader extended every lease in `term`.
    pub fn leases_extended(&self, term: u64) {
        self.leases_extended_in.store(term, Ordering::Release);
    }

    /// The term in which this leader extended the leases (0 if never).
    pub fn leases_extended_term(&self) -> u64 {
        self.leases_extended_in.load(Ordering::Acquire)
    }

    /// Proposes `command` and waits until it is applied.
    pub async fn propose(&self, command: Command) -> Result<Response> {
        self.propose_once(Proposal::once(command)).await
    }

    /// Proposes `command` on behalf of request `request_id` (already
    /// checked): a retry of the same request gets the first answer.
    pub async fn propose_request(&self, request_id: String, command: Command) -> Result<Response> {
        let request_id = (!request_id.is_empty()).then_some(request_id);
        self.propose_once(Proposal {
            request_id,
            command,
        })
        .await
    }

    async fn propose_once(&self, proposal: Proposal) -> Result<Response> {
        let mut responses = self.propose_together(vec![proposal]).await?;
        match (responses.pop(), responses.is_empty()) {
            (Some(response), true) => Ok(response),
            _ => Err(ReplicaError::Unavailable(
                "the log answered a proposal with no single answer; retry".into(),
            )),
        }
    }

    /// Proposes `proposals` (at most `MAX_BATCH`) in one entry, applied in
    /// order; their answers in order. The entry may carry other callers'
    /// proposals too (see `batch`).
    pub async fn propose_together(&self, proposals: Vec<Proposal>) -> Result<Vec<Response>> {
        // The leader's own lease extension is proposed before it serves.
        if !proposals
            .iter()
            .all(|p| matches!(p.command, Command::ExtendLeases { .. }))
        {
            self.ready_leader().await?;
        }
        self.batcher.propose(proposals).await
    }
}

/// What only a leader does besides answering: on election, extend every
/// lease by one period (through the log) before serving; then keep
/// confirming with a quorum that it still leads, so an isolated leader
/// stops serving within [`LEADERSHIP_FRESH_MS`].
pub async fn leader_duties(node: Arc<Node>, shutdown: CancellationToken) {
    let period = Duration::from_millis(HEARTBEAT_INTERVAL_MS * 2);
    let mut metrics = node.raft.metrics();
    let mut last_confirm = None;
    loop {
        let (state, term) = {
            let m = metrics.borrow_and_update();
            (m.state, m.current_term)
        };
        if state == openraft::ServerState::Leader {
            if node.leases_extended_term() != term {
                node.start_leader_time(term);
                let command = Command::ExtendLeases {
                    now_ms: node.now_ms(),
                    lease_timeout_ms: node.tuning.lease_timeout_ms,
                };
                let asked = tokio::time::Instant::now();
                match node.propose(command).await {
                    Ok(_) => {
                        // Committed in this term: a quorum took this node's
                        // appends after `asked`, which confirms its
                        // leadership as of then as a heartbeat round would.
                        node.leadership_confirmed(term, asked);
                        last_confirm = Some(asked);
                        node.leases_extended(term);
                    }
                    Err(e) => tracing::warn!("extend leases: {e}"),
                }
            }
            // Metrics change with every applied entry: confirm at most
            // every `period`, not per entry.
            if last_confirm.is_none_or(|at: tokio::time::Instant| at.elapsed() >= period) {
                let asked = tokio::time::Instant::now();
                last_confirm = Some(asked);
                let confirm = tokio::time::timeout(
                    Duration::from_millis(LEADERSHIP_FRESH_MS),
                    node.raft.ensure_linearizable(),
                )
                .await;
                if let Ok(Ok(_)) = confirm {
                    // Fresh as of when it was asked, not when answered.
                    node.leadership_confirmed(term, asked);
                } else if node.check_leader().is_err() {
                    // Cut off from its quorum while keeping its term: no
                    // heartbeat could land meanwhile, so the leases are
                    // extended again before it serves or expires any.
                    node.leases_extended(0);
                }
            }
        } else {
            last_confirm = None;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = metrics.changed() => {
                if changed.is_err() {
                    // Raft stopped (fatally): nothing to lead any more.
                    tracing::error!("raft stopped; this coordinator no longer leads");
                    return;
                }
            }
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// On the leader, proposes a garbage collection every
/// `Tuning::gc_interval_ms` (see `distbuild_model::gc`).
pub async fn collect_garbage(node: Arc<Node>, shutdown: CancellationToken) {
    let period = Duration::from_millis(node.tuning.gc_interval_ms);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        if node.check_leader().is_err() {
            continue;
        }
        let command = Command::CollectGarbage {
            now_ms: node.now_ms(),
            limits: node.tuning.gc,
        };
        match node.propose(command).await {
            Ok(Response::Collected(c)) if c.blobs > 0 || c.results > 0 => tracing::info!(
                blobs = c.blobs,
                blob_bytes = c.blob_bytes,
                results = c.results,
                "collected garbage"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("collect garbage: {e}"),
        }
    }
}

/// On the leader, proposes lease expiry whenever some lease ran out or
/// some worker stopped heartbeating.
pub async fn expire_leases(node: Arc<Node>, shutdown: CancellationToken) {
    let period = Duration::from_millis((node.tuning.lease_timeout_ms / 4).clamp(25, 1000));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let now_ms = node.now_ms();
        // A worker silent for a lease period is dead: no lease of its
        // could still be renewed.
        let worker_timeout_ms = node.tuning.lease_timeout_ms;
        if node.check_leader().is_err() || !node.model().needs_expiry(now_ms, worker_timeout_ms) {
            continue;
        }
        let command = Command::ExpireLeases {
            now_ms,
            max_attempts: node.tuning.max_attempts,
            worker_timeout_ms,
        };
        if let Err(e) = node.propose(command).await {
            tracing::warn!("expire leases: {e}");
        }
    }
}
