//! `Execution`: Execute and WaitExecution. An action runs as a one-job
//! build on the same scheduler as distbuild's own jobs (leases, retries,
//! failover, the job time limit): its job carries the action
//! (`distbuild_model::RemoteAction`) and a cache key derived from the
//! instance name and the action digest, so callers executing the same
//! action at once share one execution (unless it says `do_not_cache`).
//! The operation's name is the build's ID, which every replica knows: a
//! caller whose stream broke in a failover asks the new leader with
//! WaitExecution and follows the same run.
//!
//! Everything the action names is checked before it is queued: the Action
//! and Command decode, the input tree and its files are in the CAS (else
//! FAILED_PRECONDITION with a `PreconditionFailure` naming each missing
//! blob `blobs/<hash>/<size>`), some worker offers its platform (else
//! FAILED_PRECONDITION naming the property), its timeout is within the
//! cluster's. A command that ran is a result with its exit code; only a
//! run that could not happen is an error, in `ExecuteResponse.status`.

use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::longrunning::{Operation, operation};
use bazel_remote_apis::google::protobuf::Any;
use bazel_remote_apis::google::rpc::Status as RpcStatus;
use distbuild_model::{self as model, Command, Event, JobSpec, RemoteAction, SubmittedJob};
use distbuild_proto::{BlobKey, Digest, HashFunction, JobId, text};
use prost::Message;
use sha1::Digest as _;
use tonic::{Code, Request, Response, Status};

use super::action_cache::served_result;
use super::cas::{read_whole, walk_tree};
use super::{MAX_BATCH_TOTAL_BYTES, digest_of, holds, key_of, note_used, used_before};
use crate::api::ResponseStream;
use crate::api::rate::{CallerRates, client_name};
use crate::api::status::busy;
use crate::api::status::refusal;
use crate::replica::Node;

/// Largest Action or Command message read.
pub const MAX_MESSAGE_BLOB_BYTES: u64 = MAX_BATCH_TOTAL_BYTES;

/// Most platform properties an action may ask for.
pub const MAX_PLATFORM_PROPERTIES: usize = 64;

/// Most missing blobs one FAILED_PRECONDITION lists: the details travel in
/// a trailer, and gRPC clients refuse metadata past 8 KiB (grpc-java's
/// default), which 40 violations stay well under. The client uploads
/// them and asks again; the rest show up then.
const MAX_VIOLATIONS: usize = 40;

/// Most actions whose inputs one node checks at once.
pub const MAX_CHECKS_AT_ONCE: usize = 8;

/// Most operation streams one node serves at once (every Execute and
/// WaitExecution holds one while its action runs).
pub const MAX_OPERATION_STREAMS: usize = 4096;

/// An action's inputs whose last recorded use is older than this are
/// recorded as used again when it is executed: collection keeps anything
/// used in the last ten minutes, so what a queued action needs stays at
/// least five minutes after its Execute.
const INPUT_USE_REFRESH_MS: u64 = distbuild_model::RECENT_BLOB_MS / 2;

/// Operation names are this prefix and the build's ID.
const OPERATION_PREFIX: &str = "operations/";

/// The versioned domain of an action's cache key.
const ACTION_KEY_DOMAIN: &[u8] = b"distbuild remote action v1\0";

const METADATA_TYPE: &str =
    "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteOperationMetadata";
const RESPONSE_TYPE: &str = "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse";
const PRECONDITION_FAILURE_TYPE: &str = "type.googleapis.com/google.rpc.PreconditionFailure";

/// `google.rpc.PreconditionFailure`, which the generated crate lacks.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PreconditionFailure {
    #[prost(message, repeated, tag = "1")]
    pub violations: Vec<Violation>,
}

/// One `PreconditionFailure.Violation`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Violation {
    #[prost(string, tag = "1")]
    pub r#type: String,
    #[prost(string, tag = "2")]
    pub subject: String,
    #[prost(string, tag = "3")]
    pub description: String,
}

/// The Execution service.
pub struct ExecutionService {
    pub node: Arc<Node>,
    pub rates: CallerRates,
    /// Bounds the operation streams open on this node
    /// ([`MAX_OPERATION_STREAMS`] permits).
    pub streams: Arc<tokio::sync::Semaphore>,
    /// Bounds the actions being checked at once ([`MAX_CHECKS_AT_ONCE`]
    /// permits; more wait): each may read up to 64 MiB of directories.
    pub checks: Arc<tokio::sync::Semaphore>,
}

