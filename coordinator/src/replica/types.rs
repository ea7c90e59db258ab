//! openraft's types for the coordinator's log: the model's [`Proposal`]s
//! go in, its [`Response`]s come out.

use distbuild_model::{Proposal, Response};
use openraft::{BasicNode, ServerState};

openraft::declare_raft_types!(
    /// openraft's types for the coordinator's log.
    pub TypeConfig:
        D = Proposal,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = super::runtime::SeamRuntime,
);

/// A role as `cluster status` names it.
pub fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}
