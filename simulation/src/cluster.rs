//! One simulated run: the hosts (real coordinators on RocksDB, real
//! workers with the fake runner, real clients), the fault plan driven step
//! by step, the heal, and an audit after every build ended.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use distbuild_client::args::{BuildArgs, ConnectionArgs};
use distbuild_client::cluster::Cluster;
use distbuild_client::connect::Connector;
use distbuild_client::download::{Output, download_outputs};
use distbuild_client::render::Console;
use distbuild_client::upload::find_missing;
use distbuild_coordinator::{Bootstrap, Clock, InjectedBugs, Seams, Tuning};
use distbuild_proto::auth::{Access, Authenticator};
use distbuild_proto::tls::{Identity, Role};
use distbuild_proto::{Digest, JobId};
use distbuild_worker::connect::DialConnector;
use distbuild_worker::runtime::{WorkerConfig, run_incoming};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::faults::{self, Fault, Hosts, Planned};
use crate::net::{self, SimDialer, SimPeer, incoming};
use crate::observe::Observer;
use crate::runner::FakeRunner;
use crate::trace::{Trace, What};
use crate::workload::{self, Graph};

const COORDINATOR_PORT: u16 = 7000;
const WORKER_PORT: u16 = 7100;
/// The simulated wall clock starts here (2026-01-01), whatever the host's.
const EPOCH_SECS: u64 = 1_767_225_600;
/// Simulated time after the heal within which every build must end.
pub const HEAL_DEADLINE: Duration = Duration::from_secs(180);

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub seed: u64,
    /// Whether the seed's fault plan runs (off: the reference run).
    pub faults: bool,
    /// Bugs switched on in every coordinator.
    pub bugs: InjectedBugs,
}

/// What one client command (one build) saw.
#[derive(Debug, Clone, Default)]
pub struct ClientRun {
    /// Its `--json` lines, in order.
    pub lines: Vec<String>,
    /// Its stderr lines.
    pub errors: Vec<String>,
    /// The build command's exit code (None: it never ended).
    pub exit_code: Option<i32>,
}

/// What the audit after the run found.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    /// Whether the audit ran to the end.
    pub done: bool,
    /// Source blobs the cluster reported missing.
    pub missing_sources: Vec<String>,
    /// Source blobs that fewer than a majority of the coordinators' disks
    /// hold intact (read from the disks, not asked of the coordinators),
    /// with how many do.
    pub unreplicated_sources: Vec<String>,
    /// Artifacts that could not be downloaded, with why.
    pub lost_artifacts: Vec<String>,
    /// Calls that failed outright.
    pub errors: Vec<String>,
}

/// Everything a finished run leaves for the checkers.
pub struct RunResult {
    /// One graph per build.
    pub graphs: Vec<Graph>,
    /// The builds' names (`CLIENT#ROUND`), as `graphs`.
    pub builds: Vec<String>,
    /// What each build's client command printed, by build name.
    pub client_runs: BTreeMap<String, ClientRun>,
    pub audit: Audit,
    pub trace: Trace,
    pub observer: Observer,
    /// Why the simulation itself stopped early (a host failed, time ran
    /// out), if it did.
    pub sim_error: Option<String>,
}

/// The shape of a seed's cluster.
struct Shape {
    coordinators: Vec<String>,
    /// Name, slots, leases held ahead.
    workers: Vec<(String, usize, usize)>,
    clients: Vec<String>,
    /// Builds each client runs, one after another.
    rounds: usize,
    chaos_ms: u64,
    base_latency_ms: u64,
}

