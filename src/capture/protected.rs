//! A protected disk: the one internal write path every frontend (and the bench
//! workload) uses.
//!
//! A write is acknowledged only after (1) its extents are in the durable
//! activity log, (2) it reached the backing disk, and (3) capture recorded it
//! (with its bytes, or as a dirty region). Writes to overlapping ranges are
//! serialized by range locks from (2) to (3), so the order in which capture
//! records them is the order in which the disk's content changed. Reads go
//! straight to the backing disk. The drain (copying dirty regions) reads and
//! records under the same range locks, so a copy can never record stale data
//! after a newer write.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AO};

use thiserror::Error;

use super::backing::BackingDisk;
use super::bitmap::RegionBitmap;
use super::dirtylog::{DirtyLog, DirtyLogError, Recovered};
use super::journal::{CaptureError, CaptureJournal, CopyPart, Recorded};
use super::stripes::Stripes;
use crate::error::{Classify, ErrorKind};
use crate::frame::NoteReason;
use crate::frontend::{BlockIo, IoError, IoErrorKind, Op, check_range};
use crate::resync::{BlockDigest, DigestKey, digest_block};

/// What one [`ProtectedDisk::compare_step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompareStep {
    /// Where the next step starts.
    pub next: u64,
    /// Bytes read and compared.
    pub compared: u64,
    /// Bytes of blocks that differed (recorded as M entries).
    pub differing: u64,
}

/// The buffer of one resync or verify step, possibly filled ahead of its turn
/// by [`ProtectedDisk::read_ahead`] (see [`crate::capture::readahead`]).
#[derive(Default)]
pub struct StepBuf {
    buf: Vec<u8>,
    ahead: Option<Ahead>,
    used_ahead: bool,
}

impl StepBuf {
    /// True when the last step that used this buffer took the bytes read
    /// ahead (rather than reading again).
    pub fn used_read_ahead(&self) -> bool {
        self.used_ahead
    }

    /// True when it holds a step read ahead, not yet used.
    pub fn is_read_ahead(&self) -> bool {
        self.ahead.is_some()
    }
}

/// What a [`StepBuf`] read ahead: which step, the range's write stamp at the
/// time, and where the data lies in the buffer.
struct Ahead {
    disk: u16,
    offset: u64,
    len: u64,
    block_size: u64,
    stamp: u64,
    holes: Vec<bool>,
    at: usize,
}

/// Size of the blocks a copy tests for all-zero content.
pub const COPY_BLOCK: usize = 64 * 1024;
/// Bytes a copy reads per range-lock hold.
pub const COPY_CHUNK: usize = 4 * 1024 * 1024;
/// Largest range one zero record covers (the frame format's length is 32 bits).
pub const MAX_ZERO_RECORD: u64 = 1 << 30;
/// Bytes a data record of a copy holds at most (adjacent non-zero blocks merge).
pub const COPY_RECORD: usize = 1024 * 1024;

/// Alignment of the buffers of direct reads.
const DIRECT_ALIGN: usize = crate::util::aligned::BLOCK;

