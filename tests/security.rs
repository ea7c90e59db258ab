//! Who may do what: clusters run with TLS and certificates made by
//! `distbuild certs`; every role boundary is tried from outside (real
//! processes, real gRPC over TLS) and refused with its code, and the
//! cluster then builds normally. The local server answers only its owner.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use distbuild_proto::net::{Connector as _, TcpConnector};
use distbuild_proto::tls::{Role, Security, TlsFiles, TlsMaterial};
use distbuild_proto::v1::{
    ClusterStatusRequest, FetchRequest, FindMissingBlobsRequest, HeartbeatRequest, RegisterRequest,
    RemoveNodeRequest, ReportResultRequest,
};
use re::content_addressable_storage_client::ContentAddressableStorageClient as CasClient;
use support::*;
use tonic::Code;
use tonic::transport::Channel;

const BUILD_TIMEOUT: Duration = Duration::from_secs(180);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("runtime")
}

/// The files `Pki::flags` issued for `name`.
fn files(pki: &Pki, name: &str) -> TlsFiles {
    TlsFiles {
        ca: pki.dir.join("ca.pem"),
        cert: pki.dir.join(format!("{name}.pem")),
        key: pki.dir.join(format!("{name}.key")),
    }
}

/// A TLS channel to `addr` showing `name`'s certificate (issued with
/// `role` first).
async fn channel_as(pki: &Pki, role: &str, name: &str, addr: &str) -> Channel {
    pki.flags(role, name);
    let material = TlsMaterial::load(&files(pki, name)).expect("load the certificate");
    TcpConnector::new(&Security::Tls(material))
        .connect(addr)
        .await
        .expect("connect over TLS")
}

/// A TLS channel to `addr` that checks the server but shows no
/// certificate of its own.
async fn channel_without_certificate(pki: &Pki, addr: &str) -> Channel {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(pki.dir.join("ca.pem")).expect("read the CA"),
        ))
        .assume_http2(true);
    distbuild_proto::net::endpoint(addr, Some(&tls))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect over TLS without a certificate")
}

/// Asserts `result` is refused with `code`, its message containing `says`.
#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, says: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(says), "{status:?}");
    assert!(!status.message().contains('\n'), "{status:?}");
}

fn heartbeat(worker_id: &str) -> HeartbeatRequest {
    HeartbeatRequest {
        worker_id: worker_id.into(),
        request_id: "hb-1".into(),
        ..Default::default()
    }
}

/// A small graph whose one job copies its input.
fn copy_graph(dir: &Path, name: &str) -> serde_json::Value {
    std::fs::write(dir.join(format!("{name}.txt")), format!("{name}\n")).expect("write source");
    let input = format!("{name}.txt");
    graph(
        &[&input],
        vec![sh_job(
            name,
            &[&input],
            &[],
            &[&format!(
                "cat {{{{.SourceDir}}}}/{input} > {{{{.OutputDir}}}}/out"
            )],
        )],
    )
}

