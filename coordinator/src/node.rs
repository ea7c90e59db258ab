//! One coordinator replica: the Raft node over raft-store, the state machine
//! application that runs [`Model`], and the leader-side helpers every service
//! uses (proposing commands, the clock, waiting for change).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use distbuild_proto::wire::LEADER_METADATA_KEY;
use distbuild_raft_store::{Application, ApplyTxn, StateHandle, StateReader, StoreError};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, LogId, Raft, ServerState};
use tonic::Status;

use crate::secret::ClusterSecret;
use distbuild_proto::net::SharedDialer;

use crate::blobs::BlobStore;
use crate::network::{MAX_RAFT_MESSAGE_BYTES, Network, Peers};
use crate::requests::{Proposal, Requests};
use crate::state::{Command, Model, Response, TABLES};

openraft::declare_raft_types!(
    /// openraft's types for the coordinator's log.
    pub TypeConfig:
        D = Proposal,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = crate::runtime::SeamRuntime,
);

/// The time source: leaders stamp it into commands. Tests and the simulation
/// pass their own.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
pub struct SystemClock;

/// Sees every command a replica applies, in log order, with its answer:
/// the simulation's checkers compare replicas and audit leases through it.
/// Called inside `apply`, after the state changed; must not block.
pub trait ApplyObserver: Send + Sync + 'static {
    fn applied(&self, node_id: u64, index: u64, proposal: &Proposal, response: &Response);
}

/// Bugs a simulation switches on to prove that its checkers catch them.
/// No flag or file reaches them: only code that builds [`Seams`] by hand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InjectedBugs {
    /// Accept a result reported under a lease that already expired, while
    /// its job waits to run again.
    pub accept_expired_lease_results: bool,
    /// Apply a retried request again instead of answering it with the
    /// first answer (exactly-once under retry broken).
    pub forget_request_answers: bool,
}

/// What a replica takes from its surroundings: time, the network, and
/// (for simulations) an observer and injected bugs.
#[derive(Clone)]
pub struct Seams {
    pub clock: Arc<dyn Clock>,
    pub dialer: SharedDialer,
    pub observer: Option<Arc<dyn ApplyObserver>>,
    pub bugs: InjectedBugs,
}

impl Seams {
    /// The system clock, TCP, no observer, no bugs.
    pub fn production() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            dialer: distbuild_proto::net::tcp(),
            observer: None,
            bugs: InjectedBugs::default(),
        }
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// The state machine application: applies commands to the shared model and
/// writes what changed.
struct App {
    node_id: u64,
    model: Arc<Mutex<Model>>,
    requests: Arc<Mutex<Requests>>,
    observer: Option<Arc<dyn ApplyObserver>>,
    bugs: InjectedBugs,
}

fn lock(model: &Mutex<Model>) -> MutexGuard<'_, Model> {
    model.lock().expect("model lock poisoned")
}

impl Application<TypeConfig> for App {
    const COLUMN_FAMILIES: &'static [&'static str] = TABLES;

    fn apply(
        &mut self,
        txn: &mut ApplyTxn<'_>,
        log_id: &LogId<u64>,
        proposal: &Proposal,
    ) -> Result<Response, StoreError> {
        let mut model = lock(&self.model);
        let mut requests = self.requests.lock().expect("requests lock poisoned");
        model.accept_expired_lease_results = self.bugs.accept_expired_lease_results;
        requests.forget_answers = self.bugs.forget_request_answers;
        let response = requests.apply(&mut model, log_id.index, proposal);
        model.flush(txn)?;
        requests.flush(txn)?;
        if let Some(observer) = &self.observer {
            observer.applied(self.node_id, log_id.index, proposal, &response);
        }
        Ok(response)
    }

    fn empty_response(&self) -> Response {
        Response::None
    }

    fn restore(&mut self, state: &StateReader<'_>) -> Result<(), StoreError> {
        *lock(&self.model) = Model::load(state)?;
        *self.requests.lock().expect("requests lock poisoned") = Requests::load(state)?;
        Ok(())
    }
}

/// Tunables of the scheduler and leases.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// A lease not renewed for this long expires.
    pub lease_timeout_ms: u64,
    /// How often workers renew.
    pub heartbeat_interval_ms: u64,
    /// How long a ready job waits for a worker holding its inputs.
    pub locality_wait_ms: u64,
    /// Lease expiries after which a job fails.
    pub max_attempts: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            lease_timeout_ms: 10_000,
            heartbeat_interval_ms: 2_000,
            locality_wait_ms: 50,
            max_attempts: 3,
        }
    }
}

