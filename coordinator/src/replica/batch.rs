//! The leader's proposals, batched: concurrent callers' proposals go into
//! one log entry (`Command::Batch`) while earlier entries commit, so that
//! a busy leader writes, replicates, fsyncs and applies one entry for
//! many reports, assignments and heartbeats. A caller alone is proposed
//! at once, as itself; the batch grows only while [`MAX_IN_FLIGHT`]
//! entries are committing, so the delay it adds is bounded by one
//! commit. A group of proposals that must land together (a report and
//! the assignment it makes room for) always shares an entry.

use std::sync::Arc;
use std::time::Duration;

use distbuild_model::{Command, MAX_BATCH, Proposal, Response};
use openraft::Raft;
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::error::{ReplicaError, Result};
use super::metrics::ReplicaMetrics;
use super::types::TypeConfig;

/// Entries being committed at once; while they are, new proposals wait
/// and join the next entry.
pub const MAX_IN_FLIGHT: usize = 2;
/// Encoded bytes of proposals one entry carries, at most (a proposal
/// bigger than that goes alone): openraft gives each append one heartbeat
/// interval, so no entry may be big.
pub const MAX_BATCH_BYTES: usize = 512 << 10;
/// Groups waiting for an entry, at most; past it proposers wait for room.
const MAX_WAITING: usize = 4096;
/// Bounds how long one entry may take before its callers are told to retry.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Proposals that share an entry, and who waits for their answers.
struct Group {
    proposals: Vec<Proposal>,
    bytes: usize,
    reply: oneshot::Sender<Result<Vec<Response>>>,
}

/// The proposer of one replica: a task forming entries from what callers
/// send it.
pub(super) struct Batcher {
    groups: mpsc::Sender<Group>,
    metrics: Arc<ReplicaMetrics>,
}

impl Batcher {
    /// Starts the task (it ends when the batcher is dropped).
    pub(super) fn start(raft: Raft<TypeConfig>, metrics: Arc<ReplicaMetrics>) -> Self {
        let (groups, waiting) = mpsc::channel(MAX_WAITING);
        tokio::spawn(form_entries(raft, waiting, metrics.clone()));
        Self { groups, metrics }
    }

    /// Proposes `proposals` (at most [`MAX_BATCH`]) in one entry, maybe
    /// beside others'; their answers in order.
    pub(super) async fn propose(&self, proposals: Vec<Proposal>) -> Result<Vec<Response>> {
        assert!(
            !proposals.is_empty() && proposals.len() <= MAX_BATCH,
            "a group fits one entry"
        );
        let bytes = proposals
            .iter()
            .map(|p| postcard::experimental::serialized_size(p).unwrap_or(usize::MAX))
            .fold(0usize, usize::saturating_add);
        let started = tokio::time::Instant::now();
        let (reply, answer) = oneshot::channel();
        let group = Group {
            proposals,
            bytes,
            reply,
        };
        if self.groups.send(group).await.is_err() {
            return Err(ReplicaError::Unavailable(
                "the coordinator is stopping; retry".into(),
            ));
        }
        let answered = answer.await.unwrap_or_else(|_| {
            Err(ReplicaError::Unavailable(
                "the coordinator is stopping; retry".into(),
            ))
        });
        self.metrics.proposal_answered(started.elapsed());
        answered
    }
}

/// Takes groups as they come: waits for an entry's room to commit, then
/// puts every group waiting (within the bounds) into one entry.
async fn form_entries(
    raft: Raft<TypeConfig>,
    mut waiting: mpsc::Receiver<Group>,
    metrics: Arc<ReplicaMetrics>,
) {
    let room = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut carried: Option<Group> = None;
    loop {
        let Ok(permit) = room.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(group) => group,
            None => match waiting.recv().await {
                Some(group) => group,
                None => return,
            },
        };
        let mut parts = first.proposals.len();
        let mut bytes = first.bytes;
        let mut entry = vec![first];
        while let Ok(group) = waiting.try_recv() {
            if parts + group.proposals.len() > MAX_BATCH
                || bytes.saturating_add(group.bytes) > MAX_BATCH_BYTES
            {
                carried = Some(group);
                break;
            }
            parts += group.proposals.len();
            bytes = bytes.saturating_add(group.bytes);
            entry.push(group);
        }
        metrics.entry_written(parts);
        let raft = raft.clone();
        tokio::spawn(async move {
            write(&raft, entry).await;
            drop(permit);
        });
    }
}

/// Writes `groups` as one entry and answers each.
async fn write(raft: &Raft<TypeConfig>, groups: Vec<Group>) {
    let mut proposals: Vec<Proposal> = Vec::new();
    let mut replies = Vec::with_capacity(groups.len());
    for group in groups {
        replies.push((group.proposals.len(), group.reply));
        proposals.extend(group.proposals);
    }
    let batched = proposals.len() > 1;
    let entry = if batched {
        Proposal::once(Command::Batch { proposals })
    } else {
        proposals.pop().expect("a group is not empty")
    };
    let responses = match write_entry(raft, entry).await {
        Ok(Response::Batch { responses }) if batched => Ok(responses),
        Ok(response) if !batched => Ok(vec![response]),
        Ok(other) => Err(ReplicaError::Unavailable(format!(
            "unexpected answer to a batch: {other:?}"
        ))),
        Err(e) => Err(e),
    };
    match responses {
        Ok(responses) => {
            let mut responses = responses.into_iter();
            for (count, reply) in replies {
                let _ = reply.send(Ok(responses.by_ref().take(count).collect()));
            }
        }
        Err(e) => {
            for (_, reply) in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

async fn write_entry(raft: &Raft<TypeConfig>, entry: Proposal) -> Result<Response> {
    let write = tokio::time::timeout(PROPOSE_TIMEOUT, raft.client_write(entry)).await;
    match write {
        Err(_) => Err(ReplicaError::Unavailable(
            "the coordinator did not commit the change in time; retry".to_string(),
        )),
        Ok(Ok(response)) => Ok(response.data),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => {
            Err(ReplicaError::NotLeader {
                message: "not the leader".to_string(),
                leader: forward.leader_node.map(|node| node.addr),
            })
        }
        Ok(Err(e)) => Err(ReplicaError::Unavailable(format!("raft: {e}"))),
    }
}
