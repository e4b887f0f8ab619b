//! A forgetful file system: an in-memory FUSE file system, served by this test
//! process, that keeps written data only once it has been `fsync`ed or
//! `fdatasync`ed, and can be power-cut at any moment.
//!
//! A SIGKILL leaves the page cache intact, so kill tests cannot show that a
//! process acknowledges only what is durable. This file system can: after
//! [`Forgetful::power_cut`] every file holds what its last sync made durable,
//! plus, for each 4 KiB page written since, either the new or the old content
//! (chosen at random, as a disk that lost power in the middle of writeback
//! keeps some pages and not others), and a file that grew since its last sync
//! keeps a random length between its synced and its current length (the part
//! beyond the synced data that was not kept reads as zeros).
//!
//! From the cut until the test powers it on again, every change and every sync
//! fails with EIO (a sync in progress at the cut included), so nothing a
//! process does after the instant of the cut reaches the disk.
//!
//! Names follow POSIX's strict reading: an entry created, renamed or removed
//! in a directory is durable only once that directory is `fsync`ed; a cut
//! puts every directory back to its entries at its last fsync (a file that no
//! durable name reaches is gone, an unlinked one whose removal was not synced
//! is back).
//!
//! A truncate is durable only once the file is synced: a cut either undoes
//! every truncate since the last sync (the file is back at its synced length
//! and content, plus whichever later pages were kept) or keeps them all (the
//! file starts from its synced content cut at the shortest length it was
//! truncated to), chosen at random, as a journaling file system commits a
//! truncate as one transaction that may or may not have reached the disk.
//!
//! Files are opened with direct I/O (`FOPEN_DIRECT_IO`) and entries and
//! attributes are never cached by the kernel: every read and write reaches this
//! file system, and nothing the kernel kept can outlive a cut. Locks (`flock`,
//! `fcntl`) are left to the kernel (local locks on the FUSE inode).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};
use tidemark::util::prng::Prng;

const PAGE: u64 = 4096;
/// Nothing is cached by the kernel: a cut changes sizes and contents.
const TTL: Duration = Duration::ZERO;
/// Largest file this file system holds (it lives in memory).
const MAX_FILE: u64 = 1 << 30;

enum Kind {
    Dir(BTreeMap<OsString, u64>),
    File(FileData),
    /// A Unix socket's name (the socket itself lives in the kernel).
    Socket,
}

#[derive(Default)]
struct FileData {
    /// What a reader sees now.
    data: Vec<u8>,
    /// What survives a power cut for certain: the content at the last sync.
    durable: Vec<u8>,
    /// Pages written since the last sync.
    dirty: BTreeSet<u64>,
    /// The shortest length a truncate set since the last sync, if one did.
    shrunk_to: Option<u64>,
}

struct Node {
    kind: Kind,
    perm: u16,
    /// Directory entries naming it (0 once unlinked).
    links: u32,
    /// Open handles; an unlinked file lives until the last one is released.
    opens: u32,
    /// The kernel's references from lookups (until it forgets them): the
    /// kernel may open an inode it looked up after its name was replaced.
    lookups: u64,
}

/// What a power cut did, summed over all cuts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CutStats {
    /// Cuts so far.
    pub cuts: u64,
    /// Pages written but not synced when a cut came, and kept.
    pub pages_kept: u64,
    /// Pages written but not synced when a cut came, and lost.
    pub pages_lost: u64,
    /// Bytes of file length lost (a file cut back towards its synced length).
    pub bytes_cut: u64,
    /// Files truncated since their last sync whose truncates a cut undid.
    pub truncates_undone: u64,
    /// Files truncated since their last sync whose truncates a cut kept.
    pub truncates_kept: u64,
    /// Directory entries created, renamed or removed since their directory's
    /// last fsync, and undone by a cut.
    pub names_lost: u64,
}

