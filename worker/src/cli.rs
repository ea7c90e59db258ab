//! `distbuild worker`: the command-line flags and the process-level wiring
//! (binding the listener, Ctrl-C and SIGTERM) around [`run`].

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use distbuild_proto::auth::Access;
use distbuild_proto::tls::{INSECURE_WARNING, Role, Security, SecurityFlags};
use distbuild_proto::wire::PortUse;
use tokio_util::sync::CancellationToken;

use crate::cgroup::{GroupLimits, JobLimiter};
use crate::connect::TcpConnector;
use crate::process::TokioProcessRunner;
use crate::runtime::{DEFAULT_CACHE_MAX_BYTES, WorkerConfig, default_slots, run};
use crate::sandbox::{
    DEFAULT_LIMITS, DEFAULT_MAX_PROCESSES, JobLimits, Sandbox, SandboxError, SandboxKind,
};

/// Flags of `distbuild worker`.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Coordinator addresses, HOST:PORT, comma-separated; the first that
    /// answers is used, and the leader is followed.
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        value_name = "HOST:PORT[,...]"
    )]
    pub coordinator: Vec<String>,
    /// Where to serve artifacts to peers.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// Directory for the cache, sandboxes and the worker's ID.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: PathBuf,
    /// Jobs run at once (default: the number of CPUs).
    #[arg(long, value_name = "N")]
    pub slots: Option<usize>,
    /// Leases held beyond the slots (0 to the slots; default: as many as
    /// the slots): a job held ahead starts as soon as a slot frees, while
    /// the report of the job before it is on its way. The leader gives
    /// them only while no other worker has a free slot.
    #[arg(long, value_name = "N")]
    pub jobs_ahead: Option<usize>,
    /// A platform property, KEY=VALUE (repeatable, at most 64): what
    /// Remote Execution API actions may ask a worker for (OSFamily=Linux,
    /// pool=large, ...).
    #[arg(long = "property", value_name = "KEY=VALUE")]
    pub properties: Vec<String>,
    /// Bound on the cache's size in bytes.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CACHE_MAX_BYTES)]
    pub cache_max_bytes: u64,
    /// Peer address announced to coordinators, when peers must use another
    /// address than --listen (default: the address actually listened on).
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// TLS and authentication (a worker certificate, whose name is the
    /// worker's ID), or `--insecure`.
    #[command(flatten)]
    pub security: SecurityFlags,
    /// The metrics port.
    #[command(flatten)]
    pub http: distbuild_ops::http::HttpFlags,
    /// On SIGTERM (or `cluster drain-worker`) the worker takes no new
    /// work, lets running jobs finish, hands off the outputs builds still
    /// need from it, deregisters and exits; past this many seconds it
    /// stops its jobs (they run elsewhere) and leaves anyway. A second
    /// SIGTERM or Ctrl-C stops it at once.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub drain_timeout: u64,
    /// How jobs are confined: `namespaces` (bubblewrap; the default where
    /// it works here) or `none` (jobs run unconfined, with a warning).
    #[arg(long, value_enum, value_name = "KIND")]
    pub sandbox: Option<SandboxKind>,
    /// A path jobs may write besides their own directory (repeatable), as
    /// Bazel's --sandbox_writable_path.
    #[arg(long = "sandbox-writable-path", value_name = "DIR")]
    pub sandbox_writable_paths: Vec<PathBuf>,
    /// Let jobs use the network (by default a sandboxed job has none).
    #[arg(long)]
    pub sandbox_network: bool,
    /// Memory of a job command's processes together, in bytes (0: no
    /// limit), through the memory cgroup; where there is none, each
    /// process's address space is bounded instead.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_LIMITS.memory_bytes)]
    pub job_max_memory: u64,
    /// Largest file a job may write, in bytes (0: no limit).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_LIMITS.file_bytes)]
    pub job_max_file_bytes: u64,
    /// Processes a job command may run at once, the sandbox's own
    /// included (0: no limit), through the pids cgroup; where there is
    /// none, the worker warns and runs without this limit.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_PROCESSES)]
    pub job_max_processes: u64,
}

/// Checks that `addr` is HOST:PORT as every side accepts it
/// ([`distbuild_proto::wire::check_host_port`]; port 0 only to listen on);
/// the error names the flag.
pub fn check_host_port(flag: &str, addr: &str, port_use: PortUse) -> anyhow::Result<()> {
    anyhow::ensure!(
        distbuild_proto::wire::check_host_port(addr, port_use).is_ok(),
        "--{flag}: {addr:?} is not HOST:PORT"
    );
    Ok(())
}

impl WorkerArgs {
    /// The configuration these flags describe, or a one-line error.
    pub fn to_config(&self) -> anyhow::Result<WorkerConfig> {
        self.configure().map(|(config, _)| config)
    }

