//! The leader-following client: its backoff, its sorting of answers, its
//! rotation through addresses, and calls against fake coordinators on
//! 127.0.0.1 (hints followed and bounded, a dead hint left for the next
//! address, server errors, giving up).

use std::collections::VecDeque;
use std::sync::Mutex as StdMutex;

use tonic::metadata::MetadataValue;
use tonic::{Request, Response};

use super::*;
use crate::net::{TcpConnector, admin_api};
use crate::v1::admin_api_server::{AdminApi, AdminApiServer};
use crate::v1::{
    AddNodeRequest, ChangeMembershipResponse, ClusterStatusRequest, ClusterStatusResponse,
    RemoveNodeRequest,
};

// Moved here with the backoff, from the worker (as it was) and the client
// (its exact pauses became ceilings when the client adopted the jitter).
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
fn backoff_resets_and_stays_at_its_bound() {
    let mut backoff = Backoff::new();
    for _ in 0..100 {
        backoff.next_delay();
    }
    assert_eq!(
        backoff.ceiling(),
        BACKOFF_MAX,
        "no overflow far past the bound"
    );
    backoff.reset();
    assert_eq!(backoff.ceiling(), BACKOFF_MIN);
}

#[test]
fn the_jitter_comes_from_the_randomness_seam() {
    let delays = |seed| {
        std::thread::spawn(move || {
            crate::rng::seed_this_thread(seed);
            let mut backoff = Backoff::new();
            (0..6).map(|_| backoff.next_delay()).collect::<Vec<_>>()
        })
        .join()
        .expect("thread")
    };
    assert_eq!(delays(3), delays(3), "one seed, one run");
    assert_ne!(delays(3), delays(4), "the delays are drawn, not fixed");
}

fn not_leader(leader: &str) -> Status {
    let mut status = Status::unavailable("not the leader");
    status.metadata_mut().insert(
        LEADER_METADATA_KEY,
        MetadataValue::try_from(leader).expect("ascii address"),
    );
    status
}

/// RESOURCE_EXHAUSTED with a retry hint of `millis`.
fn busy(millis: &str) -> Status {
    let mut status = Status::resource_exhausted("busy");
    status.metadata_mut().insert(
        RETRY_AFTER_METADATA_KEY,
        MetadataValue::try_from(millis).expect("ascii"),
    );
    status
}

#[test]
fn statuses_are_classified() {
    let cases: Vec<(Status, Disposition)> = vec![
        (
            not_leader(" 10.0.0.2:7000 "),
            Disposition::Redirect("10.0.0.2:7000".into()),
        ),
        (not_leader(""), Disposition::NextNode),
        (Status::unavailable("election"), Disposition::NextNode),
        (Status::deadline_exceeded("slow"), Disposition::NextNode),
        (
            Status::aborted("staged submit dropped"),
            Disposition::NextNode,
        ),
        (Status::cancelled("reset"), Disposition::NextNode),
        (Status::unknown("?"), Disposition::NextNode),
        (
            Status::from_error(Box::new(std::io::Error::other("reset"))),
            Disposition::NextNode,
        ),
        (Status::internal("bug"), Disposition::ServerError),
        (Status::resource_exhausted("full"), Disposition::ServerError),
        (busy("250"), Disposition::Busy(Duration::from_millis(250))),
        (busy("3600000"), Disposition::Busy(MAX_BUSY_PAUSE)),
        (busy("soon"), Disposition::ServerError),
        (Status::invalid_argument("job x: bad"), Disposition::Final),
        (Status::failed_precondition("missing"), Disposition::Final),
        (Status::not_found("no build 7"), Disposition::Final),
        (Status::already_exists("node 4"), Disposition::Final),
    ];
    for (status, disposition) in cases {
        assert_eq!(classify(&status), disposition, "{status:?}");
    }
    // A hint only counts on UNAVAILABLE.
    let mut refused = Status::invalid_argument("bad");
    refused
        .metadata_mut()
        .insert(LEADER_METADATA_KEY, MetadataValue::from_static("h:1"));
    assert_eq!(leader_hint(&refused), None);
}

