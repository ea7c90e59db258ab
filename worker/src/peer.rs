//! The peer server: `PeerApi.FetchArtifact` streams a blob from the cache
//! to another worker or a client, pinned while it streams, with a bound on
//! concurrent transfers.

use std::sync::Arc;
use std::time::Duration;

use distbuild_proto::blob::content_chunks;
use distbuild_proto::v1::peer_api_server::PeerApi;
use distbuild_proto::v1::{BlobChunk, FetchRequest};
use distbuild_proto::wire::{MAX_BLOB_CHUNK_BYTES, digest_from_wire};
use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::cache::Cache;

/// Transfers served at once; more wait for a turn.
pub const MAX_CONCURRENT_TRANSFERS: usize = 16;
/// How long a request may wait for a turn before it is refused with
/// RESOURCE_EXHAUSTED (the caller tries another holder).
pub const TRANSFER_QUEUE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a transfer waits for a receiver that takes no data before it
/// gives up (and frees its turn).
pub const SEND_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Chunks read ahead of the network per transfer.
const CHUNKS_IN_FLIGHT: usize = 2;

/// Serves the cache's blobs to peers.
pub struct PeerService {
    cache: Cache,
    transfers: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl PeerService {
    /// A service over `cache`; reader tasks are spawned on `tracker` and stop
    /// when `shutdown` is cancelled.
    pub fn new(cache: Cache, tracker: TaskTracker, shutdown: CancellationToken) -> Self {
        Self {
            cache,
            transfers: Arc::new(Semaphore::new(MAX_CONCURRENT_TRANSFERS)),
            tracker,
            shutdown,
        }
    }
}

#[tonic::async_trait]
impl PeerApi for PeerService {
    type FetchArtifactStream = ReceiverStream<Result<BlobChunk, Status>>;

    async fn fetch_artifact(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let digest = digest_from_wire(&request.get_ref().digest, "digest")
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let permit = tokio::time::timeout(
            TRANSFER_QUEUE_TIMEOUT,
            self.transfers.clone().acquire_owned(),
        )
        .await
        .map_err(|_| Status::resource_exhausted("too many transfers in progress"))?
        .map_err(|_| Status::unavailable("shutting down"))?;
        let cache = self.cache.clone();
        let opened = distbuild_proto::blocking::run(move || cache.open_blob(digest)).await;
        let (file, pin) = match opened {
            Ok(Some(found)) => found,
            Ok(None) => return Err(Status::not_found(format!("blob {digest} is not here"))),
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cannot open a cached blob");
                return Err(Status::internal(format!("open blob {digest}: {e}")));
            }
        };
        let (sender, receiver) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let shutdown = self.shutdown.clone();
        let reader = distbuild_proto::blocking::ChunkReader::new(file, MAX_BLOB_CHUNK_BYTES);
        self.tracker.spawn(async move {
            // Held until the last chunk is sent: the blob stays, and the
            // transfer counts against the bound.
            let _pin = pin;
            let _permit = permit;
            let mut chunks = std::pin::pin!(content_chunks(reader));
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|e| {
                    tracing::warn!(%digest, error = %e, "reading a cached blob failed");
                    Status::internal(format!("read blob {digest}: {e}"))
                });
                tokio::select! {
                    sent = sender.send_timeout(chunk, SEND_STALL_TIMEOUT) => {
                        if sent.is_err() {
                            return; // the receiver went away or stalled
                        }
                    }
                    () = shutdown.cancelled() => {
                        // Best effort: an explicit error rather than a
                        // stream that merely stops short.
                        let _ = sender.try_send(Err(Status::unavailable("worker shutting down")));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}
