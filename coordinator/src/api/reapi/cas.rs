//! `ContentAddressableStorage`: which blobs are missing, small blobs in
//! batches, and the directories of a tree. Served by the leader, whose
//! state records every blob a quorum stored.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::rpc::Status as RpcStatus;
use distbuild_proto::BlobKey;
use futures::StreamExt as _;
use prost::Message as _;
use re::content_addressable_storage_server::ContentAddressableStorage;
use tonic::{Code, Request, Response, Status};

use super::{
    MAX_BATCH_TOTAL_BYTES, MAX_DIGESTS_PER_CALL, holds, is_empty_blob, key_of, note_used,
    stale_blobs, store_whole,
};
use crate::api::rate::{CallerRates, client_name};
use crate::api::{KeptBlobBytes, ResponseStream};
use crate::replica::Node;

/// Blobs of one batch stored at once.
const MAX_CONCURRENT_STORES: usize = 16;
/// Most directories one `GetTree` streams.
pub const MAX_TREE_DIRECTORIES: usize = 100_000;
/// Most bytes of directories one `GetTree` reads into memory (each is read
/// whole, so a blob named as a directory is bounded by it too).
pub const MAX_TREE_BYTES: u64 = 64 << 20;
/// Directories per `GetTree` page when the client names no page size.
const DEFAULT_TREE_PAGE: usize = 1_000;

/// The CAS service.
pub struct CasService {
    pub node: Arc<Node>,
    pub kept_blob_bytes: Arc<KeptBlobBytes>,
    pub rates: CallerRates,
}

fn rpc_status(code: Code, message: impl Into<String>) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: code as i32,
        message: message.into(),
        details: Vec::new(),
    })
}

fn check_count(count: usize, what: &str) -> Result<(), Status> {
    if count > MAX_DIGESTS_PER_CALL {
        return Err(Status::invalid_argument(format!(
            "{what}: {count} digests is over the limit of {MAX_DIGESTS_PER_CALL}"
        )));
    }
    Ok(())
}

/// Refuses a batch whose blobs add up to more than the advertised bound.
fn check_batch_total(total: u64) -> Result<(), Status> {
    if total > MAX_BATCH_TOTAL_BYTES {
        return Err(Status::invalid_argument(format!(
            "the batch holds {total} bytes of blobs, over max_batch_total_size_bytes ({MAX_BATCH_TOTAL_BYTES}); send large blobs with ByteStream.Write"
        )));
    }
    Ok(())
}

/// The whole content of recorded blob `key` (a batch-sized one), or None
/// when it is not recorded.
pub async fn read_whole(node: &Node, key: BlobKey, size: u64) -> Result<Option<Vec<u8>>, Status> {
    if is_empty_blob(&key, size) {
        return Ok(Some(Vec::new()));
    }
    if node.model().blob_size(&key) != Some(size) {
        return Ok(None);
    }
    if !node.ensure_local_blob(key).await? {
        return Ok(None);
    }
    let Some(mut reader) = node.open_own_blob(&key).await? else {
        return Ok(None);
    };
    let mut data = Vec::with_capacity(size as usize);
    loop {
        let chunk = reader
            .next_chunk()
            .await
            .map_err(|e| Status::internal(format!("read blob {key}: {e}")))?;
        if chunk.is_empty() {
            break;
        }
        data.extend_from_slice(&chunk);
        if data.len() as u64 > size {
            return Err(Status::data_loss(format!(
                "blob {key} holds more than its {size} bytes"
            )));
        }
    }
    Ok(Some(data))
}

/// The directories of a tree the CAS holds, and those it lacks.
pub struct WalkedTree {
    /// Breadth first from the root, each once however often it is named.
    pub directories: Vec<re::Directory>,
    /// Directories named but not stored (their subtrees unread).
    pub missing: Vec<(BlobKey, u64)>,
}

