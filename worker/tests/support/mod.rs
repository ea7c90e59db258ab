//! Test helpers for the worker: an in-process fake coordinator serving
//! `WorkerApi` on 127.0.0.1:0, scripted by the test, a worker running in
//! the test's process, peers, and small utilities.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use distbuild_proto::v1::peer_api_server::PeerApiServer;
use distbuild_proto::v1::worker_api_server::{WorkerApi, WorkerApiServer};
use distbuild_proto::v1::{
    self, Assignment, BlobChunk, FetchRequest, HeartbeatRequest, HeartbeatResponse, LeaveRequest,
    LeaveResponse, PollWorkRequest, PollWorkResponse, RegisterRequest, RegisterResponse,
    ReportResultRequest, ReportResultResponse, UploadBlobResponse,
};
use distbuild_proto::wire::{LEADER_METADATA_KEY, digest_to_wire};
use distbuild_proto::{BlobKey, Digest, artifact};
use distbuild_worker::cache::Cache;
use distbuild_worker::peer::PeerService;
use distbuild_worker::{WorkerConfig, run};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

/// What the fake coordinator has seen and will answer.
#[derive(Default)]
pub struct State {
    /// Source blobs it serves through FetchBlob.
    pub blobs: HashMap<Digest, Vec<u8>>,
    /// Remote Execution API CAS blobs it serves through FetchBlob (any
    /// function), and those uploaded (verified) through UploadBlob.
    pub cas: HashMap<BlobKey, Vec<u8>>,
    /// Every blob upload completed, in order.
    pub uploads: Vec<BlobKey>,
    /// Assignments handed out by PollWork, in order.
    pub queue: VecDeque<Assignment>,
    /// Leases to revoke in the next heartbeat answers.
    pub revoke: HashSet<u64>,
    /// When set, every call is refused as "not the leader" naming it.
    pub leader: Option<String>,
    /// Tell the next poll to register again.
    pub reregister_next_poll: bool,
    /// Tell the next heartbeat to register again (revoking its leases, as
    /// the coordinators do for a worker they do not know).
    pub reregister_next_heartbeat: bool,
    /// The next this many polls are carried out (jobs leased, the answer
    /// remembered by request ID) and then answered UNAVAILABLE, as when a
    /// leader loses its leadership before answering.
    pub lose_poll_answers: usize,
    /// The next this many reports are refused UNAVAILABLE (no leader
    /// named) without being applied.
    pub refuse_reports: usize,
    /// While set, heartbeats are refused UNAVAILABLE (no leader named).
    pub refuse_heartbeats: bool,
    /// Reports are applied at once but answered only after this long (an
    /// entry committing slowly).
    pub report_answer_delay: Option<Duration>,
    /// A reported lease is revoked in the heartbeats after it, as the
    /// coordinators answer for a lease no longer current.
    pub revoke_reported: bool,
    /// Leased to the slot of the next reports, one each (the report's
    /// `take_next`).
    pub next_for_report: VecDeque<Assignment>,
    /// Workers that asked to drain, and that deregistered, in order. A
    /// draining worker's heartbeats are answered "draining, may leave".
    pub drained: Vec<String>,
    pub deregistered: Vec<String>,
    /// Answers of polls that leased jobs, by request ID: a retry gets the
    /// same answer (the coordinators' at-most-once application).
    pub poll_answers: HashMap<String, PollWorkResponse>,
    pub registrations: Vec<RegisterRequest>,
    /// Every poll received, answered or not.
    pub polls: Vec<PollWorkRequest>,
    /// Heartbeats answered.
    pub heartbeats: Vec<HeartbeatRequest>,
    /// Heartbeats refused (`refuse_heartbeats`).
    pub refused_heartbeats: Vec<HeartbeatRequest>,
    /// Reports accepted.
    pub reports: Vec<ReportResultRequest>,
    /// Every report received, accepted or not.
    pub report_attempts: Vec<ReportResultRequest>,
    pub fetches: usize,
}

/// A scripted coordinator.
#[derive(Clone, Default)]
pub struct FakeCoordinator {
    pub state: Arc<Mutex<State>>,
}

/// Heartbeat interval the fake asks for: short, so tests are quick.
pub const FAKE_HEARTBEAT_INTERVAL_MS: u64 = 100;

