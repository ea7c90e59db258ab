//! Source blobs outlive any one coordinator: the leader acknowledges an
//! upload only once a quorum of voters stores the blob (itself and enough
//! followers, each verified and fsynced), and a node asked for a recorded
//! blob it lacks (it was down, or joined later) fetches it from a peer.

use std::collections::BTreeSet;
use std::time::Duration;

use distbuild_proto::BlobKey;
use distbuild_proto::blob::upload_chunks;
use distbuild_proto::v1::FetchRequest;
use futures::StreamExt;
use tokio::task::JoinSet;

use super::error::{ReplicaError, Result};
use super::node::Node;

/// Longest one copy to or from a peer may take, before its share of the
/// bytes: a copy to a dead peer gives up after this.
const COPY_BASE: Duration = Duration::from_secs(10);
/// Slowest transfer rate a copy is allowed (bytes per second).
const COPY_MIN_RATE: u64 = 4 * 1024 * 1024;

fn copy_deadline(size: u64) -> Duration {
    COPY_BASE + Duration::from_secs(size / COPY_MIN_RATE)
}

/// The other voters (ID, address), and the voter configurations: one, or
/// two during a membership change (joint consensus), each of which needs a
/// majority.
fn other_voters(node: &Node) -> (Vec<(u64, String)>, Vec<BTreeSet<u64>>) {
    let metrics = node.raft.metrics();
    let metrics = metrics.borrow();
    let membership = metrics.membership_config.membership();
    let configs = membership.get_joint_config().clone();
    let others = membership
        .voter_ids()
        .filter(|id| *id != node.node_id)
        .filter_map(|id| membership.get_node(&id).map(|n| (id, n.addr.clone())))
        .collect();
    (others, configs)
}

/// Whether the nodes in `stored` are a quorum: a majority of every voter
/// configuration.
fn is_quorum(configs: &[BTreeSet<u64>], stored: &BTreeSet<u64>) -> bool {
    configs
        .iter()
        .all(|config| config.intersection(stored).count() > config.len() / 2)
}

/// Every member but this one (voters and learners), to fetch from.
fn other_members(node: &Node) -> Vec<(u64, String)> {
    let metrics = node.raft.metrics();
    let metrics = metrics.borrow();
    metrics
        .membership_config
        .membership()
        .nodes()
        .filter(|(id, _)| **id != node.node_id)
        .map(|(id, n)| (*id, n.addr.clone()))
        .collect()
}

/// Copies a blob this node stores to the other voters and returns once a
/// quorum (counting this node) has it. Copies still running then carry on
/// in the background, bounded by their deadline.
pub(crate) async fn replicate_blob(node: &Node, digest: BlobKey, size: u64) -> Result<()> {
    let (others, configs) = other_voters(node);
    let mut stored = BTreeSet::from([node.node_id]);
    if is_quorum(&configs, &stored) {
        return Ok(());
    }
    let mut copies = JoinSet::new();
    for (id, addr) in others {
        let peers = node.peers.clone();
        let blobs = node.blobs.clone();
        copies.spawn(async move { (id, push(&peers, &addr, &blobs, digest, size).await) });
    }
    let mut problems = Vec::new();
    while let Some(joined) = copies.join_next().await {
        match joined {
            Ok((id, Ok(()))) => {
                stored.insert(id);
                if is_quorum(&configs, &stored) {
                    copies.detach_all();
                    return Ok(());
                }
            }
            Ok((id, Err(e))) => problems.push(format!("coordinator {id}: {e}")),
            Err(e) => problems.push(format!("copy task: {e}")),
        }
    }
    Err(ReplicaError::Unavailable(format!(
        "blob {digest} could not be stored on a quorum of coordinators ({}); retry",
        problems.join("; ")
    )))
}

/// Copies every recorded source blob to the node at `addr` (a learner
/// about to become a voter), so that a blob stays on a quorum whatever
/// nodes are later replaced. A blob this node lacks is fetched first.
pub(crate) async fn copy_all_to(node: &Node, addr: &str) -> Result<()> {
    let blobs = node.model().blobs();
    for (digest, size) in blobs {
        ensure_local(node, digest).await?;
        push(&node.peers, addr, &node.blobs, digest, size)
            .await
            .map_err(|e| {
                ReplicaError::Unavailable(format!("copying blob {digest} to the new node: {e}"))
            })?;
    }
    Ok(())
}

