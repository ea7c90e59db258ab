//! distbuild coordinator: keeps builds, job leases and the artifact index in
//! a Raft state machine (`state`, applied through `raft-store`), schedules
//! ready jobs onto workers, and serves clients, workers and operators over
//! gRPC (`service`).
//!
//! Only the leader proposes: it stamps its clock into every command, picks
//! work for polling workers, and expires leases through the log. Everything
//! it knows beyond the replicated state (open streams, pollers) is rebuilt
//! from that state.

pub mod blobs;
mod network;
pub mod node;
pub mod service;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use distbuild_proto::v1::admin_api_server::AdminApiServer;
use distbuild_proto::v1::client_api_server::ClientApiServer;
use distbuild_proto::v1::worker_api_server::WorkerApiServer;
use distbuild_proto::wire::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use node::{Clock, Node, SystemClock, Tuning};

/// `distbuild coordinator` flags.
#[derive(Debug, clap::Args)]
pub struct CoordinatorArgs {
    /// Address to serve clients and workers on (HOST:PORT).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Directory of the Raft log, the state and the source blobs.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// This replica's node ID.
    #[arg(long, default_value_t = 1)]
    pub node_id: u64,
    /// A job lease not renewed for this long expires and the job runs
    /// elsewhere.
    #[arg(long, default_value_t = 10_000)]
    pub lease_timeout_ms: u64,
    /// Lease expiries after which a job fails.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    /// How long a ready job waits for a free worker that holds its
    /// dependencies' outputs before any free worker may take it (0 turns
    /// locality off).
    #[arg(long, default_value_t = 50)]
    pub locality_wait_ms: u64,
}

/// Runs the coordinator from its flags until Ctrl-C or SIGTERM.
pub async fn run_cli(args: CoordinatorArgs) -> anyhow::Result<()> {
    if args.lease_timeout_ms < 100 {
        anyhow::bail!("--lease-timeout-ms must be at least 100");
    }
    if args.max_attempts == 0 {
        anyhow::bail!("--max-attempts must be at least 1");
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    let tuning = Tuning {
        lease_timeout_ms: args.lease_timeout_ms,
        heartbeat_interval_ms: (args.lease_timeout_ms / 4).max(25),
        max_attempts: args.max_attempts,
        locality_wait_ms: args.locality_wait_ms,
    };
    let config = Config {
        node_id: args.node_id,
        data_dir: args.data_dir,
        tuning,
    };
    run(config, listener, Arc::new(SystemClock), shutdown).await
}

async fn shutdown_on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    shutdown.cancel();
}

/// What a coordinator needs besides its socket.
pub struct Config {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub tuning: Tuning,
}

/// Serves on `listener` until `shutdown` is cancelled, then stops Raft.
pub async fn run(
    config: Config,
    listener: TcpListener,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("listener address")?;
    let node = Node::start(
        config.node_id,
        addr.to_string(),
        &config.data_dir,
        clock,
        config.tuning,
        shutdown.clone(),
    )
    .await?;
    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(expire_leases(node.clone(), shutdown.clone()));

    let client = ClientApiServer::new(service::client::ClientService { node: node.clone() })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let worker = WorkerApiServer::new(service::worker::WorkerService { node: node.clone() })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin = AdminApiServer::new(service::admin::AdminService { node: node.clone() });
    eprintln!("coordinator {} listening on {addr}", config.node_id);
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(client)
        .add_service(worker)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown.clone().cancelled_owned(),
        )
        .await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    node.raft.shutdown().await.context("stop raft")?;
    served.context("serve gRPC")
}

/// On the leader, proposes lease expiry whenever some lease ran out.
async fn expire_leases(node: Arc<Node>, shutdown: CancellationToken) {
    let period = Duration::from_millis((node.tuning.lease_timeout_ms / 4).clamp(25, 1000));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let now_ms = node.now_ms();
        if !node.is_leader() || !node.model().has_expired_lease(now_ms) {
            continue;
        }
        let command = state::Command::ExpireLeases {
            now_ms,
            max_attempts: node.tuning.max_attempts,
        };
        if let Err(status) = node.propose(command).await {
            tracing::warn!("expire leases: {}", status.message());
        }
    }
}
