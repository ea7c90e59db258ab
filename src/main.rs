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

/// jemalloc's options, read before `main`: freed pages go back to the
/// system after 100 ms unused, not ten seconds (its default). A big
/// submit's transient buffers (the request, the parsed graph, the plan,
/// the entry's write batch), freed within a second of each other, were
/// otherwise resident at once: a 100,000-job coordinator peaked at 285 MiB
/// over ten seconds and 205 MiB over one. A server also purges on
/// jemalloc's background thread ([`purge_freed_pages_in_background`]).
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: Option<&'static std::ffi::c_char> =
    // SAFETY: a pointer to the first byte of a static C string.
    Some(unsafe { &*c"dirty_decay_ms:100".as_ptr() });

/// Has jemalloc purge freed pages on a thread of its own, on time. Without
/// it an arena purges only when it is used again, so the pages a submit's
/// parse freed on one runtime thread stayed resident while its entry was
/// applied on another: a 100,000-job coordinator's peak over its idle size
/// was 2.0–2.2 KiB per job with decay alone and 1.6 KiB with the thread
/// (1.55 KiB when every free is returned at once). Servers only: a
/// command-line client exits soon, and `sandbox-init` stays
/// single-threaded.
fn purge_freed_pages_in_background() {
    let mut enable = true;
    // SAFETY: `background_thread` is a bool, written from one.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"background_thread".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            (&raw mut enable).cast(),
            std::mem::size_of::<bool>(),
        )
    };
    if rc != 0 {
        eprintln!(
            "warning: jemalloc's background thread did not start (error {rc}): freed memory is returned later"
        );
    }
}

/// Blocks of glibc's malloc from this size up are mapped on their own and
/// unmapped when freed.
const MALLOC_MMAP_THRESHOLD_BYTES: i32 = 1 << 20;

/// RocksDB's C++ allocates through glibc's malloc (Rust code, through
/// jemalloc). glibc raises its mmap threshold to the size of the biggest
/// mapped block freed, after which blocks that size (a big entry's write
/// batch as it grows, a memtable's arena blocks) come from its heap and
/// stay resident once freed. A fixed threshold keeps returning them: a
/// 30,000-job coordinator peaked at 118 MiB with it, 130 MiB without.
fn return_freed_big_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets a malloc parameter; called before any
    // other thread (or RocksDB) exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES);
    }
}

fn main() -> ExitCode {
    return_freed_big_blocks();
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
    if server {
        purge_freed_pages_in_background();
    }
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

#[cfg(test)]
mod tests {
    /// The options in `JEMALLOC_CONF` are the ones jemalloc runs with
    /// (a misnamed symbol would leave its defaults, silently).
    #[test]
    fn jemalloc_returns_freed_pages_after_100_ms() {
        let mut value: isize = 0;
        let mut len = std::mem::size_of::<isize>();
        // SAFETY: `opt.dirty_decay_ms` is an ssize_t, read into one.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"opt.dirty_decay_ms".as_ptr(),
                (&raw mut value).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(rc, 0, "mallctl opt.dirty_decay_ms");
        assert_eq!(value, 100);
    }

    /// A server's jemalloc purges on its background thread once asked.
    #[test]
    fn servers_purge_freed_pages_in_background() {
        let read = || {
            let mut value = false;
            let mut len = std::mem::size_of::<bool>();
            // SAFETY: `background_thread` is a bool, read into one.
            let rc = unsafe {
                tikv_jemalloc_sys::mallctl(
                    c"background_thread".as_ptr(),
                    (&raw mut value).cast(),
                    &mut len,
                    std::ptr::null_mut(),
                    0,
                )
            };
            assert_eq!(rc, 0, "mallctl background_thread");
            value
        };
        assert!(!read(), "off until a server asks");
        super::purge_freed_pages_in_background();
        assert!(read());
    }

    /// Whether glibc's block at `ptr` is mapped on its own: bit 1 of the
    /// size word before it (`IS_MMAPPED` in glibc's `malloc.c`).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn is_mapped(ptr: *mut libc::c_void) -> bool {
        // SAFETY: every block glibc's malloc returns is preceded by its
        // chunk's size word.
        let size_word = unsafe { *ptr.cast::<usize>().sub(1) };
        size_word & 2 != 0
    }

    /// Once a 2 MiB block is freed glibc would take blocks up to that size
    /// from its heap (and keep them resident); with the threshold fixed a
    /// 1.5 MiB block is still mapped on its own.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_keeps_mapping_big_blocks_after_freeing_bigger_ones() {
        super::return_freed_big_blocks();
        // SAFETY: plain malloc and free of blocks used for nothing else.
        unsafe {
            let big = libc::malloc(2 << 20);
            assert!(!big.is_null() && is_mapped(big));
            libc::free(big);
            let next = libc::malloc(3 << 19);
            assert!(!next.is_null());
            let mapped = is_mapped(next);
            libc::free(next);
            assert!(mapped, "a 1.5 MiB block after a 2 MiB one was freed");
        }
    }
}
