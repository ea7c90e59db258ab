//! Test support for the end-to-end tests: a cluster of real `distbuild`
//! processes on loopback ports (one coordinator, some workers), the client
//! CLI, and build graphs written as the Go distbuild JSON.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};
use sha1::{Digest as _, Sha1};

/// How long a process may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The `distbuild` binary under test: this build's, or the one
/// `DISTBUILD_BENCH_BINARY` names (benchmarks use it to compare an older
/// build against this one in the same run, on the same harness).
pub fn distbuild() -> Command {
    let mut command = match std::env::var_os("DISTBUILD_BENCH_BINARY") {
        Some(path) => Command::new(path),
        None => Command::new(env!("CARGO_BIN_EXE_distbuild")),
    };
    // Output bases (each build's digest cache, local servers) go under the
    // target directory, not the user's ~/.cache.
    command.env(
        "XDG_CACHE_HOME",
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("xdg-cache"),
    );
    command
}

/// A cluster CA made with `distbuild certs` in a directory, issuing a
/// certificate per process on first use.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// `distbuild certs ca` in `dir`.
    pub fn new(dir: PathBuf) -> Pki {
        run_ok(distbuild().args(["certs", "ca", "--dir"]).arg(&dir));
        Pki { dir }
    }

    /// The `--tls-*` flags of `name` with `role`, its certificate issued
    /// (serving on 127.0.0.1) the first time.
    pub fn flags(&self, role: &str, name: &str) -> Vec<String> {
        let cert = self.dir.join(format!("{name}.pem"));
        if !cert.exists() {
            run_ok(
                distbuild()
                    .args(["certs", "issue", "--dir"])
                    .arg(&self.dir)
                    .args(["--role", role, "--name", name, "--host", "127.0.0.1"]),
            );
        }
        let path = |ext: &str| self.dir.join(format!("{name}.{ext}")).display().to_string();
        vec![
            "--tls-ca".into(),
            self.dir.join("ca.pem").display().to_string(),
            "--tls-cert".into(),
            path("pem"),
            "--tls-key".into(),
            path("key"),
        ]
    }
}

