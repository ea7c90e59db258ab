//! Operating a cluster of real processes: Prometheus metrics scraped during
//! and after builds and across a failover, gRPC health per service on the
//! leader and a follower, gRPC reflection, the metrics port's token, the
//! status page's data, and JSON logs carrying the IDs.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::*;

const BUILD_TIMEOUT: Duration = Duration::from_secs(120);

/// A graph with one job waiting for `gate` to exist (so a scrape can see
/// it running), three more that succeed, one that fails writing `boom
/// <b>` to stderr, and one after the failing one (skipped).
fn mixed_graph(gate: &Path) -> Value {
    let wait = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; echo slow > {{{{.OutputDir}}}}/x",
        gate.display()
    );
    graph(
        &[],
        vec![
            sh_job("slow", &[], &[], &[&wait]),
            sh_job("ok1", &[], &[], &["echo 1 > {{.OutputDir}}/x"]),
            sh_job("ok2", &[], &[], &["echo 2 > {{.OutputDir}}/x"]),
            sh_job("ok3", &[], &["ok1"], &["echo 3 > {{.OutputDir}}/x"]),
            sh_job("bad", &[], &[], &["echo 'boom <b>' >&2; exit 3"]),
            sh_job(
                "after-bad",
                &[],
                &["bad"],
                &["echo never > {{.OutputDir}}/x"],
            ),
        ],
    )
}

/// Polls node `id`'s metrics until `done` holds for them.
fn scrape_until(cluster: &HaCluster, id: u64, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, text) = cluster.http_get(id, "/metrics");
        assert_eq!(status, 200, "{text}");
        if done(&text) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node {id}'s metrics never showed {what}:\n{text}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn health(runtime: &tokio::runtime::Runtime, addr: &str, service: &str) -> i32 {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect for health");
        let mut client = HealthClient::new(channel);
        // An error (a service not reported yet: NOT_FOUND) is -1.
        client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .map_or(-1, |answer| answer.into_inner().status)
    })
}

