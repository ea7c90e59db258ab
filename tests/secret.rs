//! The cluster secret: coordinators started with `--cluster-secret-file`
//! show it to each other (a cluster forms and builds), refuse Raft calls
//! that lack it or show another, and refuse membership changes without it.

mod support;

use std::time::Duration;

use distbuild_proto::raft_v1::NodeStatusRequest;
use distbuild_proto::raft_v1::raft_transport_client::RaftTransportClient;
use distbuild_proto::wire::SECRET_METADATA_KEY;
use support::*;

const SECRET: &str = "correct-horse-battery-staple-42";

/// A NodeStatus call on the Raft transport of `addr`, showing `secret`.
fn node_status(addr: &str, secret: Option<&str>) -> Result<u64, tonic::Status> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("uri")
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect");
        let mut request = tonic::Request::new(NodeStatusRequest {});
        if let Some(secret) = secret {
            request
                .metadata_mut()
                .insert(SECRET_METADATA_KEY, secret.parse().expect("ascii"));
        }
        RaftTransportClient::new(channel)
            .node_status(request)
            .await
            .map(|r| r.into_inner().node_id)
    })
}

#[test]
fn coordinators_with_a_secret_form_a_cluster_and_refuse_whoever_lacks_it() {
    let cluster = HaCluster::start_with(3, 1, 1, 2, Some(SECRET));
    // The three elected a leader and replicate: a build goes through.
    let log = cluster.path("ran.log");
    let run = finish_build(
        cluster.spawn_build(&sleep_chains(1, 3, "0", &log), &["--timeout", "60"]),
        Duration::from_secs(120),
    );
    assert_complete(&run, &chain_job_names(1, 3), &log, &[], &cluster.logs());

    let addr = cluster.node_addr(1);
    assert_eq!(
        node_status(&addr, Some(SECRET)).expect("with the secret"),
        1
    );
    for shown in [None, Some("correct-horse-battery-staple-43")] {
        let refused = node_status(&addr, shown).expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        assert!(
            refused.message().contains("cluster secret"),
            "{}",
            refused.message()
        );
    }

    // A membership change without the secret is refused with one line and
    // changes nothing; a malformed secret file is refused before sending.
    let add = |extra: &[&str]| {
        distbuild()
            .args(["cluster", "add-node", "--node-id", "4", "--addr"])
            .arg(cluster.node_addr(4))
            .args(["--insecure", "--timeout", "10", "--coordinator"])
            .arg(cluster.all_addrs())
            .args(extra)
            .output()
            .expect("run add-node")
    };
    let out = add(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cluster secret"), "{stderr}");
    let short = cluster.path("short-secret");
    write_private(&short, "too-short");
    let out = add(&["--cluster-secret-file", short.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("16 to 1024"), "{stderr}");
    // A secret file other users may read is refused, naming the fix.
    let open = cluster.path("open-secret");
    std::fs::write(&open, format!("{SECRET}\n")).expect("write");
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod 644");
    let out = add(&["--cluster-secret-file", open.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("may be read by other users") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    let status = cluster.status();
    assert_eq!(
        status["members"].as_array().expect("members").len(),
        3,
        "{status}"
    );
}
