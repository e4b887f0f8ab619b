//! The persisted dirty state of one protected disk: a bitmap snapshot and an
//! activity log, which together always cover every region whose writes might not
//! be durable at the relay (invariant 1).
//!
//! - The **snapshot** (`<group>.disk<ID>.dirty`) holds the region bitmap of
//!   everything not yet vouched for (regions to resync plus regions captured but
//!   not yet acknowledged), and a clean flag that only an orderly stop sets. It is
//!   replaced atomically (temporary file, fsync, rename, fsync of the directory)
//!   at every rollover, every [`ROLLOVER`] by default.
//! - The **activity log** (`<group>.disk<ID>.al`) is a write-intent log of coarse
//!   extents (4 MiB, or 1024 regions when regions are coarser): a write to an
//!   extent that is not in the durable log waits until the log, with that extent,
//!   is written and fdatasync'd, *before* the write goes to the backing disk. So a
//!   crash at any instant (process or power) leaves every written-but-unvouched
//!   region inside an extent of the log. Extents touched in the current or the
//!   previous rollover period stay in the log; writes to them cost nothing more.
//!   Group commit: concurrent writers share one log write.
//! - An extent also stays in the log until a **sync of the backing disk** that
//!   began after its last write has completed ([`DirtyLog::note_backing_synced`]):
//!   a write the relay holds but the protected machine's own disk lost in a power
//!   cut would otherwise leave the replica with data the source no longer has,
//!   in a region no restart resyncs. The application's flushes provide those
//!   syncs; the rollover adds one when none came for
//!   [`BACKING_SYNC_EPOCHS`] rollovers.
//!
//! After a crash the regions to resync are the snapshot's bits plus every extent
//! of the log; after an orderly stop, only the snapshot's bits. The byte formats
//! and the crash argument are in docs/CAPTURE.md.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use thiserror::Error;

use super::bitmap::{Granularity, PAGE_BITS, PAGE_WORDS, RegionBitmap};
use crate::error::{Classify, ErrorKind};

/// Default period between snapshot rollovers.
pub const ROLLOVER: Duration = Duration::from_secs(2);
/// Rollovers without a sync of the backing disk after which the rollover syncs
/// it itself, so idle extents can leave the activity log: 15 (30 s at the
/// default period, the age at which Linux writes dirty pages back anyway,
/// `vm.dirty_expire_centisecs`).
pub const BACKING_SYNC_EPOCHS: u32 = 15;
/// Smallest activity-log extent (log2 bytes): 4 MiB.
pub const MIN_EXTENT_SHIFT: u32 = 22;
/// Regions per extent at least (log2): extents are never finer than 1024 regions.
pub const EXTENT_REGIONS_SHIFT: u32 = 10;

const SNAP_MAGIC: &[u8; 8] = b"TIDEBM01";
const AL_MAGIC: &[u8; 8] = b"TIDEAL01";
/// Activity-log slot format version.
const AL_VERSION: u32 = 1;
/// Snapshot format version: 2 adds `grown_from` (header bytes 48..56).
const SNAP_VERSION: u32 = 2;
const HEADER: usize = 64;
const PAGE_BYTES: usize = PAGE_WORDS * 8;
const PAGE_RECORD: usize = 8 + PAGE_BYTES;
const FLAG_CLEAN: u32 = 1;

/// Errors of the dirty log.
#[derive(Debug, Error)]
pub enum DirtyLogError {
    /// A file of the log could not be read, written or synced.
    #[error("dirty log {path}: {op}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Cause.
        source: io::Error,
    },
}

impl Classify for DirtyLogError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Io
    }
}

/// What the persisted state says must be resynced.
#[derive(Debug)]
pub struct Recovered {
    /// Regions the previous run could not vouch for.
    pub dirty: RegionBitmap,
    /// A snapshot existed (false: first start of this disk).
    pub found: bool,
    /// The previous run stopped in order (its snapshot is exact).
    pub was_clean: bool,
    /// Extents of the activity log added to `dirty` (after an unclean stop).
    pub al_extents: u64,
    /// Set when a file was unreadable or did not match the disk: then the whole
    /// disk is marked, and this says why.
    pub fallback: Option<String>,
    /// The disk's size when the log was written, when the disk has grown since:
    /// `dirty` then holds the old log's regions mapped to the new geometry plus
    /// every region from the old end on.
    pub grown_from: Option<u64>,
}

/// The layout a log is written in, which follows from the disk's size: region
/// size, activity-log extent size and count, and the size of one log slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    disk_size: u64,
    gran: Granularity,
    extent_shift: u32,
    n_extents: u64,
    slot_size: u64,
}

impl Geometry {
    fn for_disk(disk_size: u64) -> Geometry {
        let gran = Granularity::for_disk(disk_size);
        let extent_shift = MIN_EXTENT_SHIFT.max(gran.shift + EXTENT_REGIONS_SHIFT);
        let n_extents = disk_size.div_ceil(1 << extent_shift).max(1);
        let slot_size = (HEADER as u64 + n_extents.div_ceil(8)).next_multiple_of(4096);
        Geometry {
            disk_size,
            gran,
            extent_shift,
            n_extents,
            slot_size,
        }
    }

