//! The worker's client of the coordinators' `WorkerApi`: one current
//! coordinator at a time, chosen as the first address that answers, and
//! switched when a coordinator answers "not the leader" naming another.
//!
//! All retrying lives here. Every attempt has a deadline; a failure that
//! suggests the node cannot serve (UNAVAILABLE without a leader named, a
//! deadline, a broken connection) drops its channel and moves on to the next
//! configured address, and the call is retried with bounded exponential
//! backoff ([`Backoff`]) for as long as its [`Persistence`] allows. A retry
//! sends the very same message, so it carries the same `request_id` and the
//! coordinators apply the call at most once.

use std::future::Future;
use std::time::Duration;

use distbuild_proto::v1::worker_api_client::WorkerApiClient;
use distbuild_proto::v1::{
    BlobChunk, FetchRequest, HeartbeatRequest, HeartbeatResponse, PollWorkRequest,
    PollWorkResponse, RegisterRequest, RegisterResponse, ReportResultRequest, ReportResultResponse,
};
use distbuild_proto::wire::LEADER_METADATA_KEY;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::connect::{SharedConnector, worker_api_client};

/// How many "not the leader" redirects one attempt follows before it counts
/// as failed (the call's retries may follow more).
pub const MAX_LEADER_REDIRECTS: usize = 3;

/// Deadline of one attempt of a call that is not a long poll or a
/// heartbeat.
pub const UNARY_DEADLINE: Duration = Duration::from_secs(10);

/// First delay before retrying a failed call; it doubles on every further
/// failure up to [`MAX_RETRY_DELAY`].
pub const FIRST_RETRY_DELAY: Duration = Duration::from_millis(50);
/// Longest delay between two attempts of a call.
pub const MAX_RETRY_DELAY: Duration = Duration::from_millis(250);
/// A call that keeps failing is logged at warning level on its first
/// failure and then once every this many attempts (debug otherwise).
const WARN_EVERY_ATTEMPTS: u32 = 10;

/// Bounded exponential backoff with jitter: [`FIRST_RETRY_DELAY`] doubling
/// up to [`MAX_RETRY_DELAY`]; each delay is drawn from its upper half, so
/// workers that failed together do not retry in lockstep.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// A backoff before its first failure.
    pub fn new() -> Self {
        Self::default()
    }

    /// The longest delay the next call to [`Backoff::next_delay`] may
    /// return.
    pub fn ceiling(&self) -> Duration {
        FIRST_RETRY_DELAY
            .saturating_mul(1 << self.failures.min(16))
            .min(MAX_RETRY_DELAY)
    }

    /// The delay before the next attempt; counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        half + distbuild_proto::rng::duration_up_to(half)
    }

    /// Failures counted so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// How long a call keeps retrying failures worth retrying
