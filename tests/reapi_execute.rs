//! The Remote Execution API's Execution service against a real coordinator
//! and worker: actions run on the worker from what the CAS holds, their
//! results are cached, callers of the same action share one run, and every
//! refusal is the code and detail the spec names.

// Bazel 4.2.3 speaks API 2.0: these actions are written as it writes them,
// with the fields 2.1 deprecated (output_files, Command.platform, ...).
#![allow(deprecated)]

mod support;

use std::collections::BTreeMap;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::longrunning::{Operation, operation};
use futures::StreamExt as _;
use prost::Message as _;
use re::action_cache_client::ActionCacheClient;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use re::execution_client::ExecutionClient;
use support::reapi::*;
use support::*;
use tonic::Code;
use tonic::transport::Channel;

/// `google.rpc.PreconditionFailure`, as a client decodes it.
#[derive(Clone, PartialEq, prost::Message)]
struct PreconditionFailure {
    #[prost(message, repeated, tag = "1")]
    violations: Vec<Violation>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Violation {
    #[prost(string, tag = "1")]
    r#type: String,
    #[prost(string, tag = "2")]
    subject: String,
    #[prost(string, tag = "3")]
    description: String,
}

/// A client of the CAS, the action cache and Execution on one channel.
struct Client {
    cas: ContentAddressableStorageClient<Channel>,
    cache: ActionCacheClient<Channel>,
    exec: ExecutionClient<Channel>,
}

impl Client {
    async fn new(addr: &str) -> Client {
        let channel = channel(addr).await;
        Client {
            cas: ContentAddressableStorageClient::new(channel.clone()),
            cache: ActionCacheClient::new(channel.clone()),
            exec: ExecutionClient::new(channel),
        }
    }

    /// Stores blobs; returns their digests.
    async fn upload(&mut self, blobs: &[&[u8]]) -> Vec<re::Digest> {
        let digests: Vec<re::Digest> = blobs.iter().map(|b| sha256(b)).collect();
        let requests = blobs
            .iter()
            .zip(&digests)
            .map(|(data, digest)| re::batch_update_blobs_request::Request {
                digest: Some(digest.clone()),
                data: data.to_vec(),
                compressor: 0,
            })
            .collect();
        let answer = self
            .cas
            .batch_update_blobs(re::BatchUpdateBlobsRequest {
                requests,
                ..Default::default()
            })
            .await
            .expect("upload")
            .into_inner();
        for response in answer.responses {
            assert_eq!(response.status.map(|s| s.code), Some(0), "stored");
        }
        digests
    }

    async fn read(&mut self, digest: &re::Digest) -> Vec<u8> {
        if digest.size_bytes == 0 {
            return Vec::new();
        }
        let answer = self
            .cas
            .batch_read_blobs(re::BatchReadBlobsRequest {
                digests: vec![digest.clone()],
                ..Default::default()
            })
            .await
            .expect("read")
            .into_inner();
        answer.responses[0].data.clone()
    }

    /// Stores an action running `script` under /bin/sh with `files` as its
    /// input root, expecting `outputs`; returns the action's digest.
    async fn action(&mut self, script: &str, files: &[(&str, &[u8])], shape: Shape) -> re::Digest {
        let mut blobs: Vec<&[u8]> = Vec::new();
        let mut nodes = Vec::new();
        for (name, data) in files {
            blobs.push(data);
            nodes.push(re::FileNode {
                name: name.to_string(),
                digest: Some(sha256(data)),
                is_executable: false,
                ..Default::default()
            });
        }
        if shape.missing_input {
            // Named, never uploaded.
            nodes.push(re::FileNode {
                name: "absent.txt".into(),
                digest: Some(sha256(b"never uploaded")),
                ..Default::default()
            });
        }
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let root = re::Directory {
            files: nodes,
            ..Default::default()
        }
        .encode_to_vec();
        let mut command = re::Command {
            arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
            environment_variables: vec![re::command::EnvironmentVariable {
                name: "PATH".into(),
                value: "/usr/bin:/bin".into(),
            }],
            output_files: vec!["out/copy.txt".into(), "out/link".into()],
            output_directories: vec!["out/d".into()],
            ..Default::default()
        };
        if let Some(pool) = shape.pool {
            command.platform = Some(re::Platform {
                properties: vec![re::platform::Property {
                    name: "pool".into(),
                    value: pool.into(),
                }],
            });
        }
        let command = command.encode_to_vec();
        let digests = self.upload(&[&root, &command]).await;
        self.upload(&blobs).await;
        let action = re::Action {
            command_digest: Some(digests[1].clone()),
            input_root_digest: Some(digests[0].clone()),
            do_not_cache: shape.do_not_cache,
            timeout: shape
                .timeout_secs
                .map(|seconds| bazel_remote_apis::google::protobuf::Duration { seconds, nanos: 0 }),
            ..Default::default()
        }
        .encode_to_vec();
        self.upload(&[&action]).await.remove(0)
    }

