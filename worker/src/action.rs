//! Running one Remote Execution API v2 action (an assignment whose
//! `action` is set) in its sandbox directory:
//!
//! ```text
//! <sandbox>/root/     the action's input root, materialized from the CAS;
//!                     the command runs in root/<working_directory>
//! <sandbox>/upload/   encoded Trees, stdout and stderr waiting for upload
//! ```
//!
//! The Action, its Command and every Directory of its input root are read
//! from the coordinators' CAS (through the cache, [`crate::fetch`]), each
//! checked as it is decoded: digests of the action's one hash function,
//! names (non-empty, no `/`, not `.` or `..`, no NUL, unique within their
//! directory), symlink targets that stay in the input root, working
//! directory and output paths that stay in it too, and bounds on the tree
//! ([`MAX_INPUT_DIRECTORIES`], [`MAX_INPUT_FILES`], [`MAX_TREE_DEPTH`]).
//! The command runs through the process seam (sandboxing happens there)
//! with exactly the Command's environment, under the assignment's time
//! limit. Whatever its exit code, its outputs are collected (never
//! following a symlink), uploaded with its stdout and stderr to the CAS
//! (`UploadBlob`, each distinct blob once, never the empty blob), and
//! described by the encoded `ActionResult` the report carries.
//!
//! An action that cannot run at all (a bad message, a blob not fetchable, a
//! timeout, an I/O error) ends with exit code
//! [`EXIT_CODE_NOT_RUN`] and a one-line error. Two forms are
//! parsed by the coordinators: a blob the CAS lacks is exactly `missing
//! from the CAS: blobs/<hex>/<size>` (the first one met), a timeout
//! starts with `timed out after`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Seek};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    Action, ActionResult, Command, Digest as ReDigest, Directory, DirectoryNode,
    ExecutedActionMetadata, FileNode, OutputDirectory, OutputFile, OutputSymlink, SymlinkNode,
    Tree,
};
use bazel_remote_apis::google::protobuf::Timestamp;
use distbuild_proto::v1::Assignment;
use distbuild_proto::wire::{MAX_JOB_ERROR_BYTES, MAX_JOB_OUTPUT_BYTES};
use distbuild_proto::{BlobKey, HashFunction, IdError, text};
use futures::{StreamExt, TryStreamExt};
use prost::Message;

use crate::cache::Pin;
use crate::coordinator::Persistence;
use crate::fetch::{FetchError, fetch_blob};
use crate::job::{EXIT_CODE_NOT_RUN, JobEnv, MAX_PARALLEL_FETCHES, describe_limit, truncated_note};
use crate::process::{ProcessOutput, ProcessSpec};

/// Most directories an input root (or all of an action's output
/// directories together) may hold, the root included.
pub const MAX_INPUT_DIRECTORIES: usize = 100_000;
/// Most files an input root (or all of an action's outputs together) may
/// hold.
pub const MAX_INPUT_FILES: usize = 1_000_000;
/// Deepest nesting of directories in an input root or an output directory.
pub const MAX_TREE_DEPTH: usize = 256;
/// Longest name in an input tree (the filesystem's NAME_MAX).
pub const MAX_NAME_BYTES: usize = 255;
/// Longest path below the input root (the filesystem's PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;
/// Most bytes of all an input tree's paths together: what the worker
/// holds of a tree while it lays it out.
pub const MAX_INPUT_PATH_BYTES: usize = 256 << 20;
/// Largest Action, Command or Directory message read from the CAS.
pub const MAX_ACTION_MESSAGE_BYTES: u64 = 32 << 20;
/// Largest encoded ActionResult a report may carry (it becomes part of a
/// Raft entry).
pub const MAX_ACTION_RESULT_BYTES: usize = 256 << 10;
/// Blobs uploaded at once.
pub const MAX_PARALLEL_UPLOADS: usize = 4;
/// How long one upload keeps retrying through failovers.
pub const UPLOAD_RETRY_WINDOW: Duration = Duration::from_secs(60);
/// Bytes of a name or path from an action quoted in an error.
const MAX_QUOTED_BYTES: usize = 200;

/// A validated Remote Execution API assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionSpec {
    /// The lease's fencing token.
    pub lease_token: u64,
    /// The instance name the client gave (for logs).
    pub instance_name: String,
    /// The Action message's key; its function is every digest's.
    pub action: BlobKey,
    /// The Action message's size in bytes.
    pub action_size: u64,
    /// How long the command may run.
    pub timeout: Duration,
}

/// Why an assignment is not an action this worker can run. One line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionAssignmentError {
    /// The assignment carries no action.
    #[error("not a Remote Execution API action")]
    NotAnAction,
    /// The action digest is not a SHA-1 or SHA-256 hash.
    #[error("action_digest: {0}")]
    Digest(IdError),
    /// The action's size is negative.
    #[error("action_size {0} is negative")]
    NegativeSize(i64),
    /// No time limit: every action runs under one.
    #[error("timeout_ms is 0: every action needs a time limit")]
    NoTimeout,
}

impl ActionSpec {
    /// Validates an assignment from the wire: the action's digest (20 or
    /// 32 bytes), its size and the time limit.
    pub fn from_wire(assignment: &Assignment) -> Result<Self, ActionAssignmentError> {
        let action = assignment
            .action
            .as_ref()
            .ok_or(ActionAssignmentError::NotAnAction)?;
        let key = BlobKey::from_hash_bytes(&action.action_digest)
            .map_err(ActionAssignmentError::Digest)?;
        let action_size = u64::try_from(action.action_size)
            .map_err(|_| ActionAssignmentError::NegativeSize(action.action_size))?;
        if assignment.timeout_ms == 0 {
            return Err(ActionAssignmentError::NoTimeout);
        }
        Ok(Self {
            lease_token: assignment.lease_token,
            instance_name: action.instance_name.clone(),
            action: key,
            action_size,
            timeout: Duration::from_millis(assignment.timeout_ms),
        })
    }
}

/// How an action ended (when it was not cancelled).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActionOutcome {
    /// The command's exit code; [`EXIT_CODE_NOT_RUN`] when it could not be
    /// run (or its outputs not stored).
    pub exit_code: i32,
    /// The head of its stdout (at most `MAX_JOB_OUTPUT_BYTES`), for the
    /// build's events.
    pub stdout: Vec<u8>,
    /// The head of its stderr (at most `MAX_JOB_OUTPUT_BYTES`).
    pub stderr: Vec<u8>,
    /// Why it could not be run (one line); empty otherwise.
    pub error: String,
    /// The encoded `ActionResult`, every blob it names uploaded, when the
    /// command ran and its outputs were stored.
    pub action_result: Option<Vec<u8>>,
    /// How long its command waited for a run slot, in milliseconds.
    pub queued_ms: u64,
}

/// Why an action did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ActionError {
    /// A blob the CAS does not have.
    Missing { key: BlobKey, size: u64 },
    /// Anything else, one line.
    Failed(String),
}

impl std::fmt::Display for ActionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing { key, size } => write!(f, "missing from the CAS: blobs/{key}/{size}"),
            Self::Failed(message) => f.write_str(message),
        }
    }
}

impl From<String> for ActionError {
    fn from(message: String) -> Self {
        Self::Failed(message)
    }
}

/// Text from the action, quoted within [`MAX_QUOTED_BYTES`].
fn quoted(text: &str) -> String {
    format!("{:?}", text::shortened(text, MAX_QUOTED_BYTES))
}

/// A path from the action (built of checked names), quoted.
fn quoted_path(path: &Path) -> String {
    quoted(&path.to_string_lossy())
}

/// A blob's key and size from a wire digest of `function`; `what` names
/// the field.
fn key_of(
    digest: Option<&ReDigest>,
    function: HashFunction,
    what: impl Fn() -> String,
) -> Result<(BlobKey, u64), String> {
    // The field's name is made only when it is wrong: a tree names many.
    let Some(digest) = digest else {
        return Err(format!("{}: no digest", what()));
    };
    let key = BlobKey::parse(function, &digest.hash).map_err(|e| format!("{}: {e}", what()))?;
    let size = u64::try_from(digest.size_bytes)
        .map_err(|_| format!("{}: size {} is negative", what(), digest.size_bytes))?;
    Ok((key, size))
}

