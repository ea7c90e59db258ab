//! The worker's client of the coordinators' `WorkerApi`: one current
//! coordinator at a time, chosen as the first address that answers, and
//! switched when a coordinator answers "not the leader" naming another.

use std::future::Future;
use std::time::Duration;

use distbuild_proto::v1::worker_api_client::WorkerApiClient;
use distbuild_proto::v1::{
    BlobChunk, FetchRequest, HeartbeatRequest, HeartbeatResponse, PollWorkRequest,
    PollWorkResponse, RegisterRequest, RegisterResponse, ReportResultRequest, ReportResultResponse,
};
use distbuild_proto::wire::LEADER_METADATA_KEY;
use tokio::sync::Mutex;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::connect::{SharedConnector, worker_api_client};

/// How many "not the leader" redirects one call follows before giving up.
pub const MAX_LEADER_REDIRECTS: usize = 3;

/// Deadline of a call that is not a long poll or a heartbeat.
pub const UNARY_DEADLINE: Duration = Duration::from_secs(10);

/// Why a call to the coordinators failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No coordinator address could be connected to.
    #[error("{what}: no coordinator reachable ({problems})")]
    Unreachable {
        /// The call attempted.
        what: &'static str,
        /// Why each address failed.
        problems: String,
    },
    /// A coordinator answered with an error status.
    #[error("{what} at {addr}: {}: {}", .status.code(), .status.message())]
    Status {
        /// The call attempted.
        what: &'static str,
        /// The coordinator that answered.
        addr: String,
        /// Its answer.
        status: Status,
    },
}

impl RpcError {
    /// The gRPC status code, `UNAVAILABLE` when nothing was reachable.
    pub fn code(&self) -> Code {
        match self {
            Self::Unreachable { .. } => Code::Unavailable,
            Self::Status { status, .. } => status.code(),
        }
    }
}

struct Current {
    /// Where the next call goes.
    addr: String,
    /// Position in the configured list of the address tried last, so a
    /// failure moves on to the next one.
    position: usize,
    channel: Option<Channel>,
}

/// A client of the coordinators' `WorkerApi`. Cheap to share behind an
/// `Arc`; calls from several tasks share one connection.
pub struct CoordinatorClient {
    addrs: Vec<String>,
    connector: SharedConnector,
    current: Mutex<Current>,
}

/// The leader's address named by a "not the leader" answer.
fn leader_of(status: &Status) -> Option<String> {
    if status.code() != Code::Unavailable {
        return None;
    }
    let leader = status.metadata().get(LEADER_METADATA_KEY)?.to_str().ok()?;
    let leader = leader.trim();
    (!leader.is_empty()).then(|| leader.to_string())
}

/// Whether a failure suggests the connection (not the request) is bad, so
/// the next call should connect afresh, to the next address.
fn connection_suspect(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    )
}

impl CoordinatorClient {
    /// A client of the coordinators at `addrs` (`HOST:PORT`, at least one),
    /// dialled through `connector`. Connects lazily, on the first call.
    pub fn new(addrs: Vec<String>, connector: SharedConnector) -> Self {
        assert!(!addrs.is_empty(), "at least one coordinator address");
        let first = addrs[0].clone();
        Self {
            addrs,
            connector,
            current: Mutex::new(Current {
                addr: first,
                position: 0,
                channel: None,
            }),
        }
    }

