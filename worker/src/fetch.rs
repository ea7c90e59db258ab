//! Getting blobs into the cache: blobs from the coordinators (`FetchBlob`:
//! distbuild's sources by SHA-1, Remote Execution API CAS blobs by SHA-1 or
//! SHA-256), dependency artifacts from the peers holding them
//! (`PeerApi.FetchArtifact`). Content is written straight into a cache
//! temporary file, checked against its key as it arrives, and stored under
//! it; one fetch of a blob at a time ([`Cache::fetch_turn`]). A blob the
//! coordinators do not have is a [`FetchError::NotFound`], told apart from
//! every other failure.

use std::time::Duration;

use distbuild_proto::blob::{self, BlobCheck, OpenError, ReceiveError};
use distbuild_proto::v1::{BlobChunk, FetchRequest};
use distbuild_proto::{BlobKey, Digest};
use tokio::time::Instant;
use tonic::{Code, Streaming};

use crate::cache::{Cache, CacheError};
use crate::connect::{SharedConnector, error_chain};
use crate::coordinator::{Backoff, CoordinatorClient, Persistence, RpcError, UNARY_DEADLINE};
use crate::peer::TRANSFER_QUEUE_TIMEOUT;

/// How long a transfer may wait for its first answer. Longer than a peer
/// keeps a request waiting for a transfer slot, so a busy holder answers
/// "busy" (it has the artifact) rather than looking dead.
pub const FETCH_START_DEADLINE: Duration = Duration::from_secs(30);
const _: () = assert!(FETCH_START_DEADLINE.as_secs() > TRANSFER_QUEUE_TIMEOUT.as_secs());
/// How long a transfer may wait for its next chunk before it is abandoned.
pub const FETCH_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long fetching a coordinator blob keeps retrying while the coordinators
/// cannot serve it (a failover, a stream broken by one).
pub const SOURCE_FETCH_RETRY_WINDOW: Duration = Duration::from_secs(30);
/// Rounds over an artifact's holders while some holder answers that it is
/// too busy (it has the artifact, so the artifact is not lost).
pub const MAX_ARTIFACT_FETCH_ROUNDS: u32 = 3;

/// Why a blob could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The coordinators refused or could not be reached.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The other side did not deliver it (refused, no answer, a broken or
    /// short stream, ...).
    #[error("{0}")]
    Transfer(String),
    /// A holder has the artifact but is too busy to serve it now.
    #[error("{0}")]
    Busy(String),
    /// The coordinators do not have the blob (`FetchBlob` answered
    /// NOT_FOUND). Shown as their answer; a Remote Execution API action
    /// reports it in the form the coordinators parse (`crate::action`).
    #[error("{message}")]
    NotFound {
        /// The blob.
        key: BlobKey,
        /// Its size as the caller named it.
        size: u64,
        /// The answer, as any other failure of the call shows it.
        message: String,
    },
    /// Something on this worker failed (a download file, the disk).
    #[error("{0}")]
    Local(String),
    /// The content could not be stored (or did not match its digest).
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// None of the holders the assignment named could deliver the
    /// artifact: the coordinators must rebuild it.
    #[error("artifact {digest} is lost: no holder could serve it ({problems})")]
    Lost {
        /// The artifact.
        digest: Digest,
        /// Why each holder failed, one line.
        problems: String,
    },
}

impl From<distbuild_proto::blocking::Panicked> for FetchError {
    fn from(panicked: distbuild_proto::blocking::Panicked) -> Self {
        FetchError::Local(panicked.to_string())
    }
}

impl FetchError {
    /// Whether the failure is this worker's own (its disk), not the other
    /// side's: trying another source would not help.
    pub fn is_local(&self) -> bool {
        matches!(self, Self::Local(_) | Self::Cache(CacheError::Io { .. }))
    }

    /// The artifact no holder could serve, for a [`FetchError::Lost`].
    pub fn lost_digest(&self) -> Option<Digest> {
        match self {
            Self::Lost { digest, .. } => Some(*digest),
            _ => None,
        }
    }
}

