//! Test helpers for the worker: an in-process fake coordinator serving
//! `WorkerApi` on 127.0.0.1:0, scripted by the test, and small utilities.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use distbuild_proto::Digest;
use distbuild_proto::v1::worker_api_server::{WorkerApi, WorkerApiServer};
use distbuild_proto::v1::{
    Assignment, BlobChunk, FetchRequest, HeartbeatRequest, HeartbeatResponse, PollWorkRequest,
    PollWorkResponse, RegisterRequest, RegisterResponse, ReportResultRequest, ReportResultResponse,
};
use distbuild_proto::wire::LEADER_METADATA_KEY;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// What the fake coordinator has seen and will answer.
#[derive(Default)]
pub struct State {
    /// Source blobs it serves through FetchBlob.
    pub blobs: HashMap<Digest, Vec<u8>>,
    /// Assignments handed out by PollWork, in order.
    pub queue: VecDeque<Assignment>,
    /// Leases to revoke in the next heartbeat answers.
    pub revoke: HashSet<u64>,
    /// When set, every call is refused as "not the leader" naming it.
    pub leader: Option<String>,
    /// Tell the next poll to register again.
    pub reregister_next_poll: bool,
    pub registrations: Vec<RegisterRequest>,
    pub polls: Vec<PollWorkRequest>,
    pub heartbeats: Vec<HeartbeatRequest>,
    pub reports: Vec<ReportResultRequest>,
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
        let reregister = self.with(|s| {
            s.polls.push(request.clone());
            std::mem::take(&mut s.reregister_next_poll)
        });
        loop {
            let assignments: Vec<Assignment> = self.with(|s| {
                let n = (request.free_slots as usize).min(s.queue.len());
                s.queue.drain(..n).collect()
            });
            if !assignments.is_empty() || reregister || tokio::time::Instant::now() >= deadline {
                return Ok(Response::new(PollWorkResponse {
                    assignments,
                    reregister,
                }));
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
        let revoked_tokens = self.with(|s| {
            let revoked = request
                .lease_tokens
                .iter()
                .copied()
                .filter(|t| s.revoke.contains(t))
                .collect();
            s.heartbeats.push(request);
            revoked
        });
        Ok(Response::new(HeartbeatResponse {
            revoked_tokens,
            reregister: false,
        }))
    }

    async fn report_result(
        &self,
        request: Request<ReportResultRequest>,
    ) -> Result<Response<ReportResultResponse>, Status> {
        self.not_leader()?;
        self.with(|s| s.reports.push(request.into_inner()));
        Ok(Response::new(ReportResultResponse { accepted: true }))
    }

    async fn fetch_blob(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchBlobStream>, Status> {
        self.not_leader()?;
        let digest = Digest::try_from(&request.get_ref().digest[..])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let data = self.with(|s| {
            s.fetches += 1;
            s.blobs.get(&digest).cloned()
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
