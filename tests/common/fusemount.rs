//! Serving a test's own FUSE file system: mount it, run its session on a
//! thread, and unmount it (bounded) when dropped.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use fuser::Filesystem;

/// A FUSE file system served by this test process. Dropping it unmounts it,
/// lazily if a file in it is still open.
pub struct Served {
    mountpoint: PathBuf,
    what: &'static str,
    unmounter: Option<fuser::SessionUnmounter>,
    done: mpsc::Receiver<()>,
}

/// Mount `fs` at `mountpoint` (an existing empty directory) as `fsname`, and
/// serve it on a thread; `what` names it in messages.
pub fn serve<FS: Filesystem + Send + 'static>(
    fs: FS,
    mountpoint: &Path,
    fsname: &str,
    what: &'static str,
) -> Served {
    super::faulty::require_fuse();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(fsname.into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoExec,
    ];
    config.acl = fuser::SessionACL::Owner;
    config.n_threads = Some(2);
    config.clone_fd = true;
    let mut session = fuser::Session::new(fs, mountpoint, &config).unwrap_or_else(|e| {
        panic!(
            "mounting the {what} over FUSE at {}: {e} (needs /dev/fuse and root, or \
             fusermount3 from fuse3)",
            mountpoint.display()
        )
    });
    let unmounter = session.unmount_callable();
    let (tx, done) = mpsc::channel();
    std::thread::Builder::new()
        .name("test-fuse".into())
        .spawn(move || {
            if let Err(e) = session.run() {
                eprintln!("{what}: FUSE session failed: {e}");
            }
            let _ = tx.send(());
        })
        .unwrap();
    Served {
        mountpoint: mountpoint.to_path_buf(),
        what,
        unmounter: Some(unmounter),
        done,
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let Some(mut u) = self.unmounter.take() else {
            return;
        };
        match u.unmount() {
            Ok(()) => {
                // The session ends once the kernel drops the mount (bounded).
                let _ = self.done.recv_timeout(Duration::from_secs(10));
            }
            Err(e) => {
                // Still open somewhere: detach; the kernel ends the session
                // when the last user closes the file.
                eprintln!(
                    "{}: unmounting {}: {e}; detaching lazily",
                    self.what,
                    self.mountpoint.display()
                );
                let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}
