//! The file system served over FUSE: a root directory holding one fixed-size
//! regular file per disk, each request mapped onto the disk's [`BlockIo`].
//!
//! Inode 1 is the root; file `i` (in the order given to `mount`) is inode
//! `i + 2`, for the life of the mount. The file handle of an open file is its
//! inode number: nothing is kept per open, so `read`/`write` take the open flags
//! the kernel sends with every request (for FUA) instead.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::FuseFile;
use super::FuseOptions;
use super::stats::{Counter, FuseStats};
use crate::frontend::{BlockIo, IoError, IoErrorKind, Op, check_range};

/// Attribute and entry validity given to the kernel. Nothing but mtime ever
/// changes, so this only bounds how stale an mtime shown by `stat` can be.
const TTL: Duration = Duration::from_secs(1);

/// Block size reported by `stat` and `statfs` (also the discard granularity a
/// loop device on the file advertises).
const BLOCK: u32 = 4096;

const FIRST_FILE_INO: u64 = 2;

/// One disk presented as a file.
struct Node {
    name: String,
    disk: Arc<dyn BlockIo>,
    /// `BlockIo::size()` at mount time (fixed while served).
    size: u64,
    read_only: bool,
    /// Last data change, nanoseconds since the epoch (never goes back).
    mtime_ns: AtomicU64,
    /// Written (or trimmed) since the last flush: `close` then flushes.
    dirty: AtomicBool,
}

/// The FUSE file system of one mount.
pub(super) struct DiskFs {
    files: Vec<Node>,
    uid: u32,
    gid: u32,
    file_mode: u16,
    mounted_at: SystemTime,
    max_background: u16,
    stats: Arc<FuseStats>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn from_ns(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

thread_local! {
    /// Read buffer of one serving thread, reused across requests.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Run a `BlockIo` call; a panic in it becomes an EIO-class error for this one
/// request instead of taking a serving thread down.
fn guarded<T>(
    op: Op,
    offset: u64,
    len: u64,
    f: impl FnOnce() -> Result<T, IoError>,
) -> Result<T, IoError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(IoError::new(
            op,
            offset,
            len,
            IoErrorKind::Backing(std::io::Error::other("the disk panicked")),
        ))
    })
}

impl DiskFs {
    pub(super) fn new(files: Vec<FuseFile>, opts: &FuseOptions, stats: Arc<FuseStats>) -> Self {
        let mounted_at = SystemTime::now();
        let start = now_ns();
        DiskFs {
            files: files
                .into_iter()
                .map(|f| Node {
                    size: f.disk.size(),
                    read_only: f.disk.read_only(),
                    name: f.name,
                    disk: f.disk,
                    mtime_ns: AtomicU64::new(start),
                    dirty: AtomicBool::new(false),
                })
                .collect(),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            // validate_options keeps the mode within 0o777.
            file_mode: (opts.file_mode & 0o777) as u16,
            mounted_at,
            max_background: opts.max_background,
            stats,
        }
    }

