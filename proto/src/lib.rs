//! distbuild's wire protocol and shared domain types. Every other crate of
//! ours speaks through this one; it depends on none of them.

mod cache_key;
pub mod graph;
mod ids;

pub use cache_key::cache_key;
pub use ids::{Digest, IdError, JobId};

/// Generated code for the Raft transport between coordinators.
pub mod raft_v1 {
    tonic::include_proto!("distbuild.raft.v1");
}
