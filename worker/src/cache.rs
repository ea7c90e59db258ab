//! The worker's content-addressed cache: blobs (source files, packed
//! artifacts, Remote Execution API inputs) stored by [`BlobKey`] (file name:
//! the hash in hex, 40 characters for SHA-1, 64 for SHA-256) under a size
//! bound, evicting the least recently used. It survives restarts: the files
//! are the index, and a file's modification time is its last use.
//!
//! What the worker tells the coordinators it holds ([`Cache::digests`],
//! [`Cache::take_evicted`]) is SHA-1 blobs only: the artifacts peers may
//! fetch are named by SHA-1, and SHA-256 entries (Remote Execution API
//! inputs) are kept for the worker's own use.
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

use distbuild_proto::{BlobKey, Digest, HashFunction};

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
    /// key -> (size, last use tick)
    entries: BTreeMap<BlobKey, (u64, u64)>,
    /// (last use tick, key), oldest first.
    lru: BTreeSet<(u64, BlobKey)>,
    pins: BTreeMap<BlobKey, usize>,
    total_bytes: u64,
    tick: u64,
    /// Evicted since the last `take_evicted`, oldest first, at most
    /// `MAX_EVICTION_LOG` (the oldest are forgotten beyond it). SHA-1 only:
    /// nothing else is ever reported.
    evicted: Vec<Digest>,
    /// Entries evicted since the cache opened (for metrics).
    evictions: u64,
}

/// Evictions remembered for `Cache::take_evicted` between two calls. Beyond
/// it the oldest are forgotten: a holder list that is briefly too long only
/// costs a peer one NOT_FOUND before it tries the next holder.
pub const MAX_EVICTION_LOG: usize = 100_000;

impl Index {
    fn touch(&mut self, digest: BlobKey) {
        self.tick += 1;
        if let Some((_, last)) = self.entries.get_mut(&digest) {
            self.lru.remove(&(*last, digest));
            *last = self.tick;
            self.lru.insert((self.tick, digest));
        }
    }

    fn insert(&mut self, digest: BlobKey, size: u64) {
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
    /// Walks the LRU order only as far as it removes (or passes pinned
    /// entries): nothing when within `max`, so an insert costs the same
    /// however many entries the cache holds.
    fn evict(&mut self, max_bytes: u64) -> Vec<BlobKey> {
        use std::ops::Bound::{Excluded, Unbounded};
        let mut victims = Vec::new();
        let mut passed: Option<(u64, BlobKey)> = None;
        while self.total_bytes > max_bytes {
            let next = match passed {
                None => self.lru.first().copied(),
                Some(last) => self.lru.range((Excluded(last), Unbounded)).next().copied(),
            };
            let Some((tick, digest)) = next else {
                break;
            };
            passed = Some((tick, digest));
            if self.pins.contains_key(&digest) {
                continue;
            }
            let (size, _) = self.entries.remove(&digest).expect("lru and entries agree");
            self.lru.remove(&(tick, digest));
            self.total_bytes -= size;
            self.evictions += 1;
            victims.push(digest);
        }
        self.evicted
            .extend(victims.iter().filter_map(BlobKey::sha1));
        if self.evicted.len() > MAX_EVICTION_LOG {
            let excess = self.evicted.len() - MAX_EVICTION_LOG;
            self.evicted.drain(..excess);
        }
        victims
    }
}

/// Files the attic holds at most (see [`Cache::donate`]).
const ATTIC_MAX: usize = 256;

/// A content-addressed blob cache in one directory.
#[derive(Clone)]
pub struct Cache {
    dir: PathBuf,
    max_bytes: u64,
    index: Arc<Mutex<Index>>,
    /// Emptied files finished jobs left, in `tmp/`, to write new blobs
    /// into (see [`Cache::donate`]).
    attic: Arc<Mutex<Vec<PathBuf>>>,
    attic_next: Arc<std::sync::atomic::AtomicU64>,
    /// A lock per blob being fetched (see [`Cache::fetch_turn`]).
    fetching: Arc<Mutex<BTreeMap<BlobKey, Arc<tokio::sync::Mutex<()>>>>>,
}

/// The turn to fetch one blob into the cache (see [`Cache::fetch_turn`]).
pub struct FetchTurn {
    fetching: Arc<Mutex<BTreeMap<BlobKey, Arc<tokio::sync::Mutex<()>>>>>,
    key: BlobKey,
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for FetchTurn {
    fn drop(&mut self) {
        let mut fetching = self.fetching.lock().expect("fetching poisoned");
        self.held = None;
        // The map holds the last reference when nobody waits: forgotten,
        // so the map holds only fetches under way.
        if fetching
            .get(&self.key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            fetching.remove(&self.key);
        }
    }
}

/// Keeps a blob from eviction while it lives.
pub struct Pin {
    cache: Cache,
    digest: BlobKey,
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
        let mut found: Vec<(SystemTime, BlobKey, u64)> = Vec::new();
        for entry in fs::read_dir(&blobs).map_err(io_err(format!("list {}", blobs.display())))? {
            let entry = entry.map_err(io_err(format!("list {}", blobs.display())))?;
            let name = entry.file_name();
            // Anything not named by a key (40 or 64 lowercase hex) is not
            // ours to keep.
            let Some(digest) = name.to_str().and_then(|n| n.parse::<BlobKey>().ok()) else {
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
            attic: Arc::default(),
            attic_next: Arc::default(),
            fetching: Arc::default(),
        };
        cache.evict()?;
        Ok(cache)
    }