fn shape(rng: &mut StdRng) -> Shape {
    let coordinators = if rng.gen_bool(0.25) { 5 } else { 3 };
    let workers = rng.gen_range(2..=4);
    let clients = rng.gen_range(2..=3);
    Shape {
        coordinators: (1..=coordinators).map(|i| format!("c{i}")).collect(),
        workers: (1..=workers)
            .map(|i| {
                let slots = rng.gen_range(1..=2);
                (format!("w{i}"), slots, rng.gen_range(0..=slots))
            })
            .collect(),
        clients: (1..=clients).map(|i| format!("u{i}")).collect(),
        rounds: rng.gen_range(1..=3),
        chaos_ms: rng.gen_range(6_000..20_000),
        base_latency_ms: rng.gen_range(1..=5),
    }
}

/// A coordinator's wall clock: the simulated time, plus the jump a
/// `ClockJump` fault set (shared with the fault driver).
struct SimClock {
    jump_ms: Arc<AtomicI64>,
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        let real = turmoil::since_epoch().map_or(0, |d| d.as_millis() as u64);
        real.saturating_add_signed(self.jump_ms.load(Ordering::Relaxed))
    }
}

/// A `Write` that puts every complete line into the trace and a list.
struct Lines {
    client: String,
    stream: &'static str,
    trace: Trace,
    pending: Vec<u8>,
    sink: Arc<Mutex<BTreeMap<String, ClientRun>>>,
}

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        while let Some(at) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=at).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            let shown = if self.stream == "out" {
                line.clone()
            } else {
                format!("stderr: {line}")
            };
            self.trace.record(What::ClientLine {
                client: self.client.clone(),
                line: shown,
            });
            let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
            let run = sink.entry(self.client.clone()).or_default();
            if self.stream == "out" {
                run.lines.push(line);
            } else {
                run.errors.push(line);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn host_error(e: impl std::fmt::Display) -> Box<dyn std::error::Error> {
    e.to_string().into()
}

/// How every simulated server admits callers: the network is plain TCP,
/// but the authorization rules of production run — the host at the other
/// end names the caller as its certificate would (`c*` coordinators, `w*`
/// workers named as their worker ID, clients and the auditor clients).
fn sim_access() -> Access {
    let identify = |extensions: &http::Extensions| {
        let SimPeer(Some(host)) = extensions.get::<SimPeer>()? else {
            return None;
        };
        let role = match host.chars().next() {
            Some('c') => Role::Coordinator,
            Some('w') => Role::Worker,
            _ => Role::Client,
        };
        Some(Identity {
            role,
            name: host.clone(),
        })
    };
    Access {
        tls: None,
        authenticator: Authenticator::Connection(Arc::new(identify)),
    }
}

fn any_addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
}

/// Mixed into the seed for the hosts' own random draws (election timeouts,
/// jitter, IDs), so they are not the same numbers as the plan's draws.
const HOSTS_STREAM: u64 = 0x9e37_79b9_7f4a_7c15;

