//! Running one job in its sandbox directory:
//!
//! ```text
//! <sandbox>/src/             the job's inputs at their relative paths
//! <sandbox>/out/             empty; packed into the artifact on success
//! <sandbox>/deps/<job id>/   each dependency's artifact, unpacked
//! <sandbox>/tmp/             working directory when a command names none
//! ```
//!
//! Templates expand to these absolute paths. Commands run in order; the
//! first non-zero exit stops the job and is its exit code. A job that
//! cannot run at all (an input missing, a template or I/O error, a program
//! not found) ends with exit code -1 and a one-line `error`; when that is
//! because dependency artifacts could be fetched from none of their holders,
//! the outcome also lists them (`lost_inputs`), so the coordinators rebuild
//! them instead of counting a failure. Only the commands hold one of the
//! worker's run slots (`turns`): inputs are staged before, outputs packed
//! after.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use distbuild_proto::graph::{Cmd, GraphError, NoDepOutput, TemplateDirs, check_relative_path};
use distbuild_proto::v1::Assignment;
use distbuild_proto::wire::{
    DigestFieldError, MAX_JOB_ERROR_BYTES, MAX_JOB_OUTPUT_BYTES, command_from_wire,
    digest_from_wire,
};
use distbuild_proto::{Digest, IdError, JobId, artifact, text};
use futures::{StreamExt, TryStreamExt};

use crate::cache::{Cache, Pin};
use crate::connect::SharedConnector;
use crate::coordinator::CoordinatorClient;
use crate::fetch::{FetchError, fetch_artifact, fetch_source_blob};
use crate::process::{ProcessOutput, ProcessRunner, ProcessSpec};
use crate::turns::Ticket;

/// Inputs (or dependencies) of one job fetched at once.
pub const MAX_PARALLEL_FETCHES: usize = 4;

/// Exit code reported when a job could not be run at all.
pub const EXIT_CODE_NOT_RUN: i32 = -1;

/// An input file of a job, from its assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    /// Relative path under the source directory (checked not to escape).
    pub path: String,
    /// Digest of its content.
    pub digest: Digest,
    /// Size of its content in bytes.
    pub size: u64,
}

/// A dependency's artifact, from an assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepArtifact {
    /// The ID the job's templates use for it.
    pub job_id: JobId,
    /// Digest of the artifact.
    pub digest: Digest,
    /// Size of the artifact in bytes.
    pub size: u64,
    /// Peer addresses of workers holding it, tried in order.
    pub holders: Vec<String>,
}

/// A validated assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    /// The lease's fencing token.
    pub lease_token: u64,
    /// The job's cache key, echoed in its result.
    pub cache_key: Digest,
    /// The job's ID as its graph gives it.
    pub job_id: JobId,
    /// The job's name, for logs.
    pub name: String,
    /// Its commands, templates parsed.
    pub cmds: Vec<Cmd>,
    /// Its source files.
    pub inputs: Vec<InputFile>,
    /// Its dependencies' artifacts.
    pub deps: Vec<DepArtifact>,
    /// How long its commands may run, all together.
    pub timeout: Duration,
}