/// How a replica finds its cluster when its data dir is pristine (a
/// restarted replica ignores this: its log knows the cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// A cluster of one: this node.
    Single,
    /// The initial voters by node ID (this node among them); every one of
    /// them initializes with the same list, which is safe in Raft: the
    /// membership entry they write is identical.
    Initial(BTreeMap<u64, String>),
    /// Wait to be added by the leader (`cluster add-node`).
    Join,
}

/// The Raft timing every replica runs with. A leader sends a heartbeat
/// every 100 ms; its followers stand in turns after 320 ms without one (the
/// next 60 ms later), so a dead leader is replaced in about a third of a
/// second while a heartbeat may be late by a few intervals on a busy
/// machine without unseating a live one. Every election is timed by
/// `detector` (openraft's own timer is off); openraft
/// uses the maximum election timeout as the leader lease (a voter refuses
/// to vote while its lease of the last leader holds). openraft 0.9 also
/// uses the heartbeat interval as the deadline of every append: 100 ms
/// leaves room for a batch's transfer (at most 1 MiB, see raft-store) and
/// the follower's fsync.
pub const HEARTBEAT_INTERVAL_MS: u64 = 100;
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 200;
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 300;
/// A leader serves only while a quorum confirmed its leadership this
/// recently; an isolated leader stops serving (clients and workers move
/// to the majority's new leader) instead of answering from a stale state.
pub const LEADERSHIP_FRESH_MS: u64 = 1_000;

/// How long a request waits on a node for an election to settle before
/// it is told to retry.
pub const LEADER_WAIT: Duration = Duration::from_secs(2);

/// A running replica, shared by every service.
pub struct Node {
    pub node_id: u64,
    pub addr: String,
    pub raft: Raft<TypeConfig>,
    /// Channels to the other replicas.
    pub peers: Peers,
    /// The term whose leader (this node) has extended every lease; the
    /// leader expires leases only in such a term.
    leases_extended_in: AtomicU64,
    /// When a quorum last confirmed this node's leadership, and in which
    /// term.
    confirmed: Mutex<Option<(u64, tokio::time::Instant)>>,
    model: Arc<Mutex<Model>>,
    requests: Arc<Mutex<Requests>>,
    pub state: StateHandle,
    pub blobs: BlobStore,
    pub clock: Arc<dyn Clock>,
    pub tuning: Tuning,
    /// When a leader last got through to this node, and how its last vote
    /// round went (see `detector`).
    pub contact: Arc<crate::detector::Contact>,
    /// What peers and operators must show (None: nothing required).
    pub secret: Option<ClusterSecret>,
    /// Per worker, the peer bytes it last reported fetching: a metric this
    /// node saw, not replicated state.
    pub peer_bytes_fetched: Mutex<std::collections::HashMap<String, u64>>,
    /// Cancelled when the server stops: long polls and event streams end
    /// so the server's graceful shutdown does not wait on them.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// Bounds how long one proposal may take before the caller is told to retry.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

impl Node {
    /// Opens the replica's store in `data_dir` and starts its Raft node; a
    /// pristine single node initializes itself as a cluster of one.
    pub async fn start(
        node_id: u64,
        addr: String,
        bootstrap: Bootstrap,
        data_dir: &Path,
        seams: Seams,
        tuning: Tuning,
        secret: Option<ClusterSecret>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context as _;
        let model = Arc::new(Mutex::new(Model::default()));
        let requests = Arc::new(Mutex::new(Requests::default()));
        let app = App {
            node_id,
            model: model.clone(),
            requests: requests.clone(),
            observer: seams.observer.clone(),
            bugs: seams.bugs,
        };
        let raft_dir = data_dir.join("raft");
        // Where blocking work runs in place (a simulation), so does the
        // log's fsync: no other thread may decide when an append completes.
        let options = distbuild_raft_store::Options {
            inline_flush: distbuild_proto::blocking::is_inline(),
        };
        let (log_store, state_machine) =
            distbuild_raft_store::open_with(&raft_dir, app, options)
                .with_context(|| format!("open the raft store in {}", raft_dir.display()))?;
        let state = state_machine.state();
        let config = openraft::Config {
            cluster_name: "distbuild".to_string(),
            heartbeat_interval: HEARTBEAT_INTERVAL_MS,
            election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
            // Entries per append: a batch stays far below the transport's
            // message limit even when it carries large submits.
            max_payload_entries: 64,
            snapshot_max_chunk_size: 4 * 1024 * 1024,
            // Per chunk: a 4 MiB chunk written and synced on a busy disk.
            install_snapshot_timeout: 10_000,
            // `detector` times every election.
            enable_elect: false,
            ..Default::default()
        };
        // A snapshot chunk fits in one Raft message.
        const _: () = assert!(4 * 1024 * 1024 < MAX_RAFT_MESSAGE_BYTES);
        let config = Arc::new(config.validate().context("raft configuration")?);
        let peers = Peers::new(secret.clone(), seams.dialer.clone());
        let contact = Arc::new(crate::detector::Contact::default());
        let network = Network {
            peers: peers.clone(),
            contact: contact.clone(),
        };
        let raft = Raft::new(node_id, config, network, log_store, state_machine)
            .await
            .context("start the raft node")?;
        let mut addr = addr;
        if !raft.is_initialized().await.context("raft status")? {
            let members = match &bootstrap {
                Bootstrap::Single => Some(BTreeMap::from([(node_id, addr.clone())])),
                Bootstrap::Initial(members) => {
                    addr = members[&node_id].clone();
                    Some(members.clone())
                }
                Bootstrap::Join => None,
            };
            if let Some(members) = members {
                let members: BTreeMap<u64, BasicNode> = members
                    .into_iter()
                    .map(|(id, addr)| (id, BasicNode { addr }))
                    .collect();
                match raft.initialize(members).await {
                    Ok(()) => {}
                    // Another initial member reached this node first.
                    Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {}
                    Err(e) => return Err(e).context("initialize the cluster"),
                }
            }
        }
        // The address the cluster knows this node by, once it knows it.
        if let Some(known) = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&node_id)
        {
            addr = known.addr.clone();
        }
        let blobs_dir = data_dir.join("blobs");
        let blobs = BlobStore::open(&blobs_dir)
            .with_context(|| format!("open the blob store in {}", blobs_dir.display()))?;
        Ok(Arc::new(Self {
            node_id,
            addr,
            raft,
            peers,
            requests,
            leases_extended_in: AtomicU64::new(0),
            confirmed: Mutex::new(None),
            model,
            state,
            blobs,
            clock: seams.clock,
            tuning,
            contact,
            secret,
            peer_bytes_fetched: Mutex::default(),
            shutdown,
        }))
    }

