//! Operators' view of the cluster.

use std::sync::Arc;

use distbuild_proto::v1::admin_api_server::AdminApi;
use distbuild_proto::v1::{ClusterStatusRequest, ClusterStatusResponse, Member, WorkerStatus};
use tonic::{Request, Response, Status};

use crate::node::Node;

pub struct AdminService {
    pub node: Arc<Node>,
}

#[tonic::async_trait]
impl AdminApi for AdminService {
    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let metrics = self.node.raft.metrics().borrow().clone();
        let members = metrics
            .membership_config
            .nodes()
            .map(|(id, node)| Member {
                node_id: *id,
                addr: node.addr.clone(),
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
        Ok(Response::new(ClusterStatusResponse {
            leader: metrics.current_leader.unwrap_or(0),
            members,
            workers,
        }))
    }
}