    fn regions(&self) -> u64 {
        self.gran.regions(self.disk_size)
    }
}

struct AlState {
    epoch: u32,
    retain_from: u32,
    /// Every write of an epoch below this one is durable on the backing disk.
    synced_below: u32,
    /// A sync of the backing disk failed: Linux reports a writeback error
    /// once and marks the pages clean, so a later successful sync proves
    /// nothing about writes before it. No extent leaves the log for the rest
    /// of the run; the next start resyncs them all.
    sync_failed: bool,
    tags: Vec<u32>,
    need_gen: Vec<u64>,
    next_gen: u64,
    durable_gen: u64,
    writing: bool,
    writes: u64,
}

/// The dirty log of one disk. See the module docs.
pub struct DirtyLog {
    snap_path: PathBuf,
    al_path: PathBuf,
    al_file: File,
    disk_size: u64,
    gran: Granularity,
    extent_shift: u32,
    n_extents: u64,
    slot_size: u64,
    gate: RwLock<()>,
    al: Mutex<AlState>,
    al_cv: Condvar,
    /// The disk's size before it grew, while the target has not been told
    /// (its disk-grown Note and DiskSize not yet acknowledged by the relay):
    /// persisted in every snapshot, so a restart announces the growth again.
    grown_from: Mutex<Option<u64>>,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> DirtyLogError + 'a {
    move |source| DirtyLogError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

impl DirtyLog {
    /// Open (or create) the log of disk `disk` of `group` in `dir` and read what
    /// the previous run left. Nothing is written yet: call [`mark_open`](Self::mark_open)
    /// with the regions to resync before serving writes.
    pub fn open(
        dir: &Path,
        group: &str,
        disk: u16,
        disk_size: u64,
    ) -> Result<(DirtyLog, Recovered), DirtyLogError> {
        crate::util::durable::create_dir_durable(dir).map_err(io_err(dir, "create directory"))?;
        let Geometry {
            gran,
            extent_shift,
            n_extents,
            slot_size,
            ..
        } = Geometry::for_disk(disk_size);
        let snap_path = dir.join(format!("{group}.disk{disk}.dirty"));
        let al_path = dir.join(format!("{group}.disk{disk}.al"));
        let al_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&al_path)
            .map_err(io_err(&al_path, "open"))?;
        let log = DirtyLog {
            snap_path,
            al_path,
            al_file,
            disk_size,
            gran,
            extent_shift,
            n_extents,
            slot_size,
            gate: RwLock::new(()),
            grown_from: Mutex::new(None),
            al: Mutex::new(AlState {
                epoch: 1,
                retain_from: 1,
                synced_below: 1,
                sync_failed: false,
                tags: vec![0; n_extents as usize],
                need_gen: vec![0; n_extents as usize],
                next_gen: 1,
                durable_gen: 0,
                writing: false,
                writes: 0,
            }),
            al_cv: Condvar::new(),
        };
        let rec = log.recover()?;
        log.set_grown_from(rec.grown_from);
        Ok((log, rec))
    }

    /// The size before a growth the target has not yet been told of.
    pub fn grown_from(&self) -> Option<u64> {
        *self.grown_from.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Set (or clear, once the relay acknowledged the announcement) the size
    /// before a growth; written with the next snapshot.
    pub fn set_grown_from(&self, from: Option<u64>) {
        *self.grown_from.lock().unwrap_or_else(|p| p.into_inner()) = from;
    }

    /// The region size of this disk's bitmaps.
    pub fn granularity(&self) -> Granularity {
        self.gran
    }

    /// Number of regions of the disk.
    pub fn regions(&self) -> u64 {
        self.gran.regions(self.disk_size)
    }

    /// Bytes per activity-log extent.
    pub fn extent_bytes(&self) -> u64 {
        1 << self.extent_shift
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            disk_size: self.disk_size,
            gran: self.gran,
            extent_shift: self.extent_shift,
            n_extents: self.n_extents,
            slot_size: self.slot_size,
        }
    }

    fn full(&self) -> RegionBitmap {
        let mut b = RegionBitmap::new(self.regions());
        b.set_range(0, self.regions());
        b
    }

