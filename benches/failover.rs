//! What replication costs and what a failover stalls, on real processes:
//! - committed commands per second through a cluster of one coordinator
//!   and of three (64 concurrent callers renewing worker leases, each call
//!   one Raft command);
//! - the stall a leader kill causes during a build of trivial jobs: from
//!   the SIGKILL to a new leader (polled every 5 ms), and to the next job
//!   completion the client receives (from the new leader), with the Raft
//!   timing the coordinators run with.
//!
//! `cargo bench --bench failover` (BENCH_TRIALS overrides the 5 leader
//! kills; `DISTBUILD_BENCH_BINARY=<path>` runs another build's `distbuild`
//! on the same harness, to compare two builds in one sitting). Under `cargo test --all-targets` it runs
//! a short smoke version.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use distbuild_coordinator::replica as node;
use distbuild_proto::raft_v1::NodeStatusRequest;
use distbuild_proto::raft_v1::raft_transport_client::RaftTransportClient;
use distbuild_proto::v1::worker_api_client::WorkerApiClient;
use distbuild_proto::v1::{HeartbeatRequest, RegisterRequest};
use serde_json::json;
use support::{HaCluster, id};

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let seconds = if benchmarking { 5 } else { 1 };
    println!("failover: committed commands/s (64 callers, {seconds} s each)");
    let mut rates = Vec::new();
    for nodes in [1usize, 3] {
        let cluster = HaCluster::start(nodes, 0, 0, 1);
        let leader = cluster.node_addr(cluster.wait_for_stable_leader(Duration::from_secs(1)));
        let (rate, refused) = runtime.block_on(commands_per_second(
            &leader,
            64,
            Duration::from_secs(seconds),
        ));
        let terms: Vec<u64> = cluster.status()["members"]
            .as_array()
            .map(|m| m.iter().filter_map(|m| m["term"].as_u64()).collect())
            .unwrap_or_default();
        println!(
            "  {nodes} coordinator(s): {rate:>8.0} commands/s  ({refused} calls refused during elections, then sent to the new leader; terms after: {terms:?})"
        );
        rates.push(rate);
    }
    println!("  3 coordinators / 1: {:.2}x the rate", rates[1] / rates[0]);

    let trials = match std::env::var("BENCH_TRIALS") {
        Ok(n) => n.parse().expect("BENCH_TRIALS is a number of leader kills"),
        Err(_) if benchmarking => 5,
        Err(_) => 1,
    };
    let (elections, stalls) =
        leader_kill_stalls(&runtime, trials, if benchmarking { 4000 } else { 300 });
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let ms = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "failover: leader SIGKILL during a build (Raft heartbeat {} ms, election timeout {}-{} ms)",
        node::HEARTBEAT_INTERVAL_MS,
        node::ELECTION_TIMEOUT_MIN_MS,
        node::ELECTION_TIMEOUT_MAX_MS
    );
    println!(
        "  kill -> new leader:               median {:>5.0} ms  (runs: {})",
        median(elections.clone()).as_secs_f64() * 1000.0,
        ms(&elections)
    );
    println!(
        "  kill -> next job completion seen: median {:>5.0} ms  (runs: {})",
        median(stalls.clone()).as_secs_f64() * 1000.0,
        ms(&stalls)
    );
}