/// The subject naming a blob in a violation, as the spec writes it.
fn blob_subject(key: &BlobKey, size: u64) -> String {
    format!("blobs/{key}/{size}")
}

/// FAILED_PRECONDITION listing `missing` blobs as MISSING violations.
fn missing_blobs(missing: &[(BlobKey, u64)]) -> Status {
    let failure = PreconditionFailure {
        violations: missing
            .iter()
            .take(MAX_VIOLATIONS)
            .map(|(key, size)| Violation {
                r#type: "MISSING".into(),
                subject: blob_subject(key, *size),
                description: String::new(),
            })
            .collect(),
    };
    let message = format!(
        "{} blob(s) the action needs are not in the CAS, the first {}",
        missing.len(),
        blob_subject(&missing[0].0, missing[0].1)
    );
    let details = RpcStatus {
        code: Code::FailedPrecondition as i32,
        message: message.clone(),
        details: vec![Any {
            type_url: PRECONDITION_FAILURE_TYPE.into(),
            value: failure.encode_to_vec(),
        }],
    };
    Status::with_details(
        Code::FailedPrecondition,
        message,
        details.encode_to_vec().into(),
    )
}

/// Decodes a message stored in the CAS; `what` names it.
async fn read_message<M: Message + Default>(
    node: &Node,
    (key, size): (BlobKey, u64),
    what: &str,
    missing: &mut Vec<(BlobKey, u64)>,
) -> Result<Option<M>, Status> {
    if size > MAX_MESSAGE_BLOB_BYTES {
        return Err(Status::invalid_argument(format!(
            "the {what} is {size} bytes, over the limit of {MAX_MESSAGE_BLOB_BYTES}"
        )));
    }
    let Some(bytes) = read_whole(node, key, size).await? else {
        missing.push((key, size));
        return Ok(None);
    };
    M::decode(bytes.as_slice())
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("blob {key} is not a {what}: {e}")))
}

/// The wire number of a digest function.
fn function_number(function: HashFunction) -> i32 {
    match function {
        HashFunction::Sha256 => re::digest_function::Value::Sha256 as i32,
        HashFunction::Sha1 => re::digest_function::Value::Sha1 as i32,
    }
}

/// The platform an action asks for: `Action.platform` (API 2.2), else
/// `Command.platform` (older clients; Bazel 4 sets both), sorted, checked.
// Command.platform is deprecated in 2.2; clients before it set only that.
#[allow(deprecated)]
fn platform_of(
    action: &re::Action,
    command: &re::Command,
) -> Result<Vec<(String, String)>, Status> {
    let platform = action
        .platform
        .as_ref()
        .filter(|p| !p.properties.is_empty())
        .or(command.platform.as_ref());
    let properties = platform.map_or(&[][..], |p| &p.properties[..]);
    if properties.len() > MAX_PLATFORM_PROPERTIES {
        return Err(Status::invalid_argument(format!(
            "the platform has {} properties, over the limit of {MAX_PLATFORM_PROPERTIES}",
            properties.len()
        )));
    }
    let mut pairs = Vec::with_capacity(properties.len());
    for property in properties {
        use distbuild_proto::wire::{MAX_PROPERTY_NAME_CHARS, MAX_PROPERTY_VALUE_CHARS};
        for (what, text, max) in [
            ("name", &property.name, MAX_PROPERTY_NAME_CHARS),
            ("value", &property.value, MAX_PROPERTY_VALUE_CHARS),
        ] {
            if text.chars().count() > max {
                return Err(Status::invalid_argument(format!(
                    "platform property {what} {:?} is over {max} characters",
                    text::shortened(text, 80),
                )));
            }
        }
        pairs.push((property.name.clone(), property.value.clone()));
    }
    pairs.sort();
    pairs.dedup();
    Ok(pairs)
}

