//! `distbuild worker`: the command-line flags and the process-level wiring
//! (binding the listener, Ctrl-C and SIGTERM) around [`run`].

use std::path::PathBuf;

use anyhow::Context as _;
use distbuild_proto::wire::PortUse;
use tokio_util::sync::CancellationToken;

use crate::runtime::{DEFAULT_CACHE_MAX_BYTES, WorkerConfig, default_slots, run};

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
    /// Bound on the cache's size in bytes.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CACHE_MAX_BYTES)]
    pub cache_max_bytes: u64,
    /// Peer address announced to coordinators, when peers must use another
    /// address than --listen (default: the address actually listened on).
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
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
        anyhow::ensure!(
            self.cache_max_bytes > 0,
            "--cache-max-bytes: must be at least 1"
        );
        // Jobs run with their sandbox as working directory, so every path
        // the worker hands them must be absolute.
        let cache_dir = std::path::absolute(&self.cache_dir)
            .map_err(|e| anyhow::anyhow!("--cache-dir {}: {e}", self.cache_dir.display()))?;
        let mut config = WorkerConfig::new(self.coordinator.clone(), cache_dir);
        config.slots = self.slots.unwrap_or_else(default_slots);
        config.cache_max_bytes = self.cache_max_bytes;
        config.advertise_addr = self.advertise.clone();
        Ok(config)
    }
}

/// Runs `distbuild worker`: validates the flags, binds the listener, and
/// runs until Ctrl-C or SIGTERM.
pub async fn run_cli(args: WorkerArgs) -> anyhow::Result<()> {
    let config = args.to_config()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let shutdown = CancellationToken::new();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install the SIGTERM handler")?;
    let signals = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
                () = shutdown.cancelled() => return,
            }
            tracing::info!("shutting down");
            shutdown.cancel();
        }
    });
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
        let mut argv = vec!["worker", "--cache-dir", "/tmp/x"];
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