struct State {
    /// Power is off: every change fails with EIO and nothing is synced.
    off: bool,
    nodes: HashMap<u64, Node>,
    /// Each directory's entries as of its last `fsync`: what a cut leaves.
    durable_names: HashMap<u64, BTreeMap<OsString, u64>>,
    next_ino: u64,
    rng: Prng,
    stats: CutStats,
}

impl State {
    /// EIO while the power is off.
    fn powered(&self) -> Result<(), Errno> {
        if self.off { Err(Errno::EIO) } else { Ok(()) }
    }

    fn file(&mut self, ino: u64) -> Result<&mut FileData, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(Kind::File(f)) => Ok(f),
            Some(Kind::Dir(_)) => Err(Errno::EISDIR),
            Some(Kind::Socket) => Err(Errno::ENXIO),
            None => Err(Errno::ENOENT),
        }
    }

    fn dir(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(Kind::Dir(d)) => Ok(d),
            Some(Kind::File(_) | Kind::Socket) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn drop_if_unused(&mut self, ino: u64) {
        let durably_named = self
            .durable_names
            .values()
            .any(|d| d.values().any(|&i| i == ino));
        if !durably_named
            && self
                .nodes
                .get(&ino)
                .is_some_and(|n| n.links == 0 && n.opens == 0 && n.lookups == 0)
        {
            self.nodes.remove(&ino);
        }
    }

    /// Remove `name` from `parent` (a file, or an empty directory when `dir`).
    fn unlink(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = *self.dir(parent)?.get(name).ok_or(Errno::ENOENT)?;
        match (&self.nodes[&ino].kind, dir) {
            (Kind::Dir(d), true) if !d.is_empty() => return Err(Errno::ENOTEMPTY),
            (Kind::Dir(_), false) => return Err(Errno::EISDIR),
            (Kind::File(_) | Kind::Socket, true) => return Err(Errno::ENOTDIR),
            _ => {}
        }
        self.dir(parent)?.remove(name);
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.links = 0;
        }
        self.drop_if_unused(ino);
        Ok(())
    }

    fn cut(&mut self) {
        // Names: every directory back to its entries at its last fsync.
        let mut names_lost = 0;
        for (ino, n) in self.nodes.iter_mut() {
            if let Kind::Dir(d) = &mut n.kind {
                let durable = self.durable_names.get(ino).cloned().unwrap_or_default();
                names_lost += d.iter().filter(|(k, v)| durable.get(*k) != Some(v)).count()
                    + durable.keys().filter(|k| !d.contains_key(*k)).count();
                *d = durable;
            }
        }
        self.stats.names_lost += names_lost as u64;
        // Whatever no name reaches any more is gone; link counts follow.
        let mut reachable = BTreeSet::from([INodeNo::ROOT.0]);
        let mut todo = vec![INodeNo::ROOT.0];
        while let Some(ino) = todo.pop() {
            if let Some(Node {
                kind: Kind::Dir(d), ..
            }) = self.nodes.get(&ino)
            {
                for &child in d.values() {
                    if reachable.insert(child) {
                        todo.push(child);
                    }
                }
            }
        }
        self.nodes.retain(|ino, _| reachable.contains(ino));
        let mut links: HashMap<u64, u32> = HashMap::new();
        for n in self.nodes.values() {
            if let Kind::Dir(d) = &n.kind {
                for &child in d.values() {
                    *links.entry(child).or_default() += 1;
                }
            }
        }
        for (ino, n) in self.nodes.iter_mut() {
            n.links = links.get(ino).copied().unwrap_or(1);
            n.opens = 0;
        }
        let State {
            nodes, rng, stats, ..
        } = self;
        stats.cuts += 1;
        for n in nodes.values_mut() {
            let Kind::File(f) = &mut n.kind else { continue };
            let mut keep = std::mem::take(&mut f.durable);
            // The truncates since the last sync reached the disk, or none did.
            match f.shrunk_to.take() {
                Some(to) if rng.below(2) == 1 => {
                    keep.truncate(to as usize);
                    stats.truncates_kept += 1;
                }
                Some(_) => stats.truncates_undone += 1,
                None => {}
            }
            let (cur, base) = (f.data.len() as u64, keep.len() as u64);
            let len = if cur > base {
                base + rng.below(cur - base + 1)
            } else {
                base
            };
            stats.bytes_cut += cur.saturating_sub(len);
            keep.resize(len as usize, 0);
            for &page in &f.dirty {
                let start = page * PAGE;
                if start >= len.min(cur) {
                    continue;
                }
                if rng.below(2) == 1 {
                    let end = (start + PAGE).min(len).min(cur) as usize;
                    keep[start as usize..end].copy_from_slice(&f.data[start as usize..end]);
                    stats.pages_kept += 1;
                } else {
                    stats.pages_lost += 1;
                }
            }
            f.dirty.clear();
            f.data = keep.clone();
            f.durable = keep;
        }
    }
}

