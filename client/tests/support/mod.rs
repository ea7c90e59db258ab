//! Test helpers: an in-process fake coordinator (also serving the peer API)
//! on 127.0.0.1:0 whose answers a test scripts, and a capturable console.

#![allow(dead_code)] // each test binary uses its own part

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use distbuild_client::render::Console;
use distbuild_proto::Digest;
use distbuild_proto::v1::admin_api_server::{AdminApi, AdminApiServer};
use distbuild_proto::v1::client_api_server::{ClientApi, ClientApiServer};
use distbuild_proto::v1::peer_api_server::{PeerApi, PeerApiServer};
use distbuild_proto::v1::*;
use distbuild_proto::wire::{LEADER_METADATA_KEY, MAX_BLOB_CHUNK_BYTES};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

/// How one WatchBuild call misbehaves.
#[derive(Debug, Clone, Copy)]
pub struct WatchScript {
    /// Events before `from_seq` sent again first (a sloppy server).
    pub resend: u64,
    /// Events sent (after the resent ones) before the stream stops; `None`
    /// for all.
    pub take: Option<usize>,
    /// How it stops early: with an UNAVAILABLE status, or by just ending.
    pub fail_with_status: bool,
}

/// What the fake knows and what it saw.
#[derive(Default)]
pub struct FakeState {
    /// Answer every call with "not the leader", naming this address.
    pub redirect_to: Option<String>,
    pub blobs: HashMap<Digest, Vec<u8>>,
    pub uploads: usize,
    pub submits: Vec<SubmitBuildRequest>,
    pub submit_error: Option<(Code, String)>,
    pub job_count: u32,
    pub events: Vec<BuildEvent>,
    pub watch_scripts: VecDeque<WatchScript>,
    pub watch_from: Vec<u64>,
    pub artifacts: HashMap<Digest, Vec<u8>>,
    /// Peer addresses LocateArtifacts names for every artifact.
    pub holders: Vec<String>,
    pub redirected: usize,
}

/// The fake coordinator (and worker peer API). Clones share state.
#[derive(Clone, Default)]
pub struct Fake {
    pub state: Arc<Mutex<FakeState>>,
}

impl Fake {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().expect("fake state lock")
    }

    fn check_redirect(&self) -> Result<(), Status> {
        let mut state = self.lock();
        if let Some(leader) = state.redirect_to.clone() {
            state.redirected += 1;
            let mut status = Status::unavailable("not the leader");
            status
                .metadata_mut()
                .insert(LEADER_METADATA_KEY, leader.parse().expect("ascii address"));
            return Err(status);
        }
        Ok(())
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<BuildEvent, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<BlobChunk, Status>> + Send>>;

#[tonic::async_trait]
impl ClientApi for Fake {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        self.check_redirect()?;
        let state = self.lock();
        let missing = request
            .into_inner()
            .digests
            .into_iter()
            .filter(|d| {
                let digest = Digest::try_from(&d[..]).expect("20 bytes");
                !state.blobs.contains_key(&digest)
            })
            .collect();
        Ok(Response::new(FindMissingBlobsResponse { missing }))
    }

    async fn upload_blob(
        &self,
        request: Request<Streaming<BlobChunk>>,
    ) -> Result<Response<UploadBlobResponse>, Status> {
        self.check_redirect()?;
        let mut stream = request.into_inner();
        let mut data = Vec::new();
        let mut head: Option<(Digest, u64)> = None;
        while let Some(chunk) = stream.message().await? {
            if chunk.data.len() > MAX_BLOB_CHUNK_BYTES {
                return Err(Status::invalid_argument("chunk too large"));
            }
            if head.is_none() {
                let digest = Digest::try_from(&chunk.digest[..])
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                head = Some((digest, chunk.size));
            }
            data.extend_from_slice(&chunk.data);
        }
        let (digest, size) = head.ok_or_else(|| Status::invalid_argument("no chunks"))?;
        if data.len() as u64 != size || Digest::of(&data) != digest {
            return Err(Status::invalid_argument("blob does not match its digest"));
        }
        let mut state = self.lock();
        state.uploads += 1;
        state.blobs.insert(digest, data);
        Ok(Response::new(UploadBlobResponse {}))
    }

    async fn submit_build(
        &self,
        request: Request<SubmitBuildRequest>,
    ) -> Result<Response<SubmitBuildResponse>, Status> {
        self.check_redirect()?;
        let mut state = self.lock();
        state.submits.push(request.into_inner());
        if let Some((code, message)) = &state.submit_error {
            return Err(Status::new(*code, message.clone()));
        }
        Ok(Response::new(SubmitBuildResponse {
            build_id: 7,
            job_count: state.job_count,
        }))
    }

    type WatchBuildStream = EventStream;

    async fn watch_build(
        &self,
        request: Request<WatchBuildRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.check_redirect()?;
        let from = request.into_inner().from_seq;
        let mut state = self.lock();
        state.watch_from.push(from);
        let script = state.watch_scripts.pop_front().unwrap_or(WatchScript {
            resend: 0,
            take: None,
            fail_with_status: false,
        });
        let start = from.saturating_sub(script.resend) as usize;
        let mut events: Vec<Result<BuildEvent, Status>> = state
            .events
            .iter()
            .skip(start)
            .take(
                script
                    .take
                    .map_or(usize::MAX, |n| n + script.resend as usize),
            )
            .cloned()
            .map(Ok)
            .collect();
        if script.take.is_some() && script.fail_with_status {
            events.push(Err(Status::unavailable("leader lost")));
        }
        Ok(Response::new(futures::stream::iter(events).boxed()))
    }

    async fn locate_artifacts(
        &self,
        request: Request<LocateArtifactsRequest>,
    ) -> Result<Response<LocateArtifactsResponse>, Status> {
        self.check_redirect()?;
        let state = self.lock();
        let locations = request
            .into_inner()
            .digests
            .into_iter()
            .map(|digest| ArtifactLocation {
                digest,
                holders: state.holders.clone(),
            })
            .collect();
        Ok(Response::new(LocateArtifactsResponse { locations }))
    }
}