/// The wire digest of a blob.
fn digest_of(key: &BlobKey, size: u64) -> ReDigest {
    ReDigest {
        hash: key.to_string(),
        size_bytes: size as i64,
    }
}

/// Whether `key` names the empty blob, which every CAS holds without
/// storing it.
fn is_empty_blob(key: &BlobKey, size: u64) -> bool {
    size == 0 && *key == key.function().key_of(b"")
}

fn now() -> Timestamp {
    let since_epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: since_epoch.as_secs() as i64,
        nanos: since_epoch.subsec_nanos() as i32,
    }
}

// ---------------------------------------------------------------------------
// Names and paths.

/// What is wrong with a file, directory or symlink name, if anything.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("is empty")
    } else if name == "." || name == ".." {
        Err("is . or ..")
    } else if name.contains('/') {
        Err("contains a /")
    } else if name.contains('\0') {
        Err("contains a NUL")
    } else if name.len() > MAX_NAME_BYTES {
        Err("is longer than 255 bytes")
    } else {
        Ok(())
    }
}

/// Checks the path of an input below the root against [`MAX_PATH_BYTES`]
/// and adds it to `total`, bounded by [`MAX_INPUT_PATH_BYTES`].
fn count_path(path: &Path, total: &mut usize) -> Result<(), String> {
    let len = path.as_os_str().len();
    if len > MAX_PATH_BYTES {
        return Err(format!(
            "input path {} is longer than {MAX_PATH_BYTES} bytes",
            quoted_path(path)
        ));
    }
    *total += len;
    if *total > MAX_INPUT_PATH_BYTES {
        return Err(format!(
            "the input root's paths add up to more than {MAX_INPUT_PATH_BYTES} bytes"
        ));
    }
    Ok(())
}

/// What is wrong with the target of a symlink `depth` directories below
/// the input root, if anything. A target must be relative, and its `..`
/// components must all come first and climb no higher than the root:
/// those climb through real directories (the symlink's own ancestors), and
/// what follows only descends, so no chain of such symlinks leaves the
/// root (a `..` after a symlink component would climb from wherever that
/// symlink points).
pub fn check_symlink_target(depth: usize, target: &str) -> Result<(), &'static str> {
    if target.is_empty() {
        return Err("is empty");
    }
    if target.starts_with('/') {
        return Err("is absolute");
    }
    if target.contains('\0') {
        return Err("contains a NUL");
    }
    let mut level = depth;
    let mut descended = false;
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." if descended => return Err("has .. after a name"),
            ".." => {
                level = level.checked_sub(1).ok_or("climbs out of the input root")?;
            }
            _ => descended = true,
        }
    }
    Ok(())
}

/// The components (below the input root) of relative `path` taken from
/// `base` (components below the root), `.` and empty components dropped,
/// `..` applied; refused when absolute, holding a NUL, or climbing out of
/// the input root.
pub fn resolve_relative(base: &[String], path: &str) -> Result<Vec<String>, &'static str> {
    if path.starts_with('/') {
        return Err("is absolute");
    }
    if path.contains('\0') {
        return Err("contains a NUL");
    }
    let mut components = base.to_vec();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                components.pop().ok_or("climbs out of the input root")?;
            }
            name => components.push(name.to_string()),
        }
    }
    Ok(components)
}

fn join(root: &Path, components: &[String]) -> PathBuf {
    let mut path = root.to_path_buf();
    path.extend(components);
    path
}

/// A Command, checked: what to run, where, and which outputs to collect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedCommand {
    /// `arguments`, at least one.
    pub arguments: Vec<String>,
    /// Exactly the Command's environment.
    pub environment: Vec<(String, String)>,
    /// The working directory's components below the input root.
    pub working_directory: Vec<String>,
    /// Each output: the path the Command names (relative to the working
    /// directory, as the result reports it) and its components below the
    /// input root. Distinct paths, in the Command's order.
    pub outputs: Vec<(String, Vec<String>)>,
}

/// Checks a Command: arguments, environment variable names, the working
/// directory and the output paths (`output_paths` when set, API 2.1 and
/// later; else `output_files` and `output_directories`, API 2.0).
pub fn check_command(command: &Command) -> Result<CheckedCommand, String> {
    if command.arguments.is_empty() {
        return Err("the command has no arguments".to_string());
    }
    let mut environment = Vec::with_capacity(command.environment_variables.len());
    for variable in &command.environment_variables {
        if variable.name.is_empty() {
            return Err("an environment variable has an empty name".to_string());
        }
        if variable.name.contains('=') || variable.name.contains('\0') {
            return Err(format!(
                "environment variable name {} contains = or NUL",
                quoted(&variable.name)
            ));
        }
        environment.push((variable.name.clone(), variable.value.clone()));
    }
    let working_directory =
        resolve_relative(&[], &command.working_directory).map_err(|problem| {
            format!(
                "working directory {} {problem}",
                quoted(&command.working_directory)
            )
        })?;
    // The API 2.0 fields, deprecated since 2.1, are what Bazel 4 sends.
    #[allow(deprecated)]
    let listed: Vec<&String> = if command.output_paths.is_empty() {
        command
            .output_files
            .iter()
            .chain(&command.output_directories)
            .collect()
    } else {
        command.output_paths.iter().collect()
    };
    let mut seen = HashSet::new();
    let mut outputs = Vec::new();
    for path in listed {
        if !seen.insert(path.as_str()) {
            continue;
        }
        let components = resolve_relative(&working_directory, path)
            .map_err(|problem| format!("output path {} {problem}", quoted(path)))?;
        if path.is_empty() || components.is_empty() {
            return Err(format!(
                "output path {} names no file below the input root",
                quoted(path)
            ));
        }
        outputs.push((path.clone(), components));
    }
    Ok(CheckedCommand {
        arguments: command.arguments.clone(),
        environment,
        working_directory,
        outputs,
    })
}