/// Runs `config` in `dir` (which holds every host's disk).
pub fn run(config: RunConfig, dir: &Path) -> RunResult {
    // One thread runs every host: random draws and blocking work happen
    // in the simulation's own order.
    distbuild_proto::rng::seed_this_thread(config.seed ^ HOSTS_STREAM);
    distbuild_proto::blocking::run_inline_on_this_thread();
    net::reset();
    let mut rng = StdRng::seed_from_u64(config.seed);
    let shape = shape(&mut rng);
    // Build i is client i % clients's round i / clients.
    let graphs = workload::generate(config.seed, shape.clients.len() * shape.rounds);
    let builds: Vec<String> = (0..graphs.len())
        .map(|i| {
            format!(
                "{}#{}",
                shape.clients[i % shape.clients.len()],
                i / shape.clients.len()
            )
        })
        .collect();
    let worker_names: Vec<String> = shape.workers.iter().map(|(w, _, _)| w.clone()).collect();
    let plan = if config.faults {
        faults::plan(
            &mut rng,
            &Hosts {
                coordinators: &shape.coordinators,
                workers: &worker_names,
                clients: &shape.clients,
            },
            shape.chaos_ms,
            4,
            14,
        )
    } else {
        Vec::new()
    };

    let trace = Trace::default();
    let observer = Observer::new(trace.clone());
    let tuning = Tuning {
        lease_timeout_ms: 3_000,
        heartbeat_interval_ms: 750,
        locality_wait_ms: 50,
        // Faults may expire a lease many times; giving up is not what is
        // under test here.
        max_attempts: 1_000,
        ..Tuning::default()
    };

    let mut sim = turmoil::Builder::new()
        .rng_seed(config.seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_SECS))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(shape.base_latency_ms))
        .max_message_latency(Duration::from_millis(shape.base_latency_ms))
        .repair_rate(0.05)
        .simulation_duration(Duration::from_millis(shape.chaos_ms) + HEAL_DEADLINE)
        .tcp_capacity(4096)
        // The client watches for Ctrl-C, which needs tokio's I/O driver.
        .enable_tokio_io()
        .build();

    let members: BTreeMap<u64, String> = shape
        .coordinators
        .iter()
        .enumerate()
        .map(|(i, name)| (i as u64 + 1, format!("{name}:{COORDINATOR_PORT}")))
        .collect();
    let coordinator_addrs: Vec<String> = members.values().cloned().collect();

    // Each coordinator's wall clock jump, set by the fault driver.
    let clock_jumps: BTreeMap<String, Arc<AtomicI64>> = shape
        .coordinators
        .iter()
        .map(|name| (name.clone(), Arc::default()))
        .collect();
    for (i, name) in shape.coordinators.iter().enumerate() {
        let node_id = i as u64 + 1;
        let data_dir = dir.join(name);
        let members = members.clone();
        let tuning = tuning.clone();
        let seams = Seams {
            clock: Arc::new(SimClock {
                jump_ms: clock_jumps[name].clone(),
            }),
            dialer: Arc::new(SimDialer),
            observer: Some(Arc::new(observer.clone())),
            check_invariants: true,
            bugs: config.bugs,
        };
        let observer = observer.clone();
        sim.host(name.as_str(), move || {
            let coordinator_config = distbuild_coordinator::Config {
                node_id,
                bootstrap: Bootstrap::Initial(members.clone()),
                data_dir: data_dir.clone(),
                tuning: tuning.clone(),
                secret: None,
                security: distbuild_proto::tls::Security::Insecure,
            };
            let seams = seams.clone();
            let observer = observer.clone();
            async move {
                let listener = turmoil::net::TcpListener::bind(any_addr(COORDINATOR_PORT)).await?;
                let shutdown = CancellationToken::new();
                let node = distbuild_coordinator::start_node(
                    &coordinator_config,
                    any_addr(COORDINATOR_PORT),
                    seams,
                    shutdown.clone(),
                )
                .await
                .map_err(host_error)?;
                tokio::spawn(observer.watch_leadership(node.clone()));
                distbuild_coordinator::serve_incoming(
                    node,
                    None,
                    sim_access(),
                    incoming(listener),
                    shutdown,
                )
                .await
                .map_err(host_error)
            }
        });
    }

    for (name, slots, ahead) in &shape.workers {
        let cache_dir = dir.join(name);
        std::fs::create_dir_all(&cache_dir).expect("create a worker's directory");
        let mut worker_config = WorkerConfig::new(coordinator_addrs.clone(), cache_dir);
        // Its name, as a certificate would give it (and as `sim_access`
        // knows it).
        worker_config.worker_id = Some(name.clone());
        worker_config.access = sim_access();
        worker_config.advertise_addr = Some(format!("{name}:{WORKER_PORT}"));
        worker_config.slots = *slots;
        worker_config.jobs_ahead = Some(*ahead);
        worker_config.poll_wait_ms = 1_000;
        worker_config.connector = Arc::new(DialConnector(Arc::new(SimDialer)));
        worker_config.runner = Arc::new(FakeRunner {
            worker: name.clone(),
            trace: trace.clone(),
        });
        sim.host(name.as_str(), move || {
            let worker_config = worker_config.clone();
            async move {
                let listener = turmoil::net::TcpListener::bind(any_addr(WORKER_PORT)).await?;
                run_incoming(
                    worker_config,
                    any_addr(WORKER_PORT),
                    incoming(listener),
                    CancellationToken::new(),
                )
                .await
                .map_err(host_error)
            }
        });
    }

    let client_runs: Arc<Mutex<BTreeMap<String, ClientRun>>> = Arc::default();
    for (k, host) in shape.clients.iter().enumerate() {
        // This client's builds, one after another, each after a pause.
        let mut plan = Vec::new();
        for (i, graph) in graphs
            .iter()
            .enumerate()
            .skip(k)
            .step_by(shape.clients.len())
        {
            let build = builds[i].clone();
            let workspace = dir.join(&build);
            graph.write(&workspace).expect("write a client's graph");
            let args = BuildArgs {
                graph: workspace.join("graph.json"),
                source_dir: workspace.join("src"),
                output_dir: None,
                json: true,
                job_timeout: None,
                connection: ConnectionArgs {
                    coordinators: coordinator_addrs.clone(),
                    timeout_secs: 600,
                    security: Default::default(),
                },
                output_base: None,
                // Real files and the real clock, outside the simulated world: every
                // build hashes its sources.
                digest_cache: false,
                block_for_lock: true,
                max_idle_secs: 0,
                sandbox_writable_paths: Vec::new(),
            };
            let pause = Duration::from_millis(rng.gen_range(0..3_000));
            plan.push((build, args, pause));
        }
        let (trace, runs) = (trace.clone(), client_runs.clone());
        sim.client(host.as_str(), async move {
            for (build, args, pause) in plan {
                tokio::time::sleep(pause).await;
                let console = |stream| Lines {
                    client: build.clone(),
                    stream,
                    trace: trace.clone(),
                    pending: Vec::new(),
                    sink: runs.clone(),
                };
                let console = Console {
                    out: Box::new(console("out")),
                    err: Box::new(console("err")),
                    progress: false,
                };
                let connector = Connector::dialing(Arc::new(SimDialer));
                let code = distbuild_client::run_build(args, connector, console).await;
                trace.record(What::ClientExited {
                    client: build.clone(),
                    code,
                });
                runs.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(build)
                    .or_default()
                    .exit_code = Some(code);
            }
            Ok(())
        });
    }

    let hosts = Hosts {
        coordinators: &shape.coordinators,
        workers: &worker_names,
        clients: &shape.clients,
    };
    let all_hosts = hosts.all();
    let mut sim_error = None;
    let mut driver = Driver::new(&plan, &trace, &observer, &hosts, clock_jumps);
    let mut healed = plan.is_empty();
    loop {
        let now_ms = sim.elapsed().as_millis() as u64;
        if !healed {
            if now_ms >= shape.chaos_ms {
                driver.heal(&mut sim, &all_hosts, shape.base_latency_ms);
                healed = true;
            } else {
                driver.apply_due(&mut sim, now_ms, shape.base_latency_ms);
            }
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                sim_error = Some(e.to_string());
                break;
            }
        }
    }
    if !healed {
        // Every client finished during the chaos: heal for the audit.
        driver.heal(&mut sim, &all_hosts, shape.base_latency_ms);
    }

    // The audit: every acknowledged source blob and accepted artifact can
    // still be had.
    let audit = Arc::new(Mutex::new(Audit::default()));
    if sim_error.is_none() {
        let runs = client_runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (sources, outputs) = audit_targets(&graphs, &builds, &runs);
        let unreplicated = unreplicated(dir, &shape.coordinators, &sources);
        let audit_dir = dir.join("audit");
        let addrs = coordinator_addrs.clone();
        let found = audit.clone();
        sim.client("auditor", async move {
            let cluster = Cluster::new(
                Connector::dialing(Arc::new(SimDialer)),
                addrs,
                Duration::from_secs(60),
            );
            let result = run_audit(&cluster, sources, outputs, &audit_dir).await;
            *found.lock().unwrap_or_else(|p| p.into_inner()) = result;
            Ok(())
        });
        if let Err(e) = sim.run() {
            sim_error = Some(format!("during the audit: {e}"));
        }
        audit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unreplicated_sources = unreplicated;
    }

    let client_runs = client_runs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let audit = audit.lock().unwrap_or_else(|p| p.into_inner()).clone();
    RunResult {
        graphs,
        builds,
        client_runs,
        audit,
        trace,
        observer,
        sim_error,
    }
}

