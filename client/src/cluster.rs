//! Talking to the coordinators: the client's side of the shared
//! leader-following client ([`distbuild_proto::leader`], which holds the
//! retry, redirect and backoff loop and documents what a call meets during
//! a failover), with the client's patience, messages and exit codes.
//!
//! A call gives up (exit 3) only after the cluster has failed it
//! continuously for the patience (`--timeout`), counted from the call's
//! start — which is after the last answer the client got. Between rounds
//! of attempts it pauses 50 ms doubling to 250 ms (jittered).
//!
//! Every request the client sends is safe to repeat (lookups, content-
//! addressed uploads, a submit keyed by its request ID, membership changes
//! the commands check afterwards), so any failure that may be the network's
//! or an election's is retried.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use distbuild_proto::leader::{self, Event, Failure, LeaderClient, Options, Persistence};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::debug;

use crate::connect::Connector;
use crate::exit_code;

pub use distbuild_proto::leader::{Backoff, describe};
pub use distbuild_proto::net::one_line;

/// Deadline of one unary RPC attempt (calls moving more data add time for
/// it). A dead or partitioned connection is caught sooner by keepalive; this
/// bounds a node that is connected but never answers (a leader that lost its
/// quorum, say).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call to the cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No coordinator answered within the patience (`--timeout`).
    #[error("could not reach the cluster at {addrs} within {waited_secs}s: {last_error}")]
    Unreachable {
        /// The addresses tried, comma-separated.
        addrs: String,
        /// How long it kept trying.
        waited_secs: u64,
        /// The last failure seen.
        last_error: String,
    },
    /// A coordinator answered with an error that retrying cannot fix.
    #[error("{what}: {}", one_line(.status.message()))]
    Rejected {
        /// The call, as "submit the build".
        what: String,
        /// The coordinator's answer.
        status: Status,
    },
}

impl CallError {
    /// The process exit code this failure means.
    pub fn exit_code(&self) -> i32 {
        match self {
            CallError::Unreachable { .. } => exit_code::UNREACHABLE,
            CallError::Rejected { status, .. } => exit_code_for_status(status.code()),
        }
    }
}

/// Exit code for a final (non-retried) error status from a coordinator:
/// refusals of the request itself are bad input (2), anything else a failed
/// build (1).
pub fn exit_code_for_status(code: Code) -> i32 {
    match code {
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::ResourceExhausted => exit_code::BAD_INPUT,
        Code::Unauthenticated | Code::PermissionDenied => exit_code::DENIED,
        Code::Ok => exit_code::OK,
        _ => exit_code::BUILD_FAILED,
    }
}

/// What the client does after an error status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Try again (maybe another coordinator) after a backoff.
    Retry,
    /// Not the leader: try again at this address at once.
    Redirect(String),
    /// The node is at a limit that frees up by itself: try it again after
    /// this pause.
    Busy(std::time::Duration),
    /// Give up and report it.
    Fatal,
}

/// Sorts an error status as [`leader::classify`] does; a server error
/// (INTERNAL, RESOURCE_EXHAUSTED) is final for the client, which reports it
/// rather than retry it.
pub fn classify(status: &Status) -> Disposition {
    match leader::classify(status) {
        leader::Disposition::Redirect(leader) => Disposition::Redirect(leader),
        leader::Disposition::NextNode => Disposition::Retry,
        leader::Disposition::Busy(pause) => Disposition::Busy(pause),
        leader::Disposition::ServerError | leader::Disposition::Final => Disposition::Fatal,
    }
}

/// The client's retries are its own business: logged at debug level, so
/// the user's terminal shows only the outcome.
fn log_event(event: &Event<'_>) {
    match event {
        Event::Retrying { what, failure, .. } => debug!("{what}: {failure}; retrying"),
        Event::FollowingLeader { what, from, leader } => {
            debug!(addr = %from, %leader, "{what}: not the leader; following");
        }
        Event::AnsweredAfterRetrying { what, failures } => {
            debug!(failures, "{what}: answered after retrying");
        }
    }
}

/// The coordinators, as one retrying endpoint. Cheap to clone; clones share
/// the channel.
#[derive(Clone)]
pub struct Cluster {
    client: LeaderClient,
    connector: Connector,
    patience: Duration,
}

impl Cluster {
    /// A cluster reached through `connector` at any of `addrs` (non-empty),
    /// retrying a call for up to `patience`.
    pub fn new(connector: Connector, addrs: Vec<String>, patience: Duration) -> Self {
        assert!(!addrs.is_empty(), "a cluster needs at least one address");
        let options = Options {
            retry_server_errors: false,
            observer: Some(Arc::new(log_event)),
        };
        Self {
            client: LeaderClient::new(addrs, connector.shared(), options),
            connector,
            patience,
        }
    }

