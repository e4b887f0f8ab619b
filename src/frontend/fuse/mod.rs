//! The FUSE frontend: one regular file per protected disk in a FUSE mount; a loop
//! device on that file gives a block device whose writes pass through tidemark.
//!
//! [`mount`] mounts a directory holding one fixed-size regular file per
//! [`FuseFile`] and serves it from background threads until [`FuseMount::unmount`]
//! (or drop). Every read, write, flush, trim and zero-range request on a file is
//! mapped onto that file's [`BlockIo`]; nothing else reaches the disk. Files are
//! opened with direct I/O (`FOPEN_DIRECT_IO`): the kernel keeps no page cache for
//! them, so each write(2) — and each write of a loop device on the file — reaches
//! [`BlockIo::write_at`] before it completes. The choices (errnos, direct I/O,
//! threads, unmount) and their reasons are in `docs/FUSE.md`.
//!
//! ```text
//! /run/tidemark/disks/          (the mountpoint, mode 0755)
//! └── root-disk                 (regular file, 0600, size = BlockIo::size())
//! losetup --find --show /run/tidemark/disks/root-disk   → /dev/loopN
//! ```

mod fs;
mod stats;

#[cfg(test)]
mod loop_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;

use crate::error::{Classify, ErrorKind};
use crate::frontend::BlockIo;

pub use stats::{FuseStats, FuseStatsSnapshot};

/// The kernel's FUSE device.
const DEV_FUSE: &str = "/dev/fuse";

/// Longest file name the kernel accepts in a directory entry (`NAME_MAX`).
const NAME_MAX: usize = 255;

/// How long [`FuseMount::unmount`] waits for the worker threads after a clean
/// unmount (the kernel ends the session as soon as the mount is gone).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// One file of the mount: a protected disk under a name.
#[derive(Clone)]
pub struct FuseFile {
    /// File name in the mount's root directory: not empty, not `.` or `..`, no
    /// `/` or NUL, at most 255 bytes, unique within the mount.
    pub name: String,
    /// The disk the file presents; its size is the file's size.
    pub disk: Arc<dyn BlockIo>,
}

impl std::fmt::Debug for FuseFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseFile")
            .field("name", &self.name)
            .field("size", &self.disk.size())
            .field("read_only", &self.disk.read_only())
            .finish()
    }
}

/// How the mount is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseOptions {
    /// Let users other than the mounting user reach the mount (`allow_other`);
    /// the kernel still checks [`FuseOptions::file_mode`] (`default_permissions`).
    /// A non-root mounting user needs `user_allow_other` in `/etc/fuse.conf`.
    pub allow_other: bool,
    /// Permission bits of the files (at most `0o777`); `0o600` by default. The
    /// write bits are dropped for a read-only disk.
    pub file_mode: u32,
    /// Threads reading and serving requests (1 to 64), each on its own clone of
    /// the FUSE device; 4 by default.
    pub threads: usize,
    /// Asynchronous (background) requests the kernel keeps in flight, which
    /// bounds the queue depth of a loop device with `--direct-io=on` and of AIO
    /// on the file; 64 by default (the kernel's default is 12).
    pub max_background: u16,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            allow_other: false,
            file_mode: 0o600,
            threads: 4,
            max_background: 64,
        }
    }
}

