//! Remote Execution API actions end to end against the in-process fake
//! coordinator: the Action, Command and input root fetched from its CAS,
//! the command run, outputs, stdout and stderr uploaded, the encoded
//! ActionResult reported; and the one-line errors the coordinators parse.

mod support;

use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2::command::EnvironmentVariable;
use bazel_remote_apis::build::bazel::remote::execution::v2::{
    Action, ActionResult, Command, Digest as ReDigest, Directory, FileNode, Tree,
};
use distbuild_proto::v1::{self, ReportResultRequest};
use distbuild_proto::{BlobKey, HashFunction};
use prost::Message;
use support::{FakeCoordinator, RunningWorker, WAIT, assignment, serve};

const SHA256: HashFunction = HashFunction::Sha256;

fn digest(content: &[u8]) -> ReDigest {
    ReDigest {
        hash: SHA256.key_of(content).to_string(),
        size_bytes: content.len() as i64,
    }
}

fn key(re: &ReDigest) -> BlobKey {
    BlobKey::parse(SHA256, &re.hash).expect("hex")
}

/// Stores `content` in the fake's CAS; returns its digest.
fn put(fake: &FakeCoordinator, content: &[u8]) -> ReDigest {
    fake.with(|s| s.cas.insert(SHA256.key_of(content), content.to_vec()));
    digest(content)
}

/// An assignment of the action running `script` with `input_root`.
fn action_assignment(
    fake: &FakeCoordinator,
    token: u64,
    script: &str,
    outputs: &[&str],
    input_root: &Directory,
    timeout_ms: u64,
) -> v1::Assignment {
    let command = Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        environment_variables: vec![EnvironmentVariable {
            name: "PATH".into(),
            value: "/bin:/usr/bin".into(),
        }],
        output_paths: outputs.iter().map(|p| p.to_string()).collect(),
        working_directory: "w".into(),
        ..Command::default()
    };
    let action = Action {
        command_digest: Some(put(fake, &command.encode_to_vec())),
        input_root_digest: Some(put(fake, &input_root.encode_to_vec())),
        ..Action::default()
    };
    let encoded = action.encode_to_vec();
    put(fake, &encoded);
    let mut assignment = assignment(token, vec![]);
    assignment.timeout_ms = timeout_ms;
    assignment.action = Some(v1::RemoteAction {
        instance_name: "main".into(),
        action_digest: SHA256.key_of(&encoded).hash_bytes().to_vec().into(),
        action_size: encoded.len() as i64,
    });
    assignment
}

async fn report_of(
    coordinator: &support::Served,
    token: u64,
    timeout: Duration,
) -> ReportResultRequest {
    coordinator
        .fake
        .wait_until("the report", timeout, |s| {
            s.reports.iter().any(|r| r.lease_token == token)
        })
        .await;
    coordinator.fake.with(|s| {
        s.reports
            .iter()
            .find(|r| r.lease_token == token)
            .cloned()
            .expect("reported")
    })
}

