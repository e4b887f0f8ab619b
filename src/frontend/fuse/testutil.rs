//! Test helpers for the FUSE frontend: prerequisite checks that fail loudly,
//! guards that undo mounts and loop devices even when a test fails, bounded
//! child processes, and a `BlockIo` test double over a real [`BackingDisk`].

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{FuseFile, FuseMount, FuseOptions, mount};
use crate::capture::backing::BackingDisk;
use crate::frontend::{BlockIo, IoError, IoErrorKind, Op};

/// Fail (never skip) when the tests cannot mount FUSE here.
pub fn require_fuse() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "prerequisite missing: the FUSE frontend tests need root (running as uid {})",
        nix::unistd::geteuid()
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "prerequisite missing: /dev/fuse (no FUSE in this kernel or container)"
    );
}

/// Path of a tool the test needs; fails naming it when it is not installed.
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("prerequisite missing: `{name}` not found in PATH (apt-get install {package})")
        })
}

/// Run a command to completion within `timeout` (killed after it); panics with
/// its stderr unless it exits 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let out = run(cmd, timeout);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a command within `timeout` (killed after it) and return its output.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let out = child.wait_with_output();
                panic!("{cmd:?} did not finish within {timeout:?}: {out:?}");
            }
            Err(e) => panic!("waiting for {cmd:?}: {e}"),
        }
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("collecting {cmd:?}: {e}"))
}

/// A sparse backing image of `size` bytes in `dir`, opened as a [`BackingDisk`].
pub fn backing_image(dir: &Path, name: &str, size: u64) -> (PathBuf, BackingDisk) {
    let p = dir.join(name);
    File::create(&p).unwrap().set_len(size).unwrap();
    let d = BackingDisk::open(&p).unwrap();
    (p, d)
}

/// A FUSE mount over one disk, with everything a test needs; fields drop in
/// order: the mount before the directory holding it.
pub struct Fixture {
    /// The mount (taken by tests that unmount explicitly).
    pub mount: Option<FuseMount>,
    /// Path of the FUSE file.
    pub file: PathBuf,
    /// Path of the backing image.
    pub backing: PathBuf,
    /// Holds the mountpoint and the backing image.
    pub dir: tempfile::TempDir,
}

impl Fixture {
    /// Mount `disk` (built by `make` over a fresh image of `size` bytes) as `name`.
    pub fn new<D: BlockIo + 'static>(
        name: &str,
        size: u64,
        opts: &FuseOptions,
        make: impl FnOnce(BackingDisk) -> D,
    ) -> (Fixture, Arc<D>) {
        require_fuse();
        let dir = tempfile::tempdir().unwrap();
        let (backing, disk) = backing_image(dir.path(), "backing.img", size);
        let disk = Arc::new(make(disk));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let m = mount(
            &mnt,
            vec![FuseFile {
                name: name.into(),
                disk: disk.clone(),
            }],
            opts,
        )
        .unwrap_or_else(|e| panic!("mount: {e}"));
        let file = m.file_path(name).unwrap();
        (
            Fixture {
                mount: Some(m),
                file,
                backing,
                dir,
            },
            disk,
        )
    }

    /// The mount.
    pub fn mount(&self) -> &FuseMount {
        self.mount.as_ref().unwrap()
    }
}

/// A loop device this test attached; detached (by its name) on drop.
pub struct LoopDev {
    /// `/dev/loopN`.
    pub dev: String,
    losetup: PathBuf,
}

impl LoopDev {
    /// `losetup --find --show [--direct-io=on] file`.
    pub fn attach(file: &Path, direct_io: bool) -> LoopDev {
        let losetup = require_tool("losetup", "util-linux (mount)");
        let mut cmd = Command::new(&losetup);
        cmd.arg("--find").arg("--show");
        if direct_io {
            cmd.arg("--direct-io=on");
        }
        let out = run_ok(cmd.arg(file), Duration::from_secs(30));
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDev { dev, losetup }
    }

