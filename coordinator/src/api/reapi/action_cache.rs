//! `ActionCache`: action results by (instance name, action digest), kept
//! in the replicated state. A client may store results of actions it ran
//! itself (`UpdateActionResult`, Bazel with `--remote_cache` alone); a
//! result is stored only when every blob it names is in the CAS, and
//! served only while they all still are. The files of an output directory
//! are named by its Tree blob alone; they are read out of it when the
//! result is stored and count as the result's blobs like the rest.

use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use distbuild_model::Command;
use distbuild_proto::{BlobKey, text};
use prost::Message as _;
use re::action_cache_server::ActionCache;
use tonic::{Request, Response, Status};

use super::{holds, key_of, note_use_after_ms, note_used, stale_blobs};
use crate::api::rate::{CallerRates, client_name};
use crate::replica::Node;

/// Largest encoded `ActionResult` stored: it becomes one Raft entry, and
/// no entry may be big (the submit's parts are bounded the same). Outputs
/// are named by digest, so only an action with a few thousand outputs
/// comes near it.
pub const MAX_ACTION_RESULT_BYTES: usize = 256 << 10;

/// Most blobs one result may name.
pub const MAX_RESULT_BLOBS: usize = 100_000;

/// The ActionCache service.
pub struct ActionCacheService {
    pub node: Arc<Node>,
    pub rates: CallerRates,
}

/// The blobs `result` names, each checked: output files, output
/// directories' trees, stdout and stderr.
pub fn named_blobs(
    result: &re::ActionResult,
    digest_function: i32,
) -> Result<Vec<(BlobKey, u64)>, Status> {
    let mut blobs = Vec::new();
    for (i, file) in result.output_files.iter().enumerate() {
        blobs.push(key_of(
            file.digest.as_ref(),
            digest_function,
            &format!("action_result.output_files[{i}].digest"),
        )?);
    }
    for (i, dir) in result.output_directories.iter().enumerate() {
        blobs.push(key_of(
            dir.tree_digest.as_ref(),
            digest_function,
            &format!("action_result.output_directories[{i}].tree_digest"),
        )?);
    }
    for (digest, what) in [
        (&result.stdout_digest, "action_result.stdout_digest"),
        (&result.stderr_digest, "action_result.stderr_digest"),
    ] {
        if digest.is_some() {
            blobs.push(key_of(digest.as_ref(), digest_function, what)?);
        }
    }
    if blobs.len() > MAX_RESULT_BLOBS {
        return Err(too_many_blobs(blobs.len()));
    }
    blobs.sort_unstable();
    blobs.dedup();
    Ok(blobs)
}

/// Most bytes of output directories' Tree blobs read for the files they
/// name, all of one result's trees together, each distinct tree once (a
/// tree of 100,000 files, the most a result may name, is about this).
pub const MAX_TREE_BYTES: u64 = 16 << 20;

/// The blobs `result` names (see [`named_blobs`]) and the files in its
/// output directories' trees, which the CAS holds: collection then keeps
/// them with the result, and a result is served only while they are all
/// still there. A tree the CAS does not hold adds nothing (the result
/// names the tree, so it is not served without it).
pub async fn result_blobs(
    node: &Node,
    result: &re::ActionResult,
    digest_function: i32,
) -> Result<Vec<(BlobKey, u64)>, Status> {
    let mut blobs = named_blobs(result, digest_function)?;
    let mut read = std::collections::BTreeSet::new();
    let mut read_bytes = 0u64;
    for (i, dir) in result.output_directories.iter().enumerate() {
        let what = format!("action_result.output_directories[{i}]");
        let (key, size) = key_of(
            dir.tree_digest.as_ref(),
            digest_function,
            &format!("{what}.tree_digest"),
        )?;
        if !read.insert(key) {
            continue;
        }
        read_bytes += size;
        if read_bytes > MAX_TREE_BYTES {
            return Err(Status::invalid_argument(format!(
                "{what}: the result's trees are over {MAX_TREE_BYTES} bytes in all, the most read for the files they name"
            )));
        }
        let Some(bytes) = super::cas::read_whole(node, key, size).await? else {
            continue;
        };
        let tree = re::Tree::decode(bytes.as_slice()).map_err(|e| {
            Status::invalid_argument(format!("{what}: blobs/{key}/{size} is not a Tree: {e}"))
        })?;
        for directory in tree.root.iter().chain(&tree.children) {
            for file in &directory.files {
                blobs.push(key_of(
                    file.digest.as_ref(),
                    digest_function,
                    &format!("{what}: file {:?}", text::shortened(&file.name, 256)),
                )?);
            }
            if blobs.len() > MAX_RESULT_BLOBS {
                return Err(too_many_blobs(blobs.len()));
            }
        }
    }
    blobs.sort_unstable();
    blobs.dedup();
    Ok(blobs)
}

