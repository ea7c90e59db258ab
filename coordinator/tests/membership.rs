//! Membership changes on in-process coordinators talking gRPC on loopback:
//! a change left in its joint configuration (its caller gone between the
//! two phases) is completed by the next add-node, which does not take the
//! half-done change for a done one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use distbuild_coordinator::{Bootstrap, Config, Node, Seams, Tuning};
use distbuild_proto::v1::AddNodeRequest;
use distbuild_proto::v1::admin_api_client::AdminApiClient;
use openraft::{BasicNode, ChangeMembers, ServerState};
use tokio_util::sync::CancellationToken;

struct Replica {
    node: Arc<Node>,
    addr: String,
    stop: CancellationToken,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Replica {
    /// Stops serving and stops Raft; returns once the port is free.
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.served.await;
    }
}

async fn start(
    node_id: u64,
    listener: tokio::net::TcpListener,
    bootstrap: Bootstrap,
    dir: &std::path::Path,
) -> Replica {
    let stop = CancellationToken::new();
    let addr = listener.local_addr().expect("addr");
    let config = Config {
        node_id,
        bootstrap,
        data_dir: dir.join(format!("node{node_id}")),
        tuning: Tuning::default(),
        secret: None,
        security: distbuild_proto::tls::Security::Insecure,
    };
    let node = distbuild_coordinator::start_node(&config, addr, Seams::production(), stop.clone())
        .await
        .expect("start the node");
    let served = tokio::spawn(distbuild_coordinator::serve(
        node.clone(),
        None,
        distbuild_proto::auth::Access::for_security(&distbuild_proto::tls::Security::Insecure),
        listener,
        stop.clone(),
    ));
    Replica {
        node,
        addr: addr.to_string(),
        stop,
        served,
    }
}

/// The voter configurations `node` sees: one, or two while joint.
fn configs(node: &Node) -> Vec<BTreeSet<u64>> {
    node.raft_for_tests()
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .get_joint_config()
        .clone()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited too long for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_node_completes_a_change_left_joint_before_answering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut listeners = Vec::new();
    for _ in 0..4 {
        listeners.push(
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind"),
        );
    }
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").to_string())
        .collect();
    let initial: BTreeMap<u64, String> = (1..=3)
        .map(|id| (id, addrs[id as usize - 1].clone()))
        .collect();
    let mut replicas: BTreeMap<u64, Replica> = BTreeMap::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let bootstrap = if id <= 3 {
            Bootstrap::Initial(initial.clone())
        } else {
            Bootstrap::Join
        };
        replicas.insert(id, start(id, listener, bootstrap, dir.path()).await);
    }
    let mut leader = 0;
    wait_until("a leader", || {
        leader = (1..=3)
            .find(|id| {
                let r = &replicas[id];
                r.node.raft_metrics().borrow().state == ServerState::Leader
                    && r.node.check_leader().is_ok()
            })
            .unwrap_or(0);
        leader != 0
    })
    .await;
    let leader_node = replicas[&leader].node.clone();
    let leader_addr = replicas[&leader].addr.clone();

    // Node 4 joins as a learner and catches up.
    leader_node
        .raft_for_tests()
        .add_learner(
            4,
            BasicNode {
                addr: addrs[3].clone(),
            },
            true,
        )
        .await
        .expect("add the learner");
    // With node 4 and one follower down, the joint configuration
    // ({1,2,3} and {1,2,3,4}) cannot commit; its caller gives up, as a
    // caller whose leader died would.
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    replicas.remove(&4).expect("node 4").stop().await;
    replicas
        .remove(&follower)
        .expect("the follower")
        .stop()
        .await;
    let raft = leader_node.raft_for_tests().clone();
    let change = tokio::spawn(async move {
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([4])), false)
            .await
    });
    wait_until("the joint configuration", || {
        configs(&leader_node).len() == 2
    })
    .await;
    change.abort();
    // The follower comes back: the joint configuration commits, and no
    // one moves it on.
    let listener = tokio::net::TcpListener::bind(&addrs[follower as usize - 1])
        .await
        .expect("bind the follower's port again");
    replicas.insert(
        follower,
        start(
            follower,
            listener,
            Bootstrap::Initial(initial.clone()),
            dir.path(),
        )
        .await,
    );
    wait_until("the joint configuration to commit", || {
        let m = leader_node.raft_metrics().borrow().clone();
        m.last_applied.map(|l| l.index) >= m.membership_config.log_id().map(|l| l.index)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        configs(&leader_node),
        vec![BTreeSet::from([1, 2, 3]), BTreeSet::from([1, 2, 3, 4])],
        "the change is left joint"
    );

    // Asked again, add-node finishes the change before it answers.
    let mut admin = AdminApiClient::connect(format!("http://{leader_addr}"))
        .await
        .expect("connect");
    let answer = admin
        .add_node(AddNodeRequest {
            node_id: 4,
            addr: addrs[3].clone(),
        })
        .await
        .expect("add node 4")
        .into_inner();
    assert_eq!(
        configs(&leader_node),
        vec![BTreeSet::from([1, 2, 3, 4])],
        "one configuration, with node 4 a voter"
    );
    assert_eq!(
        answer.members.iter().map(|m| m.node_id).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    for (_, replica) in replicas {
        replica.stop().await;
    }
}
