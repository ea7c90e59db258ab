//! The Remote Execution API v2 (Bazel's, Buck2's, reclient's) on the
//! client address: `capabilities`, the content-addressable storage
//! (`cas`) and `bytestream` over the same blob store, records and quorum
//! replication as distbuild's own uploads, and the `action_cache` in the
//! replicated state. What every service shares lives
//! here: the digest functions offered, digests and resource names from the
//! wire (each checked once, INVALID_ARGUMENT naming the field), and the
//! one way a blob received whole is stored.
//!
//! The CAS is one store for every instance name (content decides what a
//! blob is); instance names are accepted as given.

pub mod action_cache;
pub mod bytestream;
pub mod capabilities;
pub mod cas;
pub mod execution;
pub mod forward;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use distbuild_model::Command;
use distbuild_proto::{BlobKey, HashFunction};
use tonic::Status;

use super::status::blob_status;
use crate::replica::Node;

/// Largest sum of blob sizes one batch call may carry (advertised as
/// `max_batch_total_size_bytes`; clients send bigger blobs by ByteStream).
pub const MAX_BATCH_TOTAL_BYTES: u64 = 4 << 20;

/// Most bytes of an instance name (it is kept in the replicated state with
/// each action it names).
pub const MAX_INSTANCE_NAME_BYTES: usize = 1024;

/// Most digests one call may name.
pub const MAX_DIGESTS_PER_CALL: usize = 100_000;

/// The digest functions offered, in the API's numbering.
pub fn offered_functions() -> Vec<i32> {
    vec![
        re::digest_function::Value::Sha256 as i32,
        re::digest_function::Value::Sha1 as i32,
    ]
}

/// The function a request asks for: `digest_function` when set (API 2.1
/// and later), else the one the hash's length says (SHA-256 for 64 hex
/// characters, as 2.0 clients such as Bazel 4 send, SHA-1 for 40).
pub fn function_of(digest_function: i32, hash: &str) -> Result<HashFunction, Status> {
    use re::digest_function::Value;
    match Value::try_from(digest_function) {
        Ok(Value::Sha256) => Ok(HashFunction::Sha256),
        Ok(Value::Sha1) => Ok(HashFunction::Sha1),
        Ok(Value::Unknown) => match hash.len() {
            40 => Ok(HashFunction::Sha1),
            _ => Ok(HashFunction::Sha256),
        },
        Ok(other) => Err(Status::invalid_argument(format!(
            "digest function {} is not offered; this server offers SHA256 and SHA1",
            other.as_str_name()
        ))),
        Err(_) => Err(Status::invalid_argument(format!(
            "digest function {digest_function} is not a known digest function"
        ))),
    }
}

/// A blob's key and size from a wire digest; `what` names the field.
pub fn key_of(
    digest: Option<&re::Digest>,
    digest_function: i32,
    what: &str,
) -> Result<(BlobKey, u64), Status> {
    let digest = digest.ok_or_else(|| Status::invalid_argument(format!("{what}: missing")))?;
    let function = function_of(digest_function, &digest.hash)?;
    let key = BlobKey::parse(function, &digest.hash)
        .map_err(|e| Status::invalid_argument(format!("{what}: {e}")))?;
    let size = u64::try_from(digest.size_bytes).map_err(|_| {
        Status::invalid_argument(format!("{what}: size {} is negative", digest.size_bytes))
    })?;
    Ok((key, size))
}

/// The wire digest of a blob.
pub fn digest_of(key: &BlobKey, size: u64) -> re::Digest {
    re::Digest {
        hash: key.to_string(),
        size_bytes: size as i64,
    }
}

/// Whether `key` names the empty blob, which every CAS holds without
/// storing it.
pub fn is_empty_blob(key: &BlobKey, size: u64) -> bool {
    size == 0 && *key == key.function().key_of(b"")
}

/// Whether the CAS holds blob `key` of `size` bytes: recorded (so stored
/// on a quorum) at that size, or the empty blob, which it always holds.
pub fn holds(model: &distbuild_model::Model, key: &BlobKey, size: u64) -> bool {
    is_empty_blob(key, size) || model.blob_size(key) == Some(size)
}