#[test]
fn descriptions_are_one_line() {
    let status = Status::invalid_argument("line one\nline two");
    assert_eq!(describe(&status), "InvalidArgument: line one line two");
    let broken = Status::from_error(Box::new(std::io::Error::other("connection reset")));
    assert!(
        describe(&broken).ends_with(": connection reset"),
        "{}",
        describe(&broken)
    );
}

#[test]
fn failures_rotate_through_every_configured_address() {
    let addrs: Vec<String> = ["a:1", "b:1", "c:1"].map(String::from).to_vec();
    let mut route = Route::default();
    let mut tried = Vec::new();
    for _ in 0..6 {
        let addr = route.candidate(&addrs);
        tried.push(addr.clone());
        if addr == "a:1" || addr == "b:1" {
            // A follower still naming the leader that died.
            route.leader = Some("dead:1".into());
            let addr = route.candidate(&addrs);
            tried.push(addr.clone());
            route.move_on(&addrs, &addr);
        } else {
            route.move_on(&addrs, &addr);
        }
    }
    assert_eq!(
        tried,
        [
            "a:1", "dead:1", "b:1", "dead:1", "c:1", "a:1", "dead:1", "b:1", "dead:1", "c:1"
        ]
    );
    // A failure elsewhere (another call's stale address) moves nothing.
    let before = route.next;
    route.move_on(&addrs, "z:1");
    assert_eq!(route.next, before);
}

// Moved here with `RequestIds`, from the worker.
#[test]
fn request_ids_are_fresh_bounded_and_differ_across_restarts() {
    let id = "0123456789abcdef";
    let ids = RequestIds::new(id);
    let (a, b) = (ids.next("poll"), ids.next("poll"));
    assert_ne!(a, b);
    assert!(a.starts_with(&format!("{id}-")), "{a}");
    let restarted = RequestIds::new(id);
    assert_ne!(restarted.next("poll"), a, "a restart does not reuse IDs");
    let long = ids.next("heartbeat") + &u64::MAX.to_string();
    assert!(long.len() <= MAX_REQUEST_ID_CHARS, "{long}");
}

#[test]
fn one_off_request_ids_are_random() {
    let id = one_off_request_id();
    assert_eq!(id.len(), 32);
    assert!(id.len() <= MAX_REQUEST_ID_CHARS);
    assert_ne!(id, one_off_request_id());
}

/// A fake coordinator's admin API: scripted errors first, then a redirect
/// if set, else an answer naming the node.
#[derive(Clone, Default)]
struct Fake {
    state: Arc<StdMutex<FakeState>>,
}

#[derive(Default)]
struct FakeState {
    node_id: u64,
    errors: VecDeque<Status>,
    redirect_to: Option<String>,
    calls: usize,
}

impl Fake {
    fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        f(&mut self.state.lock().expect("fake state"))
    }
}

#[tonic::async_trait]
impl AdminApi for Fake {
    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.with(|s| {
            s.calls += 1;
            if let Some(status) = s.errors.pop_front() {
                return Err(status);
            }
            if let Some(leader) = &s.redirect_to {
                return Err(not_leader(leader));
            }
            Ok(Response::new(ClusterStatusResponse {
                answered_by: s.node_id,
                ..Default::default()
            }))
        })
    }

    async fn add_node(
        &self,
        _request: Request<AddNodeRequest>,
    ) -> Result<Response<ChangeMembershipResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn remove_node(
        &self,
        _request: Request<RemoveNodeRequest>,
    ) -> Result<Response<ChangeMembershipResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn drain_worker(
        &self,
        _request: Request<crate::v1::DrainWorkerRequest>,
    ) -> Result<Response<crate::v1::DrainWorkerResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Serves a fake node `node_id` on 127.0.0.1 (until the test's runtime
/// ends); returns it and its address.
async fn serve(node_id: u64) -> (Fake, String) {
    let fake = Fake::default();
    fake.with(|s| s.node_id = node_id);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AdminApiServer::new(fake.clone()))
            .serve_with_incoming(incoming),
    );
    (fake, addr)
}

/// An address nothing listens on (connections are refused).
async fn dead_address() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    listener.local_addr().expect("addr").to_string()
}

