//! [`Node`]: one running replica — its openraft node over raft-store
//! running the model, its blobs, its peers — started by [`Node::start`];
//! the other modules of `replica` add its behaviour.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use distbuild_model::tables::StoredEvent;
use distbuild_model::{Model, Response};
use distbuild_raft_store::StateHandle;
use openraft::error::RaftError;
use openraft::{BasicNode, Raft};
use tokio_util::sync::CancellationToken;

use super::app::{App, Shared};
use super::config::{
    Bootstrap, ELECTION_TIMEOUT_MAX_MS, ELECTION_TIMEOUT_MIN_MS, HEARTBEAT_INTERVAL_MS, Tuning,
};
use super::contact::Contact;
use super::error::{ReplicaError, Result};
use super::metrics::ReplicaMetrics;
use super::network::{MAX_RAFT_MESSAGE_BYTES, Network, Peers};
use super::seams::{Clock, Seams};
use super::time::LeaderTime;
use super::types::{TypeConfig, role_name};
use crate::blobs::{BlobReader, BlobStore};
use crate::secret::ClusterSecret;

/// A running replica, shared by every service.
pub struct Node {
    pub(super) node_id: u64,
    pub(super) addr: String,
    pub(super) raft: Raft<TypeConfig>,
    /// Where every proposal goes: concurrent ones share entries.
    pub(super) batcher: super::batch::Batcher,
    /// Channels to the other replicas.
    pub(super) peers: Peers,
    /// The term whose leader (this node) has extended every lease; the
    /// leader expires leases only in such a term.
    pub(super) leases_extended_in: AtomicU64,
    /// When a quorum last confirmed this node's leadership, and in which
    /// term.
    pub(super) confirmed: Mutex<Option<(u64, tokio::time::Instant)>>,
    pub(super) shared: Shared,
    pub(super) state: StateHandle,
    pub(super) blobs: BlobStore,
    pub(super) clock: Arc<dyn Clock>,
    /// The leader's stamps: monotonic within a term (see `time`).
    pub(super) leader_time: LeaderTime,
    /// Injected bug (simulation only): stamp the wall clock instead.
    pub(super) stamp_wall_clock: bool,
    pub(super) tuning: Tuning,
    /// When a leader last got through to this node, and how its last vote
    /// round went (see `detector`).
    pub(super) contact: Arc<Contact>,
    /// What peers and operators must show (None: nothing required).
    pub(super) secret: Option<ClusterSecret>,
    /// Per worker, what it last reported in a heartbeat: metrics this
    /// node saw, not replicated state.
    pub(super) worker_stats: Mutex<std::collections::HashMap<String, WorkerStats>>,
    pub(super) metrics: Arc<ReplicaMetrics>,
    /// Cancelled when the server stops: long polls and event streams end
    /// so the server's graceful shutdown does not wait on them.
    pub(super) shutdown: CancellationToken,
}

/// What a worker last reported about itself in a heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Bytes it fetched from other workers since it started.
    pub peer_bytes_total: u64,
    /// Bytes its cache holds.
    pub cache_bytes: u64,
}

