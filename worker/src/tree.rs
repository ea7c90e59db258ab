//! Removing a directory tree a job left behind, whatever its shape: any
//! depth (a loop, not recursion; one directory open at a time, so no file
//! descriptor per level; every step relative to that directory, so no path
//! grows past `PATH_MAX`), parts made read-only, symlinks (removed, never
//! followed).
//!
//! `std::fs::remove_dir_all` recurses with a descriptor open per level: a
//! job that nests a few thousand directories makes it fail (or, with the
//! worker's own recursive helpers, overflow the stack).

use std::ffi::{CStr, OsStr, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FchmodatFlags, Mode, fchmod, fchmodat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// Owner read, write and search: enough to list and empty a directory.
const OWNER_ALL: Mode = Mode::S_IRWXU;

fn errno(what: &str, error: Errno) -> io::Error {
    io::Error::other(format!("{what}: {error}"))
}

/// Opens the directory `name` in `parent` (the current directory when
/// `parent` is None) for listing, without following a symlink; a directory
/// the job made unreadable is made readable first.
fn open_dir(parent: Option<&OwnedFd>, name: &OsStr) -> Result<OwnedFd, Errno> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let open = || match parent {
        Some(parent) => openat(parent.as_fd(), name, flags, Mode::empty()),
        None => openat(nix::fcntl::AT_FDCWD, name, flags, Mode::empty()),
    };
    match open() {
        Err(Errno::EACCES) => {
            // Known to be a directory (not a symlink): following is safe.
            match parent {
                Some(parent) => fchmodat(
                    parent.as_fd(),
                    name,
                    OWNER_ALL,
                    FchmodatFlags::FollowSymlink,
                )?,
                None => fchmodat(
                    nix::fcntl::AT_FDCWD,
                    name,
                    OWNER_ALL,
                    FchmodatFlags::FollowSymlink,
                )?,
            }
            open()
        }
        other => other,
    }
}

/// Empties `dir` of everything but directories; returns the directories.
fn remove_files_in(dir: &OwnedFd) -> io::Result<Vec<OsString>> {
    // Unlinking needs write and search permission on the directory.
    let _ = fchmod(dir.as_fd(), OWNER_ALL);
    let listing = dir.try_clone()?;
    let mut listing = Dir::from_fd(listing).map_err(|e| errno("list a directory", e))?;
    let mut files = Vec::new();
    let mut subdirs = Vec::new();
    for entry in listing.iter() {
        let entry = entry.map_err(|e| errno("list a directory", e))?;
        let name: &CStr = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let name = OsStr::from_bytes(name.to_bytes()).to_owned();
        let is_dir = match entry.file_type() {
            Some(kind) => kind == Type::Directory,
            None => fstatat(dir.as_fd(), name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map(|stat| stat.st_mode & libc::S_IFMT == libc::S_IFDIR)
                .map_err(|e| errno("inspect an entry", e))?,
        };
        if is_dir {
            subdirs.push(name);
        } else {
            files.push(name);
        }
    }
    for name in files {
        match unlinkat(dir.as_fd(), name.as_os_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => {
                return Err(errno(&format!("remove {:?}", name.to_string_lossy()), e));
            }
        }
    }
    Ok(subdirs)
}

/// Removes `root` and everything under it (see the module documentation).
/// A missing `root` is not an error; a `root` that is a file or symlink is
/// removed as such.
pub fn remove_tree(root: &Path) -> io::Result<()> {
    let mut current = match open_dir(None, root.as_os_str()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::ENOTDIR | Errno::ELOOP) => return fs::remove_file(root),
        Err(e) => return Err(errno(&format!("open {}", root.display()), e)),
    };
    let context = |what: &str| format!("{what} under {}", root.display());
    // From the root down to the directory open now: each one's name in its
    // parent and the subdirectories of its parent still to remove.
    let mut path: Vec<(OsString, Vec<OsString>)> = Vec::new();
    let mut pending = remove_files_in(&current)?;
    loop {
        if let Some(name) = pending.pop() {
            let child = open_dir(Some(&current), &name)
                .map_err(|e| errno(&context("open a directory"), e))?;
            path.push((name, std::mem::take(&mut pending)));
            current = child;
            pending = remove_files_in(&current)?;
            continue;
        }
        // `current` is empty: step up and remove it.
        let Some((name, siblings)) = path.pop() else {
            break;
        };
        let parent = openat(
            current.as_fd(),
            "..",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| errno(&context("open a parent directory"), e))?;
        drop(current);
        unlinkat(parent.as_fd(), name.as_os_str(), UnlinkatFlags::RemoveDir)
            .map_err(|e| errno(&context("remove a directory"), e))?;
        current = parent;
        pending = siblings;
    }
    drop(current);
    match fs::remove_dir(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// `levels` nested directories under `dir`, made relative to each one
    /// (the full path is longer than `PATH_MAX`), with a file and a
    /// read-only directory at the bottom.
    fn nest(dir: &Path, levels: usize) {
        let mut current = fs::File::open(dir).expect("open");
        for _ in 0..levels {
            let fd: OwnedFd = current.into();
            nix::sys::stat::mkdirat(fd.as_fd(), "deep-directory-name", Mode::S_IRWXU)
                .expect("mkdir");
            let child = openat(
                fd.as_fd(),
                "deep-directory-name",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
            )
            .expect("open");
            current = child.into();
        }
        let fd: OwnedFd = current.into();
        let file = openat(
            fd.as_fd(),
            "file",
            OFlag::O_WRONLY | OFlag::O_CREAT,
            Mode::S_IRUSR,
        )
        .expect("create");
        drop(file);
        nix::sys::stat::mkdirat(fd.as_fd(), "locked", Mode::empty()).expect("mkdir");
        fchmod(fd.as_fd(), Mode::S_IRUSR | Mode::S_IXUSR).expect("chmod");
    }

    #[test]
    fn removes_a_tree_deeper_than_any_path_and_than_the_descriptor_limit() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let root = dir.path().join("sandbox");
        fs::create_dir(&root).expect("mkdir");
        nest(&root, 5_000);
        fs::write(root.join("top"), "x").expect("write");
        std::os::unix::fs::symlink("/etc", root.join("link")).expect("symlink");
        remove_tree(&root).expect("removed");
        assert!(!root.exists());
        assert!(Path::new("/etc").exists(), "a symlink is not followed");
    }

    #[test]
    fn removes_files_symlinks_read_only_parts_and_nothing_missing() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let root = dir.path().join("sandbox");
        fs::create_dir_all(root.join("a/b")).expect("mkdir");
        fs::write(root.join("a/b/f"), "x").expect("write");
        fs::set_permissions(root.join("a/b"), fs::Permissions::from_mode(0o500)).expect("chmod");
        fs::set_permissions(root.join("a"), fs::Permissions::from_mode(0o000)).expect("chmod");
        remove_tree(&root).expect("removed");
        assert!(!root.exists());
        remove_tree(&root).expect("a missing tree is no error");
        let file = dir.path().join("file");
        fs::write(&file, "x").expect("write");
        remove_tree(&file).expect("a file is removed");
        assert!(!file.exists());
    }
}
