//! The durable spool: per consistency group, an append-only queue of sealed
//! frames (opaque bytes) in segment files. The relay keeps its queue in one;
//! the target keeps its redo journal in one per group (frames durable before
//! any of their bytes reach a replica; docs/CONSISTENCY.md).
//!
//! * Appends go through a bounded channel to one dedicated writer thread that
//!   group-commits them: write the batch, one `fdatasync` per touched segment, an
//!   fsync of every directory that gained an entry, then complete every append.
//!   Nothing is acknowledged before it is durable.
//! * Per group the spool enforces the frame chain: a frame at or below the head is
//!   a [`AppendOutcome::Duplicate`], a frame that does not name the head as its
//!   predecessor is refused.
//! * [`Spool::open`] recovers after any crash: torn tails are cut, corruption is
//!   reported and never silently dropped ([`RecoveryReport`]).
//! * Memory holds only a 16-byte index entry per untrimmed frame; reads `pread`
//!   the record and re-verify its CRC.
//! * Where the filesystem allows it, segments are written and read with
//!   `O_DIRECT` (probed at open, buffered I/O otherwise): appends then cost a copy
//!   into a reused aligned buffer instead of new page-cache pages.
//!
//! docs/SPOOL.md describes the byte layout, the durability argument and the
//! recovery and trim rules.

mod dio;
mod index;
pub mod record;
mod recovery;
mod reset;
mod segment;
mod state;
mod writer;

#[cfg(test)]
mod direct_tests;
#[cfg(test)]
mod recycle_tests;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, TrySendError};
use nix::fcntl::Flock;
use thiserror::Error;
use tokio::sync::oneshot;

use crate::error::{Classify, ErrorKind};
use index::SpoolIndex;
use record::{FormatVersion, MAX_PAYLOAD, validate_group};
pub use recovery::{GroupRecovery, Problem, ProblemKind, RecoveryReport, TornTail};
pub use reset::{GroupReset, reset_group};
use writer::Cmd;

/// Default segment size before rotation: 64 MiB (few files, cheap whole-file trims).
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Default bound on the payload bytes one group commit takes from the queue.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 8 << 20;
/// Default number of appends the queue holds before [`Spool::append`] throttles.
pub const DEFAULT_QUEUE_DEPTH: usize = 1024;
/// How often [`Spool::read_after`] plans again when trims overtake its plan.
const MAX_READ_PLANS: u32 = 16;
/// Default number of trimmed segment files each group keeps for reuse.
pub const DEFAULT_RECYCLE_SEGMENTS: usize = 2;
/// Largest accepted `recycle_segments`.
pub const MAX_RECYCLE_SEGMENTS: usize = 64;
/// Smallest accepted `segment_bytes`.
pub const MIN_SEGMENT_BYTES: u64 = 4096;
/// Largest accepted `segment_bytes` (record offsets are kept as 32 bits).
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;
/// Name of the lock file in the spool directory (one process per spool).
pub const LOCK_FILE: &str = crate::util::lockfile::LOCK_FILE;

/// Where the spool lives and how it batches.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// Spool directory; one subdirectory per group.
    pub dir: PathBuf,
    /// Rotate to a new segment file when the active one would pass this size.
    pub segment_bytes: u64,
    /// Stop adding appends to a group commit once this many payload bytes are in it.
    pub max_batch_bytes: usize,
    /// Capacity of the append queue.
    pub queue_depth: usize,
    /// Write and read segments with `O_DIRECT` when the filesystem supports it
    /// (probed at open; buffered I/O otherwise). Default false: on the virtual
    /// disks measured so far buffered writes gave more throughput (docs/SPOOL.md).
    pub direct_io: bool,
    /// Trimmed segment files each group keeps for its next segments instead of
    /// deleting them (0: delete at once). Writing over a file the spool wrote
    /// before costs no block allocation and no new page-cache pages, and its
    /// `fdatasync` has no file size to commit (docs/SPOOL.md, "Recycled segment
    /// files"). Each kept file takes up to `segment_bytes` of disk.
    pub recycle_segments: usize,
}

