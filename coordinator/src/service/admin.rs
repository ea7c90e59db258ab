//! Operators' view and control of the cluster: status from every member,
//! and membership changes (through Raft: learner first, then voter).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use distbuild_proto::raft_v1::{NodeStatusRequest, NodeStatusResponse};
use distbuild_proto::v1::admin_api_server::AdminApi;
use distbuild_proto::v1::{
    AddNodeRequest, ChangeMembershipResponse, ClusterStatusRequest, ClusterStatusResponse, Member,
    RemoveNodeRequest, WorkerStatus,
};
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use tonic::{Request, Response, Status};

use crate::node::Node;

/// How long one member may take to answer a status question.
const STATUS_DEADLINE: Duration = Duration::from_secs(1);
/// How long a new node may take to catch up as a learner.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(60);
/// How long a membership change may take to commit.
const CHANGE_DEADLINE: Duration = Duration::from_secs(20);

pub struct AdminService {
    pub node: Arc<Node>,
}

/// Every member: ID -> (address, voter).
fn members(node: &Node) -> BTreeMap<u64, (String, bool)> {
    let metrics = node.raft.metrics();
    let metrics = metrics.borrow();
    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, n)| (*id, (n.addr.clone(), voters.contains(id))))
        .collect()
}

/// Asks one member for its Raft status (this node answers itself).
async fn ask(node: &Node, id: u64, addr: &str) -> Result<NodeStatusResponse, String> {
    if id == node.node_id {
        return Ok(node.status());
    }
    let mut client = node.peers.transport(addr)?;
    let mut request = Request::new(NodeStatusRequest {});
    request.set_timeout(STATUS_DEADLINE);
    match tokio::time::timeout(STATUS_DEADLINE, client.node_status(request)).await {
        Ok(Ok(answer)) => Ok(answer.into_inner()),
        Ok(Err(status)) => {
            node.peers.forget(addr);
            Err(format!("{}: {}", status.code(), status.message()))
        }
        Err(_) => {
            node.peers.forget(addr);
            Err(format!("no answer in {STATUS_DEADLINE:?}"))
        }
    }
}

/// Every member's status, asked concurrently.
async fn statuses(node: &Node) -> Vec<(u64, String, bool, Result<NodeStatusResponse, String>)> {
    let asks = members(node)
        .into_iter()
        .map(|(id, (addr, voter))| async move {
            let answer = ask(node, id, &addr).await;
            (id, addr, voter, answer)
        });
    futures::future::join_all(asks).await
}

fn voters_of(node: &Node) -> Vec<Member> {
    members(node)
        .into_iter()
        .filter(|(_, (_, voter))| *voter)
        .map(|(id, (addr, voter))| Member {
            node_id: id,
            addr,
            voter,
            ..Default::default()
        })
        .collect()
}

fn membership_status(e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            Status::unavailable("leadership moved during the change; retry")
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(_),
        )) => Status::unavailable("another membership change is in progress; retry"),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            Status::failed_precondition(e.to_string())
        }
        RaftError::Fatal(e) => Status::unavailable(format!("raft stopped: {e}")),
    }
}

async fn bounded<T>(
    deadline: Duration,
    what: &str,
    change: impl std::future::Future<
        Output = Result<T, RaftError<u64, ClientWriteError<u64, BasicNode>>>,
    >,
) -> Result<T, Status> {
    match tokio::time::timeout(deadline, change).await {
        Ok(result) => result.map_err(membership_status),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "{what} did not finish in {deadline:?}"
        ))),
    }
}

/// Changes the voters through Raft's two phases (joint configuration,
/// then the new one). The change runs in its own task, so a caller that
/// gives up (a deadline, a dropped connection) does not stop it between
/// the phases.
async fn change_voters(
    node: &Node,
    what: &str,
    changes: ChangeMembers<u64, BasicNode>,
) -> Result<(), Status> {
    let raft = node.raft.clone();
    let change = tokio::spawn(async move { raft.change_membership(changes, false).await });
    match tokio::time::timeout(CHANGE_DEADLINE, change).await {
        Ok(Ok(result)) => result.map(drop).map_err(membership_status),
        Ok(Err(e)) => Err(Status::internal(format!(
            "{what}: the change task failed: {e}"
        ))),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "{what} did not finish in {CHANGE_DEADLINE:?}; it goes on in the background"
        ))),
    }
}

/// Completes a membership change left in its joint configuration (its
/// leader died, or lost leadership, between the two phases), so every
/// check below sees one configuration of voters.
async fn settle_joint_config(node: &Node) -> Result<(), Status> {
    let target = {
        let metrics = node.raft.metrics();
        let metrics = metrics.borrow();
        let configs = metrics.membership_config.membership().get_joint_config();
        if configs.len() < 2 {
            return Ok(());
        }
        configs.last().expect("two configurations").clone()
    };
    tracing::info!("completing a membership change left half done: voters {target:?}");
    change_voters(
        node,
        "completing the previous membership change",
        ChangeMembers::ReplaceAllVoters(target),
    )
    .await
}

