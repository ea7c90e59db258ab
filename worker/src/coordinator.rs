//! The worker's client of the coordinators' `WorkerApi`: one typed method
//! per call, over the shared leader-following client
//! ([`distbuild_proto::leader`], which holds the retry, redirect and
//! backoff loop and documents what a call meets during a failover).
//!
//! The worker's choices: every attempt has a deadline; answers that say the
//! node failed the request (INTERNAL, RESOURCE_EXHAUSTED) are retried too,
//! for as long as the call's [`Persistence`] allows (a worker never gives up
//! on the cluster on its own); retries are logged as warnings (the first,
//! then every tenth). A retry sends the very same message, so it carries the
//! same `request_id` and the coordinators apply the call at most once.

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distbuild_proto::BlobKey;
use distbuild_proto::blob::file_chunks;
use distbuild_proto::leader::{self, Event, Failure, LeaderClient, Options};
use distbuild_proto::v1::worker_api_client::WorkerApiClient;
use distbuild_proto::v1::{
    BlobChunk, FetchRequest, HeartbeatRequest, HeartbeatResponse, LeaveRequest, LeaveResponse,
    PollWorkRequest, PollWorkResponse, RegisterRequest, RegisterResponse, ReportResultRequest,
    ReportResultResponse,
};
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::connect::{SharedConnector, worker_api_client};

pub use distbuild_proto::leader::{Backoff, Persistence};

/// Deadline of one attempt of a call that is not a long poll or a
/// heartbeat.
pub const UNARY_DEADLINE: Duration = Duration::from_secs(10);

/// Time every attempt of an upload may take, whatever its size.
pub const UPLOAD_BASE_DEADLINE: Duration = Duration::from_secs(60);

/// Slowest upload rate an attempt is given time for (added to
/// [`UPLOAD_BASE_DEADLINE`]) before it is abandoned and retried.
pub const MIN_UPLOAD_BYTES_PER_SEC: u64 = 1 << 20;

/// A call that keeps failing is logged at warning level on its first
/// failure and then once every this many attempts (debug otherwise).
const WARN_EVERY_ATTEMPTS: u32 = 10;

/// Why a call to the coordinators failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No coordinator address could be connected to.
    #[error("{what}: no coordinator reachable ({problems})")]
    Unreachable {
        /// The call attempted.
        what: &'static str,
        /// Why the last connection failed.
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

    fn from_call(what: &'static str, error: leader::CallError) -> Self {
        match error {
            leader::CallError::GaveUp {
                last: Failure::Connect(error),
                ..
            } => RpcError::Unreachable {
                what,
                problems: error.to_string(),
            },
            leader::CallError::GaveUp {
                last: Failure::Status { addr, status },
                ..
            }
            | leader::CallError::Rejected { addr, status } => {
                RpcError::Status { what, addr, status }
            }
        }
    }
}

/// Why [`CoordinatorClient::upload_blob`] failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The coordinators refused the blob or could not be reached.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The file could not be read here (or was shorter than its size): the
    /// local cause of an upload the coordinators then refused.
    #[error("read {path}: {problem}")]
    Read {
        /// The file uploaded.
        path: String,
        /// What went wrong.
        problem: String,
    },
}

/// The worker's log of its calls' retries and leader changes.
fn log_event(event: &Event<'_>) {
    match event {
        Event::Retrying {
            what,
            failures,
            failure,
        } => {
            if *failures == 1 || failures.is_multiple_of(WARN_EVERY_ATTEMPTS) {
                tracing::warn!(error = %failure, attempt = failures, "{what}: call failed; retrying");
            } else {
                tracing::debug!(error = %failure, attempt = failures, "{what}: call failed; retrying");
            }
        }
        Event::FollowingLeader { leader, .. } => {
            tracing::info!(coordinator = %leader, "following the leader");
        }
        Event::AnsweredAfterRetrying { what, failures } => {
            tracing::info!(attempts = failures + 1, "{what}: answered after retrying");
        }
    }
}

/// A client of the coordinators' `WorkerApi`. Cheap to share behind an
/// `Arc`; calls from several tasks share one connection.
pub struct CoordinatorClient {
    client: LeaderClient,
}

impl CoordinatorClient {
    /// A client of the coordinators at `addrs` (`HOST:PORT`, at least one),
    /// dialled through `connector`. Connects lazily, on the first call.
    pub fn new(addrs: Vec<String>, connector: SharedConnector) -> Self {
        let options = Options {
            retry_server_errors: true,
            observer: Some(Arc::new(log_event)),
        };
        Self {
            client: LeaderClient::new(addrs, connector, options),
        }
    }

    /// Runs `call` until it succeeds, a failure not worth retrying, or
    /// `persistence` says stop; each attempt within `deadline`. `call` must
    /// send the same message every time.
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
        self.client
            .call(what, persistence, Some(deadline), |channel| {
                let answer = call(worker_api_client(channel));
                async move { answer.await.map(tonic::Response::into_inner) }
            })
            .await
            .map(|(_, answer)| answer)
            .map_err(|error| RpcError::from_call(what, error))
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

    /// `Drain` (`leave` false) or `Deregister` (true), retried as
    /// `persistence` allows.
    pub async fn leave(
        &self,
        message: LeaveRequest,
        deregister: bool,
        persistence: Persistence,
    ) -> Result<LeaveResponse, RpcError> {
        let what = if deregister { "deregister" } else { "drain" };
        self.call(what, UNARY_DEADLINE, persistence, |mut client| {
            let request = Self::request(message.clone(), UNARY_DEADLINE);
            async move {
                if deregister {
                    client.deregister(request).await
                } else {
                    client.drain(request).await
                }
            }
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

    /// `UploadBlob`: stores blob `key` (`size` bytes, the content of the
    /// file at `path`) in the coordinators' CAS, retried through failovers
    /// as `persistence` allows, each attempt streaming the file again from
    /// its start within [`UPLOAD_BASE_DEADLINE`] plus a second per MiB.
    /// Returns once the coordinators acknowledge it (a quorum holds it).
    pub async fn upload_blob(
        &self,
        path: &Path,
        key: BlobKey,
        size: u64,
        persistence: Persistence,
    ) -> Result<(), UploadError> {
        let read_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let deadline = UPLOAD_BASE_DEADLINE + Duration::from_secs(size / MIN_UPLOAD_BYTES_PER_SEC);
        let result = self
            .call("upload a blob", deadline, persistence, |mut client| {
                let chunks = file_chunks(path.to_path_buf(), key, size, read_error.clone());
                let request = Self::request(chunks, deadline);
                async move { client.upload_blob(request).await }
            })
            .await;
        // A read failure ends the stream early and the coordinators refuse
        // the short blob; the local cause is the one worth reporting.
        let local = read_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        match (result, local) {
            (Ok(_), _) => Ok(()),
            (Err(_), Some(problem)) => Err(UploadError::Read {
                path: path.display().to_string(),
                problem,
            }),
            (Err(e), None) => Err(e.into()),
        }
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