#[tokio::test]
async fn an_action_runs_and_its_outputs_reach_the_cas() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let coordinator = serve(FakeCoordinator::default()).await;
    let fake = &coordinator.fake;
    let input = b"from the input root\n";
    let w = Directory {
        files: vec![FileNode {
            name: "in.txt".into(),
            digest: Some(put(fake, input)),
            is_executable: false,
            node_properties: None,
        }],
        ..Directory::default()
    };
    let root = Directory {
        directories: vec![
            bazel_remote_apis::build::bazel::remote::execution::v2::DirectoryNode {
                name: "w".into(),
                digest: Some(put(fake, &w.encode_to_vec())),
            },
        ],
        ..Directory::default()
    };
    let script = "cat in.txt > out/copy.txt; mkdir -p d/sub; echo deep > d/sub/f; \
                  echo to stdout; echo to stderr >&2; exit 3";
    let job = action_assignment(
        fake,
        71,
        script,
        &["out/copy.txt", "d", "absent"],
        &root,
        60_000,
    );
    fake.with(|s| s.queue.push_back(job));
    let worker = RunningWorker::start(vec![coordinator.addr.to_string()], dir.path(), 1).await;
    let report = report_of(&coordinator, 71, WAIT).await;
    worker.stop().await;

    assert_eq!(report.error, "", "{report:?}");
    assert_eq!(report.exit_code, 3);
    assert_eq!(&report.stdout[..], b"to stdout\n");
    assert_eq!(&report.stderr[..], b"to stderr\n");
    assert!(report.artifact_digest.is_empty());
    let result = ActionResult::decode(&report.action_result[..]).expect("an ActionResult");
    assert_eq!(result.exit_code, 3);
    assert_eq!(result.output_files.len(), 1);
    assert_eq!(result.output_files[0].path, "out/copy.txt");
    assert_eq!(result.output_files[0].digest, Some(digest(input)));
    assert_eq!(result.stdout_digest, Some(digest(b"to stdout\n")));
    assert_eq!(result.stderr_digest, Some(digest(b"to stderr\n")));
    assert!(result.stdout_raw.is_empty());
    let metadata = result.execution_metadata.expect("metadata");
    assert!(!metadata.worker.is_empty());
    let seconds = |t: Option<bazel_remote_apis::google::protobuf::Timestamp>| {
        let t = t.expect("stamped");
        t.seconds as f64 + f64::from(t.nanos) / 1e9
    };
    assert!(
        seconds(metadata.worker_start_timestamp) <= seconds(metadata.execution_start_timestamp)
            && seconds(metadata.execution_start_timestamp)
                <= seconds(metadata.execution_completed_timestamp)
            && seconds(metadata.output_upload_completed_timestamp)
                <= seconds(metadata.worker_completed_timestamp)
    );
    assert_eq!(result.output_directories.len(), 1);
    let tree_digest = result.output_directories[0]
        .tree_digest
        .clone()
        .expect("a tree");
    let (cas, uploads) = fake.with(|s| (s.cas.clone(), s.uploads.clone()));
    let tree =
        Tree::decode(&cas.get(&key(&tree_digest)).expect("the tree uploaded")[..]).expect("a Tree");
    let root_directory = tree.root.expect("root");
    assert_eq!(root_directory.directories[0].name, "sub");
    assert_eq!(tree.children.len(), 1);
    assert_eq!(tree.children[0].files[0].digest, Some(digest(b"deep\n")));
    for blob in [&b"deep\n"[..], b"to stdout\n", b"to stderr\n"] {
        assert!(cas.contains_key(&SHA256.key_of(blob)), "{blob:?} uploaded");
    }
    // The input file's content came back as an output: uploaded anyway,
    // and each distinct blob once.
    let mut distinct = uploads.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), uploads.len(), "{uploads:?}");
}

#[tokio::test]
async fn a_missing_blob_and_a_timeout_are_reported_as_the_coordinators_parse_them() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let coordinator = serve(FakeCoordinator::default()).await;
    let fake = &coordinator.fake;
    let absent = b"never uploaded";
    let root = Directory {
        files: vec![FileNode {
            name: "a".into(),
            digest: Some(digest(absent)),
            is_executable: false,
            node_properties: None,
        }],
        ..Directory::default()
    };
    let missing = action_assignment(fake, 72, "true", &[], &root, 60_000);
    let slow = action_assignment(fake, 73, "sleep 30", &[], &Directory::default(), 1_000);
    fake.with(|s| {
        s.queue.push_back(missing);
        s.queue.push_back(slow);
    });
    let worker = RunningWorker::start(vec![coordinator.addr.to_string()], dir.path(), 2).await;
    let missing = report_of(&coordinator, 72, WAIT).await;
    let slow = report_of(&coordinator, 73, WAIT).await;
    worker.stop().await;

    assert_eq!(missing.exit_code, -1);
    assert_eq!(
        missing.error,
        format!(
            "missing from the CAS: blobs/{}/{}",
            SHA256.key_of(absent),
            absent.len()
        )
    );
    assert!(missing.action_result.is_empty());
    assert_eq!(slow.exit_code, -1);
    assert!(
        slow.error.starts_with("timed out after 1 s"),
        "{}",
        slow.error
    );
    assert!(slow.action_result.is_empty());
}