#[test]
fn every_role_boundary_is_refused_with_its_code_and_the_cluster_then_builds() {
    let cluster = Cluster::start_secured(1, 2, &[], true);
    let pki = cluster.pki.as_ref().expect("a TLS cluster");
    let coordinator = cluster.coordinator_addr();
    let status = cluster.status();
    let worker_addr = status["workers"][0]["addr"]
        .as_str()
        .expect("the worker's address")
        .to_string();
    // A worker is known by its certificate's name.
    assert_eq!(status["workers"][0]["id"], "worker0", "{status}");

    runtime().block_on(async {
        // No certificate: every service of the coordinator and the worker.
        let bare = channel_without_certificate(pki, &coordinator).await;
        let none = "no client certificate";
        refused(
            distbuild_proto::net::client_api(bare.clone())
                .find_missing_blobs(FindMissingBlobsRequest::default())
                .await,
            Code::Unauthenticated,
            none,
        );
        refused(
            distbuild_proto::net::worker_api(bare.clone())
                .heartbeat(heartbeat("worker0"))
                .await,
            Code::Unauthenticated,
            none,
        );
        refused(
            distbuild_proto::net::admin_api(bare.clone())
                .cluster_status(ClusterStatusRequest::default())
                .await,
            Code::Unauthenticated,
            none,
        );
        refused(
            distbuild_proto::raft_v1::raft_transport_client::RaftTransportClient::new(bare.clone())
                .node_status(distbuild_proto::raft_v1::NodeStatusRequest::default())
                .await,
            Code::Unauthenticated,
            none,
        );
        // The Remote Execution API: no certificate, or a worker's.
        refused(
            CasClient::new(bare)
                .find_missing_blobs(re::FindMissingBlobsRequest::default())
                .await,
            Code::Unauthenticated,
            none,
        );
        let worker0 = channel_as(pki, "worker", "worker0", &coordinator).await;
        refused(
            CasClient::new(worker0.clone())
                .find_missing_blobs(re::FindMissingBlobsRequest::default())
                .await,
            Code::PermissionDenied,
            "the Remote Execution API is for role client or coordinator; the caller is worker \"worker0\"",
        );
        refused(
            re::execution_client::ExecutionClient::new(worker0)
                .execute(re::ExecuteRequest::default())
                .await
                .map(|_| ()),
            Code::PermissionDenied,
            "the Remote Execution API is for role client or coordinator; the caller is worker \"worker0\"",
        );
        let bare_peer = channel_without_certificate(pki, &worker_addr).await;
        refused(
            distbuild_proto::net::peer_api(bare_peer)
                .fetch_artifact(FetchRequest {
                    digest: vec![0; 20].into(),
                })
                .await,
            Code::Unauthenticated,
            none,
        );

        // A client on the worker API, the Raft transport and membership.
        let client = channel_as(pki, "client", "client", &coordinator).await;
        refused(
            distbuild_proto::net::worker_api(client.clone())
                .register(RegisterRequest {
                    worker_id: "client".into(),
                    addr: "127.0.0.1:1".into(),
                    slots: 1,
                    ..Default::default()
                })
                .await,
            Code::PermissionDenied,
            "the worker API is for role worker; the caller is client \"client\"",
        );
        // Nor may it store blobs as a worker does for an action's outputs.
        refused(
            distbuild_proto::net::worker_api(client.clone())
                .upload_blob(futures::stream::iter([distbuild_proto::v1::BlobChunk {
                    digest: vec![0; 32].into(),
                    size: 1,
                    data: vec![1].into(),
                }]))
                .await,
            Code::PermissionDenied,
            "the worker API is for role worker; the caller is client \"client\"",
        );
        refused(
            distbuild_proto::raft_v1::raft_transport_client::RaftTransportClient::new(
                client.clone(),
            )
            .node_status(distbuild_proto::raft_v1::NodeStatusRequest::default())
            .await,
            Code::PermissionDenied,
            "the Raft transport is for role coordinator",
        );
        refused(
            distbuild_proto::net::admin_api(client.clone())
                .remove_node(RemoveNodeRequest {
                    node_id: 1,
                    force: true,
                })
                .await,
            Code::PermissionDenied,
            "changing membership is for role admin",
        );
        // A client certificate is what Remote Execution API clients
        // (Bazel with --tls_client_certificate) use over TLS.
        CasClient::new(client.clone())
            .find_missing_blobs(re::FindMissingBlobsRequest::default())
            .await
            .expect("a client uses the CAS over TLS");
        // Anyone of the cluster may read its status.
        distbuild_proto::net::admin_api(client)
            .cluster_status(ClusterStatusRequest::default())
            .await
            .expect("a client reads the status");

        // Another worker renewing, reporting or registering as worker0.
        let mallory = channel_as(pki, "worker", "mallory", &coordinator).await;
        let mut api = distbuild_proto::net::worker_api(mallory);
        let as_other = "worker \"mallory\" may act only as worker_id \"mallory\", not \"worker0\"";
        refused(
            api.heartbeat(heartbeat("worker0")).await,
            Code::PermissionDenied,
            as_other,
        );
        refused(
            api.report_result(ReportResultRequest {
                worker_id: "worker0".into(),
                request_id: "r-1".into(),
                cache_key: vec![0; 20].into(),
                lease_token: 1,
                ..Default::default()
            })
            .await,
            Code::PermissionDenied,
            as_other,
        );
        refused(
            api.register(RegisterRequest {
                worker_id: "worker0".into(),
                addr: "127.0.0.1:1".into(),
                slots: 1,
                ..Default::default()
            })
            .await,
            Code::PermissionDenied,
            as_other,
        );
    });

    // A certificate of another CA, and an expired one of this CA: the
    // client exits 5 naming the problem.
    let other = Pki::new(cluster.path("other-pki"));
    let status_as = |flags: Vec<String>| {
        distbuild()
            .args(["cluster", "status", "--timeout", "10", "--coordinator"])
            .arg(&coordinator)
            .args(flags)
            .output()
            .expect("run cluster status")
    };
    let mut foreign = other.flags("client", "stranger");
    foreign[1] = pki.dir.join("ca.pem").display().to_string();
    let out = status_as(foreign);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("the client certificate is not accepted"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let expired = expired_client(pki);
    let out = status_as(expired);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("certificate expired"), "{stderr}");

    // A worker certificate cannot build; an admin one is needed to change
    // membership (both refused before anything is sent).
    let mut as_worker = pki.flags("worker", "worker0");
    as_worker.insert(0, "--timeout".into());
    as_worker.insert(1, "10".into());
    let graph_dir = cluster.path("src");
    std::fs::create_dir_all(&graph_dir).expect("mkdir");
    let graph_path = graph_dir.join("graph.json");
    std::fs::write(&graph_path, copy_graph(&graph_dir, "one").to_string()).expect("graph");
    let refused_build = build_command(
        &graph_path,
        &graph_dir,
        &coordinator,
        &as_worker.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .output()
    .expect("run build");
    assert_eq!(refused_build.status.code(), Some(2), "{refused_build:?}");
    assert!(
        String::from_utf8_lossy(&refused_build.stderr)
            .contains("names worker \"worker0\"; this needs a certificate of role client"),
        "{refused_build:?}"
    );

    // And the cluster builds normally.
    let run = cluster.build_file(&graph_path, &graph_dir, &[]);
    assert_eq!(run.code, Some(0), "{}\n{}", run.describe(), cluster.logs());
    assert_eq!(
        run.finished(&id("one"))["exit_code"],
        0,
        "{}",
        run.describe()
    );
}

/// `--tls-*` flags of a client certificate of `pki`'s CA that expired
/// yesterday.
fn expired_client(pki: &Pki) -> Vec<String> {
    use distbuild_client::certs::{Ca, CertSpec};
    let ca = Ca::load(&pki.dir).expect("load the CA");
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    let (cert, key) = ca
        .issue(&CertSpec {
            role: Role::Client,
            name: "late".into(),
            hosts: vec![],
            not_before: now - 2 * day,
            not_after: now - day,
        })
        .expect("issue");
    let cert_path = pki.dir.join("late.pem");
    let key_path = pki.dir.join("late.key");
    std::fs::write(&cert_path, cert).expect("write");
    write_private(&key_path, &key);
    vec![
        "--tls-ca".into(),
        pki.dir.join("ca.pem").display().to_string(),
        "--tls-cert".into(),
        cert_path.display().to_string(),
        "--tls-key".into(),
        key_path.display().to_string(),
    ]
}

#[test]
fn a_tls_cluster_of_three_builds_and_survives_a_leader_kill() {
    let secret = "s3cret-of-the-cluster-0123456789";
    let mut cluster = HaCluster::start_secured(3, 0, 2, 2, Some(secret), true);
    let log = cluster.path("ran.log");
    let graph = sleep_chains(2, 8, "0.3", &log);
    let build = cluster.spawn_build(&graph, &["--timeout", "60"]);
    wait_for_lines(&log, 4, BUILD_TIMEOUT);
    let leader = cluster.wait_for_leader();
    cluster.kill_node(leader);
    let run = finish_build(build, BUILD_TIMEOUT);
    assert_complete(&run, &chain_job_names(2, 8), &log, &[], &cluster.logs());
    assert_ne!(cluster.wait_for_leader(), leader);

    // No secret (the cluster secret, any private key's content) in a log,
    // in `cluster status`, or in a process's command line or environment.
    let pki = cluster.pki.as_ref().expect("a TLS cluster");
    let mut secrets = vec![secret.to_string()];
    for entry in std::fs::read_dir(&pki.dir).expect("pki dir").flatten() {
        if entry.path().extension().is_some_and(|e| e == "key") {
            let pem = std::fs::read_to_string(entry.path()).expect("key");
            // A line of the key's base64 body.
            let body = pem.lines().nth(1).expect("a PEM body").to_string();
            secrets.push(body);
        }
    }
    assert!(
        secrets.len() > 3,
        "the keys of coordinators, workers, client"
    );
    let mut seen = cluster.logs();
    for path in std::fs::read_dir(cluster.dir.path())
        .expect("dir")
        .flatten()
    {
        if path.path().extension().is_some_and(|e| e == "log") {
            seen.push_str(&std::fs::read_to_string(path.path()).unwrap_or_default());
        }
    }
    seen.push_str(&cluster.status().to_string());
    let processes = cluster
        .coordinators
        .iter()
        .chain(&cluster.workers)
        .flatten()
        .map(|server| server.child.id());
    for pid in processes {
        for what in ["cmdline", "environ"] {
            let bytes = std::fs::read(format!("/proc/{pid}/{what}")).unwrap_or_default();
            seen.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    for secret in &secrets {
        assert!(!seen.contains(secret.as_str()), "{secret} was shown");
    }
    assert!(seen.contains("--tls-key"), "the command lines were read");
}

#[test]
fn a_second_local_user_can_neither_build_on_nor_read_another_users_local_server() {
    let user = other_user().expect("a second user");
    let dir = tempfile::tempdir().expect("tempdir");
    // The other user must reach the binary and a workspace of its own.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).expect("mkdir");
    let marker = dir.path().join("ran-as");
    let graph = graph(
        &[],
        vec![sh_job(
            "who",
            &[],
            &[],
            &[&format!("id -u >> {}", marker.display())],
        )],
    );
    std::fs::write(ws.join("graph.json"), graph.to_string()).expect("graph");
    let base = dir.path().join("base");
    let owner_build = || {
        distbuild()
            .args(["build", "--json", "--graph", "graph.json", "--output-base"])
            .arg(&base)
            .arg("--sandbox-writable-path")
            .arg(dir.path())
            .current_dir(&ws)
            .env_remove("DISTBUILD_COORDINATOR")
            .output()
            .expect("run the owner's build")
    };
    let out = owner_build();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(read_lines(&marker), vec!["0"]);
    let mode = std::fs::metadata(&base)
        .expect("output base")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "the output base is private");
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base.join("server.json")).expect("server.json"))
            .expect("json");
    let server = info["addr"].as_str().expect("addr").to_string();

    // The other user, with the graph in a directory it owns.
    let theirs = dir.path().join("theirs");
    std::fs::create_dir_all(&theirs).expect("mkdir");
    std::fs::copy(ws.join("graph.json"), theirs.join("graph.json")).expect("copy");
    let chown = std::process::Command::new("chown")
        .args(["-R", user])
        .arg(&theirs)
        .status()
        .expect("chown");
    assert!(chown.success());
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_distbuild"));
    let as_other = |args: &[&str]| {
        std::process::Command::new("runuser")
            .args(["-u", user, "--"])
            .arg(&binary)
            .args(args)
            .current_dir(&theirs)
            .env("HOME", &theirs)
            .env_remove("DISTBUILD_COORDINATOR")
            .output()
            .expect("runuser")
    };
    // Plain connections get nowhere.
    let plain = as_other(&[
        "build",
        "--graph",
        "graph.json",
        "--timeout",
        "3",
        "--insecure",
        "--coordinator",
        &server,
    ]);
    assert!(!plain.status.success(), "{plain:?}");
    // Nor does a certificate of the other user's own making.
    let own = as_other(&["certs", "ca", "--dir", "pki"]);
    assert!(own.status.success(), "{own:?}");
    let own = as_other(&[
        "certs", "issue", "--dir", "pki", "--role", "client", "--name", "me",
    ]);
    assert!(own.status.success(), "{own:?}");
    let forged = as_other(&[
        "build",
        "--graph",
        "graph.json",
        "--timeout",
        "5",
        "--coordinator",
        &server,
        "--tls-ca",
        "pki/ca.pem",
        "--tls-cert",
        "pki/me.pem",
        "--tls-key",
        "pki/me.key",
    ]);
    assert_eq!(forged.status.code(), Some(5), "{forged:?}");
    // The server's own certificates cannot be read.
    let key = base.join("tls").join("client.key");
    let key = key.display().to_string();
    let read = as_other(&[
        "build",
        "--graph",
        "graph.json",
        "--coordinator",
        &server,
        "--tls-ca",
        "pki/ca.pem",
        "--tls-cert",
        "pki/me.pem",
        "--tls-key",
        &key,
    ]);
    assert_eq!(read.status.code(), Some(2), "{read:?}");
    assert!(
        String::from_utf8_lossy(&read.stderr).contains("Permission denied"),
        "{read:?}"
    );
    // Nothing ran for them; the owner still builds (the cached result).
    assert_eq!(read_lines(&marker), vec!["0"]);
    let again = owner_build();
    assert!(again.status.success(), "{again:?}");
    let _ = distbuild()
        .args(["shutdown", "--output-base"])
        .arg(&base)
        .current_dir(&ws)
        .output();
}