struct ForgetfulFs {
    state: Arc<Mutex<State>>,
    /// How long a file sync takes, as on a slow disk: written data stays
    /// unsynced for that long, so a cut usually finds some.
    sync_delay: Duration,
    uid: u32,
    gid: u32,
    at: SystemTime,
}

impl ForgetfulFs {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn attr(&self, st: &State, ino: u64) -> Option<FileAttr> {
        let n = st.nodes.get(&ino)?;
        let (kind, size) = match &n.kind {
            Kind::Dir(_) => (FileType::Directory, 0),
            Kind::File(f) => (FileType::RegularFile, f.data.len() as u64),
            Kind::Socket => (FileType::Socket, 0),
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.at,
            mtime: self.at,
            ctime: self.at,
            crtime: self.at,
            kind,
            perm: n.perm,
            nlink: n.links.max(1),
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    /// Add a new node named `name` under `parent`.
    fn make(&self, parent: u64, name: &OsStr, kind: Kind, perm: u16) -> Result<FileAttr, Errno> {
        let mut st = self.lock();
        st.powered()?;
        if st.dir(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = st.next_ino;
        st.next_ino += 1;
        let opens = u32::from(matches!(kind, Kind::File(_)));
        st.nodes.insert(
            ino,
            Node {
                kind,
                perm,
                links: 1,
                opens,
                lookups: 1,
            },
        );
        st.dir(parent)?.insert(name.to_owned(), ino);
        Ok(self.attr(&st, ino).expect("just made"))
    }
}

fn reply_to(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl ForgetfulFs {
    /// A sync: the device's time first (a power cut while it sleeps finds the
    /// data unsynced, and the sync then fails), then `make_durable` with the
    /// power on.
    fn sync(
        &self,
        make_durable: impl FnOnce(&mut State) -> Result<(), Errno>,
    ) -> Result<(), Errno> {
        std::thread::sleep(self.sync_delay);
        let mut st = self.lock();
        st.powered()?;
        make_durable(&mut st)
    }
}

impl Filesystem for ForgetfulFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // Shared mmap of direct-I/O files: SQLite maps its WAL index (`-shm`).
        config
            .add_capabilities(fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
            .map_err(|_| {
                std::io::Error::other(
                    "this kernel cannot mmap FUSE files opened for direct I/O \
                     (FUSE_DIRECT_IO_ALLOW_MMAP, Linux 6.6 or later): SQLite's WAL index needs it",
                )
            })
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut st = self.lock();
        let found = st
            .dir(parent.0)
            .and_then(|d| d.get(name).copied().ok_or(Errno::ENOENT));
        match found {
            Ok(ino) => {
                if let Some(n) = st.nodes.get_mut(&ino) {
                    n.lookups += 1;
                }
                reply.entry(&TTL, &self.attr(&st, ino).unwrap(), Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut st = self.lock();
        if let Some(n) = st.nodes.get_mut(&ino.0) {
            n.lookups = n.lookups.saturating_sub(nlookup);
        }
        st.drop_if_unused(ino.0);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let st = self.lock();
        match self.attr(&st, ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut st = self.lock();
        if let Err(e) = st.powered() {
            return reply.error(e);
        }
        if let Some(size) = size {
            if size > MAX_FILE {
                return reply.error(Errno::EFBIG);
            }
            // Durable at the next sync (see `cut` for what a cut leaves).
            match st.file(ino.0) {
                Ok(f) => {
                    if size < f.data.len() as u64 {
                        f.shrunk_to = Some(f.shrunk_to.map_or(size, |s| s.min(size)));
                    }
                    f.data.resize(size as usize, 0);
                    f.dirty.retain(|&p| p * PAGE < size);
                }
                Err(e) => return reply.error(e),
            }
        }
        if let (Some(mode), Some(n)) = (mode, st.nodes.get_mut(&ino.0)) {
            n.perm = (mode & 0o7777) as u16;
        }
        match self.attr(&st, ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let perm = (mode & !umask & 0o7777) as u16;
        match self.make(parent.0, name, Kind::Dir(BTreeMap::new()), perm) {
            Ok(a) => {
                // A directory is not held open: `make` counted no handle.
                reply.entry(&TTL, &a, Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    /// Only sockets (a process that binds a Unix socket here, such as the
    /// agent's control socket); other special files are refused.
    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFSOCK {
            return reply.error(Errno::EPERM);
        }
        let perm = (mode & !umask & 0o7777) as u16;
        match self.make(parent.0, name, Kind::Socket, perm) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let perm = (mode & !umask & 0o7777) as u16;
        match self.make(parent.0, name, Kind::File(FileData::default()), perm) {
            Ok(a) => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(a.ino.0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.lock();
        reply_to(
            reply,
            st.powered().and_then(|()| st.unlink(parent.0, name, false)),
        )
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.lock();
        reply_to(
            reply,
            st.powered().and_then(|()| st.unlink(parent.0, name, true)),
        )
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !flags.is_empty() {
            return reply.error(Errno::EINVAL);
        }
        let mut st = self.lock();
        let r = (|| {
            st.powered()?;
            let ino = *st.dir(parent.0)?.get(name).ok_or(Errno::ENOENT)?;
            st.dir(newparent.0)?;
            if let Some(&old) = st.dir(newparent.0)?.get(newname) {
                if old == ino {
                    return Ok(());
                }
                let is_dir = matches!(st.nodes[&ino].kind, Kind::Dir(_));
                st.unlink(newparent.0, newname, is_dir)?;
            }
            st.dir(parent.0)?.remove(name);
            st.dir(newparent.0)?.insert(newname.to_owned(), ino);
            Ok(())
        })();
        reply_to(reply, r)
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.lock();
        match st.nodes.get_mut(&ino.0) {
            Some(n) if matches!(n.kind, Kind::File(_)) => {
                n.opens += 1;
                reply.opened(FileHandle(ino.0), FopenFlags::FOPEN_DIRECT_IO)
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.lock();
        if let Some(n) = st.nodes.get_mut(&ino.0) {
            n.opens = n.opens.saturating_sub(1);
        }
        st.drop_if_unused(ino.0);
        reply.ok();
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
        let mut st = self.lock();
        match st.file(ino.0) {
            Ok(f) => {
                let start = (offset as usize).min(f.data.len());
                let end = (start + size as usize).min(f.data.len());
                reply.data(&f.data[start..end])
            }
            Err(e) => reply.error(e),
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
        let end = offset + data.len() as u64;
        if end > MAX_FILE {
            return reply.error(Errno::EFBIG);
        }
        let mut st = self.lock();
        if let Err(e) = st.powered() {
            return reply.error(e);
        }
        match st.file(ino.0) {
            Ok(f) => {
                if f.data.len() < end as usize {
                    f.data.resize(end as usize, 0);
                }
                f.data[offset as usize..end as usize].copy_from_slice(data);
                if !data.is_empty() {
                    f.dirty.extend(offset / PAGE..=(end - 1) / PAGE);
                }
                reply.written(data.len() as u32)
            }
            Err(e) => reply.error(e),
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
        // close() makes nothing durable.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_to(
            reply,
            self.sync(|st| {
                let f = st.file(ino.0)?;
                // Bytes past a truncate are zeros or were written (dirty) since.
                if let Some(to) = f.shrunk_to.take() {
                    f.durable.truncate(to as usize);
                }
                f.durable.resize(f.data.len(), 0);
                for &page in &f.dirty {
                    let start = (page * PAGE) as usize;
                    let end = (start + PAGE as usize).min(f.data.len());
                    if start < end {
                        f.durable[start..end].copy_from_slice(&f.data[start..end]);
                    }
                }
                f.dirty.clear();
                Ok(())
            }),
        )
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_to(
            reply,
            self.sync(|st| {
                let d = st.dir(ino.0)?.clone();
                st.durable_names.insert(ino.0, d);
                Ok(())
            }),
        )
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut st = self.lock();
        let entries: Vec<(u64, OsString)> = match st.dir(ino.0) {
            Ok(d) => d.iter().map(|(n, &i)| (i, n.clone())).collect(),
            Err(e) => return reply.error(e),
        };
        let mut all = vec![
            (ino.0, FileType::Directory, OsString::from(".")),
            (ino.0, FileType::Directory, OsString::from("..")),
        ];
        for (i, name) in entries {
            let kind = match st.nodes[&i].kind {
                Kind::Dir(_) => FileType::Directory,
                Kind::File(_) => FileType::RegularFile,
                Kind::Socket => FileType::Socket,
            };
            all.push((i, kind, name));
        }
        for (k, (i, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), k as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = MAX_FILE * 16 / PAGE;
        reply.statfs(
            blocks,
            blocks,
            blocks,
            1 << 20,
            1 << 20,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }
}

/// A mounted forgetful file system. Drop it after every process using it has
/// exited (declare it before the `Cluster`): dropping unmounts it.
pub struct Forgetful {
    /// Where it is mounted.
    pub root: PathBuf,
    state: Arc<Mutex<State>>,
    // Unmounted when dropped, before the directory below is removed.
    served: super::fusemount::Served,
    _dir: tempfile::TempDir,
}

impl Forgetful {
    /// Mount an empty forgetful file system; `seed` drives which unsynced
    /// pages a cut keeps; every file sync takes `sync_delay`.
    pub fn mount(seed: u64, sync_delay: Duration) -> Forgetful {
        let dir = tempfile::Builder::new()
            .prefix("tidemark-forgetful-")
            .tempdir()
            .unwrap();
        let root = dir.path().join("mnt");
        std::fs::create_dir(&root).unwrap();
        let mut nodes = HashMap::new();
        nodes.insert(
            INodeNo::ROOT.0,
            Node {
                kind: Kind::Dir(BTreeMap::new()),
                perm: 0o755,
                links: 1,
                opens: 0,
                lookups: 1,
            },
        );
        let state = Arc::new(Mutex::new(State {
            nodes,
            next_ino: INodeNo::ROOT.0 + 1,
            rng: Prng::new(seed),
            stats: CutStats::default(),
            off: false,
            durable_names: HashMap::new(),
        }));
        let fs = ForgetfulFs {
            state: state.clone(),
            sync_delay,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            at: SystemTime::now(),
        };
        let served =
            super::fusemount::serve(fs, &root, "tidemark-forgetful", "forgetful file system");
        Forgetful {
            root,
            state,
            served,
            _dir: dir,
        }
    }

    /// A path inside the mount.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.root.join(rel)
    }

    /// Lose power: at this instant every file keeps its synced content and a
    /// random part of what was written since (see the module's doc), and until
    /// [`Forgetful::power_on`] every change or sync fails with EIO (a sync that
    /// was in progress included). Kill the writers, then power on.
    pub fn power_off(&self) -> CutStats {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.off = true;
        st.cut();
        st.stats
    }

    /// Power back: changes and syncs work again.
    pub fn power_on(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).off = false;
    }

    /// What the cuts so far did.
    pub fn stats(&self) -> CutStats {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).stats
    }
}
