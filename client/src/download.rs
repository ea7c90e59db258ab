//! Downloading leaf jobs' outputs: located through the coordinators,
//! fetched from a worker that holds them (each holder in turn), streamed
//! into a temporary file while hashed, verified, unpacked beside the
//! destination and renamed into place.

use std::fs;
use std::io::{self, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use distbuild_proto::blob::{self, BlobCheck, OpenError, ReceiveError};
use distbuild_proto::v1::LocateArtifactsRequest;
use distbuild_proto::wire::{digest_from_wire, digest_to_wire};
use distbuild_proto::{Digest, JobId, artifact};
use futures::{StreamExt, TryStreamExt};

use crate::cluster::{CallError, Cluster, RPC_TIMEOUT};

/// Outputs downloaded at the same time.
pub const MAX_CONCURRENT_DOWNLOADS: usize = 4;

/// Longest wait for the next chunk of an artifact from a worker.
pub const FETCH_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Rounds of "locate, then try every holder" before giving up on an output
/// (holders can be restarting, or not yet known).
pub const MAX_LOCATE_ROUNDS: u32 = 3;

/// Pause before locating an output again after every holder failed.
pub const LOCATE_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// A leaf job's output to download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The job; its output lands in `<output dir>/<job ID>/`.
    pub job_id: JobId,
    /// The job's name, for messages.
    pub name: String,
    /// The artifact's digest, checked after download.
    pub digest: Digest,
    /// The artifact's size in bytes, checked after download.
    pub size: u64,
}