/// Checks one Directory of an input root, found at `at` (`depth` levels
/// below the root): names valid and unique, symlink targets inside.
pub fn check_directory(directory: &Directory, at: &Path, depth: usize) -> Result<(), String> {
    let mut names = HashSet::new();
    let all = directory
        .files
        .iter()
        .map(|f| &f.name)
        .chain(directory.directories.iter().map(|d| &d.name))
        .chain(directory.symlinks.iter().map(|s| &s.name));
    for name in all {
        check_name(name).map_err(|problem| {
            format!(
                "input directory {}: name {} {problem}",
                quoted_path(at),
                quoted(name)
            )
        })?;
        if !names.insert(name.as_str()) {
            return Err(format!(
                "input directory {}: name {} appears twice",
                quoted_path(at),
                quoted(name)
            ));
        }
    }
    for symlink in &directory.symlinks {
        check_symlink_target(depth, &symlink.target).map_err(|problem| {
            format!(
                "input symlink {}: target {} {problem}",
                quoted_path(&at.join(&symlink.name)),
                quoted(&symlink.target)
            )
        })?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Reading from the CAS.

/// Opens blob `key` from the cache, pinned, fetching it from the
/// coordinators when it is absent.
async fn open_or_fetch(
    env: &JobEnv,
    key: BlobKey,
    size: u64,
) -> Result<(fs::File, Pin), ActionError> {
    // A second round only when the blob was evicted between its fetch and
    // its opening (a cache too small for the work at hand).
    for _ in 0..2 {
        let cache = env.cache.clone();
        let opened =
            distbuild_proto::blocking::run(move || cache.open_blob(key).map_err(|e| e.to_string()))
                .await
                .map_err(|e| format!("blobs/{key}/{size}: {e}"))?;
        if let Some(opened) = opened {
            return Ok(opened);
        }
        fetch_blob(&env.coordinator, &env.cache, key, size)
            .await
            .map_err(|error| match error {
                FetchError::NotFound { key, size, .. } => ActionError::Missing { key, size },
                other => ActionError::Failed(format!("fetch blobs/{key}/{size}: {other}")),
            })?;
        env.coordinator_bytes_fetched
            .fetch_add(size, std::sync::atomic::Ordering::Relaxed);
    }
    Err(
        format!("blobs/{key}/{size} was evicted as soon as it was fetched (cache too small?)")
            .into(),
    )
}

/// Reads and decodes message `key` (`size` bytes) from the CAS; `what`
/// names it.
async fn read_message<M: Message + Default>(
    env: &JobEnv,
    key: BlobKey,
    size: u64,
    what: &str,
) -> Result<M, ActionError> {
    if size > MAX_ACTION_MESSAGE_BYTES {
        return Err(format!(
            "{what}: {size} bytes, more than the {MAX_ACTION_MESSAGE_BYTES} a message may have"
        )
        .into());
    }
    let (file, pin) = open_or_fetch(env, key, size).await?;
    let bytes = distbuild_proto::blocking::run(move || {
        let _pin = pin;
        let mut bytes = Vec::new();
        file.take(size + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("read blobs/{key}/{size}: {e}"))?;
        Ok::<_, String>(bytes)
    })
    .await?;
    if bytes.len() as u64 != size {
        return Err(format!(
            "{what}: blobs/{key}/{size} holds {} bytes, not {size}",
            bytes.len()
        )
        .into());
    }
    M::decode(&bytes[..])
        .map_err(|e| ActionError::Failed(format!("{what}: cannot decode blobs/{key}/{size}: {e}")))
}

// ---------------------------------------------------------------------------
// The input root.

/// An input root, read and checked: what to create below `root/`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InputTree {
    /// Directories below the root, parents first (the root itself is
    /// not listed).
    pub directories: Vec<PathBuf>,
    /// Files by content: (key, size) -> [(path, executable)].
    pub files: BTreeMap<(BlobKey, u64), Vec<(PathBuf, bool)>>,
    /// Symlinks: (path, target).
    pub symlinks: Vec<(PathBuf, String)>,
}

/// Reads the input root `root` (`size` bytes) and every Directory below
/// it, level by level ([`MAX_PARALLEL_FETCHES`] at a time, each distinct
/// Directory once), checking each, within the bounds.
async fn read_input_tree(
    env: &JobEnv,
    function: HashFunction,
    root: BlobKey,
    size: u64,
) -> Result<InputTree, ActionError> {
    let mut tree = InputTree::default();
    let mut messages: HashMap<BlobKey, Directory> = HashMap::new();
    let mut level: Vec<(PathBuf, BlobKey, u64)> = vec![(PathBuf::new(), root, size)];
    let mut n_directories = 1usize;
    let mut n_files = 0usize;
    let mut path_bytes = 0usize;
    let mut depth = 0usize;
    while !level.is_empty() {
        if depth > MAX_TREE_DEPTH {
            return Err(format!(
                "the input root is nested deeper than {MAX_TREE_DEPTH} directories"
            )
            .into());
        }
        let mut wanted: Vec<(BlobKey, u64, &Path)> = Vec::new();
        let mut asked = HashSet::new();
        for (path, key, size) in &level {
            if !messages.contains_key(key) && asked.insert(*key) {
                wanted.push((*key, *size, path));
            }
        }
        let reads: Vec<_> = wanted
            .into_iter()
            .map(|(key, size, path)| async move {
                let what = format!("input directory {}", quoted_path(path));
                read_message::<Directory>(env, key, size, &what)
                    .await
                    .map(|directory| (key, directory))
            })
            .collect();
        let read: Vec<(BlobKey, Directory)> = futures::stream::iter(reads)
            .buffer_unordered(MAX_PARALLEL_FETCHES)
            .try_collect()
            .await?;
        messages.extend(read);
        let mut next = Vec::new();
        for (path, key, _) in level {
            let directory = messages.get(&key).expect("read above");
            check_directory(directory, &path, depth)?;
            n_files += directory.files.len();
            if n_files > MAX_INPUT_FILES {
                return Err(format!("the input root has more than {MAX_INPUT_FILES} files").into());
            }
            n_directories += directory.directories.len();
            if n_directories > MAX_INPUT_DIRECTORIES {
                return Err(format!(
                    "the input root has more than {MAX_INPUT_DIRECTORIES} directories"
                )
                .into());
            }
            for file in &directory.files {
                let file_path = path.join(&file.name);
                count_path(&file_path, &mut path_bytes)?;
                let content = key_of(file.digest.as_ref(), function, || {
                    format!("input file {}", quoted_path(&file_path))
                })?;
                tree.files
                    .entry(content)
                    .or_default()
                    .push((file_path, file.is_executable));
            }
            for symlink in &directory.symlinks {
                let link_path = path.join(&symlink.name);
                count_path(&link_path, &mut path_bytes)?;
                tree.symlinks.push((link_path, symlink.target.clone()));
            }
            for child in &directory.directories {
                let child_path = path.join(&child.name);
                count_path(&child_path, &mut path_bytes)?;
                let (child_key, child_size) = key_of(child.digest.as_ref(), function, || {
                    format!("input directory {}", quoted_path(&child_path))
                })?;
                tree.directories.push(child_path.clone());
                next.push((child_path, child_key, child_size));
            }
        }
        level = next;
        depth += 1;
    }
    Ok(tree)
}

/// Copies blob `key` (`size` bytes) from the cache (fetched when absent)
/// to each of `destinations` below `root`, with mode 0755 when executable,
/// else 0644.
///
/// Copied, never hard-linked: the command runs as the worker's user and
/// could write through a link into the cache, changing the blob under its
/// name for every later job and peer.
async fn place_file(
    env: &JobEnv,
    key: BlobKey,
    size: u64,
    destinations: Vec<(PathBuf, bool)>,
    root: &Path,
) -> Result<(), ActionError> {
    let source = if is_empty_blob(&key, size) {
        None
    } else {
        Some(open_or_fetch(env, key, size).await?)
    };
    let root = root.to_path_buf();
    distbuild_proto::blocking::run(move || {
        let mut source = source;
        for (path, executable) in destinations {
            let dest = root.join(&path);
            let write = |source: &mut Option<(fs::File, Pin)>| -> io::Result<u64> {
                let mut out = fs::File::create(&dest)?;
                let copied = match source {
                    Some((file, _pin)) => {
                        file.rewind()?;
                        io::copy(&mut file.take(size + 1), &mut out)?
                    }
                    None => 0,
                };
                let mode = if executable { 0o755 } else { 0o644 };
                out.set_permissions(fs::Permissions::from_mode(mode))?;
                Ok(copied)
            };
            let copied = write(&mut source)
                .map_err(|e| format!("input file {}: {e}", quoted_path(&path)))?;
            if copied != size {
                return Err(format!(
                    "input file {}: blobs/{key}/{size} holds {copied} bytes or more, not {size}",
                    quoted_path(&path)
                ));
            }
        }
        Ok::<(), String>(())
    })
    .await
    .map_err(ActionError::Failed)
}

/// Creates `tree` below `root` (which exists): directories, then files
/// ([`MAX_PARALLEL_FETCHES`] distinct contents at a time), then symlinks.
async fn materialize(env: &JobEnv, tree: InputTree, root: &Path) -> Result<(), ActionError> {
    let InputTree {
        directories,
        files,
        symlinks,
    } = tree;
    {
        let root = root.to_path_buf();
        distbuild_proto::blocking::run(move || {
            for path in &directories {
                fs::create_dir(root.join(path))
                    .map_err(|e| format!("create input directory {}: {e}", quoted_path(path)))?;
            }
            Ok::<(), String>(())
        })
        .await?;
    }
    let placed: Vec<_> = files
        .into_iter()
        .map(|((key, size), destinations)| place_file(env, key, size, destinations, root))
        .collect();
    futures::stream::iter(placed)
        .buffer_unordered(MAX_PARALLEL_FETCHES)
        .try_collect::<()>()
        .await?;
    let root = root.to_path_buf();
    distbuild_proto::blocking::run(move || {
        for (path, target) in &symlinks {
            std::os::unix::fs::symlink(target, root.join(path))
                .map_err(|e| format!("create input symlink {}: {e}", quoted_path(path)))?;
        }
        Ok::<(), String>(())
    })
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Outputs.

/// A blob an action's result names, to upload from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// Its size in bytes.
    pub size: u64,
    /// The file holding it.
    pub path: PathBuf,
}

/// An action's collected outputs: the result's output fields, and the
/// blobs they name (each distinct blob once, the empty blob never).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CollectedOutputs {
    /// `output_files`, `output_directories`, `output_symlinks` and the
    /// deprecated `output_file_symlinks` and `output_directory_symlinks`.
    pub result: ActionResult,
    /// The blobs to upload, by key.
    pub uploads: BTreeMap<BlobKey, Upload>,
}