#[tonic::async_trait]
impl AdminApi for AdminService {
    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let answers = statuses(&self.node).await;
        let leader = answers
            .iter()
            .filter_map(|(_, _, _, a)| a.as_ref().ok())
            .filter(|a| a.role == "leader")
            .max_by_key(|a| a.term)
            .map(|a| (a.node_id, a.last_log_index));
        let newest = answers
            .iter()
            .filter_map(|(_, _, _, a)| a.as_ref().ok().map(|a| a.last_log_index))
            .max()
            .unwrap_or(0);
        let head = leader.map_or(newest, |(_, last)| last);
        let members = answers
            .into_iter()
            .map(|(id, addr, voter, answer)| match answer {
                Ok(a) => Member {
                    node_id: id,
                    addr,
                    voter,
                    role: a.role,
                    term: a.term,
                    last_log_index: a.last_log_index,
                    applied_index: a.applied_index,
                    lag: head.saturating_sub(a.applied_index),
                    error: String::new(),
                },
                Err(error) => Member {
                    node_id: id,
                    addr,
                    voter,
                    role: "unreachable".to_string(),
                    error,
                    ..Default::default()
                },
            })
            .collect();
        let now_ms = self.node.now_ms();
        let peer_bytes = self
            .node
            .peer_bytes_fetched
            .lock()
            .expect("metrics lock poisoned")
            .clone();
        let alive_ms = self.node.tuning.lease_timeout_ms;
        let workers = self
            .node
            .model()
            .workers()
            .iter()
            .map(|(id, w)| WorkerStatus {
                id: id.clone(),
                addr: w.addr.clone(),
                slots: w.slots,
                running: w.running,
                alive: now_ms.saturating_sub(w.last_seen_ms) < alive_ms,
                peer_bytes_fetched_total: peer_bytes.get(id).copied().unwrap_or(0),
            })
            .collect();
        let leader = leader
            .map(|(id, _)| id)
            .or(self.node.raft.metrics().borrow().current_leader)
            .unwrap_or(0);
        Ok(Response::new(ClusterStatusResponse {
            leader,
            members,
            workers,
            answered_by: self.node.node_id,
        }))
    }

    async fn add_node(
        &self,
        request: Request<AddNodeRequest>,
    ) -> Result<Response<ChangeMembershipResponse>, Status> {
        crate::secret::check(self.node.secret.as_ref(), request.metadata())?;
        let AddNodeRequest { node_id, addr } = request.into_inner();
        if node_id == 0 {
            return Err(Status::invalid_argument("node_id must be at least 1"));
        }
        let addr = addr.trim().to_string();
        if !crate::is_host_port(&addr) {
            return Err(Status::invalid_argument(format!(
                "addr {addr:?} is not HOST:PORT"
            )));
        }
        self.node.ready_leader().await?;
        settle_joint_config(&self.node).await?;
        let current = members(&self.node);
        if let Some((known, voter)) = current.get(&node_id) {
            if *known != addr {
                return Err(Status::already_exists(format!(
                    "node {node_id} is already a member at {known}; remove it first"
                )));
            }
            if *voter {
                return Ok(Response::new(ChangeMembershipResponse {
                    members: voters_of(&self.node),
                }));
            }
        }
        if let Some((other, _)) = current
            .iter()
            .find(|(id, (a, _))| **id != node_id && *a == addr)
        {
            return Err(Status::already_exists(format!(
                "node {other} already uses {addr}"
            )));
        }
        // Learner first: it catches up without counting in the quorum.
        bounded(
            CATCH_UP_DEADLINE,
            "catching up the new node",
            self.node
                .raft
                .add_learner(node_id, BasicNode { addr: addr.clone() }, true),
        )
        .await?;
        // Every source blob is on a quorum of voters: the new voter gets
        // a copy of each before it counts in a quorum.
        crate::replication::copy_all_to(&self.node, &addr).await?;
        change_voters(
            &self.node,
            "making the node a voter",
            ChangeMembers::AddVoterIds(BTreeSet::from([node_id])),
        )
        .await?;
        tracing::info!("coordinator {node_id} at {addr} joined the voters");
        Ok(Response::new(ChangeMembershipResponse {
            members: voters_of(&self.node),
        }))
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<ChangeMembershipResponse>, Status> {
        crate::secret::check(self.node.secret.as_ref(), request.metadata())?;
        let RemoveNodeRequest { node_id, force } = request.into_inner();
        self.node.ready_leader().await?;
        settle_joint_config(&self.node).await?;
        let current = members(&self.node);
        let Some((_, voter)) = current.get(&node_id) else {
            return Err(Status::not_found(format!("node {node_id} is not a member")));
        };
        let voters: BTreeSet<u64> = current
            .iter()
            .filter(|(_, (_, v))| *v)
            .map(|(id, _)| *id)
            .collect();
        if *voter {
            let remaining: BTreeSet<u64> =
                voters.iter().copied().filter(|id| *id != node_id).collect();
            if remaining.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "node {node_id} is the last voter; a cluster cannot remove all its voters"
                )));
            }
            // Which remaining voters answer now: the change needs a quorum
            // of the new configuration to commit, and the cluster needs one
            // after it to go on.
            let answers = statuses(&self.node).await;
            let up = answers
                .iter()
                .filter(|(id, _, _, a)| remaining.contains(id) && a.is_ok())
                .count();
            let quorum = remaining.len() / 2 + 1;
            if up < quorum && !force {
                return Err(Status::failed_precondition(format!(
                    "removing node {node_id} would leave {} voters of which only {up} are up, \
                     fewer than the {quorum} a quorum needs; bring nodes back first, or pass --force",
                    remaining.len()
                )));
            }
        }
        let change = if *voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([node_id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([node_id]))
        };
        change_voters(&self.node, "removing the node", change).await?;
        tracing::info!("coordinator {node_id} left the cluster");
        Ok(Response::new(ChangeMembershipResponse {
            members: voters_of(&self.node),
        }))
    }
}
