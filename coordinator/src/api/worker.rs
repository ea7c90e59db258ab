//! The worker API: registration, work assignment by long poll, lease
//! renewal, results, and source blobs.

use std::sync::Arc;
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use distbuild_proto::Digest;
use distbuild_proto::auth::{Caller, caller};
use distbuild_proto::text;
use distbuild_proto::tls::MAX_NAME_CHARS;
use distbuild_proto::v1::worker_api_server::WorkerApi;
use distbuild_proto::v1::{
    Assignment, BlobChunk, DepArtifact, FetchRequest, HeartbeatRequest, HeartbeatResponse,
    InputFile, LeaveRequest, LeaveResponse, LostInput, PollWorkRequest, PollWorkResponse,
    RegisterRequest, RegisterResponse, RemoteAction, ReportResultRequest, ReportResultResponse,
    UploadBlobResponse,
};
use distbuild_proto::wire::{
    MAX_CACHE_CHANGES_PER_HEARTBEAT, MAX_HELD_PER_REGISTER, MAX_HOLDERS_LISTED,
    MAX_JOB_ERROR_BYTES, MAX_JOB_OUTPUT_BYTES, MAX_REQUEST_ID_CHARS, MAX_TRIED_HOLDERS_PER_REPORT,
    digest_from_wire, digest_to_wire,
};
use tonic::{Request, Response, Status, Streaming};

use super::picks::PicksInFlight;
use super::rate::CallerRates;
use super::rate::client_name;
use super::reapi::action_cache::{MAX_ACTION_RESULT_BYTES, result_blobs};
use super::status::invalid;
use super::{
    KeptBlobBytes, ResponseStream, blob_key_from_wire, digests, store_upload, stream_file,
};
use distbuild_model::{self as model, CmdText, Command, MAX_ASSIGN_BATCH, Outcome};

use crate::replica::Node;

/// Longest a poll waits for work.
const MAX_POLL_WAIT: Duration = Duration::from_secs(10);
/// Most slots a worker may declare.
const MAX_SLOTS: u32 = 1024;
const MAX_ADDR_CHARS: usize = 256;
/// Lost artifacts one report may name (a job's dependencies), holders
/// tried per artifact, and tried holders named in all (a report is one
/// Raft entry).
const MAX_LOST_INPUTS: usize = 10_000;

/// A report's lost inputs, checked: digests, and the holders tried as
/// bounded addresses.
fn lost_inputs(lost: &[LostInput]) -> Result<Vec<(Digest, Vec<String>)>, Status> {
    if lost.len() > MAX_LOST_INPUTS {
        return Err(Status::invalid_argument(format!(
            "lost_inputs names {} artifacts, over the limit of {MAX_LOST_INPUTS}",
            lost.len()
        )));
    }
    let named: usize = lost.iter().map(|input| input.tried_holders.len()).sum();
    if named > MAX_TRIED_HOLDERS_PER_REPORT {
        return Err(Status::invalid_argument(format!(
            "lost_inputs names {named} tried holders in all, over the limit of {MAX_TRIED_HOLDERS_PER_REPORT}"
        )));
    }
    lost.iter()
        .map(|input| {
            let digest = digest_from_wire(&input.digest, "lost_inputs digest")
                .map_err(invalid)?;
            if input.tried_holders.len() > MAX_HOLDERS_LISTED
                || input.tried_holders.iter().any(|a| a.len() > MAX_ADDR_CHARS)
            {
                return Err(Status::invalid_argument(format!(
                    "lost input {digest}: at most {MAX_HOLDERS_LISTED} tried holders of at most {MAX_ADDR_CHARS} characters"
                )));
            }
            Ok((digest, input.tried_holders.clone()))
        })
        .collect()
}

pub struct WorkerService {
    pub node: Arc<Node>,
    /// Per-caller rate bounds on state-changing calls.
    pub rates: CallerRates,
    /// Bytes of blobs being received, bounded with every other upload's.
    pub kept_blob_bytes: Arc<KeptBlobBytes>,
    /// The plan for workers leaving.
    pub drains: Arc<super::drain::Drains>,
    /// Executions picked by calls whose assignments are not applied yet.
    pub picks: PicksInFlight,
}

