//! Membership: who the members are, what each says of itself (cluster
//! status), and changing the voters through Raft — a new node joins as a
//! learner, catches up, receives every source blob, then becomes a voter;
//! a removal is refused without `force` when the voters left that answer
//! are not a quorum. A change runs in its own task (a caller giving up
//! cannot stop it between the joint and the final configuration), and a
//! change left joint by a failover is completed before the next one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use distbuild_proto::raft_v1::{NodeStatusRequest, NodeStatusResponse};
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};

use super::error::{ReplicaError, Result};
use super::node::Node;

/// How long one member may take to answer a status question.
const STATUS_DEADLINE: Duration = Duration::from_secs(1);
/// How long a new node may take to catch up as a learner.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(60);
/// How long a membership change may take to commit.
const CHANGE_DEADLINE: Duration = Duration::from_secs(20);

/// Why a member gave no status: its transport's answer, or silence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unanswered(String);

/// One member and what it said of itself.
#[derive(Debug, Clone)]
pub struct MemberAnswer {
    pub node_id: u64,
    pub addr: String,
    pub voter: bool,
    pub answer: std::result::Result<NodeStatusResponse, Unanswered>,
}

fn membership_error(e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> ReplicaError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            ReplicaError::Unavailable("leadership moved during the change; retry".to_string())
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(_),
        )) => {
            ReplicaError::Unavailable("another membership change is in progress; retry".to_string())
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ReplicaError::Precondition(e.to_string())
        }
        RaftError::Fatal(e) => ReplicaError::Unavailable(format!("raft stopped: {e}")),
    }
}

async fn bounded<T>(
    deadline: Duration,
    what: &str,
    change: impl std::future::Future<
        Output = std::result::Result<T, RaftError<u64, ClientWriteError<u64, BasicNode>>>,
    >,
) -> Result<T> {
    match tokio::time::timeout(deadline, change).await {
        Ok(result) => result.map_err(membership_error),
        Err(_) => Err(ReplicaError::TimedOut(format!(
            "{what} did not finish in {deadline:?}"
        ))),
    }
}