/// Reads the tree of Directory messages under `root`: at most
/// [`MAX_TREE_DIRECTORIES`] directories and [`MAX_TREE_BYTES`] of them
/// (INVALID_ARGUMENT past either, or for a blob that is not a Directory).
pub async fn walk_tree(
    node: &Node,
    root: (BlobKey, u64),
    function: i32,
) -> Result<WalkedTree, Status> {
    let mut tree = WalkedTree {
        directories: Vec::new(),
        missing: Vec::new(),
    };
    let mut seen = BTreeSet::from([root.0]);
    let mut queue = VecDeque::from([root]);
    let mut bytes_read: u64 = 0;
    while let Some((key, size)) = queue.pop_front() {
        if tree.directories.len() >= MAX_TREE_DIRECTORIES {
            return Err(Status::invalid_argument(format!(
                "the tree has more than {MAX_TREE_DIRECTORIES} directories"
            )));
        }
        bytes_read = bytes_read.saturating_add(size);
        if bytes_read > MAX_TREE_BYTES {
            return Err(Status::invalid_argument(format!(
                "the tree's directories hold more than {MAX_TREE_BYTES} bytes"
            )));
        }
        let Some(bytes) = read_whole(node, key, size).await? else {
            tree.missing.push((key, size));
            continue;
        };
        let directory = re::Directory::decode(bytes.as_slice())
            .map_err(|e| Status::invalid_argument(format!("blob {key} is not a Directory: {e}")))?;
        for (i, child) in directory.directories.iter().enumerate() {
            let child = key_of(
                child.digest.as_ref(),
                function,
                &format!("directory {key}: directories[{i}].digest"),
            )?;
            if seen.insert(child.0) {
                queue.push_back(child);
            }
        }
        tree.directories.push(directory);
    }
    Ok(tree)
}

