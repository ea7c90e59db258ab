//! What the simulation sees inside the coordinators: every applied entry
//! (through the coordinator's `ApplyObserver` seam) and every leadership
//! (from openraft's metrics). Both go into the trace and into
//! [`Observations`] for the checkers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use distbuild_coordinator::{ApplyObserver, Node};
use distbuild_model::{Command, Proposal, Response};
use sha1::{Digest as _, Sha1};

use crate::trace::{Trace, What};

/// One applied entry as a replica applied it.
#[derive(Debug, Clone)]
pub struct Applied {
    pub proposal: Proposal,
    pub response: Response,
    /// Hash of both (what replicas must agree on).
    pub digest: String,
    /// The simulated real time it was applied at (ms since the epoch).
    pub real_ms: u64,
}

#[derive(Default)]
pub struct Observations {
    /// Per replica, per log index, what it applied (a restarted replica
    /// that applies an index again adds a second entry).
    pub applied: BTreeMap<u64, BTreeMap<u64, Vec<Applied>>>,
    /// (term, replica) for every replica seen leading, in the order they
    /// were first seen (see the `raft` checker).
    pub leaders: Vec<(u64, u64)>,
    /// (replica, index) of every snapshot a replica was seen holding.
    /// Snapshot files are written outside the blocking seam, so a run is
    /// kept below openraft's snapshot threshold (see the `raft` checker).
    pub snapshots: Vec<(u64, u64)>,
}

impl Observations {
    /// The committed log as the replicas applied it: per index, the first
    /// application seen (the `raft` checker holds the others equal to it).
    pub fn committed(&self) -> BTreeMap<u64, &Applied> {
        let mut log = BTreeMap::new();
        for per_node in self.applied.values() {
            for (index, applied) in per_node {
                if let Some(first) = applied.first() {
                    log.entry(*index).or_insert(first);
                }
            }
        }
        log
    }

    /// The worker granted the newest lease so far, and the index of that
    /// grant.
    pub fn newest_lease_holder(&self) -> Option<(u64, String)> {
        self.committed()
            .into_iter()
            .rev()
            .find_map(
                |(index, applied)| match (&applied.proposal.command, &applied.response) {
                    (Command::Assign { worker_id, .. }, Response::Assigned { tokens, .. })
                        if tokens.iter().any(Option::is_some) =>
                    {
                        Some((index, worker_id.clone()))
                    }
                    _ => None,
                },
            )
    }

    /// Whether a lease granted to `worker` expired in an entry after
    /// index `after`.
    pub fn lease_expired_since(&self, worker: &str, after: u64) -> bool {
        let log = self.committed();
        let mut granted = BTreeSet::new();
        for applied in log.values() {
            if let (Command::Assign { worker_id, .. }, Response::Assigned { tokens, .. }) =
                (&applied.proposal.command, &applied.response)
                && worker_id == worker
            {
                granted.extend(tokens.iter().flatten().copied());
            }
        }
        log.range(after + 1..).any(|(_, applied)| {
            matches!(&applied.response, Response::Expired { tokens }
                if tokens.iter().any(|token| granted.contains(token)))
        })
    }
}

/// The observer shared by every coordinator of a run.
#[derive(Clone)]
pub struct Observer {
    trace: Trace,
    seen: Arc<Mutex<Observations>>,
}

impl Observer {
    pub fn new(trace: Trace) -> Self {
        Self {
            trace,
            seen: Arc::default(),
        }
    }

    pub fn observations(&self) -> MutexGuard<'_, Observations> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that `node` leads in `term`; false if it was seen before.
    fn note_leader(&self, term: u64, node: u64) -> bool {
        let leaders = &mut self.observations().leaders;
        let new = !leaders.contains(&(term, node));
        if new {
            leaders.push((term, node));
        }
        new
    }

    /// Watches `node`'s metrics until they end, noting each term it leads.
    pub async fn watch_leadership(self, node: Arc<Node>) {
        let mut metrics = node.raft_metrics();
        loop {
            let (state, term, snapshot) = {
                let m = metrics.borrow_and_update();
                (m.state, m.current_term, m.snapshot.map(|id| id.index))
            };
            if let Some(index) = snapshot {
                let snapshots = &mut self.observations().snapshots;
                if !snapshots.contains(&(node.node_id(), index)) {
                    snapshots.push((node.node_id(), index));
                }
            }
            if state == openraft::ServerState::Leader && self.note_leader(term, node.node_id()) {
                self.trace.record(What::Leader {
                    node: node.node_id(),
                    term,
                });
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    }
}

impl ApplyObserver for Observer {
    fn applied(&self, node_id: u64, index: u64, proposal: &Proposal, response: &Response) {
        let mut sha = Sha1::new();
        sha.update(format!("{proposal:?}\n{response:?}").as_bytes());
        let digest = hex::encode(sha.finalize());
        self.trace.record(What::Applied {
            node: node_id,
            index,
            digest: digest.clone(),
        });
        self.observations()
            .applied
            .entry(node_id)
            .or_default()
            .entry(index)
            .or_default()
            .push(Applied {
                proposal: proposal.clone(),
                response: response.clone(),
                digest,
                real_ms: turmoil::since_epoch().map_or(0, |d| d.as_millis() as u64),
            });
    }
}
