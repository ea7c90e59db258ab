//! One client of the coordinators that follows the leader, shared by the
//! command-line client and the worker: the retry, redirect and backoff
//! loop, written once.
//!
//! A [`LeaderClient`] holds one channel at a time, to the node it believes
//! can serve. What a call can meet, and what happens:
//! - UNAVAILABLE with `distbuild-leader` metadata (a follower naming the
//!   leader): the call is sent again at once to the node named, at most
//!   [`MAX_REDIRECTS`] times in a row (an election may be under way and
//!   the hints stale), then it counts as a failure;
//! - UNAVAILABLE without it (an election, a stopping node), a deadline, a
//!   cancelled, aborted or unknown answer, a broken connection, a refused or
//!   timed-out connect: the next address is tried. A leader that was named
//!   but cannot be reached is dropped and the *next* configured address is
//!   asked, not the one that named it (it would name the dead leader again
//!   until its election timeout);
//! - RESOURCE_EXHAUSTED with a `distbuild-retry-after-ms` hint (a limit
//!   that frees up by itself: a full staging area, too many watchers): the
//!   same node is asked again after the hinted pause (at most
//!   [`MAX_BUSY_PAUSE`]), until the call's [`Persistence`] ends;
//! - INTERNAL or RESOURCE_EXHAUSTED without a hint, sent by a node: final,
//!   or retried on the same node when [`Options::retry_server_errors`] says
//!   so (a worker that never gives up on the cluster);
//! - anything else: final ([`CallError::Rejected`]).
//!
//! After every address failed once (or a node failed without a reason to
//! leave it, or the redirects ran out) the call pauses ([`Backoff`]:
//! [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`], drawn from the upper half,
//! through [`crate::rng`] so a simulation stays deterministic), then goes
//! on until some node answers or its [`Persistence`] ends.
//!
//! A retry sends the very same message: callers build it once, with its
//! request ID ([`RequestIds`]), and the coordinators apply it at most once.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::net::{ConnectError, SharedConnector, one_line};
use crate::wire::{
    CONNECT_TIMEOUT, LEADER_METADATA_KEY, MAX_REQUEST_ID_CHARS, RETRY_AFTER_METADATA_KEY,
};

/// "Not the leader" answers followed in a row before the call counts as
/// failed and backs off. One is enough when the hint is right; a few more
/// ride through an election whose first hints are stale.
pub const MAX_REDIRECTS: u32 = 3;

/// The first pause of a failing call; it doubles per pause up to
/// [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);

/// The longest pause between two rounds of attempts.
pub const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// The longest pause a busy node's hint can ask for.
pub const MAX_BUSY_PAUSE: Duration = Duration::from_secs(5);

/// The shortest connection attempt, even when a call's patience is nearly
/// spent.
pub const MIN_CONNECT_ATTEMPT: Duration = Duration::from_millis(200);

/// Bounded exponential backoff with jitter: the ceiling starts at
/// [`BACKOFF_MIN`] and doubles per delay up to [`BACKOFF_MAX`]; each delay
/// is drawn from the ceiling's upper half, so callers that failed together
/// do not retry in lockstep.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// A backoff before its first failure.
    pub fn new() -> Self {
        Self::default()
    }

    /// The longest delay the next [`Backoff::next_delay`] may return.
    pub fn ceiling(&self) -> Duration {
        BACKOFF_MIN
            .saturating_mul(1 << self.failures.min(16))
            .min(BACKOFF_MAX)
    }

    /// The delay to take now (between half the ceiling and the ceiling);
    /// counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        half + crate::rng::duration_up_to(ceiling - half)
    }

    /// Delays taken so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Starts again from the shortest delay (after a success).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// What to do after an error status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Not the leader: send the call to this address at once.
    Redirect(String),
    /// The node cannot serve now (no leader, a deadline, a broken
    /// connection, ...): try the next address.
    NextNode,
    /// The node is at a limit that frees up by itself: ask it again after
    /// this pause (its hint, at most [`MAX_BUSY_PAUSE`]).
    Busy(Duration),
    /// The node failed the request itself (INTERNAL, RESOURCE_EXHAUSTED):
    /// final unless the client retries server errors.
    ServerError,
    /// A refusal retrying cannot change (invalid, not found, ...).
    Final,
}

/// The leader a "not the leader" answer names, if any.
pub fn leader_hint(status: &Status) -> Option<&str> {
    if status.code() != Code::Unavailable {
        return None;
    }
    let leader = status.metadata().get(LEADER_METADATA_KEY)?.to_str().ok()?;
    Some(leader.trim()).filter(|leader| !leader.is_empty())
}