#[tonic::async_trait]
impl PeerApi for Fake {
    type FetchArtifactStream = ChunkStream;

    async fn fetch_artifact(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let digest = Digest::try_from(&request.into_inner().digest[..])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let data = self
            .lock()
            .artifacts
            .get(&digest)
            .cloned()
            .ok_or_else(|| Status::not_found("no such artifact"))?;
        let chunks: Vec<Result<BlobChunk, Status>> = data
            .chunks(7) // small, to exercise reassembly
            .map(|c| {
                Ok(BlobChunk {
                    data: c.to_vec().into(),
                    ..Default::default()
                })
            })
            .collect();
        Ok(Response::new(futures::stream::iter(chunks).boxed()))
    }
}

#[tonic::async_trait]
impl AdminApi for Fake {
    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.check_redirect()?;
        Ok(Response::new(ClusterStatusResponse {
            leader: 1,
            members: vec![Member {
                node_id: 1,
                addr: "leader:1".into(),
            }],
            workers: vec![],
        }))
    }
}

/// A running fake server.
pub struct Server {
    pub addr: String,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Serves `fake` on 127.0.0.1:0.
    pub async fn start(fake: Fake) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr").to_string();
        let cancel = CancellationToken::new();
        let shutdown = cancel.clone();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(ClientApiServer::new(fake.clone()))
                .add_service(PeerApiServer::new(fake.clone()))
                .add_service(AdminApiServer::new(fake))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    shutdown.cancelled_owned(),
                )
                .await
                .expect("serve");
        });
        Self { addr, cancel, task }
    }

    /// Stops serving and waits until it has.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.task.await.expect("server task");
    }
}

/// A writer tests can read back.
#[derive(Clone, Default)]
pub struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("buffer lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedBuf {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("buffer lock")).into_owned()
    }
}

/// A console writing into two buffers, with no progress bar.
pub fn console() -> (Console, SharedBuf, SharedBuf) {
    let out = SharedBuf::default();
    let err = SharedBuf::default();
    (
        Console {
            out: Box::new(out.clone()),
            err: Box::new(err.clone()),
            progress: false,
        },
        out,
        err,
    )
}

/// An address nothing listens on (bound, then released).
pub async fn dead_address() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    listener.local_addr().expect("local addr").to_string()
}
