//! distbuild's wire protocol and shared domain types.

/// Generated code for the Raft transport between coordinators.
pub mod raft_v1 {
    tonic::include_proto!("distbuild.raft.v1");
}