/// Streams the local copy of `digest` to the peer at `addr`, within the
/// copy's deadline; a failed copy forgets the channel.
async fn push(
    peers: &super::network::Peers,
    addr: &str,
    blobs: &crate::blobs::BlobStore,
    digest: BlobKey,
    size: u64,
) -> std::result::Result<(), String> {
    let deadline = copy_deadline(size);
    let result =
        match tokio::time::timeout(deadline, push_once(peers, addr, blobs, digest, size)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer in {deadline:?}")),
        };
    if result.is_err() {
        peers.forget(addr);
    }
    result
}

async fn push_once(
    peers: &super::network::Peers,
    addr: &str,
    blobs: &crate::blobs::BlobStore,
    digest: BlobKey,
    size: u64,
) -> std::result::Result<(), String> {
    let file = blobs
        .open_blob(&digest)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("blob {digest} is not stored here"))?;
    // A local read failure ends the stream early (the peer then refuses a
    // short blob); the local cause is what this copy reports.
    let read_failure = std::sync::Arc::new(std::sync::Mutex::new(None));
    let noted = read_failure.clone();
    let chunks = upload_chunks(file, digest, size, move |e| {
        *noted.lock().expect("read failure lock poisoned") = Some(e);
    });
    let mut client = peers.transport(addr).map_err(|e| e.to_string())?;
    let mut request = tonic::Request::new(chunks);
    request.set_timeout(copy_deadline(size));
    let sent = client.store_blob(request).await;
    if let Some(e) = read_failure
        .lock()
        .expect("read failure lock poisoned")
        .take()
    {
        return Err(format!("read blob: {e}"));
    }
    sent.map(drop)
        .map_err(|s| format!("{}: {}", s.code(), s.message()))
}

/// Makes sure this node stores `digest` (recorded in the state, so a
/// quorum stored it): fetches it from the other members when missing.
/// Returns whether it is stored here now.
pub(crate) async fn ensure_local(node: &Node, digest: BlobKey) -> Result<bool> {
    if node.blobs.contains(&digest) {
        return Ok(true);
    }
    let Some(size) = node.model().blob_size(&digest) else {
        return Ok(false);
    };
    let mut problems = Vec::new();
    for (id, addr) in other_members(node) {
        let fetch = fetch_from(node, &addr, digest, size);
        match tokio::time::timeout(copy_deadline(size), fetch).await {
            Ok(Ok(())) => return Ok(true),
            Ok(Err(e)) => problems.push(format!("coordinator {id}: {e}")),
            Err(_) => {
                node.peers.forget(&addr);
                problems.push(format!("coordinator {id}: no answer in time"));
            }
        }
    }
    Err(ReplicaError::Unavailable(format!(
        "blob {digest} is recorded but no coordinator could supply it ({})",
        problems.join("; ")
    )))
}

async fn fetch_from(
    node: &Node,
    addr: &str,
    digest: BlobKey,
    size: u64,
) -> std::result::Result<(), String> {
    let mut client = node.peers.transport(addr).map_err(|e| e.to_string())?;
    let mut request = tonic::Request::new(FetchRequest {
        digest: bytes::Bytes::copy_from_slice(digest.hash_bytes()),
    });
    request.set_timeout(copy_deadline(size));
    let mut chunks = client
        .fetch_blob(request)
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let mut writer = node
        .blobs
        .writer(digest, size)
        .await
        .map_err(|e| e.to_string())?;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|s| format!("{}: {}", s.code(), s.message()))?;
        writer.write(&chunk.data).await.map_err(|e| e.to_string())?;
    }
    writer.finish().await.map_err(|e| e.to_string())
}

impl Node {
    /// Stores the blob this node just received on a quorum of voters (see
    /// the module documentation); Ok once a quorum has it.
    pub async fn replicate_blob(&self, digest: BlobKey, size: u64) -> Result<()> {
        replicate_blob(self, digest, size).await
    }

    /// Makes sure this node stores recorded blob `digest`, fetching it
    /// from a peer when missing; whether it is stored here now.
    pub async fn ensure_local_blob(&self, digest: BlobKey) -> Result<bool> {
        ensure_local(self, digest).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    #[test]
    fn a_quorum_is_a_majority_of_every_configuration() {
        let one = [set(&[1, 2, 3])];
        assert!(!is_quorum(&one, &set(&[1])));
        assert!(is_quorum(&one, &set(&[1, 3])));
        // Joint {1,2,3} + {3,4,5}: 1, 2 and 3 are a majority of the union
        // of five, but not of the new configuration.
        let joint = [set(&[1, 2, 3]), set(&[3, 4, 5])];
        assert!(!is_quorum(&joint, &set(&[1, 2, 3])));
        assert!(!is_quorum(&joint, &set(&[1, 4, 5])));
        assert!(is_quorum(&joint, &set(&[1, 3, 4])));
    }
}