    fn node(&self, ino: INodeNo) -> Option<&Node> {
        let i = ino.0.checked_sub(FIRST_FILE_INO)?;
        self.files.get(usize::try_from(i).ok()?)
    }

    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo::ROOT,
            size: 0,
            blocks: 0,
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        }
    }

    fn file_attr(&self, i: usize, n: &Node) -> FileAttr {
        let mtime = from_ns(n.mtime_ns.load(Ordering::Relaxed));
        let perm = if n.read_only {
            self.file_mode & !0o222
        } else {
            self.file_mode
        };
        FileAttr {
            ino: INodeNo(i as u64 + FIRST_FILE_INO),
            size: n.size,
            // Reported fully allocated: a disk has all of its blocks.
            blocks: n.size.div_ceil(512),
            atime: self.mounted_at,
            mtime,
            ctime: mtime,
            crtime: self.mounted_at,
            kind: FileType::RegularFile,
            perm,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        if ino == INodeNo::ROOT {
            return Some(self.root_attr());
        }
        let i = usize::try_from(ino.0.checked_sub(FIRST_FILE_INO)?).ok()?;
        self.files.get(i).map(|n| self.file_attr(i, n))
    }

    /// Log a failed disk request and give its errno.
    fn failed(&self, n: &Node, e: &IoError) -> Errno {
        self.stats.error();
        let errno = e.errno();
        tracing::warn!(
            file = %n.name, op = %e.op, offset = e.offset, len = e.len, errno, error = %e,
            "fuse: request failed"
        );
        Errno::from_i32(errno)
    }

    /// Log a refused request on a name that never reached a disk.
    fn refused(&self, what: &str, name: &OsStr, errno: Errno) -> Errno {
        self.stats.error();
        let file = name.to_string_lossy();
        tracing::info!(op = what, file = %file, errno = i32::from(errno), "fuse: refused");
        errno
    }

    /// Log a refused request on a file's range that never reached its disk.
    fn refused_range(&self, n: &Node, what: &str, offset: u64, len: u64, errno: Errno) -> Errno {
        self.stats.error();
        let errno_i = i32::from(errno);
        tracing::warn!(file = %n.name, op = what, offset, len, errno = errno_i, "fuse: refused");
        errno
    }

    fn touch(n: &Node) {
        n.mtime_ns.fetch_max(now_ns(), Ordering::Relaxed);
        n.dirty.store(true, Ordering::Release);
    }

    fn flush_node(&self, n: &Node) -> Result<(), Errno> {
        n.dirty.store(false, Ordering::Release);
        match guarded(Op::Flush, 0, 0, || n.disk.flush()) {
            Ok(()) => {
                self.stats.done(Counter::Flush, 0);
                Ok(())
            }
            Err(e) => {
                // Still not durable: the next flush must try again.
                n.dirty.store(true, Ordering::Release);
                Err(self.failed(n, &e))
            }
        }
    }

    fn read_node(&self, n: &Node, offset: u64, size: u32, reply: ReplyData) {
        // File semantics: reading at or past the end gives 0 bytes, a read
        // crossing it is short.
        let len = (size as u64).min(n.size.saturating_sub(offset));
        if len == 0 {
            self.stats.done(Counter::Read, 0);
            reply.data(&[]);
            return;
        }
        // len <= size (a u32), so it fits a usize.
        let len = len as usize;
        READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let buf = &mut buf[..len];
            match guarded(Op::Read, offset, len as u64, || n.disk.read_at(offset, buf)) {
                Ok(()) => {
                    self.stats.done(Counter::Read, len as u64);
                    reply.data(buf);
                }
                Err(e) => reply.error(self.failed(n, &e)),
            }
        });
    }

    fn write_node(&self, n: &Node, offset: u64, data: &[u8], flags: OpenFlags, reply: ReplyWrite) {
        if data.is_empty() {
            reply.written(0);
            return;
        }
        let len = data.len() as u64;
        // The whole request is refused when any of it lies past the end: the file
        // has the fixed size of a disk (ENOSPC, as for a block device).
        if let Err(e) = check_range(Op::Write, offset, len, n.size) {
            reply.error(self.failed(n, &e));
            return;
        }
        // O_SYNC includes O_DSYNC's bit; the kernel also sets it for RWF_DSYNC.
        let fua = flags.0 & libc::O_DSYNC != 0;
        match guarded(Op::Write, offset, len, || {
            n.disk.write_at(offset, data.to_vec(), fua)
        }) {
            Ok(()) => {
                Self::touch(n);
                self.stats.done(Counter::Write, len);
                // check_range bounded len by the file size and the kernel by
                // max_write, so it fits.
                reply.written(data.len() as u32);
            }
            Err(e) => reply.error(self.failed(n, &e)),
        }
    }

    /// `fallocate(2)` on a file: hole punching is a trim, zeroing a range is
    /// write-zeroes, plain allocation inside the file is a no-op (a disk has all
    /// its blocks); anything that would grow the file is ENOSPC.
    fn fallocate_node(&self, n: &Node, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        if mode & !(KEEP | PUNCH | ZERO) != 0 || (mode & PUNCH != 0 && mode & ZERO != 0) {
            return Err(self.refused_range(
                n,
                &format!("fallocate mode {mode:#x}"),
                offset,
                length,
                Errno::EOPNOTSUPP,
            ));
        }
        if mode & PUNCH != 0 && mode & KEEP == 0 {
            // The kernel refuses this before asking; be as strict.
            return Err(self.refused_range(
                n,
                "fallocate punch without keep-size",
                offset,
                length,
                Errno::EOPNOTSUPP,
            ));
        }
        let Some(end) = offset.checked_add(length).filter(|_| length > 0) else {
            return Err(self.refused_range(n, "fallocate", offset, length, Errno::EINVAL));
        };
        if mode & KEEP == 0 && end > n.size {
            let e = IoError::new(
                if mode & ZERO != 0 {
                    Op::WriteZeroes
                } else {
                    Op::Write
                },
                offset,
                length,
                IoErrorKind::OutOfRange { size: n.size },
            );
            return Err(self.failed(n, &e));
        }
        // With KEEP_SIZE nothing past the end exists to act on.
        let end = end.min(n.size);
        if offset >= end || mode & (PUNCH | ZERO) == 0 {
            return Ok(());
        }
        let len = end - offset;
        let (op, counter) = if mode & PUNCH != 0 {
            (Op::Trim, Counter::Trim)
        } else {
            (Op::WriteZeroes, Counter::Zeroes)
        };
        let res = guarded(op, offset, len, || {
            if mode & PUNCH != 0 {
                n.disk.trim(offset, len, false)
            } else {
                n.disk.write_zeroes(offset, len, false, false)
            }
        });
        match res {
            Ok(()) => {
                Self::touch(n);
                self.stats.done(counter, 0);
                Ok(())
            }
            Err(e) => Err(self.failed(n, &e)),
        }
    }
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Asynchronous direct I/O: AIO on the file (a loop device with
        // --direct-io=on) keeps several requests in flight instead of one.
        if config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_err() {
            tracing::warn!(
                "fuse: kernel lacks FUSE_ASYNC_DIO: direct AIO is served one request at a time"
            );
        }
        if let Err(max) = config.set_max_background(self.max_background) {
            let _ = config.set_max_background(max);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.stats.request();
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        match self.files.iter().position(|n| OsStr::new(&n.name) == name) {
            Some(i) => reply.entry(&TTL, &self.file_attr(i, &self.files[i]), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.stats.request();
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.stats.request();
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // The shape of the mount is fixed: size, mode and owner stay as they are
        // (setting them to what they already are is fine: `cp -p`, `touch`,
        // `truncate -s <size>`). Times may be set; only mtime is kept.
        let same_mode = mode.is_none_or(|m| m & 0o7777 == u32::from(attr.perm));
        let same_owner = uid.is_none_or(|u| u == attr.uid) && gid.is_none_or(|g| g == attr.gid);
        let same_size = size.is_none_or(|s| s == attr.size);
        if !(same_mode && same_owner && same_size) {
            let name = self.node(ino).map_or("/", |n| n.name.as_str());
            self.stats.error();
            tracing::info!(
                file = name,
                ?size,
                ?mode,
                ?uid,
                ?gid,
                errno = libc::EPERM,
                "fuse: setattr refused (size, mode and owner are fixed)"
            );
            return reply.error(Errno::EPERM);
        }
        if let (Some(t), Some(n)) = (mtime, self.node(ino)) {
            let ns = match t {
                TimeOrNow::Now => now_ns(),
                TimeOrNow::SpecificTime(t) => t
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            };
            n.mtime_ns.store(ns, Ordering::Relaxed);
        }
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        self.stats.request();
        reply.error(self.refused("mknod", name, Errno::EPERM));
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.stats.request();
        reply.error(self.refused("mkdir", name, Errno::EPERM));
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.stats.request();
        reply.error(self.refused("unlink", name, Errno::EPERM));
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.stats.request();
        reply.error(self.refused("rmdir", name, Errno::EPERM));
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        self.stats.request();
        reply.error(self.refused("symlink", link_name, Errno::EPERM));
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.stats.request();
        reply.error(self.refused("rename", name, Errno::EPERM));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.stats.request();
        reply.error(self.refused("link", newname, Errno::EPERM));
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        self.stats.request();
        reply.error(self.refused("create", name, Errno::EPERM));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.stats.request();
        if ino == INodeNo::ROOT {
            return reply.error(Errno::EISDIR);
        }
        let Some(n) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if n.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(self.refused(
                "open for writing",
                OsStr::new(&n.name),
                Errno::EROFS,
            ));
        }
        // Direct I/O: no FUSE page cache, every write reaches the disk when it is
        // issued and every read sees the disk. Parallel direct writes: the kernel
        // does not serialise writers of one file on its inode lock.
        reply.opened(
            FileHandle(ino.0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
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
        self.stats.request();
        match self.node(ino) {
            Some(n) => self.read_node(n, offset, size, reply),
            None => reply.error(Errno::EBADF),
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
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.stats.request();
        match self.node(ino) {
            Some(n) => self.write_node(n, offset, data, flags, reply),
            None => reply.error(Errno::EBADF),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Called on every close(2): flush only when something was written since
        // the last flush, so a close after writing reports a failed flush, and
        // opening and closing a disk for reading costs nothing.
        self.stats.request();
        let Some(n) = self.node(ino) else {
            return reply.error(Errno::EBADF);
        };
        if !n.dirty.load(Ordering::Acquire) {
            return reply.ok();
        }
        match self.flush_node(n) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.stats.request();
        let Some(n) = self.node(ino) else {
            return reply.error(Errno::EBADF);
        };
        match self.flush_node(n) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.stats.request();
        if ino == INodeNo::ROOT {
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(Errno::ENOTDIR);
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
        self.stats.request();
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let dots = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
        ];
        let files = self.files.iter().enumerate().map(|(i, n)| {
            (
                INodeNo(i as u64 + FIRST_FILE_INO),
                FileType::RegularFile,
                n.name.as_str(),
            )
        });
        // Entry k has offset k + 1: the offset the next readdir starts from.
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (k, (ino, kind, name)) in dots.into_iter().chain(files).enumerate().skip(skip) {
            if reply.add(ino, k as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.stats.request();
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.stats.request();
        let blocks: u64 = self
            .files
            .iter()
            .map(|n| n.size.div_ceil(u64::from(BLOCK)))
            .sum();
        let inodes = self.files.len() as u64 + 1;
        // Every block belongs to a disk and no file can be added: nothing free.
        reply.statfs(blocks, 0, 0, inodes, 0, BLOCK, 255, BLOCK);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // ENOSYS once: the kernel then answers "not supported" by itself.
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.stats.request();
        let Some(n) = self.node(ino) else {
            return reply.error(Errno::EBADF);
        };
        match self.fallocate_node(n, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
