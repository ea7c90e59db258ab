//! Talking to the coordinators: one cached channel, RPC deadlines, retries
//! with bounded exponential backoff until `--timeout`, and following a
//! coordinator's "not the leader" answer to the leader it names.
//!
//! What a call can meet during a failover, and what happens:
//! - UNAVAILABLE with `distbuild-leader` metadata (a follower): the call is
//!   sent again at once to the leader it names;
//! - UNAVAILABLE without it (an election, a stopping node), a refused or
//!   timed-out connection, a broken or silent one (keepalive), no answer
//!   within the attempt's deadline: the next address is tried, and after
//!   every address failed once the client pauses ([`Backoff`]: 50 ms,
//!   doubling to 1 s) before the next round.
//!
//! A call gives up (exit 3) only after the cluster has failed it
//! continuously for the patience (`--timeout`), counted from the call's
//! start — which is after the last answer the client got.
//!
//! Every request the client sends is safe to repeat (lookups, content-
//! addressed uploads, a submit keyed by its request ID, membership changes
//! the commands check afterwards), so any failure that may be the network's
//! or an election's is retried.

use std::error::Error as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use distbuild_proto::wire::LEADER_METADATA_KEY;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::debug;

use crate::connect::{CONNECT_TIMEOUT, Connector};
use crate::exit_code;

/// Deadline of one unary RPC attempt (calls moving more data add time for
/// it). A dead or partitioned connection is caught sooner by keepalive; this
/// bounds a node that is connected but never answers (a leader that lost its
/// quorum, say).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// First pause after every coordinator failed once; doubles per round.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(50);

/// Longest pause between rounds of attempts.
pub const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// "Not the leader" answers followed in a row before backing off (an
/// election may be under way and the hints stale).
pub const MAX_LEADER_REDIRECTS: u32 = 5;

/// Shortest connection attempt, even when `--timeout` is nearly spent.
const MIN_CONNECT_ATTEMPT: Duration = Duration::from_millis(200);

/// Bounded exponential backoff: [`INITIAL_BACKOFF`], doubling up to
/// [`MAX_BACKOFF`].
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: INITIAL_BACKOFF,
        }
    }
}

impl Backoff {
    /// The pause to take now; the next one is twice as long (up to the
    /// bound).
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        pause
    }

    /// Starts again from the shortest pause (after a success).
    pub fn reset(&mut self) {
        self.next = INITIAL_BACKOFF;
    }
}

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
        Code::Ok => exit_code::OK,
        _ => exit_code::BUILD_FAILED,
    }
}

/// What to do after an error status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Try again (maybe another coordinator) after a backoff.
    Retry,
    /// Not the leader: try again at this address at once.
    Redirect(String),
    /// Give up and report it.
    Fatal,
}

/// Sorts an error status: the network's and elections' failures are
/// retried, a named leader is followed, the rest are final.
pub fn classify(status: &Status) -> Disposition {
    match status.code() {
        Code::Unavailable => match status
            .metadata()
            .get(LEADER_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            Some(leader) => Disposition::Redirect(leader.to_string()),
            None => Disposition::Retry,
        },
        Code::DeadlineExceeded | Code::Aborted | Code::Cancelled | Code::Unknown => {
            Disposition::Retry
        }
        // A status with a source was made on this side from a transport
        // error (a reset stream, a dropped connection), not sent by a server.
        Code::Internal if status.source().is_some() => Disposition::Retry,
        _ => Disposition::Fatal,
    }
}

/// A status as one line, with the transport error behind it if any.
pub fn describe(status: &Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = status.source();
    while let Some(err) = source {
        text.push_str(&format!(": {err}"));
        source = err.source();
    }
    one_line(&text)
}

/// `text` with line breaks replaced, for one-line error messages.
pub fn one_line(text: &str) -> String {
    text.trim().replace(['\n', '\r'], " ")
}

struct State {
    /// Index (modulo) of the next configured address to try.
    next: usize,
    /// The leader a coordinator named, tried before the configured list.
    leader: Option<String>,
    /// The open channel and its address.
    current: Option<(String, Channel)>,
}

struct Inner {
    connector: Connector,
    addrs: Vec<String>,
    patience: Duration,
    state: Mutex<State>,
}