#[test]
fn tls_flags_are_checked_before_anything_is_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path().join("pki"));
    let flags = pki.flags("client", "alice");
    let run = |args: &[&str]| {
        distbuild()
            .args([
                "cluster",
                "status",
                "--coordinator",
                "127.0.0.1:1",
                "--timeout",
                "1",
            ])
            .args(args)
            .output()
            .expect("run")
    };
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();
    // Neither TLS nor --insecure.
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("--insecure"), "{out:?}");
    // Both.
    let mut both: Vec<&str> = flags.iter().map(String::as_str).collect();
    both.push("--insecure");
    let out = run(&both);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("cannot be combined"), "{out:?}");
    // An open key.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&flags[5], std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = run(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("chmod 600"), "{out:?}");
    // A coordinator refuses to start without either, naming the way out.
    let out = distbuild()
        .args(["coordinator", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .expect("run coordinator");
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr(&out).contains("--insecure"), "{out:?}");
}

#[test]
fn the_reapi_proxy_listens_on_loopback_only_and_checks_its_flags_first() {
    for (listen, says) in [
        ("0.0.0.0:0", "is not a loopback address"),
        ("localhost:0", "is not HOST:PORT with an IP address"),
    ] {
        let out = distbuild()
            .args(["reapi-proxy", "--insecure", "--coordinator", "127.0.0.1:1"])
            .args(["--listen", listen])
            .output()
            .expect("run reapi-proxy");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{listen}: {stderr}");
        assert!(stderr.contains(says), "{listen}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    }
}

#[test]
fn the_metrics_port_is_https_behind_its_token_under_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path().join("pki"));
    let token = dir.path().join("token");
    let start = |extra: &[String]| {
        distbuild()
            .args(["coordinator", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(pki.flags("coordinator", "c1"))
            .args(extra)
            .output()
            .expect("run coordinator")
    };
    let port = free_ports(1)[0];
    let listen = vec!["--metrics-listen".to_string(), format!("127.0.0.1:{port}")];
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();
    // With TLS the port needs a token.
    let out = start(&listen);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr(&out).contains("--metrics-listen needs --metrics-token-file"),
        "{out:?}"
    );
    // A token others may read is refused.
    std::fs::write(&token, "metrics-token-0123456789\n").expect("write token");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut with_token = listen.clone();
    with_token.extend([
        "--metrics-token-file".to_string(),
        token.display().to_string(),
    ]);
    let out = start(&with_token);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr(&out).contains("chmod 600"), "{out:?}");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    let mut args: Vec<String> = vec![
        "coordinator".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.path().join("data").display().to_string(),
    ];
    args.extend(pki.flags("coordinator", "c1"));
    args.extend(with_token);
    let _coordinator = Server::start(&args, dir.path().join("coordinator.log"));
    let url = format!("https://127.0.0.1:{port}/metrics");
    let ca = pki.dir.join("ca.pem");
    let curl = |extra: &[&str], url: &str| {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
            ])
            .arg("--cacert")
            .arg(&ca)
            .args(extra)
            .arg(url)
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // HTTPS with the coordinator's certificate, checked against the CA.
    assert_eq!(curl(&[], &url), "401");
    assert_eq!(
        curl(
            &["-H", "Authorization: Bearer metrics-token-0123456789"],
            &url
        ),
        "200"
    );
    assert_eq!(
        curl(
            &["-H", "Authorization: Bearer wrong-token-0123456789"],
            &url
        ),
        "401"
    );
    // Plain HTTP gets no answer.
    assert_eq!(
        curl(&[], &format!("http://127.0.0.1:{port}/metrics")),
        "000"
    );
    // The static page needs no token; its data does.
    assert_eq!(curl(&[], &format!("https://127.0.0.1:{port}/")), "200");
    assert_eq!(
        curl(&[], &format!("https://127.0.0.1:{port}/status.json")),
        "401"
    );
}