impl CollectedOutputs {
    /// Adds a blob to upload (once, and never the empty blob).
    fn add(&mut self, key: BlobKey, size: u64, path: PathBuf) {
        if !is_empty_blob(&key, size) {
            self.uploads.entry(key).or_insert(Upload { size, path });
        }
    }

    /// Stores `bytes` as a blob in a file of `spill` (for upload);
    /// returns its key and size.
    fn add_bytes(
        &mut self,
        function: HashFunction,
        bytes: &[u8],
        spill: &Path,
    ) -> io::Result<(BlobKey, u64)> {
        let key = function.key_of(bytes);
        let size = bytes.len() as u64;
        if !is_empty_blob(&key, size) && !self.uploads.contains_key(&key) {
            let path = spill.join(key.to_string());
            fs::write(&path, bytes)?;
            self.add(key, size, path);
        }
        Ok((key, size))
    }
}

/// Counts what a walk of output directories met, within the bounds.
#[derive(Default)]
struct WalkCount {
    directories: usize,
    files: usize,
}

impl WalkCount {
    fn directory(&mut self) -> Result<(), String> {
        self.directories += 1;
        if self.directories > MAX_INPUT_DIRECTORIES {
            return Err(format!(
                "the outputs hold more than {MAX_INPUT_DIRECTORIES} directories"
            ));
        }
        Ok(())
    }

    fn file(&mut self) -> Result<(), String> {
        self.files += 1;
        if self.files > MAX_INPUT_FILES {
            return Err(format!(
                "the outputs hold more than {MAX_INPUT_FILES} files"
            ));
        }
        Ok(())
    }
}

/// The key and size of the file at `path` under `function`.
fn hash_file(function: HashFunction, path: &Path) -> io::Result<(BlobKey, u64)> {
    let mut file = fs::File::open(path)?;
    let mut hasher = function.hasher();
    let mut size = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hasher.finish(), size))
}

fn is_executable(metadata: &fs::Metadata) -> bool {
    metadata.permissions().mode() & 0o111 != 0
}

fn utf8_name(name: &std::ffi::OsStr, at: &Path) -> Result<String, String> {
    name.to_str().map(str::to_string).ok_or_else(|| {
        format!(
            "output {}: a name is not UTF-8: {}",
            quoted_path(at),
            quoted(&name.to_string_lossy())
        )
    })
}

fn read_target(path: &Path, shown: &Path) -> Result<String, String> {
    let target = fs::read_link(path)
        .map_err(|e| format!("read output symlink {}: {e}", quoted_path(shown)))?;
    target.into_os_string().into_string().map_err(|target| {
        format!(
            "output symlink {}: its target {} is not UTF-8",
            quoted_path(shown),
            quoted(&target.to_string_lossy())
        )
    })
}

/// The Directory message of the directory at `path` (`shown` in errors),
/// `depth` levels below the output directory: entries sorted by name,
/// files hashed and added to `collected`, subdirectories' messages added
/// to `children` (each distinct one once). Never follows a symlink.
#[allow(clippy::too_many_arguments)]
fn directory_message(
    function: HashFunction,
    path: &Path,
    shown: &Path,
    depth: usize,
    count: &mut WalkCount,
    collected: &mut CollectedOutputs,
    children: &mut Vec<Directory>,
    seen: &mut HashSet<BlobKey>,
) -> Result<Directory, String> {
    if depth > MAX_TREE_DEPTH {
        return Err(format!(
            "output directory {} is nested deeper than {MAX_TREE_DEPTH} directories",
            quoted_path(shown)
        ));
    }
    count.directory()?;
    let mut entries = Vec::new();
    for entry in
        fs::read_dir(path).map_err(|e| format!("list output {}: {e}", quoted_path(shown)))?
    {
        let entry = entry.map_err(|e| format!("list output {}: {e}", quoted_path(shown)))?;
        entries.push((utf8_name(&entry.file_name(), shown)?, entry.path()));
    }
    // Sorted by name, as the API requires (byte order of UTF-8).
    entries.sort();
    let mut directory = Directory::default();
    for (name, entry_path) in entries {
        let entry_shown = shown.join(&name);
        let metadata = fs::symlink_metadata(&entry_path)
            .map_err(|e| format!("stat output {}: {e}", quoted_path(&entry_shown)))?;
        let file_type = metadata.file_type();
        if file_type.is_symlink() {
            let target = read_target(&entry_path, &entry_shown)?;
            directory.symlinks.push(SymlinkNode {
                name,
                target,
                node_properties: None,
            });
        } else if file_type.is_dir() {
            let child = directory_message(
                function,
                &entry_path,
                &entry_shown,
                depth + 1,
                count,
                collected,
                children,
                seen,
            )?;
            let encoded = child.encode_to_vec();
            let key = function.key_of(&encoded);
            directory.directories.push(DirectoryNode {
                name,
                digest: Some(digest_of(&key, encoded.len() as u64)),
            });
            if seen.insert(key) {
                children.push(child);
            }
        } else if file_type.is_file() {
            count.file()?;
            let (key, size) = hash_file(function, &entry_path)
                .map_err(|e| format!("read output {}: {e}", quoted_path(&entry_shown)))?;
            collected.add(key, size, entry_path);
            directory.files.push(FileNode {
                name,
                digest: Some(digest_of(&key, size)),
                is_executable: is_executable(&metadata),
                node_properties: None,
            });
        } else {
            return Err(format!(
                "output {} is neither a file, a directory nor a symlink",
                quoted_path(&entry_shown)
            ));
        }
    }
    Ok(directory)
}

