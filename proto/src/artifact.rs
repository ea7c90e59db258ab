//! Artifacts: a job's output directory as one deterministic tar stream.
//!
//! Packing walks the directory in sorted order with zeroed owners and times,
//! so the same outputs always give the same bytes and the same digest.
//! Unpacking trusts nothing: every entry must be a plain file, directory or
//! symlink at a relative path that stays inside the destination, no entry may
//! pass through a symlink, a symlink may only point inside the artifact, and
//! the total size is bounded. Packing applies the same rules to what a job
//! left behind, so a job cannot publish an artifact that peers would refuse.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::Digest;
use crate::graph::check_relative_path;
use sha1::{Digest as _, Sha1};

/// Why an artifact was refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact entry {path:?}: {problem}")]
    BadEntry { path: String, problem: String },
    #[error("artifact exceeds {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ArtifactError {
    let context = context.into();
    move |source| ArtifactError::Io { context, source }
}

fn bad(path: impl Into<String>, problem: impl Into<String>) -> ArtifactError {
    ArtifactError::BadEntry {
        path: path.into(),
        problem: problem.into(),
    }
}

/// Checks that symlink `target`, placed at `link` (relative to the artifact
/// root), names something inside the root. Lexical: the artifact's own
/// symlinks are checked the same way, so no chain of them leaves the root.
fn check_symlink_target(link: &str, target: &Path) -> Result<(), ArtifactError> {
    let mut depth: Vec<&std::ffi::OsStr> = Path::new(link)
        .parent()
        .map(|p| {
            p.components()
                .filter_map(|c| match c {
                    Component::Normal(n) => Some(n),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    for component in target.components() {
        match component {
            Component::Normal(n) => depth.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    return Err(bad(
                        link,
                        format!(
                            "symlink to {} points outside the artifact",
                            target.display()
                        ),
                    ));
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(bad(
                    link,
                    format!("symlink to absolute path {}", target.display()),
                ));
            }
        }
    }
    Ok(())
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    sha1: Sha1,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha1.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Deepest nesting of directories an artifact may hold. Packing walks the
/// tree recursively, one level per directory: the bound keeps that within
/// any thread's stack, and real build outputs nest a few dozen levels.
pub const MAX_ARTIFACT_DEPTH: usize = 256;

/// Packs directory `dir` into `out`; returns the digest and size of the
/// bytes written. A tree nested deeper than [`MAX_ARTIFACT_DEPTH`] is
/// refused.
pub fn pack(dir: &Path, out: impl Write) -> Result<(Digest, u64), ArtifactError> {
    let mut builder = tar::Builder::new(Hashing {
        inner: out,
        sha1: Sha1::new(),
        bytes: 0,
    });
    builder.follow_symlinks(false);
    pack_dir(&mut builder, dir, "", 0)?;
    let hashing = builder
        .into_inner()
        .map_err(io_err("finish the artifact"))?;
    Ok((
        Digest::from_bytes(hashing.sha1.finalize().into()),
        hashing.bytes,
    ))
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn pack_dir<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: &Path,
    prefix: &str,
    depth: usize,
) -> Result<(), ArtifactError> {
    if depth > MAX_ARTIFACT_DEPTH {
        return Err(bad(
            crate::text::shortened(prefix, 200),
            format!("directories nest deeper than {MAX_ARTIFACT_DEPTH} levels"),
        ));
    }
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(io_err(format!("list {}", dir.display())))?
        .collect::<Result<_, _>>()
        .map_err(io_err(format!("list {}", dir.display())))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let name = name.to_str().ok_or_else(|| {
            bad(
                format!("{prefix}{}", name.to_string_lossy()),
                "name is not UTF-8",
            )
        })?;
        let rel = format!("{prefix}{name}");
        let path = entry.path();
        let meta =
            fs::symlink_metadata(&path).map_err(io_err(format!("stat {}", path.display())))?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            let target =
                fs::read_link(&path).map_err(io_err(format!("read link {}", path.display())))?;
            check_symlink_target(&rel, &target)?;
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            builder
                .append_link(&mut h, &rel, &target)
                .map_err(io_err(format!("pack {rel}")))?;
        } else if kind.is_dir() {
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            builder
                .append_data(&mut h, format!("{rel}/"), io::empty())
                .map_err(io_err(format!("pack {rel}")))?;
            pack_dir(builder, &path, &format!("{rel}/"), depth + 1)?;
        } else if kind.is_file() {
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            let mut h = header(tar::EntryType::Regular, mode, meta.len());
            let file = File::open(&path).map_err(io_err(format!("open {}", path.display())))?;
            builder
                .append_data(&mut h, &rel, file.take(meta.len()))
                .map_err(io_err(format!("pack {rel}")))?;
        } else {
            return Err(bad(rel, "is not a file, directory or symlink"));
        }
    }
    Ok(())
}

/// Unpacks an artifact from `input` into `dest` (an empty or missing
/// directory), refusing anything unsafe and more than `max_bytes` of file
/// content. On error, `dest` may hold part of the artifact: callers unpack
/// into a scratch directory and discard it.
pub fn unpack(input: impl Read, dest: &Path, max_bytes: u64) -> Result<(), ArtifactError> {
    fs::create_dir_all(dest).map_err(io_err(format!("create {}", dest.display())))?;
    let mut archive = tar::Archive::new(input);
    let mut seen: HashSet<String> = HashSet::new();
    let mut symlinks: HashSet<PathBuf> = HashSet::new();
    let mut total = 0u64;
    for entry in archive.entries().map_err(io_err("read the artifact"))? {
        let mut entry = entry.map_err(io_err("read the artifact"))?;
        let raw_path = entry.path_bytes();
        let rel = std::str::from_utf8(&raw_path)
            .map_err(|_| bad(String::from_utf8_lossy(&raw_path), "name is not UTF-8"))?
            .trim_end_matches('/')
            .to_string();
        check_relative_path(&rel).map_err(|problem| bad(&rel, problem))?;
        let rel_path = PathBuf::from(&rel);
        if rel_path.ancestors().skip(1).any(|a| symlinks.contains(a)) {
            return Err(bad(&rel, "lies under a symlink"));
        }
        if !seen.insert(rel.clone()) {
            return Err(bad(&rel, "appears twice"));
        }
        let target = dest.join(&rel_path);
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Directory => {
                fs::create_dir_all(&target).map_err(io_err(format!("create {rel}")))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry
                    .header()
                    .size()
                    .map_err(io_err(format!("size of {rel}")))?;
                total = total.saturating_add(size);
                if total > max_bytes {
                    return Err(ArtifactError::TooLarge { limit: max_bytes });
                }
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent)
                        .map_err(io_err(format!("create parent of {rel}")))?;
                }
                let mode = entry
                    .header()
                    .mode()
                    .map_err(io_err(format!("mode of {rel}")))?;
                let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&target)
                    .map_err(io_err(format!("create {rel}")))?;
                let copied = io::copy(&mut (&mut entry).take(size), &mut file)
                    .map_err(io_err(format!("write {rel}")))?;
                if copied != size {
                    return Err(bad(&rel, "truncated"));
                }
                // The umask may have narrowed the mode; the artifact's wins.
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io_err(format!("chmod {rel}")))?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(io_err(format!("link of {rel}")))?
                    .ok_or_else(|| bad(&rel, "symlink without a target"))?;
                check_symlink_target(&rel, &link)?;
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent)
                        .map_err(io_err(format!("create parent of {rel}")))?;
                }
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(io_err(format!("symlink {rel}")))?;
                symlinks.insert(rel_path);
            }
            other => return Err(bad(&rel, format!("unsupported entry type {other:?}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) {
        fs::create_dir_all(dir.join("sub/deeper")).expect("mkdir");
        fs::write(dir.join("a.txt"), b"hello").expect("write");
        fs::write(dir.join("sub/deeper/tool"), b"#!/bin/sh\n").expect("write");
        fs::set_permissions(
            dir.join("sub/deeper/tool"),
            fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("../a.txt", dir.join("sub/link")).expect("symlink");
    }

    #[test]
    fn round_trip_keeps_contents_modes_and_links_and_is_deterministic() {
        let src = tempfile::TempDir::new().expect("tempdir");
        sample(src.path());
        let mut bytes = Vec::new();
        let (digest, size) = pack(src.path(), &mut bytes).expect("pack");
        assert_eq!(size, bytes.len() as u64);
        assert_eq!(digest, Digest::of(&bytes));

        let again = tempfile::TempDir::new().expect("tempdir");
        sample(again.path());
        let mut bytes2 = Vec::new();
        assert_eq!(
            pack(again.path(), &mut bytes2).expect("pack").0,
            digest,
            "same tree, same digest"
        );

        let dest = tempfile::TempDir::new().expect("tempdir");
        unpack(&bytes[..], dest.path(), 1 << 20).expect("unpack");
        assert_eq!(fs::read(dest.path().join("a.txt")).expect("read"), b"hello");
        let mode = fs::metadata(dest.path().join("sub/deeper/tool"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        let mode = fs::metadata(dest.path().join("a.txt"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        assert_eq!(
            fs::read_link(dest.path().join("sub/link")).expect("link"),
            Path::new("../a.txt")
        );
        assert_eq!(
            fs::read(dest.path().join("sub/link")).expect("through link"),
            b"hello"
        );
    }

    /// Builds a tar by hand, entry by entry, bypassing the tar crate's own
    /// path checks so hostile archives can be made.
    fn hostile(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_old();
            {
                let raw = h.as_old_mut();
                raw.name[..path.len()].copy_from_slice(path.as_bytes());
                if *kind == tar::EntryType::Symlink {
                    raw.linkname[..data.len()].copy_from_slice(data.as_bytes());
                }
            }
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            let size = if *kind == tar::EntryType::Regular {
                data.len()
            } else {
                0
            };
            h.set_size(size as u64);
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            if size > 0 {
                out.extend_from_slice(data.as_bytes());
                out.resize(out.len().div_ceil(512) * 512, 0);
            }
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    /// A tar entry to write: path, type, content or link target.
    type Entry<'a> = (&'a str, tar::EntryType, &'a str);

    #[test]
    fn hostile_artifacts_are_refused() {
        use tar::EntryType::{Link, Regular, Symlink};
        let cases: &[(&[Entry], &str)] = &[
            (&[("../evil", Regular, "x")], "climbs out"),
            (&[("a/../../evil", Regular, "x")], "climbs out"),
            (&[("/etc/evil", Regular, "x")], "absolute"),
            (&[("link", Symlink, "/etc")], "absolute path"),
            (&[("link", Symlink, "../outside")], "points outside"),
            (&[("d/link", Symlink, "../../outside")], "points outside"),
            (
                &[("link", Symlink, "sub"), ("link/evil", Regular, "x")],
                "under a symlink",
            ),
            (&[("hard", Link, "a")], "unsupported entry type"),
            (&[("a", Regular, "x"), ("a", Regular, "y")], "appears twice"),
        ];
        for (entries, expected) in cases {
            let dest = tempfile::TempDir::new().expect("tempdir");
            let err = unpack(&hostile(entries)[..], &dest.path().join("out"), 1 << 20)
                .expect_err(&format!("{entries:?} must be refused"))
                .to_string();
            assert!(
                err.contains(expected),
                "{entries:?}: got {err:?}, want {expected:?}"
            );
            assert!(
                !dest.path().join("evil").exists()
                    && !dest.path().parent().expect("parent").join("evil").exists()
            );
        }
    }

    #[test]
    fn size_limit_is_enforced() {
        let tar = hostile(&[("big", tar::EntryType::Regular, "0123456789")]);
        let dest = tempfile::TempDir::new().expect("tempdir");
        assert!(matches!(
            unpack(&tar[..], dest.path(), 9),
            Err(ArtifactError::TooLarge { limit: 9 })
        ));
        let dest = tempfile::TempDir::new().expect("tempdir");
        unpack(&tar[..], dest.path(), 10).expect("exactly at the limit");
    }

    #[test]
    fn packing_refuses_a_tree_nested_deeper_than_the_bound() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let mut deep = dir.path().to_path_buf();
        for _ in 0..MAX_ARTIFACT_DEPTH {
            deep.push("d");
        }
        fs::create_dir_all(&deep).expect("mkdir");
        pack(dir.path(), io::sink()).expect("exactly at the bound");
        fs::create_dir(deep.join("d")).expect("mkdir");
        let err = pack(dir.path(), io::sink()).expect_err("one level more");
        assert!(err.to_string().contains("nest deeper than 256"), "{err}");
        assert!(err.to_string().len() < 400, "{err}");
    }

    #[test]
    fn packing_refuses_a_symlink_out_of_the_output_dir() {
        let src = tempfile::TempDir::new().expect("tempdir");
        std::os::unix::fs::symlink("/usr/bin/cc", src.path().join("cc")).expect("symlink");
        let err = pack(src.path(), io::sink())
            .expect_err("must refuse")
            .to_string();
        assert!(err.contains("absolute path"), "{err}");
    }
}
