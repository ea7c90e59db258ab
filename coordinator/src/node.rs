//! One coordinator replica: the Raft node over raft-store, the state machine
//! application that runs [`Model`], and the leader-side helpers every service
//! uses (proposing commands, the clock, waiting for change).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use distbuild_proto::wire::LEADER_METADATA_KEY;
use distbuild_raft_store::{Application, ApplyTxn, StateHandle, StateReader, StoreError};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, LogId, Raft};
use tonic::Status;

use crate::blobs::BlobStore;
use crate::network::Network;
use crate::state::{Command, Model, Response, TABLES};

openraft::declare_raft_types!(
    /// openraft's types for the coordinator's log.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The time source: leaders stamp it into commands. Tests and the simulation
/// pass their own.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
pub struct SystemClock;

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
    model: Arc<Mutex<Model>>,
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
        command: &Command,
    ) -> Result<Response, StoreError> {
        let mut model = lock(&self.model);
        let response = model.apply(log_id.index, command);
        model.flush(txn)?;
        Ok(response)
    }

    fn empty_response(&self) -> Response {
        Response::None
    }

    fn restore(&mut self, state: &StateReader<'_>) -> Result<(), StoreError> {
        *lock(&self.model) = Model::load(state)?;
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

/// A running replica, shared by every service.
pub struct Node {
    pub node_id: u64,
    pub addr: String,
    pub raft: Raft<TypeConfig>,
    model: Arc<Mutex<Model>>,
    pub state: StateHandle,
    pub blobs: BlobStore,
    pub clock: Arc<dyn Clock>,
    pub tuning: Tuning,
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
        data_dir: &Path,
        clock: Arc<dyn Clock>,
        tuning: Tuning,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context as _;
        let model = Arc::new(Mutex::new(Model::default()));
        let app = App {
            model: model.clone(),
        };
        let raft_dir = data_dir.join("raft");
        let (log_store, state_machine) = distbuild_raft_store::open(&raft_dir, app)
            .with_context(|| format!("open the raft store in {}", raft_dir.display()))?;
        let state = state_machine.state();
        let config = openraft::Config {
            cluster_name: "distbuild".to_string(),
            heartbeat_interval: 100,
            election_timeout_min: 300,
            election_timeout_max: 600,
            ..Default::default()
        };
        let config = Arc::new(config.validate().context("raft configuration")?);
        let raft = Raft::new(node_id, config, Network, log_store, state_machine)
            .await
            .context("start the raft node")?;
        if !raft.is_initialized().await.context("raft status")? {
            let members = BTreeMap::from([(node_id, BasicNode { addr: addr.clone() })]);
            raft.initialize(members)
                .await
                .context("initialize a cluster of one")?;
        }
        let blobs_dir = data_dir.join("blobs");
        let blobs = BlobStore::open(&blobs_dir)
            .with_context(|| format!("open the blob store in {}", blobs_dir.display()))?;
        Ok(Arc::new(Self {
            node_id,
            addr,
            raft,
            model,
            state,
            blobs,
            clock,
            tuning,
            peer_bytes_fetched: Mutex::default(),
            shutdown,
        }))
    }

    /// The replicated model (read it, never hold the guard across await).
    pub fn model(&self) -> MutexGuard<'_, Model> {
        lock(&self.model)
    }

    /// The leader's clock, never behind the state's.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms().max(self.model().clock_ms())
    }

    /// Whether this node leads now.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.node_id)
    }

    /// Proposes `command` and waits until it is applied.
    pub async fn propose(&self, command: Command) -> Result<Response, Status> {
        let write = tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.client_write(command)).await;
        match write {
            Err(_) => Err(Status::unavailable(
                "the coordinator did not commit the change in time; retry",
            )),
            Ok(Ok(response)) => Ok(response.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => {
                let mut status = Status::unavailable("not the leader");
                if let Some(node) = forward.leader_node {
                    if let Ok(value) = node.addr.parse() {
                        status.metadata_mut().insert(LEADER_METADATA_KEY, value);
                    }
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
