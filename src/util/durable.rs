//! Directories whose names survive a power cut.
//!
//! A new directory entry (a file or directory created, renamed or removed) is
//! durable only once the directory holding it is fsync'd: a file can be
//! fdatasync'd and still be lost with its name. `create_dir_all` syncs nothing,
//! so a state directory it made could vanish, with everything below it, at the
//! next power cut (the power-loss tests in `tests/e2e_powerloss.rs` and
//! `tests/e2e_crash.rs` model exactly that).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// fsync the directory `dir`, so that entries created, renamed or removed in it
/// are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

/// fsync the directory holding `path`, so a new entry in it is durable.
pub fn sync_parent_dir(path: &Path) -> io::Result<()> {
    fsync_dir(path.parent().unwrap_or(Path::new("")))
}

/// Replace the file at `path` with `bytes` so that a power cut leaves either the
/// old file or the new one, whole: write `tmp` (same directory), fsync it,
/// rename it over `path`, fsync the directory.
pub fn replace_file(path: &Path, tmp: &Path, bytes: &[u8]) -> io::Result<()> {
    {
        let mut f = File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(tmp, path)?;
    sync_parent_dir(path)
}

/// Create `dir` and any missing parents, like `fs::create_dir_all`, and make
/// each directory it created durable by fsyncing the directory that holds it.
/// The directory holding `dir` is fsync'd even when `dir` already existed (a
/// run that died between creating it and that fsync, or an older version that
/// used `create_dir_all`, may have left its name unsynced); other existing
/// directories are left as they are.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(p) = at.filter(|p| !p.as_os_str().is_empty() && !p.is_dir()) {
        missing.push(p);
        at = p.parent();
    }
    let created_leaf = missing.first() == Some(&dir);
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {}
            // Made meanwhile by someone else: its maker syncs its name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => continue,
            Err(e) => return Err(e),
        }
        fsync_dir(d.parent().unwrap_or(Path::new("")))?;
    }
    if dir.is_dir() && !created_leaf {
        fsync_dir(dir.parent().unwrap_or(Path::new("")))?;
    }
    Ok(())
}

/// ENOSPC or EDQUOT: the file system (or the quota) is full. Writers that
/// can wait for space (the target's apply path, the spool's free files) look
/// for this.
pub fn no_space_errno(errno: i32) -> bool {
    errno == nix::libc::ENOSPC || errno == nix::libc::EDQUOT
}

/// [`no_space_errno`] for an I/O error, also when only its kind survived (a
/// copied error: ENOSPC is `StorageFull`, EDQUOT `QuotaExceeded`).
pub fn io_no_space(e: &std::io::Error) -> bool {
    e.raw_os_error().is_some_and(no_space_errno)
        || matches!(
            e.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_the_missing_chain_and_leaves_what_exists() {
        let t = tempfile::tempdir().unwrap();
        let deep = t.path().join("a/b/c");
        create_dir_durable(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_durable(&deep).unwrap();
        fs::write(t.path().join("a/file"), b"x").unwrap();
        let e = create_dir_durable(&t.path().join("a/file/d")).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::NotADirectory | io::ErrorKind::AlreadyExists
            ),
            "{e}"
        );
        fsync_dir(Path::new("")).unwrap();
    }

    #[test]
    fn replace_file_swaps_the_whole_content() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state");
        let tmp = t.path().join("state.tmp");
        replace_file(&p, &tmp, b"first, longer").unwrap();
        replace_file(&p, &tmp, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        assert!(!tmp.exists());
        let e = replace_file(
            &t.path().join("no/such"),
            &t.path().join("no/such.tmp"),
            b"x",
        );
        assert_eq!(e.unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