/// Stores one blob of a batch: its answer, or the call's failure when
/// this node stopped leading.
async fn store_one(
    node: &Node,
    kept: &KeptBlobBytes,
    key: BlobKey,
    blob: re::batch_update_blobs_request::Request,
) -> Result<re::batch_update_blobs_response::Response, Status> {
    let declared = blob.digest.as_ref().map_or(0, |d| d.size_bytes);
    let status = if declared != blob.data.len() as i64 {
        rpc_status(
            Code::InvalidArgument,
            format!(
                "blob {key}: declared {declared} bytes, received {}",
                blob.data.len()
            ),
        )
    } else if is_empty_blob(&key, 0) {
        rpc_status(Code::Ok, "")
    } else {
        match kept.admit(node, blob.data.len() as u64) {
            Err(status) => rpc_status(status.code(), status.message()),
            Ok(()) => match store_whole(node, key, &blob.data).await {
                Ok(()) => rpc_status(Code::Ok, ""),
                // Losing leadership fails the call: the client retries it
                // whole on the new leader.
                Err(status) if status.code() == Code::Unavailable => return Err(status),
                Err(status) => rpc_status(status.code(), status.message()),
            },
        }
    };
    Ok(re::batch_update_blobs_response::Response {
        digest: blob.digest,
        status,
    })
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<re::FindMissingBlobsRequest>,
    ) -> Result<Response<re::FindMissingBlobsResponse>, Status> {
        let request = request.into_inner();
        check_count(request.blob_digests.len(), "blob_digests")?;
        let mut wanted = Vec::with_capacity(request.blob_digests.len());
        for (i, digest) in request.blob_digests.iter().enumerate() {
            let (key, size) = key_of(
                Some(digest),
                request.digest_function,
                &format!("blob_digests[{i}]"),
            )?;
            wanted.push((key, size, digest));
        }
        self.node.ready_leader().await?;
        let missing = {
            let model = self.node.model();
            wanted
                .iter()
                .filter(|(key, size, _)| !holds(&model, key, *size))
                .map(|(_, _, digest)| (*digest).clone())
                .collect()
        };
        // A client that finds a blob will use it (and not upload it
        // again): that counts as a use for collection.
        let found = stale_blobs(&self.node, wanted.iter().map(|(key, _, _)| *key));
        note_used(&self.node, found, Vec::new()).await?;
        Ok(Response::new(re::FindMissingBlobsResponse {
            missing_blob_digests: missing,
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<re::BatchUpdateBlobsRequest>,
    ) -> Result<Response<re::BatchUpdateBlobsResponse>, Status> {
        let caller = client_name(&request);
        let request = request.into_inner();
        check_count(request.requests.len(), "requests")?;
        check_batch_total(request.requests.iter().map(|r| r.data.len() as u64).sum())?;
        // Every digest is checked before anything is stored.
        let mut keys = Vec::with_capacity(request.requests.len());
        for (i, blob) in request.requests.iter().enumerate() {
            if blob.compressor != 0 {
                return Err(Status::invalid_argument(format!(
                    "requests[{i}]: compressor {} is not offered",
                    blob.compressor
                )));
            }
            let (key, _) = key_of(
                blob.digest.as_ref(),
                request.digest_function,
                &format!("requests[{i}].digest"),
            )?;
            keys.push(key);
        }
        let blobs: Vec<_> = keys.into_iter().zip(request.requests).collect();
        self.node.ready_leader().await?;
        self.rates.admit(&caller)?;
        // Stored concurrently: their copies and records travel together
        // (the leader appends concurrent proposals in one write).
        let (node, kept) = (&*self.node, &*self.kept_blob_bytes);
        let responses: Vec<_> = futures::stream::iter(blobs)
            .map(|(key, blob)| store_one(node, kept, key, blob))
            .buffered(MAX_CONCURRENT_STORES)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, Status>>()?;
        Ok(Response::new(re::BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<re::BatchReadBlobsRequest>,
    ) -> Result<Response<re::BatchReadBlobsResponse>, Status> {
        let request = request.into_inner();
        check_count(request.digests.len(), "digests")?;
        let mut wanted = Vec::with_capacity(request.digests.len());
        for (i, digest) in request.digests.iter().enumerate() {
            wanted.push(key_of(
                Some(digest),
                request.digest_function,
                &format!("digests[{i}]"),
            )?);
        }
        check_batch_total(wanted.iter().map(|(_, size)| size).sum())?;
        self.node.ready_leader().await?;
        let mut responses = Vec::with_capacity(wanted.len());
        for ((key, size), digest) in wanted.into_iter().zip(request.digests) {
            let (data, status) = match read_whole(&self.node, key, size).await? {
                Some(data) => (data, rpc_status(Code::Ok, "")),
                None => (
                    Vec::new(),
                    rpc_status(Code::NotFound, format!("blob {key}/{size} is not stored")),
                ),
            };
            responses.push(re::batch_read_blobs_response::Response {
                digest: Some(digest),
                data,
                compressor: 0,
                status,
            });
        }
        Ok(Response::new(re::BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = ResponseStream<re::GetTreeResponse>;

    async fn get_tree(
        &self,
        request: Request<re::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let request = request.into_inner();
        let function = request.digest_function;
        let root = key_of(request.root_digest.as_ref(), function, "root_digest")?;
        let page_size = match usize::try_from(request.page_size) {
            Ok(0) => DEFAULT_TREE_PAGE,
            Ok(n) => n.min(DEFAULT_TREE_PAGE * 10),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "page_size {} is negative",
                    request.page_size
                )));
            }
        };
        let skip = if request.page_token.is_empty() {
            0
        } else {
            request.page_token.parse::<usize>().map_err(|_| {
                Status::invalid_argument(format!(
                    "page_token {:?} is not one this server gave",
                    request.page_token.chars().take(64).collect::<String>()
                ))
            })?
        };
        self.node.ready_leader().await?;
        let tree = walk_tree(&self.node, root, function).await?;
        if let Some((key, size)) = tree.missing.first() {
            return Err(Status::not_found(format!(
                "directory blobs/{key}/{size} is not stored"
            )));
        }
        let directories = tree.directories;
        let pages: Vec<Result<re::GetTreeResponse, Status>> = directories
            .into_iter()
            .skip(skip)
            .collect::<Vec<_>>()
            .chunks(page_size)
            .map(|page| {
                Ok(re::GetTreeResponse {
                    directories: page.to_vec(),
                    next_page_token: String::new(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(pages))))
    }

    async fn split_blob(
        &self,
        _request: Request<re::SplitBlobRequest>,
    ) -> Result<Response<re::SplitBlobResponse>, Status> {
        Err(Status::unimplemented("blob splitting is not offered"))
    }

    type GetChunkMappingStream = ResponseStream<re::GetChunkMappingResponse>;

    async fn get_chunk_mapping(
        &self,
        _request: Request<re::GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented("blob chunking is not offered"))
    }

    async fn splice_blob(
        &self,
        _request: Request<re::SpliceBlobRequest>,
    ) -> Result<Response<re::SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("blob splicing is not offered"))
    }

    async fn register_chunk_mapping(
        &self,
        _request: Request<tonic::Streaming<re::RegisterChunkMappingRequest>>,
    ) -> Result<Response<re::RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented("blob chunking is not offered"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_past_the_bound_is_refused_naming_it() {
        assert!(check_batch_total(MAX_BATCH_TOTAL_BYTES).is_ok());
        let over = check_batch_total(MAX_BATCH_TOTAL_BYTES + 1).expect_err("over");
        assert_eq!(over.code(), Code::InvalidArgument);
        assert!(over.message().contains("max_batch_total_size_bytes"));
    }
}