/// Collects the outputs `outputs` (as [`CheckedCommand::outputs`]) found
/// below `root` after the command ran: a regular file becomes an
/// `OutputFile`, a directory a `Tree` (its encoding spilled to a file in
/// `spill`), a symlink an `OutputSymlink` (in `output_symlinks`, and in the
/// deprecated field its target's type says); an output that is absent, or
/// below something not a directory (a symlink is never followed), is
/// left out.
pub fn collect_outputs(
    function: HashFunction,
    root: &Path,
    outputs: &[(String, Vec<String>)],
    spill: &Path,
) -> Result<CollectedOutputs, String> {
    let mut collected = CollectedOutputs::default();
    let mut count = WalkCount::default();
    'outputs: for (given, components) in outputs {
        let shown = Path::new(given);
        let (last, parents) = components.split_last().expect("checked non-empty");
        let mut parent = root.to_path_buf();
        for component in parents {
            parent.push(component);
            match fs::symlink_metadata(&parent) {
                Ok(metadata) if metadata.file_type().is_dir() => {}
                Ok(_) => continue 'outputs,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue 'outputs,
                Err(e) => return Err(format!("stat output {}: {e}", quoted_path(shown))),
            }
        }
        let path = parent.join(last);
        let metadata = match fs::symlink_metadata(&path) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("stat output {}: {e}", quoted_path(shown))),
        };
        let file_type = metadata.file_type();
        if file_type.is_symlink() {
            let target = read_target(&path, shown)?;
            let symlink = OutputSymlink {
                path: given.clone(),
                target,
                node_properties: None,
            };
            // Only to sort it for old clients (the deprecated fields): what
            // the target is.
            let to_directory = fs::metadata(&path).is_ok_and(|m| m.is_dir());
            #[allow(deprecated)]
            if to_directory {
                collected
                    .result
                    .output_directory_symlinks
                    .push(symlink.clone());
            } else {
                collected.result.output_file_symlinks.push(symlink.clone());
            }
            collected.result.output_symlinks.push(symlink);
        } else if file_type.is_dir() {
            let mut children = Vec::new();
            let mut seen = HashSet::new();
            let root_directory = directory_message(
                function,
                &path,
                shown,
                0,
                &mut count,
                &mut collected,
                &mut children,
                &mut seen,
            )?;
            let tree = Tree {
                root: Some(root_directory),
                children,
            };
            let (key, size) = collected
                .add_bytes(function, &tree.encode_to_vec(), spill)
                .map_err(|e| format!("spill the tree of output {}: {e}", quoted_path(shown)))?;
            collected.result.output_directories.push(OutputDirectory {
                path: given.clone(),
                tree_digest: Some(digest_of(&key, size)),
                is_topologically_sorted: false,
                root_directory_digest: None,
            });
        } else if file_type.is_file() {
            count.file()?;
            let (key, size) = hash_file(function, &path)
                .map_err(|e| format!("read output {}: {e}", quoted_path(shown)))?;
            collected.add(key, size, path);
            collected.result.output_files.push(OutputFile {
                path: given.clone(),
                digest: Some(digest_of(&key, size)),
                is_executable: is_executable(&metadata),
                contents: Vec::new(),
                node_properties: None,
            });
        } else {
            return Err(format!(
                "output {} is neither a file, a directory nor a symlink",
                quoted_path(shown)
            ));
        }
    }
    Ok(collected)
}

// ---------------------------------------------------------------------------
// The run.

/// What the run left for the outcome besides its result.
#[derive(Default)]
struct Captured {
    output: Option<ProcessOutput>,
    /// How long the command waited for a run slot, in milliseconds.
    queued_ms: u64,
}

/// A captured stream as its blob: the head kept, and the note when the
/// rest was cut (the process seam keeps at most `MAX_JOB_OUTPUT_BYTES`).
fn stream_blob(head: &[u8], truncated: bool) -> Vec<u8> {
    let mut blob = head.to_vec();
    if truncated {
        blob.extend_from_slice(truncated_note().as_bytes());
    }
    blob
}

async fn run_steps(
    env: &JobEnv,
    spec: &ActionSpec,
    sandbox: &Path,
    worker_id: &str,
    ticket: crate::turns::Ticket,
    captured: &mut Captured,
) -> Result<(i32, Vec<u8>), ActionError> {
    let worker_start = now();
    let function = spec.action.function();
    let root = sandbox.join("root");
    let spill = sandbox.join("upload");
    {
        let (sandbox, root, spill) = (sandbox.to_path_buf(), root.clone(), spill.clone());
        distbuild_proto::blocking::run(move || {
            let create = || -> io::Result<()> {
                if sandbox.exists() {
                    crate::tree::remove_tree(&sandbox)?;
                }
                fs::create_dir_all(&root)?;
                fs::create_dir_all(&spill)
            };
            create().map_err(|e| format!("create sandbox {}: {e}", sandbox.display()))
        })
        .await?;
    }

    let input_fetch_start = now();
    let action: Action = read_message(env, spec.action, spec.action_size, "the Action").await?;
    let (command_key, command_size) = key_of(action.command_digest.as_ref(), function, || {
        "Action.command_digest".into()
    })?;
    let (input_key, input_size) = key_of(action.input_root_digest.as_ref(), function, || {
        "Action.input_root_digest".into()
    })?;
    let command: Command = read_message(env, command_key, command_size, "the Command").await?;
    let command = check_command(&command)?;
    let tree = read_input_tree(env, function, input_key, input_size).await?;
    materialize(env, tree, &root).await?;
    let cwd = join(&root, &command.working_directory);
    {
        // The server creates the working directory and every output's
        // parent directory (the API says so).
        let cwd = cwd.clone();
        let parents: Vec<PathBuf> = command
            .outputs
            .iter()
            .map(|(_, components)| join(&root, &components[..components.len() - 1]))
            .collect();
        distbuild_proto::blocking::run(move || {
            fs::create_dir_all(&cwd).map_err(|e| format!("create the working directory: {e}"))?;
            for parent in &parents {
                fs::create_dir_all(parent).map_err(|e| {
                    format!(
                        "create the directory of output {}: {e}",
                        quoted_path(parent)
                    )
                })?;
            }
            Ok::<(), String>(())
        })
        .await?;
    }
    let input_fetch_completed = now();

    // Fetched before the action takes a run slot and uploaded after it
    // gives it back: only the command holds one.
    let turn = ticket.turn().await;
    captured.queued_ms = turn.queued_ms;
    let mut arguments = command.arguments.iter();
    let program = arguments.next().expect("checked non-empty").clone();
    let process = ProcessSpec {
        program: program.clone().into(),
        args: arguments.map(Into::into).collect(),
        env: Some(
            command
                .environment
                .iter()
                .map(|(name, value)| (name.into(), value.into()))
                .collect(),
        ),
        cwd,
        job_dir: sandbox.to_path_buf(),
        max_output_bytes: MAX_JOB_OUTPUT_BYTES,
    };
    let execution_start = now();
    // Dropping the run at the limit kills its processes (the whole group).
    let output = match tokio::time::timeout(spec.timeout, env.runner.run(process)).await {
        Err(_) => {
            return Err(format!(
                "timed out after {}: its processes were killed",
                describe_limit(spec.timeout)
            )
            .into());
        }
        Ok(Err(e)) => return Err(format!("run {}: {e}", quoted(&program)).into()),
        Ok(Ok(output)) => output,
    };
    drop(turn);
    let execution_completed = now();
    let mut output = output;
    if let Some(limit) = &output.limit_hit {
        // A limit the command ran into (memory, processes, file size) is
        // its result, named on its stderr: running it again would hit it
        // again, so it is not an error for the client to retry.
        output
            .stderr
            .extend_from_slice(format!("\n[distbuild: {limit}]\n").as_bytes());
        if output.exit_code == 0 {
            output.exit_code = 1;
        }
    }
    captured.output = Some(output.clone());

    let output_upload_start = now();
    let mut collected = {
        let (root, spill, outputs) = (root.clone(), spill.clone(), command.outputs.clone());
        distbuild_proto::blocking::run(move || -> Result<CollectedOutputs, String> {
            collect_outputs(function, &root, &outputs, &spill)
        })
        .await?
    };
    let stdout = stream_blob(&output.stdout, output.stdout_truncated);
    let stderr = stream_blob(&output.stderr, output.stderr_truncated);
    let (stdout_key, stdout_size, stderr_key, stderr_size, collected_back) = {
        let spill = spill.clone();
        distbuild_proto::blocking::run(move || {
            let (stdout_key, stdout_size) = collected
                .add_bytes(function, &stdout, &spill)
                .map_err(|e| format!("spill stdout: {e}"))?;
            let (stderr_key, stderr_size) = collected
                .add_bytes(function, &stderr, &spill)
                .map_err(|e| format!("spill stderr: {e}"))?;
            Ok::<_, String>((stdout_key, stdout_size, stderr_key, stderr_size, collected))
        })
        .await?
    };
    collected = collected_back;
    upload_all(env, &collected.uploads).await?;
    let output_upload_completed = now();

    let mut result = collected.result;
    result.exit_code = output.exit_code;
    result.stdout_digest = Some(digest_of(&stdout_key, stdout_size));
    result.stderr_digest = Some(digest_of(&stderr_key, stderr_size));
    result.stdout_raw = Vec::new();
    result.stderr_raw = Vec::new();
    result.execution_metadata = Some(ExecutedActionMetadata {
        worker: worker_id.to_string(),
        worker_start_timestamp: Some(worker_start),
        worker_completed_timestamp: Some(now()),
        input_fetch_start_timestamp: Some(input_fetch_start),
        input_fetch_completed_timestamp: Some(input_fetch_completed),
        execution_start_timestamp: Some(execution_start),
        execution_completed_timestamp: Some(execution_completed),
        output_upload_start_timestamp: Some(output_upload_start),
        output_upload_completed_timestamp: Some(output_upload_completed),
        ..ExecutedActionMetadata::default()
    });
    let encoded = result.encode_to_vec();
    if encoded.len() > MAX_ACTION_RESULT_BYTES {
        return Err(format!(
            "the action result encodes to {} bytes, more than the {MAX_ACTION_RESULT_BYTES} a report may carry",
            encoded.len()
        )
        .into());
    }
    Ok((output.exit_code, encoded))
}

