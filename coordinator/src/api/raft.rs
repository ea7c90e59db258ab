//! The `RaftTransport` service: what other replicas send this one (Raft
//! RPCs, blob copies, status questions). The replica decodes and checks
//! the payloads; this module only adapts them to gRPC.

use std::sync::Arc;

use distbuild_proto::raft_v1::raft_transport_server::RaftTransport;
use distbuild_proto::raft_v1::{
    NodeStatusRequest, NodeStatusResponse, RaftPayload, StoreBlobResponse,
};
use distbuild_proto::v1::{BlobChunk, FetchRequest};
use tonic::{Request, Response, Status, Streaming};

use super::status::to_status;
use super::{ResponseStream, blob_key_from_wire, receive_blob, stream_file};
use crate::replica::Node;

pub struct RaftService {
    pub node: Arc<Node>,
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let answer = self.node.raft_append_entries(request.get_ref()).await;
        answer.map(Response::new).map_err(to_status)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let answer = self.node.raft_vote(request.get_ref()).await;
        answer.map(Response::new).map_err(to_status)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let answer = self.node.raft_install_snapshot(request.get_ref()).await;
        answer.map(Response::new).map_err(to_status)
    }

    async fn store_blob(
        &self,
        request: Request<Streaming<BlobChunk>>,
    ) -> Result<Response<StoreBlobResponse>, Status> {
        receive_blob(self.node.blobs(), request.into_inner(), |_| Ok(())).await?;
        Ok(Response::new(StoreBlobResponse {}))
    }

    type FetchBlobStream = ResponseStream<BlobChunk>;

    async fn fetch_blob(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchBlobStream>, Status> {
        let digest = blob_key_from_wire(&request.get_ref().digest, "digest")?;
        // Only this node's own copy: peers never chain fetches.
        match self.node.open_own_blob(&digest).await.map_err(to_status)? {
            Some(file) => Ok(Response::new(stream_file(file))),
            None => Err(Status::not_found(format!("no blob {digest} here"))),
        }
    }

    async fn node_status(
        &self,
        _request: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        Ok(Response::new(self.node.status()))
    }
}
