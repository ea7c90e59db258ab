//! The `RaftTransport` service: what other replicas send this one (Raft
//! RPCs, blob copies, status questions). Payloads are decoded and checked
//! here; a payload this replica cannot read is refused with one line.

use std::sync::Arc;

use distbuild_proto::raft_v1::raft_transport_server::RaftTransport;
use distbuild_proto::raft_v1::{
    NodeStatusRequest, NodeStatusResponse, RaftPayload, StoreBlobResponse,
};
use distbuild_proto::v1::{BlobChunk, FetchRequest};
use distbuild_proto::wire::digest_from_wire;
use openraft::ServerState;
use openraft::raft::{AppendEntriesResponse, InstallSnapshotRequest};
use tonic::{Request, Response, Status, Streaming};

use super::{ResponseStream, receive_blob, stream_file};
use crate::network::{decode, encode};
use crate::node::{Node, TypeConfig};

pub struct RaftService {
    pub node: Arc<Node>,
}

fn encoded<T: serde::Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    encode(value)
        .map(Response::new)
        .map_err(|e| Status::internal(format!("encode a raft answer: {e}")))
}

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

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let received = tokio::time::Instant::now();
        let rpc = decode(request.get_ref()).map_err(Status::invalid_argument)?;
        let answer = self.node.raft.append_entries(rpc).await;
        // Anything but a refusal for a stale term is a live leader's.
        if matches!(&answer, Ok(a) if !matches!(a, AppendEntriesResponse::HigherVote(_))) {
            self.node.contact.heard(received);
        }
        encoded(&answer)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(request.get_ref()).map_err(Status::invalid_argument)?;
        encoded(&self.node.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let received = tokio::time::Instant::now();
        let rpc: InstallSnapshotRequest<TypeConfig> =
            decode(request.get_ref()).map_err(Status::invalid_argument)?;
        let term = rpc.vote.leader_id().term;
        let answer = self.node.raft.install_snapshot(rpc).await;
        if matches!(&answer, Ok(a) if a.vote.leader_id().term <= term) {
            self.node.contact.heard(received);
        }
        encoded(&answer)
    }

    async fn store_blob(
        &self,
        request: Request<Streaming<BlobChunk>>,
    ) -> Result<Response<StoreBlobResponse>, Status> {
        receive_blob(&self.node.blobs, request.into_inner()).await?;
        Ok(Response::new(StoreBlobResponse {}))
    }

    type FetchBlobStream = ResponseStream<BlobChunk>;

    async fn fetch_blob(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchBlobStream>, Status> {
        let digest = digest_from_wire(&request.get_ref().digest, "digest")
            .map_err(Status::invalid_argument)?;
        // Only this node's own copy: peers never chain fetches.
        match self.node.blobs.open_blob(&digest).await {
            Ok(Some(file)) => Ok(Response::new(stream_file(file))),
            Ok(None) => Err(Status::not_found(format!("no blob {digest} here"))),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    async fn node_status(
        &self,
        _request: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        Ok(Response::new(self.node.status()))
    }
}
