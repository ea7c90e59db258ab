//! distbuild coordinator: keeps builds, job leases and the artifact index in
//! a Raft state machine (the `distbuild-model` crate, applied through
//! `raft-store` by the `replica`), schedules ready jobs onto workers, and
//! serves clients, workers and operators over gRPC (`api`).
//!
//! Layers, each importing only those below it: `api` → `replica` →
//! (`blobs`, `secret`) → the model and raft-store. Only the leader
//! proposes: it stamps its clock into every command, picks work for
//! polling workers, and expires leases through the log. Everything it knows
//! beyond the replicated state (open streams, pollers) is rebuilt from that
//! state.

pub mod api;
pub mod blobs;
pub mod replica;
pub mod secret;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bazel_remote_apis::build::bazel::remote::execution::v2::action_cache_server::ActionCacheServer;
use bazel_remote_apis::build::bazel::remote::execution::v2::capabilities_server::CapabilitiesServer;
use bazel_remote_apis::build::bazel::remote::execution::v2::content_addressable_storage_server::ContentAddressableStorageServer;
use bazel_remote_apis::build::bazel::remote::execution::v2::execution_server::ExecutionServer;
use bazel_remote_apis::google::bytestream::byte_stream_server::ByteStreamServer;
use distbuild_proto::auth::Access;
use distbuild_proto::raft_v1::raft_transport_server::RaftTransportServer;
use distbuild_proto::tls::{INSECURE_WARNING, Role, Security, SecurityFlags};
use distbuild_proto::v1::admin_api_server::AdminApiServer;
use distbuild_proto::v1::client_api_server::ClientApiServer;
use distbuild_proto::v1::worker_api_server::WorkerApiServer;
use distbuild_proto::wire::{MAX_MESSAGE_BYTES, PortUse, check_host_port};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

pub use replica::{
    ApplyObserver, Bootstrap, Clock, InjectedBugs, Node, Seams, SystemClock, Tuning,
};

/// `distbuild coordinator` flags.
#[derive(Debug, clap::Args)]
pub struct CoordinatorArgs {
    /// Address to serve clients and workers on (HOST:PORT).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Directory of the Raft log, the state and the source blobs.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// This replica's node ID (1 or more, unique in the cluster).
    #[arg(long, default_value_t = 1)]
    pub node_id: u64,
    /// The initial voters, the same list on every one of them:
    /// `1=HOST:PORT,2=HOST:PORT,3=HOST:PORT` (each node's --listen address
    /// as the others reach it). Used only while the data dir is pristine;
    /// without it (and without --join) a node is a cluster of one.
    #[arg(long, value_name = "ID=HOST:PORT[,...]", conflicts_with = "join")]
    pub initial_cluster: Option<String>,
    /// Start empty and wait to be added by `distbuild cluster add-node`.
    #[arg(long)]
    pub join: bool,
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
    /// Time limit of each job of a build that asks for none (`distbuild
    /// build --job-timeout`), in seconds: a job still running after it is
    /// killed with every process it started and fails.
    #[arg(long, default_value_t = 3_600)]
    pub default_job_timeout: u64,
    /// The longest time limit a build may ask for its jobs, in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub max_job_timeout: u64,
    /// A source blob no build in flight needs is deleted once unused for
    /// this long, in seconds (uploaded or named by a build last).
    #[arg(long, default_value_t = 3 * 86_400)]
    pub blob_retention: u64,
    /// Bytes of source blobs kept: past it the least recently used that
    /// no build in flight needs are deleted, and an upload that cannot fit
    /// even so is refused.
    #[arg(long, default_value_t = 20 << 30)]
    pub max_blob_bytes: u64,
    /// Cached job results kept (least recently used out).
    #[arg(long, default_value_t = 200_000)]
    pub max_cached_results: u64,
    /// Bytes of cached job results (records and captured output) kept.
    #[arg(long, default_value_t = 1 << 30)]
    pub max_cached_result_bytes: u64,
    /// How often the leader collects garbage, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub gc_interval_ms: u64,
    /// How old (seconds) a blob file the state does not record must be
    /// before this replica deletes it. A blob is written and copied to the
    /// other replicas before its record is applied, so this must exceed the
    /// longest upload and copy plus a replica's lag; lower it only for
    /// tests and benchmarks.
    #[arg(long, default_value_t = 3_600)]
    pub blob_sweep_grace: u64,
    /// A file holding the cluster secret (16 to 1024 printable ASCII
    /// characters), the same on every coordinator: Raft traffic between
    /// them and `cluster add-node`/`remove-node` must show it. Without it
    /// anyone who reaches the port can speak Raft to this coordinator.
    #[arg(long, value_name = "FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// TLS and authentication (a coordinator certificate), or
    /// `--insecure`.
    #[command(flatten)]
    pub security: SecurityFlags,
    /// The metrics and status page port.
    #[command(flatten)]
    pub http: distbuild_ops::http::HttpFlags,
}