/// Fetches source blob `digest` (`size` bytes) from the coordinators into
/// the cache: [`fetch_blob`] for a SHA-1 digest.
pub async fn fetch_source_blob(
    coordinator: &CoordinatorClient,
    cache: &Cache,
    digest: Digest,
    size: u64,
) -> Result<(), FetchError> {
    fetch_blob(coordinator, cache, digest.into(), size).await
}

/// Fetches blob `key` (`size` bytes) from the coordinators into the cache,
/// unless another fetch of it, which this one waits for, stored it (see
/// [`Cache::fetch_turn`]). Retries through failovers for up to
/// [`SOURCE_FETCH_RETRY_WINDOW`]; a refusal, wrong content or a local
/// failure ends it at once, and a blob the coordinators do not have is
/// [`FetchError::NotFound`]. The empty blob, which every CAS holds without
/// storing it, is never asked for.
pub async fn fetch_blob(
    coordinator: &CoordinatorClient,
    cache: &Cache,
    key: BlobKey,
    size: u64,
) -> Result<(), FetchError> {
    if size == 0 && key == key.function().key_of(b"") {
        let cache = cache.clone();
        return distbuild_proto::blocking::run(move || {
            cache
                .insert_key(key, std::io::empty())
                .map_err(FetchError::from)
        })
        .await;
    }
    // The window counts from the call, not from the turn: behind a fetch
    // that spent the window failing, this one tries once, not a window
    // more.
    let give_up = Instant::now() + SOURCE_FETCH_RETRY_WINDOW;
    let _turn = cache.fetch_turn(key).await;
    if cache.holds(key) {
        return Ok(());
    }
    let mut backoff = Backoff::new();
    loop {
        let request = FetchRequest {
            digest: bytes::Bytes::copy_from_slice(key.hash_bytes()),
        };
        let result = match coordinator
            .fetch_blob(request, UNARY_DEADLINE, Persistence::Until(give_up))
            .await
        {
            Ok(stream) => receive_into_cache(stream, cache, key, size).await,
            Err(e) if e.code() == Code::NotFound => Err(FetchError::NotFound {
                key,
                size,
                message: e.to_string(),
            }),
            Err(e) => Err(e.into()),
        };
        let error = match result {
            Ok(()) => return Ok(()),
            // The call itself already retried what was worth retrying.
            Err(error @ FetchError::Rpc(_)) => return Err(error),
            Err(error) => error,
        };
        let delay = backoff.next_delay();
        if !matches!(error, FetchError::Transfer(_)) || Instant::now() + delay >= give_up {
            return Err(error);
        }
        tracing::info!(blob = %key, %error, "blob transfer failed; retrying");
        tokio::time::sleep(delay).await;
    }
}