/// Why an output could not be downloaded.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The coordinators could not be asked where it is.
    #[error(transparent)]
    Call(#[from] CallError),
    /// No holder delivered a valid artifact, or it could not be unpacked.
    #[error("download the output of job {job} ({name:?}): {problem}")]
    Fetch {
        /// The job whose output it is.
        job: JobId,
        /// The job's name.
        name: String,
        /// What went wrong, per holder tried.
        problem: String,
    },
    /// The output directory could not be created.
    #[error("output directory {path}: {source}")]
    OutputDir {
        /// The directory.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Downloads every output into `output_dir/<job ID>/`, replacing what is
/// there.
pub async fn download_outputs(
    cluster: &Cluster,
    outputs: &[Output],
    output_dir: &Path,
) -> Result<(), DownloadError> {
    if outputs.is_empty() {
        return Ok(());
    }
    fs::create_dir_all(output_dir).map_err(|source| DownloadError::OutputDir {
        path: output_dir.display().to_string(),
        source,
    })?;
    futures::stream::iter(outputs)
        .map(|output| download_one(cluster, output, output_dir))
        .buffer_unordered(MAX_CONCURRENT_DOWNLOADS)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Where the cluster says `digest` can be fetched.
async fn locate(cluster: &Cluster, digest: &Digest) -> Result<Vec<String>, CallError> {
    let request = LocateArtifactsRequest {
        digests: vec![digest_to_wire(digest)],
    };
    let response = cluster
        .call("locate an output", Some(RPC_TIMEOUT), |channel| {
            let request = request.clone();
            async move {
                Ok(crate::connect::client_api(channel)
                    .locate_artifacts(request)
                    .await?
                    .into_inner())
            }
        })
        .await?;
    Ok(response
        .locations
        .into_iter()
        .filter(|l| digest_from_wire(&l.digest, "digest").ok().as_ref() == Some(digest))
        .flat_map(|l| l.holders)
        .collect())
}

async fn download_one(
    cluster: &Cluster,
    output: &Output,
    output_dir: &Path,
) -> Result<(), DownloadError> {
    let fail = |problem: String| DownloadError::Fetch {
        job: output.job_id,
        name: output.name.clone(),
        problem,
    };
    let mut problems: Vec<String> = Vec::new();
    for round in 0..MAX_LOCATE_ROUNDS {
        if round > 0 {
            tokio::time::sleep(LOCATE_RETRY_PAUSE * round).await;
        }
        let holders = locate(cluster, &output.digest).await?;
        if holders.is_empty() {
            problems.push("no worker holds it".to_string());
            continue;
        }
        for holder in holders {
            match fetch(cluster, &holder, output, output_dir).await {
                Ok(file) => {
                    let dest = output_dir.join(output.job_id.to_string());
                    let size = output.size;
                    let dir = output_dir.to_path_buf();
                    return distbuild_proto::blocking::run(move || {
                        unpack_and_replace(file, &dir, &dest, size)
                    })
                    .await
                    .map_err(fail);
                }
                Err(problem) => {
                    tracing::debug!(%holder, job = %output.job_id, "fetch failed: {problem}");
                    problems.push(format!("from {holder}: {problem}"));
                }
            }
        }
    }
    problems.dedup();
    Err(fail(problems.join("; ")))
}

/// Fetches the artifact from `holder` into a temporary file in
/// `output_dir`, checking its size and digest.
async fn fetch(
    cluster: &Cluster,
    holder: &str,
    output: &Output,
    output_dir: &Path,
) -> Result<tempfile::NamedTempFile, String> {
    let connector = cluster.connector().shared();
    let mut stream = blob::open_artifact(connector.as_ref(), holder, &output.digest, RPC_TIMEOUT)
        .await
        .map_err(|error| match error {
            OpenError::Connect(e) => format!("connect: {}", e.problem),
            other => other.to_string(),
        })?;
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{}.download-", output.job_id))
        .tempfile_in(output_dir)
        .map_err(|e| format!("create a temporary file in {}: {e}", output_dir.display()))?;
    let std_file = temp
        .reopen()
        .map_err(|e| format!("open {}: {e}", temp.path().display()))?;
    let mut file = distbuild_proto::blocking::FileWriter::new(std_file);
    let mut check = BlobCheck::new(output.digest, output.size);
    blob::receive_chunks(&mut stream, &mut file, &mut check, FETCH_IDLE_TIMEOUT)
        .await
        .map_err(|error| match error {
            ReceiveError::Write(e) => format!("write {}: {e}", temp.path().display()),
            other => other.to_string(),
        })?;
    drop(
        file.into_inner()
            .map_err(|e| format!("write {}: {e}", temp.path().display()))?,
    );
    check.finish().map_err(|mismatch| mismatch.to_string())?;
    Ok(temp)
}

/// Unpacks the verified artifact in `file` into a fresh directory in `dir`,
/// then puts it at `dest` in place of whatever was there.
fn unpack_and_replace(
    file: tempfile::NamedTempFile,
    dir: &Path,
    dest: &Path,
    size: u64,
) -> Result<(), String> {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{name}.new-"))
        .tempdir_in(dir)
        .map_err(|e| format!("create a directory in {}: {e}", dir.display()))?;
    let reader = BufReader::new(
        file.reopen()
            .map_err(|e| format!("open {}: {e}", file.path().display()))?,
    );
    // No file in the artifact can hold more than the artifact itself.
    artifact::unpack(reader, staging.path(), size).map_err(|e| format!("unpack: {e}"))?;
    fs::set_permissions(staging.path(), fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", staging.path().display()))?;
    let staged = staging.keep();
    replace(&staged, dest, dir).inspect_err(|_| {
        let _ = fs::remove_dir_all(&staged);
    })
}

/// Renames `staged` to `dest`; an existing `dest` is moved aside first and
/// removed after, so `dest` is never half-written.
fn replace(staged: &Path, dest: &Path, dir: &Path) -> Result<(), String> {
    let old: Option<PathBuf> = match fs::symlink_metadata(dest) {
        Ok(_) => {
            let name = dest
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let aside = dir.join(format!(
                ".{name}.old-{:016x}",
                distbuild_proto::rng::next_u64()
            ));
            fs::rename(dest, &aside).map_err(|e| format!("move {} aside: {e}", dest.display()))?;
            Some(aside)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("stat {}: {e}", dest.display())),
    };
    fs::rename(staged, dest).map_err(|e| format!("rename into {}: {e}", dest.display()))?;
    if let Some(old) = old {
        let removed = match fs::symlink_metadata(&old) {
            Ok(meta) if meta.is_dir() => fs::remove_dir_all(&old),
            _ => fs::remove_file(&old),
        };
        if let Err(e) = removed {
            tracing::warn!("remove the previous output {}: {e}", old.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_puts_a_new_tree_in_place_of_an_old_one() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path();
        let dest = dir.join("job");
        for (round, content) in [(0, "first"), (1, "second")] {
            let src = tempfile::tempdir().expect("tempdir");
            fs::write(src.path().join("out.txt"), content).expect("write");
            let mut tar = Vec::new();
            let (_, size) = artifact::pack(src.path(), &mut tar).expect("pack");
            let mut file = tempfile::NamedTempFile::new_in(dir).expect("temp");
            io::Write::write_all(&mut file, &tar).expect("write");
            unpack_and_replace(file, dir, &dest, size).expect("replaced");
            assert_eq!(
                fs::read_to_string(dest.join("out.txt")).expect("read"),
                content,
                "round {round}"
            );
            let mode = fs::metadata(&dest).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o755);
        }
        // Nothing is left beside it: no staging, no old tree, no download.
        let names: Vec<String> = fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["job".to_string()]);
    }

    #[test]
    fn a_refused_artifact_leaves_the_old_output_alone() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path();
        let dest = dir.join("job");
        fs::create_dir_all(&dest).expect("mkdir");
        fs::write(dest.join("keep"), "old").expect("write");
        let src = tempfile::tempdir().expect("tempdir");
        fs::write(src.path().join("big"), "0123456789").expect("write");
        let mut file = tempfile::NamedTempFile::new_in(dir).expect("temp");
        artifact::pack(src.path(), &mut file).expect("pack");
        // Content over the bound is refused.
        let err = unpack_and_replace(file, dir, &dest, 5).expect_err("too large");
        assert!(err.contains("exceeds"), "{err}");
        assert_eq!(fs::read_to_string(dest.join("keep")).expect("read"), "old");
        let names: Vec<String> = fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["job".to_string()]);
    }
}