    /// `/sys/block/loopN/loop/dio`: whether the loop device does direct I/O.
    pub fn direct_io(&self) -> bool {
        let name = self.dev.trim_start_matches("/dev/");
        std::fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
    }

    /// Detach now, panicking on failure.
    pub fn detach(mut self) {
        let dev = std::mem::take(&mut self.dev);
        run_ok(
            Command::new(&self.losetup).arg("-d").arg(&dev),
            Duration::from_secs(30),
        );
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if self.dev.is_empty() {
            return;
        }
        for _ in 0..50 {
            let ok = Command::new(&self.losetup)
                .arg("-d")
                .arg(&self.dev)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not detach {}", self.dev);
    }
}

/// A file system this test mounted; unmounted on drop (lazily if busy).
pub struct Mounted {
    /// Mountpoint.
    pub dir: PathBuf,
}

impl Mounted {
    /// `mount [-o opts] dev dir`.
    pub fn mount(dev: &str, dir: &Path, opts: Option<&str>) -> Mounted {
        let mut cmd = Command::new("mount");
        if let Some(o) = opts {
            cmd.arg("-o").arg(o);
        }
        run_ok(cmd.arg(dev).arg(dir), Duration::from_secs(60));
        Mounted {
            dir: dir.to_path_buf(),
        }
    }

    /// Unmount now, panicking on failure.
    pub fn unmount(mut self) {
        let dir = std::mem::take(&mut self.dir);
        run_ok(Command::new("umount").arg(&dir), Duration::from_secs(120));
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.dir.as_os_str().is_empty() {
            return;
        }
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// A `BlockIo` over a real [`BackingDisk`] that fails with EIO on one range,
/// panics on another, can slow writes down, and counts what it saw.
pub struct TestDisk {
    pub(super) inner: BackingDisk,
    /// Requests overlapping this range fail with EIO.
    pub eio: Option<Range<u64>>,
    /// Requests overlapping this range panic.
    pub panic: Option<Range<u64>>,
    /// Each write sleeps this long (to see requests overlap).
    pub write_delay: Duration,
    /// Writes that asked for FUA.
    pub fua_writes: AtomicU64,
    /// Flushes.
    pub flushes: AtomicU64,
    pub(super) in_flight: AtomicU64,
    /// Most writes in flight at once.
    pub max_in_flight: AtomicU64,
}

impl TestDisk {
    /// A double that behaves exactly like `inner`.
    pub fn new(inner: BackingDisk) -> TestDisk {
        TestDisk {
            inner,
            eio: None,
            panic: None,
            write_delay: Duration::ZERO,
            fua_writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
        }
    }

    fn check(&self, op: Op, offset: u64, len: u64) -> Result<(), IoError> {
        let hits = |r: &Range<u64>| offset < r.end && offset.saturating_add(len) > r.start;
        if self.panic.as_ref().is_some_and(hits) {
            panic!("TestDisk: injected panic at {offset}");
        }
        if self.eio.as_ref().is_some_and(hits) {
            return Err(IoError::new(
                op,
                offset,
                len,
                IoErrorKind::Backing(std::io::Error::from_raw_os_error(libc::EIO)),
            ));
        }
        Ok(())
    }
}

impl BlockIo for TestDisk {
    fn size(&self) -> u64 {
        BlockIo::size(&self.inner)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.check(Op::Read, offset, buf.len() as u64)?;
        self.inner.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), IoError> {
        self.check(Op::Write, offset, data.len() as u64)?;
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        if !self.write_delay.is_zero() {
            std::thread::sleep(self.write_delay);
        }
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        let r = self.inner.write_at(offset, data, fua);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        r
    }

    fn flush(&self) -> Result<(), IoError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), IoError> {
        self.check(Op::Trim, offset, len)?;
        self.inner.trim(offset, len, fua)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), IoError> {
        self.check(Op::WriteZeroes, offset, len)?;
        self.inner.write_zeroes(offset, len, may_unmap, fua)
    }
}

/// Deterministic bytes for a test region.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = crate::util::prng::Prng::new(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}