    /// [`WorkerArgs::to_config`], with the security it loaded (for the
    /// metrics port: the TLS files are read once).
    fn configure(&self) -> anyhow::Result<(WorkerConfig, Security)> {
        anyhow::ensure!(
            !self.coordinator.is_empty(),
            "--coordinator: at least one address is needed"
        );
        for addr in &self.coordinator {
            check_host_port("coordinator", addr, PortUse::Dial)?;
        }
        check_host_port("listen", &self.listen, PortUse::Listen)?;
        if let Some(addr) = &self.advertise {
            check_host_port("advertise", addr, PortUse::Dial)?;
        }
        anyhow::ensure!(self.slots != Some(0), "--slots: must be at least 1");
        let slots = self.slots.unwrap_or_else(default_slots);
        let jobs_ahead = self.jobs_ahead.unwrap_or(slots);
        anyhow::ensure!(
            jobs_ahead <= slots,
            "--jobs-ahead: must be at most --slots ({slots}), not {jobs_ahead}"
        );
        anyhow::ensure!(
            self.cache_max_bytes > 0,
            "--cache-max-bytes: must be at least 1"
        );
        // Jobs run with their sandbox as working directory, so every path
        // the worker hands them must be absolute.
        let cache_dir = std::path::absolute(&self.cache_dir)
            .map_err(|e| anyhow::anyhow!("--cache-dir {}: {e}", self.cache_dir.display()))?;
        let mut config = WorkerConfig::new(self.coordinator.clone(), cache_dir);
        config.slots = slots;
        config.jobs_ahead = Some(jobs_ahead);
        config.properties = distbuild_proto::wire::parse_properties(&self.properties)
            .map_err(|e| anyhow::anyhow!("--property: {e}"))?;
        config.cache_max_bytes = self.cache_max_bytes;
        config.advertise_addr = self.advertise.clone();
        if self.drain_timeout == 0 || self.drain_timeout > 86_400 {
            anyhow::bail!("--drain-timeout: must be 1 to 86400 seconds");
        }
        config.drain_timeout = std::time::Duration::from_secs(self.drain_timeout);
        let security = self.security.load(&[Role::Worker])?;
        if matches!(security, Security::Insecure) {
            tracing::warn!("{INSECURE_WARNING}");
        }
        config.worker_id = security.identity().map(|identity| identity.name.clone());
        // Jobs must not see the worker's cache, other jobs or its key.
        std::fs::create_dir_all(&config.cache_dir)
            .with_context(|| format!("create cache directory {}", config.cache_dir.display()))?;
        let mut hidden = vec![config.cache_dir.clone()];
        if let Some(key) = &self.security.tls_key {
            hidden.push(std::path::absolute(key).unwrap_or_else(|_| key.clone()));
        }
        let (groups, limits) = job_limits(
            self.job_max_processes,
            self.job_max_memory,
            self.job_max_file_bytes,
        );
        let sandbox = keep_per_slot(
            choose_sandbox(
                self.sandbox.clone(),
                hidden,
                &self.sandbox_writable_paths,
                self.sandbox_network,
            )?,
            &config.cache_dir,
        );
        config.runner = std::sync::Arc::new(TokioProcessRunner::new(sandbox, limits, groups));
        config.connector = std::sync::Arc::new(TcpConnector::new(&security));
        config.access = Access::for_security(&security);
        Ok((config, security))
    }
}

/// The per-job limits: processes and memory through cgroups where the
/// kernel offers them to this worker, the rest (the file size; memory
/// where there is no memory cgroup, as an address-space bound per
/// process) as rlimits. What cannot be enforced is warned about.
pub fn job_limits(
    processes: u64,
    memory_bytes: u64,
    file_bytes: u64,
) -> (Option<JobLimiter>, JobLimits) {
    let mut rlimits = JobLimits {
        memory_bytes: 0,
        file_bytes,
    };
    if processes == 0 && memory_bytes == 0 {
        return (None, rlimits);
    }
    let both = GroupLimits {
        processes,
        memory_bytes,
    };
    match JobLimiter::new(both) {
        Ok(groups) => (Some(groups), rlimits),
        Err(why) => {
            tracing::warn!(
                "per-job cgroups unavailable ({why}): --job-max-processes is not enforced and --job-max-memory bounds each process's address space instead"
            );
            rlimits.memory_bytes = memory_bytes;
            (None, rlimits)
        }
    }
}

/// `sandbox` (if any) with a sandbox kept per slot of the worker whose
/// cache is `cache_dir`, its init this binary (`distbuild sandbox-init`);
/// where this binary's path is unknown, one bubblewrap per command, with
/// a warning.
pub fn keep_per_slot(sandbox: Option<Sandbox>, cache_dir: &Path) -> Option<Sandbox> {
    let sandbox = sandbox?;
    match crate::sandbox::this_binary_as_init() {
        Ok(init) => Some(sandbox.kept_per_slot(init, crate::runtime::sandbox_root(cache_dir))),
        Err(e) => {
            tracing::warn!(error = %e, "this binary's path is unknown: jobs run under one bubblewrap per command");
            Some(sandbox)
        }
    }
}