/// The longest `--max-job-timeout` (a year): beyond it a limit is no limit.
const MAX_JOB_TIMEOUT_SECS: u64 = 366 * 24 * 3600;

/// Runs the coordinator from its flags until Ctrl-C or SIGTERM.
pub async fn run_cli(args: CoordinatorArgs) -> anyhow::Result<()> {
    if args.lease_timeout_ms < 100 {
        anyhow::bail!("--lease-timeout-ms must be at least 100");
    }
    if args.max_attempts == 0 {
        anyhow::bail!("--max-attempts must be at least 1");
    }
    if args.node_id == 0 {
        anyhow::bail!("--node-id must be at least 1");
    }
    if args.gc_interval_ms < 100 {
        anyhow::bail!("--gc-interval-ms must be at least 100");
    }
    if args.max_job_timeout == 0 || args.max_job_timeout > MAX_JOB_TIMEOUT_SECS {
        anyhow::bail!("--max-job-timeout must be 1 to {MAX_JOB_TIMEOUT_SECS} seconds");
    }
    if args.default_job_timeout == 0 || args.default_job_timeout > args.max_job_timeout {
        anyhow::bail!(
            "--default-job-timeout must be 1 to --max-job-timeout ({}) seconds",
            args.max_job_timeout
        );
    }
    let bootstrap = match (&args.initial_cluster, args.join) {
        (Some(list), _) => Bootstrap::Initial(parse_initial_cluster(list, args.node_id)?),
        (None, true) => Bootstrap::Join,
        (None, false) => Bootstrap::Single,
    };
    let security = args.security.load(&[Role::Coordinator])?;
    if matches!(security, Security::Insecure) {
        tracing::warn!("{INSECURE_WARNING}");
    }
    let secret = args
        .cluster_secret_file
        .as_deref()
        .map(secret::ClusterSecret::from_file)
        .transpose()?;
    if secret.is_none()
        && matches!(security, Security::Insecure)
        && !args.listen.ip().is_loopback()
        && args.initial_cluster.is_some()
    {
        tracing::warn!(
            "no --cluster-secret-file: anyone who reaches {} can send Raft messages to this coordinator",
            args.listen
        );
    }
    let http = distbuild_ops::http::HttpPort::bind(&args.http, &security).await?;
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
        default_job_timeout_ms: args.default_job_timeout * 1000,
        max_job_timeout_ms: args.max_job_timeout * 1000,
        gc_interval_ms: args.gc_interval_ms,
        blob_sweep_grace_ms: args.blob_sweep_grace.saturating_mul(1000),
        gc: distbuild_model::GcLimits {
            blob_retention_ms: args.blob_retention.saturating_mul(1000),
            max_blob_bytes: args.max_blob_bytes,
            max_results: args.max_cached_results,
            max_result_bytes: args.max_cached_result_bytes,
        },
    };
    let config = Config {
        node_id: args.node_id,
        bootstrap,
        data_dir: args.data_dir,
        tuning,
        secret,
        security,
    };
    let addr = listener.local_addr().context("listener address")?;
    let node = start_node(&config, addr, Seams::production(), shutdown.clone()).await?;
    if let Some(http) = http {
        tokio::spawn(http.serve(
            api::http::routes(node.clone()),
            api::http::public_routes(),
            shutdown.clone(),
        ));
    }
    let access = Access::for_security(&config.security);
    serve(node, config.secret, access, listener, shutdown).await
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

