//! Failover with real processes on loopback: three (or five) coordinators
//! forming one Raft cluster, several workers, and the client CLI. Jobs
//! append their names to a log outside every sandbox, so the tests can
//! tell how often each one ran.

mod support;

use std::time::Duration;

use support::*;

const BUILD_TIMEOUT: Duration = Duration::from_secs(180);

#[test]
fn killing_the_leader_mid_build_loses_nothing_and_reruns_nothing() {
    let mut cluster = HaCluster::start(3, 0, 3, 2);
    let log = cluster.path("ran.log");
    let graph = sleep_chains(3, 10, "0.3", &log);
    let build = cluster.spawn_build(&graph, &["--timeout", "60"]);
    wait_for_lines(&log, 6, BUILD_TIMEOUT);
    let leader = cluster.wait_for_leader();
    cluster.kill_node(leader);
    let run = finish_build(build, BUILD_TIMEOUT);
    assert_complete(&run, &chain_job_names(3, 10), &log, &[], &cluster.logs());
    // The survivors elected another leader.
    assert_ne!(cluster.wait_for_leader(), leader);
}

/// A follower that has not heard from its leader for a heartbeat and a
/// half doubts it: a request it gets then is held until the election ends
/// and sent on to the new leader (or served, if the follower won), instead
/// of to the dead leader, which callers would find refusing connections
/// and come back from, backing off, until the election.
#[test]
fn a_follower_whose_leader_went_silent_sends_callers_to_the_next_leader() {
    use distbuild_coordinator::replica::{ELECTION_TIMEOUT_MAX_MS, LEADER_SILENCE, LEADER_WAIT};
    use distbuild_proto::leader::leader_hint;
    use distbuild_proto::v1::FindMissingBlobsRequest;
    use distbuild_proto::v1::client_api_client::ClientApiClient;

    let mut cluster = HaCluster::start(3, 0, 0, 1);
    let leader = cluster.wait_for_stable_leader(Duration::from_secs(1));
    let follower = (1..=3u64).find(|id| *id != leader).expect("a follower");
    let dead = cluster.node_addr(leader);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut client = runtime
        .block_on(ClientApiClient::connect(format!(
            "http://{}",
            cluster.node_addr(follower)
        )))
        .expect("connect to a follower");
    cluster.kill_node(leader);
    // Past the silence a follower doubts its leader after, and before any
    // follower stands for election (after the leader lease, the maximum
    // election timeout, and its turn).
    let pause = LEADER_SILENCE + Duration::from_millis(50);
    assert!(pause < Duration::from_millis(ELECTION_TIMEOUT_MAX_MS));
    std::thread::sleep(pause);
    let asked = std::time::Instant::now();
    let answer =
        runtime.block_on(client.find_missing_blobs(FindMissingBlobsRequest { digests: vec![] }));
    match answer {
        // The follower won the election and serves.
        Ok(_) => assert_eq!(cluster.wait_for_leader(), follower),
        Err(status) => {
            let named = leader_hint(&status)
                .unwrap_or_else(|| panic!("a redirect to the new leader, got {status:?}"));
            assert_ne!(named, dead, "sent to the dead leader: {status:?}");
            assert_eq!(named, cluster.node_addr(cluster.wait_for_leader()));
        }
    }
    // Held for the election, not for the whole wait.
    assert!(asked.elapsed() < LEADER_WAIT, "held {:?}", asked.elapsed());
}

#[test]
fn killing_every_coordinator_mid_build_and_restarting_them_completes_it() {
    let mut cluster = HaCluster::start(3, 0, 2, 2);
    let log = cluster.path("ran.log");
    let graph = sleep_chains(2, 8, "0.3", &log);
    let mut build = cluster.spawn_build(&graph, &["--timeout", "60"]);
    wait_for_lines(&log, 4, BUILD_TIMEOUT);
    for id in 1..=3 {
        cluster.kill_node(id);
    }
    // With every coordinator down, the client waits.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        build.try_wait().expect("poll the build").is_none(),
        "the client exited while the cluster was down"
    );
    for id in 1..=3 {
        cluster.start_node(id);
    }
    let run = finish_build(build, BUILD_TIMEOUT);
    // A job running while all coordinators were down may have finished
    // then and reported to nobody; its worker retries the report, so it
    // still runs once.
    assert_complete(&run, &chain_job_names(2, 8), &log, &[], &cluster.logs());
}

