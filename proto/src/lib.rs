//! distbuild's wire protocol and shared domain types. Every other crate of
//! ours speaks through this one; it depends on none of them.

pub mod artifact;
mod cache_key;
pub mod graph;
mod ids;
pub mod wire;

pub use cache_key::cache_key;
pub use ids::{Digest, IdError, JobId};

/// Generated code for the Raft transport between coordinators.
pub mod raft_v1 {
    tonic::include_proto!("distbuild.raft.v1");
}

/// Generated code for the client, worker, peer and admin APIs.
pub mod v1 {
    tonic::include_proto!("distbuild.v1");
}
