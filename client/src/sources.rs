//! The graph's source files on disk: checked, then hashed by streaming (a
//! file of any size costs one buffer), several groups of files at a time;
//! a file whose stat the workspace's digest cache remembers is not read
//! (see `digests`).

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use distbuild_proto::Digest;
use distbuild_proto::graph::BuildGraph;
use futures::{StreamExt, TryStreamExt};
use sha1::{Digest as _, Sha1};

use crate::digests::{DigestCache, Learned, Stamp};

/// Bytes read per step while hashing a file.
pub const HASH_BUFFER_BYTES: usize = 256 << 10;

/// Groups of files hashed at the same time (each on a blocking thread).
pub const MAX_CONCURRENT_HASHES: usize = 4;

/// Most files one blocking task hashes, one after another with one
/// buffer: a hop to a blocking thread per file, and a buffer each, cost
/// more than hashing a small source file.
pub const FILES_PER_HASH_TASK: usize = 64;

/// Why a listed source file cannot be used. Each message is one line naming
/// the file.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Nothing at the path (or a dangling symlink).
    #[error("source file {path:?} (ID {id}): not found in source directory {dir}")]
    Missing {
        /// The file ID.
        id: String,
        /// The path the graph gives.
        path: String,
        /// The source directory.
        dir: String,
    },
    /// A directory, device, socket...
    #[error("source file {path:?} (ID {id}): not a regular file")]
    NotRegular {
        /// The file ID.
        id: String,
        /// The path the graph gives.
        path: String,
    },
    /// It could not be read.
    #[error("source file {path:?} (ID {id}): {source}")]
    Io {
        /// The file ID.
        id: String,
        /// The path the graph gives.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Hashing stopped on a bug (a panic), not on a file.
    #[error(transparent)]
    Panicked(#[from] distbuild_proto::blocking::Panicked),
}

/// A checked, hashed source file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The file ID the graph gives it.
    pub id: String,
    /// Its path relative to the source directory, as the graph writes it.
    pub path: String,
    /// Where it is on this machine.
    pub local_path: PathBuf,
    /// SHA-1 of its content.
    pub digest: Digest,
    /// Its length in bytes.
    pub size: u64,
}

/// SHA-1 and length of everything `reader` yields, read in bounded steps.
pub fn hash_reader(reader: impl Read) -> io::Result<(Digest, u64)> {
    hash_with(reader, &mut vec![0u8; HASH_BUFFER_BYTES])
}