/// The sandbox `kind` asks for: namespaces (required to work when asked
/// for by name; when not, used if it works here and else replaced by none
/// with a warning), or none (with a warning).
pub fn choose_sandbox(
    kind: Option<SandboxKind>,
    hidden: Vec<PathBuf>,
    writable: &[PathBuf],
    network: bool,
) -> anyhow::Result<Option<Sandbox>> {
    match kind {
        Some(SandboxKind::None) => {
            tracing::warn!(
                "--sandbox none: jobs run unconfined, as this worker's user, and may read and write whatever it can"
            );
            Ok(None)
        }
        Some(SandboxKind::Namespaces) => {
            Ok(Some(Sandbox::new(hidden, writable.to_vec(), network)?))
        }
        None => match Sandbox::new(hidden, writable.to_vec(), network) {
            Ok(sandbox) => Ok(Some(sandbox)),
            Err(e @ SandboxError::BadWritablePath { .. }) => Err(e.into()),
            Err(e) => {
                tracing::warn!("jobs run unconfined: {e}");
                Ok(None)
            }
        },
    }
}

/// Runs `distbuild worker`: validates the flags, binds the listener, and
/// runs until Ctrl-C or SIGTERM.
pub async fn run_cli(args: WorkerArgs) -> anyhow::Result<()> {
    let (config, security) = args.configure()?;
    let http = distbuild_ops::http::HttpPort::bind(&args.http, &security).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let shutdown = CancellationToken::new();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install the SIGTERM handler")?;
    // The first signal drains (see `runtime::drain`), the second stops at
    // once.
    let signals = tokio::spawn({
        let shutdown = shutdown.clone();
        let drain = config.drain.clone();
        async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
                () = shutdown.cancelled() => return,
            }
            drain.cancel();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
                () = shutdown.cancelled() => return,
            }
            tracing::info!("shutting down without draining");
            shutdown.cancel();
        }
    });
    if let Some(http) = http {
        let metrics = config.metrics.clone();
        let routes = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            distbuild_ops::http::METRICS_CONTENT_TYPE,
                        )],
                        metrics.encode(),
                    )
                }
            }),
        );
        tokio::spawn(http.serve(routes, axum::Router::new(), shutdown.clone()));
    }
    let result = run(config, listener, shutdown.clone()).await;
    shutdown.cancel();
    let _ = signals.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        worker: WorkerArgs,
    }

    fn check(args: &[&str], expected: Result<(), &str>) {
        let cache = std::env::temp_dir().join(format!("distbuild-cli-test-{}", std::process::id()));
        let cache = cache.to_str().expect("utf-8").to_string();
        let mut argv = vec![
            "worker",
            "--cache-dir",
            &cache,
            "--insecure",
            "--sandbox",
            "none",
        ];
        argv.extend_from_slice(args);
        let result = Cli::try_parse_from(&argv)
            .map_err(|e| e.to_string())
            .and_then(|cli| cli.worker.to_config().map_err(|e| e.to_string()));
        match (result, expected) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(want)) => assert!(e.contains(want), "{args:?}: {e}"),
            (got, want) => panic!("{args:?}: got {:?}, want {want:?}", got.map(|_| ())),
        }
    }

    #[test]
    fn flags_table() {
        let listen = ["--listen", "127.0.0.1:0"];
        let with = |extra: &[&'static str]| {
            let mut v: Vec<&str> = listen.to_vec();
            v.extend_from_slice(extra);
            v
        };
        check(&with(&["--coordinator", "a:1,b:2"]), Ok(()));
        check(&with(&["--coordinator", "a:1", "--slots", "3"]), Ok(()));
        check(
            &with(&["--coordinator", "a"]),
            Err("--coordinator: \"a\" is not HOST:PORT"),
        );
        check(
            &with(&["--coordinator", "a:1,:2"]),
            Err("--coordinator: \":2\""),
        );
        check(
            &with(&["--coordinator", "a:1", "--slots", "0"]),
            Err("--slots: must be at least 1"),
        );
        check(
            &with(&["--coordinator", "a:1", "--slots", "2", "--jobs-ahead", "2"]),
            Ok(()),
        );
        check(
            &with(&["--coordinator", "a:1", "--slots", "2", "--jobs-ahead", "3"]),
            Err("--jobs-ahead: must be at most --slots (2), not 3"),
        );
        check(
            &with(&["--coordinator", "a:1", "--property", "OSFamily=Linux"]),
            Ok(()),
        );
        check(
            &with(&["--coordinator", "a:1", "--property", "pool"]),
            Err("--property: \"pool\" is not KEY=VALUE"),
        );
        check(
            &with(&["--coordinator", "a:1", "--advertise", "x:99999"]),
            Err("--advertise"),
        );
        check(
            &["--coordinator", "a:1", "--listen", "nope"],
            Err("--listen"),
        );
        check(&listen, Err("--coordinator"));
    }
}