    /// How long a call keeps trying (`--timeout`).
    pub fn patience(&self) -> Duration {
        self.patience
    }

    /// The connector, for connections to workers.
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// The configured addresses, for messages.
    pub fn addrs_display(&self) -> String {
        self.client.addrs().join(",")
    }

    /// Notes a failure at `addr` (a broken channel, an unreachable node).
    pub async fn failed(&self, addr: &str) {
        self.client.failed(addr).await;
    }

    /// Follows a "not the leader" answer from `from` naming `leader`.
    pub async fn follow_leader(&self, from: &str, leader: &str) {
        self.client.follow_leader(from, leader).await;
    }

    /// Runs `rpc` on a channel to the cluster until it succeeds, fails for
    /// good, or `patience` has passed since the first attempt. Each attempt
    /// gets `rpc_timeout` (none for streams bounded by other means). `what`
    /// names the call in errors ("submit the build").
    pub async fn call<T, F, Fut>(
        &self,
        what: &str,
        rpc_timeout: Option<Duration>,
        rpc: F,
    ) -> Result<T, CallError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        Ok(self.call_at(what, rpc_timeout, rpc).await?.1)
    }

    /// [`Cluster::call`], also returning the address that answered (to
    /// report a later failure of a stream it opened with
    /// [`Cluster::failed`]).
    pub async fn call_at<T, F, Fut>(
        &self,
        what: &str,
        rpc_timeout: Option<Duration>,
        rpc: F,
    ) -> Result<(String, T), CallError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let persistence = Persistence::Until(Instant::now() + self.patience);
        self.client
            .call(what, persistence, rpc_timeout, rpc)
            .await
            .map_err(|error| match error {
                leader::CallError::Rejected { status, .. } => CallError::Rejected {
                    what: what.to_string(),
                    status,
                },
                leader::CallError::GaveUp { waited, last } => CallError::Unreachable {
                    addrs: self.addrs_display(),
                    waited_secs: waited.as_secs(),
                    last_error: match last {
                        Failure::Connect(error) => error.to_string(),
                        Failure::Status { addr, status } => {
                            format!("{what} at {addr}: {}", describe(&status))
                        }
                    },
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distbuild_proto::wire::LEADER_METADATA_KEY;
    use tonic::metadata::MetadataValue;

    #[test]
    fn statuses_are_classified() {
        let mut redirect = Status::unavailable("not the leader");
        redirect.metadata_mut().insert(
            LEADER_METADATA_KEY,
            MetadataValue::from_static("10.0.0.2:7000"),
        );
        let cases: Vec<(Status, Disposition, i32)> = vec![
            (
                redirect,
                Disposition::Redirect("10.0.0.2:7000".into()),
                exit_code::BUILD_FAILED,
            ),
            (
                Status::unavailable("election"),
                Disposition::Retry,
                exit_code::BUILD_FAILED,
            ),
            (
                Status::deadline_exceeded("slow"),
                Disposition::Retry,
                exit_code::BUILD_FAILED,
            ),
            (
                Status::invalid_argument("job x: bad"),
                Disposition::Fatal,
                exit_code::BAD_INPUT,
            ),
            (
                Status::failed_precondition("source missing"),
                Disposition::Fatal,
                exit_code::BAD_INPUT,
            ),
            (
                Status::resource_exhausted("message too large"),
                Disposition::Fatal,
                exit_code::BAD_INPUT,
            ),
            (
                Status::not_found("no build 7"),
                Disposition::Fatal,
                exit_code::BUILD_FAILED,
            ),
            (
                Status::internal("bug"),
                Disposition::Fatal,
                exit_code::BUILD_FAILED,
            ),
            (
                Status::from_error(Box::new(std::io::Error::other("reset"))),
                Disposition::Retry,
                exit_code::BUILD_FAILED,
            ),
        ];
        for (status, disposition, code) in cases {
            assert_eq!(classify(&status), disposition, "{status:?}");
            assert_eq!(exit_code_for_status(status.code()), code, "{status:?}");
        }
        let unreachable = CallError::Unreachable {
            addrs: "a:1".into(),
            waited_secs: 1,
            last_error: "refused".into(),
        };
        assert_eq!(unreachable.exit_code(), exit_code::UNREACHABLE);
    }

    #[test]
    fn descriptions_are_one_line() {
        let status = Status::invalid_argument("line one\nline two");
        assert_eq!(describe(&status), "InvalidArgument: line one line two");
        let rejected = CallError::Rejected {
            what: "submit the build".into(),
            status,
        };
        assert_eq!(rejected.to_string(), "submit the build: line one line two");
    }
}