/// The source digests every client uploaded and the artifacts its build
/// reported.
fn audit_targets(
    graphs: &[Graph],
    builds: &[String],
    runs: &BTreeMap<String, ClientRun>,
) -> (Vec<Digest>, Vec<Output>) {
    let mut sources = BTreeSet::new();
    let mut outputs = BTreeMap::new();
    for (build, graph) in builds.iter().zip(graphs) {
        let Some(run) = runs.get(build) else {
            continue;
        };
        let acknowledged = run
            .lines
            .iter()
            .any(|l| l.contains("\"event\":\"build_started\""));
        if !acknowledged {
            continue;
        }
        sources.extend(graph.sources.values().map(|content| Digest::of(content)));
        for line in &run.lines {
            let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let (Some(id), Some(digest), Some(size)) = (
                event["id"].as_str(),
                event["artifact"]["digest"].as_str(),
                event["artifact"]["size"].as_u64(),
            ) else {
                continue;
            };
            let (Ok(job_id), Ok(digest)) = (id.parse::<JobId>(), digest.parse::<Digest>()) else {
                continue;
            };
            outputs.entry(digest).or_insert(Output {
                job_id,
                name: event["name"].as_str().unwrap_or_default().to_string(),
                digest,
                size,
            });
        }
    }
    (
        sources.into_iter().collect(),
        outputs.into_values().collect(),
    )
}