/// Runs `command`, which must succeed.
pub fn run_ok(command: &mut Command) -> Output {
    let out = command.output().expect("run distbuild");
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The flags giving a process of `role` named `name` its security: its
/// certificate from `pki`, or `--insecure` without one.
pub fn security_flags(pki: Option<&Pki>, role: &str, name: &str) -> Vec<String> {
    match pki {
        Some(pki) => pki.flags(role, name),
        None => vec!["--insecure".into()],
    }
}

/// The worker flags that let jobs write in `dir` (a test's directory,
/// where jobs append to logs the tests read) besides their sandbox.
pub fn writable_dir_flags(dir: &Path) -> Vec<String> {
    vec!["--sandbox-writable-path".into(), dir.display().to_string()]
}

/// A 40-hex ID derived from `name`.
pub fn id(name: &str) -> String {
    hex::encode(Sha1::digest(name.as_bytes()))
}

/// A running `distbuild` server process; killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `distbuild args...`, waits for its "listening on ADDR" line,
    /// and copies its stderr to `log`.
    pub fn start(args: &[String], log: PathBuf) -> Server {
        let mut command = distbuild();
        command.args(args);
        Server::start_command(command, log)
    }

    /// Starts `command` (a `distbuild` server, perhaps under a wrapper such
    /// as `ip netns exec`), waits for its "listening on ADDR" line, and
    /// copies its stderr to `log`.
    pub fn start_command(mut command: Command, log: PathBuf) -> Server {
        let mut child = command
            // Plain logs: they end up in files and failure messages.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        let log_path = log.clone();
        std::thread::spawn(move || {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&log_path).expect("create server log");
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                if let Some((_, addr)) = line.split_once(" listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => Server { child, addr, log },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{command:?} did not start; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One coordinator and some workers, in a temporary directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub coordinator: Option<Server>,
    pub coordinator_port: u16,
    /// Extra flags the coordinator is started with.
    pub coordinator_flags: Vec<String>,
    /// Extra flags every worker is started with.
    pub worker_flags: Vec<String>,
    pub workers: Vec<Server>,
    /// The CA every process's certificate comes from; `None`: every
    /// process runs `--insecure`.
    pub pki: Option<Pki>,
}

impl Cluster {
    /// A coordinator and `workers` workers with `slots` slots each.
    pub fn start(workers: usize, slots: u32) -> Cluster {
        Self::start_with(workers, slots, &[])
    }

    /// Like `start`, with extra coordinator flags.
    pub fn start_with(workers: usize, slots: u32, coordinator_flags: &[&str]) -> Cluster {
        Self::start_secured(workers, slots, coordinator_flags, false)
    }

    /// Like `start_with`; with `tls`, every process (clients included)
    /// has a certificate of one CA, made in the cluster's directory.
    pub fn start_secured(
        workers: usize,
        slots: u32,
        coordinator_flags: &[&str],
        tls: bool,
    ) -> Cluster {
        Self::start_full(workers, slots, coordinator_flags, &[], tls)
    }

    /// Like `start_secured`, every worker started with `worker_flags` too.
    pub fn start_full(
        workers: usize,
        slots: u32,
        coordinator_flags: &[&str],
        worker_flags: &[&str],
        tls: bool,
    ) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = tls.then(|| Pki::new(dir.path().join("pki")));
        let mut cluster = Cluster {
            dir,
            coordinator: None,
            coordinator_port: 0,
            coordinator_flags: coordinator_flags.iter().map(|s| s.to_string()).collect(),
            worker_flags: worker_flags.iter().map(|s| s.to_string()).collect(),
            workers: Vec::new(),
            pki,
        };
        cluster.start_coordinator();
        for i in 0..workers {
            cluster.start_worker(i, slots);
        }
        cluster.wait_for_workers(workers);
        cluster
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Starts (or restarts, on the same data dir and port) the coordinator.
    pub fn start_coordinator(&mut self) {
        let listen = format!("127.0.0.1:{}", self.coordinator_port);
        let mut args: Vec<String> = [
            "coordinator",
            "--listen",
            &listen,
            "--data-dir",
            self.path("coordinator").to_str().expect("utf-8 path"),
            "--lease-timeout-ms",
            "3000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.coordinator_flags.iter().cloned());
        args.extend(security_flags(
            self.pki.as_ref(),
            "coordinator",
            "coordinator",
        ));
        let log = self.path(&format!("coordinator-{}.log", self.coordinator_port));
        let server = Server::start(&args, log);
        self.coordinator_port = server
            .addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("coordinator port");
        self.coordinator = Some(server);
    }

    pub fn coordinator_addr(&self) -> String {
        format!("127.0.0.1:{}", self.coordinator_port)
    }

    pub fn start_worker(&mut self, i: usize, slots: u32) {
        let mut args: Vec<String> = vec![
            "worker".into(),
            "--coordinator".into(),
            self.coordinator_addr(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--cache-dir".into(),
            self.path(&format!("worker{i}"))
                .to_str()
                .expect("utf-8")
                .into(),
            "--slots".into(),
            slots.to_string(),
        ];
        args.extend(security_flags(
            self.pki.as_ref(),
            "worker",
            &format!("worker{i}"),
        ));
        args.extend(writable_dir_flags(self.dir.path()));
        args.extend(self.worker_flags.iter().cloned());
        let log = self.path(&format!("worker{i}.log"));
        self.workers.push(Server::start(&args, log));
    }

    /// Waits until the coordinator lists `n` live workers.
    pub fn wait_for_workers(&self, n: usize) {
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        loop {
            let status = self.status();
            let alive = alive_workers(&status);
            if alive >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {alive} of {n} workers registered: {status}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `distbuild cluster status --json`.
    pub fn status(&self) -> Value {
        let out = distbuild()
            .args(["cluster", "status", "--json", "--coordinator"])
            .arg(self.coordinator_addr())
            .args(self.client_flags())
            .output()
            .expect("run cluster status");
        assert!(
            out.status.success(),
            "cluster status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status is JSON")
    }

    /// Runs `distbuild build --json` on `graph` with `source_dir`.
    pub fn build(&self, graph: &Value, source_dir: &Path, extra: &[&str]) -> BuildRun {
        let graph_path = self.path(&format!("graph-{}.json", rand_suffix()));
        std::fs::write(&graph_path, graph.to_string()).expect("write graph");
        self.build_file(&graph_path, source_dir, extra)
    }

    pub fn build_file(&self, graph_path: &Path, source_dir: &Path, extra: &[&str]) -> BuildRun {
        let out = build_command(graph_path, source_dir, &self.coordinator_addr(), extra)
            .args(self.client_flags())
            .output()
            .expect("run distbuild build");
        BuildRun::from(out)
    }

    /// Starts `distbuild build --json` on `graph` (sources in the
    /// cluster's directory) with output piped, for [`finish_build`].
    pub fn spawn_build(&self, graph: &Value, extra: &[&str]) -> Child {
        let mut command =
            graph_build_command(self.dir.path(), &self.coordinator_addr(), graph, extra);
        command.args(self.client_flags());
        spawn(command)
    }

    /// The security flags of this cluster's client (`client`).
    pub fn client_flags(&self) -> Vec<String> {
        security_flags(self.pki.as_ref(), "client", "client")
    }

    /// Everything the servers logged, for failure messages.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for server in self.coordinator.iter().chain(&self.workers) {
            all += &format!("==> {} <==\n", server.log.display());
            all += &std::fs::read_to_string(&server.log).unwrap_or_default();
        }
        all
    }
}

/// `distbuild build --json` on the graph at `graph_path` against the
/// coordinators at `addrs`. The caller adds the security flags (a
/// cluster's `client_flags`, or `--insecure`).
pub fn build_command(graph_path: &Path, source_dir: &Path, addrs: &str, extra: &[&str]) -> Command {
    let mut command = distbuild();
    command
        .args(["build", "--json", "--graph"])
        .arg(graph_path)
        .arg("--source-dir")
        .arg(source_dir)
        .arg("--coordinator")
        .arg(addrs)
        .args(extra);
    command
}

/// Writes `graph` into `dir` (also the source directory): the
/// `distbuild build --json` command that runs it against `addrs`.
fn graph_build_command(dir: &Path, addrs: &str, graph: &Value, extra: &[&str]) -> Command {
    let graph_path = dir.join(format!("graph-{}.json", rand_suffix()));
    std::fs::write(&graph_path, graph.to_string()).expect("write graph");
    build_command(&graph_path, dir, addrs, extra)
}

/// Writes `content` to a new file at `path` that only its owner may read
/// (as a secret must be).
pub fn write_private(path: &Path, content: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, content).expect("write a private file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

/// Peak resident memory of process `pid` so far (its `VmHWM`), in bytes.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    try_peak_rss_bytes(pid).unwrap_or_else(|| panic!("no peak RSS for process {pid}"))
}

/// [`peak_rss_bytes`], or None if the process is gone.
pub fn try_peak_rss_bytes(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmHWM")
}

/// A memory field of process `pid`'s `/proc/PID/status` (`VmRSS`,
/// `VmHWM`, ...) in bytes, or None if the process is gone.
pub fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    Some(kib * 1024)
}

/// Bytes of the files under `dir`, recursively.
pub fn disk_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut work = vec![dir.to_path_buf()];
    while let Some(dir) = work.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => work.push(entry.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// `command` started with stdin closed and stdout and stderr piped.
fn spawn(mut command: Command) -> Child {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn distbuild build")
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A finished `distbuild build --json`.
pub struct BuildRun {
    pub code: Option<i32>,
    pub events: Vec<Value>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for BuildRun {
    fn from(out: Output) -> Self {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let events = stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line {l:?}: {e}"))
            })
            .collect();
        BuildRun {
            code: out.status.code(),
            events,
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl BuildRun {
    /// The `job_finished` event of job `id`.
    pub fn finished(&self, id: &str) -> &Value {
        self.events
            .iter()
            .find(|e| e["event"] == "job_finished" && e["id"] == id)
            .unwrap_or_else(|| panic!("no job_finished for {id} in {:#?}", self.events))
    }

    pub fn kinds(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| e["event"].as_str().unwrap_or("?").to_string())
            .collect()
    }

    pub fn describe(&self) -> String {
        format!(
            "exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A job in graph JSON: `cmds` are shell scripts run by /bin/sh -c.
pub fn sh_job(name: &str, inputs: &[&str], deps: &[&str], scripts: &[&str]) -> Value {
    json!({
        "ID": id(name),
        "Name": name,
        "Inputs": inputs,
        "Deps": deps.iter().map(|d| id(d)).collect::<Vec<_>>(),
        "Cmds": scripts.iter().map(|s| json!({"Exec": ["/bin/sh", "-c", s]})).collect::<Vec<_>>(),
    })
}

/// A graph of `jobs` with `sources` (relative paths).
pub fn graph(sources: &[&str], jobs: Vec<Value>) -> Value {
    let files: serde_json::Map<String, Value> = sources
        .iter()
        .map(|p| (id(&format!("file:{p}")), json!(p)))
        .collect();
    json!({"SourceFiles": files, "Jobs": jobs})
}

/// How many workers a `cluster status --json` lists as alive.
pub fn alive_workers(status: &Value) -> usize {
    status["workers"].as_array().map_or(0, |w| {
        w.iter().filter(|w| w["alive"] == json!(true)).count()
    })
}

/// Free loopback ports (bound and released: another process could take
/// one in between, which a test would notice as a failed start).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// Several coordinators (node IDs 1..) forming one Raft cluster, and
/// workers that know all of them, in a temporary directory.
pub struct HaCluster {
    /// Held for the cluster's life: multi-coordinator tests run one at a
    /// time (on two cores, parallel clusters starve each other's
    /// elections and measure the machine, not the code).
    _serial: std::sync::MutexGuard<'static, ()>,
    pub dir: tempfile::TempDir,
    /// Index = node ID - 1; `None` while the node is down (or never ran).
    pub coordinators: Vec<Option<Server>>,
    pub ports: Vec<u16>,
    /// How many nodes form the initial cluster.
    pub initial: usize,
    pub workers: Vec<Option<Server>>,
    pub worker_slots: u32,
    /// The cluster secret file every coordinator is started with, if any.
    pub secret_file: Option<PathBuf>,
    /// The CA every process's certificate comes from; `None`: every
    /// process runs `--insecure`.
    pub pki: Option<Pki>,
    /// Each node's metrics and status port (index = node ID - 1).
    pub metrics_ports: Vec<u16>,
    /// The token every metrics port asks for.
    pub metrics_token: String,
}

impl HaCluster {
    /// `coordinators` nodes initialised together, and `workers` workers
    /// with `slots` slots each. `spare` more ports are reserved for nodes
    /// added later.
    pub fn start(coordinators: usize, spare: usize, workers: usize, slots: u32) -> HaCluster {
        Self::start_with(coordinators, spare, workers, slots, None)
    }

    /// [`HaCluster::start`], every coordinator started with
    /// `--cluster-secret-file` holding `secret` when given.
    pub fn start_with(
        coordinators: usize,
        spare: usize,
        workers: usize,
        slots: u32,
        secret: Option<&str>,
    ) -> HaCluster {
        Self::start_secured(coordinators, spare, workers, slots, secret, false)
    }

    /// [`HaCluster::start_with`]; with `tls`, every process (clients
    /// included) has a certificate of one CA, made in the cluster's
    /// directory.
    pub fn start_secured(
        coordinators: usize,
        spare: usize,
        workers: usize,
        slots: u32,
        secret: Option<&str>,
        tls: bool,
    ) -> HaCluster {
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let serial = SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ports = free_ports(2 * (coordinators + spare));
        let metrics_ports = ports.split_off(coordinators + spare);
        let metrics_token = format!("metrics-token-{}", rand_suffix());
        write_private(&dir.path().join("metrics-token"), &metrics_token);
        let mut cluster = HaCluster {
            metrics_ports,
            metrics_token,
            _serial: serial,
            dir,
            coordinators: (0..coordinators + spare).map(|_| None).collect(),
            ports,
            initial: coordinators,
            workers: Vec::new(),
            worker_slots: slots,
            secret_file: None,
            pki: None,
        };
        if tls {
            cluster.pki = Some(Pki::new(cluster.path("pki")));
        }
        if let Some(secret) = secret {
            let path = cluster.path("cluster-secret");
            write_private(&path, &format!("{secret}\n"));
            cluster.secret_file = Some(path);
        }
        for id in 1..=coordinators as u64 {
            cluster.start_node(id);
        }
        cluster.wait_for_leader();
        for _ in 0..workers {
            cluster.add_worker();
        }
        cluster.wait_for_workers(workers);
        cluster
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn node_addr(&self, id: u64) -> String {
        format!("127.0.0.1:{}", self.ports[id as usize - 1])
    }

    /// Node `id`'s metrics and status port.
    pub fn metrics_addr(&self, id: u64) -> String {
        format!("127.0.0.1:{}", self.metrics_ports[id as usize - 1])
    }

    /// `path` from node `id`'s metrics port, with the token: (HTTP status,
    /// body).
    pub fn http_get(&self, id: u64, path: &str) -> (u16, String) {
        let auth = format!("Bearer {}", self.metrics_token);
        http_get(&self.metrics_addr(id), path, &[("Authorization", &auth)])
    }

    /// Every coordinator address (up or down), for `--coordinator`.
    pub fn all_addrs(&self) -> String {
        (1..=self.ports.len() as u64)
            .map(|id| self.node_addr(id))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn initial_cluster(&self) -> String {
        (1..=self.initial as u64)
            .map(|id| format!("{id}={}", self.node_addr(id)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts (or restarts on its data dir) node `id`; nodes beyond the
    /// initial ones start with `--join`.
    pub fn start_node(&mut self, id: u64) {
        let mut args: Vec<String> = vec![
            "coordinator".into(),
            "--node-id".into(),
            id.to_string(),
            "--listen".into(),
            self.node_addr(id),
            "--data-dir".into(),
            self.path(&format!("coordinator{id}"))
                .to_str()
                .expect("utf-8")
                .into(),
            "--lease-timeout-ms".into(),
            "3000".into(),
        ];
        if let Some(path) = &self.secret_file {
            args.push("--cluster-secret-file".into());
            args.push(path.to_str().expect("utf-8").into());
        }
        args.push("--metrics-listen".into());
        args.push(self.metrics_addr(id));
        args.push("--metrics-token-file".into());
        args.push(self.path("metrics-token").display().to_string());
        if id as usize <= self.initial {
            args.push("--initial-cluster".into());
            args.push(self.initial_cluster());
        } else {
            args.push("--join".into());
        }
        args.extend(security_flags(
            self.pki.as_ref(),
            "coordinator",
            &format!("c{id}"),
        ));
        let log = self.path(&format!("coordinator{id}-{}.log", rand_suffix()));
        self.coordinators[id as usize - 1] = Some(Server::start(&args, log));
    }

    /// SIGKILLs node `id`.
    pub fn kill_node(&mut self, id: u64) {
        if let Some(mut server) = self.coordinators[id as usize - 1].take() {
            server.kill();
        }
    }

    pub fn add_worker(&mut self) {
        self.add_worker_with(&[]);
    }

    /// Starts one more worker with `extra` flags.
    pub fn add_worker_with(&mut self, extra: &[&str]) {
        self.add_worker_with_env(extra, &[]);
    }

    /// Starts one more worker with `extra` flags and `env` variables.
    pub fn add_worker_with_env(&mut self, extra: &[&str], env: &[(&str, &str)]) {
        let i = self.workers.len();
        let mut args: Vec<String> = vec![
            "worker".into(),
            "--coordinator".into(),
            self.all_addrs(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--cache-dir".into(),
            self.path(&format!("worker{i}"))
                .to_str()
                .expect("utf-8")
                .into(),
            "--slots".into(),
            self.worker_slots.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(security_flags(
            self.pki.as_ref(),
            "worker",
            &format!("worker{i}"),
        ));
        args.extend(writable_dir_flags(self.dir.path()));
        let log = self.path(&format!("worker{i}.log"));
        let mut command = distbuild();
        command.args(&args).envs(env.iter().copied());
        self.workers.push(Some(Server::start_command(command, log)));
    }

    /// `distbuild cluster status --json` through every address, or the
    /// error of the last attempt.
    pub fn try_status(&self) -> Result<Value, String> {
        let out = distbuild()
            .args([
                "cluster",
                "status",
                "--json",
                "--timeout",
                "5",
                "--coordinator",
            ])
            .arg(self.all_addrs())
            .args(self.client_flags())
            .output()
            .expect("run cluster status");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("status is not JSON: {e}"))
    }

    pub fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|e| panic!("cluster status failed: {e}\n{}", self.logs()))
    }

    /// Waits until some node leads and answers; returns its ID.
    pub fn wait_for_leader(&self) -> u64 {
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(status) = self.try_status() {
                let leader = status["leader"].as_u64().unwrap_or(0);
                if leader != 0 && self.coordinators[leader as usize - 1].is_some() {
                    return leader;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no leader elected\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until one node has led, in one term, for `settle` (a cluster
    /// whose members initialize together may elect twice at first);
    /// returns its ID.
    pub fn wait_for_stable_leader(&self, settle: Duration) -> u64 {
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        let mut seen: Option<((u64, u64), std::time::Instant)> = None;
        loop {
            let leader = self.wait_for_leader();
            let term = self
                .status()
                .get("members")
                .and_then(|m| m.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .find(|m| m["node_id"].as_u64() == Some(leader))
                .and_then(|m| m["term"].as_u64())
                .unwrap_or(0);
            match seen {
                Some((was, since)) if was == (leader, term) => {
                    if since.elapsed() >= settle {
                        return leader;
                    }
                }
                _ => seen = Some(((leader, term), std::time::Instant::now())),
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no stable leader\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `n` workers are alive.
    pub fn wait_for_workers(&self, n: usize) {
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        loop {
            let alive = self.try_status().map_or(0, |s| alive_workers(&s));
            if alive >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {alive} of {n} workers registered\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts `distbuild build --json` on `graph` in the background.
    pub fn spawn_build(&self, graph: &Value, extra: &[&str]) -> Child {
        spawn(self.build_command(graph, extra))
    }

    /// The `distbuild build --json` command for `graph` (written into the
    /// cluster's directory), to start with the caller's own pipes.
    pub fn build_command(&self, graph: &Value, extra: &[&str]) -> Command {
        let mut command = graph_build_command(self.dir.path(), &self.all_addrs(), graph, extra);
        command.args(self.client_flags());
        command
    }

    /// The security flags of this cluster's client (`client`).
    pub fn client_flags(&self) -> Vec<String> {
        security_flags(self.pki.as_ref(), "client", "client")
    }

    /// Everything the servers logged, for failure messages (the tail of
    /// each log).
    pub fn logs(&self) -> String {
        log_tails(self.dir.path())
    }
}

/// The last 40 lines of every `*.log` file in `dir`, for failure messages.
pub fn log_tails(dir: &Path) -> String {
    let mut all = String::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    paths.retain(|p| p.extension().is_some_and(|e| e == "log"));
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        all += &format!("==> {} <==\n{}\n", path.display(), tail.join("\n"));
    }
    all
}

/// Waits for a background build to finish, at most `timeout`, reading its
/// output meanwhile (a build prints more than a pipe holds: unread, it
/// would block on its next write and never finish).
pub fn finish_build(child: Child, timeout: Duration) -> BuildRun {
    finish_build_explained(child, timeout, String::new)
}

/// [`finish_build`], adding `explain()` (servers' logs, say) to the
/// failure when the build does not finish in time.
pub fn finish_build_explained(
    child: Child,
    timeout: Duration,
    explain: impl FnOnce() -> String,
) -> BuildRun {
    let mut running = DrainedChild::new(child);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if running.child.try_wait().expect("poll the build").is_some() {
            return running.finish();
        }
        if std::time::Instant::now() > deadline {
            let _ = running.child.kill();
            let run = running.finish();
            panic!(
                "the build did not finish in {timeout:?}: {}\n{}",
                run.describe(),
                explain()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process whose piped stdout and stderr are read by threads as
/// it runs.
pub struct DrainedChild {
    pub child: Child,
    stdout: std::thread::JoinHandle<Vec<u8>>,
    stderr: std::thread::JoinHandle<Vec<u8>>,
}

impl DrainedChild {
    pub fn new(mut child: Child) -> DrainedChild {
        // A pipe the caller took (to read it itself) reads as empty.
        fn drain(
            pipe: Option<impl std::io::Read + Send + 'static>,
        ) -> std::thread::JoinHandle<Vec<u8>> {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut bytes);
                }
                bytes
            })
        }
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        DrainedChild {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits for the child and everything it wrote.
    pub fn finish(mut self) -> BuildRun {
        let status = self.child.wait().expect("wait for the build");
        BuildRun::from(Output {
            status,
            stdout: self.stdout.join().expect("stdout reader"),
            stderr: self.stderr.join().expect("stderr reader"),
        })
    }
}

/// Lines of a file (empty if missing).
pub fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits until `path` has at least `n` lines.
pub fn wait_for_lines(path: &Path, n: usize, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while read_lines(path).len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} has {} of {n} lines after {timeout:?}",
            path.display(),
            read_lines(path).len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `chains` chains of `length` jobs; each sleeps `sleep` seconds, then
/// appends its name to `log` (outside every sandbox), reading its
/// predecessor's output so that artifacts move between workers.
pub fn sleep_chains(chains: usize, length: usize, sleep: &str, log: &Path) -> Value {
    let mut jobs = Vec::new();
    for c in 0..chains {
        for s in 0..length {
            let name = format!("c{c}s{s}");
            let prev = format!("c{c}s{}", s.wrapping_sub(1));
            let (deps, read_prev) = if s == 0 {
                (vec![], String::new())
            } else {
                (
                    vec![prev.as_str()],
                    format!(
                        "cat {{{{index .Deps \"{}\"}}}}/done >/dev/null && ",
                        id(&prev)
                    ),
                )
            };
            let script = format!(
                "{read_prev}sleep {sleep} && echo {name} >> {} && echo {name} > {{{{.OutputDir}}}}/done",
                log.display()
            );
            jobs.push(sh_job(&name, &[], &deps, &[&script]));
        }
    }
    graph(&[], jobs)
}

/// The job names of `sleep_chains(chains, length, ..)`.
pub fn chain_job_names(chains: usize, length: usize) -> Vec<String> {
    (0..chains)
        .flat_map(|c| (0..length).map(move |s| format!("c{c}s{s}")))
        .collect()
}

/// The build succeeded, reported every job finished exactly once, and
/// (unless listed in `may_rerun`) every job ran exactly once according to
/// the jobs' own `log`.
pub fn assert_complete(
    run: &BuildRun,
    names: &[String],
    log: &Path,
    may_rerun: &[&str],
    logs: &str,
) {
    use std::collections::BTreeMap;
    assert_eq!(run.code, Some(0), "{}\n{logs}", run.describe());
    let mut reported: BTreeMap<String, usize> = BTreeMap::new();
    for event in &run.events {
        if event["event"] == "job_finished" {
            *reported
                .entry(event["id"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
    }
    for name in names {
        assert_eq!(
            reported.get(&id(name)),
            Some(&1),
            "job {name} reported {:?} times: {}",
            reported.get(&id(name)),
            run.describe()
        );
    }
    assert_eq!(reported.len(), names.len(), "{}", run.describe());
    let mut ran: BTreeMap<String, usize> = BTreeMap::new();
    for line in read_lines(log) {
        *ran.entry(line).or_default() += 1;
    }
    for name in names {
        let times = ran.get(name).copied().unwrap_or(0);
        if may_rerun.contains(&name.as_str()) {
            assert!(times >= 1, "job {name} never ran");
        } else {
            assert_eq!(
                times, 1,
                "job {name} ran {times} times; log: {ran:?}\n{logs}"
            );
        }
    }
}

/// A user other than the one running the tests (root), created once.
pub fn other_user() -> Option<&'static str> {
    const NAME: &str = "distbuild-other";
    let exists = std::process::Command::new("id")
        .arg(NAME)
        .output()
        .is_ok_and(|o| o.status.success());
    if !exists {
        let made = std::process::Command::new("useradd")
            .args(["--no-create-home", "--shell", "/bin/sh", NAME])
            .output()
            .expect("run useradd");
        assert!(
            made.status.success(),
            "useradd: {}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
    Some(NAME)
}

/// What the Remote Execution API tests share: a runtime for their async
/// clients, digests as the API writes them, a plain channel.
pub mod reapi {
    use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
    use tonic::transport::Channel;

    pub fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    pub fn sha256(data: &[u8]) -> re::Digest {
        use sha2::Digest as _;
        re::Digest {
            hash: hex::encode(sha2::Sha256::digest(data)),
            size_bytes: data.len() as i64,
        }
    }

    pub fn sha1(data: &[u8]) -> re::Digest {
        use sha1::Digest as _;
        re::Digest {
            hash: hex::encode(sha1::Sha1::digest(data)),
            size_bytes: data.len() as i64,
        }
    }

    pub async fn channel(addr: &str) -> Channel {
        Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }
}

/// GET `path` from `addr` over plain HTTP/1.1 with `headers`: (status,
/// body). Panics if nothing answers.
pub fn http_get(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut stream =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request += &format!("{name}: {value}\r\n");
    }
    request += "\r\n";
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read response");
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status: {head:?}"));
    // Chunked answers (axum streams bodies) are decoded.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            out += &tail[..size];
            rest = &tail[size + 2..];
        }
        out
    } else {
        body.to_string()
    };
    (status, body)
}

/// The value of sample `name` (with its labels, as written:
/// `distbuild_jobs_finished_total{outcome="failed"}`) in Prometheus text,
/// or 0 when absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            rest.strip_prefix(' ')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// What is left in a worker's sandbox directory but its slots'
/// directories and their spares (the last job's directory, emptied): job
/// directories not removed, anything in a spare's directories.
pub fn job_dirs_left(sandbox_root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut left = Vec::new();
    for entry in std::fs::read_dir(sandbox_root).expect("the sandbox directory") {
        let path = entry.expect("an entry").path();
        let is_slot = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("slot-"))
            && path.is_dir();
        if !is_slot {
            left.push(path);
            continue;
        }
        for job in std::fs::read_dir(&path).expect("a slot directory") {
            let job = job.expect("an entry").path();
            if !job.ends_with(".spare") {
                left.push(job);
                continue;
            }
            for dir in std::fs::read_dir(&job).expect("the spare") {
                let dir = dir.expect("an entry").path();
                let empty = std::fs::read_dir(&dir).is_ok_and(|mut inside| inside.next().is_none());
                if !empty {
                    left.push(dir);
                }
            }
        }
    }
    left
}