/// Fetches artifact `digest` (`size` bytes) from the first of `holders`
/// (peer addresses, tried in order) that delivers it intact, unless
/// another fetch of it, which this one waits for, stored it.
///
/// When none can ([`FetchError::Lost`]): every holder was unreachable,
/// refused, or sent something broken, or no holder was named. A local
/// failure ends the fetch at once (another holder would not help) and is
/// never "lost"; neither is a holder too busy to serve it (tried again for
/// up to [`MAX_ARTIFACT_FETCH_ROUNDS`] rounds).
pub async fn fetch_artifact(
    connector: &SharedConnector,
    holders: &[String],
    cache: &Cache,
    digest: Digest,
    size: u64,
) -> Result<(), FetchError> {
    if holders.is_empty() {
        return Err(FetchError::Lost {
            digest,
            problems: "no worker holds it".to_string(),
        });
    }
    let _turn = cache.fetch_turn(digest.into()).await;
    if cache.holds(digest.into()) {
        return Ok(());
    }
    let mut backoff = Backoff::new();
    let mut round = 1;
    loop {
        let mut problems = Vec::new();
        let mut busy = false;
        for holder in holders {
            match fetch_artifact_from(connector, holder, cache, digest, size).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_local() => return Err(e),
                Err(e) => {
                    tracing::info!(%holder, %digest, error = %e, "artifact fetch failed; trying the next holder");
                    busy |= matches!(e, FetchError::Busy(_));
                    problems.push(format!("{holder}: {e}"));
                }
            }
        }
        let problems = problems.join("; ");
        if !busy {
            return Err(FetchError::Lost { digest, problems });
        }
        if round >= MAX_ARTIFACT_FETCH_ROUNDS {
            return Err(FetchError::Transfer(format!(
                "artifact {digest}: no holder delivered it in {round} rounds ({problems})"
            )));
        }
        round += 1;
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn fetch_artifact_from(
    connector: &SharedConnector,
    holder: &str,
    cache: &Cache,
    digest: Digest,
    size: u64,
) -> Result<(), FetchError> {
    let stream = match blob::open_artifact(
        connector.as_ref(),
        holder,
        &digest,
        FETCH_START_DEADLINE,
    )
    .await
    {
        Ok(stream) => stream,
        Err(OpenError::Connect(e)) => return Err(FetchError::Transfer(e.to_string())),
        Err(OpenError::Refused(status)) => {
            let problem = format!("{}: {}", status.code(), status.message());
            return Err(if status.code() == Code::ResourceExhausted {
                FetchError::Busy(problem)
            } else {
                FetchError::Transfer(problem)
            });
        }
        Err(OpenError::NoAnswer(_)) => {
            return Err(FetchError::Transfer(format!(
                "no answer within {} s",
                FETCH_START_DEADLINE.as_secs()
            )));
        }
    };
    receive_into_cache(stream, cache, digest, size).await
}

/// Writes the chunks of `stream` (at most `size` bytes in all, each chunk
/// within [`FETCH_IDLE_TIMEOUT`]) into a cache temporary file, checked
/// against `digest` as they arrive ([`BlobCheck`]), then stores it in the
/// cache under `digest`. A stream ended by NOT_FOUND is
/// [`FetchError::NotFound`].
pub async fn receive_into_cache(
    mut stream: Streaming<BlobChunk>,
    cache: &Cache,
    digest: impl Into<BlobKey>,
    size: u64,
) -> Result<(), FetchError> {
    let digest: BlobKey = digest.into();
    let transfer = |problem: String| FetchError::Transfer(format!("blob {digest}: {problem}"));
    let local = |problem: String| FetchError::Local(format!("blob {digest}: {problem}"));
    let temp = {
        let cache = cache.clone();
        distbuild_proto::blocking::run(move || {
            cache
                .temp_file()
                .map_err(|e| format!("create a download file: {e}"))
        })
        .await
        .map_err(local)?
    };
    let (std_file, temp_path) = temp.into_parts();
    let mut file = distbuild_proto::blocking::FileWriter::new(std_file);
    let mut check = BlobCheck::new(digest, size);
    blob::receive_chunks(&mut stream, &mut file, &mut check, FETCH_IDLE_TIMEOUT)
        .await
        .map_err(|error| match error {
            ReceiveError::Idle(_) => {
                transfer(format!("no data for {} s", FETCH_IDLE_TIMEOUT.as_secs()))
            }
            ReceiveError::Status(status) if status.code() == Code::NotFound => {
                FetchError::NotFound {
                    key: digest,
                    size,
                    message: format!("blob {digest}: {}: {}", status.code(), status.message()),
                }
            }
            ReceiveError::Status(status) => {
                transfer(format!("{}: {}", status.code(), status.message()))
            }
            ReceiveError::Oversize(_) => transfer(format!("more than the expected {size} bytes")),
            ReceiveError::Write(e) => local(format!(
                "write {}: {}",
                temp_path.display(),
                error_chain(&e)
            )),
        })?;
    let received = check.received();
    if received != size {
        return Err(transfer(format!("ended after {received} of {size} bytes")));
    }
    if let Err(mismatch) = check.finish() {
        return Err(FetchError::Cache(CacheError::DigestMismatch {
            expected: digest,
            actual: mismatch.actual,
        }));
    }
    let std_file = file
        .into_inner()
        .map_err(|e| local(format!("write {}: {e}", temp_path.display())))?;
    // Checked as it arrived: stored as it is, not read and hashed again.
    let temp = tempfile::NamedTempFile::from_parts(std_file, temp_path);
    let cache = cache.clone();
    distbuild_proto::blocking::run(move || {
        cache.adopt(temp, digest, size).map_err(FetchError::from)
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use distbuild_proto::v1::peer_api_server::{PeerApi, PeerApiServer};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;
    use tonic::{Request, Response, Status};

    use super::*;
    use crate::connect::TcpConnector;
    use crate::peer::PeerService;

    /// A holder that has the artifact but never has a free transfer slot.
    struct BusyPeer;

    #[tonic::async_trait]
    impl PeerApi for BusyPeer {
        type FetchArtifactStream = tokio_stream::Empty<Result<BlobChunk, Status>>;

        async fn fetch_artifact(
            &self,
            _request: Request<FetchRequest>,
        ) -> Result<Response<Self::FetchArtifactStream>, Status> {
            Err(Status::resource_exhausted("every transfer slot is taken"))
        }
    }

    async fn serve_peer<S: PeerApi>(service: S, stop: &CancellationToken) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PeerApiServer::new(service))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.clone().cancelled_owned(),
                ),
        );
        addr
    }

    #[derive(Debug)]
    enum Want {
        Fetched,
        Lost,
        /// An ordinary failure whose text contains this.
        NotLost(&'static str),
    }

    #[tokio::test]
    async fn lost_only_when_no_holder_can_serve_it() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let stop = CancellationToken::new();
        let content = b"the artifact's bytes".to_vec();
        let digest = Digest::of(&content);
        let size = content.len() as u64;
        let holder_cache = Cache::open(&dir.path().join("holder"), 1 << 20).expect("cache");
        holder_cache
            .insert(Some(digest), &content[..])
            .expect("insert");
        let good = serve_peer(
            PeerService::new(holder_cache, TaskTracker::new(), stop.clone()),
            &stop,
        )
        .await;
        let busy = serve_peer(BusyPeer, &stop).await;
        let dead = "127.0.0.1:1".to_string();
        // Whether the cache can make no download file (its `tmp/` gone).
        let broken = true;
        let cases: Vec<(&str, Vec<String>, bool, Want)> = vec![
            ("no holder named", vec![], !broken, Want::Lost),
            (
                "the only holder is dead",
                vec![dead.clone()],
                !broken,
                Want::Lost,
            ),
            (
                "a busy holder still has it",
                vec![dead.clone(), busy.clone()],
                !broken,
                Want::NotLost("3 rounds"),
            ),
            (
                "a live holder after a dead one",
                vec![dead.clone(), good.clone()],
                !broken,
                Want::Fetched,
            ),
            (
                "a local failure is not the holders'",
                vec![good.clone(), dead.clone()],
                broken,
                Want::NotLost("create a download file"),
            ),
        ];
        let connector: SharedConnector = Arc::new(TcpConnector::default());
        for (i, (what, holders, broken, want)) in cases.into_iter().enumerate() {
            let cache_dir = dir.path().join(format!("cache{i}"));
            let cache = Cache::open(&cache_dir, 1 << 20).expect("cache");
            if broken {
                std::fs::remove_dir_all(cache_dir.join("tmp")).expect("remove the cache's tmp/");
            }
            let result = fetch_artifact(&connector, &holders, &cache, digest, size).await;
            match (&result, &want) {
                (Ok(()), Want::Fetched) => {
                    assert!(cache.open_blob(digest).expect("open").is_some(), "{what}");
                }
                (Err(e), Want::Lost) => {
                    assert_eq!(e.lost_digest(), Some(digest), "{what}: {e}");
                    assert!(e.to_string().contains(&digest.to_string()), "{what}: {e}");
                }
                (Err(e), Want::NotLost(text)) => {
                    assert_eq!(e.lost_digest(), None, "{what}: {e}");
                    assert!(e.to_string().contains(text), "{what}: {e}");
                }
                _ => panic!("{what}: got {result:?}, want {want:?}"),
            }
        }
        stop.cancel();
    }
}