impl Node {
    /// Every member: ID -> (address, voter).
    pub fn members(&self) -> BTreeMap<u64, (String, bool)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, n)| (*id, (n.addr.clone(), voters.contains(id))))
            .collect()
    }

    /// The voters: ID and address.
    pub fn voters(&self) -> Vec<(u64, String)> {
        self.members()
            .into_iter()
            .filter(|(_, (_, voter))| *voter)
            .map(|(id, (addr, _))| (id, addr))
            .collect()
    }

    /// Asks one member for its Raft status (this node answers itself).
    async fn ask(
        &self,
        id: u64,
        addr: &str,
    ) -> std::result::Result<NodeStatusResponse, Unanswered> {
        if id == self.node_id {
            return Ok(self.status());
        }
        let mut client = self
            .peers
            .transport(addr)
            .map_err(|e| Unanswered(e.to_string()))?;
        let mut request = tonic::Request::new(NodeStatusRequest {});
        request.set_timeout(STATUS_DEADLINE);
        match tokio::time::timeout(STATUS_DEADLINE, client.node_status(request)).await {
            Ok(Ok(answer)) => Ok(answer.into_inner()),
            Ok(Err(status)) => {
                self.peers.forget(addr);
                Err(Unanswered(format!(
                    "{}: {}",
                    status.code(),
                    status.message()
                )))
            }
            Err(_) => {
                self.peers.forget(addr);
                Err(Unanswered(format!("no answer in {STATUS_DEADLINE:?}")))
            }
        }
    }

    /// Every member's status, asked concurrently.
    pub async fn member_statuses(&self) -> Vec<MemberAnswer> {
        let asks = self
            .members()
            .into_iter()
            .map(|(node_id, (addr, voter))| async move {
                let answer = self.ask(node_id, &addr).await;
                MemberAnswer {
                    node_id,
                    addr,
                    voter,
                    answer,
                }
            });
        futures::future::join_all(asks).await
    }

    /// Changes the voters through Raft's two phases (joint configuration,
    /// then the new one). The change runs in its own task, so a caller that
    /// gives up (a deadline, a dropped connection) does not stop it between
    /// the phases.
    async fn change_voters(
        &self,
        what: &str,
        changes: ChangeMembers<u64, BasicNode>,
    ) -> Result<()> {
        let raft = self.raft.clone();
        let change = tokio::spawn(async move { raft.change_membership(changes, false).await });
        match tokio::time::timeout(CHANGE_DEADLINE, change).await {
            Ok(Ok(result)) => result.map(drop).map_err(membership_error),
            Ok(Err(e)) => Err(ReplicaError::Internal(format!(
                "{what}: the change task failed: {e}"
            ))),
            Err(_) => Err(ReplicaError::TimedOut(format!(
                "{what} did not finish in {CHANGE_DEADLINE:?}; it goes on in the background"
            ))),
        }
    }

    /// Completes a membership change left in its joint configuration (its
    /// leader died, or lost leadership, between the two phases), so every
    /// check below sees one configuration of voters.
    async fn settle_joint_config(&self) -> Result<()> {
        let target = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            let configs = metrics.membership_config.membership().get_joint_config();
            if configs.len() < 2 {
                return Ok(());
            }
            configs.last().expect("two configurations").clone()
        };
        tracing::info!("completing a membership change left half done: voters {target:?}");
        self.change_voters(
            "completing the previous membership change",
            ChangeMembers::ReplaceAllVoters(target),
        )
        .await
    }

    /// Makes node `node_id` at `addr` (both checked) a voter: learner
    /// first, every source blob copied to it, then voter. A voter already
    /// at that address is left as it is.
    pub async fn add_node(&self, node_id: u64, addr: String) -> Result<()> {
        self.ready_leader().await?;
        self.settle_joint_config().await?;
        let current = self.members();
        if let Some((known, voter)) = current.get(&node_id) {
            if *known != addr {
                return Err(ReplicaError::AlreadyExists(format!(
                    "node {node_id} is already a member at {known}; remove it first"
                )));
            }
            if *voter {
                return Ok(());
            }
        }
        if let Some((other, _)) = current
            .iter()
            .find(|(id, (a, _))| **id != node_id && *a == addr)
        {
            return Err(ReplicaError::AlreadyExists(format!(
                "node {other} already uses {addr}"
            )));
        }
        // Learner first: it catches up without counting in the quorum.
        bounded(
            CATCH_UP_DEADLINE,
            "catching up the new node",
            self.raft
                .add_learner(node_id, BasicNode { addr: addr.clone() }, true),
        )
        .await?;
        // Every source blob is on a quorum of voters: the new voter gets
        // a copy of each before it counts in a quorum.
        super::replication::copy_all_to(self, &addr).await?;
        self.change_voters(
            "making the node a voter",
            ChangeMembers::AddVoterIds(BTreeSet::from([node_id])),
        )
        .await?;
        tracing::info!("coordinator {node_id} at {addr} joined the voters");
        Ok(())
    }

    /// Removes node `node_id` from the cluster; refused when it is the last
    /// voter, or (without `force`) when the voters left that answer now
    /// are fewer than a quorum of them.
    pub async fn remove_node(&self, node_id: u64, force: bool) -> Result<()> {
        self.ready_leader().await?;
        self.settle_joint_config().await?;
        let current = self.members();
        let Some((_, voter)) = current.get(&node_id) else {
            return Err(ReplicaError::NotFound(format!(
                "node {node_id} is not a member"
            )));
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
                return Err(ReplicaError::Precondition(format!(
                    "node {node_id} is the last voter; a cluster cannot remove all its voters"
                )));
            }
            // Which remaining voters answer now: the change needs a quorum
            // of the new configuration to commit, and the cluster needs one
            // after it to go on.
            let answers = self.member_statuses().await;
            let up = answers
                .iter()
                .filter(|a| remaining.contains(&a.node_id) && a.answer.is_ok())
                .count();
            let quorum = remaining.len() / 2 + 1;
            if up < quorum && !force {
                return Err(ReplicaError::Precondition(format!(
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
        self.change_voters("removing the node", change).await?;
        tracing::info!("coordinator {node_id} left the cluster");
        Ok(())
    }
}
