//! The workspace's digest cache: each source file's SHA-1 remembered with
//! the file's stat (device, inode, size, modification and change times),
//! so a build hashes only the files that changed since the last one and
//! stats the rest, as ninja stats its inputs (Bazel keeps the same cache
//! in its server). It is the file `digests` in the workspace's output base
//! (owner-only, see `local::OutputBase`).
//!
//! Why a matching stat means the same content: every write, truncate,
//! rename onto the path or chmod sets the file's change time to the
//! current time, which a process cannot set back without changing the
//! system clock. A file is remembered only when both its times were at
//! least [`RACY_WINDOW`] old when its hashing began, so any change after
//! that gives a later change time than the remembered one (timestamps are
//! taken from a clock that ticks in milliseconds at worst on Linux, 2 s on
//! FAT); one whose stat moved while it was hashed is not remembered.
//!
//! The file holds the entries of the last build's sources only, so it is
//! bounded by a graph's sources; one that cannot be read, is malformed, or
//! is over [`MAX_FILE_BYTES`] is ignored (every file is hashed) and
//! replaced.

use std::collections::HashMap;
use std::fs::Metadata;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use distbuild_proto::Digest;

/// The first line of the file; a different one is a different format.
const HEADER: &str = "distbuild digest cache 1";

/// A cache file larger than this is ignored, and not written.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// How old a file's times must be when its hashing begins for its digest
/// to be remembered.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

/// What identifies one version of a file's content on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// The stamp of the file `meta` describes.
    pub fn of(meta: &Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The file's length in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether both times are at least [`RACY_WINDOW`] before `began`.
    fn settled_before(&self, began: SystemTime) -> bool {
        let Ok(since_epoch) = began.duration_since(UNIX_EPOCH) else {
            return false;
        };
        let Some(limit) = since_epoch.checked_sub(RACY_WINDOW) else {
            return false;
        };
        let limit = (limit.as_secs() as i64, i64::from(limit.subsec_nanos()));
        self.mtime < limit && self.ctime < limit
    }
}

/// The remembered digests, and what this build learned.
#[derive(Debug, Default)]
pub struct DigestCache {
    known: HashMap<String, (Stamp, Digest)>,
}

/// A digest to remember after a build: the file's path in the graph, its
/// stamp when hashed, its digest.
pub type Learned = (String, Stamp, Digest);

