//! `distbuild build`: check the graph and its sources, upload what the
//! cluster lacks, submit, follow the events, download the leaves' outputs.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use distbuild_proto::graph::{BuildGraph, GraphError};
use distbuild_proto::leader::one_off_request_id;
use distbuild_proto::tls::Role;
use distbuild_proto::v1::{
    CancelBuildRequest, SourceFile, SubmitBuildRequest, SubmitBuildResponse, build_event,
};
use distbuild_proto::wire::{MAX_MESSAGE_BYTES, digest_from_wire, digest_to_wire};
use tokio::time::Instant;

use crate::args::BuildArgs;
use crate::cluster::{CallError, Cluster, RPC_TIMEOUT};
use crate::connect::{Connector, client_api};
use crate::digests::DigestCache;
use crate::download::{DownloadError, Output, download_outputs};
use crate::exit_code;
use crate::render::{Console, Reporter, print_error};
use crate::sources::{Source, SourceError, hash_sources_with};
use crate::upload::{MIN_UPLOAD_BYTES_PER_SEC, UploadError, upload_missing};
use crate::watch::{Watched, watch_build};

/// Largest graph file accepted: it travels in one message.
pub const MAX_GRAPH_FILE_BYTES: u64 = MAX_MESSAGE_BYTES as u64 / 2;

/// How long an interrupted build may take to be cancelled.
pub const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `distbuild build` against real TCP connections, printing to the
/// process's stdout and stderr; returns the process exit code (see
/// [`crate::exit_code`]).
pub async fn build_cli(mut args: BuildArgs) -> i32 {
    let mut console = Console::stdio();
    // No cluster given: the workspace's local server, locked for this
    // command until it returns.
    let mut _local = None;
    let connector;
    if args
        .connection
        .coordinators
        .iter()
        .all(|a| a.trim().is_empty())
    {
        match crate::local::prepare(
            &args.source_dir,
            args.output_base.as_deref(),
            args.block_for_lock,
            args.max_idle_secs,
            &args.sandbox_writable_paths,
            &mut console.err,
        )
        .await
        {
            Ok(local) => {
                args.connection.coordinators = vec![local.info.addr.clone()];
                // The server's own certificates, in the owner-only output
                // base: only its owner can call it.
                connector = match local.security() {
                    Ok(security) => Connector::secure(&security),
                    Err(e) => return print_error(&mut console.err, exit_code::DENIED, e),
                };
                _local = Some(local);
            }
            Err(code) => return code,
        }
    } else {
        connector = match args.connection.connector(&[Role::Client]) {
            Ok(connector) => connector,
            Err(e) => return print_error(&mut console.err, exit_code::BAD_INPUT, e),
        };
    }
    run_build(args, connector, console).await
}

/// Why the graph file cannot be built (bad input). The message is one
/// line.
#[derive(Debug, thiserror::Error)]
pub enum GraphFileError {
    /// The file cannot be read.
    #[error("read graph file {}: {problem}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        problem: std::io::Error,
    },
    /// The file is larger than one message may carry.
    #[error("graph file {} is {size} bytes, more than the {MAX_GRAPH_FILE_BYTES} accepted", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The file is not a valid graph.
    #[error("graph file {}: {problem}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: GraphError,
    },
}

/// Reads and validates the graph file.
pub fn read_graph(path: &Path) -> Result<(Bytes, BuildGraph), GraphFileError> {
    let read_error = |problem| GraphFileError::Read {
        path: path.to_path_buf(),
        problem,
    };
    let meta = std::fs::metadata(path).map_err(read_error)?;
    if meta.len() > MAX_GRAPH_FILE_BYTES {
        return Err(GraphFileError::TooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
        });
    }
    let bytes = std::fs::read(path).map_err(read_error)?;
    let graph = BuildGraph::from_json(&bytes).map_err(|problem| GraphFileError::Invalid {
        path: path.to_path_buf(),
        problem,
    })?;
    Ok((Bytes::from(bytes), graph))
}