/// The pause a RESOURCE_EXHAUSTED answer asks for before a retry, if it
/// says the limit frees up by itself.
pub fn retry_after(status: &Status) -> Option<Duration> {
    if status.code() != Code::ResourceExhausted {
        return None;
    }
    let millis: u64 = status
        .metadata()
        .get(RETRY_AFTER_METADATA_KEY)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_millis(millis).min(MAX_BUSY_PAUSE))
}

/// Sorts an error status (see the module documentation).
pub fn classify(status: &Status) -> Disposition {
    if let Some(leader) = leader_hint(status) {
        return Disposition::Redirect(leader.to_string());
    }
    if let Some(pause) = retry_after(status) {
        return Disposition::Busy(pause);
    }
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Cancelled
        | Code::Unknown => Disposition::NextNode,
        // A status with a source was made on this side from a transport
        // error (a reset stream, a dropped connection), not sent by a node.
        Code::Internal if std::error::Error::source(status).is_some() => Disposition::NextNode,
        Code::Internal | Code::ResourceExhausted => Disposition::ServerError,
        _ => Disposition::Final,
    }
}

/// A status as one line: its code, its message, and the transport error
/// behind it if any.
pub fn describe(status: &Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        text.push_str(&format!(": {err}"));
        source = err.source();
    }
    one_line(&text)
}

/// How long a call keeps trying while no node answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Until some node answers; the caller bounds it by dropping the future
    /// (shutdown, cancellation).
    UntilAnswered,
    /// Until some node answers or this instant passes, then
    /// [`CallError::GaveUp`] with the last failure.
    Until(Instant),
}

/// One failed attempt of a call.
#[derive(Debug)]
pub enum Failure {
    /// No connection to `addr` could be made.
    Connect(ConnectError),
    /// The node at `addr` answered with an error status.
    Status {
        /// The node.
        addr: String,
        /// Its answer.
        status: Status,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(error) => write!(f, "{error}"),
            Failure::Status { addr, status } => write!(f, "at {addr}: {}", describe(status)),
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No node answered before the call's [`Persistence`] ended.
    #[error("no answer within {waited:?}: {last}")]
    GaveUp {
        /// How long the call kept trying.
        waited: Duration,
        /// The last failure seen.
        last: Failure,
    },
    /// A node answered with an error that retrying cannot fix.
    #[error("refused at {addr}: {}", describe(.status))]
    Rejected {
        /// The node that answered.
        addr: String,
        /// Its answer.
        status: Status,
    },
}

/// What a call reports as it goes, for the caller's logs (a command-line
/// client keeps them quiet; a service warns).
#[derive(Debug)]
pub enum Event<'a> {
    /// An attempt failed and the call goes on.
    Retrying {
        /// The call, as its caller named it.
        what: &'a str,
        /// Failed attempts of this call so far (1 on the first).
        failures: u32,
        /// The attempt's failure.
        failure: &'a Failure,
    },
    /// A node answered "not the leader"; the call follows its hint.
    FollowingLeader {
        /// The call.
        what: &'a str,
        /// The node that answered.
        from: &'a str,
        /// The leader it named.
        leader: &'a str,
    },
    /// The call was answered after failing `failures` times.
    AnsweredAfterRetrying {
        /// The call.
        what: &'a str,
        /// Failed attempts before the answer.
        failures: u32,
    },
}