    /// The replicated model (read it, never hold the guard across await).
    pub fn model(&self) -> MutexGuard<'_, Model> {
        lock(&self.model)
    }

    /// The answer the state machine remembers for request `id`, if any.
    pub fn remembered(&self, id: &str) -> Option<Response> {
        self.requests
            .lock()
            .expect("requests lock poisoned")
            .answer(id)
    }

    /// The leader's clock, never behind the state's.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms().max(self.model().clock_ms())
    }

    /// Whether this node leads now.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.node_id)
    }

    /// Ok when this node leads, a quorum confirmed it recently, and it has
    /// extended the leases of its term: only then does it serve. Otherwise
    /// the answer a caller should get: UNAVAILABLE naming the leader when
    /// another node is known to lead.
    pub fn check_leader(&self) -> Result<(), Status> {
        self.leadership().map_err(|(status, _)| status)
    }

    /// [`Node::check_leader`]'s answer, and on refusal whether waiting a
    /// moment may change it (an election running, or this node just
    /// elected), as opposed to a redirect or a leader cut off from its
    /// quorum, which the caller should act on at once.
    fn leadership(&self) -> Result<(), (Status, bool)> {
        let (state, term, leader, leader_addr) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let leader_addr = m.current_leader.and_then(|id| {
                m.membership_config
                    .membership()
                    .get_node(&id)
                    .map(|n| n.addr.clone())
            });
            (m.state, m.current_term, m.current_leader, leader_addr)
        };
        if state == ServerState::Leader {
            if self.leases_extended_in.load(Ordering::Acquire) != term {
                return Err((
                    Status::unavailable("this coordinator was just elected leader; retry"),
                    true,
                ));
            }
            let confirmed = *self.confirmed.lock().expect("confirmed lock poisoned");
            return match confirmed {
                Some((t, at)) if t == term => {
                    if at.elapsed() < Duration::from_millis(LEADERSHIP_FRESH_MS) {
                        Ok(())
                    } else {
                        Err((
                            Status::unavailable(
                                "this coordinator cannot reach a quorum of its cluster; retry another",
                            ),
                            false,
                        ))
                    }
                }
                // Elected, not yet confirmed by a quorum: a moment away.
                _ => Err((
                    Status::unavailable("this coordinator was just elected leader; retry"),
                    true,
                )),
            };
        }
        let mut status = Status::unavailable(match leader {
            Some(id) => format!("not the leader (coordinator {id} is)"),
            None => "not the leader, and no leader is elected yet; retry".to_string(),
        });
        let mut redirect = false;
        if let Some(value) = leader_addr.and_then(|a| a.parse().ok()) {
            status.metadata_mut().insert(LEADER_METADATA_KEY, value);
            redirect = true;
        }
        Err((status, !redirect))
    }

    /// Like [`Node::check_leader`], but while no leader is known (an
    /// election) or this node was just elected, waits up to
    /// [`LEADER_WAIT`] for that to settle, so a caller is redirected (or
    /// served) the moment the election ends instead of polling for it.
    pub async fn ready_leader(&self) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let mut metrics = self.raft.metrics();
        loop {
            let err = match self.leadership() {
                Ok(()) => return Ok(()),
                Err((err, false)) => return Err(err),
                Err((err, true)) => err,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(err);
            }
            // Leadership settles through metrics (an election) or through
            // this leader's own duties (lease extension, confirmation).
            tokio::select! {
                changed = metrics.changed() => {
                    if changed.is_err() {
                        // Raft stopped: nothing will settle.
                        return Err(err);
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(HEARTBEAT_INTERVAL_MS / 2)) => {}
                () = self.shutdown.cancelled() => return Err(err),
            }
        }
    }

    /// This node's own view of Raft.
    pub fn status(&self) -> distbuild_proto::raft_v1::NodeStatusResponse {
        let m = self.raft.metrics().borrow().clone();
        distbuild_proto::raft_v1::NodeStatusResponse {
            node_id: self.node_id,
            role: crate::service::raft::role_name(m.state).to_string(),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            leader: m.current_leader.unwrap_or(0),
        }
    }

    /// Records that a quorum confirmed this node's leadership in `term`,
    /// as of `asked` (when the confirmation was requested).
    pub fn leadership_confirmed(&self, term: u64, asked: tokio::time::Instant) {
        *self.confirmed.lock().expect("confirmed lock poisoned") = Some((term, asked));
    }

    /// Records that this leader extended every lease in `term`.
    pub fn leases_extended(&self, term: u64) {
        self.leases_extended_in.store(term, Ordering::Release);
    }

    /// The term in which this leader extended the leases (0 if never).
    pub fn leases_extended_term(&self) -> u64 {
        self.leases_extended_in.load(Ordering::Acquire)
    }

    /// Proposes `command` and waits until it is applied.
    pub async fn propose(&self, command: Command) -> Result<Response, Status> {
        self.propose_once(Proposal::once(command)).await
    }

    /// Proposes `command` on behalf of request `request_id` (already
    /// checked): a retry of the same request gets the first answer.
    pub async fn propose_request(
        &self,
        request_id: String,
        command: Command,
    ) -> Result<Response, Status> {
        let request_id = (!request_id.is_empty()).then_some(request_id);
        self.propose_once(Proposal {
            request_id,
            command,
        })
        .await
    }

    async fn propose_once(&self, proposal: Proposal) -> Result<Response, Status> {
        // The leader's own lease extension is proposed before it serves.
        if !matches!(proposal.command, Command::ExtendLeases { .. }) {
            self.ready_leader().await?;
        }
        let write = tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.client_write(proposal)).await;
        match write {
            Err(_) => Err(Status::unavailable(
                "the coordinator did not commit the change in time; retry",
            )),
            Ok(Ok(response)) => Ok(response.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => {
                let mut status = Status::unavailable("not the leader");
                if let Some(node) = forward.leader_node
                    && let Ok(value) = node.addr.parse()
                {
                    status.metadata_mut().insert(LEADER_METADATA_KEY, value);
                }
                Err(status)
            }
            Ok(Err(e)) => Err(Status::unavailable(format!("raft: {e}"))),
        }
    }

    /// Waits until the applied state changes, `timeout` passes, or the
    /// server stops.
    pub async fn wait_for_change(&self, last_applied: &mut Option<u64>, timeout: Duration) {
        let mut metrics = self.raft.metrics();
        let changed = tokio::time::timeout(timeout, async {
            loop {
                let applied = metrics.borrow_and_update().last_applied.map(|l| l.index);
                if applied != *last_applied {
                    *last_applied = applied;
                    return;
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        });
        tokio::select! {
            _ = changed => {}
            () = self.shutdown.cancelled() => {}
        }
    }
}
