//! The worker's content-addressed cache: blobs (source files, packed
//! artifacts) stored by SHA-1 digest under a size bound, evicting the least
//! recently used. It survives restarts: the files are the index, and a
//! file's modification time is its last use.
//!
//! Invariants: a blob is visible only once complete and verified (written to
//! a temporary file, hashed, renamed into place); a pinned blob (in use by a
//! running job or transfer) is never evicted; after every insert the total
//! size is at most the bound unless pinned blobs alone exceed it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use distbuild_proto::{BlobKey, Digest};
use sha1::{Digest as _, Sha1};

/// Why a cache operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The content hashed to another digest than the one expected.
    #[error("content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest the caller named.
        expected: BlobKey,
        /// The content's digest (same function).
        actual: BlobKey,
    },
    /// The content is larger than the whole cache: storing it would evict
    /// everything and then it, too.
    #[error(
        "{size} bytes or more do not fit in the cache, which holds at most {max_bytes} bytes (--cache-max-bytes)"
    )]
    TooLarge {
        /// The content's size, as far as it was read.
        size: u64,
        /// The cache's bound.
        max_bytes: u64,
    },
    /// A filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl From<distbuild_proto::blocking::Panicked> for CacheError {
    fn from(panicked: distbuild_proto::blocking::Panicked) -> Self {
        CacheError::Io {
            context: "cache".to_string(),
            source: panicked.into(),
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> CacheError {
    let context = context.into();
    move |source| CacheError::Io { context, source }
}

#[derive(Default)]
struct Index {
    /// digest -> (size, last use tick)
    entries: BTreeMap<Digest, (u64, u64)>,
    /// (last use tick, digest), oldest first.
    lru: BTreeSet<(u64, Digest)>,
    pins: BTreeMap<Digest, usize>,
    total_bytes: u64,
    tick: u64,
    /// Evicted since the last `take_evicted`, oldest first, at most
    /// `MAX_EVICTION_LOG` (the oldest are forgotten beyond it).
    evicted: Vec<Digest>,
}

/// Evictions remembered for `Cache::take_evicted` between two calls. Beyond
/// it the oldest are forgotten: a holder list that is briefly too long only
/// costs a peer one NOT_FOUND before it tries the next holder.
pub const MAX_EVICTION_LOG: usize = 100_000;

impl Index {
    fn touch(&mut self, digest: Digest) {
        self.tick += 1;
        if let Some((_, last)) = self.entries.get_mut(&digest) {
            self.lru.remove(&(*last, digest));
            *last = self.tick;
            self.lru.insert((self.tick, digest));
        }
    }

    fn insert(&mut self, digest: Digest, size: u64) {
        if self.entries.contains_key(&digest) {
            self.touch(digest);
            return;
        }
        self.tick += 1;
        self.entries.insert(digest, (size, self.tick));
        self.lru.insert((self.tick, digest));
        self.total_bytes += size;
    }

    /// Removes least recently used unpinned entries until within `max`;
    /// returns what was removed.
    fn evict(&mut self, max_bytes: u64) -> Vec<Digest> {
        let mut victims = Vec::new();
        let mut candidates = self.lru.iter().copied().collect::<Vec<_>>().into_iter();
        while self.total_bytes > max_bytes {
            let Some((tick, digest)) = candidates.next() else {
                break;
            };
            if self.pins.contains_key(&digest) {
                continue;
            }
            let (size, _) = self.entries.remove(&digest).expect("lru and entries agree");
            self.lru.remove(&(tick, digest));
            self.total_bytes -= size;
            victims.push(digest);
        }
        self.evicted.extend_from_slice(&victims);
        if self.evicted.len() > MAX_EVICTION_LOG {
            let excess = self.evicted.len() - MAX_EVICTION_LOG;
            self.evicted.drain(..excess);
        }
        victims
    }
}

/// A content-addressed blob cache in one directory.
#[derive(Clone)]
pub struct Cache {
    dir: PathBuf,
    max_bytes: u64,
    index: Arc<Mutex<Index>>,
}

/// Keeps a blob from eviction while it lives.
pub struct Pin {
    cache: Cache,
    digest: Digest,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut index = self.cache.index.lock().expect("cache index poisoned");
        if let Some(n) = index.pins.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                index.pins.remove(&self.digest);
            }
        }
    }
}