/// The coordinators, as one retrying endpoint. Cheap to clone; clones share
/// the channel.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl Cluster {
    /// A cluster reached through `connector` at any of `addrs` (non-empty),
    /// retrying a call for up to `patience`.
    pub fn new(connector: Connector, addrs: Vec<String>, patience: Duration) -> Self {
        assert!(!addrs.is_empty(), "a cluster needs at least one address");
        Self {
            inner: Arc::new(Inner {
                connector,
                addrs,
                patience,
                state: Mutex::new(State {
                    next: 0,
                    leader: None,
                    current: None,
                }),
            }),
        }
    }

    /// How long a call keeps trying (`--timeout`).
    pub fn patience(&self) -> Duration {
        self.inner.patience
    }

    /// The connector, for connections to workers.
    pub fn connector(&self) -> &Connector {
        &self.inner.connector
    }

    /// The configured addresses, for messages.
    pub fn addrs_display(&self) -> String {
        self.inner.addrs.join(",")
    }

    /// The open channel, or a new one to the next candidate. Errors name the
    /// address tried.
    async fn channel(&self, deadline: Instant) -> Result<(String, Channel), String> {
        let mut state = self.inner.state.lock().await;
        if let Some(current) = &state.current {
            return Ok(current.clone());
        }
        let addr = match &state.leader {
            Some(leader) => leader.clone(),
            None => self.inner.addrs[state.next % self.inner.addrs.len()].clone(),
        };
        let attempt = deadline
            .saturating_duration_since(Instant::now())
            .clamp(MIN_CONNECT_ATTEMPT, CONNECT_TIMEOUT);
        let error = match tokio::time::timeout(attempt, self.inner.connector.connect(&addr)).await {
            Ok(Ok(channel)) => {
                state.current = Some((addr.clone(), channel.clone()));
                return Ok((addr, channel));
            }
            Ok(Err(e)) => {
                let mut text = e.to_string();
                let mut source = e.source();
                while let Some(err) = source {
                    text.push_str(&format!(": {err}"));
                    source = err.source();
                }
                format!("connect to {addr}: {}", one_line(&text))
            }
            Err(_) => format!("connect to {addr}: no connection within {attempt:?}"),
        };
        Self::move_on(&mut state, &self.inner.addrs, &addr);
        Err(error)
    }

    /// Forgets `addr` after a failure there, so the next attempt tries the
    /// next candidate.
    fn move_on(state: &mut State, addrs: &[String], addr: &str) {
        if state.current.as_ref().is_some_and(|(a, _)| a == addr) {
            state.current = None;
        }
        if state.leader.as_deref() == Some(addr) {
            // A leader named but not there: the node that named it (most
            // likely the current configured one) still believes in a dead
            // leader until its election timeout, so ask the next one rather
            // than be sent to the dead one again.
            state.leader = None;
            state.next = state.next.wrapping_add(1);
        } else if addrs[state.next % addrs.len()] == addr {
            state.next = state.next.wrapping_add(1);
        }
    }

    /// Notes a failure at `addr` (a broken channel, an unreachable node).
    pub async fn failed(&self, addr: &str) {
        let mut state = self.inner.state.lock().await;
        Self::move_on(&mut state, &self.inner.addrs, addr);
    }

    /// Follows a "not the leader" answer from `from` naming `leader`.
    pub async fn follow_leader(&self, from: &str, leader: &str) {
        let mut state = self.inner.state.lock().await;
        if state.current.as_ref().is_some_and(|(a, _)| a == from) {
            state.current = None;
        }
        state.leader = Some(leader.to_string());
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
        mut rpc: F,
    ) -> Result<(String, T), CallError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let started = Instant::now();
        let deadline = started + self.inner.patience;
        let mut backoff = Backoff::default();
        let mut redirects = 0u32;
        let mut failures = 0usize;
        loop {
            let error = match self.channel(deadline).await {
                Err(error) => error,
                Ok((addr, channel)) => {
                    let result = match rpc_timeout {
                        Some(limit) => tokio::time::timeout(limit, rpc(channel))
                            .await
                            .unwrap_or_else(|_| {
                                Err(Status::deadline_exceeded(format!(
                                    "no answer within {limit:?}"
                                )))
                            }),
                        None => rpc(channel).await,
                    };
                    let status = match result {
                        Ok(value) => return Ok((addr, value)),
                        Err(status) => status,
                    };
                    match classify(&status) {
                        Disposition::Redirect(leader) if redirects < MAX_LEADER_REDIRECTS => {
                            debug!(%addr, %leader, "{what}: not the leader; following");
                            redirects += 1;
                            self.follow_leader(&addr, &leader).await;
                            continue;
                        }
                        Disposition::Redirect(_) | Disposition::Retry => {
                            self.failed(&addr).await;
                            format!("{what} at {addr}: {}", describe(&status))
                        }
                        Disposition::Fatal => {
                            return Err(CallError::Rejected {
                                what: what.to_string(),
                                status,
                            });
                        }
                    }
                }
            };
            debug!("{what}: {error}; retrying");
            let now = Instant::now();
            if now >= deadline {
                return Err(CallError::Unreachable {
                    addrs: self.addrs_display(),
                    waited_secs: now.duration_since(started).as_secs(),
                    last_error: error,
                });
            }
            failures += 1;
            if failures.is_multiple_of(self.inner.addrs.len()) || redirects >= MAX_LEADER_REDIRECTS
            {
                tokio::time::sleep(backoff.next_pause().min(deadline - now)).await;
                redirects = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn failures_rotate_through_every_configured_address() {
        let addrs: Vec<String> = ["a:1", "b:1", "c:1"].map(String::from).to_vec();
        let mut state = State {
            next: 0,
            leader: None,
            current: None,
        };
        let candidate = |state: &State| {
            state
                .leader
                .clone()
                .unwrap_or_else(|| addrs[state.next % addrs.len()].clone())
        };
        let mut tried = Vec::new();
        for _ in 0..6 {
            let addr = candidate(&state);
            tried.push(addr.clone());
            if addr == "a:1" || addr == "b:1" {
                // A follower still naming the leader that died.
                state.leader = Some("dead:1".into());
                let addr = candidate(&state);
                tried.push(addr.clone());
                Cluster::move_on(&mut state, &addrs, &addr);
            } else {
                Cluster::move_on(&mut state, &addrs, &addr);
            }
        }
        assert_eq!(
            tried,
            [
                "a:1", "dead:1", "b:1", "dead:1", "c:1", "a:1", "dead:1", "b:1", "dead:1", "c:1"
            ]
        );
        // A failure elsewhere (another call's stale address) moves nothing.
        let before = state.next;
        Cluster::move_on(&mut state, &addrs, "z:1");
        assert_eq!(state.next, before);
    }

    #[test]
    fn backoff_doubles_up_to_its_bound_and_resets() {
        let mut backoff = Backoff::default();
        let pauses: Vec<u128> = (0..7).map(|_| backoff.next_pause().as_millis()).collect();
        assert_eq!(pauses, [50, 100, 200, 250, 250, 250, 250]);
        backoff.reset();
        assert_eq!(backoff.next_pause(), INITIAL_BACKOFF);
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