impl SpoolOptions {
    /// Options with the defaults for everything but the directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SpoolOptions {
            dir: dir.into(),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            direct_io: false,
            recycle_segments: DEFAULT_RECYCLE_SEGMENTS,
        }
    }

    fn validate(&self) -> Result<(), SpoolError> {
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return Err(SpoolError::BadOption {
                field: "segment_bytes",
                reason: format!(
                    "{} outside {MIN_SEGMENT_BYTES}..={MAX_SEGMENT_BYTES}",
                    self.segment_bytes
                ),
            });
        }
        if self.max_batch_bytes == 0 {
            return Err(SpoolError::BadOption {
                field: "max_batch_bytes",
                reason: "must be at least 1".into(),
            });
        }
        if self.recycle_segments > MAX_RECYCLE_SEGMENTS {
            return Err(SpoolError::BadOption {
                field: "recycle_segments",
                reason: format!(
                    "{} above the limit of {MAX_RECYCLE_SEGMENTS}",
                    self.recycle_segments
                ),
            });
        }
        if self.queue_depth == 0 {
            return Err(SpoolError::BadOption {
                field: "queue_depth",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// One frame to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendRequest {
    /// Consistency group (1..=32 bytes of `[a-z0-9-]`).
    pub group: String,
    /// Frame number; must be above the group's head.
    pub frame_no: u64,
    /// Predecessor; must equal the head unless the group's head is empty.
    pub prev_frame_no: u64,
    /// Last seq covered by the frame.
    pub last_seq: u64,
    /// The sealed frame, opaque to the spool (shared: the relay keeps recent
    /// frames in memory to forward them without reading them back).
    pub bytes: Arc<Vec<u8>>,
}

/// How an append ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Written and durable.
    Stored,
    /// Already in the spool (frame number at or below the head); nothing written.
    /// The relay acknowledges it again.
    Duplicate,
}

/// The last durably appended frame of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolHead {
    /// Its frame number.
    pub frame_no: u64,
    /// Its last seq.
    pub last_seq: u64,
}

/// A frame read back from the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledFrame {
    /// Frame number.
    pub frame_no: u64,
    /// Predecessor named by the frame.
    pub prev_frame_no: u64,
    /// Last seq covered.
    pub last_seq: u64,
    /// The sealed frame.
    pub bytes: Vec<u8>,
}

/// Size and position of one group's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStats {
    /// Untrimmed frames.
    pub frames: u64,
    /// Bytes of the group's segment files up to the end of their last record
    /// (headers and not yet deleted trimmed records included): what counts
    /// against disk watermarks. Each file may hold up to 4095 more bytes of zero
    /// padding on disk (docs/SPOOL.md, "Padding").
    pub bytes: u64,
    /// First untrimmed frame, if any.
    pub first_frame_no: Option<u64>,
    /// Frames up to this number are trimmed.
    pub trimmed_through: u64,
    /// Last appended frame.
    pub head: Option<SpoolHead>,
    /// Number of segment files.
    pub segments: usize,
}