impl Cache {
    /// Opens the cache in `dir`, indexing the blobs already there (oldest
    /// modification first) and removing unfinished writes.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, CacheError> {
        let blobs = dir.join("blobs");
        let tmp = dir.join("tmp");
        fs::create_dir_all(&blobs).map_err(io_err(format!("create {}", blobs.display())))?;
        if tmp.exists() {
            crate::tree::remove_tree(&tmp).map_err(io_err(format!("clear {}", tmp.display())))?;
        }
        fs::create_dir_all(&tmp).map_err(io_err(format!("create {}", tmp.display())))?;
        let mut found: Vec<(SystemTime, Digest, u64)> = Vec::new();
        for entry in fs::read_dir(&blobs).map_err(io_err(format!("list {}", blobs.display())))? {
            let entry = entry.map_err(io_err(format!("list {}", blobs.display())))?;
            let name = entry.file_name();
            // Anything not named by a digest is not ours to keep.
            let Some(digest) = name.to_str().and_then(|n| n.parse::<Digest>().ok()) else {
                let _ = fs::remove_file(entry.path());
                continue;
            };
            let meta = entry
                .metadata()
                .map_err(io_err(format!("stat {}", entry.path().display())))?;
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((modified, digest, meta.len()));
        }
        found.sort();
        let mut index = Index::default();
        for (_, digest, size) in found {
            index.insert(digest, size);
        }
        let cache = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            index: Arc::new(Mutex::new(index)),
        };
        cache.evict()?;
        Ok(cache)
    }

    fn path_of(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join(digest.to_string())
    }

    /// Total bytes held.
    pub fn total_bytes(&self) -> u64 {
        self.index.lock().expect("cache index poisoned").total_bytes
    }

    /// Whether the cache holds `digest`.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.index
            .lock()
            .expect("cache index poisoned")
            .entries
            .contains_key(digest)
    }

    /// Up to `limit` held digests, most recently used first.
    pub fn digests(&self, limit: usize) -> Vec<Digest> {
        let index = self.index.lock().expect("cache index poisoned");
        index
            .lru
            .iter()
            .rev()
            .take(limit)
            .map(|(_, d)| *d)
            .collect()
    }

    /// The digests evicted since the previous call, oldest first (at most
    /// [`MAX_EVICTION_LOG`]).
    pub fn take_evicted(&self) -> Vec<Digest> {
        std::mem::take(&mut self.index.lock().expect("cache index poisoned").evicted)
    }

    /// Opens a held blob for reading, pinned while the pin lives, and marks
    /// it used.
    pub fn open_blob(&self, digest: &Digest) -> Result<Option<(File, Pin)>, CacheError> {
        let pin = {
            let mut index = self.index.lock().expect("cache index poisoned");
            if !index.entries.contains_key(digest) {
                return Ok(None);
            }
            index.touch(*digest);
            *index.pins.entry(*digest).or_default() += 1;
            Pin {
                cache: self.clone(),
                digest: *digest,
            }
        };
        let path = self.path_of(digest);
        let file = File::open(&path).map_err(io_err(format!("open {}", path.display())))?;
        // Record the use on disk, so LRU order survives a restart.
        let _ = file.set_modified(SystemTime::now());
        Ok(Some((file, pin)))
    }

    /// Stores the bytes read from `input`, which must hash to `expected`
    /// (when given). Returns the digest. Evicts to stay within the bound.
    pub fn insert(
        &self,
        expected: Option<Digest>,
        mut input: impl Read,
    ) -> Result<Digest, CacheError> {
        let mut tmp = tempfile::NamedTempFile::new_in(self.dir.join("tmp"))
            .map_err(io_err("create a cache temporary file"))?;
        let mut sha1 = Sha1::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = input.read(&mut buf).map_err(io_err("read blob content"))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if size > self.max_bytes {
                return Err(CacheError::TooLarge {
                    size,
                    max_bytes: self.max_bytes,
                });
            }
            sha1.update(&buf[..n]);
            tmp.write_all(&buf[..n])
                .map_err(io_err("write cache temporary file"))?;
        }
        let actual = Digest::from_bytes(sha1.finalize().into());
        if let Some(expected) = expected
            && expected != actual
        {
            return Err(CacheError::DigestMismatch {
                expected: expected.into(),
                actual: actual.into(),
            });
        }
        tmp.persist(self.path_of(&actual))
            .map_err(|e| CacheError::Io {
                context: "move blob into the cache".into(),
                source: e.error,
            })?;
        self.index
            .lock()
            .expect("cache index poisoned")
            .insert(actual, size);
        self.evict()?;
        Ok(actual)
    }

    /// The most bytes the cache holds.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn evict(&self) -> Result<(), CacheError> {
        let victims = self
            .index
            .lock()
            .expect("cache index poisoned")
            .evict(self.max_bytes);
        for digest in victims {
            let path = self.path_of(&digest);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("evict {}", path.display()))(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: u8, len: usize) -> Vec<u8> {
        vec![n; len]
    }

    #[test]
    fn stores_verifies_and_reads_back() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let cache = Cache::open(dir.path(), 1 << 20).expect("open");
        let data = blob(1, 1000);
        let digest = cache
            .insert(Some(Digest::of(&data)), &data[..])
            .expect("insert");
        let (mut file, _pin) = cache.open_blob(&digest).expect("open").expect("present");
        let mut back = Vec::new();
        file.read_to_end(&mut back).expect("read");
        assert_eq!(back, data);
        let wrong = cache.insert(Some(Digest::of(b"other")), &data[..]);
        assert!(matches!(wrong, Err(CacheError::DigestMismatch { .. })));
        assert_eq!(cache.total_bytes(), 1000, "a refused blob takes no space");
    }

    #[test]
    fn a_blob_larger_than_the_whole_cache_is_refused_naming_both_sizes() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let cache = Cache::open(dir.path(), 1000).expect("open");
        let kept = cache.insert(None, &blob(1, 600)[..]).expect("fits");
        let refused = cache.insert(None, &blob(2, 1001)[..]);
        assert!(
            matches!(
                refused,
                Err(CacheError::TooLarge {
                    size: 1001,
                    max_bytes: 1000
                })
            ),
            "{refused:?}"
        );
        // Nothing was evicted for it.
        assert!(cache.open_blob(&kept).expect("open").is_some());
        assert_eq!(cache.total_bytes(), 600);
    }

    #[test]
    fn evicts_least_recently_used_but_never_pinned() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let cache = Cache::open(dir.path(), 3000).expect("open");
        let a = cache.insert(None, &blob(1, 1000)[..]).expect("a");
        let b = cache.insert(None, &blob(2, 1000)[..]).expect("b");
        let c = cache.insert(None, &blob(3, 1000)[..]).expect("c");
        // Use a, pin b: d must evict c (a was used after c; b is pinned).
        drop(cache.open_blob(&a).expect("open a"));
        let (_file, pin_b) = cache.open_blob(&b).expect("open b").expect("b present");
        let _ = cache.open_blob(&c).expect("open c"); // c used, then a used again
        drop(cache.open_blob(&a).expect("open a"));
        let d = cache.insert(None, &blob(4, 1000)[..]).expect("d");
        assert!(cache.contains(&a) && cache.contains(&b) && cache.contains(&d));
        assert!(
            !cache.contains(&c),
            "c was the least recently used unpinned blob"
        );
        assert!(cache.total_bytes() <= 3000);
        assert_eq!(
            cache.take_evicted(),
            vec![c],
            "the eviction is reported once"
        );
        assert!(cache.take_evicted().is_empty());
        assert_eq!(cache.digests(2), vec![d, a], "most recently used first");
        drop(pin_b);
    }

    #[test]
    fn survives_a_restart_with_its_lru_order() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let (a, b);
        {
            let cache = Cache::open(dir.path(), 10_000).expect("open");
            a = cache.insert(None, &blob(1, 1000)[..]).expect("a");
            std::thread::sleep(std::time::Duration::from_millis(20));
            b = cache.insert(None, &blob(2, 1000)[..]).expect("b");
            std::thread::sleep(std::time::Duration::from_millis(20));
            drop(cache.open_blob(&a).expect("use a")); // a is now newest
            fs::write(dir.path().join("tmp/half-written"), b"x").expect("debris");
        }
        // Reopened with room for one: the older (b) goes.
        let cache = Cache::open(dir.path(), 1500).expect("reopen");
        assert!(cache.contains(&a));
        assert!(!cache.contains(&b));
        assert!(!dir.path().join("tmp/half-written").exists());
    }
}
