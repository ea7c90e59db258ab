//! Operators' view and control of the cluster: status from every member,
//! and membership changes (the replica runs them: `replica::membership`).
//! Requests are checked here; the cluster secret guards the changes.

use std::sync::Arc;

use distbuild_proto::auth::caller;
use distbuild_proto::tls::Role;
use distbuild_proto::v1::admin_api_server::AdminApi;
use distbuild_proto::v1::{
    AddNodeRequest, ChangeMembershipResponse, ClusterStatusRequest, ClusterStatusResponse,
    DrainWorkerRequest, DrainWorkerResponse, Member, RemoveNodeRequest, WorkerStatus,
};
use distbuild_proto::wire::{PortUse, check_host_port};
use tonic::{Request, Response, Status};

use super::status::to_status;
use crate::replica::{MemberAnswer, Node};

pub struct AdminService {
    pub node: Arc<Node>,
}

/// The voters, as a membership change answers.
fn voters_of(node: &Node) -> Vec<Member> {
    node.voters()
        .into_iter()
        .map(|(node_id, addr)| Member {
            node_id,
            addr,
            voter: true,
            ..Default::default()
        })
        .collect()
}

/// The cluster as this node sees it: every member's answer (asked now),
/// the leader, and the registered workers.
pub async fn cluster_status(node: &Node) -> ClusterStatusResponse {
    let answers = node.member_statuses().await;
    let leader = answers
        .iter()
        .filter_map(|a| a.answer.as_ref().ok())
        .filter(|a| a.role == "leader")
        .max_by_key(|a| a.term)
        .map(|a| (a.node_id, a.last_log_index));
    let newest = answers
        .iter()
        .filter_map(|a| a.answer.as_ref().ok().map(|a| a.last_log_index))
        .max()
        .unwrap_or(0);
    let head = leader.map_or(newest, |(_, last)| last);
    let members = answers
        .into_iter()
        .map(
            |MemberAnswer {
                 node_id: id,
                 addr,
                 voter,
                 answer,
             }| match answer {
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
                    error: error.to_string(),
                    ..Default::default()
                },
            },
        )
        .collect();
    let now_ms = node.now_ms();
    let stats = node.worker_stats();
    let alive_ms = node.tuning().lease_timeout_ms;
    let workers = node
        .model()
        .workers()
        .iter()
        .map(|(id, w)| WorkerStatus {
            id: id.clone(),
            addr: w.addr.clone(),
            slots: w.slots,
            running: w.running,
            alive: now_ms.saturating_sub(w.last_seen_ms) < alive_ms,
            draining: w.draining,
            peer_bytes_fetched_total: stats.get(id).map_or(0, |s| s.peer_bytes_total),
            properties: w
                .properties
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect(),
        })
        .collect();
    let leader = leader
        .map(|(id, _)| id)
        .or(node.current_leader())
        .unwrap_or(0);
    ClusterStatusResponse {
        leader,
        members,
        workers,
        answered_by: node.node_id(),
    }
}

#[tonic::async_trait]
impl AdminApi for AdminService {
    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Ok(Response::new(cluster_status(&self.node).await))
    }

    async fn add_node(
        &self,
        request: Request<AddNodeRequest>,
    ) -> Result<Response<ChangeMembershipResponse>, Status> {
        caller(&request)?.require(&[Role::Admin], "changing membership")?;
        crate::secret::check(self.node.secret(), request.metadata())?;
        let AddNodeRequest { node_id, addr } = request.into_inner();
        if node_id == 0 {
            return Err(Status::invalid_argument("node_id must be at least 1"));
        }
        let addr = addr.trim().to_string();
        if check_host_port(&addr, PortUse::Dial).is_err() {
            return Err(Status::invalid_argument(format!(
                "addr {addr:?} is not HOST:PORT"
            )));
        }
        self.node.add_node(node_id, addr).await.map_err(to_status)?;
        Ok(Response::new(ChangeMembershipResponse {
            members: voters_of(&self.node),
        }))
    }

    async fn drain_worker(
        &self,
        request: Request<DrainWorkerRequest>,
    ) -> Result<Response<DrainWorkerResponse>, Status> {
        caller(&request)?.require(&[Role::Admin], "draining a worker")?;
        let worker_id = request.into_inner().worker_id;
        if distbuild_proto::tls::check_name(&worker_id).is_err() {
            return Err(Status::invalid_argument(format!(
                "worker_id {:?} is not a worker ID",
                distbuild_proto::text::shortened(&worker_id, 80)
            )));
        }
        let command = distbuild_model::Command::DrainWorker {
            worker_id: worker_id.clone(),
            now_ms: self.node.now_ms(),
        };
        match self.node.propose(command).await.map_err(to_status)? {
            distbuild_model::Response::Worker { found: true } => {
                Ok(Response::new(DrainWorkerResponse {}))
            }
            _ => Err(Status::not_found(format!(
                "worker {worker_id} is not registered"
            ))),
        }
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<ChangeMembershipResponse>, Status> {
        caller(&request)?.require(&[Role::Admin], "changing membership")?;
        crate::secret::check(self.node.secret(), request.metadata())?;
        let RemoveNodeRequest { node_id, force } = request.into_inner();
        self.node
            .remove_node(node_id, force)
            .await
            .map_err(to_status)?;
        Ok(Response::new(ChangeMembershipResponse {
            members: voters_of(&self.node),
        }))
    }
}
