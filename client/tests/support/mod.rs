//! Test helpers: an in-process fake coordinator (also serving the peer API)
//! on 127.0.0.1:0 whose answers a test scripts, a TCP proxy that can cut or
//! black-hole its connections (a crash, a partition), and a capturable
//! console.

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
#[derive(Debug, Clone, Default)]
pub struct WatchScript {
    /// Events before `from_seq` sent again first (a sloppy server).
    pub resend: u64,
    /// Events sent (after the resent ones) before the stream stops; `None`
    /// for all.
    pub take: Option<usize>,
    /// How it stops early: with an UNAVAILABLE status, or by just ending.
    pub fail_with_status: bool,
    /// With `fail_with_status`: the leader the status names (a node that
    /// lost its leadership).
    pub leader: Option<String>,
    /// Instead of stopping early, stay open and send nothing more (until
    /// the connection goes).
    pub hang: bool,
    /// From this call on, the fake is in an election for this long.
    pub outage: Option<std::time::Duration>,
    /// Wait this long after the events before stopping (a stream open
    /// while a job runs).
    pub stall: Option<std::time::Duration>,
}

/// A scripted error answer.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: Code,
    pub message: String,
    /// Sent as `distbuild-leader` metadata.
    pub leader: Option<String>,
}

impl Failure {
    /// UNAVAILABLE naming no leader (an election).
    pub fn election() -> Self {
        Self {
            code: Code::Unavailable,
            message: "no leader (election in progress)".into(),
            leader: None,
        }
    }

    /// UNAVAILABLE naming the leader (a follower).
    pub fn not_leader(leader: &str) -> Self {
        Self {
            code: Code::Unavailable,
            message: "not the leader".into(),
            leader: Some(leader.into()),
        }
    }

    pub fn status(&self) -> Status {
        let mut status = Status::new(self.code, self.message.clone());
        if let Some(leader) = &self.leader {
            status
                .metadata_mut()
                .insert(LEADER_METADATA_KEY, leader.parse().expect("ascii address"));
        }
        status
    }
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
    /// Answers scripted per method (by its snake_case name), taken first.
    /// SubmitBuild records the request before answering one (an answer
    /// lost after the submit was applied).
    pub failures: HashMap<&'static str, VecDeque<Failure>>,
    /// Until then, every call is answered UNAVAILABLE without a leader (an
    /// election).
    pub outage_until: Option<std::time::Instant>,
    /// Calls answered during the outage.
    pub outage_answers: usize,
    /// The members ClusterStatus reports.
    pub members: Vec<Member>,
    pub add_node_requests: Vec<AddNodeRequest>,
    pub remove_node_requests: Vec<RemoveNodeRequest>,
    /// Membership changes (by method) made but then answered UNAVAILABLE
    /// without a leader, as if the answer was lost in a failover.
    pub lose_answers: HashMap<&'static str, usize>,
}