impl Node {
    /// Opens the replica's store in `data_dir` and starts its Raft node; a
    /// pristine single node initializes itself as a cluster of one.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        node_id: u64,
        addr: String,
        bootstrap: Bootstrap,
        data_dir: &Path,
        seams: Seams,
        tuning: Tuning,
        secret: Option<ClusterSecret>,
        peer_tls: Option<tonic::transport::ClientTlsConfig>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context as _;
        let shared = Shared::default();
        let metrics = Arc::new(ReplicaMetrics::new());
        let app = App {
            node_id,
            shared: shared.clone(),
            metrics: metrics.clone(),
            observer: seams.observer.clone(),
            check_invariants: seams.check_invariants,
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
        metrics.follow_commits(log_store.committed_index());
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
        let peers = Peers::new(secret.clone(), seams.dialer.clone(), peer_tls);
        let contact = Arc::new(Contact::default());
        let network = Network {
            peers: peers.clone(),
            contact: contact.clone(),
        };
        let raft = Raft::new(node_id, config, network, log_store, state_machine)
            .await
            .context("start the raft node")?;
        tokio::spawn(tracing::Instrument::instrument(
            follow_raft_metrics(raft.metrics(), metrics.clone()),
            tracing::info_span!("coordinator", node_id),
        ));
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
            batcher: super::batch::Batcher::start(raft.clone(), metrics.clone()),
            metrics,
            addr,
            raft,
            peers,
            leases_extended_in: AtomicU64::new(0),
            confirmed: Mutex::new(None),
            shared,
            state,
            blobs,
            clock: seams.clock,
            leader_time: LeaderTime::default(),
            stamp_wall_clock: seams.bugs.leases_timed_by_wall_clock,
            tuning,
            contact,
            secret,
            worker_stats: Mutex::default(),
            shutdown,
        }))
    }

    /// This replica's metrics in Prometheus's text format.
    pub fn metrics_text(&self) -> String {
        let gauges = self.model().gauges();
        self.metrics.encode(&gauges)
    }

    /// The families its gRPC server counts calls in.
    pub fn grpc_metrics(&self) -> &distbuild_ops::grpc::GrpcMetrics {
        &self.metrics.grpc
    }

    /// This replica's node ID.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// The address the cluster knows this replica by.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The scheduler's and the leases' tunables.
    pub fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    /// The cluster secret peers and operators must show, if any.
    pub fn secret(&self) -> Option<&ClusterSecret> {
        self.secret.as_ref()
    }

    /// Cancelled when the server stops.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// This replica's source blobs on disk.
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// The replicated model (read it, never hold the guard across await).
    pub fn model(&self) -> MutexGuard<'_, Model> {
        self.shared.model()
    }

    /// The answer the state machine remembers for request `id`, if any.
    pub fn remembered(&self, id: &str) -> Option<Response> {
        self.shared.requests().answer(id)
    }

    /// The time a leader stamps into a command, never behind the state's
    /// clock: its current term's monotonic time (see `time`). A node that
    /// has not started this term's time (not the leader, or not yet) gives
    /// the state's clock: a command it stamps moves no time forward.
    pub fn now_ms(&self) -> u64 {
        let state = self.model().clock_ms();
        if self.stamp_wall_clock {
            return self.clock.now_ms().max(state);
        }
        let term = self.raft.metrics().borrow().current_term;
        self.leader_time
            .now_ms(term)
            .map_or(state, |ms| ms.max(state))
    }

    /// Starts the time of `term`, which this node leads: from the state's
    /// clock (the wall clock only for a state that has no time yet).
    pub fn start_leader_time(&self, term: u64) {
        let state = self.model().clock_ms();
        let base = if state == 0 {
            self.clock.now_ms()
        } else {
            state
        };
        self.leader_time.start(term, base);
    }

    /// Notes what `worker_id` reported in a heartbeat: bytes fetched from
    /// peers since it started, bytes its cache holds (metrics, not
    /// replicated). Workers no longer registered are forgotten here, so
    /// the table holds at most the registered workers and one more.
    pub fn note_worker_stats(&self, worker_id: &str, peer_bytes_total: u64, cache_bytes: u64) {
        let mut stats = self.worker_stats.lock().expect("metrics lock poisoned");
        stats.insert(
            worker_id.to_string(),
            WorkerStats {
                peer_bytes_total,
                cache_bytes,
            },
        );
        let registered = self.model().workers().len();
        if stats.len() > registered + 1 {
            let model = self.model();
            stats.retain(|id, _| model.workers().contains_key(id));
        }
    }

    /// What each worker last reported in a heartbeat to this node.
    pub fn worker_stats(&self) -> std::collections::HashMap<String, WorkerStats> {
        self.worker_stats
            .lock()
            .expect("metrics lock poisoned")
            .clone()
    }

    /// The stored events of `build_id` from `from_seq` on, with their
    /// outputs, from one view: at most `max`, and at most `max_bytes` past
    /// the first.
    pub fn read_events(
        &self,
        build_id: u64,
        from_seq: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>> {
        self.state
            .read(|reader| {
                super::app::read_tables(reader, |tables| {
                    distbuild_model::tables::read_events(tables, build_id, from_seq, max, max_bytes)
                })
            })
            .map_err(|e| ReplicaError::Internal(format!("read build events: {e}")))
    }

    /// A channel to the replica at `addr` (cached; over the cluster's TLS):
    /// for calls a follower passes on to its leader.
    pub fn peer_channel(&self, addr: &str) -> Result<tonic::transport::Channel> {
        self.peers
            .channel(addr)
            .map_err(|e| ReplicaError::Unavailable(e.to_string()))
    }

    /// Forgets the cached channel to `addr` after a call on it failed.
    pub fn forget_peer_channel(&self, addr: &str) {
        self.peers.forget(addr);
    }

    /// This replica's own copy of blob `digest`, if it has one.
    pub async fn open_own_blob(
        &self,
        digest: &distbuild_proto::BlobKey,
    ) -> Result<Option<BlobReader>> {
        self.open_own_blob_at(digest, 0).await
    }

    /// This replica's own copy of blob `digest` from byte `offset` on, if
    /// it has one.
    pub async fn open_own_blob_at(
        &self,
        digest: &distbuild_proto::BlobKey,
        offset: u64,
    ) -> Result<Option<BlobReader>> {
        self.blobs
            .open_blob_at(digest, offset)
            .await
            .map_err(|e| ReplicaError::Internal(e.to_string()))
    }

    /// This node's own view of Raft.
    pub fn status(&self) -> distbuild_proto::raft_v1::NodeStatusResponse {
        let m = self.raft.metrics().borrow().clone();
        distbuild_proto::raft_v1::NodeStatusResponse {
            node_id: self.node_id,
            role: role_name(m.state).to_string(),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            leader: m.current_leader.unwrap_or(0),
        }
    }

    /// openraft's metrics of this node, to watch (terms, roles, snapshots).
    pub fn raft_metrics(
        &self,
    ) -> tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, BasicNode>> {
        self.raft.metrics()
    }

    /// openraft's own handle, for tests that drive Raft directly (to set up
    /// a membership change left half done, say). Services never use it:
    /// they call this type's methods.
    pub fn raft_for_tests(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// The leader this node knows of, if any.
    pub fn current_leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    /// Stops the Raft node (after the server stopped serving).
    pub async fn stop_raft(&self) -> Result<()> {
        self.raft
            .shutdown()
            .await
            .map_err(|e| ReplicaError::Internal(format!("stop raft: {e}")))
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

/// Keeps the Raft families current as openraft's metrics change; ends when
/// Raft stops.
async fn follow_raft_metrics(
    mut raft: tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, openraft::BasicNode>>,
    metrics: Arc<ReplicaMetrics>,
) {
    let mut last_leader = None;
    loop {
        let leader_before = last_leader;
        let term = {
            let m = raft.borrow_and_update();
            metrics.raft_changed(&m, &mut last_leader);
            m.current_term
        };
        if last_leader != leader_before
            && let Some(leader) = last_leader
        {
            tracing::info!(leader, term, "new leader");
        }
        if raft.changed().await.is_err() {
            return;
        }
    }
}