/// Why mounting or unmounting failed.
#[derive(Debug, Error)]
pub enum FuseError {
    /// A file name is unusable.
    #[error("invalid FUSE file name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two files have the same name.
    #[error("duplicate FUSE file name {0:?}")]
    DuplicateName(String),
    /// An option is out of range, or a disk cannot be presented as a file.
    #[error("invalid FUSE options: {0}")]
    InvalidOptions(String),
    /// The mountpoint is missing, not a directory, or not empty.
    #[error("FUSE mountpoint {}: {reason}", path.display())]
    Mountpoint {
        /// The mountpoint as given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The kernel offers no FUSE device.
    #[error(
        "{DEV_FUSE} does not exist: this kernel or container offers no FUSE \
         (try `modprobe fuse`, or give the container the device)"
    )]
    DevFuseMissing,
    /// The process may not mount FUSE file systems.
    #[error("not permitted to mount FUSE at {}: {detail}", path.display())]
    Privilege {
        /// The mountpoint.
        path: PathBuf,
        /// What was refused and what would allow it.
        detail: String,
    },
    /// The mount itself failed.
    #[error("mounting FUSE at {}: {source}", path.display())]
    Mount {
        /// The mountpoint.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// Unmounting failed, or the serving threads did not stop.
    #[error("unmounting FUSE at {}: {source}", path.display())]
    Unmount {
        /// The mountpoint.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

impl Classify for FuseError {
    fn kind(&self) -> ErrorKind {
        match self {
            FuseError::InvalidName { .. }
            | FuseError::DuplicateName(_)
            | FuseError::InvalidOptions(_)
            | FuseError::Mountpoint { .. }
            | FuseError::DevFuseMissing => ErrorKind::Config,
            FuseError::Privilege { .. } => ErrorKind::Auth,
            FuseError::Mount { .. } | FuseError::Unmount { .. } => ErrorKind::Io,
        }
    }
}

/// How [`FuseMount::unmount`] took the mount away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// Plain `umount`: nothing held the mount; the serving threads have stopped.
    Clean,
    /// The mount was busy (a loop device or an open file on it), so it was
    /// detached lazily (`MNT_DETACH`): the directory is free at once, and whoever
    /// still holds a file keeps being served until they close it (detach the
    /// loop device); then the kernel ends the session and the threads stop.
    /// [`FuseStatsSnapshot::serving`] turns false at that point.
    Lazy,
}

/// A mounted and served FUSE directory. Dropping it unmounts (as
/// [`FuseMount::unmount`] does, logging instead of returning a failure).
#[derive(Debug)]
pub struct FuseMount {
    mountpoint: PathBuf,
    names: Vec<String>,
    stats: Arc<FuseStats>,
    unmounter: Option<fuser::SessionUnmounter>,
    done: mpsc::Receiver<()>,
    runner: Option<JoinHandle<()>>,
}

/// Mount `files` at `mountpoint` (an existing empty directory) and serve them
/// from background threads. Returns once the kernel has completed the FUSE
/// handshake, so the files can be opened as soon as this returns.
pub fn mount(
    mountpoint: &Path,
    files: Vec<FuseFile>,
    opts: &FuseOptions,
) -> Result<FuseMount, FuseError> {
    validate_files(&files)?;
    validate_options(opts)?;
    check_mountpoint(mountpoint)?;
    check_dev_fuse(Path::new(DEV_FUSE))?;
    let root = nix::unistd::geteuid().is_root();
    check_privilege(
        mountpoint,
        root,
        opts.allow_other,
        find_fusermount().is_some(),
    )?;
    let mountpoint = mountpoint
        .canonicalize()
        .map_err(|e| FuseError::Mountpoint {
            path: mountpoint.to_path_buf(),
            reason: e.to_string(),
        })?;

    let stats = Arc::new(FuseStats::default());
    let names = files.iter().map(|f| f.name.clone()).collect();
    let filesystem = fs::DiskFs::new(files, opts, stats.clone());

    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("tidemark".into()),
        fuser::MountOption::Subtype("tidemark".into()),
        // The kernel checks the files' mode and owner: with allow_other this is
        // what keeps a 0600 disk file private.
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoExec,
        fuser::MountOption::NoAtime,
    ];
    config.acl = if opts.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(opts.threads);
    config.clone_fd = opts.threads > 1;

    let mut session = fuser::Session::new(filesystem, &mountpoint, &config)
        .map_err(|e| mount_error(&mountpoint, root, e))?;
    let unmounter = session.unmount_callable();
    stats.set_serving(true);
    let (tx, done) = mpsc::channel();
    let thread_stats = stats.clone();
    let shown = mountpoint.display().to_string();
    let runner = std::thread::Builder::new()
        .name("tidemark-fuse".into())
        .spawn(move || {
            if let Err(e) = session.run() {
                tracing::error!(mountpoint = %shown, error = %e, "fuse: session failed");
            } else {
                tracing::debug!(mountpoint = %shown, "fuse: session ended");
            }
            thread_stats.set_serving(false);
            let _ = tx.send(());
        });
    let runner = match runner {
        Ok(r) => r,
        Err(e) => {
            // The session was moved into the closure and dropped with it, which
            // unmounted it.
            stats.set_serving(false);
            return Err(FuseError::Mount {
                path: mountpoint,
                source: e,
            });
        }
    };
    tracing::info!(
        mountpoint = %mountpoint.display(), files = ?names, threads = opts.threads, "fuse: mounted"
    );
    Ok(FuseMount {
        mountpoint,
        names,
        stats,
        unmounter: Some(unmounter),
        done,
        runner: Some(runner),
    })
}

impl FuseMount {
    /// The mountpoint (canonical path).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Path of the file named `name`, if the mount has one.
    pub fn file_path(&self, name: &str) -> Option<PathBuf> {
        self.names
            .iter()
            .any(|n| n == name)
            .then(|| self.mountpoint.join(name))
    }

    /// The request counters (shared; they keep counting after a lazy unmount).
    pub fn stats(&self) -> Arc<FuseStats> {
        self.stats.clone()
    }