/// Receives a client's [`Event`]s.
pub type Observer = Arc<dyn Fn(&Event<'_>) + Send + Sync>;

/// How a [`LeaderClient`] treats what it meets.
#[derive(Clone, Default)]
pub struct Options {
    /// Retry INTERNAL and RESOURCE_EXHAUSTED answers (on the same node,
    /// after a backoff) instead of returning them.
    pub retry_server_errors: bool,
    /// Told of every retry, redirect and late answer.
    pub observer: Option<Observer>,
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("retry_server_errors", &self.retry_server_errors)
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

/// Which node the next attempt goes to.
#[derive(Debug, Default)]
struct Route {
    /// Index (modulo) of the next configured address to try.
    next: usize,
    /// A leader a node named, tried before the configured list.
    leader: Option<String>,
    /// The open channel and its address.
    current: Option<(String, Channel)>,
}

impl Route {
    /// The address to connect to when there is no channel.
    fn candidate(&self, addrs: &[String]) -> String {
        match &self.leader {
            Some(leader) => leader.clone(),
            None => addrs[self.next % addrs.len()].clone(),
        }
    }

    /// Forgets `addr` after a failure there, so the next attempt tries the
    /// next candidate. A failure at an address that is not the current
    /// candidate (another call's, on a channel since replaced) moves
    /// nothing.
    fn move_on(&mut self, addrs: &[String], addr: &str) {
        if self.current.as_ref().is_some_and(|(a, _)| a == addr) {
            self.current = None;
        }
        if self.leader.as_deref() == Some(addr) {
            // A leader named but not there: the node that named it (most
            // likely the current configured one) still believes in a dead
            // leader until its election timeout, so ask the next one rather
            // than be sent to the dead one again.
            self.leader = None;
            self.next = self.next.wrapping_add(1);
        } else if addrs[self.next % addrs.len()] == addr {
            self.next = self.next.wrapping_add(1);
        }
    }

    /// Follows a "not the leader" answer from `from` naming `leader`.
    fn follow(&mut self, from: &str, leader: &str) {
        if self.current.as_ref().is_some_and(|(a, _)| a == from) {
            self.current = None;
        }
        self.leader = Some(leader.to_string());
    }
}

struct Inner {
    addrs: Vec<String>,
    connector: SharedConnector,
    options: Options,
    route: Mutex<Route>,
}

/// The coordinators, as one endpoint that follows the leader. Cheap to
/// clone; clones share the channel and what was learned about the leader.
#[derive(Clone)]
pub struct LeaderClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for LeaderClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderClient")
            .field("addrs", &self.inner.addrs)
            .field("options", &self.inner.options)
            .finish()
    }
}

impl LeaderClient {
    /// A client of the coordinators at `addrs` (at least one), dialled
    /// through `connector`. Connects on the first call.
    pub fn new(addrs: Vec<String>, connector: SharedConnector, options: Options) -> Self {
        assert!(!addrs.is_empty(), "at least one coordinator address");
        Self {
            inner: Arc::new(Inner {
                addrs,
                connector,
                options,
                route: Mutex::new(Route::default()),
            }),
        }
    }

    /// The configured addresses.
    pub fn addrs(&self) -> &[String] {
        &self.inner.addrs
    }

    /// The connector, for connections elsewhere (workers, peers).
    pub fn connector(&self) -> &SharedConnector {
        &self.inner.connector
    }

    fn observe(&self, event: Event<'_>) {
        if let Some(observer) = &self.inner.options.observer {
            observer(&event);
        }
    }

    /// The open channel, or a new one to the next candidate (within the
    /// time left before `deadline`, if any). A failed connect moves on.
    async fn channel(&self, deadline: Option<Instant>) -> Result<(String, Channel), ConnectError> {
        let mut route = self.inner.route.lock().await;
        if let Some(current) = &route.current {
            return Ok(current.clone());
        }
        let addr = route.candidate(&self.inner.addrs);
        let attempt = match deadline {
            Some(deadline) => deadline
                .saturating_duration_since(Instant::now())
                .clamp(MIN_CONNECT_ATTEMPT, CONNECT_TIMEOUT),
            None => CONNECT_TIMEOUT,
        };
        let error = match tokio::time::timeout(attempt, self.inner.connector.connect(&addr)).await {
            Ok(Ok(channel)) => {
                route.current = Some((addr.clone(), channel.clone()));
                return Ok((addr, channel));
            }
            Ok(Err(error)) => error,
            Err(_) => ConnectError::other(&addr, format!("no connection within {attempt:?}")),
        };
        route.move_on(&self.inner.addrs, &addr);
        Err(error)
    }

    /// Notes a failure at `addr` (a broken stream, a node that stopped
    /// answering), so the next attempt connects afresh to the next
    /// candidate.
    pub async fn failed(&self, addr: &str) {
        let mut route = self.inner.route.lock().await;
        route.move_on(&self.inner.addrs, addr);
    }

    /// Follows a "not the leader" answer from `from` naming `leader`.
    pub async fn follow_leader(&self, from: &str, leader: &str) {
        let mut route = self.inner.route.lock().await;
        route.follow(from, leader);
    }