/// Commands committed per second, and how many calls were refused
/// UNAVAILABLE (an election) on the way.
async fn commands_per_second(leader: &str, callers: usize, duration: Duration) -> (f64, u64) {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{leader}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the leader");
    let mut tasks = Vec::new();
    let deadline = tokio::time::Instant::now() + duration;
    for i in 0..callers {
        let mut client = WorkerApiClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let worker_id = format!("bench-{i}");
            // A leader just elected answers UNAVAILABLE until it has
            // extended the leases of its term.
            let mut attempts = 0;
            while let Err(status) = client
                .register(RegisterRequest {
                    worker_id: worker_id.clone(),
                    addr: "127.0.0.1:1".into(),
                    slots: 1,
                    ahead: 0,
                    held_artifacts: vec![],
                    request_id: format!("register-{i}"),
                    properties: vec![],
                })
                .await
            {
                attempts += 1;
                assert!(attempts < 100, "register: {status}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let (mut done, mut refused) = (0u64, 0u64);
            while tokio::time::Instant::now() < deadline {
                let answer = client
                    .heartbeat(HeartbeatRequest {
                        worker_id: worker_id.clone(),
                        request_id: format!("hb-{done}-{refused}"),
                        ..Default::default()
                    })
                    .await;
                match answer {
                    Ok(_) => done += 1,
                    // An election under this load: count it, follow the
                    // new leader when it is named, wait, retry.
                    Err(status) if status.code() == tonic::Code::Unavailable => {
                        refused += 1;
                        let leader = status
                            .metadata()
                            .get(distbuild_proto::wire::LEADER_METADATA_KEY)
                            .and_then(|v| v.to_str().ok())
                            .map(|addr| format!("http://{addr}"));
                        if let Some(Ok(endpoint)) =
                            leader.map(tonic::transport::Endpoint::from_shared)
                        {
                            client = WorkerApiClient::new(endpoint.connect_lazy());
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(status) => panic!("heartbeat: {status}"),
                }
            }
            (done, refused)
        }));
    }
    let started = Instant::now();
    let (mut total, mut refused) = (0, 0);
    for task in tasks {
        let (done, no) = task.await.expect("caller");
        total += done;
        refused += no;
    }
    (total as f64 / started.elapsed().as_secs_f64(), refused)
}

/// Kills the leader `trials` times during one build of `jobs` trivial
/// jobs (restarting the killed node each time); returns the times from
/// each kill to a new leader and to the next job completion the client
/// receives.
fn leader_kill_stalls(
    runtime: &tokio::runtime::Runtime,
    trials: usize,
    jobs: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let mut cluster = HaCluster::start(3, 0, 2, 2);
    let graph = json!({"Jobs": (0..jobs).map(|i| json!({
        "ID": id(&format!("failover bench job {i}")),
        "Name": format!("job {i}"),
        "Cmds": [{"Exec": ["/bin/sh", "-c", format!("echo {i} > out")], "WorkingDirectory": "{{.OutputDir}}"}],
    })).collect::<Vec<_>>()});
    let mut build = cluster.spawn_build(&graph, &["--timeout", "120"]);
    let stdout = build.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<Instant>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line.contains("\"job_finished\"") && tx.send(Instant::now()).is_err() {
                return;
            }
        }
    });
    let wait_finished = |n: usize| {
        for _ in 0..n {
            rx.recv_timeout(Duration::from_secs(120))
                .expect("job completions keep coming");
        }
    };
    let mut elections = Vec::new();
    let mut stalls = Vec::new();
    wait_finished(jobs / (trials + 2));
    for _ in 0..trials {
        let leader = cluster.wait_for_leader();
        let survivors: Vec<String> = (1..=3u64)
            .filter(|id| *id != leader)
            .map(|id| cluster.node_addr(id))
            .collect();
        while rx.try_recv().is_ok() {}
        cluster.kill_node(leader);
        let killed = Instant::now();
        let elected = runtime.block_on(new_leader(&survivors, leader));
        elections.push(elected - killed);
        // The next completion the new leader accepted: completions that
        // reach the client before a new leader exists were accepted by the
        // old one before it died (and only streamed late), so they are
        // skipped.
        let next = loop {
            let at = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("a job completes after the failover");
            if at >= elected {
                break at;
            }
        };
        stalls.push(next - killed);
        cluster.start_node(leader);
        wait_finished(jobs / (trials + 2) / 2);
    }
    let run = support::finish_build(build, Duration::from_secs(600));
    assert_eq!(run.code, Some(0), "{}", run.describe());
    (elections, stalls)
}

/// Polls `survivors` every 5 ms until one of them leads; returns when.
async fn new_leader(survivors: &[String], old: u64) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for addr in survivors {
            let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            else {
                continue;
            };
            let endpoint = endpoint.timeout(Duration::from_millis(200));
            if let Ok(channel) = endpoint.connect().await {
                let mut client = RaftTransportClient::new(channel);
                if let Ok(status) = client.node_status(NodeStatusRequest {}).await {
                    let status = status.into_inner();
                    if status.role == "leader" && status.node_id != old {
                        return Instant::now();
                    }
                }
            }
        }
        assert!(Instant::now() < deadline, "no new leader in 30 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