/// ([`RpcError::worth_retrying`]); other failures end it at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Until some coordinator answers; the caller bounds it by dropping the
    /// future (shutdown, cancellation).
    UntilAnswered,
    /// Until some coordinator answers or this instant passes, then the last
    /// error.
    Until(Instant),
}

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

    /// Whether the same call may succeed when retried (on this or another
    /// coordinator): nothing reachable, no leader, a deadline, a broken
    /// connection, an overloaded or failing node. Refusals of the request
    /// itself (invalid, not found, ...) are not.
    pub fn worth_retrying(&self) -> bool {
        matches!(
            self.code(),
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Unknown
                | Code::Cancelled
                | Code::Aborted
                | Code::ResourceExhausted
                | Code::Internal
        )
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

    /// One attempt: runs `call` against the current coordinator within
    /// `deadline`, following "not the leader" answers a bounded number of
    /// times. A failure that suggests the node cannot serve drops its
    /// channel, so the next attempt goes to the next address.
    async fn attempt<T, F, Fut>(
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
                tracing::debug!(coordinator = %addr, code = ?status.code(), "dropping the connection; next address");
                self.forget(&addr).await;
            }
            return Err(RpcError::Status { what, addr, status });
        }
    }

    /// Runs `call` until it succeeds, a failure not worth retrying, or
    /// `persistence` says stop; each attempt within `deadline`, separated
    /// by [`Backoff`] delays. `call` must send the same message every time.
    async fn call<T, F, Fut>(
        &self,
        what: &'static str,
        deadline: Duration,
        persistence: Persistence,
        call: F,
    ) -> Result<T, RpcError>
    where
        F: Fn(WorkerApiClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut backoff = Backoff::new();
        loop {
            let error = match self.attempt(what, deadline, &call).await {
                Ok(response) => {
                    if backoff.failures() > 0 {
                        tracing::info!(
                            attempts = backoff.failures() + 1,
                            "{what}: answered after retrying"
                        );
                    }
                    return Ok(response);
                }
                Err(error) => error,
            };
            let delay = backoff.next_delay();
            let give_up = match persistence {
                Persistence::UntilAnswered => false,
                Persistence::Until(end) => Instant::now() + delay >= end,
            };
            if give_up || !error.worth_retrying() {
                return Err(error);
            }
            let attempt = backoff.failures();
            if attempt == 1 || attempt.is_multiple_of(WARN_EVERY_ATTEMPTS) {
                tracing::warn!(%error, attempt, "call failed; retrying");
            } else {
                tracing::debug!(%error, attempt, "call failed; retrying");
            }
            tokio::time::sleep(delay).await;
        }
    }

    fn request<M>(message: M, deadline: Duration) -> tonic::Request<M> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(deadline);
        request
    }

    /// `Register`, retried as `persistence` allows.
    pub async fn register(
        &self,
        message: RegisterRequest,
        persistence: Persistence,
    ) -> Result<RegisterResponse, RpcError> {
        self.call("register", UNARY_DEADLINE, persistence, |mut client| {
            let request = Self::request(message.clone(), UNARY_DEADLINE);
            async move { client.register(request).await }
        })
        .await
    }

    /// `PollWork`: a long poll; `deadline` (each attempt's) is its wait
    /// plus a margin.
    pub async fn poll_work(
        &self,
        message: PollWorkRequest,
        deadline: Duration,
        persistence: Persistence,
    ) -> Result<PollWorkResponse, RpcError> {
        self.call("poll for work", deadline, persistence, |mut client| {
            let request = Self::request(message.clone(), deadline);
            async move { client.poll_work(request).await }
        })
        .await
    }

    /// `Heartbeat`, each attempt within `deadline`.
    pub async fn heartbeat(
        &self,
        message: HeartbeatRequest,
        deadline: Duration,
        persistence: Persistence,
    ) -> Result<HeartbeatResponse, RpcError> {
        self.call("heartbeat", deadline, persistence, |mut client| {
            let request = Self::request(message.clone(), deadline);
            async move { client.heartbeat(request).await }
        })
        .await
    }

    /// `ReportResult`, retried as `persistence` allows.
    pub async fn report_result(
        &self,
        message: ReportResultRequest,
        persistence: Persistence,
    ) -> Result<ReportResultResponse, RpcError> {
        self.call(
            "report a result",
            UNARY_DEADLINE,
            persistence,
            |mut client| {
                let request = Self::request(message.clone(), UNARY_DEADLINE);
                async move { client.report_result(request).await }
            },
        )
        .await
    }

    /// `FetchBlob`: the stream of a source blob's chunks. `deadline` bounds
    /// each attempt's wait for the stream to start; callers bound each
    /// message.
    pub async fn fetch_blob(
        &self,
        message: FetchRequest,
        deadline: Duration,
        persistence: Persistence,
    ) -> Result<Streaming<BlobChunk>, RpcError> {
        self.call(
            "fetch a source blob",
            deadline,
            persistence,
            |mut client| {
                let request = tonic::Request::new(message.clone());
                async move { client.fetch_blob(request).await }
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_first_delay_to_a_cap() {
        let mut backoff = Backoff::new();
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay();
            assert!(
                delay <= ceiling && delay >= ceiling / 2,
                "{delay:?} within the upper half of {ceiling:?}"
            );
            ceilings.push(ceiling.as_millis());
        }
        assert_eq!(ceilings, [50, 100, 200, 250, 250, 250, 250, 250]);
        assert_eq!(backoff.failures(), 8);
    }

    #[test]
    fn what_is_worth_retrying() {
        let status = |code| RpcError::Status {
            what: "test",
            addr: "a:1".into(),
            status: Status::new(code, "x"),
        };
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Unknown] {
            assert!(status(code).worth_retrying(), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
        ] {
            assert!(!status(code).worth_retrying(), "{code:?}");
        }
        let unreachable = RpcError::Unreachable {
            what: "test",
            problems: String::new(),
        };
        assert!(unreachable.worth_retrying());
    }
}