/// A client of `addrs` and the events it reports, one line each.
fn client(
    addrs: Vec<String>,
    retry_server_errors: bool,
) -> (LeaderClient, Arc<StdMutex<Vec<String>>>) {
    let events: Arc<StdMutex<Vec<String>>> = Arc::default();
    let seen = events.clone();
    let observer: Observer = Arc::new(move |event: &Event<'_>| {
        let line = match event {
            Event::Retrying { failure, .. } => format!("retry {failure}"),
            Event::FollowingLeader { from, leader, .. } => format!("follow {from} -> {leader}"),
            Event::AnsweredAfterRetrying { failures, .. } => format!("answered after {failures}"),
        };
        seen.lock().expect("events").push(line);
    });
    let options = Options {
        retry_server_errors,
        observer: Some(observer),
    };
    (
        LeaderClient::new(addrs, Arc::new(TcpConnector::default()), options),
        events,
    )
}

/// Asks for the cluster status; returns who answered.
async fn status(
    client: &LeaderClient,
    persistence: Persistence,
) -> Result<(String, u64), CallError> {
    client
        .call(
            "get the status",
            persistence,
            Some(Duration::from_secs(5)),
            |channel| async move {
                Ok(admin_api(channel)
                    .cluster_status(ClusterStatusRequest {})
                    .await?
                    .into_inner()
                    .answered_by)
            },
        )
        .await
}

fn events(events: &Arc<StdMutex<Vec<String>>>) -> Vec<String> {
    events.lock().expect("events").clone()
}

fn within(duration: Duration) -> Persistence {
    Persistence::Until(Instant::now() + duration)
}

#[tokio::test]
async fn a_followers_hint_is_followed_to_the_leader() {
    let (_leader, leader_addr) = serve(2).await;
    let (follower, follower_addr) = serve(1).await;
    follower.with(|s| s.redirect_to = Some(leader_addr.clone()));
    let (client, seen) = client(vec![follower_addr.clone()], false);
    let (addr, node) = status(&client, within(Duration::from_secs(5)))
        .await
        .expect("answered");
    assert_eq!((addr.as_str(), node), (leader_addr.as_str(), 2));
    assert_eq!(
        events(&seen),
        [format!("follow {follower_addr} -> {leader_addr}")]
    );
    // The next call goes straight to the leader.
    status(&client, within(Duration::from_secs(5)))
        .await
        .expect("answered");
    assert_eq!(follower.with(|s| s.calls), 1);
}

#[tokio::test]
async fn a_hint_that_cannot_be_reached_moves_on_to_the_next_address() {
    let dead = dead_address().await;
    let (first, first_addr) = serve(1).await;
    first.with(|s| s.redirect_to = Some(dead.clone()));
    let (_second, second_addr) = serve(2).await;
    let (client, seen) = client(vec![first_addr.clone(), second_addr], false);
    let (_, node) = status(&client, within(Duration::from_secs(5)))
        .await
        .expect("answered");
    assert_eq!(node, 2, "the next configured address answered");
    let seen = events(&seen);
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[0], format!("follow {first_addr} -> {dead}"));
    assert!(
        seen[1].starts_with(&format!("retry connect to {dead}: ")),
        "{seen:?}"
    );
    assert_eq!(seen[2], "answered after 1");
    assert_eq!(
        first.with(|s| s.calls),
        1,
        "not asked again for the dead leader"
    );
}

#[tokio::test]
async fn redirects_in_a_row_are_bounded() {
    let (a, a_addr) = serve(1).await;
    let (b, b_addr) = serve(2).await;
    a.with(|s| s.redirect_to = Some(b_addr.clone()));
    b.with(|s| s.redirect_to = Some(a_addr.clone()));
    let (client, seen) = client(vec![a_addr, b_addr], false);
    let error = status(&client, within(Duration::from_millis(600)))
        .await
        .expect_err("nobody leads");
    assert!(
        matches!(&error, CallError::GaveUp { last: Failure::Status { status, .. }, .. } if leader_hint(status).is_some()),
        "{error}"
    );
    let seen = events(&seen);
    let mut in_a_row = 0;
    for event in &seen {
        if event.starts_with("follow ") {
            in_a_row += 1;
            assert!(in_a_row <= MAX_REDIRECTS, "{seen:?}");
        } else {
            assert_eq!(
                in_a_row, MAX_REDIRECTS,
                "a failure after the bound: {seen:?}"
            );
            in_a_row = 0;
        }
    }
    let calls = a.with(|s| s.calls) + b.with(|s| s.calls);
    assert!(
        calls >= 2 * (MAX_REDIRECTS as usize + 1),
        "{calls}: {seen:?}"
    );
}