#[test]
fn a_killed_worker_s_job_runs_again_on_another_worker() {
    let mut cluster = HaCluster::start(3, 0, 2, 1);
    let log = cluster.path("ran.log");
    let pwd_log = cluster.path("where.log");
    // One long job that records where it runs, then a quick one after it.
    let long = sh_job(
        "long",
        &[],
        &[],
        &[&format!(
            "echo $PWD >> {}; sleep 3; echo long >> {}; echo done > {{{{.OutputDir}}}}/out",
            pwd_log.display(),
            log.display()
        )],
    );
    let after = sh_job(
        "after",
        &[],
        &["long"],
        &[&format!(
            "cat {{{{index .Deps \"{}\"}}}}/out && echo after >> {}",
            id("long"),
            log.display()
        )],
    );
    let build = cluster.spawn_build(&graph(&[], vec![long, after]), &["--timeout", "60"]);
    wait_for_lines(&pwd_log, 1, BUILD_TIMEOUT);
    let first = read_lines(&pwd_log)[0].clone();
    let victim = (0..cluster.workers.len())
        .find(|i| first.contains(&format!("/worker{i}/")))
        .unwrap_or_else(|| panic!("which worker ran in {first}?"));
    cluster.workers[victim].take().expect("running").kill();
    let run = finish_build(build, BUILD_TIMEOUT);
    assert_eq!(run.code, Some(0), "{}\n{}", run.describe(), cluster.logs());
    let places = read_lines(&pwd_log);
    assert_eq!(places.len(), 2, "long ran in {places:?}");
    assert!(
        !places[1].contains(&format!("/worker{victim}/")),
        "the job ran again on the dead worker: {places:?}"
    );
    assert_eq!(read_lines(&log), vec!["long", "after"]);
}

#[test]
fn builds_go_on_with_one_coordinator_down_and_wait_while_two_are() {
    let mut cluster = HaCluster::start(3, 0, 2, 2);
    let leader = cluster.wait_for_leader();
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    cluster.kill_node(follower);
    // One follower down: a build works.
    let log = cluster.path("ran.log");
    let run = finish_build(
        cluster.spawn_build(&sleep_chains(2, 2, "0", &log), &["--timeout", "60"]),
        BUILD_TIMEOUT,
    );
    assert_complete(&run, &chain_job_names(2, 2), &log, &[], &cluster.logs());

    // Two down: the client waits (no quorum) ...
    let log = cluster.path("ran2.log");
    let second = (1..=3)
        .find(|id| *id != follower && cluster.coordinators[*id as usize - 1].is_some())
        .expect("a live node");
    cluster.kill_node(second);
    let mut build = cluster.spawn_build(&sleep_chains(1, 3, "0", &log), &["--timeout", "60"]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        build.try_wait().expect("poll the build").is_none(),
        "the client exited without a quorum"
    );
    assert!(read_lines(&log).is_empty(), "a job ran without a quorum");
    // ... and one back completes it.
    cluster.start_node(second);
    let run = finish_build(build, BUILD_TIMEOUT);
    assert_complete(&run, &chain_job_names(1, 3), &log, &[], &cluster.logs());
}

#[test]
fn a_rolling_restart_of_every_coordinator_during_a_build_completes_it() {
    let mut cluster = HaCluster::start(3, 0, 3, 2);
    let log = cluster.path("ran.log");
    let graph = sleep_chains(3, 12, "0.3", &log);
    let build = cluster.spawn_build(&graph, &["--timeout", "60"]);
    wait_for_lines(&log, 3, BUILD_TIMEOUT);
    for id in 1..=3 {
        cluster.kill_node(id);
        std::thread::sleep(Duration::from_millis(500));
        cluster.start_node(id);
        cluster.wait_for_leader();
        std::thread::sleep(Duration::from_millis(500));
    }
    let run = finish_build(build, BUILD_TIMEOUT);
    assert_complete(&run, &chain_job_names(3, 12), &log, &[], &cluster.logs());
}