/// The `sources` that fewer than a majority of `coordinators` store intact
/// on their disks under `dir` (`<host>/blobs/objects/<digest>`): an
/// acknowledged blob is on a majority, whatever the coordinators record.
fn unreplicated(dir: &Path, coordinators: &[String], sources: &[Digest]) -> Vec<String> {
    let majority = coordinators.len() / 2 + 1;
    sources
        .iter()
        .filter_map(|digest| {
            let intact = coordinators
                .iter()
                .filter(|host| {
                    let path = dir
                        .join(host)
                        .join("blobs")
                        .join("objects")
                        .join(digest.to_string());
                    std::fs::read(path).is_ok_and(|bytes| Digest::of(&bytes) == *digest)
                })
                .count();
            (intact < majority).then(|| {
                format!(
                    "{digest} (intact on {intact} of {} coordinators)",
                    coordinators.len()
                )
            })
        })
        .collect()
}

async fn run_audit(
    cluster: &Cluster,
    sources: Vec<Digest>,
    outputs: Vec<Output>,
    dir: &Path,
) -> Audit {
    let mut audit = Audit::default();
    match find_missing(cluster, &sources).await {
        Ok(missing) => {
            audit.missing_sources = missing.iter().map(Digest::to_string).collect();
        }
        Err(e) => audit.errors.push(format!("find missing blobs: {e}")),
    }
    for output in outputs {
        let into: PathBuf = dir.join(output.digest.to_string());
        if let Err(e) = download_outputs(cluster, std::slice::from_ref(&output), &into).await {
            audit.lost_artifacts.push(format!(
                "artifact {} of {}: {e}",
                output.digest, output.name
            ));
        }
    }
    audit.done = true;
    audit
}

/// Both directions of each (a, b).
fn both_ways(pairs: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    pairs
        .into_iter()
        .flat_map(|(a, b)| [(a.clone(), b.clone()), (b, a)])
        .collect()
}