/// Stores a blob received whole: verified against its key, written
/// durably, copied to a quorum of coordinators, then recorded through
/// Raft. A blob already recorded is only recorded again (its use now).
pub async fn store_whole(node: &Node, key: BlobKey, data: &[u8]) -> Result<(), Status> {
    let size = data.len() as u64;
    if !node.blobs().contains(&key) {
        let mut writer = node.blobs().writer(key, size).await.map_err(blob_status)?;
        writer.write(data).await.map_err(blob_status)?;
        writer.finish().await.map_err(blob_status)?;
    }
    node.replicate_blob(key, size).await?;
    node.propose(Command::BlobStored { digest: key, size })
        .await?;
    Ok(())
}

/// A use older than this is recorded again when a client finds a blob or
/// is served a result: an hour (collection is counted in days), or a
/// quarter of the blob retention if that is shorter.
pub fn note_use_after_ms(node: &Node) -> u64 {
    (60 * 60 * 1000).min(node.tuning().gc.blob_retention_ms / 4)
}

/// Most keys one `Used` entry carries (a key is at most 33 bytes encoded:
/// an entry stays well under the 256 KiB no Raft entry passes).
const MAX_USED_PER_ENTRY: usize = 4_000;

/// Of `blobs`, those recorded whose last recorded use is older than
/// [`note_use_after_ms`].
pub fn stale_blobs(node: &Node, blobs: impl IntoIterator<Item = BlobKey>) -> Vec<BlobKey> {
    used_before(node, blobs, note_use_after_ms(node))
}

/// Of `blobs`, those recorded whose last recorded use is at least
/// `after` milliseconds old.
pub fn used_before(
    node: &Node,
    blobs: impl IntoIterator<Item = BlobKey>,
    after: u64,
) -> Vec<BlobKey> {
    let model = node.model();
    let now = model.clock_ms();
    blobs
        .into_iter()
        .filter(|key| {
            model
                .blob_last_used_ms(key)
                .is_some_and(|last| last.saturating_add(after) <= now)
        })
        .collect()
}

/// Records through Raft that `blobs` and `action_results` were used now,
/// so collection keeps what clients keep using; in entries of a bounded
/// size, nothing proposed when there is nothing to record.
pub async fn note_used(
    node: &Node,
    blobs: Vec<BlobKey>,
    action_results: Vec<(String, BlobKey)>,
) -> Result<(), Status> {
    let mut action_results = Some(action_results).filter(|a| !a.is_empty());
    for chunk in blobs.chunks(MAX_USED_PER_ENTRY) {
        node.propose(Command::Used {
            blobs: chunk.to_vec(),
            action_results: action_results.take().unwrap_or_default(),
            now_ms: node.now_ms(),
        })
        .await?;
    }
    if let Some(action_results) = action_results {
        node.propose(Command::Used {
            blobs: Vec::new(),
            action_results,
            now_ms: node.now_ms(),
        })
        .await?;
    }
    Ok(())
}

/// A blob named by a ByteStream resource, and the instance it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub instance_name: String,
    pub key: BlobKey,
    pub size: u64,
}

/// Most characters of a resource name.
const MAX_RESOURCE_CHARS: usize = 4096;