/// Why an assignment from the wire is not a job this worker can run. The
/// message is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignmentError {
    /// The job's ID is not one.
    #[error("job ID: {0}")]
    JobId(IdError),
    /// A dependency's ID is not one.
    #[error("dependency ID: {0}")]
    DepId(IdError),
    /// A digest field is not a digest.
    #[error(transparent)]
    Digest(#[from] DigestFieldError),
    /// An input's path is absolute, climbs out, or is empty.
    #[error("input path {path:?} {problem}")]
    InputPath {
        /// The path.
        path: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A command does not parse (or names a dependency the job lacks).
    #[error(transparent)]
    Command(#[from] GraphError),
    /// No time limit: every job runs under one.
    #[error("timeout_ms is 0: every job needs a time limit")]
    NoTimeout,
}

impl JobSpec {
    /// Validates an assignment from the wire: IDs, digests, paths and
    /// templates.
    pub fn from_wire(assignment: &Assignment) -> Result<Self, AssignmentError> {
        let job_id: JobId = assignment.job_id.parse().map_err(AssignmentError::JobId)?;
        let cache_key = digest_from_wire(&assignment.cache_key, "cache_key")?;
        let deps = assignment
            .deps
            .iter()
            .map(|dep| {
                Ok(DepArtifact {
                    job_id: dep.job_id.parse().map_err(AssignmentError::DepId)?,
                    digest: digest_from_wire(&dep.digest, "dependency digest")?,
                    size: dep.size,
                    holders: dep.holders.clone(),
                })
            })
            .collect::<Result<Vec<_>, AssignmentError>>()?;
        let inputs = assignment
            .inputs
            .iter()
            .map(|input| {
                check_relative_path(&input.path).map_err(|problem| AssignmentError::InputPath {
                    path: input.path.clone(),
                    problem,
                })?;
                Ok(InputFile {
                    path: input.path.clone(),
                    digest: digest_from_wire(&input.digest, "input digest")?,
                    size: input.size,
                })
            })
            .collect::<Result<Vec<_>, AssignmentError>>()?;
        if assignment.timeout_ms == 0 {
            return Err(AssignmentError::NoTimeout);
        }
        let dep_ids: HashSet<JobId> = deps.iter().map(|d| d.job_id).collect();
        let label = if assignment.name.is_empty() {
            assignment.job_id.clone()
        } else {
            assignment.name.clone()
        };
        let cmds = assignment
            .cmds
            .iter()
            .map(|cmd| command_from_wire(&label, cmd, &dep_ids))
            .collect::<Result<Vec<_>, GraphError>>()?;
        Ok(Self {
            lease_token: assignment.lease_token,
            cache_key,
            job_id,
            name: assignment.name.clone(),
            cmds,
            inputs,
            deps,
            timeout: Duration::from_millis(assignment.timeout_ms),
        })
    }
}

/// How a job ended (when it was not cancelled).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobOutcome {
    /// The first non-zero exit code, 0 on success, [`EXIT_CODE_NOT_RUN`]
    /// when it could not be run.
    pub exit_code: i32,
    /// Stdout of its commands, concatenated and capped.
    pub stdout: Vec<u8>,
    /// Stderr of its commands, concatenated and capped.
    pub stderr: Vec<u8>,
    /// Why it could not be run (one line); empty otherwise.
    pub error: String,
    /// Digest and size of its packed output directory (in the cache), when
    /// it succeeded.
    pub artifact: Option<(Digest, u64)>,
    /// Artifacts fetched from peers into the cache for it.
    pub fetched_artifacts: Vec<Digest>,
    /// Dependency artifacts that no holder could serve, each with the
    /// holders tried (with exit code [`EXIT_CODE_NOT_RUN`] and an `error`
    /// naming them): the job did not run for want of them.
    pub lost_inputs: Vec<(Digest, Vec<String>)>,
    /// How long its staged commands waited for a run slot, in
    /// milliseconds.
    pub queued_ms: u64,
}

/// What a job needs from the worker.
#[derive(Clone)]
pub struct JobEnv {
    /// Where inputs, dependencies and the artifact are kept.
    pub cache: Cache,
    /// Source of input blobs missing from the cache.
    pub coordinator: Arc<CoordinatorClient>,
    /// Dials the peers holding dependencies.
    pub connector: SharedConnector,
    /// Runs the commands' processes.
    pub runner: Arc<dyn ProcessRunner>,
    /// Bytes of dependency artifacts fetched from peers so far.
    pub peer_bytes_fetched: Arc<std::sync::atomic::AtomicU64>,
    /// Bytes of sources and CAS blobs fetched from the coordinators so far.
    pub coordinator_bytes_fetched: Arc<std::sync::atomic::AtomicU64>,
}

/// A job's captured output across its commands.
#[derive(Default)]
struct OutputLog {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    stdout_truncated: bool,
    stderr_truncated: bool,
}

fn append_capped(into: &mut Vec<u8>, truncated: &mut bool, data: &[u8], data_truncated: bool) {
    let room = MAX_JOB_OUTPUT_BYTES.saturating_sub(into.len());
    if data.len() > room || data_truncated {
        *truncated = true;
    }
    into.extend_from_slice(&data[..data.len().min(room)]);
}

/// The note after output cut at the bound.
pub fn truncated_note() -> String {
    format!("\n[truncated: output exceeded {MAX_JOB_OUTPUT_BYTES} bytes]\n")
}

impl OutputLog {
    fn append(&mut self, output: &ProcessOutput) {
        append_capped(
            &mut self.stdout,
            &mut self.stdout_truncated,
            &output.stdout,
            output.stdout_truncated,
        );
        append_capped(
            &mut self.stderr,
            &mut self.stderr_truncated,
            &output.stderr,
            output.stderr_truncated,
        );
    }

    fn finish(mut self) -> (Vec<u8>, Vec<u8>) {
        if self.stdout_truncated {
            self.stdout.extend_from_slice(truncated_note().as_bytes());
        }
        if self.stderr_truncated {
            self.stderr.extend_from_slice(truncated_note().as_bytes());
        }
        (self.stdout, self.stderr)
    }
}

/// The directories of a sandbox.
struct Layout {
    root: PathBuf,
    src: PathBuf,
    out: PathBuf,
    deps: PathBuf,
    tmp: PathBuf,
}

impl Layout {
    fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            src: root.join("src"),
            out: root.join("out"),
            deps: root.join("deps"),
            tmp: root.join("tmp"),
        }
    }

    /// Makes the directories, from the slot's spare if it has one.
    fn create(&self) -> io::Result<()> {
        crate::jobdir::make(&self.root, &["src", "out", "deps", "tmp"])
    }
}

/// A time limit as a person reads it: whole seconds when it is some.
pub(crate) fn describe_limit(limit: Duration) -> String {
    if limit.subsec_millis() == 0 {
        format!("{} s", limit.as_secs())
    } else {
        format!("{} ms", limit.as_millis())
    }
}

/// Runs blocking filesystem work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    distbuild_proto::blocking::run(work).await
}

fn utf8(path: &Path) -> Result<String, String> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| format!("sandbox path {} is not UTF-8", path.display()))
}

/// Why an input or a dependency could not be put in the sandbox.
#[derive(Debug)]
struct StageError {
    /// One line, naming the input or dependency.
    message: String,
    /// Set when it is an artifact that none of its holders could serve.
    lost: Option<Digest>,
}

impl From<String> for StageError {
    fn from(message: String) -> Self {
        Self {
            message,
            lost: None,
        }
    }
}

