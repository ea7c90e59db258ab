//! Uploading the source blobs the cluster lacks: asked in batches, streamed
//! from disk chunk by chunk, several at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distbuild_proto::Digest;
use distbuild_proto::blob::file_chunks;
use distbuild_proto::v1::FindMissingBlobsRequest;
use distbuild_proto::wire::{digest_from_wire, digest_to_wire};
use futures::{StreamExt, TryStreamExt};

use crate::cluster::{CallError, Cluster, RPC_TIMEOUT};
use crate::connect::client_api;
use crate::sources::Source;

/// Blobs uploaded at the same time.
pub const MAX_CONCURRENT_UPLOADS: usize = 8;

/// Digests asked about in one FindMissingBlobs request (~22 bytes each on
/// the wire, far below the message limit).
pub const MAX_DIGESTS_PER_REQUEST: usize = 50_000;

/// Time every upload may take regardless of its size.
pub const UPLOAD_BASE_TIMEOUT: Duration = Duration::from_secs(60);

/// Slowest upload rate tolerated before an attempt is abandoned and retried.
pub const MIN_UPLOAD_BYTES_PER_SEC: u64 = 1 << 20;

/// Why uploading failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// Talking to the cluster failed.
    #[error(transparent)]
    Call(#[from] CallError),
    /// A source file could not be read (or changed) while it was uploaded.
    #[error("source file {path:?}: {problem}")]
    Read {
        /// The path the graph gives.
        path: String,
        /// What went wrong.
        problem: String,
    },
}

/// Uploads every source the cluster lacks (each distinct content once).
/// Returns how many blobs were uploaded.
pub async fn upload_missing(cluster: &Cluster, sources: &[Source]) -> Result<usize, UploadError> {
    let mut by_digest: BTreeMap<Digest, &Source> = BTreeMap::new();
    for source in sources {
        by_digest.entry(source.digest).or_insert(source);
    }
    let digests: Vec<Digest> = by_digest.keys().copied().collect();
    let missing = find_missing(cluster, &digests).await?;
    let to_upload: Vec<&Source> = by_digest
        .iter()
        .filter(|(digest, _)| missing.contains(digest))
        .map(|(_, source)| *source)
        .collect();
    let count = to_upload.len();
    futures::stream::iter(to_upload)
        .map(|source| upload_one(cluster, source))
        .buffer_unordered(MAX_CONCURRENT_UPLOADS)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(count)
}

/// Which of `digests` the cluster does not store, asked in batches of
/// [`MAX_DIGESTS_PER_REQUEST`].
pub async fn find_missing(
    cluster: &Cluster,
    digests: &[Digest],
) -> Result<BTreeSet<Digest>, CallError> {
    let mut missing = BTreeSet::new();
    for batch in digests.chunks(MAX_DIGESTS_PER_REQUEST) {
        let request = FindMissingBlobsRequest {
            digests: batch.iter().map(digest_to_wire).collect(),
        };
        let response = cluster
            .call("find missing source blobs", Some(RPC_TIMEOUT), |channel| {
                let request = request.clone();
                async move {
                    Ok(client_api(channel)
                        .find_missing_blobs(request)
                        .await?
                        .into_inner())
                }
            })
            .await?;
        for raw in response.missing {
            // A malformed digest names nothing that was asked about.
            if let Ok(digest) = digest_from_wire(&raw, "missing digest") {
                missing.insert(digest);
            }
        }
    }
    Ok(missing)
}

/// Uploads one blob, retrying (from the start of the file) as the cluster
/// calls allow.
async fn upload_one(cluster: &Cluster, source: &Source) -> Result<(), UploadError> {
    let read_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let limit = UPLOAD_BASE_TIMEOUT + Duration::from_secs(source.size / MIN_UPLOAD_BYTES_PER_SEC);
    let what = format!("upload source file {:?}", source.path);
    let result = cluster
        .call(&what, Some(limit), |channel| {
            let chunks = file_chunks(
                source.local_path.clone(),
                source.digest,
                source.size,
                read_error.clone(),
            );
            async move {
                client_api(channel).upload_blob(chunks).await?;
                Ok(())
            }
        })
        .await;
    // A read failure ends the stream early and the coordinator refuses the
    // short blob; the local cause is the one worth reporting.
    let local = read_error
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    match (result, local) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(problem)) => Err(UploadError::Read {
            path: source.path.clone(),
            problem,
        }),
        (Err(e), None) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distbuild_proto::v1::BlobChunk;
    use distbuild_proto::wire::MAX_BLOB_CHUNK_BYTES;

    async fn chunks_of(data: &[u8], size: u64) -> (Vec<BlobChunk>, Option<String>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("blob");
        std::fs::write(&path, data).expect("write");
        let error = Arc::new(Mutex::new(None));
        let chunks: Vec<BlobChunk> = file_chunks(path, Digest::of(data), size, error.clone())
            .collect()
            .await;
        let error = error.lock().expect("lock").take();
        (chunks, error)
    }

    #[tokio::test]
    async fn chunks_are_bounded_and_only_the_first_names_the_blob() {
        let data: Vec<u8> = (0..MAX_BLOB_CHUNK_BYTES * 2 + 5)
            .map(|i| (i % 7) as u8)
            .collect();
        let (chunks, error) = chunks_of(&data, data.len() as u64).await;
        assert_eq!(error, None);
        let sizes: Vec<usize> = chunks.iter().map(|c| c.data.len()).collect();
        assert_eq!(sizes, vec![MAX_BLOB_CHUNK_BYTES, MAX_BLOB_CHUNK_BYTES, 5]);
        assert_eq!(&chunks[0].digest[..], Digest::of(&data).as_bytes());
        assert_eq!(chunks[0].size, data.len() as u64);
        assert!(
            chunks[1..]
                .iter()
                .all(|c| c.digest.is_empty() && c.size == 0)
        );
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.to_vec()).collect();
        assert_eq!(joined, data);
    }

    #[tokio::test]
    async fn an_empty_blob_is_one_empty_chunk() {
        let (chunks, error) = chunks_of(b"", 0).await;
        assert_eq!(error, None);
        assert_eq!(chunks.len(), 1);
        assert!(chunks[0].data.is_empty());
        assert_eq!(&chunks[0].digest[..], Digest::of(b"").as_bytes());
    }

    #[tokio::test]
    async fn a_file_that_shrank_ends_the_stream_with_an_error() {
        let (chunks, error) = chunks_of(b"abc", 10).await;
        assert!(chunks.is_empty());
        assert!(error.expect("error noted").contains("changed while"));
        // A file that grew is cut at the hashed size: the digest check on
        // the other side refuses it.
        let (chunks, error) = chunks_of(b"abcdef", 3).await;
        assert_eq!(error, None);
        assert_eq!(&chunks[0].data[..], b"abc");
    }
}