fn too_many_blobs(count: usize) -> Status {
    Status::invalid_argument(format!(
        "the action result names {count} blobs, over the limit of {MAX_RESULT_BLOBS}"
    ))
}

/// The blobs of `blobs` the CAS does not hold (the empty blob it always
/// does).
fn missing(node: &Node, blobs: &[(BlobKey, u64)]) -> Vec<(BlobKey, u64)> {
    let model = node.model();
    blobs
        .iter()
        .filter(|(key, size)| !holds(&model, key, *size))
        .copied()
        .collect()
}

/// The cached result of `action` in `instance_name`, if there is one the
/// CAS still holds every blob of; serving it counts as a use of it and of
/// its blobs.
pub async fn served_result(
    node: &Node,
    instance_name: &str,
    action: BlobKey,
) -> Result<Option<re::ActionResult>, Status> {
    let after = note_use_after_ms(node);
    let stored = {
        let model = node.model();
        model.action_result(instance_name, &action).map(|r| {
            let stale = r.last_used_ms.saturating_add(after) <= model.clock_ms();
            (r.result.clone(), r.blobs.clone(), stale)
        })
    };
    let Some((bytes, blobs, stale)) = stored else {
        return Ok(None);
    };
    if !missing(node, &blobs).is_empty() {
        // Its outputs were collected: the client runs the action again.
        return Ok(None);
    }
    let stale_blobs = stale_blobs(node, blobs.iter().map(|(key, _)| *key));
    let results = if stale {
        vec![(instance_name.to_string(), action)]
    } else {
        Vec::new()
    };
    note_used(node, stale_blobs, results).await?;
    let result = re::ActionResult::decode(bytes.as_slice())
        .map_err(|e| Status::internal(format!("stored result of {action}: {e}")))?;
    Ok(Some(result))
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<re::GetActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        let request = request.into_inner();
        let (action, _) = key_of(
            request.action_digest.as_ref(),
            request.digest_function,
            "action_digest",
        )?;
        self.node.ready_leader().await?;
        match served_result(&self.node, &request.instance_name, action).await? {
            Some(result) => Ok(Response::new(result)),
            None => Err(Status::not_found(format!("no result for action {action}"))),
        }
    }

    async fn update_action_result(
        &self,
        request: Request<re::UpdateActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        let caller = client_name(&request);
        let request = request.into_inner();
        let (action, _) = key_of(
            request.action_digest.as_ref(),
            request.digest_function,
            "action_digest",
        )?;
        let result = request
            .action_result
            .ok_or_else(|| Status::invalid_argument("action_result: missing"))?;
        let bytes = result.encode_to_vec();
        if bytes.len() > MAX_ACTION_RESULT_BYTES {
            return Err(Status::invalid_argument(format!(
                "action_result: {} bytes encoded, over the limit of {MAX_ACTION_RESULT_BYTES}",
                bytes.len()
            )));
        }
        if request.instance_name.chars().count() > 1024 {
            return Err(Status::invalid_argument(
                "instance_name: longer than 1024 characters",
            ));
        }
        let named = named_blobs(&result, request.digest_function)?;
        self.node.ready_leader().await?;
        self.rates.admit(&caller)?;
        // The trees first: their files are read out of them.
        let blobs = match missing(&self.node, &named).first() {
            Some(_) => named,
            None => result_blobs(&self.node, &result, request.digest_function).await?,
        };
        if let Some((key, size)) = missing(&self.node, &blobs).first() {
            return Err(Status::failed_precondition(format!(
                "the action result names blobs/{key}/{size}, which the CAS does not hold; upload it first"
            )));
        }
        self.node
            .propose(Command::ActionResultStored {
                instance_name: request.instance_name,
                action,
                result: bytes,
                blobs,
                now_ms: self.node.now_ms(),
            })
            .await?;
        Ok(Response::new(result))
    }
}