impl FakeState {
    /// Whether the answer to this call of `method` is to be lost.
    fn lose_answer(&mut self, method: &'static str) -> bool {
        match self.lose_answers.get_mut(method) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
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

    /// The answer to `method` if not a normal one: an outage, a redirect,
    /// a scripted failure.
    fn check_redirect(&self, method: &'static str) -> Result<(), Status> {
        let mut state = self.lock();
        if state
            .outage_until
            .is_some_and(|until| std::time::Instant::now() < until)
        {
            state.outage_answers += 1;
            return Err(Failure::election().status());
        }
        if method != "submit_build"
            && let Some(failure) = state.failures.get_mut(method).and_then(VecDeque::pop_front)
        {
            return Err(failure.status());
        }
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
        self.check_redirect("find_missing_blobs")?;
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
        self.check_redirect("upload_blob")?;
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
        self.check_redirect("submit_build")?;
        let mut state = self.lock();
        state.submits.push(request.into_inner());
        if let Some(failure) = state
            .failures
            .get_mut("submit_build")
            .and_then(VecDeque::pop_front)
        {
            return Err(failure.status());
        }
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
        self.check_redirect("watch_build")?;
        let from = request.into_inner().from_seq;
        let mut state = self.lock();
        state.watch_from.push(from);
        let script = state.watch_scripts.pop_front().unwrap_or_default();
        if let Some(outage) = script.outage {
            state.outage_until = Some(std::time::Instant::now() + outage);
        }
        let start = from.saturating_sub(script.resend) as usize;
        let events: Vec<Result<BuildEvent, Status>> = state
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
        let events = futures::stream::iter(events);
        if script.hang {
            return Ok(Response::new(
                events.chain(futures::stream::pending()).boxed(),
            ));
        }
        let end = (script.take.is_some() && script.fail_with_status).then(|| {
            let mut failure = Failure::election();
            failure.message = "leader lost".into();
            failure.leader = script.leader.clone();
            Err(failure.status())
        });
        let stall = script.stall;
        let end = futures::stream::once(async move {
            if let Some(stall) = stall {
                tokio::time::sleep(stall).await;
            }
            end
        })
        .filter_map(|end| async move { end });
        Ok(Response::new(events.chain(end).boxed()))
    }

    async fn cancel_build(
        &self,
        _request: Request<CancelBuildRequest>,
    ) -> Result<Response<CancelBuildResponse>, Status> {
        // The fake's builds are scripted; cancelling is tested against the
        // real coordinator (tests/local_server.rs).
        Err(Status::unimplemented(
            "the fake cluster does not cancel builds",
        ))
    }

    async fn locate_artifacts(
        &self,
        request: Request<LocateArtifactsRequest>,
    ) -> Result<Response<LocateArtifactsResponse>, Status> {
        self.check_redirect("locate_artifacts")?;
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
        self.check_redirect("cluster_status")?;
        let state = self.lock();
        let members = if state.members.is_empty() {
            vec![Member {
                node_id: 1,
                addr: "leader:1".into(),
                voter: true,
                role: "leader".into(),
                term: 2,
                last_log_index: 10,
                applied_index: 10,
                ..Default::default()
            }]
        } else {
            state.members.clone()
        };
        Ok(Response::new(ClusterStatusResponse {
            leader: 1,
            members,
            workers: vec![],
            answered_by: 1,
        }))
    }

    async fn drain_worker(
        &self,
        _request: Request<distbuild_proto::v1::DrainWorkerRequest>,
    ) -> Result<Response<distbuild_proto::v1::DrainWorkerResponse>, Status> {
        // The fake cluster has no workers.
        Err(Status::not_found("no such worker"))
    }

    async fn add_node(
        &self,
        request: Request<AddNodeRequest>,
    ) -> Result<Response<ChangeMembershipResponse>, Status> {
        self.check_redirect("add_node")?;
        let request = request.into_inner();
        let mut state = self.lock();
        state.add_node_requests.push(request.clone());
        if state.members.iter().any(|m| m.node_id == request.node_id) {
            return Err(Status::already_exists(format!(
                "node {} is already a member",
                request.node_id
            )));
        }
        state.members.push(Member {
            node_id: request.node_id,
            addr: request.addr,
            voter: true,
            ..Default::default()
        });
        if state.lose_answer("add_node") {
            return Err(Failure::election().status());
        }
        Ok(Response::new(ChangeMembershipResponse {
            members: state.members.clone(),
        }))
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<ChangeMembershipResponse>, Status> {
        self.check_redirect("remove_node")?;
        let request = request.into_inner();
        let mut state = self.lock();
        state.remove_node_requests.push(request);
        let Some(position) = state
            .members
            .iter()
            .position(|m| m.node_id == request.node_id)
        else {
            return Err(Status::not_found(format!(
                "node {} is not a member",
                request.node_id
            )));
        };
        state.members.remove(position);
        if state.lose_answer("remove_node") {
            return Err(Failure::election().status());
        }
        Ok(Response::new(ChangeMembershipResponse {
            members: state.members.clone(),
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

/// What a [`Proxy`] does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forwards both ways.
    Pass,
    /// Keeps every connection open (and accepts new ones) but drops every
    /// byte: a partition, as a peer sees it.
    Blackhole,
}

/// A TCP proxy on 127.0.0.1:0 in front of `target`; [`Proxy::cut`]
/// closes every connection and stops listening (a crash).
pub struct Proxy {
    pub addr: String,
    mode: tokio::sync::watch::Sender<ProxyMode>,
    cut: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr").to_string();
        let (mode, mode_rx) = tokio::sync::watch::channel(ProxyMode::Pass);
        let cut = CancellationToken::new();
        let stop = cut.clone();
        let task = tokio::spawn(async move {
            let tracker = tokio_util::task::TaskTracker::new();
            loop {
                let (client, _) = tokio::select! {
                    () = stop.cancelled() => break,
                    accepted = listener.accept() => accepted.expect("accept"),
                };
                let target = target.clone();
                let mode = mode_rx.clone();
                let stop = stop.clone();
                tracker.spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = Self::serve(client, target, mode) => {}
                    }
                });
            }
            tracker.close();
            tracker.wait().await;
        });
        Self {
            addr,
            mode,
            cut,
            task,
        }
    }

    async fn serve(
        client: tokio::net::TcpStream,
        target: String,
        mode: tokio::sync::watch::Receiver<ProxyMode>,
    ) {
        if *mode.borrow() == ProxyMode::Blackhole {
            Self::pump(client.into_split().0, None, mode).await;
            return;
        }
        let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
            return;
        };
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        tokio::join!(
            Self::pump(client_read, Some(server_write), mode.clone()),
            Self::pump(server_read, Some(client_write), mode),
        );
    }

    /// Copies `from` into `to` while passing; drops what it reads while a
    /// black hole.
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: Option<tokio::net::tcp::OwnedWriteHalf>,
        mode: tokio::sync::watch::Receiver<ProxyMode>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if *mode.borrow() == ProxyMode::Blackhole {
                continue;
            }
            let Some(to) = to.as_mut() else { continue };
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    /// From now on, drops every byte (connections stay open).
    pub fn blackhole(&self) {
        self.mode.send_replace(ProxyMode::Blackhole);
    }

    /// Closes every connection and stops listening; waits until done.
    pub async fn cut(self) {
        self.cut.cancel();
        self.task.await.expect("proxy task");
    }
}
