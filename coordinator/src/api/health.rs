//! What this replica answers on `grpc.health.v1`, per service, kept
//! current every [`CHECK_EVERY`]:
//!
//! - the client and worker APIs: SERVING on the leader that may serve
//!   (`Node::check_leader`: confirmed by a quorum, its leases extended);
//!   NOT_SERVING elsewhere (a follower redirects those callers);
//! - the Remote Execution API services: SERVING on that leader, and on a
//!   follower that knows a leader (it passes the calls on); the
//!   capabilities are answered by any replica;
//! - the admin API, the Raft transport and reflection: SERVING while the
//!   replica runs;
//! - "" (the whole server): SERVING when the leader may serve or a
//!   leader is known, NOT_SERVING during an election or without a quorum.
//!
//! So a load balancer that sends clients and workers to the one SERVING
//! `distbuild.v1.ClientApi` finds the leader, and one that asks "" finds
//! every replica that can take a call now.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    action_cache_server, capabilities_server, content_addressable_storage_server, execution_server,
};
use bazel_remote_apis::google::bytestream::byte_stream_server;
use distbuild_ops::health::{HealthReporter, ServingStatus, set_status};
use distbuild_proto::raft_v1::raft_transport_server;
use distbuild_proto::v1::{admin_api_server, client_api_server, worker_api_server};
use tokio_util::sync::CancellationToken;

use crate::replica::Node;

/// How often the statuses are brought up to date.
pub const CHECK_EVERY: Duration = Duration::from_millis(200);

/// Services a leader serves and a follower redirects.
pub const LEADER_ONLY: [&str; 2] = [
    client_api_server::SERVICE_NAME,
    worker_api_server::SERVICE_NAME,
];
/// Services a follower passes on to a leader it knows.
pub const FORWARDED: [&str; 4] = [
    content_addressable_storage_server::SERVICE_NAME,
    action_cache_server::SERVICE_NAME,
    execution_server::SERVICE_NAME,
    byte_stream_server::SERVICE_NAME,
];
/// Services every running replica answers itself.
pub const ALWAYS: [&str; 3] = [
    admin_api_server::SERVICE_NAME,
    raft_transport_server::SERVICE_NAME,
    capabilities_server::SERVICE_NAME,
];

/// Keeps `reporter` current until `shutdown`, then reports every service
/// NOT_SERVING.
pub async fn report(node: Arc<Node>, reporter: HealthReporter, shutdown: CancellationToken) {
    let mut last = HashMap::new();
    loop {
        let leads = node.check_leader().is_ok();
        let knows_leader = leads || node.current_leader().is_some_and(|l| l != node.node_id());
        let status = |on: bool| {
            if on {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        for service in LEADER_ONLY {
            set_status(&reporter, &mut last, service, status(leads)).await;
        }
        for service in FORWARDED {
            set_status(&reporter, &mut last, service, status(knows_leader)).await;
        }
        for service in ALWAYS {
            set_status(&reporter, &mut last, service, ServingStatus::Serving).await;
        }
        set_status(&reporter, &mut last, "", status(knows_leader)).await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
    for service in LEADER_ONLY
        .iter()
        .chain(&FORWARDED)
        .chain(&ALWAYS)
        .chain(&[""])
    {
        set_status(&reporter, &mut last, service, ServingStatus::NotServing).await;
    }
}