/// Everything that can go wrong in the spool; each message names the group,
/// frame, file or offset concerned.
#[derive(Debug, Error)]
pub enum SpoolError {
    /// A filesystem operation failed.
    #[error("spool: {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A stored record failed verification on read.
    #[error("spool: corrupt record in {} at offset {offset}: {what}", file.display())]
    Corrupt {
        /// Segment file.
        file: PathBuf,
        /// Offset of the record header.
        offset: u64,
        /// What failed.
        what: String,
    },
    /// A reset named a group the spool directory does not hold.
    #[error("spool: {} holds no group {group:?}", dir.display())]
    UnknownGroup {
        /// The group named.
        group: String,
        /// Spool directory.
        dir: PathBuf,
    },
    /// A group name is not 1..=32 bytes of `[a-z0-9-]`.
    #[error("spool: invalid group name {name:?}: {reason}")]
    InvalidGroup {
        /// The name given.
        name: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// A frame is larger than the record cap.
    #[error(
        "spool: frame {frame_no} of group {group} is {len} bytes, above the {max}-byte record cap"
    )]
    FrameTooLarge {
        /// Group.
        group: String,
        /// Frame number.
        frame_no: u64,
        /// Its size.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A frame names a predecessor at or above itself.
    #[error(
        "spool: frame {frame_no} of group {group} names prev_frame_no {prev_frame_no}, which is not below it"
    )]
    BadPrev {
        /// Group.
        group: String,
        /// Frame number.
        frame_no: u64,
        /// The predecessor it names.
        prev_frame_no: u64,
    },
    /// A frame does not continue the group's chain.
    #[error(
        "spool: chain break in group {group} at frame {frame_no}: expected prev {expected_prev}, got prev {got_prev}"
    )]
    ChainBreak {
        /// Group.
        group: String,
        /// Frame number of the refused frame.
        frame_no: u64,
        /// The head, which the frame should have named.
        expected_prev: u64,
        /// The predecessor it named.
        got_prev: u64,
    },
    /// A trim asked for frames the spool never had.
    #[error("spool: trim of group {group} through frame {frame_no} is beyond its head {head}")]
    TrimBeyondHead {
        /// Group.
        group: String,
        /// Requested trim point.
        frame_no: u64,
        /// Current head (0 when empty).
        head: u64,
    },
    /// The append queue is full; the caller should slow its sender down.
    #[error("spool: append queue full ({depth} appends waiting); retry later")]
    QueueFull {
        /// Queue capacity.
        depth: usize,
    },
    /// The spool was shut down.
    #[error("spool: shut down")]
    Shutdown,
    /// A file was written by a newer format version.
    #[error("spool: {} has format version {version}; this build reads up to {supported}", file.display())]
    UnsupportedVersion {
        /// The file.
        file: PathBuf,
        /// Its version.
        version: u16,
        /// Newest version this build reads.
        supported: u16,
    },
    /// An option is out of range.
    #[error("spool: option {field}: {reason}")]
    BadOption {
        /// Option name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Another process holds the spool directory.
    #[error("spool: {} is locked by another process", dir.display())]
    Locked {
        /// Spool directory.
        dir: PathBuf,
    },
    /// A group's files could not be restored after a failed write.
    #[error(
        "spool: group {group} refuses appends after a failed write could not be undone ({reason}); restart the relay to recover it"
    )]
    Poisoned {
        /// Group.
        group: String,
        /// What failed.
        reason: String,
    },
}

impl SpoolError {
    /// True when the error is the disk (or the quota) being full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, SpoolError::Io { source, .. } if crate::util::durable::io_no_space(source))
    }

    /// A copy of this error for each append of a failed batch (io::Error is not
    /// Clone: the copy keeps its kind and message).
    fn duplicate(&self) -> SpoolError {
        match self {
            SpoolError::Io { op, path, source } => SpoolError::Io {
                op,
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            SpoolError::Corrupt { file, offset, what } => SpoolError::Corrupt {
                file: file.clone(),
                offset: *offset,
                what: what.clone(),
            },
            SpoolError::Poisoned { group, reason } => SpoolError::Poisoned {
                group: group.clone(),
                reason: reason.clone(),
            },
            other => SpoolError::Io {
                op: "group commit",
                path: PathBuf::new(),
                source: io::Error::other(other.to_string()),
            },
        }
    }
}