/// FAILED_PRECONDITION when no registered worker offers every property
/// of `platform`, naming the first no worker has (or, when each is
/// offered by some worker, the whole set no one worker has).
fn check_satisfiable(node: &Node, platform: &[(String, String)]) -> Result<(), Status> {
    if platform.is_empty() {
        return Ok(());
    }
    let model = node.model();
    let workers = model.workers();
    let fits = |w: &model::Worker| {
        platform
            .iter()
            .all(|p| w.properties.binary_search(p).is_ok())
    };
    if workers.values().any(fits) {
        return Ok(());
    }
    let unoffered = platform.iter().find(|p| {
        !workers
            .values()
            .any(|w| w.properties.binary_search(p).is_ok())
    });
    let message = match unoffered {
        Some((name, value)) => format!(
            "no worker offers platform property {}={} (workers take --property KEY=VALUE)",
            text::shortened(name, 200),
            text::shortened(value, 200)
        ),
        None => format!(
            "no one worker offers all of the platform properties {}",
            text::shortened(
                &platform
                    .iter()
                    .map(|(n, v)| format!("{n}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
                400
            )
        ),
    };
    Err(Status::failed_precondition(message))
}

/// The cache key of an action's execution: shared by every caller of the
/// same action in the same instance, unless the action may not be merged
/// (`do_not_cache`), when it is this request's own.
fn execution_key(instance_name: &str, action: &BlobKey, size: u64, own: Option<&str>) -> Digest {
    let mut hasher = sha1::Sha1::new();
    hasher.update(ACTION_KEY_DOMAIN);
    for part in [
        instance_name.as_bytes(),
        action.function().name().as_bytes(),
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.update(action.hash_bytes());
    hasher.update(size.to_be_bytes());
    if let Some(own) = own {
        hasher.update(own.as_bytes());
    }
    Digest::from_bytes(hasher.finalize().into())
}

/// An operation's name for build `build_id`, and back.
fn operation_name(build_id: u64) -> String {
    format!("{OPERATION_PREFIX}{build_id}")
}

fn build_of(name: &str) -> Result<u64, Status> {
    name.strip_prefix(OPERATION_PREFIX)
        .and_then(|id| id.parse::<u64>().ok())
        .ok_or_else(|| {
            Status::not_found(format!(
                "no operation {:?}: this server names operations {OPERATION_PREFIX}<number>",
                text::shortened(name, 200)
            ))
        })
}

fn pack(type_url: &str, message: &impl Message) -> Any {
    Any {
        type_url: type_url.into(),
        value: message.encode_to_vec(),
    }
}

/// An operation in `stage`, not done.
fn in_stage(name: &str, stage: re::execution_stage::Value, action: &re::Digest) -> Operation {
    Operation {
        name: name.into(),
        metadata: Some(pack(
            METADATA_TYPE,
            &re::ExecuteOperationMetadata {
                stage: stage as i32,
                action_digest: Some(action.clone()),
                ..Default::default()
            },
        )),
        done: false,
        result: None,
    }
}

/// The finished operation answering with `response`.
fn finished(name: &str, action: &re::Digest, response: re::ExecuteResponse) -> Operation {
    let mut operation = in_stage(name, re::execution_stage::Value::Completed, action);
    operation.done = true;
    operation.result = Some(operation::Result::Response(pack(RESPONSE_TYPE, &response)));
    operation
}

/// The status of a run that could not happen, from the worker's or the
/// scheduler's one-line reason.
fn run_error(error: &str) -> RpcStatus {
    let (code, details) = if let Some(subject) = error.strip_prefix("missing from the CAS: ") {
        let failure = PreconditionFailure {
            violations: vec![Violation {
                r#type: "MISSING".into(),
                subject: subject.into(),
                description: String::new(),
            }],
        };
        (
            Code::FailedPrecondition,
            vec![pack(PRECONDITION_FAILURE_TYPE, &failure)],
        )
    } else if error.starts_with("timed out after") {
        (Code::DeadlineExceeded, Vec::new())
    } else {
        (Code::Internal, Vec::new())
    };
    RpcStatus {
        code: code as i32,
        message: error.to_string(),
        details,
    }
}

/// Follows build `build_id`'s events, turning them into the operation's
/// updates; ends with the finished operation.
struct Follower {
    node: Arc<Node>,
    name: String,
    build_id: u64,
    action: re::Digest,
    next_seq: u64,
    last_applied: Option<u64>,
    done: bool,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Follower {
    /// The next update, or None when the operation finished.
    async fn next(&mut self) -> Option<Result<Operation, Status>> {
        if self.done {
            return None;
        }
        let update = self.read().await;
        self.done = !matches!(&update, Ok(op) if !op.done);
        Some(update)
    }

    async fn read(&mut self) -> Result<Operation, Status> {
        loop {
            let page = self
                .node
                .read_events(self.build_id, self.next_seq, 1, 1 << 20)?;
            // One event at a time: each is an update of its own.
            if let Some(stored) = page.into_iter().next() {
                self.next_seq = stored.seq + 1;
                match stored.event {
                    Event::JobStarted { .. } => {
                        return Ok(in_stage(
                            &self.name,
                            re::execution_stage::Value::Executing,
                            &self.action,
                        ));
                    }
                    Event::JobFinished { error, .. } => {
                        let output = stored.output.unwrap_or_default();
                        let response = match error {
                            Some(error) => re::ExecuteResponse {
                                status: Some(run_error(&error)),
                                message: error,
                                ..Default::default()
                            },
                            None if output.action_result.is_empty() => re::ExecuteResponse {
                                status: Some(run_error(
                                    "the run ended with no action result (a worker that does not run Remote Execution API actions?)",
                                )),
                                ..Default::default()
                            },
                            None => {
                                let result =
                                    re::ActionResult::decode(output.action_result.as_slice())
                                        .map_err(|e| {
                                            Status::internal(format!(
                                                "the result of {}: {e}",
                                                self.name
                                            ))
                                        })?;
                                re::ExecuteResponse {
                                    result: Some(result),
                                    ..Default::default()
                                }
                            }
                        };
                        return Ok(finished(&self.name, &self.action, response));
                    }
                    Event::JobSkipped { reason, .. } => {
                        return Ok(self.cancelled(reason));
                    }
                    Event::BuildFinished { error, .. } => {
                        // Finished without its job finishing: cancelled.
                        return Ok(self.cancelled(error.unwrap_or_default()));
                    }
                }
            }
            // The caller asks the new leader (WaitExecution) after a
            // failover.
            self.node.check_leader()?;
            if self.node.model().build(self.build_id).is_none() {
                return Err(Status::not_found(format!(
                    "operation {} was retired before it was read to the end; execute the action again",
                    self.name
                )));
            }
            if self.node.shutdown_token().is_cancelled() {
                return Err(Status::unavailable(
                    "the coordinator is stopping; reconnect",
                ));
            }
            self.node
                .wait_for_change(&mut self.last_applied, std::time::Duration::from_secs(1))
                .await;
        }
    }

    fn cancelled(&self, reason: String) -> Operation {
        finished(
            &self.name,
            &self.action,
            re::ExecuteResponse {
                status: Some(RpcStatus {
                    code: Code::Cancelled as i32,
                    message: reason,
                    details: Vec::new(),
                }),
                ..Default::default()
            },
        )
    }
}

impl ExecutionService {
    /// A stream's place among this node's, or RESOURCE_EXHAUSTED with a
    /// retry hint. Taken before an action is submitted, so a refused call
    /// has started nothing.
    fn admit_stream(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.streams.clone().try_acquire_owned().map_err(|_| {
            busy(
                format!(
                    "this coordinator already streams {MAX_OPERATION_STREAMS} operations, its limit; retry later"
                ),
                std::time::Duration::from_millis(500),
            )
        })
    }

    /// The stream of updates of the operation of build `build_id`,
    /// starting with `first` when given.
    fn follow(
        &self,
        build_id: u64,
        action: re::Digest,
        first: Option<Operation>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> ResponseStream<Operation> {
        let follower = Follower {
            node: self.node.clone(),
            name: operation_name(build_id),
            build_id,
            action,
            next_seq: 0,
            last_applied: None,
            done: false,
            _permit: permit,
        };
        let first = futures::stream::iter(first.map(Ok));
        let rest = futures::stream::unfold(follower, |mut follower| async move {
            let update = follower.next().await?;
            Some((update, follower))
        });
        Box::pin(futures::StreamExt::chain(first, rest))
    }

    /// The time limit of the action's run, from `Action.timeout`.
    fn timeout_ms(
        &self,
        timeout: Option<&bazel_remote_apis::google::protobuf::Duration>,
    ) -> Result<u64, Status> {
        let tuning = self.node.tuning();
        let Some(timeout) = timeout.filter(|t| t.seconds != 0 || t.nanos != 0) else {
            return Ok(tuning.default_job_timeout_ms);
        };
        if timeout.seconds < 0 || timeout.nanos < 0 {
            return Err(Status::invalid_argument("the action's timeout is negative"));
        }
        let ms = (timeout.seconds as u64)
            .saturating_mul(1000)
            .saturating_add(timeout.nanos as u64 / 1_000_000)
            .max(1);
        if ms > tuning.max_job_timeout_ms {
            return Err(Status::invalid_argument(format!(
                "the action's timeout of {} s is more than this cluster allows (--max-job-timeout {} s)",
                timeout.seconds,
                tuning.max_job_timeout_ms / 1000
            )));
        }
        Ok(ms)
    }
}

#[tonic::async_trait]
impl re::execution_server::Execution for ExecutionService {
    type ExecuteStream = ResponseStream<Operation>;

    async fn execute(
        &self,
        request: Request<re::ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        self.rates.admit(&client_name(&request))?;
        let request = request.into_inner();
        let (action_key, action_size) = key_of(
            request.action_digest.as_ref(),
            request.digest_function,
            "action_digest",
        )?;
        // Everything the action names is digested as it is.
        let function = function_number(action_key.function());
        let action_digest = digest_of(&action_key, action_size);
        if request.instance_name.len() > super::MAX_INSTANCE_NAME_BYTES {
            return Err(Status::invalid_argument(format!(
                "instance_name is over {} bytes",
                super::MAX_INSTANCE_NAME_BYTES
            )));
        }
        self.node.ready_leader().await?;

        if !request.skip_cache_lookup
            && let Some(result) =
                served_result(&self.node, &request.instance_name, action_key).await?
        {
            let op = finished(
                &format!("{OPERATION_PREFIX}cached/{action_key}"),
                &action_digest,
                re::ExecuteResponse {
                    result: Some(result),
                    cached_result: true,
                    ..Default::default()
                },
            );
            return Ok(Response::new(Box::pin(futures::stream::iter([Ok(op)]))));
        }

        let checking = self
            .checks
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the coordinator is stopping; retry"))?;
        let mut missing = Vec::new();
        let Some(action) = read_message::<re::Action>(
            &self.node,
            (action_key, action_size),
            "Action",
            &mut missing,
        )
        .await?
        else {
            return Err(missing_blobs(&missing));
        };
        let command_key = key_of(
            action.command_digest.as_ref(),
            function,
            "action.command_digest",
        )?;
        let root_key = key_of(
            action.input_root_digest.as_ref(),
            function,
            "action.input_root_digest",
        )?;
        let command =
            read_message::<re::Command>(&self.node, command_key, "Command", &mut missing).await?;
        let tree = walk_tree(&self.node, root_key, function).await?;
        missing.extend(tree.missing);
        let mut files = Vec::new();
        for directory in &tree.directories {
            for (i, file) in directory.files.iter().enumerate() {
                files.push(key_of(
                    file.digest.as_ref(),
                    function,
                    &format!(
                        "input file {}: files[{i}].digest",
                        text::shortened(&file.name, 200)
                    ),
                )?);
            }
        }
        {
            let model = self.node.model();
            missing.extend(
                files
                    .iter()
                    .filter(|(key, size)| !holds(&model, key, *size)),
            );
        }
        let Some(command) = command.filter(|_| missing.is_empty()) else {
            missing.sort_unstable();
            missing.dedup();
            return Err(missing_blobs(&missing));
        };
        if command.arguments.is_empty() {
            return Err(Status::invalid_argument("the command has no arguments"));
        }
        let platform = platform_of(&action, &command)?;
        check_satisfiable(&self.node, &platform)?;
        let job_timeout_ms = self.timeout_ms(action.timeout.as_ref())?;
        drop(checking);
        let permit = self.admit_stream()?;
        // Found and about to be used: their use counts for collection.
        let mut inputs: Vec<BlobKey> = files
            .iter()
            .map(|(key, _)| *key)
            .chain([action_key, command_key.0, root_key.0])
            .collect();
        inputs.sort_unstable();
        inputs.dedup();
        let stale = used_before(&self.node, inputs, INPUT_USE_REFRESH_MS);
        note_used(&self.node, stale, Vec::new()).await?;

        let request_id = format!("reapi/{:032x}", distbuild_proto::rng::next_u128());
        let own = action.do_not_cache.then_some(request_id.as_str());
        let cache_key = execution_key(&request.instance_name, &action_key, action_size, own);
        let job = SubmittedJob {
            cache_key,
            deps: Vec::new(),
            spec: JobSpec {
                job_id: JobId::from_bytes(*cache_key.as_bytes()),
                name: format!("action {action_key}"),
                cmds: Vec::new(),
                inputs: Vec::new(),
                deps: Vec::new(),
                action: Some(Box::new(RemoteAction {
                    instance_name: request.instance_name.clone(),
                    action: action_key,
                    action_size,
                    do_not_cache: action.do_not_cache,
                    platform,
                })),
            },
        };
        let response = self
            .node
            .propose(Command::SubmitBuild {
                request_id,
                now_ms: self.node.now_ms(),
                staged_parts: 0,
                jobs: vec![job],
                job_timeout_ms,
            })
            .await?;
        let build_id = match response {
            model::Response::BuildSubmitted { build_id, .. } => build_id,
            other => return Err(refusal(other)),
        };
        let queued = in_stage(
            &operation_name(build_id),
            re::execution_stage::Value::Queued,
            &action_digest,
        );
        Ok(Response::new(self.follow(
            build_id,
            action_digest,
            Some(queued),
            permit,
        )))
    }

    type WaitExecutionStream = ResponseStream<Operation>;

    async fn wait_execution(
        &self,
        request: Request<re::WaitExecutionRequest>,
    ) -> Result<Response<Self::WaitExecutionStream>, Status> {
        let name = request.into_inner().name;
        let build_id = build_of(&name)?;
        self.node.ready_leader().await?;
        let action = {
            let model = self.node.model();
            model
                .build(build_id)
                .and_then(|b| b.jobs.first())
                .and_then(|j| j.spec.action.clone())
        };
        let Some(action) = action else {
            return Err(Status::not_found(format!(
                "no operation {:?} (finished long ago, or never started)",
                text::shortened(&name, 200)
            )));
        };
        let digest = digest_of(&action.action, action.action_size);
        let permit = self.admit_stream()?;
        Ok(Response::new(self.follow(build_id, digest, None, permit)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execution_keys_merge_the_same_action_only() {
        let a = HashFunction::Sha256.key_of(b"action");
        let b = HashFunction::Sha256.key_of(b"other");
        let key = execution_key("main", &a, 10, None);
        assert_eq!(key, execution_key("main", &a, 10, None));
        assert_ne!(key, execution_key("other", &a, 10, None), "instance");
        assert_ne!(key, execution_key("main", &b, 10, None), "action");
        assert_ne!(key, execution_key("main", &a, 11, None), "size");
        assert_ne!(
            key,
            execution_key("main", &a, 10, Some("op-1")),
            "unmergeable"
        );
        // The function is part of the key.
        let sha1 = HashFunction::Sha1.key_of(b"action");
        assert_ne!(
            execution_key("main", &sha1, 10, None),
            execution_key("main", &a, 10, None)
        );
    }

    #[test]
    fn operation_names_round_trip_and_others_are_not_found() {
        assert_eq!(build_of(&operation_name(42)).unwrap(), 42);
        for bad in ["", "42", "operations/", "operations/x", "operations/-1"] {
            assert_eq!(build_of(bad).unwrap_err().code(), Code::NotFound, "{bad:?}");
        }
    }

    #[test]
    fn run_errors_map_to_the_spec_s_codes() {
        let missing = run_error("missing from the CAS: blobs/abc/3");
        assert_eq!(missing.code, Code::FailedPrecondition as i32);
        let failure = PreconditionFailure::decode(missing.details[0].value.as_slice()).unwrap();
        assert_eq!(failure.violations[0].r#type, "MISSING");
        assert_eq!(failure.violations[0].subject, "blobs/abc/3");
        assert_eq!(
            run_error("timed out after 5 s: its processes were killed").code,
            Code::DeadlineExceeded as i32
        );
        assert_eq!(run_error("disk full").code, Code::Internal as i32);
    }
}