    /// The current coordinator's address and a channel to it, connecting
    /// (trying every configured address once, from the current one) when
    /// there is none.
    async fn channel(&self, what: &'static str) -> Result<(String, Channel), RpcError> {
        let mut current = self.current.lock().await;
        if let Some(channel) = &current.channel {
            return Ok((current.addr.clone(), channel.clone()));
        }
        let mut problems = Vec::new();
        // The current address first (it may be a leader we were sent to),
        // then the configured ones in order from where we were.
        let mut candidates = vec![current.addr.clone()];
        for i in 0..self.addrs.len() {
            let addr = &self.addrs[(current.position + i) % self.addrs.len()];
            if !candidates.contains(addr) {
                candidates.push(addr.clone());
            }
        }
        for addr in candidates {
            match self.connector.connect(&addr).await {
                Ok(channel) => {
                    tracing::debug!(coordinator = %addr, "connected");
                    if let Some(position) = self.addrs.iter().position(|a| *a == addr) {
                        current.position = position;
                    }
                    current.addr = addr.clone();
                    current.channel = Some(channel.clone());
                    return Ok((addr, channel));
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        // Start from the next configured address next time.
        current.position = (current.position + 1) % self.addrs.len();
        current.addr = self.addrs[current.position].clone();
        Err(RpcError::Unreachable {
            what,
            problems: problems.join("; "),
        })
    }

    /// Forgets the connection to `addr` (if still current) and moves on to
    /// the next configured address.
    async fn forget(&self, addr: &str) {
        let mut current = self.current.lock().await;
        if current.addr == addr {
            current.channel = None;
            current.position = (current.position + 1) % self.addrs.len();
            current.addr = self.addrs[current.position].clone();
        }
    }

    /// Sends the next calls to `leader`.
    async fn switch_to(&self, leader: String) {
        let mut current = self.current.lock().await;
        if current.addr != leader {
            tracing::info!(coordinator = %leader, "following the leader");
            current.addr = leader;
            current.channel = None;
        }
    }

    /// Runs `call` against the current coordinator within `deadline`,
    /// following "not the leader" answers a bounded number of times.
    async fn call<T, F, Fut>(
        &self,
        what: &'static str,
        deadline: Duration,
        call: F,
    ) -> Result<T, RpcError>
    where
        F: Fn(WorkerApiClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut redirects = 0;
        loop {
            let (addr, channel) = self.channel(what).await?;
            // The deadline is enforced here too: the request's grpc-timeout
            // only tells the server.
            let result =
                match tokio::time::timeout(deadline, call(worker_api_client(channel))).await {
                    Ok(result) => result,
                    Err(_) => Err(Status::deadline_exceeded(format!(
                        "no answer within {} ms",
                        deadline.as_millis()
                    ))),
                };
            let status = match result {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            if let Some(leader) = leader_of(&status)
                && leader != addr
                && redirects < MAX_LEADER_REDIRECTS
            {
                redirects += 1;
                self.switch_to(leader).await;
                continue;
            }
            if connection_suspect(status.code()) {
                self.forget(&addr).await;
            }
            return Err(RpcError::Status { what, addr, status });
        }
    }

    fn request<M>(message: M, deadline: Duration) -> tonic::Request<M> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(deadline);
        request
    }

    /// `Register`.
    pub async fn register(&self, message: RegisterRequest) -> Result<RegisterResponse, RpcError> {
        self.call("register", UNARY_DEADLINE, |mut client| {
            let request = Self::request(message.clone(), UNARY_DEADLINE);
            async move { client.register(request).await }
        })
        .await
    }

    /// `PollWork`: a long poll; the deadline is its wait plus a margin.
    pub async fn poll_work(
        &self,
        message: PollWorkRequest,
        deadline: Duration,
    ) -> Result<PollWorkResponse, RpcError> {
        self.call("poll for work", deadline, |mut client| {
            let request = Self::request(message.clone(), deadline);
            async move { client.poll_work(request).await }
        })
        .await
    }

    /// `Heartbeat`, within `deadline`.
    pub async fn heartbeat(
        &self,
        message: HeartbeatRequest,
        deadline: Duration,
    ) -> Result<HeartbeatResponse, RpcError> {
        self.call("heartbeat", deadline, |mut client| {
            let request = Self::request(message.clone(), deadline);
            async move { client.heartbeat(request).await }
        })
        .await
    }

    /// `ReportResult`, once (callers retry).
    pub async fn report_result(
        &self,
        message: ReportResultRequest,
    ) -> Result<ReportResultResponse, RpcError> {
        self.call("report a result", UNARY_DEADLINE, |mut client| {
            let request = Self::request(message.clone(), UNARY_DEADLINE);
            async move { client.report_result(request).await }
        })
        .await
    }

    /// `FetchBlob`: the stream of a source blob's chunks. `deadline` bounds
    /// the wait for the stream to start; callers bound each message.
    pub async fn fetch_blob(
        &self,
        message: FetchRequest,
        deadline: Duration,
    ) -> Result<Streaming<BlobChunk>, RpcError> {
        self.call("fetch a source blob", deadline, |mut client| {
            let request = tonic::Request::new(message.clone());
            async move { client.fetch_blob(request).await }
        })
        .await
    }
}
