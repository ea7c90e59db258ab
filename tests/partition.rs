//! A real network partition: three coordinators, each in its own network
//! namespace (`support/netns.rs`), workers and the client in the test's
//! own namespace. The leader is cut off mid-build — its packets dropped,
//! not refused — so every connection to it goes silent: only keepalives
//! and deadlines get the workers and the client away from it. The majority
//! elects a new leader and the build completes; healed, the old leader
//! rejoins as a follower and catches up.
//!
//! Needs root (namespaces, veths, a bridge) and `ip` from iproute2; without
//! them the test fails saying so.

#[path = "support/netns.rs"]
mod netns;
mod support;

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use netns::Netns;
use serde_json::Value;
use support::*;

const COORDINATORS: usize = 3;
const WORKERS: usize = 3;
const WORKER_SLOTS: u32 = 2;
/// Every coordinator listens on this port of its own namespace's address.
const COORDINATOR_PORT: u16 = 7000;
/// How long a server may take to start listening, or the cluster to elect
/// its first leader and see its workers.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the build may take once the leader is cut off. Far below TCP's
/// own timeouts (minutes): a connection to the cut-off node that hangs a
/// worker or the client fails the test.
const BUILD_AFTER_CUT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the majority may take to elect a new leader.
const ELECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the healed node may take to follow and catch up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// How many entries the healed node's applied index may trail the
/// leader's (workers keep heartbeating, so the log keeps growing).
const MAX_CATCH_UP_LAG: u64 = 5;

/// The coordinators in their namespaces, workers, in a temporary
/// directory. Fields drop in order: processes, then the network, then the
/// directory.
struct PartitionedCluster {
    workers: Vec<Server>,
    coordinators: Vec<Server>,
    net: Netns,
    dir: tempfile::TempDir,
}

