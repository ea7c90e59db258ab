//! A slot's job directories, recycled: after a job its directory is
//! emptied — its top-level directories kept, empty and with their modes
//! restored; everything else removed — and moved to the slot's spare
//! (`<slot>/.spare`), and the slot's next job renames the spare to its
//! own directory. A job then costs no new directories (on ext4 here a
//! directory made and removed per job was a third of the worker's time:
//! the inode allocator walks past the recently deleted ones).
//!
//! The slot's directory holds nothing else between jobs: in a kept
//! sandbox (`sandbox::KeptPerSlot`) a job may write the whole slot
//! directory, so what it left beside its own directory is removed too.
//! Whatever cannot be cleaned is removed instead, and the caller removes
//! what cannot be removed.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use crate::tree::remove_tree;

/// The mode the job's directories are made with.
const DIR_MODE: u32 = 0o755;

/// The spare of the slot whose job directory is `root`.
pub fn spare_of(root: &Path) -> Option<PathBuf> {
    Some(root.parent()?.join(".spare"))
}

/// Makes `root` holding exactly the empty directories `subdirs`: from the
/// slot's spare when there is one, else new.
pub fn make(root: &Path, subdirs: &[&str]) -> io::Result<()> {
    if fs::symlink_metadata(root).is_ok() {
        remove_tree(root)?;
    }
    let reused = spare_of(root).is_some_and(|spare| fs::rename(spare, root).is_ok());
    if !reused {
        fs::create_dir_all(root)?;
        for name in subdirs {
            fs::create_dir(root.join(name))?;
        }
        return Ok(());
    }
    // The spare's directories are empty; any but `subdirs` go.
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let wanted = entry
            .file_name()
            .to_str()
            .is_some_and(|name| subdirs.contains(&name));
        if !wanted {
            remove_tree(&entry.path())?;
        }
    }
    for name in subdirs {
        match fs::create_dir(root.join(name)) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            other => other?,
        }
    }
    Ok(())
}

/// Empties the job directory `root` into its slot's spare and removes
/// everything else in the slot's directory. Each regular file at the top
/// of `root` or of its directories is offered to `take` first (the
/// cache's attic: see `Cache::donate`), and removed if not taken. An error
/// leaves `root` for the caller to remove.
pub fn recycle(root: &Path, take: &mut dyn FnMut(&Path) -> bool) -> io::Result<()> {
    let (Some(slot), Some(spare)) = (root.parent(), spare_of(root)) else {
        return remove_tree(root);
    };
    let emptied = empty_into(root, &spare, take);
    // Whatever the job did to its own directory (moved it away, left a
    // symlink in its place), nothing but the spare stays in the slot's.
    for entry in fs::read_dir(slot)? {
        let path = entry?.path();
        if path != spare {
            remove_tree(&path)?;
        }
    }
    emptied
}

/// Empties the job directory `root` and renames it to `spare`; one that is
/// no longer a directory is removed.
fn empty_into(root: &Path, spare: &Path, take: &mut dyn FnMut(&Path) -> bool) -> io::Result<()> {
    let root_meta = fs::symlink_metadata(root)?;
    if !root_meta.is_dir() {
        return remove_tree(root);
    }
    restore_mode(root, &root_meta)?;
    for entry in fs::read_dir(root)? {
        let path = entry?.path();
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                restore_mode(&path, &meta)?;
                empty(&path, take)?;
            }
            Ok(meta) if meta.is_file() && take(&path) => {}
            _ => remove_tree(&path)?,
        }
    }
    if fs::symlink_metadata(spare).is_ok() {
        remove_tree(spare)?;
    }
    fs::rename(root, spare)
}

/// Gives a directory the job made unreadable or unwritable its mode back.
fn restore_mode(dir: &Path, meta: &fs::Metadata) -> io::Result<()> {
    if meta.permissions().mode() & 0o7777 != DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// Removes everything in `dir`, regular files `take` takes aside.
fn empty(dir: &Path, take: &mut dyn FnMut(&Path) -> bool) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_file()) && take(&path) {
            continue;
        }
        remove_tree(&path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_recycled_directory_comes_back_empty_with_only_what_is_asked() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let slot = dir.path().join("slot-0");
        let first = slot.join("1");
        make(&first, &["src", "out", "tmp"]).expect("make");
        assert_eq!(listing(&first), ["out", "src", "tmp"]);
        // What a job may leave: files, deep trees, a directory it locked,
        // a symlink where a directory was, things beside its directory.
        fs::create_dir_all(first.join("tmp/a/b/c")).expect("mkdir");
        fs::write(first.join("tmp/a/b/c/deep"), b"x").expect("write");
        fs::set_permissions(first.join("src"), fs::Permissions::from_mode(0o000)).expect("chmod");
        fs::write(first.join("stray"), b"x").expect("write");
        fs::remove_dir(first.join("out")).expect("rmdir");
        std::os::unix::fs::symlink("/etc", first.join("out")).expect("symlink");
        fs::write(slot.join("beside"), b"x").expect("write");
        let mut taken = Vec::new();
        let aside = dir.path().join("aside");
        recycle(&first, &mut |path| {
            taken.push(path.to_path_buf());
            path.ends_with("stray") && fs::rename(path, &aside).is_ok()
        })
        .expect("recycle");
        assert!(aside.exists());
        // Offered: the files at the top of the directory and of its
        // directories, not deeper; removed when not taken.
        taken.sort();
        assert_eq!(taken, [first.join("stray")]);
        assert_eq!(listing(&slot), [".spare"]);
        assert_eq!(listing(&slot.join(".spare")), ["src", "tmp"]);
        let src = fs::symlink_metadata(slot.join(".spare/src")).expect("stat");
        assert_eq!(src.permissions().mode() & 0o7777, DIR_MODE);
        assert!(listing(&slot.join(".spare/tmp")).is_empty());

        let second = slot.join("2");
        make(&second, &["src", "out", "deps"]).expect("make again");
        assert_eq!(listing(&slot), ["2"]);
        assert_eq!(listing(&second), ["deps", "out", "src"]);
        for name in ["deps", "out", "src"] {
            let meta = fs::symlink_metadata(second.join(name)).expect("stat");
            assert!(meta.is_dir(), "{name}");
            assert_eq!(meta.permissions().mode() & 0o7777, DIR_MODE, "{name}");
            assert!(listing(&second.join(name)).is_empty(), "{name}");
        }
        // /etc is untouched: the symlink was removed, never followed.
        assert!(Path::new("/etc/passwd").exists());
    }

    #[test]
    fn a_job_that_moved_its_directory_away_leaves_nothing_in_the_slot() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let slot = dir.path().join("slot-1");
        let root = slot.join("5");
        make(&root, &["out"]).expect("make");
        fs::write(root.join("out/secret"), b"x").expect("write");
        fs::rename(&root, slot.join("hidden")).expect("move away");
        std::os::unix::fs::symlink("/etc", &root).expect("symlink");
        recycle(&root, &mut |_| false).expect("recycle");
        assert!(listing(&slot).is_empty(), "{:?}", listing(&slot));
        assert!(Path::new("/etc/passwd").exists());
    }

    #[test]
    fn without_a_spare_a_directory_is_made_afresh() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let root = dir.path().join("slot-3/9");
        fs::create_dir_all(root.join("old")).expect("mkdir");
        make(&root, &["out"]).expect("make");
        assert_eq!(listing(&root), ["out"]);
    }
}