/// Opens `digest` from the cache, pinned, fetching it with `fetch` when it
/// is absent. Returns whether a fetch happened.
async fn open_or_fetch<F, Fut>(
    cache: &Cache,
    digest: Digest,
    what: &str,
    fetch: F,
) -> Result<(fs::File, Pin, bool), StageError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), FetchError>>,
{
    let mut fetched = false;
    // A second round only when the blob was evicted between its fetch and
    // its opening (a cache too small for the work at hand).
    for _ in 0..2 {
        let reader = cache.clone();
        let opened = blocking(move || reader.open_blob(digest).map_err(|e| e.to_string()))
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        if let Some((file, pin)) = opened {
            return Ok((file, pin, fetched));
        }
        fetch().await.map_err(|e| StageError {
            message: format!("{what}: {e}"),
            lost: e.lost_digest(),
        })?;
        fetched = true;
    }
    Err(
        format!("{what}: blob {digest} was evicted as soon as it was fetched (cache too small?)")
            .into(),
    )
}

/// Inputs copied from the cache by one blocking task: a C compile's
/// headers take one, a job with thousands of inputs several at once.
const INPUTS_PER_COPY_TASK: usize = 64;

/// Copies into the job's source directory every input of `inputs` the
/// cache holds, in one blocking task (a hop to a blocking thread to open
/// each input and another to copy it cost the worker more than the
/// copies); returns those it does not hold, for [`stage_input`].
async fn copy_cached_inputs(
    cache: &Cache,
    inputs: &[InputFile],
    src: &Path,
) -> Result<Vec<InputFile>, String> {
    let cache = cache.clone();
    let inputs = inputs.to_vec();
    let src = src.to_path_buf();
    blocking(move || {
        let mut absent = Vec::new();
        for input in inputs {
            let what = || format!("input {:?}", input.path);
            let opened = cache
                .open_blob(input.digest)
                .map_err(|e| format!("{}: {e}", what()))?;
            let Some((mut file, _pin)) = opened else {
                absent.push(input);
                continue;
            };
            let dest = src.join(&input.path);
            copy_input(&mut file, &dest)
                .map_err(|e| format!("{}: write {}: {e}", what(), dest.display()))?;
        }
        Ok(absent)
    })
    .await
}

/// Writes the content of `file` to a new file at `dest`.
fn copy_input(file: &mut fs::File, dest: &Path) -> io::Result<()> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    let mut out = fs::File::create(dest)?;
    io::copy(file, &mut out)?;
    Ok(())
}

/// Fetches `input` into the cache if it is absent, and copies it into the
/// job's source directory.
async fn stage_input(env: &JobEnv, input: &InputFile, layout: &Layout) -> Result<(), String> {
    let what = format!("input {:?}", input.path);
    let (mut file, pin, _) = open_or_fetch(&env.cache, input.digest, &what, || async {
        fetch_source_blob(&env.coordinator, &env.cache, input.digest, input.size).await?;
        env.coordinator_bytes_fetched
            .fetch_add(input.size, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    })
    .await
    .map_err(|e| e.message)?;
    let dest = layout.src.join(&input.path);
    blocking(move || {
        let _pin = pin;
        copy_input(&mut file, &dest).map_err(|e| format!("{what}: write {}: {e}", dest.display()))
    })
    .await
}

/// Stages one dependency; returns whether its artifact came from a peer.
async fn stage_dep(env: &JobEnv, dep: &DepArtifact, layout: &Layout) -> Result<bool, StageError> {
    let what = format!("dependency {}", dep.job_id);
    let (file, pin, fetched) = open_or_fetch(&env.cache, dep.digest, &what, || async {
        fetch_artifact(
            &env.connector,
            &dep.holders,
            &env.cache,
            dep.digest,
            dep.size,
        )
        .await?;
        env.peer_bytes_fetched
            .fetch_add(dep.size, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    })
    .await?;
    let dest = layout.deps.join(dep.job_id.to_string());
    blocking(move || {
        let _pin = pin;
        // File content in a tar never exceeds the tar's own size.
        let max_bytes = file
            .metadata()
            .map_err(|e| format!("{what}: stat its artifact: {e}"))?
            .len();
        artifact::unpack(io::BufReader::new(file), &dest, max_bytes)
            .map_err(|e| format!("{what}: unpack its artifact: {e}"))
    })
    .await?;
    Ok(fetched)
}

/// Why a command cannot be run as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// A template names a dependency without a directory.
    #[error(transparent)]
    Template(#[from] NoDepOutput),
    /// An exec whose argv is empty.
    #[error("exec with no program")]
    NoProgram,
    /// An environment entry without `=` (or with an empty name).
    #[error("environment entry {0:?} is not NAME=VALUE")]
    BadEnvironment(String),
}

fn parse_environ(entries: Vec<String>) -> Result<Vec<(OsString, OsString)>, CommandError> {
    entries
        .into_iter()
        .map(|entry| match entry.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.into(), value.into())),
            _ => Err(CommandError::BadEnvironment(entry)),
        })
        .collect()
}