impl FakeCoordinator {
    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().expect("fake state"))
    }

    /// UNAVAILABLE without a leader named: during an election, or from a
    /// node that lost its leadership.
    pub fn no_leader() -> Status {
        Status::unavailable("no leader known")
    }

    fn not_leader(&self) -> Result<(), Status> {
        match self.with(|s| s.leader.clone()) {
            None => Ok(()),
            Some(leader) => {
                let mut status = Status::unavailable("not the leader");
                status
                    .metadata_mut()
                    .insert(LEADER_METADATA_KEY, leader.parse().expect("ascii address"));
                Err(status)
            }
        }
    }

    /// Waits until `check` holds of the state, or panics after `timeout`.
    pub async fn wait_until(&self, what: &str, timeout: Duration, check: impl Fn(&State) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.with(|s| check(s)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tonic::async_trait]
impl WorkerApi for FakeCoordinator {
    type FetchBlobStream = tokio_stream::Iter<std::vec::IntoIter<Result<BlobChunk, Status>>>;

    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        self.not_leader()?;
        self.with(|s| s.registrations.push(request.into_inner()));
        Ok(Response::new(RegisterResponse {
            lease_timeout_ms: 10 * FAKE_HEARTBEAT_INTERVAL_MS,
            heartbeat_interval_ms: FAKE_HEARTBEAT_INTERVAL_MS,
        }))
    }

    async fn poll_work(
        &self,
        request: Request<PollWorkRequest>,
    ) -> Result<Response<PollWorkResponse>, Status> {
        self.not_leader()?;
        let request = request.into_inner();
        let wait = Duration::from_millis(request.wait_ms);
        let deadline = tokio::time::Instant::now() + wait;
        let (reregister, remembered) = self.with(|s| {
            s.polls.push(request.clone());
            let remembered = s.poll_answers.get(&request.request_id).cloned();
            let reregister = remembered.is_none() && std::mem::take(&mut s.reregister_next_poll);
            (reregister, remembered)
        });
        if let Some(answer) = remembered {
            return Ok(Response::new(answer));
        }
        loop {
            let assignments: Vec<Assignment> = self.with(|s| {
                let n = (request.free_slots as usize).min(s.queue.len());
                s.queue.drain(..n).collect()
            });
            if !assignments.is_empty() || reregister || tokio::time::Instant::now() >= deadline {
                let answer = PollWorkResponse {
                    assignments,
                    reregister,
                };
                let lost = self.with(|s| {
                    if !answer.assignments.is_empty() {
                        s.poll_answers
                            .insert(request.request_id.clone(), answer.clone());
                    }
                    let lost = s.lose_poll_answers > 0;
                    s.lose_poll_answers = s.lose_poll_answers.saturating_sub(1);
                    lost
                });
                if lost {
                    return Err(Self::no_leader());
                }
                return Ok(Response::new(answer));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        self.not_leader()?;
        let request = request.into_inner();
        self.with(|s| {
            if s.refuse_heartbeats {
                s.refused_heartbeats.push(request);
                return Err(Self::no_leader());
            }
            let reregister = std::mem::take(&mut s.reregister_next_heartbeat);
            let revoked_tokens = request
                .lease_tokens
                .iter()
                .copied()
                .filter(|t| reregister || s.revoke.contains(t))
                .collect();
            let draining = s.drained.contains(&request.worker_id);
            s.heartbeats.push(request);
            Ok(Response::new(HeartbeatResponse {
                revoked_tokens,
                reregister,
                draining,
                may_leave: draining,
                replicate: Vec::new(),
            }))
        })
    }

    async fn report_result(
        &self,
        request: Request<ReportResultRequest>,
    ) -> Result<Response<ReportResultResponse>, Status> {
        self.not_leader()?;
        let request = request.into_inner();
        let (answer, delay) = self.with(|s| {
            s.report_attempts.push(request.clone());
            if s.refuse_reports > 0 {
                s.refuse_reports -= 1;
                return Err(Self::no_leader());
            }
            if s.revoke_reported {
                s.revoke.insert(request.lease_token);
            }
            let assignments = if request.take_next {
                s.next_for_report.pop_front().into_iter().collect()
            } else {
                Vec::new()
            };
            s.reports.push(request);
            Ok((
                ReportResultResponse {
                    accepted: true,
                    assignments,
                },
                s.report_answer_delay,
            ))
        })?;
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        Ok(Response::new(answer))
    }

    async fn drain(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        self.not_leader()?;
        self.with(|s| s.drained.push(request.into_inner().worker_id));
        Ok(Response::new(LeaveResponse {}))
    }

    async fn deregister(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        self.not_leader()?;
        self.with(|s| s.deregistered.push(request.into_inner().worker_id));
        Ok(Response::new(LeaveResponse {}))
    }

    async fn upload_blob(
        &self,
        request: Request<tonic::Streaming<BlobChunk>>,
    ) -> Result<Response<UploadBlobResponse>, Status> {
        self.not_leader()?;
        let (key, data) = Self::receive_upload(request.into_inner()).await?;
        self.with(|s| {
            s.uploads.push(key);
            s.cas.insert(key, data);
        });
        Ok(Response::new(UploadBlobResponse {}))
    }

    async fn fetch_blob(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchBlobStream>, Status> {
        self.not_leader()?;
        let key = BlobKey::from_hash_bytes(&request.get_ref().digest[..])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let data = self.with(|s| {
            s.fetches += 1;
            match key.sha1() {
                Some(digest) if s.blobs.contains_key(&digest) => s.blobs.get(&digest).cloned(),
                _ => s.cas.get(&key).cloned(),
            }
        });
        let data = data.ok_or_else(|| Status::not_found("no such blob"))?;
        // Small chunks, so the transfer takes several messages.
        let chunks: Vec<Result<BlobChunk, Status>> = data
            .chunks(7)
            .map(|c| {
                Ok(BlobChunk {
                    data: Bytes::copy_from_slice(c),
                    ..Default::default()
                })
            })
            .collect();
        Ok(Response::new(tokio_stream::iter(chunks)))
    }
}

impl FakeCoordinator {
    /// Receives an upload whole and checks it as the coordinators do.
    async fn receive_upload(
        mut stream: tonic::Streaming<BlobChunk>,
    ) -> Result<(BlobKey, Vec<u8>), Status> {
        use futures::StreamExt;
        let mut first: Option<(BlobKey, u64)> = None;
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if first.is_none() {
                let key = BlobKey::from_hash_bytes(&chunk.digest)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                first = Some((key, chunk.size));
            }
            data.extend_from_slice(&chunk.data);
        }
        let (key, size) = first.ok_or_else(|| Status::invalid_argument("no chunk"))?;
        if data.len() as u64 != size || key.function().key_of(&data) != key {
            return Err(Status::invalid_argument(
                "content does not match its digest",
            ));
        }
        Ok((key, data))
    }
}

/// A running fake coordinator; stops when dropped.
pub struct Served {
    pub addr: SocketAddr,
    pub fake: FakeCoordinator,
    stop: CancellationToken,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Serves `fake` on 127.0.0.1:0.
pub async fn serve(fake: FakeCoordinator) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the fake coordinator");
    let addr = listener.local_addr().expect("local addr");
    let stop = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        .add_service(WorkerApiServer::new(fake.clone()))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            stop.clone().cancelled_owned(),
        );
    tokio::spawn(server);
    Served { addr, fake, stop }
}

pub const WAIT: Duration = Duration::from_secs(20);
pub const DEP: &str = "1111111111111111111111111111111111111111";
pub const JOB: &str = "2222222222222222222222222222222222222222";

/// A worker running in this process (`run` on a task).
pub struct RunningWorker {
    /// Its peer address.
    pub addr: String,
    pub shutdown: CancellationToken,
    /// Cancel to drain it (as SIGTERM does).
    pub drain: CancellationToken,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningWorker {
    /// A worker with `slots` slots and the default leases ahead (as
    /// many).
    pub async fn start(coordinators: Vec<String>, cache_dir: &Path, slots: usize) -> Self {
        Self::start_with_ahead(coordinators, cache_dir, slots, slots).await
    }

    pub async fn start_with_ahead(
        coordinators: Vec<String>,
        cache_dir: &Path,
        slots: usize,
        jobs_ahead: usize,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let mut config = WorkerConfig::new(coordinators, cache_dir.to_path_buf());
        config.slots = slots;
        config.jobs_ahead = Some(jobs_ahead);
        config.poll_wait_ms = 200;
        let shutdown = CancellationToken::new();
        let drain = config.drain.clone();
        let handle = tokio::spawn(run(config, listener, shutdown.clone()));
        Self {
            addr,
            shutdown,
            drain,
            handle,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("the worker stops promptly")
            .expect("no panic")
            .expect("the worker ran without error");
    }
}

pub fn sh(script: &str) -> v1::Command {
    v1::Command {
        kind: Some(v1::command::Kind::Exec(v1::ExecCommand {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            environ: vec![],
            working_directory: String::new(),
        })),
    }
}

pub fn assignment(lease_token: u64, cmds: Vec<v1::Command>) -> Assignment {
    Assignment {
        lease_token,
        cache_key: digest_to_wire(&Digest::of(format!("key {lease_token}").as_bytes())),
        job_id: JOB.into(),
        name: format!("job {lease_token}"),
        cmds,
        inputs: vec![],
        deps: vec![],
        timeout_ms: 60_000,
        build_id: 1,
        path_ms: 0,
        action: None,
    }
}

pub fn input(path: &str, content: &[u8]) -> v1::InputFile {
    v1::InputFile {
        path: path.into(),
        digest: digest_to_wire(&Digest::of(content)),
        size: content.len() as u64,
    }
}

/// Serves `cache` as a peer on 127.0.0.1:0; returns its address.
pub async fn serve_peer(cache: Cache, stop: CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let service = PeerService::new(cache, TaskTracker::new(), stop.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PeerApiServer::new(service))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.cancelled_owned(),
            ),
    );
    addr
}

/// Packs a directory holding `files` into `cache`; returns digest and size.
pub fn make_artifact(cache: &Cache, scratch: &Path, files: &[(&str, &str)]) -> (Digest, u64) {
    let dir = scratch.join("artifact-src");
    for (path, text) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }
    let mut packed = Vec::new();
    let (digest, size) = artifact::pack(&dir, &mut packed).expect("pack");
    cache.insert(Some(digest), &packed[..]).expect("insert");
    (digest, size)
}

/// Whether the process named in `pid_file` runs (a zombie does not: in a
/// container nobody may reap the orphans).
pub fn pid_alive(pid_file: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return false;
    };
    let pid: i32 = text.trim().parse().expect("a pid");
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Waits (briefly) for the process in `pid_file` to be gone.
pub async fn dies_soon(pid_file: &Path) -> bool {
    for _ in 0..100 {
        if !pid_alive(pid_file) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

pub async fn wait_for_file(path: &Path) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