impl Classify for SpoolError {
    fn kind(&self) -> ErrorKind {
        match self {
            SpoolError::Io { .. } | SpoolError::Poisoned { .. } => ErrorKind::Io,
            SpoolError::Corrupt { .. }
            | SpoolError::InvalidGroup { .. }
            | SpoolError::FrameTooLarge { .. }
            | SpoolError::BadPrev { .. } => ErrorKind::Corrupt,
            SpoolError::ChainBreak { .. } | SpoolError::TrimBeyondHead { .. } => ErrorKind::Peer,
            SpoolError::QueueFull { .. } => ErrorKind::Throttled,
            SpoolError::Shutdown => ErrorKind::Shutdown,
            SpoolError::UnsupportedVersion { .. }
            | SpoolError::UnknownGroup { .. }
            | SpoolError::BadOption { .. }
            | SpoolError::Locked { .. } => ErrorKind::Config,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Take the spool directory's lock (`util::lockfile`: its `LOCK` file):
/// one process at a time opens or changes a spool.
fn lock_dir(dir: &Path) -> Result<Flock<File>, SpoolError> {
    crate::util::lockfile::lock_dir(dir).map_err(|e| match e {
        crate::util::lockfile::LockError::Locked { dir } => SpoolError::Locked { dir },
        crate::util::lockfile::LockError::Io { path, source } => io_err("lock", &path)(source),
    })
}

fn check_group(name: &str) -> Result<(), SpoolError> {
    validate_group(name).map_err(|reason| SpoolError::InvalidGroup {
        name: name.chars().take(64).collect(),
        reason,
    })
}

/// Decide between direct and buffered I/O for the spool directory, and say which
/// and why (once, at open).
fn choose_io(opts: &SpoolOptions) -> bool {
    let dir = opts.dir.display();
    if !opts.direct_io {
        tracing::info!(dir = %dir, "spool uses buffered I/O: direct_io is off in its options");
        return false;
    }
    match dio::probe(&opts.dir) {
        Ok(()) => {
            tracing::info!(dir = %dir, "spool uses direct I/O (O_DIRECT): appends bypass the page cache");
            true
        }
        Err(e) => {
            tracing::info!(dir = %dir, reason = %e, "spool uses buffered I/O: the filesystem refused O_DIRECT");
            false
        }
    }
}

/// Checks that need no state: group name, size cap, predecessor below the frame.
fn precheck(req: &AppendRequest) -> Result<(), SpoolError> {
    check_group(&req.group)?;
    if req.bytes.len() > MAX_PAYLOAD {
        return Err(SpoolError::FrameTooLarge {
            group: req.group.clone(),
            frame_no: req.frame_no,
            len: req.bytes.len(),
            max: MAX_PAYLOAD,
        });
    }
    if req.prev_frame_no >= req.frame_no {
        return Err(SpoolError::BadPrev {
            group: req.group.clone(),
            frame_no: req.frame_no,
            prev_frame_no: req.prev_frame_no,
        });
    }
    Ok(())
}

struct Shared {
    opts: SpoolOptions,
    /// Segments are written and read with O_DIRECT.
    direct: bool,
    tx: Sender<Cmd>,
    index: Arc<Mutex<SpoolIndex>>,
    closed: AtomicBool,
    writer: Mutex<Option<JoinHandle<()>>>,
    _lock: Flock<File>,
}

impl Shared {
    fn index(&self) -> MutexGuard<'_, SpoolIndex> {
        lock(&self.index)
    }

    fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let handle = lock(&self.writer).take();
        if let Some(h) = handle {
            // Blocks while the queue is full: the writer is draining it.
            let _ = self.tx.send(Cmd::Shutdown);
            if h.join().is_err() {
                tracing::error!(dir = %self.opts.dir.display(), "spool writer thread panicked");
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Lock a mutex, ignoring poisoning: the protected data is only changed by code
/// that cannot panic half-way through an update.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Handle to an open spool; cheap to clone, shareable across threads.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Shared>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.inner.opts.dir)
            .finish_non_exhaustive()
    }
}

impl Spool {
    /// Open (creating if needed) the spool in `opts.dir`, recover every group and
    /// start the writer thread. Blocking: run it on a blocking thread.
    pub fn open(opts: SpoolOptions) -> Result<(Spool, RecoveryReport), SpoolError> {
        opts.validate()?;
        let dir = opts.dir.clone();
        crate::util::durable::create_dir_durable(&dir).map_err(io_err("create directory", &dir))?;
        let lock_guard = lock_dir(&dir)?;

        let direct = choose_io(&opts);
        let rec = recovery::recover(&dir, direct)?;
        let index = Arc::new(Mutex::new(rec.index));
        let (tx, rx) = crossbeam_channel::bounded(opts.queue_depth);
        let w = writer::Writer::new(
            dir.clone(),
            opts.segment_bytes,
            opts.max_batch_bytes,
            direct,
            rec.writer_groups,
            Arc::clone(&index),
            rx,
        );
        let handle = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || w.run())
            .map_err(io_err("spawn writer thread for", &dir))?;
        let shared = Shared {
            opts,
            direct,
            tx,
            index,
            closed: AtomicBool::new(false),
            writer: Mutex::new(Some(handle)),
            _lock: lock_guard,
        };
        Ok((
            Spool {
                inner: Arc::new(shared),
            },
            rec.report,
        ))
    }

    /// The options the spool was opened with.
    pub fn options(&self) -> &SpoolOptions {
        &self.inner.opts
    }

    /// True when segments are written and read with `O_DIRECT`; false when the
    /// spool uses buffered I/O (disabled by [`SpoolOptions::direct_io`], or the
    /// filesystem refused direct I/O at open).
    pub fn direct_io(&self) -> bool {
        self.inner.direct
    }

    /// Queue an append; the receiver completes once the record is durable
    /// (fdatasync), or with the reason it was refused. Never blocks: when the
    /// queue is full it completes at once with [`SpoolError::QueueFull`]
    /// (kind Throttled), so it is safe to call from async code.
    pub fn append(
        &self,
        req: AppendRequest,
    ) -> oneshot::Receiver<Result<AppendOutcome, SpoolError>> {
        let (tx, rx) = oneshot::channel();
        if let Err(e) = precheck(&req) {
            let _ = tx.send(Err(e));
            return rx;
        }
        if self.inner.closed.load(Ordering::SeqCst) {
            let _ = tx.send(Err(SpoolError::Shutdown));
            return rx;
        }
        match self.inner.tx.try_send(Cmd::Append(req, tx)) {
            Ok(()) => {}
            Err(TrySendError::Full(Cmd::Append(_, tx))) => {
                let _ = tx.send(Err(SpoolError::QueueFull {
                    depth: self.inner.opts.queue_depth,
                }));
            }
            Err(TrySendError::Disconnected(Cmd::Append(_, tx))) => {
                let _ = tx.send(Err(SpoolError::Shutdown));
            }
            Err(_) => {}
        }
        rx
    }

    /// Append and wait until the record is durable, waiting for queue space if
    /// needed. Blocking: not for async tasks (use [`Spool::append`]).
    pub fn append_blocking(&self, req: AppendRequest) -> Result<AppendOutcome, SpoolError> {
        precheck(&req)?;
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(SpoolError::Shutdown);
        }
        let (tx, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Cmd::Append(req, tx))
            .map_err(|_| SpoolError::Shutdown)?;
        rx.blocking_recv().unwrap_or(Err(SpoolError::Shutdown))
    }

    /// The group's last durably appended frame, if it ever had one.
    pub fn head(&self, group: &str) -> Option<SpoolHead> {
        self.inner
            .index()
            .groups
            .get(group)
            .and_then(|g| g.head)
            .filter(|h| h.frame_no > 0)
    }

    /// The next frames after `after_frame_no` (and after the trim point), in chain
    /// order: at most `max_count`, stopping before `max_bytes` of payload would be
    /// passed, but at least one when one exists. Every record is re-verified; a
    /// bad one is a `Corrupt` error naming file and offset. Blocking (pread).
    pub fn read_after(
        &self,
        group: &str,
        after_frame_no: u64,
        max_bytes: usize,
        max_count: usize,
    ) -> Result<Vec<SpooledFrame>, SpoolError> {
        check_group(group)?;
        let gdir = self.inner.opts.dir.join(group);
        // A trim may delete a planned segment between planning and opening it:
        // plan again (the trimmed frames are then skipped).
        let mut attempts = 0;
        'plan: loop {
            attempts += 1;
            let plan = match self.inner.index().groups.get(group) {
                Some(g) => g.plan_read(after_frame_no, max_bytes, max_count),
                None => return Ok(Vec::new()),
            };
            let mut files: HashMap<u64, (PathBuf, File)> = HashMap::new();
            let mut reader = segment::RecordReader::new(self.inner.direct);
            let mut out = Vec::with_capacity(plan.len());
            for (seg_first, e) in plan {
                let (path, f) = match files.entry(seg_first) {
                    MapEntry::Occupied(o) => o.into_mut(),
                    MapEntry::Vacant(v) => {
                        let path = gdir.join(segment::segment_file_name(seg_first));
                        // Direct reads when the writer writes directly: a buffered
                        // read racing a direct rewrite of the tail block could
                        // leave a stale page in the page cache.
                        match dio::open_options(self.inner.direct).read(true).open(&path) {
                            Ok(f) => v.insert((path, f)),
                            Err(err)
                                if err.kind() == io::ErrorKind::NotFound
                                    && attempts < MAX_READ_PLANS =>
                            {
                                continue 'plan;
                            }
                            Err(err) => return Err(io_err("open", &path)(err)),
                        }
                    }
                };
                #[cfg(test)]
                read_fault::between_open_and_read(group);
                let (h, bytes) = match reader.read(f, path, u64::from(e.offset), e.frame_no, e.len)
                {
                    Ok(r) => r,
                    // A trim may also hand the segment to the writer for
                    // reuse after it was opened here; the record check then
                    // fails on the new bytes. Plan again if that is what
                    // happened (the frame is trimmed), else it is damage.
                    Err(err) if attempts < MAX_READ_PLANS && self.trimmed(group, e.frame_no) => {
                        tracing::debug!(group, frame_no = e.frame_no, error = %err, "planned frame trimmed while read; planning again");
                        continue 'plan;
                    }
                    Err(err) => return Err(err),
                };
                out.push(SpooledFrame {
                    frame_no: h.frame_no,
                    prev_frame_no: h.prev_frame_no,
                    last_seq: h.last_seq,
                    bytes,
                });
            }
            return Ok(out);
        }
    }