/// Uploads every blob of `uploads` to the coordinators' CAS,
/// [`MAX_PARALLEL_UPLOADS`] at a time, each retried through failovers for
/// up to [`UPLOAD_RETRY_WINDOW`].
async fn upload_all(env: &JobEnv, uploads: &BTreeMap<BlobKey, Upload>) -> Result<(), String> {
    let sends: Vec<_> = uploads
        .iter()
        .map(|(key, upload)| async move {
            let persistence = Persistence::Until(tokio::time::Instant::now() + UPLOAD_RETRY_WINDOW);
            env.coordinator
                .upload_blob(&upload.path, *key, upload.size, persistence)
                .await
                .map_err(|e| format!("upload blobs/{key}/{}: {e}", upload.size))
        })
        .collect();
    futures::stream::iter(sends)
        .buffer_unordered(MAX_PARALLEL_UPLOADS)
        .try_collect::<()>()
        .await
}

/// Runs the action described by `spec` in sandbox directory `sandbox`
/// (created afresh; the caller removes it afterwards), as worker
/// `worker_id` (named in the result's metadata); its command runs in the
/// run slot `ticket` is granted. Cancel by dropping the future: running
/// processes are killed.
pub async fn run_action(
    env: &JobEnv,
    spec: &ActionSpec,
    sandbox: &Path,
    worker_id: &str,
    ticket: crate::turns::Ticket,
) -> ActionOutcome {
    let mut captured = Captured::default();
    let result = run_steps(env, spec, sandbox, worker_id, ticket, &mut captured).await;
    let mut outcome = ActionOutcome {
        queued_ms: captured.queued_ms,
        ..ActionOutcome::default()
    };
    if let Some(output) = captured.output {
        outcome.stdout = output.stdout;
        outcome.stdout.truncate(MAX_JOB_OUTPUT_BYTES);
        outcome.stderr = output.stderr;
        outcome.stderr.truncate(MAX_JOB_OUTPUT_BYTES);
    }
    match result {
        Ok((exit_code, encoded)) => {
            outcome.exit_code = exit_code;
            outcome.action_result = Some(encoded);
        }
        Err(error) => {
            outcome.exit_code = EXIT_CODE_NOT_RUN;
            outcome.error = error.to_string().replace('\n', " ");
            text::cut(&mut outcome.error, MAX_JOB_ERROR_BYTES, " [cut]");
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::sync::Arc;

    use bazel_remote_apis::build::bazel::remote::execution::v2::command::EnvironmentVariable;

    use super::*;
    use crate::cache::Cache;
    use crate::connect::{SharedConnector, TcpConnector};
    use crate::coordinator::CoordinatorClient;
    use crate::process::TokioProcessRunner;

    const SHA256: HashFunction = HashFunction::Sha256;

    #[test]
    fn names_targets_and_paths_table() {
        let names: &[(&str, Result<(), &str>)] = &[
            ("a.txt", Ok(())),
            ("..a", Ok(())),
            ("", Err("is empty")),
            (".", Err("is . or ..")),
            ("..", Err("is . or ..")),
            ("a/b", Err("contains a /")),
            ("a\0b", Err("contains a NUL")),
        ];
        let longest = "n".repeat(MAX_NAME_BYTES);
        let too_long = "n".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(check_name(&longest), Ok(()));
        assert_eq!(check_name(&too_long), Err("is longer than 255 bytes"));
        let mut total = 0;
        assert!(count_path(Path::new(&"p".repeat(MAX_PATH_BYTES)), &mut total).is_ok());
        let error = count_path(Path::new(&"p".repeat(MAX_PATH_BYTES + 1)), &mut total)
            .expect_err("too long");
        assert!(error.contains("longer than 4096 bytes"), "{error}");
        let mut total = MAX_INPUT_PATH_BYTES - 1;
        let error = count_path(Path::new("ab"), &mut total).expect_err("over the total");
        assert!(error.contains("add up to more than"), "{error}");
        for (name, want) in names {
            assert_eq!(check_name(name), *want, "name {name:?}");
        }

        // (depth of the symlink's directory, target, verdict)
        let targets: &[(usize, &str, Result<(), &str>)] = &[
            (0, "a/b", Ok(())),
            (0, "./a", Ok(())),
            (1, "../a", Ok(())),
            (2, "../../a/b/c", Ok(())),
            (0, "../a", Err("climbs out of the input root")),
            (1, "../../a", Err("climbs out of the input root")),
            (0, "/etc/passwd", Err("is absolute")),
            (3, "a/../../b", Err("has .. after a name")),
            (0, "", Err("is empty")),
            (0, "a\0", Err("contains a NUL")),
        ];
        for (depth, target, want) in targets {
            assert_eq!(
                check_symlink_target(*depth, target),
                *want,
                "target {target:?} at depth {depth}"
            );
        }

        let base = vec!["w".to_string()];
        let paths: &[(&str, Result<Vec<&str>, &str>)] = &[
            ("out/a.o", Ok(vec!["w", "out", "a.o"])),
            ("./x//y/", Ok(vec!["w", "x", "y"])),
            ("../x", Ok(vec!["x"])),
            ("..", Ok(vec![])),
            ("../../x", Err("climbs out of the input root")),
            ("/tmp/x", Err("is absolute")),
            ("a\0", Err("contains a NUL")),
        ];
        for (path, want) in paths {
            let want = want
                .clone()
                .map(|v| v.into_iter().map(String::from).collect::<Vec<_>>());
            assert_eq!(resolve_relative(&base, path), want, "path {path:?}");
        }
    }

    fn command(working_directory: &str, output_paths: &[&str]) -> Command {
        Command {
            arguments: vec!["/bin/true".into()],
            environment_variables: vec![EnvironmentVariable {
                name: "PATH".into(),
                value: "/bin".into(),
            }],
            output_paths: output_paths.iter().map(|p| p.to_string()).collect(),
            working_directory: working_directory.into(),
            ..Command::default()
        }
    }

    #[test]
    fn commands_are_checked() {
        let checked = check_command(&command("w", &["out/a", "out/a", "../top"])).expect("valid");
        assert_eq!(checked.working_directory, vec!["w".to_string()]);
        assert_eq!(
            checked.outputs,
            vec![
                (
                    "out/a".to_string(),
                    vec!["w".into(), "out".into(), "a".into()]
                ),
                ("../top".to_string(), vec!["top".into()]),
            ],
            "duplicates once, relative to the working directory"
        );
        assert_eq!(checked.environment, vec![("PATH".into(), "/bin".into())]);

        // API 2.0: output_files and output_directories when output_paths is
        // empty; ignored when it is set.
        #[allow(deprecated)]
        let old = Command {
            output_files: vec!["f".into()],
            output_directories: vec!["d".into()],
            ..command("", &[])
        };
        let outputs: Vec<String> = check_command(&old)
            .expect("valid")
            .outputs
            .into_iter()
            .map(|(path, _)| path)
            .collect();
        assert_eq!(outputs, vec!["f".to_string(), "d".to_string()]);
        #[allow(deprecated)]
        let both = Command {
            output_files: vec!["ignored".into()],
            ..command("", &["new"])
        };
        assert_eq!(check_command(&both).expect("valid").outputs.len(), 1);

        type Breakage = fn(&mut Command);
        let broken: Vec<(Breakage, &str)> = vec![
            (|c| c.arguments.clear(), "no arguments"),
            (
                |c| c.environment_variables[0].name = String::new(),
                "empty name",
            ),
            (
                |c| c.environment_variables[0].name = "A=B".into(),
                "\"A=B\" contains = or NUL",
            ),
            (
                |c| c.working_directory = "../..".into(),
                "working directory \"../..\" climbs out",
            ),
            (
                |c| c.working_directory = "/abs".into(),
                "working directory \"/abs\" is absolute",
            ),
            (
                |c| c.output_paths = vec!["../../x".into()],
                "output path \"../../x\" climbs out",
            ),
            (
                |c| c.output_paths = vec!["/etc/x".into()],
                "output path \"/etc/x\" is absolute",
            ),
            (
                |c| c.output_paths = vec![String::new()],
                "names no file below the input root",
            ),
            (
                |c| c.output_paths = vec!["..".into()],
                "names no file below the input root",
            ),
        ];
        for (breakage, problem) in broken {
            let mut cmd = command("w", &["out"]);
            breakage(&mut cmd);
            let err = check_command(&cmd).expect_err(problem);
            assert!(err.contains(problem), "{problem}: {err}");
        }
        // Text from the action is cut on a character boundary.
        let long = "é".repeat(1000);
        let mut cmd = command("w", &[]);
        cmd.environment_variables[0].name = format!("{long}=");
        let err = check_command(&cmd).expect_err("refused");
        assert!(err.len() < 300 && err.contains('…'), "{err}");
    }

    fn file_node(name: &str, content: &[u8], is_executable: bool) -> FileNode {
        FileNode {
            name: name.into(),
            digest: Some(digest_of(&SHA256.key_of(content), content.len() as u64)),
            is_executable,
            node_properties: None,
        }
    }

    fn symlink_node(name: &str, target: &str) -> SymlinkNode {
        SymlinkNode {
            name: name.into(),
            target: target.into(),
            node_properties: None,
        }
    }

    fn dir_node(name: &str, directory: &Directory) -> DirectoryNode {
        let encoded = directory.encode_to_vec();
        DirectoryNode {
            name: name.into(),
            digest: Some(digest_of(&SHA256.key_of(&encoded), encoded.len() as u64)),
        }
    }

    #[test]
    fn directories_are_checked() {
        let at = Path::new("a/b");
        let good = Directory {
            files: vec![file_node("f", b"x", false)],
            symlinks: vec![symlink_node("up", "../../f")],
            ..Directory::default()
        };
        check_directory(&good, at, 2).expect("valid");
        let cases: Vec<(Directory, &str)> = vec![
            (
                Directory {
                    files: vec![file_node("f", b"x", false)],
                    directories: vec![dir_node("f", &Directory::default())],
                    ..Directory::default()
                },
                "name \"f\" appears twice",
            ),
            (
                Directory {
                    symlinks: vec![symlink_node("s", "../../../etc")],
                    ..Directory::default()
                },
                "target \"../../../etc\" climbs out of the input root",
            ),
            (
                Directory {
                    symlinks: vec![symlink_node("s", "/etc")],
                    ..Directory::default()
                },
                "is absolute",
            ),
            (
                Directory {
                    files: vec![file_node("..", b"x", false)],
                    ..Directory::default()
                },
                "name \"..\" is . or ..",
            ),
            (
                Directory {
                    directories: vec![dir_node("x/y", &Directory::default())],
                    ..Directory::default()
                },
                "contains a /",
            ),
        ];
        for (directory, problem) in cases {
            let err = check_directory(&directory, at, 2).expect_err(problem);
            assert!(
                err.starts_with("input ") && err.contains(problem),
                "{problem}: {err}"
            );
        }
    }

    fn write(path: &Path, content: &[u8], mode: u32) {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, content).expect("write");
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    fn outputs(paths: &[&str]) -> Vec<(String, Vec<String>)> {
        let wd = vec!["w".to_string()];
        paths
            .iter()
            .map(|p| (p.to_string(), resolve_relative(&wd, p).expect("valid")))
            .collect()
    }

    fn digest(content: &[u8]) -> Option<ReDigest> {
        Some(digest_of(&SHA256.key_of(content), content.len() as u64))
    }

    #[test]
    #[allow(deprecated)]
    fn outputs_are_collected_without_following_symlinks() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let root = dir.path().join("root");
        let spill = dir.path().join("upload");
        fs::create_dir_all(&spill).expect("mkdir");
        let w = root.join("w");
        write(&w.join("out.txt"), b"plain", 0o644);
        write(&w.join("bin/tool"), b"#!/bin/sh\n", 0o755);
        write(&w.join("empty"), b"", 0o644);
        write(&w.join("d/a.txt"), b"plain", 0o644);
        write(&w.join("d/sub/b.txt"), b"deep", 0o600);
        std::os::unix::fs::symlink("a.txt", w.join("d/link")).expect("symlink");
        std::os::unix::fs::symlink("out.txt", w.join("filelink")).expect("symlink");
        std::os::unix::fs::symlink("d", w.join("dirlink")).expect("symlink");
        std::os::unix::fs::symlink("/nonexistent", w.join("dangling")).expect("symlink");

        let collected = collect_outputs(
            SHA256,
            &root,
            &outputs(&[
                "out.txt",
                "bin/tool",
                "empty",
                "d",
                "filelink",
                "dirlink",
                "dangling",
                "missing",
                "nodir/x",
                "dirlink/a.txt",
            ]),
            &spill,
        )
        .expect("collected");
        let result = &collected.result;
        let files: Vec<(&str, Option<ReDigest>, bool)> = result
            .output_files
            .iter()
            .map(|f| (f.path.as_str(), f.digest.clone(), f.is_executable))
            .collect();
        assert_eq!(
            files,
            vec![
                ("out.txt", digest(b"plain"), false),
                ("bin/tool", digest(b"#!/bin/sh\n"), true),
                ("empty", digest(b""), false),
            ],
            "missing outputs and those below a symlink are absent"
        );
        let symlinks = |list: &[OutputSymlink]| -> Vec<(String, String)> {
            list.iter()
                .map(|s| (s.path.clone(), s.target.clone()))
                .collect()
        };
        let pair = |p: &str, t: &str| (p.to_string(), t.to_string());
        assert_eq!(
            symlinks(&result.output_symlinks),
            vec![
                pair("filelink", "out.txt"),
                pair("dirlink", "d"),
                pair("dangling", "/nonexistent")
            ]
        );
        assert_eq!(
            symlinks(&result.output_file_symlinks),
            vec![
                pair("filelink", "out.txt"),
                pair("dangling", "/nonexistent")
            ]
        );
        assert_eq!(
            symlinks(&result.output_directory_symlinks),
            vec![pair("dirlink", "d")]
        );

        assert_eq!(result.output_directories.len(), 1);
        let output_directory = &result.output_directories[0];
        assert_eq!(output_directory.path, "d");
        let tree_digest = output_directory.tree_digest.clone().expect("a tree");
        let tree_key = BlobKey::parse(SHA256, &tree_digest.hash).expect("hex");
        let tree_upload = collected
            .uploads
            .get(&tree_key)
            .expect("the tree is uploaded");
        let encoded = fs::read(&tree_upload.path).expect("spilled");
        assert_eq!(SHA256.key_of(&encoded), tree_key);
        assert_eq!(tree_digest.size_bytes as usize, encoded.len());
        let tree = Tree::decode(&encoded[..]).expect("a Tree");
        let sub = Directory {
            files: vec![file_node("b.txt", b"deep", false)],
            ..Directory::default()
        };
        let expected_root = Directory {
            files: vec![file_node("a.txt", b"plain", false)],
            directories: vec![dir_node("sub", &sub)],
            symlinks: vec![symlink_node("link", "a.txt")],
            node_properties: None,
        };
        assert_eq!(tree.root, Some(expected_root));
        assert_eq!(tree.children, vec![sub]);

        // Each distinct blob once, never the empty one.
        let mut uploaded: Vec<BlobKey> = collected.uploads.keys().copied().collect();
        let mut expected = vec![
            SHA256.key_of(b"plain"),
            SHA256.key_of(b"#!/bin/sh\n"),
            SHA256.key_of(b"deep"),
            tree_key,
        ];
        uploaded.sort();
        expected.sort();
        assert_eq!(uploaded, expected);
    }

    #[test]
    fn special_files_among_outputs_are_refused() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("w/d")).expect("mkdir");
        nix::unistd::mkfifo(&root.join("w/d/pipe"), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let err = collect_outputs(SHA256, &root, &outputs(&["d"]), dir.path())
            .expect_err("a fifo is no output");
        assert!(err.contains("neither a file"), "{err}");
    }

    struct Fixture {
        dir: tempfile::TempDir,
        env: JobEnv,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let cache = Cache::open(&dir.path().join("cache"), 1 << 30).expect("cache");
        let connector: SharedConnector = Arc::new(TcpConnector::default());
        // Never reachable: every blob these tests need is in the cache.
        let coordinator = Arc::new(CoordinatorClient::new(
            vec!["127.0.0.1:1".into()],
            connector.clone(),
        ));
        Fixture {
            env: JobEnv {
                cache,
                coordinator,
                connector,
                runner: Arc::new(TokioProcessRunner::default()),
                peer_bytes_fetched: Default::default(),
                coordinator_bytes_fetched: Default::default(),
            },
            dir,
        }
    }

    impl Fixture {
        fn put(&self, content: &[u8]) {
            self.env
                .cache
                .insert_key(SHA256.key_of(content), content)
                .expect("insert");
        }

        fn put_message(&self, message: &impl Message) -> (BlobKey, u64) {
            let encoded = message.encode_to_vec();
            self.put(&encoded);
            (SHA256.key_of(&encoded), encoded.len() as u64)
        }
    }

    #[tokio::test]
    async fn an_input_root_is_materialized_from_the_cache() {
        let f = fixture();
        let sub = Directory {
            files: vec![file_node("data", b"hello", false)],
            symlinks: vec![symlink_node("up", "../hello.txt")],
            ..Directory::default()
        };
        let empty = Directory::default();
        let root_directory = Directory {
            files: vec![
                file_node("hello.txt", b"hello", false),
                file_node("nothing", b"", false),
                file_node("run.sh", b"#!/bin/sh\necho hi\n", true),
            ],
            directories: vec![dir_node("empty", &empty), dir_node("sub", &sub)],
            symlinks: vec![symlink_node("link", "sub/data")],
            node_properties: None,
        };
        f.put(b"hello");
        f.put(b"#!/bin/sh\necho hi\n");
        f.put_message(&sub);
        // The empty Directory and the empty file are the empty blob: never
        // fetched, never needed in the cache.
        let (root_key, root_size) = f.put_message(&root_directory);

        let root = f.dir.path().join("sandbox/root");
        fs::create_dir_all(&root).expect("mkdir");
        let tree = read_input_tree(&f.env, SHA256, root_key, root_size)
            .await
            .expect("read");
        assert_eq!(
            tree.directories,
            vec![PathBuf::from("empty"), PathBuf::from("sub")]
        );
        assert_eq!(
            tree.files.get(&(SHA256.key_of(b"hello"), 5)),
            Some(&vec![
                (PathBuf::from("hello.txt"), false),
                (PathBuf::from("sub/data"), false)
            ]),
            "one content, two places"
        );
        materialize(&f.env, tree, &root)
            .await
            .expect("materialized");

        let mode = |p: &str| {
            fs::symlink_metadata(root.join(p))
                .expect("exists")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(fs::read(root.join("hello.txt")).expect("read"), b"hello");
        assert_eq!(fs::read(root.join("sub/data")).expect("read"), b"hello");
        assert_eq!(fs::read(root.join("nothing")).expect("read"), b"");
        assert_eq!(
            fs::read(root.join("run.sh")).expect("read"),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(mode("hello.txt"), 0o644);
        assert_eq!(mode("run.sh"), 0o755);
        assert!(root.join("empty").is_dir());
        assert_eq!(
            fs::read_link(root.join("link")).expect("symlink"),
            Path::new("sub/data")
        );
        assert_eq!(
            fs::read(root.join("sub/up")).expect("through the symlink"),
            b"hello"
        );
        // Copies, not links to the cache's file.
        let (cached, _pin) = f
            .env
            .cache
            .open_blob(SHA256.key_of(b"hello"))
            .expect("open")
            .expect("held");
        let cached = cached.metadata().expect("stat");
        let placed = fs::metadata(root.join("hello.txt")).expect("stat");
        assert_ne!(
            (cached.dev(), cached.ino()),
            (placed.dev(), placed.ino()),
            "a copy"
        );
        assert_eq!(placed.nlink(), 1);
    }

    #[tokio::test]
    async fn a_bad_input_tree_is_refused_before_anything_is_created() {
        let f = fixture();
        let bad = Directory {
            symlinks: vec![symlink_node("escape", "../../etc/passwd")],
            ..Directory::default()
        };
        let root_directory = Directory {
            directories: vec![dir_node("sub", &bad)],
            ..Directory::default()
        };
        f.put_message(&bad);
        let (root_key, root_size) = f.put_message(&root_directory);
        let err = read_input_tree(&f.env, SHA256, root_key, root_size)
            .await
            .expect_err("refused");
        assert_eq!(
            err.to_string(),
            "input symlink \"sub/escape\": target \"../../etc/passwd\" climbs out of the input root"
        );
        // A digest of the wrong function for the action is refused too.
        let sha1_root = Directory {
            files: vec![FileNode {
                name: "f".into(),
                digest: Some(digest_of(&HashFunction::Sha1.key_of(b"x"), 1)),
                is_executable: false,
                node_properties: None,
            }],
            ..Directory::default()
        };
        let (root_key, root_size) = f.put_message(&sha1_root);
        let err = read_input_tree(&f.env, SHA256, root_key, root_size)
            .await
            .expect_err("refused");
        assert!(
            err.to_string().contains("input file \"f\": ") && err.to_string().contains("SHA-256"),
            "{err}"
        );
    }

    #[test]
    fn assignments_are_validated() {
        use distbuild_proto::v1;
        let key = SHA256.key_of(b"action");
        let good = v1::Assignment {
            lease_token: 9,
            timeout_ms: 1_500,
            build_id: 1,
            path_ms: 700,
            action: Some(v1::RemoteAction {
                instance_name: "main".into(),
                action_digest: key.hash_bytes().to_vec().into(),
                action_size: 6,
            }),
            ..v1::Assignment::default()
        };
        let spec = ActionSpec::from_wire(&good).expect("valid");
        assert_eq!(spec.action, key);
        assert_eq!(spec.action_size, 6);
        assert_eq!(spec.timeout, Duration::from_millis(1_500));
        type Breakage = fn(&mut v1::Assignment);
        let broken: Vec<(Breakage, &str)> = vec![
            (|a| a.action = None, "not a Remote Execution API action"),
            (
                |a| a.action.as_mut().expect("set").action_digest = vec![1; 31].into(),
                "action_digest: 31 bytes",
            ),
            (
                |a| a.action.as_mut().expect("set").action_size = -1,
                "action_size -1 is negative",
            ),
            (|a| a.timeout_ms = 0, "time limit"),
        ];
        for (breakage, problem) in broken {
            let mut assignment = good.clone();
            breakage(&mut assignment);
            let err = ActionSpec::from_wire(&assignment)
                .expect_err("refused")
                .to_string();
            assert!(err.contains(problem), "{problem}: {err}");
        }
    }
}
