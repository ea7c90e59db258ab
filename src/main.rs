//! `distbuild`: the one binary users run. Each subcommand's flags and
//! behaviour live in its crate; this file only dispatches and maps failures
//! to exit codes.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod server;

/// Distributed build execution: a Raft-replicated coordinator schedules a
/// build graph's jobs onto workers, caching results by content.
#[derive(Parser, Debug)]
#[command(name = "distbuild", version, about)]
struct Cli {
    /// How log lines are written (to stderr): `text` for people, `json`
    /// (one object per line, the fields of its spans — build, job, worker
    /// and node IDs — included) for log collectors. `DISTBUILD_LOG` picks
    /// what is logged (`debug`, `distbuild_worker=debug`, ...).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// What a server logs by default: its start, leadership changes, jobs
/// that could not run, warnings and errors. openraft logs every failed
/// call to a peer; the coordinator logs a peer that stays silent instead.
const SERVER_LOG: &str = "warn,distbuild=info,distbuild_coordinator=info,distbuild_worker=info,distbuild_ops=info,openraft=off";
/// What a command-line client logs by default: warnings and errors.
const CLIENT_LOG: &str = "warn,openraft=off";

fn init_logs(format: LogFormat, server: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("DISTBUILD_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(if server { SERVER_LOG } else { CLIENT_LOG })
        });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a build graph on the cluster and stream its results.
    Build(distbuild_client::BuildArgs),
    /// Serve as a coordinator replica.
    Coordinator(distbuild_coordinator::CoordinatorArgs),
    /// Serve as a worker: run jobs, keep and serve their outputs.
    Worker(distbuild_worker::WorkerArgs),
    /// Inspect the cluster, change its coordinators.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The workspace's local server: output base, pid, address, version,
    /// uptime.
    Info(distbuild_client::LocalArgs),
    /// Let a Remote Execution API client without TLS (Debian's Bazel) use
    /// a TLS cluster: on loopback, for this user only, with this user's
    /// client certificate.
    ReapiProxy(distbuild_client::reapi_proxy::ReapiProxyArgs),
    /// Make a cluster's CA and certificates (TLS and roles).
    #[command(subcommand)]
    Certs(distbuild_client::certs::CertsCommand),
    /// Stop the workspace's local server.
    Shutdown(distbuild_client::LocalArgs),
    /// Run as a workspace's local server (started by `distbuild build`).
    #[command(hide = true)]
    Server(server::ServerArgs),
    /// Run as a worker slot's sandbox init (started by the worker inside
    /// bubblewrap, its stdin the worker's socket).
    #[command(hide = true)]
    SandboxInit,
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// The leader, the members, and the connected workers.
    Status(distbuild_client::ClusterStatusArgs),
    /// Add a coordinator (started with --join) as a voter: it catches up as
    /// a learner first.
    AddNode(distbuild_client::AddNodeArgs),
    /// Remove a coordinator from the voters.
    RemoveNode(distbuild_client::RemoveNodeArgs),
    /// Drain a worker: it takes no new work, finishes what it runs, hands
    /// off the outputs builds still need from it, deregisters and exits.
    DrainWorker(distbuild_client::DrainWorkerArgs),
}

/// Exit code of a server that stopped on an error (bad flags are 2).
const EXIT_SERVER_FAILED: u8 = 1;

/// jemalloc, not glibc's malloc: glibc keeps a server's big transient
/// buffers (a 100,000-job submit's request, graph and write batch)
/// resident after they are freed, beside what came after them (a
/// 100,000-job coordinator stayed at 340 MiB after its submit), where
/// jemalloc hands them back (140 MiB).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Single-threaded, without logs or a runtime: it forks its commands.
    if matches!(cli.command, Command::SandboxInit) {
        return ExitCode::from(distbuild_worker::sandbox::init::main());
    }
    let server = matches!(
        cli.command,
        Command::Coordinator(_) | Command::Worker(_) | Command::Server(_)
    );
    init_logs(cli.log_format, server);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            return ExitCode::from(EXIT_SERVER_FAILED);
        }
    };
    let code: i32 = runtime.block_on(async move {
        let server = match cli.command {
            Command::Build(args) => return distbuild_client::build_cli(args).await,
            Command::Cluster(ClusterCommand::Status(args)) => {
                return distbuild_client::cluster_status_cli(args).await;
            }
            Command::Cluster(ClusterCommand::AddNode(args)) => {
                return distbuild_client::add_node_cli(args).await;
            }
            Command::Cluster(ClusterCommand::RemoveNode(args)) => {
                return distbuild_client::remove_node_cli(args).await;
            }
            Command::Cluster(ClusterCommand::DrainWorker(args)) => {
                return distbuild_client::drain_worker_cli(args).await;
            }
            Command::Certs(command) => return distbuild_client::certs::certs_cli(command),
            Command::ReapiProxy(args) => {
                return distbuild_client::reapi_proxy::reapi_proxy_cli(args).await;
            }
            Command::Info(args) => return distbuild_client::info_cli(args).await,
            Command::Shutdown(args) => return distbuild_client::shutdown_cli(args).await,
            Command::Server(args) => server::run(args).await,
            Command::Coordinator(args) => distbuild_coordinator::run_cli(args).await,
            Command::Worker(args) => distbuild_worker::run_cli(args).await,
            Command::SandboxInit => unreachable!("run before the runtime starts"),
        };
        match server {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e:#}");
                EXIT_SERVER_FAILED.into()
            }
        }
    });
    // Streams still draining (for example a watcher's task) must not keep
    // the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    ExitCode::from(u8::try_from(code).unwrap_or(EXIT_SERVER_FAILED))
}