/// Parses `--initial-cluster`: `ID=HOST:PORT` pairs, IDs unique and at
/// least 1, addresses unique, `node_id` among them.
pub fn parse_initial_cluster(
    list: &str,
    node_id: u64,
) -> anyhow::Result<std::collections::BTreeMap<u64, String>> {
    let mut members = std::collections::BTreeMap::new();
    for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((id, addr)) = item.split_once('=') else {
            anyhow::bail!("--initial-cluster: {item:?} is not ID=HOST:PORT");
        };
        let id: u64 = id.trim().parse().ok().filter(|id| *id > 0).ok_or_else(|| {
            anyhow::anyhow!("--initial-cluster: {id:?} is not a node ID (1 or more)")
        })?;
        let addr = addr.trim();
        if check_host_port(addr, PortUse::Dial).is_err() {
            anyhow::bail!("--initial-cluster: {addr:?} (node {id}) is not HOST:PORT");
        }
        if members.values().any(|a| a == addr) {
            anyhow::bail!("--initial-cluster: address {addr} is listed twice");
        }
        if members.insert(id, addr.to_string()).is_some() {
            anyhow::bail!("--initial-cluster: node {id} is listed twice");
        }
    }
    if !members.contains_key(&node_id) {
        anyhow::bail!("--initial-cluster does not list this node (--node-id {node_id})");
    }
    Ok(members)
}

/// What a coordinator needs besides its socket.
pub struct Config {
    pub node_id: u64,
    pub bootstrap: Bootstrap,
    pub data_dir: PathBuf,
    pub tuning: Tuning,
    /// The cluster secret peers and operators must show, if any.
    pub secret: Option<secret::ClusterSecret>,
    /// TLS and authentication, or none.
    pub security: Security,
}

/// Serves on `listener` until `shutdown` is cancelled, then stops Raft.
pub async fn run(
    config: Config,
    listener: TcpListener,
    seams: Seams,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("listener address")?;
    let node = start_node(&config, addr, seams, shutdown.clone()).await?;
    let access = Access::for_security(&config.security);
    serve(node, config.secret, access, listener, shutdown).await
}

/// Opens the store and starts Raft for a replica that will serve at
/// `addr` (see [`serve`]).
pub async fn start_node(
    config: &Config,
    addr: SocketAddr,
    seams: Seams,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<Node>> {
    Node::start(
        config.node_id,
        addr.to_string(),
        config.bootstrap.clone(),
        &config.data_dir,
        seams,
        config.tuning.clone(),
        config.secret.clone(),
        config.security.client_config(),
        shutdown,
    )
    .await
}

/// Runs `node`'s duties and serves its APIs on `listener` until
/// `shutdown` is cancelled, then stops Raft.
pub async fn serve(
    node: Arc<Node>,
    secret: Option<secret::ClusterSecret>,
    access: Access,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("listener address")?;
    eprintln!("coordinator {} listening on {addr}", node.node_id());
    // No Nagle on accepted connections: an answer written in pieces would
    // otherwise wait for the caller's delayed ACK.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    match access.tls.clone() {
        Some(acceptor) => {
            let incoming = distbuild_proto::accept::tls(incoming, acceptor);
            serve_incoming(node, secret, access, incoming, shutdown).await
        }
        None => serve_incoming(node, secret, access, incoming, shutdown).await,
    }
}

