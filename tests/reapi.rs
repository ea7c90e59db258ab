//! The Remote Execution API's cache services against a real coordinator
//! over real gRPC (the generated clients of `bazel-remote-apis`, as a
//! Rust REAPI client would use them): capabilities, the CAS, ByteStream
//! and the action cache, each RPC's edges — missing blobs, bad digests, bad resource
//! names, resumed reads, oversized batches — and the coordinator serving
//! on after each.

mod support;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream::byte_stream_client::ByteStreamClient;
use bazel_remote_apis::google::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use prost::Message as _;
use re::action_cache_client::ActionCacheClient;
use re::capabilities_client::CapabilitiesClient;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use support::reapi::*;
use support::*;
use tonic::Code;
use tonic::transport::Channel;

fn update(digest: re::Digest, data: &[u8]) -> re::batch_update_blobs_request::Request {
    re::batch_update_blobs_request::Request {
        digest: Some(digest),
        data: data.to_vec(),
        compressor: 0,
    }
}

fn refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, says: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(says), "{status:?}");
}

async fn read_all(
    bytestream: &mut ByteStreamClient<Channel>,
    name: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<u8>, tonic::Status> {
    use futures::StreamExt as _;
    let mut stream = bytestream
        .read(ReadRequest {
            resource_name: name.to_string(),
            read_offset: offset,
            read_limit: limit,
        })
        .await?
        .into_inner();
    let mut data = Vec::new();
    while let Some(piece) = stream.next().await {
        data.extend(piece?.data);
    }
    Ok(data)
}

/// Writes `data` by ByteStream in 1 MiB pieces under upload `uuid`; the
/// committed size.
async fn write_blob(
    bytestream: &mut ByteStreamClient<Channel>,
    uuid: &str,
    data: &[u8],
) -> Result<i64, tonic::Status> {
    let digest = sha256(data);
    let upload = format!(
        "main/uploads/{uuid}/blobs/{}/{}",
        digest.hash, digest.size_bytes
    );
    let pieces: Vec<WriteRequest> = data
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, piece)| WriteRequest {
            resource_name: if i == 0 {
                upload.clone()
            } else {
                String::new()
            },
            write_offset: (i << 20) as i64,
            finish_write: (i + 1) << 20 >= data.len(),
            data: piece.to_vec(),
        })
        .collect();
    let written = bytestream.write(futures::stream::iter(pieces)).await?;
    Ok(written.into_inner().committed_size)
}

