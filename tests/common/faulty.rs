//! A faulty source disk: a one-file FUSE file system, served by this test
//! process, over a real image file. Reads and writes pass through to the
//! image, except that while the fault is on, every read overlapping a chosen
//! byte range fails with EIO, as a disk with unreadable sectors does. The test
//! switches the fault off at run time ([`FaultyDisk::heal`]).
//!
//! The file is opened with direct I/O (`FOPEN_DIRECT_IO`): no page cache sits
//! between a reader and this file system, so a read fails exactly when it
//! overlaps the range (no readahead of a neighbouring range fails it or hides
//! it). `flock` is left to the kernel (local locks on the FUSE inode), and
//! `lseek(SEEK_DATA/SEEK_HOLE)` passes through to the image.

use std::ffi::OsStr;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyWrite, Request, WriteFlags,
};

/// Name of the file in the mount.
const NAME: &str = "disk.img";
const FILE_INO: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(1);

/// What the file system shares with the test.
#[derive(Debug)]
struct Fault {
    range: Range<u64>,
    on: AtomicBool,
    /// Reads that failed because of the fault.
    failed_reads: AtomicU64,
    /// Reads that passed through.
    reads: AtomicU64,
}

struct FaultyFs {
    image: File,
    size: u64,
    fault: Arc<Fault>,
    uid: u32,
    gid: u32,
    at: SystemTime,
}

impl FaultyFs {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = if ino == INodeNo::ROOT {
            (FileType::Directory, 0o755, 0, 2)
        } else if ino == FILE_INO {
            (FileType::RegularFile, 0o600, self.size, 1)
        } else {
            return None;
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.at,
            mtime: self.at,
            ctime: self.at,
            crtime: self.at,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

impl Filesystem for FaultyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == NAME {
            reply.entry(&TTL, &self.attr(FILE_INO).unwrap(), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        reply.opened(FileHandle(ino.0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EBADF);
        }
        let len = u64::from(size).min(self.size.saturating_sub(offset));
        let r = &self.fault.range;
        if len > 0
            && self.fault.on.load(Ordering::SeqCst)
            && offset < r.end
            && offset + len > r.start
        {
            self.fault.failed_reads.fetch_add(1, Ordering::SeqCst);
            return reply.error(Errno::EIO);
        }
        self.fault.reads.fetch_add(1, Ordering::Relaxed);
        let mut buf = vec![0u8; len as usize];
        match self.image.read_exact_at(&mut buf, offset) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EBADF);
        }
        if offset + data.len() as u64 > self.size {
            return reply.error(Errno::ENOSPC);
        }
        match self.image.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.image.sync_data() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let whence = match whence {
            libc::SEEK_DATA => nix::unistd::Whence::SeekData,
            libc::SEEK_HOLE => nix::unistd::Whence::SeekHole,
            _ => return reply.error(Errno::EINVAL),
        };
        if ino != FILE_INO {
            return reply.error(Errno::EBADF);
        }
        match nix::unistd::lseek(&self.image, offset, whence) {
            Ok(p) => reply.offset(p),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, NAME),
        ];
        for (k, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, k as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted faulty disk. Drop it after every process using the file has
/// exited (declare it before the `Cluster`): dropping unmounts it, lazily if
/// the file is still open.
pub struct FaultyDisk {
    /// The FUSE file: give this path to the agent.
    pub file: PathBuf,
    /// The image behind it: read it to see the disk without the fault.
    pub image: PathBuf,
    mountpoint: PathBuf,
    fault: Arc<Fault>,
    // Unmounted when dropped, before the directory below is removed.
    served: super::fusemount::Served,
    // Holds the image and the mountpoint; removed after the unmount.
    _dir: tempfile::TempDir,
}

/// Fail (never skip) naming what is missing when this machine cannot serve a
/// FUSE file from a test.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "prerequisite missing: /dev/fuse (this kernel or container offers no FUSE; \
         the faulty-disk tests serve the source disk over FUSE)"
    );
    if !nix::unistd::geteuid().is_root() {
        // Without root, fuser mounts through the setuid helper.
        super::tools::require_tool("fusermount3", "fuse3");
    }
}

impl FaultyDisk {
    /// Serve `image` (an existing file, kept: it is moved into the disk's own
    /// directory) as a FUSE file whose reads overlapping `bad` fail with EIO
    /// until [`FaultyDisk::heal`].
    pub fn mount(image: &Path, bad: Range<u64>) -> FaultyDisk {
        require_fuse();
        let dir = tempfile::Builder::new()
            .prefix("tidemark-faulty-")
            .tempdir()
            .unwrap();
        let img = dir.path().join("image.raw");
        std::fs::rename(image, &img)
            .or_else(|_| std::fs::copy(image, &img).map(|_| ()))
            .unwrap_or_else(|e| panic!("moving {} to {}: {e}", image.display(), img.display()));
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        let file = File::options().read(true).write(true).open(&img).unwrap();
        let size = file.metadata().unwrap().len();
        let fault = Arc::new(Fault {
            range: bad,
            on: AtomicBool::new(true),
            failed_reads: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        });
        let fs = FaultyFs {
            image: file,
            size,
            fault: fault.clone(),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            at: SystemTime::now(),
        };
        let served = super::fusemount::serve(fs, &mountpoint, "tidemark-faulty", "faulty disk");
        FaultyDisk {
            file: mountpoint.join(NAME),
            image: img,
            mountpoint,
            fault,
            served,
            _dir: dir,
        }
    }

    /// The unreadable range.
    pub fn bad_range(&self) -> Range<u64> {
        self.fault.range.clone()
    }

    /// Reads refused with EIO so far.
    pub fn failed_reads(&self) -> u64 {
        self.fault.failed_reads.load(Ordering::SeqCst)
    }

    /// Reads served so far.
    pub fn reads(&self) -> u64 {
        self.fault.reads.load(Ordering::SeqCst)
    }

    /// The range reads again from now on.
    pub fn heal(&self) {
        self.fault.on.store(false, Ordering::SeqCst);
    }
}
