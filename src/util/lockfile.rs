//! One process per state directory: an exclusive, non-blocking `flock` on a
//! `LOCK` file inside it, held for the life of the returned guard (the kernel
//! drops it when the process dies, so a crash never leaves a stale lock).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Name of the lock file.
pub const LOCK_FILE: &str = "LOCK";

/// The directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Creating or opening the directory or the lock file failed.
    #[error("{path}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Another process holds the lock.
    #[error("{dir} is in use by another process (it holds {dir}/LOCK)", dir = dir.display())]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
}

impl crate::error::Classify for LockError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            LockError::Io { .. } => crate::error::ErrorKind::Io,
            LockError::Locked { .. } => crate::error::ErrorKind::Config,
        }
    }
}

/// Create `dir` if needed (durably: everything a role keeps lives below it, and
/// a name not yet synced would take all of it in a power cut) and take its lock.
pub fn lock_dir(dir: &Path) -> Result<Flock<File>, LockError> {
    lock_dir_waiting(dir, std::time::Duration::ZERO)
}

/// [`lock_dir`], waiting up to `limit` while another process holds the lock
/// (polling every 50 ms): for a process that may start while a short-lived
/// one (an offline `recover`) works in the directory. The directory and the
/// lock file are made once; only the lock is tried again.
pub fn lock_dir_waiting(dir: &Path, limit: std::time::Duration) -> Result<Flock<File>, LockError> {
    crate::util::durable::create_dir_durable(dir).map_err(|source| LockError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(LOCK_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| LockError::Io {
            path: path.clone(),
            source,
        })?;
    let until = std::time::Instant::now() + limit;
    let mut said = false;
    loop {
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((back, _)) if std::time::Instant::now() < until => {
                if !said {
                    tracing::info!(
                        dir = %dir.display(),
                        "waiting up to {limit:?} for the directory's lock (another process holds it)"
                    );
                    said = true;
                }
                f = back;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(_) => {
                return Err(LockError::Locked {
                    dir: dir.to_path_buf(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_until_the_first_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let a = lock_dir(d.path()).unwrap();
        let e = lock_dir(d.path()).unwrap_err();
        assert!(e.to_string().contains("in use by another process"), "{e}");
        drop(a);
        lock_dir(d.path()).unwrap();
    }

    #[test]
    fn a_waiting_lock_is_taken_once_released_or_refused_after_its_limit() {
        let d = tempfile::tempdir().unwrap();
        let a = lock_dir(d.path()).unwrap();
        let e = lock_dir_waiting(d.path(), std::time::Duration::from_millis(120)).unwrap_err();
        assert!(matches!(e, LockError::Locked { .. }), "{e}");
        let p = d.path().to_path_buf();
        let t =
            std::thread::spawn(move || lock_dir_waiting(&p, std::time::Duration::from_secs(30)));
        std::thread::sleep(std::time::Duration::from_millis(150));
        drop(a);
        t.join().unwrap().unwrap();
    }
}
