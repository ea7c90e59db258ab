//! The client API: source uploads, build submission, event streams.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use distbuild_proto::graph::{BuildGraph, Job, check_relative_path};
use distbuild_proto::v1::client_api_server::ClientApi;
use distbuild_proto::v1::{
    ArtifactLocation, BlobChunk, BuildEvent, CancelBuildRequest, CancelBuildResponse,
    FindMissingBlobsRequest, FindMissingBlobsResponse, LocateArtifactsRequest,
    LocateArtifactsResponse, SubmitBuildRequest, SubmitBuildResponse, UploadBlobResponse,
    WatchBuildRequest,
};
use distbuild_proto::wire::{MAX_REQUEST_ID_CHARS, digest_from_wire, digest_to_wire};
use distbuild_proto::{Digest, JobId, job_key};
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use distbuild_model::{self as model, CmdText, Command, InputRef, JobSpec, SubmittedJob};

use super::rate::{CallerRates, client_name};
use super::status::{invalid, refusal};
use super::watch::{Watchers, stream_events};
use super::{KeptBlobBytes, ResponseStream, digests, store_upload};
use crate::replica::Node;

/// Most jobs one build may have.
pub const MAX_JOBS_PER_BUILD: usize = 100_000;
pub struct ClientService {
    pub node: Arc<Node>,
    /// The event streams this node serves.
    pub watchers: Watchers,
    /// Per-caller rate bounds on state-changing calls.
    pub rates: CallerRates,
    /// What an upload must fit beside (shared with the CAS).
    pub kept_blob_bytes: Arc<KeptBlobBytes>,
}

/// Takes one state-changing call of the client that sent `request` (by its
/// address) from its rate bound.
fn admit<T>(rates: &CallerRates, request: &Request<T>) -> Result<(), Status> {
    rates.admit(&client_name(request))
}

/// Orders a validated (acyclic) graph's jobs so dependencies come first,
/// keeping the graph's order otherwise.
fn dependency_order(graph: &BuildGraph) -> Vec<usize> {
    let index: HashMap<JobId, usize> = graph
        .jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.id, i))
        .collect();
    let mut pending: Vec<usize> = graph.jobs.iter().map(|j| j.deps.len()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); graph.jobs.len()];
    for (i, job) in graph.jobs.iter().enumerate() {
        for dep in &job.deps {
            dependents[index[dep]].push(i);
        }
    }
    let mut ready: VecDeque<usize> = (0..graph.jobs.len()).filter(|&i| pending[i] == 0).collect();
    let mut order = Vec::with_capacity(graph.jobs.len());
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for &d in &dependents[i] {
            pending[d] -= 1;
            if pending[d] == 0 {
                ready.push_back(d);
            }
        }
    }
    assert_eq!(
        order.len(),
        graph.jobs.len(),
        "a validated graph is acyclic"
    );
    order
}

impl ClientService {
    /// The time limit of each job of a build that asked for
    /// `requested_secs` (0: the coordinator's default).
    fn job_timeout_ms(&self, requested_secs: u64) -> Result<u64, Status> {
        let tuning = self.node.tuning();
        if requested_secs == 0 {
            return Ok(tuning.default_job_timeout_ms);
        }
        let max_secs = tuning.max_job_timeout_ms / 1000;
        if requested_secs > max_secs {
            return Err(Status::invalid_argument(format!(
                "a job timeout of {requested_secs} s is more than this cluster allows (--max-job-timeout {max_secs} s)"
            )));
        }
        Ok(requested_secs * 1000)
    }