/// Applies the fault plan to the running simulation.
struct Driver<'p> {
    pending: std::collections::VecDeque<&'p Planned>,
    /// Undo actions due at a time.
    undo: BTreeMap<u64, Vec<Undo>>,
    trace: Trace,
    observer: Observer,
    coordinators: Vec<String>,
    all: Vec<String>,
    delays: u32,
    losses: u32,
    /// Directed links (from, to) cut, with how many faults cut each: a link
    /// is repaired when the last fault that cut it ends, so overlapping
    /// faults do not undo each other.
    cuts: BTreeMap<(String, String), u32>,
    /// Each coordinator's wall clock jump (what its `SimClock` adds).
    clock_jumps: BTreeMap<String, Arc<AtomicI64>>,
    /// A `Straggle` fault waiting for a lease to be granted, until then.
    straggle_wanted_until: Option<u64>,
    straggler: Option<Straggler>,
    /// When the straggle is looked at next (it reads the applied log).
    straggle_check_ms: u64,
}

/// A worker cut off until one of its leases expires.
struct Straggler {
    host: String,
    links: Vec<(String, String)>,
    /// The index of the grant it was chosen by.
    granted_at: u64,
    /// When it is reattached even if no lease expired (within the window
    /// its reports are retried in: the results must still arrive).
    until_ms: u64,
}

/// How often a straggle looks at the applied log.
const STRAGGLE_CHECK_MS: u64 = 50;
/// The longest a straggler stays cut off: three lease periods, within the
/// worker's report retry window (`MIN_REPORT_RETRY_WINDOW`, 10 s).
const STRAGGLE_MAX_MS: u64 = 9_000;

enum Undo {
    /// Directed links (from, to) one fault cut.
    Uncut(Vec<(String, String)>),
    Restart(String),
    EndDelay,
    EndLoss,
    /// The host's wall clock is set right again.
    ClockRight(String),
}

impl<'p> Driver<'p> {
    fn new(
        plan: &'p [Planned],
        trace: &Trace,
        observer: &Observer,
        hosts: &Hosts<'_>,
        clock_jumps: BTreeMap<String, Arc<AtomicI64>>,
    ) -> Self {
        Self {
            clock_jumps,
            pending: plan.iter().collect(),
            undo: BTreeMap::new(),
            trace: trace.clone(),
            observer: observer.clone(),
            coordinators: hosts.coordinators.to_vec(),
            all: hosts.all(),
            delays: 0,
            losses: 0,
            cuts: BTreeMap::new(),
            straggle_wanted_until: None,
            straggler: None,
            straggle_check_ms: 0,
        }
    }

    /// Cuts off the straggler once a lease is granted, and reattaches it
    /// once one of its leases expired (see [`Fault::Straggle`]).
    fn follow_straggle(&mut self, sim: &mut turmoil::Sim<'_>, now_ms: u64) {
        if now_ms < self.straggle_check_ms {
            return;
        }
        self.straggle_check_ms = now_ms + STRAGGLE_CHECK_MS;
        if let Some(straggler) = &self.straggler {
            let expired = self
                .observer
                .observations()
                .lease_expired_since(&straggler.host, straggler.granted_at);
            if !expired && now_ms < straggler.until_ms {
                return;
            }
            let straggler = self.straggler.take().expect("checked");
            self.uncut(sim, &straggler.links);
            let why = if expired {
                "a lease of it expired"
            } else {
                "none of its leases expired in time"
            };
            self.note(
                now_ms,
                format!("reattach straggler {}: {why}", straggler.host),
            );
            return;
        }
        let Some(wanted_until) = self.straggle_wanted_until else {
            return;
        };
        if now_ms >= wanted_until {
            self.straggle_wanted_until = None;
            self.note(now_ms, "no straggler: no lease was granted".to_string());
            return;
        }
        let Some((granted_at, host)) = self.observer.observations().newest_lease_holder() else {
            return;
        };
        self.straggle_wanted_until = None;
        let links = both_ways(self.coordinators.iter().map(|c| (host.clone(), c.clone())));
        self.cut(sim, &links);
        self.note(
            now_ms,
            format!("straggler {host}: cut off from the coordinators until a lease of it expires"),
        );
        self.straggler = Some(Straggler {
            host,
            links,
            granted_at,
            until_ms: now_ms + STRAGGLE_MAX_MS,
        });
    }