    fn path_of(&self, digest: &BlobKey) -> PathBuf {
        self.dir.join("blobs").join(digest.to_string())
    }

    /// Bytes held, entries held, and entries evicted since it opened.
    pub fn stats(&self) -> (u64, u64, u64) {
        let index = self.index.lock().expect("cache index poisoned");
        (
            index.total_bytes,
            index.entries.len() as u64,
            index.evictions,
        )
    }

    /// Total bytes held.
    pub fn total_bytes(&self) -> u64 {
        self.index.lock().expect("cache index poisoned").total_bytes
    }

    /// Whether the cache holds `key` (a [`Digest`] is a SHA-1 key).
    pub fn contains(&self, key: impl Into<BlobKey>) -> bool {
        self.index
            .lock()
            .expect("cache index poisoned")
            .entries
            .contains_key(&key.into())
    }

    /// Up to `limit` held SHA-1 digests, most recently used first (what
    /// the coordinators are told this worker holds; SHA-256 entries are
    /// never listed).
    pub fn digests(&self, limit: usize) -> Vec<Digest> {
        let index = self.index.lock().expect("cache index poisoned");
        index
            .lru
            .iter()
            .rev()
            .filter_map(|(_, key)| key.sha1())
            .take(limit)
            .collect()
    }

    /// The SHA-1 digests evicted since the previous call, oldest first (at
    /// most [`MAX_EVICTION_LOG`]); SHA-256 evictions are not reported.
    pub fn take_evicted(&self) -> Vec<Digest> {
        std::mem::take(&mut self.index.lock().expect("cache index poisoned").evicted)
    }

    /// Waits for the turn to fetch blob `key`: one fetch of a blob at a
    /// time, so jobs staging the same new input (a header every compile
    /// includes) wait for the first one's fetch and find the blob held
    /// ([`Cache::holds`]) instead of fetching it again.
    pub async fn fetch_turn(&self, key: BlobKey) -> FetchTurn {
        let lock = self
            .fetching
            .lock()
            .expect("fetching poisoned")
            .entry(key)
            .or_default()
            .clone();
        FetchTurn {
            fetching: self.fetching.clone(),
            key,
            held: Some(lock.lock_owned().await),
        }
    }

    /// Whether blob `key` is held.
    pub fn holds(&self, key: BlobKey) -> bool {
        self.index
            .lock()
            .expect("cache index poisoned")
            .entries
            .contains_key(&key)
    }

    /// Opens a held blob for reading, pinned while the pin lives, and marks
    /// it used.
    pub fn open_blob(&self, key: impl Into<BlobKey>) -> Result<Option<(File, Pin)>, CacheError> {
        let key = key.into();
        let pin = {
            let mut index = self.index.lock().expect("cache index poisoned");
            if !index.entries.contains_key(&key) {
                return Ok(None);
            }
            index.touch(key);
            *index.pins.entry(key).or_default() += 1;
            Pin {
                cache: self.clone(),
                digest: key,
            }
        };
        let path = self.path_of(&key);
        let file = File::open(&path).map_err(io_err(format!("open {}", path.display())))?;
        // Record the use on disk, so LRU order survives a restart.
        let _ = file.set_modified(SystemTime::now());
        Ok(Some((file, pin)))
    }

    /// Stores the bytes read from `input` under their SHA-1 digest, which
    /// must be `expected` (when given). Returns the digest. Evicts to stay
    /// within the bound.
    pub fn insert(&self, expected: Option<Digest>, input: impl Read) -> Result<Digest, CacheError> {
        let key = self.insert_hashed(HashFunction::Sha1, expected.map(BlobKey::from), input)?;
        Ok(key.sha1().expect("hashed with SHA-1"))
    }