    /// Runs `rpc` on a channel to the cluster until a node answers it,
    /// refuses it for good, or `persistence` ends. Each attempt gets
    /// `attempt_timeout` (none for calls bounded otherwise); `what` names
    /// the call for the [`Options::observer`]. Returns the answering node's
    /// address (to report a later failure of a stream it opened with
    /// [`LeaderClient::failed`]) and the answer. `rpc` must send the same
    /// message every time.
    pub async fn call<T, F, Fut>(
        &self,
        what: &str,
        persistence: Persistence,
        attempt_timeout: Option<Duration>,
        mut rpc: F,
    ) -> Result<(String, T), CallError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let started = Instant::now();
        let deadline = match persistence {
            Persistence::UntilAnswered => None,
            Persistence::Until(end) => Some(end),
        };
        let mut backoff = Backoff::new();
        let mut failures = 0u32;
        // Since the last pause: redirects followed, and failures that
        // moved on to the next node.
        let mut redirects = 0u32;
        let mut moved_on = 0usize;
        loop {
            // Set when the node asked for a pause before the next attempt.
            let mut busy_pause = None;
            let (failure, left_node) = match self.channel(deadline).await {
                // Certificates refused: no node will take them.
                Err(error) if error.denied => {
                    return Err(CallError::Rejected {
                        status: Status::unauthenticated(error.problem),
                        addr: error.addr,
                    });
                }
                Err(error) => (Failure::Connect(error), true),
                Ok((addr, channel)) => {
                    let result = match attempt_timeout {
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
                        Ok(answer) => {
                            if failures > 0 {
                                self.observe(Event::AnsweredAfterRetrying { what, failures });
                            }
                            return Ok((addr, answer));
                        }
                        Err(status) => status,
                    };
                    // A TLS 1.3 server refuses a certificate after the
                    // handshake looked done: the first call fails with it.
                    if let Some(refused) = crate::tls::refusal(&status) {
                        self.failed(&addr).await;
                        return Err(CallError::Rejected {
                            addr,
                            status: Status::unauthenticated(format!(
                                "TLS handshake refused: {refused}"
                            )),
                        });
                    }
                    match classify(&status) {
                        // A node naming itself names no other leader.
                        Disposition::Redirect(leader)
                            if leader != addr && redirects < MAX_REDIRECTS =>
                        {
                            redirects += 1;
                            self.observe(Event::FollowingLeader {
                                what,
                                from: &addr,
                                leader: &leader,
                            });
                            self.follow_leader(&addr, &leader).await;
                            continue;
                        }
                        Disposition::Redirect(_) | Disposition::NextNode => {
                            self.failed(&addr).await;
                            (Failure::Status { addr, status }, true)
                        }
                        Disposition::Busy(pause) => {
                            busy_pause = Some(pause);
                            (Failure::Status { addr, status }, false)
                        }
                        Disposition::ServerError if self.inner.options.retry_server_errors => {
                            (Failure::Status { addr, status }, false)
                        }
                        Disposition::ServerError | Disposition::Final => {
                            return Err(CallError::Rejected { addr, status });
                        }
                    }
                }
            };
            let now = Instant::now();
            if deadline.is_some_and(|deadline| now >= deadline) {
                return Err(CallError::GaveUp {
                    waited: now.duration_since(started),
                    last: failure,
                });
            }
            failures += 1;
            self.observe(Event::Retrying {
                what,
                failures,
                failure: &failure,
            });
            if left_node {
                moved_on += 1;
            }
            if !left_node || moved_on >= self.inner.addrs.len() || redirects >= MAX_REDIRECTS {
                let mut pause = backoff.next_delay().max(busy_pause.unwrap_or_default());
                if let Some(deadline) = deadline {
                    pause = pause.min(deadline - now);
                }
                tokio::time::sleep(pause).await;
                moved_on = 0;
                redirects = 0;
            }
        }
    }
}

/// Names a caller's state-changing calls for the coordinators' at-most-once
/// application: `<name>-<random per instance>-<kind><counter>`. A call
/// takes one ID and every retry of it sends the same; the random part
/// keeps a restarted caller (same name, counter from one) from reusing an
/// ID the coordinators still remember.
#[derive(Debug)]
pub struct RequestIds {
    prefix: String,
    counter: AtomicU64,
}

impl RequestIds {
    /// IDs for the caller named `name` (a worker ID), unique to this
    /// instance.
    pub fn new(name: &str) -> Self {
        Self {
            prefix: format!("{name}-{:016x}", crate::rng::next_u64()),
            counter: AtomicU64::new(1),
        }
    }

    /// A fresh ID for one logical call of `kind` (a short word).
    pub fn next(&self, kind: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{kind}{n}", self.prefix);
        debug_assert!(
            id.len() <= MAX_REQUEST_ID_CHARS,
            "request ID too long: {id}"
        );
        id
    }
}

/// A fresh random request ID (32 hex characters) for a one-off call, such
/// as a client's submit; its retries send the same.
pub fn one_off_request_id() -> String {
    format!("{:032x}", crate::rng::next_u128())
}

#[cfg(test)]
mod tests;