impl PartitionedCluster {
    fn start() -> PartitionedCluster {
        let net = Netns::new(COORDINATORS);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cluster = PartitionedCluster {
            workers: Vec::new(),
            coordinators: Vec::new(),
            net,
            dir,
        };
        for id in 1..=COORDINATORS {
            cluster.start_coordinator(id);
        }
        cluster.wait_for_leader(None, START_TIMEOUT);
        for i in 0..WORKERS {
            cluster.start_worker(i);
        }
        cluster.wait_for_workers(WORKERS);
        cluster
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn node_addr(&self, id: usize) -> String {
        format!("{}:{COORDINATOR_PORT}", self.net.ip(id))
    }

    /// Every coordinator address, for `--coordinator`.
    fn all_addrs(&self) -> String {
        (1..=COORDINATORS)
            .map(|id| self.node_addr(id))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start_coordinator(&mut self, id: usize) {
        let initial_cluster = (1..=COORDINATORS)
            .map(|id| format!("{id}={}", self.node_addr(id)))
            .collect::<Vec<_>>()
            .join(",");
        let mut command = self.net.command(id, env!("CARGO_BIN_EXE_distbuild"));
        command
            .args(["coordinator", "--insecure", "--node-id", &id.to_string()])
            .args(["--listen", &self.node_addr(id)])
            .arg("--data-dir")
            .arg(self.path(&format!("coordinator{id}")))
            .args(["--initial-cluster", &initial_cluster])
            .args(["--lease-timeout-ms", "3000"]);
        let server = Server::start_command(command, self.path(&format!("coordinator{id}.log")));
        // `ip netns exec` execs the coordinator: the child is the
        // coordinator itself (so dropping the Server kills it), in another
        // network namespace than ours.
        let pid = server.child.id();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("read the child's exe");
        assert!(
            exe.ends_with("distbuild"),
            "child {pid} runs {} (expected distbuild)",
            exe.display()
        );
        let namespace = |pid: String| {
            std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("read a network namespace")
        };
        assert_ne!(
            namespace(pid.to_string()),
            namespace("self".to_string()),
            "coordinator {id} runs in the test's own network namespace"
        );
        self.coordinators.push(server);
    }

    fn start_worker(&mut self, i: usize) {
        let mut command = distbuild();
        command
            .args(["worker", "--insecure", "--coordinator", &self.all_addrs()])
            .args(["--listen", "127.0.0.1:0"])
            .arg("--cache-dir")
            .arg(self.path(&format!("worker{i}")))
            .args(["--slots", &WORKER_SLOTS.to_string()])
            .args(writable_dir_flags(self.dir.path()));
        let server = Server::start_command(command, self.path(&format!("worker{i}.log")));
        self.workers.push(server);
    }

    /// `distbuild cluster status --json` through every address, or the
    /// error of the last attempt.
    fn try_status(&self) -> Result<Value, String> {
        let out = distbuild()
            .args(["cluster", "status", "--json", "--timeout", "5"])
            .args(["--insecure", "--coordinator", &self.all_addrs()])
            .output()
            .expect("run cluster status");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("status is not JSON: {e}"))
    }

    /// `distbuild cluster status --json`, or a failure with the logs.
    fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|e| panic!("cluster status failed: {e}\n{}", self.logs()))
    }

    /// Waits until a node other than `not` leads (as its own status says);
    /// returns its ID.
    fn wait_for_leader(&self, not: Option<u64>, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.try_status() {
                Ok(status) => {
                    let leader = status["leader"].as_u64().unwrap_or(0);
                    if leader != 0
                        && Some(leader) != not
                        && member(&status, leader).is_some_and(|m| m["role"] == "leader")
                    {
                        return leader;
                    }
                    status.to_string()
                }
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "no leader (other than {not:?}) within {timeout:?}; last status: {last}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until `n` workers are alive.
    fn wait_for_workers(&self, n: usize) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let alive = self.try_status().map_or(0, |s| alive_workers(&s));
            if alive >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {alive} of {n} workers registered\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts `distbuild build --json` on `graph` in the background.
    fn spawn_build(&self, graph: &Value) -> BuildProcess {
        let graph_path = self.path("graph.json");
        std::fs::write(&graph_path, graph.to_string()).expect("write graph");
        distbuild()
            .args(["build", "--json", "--graph"])
            .arg(&graph_path)
            .arg("--source-dir")
            .arg(self.dir.path())
            .args([
                "--insecure",
                "--coordinator",
                &self.all_addrs(),
                "--timeout",
                "60",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map(|child| BuildProcess(Some(child)))
            .expect("spawn distbuild build")
    }

    /// Waits for a background build, at most `timeout`; on timeout kills
    /// it and fails with its output and the servers' logs.
    fn finish_build(&self, mut build: BuildProcess, timeout: Duration) -> BuildRun {
        let child = build.0.take().expect("a build is waited for once");
        finish_build_explained(child, timeout, || {
            format!(
                "(a connection to the cut-off node hanging?)\n{}",
                self.logs()
            )
        })
    }

    /// The tail of every server's log, for failure messages.
    fn logs(&self) -> String {
        log_tails(self.dir.path())
    }
}

/// A background `distbuild build`, killed if the test fails before waiting
/// for it.
struct BuildProcess(Option<Child>);

impl Drop for BuildProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts a server from `command` (`support::Server::start` for any
/// command line): waits for its "listening on ADDR" line and copies its
/// stderr to `log`.
/// Member `id`'s applied index in a `cluster status --json`.
fn applied_index(status: &Value, id: u64) -> Option<u64> {
    member(status, id)?["applied_index"].as_u64()
}

/// Member `id` in a `cluster status --json`.
fn member(status: &Value, id: u64) -> Option<&Value> {
    status["members"]
        .as_array()?
        .iter()
        .find(|m| m["node_id"].as_u64() == Some(id))
}

#[test]
fn a_leader_cut_off_mid_build_is_replaced_and_rejoins_as_a_follower_once_healed() {
    let started = Instant::now();
    let cluster = PartitionedCluster::start();
    eprintln!(
        "cluster up in {:?}: coordinators at {}",
        started.elapsed(),
        cluster.all_addrs()
    );
    let log = cluster.path("ran.log");
    let (chains, length) = (3, 10);
    let build = cluster.spawn_build(&sleep_chains(chains, length, "0.3", &log));
    wait_for_lines(&log, 6, START_TIMEOUT);

    let old_leader = cluster.wait_for_leader(None, START_TIMEOUT);
    let applied_before_cut = applied_index(&cluster.status(), old_leader)
        .unwrap_or_else(|| panic!("no applied index of node {old_leader}"));
    let cut_at = Instant::now();
    cluster.net.cut(old_leader as usize);
    eprintln!(
        "cut off leader {old_leader} (applied {applied_before_cut}) after {} jobs ran",
        read_lines(&log).len()
    );

    let new_leader = cluster.wait_for_leader(Some(old_leader), ELECTION_TIMEOUT);
    eprintln!(
        "node {new_leader} leads {:?} after the cut",
        cut_at.elapsed()
    );
    let run = cluster.finish_build(
        build,
        BUILD_AFTER_CUT_TIMEOUT.saturating_sub(cut_at.elapsed()),
    );
    eprintln!("the build finished {:?} after the cut", cut_at.elapsed());
    assert_complete(
        &run,
        &chain_job_names(chains, length),
        &log,
        &[],
        &cluster.logs(),
    );

    // The majority moved on without the cut-off node: catching up means
    // applying entries it never saw.
    // (A status taken while an election runs names no leader: ask again.)
    let asked = Instant::now();
    let (at_heal, _leader, leader_applied_at_heal) = loop {
        let status = cluster.status();
        let leader = status["leader"].as_u64().unwrap_or(0);
        if let Some(applied) = applied_index(&status, leader) {
            break (status, leader, applied);
        }
        assert!(
            asked.elapsed() < ELECTION_TIMEOUT,
            "no leader with an applied index: {status}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        leader_applied_at_heal > applied_before_cut + MAX_CATCH_UP_LAG,
        "the log barely grew while node {old_leader} was cut off \
         ({applied_before_cut} -> {leader_applied_at_heal}): {at_heal}"
    );
    let healed_at = Instant::now();
    cluster.net.heal(old_leader as usize);
    let deadline = healed_at + CATCH_UP_TIMEOUT;
    loop {
        let status = cluster.try_status();
        if let Ok(status) = &status {
            let leader = status["leader"].as_u64().unwrap_or(0);
            if leader != 0
                && leader != old_leader
                && member(status, old_leader).is_some_and(|m| m["role"] == "follower")
                && let (Some(leader_applied), Some(old_applied)) = (
                    applied_index(status, leader),
                    applied_index(status, old_leader),
                )
                && old_applied >= leader_applied_at_heal
                && leader_applied.abs_diff(old_applied) <= MAX_CATCH_UP_LAG
            {
                eprintln!(
                    "healed node {old_leader} follows leader {leader} {:?} after the heal \
                     (applied {old_applied}, leader {leader_applied}; \
                     {leader_applied_at_heal} at the heal): {status}",
                    healed_at.elapsed()
                );
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {old_leader} did not rejoin as a follower caught up to index \
             {leader_applied_at_heal} within {CATCH_UP_TIMEOUT:?} of the heal; \
             last status: {}\n{}",
            status.map_or_else(|e| e, |s| s.to_string()),
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