    /// Stores the bytes read from `input`, which must hash to `expected`
    /// (verified with `expected`'s function). Evicts to stay within the
    /// bound.
    pub fn insert_key(&self, expected: BlobKey, input: impl Read) -> Result<(), CacheError> {
        self.insert_hashed(expected.function(), Some(expected), input)
            .map(drop)
    }

    /// Stores the bytes read from `input` under their `function` hash,
    /// which must be `expected` when given; returns the key.
    fn insert_hashed(
        &self,
        function: HashFunction,
        expected: Option<BlobKey>,
        mut input: impl Read,
    ) -> Result<BlobKey, CacheError> {
        let mut tmp = tempfile::NamedTempFile::new_in(self.dir.join("tmp"))
            .map_err(io_err("create a cache temporary file"))?;
        let mut hasher = function.hasher();
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
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n])
                .map_err(io_err("write cache temporary file"))?;
        }
        let actual = hasher.finish();
        if let Some(expected) = expected
            && expected != actual
        {
            return Err(CacheError::DigestMismatch { expected, actual });
        }
        self.store(tmp, actual, size)?;
        Ok(actual)
    }

    /// Moves the finished temporary file `tmp` into the cache as `key`'s
    /// blob of `size` bytes, and evicts to stay within the bound.
    fn store(
        &self,
        tmp: tempfile::NamedTempFile,
        key: BlobKey,
        size: u64,
    ) -> Result<(), CacheError> {
        tmp.persist(self.path_of(&key))
            .map_err(|e| CacheError::Io {
                context: "move blob into the cache".into(),
                source: e.error,
            })?;
        self.index
            .lock()
            .expect("cache index poisoned")
            .insert(key, size);
        self.evict()
    }

    /// An empty temporary file in the cache's directory, for a blob the
    /// worker writes and hashes itself (see [`Cache::adopt`]): one from
    /// the attic when it has one, else a new one.
    pub fn temp_file(&self) -> Result<tempfile::NamedTempFile, CacheError> {
        use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
        while let Some(path) = self.attic.lock().expect("attic poisoned").pop() {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path);
            if let Ok(file) = file
                && file
                    .metadata()
                    .is_ok_and(|m| m.is_file() && m.nlink() == 1 && m.len() == 0)
                && let Ok(temp) = tempfile::TempPath::try_from_path(&path)
            {
                return Ok(tempfile::NamedTempFile::from_parts(file, temp));
            }
            let _ = fs::remove_file(&path);
        }
        tempfile::NamedTempFile::new_in(self.dir.join("tmp"))
            .map_err(io_err("create a cache temporary file"))
    }

    /// Takes `path`, a file a finished job left, into the attic instead of
    /// its deletion, emptied, for a later blob to be written into: on a
    /// file system without a journal (ext4 here) every new file walks past
    /// the inodes deleted in the last seconds, and a worker deleting each
    /// job's outputs made that walk long. Only a regular file of this
    /// process's user with one link and no other open description (a
    /// write lease is granted only then; no process outside the worker can
    /// reach it later) is taken, while the attic has room; `false` leaves
    /// it where it is.
    pub fn donate(&self, path: &Path) -> bool {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
        if self.attic.lock().expect("attic poisoned").len() >= ATTIC_MAX {
            return false;
        }
        let Ok(file) = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        else {
            return false;
        };
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let suitable = file
            .metadata()
            .is_ok_and(|m| m.is_file() && m.nlink() == 1 && m.uid() == me);
        let fd = file.as_raw_fd();
        // SAFETY: fcntl on a descriptor this function owns.
        if !suitable || unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK) } != 0 {
            return false;
        }
        let emptied = file.set_len(0).is_ok()
            && file
                .set_permissions(fs::Permissions::from_mode(0o600))
                .is_ok();
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
        if !emptied {
            return false;
        }
        let n = self
            .attic_next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let kept = self.dir.join("tmp").join(format!("attic-{n}"));
        if fs::rename(path, &kept).is_err() {
            return false;
        }
        self.attic.lock().expect("attic poisoned").push(kept);
        true
    }

    /// Stores `file` (from [`Cache::temp_file`]), whose `size` bytes the
    /// caller hashed to `digest` as it wrote them, without reading it
    /// again. Evicts to stay within the bound.
    pub fn adopt(
        &self,
        file: tempfile::NamedTempFile,
        digest: impl Into<BlobKey>,
        size: u64,
    ) -> Result<(), CacheError> {
        if size > self.max_bytes {
            return Err(CacheError::TooLarge {
                size,
                max_bytes: self.max_bytes,
            });
        }
        self.store(file, digest.into(), size)
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
    use std::time::Duration;

    fn blob(n: u8, len: usize) -> Vec<u8> {
        vec![n; len]
    }

    /// A blob is fetched by one caller at a time: the next waits for the
    /// turn and then finds it held; other blobs go ahead; a finished
    /// turn is forgotten.
    #[tokio::test]
    async fn one_fetch_of_a_blob_at_a_time() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let cache = Cache::open(dir.path(), 1 << 20).expect("open");
        let key = BlobKey::from(Digest::of(b"x"));
        let first = cache.fetch_turn(key).await;
        let second = tokio::spawn({
            let cache = cache.clone();
            async move {
                let _turn = cache.fetch_turn(key).await;
                cache.holds(key)
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !second.is_finished(),
            "the second fetch waits for the first"
        );
        let other = tokio::time::timeout(
            Duration::from_secs(5),
            cache.fetch_turn(BlobKey::from(Digest::of(b"y"))),
        )
        .await
        .expect("another blob's fetch goes ahead");
        cache
            .insert(Some(Digest::of(b"x")), &b"x"[..])
            .expect("insert");
        drop(first);
        assert!(second.await.expect("joined"), "the second finds it held");
        drop(other);
        assert!(
            cache.fetching.lock().expect("lock").is_empty(),
            "no finished turn is kept"
        );
    }

    #[test]
    fn stores_verifies_and_reads_back() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let cache = Cache::open(dir.path(), 1 << 20).expect("open");
        let data = blob(1, 1000);
        let digest = cache
            .insert(Some(Digest::of(&data)), &data[..])
            .expect("insert");
        let (mut file, _pin) = cache.open_blob(digest).expect("open").expect("present");
        let mut back = Vec::new();
        file.read_to_end(&mut back).expect("read");
        assert_eq!(back, data);
        let wrong = cache.insert(Some(Digest::of(b"other")), &data[..]);
        assert!(matches!(wrong, Err(CacheError::DigestMismatch { .. })));
        assert_eq!(cache.total_bytes(), 1000, "a refused blob takes no space");
    }

    fn read_blob(cache: &Cache, digest: Digest) -> Vec<u8> {
        let (mut file, _pin) = cache.open_blob(digest).expect("open").expect("present");
        let mut back = Vec::new();
        file.read_to_end(&mut back).expect("read");
        back
    }

    #[test]
    fn an_adopted_file_is_stored_as_written_and_counted() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let cache = Cache::open(dir.path(), 1500).expect("open");
        let data = blob(2, 1000);
        let mut file = cache.temp_file().expect("temp file");
        file.write_all(&data).expect("write");
        cache.adopt(file, Digest::of(&data), 1000).expect("adopt");
        assert_eq!(read_blob(&cache, Digest::of(&data)), data);
        assert_eq!(cache.total_bytes(), 1000);
        let too_big = cache.temp_file().expect("temp file");
        let refused = cache.adopt(too_big, Digest::of(b"big"), 2000);
        assert!(matches!(
            refused,
            Err(CacheError::TooLarge { size: 2000, .. })
        ));
        assert_eq!(cache.total_bytes(), 1000, "a refused blob takes no space");
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).expect("list").count(),
            0,
            "the refused file is removed"
        );
    }

    #[test]
    fn a_donated_file_becomes_the_next_blob_file_unless_another_can_reach_it() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::TempDir::new().expect("tempdir");
        let cache = Cache::open(&dir.path().join("cache"), 1 << 20).expect("open");
        let job = dir.path().join("job");
        fs::create_dir(&job).expect("mkdir");
        let left = job.join("out");
        fs::write(&left, b"a job's output").expect("write");
        let inode = fs::metadata(&left).expect("stat").ino();
        assert!(cache.donate(&left));
        assert!(!left.exists(), "taken away");
        let mut reused = cache.temp_file().expect("temp file");
        assert_eq!(reused.as_file().metadata().expect("stat").ino(), inode);
        assert_eq!(
            reused.as_file().metadata().expect("stat").len(),
            0,
            "emptied"
        );
        let data = blob(3, 100);
        reused.write_all(&data).expect("write");
        cache.adopt(reused, Digest::of(&data), 100).expect("adopt");
        assert_eq!(read_blob(&cache, Digest::of(&data)), data);
        // Another link, or another open description, could reach the blob
        // later: such files are not taken.
        let linked = job.join("linked");
        fs::write(&linked, b"x").expect("write");
        fs::hard_link(&linked, job.join("elsewhere")).expect("link");
        assert!(!cache.donate(&linked));
        let open = job.join("open");
        fs::write(&open, b"x").expect("write");
        let holder = fs::File::open(&open).expect("open");
        assert!(!cache.donate(&open));
        drop(holder);
        assert!(cache.donate(&open));
        std::os::unix::fs::symlink(&open, job.join("link")).expect("symlink");
        assert!(!cache.donate(&job.join("link")));
        // With nothing in the attic, a new file.
        assert!(cache.temp_file().is_ok());
        assert!(cache.temp_file().is_ok());
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
        assert!(cache.open_blob(kept).expect("open").is_some());
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
        drop(cache.open_blob(a).expect("open a"));
        let (_file, pin_b) = cache.open_blob(b).expect("open b").expect("b present");
        let _ = cache.open_blob(c).expect("open c"); // c used, then a used again
        drop(cache.open_blob(a).expect("open a"));
        let d = cache.insert(None, &blob(4, 1000)[..]).expect("d");
        assert!(cache.contains(a) && cache.contains(b) && cache.contains(d));
        assert!(
            !cache.contains(c),
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
    fn eviction_passes_pinned_entries_and_removes_the_oldest_others_until_within_the_bound() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let cache = Cache::open(dir.path(), 5000).expect("open");
        let keys: Vec<Digest> = (1..=5)
            .map(|n| cache.insert(None, &blob(n, 1000)[..]).expect("insert"))
            .collect();
        // The two oldest are pinned: a 3,000-byte blob evicts the three
        // after them, oldest first.
        let pins: Vec<_> = keys[..2]
            .iter()
            .map(|k| cache.open_blob(*k).expect("open").expect("present").1)
            .collect();
        let big = cache.insert(None, &blob(9, 3000)[..]).expect("big");
        assert_eq!(cache.take_evicted(), keys[2..].to_vec());
        assert!(cache.contains(keys[0]) && cache.contains(keys[1]) && cache.contains(big));
        assert_eq!(cache.total_bytes(), 5000);
        drop(pins);
    }

    #[test]
    fn sha256_blobs_are_verified_kept_across_a_restart_and_never_listed() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let data = blob(7, 500);
        let key = HashFunction::Sha256.key_of(&data);
        let sha1 = Digest::of(b"a source");
        {
            let cache = Cache::open(dir.path(), 1 << 20).expect("open");
            let wrong = cache.insert_key(HashFunction::Sha256.key_of(b"other"), &data[..]);
            assert!(
                matches!(wrong, Err(CacheError::DigestMismatch { actual, .. }) if actual == key),
                "{wrong:?}"
            );
            // The same content named by its SHA-1 is another key.
            let sha1_of_data = BlobKey::from(Digest::of(&data));
            cache.insert_key(key, &data[..]).expect("insert");
            assert!(cache.contains(key) && !cache.contains(sha1_of_data));
            assert_eq!(cache.total_bytes(), 500, "a refused blob takes no space");
            cache.insert(Some(sha1), &b"a source"[..]).expect("sha1");
        }
        let cache = Cache::open(dir.path(), 1 << 20).expect("reopen");
        assert!(
            dir.path().join("blobs").join(key.to_string()).is_file(),
            "named by its 64 hex characters"
        );
        let (mut file, _pin) = cache.open_blob(key).expect("open").expect("kept");
        let mut back = Vec::new();
        file.read_to_end(&mut back).expect("read");
        assert_eq!(back, data);
        assert_eq!(
            cache.digests(10),
            vec![sha1],
            "only SHA-1 digests are listed"
        );
    }

    #[test]
    fn sha256_evictions_are_not_reported() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let cache = Cache::open(dir.path(), 1000).expect("open");
        let first = blob(1, 600);
        cache
            .insert_key(HashFunction::Sha256.key_of(&first), &first[..])
            .expect("insert");
        let second = cache
            .insert(None, &blob(2, 600)[..])
            .expect("evicts the first");
        assert!(cache.contains(second));
        assert!(!cache.contains(HashFunction::Sha256.key_of(&first)));
        assert!(cache.take_evicted().is_empty());
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
            drop(cache.open_blob(a).expect("use a")); // a is now newest
            fs::write(dir.path().join("tmp/half-written"), b"x").expect("debris");
        }
        // Reopened with room for one: the older (b) goes.
        let cache = Cache::open(dir.path(), 1500).expect("reopen");
        assert!(cache.contains(a));
        assert!(!cache.contains(b));
        assert!(!dir.path().join("tmp/half-written").exists());
    }
}