/// Hashes the graph's sources, through the workspace's digest cache unless
/// `--digest-cache=false`, and saves what it learned for the next build.
/// The cache is an optimisation: when it cannot be used the build goes on
/// (a warning says why) and every file is hashed.
async fn hash_with_cache(graph: &BuildGraph, args: &BuildArgs) -> Result<Vec<Source>, SourceError> {
    let mut cache = None;
    if args.digest_cache && !graph.source_files.is_empty() {
        let (source_dir, output_base) = (args.source_dir.clone(), args.output_base.clone());
        let loaded = distbuild_proto::blocking::run(move || -> Result<_, String> {
            let path = digest_cache_path(&source_dir, output_base.as_deref())?;
            let (cache, ignored) = DigestCache::load(&path);
            Ok((path, cache, ignored))
        })
        .await;
        match loaded {
            Ok((path, loaded, ignored)) => {
                if let Some(why) = ignored {
                    tracing::warn!("digest cache ignored, every source is hashed: {why}");
                }
                cache = Some((path, Arc::new(loaded)));
            }
            Err(why) => tracing::warn!("no digest cache, every source is hashed: {why}"),
        }
    }
    let shared = cache.as_ref().map(|(_, loaded)| Arc::clone(loaded));
    let hashed = hash_sources_with(graph, &args.source_dir, shared).await?;
    tracing::debug!(
        read = hashed.read,
        of = hashed.sources.len(),
        "hashed sources"
    );
    if let Some((path, loaded)) = cache {
        let learned = hashed.learned;
        let saved = distbuild_proto::blocking::run(move || {
            loaded
                .save(&path, &learned)
                .map_err(|e| format!("write {}: {e}", path.display()))
        })
        .await;
        if let Err(why) = saved {
            tracing::warn!("digest cache not saved: {why}");
        }
    }
    Ok(hashed.sources)
}

/// Where the digest cache of the workspace at `source_dir` is: `digests`
/// in its output base, made (private) if new.
fn digest_cache_path(source_dir: &Path, output_base: Option<&Path>) -> Result<PathBuf, String> {
    let workspace = std::fs::canonicalize(source_dir)
        .map_err(|e| format!("source directory {}: {e}", source_dir.display()))?;
    let base = crate::local::OutputBase::for_workspace(&workspace, output_base)
        .map_err(|e| e.to_string())?;
    base.ensure_private().map_err(|e| e.to_string())?;
    Ok(base.dir.join("digests"))
}

