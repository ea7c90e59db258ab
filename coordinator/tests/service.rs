//! The coordinator's gRPC services on a real socket: what they refuse, and
//! that they keep serving after refusing it.

use distbuild_coordinator::{Bootstrap, Config, Seams, Tuning};
use distbuild_proto::Digest;
use distbuild_proto::v1::client_api_client::ClientApiClient;
use distbuild_proto::v1::worker_api_client::WorkerApiClient;
use distbuild_proto::v1::{
    BlobChunk, FindMissingBlobsRequest, RegisterRequest, ReportResultRequest, SourceFile,
    SubmitBuildRequest,
};
use distbuild_proto::wire::MAX_MESSAGE_BYTES;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

struct Coordinator {
    channel: Channel,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn start() -> Coordinator {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let config = Config {
        node_id: 1,
        bootstrap: Bootstrap::Single,
        data_dir: dir.path().to_path_buf(),
        tuning: Tuning::default(),
        secret: None,
        security: distbuild_proto::tls::Security::Insecure,
    };
    let task = tokio::spawn(distbuild_coordinator::run(
        config,
        listener,
        Seams::production(),
        shutdown.clone(),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    Coordinator {
        channel,
        shutdown,
        task,
        _dir: dir,
    }
}

impl Coordinator {
    fn client(&self) -> ClientApiClient<Channel> {
        ClientApiClient::new(self.channel.clone())
            .max_encoding_message_size(2 * MAX_MESSAGE_BYTES)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn worker(&self) -> WorkerApiClient<Channel> {
        WorkerApiClient::new(self.channel.clone())
    }

    async fn missing(&self, digests: &[Digest]) -> Vec<Digest> {
        let response = self
            .client()
            .find_missing_blobs(FindMissingBlobsRequest {
                digests: digests
                    .iter()
                    .map(|d| bytes::Bytes::copy_from_slice(d.as_bytes()))
                    .collect(),
            })
            .await
            .expect("find missing blobs");
        response
            .into_inner()
            .missing
            .iter()
            .map(|d| Digest::try_from(d.as_ref()).expect("20 bytes"))
            .collect()
    }

    /// Registers worker `worker_id` with one slot and no leases ahead.
    async fn register_worker(&self, worker_id: &str) {
        self.worker()
            .register(RegisterRequest {
                worker_id: worker_id.into(),
                addr: "127.0.0.1:1".into(),
                slots: 1,
                ahead: 0,
                held_artifacts: Vec::new(),
                request_id: String::new(),
                properties: Vec::new(),
            })
            .await
            .expect("register");
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("join").expect("clean stop");
    }
}

fn upload(
    digest: Digest,
    size: u64,
    data: &'static [u8],
) -> impl futures::Stream<Item = BlobChunk> {
    futures::stream::iter([BlobChunk {
        digest: bytes::Bytes::copy_from_slice(digest.as_bytes()),
        size,
        data: bytes::Bytes::from_static(data),
    }])
}

#[tokio::test]
async fn refused_requests_change_nothing_and_the_server_keeps_serving() {
    let c = start().await;
    let content: &'static [u8] = b"int main;\n";
    let digest = Digest::of(content);

    // An oversized message is refused without being buffered whole.
    let huge = SubmitBuildRequest {
        job_timeout_secs: 0,
        request_id: "huge".into(),
        graph_json: vec![b' '; MAX_MESSAGE_BYTES + 1024].into(),
        sources: Vec::new(),
    };
    let err = c.client().submit_build(huge).await.expect_err("too large");
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );

    // A bad digest.
    let err = c
        .client()
        .find_missing_blobs(FindMissingBlobsRequest {
            digests: vec![bytes::Bytes::from_static(b"short")],
        })
        .await
        .expect_err("bad digest");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("20-byte"), "{}", err.message());

    // Content that does not hash to its digest is not stored.
    let wrong = Digest::of(b"something else");
    let err = c
        .client()
        .upload_blob(upload(wrong, content.len() as u64, content))
        .await
        .expect_err("digest mismatch");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(c.missing(&[wrong]).await, vec![wrong]);

    // A graph naming a source that was never uploaded.
    let graph = format!(
        r#"{{"SourceFiles": {{"{}": "a.c"}}, "Jobs": [{{"ID": "{}", "Inputs": ["a.c"], "Cmds": [{{"Exec": ["true"]}}]}}]}}"#,
        "1".repeat(40),
        "2".repeat(40)
    );
    let submit = |request_id: &str| SubmitBuildRequest {
        job_timeout_secs: 0,
        request_id: request_id.into(),
        graph_json: graph.clone().into_bytes().into(),
        sources: vec![SourceFile {
            path: "a.c".into(),
            digest: bytes::Bytes::copy_from_slice(digest.as_bytes()),
            size: content.len() as u64,
        }],
    };
    let err = c
        .client()
        .submit_build(submit("r1"))
        .await
        .expect_err("not uploaded");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("a.c"), "{}", err.message());

    // A malformed graph names the problem.
    let mut bad = submit("r2");
    bad.graph_json = bytes::Bytes::from_static(b"{\"Jobs\": 3}");
    let err = c.client().submit_build(bad).await.expect_err("bad graph");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("malformed graph JSON"),
        "{}",
        err.message()
    );

