//! openraft's types for the coordinator's log: the model's [`Proposal`]s
//! go in, its [`Response`]s come out.

use distbuild_model::{Proposal, Response};
use openraft::BasicNode;

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