impl DigestCache {
    /// Reads the cache file at `path`. A missing file is an empty cache; an
    /// unreadable, oversized or malformed one is ignored: the reason comes
    /// back with an empty cache.
    pub fn load(path: &Path) -> (Self, Option<String>) {
        let text = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Self::default(), None),
            Err(e) => {
                return (
                    Self::default(),
                    Some(format!("read {}: {e}", path.display())),
                );
            }
            Ok(meta) if meta.len() > MAX_FILE_BYTES => {
                let why = format!("{} is over {MAX_FILE_BYTES} bytes", path.display());
                return (Self::default(), Some(why));
            }
            Ok(_) => match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) => {
                    return (
                        Self::default(),
                        Some(format!("read {}: {e}", path.display())),
                    );
                }
            },
        };
        match Self::parse(&text) {
            Some(cache) => (cache, None),
            None => {
                let why = format!("{} is malformed", path.display());
                (Self::default(), Some(why))
            }
        }
    }

    fn parse(text: &str) -> Option<Self> {
        let mut lines = text.split_terminator('\n');
        if lines.next()? != HEADER {
            return None;
        }
        let mut known = HashMap::new();
        for line in lines {
            let mut fields = line.splitn(9, ' ');
            let mut next = || fields.next();
            let digest: Digest = next()?.parse().ok()?;
            let mut number = || next()?.parse::<i64>().ok();
            let (size, dev, ino) = (number()?, number()?, number()?);
            let mtime = (number()?, number()?);
            let ctime = (number()?, number()?);
            let path = fields.next()?;
            let stamp = Stamp {
                dev: u64::try_from(dev).ok()?,
                ino: u64::try_from(ino).ok()?,
                size: u64::try_from(size).ok()?,
                mtime,
                ctime,
            };
            known.insert(path.to_string(), (stamp, digest));
        }
        Some(Self { known })
    }

    /// The remembered digest of the file at graph path `path`, if its
    /// stamp is still `stamp`.
    pub fn lookup(&self, path: &str, stamp: &Stamp) -> Option<Digest> {
        self.known
            .get(path)
            .filter(|(known, _)| known == stamp)
            .map(|(_, digest)| *digest)
    }

    /// Whether a file hashed with `before` (its stamp when hashing began
    /// at `began`) and `after` (when it ended) may be remembered.
    pub fn may_remember(before: &Stamp, after: &Stamp, began: SystemTime) -> bool {
        before == after && before.settled_before(began)
    }

    /// Writes the cache for the next build to `path`: exactly `entries`
    /// (this build's remembered sources). Nothing is written when they are
    /// what the file already holds. Written whole to a private temporary
    /// file and renamed over the old one, so a reader sees one or the
    /// other.
    pub fn save(&self, path: &Path, entries: &[Learned]) -> std::io::Result<()> {
        let unchanged = entries.len() == self.known.len()
            && entries
                .iter()
                .all(|(p, stamp, digest)| self.known.get(p) == Some(&(*stamp, *digest)));
        if unchanged {
            return Ok(());
        }
        let mut text = format!("{HEADER}\n");
        for (p, s, digest) in entries {
            if p.contains(['\n', '\r']) {
                continue;
            }
            use std::fmt::Write as _;
            let _ = writeln!(
                text,
                "{digest} {} {} {} {} {} {} {} {p}",
                s.size, s.dev, s.ino, s.mtime.0, s.mtime.1, s.ctime.0, s.ctime.1
            );
        }
        if text.len() as u64 > MAX_FILE_BYTES {
            return Ok(());
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        // tempfile makes its files 0600.
        let mut temp = tempfile::NamedTempFile::new_in(dir)?;
        temp.write_all(text.as_bytes())?;
        temp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn stamp_of(path: &Path) -> Stamp {
        Stamp::of(&fs::metadata(path).expect("stat"))
    }

    fn later() -> SystemTime {
        SystemTime::now() + RACY_WINDOW * 2
    }

    #[test]
    fn entries_round_trip_and_match_only_the_same_stamp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.c");
        fs::write(&file, b"int a;").expect("write");
        let stamp = stamp_of(&file);
        let digest = Digest::of(b"int a;");
        let cache_file = dir.path().join("digests");
        let entries = vec![
            ("src/a b.c".to_string(), stamp, digest),
            ("new\nline".to_string(), stamp, digest),
        ];
        DigestCache::default()
            .save(&cache_file, &entries)
            .expect("save");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(&cache_file)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the cache is private");

        let (cache, why) = DigestCache::load(&cache_file);
        assert_eq!(why, None);
        assert_eq!(cache.lookup("src/a b.c", &stamp), Some(digest));
        // A path with a line break is not remembered.
        assert_eq!(cache.lookup("new\nline", &stamp), None);
        assert_eq!(cache.lookup("other.c", &stamp), None);
        let mut moved = stamp;
        moved.ctime.1 += 1;
        assert_eq!(cache.lookup("src/a b.c", &moved), None, "a changed stamp");
        let mut other = stamp;
        other.ino += 1;
        assert_eq!(cache.lookup("src/a b.c", &other), None, "another inode");
    }

    #[test]
    fn a_bad_file_is_ignored_with_its_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("digests");
        let (cache, why) = DigestCache::load(&path);
        assert!(cache.known.is_empty() && why.is_none(), "missing: empty");
        for bad in [
            "not a cache\n",
            "distbuild digest cache 1\nzz 1 2 3 4 5 6 7 a.c\n",
            "distbuild digest cache 1\naaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa 1 2 3\n",
            "distbuild digest cache 1\naaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa -1 2 3 4 5 6 7 a.c\n",
        ] {
            fs::write(&path, bad).expect("write");
            let (cache, why) = DigestCache::load(&path);
            assert!(cache.known.is_empty(), "{bad:?}");
            let why = why.expect("a reason");
            assert!(why.ends_with("is malformed"), "{why}");
        }
        fs::File::create(&path)
            .and_then(|f| f.set_len(MAX_FILE_BYTES + 1))
            .expect("grow");
        let why = DigestCache::load(&path).1.expect("a reason");
        assert!(why.contains("is over"), "{why}");
    }

    #[test]
    fn only_settled_unmoved_files_are_remembered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.c");
        fs::write(&file, b"one").expect("write");
        let before = stamp_of(&file);
        assert!(DigestCache::may_remember(&before, &before, later()));
        // Changed within the window before hashing began: racy.
        assert!(!DigestCache::may_remember(
            &before,
            &before,
            SystemTime::now()
        ));
        fs::write(&file, b"two").expect("write");
        let after = stamp_of(&file);
        assert_ne!(before, after, "a write moves the stamp");
        assert!(!DigestCache::may_remember(&before, &after, later()));
    }

    #[test]
    fn saving_what_is_held_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.c");
        fs::write(&file, b"x").expect("write");
        let entries = vec![("a.c".to_string(), stamp_of(&file), Digest::of(b"x"))];
        let path = dir.path().join("digests");
        DigestCache::default().save(&path, &entries).expect("save");
        let (cache, _) = DigestCache::load(&path);
        fs::remove_file(&path).expect("remove");
        cache.save(&path, &entries).expect("save");
        assert!(!path.exists(), "the same entries are not written again");
        cache.save(&path, &entries[..0]).expect("save");
        let (emptied, why) = DigestCache::load(&path);
        assert!(
            why.is_none() && emptied.known.is_empty(),
            "fewer entries are"
        );
    }
}
