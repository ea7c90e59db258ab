//! Getting blobs into the cache: source blobs from the coordinators
//! (`FetchBlob`), dependency artifacts from the peers holding them
//! (`PeerApi.FetchArtifact`). Content is written to a scratch file, then
//! verified against its digest as the cache stores it.

use std::path::Path;
use std::time::Duration;

use distbuild_proto::Digest;
use distbuild_proto::v1::{BlobChunk, FetchRequest};
use distbuild_proto::wire::digest_to_wire;
use tokio::io::AsyncWriteExt;
use tonic::Streaming;

use crate::cache::{Cache, CacheError};
use crate::connect::{SharedConnector, error_chain, peer_api_client};
use crate::coordinator::{CoordinatorClient, RpcError};

/// How long a transfer may wait for its first answer.
pub const FETCH_START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a transfer may wait for its next chunk before it is abandoned.
pub const FETCH_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a blob could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The coordinators refused or could not be reached.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The transfer failed (no holder, a broken or short stream, ...).
    #[error("{0}")]
    Transfer(String),
    /// The content could not be stored (or did not match its digest).
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// Fetches source blob `digest` (`size` bytes) from the coordinators into
/// the cache; `scratch` is a directory for the partial download.
pub async fn fetch_source_blob(
    coordinator: &CoordinatorClient,
    cache: &Cache,
    digest: Digest,
    size: u64,
    scratch: &Path,
) -> Result<(), FetchError> {
    let request = FetchRequest {
        digest: digest_to_wire(&digest),
    };
    let stream = coordinator
        .fetch_blob(request, FETCH_START_DEADLINE)
        .await?;
    receive_into_cache(stream, cache, digest, size, scratch).await
}

/// Fetches artifact `digest` (`size` bytes) from the first of `holders`
/// (peer addresses, tried in order) that delivers it intact.
pub async fn fetch_artifact(
    connector: &SharedConnector,
    holders: &[String],
    cache: &Cache,
    digest: Digest,
    size: u64,
    scratch: &Path,
) -> Result<(), FetchError> {
    if holders.is_empty() {
        return Err(FetchError::Transfer(format!(
            "artifact {digest}: no worker holds it"
        )));
    }
    let mut problems = Vec::new();
    for holder in holders {
        match fetch_artifact_from(connector, holder, cache, digest, size, scratch).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::info!(%holder, %digest, error = %e, "artifact fetch failed; trying the next holder");
                problems.push(format!("{holder}: {e}"));
            }
        }
    }
    Err(FetchError::Transfer(format!(
        "artifact {digest}: every holder failed ({})",
        problems.join("; ")
    )))
}

async fn fetch_artifact_from(
    connector: &SharedConnector,
    holder: &str,
    cache: &Cache,
    digest: Digest,
    size: u64,
    scratch: &Path,
) -> Result<(), FetchError> {
    let channel = connector
        .connect(holder)
        .await
        .map_err(|e| FetchError::Transfer(e.to_string()))?;
    let mut client = peer_api_client(channel);
    let request = FetchRequest {
        digest: digest_to_wire(&digest),
    };
    let stream =
        match tokio::time::timeout(FETCH_START_DEADLINE, client.fetch_artifact(request)).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                return Err(FetchError::Transfer(format!(
                    "{}: {}",
                    status.code(),
                    status.message()
                )));
            }
            Err(_) => return Err(FetchError::Transfer("no answer".to_string())),
        };
    receive_into_cache(stream, cache, digest, size, scratch).await
}

/// Writes the chunks of `stream` (at most `size` bytes in all, each chunk
/// within [`FETCH_IDLE_TIMEOUT`]) to a scratch file, then stores it in the
/// cache, verified against `digest`.
pub async fn receive_into_cache(
    mut stream: Streaming<BlobChunk>,
    cache: &Cache,
    digest: Digest,
    size: u64,
    scratch: &Path,
) -> Result<(), FetchError> {
    let transfer = |problem: String| FetchError::Transfer(format!("blob {digest}: {problem}"));
    let temp = tempfile::NamedTempFile::new_in(scratch).map_err(|e| {
        transfer(format!(
            "create a download file in {}: {e}",
            scratch.display()
        ))
    })?;
    let (std_file, temp_path) = temp.into_parts();
    let mut file = tokio::fs::File::from_std(std_file);
    let mut received = 0u64;
    loop {
        let chunk = match tokio::time::timeout(FETCH_IDLE_TIMEOUT, stream.message()).await {
            Err(_) => {
                return Err(transfer(format!(
                    "no data for {} s",
                    FETCH_IDLE_TIMEOUT.as_secs()
                )));
            }
            Ok(Err(status)) => {
                return Err(transfer(format!("{}: {}", status.code(), status.message())));
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => chunk,
        };
        received += chunk.data.len() as u64;
        if received > size {
            return Err(transfer(format!("more than the expected {size} bytes")));
        }
        file.write_all(&chunk.data).await.map_err(|e| {
            transfer(format!(
                "write {}: {}",
                temp_path.display(),
                error_chain(&e)
            ))
        })?;
    }
    if received != size {
        return Err(transfer(format!("ended after {received} of {size} bytes")));
    }
    file.flush()
        .await
        .map_err(|e| transfer(format!("write {}: {e}", temp_path.display())))?;
    drop(file);
    let cache = cache.clone();
    tokio::task::spawn_blocking(move || -> Result<(), FetchError> {
        let reader = std::fs::File::open(&temp_path)
            .map_err(|e| FetchError::Transfer(format!("reopen {}: {e}", temp_path.display())))?;
        cache.insert(Some(digest), reader)?;
        // The temporary path is removed when `temp_path` drops.
        Ok(())
    })
    .await
    .map_err(|e| FetchError::Transfer(format!("store blob {digest}: {e}")))?
}