    // Workers: bad IDs and slot counts.
    let register = |worker_id: &str, slots: u32| RegisterRequest {
        worker_id: worker_id.into(),
        addr: "127.0.0.1:1".into(),
        slots,
        ahead: 0,
        held_artifacts: Vec::new(),
        request_id: String::new(),
        properties: Vec::new(),
    };
    for (id, slots) in [("", 1), ("bad id!", 1), ("w1", 0), ("w1", 100_000)] {
        let err = c
            .worker()
            .register(register(id, slots))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{id:?} {slots}");
    }
    // A property that is not KEY=VALUE.
    let err = c
        .worker()
        .register(RegisterRequest {
            properties: vec!["pool=large".into(), "=x".into()],
            ..register("w1", 1)
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "properties: \"=x\": the name is empty");
    let err = c
        .worker()
        .register(RegisterRequest {
            ahead: 2,
            ..register("w1", 1)
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "ahead must be at most slots (1), not 2");
    // A result for a lease that does not exist is refused, not applied.
    c.worker()
        .register(register("w1", 1))
        .await
        .expect("register");
    let report = c
        .worker()
        .report_result(ReportResultRequest {
            worker_id: "w1".into(),
            lease_token: 12345,
            cache_key: bytes::Bytes::copy_from_slice(&[7; 20]),
            exit_code: 0,
            artifact_digest: bytes::Bytes::copy_from_slice(&[8; 20]),
            artifact_size: 1,
            ..Default::default()
        })
        .await
        .expect("report answered");
    assert!(!report.into_inner().accepted);

    // Still serving: the upload and the submit now succeed.
    c.client()
        .upload_blob(upload(digest, content.len() as u64, content))
        .await
        .expect("upload");
    assert!(c.missing(&[digest]).await.is_empty());
    let built = c.client().submit_build(submit("r3")).await.expect("submit");
    assert!(built.into_inner().build_id > 0);
    c.stop().await;
}

#[tokio::test]
async fn stopping_ends_open_event_streams_and_polls() {
    use distbuild_proto::v1::{PollWorkRequest, WatchBuildRequest};
    let c = start().await;
    let graph = format!(
        r#"{{"Jobs": [{{"ID": "{}", "Cmds": [{{"Exec": ["true"]}}]}}]}}"#,
        "3".repeat(40)
    );
    let build_id = c
        .client()
        .submit_build(SubmitBuildRequest {
            job_timeout_secs: 0,
            request_id: "watched".into(),
            graph_json: graph.into_bytes().into(),
            sources: Vec::new(),
        })
        .await
        .expect("submit")
        .into_inner()
        .build_id;
    // No worker runs the job: the stream stays open, waiting.
    let mut events = c
        .client()
        .watch_build(WatchBuildRequest {
            build_id,
            from_seq: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    c.register_worker("idle").await;
    let mut worker = c.worker();
    let poll = tokio::spawn(async move {
        // Asks for no slots, so it waits its whole poll.
        worker
            .poll_work(PollWorkRequest {
                worker_id: "idle".into(),
                free_slots: 0,
                wait_ms: 10_000,
                request_id: String::new(),
            })
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    tokio::time::timeout(std::time::Duration::from_secs(5), c.stop())
        .await
        .expect("the coordinator stops without waiting for its streams");
    // The watcher is told to reconnect rather than left hanging.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while let Ok(Some(_)) = events.message().await {}
    })
    .await;
    assert!(ended.is_ok(), "the event stream ended");
    let _ = poll.await;
}

/// A build too big for one Raft entry goes in several (openraft 0.9 gives
/// an append 100 ms), and comes out as one build with every job.
#[tokio::test]
async fn a_big_build_is_submitted_in_parts() {
    use distbuild_proto::raft_v1::NodeStatusRequest;
    use distbuild_proto::raft_v1::raft_transport_client::RaftTransportClient;
    let c = start().await;
    // A chain (each job depends on the one before, across part
    // boundaries), with long names: about 1.5 MB of jobs.
    const JOBS: usize = 3000;
    let id = |i: usize| format!("{i:040x}");
    let jobs: Vec<String> = (0..JOBS)
        .map(|i| {
            let deps = if i == 0 {
                String::new()
            } else {
                format!("\"{}\"", id(i - 1))
            };
            format!(
                r#"{{"ID": "{}", "Name": "job {i} {}", "Deps": [{deps}], "Cmds": [{{"Exec": ["true"]}}]}}"#,
                id(i),
                "x".repeat(400)
            )
        })
        .collect();
    let graph = format!(r#"{{"Jobs": [{}]}}"#, jobs.join(","));
    let mut raft = RaftTransportClient::new(c.channel.clone());
    let last_log = |status: distbuild_proto::raft_v1::NodeStatusResponse| status.last_log_index;
    let before = last_log(
        raft.node_status(NodeStatusRequest {})
            .await
            .expect("status")
            .into_inner(),
    );
    let submit = || SubmitBuildRequest {
        job_timeout_secs: 0,
        request_id: "big".into(),
        graph_json: graph.clone().into_bytes().into(),
        sources: Vec::new(),
    };
    let first = c
        .client()
        .submit_build(submit())
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(first.job_count, JOBS as u32);
    let after = last_log(
        raft.node_status(NodeStatusRequest {})
            .await
            .expect("status")
            .into_inner(),
    );
    assert!(
        after - before >= 5,
        "about 1.5 MB of jobs in 256 KiB parts takes several entries, took {}",
        after - before
    );
    // A retry is the same build.
    let again = c
        .client()
        .submit_build(submit())
        .await
        .expect("retried submit")
        .into_inner();
    assert_eq!(again.build_id, first.build_id);
    assert_eq!(again.job_count, JOBS as u32);
    c.stop().await;
}

/// An assignment carries its job's priority, so a worker holding several
/// leases starts the longest path first: the head of a chain of two jobs
/// of unknown duration expects both.
#[tokio::test]
async fn an_assignment_carries_its_jobs_longest_path() {
    use distbuild_proto::v1::PollWorkRequest;
    let c = start().await;
    let (first, second) = ("1".repeat(40), "2".repeat(40));
    let graph = format!(
        r#"{{"Jobs": [{{"ID": "{first}", "Cmds": [{{"Exec": ["true"]}}]}},
                      {{"ID": "{second}", "Deps": ["{first}"], "Cmds": [{{"Exec": ["true"]}}]}}]}}"#
    );
    c.client()
        .submit_build(SubmitBuildRequest {
            job_timeout_secs: 0,
            request_id: "chain".into(),
            graph_json: graph.into_bytes().into(),
            sources: Vec::new(),
        })
        .await
        .expect("submit");
    c.register_worker("w").await;
    let assignments = c
        .worker()
        .poll_work(PollWorkRequest {
            worker_id: "w".into(),
            free_slots: 1,
            wait_ms: 5_000,
            request_id: "poll".into(),
        })
        .await
        .expect("poll")
        .into_inner()
        .assignments;
    assert_eq!(assignments.len(), 1);
    assert_eq!(assignments[0].job_id, first);
    assert_eq!(
        assignments[0].path_ms,
        2 * distbuild_model::DEFAULT_EXPECTED_MS
    );
    c.stop().await;
}