    /// Turns a submit request into the command that records the build, or
    /// refuses it with the one-line reason.
    fn plan(&self, req: &SubmitBuildRequest) -> Result<Vec<SubmittedJob>, Status> {
        let graph = BuildGraph::from_json(&req.graph_json)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if graph.jobs.len() > MAX_JOBS_PER_BUILD {
            return Err(Status::invalid_argument(format!(
                "the graph has {} jobs, over the limit of {MAX_JOBS_PER_BUILD}",
                graph.jobs.len()
            )));
        }
        let mut by_path: HashMap<&str, (Digest, u64)> = HashMap::new();
        for source in &req.sources {
            check_relative_path(&source.path).map_err(|problem| {
                Status::invalid_argument(format!("source path {:?} {problem}", source.path))
            })?;
            let digest = digest_from_wire(&source.digest, &format!("source {:?}", source.path))
                .map_err(invalid)?;
            by_path.insert(&source.path, (digest, source.size));
        }
        {
            let model = self.node.model();
            for (id, path) in &graph.source_files {
                let Some((digest, size)) = by_path.get(path.as_str()) else {
                    return Err(Status::invalid_argument(format!(
                        "source file {path:?} ({id}): the request gives no digest for it"
                    )));
                };
                if model.blob_size(&(*digest).into()) != Some(*size) {
                    return Err(Status::failed_precondition(format!(
                        "source file {path:?}: blob {digest} ({size} bytes) was not uploaded"
                    )));
                }
            }
        }
        let order = dependency_order(&graph);
        let mut position = vec![0u32; graph.jobs.len()];
        for (pos, &i) in order.iter().enumerate() {
            position[i] = pos as u32;
        }
        let index: HashMap<JobId, usize> = graph
            .jobs
            .iter()
            .enumerate()
            .map(|(i, j)| (j.id, i))
            .collect();
        // Each graph job is taken and dropped as its submitted job is made,
        // so the two forms of a big graph are not held whole at once.
        let mut graph_jobs: Vec<Option<Job>> = graph.jobs.into_iter().map(Some).collect();
        let mut jobs = Vec::with_capacity(order.len());
        for &i in &order {
            let job = graph_jobs[i].take().expect("each job is in the order once");
            let input = |path: &str| by_path[path].0;
            let cache_key = job_key(&job, &input);
            let deps = job.deps.iter().map(|d| position[index[d]]).collect();
            let Job {
                id,
                name,
                inputs,
                cmds,
                ..
            } = job;
            jobs.push(SubmittedJob {
                cache_key,
                deps,
                spec: JobSpec {
                    job_id: id,
                    name,
                    cmds: cmds.into_iter().map(CmdText::from_graph).collect(),
                    inputs: inputs
                        .into_iter()
                        .map(|path| {
                            let (digest, size) = by_path[path.as_str()];
                            InputRef { path, digest, size }
                        })
                        .collect(),
                    // Filled in by the state machine once the
                    // dependencies' outputs are known.
                    deps: Vec::new(),
                    action: None,
                },
            });
        }
        Ok(jobs)
    }
}

/// Most bytes of jobs one Raft entry of a submit carries: openraft 0.9
/// gives an append the heartbeat interval (100 ms) to reach a follower and
/// be fsynced there, so a big build goes in several entries.
pub const SUBMIT_PART_BYTES: usize = 256 * 1024;

/// Submit parts proposed at once: two entries of two parts each, the
/// batcher's `MAX_IN_FLIGHT` entries of its `MAX_BATCH_BYTES`.
const STAGE_PARTS_AT_ONCE: usize = 4;

/// The encoded size of `jobs` (what staging counts).
fn encoded_size(jobs: &[SubmittedJob]) -> u64 {
    postcard::experimental::serialized_size(jobs).map_or(u64::MAX, |n| n as u64)
}