/// Errors of opening or copying a protected disk.
#[derive(Debug, Error)]
pub enum ProtectedError {
    /// The backing disk could not be opened or sized.
    #[error("protected disk {path}: {source}")]
    Open {
        /// Path of the disk.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The dirty log failed.
    #[error("protected disk {path}: {source}")]
    DirtyLog {
        /// Path of the disk.
        path: PathBuf,
        /// Cause.
        source: DirtyLogError,
    },
    /// Reading the backing disk for a copy failed; the region stays dirty.
    #[error("protected disk {path}: reading {len} bytes at offset {offset} for a copy: {source}")]
    CopyRead {
        /// Path of the disk.
        path: PathBuf,
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Cause.
        source: io::Error,
    },
    /// Capture refused a record.
    #[error(transparent)]
    Capture(#[from] CaptureError),
}

impl Classify for ProtectedError {
    fn kind(&self) -> ErrorKind {
        match self {
            ProtectedError::Open { .. }
            | ProtectedError::DirtyLog { .. }
            | ProtectedError::CopyRead { .. } => ErrorKind::Io,
            ProtectedError::Capture(e) => e.kind(),
        }
    }
}

/// What opening a protected disk found.
#[derive(Debug, Clone)]
pub struct OpenReport {
    /// Bytes marked for copying at start.
    pub pending_bytes: u64,
    /// Why (initial copy, unclean stop, left dirty at the last stop, nothing).
    pub reason: String,
}

/// A protected disk. See the module docs.
pub struct ProtectedDisk {
    id: u16,
    backing: BackingDisk,
    journal: Arc<CaptureJournal>,
    log: DirtyLog,
    stripes: Stripes,
    /// Set by [`ProtectedDisk::shut`]: every later write is refused.
    shut: AtomicBool,
    /// Held through a rollover or the clean close: two of them at once (the
    /// roller thread's and a chain gap's) would share the snapshot's
    /// temporary file, and the one that took its bits first could rename them
    /// into place last.
    rollover_lock: std::sync::Mutex<()>,
}

impl ProtectedDisk {
    /// Open the backing disk at `path` as disk `id` of the journal's group, read
    /// its dirty log in `state_dir`, and register it with the journal with the
    /// regions to copy: the whole disk on its first start (when `initial_copy`),
    /// what the log could not vouch for after an unclean stop, what was still
    /// dirty after a clean one.
    pub fn open(
        id: u16,
        path: &Path,
        journal: Arc<CaptureJournal>,
        state_dir: &Path,
        initial_copy: bool,
    ) -> Result<(ProtectedDisk, OpenReport), ProtectedError> {
        let backing = BackingDisk::open(path).map_err(|source| ProtectedError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        // One protector per disk, and never a disk another tidemark process
        // writes as a replica (a failback pointed the wrong way).
        crate::util::exclusive::claim(backing.file(), path).map_err(|source| {
            ProtectedError::Open {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let size = backing.size();
        let dl = |source| ProtectedError::DirtyLog {
            path: path.to_path_buf(),
            source,
        };
        // What a previous run (or anything before protection began) left in
        // the page cache must be on the disk before it is copied from: a copy
        // the replica holds of data the source then loses in a power cut would
        // be in no region a restart resyncs.
        backing.sync().map_err(|e| ProtectedError::Open {
            path: path.to_path_buf(),
            source: io::Error::new(e.kind(), format!("fdatasync before protecting it: {e}")),
        })?;
        let (log, rec) = DirtyLog::open(state_dir, journal.group(), id, size).map_err(dl)?;
        let grown_from = rec.grown_from;
        let (pending, cause, reason) = start_regions(&log, rec, initial_copy, size);
        log.mark_open(&pending).map_err(dl)?;
        let shift = log.granularity().shift;
        let pending_bytes = (pending.count() << shift).min(size);
        journal.add_grown_disk(id, size, pending, cause, &reason, grown_from);
        Ok((
            ProtectedDisk {
                id,
                backing,
                journal,
                log,
                stripes: Stripes::new(),
                shut: AtomicBool::new(false),
                rollover_lock: std::sync::Mutex::new(()),
            },
            OpenReport {
                pending_bytes,
                reason,
            },
        ))
    }

    /// The disk id within its group.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The path of the backing disk.
    pub fn path(&self) -> &Path {
        self.backing.path()
    }

    /// The journal this disk records into.
    pub fn journal(&self) -> &Arc<CaptureJournal> {
        &self.journal
    }

    /// The backing disk's size now, when it can be read: above
    /// [`BlockIo::size`] once the disk was grown while this agent runs (the
    /// new space is protected from the agent's next start on).
    pub fn backing_size_now(&self) -> Option<u64> {
        self.backing.current_size().ok()
    }

    /// Activity-log extents held and log writes since start.
    pub fn activity_log_stats(&self) -> (u64, u64) {
        self.log.al_stats()
    }

    /// The write path shared by write, trim and write-zeroes: intent, backing
    /// I/O, record, under the range lock; then FUA.
    #[allow(clippy::too_many_arguments)]
    fn modify<T>(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        fua: bool,
        payload: T,
        io: impl FnOnce(&T) -> io::Result<()>,
        record: impl FnOnce(T) -> Result<Recorded, CaptureError>,
    ) -> Result<Recorded, IoError> {
        check_range(op, offset, len, self.backing.size())?;
        let err = |e: io::Error| IoError::new(op, offset, len, IoErrorKind::Backing(e));
        let gate = self.log.gate();
        if self.shut.load(AO::Acquire) {
            return Err(IoError::new(op, offset, len, IoErrorKind::Shutdown));
        }
        self.log.ensure(offset, len).map_err(|e| {
            tracing::error!(
                disk = self.id,
                "write intent not persisted, {op} refused: {e}"
            );
            let DirtyLogError::Io { source, .. } = e;
            err(source)
        })?;
        let locks = self.stripes.lock(offset, len);
        // Before the disk changes: a step read ahead of this write is stale.
        locks.bump();
        if let Err(e) = io(&payload) {
            // Part of the range may have reached the disk: copy it again later.
            let why = format!(
                "backing {op} failed at offset {offset} ({len} bytes): {e}; the region is kept for resync"
            );
            tracing::error!(disk = self.id, path = %self.path().display(), "{why}");
            self.journal
                .mark_pending(self.id, offset, len, NoteReason::BackingWriteFailure, &why);
            return Err(err(e));
        }
        let recorded = match record(payload) {
            Ok(r) => r,
            Err(e) => {
                let why = format!(
                    "{op} at offset {offset} reached the disk but was not captured ({e}); the region is kept for resync"
                );
                tracing::warn!(disk = self.id, "{why}");
                self.journal
                    .mark_pending(self.id, offset, len, NoteReason::BitmapCatchUp, &why);
                Recorded::Dirty
            }
        };
        drop(locks);
        drop(gate);
        if fua {
            self.sync_backing().map_err(err)?;
        }
        Ok(recorded)
    }

    /// Write `data` at `offset`; returns how capture kept it.
    pub fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<Recorded, IoError> {
        let len = data.len() as u64;
        // The bytes go to the disk first, then (moved) into the journal.
        self.modify(
            Op::Write,
            offset,
            len,
            fua,
            data,
            |d| self.backing.pwrite(offset, d),
            |d| self.journal.record_write(self.id, offset, d),
        )
    }

    fn zero(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<Recorded, IoError> {
        self.modify(
            op,
            offset,
            len,
            fua,
            (),
            |_| self.backing.zero(offset, len, may_unmap),
            |_| self.journal.record_zero(self.id, offset, len),
        )
    }

    /// Copy dirty regions from `offset` towards `end` (a pending run): read at
    /// most [`COPY_CHUNK`] of data (holes of a sparse file are skipped without
    /// reading, all-zero blocks become zero ranges), record it as M entries and
    /// clear its pending regions. Returns where the copy got to, or `None` when
    /// the group stopped draining.
    pub fn copy_step(
        &self,
        offset: u64,
        end: u64,
        buf: &mut Vec<u8>,
    ) -> Result<Option<u64>, ProtectedError> {
        let end = end.min(self.backing.size());
        // A hole: one zero range up to the next data, no read. The hole is
        // looked for again under the range locks: a write that filled part of
        // it in between would otherwise be recorded before a zero range that
        // erases it on the replica.
        let mut next_data = self.backing.next_data(offset).unwrap_or(offset);
        #[cfg(test)]
        copy_hook::run(self);
        let (stop, _locks) = loop {
            let stop = if next_data > offset {
                next_data.min(end).min(offset + MAX_ZERO_RECORD)
            } else {
                (offset + COPY_CHUNK as u64).min(end)
            };
            let locks = self.stripes.lock(offset, stop - offset);
            if next_data <= offset {
                break (stop, locks);
            }
            let again = self.backing.next_data(offset).unwrap_or(offset);
            if again >= stop {
                break (stop, locks);
            }
            drop(locks);
            next_data = again;
        };
        let len = stop - offset;
        let mut parts = Vec::new();
        if next_data > offset {
            parts.push(CopyPart::Zero(offset, len));
        } else {
            self.read_for_copy(offset, len, buf)?;
            split_copy(offset, buf, &mut parts);
        }
        let recorded = self.journal.record_copy(self.id, offset, len, parts)?;
        Ok(recorded.then_some(stop))
    }

    /// Checksum resync of one step: under the range locks, read
    /// `offset..end` (block-aligned, at most [`COPY_CHUNK`]), digest each
    /// block of `block_size` bytes and record as M entries only the blocks
    /// whose digest differs from the target's (`target[i]` is the block at
    /// `offset + i × block_size`); clear the step's pending regions. `None`
    /// when the group stopped draining. Blocks wholly in holes of the
    /// backing file are not read: they equal a target block that reads as
    /// zeros, and are recorded as zero ranges where the target has data.
    /// When `step` holds this very step read ahead ([`read_ahead`](Self::read_ahead))
    /// and no write touched the range since, those bytes are used instead of
    /// reading again.
    ///
    /// Skipping equal blocks is safe although the target's digests are older
    /// than this read: every write the target applies after its read is in
    /// this disk already and is applied again there in seq order, so the
    /// target ends with these bytes (docs/RESYNC.md).
    pub fn compare_step(
        &self,
        offset: u64,
        end: u64,
        block_size: u64,
        target: &[BlockDigest],
        key: &DigestKey,
        step: &mut StepBuf,
    ) -> Result<Option<CompareStep>, ProtectedError> {
        let end = end.min(self.backing.size());
        if offset >= end {
            step.ahead = None;
            return Ok(Some(CompareStep {
                next: end,
                compared: 0,
                differing: 0,
            }));
        }
        let len = end - offset;
        let locks = self.stripes.lock(offset, len);
        let (holes, at) = self.step_data(locks.stamp(), offset, len, block_size, step)?;
        let mut parts = Vec::new();
        let mut differing = 0u64;
        for (i, block) in step.buf[at..at + len as usize]
            .chunks(block_size as usize)
            .enumerate()
        {
            let at = offset + i as u64 * block_size;
            if holes[i] {
                // Not read: reads as zeros, like an Absent or Zero block.
                if target.get(i).is_some_and(BlockDigest::reads_as_zero) {
                    continue;
                }
                differing += block.len() as u64;
                let n = block.len() as u64;
                match parts.last_mut() {
                    Some(CopyPart::Zero(o, l)) if *o + *l == at && *l + n <= MAX_ZERO_RECORD => {
                        *l += n
                    }
                    _ => parts.push(CopyPart::Zero(at, n)),
                }
                continue;
            }
            let same = target
                .get(i)
                .is_some_and(|t| digest_block(key, block).same_data(t));
            if !same {
                differing += block.len() as u64;
                split_copy(at, block, &mut parts);
            }
        }
        let recorded = self.journal.record_copy(self.id, offset, len, parts)?;
        drop(locks);
        Ok(recorded.then_some(CompareStep {
            next: end,
            compared: len,
            differing,
        }))
    }

    /// The digests of the blocks of `offset..end` (block-aligned, at most
    /// [`COPY_CHUNK`]), read under the range locks (so no write is half
    /// done), for an online verify. Records nothing. Blocks wholly in holes
    /// of the backing file are [`BlockDigest::Absent`], not read. A valid
    /// read-ahead in `step` is used as in [`compare_step`](Self::compare_step).
    pub fn digest_step(
        &self,
        offset: u64,
        end: u64,
        block_size: u64,
        key: &DigestKey,
        step: &mut StepBuf,
    ) -> Result<Vec<BlockDigest>, ProtectedError> {
        let end = end.min(self.backing.size());
        if offset >= end {
            step.ahead = None;
            return Ok(Vec::new());
        }
        let len = end - offset;
        let locks = self.stripes.lock(offset, len);
        let (holes, at) = self.step_data(locks.stamp(), offset, len, block_size, step)?;
        drop(locks);
        Ok(step.buf[at..at + len as usize]
            .chunks(block_size as usize)
            .zip(holes)
            .map(|(b, hole)| {
                if hole {
                    BlockDigest::Absent
                } else {
                    digest_block(key, b)
                }
            })
            .collect())
    }

    /// Read the step `offset..end` (as [`compare_step`](Self::compare_step)
    /// and [`digest_step`](Self::digest_step) would) into `step` now, outside
    /// the range locks, so that the I/O overlaps the hashing of the step
    /// before it. The range's write stamp is taken under the locks first;
    /// the step uses these bytes only if the stamp is unchanged when its turn
    /// comes. A failed read leaves `step` empty: the step reads again in its
    /// turn and reports the error there.
    pub fn read_ahead(&self, offset: u64, end: u64, block_size: u64, step: &mut StepBuf) {
        step.ahead = None;
        step.used_ahead = false;
        let end = end.min(self.backing.size());
        if offset >= end {
            return;
        }
        let len = end - offset;
        let stamp = self.stripes.lock(offset, len).stamp();
        if let Ok((holes, at)) = self.read_data_blocks(offset, len, block_size, &mut step.buf) {
            step.ahead = Some(Ahead {
                disk: self.id,
                offset,
                len,
                block_size,
                stamp,
                holes,
                at,
            });
        }
    }

    /// The data of a step, under its range locks (whose stamp is `stamp`):
    /// what `step` read ahead if it is this step and unchanged since, else
    /// read now. Returns the holes and where the range starts in `step.buf`.
    fn step_data(
        &self,
        stamp: u64,
        offset: u64,
        len: u64,
        block_size: u64,
        step: &mut StepBuf,
    ) -> Result<(Vec<bool>, usize), ProtectedError> {
        match step.ahead.take() {
            Some(a)
                if a.disk == self.id
                    && a.offset == offset
                    && a.len == len
                    && a.block_size == block_size
                    && a.stamp == stamp =>
            {
                step.used_ahead = true;
                Ok((a.holes, a.at))
            }
            _ => {
                step.used_ahead = false;
                self.read_data_blocks(offset, len, block_size, &mut step.buf)
            }
        }
    }

    /// Read `offset..offset+len` (`offset` a multiple of `block_size`) into
    /// `buf[at..at + len]`, except the blocks of `block_size` that lie wholly
    /// in holes of the backing file (`SEEK_DATA`/`SEEK_HOLE`; a block device
    /// has none): those read as zeros without I/O, and their bytes in `buf`
    /// are left as they were. Returns, per block, whether it is such a hole,
    /// and `at`: where in `buf` the range starts, chosen so that the reads
    /// can bypass the page cache ([`BackingDisk::pread_direct`]). Either the
    /// caller holds the range locks, so no write fills a hole in between, or
    /// it took the range's stamp before and checks it after.
    fn read_data_blocks(
        &self,
        offset: u64,
        len: u64,
        block_size: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(Vec<bool>, usize), ProtectedError> {
        let bs = block_size.max(1);
        // A Vec<u8> has no alignment to ask for: take an aligned window of a
        // slightly longer one.
        buf.resize(len as usize + DIRECT_ALIGN, 0);
        let at = match buf.as_ptr().align_offset(DIRECT_ALIGN) {
            a if a < DIRECT_ALIGN => a,
            _ => 0,
        };
        let buf = &mut buf[at..at + len as usize];
        let blocks = len.div_ceil(bs) as usize;
        let mut holes = vec![true; blocks];
        for (lo, hi) in self.backing.data_ranges(offset, offset + len) {
            if lo >= hi {
                continue;
            }
            let (b0, b1) = ((lo - offset) / bs, (hi - 1 - offset) / bs + 1);
            holes[b0 as usize..(b1 as usize).min(blocks)].fill(false);
        }
        // Read each run of blocks that hold data with one pread.
        let mut b = 0usize;
        while b < blocks {
            if holes[b] {
                b += 1;
                continue;
            }
            let run = holes[b..].iter().take_while(|h| !**h).count();
            let lo = b as u64 * bs;
            let hi = ((b + run) as u64 * bs).min(len);
            self.backing
                .pread_direct(offset + lo, &mut buf[lo as usize..hi as usize])
                .map_err(|source| ProtectedError::CopyRead {
                    path: self.path().to_path_buf(),
                    offset: offset + lo,
                    len: (hi - lo) as usize,
                    source,
                })?;
            b += run;
        }
        Ok((holes, at))
    }

    fn read_for_copy(
        &self,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), ProtectedError> {
        buf.resize(len as usize, 0);
        self.backing
            .pread(offset, buf)
            .map_err(|source| ProtectedError::CopyRead {
                path: self.path().to_path_buf(),
                offset,
                len: len as usize,
                source,
            })
    }

    /// Rollover of the dirty log: snapshot what is not vouched for, persist it,
    /// retire idle extents of the activity log. `checkpoint` runs between
    /// taking the snapshot and writing it: the agent records there how far the
    /// relay had acknowledged, so a persisted snapshot never clears a region
    /// whose frames are newer than the recorded acknowledgement.
    pub fn rollover(
        &self,
        checkpoint: &dyn Fn() -> Result<(), DirtyLogError>,
    ) -> Result<(), DirtyLogError> {
        let _one = self.rollover_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.log.backing_sync_due() {
            self.sync_backing()
                .map_err(|source| self.backing_sync_error(source))?;
        }
        let freeze = self.log.freeze();
        let bits = self.journal.dirty_regions(self.id);
        let grown_from = self.journal.unannounced_growth(self.id);
        drop(freeze);
        if let Some(bits) = bits {
            self.log.set_grown_from(grown_from);
            checkpoint()?;
            self.log.write_snapshot(&bits, false)?;
            self.log.retire()?;
        }
        Ok(())
    }

    /// Refuse every write from now on (`ESHUTDOWN`), once the writes in flight
    /// are recorded: what [`close_clean`](Self::close_clean) then persists is
    /// final.
    pub fn shut(&self) {
        let _g = self.log.exclusive();
        self.shut.store(true, AO::Release);
    }

    /// `fdatasync` the backing disk, and tell the dirty log which writes that
    /// made durable (the extents they touched may then leave the activity log).
    fn sync_backing(&self) -> io::Result<()> {
        let epoch = self.log.epoch();
        if let Err(e) = self.backing.sync() {
            tracing::error!(disk = self.id, path = %self.path().display(), "fdatasync of the backing disk failed ({e}): every extent stays in the activity log until the next start, which resyncs them");
            self.log.note_backing_sync_failed();
            return Err(e);
        }
        self.log.note_backing_synced(epoch);
        Ok(())
    }

    fn backing_sync_error(&self, source: io::Error) -> DirtyLogError {
        DirtyLogError::Io {
            path: self.path().to_path_buf(),
            op: "fdatasync the backing disk of",
            source,
        }
    }

    /// Orderly stop (after [`shut`](Self::shut)): make every write durable on
    /// the backing disk (a clean snapshot leaves the activity log unread at the
    /// next start), then persist what still needs a copy at the next start as
    /// a clean snapshot. Returns its bytes.
    pub fn close_clean(&self) -> Result<u64, DirtyLogError> {
        let _one = self.rollover_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.sync_backing()
            .map_err(|source| self.backing_sync_error(source))?;
        let bits = self
            .journal
            .final_dirty_regions(self.id)
            .unwrap_or_else(|| RegionBitmap::new(self.log.regions()));
        self.log
            .set_grown_from(self.journal.unannounced_growth(self.id));
        self.log.close_clean(&bits)?;
        Ok((bits.count() << self.log.granularity().shift).min(self.backing.size()))
    }
}

/// The regions to copy at start, and why.
fn start_regions(
    log: &DirtyLog,
    rec: Recovered,
    initial_copy: bool,
    size: u64,
) -> (RegionBitmap, NoteReason, String) {
    let shift = log.granularity().shift;
    let bytes = |b: &RegionBitmap| (b.count() << shift).min(size);
    if let Some(why) = &rec.fallback {
        tracing::warn!("dirty log unusable ({why}): the whole disk is copied again");
        return (
            rec.dirty,
            NoteReason::UncleanStop,
            format!("dirty log unusable ({why}): copying the whole disk"),
        );
    }
    if !rec.found {
        if initial_copy {
            let mut all = RegionBitmap::new(log.regions());
            all.set_range(0, log.regions());
            return (
                all,
                NoteReason::InitialCopy,
                format!("initial copy of {size} bytes"),
            );
        }
        return (
            rec.dirty,
            NoteReason::InitialCopy,
            "initial copy skipped (initial_copy = false)".into(),
        );
    }
    if let Some(old) = rec.grown_from {
        let n = bytes(&rec.dirty);
        let why = format!(
            "the disk grew from {old} to {size} bytes while the agent was stopped: the replica grows first; comparing the {} new bytes and what the {} dirty log held ({n} bytes in all)",
            size - old,
            if rec.was_clean {
                "orderly stop's"
            } else {
                "unclean stop's"
            }
        );
        return (rec.dirty, NoteReason::DiskGrown, why);
    }
    if rec.was_clean {
        let n = bytes(&rec.dirty);
        let why = if n == 0 {
            "stopped in order with nothing left to copy".to_string()
        } else {
            format!("{n} bytes left dirty at the last orderly stop")
        };
        // Left dirty at an orderly stop: writes the relay never acknowledged,
        // or regions capture had degraded to: a catch-up.
        return (rec.dirty, NoteReason::BitmapCatchUp, why);
    }
    let n = bytes(&rec.dirty);
    let why = format!(
        "the previous run did not stop in order: resyncing {n} bytes the dirty log cannot vouch for ({} activity-log extents of {} MiB)",
        rec.al_extents,
        log.extent_bytes() >> 20
    );
    (rec.dirty, NoteReason::UncleanStop, why)
}

/// Split `buf` (read at `offset`) into zero ranges and data records.
fn split_copy(offset: u64, buf: &[u8], parts: &mut Vec<CopyPart>) {
    let mut zero: Option<(u64, u64)> = None;
    let mut data: Option<(u64, Vec<u8>)> = None;
    for (i, block) in buf.chunks(COPY_BLOCK).enumerate() {
        let at = offset + (i * COPY_BLOCK) as u64;
        if is_zero(block) {
            if let Some((o, d)) = data.take() {
                parts.push(CopyPart::Data(o, d));
            }
            zero = Some(match zero {
                Some((o, l)) => (o, l + block.len() as u64),
                None => (at, block.len() as u64),
            });
            continue;
        }
        if let Some((o, l)) = zero.take() {
            parts.push(CopyPart::Zero(o, l));
        }
        match &mut data {
            Some((_, d)) if d.len() + block.len() <= COPY_RECORD => d.extend_from_slice(block),
            _ => {
                if let Some((o, d)) = data.take() {
                    parts.push(CopyPart::Data(o, d));
                }
                data = Some((at, block.to_vec()));
            }
        }
    }
    if let Some((o, d)) = data {
        parts.push(CopyPart::Data(o, d));
    }
    if let Some((o, l)) = zero {
        parts.push(CopyPart::Zero(o, l));
    }
}

pub use crate::util::zero::is_zero;

/// Test-only: run code between a copy step's hole lookup and its range locks
/// (a writer that gets in between).
#[cfg(test)]
pub(crate) mod copy_hook {
    use std::cell::RefCell;

    use super::ProtectedDisk;

    type Hook = Box<dyn FnMut(&ProtectedDisk)>;

    thread_local! {
        static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Call `f` at that point of every copy step on this thread, until cleared.
    pub fn set(f: Option<Hook>) {
        HOOK.with(|h| *h.borrow_mut() = f);
    }

    pub(super) fn run(d: &ProtectedDisk) {
        let hook = HOOK.with(|h| h.borrow_mut().take());
        if let Some(mut f) = hook {
            f(d);
            HOOK.with(|h| {
                let mut slot = h.borrow_mut();
                if slot.is_none() {
                    *slot = Some(f);
                }
            });
        }
    }
}

impl BlockIo for ProtectedDisk {
    fn size(&self) -> u64 {
        self.backing.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let len = buf.len() as u64;
        check_range(Op::Read, offset, len, self.backing.size())?;
        self.backing
            .pread(offset, buf)
            .map_err(|e| IoError::new(Op::Read, offset, len, IoErrorKind::Backing(e)))
    }

    fn write_at(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), IoError> {
        self.write(offset, data, fua).map(|_| ())
    }

    fn flush(&self) -> Result<(), IoError> {
        self.sync_backing()
            .map_err(|e| IoError::new(Op::Flush, 0, 0, IoErrorKind::Backing(e)))
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), IoError> {
        self.zero(Op::Trim, offset, len, true, fua).map(|_| ())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), IoError> {
        self.zero(Op::WriteZeroes, offset, len, may_unmap, fua)
            .map(|_| ())
    }
}

#[cfg(test)]
#[path = "protected_tests.rs"]
mod tests;
