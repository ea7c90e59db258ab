//! `google.bytestream.ByteStream` over the CAS: reads of any size,
//! resumable from an offset, and streamed writes of blobs too big for a
//! batch, with the spec's resource names (see [`super::parse_resource`]).
//! A write is verified as it arrives and stored like any upload; a write
//! cut off is not kept, so `QueryWriteStatus` tells a client to start
//! again unless the blob is stored.

use std::sync::Arc;

use bazel_remote_apis::google::bytestream::byte_stream_server::ByteStream;
use bazel_remote_apis::google::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};
use distbuild_model::Command;
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{Resource, holds, is_empty_blob, note_used, parse_resource};
use crate::api::rate::{CallerRates, client_name};
use crate::api::status::blob_status;
use crate::api::{KeptBlobBytes, ResponseStream};
use crate::replica::Node;

/// How long a write may sit without a message.
const WRITE_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The ByteStream service.
pub struct ByteStreamService {
    pub node: Arc<Node>,
    pub kept_blob_bytes: Arc<KeptBlobBytes>,
    pub rates: CallerRates,
}

impl ByteStreamService {
    /// Whether the blob is recorded (stored on a quorum) at its size.
    fn stored(&self, resource: &Resource) -> bool {
        holds(&self.node.model(), &resource.key, resource.size)
    }
}

async fn next_message(
    messages: &mut Streaming<WriteRequest>,
) -> Result<Option<WriteRequest>, Status> {
    match tokio::time::timeout(WRITE_IDLE_TIMEOUT, messages.next()).await {
        Err(_) => Err(Status::deadline_exceeded(format!(
            "write stalled: no data for {WRITE_IDLE_TIMEOUT:?}"
        ))),
        Ok(None) => Ok(None),
        Ok(Some(message)) => message.map(Some),
    }
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ResponseStream<ReadResponse>;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let request = request.into_inner();
        let resource = parse_resource(&request.resource_name, false)?;
        let offset = u64::try_from(request.read_offset).map_err(|_| {
            Status::invalid_argument(format!("read_offset {} is negative", request.read_offset))
        })?;
        let limit = u64::try_from(request.read_limit).map_err(|_| {
            Status::invalid_argument(format!("read_limit {} is negative", request.read_limit))
        })?;
        if offset > resource.size {
            return Err(Status::out_of_range(format!(
                "read_offset {offset} is past the blob's {} bytes",
                resource.size
            )));
        }
        self.node.ready_leader().await?;
        let key = resource.key;
        let not_found = || Status::not_found(format!("blob {key}/{} is not stored", resource.size));
        if is_empty_blob(&key, resource.size) {
            return Ok(Response::new(Box::pin(futures::stream::empty())));
        }
        if !self.stored(&resource) || !self.node.ensure_local_blob(key).await? {
            return Err(not_found());
        }
        let reader = self
            .node
            .open_own_blob_at(&key, offset)
            .await?
            .ok_or_else(not_found)?;
        // Whatever is left, or the limit (0: no limit).
        let mut left = resource.size - offset;
        if limit > 0 {
            left = left.min(limit);
        }
        let chunks = futures::stream::unfold(Some((reader, left)), move |state| async move {
            let (mut reader, left) = state?;
            if left == 0 {
                return None;
            }
            match reader.next_chunk().await {
                Ok(data) if data.is_empty() => Some((
                    Err(Status::data_loss(format!(
                        "blob {key} ended {left} bytes early"
                    ))),
                    None,
                )),
                Ok(mut data) => {
                    data.truncate(left.min(data.len() as u64) as usize);
                    let left = left - data.len() as u64;
                    Some((Ok(ReadResponse { data }), Some((reader, left))))
                }
                Err(e) => Some((Err(Status::internal(format!("read blob {key}: {e}"))), None)),
            }
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let caller = client_name(&request);
        let mut messages = request.into_inner();
        let first = next_message(&mut messages)
            .await?
            .ok_or_else(|| Status::invalid_argument("empty write: no resource_name"))?;
        let resource = parse_resource(&first.resource_name, true)?;
        let name = first.resource_name.clone();
        self.node.ready_leader().await?;
        self.rates.admit(&caller)?;
        let done = WriteResponse {
            committed_size: resource.size as i64,
        };
        // Stored already (by another client, or an earlier try): done at
        // once, as the spec allows, the upload counting as a use.
        if self.stored(&resource) {
            if !is_empty_blob(&resource.key, resource.size) {
                note_used(&self.node, vec![resource.key], Vec::new()).await?;
            }
            return Ok(Response::new(done));
        }
        self.kept_blob_bytes.admit(&self.node, resource.size)?;
        let mut writer = self
            .node
            .blobs()
            .writer(resource.key, resource.size)
            .await
            .map_err(blob_status)?;
        let mut written: u64 = 0;
        let mut message = Some(first);
        let mut finished = false;
        while let Some(piece) = message.take() {
            if finished {
                return Err(Status::invalid_argument(
                    "a message came after the one with finish_write",
                ));
            }
            // Later messages may repeat the name; they may not change it.
            if !piece.resource_name.is_empty() && piece.resource_name != name {
                return Err(Status::invalid_argument(
                    "resource_name changed within one write",
                ));
            }
            if piece.write_offset != written as i64 {
                return Err(Status::invalid_argument(format!(
                    "write_offset {} where {written} bytes were written (this server does not resume a write cut off; start again at 0)",
                    piece.write_offset
                )));
            }
            writer.write(&piece.data).await.map_err(blob_status)?;
            written += piece.data.len() as u64;
            finished = piece.finish_write;
            message = next_message(&mut messages).await?;
        }
        if !finished {
            return Err(Status::invalid_argument(
                "the write ended without finish_write",
            ));
        }
        writer.finish().await.map_err(blob_status)?;
        self.node
            .replicate_blob(resource.key, resource.size)
            .await?;
        self.node
            .propose(Command::BlobStored {
                digest: resource.key,
                size: resource.size,
            })
            .await?;
        Ok(Response::new(done))
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let resource = parse_resource(&request.get_ref().resource_name, true)?;
        self.node.ready_leader().await?;
        let complete = self.stored(&resource);
        Ok(Response::new(QueryWriteStatusResponse {
            committed_size: if complete { resource.size as i64 } else { 0 },
            complete,
        }))
    }
}
