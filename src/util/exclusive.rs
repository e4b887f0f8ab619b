//! Exclusive use of a disk: a protected source or a replica is written by one
//! process only. A replica that an agent is protecting (a failback pointed at
//! the wrong disk), or a block device that is mounted, is refused with the
//! reason instead of being overwritten under its user.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Claim `file` (opened from `path`) for this process: refused when it is a
/// block device mounted somewhere, or when another process holds the claim
/// (an advisory `flock`, held until every handle on this open file is
/// closed). Errors are `ResourceBusy` and name the path and the reason.
pub fn claim(file: &File, path: &Path) -> io::Result<()> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device()
        && let Some(at) = mounted_at(meta.rdev())
    {
        return Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!("{} is mounted at {at}; unmount it first", path.display()),
        ));
    }
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!(
                "{} is in use by another tidemark process (an agent protecting it, or a target applying to it)",
                path.display()
            ),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Where the block device `rdev` is mounted, from /proc/self/mountinfo.
fn mounted_at(rdev: u64) -> Option<String> {
    let want = format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    );
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let mut f = l.split(' ');
        let dev = f.nth(2)?;
        let _root = f.next()?;
        let point = f.next()?;
        (dev == want).then(|| point.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_on_the_same_file_is_refused_until_the_first_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let a = File::options().read(true).write(true).open(&p).unwrap();
        claim(&a, &p).unwrap();
        let b = File::options().read(true).write(true).open(&p).unwrap();
        let e = claim(&b, &p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy);
        assert!(
            e.to_string().contains("in use by another tidemark process"),
            "{e}"
        );
        drop(a);
        claim(&b, &p).unwrap();
    }
}