fn membership(cluster: &HaCluster, args: &[&str]) {
    let out = distbuild()
        .args(["cluster"])
        .args(args)
        .args(["--coordinator", &cluster.all_addrs(), "--timeout", "60"])
        .arg("--insecure")
        .output()
        .expect("run cluster membership command");
    assert!(
        out.status.success(),
        "cluster {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
}

fn voters(cluster: &HaCluster) -> Vec<u64> {
    let status = cluster.status();
    let mut voters: Vec<u64> = status["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter(|m| m["voter"] == serde_json::json!(true))
        .map(|m| m["node_id"].as_u64().expect("node_id"))
        .collect();
    voters.sort();
    voters
}

#[test]
fn the_cluster_grows_to_five_and_shrinks_to_three_during_a_build() {
    let mut cluster = HaCluster::start(3, 2, 2, 2);
    let log = cluster.path("ran.log");
    let graph = sleep_chains(2, 10, "0.3", &log);
    let build = cluster.spawn_build(&graph, &["--timeout", "60"]);
    wait_for_lines(&log, 2, BUILD_TIMEOUT);
    for id in [4u64, 5] {
        cluster.start_node(id);
        let addr = cluster.node_addr(id);
        membership(
            &cluster,
            &["add-node", "--node-id", &id.to_string(), "--addr", &addr],
        );
    }
    assert_eq!(voters(&cluster), vec![1, 2, 3, 4, 5]);
    for id in [1u64, 2] {
        membership(&cluster, &["remove-node", "--node-id", &id.to_string()]);
        cluster.kill_node(id);
    }
    assert_eq!(voters(&cluster), vec![3, 4, 5]);
    let run = finish_build(build, BUILD_TIMEOUT);
    assert_complete(&run, &chain_job_names(2, 10), &log, &[], &cluster.logs());
}

#[test]
fn removing_a_node_that_would_break_the_quorum_needs_force() {
    let mut cluster = HaCluster::start(3, 0, 0, 1);
    let leader = cluster.wait_for_leader();
    let down = (1..=3).find(|id| *id != leader).expect("a follower");
    cluster.kill_node(down);
    let remove = (1..=3)
        .find(|id| *id != leader && *id != down)
        .expect("the other follower");
    // Removing the live follower would leave {leader, down}: one of two up.
    let out = distbuild()
        .args(["cluster", "remove-node", "--node-id", &remove.to_string()])
        .args(["--coordinator", &cluster.all_addrs(), "--timeout", "20"])
        .arg("--insecure")
        .output()
        .expect("run remove-node");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert_eq!(voters(&cluster), vec![1, 2, 3]);
}

#[test]
fn an_uploaded_source_is_stored_on_a_quorum_and_survives_the_leader() {
    let mut cluster = HaCluster::start(3, 0, 1, 2);
    std::fs::write(cluster.path("input.txt"), "quorum me\n").expect("write source");
    let log = cluster.path("ran.log");
    let job = |name: &str| {
        sh_job(
            name,
            &["input.txt"],
            &[],
            &[&format!(
                "cat {{{{.SourceDir}}}}/input.txt > {{{{.OutputDir}}}}/copy && echo {name} >> {}",
                log.display()
            )],
        )
    };
    let sources = ["input.txt"];
    let first = finish_build(
        cluster.spawn_build(&graph(&sources, vec![job("first")]), &[]),
        BUILD_TIMEOUT,
    );
    assert_eq!(first.code, Some(0), "{}", first.describe());
    // Acknowledged means stored (verified, fsynced) on at least two of the
    // three coordinators.
    let digest = hex::encode(<sha1::Sha1 as sha1::Digest>::digest(b"quorum me\n"));
    let holders: Vec<u64> = (1..=3u64)
        .filter(|id| {
            cluster
                .path(&format!("coordinator{id}/blobs/objects/{digest}"))
                .is_file()
        })
        .collect();
    assert!(holders.len() >= 2, "the blob is on {holders:?} only");
    // The leader dies; a job reading the source runs on the new one.
    let leader = cluster.wait_for_leader();
    cluster.kill_node(leader);
    let second = finish_build(
        cluster.spawn_build(&graph(&sources, vec![job("second")]), &[]),
        BUILD_TIMEOUT,
    );
    assert_eq!(
        second.code,
        Some(0),
        "{}\n{}",
        second.describe(),
        cluster.logs()
    );
    assert_eq!(read_lines(&log), vec!["first", "second"]);
}

#[test]
fn an_output_whose_only_holder_died_is_rebuilt_when_a_dependent_needs_it() {
    let mut cluster = HaCluster::start(3, 0, 2, 1);
    let log = cluster.path("ran.log");
    let where_log = cluster.path("where.log");
    // `quick` finishes at once on one worker; `slow` keeps the other busy;
    // `needs_both` can start only after `slow`, and reads quick's output.
    let quick = sh_job(
        "quick",
        &[],
        &[],
        &[&format!(
            "echo $PWD >> {} && echo quick >> {} && echo q > {{{{.OutputDir}}}}/q",
            where_log.display(),
            log.display()
        )],
    );
    let slow = sh_job(
        "slow",
        &[],
        &[],
        &[&format!(
            "sleep 4 && echo slow >> {} && echo s > {{{{.OutputDir}}}}/s",
            log.display()
        )],
    );
    let needs_both = sh_job(
        "needs_both",
        &[],
        &["quick", "slow"],
        &[&format!(
            "cat {{{{index .Deps \"{}\"}}}}/q && echo needs_both >> {}",
            id("quick"),
            log.display()
        )],
    );
    let build = cluster.spawn_build(&graph(&[], vec![quick, slow, needs_both]), &[]);
    wait_for_lines(&where_log, 1, BUILD_TIMEOUT);
    wait_for_lines(&log, 1, BUILD_TIMEOUT);
    let first = read_lines(&where_log)[0].clone();
    let holder = (0..cluster.workers.len())
        .find(|i| first.contains(&format!("/worker{i}/")))
        .unwrap_or_else(|| panic!("which worker ran in {first}?"));
    cluster.workers[holder].take().expect("running").kill();
    let run = finish_build(build, BUILD_TIMEOUT);
    assert_eq!(run.code, Some(0), "{}\n{}", run.describe(), cluster.logs());
    let ran = read_lines(&log);
    assert_eq!(
        ran.iter().filter(|l| *l == "quick").count(),
        2,
        "quick's lost output was not rebuilt: {ran:?}"
    );
    assert_eq!(
        ran.iter().filter(|l| *l == "needs_both").count(),
        1,
        "{ran:?}"
    );
    // Each job is reported finished once.
    for name in ["quick", "slow", "needs_both"] {
        let finished = run
            .events
            .iter()
            .filter(|e| e["event"] == "job_finished" && e["id"] == id(name))
            .count();
        assert_eq!(finished, 1, "{name}: {}", run.describe());
    }
}