/// [`serve`] on any stream of accepted connections: the listener seam (a
/// simulation passes its simulated sockets). `access` says how connections
/// and callers are admitted; each service admits its roles.
pub async fn serve_incoming<I, IO, IE>(
    node: Arc<Node>,
    secret: Option<secret::ClusterSecret>,
    access: Access,
    incoming: I,
    shutdown: CancellationToken,
) -> anyhow::Result<()>
where
    I: futures::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use tracing::Instrument as _;
    // Every line a duty logs names the replica.
    let span = tracing::info_span!("coordinator", node_id = node.node_id());
    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(replica::leader_duties(node.clone(), shutdown.clone()).instrument(span.clone()));
    tasks.spawn(replica::expire_leases(node.clone(), shutdown.clone()).instrument(span.clone()));
    tasks.spawn(replica::collect_garbage(node.clone(), shutdown.clone()).instrument(span.clone()));
    tasks.spawn(replica::sweep_blobs(node.clone(), shutdown.clone()).instrument(span.clone()));
    tasks.spawn(replica::drive_elections(node.clone(), shutdown.clone()).instrument(span.clone()));

    let (health_reporter, health) = distbuild_ops::health::health_reporter();
    tasks.spawn(
        api::health::report(node.clone(), health_reporter, shutdown.clone()).instrument(span),
    );
    let health = InterceptedService::new(health, access.authorize("health checks", &Role::ALL));
    let (reflection, reflection_alpha) = distbuild_ops::health::reflection();
    let reflection =
        InterceptedService::new(reflection, access.authorize("gRPC reflection", &Role::ALL));
    let reflection_alpha = InterceptedService::new(
        reflection_alpha,
        access.authorize("gRPC reflection", &Role::ALL),
    );

    let rates = api::rate::CallerRates::default();
    let kept_blob_bytes = Arc::new(api::KeptBlobBytes::default());
    let client = InterceptedService::new(
        ClientApiServer::new(api::client::ClientService {
            node: node.clone(),
            watchers: api::watch::Watchers::default(),
            rates: rates.clone(),
            kept_blob_bytes: kept_blob_bytes.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES),
        access.authorize("the client API", &[Role::Client]),
    );
    // The Remote Execution API, for its clients (Bazel and others) on the
    // same address.
    // A follower passes the calls on to the leader (`reapi::forward`), as a
    // coordinator: the leader admits that role too.
    let reapi = |what: &'static str| access.authorize(what, &[Role::Client, Role::Coordinator]);
    use api::reapi::forward::Forward;
    let capabilities = InterceptedService::new(
        CapabilitiesServer::new(api::reapi::capabilities::CapabilitiesService),
        reapi("the Remote Execution API"),
    );
    let cas = InterceptedService::new(
        Forward::new(
            node.clone(),
            ContentAddressableStorageServer::new(api::reapi::cas::CasService {
                node: node.clone(),
                kept_blob_bytes: kept_blob_bytes.clone(),
                rates: rates.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ),
        reapi("the Remote Execution API"),
    );
    let action_cache = InterceptedService::new(
        Forward::new(
            node.clone(),
            ActionCacheServer::new(api::reapi::action_cache::ActionCacheService {
                node: node.clone(),
                rates: rates.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ),
        reapi("the Remote Execution API"),
    );
    let bytestream = InterceptedService::new(
        Forward::new(
            node.clone(),
            ByteStreamServer::new(api::reapi::bytestream::ByteStreamService {
                node: node.clone(),
                kept_blob_bytes: kept_blob_bytes.clone(),
                rates: rates.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ),
        reapi("the Remote Execution API"),
    );
    let execution = InterceptedService::new(
        Forward::new(
            node.clone(),
            ExecutionServer::new(api::reapi::execution::ExecutionService {
                node: node.clone(),
                rates: rates.clone(),
                streams: Arc::new(tokio::sync::Semaphore::new(
                    api::reapi::execution::MAX_OPERATION_STREAMS,
                )),
                checks: Arc::new(tokio::sync::Semaphore::new(
                    api::reapi::execution::MAX_CHECKS_AT_ONCE,
                )),
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ),
        reapi("the Remote Execution API"),
    );
    let worker = InterceptedService::new(
        WorkerApiServer::new(api::worker::WorkerService {
            node: node.clone(),
            rates,
            kept_blob_bytes: kept_blob_bytes.clone(),
            drains: Arc::default(),
            picks: Default::default(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES),
        access.authorize("the worker API", &[Role::Worker]),
    );
    // Status is for anyone of the cluster; membership changes check for
    // the admin role themselves.
    let admin = InterceptedService::new(
        AdminApiServer::new(api::admin::AdminService { node: node.clone() }),
        access.authorize("the admin API", &Role::ALL),
    );
    let raft = InterceptedService::new(
        RaftTransportServer::new(api::raft::RaftService { node: node.clone() })
            .max_decoding_message_size(replica::network::MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(replica::network::MAX_RAFT_MESSAGE_BYTES),
        secret::RequireSecret(secret),
    );
    let raft = InterceptedService::new(
        raft,
        access.authorize("the Raft transport", &[Role::Coordinator]),
    );
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(node.grpc_metrics().layer())
        .add_service(client)
        .add_service(worker)
        .add_service(admin)
        .add_service(raft)
        .add_service(capabilities)
        .add_service(cas)
        .add_service(bytestream)
        .add_service(action_cache)
        .add_service(execution)
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
        .await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    node.stop_raft().await?;
    served.context("serve gRPC")
}