impl WorkerService {
    /// Checks `worker_id`, that `caller` may act as that worker, and takes
    /// one of its calls from its rate bound.
    fn admit(&self, caller: &Caller, worker_id: &str) -> Result<(), Status> {
        check_worker_id(worker_id)?;
        caller.act_as_worker(worker_id)?;
        self.rates.admit(&format!("worker {worker_id}"))
    }

    /// A worker's `Drain` or `Deregister`: `command` for it, once per
    /// request ID.
    async fn leave(
        &self,
        request: Request<LeaveRequest>,
        kind: &str,
        command: impl FnOnce(String, u64) -> Command,
    ) -> Result<Response<LeaveResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        self.admit(&caller, &req.worker_id)?;
        let request = request_key(kind, &req.worker_id, &req.request_id)?;
        let command = command(req.worker_id.clone(), self.node.now_ms());
        match self.node.propose_request(request, command).await? {
            model::Response::Worker { found: true } => Ok(Response::new(LeaveResponse {})),
            model::Response::Worker { found: false } => Err(Status::not_found(format!(
                "worker {} is not registered",
                req.worker_id
            ))),
            _ => Err(Status::internal(format!("unexpected answer to {kind}"))),
        }
    }
}

/// A worker ID obeys the rule of a certificate's name (a worker's name is
/// its ID).
fn check_worker_id(id: &str) -> Result<(), Status> {
    distbuild_proto::tls::check_name(id).map_err(|_| {
        Status::invalid_argument(format!(
            "worker_id {:?} must be 1 to {MAX_NAME_CHARS} characters of [A-Za-z0-9._-]",
            text::shortened(id, 80)
        ))
    })
}

/// What became of a lease granted to a worker by the time its assignment
/// is written.
enum Leased {
    // Boxed: an assignment is large next to the other cases.
    Assignment(Box<Assignment>),
    /// No longer the worker's (expired, or its result already in).
    Gone,
    /// Still the worker's, but a dependency's result was dropped meanwhile
    /// (its artifact lost): the lease is handed back, to be leased again
    /// once the dependency is rebuilt.
    MissingDependency,
}

impl WorkerService {
    /// The assignments for the leases `tokens` (one per key of `keys`, None
    /// when not leased) granted to `worker_id`. A lease whose assignment
    /// cannot be written any more is released at once rather than left to
    /// expire (which would count an attempt and wait a lease period).
    async fn assignments(
        &self,
        worker_id: &str,
        keys: &[Digest],
        tokens: &[Option<u64>],
    ) -> Vec<Assignment> {
        let mut assignments = Vec::new();
        for (key, token) in keys.iter().zip(tokens) {
            let Some(token) = *token else { continue };
            match self.assignment(worker_id, key, token) {
                Leased::Assignment(assignment) => assignments.push(*assignment),
                Leased::Gone => {}
                Leased::MissingDependency => {
                    let release = Command::Report {
                        worker_id: worker_id.to_string(),
                        token,
                        cache_key: *key,
                        outcome: Outcome::LostInputs { lost: Vec::new() },
                        max_attempts: self.node.tuning().max_attempts,
                        queued_ms: 0,
                        now_ms: self.node.now_ms(),
                    };
                    if let Err(e) = self.node.propose(release).await {
                        tracing::warn!("release lease {token} of {key}: {e}; it will expire");
                    }
                }
            }
        }
        assignments
    }