    fn recover(&self) -> Result<Recovered, DirtyLogError> {
        let bytes = match fs::read(&self.snap_path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Recovered {
                    dirty: RegionBitmap::new(self.regions()),
                    found: false,
                    was_clean: false,
                    al_extents: 0,
                    fallback: None,
                    grown_from: None,
                });
            }
            Err(e) => return Err(io_err(&self.snap_path, "read")(e)),
        };
        let fallback = |why: String| Recovered {
            dirty: self.full(),
            found: true,
            was_clean: false,
            al_extents: 0,
            fallback: Some(why),
            grown_from: None,
        };
        // The geometry the log was written in: this disk's, or a smaller
        // disk's when the disk has grown since (a shrunk disk falls back).
        let old = match written_size(&bytes) {
            Some(size) if size < self.disk_size && size > 0 => Geometry::for_disk(size),
            _ => self.geometry(),
        };
        let (mut dirty, was_clean, unannounced) = match Self::parse_snapshot(&old, &bytes) {
            Ok(v) => v,
            Err(why) => {
                let why = if old.disk_size != self.disk_size {
                    format!("written when the disk had {} bytes: {why}", old.disk_size)
                } else {
                    why
                };
                return Ok(fallback(format!("{}: {why}", self.snap_path.display())));
            }
        };
        let mut al_extents = 0;
        if !was_clean {
            match Self::read_al(&self.al_file, &old) {
                Ok(Some(ext)) => {
                    let per = 1u64 << (old.extent_shift - old.gran.shift);
                    for (e, _) in ext.iter().enumerate().filter(|(_, x)| **x) {
                        let start = e as u64 * per;
                        dirty.set_range(start, start + per);
                        al_extents += 1;
                    }
                }
                Ok(None) => {}
                Err(why) => {
                    return Ok(fallback(format!("{}: {why}", self.al_path.display())));
                }
            }
        }
        // A growth found now, or one an earlier run found and could not yet
        // announce (the smaller of the two sizes: the target has that one).
        let mut grown_from = unannounced;
        if old.disk_size != self.disk_size {
            dirty = self.regrid(&old, &dirty);
            grown_from = Some(unannounced.unwrap_or(old.disk_size));
        }
        Ok(Recovered {
            dirty,
            found: true,
            was_clean,
            al_extents,
            fallback: None,
            grown_from,
        })
    }

    /// Map the regions of a log written for the smaller disk `old` onto this
    /// disk's regions (every byte they cover stays covered), and add every
    /// region from the old end on: the grown space is compared in full.
    fn regrid(&self, old: &Geometry, bits: &RegionBitmap) -> RegionBitmap {
        let mut out = RegionBitmap::new(self.regions());
        let mut from = 0;
        while let Some((start, end)) = bits.next_run(from, u64::MAX) {
            let offset = start << old.gran.shift;
            let stop = (end << old.gran.shift).min(old.disk_size);
            if stop > offset {
                let (a, b) = self.gran.span(offset, stop - offset);
                out.set_range(a, b);
            }
            from = end;
        }
        let (a, b) = self
            .gran
            .span(old.disk_size, self.disk_size - old.disk_size);
        out.set_range(a, b);
        out
    }

    /// Parse a snapshot file: its bitmap and clean flag, or why it is unusable.
    fn parse_snapshot(g: &Geometry, b: &[u8]) -> Result<(RegionBitmap, bool, Option<u64>), String> {
        if b.len() < HEADER {
            return Err(format!("{} bytes, shorter than the header", b.len()));
        }
        let h = &b[..HEADER];
        if &h[0..8] != SNAP_MAGIC {
            return Err("bad magic".into());
        }
        let crc = u32_at(h, 60);
        if crc32c::crc32c(&h[..60]) != crc {
            return Err("header checksum mismatch".into());
        }
        let version = u32_at(h, 8);
        if !(1..=SNAP_VERSION).contains(&version) {
            return Err(format!("unknown version {version}"));
        }
        let flags = u32_at(h, 12);
        let size = u64_at(h, 16);
        if size != g.disk_size {
            return Err(format!(
                "written for a disk of {size} bytes, the disk now has {}",
                g.disk_size
            ));
        }
        let shift = u32_at(h, 24);
        if shift != g.gran.shift {
            return Err(format!(
                "granularity 2^{shift}, expected 2^{}",
                g.gran.shift
            ));
        }
        let pages = u32_at(h, 28) as usize;
        let max_pages = g.regions().div_ceil(PAGE_BITS) as usize;
        if pages > max_pages {
            return Err(format!("{pages} pages, at most {max_pages} possible"));
        }
        if b.len() != HEADER + pages * PAGE_RECORD {
            return Err(format!(
                "{} bytes, {pages} pages need {}",
                b.len(),
                HEADER + pages * PAGE_RECORD
            ));
        }
        let mut bm = RegionBitmap::new(g.regions());
        let mut last: Option<u32> = None;
        for (i, rec) in b[HEADER..].chunks_exact(PAGE_RECORD).enumerate() {
            let index = u32_at(rec, 0);
            if last.is_some_and(|l| index <= l) {
                return Err(format!("page record {i}: index {index} out of order"));
            }
            last = Some(index);
            let data = &rec[8..];
            if crc32c::crc32c(data) != u32_at(rec, 4) {
                return Err(format!("page record {i} (page {index}): checksum mismatch"));
            }
            let mut words = [0u64; PAGE_WORDS];
            for (w, c) in words.iter_mut().zip(data.chunks_exact(8)) {
                *w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            }
            if !bm.or_page(index, &words) {
                return Err(format!("page record {i}: page {index} beyond the disk"));
            }
        }
        // Version 2: the size before a growth not yet announced (0: none).
        let grown = if version >= 2 { u64_at(h, 48) } else { 0 };
        if grown != 0 && grown >= size {
            return Err(format!(
                "grown from {grown} bytes, not below the disk's {size}"
            ));
        }
        Ok((bm, flags & FLAG_CLEAN != 0, (grown != 0).then_some(grown)))
    }

    /// The newest valid activity-log slot as one flag per extent; `None` when the
    /// file holds no valid slot (a new file). A slot written for other geometry
    /// is an error.
    fn read_al(file: &File, g: &Geometry) -> Result<Option<Vec<bool>>, String> {
        let mut best: Option<(u64, Vec<bool>)> = None;
        for slot in 0..2u64 {
            let mut buf = vec![0u8; g.slot_size as usize];
            let n =
                read_up_to(file, &mut buf, slot * g.slot_size).map_err(|e| format!("read: {e}"))?;
            if n < HEADER || &buf[0..8] != AL_MAGIC {
                continue;
            }
            let bm_len = u32_at(&buf, 40) as usize;
            if HEADER + bm_len > n {
                continue;
            }
            let mut check = buf[..HEADER + bm_len].to_vec();
            check[48..52].fill(0);
            if crc32c::crc32c(&check) != u32_at(&buf, 48) {
                continue; // a torn slot: the other one is the log
            }
            let (shift, n_ext, generation, size) = (
                u32_at(&buf, 12),
                u64_at(&buf, 16),
                u64_at(&buf, 24),
                u64_at(&buf, 32),
            );
            if shift != g.extent_shift || n_ext != g.n_extents || size != g.disk_size {
                return Err(format!(
                    "slot {slot} was written for other geometry (extent 2^{shift}, {n_ext} extents, disk {size} bytes)"
                ));
            }
            if bm_len as u64 != n_ext.div_ceil(8) {
                return Err(format!("slot {slot}: bitmap of {bm_len} bytes"));
            }
            if best.as_ref().is_some_and(|(g, _)| *g >= generation) {
                continue;
            }
            let bits = (0..n_ext as usize)
                .map(|e| buf[HEADER + e / 8] >> (e % 8) & 1 == 1)
                .collect();
            best = Some((generation, bits));
        }
        Ok(best.map(|(_, b)| b))
    }

    /// Start serving: persist `dirty` (the regions to resync) as an unclean
    /// snapshot and an empty activity log.
    ///
    /// The log file is emptied first: the previous run's slots (of another
    /// geometry when the disk has grown, or of higher generations) would
    /// otherwise outlive this run's first slot. The snapshot already covers
    /// everything they held, and no write is served before this returns, so
    /// a crash with the file empty loses nothing.
    pub fn mark_open(&self, dirty: &RegionBitmap) -> Result<(), DirtyLogError> {
        self.write_snapshot(dirty, false)?;
        self.al_file
            .set_len(0)
            .map_err(io_err(&self.al_path, "truncate"))?;
        let mut st = self.lock_al();
        let generation = st.next_gen;
        st.next_gen += 1;
        let content = vec![0u8; self.n_extents.div_ceil(8) as usize];
        drop(st);
        self.write_al_slot(generation, &content)
            .map_err(io_err(&self.al_path, "write"))?;
        self.lock_al().durable_gen = generation;
        Ok(())
    }

    fn lock_al(&self) -> MutexGuard<'_, AlState> {
        self.al.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Held by a writer from [`ensure`](Self::ensure) until its write is recorded
    /// by capture, so that a rollover's freeze sees every write either recorded
    /// (in the snapshot) or not yet started (in the new epoch).
    pub fn gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Write intent: return once every extent of `offset..offset+len` is in the
    /// durable activity log. Call with [`gate`](Self::gate) held, before the write
    /// reaches the backing disk.
    pub fn ensure(&self, offset: u64, len: u64) -> Result<(), DirtyLogError> {
        let first = offset >> self.extent_shift;
        let end = (((offset + len.max(1) - 1) >> self.extent_shift) + 1).min(self.n_extents);
        let mut st = self.lock_al();
        let mut wait_for = 0;
        for e in first as usize..end as usize {
            let t = st.tags[e];
            if t != 0 && t >= st.retain_from {
                // In the durable log (or about to be): keep it for this epoch.
                st.tags[e] = st.epoch;
                wait_for = wait_for.max(st.need_gen[e]);
            } else {
                st.tags[e] = st.epoch;
                st.need_gen[e] = st.next_gen;
                wait_for = wait_for.max(st.next_gen);
            }
        }
        self.wait_durable(st, wait_for)
    }

    /// Wait until the log write `generation` is durable, writing it (as the group
    /// commit's leader) when no write is in progress.
    fn wait_durable<'a>(
        &'a self,
        mut st: MutexGuard<'a, AlState>,
        generation: u64,
    ) -> Result<(), DirtyLogError> {
        loop {
            if st.durable_gen >= generation {
                return Ok(());
            }
            if st.writing {
                st = self.al_cv.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st.writing = true;
            let this = st.next_gen;
            st.next_gen += 1;
            let mut content = vec![0u8; self.n_extents.div_ceil(8) as usize];
            for (e, &t) in st.tags.iter().enumerate() {
                if t != 0 && t >= st.retain_from {
                    content[e / 8] |= 1 << (e % 8);
                }
            }
            drop(st);
            let r = self.write_al_slot(this, &content);
            st = self.lock_al();
            st.writing = false;
            if r.is_ok() {
                st.durable_gen = this;
                st.writes += 1;
            }
            self.al_cv.notify_all();
            r.map_err(io_err(&self.al_path, "write"))?;
        }
    }

    fn write_al_slot(&self, generation: u64, content: &[u8]) -> io::Result<()> {
        let mut buf = vec![0u8; HEADER + content.len()];
        buf[0..8].copy_from_slice(AL_MAGIC);
        buf[8..12].copy_from_slice(&AL_VERSION.to_le_bytes());
        buf[12..16].copy_from_slice(&self.extent_shift.to_le_bytes());
        buf[16..24].copy_from_slice(&self.n_extents.to_le_bytes());
        buf[24..32].copy_from_slice(&generation.to_le_bytes());
        buf[32..40].copy_from_slice(&self.disk_size.to_le_bytes());
        buf[40..44].copy_from_slice(&(content.len() as u32).to_le_bytes());
        buf[HEADER..].copy_from_slice(content);
        let crc = crc32c::crc32c(&buf);
        buf[48..52].copy_from_slice(&crc.to_le_bytes());
        crate::image::sync::pwrite_all(&self.al_file, &buf, (generation % 2) * self.slot_size)?;
        self.al_file.sync_data()
    }

    /// Wait for every write between its intent and its record to finish, and
    /// hold new ones off while the guard lives.
    pub fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Rollover, step 1: start a new epoch. While the returned guard is held no
    /// write is between its intent and its record; the caller takes the snapshot
    /// bits under it, drops it, then calls [`write_snapshot`](Self::write_snapshot)
    /// and [`retire`](Self::retire).
    pub fn freeze(&self) -> RwLockWriteGuard<'_, ()> {
        let g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        self.lock_al().epoch += 1;
        g
    }

    /// The current epoch. Read it *before* syncing the backing disk, and pass it
    /// to [`note_backing_synced`](Self::note_backing_synced) once the sync is done.
    pub fn epoch(&self) -> u32 {
        self.lock_al().epoch
    }

    /// A sync of the backing disk that began while `epoch` was current has
    /// completed: every write of an earlier epoch is durable there (a write
    /// holds the gate from its intent until after its backing I/O, and an epoch
    /// begins under the exclusive gate).
    pub fn note_backing_synced(&self, epoch: u32) {
        let mut st = self.lock_al();
        st.synced_below = st.synced_below.max(epoch);
    }

    /// A sync of the backing disk failed: from now on no extent leaves the log
    /// (see `sync_failed`).
    pub fn note_backing_sync_failed(&self) {
        self.lock_al().sync_failed = true;
    }

    /// No sync of the backing disk for [`BACKING_SYNC_EPOCHS`] epochs: the
    /// rollover should sync it, or no extent can leave the log.
    pub fn backing_sync_due(&self) -> bool {
        let st = self.lock_al();
        st.epoch.saturating_sub(st.synced_below) >= BACKING_SYNC_EPOCHS
    }

    /// Rollover, step 3 (after the snapshot taken under [`freeze`](Self::freeze)
    /// is durable): drop from the log the extents not touched in this or the
    /// previous epoch and whose writes are durable on the backing disk, and
    /// write it.
    pub fn retire(&self) -> Result<(), DirtyLogError> {
        let mut st = self.lock_al();
        if st.sync_failed {
            return Ok(());
        }
        let from = st.epoch.saturating_sub(1).min(st.synced_below).max(1);
        st.retain_from = st.retain_from.max(from);
        let generation = st.next_gen;
        self.wait_durable(st, generation)
    }

    /// Replace the snapshot with `bits` atomically.
    pub fn write_snapshot(&self, bits: &RegionBitmap, clean: bool) -> Result<(), DirtyLogError> {
        let pages: Vec<_> = bits.pages().collect();
        let mut buf = Vec::with_capacity(HEADER + pages.len() * PAGE_RECORD);
        buf.extend_from_slice(SNAP_MAGIC);
        buf.extend_from_slice(&SNAP_VERSION.to_le_bytes());
        buf.extend_from_slice(&(if clean { FLAG_CLEAN } else { 0 }).to_le_bytes());
        buf.extend_from_slice(&self.disk_size.to_le_bytes());
        buf.extend_from_slice(&self.gran.shift.to_le_bytes());
        buf.extend_from_slice(&(pages.len() as u32).to_le_bytes());
        buf.extend_from_slice(&bits.count().to_le_bytes());
        buf.extend_from_slice(&crate::util::time::now_us().to_le_bytes());
        buf.extend_from_slice(&self.grown_from().unwrap_or(0).to_le_bytes());
        buf.resize(60, 0);
        let crc = crc32c::crc32c(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        for (index, words) in pages {
            let start = buf.len();
            buf.extend_from_slice(&index.to_le_bytes());
            buf.extend_from_slice(&[0; 4]);
            for w in words.iter() {
                buf.extend_from_slice(&w.to_le_bytes());
            }
            let crc = crc32c::crc32c(&buf[start + 8..]);
            buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        }
        let tmp = self.snap_path.with_extension("dirty.tmp");
        let p = &self.snap_path;
        crate::util::durable::replace_file(p, &tmp, &buf).map_err(io_err(p, "replace"))
    }

    /// Orderly stop: `bits` (what is still not vouched for) as a clean snapshot;
    /// the activity log is no longer needed.
    ///
    /// After a failed sync of the backing disk the snapshot is written
    /// unclean, so the next start resyncs the activity log's extents too.
    pub fn close_clean(&self, bits: &RegionBitmap) -> Result<(), DirtyLogError> {
        let clean = !self.lock_al().sync_failed;
        self.write_snapshot(bits, clean)
    }

    /// Extents currently in the activity log, and log writes since open.
    pub fn al_stats(&self) -> (u64, u64) {
        let st = self.lock_al();
        let hot = st
            .tags
            .iter()
            .filter(|&&t| t != 0 && t >= st.retain_from)
            .count();
        (hot as u64, st.writes)
    }
}