#[tokio::test]
async fn a_node_naming_itself_is_left_for_the_next() {
    let (a, a_addr) = serve(1).await;
    a.with(|s| s.redirect_to = Some(a_addr.clone()));
    let (_b, b_addr) = serve(2).await;
    let (client, seen) = client(vec![a_addr.clone(), b_addr], false);
    let (_, node) = status(&client, within(Duration::from_secs(5)))
        .await
        .expect("answered");
    assert_eq!(node, 2);
    let seen = events(&seen);
    assert!(
        seen[0].starts_with(&format!("retry at {a_addr}: Unavailable")),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|e| e.starts_with("follow")), "{seen:?}");
}

#[tokio::test]
async fn server_errors_are_final_unless_retried_as_asked() {
    let (fake, addr) = serve(1).await;
    fake.with(|s| s.errors.push_back(Status::internal("bug")));
    let (client_once, _) = client(vec![addr.clone()], false);
    let error = status(&client_once, Persistence::UntilAnswered)
        .await
        .expect_err("refused");
    assert!(
        matches!(&error, CallError::Rejected { status, .. } if status.code() == Code::Internal),
        "{error}"
    );

    fake.with(|s| {
        s.errors.push_back(Status::internal("bug"));
        s.errors.push_back(Status::resource_exhausted("busy"));
        s.errors.push_back(Status::invalid_argument("bad"));
    });
    let (patient, seen) = client(vec![addr], true);
    let error = status(&patient, Persistence::UntilAnswered)
        .await
        .expect_err("the refusal is final");
    assert!(
        matches!(&error, CallError::Rejected { status, .. } if status.code() == Code::InvalidArgument),
        "{error}"
    );
    assert_eq!(events(&seen).len(), 2, "{:?}", events(&seen));
    let (_, node) = status(&patient, Persistence::UntilAnswered)
        .await
        .expect("answered");
    assert_eq!(node, 1);
}

#[tokio::test]
async fn a_busy_node_is_asked_again_after_its_hint_even_by_a_client_that_takes_server_errors_as_final()
 {
    let (fake, addr) = serve(1).await;
    fake.with(|s| {
        s.errors.push_back(busy("300"));
        s.errors.push_back(busy("300"));
    });
    let (client, seen) = client(vec![addr], false);
    let started = Instant::now();
    let (_, node) = status(&client, within(Duration::from_secs(5)))
        .await
        .expect("answered once the node had room");
    assert_eq!(node, 1);
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "each hint was waited for: {:?}",
        started.elapsed()
    );
    assert_eq!(events(&seen).len(), 3, "{:?}", events(&seen));
    // Within the call's patience only.
    fake.with(|s| s.errors.extend((0..20).map(|_| busy("300"))));
    let error = status(&client, within(Duration::from_millis(500)))
        .await
        .expect_err("gave up");
    assert!(matches!(error, CallError::GaveUp { .. }), "{error}");
}

#[tokio::test]
async fn an_unreachable_cluster_is_given_up_when_the_persistence_ends() {
    let addrs = vec![dead_address().await, dead_address().await];
    let (client, seen) = client(addrs, false);
    let started = Instant::now();
    let patience = Duration::from_millis(400);
    let error = status(&client, within(patience))
        .await
        .expect_err("unreachable");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= patience && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    match &error {
        CallError::GaveUp { waited, last } => {
            assert!(*waited >= patience, "{waited:?}");
            assert!(matches!(last, Failure::Connect(_)), "{last}");
        }
        CallError::Rejected { .. } => panic!("{error}"),
    }
    // Backed off between rounds rather than hammering: ~50 ms doubling to
    // 250 ms is a handful of rounds of two in 400 ms.
    let retries = events(&seen).len();
    assert!((2..=20).contains(&retries), "{retries}");
}