    /// The assignment of the execution of `key` under lease `token`, if
    /// that lease is still `worker_id`'s.
    fn assignment(&self, worker_id: &str, key: &Digest, token: u64) -> Leased {
        let model = self.node.model();
        let Some(exec) = model.execution(key) else {
            return Leased::Gone;
        };
        let current = matches!(&exec.state,
            model::ExecState::Running { worker_id: w, token: t, .. } if w == worker_id && *t == token);
        if !current {
            return Leased::Gone;
        }
        let spec = &exec.spec;
        let mut deps = Vec::with_capacity(spec.deps.len());
        for dep in &spec.deps {
            let Some(result) = model.result(&dep.cache_key) else {
                return Leased::MissingDependency;
            };
            deps.push(DepArtifact {
                job_id: dep.job_id.to_string(),
                digest: digest_to_wire(&result.artifact),
                size: result.artifact_size,
                holders: super::listed_holders(&model, &result.artifact),
            });
        }
        Leased::Assignment(Box::new(Assignment {
            lease_token: token,
            cache_key: digest_to_wire(key),
            job_id: spec.job_id.to_string(),
            name: spec.name.clone(),
            cmds: spec.cmds.iter().map(CmdText::to_wire).collect(),
            inputs: spec
                .inputs
                .iter()
                .map(|i| InputFile {
                    path: i.path.clone(),
                    digest: digest_to_wire(&i.digest),
                    size: i.size,
                })
                .collect(),
            deps,
            timeout_ms: exec.timeout_ms,
            build_id: exec.rank.build,
            path_ms: exec.rank.path_ms,
            action: spec.action.as_ref().map(|action| RemoteAction {
                instance_name: action.instance_name.clone(),
                action_digest: action.action.hash_bytes().to_vec().into(),
                action_size: action.action_size as i64,
            }),
        }))
    }
}

/// The dedup key of a worker's request: per call kind and worker, so IDs
/// of different workers never collide. Empty when the worker sent none.
fn request_key(kind: &str, worker_id: &str, request_id: &str) -> Result<String, Status> {
    if request_id.is_empty() {
        return Ok(String::new());
    }
    if request_id.len() > MAX_REQUEST_ID_CHARS || request_id.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "request_id must be at most {MAX_REQUEST_ID_CHARS} printable characters"
        )));
    }
    Ok(format!("{kind}/{worker_id}/{request_id}"))
}

/// A reported Remote Execution API result, checked: within the bound of
/// what the action cache keeps and decodable ([`result_blobs`] checks the
/// blobs it names).
fn action_result(bytes: &[u8]) -> Result<re::ActionResult, Status> {
    use prost::Message as _;
    if bytes.len() > MAX_ACTION_RESULT_BYTES {
        return Err(Status::invalid_argument(format!(
            "action_result: {} bytes, over the limit of {MAX_ACTION_RESULT_BYTES}",
            bytes.len()
        )));
    }
    re::ActionResult::decode(bytes)
        .map_err(|e| Status::invalid_argument(format!("action_result: not an ActionResult: {e}")))
}

/// Most bytes of an action's stdout and of its stderr kept with its run's
/// result (the whole of both is in the CAS, which the result names): the
/// report stays a small Raft entry.
const MAX_ACTION_OUTPUT_SHOWN: usize = 16 << 10;

fn head(mut bytes: Vec<u8>, max: usize) -> Vec<u8> {
    bytes.truncate(max);
    bytes
}

fn truncated(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.len() > MAX_JOB_OUTPUT_BYTES {
        bytes.truncate(MAX_JOB_OUTPUT_BYTES);
        bytes.extend_from_slice(b"\n[truncated by the coordinator]\n");
    }
    bytes
}

