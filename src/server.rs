//! `distbuild server`: the local server of one workspace, started in the
//! background by `distbuild build` (see `distbuild_client::local`). It is
//! an ordinary single-node cluster: one coordinator and one worker in one
//! process, on loopback ports, with their state in the output base. It
//! exits on SIGTERM (`distbuild shutdown`) or after `--max-idle-secs`
//! during which no client command held the output base's lock.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use distbuild_client::local::{self, OutputBase, ServerInfo};
use distbuild_proto::auth::Access;
use distbuild_proto::net::TcpConnector;
use distbuild_proto::tls::{Security, TlsFiles, TlsMaterial};
use tokio_util::sync::CancellationToken;

/// `distbuild server` flags (the client passes them).
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// The directory of the server's state and files.
    #[arg(long, value_name = "DIR")]
    pub output_base: PathBuf,
    /// The workspace this server serves (for `distbuild info`).
    #[arg(long, value_name = "DIR")]
    pub workspace: PathBuf,
    /// Exit after this many seconds with no client command.
    #[arg(long, value_name = "SECS", default_value_t = local::DEFAULT_MAX_IDLE_SECS)]
    pub max_idle_secs: u64,
    /// Job slots of the local worker (default: the number of CPUs).
    #[arg(long, value_name = "N")]
    pub slots: Option<usize>,
    /// A path jobs may write besides their own directories (repeatable).
    #[arg(long = "sandbox-writable-path", value_name = "DIR")]
    pub sandbox_writable_paths: Vec<PathBuf>,
}

/// How often the server looks at the lock to measure idleness.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Runs the local server until SIGTERM, Ctrl-C or idleness.
pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let base = OutputBase {
        dir: std::path::absolute(&args.output_base).context("--output-base")?,
    };
    base.ensure_private()?;
    name_process(&args.workspace);
    // Fresh certificates at every start, in the owner-only output base:
    // a caller without them (another user) is refused.
    let tls = distbuild_client::certs::write_local_set(&base.tls_dir())?;
    let load = |files: &TlsFiles| -> anyhow::Result<Security> {
        Ok(Security::Tls(TlsMaterial::load(files)?))
    };
    let coordinator_security = load(&tls.coordinator)?;
    let worker_security = load(&tls.worker)?;
    let shutdown = CancellationToken::new();

    let coordinator_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("listen for the coordinator")?;
    let addr = coordinator_listener
        .local_addr()
        .context("coordinator address")?;
    let config = distbuild_coordinator::Config {
        node_id: 1,
        bootstrap: distbuild_coordinator::Bootstrap::Single,
        data_dir: base.dir.join("coordinator"),
        tuning: distbuild_coordinator::Tuning::default(),
        secret: None,
        security: coordinator_security.clone(),
    };
    let node = distbuild_coordinator::start_node(
        &config,
        addr,
        distbuild_coordinator::Seams::production(),
        shutdown.clone(),
    )
    .await?;
    let coordinator = tokio::spawn(distbuild_coordinator::serve(
        node.clone(),
        None,
        Access::for_security(&coordinator_security),
        coordinator_listener,
        shutdown.clone(),
    ));

    let worker_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("listen for the worker")?;
    let mut worker_config =
        distbuild_worker::WorkerConfig::new(vec![addr.to_string()], base.dir.join("cache"));
    worker_config.connector = std::sync::Arc::new(TcpConnector::new(&worker_security));
    worker_config.access = Access::for_security(&worker_security);
    worker_config.worker_id = Some(distbuild_client::certs::LOCAL_WORKER_NAME.to_string());
    // Jobs see nothing of the output base (the server's state, its keys,
    // the cache, other jobs) but their own directory.
    let sandbox = distbuild_worker::cli::keep_per_slot(
        distbuild_worker::cli::choose_sandbox(
            None,
            vec![base.dir.clone()],
            &args.sandbox_writable_paths,
            false,
        )?,
        &worker_config.cache_dir,
    );
    let (groups, limits) = distbuild_worker::cli::job_limits(
        distbuild_worker::sandbox::DEFAULT_MAX_PROCESSES,
        distbuild_worker::sandbox::DEFAULT_LIMITS.memory_bytes,
        distbuild_worker::sandbox::DEFAULT_LIMITS.file_bytes,
    );
    worker_config.runner = std::sync::Arc::new(distbuild_worker::process::TokioProcessRunner::new(
        sandbox, limits, groups,
    ));
    if let Some(slots) = args.slots {
        anyhow::ensure!(slots > 0, "--slots must be at least 1");
        worker_config.slots = slots;
    }
    let worker = tokio::spawn(distbuild_worker::run(
        worker_config,
        worker_listener,
        shutdown.clone(),
    ));

    // Serving once this single node leads.
    let deadline = tokio::time::Instant::now() + local::SERVER_START_TIMEOUT;
    while node.check_leader().is_err() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the coordinator did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = std::process::id();
    base.write_info(&ServerInfo {
        pid,
        addr: addr.to_string(),
        build_id: local::build_identity(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        workspace: args.workspace.clone(),
        started_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        sandbox_writable_paths: args.sandbox_writable_paths.clone(),
    })
    .with_context(|| format!("write {}", base.info_path().display()))?;
    eprintln!(
        "distbuild server {pid} for {} serving on {addr}",
        args.workspace.display()
    );

    let why = wait_for_the_end(&base, Duration::from_secs(args.max_idle_secs), &shutdown).await;
    eprintln!("distbuild server {pid}: stopping ({why})");
    // No new client finds it from here on.
    base.remove_info_of(pid);
    shutdown.cancel();
    let worker = worker.await.context("worker task")?;
    let coordinator = coordinator.await.context("coordinator task")?;
    worker.context("worker")?;
    coordinator.context("coordinator")?;
    Ok(())
}

/// Waits for SIGTERM, Ctrl-C, a failing part (`shutdown` cancelled), or
/// `max_idle` without a client holding the lock; says which.
async fn wait_for_the_end(
    base: &OutputBase,
    max_idle: Duration,
    shutdown: &CancellationToken,
) -> &'static str {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return "cannot watch SIGTERM";
    };
    let mut idle_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = term.recv() => return "asked to shut down",
            _ = tokio::signal::ctrl_c() => return "interrupted",
            () = shutdown.cancelled() => return "a part stopped",
            _ = tokio::time::sleep(IDLE_CHECK) => {}
        }
        if local::lock_is_free(base) {
            let since = *idle_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= max_idle {
                return "idle";
            }
        } else {
            idle_since = None;
        }
    }
}

/// Names the process `distbuild(<workspace directory name>)` (15 bytes at
/// most, the kernel's limit), so `ps` tells servers apart; the client
/// also starts it with that argv[0].
fn name_process(workspace: &std::path::Path) {
    let dir = workspace
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".to_string());
    let name: Vec<u8> = format!("distbuild({dir})")
        .into_bytes()
        .into_iter()
        .take(15)
        .chain(std::iter::once(0))
        .collect();
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes from the pointer, which `name` is for the duration of the call.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0);
    }
}