    /// Unmount: a plain unmount when nothing holds the mount, else a lazy one
    /// (see [`Unmounted`]).
    pub fn unmount(mut self) -> Result<Unmounted, FuseError> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<Unmounted, FuseError> {
        let Some(mut unmounter) = self.unmounter.take() else {
            return Ok(Unmounted::Clean);
        };
        let err = |source| FuseError::Unmount {
            path: self.mountpoint.clone(),
            source,
        };
        match unmounter.unmount() {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)
                    .map_err(|e| err(e.into()))?;
                tracing::info!(
                    mountpoint = %self.mountpoint.display(),
                    "fuse: mount busy (loop device or open file), detached lazily; \
                     served until its last user closes it"
                );
                // The runner thread ends by itself when the kernel ends the session.
                self.runner.take();
                return Ok(Unmounted::Lazy);
            }
            Err(e) => return Err(err(e)),
        }
        match self.done.recv_timeout(STOP_TIMEOUT) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if let Some(r) = self.runner.take() {
                    let _ = r.join();
                }
                tracing::info!(mountpoint = %self.mountpoint.display(), "fuse: unmounted");
                Ok(Unmounted::Clean)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Without root the unmount goes through `fusermount3 -u -z`, which
                // is lazy: a busy mount lands here.
                tracing::warn!(
                    mountpoint = %self.mountpoint.display(),
                    timeout_s = STOP_TIMEOUT.as_secs(),
                    "fuse: unmounted, but the session is still served (a user still holds a file)"
                );
                self.runner.take();
                Ok(Unmounted::Lazy)
            }
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::error!(error = %e, "fuse: unmount on drop failed");
        }
    }
}

fn validate_files(files: &[FuseFile]) -> Result<(), FuseError> {
    let mut seen = std::collections::HashSet::new();
    for f in files {
        validate_name(&f.name)?;
        if !seen.insert(f.name.as_str()) {
            return Err(FuseError::DuplicateName(f.name.clone()));
        }
        if f.disk.size() > i64::MAX as u64 {
            return Err(FuseError::InvalidOptions(format!(
                "disk {:?} has {} bytes, more than a file can hold",
                f.name,
                f.disk.size()
            )));
        }
    }
    Ok(())
}

/// Check one file name (see [`FuseFile::name`]).
fn validate_name(name: &str) -> Result<(), FuseError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name == "." || name == ".." {
        "reserved"
    } else if name.contains('/') {
        "contains '/'"
    } else if name.contains('\0') {
        "contains NUL"
    } else if name.len() > NAME_MAX {
        "longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(FuseError::InvalidName {
        name: name.to_string(),
        reason,
    })
}

fn validate_options(opts: &FuseOptions) -> Result<(), FuseError> {
    if opts.file_mode & !0o777 != 0 {
        return Err(FuseError::InvalidOptions(format!(
            "file_mode {:#o} has bits beyond 0o777",
            opts.file_mode
        )));
    }
    if !(1..=64).contains(&opts.threads) {
        return Err(FuseError::InvalidOptions(format!(
            "threads = {}, expected 1 to 64",
            opts.threads
        )));
    }
    if opts.max_background == 0 {
        return Err(FuseError::InvalidOptions("max_background = 0".into()));
    }
    Ok(())
}

/// The mountpoint must be an existing, empty directory.
fn check_mountpoint(path: &Path) -> Result<(), FuseError> {
    let bad = |reason: String| FuseError::Mountpoint {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| {
        bad(if e.kind() == io::ErrorKind::NotFound {
            "does not exist".into()
        } else {
            e.to_string()
        })
    })?;
    if !meta.is_dir() {
        return Err(bad("is not a directory".into()));
    }
    let mut entries = std::fs::read_dir(path).map_err(|e| bad(e.to_string()))?;
    if entries.next().is_some() {
        return Err(bad("is not empty".into()));
    }
    Ok(())
}

/// The FUSE device must exist and be openable read-write.
fn check_dev_fuse(dev: &Path) -> Result<(), FuseError> {
    match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(FuseError::DevFuseMissing),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(FuseError::Privilege {
            path: dev.to_path_buf(),
            detail: format!("cannot open {}: {e}", dev.display()),
        }),
        Err(e) => Err(FuseError::Mount {
            path: dev.to_path_buf(),
            source: e,
        }),
    }
}

/// Without root, mounting goes through the setuid `fusermount3` helper.
fn check_privilege(
    mountpoint: &Path,
    root: bool,
    allow_other: bool,
    has_fusermount: bool,
) -> Result<(), FuseError> {
    if root {
        return Ok(());
    }
    if !has_fusermount {
        return Err(FuseError::Privilege {
            path: mountpoint.to_path_buf(),
            detail: "not running as root and no fusermount3/fusermount in PATH \
                     (run as root or install fuse3)"
                .into(),
        });
    }
    if allow_other {
        tracing::debug!("fuse: allow_other without root needs user_allow_other in /etc/fuse.conf");
    }
    Ok(())
}

fn find_fusermount() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| [d.join("fusermount3"), d.join("fusermount")])
        .find(|p| p.is_file())
}

fn mount_error(mountpoint: &Path, root: bool, e: io::Error) -> FuseError {
    let denied = e.kind() == io::ErrorKind::PermissionDenied
        || matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES));
    if denied {
        FuseError::Privilege {
            path: mountpoint.to_path_buf(),
            detail: if root {
                format!("{e} (root, but mount(2) was refused: a container without CAP_SYS_ADMIN?)")
            } else {
                format!("{e} (run as root, or allow it in /etc/fuse.conf)")
            },
        }
    } else {
        FuseError::Mount {
            path: mountpoint.to_path_buf(),
            source: e,
        }
    }
}