    /// Cuts the directed links `links` (one more fault cutting each).
    fn cut(&mut self, sim: &mut turmoil::Sim<'_>, links: &[(String, String)]) {
        for (from, to) in links {
            let count = self.cuts.entry((from.clone(), to.clone())).or_default();
            *count += 1;
            if *count == 1 {
                sim.partition_oneway(from.as_str(), to.as_str());
            }
        }
    }

    /// Ends one fault's cut of `links`; a link no fault cuts any more is
    /// repaired.
    fn uncut(&mut self, sim: &mut turmoil::Sim<'_>, links: &[(String, String)]) {
        for link in links {
            let Some(count) = self.cuts.get_mut(link) else {
                continue;
            };
            *count -= 1;
            if *count == 0 {
                self.cuts.remove(link);
                sim.repair_oneway(link.0.as_str(), link.1.as_str());
            }
        }
    }

    fn note(&self, now_ms: u64, text: String) {
        self.trace.record_at(now_ms, What::Fault(text));
    }

    /// Whether some replica applied a command stamped with a time.
    fn time_started(&self) -> bool {
        self.observer
            .observations()
            .applied
            .values()
            .any(|entries| {
                entries
                    .values()
                    .flatten()
                    .any(|a| a.proposal.command.now_ms().is_some())
            })
    }

    /// The newest leader seen: the leader of the highest term.
    fn leader(&self) -> Option<String> {
        let seen = self.observer.observations();
        let &(_, node) = seen.leaders.iter().max()?;
        self.coordinators.get(node as usize - 1).cloned()
    }