    /// True when the group's frames up to `frame_no` are trimmed.
    fn trimmed(&self, group: &str, frame_no: u64) -> bool {
        self.inner
            .index()
            .groups
            .get(group)
            .is_some_and(|g| g.trimmed_through >= frame_no)
    }

    /// Drop frames up to `frame_no` (the target acknowledged them): reads stop
    /// returning them at once, the trim point and head are persisted (state file,
    /// atomic), then segments holding only trimmed frames are deleted (never the
    /// active one). Blocking. A trim point beyond the head is refused.
    pub fn trim_through(&self, group: &str, frame_no: u64) -> Result<(), SpoolError> {
        check_group(group)?;
        let trim_lock = {
            let idx = self.inner.index();
            let Some(g) = idx.groups.get(group) else {
                return if frame_no == 0 {
                    Ok(())
                } else {
                    Err(SpoolError::TrimBeyondHead {
                        group: group.to_string(),
                        frame_no,
                        head: 0,
                    })
                };
            };
            let head = g.head.map_or(0, |h| h.frame_no);
            if frame_no > head {
                return Err(SpoolError::TrimBeyondHead {
                    group: group.to_string(),
                    frame_no,
                    head,
                });
            }
            Arc::clone(&g.trim_lock)
        };
        let _serial = lock(&trim_lock);
        let gdir = self.inner.opts.dir.join(group);
        let (new_state, removable) = {
            let mut idx = self.inner.index();
            let Some(g) = idx.groups.get_mut(group) else {
                return Ok(());
            };
            let advanced = frame_no > g.trimmed_through;
            let removable = g.trim(frame_no);
            let head = g.head.unwrap_or(SpoolHead {
                frame_no: 0,
                last_seq: 0,
            });
            let st = state::GroupState {
                trimmed_through: g.trimmed_through,
                head_frame_no: head.frame_no,
                head_last_seq: head.last_seq,
            };
            (advanced.then_some(st), removable)
        };
        if let Some(st) = new_state {
            state::write_state(&gdir, &st)?;
        }
        if removable.is_empty() {
            return Ok(());
        }
        let mut kept_files = Vec::new();
        let mut failed = None;
        for first in &removable {
            let path = gdir.join(segment::segment_file_name(*first));
            // Trims of a group are serial (trim_lock): the files this trim
            // kept so far are the only ones renamed and not yet offered.
            let keep = self.inner.index().groups.get(group).is_some_and(|g| {
                g.free.len() + kept_files.len() < self.inner.opts.recycle_segments
            });
            // A kept file holds acknowledged frames only; whether the rename is
            // durable or not, recovery finds either a fully trimmed segment or a
            // free file, and both are safe to drop or reuse.
            let free_path = gdir.join(segment::free_file_name(*first));
            let kept = keep && fs::rename(&path, &free_path).is_ok();
            if !kept {
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        failed = Some(io_err("delete trimmed segment", &path)(e));
                        break;
                    }
                }
            }
            if let Some(g) = self.inner.index().groups.get_mut(group) {
                g.remove_segment(*first);
            }
            if kept {
                kept_files.push(free_path);
            }
            tracing::debug!(group, file = %path.display(), kept, "trimmed segment removed");
        }
        let synced = state::fsync_dir(&gdir);
        // A free file is offered to the writer only once its new name is
        // durable: the writer rewrites its header, and a rename lost at a power
        // cut would otherwise leave a segment whose header names another frame.
        if synced.is_ok()
            && let Some(g) = self.inner.index().groups.get_mut(group)
        {
            g.free.append(&mut kept_files);
        }
        match failed {
            Some(e) => Err(e),
            None => synced,
        }
    }

    /// Names of all groups the spool knows, sorted.
    pub fn groups(&self) -> Vec<String> {
        self.inner.index().groups.keys().cloned().collect()
    }

    /// Size and position of one group's queue.
    pub fn stats(&self, group: &str) -> Option<GroupStats> {
        let idx = self.inner.index();
        let g = idx.groups.get(group)?;
        Some(GroupStats {
            frames: g.frames,
            bytes: g.disk_bytes,
            first_frame_no: g.first_frame_no(),
            trimmed_through: g.trimmed_through,
            head: g.head.filter(|h| h.frame_no > 0),
            segments: g.segments.len(),
        })
    }

    /// Logical bytes of all segment files (each file may add under 4 KiB of
    /// padding): what the relay compares with its watermark.
    pub fn total_bytes(&self) -> u64 {
        self.inner.index().total_bytes()
    }

    /// Untrimmed frames across all groups; the index costs 16 bytes for each, so
    /// the relay can bound the spool's memory as well as its disk use.
    pub fn total_frames(&self) -> u64 {
        self.inner.index().groups.values().map(|g| g.frames).sum()
    }

    /// Appends waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.inner.tx.len()
    }

    /// Stop accepting appends, let the writer finish (and fsync) everything queued
    /// before this call, and join it. Later appends fail with
    /// [`SpoolError::Shutdown`]; reads and trims keep working. Blocking.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

/// The format version this build writes.
pub const FORMAT_VERSION: FormatVersion = FormatVersion::CURRENT;

/// Test-only: run code in [`Spool::read_after`] after it opened a planned
/// segment and before it reads from it.
#[cfg(test)]
pub(crate) mod read_fault {
    use std::sync::Mutex;

    type Hook = Box<dyn FnOnce() + Send>;
    static HOOK: Mutex<Option<(String, Hook)>> = Mutex::new(None);

    /// Run `f` once, at the next read of `group`.
    pub fn once(group: &str, f: impl FnOnce() + Send + 'static) {
        *super::lock(&HOOK) = Some((group.to_string(), Box::new(f)));
    }

    pub(super) fn between_open_and_read(group: &str) {
        let hook = {
            let mut h = super::lock(&HOOK);
            match h.as_ref() {
                Some((g, _)) if g == group => h.take(),
                _ => None,
            }
        };
        if let Some((_, f)) = hook {
            f();
        }
    }
}
