//! The coordinator's gRPC services, one module per audience: clients
//! (`client`, and Remote Execution API clients: `reapi`), workers
//! (`worker`), operators (`admin`) and the other replicas (`raft`). Everything from the network is validated here,
//! before a command exists; `status` is the one place a domain error
//! becomes a gRPC status. Nothing below this layer knows of tonic's
//! services.

pub mod admin;
pub mod client;
pub mod drain;
pub mod health;
pub mod http;
pub mod picks;
pub mod raft;
pub mod rate;
pub mod reapi;
pub mod status;
pub mod status_page;
pub mod watch;
pub mod worker;

use std::pin::Pin;

use distbuild_proto::wire::digest_from_wire;
use distbuild_proto::{BlobKey, Digest};
use futures::Stream;
use tonic::Status;

use self::status::{blob_status, invalid};

/// The peer addresses a worker is told hold `artifact` (an assignment's
/// dependency, a copy for a draining worker): at most
/// `MAX_HOLDERS_LISTED`.
pub(crate) fn listed_holders(model: &distbuild_model::Model, artifact: &Digest) -> Vec<String> {
    model
        .holders(artifact)
        .into_iter()
        .take(distbuild_proto::wire::MAX_HOLDERS_LISTED)
        .collect()
}

/// The blob bytes collection may not take (what builds in flight need,
/// what was used recently), for upload admission: a scan of every build in
/// flight, so computed at most once a second, not per upload.
#[derive(Default)]
pub struct KeptBlobBytes(std::sync::Mutex<Option<(tokio::time::Instant, u64)>>);

impl KeptBlobBytes {
    fn get(&self, node: &crate::replica::Node) -> u64 {
        let mut cached = self.0.lock().expect("kept bytes lock poisoned");
        match *cached {
            Some((at, bytes)) if at.elapsed() < std::time::Duration::from_secs(1) => bytes,
            _ => {
                let bytes = node.model().blob_bytes_kept(&node.tuning().gc);
                *cached = Some((tokio::time::Instant::now(), bytes));
                bytes
            }
        }
    }

    /// Whether a blob of `size` bytes fits beside what builds in flight
    /// need (or were just uploaded for); the rest can be collected.
    pub fn admit(&self, node: &crate::replica::Node, size: u64) -> Result<(), Status> {
        let max = node.tuning().gc.max_blob_bytes;
        let kept = self.get(node);
        if kept.saturating_add(size) > max {
            return Err(Status::resource_exhausted(format!(
                "a blob of {size} bytes does not fit: builds in flight and recent uploads hold {kept} of the {max} bytes of blobs this cluster keeps (--max-blob-bytes)"
            )));
        }
        Ok(())
    }
}

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

/// Stores an uploaded blob: received whole within the bound on bytes
/// being received (`kept`), verified and durable, copied to a quorum,
/// then recorded through Raft (`BlobStored`). The client's and the
/// worker's `UploadBlob` alike.
pub async fn store_upload(
    node: &crate::replica::Node,
    kept: &KeptBlobBytes,
    chunks: tonic::Streaming<distbuild_proto::v1::BlobChunk>,
) -> Result<(), Status> {
    let admit = |size: u64| kept.admit(node, size);
    let (digest, size) = receive_blob(node.blobs(), chunks, admit).await?;
    node.replicate_blob(digest, size).await?;
    node.propose(distbuild_model::Command::BlobStored { digest, size })
        .await?;
    Ok(())
}

/// Receives one blob (the first chunk names digest and size) into
/// `blobs`, verified and durable, if `admit` lets a blob of its size in;
/// returns its digest and size.
pub async fn receive_blob(
    blobs: &crate::blobs::BlobStore,
    mut chunks: tonic::Streaming<distbuild_proto::v1::BlobChunk>,
    admit: impl FnOnce(u64) -> Result<(), Status>,
) -> Result<(BlobKey, u64), Status> {
    let first = next_chunk(&mut chunks)
        .await?
        .ok_or_else(|| Status::invalid_argument("empty upload"))?;
    let digest = blob_key_from_wire(&first.digest, "upload digest")?;
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

/// A blob's key from the wire (a hash of 20 bytes is SHA-1, of 32
/// SHA-256); `what` names the field.
pub fn blob_key_from_wire(bytes: &[u8], what: &str) -> Result<BlobKey, Status> {
    BlobKey::from_hash_bytes(bytes).map_err(|e| Status::invalid_argument(format!("{what}: {e}")))
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