#[tonic::async_trait]
impl WorkerApi for WorkerService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        self.admit(&caller, &req.worker_id)?;
        if req.addr.is_empty() || req.addr.len() > MAX_ADDR_CHARS {
            return Err(Status::invalid_argument("addr must be a host:port"));
        }
        if req.slots == 0 || req.slots > MAX_SLOTS {
            return Err(Status::invalid_argument(format!(
                "slots must be 1 to {MAX_SLOTS}, not {}",
                req.slots
            )));
        }
        if req.ahead > req.slots {
            return Err(Status::invalid_argument(format!(
                "ahead must be at most slots ({}), not {}",
                req.slots, req.ahead
            )));
        }
        if req.held_artifacts.len() > MAX_HELD_PER_REGISTER {
            return Err(Status::invalid_argument(format!(
                "held_artifacts lists {} artifacts, over the limit of {MAX_HELD_PER_REGISTER} (report the rest in heartbeats)",
                req.held_artifacts.len()
            )));
        }
        let properties = distbuild_proto::wire::parse_properties(&req.properties)
            .map_err(|e| Status::invalid_argument(format!("properties: {e}")))?;
        let mut held = digests(&req.held_artifacts, "held_artifacts")?;
        // A set: proposed in one order whatever order the worker's cache
        // listed it in.
        held.sort_unstable();
        held.dedup();
        let request = request_key("register", &req.worker_id, &req.request_id)?;
        self.node
            .propose_request(
                request,
                Command::RegisterWorker {
                    worker_id: req.worker_id,
                    addr: req.addr,
                    slots: req.slots,
                    ahead: req.ahead,
                    held,
                    properties,
                    now_ms: self.node.now_ms(),
                },
            )
            .await?;
        Ok(Response::new(RegisterResponse {
            lease_timeout_ms: self.node.tuning().lease_timeout_ms,
            heartbeat_interval_ms: self.node.tuning().heartbeat_interval_ms,
        }))
    }

    async fn poll_work(
        &self,
        request: Request<PollWorkRequest>,
    ) -> Result<Response<PollWorkResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        self.admit(&caller, &req.worker_id)?;
        let wait = Duration::from_millis(req.wait_ms).min(MAX_POLL_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let max = (req.free_slots as u64).min(MAX_ASSIGN_BATCH) as usize;
        let tuning = self.node.tuning();
        let request = request_key("poll", &req.worker_id, &req.request_id)?;
        // Each assignment this poll proposes gets the next ID of a
        // sequence, so a retried poll replays the same answers in order.
        let mut proposals = 0u32;
        // A retried poll first replays what the lost one was answered.
        self.node.ready_leader().await?;
        while !request.is_empty() {
            let Some(model::Response::Assigned { keys, tokens }) =
                self.node.remembered(&format!("{request}#{proposals}"))
            else {
                break;
            };
            proposals += 1;
            let assignments = self.assignments(&req.worker_id, &keys, &tokens).await;
            if !assignments.is_empty() {
                return Ok(Response::new(PollWorkResponse {
                    assignments,
                    reregister: false,
                }));
            }
        }
        let mut last_applied = None;
        loop {
            self.node.ready_leader().await?;
            let now_ms = self.node.now_ms();
            let (known, draining, picks, queued) = {
                let model = self.node.model();
                (
                    model.workers().contains_key(&req.worker_id),
                    model
                        .workers()
                        .get(&req.worker_id)
                        .is_some_and(|w| w.draining),
                    self.picks.pick(|in_flight| {
                        model.pick_for(
                            &req.worker_id,
                            max,
                            now_ms,
                            tuning.locality_wait_ms,
                            tuning.lease_timeout_ms,
                            in_flight,
                        )
                    }),
                    model.has_queued(),
                )
            };
            if !known {
                return Ok(Response::new(PollWorkResponse {
                    assignments: Vec::new(),
                    reregister: true,
                }));
            }
            // Nothing will come for a draining worker: answer at once, so
            // it can get on with leaving.
            if draining {
                return Ok(Response::new(PollWorkResponse::default()));
            }
            if !picks.keys().is_empty() {
                let id = if request.is_empty() {
                    String::new()
                } else {
                    format!("{request}#{proposals}")
                };
                proposals += 1;
                let response = self
                    .node
                    .propose_request(
                        id,
                        Command::Assign {
                            worker_id: req.worker_id.clone(),
                            cache_keys: picks.keys().to_vec(),
                            lease_timeout_ms: tuning.lease_timeout_ms,
                            now_ms,
                        },
                    )
                    .await?;
                let model::Response::Assigned { keys, tokens } = response else {
                    return Err(Status::internal("unexpected answer to an assignment"));
                };
                let assignments = self.assignments(&req.worker_id, &keys, &tokens).await;
                if !assignments.is_empty() {
                    return Ok(Response::new(PollWorkResponse {
                        assignments,
                        reregister: false,
                    }));
                }
            }
            // Its assignment is applied: no longer in flight while this
            // poll waits.
            drop(picks);
            let now = tokio::time::Instant::now();
            if now >= deadline || self.node.shutdown_token().is_cancelled() {
                return Ok(Response::new(PollWorkResponse::default()));
            }
            // Queued work held back for locality is looked at again soon.
            let mut pause = deadline - now;
            if queued {
                pause = pause.min(Duration::from_millis(tuning.locality_wait_ms.max(5)));
            }
            self.node.wait_for_change(&mut last_applied, pause).await;
        }
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        self.admit(&caller, &req.worker_id)?;
        if req.lease_tokens.len() > MAX_SLOTS as usize {
            return Err(Status::invalid_argument(
                "more leases than a worker can hold",
            ));
        }
        self.node.note_worker_stats(
            &req.worker_id,
            req.peer_bytes_fetched_total,
            req.cache_bytes,
        );
        let changes = req.added_artifacts.len() + req.dropped_artifacts.len();
        if changes > MAX_CACHE_CHANGES_PER_HEARTBEAT {
            return Err(Status::invalid_argument(format!(
                "added_artifacts and dropped_artifacts list {changes} changes, over the limit of {MAX_CACHE_CHANGES_PER_HEARTBEAT} (send the rest in the next heartbeats)"
            )));
        }
        let added = digests(&req.added_artifacts, "added_artifacts")?;
        let dropped = digests(&req.dropped_artifacts, "dropped_artifacts")?;
        let request = request_key("heartbeat", &req.worker_id, &req.request_id)?;
        let worker_id = req.worker_id.clone();
        let response = self
            .node
            .propose_request(
                request,
                Command::Heartbeat {
                    worker_id: req.worker_id,
                    tokens: req.lease_tokens,
                    added,
                    dropped,
                    lease_timeout_ms: self.node.tuning().lease_timeout_ms,
                    now_ms: self.node.now_ms(),
                },
            )
            .await?;
        match response {
            model::Response::Heartbeat {
                revoked,
                reregister,
            } => {
                let advice = self.drains.advice(&self.node, &worker_id);
                Ok(Response::new(HeartbeatResponse {
                    revoked_tokens: revoked,
                    reregister,
                    draining: advice.draining,
                    may_leave: advice.may_leave,
                    replicate: advice.replicate,
                }))
            }
            _ => Err(Status::internal("unexpected answer to a heartbeat")),
        }
    }

    async fn drain(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        self.leave(request, "drain", |worker_id, now_ms| Command::DrainWorker {
            worker_id,
            now_ms,
        })
        .await
    }

    async fn deregister(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        self.leave(request, "deregister", |worker_id, now_ms| {
            Command::DeregisterWorker { worker_id, now_ms }
        })
        .await
    }

    async fn report_result(
        &self,
        request: Request<ReportResultRequest>,
    ) -> Result<Response<ReportResultResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        self.admit(&caller, &req.worker_id)?;
        let cache_key = digest_from_wire(&req.cache_key, "cache_key").map_err(invalid)?;
        let request = request_key("report", &req.worker_id, &req.request_id)?;
        let lost = lost_inputs(&req.lost_inputs)?;
        let stdout = truncated(req.stdout.to_vec());
        let stderr = truncated(req.stderr.to_vec());
        let outcome = if !lost.is_empty() {
            Outcome::LostInputs { lost }
        } else if !req.action_result.is_empty() && req.error.is_empty() {
            // The exit code the result says, whatever the report's field.
            let decoded = action_result(&req.action_result)?;
            // Each digest's function from its length. The worker stored
            // every blob first, the trees included.
            let blobs = result_blobs(&self.node, &decoded, 0).await?;
            Outcome::Executed {
                exit_code: decoded.exit_code,
                stdout: head(stdout, MAX_ACTION_OUTPUT_SHOWN),
                stderr: head(stderr, MAX_ACTION_OUTPUT_SHOWN),
                result: req.action_result.to_vec(),
                blobs,
            }
        } else if req.exit_code == 0 && req.error.is_empty() {
            Outcome::Success {
                stdout,
                stderr,
                artifact: digest_from_wire(&req.artifact_digest, "artifact_digest")
                    .map_err(invalid)?,
                artifact_size: req.artifact_size,
            }
        } else {
            let mut error = req.error;
            text::cut(&mut error, MAX_JOB_ERROR_BYTES, " [cut by the coordinator]");
            Outcome::Failure {
                exit_code: req.exit_code,
                stdout,
                stderr,
                error: (!error.is_empty()).then_some(error),
            }
        };
        let tuning = self.node.tuning();
        let now_ms = self.node.now_ms();
        let report = model::Proposal {
            request_id: (!request.is_empty()).then(|| request.clone()),
            command: Command::Report {
                worker_id: req.worker_id.clone(),
                token: req.lease_token,
                cache_key,
                outcome,
                max_attempts: tuning.max_attempts,
                queued_ms: req.queued_ms,
                now_ms,
            },
        };
        // The job for the slot this report frees, leased in the same
        // entry: the worker's next poll, saved.
        let next = if req.take_next {
            self.node.ready_leader().await?;
            let model = self.node.model();
            self.picks.pick(|in_flight| {
                model.pick_after_report(
                    &req.worker_id,
                    req.lease_token,
                    now_ms,
                    tuning.locality_wait_ms,
                    tuning.lease_timeout_ms,
                    in_flight,
                )
            })
        } else {
            self.picks.pick(|_| Vec::new())
        };
        let mut proposals = vec![report];
        // A retried report whose first try leased a next job gets that
        // answer again, whatever it would pick now.
        let replayed =
            !request.is_empty() && self.node.remembered(&format!("{request}#next")).is_some();
        if !next.keys().is_empty() || replayed {
            proposals.push(model::Proposal {
                request_id: (!request.is_empty()).then(|| format!("{request}#next")),
                command: Command::Assign {
                    worker_id: req.worker_id.clone(),
                    cache_keys: next.keys().to_vec(),
                    lease_timeout_ms: tuning.lease_timeout_ms,
                    now_ms,
                },
            });
        }
        let mut responses = self.node.propose_together(proposals).await?.into_iter();
        let accepted = match responses.next() {
            Some(model::Response::Reported { accepted }) => accepted,
            _ => return Err(Status::internal("unexpected answer to a report")),
        };
        let assignments = match responses.next() {
            Some(model::Response::Assigned { keys, tokens }) => {
                self.assignments(&req.worker_id, &keys, &tokens).await
            }
            None => Vec::new(),
            Some(_) => return Err(Status::internal("unexpected answer to an assignment")),
        };
        Ok(Response::new(ReportResultResponse {
            accepted,
            assignments,
        }))
    }

    type FetchBlobStream = ResponseStream<BlobChunk>;

    async fn upload_blob(
        &self,
        request: Request<Streaming<BlobChunk>>,
    ) -> Result<Response<UploadBlobResponse>, Status> {
        // A follower redirects before reading any data.
        self.node.ready_leader().await?;
        self.rates.admit(&client_name(&request))?;
        store_upload(&self.node, &self.kept_blob_bytes, request.into_inner()).await?;
        Ok(Response::new(UploadBlobResponse {}))
    }

    async fn fetch_blob(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchBlobStream>, Status> {
        let digest = blob_key_from_wire(&request.get_ref().digest, "digest")?;
        // Only the leader knows every acknowledged blob: a follower that
        // has not applied the blob's record yet (it was cut off, or is
        // behind) sends the caller to the leader instead of denying it.
        if !self.node.blobs().contains(&digest) && self.node.model().blob_size(&digest).is_none() {
            self.node.ready_leader().await?;
        }
        // A blob recorded while this node was down is fetched from a peer.
        self.node.ensure_local_blob(digest).await?;
        match self.node.open_own_blob(&digest).await? {
            Some(file) => Ok(Response::new(stream_file(file))),
            None => Err(Status::not_found(format!("no blob {digest}"))),
        }
    }
}
