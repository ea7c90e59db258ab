//! The coordinator's gRPC services, one module per audience: clients
//! (`client`), workers (`worker`), operators (`admin`) and the other
//! replicas (`raft`). Everything from the network is validated here,
//! before a command exists; `status` is the one place a domain error
//! becomes a gRPC status. Nothing below this layer knows of tonic's
//! services.

pub mod admin;
pub mod client;
pub mod raft;
pub mod rate;
pub mod status;
pub mod watch;
pub mod worker;

use std::pin::Pin;

use distbuild_proto::Digest;
use distbuild_proto::wire::digest_from_wire;
use futures::Stream;
use tonic::Status;

use self::status::{blob_status, invalid};

/// How long an upload may sit without a chunk.
const UPLOAD_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

async fn next_chunk(
    chunks: &mut tonic::Streaming<distbuild_proto::v1::BlobChunk>,
) -> Result<Option<distbuild_proto::v1::BlobChunk>, Status> {
    use futures::StreamExt;
    match tokio::time::timeout(UPLOAD_IDLE_TIMEOUT, chunks.next()).await {
        Err(_) => Err(Status::deadline_exceeded("upload stalled")),
        Ok(None) => Ok(None),
        Ok(Some(chunk)) => chunk.map(Some),
    }
}

/// Receives one blob (the first chunk names digest and size) into
/// `blobs`, verified and durable, if `admit` lets a blob of its size in;
/// returns its digest and size.
pub async fn receive_blob(
    blobs: &crate::blobs::BlobStore,
    mut chunks: tonic::Streaming<distbuild_proto::v1::BlobChunk>,
    admit: impl FnOnce(u64) -> Result<(), Status>,
) -> Result<(Digest, u64), Status> {
    let first = next_chunk(&mut chunks)
        .await?
        .ok_or_else(|| Status::invalid_argument("empty upload"))?;
    let digest = digest_from_wire(&first.digest, "upload digest").map_err(invalid)?;
    let size = first.size;
    admit(size)?;
    let mut writer = blobs.writer(digest, size).await.map_err(blob_status)?;
    writer.write(&first.data).await.map_err(blob_status)?;
    while let Some(chunk) = next_chunk(&mut chunks).await? {
        writer.write(&chunk.data).await.map_err(blob_status)?;
    }
    writer.finish().await.map_err(blob_status)?;
    Ok((digest, size))
}

/// A server-streaming response.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Most digests one request may name.
pub const MAX_DIGESTS_PER_REQUEST: usize = 200_000;

/// Digests from the wire, each checked; `what` names the field.
pub fn digests(list: &[bytes::Bytes], what: &str) -> Result<Vec<Digest>, Status> {
    if list.len() > MAX_DIGESTS_PER_REQUEST {
        return Err(Status::invalid_argument(format!(
            "{what}: {} digests is over the limit of {MAX_DIGESTS_PER_REQUEST}",
            list.len()
        )));
    }
    list.iter()
        .map(|d| digest_from_wire(d, what).map_err(invalid))
        .collect()
}

/// Streams a stored blob as the chunks of a fetch answer.
pub fn stream_file(
    file: crate::blobs::BlobReader,
) -> ResponseStream<distbuild_proto::v1::BlobChunk> {
    use futures::StreamExt;
    let chunks = distbuild_proto::blob::content_chunks(file)
        .map(|chunk| chunk.map_err(|e| Status::internal(format!("read blob: {e}"))));
    Box::pin(chunks)
}