    fn apply_due(&mut self, sim: &mut turmoil::Sim<'_>, now_ms: u64, base_latency_ms: u64) {
        while let Some(entry) = self.undo.first_entry() {
            if *entry.key() > now_ms {
                break;
            }
            for undo in entry.remove() {
                self.undo_one(sim, now_ms, undo, base_latency_ms);
            }
        }
        self.follow_straggle(sim, now_ms);
        while self.pending.front().is_some_and(|p| p.start_ms <= now_ms) {
            let planned = self.pending.pop_front().expect("checked");
            let undo = match &planned.fault {
                Fault::Partition { a, b } => {
                    let links = both_ways([(a.clone(), b.clone())]);
                    self.cut(sim, &links);
                    self.note(now_ms, format!("partition {a} <-> {b}"));
                    Undo::Uncut(links)
                }
                Fault::OneWay { from, to } => {
                    let links = vec![(from.clone(), to.clone())];
                    self.cut(sim, &links);
                    self.note(now_ms, format!("partition {from} -> {to}"));
                    Undo::Uncut(links)
                }
                Fault::IsolateLeader => {
                    let Some(leader) = self.leader() else {
                        continue;
                    };
                    let links = both_ways(
                        self.all
                            .iter()
                            .filter(|h| **h != leader)
                            .map(|h| (leader.clone(), h.clone())),
                    );
                    self.cut(sim, &links);
                    self.note(now_ms, format!("isolate leader {leader}"));
                    Undo::Uncut(links)
                }
                Fault::Delay { max_ms } => {
                    sim.set_max_message_latency(Duration::from_millis(base_latency_ms + max_ms));
                    self.delays += 1;
                    self.note(now_ms, format!("delay up to {max_ms} ms"));
                    Undo::EndDelay
                }
                Fault::Loss {
                    fail_rate_per_mille,
                } => {
                    sim.set_fail_rate(f64::from(*fail_rate_per_mille) / 1000.0);
                    self.losses += 1;
                    self.note(now_ms, format!("lose links at {fail_rate_per_mille}/1000"));
                    Undo::EndLoss
                }
                Fault::Crash { host } => {
                    if !sim.is_host_running(host.as_str()) {
                        continue;
                    }
                    net::crash(sim, host.as_str());
                    self.note(now_ms, format!("crash {host}"));
                    Undo::Restart(host.clone())
                }
                Fault::ClockJump { host, by_ms } => {
                    // A fresh cluster's first leader starts its time from
                    // the wall clock (then never reads it again): a jump
                    // before any time was applied would be that start.
                    if !self.time_started() {
                        continue;
                    }
                    let host = match host {
                        Some(host) => host.clone(),
                        None => match self.leader() {
                            Some(leader) => leader,
                            None => continue,
                        },
                    };
                    self.clock_jumps[&host].store(*by_ms, Ordering::Relaxed);
                    self.note(now_ms, format!("{host}'s wall clock jumps by {by_ms} ms"));
                    Undo::ClockRight(host)
                }
                Fault::Disconnect { host } => {
                    let links =
                        both_ways(self.coordinators.iter().map(|c| (host.clone(), c.clone())));
                    self.cut(sim, &links);
                    self.note(now_ms, format!("disconnect {host} from the coordinators"));
                    Undo::Uncut(links)
                }
                Fault::Straggle => {
                    self.straggle_wanted_until = Some(planned.end_ms);
                    self.straggle_check_ms = now_ms;
                    continue;
                }
            };
            self.undo.entry(planned.end_ms).or_default().push(undo);
        }
    }

    fn undo_one(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        now_ms: u64,
        undo: Undo,
        base_latency_ms: u64,
    ) {
        match undo {
            Undo::Uncut(links) => {
                self.uncut(sim, &links);
                self.note(
                    now_ms,
                    format!(
                        "a cut of {} links ends ({} cut now)",
                        links.len(),
                        self.cuts.len()
                    ),
                );
            }
            Undo::Restart(host) => {
                net::bounce(sim, host.as_str());
                self.note(now_ms, format!("restart {host}"));
            }
            Undo::ClockRight(host) => {
                self.clock_jumps[&host].store(0, Ordering::Relaxed);
                self.note(now_ms, format!("{host}'s wall clock is set right"));
            }
            Undo::EndDelay => {
                self.delays -= 1;
                if self.delays == 0 {
                    sim.set_max_message_latency(Duration::from_millis(base_latency_ms));
                    self.note(now_ms, "delay ends".to_string());
                }
            }
            Undo::EndLoss => {
                self.losses -= 1;
                if self.losses == 0 {
                    sim.set_fail_rate(0.0);
                    self.note(now_ms, "loss ends".to_string());
                }
            }
        }
    }

    /// Network whole, every host up.
    fn heal(&mut self, sim: &mut turmoil::Sim<'_>, all: &[String], base_latency_ms: u64) {
        let now_ms = sim.elapsed().as_millis() as u64;
        self.pending.clear();
        self.cuts.clear();
        self.straggle_wanted_until = None;
        self.straggler = None;
        let undo = std::mem::take(&mut self.undo);
        for undo in undo.into_values().flatten() {
            match undo {
                Undo::Restart(host) => net::bounce(sim, host.as_str()),
                Undo::ClockRight(host) => self.clock_jumps[&host].store(0, Ordering::Relaxed),
                _ => {}
            }
        }
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                sim.repair(a.as_str(), b.as_str());
            }
        }
        sim.set_fail_rate(0.0);
        sim.set_max_message_latency(Duration::from_millis(base_latency_ms));
        self.note(now_ms, "heal: network whole, every host up".to_string());
    }
}
