//! `distbuild cluster drain-worker`: asks the leader to drain a worker
//! (it takes no new work, finishes what it runs, hands off the outputs
//! builds still need from it, deregisters and exits), then waits until it
//! has left.

use std::io::Write;
use std::time::Duration;

use distbuild_proto::tls::Role;
use distbuild_proto::v1::DrainWorkerRequest;

use crate::args::DrainWorkerArgs;
use crate::cluster::{CallError, Cluster, RPC_TIMEOUT};
use crate::connect::{Connector, admin_api};
use crate::exit_code;
use crate::render::Console;
use crate::status::fetch_status;

/// How often the cluster is asked whether the worker left.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Runs `distbuild cluster drain-worker` over real TCP connections;
/// returns the process exit code.
pub async fn drain_worker_cli(args: DrainWorkerArgs) -> i32 {
    let mut console = Console::stdio();
    match args.connection.connector(&[Role::Admin]) {
        Ok(connector) => run_drain_worker(args, connector, console).await,
        Err(e) => console.fail(exit_code::BAD_INPUT, e),
    }
}

/// Runs `distbuild cluster drain-worker` through `connector`: 0 when the
/// worker left (or, with `--no-wait`, was told to), 2 for an unknown
/// worker, 3 when the cluster could not be reached, 1 when the worker was
/// still registered after `--wait-timeout`.
pub async fn run_drain_worker(
    args: DrainWorkerArgs,
    connector: Connector,
    mut console: Console,
) -> i32 {
    let addrs = match args.connection.addresses() {
        Ok(addrs) => addrs,
        Err(message) => return console.fail(exit_code::BAD_INPUT, message),
    };
    let worker_id = args.worker_id.trim().to_string();
    if distbuild_proto::tls::check_name(&worker_id).is_err() {
        return console.fail(
            exit_code::BAD_INPUT,
            format!(
                "{:?} is not a worker ID (1 to 64 characters of [A-Za-z0-9._-])",
                distbuild_proto::text::shortened(&worker_id, 80)
            ),
        );
    }
    let cluster = Cluster::new(connector, addrs, args.connection.patience());
    let drained = cluster
        .call(
            &format!("drain worker {worker_id}"),
            Some(RPC_TIMEOUT),
            |channel| {
                let request = DrainWorkerRequest {
                    worker_id: worker_id.clone(),
                };
                async move { Ok(admin_api(channel).drain_worker(request).await?.into_inner()) }
            },
        )
        .await;
    match drained {
        Ok(_) => {}
        Err(e @ CallError::Rejected { .. }) if e.exit_code() == exit_code::BUILD_FAILED => {
            // NOT_FOUND: an unknown worker is a mistake in the request.
            return console.fail(exit_code::BAD_INPUT, e);
        }
        Err(e) => return console.fail(e.exit_code(), e),
    }
    let _ = writeln!(console.out, "worker {worker_id} is draining");
    if args.no_wait {
        return exit_code::OK;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.wait_timeout);
    loop {
        match fetch_status(&cluster).await {
            Ok(status) if !status.workers.iter().any(|w| w.id == worker_id) => {
                let _ = writeln!(console.out, "worker {worker_id} left");
                let _ = console.out.flush();
                return exit_code::OK;
            }
            Ok(_) => {}
            Err(e) => return console.fail(e.exit_code(), e),
        }
        if tokio::time::Instant::now() >= deadline {
            return console.fail(
                exit_code::BUILD_FAILED,
                format!(
                    "worker {worker_id} is still registered after {} s (it drains: it finishes its jobs first)",
                    args.wait_timeout
                ),
            );
        }
        tokio::time::sleep(CHECK_EVERY).await;
    }
}
