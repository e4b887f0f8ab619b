//! Freezing and thawing a mounted file system with the FIFREEZE and FITHAW
//! ioctls (what util-linux's `fsfreeze -f` / `-u` do), for application-
//! consistent tags. A frozen file system blocks every writer until it is
//! thawed, so [`Frozen`] thaws on drop as a last resort; callers thaw
//! explicitly to see the result. The kernel does not thaw when the process
//! dies: a process killed with SIGKILL while holding a freeze leaves the file
//! system frozen until `fsfreeze -u MOUNTPOINT`.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `_IOWR('X', 119, int)`: freeze the file system the descriptor is on.
const FIFREEZE: u32 = 0xC004_5877;
/// `_IOWR('X', 120, int)`: thaw it.
const FITHAW: u32 = 0xC004_5878;

/// One ioctl without an argument pointer on the directory `dir`.
fn fs_ioctl(dir: &File, request: u32) -> io::Result<()> {
    // SAFETY: `dir` is an open descriptor owned by a live `File` for the whole
    // call; FIFREEZE and FITHAW take no pointer (the kernel ignores the
    // argument), so passing 0 gives the kernel nothing to read or write in
    // this process's memory.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), request as _, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A file system this process froze; thawed by [`Frozen::thaw`] or on drop.
#[derive(Debug)]
pub struct Frozen {
    path: PathBuf,
    dir: Option<File>,
}

/// Freeze the file system mounted at `mountpoint` (flushes it, then blocks
/// its writers). Needs CAP_SYS_ADMIN. EBUSY means it is frozen already
/// (by someone else); EOPNOTSUPP that the file system cannot freeze.
pub fn freeze(mountpoint: &Path) -> io::Result<Frozen> {
    let dir = File::open(mountpoint)?;
    if !dir.metadata()?.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a directory (give the mount point)",
        ));
    }
    fs_ioctl(&dir, FIFREEZE)?;
    Ok(Frozen {
        path: mountpoint.to_path_buf(),
        dir: Some(dir),
    })
}

impl Frozen {
    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Thaw now.
    pub fn thaw(mut self) -> io::Result<()> {
        match self.dir.take() {
            Some(d) => fs_ioctl(&d, FITHAW),
            None => Ok(()),
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Some(d) = self.dir.take()
            && let Err(e) = fs_ioctl(&d, FITHAW)
        {
            tracing::error!(mountpoint = %self.path.display(), "cannot thaw: {e}; run `fsfreeze -u {}`", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernel_encoding() {
        // _IOC(dir = read|write (3), type 'X', nr, size = 4)
        let ioc = |nr: u32| (3u32 << 30) | (4 << 16) | (u32::from(b'X') << 8) | nr;
        assert_eq!(FIFREEZE, ioc(119));
        assert_eq!(FITHAW, ioc(120));
    }

    #[test]
    fn a_file_or_missing_path_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        assert!(freeze(&f).is_err());
        assert!(freeze(&d.path().join("missing")).is_err());
    }
}
