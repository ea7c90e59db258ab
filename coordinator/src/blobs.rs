//! Blobs on the coordinator's disk, by content digest (SHA-1 or SHA-256,
//! [`BlobKey`]): distbuild's sources and the Remote Execution API's CAS. A blob is
//! written to a temporary file while it streams in, verified against its
//! declared digest and size, fsynced, and only then renamed into place, so
//! a stored blob is always complete and correct.

use std::path::{Path, PathBuf};

use distbuild_proto::BlobKey;
use distbuild_proto::blob::BlobCheck;
use distbuild_proto::blocking;
use distbuild_proto::wire::MAX_BLOB_CHUNK_BYTES;

/// Largest source blob accepted (streamed; memory use does not depend on it).
pub const MAX_BLOB_BYTES: u64 = 64 << 30;

/// Why a blob was refused.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob {expected}: content hashes to {actual}")]
    DigestMismatch { expected: BlobKey, actual: BlobKey },
    #[error("blob {digest}: declared {declared} bytes, received {received}")]
    SizeMismatch {
        digest: BlobKey,
        declared: u64,
        received: u64,
    },
    #[error("blob {digest}: {size} bytes is over the limit of {MAX_BLOB_BYTES}")]
    TooLarge { digest: BlobKey, size: u64 },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<blocking::Panicked> for BlobError {
    fn from(panicked: blocking::Panicked) -> Self {
        BlobError::Io {
            context: "blob store".to_string(),
            source: panicked.into(),
        }
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BlobError {
    let context = context.into();
    move |source| BlobError::Io { context, source }
}

/// The directory of stored blobs.
#[derive(Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

/// A blob being received.
pub struct BlobWriter {
    store: BlobStore,
    digest: BlobKey,
    check: BlobCheck,
    file: blocking::FileWriter,
    tmp: tempfile::TempPath,
}

/// A stored blob being read in chunks of [`MAX_BLOB_CHUNK_BYTES`].
pub type BlobReader = blocking::ChunkReader;

impl BlobStore {
    /// Opens (creating) the store in `dir`, clearing leftovers of
    /// interrupted uploads.
    pub fn open(dir: &Path) -> Result<Self, BlobError> {
        let tmp = dir.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(format!("clear {}", tmp.display())))?;
        }
        for sub in ["objects", "tmp"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(io(format!("create {}", path.display())))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path_of(&self, digest: &BlobKey) -> PathBuf {
        self.dir.join("objects").join(digest.to_string())
    }

    /// Whether the blob is stored here.
    pub fn contains(&self, digest: &BlobKey) -> bool {
        self.path_of(digest).is_file()
    }

    /// Opens a stored blob.
    pub async fn open_blob(&self, digest: &BlobKey) -> Result<Option<BlobReader>, BlobError> {
        self.open_blob_at(digest, 0).await
    }

    /// Opens a stored blob to be read from byte `offset` on.
    pub async fn open_blob_at(
        &self,
        digest: &BlobKey,
        offset: u64,
    ) -> Result<Option<BlobReader>, BlobError> {
        use std::io::Seek as _;
        let path = self.path_of(digest);
        let open = move || {
            let mut file = std::fs::File::open(path)?;
            file.seek(std::io::SeekFrom::Start(offset))?;
            Ok::<_, std::io::Error>(file)
        };
        match blocking::run(open).await {
            Ok(file) => Ok(Some(BlobReader::new(file, MAX_BLOB_CHUNK_BYTES))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(BlobError::Io {
                context: format!("open blob {digest}"),
                source: e,
            }),
        }
    }

    /// Starts receiving a blob of `size` bytes that must hash to `digest`.
    pub async fn writer(&self, digest: BlobKey, size: u64) -> Result<BlobWriter, BlobError> {
        if size > MAX_BLOB_BYTES {
            return Err(BlobError::TooLarge { digest, size });
        }
        let tmp = tempfile::NamedTempFile::new_in(self.dir.join("tmp"))
            .map_err(io("create a blob temporary file"))?;
        let (file, tmp) = tmp.into_parts();
        Ok(BlobWriter {
            store: self.clone(),
            digest,
            check: BlobCheck::new(digest, size),
            file: blocking::FileWriter::new(file),
            tmp,
        })
    }
}

impl BlobWriter {
    /// Appends a chunk.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        self.check
            .add(data)
            .map_err(|over| BlobError::SizeMismatch {
                digest: self.digest,
                declared: over.size,
                received: over.received,
            })?;
        self.file
            .write_all(bytes::Bytes::copy_from_slice(data))
            .await
            .map_err(io("write a blob temporary file"))
    }

    /// Verifies and stores the blob durably.
    pub async fn finish(self) -> Result<(), BlobError> {
        self.check.finish().map_err(|bad| {
            if bad.received != bad.size {
                BlobError::SizeMismatch {
                    digest: bad.digest,
                    declared: bad.size,
                    received: bad.received,
                }
            } else {
                BlobError::DigestMismatch {
                    expected: bad.digest,
                    actual: bad.actual,
                }
            }
        })?;
        let file = self.file.into_inner().map_err(io("fsync a blob"))?;
        let (digest, tmp) = (self.digest, self.tmp);
        let dest = self.store.path_of(&digest);
        let objects = self.store.dir.join("objects");
        blocking::run(move || {
            file.sync_all().map_err(io("fsync a blob"))?;
            drop(file);
            tmp.persist(&dest).map_err(|e| BlobError::Io {
                context: format!("move blob into {}", dest.display()),
                source: e.error,
            })?;
            // The rename is durable only once its directory is synced; the
            // blob is recorded (through Raft) after this returns.
            std::fs::File::open(&objects)
                .and_then(|dir| dir.sync_all())
                .map_err(io(format!("fsync {}", objects.display())))
        })
        .await?;
        Ok(())
    }
}

impl BlobStore {
    /// Deletes every stored blob that `recorded` says the state no longer
    /// records (collected, or never recorded) and that was written at
    /// least `grace` ago: a blob is written (and copied to the other
    /// replicas) before its record is committed, and a replica applies the
    /// record a little later, so a younger file may be about to be
    /// recorded. Returns the blobs and bytes deleted.
    pub async fn sweep(
        &self,
        recorded: impl Fn(&BlobKey) -> bool + Send + 'static,
        grace: std::time::Duration,
    ) -> Result<(usize, u64), BlobError> {
        let objects = self.dir.join("objects");
        blocking::run(move || {
            let mut swept = (0, 0);
            let entries =
                std::fs::read_dir(&objects).map_err(io(format!("list {}", objects.display())))?;
            for entry in entries {
                let entry = entry.map_err(io(format!("list {}", objects.display())))?;
                let Some(digest) = entry
                    .file_name()
                    .to_str()
                    .and_then(|name| name.parse::<BlobKey>().ok())
                else {
                    continue;
                };
                if recorded(&digest) {
                    continue;
                }
                // Read just before deleting: a blob uploaded again since
                // the listing was renamed into place afresh.
                let Ok(meta) = entry.metadata() else {
                    continue;
                };
                let young = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .is_none_or(|age| age < grace);
                if young {
                    continue;
                }
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => {
                        swept.0 += 1;
                        swept.1 += meta.len();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(format!("delete blob {digest}"))(e)),
                }
            }
            Ok(swept)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distbuild_proto::Digest;

    #[tokio::test]
    async fn a_sweep_deletes_only_unrecorded_blobs_past_the_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::open(dir.path()).expect("open");
        let mut stored = Vec::new();
        for content in [&b"kept"[..], b"dropped"] {
            let digest = BlobKey::from(Digest::of(content));
            let mut writer = store
                .writer(digest, content.len() as u64)
                .await
                .expect("writer");
            writer.write(content).await.expect("write");
            writer.finish().await.expect("stored");
            stored.push(digest);
        }
        let kept = stored[0];
        let recorded = move |d: &BlobKey| *d == kept;
        let young = store
            .sweep(recorded, std::time::Duration::from_secs(3600))
            .await
            .expect("sweep");
        assert_eq!(young, (0, 0), "within the grace nothing goes");
        let swept = store
            .sweep(recorded, std::time::Duration::ZERO)
            .await
            .expect("sweep");
        assert_eq!(swept, (1, 7));
        assert!(store.contains(&stored[0]));
        assert!(!store.contains(&stored[1]));
    }

    #[tokio::test]
    async fn only_verified_blobs_are_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::open(dir.path()).expect("open");
        let content = b"hello blob";
        let digest = BlobKey::from(Digest::of(content));

        let mut bad = store.writer(digest, 10).await.expect("writer");
        bad.write(b"hello blop").await.expect("write");
        let err = bad.finish().await.expect_err("wrong content");
        assert!(matches!(err, BlobError::DigestMismatch { .. }), "{err}");
        assert!(!store.contains(&digest));

        let mut short = store.writer(digest, 11).await.expect("writer");
        short.write(content).await.expect("write");
        assert!(matches!(
            short.finish().await,
            Err(BlobError::SizeMismatch { .. })
        ));

        let mut long = store.writer(digest, 3).await.expect("writer");
        assert!(matches!(
            long.write(content).await,
            Err(BlobError::SizeMismatch { .. })
        ));
        drop(long);

        let mut good = store.writer(digest, 10).await.expect("writer");
        good.write(&content[..4]).await.expect("write");
        good.write(&content[4..]).await.expect("write");
        good.finish().await.expect("stored");
        assert!(store.contains(&digest));
        // Nothing is left in tmp.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp"))
                .expect("tmp")
                .count(),
            0
        );
    }
}