/// The absolute directories templates expand to.
#[derive(Debug, Clone)]
pub struct SandboxDirs {
    /// `{{.SourceDir}}`.
    pub source_dir: String,
    /// `{{.OutputDir}}`.
    pub output_dir: String,
    /// `{{index .Deps "<id>"}}`, by dependency.
    pub dep_dirs: HashMap<JobId, String>,
    /// Working directory of commands that name none; relative paths
    /// resolve against it.
    pub scratch_dir: PathBuf,
    /// The job's own directory (all of the above are in it).
    pub job_dir: PathBuf,
}

/// A command with its templates expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpandedCmd {
    /// A process to run (its output bound is the job's).
    Exec(ProcessSpec),
    /// Text to write to a file.
    Cat {
        /// The expanded template.
        text: String,
        /// The file to write it to.
        path: PathBuf,
    },
}

/// Expands `cmd`'s templates against `dirs`.
pub fn expand_command(cmd: &Cmd, dirs: &SandboxDirs) -> Result<ExpandedCmd, CommandError> {
    let dep_output = |id: &JobId| dirs.dep_dirs.get(id).cloned();
    let template_dirs = TemplateDirs {
        source_dir: &dirs.source_dir,
        output_dir: &dirs.output_dir,
        dep_output: &dep_output,
    };
    let expand_all = |templates: &[distbuild_proto::graph::Template]| {
        templates
            .iter()
            .map(|t| t.expand(&template_dirs))
            .collect::<Result<Vec<_>, _>>()
    };
    match cmd {
        Cmd::Exec {
            argv,
            environ,
            working_directory,
        } => {
            let mut args = expand_all(argv)?.into_iter();
            let program = args.next().ok_or(CommandError::NoProgram)?;
            let environ = expand_all(environ)?;
            let cwd = match working_directory {
                None => dirs.scratch_dir.clone(),
                Some(t) => dirs.scratch_dir.join(t.expand(&template_dirs)?),
            };
            Ok(ExpandedCmd::Exec(ProcessSpec {
                program: program.into(),
                args: args.map(OsString::from).collect(),
                env: if environ.is_empty() {
                    None
                } else {
                    Some(parse_environ(environ)?)
                },
                cwd,
                job_dir: dirs.job_dir.clone(),
                max_output_bytes: MAX_JOB_OUTPUT_BYTES,
            }))
        }
        Cmd::Cat { template, output } => Ok(ExpandedCmd::Cat {
            text: template.expand(&template_dirs)?,
            path: dirs.scratch_dir.join(output.expand(&template_dirs)?),
        }),
    }
}

enum Finished {
    Succeeded {
        digest: Digest,
        size: u64,
    },
    Failed {
        exit_code: i32,
    },
    /// Not run: these dependency artifacts could be fetched from none of
    /// their holders.
    LostInputs {
        error: String,
        lost: Vec<(Digest, Vec<String>)>,
    },
}