/// Waits until `addr` answers `want` for `service` (statuses are brought
/// up to date every 200 ms).
fn wait_health(runtime: &tokio::runtime::Runtime, addr: &str, service: &str, want: i32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while health(runtime, addr, service) != want {
        assert!(
            std::time::Instant::now() < deadline,
            "{addr} never answered {want} for {service:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

#[test]
fn metrics_health_and_status_follow_builds_and_a_failover() {
    let mut cluster = HaCluster::start(3, 0, 1, 2);
    let leader = cluster.wait_for_stable_leader(Duration::from_secs(1));
    let follower = (1..=3u64).find(|id| *id != leader).expect("a follower");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");

    // The port asks for the token.
    let addr = cluster.metrics_addr(leader);
    assert_eq!(http_get(&addr, "/metrics", &[]).0, 401);
    assert_eq!(
        http_get(
            &addr,
            "/metrics",
            &[("Authorization", "Bearer wrong-token-wrong")]
        )
        .0,
        401
    );
    assert_eq!(http_get(&addr, "/status.json", &[]).0, 401);

    // Health, per service: the leader serves clients and workers; a
    // follower redirects them, passes the Remote Execution API on, and is
    // up.
    wait_health(
        &runtime,
        &cluster.node_addr(leader),
        "distbuild.v1.ClientApi",
        SERVING,
    );
    let f = cluster.node_addr(follower);
    wait_health(&runtime, &f, "distbuild.v1.ClientApi", NOT_SERVING);
    wait_health(&runtime, &f, "distbuild.v1.WorkerApi", NOT_SERVING);
    wait_health(
        &runtime,
        &f,
        "build.bazel.remote.execution.v2.Execution",
        SERVING,
    );
    wait_health(&runtime, &f, "", SERVING);
    wait_health(&runtime, &cluster.node_addr(leader), "", SERVING);

    // Reflection lists distbuild's services.
    let services = runtime.block_on(async {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{f}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect for reflection");
        let mut client = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = client
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .expect("reflection")
            .into_inner();
        let answer = answers
            .message()
            .await
            .expect("answer")
            .expect("one answer");
        match answer.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("not a service list: {other:?}"),
        }
    });
    for name in [
        "distbuild.v1.ClientApi",
        "distbuild.v1.WorkerApi",
        "distbuild.v1.AdminApi",
        "grpc.health.v1.Health",
    ] {
        assert!(services.iter().any(|s| s == name), "{name} in {services:?}");
    }

    // During a build: the slow job runs, and the metrics and the page say so.
    let gate = cluster.path("gate");
    let graph = mixed_graph(&gate);
    let build = cluster.spawn_build(&graph, &["--timeout", "60"]);
    let leader = cluster.wait_for_leader();
    scrape_until(&cluster, leader, "a running execution", |t| {
        metric(t, "distbuild_executions{kind=\"running\"}") >= 1.0
            && metric(t, "distbuild_jobs_finished_total{outcome=\"failed\"}") >= 1.0
    });
    let (status, page) = cluster.http_get(leader, "/status.json");
    assert_eq!(status, 200, "{page}");
    let page: Value = serde_json::from_str(&page).expect("status.json is JSON");
    assert_eq!(page["answered_by"].as_u64(), Some(leader));
    assert_eq!(page["cluster"]["leader"].as_u64(), Some(leader));
    assert_eq!(page["cluster"]["members"].as_array().map(Vec::len), Some(3));
    let worker = &page["workers"][0];
    assert_eq!(worker["slots"], 2, "{page}");
    let build_shown = &page["builds"][0];
    assert_eq!(build_shown["state"], "running", "{page}");
    assert_eq!(build_shown["jobs"], 6);
    let running = build_shown["running"].as_array().expect("running jobs");
    assert!(
        running
            .iter()
            .any(|r| r["job"] == "slow" && r["worker"] == worker["id"]),
        "{page}"
    );
    let failure = &build_shown["failures"][0];
    assert_eq!(failure["job"], "bad", "{page}");
    assert_eq!(failure["exit_code"], 3);
    assert_eq!(failure["stderr"], "boom <b>\n");
    // The page itself, static, is served without the token.
    let (status, html) = http_get(&addr, "/", &[]);
    assert_eq!(status, 200);
    assert!(html.contains("status.json"), "the page polls its data");

    std::fs::write(&gate, "").expect("open the gate");
    let run = finish_build_explained(build, BUILD_TIMEOUT, || cluster.logs());
    assert_ne!(run.code, Some(0), "the build has a failing job");

    // After: every replica counts what it applied, the same numbers.
    let expect_first = |t: &str| {
        metric(t, "distbuild_jobs_finished_total{outcome=\"succeeded\"}") == 4.0
            && metric(t, "distbuild_jobs_finished_total{outcome=\"failed\"}") == 1.0
            && metric(t, "distbuild_jobs_finished_total{outcome=\"skipped\"}") == 1.0
            && metric(t, "distbuild_builds_finished_total{outcome=\"failed\"}") == 1.0
    };
    for id in 1..=3 {
        let text = scrape_until(&cluster, id, "the first build's jobs", expect_first);
        assert_eq!(
            metric(&text, "distbuild_executions_started_total"),
            5.0,
            "five ran, one was skipped:\n{text}"
        );
        assert_eq!(
            metric(
                &text,
                "distbuild_executions_finished_total{outcome=\"success\"}"
            ),
            4.0
        );
        assert_eq!(metric(&text, "distbuild_executions{kind=\"running\"}"), 0.0);
        assert_eq!(metric(&text, "distbuild_workers"), 1.0);
        assert_eq!(metric(&text, "distbuild_workers_slots"), 2.0);
        assert!(metric(&text, "distbuild_queue_wait_seconds_count") >= 5.0);
    }
    let leader_text = cluster.http_get(leader, "/metrics").1;
    assert!(
        metric(
            &leader_text,
            "distbuild_grpc_requests_total{method=\"/distbuild.v1.ClientApi/SubmitBuild\",code=\"OK\"}"
        ) >= 1.0,
        "{leader_text}"
    );
    assert_eq!(
        metric(&leader_text, "distbuild_raft_role{role=\"leader\"}"),
        1.0
    );

    // Again: the four successes come from the cache; the failure runs again.
    let run = finish_build_explained(
        cluster.spawn_build(&graph, &["--timeout", "60"]),
        BUILD_TIMEOUT,
        || cluster.logs(),
    );
    assert_ne!(run.code, Some(0));
    scrape_until(&cluster, leader, "the second build's cache hits", |t| {
        metric(t, "distbuild_jobs_finished_total{outcome=\"cached\"}") == 4.0
            && metric(t, "distbuild_result_cache_lookups_total{outcome=\"hit\"}") == 4.0
            && metric(t, "distbuild_jobs_finished_total{outcome=\"failed\"}") == 2.0
            && metric(t, "distbuild_jobs_finished_total{outcome=\"succeeded\"}") == 4.0
    });

    // A failover: the new leader counts the change and says it leads.
    let before = metric(
        &cluster.http_get(follower, "/metrics").1,
        "distbuild_raft_leader_changes_total",
    );
    cluster.kill_node(leader);
    let new_leader = cluster.wait_for_leader();
    assert_ne!(new_leader, leader);
    let text = scrape_until(&cluster, new_leader, "the new leader", |t| {
        metric(t, "distbuild_raft_role{role=\"leader\"}") == 1.0
            && metric(t, "distbuild_raft_leader") == new_leader as f64
    });
    assert!(
        metric(&text, "distbuild_raft_leader_changes_total") > before,
        "{text}"
    );
    assert!(metric(&text, "distbuild_raft_term") >= 2.0);
    // Once it may serve (a quorum confirmed it), it says so.
    wait_health(
        &runtime,
        &cluster.node_addr(new_leader),
        "distbuild.v1.ClientApi",
        SERVING,
    );
}

#[test]
fn a_worker_s_metrics_and_json_logs_carry_what_it_ran() {
    let mut cluster = HaCluster::start(1, 0, 0, 2);
    let port = free_ports(1)[0];
    let worker_metrics = format!("127.0.0.1:{port}");
    cluster.add_worker_with(&[
        "--metrics-listen",
        &worker_metrics,
        "--metrics-token-file",
        cluster.path("metrics-token").to_str().expect("utf-8"),
        "--log-format",
        "json",
    ]);
    cluster.wait_for_workers(1);
    let second = format!(
        "cat {{{{index .Deps \"{}\"}}}}/x > {{{{.OutputDir}}}}/y",
        id("first")
    );
    let graph = graph(
        &[],
        vec![
            sh_job("first", &[], &[], &["echo 1 > {{.OutputDir}}/x"]),
            sh_job("second", &[], &["first"], &[&second]),
            sh_job("broken", &[], &[], &["exit 9"]),
        ],
    );
    let run = finish_build_explained(cluster.spawn_build(&graph, &[]), BUILD_TIMEOUT, || {
        cluster.logs()
    });
    assert_ne!(run.code, Some(0));
    let auth = format!("Bearer {}", cluster.metrics_token);
    let (status, text) = http_get(&worker_metrics, "/metrics", &[("Authorization", &auth)]);
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        metric(&text, "distbuild_worker_jobs_total{outcome=\"succeeded\"}"),
        2.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "distbuild_worker_jobs_total{outcome=\"failed\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "distbuild_worker_slots"), 2.0);
    assert_eq!(metric(&text, "distbuild_worker_busy_slots"), 0.0);
    assert!(
        metric(&text, "distbuild_worker_cache_bytes") > 0.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "distbuild_worker_job_duration_seconds_count"),
        3.0
    );
    assert_eq!(http_get(&worker_metrics, "/metrics", &[]).0, 401);

    // Its log is JSON, one object a line, each naming the worker.
    let log = std::fs::read_to_string(cluster.path("worker0.log")).expect("worker log");
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let registered = lines
        .iter()
        .find(|l| l["message"] == "registered")
        .unwrap_or_else(|| panic!("no registration line in:\n{log}"));
    assert!(registered["level"].is_string());
    let spans = registered["spans"].as_array().expect("spans");
    assert!(
        spans
            .iter()
            .any(|s| s["worker_id"].as_str().is_some_and(|w| !w.is_empty())),
        "{registered}"
    );
}

#[test]
fn json_logs_name_the_build_and_job_of_each_line() {
    let mut cluster = HaCluster::start(1, 0, 0, 1);
    // Debug lines say when each job starts and ends.
    cluster.add_worker_with_env(
        &["--log-format", "json"],
        &[("DISTBUILD_LOG", "warn,distbuild_worker=debug")],
    );
    cluster.wait_for_workers(1);
    let graph = graph(
        &[],
        vec![sh_job("only", &[], &[], &["echo 1 > {{.OutputDir}}/x"])],
    );
    let run = finish_build_explained(cluster.spawn_build(&graph, &[]), BUILD_TIMEOUT, || {
        cluster.logs()
    });
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let log = std::fs::read_to_string(cluster.path("worker0.log")).expect("worker log");
    let finished = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .find(|l| l["message"] == "job finished")
        .unwrap_or_else(|| panic!("no job line in:\n{log}"));
    let spans = finished["spans"].as_array().expect("spans");
    let job = spans
        .iter()
        .find(|s| s["name"] == "job")
        .unwrap_or_else(|| panic!("no job span: {finished}"));
    assert_eq!(job["job_id"], id("only"));
    assert!(
        job["build_id"].as_u64().is_some_and(|b| b > 0),
        "{finished}"
    );
    assert!(
        spans
            .iter()
            .any(|s| s["worker_id"].as_str().is_some_and(|w| !w.is_empty())),
        "{finished}"
    );
}