#[test]
fn the_cas_and_bytestream_serve_blobs_by_sha256_and_sha1_and_refuse_bad_input_clearly() {
    let cluster = Cluster::start(0, 1);
    let addr = cluster.coordinator_addr();
    runtime().block_on(async {
        let channel = channel(&addr).await;
        let mut capabilities = CapabilitiesClient::new(channel.clone());
        let mut cas = ContentAddressableStorageClient::new(channel.clone())
            .max_decoding_message_size(64 << 20);
        let mut bytestream = ByteStreamClient::new(channel.clone());

        // Capabilities: both functions, API 2.0 and later.
        let offered = capabilities
            .get_capabilities(re::GetCapabilitiesRequest::default())
            .await
            .expect("capabilities")
            .into_inner();
        let cache = offered.cache_capabilities.expect("cache capabilities");
        assert_eq!(
            cache.digest_functions,
            vec![
                re::digest_function::Value::Sha256 as i32,
                re::digest_function::Value::Sha1 as i32
            ]
        );
        assert_eq!(offered.low_api_version.expect("low").minor, 0);
        assert!(cache.max_batch_total_size_bytes > 0);

        // Missing blobs: the empty blob never is.
        let (a, b) = (b"blob a".as_slice(), b"blob b".as_slice());
        let missing = cas
            .find_missing_blobs(re::FindMissingBlobsRequest {
                blob_digests: vec![sha256(a), sha256(b), sha256(b"")],
                ..Default::default()
            })
            .await
            .expect("find missing")
            .into_inner();
        assert_eq!(missing.missing_blob_digests, vec![sha256(a), sha256(b)]);

        // A batch: one good blob, one whose content is not its digest's.
        let stored = cas
            .batch_update_blobs(re::BatchUpdateBlobsRequest {
                requests: vec![update(sha256(a), a), update(sha256(b), b"not b")],
                ..Default::default()
            })
            .await
            .expect("batch update")
            .into_inner();
        let codes: Vec<i32> = stored
            .responses
            .iter()
            .map(|r| r.status.as_ref().expect("status").code)
            .collect();
        assert_eq!(codes, vec![Code::Ok as i32, Code::InvalidArgument as i32]);
        let missing = cas
            .find_missing_blobs(re::FindMissingBlobsRequest {
                blob_digests: vec![sha256(a), sha256(b)],
                ..Default::default()
            })
            .await
            .expect("find missing")
            .into_inner();
        assert_eq!(missing.missing_blob_digests, vec![sha256(b)]);

        // SHA-1, asked for by name: its own key space.
        let sha1_request = |digests: Vec<re::Digest>| re::FindMissingBlobsRequest {
            blob_digests: digests,
            digest_function: re::digest_function::Value::Sha1 as i32,
            ..Default::default()
        };
        let missing = cas
            .find_missing_blobs(sha1_request(vec![sha1(a)]))
            .await
            .expect("find missing")
            .into_inner();
        assert_eq!(missing.missing_blob_digests, vec![sha1(a)]);
        cas.batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: vec![update(sha1(a), a)],
            digest_function: re::digest_function::Value::Sha1 as i32,
            ..Default::default()
        })
        .await
        .expect("batch update");
        let missing = cas
            .find_missing_blobs(sha1_request(vec![sha1(a)]))
            .await
            .expect("find missing")
            .into_inner();
        assert!(missing.missing_blob_digests.is_empty());

        // Bad digests and functions.
        let bad_hash = re::Digest {
            hash: "not-hex".into(),
            size_bytes: 1,
        };
        refused(
            cas.find_missing_blobs(re::FindMissingBlobsRequest {
                blob_digests: vec![sha256(a), bad_hash],
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "blob_digests[1]: \"not-hex\" is not a SHA-256 hash",
        );
        refused(
            cas.find_missing_blobs(re::FindMissingBlobsRequest {
                blob_digests: vec![sha256(a)],
                digest_function: re::digest_function::Value::Md5 as i32,
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "MD5 is not offered",
        );
        let mut negative = sha256(a);
        negative.size_bytes = -5;
        refused(
            cas.batch_read_blobs(re::BatchReadBlobsRequest {
                digests: vec![negative],
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "digests[0]: size -5 is negative",
        );

        // An oversized batch is refused whole.
        let big = vec![7u8; (cache.max_batch_total_size_bytes + 1) as usize];
        refused(
            cas.batch_update_blobs(re::BatchUpdateBlobsRequest {
                requests: vec![update(sha256(&big), &big)],
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "over max_batch_total_size_bytes",
        );

        // Batch reads: the stored one, and NOT_FOUND for the other.
        let read = cas
            .batch_read_blobs(re::BatchReadBlobsRequest {
                digests: vec![sha256(a), sha256(b)],
                ..Default::default()
            })
            .await
            .expect("batch read")
            .into_inner();
        assert_eq!(read.responses[0].data, a);
        assert_eq!(read.responses[0].status.as_ref().map(|s| s.code), Some(0));
        assert_eq!(
            read.responses[1].status.as_ref().map(|s| s.code),
            Some(Code::NotFound as i32)
        );

        // ByteStream: a 3 MiB blob written in 1 MiB pieces, then read
        // whole, and resumed from an offset with a limit.
        let large: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        let digest = sha256(&large);
        let upload = format!(
            "main/uploads/5a1e2f0c-1111-2222-3333-444455556666/blobs/{}/{}",
            digest.hash, digest.size_bytes
        );
        let committed = write_blob(
            &mut bytestream,
            "5a1e2f0c-1111-2222-3333-444455556666",
            &large,
        )
        .await
        .expect("write");
        assert_eq!(committed, large.len() as i64);
        let status = bytestream
            .query_write_status(QueryWriteStatusRequest {
                resource_name: upload.clone(),
            })
            .await
            .expect("query")
            .into_inner();
        assert!(status.complete);
        let name = format!("main/blobs/{}/{}", digest.hash, digest.size_bytes);
        assert_eq!(
            read_all(&mut bytestream, &name, 0, 0).await.expect("read"),
            large
        );
        let offset = (1 << 20) + 10;
        assert_eq!(
            read_all(&mut bytestream, &name, offset as i64, 100)
                .await
                .expect("resumed read"),
            large[offset..offset + 100]
        );
        refused(
            read_all(&mut bytestream, &name, large.len() as i64 + 1, 0).await,
            Code::OutOfRange,
            "past the blob's",
        );
        refused(
            read_all(
                &mut bytestream,
                &format!("blobs/{}/6", sha256(b).hash),
                0,
                0,
            )
            .await,
            Code::NotFound,
            "is not stored",
        );
        refused(
            read_all(&mut bytestream, "main/blobz/abc/1", 0, 0).await,
            Code::InvalidArgument,
            "no \"blobs\" segment",
        );
        // A write whose content is not its digest's stores nothing.
        let wrong = WriteRequest {
            resource_name: format!("uploads/u2/blobs/{}/6", sha256(b).hash),
            write_offset: 0,
            finish_write: true,
            data: b"not b!".to_vec(),
        };
        refused(
            bytestream.write(futures::stream::iter([wrong])).await,
            Code::InvalidArgument,
            "hashes to",
        );
        let status = bytestream
            .query_write_status(QueryWriteStatusRequest {
                resource_name: format!("uploads/u2/blobs/{}/6", sha256(b).hash),
            })
            .await
            .expect("query")
            .into_inner();
        assert!(!status.complete);

        // GetTree: a root naming one subdirectory, twice.
        let leaf = re::Directory {
            files: vec![re::FileNode {
                name: "a.txt".into(),
                digest: Some(sha256(a)),
                ..Default::default()
            }],
            ..Default::default()
        };
        let leaf_bytes = leaf.encode_to_vec();
        let root = re::Directory {
            directories: vec![
                re::DirectoryNode {
                    name: "x".into(),
                    digest: Some(sha256(&leaf_bytes)),
                },
                re::DirectoryNode {
                    name: "y".into(),
                    digest: Some(sha256(&leaf_bytes)),
                },
            ],
            ..Default::default()
        };
        let root_bytes = root.encode_to_vec();
        refused(
            async {
                use futures::StreamExt as _;
                let mut pages = cas
                    .get_tree(re::GetTreeRequest {
                        root_digest: Some(sha256(&root_bytes)),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                while let Some(page) = pages.next().await {
                    page?;
                }
                Ok(())
            }
            .await,
            Code::NotFound,
            "is not stored",
        );
        cas.batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: vec![
                update(sha256(&leaf_bytes), &leaf_bytes),
                update(sha256(&root_bytes), &root_bytes),
            ],
            ..Default::default()
        })
        .await
        .expect("store the tree");
        let pages: Vec<re::GetTreeResponse> = {
            use futures::StreamExt as _;
            cas.get_tree(re::GetTreeRequest {
                root_digest: Some(sha256(&root_bytes)),
                ..Default::default()
            })
            .await
            .expect("get tree")
            .into_inner()
            .map(|page| page.expect("page"))
            .collect()
            .await
        };
        let directories: Vec<re::Directory> =
            pages.into_iter().flat_map(|p| p.directories).collect();
        assert_eq!(directories, vec![root, leaf]);

        // The action cache: results by (instance, action digest), stored
        // only when the CAS holds every blob they name.
        let mut action_cache = ActionCacheClient::new(channel.clone());
        let action = sha256(b"an action");
        let get = |instance: &str| re::GetActionResultRequest {
            instance_name: instance.into(),
            action_digest: Some(action.clone()),
            ..Default::default()
        };
        refused(
            action_cache.get_action_result(get("main")).await,
            Code::NotFound,
            "no result for action",
        );
        let result = |stdout: re::Digest| re::ActionResult {
            output_files: vec![re::OutputFile {
                path: "out/a.txt".into(),
                digest: Some(sha256(a)),
                is_executable: true,
                ..Default::default()
            }],
            exit_code: 0,
            stdout_digest: Some(stdout),
            ..Default::default()
        };
        let update = |result: re::ActionResult| re::UpdateActionResultRequest {
            instance_name: "main".into(),
            action_digest: Some(action.clone()),
            action_result: Some(result),
            ..Default::default()
        };
        refused(
            action_cache
                .update_action_result(update(result(sha256(b"never uploaded"))))
                .await,
            Code::FailedPrecondition,
            &format!(
                "names blobs/{}/14, which the CAS does not hold",
                sha256(b"never uploaded").hash
            ),
        );
        let good = result(sha256(b""));
        action_cache
            .update_action_result(update(good.clone()))
            .await
            .expect("update");
        let got = action_cache
            .get_action_result(get("main"))
            .await
            .expect("get")
            .into_inner();
        assert_eq!(got, good);

        // An output directory names its files through its tree alone: they
        // too must be in the CAS, and count as the result's blobs.
        let inside = b"a file in an output directory";
        let tree = re::Tree {
            root: Some(re::Directory {
                files: vec![re::FileNode {
                    name: "inside.txt".into(),
                    digest: Some(sha256(inside)),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            children: Vec::new(),
        };
        let tree_bytes = tree.encode_to_vec();
        let with_directory = re::ActionResult {
            output_directories: vec![re::OutputDirectory {
                path: "out/dir".into(),
                tree_digest: Some(sha256(&tree_bytes)),
                ..Default::default()
            }],
            ..good.clone()
        };
        let store = |digest: re::Digest, data: &[u8]| re::BatchUpdateBlobsRequest {
            // The batch request of the file's top (`update` is the action
            // cache's here).
            requests: vec![crate::update(digest, data)],
            ..Default::default()
        };
        cas.batch_update_blobs(store(sha256(&tree_bytes), &tree_bytes))
            .await
            .expect("store the tree");
        refused(
            action_cache
                .update_action_result(update(with_directory.clone()))
                .await,
            Code::FailedPrecondition,
            &format!(
                "names blobs/{}/{}, which the CAS does not hold",
                sha256(inside).hash,
                inside.len()
            ),
        );
        cas.batch_update_blobs(store(sha256(inside), inside))
            .await
            .expect("store the file");
        action_cache
            .update_action_result(update(with_directory.clone()))
            .await
            .expect("update with an output directory");
        let got = action_cache
            .get_action_result(get("main"))
            .await
            .expect("get")
            .into_inner();
        assert_eq!(got, with_directory);

        // The trees read for their files are bounded, 16 MiB in all.
        let big: Vec<u8> = (0..(16 << 20) + 1).map(|i: u32| (i % 253) as u8).collect();
        write_blob(
            &mut bytestream,
            "5a1e2f0c-7777-8888-9999-444455556666",
            &big,
        )
        .await
        .expect("write the big blob");
        let too_big = re::ActionResult {
            output_directories: vec![re::OutputDirectory {
                path: "out/big".into(),
                tree_digest: Some(sha256(&big)),
                ..Default::default()
            }],
            ..good.clone()
        };
        refused(
            action_cache.update_action_result(update(too_big)).await,
            Code::InvalidArgument,
            "the result's trees are over 16777216 bytes in all",
        );
        refused(
            action_cache.get_action_result(get("other")).await,
            Code::NotFound,
            "no result for action",
        );
        refused(
            action_cache
                .get_action_result(re::GetActionResultRequest {
                    action_digest: Some(re::Digest {
                        hash: "abc".into(),
                        size_bytes: 3,
                    }),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            "action_digest: \"abc\" is not a SHA-256 hash",
        );
    });
    // The coordinator serves on.
    assert!(cluster.status()["workers"].is_array(), "{}", cluster.logs());
}

/// Calls `call` until it answers, for at most `within`: the retries a REAPI
/// client makes while a cluster elects a new leader.
async fn until_ok<T, F, Fut>(within: std::time::Duration, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        match call().await {
            Ok(answer) => return answer,
            Err(status) if std::time::Instant::now() < deadline => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(status) => panic!("still failing: {status:?}"),
        }
    }
}

#[test]
fn a_follower_passes_calls_to_the_leader_and_its_clients_ride_through_a_failover() {
    let mut cluster = HaCluster::start(3, 0, 0, 1);
    let leader = cluster.wait_for_leader();
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let (first, second) = (
        cluster.node_addr(followers[0]),
        cluster.node_addr(followers[1]),
    );
    let blob = b"stored through a follower".as_slice();
    let large: Vec<u8> = (0..(2 << 20) + 7).map(|i: u32| (i % 13) as u8).collect();
    runtime().block_on(async {
        let mut cas = ContentAddressableStorageClient::new(channel(&first).await);
        let stored = cas
            .batch_update_blobs(re::BatchUpdateBlobsRequest {
                requests: vec![update(sha256(blob), blob)],
                ..Default::default()
            })
            .await
            .expect("a follower takes an update")
            .into_inner();
        assert_eq!(stored.responses[0].status.as_ref().map(|s| s.code), Some(0));
        // Streams both ways pass through too.
        let mut bytestream = ByteStreamClient::new(channel(&first).await);
        let digest = sha256(&large);
        let pieces: Vec<WriteRequest> = large
            .chunks(1 << 20)
            .enumerate()
            .map(|(i, piece)| WriteRequest {
                resource_name: format!("uploads/u/blobs/{}/{}", digest.hash, digest.size_bytes),
                write_offset: (i << 20) as i64,
                finish_write: ((i + 1) << 20) >= large.len(),
                data: piece.to_vec(),
            })
            .collect();
        bytestream
            .write(futures::stream::iter(pieces))
            .await
            .expect("a write through a follower");
        let mut other = ByteStreamClient::new(channel(&second).await);
        let name = format!("blobs/{}/{}", digest.hash, digest.size_bytes);
        assert_eq!(
            read_all(&mut other, &name, 0, 0).await.expect("read"),
            large
        );
    });

    // The leader dies; a client of a follower retries as REAPI clients do
    // and is served by the new leader through the same follower.
    cluster.kill_node(leader);
    let survivor = followers[0];
    runtime().block_on(async {
        let mut cas =
            ContentAddressableStorageClient::new(channel(&cluster.node_addr(survivor)).await);
        let missing = until_ok(std::time::Duration::from_secs(20), || {
            let mut cas = cas.clone();
            async move {
                cas.find_missing_blobs(re::FindMissingBlobsRequest {
                    blob_digests: vec![sha256(blob), sha256(b"never")],
                    ..Default::default()
                })
                .await
            }
        })
        .await
        .into_inner();
        assert_eq!(missing.missing_blob_digests, vec![sha256(b"never")]);
        let read = cas
            .batch_read_blobs(re::BatchReadBlobsRequest {
                digests: vec![sha256(blob)],
                ..Default::default()
            })
            .await
            .expect("read after the failover")
            .into_inner();
        assert_eq!(read.responses[0].data, blob);
    });
    assert_ne!(cluster.wait_for_leader(), leader, "{}", cluster.logs());
}

#[test]
fn blobs_clients_keep_finding_or_being_served_outlive_their_retention() {
    // Blobs unused for 2 s are collected; a use is noted after 0.5 s.
    let cluster = Cluster::start_with(0, 1, &["--blob-retention", "2", "--gc-interval-ms", "200"]);
    let addr = cluster.coordinator_addr();
    let (found, served, idle) = (
        b"found".as_slice(),
        b"served".as_slice(),
        b"idle".as_slice(),
    );
    runtime().block_on(async {
        let channel = channel(&addr).await;
        let mut cas = ContentAddressableStorageClient::new(channel.clone());
        let mut action_cache = ActionCacheClient::new(channel);
        cas.batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: vec![
                update(sha256(found), found),
                update(sha256(served), served),
                update(sha256(idle), idle),
            ],
            ..Default::default()
        })
        .await
        .expect("store");
        let action = sha256(b"action");
        let result = re::ActionResult {
            output_files: vec![re::OutputFile {
                path: "out".into(),
                digest: Some(sha256(served)),
                ..Default::default()
            }],
            ..Default::default()
        };
        action_cache
            .update_action_result(re::UpdateActionResultRequest {
                action_digest: Some(action.clone()),
                action_result: Some(result.clone()),
                ..Default::default()
            })
            .await
            .expect("store the result");
        // Six seconds of a client finding one blob and being served the
        // result naming another.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(6);
        while std::time::Instant::now() < until {
            let missing = cas
                .find_missing_blobs(re::FindMissingBlobsRequest {
                    blob_digests: vec![sha256(found)],
                    ..Default::default()
                })
                .await
                .expect("find")
                .into_inner();
            assert!(
                missing.missing_blob_digests.is_empty(),
                "{}",
                cluster.logs()
            );
            let got = action_cache
                .get_action_result(re::GetActionResultRequest {
                    action_digest: Some(action.clone()),
                    ..Default::default()
                })
                .await
                .expect("the result is served: its blob is kept")
                .into_inner();
            assert_eq!(got, result);
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let missing = cas
            .find_missing_blobs(re::FindMissingBlobsRequest {
                blob_digests: vec![sha256(found), sha256(served), sha256(idle)],
                ..Default::default()
            })
            .await
            .expect("find")
            .into_inner();
        assert_eq!(
            missing.missing_blob_digests,
            vec![sha256(idle)],
            "only the idle one went"
        );
    });
}

#[test]
fn workers_register_their_platform_properties_and_status_shows_them() {
    let cluster = Cluster::start_full(
        1,
        1,
        &[],
        &["--property", "pool=large", "--property", "OSFamily=Linux"],
        false,
    );
    let status = cluster.status();
    assert_eq!(
        status["workers"][0]["properties"],
        serde_json::json!(["OSFamily=Linux", "pool=large"]),
        "{status}"
    );
    // A property that is not KEY=VALUE stops the worker before it starts.
    let out = distbuild()
        .args(["worker", "--insecure", "--listen", "127.0.0.1:0"])
        .args(["--coordinator", &cluster.coordinator_addr()])
        .arg("--cache-dir")
        .arg(cluster.path("bad-worker"))
        .args(["--property", "pool"])
        .output()
        .expect("run worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--property: \"pool\" is not KEY=VALUE"),
        "{stderr}"
    );
}