/// [`hash_reader`] with `buffer` to read into.
fn hash_with(mut reader: impl Read, buffer: &mut [u8]) -> io::Result<(Digest, u64)> {
    let mut sha1 = Sha1::new();
    let mut total = 0u64;
    loop {
        let n = match reader.read(buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        sha1.update(&buffer[..n]);
        total += n as u64;
    }
    Ok((Digest::from_bytes(sha1.finalize().into()), total))
}

/// SHA-1 and length of the file at `path`.
pub fn hash_file(path: &Path) -> io::Result<(Digest, u64)> {
    hash_reader(File::open(path)?)
}

/// A source file found to be a regular file, not yet hashed.
#[derive(Debug)]
pub struct Checked {
    /// The file ID the graph gives it.
    pub id: String,
    /// Its path as the graph writes it.
    pub path: String,
    /// Where it is on this machine.
    pub local_path: PathBuf,
    /// Its stat when checked.
    pub stamp: Stamp,
}

/// Checks that every source file the graph lists is a regular file under
/// `source_dir` (symlinks are followed), in the graph's order; returns them
/// unhashed. A graph without source files never looks at `source_dir`.
pub fn check_sources(graph: &BuildGraph, source_dir: &Path) -> Result<Vec<Checked>, SourceError> {
    let mut out = Vec::with_capacity(graph.source_files.len());
    for (id, path) in &graph.source_files {
        let local_path = source_dir.join(path);
        let stamp = match std::fs::metadata(&local_path) {
            Ok(meta) if meta.is_file() => Stamp::of(&meta),
            Ok(_) => {
                return Err(SourceError::NotRegular {
                    id: id.clone(),
                    path: path.clone(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SourceError::Missing {
                    id: id.clone(),
                    path: path.clone(),
                    dir: source_dir.display().to_string(),
                });
            }
            Err(source) => {
                return Err(SourceError::Io {
                    id: id.clone(),
                    path: path.clone(),
                    source,
                });
            }
        };
        out.push(Checked {
            id: id.clone(),
            path: path.clone(),
            local_path,
            stamp,
        });
    }
    Ok(out)
}

/// Checks and hashes every source file the graph lists (see
/// [`check_sources`]); the result is in the graph's order.
pub async fn hash_sources(
    graph: &BuildGraph,
    source_dir: &Path,
) -> Result<Vec<Source>, SourceError> {
    Ok(hash_sources_with(graph, source_dir, None).await?.sources)
}

/// The graph's sources hashed, and what the digest cache should remember.
#[derive(Debug)]
pub struct Hashed {
    /// Every source, in the graph's order.
    pub sources: Vec<Source>,
    /// The digests to remember for the next build (see `digests`).
    pub learned: Vec<Learned>,
    /// How many files were read and hashed (the rest the cache answered).
    pub read: usize,
}

/// [`hash_sources`], taking each digest `cache` remembers for the file's
/// current stat instead of reading the file.
pub async fn hash_sources_with(
    graph: &BuildGraph,
    source_dir: &Path,
    cache: Option<Arc<DigestCache>>,
) -> Result<Hashed, SourceError> {
    // Before any stat: a file changed after this is never remembered.
    let began = SystemTime::now();
    let checked = check_sources(graph, source_dir)?;
    // Spread over the concurrent tasks while there are few files.
    let per_task = checked
        .len()
        .div_ceil(MAX_CONCURRENT_HASHES)
        .clamp(1, FILES_PER_HASH_TASK);
    let mut groups = Vec::with_capacity(checked.len().div_ceil(per_task));
    let mut files = checked.into_iter().peekable();
    while files.peek().is_some() {
        groups.push(files.by_ref().take(per_task).collect::<Vec<_>>());
    }
    let hashed: Vec<Vec<(Source, Option<Learned>, bool)>> = futures::stream::iter(groups)
        .map(|group| {
            let cache = cache.clone();
            distbuild_proto::blocking::run(move || hash_group(group, cache.as_deref(), began))
        })
        .buffered(MAX_CONCURRENT_HASHES)
        .try_collect()
        .await?;
    let mut out = Hashed {
        sources: Vec::new(),
        learned: Vec::new(),
        read: 0,
    };
    for (source, learned, read) in hashed.into_iter().flatten() {
        out.sources.push(source);
        out.learned.extend(learned);
        out.read += usize::from(read);
    }
    Ok(out)
}

/// Hashes each of `files`, in order, with one buffer; or takes its digest
/// from `cache`. Each comes back with the entry to remember, if any, and
/// whether it was read.
fn hash_group(
    files: Vec<Checked>,
    cache: Option<&DigestCache>,
    began: SystemTime,
) -> Result<Vec<(Source, Option<Learned>, bool)>, SourceError> {
    let mut buffer = vec![0u8; HASH_BUFFER_BYTES];
    files
        .into_iter()
        .map(|file| {
            let Checked {
                id,
                path,
                local_path,
                stamp,
            } = file;
            if let Some(digest) = cache.and_then(|c| c.lookup(&path, &stamp)) {
                let learned = (path.clone(), stamp, digest);
                let source = Source {
                    id,
                    path,
                    local_path,
                    digest,
                    size: stamp.size(),
                };
                return Ok((source, Some(learned), false));
            }
            let hashed = File::open(&local_path).and_then(|mut file| {
                let (digest, size) = hash_with(&mut file, &mut buffer)?;
                Ok((digest, size, Stamp::of(&file.metadata()?)))
            });
            match hashed {
                Ok((digest, size, after)) => {
                    let learned = DigestCache::may_remember(&stamp, &after, began)
                        .then(|| (path.clone(), stamp, digest));
                    let source = Source {
                        id,
                        path,
                        local_path,
                        digest,
                        size,
                    };
                    Ok((source, learned, true))
                }
                Err(source) => Err(SourceError::Io { id, path, source }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn graph(files: &[(&str, &str)]) -> BuildGraph {
        let entries: Vec<String> = files
            .iter()
            .map(|(id, path)| format!("{id:?}: {path:?}"))
            .collect();
        BuildGraph::from_json(format!(r#"{{"SourceFiles": {{{}}}}}"#, entries.join(",")).as_bytes())
            .expect("valid graph")
    }

    #[test]
    fn streaming_hash_equals_digest_of() {
        // Several buffers and a partial one.
        let data: Vec<u8> = (0..(HASH_BUFFER_BYTES * 2 + 123))
            .map(|i| (i % 251) as u8)
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("f"), &data).expect("write");
        let (digest, size) = hash_file(&dir.path().join("f")).expect("hash");
        assert_eq!(digest, Digest::of(&data));
        assert_eq!(size, data.len() as u64);
        assert_eq!(hash_reader(&b""[..]).expect("empty"), (Digest::of(b""), 0));
    }

    #[tokio::test]
    async fn sources_are_hashed_in_graph_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("src")).expect("mkdir");
        fs::write(dir.path().join("src/a.c"), b"int a;").expect("write");
        fs::write(dir.path().join("b.h"), b"").expect("write");
        let g = graph(&[(B, "b.h"), (A, "src/a.c")]);
        let sources = hash_sources(&g, dir.path()).await.expect("hashed");
        let got: Vec<(&str, &str, Digest, u64)> = sources
            .iter()
            .map(|s| (s.id.as_str(), s.path.as_str(), s.digest, s.size))
            .collect();
        assert_eq!(
            got,
            vec![
                (A, "src/a.c", Digest::of(b"int a;"), 6),
                (B, "b.h", Digest::of(b""), 0),
            ]
        );
    }

    /// Many files are hashed in groups, several groups at a time; the
    /// result keeps the graph's order and each file's own digest.
    #[tokio::test]
    async fn many_sources_are_hashed_in_groups_in_graph_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let count = FILES_PER_HASH_TASK * MAX_CONCURRENT_HASHES * 2 + 3;
        let ids: Vec<String> = (0..count).map(|i| format!("{i:040x}")).collect();
        let mut files = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let content = format!("int f{i};\n").repeat(i % 5);
            fs::write(dir.path().join(format!("f{i}.c")), &content).expect("write");
            files.push((id.clone(), format!("f{i}.c"), content));
        }
        let listed: Vec<(&str, &str)> = files
            .iter()
            .map(|(id, path, _)| (id.as_str(), path.as_str()))
            .collect();
        let sources = hash_sources(&graph(&listed), dir.path())
            .await
            .expect("hashed");
        let got: Vec<(String, String, Digest, u64)> = sources
            .into_iter()
            .map(|s| (s.id, s.path, s.digest, s.size))
            .collect();
        let expected: Vec<(String, String, Digest, u64)> = files
            .into_iter()
            .map(|(id, path, content)| {
                let size = content.len() as u64;
                (id, path, Digest::of(content.as_bytes()), size)
            })
            .collect();
        assert_eq!(got, expected);
    }

    /// Each broken source directory and a fragment its one-line error must
    /// contain.
    #[tokio::test]
    async fn missing_and_odd_files_are_bad_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("adir")).expect("mkdir");
        fs::write(dir.path().join("present"), b"x").expect("write");
        std::os::unix::fs::symlink("nowhere", dir.path().join("dangling")).expect("symlink");
        let cases: &[(&str, &str)] = &[
            ("missing.c", "source file \"missing.c\" (ID aaaa"),
            ("sub/missing.c", "not found in source directory"),
            (
                "adir",
                "\"adir\" (ID aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa): not a regular file",
            ),
            ("dangling", "not found"),
            (
                "present/under-a-file",
                "source file \"present/under-a-file\"",
            ),
        ];
        for (path, expected) in cases {
            let err = hash_sources(&graph(&[(A, path)]), dir.path())
                .await
                .expect_err(path)
                .to_string();
            assert!(err.contains(expected), "{path}: got {err:?}");
            assert!(!err.contains('\n'), "{err}");
        }
        // A symlink to a regular file is followed.
        std::os::unix::fs::symlink("present", dir.path().join("link")).expect("symlink");
        let sources = hash_sources(&graph(&[(A, "link")]), dir.path())
            .await
            .expect("followed");
        assert_eq!(sources[0].digest, Digest::of(b"x"));
    }

    /// A file whose stat the cache remembers is not read: its digest is
    /// the remembered one (here deliberately not its content's, to see
    /// that). One whose stat moved is read, and its new digest learned.
    #[tokio::test]
    async fn the_digest_cache_answers_for_files_whose_stat_is_unchanged() {
        use crate::digests::Stamp;
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("a.c"), b"int a;").expect("write");
        fs::write(dir.path().join("b.c"), b"int b;").expect("write");
        let stamp = |name: &str| Stamp::of(&fs::metadata(dir.path().join(name)).expect("stat"));
        let remembered = Digest::of(b"what the cache says");
        let cache_file = dir.path().join("digests");
        let entries = vec![
            ("a.c".to_string(), stamp("a.c"), remembered),
            ("b.c".to_string(), stamp("b.c"), remembered),
        ];
        DigestCache::default()
            .save(&cache_file, &entries)
            .expect("save");
        // b.c changes (same size): its change time moves.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(dir.path().join("b.c"), b"int c;").expect("write");
        let (cache, _) = DigestCache::load(&cache_file);
        let g = graph(&[(A, "a.c"), (B, "b.c")]);
        let hashed = hash_sources_with(&g, dir.path(), Some(Arc::new(cache)))
            .await
            .expect("hashed");
        let got: Vec<(&str, Digest, u64)> = hashed
            .sources
            .iter()
            .map(|s| (s.path.as_str(), s.digest, s.size))
            .collect();
        assert_eq!(
            got,
            vec![("a.c", remembered, 6), ("b.c", Digest::of(b"int c;"), 6)]
        );
        assert_eq!(hashed.read, 1, "only b.c is read");
        // a.c stays remembered; b.c was changed just now (racy), so it is
        // not remembered until it has settled.
        let learned: Vec<&str> = hashed.learned.iter().map(|(p, _, _)| p.as_str()).collect();
        assert_eq!(learned, ["a.c"]);
    }

    #[tokio::test]
    async fn no_source_files_need_no_source_dir() {
        let g = graph(&[]);
        let sources = hash_sources(&g, Path::new("/nonexistent/source/dir"))
            .await
            .expect("no files, no checks");
        assert!(sources.is_empty());
    }
}