/// Parses `{instance}/blobs/{function/}{hash}/{size}` (a read) or
/// `{instance}/uploads/{uuid}/blobs/{function/}{hash}/{size}{/metadata}`
/// (a write): the instance is every segment before `blobs` (or
/// `uploads`), the optional function is lowercase (`sha256`, `sha1`).
pub fn parse_resource(name: &str, upload: bool) -> Result<Resource, Status> {
    let bad = |why: &str| {
        let shown: String = name.chars().take(200).collect();
        Status::invalid_argument(format!("resource name {shown:?}: {why}"))
    };
    if name.chars().count() > MAX_RESOURCE_CHARS {
        return Err(bad(&format!("longer than {MAX_RESOURCE_CHARS} characters")));
    }
    let segments: Vec<&str> = name.split('/').collect();
    let marker = if upload { "uploads" } else { "blobs" };
    let Some(at) = segments.iter().position(|s| *s == marker) else {
        return Err(bad(&format!("no \"{marker}\" segment")));
    };
    let instance_name = segments[..at].join("/");
    let mut rest = &segments[at + 1..];
    if upload {
        match rest {
            [uuid, "blobs", tail @ ..] if !uuid.is_empty() => rest = tail,
            _ => return Err(bad("expected uploads/{uuid}/blobs/...")),
        }
    }
    let (function, hash, size) = match rest {
        [function @ ("sha256" | "sha1"), hash, size, ..] => (Some(*function), *hash, *size),
        [hash, size, ..] => (None, *hash, *size),
        _ => return Err(bad("expected .../blobs/{hash}/{size}")),
    };
    let function = match function {
        Some("sha1") => HashFunction::Sha1,
        Some(_) => HashFunction::Sha256,
        None if hash.len() == 40 => HashFunction::Sha1,
        None => HashFunction::Sha256,
    };
    let key = BlobKey::parse(function, hash).map_err(|e| bad(&e.to_string()))?;
    let size = size
        .parse::<u64>()
        .map_err(|_| bad(&format!("size {size:?} is not a number of bytes")))?;
    Ok(Resource {
        instance_name,
        key,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const H1: &str = "a9993e364706816aba3e25717850c26c9cd0d89d";

    #[test]
    fn resource_names_are_parsed_as_the_spec_writes_them() {
        let ok: &[(&str, bool, &str, HashFunction, u64)] = &[
            (
                &format!("blobs/{H256}/3"),
                false,
                "",
                HashFunction::Sha256,
                3,
            ),
            (
                &format!("main/x/blobs/{H256}/3"),
                false,
                "main/x",
                HashFunction::Sha256,
                3,
            ),
            (
                &format!("i/blobs/sha1/{H1}/3"),
                false,
                "i",
                HashFunction::Sha1,
                3,
            ),
            (&format!("blobs/{H1}/3"), false, "", HashFunction::Sha1, 3),
            (
                &format!("uploads/u-1/blobs/{H256}/3"),
                true,
                "",
                HashFunction::Sha256,
                3,
            ),
            (
                &format!("i/uploads/u-1/blobs/sha256/{H256}/3/meta/data"),
                true,
                "i",
                HashFunction::Sha256,
                3,
            ),
        ];
        for (name, upload, instance, function, size) in ok {
            let parsed = parse_resource(name, *upload).expect(name);
            assert_eq!(parsed.instance_name, *instance, "{name}");
            assert_eq!(parsed.key.function(), *function, "{name}");
            assert_eq!(parsed.size, *size, "{name}");
        }
        let bad: &[(&str, bool, &str)] = &[
            ("", false, "no \"blobs\" segment"),
            (
                &format!("blobs/{H256}"),
                false,
                "expected .../blobs/{hash}/{size}",
            ),
            (
                &format!("blobs/{H256}/-1"),
                false,
                "size \"-1\" is not a number",
            ),
            (
                &format!("blobs/{}/1", &H256[..60]),
                false,
                "is not a SHA-256 hash",
            ),
            (
                &format!("blobs/sha1/{H256}/1"),
                false,
                "is not a SHA-1 hash",
            ),
            (
                &format!("uploads/blobs/{H256}/1"),
                true,
                "expected uploads/{uuid}/blobs",
            ),
            (&format!("blobs/{H256}/1"), true, "no \"uploads\" segment"),
        ];
        for (name, upload, says) in bad {
            let status = parse_resource(name, *upload).expect_err(name);
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name}");
            assert!(
                status.message().contains(says),
                "{name}: {}",
                status.message()
            );
        }
    }

    #[test]
    fn the_function_is_the_requests_or_the_hashs_length() {
        use re::digest_function::Value;
        assert_eq!(function_of(0, H256).ok(), Some(HashFunction::Sha256));
        assert_eq!(function_of(0, H1).ok(), Some(HashFunction::Sha1));
        assert_eq!(
            function_of(Value::Sha1 as i32, H1).ok(),
            Some(HashFunction::Sha1)
        );
        let md5 = function_of(Value::Md5 as i32, "x").expect_err("not offered");
        assert_eq!(md5.code(), tonic::Code::InvalidArgument);
        assert!(
            md5.message().contains("MD5 is not offered"),
            "{}",
            md5.message()
        );
        let digest = re::Digest {
            hash: H256.into(),
            size_bytes: -1,
        };
        let negative = key_of(Some(&digest), 0, "blob_digests[0]").expect_err("negative");
        assert_eq!(negative.message(), "blob_digests[0]: size -1 is negative");
        assert!(is_empty_blob(&HashFunction::Sha256.key_of(b""), 0));
    }
}