/// Splits `jobs`, in order, into parts of at most `max_bytes` encoded
/// (a bigger job makes a part of its own). Always at least one part.
fn split_into_parts(jobs: Vec<SubmittedJob>, max_bytes: usize) -> Vec<Vec<SubmittedJob>> {
    let mut parts = vec![Vec::new()];
    let mut bytes = 0;
    for job in jobs {
        let size = postcard::experimental::serialized_size(&job).unwrap_or(max_bytes);
        let current = parts.last_mut().expect("never empty");
        if !current.is_empty() && bytes + size > max_bytes {
            parts.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        parts.last_mut().expect("never empty").push(job);
    }
    parts
}

#[tonic::async_trait]
impl ClientApi for ClientService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let wanted = digests(&request.get_ref().digests, "digests")?;
        self.node.ready_leader().await?;
        // A recorded blob is stored on a quorum of coordinators (a node
        // lacking its copy fetches it from a peer when asked for it).
        let missing: Vec<Digest> = {
            let model = self.node.model();
            wanted
                .into_iter()
                .filter(|d| !model.has_blob(&(*d).into()))
                .collect()
        };
        let missing = missing.iter().map(digest_to_wire).collect();
        Ok(Response::new(FindMissingBlobsResponse { missing }))
    }

    async fn upload_blob(
        &self,
        request: Request<Streaming<BlobChunk>>,
    ) -> Result<Response<UploadBlobResponse>, Status> {
        // A follower redirects before reading any data.
        self.node.ready_leader().await?;
        admit(&self.rates, &request)?;
        store_upload(&self.node, &self.kept_blob_bytes, request.into_inner()).await?;
        Ok(Response::new(UploadBlobResponse {}))
    }

    async fn submit_build(
        &self,
        request: Request<SubmitBuildRequest>,
    ) -> Result<Response<SubmitBuildResponse>, Status> {
        admit(&self.rates, &request)?;
        let req = request.into_inner();
        if req.request_id.is_empty() || req.request_id.len() > MAX_REQUEST_ID_CHARS {
            return Err(Status::invalid_argument(format!(
                "request_id must have 1 to {MAX_REQUEST_ID_CHARS} characters"
            )));
        }
        let job_timeout_ms = self.job_timeout_ms(req.job_timeout_secs)?;
        self.node.ready_leader().await?;
        let known = self.node.model().build_for_request(&req.request_id);
        if let Some(build_id) = known {
            let job_count = self
                .node
                .model()
                .build(build_id)
                .map_or(0, |b| b.header.job_count);
            return Ok(Response::new(SubmitBuildResponse {
                build_id,
                job_count,
            }));
        }
        let jobs = self.plan(&req)?;
        // The graph's text and the source list are planned: not kept while
        // the parts commit (a 100,000-job graph's are tens of megabytes,
        // and its text is a view into tonic's whole receive buffer).
        // Dropped here, explicitly: a destructuring that moves the ID out
        // would leave the other fields alive until the end of the call.
        let request_id = req.request_id.clone();
        drop(req);
        let mut parts = split_into_parts(jobs, SUBMIT_PART_BYTES);
        let last = parts.pop().unwrap_or_default();
        let staged_parts = u32::try_from(parts.len())
            .ok()
            .filter(|&n| n < model::MAX_SUBMIT_PARTS)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "the graph needs {} submit parts of {SUBMIT_PART_BYTES} bytes, over the limit of {}",
                    parts.len() + 1,
                    model::MAX_SUBMIT_PARTS
                ))
            })?;
        let total_bytes: u64 = parts.iter().map(|jobs| encoded_size(jobs)).sum();
        if total_bytes > model::MAX_STAGED_BYTES {
            return Err(Status::invalid_argument(format!(
                "the graph's job list is {total_bytes} bytes encoded, over the limit of {} for one build",
                model::MAX_STAGED_BYTES
            )));
        }
        // Parts are keyed by their number, so they may commit in any
        // order: a few are proposed at once, and the batcher packs them
        // into entries while earlier ones commit.
        let mut staging = futures::stream::iter((0u32..).zip(parts))
            .map(|(part, jobs)| {
                self.node.propose(Command::StageSubmit {
                    request_id: request_id.clone(),
                    part,
                    jobs,
                    total_bytes,
                    now_ms: self.node.now_ms(),
                })
            })
            .buffer_unordered(STAGE_PARTS_AT_ONCE);
        while let Some(response) = staging.next().await {
            let response = response?;
            if response != model::Response::None {
                return Err(refusal(response));
            }
        }
        drop(staging);
        let response = self
            .node
            .propose(Command::SubmitBuild {
                request_id,
                now_ms: self.node.now_ms(),
                staged_parts,
                jobs: last,
                job_timeout_ms,
            })
            .await?;
        match response {
            model::Response::BuildSubmitted {
                build_id,
                job_count,
            } => Ok(Response::new(SubmitBuildResponse {
                build_id,
                job_count,
            })),
            other => Err(refusal(other)),
        }
    }

    type WatchBuildStream = ResponseStream<BuildEvent>;

    async fn watch_build(
        &self,
        request: Request<WatchBuildRequest>,
    ) -> Result<Response<Self::WatchBuildStream>, Status> {
        let WatchBuildRequest { build_id, from_seq } = request.into_inner();
        // Only the leader streams: a follower (or a leader cut off from
        // its quorum) would stream a state that may have stopped moving.
        self.node.ready_leader().await?;
        let (next_seq, finished) = match self.node.model().build(build_id) {
            Some(build) => (build.header.next_event_seq, build.header.finished),
            None => return Err(Status::not_found(format!("no build {build_id}"))),
        };
        // A start past the events there will ever be would wait forever.
        if from_seq > next_seq || (finished && from_seq == next_seq) {
            return Err(Status::out_of_range(format!(
                "from_seq {from_seq} is past the end of build {build_id}'s events (it has {next_seq}{})",
                if finished {
                    ", and it has finished"
                } else {
                    " so far"
                }
            )));
        }
        let slot = self.watchers.admit(build_id)?;
        Ok(Response::new(stream_events(
            self.node.clone(),
            build_id,
            from_seq,
            slot,
        )))
    }

    async fn cancel_build(
        &self,
        request: Request<CancelBuildRequest>,
    ) -> Result<Response<CancelBuildResponse>, Status> {
        admit(&self.rates, &request)?;
        let build_id = request.into_inner().build_id;
        self.node.ready_leader().await?;
        if self.node.model().build(build_id).is_none() {
            return Err(Status::not_found(format!("no build {build_id}")));
        }
        let response = self
            .node
            .propose(Command::CancelBuild {
                build_id,
                now_ms: self.node.now_ms(),
            })
            .await?;
        match response {
            model::Response::Cancelled { cancelled } => {
                Ok(Response::new(CancelBuildResponse { cancelled }))
            }
            other => Err(Status::internal(format!(
                "unexpected answer to a cancel: {other:?}"
            ))),
        }
    }

    async fn locate_artifacts(
        &self,
        request: Request<LocateArtifactsRequest>,
    ) -> Result<Response<LocateArtifactsResponse>, Status> {
        let wanted = digests(&request.get_ref().digests, "digests")?;
        self.node.ready_leader().await?;
        let model = self.node.model();
        let locations = wanted
            .iter()
            .map(|d| ArtifactLocation {
                digest: digest_to_wire(d),
                holders: model.holders(d),
            })
            .collect();
        Ok(Response::new(LocateArtifactsResponse { locations }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name_len: usize) -> SubmittedJob {
        SubmittedJob {
            cache_key: Digest::from_bytes([1; 20]),
            deps: Vec::new(),
            spec: JobSpec {
                job_id: JobId::from_bytes([2; 20]),
                name: "n".repeat(name_len),
                cmds: Vec::new(),
                inputs: Vec::new(),
                deps: Vec::new(),
                action: None,
            },
        }
    }

    #[test]
    fn parts_keep_the_order_and_stay_under_the_budget() {
        let jobs: Vec<SubmittedJob> = (0..100).map(|i| job(100 + i)).collect();
        let parts = split_into_parts(jobs.clone(), 1000);
        assert!(parts.len() > 10, "{} parts", parts.len());
        for part in &parts {
            assert!(!part.is_empty());
            let bytes: usize = part
                .iter()
                .map(|j| postcard::experimental::serialized_size(j).expect("size"))
                .sum();
            assert!(bytes <= 1000, "a part of {bytes} bytes");
        }
        assert_eq!(parts.concat(), jobs, "order kept, nothing lost");
        // A job over the budget is a part of its own; no jobs, one part.
        let parts = split_into_parts(vec![job(10), job(5000), job(10)], 1000);
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1]);
        assert_eq!(split_into_parts(Vec::new(), 1000), vec![Vec::new()]);
    }
}
