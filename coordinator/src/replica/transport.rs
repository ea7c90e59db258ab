//! What other replicas send this one over the Raft transport, handed to
//! openraft; an accepted message from a live leader is noted for the
//! election timing (`contact`). Payloads are decoded here: one this replica
//! cannot read is refused with [`ReplicaError::Invalid`].

use distbuild_proto::raft_v1::RaftPayload;
use openraft::raft::{AppendEntriesResponse, InstallSnapshotRequest};

use super::error::{ReplicaError, Result};
use super::network::{decode, encode};
use super::node::Node;
use super::types::TypeConfig;

fn decoded<T: serde::de::DeserializeOwned>(payload: &RaftPayload) -> Result<T> {
    decode(payload).map_err(|e| ReplicaError::Invalid(e.to_string()))
}

fn encoded<T: serde::Serialize>(value: &T) -> Result<RaftPayload> {
    encode(value).map_err(|e| ReplicaError::Internal(format!("encode a raft answer: {e}")))
}

impl Node {
    /// openraft's AppendEntries, from the leader.
    pub async fn raft_append_entries(&self, payload: &RaftPayload) -> Result<RaftPayload> {
        let received = tokio::time::Instant::now();
        let rpc = decoded(payload)?;
        let answer = self.raft.append_entries(rpc).await;
        // Anything but a refusal for a stale term is a live leader's.
        if matches!(&answer, Ok(a) if !matches!(a, AppendEntriesResponse::HigherVote(_))) {
            self.contact.heard(received);
        }
        encoded(&answer)
    }

    /// openraft's Vote, from a candidate.
    pub async fn raft_vote(&self, payload: &RaftPayload) -> Result<RaftPayload> {
        let rpc = decoded(payload)?;
        encoded(&self.raft.vote(rpc).await)
    }

    /// openraft's InstallSnapshot (one chunk), from the leader.
    pub async fn raft_install_snapshot(&self, payload: &RaftPayload) -> Result<RaftPayload> {
        let received = tokio::time::Instant::now();
        let rpc: InstallSnapshotRequest<TypeConfig> = decoded(payload)?;
        let term = rpc.vote.leader_id().term;
        let answer = self.raft.install_snapshot(rpc).await;
        if matches!(&answer, Ok(a) if a.vote.leader_id().term <= term) {
            self.contact.heard(received);
        }
        encoded(&answer)
    }
}