/// The disk size a snapshot's header names, if it has a header with the
/// snapshot's magic (its checksum is checked when it is parsed).
fn written_size(b: &[u8]) -> Option<u64> {
    (b.len() >= HEADER && &b[0..8] == SNAP_MAGIC).then(|| u64_at(b, 16))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Read up to `buf.len()` bytes at `offset`; fewer at the end of the file.
fn read_up_to(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn open(dir: &Path, size: u64) -> (DirtyLog, Recovered) {
        DirtyLog::open(dir, "g1", 0, size).unwrap()
    }

    #[test]
    fn first_start_finds_nothing() {
        let d = tempfile::tempdir().unwrap();
        let (_l, r) = open(d.path(), 64 * MIB);
        assert!(!r.found && r.dirty.is_empty() && r.fallback.is_none());
    }

    #[test]
    fn clean_stop_restores_exactly_the_snapshot() {
        let d = tempfile::tempdir().unwrap();
        let (l, _) = open(d.path(), 64 * MIB);
        l.mark_open(&RegionBitmap::new(l.regions())).unwrap();
        l.ensure(0, 4096).unwrap();
        let mut bits = RegionBitmap::new(l.regions());
        bits.set_range(7, 9);
        l.close_clean(&bits).unwrap();
        drop(l);
        let (_l, r) = open(d.path(), 64 * MIB);
        assert!(r.found && r.was_clean);
        assert_eq!(r.dirty.count(), 2);
        assert!(r.dirty.get(7) && r.dirty.get(8));
        assert_eq!(r.al_extents, 0, "a clean stop needs no activity log");
    }

    #[test]
    fn crash_adds_every_extent_written_since_the_snapshot() {
        let d = tempfile::tempdir().unwrap();
        let (l, _) = open(d.path(), 64 * MIB);
        l.mark_open(&RegionBitmap::new(l.regions())).unwrap();
        let g = l.gate();
        l.ensure(5 * MIB, 4096).unwrap(); // extent 1
        l.ensure(9 * MIB - 10, 20).unwrap(); // extent 2 (8..12 MiB)
        drop(g);
        assert_eq!(l.al_stats().0, 2);
        drop(l); // crash: no close
        let (_l, r) = open(d.path(), 64 * MIB);
        assert!(r.found && !r.was_clean);
        assert_eq!(r.al_extents, 2);
        let per = (4 * MIB) / 4096;
        assert_eq!(r.dirty.count(), 2 * per);
        assert!(r.dirty.get(per) && r.dirty.get(2 * per) && !r.dirty.get(0));
    }

    #[test]
    fn rollover_retires_extents_idle_for_two_epochs() {
        let d = tempfile::tempdir().unwrap();
        let (l, _) = open(d.path(), 64 * MIB);
        let empty = RegionBitmap::new(l.regions());
        l.mark_open(&empty).unwrap();
        l.ensure(0, 1).unwrap();
        let writes = l.al_stats().1;
        l.ensure(100, 1).unwrap();
        assert_eq!(l.al_stats().1, writes, "a hot extent costs no log write");
        for _ in 0..2 {
            drop(l.freeze());
            l.write_snapshot(&empty, false).unwrap();
            l.retire().unwrap();
        }
        assert_eq!(
            l.al_stats().0,
            1,
            "its write is not known durable on the disk"
        );
        let e = l.epoch();
        l.note_backing_synced(e);
        drop(l.freeze());
        l.write_snapshot(&empty, false).unwrap();
        l.retire().unwrap();
        assert_eq!(l.al_stats().0, 0);
        // A write after one rollover stays hot without a log write.
        l.ensure(4 * MIB, 1).unwrap();
        l.note_backing_synced(l.epoch() + 1);
        drop(l.freeze());
        l.write_snapshot(&empty, false).unwrap();
        l.retire().unwrap();
        let writes = l.al_stats().1;
        l.ensure(4 * MIB + 1, 1).unwrap();
        assert_eq!(l.al_stats().1, writes);
        assert_eq!(l.al_stats().0, 1);
    }

    #[test]
    fn an_extent_stays_until_a_backing_sync_begun_after_its_write() {
        let d = tempfile::tempdir().unwrap();
        let (l, _) = open(d.path(), 64 * MIB);
        let empty = RegionBitmap::new(l.regions());
        l.mark_open(&empty).unwrap();
        let roll = || {
            drop(l.freeze());
            l.write_snapshot(&empty, false).unwrap();
            l.retire().unwrap();
        };
        l.ensure(0, 1).unwrap(); // epoch 1
        roll();
        // A sync that began in epoch 2 covers epoch 1's write, not later ones.
        let began = l.epoch();
        l.ensure(4 * MIB, 1).unwrap(); // epoch 2
        l.note_backing_synced(began);
        // An older sync noted late never moves it back.
        l.note_backing_synced(1);
        assert!(!l.backing_sync_due());
        roll();
        roll();
        roll();
        assert_eq!(
            l.al_stats().0,
            1,
            "only the extent written after the sync began stays"
        );
        let (_l2, r) = {
            drop(l);
            open(d.path(), 64 * MIB)
        };
        assert_eq!(r.al_extents, 1);
        assert!(r.dirty.get((4 * MIB / 4096) as usize as u64));
        // After a failed sync nothing leaves the log, whatever syncs later.
        let d = tempfile::tempdir().unwrap();
        let (l, _) = open(d.path(), 64 * MIB);
        l.mark_open(&empty).unwrap();
        l.ensure(0, 1).unwrap();
        l.note_backing_sync_failed();
        for _ in 0..3 {
            l.note_backing_synced(l.epoch());
            drop(l.freeze());
            l.write_snapshot(&empty, false).unwrap();
            l.retire().unwrap();
        }
        assert_eq!(l.al_stats().0, 1, "kept after a failed sync");
        // And an orderly stop does not vouch for them.
        l.close_clean(&empty).unwrap();
        drop(l);
        let (_l, r) = open(d.path(), 64 * MIB);
        assert!(!r.was_clean, "a stop after a failed sync is not clean");
        assert_eq!(r.al_extents, 1);
        // With no sync at all, one is due after BACKING_SYNC_EPOCHS rollovers.
        let d = tempfile::tempdir().unwrap();
        let (l, _) = open(d.path(), 64 * MIB);
        l.mark_open(&empty).unwrap();
        for _ in 0..BACKING_SYNC_EPOCHS - 1 {
            drop(l.freeze());
        }
        assert!(!l.backing_sync_due());
        drop(l.freeze());
        assert!(l.backing_sync_due());
    }

    #[test]
    fn torn_or_corrupt_files_fall_back_to_the_whole_disk() {
        let d = tempfile::tempdir().unwrap();
        let (l, _) = open(d.path(), 64 * MIB);
        let mut bits = RegionBitmap::new(l.regions());
        bits.set_range(1, 2);
        l.mark_open(&bits).unwrap();
        drop(l);
        let p = d.path().join("g1.disk0.dirty");
        let mut b = fs::read(&p).unwrap();
        let last = b.len() - 1;
        b[last] ^= 0x40;
        fs::write(&p, &b).unwrap();
        let (l, r) = open(d.path(), 64 * MIB);
        assert_eq!(r.dirty.count(), l.regions());
        let why = r.fallback.unwrap();
        assert!(why.contains("checksum mismatch"), "{why}");
        // Other geometry: the disk shrank.
        l.mark_open(&bits).unwrap();
        drop(l);
        let (_l, r) = open(d.path(), 32 * MIB);
        assert!(r.fallback.unwrap().contains("disk now has"));
    }

    #[test]
    fn a_grown_disk_keeps_the_old_dirty_regions_and_adds_the_new_space() {
        for clean in [true, false] {
            let d = tempfile::tempdir().unwrap();
            // 64 MiB has 4 KiB regions; 1 TiB has coarser ones.
            let old = 64 * MIB;
            let (l, _) = open(d.path(), old);
            let g4k = l.granularity();
            let mut bits = RegionBitmap::new(l.regions());
            bits.set_range(3, 4); // 12..16 KiB
            l.mark_open(&bits).unwrap();
            l.ensure(40 * MIB + 5, 1).unwrap(); // activity-log extent 10 (40..44 MiB)
            if clean {
                l.close_clean(&bits).unwrap();
            }
            drop(l);
            let new = 1 << 40;
            let (l, r) = open(d.path(), new);
            assert!(r.fallback.is_none(), "{:?}", r.fallback);
            assert_eq!(r.grown_from, Some(old));
            assert_eq!(r.was_clean, clean);
            let g = l.granularity();
            assert!(g.shift > g4k.shift, "the grown disk has coarser regions");
            let covered = |offset: u64| r.dirty.get(offset >> g.shift);
            assert!(covered(12 * 1024), "the old dirty region stays marked");
            assert_eq!(
                covered(41 * MIB),
                !clean,
                "the activity log counts after a crash only"
            );
            assert!(!covered(60 * MIB - 1), "clean space stays clean");
            for at in [old, old + 1, 1 << 30, new - 1] {
                assert!(covered(at), "the new space at {at} is compared");
            }
            // The tail is all of it: everything from the old end on.
            let tail = g.regions(new) - (old >> g.shift);
            assert!(r.dirty.count() >= tail);
            let extent = if clean { 0 } else { (4 * MIB) >> g.shift };
            assert_eq!(r.dirty.count(), tail + 1 + extent);
            // The log now persists in the new geometry, with the growth
            // still to announce ...
            l.mark_open(&r.dirty).unwrap();
            drop(l);
            let (l, r2) = open(d.path(), new);
            assert_eq!(r2.grown_from, Some(old));
            assert_eq!(r2.dirty.count(), r.dirty.count());
            // ... until the announcement was acknowledged.
            l.set_grown_from(None);
            l.mark_open(&r2.dirty).unwrap();
            drop(l);
            let (_l, r3) = open(d.path(), new);
            assert_eq!(r3.grown_from, None);
            assert_eq!(r3.dirty.count(), r.dirty.count());
        }
    }

    #[test]
    fn golden_snapshot_v2_header() {
        let d = tempfile::tempdir().unwrap();
        let (l, _) = open(d.path(), 64 * MIB);
        let mut bits = RegionBitmap::new(l.regions());
        bits.set_range(3, 5);
        l.set_grown_from(Some(32 * MIB));
        l.write_snapshot(&bits, true).unwrap();
        let b = fs::read(d.path().join("g1.disk0.dirty")).unwrap();
        // Bytes 40..48 (the time written) vary; the rest is pinned.
        let mut h = b[..HEADER].to_vec();
        h[40..48].fill(0);
        h[60..64].fill(0);
        assert_eq!(
            hex(&h),
            concat!(
                "54494445424d3031020000000100000000000004000000000c00000001000000",
                "0200000000000000000000000000000000000002000000000000000000000000",
            )
        );
        assert_eq!(u32_at(&b, 60), crc32c::crc32c(&b[..60]));
        assert_eq!(b.len(), HEADER + PAGE_RECORD);
        // A version 1 header (no grown_from) still reads.
        let mut v1 = b.clone();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        v1[48..56].fill(0);
        let crc = crc32c::crc32c(&v1[..60]);
        v1[60..64].copy_from_slice(&crc.to_le_bytes());
        let g = Geometry::for_disk(64 * MIB);
        let (bm, clean, grown) = DirtyLog::parse_snapshot(&g, &v1).unwrap();
        assert_eq!((bm.count(), clean, grown), (2, true, None));
        let (_, _, grown) = DirtyLog::parse_snapshot(&g, &b).unwrap();
        assert_eq!(grown, Some(32 * MIB));
        // A grown_from at or above the disk size is refused.
        let mut bad = b.clone();
        bad[48..56].copy_from_slice(&(64 * MIB).to_le_bytes());
        let crc = crc32c::crc32c(&bad[..60]);
        bad[60..64].copy_from_slice(&crc.to_le_bytes());
        let e = DirtyLog::parse_snapshot(&g, &bad).unwrap_err();
        assert!(e.contains("not below"), "{e}");
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn a_torn_log_slot_leaves_the_previous_one() {
        let d = tempfile::tempdir().unwrap();
        let (l, _) = open(d.path(), 64 * MIB);
        l.mark_open(&RegionBitmap::new(l.regions())).unwrap(); // generation 1 → slot 1
        l.ensure(0, 1).unwrap(); // generation 2 → slot 0, extent 0
        l.ensure(8 * MIB, 1).unwrap(); // generation 3 → slot 1, extents 0, 2
        let slot = l.slot_size;
        drop(l);
        // Tear the newest slot (generation 3, slot 1).
        let f = OpenOptions::new()
            .write(true)
            .open(d.path().join("g1.disk0.al"))
            .unwrap();
        f.write_all_at(&[0xFF; 2], slot + 64).unwrap();
        let (_l, r) = open(d.path(), 64 * MIB);
        assert_eq!(r.al_extents, 1, "generation 2's slot: extent 0 only");
    }
}
