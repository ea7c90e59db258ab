//! Log compaction end to end: a three-node openraft cluster on raft-store
//! (in-process network), one node down while the others write enough to
//! snapshot and purge their logs; restarted from its data directory, the
//! lagging node can only catch up by receiving a snapshot.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distbuild_raft_store::StateHandle;
use openraft::error::{
    ClientWriteError, InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Config, Raft, SnapshotPolicy};
use support::{Command, TestApp, TestConfig};

type NodeRaft = Raft<TestConfig>;

/// Delivers RPCs straight to the target node's `Raft`, if it is up.
#[derive(Clone, Default)]
struct Router {
    nodes: Arc<Mutex<HashMap<u64, NodeRaft>>>,
}

struct Connection {
    router: Router,
    target: u64,
}

impl Router {
    fn get(&self, target: u64) -> Result<NodeRaft, Unreachable> {
        self.nodes
            .lock()
            .expect("router lock")
            .get(&target)
            .cloned()
            .ok_or_else(|| {
                Unreachable::new(&std::io::Error::other(format!("node {target} is down")))
            })
    }
}

impl RaftNetworkFactory<TestConfig> for Router {
    type Network = Connection;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> Connection {
        Connection {
            router: self.clone(),
            target,
        }
    }
}

impl RaftNetwork<TestConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TestConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let raft = self.router.get(self.target)?;
        raft.append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TestConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        let raft = self.router.get(self.target)?;
        raft.install_snapshot(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let raft = self.router.get(self.target)?;
        raft.vote(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

const SNAPSHOT_EVERY_LOGS: u64 = 50;

struct Node {
    raft: NodeRaft,
    state: StateHandle,
    restores: Arc<AtomicU64>,
}

async fn start_node(router: &Router, id: u64, dir: &Path) -> Node {
    let config = Config {
        heartbeat_interval: 50,
        election_timeout_min: 200,
        election_timeout_max: 400,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY_LOGS),
        max_in_snapshot_log_to_keep: 0,
        // Small chunks: the snapshot crosses in many pieces.
        snapshot_max_chunk_size: 1024,
        ..Default::default()
    };
    let config = Arc::new(config.validate().expect("valid raft config"));
    let app = TestApp::default();
    let restores = app.restores.clone();
    let (log, sm) = distbuild_raft_store::open(dir, app).expect("open the store");
    let state = sm.state();
    let raft = Raft::new(id, config, router.clone(), log, sm)
        .await
        .expect("start raft");
    router
        .nodes
        .lock()
        .expect("router lock")
        .insert(id, raft.clone());
    Node {
        raft,
        state,
        restores,
    }
}

async fn stop_node(router: &Router, node: Node) {
    let id = node.raft.metrics().borrow().id;
    router.nodes.lock().expect("router lock").remove(&id);
    node.raft.shutdown().await.expect("shut raft down");
}

/// Writes through whichever node leads now, following `ForwardToLeader`
/// (under load an election can move the leadership mid-test); returns the
/// ID of the node that took the write and the write's log index. `hint` is
/// the node tried first.
async fn write(nodes: &BTreeMap<u64, Node>, hint: u64, command: Command) -> (u64, u64) {
    let mut target = if nodes.contains_key(&hint) {
        hint
    } else {
        *nodes.keys().next().expect("a node")
    };
    for _ in 0..200 {
        match nodes[&target].raft.client_write(command.clone()).await {
            Ok(written) => return (target, written.log_id.index),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                match forward.leader_id.filter(|id| nodes.contains_key(id)) {
                    Some(id) if id != target => target = id,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            Err(e) => panic!("write through the leader: {e}"),
        }
    }
    panic!("no node took the write within 200 attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_node_catches_up_by_snapshot_after_purge() {
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::TempDir::new().expect("tempdir"))
        .collect();
    let dir_of = |id: u64| -> PathBuf { dirs[(id - 1) as usize].path().to_path_buf() };
    let router = Router::default();
    let mut nodes = BTreeMap::new();
    for id in 1..=3 {
        nodes.insert(id, start_node(&router, id, &dir_of(id)).await);
    }
    let members: BTreeMap<u64, BasicNode> = (1..=3)
        .map(|id| (id, BasicNode::new(format!("node-{id}"))))
        .collect();
    nodes[&1]
        .raft
        .initialize(members)
        .await
        .expect("initialize the cluster");
    nodes[&1]
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.current_leader.is_some(), "a leader")
        .await
        .expect("a leader is elected");

    // Node 3 goes down; the leader is one of the other two.
    let node3 = nodes.remove(&3).expect("node 3");
    stop_node(&router, node3).await;

    // Record commands carry their own index (the state of the test app is a
    // function of it); membership and blank entries take indexes too, so
    // commands are numbered by the count the app returns.
    let n_commands = 6 * SNAPSHOT_EVERY_LOGS;
    let (mut leader_id, mut last) = (0, 0);
    for i in 1..=n_commands {
        let command = Command::Put {
            key: format!("key-{i}").into_bytes(),
            value: vec![i as u8; 100],
        };
        (leader_id, last) = write(&nodes, leader_id, command).await;
    }
    // The index of the last write (the leader's metrics may not show it
    // applied yet when its client_write returns).
    let leader = &nodes[&leader_id].raft;
    leader
        .wait(Some(Duration::from_secs(20)))
        .metrics(
            |m| {
                m.purged.map(|p| p.index).unwrap_or(0) + 2 * SNAPSHOT_EVERY_LOGS > last
                    && m.snapshot.is_some()
            },
            "the leader snapshots and purges its log",
        )
        .await
        .expect("the leader purges its log");
    let purged = leader
        .metrics()
        .borrow()
        .purged
        .map(|p| p.index)
        .unwrap_or(0);
    assert!(purged > 10, "the leader purged only up to {purged}");

    // Node 3 comes back from its data directory. Its log ends before the
    // leader's purged index, so only a snapshot can bring it up to date.
    let node3 = start_node(&router, 3, &dir_of(3)).await;
    let node3_last_log = node3.raft.metrics().borrow().last_log_index.unwrap_or(0);
    assert!(
        node3_last_log < purged,
        "node 3's log ({node3_last_log}) should end before the leader's purge point ({purged})"
    );
    let restores_on_open = node3.restores.load(Ordering::SeqCst);
    node3
        .raft
        .wait(Some(Duration::from_secs(30)))
        .metrics(
            |m| m.last_applied.map(|l| l.index).unwrap_or(0) >= last,
            "node 3 catches up",
        )
        .await
        .expect("node 3 catches up");
    assert!(
        node3.restores.load(Ordering::SeqCst) > restores_on_open,
        "node 3 caught up without installing a snapshot"
    );

    // Its state is the leader's: every key written, and the same count.
    let read_all = |state: &StateHandle| -> BTreeSet<(Vec<u8>, Vec<u8>)> {
        state.read(|r| {
            let mut all = BTreeSet::new();
            distbuild_raft_store::ReadState::for_each_prefix(r, support::KV, b"", &mut |k, v| {
                all.insert((k.to_vec(), v.to_vec()));
                std::ops::ControlFlow::Continue(())
            })
            .expect("scan kv");
            all
        })
    };
    let leader_state = read_all(&nodes[&leader_id].state);
    assert_eq!(leader_state.len() as u64, n_commands);
    assert_eq!(
        read_all(&node3.state),
        leader_state,
        "node 3's state differs from the leader's"
    );

    // And it keeps following: one more write reaches it.
    let after = Command::Put {
        key: b"after".to_vec(),
        value: b"catch-up".to_vec(),
    };
    let (_, last) = write(&nodes, leader_id, after).await;
    node3
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.last_applied.map(|l| l.index).unwrap_or(0) >= last,
            "node 3 applies new writes",
        )
        .await
        .expect("node 3 applies new writes");

    stop_node(&router, node3).await;
    for (_, node) in nodes {
        stop_node(&router, node).await;
    }
}
