//! distbuild's wire protocol and shared domain types. Every other crate of
//! ours speaks through this one; it depends on none of them.

pub mod accept;
pub mod artifact;
pub mod auth;
pub mod blob;
pub mod blocking;
mod cache_key;
pub mod graph;
mod ids;
pub mod leader;
pub mod net;
pub mod rng;
pub mod text;
pub mod tls;
pub mod wire;

pub use cache_key::{job_key, resolved_key};
pub use ids::{BlobKey, Digest, HashFunction, Hasher, IdError, JobId};

/// Generated code, nested as the proto packages are (the Raft transport's
/// messages refer to `distbuild.v1` types by relative path).
pub mod distbuild {
    /// The client, worker, peer and admin APIs.
    pub mod v1 {
        tonic::include_proto!("distbuild.v1");
    }
    pub mod raft {
        /// The transport between coordinator replicas.
        pub mod v1 {
            tonic::include_proto!("distbuild.raft.v1");
        }
    }
}

pub use distbuild::raft::v1 as raft_v1;
pub use distbuild::v1;

/// The encoded descriptors of every distbuild service and message, for
/// gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