    /// Executes `action`; every operation the stream sent.
    async fn execute(
        &mut self,
        action: &re::Digest,
        skip_cache_lookup: bool,
    ) -> Result<Vec<Operation>, tonic::Status> {
        let mut stream = self
            .exec
            .execute(re::ExecuteRequest {
                action_digest: Some(action.clone()),
                skip_cache_lookup,
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut operations = Vec::new();
        while let Some(op) = stream.next().await {
            operations.push(op?);
        }
        Ok(operations)
    }
}

#[derive(Default, Clone, Copy)]
struct Shape {
    pool: Option<&'static str>,
    do_not_cache: bool,
    missing_input: bool,
    timeout_secs: Option<i64>,
}

fn stage(op: &Operation) -> i32 {
    let metadata = op.metadata.as_ref().expect("metadata");
    assert_eq!(
        metadata.type_url,
        "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteOperationMetadata"
    );
    re::ExecuteOperationMetadata::decode(metadata.value.as_slice())
        .expect("metadata decodes")
        .stage
}

/// The response of the finished (last) operation.
fn response(ops: &[Operation]) -> re::ExecuteResponse {
    let last = ops.last().expect("an operation");
    assert!(last.done, "the last operation is done: {ops:?}");
    match &last.result {
        Some(operation::Result::Response(any)) => {
            assert_eq!(
                any.type_url,
                "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse"
            );
            re::ExecuteResponse::decode(any.value.as_slice()).expect("response decodes")
        }
        other => panic!("no response: {other:?}"),
    }
}

fn violations(status: &tonic::Status) -> Vec<(String, String)> {
    let rpc = bazel_remote_apis::google::rpc::Status::decode(status.details()).expect("details");
    rpc.details
        .iter()
        .filter(|any| any.type_url == "type.googleapis.com/google.rpc.PreconditionFailure")
        .flat_map(|any| {
            PreconditionFailure::decode(any.value.as_slice())
                .expect("decodes")
                .violations
        })
        .map(|v| (v.r#type, v.subject))
        .collect()
}

const SCRIPT: &str = "mkdir -p out/d && cat in.txt > out/copy.txt && ln -s copy.txt out/link \
                      && printf nested > out/d/f && echo done && echo warned >&2";

#[test]
fn actions_run_on_a_worker_from_the_cas_are_cached_and_answer_as_the_spec_says() {
    let cluster = Cluster::start_full(1, 2, &[], &["--property", "pool=main"], false);
    runtime().block_on(async {
        let mut client = Client::new(&cluster.coordinator_addr()).await;
        let action = client
            .action(SCRIPT, &[("in.txt", b"hello")], Shape::default())
            .await;

        // Runs: queued, executing, completed; outputs in the CAS.
        let ops = client.execute(&action, false).await.expect("execute");
        let stages: Vec<i32> = ops.iter().map(stage).collect();
        use re::execution_stage::Value::{Completed, Executing, Queued};
        assert_eq!(
            stages,
            [Queued as i32, Executing as i32, Completed as i32],
            "{ops:?}"
        );
        assert!(ops[0].name.starts_with("operations/"), "{ops:?}");
        let answer = response(&ops);
        assert!(!answer.cached_result);
        assert_eq!(
            answer.status.as_ref().map_or(0, |s| s.code),
            0,
            "{answer:?}"
        );
        let result = answer.result.expect("a result");
        assert_eq!(result.exit_code, 0);
        assert_eq!(result.output_files.len(), 1, "{result:?}");
        assert_eq!(result.output_files[0].path, "out/copy.txt");
        assert_eq!(result.output_files[0].digest, Some(sha256(b"hello")));
        assert_eq!(
            client
                .read(result.stdout_digest.as_ref().expect("stdout"))
                .await,
            b"done\n"
        );
        assert_eq!(
            client
                .read(result.stderr_digest.as_ref().expect("stderr"))
                .await,
            b"warned\n"
        );
        let symlinks: Vec<(&str, &str)> = result
            .output_file_symlinks
            .iter()
            .map(|s| (s.path.as_str(), s.target.as_str()))
            .collect();
        assert_eq!(symlinks, [("out/link", "copy.txt")]);
        assert_eq!(result.output_directories.len(), 1);
        let tree = re::Tree::decode(
            client
                .read(
                    result.output_directories[0]
                        .tree_digest
                        .as_ref()
                        .expect("tree"),
                )
                .await
                .as_slice(),
        )
        .expect("a Tree");
        let root = tree.root.expect("root");
        assert_eq!(root.files[0].name, "f");
        assert_eq!(root.files[0].digest, Some(sha256(b"nested")));
        let metadata = result.execution_metadata.expect("metadata");
        assert!(!metadata.worker.is_empty(), "names its worker");

        // Cached now: the same action answers at once from the cache...
        let again = client.execute(&action, false).await.expect("execute again");
        assert_eq!(again.len(), 1, "{again:?}");
        assert!(
            again[0].name.starts_with("operations/"),
            "a cache hit's operation has a name too: {again:?}"
        );
        let cached = response(&again);
        assert!(cached.cached_result);
        assert_eq!(
            cached.result.expect("result").output_files[0].digest,
            Some(sha256(b"hello"))
        );
        client
            .cache
            .get_action_result(re::GetActionResultRequest {
                action_digest: Some(action.clone()),
                ..Default::default()
            })
            .await
            .expect("in the action cache");
        // ... unless the caller skips the lookup: then it runs again.
        let rerun = client.execute(&action, true).await.expect("skip the cache");
        assert!(
            rerun.len() > 1 && !response(&rerun).cached_result,
            "{rerun:?}"
        );

        // A failing command is a result with its exit code, not an error,
        // and is not cached; neither is a do_not_cache action's result.
        for (script, shape, code) in [
            ("echo broken >&2; exit 3", Shape::default(), 3),
            (
                "mkdir -p out && echo fresh > out/copy.txt",
                Shape {
                    do_not_cache: true,
                    ..Shape::default()
                },
                0,
            ),
        ] {
            let action = client.action(script, &[], shape).await;
            let answer = response(&client.execute(&action, false).await.expect("execute"));
            assert_eq!(
                answer.status.as_ref().map_or(0, |s| s.code),
                0,
                "{answer:?}"
            );
            assert_eq!(answer.result.expect("result").exit_code, code);
            let lookup = client
                .cache
                .get_action_result(re::GetActionResultRequest {
                    action_digest: Some(action.clone()),
                    ..Default::default()
                })
                .await;
            assert_eq!(
                lookup.expect_err("not cached").code(),
                Code::NotFound,
                "{script}"
            );
        }

        // A run past the action's timeout: DEADLINE_EXCEEDED in the response.
        let slow = client
            .action(
                "sleep 30",
                &[],
                Shape {
                    timeout_secs: Some(1),
                    ..Shape::default()
                },
            )
            .await;
        let answer = response(&client.execute(&slow, false).await.expect("execute"));
        let status = answer.status.expect("a status");
        assert_eq!(status.code, Code::DeadlineExceeded as i32, "{status:?}");

        // Refusals before anything runs.
        let missing = client
            .action(
                "true",
                &[],
                Shape {
                    missing_input: true,
                    ..Shape::default()
                },
            )
            .await;
        let refused = client.execute(&missing, false).await.expect_err("refused");
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        let absent = sha256(b"never uploaded");
        assert_eq!(
            violations(&refused),
            [(
                "MISSING".to_string(),
                format!("blobs/{}/{}", absent.hash, absent.size_bytes)
            )]
        );
        let unknown_action = sha256(b"no such action");
        let refused = client
            .execute(&unknown_action, false)
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert_eq!(
            violations(&refused)[0].1,
            format!("blobs/{}/14", unknown_action.hash)
        );
        let unplaceable = client
            .action(
                "true",
                &[],
                Shape {
                    pool: Some("gpu"),
                    ..Shape::default()
                },
            )
            .await;
        let refused = client
            .execute(&unplaceable, false)
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert!(refused.message().contains("pool=gpu"), "{refused:?}");
        let placeable = client
            .action(
                "true",
                &[],
                Shape {
                    pool: Some("main"),
                    ..Shape::default()
                },
            )
            .await;
        let answer = response(&client.execute(&placeable, false).await.expect("execute"));
        assert_eq!(answer.result.expect("result").exit_code, 0);
        let bad = re::Digest {
            hash: "not hex".into(),
            size_bytes: 3,
        };
        let refused = client.execute(&bad, false).await.expect_err("refused");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

        // WaitExecution: a finished operation answers done; an unknown one
        // is NOT_FOUND.
        let name = ops[0].name.clone();
        let mut waited = client
            .exec
            .wait_execution(re::WaitExecutionRequest { name })
            .await
            .expect("wait")
            .into_inner();
        let mut last = None;
        while let Some(op) = waited.next().await {
            last = Some(op.expect("op"));
        }
        assert_eq!(
            response(&[last.expect("an operation")])
                .result
                .expect("result")
                .output_files[0]
                .digest,
            Some(sha256(b"hello"))
        );
        for name in ["operations/999999999", "elsewhere/1"] {
            let refused = client
                .exec
                .wait_execution(re::WaitExecutionRequest { name: name.into() })
                .await
                .map(|_| ())
                .expect_err("unknown");
            assert_eq!(refused.code(), Code::NotFound, "{name}: {refused:?}");
        }
    });
}

#[test]
fn callers_of_the_same_action_at_once_share_one_run() {
    let cluster = Cluster::start(1, 2);
    runtime().block_on(async {
        let mut client = Client::new(&cluster.coordinator_addr()).await;
        // Each run leaves a different output: shared runs show one.
        let action = client
            .action(
                "sleep 1; mkdir -p out; od -An -N8 -tx8 /dev/urandom > out/copy.txt",
                &[],
                Shape::default(),
            )
            .await;
        let mut callers = Vec::new();
        for _ in 0..3 {
            let mut other = Client::new(&cluster.coordinator_addr()).await;
            let action = action.clone();
            callers.push(tokio::spawn(
                async move { other.execute(&action, false).await },
            ));
        }
        let mut outputs = BTreeMap::new();
        for caller in callers {
            let ops = caller.await.expect("join").expect("execute");
            let result = response(&ops).result.expect("result");
            *outputs
                .entry(result.output_files[0].digest.clone().expect("digest").hash)
                .or_insert(0) += 1;
        }
        assert_eq!(outputs.len(), 1, "one run for three callers: {outputs:?}");
    });
}

#[test]
fn newer_clients_name_outputs_by_output_paths_the_platform_in_the_action_and_sha1_digests() {
    let cluster = Cluster::start_full(1, 2, &[], &["--property", "pool=main"], false);
    runtime().block_on(async {
        let mut client = Client::new(&cluster.coordinator_addr()).await;
        let sha1_function = re::digest_function::Value::Sha1 as i32;
        let command = re::Command {
            arguments: vec![
                "/bin/sh".into(),
                "-c".into(),
                "mkdir -p out/sub && printf one > out/sub/one && printf two > two && chmod +x two"
                    .into(),
            ],
            output_paths: vec!["out".into(), "two".into(), "never".into()],
            ..Default::default()
        }
        .encode_to_vec();
        let root = re::Directory::default().encode_to_vec();
        let action_for = |pool: &str| {
            re::Action {
                command_digest: Some(sha1(&command)),
                input_root_digest: Some(sha1(&root)),
                platform: Some(re::Platform {
                    properties: vec![re::platform::Property {
                        name: "pool".into(),
                        value: pool.into(),
                    }],
                }),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let (runs, elsewhere) = (action_for("main"), action_for("gpu"));
        let requests = [&command, &root, &runs, &elsewhere]
            .into_iter()
            .map(|data| re::batch_update_blobs_request::Request {
                digest: Some(sha1(data)),
                data: data.clone(),
                compressor: 0,
            })
            .collect();
        client
            .cas
            .batch_update_blobs(re::BatchUpdateBlobsRequest {
                requests,
                digest_function: sha1_function,
                ..Default::default()
            })
            .await
            .expect("upload");
        let execute = |action: &Vec<u8>| re::ExecuteRequest {
            action_digest: Some(sha1(action)),
            digest_function: sha1_function,
            ..Default::default()
        };
        // Action.platform is honoured (Command.platform is empty).
        let refused = client
            .exec
            .execute(execute(&elsewhere))
            .await
            .map(|_| ())
            .expect_err("no worker has pool=gpu");
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert!(refused.message().contains("pool=gpu"), "{refused:?}");
        let mut stream = client
            .exec
            .execute(execute(&runs))
            .await
            .expect("execute")
            .into_inner();
        let mut ops = Vec::new();
        while let Some(op) = stream.next().await {
            ops.push(op.expect("op"));
        }
        let result = response(&ops).result.expect("a result");
        assert_eq!(result.exit_code, 0, "{result:?}");
        // A file and a directory named by output_paths, both in SHA-1.
        assert_eq!(result.output_files.len(), 1, "{result:?}");
        assert_eq!(result.output_files[0].path, "two");
        assert_eq!(result.output_files[0].digest, Some(sha1(b"two")));
        assert!(result.output_files[0].is_executable);
        assert_eq!(result.output_directories.len(), 1, "{result:?}");
        assert_eq!(result.output_directories[0].path, "out");
        let tree_digest = result.output_directories[0]
            .tree_digest
            .clone()
            .expect("tree");
        assert_eq!(tree_digest.hash.len(), 40, "a SHA-1 tree");
        let tree = client
            .cas
            .batch_read_blobs(re::BatchReadBlobsRequest {
                digests: vec![tree_digest],
                digest_function: sha1_function,
                ..Default::default()
            })
            .await
            .expect("read")
            .into_inner();
        let tree = re::Tree::decode(tree.responses[0].data.as_slice()).expect("a Tree");
        assert_eq!(tree.root.expect("root").directories[0].name, "sub");
        assert_eq!(tree.children.len(), 1);
        assert_eq!(tree.children[0].files[0].digest, Some(sha1(b"one")));
    });
}

#[test]
fn a_command_that_hits_a_job_limit_is_a_result_with_its_exit_code_not_an_error() {
    let cluster = Cluster::start_full(1, 1, &[], &["--job-max-file-bytes", "4096"], false);
    runtime().block_on(async {
        let mut client = Client::new(&cluster.coordinator_addr()).await;
        let action = client
            .action(
                "mkdir -p out && head -c 100000 /dev/zero > out/copy.txt",
                &[],
                Shape::default(),
            )
            .await;
        let ops = client.execute(&action, false).await.expect("execute");
        assert!(ops[0].name.starts_with("operations/"));
        let answer = response(&ops);
        assert_eq!(
            answer.status.as_ref().map_or(0, |s| s.code),
            0,
            "{answer:?}"
        );
        let result = answer.result.expect("a result");
        assert_ne!(result.exit_code, 0, "{result:?}");
        let stderr = client
            .read(result.stderr_digest.as_ref().expect("stderr"))
            .await;
        let stderr = String::from_utf8_lossy(&stderr);
        assert!(stderr.contains("4096"), "stderr names the limit: {stderr}");
        // A failed run is not cached: the next Execute runs it again.
        let again = client.execute(&action, false).await.expect("execute");
        assert!(again.len() > 1 && !response(&again).cached_result);
    });
}