async fn run_steps(
    env: &JobEnv,
    spec: &JobSpec,
    layout: &Layout,
    log: &mut OutputLog,
    fetched_artifacts: &mut Vec<Digest>,
    ticket: Ticket,
    queued_ms: &mut u64,
) -> Result<Finished, String> {
    {
        let root = layout.root.clone();
        let layout = Layout::new(&root);
        blocking(move || {
            layout
                .create()
                .map_err(|e| format!("create sandbox {}: {e}", root.display()))
        })
        .await?;
    }

    // Futures collected first: a stream holding the mapping closure trips
    // the compiler's higher-ranked lifetime check once spawned.
    let copies: Vec<_> = spec
        .inputs
        .chunks(INPUTS_PER_COPY_TASK)
        .map(|chunk| copy_cached_inputs(&env.cache, chunk, &layout.src))
        .collect();
    let absent: Vec<InputFile> = futures::stream::iter(copies)
        .buffer_unordered(MAX_PARALLEL_FETCHES)
        .try_concat()
        .await?;
    let staged_inputs: Vec<_> = absent
        .iter()
        .map(|input| stage_input(env, input, layout))
        .collect();
    futures::stream::iter(staged_inputs)
        .buffer_unordered(MAX_PARALLEL_FETCHES)
        .try_collect::<()>()
        .await?;
    // Every lost dependency is found before giving up, so one report lets
    // the coordinators rebuild them all; any other failure ends the job.
    let staged_deps: Vec<_> = spec
        .deps
        .iter()
        .map(|dep| stage_dep(env, dep, layout))
        .collect();
    let mut staged_deps = futures::stream::iter(staged_deps).buffered(MAX_PARALLEL_FETCHES);
    let mut deps = spec.deps.iter();
    let mut lost: Vec<(Digest, Vec<String>, String)> = Vec::new();
    while let Some(staged) = staged_deps.next().await {
        let dep = deps.next().expect("one result per dependency");
        match staged {
            Ok(true) => fetched_artifacts.push(dep.digest),
            Ok(false) => {}
            Err(StageError {
                message,
                lost: Some(digest),
            }) => lost.push((digest, dep.holders.clone(), message)),
            Err(StageError {
                message,
                lost: None,
            }) => return Err(message),
        }
    }
    if !lost.is_empty() {
        let error = lost
            .iter()
            .map(|(_, _, message)| message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        return Ok(Finished::LostInputs {
            error,
            lost: lost
                .into_iter()
                .map(|(digest, tried, _)| (digest, tried))
                .collect(),
        });
    }

    let source_dir = utf8(&layout.src)?;
    let output_dir = utf8(&layout.out)?;
    let dep_dirs = spec
        .deps
        .iter()
        .map(|dep| Ok((dep.job_id, utf8(&layout.deps.join(dep.job_id.to_string()))?)))
        .collect::<Result<HashMap<JobId, String>, String>>()?;
    let dirs = SandboxDirs {
        source_dir,
        output_dir,
        dep_dirs,
        scratch_dir: layout.tmp.clone(),
        job_dir: layout.root.clone(),
    };

    // Staged before the job takes a run slot and packed after it gives it
    // back: only the commands hold one.
    let turn = ticket.turn().await;
    *queued_ms = turn.queued_ms;
    // The commands run under the job's time limit; dropping them at the
    // limit kills their processes (each command's whole process group).
    let commands = async {
        for (index, cmd) in spec.cmds.iter().enumerate() {
            let number = index + 1;
            let in_command = move |problem: String| format!("command {number}: {problem}");
            match expand_command(cmd, &dirs).map_err(|e| in_command(e.to_string()))? {
                ExpandedCmd::Exec(process) => {
                    // A program name comes from the graph, of any length.
                    let program = text::shortened(&process.program.to_string_lossy(), 256);
                    let output = env
                        .runner
                        .run(process)
                        .await
                        .map_err(|e| in_command(format!("run {program:?}: {e}")))?;
                    log.append(&output);
                    if let Some(limit) = &output.limit_hit {
                        return Err(in_command(limit.clone()));
                    }
                    if output.exit_code != 0 {
                        return Ok(Some(Finished::Failed {
                            exit_code: output.exit_code,
                        }));
                    }
                }
                ExpandedCmd::Cat { text, path } => {
                    blocking(move || {
                        let write = || -> io::Result<()> {
                            if let Some(parent) = path.parent() {
                                fs::create_dir_all(parent)?;
                            }
                            fs::write(&path, text.as_bytes())
                        };
                        write().map_err(|e| in_command(format!("write {}: {e}", path.display())))
                    })
                    .await?;
                }
            }
        }
        Ok::<Option<Finished>, String>(None)
    };
    let ran = tokio::time::timeout(spec.timeout, commands).await;
    drop(turn);
    match ran {
        Ok(Ok(Some(failed))) => return Ok(failed),
        Ok(Ok(None)) => {}
        Ok(Err(error)) => return Err(error),
        Err(_) => {
            return Err(format!(
                "timed out after {}: its processes were killed",
                describe_limit(spec.timeout)
            ));
        }
    }

    let cache = env.cache.clone();
    let out = layout.out.clone();
    let (digest, size) = blocking(move || {
        // Packed straight into the cache, hashed as it is written.
        let mut temp = cache
            .temp_file()
            .map_err(|e| format!("create the artifact file: {e}"))?;
        let (digest, size) = {
            let mut writer = BufWriter::new(temp.as_file_mut());
            let packed =
                artifact::pack(&out, &mut writer).map_err(|e| format!("pack outputs: {e}"))?;
            writer
                .flush()
                .map_err(|e| format!("write the artifact: {e}"))?;
            packed
        };
        // An artifact the cache cannot hold would be evicted as soon as it
        // was stored, and every dependent would find it lost.
        if size > cache.max_bytes() {
            return Err(format!(
                "the outputs pack to {size} bytes, more than this worker's cache holds ({} bytes, --cache-max-bytes)",
                cache.max_bytes()
            ));
        }
        cache
            .adopt(temp, digest, size)
            .map_err(|e| format!("store the artifact: {e}"))?;
        Ok((digest, size))
    })
    .await?;
    Ok(Finished::Succeeded { digest, size })
}

/// Runs the job described by `spec` in sandbox directory `sandbox`
/// (created afresh; the caller removes it afterwards). Cancel by dropping
/// the future: running processes are killed.
pub async fn run_job(env: &JobEnv, spec: &JobSpec, sandbox: &Path, ticket: Ticket) -> JobOutcome {
    let layout = Layout::new(sandbox);
    let mut log = OutputLog::default();
    let mut fetched_artifacts = Vec::new();
    let mut queued_ms = 0;
    let result = run_steps(
        env,
        spec,
        &layout,
        &mut log,
        &mut fetched_artifacts,
        ticket,
        &mut queued_ms,
    )
    .await;
    let (stdout, stderr) = log.finish();
    let mut outcome = JobOutcome {
        stdout,
        stderr,
        fetched_artifacts,
        queued_ms,
        ..JobOutcome::default()
    };
    match result {
        Ok(Finished::Succeeded { digest, size }) => {
            outcome.exit_code = 0;
            outcome.artifact = Some((digest, size));
        }
        Ok(Finished::Failed { exit_code }) => outcome.exit_code = exit_code,
        Ok(Finished::LostInputs { error, lost }) => {
            outcome.exit_code = EXIT_CODE_NOT_RUN;
            outcome.error = error;
            outcome.lost_inputs = lost;
        }
        Err(error) => {
            outcome.exit_code = EXIT_CODE_NOT_RUN;
            outcome.error = error;
        }
    }
    // One line within the bound, whatever the underlying errors said (they
    // may quote a program name or path of any length from the graph).
    outcome.error = outcome.error.replace('\n', " ");
    text::cut(&mut outcome.error, MAX_JOB_ERROR_BYTES, " [cut]");
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connect::TcpConnector;
    use crate::process::TokioProcessRunner;
    use crate::turns::{Priority, RunSlots};
    use distbuild_proto::graph::Template;

    const DEP: &str = "1111111111111111111111111111111111111111";
    const JOB: &str = "2222222222222222222222222222222222222222";

    fn dep_id() -> JobId {
        DEP.parse().expect("valid ID")
    }

    fn template(text: &str) -> Template {
        Template::parse("test", text, &HashSet::from([dep_id()])).expect("valid template")
    }

    fn exec(argv: &[&str], environ: &[&str], working_directory: Option<&str>) -> Cmd {
        Cmd::Exec {
            argv: argv.iter().map(|a| template(a)).collect(),
            environ: environ.iter().map(|e| template(e)).collect(),
            working_directory: working_directory.map(template),
        }
    }

    fn sh(script: &str) -> Cmd {
        exec(&["/bin/sh", "-c", script], &[], None)
    }

    fn cat(text: &str, output: &str) -> Cmd {
        Cmd::Cat {
            template: template(text),
            output: template(output),
        }
    }

    #[test]
    fn expansion_table() {
        let dirs = SandboxDirs {
            source_dir: "/s/src".into(),
            output_dir: "/s/out".into(),
            dep_dirs: HashMap::from([(dep_id(), format!("/s/deps/{DEP}"))]),
            scratch_dir: "/s/tmp".into(),
            job_dir: "/s".into(),
        };
        let process = |program: &str, args: &[&str], env: Option<&[(&str, &str)]>, cwd: &str| {
            ExpandedCmd::Exec(ProcessSpec {
                program: program.into(),
                args: args.iter().map(OsString::from).collect(),
                env: env.map(|env| env.iter().map(|(k, v)| (k.into(), v.into())).collect()),
                cwd: cwd.into(),
                job_dir: "/s".into(),
                max_output_bytes: MAX_JOB_OUTPUT_BYTES,
            })
        };
        let dep_arg = format!("{{{{index .Deps \"{DEP}\"}}}}/lib.a");
        let dep_path = format!("/s/deps/{DEP}/lib.a");
        let cases: Vec<(Cmd, Result<ExpandedCmd, &str>)> = vec![
            (
                exec(
                    &[
                        "cc",
                        "{{.SourceDir}}/a.c",
                        "-o",
                        "{{.OutputDir}}/a",
                        &dep_arg,
                    ],
                    &[],
                    None,
                ),
                Ok(process(
                    "cc",
                    &["/s/src/a.c", "-o", "/s/out/a", &dep_path],
                    None,
                    "/s/tmp",
                )),
            ),
            (
                exec(
                    &["make"],
                    &["OUT={{.OutputDir}}", "EMPTY="],
                    Some("{{.SourceDir}}/sub"),
                ),
                Ok(process(
                    "make",
                    &[],
                    Some(&[("OUT", "/s/out"), ("EMPTY", "")]),
                    "/s/src/sub",
                )),
            ),
            (
                exec(&["true"], &[], Some("rel")),
                Ok(process("true", &[], None, "/s/tmp/rel")),
            ),
            (
                cat("in {{.SourceDir}}", "{{.OutputDir}}/x/y.txt"),
                Ok(ExpandedCmd::Cat {
                    text: "in /s/src".into(),
                    path: "/s/out/x/y.txt".into(),
                }),
            ),
            (
                cat("t", "relative.txt"),
                Ok(ExpandedCmd::Cat {
                    text: "t".into(),
                    path: "/s/tmp/relative.txt".into(),
                }),
            ),
            (
                exec(&["env"], &["NOEQUALS"], None),
                Err("environment entry \"NOEQUALS\" is not NAME=VALUE"),
            ),
            (exec(&["env"], &["=x"], None), Err("is not NAME=VALUE")),
        ];
        for (cmd, want) in cases {
            let got = expand_command(&cmd, &dirs);
            match want {
                Ok(want) => assert_eq!(got, Ok(want), "{cmd:?}"),
                Err(problem) => {
                    let err = got.expect_err("refused").to_string();
                    assert!(err.contains(problem), "{cmd:?}: {err}");
                }
            }
        }
        // A dependency without a directory cannot be expanded.
        let bare = SandboxDirs {
            dep_dirs: HashMap::new(),
            ..dirs
        };
        let err = expand_command(&exec(&[&dep_arg], &[], None), &bare)
            .expect_err("no dir")
            .to_string();
        assert!(err.contains("no output directory for dependency"), "{err}");
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        env: JobEnv,
        /// The worker's one run slot.
        run_slots: RunSlots,
        sandbox: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let cache = Cache::open(&dir.path().join("cache"), 1 << 30).expect("cache");
        let connector: SharedConnector = Arc::new(TcpConnector::default());
        // Never called: these jobs have no inputs or dependencies.
        let coordinator = Arc::new(CoordinatorClient::new(
            vec!["127.0.0.1:1".into()],
            connector.clone(),
        ));
        let sandbox = dir.path().join("sandbox/7");
        Fixture {
            env: JobEnv {
                cache,
                coordinator,
                connector,
                runner: Arc::new(TokioProcessRunner::default()),
                peer_bytes_fetched: Default::default(),
                coordinator_bytes_fetched: Default::default(),
            },
            run_slots: RunSlots::new(1),
            sandbox,
            _dir: dir,
        }
    }

    impl Fixture {
        /// A place in line for the fixture's one run slot.
        fn ticket(&self) -> Ticket {
            self.run_slots.ticket(Priority::default())
        }
    }

    fn spec(cmds: Vec<Cmd>) -> JobSpec {
        JobSpec {
            lease_token: 7,
            cache_key: Digest::of(b"key"),
            job_id: JOB.parse().expect("valid ID"),
            name: "test".into(),
            cmds,
            inputs: vec![],
            deps: vec![],
            timeout: Duration::from_secs(60),
        }
    }

    /// A job stages its inputs before it waits for a run slot (a job held
    /// ahead is ready the moment one frees), and its commands wait for it.
    #[tokio::test]
    async fn a_job_stages_its_inputs_before_it_waits_for_a_run_slot() {
        let f = fixture();
        let content = b"#define X 1\n";
        let digest = f.env.cache.insert(None, &content[..]).expect("cached");
        let mut spec = spec(vec![sh("cat {{.SourceDir}}/x.h > {{.OutputDir}}/x.h")]);
        spec.inputs = vec![InputFile {
            path: "x.h".into(),
            digest,
            size: content.len() as u64,
        }];
        let staged = f.sandbox.join("src/x.h");
        let ran = f.sandbox.join("out/x.h");
        let held = f.run_slots.ticket(Priority::default()).turn().await;
        let other_job = async {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !staged.exists() {
                assert!(std::time::Instant::now() < deadline, "input never staged");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!ran.exists(), "a command ran without a run slot");
            drop(held);
        };
        let ticket = f.run_slots.ticket(Priority {
            path_ms: 0,
            lease_token: spec.lease_token,
        });
        let (outcome, ()) = tokio::join!(run_job(&f.env, &spec, &f.sandbox, ticket), other_job);
        assert_eq!((outcome.exit_code, outcome.error.as_str()), (0, ""));
        assert!(outcome.artifact.is_some());
        assert!(
            (250..5_000).contains(&outcome.queued_ms),
            "waited for the slot, not the staging: {} ms",
            outcome.queued_ms
        );
        assert_eq!(f.run_slots.free(), 1, "the slot was given back");
    }

    #[tokio::test]
    async fn a_job_over_its_time_is_killed_and_fails_saying_so() {
        let f = fixture();
        let marker = f.sandbox.with_file_name("still-running");
        let mut spec = spec(vec![sh(&format!(
            "sleep 1; echo started; sleep 30; touch {}",
            marker.display()
        ))]);
        spec.timeout = Duration::from_millis(1_500);
        let started = std::time::Instant::now();
        let outcome = run_job(&f.env, &spec, &f.sandbox, f.ticket()).await;
        assert_eq!(outcome.exit_code, EXIT_CODE_NOT_RUN);
        assert_eq!(
            outcome.error,
            "timed out after 1500 ms: its processes were killed"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(!marker.exists(), "the command was killed");
        assert_eq!(describe_limit(Duration::from_secs(2)), "2 s");
    }

    async fn run(cmds: Vec<Cmd>) -> (JobOutcome, Fixture) {
        let f = fixture();
        let outcome = run_job(&f.env, &spec(cmds), &f.sandbox, f.ticket()).await;
        (outcome, f)
    }

    /// The files of an artifact in the cache, by relative path.
    fn artifact_files(f: &Fixture, digest: Digest) -> Vec<(String, String)> {
        let (file, _pin) = f.env.cache.open_blob(digest).expect("open").expect("held");
        let dest = f._dir.path().join("unpacked");
        artifact::unpack(file, &dest, 1 << 20).expect("unpacks");
        let mut files = Vec::new();
        let mut stack = vec![dest.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).expect("list") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let rel = path.strip_prefix(&dest).expect("inside");
                    let text = fs::read_to_string(&path).expect("read");
                    files.push((rel.display().to_string(), text));
                }
            }
        }
        files.sort();
        files
    }

    #[tokio::test]
    async fn success_packs_the_output_directory() {
        let (outcome, f) = run(vec![
            sh("echo one; echo warn >&2; echo built > {{.OutputDir}}/a.txt"),
            cat("from {{.OutputDir}}", "{{.OutputDir}}/sub/b.txt"),
            sh("pwd; cat {{.OutputDir}}/sub/b.txt"),
        ])
        .await;
        assert_eq!(outcome.exit_code, 0, "{outcome:?}");
        assert_eq!(outcome.error, "");
        let out = f.sandbox.join("out");
        let tmp = f.sandbox.join("tmp");
        assert_eq!(
            String::from_utf8_lossy(&outcome.stdout),
            format!("one\n{}\nfrom {}", tmp.display(), out.display()),
            "stdout concatenates; the scratch dir is the default working directory"
        );
        assert_eq!(outcome.stderr, b"warn\n");
        let (digest, size) = outcome.artifact.expect("an artifact");
        assert!(size > 0);
        assert_eq!(
            artifact_files(&f, digest),
            vec![
                ("a.txt".to_string(), "built\n".to_string()),
                ("sub/b.txt".to_string(), format!("from {}", out.display())),
            ]
        );
    }

    #[tokio::test]
    async fn first_failure_stops_the_job() {
        let (outcome, f) = run(vec![
            sh("echo first"),
            sh("echo second; exit 3"),
            sh("echo third; touch {{.OutputDir}}/ran"),
        ])
        .await;
        assert_eq!(outcome.exit_code, 3);
        assert_eq!(outcome.stdout, b"first\nsecond\n");
        assert_eq!(outcome.error, "");
        assert!(outcome.artifact.is_none());
        assert!(
            !f.sandbox.join("out/ran").exists(),
            "later commands never run"
        );
    }

    #[tokio::test]
    async fn a_signal_is_128_plus_its_number() {
        let (outcome, _f) = run(vec![sh("kill -KILL $$")]).await;
        assert_eq!(outcome.exit_code, 128 + 9);
    }

    #[tokio::test]
    async fn a_missing_program_means_not_run() {
        let (outcome, _f) = run(vec![
            sh("echo before"),
            exec(&["/nonexistent/cc"], &[], None),
        ])
        .await;
        assert_eq!(outcome.exit_code, EXIT_CODE_NOT_RUN);
        assert!(
            outcome
                .error
                .starts_with("command 2: run \"/nonexistent/cc\""),
            "{}",
            outcome.error
        );
        assert!(!outcome.error.contains('\n'));
        assert_eq!(outcome.stdout, b"before\n", "earlier output is kept");
    }

    #[tokio::test]
    async fn environ_replaces_the_environment() {
        let (outcome, f) = run(vec![
            exec(&["/usr/bin/env"], &["A=1", "O={{.OutputDir}}"], None),
            cat("---\n", "{{.OutputDir}}/separator"),
            exec(&["/usr/bin/env"], &[], None),
        ])
        .await;
        assert_eq!(outcome.exit_code, 0, "{outcome:?}");
        let out = String::from_utf8(outcome.stdout).expect("utf8");
        let expected_head = format!("A=1\nO={}\n", f.sandbox.join("out").display());
        assert!(out.starts_with(&expected_head), "exactly Environ: {out}");
        let inherited = &out[expected_head.len()..];
        assert!(
            inherited.lines().any(|l| l.starts_with("PATH=")),
            "an empty Environ inherits the worker's: {inherited}"
        );
    }

    #[tokio::test]
    async fn output_is_capped_across_commands() {
        let half = MAX_JOB_OUTPUT_BYTES / 2 + 10;
        let (outcome, _f) = run(vec![
            sh(&format!("head -c {half} /dev/zero | tr '\\0' a")),
            sh(&format!(
                "head -c {half} /dev/zero | tr '\\0' b; echo err >&2"
            )),
        ])
        .await;
        assert_eq!(outcome.exit_code, 0);
        let note = truncated_note();
        assert_eq!(outcome.stdout.len(), MAX_JOB_OUTPUT_BYTES + note.len());
        assert!(outcome.stdout.ends_with(note.as_bytes()));
        assert_eq!(outcome.stdout[0], b'a');
        assert_eq!(
            outcome.stdout[MAX_JOB_OUTPUT_BYTES - 1],
            b'b',
            "the head is kept"
        );
        assert_eq!(outcome.stderr, b"err\n", "stderr has its own bound");
    }

    #[test]
    fn assignments_are_validated() {
        use distbuild_proto::v1;
        let good = v1::Assignment {
            lease_token: 5,
            cache_key: Digest::of(b"k").as_bytes().to_vec().into(),
            job_id: JOB.into(),
            name: "n".into(),
            cmds: vec![distbuild_proto::wire::command_to_wire(&sh(&format!(
                "cat {{{{index .Deps \"{DEP}\"}}}}/x"
            )))],
            inputs: vec![v1::InputFile {
                path: "a/b.c".into(),
                digest: Digest::of(b"src").as_bytes().to_vec().into(),
                size: 3,
            }],
            deps: vec![v1::DepArtifact {
                job_id: DEP.into(),
                digest: Digest::of(b"art").as_bytes().to_vec().into(),
                size: 9,
                holders: vec!["h:1".into()],
            }],
            timeout_ms: 2_500,
            build_id: 1,
            path_ms: 4_000,
            action: None,
        };
        let spec = JobSpec::from_wire(&good).expect("valid");
        assert_eq!(spec.timeout, Duration::from_millis(2_500));
        assert_eq!(spec.inputs[0].path, "a/b.c");
        assert_eq!(spec.deps[0].job_id, dep_id());
        type Breakage = fn(&mut v1::Assignment);
        let broken: Vec<(Breakage, &str)> = vec![
            (|a| a.job_id = "x".into(), "job ID"),
            (|a| a.cache_key = vec![1, 2].into(), "cache_key"),
            (|a| a.inputs[0].path = "../etc/passwd".into(), "climbs out"),
            (|a| a.inputs[0].path = "/etc/passwd".into(), "is absolute"),
            (|a| a.deps.clear(), "not among"),
            (|a| a.deps[0].digest = vec![].into(), "dependency digest"),
            (|a| a.timeout_ms = 0, "time limit"),
        ];
        for (breakage, problem) in broken {
            let mut assignment = good.clone();
            breakage(&mut assignment);
            let err = JobSpec::from_wire(&assignment)
                .expect_err("refused")
                .to_string();
            assert!(err.contains(problem), "{problem}: {err}");
        }
    }
}