/// Runs `distbuild build` through `connector`, writing to `console`;
/// returns the process exit code. Bad input is reported before anything is
/// sent to the cluster.
pub async fn run_build(args: BuildArgs, connector: Connector, console: Console) -> i32 {
    let started = Instant::now();
    let Console {
        out,
        mut err,
        progress,
    } = console;
    let err: &mut dyn Write = &mut err;

    let addrs = match args.connection.addresses() {
        Ok(addrs) => addrs,
        Err(message) => return print_error(err, exit_code::BAD_INPUT, message),
    };
    let (graph_json, graph) = match read_graph(&args.graph) {
        Ok(read) => read,
        Err(message) => return print_error(err, exit_code::BAD_INPUT, message),
    };
    let sources = match hash_with_cache(&graph, &args).await {
        Ok(sources) => sources,
        Err(e) => return print_error(err, exit_code::BAD_INPUT, e),
    };

    let cluster = Cluster::new(connector, addrs, args.connection.patience());

    let request = SubmitBuildRequest {
        request_id: one_off_request_id(),
        job_timeout_secs: args.job_timeout.unwrap_or(0),
        graph_json,
        sources: sources
            .iter()
            .map(|s| SourceFile {
                path: s.path.clone(),
                digest: digest_to_wire(&s.digest),
                size: s.size,
            })
            .collect(),
    };
    // Retries (after a failover, a lost answer) send the same request ID:
    // the cluster applies the submit once and answers a retry with the same
    // build.
    let submit_timeout = RPC_TIMEOUT
        + Duration::from_secs(request.graph_json.len() as u64 / MIN_UPLOAD_BYTES_PER_SEC);
    // A source the cluster had when asked may be collected before the
    // submit lands (FAILED_PRECONDITION names it): uploaded again, once.
    let mut uploads_left = 2;
    let submitted: SubmitBuildResponse = loop {
        uploads_left -= 1;
        match upload_missing(&cluster, &sources).await {
            Ok(count) => tracing::debug!(count, "uploaded source blobs"),
            Err(UploadError::Call(e)) => return print_error(err, e.exit_code(), e),
            Err(e @ UploadError::Read { .. }) => {
                return print_error(err, exit_code::BAD_INPUT, e);
            }
        }
        let submit = cluster
            .call("submit the build", Some(submit_timeout), |channel| {
                let request = request.clone();
                async move {
                    Ok(client_api(channel)
                        .submit_build(request)
                        .await?
                        .into_inner())
                }
            })
            .await;
        match submit {
            Ok(response) => break response,
            Err(CallError::Rejected { status, .. })
                if status.code() == tonic::Code::FailedPrecondition && uploads_left > 0 =>
            {
                tracing::debug!("{}; uploading the sources again", status.message());
            }
            Err(e) => return print_error(err, e.exit_code(), e),
        }
    };
    let build_id = submitted.build_id;

    // From here Ctrl-C cancels the build on the cluster (its unfinished
    // jobs are skipped, runs no other build needs are stopped).
    let follow = async {
        let mut reporter = Reporter::new(args.json, out, progress);
        reporter.build_started(build_id, u64::from(submitted.job_count));
        reporter.note(&format!(
            "build {build_id}: {} jobs submitted",
            submitted.job_count
        ));

        // Artifacts of the jobs that succeeded, by job ID.
        let mut artifacts: HashMap<String, (Bytes, u64)> = HashMap::new();
        let watched = watch_build(&cluster, build_id, |watched| {
            let event = match watched {
                Watched::Event(event) => event,
                Watched::CaughtUp => return reporter.caught_up(),
            };
            if let Some(build_event::Event::JobFinished(f)) = &event.event
                && f.exit_code == 0
                && f.error.is_empty()
            {
                // A copy: the field is a view into the whole event's
                // buffer (its outputs, up to 2 MiB), which a clone would
                // keep alive for the rest of the build.
                artifacts.insert(
                    f.job_id.clone(),
                    (Bytes::copy_from_slice(&f.artifact_digest), f.artifact_size),
                );
            }
            reporter.event(event);
        })
        .await;
        if let Err(e) = watched {
            reporter.finish(build_id, started.elapsed());
            return print_error(err, e.exit_code(), e);
        }
        let tally = reporter.tally.clone();
        let build_ok = reporter.finished.as_ref().is_some_and(|f| f.ok)
            && tally.failed == 0
            && tally.skipped == 0;
        let code = if build_ok {
            exit_code::OK
        } else {
            exit_code::BUILD_FAILED
        };

        if let Some(output_dir) = &args.output_dir {
            // Every leaf that succeeded, even when others failed.
            let mut outputs = Vec::new();
            for leaf in graph.leaves() {
                let Some((digest, size)) = artifacts.get(&leaf.id.to_string()) else {
                    continue;
                };
                match digest_from_wire(digest, "artifact digest") {
                    Ok(digest) => outputs.push(Output {
                        job_id: leaf.id,
                        name: leaf.name.clone(),
                        digest,
                        size: *size,
                    }),
                    Err(problem) => {
                        reporter.finish(build_id, started.elapsed());
                        return print_error(
                            err,
                            exit_code::BUILD_FAILED,
                            format!("job {}: the cluster reported no output: {problem}", leaf.id),
                        );
                    }
                }
            }
            match download_outputs(&cluster, &outputs, output_dir).await {
                Ok(()) => reporter.note(&format!(
                    "downloaded {} outputs to {}",
                    outputs.len(),
                    output_dir.display()
                )),
                Err(e) => {
                    reporter.finish(build_id, started.elapsed());
                    let fail_code = match &e {
                        DownloadError::Call(call) => call.exit_code(),
                        _ => exit_code::BUILD_FAILED,
                    };
                    return print_error(err, fail_code.max(code), e);
                }
            }
        }
        reporter.finish(build_id, started.elapsed());
        code
    };
    let interrupted = tokio::select! {
        code = follow => return code,
        _ = tokio::signal::ctrl_c() => true,
    };
    debug_assert!(interrupted);
    cancel_build(&cluster, build_id, err).await
}

/// Cancels build `build_id` after Ctrl-C (bounded: a cluster that does not
/// answer within a few seconds leaves the build running) and returns
/// [`exit_code::INTERRUPTED`].
async fn cancel_build(cluster: &Cluster, build_id: u64, err: &mut dyn Write) -> i32 {
    let cancel = cluster.call(
        "cancel the build",
        Some(RPC_TIMEOUT),
        |channel| async move {
            Ok(client_api(channel)
                .cancel_build(CancelBuildRequest { build_id })
                .await?
                .into_inner())
        },
    );
    match tokio::time::timeout(CANCEL_TIMEOUT, cancel).await {
        Ok(Ok(_)) => print_error(
            err,
            exit_code::INTERRUPTED,
            format!("interrupted: build {build_id} cancelled"),
        ),
        Ok(Err(e)) => print_error(
            err,
            exit_code::INTERRUPTED,
            format!("interrupted; cancelling build {build_id} failed: {e}"),
        ),
        Err(_) => print_error(
            err,
            exit_code::INTERRUPTED,
            format!(
                "interrupted; build {build_id} could not be cancelled within {CANCEL_TIMEOUT:?}"
            ),
        ),
    }
}
