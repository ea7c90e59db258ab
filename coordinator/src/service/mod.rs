//! The coordinator's gRPC services, one module per audience: clients,
//! workers, operators. Raft traffic between replicas has its own transport.

pub mod admin;
pub mod client;
pub mod worker;

use std::pin::Pin;

use distbuild_proto::Digest;
use distbuild_proto::wire::{MAX_BLOB_CHUNK_BYTES, digest_from_wire};
use futures::Stream;
use tokio::io::AsyncReadExt;
use tonic::Status;

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
        .map(|d| digest_from_wire(d, what).map_err(Status::invalid_argument))
        .collect()
}

/// Streams `file` as blob chunks.
pub fn stream_file(mut file: tokio::fs::File) -> ResponseStream<distbuild_proto::v1::BlobChunk> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let mut buf = vec![0u8; MAX_BLOB_CHUNK_BYTES];
            let n = match file.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::internal(format!("read blob: {e}"))))
                        .await;
                    return;
                }
            };
            buf.truncate(n);
            let chunk = distbuild_proto::v1::BlobChunk {
                data: buf.into(),
                ..Default::default()
            };
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
